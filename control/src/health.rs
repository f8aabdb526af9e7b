//! The daemon's HTTP endpoint, as flanneld's `-healthz-ip/-healthz-port`:
//! - `/healthz`: 200 while the process runs.
//! - `/readyz`: 200 once the lease is held, the map is loaded and subnet.env is written; 503
//!   before, with what is missing in the body.
//! - `/metrics`: Prometheus text format: dataplane counters per worker and drop reason, lease
//!   state, map size and update count, store reconnects and errors, and with AF_XDP the XDP
//!   programs' own counters (`podwire_xdp_program_*_total`, by interface).
//!
//! The control thread and the workers only store into atomics; the HTTP thread reads them, so
//! serving a scrape never blocks forwarding or the store loop. The XDP programs' counters live
//! in BPF maps: the HTTP thread reads them (a syscall each) while it serves the scrape.
//!
//! The server is hyper (HTTP/1 only) on a one-thread tokio runtime of its own, within
//! [`HttpLimits`]: a capped request head, a deadline for the head and one for the whole
//! connection, a cap on open connections, one request per connection, GET and HEAD only.

use podwire_dataplane::pipeline::{DropReason, Flows};
use podwire_dataplane::port::xdp::{ProgramCounters, XdpCounters};
use podwire_dataplane::stats::{
    Component, CounterInfo, LocalStats, Metric, SharedStats, COUNTERS, SHARED_FAMILIES,
};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// What the daemon reports about itself.
#[derive(Debug, Default)]
pub struct Health {
    pub lease_held: AtomicBool,
    pub map_loaded: AtomicBool,
    pub subnet_env_written: AtomicBool,
    /// False while the store cannot be reached (forwarding goes on with the last map).
    pub store_reachable: AtomicBool,
    /// Unix seconds when our lease expires unless renewed; 0 for a lease that never expires.
    pub lease_expiry_unix: AtomicU64,
    pub lease_renewals: AtomicU64,
    /// Times our lease vanished from the store and was taken again.
    pub lease_reacquisitions: AtomicU64,
    pub map_leases: AtomicU64,
    pub map_updates: AtomicU64,
    pub store_reconnects: AtomicU64,
    pub store_errors: AtomicU64,
    /// Services in the live snapshot.
    pub services: AtomicU64,
    pub service_updates: AtomicU64,
    /// Services left out of the live snapshot (malformed, or refused by the checks).
    pub services_rejected: AtomicU64,
    /// Endpoints removed from the live snapshot's services.
    pub service_endpoints_rejected: AtomicU64,
    /// NodePorts refused in the live snapshot (their services kept, ClusterIP only).
    pub service_node_ports_rejected: AtomicU64,
    /// External and load balancer IPs refused in the live snapshot (their services kept).
    pub service_external_ips_rejected: AtomicU64,
    /// Leases in the store left out of the map as invalid (malformed, unroutable, a
    /// multicast or all-zero VtepMAC).
    pub leases_invalid: AtomicU64,
    /// Leases left out of the live map because another node's lease has their VtepMAC.
    pub leases_vtep_conflict: AtomicU64,
    workers: OnceLock<Vec<Arc<SharedStats>>>,
    flows: OnceLock<Arc<Flows>>,
    fdb_entries: OnceLock<Arc<AtomicU64>>,
    /// The parts of the node that run (the mode's): only their counters are shown.
    components: OnceLock<Vec<Component>>,
    /// From a store change noticed to the new map live in the workers.
    pub map_update_latency: LatencyHistogram,
    /// From a services source's change read to the new services live in the workers.
    pub service_update_latency: LatencyHistogram,
    xdp_programs: OnceLock<Vec<XdpProgramCounters>>,
}

/// The XDP programs' counters: name after `podwire_xdp_program_` (and in `ctl stats`), help,
/// and the field.
type XdpField = fn(&XdpCounters) -> u64;
const XDP_PROGRAM_COUNTERS: [(&str, &str, XdpField); 5] = [
    (
        "redirected",
        "Frames the XDP program redirected to an AF_XDP socket, by interface.",
        |c| c.redirected,
    ),
    (
        "no_socket",
        "Frames for podwire whose queue had no AF_XDP socket: passed to the kernel, by interface.",
        |c| c.no_socket,
    ),
    (
        "passed",
        "Frames not podwire's: passed to the kernel, by interface.",
        |c| c.passed,
    ),
    (
        "malformed",
        "Frames shorter than their headers claim: passed to the kernel, by interface.",
        |c| c.malformed,
    ),
    (
        "foreign_source",
        "Pod interfaces: frames from an address other than the pod's, passed to the kernel.",
        |c| c.foreign_source,
    ),
];

/// The XDP program's counters by name, as `/metrics` and `ctl stats` give them.
pub fn xdp_counters_named(c: &XdpCounters) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    XDP_PROGRAM_COUNTERS
        .iter()
        .map(move |(name, _, get)| (*name, get(c)))
}

