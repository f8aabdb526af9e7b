//! `podwire-lab services-bench`: the cost of a ClusterIP as the number of services grows, for
//! podwire and for kube-proxy's iptables and nftables modes, in one run on one machine.
//!
//! Each side gets a 3-node cluster (podwire's default vxlan backend, or kernel VXLAN with
//! kube-proxy's rules on node 1, the client's node) and, for each size N, the lab's services
//! plus fillers up to N (`bench/svc-i`, two endpoints each, on pods of nodes 2 and 3). Measured
//! from node 1's pod:
//! - connect time: `connect()` to the ClusterIP of a filler drawn at random, to its return (the
//!   SYN's translation and the handshake through the tunnel), `--connections` times; and as
//!   its reference, `connect()` to the fillers' endpoints themselves (pods 2 and 3 in turn, no
//!   service), which pays the tunnel's round trip without the translation;
//! - update latency: one service's single endpoint replaced by a new one, from the start of the
//!   update (the new services file or ruleset rendered: the file about to be written,
//!   `iptables-restore` or `nft -f` about to start) to the first new connection the new
//!   endpoint answers, `--updates` times;
//! - established throughput: one TCP stream through a ClusterIP (`bench/stream`, one endpoint
//!   on node 2's pod), [`STREAM_BYTES`] from connect to the last byte counted by the receiver,
//!   [`STREAM_SAMPLES`] times; a transfer that loses a byte fails the run.
//!
//! kube-proxy is run as its full sync writes its rules: the whole iptables ruleset, or the whole
//! `ip kube-proxy` table. kube-proxy's nftables mode syncs only what changed after its first
//! sync, so its update latency here is an upper bound; its connect time is not affected.

use super::super::service_catalogue::{Proto, Service};
use super::super::services_lab::{
    self, catalogue, pod, Applied, Source, BACKEND_PORT, POD2_SECOND,
};
use super::super::{netns, set_up, with_lab, KubeProxyMode, LabOptions};
use super::BenchMode;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct ServicesBenchOptions {
    pub sizes: Vec<usize>,
    pub connections: usize,
    pub updates: usize,
    pub out: PathBuf,
    pub podwire: PathBuf,
    /// Which sides run (all three for a run file the README renders).
    pub sides: Vec<SideName>,
}

/// A side as `--sides` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SideName {
    Podwire,
    Iptables,
    Nftables,
}

impl SideName {
    fn side(self) -> Side {
        match self {
            SideName::Podwire => Side::Podwire,
            SideName::Iptables => Side::KubeProxy(KubeProxyMode::Iptables),
            SideName::Nftables => Side::KubeProxy(KubeProxyMode::Nftables),
        }
    }
}

/// Who translates node 1's pod's ClusterIP traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Podwire,
    KubeProxy(KubeProxyMode),
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Podwire => "podwire",
            Side::KubeProxy(KubeProxyMode::Iptables) => "kube-proxy-iptables",
            Side::KubeProxy(KubeProxyMode::Nftables) => "kube-proxy-nftables",
        }
    }

    fn lab(self, podwire: &std::path::Path) -> LabOptions {
        let mode = match self {
            Side::Podwire => BenchMode::PodwireVxlan,
            Side::KubeProxy(_) => BenchMode::KernelVxlan,
        };
        let mut lab = super::lab_options(mode, 1, podwire);
        lab.services = true;
        lab.nodes = 3;
        if let Side::KubeProxy(m) = self {
            lab.kube_proxy = m;
        }
        lab
    }

    fn source(self) -> Source {
        match self {
            Side::Podwire => Source::File,
            Side::KubeProxy(m) => Source::KubeProxy(m),
        }
    }
}

/// Every side, in the run file's order.
pub const SIDES: [SideName; 3] = [SideName::Podwire, SideName::Iptables, SideName::Nftables];

/// The service whose endpoint the update latency replaces.
const UPDATED_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The service the established throughput goes through, and its (and its endpoint's) port.
const STREAM_VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const STREAM_PORT: u16 = 5301;
/// Bytes per throughput sample, and samples per size.
pub const STREAM_BYTES: u64 = 300_000_000;
pub const STREAM_SAMPLES: usize = 3;
/// The bench's own services beside the lab's and the fillers: the updated one, the stream's.
const OWN_SERVICES: usize = 2;

/// The ClusterIP of filler `i` (10.100.0.0 onwards, inside the lab's 10.96.0.0/12).
fn filler_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i as u32)
}

/// The lab's services, the updated one (on `updated`), and fillers up to `size` in all.
fn services(size: usize, updated: Ipv4Addr) -> Vec<Service> {
    let mut all = catalogue();
    all.push(Service::simple(
        "bench/updated",
        UPDATED_VIP,
        Proto::Tcp,
        80,
        BACKEND_PORT,
        &[(updated, updated.octets()[2])],
    ));
    all.push(Service::simple(
        "bench/stream",
        STREAM_VIP,
        Proto::Tcp,
        STREAM_PORT,
        STREAM_PORT,
        &[(pod(2), 2)],
    ));
    let fillers = size.saturating_sub(all.len());
    all.extend((0..fillers).map(|i| {
        Service::simple(
            format!("bench/svc-{i}"),
            filler_vip(i),
            Proto::Tcp,
            80,
            BACKEND_PORT,
            &[(pod(2), 2), (pod(3), 3)],
        )
    }));
    all
}

