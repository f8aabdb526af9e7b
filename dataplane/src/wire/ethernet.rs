//! Ethernet II frames (no FCS) and MAC addresses.
//!
//! ```text
//!  0                   6                  12       14
//! +-------------------+-------------------+--------+-------------
//! | destination MAC   | source MAC        | type   | payload ...
//! +-------------------+-------------------+--------+-------------
//! ```

use super::{read_u16, write_u16, Error, Field, Result};
use core::fmt;
use core::str::FromStr;

mod field {
    use super::Field;
    pub const DST: Field = 0..6;
    pub const SRC: Field = 6..12;
    pub const ETHERTYPE: usize = 12;
}

/// Length of an Ethernet II header.
pub const HEADER_LEN: usize = 14;

/// EtherType values we act on.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const IPV6: u16 = 0x86dd;
}

/// A 48-bit MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// True for group (multicast and broadcast) addresses: the I/G bit.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// True for a unicast, locally administered address (what flannel generates for VTEPs).
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0x03 == 0x02
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A MAC address string that is not six colon-separated hex octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address (want six colon-separated hex octets)")]
pub struct ParseMacError;

impl FromStr for MacAddr {
    type Err = ParseMacError;
    fn from_str(s: &str) -> core::result::Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or(ParseMacError)?;
            if part.is_empty() || part.len() > 2 {
                return Err(ParseMacError);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ParseMacError)?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError);
        }
        Ok(MacAddr(out))
    }
}

/// A view of an Ethernet II frame.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors may panic if it is shorter than `HEADER_LEN`.
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps a buffer after checking it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn dst(&self) -> MacAddr {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        MacAddr(m)
    }

    pub fn src(&self) -> MacAddr {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        MacAddr(m)
    }

    pub fn ethertype(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::ETHERTYPE)
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_dst(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&mac.0);
    }

    pub fn set_src(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&mac.0);
    }

    pub fn set_ethertype(&mut self, value: u16) {
        write_u16(self.buffer.as_mut(), field::ETHERTYPE, value);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

/// The fields of an Ethernet II header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub dst: MacAddr,
    pub src: MacAddr,
    pub ethertype: u16,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Repr {
        Repr {
            dst: packet.dst(),
            src: packet.src(),
            ethertype: packet.ethertype(),
        }
    }

    /// Writes the header; `packet` must be at least `HEADER_LEN` long.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        packet.set_dst(self.dst);
        packet.set_src(self.src);
        packet.set_ethertype(self.ethertype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static FRAME: [u8; 18] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0xaa,
        0xbb, 0xcc, 0xdd,
    ];

    #[test]
    fn test_parse() {
        let p = Packet::new_checked(&FRAME[..]).unwrap();
        assert_eq!(p.dst(), MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(p.src(), MacAddr([2, 0, 0, 0, 0, 2]));
        assert_eq!(p.ethertype(), ethertype::IPV4);
        assert_eq!(p.payload(), &[0xaa, 0xbb, 0xcc, 0xdd]);
    }

    #[test]
    fn test_emit_round_trip() {
        let repr = Repr::parse(&Packet::new_checked(&FRAME[..]).unwrap());
        let mut buf = [0u8; 18];
        buf[14..].copy_from_slice(&FRAME[14..]);
        repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
        assert_eq!(buf, FRAME);
    }

    #[test]
    fn test_impossible_len() {
        assert_eq!(
            Packet::new_checked(&FRAME[..13]).unwrap_err(),
            Error::Truncated
        );
    }

    #[test]
    fn test_mac_parse_display() {
        let m: MacAddr = "c6:d2:32:6f:8f:44".parse().unwrap();
        assert_eq!(m.to_string(), "c6:d2:32:6f:8f:44");
        assert!(m.is_local_unicast());
        assert!(!m.is_multicast());
        assert!(MacAddr::BROADCAST.is_multicast());
        for bad in [
            "",
            "c6:d2:32:6f:8f",
            "c6:d2:32:6f:8f:44:00",
            "c6:d2:32:6f:8f:4g",
            "c6::32:6f:8f:44",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn test_round_trip_against_etherparse() {
        for (ethertype, theirs) in [
            (ethertype::IPV4, etherparse::EtherType::IPV4),
            (ethertype::ARP, etherparse::EtherType::ARP),
            (ethertype::IPV6, etherparse::EtherType::IPV6),
            (0x8100, etherparse::EtherType::VLAN_TAGGED_FRAME),
        ] {
            let header = etherparse::Ethernet2Header {
                source: [0x0e, 0x70, 0xc0, 0xa8, 0x63, 0x0b],
                destination: [0xff; 6],
                ether_type: theirs,
            };
            let mut want = header.to_bytes().to_vec();
            want.extend_from_slice(b"payload");
            let p = Packet::new_checked(&want[..]).unwrap();
            let repr = Repr::parse(&p);
            assert_eq!(
                repr,
                Repr {
                    dst: MacAddr::BROADCAST,
                    src: MacAddr([0x0e, 0x70, 0xc0, 0xa8, 0x63, 0x0b]),
                    ethertype,
                }
            );
            assert_eq!(p.payload(), b"payload");
            let mut buf = vec![0u8; want.len()];
            buf[HEADER_LEN..].copy_from_slice(b"payload");
            repr.emit(&mut Packet::new_unchecked(&mut buf[..]));
            assert_eq!(buf, want);
            let (back, rest) = etherparse::Ethernet2Header::from_slice(&buf).unwrap();
            assert_eq!(back, header);
            assert_eq!(rest, b"payload");
        }
    }
}