/// The names of the XDP program's counters, as `/metrics` and `ctl stats` give them.
pub fn xdp_counter_names() -> impl Iterator<Item = &'static str> {
    XDP_PROGRAM_COUNTERS.iter().map(|(n, _, _)| *n)
}

/// An attached XDP program's counters, read when asked: a BPF map lookup, a syscall, made on
/// the HTTP or ctl thread at scrape time, never on a worker's path.
pub struct XdpProgramCounters {
    pub ifname: String,
    read: Box<dyn Fn() -> Result<XdpCounters, String> + Send + Sync>,
}

impl XdpProgramCounters {
    /// The counters of a program the daemon attached.
    pub fn of(program: Arc<ProgramCounters>) -> XdpProgramCounters {
        XdpProgramCounters {
            ifname: program.ifname().to_string(),
            read: Box::new(move || program.read().map_err(|e| e.to_string())),
        }
    }

    /// Counters from anywhere (tests).
    pub fn from_fn(
        ifname: &str,
        read: impl Fn() -> Result<XdpCounters, String> + Send + Sync + 'static,
    ) -> XdpProgramCounters {
        XdpProgramCounters {
            ifname: ifname.to_string(),
            read: Box::new(read),
        }
    }

    pub fn read(&self) -> Result<XdpCounters, String> {
        (self.read)()
    }
}

impl std::fmt::Debug for XdpProgramCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpProgramCounters")
            .field("ifname", &self.ifname)
            .finish_non_exhaustive()
    }
}

/// Upper bounds (seconds) of the map-update latency buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A Prometheus histogram of durations, lock-free (one atomic per bucket).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// The exposition lines of histogram `name` (cumulative buckets, sum, count).
    fn samples(&self, name: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(LATENCY_BUCKETS.len() + 3);
        let mut cumulative = 0;
        for (b, n) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            out.push(format!("{name}_bucket{{le=\"{b}\"}} {cumulative}"));
        }
        let count = self.count.load(Ordering::Relaxed);
        out.push(format!("{name}_bucket{{le=\"+Inf\"}} {count}"));
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        out.push(format!("{name}_sum {sum}"));
        out.push(format!("{name}_count {count}"));
        out
    }
}

impl Health {
    /// Hands the workers' counters to the endpoint once they run.
    pub fn set_workers(&self, stats: Vec<Arc<SharedStats>>) {
        let _ = self.workers.set(stats);
    }

    /// Hands the connection table to the endpoint.
    pub fn set_flows(&self, flows: Arc<Flows>) {
        let _ = self.flows.set(flows);
    }

    /// Hands the XDP programs attached for the daemon's life to the endpoint (and `ctl stats`).
    pub fn set_xdp_programs(&self, programs: Vec<XdpProgramCounters>) {
        let _ = self.xdp_programs.set(programs);
    }

    /// Each XDP program's interface and counters, read now; a read that failed, its error.
    pub fn xdp_counters(&self) -> Vec<(&str, Result<XdpCounters, String>)> {
        self.xdp_programs
            .get()
            .into_iter()
            .flatten()
            .map(|p| (p.ifname.as_str(), p.read()))
            .collect()
    }

    /// Hands the bridge's FDB size (L2 mode) to the endpoint.
    pub fn set_fdb_entries(&self, entries: Arc<AtomicU64>) {
        let _ = self.fdb_entries.set(entries);
    }

    /// The components that run on this node; `/metrics` and `ctl stats` show only their
    /// counters (all of them until this is called).
    pub fn set_components(&self, components: Vec<Component>) {
        let _ = self.components.set(components);
    }

    /// The components whose counters are shown.
    pub fn components(&self) -> &[Component] {
        self.components
            .get()
            .map_or(&Component::ALL[..], |c| c.as_slice())
    }

    pub fn set_lease_expiry(&self, expires: Option<SystemTime>) {
        let secs = expires
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        self.lease_expiry_unix.store(secs, Ordering::Relaxed);
    }

