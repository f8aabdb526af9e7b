//! Devices behind one batched interface.
//!
//! A port fills a caller-owned [`Batch`] on receive and sends the packets of a batch named by
//! index on transmit. Ports never decide anything about a packet; they report what the device
//! said (a datagram cut short, a refused write) and leave the counting to the worker.

use crate::batch::Batch;

pub mod pcap;
pub mod tun;
pub mod udp;

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
