//! Connection tracking and service NAT: the cost of a conntrack hit as the table grows, and of
//! a packet to a service as the number of services grows (iptables walks a chain of rules per
//! service on a new connection; podwire does one hash lookup): the first packet of a new
//! connection (`conntrack_new_connection/services/N`) and a packet of an established one
//! (`conntrack_established/services/N`), at 10, 1k, 10k and 100k services, each into a table of
//! about 61k entries. Run: `cargo bench -p podwire-benches --bench conntrack`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use podwire_benches::tables;
use podwire_dataplane::batch::Batch;
use podwire_dataplane::conntrack::tcp::{flag, Segment};
use podwire_dataplane::conntrack::{Config, Conntrack, Tuple, L4, PROTO_TCP, PROTO_UDP, SHARDS};
use podwire_dataplane::nat::{ServiceOptions, ServiceSpec, Services};
use podwire_dataplane::pipeline::{self, Direction, Flows, Tables, Verdict};
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn flow(i: u32) -> Tuple {
    Tuple::new(
        Ipv4Addr::from_bits(0x0a00_0000 | (i >> 12)),
        1024 + (i & 0xfff) as u16,
        Ipv4Addr::new(10, 250, 0, 1),
        53,
        PROTO_UDP,
    )
}

fn conntrack_hit(c: &mut Criterion) {
    eprintln!(
        "conntrack: {} bytes per entry (entry + two index slots at 7/8 load; netfilter's nf_conn is ~300)",
        Conntrack::bytes_per_entry()
    );
    let mut g = c.benchmark_group("conntrack_hit");
    for n in [10_000u32, 1_000_000] {
        let ct = Conntrack::new(Config {
            max_entries: n as usize * 2,
            ..Config::default()
        });
        let ok = |_: &Tuple| Ok(Default::default());
        for i in 0..n {
            ct.track(&flow(i), &L4::Udp, 64, 0, ok).unwrap();
        }
        // 1024 live flows spread over the table, looked up in turn (original direction).
        let probes: Vec<Tuple> = (0..1024u32).map(|k| flow((k * 7919) % n)).collect();
        g.throughput(Throughput::Elements(probes.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &probes, |b, probes| {
            b.iter(|| {
                for t in probes {
                    black_box(ct.track(black_box(t), &L4::Udp, 64, 1, ok).unwrap());
                }
            })
        });
    }
    g.finish();
}

/// The DNAT benches' cluster: leases of /16 (ours is 10.1.0.0/16, so a pod source has 2^16
/// addresses and every new connection a tuple of its own); service `i` is `vip(i)`:80/TCP with
/// three endpoints on the nodes of leases 2, 3 and 4 (`endpoints(i)`).
const LEASES: u32 = 16;
/// Connections the DNAT benches keep in the table: a new connection's SYN_SENT entry lives
/// 120 s (`tcp_timeout_unacknowledged` caps nothing below it) and the simulated clock advances
/// `TICK_MS` per batch of `BATCH`, so 120 000 / 125 · 64 = 61 440 entries are unexpired at any
/// time, in a table of the default 131 072 (47 %).
const FILL: u64 = 61_440;
const BATCH: usize = 64;
const TICK_MS: u64 = 125;
const SYN_SENT_TIMEOUT_MS: u64 = 120_000;
/// Client source ports per source address, and source addresses (10.1.0.1 to 10.1.255.253).
const PORTS: u64 = 65_536 - 1024;
const HOSTS: u64 = 65_533;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from_bits(0x0a60_0001 + i)
}

fn endpoints(i: u32) -> Vec<SocketAddrV4> {
    (0..3u8)
        .map(|k| SocketAddrV4::new(Ipv4Addr::new(10, 2 + k, 0, 1 + (i % 250) as u8), 8080))
        .collect()
}

fn services(n: u32) -> Services {
    let specs = (0..n)
        .map(|i| ServiceSpec {
            name: format!("default/svc-{i}"),
            cluster_ip: vip(i),
            port: 80,
            proto: PROTO_TCP,
            endpoints: endpoints(i),
            affinity_timeout: None,
            node_port: None,
            ..Default::default()
        })
        .collect();
    Services::build(ServiceOptions::new("10.96.0.0/12".parse().unwrap()), specs).unwrap()
}

