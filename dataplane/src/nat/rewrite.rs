//! Rewriting a packet's tuple in place: addresses, ports or ICMP identifier, with the IPv4
//! header checksum and the L4 checksum patched incrementally (RFC 1624, the kernel's
//! `csum_replace4`/`inet_proto_csum_replace*`), and ICMP errors translated inside and out
//! (netfilter's `nf_nat_icmp_reply_translation`).
//!
//! Callers pass packets whose IPv4 header they have checked and whose L4 header (TCP 20 bytes,
//! UDP 8, ICMP 8) is present; nothing here allocates.

use crate::conntrack::{Tuple, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::wire::checksum;
use core::net::Ipv4Addr;

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Offset of the L4 checksum for protocols whose checksum covers the pseudo-header.
fn l4_checksum_offset(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        _ => None,
    }
}

/// Replaces the address at `at` (12: source, 16: destination) of the IPv4 header at the start
/// of `ip`, patching the header checksum, and the L4 checksum at `l4_csum` (absolute offset)
/// if given and present.
fn set_addr(ip: &mut [u8], at: usize, new: Ipv4Addr, l4_csum: Option<(usize, u8)>) {
    let old = u32::from_be_bytes([ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]);
    let new = new.to_bits();
    if old == new {
        return;
    }
    ip[at..at + 4].copy_from_slice(&new.to_be_bytes());
    put16(ip, 10, checksum::update32(get16(ip, 10), old, new));
    if let Some((off, proto)) = l4_csum {
        if off + 2 <= ip.len() {
            patch_l4(ip, off, proto, |c| checksum::update32(c, old, new));
        }
    }
}

/// Applies `f` to the L4 checksum at `off`, keeping UDP's "no checksum" (0) and never writing
/// 0 for UDP (`CSUM_MANGLED_0`).
fn patch_l4(b: &mut [u8], off: usize, proto: u8, f: impl Fn(u16) -> u16) {
    let c = get16(b, off);
    if proto == PROTO_UDP && c == 0 {
        return;
    }
    let mut n = f(c);
    if proto == PROTO_UDP && n == 0 {
        n = 0xffff;
    }
    put16(b, off, n);
}

fn set_port(b: &mut [u8], at: usize, new: u16, csum: Option<(usize, u8)>) {
    let old = get16(b, at);
    if old == new {
        return;
    }
    put16(b, at, new);
    if let Some((off, proto)) = csum {
        if off + 2 <= b.len() {
            patch_l4(b, off, proto, |c| checksum::update16(c, old, new));
        }
    }
}

