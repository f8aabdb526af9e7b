//! `podwire-lab lab --services`: ClusterIP services translated by podwire, checked with real
//! connections from node 1's pod.
//!
//! Services (written to the lab's `services.json`, given to every node with `--services`):
//! - `default/web` 10.96.0.10:80/TCP -> 10.244.2.2:8080, 10.244.2.3:8080, 10.244.3.2:8080
//!   (three pods on two nodes: pod 2 answers on two addresses);
//! - `default/dns` 10.96.0.53:53/UDP -> 10.244.2.2:5353, 10.244.3.2:5353;
//! - `default/self` 10.96.0.11:80/TCP -> 10.244.1.2:8080, the calling pod itself (hairpin);
//! - `default/empty` 10.96.0.12:80/TCP, no endpoints (kube-proxy rejects: connection refused).
//!
//! `web`, `self` and `dns` also have NodePorts (30080, 30081, 30053/UDP): with `--io xdp`,
//! node 1's podwire serves them on its own address to the outside host of the underlay.
//!
//! Every backend runs a small server in its pod that answers each request with the address
//! it served on, the peer it saw and the SHA-256 of what it received.

use super::kube_proxy_nft::kube_proxy_nft_rules;
use super::netns;
use super::service_catalogue::{
    file_json, kube_proxy_rules, Endpoint, Port, Proto, Service, Usable,
};
use super::traffic::Pattern;
use super::KubeProxyMode;
use super::{Check, Names, Resources};
use crate::etcd_server::EtcdServer;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
pub const SELF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
pub const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// Endpoints that start terminating (ready false, serving true), then are the only ones left.
pub(super) const TERM_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// internalTrafficPolicy Local with an endpoint on node 1.
pub(super) const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
/// internalTrafficPolicy Local with endpoints on nodes 2 and 3 only.
pub(super) const ELSEWHERE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);
/// sessionAffinity ClientIP.
pub(super) const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 23);
pub(super) const AFFINITY_SECS: u32 = 1;
/// http 80/TCP and dns 53/UDP.
pub(super) const MULTI_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 24);
/// UDP whose one server moves from pod 2 to pod 3.
pub(super) const CYCLE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 25);
/// One backend (pod 3), which injects an out-of-window segment.
pub(super) const GUARD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 26);
/// Also served on an external IP and a load balancer IP (backends on nodes 2 and 3).
pub(super) const OUTSIDE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 27);
pub(super) const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// externalTrafficPolicy Local, a LoadBalancer with endpoints on nodes 1 and 2: its NodePort
/// and health check port.
pub(super) const ETP_LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 28);
pub(super) const ETP_LOCAL_NODE_PORT: u16 = 30090;
pub(super) const ETP_LOCAL_HEALTH_PORT: u16 = 30091;
/// externalTrafficPolicy Local with endpoints on nodes 2 and 3 only.
pub(super) const ETP_ELSEWHERE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 29);
pub(super) const ETP_ELSEWHERE_NODE_PORT: u16 = 30092;
pub(super) const ETP_ELSEWHERE_HEALTH_PORT: u16 = 30093;
pub(super) const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub(super) const BACKEND_PORT: u16 = 8080;
pub const WEB_NODE_PORT: u16 = 30080;
pub const SELF_NODE_PORT: u16 = 30081;
pub const DNS_NODE_PORT: u16 = 30053;
/// Connections from outside to the web service's NodePort.
const NODE_PORT_CONNECTIONS: usize = 60;
pub(super) const DNS_PORT: u16 = 5353;
/// The second address of pod 2: a third "pod" of the web service.
pub const POD2_SECOND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
pub const CONNECTIONS: usize = 300;
const LONG_LIVED: usize = 30;
pub(super) const TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn pod(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i, 2)
}

pub(super) fn web_backends() -> Vec<Ipv4Addr> {
    vec![pod(2), POD2_SECOND, pod(3)]
}

/// The node a lab pod address lives on.
fn node_of(ip: Ipv4Addr) -> u8 {
    ip.octets()[2]
}

fn ready(ips: &[Ipv4Addr]) -> Vec<(Ipv4Addr, u8)> {
    ips.iter().map(|&ip| (ip, node_of(ip))).collect()
}