    /// What still keeps the node from being ready (empty: ready).
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.lease_held.load(Ordering::Relaxed) {
            missing.push("lease not held");
        }
        if !self.map_loaded.load(Ordering::Relaxed) {
            missing.push("subnet map not loaded");
        }
        if !self.subnet_env_written.load(Ordering::Relaxed) {
            missing.push("subnet.env not written");
        }
        missing
    }

    /// The `/metrics` page.
    pub fn render_metrics(&self) -> String {
        let workers: Vec<LocalStats> = self
            .workers
            .get()
            .map(|w| w.iter().map(|s| s.snapshot()).collect())
            .unwrap_or_default();
        let mut out = MetricsText::default();
        write_worker_counters(&mut out, &workers, self.components());
        write_drops(&mut out, &workers);
        self.write_node(&mut out, workers.len());
        self.write_services(&mut out);
        self.write_xdp_programs(&mut out);
        if let Some(n) = self.fdb_entries.get() {
            let v = n.load(Ordering::Relaxed);
            out.single(
                "podwire_fdb_entries",
                "gauge",
                "Bridge FDB entries (L2 mode).",
                v,
            );
        }
        self.write_conntrack(&mut out);
        out.0
    }

    /// The lease, the subnet map, the store and readiness.
    fn write_node(&self, out: &mut MetricsText, workers: usize) {
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let b = |v: &AtomicBool| u64::from(v.load(Ordering::Relaxed));
        let expiry = g(&self.lease_expiry_unix);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let scalars: [(&str, &str, &str, u64); 11] = [
            (
                "podwire_lease_held",
                "gauge",
                "1 while this node holds its subnet lease.",
                b(&self.lease_held),
            ),
            (
                "podwire_lease_expiry_timestamp_seconds",
                "gauge",
                "Unix time our lease expires unless renewed (0: never).",
                expiry,
            ),
            (
                "podwire_lease_expiry_seconds",
                "gauge",
                "Seconds until our lease expires unless renewed (0: never).",
                if expiry == 0 {
                    0
                } else {
                    expiry.saturating_sub(now)
                },
            ),
            (
                "podwire_lease_renewals_total",
                "counter",
                "Lease renewals done.",
                g(&self.lease_renewals),
            ),
            (
                "podwire_lease_reacquisitions_total",
                "counter",
                "Times our lease vanished from the store and was taken again.",
                g(&self.lease_reacquisitions),
            ),
            (
                "podwire_subnet_map_leases",
                "gauge",
                "Leases in the live subnet map.",
                g(&self.map_leases),
            ),
            (
                "podwire_subnet_map_updates_total",
                "counter",
                "New subnet maps handed to the workers.",
                g(&self.map_updates),
            ),
            (
                "podwire_store_up",
                "gauge",
                "1 while the cluster store answers.",
                b(&self.store_reachable),
            ),
            (
                "podwire_store_reconnects_total",
                "counter",
                "Times the store connection came back after a failure.",
                g(&self.store_reconnects),
            ),
            (
                "podwire_store_errors_total",
                "counter",
                "Failed store requests.",
                g(&self.store_errors),
            ),
            (
                "podwire_ready",
                "gauge",
                "1 when /readyz answers 200.",
                u64::from(self.not_ready().is_empty()),
            ),
        ];
        for (name, kind, help, v) in scalars {
            out.single(name, kind, help, v);
        }
        out.single(
            "podwire_workers",
            "gauge",
            "Forwarding workers.",
            workers as u64,
        );
    }

    /// The services snapshot, the leases left out, and how fast map updates go live.
    fn write_services(&self, out: &mut MetricsText) {
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let services = [
            (
                "podwire_services",
                "gauge",
                "Services in the live snapshot.",
                g(&self.services),
            ),
            (
                "podwire_service_updates_total",
                "counter",
                "New services snapshots handed to the workers.",
                g(&self.service_updates),
            ),
            (
                "podwire_services_rejected",
                "gauge",
                "Services left out of the live snapshot (malformed, or refused by the checks).",
                g(&self.services_rejected),
            ),
            (
                "podwire_service_endpoints_rejected",
                "gauge",
                "Endpoints removed from the live snapshot's services (loopback, link-local, multicast, the node's own, ...).",
                g(&self.service_endpoints_rejected),
            ),
            (
                "podwire_service_node_ports_rejected",
                "gauge",
                "NodePorts refused in the live snapshot (outside the range, podwire's own ports, taken); their services stay, ClusterIP only.",
                g(&self.service_node_ports_rejected),
            ),
            (
                "podwire_service_external_ips_rejected",
                "gauge",
                "External and load balancer IPs refused in the live snapshot (the node's own, in the pod network or service range, martian, taken); their services stay without them.",
                g(&self.service_external_ips_rejected),
            ),
        ];
        for (name, kind, help, v) in services {
            out.single(name, kind, help, v);
        }
        let name = "podwire_leases_rejected";
        out.family(
            name,
            "gauge",
            "Leases in the store left out of the subnet map, by reason.",
            [
                format!("{name}{{reason=\"invalid\"}} {}", g(&self.leases_invalid)),
                format!(
                    "{name}{{reason=\"vtep_mac_conflict\"}} {}",
                    g(&self.leases_vtep_conflict)
                ),
            ],
        );
        let name = "podwire_subnet_map_update_seconds";
        out.family(
            name,
            "histogram",
            "From a cluster-store change noticed to the new subnet map live in the workers.",
            self.map_update_latency.samples(name),
        );
        let name = "podwire_service_update_seconds";
        out.family(
            name,
            "histogram",
            "From a services source's change read (the file, the store's services) to the new services live in the workers.",
            self.service_update_latency.samples(name),
        );
    }

    /// The XDP programs' own counters, by interface (read from their maps now).
    fn write_xdp_programs(&self, out: &mut MetricsText) {
        let programs = self.xdp_counters();
        if programs.is_empty() {
            return;
        }
        let read: Vec<(&str, XdpCounters)> = programs
            .into_iter()
            .filter_map(|(ifname, c)| match c {
                Ok(c) => Some((ifname, c)),
                Err(e) => {
                    tracing::warn!(interface = ifname, error = %e, "reading the XDP program's counters");
                    None
                }
            })
            .collect();
        for (counter, help, get) in XDP_PROGRAM_COUNTERS {
            let name = format!("podwire_xdp_program_{counter}_total");
            let samples = read
                .iter()
                .map(|(ifname, c)| format!("{name}{{interface=\"{ifname}\"}} {}", get(c)));
            out.family(&name, "counter", help, samples);
        }
    }

    /// The connection table's size and events.
    fn write_conntrack(&self, out: &mut MetricsText) {
        let Some(f) = self.flows.get() else {
            return;
        };
        let c = f.conntrack.counters();
        let ct: [(&str, &str, &str, u64); 7] = [
            (
                "podwire_conntrack_entries",
                "gauge",
                "Connections tracked.",
                c.entries,
            ),
            (
                "podwire_conntrack_max",
                "gauge",
                "Most connections the table holds.",
                f.conntrack.capacity() as u64,
            ),
            (
                "podwire_conntrack_inserted_total",
                "counter",
                "Connections created.",
                c.inserted,
            ),
            (
                "podwire_conntrack_expired_total",
                "counter",
                "Connections removed on timeout.",
                c.expired,
            ),
            (
                "podwire_conntrack_early_drops_total",
                "counter",
                "Unassured connections evicted to make room.",
                c.early_drops,
            ),
            (
                "podwire_conntrack_table_full_total",
                "counter",
                "New connections refused: table full, nothing evictable.",
                c.table_full,
            ),
            (
                "podwire_conntrack_invalid_total",
                "counter",
                "Packets conntrack called INVALID.",
                c.invalid,
            ),
        ];
        for (name, kind, help, v) in ct {
            out.single(name, kind, help, v);
        }
    }
}

