//! The service behaviours Kubernetes' e2e tests ask of a proxy (test/e2e/network/service.go and
//! conntrack.go), each on real traffic from node 1's pod, through podwire or through
//! kube-proxy's rules on the kernel (the same checks, the same expectations):
//! - a ClusterIP without endpoints rejects UDP (port unreachable), as it refuses TCP;
//! - terminating endpoints serve only when no ready one is left, and keep their connections;
//! - `internalTrafficPolicy: Local`: this node's endpoints only; none here, dropped;
//! - `sessionAffinity: ClientIP`: 15 connections in a row reach one backend, and after the
//!   timeout a client may move;
//! - a Service with a TCP and a UDP port;
//! - a UDP client that keeps sending reaches the replacement of its server's pod, losing at most
//!   the request in flight when the old flow is cleared;
//! - a Service's external IP and load balancer IP serve its port, from a pod and from a host
//!   outside the cluster (whose connections the backends see from node 1's cluster address);
//! - a segment conntrack deems INVALID (out of window, injected by the backend pod) is dropped,
//!   and the connection it could have reset carries on.

use super::service_catalogue::{Condition, Endpoint};
use super::services_lab::{
    catalogue, connect, connect_to, pod, request, with_endpoints, Applied, AFFINITY_SECS,
    BACKEND_PORT, CYCLE_VIP, ELSEWHERE_VIP, EXTERNAL_IP, GUARD_VIP, LB_IP, LOCAL_VIP, MULTI_VIP,
    STICKY_VIP, TERM_VIP,
};
use super::{netns, Check, Names};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// How long a change takes to reach every side: podwire's control loop re-reads within a
/// tick (100 ms); kube-proxy's rules are in place when `iptables-restore` returns.
const SETTLE: Duration = Duration::from_millis(600);

/// Runs every behaviour check; `drops_invalid`: node 1 drops what conntrack deems INVALID
/// (kube-proxy's iptables mode) rather than judging data segments liberally (podwire, and
/// kube-proxy's nftables mode with `--conntrack-tcp-be-liberal`). Also returns how many
/// packets the outside host sent to the external IPs.
pub(super) fn checks(r: &Names, applied: &mut Applied, drops_invalid: bool) -> (Vec<Check>, u64) {
    let client = r.ns("p1");
    let mut outside_packets = 0;
    let checks = vec![
        outcome(
            "a ClusterIP without endpoints rejects UDP (port unreachable)",
            udp_rejected(&client),
        ),
        outcome(
            "terminating endpoints serve only when no ready one is left, and keep their connections",
            terminating(&client, applied),
        ),
        outcome(
            "internalTrafficPolicy Local: this node's endpoint only; with none here, dropped (not refused)",
            internal_local(&client),
        ),
        outcome(
            "sessionAffinity ClientIP: 15 connections in a row reach one backend, and move after the timeout",
            affinity(&client),
        ),
        outcome(
            "a Service with a TCP and a UDP port serves both",
            multi_port(&client),
        ),
        outcome(
            "a UDP client that keeps sending reaches its server's replacement pod, losing at most the request in flight",
            udp_server_cycles(&client, applied),
        ),
        outcome(
            "an external IP and a load balancer IP serve the port, from a pod and from outside (seen from node 1)",
            outside_ips(r, &mut outside_packets),
        ),
        outcome(
            "an out-of-window segment from the backend never reaches the client untranslated; the connection carries on",
            invalid_dropped(r, drops_invalid),
        ),
    ];
    (checks, outside_packets)
}

fn outcome(name: &str, r: Result<(bool, String)>) -> Check {
    match r {
        Ok((ok, detail)) => Check {
            name: name.into(),
            ok,
            detail,
        },
        Err(e) => Check {
            name: name.into(),
            ok: false,
            detail: format!("{e:#}"),
        },
    }
}

/// Datagrams to a ClusterIP without endpoints, one every 300 ms for up to 3 s, until one is
/// refused: the kernel rate-limits the ICMP errors it sends a host (its first may be held back,
/// `net.ipv4.icmp_ratelimit`), so the baseline can need a second.
fn udp_rejected(client: &str) -> Result<(bool, String)> {
    let (got, sent) = netns::run_in(client, || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(SocketAddrV4::new(super::services_lab::EMPTY_VIP, 53))?;
        sock.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut buf = [0u8; 64];
        let mut last = Ok(0);
        for sent in 1..=10 {
            sock.send(b"anyone?")?;
            last = sock.recv(&mut buf).map_err(|e| e.kind());
            if last != Err(std::io::ErrorKind::WouldBlock) {
                return Ok((last, sent));
            }
        }
        Ok((last, 10))
    })?;
    Ok((
        got == Err(std::io::ErrorKind::ConnectionRefused),
        format!("{got:?} after {sent} datagram(s)"),
    ))
}

