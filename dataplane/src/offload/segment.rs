//! The send half of the offload, as a NIC does it for the kernel: finishing a partial checksum
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), and cutting a TCP superframe (TSO) or a UDP one (USO, a
//! sender's `UDP_SEGMENT`) into the segments its virtio-net header asks for.

use crate::wire::checksum;
use crate::wire::vnet::*;

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
