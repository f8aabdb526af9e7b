//! The XDP program on a real veth (root; skipped otherwise): attached in driver mode, it
//! counts UDP to podwire's port as ours (passed to the kernel while no AF_XDP socket is bound,
//! so nothing is lost), lets ARP, TCP and other UDP through untouched, and is gone from the
//! interface once dropped.

#![allow(clippy::tests_outside_test_module)] // integration tests live outside test modules by design

use podwire_dataplane::port::xdp::{Mode, Role, XdpProgram};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

const PORT: u16 = 8472;

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn xdp_program_steers_only_podwires_udp_and_detaches_on_drop() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let pid = std::process::id();
    let (a, b) = (Netns(format!("pwxdpa{pid}")), Netns(format!("pwxdpb{pid}")));
    ip(&["netns", "add", &a.0]);
    ip(&["netns", "add", &b.0]);
    ip(&[
        "-n", &a.0, "link", "add", "xa", "type", "veth", "peer", "name", "xb", "netns", &b.0,
    ]);
    ip(&["-n", &a.0, "addr", "add", "10.99.0.1/24", "dev", "xa"]);
    ip(&["-n", &b.0, "addr", "add", "10.99.0.2/24", "dev", "xb"]);
    ip(&["-n", &a.0, "link", "set", "xa", "up"]);
    ip(&["-n", &b.0, "link", "set", "xb", "up"]);
    // Native XDP on veth needs the peer to have GRO or XDP for redirects; passing does not.
    let local_ip = Ipv4Addr::new(10, 99, 0, 1);
    let (prog, ours, theirs) = in_netns(&a.0, move || {
        let prog = XdpProgram::attach(
            "xa",
            Role::Underlay {
                local_ip,
                port: PORT,
            },
        )
        .expect("attach");
        let ours = UdpSocket::bind((local_ip, PORT)).expect("bind 8472");
        let theirs = UdpSocket::bind((local_ip, 9999)).expect("bind 9999");
        (prog, ours, theirs)
    });
    assert_eq!(prog.mode(), Mode::Driver, "veth has native XDP");
    let link = ip(&["-n", &a.0, "-d", "link", "show", "xa"]);
    assert!(link.contains("prog/xdp"), "{link}");

    // ARP and a TCP connection to a port podwire does not own: the kernel answers as before.
    let listener = in_netns(&a.0, move || {
        TcpListener::bind((local_ip, 2222)).expect("listen")
    });
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).expect("read");
        conn.write_all(&buf).expect("echo");
    });
    let echoed = in_netns(&b.0, move || {
        let mut c = TcpStream::connect_timeout(&(local_ip, 2222).into(), Duration::from_secs(3))
            .expect("connect");
        c.write_all(b"hello").expect("write");
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).expect("read");
        buf
    });
    server.join().expect("server");
    assert_eq!(&echoed, b"hello");

    // Five datagrams to our port, three to another.
    in_netns(&b.0, move || {
        let s = UdpSocket::bind((Ipv4Addr::new(10, 99, 0, 2), 0)).expect("bind");
        for i in 0..5u8 {
            s.send_to(&[i; 20], (local_ip, PORT)).expect("send");
        }
        for i in 0..3u8 {
            s.send_to(&[i; 20], (local_ip, 9999)).expect("send");
        }
    });
    let recv_all = |s: &UdpSocket, n: usize| {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        (0..n).filter(|_| s.recv(&mut buf).is_ok()).count()
    };
    // No AF_XDP socket is bound yet: ours go to the kernel too, and nothing is lost.
    assert_eq!(recv_all(&ours, 5), 5);
    assert_eq!(recv_all(&theirs, 3), 3);
    let c = prog.counters().expect("counters");
    assert_eq!(c.no_socket, 5, "{c:?}");
    assert_eq!(c.redirected, 0, "{c:?}");
    assert_eq!(c.malformed, 0, "{c:?}");
    // 3 UDP to 9999, the TCP connection's segments, ARP.
    assert!(c.passed >= 7, "{c:?}");

    drop(prog);
    let link = ip(&["-n", &a.0, "-d", "link", "show", "xa"]);
    assert!(
        !link.contains("prog/xdp"),
        "still attached after drop: {link}"
    );
}
