//! The `podwire-apiserver-standin` binary: seeded objects served, tokens from the command
//! line, a clean exit on SIGTERM.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{call, Req, READER};

/// The server process, killed if the test fails before it is stopped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn serves_a_seed_until_sigterm() {
    let dir = std::env::temp_dir().join(format!("standin-binary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let seed = dir.join("seed.json");
    let objects = r#"{"kind":"List","apiVersion":"v1","items":[
        {"kind":"Node","apiVersion":"v1","metadata":{"name":"seeded"},"spec":{"podCIDR":"10.244.7.0/24"}},
        {"kind":"Service","apiVersion":"v1","metadata":{"name":"dns","namespace":"kube-system"}}
    ]}"#;
    std::fs::write(&seed, objects).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_podwire-apiserver-standin"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token",
            "admin-token",
            "--token",
            &format!("{READER}:reader"),
            "--seed",
        ])
        .arg(&seed)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let mut stderr = BufReader::new(server.0.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"));
    let addr = url.trim_start_matches("http://").parse().unwrap();

    let node = call(addr, Req::get("/api/v1/nodes/seeded").token(Some(READER)));
    assert_eq!(node.status, 200, "{:?}", node.body);
    assert_eq!(node.body["spec"]["podCIDR"], "10.244.7.0/24");
    assert_eq!(
        call(
            addr,
            Req::get("/api/v1/namespaces/kube-system/services/dns")
        )
        .status,
        200
    );
    assert_eq!(
        call(
            addr,
            Req::patch("/api/v1/nodes/seeded", "application/merge-patch+json", "{}")
                .token(Some(READER))
        )
        .status,
        403
    );

    let killed = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    line.clear();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("stopping"), "{line:?}");
    assert!(server.0.wait().unwrap().success());
}
