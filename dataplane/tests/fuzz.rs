//! Property-based fuzzing on stable Rust (proptest): every parser and the whole pipeline get
//! arbitrary bytes, mutated fixture packets and well-formed packets on random clusters, and the
//! pipeline's decisions are held to invariants that a wrong decision breaks.
//!
//! Seeds come in the form each entry point receives them: IPv4 packets for the TUN side, UDP
//! payloads with their sender for the underlay (flannel udp: the inner IPv4 packet; VXLAN: the
//! 8-byte VXLAN header, the inner Ethernet frame and the inner packet), cut from every capture
//! under `fixtures/pcap/` (the malformed corpus included) as the port would cut them.
//!
//! Invariants, asserted on every packet of every case:
//! - every packet is decided (no `Pending`), and `replay` accounts for every record: written,
//!   skipped or dropped by reason;
//! - a pod never sends with a source that is not its own: from the TUN, a source outside our
//!   lease (and not the node's) is dropped; from the underlay, nothing is delivered whose inner
//!   source is outside the sending node's lease;
//! - nothing received from the underlay goes back to the underlay, except as the node (the
//!   answer to a NodePort client, source the node's address) or a NodePort connection from the
//!   wire to its backend;
//! - nothing is sent to a node that does not own its destination, or to ourselves;
//! - what leaves is well-formed: lengths as the headers say, IPv4 header checksums right, the
//!   VXLAN headers we write as the kernel writes them, and an inner TCP/UDP/ICMP checksum that
//!   was right on the way in is right on the way out (NAT patches it).
//!
//! Each invariant was seen to fail against a deliberately broken pipeline (the `fuzz-broken-*`
//! features of this crate, never enabled by CI), e.g.
//! `cargo test --release -p podwire-dataplane --features fuzz-broken-spoof --test fuzz`.
//!
//! Cases per target: `PODWIRE_FUZZ_CASES` (CI default below, a few seconds each in release).
//! A long run: `PODWIRE_FUZZ_CASES=1000000 cargo test --release -p podwire-dataplane --test fuzz`.
//! A failure prints the minimal input; proptest keeps it in `proptest-regressions/`, where it is
//! replayed first on every later run (commit it with the fix).

#![allow(clippy::tests_outside_test_module)] // integration tests live outside test modules by design

use podwire_dataplane::batch::{Batch, HEADROOM};
use podwire_dataplane::bridge::{Bridge, Config as BridgeConfig, Decision, PortOptions, Station};
use podwire_dataplane::conntrack;
use podwire_dataplane::nat::{Admission, PortRange, ServiceOptions, ServiceSpec, Services};
use podwire_dataplane::offload::{coalesce, segment};
use podwire_dataplane::pipeline::{
    self, Direction, DropReason, Encap, Flows, LocalNode, Tables, Verdict, WireNat, WorkerState,
    MASQ_PORTS,
};
use podwire_dataplane::route::{Backend, Ipv4Net, Node, SubnetMap};
use podwire_dataplane::stats::Counter;
use podwire_dataplane::wire::{arp, ethernet, icmpv4, ipv4, ipv6, tcp, udp, vnet, vxlan, MacAddr};
use proptest::prelude::*;

/// The serving-but-terminating endpoints of the fuzz world's service `k`: every third has one,
/// so random packets meet the fallback to them.
fn terminating_endpoints(k: usize) -> Vec<SocketAddrV4> {
    if k % 3 == 2 {
        vec![SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 9), 80)]
    } else {
        Vec::new()
    }
}
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

const FRAME: usize = 2048;
const VNI: u32 = 1;
const UDP_PORT: u16 = 8285;
const VXLAN_PORT: u16 = 8472;

// ---- seeds ------------------------------------------------------------------------------------

/// The fixtures' packets, cut as each entry point receives them.
#[derive(Debug, Default)]
struct Seeds {
    /// IPv4 packets as the TUN hands them over (and the inner packets of the datagrams).
    tun: Vec<Vec<u8>>,
    /// flannel udp datagrams' payloads (an inner IPv4 packet) and their senders.
    udp: Vec<(Vec<u8>, SocketAddrV4)>,
    /// VXLAN datagrams' payloads (VXLAN header, inner Ethernet, inner IPv4) and their senders.
    vxlan: Vec<(Vec<u8>, SocketAddrV4)>,
    /// Every record after its link header, as captured, for the parsers.
    raw: Vec<Vec<u8>>,
    /// The captures read, and those of them in the malformed corpus.
    files: usize,
    malformed: usize,
}

fn pcaps(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("fixtures dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            pcaps(&p, out);
        } else if p.extension().is_some_and(|x| x == "pcap") {
            out.push(p);
        }
    }
}

/// An underlay datagram to a flannel port, as `recvmmsg` returns it: its UDP payload (bounded by
/// the UDP length) and sender. None for anything else (a packet of the TUN side).
fn as_datagram(rec: &[u8]) -> Option<(u16, Vec<u8>, SocketAddrV4)> {
    let ip = parse_ip(rec)?;
    if ip.proto != 17 || ip.frag || ip.l4.len() < 8 {
        return None;
    }
    let dport = u16::from_be_bytes([ip.l4[2], ip.l4[3]]);
    if dport != UDP_PORT && dport != VXLAN_PORT {
        return None;
    }
    let ulen = usize::from(u16::from_be_bytes([ip.l4[4], ip.l4[5]]));
    if ulen < 8 {
        return None;
    }
    let payload = ip.l4[8..ulen.min(ip.l4.len())].to_vec();
    let sport = u16::from_be_bytes([ip.l4[0], ip.l4[1]]);
    Some((dport, payload, SocketAddrV4::new(ip.src, sport)))
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pcap");
        let mut files = Vec::new();
        pcaps(&root, &mut files);
        files.sort();
        let mut s = Seeds::default();
        for f in &files {
            let mut r = pcap_file::pcap::PcapReader::new(std::fs::File::open(f).expect("pcap"))
                .expect("a pcap");
            let strip = match r.header().datalink {
                pcap_file::DataLink::RAW | pcap_file::DataLink::IPV4 => 0,
                pcap_file::DataLink::ETHERNET => 14,
                other => panic!("{}: link type {other:?}", f.display()),
            };
            s.files += 1;
            s.malformed += usize::from(f.components().any(|c| c.as_os_str() == "malformed"));
            while let Some(p) = r.next_packet() {
                let data = p.expect("a pcap record").data;
                if strip == 14 && data.get(12..14) != Some(&[0x08, 0x00][..]) {
                    continue;
                }
                let rec = data.get(strip..).unwrap_or_default().to_vec();
                match as_datagram(&rec) {
                    Some((VXLAN_PORT, payload, from)) => {
                        if payload.len() > 16 {
                            s.tun.push(payload[16..].to_vec());
                        }
                        s.vxlan.push((payload, from));
                    }
                    Some((_, payload, from)) => {
                        s.tun.push(payload.clone());
                        s.udp.push((payload, from));
                    }
                    None => s.tun.push(rec.clone()),
                }
                s.raw.push(rec);
            }
        }
        assert!(s.malformed >= 20, "the malformed corpus was not loaded");
        assert!(
            s.tun.len() > 50 && s.udp.len() > 20 && s.vxlan.len() > 20,
            "fixture seeds missing: {} tun, {} udp, {} vxlan",
            s.tun.len(),
            s.udp.len(),
            s.vxlan.len()
        );
        s
    })
}

