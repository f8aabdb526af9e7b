//! The XDP program and the AF_XDP port on a real veth pair (root; skipped otherwise).
//!
//! - Attached in driver mode, the program counts UDP to podwire's port as ours (passed to the
//!   kernel while no AF_XDP socket is bound, so nothing is lost), lets ARP, TCP and other UDP
//!   through untouched, and is gone from the interface once dropped.
//! - With an AF_XDP socket in its map, podwire's datagrams arrive on the socket as whole
//!   Ethernet frames (and not on the kernel's socket), frames sent through it reach the peer,
//!   and every send frame comes back (no UMEM leak).

#![allow(clippy::tests_outside_test_module)] // integration tests live outside test modules by design

use podwire_dataplane::batch::Batch;
use podwire_dataplane::pipeline::MASQ_PORTS;
use podwire_dataplane::port::neigh_dump::NeighDump;
use podwire_dataplane::port::udp::UdpPort;
use podwire_dataplane::port::xdp::underlay::XdpUnderlayPort;
use podwire_dataplane::port::xdp::xsk::{XskConfig, XskPort};
use podwire_dataplane::port::xdp::{Mode, Role, XdpProgram};
use podwire_dataplane::port::{RxPort, TxPort};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
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
    let (mut prog, ours, theirs) = in_netns(&a.0, move || {
        let prog = XdpProgram::attach(
            "xa",
            Role::Underlay {
                local_ip,
                port: PORT,
                masq_ports: Some(MASQ_PORTS),
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

    // A NodePort and a port of the masquerade range are podwire's too (a SYN each, refused by
    // the kernel with a RST since no socket is bound); once the NodePort is gone, it is not.
    assert_eq!(prog.set_node_ports(&[(6, 30080), (17, 30053)]).unwrap(), 2);
    let syn = |port: u16| {
        in_netns(&b.0, move || {
            let r = TcpStream::connect_timeout(&(local_ip, port).into(), Duration::from_secs(3));
            assert!(r.is_err(), "nothing listens on {port}");
        })
    };
    syn(30080);
    syn(MASQ_PORTS.0 + 7);
    syn(30081);
    assert_eq!(prog.counters().unwrap().no_socket, 7);
    assert_eq!(prog.set_node_ports(&[(17, 30053)]).unwrap(), 1);
    syn(30080);
    let c = prog.counters().unwrap();
    assert_eq!(c.no_socket, 7, "{c:?}");

    // ICMP errors: about a packet the node sent from a port of the masquerade range, podwire's;
    // from another port, or an echo request, the kernel's.
    let icmp = |quoted_sport: u16, kind: u8| {
        in_netns(&b.0, move || {
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::ICMPV4),
            )
            .expect("raw socket");
            let mut quoted = Vec::new();
            etherparse::PacketBuilder::ipv4([10, 99, 0, 1], [10, 99, 0, 2], 64)
                .udp(quoted_sport, 443)
                .write(&mut quoted, &[])
                .unwrap();
            let mut msg = vec![kind, if kind == 3 { 4 } else { 0 }, 0, 0, 0, 0, 0x05, 0x78];
            msg.extend_from_slice(&quoted);
            let sum = podwire_dataplane::wire::checksum::checksum(&msg);
            msg[2..4].copy_from_slice(&sum.to_be_bytes());
            let to = SocketAddrV4::new(local_ip, 0);
            s.send_to(&msg, &to.into()).expect("send ICMP");
        })
    };
    icmp(MASQ_PORTS.0 + 9, 3);
    icmp(2222, 3);
    icmp(MASQ_PORTS.0 + 9, 8);
    std::thread::sleep(Duration::from_millis(100));
    let c = prog.counters().unwrap();
    assert_eq!(
        c.no_socket, 8,
        "only the error about a masqueraded port: {c:?}"
    );

    drop(prog);
    let link = ip(&["-n", &a.0, "-d", "link", "show", "xa"]);
    assert!(
        !link.contains("prog/xdp"),
        "still attached after drop: {link}"
    );
}

/// A veth pair between two fresh namespaces, `xa` (10.99.0.1, 02:00:00:00:0a:01) in the first
/// and `xb` (10.99.0.2, 02:00:00:00:0b:01) in the second.
fn veth_pair(tag: &str) -> (Netns, Netns) {
    let pid = std::process::id();
    let (a, b) = (
        Netns(format!("pw{tag}a{pid}")),
        Netns(format!("pw{tag}b{pid}")),
    );
    ip(&["netns", "add", &a.0]);
    ip(&["netns", "add", &b.0]);
    ip(&[
        "-n",
        &a.0,
        "link",
        "add",
        "xa",
        "address",
        "02:00:00:00:0a:01",
        "type",
        "veth",
        "peer",
        "name",
        "xb",
        "address",
        "02:00:00:00:0b:01",
        "netns",
        &b.0,
    ]);
    ip(&["-n", &a.0, "addr", "add", "10.99.0.1/24", "dev", "xa"]);
    ip(&["-n", &b.0, "addr", "add", "10.99.0.2/24", "dev", "xb"]);
    ip(&["-n", &a.0, "link", "set", "xa", "up"]);
    ip(&["-n", &b.0, "link", "set", "xb", "up"]);
    (a, b)
}

/// Sets `xb` (in `b`) up as the sending peer: GRO on, since native XDP redirects on veth
/// arrive only if the sender has GRO (or XDP), and `extra` ethtool features.
fn peer_features(b: &Netns, extra: &[&str]) {
    let mut args = vec!["netns", "exec", &b.0, "ethtool", "-K", "xb", "gro", "on"];
    args.extend_from_slice(extra);
    let status = Command::new("ip").args(&args).status().expect("ethtool");
    assert!(status.success(), "ethtool {extra:?}");
}

/// In namespace `a`: the XDP program on `xa` as the underlay of 10.99.0.1:PORT (and of the
/// masquerade range), and an AF_XDP socket on its queue 0, in the program's map.
fn xdp_with_socket(a: &Netns) -> (XdpProgram, XskPort) {
    let local_ip = Ipv4Addr::new(10, 99, 0, 1);
    let (mut prog, port) = in_netns(&a.0, move || {
        let role = Role::Underlay {
            masq_ports: Some(MASQ_PORTS),
            local_ip,
            port: PORT,
        };
        let prog = XdpProgram::attach("xa", role).expect("attach");
        let port = XskPort::bind("xa", 0, XskConfig::default()).expect("AF_XDP socket");
        (prog, port)
    });
    prog.set_socket(0, &port.raw_fd()).expect("xsks_map");
    (prog, port)
}

#[test]
fn af_xdp_port_receives_podwires_frames_and_sends_without_leaking() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (a, b) = veth_pair("xsk");
    peer_features(&b, &[]);
    let local_ip = Ipv4Addr::new(10, 99, 0, 1);
    let (prog, mut port) = xdp_with_socket(&a);
    let kernel_sock = in_netns(&a.0, move || {
        UdpSocket::bind((local_ip, PORT)).expect("bind")
    });
    assert!(!port.zero_copy(), "veth is copy mode only");

    // 100 datagrams to podwire's port: all on the AF_XDP socket, none on the kernel's.
    const N: usize = 100;
    in_netns(&b.0, move || {
        let s = UdpSocket::bind((Ipv4Addr::new(10, 99, 0, 2), 5555)).expect("bind");
        for i in 0..N as u32 {
            s.send_to(&i.to_be_bytes(), (local_ip, PORT)).expect("send");
        }
    });
    let mut batch = Batch::new(64, 2048);
    let mut seen = [false; N];
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while seen.iter().any(|s| !s) && std::time::Instant::now() < deadline {
        let n = port.rx_batch(&mut batch).expect("rx");
        for i in 0..n {
            let f = batch.packet(i);
            let p = etherparse::SlicedPacket::from_ethernet(f).expect("a whole Ethernet frame");
            let Some(etherparse::TransportSlice::Udp(udp)) = p.transport else {
                panic!("not UDP: {f:02x?}");
            };
            assert_eq!(udp.destination_port(), PORT);
            assert_eq!(udp.source_port(), 5555);
            let seq = u32::from_be_bytes(udp.payload()[..4].try_into().unwrap()) as usize;
            seen[seq] = true;
        }
        if n == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(
        seen.iter().all(|&s| s),
        "missing: {:?}",
        (0..N).filter(|&i| !seen[i]).collect::<Vec<_>>()
    );
    kernel_sock.set_nonblocking(true).unwrap();
    assert!(
        kernel_sock.recv(&mut [0u8; 64]).is_err(),
        "the kernel got one of ours"
    );
    let c = prog.counters().expect("counters");
    assert_eq!(c.redirected, N as u64, "{c:?}");

    // 300 frames out through the socket, to a UDP socket on the peer (read as they come: its
    // buffer holds fewer than 300 small datagrams).
    const M: usize = 300;
    let sink = in_netns(&b.0, || {
        UdpSocket::bind((Ipv4Addr::new(10, 99, 0, 2), 7777)).unwrap()
    });
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = vec![false; M];
        let mut buf = [0u8; 64];
        let mut last = None;
        while let Ok(n) = sink.recv(&mut buf) {
            assert_eq!(n, 4);
            let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
            assert!(last < Some(seq), "{seq} after {last:?}: frames reordered");
            last = Some(seq);
            got[seq as usize] = true;
            if got.iter().all(|&g| g) {
                break;
            }
        }
        got
    });
    let mut sent = 0;
    let mut out = Batch::new(64, 2048);
    while sent < M {
        out.clear();
        let k = (M - sent).min(64);
        for j in 0..k {
            let mut frame = Vec::new();
            etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0xa, 1], [2, 0, 0, 0, 0xb, 1])
                .ipv4([10, 99, 0, 1], [10, 99, 0, 2], 64)
                .udp(6666, 7777)
                .write(&mut frame, &((sent + j) as u32).to_be_bytes())
                .unwrap();
            out.rx_slot(j)[..frame.len()].copy_from_slice(&frame);
            out.commit_rx(j, frame.len(), SocketAddrV4::new(local_ip, 0), false);
        }
        let idx: Vec<u16> = (0..k as u16).collect();
        let r = port.tx_batch(&out, &idx);
        sent += r.sent;
        // Copy mode sends a budget of frames per kick: kick until this batch is out.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while port.flush() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let got = reader.join().expect("reader");
    assert!(
        got.iter().all(|&g| g),
        "{} of {M} arrived",
        got.iter().filter(|&&g| g).count()
    );
    // Every send frame is back once the kernel is done: nothing leaked.
    let (free, total) = port.send_frames();
    assert_eq!(free, total, "UMEM send frames leaked");
    let stats = port.stats().expect("stats");
    assert_eq!(stats.rx_invalid + stats.tx_invalid, 0, "{stats:?}");
}