/// One side at one size: every sample.
struct Samples {
    side: Side,
    size: usize,
    connect_us: Vec<f64>,
    /// The same connections' round trip to the endpoints directly, no service.
    direct_us: Vec<f64>,
    update_ms: Vec<f64>,
    stream_mbit_s: Vec<f64>,
}

pub fn run(opts: ServicesBenchOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("podwire-lab services-bench needs root (network namespaces, TUN devices)");
    }
    let provenance = crate::run_record::Provenance::collect();
    let started = Instant::now();
    let mut results = Vec::new();
    for side in opts.sides.iter().map(|s| s.side()) {
        let lab = side.lab(&opts.podwire);
        let got = with_lab(
            &lab,
            |o| o.is_err(),
            |res, lab, exe| {
                let names = set_up(res, lab, exe, &mut serde_json::Map::new())?;
                let stop = Arc::new(AtomicBool::new(false));
                let servers = services_lab::start_tcp_servers(&names, &stop);
                let out = measure_side(&names, side, &opts);
                stop.store(true, Ordering::Relaxed);
                for s in servers {
                    netns::join(s).context("a backend server failed")?;
                }
                out
            },
        )
        .with_context(|| format!("services bench, {}", side.name()))?;
        results.extend(got);
    }
    let doc = run_file(&provenance, &opts, &results, started.elapsed())?;
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    println!(
        "{}",
        crate::figures::services_text(&doc).unwrap_or_default()
    );
    println!(
        "wrote {} in {:.0} s",
        opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn measure_side(
    names: &super::super::Names,
    side: Side,
    opts: &ServicesBenchOptions,
) -> Result<Vec<Samples>> {
    let mut applied = Applied::new(names, &side.source());
    let mut out = Vec::new();
    let mut now_on = POD2_SECOND;
    let other = |ip: Ipv4Addr| if ip == pod(3) { POD2_SECOND } else { pod(3) };
    for &size in &opts.sizes {
        // The updated service moves too, so that its new endpoint answering shows that this
        // size's services (written in the same file or ruleset) are all in place.
        now_on = other(now_on);
        applied.set(services(size, now_on))?;
        let fillers = size.saturating_sub(catalogue().len() + OWN_SERVICES);
        wait_served(names, UPDATED_VIP, now_on)
            .with_context(|| format!("{size} services applied"))?;
        let connect_us = connects(names, fillers, opts.connections)?;
        let direct_us = direct_connects(names, opts.connections)?;
        let stream_mbit_s = (0..STREAM_SAMPLES)
            .map(|_| stream(names))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("a stream through a ClusterIP among {size} services"))?;
        let mut update_ms = Vec::new();
        for _ in 0..opts.updates {
            let next = other(now_on);
            let t = applied.set(services(size, next))?;
            wait_served(names, UPDATED_VIP, next)?;
            update_ms.push(t.elapsed().as_secs_f64() * 1e3);
            now_on = next;
        }
        eprintln!(
            "services-bench: {:<20} {size:>6} services  connect p50 {:>7.0} us p99 {:>7.0} us (direct {:>5.0} / {:>5.0})  update p50 {:>7.1} ms p99 {:>7.1} ms  stream {:>6.0} Mbit/s",
            side.name(),
            percentile(&connect_us, 0.5),
            percentile(&connect_us, 0.99),
            percentile(&direct_us, 0.5),
            percentile(&direct_us, 0.99),
            percentile(&update_ms, 0.5),
            percentile(&update_ms, 0.99),
            percentile(&stream_mbit_s, 0.5),
        );
        out.push(Samples {
            side,
            size,
            connect_us,
            direct_us,
            update_ms,
            stream_mbit_s,
        });
    }
    Ok(out)
}

/// New connections to `vip` from node 1's pod, one after another, until `want` answers one
/// (within 30 s). Each attempt gets 20 ms to connect and 20 ms for its answer (a round trip
/// in the lab takes well under a millisecond): a connection that the update cut off (podwire
/// drops a removed endpoint's packets) costs one short wait, not a long stall.
fn wait_served(names: &super::super::Names, vip: Ipv4Addr, want: Ipv4Addr) -> Result<()> {
    netns::run_in(&names.ns("p1"), move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let short = Duration::from_millis(20);
        let mut seed = 0;
        while Instant::now() < deadline {
            seed += 1;
            let answered = TcpStream::connect_timeout(&SocketAddrV4::new(vip, 80).into(), short)
                .ok()
                .and_then(|mut s| {
                    s.set_read_timeout(Some(short)).ok()?;
                    s.set_write_timeout(Some(short)).ok()?;
                    services_lab::request(&mut s, 16, seed).ok()
                });
            if answered.is_some_and(|a| a.served_on == want) {
                return Ok(());
            }
        }
        bail!("{want} never answered {vip}:80 in 30 s")
    })
}

