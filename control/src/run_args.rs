//! `podwire run`'s command line as types, and the one step that turns it into the daemon's
//! options or says which combination makes no sense ([`RunArgs::into_options`]).

use crate::daemon;
use clap::{Args, ValueEnum};
use podwire_dataplane::worker::WorkerConfig;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// A switch given as `on` or `off`, as users type it (`--udp-gso off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    pub fn is_on(self) -> bool {
        self == OnOff::On
    }
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    L3,
    L2,
}

/// `--io`: how the underlay is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Io {
    Tun,
    Xdp,
}

/// `--l2-pods`: what `podwire ctl attach` gives a pod in L2 mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum L2Pods {
    Tap,
    Xdp,
}

/// `--vxlan-tx`: how VXLAN leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VxlanTx {
    Socket,
    FlowPorts,
}

/// `--service-lb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceLb {
    Maglev,
    Random,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--log-level`: the least severe events logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The `tracing` filter directive.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// flanneld's klog verbosity `-v=N`: 0 is its default (info); flanneld logs its details
    /// at 1 to 4 (debug here), and the rest beyond (trace).
    pub fn from_klog_verbosity(v: u32) -> LogLevel {
        match v {
            0 => LogLevel::Info,
            1..=4 => LogLevel::Debug,
            _ => LogLevel::Trace,
        }
    }
}

/// A command line whose flags parse but do not go together.
#[derive(Debug, thiserror::Error)]
pub enum RunArgsError {
    #[error("--l2-pods is an L2 mode option (--mode l2); routed pods on AF_XDP: --pod-ports")]
    L2PodsWithoutL2,
    #[error("--pod-ports needs --io xdp in routed mode (L2 mode: --l2-pods xdp)")]
    PodPortsWithoutXdp,
    #[error("--ip-masq with --io xdp masquerades in podwire, which needs --conntrack on")]
    XdpMasqWithoutConntrack,
    #[error("--mode l2 does not do --ip-masq or --services yet")]
    L2WithMasqOrServices,
    #[error("services need connection tracking: drop --conntrack off")]
    ServicesWithoutConntrack,
    #[error("--services {0}: expected file:PATH")]
    ServicesSpec(String),
    #[error("--store {0}: expected file:PATH")]
    StoreSpec(String),
    #[error("--kube-subnet-mgr needs this node's Node name: set NODE_NAME (the downward API's spec.nodeName) or --node-name")]
    NoNodeName,
    #[error("--etcd-certfile and --etcd-keyfile go together: give both or neither")]
    HalfClientCert,
    #[error("an etcd password needs --etcd-username")]
    PasswordWithoutUser,
    #[error("--workers must be at least 1")]
    NoWorkers,
    #[error("--batch-size must be 1-{max}, not {got}")]
    BatchSize { got: usize, max: usize },
    #[error("--etcd-endpoints {endpoint}: {why}")]
    Endpoint { endpoint: String, why: &'static str },
    #[error(transparent)]
    PasswordFile(#[from] podwire::secret::SecretError),
}

impl RunArgsError {
    /// Whether the command line itself is wrong (exit 2, as clap's own usage errors), rather
    /// than a file it names (exit 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, RunArgsError::PasswordFile(_))
    }
}

/// A boolean as Go's `strconv.ParseBool` reads it (flanneld's flags and environment):
/// 1, t, T, TRUE, true, True; 0, f, F, FALSE, false, False.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!(
            "{s:?} is not a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)"
        )),
    }
}

/// Checks an etcd endpoint's form: flanneld's are `http://` or `https://` URLs with a host.
fn check_endpoint(endpoint: &str) -> Result<(), RunArgsError> {
    let refuse = |why| RunArgsError::Endpoint {
        endpoint: endpoint.to_string(),
        why,
    };
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| refuse("expected http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    // `[v6]:port`, `host:port` or a bare host.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => return Err(refuse("an IPv6 address without its closing ]")),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(refuse("the port is not a number from 0 to 65535"));
    }
    if host.is_empty() {
        return Err(refuse("no host"));
    }
    Ok(())
}

/// `podwire run --help` headings, so its 60-odd options read by subject.
const HEADING_STORE: &str = "Cluster store (flanneld's etcd flags)";
const HEADING_NODE: &str = "This node";
const HEADING_IO: &str = "Workers and I/O";
const HEADING_SERVICES: &str = "Connection tracking and services";
const HEADING_L2: &str = "L2 mode (--mode l2)";
const HEADING_OPS: &str = "Operations: health, logs, ctl";

