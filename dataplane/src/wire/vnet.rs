//! The virtio-net header a TUN device with `IFF_VNET_HDR` puts in front of every frame: the
//! bytes only. What it asks of the reader (finishing a partial checksum, cutting a TSO or USO
//! superframe into segments) and the receive half (GRO) are [`crate::offload`]'s.
//!
//! Layout (10 bytes, host byte order, which is little endian on every target podwire builds
//! for): flags u8, gso_type u8, hdr_len u16, gso_size u16, csum_start u16, csum_offset u16.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