/// Which backends `n` new connections to `vip` reach (from the calling netns).
fn served(vip: Ipv4Addr, n: usize, seed: u64) -> Result<Vec<Ipv4Addr>> {
    (0..n)
        .map(|i| Ok(request(&mut connect(vip)?, 256, seed + i as u64)?.served_on))
        .collect()
}

fn terminating_ep(ip: Ipv4Addr, node: u8) -> Endpoint {
    Endpoint {
        ip,
        node,
        condition: Condition::Terminating,
    }
}

/// Both ready, then pod 3 terminating, then pod 2 gone: new connections follow the ready ones,
/// then fall back to the terminating one; one connection held on pod 3 answers throughout.
fn terminating(client: &str, applied: &mut Applied) -> Result<(bool, String)> {
    let (both, held) = netns::run_in(client, || {
        let mut seen = Vec::new();
        let mut held = None;
        for i in 0..20 {
            let mut s = connect(TERM_VIP)?;
            let a = request(&mut s, 256, i)?;
            seen.push(a.served_on);
            if a.served_on == pod(3) && held.is_none() {
                held = Some(s);
            }
        }
        Ok((seen, held))
    })?;
    let mut held: TcpStream = held.context("none of 20 connections reached pod 3")?;
    let phase = |applied: &mut Applied, eps: Vec<Endpoint>, held: &mut TcpStream, seed| {
        applied.set(with_endpoints(catalogue(), "default/term", eps))?;
        std::thread::sleep(SETTLE);
        let new = netns::run_in(client, move || served(TERM_VIP, 20, seed)).with_context(|| {
            format!(
                "after the change to {:?}",
                applied.current_endpoints("default/term")
            )
        })?;
        let kept = request(held, 256, seed + 100).map(|a| a.served_on);
        anyhow::Ok((new, kept))
    };
    let two = vec![Endpoint::ready(pod(2), 2), terminating_ep(pod(3), 3)];
    let (ready_left, kept2) = phase(applied, two, &mut held, 1000)?;
    let (only_term, kept3) = phase(applied, vec![terminating_ep(pod(3), 3)], &mut held, 2000)?;
    applied.set(catalogue())?;
    let set = |v: &[Ipv4Addr]| v.iter().copied().collect::<BTreeSet<_>>();
    let ok = set(&both) == set(&[pod(2), pod(3)])
        && set(&ready_left) == set(&[pod(2)])
        && set(&only_term) == set(&[pod(3)])
        && kept2.as_ref().ok() == Some(&pod(3))
        && kept3.as_ref().ok() == Some(&pod(3));
    Ok((
        ok,
        format!(
            "both ready: {:?}; pod 3 terminating: {:?}, held connection {:?}; only pod 3 (terminating): {:?}, held {:?}",
            set(&both),
            set(&ready_left),
            kept2.map_err(|e| e.to_string()),
            set(&only_term),
            kept3.map_err(|e| e.to_string())
        ),
    ))
}

fn internal_local(client: &str) -> Result<(bool, String)> {
    netns::run_in(client, || {
        let here = served(LOCAL_VIP, 20, 3000)?;
        let t = Instant::now();
        let elsewhere = TcpStream::connect_timeout(
            &SocketAddrV4::new(ELSEWHERE_VIP, 80).into(),
            Duration::from_millis(1500),
        )
        .map(|_| ())
        .map_err(|e| e.kind());
        let took = t.elapsed();
        let all_here = here.iter().all(|&b| b == pod(1));
        Ok((
            all_here && elsewhere == Err(std::io::ErrorKind::TimedOut),
            format!(
                "20 to {LOCAL_VIP}: {:?}; {ELSEWHERE_VIP} (endpoints on nodes 2 and 3): {elsewhere:?} after {took:?}",
                here.iter().collect::<BTreeSet<_>>()
            ),
        ))
    })
}

