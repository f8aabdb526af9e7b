//! The lab's run after set-up: traffic between every pair of pods, then the checks, in their
//! order, then the report.

use super::*;

type Figures = serde_json::Map<String, serde_json::Value>;

pub(super) fn run_inner(
    res: &Arc<Mutex<Resources>>,
    opts: &LabOptions,
    exe: &Path,
) -> Result<bool> {
    let started = Instant::now();
    let mut figures = serde_json::Map::new();
    let r = set_up(res, opts, exe, &mut figures)?;
    let podwire_nodes = opts.podwire_nodes();
    print_banner(opts, &podwire_nodes);
    let pairs = run_pairs(res, &r, opts)?;
    // Every peer has been reached: from here on AF_XDP sends need no kernel fallback.
    let sends_after_pairs = opts.io_xdp.then(|| xdp_sends_now(&r, &podwire_nodes));
    let mut checks = pair_checks(opts, &pairs);
    if opts.services {
        checks.extend(services_checks(res, &r, opts, &mut figures)?);
    }
    if opts.soak_seconds > 0 {
        checks.extend(soak_checks(res, &r, opts, &podwire_nodes, &mut figures)?);
    }
    let mut stats = Vec::new();
    // Node 1 runs podwire unless the whole cluster is the kernel baseline.
    if !opts.is_kernel_node(1) {
        checks.extend(live_node_checks(res, &r, opts, exe, &mut figures)?);
        // Stop the daemons so their final counters are on disk; each must exit with 0.
        let stop_failures = res.lock().expect("lab resources").stop_children();
        stats = read_stats(&r.dir, &podwire_nodes);
        // Only the services checks measure it.
        let outside_packets = figures
            .get("outside_packets")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        checks.extend(stopped_node_checks(
            &r,
            opts,
            &pairs,
            &stats,
            sends_after_pairs.as_ref(),
            outside_packets,
        )?);
        checks.push(clean_exit_check(&stats, &stop_failures));
    }
    print_summary(opts, &pairs, &checks, &stats, &figures, started.elapsed());
    let ok = checks.iter().all(|c| c.ok);
    if let Some(path) = &opts.json {
        write_json(path, opts, &pairs, &checks, &stats, &figures, ok)?;
    }
    Ok(ok)
}

fn print_banner(opts: &LabOptions, podwire_nodes: &[usize]) {
    let kernel_nodes = (1..=opts.nodes).filter(|&i| opts.is_kernel_node(i)).count();
    println!(
        "podwire-lab lab: {} nodes ({} podwire {}, {} kernel VXLAN as flanneld sets it up), {} worker(s) per podwire node, {} MB per TCP transfer",
        opts.nodes,
        podwire_nodes.len(),
        if opts.vxlan() { "vxlan" } else { "udp" },
        kernel_nodes,
        opts.workers,
        opts.transfer_mb
    );
}

/// Traffic between every ordered pair of pods, stopping at the first dead daemon.
fn run_pairs(res: &Arc<Mutex<Resources>>, r: &Names, opts: &LabOptions) -> Result<Vec<PairResult>> {
    let mut pairs = Vec::new();
    for from in 1..=opts.nodes {
        for to in 1..=opts.nodes {
            if from != to {
                daemons_alive(res)?;
                pairs.push(run_pair(r, opts, from, to, || daemons_alive(res))?);
            }
        }
    }
    daemons_alive(res)?;
    Ok(pairs)
}

/// What every pair's traffic showed.
fn pair_checks(opts: &LabOptions, pairs: &[PairResult]) -> Vec<Check> {
    vec![
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
    ]
}

/// The services checks (see `services_lab`) and their figures.
fn services_checks(
    res: &Arc<Mutex<Resources>>,
    r: &Names,
    opts: &LabOptions,
    figures: &mut Figures,
) -> Result<Vec<Check>> {
    // podwire's hairpin address, or with kube-proxy the node's masquerade address on the
    // pod's link.
    let hairpin = if opts.is_kernel_node(1) {
        gateway_ip(1)
    } else {
        let cidr = podwire_dataplane::nat::DEFAULT_SERVICE_CIDR.parse()?;
        podwire_dataplane::nat::hairpin_ip_for(cidr)
    };
    // With --io xdp, node 1's podwire owns its address: its NodePorts, from outside. The
    // nftables baseline serves them too (the iptables one renders no NodePorts).
    let nft_baseline = opts.is_kernel_node(1) && opts.kube_proxy == super::KubeProxyMode::Nftables;
    let podwire_owns = opts.io_xdp && !opts.is_kernel_node(1);
    let node_ports = (podwire_owns || nft_baseline).then_some(services_lab::NodePorts {
        node: underlay_ip(1),
        cluster_addr: Ipv4Addr::new(10, 244, 1, 0),
        outside: "x",
        outside_ip: super::ROGUE_IP,
        // The kernel's conntrack sees the pods' answers wherever they go.
        clients_kept: opts.ip_masq || nft_baseline,
        // kube-proxy's health check server is its Go process, which the baseline has not.
        health_server: podwire_owns,
    });
    let (c, f) = services_lab::checks(r, hairpin, &services_source(res, opts), node_ports)?;
    daemons_alive(res)?;
    figures.insert(
        "service_connections_per_s".into(),
        json!((f.connections_per_s * 10.0).round() / 10.0),
    );
    figures.insert("service_spread".into(), json!(f.spread));
    figures.insert("outside_packets".into(), json!(f.outside_packets));
    Ok(c)
}

