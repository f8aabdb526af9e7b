//! Receiving with UDP GRO: recvmmsg(2) into large buffers, each holding a run of datagrams of
//! one size from one sender (the kernel's coalescing, or a sender's UDP GSO buffer kept whole),
//! split back into a [`Batch`], one datagram per slot.
//!
//! A call receives at most once; what does not fit the batch waits for the next call, so no
//! datagram is lost and the batch bound holds.

use super::mmsg::{from_sockaddr, recvmmsg_dontwait};
use super::sockopt::UDP_GRO;
use crate::batch::Batch;
use core::net::{Ipv4Addr, SocketAddrV4};
use std::io;
use std::os::fd::BorrowedFd;

/// Messages per recvmmsg.
const MSGS: usize = 8;
/// Bytes per message: the largest coalesced run (an IPv4 UDP payload).
const BUF: usize = 65_536;

/// One received message not yet split into the batch.
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

    /// Replaces the batch's contents with datagrams: first those left from the previous call,
    /// then, if room remains, one recvmmsg's worth. `Ok(0)` when nothing is waiting.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        self.split_into(batch);
        if batch.len() < batch.capacity() && self.received(fd)? > 0 {
            self.split_into(batch);
        }
        Ok(batch.len())
    }

    /// Moves pending datagrams into the batch until it is full or nothing is pending.
    fn split_into(&mut self, batch: &mut Batch) {
        while self.next < self.n_pending && batch.len() < batch.capacity() {
            let p = self.pending[self.next];
            let base = self.next * BUF;
            let seg = if p.seg == 0 { p.len } else { p.seg };
            // An empty datagram still takes a slot (the pipeline counts it).
            let take = seg.min(p.len - self.offset);
            let i = batch.len();
            let slot = batch.rx_slot(i);
            let n = take.min(slot.len());
            let from = base + self.offset;
            slot[..n].copy_from_slice(&self.arena[from..from + n]);
            batch.commit_rx(i, n, p.peer, p.truncated || take > n);
            self.offset += take;
            if self.offset >= p.len {
                self.next += 1;
                self.offset = 0;
            }
        }
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
