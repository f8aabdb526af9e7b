//! TAP devices (IFF_TAP | IFF_NO_PI): one Ethernet frame per read(2)/write(2).
//!
//! In L2 mode each pod's interface is a TAP device that podwire creates and moves into the
//! pod's network namespace: the device lives there, the descriptor stays here, so podwire is
//! the other end of the pod's "cable". The device disappears when its descriptor is closed
//! (it is not persistent), which is how a pod is detached and how a crashed daemon leaves no
//! devices behind.

use super::tun::{rx_plain, tx_plain};
use super::{PortError, RxPort, TxOutcome, TxPort};
use crate::batch::Batch;
use crate::sys;
use crate::wire::vnet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// One TAP device, single queue.
#[derive(Debug)]
pub struct TapPort {
    fd: OwnedFd,
    name: String,
    offload: bool,
}

impl TapPort {
    /// Creates TAP device `name` (a name ending in `%d` is numbered by the kernel), or attaches
    /// to it if it exists and is a TAP device nobody holds.
    pub fn open(name: &str) -> Result<TapPort, PortError> {
        let (fd, name) =
            sys::tun::open_queue(name, sys::tun::Kind::Tap, false, false).map_err(|source| {
                PortError::Open {
                    what: format!("TAP device {name}"),
                    source,
                }
            })?;
        Ok(TapPort {
            fd,
            name,
            offload: false,
        })
    }

    /// As [`TapPort::open`], with offload: frames carry a virtio-net header and TCP
    /// superframes may arrive. Fails if the kernel refuses (the caller can fall back).
    pub fn open_offload(name: &str) -> Result<TapPort, PortError> {
        let err = |source| PortError::Open {
            what: format!("TAP device {name} with offload"),
            source,
        };
        let (fd, name) =
            sys::tun::open_queue(name, sys::tun::Kind::Tap, false, true).map_err(err)?;
        use sys::tun::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO_ECN};
        sys::tun::set_offload(&fd, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN).map_err(err)?;
        Ok(TapPort {
            fd,
            name,
            offload: true,
        })
    }

    /// True if frames carry virtio-net headers (see the module docs).
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// The device's name (in the namespace it was created in).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for TapPort {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl RxPort for TapPort {
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        let n = rx_plain(self.fd.as_fd(), batch, "TAP read")?;
        if self.offload {
            for i in 0..n {
                // The header stays in front of the frame; a read shorter than it is an
                // empty frame (counted as truncated).
                let (_, meta) = batch.slot_mut(i);
                let hdr = vnet::HEADER_LEN.min(meta.len);
                meta.start += hdr;
                meta.len -= hdr;
            }
        }
        Ok(n)
    }
}

impl TxPort for TapPort {
    /// With offload, each packet must have its virtio-net header in the 10 bytes in front of
    /// it (a port's own, or [`vnet::PLAIN`]).
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        if !self.offload {
            return tx_plain(self.fd.as_fd(), batch, indices);
        }
        let mut out = TxOutcome::default();
        for &i in indices {
            match batch.packet_with_prefix(usize::from(i), vnet::HEADER_LEN) {
                Some(bytes) if sys::fdio::write(self.fd.as_fd(), bytes).is_ok() => out.sent += 1,
                _ => out.failed += 1,
            }
        }
        out
    }
}
