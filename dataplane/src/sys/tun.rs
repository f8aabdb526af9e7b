//! Opening TUN and TAP queues: open(2) of /dev/net/tun and the TUNSETIFF ioctl.
//!
//! With `IFF_MULTI_QUEUE` every open+TUNSETIFF on the same name attaches one more queue to the
//! device; the kernel spreads packets across queues by flow hash, so one flow stays on one queue.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// TUNSETOFFLOAD flags: the kernel may hand us packets with partial checksums (CSUM) and TCP
/// superframes (TSO4, and with ECN's CWR handling: TSO_ECN).
pub const TUN_F_CSUM: libc::c_uint = 0x01;
pub const TUN_F_TSO4: libc::c_uint = 0x02;
pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;
/// UDP superframes (USO, a sender's UDP_SEGMENT kept whole), Linux 6.2+. The kernel takes
/// them only together (one device feature covers both families); only IPv4 is routed to us.
pub const TUN_F_USO4: libc::c_uint = 0x20;
pub const TUN_F_USO6: libc::c_uint = 0x40;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags of the union.
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Which kind of device: IP packets (TUN) or Ethernet frames (TAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tun,
    Tap,
}

/// Opens one queue of TUN or TAP device `name` (created if absent; a name ending in `%d` is
/// numbered by the kernel) in non-blocking mode and returns its descriptor and the device's
/// actual name.
pub fn open_queue(
    name: &str,
    kind: Kind,
    multi_queue: bool,
    vnet_hdr: bool,
) -> io::Result<(OwnedFd, String)> {
    if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let path = CString::new("/dev/net/tun").expect("static path has no NUL");
    // SAFETY: `path` is a NUL-terminated string that lives across the call.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by open(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let mut flags = libc::IFF_NO_PI
        | match kind {
            Kind::Tun => libc::IFF_TUN,
            Kind::Tap => libc::IFF_TAP,
        };
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    req.flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` has its layout (16-byte name,
    // then the union, whose first member we use is a short), is 40 bytes like the kernel's, and
    // lives across the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReqFlags) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let actual: Vec<u8> = req
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok((fd, String::from_utf8_lossy(&actual).into_owned()))
}

/// Tells the kernel which offloads this TUN queue's reader handles (TUNSETOFFLOAD).
pub fn set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int of flags); no memory
    // is passed.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_ifreq_is_kernel_sized() {
        assert_eq!(core::mem::size_of::<super::IfReqFlags>(), 40);
    }
}