// ---- an independent reading of IPv4 -----------------------------------------------------------

/// An IPv4 packet as the checks read it (not with the code under test).
struct Ip<'a> {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    hdr: &'a [u8],
    l4: &'a [u8],
    /// A fragment (first or not).
    frag: bool,
    /// Bytes beyond Total Length.
    trailing: usize,
}

fn parse_ip(p: &[u8]) -> Option<Ip<'_>> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if ihl < 20 || total < ihl || total > p.len() {
        return None;
    }
    Some(Ip {
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        proto: p[9],
        hdr: &p[..ihl],
        l4: &p[ihl..total],
        frag: u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0,
        trailing: p.len() - total,
    })
}

fn ones(acc: u64, data: &[u8]) -> u64 {
    let mut acc = acc;
    for c in data.chunks(2) {
        acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn folds_to_ffff(mut acc: u64) -> bool {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc == 0xffff
}

fn pseudo(ip: &Ip<'_>) -> u64 {
    let (s, d) = (ip.src.octets(), ip.dst.octets());
    ones(
        0,
        &[s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], 0, ip.proto],
    ) + ip.l4.len() as u64
}

/// Whether the packet's TCP, UDP (non-zero) or ICMP checksum is right; None if it has none to
/// check (a fragment, another protocol, a UDP checksum of 0, a header cut short).
fn l4_checksum_ok(ip: &Ip<'_>) -> Option<bool> {
    if ip.frag {
        return None;
    }
    match ip.proto {
        6 if ip.l4.len() >= 20 => Some(folds_to_ffff(ones(pseudo(ip), ip.l4))),
        17 if ip.l4.len() >= 8
            && usize::from(u16::from_be_bytes([ip.l4[4], ip.l4[5]])) == ip.l4.len()
            && ip.l4[6..8] != [0, 0] =>
        {
            Some(folds_to_ffff(ones(pseudo(ip), ip.l4)))
        }
        1 if ip.l4.len() >= 8 => Some(folds_to_ffff(ones(0, ip.l4))),
        _ => None,
    }
}

fn fill_ip_checksum(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if p.len() < 20 || ihl < 20 || ihl > p.len() {
        return;
    }
    p[10..12].fill(0);
    let mut acc = ones(0, &p[..ihl]);
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    p[10..12].copy_from_slice(&(!(acc as u16)).to_be_bytes());
}

// ---- the cluster ------------------------------------------------------------------------------

/// A service: ClusterIP host byte, port, UDP?, endpoints (lease, host, port).
type ServiceShape = (u8, u16, bool, Vec<(u8, u8, u16)>);

/// A random cluster laid out as the fixtures' (`192.168.100.<i>` holds `10.244.<i>.0/24`, VtepMAC
/// `0e:70:77:00:00:<i>`, VNI 1): 2 to 40 leases, ours among them (often 1, as in the fixtures),
/// udp or VXLAN (lease 3 sometimes udp in a VXLAN cluster, as in the fixtures), with random
/// services and sometimes the fixtures' own.
#[derive(Debug, Clone)]
struct World {
    leases: u8,
    ours: u8,
    vxlan: bool,
    lease3_udp: bool,
    services: Vec<ServiceShape>,
    fixture_services: bool,
    track: bool,
    owns_wire: bool,
    outer_udp_checksum: bool,
}

fn world() -> impl Strategy<Value = World> {
    (
        2u8..40,
        prop_oneof![Just(0u8), any::<u8>()],
        any::<bool>(),
        any::<bool>(),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
    )
        .prop_flat_map(|(leases, ours, vxlan, lease3_udp, flags)| {
            let svc = (
                any::<u8>(),
                1u16..100,
                any::<bool>(),
                prop::collection::vec((1..=leases, 2u8..6, 1u16..100), 0..4),
            );
            (
                Just((leases, ours % leases + 1, vxlan, lease3_udp, flags)),
                prop::collection::vec(svc, 0..4),
            )
        })
        .prop_map(
            |(
                (leases, ours, vxlan, lease3_udp, (fixture_services, track, wire, csum)),
                services,
            )| {
                World {
                    leases,
                    ours,
                    vxlan,
                    lease3_udp,
                    services,
                    fixture_services,
                    track,
                    owns_wire: wire,
                    outer_udp_checksum: csum,
                }
            },
        )
}

fn node_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, i)
}

fn vtep_mac(i: u8) -> MacAddr {
    MacAddr([0x0e, 0x70, 0x77, 0, 0, i])
}

fn lease(i: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, i, 0), 24).unwrap()
}

impl World {
    fn peer_port(&self) -> u16 {
        if self.vxlan {
            VXLAN_PORT
        } else {
            UDP_PORT
        }
    }

    /// The lease (index) holding `a`, if any.
    fn lease_of(&self, a: Ipv4Addr) -> Option<u8> {
        let o = a.octets();
        (o[0] == 10 && o[1] == 244 && (1..=self.leases).contains(&o[2])).then_some(o[2])
    }

    fn is_vxlan_lease(&self, i: u8) -> bool {
        self.vxlan && !(i == 3 && self.lease3_udp)
    }

    /// Every service as (ClusterIP, port, UDP?, endpoints).
    fn service_list(&self) -> Vec<(Ipv4Addr, u16, bool, Vec<SocketAddrV4>)> {
        let mut out: Vec<_> = self
            .services
            .iter()
            .enumerate()
            .map(|(k, (ip, port, udp, eps))| {
                let eps = eps
                    .iter()
                    .map(|&(n, h, p)| SocketAddrV4::new(Ipv4Addr::new(10, 244, n, h), p))
                    .collect();
                (Ipv4Addr::new(10, 96, k as u8 + 1, *ip), *port, *udp, eps)
            })
            .collect();
        if self.fixture_services {
            let ep = |p| vec![SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 2), p)];
            out.push((Ipv4Addr::new(10, 96, 0, 10), 80, false, ep(8080)));
            out.push((Ipv4Addr::new(10, 96, 0, 53), 53, true, ep(10053)));
        }
        out
    }
}