fn affinity(client: &str) -> Result<(bool, String)> {
    netns::run_in(client, || {
        let row = served(STICKY_VIP, 15, 4000)?;
        let first = row[0];
        let sticky = row.iter().all(|&b| b == first);
        // After the timeout a new connection is placed afresh: one of 3 backends, so it moves
        // with probability 2/3 each try; 8 tries stay put with probability 1/6561.
        let mut moved = None;
        for attempt in 1..=8u64 {
            std::thread::sleep(Duration::from_millis(u64::from(AFFINITY_SECS) * 1000 + 500));
            let b = served(STICKY_VIP, 1, 4100 + attempt)?[0];
            if b != first {
                moved = Some((attempt, b));
                break;
            }
        }
        Ok((
            sticky && moved.is_some(),
            format!(
                "15 in a row: {:?}; after {AFFINITY_SECS} s idle: moved {moved:?} (attempt, backend)",
                row.iter().collect::<BTreeSet<_>>()
            ),
        ))
    })
}

fn multi_port(client: &str) -> Result<(bool, String)> {
    netns::run_in(client, || {
        let tcp = served(MULTI_VIP, 6, 5000)?;
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(SocketAddrV4::new(MULTI_VIP, 53))?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut udp = Vec::new();
        for i in 0..10u32 {
            if let Some(b) = udp_ask(&sock, i) {
                udp.push(b);
            }
        }
        let backends = [pod(2), pod(3)];
        Ok((
            tcp.iter().all(|b| backends.contains(b))
                && udp.len() >= 9
                && udp.iter().all(|b| backends.contains(b)),
            format!(
                "http 80/TCP: {:?}; dns 53/UDP: {} of 10 answered, by {:?}",
                tcp.iter().collect::<BTreeSet<_>>(),
                udp.len(),
                udp.iter().collect::<BTreeSet<_>>()
            ),
        ))
    })
}

/// One request on a connected UDP socket: the backend that answered it (the servers prefix
/// their address to the echo).
fn udp_ask(sock: &UdpSocket, i: u32) -> Option<Ipv4Addr> {
    sock.send(&i.to_be_bytes()).ok()?;
    let mut buf = [0u8; 64];
    loop {
        let n = sock.recv(&mut buf).ok()?;
        // An answer to an earlier request that came late: read on.
        if n == 8 && buf[4..8] == i.to_be_bytes() {
            return Some(Ipv4Addr::new(buf[0], buf[1], buf[2], buf[3]));
        }
    }
}

