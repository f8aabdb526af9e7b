//! recvmmsg(2) / sendmmsg(2): one syscall moves up to a batch of datagrams.
//!
//! The header, iovec and address arrays are allocated once per socket (`Mmsg`) and their
//! pointers re-aimed on every call, so a call allocates nothing. Receives go into equal slots of
//! one caller-owned buffer ([`RxSlots`]); sends read each datagram where the caller keeps it,
//! named by a function from its position to its bytes and peer. No packet is copied here.

use core::net::{Ipv4Addr, SocketAddrV4};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Where a vectored receive may write: slot `i` is `area[i * stride .. i * stride + len]`.
/// All slot pointers derive from the one `area` borrow.
pub struct RxSlots<'a> {
    area: &'a mut [u8],
    stride: usize,
    len: usize,
}

impl<'a> RxSlots<'a> {
    /// Slots of `len` bytes every `stride` bytes of `area`; `len` is cut to `stride`.
    pub fn new(area: &'a mut [u8], stride: usize, len: usize) -> RxSlots<'a> {
        RxSlots {
            area,
            stride,
            len: len.min(stride),
        }
    }

    /// How many whole slots `area` holds.
    pub fn count(&self) -> usize {
        if self.len == 0 || self.area.len() < self.len {
            return 0;
        }
        1 + (self.area.len() - self.len) / self.stride
    }
}

/// What one receive put in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes in the slot.
    pub len: usize,
    /// The sender.
    pub peer: SocketAddrV4,
    /// The datagram was longer than the slot (MSG_TRUNC): the slot holds its start.
    pub truncated: bool,
}