/// The soak (see `soak`): its checks and figures.
fn soak_checks(
    res: &Arc<Mutex<Resources>>,
    r: &Names,
    opts: &LabOptions,
    podwire_nodes: &[usize],
    figures: &mut Figures,
) -> Result<Vec<Check>> {
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
    let s = soak::run(r, &daemons, opts.soak_seconds, opts.soak_pps);
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
    Ok(soak::checks(&s))
}

/// The checks made while node 1's podwire runs, each followed by a look at the daemons.
fn live_node_checks(
    res: &Arc<Mutex<Resources>>,
    r: &Names,
    opts: &LabOptions,
    exe: &Path,
    figures: &mut Figures,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    checks.push(udp_gso_check(r)?);
    daemons_alive(res)?;
    checks.push(unreachable_check(r)?);
    daemons_alive(res)?;
    if opts.ip_masq {
        checks.push(masquerade_check(r, opts)?);
        daemons_alive(res)?;
    }
    checks.push(rogue_check(r, opts)?);
    daemons_alive(res)?;
    checks.push(icmp_forge::check(res, r, opts)?);
    daemons_alive(res)?;
    if opts.io_xdp {
        checks.push(xdp_host_check(r)?);
        daemons_alive(res)?;
    }
    // Per-peer queues are sockets: through AF_XDP, every peer shares the queue's ring.
    if [2, 3].iter().all(|i| opts.podwire_nodes().contains(i)) && !opts.io_xdp {
        checks.push(fairness::check(r, opts)?);
        daemons_alive(res)?;
    }
    if opts.etcd {
        checks.extend(etcd_checks(res, r, opts, exe, figures)?);
        daemons_alive(res)?;
    } else if opts.kube {
        checks.extend(kube_checks(res, r, opts)?);
        daemons_alive(res)?;
    } else {
        checks.push(map_reload_check(r, opts)?);
        daemons_alive(res)?;
    }
    if opts.podwire_nodes().contains(&2) {
        checks.push(lifecycle::kill_restart_check(res, r, opts, exe, 2)?);
        daemons_alive(res)?;
        checks.push(lifecycle::worker_panic_check(res, r, opts, exe, 2)?);
        daemons_alive(res)?;
    }
    checks.push(lifecycle::hangup_check(res, r)?);
    daemons_alive(res)?;
    if opts.vxlan() {
        let log = std::fs::read_to_string(r.dir.join("n1/podwire.log")).unwrap_or_default();
        checks.push(Check {
            name:
                "node 1 takes over from flanneld: its leftover flannel.1 VXLAN device is replaced"
                    .into(),
            ok: log.contains("removed a kernel VXLAN device"),
            detail: "node 1 log".into(),
        });
    }
    if opts.io_xdp {
        let log = std::fs::read_to_string(r.dir.join("n1/podwire.log")).unwrap_or_default();
        checks.push(Check {
            name: "node 1 takes off the XDP program a gone podwire left attached (netlink)".into(),
            ok: log.contains("left attached"),
            detail: "node 1 log".into(),
        });
    }
    checks.push(ctl_check(r, opts, exe).unwrap_or_else(|e| Check {
        name: CTL_CHECK.into(),
        ok: false,
        detail: format!("{e:#}"),
    }));
    daemons_alive(res)?;
    Ok(checks)
}

/// The checks made once the daemons have stopped, from what they left and their counters.
fn stopped_node_checks(
    r: &Names,
    opts: &LabOptions,
    pairs: &[PairResult],
    stats: &[(usize, Option<LocalStats>)],
    sends_after_pairs: Option<&XdpSends>,
    outside_packets: u64,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    checks.push(lifecycle::residue_check(r, opts)?);
    if opts.io_xdp {
        checks.push(underlay_through_xdp_check(stats, sends_after_pairs));
    }
    if opts.pod_xdp {
        checks.push(pod_xdp_check(opts, stats, outside_packets));
    }
    checks.push(icmp_forge::counted_check(stats));
    if opts.vxlan() {
        checks.push(decided_once_check(stats));
    }
    let unknown_peer = stats[0]
        .1
        .as_ref()
        .map(|s| s.drops(DropReason::UnknownPeer))
        .unwrap_or(0);
    if opts.services {
        let (gone, resets) = stats[0].1.as_ref().map_or((0, 0), |s| {
            (
                s.drops(DropReason::EndpointGone),
                s.counter(Counter::TcpResets),
            )
        });
        checks.push(Check {
            name: "clients' segments to removed endpoints answered with resets (tcp_resets)".into(),
            ok: resets > 0,
            detail: format!("node 1 tcp_resets = {resets}, endpoint_gone = {gone}"),
        });
    }
    checks.push(Check {
        name: "forged datagrams counted as unknown_peer".into(),
        ok: unknown_peer >= 5,
        detail: format!("node 1 unknown_peer = {unknown_peer}"),
    });
    if opts.direct_routing {
        checks.extend(direct_routing_checks(r, pairs, stats)?);
    }
    Ok(checks)
}