/// Prometheus text being written: families with their HELP and TYPE, then their samples.
#[derive(Default)]
struct MetricsText(String);

impl MetricsText {
    fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = String>,
    ) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in samples {
            self.0.push_str(&s);
            self.0.push('\n');
        }
    }

    /// A family of one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help, [format!("{name} {value}")]);
    }
}

/// The workers' counters, from the one table of them, by component: one family per metric
/// name, each worker's samples together.
fn write_worker_counters(out: &mut MetricsText, workers: &[LocalStats], shown: &[Component]) {
    let mut written: Vec<&str> = Vec::new();
    let by_component = shown.iter().flat_map(|c| c.counters());
    for info in by_component {
        let family = info.metric.family();
        if written.contains(&family) {
            continue;
        }
        written.push(family);
        let help = match info.metric {
            Metric::Family(_) => info.help,
            Metric::Labelled { .. } => SHARED_FAMILIES
                .iter()
                .find(|(f, _)| *f == family)
                .map_or(info.help, |(_, help)| help),
        };
        let members: Vec<&CounterInfo> = COUNTERS
            .iter()
            .filter(|c| c.metric.family() == family && shown.contains(&c.component))
            .collect();
        let mut samples = Vec::new();
        for (w, s) in workers.iter().enumerate() {
            for c in &members {
                let n = s.counter(c.counter);
                samples.push(match c.metric {
                    Metric::Family(_) => format!("{family}{{worker=\"{w}\"}} {n}"),
                    Metric::Labelled { label, value, .. } => {
                        format!("{family}{{worker=\"{w}\",{label}=\"{value}\"}} {n}")
                    }
                });
            }
        }
        out.family(family, "counter", help, samples);
    }
}

/// Every worker's drops, by reason.
fn write_drops(out: &mut MetricsText, workers: &[LocalStats]) {
    let samples = workers.iter().enumerate().flat_map(|(w, s)| {
        DropReason::ALL.iter().map(move |r| {
            format!(
                "podwire_drops_total{{worker=\"{w}\",reason=\"{}\"}} {}",
                r.as_str(),
                s.drops(*r)
            )
        })
    });
    out.family(
        "podwire_drops_total",
        "counter",
        "Packets dropped, by worker and reason.",
        samples,
    );
}