/// The lab's services as they start.
pub(super) fn catalogue() -> Vec<Service> {
    let tcp = |name, vip, eps: &[Ipv4Addr]| {
        Service::simple(name, vip, Proto::Tcp, 80, BACKEND_PORT, &ready(eps))
    };
    let with_node_port = |mut s: Service, np| {
        s.ports[0].node_port = Some(np);
        s
    };
    let two_ports = |name, vip, eps: &[Ipv4Addr]| Service {
        ports: vec![
            Port {
                name: "http",
                proto: Proto::Tcp,
                port: 80,
                target: BACKEND_PORT,
                node_port: None,
            },
            Port {
                name: "dns",
                proto: Proto::Udp,
                port: 53,
                target: DNS_PORT,
                node_port: None,
            },
        ],
        ..tcp(name, vip, eps)
    };
    vec![
        with_node_port(tcp("default/web", WEB_VIP, &web_backends()), WEB_NODE_PORT),
        with_node_port(
            Service::simple(
                "default/dns",
                DNS_VIP,
                Proto::Udp,
                53,
                DNS_PORT,
                &ready(&[pod(2), pod(3)]),
            ),
            DNS_NODE_PORT,
        ),
        with_node_port(tcp("default/self", SELF_VIP, &[pod(1)]), SELF_NODE_PORT),
        two_ports("default/empty", EMPTY_VIP, &[]),
        tcp("default/term", TERM_VIP, &[pod(2), pod(3)]),
        Service {
            internal_local: true,
            ..tcp("default/local", LOCAL_VIP, &[pod(1), pod(2)])
        },
        Service {
            internal_local: true,
            ..tcp("default/local-elsewhere", ELSEWHERE_VIP, &[pod(2), pod(3)])
        },
        Service {
            affinity_secs: Some(AFFINITY_SECS),
            ..tcp("default/sticky", STICKY_VIP, &web_backends())
        },
        two_ports("default/multi", MULTI_VIP, &[pod(2), pod(3)]),
        Service::simple(
            "default/cycle",
            CYCLE_VIP,
            Proto::Udp,
            53,
            DNS_PORT,
            &ready(&[pod(2)]),
        ),
        tcp("default/guard", GUARD_VIP, &[pod(3)]),
        Service {
            external_ips: vec![EXTERNAL_IP],
            lb_ips: vec![LB_IP],
            ..tcp("default/outside", OUTSIDE_VIP, &[pod(2), pod(3)])
        },
        Service {
            external_local: true,
            health_check_node_port: Some(ETP_LOCAL_HEALTH_PORT),
            ..with_node_port(
                tcp("default/etp-local", ETP_LOCAL_VIP, &[pod(1), pod(2)]),
                ETP_LOCAL_NODE_PORT,
            )
        },
        Service {
            external_local: true,
            health_check_node_port: Some(ETP_ELSEWHERE_HEALTH_PORT),
            ..with_node_port(
                tcp(
                    "default/etp-elsewhere",
                    ETP_ELSEWHERE_VIP,
                    &[pod(2), pod(3)],
                ),
                ETP_ELSEWHERE_NODE_PORT,
            )
        },
    ]
}

/// `services` with `name`'s endpoints replaced.
pub(super) fn with_endpoints(
    mut services: Vec<Service>,
    name: &str,
    eps: Vec<Endpoint>,
) -> Vec<Service> {
    for s in services.iter_mut().filter(|s| s.name == name) {
        s.endpoints = eps.clone();
    }
    services
}

/// Where the lab's services file lives.
pub fn file(dir: &Path) -> std::path::PathBuf {
    dir.join("services.json")
}

/// Where the nodes get the services from.
#[derive(Clone)]
pub enum Source {
    /// The services file every podwire node is given (`--services file:`).
    File,
    /// The lab's etcd, under `<prefix>/services/<namespace>/<name>`.
    Etcd(Arc<Mutex<Resources>>),
    /// The lab's Kubernetes API (`--store kube`): Services and EndpointSlices.
    Kube(Arc<Mutex<Resources>>),
    /// No podwire on node 1: kube-proxy's rules there, in this mode.
    KubeProxy(KubeProxyMode),
}

impl Source {
    fn kernel(&self) -> bool {
        matches!(self, Source::KubeProxy(_))
    }
}

/// Puts the services into the lab's etcd, one API record per key.
fn put_etcd(etcd: &EtcdServer, services: &[Service]) -> Result<()> {
    let prefix = podwire::etcd::DEFAULT_PREFIX;
    for svc in services {
        etcd.put(
            &format!("{prefix}/services/{}", svc.name),
            &svc.api_record().to_string(),
        )?;
    }
    Ok(())
}

