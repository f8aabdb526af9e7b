//! The daemon's side: the socket, and the answer to each [`Request`].

use super::capture::start_capture;
use super::protocol::{
    Attached, ConnEntry, Conntrack, ConntrackCounters, ConntrackFilter, Detached, EndpointRow,
    FaultInjected, FaultKind, Fdb, FdbPort, FdbRow, LeaseRow, OwnLease, Proto, Refusal, Request,
    Response, ServiceRow, Services, Stats, Subnets, TupleRow, WorkerStats, XdpProgram,
};
use super::CtlError;
use crate::health::Health;
use crate::l2::{self, Attach};
use arc_swap::ArcSwap;
use podwire_dataplane::bridge::{EntryKind, Station};
use podwire_dataplane::capture::Capture;
use podwire_dataplane::conntrack::{
    EntryView, ServiceBinding, Tuple, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};
use podwire_dataplane::pipeline::{DropReason, Flows, Tables};
use podwire_dataplane::route::Backend;
use podwire_dataplane::stats::{Counter, LocalStats, SharedStats};
use podwire_dataplane::worker::l2::{FdbDump, L2Handle};
use podwire_dataplane::worker::FaultInjector;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// Longest a write of an answer may block on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon shares with the ctl thread.
pub struct CtlState {
    pub tables: Arc<ArcSwap<Tables>>,
    pub flows: Option<Arc<Flows>>,
    pub capture: Arc<Capture>,
    pub workers: Vec<Arc<SharedStats>>,
    pub health: Arc<Health>,
    /// The previous `stats` answer's time and counters, for rates.
    last_stats: Mutex<Option<(Instant, Vec<LocalStats>)>>,
    /// The bridge, in L2 mode.
    pub l2: Option<L2Ctl>,
    /// Makes workers fail on request (`--fault-injection`).
    pub faults: Option<FaultInjector>,
    /// A capture is running (there is one capture buffer).
    pub(super) capturing: AtomicBool,
}

/// What ctl needs of the L2 worker: its handle, and what a pod's interface gets.
pub struct L2Ctl {
    pub handle: L2Handle,
    /// The pods' MTU (the underlay's minus VXLAN's 50 bytes).
    pub mtu: u32,
    /// The node's gateway address (the host port's), the pods' default route.
    pub gateway: Ipv4Addr,
    /// `--l2-pods xdp`: pods get veth pairs served through AF_XDP, kept here.
    pub pods_xdp: bool,
    pub veths: l2::Veths,
}

impl CtlState {
    pub fn new(
        tables: Arc<ArcSwap<Tables>>,
        flows: Option<Arc<Flows>>,
        capture: Arc<Capture>,
        workers: Vec<Arc<SharedStats>>,
        health: Arc<Health>,
    ) -> CtlState {
        CtlState {
            tables,
            flows,
            capture,
            workers,
            health,
            last_stats: Mutex::new(None),
            l2: None,
            faults: None,
            capturing: Default::default(),
        }
    }

    /// Adds the bridge's commands (L2 mode).
    pub fn with_l2(mut self, l2: Option<L2Ctl>) -> CtlState {
        self.l2 = l2;
        self
    }

    /// Adds `fault` (`--fault-injection`).
    pub fn with_faults(mut self, faults: Option<FaultInjector>) -> CtlState {
        self.faults = faults;
        self
    }
}

/// Binds a unix socket at `path` that is mode 0600 from the moment its name exists: it is
/// bound inside a directory of its own created 0700 beside `path`, set 0600 there, then renamed
/// to `path` (replacing a stale socket). Missing parent directories are created 0700.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)?;
    // A fresh directory nobody else can enter (`mkdir` fails on anything already there,
    // a symlink included, and then the next name is tried).
    let mut private = None;
    for attempt in 0..16u32 {
        let dir = parent.join(format!(".ctl.{}.{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                private = Some(dir);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    let private = private.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("no free private directory in {}", parent.display()),
        )
    })?;
    let inner = private.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    if bound.is_err() {
        let _ = std::fs::remove_file(&inner);
    }
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Binds `path` (mode 0600 from its creation on, replacing a stale socket; missing directories
/// are created 0700), and answers requests on a thread of its own until the process exits.
pub fn serve(path: &Path, state: Arc<CtlState>) -> Result<(), CtlError> {
    let err = |source| CtlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let listener = bind_private(path).map_err(err)?;
    std::thread::Builder::new()
        .name("podwire-ctl".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &state);
            }
        })
        .map_err(err)?;
    Ok(())
}

