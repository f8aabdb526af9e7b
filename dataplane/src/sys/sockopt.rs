//! Socket options socket2 does not cover.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: we pass a pointer to a live c_int and its exact size; the kernel only reads it.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            core::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// SO_RCVBUFFORCE / SO_SNDBUFFORCE: socket buffers above `rmem_max` (needs CAP_NET_ADMIN).
pub fn set_buffers_force(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v)?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v)
}

/// `SOL_UDP` option: deliver coalesced datagrams (UDP GRO) with their segment size in a
/// control message.
pub const UDP_GRO: libc::c_int = 104;

/// Asks for UDP GRO on a UDP socket (Linux 5.0+); an error means the kernel has none.
pub fn set_udp_gro(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    set_int(fd, libc::SOL_UDP, UDP_GRO, libc::c_int::from(on))
}

/// `SO_MEMINFO` (asm-generic/socket.h; libc has the offsets but not the option).
const SO_MEMINFO: libc::c_int = 55;
/// Entries of the `SO_MEMINFO` array (`SK_MEMINFO_VARS`).
const SK_MEMINFO_VARS: usize = 9;

/// Datagrams the kernel dropped at this socket since it was opened (its receive queue was
/// full, mostly): `SK_MEMINFO_DROPS`, what `ss -m` prints as `d`.
pub fn rx_drops(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = core::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is that large, and
    // updates `len`, a live socklen_t.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[libc::SK_MEMINFO_DROPS as usize])
}

fn get_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = core::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, a live c_int of that size, and
    // updates `len`, a live socklen_t.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// `IP_MTU` of a connected socket: the path MTU of its route as the kernel knows it now (a
/// "fragmentation needed" the kernel accepted lowers it; ENOTCONN on an unconnected socket).
pub fn path_mtu(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get_int(fd, libc::IPPROTO_IP, libc::IP_MTU).map(|v| v.max(0) as u32)
}
