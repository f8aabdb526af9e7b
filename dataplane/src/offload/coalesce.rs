//! The receive half of the offload (GRO): in-order TCP segments of one flow merged into one
//! superframe for the TUN, as Linux's `tcp_gro_receive` would merge them.

use crate::wire::checksum;
use crate::wire::vnet::*;

/// The receive half of the offload (GRO): consecutive in-order segments of one TCP flow
/// become one superframe, written to the TUN with a GSO header, so the kernel and the pod's TCP
/// handle one packet instead of dozens. The rules follow Linux's `tcp_gro_receive`: IPv4 without
/// options or fragments, DF set, same addresses, ports, TTL, TOS, ACK number, window and TCP
/// options; only ACK (and PSH, which ends a run) among the flags; sequence numbers that follow
/// on; every segment but the last exactly one MSS; a verified TCP checksum on each, since the
/// superframe's is left for the kernel to finish.
#[derive(Debug)]
pub struct TcpCoalescer {
    /// Virtio-net header, then the superframe.
    buf: Vec<u8>,
    len: usize,
    count: usize,
    mss: usize,
    hdr_len: usize,
    next_seq: u32,
    psh: bool,
    closed: bool,
}

const IP_HDR: usize = 20;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const FRAME_CAP: usize = 65_535;

/// Where a packet that may be coalesced keeps its parts: (TCP header length, payload length,
/// sequence number, flags). `None`: write it as it is.
fn tcp4_candidate(pkt: &[u8]) -> Option<(usize, usize, u32, u8)> {
    if pkt.len() < IP_HDR + 20 || pkt[0] != 0x45 || pkt[9] != 6 {
        return None;
    }
    if usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len() {
        return None;
    }
    // DF set, MF clear, offset 0.
    if u16::from_be_bytes([pkt[6], pkt[7]]) != 0x4000 {
        return None;
    }
    let thl = usize::from(pkt[IP_HDR + 12] >> 4) * 4;
    if thl < 20 || pkt.len() <= IP_HDR + thl {
        return None;
    }
    let flags = pkt[IP_HDR + 13];
    if flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    let src = core::net::Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = core::net::Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    if checksum::l4_sum_v4(src, dst, 6, &pkt[IP_HDR..]) != 0xffff {
        return None;
    }
    let t = IP_HDR;
    let seq = u32::from_be_bytes([pkt[t + 4], pkt[t + 5], pkt[t + 6], pkt[t + 7]]);
    Some((thl, pkt.len() - IP_HDR - thl, seq, flags))
}

impl Default for TcpCoalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl TcpCoalescer {
    pub fn new() -> TcpCoalescer {
        TcpCoalescer {
            buf: vec![0; HEADER_LEN + FRAME_CAP],
            len: 0,
            count: 0,
            mss: 0,
            hdr_len: 0,
            next_seq: 0,
            psh: false,
            closed: false,
        }
    }

    /// Packets in the run being built.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Adds `pkt` to the run if it belongs there; false if not (write the run, then retry, and
    /// write `pkt` as it is if it is refused again).
    pub fn push(&mut self, pkt: &[u8]) -> bool {
        let Some((thl, payload, seq, flags)) = tcp4_candidate(pkt) else {
            return false;
        };
        let hdr_len = IP_HDR + thl;
        if self.count == 0 {
            self.buf[HEADER_LEN..HEADER_LEN + pkt.len()].copy_from_slice(pkt);
            self.len = pkt.len();
            self.count = 1;
            self.mss = payload;
            self.hdr_len = hdr_len;
            self.next_seq = seq.wrapping_add(payload as u32);
            self.psh = flags & TCP_PSH != 0;
            self.closed = self.psh;
            return true;
        }
        let first = &self.buf[HEADER_LEN..HEADER_LEN + self.hdr_len];
        let same_flow = !self.closed
            && hdr_len == self.hdr_len
            && seq == self.next_seq
            && payload <= self.mss
            && self.len + payload <= FRAME_CAP
            // TOS, TTL and protocol; addresses.
            && pkt[1] == first[1]
            && pkt[8..10] == first[8..10]
            && pkt[12..20] == first[12..20]
            // Ports; then ACK number, data offset, window, urgent pointer and options, with the
            // flags byte compared apart (PSH may differ) and the checksum skipped.
            && pkt[IP_HDR..IP_HDR + 4] == first[IP_HDR..IP_HDR + 4]
            && pkt[IP_HDR + 8..IP_HDR + 13] == first[IP_HDR + 8..IP_HDR + 13]
            && (pkt[IP_HDR + 13] & !TCP_PSH) == (first[IP_HDR + 13] & !TCP_PSH)
            && pkt[IP_HDR + 14..IP_HDR + 16] == first[IP_HDR + 14..IP_HDR + 16]
            && pkt[IP_HDR + 18..hdr_len] == first[IP_HDR + 18..hdr_len];
        if !same_flow {
            return false;
        }
        let at = HEADER_LEN + self.len;
        self.buf[at..at + payload].copy_from_slice(&pkt[hdr_len..]);
        self.len += payload;
        self.count += 1;
        self.next_seq = seq.wrapping_add(payload as u32);
        if flags & TCP_PSH != 0 {
            self.psh = true;
            self.closed = true;
        }
        if payload < self.mss {
            self.closed = true;
        }
        true
    }

    /// The run as one frame to write (virtio-net header first) and how many packets it holds;
    /// empties the coalescer. A run of one is the packet unchanged behind a plain header.
    pub fn take(&mut self) -> Option<(&[u8], usize)> {
        if self.count == 0 {
            return None;
        }
        let count = std::mem::take(&mut self.count);
        let len = self.len;
        if count == 1 {
            self.buf[..HEADER_LEN].copy_from_slice(&PLAIN);
            return Some((&self.buf[..HEADER_LEN + len], 1));
        }
        let f = &mut self.buf[HEADER_LEN..HEADER_LEN + len];
        f[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        f[10..12].fill(0);
        let ip_sum = checksum::checksum(&f[..IP_HDR]);
        f[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        if self.psh {
            f[IP_HDR + 13] |= TCP_PSH;
        }
        // CHECKSUM_PARTIAL: the pseudo-header sum, for the kernel to finish.
        let src = core::net::Ipv4Addr::new(f[12], f[13], f[14], f[15]);
        let dst = core::net::Ipv4Addr::new(f[16], f[17], f[18], f[19]);
        let pseudo = checksum::fold(checksum::pseudo_header_v4(
            src,
            dst,
            6,
            (len - IP_HDR) as u16,
        ));
        f[IP_HDR + 16..IP_HDR + 18].copy_from_slice(&pseudo.to_be_bytes());
        let h = &mut self.buf[..HEADER_LEN];
        h[0] = F_NEEDS_CSUM;
        h[1] = GSO_TCPV4;
        h[2..4].copy_from_slice(&(self.hdr_len as u16).to_le_bytes());
        h[4..6].copy_from_slice(&(self.mss as u16).to_le_bytes());
        h[6..8].copy_from_slice(&(IP_HDR as u16).to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
        Some((&self.buf[..HEADER_LEN + len], count))
    }
}
