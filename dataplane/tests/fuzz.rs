//! Property-based fuzzing on stable Rust (proptest): every parser and the whole pipeline get
//! arbitrary bytes, mutated fixture packets and random table states, and must never panic,
//! never leave a packet undecided, and never send a packet anywhere it does not belong.
//!
//! CI runs the default case counts (a few seconds). A longer run:
//! `PROPTEST_CASES=200000 cargo test --release -p podwire-dataplane --test fuzz`.
//! A failure prints the minimal input; it becomes a regression case (proptest keeps it in
//! `proptest-regressions/`, and a decision worth pinning goes under `fixtures/pcap/`).

#![allow(clippy::tests_outside_test_module)] // integration tests live outside test modules by design

use podwire_dataplane::batch::{Batch, HEADROOM};
use podwire_dataplane::bridge::{Bridge, Config as BridgeConfig, Decision, PortOptions, Station};
use podwire_dataplane::conntrack;
use podwire_dataplane::nat::{Admission, PortRange, ServiceOptions, ServiceSpec, Services};
use podwire_dataplane::pipeline::{
    self, Direction, Encap, Flows, LocalNode, Tables, Verdict, WireNat, MASQ_PORTS,
};
use podwire_dataplane::route::{Backend, Ipv4Net, Node, SubnetMap};
use podwire_dataplane::wire::{arp, ethernet, icmpv4, ipv4, ipv6, tcp, udp, vnet, vxlan, MacAddr};
use proptest::prelude::*;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, OnceLock};

const FRAME: usize = 2048;

/// Every packet of `fixtures/pcap/*/in.pcap`: the seeds mutations start from.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pcap");
        let mut out = Vec::new();
        for case in std::fs::read_dir(dir).expect("fixtures/pcap").flatten() {
            let Ok(f) = std::fs::File::open(case.path().join("in.pcap")) else {
                continue;
            };
            let mut r = pcap_file::pcap::PcapReader::new(f).expect("pcap");
            while let Some(Ok(p)) = r.next_packet() {
                let data = p.data.into_owned();
                // Ethernet records carry IPv4/UDP outer headers: keep both the whole frame
                // and what a socket would hand over (the UDP payload), and the inner packet.
                if data.len() > 42 && data[12..14] == [0x08, 0x00] {
                    out.push(data[42..].to_vec());
                    out.push(data[14..].to_vec());
                }
                out.push(data);
            }
        }
        assert!(out.len() > 10, "fixture seeds missing");
        out
    })
}

/// Bytes: arbitrary, or a seed with some bytes changed and maybe cut short.
fn packet() -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        any::<prop::sample::Index>(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        any::<Option<prop::sample::Index>>(),
    )
        .prop_map(|(seed, flips, cut)| {
            let s = seeds();
            let mut p = s[seed.index(s.len())].clone();
            if !p.is_empty() {
                for (at, b) in flips {
                    let i = at.index(p.len());
                    p[i] = b;
                }
                if let Some(c) = cut {
                    p.truncate(c.index(p.len() + 1));
                }
            }
            p
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..1600),
        mutated,
        pod_packet(),
        pod_packet(),
    ]
}

/// A well-formed IPv4 packet between pods of 10.244.1-40.0/24 or to a service address, TCP
/// with random flags, UDP or ICMP, sometimes with TTL 1 or 0.
fn pod_packet() -> impl Strategy<Value = Vec<u8>> {
    (
        (1u8..42, 1u8..6),
        (prop_oneof![Just(244u8), Just(96u8)], 0u8..42, 1u8..6),
        0u8..3,
        (
            any::<u16>(),
            1u16..100,
            any::<u8>(),
            prop_oneof![Just(64u8), Just(1u8), Just(0u8)],
        ),
        0usize..300,
    )
        .prop_map(
            |((sn, sh), (net, dn, dh), proto, (sport, dport, flags, ttl), len)| {
                let src = [10, 244, sn, sh];
                let dst = [10, net, dn, dh];
                let payload = vec![0x5a; len];
                let b = etherparse::PacketBuilder::ipv4(src, dst, ttl);
                let mut out = Vec::new();
                let _ = match proto {
                    0 => {
                        let mut t = b.tcp(sport, dport, u32::from(sport) << 8, 64_000);
                        if flags & 1 != 0 {
                            t = t.syn();
                        }
                        if flags & 2 != 0 {
                            t = t.ack(u32::from(flags));
                        }
                        if flags & 4 != 0 {
                            t = t.fin();
                        }
                        if flags & 8 != 0 {
                            t = t.rst();
                        }
                        t.write(&mut out, &payload)
                    }
                    1 => b.udp(sport, dport).write(&mut out, &payload),
                    _ => b
                        .icmpv4_echo_request(sport, dport)
                        .write(&mut out, &payload),
                };
                out
            },
        )
}

