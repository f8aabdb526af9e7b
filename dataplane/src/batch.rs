//! Fixed-capacity packet batches over one arena allocated once per worker.
//!
//! Each frame slot is `frame_size` bytes: `HEADROOM` bytes in front, where encapsulation can
//! prepend headers without moving the packet, then the packet as the port received it. The
//! packet's bytes are `slot[meta.start .. meta.start + meta.len]`.

use crate::verdict::Verdict;
use core::net::{Ipv4Addr, SocketAddrV4};

/// Bytes reserved in front of every received packet for headers we prepend.
pub const HEADROOM: usize = 128;

/// Most packets one batch holds: what a worker moves per round and ports size their queues by.
pub const MAX_BATCH: usize = 256;

/// What we know about one packet besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Offset of the packet in its slot.
    pub start: usize,
    /// Length of the packet.
    pub len: usize,
    /// Underlay peer: the sender on receive, the destination on transmit.
    pub peer: SocketAddrV4,
    /// The port saw more bytes than the slot holds (the packet is cut short).
    pub oversized: bool,
    /// The pipeline completed an offloaded (partial) inner L4 checksum.
    pub completed_checksum: bool,
    /// An IPv4 packet to the node's own address from the wire (`--io xdp`: a NodePort
    /// connection, or the answer to a masqueraded one), not a datagram of the underlay.
    pub wire: bool,
    /// The pipeline replaced the packet by an ICMP error of its own (for the rate limit).
    pub icmp_error: bool,
    /// The only source the packet may have: the pod's own address, for a packet read from a
    /// pod's port (`--pod-ports`); `None` for the TUN, whose packets are held to the lease.
    pub bound_src: Option<Ipv4Addr>,
    /// What the pipeline decided.
    pub verdict: Verdict,
}

impl Meta {
    const EMPTY: Meta = Meta {
        start: HEADROOM,
        len: 0,
        peer: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        oversized: false,
        completed_checksum: false,
        wire: false,
        icmp_error: false,
        bound_src: None,
        verdict: Verdict::Pending,
    };
}

/// A batch of up to `capacity` packets.
pub struct Batch {
    arena: Box<[u8]>,
    frame_size: usize,
    meta: Box<[Meta]>,
    len: usize,
}

impl Batch {
    /// Allocates `capacity` slots of `frame_size` bytes (which includes `HEADROOM`).
    ///
    /// # Panics
    /// If `frame_size <= HEADROOM` or `capacity == 0`: a configuration bug, not packet input.
    pub fn new(capacity: usize, frame_size: usize) -> Batch {
        assert!(
            frame_size > HEADROOM && capacity > 0,
            "batch needs room for packets"
        );
        Batch {
            arena: vec![0u8; capacity * frame_size].into_boxed_slice(),
            frame_size,
            meta: vec![Meta::EMPTY; capacity].into_boxed_slice(),
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.meta.len()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn frame_size(&self) -> usize {
        self.frame_size
    }
    /// Largest packet a slot can receive.
    pub fn max_packet(&self) -> usize {
        self.frame_size - HEADROOM
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Resets slot `i` for a receive and returns where the packet goes (after the headroom).
    pub fn rx_slot(&mut self, i: usize) -> &mut [u8] {
        self.meta[i] = Meta::EMPTY;
        let fs = self.frame_size;
        &mut self.arena[i * fs + HEADROOM..(i + 1) * fs]
    }

    /// Records that slot `i` received `len` bytes from `peer`; slots `0..=i` are now the batch.
    pub fn commit_rx(&mut self, i: usize, len: usize, peer: SocketAddrV4, oversized: bool) {
        let m = &mut self.meta[i];
        m.start = HEADROOM;
        m.len = len.min(self.frame_size - HEADROOM);
        m.peer = peer;
        m.oversized = oversized;
        m.completed_checksum = false;
        m.wire = false;
        m.icmp_error = false;
        m.bound_src = None;
        m.verdict = Verdict::Pending;
        self.len = self.len.max(i + 1);
    }

    /// The whole slot `i` (headroom included) and its metadata, for the pipeline.
    pub fn slot_mut(&mut self, i: usize) -> (&mut [u8], &mut Meta) {
        let fs = self.frame_size;
        (&mut self.arena[i * fs..(i + 1) * fs], &mut self.meta[i])
    }

    /// The packet bytes of slot `i`.
    pub fn packet(&self, i: usize) -> &[u8] {
        let m = &self.meta[i];
        let base = i * self.frame_size;
        &self.arena[base + m.start..base + m.start + m.len]
    }

    /// The packet bytes of slot `i` with the `before` bytes in front of them (a header kept in
    /// the headroom, such as a virtio-net header). None if the slot has no such room.
    pub fn packet_with_prefix(&self, i: usize, before: usize) -> Option<&[u8]> {
        let m = &self.meta[i];
        let base = i * self.frame_size;
        let from = m.start.checked_sub(before)?;
        Some(&self.arena[base + from..base + m.start + m.len])
    }

    pub fn meta(&self, i: usize) -> &Meta {
        &self.meta[i]
    }

    /// For vectored syscalls that fill many slots at once (`recvmmsg`): the arena from slot 0's
    /// receive area on, and the stride between slots. Slot `i`'s area starts `i * stride` bytes
    /// in and is `max_packet()` bytes long; the last one ends where the returned slice does.
    pub(crate) fn rx_area(&mut self) -> (&mut [u8], usize) {
        (&mut self.arena[HEADROOM..], self.frame_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rx_commit_packet() {
        let mut b = Batch::new(4, 512);
        b.rx_slot(1)[..3].copy_from_slice(b"abc");
        let peer = SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 8285);
        b.commit_rx(1, 3, peer, false);
        assert_eq!(b.len(), 2);
        assert_eq!(b.packet(1), b"abc");
        assert_eq!(b.meta(1).peer, peer);
        assert_eq!(b.max_packet(), 512 - HEADROOM);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn test_commit_clamps_to_slot() {
        let mut b = Batch::new(1, 256);
        b.commit_rx(0, 10_000, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), true);
        assert_eq!(b.packet(0).len(), 256 - HEADROOM);
        assert!(b.meta(0).oversized);
    }
}