fn build(w: &World) -> (Tables, Option<Flows>) {
    let vni = vxlan::Vni::new(VNI).unwrap();
    let mut map = SubnetMap::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
    for i in 1..=w.leases {
        let backend = if w.is_vxlan_lease(i) {
            Backend::Vxlan {
                vni,
                vtep_mac: vtep_mac(i),
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
        .service_list()
        .into_iter()
        .enumerate()
        .map(|(k, (cluster_ip, port, udp, endpoints))| ServiceSpec {
            name: format!("default/s{k}"),
            cluster_ip,
            port,
            proto: if udp {
                conntrack::PROTO_UDP
            } else {
                conntrack::PROTO_TCP
            },
            endpoints,
            affinity_timeout: (k % 2 == 1).then_some(60),
            // Small, so random packets hit them.
            node_port: Some(port),
            // Some terminating endpoints and Local policies, so random packets meet them.
            terminating: terminating_endpoints(k),
            internal_local: k % 2 == 0,
            // One external IP each, which `Addr::Service` aims at too.
            external_ips: vec![external_ip(k)],
            // Both external policies; health checks are served by the control plane.
            external_local: k % 3 == 0,
            health_check_node_port: None,
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
        peer_port: w.peer_port(),
        encap: if w.vxlan {
            Encap::Vxlan {
                vni,
                local_mac: vtep_mac(w.ours),
            }
        } else {
            Encap::FlannelUdp
        },
        services: Arc::new(services),
        outer_udp_checksum: w.outer_udp_checksum,
        // Owning the node's address: NodePorts, masquerade, packets from the wire.
        wire: w.owns_wire.then_some(WireNat {
            masquerade: true,
            masq_ports: MASQ_PORTS,
        }),
    };
    let flows = w.track.then(|| {
        Flows::new(conntrack::Config {
            max_entries: 64,
            ..Default::default()
        })
    });
    (tables, flows)
}

// ---- inputs -----------------------------------------------------------------------------------

/// An address, chosen relative to the cluster the case runs on.
#[derive(Debug, Clone, Copy)]
enum Addr {
    /// A pod of our lease (host byte).
    OurPod(u8),
    /// A pod of lease `n % leases + 1`.
    Pod(u8, u8),
    /// The node's own address, or its TUN's.
    OurNode,
    OurTun,
    /// Service `k`'s ClusterIP (modulo the services; an odd `k` its external IP), or any
    /// address when there is none.
    Service(u8),
    /// Any address at all.
    Any(u32),
}

impl Addr {
    fn resolve(self, w: &World) -> Ipv4Addr {
        match self {
            Addr::OurPod(h) => Ipv4Addr::new(10, 244, w.ours, h),
            Addr::Pod(n, h) => Ipv4Addr::new(10, 244, n % w.leases + 1, h),
            Addr::OurNode => node_ip(w.ours),
            Addr::OurTun => lease(w.ours).addr(),
            Addr::Service(k) => {
                let s = w.service_list();
                let i = usize::from(k) % s.len().max(1);
                match s.get(i) {
                    Some(_) if k % 2 == 1 => external_ip(i),
                    Some(s) => s.0,
                    None => Ipv4Addr::new(10, 96, 0, k),
                }
            }
            Addr::Any(a) => Ipv4Addr::from(a),
        }
    }
}

/// Where a packet comes from or goes to, weighted by the side it enters: `w` gives the weights
/// of our pods, other leases' pods, the node, its TUN, ClusterIPs and anything.
fn addr(w: [u32; 6]) -> BoxedStrategy<Addr> {
    prop_oneof![
        w[0] => any::<u8>().prop_map(Addr::OurPod),
        w[1] => (any::<u8>(), any::<u8>()).prop_map(|(n, h)| Addr::Pod(n, h)),
        w[2] => Just(Addr::OurNode),
        w[3] => Just(Addr::OurTun),
        w[4] => any::<u8>().prop_map(Addr::Service),
        w[5] => any::<u32>().prop_map(Addr::Any),
    ]
    .boxed()
}

/// Service `k`'s external IP.
fn external_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, k as u8 + 1)
}

/// The side a packet enters by.
#[derive(Debug, Clone, Copy)]
enum Side {
    Tun,
    Underlay,
    Wire,
}

impl Side {
    /// Sources and destinations: mostly what that side carries, sometimes anything.
    fn addrs(self) -> (BoxedStrategy<Addr>, BoxedStrategy<Addr>) {
        match self {
            Side::Tun => (addr([12, 1, 1, 1, 1, 1]), addr([2, 6, 1, 1, 4, 2])),
            Side::Underlay => (addr([1, 12, 1, 1, 1, 1]), addr([12, 1, 1, 1, 1, 1])),
            // The destination becomes the node's; a ClusterIP gives its port (a NodePort).
            Side::Wire => (addr([1, 3, 1, 1, 1, 6]), addr([1, 1, 1, 1, 6, 1])),
        }
    }
}

/// A well-formed IPv4 packet: TCP with random flags, UDP or ICMP echo, sometimes DF, with TTL
/// 64, 2, 1 or 0; to a service it often aims at its port.
#[derive(Debug, Clone)]
struct PodPacket {
    src: Addr,
    dst: Addr,
    proto: u8,
    sport: u16,
    dport: Option<u16>,
    flags: u8,
    ttl: u8,
    len: usize,
    df: bool,
}

fn pod_packet(side: Side) -> impl Strategy<Value = PodPacket> {
    let (src, dst) = side.addrs();
    (
        (src, dst, 0u8..3),
        (
            any::<u16>(),
            prop_oneof![Just(None), (1u16..100).prop_map(Some)],
            any::<u8>(),
        ),
        prop_oneof![4 => Just(64u8), 1 => Just(2u8), 1 => Just(1u8), 1 => Just(0u8)],
        prop_oneof![4 => 0usize..64, 1 => 0usize..1500],
        any::<bool>(),
    )
        .prop_map(
            |((src, dst, proto), (sport, dport, flags), ttl, len, df)| PodPacket {
                src,
                dst,
                proto,
                sport,
                dport,
                flags,
                ttl,
                len,
                df,
            },
        )
}

impl PodPacket {
    fn bytes(&self, w: &World) -> Vec<u8> {
        let (src, dst) = (self.src.resolve(w), self.dst.resolve(w));
        // To a ClusterIP, its port and protocol unless told otherwise.
        let svc = w.service_list().into_iter().find(|s| s.0 == dst);
        let dport = match (self.dport, &svc) {
            (Some(p), _) => p,
            (None, Some(s)) => s.1,
            (None, None) => 80,
        };
        let proto = match (&svc, self.flags & 0x80 != 0) {
            (Some(s), false) => u8::from(s.2),
            _ => self.proto,
        };
        let payload = vec![0x5a; self.len];
        let b = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), self.ttl);
        let mut out = Vec::new();
        let f = self.flags;
        let _ = match proto {
            0 => {
                let mut t = b.tcp(self.sport, dport, u32::from(self.sport) << 8, 64_000);
                if f & 1 != 0 || f & 0x0f == 0 {
                    t = t.syn();
                }
                if f & 2 != 0 {
                    t = t.ack(u32::from(f));
                }
                if f & 4 != 0 {
                    t = t.fin();
                }
                if f & 8 != 0 {
                    t = t.rst();
                }
                t.write(&mut out, &payload)
            }
            1 => b.udp(self.sport, dport).write(&mut out, &payload),
            _ => b
                .icmpv4_echo_request(self.sport, dport)
                .write(&mut out, &payload),
        };
        if self.df {
            out[6] |= 0x40;
            fill_ip_checksum(&mut out);
        }
        out
    }
}

/// Some bytes changed (often none), and maybe cut short.
#[derive(Debug, Clone)]
struct Mutation {
    flips: Vec<(prop::sample::Index, u8)>,
    cut: Option<prop::sample::Index>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => Just(Mutation { flips: Vec::new(), cut: None }),
        1 => (
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            any::<Option<prop::sample::Index>>(),
        )
            .prop_map(|(flips, cut)| Mutation { flips, cut }),
    ]
}

impl Mutation {
    fn apply(&self, mut p: Vec<u8>) -> Vec<u8> {
        if !p.is_empty() {
            for (at, b) in &self.flips {
                let i = at.index(p.len());
                p[i] = *b;
            }
            if let Some(c) = self.cut {
                p.truncate(c.index(p.len() + 1));
            }
        }
        p
    }
}