/// Sets the services up before the nodes start (`etcd`, `kube`: the lab's servers, whose
/// lock the caller holds) and gives pod 2 its second address.
pub fn prepare(
    r: &Names,
    src: &Source,
    etcd: Option<&EtcdServer>,
    kube: Option<&podwire_apiserver_standin::Handle>,
) -> Result<()> {
    let services = catalogue();
    super::replace_file(&file(&r.dir), file_json(&services).to_string().as_bytes())?;
    match (src, etcd, kube) {
        (Source::Etcd(_), Some(etcd), _) => put_etcd(etcd, &services)?,
        (Source::Etcd(_), None, _) => bail!("services in etcd, but etcd is not running"),
        (Source::Kube(_), _, Some(api)) => super::kube_lab::put_services(api, &services)?,
        (Source::Kube(_), _, None) => {
            bail!("services in the Kubernetes API, but it is not running")
        }
        _ => {
            Applied::new(r, src).set(services)?;
        }
    }
    if let Source::KubeProxy(KubeProxyMode::Nftables) = src {
        // What kube-proxy does with --conntrack-tcp-be-liberal, which its docs ask of the
        // nftables mode in place of the iptables mode's INVALID drop.
        netns::exec_in(
            &r.ns("n1"),
            &[
                "sysctl",
                "-qw",
                "net.netfilter.nf_conntrack_tcp_be_liberal=1",
            ],
        )?;
    }
    if src.kernel() {
        // A node has a default route that the service range would follow if nothing
        // translated it; kube-proxy's rules act in PREROUTING and FORWARD around it.
        netns::ip_in(
            &r.ns("n1"),
            &["route", "replace", "10.96.0.0/12", "dev", "eth0"],
        )?;
    }
    netns::ip_in(
        &r.ns("p2"),
        &["addr", "add", &format!("{POD2_SECOND}/24"), "dev", "eth0"],
    )
}

/// The services as last applied, and where they go: the file podwire nodes re-read, the etcd
/// keys or Kubernetes objects they watch, or kube-proxy's rules on node 1 (`iptables-restore`,
/// as kube-proxy syncs them, then its conntrack cleanup).
pub(super) struct Applied {
    names: Names,
    src: Source,
    current: Vec<Service>,
}

impl Applied {
    pub(super) fn new(names: &Names, src: &Source) -> Self {
        Applied {
            names: names.clone(),
            src: src.clone(),
            current: Vec::new(),
        }
    }

    /// The endpoints `name` has now.
    pub(super) fn current_endpoints(&self, name: &str) -> Vec<Endpoint> {
        self.current
            .iter()
            .filter(|s| s.name == name)
            .flat_map(|s| s.endpoints.clone())
            .collect()
    }

    /// Applies `services` everywhere the source takes them; returns when the applying began,
    /// the new file's or ruleset's text rendered (what an update latency counts from).
    pub(super) fn set(&mut self, services: Vec<Service>) -> Result<Instant> {
        let r = &self.names;
        let text = file_json(&services).to_string();
        let rules = match self.src {
            Source::KubeProxy(mode) => Some((mode, kube_proxy_text(mode, &services))),
            _ => None,
        };
        let began = Instant::now();
        super::replace_file(&file(&r.dir), text.as_bytes())?;
        if let Source::Etcd(res) = &self.src {
            let guard = res.lock().expect("lab resources");
            put_etcd(
                guard.etcd.as_ref().context("etcd is not running")?,
                &services,
            )?;
        }
        if let Source::Kube(res) = &self.src {
            let guard = res.lock().expect("lab resources");
            let api = guard
                .kube
                .as_ref()
                .context("the Kubernetes API is not running")?;
            super::kube_lab::put_services(api, &services)?;
        }
        if let Some((mode, rules)) = rules {
            load_kube_proxy(&r.ns("n1"), &r.dir, mode, &rules)?;
            clear_stale_udp(&r.ns("n1"), &self.current, &services)?;
        }
        self.current = services;
        Ok(began)
    }
}

/// kube-proxy's rules for `services` on node 1, as its full sync writes them.
fn kube_proxy_text(mode: KubeProxyMode, services: &[Service]) -> String {
    match mode {
        KubeProxyMode::Iptables => kube_proxy_rules(services, 1),
        KubeProxyMode::Nftables => kube_proxy_nft_rules(services, 1),
    }
}

