//! Shared inputs for podwire's criterion benchmarks (`cargo bench -p podwire-benches`).
//!
//! Budgets the benchmarks are read against (per packet, one core): route lookup < 20 ns at any
//! map size, encap or decap decision (parse + route + TTL patch) < 30 ns, IPv4 header checksum
//! < 10 ns, 1400-byte checksum < 100 ns.

use podwire_dataplane::pipeline::{LocalNode, Tables};
use podwire_dataplane::route::{Backend, Ipv4Net, Node, SubnetMap};
use std::net::Ipv4Addr;

/// Tables for a node in 10.0.0.0/8 with `leases` leases of `/subnet_len` (lease i is the i-th
/// subnet; ours is the first).
pub fn tables(leases: u32, subnet_len: u8) -> Tables {
    let shift = 32 - u32::from(subnet_len);
    assert!(
        u64::from(leases) < (1u64 << (24 - shift)),
        "a /8 holds fewer /{subnet_len} leases"
    );
    let mut map = SubnetMap::new("10.0.0.0/8".parse().expect("net"), subnet_len).expect("map");
    for i in 1..=leases {
        let subnet = Ipv4Net::new(Ipv4Addr::from_bits(0x0a00_0000 | (i << shift)), subnet_len)
            .expect("subnet");
        map.insert(Node {
            subnet,
            public_ip: Ipv4Addr::from_bits(0xc0a8_0000 + i),
            backend: Backend::Udp,
        })
        .expect("lease");
    }
    Tables {
        map,
        local: {
            let subnet = Ipv4Net::new(Ipv4Addr::from_bits(0x0a00_0000 | (1 << shift)), subnet_len)
                .expect("lease");
            LocalNode {
                subnet,
                public_ip: Ipv4Addr::from_bits(0xc0a8_0001),
                tun_addr: subnet.addr(),
            }
        },
        peer_port: 8285,
    }
}

/// An IPv4/UDP packet with `payload` bytes.
pub fn udp_packet(src: [u8; 4], dst: [u8; 4], payload: usize) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(src, dst, 64)
        .udp(5000, 6000)
        .write(&mut out, &vec![0xab; payload])
        .expect("packet");
    out
}
