//! Connection tracking and service NAT: the cost of a conntrack hit as the table grows, and of
//! a new connection to a service as the number of services grows (iptables pays O(services)
//! there; podwire one hash lookup). Run: `cargo bench -p podwire-benches --bench conntrack`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use podwire_benches::tables;
use podwire_dataplane::batch::Batch;
use podwire_dataplane::conntrack::{Config, Conntrack, Tuple, L4, PROTO_TCP, PROTO_UDP};
use podwire_dataplane::nat::{ServiceOptions, ServiceSpec, Services};
use podwire_dataplane::pipeline::{self, Direction, Flows, Verdict};
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

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

fn services(n: u32) -> Services {
    let specs = (0..n)
        .map(|i| ServiceSpec {
            name: format!("default/svc-{i}"),
            cluster_ip: Ipv4Addr::from_bits(0x0a60_0000 + 1 + i),
            port: 80,
            proto: PROTO_TCP,
            endpoints: (0..3)
                .map(|k| {
                    SocketAddrV4::new(Ipv4Addr::new(10, 0, 2 + k as u8, 1 + (i % 250) as u8), 8080)
                })
                .collect(),
            affinity_timeout: None,
            node_port: None,
        })
        .collect();
    Services::build(ServiceOptions::new("10.96.0.0/12".parse().unwrap()), specs).unwrap()
}

/// A TCP SYN from a pod of node 10.0.1.0/24 to `vip`:80.
fn syn(sport: u16, vip: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4([10, 0, 1, 2], vip.octets(), 64)
        .tcp(sport, 80, 1, 64240)
        .syn()
        .write(&mut out, &[])
        .unwrap();
    out
}

fn dnat_new_connection(c: &mut Criterion) {
    let mut g = c.benchmark_group("dnat_new_connection");
    for n in [10u32, 10_000, 100_000] {
        let mut t = tables(10_000, 24, true);
        t.services = Arc::new(services(n));
        let flows = Flows::new(Config {
            max_entries: 1 << 20,
            ..Config::default()
        });
        // The last service: a linear rule list would scan them all.
        let vip = Ipv4Addr::from_bits(0x0a60_0000 + n);
        let mut b = Batch::new(1, 2048);
        let mut sport = 0u16;
        let none = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        let mut now = 0u64;
        let template = syn(1024, vip);
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::from_parameter(n), |bench| {
            bench.iter(|| {
                // A new source port every time: every packet is a new connection (the table
                // fills, and early drop of unassured SYN_SENT entries keeps room).
                sport = sport.wrapping_add(1).max(1024);
                now += 1;
                // (The TCP checksum goes stale; nothing on this path verifies it.)
                let slot = b.rx_slot(0);
                slot[..template.len()].copy_from_slice(&template);
                slot[20..22].copy_from_slice(&sport.to_be_bytes());
                b.commit_rx(0, template.len(), none, false);
                pipeline::process_with(&t, Some(&flows), now, Direction::FromTun, &mut b);
                assert!(matches!(
                    b.meta(0).verdict,
                    Verdict::ToUnderlayIp(_) | Verdict::Drop(_)
                ));
            })
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

criterion_group!(benches, conntrack_hit, dnat_new_connection, tracking_cost);
criterion_main!(benches);
