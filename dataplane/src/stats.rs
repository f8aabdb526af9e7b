//! Per-worker counters: plain integers inside the batch loop, added to shared atomics once per
//! batch (Relaxed), so the hot path never contends on a cache line.
//!
//! The counters are listed once, in [`COUNTERS`] (made by `counters!` below): each with its
//! name (the key of `ctl stats` and the stats file), the component it belongs to, how
//! `/metrics` exports it and its help text. Everything that lists counters iterates over it.

use crate::verdict::DropReason;
use core::sync::atomic::{AtomicU64, Ordering};

/// The part of the node a counter belongs to; `/metrics` and `ctl stats` list counters by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The TUN device (routed mode's pods).
    Tun,
    /// The underlay: its sockets, their queues and the errors the kernel reports on them.
    Underlay,
    /// The tunnel's decisions: ICMP errors made, checksums completed.
    Tunnel,
    /// The L2 bridge: its ports (TAP or AF_XDP), flooding and the FDB.
    Bridge,
    /// AF_XDP: the underlay through podwire's XDP program, and the node's address on the wire.
    Xdp,
    /// `--pod-ports`: pods served through AF_XDP.
    PodPorts,
    /// The worker's loop itself.
    Worker,
}

impl Component {
    /// Every component, in the order they are listed.
    pub const ALL: [Component; 7] = [
        Component::Tun,
        Component::Underlay,
        Component::Tunnel,
        Component::Bridge,
        Component::Xdp,
        Component::PodPorts,
        Component::Worker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Component::Tun => "tun",
            Component::Underlay => "underlay",
            Component::Tunnel => "tunnel",
            Component::Bridge => "bridge",
            Component::Xdp => "xdp",
            Component::PodPorts => "pod_ports",
            Component::Worker => "worker",
        }
    }

    /// This component's counters, in table order.
    pub fn counters(self) -> impl Iterator<Item = &'static CounterInfo> {
        COUNTERS.iter().filter(move |c| c.component == self)
    }
}

/// How `/metrics` exports a counter. These names and labels are what dashboards and the lab
/// read: they do not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// A family of its own, labelled by worker only.
    Family(&'static str),
    /// One value of `label` in a family several counters share (see [`SHARED_FAMILIES`]).
    Labelled {
        family: &'static str,
        label: &'static str,
        value: &'static str,
    },
}

impl Metric {
    /// The metric family's name.
    pub fn family(self) -> &'static str {
        match self {
            Metric::Family(f) | Metric::Labelled { family: f, .. } => f,
        }
    }
}

const RX_PACKETS: &str = "podwire_rx_packets_total";
const TX_PACKETS: &str = "podwire_tx_packets_total";
const UNDERLAY_ERRORS: &str = "podwire_underlay_socket_errors_total";

/// The help of the families several counters share (by label).
pub const SHARED_FAMILIES: [(&str, &str); 3] = [
    (RX_PACKETS, "Packets read, by worker and port."),
    (TX_PACKETS, "Packets written, by worker and port."),
    (
        UNDERLAY_ERRORS,
        "ICMP errors about underlay datagrams that receives returned, by kind (counted, never fatal).",
    ),
];

const fn rx(port: &'static str) -> Metric {
    Metric::Labelled {
        family: RX_PACKETS,
        label: "port",
        value: port,
    }
}

const fn tx(port: &'static str) -> Metric {
    Metric::Labelled {
        family: TX_PACKETS,
        label: "port",
        value: port,
    }
}

const fn underlay_error(kind: &'static str) -> Metric {
    Metric::Labelled {
        family: UNDERLAY_ERRORS,
        label: "kind",
        value: kind,
    }
}

/// One counter's entry in [`COUNTERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterInfo {
    pub counter: Counter,
    /// Its key in `ctl stats` and the stats file.
    pub name: &'static str,
    pub component: Component,
    pub metric: Metric,
    /// One line for `/metrics`' HELP (of its own family) and for people.
    pub help: &'static str,
}

/// Defines [`Counter`], [`COUNTERS`] and `Counter::ALL` from one list.
macro_rules! counters {
    ($(
        $(#[$attr:meta])*
        $variant:ident = $name:literal, $component:ident, $metric:expr, $help:literal;
    )*) => {
        /// Event counters besides drops.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$attr])* $variant,)*
        }

        /// Every counter with its name, component, metric and help, in `Counter`'s order.
        pub const COUNTERS: [CounterInfo; Counter::COUNT] = [$(
            CounterInfo {
                counter: Counter::$variant,
                name: $name,
                component: Component::$component,
                metric: $metric,
                help: $help,
            },
        )*];

        impl Counter {
            pub const COUNT: usize = [$(Counter::$variant),*].len();
            pub const ALL: [Counter; Counter::COUNT] = [$(Counter::$variant),*];
        }
    };
}

