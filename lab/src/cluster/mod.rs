//! `podwire-lab lab`: a cluster in network namespaces with real traffic between every pair of pods.
//!
//! Topology for N nodes (names carry the lab's pid so labs never collide):
//! ```text
//!   pod netns pwP-pI          host netns pwP-nI                     underlay netns pwP-u
//!   eth0 10.244.I.2/24 ──veth── vpod 10.244.I.1/24                  br0 (bridge)
//!                               flannel0 10.244.I.0/32 (podwire)
//!                               eth0 192.168.99.(10+I)/24 ──veth────── nI
//!   rogue netns pwP-x: eth0 192.168.99.200/24 ──veth── x (a host on the underlay, no node)
//! ```
//! Each host runs `podwire run` against one cluster file. The pod MTU is FLANNEL_MTU from the
//! node's subnet.env, as the flannel CNI plugin sets it. Everything is torn down at the end, on
//! failure, and on Ctrl-C; leftovers of a lab that was killed are removed by the next one.

pub mod bench;
mod checks;
mod ctl_check;
mod etcd_lab;
mod external_policy;
mod fairness;
mod icmp_forge;
mod kube_lab;
mod kube_proxy_nft;
mod l2_lab;
mod lifecycle;
mod netns;
mod nodes;
mod options;
mod sequence;
mod service_behaviours;
mod service_catalogue;
mod services_lab;
mod soak;
mod summary;
mod topology;
mod traffic;

use checks::*;
use ctl_check::*;
use nodes::*;
pub use options::{value_name, Backend, KubeProxyMode, Refused, VxlanTx};
use sequence::*;
use summary::*;
use topology::*;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use podwire::report;
use podwire::subnet_env;
use podwire_dataplane::pipeline::DropReason;
use podwire_dataplane::stats::{Counter, LocalStats};
use podwire_dataplane::wire::MacAddr;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What `podwire-lab lab` is told.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The daemon binary every podwire node runs (`podwire run`) and the checks ask
    /// (`podwire ctl`).
    pub podwire: PathBuf,
    pub nodes: usize,
    pub backend: Backend,
    /// With `--backend vxlan`: nodes 2..N are kernel VXLAN nodes set up as flanneld does.
    pub peer_kernel: bool,
    /// With a VXLAN backend: `DirectRouting: true`, so nodes on one L2 subnet (all of the lab's)
    /// route pod traffic to each other unencapsulated, as flanneld does.
    pub direct_routing: bool,
    pub transfer_mb: u64,
    pub workers: usize,
    pub ping_count: u16,
    pub udp_count: u32,
    pub json: Option<PathBuf>,
    /// Record the underlay's encapsulated traffic to this pcap file (with tshark).
    pub capture: Option<PathBuf>,
    pub keep_logs: bool,
    /// Join through a real etcd the lab starts (flannel's keyspace) instead of a cluster file.
    pub etcd: bool,
    /// Join through the Kubernetes API (`--kube-subnet-mgr`), served by the stand-in.
    pub kube: bool,
    /// With etcd: leases of absent nodes written before the nodes start (the network grows to
    /// 10.0.0.0/8 to hold them), to load the map.
    pub extra_leases: usize,
    /// `podwire run --vxlan-tx` for the podwire nodes.
    pub vxlan_tx: VxlanTx,
    /// ClusterIP services on every podwire node, and the service checks (`services_lab`).
    pub services: bool,
    /// `podwire run --ip-masq` on every podwire node, and the masquerade check.
    pub ip_masq: bool,
    /// With `services` and node 1 a kernel node: kube-proxy's mode there.
    pub kube_proxy: KubeProxyMode,
    /// Connection tracking on the podwire nodes (`--conntrack`).
    pub conntrack: bool,
    /// `--soak SECS`: a fixed-rate UDP stream pod 1 -> pod 2 this long, with the daemons'
    /// memory and descriptors sampled (0: none).
    pub soak_seconds: u64,
    /// Datagrams per second of the soak.
    pub soak_pps: u32,
    /// UDP GRO on the podwire nodes' underlay sockets (`--udp-gro`).
    pub udp_gro: bool,
    /// Per-peer receive queues on the podwire nodes (`--peer-queues`).
    pub peer_queues: bool,
    /// `--io xdp` on the podwire nodes: the underlay through AF_XDP (VXLAN or udp).
    pub io_xdp: bool,
    /// `--pods xdp` (with `--io xdp`): the podwire nodes serve their pod through AF_XDP on
    /// its veth host end (`run --pod-ports vpod`) instead of the TUN.
    pub pod_xdp: bool,
    /// `--mode l2`: podwire is every node's bridge, pods attached as TAP interfaces (`l2_lab`).
    pub l2: bool,
    /// `--forward-drop`: every node's iptables FORWARD policy is DROP, as Docker sets it;
    /// podwire nodes get past it with their FORWARD accept rules, kernel nodes with the ones
    /// flanneld adds.
    pub forward_drop: bool,
}

