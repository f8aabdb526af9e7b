//! Per-worker counters: plain integers inside the batch loop, added to shared atomics once per
//! batch (Relaxed), so the hot path never contends on a cache line.

use crate::verdict::DropReason;
use core::sync::atomic::{AtomicU64, Ordering};

/// Event counters besides drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Packets read from the TUN device.
    RxTun,
    /// Datagrams read from the underlay socket.
    RxUnderlay,
    /// Packets written to the TUN device (decapsulated traffic and ICMP errors).
    TxTun,
    /// Datagrams sent on the underlay.
    TxUnderlay,
    /// ICMP destination-unreachable messages generated.
    IcmpUnreachable,
    /// Times the worker slept in epoll because it found no work.
    IdleSleeps,
    /// Inner TCP/UDP checksums completed because the sender left them for offload.
    ChecksumsCompleted,
    /// Frames read from the bridge's ports, TAP or AF_XDP (L2 mode).
    RxTap,
    /// Frames written to the bridge's ports, TAP or AF_XDP, flood copies included (L2 mode).
    TxTap,
    /// Frames flooded: unknown unicast, broadcast, multicast (L2 mode).
    Flooded,
    /// Stations learned into the FDB (L2 mode).
    FdbLearned,
    /// Stations that moved to another port or VTEP (L2 mode).
    FdbMoved,
    /// FDB entries removed by ageing (L2 mode).
    FdbAged,
    /// Source MACs not learned because the FDB was full (L2 mode).
    FdbLearnRefused,
    /// Remote static entries (a lease's VtepMAC) refused because a local port's own static
    /// entry holds that MAC (L2 mode).
    FdbRemoteRefused,
    /// Datagrams the kernel dropped at the shared underlay socket: its queue was full.
    UnderlayQueueFull,
    /// Datagrams the kernel dropped at per-peer sockets: a peer sent more than its share.
    PeerQueueFull,
    /// Per-peer sockets that could not be made (their peers use the shared socket).
    PeerSocketErrors,
    /// `--io xdp`: packets sent through the kernel because their next hop was not resolved.
    XdpViaKernel,
    /// `--io xdp`: packets from the wire to the node's address (NodePort connections, answers
    /// to masqueraded ones).
    RxWire,
    /// `--io xdp`: packets sent to hosts outside the cluster as the node (NodePort answers,
    /// masqueraded pod traffic).
    TxWire,
    /// `--io xdp`: frames received from AF_XDP sockets.
    XdpRxFrames,
    /// `--io xdp`: receives that found frames (frames per batch: xdp_rx_frames / this).
    XdpRxBatches,
    /// `--io xdp`: frames sent through AF_XDP sockets.
    XdpTxFrames,
    /// `--io xdp`: wakeups of the kernel (fill-ring wakeups, send kicks): system calls.
    XdpWakeups,
    /// `--pod-ports`: packets read from pods through AF_XDP.
    RxPods,
    /// `--pod-ports`: packets sent to pods through AF_XDP.
    TxPods,
    /// ICMP errors about our underlay datagrams a receive returned (net unreachable): counted, never fatal.
    UnderlayErrNetUnreachable,
    /// ... host unreachable, unknown, isolated or prohibited.
    UnderlayErrHostUnreachable,
    /// ... protocol unreachable.
    UnderlayErrProtoUnreachable,
    /// ... port unreachable.
    UnderlayErrPortUnreachable,
    /// ... fragmentation needed (the path MTU to a peer was lowered).
    UnderlayErrFragNeeded,
    /// ... parameter problem.
    UnderlayErrParamProblem,
    /// Other asynchronous errors a receive returned (ENOBUFS, a failed source route, ...).
    UnderlayErrOther,
}

