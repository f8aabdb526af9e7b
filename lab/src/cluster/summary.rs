//! The lab's report: the printed summary and the JSON record.

use super::*;

pub(super) fn print_summary(
    opts: &LabOptions,
    pairs: &[PairResult],
    checks: &[Check],
    stats: &[(usize, Option<LocalStats>)],
    figures: &serde_json::Map<String, serde_json::Value>,
    took: Duration,
) {
    println!();
    print_pairs(pairs);
    print_node_stats(opts, stats);
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

pub(super) fn write_json(
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
        "backend": opts.backend.to_string(),
        "transfer_mb": opts.transfer_mb,
        "store": if opts.etcd { "etcd" } else if opts.kube { "kube" } else { "file" },
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

/// Each pair's traffic, and the TCP throughput's spread.
fn print_pairs(pairs: &[PairResult]) {
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
}

/// Each podwire node's final counters and drops.
fn print_node_stats(opts: &LabOptions, stats: &[(usize, Option<LocalStats>)]) {
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
}
