//! The underlay UDP socket: one per worker, all bound to the same address with SO_REUSEPORT so
//! the kernel spreads datagrams across workers by 4-tuple hash (one peer's flow stays on one
//! worker), each moving whole batches with recvmmsg/sendmmsg.

use super::mmsg::{gro_recv, MmsgScratch};
use super::socket_errors::{SocketErrorKind, SocketErrors};
use super::{PortError, RxPort, TxOutcome, TxPort};
use crate::batch::Batch;
use crate::sys;
use crate::sys::gro::GroReceiver;
use core::net::SocketAddrV4;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

/// A UDP socket on the underlay.
pub struct UdpPort {
    socket: Socket,
    scratch: MmsgScratch,
    /// With UDP GRO on: coalesced runs received whole and split into the batch.
    gro: Option<Box<GroReceiver>>,
    /// Socket buffer size, for the peer sockets made beside this one.
    buffer_bytes: usize,
    /// ICMP errors about earlier sends that receives returned, here and on peer sockets.
    errors: SocketErrors,
}

/// A socket bound beside a [`UdpPort`] (same address and port) and connected to one peer.
/// The kernel delivers a datagram to the connected socket whose 4-tuple matches it before it
/// considers the SO_REUSEPORT group, so each peer gets a receive queue of its own: a peer that
/// floods fills (and overflows) only its own queue. Read it with [`UdpPort::rx_batch_from`].
pub struct PeerSocket {
    socket: Socket,
    peer: SocketAddrV4,
}

impl PeerSocket {
    pub fn peer(&self) -> SocketAddrV4 {
        self.peer
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Datagrams the kernel dropped here since the socket was made (its queue was full).
    pub fn rx_drops(&self) -> u32 {
        sys::sockopt::rx_drops(self.socket.as_fd()).unwrap_or(0)
    }
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
        let socket = reuseport_socket(addr, buffer_bytes).map_err(open)?;
        Ok(UdpPort {
            socket,
            scratch: MmsgScratch::new(batch_cap),
            gro: None,
            buffer_bytes,
            errors: SocketErrors::default(),
        })
    }

    /// A socket beside this one, connected to `peer` (see [`PeerSocket`]), with this one's
    /// buffer size and GRO setting.
    pub fn connect_peer(&self, peer: SocketAddrV4) -> Result<PeerSocket, PortError> {
        let open = |source| PortError::Open {
            what: format!("UDP socket for peer {peer}"),
            source,
        };
        let local = self.local_addr().map_err(open)?;
        let socket = reuseport_socket(local, self.buffer_bytes).map_err(open)?;
        if self.gro.is_some() {
            sys::sockopt::set_udp_gro(socket.as_fd(), true).map_err(open)?;
        }
        // Until connect() the socket is one more member of the SO_REUSEPORT group and may take
        // other senders' datagrams: they are read and decided like any others, not lost.
        socket.connect(&peer.into()).map_err(open)?;
        Ok(PeerSocket { socket, peer })
    }

    /// Receives a batch from a peer socket through this port's buffers (one set per worker,
    /// however many peers). GRO leftovers of one socket may be returned by the next read of
    /// another: they are datagrams like any others, each with its sender.
    pub fn rx_batch_from(
        &mut self,
        peer: &PeerSocket,
        batch: &mut Batch,
    ) -> Result<usize, PortError> {
        let fd = peer.socket.as_fd();
        let before = self.errors.frag_needed();
        let got = recv_on(
            &mut self.gro,
            &mut self.scratch,
            fd,
            batch,
            &mut self.errors,
        );
        if self.errors.frag_needed() != before {
            // The kernel accepted a "fragmentation needed" about this peer and lowered the
            // route's path MTU: learn the value it now uses.
            if let Ok(mtu) = sys::sockopt::path_mtu(fd) {
                self.errors.path_mtu(*peer.peer.ip(), mtu);
            }
        }
        got
    }

    /// ICMP errors about earlier sends that receives returned since the last call.
    pub fn socket_errors(&mut self) -> &mut SocketErrors {
        &mut self.errors
    }

    /// Datagrams the kernel dropped at this socket since it was opened (its queue was full).
    pub fn rx_drops(&self) -> u32 {
        sys::sockopt::rx_drops(self.socket.as_fd()).unwrap_or(0)
    }

    /// Sends runs of equal-size datagrams to one peer with UDP GSO (see [`MmsgScratch::set_gso`]).
    pub fn set_gso(&mut self, on: bool) {
        self.scratch.set_gso(on);
    }

    /// Receives with UDP GRO: runs of datagrams from one sender arrive as one buffer (a
    /// sender's GSO buffer kept whole, or the kernel's coalescing) and are split into the
    /// batch, so the socket layer runs once per run. Returns whether the kernel took it.
    pub fn set_gro(&mut self, on: bool) -> bool {
        if on && sys::sockopt::set_udp_gro(self.socket.as_fd(), true).is_ok() {
            self.gro.get_or_insert_with(Box::default);
            return true;
        }
        if self.gro.take().is_some() {
            let _ = sys::sockopt::set_udp_gro(self.socket.as_fd(), false);
        }
        false
    }