#[test]
fn underlay_over_af_xdp_speaks_in_datagrams_and_resolves_next_hops() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (a, b) = veth_pair("xul");
    // Checksum offload off, so the peer's frames carry full UDP checksums as on a physical
    // wire (veth otherwise leaves them partial, which only an skb can say).
    peer_features(&b, &["tx", "off"]);
    let local_ip = Ipv4Addr::new(10, 99, 0, 1);
    let peer_ip = Ipv4Addr::new(10, 99, 0, 2);
    let (_prog, xsk) = xdp_with_socket(&a);
    // The port resolves next hops from the namespace it is made in.
    let mut port = in_netns(&a.0, move || {
        let mac = "02:00:00:00:0a:01".parse().unwrap();
        XdpUnderlayPort::new(xsk, "xa", mac, local_ip, PORT)
    });

    // Receive: what a UDP socket would return, payload and sender.
    in_netns(&b.0, move || {
        let s = UdpSocket::bind((peer_ip, 5555)).expect("bind");
        for i in 0..20u32 {
            s.send_to(&i.to_be_bytes(), (local_ip, PORT)).expect("send");
        }
    });
    let mut batch = Batch::new(64, 2048);
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while got < 20 && std::time::Instant::now() < deadline {
        let n = port.rx_batch(&mut batch).expect("rx");
        for i in 0..n {
            assert_eq!(batch.packet(i).len(), 4, "the UDP payload alone");
            assert_eq!(batch.meta(i).peer, SocketAddrV4::new(peer_ip, 5555));
            got += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(got, 20);
    assert_eq!(port.take_refused(), 0);
    assert_eq!(port.take_wire(), 0);

    // A TCP segment to a port of the masquerade range: a whole IPv4 packet from the wire.
    let masq_port = MASQ_PORTS.0 + 3;
    in_netns(&b.0, move || {
        let r =
            TcpStream::connect_timeout(&(local_ip, masq_port).into(), Duration::from_millis(300));
        assert!(r.is_err(), "podwire's, not the kernel's: nobody answers");
    });
    let n = port.rx_batch(&mut batch).expect("rx");
    assert_eq!(n, 1);
    assert!(batch.meta(0).wire);
    assert_eq!(batch.meta(0).peer, SocketAddrV4::new(peer_ip, 0));
    let p = etherparse::SlicedPacket::from_ip(batch.packet(0)).expect("an IPv4 packet");
    let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else {
        panic!("not TCP");
    };
    assert!(tcp.syn() && tcp.destination_port() == masq_port);
    assert_eq!(port.take_wire(), 1);

    // Send: outer IPv4 + UDP packets, as the pipeline writes them; the port adds Ethernet
    // with the peer's MAC from the kernel's table (in node A's namespace, so it runs there).
    const M: u32 = 50;
    let sink = in_netns(&b.0, move || UdpSocket::bind((peer_ip, 7777)).unwrap());
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut seen = std::collections::BTreeSet::new();
        while let Ok((n, from)) = sink.recv_from(&mut buf) {
            assert_eq!(from, std::net::SocketAddr::from((local_ip, 6666)));
            seen.insert(u32::from_be_bytes(buf[..n].try_into().unwrap()));
            if seen.len() == M as usize {
                break;
            }
        }
        seen.len()
    });
    let (refused_sends, mut port) = in_netns(&a.0, move || {
        let mut out = Batch::new(64, 2048);
        let mut refused = 0;
        for seq in 0..M {
            let mut pkt = Vec::new();
            etherparse::PacketBuilder::ipv4(local_ip.octets(), peer_ip.octets(), 64)
                .udp(6666, 7777)
                .write(&mut pkt, &seq.to_be_bytes())
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            loop {
                out.clear();
                out.rx_slot(0)[..pkt.len()].copy_from_slice(&pkt);
                out.commit_rx(0, pkt.len(), SocketAddrV4::new(peer_ip, 7777), false);
                let r = port.tx_batch(&out, &[0]);
                if r.sent == 1 || std::time::Instant::now() > deadline {
                    break;
                }
                // The neighbour is being resolved by the kernel: try again shortly.
                refused += r.failed;
                std::thread::sleep(Duration::from_millis(20));
            }
            while port.xsk().flush() > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        (refused, port)
    });
    assert_eq!(reader.join().expect("reader"), M as usize);
    // Resolution takes at most a few tries, and only at the start.
    assert!(refused_sends < 10, "{refused_sends} sends refused");
    // The port read that from the kernel's table through rtnetlink: the peer is there.
    let table = in_netns(&a.0, || {
        let index = nix::net::if_::if_nametoindex("xa").expect("xa");
        NeighDump::open(index)
            .expect("rtnetlink")
            .read()
            .expect("dump")
    });
    assert_eq!(
        table.get(&peer_ip).map(|m| m.to_string()),
        Some("02:00:00:00:0b:01".to_string()),
        "{table:?}"
    );

    // Datagrams (the udp backend, L2 mode): the port writes Ethernet, IPv4 and UDP, with a
    // checksum the receiving kernel verifies (it drops a wrong one), from our port.
    let sink = in_netns(&b.0, move || UdpSocket::bind((peer_ip, 8285)).unwrap());
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = Batch::new(64, 2048);
    let sizes = [1usize, 2, 3, 63, 1400];
    for (k, &len) in sizes.iter().enumerate() {
        out.rx_slot(k)[..len].fill(k as u8 + 1);
        out.commit_rx(k, len, SocketAddrV4::new(peer_ip, 8285), false);
    }
    let items: Vec<(u16, SocketAddrV4)> = (0..sizes.len() as u16)
        .map(|i| (i, SocketAddrV4::new(peer_ip, 8285)))
        .collect();
    let r = in_netns(&a.0, move || {
        let mut socket = UdpPort::bind(SocketAddrV4::new(local_ip, PORT), 64, 1 << 20).unwrap();
        let r = port.send_datagrams(&out, items, &mut socket);
        assert_eq!(port.take_via_kernel(), 0, "resolved above");
        while port.xsk().flush() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        r
    });
    assert_eq!((r.sent, r.failed), (sizes.len(), 0));
    let mut buf = [0u8; 2048];
    for (k, &len) in sizes.iter().enumerate() {
        let (n, from) = sink
            .recv_from(&mut buf)
            .expect("a datagram with a valid checksum");
        assert_eq!(from, std::net::SocketAddr::from((local_ip, PORT)));
        assert_eq!(n, len);
        assert!(buf[..n].iter().all(|&b| b == k as u8 + 1));
    }
}

