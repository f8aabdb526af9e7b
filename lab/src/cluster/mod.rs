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
mod etcd_lab;
mod fairness;
mod icmp_forge;
mod l2_lab;
mod lifecycle;
mod netns;
mod services_lab;
mod soak;
mod traffic;

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
    pub backend: String,
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
    /// With etcd: leases of absent nodes written before the nodes start (the network grows to
    /// 10.0.0.0/8 to hold them), to load the map.
    pub extra_leases: usize,
    /// `podwire run --vxlan-tx` for the podwire nodes (`flow-ports` or `socket`).
    pub vxlan_tx: String,
    /// ClusterIP services on every podwire node, and the service checks (`services_lab`).
    pub services: bool,
    /// `podwire run --ip-masq` on every podwire node, and the masquerade check.
    pub ip_masq: bool,
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
}

const UNDERLAY_NET: &str = "192.168.99";
/// `--backend` value for the baseline: no podwire, the kernel's VXLAN configured as flanneld does.
pub const KERNEL_VXLAN: &str = "kernel-vxlan";
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
        self.backend != "udp"
    }
    /// True if node `i` runs the kernel's VXLAN instead of podwire.
    fn is_kernel_node(&self, i: usize) -> bool {
        self.backend == KERNEL_VXLAN || (self.peer_kernel && i > 1)
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

fn build_topology(res: &mut Resources, opts: &LabOptions) -> Result<()> {
    let u = res.ns("u");
    let mut names = vec![u.clone()];
    for i in 1..=opts.nodes {
        names.push(res.ns(&format!("n{i}")));
        if !opts.l2 {
            names.push(res.ns(&format!("p{i}")));
        }
    }
    names.push(res.ns("x"));
    for name in names {
        netns::ip(&["netns", "add", &name])?;
        res.namespaces.push(name.clone());
        netns::ip_in(&name, &["link", "set", "lo", "up"])?;
    }
    netns::ip_in(&u, &["link", "add", "br0", "type", "bridge"])?;
    netns::ip_in(&u, &["link", "set", "br0", "up"])?;
    if opts.etcd {
        netns::ip_in(
            &u,
            &[
                "addr",
                "add",
                &format!("{}/24", etcd_lab::ETCD_IP),
                "dev",
                "br0",
            ],
        )?;
    }
    let attach = |port: &str, host_ns: &str, ip: Ipv4Addr| -> Result<()> {
        netns::ip_in(
            &u,
            &[
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host_ns,
            ],
        )?;
        netns::ip_in(&u, &["link", "set", port, "master", "br0", "up"])?;
        netns::ip_in(
            host_ns,
            &["addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        netns::ip_in(host_ns, &["link", "set", "eth0", "up"])
    };
    for i in 1..=opts.nodes {
        attach(&format!("n{i}"), &res.ns(&format!("n{i}")), underlay_ip(i))?;
        if opts.io_xdp {
            // AF_XDP sees frames as they are on the wire, with no skb to say a checksum was
            // left to offload: make every node's port finish its checksums, as a physical
            // wire carries them (veth leaves them partial otherwise).
            netns::exec_in(
                &res.ns(&format!("n{i}")),
                &["ethtool", "-K", "eth0", "tx", "off"],
            )?;
        }
    }
    if opts.vxlan() && !opts.l2 && !opts.is_kernel_node(1) {
        // Node 1 was a flanneld vxlan node: its flannel.1 is still there, up, holding the name
        // and port 8472. podwire must take its place.
        let n1 = res.ns("n1");
        netns::ip_in(
            &n1,
            &[
                "link",
                "add",
                FLANNELD_DEVICE,
                "type",
                "vxlan",
                "id",
                "1",
                "dstport",
                "8472",
                "dev",
                "eth0",
            ],
        )?;
        netns::ip_in(&n1, &["link", "set", FLANNELD_DEVICE, "up"])?;
    }
    if opts.io_xdp && !opts.is_kernel_node(1) {
        // What a podwire killed on a kernel before 5.9 leaves: its program attached through
        // netlink, which outlives the process. Node 1's podwire must take it off.
        let object = res.names.dir.join("podwire_xdp.o");
        std::fs::write(&object, podwire_dataplane::port::xdp::object())?;
        let path = object.display().to_string();
        netns::ip_in(
            &res.ns("n1"),
            &[
                "link",
                "set",
                "dev",
                "eth0",
                "xdpgeneric",
                "obj",
                &path,
                "sec",
                "xdp",
            ],
        )
        .context("attaching a stale XDP program to node 1 (ip link ... xdpgeneric obj)")?;
    }
    if opts.direct_routing && !opts.is_kernel_node(1) {
        // What a SIGKILLed podwire leaves when the peer's lease vanishes before the restart,
        // and somebody else's route beside it: the first must go, the second stay.
        let n1 = res.ns("n1");
        for (net, via, proto) in STALE_ROUTES {
            netns::ip_in(
                &n1,
                &[
                    "route", "add", net, "via", via, "dev", "eth0", "proto", proto,
                ],
            )?;
        }
    }
    attach("x", &res.ns("x"), ROGUE_IP)?;
    if opts.io_xdp {
        // It is the outside client of node 1's NodePorts: its frames reach AF_XDP whole too.
        netns::exec_in(&res.ns("x"), &["ethtool", "-K", "eth0", "tx", "off"])?;
    }
    // In L2 mode the pods are made by `l2_lab`, attached by podwire itself.
    for i in (1..=opts.nodes).filter(|_| !opts.l2) {
        let (host, pod) = (res.ns(&format!("n{i}")), res.ns(&format!("p{i}")));
        netns::ip_in(
            &host,
            &[
                "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", &pod,
            ],
        )?;
        netns::ip_in(
            &host,
            &[
                "addr",
                "add",
                &format!("{}/24", gateway_ip(i)),
                "dev",
                "vpod",
            ],
        )?;
        netns::ip_in(&host, &["link", "set", "vpod", "up"])?;
        netns::ip_in(
            &pod,
            &["addr", "add", &format!("{}/24", pod_ip(i)), "dev", "eth0"],
        )?;
        netns::ip_in(&pod, &["link", "set", "eth0", "up"])?;
        if opts.pod_xdp && !opts.is_kernel_node(i) {
            // AF_XDP on vpod sees the pod's frames as sent: with full checksums (no skb to say
            // one was left to offload), and with GRO, which native XDP on veth wants of the
            // sender for its frames to be redirected.
            netns::exec_in(&pod, &["ethtool", "-K", "eth0", "tx", "off", "gro", "on"])?;
        }
        netns::ip_in(
            &pod,
            &["route", "add", "default", "via", &gateway_ip(i).to_string()],
        )?;
        netns::exec_in(&host, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    }
    Ok(())
}

fn cluster_file(opts: &LabOptions) -> serde_json::Value {
    let subnets: serde_json::Map<String, serde_json::Value> = (1..=opts.nodes)
        .map(|i| {
            let mut attrs = podwire::lease::LeaseAttrs::udp(underlay_ip(i));
            if opts.vxlan() {
                attrs.backend_type = Some("vxlan".into());
                attrs.backend_data = Some(json!({"VNI": 1, "VtepMAC": vtep_mac(i).to_string()}));
            }
            (
                format!("10.244.{i}.0-24"),
                serde_json::to_value(attrs).expect("lease serialises"),
            )
        })
        .collect();
    json!({
        "config": {"Network": network(opts), "SubnetLen": 24,
                   "Backend": if opts.vxlan() {
                       json!({"Type": "vxlan", "DirectRouting": opts.direct_routing})
                   } else {
                       json!({"Type": "udp"})
                   }},
        "subnets": subnets,
    })
}

/// Starts `podwire run` on node `i` (file store or the lab's etcd).
fn spawn_node(res: &mut Resources, opts: &LabOptions, exe: &Path, i: usize) -> Result<()> {
    let dir = res.names.dir.clone();
    let node_dir = dir.join(format!("n{i}"));
    std::fs::create_dir_all(&node_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node_dir.join("podwire.log"))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &res.ns(&format!("n{i}"))])
        .arg(exe)
        .arg("run");
    if opts.etcd {
        cmd.args(["--etcd-endpoints", &etcd_lab::endpoint()])
            .args(["--healthz-ip", &underlay_ip(i).to_string()])
            .args(["--healthz-port", &etcd_lab::HEALTHZ_PORT.to_string()]);
    } else {
        cmd.args([
            "--store",
            &format!("file:{}", dir.join("cluster.json").display()),
        ]);
    }
    if opts.ip_masq {
        cmd.arg("--ip-masq");
    }
    cmd.args([
        "--ctl-socket",
        &node_dir.join("ctl.sock").display().to_string(),
    ]);
    // The lab is a test cluster: its checks make a worker panic.
    cmd.arg("--fault-injection");
    if i == 1 {
        // Node 1 logs JSON (checked by the lifecycle checks); the others plain text.
        cmd.args(["--log-format", "json"]);
    }
    if !opts.conntrack {
        cmd.args(["--conntrack", "off"]);
    }
    if opts.l2 {
        cmd.args(["--mode", "l2"]);
    }
    if !opts.udp_gro {
        cmd.args(["--udp-gro", "off"]);
    }
    if !opts.peer_queues {
        cmd.args(["--peer-queues", "off"]);
    }
    if opts.io_xdp {
        cmd.args(["--io", "xdp"]);
    }
    if opts.pod_xdp && opts.l2 {
        cmd.args(["--l2-pods", "xdp"]);
    } else if opts.pod_xdp {
        // The pod's port is held to the pod's address (its others go through the kernel).
        cmd.args(["--pod-ports", &format!("vpod={}", pod_ip(i))]);
    }
    if opts.services && !opts.etcd {
        cmd.args([
            "--services",
            &format!("file:{}", services_lab::file(&dir).display()),
        ]);
    }
    cmd.args(["--iface", "eth0", "--vxlan-tx", &opts.vxlan_tx])
        .args([
            "--subnet-file",
            &node_dir.join("subnet.env").display().to_string(),
        ])
        .args([
            "--stats-file",
            &node_dir.join("stats.json").display().to_string(),
        ])
        .args([
            "--workers",
            &opts.workers.to_string(),
            "--no-pin",
            "--exit-with-parent",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd.spawn().context("starting podwire")?;
    res.children.push((format!("n{i}"), child));
    Ok(())
}

/// Waits until node `i` is ready (subnet.env written; with etcd, /readyz answering 200), then
/// gives its pod interface FLANNEL_MTU, as the flannel CNI plugin does.
fn wait_node_ready(res: &mut Resources, opts: &LabOptions, i: usize) -> Result<()> {
    let dir = res.names.dir.clone();
    let env = dir.join(format!("n{i}/subnet.env"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let names = res.names.clone();
    loop {
        let ready = if opts.etcd {
            etcd_lab::ready(&names, i)
        } else {
            env.exists()
        };
        if ready {
            break;
        }
        let name = format!("n{i}");
        if let Some((_, child)) = res.children.iter_mut().find(|(n, _)| *n == name) {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "podwire on node {i} exited ({status}):\n{}",
                    log_tail(&dir, i)
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "podwire on node {i} was not ready in 20 s:\n{}",
                log_tail(&dir, i)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if opts.l2 {
        return Ok(());
    }
    let mtu = subnet_env::read_value(&env, "FLANNEL_MTU")
        .context("FLANNEL_MTU missing from subnet.env")?;
    netns::ip_in(
        &res.ns(&format!("p{i}")),
        &["link", "set", "eth0", "mtu", &mtu],
    )?;
    netns::ip_in(
        &res.ns(&format!("n{i}")),
        &["link", "set", "vpod", "mtu", &mtu],
    )?;
    Ok(())
}

/// Starts podwire on every podwire node. With etcd the last one joins only once the others are
/// ready, so the traffic checks show a late joiner reachable without restarting anyone.
fn start_nodes(res: &mut Resources, opts: &LabOptions, exe: &Path) -> Result<()> {
    let nodes = opts.podwire_nodes();
    if opts.etcd {
        for &i in &nodes {
            etcd_lab::seed_subnet_env(&res.names, opts, i)?;
        }
        let (late, first) = nodes.split_last().expect("at least one podwire node");
        let first = if first.is_empty() { &nodes[..] } else { first };
        for &i in first {
            spawn_node(res, opts, exe, i)?;
        }
        for &i in first {
            wait_node_ready(res, opts, i)?;
        }
        if !first.contains(late) {
            spawn_node(res, opts, exe, *late)?;
            wait_node_ready(res, opts, *late)?;
        }
        return Ok(());
    }
    let cluster = res.names.dir.join("cluster.json");
    std::fs::write(&cluster, serde_json::to_vec_pretty(&cluster_file(opts))?)?;
    for &i in &nodes {
        spawn_node(res, opts, exe, i)?;
    }
    for &i in &nodes {
        wait_node_ready(res, opts, i)?;
    }
    Ok(())
}

/// Node `i`'s VTEP MAC: the one podwire derives from the PublicIP (0e:70:c0:a8:63:0b for node
/// 1), so the kernel nodes, set up before any lease is written, already know podwire's.
fn vtep_mac(i: usize) -> MacAddr {
    podwire::tables::derived_vtep_mac(underlay_ip(i))
}

/// Configures every node's `flannel.1` exactly as flanneld's vxlan backend does: a VXLAN device
/// with nolearning on port 8472, MTU - 50, the lease's .0/32, and per remote lease a permanent
/// neighbour entry, a permanent FDB entry and an onlink route (reference/flannel-compat.md §3).
fn start_kernel_vxlan(res: &mut Resources, opts: &LabOptions) -> Result<()> {
    let mixed = !opts.podwire_nodes().is_empty();
    for i in (1..=opts.nodes).filter(|&i| opts.is_kernel_node(i)) {
        let host = res.ns(&format!("n{i}"));
        if mixed {
            // A veth "wire" carries the kernel's VXLAN TSO superframes as they are; a physical
            // NIC (or the stack, for the usual NIC without VXLAN TSO) segments them first. Make
            // the kernel peer's port behave like such a NIC: podwire's UDP socket would get one
            // datagram holding several MTU-sized segments otherwise (see docs/architecture.md).
            netns::exec_in(
                &host,
                &[
                    "ethtool",
                    "-K",
                    "eth0",
                    "tx-udp_tnl-segmentation",
                    "off",
                    "tx-udp_tnl-csum-segmentation",
                    "off",
                ],
            )?;
        }
        let local = underlay_ip(i).to_string();
        netns::ip_in(
            &host,
            &[
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &local,
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        netns::ip_in(
            &host,
            &[
                "link",
                "set",
                "flannel.1",
                "address",
                &vtep_mac(i).to_string(),
                "mtu",
                "1450",
                "up",
            ],
        )?;
        netns::ip_in(
            &host,
            &[
                "addr",
                "add",
                &format!("10.244.{i}.0/32"),
                "dev",
                "flannel.1",
            ],
        )?;
        for j in (1..=opts.nodes).filter(|&j| j != i) {
            if opts.direct_routing {
                // flanneld's DirectRouting for a peer on the same subnet: a plain route, no VXLAN.
                let (subnet, via) = (format!("10.244.{j}.0/24"), underlay_ip(j).to_string());
                netns::ip_in(
                    &host,
                    &["route", "add", &subnet, "via", &via, "dev", "eth0"],
                )?;
                continue;
            }
            let gw = format!("10.244.{j}.0");
            netns::ip_in(
                &host,
                &[
                    "neigh",
                    "add",
                    &gw,
                    "lladdr",
                    &vtep_mac(j).to_string(),
                    "dev",
                    "flannel.1",
                    "nud",
                    "permanent",
                ],
            )?;
            netns::exec_in(
                &host,
                &[
                    "bridge",
                    "fdb",
                    "append",
                    &vtep_mac(j).to_string(),
                    "dev",
                    "flannel.1",
                    "dst",
                    &underlay_ip(j).to_string(),
                    "self",
                    "permanent",
                ],
            )?;
            netns::ip_in(
                &host,
                &[
                    "route",
                    "add",
                    &format!("10.244.{j}.0/24"),
                    "via",
                    &gw,
                    "dev",
                    "flannel.1",
                    "onlink",
                ],
            )?;
        }
        netns::ip_in(
            &res.ns(&format!("p{i}")),
            &["link", "set", "eth0", "mtu", "1450"],
        )?;
        netns::ip_in(&host, &["link", "set", "vpod", "mtu", "1450"])?;
    }
    Ok(())
}

/// Starts tshark on the underlay bridge, writing encapsulated traffic (UDP 8285 and 8472) to
/// `path`, and waits until it is capturing. It is stopped with the daemons (SIGTERM, which makes
/// tshark finish the file).
fn start_capture(res: &mut Resources, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &res.ns("u"),
            "tshark",
            "-q",
            "-i",
            "br0",
            "-F",
            "pcap",
        ])
        .args(["-f", "udp port 8285 or udp port 8472", "-w"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tshark for --capture (is tshark installed?)")?;
    res.children.push(("capture".into(), child));
    let deadline = Instant::now() + Duration::from_secs(15);
    // tshark writes the 24-byte pcap file header once it is capturing.
    while std::fs::metadata(path)
        .map(|m| m.len() < 24)
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            bail!("tshark did not start capturing on the underlay within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The node a child called `nI` runs podwire on (other children: tshark).
fn daemon_node(name: &str) -> Option<usize> {
    name.strip_prefix('n')?.parse().ok()
}

/// What is wrong with daemon `name` having ended with `status` (`when`: e.g. "on the lab's
/// SIGTERM"), if anything: a status other than 0 (or any, unless `zero_ok`: the lab did not
/// ask it to stop), or a signal. None for other children.
fn daemon_failure(
    dir: &Path,
    name: &str,
    status: std::process::ExitStatus,
    when: &str,
    zero_ok: bool,
) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    let node = daemon_node(name)?;
    let how = match (status.code(), status.signal()) {
        (Some(0), _) if zero_ok => return None,
        (Some(0), _) => "exited with status 0, unasked,".to_string(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!(
            "was killed by signal {sig} ({}), which the lab did not send,",
            Signal::try_from(sig).map_or("unknown", |s| s.as_str())
        ),
        (None, None) => format!("ended ({status})"),
    };
    Some(format!(
        "podwire on node {node} {how} {when}; its log ends:\n{}",
        log_tail(dir, node)
    ))
}

/// Fails the lab if a daemon has died while it ran (see [`Resources::reap_dead`]).
fn daemons_alive(res: &Arc<Mutex<Resources>>) -> Result<()> {
    let dead = res.lock().expect("lab resources").reap_dead();
    if !dead.is_empty() {
        bail!("{}", dead.join("\n"));
    }
    Ok(())
}

fn log_tail(dir: &Path, node: usize) -> String {
    let text =
        std::fs::read_to_string(dir.join(format!("n{node}/podwire.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
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

/// A forged datagram from the rogue host must not reach pod 1; a real one from pod 2 must.
/// `--io xdp`: node 1's own address still answers on the interface podwire's XDP program sits
/// on: a ping from node 2, and a TCP connection to a port podwire does not own.
fn xdp_host_check(res: &Names) -> Result<Check> {
    const PORT: u16 = 2222;
    let n1 = underlay_ip(1);
    let listener = netns::run_in(&res.ns("n1"), move || Ok(TcpListener::bind((n1, PORT))?))?;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf)?;
        conn.write_all(&buf)?;
        Ok(())
    });
    let (pings, echoed) = netns::run_in(&res.ns("n2"), move || {
        let pings = traffic::ping(n1, 3, 84, Duration::from_secs(1))?;
        let mut c = TcpStream::connect_timeout(&(n1, PORT).into(), Duration::from_secs(3))?;
        c.write_all(b"hello")?;
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf)?;
        Ok((pings, buf == *b"hello"))
    })?;
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))?
        .is_ok();
    Ok(Check {
        name: "with XDP on node 1's interface, its host still answers there (ping, TCP)".into(),
        ok: pings.received == pings.sent && echoed && served,
        detail: format!(
            "{} of {} pings answered by {n1}; TCP to port {PORT} echoed: {echoed}",
            pings.received, pings.sent
        ),
    })
}

fn rogue_check(res: &Names, opts: &LabOptions) -> Result<Check> {
    let p1 = res.ns("p1");
    let sock = netns::run_in(&p1, move || Ok(UdpSocket::bind((pod_ip(1), ROGUE_PORT))?))?;
    let sock = Arc::new(sock);
    let node1 = SocketAddrV4::new(underlay_ip(1), opts.data_port());
    let vxlan = opts.vxlan();
    netns::run_in(&res.ns("x"), move || {
        let inner = traffic::inner_udp_packet(
            SocketAddrV4::new(pod_ip(2), 4000),
            SocketAddrV4::new(pod_ip(1), ROGUE_PORT),
            b"forged",
        );
        // Everything right but the sender: node 2's pod, node 1's VtepMAC, VNI 1.
        let forged = if vxlan {
            traffic::vxlan_payload(vtep_mac(1), vtep_mac(2), &inner)
        } else {
            inner
        };
        let s = UdpSocket::bind((ROGUE_IP, 0))?;
        for _ in 0..5 {
            s.send_to(&forged, node1)?;
        }
        Ok(())
    })?;
    let forged_arrived = traffic::collect_datagrams(&sock, Duration::from_millis(500))?;
    netns::run_in(&res.ns("p2"), move || {
        let s = UdpSocket::bind((pod_ip(2), 0))?;
        s.send_to(b"genuine", SocketAddrV4::new(pod_ip(1), ROGUE_PORT))?;
        Ok(())
    })?;
    let genuine = traffic::collect_datagrams(&sock, Duration::from_millis(500))?;
    let ok = forged_arrived.is_empty() && genuine.iter().any(|d| d == b"genuine");
    Ok(Check {
        name: "datagrams from a non-node are dropped".into(),
        ok,
        detail: format!(
            "{} of 5 forged delivered; genuine delivered: {}",
            forged_arrived.len(),
            !genuine.is_empty()
        ),
    })
}

/// Pod 1 sends one UDP GSO buffer (UDP_SEGMENT: 20 datagrams of 1000 bytes and a short one)
/// to pod 2. Through podwire's TUN it arrives as a USO superframe, which podwire cuts into the
/// sender's datagrams; pod 2 must receive exactly those.
fn udp_gso_check(res: &Names) -> Result<Check> {
    use podwire_dataplane::batch::Batch;
    use podwire_dataplane::port::{udp::UdpPort, RxPort as _, TxPort as _};
    const PORT: u16 = 5205;
    let sizes: Vec<usize> = (0..20).map(|_| 1000).chain([333]).collect();
    let sink = netns::run_in(&res.ns("p2"), move || {
        let s = UdpSocket::bind((pod_ip(2), PORT))?;
        s.set_read_timeout(Some(Duration::from_millis(1500)))?;
        Ok(s)
    })?;
    let want = sizes.clone();
    netns::run_in(&res.ns("p1"), move || {
        let mut port = UdpPort::bind(SocketAddrV4::new(pod_ip(1), 0), 64, 1 << 20)?;
        port.set_gso(true);
        let mut batch = Batch::new(64, 2048);
        for (i, &len) in want.iter().enumerate() {
            batch.rx_slot(i)[..len].fill(i as u8);
            batch.commit_rx(i, len, SocketAddrV4::new(pod_ip(2), PORT), false);
        }
        let indices: Vec<u16> = (0..want.len() as u16).collect();
        let out = port.tx_batch(&batch, &indices);
        let _ = port.rx_batch(&mut batch);
        anyhow::ensure!(
            out.sent == want.len(),
            "sent {} of {}",
            out.sent,
            want.len()
        );
        Ok(())
    })?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sink.recv(&mut buf) {
        let i = got.len();
        got.push(n == sizes.get(i).copied().unwrap_or(0) && buf[..n].iter().all(|&b| b == i as u8));
        if got.len() == sizes.len() {
            break;
        }
    }
    Ok(Check {
        name: "a pod's UDP GSO send (USO) arrives as the sender's datagrams".into(),
        ok: got.len() == sizes.len() && got.iter().all(|&ok| ok),
        detail: format!(
            "{} of {} datagrams intact and in order",
            got.iter().filter(|&&ok| ok).count(),
            sizes.len()
        ),
    })
}

fn unreachable_check(res: &Names) -> Result<Check> {
    let target = Ipv4Addr::new(10, 244, 250, 1);
    let got = netns::run_in(&res.ns("p1"), move || {
        traffic::probe_icmp_error(target, Duration::from_secs(2))
    })?;
    let want_src = Ipv4Addr::new(10, 244, 1, 0);
    let ok = got == Some((want_src, 3, 0));
    Ok(Check {
        name: "ICMP net-unreachable for an address in no lease".into(),
        ok,
        detail: match got {
            Some((src, t, c)) => format!("{target}: type {t} code {c} from {src}"),
            None => format!("{target}: no ICMP error arrived"),
        },
    })
}

/// With `--ip-masq`: pod 1 sends 2 MB to a host outside the cluster (the underlay's rogue
/// host, which has no route to the pods), which must see node 1's address and answer with the
/// data's SHA-256; the services checks show that traffic between pods keeps its addresses.
/// With `--io xdp` podwire masquerades, so the port must be one of its masquerade range.
fn masquerade_check(res: &Names, opts: &LabOptions) -> Result<Check> {
    const SIZE: usize = 2 << 20;
    let listener = netns::run_in(&res.ns("x"), || {
        Ok(TcpListener::bind(SocketAddrV4::new(ROGUE_IP, MASQ_PORT))?)
    })?;
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || -> Result<SocketAddrV4> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match listener.accept() {
                Ok((mut s, std::net::SocketAddr::V4(peer))) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(STEP_TIMEOUT))?;
                    let mut data = Vec::with_capacity(SIZE);
                    s.read_to_end(&mut data)?;
                    s.write_all(&<sha2::Sha256 as sha2::Digest>::digest(&data))?;
                    return Ok(peer);
                }
                Ok(_) => bail!("an IPv6 peer"),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e.into()),
            }
        }
    });
    let sent = netns::run_in(&res.ns("p1"), || {
        let mut s = std::net::TcpStream::connect_timeout(
            &SocketAddrV4::new(ROGUE_IP, MASQ_PORT).into(),
            Duration::from_secs(5),
        )
        .context("connecting to the outside host")?;
        s.set_read_timeout(Some(STEP_TIMEOUT))?;
        let mut data = vec![0u8; SIZE];
        traffic::Pattern::new(41).fill(&mut data);
        s.write_all(&data)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut digest = [0u8; 32];
        s.read_exact(&mut digest)
            .context("reading the outside host's digest")?;
        if digest[..] != <sha2::Sha256 as sha2::Digest>::digest(&data)[..] {
            bail!("the outside host received other bytes than pod 1 sent");
        }
        Ok(())
    });
    let seen = netns::join(server);
    let (lo, hi) = podwire_dataplane::pipeline::MASQ_PORTS;
    let port_ok = |p: &SocketAddrV4| !opts.io_xdp || (lo..=hi).contains(&p.port());
    let ok = sent.is_ok() && matches!(&seen, Ok(p) if *p.ip() == underlay_ip(1) && port_ok(p));
    let by = if opts.io_xdp {
        format!("by podwire, from a port in {lo}-{hi}")
    } else {
        "by the kernel".into()
    };
    Ok(Check {
        name: format!(
            "--ip-masq: a pod sends 2 MB to a host outside the cluster as its node ({by}), intact"
        ),
        ok,
        detail: match (sent, seen) {
            (Ok(()), Ok(peer)) => format!("{ROGUE_IP} saw {peer} (node 1 is {})", underlay_ip(1)),
            (Err(e), _) | (_, Err(e)) => format!("{e:#}"),
        },
    })
}

const CTL_CHECK: &str = "podwire ctl answers from the running daemon, matching the lab's state";

/// `podwire ctl` against node 1's running daemon, each answer checked against what the lab
/// knows: the map holds every node, the workers counted traffic, the connection table holds
/// the pods' connections, and with services every ClusterIP connection the checks made.
fn ctl_check(r: &Names, opts: &LabOptions, exe: &Path) -> Result<Check> {
    let sock = r.dir.join("n1/ctl.sock");
    let ask = |req: serde_json::Value| podwire::ctl::request(&sock, &req);
    let mut problems = Vec::new();
    let subnets = ask(json!({"cmd": "subnets"}))?;
    let leases = subnets["leases"].as_array().map_or(0, Vec::len);
    if leases != opts.nodes || subnets["own"]["subnet"] != "10.244.1.0/24" {
        problems.push(format!(
            "subnets: {leases} leases, own {}",
            subnets["own"]["subnet"]
        ));
    }
    let stats = ask(json!({"cmd": "stats"}))?;
    // From the pod: through the TUN, or with `--pods xdp` through its AF_XDP port.
    let from_pod = if opts.pod_xdp { "rx_pods" } else { "rx_tun" };
    let rx: u64 = stats["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["counters"][from_pod].as_u64())
        .sum();
    if rx == 0 {
        problems.push(format!("stats: no packets counted in {from_pod}"));
    }
    let mut detail = format!("{leases} leases, {from_pod} {rx}");
    if opts.io_xdp {
        // The XDP program's own counters, read from its map by the daemon when asked: it
        // redirected the underlay's frames, next to none passed for want of a socket (those
        // between its attach and the socket's bind).
        let eth0 = stats["xdp_programs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["interface"] == "eth0");
        let (redirected, no_socket) = eth0.map_or((None, None), |p| {
            (p["redirected"].as_u64(), p["no_socket"].as_u64())
        });
        match (redirected, no_socket) {
            (Some(r), Some(n)) if r > 0 && n * 100 <= r => {
                detail += &format!(", XDP program: redirected {r}, no_socket {n}");
            }
            _ => problems.push(format!(
                "stats: the XDP program on eth0 redirected {redirected:?}, no_socket {no_socket:?} ({})",
                stats["xdp_programs"]
            )),
        }
    }
    // Captures while pod 1 pings pod 2: the pods' echoes on the TUN, datagrams on the underlay;
    // tshark must read both files.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinging = Arc::clone(&stop);
    let pinger = netns::spawn_in(&r.ns("p1"), move || {
        while !pinging.load(std::sync::atomic::Ordering::Relaxed) {
            traffic::ping(pod_ip(2), 5, 84, Duration::from_secs(1))?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    });
    // (With DirectRouting the pods' traffic skips podwire: nothing to capture.)
    let ports: &[(&str, &str)] = if opts.direct_routing {
        &[]
    } else {
        &[("tun", "1"), ("underlay", "17")]
    };
    for &(port, want) in ports {
        let file = r.dir.join(format!("capture-{port}.pcap"));
        let got = podwire::ctl::capture_to_file(
            &sock,
            &json!({"cmd": "capture", "port": port, "count": 10, "timeout_ms": 4000}),
            &file,
        )?;
        let out = Command::new("tshark")
            .args([
                "-r",
                &file.display().to_string(),
                "-T",
                "fields",
                "-e",
                "ip.proto",
            ])
            .output();
        let protos = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        // Every packet must decode as IPv4 (the pod may send something besides the pings, a
        // late TCP segment of an earlier check, so the pings need only be among them).
        let decoded = protos.lines().filter(|l| !l.trim().is_empty()).count();
        let wanted = protos.lines().filter(|l| l.starts_with(want)).count();
        if got["captured"] != 10 || decoded != 10 || wanted == 0 {
            problems.push(format!(
                "capture {port}: {} captured, tshark read {decoded} as IPv4, {wanted} with ip.proto {want}",
                got["captured"]
            ));
        }
        detail += &format!(", {decoded} {port} packets captured");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = netns::join(pinger);
    if opts.conntrack {
        let pod2 = pod_ip(2).to_string();
        let ct = ask(json!({"cmd": "conntrack", "addr": pod2}))?;
        let n = ct["count"].as_u64().unwrap_or(0);
        if n == 0 {
            problems.push(format!("conntrack: no connection with {}", pod_ip(2)));
        }
        detail += &format!(", {n} connections with {}", pod_ip(2));
    }
    if opts.services {
        let vip = services_lab::WEB_VIP.to_string();
        let ct = ask(json!({"cmd": "conntrack", "addr": vip, "port": 80, "proto": "tcp"}))?;
        let to_vip = ct["count"].as_u64().unwrap_or(0);
        let svcs = ask(json!({"cmd": "services"}))?;
        let web = svcs["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == "default/web");
        let (eps, conns) = web.map_or((0, 0), |w| {
            let eps = w["endpoints"].as_array().cloned().unwrap_or_default();
            let conns: u64 = eps
                .iter()
                .map(|e| e["active"].as_u64().unwrap_or(0) + e["inactive"].as_u64().unwrap_or(0))
                .sum();
            (eps.len(), conns)
        });
        let want = services_lab::CONNECTIONS as u64;
        if eps != 3 || conns < want || to_vip < want {
            problems.push(format!(
                "services: web has {eps} endpoints, {conns} connections; conntrack to {vip}:80: {to_vip}"
            ));
        }
        let human = Command::new(exe)
            .args(["ctl", "--socket", &sock.display().to_string(), "services"])
            .output()?;
        let text = String::from_utf8_lossy(&human.stdout);
        if !text.contains("TCP  10.96.0.10:80 mh") || !text.contains("-> 10.244.2.3:8080") {
            problems.push(format!("`podwire ctl services` printed:\n{text}"));
        }
        detail += &format!(", web: {eps} endpoints with {conns} connections");
    }
    Ok(Check {
        name: CTL_CHECK.into(),
        ok: problems.is_empty(),
        detail: if problems.is_empty() {
            detail
        } else {
            problems.join("; ")
        },
    })
}

/// Polls `probe` for up to 5 s until it returns true.
fn eventually(mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if probe() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The store is re-read live: a broken update keeps the last good map, a removed lease makes its
/// pods unreachable (ICMP net-unreachable), and restoring it makes them reachable again.
fn map_reload_check(res: &Names, opts: &LabOptions) -> Result<Check> {
    let cluster = res.dir.join("cluster.json");
    let good = cluster_file(opts);
    let p1 = res.ns("p1");
    let ping_ok = || {
        let ns = p1.clone();
        netns::run_in(&ns, || {
            traffic::ping(pod_ip(2), 1, 64, Duration::from_millis(300))
        })
        .map(|s| s.received == 1)
        .unwrap_or(false)
    };
    let unreachable = || {
        let ns = p1.clone();
        netns::run_in(&ns, || {
            traffic::probe_icmp_error(pod_ip(2), Duration::from_millis(300))
        })
        .ok()
        .flatten()
            == Some((Ipv4Addr::new(10, 244, 1, 0), 3, 0))
    };
    replace_file(&cluster, b"{ this is not a cluster file")?;
    std::thread::sleep(Duration::from_millis(400));
    let kept = ping_ok();
    let mut without = good.clone();
    without["subnets"]
        .as_object_mut()
        .expect("subnets")
        .remove("10.244.2.0-24");
    replace_file(&cluster, &serde_json::to_vec_pretty(&without)?)?;
    let removed = eventually(unreachable);
    replace_file(&cluster, &serde_json::to_vec_pretty(&good)?)?;
    let restored = eventually(ping_ok);
    Ok(Check {
        name: "subnet map swapped live from the store".into(),
        ok: kept && removed && restored,
        detail: format!("broken file kept last map: {kept}; lease removed -> unreachable: {removed}; restored -> reachable: {restored}"),
    })
}

/// A check on every node's final counters: `ok` must hold for each node (a node without
/// stats fails it); the detail shows the `shown` counters per node.
fn per_node_check(
    name: &str,
    stats: &[(usize, Option<LocalStats>)],
    shown: &[Counter],
    ok: impl Fn(&LocalStats) -> bool,
) -> Check {
    let per_node: Vec<String> = stats
        .iter()
        .map(|(i, s)| match s {
            Some(s) => {
                let values: Vec<String> = shown
                    .iter()
                    .map(|c| format!("{} {}", c.as_str(), s.counter(*c)))
                    .collect();
                format!("node {i}: {}", values.join(", "))
            }
            None => format!("node {i}: no stats"),
        })
        .collect();
    Check {
        name: name.into(),
        ok: stats.iter().all(|(_, s)| s.as_ref().is_some_and(&ok)),
        detail: per_node.join("; "),
    }
}

/// Underlay sends through the kernel's fallback that pass on any node (`--io xdp`).
const VIA_KERNEL_FEW: u64 = 10;

/// Per podwire node: its (tx_underlay, xdp_via_kernel) at some moment (None: no answer).
type XdpSends = Vec<(usize, Option<(u64, u64)>)>;

/// Each podwire node's (tx_underlay, xdp_via_kernel) now, from `ctl stats`.
fn xdp_sends_now(r: &Names, nodes: &[usize]) -> XdpSends {
    nodes
        .iter()
        .map(|&i| {
            let sock = r.dir.join(format!("n{i}/ctl.sock"));
            let sum = |v: &serde_json::Value, c: &str| -> u64 {
                v["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|w| w["counters"][c].as_u64())
                    .sum()
            };
            let got = podwire::ctl::request(&sock, &json!({"cmd": "stats"}))
                .ok()
                .map(|v| (sum(&v, "tx_underlay"), sum(&v, "xdp_via_kernel")));
            (i, got)
        })
        .collect()
}

/// `--io xdp`: every podwire node received its underlay traffic through AF_XDP (the UDP
/// socket next to none of it) and sent through it (the kernel's fallback next to none of it).
///
/// The fallback carries what goes to a next hop podwire has not seen resolved: until it
/// re-reads the kernel's neighbour table, up to 100 ms after the kernel resolved it, so at the
/// start a fast first transfer may send a few percent of a short lab's datagrams that way.
/// With `since` (each node's sends and fallbacks once the pairs' traffic has reached every
/// peer) only the sends after it are bounded; a node restarted since is taken whole.
fn underlay_through_xdp_check(
    stats: &[(usize, Option<LocalStats>)],
    since: Option<&XdpSends>,
) -> Check {
    use Counter::{RxUnderlay, TxUnderlay, XdpRxFrames, XdpTxFrames, XdpViaKernel};
    let mut check = per_node_check(
        "the underlay passes through AF_XDP on every podwire node, not the UDP socket",
        stats,
        &[
            RxUnderlay,
            XdpRxFrames,
            TxUnderlay,
            XdpTxFrames,
            XdpViaKernel,
        ],
        |s| {
            // A few may come through the socket: those that arrived between the program's
            // attach and its socket's bind (the program passes them to the kernel).
            s.counter(RxUnderlay) > 0
                && s.counter(XdpRxFrames) * 100 >= s.counter(RxUnderlay) * 99
                && s.counter(XdpTxFrames) > 0
        },
    );
    // Sends through the kernel (`xdp_via_kernel`, counted in tx_underlay): at most 1 in 100,
    // or VIA_KERNEL_FEW on a node that sent little (in the L2 lab node 3 sends some 50).
    let mut over = Vec::new();
    for (i, s) in stats {
        let Some(s) = s else { continue };
        let (tx, via) = (s.counter(TxUnderlay), s.counter(XdpViaKernel));
        let (tx0, via0) = since
            .and_then(|v| v.iter().find(|(n, _)| n == i))
            .and_then(|(_, b)| *b)
            .filter(|&(tx0, via0)| tx0 <= tx && via0 <= via)
            .unwrap_or((0, 0));
        let (tx, via) = (tx - tx0, via - via0);
        if via > (tx / 100).max(VIA_KERNEL_FEW) {
            over.push(format!(
                "node {i}: {via} of {tx} sends through the kernel{}",
                if since.is_some() {
                    " after the pairs"
                } else {
                    ""
                }
            ));
        }
    }
    if !over.is_empty() {
        check.ok = false;
        check.detail = format!("{}; {}", over.join("; "), check.detail);
    }
    check
}

/// Every daemon exited with status 0 on the lab's SIGTERM (`stop_failures` says which did not)
/// and left its final counters.
fn clean_exit_check(stats: &[(usize, Option<LocalStats>)], stop_failures: &[String]) -> Check {
    let files = stats.iter().filter(|(_, s)| s.is_some()).count();
    let mut detail = format!(
        "{} of {} exited with status 0 on SIGTERM, {files} of {} stats files",
        stats.len().saturating_sub(stop_failures.len()),
        stats.len(),
        stats.len()
    );
    for f in stop_failures {
        detail += &format!("; {f}");
    }
    Check {
        name: "every daemon exited cleanly (status 0 on SIGTERM) with its counters".into(),
        ok: files == stats.len() && stop_failures.is_empty(),
        detail,
    }
}

fn read_stats(dir: &Path, nodes: &[usize]) -> Vec<(usize, Option<LocalStats>)> {
    let read = |i: usize| {
        let text = std::fs::read_to_string(dir.join(format!("n{i}/stats.json"))).ok()?;
        report::total_from_json(&serde_json::from_str(&text).ok()?)
    };
    nodes.iter().map(|&i| (i, read(i))).collect()
}

/// Runs the lab; returns whether every check passed.
pub fn run(opts: LabOptions) -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("podwire-lab lab needs root (network namespaces, TUN devices)");
    }
    if !(2..=100).contains(&opts.nodes) {
        bail!("--nodes must be between 2 and 100");
    }
    if opts.direct_routing && !opts.vxlan() {
        bail!("--direct-routing is a VXLAN option (Backend.DirectRouting)");
    }
    if opts.peer_kernel && opts.backend != "vxlan" {
        bail!("--peer kernel goes with --backend vxlan (kernel nodes speak VXLAN)");
    }
    if !["udp", "vxlan", KERNEL_VXLAN].contains(&opts.backend.as_str()) {
        bail!("--backend {}: want \"udp\" or \"vxlan\" (podwire), or \"{KERNEL_VXLAN}\" (the kernel's VXLAN as flanneld sets it up, for comparison)", opts.backend);
    }
    if opts.extra_leases > 0 && !opts.etcd {
        bail!("--extra-leases goes with --store etcd");
    }
    if opts.services && (opts.nodes < 3 || (opts.is_kernel_node(1) && opts.backend != KERNEL_VXLAN))
    {
        bail!("--services needs 3 nodes or more, and node 1 (its pod is the client) running podwire, or kube-proxy's rules with --backend {KERNEL_VXLAN}");
    }
    if opts.services && !opts.conntrack {
        bail!("--services needs connection tracking");
    }
    if opts.extra_leases > 30_000 {
        bail!("--extra-leases: at most 30000");
    }
    if opts.l2 {
        if opts.backend != "vxlan" || opts.peer_kernel || opts.direct_routing {
            bail!("--mode l2 goes with --backend vxlan (podwire on every node, no DirectRouting)");
        }
        if opts.services || opts.ip_masq || opts.etcd {
            bail!("--mode l2 does not combine with --services, --ip-masq or --store etcd yet");
        }
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
    start_kernel_vxlan(&mut r, opts).context("configuring kernel VXLAN like flanneld")?;
    if opts.services {
        services_lab::prepare(&r.names, &services_source(res, opts), r.etcd.as_ref())
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

fn run_inner(res: &Arc<Mutex<Resources>>, opts: &LabOptions, exe: &Path) -> Result<bool> {
    let started = Instant::now();
    let mut figures = serde_json::Map::new();
    let r = set_up(res, opts, exe, &mut figures)?;
    let podwire_nodes = opts.podwire_nodes();
    let kernel_nodes: Vec<usize> = (1..=opts.nodes)
        .filter(|&i| opts.is_kernel_node(i))
        .collect();
    println!(
        "podwire-lab lab: {} nodes ({} podwire {}, {} kernel VXLAN as flanneld sets it up), {} worker(s) per podwire node, {} MB per TCP transfer",
        opts.nodes,
        podwire_nodes.len(),
        if opts.vxlan() { "vxlan" } else { "udp" },
        kernel_nodes.len(),
        opts.workers,
        opts.transfer_mb
    );
    let mut pairs = Vec::new();
    for from in 1..=opts.nodes {
        for to in 1..=opts.nodes {
            if from != to {
                daemons_alive(res)?;
                pairs.push(run_pair(&r, opts, from, to, || daemons_alive(res))?);
            }
        }
    }
    daemons_alive(res)?;
    // Every peer has been reached: from here on AF_XDP sends need no kernel fallback.
    let sends_after_pairs = opts.io_xdp.then(|| xdp_sends_now(&r, &podwire_nodes));
    let mut checks = vec![
        Check {
            name: "ping between every pair of pods".into(),
            ok: pairs
                .iter()
                .all(|p| p.ping.received == p.ping.sent && p.ping.sent > 0),
            detail: format!("{} pairs", pairs.len()),
        },
        Check {
            name: format!(
                "TCP {} MB with intact SHA-256, every pair",
                opts.transfer_mb
            ),
            ok: pairs.iter().all(|p| p.tcp_sha_ok),
            detail: pairs
                .iter()
                .filter_map(|p| {
                    p.tcp_error
                        .as_ref()
                        .map(|e| format!("{}->{}: {e}", p.from, p.to))
                })
                .collect::<Vec<_>>()
                .join("; "),
        },
        Check {
            name: format!(
                "full-size ping ({}-byte IP packets, DF), every pair",
                opts.pod_mtu()
            ),
            ok: pairs
                .iter()
                .all(|p| p.big_ping.received == p.big_ping.sent && p.big_ping.sent > 0),
            detail: format!(
                "{} of {} answered",
                pairs.iter().map(|p| p.big_ping.received).sum::<u32>(),
                pairs.iter().map(|p| p.big_ping.sent).sum::<u32>()
            ),
        },
        Check {
            name: "UDP request/response, every pair".into(),
            ok: pairs
                .iter()
                .all(|p| p.udp_sent > 0 && p.udp_received * 100 >= p.udp_sent * 99),
            detail: format!(
                "{} of {} echoed",
                pairs.iter().map(|p| p.udp_received).sum::<u32>(),
                pairs.iter().map(|p| p.udp_sent).sum::<u32>()
            ),
        },
    ];
    if opts.services {
        // podwire's hairpin address, or with kube-proxy the node's masquerade address on the
        // pod's link.
        let hairpin = if opts.is_kernel_node(1) {
            gateway_ip(1)
        } else {
            let cidr = podwire_dataplane::nat::DEFAULT_SERVICE_CIDR.parse()?;
            podwire_dataplane::nat::hairpin_ip_for(cidr)
        };
        // With --io xdp, node 1's podwire owns its address: its NodePorts, from outside.
        let node_ports =
            (opts.io_xdp && !opts.is_kernel_node(1)).then_some(services_lab::NodePorts {
                node: underlay_ip(1),
                cluster_addr: Ipv4Addr::new(10, 244, 1, 0),
                outside: "x",
            });
        let (c, f) = services_lab::checks(&r, hairpin, &services_source(res, opts), node_ports)?;
        checks.extend(c);
        daemons_alive(res)?;
        figures.insert(
            "service_connections_per_s".into(),
            json!((f.connections_per_s * 10.0).round() / 10.0),
        );
        figures.insert("service_spread".into(), json!(f.spread));
    }
    if opts.soak_seconds > 0 {
        let daemons: Vec<(usize, u32)> = {
            let g = res.lock().expect("lab resources");
            podwire_nodes
                .iter()
                .filter_map(|&i| {
                    let name = format!("n{i}");
                    g.children
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, c)| (i, c.id()))
                })
                .collect()
        };
        let s = soak::run(&r, &daemons, opts.soak_seconds, opts.soak_pps);
        // A daemon that died under the soak is why its readings failed.
        daemons_alive(res)?;
        let s = s?;
        figures.insert(
            "soak".into(),
            json!({"seconds": s.seconds, "pps": s.pps, "sent": s.sent, "received": s.received,
                   "daemons": s.daemons.iter().map(|d| json!({"node": d.0, "rss_kb_start": d.1,
                   "rss_kb_end": d.2, "rss_kb_max": d.3, "fds_start": d.4, "fds_end": d.5}))
                   .collect::<Vec<_>>(),
                   "kernel_drops": s.kernel_drops.iter().map(|(w, n)| json!({"where": w, "count": n}))
                   .collect::<Vec<_>>()}),
        );
        checks.extend(soak::checks(&s));
    }
    let mut stats = Vec::new();
    // Node 1 runs podwire unless the whole cluster is the kernel baseline.
    if !opts.is_kernel_node(1) {
        checks.push(udp_gso_check(&r)?);
        daemons_alive(res)?;
        checks.push(unreachable_check(&r)?);
        daemons_alive(res)?;
        if opts.ip_masq {
            checks.push(masquerade_check(&r, opts)?);
            daemons_alive(res)?;
        }
        checks.push(rogue_check(&r, opts)?);
        daemons_alive(res)?;
        checks.push(icmp_forge::check(res, &r, opts)?);
        daemons_alive(res)?;
        if opts.io_xdp {
            checks.push(xdp_host_check(&r)?);
            daemons_alive(res)?;
        }
        // Per-peer queues are sockets: through AF_XDP, every peer shares the queue's ring.
        if [2, 3].iter().all(|i| opts.podwire_nodes().contains(i)) && !opts.io_xdp {
            checks.push(fairness::check(&r, opts)?);
            daemons_alive(res)?;
        }
        if opts.etcd {
            checks.extend(etcd_checks(res, &r, opts, exe, &mut figures)?);
            daemons_alive(res)?;
        } else {
            checks.push(map_reload_check(&r, opts)?);
            daemons_alive(res)?;
        }
        if opts.podwire_nodes().contains(&2) {
            checks.push(lifecycle::kill_restart_check(res, &r, opts, exe, 2)?);
            daemons_alive(res)?;
            checks.push(lifecycle::worker_panic_check(res, &r, opts, exe, 2)?);
            daemons_alive(res)?;
        }
        checks.push(lifecycle::hangup_check(res, &r)?);
        daemons_alive(res)?;
        if opts.vxlan() {
            let log = std::fs::read_to_string(r.dir.join("n1/podwire.log")).unwrap_or_default();
            checks.push(Check {
                name: "node 1 takes over from flanneld: its leftover flannel.1 VXLAN device is replaced".into(),
                ok: log.contains("removed a kernel VXLAN device"),
                detail: "node 1 log".into(),
            });
        }
        if opts.io_xdp {
            let log = std::fs::read_to_string(r.dir.join("n1/podwire.log")).unwrap_or_default();
            checks.push(Check {
                name: "node 1 takes off the XDP program a gone podwire left attached (netlink)"
                    .into(),
                ok: log.contains("left attached"),
                detail: "node 1 log".into(),
            });
        }
        checks.push(ctl_check(&r, opts, exe).unwrap_or_else(|e| Check {
            name: CTL_CHECK.into(),
            ok: false,
            detail: format!("{e:#}"),
        }));
        daemons_alive(res)?;
        // Stop the daemons so their final counters are on disk; each must exit with 0.
        let stop_failures = res.lock().expect("lab resources").stop_children();
        stats = read_stats(&r.dir, &podwire_nodes);
        checks.push(lifecycle::residue_check(&r, opts)?);
        if opts.io_xdp {
            checks.push(underlay_through_xdp_check(
                &stats,
                sends_after_pairs.as_ref(),
            ));
        }
        if opts.pod_xdp {
            // Everything the pods sent podwire came through their AF_XDP ports.
            use Counter::{RxPods, RxTun, TxPods, TxTun};
            let through_xdp = |s: &LocalStats| s.counter(RxPods) > 0 && s.counter(TxPods) > 0;
            checks.push(per_node_check(
                "pods reach podwire through AF_XDP on their veths, not the TUN",
                &stats,
                &[RxPods, TxPods, RxTun, TxTun],
                |s| through_xdp(s) && s.counter(RxTun) == 0,
            ));
            if opts.services {
                // Node 2's pod also holds a second service backend address: a pod port is held
                // to its pod's one address, so the XDP program passes that address's packets
                // to the kernel, which routes them into the TUN.
                let pos = checks.len() - 1;
                let node2_ok = stats.iter().all(|(i, s)| {
                    s.as_ref()
                        .is_some_and(|s| through_xdp(s) && (*i == 2 || s.counter(RxTun) == 0))
                });
                checks[pos].name = format!(
                    "{} (but node 2's second backend address {}, not its pod port's)",
                    checks[pos].name,
                    services_lab::POD2_SECOND
                );
                checks[pos].ok = node2_ok;
            }
        }
        checks.push(icmp_forge::counted_check(&stats));
        let unknown_peer = stats[0]
            .1
            .as_ref()
            .map(|s| s.drops(DropReason::UnknownPeer))
            .unwrap_or(0);
        if opts.services {
            let gone = stats[0]
                .1
                .as_ref()
                .map_or(0, |s| s.drops(DropReason::EndpointGone));
            checks.push(Check {
                name: "packets of removed endpoints counted as endpoint_gone".into(),
                ok: gone > 0,
                detail: format!("node 1 endpoint_gone = {gone}"),
            });
        }
        checks.push(Check {
            name: "forged datagrams counted as unknown_peer".into(),
            ok: unknown_peer >= 5,
            detail: format!("node 1 unknown_peer = {unknown_peer}"),
        });
        if opts.direct_routing {
            let (_, routes) = netns::output_in(&r.ns("n1"), &["ip", "route", "show"])?;
            checks.push(Check {
                name: "DirectRouting: a crashed run's route for a vanished lease is withdrawn at start, others' routes kept".into(),
                ok: !routes.contains(STALE_ROUTES[0].0) && routes.contains(STALE_ROUTES[1].0),
                detail: routes.lines().filter(|l| l.contains("via")).collect::<Vec<_>>().join("; "),
            });
            // Pod traffic takes the plain routes; only the lab's probes and forgeries reach
            // node 1's tunnel.
            let tunnelled = stats[0]
                .1
                .as_ref()
                .map(|s| s.counter(Counter::TxUnderlay) + s.counter(Counter::RxUnderlay));
            let moved: u64 = pairs
                .iter()
                .filter(|p| p.from == 1 || p.to == 1)
                .map(|p| p.tcp_bytes)
                .sum();
            checks.push(Check {
                name: "DirectRouting: pod traffic bypasses the tunnel".into(),
                ok: tunnelled.is_some_and(|t| t < 1000) && moved > 0,
                detail: format!("node 1 tunnelled {tunnelled:?} packets while its pods moved {moved} bytes over TCP"),
            });
        }
        checks.push(clean_exit_check(&stats, &stop_failures));
    }
    print_summary(opts, &pairs, &checks, &stats, &figures, started.elapsed());
    let ok = checks.iter().all(|c| c.ok);
    if let Some(path) = &opts.json {
        write_json(path, opts, &pairs, &checks, &stats, &figures, ok)?;
    }
    Ok(ok)
}

/// Where this lab's nodes read services from.
fn services_source(res: &Arc<Mutex<Resources>>, opts: &LabOptions) -> services_lab::Source {
    if opts.is_kernel_node(1) {
        services_lab::Source::KubeProxy
    } else if opts.etcd {
        services_lab::Source::Etcd(Arc::clone(res))
    } else {
        services_lab::Source::File
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Lease PUTs timed to the map being live in the workers, per run.
const LATENCY_SAMPLES: usize = 60;

/// What only a live etcd can show (see `etcd_lab`), plus the PUT-to-live latency figures.
fn etcd_checks(
    res: &Arc<Mutex<Resources>>,
    r: &Names,
    opts: &LabOptions,
    exe: &Path,
    figures: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut lat = etcd_lab::put_to_live(r, opts, LATENCY_SAMPLES)?;
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    figures.insert("put_to_live_samples".into(), json!(lat.len()));
    figures.insert("put_to_live_p50_ms".into(), json!(ms(pct(0.50))));
    figures.insert("put_to_live_p99_ms".into(), json!(ms(pct(0.99))));
    figures.insert("put_to_live_max_ms".into(), json!(ms(lat[lat.len() - 1])));
    checks.push(etcd_lab::map_size_check(r, opts.nodes + opts.extra_leases));
    let podwire = opts.podwire_nodes();
    if podwire.len() < 2 {
        return Ok(checks);
    }
    let (other, last) = (podwire[1], podwire[podwire.len() - 1]);
    checks.push(etcd_lab::retake_check(r, other)?);
    checks.push(etcd_lab::outage_check(res, r, opts, other)?);
    checks.push(etcd_lab::leave_check(res, r, opts, last)?);
    checks.push(etcd_lab::rejoin_check(res, r, opts, exe, last)?);
    Ok(checks)
}

fn print_summary(
    opts: &LabOptions,
    pairs: &[PairResult],
    checks: &[Check],
    stats: &[(usize, Option<LocalStats>)],
    figures: &serde_json::Map<String, serde_json::Value>,
    took: Duration,
) {
    println!();
    if !pairs.is_empty() {
        println!(
            "{:<14} {:>10} {:>10} {:>14} {:>8} {:>10}",
            "pair", "ping", "rtt ms", "tcp Mbit/s", "sha256", "udp"
        );
    }
    for p in pairs {
        println!(
            "{:<14} {:>10} {:>10.3} {:>14.0} {:>8} {:>10}",
            format!("pod{} -> pod{}", p.from, p.to),
            format!("{}/{}", p.ping.received, p.ping.sent),
            p.ping.avg_rtt.as_secs_f64() * 1e3,
            p.tcp_mbps,
            if p.tcp_sha_ok { "ok" } else { "FAIL" },
            format!("{}/{}", p.udp_received, p.udp_sent),
        );
    }
    let mbps: Vec<f64> = pairs
        .iter()
        .filter(|p| p.tcp_sha_ok)
        .map(|p| p.tcp_mbps)
        .collect();
    if !mbps.is_empty() {
        let mut sorted = mbps.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "tcp throughput: median {:.0} Mbit/s over {} pairs (min {:.0}, max {:.0})",
            sorted[sorted.len() / 2],
            sorted.len(),
            sorted[0],
            sorted[sorted.len() - 1]
        );
    }
    // The pods' side of a node: its TUN device, or in L2 mode the bridge's TAP ports.
    let (rx_pods, tx_pods, fifth) = if opts.l2 {
        (Counter::RxTap, Counter::TxTap, Counter::Flooded)
    } else {
        (Counter::RxTun, Counter::TxTun, Counter::IcmpUnreachable)
    };
    if !stats.is_empty() {
        println!();
        println!(
            "{:<6} {:>12} {:>12} {:>12} {:>12} {:>8}  drops by reason",
            "node",
            rx_pods.as_str(),
            "tx_underlay",
            "rx_underlay",
            tx_pods.as_str(),
            if opts.l2 { "flooded" } else { "icmp" }
        );
        for (node, s) in stats {
            match s {
                Some(s) => {
                    let drops: Vec<String> = DropReason::ALL
                        .iter()
                        .filter(|&&r| s.drops(r) > 0)
                        .map(|&r| format!("{r}={}", s.drops(r)))
                        .collect();
                    println!(
                        "{:<6} {:>12} {:>12} {:>12} {:>12} {:>8}  {}",
                        format!("n{node}"),
                        s.counter(rx_pods),
                        s.counter(Counter::TxUnderlay),
                        s.counter(Counter::RxUnderlay),
                        s.counter(tx_pods),
                        s.counter(fifth),
                        if drops.is_empty() {
                            "none".to_string()
                        } else {
                            drops.join(" ")
                        }
                    );
                }
                None => println!("n{node:<5} (no stats: the daemon did not exit cleanly)"),
            }
        }
    }
    if !figures.is_empty() {
        println!();
        println!("figures:");
        for (k, v) in figures {
            println!("  {k:<28} {v}");
        }
    }
    println!();
    for c in checks {
        println!(
            "[{}] {}{}",
            if c.ok { " ok " } else { "FAIL" },
            c.name,
            if c.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.detail)
            }
        );
    }
    let ok = checks.iter().all(|c| c.ok);
    println!(
        "\n{} in {:.1} s with {} nodes",
        if ok { "lab passed" } else { "lab FAILED" },
        took.as_secs_f64(),
        opts.nodes
    );
}

fn write_json(
    path: &Path,
    opts: &LabOptions,
    pairs: &[PairResult],
    checks: &[Check],
    stats: &[(usize, Option<LocalStats>)],
    figures: &serde_json::Map<String, serde_json::Value>,
    ok: bool,
) -> Result<()> {
    let v = json!({
        "ok": ok,
        "nodes": opts.nodes,
        "backend": opts.backend,
        "transfer_mb": opts.transfer_mb,
        "store": if opts.etcd { "etcd" } else { "file" },
        "figures": figures,
        "pairs": pairs.iter().map(|p| json!({
            "from": p.from, "to": p.to,
            "ping_sent": p.ping.sent, "ping_received": p.ping.received,
            "rtt_ms": p.ping.avg_rtt.as_secs_f64() * 1e3,
            "tcp_bytes": p.tcp_bytes, "tcp_mbps": p.tcp_mbps, "tcp_sha256_ok": p.tcp_sha_ok,
            "udp_sent": p.udp_sent, "udp_received": p.udp_received,
        })).collect::<Vec<_>>(),
        "checks": checks.iter().map(|c| json!({"name": c.name, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
        "node_stats": stats.iter().map(|(node, s)| json!({
            "node": node,
            "stats": s.as_ref().map(|s| report::stats_json(std::slice::from_ref(s))["total"].clone()),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(path, serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("writing {}", path.display()))
}

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