/// Gives node 1 kube-proxy's rules (`text`, from [`kube_proxy_text`]).
fn load_kube_proxy(ns: &str, dir: &Path, mode: KubeProxyMode, text: &str) -> Result<()> {
    let (file, cmd) = match mode {
        KubeProxyMode::Iptables => ("kube-proxy.rules", "iptables-restore"),
        KubeProxyMode::Nftables => ("kube-proxy.nft", "nft"),
    };
    let path = dir.join(file);
    std::fs::write(&path, text)?;
    let path = path.display().to_string();
    let args: Vec<&str> = match mode {
        KubeProxyMode::Iptables => vec![cmd, &path],
        KubeProxyMode::Nftables => vec![cmd, "-f", &path],
    };
    netns::exec_in(ns, &args).with_context(|| format!("loading kube-proxy's rules ({cmd})"))
}

/// kube-proxy's conntrack cleanup after a sync: UDP entries from a ClusterIP to an endpoint
/// the service no longer uses are deleted (`conntrack -D`), so the client's next datagram is
/// translated anew. (TCP entries are left alone.)
fn clear_stale_udp(ns: &str, before: &[Service], after: &[Service]) -> Result<()> {
    let usable = |s: &Service| match s.usable(1) {
        Usable::Endpoints(eps) => eps.into_iter().map(|e| e.ip).collect(),
        _ => Vec::new(),
    };
    for old in before {
        if !old.ports.iter().any(|p| p.proto == Proto::Udp) {
            continue;
        }
        let now: Vec<Ipv4Addr> = after
            .iter()
            .find(|s| s.name == old.name)
            .map(usable)
            .unwrap_or_default();
        for gone in usable(old).into_iter().filter(|ip| !now.contains(ip)) {
            let (vip, gone) = (old.vip.to_string(), gone.to_string());
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "conntrack", "-D", "-p", "udp"])
                .args(["--orig-dst", &vip, "--dst-nat", &gone])
                .output()
                .context("running conntrack (Debian's conntrack package)")?;
            let said = String::from_utf8_lossy(&out.stderr);
            // conntrack exits 1 when nothing matched, which is fine.
            if !out.status.success() && !said.contains("0 flow entries") {
                bail!("conntrack -D for {vip} -> {gone}: {said}");
            }
        }
    }
    Ok(())
}

/// A backend's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Answer {
    pub served_on: Ipv4Addr,
    pub peer: SocketAddrV4,
    digest: [u8; 32],
}

/// Serves requests (u32 length + bytes) on `addr` until `stop`, one thread per connection.
fn serve_tcp(addr: SocketAddrV4, stop: Arc<AtomicBool>) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, peer)) => {
                let std::net::SocketAddr::V4(peer) = peer else {
                    continue;
                };
                std::thread::spawn(move || answer_requests(s, *addr.ip(), peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn answer_requests(mut s: TcpStream, served_on: Ipv4Addr, peer: SocketAddrV4) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return Ok(());
        }
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut buf)?;
        let mut out = Vec::with_capacity(42);
        out.extend_from_slice(&served_on.octets());
        out.extend_from_slice(&peer.ip().octets());
        out.extend_from_slice(&peer.port().to_be_bytes());
        out.extend_from_slice(&Sha256::digest(&buf));
        s.write_all(&out)?;
    }
}

/// Sends one request of `size` seeded bytes; checks the digest that comes back.
pub(super) fn request(s: &mut TcpStream, size: usize, seed: u64) -> Result<Answer> {
    let mut buf = vec![0u8; size];
    Pattern::new(seed).fill(&mut buf);
    s.write_all(&(size as u32).to_be_bytes())?;
    s.write_all(&buf)?;
    let mut ans = [0u8; 42];
    s.read_exact(&mut ans)?;
    let a = Answer {
        served_on: Ipv4Addr::new(ans[0], ans[1], ans[2], ans[3]),
        peer: SocketAddrV4::new(
            Ipv4Addr::new(ans[4], ans[5], ans[6], ans[7]),
            u16::from_be_bytes([ans[8], ans[9]]),
        ),
        digest: ans[10..].try_into().expect("32 bytes"),
    };
    if a.digest[..] != Sha256::digest(&buf)[..] {
        bail!("content damaged on the way to {}", a.served_on);
    }
    Ok(a)
}