const UNDERLAY_NET: &str = "192.168.99";
const ROGUE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 200);
const TCP_PORT: u16 = 5201;
const UDP_PORT: u16 = 5202;
const ROGUE_PORT: u16 = 5203;
const MASQ_PORT: u16 = 5204;
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The device a stopped flanneld leaves on a vxlan node, planted on node 1 before it starts.
const FLANNELD_DEVICE: &str = "flannel.1";
/// Routes planted on node 1 before it starts, with DirectRouting: (net, via, protocol).
const STALE_ROUTES: [(&str, &str, &str); 2] = [
    (
        "10.244.77.0/24",
        "192.168.99.77",
        podwire::netdev::ROUTE_PROTO,
    ),
    ("10.244.78.0/24", "192.168.99.78", "static"),
];

impl LabOptions {
    fn vxlan(&self) -> bool {
        self.backend != Backend::Udp
    }
    /// True if node `i` runs the kernel's VXLAN instead of podwire.
    fn is_kernel_node(&self, i: usize) -> bool {
        self.backend == Backend::KernelVxlan || (self.peer_kernel && i > 1)
    }
    fn podwire_nodes(&self) -> Vec<usize> {
        (1..=self.nodes)
            .filter(|&i| !self.is_kernel_node(i))
            .collect()
    }
    /// The pod MTU on a 1500-byte underlay: FLANNEL_MTU of the backend.
    fn pod_mtu(&self) -> usize {
        if self.vxlan() {
            1450
        } else {
            1472
        }
    }
    /// The UDP port nodes receive encapsulated traffic on.
    fn data_port(&self) -> u16 {
        if self.vxlan() {
            podwire::config::VXLAN_DEFAULT_PORT
        } else {
            podwire::config::UDP_DEFAULT_PORT
        }
    }
}

/// The pod network: 10.244.0.0/16, or 10.0.0.0/8 when extra leases need the room.
fn network(opts: &LabOptions) -> &'static str {
    if opts.extra_leases > 0 {
        "10.0.0.0/8"
    } else {
        "10.244.0.0/16"
    }
}

fn underlay_ip(i: usize) -> Ipv4Addr {
    format!("{UNDERLAY_NET}.{}", 10 + i)
        .parse()
        .expect("valid address")
}
fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8, 2)
}
fn gateway_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8, 1)
}

/// Where the lab lives: its namespace prefix and its directory. Immutable, so traffic code reads
/// it without holding the lock that teardown needs.
#[derive(Debug, Clone)]
struct Names {
    prefix: String,
    dir: PathBuf,
}

impl Names {
    fn ns(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }
}

/// Everything the lab created, so it can all be removed.
struct Resources {
    names: Names,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    /// The lab's etcd (`--store etcd`), stopped before the namespaces go.
    etcd: Option<crate::etcd_server::EtcdServer>,
    /// The lab's API server stand-in (`--store kube`), stopped before the namespaces go.
    kube: Option<podwire_apiserver_standin::Handle>,
    keep_dir: bool,
}

impl Resources {
    fn ns(&self, suffix: &str) -> String {
        self.names.ns(suffix)
    }

