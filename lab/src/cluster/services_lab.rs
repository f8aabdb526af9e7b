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

use super::netns;
use super::traffic::Pattern;
use super::{Check, Names, Resources};
use crate::etcd_server::EtcdServer;
use anyhow::{bail, Context, Result};
use serde_json::json;
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
const BACKEND_PORT: u16 = 8080;
pub const WEB_NODE_PORT: u16 = 30080;
pub const SELF_NODE_PORT: u16 = 30081;
pub const DNS_NODE_PORT: u16 = 30053;
/// Connections from outside to the web service's NodePort.
const NODE_PORT_CONNECTIONS: usize = 60;
const DNS_PORT: u16 = 5353;
/// The second address of pod 2: a third "pod" of the web service.
pub const POD2_SECOND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
pub const CONNECTIONS: usize = 300;
const LONG_LIVED: usize = 30;
const TIMEOUT: Duration = Duration::from_secs(10);

fn pod(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i, 2)
}

fn web_backends() -> Vec<Ipv4Addr> {
    vec![pod(2), POD2_SECOND, pod(3)]
}

fn services_json(web: &[Ipv4Addr]) -> serde_json::Value {
    let eps = |ips: &[Ipv4Addr], port: u16| -> Vec<serde_json::Value> {
        ips.iter()
            .map(|ip| json!({"ip": ip.to_string(), "port": port}))
            .collect()
    };
    json!({"services": [
        {"name": "default/web", "clusterIP": WEB_VIP.to_string(), "protocol": "TCP", "port": 80,
         "endpoints": eps(web, BACKEND_PORT), "nodePort": WEB_NODE_PORT},
        {"name": "default/dns", "clusterIP": DNS_VIP.to_string(), "protocol": "UDP", "port": 53,
         "endpoints": eps(&[pod(2), pod(3)], DNS_PORT), "nodePort": DNS_NODE_PORT},
        {"name": "default/self", "clusterIP": SELF_VIP.to_string(), "protocol": "TCP", "port": 80,
         "endpoints": eps(&[pod(1)], BACKEND_PORT), "nodePort": SELF_NODE_PORT},
        {"name": "default/empty", "clusterIP": EMPTY_VIP.to_string(), "protocol": "TCP", "port": 80,
         "endpoints": []},
    ]})
}

/// Where the lab's services file lives.
pub fn file(dir: &Path) -> std::path::PathBuf {
    dir.join("services.json")
}

fn write(dir: &Path, web: &[Ipv4Addr]) -> Result<()> {
    super::replace_file(&file(dir), services_json(web).to_string().as_bytes())
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
    /// No podwire on node 1: kube-proxy's iptables rules there.
    KubeProxy,
}

impl Source {
    fn kernel(&self) -> bool {
        matches!(self, Source::KubeProxy)
    }
}