/// Opens `n` connections from pod 1 to `vip`:80 and makes one 512-byte request on each
/// (seeds from `first_seed`): the open connections and the backend each was served by.
pub(super) fn hold_connections(
    r: &Names,
    vip: Ipv4Addr,
    n: usize,
    first_seed: u64,
) -> Result<Vec<(TcpStream, Ipv4Addr)>> {
    netns::run_in(&r.ns("p1"), move || {
        (0..n as u64)
            .map(|i| {
                let mut s = connect(vip)?;
                let a = request(&mut s, 512, first_seed + i)?;
                Ok((s, a.served_on))
            })
            .collect()
    })
}

pub(super) fn connect(vip: Ipv4Addr) -> Result<TcpStream> {
    connect_to(SocketAddrV4::new(vip, 80))
}

pub(super) fn connect_to(addr: SocketAddrV4) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr.into(), TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(s)
}

fn serve_udp(addr: SocketAddrV4, stop: Arc<AtomicBool>) -> Result<()> {
    let sock = UdpSocket::bind(addr)?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut out = addr.ip().octets().to_vec();
            out.extend_from_slice(&buf[..n]);
            sock.send_to(&out, from)?;
        }
    }
    Ok(())
}

/// The TCP backends every service uses: pods 1-3 and pod 2's second address, port 8080,
/// until `stop`.
pub(super) fn start_tcp_servers(
    r: &Names,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Result<()>>> {
    [(2, pod(2)), (2, POD2_SECOND), (3, pod(3)), (1, pod(1))]
        .into_iter()
        .map(|(node, ip)| {
            let stop = stop.clone();
            netns::spawn_in(&r.ns(&format!("p{node}")), move || {
                serve_tcp(SocketAddrV4::new(ip, BACKEND_PORT), stop)
            })
        })
        .collect()
}

/// Figures the service checks produce.
#[derive(Debug, Default)]
pub struct Figures {
    pub connections_per_s: f64,
    pub spread: BTreeMap<String, usize>,
    /// Packets the outside host sent to the external and load balancer IPs, which node 1's
    /// kernel forwards into the TUN (the only TUN traffic of a node whose pods use AF_XDP).
    pub outside_packets: u64,
}

/// Where node 1 serves NodePorts to the outside host, and what it is seen as by backends.
#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    /// Node 1's address on the underlay.
    pub node: Ipv4Addr,
    /// Node 1's address in the cluster network: remote backends see NodePort clients as it.
    pub cluster_addr: Ipv4Addr,
    /// The outside host's netns name suffix (`x`).
    pub outside: &'static str,
    /// The outside host's address.
    pub outside_ip: Ipv4Addr,
    /// Node 1 steers its pods' answers to outside into podwire (`--ip-masq`), so
    /// externalTrafficPolicy Local keeps the client's address (else the hairpin address).
    pub clients_kept: bool,
    /// Node 1 answers the health check node ports (podwire; kube-proxy's Go server is not
    /// part of the kernel baseline).
    pub health_server: bool,
}

/// Runs the checks; `hairpin_ip` is what a pod calling itself through a service is seen as;
/// `kernel`: node 1 is kube-proxy's iptables rules, not podwire. With `node_ports`, the
/// NodePorts are checked from outside the cluster too.
pub fn checks(
    r: &Names,
    hairpin_ip: Ipv4Addr,
    src: &Source,
    node_ports: Option<NodePorts>,
) -> Result<(Vec<Check>, Figures)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut servers = start_tcp_servers(r, &stop);
    for node in [2u8, 3] {
        let stop = stop.clone();
        servers.push(netns::spawn_in(&r.ns(&format!("p{node}")), move || {
            serve_udp(SocketAddrV4::new(pod(node), DNS_PORT), stop)
        }));
    }
    std::thread::sleep(Duration::from_millis(200));
    let outcome = run_checks(r, hairpin_ip, src, node_ports);
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        netns::join(s).context("a backend server failed")?;
    }
    outcome
}

fn run_checks(
    r: &Names,
    hairpin_ip: Ipv4Addr,
    src: &Source,
    node_ports: Option<NodePorts>,
) -> Result<(Vec<Check>, Figures)> {
    let mut figures = Figures::default();
    let client = r.ns("p1");
    let mut checks = cluster_ip_tcp_checks(&client, &mut figures);
    checks.push(cluster_ip_udp_check(&client));
    checks.push(hairpin_check(&client, hairpin_ip));
    checks.push(no_endpoints_check(&client));
    if let Some(np) = node_ports {
        checks.extend(node_port_checks(r, hairpin_ip, np));
    }
    let mut applied = Applied {
        current: catalogue(),
        ..Applied::new(r, src)
    };
    let drops_invalid = matches!(src, Source::KubeProxy(KubeProxyMode::Iptables));
    let (behaviours, outside_packets) =
        super::service_behaviours::checks(r, &mut applied, drops_invalid);
    checks.extend(behaviours);
    figures.outside_packets = outside_packets;
    checks.push(removal_check(r, &mut applied)?);
    Ok((checks, figures))
}

