//! An AF_XDP port: one queue of an interface, whose frames podwire's XDP program
//! (`port::xdp`) steers here. Frames are whole Ethernet frames both ways, as on a TAP port
//! without offload, so a pod's veth host end can be a bridge port; the underlay's next step
//! (stripping and adding outer Ethernet for the pipeline) builds on this.
//!
//! Copy mode on veth (what it offers), zero-copy where the driver has it. Received frames are
//! copied into the batch and their UMEM frames go straight back to the fill ring; frames to send
//! are copied into free UMEM frames, which come back through the completion ring. So no frame
//! is ever held across calls and none can leak (see `sys::xsk`).

use crate::batch::Batch;
use crate::port::{PortError, RxPort, TxOutcome, TxPort};
pub use crate::sys::xsk::XskActivity;
use crate::sys::xsk::{XskSocket, XskStats};
use crate::wire::MacAddr;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

pub use crate::sys::xsk::XskConfig;

/// An AF_XDP socket on one interface queue.
pub struct XskPort {
    socket: XskSocket,
    ifname: String,
    queue: u32,
}

impl XskPort {
    /// Binds an AF_XDP socket to `queue` of `ifname`. The interface needs podwire's XDP
    /// program with this socket in its map ([`crate::port::xdp::XdpProgram::set_socket`]) for
    /// frames to arrive.
    pub fn bind(ifname: &str, queue: u32, config: XskConfig) -> Result<XskPort, PortError> {
        let socket = XskSocket::bind(ifname, queue, config).map_err(|source| PortError::Open {
            what: format!("AF_XDP socket on {ifname} queue {queue}"),
            source,
        })?;
        Ok(XskPort {
            socket,
            ifname: ifname.to_string(),
            queue,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.raw_fd()
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// Whether the socket runs zero-copy (else copy mode).
    pub fn zero_copy(&self) -> bool {
        self.socket.zero_copy()
    }

    /// The kernel's counters for the socket (drops for a full RX ring or an empty fill ring).
    pub fn stats(&self) -> Result<XskStats, PortError> {
        self.socket.stats().map_err(|source| PortError::Io {
            what: "XDP_STATISTICS",
            source,
        })
    }

    /// Sends frames given as a header and a body each (see [`XskSocket::send`]); returns how
    /// many were queued.
    pub(crate) fn send_parts<'a>(
        &mut self,
        frames: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> usize {
        self.socket.send(frames)
    }

    /// Frames moved and wakeups taken since the last call.
    pub fn take_activity(&mut self) -> XskActivity {
        self.socket.take_activity()
    }

    /// Kicks the kernel to send what is still queued (copy mode sends a budget per kick);
    /// returns the frames still in its hands. A worker calls it every round that it has any.
    pub fn flush(&mut self) -> usize {
        self.socket.flush()
    }

    /// Send frames the kernel has given back, and how many there are: equal once everything
    /// queued has been sent, or a frame leaked.
    pub fn send_frames(&mut self) -> (usize, usize) {
        (self.socket.send_frames_free(), self.socket.send_frames())
    }
}

/// The Ethernet header of an IPv4 frame from `src` to `dst`, for ports that send IPv4 packets
/// through an AF_XDP socket.
pub fn ipv4_ethernet_header(dst: MacAddr, src: MacAddr) -> [u8; 14] {
    let mut header = [0u8; 14];
    header[..6].copy_from_slice(&dst.0);
    header[6..12].copy_from_slice(&src.0);
    header[12..].copy_from_slice(&crate::wire::ethernet::ethertype::IPV4.to_be_bytes());
    header
}

impl RxPort for XskPort {
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        batch.clear();
        let cap = batch.capacity();
        let mut i = 0;
        self.socket.recv(cap, |frame| {
            let slot = batch.rx_slot(i);
            let len = frame.len().min(slot.len());
            slot[..len].copy_from_slice(&frame[..len]);
            let unspecified = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
            batch.commit_rx(i, len, unspecified, len < frame.len());
            i += 1;
        });
        Ok(i)
    }
}

impl TxPort for XskPort {
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        let sent = self.socket.send(
            indices
                .iter()
                .map(|&i| (&[][..], batch.packet(usize::from(i)))),
        );
        TxOutcome {
            sent,
            failed: indices.len() - sent,
        }
    }
}
