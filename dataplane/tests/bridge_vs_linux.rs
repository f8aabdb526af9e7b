//! podwire's bridge against the Linux bridge: the same frame sequence, the same ports out.
//!
//! The test builds a Linux bridge `br0` in a network namespace of its own with three TAP
//! devices as ports (opened here, moved into the namespace, so this test holds the other end
//! of each "cable"), writes a sequence of frames into the ports, and records for each frame the
//! ports it left by (read back from the TAP descriptors) and whether `br0` itself received it
//! (its rx counter). The same sequence goes through `podwire_dataplane::bridge::Bridge` with
//! three pod ports and a host port standing for `br0`. Every frame must leave on the same set.
//! Needs root; skipped otherwise.

#![allow(clippy::tests_outside_test_module)] // integration tests live outside test modules by design

use podwire_dataplane::batch::Batch;
use podwire_dataplane::bridge::{Bridge, Config, Decision, PortId, PortOptions, Station};
use podwire_dataplane::port::tap::TapPort;
use podwire_dataplane::port::{RxPort, TxPort};
use podwire_dataplane::wire::MacAddr;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // local experimental
const BR0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const HOST: &str = "host";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn br0_rx(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "br0"])
        .output()
        .expect("ip");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

fn frame(dst: [u8; 6], src: [u8; 6], seq: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(60, 0);
    f
}

fn seq_of(f: &[u8]) -> Option<u32> {
    (f.len() >= 18 && f[12..14] == ETHERTYPE)
        .then(|| u32::from_be_bytes([f[14], f[15], f[16], f[17]]))
}

fn mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, last]
}

/// (ingress port, destination, source) of each frame.
fn sequence() -> Vec<(usize, [u8; 6], [u8; 6])> {
    let (a, b, c, d) = (mac(0xa), mac(0xb), mac(0xc), mac(0xd));
    let bcast = [0xff; 6];
    vec![
        (0, bcast, a),                          // broadcast: everyone but p0, host too
        (1, a, b),                              // known unicast: p0 only
        (2, d, c),                              // unknown unicast: p0, p1, not the host
        (0, b, a),                              // p1 only
        (0, c, a),                              // p2 only
        (1, a, a),                              // a moves to p1 (frame to itself: nowhere)
        (2, a, c),                              // follows a to p1
        (0, [0x01, 0x00, 0x5e, 0, 0, 1], d),    // multicast: flooded, host too
        (1, [0x01, 0x80, 0xc2, 0, 0, 0], b),    // STP group, no STP: flooded
        (2, [0x01, 0x80, 0xc2, 0, 0, 0x0e], c), // LLDP: never forwarded
        (2, [0x01, 0x80, 0xc2, 0, 0, 0x01], c), // pause: never forwarded
        (0, b, [0x01, 0, 0, 0, 0, 1]),          // multicast source: dropped
        (0, b, [0; 6]),                         // zero source: dropped
        (2, BR0_MAC, c),                        // to the bridge itself: host only
        (1, d, b),                              // d never spoke: flooded to p0, p2
        (1, c, d),                              // d now at p1; c at p2
        (0, d, a),                              // p1
    ]
}

#[test]
fn frames_leave_by_the_same_ports_as_through_a_linux_bridge() {
    if !nix_is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = Netns(format!("pwbrcmp{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    let n = ns.0.as_str();
    for sysctl in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        ip(&["netns", "exec", n, "sysctl", "-qw", sysctl]);
    }
    ip(&[
        "-n",
        n,
        "link",
        "add",
        "br0",
        "address",
        "02:00:00:00:00:fe",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ]);
    ip(&["-n", n, "link", "set", "br0", "up"]);
    let mut taps = Vec::new();
    for i in 0..3 {
        let tap = TapPort::open("pwcmp%d").expect("TAP device");
        let dev = tap.name().to_string();
        ip(&["link", "set", "dev", &dev, "netns", n]);
        ip(&[
            "-n",
            n,
            "link",
            "set",
            "dev",
            &dev,
            "name",
            &format!("p{i}"),
        ]);
        ip(&[
            "-n",
            n,
            "link",
            "set",
            &format!("p{i}"),
            "master",
            "br0",
            "up",
        ]);
        taps.push(tap);
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut batch = Batch::new(64, 2048);
    // Drain anything the kernel sent while the ports came up.
    for tap in taps.iter_mut() {
        while tap.rx_batch(&mut batch).unwrap() > 0 {}
    }

    let mut ours = Bridge::new(Config::default(), 8);
    let ports: Vec<PortId> = (0..3)
        .map(|_| ours.add_port(PortOptions::default()).unwrap())
        .collect();
    let host = ours
        .add_port(PortOptions {
            host: true,
            ..PortOptions::default()
        })
        .unwrap();
    ours.add_static(MacAddr(BR0_MAC), Station::Port(host))
        .unwrap();
    let name_of = |p: PortId| -> String {
        if p == host {
            HOST.to_string()
        } else {
            format!("p{}", ports.iter().position(|&q| q == p).unwrap())
        }
    };

    let no_peer = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    // Where each frame (by sequence number) came out of the Linux bridge, gathered over the
    // whole run so a late one still counts for its own frame.
    let mut linux_out: Vec<BTreeSet<String>> = vec![BTreeSet::new(); sequence().len()];
    let mut collect = |taps: &mut Vec<TapPort>, batch: &mut Batch| -> bool {
        let mut any = false;
        for (i, tap) in taps.iter_mut().enumerate() {
            while tap.rx_batch(batch).unwrap() > 0 {
                for k in 0..batch.len() {
                    if let Some(seq) = seq_of(batch.packet(k)) {
                        linux_out[seq as usize].insert(format!("p{i}"));
                        any = true;
                    }
                }
            }
        }
        any
    };
    let mut podwire_out = Vec::new();
    let mut host_rx = Vec::new();
    for (seq, (ingress, dst, src)) in sequence().into_iter().enumerate() {
        let f = frame(dst, src, seq as u32);
        // Linux: write, then wait until nothing more comes out for 30 ms (at least 60 ms).
        let rx_before = br0_rx(n);
        batch.clear();
        batch.rx_slot(0)[..f.len()].copy_from_slice(&f);
        batch.commit_rx(0, f.len(), no_peer, false);
        assert_eq!(taps[ingress].tx_batch(&batch, &[0]).sent, 1);
        let started = std::time::Instant::now();
        let mut quiet = 0;
        while quiet < 3 || started.elapsed() < Duration::from_millis(60) {
            std::thread::sleep(Duration::from_millis(10));
            quiet = if collect(&mut taps, &mut batch) {
                0
            } else {
                quiet + 1
            };
        }
        host_rx.push(br0_rx(n) > rx_before);
        // podwire.
        let from = Station::Port(ports[ingress]);
        let out: BTreeSet<String> = match ours.input(from, &f, seq as u64) {
            Decision::Port(p) => [name_of(p)].into(),
            Decision::Flood => ours.flood_ports(from, &f).map(name_of).collect(),
            Decision::Remote(_) => panic!("no VTEPs here"),
            Decision::Drop(_) => BTreeSet::new(),
        };
        podwire_out.push(out);
    }
    collect(&mut taps, &mut batch);
    for (seq, (ingress, dst, src)) in sequence().into_iter().enumerate() {
        let mut linux = linux_out[seq].clone();
        if host_rx[seq] {
            linux.insert(HOST.to_string());
        }
        assert_eq!(
            podwire_out[seq],
            linux,
            "frame {seq}: in p{ingress}, dst {}, src {}",
            MacAddr(dst),
            MacAddr(src)
        );
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