/// The e2e "preserve UDP traffic when server pod cycles": one client socket keeps sending to
/// the ClusterIP while the service's one endpoint moves from pod 2 to pod 3 (pod 2's server
/// still answers, as a pod would until it is gone: a stale translation would show).
///
/// One request may go unanswered: the one in flight when the proxy clears the old flow (its
/// answer from pod 2 then has no translation back, as with kube-proxy's `conntrack -D`). A
/// second one means the client was left on a cleared or stale flow.
fn udp_server_cycles(client: &str, applied: &mut Applied) -> Result<(bool, String)> {
    let sock = netns::run_in(client, || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(SocketAddrV4::new(CYCLE_VIP, 53))?;
        // Generous for a round trip within the lab: an answer later than this counts as lost.
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(sock)
    })?;
    let before: Vec<_> = (0..10).filter_map(|i| udp_ask(&sock, i)).collect();
    applied.set(with_endpoints(
        catalogue(),
        "default/cycle",
        vec![Endpoint::ready(pod(3), 3)],
    ))?;
    let switched = Instant::now();
    let (mut reached, mut lost) = (None, Vec::new());
    let mut i = 100;
    while switched.elapsed() < Duration::from_secs(5) {
        i += 1;
        let sent = switched.elapsed();
        match udp_ask(&sock, i) {
            Some(b) if b == pod(3) => {
                reached = Some(switched.elapsed());
                break;
            }
            Some(_) => {}
            None => lost.push(sent),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let after: Vec<_> = (1000..1010).filter_map(|i| udp_ask(&sock, i)).collect();
    applied.set(catalogue())?;
    let ok = before.len() == 10
        && before.iter().all(|&b| b == pod(2))
        && reached.is_some()
        && lost.len() <= 1
        && after.len() == 10
        && after.iter().all(|&b| b == pod(3));
    Ok((
        ok,
        format!(
            "before: {} of 10 answered, by {:?}; pod 3 reached {reached:?} after the change, {} unanswered meanwhile (sent {lost:?} after the change; 1 in flight may be lost); then {} of 10 answered, by {:?}",
            before.len(),
            before.iter().collect::<BTreeSet<_>>(),
            lost.len(),
            after.len(),
            after.iter().collect::<BTreeSet<_>>()
        ),
    ))
}

/// Connections to the external IP and the load balancer IP of `default/outside` (backends
/// pods 2 and 3): from pod 1, and from the underlay's outside host, which routes both
/// addresses to node 1 as a router or a load balancer in VIP mode would. From outside,
/// externalTrafficPolicy Cluster: the backends see node 1's cluster address.
fn outside_ips(r: &Names, outside_packets: &mut u64) -> Result<(bool, String)> {
    const EACH: u64 = 12;
    let node1 = super::underlay_ip(1);
    let node1_cluster = Ipv4Addr::new(10, 244, 1, 0);
    let outside = r.ns("x");
    for ip in [EXTERNAL_IP, LB_IP] {
        let (dst, via) = (format!("{ip}/32"), node1.to_string());
        netns::ip_in(&outside, &["route", "replace", &dst, "via", &via])?;
    }
    let ask = |ns: &str, ip: Ipv4Addr| {
        netns::run_in(ns, move || {
            (0..EACH)
                .map(|i| {
                    let mut s = connect_to(SocketAddrV4::new(ip, 80))?;
                    let a = request(&mut s, 2000, 9000 + i)?;
                    Ok((a.served_on, *a.peer.ip()))
                })
                .collect::<Result<Vec<_>>>()
        })
    };
    let backends = BTreeSet::from([pod(2), pod(3)]);
    let (mut ok, mut detail) = (true, Vec::new());
    for ip in [EXTERNAL_IP, LB_IP] {
        for (who, ns) in [("pod 1", r.ns("p1")), ("outside", outside.clone())] {
            let sent_before = tx_packets(&outside)?;
            let answers = ask(&ns, ip).with_context(|| format!("{who} to {ip}:80"))?;
            if who == "outside" {
                *outside_packets += tx_packets(&outside)?.saturating_sub(sent_before);
            }
            let served: BTreeSet<Ipv4Addr> = answers.iter().map(|a| a.0).collect();
            let seen: BTreeSet<Ipv4Addr> = answers.iter().map(|a| a.1).collect();
            ok &= served.is_subset(&backends) && !served.is_empty();
            if who == "outside" {
                ok &= seen == BTreeSet::from([node1_cluster]);
            }
            detail.push(format!(
                "{who} to {ip}: {} answered by {served:?}, backends saw {seen:?}",
                answers.len()
            ));
        }
    }
    Ok((ok, detail.join("; ")))
}

/// Packets sent by `ns`'s eth0 so far.
fn tx_packets(ns: &str) -> Result<u64> {
    let (ok, out) = netns::output_in(ns, &["ip", "-j", "-s", "link", "show", "eth0"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j -s link")?;
    let packets = v[0]["stats64"]["tx"]["packets"].as_u64();
    match (ok, packets) {
        (true, Some(n)) => Ok(n),
        _ => bail!("no tx packet count for eth0 in {ns}: {out}"),
    }
}

/// What the backend learns from the client's last data segment: the client's port, the next
/// sequence number it will send and the one it acknowledged.
#[derive(Debug, Clone, Copy)]
struct Seen {
    client_port: u16,
    client_next: u32,
    acked: u32,
}

/// Waits in the backend's netns (a raw TCP socket gets a copy of every TCP segment the pod
/// receives) for a data segment from pod 1 to the backend port.
fn sniff(mut sock: &socket2::Socket) -> Result<Seen> {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let Ok(n) = sock.read(&mut buf) else { continue };
        let bytes = &buf[..n];
        let ihl = usize::from(bytes.first().copied().unwrap_or(0) & 0x0f) * 4;
        if ihl < 20 || ihl > bytes.len() {
            continue;
        }
        let (ip, tcp) = bytes.split_at(ihl);
        if tcp.len() < 20 || ip[12..16] != pod(1).octets() {
            continue;
        }
        let dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
        let data_at = usize::from(tcp[12] >> 4) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let data = total.saturating_sub(ihl + data_at);
        if dst_port != BACKEND_PORT || data == 0 {
            continue;
        }
        let seq = u32::from_be_bytes(tcp[4..8].try_into().expect("4 bytes"));
        return Ok(Seen {
            client_port: u16::from_be_bytes([tcp[0], tcp[1]]),
            client_next: seq.wrapping_add(data as u32),
            acked: u32::from_be_bytes(tcp[8..12].try_into().expect("4 bytes")),
        });
    }
    bail!("no data segment from pod 1 seen in 3 s")
}

fn raw_tcp() -> Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).context("raw TCP socket")?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s)
}

