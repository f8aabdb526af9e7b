//! The forwarding decisions, sans I/O: bytes and tables in, a `Verdict` out.
//!
//! Two directions, flannel's udp backend on the wire (raw inner IPv4 as the UDP payload):
//! - **TUN -> underlay**: the inner destination's lease names the node; TTL is decremented
//!   (RFC 1624 checksum patch) and the packet goes to `PublicIP:port`. A destination in no lease
//!   gets an ICMP net-unreachable written back into the TUN, as flanneld does, except for ICMP
//!   errors, non-first fragments and unusable sources (RFC 1122 3.2.2).
//! - **underlay -> TUN**: only from a node's public IP; the inner packet must be a valid IPv4
//!   packet from inside the sender's own lease (anti-spoofing, which flannel does not do) to
//!   inside ours; TTL decremented again, as flanneld does on both ends.
//!
//! Everything rejected is a `Drop(DropReason)`: counted by the worker, never logged, never a
//! panic. Nothing here allocates, locks or makes a syscall.

use crate::batch::{Batch, Meta};
use crate::route::{Ipv4Net, SubnetMap};
use crate::wire::{self, icmpv4, ipv4, IpProtocol};
use core::net::{Ipv4Addr, SocketAddrV4};

/// Why a packet was not forwarded. The names are the metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than its headers, or than a length a header claims.
    Truncated,
    /// An IPv4 header with an impossible version, header length or total length.
    BadIpHeader,
    /// An inner IPv4 header whose checksum is wrong.
    BadChecksum,
    /// Not IPv4 (IPv6 or garbage) on a path that carries only IPv4.
    NotIpv4,
    /// TTL would reach zero.
    TtlExpired,
    /// No lease holds the destination and no ICMP error may be sent for this packet.
    NoRoute,
    /// A packet from the TUN for our own lease: sending it would loop.
    LoopToSelf,
    /// An underlay datagram from an address that is no node's PublicIP.
    UnknownPeer,
    /// An inner source address outside the sending node's lease.
    SpoofedSource,
    /// An inner destination outside this node's lease.
    NotForThisNode,
    /// A datagram or frame larger than the receive buffer.
    Oversized,
    /// The device or socket refused the packet on transmit.
    TxError,
}

impl DropReason {
    pub const COUNT: usize = 12;
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Truncated,
        DropReason::BadIpHeader,
        DropReason::BadChecksum,
        DropReason::NotIpv4,
        DropReason::TtlExpired,
        DropReason::NoRoute,
        DropReason::LoopToSelf,
        DropReason::UnknownPeer,
        DropReason::SpoofedSource,
        DropReason::NotForThisNode,
        DropReason::Oversized,
        DropReason::TxError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::NoRoute => "no_route",
            DropReason::LoopToSelf => "loop_to_self",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NotForThisNode => "not_for_this_node",
            DropReason::Oversized => "oversized",
            DropReason::TxError => "tx_error",
        }
    }

    pub fn from_name(name: &str) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl core::fmt::Display for DropReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not processed yet.
    Pending,
    /// Send the packet's bytes as one datagram to this underlay address.
    ToUnderlay(SocketAddrV4),
    /// Write the packet into the TUN device.
    ToTun,
    /// The packet was replaced by an ICMP error for its sender: write it back into the TUN.
    IcmpToTun,
    /// Count and forget.
    Drop(DropReason),
}

/// Which port a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    FromTun,
    FromUnderlay,
}

/// This node, as the pipeline needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalNode {
    /// Our lease.
    pub subnet: Ipv4Net,
    /// Our underlay address (the lease's PublicIP).
    pub public_ip: Ipv4Addr,
    /// The TUN device's address (the lease's `.0`), source of the ICMP errors we generate.
    pub tun_addr: Ipv4Addr,
}

/// Everything the pipeline reads: one immutable snapshot, swapped whole by the control thread.
#[derive(Debug, Clone)]
pub struct Tables {
    pub map: SubnetMap,
    pub local: LocalNode,
    /// UDP port peers listen on (flannel udp default 8285).
    pub peer_port: u16,
}

/// TTL of the ICMP errors we generate (the kernel's default hop limit).
pub const ICMP_ERROR_TTL: u8 = 64;
/// TOS of generated ICMP errors: precedence "internetwork control", as Linux's `icmp_send`.
pub const ICMP_ERROR_TOS: u8 = 0xc0;

/// Decides every packet of a batch received from `dir`.
pub fn process(tables: &Tables, dir: Direction, batch: &mut Batch) {
    for i in 0..batch.len() {
        let (slot, meta) = batch.slot_mut(i);
        meta.verdict = match dir {
            Direction::FromTun => from_tun(tables, slot, meta),
            Direction::FromUnderlay => from_underlay(tables, slot, meta),
        };
        if let Verdict::ToUnderlay(dst) = meta.verdict {
            meta.peer = dst;
        }
    }
}