    /// SIGTERM to every child, SIGKILL to those still there after 5 s. Returns what went wrong
    /// with the daemons (`nI`): each must exit with status 0 on the lab's SIGTERM.
    fn stop(dir: &Path, children: &mut [(String, Child)]) -> Vec<String> {
        // One that already ended did so before the lab asked it to.
        let mut failures = Vec::new();
        let ended: Vec<bool> = children
            .iter_mut()
            .map(|(name, child)| match child.try_wait() {
                Ok(None) => false,
                Ok(Some(status)) => {
                    failures.extend(daemon_failure(
                        dir,
                        name,
                        status,
                        "before the lab stopped it",
                        false,
                    ));
                    true
                }
                Err(_) => true,
            })
            .collect();
        for ((_, child), ended) in children.iter().zip(&ended) {
            if !ended {
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for ((name, child), ended) in children.iter_mut().zip(ended) {
            if ended {
                continue;
            }
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                if let Some(node) = daemon_node(name) {
                    failures.push(format!(
                        "podwire on node {node} did not stop within 5 s of the lab's SIGTERM (SIGKILLed); its log ends:\n{}",
                        log_tail(dir, node)
                    ));
                }
                let _ = child.wait();
                continue;
            }
            if let Ok(status) = child.wait() {
                failures.extend(daemon_failure(
                    dir,
                    name,
                    status,
                    "on the lab's SIGTERM",
                    true,
                ));
            }
        }
        failures
    }

    /// Stops every child; returns the daemons that did not exit with status 0 (see `stop`).
    fn stop_children(&mut self) -> Vec<String> {
        let failures = Self::stop(&self.names.dir, &mut self.children);
        self.children.clear();
        failures
    }

    /// Stops the child called `name` (e.g. "n3"); returns what went wrong (see `stop`).
    fn stop_child(&mut self, name: &str) -> Vec<String> {
        let (mut stopping, keep): (Vec<_>, Vec<_>) =
            self.children.drain(..).partition(|(n, _)| n == name);
        self.children = keep;
        Self::stop(&self.names.dir, &mut stopping)
    }

    /// The daemons that have ended although the lab stopped none of them (a daemon the lab
    /// stops or kills on purpose leaves `children` first): each is removed from `children` and
    /// described, with its exit status or signal and the tail of its log.
    fn reap_dead(&mut self) -> Vec<String> {
        let dir = self.names.dir.clone();
        let mut dead = Vec::new();
        self.children
            .retain_mut(|(name, child)| match child.try_wait() {
                Ok(Some(status)) if daemon_node(name).is_some() => {
                    dead.extend(daemon_failure(
                        &dir,
                        name,
                        status,
                        "while the lab ran",
                        false,
                    ));
                    false
                }
                _ => true,
            });
        dead
    }

    fn teardown(&mut self) {
        let _ = self.stop_children();
        self.etcd = None;
        self.kube = None;
        for ns in self.namespaces.drain(..).rev() {
            for pid in netns::pids(&ns) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            netns::delete(&ns);
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.names.dir);
        }
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        self.teardown();
    }
}

static ACTIVE: OnceLock<Mutex<Option<Arc<Mutex<Resources>>>>> = OnceLock::new();

/// Tears down the running lab on SIGINT/SIGTERM, then exits.
pub fn install_signal_teardown() -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("podwire-lab lab: signal {sig}, tearing down");
            if let Some(res) = ACTIVE
                .get_or_init(Default::default)
                .lock()
                .ok()
                .and_then(|mut a| a.take())
            {
                if let Ok(mut r) = res.lock() {
                    r.teardown();
                }
            }
            std::process::exit(130);
        }
    });
    Ok(())
}

/// Removes namespaces left by labs whose process is gone (killed with SIGKILL, say).
fn remove_stale_labs() {
    for ns in netns::list() {
        let Some(pid) = ns
            .strip_prefix("pw")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            for p in netns::pids(&ns) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            netns::delete(&ns);
        }
    }
}

/// One named check and its outcome.
#[derive(Debug, Clone)]
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

#[derive(Debug, Clone, Default)]
struct PairResult {
    from: usize,
    to: usize,
    ping: traffic::PingStats,
    big_ping: traffic::PingStats,
    tcp_bytes: u64,
    tcp_mbps: f64,
    tcp_sha_ok: bool,
    tcp_error: Option<String>,
    udp_sent: u32,
    udp_received: u32,
}

