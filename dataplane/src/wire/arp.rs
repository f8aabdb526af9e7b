//! ARP for IPv4 over Ethernet (RFC 826), the only kind a pod network carries.
//!
//! ```text
//! htype(2)=1 ptype(2)=0x0800 hlen(1)=6 plen(1)=4 oper(2)
//! sha(6) spa(4) tha(6) tpa(4)                                  28 bytes
//! ```

use super::{read_u16, write_u16, Error, Field, MacAddr, Result};
use core::net::Ipv4Addr;

mod field {
    use super::Field;
    pub const HTYPE: usize = 0;
    pub const PTYPE: usize = 2;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: usize = 6;
    pub const SHA: Field = 8..14;
    pub const SPA: Field = 14..18;
    pub const THA: Field = 18..24;
    pub const TPA: Field = 24..28;
}

/// Length of an Ethernet/IPv4 ARP packet.
pub const HEADER_LEN: usize = 28;

/// ARP operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Request,
    Reply,
    Unknown(u16),
}

impl From<u16> for Operation {
    fn from(v: u16) -> Self {
        match v {
            1 => Self::Request,
            2 => Self::Reply,
            o => Self::Unknown(o),
        }
    }
}

impl From<Operation> for u16 {
    fn from(v: Operation) -> Self {
        match v {
            Operation::Request => 1,
            Operation::Reply => 2,
            Operation::Unknown(o) => o,
        }
    }
}

/// A view of an ARP packet.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn mac_at(buf: &[u8], f: Field) -> MacAddr {
    let mut m = [0; 6];
    m.copy_from_slice(&buf[f]);
    MacAddr(m)
}

fn ip_at(buf: &[u8], f: Field) -> Ipv4Addr {
    let mut a = [0; 4];
    a.copy_from_slice(&buf[f]);
    Ipv4Addr::from(a)
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Checks the length and that this is Ethernet/IPv4 ARP (htype 1, ptype 0x0800, 6/4).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if read_u16(b, field::HTYPE) != 1
            || read_u16(b, field::PTYPE) != 0x0800
            || b[field::HLEN] != 6
            || b[field::PLEN] != 4
        {
            return Err(Error::Malformed);
        }
        Ok(Packet { buffer })
    }

    pub fn operation(&self) -> Operation {
        read_u16(self.buffer.as_ref(), field::OPER).into()
    }
    pub fn sender_mac(&self) -> MacAddr {
        mac_at(self.buffer.as_ref(), field::SHA)
    }
    pub fn sender_ip(&self) -> Ipv4Addr {
        ip_at(self.buffer.as_ref(), field::SPA)
    }
    pub fn target_mac(&self) -> MacAddr {
        mac_at(self.buffer.as_ref(), field::THA)
    }
    pub fn target_ip(&self) -> Ipv4Addr {
        ip_at(self.buffer.as_ref(), field::TPA)
    }
}

/// The fields of an Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub operation: Operation,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_mac: MacAddr,
    pub target_ip: Ipv4Addr,
}

impl Repr {
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Repr {
        Repr {
            operation: p.operation(),
            sender_mac: p.sender_mac(),
            sender_ip: p.sender_ip(),
            target_mac: p.target_mac(),
            target_ip: p.target_ip(),
        }
    }

    /// Writes the packet into `buf`, which must be at least `HEADER_LEN` long.
    pub fn emit(&self, buf: &mut [u8]) {
        write_u16(buf, field::HTYPE, 1);
        write_u16(buf, field::PTYPE, 0x0800);
        buf[field::HLEN] = 6;
        buf[field::PLEN] = 4;
        write_u16(buf, field::OPER, self.operation.into());
        buf[field::SHA].copy_from_slice(&self.sender_mac.0);
        buf[field::SPA].copy_from_slice(&self.sender_ip.octets());
        buf[field::THA].copy_from_slice(&self.target_mac.0);
        buf[field::TPA].copy_from_slice(&self.target_ip.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Who has 10.244.1.1? Tell 10.244.1.2 (captured layout).
    static REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x02, 0x42, 0x0a, 0xf4, 0x01, 0x02, 10,
        244, 1, 2, 0, 0, 0, 0, 0, 0, 10, 244, 1, 1,
    ];

    #[test]
    fn test_parse() {
        let p = Packet::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(p.operation(), Operation::Request);
        assert_eq!(
            p.sender_mac(),
            MacAddr([0x02, 0x42, 0x0a, 0xf4, 0x01, 0x02])
        );
        assert_eq!(p.sender_ip(), Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(p.target_mac(), MacAddr::ZERO);
        assert_eq!(p.target_ip(), Ipv4Addr::new(10, 244, 1, 1));
    }

    #[test]
    fn test_emit_round_trip() {
        let repr = Repr::parse(&Packet::new_checked(&REQUEST[..]).unwrap());
        let mut buf = [0u8; 28];
        repr.emit(&mut buf);
        assert_eq!(buf, REQUEST);
    }

    #[test]
    fn test_impossible_len_and_kind() {
        assert_eq!(
            Packet::new_checked(&REQUEST[..27]).unwrap_err(),
            Error::Truncated
        );
        let mut ipv6ish = REQUEST;
        ipv6ish[5] = 16;
        assert_eq!(
            Packet::new_checked(&ipv6ish[..]).unwrap_err(),
            Error::Malformed
        );
    }

    /// etherparse's ARP for Ethernet/IPv4, independent of this module.
    fn reference(oper: etherparse::ArpOperation) -> Vec<u8> {
        etherparse::ArpPacket::new(
            etherparse::ArpHardwareId::ETHERNET,
            etherparse::EtherType::IPV4,
            oper,
            &[0x02, 0x42, 0x0a, 0xf4, 0x01, 0x02],
            &[10, 244, 1, 2],
            &[0x0e, 0x70, 0xc0, 0xa8, 0x63, 0x0b],
            &[10, 244, 1, 1],
        )
        .unwrap()
        .to_bytes()
        .to_vec()
    }

    #[test]
    fn test_round_trip_against_etherparse() {
        for (oper, ours) in [
            (etherparse::ArpOperation::REQUEST, Operation::Request),
            (etherparse::ArpOperation::REPLY, Operation::Reply),
            (etherparse::ArpOperation(9), Operation::Unknown(9)),
        ] {
            let want = reference(oper);
            // etherparse's bytes parse to the fields etherparse was given...
            let repr = Repr::parse(&Packet::new_checked(&want[..]).unwrap());
            assert_eq!(
                repr,
                Repr {
                    operation: ours,
                    sender_mac: MacAddr([0x02, 0x42, 0x0a, 0xf4, 0x01, 0x02]),
                    sender_ip: Ipv4Addr::new(10, 244, 1, 2),
                    target_mac: MacAddr([0x0e, 0x70, 0xc0, 0xa8, 0x63, 0x0b]),
                    target_ip: Ipv4Addr::new(10, 244, 1, 1),
                }
            );
            // ...and what we emit is etherparse's packet byte for byte, which it reads back.
            let mut buf = [0u8; HEADER_LEN];
            repr.emit(&mut buf);
            assert_eq!(&buf[..], &want[..]);
            let back = etherparse::ArpPacket::from_slice(&buf)
                .unwrap()
                .try_eth_ipv4()
                .unwrap();
            assert_eq!(back.operation, oper);
            assert_eq!(back.sender_ipv4, [10, 244, 1, 2]);
            assert_eq!(back.target_mac, [0x0e, 0x70, 0xc0, 0xa8, 0x63, 0x0b]);
        }
    }
}