counters! {
    /// Packets read from the TUN device.
    RxTun = "rx_tun", Tun, rx("tun"), "Packets read from the TUN device.";
    /// Packets written to the TUN device (decapsulated traffic and ICMP errors).
    TxTun = "tx_tun", Tun, tx("tun"), "Packets written to the TUN device.";
    /// Datagrams read from the underlay socket.
    RxUnderlay = "rx_underlay", Underlay, rx("underlay"), "Datagrams read from the underlay.";
    /// Datagrams sent on the underlay.
    TxUnderlay = "tx_underlay", Underlay, tx("underlay"), "Datagrams sent on the underlay.";
    /// Datagrams the kernel dropped at the shared underlay socket: its queue was full.
    UnderlayQueueFull = "underlay_queue_full", Underlay,
        Metric::Family("podwire_underlay_queue_full_total"),
        "Datagrams the kernel dropped at the shared underlay socket (queue full).";
    /// Datagrams the kernel dropped at per-peer sockets: a peer sent more than its share.
    PeerQueueFull = "peer_queue_full", Underlay, Metric::Family("podwire_peer_queue_full_total"),
        "Datagrams the kernel dropped at per-peer sockets: a peer sent more than its share.";
    /// Per-peer sockets that could not be made (their peers use the shared socket).
    PeerSocketErrors = "peer_socket_errors", Underlay,
        Metric::Family("podwire_peer_socket_errors_total"),
        "Per-peer sockets that could not be made (their peers use the shared socket).";
    /// ICMP errors about our underlay datagrams a receive returned (net unreachable): counted, never fatal.
    UnderlayErrNetUnreachable = "underlay_err_net_unreachable", Underlay,
        underlay_error("net_unreachable"), "Underlay ICMP errors: net unreachable.";
    /// ... host unreachable, unknown, isolated or prohibited.
    UnderlayErrHostUnreachable = "underlay_err_host_unreachable", Underlay,
        underlay_error("host_unreachable"),
        "Underlay ICMP errors: host unreachable, unknown, isolated or prohibited.";
    /// ... protocol unreachable.
    UnderlayErrProtoUnreachable = "underlay_err_proto_unreachable", Underlay,
        underlay_error("proto_unreachable"), "Underlay ICMP errors: protocol unreachable.";
    /// ... port unreachable.
    UnderlayErrPortUnreachable = "underlay_err_port_unreachable", Underlay,
        underlay_error("port_unreachable"), "Underlay ICMP errors: port unreachable.";
    /// ... fragmentation needed (the path MTU to a peer was lowered).
    UnderlayErrFragNeeded = "underlay_err_frag_needed", Underlay,
        underlay_error("frag_needed"), "Underlay ICMP errors: fragmentation needed.";
    /// ... parameter problem.
    UnderlayErrParamProblem = "underlay_err_param_problem", Underlay,
        underlay_error("param_problem"), "Underlay ICMP errors: parameter problem.";
    /// Other asynchronous errors a receive returned (ENOBUFS, a failed source route, ...).
    UnderlayErrOther = "underlay_err_other", Underlay, underlay_error("other"),
        "Other asynchronous errors an underlay receive returned.";
    /// ICMP destination-unreachable messages generated.
    IcmpUnreachable = "icmp_unreachable", Tunnel, Metric::Family("podwire_icmp_unreachable_total"),
        "ICMP destination-unreachable messages generated.";
    /// TCP resets sent to pods for segments of connections whose service endpoint left.
    TcpResets = "tcp_resets", Tunnel, Metric::Family("podwire_tcp_resets_total"),
        "TCP resets sent to pods for segments of connections whose service endpoint left.";
    /// Inner TCP/UDP checksums completed because the sender left them for offload.
    ChecksumsCompleted = "checksums_completed", Tunnel,
        Metric::Family("podwire_checksums_completed_total"),
        "Inner checksums completed for senders that left them to offload.";
    /// Frames read from the bridge's ports, TAP or AF_XDP (L2 mode).
    RxTap = "rx_tap", Bridge, rx("tap"), "Frames read from the bridge's ports.";
    /// Frames written to the bridge's ports, TAP or AF_XDP, flood copies included (L2 mode).
    TxTap = "tx_tap", Bridge, tx("tap"), "Frames written to the bridge's ports.";
    /// Frames flooded: unknown unicast, broadcast, multicast (L2 mode).
    Flooded = "flooded", Bridge, Metric::Family("podwire_bridge_flooded_total"),
        "Frames the bridge flooded (unknown unicast, broadcast, multicast).";
    /// Stations learned into the FDB (L2 mode).
    FdbLearned = "fdb_learned", Bridge, Metric::Family("podwire_fdb_learned_total"),
        "Stations learned into the bridge's FDB.";
    /// Stations that moved to another port or VTEP (L2 mode).
    FdbMoved = "fdb_moved", Bridge, Metric::Family("podwire_fdb_moved_total"),
        "FDB stations that moved to another port or VTEP.";
    /// FDB entries removed by ageing (L2 mode).
    FdbAged = "fdb_aged", Bridge, Metric::Family("podwire_fdb_aged_total"),
        "FDB entries removed by ageing.";
    /// Source MACs not learned because the FDB was full (L2 mode).
    FdbLearnRefused = "fdb_learn_refused", Bridge, Metric::Family("podwire_fdb_learn_refused_total"),
        "Source MACs not learned because the FDB was full.";
    /// Remote static entries (a lease's VtepMAC) refused because a local port's own static
    /// entry holds that MAC (L2 mode).
    FdbRemoteRefused = "fdb_remote_refused", Bridge,
        Metric::Family("podwire_fdb_remote_refused_total"),
        "Remote FDB entries (a lease's VtepMAC) refused because a local port's own entry holds the MAC.";
    /// `--io xdp`: packets sent through the kernel because their next hop was not resolved.
    XdpViaKernel = "xdp_via_kernel", Xdp, Metric::Family("podwire_xdp_via_kernel_total"),
        "Packets sent through the kernel because their next hop was not resolved yet.";
    /// `--io xdp`: packets from the wire to the node's address (NodePort connections, answers
    /// to masqueraded ones).
    RxWire = "rx_wire", Xdp, rx("wire"), "Packets from the wire to the node's address.";
    /// `--io xdp`: packets sent to hosts outside the cluster as the node (NodePort answers,
    /// masqueraded pod traffic).
    TxWire = "tx_wire", Xdp, tx("wire"), "Packets sent to hosts outside the cluster as the node.";
    /// `--io xdp`: frames received from AF_XDP sockets.
    XdpRxFrames = "xdp_rx_frames", Xdp, Metric::Family("podwire_xdp_rx_frames_total"),
        "Frames received from AF_XDP sockets.";
    /// `--io xdp`: receives that found frames (frames per batch: xdp_rx_frames / this).
    XdpRxBatches = "xdp_rx_batches", Xdp, Metric::Family("podwire_xdp_rx_batches_total"),
        "Receives from AF_XDP sockets that found frames.";
    /// `--io xdp`: frames sent through AF_XDP sockets.
    XdpTxFrames = "xdp_tx_frames", Xdp, Metric::Family("podwire_xdp_tx_frames_total"),
        "Frames sent through AF_XDP sockets.";
    /// `--io xdp`: wakeups of the kernel (fill-ring wakeups, send kicks): system calls.
    XdpWakeups = "xdp_wakeups", Xdp, Metric::Family("podwire_xdp_wakeups_total"),
        "System calls that woke the kernel for AF_XDP (fill-ring wakeups, send kicks).";
    /// `--pod-ports`: packets read from pods through AF_XDP.
    RxPods = "rx_pods", PodPorts, rx("pods"), "Packets read from pods through AF_XDP.";
    /// `--pod-ports`: packets sent to pods through AF_XDP.
    TxPods = "tx_pods", PodPorts, tx("pods"), "Packets sent to pods through AF_XDP.";
    /// Times the worker slept in epoll because it found no work.
    IdleSleeps = "idle_sleeps", Worker, Metric::Family("podwire_idle_sleeps_total"),
        "Times a worker found no work and slept in epoll.";
}