/// An IPv4 packet (or not): built, a fixture seed, the reply to something the case sent
/// earlier, or arbitrary bytes.
#[derive(Debug, Clone)]
enum Inner {
    Built(PodPacket),
    /// A seed, maybe re-aimed: source into lease `n` (None: ours), destination into ours.
    Seed(prop::sample::Index, Option<Option<u8>>),
    /// The reply to an earlier output of this case (any earlier one, by index).
    /// (A built packet if nothing was sent yet.)
    Reply(prop::sample::Index, PodPacket),
    Bytes(Vec<u8>),
}

fn inner(side: Side) -> impl Strategy<Value = Inner> {
    prop_oneof![
        4 => pod_packet(side).prop_map(Inner::Built),
        3 => (any::<prop::sample::Index>(), any::<Option<Option<u8>>>())
            .prop_map(|(i, aim)| Inner::Seed(i, aim)),
        3 => (any::<prop::sample::Index>(), pod_packet(side)).prop_map(|(i, p)| Inner::Reply(i, p)),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Inner::Bytes),
    ]
}

/// How an inner packet reaches us over the underlay.
#[derive(Debug, Clone)]
enum Carrier {
    /// As the cluster's encapsulation carries it (VXLAN: header, our VtepMAC, the sender's).
    Proper,
    /// A VXLAN header and Ethernet frame with these flags, VNI, inner MACs (by lease) and
    /// ethertype (whatever the cluster's encapsulation).
    Vxlan(u8, u32, u8, u8, u16),
    /// The bare inner packet (flannel udp's form, whatever the cluster's).
    Bare,
}

fn carrier() -> impl Strategy<Value = Carrier> {
    prop_oneof![
        6 => Just(Carrier::Proper),
        1 => (
            prop_oneof![Just(0x08u8), any::<u8>()],
            prop_oneof![Just(VNI), 0u32..4, any::<u32>()],
            any::<u8>(),
            any::<u8>(),
            prop_oneof![Just(0x0800u16), any::<u16>()],
        )
            .prop_map(|(f, v, d, s, e)| Carrier::Vxlan(f, v, d, s, e)),
        1 => Just(Carrier::Bare),
    ]
}

/// Who sends an underlay datagram.
#[derive(Debug, Clone, Copy)]
enum Sender {
    /// The node whose lease holds the inner source (a stranger if none does).
    OfSource,
    /// Node `n % (leases + 2) + 1`: a node, or (past the leases) an address of no node.
    Node(u8),
    /// Anyone.
    Any(u32),
}

fn sender() -> impl Strategy<Value = Sender> {
    prop_oneof![
        5 => Just(Sender::OfSource),
        2 => any::<u8>().prop_map(Sender::Node),
        1 => any::<u32>().prop_map(Sender::Any),
    ]
}

/// One received packet.
#[derive(Debug, Clone)]
enum Input {
    /// From the TUN.
    Tun(Inner, Mutation),
    /// A datagram from the underlay.
    Underlay(Inner, Carrier, Sender, Mutation),
    /// A fixture datagram as captured (payload and sender), of the udp or VXLAN kind.
    Datagram(bool, prop::sample::Index, Mutation),
    /// An IPv4 packet to the node's address from the wire (AF_XDP), a NodePort connection or
    /// an answer to a masqueraded one: the inner packet, its destination made the node's.
    Wire(Inner, Mutation),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        4 => (inner(Side::Tun), mutation()).prop_map(|(i, m)| Input::Tun(i, m)),
        4 => (inner(Side::Underlay), carrier(), sender(), mutation())
            .prop_map(|(i, c, s, m)| Input::Underlay(i, c, s, m)),
        2 => (any::<bool>(), any::<prop::sample::Index>(), mutation())
            .prop_map(|(v, i, m)| Input::Datagram(v, i, m)),
        1 => (inner(Side::Wire), mutation()).prop_map(|(i, m)| Input::Wire(i, m)),
    ]
}

/// What a case sent out so far: (where, the inner packet), for replies.
type Sent = Vec<(Verdict, Vec<u8>)>;

/// The reply to `out`: addresses and ports swapped, TCP acknowledging it (SYN-ACK to a SYN),
/// an echo reply to an echo request, with a modest payload.
fn reply_to(out: &[u8]) -> Option<Vec<u8>> {
    let ip = parse_ip(out)?;
    let l4 = ip.l4;
    let b = etherparse::PacketBuilder::ipv4(ip.dst.octets(), ip.src.octets(), 64);
    let mut v = Vec::new();
    match ip.proto {
        6 if l4.len() >= 20 => {
            let (sp, dp) = (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            );
            let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
            let flags = l4[13];
            let hl = usize::from(l4[12] >> 4) * 4;
            let data = l4.len().saturating_sub(hl) as u32;
            let syn = flags & 0x02 != 0;
            let ack = seq
                .wrapping_add(data)
                .wrapping_add(u32::from(syn) + u32::from(flags & 0x01));
            let mut t = b.tcp(dp, sp, 0x1000_0000, 64_000).ack(ack);
            if syn && flags & 0x10 == 0 {
                t = t.syn();
            }
            t.write(&mut v, &[]).ok()?;
        }
        17 if l4.len() >= 8 => {
            let (sp, dp) = (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            );
            b.udp(dp, sp).write(&mut v, b"answer").ok()?;
        }
        1 if l4.len() >= 8 && l4[0] == 8 => {
            let (id, seq) = (
                u16::from_be_bytes([l4[4], l4[5]]),
                u16::from_be_bytes([l4[6], l4[7]]),
            );
            b.icmpv4_echo_reply(id, seq).write(&mut v, &l4[8..]).ok()?;
        }
        _ => return None,
    }
    Some(v)
}

impl Inner {
    fn bytes(&self, w: &World, sent: &Sent) -> Vec<u8> {
        match self {
            Inner::Built(p) => p.bytes(w),
            Inner::Seed(i, aim) => {
                let s = &seeds().tun;
                let mut p = s[i.index(s.len())].clone();
                if let (Some(src), true) = (aim, p.len() >= 20) {
                    p[13] = 244;
                    p[14] = src.map_or(w.ours, |n| n % w.leases + 1);
                    p[17] = 244;
                    p[18] = w.ours;
                    fill_ip_checksum(&mut p);
                }
                p
            }
            Inner::Reply(i, p) => {
                if sent.is_empty() {
                    return p.bytes(w);
                }
                reply_to(&sent[i.index(sent.len())].1).unwrap_or_else(|| p.bytes(w))
            }
            Inner::Bytes(b) => b.clone(),
        }
    }
}

/// The VXLAN header and inner Ethernet header in front of `inner`.
fn vxlan_wrap(
    flags: u8,
    vni: u32,
    dst: MacAddr,
    src: MacAddr,
    ethertype: u16,
    inner: &[u8],
) -> Vec<u8> {
    let mut v = vec![0u8; 8 + 14];
    match vxlan::Vni::new(vni) {
        Some(vni) if flags == vxlan::FLAG_I => vxlan::Repr { vni }.emit(&mut v[..8]),
        _ => {
            v[0] = flags;
            v[4..8].copy_from_slice(&(vni << 8).to_be_bytes());
        }
    }
    ethernet::Repr {
        dst,
        src,
        ethertype,
    }
    .emit(&mut ethernet::Packet::new_unchecked(&mut v[8..]));
    v.extend_from_slice(inner);
    v
}

