//! The `podwire-lab` binary: the netns lab, the end-to-end bench and the figures, apart from the
//! `podwire` daemon they run.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use podwire_lab::{cluster, daemon_binary};
use std::path::PathBuf;

/// podwire's lab: clusters in network namespaces running the podwire daemon, the end-to-end
/// bench, and the documents' figures.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a cluster in network namespaces, run podwire on every node, send real traffic
    /// between every pair of pods, print the figures, and tear everything down. Needs root.
    Lab(Box<LabArgs>),
    /// End-to-end benchmark: the same workloads through kernel VXLAN (the reference), podwire
    /// vxlan, podwire udp and host-gw routing, side by side in one run; prints a table of
    /// ratios to kernel VXLAN and writes JSON and an SVG chart. Needs root.
    Bench(BenchArgs),
    /// Render the figures of README.md and docs/ from the committed run files they name
    /// (`<!-- fig docs/bench/FILE#KEY -->...<!-- /fig -->`), or check that they match.
    Figures(FiguresArgs),
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
    #[arg(long, value_delimiter = ',', default_values_t = cluster::bench::MODES.map(String::from))]
    modes: Vec<String>,
    /// The run file: every sample and trial, with the commit, date, command and machine.
    #[arg(long, default_value = "bench-results.json")]
    out: PathBuf,
    /// The chart.
    #[arg(long, default_value = "bench-results.svg")]
    svg: PathBuf,
    /// The podwire daemon binary the nodes run (default: `podwire` beside this executable).
    #[arg(long, value_name = "PATH")]
    podwire: Option<PathBuf>,
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
    /// The podwire daemon binary the nodes run (default: `podwire` beside this executable).
    #[arg(long, value_name = "PATH")]
    podwire: Option<PathBuf>,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Bench(a) => {
            cluster::install_signal_teardown()?;
            cluster::bench::run(cluster::bench::BenchOptions {
                rounds: a.rounds.max(1),
                tcp_mb: a.tcp_mb.max(4),
                udp_seconds: a.udp_seconds.clamp(0.2, 60.0),
                trial_seconds: a.trial_seconds.clamp(0.2, 60.0),
                workers: a.workers.max(1),
                modes: a.modes,
                out: a.out,
                svg: a.svg,
                podwire: daemon_binary::resolve(a.podwire.as_deref())?,
            })
        }
        Cmd::Figures(a) => figures(a),
        Cmd::Lab(a) => {
            cluster::install_signal_teardown()?;
            let ok = cluster::run(cluster::LabOptions {
                podwire: daemon_binary::resolve(a.podwire.as_deref())?,
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

/// `podwire-lab figures`: rewrites (or checks) every figure of README.md and docs/.
fn figures(a: FiguresArgs) -> Result<()> {
    let mut stale = Vec::new();
    for (path, now, want) in podwire_lab::figures::render_all(&a.root)? {
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
            "figures differ from their run files in {}: run `podwire-lab figures`",
            stale.join(", ")
        );
    }
    Ok(())
}