    /// Whether UDP GRO is in use.
    pub fn gro(&self) -> bool {
        self.gro.is_some()
    }

    /// Whether UDP GSO is (still) in use.
    pub fn gso(&self) -> bool {
        self.scratch.gso()
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Sends packets of `batch` each to the peer paired with it (one packet may be listed
    /// for several peers: head-end replication), without GSO.
    pub fn tx_to(&mut self, batch: &Batch, items: &[(u16, SocketAddrV4)]) -> TxOutcome {
        let fd = self.socket.as_fd();
        let scratch = &mut self.scratch;
        super::send_all(fd, items, |rest| scratch.send_to(fd, batch, rest))
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

/// A non-blocking UDP socket in the SO_REUSEPORT group of `addr`, bound there.
fn reuseport_socket(addr: SocketAddrV4, buffer_bytes: usize) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    if sys::sockopt::set_buffers_force(socket.as_fd(), buffer_bytes).is_err() {
        let _ = socket.set_recv_buffer_size(buffer_bytes);
        let _ = socket.set_send_buffer_size(buffer_bytes);
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

impl RxPort for UdpPort {
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        let fd = self.socket.as_fd();
        recv_on(
            &mut self.gro,
            &mut self.scratch,
            fd,
            batch,
            &mut self.errors,
        )
    }
}

/// Pending errors one receive call consumes before it gives up for this round: each retry
/// takes one (the socket holds one at a time), so a flood of forged ICMP cannot hold a worker.
const MAX_ERROR_RETRIES: usize = 4;

/// One receive on `fd` through a port's buffers. An ICMP error about an earlier send (the
/// socket's pending error, returned instead of datagrams) is counted and the receive tried
/// again, since datagrams may be queued behind it and epoll's edge for them is spent.
fn recv_on(
    gro: &mut Option<Box<GroReceiver>>,
    scratch: &mut MmsgScratch,
    fd: BorrowedFd<'_>,
    batch: &mut Batch,
    errors: &mut SocketErrors,
) -> Result<usize, PortError> {
    for _ in 0..=MAX_ERROR_RETRIES {
        let got = match gro.as_deref_mut() {
            Some(g) => gro_recv(g, fd, batch),
            None => scratch.recv(fd, batch),
        };
        let e = match got {
            Ok(n) => return Ok(n),
            Err(e) => e,
        };
        if e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        match e.raw_os_error().and_then(SocketErrorKind::from_errno) {
            // GRO's datagrams left from the last call are in the batch already: hand them over.
            Some(kind) if !batch.is_empty() => {
                errors.count(kind);
                return Ok(batch.len());
            }
            Some(kind) => errors.count(kind),
            None => {
                return Err(PortError::Io {
                    what: "UDP receive",
                    source: e,
                })
            }
        }
    }
    batch.clear();
    Ok(0)
}

impl TxPort for UdpPort {
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        super::sendmmsg_all(self.socket.as_fd(), &mut self.scratch, batch, indices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn receiver() -> (UdpSocket, SocketAddrV4) {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let std::net::SocketAddr::V4(a) = s.local_addr().unwrap() else {
            panic!()
        };
        (s, a)
    }

    /// A peer socket takes its peer's datagrams and nobody else's: the shared socket keeps
    /// everyone else's, and each peer's queue (and drop count) is its own.
    #[test]
    fn test_peer_socket_takes_only_its_peers_datagrams() {
        let mut port =
            UdpPort::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 64, 1 << 20).unwrap();
        let port_addr = port.local_addr().unwrap();
        let (peer, peer_addr) = receiver();
        let (other, _) = receiver();
        let sock = port.connect_peer(peer_addr).unwrap();
        assert_eq!(sock.peer(), peer_addr);
        for i in 0..5u8 {
            peer.send_to(&[i; 10], port_addr).unwrap();
            other.send_to(&[100 + i; 10], port_addr).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut batch = Batch::new(64, 2048);
        let n = port.rx_batch_from(&sock, &mut batch).unwrap();
        assert_eq!(n, 5);
        assert!((0..n).all(|i| batch.meta(i).peer == peer_addr && batch.packet(i)[0] < 100));
        let n = port.rx_batch(&mut batch).unwrap();
        assert_eq!(n, 5);
        assert!((0..n).all(|i| batch.packet(i)[0] >= 100));
        assert_eq!(port.rx_batch_from(&sock, &mut batch).unwrap(), 0);
        assert_eq!(sock.rx_drops(), 0);
        assert_eq!(port.rx_drops(), 0);
    }

    /// Runs of same-size datagrams go out as GSO buffers; every datagram must still arrive
    /// alone, whole and in order, at the right peer, with or without GSO.
    #[test]
    fn test_gso_runs_arrive_as_separate_datagrams() {
        for gso in [true, false] {
            let (a, a_addr) = receiver();
            let (b, b_addr) = receiver();
            let mut port =
                UdpPort::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 64, 1 << 20).unwrap();
            port.set_gso(gso);
            // Five of 300 bytes and a short one to A, two to B, one more to A.
            let plan: Vec<(SocketAddrV4, usize)> = [300, 300, 300, 300, 300, 120]
                .iter()
                .map(|&n| (a_addr, n))
                .chain([(b_addr, 300), (b_addr, 300), (a_addr, 300)])
                .collect();
            let mut batch = Batch::new(64, 2048);
            for (i, &(peer, len)) in plan.iter().enumerate() {
                let slot = batch.rx_slot(i);
                slot[..len].fill(i as u8);
                batch.commit_rx(i, len, peer, false);
            }
            let indices: Vec<u16> = (0..plan.len() as u16).collect();
            let out = port.tx_batch(&batch, &indices);
            assert_eq!((out.sent, out.failed), (plan.len(), 0), "gso {gso}");
            let mut buf = [0u8; 4096];
            for (i, &(peer, len)) in plan.iter().enumerate() {
                let sock = if peer == a_addr { &a } else { &b };
                let n = sock.recv(&mut buf).unwrap();
                assert_eq!(n, len, "datagram {i}, gso {gso}");
                assert!(buf[..n].iter().all(|&x| x == i as u8), "datagram {i}");
            }
            assert_eq!(port.gso(), gso, "loopback takes UDP GSO");
        }
    }

    /// A GSO run whose segments exceed the path MTU (as after a "fragmentation needed", here a
    /// locked route MTU of 1200 in a namespace of its own) is refused with EINVAL: the batch
    /// goes out without GSO, arrives whole, and GSO stays on for the next one. Root only.
    #[test]
    fn test_gso_over_a_lowered_path_mtu_falls_back_and_stays_on() {
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip").args(args).status();
            assert!(ok.is_ok_and(|s| s.success()), "ip {args:?}");
        };
        std::thread::spawn(move || {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return; // not root
            }
            ip(&["link", "set", "lo", "up"]);
            // Both local routes a send to 127.0.0.1 may take.
            for dst in ["127.0.0.0/8", "127.0.0.1/32"] {
                ip(&[
                    "route", "replace", "local", dst, "dev", "lo", "table", "local", "mtu", "lock",
                    "1200",
                ]);
            }
            let (rx, rx_addr) = receiver();
            let mut port =
                UdpPort::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 64, 1 << 22).unwrap();
            port.set_gso(true);
            for round in 0..2u8 {
                let mut batch = Batch::new(64, 2048);
                for i in 0..4 {
                    let slot = batch.rx_slot(i);
                    slot[..1400].fill(round * 10 + i as u8);
                    batch.commit_rx(i, 1400, rx_addr, false);
                }
                let out = port.tx_batch(&batch, &[0, 1, 2, 3]);
                assert_eq!((out.sent, out.failed), (4, 0), "round {round}");
                let mut buf = [0u8; 4096];
                for i in 0..4u8 {
                    let n = rx.recv(&mut buf).unwrap();
                    assert_eq!(n, 1400);
                    assert!(buf[..n].iter().all(|&b| b == round * 10 + i));
                }
                assert!(port.gso(), "GSO still on after round {round}");
            }
        })
        .join()
        .unwrap();
    }

    /// A GSO send received with UDP GRO comes out as the same datagrams, in order, each in its
    /// own slot, and a run larger than the batch is kept for the next receive.
    #[test]
    fn test_gro_receive_splits_runs_into_the_batch() {
        let mut rx = UdpPort::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 16, 1 << 22).unwrap();
        assert!(rx.set_gro(true), "this kernel has UDP GRO");
        let to = rx.local_addr().unwrap();
        let mut tx = UdpPort::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 64, 1 << 22).unwrap();
        tx.set_gso(true);
        // 40 datagrams of 1000 bytes (one GSO run), then one of 300, then an empty one.
        let sizes: Vec<usize> = (0..40).map(|_| 1000).chain([300, 0]).collect();
        let mut batch = Batch::new(64, 2048);
        for (i, &len) in sizes.iter().enumerate() {
            let slot = batch.rx_slot(i);
            slot[..len].fill(i as u8);
            batch.commit_rx(i, len, to, false);
        }
        let indices: Vec<u16> = (0..sizes.len() as u16).collect();
        assert_eq!(tx.tx_batch(&batch, &indices).sent, sizes.len());
        let mut got = Vec::new();
        let mut small = Batch::new(16, 2048);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while got.len() < sizes.len() && std::time::Instant::now() < deadline {
            let n = rx.rx_batch(&mut small).unwrap();
            assert!(n <= 16);
            for i in 0..n {
                assert!(!small.meta(i).oversized);
                got.push(small.packet(i).to_vec());
            }
        }
        assert_eq!(got.len(), sizes.len());
        for (i, (d, &len)) in got.iter().zip(&sizes).enumerate() {
            assert_eq!(d.len(), len, "datagram {i}");
            assert!(d.iter().all(|&b| b == i as u8), "datagram {i}");
        }
    }
}