/// A received packet ready for a batch: bytes, sender, whether it came from the wire.
struct Received {
    bytes: Vec<u8>,
    peer: SocketAddrV4,
    wire: bool,
}

impl Input {
    fn direction(&self) -> Direction {
        match self {
            Input::Tun(..) => Direction::FromTun,
            _ => Direction::FromUnderlay,
        }
    }

    fn received(&self, w: &World, sent: &Sent) -> Received {
        let none = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        match self {
            Input::Tun(i, m) => Received {
                bytes: m.apply(i.bytes(w, sent)),
                peer: none,
                wire: false,
            },
            Input::Wire(i, m) => {
                let mut p = i.bytes(w, sent);
                if p.len() >= 20 {
                    p[16..20].copy_from_slice(&node_ip(w.ours).octets());
                    fill_ip_checksum(&mut p);
                }
                Received {
                    bytes: m.apply(p),
                    peer: none,
                    wire: true,
                }
            }
            Input::Datagram(vx, i, m) => {
                let s = if *vx { &seeds().vxlan } else { &seeds().udp };
                let (p, from) = &s[i.index(s.len())];
                Received {
                    bytes: m.apply(p.clone()),
                    peer: *from,
                    wire: false,
                }
            }
            Input::Underlay(i, c, s, m) => {
                let p = i.bytes(w, sent);
                let src = parse_ip(&p).map(|ip| ip.src);
                let of_src = src.and_then(|a| w.lease_of(a));
                let ip = match *s {
                    Sender::OfSource => of_src.map_or(Ipv4Addr::new(192, 168, 100, 250), node_ip),
                    Sender::Node(n) => node_ip(n % (w.leases + 2) + 1),
                    Sender::Any(a) => Ipv4Addr::from(a),
                };
                let from_mac = vtep_mac(ip.octets()[3]);
                let bytes = match *c {
                    Carrier::Proper if w.vxlan => {
                        vxlan_wrap(0x08, VNI, vtep_mac(w.ours), from_mac, 0x0800, &p)
                    }
                    Carrier::Proper | Carrier::Bare => p,
                    Carrier::Vxlan(f, vni, d, s, e) => {
                        let d = if d & 1 == 0 { w.ours } else { d };
                        let s = if s & 1 == 0 { ip.octets()[3] } else { s };
                        vxlan_wrap(f, vni, vtep_mac(d), vtep_mac(s), e, &p)
                    }
                };
                Received {
                    bytes: m.apply(bytes),
                    peer: SocketAddrV4::new(ip, w.peer_port()),
                    wire: false,
                }
            }
        }
    }
}

// ---- the invariants ---------------------------------------------------------------------------

/// Where the packet inside an output starts: after the outer headers of a VXLAN one.
fn inner_at(t: &Tables, v: Verdict) -> usize {
    match (v, t.encap) {
        (Verdict::ToUnderlayIp(_), Encap::Vxlan { .. }) => 20 + 8 + 8 + 14,
        _ => 0,
    }
}

/// The inner packet of what the pipeline received: a VXLAN datagram's after its headers.
fn received_inner<'a>(t: &Tables, dir: Direction, r: &'a Received) -> &'a [u8] {
    match t.encap {
        Encap::Vxlan { .. } if dir == Direction::FromUnderlay && !r.wire => {
            r.bytes.get(22..).unwrap_or_default()
        }
        _ => &r.bytes,
    }
}

/// A VXLAN packet we built: the outer headers as the kernel writes them.
fn check_vxlan_outer(
    w: &World,
    t: &Tables,
    peer: Ipv4Addr,
    out: &[u8],
) -> Result<(), TestCaseError> {
    let ip = parse_ip(out).ok_or_else(|| TestCaseError::fail("outer IPv4 unreadable"))?;
    prop_assert_eq!(ip.trailing, 0, "outer length is not the packet's");
    prop_assert!(folds_to_ffff(ones(0, ip.hdr)), "outer IPv4 checksum");
    prop_assert_eq!((ip.src, ip.dst, ip.proto), (t.local.public_ip, peer, 17));
    let u = ip.l4;
    prop_assert!(u.len() >= 8 + 8 + 14 + 20, "outer UDP too short");
    prop_assert_eq!(
        usize::from(u16::from_be_bytes([u[4], u[5]])),
        u.len(),
        "UDP length"
    );
    prop_assert_eq!(u16::from_be_bytes([u[2], u[3]]), VXLAN_PORT);
    let sport = u16::from_be_bytes([u[0], u[1]]);
    prop_assert!((32768..=60999).contains(&sport), "source port {}", sport);
    if w.outer_udp_checksum || u[6..8] != [0, 0] {
        prop_assert!(
            u[6..8] != [0, 0] && folds_to_ffff(ones(pseudo(&ip), u)),
            "outer UDP checksum"
        );
    }
    prop_assert_eq!(
        &u[8..16],
        &[0x08, 0, 0, 0, 0, 0, VNI as u8, 0][..],
        "VXLAN header"
    );
    let peer_mac = vtep_mac(peer.octets()[3]).0;
    prop_assert_eq!(&u[16..22], &peer_mac[..], "inner dst MAC");
    prop_assert_eq!(&u[22..28], &vtep_mac(w.ours).0[..], "inner src MAC");
    prop_assert_eq!(&u[28..30], &[8, 0][..], "inner ethertype");
    Ok(())
}

