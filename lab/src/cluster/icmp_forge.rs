//! ICMP errors forged by a host on the underlay, aimed at node 1's tunnel sockets: every
//! destination-unreachable code, time exceeded, parameter problem and source quench, each
//! quoting a datagram node 1 could have sent to node 2 from the backend's port. The kernel hands
//! such an error to the socket whose 4-tuple the quote names (node 1's socket connected to node
//! 2), as it would a genuine one from a router; podwire must count it and forward on.

use super::{netns, traffic, underlay_ip, Check, LabOptions, Names, Resources};
use anyhow::{Context, Result};
use podwire_dataplane::stats::{Counter, LocalStats};
use podwire_dataplane::wire::{checksum, icmpv4, ipv4, IpProtocol};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The path MTU the forged "fragmentation needed" claims: below the underlay's 1500, so the
/// kernel takes it, and high enough that pods keep full use of the tunnel after the check
/// (node 1's route cache is flushed anyway).
pub const FORGED_MTU: u16 = 1400;

/// The kinds a receive reports from the hard errors forged (the kernel reports soft ones, net
/// and host unreachable codes 0, 1, 11, 12, time exceeded and source quench, to no socket
/// without IP_RECVERR), each of which node 1 must have counted.
pub const COUNTED_KINDS: [Counter; 6] = [
    Counter::UnderlayErrNetUnreachable,
    Counter::UnderlayErrHostUnreachable,
    Counter::UnderlayErrProtoUnreachable,
    Counter::UnderlayErrPortUnreachable,
    Counter::UnderlayErrFragNeeded,
    Counter::UnderlayErrParamProblem,
];

/// Node 1 counted every kind of error forged at it.
pub fn counted_check(stats: &[(usize, Option<LocalStats>)]) -> Check {
    let node1 = stats
        .iter()
        .find(|(i, _)| *i == 1)
        .and_then(|(_, s)| s.as_ref());
    let counts: Vec<(Counter, u64)> = COUNTED_KINDS
        .iter()
        .map(|&c| (c, node1.map_or(0, |s| s.counter(c))))
        .collect();
    Check {
        name: "node 1 counted the forged ICMP errors by kind".into(),
        ok: node1.is_some() && counts.iter().all(|&(_, n)| n > 0),
        detail: counts
            .iter()
            .map(|(c, n)| format!("{}={n}", c.as_str()))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// (type, code) of every error forged, in order.
pub fn forged_errors() -> Vec<(u8, u8)> {
    let mut all: Vec<(u8, u8)> = (0..=15)
        .map(|code| (icmpv4::kind::DEST_UNREACHABLE, code))
        .collect();
    all.extend([
        (icmpv4::kind::TIME_EXCEEDED, 0),
        (icmpv4::kind::TIME_EXCEEDED, 1),
        (icmpv4::kind::PARAMETER_PROBLEM, 0),
        (4, 0), // source quench
    ]);
    all
}

/// An ICMP error of `kind`/`code` quoting an IPv4/UDP header from `from` to `to`.
fn forged_error(kind: u8, code: u8, from: SocketAddrV4, to: SocketAddrV4) -> Vec<u8> {
    let mut quote = [0u8; ipv4::HEADER_LEN + 8];
    ipv4::Repr {
        src: *from.ip(),
        dst: *to.ip(),
        protocol: IpProtocol::Udp,
        payload_len: 1472,
        ttl: 64,
        dscp_ecn: 0,
        ident: 0x4242,
        dont_frag: true,
    }
    .emit(&mut quote[..]);
    quote[20..22].copy_from_slice(&from.port().to_be_bytes());
    quote[22..24].copy_from_slice(&to.port().to_be_bytes());
    quote[24..26].copy_from_slice(&1480u16.to_be_bytes());
    let mut msg = vec![0u8; icmpv4::HEADER_LEN + quote.len()];
    msg[0] = kind;
    msg[1] = code;
    if kind == icmpv4::kind::DEST_UNREACHABLE && code == icmpv4::unreachable::FRAG_NEEDED {
        msg[6..8].copy_from_slice(&FORGED_MTU.to_be_bytes());
    }
    msg[8..].copy_from_slice(&quote);
    let sum = checksum::checksum(&msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    msg
}

/// Forges every error at node 1 from the rogue host, then checks that node 1's daemon still
/// runs and its pod still reaches node 2's (ping and UDP).
pub fn check(res: &Arc<Mutex<Resources>>, names: &Names, opts: &LabOptions) -> Result<Check> {
    let port = opts.data_port();
    let node1 = SocketAddrV4::new(underlay_ip(1), port);
    let node2 = SocketAddrV4::new(underlay_ip(2), port);
    let errors = forged_errors();
    let sent = errors.len();
    netns::run_in(&names.ns("x"), move || {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
            .context("raw ICMP socket")?;
        for (kind, code) in errors {
            let msg = forged_error(kind, code, node1, node2);
            s.send_to(&msg, &SocketAddrV4::new(*node1.ip(), 0).into())?;
            // One at a time: a socket holds one pending error, which the next would replace.
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let alive = {
        let mut r = res.lock().expect("lab resources");
        r.children
            .iter_mut()
            .find(|(n, _)| n == "n1")
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    };
    let pings = netns::run_in(&names.ns("p1"), || {
        traffic::ping(super::pod_ip(2), 5, 84, Duration::from_secs(1))
    })?;
    let udp = udp_round_trips(names)?;
    // The forged "fragmentation needed" lowered node 1's path MTU to node 2: a pod packet
    // with DF that no longer fits gets "fragmentation needed" with the tunnel's MTU, as from
    // the kernel's VXLAN device.
    let overhead = if opts.vxlan() { 50 } else { 28 };
    let want_mtu = FORGED_MTU - overhead;
    let ip_len = opts.pod_mtu();
    let told = netns::run_in(&names.ns("p1"), move || {
        traffic::probe_frag_needed(super::pod_ip(2), ip_len, Duration::from_secs(1))
    })?;
    // Back to the full path MTU for the checks that follow.
    netns::ip_in(&names.ns("n1"), &["route", "flush", "cache"])?;
    Ok(Check {
        name: "ICMP errors forged at node 1 (every unreachable code, time exceeded, parameter problem, source quench): the daemon forwards on, and the path MTU it was told reaches the pod".into(),
        // With DirectRouting, pod traffic to node 2 does not use the tunnel at all.
        ok: alive
            && pings.received == pings.sent
            && udp == UDP_TRIPS
            && (opts.direct_routing || told == Some(want_mtu)),
        detail: format!(
            "{sent} forged; node 1's daemon running: {alive}; pings {}/{}; UDP {udp}/{UDP_TRIPS}; \
             a {ip_len}-byte DF packet to pod 2 answered with MTU {told:?} (want {want_mtu})",
            pings.received, pings.sent
        ),
    })
}

const UDP_TRIPS: u32 = 20;
const ECHO_PORT: u16 = 5207;

/// UDP request/responses from pod 1 to an echo on pod 2.
fn udp_round_trips(names: &Names) -> Result<u32> {
    let echo = netns::run_in(&names.ns("p2"), || {
        Ok(std::net::UdpSocket::bind((super::pod_ip(2), ECHO_PORT))?)
    })?;
    let server = std::thread::spawn(move || traffic::udp_echo(echo, Duration::from_secs(2)));
    let to = SocketAddrV4::new(super::pod_ip(2), ECHO_PORT);
    let got = netns::run_in(&names.ns("p1"), move || {
        traffic::udp_ping(to, UDP_TRIPS, 200, Duration::from_millis(500))
    })?;
    let _ = server.join();
    Ok(got)
}
