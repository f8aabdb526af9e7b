//! `podwire-lab lab --store etcd`: the cluster joins through a real etcd (Debian's etcd-server)
//! that the lab starts in the underlay namespace, on br0's address 192.168.99.2, as a cluster's
//! etcd would sit on the node network.
//!
//! The lab writes only what an operator and flanneld nodes would write: the network config,
//! the kernel VXLAN nodes' leases (in flanneld's form), optional extra leases of nodes that do
//! not exist (to load the map), and each podwire node's previous subnet.env (as a restarted
//! node has one), so pods keep the lab's addressing while every podwire node still takes its
//! lease from etcd with a conditional create. Then it checks what only a live store can show:
//! a deleted lease retaken, a node leaving, an etcd outage under traffic, a node rejoining.

use super::{netns, pod_ip, traffic, underlay_ip, Check, LabOptions, Names, Resources};
use crate::etcd_server::EtcdServer;
use anyhow::{bail, Context, Result};
use podwire::etcd::{EtcdOptions, EtcdStore};
use podwire::subnet_env::SubnetEnv;
use podwire_dataplane::route::Ipv4Net;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 2);
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// Where every podwire node serves /healthz, /readyz and /metrics (on its underlay address).
pub const HEALTHZ_PORT: u16 = 9101;
const PREFIX: &str = podwire::etcd::DEFAULT_PREFIX;
const LEASE_TTL: Duration = Duration::from_secs(86400);
/// Latency samples use subnets 10.244.150.0/24 and up, one each.
pub const MAX_LATENCY_SAMPLES: usize = 100;

pub fn endpoint() -> String {
    format!("http://{ETCD_IP}:{CLIENT_PORT}")
}

fn lease_key(subnet: &str) -> String {
    format!("{PREFIX}/subnets/{subnet}")
}

/// Runs `f` with an etcd client inside the underlay namespace (where etcd is reachable).
fn with_store<T: Send + 'static>(
    names: &Names,
    f: impl FnOnce(&mut EtcdStore) -> Result<T> + Send + 'static,
) -> Result<T> {
    netns::run_in(&names.ns("u"), move || {
        let mut store = EtcdStore::new(EtcdOptions {
            endpoints: vec![endpoint()],
            timeout: Duration::from_secs(3),
            ..Default::default()
        })?;
        f(&mut store)
    })
}

/// The key `n`-th extra lease lives under, and its value (a node that does not exist).
fn extra_lease(n: usize, vxlan: bool) -> (String, String) {
    let subnet = format!("10.{}.{}.0-24", 100 + n / 256, n % 256);
    let ip = Ipv4Addr::new(10, 98, (n / 250) as u8, (n % 250) as u8 + 1);
    let value = if vxlan {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:70:0a:62:{:02x}:{:02x}"}}}}"#,
            n / 256,
            n % 256
        )
    } else {
        format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#)
    };
    (lease_key(&subnet), value)
}

/// Timings of the start-up through etcd.
#[derive(Debug, Clone, Default)]
pub struct StartFigures {
    pub etcd_ready: Duration,
    pub preload: Duration,
}

/// Starts etcd in the underlay namespace and writes the config, the kernel nodes' leases and
/// `opts.extra_leases` leases of absent nodes.
pub fn start(res: &mut Resources, opts: &LabOptions) -> Result<StartFigures> {
    let started = Instant::now();
    let server = EtcdServer::start(
        Some(&res.ns("u")),
        ETCD_IP,
        CLIENT_PORT,
        PEER_PORT,
        &res.names.dir.join("etcd"),
    )?;
    res.etcd = Some(server);
    let etcd_ready = started.elapsed();
    let cluster = super::cluster_file(opts);
    let config_only = vec![(
        format!("{PREFIX}/config"),
        serde_json::to_string(&cluster["config"])?,
    )];
    let mut leased = Vec::new();
    for i in (1..=opts.nodes).filter(|&i| opts.is_kernel_node(i)) {
        let key = format!("10.244.{i}.0-24");
        leased.push((
            lease_key(&key),
            serde_json::to_string(&cluster["subnets"][&key])?,
        ));
    }
    leased.extend((0..opts.extra_leases).map(|n| extra_lease(n, opts.vxlan())));
    let t = Instant::now();
    with_store(&res.names, move |s| {
        s.put_many(&config_only, None)?;
        s.put_many(&leased, Some(LEASE_TTL))?;
        Ok(())
    })
    .context("writing the network config and leases to etcd")?;
    Ok(StartFigures {
        etcd_ready,
        preload: t.elapsed(),
    })
}

/// Gives node `i` the subnet.env a previous run would have left: it asks for 10.244.i.0/24.
pub fn seed_subnet_env(names: &Names, opts: &LabOptions, i: usize) -> Result<()> {
    let path = names.dir.join(format!("n{i}/subnet.env"));
    SubnetEnv {
        network: super::network(opts).parse()?,
        subnet: Ipv4Net::containing(Ipv4Addr::new(10, 244, i as u8, 0), 24),
        mtu: opts.pod_mtu() as u32,
        ip_masq: false,
    }
    .write(&path)
    .with_context(|| format!("writing {}", path.display()))
}