fn parse_ipv4(data: &[u8]) -> Result<ipv4::Packet<&[u8]>, DropReason> {
    match data.first() {
        None => return Err(DropReason::Truncated),
        Some(b) if b >> 4 != 4 => return Err(DropReason::NotIpv4),
        Some(_) => {}
    }
    ipv4::Packet::new_checked(data).map_err(|e| match e {
        wire::Error::Truncated => DropReason::Truncated,
        wire::Error::Malformed => DropReason::BadIpHeader,
    })
}

/// A packet read from the TUN device: where does it go?
pub fn from_tun(t: &Tables, slot: &mut [u8], meta: &mut Meta) -> Verdict {
    if meta.oversized {
        return Verdict::Drop(DropReason::Oversized);
    }
    let (dst, total_len) = {
        let p = match parse_ipv4(&slot[meta.start..meta.start + meta.len]) {
            Ok(p) => p,
            Err(r) => return Verdict::Drop(r),
        };
        (p.dst(), usize::from(p.total_len()))
    };
    meta.len = total_len;
    let node = match t.map.lookup(dst) {
        Some(node) => node,
        None => return net_unreachable(t, slot, meta),
    };
    if node.subnet == t.local.subnet {
        return Verdict::Drop(DropReason::LoopToSelf);
    }
    let mut p = ipv4::Packet::new_unchecked(&mut slot[meta.start..meta.start + meta.len]);
    if p.ttl() <= 1 {
        return Verdict::Drop(DropReason::TtlExpired);
    }
    p.decrement_ttl();
    Verdict::ToUnderlay(SocketAddrV4::new(node.public_ip, t.peer_port))
}

/// A datagram received on the underlay socket: may it enter the TUN?
pub fn from_underlay(t: &Tables, slot: &mut [u8], meta: &mut Meta) -> Verdict {
    if meta.oversized {
        return Verdict::Drop(DropReason::Oversized);
    }
    let sender = *meta.peer.ip();
    if !t.map.is_node(sender) {
        return Verdict::Drop(DropReason::UnknownPeer);
    }
    let (src, dst, total_len) = {
        let p = match parse_ipv4(&slot[meta.start..meta.start + meta.len]) {
            Ok(p) => p,
            Err(r) => return Verdict::Drop(r),
        };
        if !p.verify_checksum() {
            return Verdict::Drop(DropReason::BadChecksum);
        }
        (p.src(), p.dst(), usize::from(p.total_len()))
    };
    if !t.local.subnet.contains(dst) {
        return Verdict::Drop(DropReason::NotForThisNode);
    }
    match t.map.lookup(src) {
        Some(node) if node.public_ip == sender => {}
        _ => return Verdict::Drop(DropReason::SpoofedSource),
    }
    meta.len = total_len;
    let mut p = ipv4::Packet::new_unchecked(&mut slot[meta.start..meta.start + meta.len]);
    if p.ttl() <= 1 {
        return Verdict::Drop(DropReason::TtlExpired);
    }
    p.decrement_ttl();
    Verdict::ToTun
}

/// Most of the offending packet an ICMP error quotes: its IP header (up to 60 bytes) plus the
/// first 8 bytes of its payload (RFC 792).
const MAX_QUOTE: usize = 60 + 8;

/// Replaces the packet in `slot` by an ICMP net-unreachable for its sender, if one may be sent.
fn net_unreachable(t: &Tables, slot: &mut [u8], meta: &mut Meta) -> Verdict {
    let mut quote = [0u8; MAX_QUOTE];
    let (quote_len, orig_src) = {
        let p = ipv4::Packet::new_unchecked(&slot[meta.start..meta.start + meta.len]);
        if !may_send_icmp_error(&p) {
            return Verdict::Drop(DropReason::NoRoute);
        }
        let n = p.header_len() + p.payload().len().min(8);
        quote[..n].copy_from_slice(&slot[meta.start..meta.start + n]);
        (n, p.src())
    };
    let total = ipv4::HEADER_LEN + icmpv4::HEADER_LEN + quote_len;
    let out = &mut slot[meta.start..meta.start + total];
    ipv4::Repr {
        src: t.local.tun_addr,
        dst: orig_src,
        protocol: IpProtocol::Icmp,
        payload_len: icmpv4::HEADER_LEN + quote_len,
        ttl: ICMP_ERROR_TTL,
        dscp_ecn: ICMP_ERROR_TOS,
        ident: 0,
        dont_frag: false,
    }
    .emit(out);
    let mut icmp = icmpv4::Packet::new_unchecked(&mut out[ipv4::HEADER_LEN..]);
    icmp.set_kind(icmpv4::kind::DEST_UNREACHABLE);
    icmp.set_code(icmpv4::unreachable::NET);
    icmp.set_rest(0, 0);
    icmp.data_mut().copy_from_slice(&quote[..quote_len]);
    icmp.fill_checksum();
    meta.len = total;
    Verdict::IcmpToTun
}

