//! The `podwire` binary.

mod daemon;
mod flanneld_args;
mod lab;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use podwire_dataplane::pipeline::Direction;
use podwire_dataplane::worker::WorkerConfig;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// podwire: a userspace pod-network dataplane, a drop-in for flanneld's udp backend.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node daemon: join the cluster from the store and forward pod traffic.
    Run(Box<RunArgs>),
    /// Run a capture through the pipeline offline (no devices, no root) and write what would leave.
    Replay(ReplayArgs),
    /// Build a cluster in network namespaces, run podwire on every node, send real traffic
    /// between every pair of pods, print the figures, and tear everything down. Needs root.
    Lab(LabArgs),
    /// End-to-end benchmark: the same workloads through kernel VXLAN (the reference), podwire
    /// vxlan, podwire udp and host-gw routing, side by side in one run; prints a table of
    /// ratios to kernel VXLAN and writes JSON and an SVG chart. Needs root.
    Bench(BenchArgs),
    /// Render the figures of README.md and docs/ from the committed run files they name
    /// (`<!-- fig docs/bench/FILE#KEY -->...<!-- /fig -->`), or check that they match.
    Figures(FiguresArgs),
    /// Ask the running daemon (over its ctl socket): the subnet map, the connection table
    /// (like `conntrack -L`), services (like `ipvsadm -Ln`), worker counters and rates.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct CtlArgs {
    /// The daemon's ctl socket (`podwire run --ctl-socket`).
    #[arg(long, default_value = podwire::ctl::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the answer as JSON, for scripts.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    what: CtlWhat,
}

