//! A peer that floods: node 3 sends node 1 pod traffic from its own address and port as
//! fast as it can, while pod 2 (on node 2) sends pod 1 a paced, sequence-numbered UDP stream.
//! Node 2's stream must arrive whole: node 3's flood overflows only its own queue on node 1
//! (podwire's per-peer sockets), which node 1 counts as `peer_queue_full`.
//!
//! The flood must exceed what node 1 can drain, or the check proves nothing: the counter
//! showing the flooder's losses is part of the pass condition.

use super::{netns, pod_ip, traffic, underlay_ip, vtep_mac, Check, LabOptions, Names};
use anyhow::Result;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddrV4, UdpSocket};
use std::time::Duration;

const PORT: u16 = 5207;
const FLOOD: Duration = Duration::from_secs(3);
/// Node 2's paced stream, well within what one peer may send.
const PPS: u32 = 4000;
/// Loss node 2's stream may see (scheduling on a shared 2-core machine).
const MAX_LOSS: f64 = 0.01;

/// What the flood run measured.
struct Outcome {
    flood_sent: u64,
    sent: u64,
    received: u64,
    peer_queue_full: u64,
}

fn counter(sock: &std::path::Path, name: &str) -> u64 {
    podwire::ctl::request(sock, &serde_json::json!({"cmd": "stats"}))
        .ok()
        .and_then(|v| {
            v["workers"]
                .as_array()
                .map(|ws| ws.iter().filter_map(|w| w["counters"][name].as_u64()).sum())
        })
        .unwrap_or(0)
}

/// Flooding threads: together they outrun what node 1 drains on a 2-core machine.
const FLOODERS: usize = 2;

/// Datagrams from node 3's own address and data port to node 1, 64 per sendmmsg,
/// until `duration` has passed, from `FLOODERS` threads. Their sockets join node 3's
/// SO_REUSEPORT group for the flood (node 3 gets no traffic meanwhile) and leave it after.
fn flood(
    r: &Names,
    opts: &LabOptions,
    duration: Duration,
) -> Result<Vec<std::thread::JoinHandle<Result<u64>>>> {
    let port = opts.data_port();
    let to = SocketAddrV4::new(underlay_ip(1), port);
    // A well-formed packet from a pod of node 3 to a closed port of pod 1: node 1 must
    // decapsulate it and write it to its TUN device, which costs it more than the send costs
    // node 3 (junk would be dropped faster than two threads can send it).
    let inner = traffic::inner_udp_packet(
        SocketAddrV4::new(pod_ip(3), 40_000),
        SocketAddrV4::new(pod_ip(1), PORT + 1),
        &[0xa5; 32],
    );
    let datagram = if opts.vxlan() {
        traffic::vxlan_payload(vtep_mac(1), vtep_mac(3), &inner)
    } else {
        inner
    };
    let mut threads = Vec::new();
    for _ in 0..FLOODERS {
        let sock = netns::run_in(&r.ns("n3"), move || {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_reuse_port(true)?;
            s.bind(&SocketAddrV4::new(underlay_ip(3), port).into())?;
            Ok(UdpSocket::from(s))
        })?;
        let datagram = datagram.clone();
        threads.push(std::thread::spawn(move || {
            Ok(traffic::blast_from(&sock, &datagram, to, None, duration).0)
        }));
    }
    Ok(threads)
}

fn run(r: &Names, opts: &LabOptions) -> Result<Outcome> {
    let ctl = r.dir.join("n1/ctl.sock");
    let full_before = counter(&ctl, "peer_queue_full");
    let total = u64::from(PPS) * FLOOD.as_secs();
    let receiver =
        traffic::spawn_seq_receiver(&r.ns("p1"), SocketAddrV4::new(pod_ip(1), PORT), total)?;
    let flooder = flood(r, opts, FLOOD + Duration::from_millis(500))?;
    // Let the flood build up before node 2's stream starts.
    std::thread::sleep(Duration::from_millis(250));
    let sender = netns::spawn_in(&r.ns("p2"), move || {
        traffic::paced_seq_send(
            SocketAddrV4::new(pod_ip(2), 0),
            SocketAddrV4::new(pod_ip(1), PORT),
            PPS,
            total,
            200,
        )
    });
    let sent = netns::join(sender)?;
    let mut flood_sent = 0;
    for t in flooder {
        flood_sent += netns::join(t)?;
    }
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("fairness receiver panicked"))?
        .received;
    Ok(Outcome {
        flood_sent,
        sent,
        received,
        peer_queue_full: counter(&ctl, "peer_queue_full").saturating_sub(full_before),
    })
}

/// The check: node 2's stream whole despite node 3's flood, which node 1 dropped in node 3's
/// own queue.
pub fn check(r: &Names, opts: &LabOptions) -> Result<Check> {
    let o = run(r, opts)?;
    let loss = 1.0 - o.received as f64 / o.sent.max(1) as f64;
    Ok(Check {
        name: "a peer flooding node 1 cannot starve another peer's traffic (per-peer queues)"
            .into(),
        ok: o.sent > 0 && loss <= MAX_LOSS && o.peer_queue_full > 0,
        detail: format!(
            "node 3 flooded {} datagrams in {} s ({:.0} kpps); node 2's stream: {} of {} arrived ({:.2}% lost); node 1 dropped {} of node 3's in its own queue",
            o.flood_sent,
            FLOOD.as_secs_f64() + 0.5,
            o.flood_sent as f64 / (FLOOD.as_secs_f64() + 0.5) / 1000.0,
            o.received,
            o.sent,
            loss * 100.0,
            o.peer_queue_full,
        ),
    })
}