#[derive(Args)]
pub struct RunArgs {
    /// Embedded cluster store instead of etcd: `file:PATH`, a read-only JSON file mirroring
    /// flannel's etcd keyspace ({"config": net-conf.json, "subnets": {"10.244.1.0-24": lease,
    /// ...}}), re-read on change. Every node's lease must be in it.
    #[arg(help_heading = HEADING_STORE, long)]
    pub store: Option<String>,
    /// The Kubernetes API as the cluster store, as flanneld's -kube-subnet-mgr: this node's
    /// subnet is its Node's podCIDR, its lease is published as Node annotations, every
    /// annotated Node is a peer, and net-conf.json is read from --net-config-path.
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_KUBE_SUBNET_MGR", value_parser = parse_go_bool,
          conflicts_with = "store")]
    pub kube_subnet_mgr: bool,
    /// With --kube-subnet-mgr: the API server's URL (overrides the kubeconfig's, or the
    /// in-cluster one).
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_KUBE_API_URL", requires = "kube_subnet_mgr")]
    pub kube_api_url: Option<String>,
    /// With --kube-subnet-mgr: a kubeconfig file (default: the pod's service account).
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_KUBECONFIG_FILE", requires = "kube_subnet_mgr")]
    pub kubeconfig_file: Option<PathBuf>,
    /// With --kube-subnet-mgr: the prefix of the Node annotations the lease is written to.
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
          default_value = podwire::kube_store::DEFAULT_ANNOTATION_PREFIX)]
    pub kube_annotation_prefix: String,
    /// With --kube-subnet-mgr: where net-conf.json is (the kube-flannel ConfigMap's mount).
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_NET_CONFIG_PATH",
          default_value = podwire::kube_store::DEFAULT_NET_CONF)]
    pub net_config_path: PathBuf,
    /// With --kube-subnet-mgr: this node's Node name (set by the downward API, as for flanneld).
    #[arg(help_heading = HEADING_STORE, long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// etcd endpoints, comma-separated (flannel's schema, v3 API).
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_ETCD_ENDPOINTS", default_value = podwire::etcd::DEFAULT_ENDPOINTS)]
    pub etcd_endpoints: String,
    /// etcd key prefix of the network config and leases.
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_ETCD_PREFIX", default_value = podwire::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// CA certificate (PEM) to verify etcd's TLS certificate (use https:// endpoints).
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd; used together with --etcd-keyfile.
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd; used together with --etcd-certfile.
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd user name (with --etcd-password or --etcd-password-file).
    #[arg(
        help_heading = HEADING_STORE,
        long,
        env = "FLANNELD_ETCD_USERNAME",
        hide_env_values = true
    )]
    pub etcd_username: Option<String>,
    /// etcd password (its value from the environment is never shown; prefer
    /// --etcd-password-file: a command line is visible to every user in ps).
    #[arg(
        help_heading = HEADING_STORE,
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub etcd_password: Option<podwire::secret::Secret>,
    /// Read the etcd password from this file (its content, less a trailing newline).
    #[arg(
        help_heading = HEADING_STORE,
        long,
        value_name = "PATH",
        conflicts_with = "etcd_password"
    )]
    pub etcd_password_file: Option<PathBuf>,
    /// Minutes before expiry at which the lease is renewed (1-1439), as flanneld.
    #[arg(help_heading = HEADING_STORE, long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=1439))]
    pub subnet_lease_renew_margin: u64,
    /// TTL in seconds of the leases podwire writes (flanneld: 86400). For tests of renewal.
    #[arg(help_heading = HEADING_STORE, long, default_value_t = 86400, hide = true)]
    pub subnet_lease_ttl: u64,
    /// Underlay interface, by name or IPv4 address (default: the default route's interface).
    /// Repeat it to give several: the first the node has is used, as flanneld does.
    #[arg(help_heading = HEADING_NODE, long, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,
    /// IP this node is reached at (default: the interface's address). Written in our lease.
    #[arg(help_heading = HEADING_NODE, long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Where to write flannel's subnet.env for the CNI plugin.
    #[arg(
        help_heading = HEADING_NODE,
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Poll-mode workers, one TUN queue and one underlay socket each (default: one per core).
    #[arg(help_heading = HEADING_IO, long)]
    pub workers: Option<usize>,
    /// Name of the TUN device (default: flannel0 for udp, flannel.<VNI> for vxlan, as flanneld).
    #[arg(help_heading = HEADING_NODE, long)]
    pub tun_name: Option<String>,
    /// Masquerade pod traffic leaving the cluster network, as flanneld's -ip-masq (its rules,
    /// in an nftables table podwire installs and removes on exit); FLANNEL_IPMASQ in subnet.env.
    /// With `--io xdp`, podwire masquerades the pods' TCP and UDP itself (to the node's
    /// address, source ports 61000-65535, steered into the TUN by policy routing); the
    /// kernel's rules keep the rest (ICMP).
    #[arg(help_heading = HEADING_NODE, long, env = "FLANNELD_IP_MASQ", value_parser = parse_go_bool)]
    pub ip_masq: bool,
    /// Accept the cluster network in iptables' FORWARD chain (from and to it), as flanneld's
    /// -iptables-forward-rules: hosts whose FORWARD policy is DROP (Docker sets it) need it.
    /// Two rules with the comment "podwire forward NETWORK", appended to iptables-nft's FORWARD
    /// chain when there is one, checked every 5 s and removed on exit. `=false` leaves it alone.
    #[arg(help_heading = HEADING_NODE,
        long,
        env = "FLANNELD_IPTABLES_FORWARD_RULES",
        value_parser = parse_go_bool,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub iptables_forward_rules: bool,
    /// Packets per batch (1-256).
    #[arg(help_heading = HEADING_IO, long, default_value_t = 64)]
    pub batch_size: usize,
    /// Microseconds a worker keeps polling idle ports before it sleeps in epoll.
    #[arg(help_heading = HEADING_IO, long, default_value_t = 50)]
    pub busy_poll_us: u64,
    /// Do not pin workers to CPUs.
    #[arg(help_heading = HEADING_IO, long)]
    pub no_pin: bool,
    /// TUN offload: `on` reads TCP superframes (TSO) from the TUN device and segments them in
    /// user space, one read per up to 64 KiB; `off` reads one packet per read. `on` falls back
    /// to `off` if the kernel refuses.
    #[arg(help_heading = HEADING_IO, long, value_enum, default_value_t = OnOff::On)]
    pub tun_offload: OnOff,
    /// UDP GSO (udp backend): `on` sends a run of same-size datagrams to one peer as one
    /// UDP_SEGMENT buffer; falls back to `off` by itself if the kernel refuses.
    #[arg(help_heading = HEADING_IO, long, value_enum, default_value_t = OnOff::On)]
    pub udp_gso: OnOff,
    /// UDP GRO on the underlay socket: `on` receives a sender's run of datagrams (its GSO
    /// buffer, or what the kernel coalesced) in one piece and splits it in user space, so the
    /// socket layer runs once per run. Falls back to plain receives if the kernel refuses it.
    #[arg(help_heading = HEADING_IO, long, value_enum, default_value_t = OnOff::On)]
    pub udp_gro: OnOff,
    /// A receive queue per peer node: `on` gives each peer (sending from the backend's port, as
    /// flannel udp and podwire's VXLAN do) a connected socket of its own, read round robin, so
    /// a peer flooding this node overflows only its own queue (counted as peer_queue_full)
    /// and cannot starve the others. Routed (L3) mode.
    #[arg(help_heading = HEADING_IO, long, value_enum, default_value_t = OnOff::On)]
    pub peer_queues: OnOff,
    /// How the underlay is reached: `tun` through the kernel's UDP sockets, or `xdp` through
    /// AF_XDP sockets that podwire's XDP program on --iface feeds (VXLAN or udp; worker i owns
    /// queue i; the program passes everything that is not podwire's to the kernel and is
    /// detached on exit). Pods reach podwire through the TUN device unless --pod-ports (L2
    /// mode: the bridge's underlay; pods through AF_XDP with --l2-pods xdp). podwire then also
    /// owns the node's address for the services' NodePorts: TCP and UDP to a NodePort are
    /// sent to the service's backend, on any node, masqueraded so the answer comes back
    /// through this node (needs --conntrack on).
    #[arg(help_heading = HEADING_IO, long, value_enum, default_value_t = Io::Tun)]
    pub io: Io,
    /// With `--io xdp`: pods' veth host ends (comma-separated) that podwire serves through
    /// AF_XDP instead of the TUN: its XDP program takes what the pod sends to other nodes' pods,
    /// to services and (with --ip-masq) outside, and podwire writes the pod's packets into the
    /// veth with the pod's MAC from the neighbour table. The host, the node's other pods and
    /// everything else stay with the kernel. Each port belongs to one worker; packets another
    /// worker has for its pod, and pods not resolved yet, go through the TUN. Each port is
    /// held to its pod's address, given as NAME=IP (else the one lease address the kernel has
    /// resolved on the device at start): only packets from it skip the host's stack, packets
    /// from other sources pass to the kernel, and any that reach podwire from the port are
    /// dropped (spoofed_source).
    #[arg(help_heading = HEADING_IO, long, value_delimiter = ',')]
    pub pod_ports: Vec<String>,
    /// How VXLAN leaves: `socket` through UDP sockets with UDP GSO, each inner flow on one of
    /// `--vxlan-tx-sockets` source ports by hash (runs of a flow's segments in one send), or
    /// `flow-ports` through a raw socket with a source port per inner flow as the kernel picks
    /// them (the most spread over ECMP paths, but one send per datagram).
    #[arg(help_heading = HEADING_IO, long, value_enum, default_value_t = VxlanTx::Socket)]
    pub vxlan_tx: VxlanTx,
    /// With `--vxlan-tx socket`: UDP sockets per worker, each on its own ephemeral source
    /// port, that inner flows are spread over by hash (0: every flow from port 8472).
    #[arg(help_heading = HEADING_IO, long, default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(0..=podwire_dataplane::worker::MAX_VXLAN_TX_SOCKETS as i64))]
    pub vxlan_tx_sockets: u16,
    /// Underlay socket buffer size in bytes (SO_RCVBUFFORCE/SO_SNDBUFFORCE).
    #[arg(help_heading = HEADING_IO, long, default_value_t = 4 << 20)]
    pub socket_buffer: usize,
    /// Connection tracking of every forwarded packet (netfilter's states and timeouts);
    /// services need it.
    #[arg(help_heading = HEADING_SERVICES, long, value_enum, default_value_t = OnOff::On)]
    pub conntrack: OnOff,
    /// Most tracked connections; when full, unassured ones are evicted first.
    #[arg(help_heading = HEADING_SERVICES, long, default_value_t = 131_072)]
    pub conntrack_max: usize,
    /// Seconds an idle ESTABLISHED TCP connection is kept (netfilter: 432000; kube-proxy sets
    /// 86400 with its flag of the same name).
    #[arg(help_heading = HEADING_SERVICES, long, default_value_t = 432_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_tcp_timeout_established: u32,
    /// Seconds a TCP connection in CLOSE_WAIT is kept (netfilter: 60; kube-proxy: 3600).
    #[arg(help_heading = HEADING_SERVICES, long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_tcp_timeout_close_wait: u32,
    /// Seconds an unanswered UDP flow is kept (netfilter: 30).
    #[arg(help_heading = HEADING_SERVICES, long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_udp_timeout: u32,
    /// Seconds an answered UDP flow (a stream) is kept (netfilter: 120).
    #[arg(help_heading = HEADING_SERVICES, long, default_value_t = 120, value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_udp_timeout_stream: u32,
    /// Services to translate (ClusterIP DNAT, kube-proxy's job): `file:PATH`, a JSON file
    /// {"services": [{"name", "clusterIP", "protocol", "port", "endpoints": [{"ip", "port"}],
    /// "sessionAffinity", "nodePort"}]}, re-read on change. The service range is routed into
    /// podwire's device.
    #[arg(help_heading = HEADING_SERVICES, long)]
    pub services: Option<String>,
    /// The cluster's service range (kube-apiserver's --service-cluster-ip-range).
    #[arg(help_heading = HEADING_SERVICES, long, default_value = podwire_dataplane::nat::DEFAULT_SERVICE_CIDR)]
    pub service_cidr: podwire_dataplane::route::Ipv4Net,
    /// Where NodePorts may be, `A-B` (kube-apiserver's flag of the same name and default): a
    /// NodePort outside it, or on one of podwire's own ports (the backend's UDP port, the
    /// healthz port, the masquerade ports 61000-65535), is refused and its service kept as
    /// ClusterIP only.
    #[arg(help_heading = HEADING_SERVICES, long, default_value = "30000-32767")]
    pub service_node_port_range: podwire_dataplane::nat::PortRange,
    /// How a service picks an endpoint for a new connection: `maglev` (consistent hashing,
    /// the same choice on every node) or `random`.
    #[arg(help_heading = HEADING_SERVICES, long, value_enum, default_value_t = ServiceLb::Maglev)]
    pub service_lb: ServiceLb,
    /// Write worker counters and drops by reason here as JSON, every second and at exit.
    #[arg(help_heading = HEADING_OPS, long)]
    pub stats_file: Option<PathBuf>,
    /// Address for the /healthz, /readyz and /metrics endpoint.
    #[arg(
        help_heading = HEADING_OPS,
        long,
        env = "FLANNELD_HEALTHZ_IP",
        default_value = "0.0.0.0"
    )]
    pub healthz_ip: std::net::IpAddr,
    /// Port for /healthz, /readyz and /metrics (0: disabled), as flanneld.
    #[arg(help_heading = HEADING_OPS, long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(help_heading = HEADING_OPS, long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The least severe log events written (flanneld's `-v=N` maps here: 0 info, 1-4 debug,
    /// more trace). RUST_LOG, when set, takes precedence and may set levels per module (e.g.
    /// `RUST_LOG=info,podwire::etcd=debug`). Colours only when stderr is a terminal.
    #[arg(help_heading = HEADING_OPS, long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// Unix socket `podwire ctl` talks to (mode 0600); empty: none.
    #[arg(help_heading = HEADING_OPS, long, default_value = podwire::ctl::DEFAULT_SOCKET)]
    pub ctl_socket: String,
    /// Accept `podwire ctl fault` (make a worker panic), to test that a supervisor restarts a
    /// daemon whose worker died. For test clusters only.
    #[arg(help_heading = HEADING_OPS, long)]
    pub fault_injection: bool,
    /// `l3` routes pod traffic through a TUN device (flannel's model); `l2` makes podwire the
    /// node's bridge (in place of cni0), with pods attached as TAP interfaces by `podwire ctl
    /// attach`, and one L2 domain across nodes over VXLAN (needs the vxlan backend).
    #[arg(help_heading = HEADING_NODE, long, value_enum, default_value_t = Mode::L3)]
    pub mode: Mode,
    /// L2 mode: seconds a learned MAC is kept after it was last seen (Linux bridge: 300).
    #[arg(help_heading = HEADING_L2, long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    pub fdb_ageing: u32,
    /// L2 mode: most learned MACs; when full, new ones are not learned (and are flooded to).
    #[arg(help_heading = HEADING_L2, long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    pub fdb_max: u32,
    /// L2 mode: learn remote MACs from decapsulated frames (`off`: only the nodes' host ports,
    /// from the subnet map, are known, like a kernel VXLAN device with `nolearning`).
    #[arg(help_heading = HEADING_L2, long, value_enum, default_value_t = OnOff::On)]
    pub fdb_learning_tunnel: OnOff,
    /// L2 mode: name of the host's bridge port, a TAP device with the node's gateway address.
    #[arg(help_heading = HEADING_L2, long, default_value = "podwire0")]
    pub bridge_port: String,
    /// L2 mode: what `podwire ctl attach` gives a pod. `tap`: a TAP device that podwire reads
    /// and writes. `xdp`: a veth pair whose host end podwire's XDP program hands every frame
    /// to an AF_XDP socket (the pod's end is set to finish its checksums, as AF_XDP has no
    /// offload); the bridge then runs without offload.
    #[arg(help_heading = HEADING_L2, long, value_enum, default_value_t = L2Pods::Tap)]
    pub l2_pods: L2Pods,
    /// Exit when the parent process dies (used by `podwire-lab lab`).
    #[arg(help_heading = HEADING_OPS, long, hide = true)]
    pub exit_with_parent: bool,
}

