//! The `podwire-lab` binary: the netns lab, the end-to-end bench and the figures, apart from the
//! `podwire` daemon they run.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use podwire_lab::cluster::bench::BenchMode;
use podwire_lab::cluster::{Backend, KubeProxyMode, LabOptions, Refused, VxlanTx};
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
    /// A whole-system profile (perf record -a -g) while one mode carries one TCP stream: the
    /// share of each thread, the podwire workers' time by where it entered the kernel (TUN
    /// write, UDP send, ...) and their top userspace symbols; writes a run file. Needs root and
    /// Debian's linux-perf.
    Profile(ProfileArgs),
    /// ClusterIP cost as services grow: connect time (p50, p99), update latency (an endpoint
    /// replaced to the first connection it answers) and one established TCP stream's
    /// throughput at each size, for podwire and kube-proxy's iptables and nftables modes, in
    /// one run; writes a run file. Needs root.
    ServicesBench(ServicesBenchArgs),
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
    /// Modes to run, comma-separated (kernel-vxlan is required: it is the reference); the
    /// default is the first five, the others are the default podwire mode without one of its
    /// features or with AF_XDP.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = cluster::bench::MODES)]
    modes: Vec<BenchMode>,
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
struct ServicesBenchArgs {
    /// Numbers of services, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 1000, 10000])]
    sizes: Vec<usize>,
    /// New connections timed per side and size.
    #[arg(long, default_value_t = 300)]
    connections: usize,
    /// Endpoint updates timed per side and size.
    #[arg(long, default_value_t = 10)]
    updates: usize,
    /// The run file: every sample, with the commit, date, command and machine.
    #[arg(long, default_value = "services-bench.json")]
    out: PathBuf,
    /// The podwire daemon binary the nodes run (default: `podwire` beside this executable).
    #[arg(long, value_name = "PATH")]
    podwire: Option<PathBuf>,
    /// Sides to run, comma-separated (all three for a run file the README renders).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = cluster::bench::services_bench::SIDES)]
    sides: Vec<cluster::bench::services_bench::SideName>,
}

#[derive(Args)]
struct ProfileArgs {
    /// The bench mode to profile (its cluster, its daemon flags).
    #[arg(long, value_enum, default_value_t = BenchMode::PodwireVxlan)]
    mode: BenchMode,
    /// Seconds recorded (the stream runs a second longer on either side).
    #[arg(long, default_value_t = 6)]
    seconds: u32,
    /// Workers per podwire node.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The run file; perf's data goes beside it (`.perf.data`).
    #[arg(long, default_value = "profile.json")]
    out: PathBuf,
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
    #[arg(long, value_enum, default_value_t = Backend::Udp)]
    backend: Backend,
    /// With `--backend vxlan`: make every node but the first a kernel VXLAN node, configured
    /// exactly as flanneld's vxlan backend configures one (podwire talks to the kernel).
    #[arg(long, value_enum)]
    peer: Option<Peer>,
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
    /// Cluster store: `file` (one JSON file every node reads), `etcd` (a real etcd the lab
    /// starts on the underlay; nodes take their leases from it, and the lab adds checks of
    /// lease retake, node leave/rejoin and an etcd outage under traffic) or `kube` (nodes run
    /// --kube-subnet-mgr against the lab's Kubernetes API server stand-in: Node podCIDRs and
    /// flanneld's annotations, with checks of the annotations, an API server restart under
    /// traffic and an expired watch).
    #[arg(long, value_enum, default_value_t = Store::File)]
    store: Store,
    /// With `--store etcd`: leases of absent nodes written before the nodes start (the network
    /// becomes 10.0.0.0/8 to hold them), e.g. 1000 or 5000 to time start-up under load.
    #[arg(long, default_value_t = 0)]
    extra_leases: usize,
    /// `podwire run --vxlan-tx` for every podwire node: `socket` or `flow-ports`.
    #[arg(long, value_enum, default_value_t = VxlanTx::Socket)]
    vxlan_tx: VxlanTx,
    /// Add ClusterIP services translated by podwire (3 nodes or more): 300 connections spread
    /// over 3 backends on 2 nodes, UDP, hairpin, a service without endpoints, a backend removed
    /// mid-run, and Kubernetes' e2e service behaviours (terminating endpoints,
    /// internalTrafficPolicy Local, ClientIP affinity, multi-port, a UDP server that moves, an
    /// out-of-window segment).
    #[arg(long)]
    services: bool,
    /// `podwire run --ip-masq` on the podwire nodes: a pod reaches a host outside the cluster
    /// as its node.
    #[arg(long)]
    ip_masq: bool,
    /// With --services and --backend kernel-vxlan: which kube-proxy mode serves node 1's pod,
    /// `iptables` (KUBE-SVC chains) or `nftables` (its `ip kube-proxy` table).
    #[arg(long, value_enum, default_value_t = KubeProxyMode::Iptables)]
    kube_proxy: KubeProxyMode,
    /// Set every node's iptables FORWARD policy to DROP (as Docker does) before the nodes
    /// start: podwire nodes must get past it with their FORWARD accept rules
    /// (`run --iptables-forward-rules`, on by default); kernel nodes get flanneld's.
    #[arg(long)]
    forward_drop: bool,
    /// `podwire run --conntrack` on the podwire nodes.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    conntrack: Switch,
    /// `podwire run --io` on the podwire nodes: `xdp` puts the underlay through AF_XDP
    /// (every node's port then finishes its own checksums, as on a physical wire).
    #[arg(long, value_enum, default_value_t = Via::Tun)]
    io: Via,
    /// How the podwire nodes reach their pod: `tun` (the kernel routes it into the TUN), or
    /// `xdp` (AF_XDP on the pod's veth host end: `run --pod-ports vpod`, with `--io xdp`; in
    /// L2 mode `run --l2-pods xdp`, every pod on a veth pair as a bridge port).
    #[arg(long, value_enum, default_value_t = Via::Tun)]
    pods: Via,
    /// `podwire run --peer-queues` on the podwire nodes (`off` shows what the flooding-peer
    /// check of a 3-node lab looks like without them: it fails).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    peer_queues: Switch,
    /// `l2`: podwire is every node's bridge (needs `--backend vxlan`): pods attached by
    /// `podwire ctl attach`, 3 on node 1 and 2 on node 2, in one L2 domain over VXLAN; ARP,
    /// pings, TCP, the FDB, a pod moved across nodes, and same-node TCP against a Linux bridge.
    #[arg(long, value_enum, default_value_t = Mode::L3)]
    mode: Mode,
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

// The variants below carry plain comments, not doc comments: clap would list those in `--help`
// beside the option's own text, which names every value already.

/// `--peer`: what the nodes but the first are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Peer {
    // Kernel VXLAN nodes, as flanneld's vxlan backend configures them.
    #[value(name = "kernel")]
    Kernel,
}