/// A segment from the backend to the client far outside the client's window (2^30 past what
/// the client acknowledged), acknowledging exactly what the client sent: were it passed on
/// untranslated, the client's kernel would answer it with a reset the backend accepts.
fn out_of_window(seen: Seen) -> Vec<u8> {
    use podwire_dataplane::wire::tcp;
    let payload = b"out of window";
    let mut seg = vec![0u8; tcp::HEADER_LEN + payload.len()];
    seg[0..2].copy_from_slice(&BACKEND_PORT.to_be_bytes());
    seg[2..4].copy_from_slice(&seen.client_port.to_be_bytes());
    seg[4..8].copy_from_slice(&seen.acked.wrapping_add(1 << 30).to_be_bytes());
    seg[8..12].copy_from_slice(&seen.client_next.to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = tcp::flags::ACK | tcp::flags::PSH;
    seg[14..16].copy_from_slice(&502u16.to_be_bytes());
    seg[20..].copy_from_slice(payload);
    tcp::Packet::new_unchecked(&mut seg[..]).fill_checksum(pod(3), pod(1));
    seg
}

/// Waits in the client's netns for the injected segment (by its sequence number): where it
/// came from, as the client's TCP saw it, if it arrived.
fn arrival(sock: &socket2::Socket, seq: u32) -> Option<SocketAddrV4> {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_millis(1000);
    let mut buf = [0u8; 4096];
    let mut sock = sock;
    while Instant::now() < deadline {
        let Ok(n) = sock.read(&mut buf) else { continue };
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n < ihl + 20 || buf[ihl + 4..ihl + 8] != seq.to_be_bytes() {
            continue;
        }
        let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
        return Some(SocketAddrV4::new(
            src,
            u16::from_be_bytes([buf[ihl], buf[ihl + 1]]),
        ));
    }
    None
}

/// The e2e "should drop INVALID conntrack entries": pod 1 holds a connection through a
/// ClusterIP to pod 3; pod 3 injects an out-of-window segment toward it. Untranslated (from
/// pod 3's own address, as netfilter leaves a packet it deems INVALID), it would make the
/// client's kernel answer with a reset that pod 3 accepts. kube-proxy's iptables mode drops it
/// (KUBE-FORWARD's `ctstate INVALID`): it must not arrive. podwire judges data segments as
/// `nf_conntrack_tcp_be_liberal=1` does, as does kube-proxy's nftables mode run with
/// `--conntrack-tcp-be-liberal` (its docs' advice; it has no INVALID rule): not INVALID, so
/// translated like the rest of the connection; it must arrive from the ClusterIP, and the
/// client's TCP discards it. Either way the connection must carry on.
fn invalid_dropped(r: &Names, drops_invalid: bool) -> Result<(bool, String)> {
    let mut stream = netns::run_in(&r.ns("p1"), || {
        let mut s = connect(GUARD_VIP)?;
        request(&mut s, 256, 6000)?;
        Ok(s)
    })?;
    let sniffer = netns::spawn_in(&r.ns("p3"), || sniff(&raw_tcp()?));
    std::thread::sleep(Duration::from_millis(100));
    request(&mut stream, 300, 6001)?;
    let seen = netns::join(sniffer)?;
    let seq = seen.acked.wrapping_add(1 << 30);
    let watcher = netns::spawn_in(&r.ns("p1"), move || Ok(arrival(&raw_tcp()?, seq)));
    std::thread::sleep(Duration::from_millis(100));
    netns::run_in(&r.ns("p3"), move || {
        raw_tcp()?.send_to(&out_of_window(seen), &SocketAddrV4::new(pod(1), 0).into())?;
        Ok(())
    })?;
    let arrived = netns::join(watcher)?;
    let after = request(&mut stream, 300, 6002).map(|a| a.served_on);
    let translated = SocketAddrV4::new(GUARD_VIP, 80);
    let want = (!drops_invalid).then_some(translated);
    let ok = after.as_ref().ok() == Some(&pod(3)) && arrived == want;
    Ok((
        ok,
        format!(
            "segment seq {seq} (the client acked {}) to port {}: {}; the connection afterwards: {:?}",
            seen.acked,
            seen.client_port,
            arrived.map_or("never reached the client".into(), |a| format!("reached the client from {a}")),
            after.map_err(|e| e.to_string()),
        ),
    ))
}
