//! Wire formats: zero-copy views over packet bytes, one file per header.
//!
//! Every header follows the same pattern (after smoltcp):
//! - `Packet<T: AsRef<[u8]>>` wraps a buffer; getters need only `AsRef<[u8]>`, setters need
//!   `AsMut<[u8]>` too, so one type serves `&[u8]`, `&mut [u8]` and owned buffers.
//! - `Packet::new_checked(buf)` validates the lengths a header claims against the buffer. **Untrusted
//!   input must go through `new_checked`**: after it returns `Ok`, no accessor panics.
//!   `new_unchecked` is for buffers we are about to fill ourselves (emitting).
//! - A `Repr` is the parsed, owned form of the fields we act on; `Repr::emit` writes a header into a
//!   buffer at least `HEADER_LEN` long (or `buffer_len()` for variable headers).
//!
//! Errors are one `Copy` enum so the hot path never allocates on bad input.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmpv4;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;
pub mod vnet;
pub mod vxlan;

pub use ethernet::MacAddr;

/// A byte range of a header field.
pub(crate) type Field = core::ops::Range<usize>;

/// Why a buffer does not hold a well-formed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Error {
    /// The buffer is shorter than the header, or than a length the header claims.
    #[error("truncated: buffer shorter than the header or a length it claims")]
    Truncated,
    /// A field holds a value the format does not allow (version, header length, ...).
    #[error("malformed header")]
    Malformed,
}

/// Result of wire parsing.
pub type Result<T> = core::result::Result<T, Error>;

#[inline]
pub(crate) fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

#[inline]
pub(crate) fn write_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

#[inline]
pub(crate) fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

#[inline]
pub(crate) fn write_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// IP protocol numbers we act on; anything else is carried as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpProtocol {
    Icmp,
    Tcp,
    Udp,
    Icmpv6,
    Unknown(u8),
}

impl From<u8> for IpProtocol {
    fn from(value: u8) -> Self {
        match value {
            1 => Self::Icmp,
            6 => Self::Tcp,
            17 => Self::Udp,
            58 => Self::Icmpv6,
            other => Self::Unknown(other),
        }
    }
}

impl From<IpProtocol> for u8 {
    fn from(value: IpProtocol) -> Self {
        match value {
            IpProtocol::Icmp => 1,
            IpProtocol::Tcp => 6,
            IpProtocol::Udp => 17,
            IpProtocol::Icmpv6 => 58,
            IpProtocol::Unknown(other) => other,
        }
    }
}
