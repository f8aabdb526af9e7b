//! `podwire-lab lab --mode l2`: podwire as every node's bridge, one L2 domain across nodes.
//!
//! Every node runs `podwire run --mode l2`; pods are bare namespaces whose only interface is a
//! TAP device podwire attaches (`podwire ctl attach`): three pods on node 1, two on node 2, one
//! on each further node, all in 10.244.0.0/16 on-link. The checks: ARP resolves every pod's MAC,
//! every pair pings, TCP transfers keep their SHA-256 within a node and across nodes, the FDB
//! shows what it should, a pod moved to another node (same address and MAC) is reachable again
//! from its first packet, forged VXLAN from outside the cluster is dropped, and nothing is
//! left behind when the daemons stop. Figures: same-node TCP through podwire against the same
//! transfer through a Linux bridge built beside it.

use super::{
    eventually, ms, netns, print_summary, read_stats, set_up, traffic, underlay_ip, write_json,
    Check, LabOptions, Names, Resources, ROGUE_IP, STEP_TIMEOUT, TCP_PORT,
};
use anyhow::{bail, Context, Result};
use podwire_dataplane::pipeline::DropReason;
use podwire_dataplane::stats::{Counter, LocalStats};
use podwire_dataplane::wire::MacAddr;
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A pod of the L2 lab.
#[derive(Debug, Clone)]
struct Pod {
    /// Short name: `1a` is node 1's first pod.
    name: String,
    node: usize,
    ip: Ipv4Addr,
    mac: MacAddr,
}

impl Pod {
    fn ns(&self, r: &Names) -> String {
        r.ns(&format!("p{}", self.name))
    }
}

fn pods(nodes: usize) -> Vec<Pod> {
    let mut v = Vec::new();
    for node in 1..=nodes {
        let count = match node {
            1 => 3,
            2 => 2,
            _ => 1,
        };
        for k in 0..count {
            let host = 10 + k as u8;
            v.push(Pod {
                name: format!("{node}{}", (b'a' + k as u8) as char),
                node,
                ip: Ipv4Addr::new(10, 244, node as u8, host),
                mac: MacAddr([0x02, 0x00, 0x0a, 0xf4, node as u8, host]),
            });
        }
    }
    v
}