/// One HTTP/1.0 GET from the calling thread's namespace: (status, body).
fn http_get_here(addr: SocketAddrV4, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

fn healthz_addr(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(underlay_ip(i), HEALTHZ_PORT)
}

/// True once node `i` answers /readyz with 200.
pub fn ready(names: &Names, i: usize) -> bool {
    netns::run_in(&names.ns("u"), move || {
        http_get_here(healthz_addr(i), "/readyz")
    })
    .is_ok_and(|(code, _)| code == 200)
}

/// An unlabelled sample of node `i`'s /metrics.
fn metric_here(i: usize, name: &str) -> Option<f64> {
    let (_, body) = http_get_here(healthz_addr(i), "/metrics").ok()?;
    body.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

pub fn metric(names: &Names, i: usize, name: &'static str) -> Option<f64> {
    netns::run_in(&names.ns("u"), move || Ok(metric_here(i, name)))
        .ok()
        .flatten()
}

/// Polls `probe` for up to `limit` until it returns true.
pub(super) fn within(limit: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if probe() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

pub(super) fn ping_once(names: &Names, from: usize, to: usize) -> bool {
    netns::run_in(&names.ns(&format!("p{from}")), move || {
        traffic::ping(pod_ip(to), 1, 64, Duration::from_millis(300))
    })
    .is_ok_and(|s| s.received == 1)
}

/// ICMP net-unreachable from `from`'s own node for `to`'s pod: the route is gone there.
fn unreachable_from(names: &Names, from: usize, to: usize) -> bool {
    netns::run_in(&names.ns(&format!("p{from}")), move || {
        traffic::probe_icmp_error(pod_ip(to), Duration::from_millis(300))
    })
    .ok()
    .flatten()
        == Some((Ipv4Addr::new(10, 244, from as u8, 0), 3, 0))
}

fn lease_of(names: &Names, i: usize) -> Option<String> {
    let key = lease_key(&format!("10.244.{i}.0-24"));
    with_store(names, move |s| Ok(s.get_key(&key)?))
        .ok()
        .flatten()
}

/// Node 1's /metrics shows `want` leases in its live map (eventually: updates may be in flight).
pub fn map_size_check(names: &Names, want: usize) -> Check {
    let mut seen = None;
    let ok = within(Duration::from_secs(5), || {
        seen = metric(names, 1, "podwire_subnet_map_leases");
        seen == Some(want as f64)
    });
    Check {
        name: "node 1's /metrics: every lease in the live map".into(),
        ok,
        detail: format!("podwire_subnet_map_leases {seen:?}, want {want}"),
    }
}

/// Someone deletes node `i`'s lease while it runs: it takes the same subnet again.
pub fn retake_check(names: &Names, i: usize) -> Result<Check> {
    let key = lease_key(&format!("10.244.{i}.0-24"));
    with_store(names, move |s| Ok(s.delete_key(&key)?))?;
    let want = format!("\"PublicIP\":\"{}\"", underlay_ip(i));
    let back = within(Duration::from_secs(10), || {
        lease_of(names, i).is_some_and(|v| v.contains(&want))
    });
    let count = metric(names, i, "podwire_lease_reacquisitions_total").unwrap_or(0.0);
    let reachable = within(Duration::from_secs(5), || ping_once(names, 1, i));
    Ok(Check {
        name: "a deleted lease is taken again by its live node".into(),
        ok: back && count >= 1.0 && reachable,
        detail: format!(
            "node {i}: lease back {back}, reacquisitions {count}, pod reachable {reachable}"
        ),
    })
}

/// Node `leaver` stops (its lease stays, as flanneld leaves it), then an operator deletes the
/// lease: every other podwire node drops the route.
pub fn leave_check(
    res: &Arc<Mutex<Resources>>,
    names: &Names,
    opts: &LabOptions,
    leaver: usize,
) -> Result<Check> {
    let stopped = res
        .lock()
        .expect("lab resources")
        .stop_child(&format!("n{leaver}"));
    if !stopped.is_empty() {
        anyhow::bail!("{}", stopped.join("\n"));
    }
    let kept = lease_of(names, leaver).is_some();
    let key = lease_key(&format!("10.244.{leaver}.0-24"));
    with_store(names, move |s| Ok(s.delete_key(&key)?))?;
    let others: Vec<usize> = opts
        .podwire_nodes()
        .into_iter()
        .filter(|&j| j != leaver)
        .collect();
    let gone: Vec<usize> = others
        .iter()
        .copied()
        .filter(|&j| {
            within(Duration::from_secs(5), || {
                unreachable_from(names, j, leaver)
            })
        })
        .collect();
    Ok(Check {
        name: "a stopped node keeps its lease; deleting it removes the route everywhere".into(),
        ok: kept && gone.len() == others.len(),
        detail: format!(
            "node {leaver} stopped: lease kept {kept}; route gone on {} of {} nodes",
            gone.len(),
            others.len()
        ),
    })
}

/// Runs `f` on the lab's etcd server.
fn lab_etcd(
    res: &Arc<Mutex<Resources>>,
    f: impl FnOnce(&mut EtcdServer) -> Result<()>,
) -> Result<()> {
    f(res
        .lock()
        .expect("lab resources")
        .etcd
        .as_mut()
        .context("etcd is not running")?)
}

/// etcd is killed in the middle of a TCP transfer between pods 1 and `to`: the transfer
/// completes intact, the nodes notice the outage, and they resync once etcd is back.
pub fn outage_check(
    res: &Arc<Mutex<Resources>>,
    names: &Names,
    opts: &LabOptions,
    to: usize,
) -> Result<Check> {
    let bytes = opts.transfer_mb.max(200) * 1_000_000;
    let transfer = super::lifecycle::Transfer::start(names, to, super::TCP_PORT + 1, bytes, 7)?;
    std::thread::sleep(Duration::from_millis(50));
    let killed_at = Instant::now();
    lab_etcd(res, |e| {
        e.kill();
        Ok(())
    })?;
    let outcome = transfer.finish();
    let intact = outcome.is_ok();
    let transfer_while_down = killed_at.elapsed();
    let noticed = within(Duration::from_secs(10), || {
        metric(names, 1, "podwire_store_up") == Some(0.0)
    });
    let still = ping_once(names, 1, to);
    lab_etcd(res, |e| Ok(e.restart()?))?;
    let resynced = within(Duration::from_secs(20), || {
        metric(names, 1, "podwire_store_up") == Some(1.0)
            && metric(names, 1, "podwire_store_reconnects_total").unwrap_or(0.0) >= 1.0
    });
    Ok(Check {
        name: "etcd killed under a TCP transfer: it completes; nodes resync when etcd is back".into(),
        ok: intact && noticed && still && resynced,
        detail: format!(
            "{} MB 1->{to} intact {intact} ({} ms after the kill); outage seen {noticed}; ping during outage {still}; resynced {resynced}{}",
            bytes / 1_000_000,
            transfer_while_down.as_millis(),
            outcome
                .err()
                .map(|e| format!("; transfer error: {e}"))
                .unwrap_or_default()
        ),
    })
}

/// The stopped node starts again after the outage: it takes its subnet again (from subnet.env)
/// and every podwire node reaches it.
pub fn rejoin_check(
    res: &Arc<Mutex<Resources>>,
    names: &Names,
    opts: &LabOptions,
    exe: &Path,
    node: usize,
) -> Result<Check> {
    {
        let mut r = res.lock().expect("lab resources");
        super::spawn_node(&mut r, opts, exe, node)?;
        super::wait_node_ready(&mut r, opts, node)?;
    }
    let lease = lease_of(names, node).is_some();
    let from: Vec<usize> = opts
        .podwire_nodes()
        .into_iter()
        .filter(|&j| j != node)
        .collect();
    let reach = from
        .iter()
        .filter(|&&j| within(Duration::from_secs(5), || ping_once(names, j, node)))
        .count();
    Ok(Check {
        name: "the node rejoins with its old subnet and is reachable from every node".into(),
        ok: lease && reach == from.len(),
        detail: format!(
            "node {node}: lease 10.244.{node}.0/24 back {lease}; reachable from {reach} of {} nodes",
            from.len()
        ),
    })
}

/// Latency from a lease PUT leaving the client to the new map live in a node's workers (its
/// /metrics shows one more map update), one node per sample, round robin.
pub fn put_to_live(names: &Names, opts: &LabOptions, samples: usize) -> Result<Vec<Duration>> {
    let samples = samples.min(MAX_LATENCY_SAMPLES);
    let nodes = opts.podwire_nodes();
    if nodes.is_empty() {
        bail!("no podwire node");
    }
    let vxlan = opts.vxlan();
    with_store(names, move |s| {
        let mut out = Vec::with_capacity(samples);
        let mut keys = Vec::new();
        for k in 0..samples {
            let node = nodes[k % nodes.len()];
            let before = metric_here(node, "podwire_subnet_map_updates_total")
                .context("reading podwire_subnet_map_updates_total")?;
            // Fresh subnets inside 10.244.0.0/16 (in every lab network), no lab node's.
            let key = lease_key(&format!("10.244.{}.0-24", 150 + k));
            let (_, value) = extra_lease(k, vxlan);
            let t = Instant::now();
            s.put_many(&[(key.clone(), value)], None)?;
            loop {
                if metric_here(node, "podwire_subnet_map_updates_total").is_some_and(|v| v > before)
                {
                    out.push(t.elapsed());
                    break;
                }
                if t.elapsed() > Duration::from_secs(5) {
                    bail!("node {node} did not apply a lease PUT within 5 s");
                }
            }
            keys.push(key);
        }
        for k in keys {
            s.delete_key(&k)?;
        }
        Ok(out)
    })
}
