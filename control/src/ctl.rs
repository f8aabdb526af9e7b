//! `podwire ctl`: the running daemon, inspected over a unix socket (mode 0600, root's).
//!
//! One request per connection: a JSON object on one line (`{"cmd": "conntrack", "port": 80}`),
//! answered with one JSON document. `podwire ctl` renders it as the tools an operator knows
//! would (`conntrack -L`, `ipvsadm -Ln`), or passes it through with `--json`.
//!
//! Commands: `subnets` (the live map, our lease's expiry), `conntrack` (filters: `addr`,
//! `port`, `state`, `proto`), `services` (endpoints with active and inactive connections),
//! `stats` (per worker counters and drops, with rates since the previous `stats`), `capture`
//! (a pcap of what the TUN or the underlay socket receives), and in L2 mode `fdb` (like `bridge
//! fdb show`), `attach` and `detach` (a pod's TAP interface).
//!
//! `capture` is the one answer that is not only JSON: a thread of its own (one capture at a
//! time) waits for the packets while the ctl thread goes on answering, then sends a JSON line
//! `{"captured", "wanted", "pcap_bytes"}` followed by that many bytes of pcap. The client
//! ([`capture_to_file`]) writes the file, as whoever runs `podwire ctl`: the daemon writes no
//! file where a request says.

use crate::health::Health;
use crate::l2::{self, Attach};
use arc_swap::ArcSwap;
use podwire_dataplane::bridge::{EntryKind, Station};
use podwire_dataplane::capture::{Capture, CapturePoint};
use podwire_dataplane::conntrack::{
    EntryView, ServiceBinding, Tuple, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};
use podwire_dataplane::pipeline::{DropReason, Flows, Tables};
use podwire_dataplane::port::pcap::outer_datagram;
use podwire_dataplane::route::Backend;
use podwire_dataplane::stats::{Component, Counter, LocalStats, SharedStats};
use podwire_dataplane::worker::l2::{FdbDump, L2Handle};
use podwire_dataplane::worker::FaultInjector;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/podwire/ctl.sock";
/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// Longest a write of an answer may block on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("ctl socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to podwire at {path}: {source} (is `podwire run` up, and are you root?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The answer could not be read (not JSON, a capture cut short): a fault on either side.
    #[error("podwire answered garbage: {0}")]
    Answer(String),
    /// The daemon understood the request and refused it, saying why (e.g. `fdb` on a routed
    /// node).
    #[error("podwire refused: {0}")]
    Refused(String),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

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
    capturing: std::sync::atomic::AtomicBool,
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
    let answer = match serde_json::from_str::<Value>(&line) {
        Ok(req) if req["cmd"] == "capture" => match start_capture(conn, &req, state) {
            Ok(()) => return Ok(()),
            Err((conn, e)) => return reply(&conn, &json!({"error": e})),
        },
        Ok(req) => handle(&req, state),
        Err(e) => json!({"error": format!("bad request: {e}")}),
    };
    reply(&conn, &answer)
}

fn reply(conn: &UnixStream, v: &Value) -> std::io::Result<()> {
    let mut w = conn;
    w.write_all(v.to_string().as_bytes())?;
    w.write_all(b"\n")
}

/// The answer to one request.
pub fn handle(req: &Value, state: &CtlState) -> Value {
    match req["cmd"].as_str() {
        Some("subnets") => subnets(state),
        Some("conntrack") => match Filter::from_request(req) {
            Ok(f) => conntrack(state, &f),
            Err(e) => json!({"error": e}),
        },
        Some("services") => services(state),
        Some("stats") => stats(state),
        Some("fault") => fault(req, state).unwrap_or_else(|e| json!({"error": e})),
        Some("capture") => {
            json!({"error": "capture streams a pcap after its JSON line: podwire ctl capture"})
        }
        Some(cmd @ ("fdb" | "attach" | "detach")) => match &state.l2 {
            None => json!({"error": format!(
                "{cmd}: this node runs in routed mode (--mode l3): no bridge, so no FDB and no \
                 ports to attach; {cmd} needs `podwire run --mode l2`"
            )}),
            Some(l2) => l2_command(cmd, req, l2).unwrap_or_else(|e| json!({"error": e})),
        },
        other => {
            json!({"error": format!("unknown command {other:?}: subnets, conntrack, services, stats, capture, fdb, attach, detach")})
        }
    }
}

