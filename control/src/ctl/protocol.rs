//! What `podwire ctl` and the daemon say to each other: one [`Request`] (a JSON object on one
//! line, its command in `cmd`), answered by one JSON document: a [`Response`], or
//! `{"error": "..."}` (a [`Refusal`]).
//!
//! The field names are the JSON that `podwire ctl --json` prints and scripts (and the lab)
//! read: they do not change.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// One ctl command and its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The live subnet map and our lease's expiry.
    Subnets,
    /// Tracked connections, like `conntrack -L`.
    Conntrack(ConntrackFilter),
    /// Services and their endpoints, like `ipvsadm -Ln`.
    Services,
    /// Worker counters, drops and rates, and the XDP programs' counters.
    Stats,
    /// L2 mode: the bridge's forwarding database.
    Fdb,
    /// L2 mode: give a pod an interface on the bridge.
    Attach(AttachRequest),
    /// L2 mode: remove a pod's interface.
    Detach { netns: String },
    /// `--fault-injection`: make a worker fail.
    Fault {
        kind: FaultKind,
        #[serde(default)]
        worker: usize,
    },
    /// A pcap of what a port receives (the answer streams the pcap after its JSON line).
    Capture(CaptureRequest),
}

impl Request {
    /// The command's name, as `cmd` carries it.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Subnets => "subnets",
            Request::Conntrack(_) => "conntrack",
            Request::Services => "services",
            Request::Stats => "stats",
            Request::Fdb => "fdb",
            Request::Attach(_) => "attach",
            Request::Detach { .. } => "detach",
            Request::Fault { .. } => "fault",
            Request::Capture(_) => "capture",
        }
    }
}

/// A transport protocol, as `conntrack -p` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// `conntrack -L`-style filters: every one given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConntrackFilter {
    /// This address in either direction.
    pub addr: Option<Ipv4Addr>,
    /// This port in either direction.
    pub port: Option<u16>,
    /// TCP connections in this state (ESTABLISHED, TIME_WAIT, ...; any case).
    pub state: Option<String>,
    pub proto: Option<Proto>,
}

/// `attach`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub netns: String,
    /// ADDRESS/PREFIX (required; missing, the request is refused after the mode is checked).
    #[serde(default)]
    pub ip: String,
    pub mac: Option<String>,
    #[serde(default = "default_ifname")]
    pub ifname: String,
    pub gateway: Option<Ipv4Addr>,
}

fn default_ifname() -> String {
    "eth0".into()
}

/// What `fault` makes fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The worker panics; the daemon then exits non-zero for its supervisor to restart it.
    WorkerPanic,
}

/// Where a capture listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CapturePort {
    /// The pods' packets, as the TUN device gives them.
    Tun,
    /// The encapsulated datagrams, with their outer headers.
    Underlay,
}

/// `capture`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureRequest {
    pub port: CapturePort,
    /// Packets to capture (1 to [`super::MAX_CAPTURE`]).
    #[serde(default = "default_count")]
    pub count: usize,
    /// Longest wait for them.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_count() -> usize {
    100
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Why the daemon refused a request: the text is what `{"error": ...}` carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(
        "{0}: this node runs in routed mode (--mode l3): no bridge, so no FDB and no ports to \
         attach; {0} needs `podwire run --mode l2`"
    )]
    RoutedMode(&'static str),
    #[error("connection tracking is off (--conntrack off)")]
    ConntrackOff,
    #[error("fault injection is off: start podwire with --fault-injection")]
    FaultInjectionOff,
    #[error("capture streams a pcap after its JSON line: podwire ctl capture")]
    CaptureNeedsStream,
    #[error("a capture is running already")]
    CaptureRunning,
    #[error("cannot start the capture: {0}")]
    CaptureStart(String),
    #[error("writing the capture: {0}")]
    Pcap(String),
    #[error("no pod attached from netns {0:?}")]
    NotAttached(String),
    #[error("attach needs ip (ADDRESS/PREFIX)")]
    MissingIp,
    #[error("ip: {0}")]
    Address(String),
    #[error("{field}: cannot parse {value:?}")]
    Unparsable { field: &'static str, value: String },
    /// The bridge's worker or the pod's setup failed, saying why.
    #[error("{0}")]
    Bridge(String),
    #[error("{0}")]
    Fault(String),
}

/// The answer to a request, by command; it serializes as the command's own object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    Subnets(Subnets),
    Conntrack(Conntrack),
    Services(Services),
    Stats(Stats),
    Fdb(Fdb),
    Attached(Attached),
    Detached(Detached),
    Fault(FaultInjected),
    Captured(Captured),
}

