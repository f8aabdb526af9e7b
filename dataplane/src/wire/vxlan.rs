//! VXLAN headers (RFC 7348). No crate we use has this type.
//!
//! ```text
//!  0               1               2               3
//! +-+-+-+-+-+-+-+-+-----------------------------------------------+
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! +---------------------------------------------------------------+
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! +---------------------------------------------------------------+
//! ```
//! The Linux receive path (`vxlan_rcv`) drops a header whose I flag is clear or that has any
//! other flag or reserved bit set (without GBP/GPE/RCO extensions); `Packet::check_strict` makes
//! the same checks.

use super::{read_u32, write_u32, Error, Result};

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag: a valid VNI is present.
pub const FLAG_I: u8 = 0x08;

/// A 24-bit VXLAN network identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vni(u32);

impl Vni {
    pub const MAX: u32 = (1 << 24) - 1;

    /// Returns `None` if `value` does not fit 24 bits.
    pub const fn new(value: u32) -> Option<Vni> {
        if value <= Self::MAX {
            Some(Vni(value))
        } else {
            None
        }
    }

    pub const fn get(self) -> u32 {
        self.0
    }
}

impl core::fmt::Display for Vni {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a VXLAN header is not one the kernel would accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("I flag not set")]
    NoVniFlag,
    #[error("flag or reserved bits set besides I")]
    ReservedBits,
}

/// A view of a VXLAN header followed by the inner Ethernet frame.
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

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[0]
    }
    pub fn vni(&self) -> Vni {
        Vni(read_u32(self.buffer.as_ref(), 4) >> 8)
    }
    /// The kernel's acceptance rule: exactly the I flag, every reserved bit zero.
    pub fn check_strict(&self) -> core::result::Result<(), HeaderError> {
        let b = self.buffer.as_ref();
        if b[0] & FLAG_I == 0 {
            return Err(HeaderError::NoVniFlag);
        }
        if b[0] != FLAG_I || b[1] != 0 || b[2] != 0 || b[3] != 0 || b[7] != 0 {
            return Err(HeaderError::ReservedBits);
        }
        Ok(())
    }
    /// The inner Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

/// The fields of a VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub vni: Vni,
}

impl Repr {
    /// Parses a header that passed `check_strict`.
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Repr {
        Repr { vni: p.vni() }
    }

    /// Writes flags 0x08, the VNI and zero reserved bits into `buf` (at least `HEADER_LEN`).
    pub fn emit(&self, buf: &mut [u8]) {
        write_u32(buf, 0, u32::from(FLAG_I) << 24);
        write_u32(buf, 4, self.vni.0 << 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The header the kernel sends for VNI 1 (flannel's default).
    static HEADER_VNI1: [u8; 8] = [0x08, 0, 0, 0, 0, 0, 0x01, 0];

    #[test]
    fn test_parse() {
        let p = Packet::new_checked(&HEADER_VNI1[..]).unwrap();
        assert_eq!(p.flags(), FLAG_I);
        assert_eq!(p.vni(), Vni::new(1).unwrap());
        assert_eq!(p.check_strict(), Ok(()));
    }

    #[test]
    fn test_emit_round_trip() {
        let mut buf = [0xffu8; 8];
        Repr {
            vni: Vni::new(0xabcdef).unwrap(),
        }
        .emit(&mut buf);
        assert_eq!(buf, [0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]);
        assert_eq!(
            Repr::parse(&Packet::new_checked(&buf[..]).unwrap())
                .vni
                .get(),
            0xabcdef
        );
    }

    #[test]
    fn test_strict_rejects_what_the_kernel_rejects() {
        let mut no_i = HEADER_VNI1;
        no_i[0] = 0;
        assert_eq!(
            Packet::new_unchecked(&no_i[..]).check_strict(),
            Err(HeaderError::NoVniFlag)
        );
        for (byte, value) in [(0, 0x88), (1, 1), (2, 0x80), (3, 1), (7, 1)] {
            let mut bad = HEADER_VNI1;
            bad[byte] = value;
            assert_eq!(
                Packet::new_unchecked(&bad[..]).check_strict(),
                Err(HeaderError::ReservedBits),
                "byte {byte}"
            );
        }
    }

    #[test]
    fn test_vni_bounds() {
        assert!(Vni::new(Vni::MAX).is_some());
        assert!(Vni::new(Vni::MAX + 1).is_none());
    }

    #[test]
    fn test_impossible_len() {
        assert_eq!(
            Packet::new_checked(&HEADER_VNI1[..7]).unwrap_err(),
            Error::Truncated
        );
    }
}