fn l2_command(cmd: &str, req: &Value, l2: &L2Ctl) -> Result<Value, String> {
    let netns = req["netns"].as_str().unwrap_or_default().to_string();
    match cmd {
        "fdb" => l2
            .handle
            .dump()
            .map(|d| fdb_json(&d))
            .map_err(|e| e.to_string()),
        "detach" => match l2.handle.detach(&netns) {
            Ok(true) => {
                // The port is gone from the bridge: its veth pair (if any) goes too.
                l2.veths.lock().expect("veths").remove(&netns);
                Ok(json!({"detached": netns}))
            }
            Ok(false) => Err(format!("no pod attached from netns {netns:?}")),
            Err(e) => Err(e.to_string()),
        },
        _ => {
            let field = |k: &str| req[k].as_str().filter(|s| !s.is_empty());
            fn parsed<T: std::str::FromStr>(req: &Value, k: &str) -> Result<Option<T>, String> {
                req[k]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(|v| v.parse().map_err(|_| format!("{k}: cannot parse {v:?}")))
                    .transpose()
            }
            let attach = Attach {
                netns,
                ip: field("ip")
                    .ok_or("attach needs ip (ADDRESS/PREFIX)")?
                    .parse()?,
                mac: parsed(req, "mac")?,
                ifname: field("ifname").unwrap_or("eth0").to_string(),
                gateway: parsed(req, "gateway")?,
            };
            let veths = l2.pods_xdp.then_some(&l2.veths);
            let a = l2::attach(&l2.handle, &attach, l2.mtu, l2.gateway, veths)
                .map_err(|e| e.to_string())?;
            Ok(json!({
                "netns": attach.netns, "ifname": attach.ifname, "ip": attach.ip.to_string(),
                "mac": a.mac.to_string(), "port": a.port.0, "device": a.device, "mtu": l2.mtu,
            }))
        }
    }
}

fn fdb_json(d: &FdbDump) -> Value {
    let port_name = |id: u16| {
        d.ports
            .iter()
            .find(|p| p.id.0 == id)
            .map_or_else(|| format!("port{id}"), |p| p.label.clone())
    };
    let mut entries: Vec<Value> = d
        .entries
        .iter()
        .map(|e| {
            let (port, dst) = match e.station {
                Station::Port(p) => (port_name(p.0), None),
                Station::Remote(ip) => ("vxlan".to_string(), Some(ip.to_string())),
            };
            json!({
                "mac": e.mac.to_string(), "port": port, "dst": dst, "vni": e.vni,
                "static": e.kind == EntryKind::Static, "idle_ms": e.idle_ms,
            })
        })
        .collect();
    // A kernel VXLAN FDB's default entries: unknown and BUM traffic to every VTEP.
    entries.extend(d.vteps.iter().map(|ip| {
        json!({"mac": "00:00:00:00:00:00", "port": "vxlan", "dst": ip.to_string(),
               "vni": d.entries.first().map_or(0, |e| e.vni), "static": true, "idle_ms": 0})
    }));
    let ports: Vec<Value> = d
        .ports
        .iter()
        .map(|p| json!({"port": p.id.0, "label": p.label, "device": p.device}))
        .collect();
    json!({"entries": entries, "ports": ports})
}

fn fault(req: &Value, state: &CtlState) -> Result<Value, String> {
    let faults = state
        .faults
        .as_ref()
        .ok_or("fault injection is off: start podwire with --fault-injection")?;
    match req["kind"].as_str() {
        Some("worker-panic") => {}
        other => return Err(format!("kind {other:?}: worker-panic")),
    }
    let worker = req["worker"].as_u64().unwrap_or(0) as usize;
    faults.panic_worker(worker).map_err(|e| e.to_string())?;
    tracing::warn!(worker, "ctl: injecting a panic into a worker");
    Ok(json!({"fault": "worker-panic", "worker": worker}))
}

fn subnets(state: &CtlState) -> Value {
    let t = state.tables.load();
    let expiry = state.health.lease_expiry_unix.load(Ordering::Relaxed);
    let leases: Vec<Value> = t
        .map
        .nodes()
        .map(|n| {
            let (backend, vtep) = match n.backend {
                Backend::Udp => ("udp", None),
                Backend::Vxlan { vtep_mac, .. } => ("vxlan", Some(vtep_mac.to_string())),
                Backend::Other => ("other", None),
            };
            json!({"subnet": n.subnet.to_string(), "public_ip": n.public_ip.to_string(),
                   "backend": backend, "vtep_mac": vtep, "own": n.subnet == t.local.subnet})
        })
        .collect();
    json!({
        "network": t.map.network().to_string(),
        "own": {"subnet": t.local.subnet.to_string(), "public_ip": t.local.public_ip.to_string(),
                "lease_expiry_unix": (expiry != 0).then_some(expiry)},
        "leases": leases,
    })
}

/// `conntrack -L`-style filters.
#[derive(Debug, Default)]
pub struct Filter {
    addr: Option<Ipv4Addr>,
    port: Option<u16>,
    state: Option<String>,
    proto: Option<u8>,
}

