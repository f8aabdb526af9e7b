//! An AF_XDP socket on one queue of an interface, with a UMEM of its own (xsk-rs over libxdp),
//! behind a safe interface: frames are copied in and out, so no caller ever holds a frame
//! descriptor and none can be handed to two rings at once or lost.
//!
//! Frame ownership, which is what keeps the UMEM from leaking: the first half of the frames
//! is for receiving and lives in the fill ring, the kernel's RX ring, or for an instant here
//! while being copied out (then straight back to the fill ring); the second half is for
//! sending and lives in `tx_free`, the TX ring, or the completion ring (reclaimed into
//! `tx_free` before every send). [`XskSocket::send_frames_free`] tells whether all came back.
//!
//! The XDP program is podwire's own (`port::xdp`), so libxdp is told not to load one
//! (`XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD`); the caller puts this socket in the program's
//! `xsks_map`. `XDP_USE_NEED_WAKEUP` lets the kernel sleep until asked.

#[cfg(feature = "xdp")]
use std::io::{self, Write};
#[cfg(feature = "xdp")]
use std::num::NonZeroU32;
#[cfg(feature = "xdp")]
use std::os::fd::{AsRawFd, RawFd};
#[cfg(feature = "xdp")]
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
#[cfg(feature = "xdp")]
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

// Without the `xdp` feature there is no xsk-rs (its libxdp build needs clang): a socket that
// cannot be bound stands in.
#[cfg(not(feature = "xdp"))]
mod absent;
#[cfg(not(feature = "xdp"))]
pub use absent::XskSocket;

/// How an AF_XDP socket is sized.
#[derive(Debug, Clone, Copy)]
pub struct XskConfig {
    /// Frames in the UMEM (half for receiving, half for sending); a power of two.
    pub frames: u32,
    /// Bytes per frame (2048 or 4096).
    pub frame_size: u32,
    /// Force copy mode (veth offers nothing else); else zero-copy is tried first.
    pub copy: bool,
}

impl Default for XskConfig {
    fn default() -> Self {
        XskConfig {
            frames: 4096,
            frame_size: 2048,
            // Zero-copy where the driver has it; veth and most drivers fall back to copy.
            copy: false,
        }
    }
}

/// Kernel counters of the socket (`XDP_STATISTICS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XskStats {
    pub rx_dropped: u64,
    pub rx_ring_full: u64,
    pub rx_fill_ring_empty: u64,
    pub rx_invalid: u64,
    pub tx_invalid: u64,
}

/// What a socket did since it was last asked: frames moved, and the system calls (wakeups)
/// it took, so frames per wakeup can be told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XskActivity {
    pub rx_frames: u64,
    /// Receives that found frames.
    pub rx_batches: u64,
    pub tx_frames: u64,
    /// Wakeups of the kernel: fill-ring wakeups on receive, kicks on send.
    pub wakeups: u64,
}

#[cfg(feature = "xdp")]
pub struct XskSocket {
    // Field order is drop order: the rings before the UMEM they map.
    rx: RxQueue,
    tx: TxQueue,
    fill: FillQueue,
    comp: CompQueue,
    umem: Umem,
    /// Send frames not in the kernel's hands.
    tx_free: Vec<FrameDesc>,
    /// Receive frames just taken from the RX ring (scratch, refilled at once).
    rx_taken: Vec<FrameDesc>,
    /// Completion scratch.
    completed: Vec<FrameDesc>,
    /// Send scratch: the frames of one send, in order.
    staged: Vec<FrameDesc>,
    half: usize,
    zero_copy: bool,
    template: FrameDesc,
    activity: XskActivity,
}

#[cfg(feature = "xdp")]
fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