/// A random cluster: 2 to 40 /24 leases in 10.244.0.0/16 (ours among them), udp or VXLAN,
/// with 0 to 4 services whose endpoints are pods of those leases.
/// A service: ClusterIP host byte, port, UDP?, endpoints (lease, host, port).
type ServiceShape = (u8, u16, bool, Vec<(u8, u8, u16)>);

#[derive(Debug, Clone)]
struct World {
    leases: u8,
    ours: u8,
    vxlan: bool,
    services: Vec<ServiceShape>,
    track: bool,
}

fn world() -> impl Strategy<Value = World> {
    (2u8..40, any::<u8>(), any::<bool>(), any::<bool>())
        .prop_flat_map(|(leases, ours, vxlan, track)| {
            let svc = (
                any::<u8>(),
                1u16..100,
                any::<bool>(),
                prop::collection::vec((1..=leases, 2u8..6, 1u16..100), 0..4),
            );
            (
                Just(leases),
                Just(ours % leases + 1),
                Just(vxlan),
                prop::collection::vec(svc, 0..4),
                Just(track),
            )
        })
        .prop_map(|(leases, ours, vxlan, services, track)| World {
            leases,
            ours,
            vxlan,
            services,
            track,
        })
}

fn node_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 99, i)
}

fn lease(i: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, i, 0), 24).unwrap()
}

fn build(w: &World) -> (Tables, Option<Flows>) {
    let vni = vxlan::Vni::new(1).unwrap();
    let mac = |i: u8| MacAddr([0x0e, 0x70, 0xc0, 0xa8, 0x63, i]);
    let mut map = SubnetMap::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
    for i in 1..=w.leases {
        let backend = if w.vxlan {
            Backend::Vxlan {
                vni,
                vtep_mac: mac(i),
            }
        } else {
            Backend::Udp
        };
        map.insert(Node {
            subnet: lease(i),
            public_ip: node_ip(i),
            backend,
        })
        .unwrap();
    }
    let options = ServiceOptions::new("10.96.0.0/12".parse().unwrap());
    let specs: Vec<ServiceSpec> = w
        .services
        .iter()
        .enumerate()
        .map(|(k, (ip, port, udp, eps))| ServiceSpec {
            name: format!("default/s{k}"),
            cluster_ip: Ipv4Addr::new(10, 96, k as u8, *ip),
            port: *port,
            proto: if *udp {
                conntrack::PROTO_UDP
            } else {
                conntrack::PROTO_TCP
            },
            endpoints: eps
                .iter()
                .map(|&(n, h, p)| SocketAddrV4::new(Ipv4Addr::new(10, 244, n, h), p))
                .collect(),
            affinity_timeout: (k % 2 == 1).then_some(60),
            // Small, so random packets hit them.
            node_port: Some(*port),
        })
        .collect();
    // Any NodePort, so random packets hit them; what the checks refuse is left out.
    let admission = Admission {
        node_port_range: PortRange::new(1, u16::MAX).expect("a valid range"),
        ..Admission::default()
    };
    let (services, _) = Services::admit(options, &admission, specs);
    let tables = Tables {
        map,
        local: LocalNode {
            subnet: lease(w.ours),
            public_ip: node_ip(w.ours),
            tun_addr: lease(w.ours).addr(),
        },
        peer_port: if w.vxlan { 8472 } else { 8285 },
        encap: if w.vxlan {
            Encap::Vxlan {
                vni,
                local_mac: mac(w.ours),
            }
        } else {
            Encap::FlannelUdp
        },
        services: Arc::new(services),
        outer_udp_checksum: true,
        wire: None,
    };
    let flows = w.track.then(|| {
        Flows::new(conntrack::Config {
            max_entries: 64,
            ..Default::default()
        })
    });
    (tables, flows)
}

/// Where the packet inside a forwarded one starts: the inner IPv4 header.
fn inner_at(t: &Tables, v: Verdict) -> usize {
    match (v, t.encap) {
        (Verdict::ToUnderlayIp(_), Encap::Vxlan { .. }) => 20 + 8 + 8 + 14,
        _ => 0,
    }
}