impl Filter {
    fn from_request(req: &Value) -> Result<Filter, String> {
        let addr = match req["addr"].as_str() {
            None => None,
            Some(a) => Some(
                a.parse()
                    .map_err(|_| format!("addr {a:?}: not an IPv4 address"))?,
            ),
        };
        let port = match &req["port"] {
            Value::Null => None,
            v => Some(
                v.as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or(format!("port {v}: 0-65535"))?,
            ),
        };
        let proto = match req["proto"].as_str() {
            None => None,
            Some("tcp") => Some(PROTO_TCP),
            Some("udp") => Some(PROTO_UDP),
            Some("icmp") => Some(PROTO_ICMP),
            Some(p) => return Err(format!("proto {p:?}: tcp, udp or icmp")),
        };
        Ok(Filter {
            addr,
            port,
            state: req["state"].as_str().map(str::to_uppercase),
            proto,
        })
    }

    fn matches(&self, e: &EntryView) -> bool {
        let tuples = [&e.original, &e.reply];
        self.addr
            .is_none_or(|a| tuples.iter().any(|t| t.src == a || t.dst == a))
            && self.port.is_none_or(|p| {
                tuples
                    .iter()
                    .any(|t| t.proto != PROTO_ICMP && (t.sport == p || t.dport == p))
            })
            && self.proto.is_none_or(|p| e.original.proto == p)
            && self
                .state
                .as_deref()
                .is_none_or(|s| e.tcp_state.is_some_and(|st| st.as_str() == s))
    }
}

fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
        other => other.to_string(),
    }
}

fn tuple_json(t: &Tuple) -> Value {
    json!({"src": t.src.to_string(), "dst": t.dst.to_string(), "sport": t.sport, "dport": t.dport})
}

fn conntrack(state: &CtlState, f: &Filter) -> Value {
    let Some(flows) = &state.flows else {
        return json!({"error": "connection tracking is off (--conntrack off)"});
    };
    let entries = flows.conntrack.entries(flows.now());
    let shown: Vec<Value> = entries
        .iter()
        .filter(|e| f.matches(e))
        .map(|e| {
            json!({
                "proto": proto_name(e.original.proto),
                "state": e.tcp_state.map(|s| s.as_str()),
                "expires_in": e.expires_in,
                "original": tuple_json(&e.original),
                "reply": tuple_json(&e.reply),
                "packets": e.packets, "bytes": e.bytes,
                "seen_reply": e.seen_reply, "assured": e.assured,
                "service": e.service.map(|s| format!("{}:{}", s.vip, s.port)),
            })
        })
        .collect();
    let c = flows.conntrack.counters();
    json!({
        "count": shown.len(), "total": entries.len(),
        "counters": {"entries": c.entries, "max": flows.conntrack.capacity(), "inserted": c.inserted,
                     "expired": c.expired, "early_drops": c.early_drops,
                     "table_full": c.table_full, "invalid": c.invalid},
        "entries": shown,
    })
}

fn services(state: &CtlState) -> Value {
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
    let algorithm = match t.services.options().algorithm {
        podwire_dataplane::nat::Algorithm::Maglev => "mh",
        podwire_dataplane::nat::Algorithm::Random => "random",
    };
    let list: Vec<Value> = t
        .services
        .specs()
        .map(|s| {
            let eps: Vec<Value> = s
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
                    json!({"ip": ep.ip().to_string(), "port": ep.port(),
                           "active": active, "inactive": inactive})
                })
                .collect();
            json!({"name": s.name, "cluster_ip": s.cluster_ip.to_string(), "port": s.port,
                   "proto": proto_name(s.proto), "scheduler": algorithm,
                   "affinity_timeout": s.affinity_timeout, "endpoints": eps})
        })
        .collect();
    json!({"service_cidr": t.services.options().cidr.to_string(),
           "hairpin_ip": t.services.options().hairpin_ip.to_string(), "services": list})
}

fn stats(state: &CtlState) -> Value {
    let now = Instant::now();
    let snap: Vec<LocalStats> = state.workers.iter().map(|w| w.snapshot()).collect();
    let mut last = state
        .last_stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let previous = last.replace((now, snap.clone()));
    let workers: Vec<Value> = snap
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut counters = serde_json::Map::new();
            let mut rates = serde_json::Map::new();
            for c in Counter::ALL {
                counters.insert(c.as_str().into(), json!(s.counter(c)));
                if let Some((at, prev)) = &previous {
                    let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
                    let d = s.counter(c).saturating_sub(prev[i].counter(c));
                    rates.insert(c.as_str().into(), json!((d as f64 / secs).round()));
                }
            }
            let drops: serde_json::Map<String, Value> = DropReason::ALL
                .iter()
                .filter(|r| s.drops(**r) > 0)
                .map(|r| (r.as_str().to_string(), json!(s.drops(*r))))
                .collect();
            json!({"worker": i, "counters": counters, "per_second": rates, "drops": drops})
        })
        .collect();
    // The XDP programs' own counters, read from their maps now (this thread, not a worker).
    let programs: Vec<Value> = state
        .health
        .xdp_counters()
        .into_iter()
        .map(|(ifname, c)| match c {
            Ok(c) => {
                let mut v = serde_json::Map::new();
                v.insert("interface".into(), json!(ifname));
                for (name, n) in crate::health::xdp_counters_named(&c) {
                    v.insert(name.into(), json!(n));
                }
                Value::Object(v)
            }
            Err(e) => json!({"interface": ifname, "error": e}),
        })
        .collect();
    json!({
        "since_previous_s": previous.map(|(at, _)| now.duration_since(at).as_secs_f64()),
        "workers": workers,
        "xdp_programs": programs,
    })
}