/// Pings, a TCP transfer and UDP between pods `from` and `to`; `alive` is asked between the
/// pings and the transfer (a dead daemon would hold the transfer up to its timeout).
fn run_pair(
    res: &Names,
    opts: &LabOptions,
    from: usize,
    to: usize,
    alive: impl Fn() -> Result<()>,
) -> Result<PairResult> {
    let (src_ns, dst_ns) = (res.ns(&format!("p{from}")), res.ns(&format!("p{to}")));
    let mut r = PairResult {
        from,
        to,
        ..Default::default()
    };
    let count = opts.ping_count;
    r.ping = netns::run_in(&src_ns, move || {
        traffic::ping(pod_ip(to), count, 64, Duration::from_secs(1))
    })
    .unwrap_or_default();
    let mtu = opts.pod_mtu();
    r.big_ping = netns::run_in(&src_ns, move || {
        traffic::ping(pod_ip(to), 3, mtu, Duration::from_secs(1))
    })
    .unwrap_or_default();
    alive()?;

    let bytes = opts.transfer_mb * 1_000_000;
    let listener = netns::run_in(&dst_ns, move || {
        Ok(TcpListener::bind((pod_ip(to), TCP_PORT))?)
    });
    let tcp = listener.and_then(|l| {
        let sink = netns::spawn_in(&dst_ns, move || traffic::tcp_sink(l, STEP_TIMEOUT));
        let seed = (from * 100 + to) as u64;
        let sent = netns::run_in(&src_ns, move || {
            traffic::tcp_source(
                SocketAddrV4::new(pod_ip(to), TCP_PORT),
                bytes,
                seed,
                STEP_TIMEOUT,
            )
        });
        let got = netns::join(sink);
        let (sent, got) = (sent?, got?);
        traffic::same_digest(&sent, &got.sha256)?;
        Ok(got)
    });
    match tcp {
        Ok(got) => {
            r.tcp_bytes = got.bytes;
            r.tcp_sha_ok = got.bytes == bytes;
            r.tcp_mbps = got.bytes as f64 * 8.0 / got.elapsed.as_secs_f64().max(1e-9) / 1e6;
        }
        Err(e) => r.tcp_error = Some(format!("{e:#}")),
    }

    let udp_count = opts.udp_count;
    let echo = netns::run_in(&dst_ns, move || {
        Ok(UdpSocket::bind((pod_ip(to), UDP_PORT))?)
    })
    .map(|s| {
        netns::spawn_in(&dst_ns, move || {
            traffic::udp_echo(s, Duration::from_millis(1500))
        })
    });
    if let Ok(echo) = echo {
        r.udp_sent = udp_count;
        r.udp_received = netns::run_in(&src_ns, move || {
            traffic::udp_ping(
                SocketAddrV4::new(pod_ip(to), UDP_PORT),
                udp_count,
                1000,
                Duration::from_millis(500),
            )
        })
        .unwrap_or(0);
        let _ = netns::join(echo);
    }
    Ok(r)
}

/// Runs the lab; returns whether every check passed.
pub fn run(opts: LabOptions) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("podwire-lab lab needs root (network namespaces, TUN devices)");
    }
    opts.validate()?;
    if opts.l2 {
        return with_lab(&opts, |outcome| !matches!(outcome, Ok(true)), l2_lab::run);
    }
    with_lab(&opts, |outcome| !matches!(outcome, Ok(true)), run_inner)
}

/// Runs `body` with a fresh lab registered for teardown (also on Ctrl-C), then tears it down.
/// When `failed` says so, the nodes' log tails are printed first.
fn with_lab<T>(
    opts: &LabOptions,
    failed: impl FnOnce(&Result<T>) -> bool,
    body: impl FnOnce(&Arc<Mutex<Resources>>, &LabOptions, &Path) -> Result<T>,
) -> Result<T> {
    remove_stale_labs();
    let exe = opts.podwire.clone();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("podwire-lab-{pid}"));
    std::fs::create_dir_all(&dir)?;
    let res = Arc::new(Mutex::new(Resources {
        names: Names {
            prefix: format!("pw{pid}"),
            dir: dir.clone(),
        },
        namespaces: Vec::new(),
        children: Vec::new(),
        etcd: None,
        kube: None,
        keep_dir: opts.keep_logs,
    }));
    *ACTIVE
        .get_or_init(Default::default)
        .lock()
        .expect("lab registry") = Some(Arc::clone(&res));
    let mut outcome = body(&res, opts, &exe);
    let mut guard = res.lock().expect("lab resources");
    // The daemons still running are stopped as the lab stops them: each must exit with 0.
    let stop_failures = guard.stop_children();
    if !stop_failures.is_empty() {
        let why = stop_failures.join("\n");
        outcome = match outcome {
            Ok(_) => Err(anyhow::anyhow!("{why}")),
            Err(e) => Err(e.context(why)),
        };
    }
    if failed(&outcome) {
        for i in 1..=opts.nodes {
            eprintln!("--- node {i} log (tail) ---\n{}", log_tail(&dir, i));
        }
    }
    guard.teardown();
    ACTIVE
        .get_or_init(Default::default)
        .lock()
        .expect("lab registry")
        .take();
    outcome
}