/// Reusable arrays for one socket's vectored calls.
pub struct Mmsg {
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
unsafe impl Send for Mmsg {}

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

impl Mmsg {
    /// Arrays for calls of up to `capacity` datagrams.
    pub fn new(capacity: usize) -> Mmsg {
        // SAFETY: mmsghdr and iovec are plain data; all-zero (null pointers, zero lengths) is a
        // valid value that we overwrite before any call.
        let zero_hdr: libc::mmsghdr = unsafe { core::mem::zeroed() };
        let zero_iov = libc::iovec {
            iov_base: core::ptr::null_mut(),
            iov_len: 0,
        };
        Mmsg {
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

    /// Receives up to one datagram per slot (as many as fit this value's arrays) and returns
    /// how many came; [`Mmsg::received`] tells what each slot got. `Ok(0)` when none is
    /// waiting (EAGAIN).
    pub fn recv(&mut self, fd: BorrowedFd<'_>, slots: RxSlots<'_>) -> io::Result<usize> {
        let n = slots.count().min(self.hdrs.len());
        let base = slots.area.as_mut_ptr();
        for i in 0..n {
            self.aim(i, base.wrapping_add(i * slots.stride).cast(), slots.len);
        }
        // SAFETY: the first `n` headers point at live iovecs and sockaddrs in `self` and each
        // iovec at a distinct `slots.len`-byte slot inside `slots.area` (`n <= slots.count()`),
        // which is mutably borrowed for the call; all outlive it.
        unsafe { recvmmsg_dontwait(fd, &mut self.hdrs[..n]) }
    }

    /// What slot `i` of the last [`Mmsg::recv`] got (`i` below what that call returned).
    pub fn received(&self, i: usize) -> Received {
        let h = &self.hdrs[i];
        Received {
            len: h.msg_len as usize,
            peer: from_sockaddr(&self.addrs[i]),
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        }
    }

    /// Sends datagrams `0..n`, datagram `k` being `item(k)`: its bytes and its peer. Returns
    /// how many leading ones the kernel took; an error is returned only if the first one failed.
    pub fn send<'a>(
        &mut self,
        fd: BorrowedFd<'_>,
        n: usize,
        item: impl Fn(usize) -> (&'a [u8], SocketAddrV4),
    ) -> io::Result<usize> {
        if self.gso {
            match self.send_gso(fd, n, &item) {
                // A run whose segments exceed the path MTU the kernel was told (by any host,
                // in a "fragmentation needed") is refused whole, with EMSGSIZE (EINVAL on older
                // kernels): send these without GSO, where the kernel fragments what is too
                // large, and keep GSO. EINVAL may also mean no GSO at all: past a streak of
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
        self.send_without_gso(fd, n, item)
    }

    /// [`Mmsg::send`] with one message per datagram, whatever [`Mmsg::set_gso`] said.
    pub fn send_without_gso<'a>(
        &mut self,
        fd: BorrowedFd<'_>,
        n: usize,
        item: impl Fn(usize) -> (&'a [u8], SocketAddrV4),
    ) -> io::Result<usize> {
        let n = n.min(self.hdrs.len());
        for k in 0..n {
            let (pkt, peer) = item(k);
            self.addrs[k] = to_sockaddr(peer);
            // sendmmsg only reads through the iovec, so a pointer derived from a shared borrow
            // is sound here.
            self.aim(k, pkt.as_ptr() as *mut libc::c_void, pkt.len());
        }
        // Each iovec covers one datagram borrowed for 'a, across the call.
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

    /// `send` with runs grouped: consecutive datagrams to one peer, all of the first one's
    /// size but a shorter last one, become one message of several iovecs with a UDP_SEGMENT
    /// control message. Returns datagrams taken, as `send`.
    fn send_gso<'a>(
        &mut self,
        fd: BorrowedFd<'_>,
        n: usize,
        item: &impl Fn(usize) -> (&'a [u8], SocketAddrV4),
    ) -> io::Result<usize> {
        let n = n.min(self.iovs.len());
        let (mut k, mut m) = (0, 0);
        while k < n && m < self.hdrs.len() {
            let (first, peer) = item(k);
            let seg = first.len();
            let start = k;
            let mut bytes = 0;
            while k < n && k - start < GSO_MAX_SEGMENTS {
                let (pkt, to) = item(k);
                if k > start && (to != peer || pkt.len() > seg || bytes + pkt.len() > GSO_MAX_BYTES)
                {
                    break;
                }
                // sendmmsg only reads through the iovec (see `send_without_gso`).
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
        // Runs of iovecs, each at one datagram borrowed for 'a, across the call.
        let sent = self.sendmmsg(fd, m)?;
        Ok(self.groups[..sent].iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn socket() -> (UdpSocket, SocketAddrV4) {
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let std::net::SocketAddr::V4(a) = s.local_addr().unwrap() else {
            panic!("IPv4")
        };
        (s, a)
    }

    /// As many slots as start `stride` apart and end inside the area, none when the area is
    /// shorter than one; a slot longer than the stride is cut to it.
    #[test]
    fn test_rx_slots_count_whole_slots_only() {
        let mut area = [0u8; 4 * 100 - 20];
        assert_eq!(RxSlots::new(&mut area, 100, 80).count(), 4);
        assert_eq!(RxSlots::new(&mut area, 100, 81).count(), 3);
        assert_eq!(RxSlots::new(&mut area[..79], 100, 80).count(), 0);
        assert_eq!(RxSlots::new(&mut area, 100, 0).count(), 0);
        let long = RxSlots::new(&mut area, 50, 80);
        assert_eq!((long.len, long.count()), (50, 7));
    }

    /// Each datagram lands at the start of its own slot and nowhere else; one longer than the
    /// slot is cut and reported truncated, with its sender.
    #[test]
    fn test_recv_fills_each_slot_and_reports_truncation() {
        let (rx, rx_addr) = socket();
        rx.set_nonblocking(true).unwrap();
        let (tx, tx_addr) = socket();
        for (i, len) in [10usize, 64, 200].into_iter().enumerate() {
            tx.send_to(&vec![i as u8 + 1; len], rx_addr).unwrap();
        }
        let mut area = vec![0xeeu8; 3 * 128];
        let mut mmsg = Mmsg::new(8);
        std::thread::sleep(Duration::from_millis(50));
        let got = mmsg
            .recv(rx.as_fd(), RxSlots::new(&mut area, 128, 100))
            .unwrap();
        assert_eq!(got, 3);
        for (i, (len, truncated)) in [(10, false), (64, false), (100, true)]
            .into_iter()
            .enumerate()
        {
            let r = mmsg.received(i);
            assert_eq!(
                r,
                Received {
                    len,
                    peer: tx_addr,
                    truncated
                },
                "slot {i}"
            );
            let slot = &area[i * 128..(i + 1) * 128];
            assert!(slot[..len].iter().all(|&b| b == i as u8 + 1), "slot {i}");
            assert!(
                slot[len..].iter().all(|&b| b == 0xee),
                "past slot {i}'s datagram"
            );
        }
    }

    /// Datagram `k` is `item(k)`: one buffer may go to several peers (without GSO), and with
    /// GSO a run to one peer still arrives as its datagrams, in order.
    #[test]
    fn test_send_reads_each_item_in_order() {
        let (a, a_addr) = socket();
        let (b, b_addr) = socket();
        a.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (tx, _) = socket();
        let bufs = [[1u8; 300], [2; 300], [3; 300]];
        let mut mmsg = Mmsg::new(8);
        let to = [a_addr, b_addr, a_addr];
        let sent = mmsg
            .send_without_gso(tx.as_fd(), 3, |k| (&bufs[0][..100 * (k + 1)], to[k]))
            .unwrap();
        assert_eq!(sent, 3);
        let mut buf = [0u8; 1000];
        assert_eq!(a.recv(&mut buf).unwrap(), 100);
        assert_eq!(b.recv(&mut buf).unwrap(), 200);
        assert_eq!(a.recv(&mut buf).unwrap(), 300);
        mmsg.set_gso(true);
        let sent = mmsg
            .send(tx.as_fd(), 3, |k| (&bufs[k][..], b_addr))
            .unwrap();
        assert_eq!(sent, 3);
        for k in 0..3u8 {
            let n = b.recv(&mut buf).unwrap();
            assert_eq!(n, 300);
            assert!(buf[..n].iter().all(|&x| x == k + 1), "datagram {k}");
        }
    }
}