/// RFC 1122 3.2.2: never answer an ICMP error, a non-first fragment, or a source that is not a
/// single host.
fn may_send_icmp_error(p: &ipv4::Packet<&[u8]>) -> bool {
    if p.is_non_first_fragment() {
        return false;
    }
    let src = p.src();
    if src.is_unspecified() || src.is_multicast() || src.is_broadcast() {
        return false;
    }
    if p.protocol() == IpProtocol::Icmp {
        match p.payload().first() {
            Some(&kind) => !icmpv4::is_error(kind),
            None => false,
        }
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Backend, Node};
    use crate::wire::checksum;

    const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
    const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
    const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);

    fn tables() -> Tables {
        let mut map = SubnetMap::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        for (subnet, ip) in [("10.244.1.0/24", NODE_A), ("10.244.2.0/24", NODE_B)] {
            map.insert(Node {
                subnet: subnet.parse().unwrap(),
                public_ip: ip,
                backend: Backend::Udp,
            })
            .unwrap();
        }
        Tables {
            map,
            local: LocalNode {
                subnet: "10.244.1.0/24".parse().unwrap(),
                public_ip: NODE_A,
                tun_addr: Ipv4Addr::new(10, 244, 1, 0),
            },
            peer_port: 8285,
        }
    }

    fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), ttl)
            .udp(5000, 6000)
            .write(&mut out, b"payload!")
            .unwrap();
        out
    }

    fn run(dir: Direction, pkt: &[u8], peer: Ipv4Addr) -> (Verdict, Vec<u8>) {
        let mut b = Batch::new(1, 2048);
        b.rx_slot(0)[..pkt.len()].copy_from_slice(pkt);
        b.commit_rx(0, pkt.len(), SocketAddrV4::new(peer, 8285), false);
        process(&tables(), dir, &mut b);
        (b.meta(0).verdict, b.packet(0).to_vec())
    }

    #[test]
    fn test_encap_to_lease_owner_with_ttl_decremented() {
        let (v, out) = run(Direction::FromTun, &udp_packet(POD_A, POD_B, 64), NODE_A);
        assert_eq!(v, Verdict::ToUnderlay(SocketAddrV4::new(NODE_B, 8285)));
        assert_eq!(out, udp_packet(POD_A, POD_B, 63));
    }

    #[test]
    fn test_decap_into_tun() {
        let (v, out) = run(
            Direction::FromUnderlay,
            &udp_packet(POD_B, POD_A, 63),
            NODE_B,
        );
        assert_eq!(v, Verdict::ToTun);
        assert_eq!(out, udp_packet(POD_B, POD_A, 62));
    }

    #[test]
    fn test_ttl_expiry_both_ways() {
        for ttl in [0, 1] {
            let (v, _) = run(Direction::FromTun, &udp_packet(POD_A, POD_B, ttl), NODE_A);
            assert_eq!(v, Verdict::Drop(DropReason::TtlExpired));
            let (v, _) = run(
                Direction::FromUnderlay,
                &udp_packet(POD_B, POD_A, ttl),
                NODE_B,
            );
            assert_eq!(v, Verdict::Drop(DropReason::TtlExpired));
        }
    }

    #[test]
    fn test_no_lease_gets_icmp_net_unreachable() {
        let orig = udp_packet(POD_A, Ipv4Addr::new(10, 244, 9, 9), 64);
        let (v, out) = run(Direction::FromTun, &orig, NODE_A);
        assert_eq!(v, Verdict::IcmpToTun);
        let ip = ipv4::Packet::new_checked(&out[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(
            (ip.src(), ip.dst(), ip.ttl()),
            (Ipv4Addr::new(10, 244, 1, 0), POD_A, 64)
        );
        let icmp = icmpv4::Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!((icmp.kind(), icmp.code()), (3, 0));
        assert_eq!(icmp.data(), &orig[..28]);
        assert_eq!(checksum::sum(ip.payload()), 0xffff);
    }

    #[test]
    fn test_no_icmp_about_icmp_errors_or_fragments() {
        let far = Ipv4Addr::new(10, 244, 9, 9);
        let mut err = Vec::new();
        etherparse::PacketBuilder::ipv4(POD_A.octets(), far.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
                etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
            ))
            .write(&mut err, &[0u8; 28])
            .unwrap();
        assert_eq!(
            run(Direction::FromTun, &err, NODE_A).0,
            Verdict::Drop(DropReason::NoRoute)
        );
        let mut frag = udp_packet(POD_A, far, 64);
        frag[7] = 0x10;
        let c = {
            frag[10] = 0;
            frag[11] = 0;
            checksum::checksum(&frag[..20])
        };
        frag[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            run(Direction::FromTun, &frag, NODE_A).0,
            Verdict::Drop(DropReason::NoRoute)
        );
        let mut echo = Vec::new();
        etherparse::PacketBuilder::ipv4(POD_A.octets(), far.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, b"x")
            .unwrap();
        assert_eq!(run(Direction::FromTun, &echo, NODE_A).0, Verdict::IcmpToTun);
    }

    #[test]
    fn test_own_subnet_from_tun_is_a_loop() {
        let (v, _) = run(
            Direction::FromTun,
            &udp_packet(POD_A, Ipv4Addr::new(10, 244, 1, 9), 64),
            NODE_A,
        );
        assert_eq!(v, Verdict::Drop(DropReason::LoopToSelf));
    }

    #[test]
    fn test_underlay_rejects() {
        let good = udp_packet(POD_B, POD_A, 64);
        let stranger = Ipv4Addr::new(192, 168, 100, 66);
        assert_eq!(
            run(Direction::FromUnderlay, &good, stranger).0,
            Verdict::Drop(DropReason::UnknownPeer)
        );
        // Node B claiming a source in node A's lease.
        let spoofed = udp_packet(Ipv4Addr::new(10, 244, 1, 7), POD_A, 64);
        assert_eq!(
            run(Direction::FromUnderlay, &spoofed, NODE_B).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
        let outside = udp_packet(Ipv4Addr::new(8, 8, 8, 8), POD_A, 64);
        assert_eq!(
            run(Direction::FromUnderlay, &outside, NODE_B).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
        let elsewhere = udp_packet(POD_B, Ipv4Addr::new(10, 244, 2, 9), 64);
        assert_eq!(
            run(Direction::FromUnderlay, &elsewhere, NODE_B).0,
            Verdict::Drop(DropReason::NotForThisNode)
        );
        let mut bad_sum = good.clone();
        bad_sum[10] ^= 0xff;
        assert_eq!(
            run(Direction::FromUnderlay, &bad_sum, NODE_B).0,
            Verdict::Drop(DropReason::BadChecksum)
        );
    }

    #[test]
    fn test_malformed_input_is_counted_not_fatal() {
        let good = udp_packet(POD_A, POD_B, 64);
        let cases: Vec<(Vec<u8>, DropReason)> = vec![
            (vec![], DropReason::Truncated),
            (good[..10].to_vec(), DropReason::Truncated),
            (good[..good.len() - 1].to_vec(), DropReason::Truncated),
            (
                {
                    let mut b = good.clone();
                    b[0] = 0x44;
                    b
                },
                DropReason::BadIpHeader,
            ),
            (
                {
                    let mut b = good.clone();
                    b[2] = 0;
                    b[3] = 10;
                    b
                },
                DropReason::BadIpHeader,
            ),
            (
                {
                    let mut b = good.clone();
                    b[0] = 0x60;
                    b
                },
                DropReason::NotIpv4,
            ),
            (vec![0xff; 64], DropReason::NotIpv4),
        ];
        for (pkt, want) in cases {
            assert_eq!(
                run(Direction::FromTun, &pkt, NODE_A).0,
                Verdict::Drop(want),
                "{pkt:02x?}"
            );
            assert_eq!(
                run(Direction::FromUnderlay, &pkt, NODE_B).0,
                Verdict::Drop(want),
                "{pkt:02x?}"
            );
        }
    }

    #[test]
    fn test_trailing_bytes_are_trimmed() {
        let mut padded = udp_packet(POD_A, POD_B, 64);
        let len = padded.len();
        padded.extend_from_slice(&[0u8; 6]);
        let (v, out) = run(Direction::FromTun, &padded, NODE_A);
        assert!(matches!(v, Verdict::ToUnderlay(_)));
        assert_eq!(out.len(), len);
    }

    #[test]
    fn test_oversized_is_dropped() {
        let pkt = udp_packet(POD_B, POD_A, 64);
        let mut b = Batch::new(1, 2048);
        b.rx_slot(0)[..pkt.len()].copy_from_slice(&pkt);
        b.commit_rx(0, pkt.len(), SocketAddrV4::new(NODE_B, 8285), true);
        process(&tables(), Direction::FromUnderlay, &mut b);
        assert_eq!(b.meta(0).verdict, Verdict::Drop(DropReason::Oversized));
    }

    #[test]
    fn test_drop_reason_names_round_trip() {
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_name(r.as_str()), Some(r));
        }
    }
}