#[test]
fn pod_role_takes_what_podwire_routes_and_leaves_the_rest_to_the_kernel() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // `xa` is a pod's veth host end (10.99.0.1, the pod's gateway); the pod behind `xb` sends
    // through it to everything.
    let (a, b) = veth_pair("xpod");
    ip(&["-n", &b.0, "route", "add", "default", "via", "10.99.0.1"]);
    let role = |masquerade| Role::Pod {
        local_ip: Ipv4Addr::new(10, 99, 0, 1),
        network: "10.244.0.0/16".parse().unwrap(),
        lease: "10.244.1.0/24".parse().unwrap(),
        services: "10.96.0.0/12".parse().unwrap(),
        masquerade,
        pod_ip: Ipv4Addr::new(10, 99, 0, 2),
        node_ip: Ipv4Addr::new(192, 168, 100, 1),
    };
    let send_from = |b: &Netns, src: Ipv4Addr, dsts: &'static [[u8; 4]]| {
        in_netns(&b.0, move || {
            let s = UdpSocket::bind((src, 0)).expect("bind");
            s.set_broadcast(true).expect("SO_BROADCAST");
            for d in dsts {
                s.send_to(b"x", (Ipv4Addr::from(*d), 7)).expect("send");
            }
        });
        std::thread::sleep(Duration::from_millis(100));
    };
    let send_to = |b: &Netns, dsts: &'static [[u8; 4]]| {
        in_netns(&b.0, move || {
            let s = UdpSocket::bind((Ipv4Addr::new(10, 99, 0, 2), 0)).expect("bind");
            s.set_broadcast(true).expect("SO_BROADCAST");
            for d in dsts {
                s.send_to(b"x", (Ipv4Addr::from(*d), 7)).expect("send");
            }
        });
        std::thread::sleep(Duration::from_millis(100));
    };
    // Another node's pod and a service: podwire's (no socket yet: counted, passed).
    // The gateway, this node's other pods and the outside: the kernel's.
    const OURS: &[[u8; 4]] = &[[10, 244, 2, 5], [10, 96, 0, 10]];
    // Also the node's own address and addresses no masquerade may reach (link-local,
    // multicast, broadcast), which podwire would drop: the kernel's, even when masquerading.
    const THEIRS: &[[u8; 4]] = &[
        [10, 99, 0, 1],
        [10, 244, 1, 7],
        [192, 0, 2, 9],
        [192, 168, 100, 1],
        [169, 254, 169, 254],
        [224, 0, 0, 251],
        [255, 255, 255, 255],
    ];
    let prog = in_netns(&a.0, move || {
        XdpProgram::attach("xa", role(false)).expect("attach")
    });
    send_to(&b, OURS);
    send_to(&b, THEIRS);
    let c = prog.counters().unwrap();
    assert_eq!(c.no_socket, 2, "{c:?}");
    assert!(c.passed >= 3, "{c:?}");
    drop(prog);
    // Masquerading: TCP and UDP to the outside is podwire's too.
    let prog = in_netns(&a.0, move || {
        XdpProgram::attach("xa", role(true)).expect("attach")
    });
    send_to(&b, THEIRS);
    let c = prog.counters().unwrap();
    assert_eq!(c.no_socket, 1, "only the outside host: {c:?}");
    // The pod posing as another address (a neighbour's, one of another node's pods'): none
    // of it is podwire's; it is passed to the kernel (which routes it as it would from any
    // pod, into the TUN, where it is held to the lease), and counted.
    ip(&["-n", &b.0, "addr", "add", "10.99.0.3/24", "dev", "xb"]);
    send_from(&b, Ipv4Addr::new(10, 99, 0, 3), OURS);
    send_from(&b, Ipv4Addr::new(10, 99, 0, 3), THEIRS);
    let c2 = prog.counters().unwrap();
    assert_eq!(
        c2.no_socket, c.no_socket,
        "nothing foreign is redirected: {c2:?}"
    );
    assert!(c2.foreign_source >= 5, "{c2:?}");
}

