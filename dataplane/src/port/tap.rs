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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// One TAP device, single queue.
#[derive(Debug)]
pub struct TapPort {
    fd: OwnedFd,
    name: String,
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
        Ok(TapPort { fd, name })
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
        rx_plain(self.fd.as_fd(), batch, "TAP read")
    }
}

impl TxPort for TapPort {
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        tx_plain(self.fd.as_fd(), batch, indices)
    }
}
