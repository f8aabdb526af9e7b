//! Receiving with UDP GRO: recvmmsg(2) into large buffers, each holding a run of datagrams of
//! one size from one sender (the kernel's coalescing, or a sender's UDP GSO buffer kept whole),
//! split back into datagrams handed to the caller one by one.
//!
//! A call receives at most once; what does not fit the caller's room waits for the next call,
//! so no datagram is lost and the caller's bound holds.

use super::mmsg::{from_sockaddr, recvmmsg_dontwait};
use super::sockopt::UDP_GRO;
use core::net::{Ipv4Addr, SocketAddrV4};
use std::io;
use std::os::fd::BorrowedFd;

/// Messages per recvmmsg.
const MSGS: usize = 8;
/// Bytes per message: the largest coalesced run (an IPv4 UDP payload).
const BUF: usize = 65_536;

/// One received message not yet split into datagrams.
#[derive(Debug, Clone, Copy)]
struct Pending {
    len: usize,
    /// Segment size from the UDP_GRO control message (0: a single datagram).
    seg: usize,
    peer: SocketAddrV4,
    truncated: bool,
}

/// Buffers and headers for one socket's GRO receives, allocated once.
pub struct GroReceiver {
    arena: Box<[u8]>,
    hdrs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_in]>,
    cmsgs: Box<[[u64; 3]]>,
    pending: [Pending; MSGS],
    n_pending: usize,
    next: usize,
    offset: usize,
}

// SAFETY: the raw pointers in the header arrays point into this value's own boxes and are only
// dereferenced by the kernel during a call made by the owner; they are re-aimed before each.
unsafe impl Send for GroReceiver {}

impl Default for GroReceiver {
    fn default() -> Self {
        Self::new()
    }
}

impl GroReceiver {
    pub fn new() -> GroReceiver {
        // SAFETY: plain C structs for which all-zero (null pointers, zero lengths) is valid;
        // they are aimed before any call.
        let zero_hdr: libc::mmsghdr = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let zero_addr: libc::sockaddr_in = unsafe { core::mem::zeroed() };
        let zero_iov = libc::iovec {
            iov_base: core::ptr::null_mut(),
            iov_len: 0,
        };
        GroReceiver {
            arena: vec![0u8; MSGS * BUF].into_boxed_slice(),
            hdrs: vec![zero_hdr; MSGS].into_boxed_slice(),
            iovs: vec![zero_iov; MSGS].into_boxed_slice(),
            addrs: vec![zero_addr; MSGS].into_boxed_slice(),
            cmsgs: vec![[0u64; 3]; MSGS].into_boxed_slice(),
            pending: [Pending {
                len: 0,
                seg: 0,
                peer: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                truncated: false,
            }; MSGS],
            n_pending: 0,
            next: 0,
            offset: 0,
        }
    }

    /// Hands up to `room` datagrams to `take`, each as its bytes, its sender and whether the
    /// kernel cut it short: first those left from the previous call, then, if room remains, one
    /// recvmmsg's worth. Returns how many; `Ok(0)` when nothing is waiting. An error of the
    /// recvmmsg comes after the leftovers were handed over.
    pub fn recv(
        &mut self,
        fd: BorrowedFd<'_>,
        room: usize,
        mut take: impl FnMut(&[u8], SocketAddrV4, bool),
    ) -> io::Result<usize> {
        let mut given = self.split(room, &mut take);
        if given < room && self.received(fd)? > 0 {
            given += self.split(room - given, &mut take);
        }
        Ok(given)
    }

    /// Hands pending datagrams to `take` until `room` were given or nothing is pending.
    fn split(&mut self, room: usize, take: &mut impl FnMut(&[u8], SocketAddrV4, bool)) -> usize {
        let mut given = 0;
        while self.next < self.n_pending && given < room {
            let p = self.pending[self.next];
            let seg = if p.seg == 0 { p.len } else { p.seg };
            // An empty datagram is still one (the caller counts it).
            let len = seg.min(p.len - self.offset);
            let from = self.next * BUF + self.offset;
            take(&self.arena[from..from + len], p.peer, p.truncated);
            given += 1;
            self.offset += len;
            if self.offset >= p.len {
                self.next += 1;
                self.offset = 0;
            }
        }
        given
    }

    /// One recvmmsg into the arena; returns how many messages came.
    fn received(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let base = self.arena.as_mut_ptr();
        for k in 0..MSGS {
            self.iovs[k] = libc::iovec {
                iov_base: base.wrapping_add(k * BUF).cast(),
                iov_len: BUF,
            };
            self.cmsgs[k] = [0; 3];
            let h = &mut self.hdrs[k];
            h.msg_hdr.msg_name = (&mut self.addrs[k] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = core::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[k];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.cmsgs[k].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = core::mem::size_of::<[u64; 3]>() as _;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at its own live iovec (a distinct BUF-byte area of
        // `arena`), sockaddr and 24-byte control buffer, all owned by `self` and alive across
        // the call.
        let got = unsafe { recvmmsg_dontwait(fd, &mut self.hdrs[..]) }?;
        for k in 0..got {
            let h = &self.hdrs[k];
            self.pending[k] = Pending {
                len: h.msg_len as usize,
                seg: gro_segment(&h.msg_hdr),
                peer: from_sockaddr(&self.addrs[k]),
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        self.n_pending = got;
        self.next = 0;
        self.offset = 0;
        Ok(got)
    }
}

/// The UDP_GRO segment size in a received message's control data, or 0.
fn gro_segment(msg: &libc::msghdr) -> usize {
    if msg.msg_control.is_null()
        || (msg.msg_controllen as u64) < core::mem::size_of::<libc::cmsghdr>() as u64
    {
        return 0;
    }
    // SAFETY: the kernel filled `msg_controllen` bytes of the control buffer, which we checked
    // holds at least one header; CMSG_FIRSTHDR/CMSG_NXTHDR stay within it and CMSG_DATA of a
    // UDP_GRO message points at its int payload.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = core::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mmsg::Mmsg;
    use crate::sys::sockopt::set_udp_gro;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    /// A GSO run received whole is handed over one datagram at a time, never more than `room`
    /// per call; the rest waits for the next call, in order, with its sender.
    #[test]
    fn test_recv_hands_over_at_most_room_and_keeps_the_rest() {
        let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        rx.set_nonblocking(true).unwrap();
        set_udp_gro(rx.as_fd(), true).unwrap();
        let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let (std::net::SocketAddr::V4(to), std::net::SocketAddr::V4(from)) =
            (rx.local_addr().unwrap(), tx.local_addr().unwrap())
        else {
            panic!("IPv4")
        };
        let bufs: Vec<[u8; 500]> = (0..10u8).map(|k| [k; 500]).collect();
        let mut mmsg = Mmsg::new(16);
        mmsg.set_gso(true);
        assert_eq!(
            mmsg.send(tx.as_fd(), 10, |k| (&bufs[k][..], to)).unwrap(),
            10
        );
        let mut gro = GroReceiver::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while got.len() < 10 && Instant::now() < deadline {
            let n = gro
                .recv(rx.as_fd(), 4, |d, peer, truncated| {
                    assert_eq!(peer, from);
                    assert!(!truncated);
                    got.push(d.to_vec());
                })
                .unwrap();
            assert!(n <= 4, "{n} datagrams for room 4");
        }
        assert_eq!(got.len(), 10);
        for (k, d) in got.iter().enumerate() {
            assert_eq!(d.len(), 500, "datagram {k}");
            assert!(d.iter().all(|&b| usize::from(b) == k), "datagram {k}");
        }
    }
}
