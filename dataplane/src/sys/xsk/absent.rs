//! `XskSocket` without the `xdp` feature: there is no libxdp to bind with (xsk-rs builds it with
//! clang), so the type exists for the ports and the worker to compile, and binding one is an
//! error. No value of it can exist, so its methods are never called.

use super::{XskActivity, XskConfig, XskStats};
use std::convert::Infallible;
use std::io;
use std::os::fd::RawFd;

pub struct XskSocket {
    never: Infallible,
}

impl XskSocket {
    /// Always an error: AF_XDP sockets need the `xdp` feature.
    pub fn bind(ifname: &str, queue: u32, _config: XskConfig) -> io::Result<XskSocket> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "AF_XDP socket on {ifname} queue {queue}: podwire was built without AF_XDP \
                 (podwire-dataplane's `xdp` feature, which needs clang)"
            ),
        ))
    }

    pub fn raw_fd(&self) -> RawFd {
        match self.never {}
    }

    pub fn zero_copy(&self) -> bool {
        match self.never {}
    }

    pub fn recv(&mut self, _max: usize, _f: impl FnMut(&[u8])) -> usize {
        match self.never {}
    }

    pub fn send<'a>(&mut self, _frames: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> usize {
        match self.never {}
    }

    pub fn flush(&mut self) -> usize {
        match self.never {}
    }

    pub fn send_frames_free(&mut self) -> usize {
        match self.never {}
    }

    pub fn send_frames(&self) -> usize {
        match self.never {}
    }

    pub fn take_activity(&mut self) -> XskActivity {
        match self.never {}
    }

    pub fn stats(&self) -> io::Result<XskStats> {
        match self.never {}
    }
}
