//! `podwire ctl` against the running daemon: its answers must match the lab's state.

use super::*;

pub(super) const CTL_CHECK: &str =
    "podwire ctl answers from the running daemon, matching the lab's state";

/// `podwire ctl` against node 1's running daemon, each answer checked against what the lab
/// knows: the map holds every node, the workers counted traffic, the connection table holds
/// the pods' connections, and with services the ClusterIP connections it holds open.
pub(super) fn ctl_check(r: &Names, opts: &LabOptions, exe: &Path) -> Result<Check> {
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
        xdp_program_stats(&stats, &mut problems, &mut detail);
    }
    capture_check(r, opts, &sock, &mut problems, &mut detail)?;
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
        services_ctl(r, &sock, exe, &mut problems, &mut detail)?;
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

/// The XDP program's own counters in `ctl stats`.
fn xdp_program_stats(stats: &serde_json::Value, problems: &mut Vec<String>, detail: &mut String) {
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
            *detail += &format!(", XDP program: redirected {r}, no_socket {n}");
        }
        _ => problems.push(format!(
            "stats: the XDP program on eth0 redirected {redirected:?}, no_socket {no_socket:?} ({})",
            stats["xdp_programs"]
        )),
    }
}

/// `ctl capture` of the TUN and the underlay, read back by tshark.
fn capture_check(
    r: &Names,
    opts: &LabOptions,
    sock: &Path,
    problems: &mut Vec<String>,
    detail: &mut String,
) -> Result<()> {
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
            sock,
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
        *detail += &format!(", {decoded} {port} packets captured");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = netns::join(pinger);
    Ok(())
}

/// Connections `services_ctl` holds open to the web ClusterIP while it asks.
const HELD_CONNECTIONS: usize = 20;

/// `ctl services` and `ctl conntrack` against connections held open meanwhile: the earlier
/// checks' connections are closed and some may have left the table since (a removed backend's,
/// a CLOSE entry's 10 s), so the check makes its own and counts them ESTABLISHED.
fn services_ctl(
    r: &Names,
    sock: &Path,
    exe: &Path,
    problems: &mut Vec<String>,
    detail: &mut String,
) -> Result<()> {
    let ask = |req: serde_json::Value| podwire::ctl::request(sock, &req);
    let vip = services_lab::WEB_VIP.to_string();
    // The services checks' backends have stopped: these connections get their own.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let servers = services_lab::start_tcp_servers(r, &stop);
    std::thread::sleep(Duration::from_millis(200));
    let held = services_lab::hold_connections(r, services_lab::WEB_VIP, HELD_CONNECTIONS, 7000);
    // Asked while the connections are held; the servers stop whatever the answers.
    let asked = held.and_then(|held| {
        let ct = ask(json!({"cmd": "conntrack", "addr": vip, "port": 80, "proto": "tcp", "state": "established"}))?;
        let svcs = ask(json!({"cmd": "services"}))?;
        drop(held);
        Ok((ct, svcs))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    servers.into_iter().for_each(|s| drop(netns::join(s)));
    let (ct, svcs) = asked?;
    let to_vip = ct["count"].as_u64().unwrap_or(0);
    let web = svcs["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "default/web");
    let (eps, active) = web.map_or((0, 0), |w| {
        let eps = w["endpoints"].as_array().cloned().unwrap_or_default();
        let active: u64 = eps.iter().map(|e| e["active"].as_u64().unwrap_or(0)).sum();
        (eps.len(), active)
    });
    let want = HELD_CONNECTIONS as u64;
    if eps != 3 || active < want || to_vip < want {
        problems.push(format!(
            "services: web has {eps} endpoints, {active} active connections; conntrack ESTABLISHED to {vip}:80: {to_vip} (holding {want})"
        ));
    }
    let human = Command::new(exe)
        .args(["ctl", "--socket", &sock.display().to_string(), "services"])
        .output()?;
    let text = String::from_utf8_lossy(&human.stdout);
    if !text.contains("TCP  10.96.0.10:80 mh") || !text.contains("-> 10.244.2.3:8080") {
        problems.push(format!("`podwire ctl services` printed:\n{text}"));
    }
    *detail += &format!(", web: {eps} endpoints, {active} active connections (holding {want}), {to_vip} ESTABLISHED in conntrack");
    Ok(())
}