/// 300 connections through the ClusterIP from `client`: intact, seen from the client, spread
/// over the backends.
fn cluster_ip_tcp_checks(client: &str, figures: &mut Figures) -> Vec<Check> {
    let mut checks = Vec::new();
    let (answers, elapsed) = netns::run_in(client, || {
        let started = Instant::now();
        let mut answers = Vec::new();
        for i in 0..CONNECTIONS {
            let mut s = connect(WEB_VIP)?;
            let peer = s.peer_addr()?;
            if peer != SocketAddrV4::new(WEB_VIP, 80).into() {
                bail!("connection {i} is to {peer}, not the ClusterIP");
            }
            answers.push(request(&mut s, 4096 + i, i as u64)?);
        }
        Ok((answers, started.elapsed()))
    })
    .map_or_else(
        |e| (Err(e), Duration::ZERO),
        |(a, d)| (Ok::<_, anyhow::Error>(a), d),
    );
    match answers {
        Ok(answers) => {
            figures.connections_per_s = CONNECTIONS as f64 / elapsed.as_secs_f64();
            for a in &answers {
                *figures.spread.entry(a.served_on.to_string()).or_default() += 1;
            }
            let seen_client = answers.iter().all(|a| *a.peer.ip() == pod(1));
            checks.push(Check {
                name: format!("{CONNECTIONS} TCP connections to a ClusterIP, content intact, backends see the client"),
                ok: seen_client && answers.len() == CONNECTIONS,
                detail: format!("{:.0} connections/s", figures.connections_per_s),
            });
            // Maglev gives each of 3 backends a third of its table; over 300 flows the count
            // of each is binomial(300, 1/3): 100 +- 8, so 60..140 is five deviations.
            let even = web_backends()
                .iter()
                .all(|b| (60..=140).contains(figures.spread.get(&b.to_string()).unwrap_or(&0)));
            checks.push(Check {
                name: "connections spread over the 3 backends on 2 nodes (each 100 +- 40)".into(),
                ok: even,
                detail: format!("{:?}", figures.spread),
            });
        }
        Err(e) => checks.push(Check {
            name: format!("{CONNECTIONS} TCP connections to a ClusterIP"),
            ok: false,
            detail: format!("{e:#}"),
        }),
    }
    checks
}

/// What `cluster_ip_udp_check` received.
#[derive(Default)]
struct UdpTally {
    /// Requests answered, from the ClusterIP, with their own sequence number.
    answered: u32,
    /// Datagrams from any other source.
    not_from_vip: u32,
    /// Answers that came while another request waited (duplicates, late): their sequence
    /// numbers, or their size when too short to hold one.
    others: Vec<String>,
}

/// UDP request/response through a ClusterIP: answers come from the ClusterIP, each once. Each
/// request waits for its own answer, as a DNS client matches its query's ID; an answer to
/// another request (a duplicate, or one later than 500 ms) fails the check with its number.
fn cluster_ip_udp_check(client: &str) -> Check {
    let udp = netns::run_in(client, || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        let mut tally = UdpTally::default();
        let mut buf = [0u8; 2048];
        for i in 0..50u32 {
            sock.send_to(&i.to_be_bytes(), SocketAddrV4::new(DNS_VIP, 53))?;
            let deadline = Instant::now() + Duration::from_millis(500);
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    break;
                };
                if from != SocketAddrV4::new(DNS_VIP, 53).into() {
                    tally.not_from_vip += 1;
                } else if n == 8 && buf[4..8] == i.to_be_bytes() {
                    tally.answered += 1;
                    break;
                } else if n >= 8 {
                    let seq = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    tally.others.push(seq.to_string());
                } else {
                    tally.others.push(format!("a {n}-byte datagram"));
                }
            }
        }
        Ok(tally)
    });
    match udp {
        Ok(t) => Check {
            name: "UDP request/response through a ClusterIP, answered from the ClusterIP".into(),
            ok: t.answered >= 49 && t.not_from_vip == 0 && t.others.is_empty(),
            detail: format!(
                "{} of 50 answered from {DNS_VIP}:53, {} from elsewhere; answers to other requests: {:?}",
                t.answered, t.not_from_vip, t.others
            ),
        },
        Err(e) => Check {
            name: "UDP request/response through a ClusterIP".into(),
            ok: false,
            detail: format!("{e:#}"),
        },
    }
}