fn check(
    w: &World,
    t: &Tables,
    dir: Direction,
    r: &Received,
    v: Verdict,
    out: &[u8],
) -> Result<(), TestCaseError> {
    prop_assert!(v != Verdict::Pending, "left undecided");
    let input = parse_ip(received_inner(t, dir, r));
    let node = t.local.public_ip;

    // A pod never sends as someone else. An outside host's packet to an external IP, which
    // the node forwards into the TUN, comes from outside the cluster network and the
    // services' addresses.
    if dir == Direction::FromTun {
        if let Some(ip) = &input {
            let outside_client = t.services.external_ips().contains(&ip.dst)
                && !t.map.network().contains(ip.src)
                && !t.services.is_frontend(ip.src);
            if !t.local.subnet.contains(ip.src)
                && ip.src != node
                && ip.src != t.local.tun_addr
                && !outside_client
            {
                prop_assert!(
                    matches!(v, Verdict::Drop(_)),
                    "spoofed source {} from the TUN not dropped: {:?}",
                    ip.src,
                    v
                );
            }
        }
    }
    if matches!(v, Verdict::Drop(_)) {
        return Ok(());
    }
    // What leaves is well-formed.
    if let Verdict::ToUnderlayIp(peer) = v {
        prop_assert!(w.vxlan, "a raw outer packet on a udp cluster");
        check_vxlan_outer(w, t, peer, out)?;
    }
    let at = inner_at(t, v);
    let o = parse_ip(&out[at..])
        .ok_or_else(|| TestCaseError::fail(format!("output unreadable as IPv4: {v:?}")))?;
    prop_assert_eq!(
        o.trailing,
        0,
        "IPv4 total length is not the output's length"
    );
    // The TUN side does not check header checksums (the kernel wrote them): one that was wrong
    // may stay wrong, a right one must stay right; the pipeline's own packets are always right.
    let hdr_was_ok = input
        .as_ref()
        .is_some_and(|ip| folds_to_ffff(ones(0, ip.hdr)));
    if hdr_was_ok || v == Verdict::IcmpToTun || dir == Direction::FromUnderlay {
        prop_assert!(
            folds_to_ffff(ones(0, o.hdr)),
            "IPv4 header checksum wrong: {:?}",
            v
        );
    }
    // flannel udp decrements the TTL on both ends and drops what would expire (VXLAN leaves it
    // to the kernel, as its device does, and so does the wire's way into the TUN: the kernel
    // forwards it to the pod, one hop, and drops it there).
    if !w.vxlan && matches!(v, Verdict::ToUnderlay(_) | Verdict::ToTun) && !r.wire {
        prop_assert!(out[at + 8] > 0, "sent with TTL 0: {:?}", v);
    }
    if v == Verdict::IcmpToTun {
        prop_assert!(
            o.proto == 1 && o.l4.len() >= 8 && o.l4[0] == 3,
            "not an unreachable"
        );
        prop_assert!(folds_to_ffff(ones(0, o.l4)), "ICMP error checksum wrong");
        // From the TUN's address, the node's, or a service address (ClusterIP, external IP)
        // without endpoints (kube-proxy's REJECT).
        prop_assert!(
            o.src == t.local.tun_addr || o.src == node || t.services.is_frontend(o.src),
            "ICMP error from {}",
            o.src
        );
    } else if let Some(ip) = &input {
        if l4_checksum_ok(ip) == Some(true) && ip.proto == o.proto {
            prop_assert_eq!(
                l4_checksum_ok(&o),
                Some(true),
                "L4 checksum right on the way in, wrong on the way out: {:?}",
                v
            );
        }
    }

    // Nothing goes where it does not belong.
    match v {
        Verdict::ToWire(to) => {
            prop_assert!(t.wire.is_some(), "to the wire without owning it");
            prop_assert_eq!(o.dst, to, "to the wire, not to its destination");
            prop_assert_eq!(o.src, node, "to the wire not as the node");
            prop_assert!(!t.map.network().contains(to), "{} is in the cluster", to);
            prop_assert!(
                to != node && to != t.local.tun_addr,
                "to the wire, to ourselves"
            );
        }
        Verdict::ToUnderlay(_) | Verdict::ToUnderlayIp(_) => {
            let to = match v {
                Verdict::ToUnderlay(a) => {
                    prop_assert!(!w.vxlan, "a bare datagram on a VXLAN cluster");
                    prop_assert_eq!(a.port(), t.peer_port, "not to the peers' port");
                    *a.ip()
                }
                Verdict::ToUnderlayIp(ip) => ip,
                _ => unreachable!(),
            };
            prop_assert!(to != node, "sent to ourselves");
            let owner = w.lease_of(o.dst);
            prop_assert_eq!(
                owner.map(node_ip),
                Some(to),
                "{} sent to the wrong node",
                o.dst
            );
            prop_assert_eq!(
                w.is_vxlan_lease(owner.unwrap()),
                w.vxlan,
                "sent to a lease of another backend"
            );
            // From the underlay back out: only the answer to a NodePort client (as the node),
            // or a NodePort connection from the wire to its backend on another node.
            if dir == Direction::FromUnderlay {
                prop_assert!(
                    w.track && w.owns_wire,
                    "underlay traffic relayed back out ({} to {})",
                    o.src,
                    o.dst
                );
                if r.wire {
                    let endpoint = w.service_list().iter().enumerate().any(|(k, s)| {
                        s.3.iter()
                            .chain(&terminating_endpoints(k))
                            .any(|e| *e.ip() == o.dst)
                    });
                    // Or the node's port unreachable back to a client that is a pod (a NodePort
                    // without endpoints).
                    let client = input.as_ref().map(|ip| ip.src);
                    let unreachable = o.proto == 1 && o.src == node && Some(o.dst) == client;
                    prop_assert!(
                        endpoint || unreachable,
                        "from the wire to {}, no endpoint",
                        o.dst
                    );
                } else {
                    prop_assert_eq!(o.src, node, "underlay traffic relayed back out");
                }
            }
        }
        Verdict::ToTun if dir == Direction::FromUnderlay && !r.wire => {
            prop_assert!(
                t.local.subnet.contains(o.dst) || t.services.in_cidr(o.dst) || t.wire.is_none(),
                "{} delivered from the underlay but not ours",
                o.dst
            );
        }
        _ => {}
    }
    // What the underlay delivers comes from its source's node, for our lease (checked last, so
    // that a relay is reported as one).
    if dir == Direction::FromUnderlay && !r.wire && !matches!(v, Verdict::Drop(_)) {
        let ip = input
            .as_ref()
            .ok_or_else(|| TestCaseError::fail(format!("unreadable inner packet taken: {v:?}")))?;
        let lease = w.lease_of(ip.src);
        prop_assert!(
            lease.is_some_and(|n| node_ip(n) == *r.peer.ip() && n != w.ours),
            "inner source {} from {} (not its node) taken: {:?}",
            ip.src,
            r.peer,
            v
        );
        // (Relayed instead, the relay check below says so.)
        let relayed = matches!(v, Verdict::ToUnderlay(_) | Verdict::ToUnderlayIp(_));
        prop_assert!(
            t.local.subnet.contains(ip.dst) || relayed,
            "inner destination {} not ours taken: {:?}",
            ip.dst,
            v
        );
    }
    Ok(())
}