impl RunArgs {
    /// The daemon's options, or why these flags do not go together. Every check of how flags
    /// combine is here; the daemon checks only what needs the cluster (the backend, the lease).
    pub fn into_options(self) -> Result<daemon::RunOptions, RunArgsError> {
        self.check()?;
        let conntrack_config = self.conntrack_config();
        let workers = self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let services_file = match self.services.as_deref() {
            None => None,
            Some(s) => Some(PathBuf::from(
                file_path(s).ok_or_else(|| RunArgsError::ServicesSpec(s.to_string()))?,
            )),
        };
        let l2 = (self.mode == Mode::L2).then(|| daemon::L2Options {
            bridge: podwire_dataplane::bridge::Config {
                ageing_ms: u64::from(self.fdb_ageing) * 1000,
                max_learned: self.fdb_max as usize,
                tunnel_learning: self.fdb_learning_tunnel.is_on(),
                ..Default::default()
            },
            host_port: self.bridge_port.clone(),
            pods_xdp: self.l2_pods == L2Pods::Xdp,
        });
        Ok(daemon::RunOptions {
            store: self.store_spec()?,
            iface: self.iface,
            public_ip: self.public_ip,
            subnet_file: self.subnet_file,
            workers,
            tun_name: self.tun_name,
            ip_masq: self.ip_masq,
            forward_rules: self.iptables_forward_rules,
            worker: WorkerConfig {
                batch_size: self.batch_size,
                busy_poll: Duration::from_micros(self.busy_poll_us),
                pin: !self.no_pin,
                peer_queues: self.peer_queues.is_on(),
                ..WorkerConfig::default()
            },
            socket_buffer: self.socket_buffer,
            tun_offload: self.tun_offload.is_on(),
            udp_gso: self.udp_gso.is_on(),
            udp_gro: self.udp_gro.is_on(),
            vxlan_via_socket: self.vxlan_tx == VxlanTx::Socket && self.io != Io::Xdp,
            io_xdp: self.io == Io::Xdp,
            pod_ports: self.pod_ports,
            vxlan_tx_sockets: usize::from(self.vxlan_tx_sockets),
            renew_margin: Duration::from_secs(self.subnet_lease_renew_margin * 60),
            healthz: (self.healthz_port != 0)
                .then(|| std::net::SocketAddr::new(self.healthz_ip, self.healthz_port)),
            stats_file: self.stats_file,
            conntrack: self.conntrack.is_on(),
            conntrack_config,
            services_file,
            service_cidr: self.service_cidr,
            node_port_range: self.service_node_port_range,
            ctl_socket: (!self.ctl_socket.is_empty()).then(|| PathBuf::from(&self.ctl_socket)),
            fault_injection: self.fault_injection,
            l2,
            service_lb: match self.service_lb {
                ServiceLb::Maglev => podwire_dataplane::nat::Algorithm::Maglev,
                ServiceLb::Random => podwire_dataplane::nat::Algorithm::Random,
            },
        })
    }