fn check_batch(t: &Tables, dir: Direction, b: &Batch) -> Result<(), TestCaseError> {
    for i in 0..b.len() {
        let m = b.meta(i);
        prop_assert!(m.verdict != Verdict::Pending, "packet {i} left undecided");
        prop_assert!(m.start + m.len <= FRAME, "packet {i} outside its slot");
        let pkt = b.packet(i);
        if let Verdict::ToWire(to) = m.verdict {
            prop_assert!(t.wire.is_some(), "to the wire without owning it");
            let (src, dst) = (
                Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
                Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
            );
            prop_assert_eq!(dst, to);
            prop_assert_eq!(src, t.local.public_ip, "to the wire not as the node");
            prop_assert!(!t.map.network().contains(dst), "{} is in the cluster", dst);
        }
        // A packet from the wire may go on to another node (a NodePort's backend there), and so
        // may the backend's answer to a NodePort client that is a pod of a third node.
        let routed = dir == Direction::FromTun || m.wire || t.wire.is_some();
        match (dir, m.verdict) {
            (_, v @ (Verdict::ToUnderlay(_) | Verdict::ToUnderlayIp(_))) if routed => {
                let to = match v {
                    Verdict::ToUnderlay(a) => *a.ip(),
                    Verdict::ToUnderlayIp(ip) => ip,
                    _ => unreachable!(),
                };
                prop_assert!(to != t.local.public_ip, "sent to ourselves");
                let inner = &pkt[inner_at(t, v)..];
                let dst = Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]);
                let owner = t.map.lookup(dst).map(|n| n.public_ip);
                prop_assert_eq!(owner, Some(to), "{} sent to the wrong node", dst);
            }
            (Direction::FromUnderlay, Verdict::ToTun) => {
                let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
                prop_assert!(
                    t.local.subnet.contains(dst),
                    "{} delivered from the underlay but not ours",
                    dst
                );
            }
            (Direction::FromUnderlay, Verdict::ToUnderlay(_) | Verdict::ToUnderlayIp(_)) => {
                prop_assert!(false, "underlay traffic relayed back out");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Cases per target: `PROPTEST_CASES` when set (a long run), else the CI default. proptest reads
/// the variable only into its own default, which an explicit `cases` would override.
fn cases(ci_default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2000), ..ProptestConfig::default() })]

    /// The pipeline, both directions, tracked or not, on random clusters.
    #[test]
    fn pipeline_decides_every_packet_and_never_misroutes(
        w in world(),
        pkts in prop::collection::vec(packet(), 1..12),
        from_node in any::<u8>(),
        wrap in any::<bool>(),
        aim in any::<bool>(),
        owns_wire in any::<bool>(),
        now in 0u64..1_000_000,
    ) {
        let (mut t, flows) = build(&w);
        // Owning the node's address: NodePorts, masquerade, packets from the wire.
        t.wire = owns_wire.then_some(WireNat { masquerade: true, masq_ports: MASQ_PORTS });
        let sender_ip = node_ip(from_node % (w.leases + 3));
        for dir in [Direction::FromTun, Direction::FromUnderlay] {
            let mut b = Batch::new(pkts.len(), FRAME);
            // The sender: a node of the cluster (most of the time) or a stranger.
            let sender = SocketAddrV4::new(sender_ip, t.peer_port);
            for (i, p) in pkts.iter().enumerate() {
                // From the underlay, often aimed: to one of our pods, from its source's node.
                let aimed;
                let mut sender = sender;
                let p = if dir == Direction::FromUnderlay && aim && p.len() >= 20 && p[0] >> 4 == 4 {
                    let mut q = p.clone();
                    q[18] = w.ours;
                    q[10..12].fill(0);
                    let ihl = usize::from(q[0] & 0x0f) * 4;
                    if ihl >= 20 && ihl <= q.len() {
                        let sum = podwire_dataplane::wire::checksum::checksum(&q[..ihl]);
                        q[10..12].copy_from_slice(&sum.to_be_bytes());
                    }
                    sender = SocketAddrV4::new(node_ip(q[14]), t.peer_port);
                    aimed = q;
                    &aimed
                } else {
                    p
                };
                // From the underlay, sometimes as a VXLAN payload to our VtepMAC.
                let wrapped;
                let p = if dir == Direction::FromUnderlay && w.vxlan && wrap {
                    let mut v = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
                    v.extend_from_slice(&[0x0e, 0x70, 0xc0, 0xa8, 0x63, w.ours]);
                    v.extend_from_slice(&[0x0e, 0x70, 0xc0, 0xa8, 0x63, sender.ip().octets()[3]]);
                    v.extend_from_slice(&[0x08, 0x00]);
                    v.extend_from_slice(p);
                    wrapped = v;
                    &wrapped
                } else {
                    p
                };
                let n = p.len().min(FRAME - HEADROOM);
                b.rx_slot(i)[..n].copy_from_slice(&p[..n]);
                b.commit_rx(i, n, sender, n < p.len());
                if dir == Direction::FromUnderlay && i % 3 == 2 {
                    // As the AF_XDP port hands over TCP and UDP to the node's address.
                    b.slot_mut(i).1.wire = true;
                }
            }
            pipeline::process_with(&t, flows.as_ref(), now, dir, &mut b);
            check_batch(&t, dir, &b)?;
            if std::env::var_os("FUZZ_STATS").is_some() {
                for i in 0..b.len() {
                    eprintln!("VERDICT {dir:?} {:?}", b.meta(i).verdict);
                }
            }
        }
    }

    /// Every wire parser and the offload code on arbitrary bytes: errors, never panics.
    #[test]
    fn wire_parsers_never_panic(p in packet(), k in 0usize..50) {
        if let Ok(e) = ethernet::Packet::new_checked(&p[..]) {
            let _ = ethernet::Repr::parse(&e);
        }
        if let Ok(ip) = ipv4::Packet::new_checked(&p[..]) {
            let _ = (ip.verify_checksum(), ip.payload().len(), ip.src(), ip.dst(), ip.frag_offset());
            let _ = ipv4::Repr::parse(&ip);
            let l4 = ip.payload();
            if let Ok(u) = udp::Packet::new_checked(l4) {
                let _ = udp::Repr::parse(&u);
            }
            let _ = tcp::Packet::new_checked(l4).map(|t| t.payload().len());
            let _ = icmpv4::Packet::new_checked(l4).map(|i| (i.data().len(), i.verify_checksum(), i.echo_seq()));
        }
        let _ = ipv6::Packet::new_checked(&p[..]);
        if let Ok(a) = arp::Packet::new_checked(&p[..]) {
            let _ = arp::Repr::parse(&a);
        }
        if let Ok(v) = vxlan::Packet::new_checked(&p[..]) {
            let _ = (v.check_strict(), v.vni(), v.payload().len());
        }
        if let Ok(h) = vnet::VnetHeader::parse(&p[..]) {
            let frame = &p[vnet::HEADER_LEN..];
            if let Ok(n) = vnet::segment_count(&h, frame) {
                let mut out = vec![0u8; 70_000];
                for i in [0, k % n.max(1), n.saturating_sub(1), n] {
                    let _ = vnet::segment(&h, frame, i, &mut out);
                }
            }
            let mut copy = frame.to_vec();
            let _ = vnet::finish_checksum(&mut copy, usize::from(h.csum_start), usize::from(h.csum_offset));
        }
        let mut co = vnet::TcpCoalescer::new();
        for _ in 0..3 {
            if !co.push(&p) {
                let _ = co.take();
            }
        }
        let _ = co.take();
    }

    /// The bridge on arbitrary frames from arbitrary ingress: a decision for each, bounds kept.
    #[test]
    fn bridge_decides_every_frame(
        frames in prop::collection::vec((packet(), 0u8..5, any::<u16>()), 1..40),
    ) {
        let mut b = Bridge::new(BridgeConfig { max_learned: 8, ageing_ms: 500, ..Default::default() }, 4);
        let ports: Vec<_> = (0..3).map(|_| b.add_port(PortOptions::default()).unwrap()).collect();
        b.set_vteps(&[node_ip(2), node_ip(3)]);
        let mut now = 0u64;
        for (f, from, dt) in &frames {
            now += u64::from(*dt);
            let ingress = match from {
                0..=2 => Station::Port(ports[usize::from(*from)]),
                3 => Station::Remote(node_ip(2)),
                _ => Station::Remote(node_ip(3)),
            };
            match b.input(ingress, f, now) {
                Decision::Port(p) => prop_assert!(Station::Port(p) != ingress || b.port_options(p).unwrap().hairpin),
                Decision::Remote(ip) => prop_assert!(matches!(ingress, Station::Port(_)) && b.vteps().contains(&ip)),
                Decision::Flood => prop_assert!(b.flood_ports(ingress, f).all(|p| Station::Port(p) != ingress)),
                Decision::Drop(_) => {}
            }
            prop_assert!(b.learned() <= 8);
            b.age(now, 3);
        }
    }
}
