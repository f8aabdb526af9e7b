//! TUN device queues (IFF_TUN | IFF_NO_PI, multi-queue): one queue per worker.
//!
//! A TUN fd moves one packet per read(2)/write(2); a batch is filled by reading until EAGAIN or
//! the batch is full. The device disappears when its last queue is closed, taking its addresses
//! and routes with it, so dropping the queues is the cleanup.

use super::{PortError, RxPort, TxOutcome, TxPort};
use crate::batch::Batch;
use crate::sys;
use core::net::{Ipv4Addr, SocketAddrV4};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// One queue of a TUN device.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
}

/// Opens `queues` queues of the TUN device `name` (created if needed); returns them and the
/// device's name.
pub fn open(name: &str, queues: usize) -> Result<(Vec<TunQueue>, String), PortError> {
    let mut out = Vec::with_capacity(queues);
    let mut actual = name.to_string();
    for _ in 0..queues.max(1) {
        let (fd, n) = sys::tun::open_queue(&actual, true).map_err(|source| PortError::Open {
            what: format!("TUN device {name}"),
            source,
        })?;
        actual = n;
        out.push(TunQueue { fd });
    }
    Ok((out, actual))
}

impl TunQueue {
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for TunQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

const NO_PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);

impl RxPort for TunQueue {
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        batch.clear();
        for i in 0..batch.capacity() {
            let slot = batch.rx_slot(i);
            let cap = slot.len();
            match sys::fdio::read(self.fd.as_fd(), slot) {
                // A read that fills the slot may have been cut short: the device does not say.
                Ok(n) => batch.commit_rx(i, n, NO_PEER, n >= cap),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => break,
                Err(source) => {
                    return Err(PortError::Io {
                        what: "TUN read",
                        source,
                    })
                }
            }
        }
        Ok(batch.len())
    }
}

impl TxPort for TunQueue {
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        let mut out = TxOutcome::default();
        for &i in indices {
            match sys::fdio::write(self.fd.as_fd(), batch.packet(usize::from(i))) {
                Ok(_) => out.sent += 1,
                Err(_) => out.failed += 1,
            }
        }
        out
    }
}