/// A pod calling a service it backs itself.
fn hairpin_check(client: &str, hairpin_ip: Ipv4Addr) -> Check {
    let hairpin = netns::run_in(client, || {
        let mut s = connect(SELF_VIP)?;
        request(&mut s, 1000, 7)
    });
    match hairpin {
        Ok(a) => Check {
            name: "a pod calling a Service it backs is answered (hairpin)".into(),
            ok: a.served_on == pod(1) && *a.peer.ip() == hairpin_ip,
            detail: format!("served by {}, which saw {}", a.served_on, a.peer),
        },
        Err(e) => Check {
            name: "a pod calling a Service it backs is answered (hairpin)".into(),
            ok: false,
            detail: format!("{e:#}"),
        },
    }
}

/// A service without endpoints refuses at once (ICMP port unreachable from the ClusterIP).
fn no_endpoints_check(client: &str) -> Check {
    let refused = netns::run_in(client, || {
        // A blocking connect bounded by SO_SNDTIMEO: it returns the socket's error itself.
        // (std's connect_timeout polls, and a POLLHUP can win the race against the error being
        // set: "no error set after POLLHUP".)
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.set_write_timeout(Some(TIMEOUT))?;
        let t = Instant::now();
        let r = sock.connect(&SocketAddrV4::new(EMPTY_VIP, 80).into());
        Ok((r.map_err(|e| (e.kind(), e.raw_os_error())), t.elapsed()))
    });
    match refused {
        Ok((r, took)) => Check {
            name: "a service without endpoints refuses connections".into(),
            ok: matches!(r, Err((std::io::ErrorKind::ConnectionRefused, _)))
                && took < Duration::from_secs(2),
            detail: format!("{r:?} after {took:?}"),
        },
        Err(e) => Check {
            name: "a service without endpoints refuses connections".into(),
            ok: false,
            detail: format!("{e:#}"),
        },
    }
}

/// From the outside host: the web service's NodePort (backends on nodes 2 and 3, which must
/// see node 1's cluster address), the self service's (a backend on node 1, which sees the
/// hairpin address), and the dns service's over UDP (answered from the NodePort).
fn node_port_checks(r: &Names, hairpin_ip: Ipv4Addr, np: NodePorts) -> Vec<Check> {
    let outside = r.ns(np.outside);
    let mut checks = Vec::new();
    let web = netns::run_in(&outside, move || {
        let mut answers = Vec::new();
        for i in 0..NODE_PORT_CONNECTIONS {
            let mut s = connect_to(SocketAddrV4::new(np.node, WEB_NODE_PORT))?;
            answers.push(request(&mut s, 20_000 + 97 * i, 1000 + i as u64)?);
        }
        Ok(answers)
    });
    let name = format!(
        "{NODE_PORT_CONNECTIONS} TCP connections from outside to node 1's NodePort {WEB_NODE_PORT}, \
         content intact, remote backends see node 1's cluster address"
    );
    checks.push(match web {
        Ok(answers) => {
            let mut spread = BTreeMap::<Ipv4Addr, usize>::new();
            for a in &answers {
                *spread.entry(a.served_on).or_default() += 1;
            }
            let seen_node = answers.iter().all(|a| *a.peer.ip() == np.cluster_addr);
            let backends = web_backends();
            Check {
                name,
                ok: seen_node && spread.len() >= 2 && spread.keys().all(|b| backends.contains(b)),
                detail: format!(
                    "served by {spread:?}; backends saw {:?}",
                    answers
                        .iter()
                        .map(|a| *a.peer.ip())
                        .collect::<std::collections::BTreeSet<_>>()
                ),
            }
        }
        Err(e) => Check {
            name,
            ok: false,
            detail: format!("{e:#}"),
        },
    });
    let local = netns::run_in(&outside, move || {
        let mut s = connect_to(SocketAddrV4::new(np.node, SELF_NODE_PORT))?;
        request(&mut s, 100_000, 77)
    });
    let name = format!("a NodePort ({SELF_NODE_PORT}) whose backend is on node 1 itself");
    checks.push(match local {
        Ok(a) => Check {
            name,
            ok: a.served_on == pod(1) && *a.peer.ip() == hairpin_ip,
            detail: format!("served by {}, which saw {}", a.served_on, a.peer),
        },
        Err(e) => Check {
            name,
            ok: false,
            detail: format!("{e:#}"),
        },
    });
    let udp = netns::run_in(&outside, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let to = SocketAddrV4::new(np.node, DNS_NODE_PORT);
        let (mut ok, mut from_node) = (0, 0);
        let mut buf = [0u8; 2048];
        for i in 0..50u32 {
            sock.send_to(&i.to_be_bytes(), to)?;
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                if n == 8 && buf[4..8] == i.to_be_bytes() {
                    ok += 1;
                }
                if from == to.into() {
                    from_node += 1;
                }
            }
        }
        Ok((ok, from_node))
    });
    let name = format!("UDP from outside to NodePort {DNS_NODE_PORT}, answered from it");
    checks.push(match udp {
        Ok((ok, from_node)) => Check {
            name,
            ok: ok >= 49 && from_node == ok,
            detail: format!("{ok} of 50 answered, {from_node} from node 1"),
        },
        Err(e) => Check {
            name,
            ok: false,
            detail: format!("{e:#}"),
        },
    });
    checks.extend(super::external_policy::checks(r, hairpin_ip, np));
    checks
}