impl Response {
    /// Reads the answer to `req` (the JSON does not say which command it answers).
    pub fn decode(req: &Request, v: serde_json::Value) -> serde_json::Result<Response> {
        use serde_json::from_value as of;
        Ok(match req {
            Request::Subnets => Response::Subnets(of(v)?),
            Request::Conntrack(_) => Response::Conntrack(of(v)?),
            Request::Services => Response::Services(of(v)?),
            Request::Stats => Response::Stats(of(v)?),
            Request::Fdb => Response::Fdb(of(v)?),
            Request::Attach(_) => Response::Attached(of(v)?),
            Request::Detach { .. } => Response::Detached(of(v)?),
            Request::Fault { .. } => Response::Fault(of(v)?),
            Request::Capture(_) => Response::Captured(of(v)?),
        })
    }
}

/// `subnets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnets {
    pub network: String,
    pub own: OwnLease,
    pub leases: Vec<LeaseRow>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnLease {
    pub subnet: String,
    pub public_ip: Ipv4Addr,
    /// None: a lease that never expires (file store).
    pub lease_expiry_unix: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRow {
    pub subnet: String,
    pub public_ip: Ipv4Addr,
    /// udp, vxlan or other.
    pub backend: String,
    pub vtep_mac: Option<String>,
    /// This node's lease.
    pub own: bool,
}

/// `conntrack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conntrack {
    /// Entries shown (that matched the filter).
    pub count: usize,
    /// Entries in the table.
    pub total: usize,
    pub counters: ConntrackCounters,
    pub entries: Vec<ConnEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackCounters {
    pub entries: u64,
    pub max: usize,
    pub inserted: u64,
    pub expired: u64,
    pub early_drops: u64,
    pub table_full: u64,
    pub invalid: u64,
}

/// One connection, as `conntrack -L` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnEntry {
    /// tcp, udp, icmp or the protocol's number.
    pub proto: String,
    /// The TCP state (None for UDP and ICMP).
    pub state: Option<String>,
    /// Seconds left.
    pub expires_in: u64,
    pub original: TupleRow,
    pub reply: TupleRow,
    /// Original and reply direction.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub seen_reply: bool,
    pub assured: bool,
    /// `VIP:PORT` of the service the connection was translated for.
    #[serde(default)]
    pub service: Option<String>,
    /// Its service endpoint left: kept only to hold its tuples, its packets dropped.
    #[serde(default)]
    pub gone: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TupleRow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

/// `services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    pub service_cidr: String,
    pub hairpin_ip: Ipv4Addr,
    pub services: Vec<ServiceRow>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRow {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub proto: String,
    /// ipvsadm's name of the scheduler: mh (Maglev) or random.
    pub scheduler: String,
    pub affinity_timeout: Option<u32>,
    pub endpoints: Vec<EndpointRow>,
    /// externalIPs and load balancer ingress IPs served with the ClusterIP's endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// ipvsadm's ActiveConn (TCP ESTABLISHED; UDP flows count as active).
    pub active: u64,
    /// InActConn: any other TCP state.
    pub inactive: u64,
}

/// `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Seconds since the previous `stats` (None on the first: no rates).
    pub since_previous_s: Option<f64>,
    pub workers: Vec<WorkerStats>,
    pub xdp_programs: Vec<XdpProgram>,
}

/// One worker's counters by name (every counter of `stats::COUNTERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub worker: usize,
    pub counters: BTreeMap<String, u64>,
    /// Per second since the previous `stats` (empty on the first).
    pub per_second: BTreeMap<String, f64>,
    /// Drops by reason, the reasons with any.
    pub drops: BTreeMap<String, u64>,
}

/// An XDP program's counters, read from its map when asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpProgram {
    pub interface: String,
    /// Why the counters could not be read (then there are none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub counters: BTreeMap<String, u64>,
}

/// `fdb`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fdb {
    pub entries: Vec<FdbRow>,
    pub ports: Vec<FdbPort>,
}

/// One FDB entry, as `bridge fdb show` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdbRow {
    pub mac: String,
    /// The port's label, or `vxlan` for a remote station.
    pub port: String,
    /// The VTEP of a remote station.
    pub dst: Option<Ipv4Addr>,
    pub vni: u32,
    #[serde(rename = "static")]
    pub is_static: bool,
    pub idle_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdbPort {
    pub port: u16,
    pub label: String,
    pub device: String,
}

/// `attach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub netns: String,
    pub ifname: String,
    pub ip: String,
    pub mac: String,
    /// The bridge port's number.
    pub port: u16,
    pub device: String,
    pub mtu: u32,
}

/// `detach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detached {
    pub detached: String,
}

/// `fault`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultInjected {
    pub fault: FaultKind,
    pub worker: usize,
}

/// `capture`'s JSON line (the pcap follows it); the client adds the file it wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Captured {
    pub captured: usize,
    pub wanted: usize,
    pub pcap_bytes: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}