fn ctl(r: &Names, exe: &Path, node: usize, args: &[&str]) -> Result<serde_json::Value> {
    let sock = r.dir.join(format!("n{node}/ctl.sock"));
    let out = Command::new(exe)
        .arg("ctl")
        .arg("--socket")
        .arg(&sock)
        .arg("--json")
        .args(args)
        .output()
        .context("running podwire ctl")?;
    if !out.status.success() {
        bail!(
            "podwire ctl {} on node {node}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn attach(r: &Names, exe: &Path, pod: &Pod, node: usize) -> Result<()> {
    let ns = pod.ns(r);
    let ip = format!("{}/16", pod.ip);
    let mac = pod.mac.to_string();
    ctl(
        r,
        exe,
        node,
        &["attach", "--netns", &ns, "--ip", &ip, "--mac", &mac],
    )?;
    Ok(())
}

/// Pings `to` from `from`'s namespace; returns (sent, received).
fn ping(r: &Names, from: &Pod, to: Ipv4Addr, count: u16) -> (u32, u32) {
    netns::run_in(&from.ns(r), move || {
        traffic::ping(to, count, 64, Duration::from_secs(1))
    })
    .map(|p| (p.sent, p.received))
    .unwrap_or((u32::from(count), 0))
}

/// A TCP transfer of `bytes` from namespace `src` to `dst_ip` in namespace `dst`, checked by
/// SHA-256; returns Mbit/s.
fn transfer(src: &str, dst: &str, dst_ip: Ipv4Addr, bytes: u64, seed: u64) -> Result<f64> {
    let listener = netns::run_in(dst, move || Ok(TcpListener::bind((dst_ip, TCP_PORT))?))?;
    let sink = netns::spawn_in(dst, move || traffic::tcp_sink(listener, STEP_TIMEOUT));
    let sent = netns::run_in(src, move || {
        traffic::tcp_source(
            SocketAddrV4::new(dst_ip, TCP_PORT),
            bytes,
            seed,
            STEP_TIMEOUT,
        )
    });
    let got = netns::join(sink)?;
    traffic::same_digest(&sent?, &got.sha256)?;
    if got.bytes != bytes {
        bail!("{} of {bytes} bytes arrived", got.bytes);
    }
    Ok(got.bytes as f64 * 8.0 / got.elapsed.as_secs_f64().max(1e-9) / 1e6)
}

/// Throughput of `bytes` from namespace `src` to `dst_ip` in namespace `dst`, with the bench's
/// generator (no hashing, which would cap a fast path); returns Mbit/s.
fn blast(src: &str, dst: &str, dst_ip: Ipv4Addr, bytes: u64) -> Result<f64> {
    let listener = netns::run_in(dst, move || Ok(TcpListener::bind((dst_ip, TCP_PORT))?))?;
    let sink = netns::spawn_in(dst, move || traffic::tcp_discard(listener, STEP_TIMEOUT));
    let t = Instant::now();
    let sent = netns::run_in(src, move || {
        traffic::tcp_blast(SocketAddrV4::new(dst_ip, TCP_PORT), bytes, STEP_TIMEOUT)
    });
    let got = netns::join(sink)?;
    sent?;
    if got != bytes {
        bail!("{got} of {bytes} bytes arrived");
    }
    Ok(bytes as f64 * 8.0 / t.elapsed().as_secs_f64().max(1e-9) / 1e6)
}

/// The neighbour entry `ip` in namespace `ns` (its MAC), if resolved.
fn neighbour(ns: &str, ip: Ipv4Addr) -> Option<MacAddr> {
    let (_, out) = netns::output_in(ns, &["ip", "-j", "neigh", "show", &ip.to_string()]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v.as_array()?
        .iter()
        .find_map(|n| n["lladdr"].as_str()?.parse().ok())
}

/// The FDB entry for `mac` on `node`: (port, dst).
fn fdb_entry(r: &Names, exe: &Path, node: usize, mac: MacAddr) -> Option<(String, Option<String>)> {
    let v = ctl(r, exe, node, &["fdb"]).ok()?;
    let mac = mac.to_string();
    v["entries"].as_array()?.iter().find_map(|e| {
        (e["mac"].as_str()? == mac).then(|| {
            (
                e["port"].as_str().unwrap_or_default().to_string(),
                e["dst"].as_str().map(str::to_string),
            )
        })
    })
}

fn check(name: &str, ok: bool, detail: String) -> Check {
    Check {
        name: name.into(),
        ok,
        detail,
    }
}

/// Two namespaces on a Linux bridge in a third, the baseline for same-node throughput.
fn kernel_bridge(res: &Arc<Mutex<Resources>>, mtu: u32) -> Result<(String, String)> {
    let mut g = res.lock().expect("lab resources");
    let (br, a, b) = (g.ns("kbr"), g.ns("kba"), g.ns("kbb"));
    for ns in [&br, &a, &b] {
        netns::ip(&["netns", "add", ns])?;
        g.namespaces.push(ns.clone());
        netns::ip_in(ns, &["link", "set", "lo", "up"])?;
    }
    netns::ip_in(&br, &["link", "add", "br0", "type", "bridge"])?;
    netns::ip_in(&br, &["link", "set", "br0", "up"])?;
    for (ns, host) in [(&a, 10), (&b, 11)] {
        let port = format!("v{host}");
        netns::ip_in(
            &br,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        netns::ip_in(&br, &["link", "set", &port, "master", "br0", "up"])?;
        netns::ip_in(ns, &["link", "set", "eth0", "mtu", &mtu.to_string()])?;
        netns::ip_in(
            ns,
            &["addr", "add", &format!("10.244.1.{host}/16"), "dev", "eth0"],
        )?;
        netns::ip_in(ns, &["link", "set", "eth0", "up"])?;
    }
    Ok((a, b))
}

/// Forged VXLAN broadcasts from the rogue host to node 1; returns how many were sent.
fn forge_from_rogue(r: &Names, opts: &LabOptions) -> Result<u32> {
    let node1 = SocketAddrV4::new(underlay_ip(1), opts.data_port());
    netns::run_in(&r.ns("x"), move || {
        let sock = UdpSocket::bind((ROGUE_IP, 0))?;
        let frame = traffic::vxlan_payload(
            MacAddr::BROADCAST,
            MacAddr([0x02, 0xee, 0, 0, 0, 1]),
            &[0u8; 46],
        );
        for _ in 0..10 {
            sock.send_to(&frame, node1)?;
        }
        Ok(10)
    })
}

pub fn run(res: &Arc<Mutex<Resources>>, opts: &LabOptions, exe: &Path) -> Result<bool> {
    let started = Instant::now();
    let mut figures = serde_json::Map::new();
    let r = set_up(res, opts, exe, &mut figures)?;
    let pods = pods(opts.nodes);
    println!(
        "podwire-lab lab --mode l2: {} nodes, {} pods on podwire's bridges, one L2 domain over VXLAN, {} MB per TCP transfer",
        opts.nodes,
        pods.len(),
        opts.transfer_mb
    );
    {
        let mut g = res.lock().expect("lab resources");
        for p in &pods {
            let ns = p.ns(&r);
            netns::ip(&["netns", "add", &ns])?;
            g.namespaces.push(ns);
        }
    }
    let mut checks = Vec::new();
    let t = Instant::now();
    let attached: Vec<String> = pods
        .iter()
        .filter_map(|p| {
            attach(&r, exe, p, p.node)
                .err()
                .map(|e| format!("{}: {e:#}", p.name))
        })
        .collect();
    figures.insert(
        "attach_ms_per_pod".into(),
        json!(ms(t.elapsed()) / pods.len() as f64),
    );
    checks.push(check(
        "every pod attached to its node's bridge (podwire ctl attach)",
        attached.is_empty(),
        if attached.is_empty() {
            format!("{} pods", pods.len())
        } else {
            attached.join("; ")
        },
    ));
    if !attached.is_empty() {
        return finish(res, &r, opts, checks, figures, started);
    }
    if opts.pod_xdp {
        checks.push(pod_xdp_check(&r, opts, exe, &pods)?);
    }
    checks.extend(ping_checks(&r, opts, &pods));
    let bytes = opts.transfer_mb * 1_000_000;
    checks.push(transfer_check(&r, opts, &pods, bytes, &mut figures));
    checks.push(fdb_check(&r, exe, &pods));
    checks.extend(move_checks(&r, exe, &pods, bytes, &mut figures));
    let forged = forge_from_rogue(&r, opts)?;
    bridge_baseline(res, &r, &pods, bytes, &mut figures)?;
    let mut stats_checks = finish_checks(res, &r, opts, forged)?;
    checks.append(&mut stats_checks);
    finish(res, &r, opts, checks, figures, started)
}

/// The first of node 2's pods.
fn first_on_node_2(pods: &[Pod]) -> &Pod {
    pods.iter().find(|p| p.node == 2).expect("node 2 has pods")
}

/// With `--l2-pods xdp`: every pod's bridge port is the host end of its veth, through AF_XDP.
fn pod_xdp_check(r: &Names, opts: &LabOptions, exe: &Path, pods: &[Pod]) -> Result<Check> {
    let mut wrong = Vec::new();
    for node in 1..=opts.nodes {
        let v = ctl(r, exe, node, &["fdb"])?;
        for p in v["ports"].as_array().into_iter().flatten() {
            let (label, device) = (p["label"].as_str(), p["device"].as_str());
            if label != Some("host") && !device.is_some_and(|d| d.starts_with("pwv")) {
                wrong.push(format!("node {node}: {p}"));
            }
        }
    }
    Ok(check(
        "every pod's bridge port is its veth's host end through AF_XDP (--l2-pods xdp)",
        wrong.is_empty(),
        if wrong.is_empty() {
            format!("{} pods", pods.len())
        } else {
            wrong.join("; ")
        },
    ))
}

/// Every pair of pods pings, and ARP resolves each pod's own MAC.
fn ping_checks(r: &Names, opts: &LabOptions, pods: &[Pod]) -> Vec<Check> {
    let mut checks = Vec::new();
    // Every pair pings (the first packet of each pair resolves ARP through the bridges).
    let mut sent = 0;
    let mut received = 0;
    let mut failed = Vec::new();
    for (i, a) in pods.iter().enumerate() {
        for b in &pods[i + 1..] {
            let (s, got) = ping(r, a, b.ip, opts.ping_count);
            sent += s;
            received += got;
            if got == 0 {
                failed.push(format!("{}->{}", a.name, b.name));
            }
        }
    }
    checks.push(check(
        "ping between every pair of pods (same node and across nodes)",
        failed.is_empty() && received * 100 >= sent * 95,
        format!("{received} of {sent} answered; no answer: {failed:?}"),
    ));
    let first = &pods[0];
    let wrong: Vec<String> = pods[1..]
        .iter()
        .filter(|p| neighbour(&first.ns(r), p.ip) != Some(p.mac))
        .map(|p| p.name.clone())
        .collect();
    checks.push(check(
        "ARP resolves every pod's own MAC (broadcast flooded, reply unicast)",
        wrong.is_empty(),
        format!("pod {}: wrong or missing for {wrong:?}", first.name),
    ));
    checks
}

/// TCP transfers on one node and across nodes both ways; their rates are figures.
fn transfer_check(
    r: &Names,
    opts: &LabOptions,
    pods: &[Pod],
    bytes: u64,
    figures: &mut serde_json::Map<String, serde_json::Value>,
) -> Check {
    let (first, same) = (&pods[0], &pods[1]);
    let remote = first_on_node_2(pods);
    let mut mbps = serde_json::Map::new();
    let mut errors = Vec::new();
    for (label, from, to) in [
        ("same_node", first, same),
        ("cross_node", first, remote),
        ("cross_node_back", remote, &pods[2]),
    ] {
        match transfer(&from.ns(r), &to.ns(r), to.ip, bytes, 7) {
            Ok(m) => {
                mbps.insert(label.into(), json!(m.round()));
            }
            Err(e) => errors.push(format!("{label}: {e:#}")),
        }
    }
    let c = check(
        &format!(
            "TCP {} MB with intact SHA-256, same node and across nodes both ways",
            opts.transfer_mb
        ),
        errors.is_empty(),
        if errors.is_empty() {
            format!("Mbit/s {mbps:?}")
        } else {
            errors.join("; ")
        },
    );
    figures.insert("tcp_mbps".into(), json!(mbps));
    c
}

/// Node 1's FDB: its pods static on their ports, node 2's pods learned behind node 2.
fn fdb_check(r: &Names, exe: &Path, pods: &[Pod]) -> Check {
    let first = &pods[0];
    let remote = first_on_node_2(pods);
    let local = fdb_entry(r, exe, 1, first.mac);
    let learned = fdb_entry(r, exe, 1, remote.mac);
    let node2 = underlay_ip(2).to_string();
    check(
        "podwire ctl fdb: local pods on their ports, remote pods behind their VTEP",
        local
            .as_ref()
            .is_some_and(|(p, d)| *p == first.ns(r) && d.is_none())
            && learned
                .as_ref()
                .is_some_and(|(p, d)| p == "vxlan" && d.as_deref() == Some(node2.as_str())),
        format!("{}: {local:?}, {}: {learned:?}", first.name, remote.name),
    )
}

/// Pod 1c moves to node 2 with its address and MAC (detach, attach there): reachable after
/// its first packet, and it takes TCP there.
fn move_checks(
    r: &Names,
    exe: &Path,
    pods: &[Pod],
    bytes: u64,
    figures: &mut serde_json::Map<String, serde_json::Value>,
) -> Vec<Check> {
    let first = &pods[0];
    let remote = first_on_node_2(pods);
    let node2 = underlay_ip(2).to_string();
    let mut checks = Vec::new();
    let moved = &pods[2];
    let moved_ok =
        ctl(r, exe, 1, &["detach", "--netns", &moved.ns(r)]).and_then(|_| attach(r, exe, moved, 2));
    let t = Instant::now();
    let reached = moved_ok.is_ok()
        && eventually(|| ping(r, moved, first.ip, 1).1 == 1 && ping(r, first, moved.ip, 1).1 == 1);
    figures.insert("moved_pod_reachable_ms".into(), json!(ms(t.elapsed())));
    let now_at = fdb_entry(r, exe, 1, moved.mac);
    checks.push(check(
        "a pod moved to another node is reachable after its first packet",
        reached
            && now_at
                .as_ref()
                .is_some_and(|(_, d)| d.as_deref() == Some(node2.as_str())),
        format!("attach: {moved_ok:?}; node 1 now has it at {now_at:?}"),
    ));
    let still = transfer(&remote.ns(r), &moved.ns(r), moved.ip, bytes / 5, 9);
    checks.push(check(
        "the moved pod takes TCP on its new node",
        still.is_ok(),
        format!("{still:?}"),
    ));
    checks
}

/// Same-node baseline: the same transfer through a Linux bridge; the ratio is a figure.
fn bridge_baseline(
    res: &Arc<Mutex<Resources>>,
    r: &Names,
    pods: &[Pod],
    bytes: u64,
    figures: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let (first, same) = (&pods[0], &pods[1]);
    let (ka, kb) = kernel_bridge(res, 1450)?;
    let mut ours = Vec::new();
    let mut kernel = Vec::new();
    let bench_bytes = bytes.max(100_000_000);
    for _ in 0..3 {
        if let Ok(m) = blast(&first.ns(r), &same.ns(r), same.ip, bench_bytes) {
            ours.push(m);
        }
        if let Ok(m) = blast(&ka, &kb, Ipv4Addr::new(10, 244, 1, 11), bench_bytes) {
            kernel.push(m);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (o, k) = (median(&mut ours), median(&mut kernel));
    figures.insert("same_node_tcp_mbps_podwire".into(), json!(o.round()));
    figures.insert("same_node_tcp_mbps_linux_bridge".into(), json!(k.round()));
    figures.insert(
        "same_node_tcp_ratio_to_linux_bridge".into(),
        json!(if k > 0.0 {
            (o / k * 1000.0).round() / 1000.0
        } else {
            0.0
        }),
    );
    Ok(())
}

/// Stops the daemons and checks their counters and what they left behind.
fn finish_checks(
    res: &Arc<Mutex<Resources>>,
    r: &Names,
    opts: &LabOptions,
    forged: u32,
) -> Result<Vec<Check>> {
    let nodes: Vec<usize> = (1..=opts.nodes).collect();
    let stop_failures = res.lock().expect("lab resources").stop_children();
    let stats = read_stats(&r.dir, &nodes);
    let mut checks = vec![super::clean_exit_check(&stats, &stop_failures)];
    let n1 = stats[0].1.clone().unwrap_or_default();
    checks.push(check(
        "forged VXLAN from outside the cluster counted as unknown_peer",
        n1.drops(DropReason::UnknownPeer) >= u64::from(forged),
        format!(
            "node 1 unknown_peer = {} of {forged} forged",
            n1.drops(DropReason::UnknownPeer)
        ),
    ));
    checks.push(check(
        "the bridges learned and flooded (counters)",
        n1.counter(Counter::FdbLearned) > 0 && n1.counter(Counter::Flooded) > 0,
        format!(
            "node 1 fdb_learned = {}, flooded = {}, moved = {}",
            n1.counter(Counter::FdbLearned),
            n1.counter(Counter::Flooded),
            n1.counter(Counter::FdbMoved)
        ),
    ));
    if opts.io_xdp {
        checks.push(super::underlay_through_xdp_check(&stats, None));
    }
    if opts.pod_xdp {
        // The pods' frames came through AF_XDP: more frames than the underlay's.
        let underlay = |s: &LocalStats| {
            if opts.io_xdp {
                s.counter(Counter::RxUnderlay)
            } else {
                0
            }
        };
        checks.push(super::per_node_check(
            "the pods' frames reached the bridges through AF_XDP",
            &stats,
            &[Counter::XdpRxFrames, Counter::RxUnderlay],
            |s| s.counter(Counter::XdpRxFrames) > underlay(s),
        ));
    }
    let mut left = Vec::new();
    for i in 1..=opts.nodes {
        let ns = r.ns(&format!("n{i}"));
        let (_, out) = netns::output_in(&ns, &["ip", "-o", "link", "show"])?;
        // No bridge port, pod device or veth pair, and no XDP program left on eth0.
        let leftover = ["podwire0", "pwtap", "pwv", "xdp"];
        if leftover.iter().any(|l| out.contains(l)) {
            left.push(format!("n{i}: {}", out.trim()));
        }
    }
    for p in pods(opts.nodes) {
        let (_, out) = netns::output_in(&p.ns(r), &["ip", "-o", "link", "show"])?;
        if out.contains("eth0") {
            left.push(format!("pod {}: eth0", p.name));
        }
    }
    checks.push(check(
        "stopped daemons leave no bridge port or pod interface behind",
        left.is_empty(),
        left.join("; "),
    ));
    Ok(checks)
}

fn finish(
    res: &Arc<Mutex<Resources>>,
    r: &Names,
    opts: &LabOptions,
    checks: Vec<Check>,
    figures: serde_json::Map<String, serde_json::Value>,
    started: Instant,
) -> Result<bool> {
    // After `finish_checks`, nothing is left to stop; otherwise each daemon must exit with 0.
    let stop_failures = res.lock().expect("lab resources").stop_children();
    if !stop_failures.is_empty() {
        anyhow::bail!("{}", stop_failures.join("\n"));
    }
    let stats = read_stats(&r.dir, &(1..=opts.nodes).collect::<Vec<_>>());
    print_summary(opts, &[], &checks, &stats, &figures, started.elapsed());
    let ok = checks.iter().all(|c| c.ok);
    if let Some(path) = &opts.json {
        write_json(path, opts, &[], &checks, &stats, &figures, ok)?;
    }
    Ok(ok)
}
