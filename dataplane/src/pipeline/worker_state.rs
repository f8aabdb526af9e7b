//! What the pipeline keeps per worker besides connection tracking, applied to each decision
//! as the kernel's VXLAN device and ICMP layer would:
//! - **path MTUs** toward peers that the kernel lowered after a "fragmentation needed" (learned
//!   from the tunnel's sockets): a pod packet with DF that would not fit the peer's path once
//!   encapsulated is answered with "fragmentation needed" carrying the tunnel's MTU, as the
//!   kernel's `skb_tunnel_check_pmtu` does, so the pod lowers its own path MTU;
//! - **ICMP rate limits**: the errors we generate for pods are limited per destination
//!   (`net.ipv4.icmp_ratelimit`, 1 s, bursts of 6) and per node (`icmp_msgs_per_sec` 1000,
//!   burst 50), with "fragmentation needed" exempt, as the kernel's `icmpv4_xrlim_allow` and
//!   `icmp_global_allow` do.

use super::{icmp_error, Direction, Encap, Tables, VXLAN_OVERHEAD};
use crate::batch::Meta;
use crate::verdict::{DropReason, Verdict};
use crate::wire::{icmpv4, ipv4, udp};
use core::net::Ipv4Addr;
use rustc_hash::FxHashMap;

/// How long a learned path MTU holds: the kernel's `net.ipv4.route.mtu_expires` (600 s).
pub const PATH_MTU_EXPIRES_MS: u64 = 600_000;
/// The lowest path MTU the kernel accepts from an ICMP error (`net.ipv4.route.min_pmtu`).
pub const MIN_PATH_MTU: u32 = 552;
/// Peers with a lowered path MTU one worker remembers; past it, new ones are ignored (their
/// datagrams are then fragmented by the kernel, as before).
const MAX_PATH_MTUS: usize = 4096;

/// Path MTUs toward peers, lower than the underlay's, with their expiry.
#[derive(Debug, Default)]
pub struct PathMtus {
    peers: FxHashMap<Ipv4Addr, (u32, u64)>,
}

impl PathMtus {
    /// The kernel reported `mtu` toward `peer` at `now` (ms).
    pub fn learn(&mut self, peer: Ipv4Addr, mtu: u32, now: u64) {
        if self.peers.len() >= MAX_PATH_MTUS && !self.peers.contains_key(&peer) {
            return;
        }
        self.peers
            .insert(peer, (mtu.max(MIN_PATH_MTU), now + PATH_MTU_EXPIRES_MS));
    }