/// `--store`: where the nodes take their leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Store {
    // One JSON file every node reads.
    #[value(name = "file")]
    File,
    // A real etcd the lab starts on the underlay.
    #[value(name = "etcd")]
    Etcd,
    // The Kubernetes API (`--kube-subnet-mgr`), served by the API server stand-in.
    #[value(name = "kube")]
    Kube,
}

/// A podwire feature on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    #[value(name = "on")]
    On,
    #[value(name = "off")]
    Off,
}

/// `--io`, `--pods`: through the kernel's TUN, or AF_XDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Via {
    #[value(name = "tun")]
    Tun,
    #[value(name = "xdp")]
    Xdp,
}

/// `--mode`: routed, or podwire as every node's bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    #[value(name = "l3")]
    L3,
    #[value(name = "l2")]
    L2,
}

impl LabArgs {
    /// The lab's options, or the first combination of them the lab refuses.
    fn options(self, podwire: PathBuf) -> Result<LabOptions, Refused> {
        let opts = LabOptions {
            podwire,
            nodes: self.nodes,
            backend: self.backend,
            peer_kernel: self.peer == Some(Peer::Kernel),
            direct_routing: self.direct_routing,
            transfer_mb: self.transfer_mb,
            workers: self.workers.max(1),
            ping_count: self.ping_count.max(1),
            udp_count: self.udp_count.max(1),
            json: self.json,
            capture: self.capture,
            keep_logs: self.keep_logs,
            etcd: self.store == Store::Etcd,
            kube: self.store == Store::Kube,
            extra_leases: self.extra_leases,
            vxlan_tx: self.vxlan_tx,
            services: self.services,
            ip_masq: self.ip_masq,
            kube_proxy: self.kube_proxy,
            conntrack: self.conntrack == Switch::On,
            l2: self.mode == Mode::L2,
            udp_gro: true,
            peer_queues: self.peer_queues == Switch::On,
            io_xdp: self.io == Via::Xdp,
            pod_xdp: self.pods == Via::Xdp,
            soak_seconds: self.soak,
            soak_pps: self.soak_pps.max(1),
            forward_drop: self.forward_drop,
        };
        opts.validate()?;
        Ok(opts)
    }
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
        Cmd::Profile(a) => {
            cluster::install_signal_teardown()?;
            cluster::bench::profile::run(cluster::bench::profile::ProfileOptions {
                mode: a.mode,
                seconds: a.seconds,
                workers: a.workers.max(1),
                podwire: daemon_binary::resolve(a.podwire.as_deref())?,
                out: a.out,
            })
        }
        Cmd::ServicesBench(a) => {
            cluster::install_signal_teardown()?;
            cluster::bench::services_bench::run(
                cluster::bench::services_bench::ServicesBenchOptions {
                    sizes: a.sizes,
                    connections: a.connections.max(1),
                    updates: a.updates.max(1),
                    out: a.out,
                    podwire: daemon_binary::resolve(a.podwire.as_deref())?,
                    sides: a.sides,
                },
            )
        }
        Cmd::Figures(a) => figures(a),
        Cmd::Lab(a) => {
            let podwire = daemon_binary::resolve(a.podwire.as_deref())?;
            let opts = a.options(podwire)?;
            cluster::install_signal_teardown()?;
            if !cluster::run(opts)? {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn lab(args: &[&str]) -> Result<LabOptions, Refused> {
        let cli = Cli::try_parse_from(["podwire-lab", "lab"].iter().chain(args)).unwrap();
        let Cmd::Lab(a) = cli.command else {
            panic!("not lab")
        };
        a.options(PathBuf::from("podwire"))
    }

    #[test]
    fn test_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every value the README, the docs, the tests and `./dev` type is taken, and means what
    /// it meant as a string; the defaults are the old ones.
    #[test]
    fn test_lab_takes_every_spelling_users_type() {
        let d = lab(&[]).unwrap();
        assert_eq!((d.backend, d.vxlan_tx), (Backend::Udp, VxlanTx::Socket));
        assert!(!d.peer_kernel && !d.etcd && !d.l2 && !d.io_xdp && !d.pod_xdp);
        assert!(d.conntrack && d.peer_queues && d.udp_gro);
        let o = lab(&[
            "--backend",
            "vxlan",
            "--peer",
            "kernel",
            "--vxlan-tx",
            "flow-ports",
        ])
        .unwrap();
        assert_eq!(
            (o.backend, o.vxlan_tx),
            (Backend::Vxlan, VxlanTx::FlowPorts)
        );
        assert!(o.peer_kernel);
        assert_eq!(
            lab(&["--backend", "kernel-vxlan"]).unwrap().backend,
            Backend::KernelVxlan
        );
        let o = lab(&["--backend", "udp", "--io", "xdp"]).unwrap();
        assert!(o.io_xdp && !o.pod_xdp);
        let o = lab(&["--io", "xdp", "--pods", "xdp"]).unwrap();
        assert!(o.io_xdp && o.pod_xdp);
        let o = lab(&["--io", "tun", "--pods", "tun", "--vxlan-tx", "socket"]).unwrap();
        assert!(!o.io_xdp && !o.pod_xdp);
        let o = lab(&["--conntrack", "off"]).unwrap();
        assert!(!o.conntrack && o.peer_queues);
        let o = lab(&["--peer-queues", "off", "--conntrack", "on"]).unwrap();
        assert!(o.conntrack && !o.peer_queues);
        assert!(lab(&["--peer-queues", "on"]).unwrap().peer_queues);
        assert!(lab(&["--store", "etcd"]).unwrap().etcd);
        assert!(!lab(&["--store", "file"]).unwrap().etcd);
        let kube = lab(&["--store", "kube"]).unwrap();
        assert!(kube.kube && !kube.etcd);
        assert!(lab(&["--mode", "l2", "--backend", "vxlan"]).unwrap().l2);
        assert!(!lab(&["--mode", "l3"]).unwrap().l2);
        for bad in [
            ["--backend", "host-gw"],
            ["--peer", "udp"],
            ["--mode", "l4"],
        ] {
            let args = ["podwire-lab", "lab"].into_iter().chain(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    /// A combination the lab does not run is refused at the arguments, with its rule.
    #[test]
    fn test_lab_refuses_combinations_with_a_typed_reason() {
        assert_eq!(
            lab(&["--peer", "kernel"]).unwrap_err(),
            Refused::PeerKernelWithoutVxlan
        );
        assert_eq!(
            lab(&["--mode", "l2"]).unwrap_err(),
            Refused::L2WithoutPodwireVxlan
        );
        assert_eq!(lab(&["--nodes", "101"]).unwrap_err(), Refused::Nodes);
        assert_eq!(
            lab(&["--nodes", "3", "--services", "--conntrack", "off"]).unwrap_err(),
            Refused::ServicesWithoutConntrack
        );
    }

    #[test]
    fn test_bench_modes_by_name() {
        let modes = |args: &[&str]| {
            let cli = Cli::try_parse_from(["podwire-lab", "bench"].iter().chain(args))?;
            let Cmd::Bench(a) = cli.command else {
                panic!("not bench")
            };
            Ok::<_, clap::Error>(a.modes)
        };
        assert_eq!(modes(&[]).unwrap(), cluster::bench::MODES);
        assert_eq!(
            modes(&["--modes", "kernel-vxlan,podwire-udp-xdp,host-gw"]).unwrap(),
            [
                BenchMode::KernelVxlan,
                BenchMode::PodwireUdpXdp,
                BenchMode::HostGw
            ]
        );
        let readme = "kernel-vxlan,podwire-vxlan,podwire-vxlan-flow-ports,podwire-udp,host-gw,\
                      podwire-vxlan-xdp,podwire-vxlan-xdp-pods,podwire-udp-xdp";
        assert_eq!(modes(&["--modes", readme]).unwrap().len(), 8);
        assert!(modes(&["--modes", "kernel-vxlan,nope"]).is_err());
    }
}
