//! Packet capture on demand (`podwire ctl capture`): a worker copies what a port received into
//! a shared buffer while a capture is armed, up to its count. Off, it costs one atomic load per
//! batch; armed, a lock and a copy per packet, which is what a debugging capture may cost.

use crate::batch::Batch;
use core::net::SocketAddrV4;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// Which port's received packets to capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CapturePoint {
    /// Packets read from the TUN device (raw IPv4).
    Tun = 1,
    /// Datagrams read from the underlay socket (their UDP payload, with the sender).
    Underlay = 2,
}

/// One captured packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub time: SystemTime,
    pub data: Vec<u8>,
    /// The underlay sender (unspecified for the TUN).
    pub peer: SocketAddrV4,
}

/// The capture shared by the workers and the ctl thread.
#[derive(Debug, Default)]
pub struct Capture {
    armed: AtomicU8,
    remaining: AtomicUsize,
    frames: Mutex<Vec<Frame>>,
}

impl Capture {
    /// Starts capturing `count` packets at `point`, dropping what an earlier capture left.
    pub fn arm(&self, point: CapturePoint, count: usize) {
        self.lock().clear();
        self.remaining.store(count, Ordering::Relaxed);
        self.armed.store(point as u8, Ordering::Release);
    }

    /// Stops capturing and returns what was captured.
    pub fn take(&self) -> Vec<Frame> {
        self.armed.store(0, Ordering::Release);
        std::mem::take(&mut *self.lock())
    }

    /// Packets still wanted.
    pub fn remaining(&self) -> usize {
        self.remaining.load(Ordering::Relaxed)
    }

    /// Whether `point` is being captured (the workers' per-batch check).
    #[inline]
    pub fn wants(&self, point: CapturePoint) -> bool {
        self.armed.load(Ordering::Relaxed) == point as u8
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Frame>> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies the packets of a received batch, up to the count.
    pub fn record(&self, point: CapturePoint, batch: &Batch) {
        let mut frames = self.lock();
        if !self.wants(point) {
            return;
        }
        let time = SystemTime::now();
        for i in 0..batch.len() {
            let left = self.remaining.load(Ordering::Relaxed);
            if left == 0 {
                self.armed.store(0, Ordering::Release);
                break;
            }
            self.remaining.store(left - 1, Ordering::Relaxed);
            frames.push(Frame {
                time,
                data: batch.packet(i).to_vec(),
                peer: batch.meta(i).peer,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    fn batch(n: usize) -> Batch {
        let mut b = Batch::new(n, 256);
        for i in 0..n {
            b.rx_slot(i)[..3].copy_from_slice(&[i as u8, 1, 2]);
            b.commit_rx(i, 3, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9), false);
        }
        b
    }

    #[test]
    fn test_captures_up_to_the_count_at_the_armed_point_only() {
        let c = Capture::default();
        assert!(!c.wants(CapturePoint::Tun));
        c.arm(CapturePoint::Tun, 5);
        assert!(!c.wants(CapturePoint::Underlay));
        c.record(CapturePoint::Underlay, &batch(4));
        c.record(CapturePoint::Tun, &batch(4));
        c.record(CapturePoint::Tun, &batch(4));
        assert_eq!(c.remaining(), 0);
        assert!(!c.wants(CapturePoint::Tun), "disarmed when full");
        let frames = c.take();
        assert_eq!(frames.len(), 5);
        assert_eq!(frames[4].data, vec![0, 1, 2]);
        assert!(c.take().is_empty());
    }
}
