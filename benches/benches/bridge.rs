//! The L2 bridge: a forwarding decision (learn the source, look up the destination) as the FDB
//! grows, and learning a new station. Run: `cargo bench -p podwire-benches --bench bridge`.
//!
//! Budget (docs/architecture.md): a known-unicast decision under 30 ns at 100k MACs.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use podwire_dataplane::bridge::{Bridge, Config, Decision, PortOptions, Station};
use std::hint::black_box;

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

criterion_group!(benches, known_unicast, learn_new);
criterion_main!(benches);