#[derive(Subcommand)]
enum CtlWhat {
    /// The live subnet map and our lease's expiry.
    Subnets,
    /// Tracked connections, like `conntrack -L`.
    Conntrack {
        /// Only connections with this address in either direction.
        #[arg(long)]
        addr: Option<Ipv4Addr>,
        /// Only connections with this port in either direction.
        #[arg(long)]
        port: Option<u16>,
        /// Only TCP connections in this state (ESTABLISHED, TIME_WAIT, ...).
        #[arg(long)]
        state: Option<String>,
        /// tcp, udp or icmp.
        #[arg(long)]
        proto: Option<String>,
    },
    /// Services and their endpoints with active and inactive connections, like `ipvsadm -Ln`.
    Services,
    /// Per-worker counters and drops by reason, with rates since the previous `stats`.
    Stats,
    /// L2 mode: the bridge's forwarding database, like `bridge fdb show` (the pods' static
    /// entries, learned stations with their idle time, remote ones with their VTEP, and the
    /// all-zero default entries of head-end replication).
    Fdb,
    /// L2 mode: give a pod an interface on the bridge: a TAP device moved into its network
    /// namespace and configured there (address, MTU, default route via the node's gateway).
    Attach {
        /// The pod's network namespace (as `ip netns` names it).
        #[arg(long)]
        netns: String,
        /// The pod's address with the prefix that is on-link (the cluster network's, for one
        /// L2 domain across nodes), e.g. 10.244.1.10/16.
        #[arg(long)]
        ip: String,
        /// The interface's MAC (default: random).
        #[arg(long)]
        mac: Option<String>,
        /// The interface's name in the pod.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Default gateway (default: the node's gateway, the host port's address).
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
    },
    /// L2 mode: remove a pod's interface (the TAP device) and its FDB entries.
    Detach {
        #[arg(long)]
        netns: String,
    },
    /// Test a supervisor: make worker N panic (the daemon then exits non-zero). Needs a daemon
    /// started with --fault-injection.
    Fault {
        #[arg(value_parser = ["worker-panic"])]
        kind: String,
        /// The worker to fail.
        #[arg(long, default_value_t = 0)]
        worker: usize,
    },
    /// Capture what a port receives into a pcap file (Wireshark/tshark): `tun` (the pods'
    /// packets) or `underlay` (the encapsulated datagrams, with their outer headers).
    Capture {
        #[arg(long, value_parser = ["tun", "underlay"])]
        port: String,
        /// Packets to capture (at most 100000).
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Stop after this many seconds even if fewer packets came.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// The pcap file to write (by this command, as the user running it: the daemon
        /// sends the packets over the ctl socket). Created mode 0600 less the umask.
        #[arg(short = 'w', long = "write")]
        write: PathBuf,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Rounds over every mode; each figure is the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Megabytes per single-stream TCP run (the 4-stream run sends a quarter on each stream).
    #[arg(long, default_value_t = 1000)]
    tcp_mb: u64,
    /// Seconds of the unpaced 64-byte UDP trial (the generator's full rate) per run.
    #[arg(long, default_value_t = 2.0)]
    udp_seconds: f64,
    /// Seconds of each paced trial of the no-drop-rate search (up to 8 per run).
    #[arg(long, default_value_t = 1.0)]
    trial_seconds: f64,
    /// Workers per podwire node.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Modes to run, comma-separated (kernel-vxlan is required: it is the reference); also
    /// `podwire-vxlan-no-conntrack`, `podwire-vxlan-no-gro`, `podwire-vxlan-shared-queue`,
    /// `podwire-vxlan-xdp`, `podwire-vxlan-xdp-pods` and `podwire-udp-xdp`: the default mode
    /// without connection tracking, without UDP GRO, without per-peer queues, with the
    /// underlay through AF_XDP, with the pods through AF_XDP too, and flannel's udp
    /// encapsulation with the underlay through AF_XDP.
    #[arg(long, value_delimiter = ',', default_values_t = lab::bench::MODES.map(String::from))]
    modes: Vec<String>,
    /// The run file: every sample and trial, with the commit, date, command and machine.
    #[arg(long, default_value = "bench-results.json")]
    out: PathBuf,
    /// The chart.
    #[arg(long, default_value = "bench-results.svg")]
    svg: PathBuf,
}

#[derive(Args)]
struct FiguresArgs {
    /// Only check: exit 1 naming every document whose figures differ from its run files.
    #[arg(long)]
    check: bool,
    /// The repository's root.
    #[arg(long, default_value = ".")]
    root: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Embedded cluster store instead of etcd: `file:PATH`, a read-only JSON file mirroring
    /// flannel's etcd keyspace ({"config": net-conf.json, "subnets": {"10.244.1.0-24": lease,
    /// ...}}), re-read on change. Every node's lease must be in it.
    #[arg(long)]
    store: Option<String>,
    /// etcd endpoints, comma-separated (flannel's schema, v3 API).
    #[arg(long, env = "FLANNELD_ETCD_ENDPOINTS", default_value = podwire::etcd::DEFAULT_ENDPOINTS)]
    etcd_endpoints: String,
    /// etcd key prefix of the network config and leases.
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = podwire::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// CA certificate (PEM) to verify etcd's TLS certificate (use https:// endpoints).
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd; used together with --etcd-keyfile.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd; used together with --etcd-certfile.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    etcd_keyfile: Option<PathBuf>,
    /// etcd user name (with --etcd-password or --etcd-password-file).
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", hide_env_values = true)]
    etcd_username: Option<String>,
    /// etcd password (its value from the environment is never shown; prefer
    /// --etcd-password-file: a command line is visible to every user in ps).
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<podwire::secret::Secret>,
    /// Read the etcd password from this file (its content, less a trailing newline).
    #[arg(long, value_name = "PATH", conflicts_with = "etcd_password")]
    etcd_password_file: Option<PathBuf>,
    /// Minutes before expiry at which the lease is renewed (1-1439), as flanneld.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=1439))]
    subnet_lease_renew_margin: u64,
    /// TTL in seconds of the leases podwire writes (flanneld: 86400). For tests of renewal.
    #[arg(long, default_value_t = 86400, hide = true)]
    subnet_lease_ttl: u64,
    /// Address for the /healthz, /readyz and /metrics endpoint.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    healthz_ip: std::net::IpAddr,
    /// Port for /healthz, /readyz and /metrics (0: disabled), as flanneld.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    healthz_port: u16,
    /// Underlay interface, by name or IPv4 address (default: the default route's interface).
    #[arg(long, env = "FLANNELD_IFACE")]
    iface: Option<String>,
    /// IP this node is reached at (default: the interface's address). Written in our lease.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    public_ip: Option<Ipv4Addr>,
    /// Where to write flannel's subnet.env for the CNI plugin.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    subnet_file: PathBuf,
    /// Poll-mode workers, one TUN queue and one underlay socket each (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Name of the TUN device (default: flannel0 for udp, flannel.<VNI> for vxlan, as flanneld).
    #[arg(long)]
    tun_name: Option<String>,
    /// Masquerade pod traffic leaving the cluster network, as flanneld's -ip-masq (its rules,
    /// in an nftables table podwire installs and removes on exit); FLANNEL_IPMASQ in subnet.env.
    /// With `--io xdp`, podwire masquerades the pods' TCP and UDP itself (to the node's
    /// address, source ports 61000-65535, steered into the TUN by policy routing); the
    /// kernel's rules keep the rest (ICMP).
    #[arg(long, env = "FLANNELD_IP_MASQ")]
    ip_masq: bool,
    /// Packets per batch (1-256).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Microseconds a worker keeps polling idle ports before it sleeps in epoll.
    #[arg(long, default_value_t = 50)]
    busy_poll_us: u64,
    /// Do not pin workers to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// TUN offload: `on` reads TCP superframes (TSO) from the TUN device and segments them in
    /// user space, one read per up to 64 KiB; `off` reads one packet per read. `on` falls back
    /// to `off` if the kernel refuses.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    tun_offload: String,
    /// UDP GSO (udp backend): `on` sends a run of same-size datagrams to one peer as one
    /// UDP_SEGMENT buffer; falls back to `off` by itself if the kernel refuses.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    udp_gso: String,
    /// UDP GRO on the underlay socket: `on` receives a sender's run of datagrams (its GSO
    /// buffer, or what the kernel coalesced) in one piece and splits it in user space, so the
    /// socket layer runs once per run. Falls back to plain receives if the kernel refuses it.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    udp_gro: String,
    /// A receive queue per peer node: `on` gives each peer (sending from the backend's port, as
    /// flannel udp and podwire's VXLAN do) a connected socket of its own, read round robin, so
    /// a peer flooding this node overflows only its own queue (counted as peer_queue_full)
    /// and cannot starve the others. Routed (L3) mode.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    peer_queues: String,
    /// How the underlay is reached: `tun` through the kernel's UDP sockets, or `xdp` through
    /// AF_XDP sockets that podwire's XDP program on --iface feeds (VXLAN or udp; worker i owns
    /// queue i; the program passes everything that is not podwire's to the kernel and is
    /// detached on exit). Pods reach podwire through the TUN device unless --pod-ports (L2
    /// mode: the bridge's underlay; pods through AF_XDP with --l2-pods xdp). podwire then also
    /// owns the node's address for the services' NodePorts: TCP and UDP to a NodePort are
    /// sent to the service's backend, on any node, masqueraded so the answer comes back
    /// through this node (needs --conntrack on).
    #[arg(long, default_value = "tun", value_parser = ["tun", "xdp"])]
    io: String,
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
    #[arg(long, value_delimiter = ',')]
    pod_ports: Vec<String>,
    /// How VXLAN leaves: `socket` through UDP sockets with UDP GSO, each inner flow on one of
    /// `--vxlan-tx-sockets` source ports by hash (runs of a flow's segments in one send), or
    /// `flow-ports` through a raw socket with a source port per inner flow as the kernel picks
    /// them (the most spread over ECMP paths, but one send per datagram).
    #[arg(long, default_value = "socket", value_parser = ["socket", "flow-ports"])]
    vxlan_tx: String,
    /// With `--vxlan-tx socket`: UDP sockets per worker, each on its own ephemeral source
    /// port, that inner flows are spread over by hash (0: every flow from port 8472).
    #[arg(long, default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(0..=podwire_dataplane::worker::MAX_VXLAN_TX_SOCKETS as i64))]
    vxlan_tx_sockets: u16,
    /// Underlay socket buffer size in bytes (SO_RCVBUFFORCE/SO_SNDBUFFORCE).
    #[arg(long, default_value_t = 4 << 20)]
    socket_buffer: usize,
    /// Write worker counters and drops by reason here as JSON, every second and at exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Connection tracking of every forwarded packet (netfilter's states and timeouts);
    /// services need it.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    conntrack: String,
    /// Most tracked connections; when full, unassured ones are evicted first.
    #[arg(long, default_value_t = 131_072)]
    conntrack_max: usize,
    /// Seconds an idle ESTABLISHED TCP connection is kept (netfilter: 432000; kube-proxy sets
    /// 86400 with its flag of the same name).
    #[arg(long, default_value_t = 432_000, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_tcp_timeout_established: u32,
    /// Seconds a TCP connection in CLOSE_WAIT is kept (netfilter: 60; kube-proxy: 3600).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_tcp_timeout_close_wait: u32,
    /// Seconds an unanswered UDP flow is kept (netfilter: 30).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_udp_timeout: u32,
    /// Seconds an answered UDP flow (a stream) is kept (netfilter: 120).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_udp_timeout_stream: u32,
    /// Services to translate (ClusterIP DNAT, kube-proxy's job): `file:PATH`, a JSON file
    /// {"services": [{"name", "clusterIP", "protocol", "port", "endpoints": [{"ip", "port"}],
    /// "sessionAffinity", "nodePort"}]}, re-read on change. The service range is routed into
    /// podwire's device.
    #[arg(long)]
    services: Option<String>,
    /// The cluster's service range (kube-apiserver's --service-cluster-ip-range).
    #[arg(long, default_value = podwire_dataplane::nat::DEFAULT_SERVICE_CIDR)]
    service_cidr: podwire_dataplane::route::Ipv4Net,
    /// Where NodePorts may be, `A-B` (kube-apiserver's flag of the same name and default): a
    /// NodePort outside it, or on one of podwire's own ports (the backend's UDP port, the
    /// healthz port, the masquerade ports 61000-65535), is refused and its service kept as
    /// ClusterIP only.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: podwire_dataplane::nat::PortRange,
    /// How a service picks an endpoint for a new connection: `maglev` (consistent hashing,
    /// the same choice on every node) or `random`.
    #[arg(long, default_value = "maglev", value_parser = ["maglev", "random"])]
    service_lb: String,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Unix socket `podwire ctl` talks to (mode 0600); empty: none.
    #[arg(long, default_value = podwire::ctl::DEFAULT_SOCKET)]
    ctl_socket: String,
    /// Accept `podwire ctl fault` (make a worker panic), to test that a supervisor restarts a
    /// daemon whose worker died. For test clusters only.
    #[arg(long)]
    fault_injection: bool,
    /// `l3` routes pod traffic through a TUN device (flannel's model); `l2` makes podwire the
    /// node's bridge (in place of cni0), with pods attached as TAP interfaces by `podwire ctl
    /// attach`, and one L2 domain across nodes over VXLAN (needs the vxlan backend).
    #[arg(long, default_value = "l3", value_parser = ["l3", "l2"])]
    mode: String,
    /// L2 mode: seconds a learned MAC is kept after it was last seen (Linux bridge: 300).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    fdb_ageing: u32,
    /// L2 mode: most learned MACs; when full, new ones are not learned (and are flooded to).
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    fdb_max: u32,
    /// L2 mode: learn remote MACs from decapsulated frames (`off`: only the nodes' host ports,
    /// from the subnet map, are known, like a kernel VXLAN device with `nolearning`).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    fdb_learning_tunnel: String,
    /// L2 mode: name of the host's bridge port, a TAP device with the node's gateway address.
    #[arg(long, default_value = "podwire0")]
    bridge_port: String,
    /// L2 mode: what `podwire ctl attach` gives a pod. `tap`: a TAP device that podwire reads
    /// and writes. `xdp`: a veth pair whose host end podwire's XDP program hands every frame
    /// to an AF_XDP socket (the pod's end is set to finish its checksums, as AF_XDP has no
    /// offload); the bridge then runs without offload.
    #[arg(long, default_value = "tap", value_parser = ["tap", "xdp"])]
    l2_pods: String,
    /// Exit when the parent process dies (used by `podwire lab`).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Side {
    /// Raw inner IPv4 packets, as the TUN device sees them.
    Tun,
    /// Outer IPv4/UDP datagrams, as the underlay sees them.
    Underlay,
    /// Both interleaved: datagrams to our port came from the underlay, the rest from the TUN.
    Both,
    /// L2 mode (with --bridge-port): Ethernet frames from bridge port --in-port.
    Port,
}

/// `MAC` or `MAC,host`: a bridge port of an L2 replay.
fn parse_bridge_port(s: &str) -> Result<podwire_dataplane::replay::BridgePort, String> {
    let (mac, host) = match s.split_once(',') {
        Some((mac, "host")) => (mac, true),
        Some((_, other)) => return Err(format!("{other}: want MAC or MAC,host")),
        None => (s, false),
    };
    let mac = mac.parse().map_err(|e| format!("{mac}: {e}"))?;
    Ok(podwire_dataplane::replay::BridgePort { mac, host })
}

#[derive(Args)]
struct ReplayArgs {
    /// Cluster store (`file:PATH`).
    #[arg(long)]
    store: String,
    /// The node to be: its lease is the one with this PublicIP.
    #[arg(long)]
    public_ip: Ipv4Addr,
    /// Where the input was captured.
    #[arg(long, value_enum)]
    from: Side,
    /// Input capture (pcap, link type RAW or Ethernet).
    #[arg(long = "in")]
    input: PathBuf,
    /// Output capture (pcap, link type RAW): what would go to the underlay or into the TUN.
    /// In L2 mode a directory: `underlay.pcap` and `port<N>.pcap` (Ethernet) are written there.
    #[arg(long = "out")]
    output: PathBuf,
    /// L2 mode: a port of the bridge (`MAC` or `MAC,host`), its station a static entry; ports
    /// get ids 1, 2, ... in order. The VTEPs and peers' entries come from the store.
    #[arg(long = "bridge-port", value_parser = parse_bridge_port)]
    bridge_ports: Vec<podwire_dataplane::replay::BridgePort>,
    /// L2 mode with `--from port`: the port the frames came in by.
    #[arg(long, default_value_t = 1)]
    in_port: u16,
    /// Replay statefully with connection tracking and these services (`file:PATH`, the format
    /// of `podwire run --services`), timed by the records' capture times.
    #[arg(long)]
    services: Option<String>,
    /// With --services: the cluster's service range.
    #[arg(long, default_value = podwire_dataplane::nat::DEFAULT_SERVICE_CIDR)]
    service_cidr: podwire_dataplane::route::Ipv4Net,
}

#[derive(Args)]
struct LabArgs {
    /// Number of nodes (2 to 100).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Backend the cluster runs: `udp` or `vxlan` (podwire), or `kernel-vxlan` for the baseline: no podwire,
    /// every node configured with the kernel's VXLAN device exactly as flanneld's vxlan backend does.
    #[arg(long, default_value = "udp")]
    backend: String,
    /// With `--backend vxlan`: make every node but the first a kernel VXLAN node, configured
    /// exactly as flanneld's vxlan backend configures one (podwire talks to the kernel).
    #[arg(long, value_parser = ["kernel"])]
    peer: Option<String>,
    /// With a vxlan backend: `DirectRouting: true` (every lab node shares one L2 subnet, so pod
    /// traffic is routed unencapsulated, as flanneld does).
    #[arg(long)]
    direct_routing: bool,
    /// Megabytes per TCP transfer (one transfer per ordered pair of pods).
    #[arg(long, default_value_t = 50)]
    transfer_mb: u64,
    /// Workers per podwire node.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Echo requests per pair.
    #[arg(long, default_value_t = 5)]
    ping_count: u16,
    /// UDP request/response exchanges per pair.
    #[arg(long, default_value_t = 200)]
    udp_count: u32,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Record the underlay's encapsulated traffic (UDP 8285/8472 on the bridge) to this pcap file
    /// with tshark, e.g. to see podwire and the kernel talk in Wireshark.
    #[arg(long)]
    capture: Option<PathBuf>,
    /// Keep the lab's directory (cluster file, logs, stats) under /tmp.
    #[arg(long)]
    keep_logs: bool,
    /// Cluster store: `file` (one JSON file every node reads) or `etcd` (a real etcd the lab
    /// starts on the underlay; nodes take their leases from it, and the lab adds checks of
    /// lease retake, node leave/rejoin and an etcd outage under traffic).
    #[arg(long, default_value = "file", value_parser = ["file", "etcd"])]
    store: String,
    /// With `--store etcd`: leases of absent nodes written before the nodes start (the network
    /// becomes 10.0.0.0/8 to hold them), e.g. 1000 or 5000 to time start-up under load.
    #[arg(long, default_value_t = 0)]
    extra_leases: usize,
    /// `podwire run --vxlan-tx` for every podwire node: `socket` or `flow-ports`.
    #[arg(long, default_value = "socket", value_parser = ["socket", "flow-ports"])]
    vxlan_tx: String,
    /// Add ClusterIP services translated by podwire (3 nodes or more): 300 connections spread
    /// over 3 backends on 2 nodes, UDP, hairpin, a service without endpoints, a backend removed
    /// mid-run.
    #[arg(long)]
    services: bool,
    /// `podwire run --ip-masq` on the podwire nodes: a pod reaches a host outside the cluster
    /// as its node.
    #[arg(long)]
    ip_masq: bool,
    /// `podwire run --conntrack` on the podwire nodes.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    conntrack: String,
    /// `podwire run --io` on the podwire nodes: `xdp` puts the underlay through AF_XDP
    /// (every node's port then finishes its own checksums, as on a physical wire).
    #[arg(long, default_value = "tun", value_parser = ["tun", "xdp"])]
    io: String,
    /// How the podwire nodes reach their pod: `tun` (the kernel routes it into the TUN), or
    /// `xdp` (AF_XDP on the pod's veth host end: `run --pod-ports vpod`, with `--io xdp`; in
    /// L2 mode `run --l2-pods xdp`, every pod on a veth pair as a bridge port).
    #[arg(long, default_value = "tun", value_parser = ["tun", "xdp"])]
    pods: String,
    /// `podwire run --peer-queues` on the podwire nodes (`off` shows what the flooding-peer
    /// check of a 3-node lab looks like without them: it fails).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    peer_queues: String,
    /// `l2`: podwire is every node's bridge (needs `--backend vxlan`): pods attached by
    /// `podwire ctl attach`, 3 on node 1 and 2 on node 2, in one L2 domain over VXLAN; ARP,
    /// pings, TCP, the FDB, a pod moved across nodes, and same-node TCP against a Linux bridge.
    #[arg(long, default_value = "l3", value_parser = ["l3", "l2"])]
    mode: String,
    /// Soak: after the pairs, a fixed-rate UDP stream from pod 1 to pod 2 for this many
    /// seconds, checked for loss, duplicates and reordering while the daemons' RSS and open
    /// descriptors are sampled (0: no soak).
    #[arg(long, default_value_t = 0)]
    soak: u64,
    /// Datagrams per second (512 bytes each) of the soak.
    #[arg(long, default_value_t = 5000)]
    soak_pps: u32,
}

fn init_logging(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        // One JSON object per line, fields flattened: for log shippers.
        fmt.json().flatten_event(true).init();
    } else {
        fmt.init();
    }
    // A panic (a worker's, say) goes to the log like everything else, so a JSON log stays JSON
    // and the supervisor's log shows which thread died and where.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(thread = thread.name().unwrap_or("?"), "panicked: {info}");
    }));
}