/// The client of connection number `c`: a (source address, port) of our lease that no other
/// connection number has. Panics rather than repeat a tuple.
fn client(c: u64) -> (Ipv4Addr, u16) {
    assert!(
        c < PORTS * HOSTS,
        "connection {c}: the client tuple space is exhausted, a tuple would repeat"
    );
    (
        Ipv4Addr::from_bits(0x0a01_0001 + (c / PORTS) as u32),
        1024 + (c % PORTS) as u16,
    )
}

/// The service connection `c` goes to: spread over all `n` (a hash of `c`), so the service map
/// is read all over, not one hot entry.
fn service_of(c: u64, n: u32) -> u32 {
    let mut h = c.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((h ^ (h >> 31)) % u64::from(n)) as u32
}

/// The node (underlay address) of lease `10.X.0.0/16`, where an endpoint lives.
fn node_of(backend: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from_bits(0xc0a8_0000 + u32::from(backend.octets()[1]))
}

/// A 40-byte TCP segment of flags `flags` from a pod of our lease to a ClusterIP, to be
/// re-addressed by `readdress`.
fn tcp_template(flags: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let b =
        etherparse::PacketBuilder::ipv4([10, 1, 0, 1], vip(0).octets(), 64).tcp(1024, 80, 1, 64240);
    let b = if flags & flag::SYN != 0 {
        b.syn()
    } else {
        b.ack(1001)
    };
    b.write(&mut out, &[]).unwrap();
    out
}