/// Puts the services into the lab's etcd, one object per key.
fn put_etcd(etcd: &EtcdServer, web: &[Ipv4Addr]) -> Result<()> {
    let prefix = podwire::etcd::DEFAULT_PREFIX;
    for svc in services_json(web)["services"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = svc["name"].as_str().unwrap_or_default();
        etcd.put(&format!("{prefix}/services/{name}"), &svc.to_string())?;
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
    match (src, etcd, kube) {
        (Source::Etcd(_), Some(etcd), _) => put_etcd(etcd, &web_backends())?,
        (Source::Etcd(_), None, _) => bail!("services in etcd, but etcd is not running"),
        (Source::Kube(_), _, Some(api)) => {
            super::kube_lab::put_services(api, &services_json(&web_backends()))?
        }
        (Source::Kube(_), _, None) => {
            bail!("services in the Kubernetes API, but it is not running")
        }
        _ => apply(r, &web_backends(), src)?,
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

/// The services with `web` as the web service's backends: the file podwire nodes re-read,
/// the etcd keys they watch, or kube-proxy's iptables rules on node 1 (`iptables-restore`, as
/// kube-proxy syncs them).
fn apply(r: &Names, web: &[Ipv4Addr], src: &Source) -> Result<()> {
    write(&r.dir, web)?;
    if let Source::Etcd(res) = src {
        let guard = res.lock().expect("lab resources");
        put_etcd(guard.etcd.as_ref().context("etcd is not running")?, web)?;
    }
    if let Source::Kube(res) = src {
        let guard = res.lock().expect("lab resources");
        let api = guard
            .kube
            .as_ref()
            .context("the Kubernetes API is not running")?;
        super::kube_lab::put_services(api, &services_json(web))?;
    }
    if src.kernel() {
        let rules = r.dir.join("kube-proxy.rules");
        std::fs::write(&rules, kube_proxy_rules(&services_json(web)))?;
        netns::exec_in(
            &r.ns("n1"),
            &["iptables-restore", &rules.display().to_string()],
        )
        .context("loading kube-proxy's rules (iptables-restore)")?;
    }
    Ok(())
}

/// kube-proxy's iptables-mode rules for `services` (pkg/proxy/iptables/proxier.go): nat
/// KUBE-SERVICES -> KUBE-SVC-* (endpoint i of n with probability 1/(n-i), the last
/// unconditional) -> KUBE-SEP-* (hairpin marked for masquerade, then DNAT), KUBE-POSTROUTING
/// masquerading marked packets; a service without endpoints REJECTed in filter.
fn kube_proxy_rules(services: &serde_json::Value) -> String {
    let mut nat = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
         -A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    let mut filter = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
         -A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES\n",
    );
    let mut chains = String::new();
    let mut rules = String::new();
    for (s, svc) in services["services"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let vip = svc["clusterIP"].as_str().unwrap_or_default();
        let port = svc["port"].as_u64().unwrap_or_default();
        let proto = svc["protocol"].as_str().unwrap_or("TCP").to_lowercase();
        let eps = svc["endpoints"].as_array().cloned().unwrap_or_default();
        if eps.is_empty() {
            filter.push_str(&format!(
                "-A KUBE-SERVICES -d {vip}/32 -p {proto} -m {proto} --dport {port} -j REJECT --reject-with icmp-port-unreachable\n"
            ));
            continue;
        }
        let svc_chain = format!("KUBE-SVC-{s}");
        chains.push_str(&format!(":{svc_chain} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {vip}/32 -p {proto} -m {proto} --dport {port} -j {svc_chain}\n"
        ));
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let ip = ep["ip"].as_str().unwrap_or_default();
            let ep_port = ep["port"].as_u64().unwrap_or_default();
            let sep = format!("KUBE-SEP-{s}-{i}");
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            if i + 1 < n {
                rules.push_str(&format!(
                    "-A {svc_chain} -m statistic --mode random --probability {:.10} -j {sep}\n",
                    1.0 / (n - i) as f64
                ));
            } else {
                rules.push_str(&format!("-A {svc_chain} -j {sep}\n"));
            }
            rules.push_str(&format!(
                "-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ\n-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {ip}:{ep_port}\n"
            ));
        }
    }
    nat.push_str(&chains);
    nat.push_str(&rules);
    nat.push_str("COMMIT\n");
    filter.push_str("COMMIT\n");
    nat + &filter
}

/// A backend's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    served_on: Ipv4Addr,
    peer: SocketAddrV4,
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
fn request(s: &mut TcpStream, size: usize, seed: u64) -> Result<Answer> {
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

fn connect(vip: Ipv4Addr) -> Result<TcpStream> {
    connect_to(SocketAddrV4::new(vip, 80))
}

fn connect_to(addr: SocketAddrV4) -> Result<TcpStream> {
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

/// Figures the service checks produce.
#[derive(Debug, Default)]
pub struct Figures {
    pub connections_per_s: f64,
    pub spread: BTreeMap<String, usize>,
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
    let mut servers = Vec::new();
    for (node, ip) in [(2, pod(2)), (2, POD2_SECOND), (3, pod(3)), (1, pod(1))] {
        let stop = stop.clone();
        servers.push(netns::spawn_in(&r.ns(&format!("p{node}")), move || {
            serve_tcp(SocketAddrV4::new(ip, BACKEND_PORT), stop)
        }));
    }
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
    checks.push(removal_check(r, src)?);
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

/// UDP request/response through a ClusterIP: answers come from the ClusterIP.
fn cluster_ip_udp_check(client: &str) -> Check {
    let udp = netns::run_in(client, || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let (mut ok, mut from_vip) = (0, 0);
        let mut buf = [0u8; 2048];
        for i in 0..50u32 {
            sock.send_to(&i.to_be_bytes(), SocketAddrV4::new(DNS_VIP, 53))?;
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                if n == 8 && buf[4..8] == i.to_be_bytes() {
                    ok += 1;
                }
                if from == SocketAddrV4::new(DNS_VIP, 53).into() {
                    from_vip += 1;
                }
            }
        }
        Ok((ok, from_vip))
    });
    match udp {
        Ok((ok, from_vip)) => Check {
            name: "UDP request/response through a ClusterIP, answered from the ClusterIP".into(),
            ok: ok >= 49 && from_vip == ok,
            detail: format!("{ok} of 50 answered, {from_vip} from {DNS_VIP}:53"),
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
    checks
}

/// Long-lived connections, then a backend leaves the service: with podwire its connections
/// fail (dropped, then reset), every other one carries on. kube-proxy leaves established TCP
/// connections' conntrack entries alone, so there they all carry on (the removed pod still
/// runs here): the check states which behaviour it expects.
fn removal_check(r: &Names, src: &Source) -> Result<Check> {
    let kernel = src.kernel();
    let src = src.clone();
    let name = if kernel {
        "a backend removed mid-run: kube-proxy keeps its established connections"
    } else {
        "a backend removed mid-run loses only its own connections"
    };
    let names = r.clone();
    let outcome = netns::run_in(&r.ns("p1"), move || {
        let mut conns = Vec::new();
        for i in 0..LONG_LIVED {
            let mut s = connect(WEB_VIP)?;
            let a = request(&mut s, 512, 1000 + i as u64)?;
            conns.push((s, a.served_on));
        }
        let gone = POD2_SECOND;
        let rest: Vec<Ipv4Addr> = web_backends().into_iter().filter(|b| *b != gone).collect();
        apply(&names, &rest, &src)?;
        // The control loop re-reads the file within a tick (100 ms).
        std::thread::sleep(Duration::from_millis(600));
        let (mut lost_right, mut lost_wrong, mut kept, mut on_gone) = (0, 0, 0, 0);
        for (i, (s, was)) in conns.iter_mut().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let r = request(s, 512, 2000 + i as u64);
            match (r, *was == gone && !kernel) {
                (Ok(a), false) if a.served_on == *was => kept += 1,
                (Ok(_), _) => lost_wrong += 1,
                (Err(_), true) => lost_right += 1,
                (Err(_), false) => lost_wrong += 1,
            }
            on_gone += usize::from(*was == gone);
        }
        apply(&names, &web_backends(), &src)?;
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