    /// How the flags combine, before anything is read or opened.
    fn check(&self) -> Result<(), RunArgsError> {
        let l2 = self.mode == Mode::L2;
        let xdp = self.io == Io::Xdp;
        let conntrack = self.conntrack.is_on();
        if self.l2_pods == L2Pods::Xdp && !l2 {
            return Err(RunArgsError::L2PodsWithoutL2);
        }
        if !self.pod_ports.is_empty() && (!xdp || l2) {
            return Err(RunArgsError::PodPortsWithoutXdp);
        }
        if xdp && self.ip_masq && !conntrack {
            return Err(RunArgsError::XdpMasqWithoutConntrack);
        }
        if l2 && (self.ip_masq || self.services.is_some()) {
            return Err(RunArgsError::L2WithMasqOrServices);
        }
        if self.services.is_some() && !conntrack {
            return Err(RunArgsError::ServicesWithoutConntrack);
        }
        if self.etcd_certfile.is_some() != self.etcd_keyfile.is_some() {
            return Err(RunArgsError::HalfClientCert);
        }
        let password = self.etcd_password.is_some() || self.etcd_password_file.is_some();
        if password && self.etcd_username.is_none() {
            return Err(RunArgsError::PasswordWithoutUser);
        }
        if self.workers == Some(0) {
            return Err(RunArgsError::NoWorkers);
        }
        let max = podwire_dataplane::worker::MAX_BATCH;
        if !(1..=max).contains(&self.batch_size) {
            return Err(RunArgsError::BatchSize {
                got: self.batch_size,
                max,
            });
        }
        Ok(())
    }