/// Bounds on what clients can hold of the HTTP server, so no client (or many) can exhaust the
/// daemon's threads, memory or descriptors through it.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Most bytes of request head buffered (at least 8 KiB); a head past it gets 431 and the
    /// connection closed.
    pub max_header_bytes: usize,
    /// From the connection's start to a complete request head; then it is closed.
    pub header_timeout: Duration,
    /// From accept to the last byte of the answer; a backstop for a client that reads slowly.
    pub conn_timeout: Duration,
    /// Connections served at once; one over it is closed as soon as it is accepted.
    pub max_conns: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(3),
            conn_timeout: Duration::from_secs(10),
            max_conns: 64,
        }
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr` from a thread of its own, within
/// [`HttpLimits::default`]. The port is bound here (a port below 1024 needs
/// `CAP_NET_BIND_SERVICE`); the server's thread drops every capability before it takes a
/// request (it needs none, and it starts before the daemon drops its own; see
/// [`crate::privs`]).
pub fn serve(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<SocketAddr> {
    serve_with(addr, health, HttpLimits::default())
}

/// As [`serve`], within `limits`.
pub fn serve_with(
    addr: SocketAddr,
    health: Arc<Health>,
    limits: HttpLimits,
) -> std::io::Result<SocketAddr> {
    // Bound here, not in the thread, so a taken port is the caller's error.
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let rt = server_runtime()?;
    let listener = {
        let _ctx = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let answer = move |req: &hyper::Request<hyper::body::Incoming>| respond(&health, req);
    spawn_server_thread("podwire-http", rt, accept_loop(listener, limits, answer))?;
    Ok(bound)
}

/// A small runtime for an HTTP server: serving never takes a thread from forwarding or the
/// store.
pub(crate) fn server_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

/// Runs `server` on `rt` in a thread `name` of its own, which drops every capability before it
/// serves (servers need none, and they start before the daemon drops its own; see
/// [`crate::privs`]). Returns once the thread has dropped them: the daemon checks later that
/// no thread holds more than it keeps.
pub(crate) fn spawn_server_thread(
    name: &str,
    rt: tokio::runtime::Runtime,
    server: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (dropped_tx, dropped) = std::sync::mpsc::channel();
    let thread = name.to_string();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        if let Err(e) = crate::privs::drop_all() {
            tracing::warn!(%thread, error = %e, "an HTTP server's thread keeps its capabilities");
        }
        let _ = dropped_tx.send(());
        rt.block_on(server)
    })?;
    let _ = dropped.recv();
    Ok(())
}

/// Serves HTTP/1 on `listener` within `limits`, each request answered by `answer`.
pub(crate) async fn accept_loop<A>(listener: tokio::net::TcpListener, limits: HttpLimits, answer: A)
where
    A: Fn(&hyper::Request<hyper::body::Incoming>) -> hyper::Response<String>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_conns));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning on the error.
                tracing::warn!(error = %e, addr = ?listener.local_addr().ok(), "HTTP accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the cap the connection is dropped (closed) at once: excess clients cannot
        // queue up and hold descriptors.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("HTTP connection refused: too many open");
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let response = answer(&req);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            // One request per connection, so the deadline below bounds all a client gets.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                // hyper panics below its 8 KiB floor.
                .max_buf_size(limits.max_header_bytes.max(8 * 1024))
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(limits.conn_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection"),
                Err(_) => tracing::debug!("HTTP connection past its deadline, closed"),
            }
        });
    }
}

/// The answer to one request: only GET and HEAD (hyper leaves HEAD's body out).
fn respond<B>(health: &Health, req: &hyper::Request<B>) -> hyper::Response<String> {
    use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
    use hyper::{Method, StatusCode};
    let (code, body, kind) = if !matches!(*req.method(), Method::GET | Method::HEAD) {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: only GET and HEAD\n".to_string(),
            "text/plain",
        )
    } else {
        match req.uri().path() {
            "/healthz" => (
                StatusCode::OK,
                "podwire is running\n".to_string(),
                "text/plain",
            ),
            "/readyz" => {
                let missing = health.not_ready();
                if missing.is_empty() {
                    (StatusCode::OK, "ready\n".to_string(), "text/plain")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", missing.join(", ")),
                        "text/plain",
                    )
                }
            }
            "/metrics" => (
                StatusCode::OK,
                health.render_metrics(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "not found: try /healthz, /readyz, /metrics\n".to_string(),
                "text/plain",
            ),
        }
    };
    let mut answer = hyper::Response::new(body);
    *answer.status_mut() = code;
    let headers = answer.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    if code == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::time::Instant;

    #[test]
    fn test_readiness_and_metrics_text() {
        use podwire_dataplane::stats::Counter;
        let h = Arc::new(Health::default());
        assert_eq!(h.not_ready().len(), 3);
        let stats = Arc::new(SharedStats::default());
        let mut local = LocalStats::default();
        local.add(Counter::RxTun, 5);
        local.drop(DropReason::ALL[0]);
        stats.flush(&mut local);
        h.set_workers(vec![stats]);
        h.lease_held.store(true, Ordering::Relaxed);
        h.map_loaded.store(true, Ordering::Relaxed);
        h.subnet_env_written.store(true, Ordering::Relaxed);
        assert!(h.not_ready().is_empty());
        let text = h.render_metrics();
        assert!(
            text.contains("podwire_rx_packets_total{worker=\"0\",port=\"tun\"} 5"),
            "{text}"
        );
        let reason = DropReason::ALL[0].as_str();
        assert!(text.contains(&format!(
            "podwire_drops_total{{worker=\"0\",reason=\"{reason}\"}} 1"
        )));
        assert!(text.contains("podwire_ready 1"));
        // Every sample line belongs to the family announced before it.
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_string();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&family), "{line} outside {family}");
            }
        }
    }

    #[test]
    fn test_xdp_program_counters_are_exported() {
        let h = Health::default();
        assert!(!h.render_metrics().contains("podwire_xdp_program"));
        let reads = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&reads);
        h.set_xdp_programs(vec![
            XdpProgramCounters::from_fn("eth0", move || {
                // Read at scrape time: each scrape sees the map's count then.
                let n = counted.fetch_add(1, Ordering::Relaxed);
                Ok(XdpCounters {
                    redirected: 1000,
                    no_socket: 7 + n,
                    passed: 3,
                    ..XdpCounters::default()
                })
            }),
            XdpProgramCounters::from_fn("vpod", || Err("map gone".into())),
        ]);
        let text = h.render_metrics();
        assert!(
            text.contains("podwire_xdp_program_no_socket_total{interface=\"eth0\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE podwire_xdp_program_no_socket_total counter"));
        assert!(text.contains("podwire_xdp_program_redirected_total{interface=\"eth0\"} 1000"));
        assert!(
            !text.contains("vpod"),
            "an unreadable map has no sample: {text}"
        );
        let text = h.render_metrics();
        assert!(
            text.contains("podwire_xdp_program_no_socket_total{interface=\"eth0\"} 8\n"),
            "{text}"
        );
        assert_eq!(reads.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn test_http_endpoints() {
        let h = Arc::new(Health::default());
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&h)).unwrap();
        let get = |path: &str| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut r = String::new();
            s.read_to_string(&mut r).unwrap();
            r
        };
        assert!(get("/healthz").starts_with("HTTP/1.0 200"));
        let r = get("/readyz");
        assert!(
            r.starts_with("HTTP/1.0 503") && r.contains("lease not held"),
            "{r}"
        );
        h.lease_held.store(true, Ordering::Relaxed);
        h.map_loaded.store(true, Ordering::Relaxed);
        h.subnet_env_written.store(true, Ordering::Relaxed);
        assert!(get("/readyz").starts_with("HTTP/1.0 200"));
        assert!(get("/metrics").contains("# TYPE podwire_drops_total counter"));
        assert!(get("/nope").starts_with("HTTP/1.0 404"));
    }

    /// Limits short enough for a test to watch them act.
    fn test_limits() -> HttpLimits {
        HttpLimits {
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_millis(300),
            conn_timeout: Duration::from_secs(1),
            max_conns: 4,
        }
    }

    #[derive(Debug)]
    enum Reply {
        /// The server closed (or reset) the connection without a word.
        Closed,
        /// What the server wrote before closing.
        Answered(String),
        /// Still open when the test stopped waiting.
        Stalled,
    }

    /// Sends `request` and reads until the server closes the connection or `wait` passes.
    fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> Reply {
        use std::io::{ErrorKind, Read, Write};
        let deadline = Instant::now() + wait;
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(wait)).unwrap();
        // A server that refuses a request mid-way closes without reading the rest: the write
        // failing then is what is tested for, not an error of the test.
        let _ = s.write_all(request);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Reply::Stalled;
            }
            s.set_read_timeout(Some(left)).unwrap();
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Reply::Stalled;
                }
                Err(_) => break,
            }
        }
        if got.is_empty() {
            Reply::Closed
        } else {
            Reply::Answered(String::from_utf8_lossy(&got).into())
        }
    }

    fn healthz_answered(addr: SocketAddr, wait: Duration) -> bool {
        matches!(
            exchange(addr, b"GET /healthz HTTP/1.0\r\n\r\n", wait),
            Reply::Answered(r) if r.starts_with("HTTP/1.0 200")
        )
    }

    /// A request head past the cap is refused (431, or closed) as soon as the cap is hit,
    /// whether it comes as many lines or as one line that never ends; the server lives on.
    #[test]
    fn test_oversized_request_head_is_refused() {
        let lo = "127.0.0.1:0".parse().unwrap();
        let addr = serve_with(lo, Arc::new(Health::default()), test_limits()).unwrap();
        let line = format!("X-Pad: {}\r\n", "a".repeat(4096));
        let many_lines = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{}\r\n",
            line.repeat(16)
        );
        let endless = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: {}",
            "a".repeat(64 * 1024)
        );
        for (what, request) in [
            ("64 KiB of header lines", many_lines),
            ("one 64 KiB header line", endless),
        ] {
            let t = Instant::now();
            let reply = exchange(addr, request.as_bytes(), Duration::from_secs(2));
            let refused = match &reply {
                Reply::Closed => true,
                Reply::Answered(r) => {
                    r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400")
                }
                Reply::Stalled => false,
            };
            assert!(refused, "{what}: {reply:?} after {:?}", t.elapsed());
            assert!(
                healthz_answered(addr, Duration::from_secs(2)),
                "/healthz after {what}"
            );
        }
    }

    /// Slowloris: three times the connection cap, half dribbling a header a byte at a time,
    /// half silent. The server drops every one of them (over the cap at once, the rest at the
    /// header timeout), and a new client gets /healthz answered meanwhile.
    #[test]
    fn test_slow_clients_are_dropped_and_healthz_still_answers() {
        use std::io::{ErrorKind, Read, Write};
        let limits = test_limits();
        let lo = "127.0.0.1:0".parse().unwrap();
        let addr = serve_with(lo, Arc::new(Health::default()), limits).unwrap();
        let give_up = Duration::from_secs(3);
        let slow: Vec<_> = (0..3 * limits.max_conns)
            .map(|i| {
                let mut s = TcpStream::connect(addr).unwrap();
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let dribble = i % 2 == 0;
                    if dribble {
                        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                    }
                    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    // How long the server kept this connection (None: still open at give_up).
                    while start.elapsed() < give_up {
                        if dribble && s.write_all(b"a").is_err() {
                            return Some(start.elapsed());
                        }
                        match s.read(&mut [0u8; 256]) {
                            Ok(0) => return Some(start.elapsed()),
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return Some(start.elapsed()),
                        }
                    }
                    None
                })
            })
            .collect();
        let t = Instant::now();
        let mut answered = None;
        while t.elapsed() < give_up {
            if healthz_answered(addr, Duration::from_millis(500)) {
                answered = Some(t.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let kept: Vec<Option<Duration>> = slow.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(
            answered.is_some_and(|d| d < Duration::from_secs(2)),
            "/healthz answered after {answered:?} (slow clients kept for {kept:?})"
        );
        // The connection deadline (1 s) bounds every one, with room for a busy machine.
        for (i, k) in kept.iter().enumerate() {
            assert!(
                k.is_some_and(|d| d < Duration::from_secs(2)),
                "slow client {i} kept for {k:?} (None: still open after {give_up:?}); all: {kept:?}"
            );
        }
    }

    /// Only GET and HEAD are served; a /metrics page larger than the head cap comes whole,
    /// with its content type.
    #[test]
    fn test_methods_and_large_metrics() {
        let h = Arc::new(Health::default());
        h.set_workers((0..64).map(|_| Arc::new(SharedStats::default())).collect());
        let lo = "127.0.0.1:0".parse().unwrap();
        let addr = serve_with(lo, Arc::clone(&h), test_limits()).unwrap();
        let wait = Duration::from_secs(2);
        let reply = |request: &str| match exchange(addr, request.as_bytes(), wait) {
            Reply::Answered(r) => r,
            other => panic!("{request:?}: {other:?}"),
        };
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let r = reply(&format!(
                "{method} /healthz HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
            ));
            assert!(r.starts_with("HTTP/1.0 405"), "{method}: {r}");
            assert!(
                r.to_ascii_lowercase().contains("allow: get, head"),
                "{method}: {r}"
            );
        }
        let r = reply("HEAD /healthz HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.0 200"), "{r}");
        assert_eq!(r.split_once("\r\n\r\n").map(|(_, b)| b), Some(""), "{r}");
        let r = reply("GET /metrics HTTP/1.0\r\n\r\n");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(body.len() > 16 * 1024, "{}", body.len());
        assert_eq!(body, h.render_metrics());
    }

    /// What a Prometheus server would read: every family typed, labels where promised, and
    /// the values the daemon stored.
    #[test]
    fn test_metrics_parse_with_a_prometheus_text_parser() {
        use podwire_dataplane::stats::Counter;
        let h = Arc::new(Health::default());
        let stats: Vec<Arc<SharedStats>> =
            (0..2).map(|_| Arc::new(SharedStats::default())).collect();
        let mut local = LocalStats::default();
        local.add(Counter::TxUnderlay, 42);
        local.drop(DropReason::UnknownPeer);
        local.drop(DropReason::UnknownPeer);
        stats[1].flush(&mut local);
        h.set_workers(stats);
        h.map_leases.store(1003, Ordering::Relaxed);
        h.map_update_latency.observe(Duration::from_micros(300));
        h.map_update_latency.observe(Duration::from_millis(3));
        h.service_update_latency.observe(Duration::from_millis(40));
        h.lease_held.store(true, Ordering::Relaxed);
        h.set_lease_expiry(Some(SystemTime::now() + Duration::from_secs(3600)));
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&h)).unwrap();
        let body = {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut r = String::new();
            s.read_to_string(&mut r).unwrap();
            r.split_once("\r\n\r\n").unwrap().1.to_string()
        };
        let scrape =
            prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        let find = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))
                })
                .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{body}"))
                .value
                .clone()
        };
        use prometheus_parse::Value;
        assert_eq!(
            find(
                "podwire_tx_packets_total",
                &[("worker", "1"), ("port", "underlay")]
            ),
            Value::Counter(42.0)
        );
        assert_eq!(
            find(
                "podwire_drops_total",
                &[("worker", "1"), ("reason", "unknown_peer")]
            ),
            Value::Counter(2.0)
        );
        assert_eq!(find("podwire_subnet_map_leases", &[]), Value::Gauge(1003.0));
        match find("podwire_subnet_map_update_seconds", &[]) {
            Value::Histogram(h) => {
                let at = |le: f64| h.iter().find(|b| b.less_than == le).map(|b| b.count);
                assert_eq!(at(0.00025), Some(0.0));
                assert_eq!(at(0.0005), Some(1.0));
                assert_eq!(at(0.005), Some(2.0));
                assert_eq!(at(f64::INFINITY), Some(2.0));
            }
            other => panic!("{other:?}"),
        }
        match find("podwire_service_update_seconds", &[]) {
            Value::Histogram(h) => {
                let at = |le: f64| h.iter().find(|b| b.less_than == le).map(|b| b.count);
                assert_eq!(at(0.025), Some(0.0));
                assert_eq!(at(0.05), Some(1.0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(find("podwire_lease_held", &[]), Value::Gauge(1.0));
        match find("podwire_lease_expiry_seconds", &[]) {
            Value::Gauge(v) => assert!((3500.0..=3600.0).contains(&v), "{v}"),
            other => panic!("{other:?}"),
        }
        // Two workers, every drop reason each.
        let drops = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "podwire_drops_total")
            .count();
        assert_eq!(drops, 2 * DropReason::ALL.len());
        assert!(scrape.docs.contains_key("podwire_store_up"));
    }

    #[test]
    fn test_rejected_services_and_leases_are_exposed() {
        let h = Health::default();
        h.services.store(7, Ordering::Relaxed);
        h.services_rejected.store(2, Ordering::Relaxed);
        h.service_endpoints_rejected.store(3, Ordering::Relaxed);
        h.service_node_ports_rejected.store(1, Ordering::Relaxed);
        h.service_external_ips_rejected.store(6, Ordering::Relaxed);
        h.leases_invalid.store(4, Ordering::Relaxed);
        h.leases_vtep_conflict.store(5, Ordering::Relaxed);
        let text = h.render_metrics();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let find = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v))
                })
                .map(|s| s.value.clone())
                .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
        };
        use prometheus_parse::Value::Gauge;
        assert_eq!(find("podwire_services_rejected", &[]), Gauge(2.0));
        assert_eq!(find("podwire_service_endpoints_rejected", &[]), Gauge(3.0));
        assert_eq!(find("podwire_service_node_ports_rejected", &[]), Gauge(1.0));
        assert_eq!(
            find("podwire_service_external_ips_rejected", &[]),
            Gauge(6.0)
        );
        assert_eq!(
            find("podwire_leases_rejected", &[("reason", "invalid")]),
            Gauge(4.0)
        );
        assert_eq!(
            find(
                "podwire_leases_rejected",
                &[("reason", "vtep_mac_conflict")]
            ),
            Gauge(5.0)
        );
    }

    /// Every counter of the table is exported for every worker with its own value, and the
    /// families dashboards and the lab read keep their names.
    #[test]
    fn test_every_counter_is_exported_for_every_worker() {
        let h = Health::default();
        let stats: Vec<Arc<SharedStats>> =
            (0..2).map(|_| Arc::new(SharedStats::default())).collect();
        let mut local = LocalStats::default();
        for (i, c) in COUNTERS.iter().enumerate() {
            local.add(c.counter, 100 + i as u64);
        }
        stats[1].flush(&mut local);
        h.set_workers(stats);
        let text = h.render_metrics();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        for (i, c) in COUNTERS.iter().enumerate() {
            for (worker, want) in [("0", 0.0), ("1", (100 + i) as f64)] {
                let found = scrape.samples.iter().find(|s| {
                    s.metric == c.metric.family()
                        && s.labels.get("worker") == Some(worker)
                        && match c.metric {
                            Metric::Family(_) => true,
                            Metric::Labelled { label, value, .. } => {
                                s.labels.get(label) == Some(value)
                            }
                        }
                });
                let got = found.unwrap_or_else(|| panic!("no {} of worker {worker}", c.name));
                assert_eq!(
                    got.value,
                    prometheus_parse::Value::Counter(want),
                    "{}",
                    c.name
                );
            }
        }
        // The names before the counters were listed once (a dashboard's queries).
        for family in [
            "podwire_rx_packets_total",
            "podwire_tx_packets_total",
            "podwire_icmp_unreachable_total",
            "podwire_checksums_completed_total",
            "podwire_idle_sleeps_total",
            "podwire_bridge_flooded_total",
            "podwire_fdb_learned_total",
            "podwire_fdb_moved_total",
            "podwire_fdb_aged_total",
            "podwire_fdb_learn_refused_total",
            "podwire_fdb_remote_refused_total",
            "podwire_underlay_queue_full_total",
            "podwire_peer_queue_full_total",
            "podwire_peer_socket_errors_total",
            "podwire_xdp_via_kernel_total",
            "podwire_xdp_rx_frames_total",
            "podwire_xdp_rx_batches_total",
            "podwire_xdp_tx_frames_total",
            "podwire_xdp_wakeups_total",
            "podwire_drops_total",
            "podwire_underlay_socket_errors_total",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {family} counter\n")).count(),
                1,
                "{family}"
            );
        }
    }
}
