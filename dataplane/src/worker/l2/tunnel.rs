//! The tunnel's share of a batch from offload ports: TSO superframes cut into segments (and
//! partial checksums finished) into the tunnel's own transmit batch, encapsulated, and sent
//! with UDP GSO.

use super::bridged::L2Worker;
use crate::batch::Batch;
use crate::offload::segment;
use crate::stats::{Counter, LocalStats};
use crate::verdict::DropReason;
use crate::wire::{ethernet, vnet, vxlan};
use crate::worker::count_sent;

/// Slots of the tunnel's transmit batch (segments of superframes, flood copies).
pub(super) const TUNNEL_TX_SLOTS: usize = 256;

impl L2Worker {
    /// The tunnel's share of a batch from offload ports, in order: each frame copied (or, a
    /// superframe, cut into segments) into the tunnel's transmit batch, once per VTEP, with
    /// partial checksums finished, encapsulated, and sent with UDP GSO.
    pub(super) fn send_segmented(
        &mut self,
        batch: &Batch,
        vni: vxlan::Vni,
        stats: &mut LocalStats,
    ) {
        self.tunnel_tx.clear();
        for k in 0..self.remote.len() {
            let (i, peer) = self.remote[k];
            let i = usize::from(i);
            let (Some(with_hdr), frame) = (
                batch.packet_with_prefix(i, vnet::HEADER_LEN),
                batch.packet(i),
            ) else {
                stats.drop(DropReason::Truncated);
                continue;
            };
            let Ok(hdr) = vnet::VnetHeader::parse(with_hdr) else {
                stats.drop(DropReason::Truncated);
                continue;
            };
            let count = if hdr.is_gso() && frame.len() > ethernet::HEADER_LEN {
                segment::segment_count(&hdr, &frame[ethernet::HEADER_LEN..])
            } else {
                Ok(1)
            };
            let Ok(count) = count else {
                stats.drop(DropReason::Oversized);
                continue;
            };
            for seg in 0..count {
                if self.tunnel_tx.len() == self.tunnel_tx.capacity() {
                    self.flush_tunnel(stats);
                }
                let j = self.tunnel_tx.len();
                let slot = self.tunnel_tx.rx_slot(j);
                let len = if hdr.is_gso() {
                    let (eth, rest) = slot.split_at_mut(ethernet::HEADER_LEN);
                    eth.copy_from_slice(&frame[..ethernet::HEADER_LEN]);
                    segment::segment(&hdr, &frame[ethernet::HEADER_LEN..], seg, rest)
                        .map(|n| n + ethernet::HEADER_LEN)
                        .ok()
                } else if frame.len() <= slot.len() {
                    slot[..frame.len()].copy_from_slice(frame);
                    let finished = hdr.flags & vnet::F_NEEDS_CSUM == 0
                        || segment::finish_checksum(
                            &mut slot[..frame.len()],
                            usize::from(hdr.csum_start),
                            usize::from(hdr.csum_offset),
                        )
                        .is_ok();
                    finished.then_some(frame.len())
                } else {
                    None
                };
                let Some(len) = len else {
                    stats.drop(DropReason::Oversized);
                    continue;
                };
                self.tunnel_tx.commit_rx(j, len, peer, false);
                let (slot, meta) = self.tunnel_tx.slot_mut(j);
                meta.start -= vxlan::HEADER_LEN;
                meta.len += vxlan::HEADER_LEN;
                vxlan::Repr { vni }.emit(&mut slot[meta.start..]);
            }
        }
        self.flush_tunnel(stats);
        self.remote.clear();
    }

    fn flush_tunnel(&mut self, stats: &mut LocalStats) {
        let n = self.tunnel_tx.len();
        if n == 0 {
            return;
        }
        // Every slot of the tunnel's batch in order, each to the VTEP in its metadata.
        let indices: [u16; TUNNEL_TX_SLOTS] = core::array::from_fn(|k| k as u16);
        let out = self.underlay.send_datagrams(&self.tunnel_tx, &indices[..n]);
        count_sent(stats, Counter::TxUnderlay, out);
        self.tunnel_tx.clear();
    }
}
