//! TCP headers (RFC 9293): the fields a forwarder and connection tracker read and rewrite.
//!
//! ```text
//! src port(16) dst port(16) | seq(32) | ack(32) | off(4) rsv(4) flags(8) window(16)
//! checksum(16) urgent(16) | options ...
//! ```

use super::checksum;
use super::{read_u16, read_u32, write_u16, write_u32, Error, Result};
use core::net::Ipv4Addr;

/// Length of a header without options.
pub const HEADER_LEN: usize = 20;
const PROTO_TCP: u8 = 6;

/// TCP flag bits.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// A view of a TCP segment.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Checks that the data offset is at least 5 words and fits the buffer.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let header_len = usize::from(b[12] >> 4) * 4;
        if header_len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if header_len > b.len() {
            return Err(Error::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn src_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 0)
    }
    pub fn dst_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 2)
    }
    pub fn seq(&self) -> u32 {
        read_u32(self.buffer.as_ref(), 4)
    }
    pub fn ack(&self) -> u32 {
        read_u32(self.buffer.as_ref(), 8)
    }
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[12] >> 4) * 4
    }
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[13]
    }
    pub fn window(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 14)
    }
    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 16)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
    /// Checks the checksum; the whole buffer is the segment (header + payload).
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        checksum::l4_sum_v4(src, dst, PROTO_TCP, self.buffer.as_ref()) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_src_port(&mut self, v: u16) {
        write_u16(self.buffer.as_mut(), 0, v);
    }
    pub fn set_dst_port(&mut self, v: u16) {
        write_u16(self.buffer.as_mut(), 2, v);
    }
    pub fn set_checksum(&mut self, v: u16) {
        write_u16(self.buffer.as_mut(), 16, v);
    }
    /// Computes the checksum over pseudo-header and the whole buffer.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let c = !checksum::l4_sum_v4(src, dst, PROTO_TCP, self.buffer.as_ref());
        self.set_checksum(c);
    }
}

/// Writes into `buf` (at least [`HEADER_LEN`] bytes) the RST a host sends for a segment of a
/// connection it does not have (RFC 9293 3.10.7.1): from the segment's destination port to its
/// source port, `<SEQ=SEG.ACK><CTL=RST>`, no options, no payload, checksummed for `src` ->
/// `dst` (the addresses of the RST). Returns its length.
pub fn emit_reset(buf: &mut [u8], src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seq: u32) -> usize {
    emit_reset_with(buf, src, dst, seq, None)
}

/// [`emit_reset`] with the ACK flag and `ack`: what a TCP in SYN-SENT accepts (RFC 9293
/// 3.10.7.3: an RST there counts only if it acknowledges the SYN).
pub fn emit_reset_ack(
    buf: &mut [u8],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
) -> usize {
    emit_reset_with(buf, src, dst, seq, Some(ack))
}

fn emit_reset_with(
    buf: &mut [u8],
    (src, src_port): (Ipv4Addr, u16),
    (dst, dst_port): (Ipv4Addr, u16),
    seq: u32,
    ack: Option<u32>,
) -> usize {
    let seg = &mut buf[..HEADER_LEN];
    seg.fill(0);
    write_u16(seg, 0, src_port);
    write_u16(seg, 2, dst_port);
    write_u32(seg, 4, seq);
    seg[12] = (HEADER_LEN as u8 / 4) << 4;
    seg[13] = flags::RST;
    if let Some(ack) = ack {
        write_u32(seg, 8, ack);
        seg[13] |= flags::ACK;
    }
    Packet::new_unchecked(&mut *seg).fill_checksum(src, dst);
    HEADER_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);

    fn syn() -> Vec<u8> {
        let ip = etherparse::Ipv4Header::new(
            0,
            64,
            etherparse::IpNumber::TCP,
            SRC.octets(),
            DST.octets(),
        )
        .unwrap();
        let mut tcp = etherparse::TcpHeader::new(40000, 80, 0x01020304, 64240);
        tcp.syn = true;
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, b"xy").unwrap();
        let mut out = tcp.to_bytes().to_vec();
        out.extend_from_slice(b"xy");
        out
    }

    #[test]
    fn test_parse() {
        let buf = syn();
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.src_port(), 40000);
        assert_eq!(p.dst_port(), 80);
        assert_eq!(p.seq(), 0x01020304);
        assert_eq!(p.ack(), 0);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.flags(), flags::SYN);
        assert_eq!(p.window(), 64240);
        assert_eq!(p.payload(), b"xy");
        assert!(p.verify_checksum(SRC, DST));
    }

    #[test]
    fn test_fill_checksum_matches_etherparse() {
        let want = syn();
        let mut buf = want.clone();
        let mut p = Packet::new_checked(&mut buf[..]).unwrap();
        p.set_checksum(0x1234);
        p.fill_checksum(SRC, DST);
        assert_eq!(buf, want);
    }

    #[test]
    fn test_impossible_len() {
        let buf = syn();
        assert_eq!(
            Packet::new_checked(&buf[..19]).unwrap_err(),
            Error::Truncated
        );
        let mut bad = buf.clone();
        bad[12] = 0x40;
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
        bad[12] = 0xf0; // 60 bytes of header in a 22-byte buffer
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn test_a_reset_is_what_etherparse_reads_as_one() {
        let mut buf = [0xaau8; 24];
        let n = emit_reset(&mut buf, (DST, 80), (SRC, 40000), 0x0a0b_0c0d);
        assert_eq!(n, HEADER_LEN);
        let h = etherparse::TcpHeader::from_slice(&buf[..n]).unwrap().0;
        assert_eq!((h.source_port, h.destination_port), (80, 40000));
        assert_eq!(
            (h.sequence_number, h.acknowledgment_number),
            (0x0a0b_0c0d, 0)
        );
        assert!(h.rst && !h.ack && !h.syn && !h.fin && !h.psh && h.options.is_empty());
        let ip = etherparse::Ipv4Header::new(
            20,
            64,
            etherparse::IpNumber::TCP,
            DST.octets(),
            SRC.octets(),
        )
        .unwrap();
        assert_eq!(h.calc_checksum_ipv4(&ip, &[]).unwrap(), h.checksum);
        assert_eq!(buf[n..], [0xaa; 4], "nothing past the header");
    }
}
