//! The checks of one node's behaviour the lab runs after the pair traffic.

use super::*;

/// A forged datagram from the rogue host must not reach pod 1; a real one from pod 2 must.
/// `--io xdp`: node 1's own address still answers on the interface podwire's XDP program sits
/// on: a ping from node 2, and a TCP connection to a port podwire does not own.
pub(super) fn xdp_host_check(res: &Names) -> Result<Check> {
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

pub(super) fn rogue_check(res: &Names, opts: &LabOptions) -> Result<Check> {
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
pub(super) fn udp_gso_check(res: &Names) -> Result<Check> {
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

pub(super) fn unreachable_check(res: &Names) -> Result<Check> {
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
pub(super) fn masquerade_check(res: &Names, opts: &LabOptions) -> Result<Check> {
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

/// Polls `probe` for up to 5 s until it returns true.
pub(super) fn eventually(mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if probe() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

pub(super) fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The store is re-read live: a broken update keeps the last good map, a removed lease makes its
/// pods unreachable (ICMP net-unreachable), and restoring it makes them reachable again.
pub(super) fn map_reload_check(res: &Names, opts: &LabOptions) -> Result<Check> {
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
pub(super) fn per_node_check(
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
pub(super) const VIA_KERNEL_FEW: u64 = 10;

/// Per podwire node: its (tx_underlay, xdp_via_kernel) at some moment (None: no answer).
pub(super) type XdpSends = Vec<(usize, Option<(u64, u64)>)>;

/// Each podwire node's (tx_underlay, xdp_via_kernel) now, from `ctl stats`.
pub(super) fn xdp_sends_now(r: &Names, nodes: &[usize]) -> XdpSends {
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
pub(super) fn underlay_through_xdp_check(
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
pub(super) fn clean_exit_check(
    stats: &[(usize, Option<LocalStats>)],
    stop_failures: &[String],
) -> Check {
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

pub(super) fn read_stats(dir: &Path, nodes: &[usize]) -> Vec<(usize, Option<LocalStats>)> {
    let read = |i: usize| {
        let text = std::fs::read_to_string(dir.join(format!("n{i}/stats.json"))).ok()?;
        report::total_from_json(&serde_json::from_str(&text).ok()?)
    };
    nodes.iter().map(|&i| (i, read(i))).collect()
}
