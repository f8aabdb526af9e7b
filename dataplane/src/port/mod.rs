//! Devices behind one batched interface.
//!
//! A port fills a caller-owned [`Batch`] on receive and sends the packets of a batch named by
//! index on transmit. Ports never decide anything about a packet; they report what the device
//! said (a datagram cut short, a refused write) and leave the counting to the worker.

use crate::batch::Batch;
use crate::sys;
use std::io;
use std::os::fd::BorrowedFd;

pub use mmsg::MmsgScratch;

mod mmsg;
pub mod neigh_dump;
pub mod neighbours;
pub mod pcap;
pub mod raw;
pub mod socket_errors;
pub mod tap;
pub mod tun;
pub mod udp;
pub mod underlay;
pub mod xdp;

/// A device error that is not about one packet.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Opening or configuring the device failed.
    #[error("cannot open {what}: {source}")]
    Open {
        what: String,
        source: std::io::Error,
    },
    /// The device failed in a way that is not transient.
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    /// A capture file could not be read or written.
    #[error("pcap: {0}")]
    Pcap(String),
}

/// Receives packets into a batch.
pub trait RxPort {
    /// Replaces the batch's contents with up to `batch.capacity()` packets; returns how many
    /// (0 when nothing is waiting).
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError>;
}

/// What became of a transmit request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOutcome {
    pub sent: usize,
    /// Packets the device refused (counted as `DropReason::TxError`).
    pub failed: usize,
}

/// Sends packets of a batch.
pub trait TxPort {
    /// Sends the packets of `batch` at `indices`.
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome;
}

/// How long a full socket buffer may hold up a send before the rest of the batch is dropped.
const SEND_WAIT_MS: i32 = 10;

/// Sends `items` (packet indices, or packets with their peers) with `send`, a sendmmsg over a
/// prefix of what it is given: waits once for a full socket buffer to drain, and skips (counts)
/// a datagram the kernel refuses.
fn send_all<T>(
    fd: BorrowedFd<'_>,
    items: &[T],
    mut send: impl FnMut(&[T]) -> io::Result<usize>,
) -> TxOutcome {
    let mut out = TxOutcome::default();
    let mut rest = items;
    let mut waited = false;
    while !rest.is_empty() {
        match send(rest) {
            Ok(n) => {
                out.sent += n;
                rest = &rest[n..];
                waited = false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !waited => {
                waited = true;
                if !matches!(sys::fdio::wait_writable(fd, SEND_WAIT_MS), Ok(true)) {
                    out.failed += rest.len();
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                // The first datagram was refused (EMSGSIZE, EHOSTUNREACH, a full buffer twice):
                // drop it and go on with the rest.
                out.failed += 1;
                rest = &rest[1..];
            }
        }
    }
    out
}

/// Sends the packets of `batch` at `indices` with sendmmsg, each to its `meta.peer`.
fn sendmmsg_all(
    fd: BorrowedFd<'_>,
    scratch: &mut MmsgScratch,
    batch: &Batch,
    indices: &[u16],
) -> TxOutcome {
    send_all(fd, indices, |rest| scratch.send(fd, batch, rest))
}