/// Nothing in the lab sends a podwire node a malformed VXLAN header from a node's address
/// (forgeries come from non-nodes, counted as unknown_peer): one counted means a datagram was
/// decided twice, the second time as its own inner frame.
fn decided_once_check(stats: &[(usize, Option<LocalStats>)]) -> Check {
    let mut check = per_node_check(
        "each datagram from the underlay is decided once (no bad VXLAN header counted)",
        stats,
        &[Counter::RxUnderlay, Counter::TxTun],
        |s| s.drops(DropReason::BadVxlanHeader) == 0,
    );
    // Show the count judged, not only the counters that explain it.
    let judged: Vec<String> = stats
        .iter()
        .filter_map(|(i, s)| {
            let bad = s.as_ref()?.drops(DropReason::BadVxlanHeader);
            Some(format!("node {i} {bad}"))
        })
        .collect();
    check.detail = format!("{}; bad_vxlan_header: {}", check.detail, judged.join(", "));
    check
}

/// With `--pod-xdp`: the pods' packets reach podwire through AF_XDP, not the TUN.
/// `outside_packets`: what the outside host sent to the external IPs, which node 1's kernel
/// forwards into its TUN.
fn pod_xdp_check(
    opts: &LabOptions,
    stats: &[(usize, Option<LocalStats>)],
    outside_packets: u64,
) -> Check {
    // Everything the pods sent podwire came through their AF_XDP ports.
    use Counter::{RxPods, RxTun, TxPods, TxTun};
    let through_xdp = |s: &LocalStats| s.counter(RxPods) > 0 && s.counter(TxPods) > 0;
    let mut check = per_node_check(
        "pods reach podwire through AF_XDP on their veths, not the TUN",
        stats,
        &[RxPods, TxPods, RxTun, TxTun],
        |s| through_xdp(s) && s.counter(RxTun) == 0,
    );
    if opts.services {
        // Node 2's pod also holds a second service backend address: a pod port is held
        // to its pod's one address, so the XDP program passes that address's packets
        // to the kernel, which routes them into the TUN. Node 1's TUN takes the outside
        // host's packets to the external IPs (at most as many as it sent).
        let tun_allowed = |i: usize| match i {
            1 => outside_packets,
            _ => 0,
        };
        let ok = stats.iter().all(|(i, s)| {
            s.as_ref()
                .is_some_and(|s| through_xdp(s) && (*i == 2 || s.counter(RxTun) <= tun_allowed(*i)))
        });
        check.name = format!(
            "{} (but node 2's second backend address {}, and node 1's outside clients of external IPs)",
            check.name,
            services_lab::POD2_SECOND
        );
        check.detail = format!(
            "{}; the outside host sent {outside_packets} packets to external IPs",
            check.detail
        );
        check.ok = ok;
    }
    check
}

/// With DirectRouting: stale routes withdrawn, and pod traffic off the tunnel.
fn direct_routing_checks(
    r: &Names,
    pairs: &[PairResult],
    stats: &[(usize, Option<LocalStats>)],
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
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
        detail: format!(
            "node 1 tunnelled {tunnelled:?} packets while its pods moved {moved} bytes over TCP"
        ),
    });
    Ok(checks)
}

/// Where this lab's nodes read services from.
pub(super) fn services_source(
    res: &Arc<Mutex<Resources>>,
    opts: &LabOptions,
) -> services_lab::Source {
    if opts.is_kernel_node(1) {
        services_lab::Source::KubeProxy(opts.kube_proxy)
    } else if opts.etcd {
        services_lab::Source::Etcd(Arc::clone(res))
    } else if opts.kube {
        services_lab::Source::Kube(Arc::clone(res))
    } else {
        services_lab::Source::File
    }
}

/// What only a live Kubernetes API can show (see `kube_lab`).
fn kube_checks(res: &Arc<Mutex<Resources>>, r: &Names, opts: &LabOptions) -> Result<Vec<Check>> {
    let mut checks = vec![
        kube_lab::annotations_check(res, opts)?,
        etcd_lab::map_size_check(r, opts.nodes),
    ];
    let to = opts
        .podwire_nodes()
        .into_iter()
        .chain(1..=opts.nodes)
        .find(|&i| i != 1)
        .expect("two nodes at least");
    checks.push(kube_lab::restart_check(res, r, opts, to)?);
    checks.push(kube_lab::expired_watch_check(res, r, opts, to)?);
    Ok(checks)
}

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