impl Counter {
    pub const COUNT: usize = 34;
    pub const ALL: [Counter; Counter::COUNT] = [
        Counter::RxTun,
        Counter::RxUnderlay,
        Counter::TxTun,
        Counter::TxUnderlay,
        Counter::IcmpUnreachable,
        Counter::IdleSleeps,
        Counter::ChecksumsCompleted,
        Counter::RxTap,
        Counter::TxTap,
        Counter::Flooded,
        Counter::FdbLearned,
        Counter::FdbMoved,
        Counter::FdbAged,
        Counter::FdbLearnRefused,
        Counter::FdbRemoteRefused,
        Counter::UnderlayQueueFull,
        Counter::PeerQueueFull,
        Counter::PeerSocketErrors,
        Counter::XdpViaKernel,
        Counter::RxWire,
        Counter::TxWire,
        Counter::XdpRxFrames,
        Counter::XdpRxBatches,
        Counter::XdpTxFrames,
        Counter::XdpWakeups,
        Counter::RxPods,
        Counter::TxPods,
        Counter::UnderlayErrNetUnreachable,
        Counter::UnderlayErrHostUnreachable,
        Counter::UnderlayErrProtoUnreachable,
        Counter::UnderlayErrPortUnreachable,
        Counter::UnderlayErrFragNeeded,
        Counter::UnderlayErrParamProblem,
        Counter::UnderlayErrOther,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Counter::RxTun => "rx_tun",
            Counter::RxUnderlay => "rx_underlay",
            Counter::TxTun => "tx_tun",
            Counter::TxUnderlay => "tx_underlay",
            Counter::IcmpUnreachable => "icmp_unreachable",
            Counter::IdleSleeps => "idle_sleeps",
            Counter::ChecksumsCompleted => "checksums_completed",
            Counter::RxTap => "rx_tap",
            Counter::TxTap => "tx_tap",
            Counter::Flooded => "flooded",
            Counter::FdbLearned => "fdb_learned",
            Counter::FdbMoved => "fdb_moved",
            Counter::FdbAged => "fdb_aged",
            Counter::FdbLearnRefused => "fdb_learn_refused",
            Counter::FdbRemoteRefused => "fdb_remote_refused",
            Counter::UnderlayQueueFull => "underlay_queue_full",
            Counter::PeerQueueFull => "peer_queue_full",
            Counter::PeerSocketErrors => "peer_socket_errors",
            Counter::XdpViaKernel => "xdp_via_kernel",
            Counter::RxWire => "rx_wire",
            Counter::TxWire => "tx_wire",
            Counter::XdpRxFrames => "xdp_rx_frames",
            Counter::XdpRxBatches => "xdp_rx_batches",
            Counter::XdpTxFrames => "xdp_tx_frames",
            Counter::XdpWakeups => "xdp_wakeups",
            Counter::RxPods => "rx_pods",
            Counter::TxPods => "tx_pods",
            Counter::UnderlayErrNetUnreachable => "underlay_err_net_unreachable",
            Counter::UnderlayErrHostUnreachable => "underlay_err_host_unreachable",
            Counter::UnderlayErrProtoUnreachable => "underlay_err_proto_unreachable",
            Counter::UnderlayErrPortUnreachable => "underlay_err_port_unreachable",
            Counter::UnderlayErrFragNeeded => "underlay_err_frag_needed",
            Counter::UnderlayErrParamProblem => "underlay_err_param_problem",
            Counter::UnderlayErrOther => "underlay_err_other",
        }
    }
}

/// Counts kept by one worker between flushes.
#[derive(Debug, Clone)]
pub struct LocalStats {
    pub counters: [u64; Counter::COUNT],
    pub drops: [u64; DropReason::COUNT],
}

// Arrays past 32 entries have no derived Default.
impl Default for LocalStats {
    fn default() -> Self {
        LocalStats {
            counters: [0; Counter::COUNT],
            drops: [0; DropReason::COUNT],
        }
    }
}

impl LocalStats {
    #[inline]
    pub fn add(&mut self, c: Counter, n: u64) {
        self.counters[c as usize] += n;
    }
    #[inline]
    pub fn drop(&mut self, r: DropReason) {
        self.drops[r as usize] += 1;
    }
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters[c as usize]
    }
    pub fn drops(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
    /// Adds another set of counts to this one.
    pub fn merge(&mut self, other: &LocalStats) {
        for (a, b) in self.counters.iter_mut().zip(other.counters) {
            *a += b;
        }
        for (a, b) in self.drops.iter_mut().zip(other.drops) {
            *a += b;
        }
    }
}

/// The shared copy of a worker's counts, read by the control thread.
#[derive(Debug)]
pub struct SharedStats {
    counters: [AtomicU64; Counter::COUNT],
    drops: [AtomicU64; DropReason::COUNT],
}

impl Default for SharedStats {
    fn default() -> Self {
        SharedStats {
            counters: core::array::from_fn(|_| AtomicU64::new(0)),
            drops: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl SharedStats {
    /// Adds `local` and zeroes it.
    pub fn flush(&self, local: &mut LocalStats) {
        for (shared, n) in self.counters.iter().zip(local.counters.iter_mut()) {
            if *n != 0 {
                shared.fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
        for (shared, n) in self.drops.iter().zip(local.drops.iter_mut()) {
            if *n != 0 {
                shared.fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
    }

    /// A copy of the current counts.
    pub fn snapshot(&self) -> LocalStats {
        let mut s = LocalStats::default();
        for (d, a) in s.counters.iter_mut().zip(&self.counters) {
            *d = a.load(Ordering::Relaxed);
        }
        for (d, a) in s.drops.iter_mut().zip(&self.drops) {
            *d = a.load(Ordering::Relaxed);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_flush_adds_and_zeroes() {
        let shared = SharedStats::default();
        let mut local = LocalStats::default();
        local.add(Counter::RxTun, 3);
        local.drop(DropReason::TtlExpired);
        shared.flush(&mut local);
        local.add(Counter::RxTun, 2);
        shared.flush(&mut local);
        let snap = shared.snapshot();
        assert_eq!(snap.counter(Counter::RxTun), 5);
        assert_eq!(snap.drops(DropReason::TtlExpired), 1);
        assert_eq!(local.total_drops(), 0);
    }

    #[test]
    fn test_names_are_unique() {
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.as_str()).collect();
        names.extend(DropReason::ALL.iter().map(|r| r.as_str()));
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
    }
}
