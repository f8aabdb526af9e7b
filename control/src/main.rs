//! The `podwire` binary.

mod daemon;
mod flanneld_args;
mod lab;
mod run_args;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use podwire_dataplane::pipeline::Direction;
use run_args::{LogFormat, RunArgs};
use std::net::Ipv4Addr;
use std::path::PathBuf;

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
        #[arg(long, value_enum)]
        proto: Option<podwire::ctl::protocol::Proto>,
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
        #[arg(value_enum)]
        kind: podwire::ctl::protocol::FaultKind,
        /// The worker to fail.
        #[arg(long, default_value_t = 0)]
        worker: usize,
    },
    /// Capture what a port receives into a pcap file (Wireshark/tshark): `tun` (the pods'
    /// packets) or `underlay` (the encapsulated datagrams, with their outer headers).
    Capture {
        #[arg(long, value_enum)]
        port: podwire::ctl::protocol::CapturePort,
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

#[derive(Clone, Copy, ValueEnum)]
enum Side {
    /// Raw inner IPv4 packets, as the TUN device sees them.
    Tun,
    /// Outer IPv4/UDP datagrams, as the underlay sees them.
    Underlay,
    /// Both interleaved: datagrams to our port came from the underlay, the rest from the TUN.
    Both,
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
    #[arg(long = "out")]
    output: PathBuf,
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
        Cmd::Run(a) => run(*a),
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

/// `podwire run`: the flags checked and turned into the daemon's options, then the daemon.
fn run(a: RunArgs) -> Result<()> {
    init_logging(a.log_format == LogFormat::Json);
    if a.exit_with_parent {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
            .context("prctl(PR_SET_PDEATHSIG)")?;
    }
    daemon::run(a.into_options()?)
}

fn ctl(a: CtlArgs) -> Result<()> {
    use podwire::ctl::protocol::{AttachRequest, CaptureRequest, ConntrackFilter};
    use podwire::ctl::{Request, Response};
    let req = match a.what {
        CtlWhat::Subnets => Request::Subnets,
        CtlWhat::Conntrack {
            addr,
            port,
            state,
            proto,
        } => Request::Conntrack(ConntrackFilter {
            addr,
            port,
            state,
            proto,
        }),
        CtlWhat::Services => Request::Services,
        CtlWhat::Stats => Request::Stats,
        CtlWhat::Fdb => Request::Fdb,
        CtlWhat::Attach {
            netns,
            ip,
            mac,
            ifname,
            gateway,
        } => Request::Attach(AttachRequest {
            netns,
            ip,
            mac,
            ifname,
            gateway,
        }),
        CtlWhat::Detach { netns } => Request::Detach { netns },
        CtlWhat::Fault { kind, worker } => Request::Fault { kind, worker },
        CtlWhat::Capture {
            port,
            count,
            timeout,
            write,
        } => {
            // The daemon sends the pcap; this process (its user, its umask) writes the file.
            let req = CaptureRequest {
                port,
                count,
                timeout_ms: timeout.saturating_mul(1000),
            };
            let answer = podwire::ctl::capture(&a.socket, &req, &write)?;
            print_answer(&Response::Captured(answer), a.json)?;
            return Ok(());
        }
    };
    print_answer(&podwire::ctl::call(&a.socket, &req)?, a.json)
}

/// A ctl answer as JSON (`--json`) or as the familiar tools print it.
fn print_answer(answer: &podwire::ctl::Response, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(answer)?);
    } else {
        print!("{}", podwire::ctl::render(answer));
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
    let from = match a.from {
        Side::Tun => Some(Direction::FromTun),
        Side::Underlay => Some(Direction::FromUnderlay),
        Side::Both => None,
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
    Ok(())
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
