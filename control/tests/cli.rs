//! The `podwire` binary's command line, run as a user would (no root, nothing set up).
#![allow(clippy::tests_outside_test_module)]

use std::process::Command;

fn podwire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_podwire"))
}

#[test]
fn test_help_does_not_show_the_etcd_password_from_the_environment() {
    let out = podwire()
        .args(["run", "--help"])
        .env("FLANNELD_ETCD_PASSWORD", "hunter2-from-env")
        .env("FLANNELD_ETCD_USERNAME", "flannel-user-from-env")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert!(help.contains("FLANNELD_ETCD_PASSWORD"), "{help}");
    assert!(help.contains("--etcd-password-file"), "{help}");
    assert!(
        !help.contains("hunter2-from-env"),
        "--help shows the password: {help}"
    );
    assert!(!help.contains("flannel-user-from-env"), "{help}");
}

#[test]
fn test_an_unreadable_password_file_is_a_clear_error() {
    let missing = std::env::temp_dir().join(format!("podwire-no-such-pw-{}", std::process::id()));
    let out = podwire()
        .args(["run", "--etcd-username", "u", "--etcd-password-file"])
        .arg(&missing)
        .env_remove("FLANNELD_ETCD_PASSWORD")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("No such file"),
        "{err}"
    );
    let both = podwire()
        .args(["run", "--etcd-password", "x", "--etcd-password-file", "/p"])
        .output()
        .unwrap();
    assert!(!both.status.success());
    assert!(
        String::from_utf8_lossy(&both.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&both.stderr)
    );
}

/// Runs `cmd` and returns its output, or fails the test if it is still running after `limit`
/// (a daemon that started instead of refusing its flags).
fn exits_within(mut cmd: Command, limit: std::time::Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Flags that parse but do not go together are refused before anything is set up, saying
/// which.
#[test]
fn test_flags_that_do_not_go_together_are_refused_by_name() {
    for (flags, says) in [
        (&["--l2-pods", "xdp"][..], "--l2-pods is an L2 mode option"),
        (&["--pod-ports", "veth1"], "--pod-ports needs --io xdp"),
        (&["--etcd-password", "x"], "needs --etcd-username"),
        (&["--workers", "0"], "--workers must be at least 1"),
    ] {
        let mut cmd = podwire();
        cmd.arg("run")
            .args(flags)
            .args(["--store", "file:/nonexistent/cluster.json"])
            .env_remove("FLANNELD_ETCD_USERNAME");
        let out = exits_within(cmd, std::time::Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr);
        // A usage error, as clap's own.
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(says), "{flags:?}: {err}");
    }
    // `on`/`off` values as users type them, and nothing else.
    let out = podwire()
        .args(["run", "--udp-gso", "maybe"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("possible values: on, off"), "{err}");
}

/// Mistakes found on the node itself fail at once, before the store is asked anything: a URL
/// that is not etcd's is a usage error (exit 2); a missing store file or interface, exit 1.
#[test]
fn test_local_mistakes_fail_before_the_store() {
    let cases: [(&[&str], i32, &[&str]); 4] = [
        (
            &["--etcd-endpoints", "foo://x"],
            2,
            &["--etcd-endpoints", "foo://x", "http:// or https://"],
        ),
        (
            &["--etcd-endpoints", "http://"],
            2,
            &["--etcd-endpoints", "http://", "no host"],
        ),
        (
            &["--iface", "lo", "--store", "file:/nonexistent/cluster.json"],
            1,
            &["/nonexistent/cluster.json", "No such file"],
        ),
        // Nothing listens on port 9: before, the daemon retried the store forever and never
        // got to the interface.
        (
            &[
                "--iface",
                "nosuch0",
                "--etcd-endpoints",
                "http://127.0.0.1:9",
            ],
            1,
            &["nosuch0"],
        ),
    ];
    for (flags, code, says) in cases {
        let mut cmd = podwire();
        cmd.arg("run")
            .args(flags)
            .env_remove("FLANNELD_ETCD_ENDPOINTS");
        let out = exits_within(cmd, std::time::Duration::from_secs(5));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{flags:?}: {err}");
        for s in says {
            assert!(err.contains(s), "{flags:?}: no {s:?} in {err}");
        }
    }
}

/// `podwire run` with no store flags tries flanneld's default etcd endpoints, as flanneld does,
/// and says so at once with what to give instead.
#[test]
fn test_no_store_flags_says_which_endpoints_it_tries() {
    use std::process::Stdio;
    let mut child = podwire()
        .args(["run", "--iface", "lo"])
        .env_remove("FLANNELD_ETCD_ENDPOINTS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no --store or --etcd-endpoints given")
            && err.contains("http://127.0.0.1:2379")
            && err.contains("--store file:PATH"),
        "{err}"
    );
}

/// flanneld's environment read as flanneld reads it: Go's booleans, and the flags podwire does
/// not implement refused there as on the command line.
#[test]
fn test_flanneld_environment_as_flanneld_reads_it() {
    // Parsed: the run gets as far as the flag check that follows parsing.
    for yes in ["1", "t", "TRUE", "True"] {
        let mut cmd = podwire();
        cmd.args(["run", "--workers", "0"])
            .env("FLANNELD_IP_MASQ", yes);
        let out = exits_within(cmd, std::time::Duration::from_secs(5));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--workers must be at least 1"), "{yes}: {err}");
    }
    let mut cmd = podwire();
    cmd.args(["run", "--workers", "0"])
        .env("FLANNELD_IP_MASQ", "yes");
    let out = exits_within(cmd, std::time::Duration::from_secs(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a boolean"), "{err}");
    let mut cmd = podwire();
    cmd.args(["run"]).env("FLANNELD_IFACE_REGEX", "eth.*");
    let out = exits_within(cmd, std::time::Duration::from_secs(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("flanneld setting FLANNELD_IFACE_REGEX is not supported"),
        "{err}"
    );
    // FLANNELD_KUBE_SUBNET_MGR is read: without NODE_NAME the node cannot know its Node.
    let mut cmd = podwire();
    cmd.args(["run"])
        .env("FLANNELD_KUBE_SUBNET_MGR", "true")
        .env_remove("NODE_NAME");
    let out = exits_within(cmd, std::time::Duration::from_secs(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--kube-subnet-mgr needs this node's Node name"),
        "{err}"
    );
}

/// Logs to a pipe carry no colour codes; `--log-level` and flanneld's `-v` set what is written.
#[test]
fn test_logs_to_a_pipe_are_plain_and_levels_apply() {
    use std::process::Stdio;
    let run = |extra: &[&str]| {
        let mut child = podwire()
            .args([
                "run",
                "--iface",
                "lo",
                "--etcd-endpoints",
                "http://127.0.0.1:9",
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(700));
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let info = run(&[]);
    assert!(info.contains("WARN"), "{info}");
    assert!(!info.contains('\u{1b}'), "colour codes in a pipe: {info:?}");
    // One readable line per store error: the cause, not the transport's debug text.
    assert!(
        info.contains("tcp connect error: Connection refused"),
        "{info}"
    );
    assert!(!info.contains("ConnectError("), "{info}");
    let quiet = run(&["--log-level", "error"]);
    assert!(!quiet.contains("WARN"), "{quiet}");
    let debug = run(&["-v=2"]);
    assert!(debug.contains("DEBUG"), "{debug}");
}