#[cfg(feature = "xdp")]
impl XskSocket {
    /// Binds a socket to queue `queue` of `ifname` (zero-copy if asked for and offered, else
    /// copy mode) and puts the receive half of its frames in the fill ring.
    pub fn bind(ifname: &str, queue: u32, config: XskConfig) -> io::Result<XskSocket> {
        let frames = config.frames.next_power_of_two().max(64);
        let half = (frames / 2) as usize;
        let ring = QueueSize::new(frames / 2).map_err(|e| other("ring size", e))?;
        let umem_config = UmemConfig::builder()
            .frame_size(FrameSize::new(config.frame_size).map_err(|e| other("frame size", e))?)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| other("UMEM config", e))?;
        let (umem, mut descs) = Umem::new(
            umem_config,
            NonZeroU32::new(frames).expect("at least 64"),
            false,
        )
        .map_err(|e| other("UMEM", e))?;
        let iface: Interface = ifname
            .parse()
            .map_err(|e| other("interface name", format!("{e:?}")))?;
        let attempt = |bind: BindFlags| {
            let cfg = SocketConfig::builder()
                .rx_queue_size(ring)
                .tx_queue_size(ring)
                .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
                .bind_flags(bind | BindFlags::XDP_USE_NEED_WAKEUP)
                .build();
            // SAFETY: this UMEM is new and shared with no other socket, so the only condition
            // of `Socket::new` (INHIBIT_PROG_LOAD when sharing a bound pair) does not arise; we
            // set that flag anyway.
            unsafe { Socket::new(cfg, &umem, &iface, queue) }
        };
        let bound = if config.copy {
            attempt(BindFlags::XDP_COPY).map(|r| (false, r))
        } else {
            attempt(BindFlags::XDP_ZEROCOPY)
                .map(|r| (true, r))
                .or_else(|_| attempt(BindFlags::XDP_COPY).map(|r| (false, r)))
        };
        let (zero_copy, (tx, rx, rings)) =
            bound.map_err(|e| other(&format!("AF_XDP socket on {ifname} queue {queue}"), e))?;
        let (mut fill, comp) = rings.ok_or_else(|| other("AF_XDP socket", "no fill ring"))?;
        let tx_free = descs.split_off(half);
        // SAFETY: these frames come from this socket's own UMEM and are in no other ring.
        let filled = unsafe { fill.produce(&descs) };
        if filled != descs.len() {
            return Err(other(
                "fill ring",
                format!("took {filled} of {}", descs.len()),
            ));
        }
        let template = descs[0];
        let rx_taken = descs;
        Ok(XskSocket {
            rx,
            tx,
            fill,
            comp,
            umem,
            tx_free,
            rx_taken,
            completed: Vec::with_capacity(half),
            staged: Vec::with_capacity(half),
            half,
            zero_copy,
            template,
            activity: XskActivity::default(),
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// Whether the socket runs zero-copy (else copy mode).
    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// Hands up to `max` received frames to `f`, in order, then gives their frames back to
    /// the fill ring. Returns how many.
    pub fn recv(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let n = max.min(self.rx_taken.len());
        // SAFETY: `rx_taken` holds this UMEM's descriptors, used here only as slots the ring
        // writes the received frames' addresses and lengths into.
        let got = unsafe { self.rx.consume(&mut self.rx_taken[..n]) };
        for desc in &self.rx_taken[..got] {
            // SAFETY: the kernel handed this frame over through the RX ring; it stays ours
            // until we put it back in the fill ring below.
            let data = unsafe { self.umem.data(desc) };
            f(data.contents());
        }
        if got > 0 {
            // SAFETY: the frames were just consumed from the RX ring and are in no other ring.
            let back = unsafe { self.fill.produce(&self.rx_taken[..got]) };
            // The fill ring has room for every receive frame, so this cannot come up short;
            // if it ever did, the frames would be lost to receiving, so say so loudly.
            debug_assert_eq!(back, got, "fill ring refused frames");
            self.activity.rx_frames += got as u64;
            self.activity.rx_batches += 1;
            if self.fill.needs_wakeup() {
                self.activity.wakeups += 1;
                let _ = self.fill.wakeup(self.rx.fd_mut(), 0);
            }
        }
        got
    }

    /// Takes back the frames the kernel finished sending.
    fn reclaim(&mut self) {
        let room = self.half - self.tx_free.len();
        if room == 0 {
            return;
        }
        // Scratch slots for the ring to write completed frames into (their contents are
        // overwritten; any descriptor serves as a template).
        self.completed.clear();
        self.completed.resize(room, self.template);
        // SAFETY: the completion ring returns this UMEM's send frames; the scratch slots are
        // overwritten with their addresses.
        let n = unsafe { self.comp.consume(&mut self.completed[..room]) };
        self.tx_free.extend_from_slice(&self.completed[..n]);
    }

    /// Sends each frame `frames` yields, as a header and a body copied one after the other
    /// into a UMEM frame, as many as there are free send frames; returns how many were queued.
    pub fn send<'a>(&mut self, frames: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> usize {
        self.reclaim();
        // Frames take free descriptors in the order they come, so the TX ring keeps their order.
        self.staged.clear();
        for (header, body) in frames {
            let Some(mut desc) = self.tx_free.pop() else {
                break;
            };
            // SAFETY: a free send frame: in no ring, so nothing else reads or writes it.
            let mut data = unsafe { self.umem.data_mut(&mut desc) };
            let mut cursor = data.cursor();
            cursor.set_pos(0);
            if cursor
                .write_all(header)
                .and_then(|_| cursor.write_all(body))
                .is_err()
            {
                // Longer than a frame: skipped (the caller counts it from the return value).
                self.tx_free.push(desc);
                continue;
            }
            self.staged.push(desc);
        }
        if self.staged.is_empty() {
            return 0;
        }
        // SAFETY: the staged frames were just written and are in no ring.
        let sent = unsafe { self.tx.produce(&self.staged) };
        // The TX ring is as large as the send half, so it takes them all; were it ever to
        // refuse, the frames go back to the free list rather than leak.
        self.tx_free.extend_from_slice(&self.staged[sent..]);
        self.activity.tx_frames += sent as u64;
        // Copy mode sends only on a wakeup, whatever the ring's need-wakeup flag says.
        if self.tx.needs_wakeup() || !self.zero_copy {
            self.activity.wakeups += 1;
            let _ = self.tx.wakeup();
        }
        sent
    }

    /// Gets queued frames moving: in copy mode the kernel sends only a budget of frames per
    /// wakeup, so whatever is still in the TX ring needs another. Returns the frames still in
    /// the kernel's hands.
    pub fn flush(&mut self) -> usize {
        self.reclaim();
        let in_flight = self.half - self.tx_free.len();
        if in_flight > 0 {
            self.activity.wakeups += 1;
            let _ = self.tx.wakeup();
        }
        in_flight
    }

    /// Send frames back in our hands, of [`XskSocket::send_frames`]: once the kernel has
    /// sent everything, all of them, or a frame leaked.
    pub fn send_frames_free(&mut self) -> usize {
        self.reclaim();
        self.tx_free.len()
    }

    /// Frames set aside for sending.
    pub fn send_frames(&self) -> usize {
        self.half
    }

    /// What the socket did since the last call.
    pub fn take_activity(&mut self) -> XskActivity {
        std::mem::take(&mut self.activity)
    }

    /// The kernel's counters for this socket.
    pub fn stats(&self) -> io::Result<XskStats> {
        let s = self.rx.fd().xdp_statistics()?;
        Ok(XskStats {
            rx_dropped: s.rx_dropped(),
            rx_ring_full: s.rx_ring_full(),
            rx_fill_ring_empty: s.rx_fill_ring_empty_descs(),
            rx_invalid: s.rx_invalid_descs(),
            tx_invalid: s.tx_invalid_descs(),
        })
    }
}