/// Rewrites `pkt` (an IPv4 packet whose tuple is `from`) so that its tuple is `to`.
pub fn apply(pkt: &mut [u8], from: &Tuple, to: &Tuple) {
    if from == to {
        return;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let csum = l4_checksum_offset(from.proto).map(|o| (ihl + o, from.proto));
    set_addr(pkt, 12, to.src, csum);
    set_addr(pkt, 16, to.dst, csum);
    match from.proto {
        PROTO_TCP | PROTO_UDP => {
            set_port(pkt, ihl, to.sport, csum);
            // DELIBERATELY BROKEN with `fuzz-broken-port-checksum` (fuzz tests only).
            let dport_csum = if cfg!(feature = "fuzz-broken-port-checksum") {
                None
            } else {
                csum
            };
            set_port(pkt, ihl + 2, to.dport, dport_csum);
        }
        PROTO_ICMP => {
            // The identifier; the ICMP checksum does not cover the pseudo-header.
            set_port(pkt, ihl + 4, to.sport, Some((ihl + 2, PROTO_ICMP)));
        }
        _ => {}
    }
}

/// Translates an ICMP error in place: the quoted packet's tuple becomes `inner_to`, the outer
/// source becomes `outer_src` and the outer destination `outer_dst`; the quoted IPv4 header's
/// checksum and (when quoted) its L4 checksum are patched and the ICMP checksum recomputed.
/// `inner_from` is the quoted packet's tuple as parsed.
pub fn apply_icmp_error(
    pkt: &mut [u8],
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    inner_from: &Tuple,
    inner_to: &Tuple,
) {
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    set_addr(pkt, 12, outer_src, None);
    set_addr(pkt, 16, outer_dst, None);
    {
        let icmp = &mut pkt[ihl..];
        apply_quoted(&mut icmp[8..], inner_from, inner_to);
        put16(icmp, 2, 0);
        let c = checksum::checksum(icmp);
        put16(icmp, 2, c);
    }
}

/// The quoted packet may be cut anywhere after its first 8 L4 bytes: patch what is there.
fn apply_quoted(inner: &mut [u8], from: &Tuple, to: &Tuple) {
    let ihl = usize::from(inner[0] & 0x0f) * 4;
    let csum = l4_checksum_offset(from.proto).map(|o| (ihl + o, from.proto));
    set_addr(inner, 12, to.src, csum);
    set_addr(inner, 16, to.dst, csum);
    if matches!(from.proto, PROTO_TCP | PROTO_UDP) && inner.len() >= ihl + 4 {
        set_port(inner, ihl, to.sport, csum);
        set_port(inner, ihl + 2, to.dport, csum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, PacketBuilder, SlicedPacket, TransportSlice};

    const C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);

    fn tcp(src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
            .tcp(sp, dp, 12345, 64000)
            .syn()
            .write(&mut out, payload)
            .unwrap();
        out
    }

    fn udp(src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
            .udp(sp, dp)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    #[test]
    fn test_dnat_rewrite_matches_a_freshly_built_packet() {
        let mut p = tcp(C, 40000, VIP, 80, b"hello");
        apply(
            &mut p,
            &Tuple::new(C, 40000, VIP, 80, PROTO_TCP),
            &Tuple::new(C, 40000, B, 8080, PROTO_TCP),
        );
        assert_eq!(p, tcp(C, 40000, B, 8080, b"hello"));
        let mut u = udp(B, 53, C, 5000, b"answer");
        apply(
            &mut u,
            &Tuple::new(B, 53, C, 5000, PROTO_UDP),
            &Tuple::new(VIP, 5353, Ipv4Addr::new(10, 111, 255, 254), 1, PROTO_UDP),
        );
        assert_eq!(
            u,
            udp(VIP, 5353, Ipv4Addr::new(10, 111, 255, 254), 1, b"answer")
        );
    }

    #[test]
    fn test_udp_zero_checksum_stays_zero() {
        let mut u = udp(C, 1, VIP, 53, b"x");
        u[26..28].copy_from_slice(&[0, 0]);
        apply(
            &mut u,
            &Tuple::new(C, 1, VIP, 53, PROTO_UDP),
            &Tuple::new(C, 1, B, 5353, PROTO_UDP),
        );
        assert_eq!(&u[26..28], &[0, 0]);
    }

    #[test]
    fn test_port_unreachable_from_a_backend_is_translated_inside_and_out() {
        // The client's datagram as the backend saw it (after DNAT), quoted in the error.
        let sent = udp(C, 5000, B, 5353, b"query");
        let mut err = Vec::new();
        PacketBuilder::ipv4(B.octets(), C.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut err, &sent[..28])
            .unwrap();
        apply_icmp_error(
            &mut err,
            VIP,
            C,
            &Tuple::new(C, 5000, B, 5353, PROTO_UDP),
            &Tuple::new(C, 5000, VIP, 53, PROTO_UDP),
        );
        let expect_inner = udp(C, 5000, VIP, 53, b"query");
        let mut want = Vec::new();
        PacketBuilder::ipv4(VIP.octets(), C.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut want, &expect_inner[..28])
            .unwrap();
        assert_eq!(err, want);
        let s = SlicedPacket::from_ip(&err).unwrap();
        assert!(matches!(s.transport, Some(TransportSlice::Icmpv4(_))));
    }
}