/// Long-lived connections, then a backend leaves the service: with podwire its connections
/// fail at their next request, reset by podwire (not left to time out), every other one
/// carries on. kube-proxy leaves established TCP
/// connections' conntrack entries alone, so there they all carry on (the removed pod still
/// runs here): the check states which behaviour it expects.
fn removal_check(r: &Names, applied: &mut Applied) -> Result<Check> {
    let is_reset = |e: &anyhow::Error| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
    };
    let kernel = applied.src.kernel();
    let name = if kernel {
        "a backend removed mid-run: kube-proxy keeps its established connections"
    } else {
        "a backend removed mid-run loses only its own connections, each reset at its next request"
    };
    let conns = hold_connections(r, WEB_VIP, LONG_LIVED, 1000);
    let outcome = conns.and_then(|mut conns| {
        let gone = POD2_SECOND;
        let rest: Vec<Ipv4Addr> = web_backends().into_iter().filter(|b| *b != gone).collect();
        let eps = ready(&rest)
            .into_iter()
            .map(|(ip, n)| Endpoint::ready(ip, n))
            .collect();
        applied.set(with_endpoints(catalogue(), "default/web", eps))?;
        // The control loop re-reads the file within a tick (100 ms).
        std::thread::sleep(Duration::from_millis(600));
        let (mut lost_right, mut lost_wrong, mut kept, mut on_gone) = (0, 0, 0, 0);
        for (i, (s, was)) in conns.iter_mut().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let r = request(s, 512, 2000 + i as u64);
            match (r, *was == gone && !kernel) {
                (Ok(a), false) if a.served_on == *was => kept += 1,
                (Ok(_), _) => lost_wrong += 1,
                (Err(e), true) if is_reset(&e) => lost_right += 1,
                (Err(_), _) => lost_wrong += 1,
            }
            on_gone += usize::from(*was == gone);
        }
        applied.set(catalogue())?;
        Ok((lost_right, lost_wrong, kept, on_gone))
    });
    Ok(match outcome {
        Ok((lost_right, lost_wrong, kept, on_gone)) if kernel => Check {
            name: name.into(),
            ok: on_gone > 0 && lost_wrong == 0 && kept == LONG_LIVED,
            detail: format!("{on_gone} of {LONG_LIVED} were on {POD2_SECOND}: {kept} carried on, {lost_right} failed, {lost_wrong} went wrong"),
        },
        Ok((lost_right, lost_wrong, kept, on_gone)) => Check {
            name: name.into(),
            ok: on_gone > 0 && lost_right == on_gone && lost_wrong == 0 && kept == LONG_LIVED - on_gone,
            detail: format!("{on_gone} of {LONG_LIVED} were on {POD2_SECOND}: {lost_right} failed as they should, {kept} others carried on, {lost_wrong} went wrong"),
        },
        Err(e) => Check {
            name: name.into(),
            ok: false,
            detail: format!("{e:#}"),
        },
    })
}
