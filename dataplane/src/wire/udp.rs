//! UDP headers (RFC 768).
//!
//! ```text
//! src port(16) dst port(16) | length(16) checksum(16) | payload ...
//! ```
//! `new_checked` requires `8 <= length <= buffer`. A transmitted checksum of zero means "none"
//! (IPv4); a computed zero is sent as 0xffff.

use super::checksum;
use super::{read_u16, write_u16, Error, Result};
use core::net::Ipv4Addr;

/// Length of a UDP header.
pub const HEADER_LEN: usize = 8;
const PROTO_UDP: u8 = 17;

/// A view of a UDP datagram.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let len = usize::from(read_u16(b, 4));
        if len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len > b.len() {
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
    pub fn len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 4)
    }
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) == HEADER_LEN
    }
    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 6)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }
    /// True if the checksum is absent (zero) or correct for this pseudo-header.
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let segment = &self.buffer.as_ref()[..usize::from(self.len())];
        checksum::l4_sum_v4(src, dst, PROTO_UDP, segment) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_src_port(&mut self, v: u16) {
        write_u16(self.buffer.as_mut(), 0, v);
    }
    pub fn set_dst_port(&mut self, v: u16) {
        write_u16(self.buffer.as_mut(), 2, v);
    }
    pub fn set_len(&mut self, v: u16) {
        write_u16(self.buffer.as_mut(), 4, v);
    }
    pub fn set_checksum(&mut self, v: u16) {
        write_u16(self.buffer.as_mut(), 6, v);
    }
    /// Computes the checksum over pseudo-header, header and payload (zero result sent as 0xffff).
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let segment = &self.buffer.as_ref()[..usize::from(self.len())];
        let c = !checksum::l4_sum_v4(src, dst, PROTO_UDP, segment);
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

/// The fields of a UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload_len: usize,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Repr {
        Repr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            payload_len: p.payload().len(),
        }
    }

    /// Writes the header into `buf` (header + payload already in place), with the checksum over
    /// the payload that follows.
    pub fn emit(&self, buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) {
        let mut p = Packet::new_unchecked(buf);
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_len((HEADER_LEN + self.payload_len) as u16);
        p.fill_checksum(src, dst);
    }

    /// Writes the header into `header`, which is not followed by its `payload` in memory (a
    /// header built apart and sent in front of the payload), with the checksum over both.
    pub fn emit_detached(
        &self,
        header: &mut [u8; HEADER_LEN],
        payload: &[u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) {
        self.emit_unchecked(header);
        let len = (HEADER_LEN + payload.len()) as u16;
        let acc = checksum::pseudo_header_v4(src, dst, PROTO_UDP, len);
        let acc = checksum::accumulate(checksum::accumulate(acc, header), payload);
        let c = !checksum::fold(acc);
        header[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    }

    /// Writes the header with checksum 0 ("none", allowed over IPv4): for headers that only
    /// carry the ports and length to a socket that writes its own (the kernel's UDP send).
    pub fn emit_unchecked(&self, buf: &mut [u8]) {
        let mut p = Packet::new_unchecked(buf);
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_len((HEADER_LEN + self.payload_len) as u16);
        p.buffer[6..8].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

    fn reference() -> Vec<u8> {
        let mut out = Vec::new();
        etherparse::UdpHeader::with_ipv4_checksum(
            8285,
            8285,
            &etherparse::Ipv4Header::new(
                5,
                64,
                etherparse::IpNumber::UDP,
                SRC.octets(),
                DST.octets(),
            )
            .unwrap(),
            b"hello",
        )
        .unwrap()
        .write(&mut out)
        .unwrap();
        out.extend_from_slice(b"hello");
        out
    }

    #[test]
    fn test_parse() {
        let buf = reference();
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.src_port(), 8285);
        assert_eq!(p.dst_port(), 8285);
        assert_eq!(p.len(), 13);
        assert_eq!(p.payload(), b"hello");
        assert!(p.verify_checksum(SRC, DST));
        assert!(!p.verify_checksum(SRC, Ipv4Addr::new(192, 168, 1, 3)));
    }

    #[test]
    fn test_emit_matches_etherparse() {
        let want = reference();
        let mut buf = vec![0u8; 13];
        buf[8..].copy_from_slice(b"hello");
        Repr {
            src_port: 8285,
            dst_port: 8285,
            payload_len: 5,
        }
        .emit(&mut buf, SRC, DST);
        assert_eq!(buf, want);
    }

    #[test]
    fn test_detached_header_matches_etherparse() {
        let want = reference();
        for payload in [&b"hello"[..], b"", b"odd", b"four"] {
            let mut header = [0u8; HEADER_LEN];
            Repr {
                src_port: 8285,
                dst_port: 8285,
                payload_len: payload.len(),
            }
            .emit_detached(&mut header, payload, SRC, DST);
            let mut whole = header.to_vec();
            whole.extend_from_slice(payload);
            assert!(Packet::new_checked(&whole[..])
                .unwrap()
                .verify_checksum(SRC, DST));
            if payload == b"hello" {
                assert_eq!(whole, want);
            }
        }
    }

    #[test]
    fn test_zero_checksum_accepted() {
        let mut buf = reference();
        buf[6] = 0;
        buf[7] = 0;
        assert!(Packet::new_checked(&buf[..])
            .unwrap()
            .verify_checksum(SRC, DST));
    }

    #[test]
    fn test_impossible_len() {
        let buf = reference();
        assert_eq!(
            Packet::new_checked(&buf[..7]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Packet::new_checked(&buf[..12]).unwrap_err(),
            Error::Truncated
        );
        let mut bad = buf.clone();
        bad[5] = 7;
        assert_eq!(Packet::new_checked(&bad[..]).unwrap_err(), Error::Malformed);
    }
}