/// Most packets one capture may take.
pub const MAX_CAPTURE: usize = 100_000;

/// What a capture request asks for: the port, the count and the longest wait.
fn capture_request(req: &Value) -> Result<(CapturePoint, usize, Duration), String> {
    let point = match req["port"].as_str() {
        Some("tun") => CapturePoint::Tun,
        Some("underlay") => CapturePoint::Underlay,
        other => return Err(format!("port {other:?}: tun or underlay")),
    };
    let count = req["count"]
        .as_u64()
        .unwrap_or(100)
        .clamp(1, MAX_CAPTURE as u64) as usize;
    let timeout = Duration::from_millis(req["timeout_ms"].as_u64().unwrap_or(10_000).min(600_000));
    Ok((point, count, timeout))
}

/// Starts a capture on a thread of its own, which answers on `conn` when it is done; the
/// connection comes back with the reason when it cannot start.
fn start_capture(
    conn: UnixStream,
    req: &Value,
    state: &Arc<CtlState>,
) -> Result<(), (UnixStream, String)> {
    let (point, count, timeout) = match capture_request(req) {
        Ok(r) => r,
        Err(e) => return Err((conn, e)),
    };
    if state.capturing.swap(true, Ordering::AcqRel) {
        return Err((conn, "a capture is running already".into()));
    }
    // A second descriptor of the connection, to answer on if the thread cannot start.
    let spare = match conn.try_clone() {
        Ok(c) => c,
        Err(e) => {
            state.capturing.store(false, Ordering::Release);
            return Err((conn, format!("cannot start the capture: {e}")));
        }
    };
    let st = Arc::clone(state);
    let spawned = std::thread::Builder::new()
        .name("podwire-capture".into())
        .spawn(move || {
            let _ = run_capture(&conn, &st, point, count, timeout);
            st.capturing.store(false, Ordering::Release);
        });
    match spawned {
        Ok(_) => Ok(()),
        Err(e) => {
            state.capturing.store(false, Ordering::Release);
            Err((spare, format!("cannot start the capture: {e}")))
        }
    }
}

/// Arms the capture, waits for `count` packets (or `timeout`), and sends them on `conn` as a
/// JSON line and a pcap (link type RAW; underlay datagrams with the outer IPv4/UDP headers they
/// arrived in).
fn run_capture(
    conn: &UnixStream,
    state: &CtlState,
    point: CapturePoint,
    count: usize,
    timeout: Duration,
) -> std::io::Result<()> {
    state.capture.arm(point, count);
    let deadline = Instant::now() + timeout;
    while state.capture.remaining() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let frames = state.capture.take();
    let t = state.tables.load();
    let local = std::net::SocketAddrV4::new(t.local.public_ip, t.peer_port);
    match pcap_bytes(&frames, point, local) {
        Ok(pcap) => {
            reply(
                conn,
                &json!({"captured": frames.len(), "wanted": count, "pcap_bytes": pcap.len()}),
            )?;
            let mut w = conn;
            w.write_all(&pcap)
        }
        Err(e) => reply(conn, &json!({"error": e})),
    }
}

/// The frames as a pcap file's bytes.
fn pcap_bytes(
    frames: &[podwire_dataplane::capture::Frame],
    point: CapturePoint,
    local: std::net::SocketAddrV4,
) -> Result<Vec<u8>, String> {
    let header = pcap_file::pcap::PcapHeader {
        datalink: pcap_file::DataLink::RAW,
        ..Default::default()
    };
    let mut w =
        pcap_file::pcap::PcapWriter::with_header(Vec::new(), header).map_err(|e| e.to_string())?;
    for f in frames {
        let data = match point {
            CapturePoint::Tun => f.data.clone(),
            CapturePoint::Underlay => outer_datagram(*f.peer.ip(), f.peer.port(), local, &f.data),
        };
        let ts = f
            .time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        w.write_packet(&pcap_file::pcap::PcapPacket::new(
            ts,
            data.len() as u32,
            &data,
        ))
        .map_err(|e| e.to_string())?;
    }
    Ok(w.into_writer())
}

