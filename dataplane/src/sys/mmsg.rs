//! recvmmsg(2) / sendmmsg(2) over a `Batch`: one syscall moves up to a batch of datagrams.
//!
//! The header, iovec and address arrays are allocated once per socket (`MmsgScratch`) and their
//! pointers re-aimed at the batch's slots on every call, so a call allocates nothing.

use crate::batch::Batch;
use core::net::{Ipv4Addr, SocketAddrV4};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Reusable arrays for one socket's vectored calls.
pub struct MmsgScratch {
    hdrs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_in]>,
    /// One UDP_SEGMENT control message per header (CMSG_SPACE(2) = 24 bytes, 8-aligned).
    cmsgs: Box<[[u64; 3]]>,
    /// Packets carried by each header of the last GSO send.
    groups: Box<[usize]>,
    gso: bool,
    /// GSO sends refused with EINVAL in a row (see `send`).
    gso_refusals: u32,
}

/// Consecutive EINVAL refusals of GSO sends after which GSO is taken to be unsupported.
const GSO_MAX_REFUSALS: u32 = 64;

/// `SOL_UDP` option and control message: send one buffer as datagrams of this size (UDP GSO).
const UDP_SEGMENT: libc::c_int = 103;
/// Datagrams per GSO send (the kernel allows 64 on older versions, 128 on newer ones).
const GSO_MAX_SEGMENTS: usize = 64;
/// Largest GSO buffer: an IPv4 UDP payload.
const GSO_MAX_BYTES: usize = 65_507;

// SAFETY: the raw pointers inside the arrays are only dereferenced by the kernel during a call
// made by the owner of this value, and are re-aimed before every call; moving the value to
// another thread moves that ownership with it.
unsafe impl Send for MmsgScratch {}

fn zero_sockaddr() -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    unsafe { core::mem::zeroed() }
}

fn to_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    let mut s = zero_sockaddr();
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr = libc::in_addr {
        s_addr: u32::from_ne_bytes(a.ip().octets()),
    };
    s
}

pub(super) fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(s.sin_addr.s_addr.to_ne_bytes()),
        u16::from_be(s.sin_port),
    )
}

/// recvmmsg(2) into every header of `hdrs`, non-blocking: how many messages came (0 when none
/// was waiting).
///
/// # Safety
/// Every header's pointers (address, iovecs and the buffers they point at, control buffer)
/// must be valid for writes of their stated lengths for the duration of the call.
pub(super) unsafe fn recvmmsg_dontwait(
    fd: BorrowedFd<'_>,
    hdrs: &mut [libc::mmsghdr],
) -> io::Result<usize> {
    // SAFETY: the caller guarantees every pointer in `hdrs` is writable for the call; the
    // call is non-blocking (MSG_DONTWAIT) and writes only within those bounds.
    let ret = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            hdrs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
            core::ptr::null_mut(),
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(ret as usize)
}

impl MmsgScratch {
    pub fn new(capacity: usize) -> MmsgScratch {
        // SAFETY: mmsghdr and iovec are plain data; all-zero (null pointers, zero lengths) is a
        // valid value that we overwrite before any call.
        let zero_hdr: libc::mmsghdr = unsafe { core::mem::zeroed() };
        let zero_iov = libc::iovec {
            iov_base: core::ptr::null_mut(),
            iov_len: 0,
        };
        MmsgScratch {
            hdrs: vec![zero_hdr; capacity].into_boxed_slice(),
            iovs: vec![zero_iov; capacity].into_boxed_slice(),
            addrs: vec![zero_sockaddr(); capacity].into_boxed_slice(),
            cmsgs: vec![[0u64; 3]; capacity].into_boxed_slice(),
            groups: vec![0; capacity].into_boxed_slice(),
            gso: false,
            gso_refusals: 0,
        }
    }

    /// Sends runs of same-size datagrams to one peer as one UDP GSO buffer (UDP_SEGMENT), so
    /// the kernel's UDP/IP path runs once per run instead of once per datagram. Switched off
    /// by itself if the kernel refuses it (EIO, EOPNOTSUPP, or EINVAL many times in a row).
    pub fn set_gso(&mut self, on: bool) {
        self.gso = on;
    }

    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Points message `k` at one buffer and at its own address slot, with no control data.
    fn aim(&mut self, k: usize, base: *mut libc::c_void, len: usize) {
        self.iovs[k] = libc::iovec {
            iov_base: base,
            iov_len: len,
        };
        let h = &mut self.hdrs[k];
        h.msg_hdr.msg_name = (&mut self.addrs[k] as *mut libc::sockaddr_in).cast();
        h.msg_hdr.msg_namelen = core::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_hdr.msg_iov = &mut self.iovs[k];
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_control = core::ptr::null_mut();
        h.msg_hdr.msg_controllen = 0;
        h.msg_hdr.msg_flags = 0;
        h.msg_len = 0;
    }

