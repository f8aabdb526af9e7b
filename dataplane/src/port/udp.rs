//! The underlay UDP socket: one per worker, all bound to the same address with SO_REUSEPORT so
//! the kernel spreads datagrams across workers by 4-tuple hash (one peer's flow stays on one
//! worker), each moving whole batches with recvmmsg/sendmmsg.

use super::{PortError, RxPort, TxOutcome, TxPort};
use crate::batch::Batch;
use crate::sys;
use crate::sys::mmsg::MmsgScratch;
use core::net::SocketAddrV4;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

/// A UDP socket on the underlay.
pub struct UdpPort {
    socket: Socket,
    scratch: MmsgScratch,
}

impl UdpPort {
    /// Binds a non-blocking, SO_REUSEPORT socket to `addr`, sized for batches of `batch_cap`,
    /// with socket buffers of `buffer_bytes` (forced past rmem_max when we may, else best effort).
    pub fn bind(
        addr: SocketAddrV4,
        batch_cap: usize,
        buffer_bytes: usize,
    ) -> Result<UdpPort, PortError> {
        let open = |source| PortError::Open {
            what: format!("UDP socket {addr}"),
            source,
        };
        let socket = Socket::new(
            Domain::IPV4,
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )
        .map_err(open)?;
        socket.set_reuse_port(true).map_err(open)?;
        if sys::sockopt::set_buffers_force(socket.as_fd(), buffer_bytes).is_err() {
            let _ = socket.set_recv_buffer_size(buffer_bytes);
            let _ = socket.set_send_buffer_size(buffer_bytes);
        }
        socket.bind(&addr.into()).map_err(open)?;
        Ok(UdpPort {
            socket,
            scratch: MmsgScratch::new(batch_cap),
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddrV4> {
        self.socket
            .local_addr()?
            .as_socket_ipv4()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IPv4 socket"))
    }
}

impl AsFd for UdpPort {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl RxPort for UdpPort {
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        match self.scratch.recv(self.socket.as_fd(), batch) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            // ICMP errors about earlier sends surface here (ECONNREFUSED etc.): not fatal.
            Err(e) if e.raw_os_error().is_some_and(is_async_send_error) => Ok(0),
            Err(source) => Err(PortError::Io {
                what: "UDP receive",
                source,
            }),
        }
    }
}

fn is_async_send_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN
    )
}

impl TxPort for UdpPort {
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        super::sendmmsg_all(self.socket.as_fd(), &mut self.scratch, batch, indices)
    }
}