/// Writes `template` into slot `i` of `b` from `src`:`sport` to `dst`, with a valid IPv4 header
/// checksum. (The TCP checksum goes stale; nothing on this path verifies it.)
fn readdress(b: &mut Batch, i: usize, template: &[u8], src: Ipv4Addr, sport: u16, dst: Ipv4Addr) {
    let slot = b.rx_slot(i);
    let p = &mut slot[..template.len()];
    p.copy_from_slice(template);
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[10..12].fill(0);
    let sum = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    b.commit_rx(
        i,
        template.len(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        false,
    );
}

/// The checks on packet `i` of a batch that must have been DNATed to `want` (or, with `None`,
/// to any endpoint of service `svc`): it goes to the endpoint's node, and the inner packet's
/// destination is the endpoint. Returns the endpoint. Panics on anything else (a `Drop`, a
/// reject, another destination).
fn check_dnat(b: &Batch, i: usize, svc: u32, want: Option<SocketAddrV4>) -> SocketAddrV4 {
    let v = b.meta(i).verdict;
    let Verdict::ToUnderlayIp(node) = v else {
        panic!("packet {i} to service {svc}: verdict {v:?}, not a DNAT to an endpoint's node");
    };
    let inner = &b.packet(i)[pipeline::VXLAN_OVERHEAD..];
    let to = SocketAddrV4::new(
        Ipv4Addr::from([inner[16], inner[17], inner[18], inner[19]]),
        u16::from_be_bytes([inner[22], inner[23]]),
    );
    match want {
        Some(w) => assert_eq!(
            to, w,
            "packet {i}: DNATed elsewhere than its connection's endpoint"
        ),
        None => assert!(
            endpoints(svc).contains(&to),
            "packet {i}: DNATed to {to}, not an endpoint of service {svc}"
        ),
    }
    assert_eq!(
        node,
        node_of(*to.ip()),
        "packet {i}: sent to the wrong node"
    );
    to
}

/// A table held at a steady fill of new (SYN_SENT) service connections, and the next ones.
struct NewConnections {
    t: Tables,
    n: u32,
    flows: Flows,
    b: Batch,
    syn: Vec<u8>,
    /// Connections made so far; connection `c` has the tuple of `client(c)`.
    next: u64,
    now: u64,
}

impl NewConnections {
    fn new(services: Arc<Services>) -> NewConnections {
        let mut t = tables(LEASES, 16, true);
        let n = services.len() as u32;
        t.services = services;
        let mut s = NewConnections {
            t,
            n,
            flows: Flows::new(Config::default()),
            b: Batch::new(BATCH, 2048),
            syn: tcp_template(flag::SYN),
            next: 0,
            now: 0,
        };
        // Up to the steady fill: entries now expire as fast as new ones come.
        while s.now < SYN_SENT_TIMEOUT_MS + 10 * TICK_MS {
            s.batch(BATCH);
        }
        let c = s.flows.conntrack.counters();
        eprintln!(
            "conntrack_new_connection, {n} services: {} entries at steady fill ({} inserted, {} expired)",
            c.entries, c.inserted, c.expired
        );
        s
    }

    /// `k` new connections (SYNs) in one batch, each to a service by `service_of`; returns
    /// the time `process_with` took. Checked outside that time: every packet was DNATed to an
    /// endpoint of its service, and created an entry (the table has one more entry per packet,
    /// which a lookup of the packet's tuple finds, bound to that endpoint). Then the workers'
    /// incremental collector, also untimed, reaps what expired (64 × 32 slots per batch).
    fn batch(&mut self, k: usize) -> Duration {
        let ct = &self.flows.conntrack;
        let before = ct.counters();
        self.b.clear();
        for i in 0..k {
            let c = self.next + i as u64;
            let (src, sport) = client(c);
            readdress(
                &mut self.b,
                i,
                &self.syn,
                src,
                sport,
                vip(service_of(c, self.n)),
            );
        }
        let start = Instant::now();
        pipeline::process_with(
            &self.t,
            Some(&self.flows),
            self.now,
            Direction::FromTun,
            &mut self.b,
        );
        let took = start.elapsed();
        for i in 0..k {
            let c = self.next + i as u64;
            let svc = service_of(c, self.n);
            let to = check_dnat(&self.b, i, svc, None);
            let (src, sport) = client(c);
            let orig = Tuple::new(src, sport, vip(svc), 80, PROTO_TCP);
            let (_, reply) = ct
                .find(&orig, self.now)
                .unwrap_or_else(|| panic!("connection {c}: no entry after its first packet"));
            assert_eq!(
                SocketAddrV4::new(reply.src, reply.sport),
                to,
                "connection {c}: entry"
            );
        }
        let after = ct.counters();
        assert_eq!(
            after.inserted - before.inserted,
            k as u64,
            "{k} first packets created {} entries",
            after.inserted - before.inserted
        );
        assert_eq!(
            (after.early_drops, after.table_full),
            (0, 0),
            "the table is full: early drops or refusals"
        );
        self.next += k as u64;
        self.now += TICK_MS * k as u64 / BATCH as u64;
        for _ in 0..SHARDS {
            ct.gc_step(self.now, 32);
        }
        if self.now > SYN_SENT_TIMEOUT_MS {
            let live = ct.counters().entries;
            assert!(
                (FILL - 2 * BATCH as u64..FILL + 4096).contains(&live),
                "{live} entries: not the steady fill of {FILL}"
            );
        }
        took
    }
}

/// A table of `FILL` established (assured) service connections, and packets of them.
struct Established {
    t: Tables,
    n: u32,
    flows: Flows,
    b: Batch,
    ack: Vec<u8>,
    /// The endpoint connection `c` (< FILL) was bound to.
    backend: Vec<SocketAddrV4>,
    next: u64,
}

impl Established {
    fn new(services: Arc<Services>) -> Established {
        let mut t = tables(LEASES, 16, true);
        let n = services.len() as u32;
        t.services = services;
        let flows = Flows::new(Config::default());
        let mut b = Batch::new(BATCH, 2048);
        let syn = tcp_template(flag::SYN);
        let mut backend = Vec::with_capacity(FILL as usize);
        let seg = |flags, seq, ack| {
            L4::Tcp(Segment {
                flags,
                seq,
                ack,
                window: 64240,
                len: 0,
                wscale: None,
            })
        };
        let ok = |_: &Tuple| Ok(Default::default());
        for first in (0..FILL).step_by(BATCH) {
            b.clear();
            for i in 0..BATCH {
                let c = first + i as u64;
                let (src, sport) = client(c);
                readdress(&mut b, i, &syn, src, sport, vip(service_of(c, n)));
            }
            pipeline::process_with(&t, Some(&flows), 1, Direction::FromTun, &mut b);
            for i in 0..BATCH {
                let c = first + i as u64;
                let to = check_dnat(&b, i, service_of(c, n), None);
                let (src, sport) = client(c);
                let orig = Tuple::new(src, sport, vip(service_of(c, n)), 80, PROTO_TCP);
                let reply = Tuple::new(*to.ip(), to.port(), src, sport, PROTO_TCP);
                // The endpoint's SYN-ACK, then the client's ACK.
                let ct = &flows.conntrack;
                ct.track(&reply, &seg(flag::SYN | flag::ACK, 1000, 2), 40, 2, ok)
                    .unwrap();
                let r = ct
                    .track(&orig, &seg(flag::ACK, 2, 1001), 40, 3, ok)
                    .unwrap();
                assert!(r.assured && !r.new, "connection {c} established");
                backend.push(to);
            }
        }
        let c = flows.conntrack.counters();
        assert_eq!(c.entries, FILL);
        eprintln!(
            "conntrack_established, {n} services: {} established entries",
            c.entries
        );
        Established {
            t,
            n,
            flows,
            b,
            ack: tcp_template(flag::ACK),
            backend,
            next: 0,
        }
    }

    /// `k` ACK segments, each of another established connection (a stride through all
    /// `FILL`, so no two in a batch are one flow's run); returns the time `process_with` took.
    /// Checked outside it: each was DNATed to its connection's endpoint and no entry was
    /// created.
    fn batch(&mut self, k: usize) -> Duration {
        let ct = &self.flows.conntrack;
        let before = ct.counters();
        let conn = |j: u64| (j * 7919) % FILL;
        self.b.clear();
        for i in 0..k {
            let c = conn(self.next + i as u64);
            let (src, sport) = client(c);
            readdress(
                &mut self.b,
                i,
                &self.ack,
                src,
                sport,
                vip(service_of(c, self.n)),
            );
        }
        let start = Instant::now();
        pipeline::process_with(
            &self.t,
            Some(&self.flows),
            4,
            Direction::FromTun,
            &mut self.b,
        );
        let took = start.elapsed();
        for i in 0..k {
            let c = conn(self.next + i as u64);
            check_dnat(
                &self.b,
                i,
                service_of(c, self.n),
                Some(self.backend[c as usize]),
            );
        }
        let after = ct.counters();
        assert_eq!(
            (after.inserted, after.entries),
            (before.inserted, FILL),
            "packets of established connections created or lost entries"
        );
        self.next += k as u64;
        took
    }
}

/// Runs `iters` packets through `batch` in batches of `BATCH`; the time is `process_with`'s
/// alone, per packet once criterion divides by `iters`.
fn timed(iters: u64, mut batch: impl FnMut(usize) -> Duration) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let k = left.min(BATCH as u64);
        total += batch(k as usize);
        left -= k;
    }
    total
}