/// `podwire ctl capture`: asks the daemon at `socket` for a capture (`req`: `port`, `count`,
/// `timeout_ms`) and writes the pcap it sends to `path`, created (mode 0600 less the umask, or
/// truncated) by the caller, not by the daemon. Returns the daemon's JSON line with `path`.
pub fn capture_to_file(socket: &Path, req: &Value, path: &Path) -> Result<Value, CtlError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_err = |source| CtlError::File {
        path: path.to_path_buf(),
        source,
    };
    let connect = |source| CtlError::Connect {
        path: socket.to_path_buf(),
        source,
    };
    // Before asking: a path that cannot be written fails now, not after the wait.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err)?;
    let wait = Duration::from_millis(req["timeout_ms"].as_u64().unwrap_or(10_000));
    let mut s = UnixStream::connect(socket).map_err(connect)?;
    s.set_read_timeout(Some(wait + Duration::from_secs(10)))
        .map_err(connect)?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(connect)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(connect)?;
    let mut v: Value = serde_json::from_str(&line).map_err(|e| CtlError::Answer(e.to_string()))?;
    if let Some(e) = v["error"].as_str() {
        return Err(CtlError::Refused(e.to_string()));
    }
    let len = v["pcap_bytes"]
        .as_u64()
        .ok_or_else(|| CtlError::Answer(format!("no pcap_bytes in {v}")))?;
    let mut w = std::io::BufWriter::new(file);
    let copied = std::io::copy(&mut r.take(len), &mut w).map_err(connect)?;
    if copied != len {
        return Err(CtlError::Answer(format!(
            "the capture was cut short: {copied} of {len} bytes"
        )));
    }
    w.flush().map_err(file_err)?;
    v["path"] = json!(path.display().to_string());
    Ok(v)
}

/// Sends one request to the daemon at `path` and returns its answer.
pub fn request(path: &Path, req: &Value) -> Result<Value, CtlError> {
    let connect = |source| CtlError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(connect)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(connect)?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(connect)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(connect)?;
    let v: Value = serde_json::from_str(&line).map_err(|e| CtlError::Answer(e.to_string()))?;
    if let Some(e) = v["error"].as_str() {
        return Err(CtlError::Refused(e.to_string()));
    }
    Ok(v)
}

