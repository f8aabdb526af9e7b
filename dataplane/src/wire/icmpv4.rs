//! ICMPv4 messages (RFC 792): echo, destination unreachable, time exceeded.
//!
//! ```text
//! type(8) code(8) checksum(16) | rest of header(32): id+seq for echo, unused for errors | data
//! ```
//! Error messages carry the offending packet's IP header and at least its first 8 payload bytes.

use super::checksum;
use super::{read_u16, write_u16, Error, Result};

/// Length of the ICMP header (type, code, checksum, rest of header).
pub const HEADER_LEN: usize = 8;

/// ICMP type values.
pub mod kind {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const REDIRECT: u8 = 5;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
}

/// Destination-unreachable codes.
pub mod unreachable {
    pub const NET: u8 = 0;
    pub const HOST: u8 = 1;
    pub const PORT: u8 = 3;
    pub const FRAG_NEEDED: u8 = 4;
}

/// True for the ICMP types that report an error about another packet; no ICMP error may be sent
/// in response to one of these (RFC 1122 3.2.2).
pub fn is_error(kind: u8) -> bool {
    matches!(
        kind,
        kind::DEST_UNREACHABLE | kind::REDIRECT | kind::TIME_EXCEEDED | kind::PARAMETER_PROBLEM | 4
    )
}

/// A view of an ICMPv4 message; the whole buffer is the message.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    pub fn new_checked(buffer: T) -> Result<Self> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn kind(&self) -> u8 {
        self.buffer.as_ref()[0]
    }
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[1]
    }
    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 2)
    }
    /// Echo identifier (bytes 4..6).
    pub fn echo_ident(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 4)
    }
    /// Echo sequence number (bytes 6..8).
    pub fn echo_seq(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 6)
    }
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
    pub fn verify_checksum(&self) -> bool {
        checksum::sum(self.buffer.as_ref()) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_kind(&mut self, v: u8) {
        self.buffer.as_mut()[0] = v;
    }
    pub fn set_code(&mut self, v: u8) {
        self.buffer.as_mut()[1] = v;
    }
    /// Sets the 4 "rest of header" bytes (echo id/seq, or zero for errors).
    pub fn set_rest(&mut self, ident: u16, seq: u16) {
        let b = self.buffer.as_mut();
        write_u16(b, 4, ident);
        write_u16(b, 6, seq);
    }
    pub fn fill_checksum(&mut self) {
        write_u16(self.buffer.as_mut(), 2, 0);
        let c = checksum::checksum(self.buffer.as_ref());
        write_u16(self.buffer.as_mut(), 2, c);
    }
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_echo_round_trip_matches_etherparse() {
        let mut buf = [0u8; 12];
        let mut p = Packet::new_unchecked(&mut buf[..]);
        p.set_kind(kind::ECHO_REQUEST);
        p.set_code(0);
        p.set_rest(0x1234, 7);
        p.data_mut().copy_from_slice(b"ping");
        p.fill_checksum();
        let theirs = etherparse::Icmpv4Header::with_checksum(
            etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 0x1234, seq: 7 }),
            b"ping",
        );
        assert_eq!(&buf[..8], &theirs.to_bytes()[..]);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(
            (p.kind(), p.code(), p.echo_ident(), p.echo_seq()),
            (8, 0, 0x1234, 7)
        );
        assert_eq!(p.data(), b"ping");
    }

    #[test]
    fn test_error_kinds() {
        assert!(is_error(kind::DEST_UNREACHABLE));
        assert!(is_error(kind::TIME_EXCEEDED));
        assert!(!is_error(kind::ECHO_REQUEST));
        assert!(!is_error(kind::ECHO_REPLY));
    }

    #[test]
    fn test_impossible_len() {
        assert_eq!(
            Packet::new_checked(&[0u8; 7][..]).unwrap_err(),
            Error::Truncated
        );
    }
}