const SERVICE_COUNTS: [u32; 4] = [10, 1_000, 10_000, 100_000];

/// The first packet of a new connection to a service (a SYN to a ClusterIP), through the whole
/// pipeline from the TUN: conntrack miss, service lookup, Maglev, a new entry, DNAT, VXLAN
/// encap to the endpoint's node. Per packet, in batches of 64, at 10 to 100k services.
fn dnat_new_connection(c: &mut Criterion) {
    let mut g = c.benchmark_group("conntrack_new_connection");
    g.throughput(Throughput::Elements(1));
    for n in SERVICE_COUNTS {
        // Set up on the first call only, so that a filtered-out bench costs nothing.
        let mut state = None;
        g.bench_function(BenchmarkId::new("services", n), |bench| {
            let s = state.get_or_insert_with(|| NewConnections::new(Arc::new(services(n))));
            bench.iter_custom(|iters| timed(iters, |k| s.batch(k)))
        });
    }
    g.finish();
}

/// A packet (an ACK) of an established connection to a service, through the same path:
/// conntrack hit, DNAT, encap. Per packet, in batches of 64 packets of 64 connections.
fn dnat_established(c: &mut Criterion) {
    let mut g = c.benchmark_group("conntrack_established");
    g.throughput(Throughput::Elements(1));
    for n in SERVICE_COUNTS {
        // Set up on the first call only, so that a filtered-out bench costs nothing.
        let mut state = None;
        g.bench_function(BenchmarkId::new("services", n), |bench| {
            let s = state.get_or_insert_with(|| Established::new(Arc::new(services(n))));
            bench.iter_custom(|iters| timed(iters, |k| s.batch(k)))
        });
    }
    g.finish();
}