    /// The file store, the Kubernetes API, or etcd with its connection settings.
    fn store_spec(&self) -> Result<daemon::StoreSpec, RunArgsError> {
        if self.kube_subnet_mgr {
            return Ok(daemon::StoreSpec::Kube(podwire::kube_store::KubeOptions {
                api_url: self.kube_api_url.clone(),
                kubeconfig: self.kubeconfig_file.clone(),
                annotation_prefix: self.kube_annotation_prefix.clone(),
                node_name: self.node_name.clone().ok_or(RunArgsError::NoNodeName)?,
                net_conf: self.net_config_path.clone(),
            }));
        }
        if let Some(spec) = &self.store {
            if file_path(spec).is_none() {
                return Err(RunArgsError::StoreSpec(spec.clone()));
            }
            return Ok(daemon::StoreSpec::File(spec.clone()));
        }
        let password = match &self.etcd_password_file {
            Some(path) => Some(podwire::secret::Secret::from_file(path)?),
            None => self.etcd_password.clone(),
        };
        let endpoints: Vec<String> = self
            .etcd_endpoints
            .split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        endpoints.iter().try_for_each(|e| check_endpoint(e))?;
        Ok(daemon::StoreSpec::Etcd(podwire::etcd::EtcdOptions {
            endpoints,
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password,
            lease_ttl: Duration::from_secs(self.subnet_lease_ttl.max(10)),
            ..Default::default()
        }))
    }