/// Cases per target: `PODWIRE_FUZZ_CASES` when set (a long run), else the CI default.
fn cases(ci_default: u32) -> u32 {
    std::env::var("PODWIRE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_default)
}

/// Bytes for the parsers: arbitrary, or any seed (as captured or as received), maybe mutated.
fn packet() -> impl Strategy<Value = Vec<u8>> {
    let seed = (0usize..4, any::<prop::sample::Index>(), mutation()).prop_map(|(k, i, m)| {
        let s = seeds();
        let p = match k {
            0 => s.raw[i.index(s.raw.len())].clone(),
            1 => s.tun[i.index(s.tun.len())].clone(),
            2 => s.udp[i.index(s.udp.len())].0.clone(),
            _ => s.vxlan[i.index(s.vxlan.len())].0.clone(),
        };
        m.apply(p)
    });
    prop_oneof![prop::collection::vec(any::<u8>(), 0..1600), seed]
}

fn pcap_path(tag: &str) -> PathBuf {
    let id = format!("{:?}", std::thread::current().id());
    let id: String = id.chars().filter(char::is_ascii_digit).collect();
    std::env::temp_dir().join(format!(
        "podwire-fuzz-{}-{id}-{tag}.pcap",
        std::process::id()
    ))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1500), ..ProptestConfig::default() })]

    /// The pipeline, batch after batch from either side (connection state carried over), tracked
    /// or not, owning the wire or not, as `process_with` or as a worker runs it: every packet
    /// decided, and every decision within the invariants.
    #[test]
    fn pipeline_keeps_its_invariants(
        w in world(),
        batches in prop::collection::vec(prop::collection::vec(input(), 1..8), 1..6),
        worker in any::<bool>(),
        path_mtu in prop::option::of((any::<u8>(), 552u32..1500)),
        start in 0u64..1_000_000,
        steps in prop::collection::vec(0u64..5000, 6),
    ) {
        let (t, flows) = build(&w);
        let mut state = WorkerState::default();
        let mut now = start;
        if let Some((n, mtu)) = path_mtu {
            state.path_mtus.learn(node_ip(n % w.leases + 1), mtu, now);
        }
        let mut sent: Sent = Vec::new();
        for (k, inputs) in batches.iter().enumerate() {
            now += steps[k];
            // A batch holds one side's packets: the first input's.
            let dir = inputs[0].direction();
            let received: Vec<Received> = inputs
                .iter()
                .filter(|i| i.direction() == dir)
                .map(|i| i.received(&w, &sent))
                .collect();
            let mut b = Batch::new(received.len(), FRAME);
            for (i, r) in received.iter().enumerate() {
                let n = r.bytes.len().min(FRAME - HEADROOM);
                b.rx_slot(i)[..n].copy_from_slice(&r.bytes[..n]);
                b.commit_rx(i, r.bytes.len(), r.peer, n < r.bytes.len());
                b.slot_mut(i).1.wire = r.wire;
            }
            if worker {
                pipeline::process_in_worker(&t, flows.as_ref(), &mut state, now, dir, &mut b);
            } else {
                pipeline::process_with(&t, flows.as_ref(), now, dir, &mut b);
            }
            for (i, r) in received.iter().enumerate() {
                let m = *b.meta(i);
                prop_assert!(m.start + m.len <= FRAME, "packet {} outside its slot", i);
                let out = b.packet(i);
                check(&w, &t, dir, r, m.verdict, out)
                    .map_err(|e| {
                    let v = m.verdict;
                    TestCaseError::fail(format!("batch {k} ({dir:?}) packet {i}, {v:?}: {e}"))
                })?;
                if !matches!(m.verdict, Verdict::Drop(_)) {
                    sent.push((m.verdict, out[inner_at(&t, m.verdict)..].to_vec()));
                }
            }
            if std::env::var_os("FUZZ_STATS").is_some() {
                for i in 0..b.len() {
                    eprintln!("VERDICT {dir:?} {:?}", b.meta(i).verdict);
                }
            }
        }
    }

    /// Offline replay (the pipeline with pcap ports and a worker's counting): every record of a
    /// capture is written, skipped (not for our socket) or counted as a drop by reason.
    #[test]
    fn replay_accounts_for_every_record(
        w in world(),
        inputs in prop::collection::vec((input(), any::<bool>()), 1..12),
        side in 0u8..3,
    ) {
        let (t, flows) = build(&w);
        let input_path = pcap_path("in");
        let output_path = pcap_path("out");
        let header = pcap_file::pcap::PcapHeader {
            datalink: pcap_file::DataLink::RAW,
            ..Default::default()
        };
        let file = std::fs::File::create(&input_path).expect("temp pcap");
        let mut pw = pcap_file::pcap::PcapWriter::with_header(file, header).expect("pcap");
        let local = SocketAddrV4::new(t.local.public_ip, t.peer_port);
        let (mut to_us, mut tun_records) = (0u64, 0u64);
        for (i, (input, elsewhere)) in inputs.iter().enumerate() {
            let r = input.received(&w, &Vec::new());
            let record = if input.direction() == Direction::FromTun || r.wire {
                tun_records += 1;
                r.bytes
            } else {
                // Sometimes to another port: not for our socket.
                let dst = if *elsewhere { SocketAddrV4::new(*local.ip(), 9) } else { local };
                to_us += u64::from(!*elsewhere);
                let from = if r.peer.ip().is_unspecified() { SocketAddrV4::new(node_ip(2), 1) } else { r.peer };
                podwire_dataplane::port::pcap::outer_datagram(*from.ip(), from.port(), dst, &r.bytes)
            };
            let ts = std::time::Duration::from_millis(i as u64 * 10);
            pw.write_packet(&pcap_file::pcap::PcapPacket::new(ts, record.len() as u32, &record))
                .expect("pcap write");
        }
        drop(pw);
        let from = match side {
            0 => Some(Direction::FromTun),
            1 => Some(Direction::FromUnderlay),
            _ => None,
        };
        let report = podwire_dataplane::replay::replay_with(&t, flows.as_ref(), from, &input_path, &output_path);
        let _ = std::fs::remove_file(&input_path);
        let _ = std::fs::remove_file(&output_path);
        let report = report.map_err(|e| TestCaseError::fail(format!("replay: {e}")))?;
        let n = inputs.len() as u64;
        prop_assert_eq!(report.records, n);
        // Only the underlay side skips: what is not a datagram to our socket.
        let skipped = if from == Some(Direction::FromUnderlay) { n - to_us } else { 0 };
        prop_assert_eq!(report.skipped, skipped, "{} TUN-side records", tun_records);
        let drops: u64 = report.drops().iter().map(|&(_, c)| c).sum();
        let s = &report.stats;
        let tx = s.counter(Counter::TxTun) + s.counter(Counter::TxUnderlay) + s.counter(Counter::TxWire);
        prop_assert_eq!(tx, report.written, "written but not counted");
        prop_assert_eq!(
            report.skipped + report.written + drops,
            n,
            "records neither written, skipped nor dropped: {:?}",
            report.drops()
        );
        prop_assert_eq!(report.stats.drops(DropReason::TxError), 0);
    }

    /// Every wire parser and the offload code on arbitrary bytes: errors, never panics.
    #[test]
    fn wire_parsers_never_panic(p in packet(), k in 0usize..50) {
        if let Ok(e) = ethernet::Packet::new_checked(&p[..]) {
            let _ = ethernet::Repr::parse(&e);
        }
        if let Ok(ip) = ipv4::Packet::new_checked(&p[..]) {
            // What the checked constructor lets through, the independent reading agrees with.
            let mine = parse_ip(&p);
            prop_assert!(mine.is_some() || p[0] >> 4 != 4, "accepted a packet its headers contradict");
            if let Some(mine) = mine {
                prop_assert_eq!(ip.payload(), mine.l4);
                prop_assert_eq!((ip.src(), ip.dst()), (mine.src, mine.dst));
                prop_assert_eq!(ip.verify_checksum(), folds_to_ffff(ones(0, mine.hdr)));
            }
            let _ = (ip.frag_offset(), ipv4::Repr::parse(&ip));
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
            prop_assert!(p.len() >= 8);
            prop_assert_eq!(v.check_strict().is_ok(), p[0] == 0x08 && p[1..4] == [0, 0, 0] && p[7] == 0);
            prop_assert_eq!(v.payload(), &p[8..]);
        }
        if let Ok(h) = vnet::VnetHeader::parse(&p[..]) {
            let frame = &p[vnet::HEADER_LEN..];
            if let Ok(n) = segment::segment_count(&h, frame) {
                let mut out = vec![0u8; 70_000];
                for i in [0, k % n.max(1), n.saturating_sub(1), n] {
                    let _ = segment::segment(&h, frame, i, &mut out);
                }
            }
            let mut copy = frame.to_vec();
            let _ = segment::finish_checksum(&mut copy, usize::from(h.csum_start), usize::from(h.csum_offset));
        }
        let mut co = coalesce::TcpCoalescer::new();
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

// ---- L2 mode ------------------------------------------------------------------------------------

/// A station MAC of the L2 fuzz cases: a few unicast ones (so the bridge learns and finds
/// them), broadcast, an IEEE link-local group, all zeros.
fn l2_mac() -> impl Strategy<Value = [u8; 6]> {
    prop_oneof![
        4 => (1u8..6).prop_map(|i| [2, 0, 0, 0, 0, i]),
        1 => Just([0xff; 6]),
        1 => Just([0x01, 0x80, 0xc2, 0, 0, 0]),
        1 => Just([0; 6]),
    ]
}

/// An Ethernet frame between the L2 fuzz stations, or arbitrary bytes.
fn l2_frame() -> impl Strategy<Value = Vec<u8>> {
    let built = (
        l2_mac(),
        l2_mac(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(dst, src, payload)| {
            let mut f = dst.to_vec();
            f.extend(src);
            f.extend([0x08, 0x00]);
            f.extend(payload);
            f
        });
    prop_oneof![3 => built, 1 => packet()]
}

/// One L2 input: a frame from local port 0..3, or a VXLAN datagram from node 2, 3 (VTEPs) or
/// 4 (not one) whose header is right (kind 0), of another VNI (1), with a reserved bit set
/// (2), or missing (3: the frame is the datagram).
#[derive(Debug, Clone)]
struct L2Input {
    port: Option<u8>,
    header: u8,
    sender: u8,
    frame: Vec<u8>,
    oversized: bool,
}

fn l2_input() -> impl Strategy<Value = L2Input> {
    (
        prop::option::of(0u8..3),
        0u8..4,
        2u8..5,
        l2_frame(),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(port, header, sender, frame, oversized)| L2Input {
            port,
            header,
            sender,
            frame,
            oversized,
        })
}

impl L2Input {
    fn bytes(&self) -> Vec<u8> {
        if self.port.is_some() {
            return self.frame.clone();
        }
        let mut d = match self.header {
            0 => vec![0x08, 0, 0, 0, 0, 0, VNI as u8, 0],
            1 => vec![0x08, 0, 0, 0, 0, 0, VNI as u8 + 1, 0],
            2 => vec![0x08, 0, 0, 1, 0, 0, VNI as u8, 0],
            _ => Vec::new(),
        };
        d.extend(&self.frame);
        d
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1500), ..ProptestConfig::default() })]

    /// L2 mode's decisions (`process_bridged`), batch after batch with the FDB carried over:
    /// every frame decided; nothing tunnelled to a node that is not a VTEP, nor anything from
    /// the tunnel back into it; nothing from the underlay accepted from an unknown sender, with
    /// a VXLAN header the kernel would refuse or with another VNI; a frame out of a port only
    /// to an attached port, never back out of the one it came in by (no hairpin port here).
    #[test]
    fn bridged_pipeline_keeps_its_invariants(
        batches in prop::collection::vec((prop::option::of(0u8..3), prop::collection::vec(l2_input(), 1..8), 0u16..400), 1..6),
    ) {
        let mut b = Bridge::new(BridgeConfig { max_learned: 8, ageing_ms: 500, ..Default::default() }, 4);
        let ports: Vec<_> = (0..3).map(|_| b.add_port(PortOptions::default()).unwrap()).collect();
        let vteps = [node_ip(2), node_ip(3)];
        b.set_vteps(&vteps);
        let vni = vxlan::Vni::new(VNI);
        let mut batch = Batch::new(8, FRAME);
        let mut now = 0u64;
        for (port, inputs, dt) in &batches {
            now += u64::from(*dt);
            batch.clear();
            // One batch comes from one ingress: a port's, or the underlay's.
            let inputs: Vec<L2Input> = inputs.iter().cloned().map(|mut i| { i.port = *port; i }).collect();
            for (k, input) in inputs.iter().enumerate() {
                let bytes = input.bytes();
                let n = bytes.len().min(batch.max_packet());
                batch.rx_slot(k)[..n].copy_from_slice(&bytes[..n]);
                let sender = SocketAddrV4::new(node_ip(input.sender), VXLAN_PORT);
                batch.commit_rx(k, n, sender, input.oversized);
            }
            let from = match port {
                Some(p) => pipeline::BridgeIngress::Port(ports[usize::from(*p)]),
                None => pipeline::BridgeIngress::Underlay,
            };
            pipeline::process_bridged(&mut b, vni, from, &mut batch, now);
            for (k, input) in inputs.iter().enumerate() {
                let v = batch.meta(k).verdict;
                prop_assert!(v != Verdict::Pending, "frame {} undecided", k);
                match (from, v) {
                    (_, Verdict::Drop(_)) => {}
                    (pipeline::BridgeIngress::Port(p), Verdict::ToPort(out)) => {
                        prop_assert!(out != p && ports.contains(&out), "{:?} from {:?}", out, p);
                    }
                    (pipeline::BridgeIngress::Port(_), Verdict::ToPeer(ip)) => {
                        prop_assert!(vteps.contains(&ip), "tunnelled to {} (no VTEP)", ip);
                    }
                    (pipeline::BridgeIngress::Port(_), Verdict::Flood) => {}
                    (pipeline::BridgeIngress::Underlay, Verdict::ToPort(_) | Verdict::Flood) => {
                        prop_assert!(vteps.contains(&node_ip(input.sender)), "accepted from {}", node_ip(input.sender));
                        let d = input.bytes();
                        let ours = [0x08, 0, 0, 0, 0, 0, VNI as u8, 0];
                        prop_assert!(d.len() >= 8 && d[..8] == ours, "accepted VXLAN header {:02x?}", &d[..d.len().min(8)]);
                        prop_assert!(!input.oversized);
                        // Decapsulated: the frame starts after the VXLAN header.
                        prop_assert_eq!(batch.meta(k).start, HEADROOM + vxlan::HEADER_LEN);
                        prop_assert_eq!(batch.packet(k), &d[8..]);
                    }
                    (from, v) => prop_assert!(false, "{:?} from {:?}", v, from),
                }
                if input.oversized {
                    prop_assert_eq!(v, Verdict::Drop(DropReason::Oversized));
                }
            }
            b.age(now, 3);
        }
    }
}

/// The seeds are what the entry points receive: datagram payloads that the decoders read as
/// the fixtures' cases say, not records with outer headers.
#[test]
fn seeds_are_cut_as_received() {
    let s = seeds();
    // VXLAN payloads start with a VXLAN header most of them valid, then an Ethernet frame.
    let valid = s
        .vxlan
        .iter()
        .filter(|(p, _)| {
            p.len() >= 8
                && vxlan::Packet::new_checked(&p[..]).is_ok_and(|v| v.check_strict().is_ok())
        })
        .count();
    assert!(
        valid * 2 > s.vxlan.len(),
        "{valid} of {} VXLAN seeds valid",
        s.vxlan.len()
    );
    // flannel udp payloads and TUN packets are IPv4 (most of them).
    let v4 = |p: &[u8]| p.first().is_some_and(|b| b >> 4 == 4);
    assert!(s.udp.iter().filter(|(p, _)| v4(p)).count() * 2 > s.udp.len());
    assert!(s.tun.iter().filter(|p| v4(p)).count() * 2 > s.tun.len());
}
