//! Answers as the tools an operator knows print them (`conntrack -L`, `ipvsadm -Ln`, `bridge
//! fdb show`); `podwire ctl --json` prints the [`Response`] itself instead.

use super::protocol::{
    Captured, ConnEntry, Conntrack, Fdb, Response, Services, Stats, Subnets, TupleRow,
};
use podwire_dataplane::stats::Component;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// An answer as text.
pub fn render(answer: &Response) -> String {
    match answer {
        Response::Subnets(s) => subnets(s),
        Response::Conntrack(c) => conntrack(c),
        Response::Services(s) => services(s),
        Response::Stats(s) => stats(s),
        Response::Fdb(f) => fdb(f),
        Response::Attached(a) => format!(
            "attached {} in {} as {} ({}, mtu {}, bridge port {})\n",
            a.ip, a.netns, a.ifname, a.mac, a.mtu, a.port
        ),
        Response::Detached(d) => format!("detached {}\n", d.detached),
        Response::Fault(f) => format!("worker {} asked to panic\n", f.worker),
        Response::Captured(c) => captured(c),
    }
}

/// As `bridge fdb show` prints a bridge with a VXLAN port.
fn fdb(f: &Fdb) -> String {
    let mut out = String::new();
    for e in &f.entries {
        let _ = write!(out, "{} dev {}", e.mac, e.port);
        if let Some(dst) = e.dst {
            let _ = write!(out, " dst {dst} vni {}", e.vni);
        }
        if e.is_static {
            out.push_str(" static");
        } else {
            let _ = write!(out, " used {}", e.idle_ms / 1000);
        }
        out.push_str(" master podwire\n");
    }
    out
}

fn subnets(s: &Subnets) -> String {
    let mut out = format!("network {}\n", s.network);
    let _ = writeln!(
        out,
        "{:<20} {:<16} {:<8} VTEP-MAC",
        "SUBNET", "PUBLIC-IP", "BACKEND"
    );
    for l in &s.leases {
        let own = if l.own { " (this node)" } else { "" };
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:<8} {}{own}",
            l.subnet,
            l.public_ip.to_string(),
            l.backend,
            l.vtep_mac.as_deref().unwrap_or("-"),
        );
    }
    match s.own.lease_expiry_unix {
        Some(t) => {
            let _ = writeln!(out, "lease expires at unix time {t}");
        }
        None => out.push_str("lease never expires (file store)\n"),
    }
    out
}

/// As `conntrack -L` prints the table.
fn conntrack(c: &Conntrack) -> String {
    let mut out = String::new();
    for e in &c.entries {
        out.push_str(&conn_line(e));
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "conntrack v{} (podwire): {} flow entries have been shown.",
        env!("CARGO_PKG_VERSION"),
        c.count
    );
    out
}

fn conn_line(e: &ConnEntry) -> String {
    let tuple = |t: &TupleRow, d: usize| {
        format!(
            "src={} dst={} sport={} dport={} packets={} bytes={}",
            t.src, t.dst, t.sport, t.dport, e.packets[d], e.bytes[d]
        )
    };
    let num = match e.proto.as_str() {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        _ => 0,
    };
    format!(
        "{:<8} {num} {} {}{} {}{}{}{}",
        e.proto,
        e.expires_in,
        e.state
            .as_deref()
            .map(|s| format!("{s} "))
            .unwrap_or_default(),
        tuple(&e.original, 0),
        if e.seen_reply { "" } else { "[UNREPLIED] " },
        tuple(&e.reply, 1),
        if e.assured { " [ASSURED]" } else { "" },
        // Not a conntrack(8) flag: podwire's tombstone for a connection whose endpoint left.
        if e.gone { " [ENDPOINT_GONE]" } else { "" },
    )
}

/// As `ipvsadm -Ln` prints the virtual servers.
fn services(s: &Services) -> String {
    let mut out = String::from("Prot LocalAddress:Port Scheduler Flags\n");
    out.push_str("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n");
    for svc in &s.services {
        let flags = svc
            .affinity_timeout
            .map(|t| format!(" persistent {t}"))
            .unwrap_or_default();
        let proto = svc.proto.to_uppercase();
        let line = |out: &mut String, addr: &Ipv4Addr, label: &str| {
            let (port, sched, name) = (svc.port, &svc.scheduler, &svc.name);
            let _ = writeln!(
                out,
                "{proto:<4} {addr}:{port} {sched}{flags}   # {name}{label}"
            );
        };
        line(&mut out, &svc.cluster_ip, "");
        // kube-proxy's IPVS mode gives each external IP a virtual server of its own.
        for ip in &svc.external_ips {
            line(&mut out, ip, " (external IP)");
        }
        for ep in &svc.endpoints {
            let _ = writeln!(
                out,
                "  -> {:<28} Masq    1      {:<10} {}",
                format!("{}:{}", ep.ip, ep.port),
                ep.active,
                ep.inactive
            );
        }
    }
    out
}

/// Each worker's counters by component (those the daemon runs; with rates after the first
/// `stats`), its drops, the total over the workers when there are several, and the XDP
/// programs' counters.
fn stats(s: &Stats) -> String {
    let mut out = String::new();
    for w in &s.workers {
        let _ = writeln!(out, "worker {}", w.worker);
        worker_counters(&mut out, &w.counters, &w.per_second, &w.drops);
    }
    if s.workers.len() > 1 {
        let mut total = BTreeMap::new();
        let mut per_second = BTreeMap::new();
        let mut drops = BTreeMap::new();
        for w in &s.workers {
            sum_into(&mut total, &w.counters);
            sum_into(&mut drops, &w.drops);
            for (k, v) in &w.per_second {
                *per_second.entry(k.clone()).or_insert(0.0) += v;
            }
        }
        let _ = writeln!(out, "total ({} workers)", s.workers.len());
        worker_counters(&mut out, &total, &per_second, &drops);
    }
    for p in &s.xdp_programs {
        let _ = writeln!(out, "XDP program on {}", p.interface);
        if let Some(e) = &p.error {
            let _ = writeln!(out, "  unreadable: {e}");
        }
        for name in crate::health::xdp_counter_names() {
            if let Some(n) = p.counters.get(name) {
                let _ = writeln!(out, "  {name:<22} {n}");
            }
        }
    }
    out
}

/// Counters by component (the components with any counter given), then drops by reason.
fn worker_counters(
    out: &mut String,
    counters: &BTreeMap<String, u64>,
    per_second: &BTreeMap<String, f64>,
    drops: &BTreeMap<String, u64>,
) {
    for component in Component::ALL {
        if !component.counters().any(|c| counters.contains_key(c.name)) {
            continue;
        }
        let _ = writeln!(out, "  {}", component.as_str());
        for c in component.counters() {
            let Some(n) = counters.get(c.name) else {
                continue;
            };
            let rate = per_second
                .get(c.name)
                .map(|r| format!("  ({r:.0}/s)"))
                .unwrap_or_default();
            let _ = writeln!(out, "    {:<30} {n}{rate}", c.name);
        }
    }
    for (reason, n) in drops {
        let _ = writeln!(out, "  drop {reason:<17} {n}");
    }
}

fn sum_into(total: &mut BTreeMap<String, u64>, add: &BTreeMap<String, u64>) {
    for (k, v) in add {
        *total.entry(k.clone()).or_insert(0) += v;
    }
}

fn captured(c: &Captured) -> String {
    format!(
        "captured {} of {} packets to {}\n",
        c.captured,
        c.wanted,
        c.path.as_deref().unwrap_or("-")
    )
}