    /// The path MTU toward `peer`, if one was learned and has not expired.
    #[inline]
    pub fn get(&mut self, peer: Ipv4Addr, now: u64) -> Option<u32> {
        if self.peers.is_empty() {
            return None;
        }
        match self.peers.get(&peer) {
            Some(&(mtu, expires)) if now < expires => Some(mtu),
            Some(_) => {
                self.peers.remove(&peer);
                None
            }
            None => None,
        }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// `net.ipv4.icmp_ratelimit`: one error per destination per second...
const PER_DEST_INTERVAL_MS: u64 = 1000;
/// ...in bursts of up to 6 (`XRLIM_BURST_FACTOR`).
const PER_DEST_BURST: u64 = 6;
/// `net.ipv4.icmp_msgs_per_sec` and `icmp_msgs_burst`.
const NODE_PER_SEC: u64 = 1000;
const NODE_BURST: u64 = 50;
/// Destinations tracked at once (a fixed table: a destination that lands on a slot held by
/// another takes it over with a full bucket; the node-wide limit still holds).
const DEST_SLOTS: usize = 1024;

/// The kernel's two ICMP error limits, in milliseconds of tokens.
#[derive(Debug)]
pub struct IcmpRateLimit {
    /// Per slot: the destination, its tokens (ms) and when they were last topped up.
    dests: Box<[(Ipv4Addr, u64, u64)]>,
    /// Node-wide credit in thousandths of a message, and when it was last topped up.
    credit: u64,
    credit_at: u64,
}

impl Default for IcmpRateLimit {
    fn default() -> Self {
        IcmpRateLimit {
            dests: vec![(Ipv4Addr::UNSPECIFIED, 0, 0); DEST_SLOTS].into_boxed_slice(),
            credit: NODE_BURST * 1000,
            credit_at: 0,
        }
    }
}

impl IcmpRateLimit {
    /// Whether an error to `dst` may be sent at `now` (ms); takes its tokens if so.
    pub fn allow(&mut self, dst: Ipv4Addr, now: u64) -> bool {
        let max = PER_DEST_BURST * PER_DEST_INTERVAL_MS;
        let h = (u32::from(dst).wrapping_mul(0x9e37_79b1) >> 16) as usize % DEST_SLOTS;
        let slot = &mut self.dests[h];
        if slot.0 != dst {
            // A destination not seen (or forgotten): a full bucket, as a new inet_peer. (No
            // error goes to 0.0.0.0, the empty slots' destination.)
            *slot = (dst, max, now);
        }
        let tokens = (slot.1 + now.saturating_sub(slot.2)).min(max);
        slot.2 = now;
        let per_dest = tokens >= PER_DEST_INTERVAL_MS;
        slot.1 = if per_dest {
            tokens - PER_DEST_INTERVAL_MS
        } else {
            tokens
        };
        if !per_dest {
            return false;
        }
        self.credit = (self.credit + now.saturating_sub(self.credit_at) * NODE_PER_SEC)
            .min(NODE_BURST * 1000);
        self.credit_at = now;
        if self.credit < 1000 {
            // Give the destination its token back: the node's limit refused, not its own.
            slot.1 += PER_DEST_INTERVAL_MS;
            return false;
        }
        self.credit -= 1000;
        true
    }
}

/// The pipeline's per-worker state (see the module doc).
#[derive(Debug, Default)]
pub struct WorkerState {
    pub path_mtus: PathMtus,
    pub icmp: IcmpRateLimit,
}

impl WorkerState {
    /// Revises a decided verdict: the rate limit on the ICMP errors the pipeline generated
    /// (toward pods, and toward the wire's clients), and for a packet from the pods
    /// "fragmentation needed" when it no longer fits its peer's path.
    pub(super) fn revise(
        &mut self,
        t: &Tables,
        dir: Direction,
        slot: &mut [u8],
        meta: &mut Meta,
        now: u64,
    ) {
        if meta.icmp_error {
            if !matches!(meta.verdict, Verdict::Drop(_)) && !self.may_send(slot, meta, now) {
                meta.verdict = Verdict::Drop(DropReason::IcmpRateLimited);
            }
            return;
        }
        if dir != Direction::FromTun {
            return;
        }
        let (peer, overhead) = match (meta.verdict, t.encap) {
            (Verdict::ToUnderlay(peer), Encap::FlannelUdp) => {
                (*peer.ip(), ipv4::HEADER_LEN + udp::HEADER_LEN)
            }
            (Verdict::ToUnderlayIp(peer), Encap::Vxlan { .. }) => (peer, VXLAN_OVERHEAD),
            _ => return,
        };
        let Some(mtu) = self.path_mtus.get(peer, now) else {
            return;
        };
        // VXLAN verdicts hold the outer headers the pipeline wrote; flannel's udp, the inner
        // packet alone.
        let inner_start = match t.encap {
            Encap::FlannelUdp => meta.start,
            Encap::Vxlan { .. } => meta.start + VXLAN_OVERHEAD,
        };
        let inner_len = match t.encap {
            Encap::FlannelUdp => meta.len,
            Encap::Vxlan { .. } => meta.len - VXLAN_OVERHEAD,
        };
        let outer = inner_len + overhead;
        if outer <= mtu as usize {
            return;
        }
        let inner = ipv4::Packet::new_unchecked(&slot[inner_start..inner_start + inner_len]);
        if !inner.dont_frag() {
            return; // the kernel fragments the datagram on its way out
        }
        meta.start = inner_start;
        meta.len = inner_len;
        let tunnel_mtu = (mtu as usize - overhead) as u16;
        meta.verdict = icmp_error(
            slot,
            meta,
            icmpv4::unreachable::FRAG_NEEDED,
            tunnel_mtu,
            t.local.tun_addr,
        );
    }

    /// The rate limit for an ICMP error we generated (in `slot`); "fragmentation needed" is
    /// never limited, as in the kernel.
    fn may_send(&mut self, slot: &[u8], meta: &Meta, now: u64) -> bool {
        let pkt = &slot[meta.start..meta.start + meta.len];
        let ip = ipv4::Packet::new_unchecked(pkt);
        let icmp = ip.payload();
        let frag_needed = icmp.len() >= 2
            && icmp[0] == icmpv4::kind::DEST_UNREACHABLE
            && icmp[1] == icmpv4::unreachable::FRAG_NEEDED;
        frag_needed || self.icmp.allow(ip.dst(), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_path_mtu_is_clamped_and_expires() {
        let mut p = PathMtus::default();
        let peer = Ipv4Addr::new(192, 168, 1, 2);
        assert_eq!(p.get(peer, 0), None);
        p.learn(peer, 100, 1000);
        assert_eq!(p.get(peer, 1000), Some(MIN_PATH_MTU));
        p.learn(peer, 1400, 2000);
        assert_eq!(p.get(peer, 2000 + PATH_MTU_EXPIRES_MS - 1), Some(1400));
        assert_eq!(p.get(peer, 2000 + PATH_MTU_EXPIRES_MS), None);
        assert!(p.is_empty());
    }

    /// Six to one destination at once, then one a second; another destination has its own
    /// bucket; the node's 50-message burst caps many destinations at once.
    #[test]
    fn test_icmp_rate_limit_as_the_kernel() {
        let mut l = IcmpRateLimit::default();
        let a = Ipv4Addr::new(10, 244, 1, 2);
        let now = 10_000;
        let sent = (0..20).filter(|_| l.allow(a, now)).count();
        assert_eq!(sent, 6);
        assert!(!l.allow(a, now + 999));
        assert!(l.allow(a, now + 1000));
        assert!(l.allow(Ipv4Addr::new(10, 244, 1, 3), now + 1000));
        let mut l = IcmpRateLimit::default();
        let many = (0..200u32)
            .filter(|i| l.allow(Ipv4Addr::from(0x0af4_0000 + i * 7919), now))
            .count();
        assert_eq!(many, 50, "the node-wide burst");
        // A second later, the node has 1000 more messages of credit, capped at the burst.
        let more = (0..200u32)
            .filter(|i| l.allow(Ipv4Addr::from(0x0bf4_0000 + i * 7919), now + 1000))
            .count();
        assert_eq!(more, 50);
    }
}