/// An answer as the operator's familiar tools print it.
pub fn render(cmd: &str, v: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    match cmd {
        "fdb" => {
            // As `bridge fdb show` prints a bridge with a VXLAN port.
            for e in v["entries"].as_array().into_iter().flatten() {
                let mut line = format!("{} dev {}", s(&e["mac"]), s(&e["port"]));
                if let Some(dst) = e["dst"].as_str() {
                    line.push_str(&format!(" dst {dst} vni {}", e["vni"]));
                }
                if e["static"].as_bool() == Some(true) {
                    line.push_str(" static");
                } else {
                    let idle = e["idle_ms"].as_u64().unwrap_or(0) / 1000;
                    line.push_str(&format!(" used {idle}"));
                }
                out.push_str(&line);
                out.push_str(" master podwire\n");
            }
        }
        "attach" => out.push_str(&format!(
            "attached {} in {} as {} ({}, mtu {}, bridge port {})\n",
            s(&v["ip"]),
            s(&v["netns"]),
            s(&v["ifname"]),
            s(&v["mac"]),
            v["mtu"],
            v["port"]
        )),
        "detach" => out.push_str(&format!("detached {}\n", s(&v["detached"]))),
        "fault" => out.push_str(&format!("worker {} asked to panic\n", v["worker"])),
        "subnets" => {
            out.push_str(&format!("network {}\n", s(&v["network"])));
            out.push_str(&format!(
                "{:<20} {:<16} {:<8} {}\n",
                "SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC"
            ));
            for l in v["leases"].as_array().into_iter().flatten() {
                let own = if l["own"].as_bool() == Some(true) {
                    " (this node)"
                } else {
                    ""
                };
                out.push_str(&format!(
                    "{:<20} {:<16} {:<8} {}{own}\n",
                    s(&l["subnet"]),
                    s(&l["public_ip"]),
                    s(&l["backend"]),
                    s(&l["vtep_mac"]),
                ));
            }
            match v["own"]["lease_expiry_unix"].as_u64() {
                Some(t) => out.push_str(&format!("lease expires at unix time {t}\n")),
                None => out.push_str("lease never expires (file store)\n"),
            }
        }
        "conntrack" => {
            for e in v["entries"].as_array().into_iter().flatten() {
                let t = |t: &Value, d: usize| {
                    format!(
                        "src={} dst={} sport={} dport={} packets={} bytes={}",
                        s(&t["src"]),
                        s(&t["dst"]),
                        t["sport"],
                        t["dport"],
                        e["packets"][d],
                        e["bytes"][d]
                    )
                };
                let proto = s(&e["proto"]);
                let num = match proto.as_str() {
                    "tcp" => 6,
                    "udp" => 17,
                    "icmp" => 1,
                    _ => 0,
                };
                out.push_str(&format!(
                    "{proto:<8} {num} {} {}{} {}{}{}\n",
                    e["expires_in"],
                    e["state"]
                        .as_str()
                        .map(|s| format!("{s} "))
                        .unwrap_or_default(),
                    t(&e["original"], 0),
                    if e["seen_reply"].as_bool() == Some(true) {
                        ""
                    } else {
                        "[UNREPLIED] "
                    },
                    t(&e["reply"], 1),
                    if e["assured"].as_bool() == Some(true) {
                        " [ASSURED]"
                    } else {
                        ""
                    },
                ));
            }
            out.push_str(&format!(
                "conntrack v{} (podwire): {} flow entries have been shown.\n",
                env!("CARGO_PKG_VERSION"),
                v["count"]
            ));
        }
        "services" => {
            out.push_str("Prot LocalAddress:Port Scheduler Flags\n");
            out.push_str("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n");
            for svc in v["services"].as_array().into_iter().flatten() {
                let flags = svc["affinity_timeout"]
                    .as_u64()
                    .map(|t| format!(" persistent {t}"))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "{:<4} {}:{} {}{flags}   # {}\n",
                    s(&svc["proto"]).to_uppercase(),
                    s(&svc["cluster_ip"]),
                    svc["port"],
                    s(&svc["scheduler"]),
                    s(&svc["name"]),
                ));
                for ep in svc["endpoints"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "  -> {:<28} Masq    1      {:<10} {}\n",
                        format!("{}:{}", s(&ep["ip"]), ep["port"]),
                        ep["active"],
                        ep["inactive"]
                    ));
                }
            }
        }
        "capture" => out.push_str(&format!(
            "captured {} of {} packets to {}\n",
            v["captured"],
            v["wanted"],
            s(&v["path"])
        )),
        "stats" => {
            for w in v["workers"].as_array().into_iter().flatten() {
                out.push_str(&format!("worker {}\n", w["worker"]));
                for component in Component::ALL {
                    out.push_str(&format!("  {}\n", component.as_str()));
                    for c in component.counters() {
                        let rate = w["per_second"][c.name]
                            .as_f64()
                            .map(|r| format!("  ({r:.0}/s)"))
                            .unwrap_or_default();
                        let n = &w["counters"][c.name];
                        out.push_str(&format!("    {:<30} {n}{rate}\n", c.name));
                    }
                }
                for (reason, n) in w["drops"].as_object().into_iter().flatten() {
                    out.push_str(&format!("  drop {reason:<17} {n}\n"));
                }
            }
            for p in v["xdp_programs"].as_array().into_iter().flatten() {
                out.push_str(&format!("XDP program on {}\n", s(&p["interface"])));
                if let Some(e) = p["error"].as_str() {
                    out.push_str(&format!("  unreadable: {e}\n"));
                }
                for name in crate::health::xdp_counter_names() {
                    if !p[name].is_null() {
                        out.push_str(&format!("  {name:<22} {}\n", p[name]));
                    }
                }
            }
        }
        _ => out.push_str(&format!("{v:#}\n")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use podwire_dataplane::conntrack::tcp::TcpState;

    fn entry(sport: u16, state: TcpState) -> EntryView {
        let o = Tuple::new(
            Ipv4Addr::new(10, 244, 1, 2),
            sport,
            Ipv4Addr::new(10, 96, 0, 10),
            80,
            PROTO_TCP,
        );
        EntryView {
            original: o,
            reply: Tuple::new(Ipv4Addr::new(10, 244, 2, 2), 8080, o.src, sport, PROTO_TCP),
            tcp_state: Some(state),
            seen_reply: true,
            assured: true,
            expires_in: 100,
            service: Some(ServiceBinding {
                vip: o.dst,
                port: 80,
                proto: PROTO_TCP,
                backend: Ipv4Addr::new(10, 244, 2, 2),
                backend_port: 8080,
            }),
            packets: [3, 2],
            bytes: [180, 120],
        }
    }

    /// A daemon's ctl state over a one-lease map, no workers.
    fn test_state() -> Arc<CtlState> {
        let config = crate::config::parse_net_conf(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let ip = Ipv4Addr::new(192, 168, 0, 1);
        let view = crate::store::ClusterView {
            config,
            leases: vec![crate::store::Lease {
                subnet: "10.244.1.0/24".parse().unwrap(),
                attrs: crate::lease::LeaseAttrs::udp(ip),
            }],
        };
        let tables = crate::tables::build(&view, ip, None).unwrap();
        Arc::new(CtlState::new(
            Arc::new(ArcSwap::from_pointee(tables)),
            None,
            Arc::new(Capture::default()),
            Vec::new(),
            Arc::new(Health::default()),
        ))
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("podwire-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn test_the_socket_is_never_seen_with_a_wider_mode_than_0600() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        use std::os::unix::fs::MetadataExt;
        let dir = temp_dir("ctl-mode");
        let path = dir.join("ctl.sock");
        let inotify = Inotify::init(InitFlags::empty()).unwrap();
        inotify
            .add_watch(&dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            .unwrap();
        // Looks at the socket the moment its name appears in the directory, as a local user
        // racing to connect would.
        let watched = path.clone();
        let watcher = std::thread::spawn(move || {
            let mut modes = Vec::new();
            loop {
                for ev in inotify.read_events().unwrap() {
                    match ev.name.as_deref().and_then(|n| n.to_str()) {
                        Some("ctl.sock") => {
                            if let Ok(m) = std::fs::symlink_metadata(&watched) {
                                modes.push(m.mode() & 0o777);
                            }
                        }
                        Some("stop") => return modes,
                        _ => {}
                    }
                }
            }
        });
        let state = test_state();
        for _ in 0..50 {
            serve(&path, Arc::clone(&state)).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        std::fs::write(dir.join("stop"), "").unwrap();
        let modes = watcher.join().unwrap();
        assert!(!modes.is_empty(), "the watcher saw no socket");
        assert!(
            modes.iter().all(|&m| m == 0o600),
            "the socket was seen with modes {:?}",
            modes
                .iter()
                .filter(|&&m| m != 0o600)
                .map(|m| format!("{m:o}"))
                .collect::<Vec<_>>()
        );
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // The renamed socket answers, and no private directory is left behind.
        let answer = request(&path, &json!({"cmd": "subnets"})).unwrap();
        assert_eq!(answer["network"], "10.244.0.0/16");
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["ctl.sock", "stop"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_fdb_on_a_routed_node_is_a_clear_refusal() {
        // Before: "podwire answered garbage: no bridge: podwire runs in routed (L3) mode".
        let dir = temp_dir("ctl-fdb-routed");
        let socket = dir.join("ctl.sock");
        serve(&socket, test_state()).unwrap();
        for cmd in ["fdb", "attach", "detach"] {
            let err = request(&socket, &json!({"cmd": cmd, "netns": "pod-a"})).unwrap_err();
            assert!(matches!(err, CtlError::Refused(_)), "{cmd}: {err:?}");
            let text = err.to_string();
            assert!(!text.contains("garbage"), "{text}");
            assert!(
                text.starts_with(&format!(
                    "podwire refused: {cmd}: this node runs in routed mode (--mode l3): no bridge, so no FDB"
                )),
                "{text}"
            );
        }
        // An answer that is no JSON at all is still garbage.
        let bad = dir.join("bad.sock");
        let listener = std::os::unix::net::UnixListener::bind(&bad).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&c).read_line(&mut line).unwrap();
            c.write_all(b"not json\n").unwrap();
        });
        let err = request(&bad, &json!({"cmd": "fdb"})).unwrap_err();
        server.join().unwrap();
        assert!(matches!(err, CtlError::Answer(_)), "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_the_daemon_writes_no_capture_file() {
        let dir = temp_dir("ctl-capture-file");
        let socket = dir.join("ctl.sock");
        serve(&socket, test_state()).unwrap();
        let target = dir.join("daemon-wrote-this.pcap");
        let req = json!({"cmd": "capture", "port": "tun", "count": 1, "timeout_ms": 100,
                         "path": target.display().to_string()});
        let answer = request(&socket, &req).unwrap();
        assert_eq!(answer["captured"], 0);
        assert!(
            !target.exists(),
            "the daemon (root) wrote a file where the request said"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_stats_carry_the_xdp_programs_counters() {
        let dir = temp_dir("ctl-stats-xdp");
        let socket = dir.join("ctl.sock");
        let state = test_state();
        state
            .health
            .set_xdp_programs(vec![crate::health::XdpProgramCounters::from_fn(
                "eth0",
                || {
                    Ok(podwire_dataplane::port::xdp::XdpCounters {
                        redirected: 500,
                        no_socket: 4,
                        ..Default::default()
                    })
                },
            )]);
        serve(&socket, Arc::clone(&state)).unwrap();
        let v = request(&socket, &json!({"cmd": "stats"})).unwrap();
        let p = &v["xdp_programs"][0];
        assert_eq!(p["interface"], "eth0", "{v}");
        assert_eq!(p["no_socket"], 4, "{v}");
        assert_eq!(p["redirected"], 500, "{v}");
        let text = render("stats", &v);
        assert!(text.contains("XDP program on eth0"), "{text}");
        assert!(text.contains("no_socket"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_a_capture_does_not_hold_up_other_requests() {
        let dir = temp_dir("ctl-capture-busy");
        let socket = dir.join("ctl.sock");
        serve(&socket, test_state()).unwrap();
        let s = socket.clone();
        let capturing = std::thread::spawn(move || {
            let req = json!({"cmd": "capture", "port": "tun", "count": 1, "timeout_ms": 1500,
                             "path": "/dev/null"});
            request(&s, &req)
        });
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        request(&socket, &json!({"cmd": "stats"})).unwrap();
        let took = started.elapsed();
        capturing.join().unwrap().unwrap();
        assert!(
            took < Duration::from_millis(500),
            "stats waited {took:?} behind a capture"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_the_client_writes_the_pcap_the_daemon_streams() {
        use podwire_dataplane::batch::Batch;
        let dir = temp_dir("ctl-capture-client");
        let socket = dir.join("ctl.sock");
        let state = test_state();
        serve(&socket, Arc::clone(&state)).unwrap();
        // A worker's part: three packets read from the TUN once the capture is armed.
        let feeder = std::thread::spawn(move || {
            while !state.capture.wants(CapturePoint::Tun) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut b = Batch::new(3, 256);
            for i in 0..3 {
                b.rx_slot(i)[..4].copy_from_slice(&[0x45, 0, 0, i as u8]);
                b.commit_rx(
                    i,
                    4,
                    std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                    false,
                );
            }
            state.capture.record(CapturePoint::Tun, &b);
        });
        let file = dir.join("pods.pcap");
        let req = json!({"cmd": "capture", "port": "tun", "count": 3, "timeout_ms": 5000});
        let got = capture_to_file(&socket, &req, &file).unwrap();
        feeder.join().unwrap();
        assert_eq!(
            (got["captured"].as_u64(), got["wanted"].as_u64()),
            (Some(3), Some(3))
        );
        assert_eq!(got["path"], file.display().to_string());
        let mut r = pcap_file::pcap::PcapReader::new(std::fs::File::open(&file).unwrap()).unwrap();
        assert_eq!(r.header().datalink, pcap_file::DataLink::RAW);
        let mut n = 0;
        while let Some(p) = r.next_packet() {
            assert_eq!(&*p.unwrap().data, &[0x45, 0, 0, n]);
            n += 1;
        }
        assert_eq!(n, 3);
        // One capture at a time: a second one while the first runs is refused, and the ctl
        // thread answers it at once.
        let s = socket.clone();
        let long = std::thread::spawn(move || {
            let req = json!({"cmd": "capture", "port": "underlay", "count": 1, "timeout_ms": 800});
            request(&s, &req)
        });
        std::thread::sleep(Duration::from_millis(200));
        let second = capture_to_file(&socket, &req, &dir.join("second.pcap")).unwrap_err();
        assert!(second.to_string().contains("running already"), "{second}");
        assert_eq!(long.join().unwrap().unwrap()["captured"], 0);
        // A file the client cannot create is its own error, before the daemon is asked.
        let e = capture_to_file(&socket, &req, &dir.join("no/such/dir.pcap")).unwrap_err();
        assert!(matches!(e, CtlError::File { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_filters_match_either_tuple() {
        let e = entry(40000, TcpState::Established);
        let f = |req: Value| Filter::from_request(&req).unwrap().matches(&e);
        assert!(f(json!({})));
        assert!(f(json!({"addr": "10.244.2.2"})), "the reply's source");
        assert!(f(json!({"port": 8080})));
        assert!(f(
            json!({"port": 40000, "state": "established", "proto": "tcp"})
        ));
        assert!(!f(json!({"state": "TIME_WAIT"})));
        assert!(!f(json!({"proto": "udp"})));
        assert!(!f(json!({"addr": "10.244.9.9"})));
        assert!(Filter::from_request(&json!({"addr": "nope"})).is_err());
        assert!(Filter::from_request(&json!({"port": 70000})).is_err());
    }

    #[test]
    fn test_rendering_looks_like_the_familiar_tools() {
        let v = json!({"count": 1, "entries": [{
            "proto": "tcp", "state": "ESTABLISHED", "expires_in": 431999,
            "original": {"src": "10.244.1.2", "dst": "10.96.0.10", "sport": 40000, "dport": 80},
            "reply": {"src": "10.244.2.2", "dst": "10.244.1.2", "sport": 8080, "dport": 40000},
            "packets": [3, 2], "bytes": [180, 120], "seen_reply": true, "assured": true}]});
        let text = render("conntrack", &v);
        assert!(text.starts_with("tcp      6 431999 ESTABLISHED src=10.244.1.2 dst=10.96.0.10 sport=40000 dport=80 packets=3 bytes=180 src=10.244.2.2 dst=10.244.1.2 sport=8080 dport=40000 packets=2 bytes=120 [ASSURED]"), "{text}");
        assert!(text.contains("1 flow entries have been shown."));
        let v = json!({"services": [{"name": "default/web", "cluster_ip": "10.96.0.10", "port": 80,
            "proto": "tcp", "scheduler": "mh", "affinity_timeout": null,
            "endpoints": [{"ip": "10.244.2.2", "port": 8080, "active": 5, "inactive": 1}]}]});
        let text = render("services", &v);
        assert!(text.contains("TCP  10.96.0.10:80 mh"), "{text}");
        assert!(text.contains("  -> 10.244.2.2:8080"), "{text}");
    }
}
