//! Per-packet cost of each stage. Run: `cargo bench -p podwire-benches`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use podwire_benches::{tables, udp_packet};
use podwire_dataplane::batch::Batch;
use podwire_dataplane::pipeline::{self, Direction};
use podwire_dataplane::wire::checksum;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};

fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for leases in [10_000u32, 1_000_000] {
        // /28 leases: a /8 holds 2^20 of them.
        let t = tables(leases, 28, false);
        let dsts: Vec<Ipv4Addr> = (0..1024u32)
            .map(|i| Ipv4Addr::from_bits(0x0a00_0000 | ((i * 7919) % leases + 1) << 4 | 5))
            .collect();
        g.throughput(Throughput::Elements(dsts.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(leases), &dsts, |b, dsts| {
            b.iter(|| {
                for d in dsts {
                    black_box(t.map.lookup(black_box(*d)));
                }
            })
        });
    }
    g.finish();
}

fn batch_of(pkt: &[u8], n: usize, peer: SocketAddrV4) -> Batch {
    let mut b = Batch::new(n, 2048);
    for i in 0..n {
        b.rx_slot(i)[..pkt.len()].copy_from_slice(pkt);
        b.commit_rx(i, pkt.len(), peer, false);
    }
    b
}

fn refill(b: &mut Batch, pkt: &[u8], peer: SocketAddrV4) {
    for i in 0..b.len() {
        b.rx_slot(i)[..pkt.len()].copy_from_slice(pkt);
        b.commit_rx(i, pkt.len(), peer, false);
    }
}

fn pipeline_decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline_64_packets");
    g.throughput(Throughput::Elements(64));
    let none = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let peer = SocketAddrV4::new(Ipv4Addr::from_bits(0xc0a8_0000 + 200), 8285);
    let out = udp_packet([10, 0, 1, 2], [10, 0, 200, 2], 64);
    let inp = udp_packet([10, 0, 200, 2], [10, 0, 1, 2], 64);
    for (name, vxlan) in [("udp", false), ("vxlan", true)] {
        let t = tables(10_000, 24, vxlan);
        let mut b = batch_of(&out, 64, none);
        pipeline::process(&t, Direction::FromTun, &mut b);
        let v = b.meta(0).verdict;
        assert!(
            matches!(
                v,
                pipeline::Verdict::ToUnderlay(_) | pipeline::Verdict::ToUnderlayIp(_)
            ),
            "{name}: the encap bench must measure forwarding, got {v:?}"
        );
        g.bench_function(format!("{name}_encap_from_tun"), |bench| {
            bench.iter(|| {
                refill(&mut b, &out, none);
                pipeline::process(&t, Direction::FromTun, &mut b);
            })
        });
        // The decap input is what the encap side produced, so both encapsulations are measured
        // on their own wire format.
        let wire = {
            let mut one = batch_of(&inp, 1, none);
            let mut flipped = tables(10_000, 24, vxlan);
            flipped.local.subnet = "10.0.200.0/24".parse().expect("lease");
            flipped.local.public_ip = Ipv4Addr::from_bits(0xc0a8_0000 + 200);
            if let podwire_dataplane::pipeline::Encap::Vxlan { vni, .. } = flipped.encap {
                let mac = podwire_dataplane::wire::MacAddr([0x0e, 0x70, 0, 0, 0, 200]);
                flipped.encap = podwire_dataplane::pipeline::Encap::Vxlan {
                    vni,
                    local_mac: mac,
                };
            }
            pipeline::process(&flipped, Direction::FromTun, &mut one);
            // The UDP socket strips the outer IPv4/UDP headers VXLAN wrote.
            let skip = if vxlan { 28 } else { 0 };
            one.packet(0)[skip..].to_vec()
        };
        let mut b = batch_of(&wire, 64, peer);
        pipeline::process(&t, Direction::FromUnderlay, &mut b);
        assert_eq!(
            b.meta(0).verdict,
            pipeline::Verdict::ToTun,
            "{name}: the decap bench must measure forwarding"
        );
        g.bench_function(format!("{name}_decap_from_underlay"), |bench| {
            bench.iter(|| {
                refill(&mut b, &wire, peer);
                pipeline::process(&t, Direction::FromUnderlay, &mut b);
            })
        });
        let mut b = batch_of(&wire, 64, peer);
        g.bench_function(format!("{name}_refill_only_baseline"), |bench| {
            bench.iter(|| refill(&mut b, &wire, peer))
        });
    }
    g.finish();
}

fn checksums(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for len in [20usize, 1400] {
        let data = vec![0x5au8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("full", len), &data, |b, d| {
            b.iter(|| checksum::checksum(black_box(d)))
        });
    }
    g.bench_function("incremental_ttl", |b| {
        b.iter(|| checksum::update16(black_box(0x1234), black_box(0x4011), black_box(0x3f11)))
    });
    g.finish();
}

criterion_group!(benches, route_lookup, pipeline_decisions, checksums);
criterion_main!(benches);