    /// The connection table's size and timeouts.
    pub fn conntrack_config(&self) -> podwire_dataplane::conntrack::Config {
        use podwire_dataplane::conntrack::{tcp::TcpState, Config, Timeouts};
        let mut timeouts = Timeouts::default();
        timeouts.tcp[TcpState::Established as usize] = self.conntrack_tcp_timeout_established;
        timeouts.tcp[TcpState::CloseWait as usize] = self.conntrack_tcp_timeout_close_wait;
        timeouts.udp_unreplied = self.conntrack_udp_timeout;
        timeouts.udp_stream = self.conntrack_udp_timeout_stream;
        Config {
            max_entries: self.conntrack_max.max(1),
            timeouts,
        }
    }
}

/// PATH of `file:PATH` (not empty).
fn file_path(spec: &str) -> Option<&str> {
    spec.strip_prefix("file:").filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_etcd_endpoints_are_checked_before_use() {
        for ok in [
            "http://127.0.0.1:2379",
            "https://etcd.example:2379/",
            "http://[fd00::1]:2379",
            "http://etcd",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("foo://x", "http:// or https://"),
            ("127.0.0.1:2379", "http:// or https://"),
            ("http://", "no host"),
            ("http://:2379", "no host"),
            ("http://etcd:23x9", "port"),
            ("http://[fd00::1:2379", "closing ]"),
        ] {
            let err = check_endpoint(bad).unwrap_err();
            assert!(err.is_usage());
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }
    use crate::{flanneld_args, Cli, Cmd};
    use clap::Parser;

    fn run_args(args: &[&str]) -> RunArgs {
        let args =
            flanneld_args::rewrite(args.iter().map(std::ffi::OsString::from), |_| None).unwrap();
        match Cli::try_parse_from(args).unwrap().command {
            Cmd::Run(a) => *a,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn test_kube_subnet_mgr_selects_the_kubernetes_api() {
        let a = run_args(&[
            "podwire",
            "run",
            "-kube-subnet-mgr",
            "--node-name",
            "n1",
            "--kubeconfig-file",
            "/k",
        ]);
        match a.store_spec().unwrap() {
            daemon::StoreSpec::Kube(o) => {
                assert_eq!(o.node_name, "n1");
                assert_eq!(o.kubeconfig.as_deref(), Some(std::path::Path::new("/k")));
                assert_eq!(o.annotation_prefix, "flannel.alpha.coreos.com");
                assert_eq!(o.net_conf.to_str(), Some("/etc/kube-flannel/net-conf.json"));
            }
            other => panic!("{other:?}"),
        }
        if std::env::var_os("NODE_NAME").is_none() {
            let no_name = run_args(&["podwire", "run", "--kube-subnet-mgr"]);
            assert!(matches!(
                no_name.store_spec(),
                Err(RunArgsError::NoNodeName)
            ));
        }
        // The kube flags need --kube-subnet-mgr; it excludes the file store.
        let cli = |args: &[&str]| Cli::try_parse_from(args.iter().copied()).map(|_| ());
        assert!(cli(&["podwire", "run", "--kube-api-url", "http://k"]).is_err());
        assert!(cli(&["podwire", "run", "--kube-subnet-mgr", "--store", "file:/x"]).is_err());
    }

    #[test]
    fn test_conntrack_flags_set_the_table() {
        use podwire_dataplane::conntrack::tcp::TcpState;
        let defaults = run_args(&["podwire", "run"]).conntrack_config();
        assert_eq!(defaults, podwire_dataplane::conntrack::Config::default());
        let kube_proxy_like = run_args(&[
            "podwire",
            "run",
            "--conntrack-max=262144",
            "--conntrack-tcp-timeout-established=86400",
            "--conntrack-tcp-timeout-close-wait=3600",
            "--conntrack-udp-timeout-stream=180",
        ])
        .conntrack_config();
        assert_eq!(kube_proxy_like.max_entries, 262_144);
        let t = &kube_proxy_like.timeouts;
        assert_eq!(t.tcp[TcpState::Established as usize], 86_400);
        assert_eq!(t.tcp[TcpState::CloseWait as usize], 3_600);
        assert_eq!(t.tcp[TcpState::TimeWait as usize], 120);
        assert_eq!((t.udp_unreplied, t.udp_stream), (30, 180));
        assert!(Cli::try_parse_from(["podwire", "run", "--conntrack-udp-timeout=0"]).is_err());
    }

    #[test]
    fn test_service_node_port_range_flag() {
        use podwire_dataplane::nat::PortRange;
        assert_eq!(
            run_args(&["podwire", "run"]).service_node_port_range,
            PortRange::new(30_000, 32_767).unwrap()
        );
        assert_eq!(
            run_args(&["podwire", "run", "--service-node-port-range", "20000-22767"])
                .service_node_port_range,
            PortRange::new(20_000, 22_767).unwrap()
        );
        for bad in ["32767-30000", "0-100", "1-65536", "30000"] {
            let args = ["podwire", "run", "--service-node-port-range", bad];
            assert!(Cli::try_parse_from(args).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_password_file_conflicts_with_password() {
        let both = [
            "podwire",
            "run",
            "--etcd-password",
            "x",
            "--etcd-password-file",
            "/p",
        ];
        assert!(Cli::try_parse_from(both).is_err());
        let a = run_args(&["podwire", "run", "-etcd-password-file=/etc/podwire/pw"]);
        assert_eq!(
            a.etcd_password_file.as_deref(),
            Some(std::path::Path::new("/etc/podwire/pw"))
        );
    }

    #[test]
    fn test_flanneld_spellings_parse_to_the_same_config() {
        let go = run_args(&[
            "podwire",
            "run",
            "-etcd-endpoints=http://10.0.0.5:2379",
            "-etcd-prefix=/my/net",
            "-iface=eth1",
            "-public-ip",
            "192.168.1.7",
            "-subnet-lease-renew-margin=30",
            "-healthz-port=8080",
            "-ip-masq=true",
            "-iptables-forward-rules=false",
        ]);
        let clap = run_args(&[
            "podwire",
            "run",
            "--etcd-endpoints",
            "http://10.0.0.5:2379",
            "--etcd-prefix",
            "/my/net",
            "--iface",
            "eth1",
            "--public-ip=192.168.1.7",
            "--subnet-lease-renew-margin",
            "30",
            "--healthz-port",
            "8080",
            "--ip-masq",
            "--iptables-forward-rules=0",
        ]);
        for a in [&go, &clap] {
            assert_eq!(a.etcd_endpoints, "http://10.0.0.5:2379");
            assert_eq!(a.etcd_prefix, "/my/net");
            assert_eq!(a.iface, ["eth1"]);
            assert_eq!(a.public_ip, Some(Ipv4Addr::new(192, 168, 1, 7)));
            assert_eq!(a.subnet_lease_renew_margin, 30);
            assert_eq!(a.healthz_port, 8080);
            assert!(a.ip_masq);
            assert!(!a.iptables_forward_rules);
        }
        // On unless turned off, as flanneld's.
        assert!(run_args(&["podwire", "run"]).iptables_forward_rules);
        assert!(run_args(&["podwire", "run", "--iptables-forward-rules"]).iptables_forward_rules);
        // flanneld's limits on the renew margin hold.
        let args = flanneld_args::rewrite(
            ["podwire", "run", "-subnet-lease-renew-margin=1440"]
                .iter()
                .map(std::ffi::OsString::from),
            |_| None,
        )
        .unwrap();
        assert!(Cli::try_parse_from(args).is_err());
    }

    /// `podwire run` with `flags`, through the validation step.
    fn options(flags: &[&str]) -> Result<daemon::RunOptions, RunArgsError> {
        let mut args = vec!["podwire", "run"];
        args.extend_from_slice(flags);
        if !flags.contains(&"--store") {
            args.extend(["--store", "file:/c.json"]);
        }
        run_args(&args).into_options()
    }

    #[test]
    fn test_on_off_and_mode_values_parse_as_users_type_them() {
        let o = options(&[
            "--udp-gso",
            "off",
            "--udp-gro=off",
            "--tun-offload",
            "off",
            "--peer-queues",
            "off",
            "--conntrack",
            "on",
            "--io",
            "xdp",
            "--vxlan-tx",
            "flow-ports",
            "--service-lb",
            "random",
        ])
        .unwrap();
        assert!(!o.udp_gso && !o.udp_gro && !o.tun_offload && !o.worker.peer_queues);
        assert!(o.conntrack && o.io_xdp && !o.vxlan_via_socket);
        assert_eq!(o.service_lb, podwire_dataplane::nat::Algorithm::Random);
        let d = options(&[]).unwrap();
        assert!(d.udp_gso && d.udp_gro && d.tun_offload && d.worker.peer_queues && d.conntrack);
        assert!(!d.io_xdp && d.vxlan_via_socket && d.l2.is_none());
        let l2 = options(&[
            "--mode",
            "l2",
            "--l2-pods",
            "xdp",
            "--fdb-learning-tunnel",
            "off",
        ])
        .unwrap()
        .l2
        .unwrap();
        assert!(l2.pods_xdp && !l2.bridge.tunnel_learning);
        for bad in [["--udp-gso", "yes"], ["--mode", "l4"], ["--io", "dpdk"]] {
            let args = ["podwire", "run", bad[0], bad[1]];
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    /// Each combination the validation step refuses, and what it says.
    #[test]
    fn test_combinations_that_make_no_sense_are_refused() {
        type Refusal = fn(&RunArgsError) -> bool;
        let cases: [(&[&str], Refusal); 12] = [
            (&["--l2-pods", "xdp"], |e| {
                matches!(e, RunArgsError::L2PodsWithoutL2)
            }),
            (&["--pod-ports", "veth1"], |e| {
                matches!(e, RunArgsError::PodPortsWithoutXdp)
            }),
            (
                &["--mode", "l2", "--io", "xdp", "--pod-ports", "veth1"],
                |e| matches!(e, RunArgsError::PodPortsWithoutXdp),
            ),
            (&["--io", "xdp", "--ip-masq", "--conntrack", "off"], |e| {
                matches!(e, RunArgsError::XdpMasqWithoutConntrack)
            }),
            (&["--mode", "l2", "--ip-masq"], |e| {
                matches!(e, RunArgsError::L2WithMasqOrServices)
            }),
            (&["--services", "file:/s.json", "--conntrack", "off"], |e| {
                matches!(e, RunArgsError::ServicesWithoutConntrack)
            }),
            (&["--services", "/s.json"], |e| {
                matches!(e, RunArgsError::ServicesSpec(_))
            }),
            (&["--store", "etcd://x"], |e| {
                matches!(e, RunArgsError::StoreSpec(_))
            }),
            (&["--etcd-certfile", "/c.pem"], |e| {
                matches!(e, RunArgsError::HalfClientCert)
            }),
            (&["--etcd-password", "pw"], |e| {
                matches!(e, RunArgsError::PasswordWithoutUser)
            }),
            (&["--workers", "0"], |e| {
                matches!(e, RunArgsError::NoWorkers)
            }),
            (&["--batch-size", "257"], |e| {
                matches!(e, RunArgsError::BatchSize { got: 257, .. })
            }),
        ];
        for (flags, expected) in cases {
            match options(flags) {
                Err(e) => assert!(expected(&e), "{flags:?}: {e}"),
                Ok(_) => panic!("{flags:?} accepted"),
            }
        }
        // The same flags in combinations that do make sense pass.
        for flags in [
            &["--mode", "l2", "--l2-pods", "xdp"][..],
            &["--io", "xdp", "--pod-ports", "veth1=10.244.1.5"],
            &["--io", "xdp", "--ip-masq"],
            &["--services", "file:/s.json"],
            &["--etcd-certfile", "/c.pem", "--etcd-keyfile", "/k.pem"],
            &["--etcd-username", "u", "--etcd-password", "pw"],
            &["--workers", "1", "--batch-size", "256"],
        ] {
            assert!(options(flags).is_ok(), "{flags:?}");
        }
    }
}