fn answer(conn: UnixStream, state: &Arc<CtlState>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    // A client that stops reading cannot hold the ctl thread (or the capture's) for long.
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line)?;
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Capture(req)) => match start_capture(conn, &req, state) {
            Ok(()) => return Ok(()),
            Err((conn, e)) => return reply(&conn, Err(&e)),
        },
        Ok(req) => handle(&req, state),
        Err(e) => Err(Refusal::BadRequest(e.to_string())),
    };
    reply(&conn, answer.as_ref())
}

/// Writes an answer as one JSON line: the response, or `{"error": why}`.
pub(super) fn reply(conn: &UnixStream, answer: Result<&Response, &Refusal>) -> std::io::Result<()> {
    let line = match answer {
        Ok(r) => serde_json::to_string(r).map_err(std::io::Error::other)?,
        Err(e) => serde_json::json!({"error": e.to_string()}).to_string(),
    };
    let mut w = conn;
    w.write_all(line.as_bytes())?;
    w.write_all(b"\n")
}

/// The answer to one request.
pub fn handle(req: &Request, state: &CtlState) -> Result<Response, Refusal> {
    match req {
        Request::Subnets => Ok(Response::Subnets(subnets(state))),
        Request::Conntrack(f) => conntrack(state, f).map(Response::Conntrack),
        Request::Services => Ok(Response::Services(services(state))),
        Request::Stats => Ok(Response::Stats(stats(state))),
        Request::Fault { kind, worker } => fault(*kind, *worker, state).map(Response::Fault),
        Request::Capture(_) => Err(Refusal::CaptureNeedsStream),
        Request::Fdb | Request::Attach(_) | Request::Detach { .. } => match &state.l2 {
            None => Err(Refusal::RoutedMode(req.name())),
            Some(l2) => l2_command(req, l2),
        },
    }
}

fn l2_command(req: &Request, l2: &L2Ctl) -> Result<Response, Refusal> {
    let bridge = |e: &dyn std::fmt::Display| Refusal::Bridge(e.to_string());
    match req {
        Request::Fdb => l2
            .handle
            .dump()
            .map(|d| Response::Fdb(fdb(&d)))
            .map_err(|e| bridge(&e)),
        Request::Detach { netns } => match l2.handle.detach(netns) {
            Ok(true) => {
                // The port is gone from the bridge: its veth pair (if any) goes too.
                l2.veths.lock().expect("veths").remove(netns);
                Ok(Response::Detached(Detached {
                    detached: netns.clone(),
                }))
            }
            Ok(false) => Err(Refusal::NotAttached(netns.clone())),
            Err(e) => Err(bridge(&e)),
        },
        Request::Attach(a) => {
            fn parsed<T: std::str::FromStr>(
                field: &'static str,
                value: Option<&str>,
            ) -> Result<Option<T>, Refusal> {
                value
                    .filter(|s| !s.is_empty())
                    .map(|v| {
                        v.parse().map_err(|_| Refusal::Unparsable {
                            field,
                            value: v.to_string(),
                        })
                    })
                    .transpose()
            }
            if a.ip.is_empty() {
                return Err(Refusal::MissingIp);
            }
            let attach = Attach {
                netns: a.netns.clone(),
                ip: a.ip.parse().map_err(Refusal::Address)?,
                mac: parsed("mac", a.mac.as_deref())?,
                ifname: a.ifname.clone(),
                gateway: a.gateway,
            };
            let veths = l2.pods_xdp.then_some(&l2.veths);
            let done = l2::attach(&l2.handle, &attach, l2.mtu, l2.gateway, veths)
                .map_err(|e| bridge(&e))?;
            Ok(Response::Attached(Attached {
                netns: attach.netns,
                ifname: attach.ifname,
                ip: attach.ip.to_string(),
                mac: done.mac.to_string(),
                port: done.port.0,
                device: done.device,
                mtu: l2.mtu,
            }))
        }
        _ => unreachable!("not a bridge command: {}", req.name()),
    }
}

