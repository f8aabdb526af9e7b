//! Between a [`Batch`] and the socket layer's vectored calls (`sys::mmsg`, `sys::gro`): which
//! slots a receive fills and what it recorded, which packets a send reads and their peers.
//! Packets stay where they are: the kernel reads and writes the batch's slots (a GRO receive's
//! split copies each datagram once, from the coalesced buffer into its slot).

use crate::batch::Batch;
use crate::sys::gro::GroReceiver;
use crate::sys::mmsg::{Mmsg, RxSlots};
use core::net::SocketAddrV4;
use std::io;
use std::os::fd::BorrowedFd;

/// Batched `sendmmsg`/`recvmmsg` on any datagram socket, between a [`Batch`] and the socket:
/// what the UDP and raw ports use, and what the lab's traffic generators use to push packets
/// at a rate one syscall per packet could not. Its arrays are allocated once.
pub struct MmsgScratch {
    mmsg: Mmsg,
}

impl MmsgScratch {
    /// Arrays for batches of up to `capacity` packets.
    pub fn new(capacity: usize) -> MmsgScratch {
        MmsgScratch {
            mmsg: Mmsg::new(capacity),
        }
    }

    /// Sends runs of same-size datagrams to one peer as one UDP GSO buffer (UDP_SEGMENT), so
    /// the kernel's UDP/IP path runs once per run instead of once per datagram. Switched off
    /// by itself if the kernel refuses it (EIO, EOPNOTSUPP, or EINVAL many times in a row).
    pub fn set_gso(&mut self, on: bool) {
        self.mmsg.set_gso(on);
    }

    pub fn gso(&self) -> bool {
        self.mmsg.gso()
    }

    /// Receives up to `batch.capacity()` datagrams into the batch (replacing its contents) and
    /// returns how many. `Ok(0)` when none is waiting (EAGAIN).
    pub fn recv(&mut self, fd: BorrowedFd<'_>, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        let max = batch.max_packet();
        let (area, stride) = batch.rx_area();
        let got = self.mmsg.recv(fd, RxSlots::new(area, stride, max))?;
        for i in 0..got {
            let r = self.mmsg.received(i);
            batch.commit_rx(i, r.len, r.peer, r.truncated);
        }
        Ok(got)
    }

    /// Sends the packets of `batch` at `indices`, each to its `meta.peer`. Returns how many
    /// leading entries the kernel took; an error is returned only if the first one failed.
    pub fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        batch: &Batch,
        indices: &[u16],
    ) -> io::Result<usize> {
        self.mmsg.send(fd, indices.len(), |k| {
            let i = usize::from(indices[k]);
            (batch.packet(i), batch.meta(i).peer)
        })
    }

    /// Sends packets of `batch`, each to the peer paired with it (no GSO). Returns how many
    /// leading items the kernel took; an error is returned only if the first one failed.
    pub fn send_to(
        &mut self,
        fd: BorrowedFd<'_>,
        batch: &Batch,
        items: &[(u16, SocketAddrV4)],
    ) -> io::Result<usize> {
        self.mmsg.send_without_gso(fd, items.len(), |k| {
            let (i, peer) = items[k];
            (batch.packet(usize::from(i)), peer)
        })
    }
}

/// Replaces the batch's contents with datagrams from a GRO receiver (see [`GroReceiver::recv`]),
/// one per slot: a datagram longer than a slot is cut and marked oversized. On an error the
/// batch holds what the receiver had left from its previous call.
pub(super) fn gro_recv(
    gro: &mut GroReceiver,
    fd: BorrowedFd<'_>,
    batch: &mut Batch,
) -> io::Result<usize> {
    batch.clear();
    gro.recv(fd, batch.capacity(), |datagram, peer, truncated| {
        let i = batch.len();
        let slot = batch.rx_slot(i);
        let n = datagram.len().min(slot.len());
        slot[..n].copy_from_slice(&datagram[..n]);
        batch.commit_rx(i, n, peer, truncated || datagram.len() > n);
    })?;
    Ok(batch.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::HEADROOM;
    use crate::sys::sockopt::set_udp_gro;
    use core::net::Ipv4Addr;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::Duration;

    /// Datagrams longer than a batch slot are cut to it and marked oversized, the others kept
    /// whole, each with its sender, whether read by recvmmsg or split from a GRO run.
    #[test]
    fn test_recv_cuts_what_overflows_a_slot() {
        for gro in [false, true] {
            let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            rx.set_nonblocking(true).unwrap();
            if gro {
                set_udp_gro(rx.as_fd(), true).unwrap();
            }
            let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let (std::net::SocketAddr::V4(to), std::net::SocketAddr::V4(from)) =
                (rx.local_addr().unwrap(), tx.local_addr().unwrap())
            else {
                panic!("IPv4")
            };
            // Three of 300 bytes (one GRO run), then one of 50.
            let mut send = Batch::new(8, 1024);
            for (i, len) in [300, 300, 300, 50].into_iter().enumerate() {
                send.rx_slot(i)[..len].fill(i as u8 + 1);
                send.commit_rx(i, len, to, false);
            }
            let mut scratch = MmsgScratch::new(8);
            scratch.set_gso(true);
            assert_eq!(scratch.send(tx.as_fd(), &send, &[0, 1, 2, 3]).unwrap(), 4);
            std::thread::sleep(Duration::from_millis(50));
            let mut batch = Batch::new(8, HEADROOM + 100);
            let n = if gro {
                gro_recv(&mut GroReceiver::new(), rx.as_fd(), &mut batch).unwrap()
            } else {
                scratch.recv(rx.as_fd(), &mut batch).unwrap()
            };
            assert_eq!(n, 4, "gro {gro}");
            for (i, (len, oversized)) in [(100, true), (100, true), (100, true), (50, false)]
                .into_iter()
                .enumerate()
            {
                let m = batch.meta(i);
                assert_eq!(
                    (m.len, m.oversized, m.peer),
                    (len, oversized, from),
                    "{i}, gro {gro}"
                );
                assert!(batch.packet(i).iter().all(|&b| b == i as u8 + 1), "{i}");
            }
        }
    }
}