    /// Receives up to `batch.capacity()` datagrams into the batch (replacing its contents) and
    /// returns how many. `Ok(0)` when none is waiting (EAGAIN).
    pub fn recv(&mut self, fd: BorrowedFd<'_>, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        let n = batch.capacity().min(self.hdrs.len());
        let max = batch.max_packet();
        let (base, stride) = batch.rx_area();
        for i in 0..n {
            self.aim(i, base.wrapping_add(i * stride).cast(), max);
        }
        // SAFETY: the first `n` headers point at live iovecs and sockaddrs in `self` and each
        // iovec at a distinct `max`-byte receive area of `batch`; all outlive the call.
        let got = unsafe { recvmmsg_dontwait(fd, &mut self.hdrs[..n]) }?;
        for i in 0..got {
            let h = &self.hdrs[i];
            let oversized = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            batch.commit_rx(
                i,
                h.msg_len as usize,
                from_sockaddr(&self.addrs[i]),
                oversized,
            );
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
        if self.gso {
            match self.send_gso(fd, batch, indices) {
                // A run whose segments exceed the path MTU the kernel was told (by any host,
                // in a "fragmentation needed") is refused whole, with EMSGSIZE (EINVAL on older
                // kernels): send this batch without GSO, where the kernel fragments what is
                // too large, and keep GSO. EINVAL may also mean no GSO at all: past a streak of
                // them, GSO is switched off.
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.gso_refusals += 1;
                    if self.gso_refusals >= GSO_MAX_REFUSALS {
                        self.gso = false;
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EOPNOTSUPP)) => {
                    self.gso = false;
                }
                other => {
                    self.gso_refusals = 0;
                    return other;
                }
            }
        }
        let n = indices.len().min(self.hdrs.len());
        for (k, &i) in indices[..n].iter().enumerate() {
            let i = usize::from(i);
            let pkt = batch.packet(i);
            self.addrs[k] = to_sockaddr(batch.meta(i).peer);
            // sendmmsg only reads through the iovec, so a pointer derived from a shared borrow
            // is sound here.
            self.aim(k, pkt.as_ptr() as *mut libc::c_void, pkt.len());
        }
        // Each iovec covers one packet inside `batch`, borrowed across the call.
        self.sendmmsg(fd, n)
    }

    /// Sends packets of `batch`, each to the peer paired with it (no GSO). Returns how many
    /// leading items the kernel took; an error is returned only if the first one failed.
    pub fn send_to(
        &mut self,
        fd: BorrowedFd<'_>,
        batch: &Batch,
        items: &[(u16, SocketAddrV4)],
    ) -> io::Result<usize> {
        let n = items.len().min(self.hdrs.len());
        for (k, &(i, peer)) in items[..n].iter().enumerate() {
            let pkt = batch.packet(usize::from(i));
            self.addrs[k] = to_sockaddr(peer);
            // sendmmsg only reads through the iovec, so a pointer derived from a shared borrow
            // is sound here.
            self.aim(k, pkt.as_ptr() as *mut libc::c_void, pkt.len());
        }
        self.sendmmsg(fd, n)
    }

    /// sendmmsg(2) of the first `n` headers, which the caller has aimed at live sockaddrs,
    /// iovecs and control buffers in `self`, whose iovecs point into buffers borrowed for the
    /// call. Returns how many messages the kernel took.
    fn sendmmsg(&mut self, fd: BorrowedFd<'_>, n: usize) -> io::Result<usize> {
        // SAFETY: per the contract above, every pointer in the first `n` headers is live for
        // the call, and sendmmsg only reads through them.
        let ret = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret as usize)
        }
    }

    /// `send` with runs grouped: consecutive packets to one peer, all of the first one's size
    /// but a shorter last one, become one message of several iovecs with a UDP_SEGMENT control
    /// message. Returns packets taken, as `send`.
    fn send_gso(
        &mut self,
        fd: BorrowedFd<'_>,
        batch: &Batch,
        indices: &[u16],
    ) -> io::Result<usize> {
        let n = indices.len().min(self.iovs.len());
        let (mut k, mut m) = (0, 0);
        while k < n && m < self.hdrs.len() {
            let first = usize::from(indices[k]);
            let peer = batch.meta(first).peer;
            let seg = batch.packet(first).len();
            let start = k;
            let mut bytes = 0;
            while k < n && k - start < GSO_MAX_SEGMENTS {
                let i = usize::from(indices[k]);
                let pkt = batch.packet(i);
                if k > start
                    && (batch.meta(i).peer != peer
                        || pkt.len() > seg
                        || bytes + pkt.len() > GSO_MAX_BYTES)
                {
                    break;
                }
                // sendmmsg only reads through the iovec (see `send`).
                self.iovs[k] = libc::iovec {
                    iov_base: pkt.as_ptr() as *mut libc::c_void,
                    iov_len: pkt.len(),
                };
                bytes += pkt.len();
                k += 1;
                if pkt.len() < seg {
                    break; // a short datagram ends a run
                }
            }
            let count = k - start;
            self.addrs[m] = to_sockaddr(peer);
            let h = &mut self.hdrs[m];
            h.msg_hdr.msg_name = (&mut self.addrs[m] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = core::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[start];
            h.msg_hdr.msg_iovlen = count as _;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
            if count > 1 {
                let buf = &mut self.cmsgs[m];
                *buf = [0; 3];
                let c = buf.as_mut_ptr().cast::<libc::cmsghdr>();
                // SAFETY: `buf` is 24 bytes, 8-aligned: room for a cmsghdr (16 bytes) and its
                // 2-byte payload (CMSG_SPACE(2) = 24); CMSG_DATA points inside it.
                unsafe {
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    core::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
                }
                h.msg_hdr.msg_control = c.cast();
                // SAFETY: CMSG_SPACE only computes a size.
                h.msg_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
            } else {
                h.msg_hdr.msg_control = core::ptr::null_mut();
                h.msg_hdr.msg_controllen = 0;
            }
            self.groups[m] = count;
            m += 1;
        }
        // Runs of iovecs, each at one packet inside `batch`, borrowed across the call.
        let sent = self.sendmmsg(fd, m)?;
        Ok(self.groups[..sent].iter().sum())
    }
}
