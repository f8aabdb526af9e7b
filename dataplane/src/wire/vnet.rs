//! The virtio-net header a TUN device with `IFF_VNET_HDR` puts in front of every frame, and
//! what it asks of the reader: finishing a partial checksum, or cutting a TCP superframe (TSO)
//! or a UDP one (USO, a sender's UDP_SEGMENT) into segments as a NIC would.
//!
//! Layout (10 bytes, host byte order, which is little endian on every target podwire builds
//! for): flags u8, gso_type u8, hdr_len u16, gso_size u16, csum_start u16, csum_offset u16.

use super::checksum;

pub const HEADER_LEN: usize = 10;
/// `flags`: the checksum at `csum_start + csum_offset` is partial (CHECKSUM_PARTIAL).
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
/// A UDP superframe (USO): datagrams of `gso_size` payload bytes each, the last shorter.
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the superframe carries ECN's CWR on its first segment only.
pub const GSO_ECN: u8 = 0x80;

/// A parsed virtio-net header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// An all-zero header: a complete packet, no offload asked (what we write with every frame).
pub const PLAIN: [u8; HEADER_LEN] = [0; HEADER_LEN];

/// Why a frame could not be handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    #[error("frame shorter than its virtio-net header")]
    Truncated,
    #[error("superframe of a kind podwire does not segment (gso_type {0:#x})")]
    Unsupported(u8),
    #[error("superframe headers do not parse")]
    BadHeaders,
    #[error("checksum location outside the packet")]
    BadChecksumPlace,
}