/// Builds the cluster `opts` describes and starts every node; returns where it lives.
fn set_up(
    res: &Arc<Mutex<Resources>>,
    opts: &LabOptions,
    exe: &Path,
    figures: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<Names> {
    let mut r = res.lock().expect("lab resources");
    build_topology(&mut r, opts).context("building the netns cluster")?;
    if let Some(path) = &opts.capture {
        start_capture(&mut r, path)?;
    }
    let etcd_started = Instant::now();
    if opts.etcd {
        let f = etcd_lab::start(&mut r, opts).context("starting the lab's etcd")?;
        figures.insert("extra_leases".into(), json!(opts.extra_leases));
        figures.insert("etcd_ready_ms".into(), json!(ms(f.etcd_ready)));
        figures.insert("preload_ms".into(), json!(ms(f.preload)));
    }
    if opts.kube {
        kube_lab::start(&mut r, opts).context("starting the lab's Kubernetes API")?;
    }
    start_kernel_vxlan(&mut r, opts).context("configuring kernel VXLAN like flanneld")?;
    if opts.services {
        services_lab::prepare(
            &r.names,
            &services_source(res, opts),
            r.etcd.as_ref(),
            r.kube.as_ref(),
        )
        .context("setting up the lab's services")?;
    }
    if !opts.podwire_nodes().is_empty() {
        let nodes_started = Instant::now();
        start_nodes(&mut r, opts, exe)?;
        if opts.etcd {
            figures.insert("nodes_ready_ms".into(), json!(ms(nodes_started.elapsed())));
            figures.insert(
                "etcd_start_to_all_ready_ms".into(),
                json!(ms(etcd_started.elapsed())),
            );
        }
    }
    Ok(r.names.clone())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Lease PUTs timed to the map being live in the workers, per run.
const LATENCY_SAMPLES: usize = 60;

#[cfg(test)]
mod tests {
    use super::*;

    fn xdp_node(rx: u64, tx: u64, via_kernel: u64) -> LocalStats {
        let mut s = LocalStats::default();
        s.add(Counter::RxUnderlay, rx);
        s.add(Counter::XdpRxFrames, rx);
        s.add(Counter::TxUnderlay, tx);
        s.add(Counter::XdpTxFrames, tx - via_kernel);
        s.add(Counter::XdpViaKernel, via_kernel);
        s
    }

    #[test]
    fn test_af_xdp_sends_through_the_kernel_are_bounded() {
        let ok = |s: LocalStats| underlay_through_xdp_check(&[(1, Some(s))], None).ok;
        assert!(ok(xdp_node(10_000, 10_000, 0)));
        // A few, to next hops not resolved yet.
        assert!(ok(xdp_node(10_000, 10_000, 100)));
        // More than 1 in 100 sends fell back to the kernel.
        assert!(!ok(xdp_node(10_000, 10_000, 101)));
        assert!(!ok(xdp_node(10_000, 10_000, 5_000)));
        // A node that sent little: a few pass, more do not.
        assert!(ok(xdp_node(50, 50, VIA_KERNEL_FEW)));
        assert!(!ok(xdp_node(50, 50, VIA_KERNEL_FEW + 1)));
        // Bounded after the pairs: the start's fallbacks do not count, later ones do.
        let after = |s: LocalStats, at: (u64, u64)| {
            underlay_through_xdp_check(&[(1, Some(s))], Some(&vec![(1, Some(at))])).ok
        };
        assert!(after(xdp_node(80_000, 80_000, 1_500), (40_000, 1_500)));
        assert!(!after(xdp_node(80_000, 80_000, 1_500), (40_000, 1_000)));
        // A node restarted since: its counters are the new daemon's, taken whole.
        assert!(after(xdp_node(10_000, 10_000, 5), (40_000, 1_000)));
        assert!(!after(xdp_node(10_000, 10_000, 500), (40_000, 1_000)));
    }

    #[test]
    fn test_exit_statuses_the_lab_did_not_ask_for_are_failures() {
        use std::os::unix::process::ExitStatusExt;
        let dir = Path::new("/nonexistent");
        let status = |raw: i32| std::process::ExitStatus::from_raw(raw);
        // Status 0 on the lab's SIGTERM: fine; unasked, or for another child: no.
        assert_eq!(
            daemon_failure(dir, "n2", status(0), "on SIGTERM", true),
            None
        );
        assert!(daemon_failure(dir, "n2", status(0), "while the lab ran", false).is_some());
        assert_eq!(daemon_failure(dir, "capture", status(9), "x", true), None);
        let code = daemon_failure(dir, "n3", status(3 << 8), "on the lab's SIGTERM", true);
        assert!(code
            .unwrap()
            .starts_with("podwire on node 3 exited with status 3 on the lab's SIGTERM"));
        let killed = daemon_failure(dir, "n2", status(9), "while the lab ran", true).unwrap();
        assert!(
            killed.contains("node 2 was killed by signal 9 (SIGKILL)"),
            "{killed}"
        );
    }
}