/// 64 pod-to-pod packets of one established flow through VXLAN encap, untracked and tracked:
/// UDP (a conntrack hit each) and TCP ACK segments (one hit, the run credited).
fn tracking_cost(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracked_64_packets");
    g.throughput(Throughput::Elements(64));
    let t = tables(10_000, 24, true);
    let none = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let udp = podwire_benches::udp_packet([10, 0, 1, 2], [10, 0, 200, 2], 1400);
    let mut tcp = Vec::new();
    etherparse::PacketBuilder::ipv4([10, 0, 1, 2], [10, 0, 200, 2], 64)
        .tcp(40000, 5201, 1000, 64000)
        .ack(1)
        .write(&mut tcp, &[0u8; 1400])
        .unwrap();
    for (name, pkt) in [("udp", &udp), ("tcp_acks", &tcp)] {
        let flows = Flows::new(Config::default());
        // Establish: one packet each way (a TCP ACK is picked up mid-stream, then answered).
        let fill = |b: &mut Batch, p: &[u8]| {
            for i in 0..b.capacity() {
                b.rx_slot(i)[..p.len()].copy_from_slice(p);
                b.commit_rx(i, p.len(), none, false);
            }
        };
        let mut b = Batch::new(64, 2048);
        // Establish (assured): the first packet, then an answer straight into the table.
        fill(&mut b, pkt);
        pipeline::process_with(&t, Some(&flows), 1, Direction::FromTun, &mut b);
        let fwd = Tuple::new(
            Ipv4Addr::new(10, 0, 1, 2),
            u16::from_be_bytes([pkt[20], pkt[21]]),
            Ipv4Addr::new(10, 0, 200, 2),
            u16::from_be_bytes([pkt[22], pkt[23]]),
            pkt[9],
        );
        let answer = match fwd.proto {
            PROTO_TCP => L4::Tcp(podwire_dataplane::conntrack::tcp::Segment {
                flags: podwire_dataplane::conntrack::tcp::flag::ACK,
                seq: 1,
                ack: 1000,
                window: 64000,
                len: 0,
                wscale: None,
            }),
            _ => L4::Udp,
        };
        let ok = |_: &Tuple| Ok(Default::default());
        flows
            .conntrack
            .track(&fwd.invert().unwrap(), &answer, 40, 3000, ok)
            .unwrap();
        fill(&mut b, pkt);
        pipeline::process_with(&t, Some(&flows), 3000, Direction::FromTun, &mut b);
        assert!(
            flows.conntrack.entries(3000)[0].assured,
            "{name}: established"
        );
        for tracked in [false, true] {
            g.bench_function(
                format!("{name}_{}", if tracked { "tracked" } else { "untracked" }),
                |bench| {
                    bench.iter(|| {
                        fill(&mut b, pkt);
                        let f = tracked.then_some(&flows);
                        pipeline::process_with(&t, f, 3000, Direction::FromTun, &mut b);
                    })
                },
            );
        }
        assert!(flows.conntrack.counters().entries >= 1);
    }
    g.finish();
}

criterion_group!(
    benches,
    conntrack_hit,
    dnat_new_connection,
    dnat_established,
    tracking_cost
);
criterion_main!(benches);
