//! The L2 bridge: a forwarding decision (learn the source, look up the destination) as the FDB
//! grows, learning a new station, and the pipeline's L2 decisions over a batch of 64 frames
//! (from a port; from the underlay, VXLAN checks and decap included), as the L2 worker runs
//! them. Run: `cargo bench -p podwire-benches --bench bridge`.
//!
//! Budget (docs/architecture.md): a known-unicast decision under 30 ns at 100k MACs.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use podwire_dataplane::batch::{Batch, HEADROOM};
use podwire_dataplane::bridge::{Bridge, Config, Decision, PortOptions, Station};
use podwire_dataplane::pipeline::{process_bridged, BridgeIngress};
use podwire_dataplane::verdict::Verdict;
use podwire_dataplane::wire::vxlan::Vni;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};

fn mac(i: u32) -> [u8; 6] {
    let b = i.to_be_bytes();
    [0x02, 0x42, b[0], b[1], b[2], b[3]]
}

fn frame(dst: [u8; 6], src: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

/// A bridge with `n` stations learned, spread over 8 ports.
fn filled(n: u32) -> (Bridge, Vec<podwire_dataplane::bridge::PortId>) {
    let mut b = Bridge::new(
        Config {
            max_learned: n as usize + 1024,
            ..Config::default()
        },
        0,
    );
    let ports: Vec<_> = (0..8)
        .map(|_| b.add_port(PortOptions::default()).unwrap())
        .collect();
    for i in 0..n {
        let p = ports[i as usize % ports.len()];
        b.input(Station::Port(p), &frame([0xff; 6], mac(i)), 0);
    }
    (b, ports)
}

fn known_unicast(c: &mut Criterion) {
    let mut g = c.benchmark_group("fdb_forward_known_unicast");
    for n in [1_000u32, 100_000] {
        let (mut b, ports) = filled(n);
        // 1024 conversations between stations spread over the table.
        let frames: Vec<(Station, [u8; 60])> = (0..1024u32)
            .map(|k| {
                let (s, d) = ((k * 7919) % n, (k * 104_729 + 1) % n);
                (
                    Station::Port(ports[s as usize % ports.len()]),
                    frame(mac(d), mac(s)),
                )
            })
            .collect();
        g.throughput(Throughput::Elements(frames.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| {
                for (from, f) in &frames {
                    let d = b.input(*from, f, 1);
                    debug_assert!(!matches!(d, Decision::Drop(_)));
                    black_box(d);
                }
            })
        });
    }
    g.finish();
}

fn learn_new(c: &mut Criterion) {
    let mut g = c.benchmark_group("fdb_learn_new_station");
    for n in [1_000u32, 100_000] {
        let (mut b, ports) = filled(n);
        // Stations the table has not seen, learned and then aged out again each iteration, so
        // the table stays at `n`.
        let frames: Vec<[u8; 60]> = (0..1024u32).map(|k| frame([0xff; 6], mac(n + k))).collect();
        let mut now = 1u64;
        g.throughput(Throughput::Elements(frames.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| {
                for f in &frames {
                    black_box(b.input(Station::Port(ports[0]), f, now));
                }
                for f in &frames {
                    let m = podwire_dataplane::wire::MacAddr(f[6..12].try_into().unwrap());
                    b.add_static(m, Station::Port(ports[1])).unwrap();
                    b.remove_static(m);
                }
                now += 1;
            })
        });
    }
    g.finish();
}

/// 64 packets of `pkt` from `peer`, as a port would receive them.
fn refill(b: &mut Batch, pkt: &[u8], peer: SocketAddrV4) {
    b.clear();
    for i in 0..64 {
        b.rx_slot(i)[..pkt.len()].copy_from_slice(pkt);
        b.commit_rx(i, pkt.len(), peer, false);
    }
}

fn bridged_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("bridged_64_frames");
    g.throughput(Throughput::Elements(64));
    let (mut b, ports) = filled(1_000);
    let vtep = Ipv4Addr::new(192, 168, 100, 2);
    b.set_vteps(&[vtep]);
    let vni = Vni::new(1);
    let known = frame(mac(1), mac(0));
    let mut batch = Batch::new(64, 2048 + HEADROOM);
    let none = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let from_port = BridgeIngress::Port(ports[0]);
    g.bench_function("from_port_known_unicast", |bench| {
        bench.iter(|| {
            refill(&mut batch, &known, none);
            process_bridged(&mut b, vni, from_port, &mut batch, 1);
            debug_assert!(matches!(batch.meta(0).verdict, Verdict::ToPort(_)));
            black_box(batch.meta(63).verdict);
        })
    });
    let mut datagram = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    datagram.extend_from_slice(&frame(mac(1), mac(5_000)));
    let peer = SocketAddrV4::new(vtep, 8472);
    g.bench_function("from_underlay_decap", |bench| {
        bench.iter(|| {
            refill(&mut batch, &datagram, peer);
            process_bridged(&mut b, vni, BridgeIngress::Underlay, &mut batch, 1);
            debug_assert!(matches!(batch.meta(0).verdict, Verdict::ToPort(_)));
            black_box(batch.meta(63).verdict);
        })
    });
    g.bench_function("refill_only_baseline", |bench| {
        bench.iter(|| refill(&mut batch, &datagram, peer))
    });
    g.finish();
}

criterion_group!(benches, known_unicast, learn_new, bridged_batch);
criterion_main!(benches);