#[test]
fn bridge_port_role_hands_every_frame_to_podwire() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (a, b) = veth_pair("xbr");
    peer_features(&b, &["tx", "off"]);
    let local_ip = Ipv4Addr::new(10, 99, 0, 1);
    // A pod's veth host end as a bridge port: every frame is podwire's, also IPv4 to the
    // host end's own address (which a kernel socket there waits for) and ARP.
    let (mut prog, mut port) = in_netns(&a.0, move || {
        let prog = XdpProgram::attach("xa", Role::BridgePort).expect("attach");
        let port = XskPort::bind("xa", 0, XskConfig::default()).expect("AF_XDP socket");
        (prog, port)
    });
    prog.set_socket(0, &port.raw_fd()).expect("xsks_map");
    let kernel_sock = in_netns(&a.0, move || {
        UdpSocket::bind((local_ip, 9999)).expect("bind")
    });
    ip(&[
        "-n",
        &b.0,
        "neigh",
        "replace",
        "10.99.0.1",
        "lladdr",
        "02:00:00:00:0a:01",
        "dev",
        "xb",
    ]);
    in_netns(&b.0, move || {
        let s = UdpSocket::bind((Ipv4Addr::new(10, 99, 0, 2), 5555)).expect("bind");
        s.send_to(b"to the host end", (local_ip, 9999))
            .expect("send");
        // No neighbour entry: the kernel asks by ARP first (a broadcast).
        let _ = s.send_to(b"x", (Ipv4Addr::new(10, 99, 0, 50), 9999));
    });
    let mut batch = Batch::new(64, 2048);
    let (mut udp, mut arp) = (false, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !(udp && arp) && std::time::Instant::now() < deadline {
        let n = port.rx_batch(&mut batch).expect("rx");
        for i in 0..n {
            let frame = batch.packet(i);
            assert_eq!(&frame[6..12], &[2, 0, 0, 0, 0x0b, 1], "from the peer");
            match u16::from_be_bytes([frame[12], frame[13]]) {
                0x0806 => arp |= frame[..6] == [0xff; 6],
                0x0800 => udp |= frame.ends_with(b"to the host end"),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        udp && arp,
        "IPv4 to the host end: {udp}; ARP broadcast: {arp}"
    );
    kernel_sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        kernel_sock.recv_from(&mut buf).is_err(),
        "the kernel saw nothing"
    );
    let c = prog.counters().expect("counters");
    assert_eq!((c.passed, c.malformed), (0, 0), "{c:?}");
    assert!(c.redirected >= 2, "{c:?}");
}
