//! read(2), write(2) and poll(2) on one descriptor.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

fn cvt(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// One read(2) into `buf`.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable region of `buf.len()` bytes for the whole call and `fd` is
    // a live descriptor borrowed for the call.
    cvt(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// One write(2) of `buf`.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable region of `buf.len()` bytes for the whole call and `fd` is
    // a live descriptor borrowed for the call.
    cvt(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
}

/// One writev(2) of `prefix` followed by `buf` (a TUN frame's virtio-net header and packet).
pub fn write_prefixed(fd: BorrowedFd<'_>, prefix: &[u8], buf: &[u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec {
            iov_base: prefix.as_ptr() as *mut libc::c_void,
            iov_len: prefix.len(),
        },
        libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        },
    ];
    // SAFETY: both iovecs describe live, readable slices borrowed across the call; writev only
    // reads through them; the count matches the array.
    cvt(unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) })
}

/// Waits up to `timeout_ms` for `fd` to become writable; returns whether it did.
pub fn wait_writable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, initialised pollfd and we pass a count of 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n > 0 && pfd.revents & libc::POLLOUT != 0)
}