impl VnetHeader {
    pub fn parse(b: &[u8]) -> Result<VnetHeader, VnetError> {
        if b.len() < HEADER_LEN {
            return Err(VnetError::Truncated);
        }
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Finishes a partial checksum: the field holds the pseudo-header sum; the sum from
/// `start` to the end goes into `start + offset`, as a NIC with checksum offload would.
pub fn finish_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), VnetError> {
    let at = start + offset;
    if at + 2 > pkt.len() {
        return Err(VnetError::BadChecksumPlace);
    }
    let sum = !checksum::fold(checksum::accumulate(0, &pkt[start..]));
    pkt[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Header sizes of an IPv4/TCP superframe: (IP header, TCP header).
fn tcp4_headers(frame: &[u8]) -> Result<(usize, usize), VnetError> {
    if frame.len() < 20 || frame[0] >> 4 != 4 || frame[9] != 6 {
        return Err(VnetError::BadHeaders);
    }
    let ihl = usize::from(frame[0] & 0x0f) * 4;
    if ihl < 20 || frame.len() < ihl + 20 {
        return Err(VnetError::BadHeaders);
    }
    let thl = usize::from(frame[ihl + 12] >> 4) * 4;
    if thl < 20 || frame.len() < ihl + thl {
        return Err(VnetError::BadHeaders);
    }
    Ok((ihl, thl))
}

/// Header sizes of an IPv4/UDP superframe: (IP header, 8).
fn udp4_headers(frame: &[u8]) -> Result<(usize, usize), VnetError> {
    if frame.len() < 20 || frame[0] >> 4 != 4 || frame[9] != 17 {
        return Err(VnetError::BadHeaders);
    }
    let ihl = usize::from(frame[0] & 0x0f) * 4;
    if ihl < 20 || frame.len() < ihl + 8 {
        return Err(VnetError::BadHeaders);
    }
    Ok((ihl, 8))
}

/// Header sizes of a superframe of a kind we segment.
fn headers(hdr: &VnetHeader, frame: &[u8]) -> Result<(usize, usize), VnetError> {
    if hdr.gso_size == 0 {
        return Err(VnetError::Unsupported(hdr.gso_type));
    }
    match hdr.gso_type & !GSO_ECN {
        GSO_TCPV4 => tcp4_headers(frame),
        GSO_UDP_L4 => udp4_headers(frame),
        other => Err(VnetError::Unsupported(other)),
    }
}

/// How many segments `frame` becomes under `hdr` (1 for a plain frame).
pub fn segment_count(hdr: &VnetHeader, frame: &[u8]) -> Result<usize, VnetError> {
    if !hdr.is_gso() {
        return Ok(1);
    }
    let (ihl, l4) = headers(hdr, frame)?;
    let payload = frame.len() - ihl - l4;
    Ok(payload.div_ceil(usize::from(hdr.gso_size)).max(1))
}

/// Writes segment `k`'s headers (`hdrs` bytes of `frame`'s) and `chunk` into `out`, and fixes
/// its IPv4 header: total length, ID (+k), checksum. `out` holds at least `hdrs + chunk`.
fn segment_ipv4(frame: &[u8], hdrs: usize, chunk: &[u8], k: usize, out: &mut [u8]) {
    let len = hdrs + chunk.len();
    let ihl = usize::from(frame[0] & 0x0f) * 4;
    out[..hdrs].copy_from_slice(&frame[..hdrs]);
    out[hdrs..len].copy_from_slice(chunk);
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    let id = u16::from_be_bytes([frame[4], frame[5]]).wrapping_add(k as u16);
    out[4..6].copy_from_slice(&id.to_be_bytes());
    out[10..12].fill(0);
    let ip_sum = checksum::checksum(&out[..ihl]);
    out[10..12].copy_from_slice(&ip_sum.to_be_bytes());
}

/// Writes segment `k` of the superframe `frame` (TCP or UDP) into `out`; returns its length.
pub fn segment(
    hdr: &VnetHeader,
    frame: &[u8],
    k: usize,
    out: &mut [u8],
) -> Result<usize, VnetError> {
    if hdr.gso_type & !GSO_ECN == GSO_UDP_L4 {
        udp4_segment(hdr, frame, k, out)
    } else {
        tcp4_segment(hdr, frame, k, out)
    }
}

/// Writes datagram `k` of the IPv4/UDP superframe `frame` into `out`; returns its length. Each
/// gets the headers with its own total length, IP ID (+k), UDP length and full IP and UDP
/// checksums, as the kernel's `__udp_gso_segment` produces them.
pub fn udp4_segment(
    hdr: &VnetHeader,
    frame: &[u8],
    k: usize,
    out: &mut [u8],
) -> Result<usize, VnetError> {
    let (ihl, _) = udp4_headers(frame)?;
    let size = usize::from(hdr.gso_size);
    let payload = &frame[ihl + 8..];
    let from = k * size;
    if size == 0 || (from >= payload.len() && !(k == 0 && payload.is_empty())) {
        return Err(VnetError::BadHeaders);
    }
    let chunk = &payload[from..(from + size).min(payload.len())];
    let len = ihl + 8 + chunk.len();
    if out.len() < len {
        return Err(VnetError::BadHeaders);
    }
    segment_ipv4(frame, ihl + 8, chunk, k, out);
    let u = ihl;
    out[u + 4..u + 6].copy_from_slice(&((8 + chunk.len()) as u16).to_be_bytes());
    out[u + 6..u + 8].fill(0);
    let src = core::net::Ipv4Addr::new(out[12], out[13], out[14], out[15]);
    let dst = core::net::Ipv4Addr::new(out[16], out[17], out[18], out[19]);
    let sum = match !checksum::l4_sum_v4(src, dst, 17, &out[u..len]) {
        0 => 0xffff, // 0 means "no checksum" in UDP
        s => s,
    };
    out[u + 6..u + 8].copy_from_slice(&sum.to_be_bytes());
    Ok(len)
}

/// Writes segment `k` of the IPv4/TCP superframe `frame` into `out`; returns its length. Each
/// segment gets the headers with its own total length, IP ID (+k), sequence number, flags
/// (FIN/PSH only on the last, CWR only on the first) and full IP and TCP checksums.
pub fn tcp4_segment(
    hdr: &VnetHeader,
    frame: &[u8],
    k: usize,
    out: &mut [u8],
) -> Result<usize, VnetError> {
    let (ihl, thl) = tcp4_headers(frame)?;
    let mss = usize::from(hdr.gso_size);
    let payload = &frame[ihl + thl..];
    let from = k * mss;
    if mss == 0 || (from >= payload.len() && !(k == 0 && payload.is_empty())) {
        return Err(VnetError::BadHeaders);
    }
    let chunk = &payload[from..(from + mss).min(payload.len())];
    let last = from + chunk.len() >= payload.len();
    let len = ihl + thl + chunk.len();
    if out.len() < len {
        return Err(VnetError::BadHeaders);
    }
    segment_ipv4(frame, ihl + thl, chunk, k, out);
    // TCP: sequence number, flags, checksum.
    let t = ihl;
    let seq = u32::from_be_bytes([frame[t + 4], frame[t + 5], frame[t + 6], frame[t + 7]])
        .wrapping_add(from as u32);
    out[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    const FIN: u8 = 0x01;
    const PSH: u8 = 0x08;
    const CWR: u8 = 0x80;
    if !last {
        out[t + 13] &= !(FIN | PSH);
    }
    if k > 0 {
        out[t + 13] &= !CWR;
    }
    out[t + 16..t + 18].fill(0);
    let src = core::net::Ipv4Addr::new(out[12], out[13], out[14], out[15]);
    let dst = core::net::Ipv4Addr::new(out[16], out[17], out[18], out[19]);
    let tcp_sum = !checksum::l4_sum_v4(src, dst, 6, &out[t..len]);
    out[t + 16..t + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    Ok(len)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn superframe(payload: usize, flags_fin_psh: bool) -> Vec<u8> {
        let data: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
        let mut b = PacketBuilder::ipv4([10, 244, 1, 2], [10, 244, 2, 2], 64)
            .tcp(40000, 5201, 1_000_000, 64000)
            .ack(7);
        if flags_fin_psh {
            b = b.psh().fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, &data).unwrap();
        // A superframe's header total length is whatever the stack put there; segments fix it.
        out
    }

    #[test]
    fn test_udp_superframe_becomes_the_datagrams_the_sender_meant() {
        let data: Vec<u8> = (0..3000).map(|i| (i % 251) as u8).collect();
        let mut frame = Vec::new();
        PacketBuilder::ipv4([10, 244, 1, 2], [10, 244, 2, 2], 64)
            .udp(40000, 443)
            .write(&mut frame, &data)
            .unwrap();
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: 6,
        };
        assert_eq!(segment_count(&hdr, &frame), Ok(3));
        let mut got = Vec::new();
        for k in 0..3 {
            let mut out = vec![0u8; 2000];
            let n = segment(&hdr, &frame, k, &mut out).unwrap();
            let p = SlicedPacket::from_ip(&out[..n]).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                panic!()
            };
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            assert_eq!(usize::from(h.total_len), n);
            let Some(TransportSlice::Udp(u)) = p.transport else {
                panic!()
            };
            assert_eq!(
                u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap(),
                u.checksum()
            );
            assert_eq!(usize::from(u.length()), 8 + u.payload().len());
            assert_eq!((u.source_port(), u.destination_port()), (40000, 443));
            got.extend_from_slice(u.payload());
        }
        assert_eq!(got, data);
        let mut out = vec![0u8; 2000];
        assert!(segment(&hdr, &frame, 3, &mut out).is_err());
        let other = VnetHeader {
            gso_type: 4, // TCPv6
            ..hdr
        };
        assert_eq!(
            segment_count(&other, &frame),
            Err(VnetError::Unsupported(4))
        );
    }

    #[test]
    fn test_parse_header() {
        let h = VnetHeader::parse(&[1, 0x81, 54, 0, 0xa0, 0x05, 20, 0, 16, 0]).unwrap();
        assert_eq!(h.flags, F_NEEDS_CSUM);
        assert!(h.is_gso());
        assert_eq!(
            (h.hdr_len, h.gso_size, h.csum_start, h.csum_offset),
            (54, 1440, 20, 16)
        );
        assert_eq!(VnetHeader::parse(&[0; 9]), Err(VnetError::Truncated));
        assert!(!VnetHeader::parse(&PLAIN).unwrap().is_gso());
    }

    #[test]
    fn test_segments_are_valid_tcp_with_right_sequence_and_flags() {
        let frame = superframe(4000, true);
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(segment_count(&hdr, &frame), Ok(3));
        let mut joined = Vec::new();
        for k in 0..3 {
            let mut out = [0u8; 2048];
            let n = tcp4_segment(&hdr, &frame, k, &mut out).unwrap();
            let p = SlicedPacket::from_ip(&out[..n]).unwrap();
            let ip = match p.net.unwrap() {
                etherparse::NetSlice::Ipv4(ip) => ip,
                _ => panic!(),
            };
            assert_eq!(usize::from(ip.header().total_len()), n);
            assert_eq!(
                ip.header().to_header().calc_header_checksum(),
                ip.header().header_checksum()
            );
            let TransportSlice::Tcp(tcp) = p.transport.unwrap() else {
                panic!()
            };
            assert_eq!(tcp.sequence_number(), 1_000_000 + 1400 * k as u32);
            assert_eq!(tcp.fin(), k == 2, "FIN only on the last");
            assert_eq!(tcp.psh(), k == 2, "PSH only on the last");
            let want = tcp
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), want, "segment {k}");
            joined.extend_from_slice(tcp.payload());
        }
        assert_eq!(joined, superframe(4000, true)[40..].to_vec());
        // Past the end, or another kind of superframe: errors, never a panic.
        let mut out = [0u8; 2048];
        assert!(tcp4_segment(&hdr, &frame, 3, &mut out).is_err());
        assert!(tcp4_segment(&hdr, &frame[..30], 0, &mut out).is_err());
        // A UDP superframe header over a TCP frame does not parse as one.
        let udp = VnetHeader { gso_type: 5, ..hdr };
        assert_eq!(segment_count(&udp, &frame), Err(VnetError::BadHeaders));
        let tcp6 = VnetHeader { gso_type: 4, ..hdr };
        assert_eq!(segment_count(&tcp6, &frame), Err(VnetError::Unsupported(4)));
        assert!(tcp4_segment(&hdr, &frame, 0, &mut out[..100]).is_err());
    }

    #[test]
    fn test_finish_partial_checksum() {
        let mut frame = superframe(300, false);
        let tcp_sum_ok = u16::from_be_bytes([frame[36], frame[37]]);
        // What the kernel hands over with CHECKSUM_PARTIAL: the pseudo-header sum, not inverted.
        let pseudo = checksum::fold(checksum::pseudo_header_v4(
            [10, 244, 1, 2].into(),
            [10, 244, 2, 2].into(),
            6,
            (frame.len() - 20) as u16,
        ));
        frame[36..38].copy_from_slice(&pseudo.to_be_bytes());
        finish_checksum(&mut frame, 20, 16).unwrap();
        assert_eq!(u16::from_be_bytes([frame[36], frame[37]]), tcp_sum_ok);
        assert_eq!(
            finish_checksum(&mut frame, 20, 400),
            Err(VnetError::BadChecksumPlace)
        );
    }

    /// Segments of `superframe(payload)` as the wire would carry them (DF set).
    fn segments(payload: usize, mss: u16) -> Vec<Vec<u8>> {
        let mut frame = superframe(payload, false);
        frame[6] = 0x40; // DF
        let hdr = VnetHeader {
            gso_type: GSO_TCPV4,
            gso_size: mss,
            ..Default::default()
        };
        (0..segment_count(&hdr, &frame).unwrap())
            .map(|k| {
                let mut out = vec![0u8; 2048];
                let n = tcp4_segment(&hdr, &frame, k, &mut out).unwrap();
                out.truncate(n);
                out
            })
            .collect()
    }

    #[test]
    fn test_coalesce_in_order_segments_then_resegment_to_the_same_bytes() {
        let segs = segments(6000, 1400);
        let mut c = TcpCoalescer::new();
        for s in &segs {
            assert!(c.push(s));
        }
        let (frame, count) = c.take().unwrap();
        assert_eq!(count, 5);
        let hdr = VnetHeader::parse(frame).unwrap();
        assert_eq!(
            (hdr.gso_type, hdr.gso_size, hdr.flags),
            (GSO_TCPV4, 1400, F_NEEDS_CSUM)
        );
        let mut sf = frame[HEADER_LEN..].to_vec();
        assert_eq!(u16::from_be_bytes([sf[2], sf[3]]) as usize, sf.len());
        // Cut again as the kernel would: the very same segments come out.
        finish_checksum(&mut sf, 20, 16).unwrap();
        for (k, want) in segs.iter().enumerate() {
            let mut out = vec![0u8; 2048];
            let n = tcp4_segment(&hdr, &sf, k, &mut out).unwrap();
            assert_eq!(&out[..n], &want[..], "segment {k}");
        }
        assert!(c.take().is_none());
    }

    #[test]
    fn test_coalescer_refuses_what_linux_gro_would_not_merge() {
        let segs = segments(4200, 1400);
        let mut c = TcpCoalescer::new();
        assert!(c.push(&segs[0]));
        // Out of order.
        assert!(!c.push(&segs[2]));
        // A corrupted segment.
        let mut bad = segs[1].clone();
        bad[60] ^= 0xff;
        assert!(!c.push(&bad));
        // Another flow (port changed, checksum fixed up so only the port differs).
        let mut other = segs[1].clone();
        other[20] ^= 1;
        let fix = checksum::update16(
            u16::from_be_bytes([other[36], other[37]]),
            u16::from_be_bytes([segs[1][20], segs[1][21]]),
            u16::from_be_bytes([other[20], other[21]]),
        );
        other[36..38].copy_from_slice(&fix.to_be_bytes());
        assert!(!c.push(&other));
        assert!(c.push(&segs[1]));
        let (_, n) = c.take().unwrap();
        assert_eq!(n, 2);
        // A lone packet goes out unchanged behind a plain header.
        assert!(c.push(&segs[2]));
        let (frame, n) = c.take().unwrap();
        assert_eq!(
            (n, &frame[..HEADER_LEN], &frame[HEADER_LEN..]),
            (1, &PLAIN[..], &segs[2][..])
        );
        // Not TCP, a SYN, or garbage: never coalesced, never a panic.
        let mut syn = segs[0].clone();
        syn[33] = 0x02;
        assert!(!c.push(&syn));
        assert!(!c.push(&[0x45; 10]));
        assert!(!c.push(&[]));
    }

    /// Arbitrary bytes as header and frame, and arbitrary packets into the coalescer: errors
    /// or refusals, never a panic or an out-of-bounds write.
    #[test]
    fn test_garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good = superframe(3000, true);
        let mut c = TcpCoalescer::new();
        for round in 0..20_000 {
            let len = (next() % 1600) as usize;
            let mut frame: Vec<u8> = if round % 2 == 0 {
                // Mostly a real superframe with a few bytes changed: reaches deeper code.
                let mut f = good.clone();
                f.truncate(len.max(1).min(f.len()));
                for _ in 0..(next() % 4) {
                    let i = (next() as usize) % f.len();
                    f[i] = next() as u8;
                }
                f
            } else {
                (0..len).map(|_| next() as u8).collect()
            };
            let mut hb = [0u8; HEADER_LEN];
            hb.iter_mut().for_each(|b| *b = next() as u8);
            if round % 3 == 0 {
                hb[1] = GSO_TCPV4;
            }
            let hdr = VnetHeader::parse(&hb).unwrap();
            if let Ok(n) = segment_count(&hdr, &frame) {
                let mut out = [0u8; 2048];
                for k in 0..n.min(64) {
                    let _ = tcp4_segment(&hdr, &frame, k, &mut out);
                }
            }
            let _ = finish_checksum(
                &mut frame,
                usize::from(hdr.csum_start),
                usize::from(hdr.csum_offset),
            );
            let _ = c.push(&frame);
            if round % 7 == 0 {
                let _ = c.take();
            }
        }
    }
}