fn main() -> Result<()> {
    let args = match flanneld_args::rewrite(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(args);
    match cli.command {
        Cmd::Run(a) => {
            init_logging(a.log_format == "json");
            let ct_config = conntrack_config(&a);
            if a.l2_pods == "xdp" && a.mode != "l2" {
                anyhow::bail!("--l2-pods is an L2 mode option (--mode l2); routed pods on AF_XDP: --pod-ports");
            }
            if a.exit_with_parent {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .context("prctl(PR_SET_PDEATHSIG)")?;
            }
            let workers = a.workers.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let store = match a.store {
                Some(spec) => daemon::StoreSpec::File(spec),
                None => daemon::StoreSpec::Etcd(podwire::etcd::EtcdOptions {
                    endpoints: a
                        .etcd_endpoints
                        .split(',')
                        .map(|e| e.trim().to_string())
                        .filter(|e| !e.is_empty())
                        .collect(),
                    prefix: a.etcd_prefix,
                    ca_file: a.etcd_cafile,
                    cert_file: a.etcd_certfile,
                    key_file: a.etcd_keyfile,
                    username: a.etcd_username,
                    password: match &a.etcd_password_file {
                        Some(path) => Some(podwire::secret::Secret::from_file(path)?),
                        None => a.etcd_password,
                    },
                    lease_ttl: Duration::from_secs(a.subnet_lease_ttl.max(10)),
                    ..Default::default()
                }),
            };
            daemon::run(daemon::RunOptions {
                store,
                iface: a.iface,
                public_ip: a.public_ip,
                subnet_file: a.subnet_file,
                workers,
                tun_name: a.tun_name,
                ip_masq: a.ip_masq,
                worker: WorkerConfig {
                    batch_size: a.batch_size.clamp(1, podwire_dataplane::worker::MAX_BATCH),
                    busy_poll: Duration::from_micros(a.busy_poll_us),
                    pin: !a.no_pin,
                    peer_queues: a.peer_queues == "on",
                    ..WorkerConfig::default()
                },
                socket_buffer: a.socket_buffer,
                tun_offload: a.tun_offload == "on",
                udp_gso: a.udp_gso == "on",
                udp_gro: a.udp_gro == "on",
                vxlan_via_socket: a.vxlan_tx == "socket" && a.io != "xdp",
                io_xdp: a.io == "xdp",
                pod_ports: a.pod_ports.clone(),
                vxlan_tx_sockets: usize::from(a.vxlan_tx_sockets),
                renew_margin: Duration::from_secs(a.subnet_lease_renew_margin * 60),
                healthz: (a.healthz_port != 0)
                    .then(|| std::net::SocketAddr::new(a.healthz_ip, a.healthz_port)),
                stats_file: a.stats_file,
                conntrack: a.conntrack == "on",
                conntrack_config: ct_config,
                services_file: match a.services.as_deref() {
                    None => None,
                    Some(s) => Some(PathBuf::from(
                        s.strip_prefix("file:")
                            .with_context(|| format!("--services {s}: expected file:PATH"))?,
                    )),
                },
                service_cidr: a.service_cidr,
                node_port_range: a.service_node_port_range,
                ctl_socket: (!a.ctl_socket.is_empty()).then(|| PathBuf::from(&a.ctl_socket)),
                fault_injection: a.fault_injection,
                l2: (a.mode == "l2").then(|| daemon::L2Options {
                    bridge: podwire_dataplane::bridge::Config {
                        ageing_ms: u64::from(a.fdb_ageing) * 1000,
                        max_learned: a.fdb_max as usize,
                        tunnel_learning: a.fdb_learning_tunnel == "on",
                        ..Default::default()
                    },
                    host_port: a.bridge_port.clone(),
                    pods_xdp: a.l2_pods == "xdp",
                }),
                service_lb: if a.service_lb == "random" {
                    podwire_dataplane::nat::Algorithm::Random
                } else {
                    podwire_dataplane::nat::Algorithm::Maglev
                },
            })
        }
        Cmd::Replay(a) => replay(a),
        Cmd::Ctl(a) => ctl(a),
        Cmd::Bench(a) => {
            lab::install_signal_teardown()?;
            lab::bench::run(lab::bench::BenchOptions {
                rounds: a.rounds.max(1),
                tcp_mb: a.tcp_mb.max(4),
                udp_seconds: a.udp_seconds.clamp(0.2, 60.0),
                trial_seconds: a.trial_seconds.clamp(0.2, 60.0),
                workers: a.workers.max(1),
                modes: a.modes,
                out: a.out,
                svg: a.svg,
            })
        }
        Cmd::Figures(a) => figures(a),
        Cmd::Lab(a) => {
            lab::install_signal_teardown()?;
            let ok = lab::run(lab::LabOptions {
                nodes: a.nodes,
                backend: a.backend,
                peer_kernel: a.peer.is_some(),
                direct_routing: a.direct_routing,
                transfer_mb: a.transfer_mb,
                workers: a.workers.max(1),
                ping_count: a.ping_count.max(1),
                udp_count: a.udp_count.max(1),
                json: a.json,
                capture: a.capture,
                keep_logs: a.keep_logs,
                etcd: a.store == "etcd",
                extra_leases: a.extra_leases,
                vxlan_tx: a.vxlan_tx,
                services: a.services,
                ip_masq: a.ip_masq,
                conntrack: a.conntrack == "on",
                l2: a.mode == "l2",
                udp_gro: true,
                peer_queues: a.peer_queues == "on",
                io_xdp: a.io == "xdp",
                pod_xdp: a.pods == "xdp",
                soak_seconds: a.soak,
                soak_pps: a.soak_pps.max(1),
            })?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// The connection table's size and timeouts from `podwire run`'s flags.
fn conntrack_config(a: &RunArgs) -> podwire_dataplane::conntrack::Config {
    use podwire_dataplane::conntrack::{tcp::TcpState, Config, Timeouts};
    let mut timeouts = Timeouts::default();
    timeouts.tcp[TcpState::Established as usize] = a.conntrack_tcp_timeout_established;
    timeouts.tcp[TcpState::CloseWait as usize] = a.conntrack_tcp_timeout_close_wait;
    timeouts.udp_unreplied = a.conntrack_udp_timeout;
    timeouts.udp_stream = a.conntrack_udp_timeout_stream;
    Config {
        max_entries: a.conntrack_max.max(1),
        timeouts,
    }
}

fn ctl(a: CtlArgs) -> Result<()> {
    let (cmd, req) = match a.what {
        CtlWhat::Subnets => ("subnets", serde_json::json!({"cmd": "subnets"})),
        CtlWhat::Conntrack {
            addr,
            port,
            state,
            proto,
        } => (
            "conntrack",
            serde_json::json!({"cmd": "conntrack", "addr": addr.map(|a| a.to_string()),
                               "port": port, "state": state, "proto": proto}),
        ),
        CtlWhat::Services => ("services", serde_json::json!({"cmd": "services"})),
        CtlWhat::Stats => ("stats", serde_json::json!({"cmd": "stats"})),
        CtlWhat::Fdb => ("fdb", serde_json::json!({"cmd": "fdb"})),
        CtlWhat::Attach {
            netns,
            ip,
            mac,
            ifname,
            gateway,
        } => (
            "attach",
            serde_json::json!({"cmd": "attach", "netns": netns, "ip": ip, "mac": mac,
                               "ifname": ifname, "gateway": gateway.map(|g| g.to_string())}),
        ),
        CtlWhat::Detach { netns } => (
            "detach",
            serde_json::json!({"cmd": "detach", "netns": netns}),
        ),
        CtlWhat::Fault { kind, worker } => (
            "fault",
            serde_json::json!({"cmd": "fault", "kind": kind, "worker": worker}),
        ),
        CtlWhat::Capture {
            port,
            count,
            timeout,
            write,
        } => {
            // The daemon sends the pcap; this process (its user, its umask) writes the file.
            let req = serde_json::json!({"cmd": "capture", "port": port, "count": count,
                                         "timeout_ms": timeout.saturating_mul(1000)});
            let answer = podwire::ctl::capture_to_file(&a.socket, &req, &write)?;
            if a.json {
                println!("{answer:#}");
            } else {
                print!("{}", podwire::ctl::render("capture", &answer));
            }
            return Ok(());
        }
    };
    let answer = podwire::ctl::request(&a.socket, &req)?;
    if a.json {
        println!("{answer:#}");
    } else {
        print!("{}", podwire::ctl::render(cmd, &answer));
    }
    Ok(())
}

fn replay(a: ReplayArgs) -> Result<()> {
    let view = podwire::store::FileStore::new(
        a.store
            .strip_prefix("file:")
            .context("replay reads a file store: --store file:PATH")?,
    )
    .load()?;
    let mut tables = podwire::tables::build(&view, a.public_ip, None)?;
    if !a.bridge_ports.is_empty() {
        return replay_bridged(&a, &tables);
    }
    let from = match a.from {
        Side::Tun => Some(Direction::FromTun),
        Side::Underlay => Some(Direction::FromUnderlay),
        Side::Both => None,
        Side::Port => {
            anyhow::bail!("--from port is L2 mode: name the bridge's ports (--bridge-port)")
        }
    };
    let flows = match &a.services {
        None => None,
        Some(s) => {
            let path = s.strip_prefix("file:").context("--services file:PATH")?;
            let parsed = podwire::services::parse_file(&std::fs::read_to_string(path)?, path)?;
            // A replay is a test: a service left out is an error, not a warning.
            if let Some(e) = parsed.rejected.into_iter().next() {
                return Err(e.into());
            }
            let specs = parsed.specs;
            let options = podwire_dataplane::nat::ServiceOptions::new(a.service_cidr);
            tables.services =
                std::sync::Arc::new(podwire_dataplane::nat::Services::build(options, specs)?);
            Some(podwire_dataplane::pipeline::Flows::new(Default::default()))
        }
    };
    let report =
        podwire_dataplane::replay::replay_with(&tables, flows.as_ref(), from, &a.input, &a.output)?;
    print_replay(&a, &tables, &report);
    Ok(())
}

/// `podwire replay` in L2 mode (`--bridge-port`): the bridge's decisions.
fn replay_bridged(a: &ReplayArgs, tables: &podwire_dataplane::pipeline::Tables) -> Result<()> {
    use podwire_dataplane::pipeline::BridgeIngress;
    let from = match a.from {
        Side::Port => BridgeIngress::Port(podwire_dataplane::bridge::PortId(a.in_port)),
        Side::Underlay => BridgeIngress::Underlay,
        Side::Tun | Side::Both => {
            anyhow::bail!("an L2 replay reads frames from a port or datagrams from the underlay")
        }
    };
    if a.services.is_some() {
        anyhow::bail!("--services is routed mode's: an L2 replay has no connection tracking");
    }
    std::fs::create_dir_all(&a.output)?;
    let report = podwire_dataplane::replay::replay_bridged(
        tables,
        &a.bridge_ports,
        from,
        &a.input,
        &a.output,
    )?;
    print_replay(a, tables, &report);
    Ok(())
}

fn print_replay(
    a: &ReplayArgs,
    tables: &podwire_dataplane::pipeline::Tables,
    report: &podwire_dataplane::replay::ReplayReport,
) {
    println!("records read:    {}", report.records);
    if report.skipped > 0 {
        println!(
            "not for us:      {} (not IPv4/UDP to {}:{})",
            report.skipped, a.public_ip, tables.peer_port
        );
    }
    println!("records written: {}", report.written);
    let drops = report.drops();
    if drops.is_empty() {
        println!("drops:           none");
    } else {
        for (r, n) in drops {
            println!("drop {r:<18} {n}");
        }
    }
}

/// `podwire figures`: rewrites (or checks) every figure of README.md and docs/.
fn figures(a: FiguresArgs) -> Result<()> {
    let mut stale = Vec::new();
    for (path, now, want) in podwire::figures::render_all(&a.root)? {
        if now == want {
            continue;
        }
        if a.check {
            stale.push(path.display().to_string());
        } else {
            std::fs::write(&path, want).with_context(|| format!("writing {}", path.display()))?;
            println!("rendered {}", path.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "figures differ from their run files in {}: run `podwire figures`",
            stale.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let args = flanneld_args::rewrite(args.iter().map(std::ffi::OsString::from)).unwrap();
        match Cli::try_parse_from(args).unwrap().command {
            Cmd::Run(a) => *a,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn test_conntrack_flags_set_the_table() {
        use podwire_dataplane::conntrack::tcp::TcpState;
        let defaults = conntrack_config(&run_args(&["podwire", "run"]));
        assert_eq!(defaults, podwire_dataplane::conntrack::Config::default());
        let kube_proxy_like = conntrack_config(&run_args(&[
            "podwire",
            "run",
            "--conntrack-max=262144",
            "--conntrack-tcp-timeout-established=86400",
            "--conntrack-tcp-timeout-close-wait=3600",
            "--conntrack-udp-timeout-stream=180",
        ]));
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
        ]);
        for a in [&go, &clap] {
            assert_eq!(a.etcd_endpoints, "http://10.0.0.5:2379");
            assert_eq!(a.etcd_prefix, "/my/net");
            assert_eq!(a.iface.as_deref(), Some("eth1"));
            assert_eq!(a.public_ip, Some(Ipv4Addr::new(192, 168, 1, 7)));
            assert_eq!(a.subnet_lease_renew_margin, 30);
            assert_eq!(a.healthz_port, 8080);
            assert!(a.ip_masq);
        }
        // flanneld's limits on the renew margin hold.
        let args = flanneld_args::rewrite(
            ["podwire", "run", "-subnet-lease-renew-margin=1440"]
                .iter()
                .map(std::ffi::OsString::from),
        )
        .unwrap();
        assert!(Cli::try_parse_from(args).is_err());
    }
}
