//! IPv6 fixed headers (RFC 8200), parse only: podwire carries IPv4 pods today and must recognise
//! and count what it does not forward.
//!
//! ```text
//! ver(4) tclass(8) flow(20) | payload len(16) next hdr(8) hop limit(8) | src(128) | dst(128)
//! ```

use super::{read_u16, Error, IpProtocol, Result};
use core::net::Ipv6Addr;

/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;

/// A view of an IPv6 packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Checks version 6 and that the payload length fits the buffer.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(Error::Malformed);
        }
        if b.len() < HEADER_LEN + usize::from(read_u16(b, 4)) {
            return Err(Error::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn traffic_class(&self) -> u8 {
        let b = self.buffer.as_ref();
        (b[0] << 4) | (b[1] >> 4)
    }
    pub fn flow_label(&self) -> u32 {
        let b = self.buffer.as_ref();
        (u32::from(b[1] & 0x0f) << 16) | (u32::from(b[2]) << 8) | u32::from(b[3])
    }
    pub fn payload_len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), 4)
    }
    pub fn next_header(&self) -> IpProtocol {
        self.buffer.as_ref()[6].into()
    }
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[7]
    }
    pub fn src(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[8..24]);
        Ipv6Addr::from(a)
    }
    pub fn dst(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[24..40]);
        Ipv6Addr::from(a)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + usize::from(self.payload_len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router_solicitation() -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = 0x60;
        b[1] = 0x0a; // traffic class 0x00, flow label 0xa0000 | ...
        b[2] = 0xbc;
        b[3] = 0xde;
        b[5] = 8;
        b[6] = 58;
        b[7] = 255;
        b[8] = 0xfe;
        b[9] = 0x80;
        b[23] = 1;
        b[24] = 0xff;
        b[25] = 0x02;
        b[39] = 2;
        b[40] = 133;
        b
    }

    #[test]
    fn test_parse() {
        let buf = router_solicitation();
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.traffic_class(), 0);
        assert_eq!(p.flow_label(), 0xabcde);
        assert_eq!(p.payload_len(), 8);
        assert_eq!(p.next_header(), IpProtocol::Icmpv6);
        assert_eq!(p.hop_limit(), 255);
        assert_eq!(p.src(), "fe80::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst(), "ff02::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload()[0], 133);
    }

    #[test]
    fn test_impossible_len() {
        let buf = router_solicitation();
        assert_eq!(
            Packet::new_checked(&buf[..39]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Packet::new_checked(&buf[..47]).unwrap_err(),
            Error::Truncated
        );
        let mut v4 = buf;
        v4[0] = 0x45;
        assert_eq!(Packet::new_checked(&v4[..]).unwrap_err(), Error::Malformed);
    }

    /// ipv6.rs parses only (podwire forwards no IPv6): etherparse writes the header, and every
    /// field must read back as etherparse wrote it.
    #[test]
    fn test_parse_against_etherparse() {
        for (tclass, flow, next, ours) in [
            (
                0x00,
                0x0_0000,
                etherparse::IpNumber::IPV6_ICMP,
                IpProtocol::Icmpv6,
            ),
            (0xb8, 0xf_ffff, etherparse::IpNumber::TCP, IpProtocol::Tcp),
            (0x01, 0x1_2345, etherparse::IpNumber::UDP, IpProtocol::Udp),
            (
                0x22,
                0x0_0001,
                etherparse::IpNumber(43),
                IpProtocol::Unknown(43),
            ),
        ] {
            let (src, dst): (Ipv6Addr, Ipv6Addr) = (
                "fd00::1:2".parse().unwrap(),
                "ff02::1:ff00:2".parse().unwrap(),
            );
            let header = etherparse::Ipv6Header {
                traffic_class: tclass,
                flow_label: etherparse::Ipv6FlowLabel::try_new(flow).unwrap(),
                payload_length: 5,
                next_header: next,
                hop_limit: 64,
                source: src.octets(),
                destination: dst.octets(),
            };
            let mut buf = header.to_bytes().to_vec();
            buf.extend_from_slice(b"hello");
            let p = Packet::new_checked(&buf[..]).unwrap();
            assert_eq!(p.traffic_class(), tclass);
            assert_eq!(p.flow_label(), flow);
            assert_eq!(p.payload_len(), 5);
            assert_eq!(p.next_header(), ours);
            assert_eq!(p.hop_limit(), 64);
            assert_eq!((p.src(), p.dst()), (src, dst));
            assert_eq!(p.payload(), b"hello");
            // A payload length beyond the buffer is what etherparse calls a length error too.
            let mut short = buf.clone();
            short.truncate(HEADER_LEN + 4);
            assert_eq!(
                Packet::new_checked(&short[..]).unwrap_err(),
                Error::Truncated
            );
            assert!(etherparse::Ipv6Slice::from_slice(&short).is_err());
        }
    }
}