impl Counter {
    /// This counter's entry in [`COUNTERS`].
    pub fn info(self) -> &'static CounterInfo {
        &COUNTERS[self as usize]
    }

    /// Its key in `ctl stats` and the stats file.
    pub fn as_str(self) -> &'static str {
        self.info().name
    }

    pub fn component(self) -> Component {
        self.info().component
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
    fn test_the_table_is_in_the_enums_order() {
        for (i, c) in Counter::ALL.into_iter().enumerate() {
            assert_eq!(c as usize, i);
            assert_eq!(COUNTERS[i].counter, c);
            assert_eq!(c.info().counter, c);
        }
        // Every counter is in exactly one component's list.
        let listed: usize = Component::ALL.iter().map(|c| c.counters().count()).sum();
        assert_eq!(listed, Counter::COUNT);
    }

    /// A family has one kind of member: all its own (one counter), or all labelled, with
    /// a shared help and distinct label values.
    #[test]
    fn test_metrics_are_well_formed() {
        let mut own = Vec::new();
        let mut labelled = Vec::new();
        for c in COUNTERS {
            let family = c.metric.family();
            assert!(
                family.starts_with("podwire_") && family.ends_with("_total"),
                "{family}"
            );
            assert!(!c.help.is_empty(), "{}", c.name);
            match c.metric {
                Metric::Family(f) => own.push(f),
                Metric::Labelled { family, value, .. } => {
                    assert!(
                        SHARED_FAMILIES.iter().any(|(f, _)| *f == family),
                        "{family} has no help"
                    );
                    labelled.push((family, value));
                }
            }
        }
        let n = own.len();
        own.sort_unstable();
        own.dedup();
        assert_eq!(own.len(), n, "a family of its own shared");
        assert!(labelled.iter().all(|(f, _)| !own.contains(f)));
        let n = labelled.len();
        labelled.sort_unstable();
        labelled.dedup();
        assert_eq!(labelled.len(), n, "a label value twice in a family");
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
