//! A raw IPv4 socket (IPPROTO_RAW, so IP_HDRINCL) for packets whose outer headers the pipeline
//! wrote itself: VXLAN, where the outer UDP source port follows the inner flow as the kernel's
//! does, which a socket bound to the VXLAN port cannot do. The kernel fills the IP ID when we
//! leave it zero and recomputes the header checksum; everything else goes out as we wrote it.

use super::MmsgScratch;
use super::{PortError, TxOutcome, TxPort};
use crate::batch::Batch;
use crate::sys;
use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::AsFd;

/// A send-only raw IPv4 socket.
pub struct RawIpPort {
    socket: Socket,
    scratch: MmsgScratch,
}

impl RawIpPort {
    /// Opens a non-blocking raw socket sized for batches of `batch_cap` (needs CAP_NET_RAW).
    pub fn open(batch_cap: usize, buffer_bytes: usize) -> Result<RawIpPort, PortError> {
        let open = |source| PortError::Open {
            what: "raw IPv4 socket".to_string(),
            source,
        };
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW.nonblocking().cloexec(),
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .map_err(open)?;
        if sys::sockopt::set_buffers_force(socket.as_fd(), buffer_bytes).is_err() {
            let _ = socket.set_send_buffer_size(buffer_bytes);
        }
        Ok(RawIpPort {
            socket,
            scratch: MmsgScratch::new(batch_cap),
        })
    }
}

impl TxPort for RawIpPort {
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        super::sendmmsg_all(self.socket.as_fd(), &mut self.scratch, batch, indices)
    }
}