/// `n` connect times (µs) to fillers drawn at random.
fn connects(names: &super::super::Names, fillers: usize, n: usize) -> Result<Vec<f64>> {
    netns::run_in(&names.ns("p1"), move || {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let vip = if fillers == 0 {
                UPDATED_VIP
            } else {
                filler_vip((x % fillers as u64) as usize)
            };
            let t = Instant::now();
            let s = TcpStream::connect_timeout(
                &SocketAddrV4::new(vip, 80).into(),
                Duration::from_secs(5),
            )
            .with_context(|| format!("connecting to {vip}:80"))?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
            drop(s);
        }
        Ok(times)
    })
}

/// One TCP stream of [`STREAM_BYTES`] from node 1's pod to the stream service's ClusterIP,
/// received whole by node 2's pod: Mbit/s from connect to the last byte received.
fn stream(names: &super::super::Names) -> Result<f64> {
    let timeout = Duration::from_secs(60);
    let listener = netns::run_in(&names.ns("p2"), move || {
        Ok(std::net::TcpListener::bind((pod(2), STREAM_PORT))?)
    })?;
    let sink = netns::spawn_in(&names.ns("p2"), move || {
        super::super::traffic::tcp_discard(listener, timeout)
    });
    let t0 = Instant::now();
    let to = SocketAddrV4::new(STREAM_VIP, STREAM_PORT);
    let sent = netns::run_in(&names.ns("p1"), move || {
        super::super::traffic::tcp_blast(to, STREAM_BYTES, timeout)
    });
    let received = netns::join(sink)?;
    let elapsed = t0.elapsed().as_secs_f64();
    sent?;
    if received != STREAM_BYTES {
        bail!("{received} of {STREAM_BYTES} bytes arrived through {to}");
    }
    Ok(received as f64 * 8.0 / elapsed / 1e6)
}

/// `n` connect times (µs) straight to the fillers' endpoints, pods 2 and 3 in turn.
fn direct_connects(names: &super::super::Names, n: usize) -> Result<Vec<f64>> {
    netns::run_in(&names.ns("p1"), move || {
        (0..n)
            .map(|i| {
                let to = SocketAddrV4::new(pod(2 + (i % 2) as u8), BACKEND_PORT);
                let t = Instant::now();
                let s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))
                    .with_context(|| format!("connecting to {to}"))?;
                let took = t.elapsed().as_secs_f64() * 1e6;
                drop(s);
                Ok(took)
            })
            .collect()
    })
}

/// The value below which `q` of the samples fall (nearest rank).
fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn run_file(
    provenance: &crate::run_record::Provenance,
    opts: &ServicesBenchOptions,
    results: &[Samples],
    took: Duration,
) -> Result<Value> {
    let mut doc = serde_json::to_value(provenance)?;
    doc["kind"] = json!("services");
    doc["seconds"] = json!(took.as_secs());
    doc["connections_per_size"] = json!(opts.connections);
    doc["updates_per_size"] = json!(opts.updates);
    doc["stream_bytes"] = json!(STREAM_BYTES);
    doc["streams_per_size"] = json!(STREAM_SAMPLES);
    doc["results"] = results
        .iter()
        .map(|s| {
            json!({
                "side": s.side.name(),
                "services": s.size,
                "connect_p50_us": round1(percentile(&s.connect_us, 0.5)),
                "connect_p99_us": round1(percentile(&s.connect_us, 0.99)),
                "direct_connect_p50_us": round1(percentile(&s.direct_us, 0.5)),
                "direct_connect_p99_us": round1(percentile(&s.direct_us, 0.99)),
                "update_p50_ms": round1(percentile(&s.update_ms, 0.5)),
                "update_p99_ms": round1(percentile(&s.update_ms, 0.99)),
                "stream_mbit_s": round1(percentile(&s.stream_mbit_s, 0.5)),
                "connect_us": s.connect_us.iter().map(|&v| round1(v)).collect::<Vec<_>>(),
                "direct_connect_us": s.direct_us.iter().map(|&v| round1(v)).collect::<Vec<_>>(),
                "update_ms": s.update_ms.iter().map(|&v| round1(v)).collect::<Vec<_>>(),
                "stream_mbit_s_samples": s.stream_mbit_s.iter().map(|&v| round1(v)).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.99), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn test_sizes_count_every_service() {
        assert_eq!(services(1000, pod(3)).len(), 1000);
        assert_eq!(filler_vip(9999), Ipv4Addr::new(10, 100, 39, 15));
        // Below the lab's own services, nothing is left out.
        assert_eq!(services(5, pod(3)).len(), catalogue().len() + OWN_SERVICES);
    }
}