fn fdb(d: &FdbDump) -> Fdb {
    let port_name = |id: u16| {
        d.ports
            .iter()
            .find(|p| p.id.0 == id)
            .map_or_else(|| format!("port{id}"), |p| p.label.clone())
    };
    let mut entries: Vec<FdbRow> = d
        .entries
        .iter()
        .map(|e| {
            let (port, dst) = match e.station {
                Station::Port(p) => (port_name(p.0), None),
                Station::Remote(ip) => ("vxlan".to_string(), Some(ip)),
            };
            FdbRow {
                mac: e.mac.to_string(),
                port,
                dst,
                vni: e.vni,
                is_static: e.kind == EntryKind::Static,
                idle_ms: e.idle_ms,
            }
        })
        .collect();
    // A kernel VXLAN FDB's default entries: unknown and BUM traffic to every VTEP.
    entries.extend(d.vteps.iter().map(|ip| FdbRow {
        mac: "00:00:00:00:00:00".into(),
        port: "vxlan".into(),
        dst: Some(*ip),
        vni: d.entries.first().map_or(0, |e| e.vni),
        is_static: true,
        idle_ms: 0,
    }));
    let ports = d
        .ports
        .iter()
        .map(|p| FdbPort {
            port: p.id.0,
            label: p.label.clone(),
            device: p.device.clone(),
        })
        .collect();
    Fdb { entries, ports }
}

fn fault(kind: FaultKind, worker: usize, state: &CtlState) -> Result<FaultInjected, Refusal> {
    let faults = state.faults.as_ref().ok_or(Refusal::FaultInjectionOff)?;
    match kind {
        FaultKind::WorkerPanic => faults
            .panic_worker(worker)
            .map_err(|e| Refusal::Fault(e.to_string()))?,
    }
    tracing::warn!(worker, "ctl: injecting a panic into a worker");
    Ok(FaultInjected {
        fault: kind,
        worker,
    })
}

fn subnets(state: &CtlState) -> Subnets {
    let t = state.tables.load();
    let expiry = state.health.lease_expiry_unix.load(Ordering::Relaxed);
    let leases = t
        .map
        .nodes()
        .map(|n| {
            let (backend, vtep) = match n.backend {
                Backend::Udp => ("udp", None),
                Backend::Vxlan { vtep_mac, .. } => ("vxlan", Some(vtep_mac.to_string())),
                Backend::Other => ("other", None),
            };
            LeaseRow {
                subnet: n.subnet.to_string(),
                public_ip: n.public_ip,
                backend: backend.into(),
                vtep_mac: vtep,
                own: n.subnet == t.local.subnet,
            }
        })
        .collect();
    Subnets {
        network: t.map.network().to_string(),
        own: OwnLease {
            subnet: t.local.subnet.to_string(),
            public_ip: t.local.public_ip,
            lease_expiry_unix: (expiry != 0).then_some(expiry),
        },
        leases,
    }
}

/// Whether a connection passes the filter (either direction's tuple may match).
pub(super) fn matches(f: &ConntrackFilter, e: &EntryView) -> bool {
    let tuples = [&e.original, &e.reply];
    let proto = f.proto.map(|p| match p {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
        Proto::Icmp => PROTO_ICMP,
    });
    f.addr
        .is_none_or(|a| tuples.iter().any(|t| t.src == a || t.dst == a))
        && f.port.is_none_or(|p| {
            tuples
                .iter()
                .any(|t| t.proto != PROTO_ICMP && (t.sport == p || t.dport == p))
        })
        && proto.is_none_or(|p| e.original.proto == p)
        && f.state.as_deref().is_none_or(|s| {
            e.tcp_state
                .is_some_and(|st| st.as_str().eq_ignore_ascii_case(s))
        })
}

fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
        other => other.to_string(),
    }
}

fn tuple_row(t: &Tuple) -> TupleRow {
    TupleRow {
        src: t.src,
        dst: t.dst,
        sport: t.sport,
        dport: t.dport,
    }
}

fn conntrack(state: &CtlState, f: &ConntrackFilter) -> Result<Conntrack, Refusal> {
    let flows = state.flows.as_ref().ok_or(Refusal::ConntrackOff)?;
    let entries = flows.conntrack.entries(flows.now());
    let shown: Vec<ConnEntry> = entries
        .iter()
        .filter(|e| matches(f, e))
        .map(|e| ConnEntry {
            proto: proto_name(e.original.proto),
            state: e.tcp_state.map(|s| s.as_str().to_string()),
            expires_in: e.expires_in,
            original: tuple_row(&e.original),
            reply: tuple_row(&e.reply),
            packets: e.packets,
            bytes: e.bytes,
            seen_reply: e.seen_reply,
            assured: e.assured,
            service: e.service.map(|s| format!("{}:{}", s.vip, s.port)),
            gone: e.retired,
        })
        .collect();
    let c = flows.conntrack.counters();
    Ok(Conntrack {
        count: shown.len(),
        total: entries.len(),
        counters: ConntrackCounters {
            entries: c.entries,
            max: flows.conntrack.capacity(),
            inserted: c.inserted,
            expired: c.expired,
            early_drops: c.early_drops,
            table_full: c.table_full,
            invalid: c.invalid,
        },
        entries: shown,
    })
}

fn services(state: &CtlState) -> Services {
    let t = state.tables.load();
    // Connections per (ClusterIP, port, proto, backend): ipvsadm's ActiveConn (TCP
    // ESTABLISHED) and InActConn (any other TCP state; UDP flows count as active).
    let mut conns: HashMap<ServiceBinding, (u64, u64)> = HashMap::new();
    if let Some(flows) = &state.flows {
        for e in flows.conntrack.entries(flows.now()) {
            let Some(b) = e.service else { continue };
            let c = conns.entry(b).or_default();
            match e.tcp_state {
                Some(podwire_dataplane::conntrack::tcp::TcpState::Established) | None => c.0 += 1,
                Some(_) => c.1 += 1,
            }
        }
    }
    let scheduler = match t.services.options().algorithm {
        podwire_dataplane::nat::Algorithm::Maglev => "mh",
        podwire_dataplane::nat::Algorithm::Random => "random",
    };
    let list = t
        .services
        .specs()
        .map(|s| {
            let endpoints = s
                .endpoints
                .iter()
                .map(|ep| {
                    let binding = ServiceBinding {
                        vip: s.cluster_ip,
                        port: s.port,
                        proto: s.proto,
                        backend: *ep.ip(),
                        backend_port: ep.port(),
                    };
                    let (active, inactive) = conns.get(&binding).copied().unwrap_or_default();
                    EndpointRow {
                        ip: *ep.ip(),
                        port: ep.port(),
                        active,
                        inactive,
                    }
                })
                .collect();
            ServiceRow {
                name: s.name.clone(),
                cluster_ip: s.cluster_ip,
                port: s.port,
                proto: proto_name(s.proto),
                scheduler: scheduler.into(),
                affinity_timeout: s.affinity_timeout,
                endpoints,
                external_ips: s.external_ips.clone(),
            }
        })
        .collect();
    Services {
        service_cidr: t.services.options().cidr.to_string(),
        hairpin_ip: t.services.options().hairpin_ip,
        services: list,
    }
}

fn stats(state: &CtlState) -> Stats {
    let now = Instant::now();
    let snap: Vec<LocalStats> = state.workers.iter().map(|w| w.snapshot()).collect();
    let mut last = state
        .last_stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let previous = last.replace((now, snap.clone()));
    // Only the counters of what runs on this node (the mode's components).
    let shown = state.health.components();
    let counters: Vec<Counter> = Counter::ALL
        .into_iter()
        .filter(|c| shown.contains(&c.component()))
        .collect();
    let workers = snap
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let values = counters
                .iter()
                .map(|c| (c.as_str().to_string(), s.counter(*c)))
                .collect();
            let per_second = match &previous {
                None => Default::default(),
                Some((at, prev)) => {
                    let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
                    counters
                        .iter()
                        .map(|c| {
                            let d = s.counter(*c).saturating_sub(prev[i].counter(*c));
                            (c.as_str().to_string(), (d as f64 / secs).round())
                        })
                        .collect()
                }
            };
            let drops = DropReason::ALL
                .iter()
                .filter(|r| s.drops(**r) > 0)
                .map(|r| (r.as_str().to_string(), s.drops(*r)))
                .collect();
            WorkerStats {
                worker: i,
                counters: values,
                per_second,
                drops,
            }
        })
        .collect();
    // The XDP programs' own counters, read from their maps now (this thread, not a worker).
    let xdp_programs = state
        .health
        .xdp_counters()
        .into_iter()
        .map(|(ifname, c)| match c {
            Ok(c) => XdpProgram {
                interface: ifname.to_string(),
                error: None,
                counters: crate::health::xdp_counters_named(&c)
                    .map(|(name, n)| (name.to_string(), n))
                    .collect(),
            },
            Err(e) => XdpProgram {
                interface: ifname.to_string(),
                error: Some(e),
                counters: Default::default(),
            },
        })
        .collect();
    Stats {
        since_previous_s: previous.map(|(at, _)| now.duration_since(at).as_secs_f64()),
        workers,
        xdp_programs,
    }
}
