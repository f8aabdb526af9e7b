//! `podwire run`: the node daemon.
//!
//! Start-up: read the store, find the underlay interface and our lease, open one TUN queue and
//! one underlay socket per worker, configure the TUN device like flanneld, write subnet.env,
//! start the workers. Then the control loop (this thread) never touches packets: it re-reads the
//! store when it changes and swaps new tables into the workers, writes the stats file, and stops
//! everything on SIGTERM/SIGINT. A malformed store update is logged and the last good tables stay.

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use podwire::config::BackendConfig;
use podwire::netdev;
use podwire::report;
use podwire::store::{self, Store};
use podwire::subnet_env::SubnetEnv;
use podwire::tables;
use podwire_dataplane::pipeline::Encap;
use podwire_dataplane::pipeline::Tables;
use podwire_dataplane::port::{raw::RawIpPort, tun, udp::UdpPort};
use podwire_dataplane::worker::{WorkerConfig, WorkerPool, WorkerPorts};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything `podwire run` is told.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub store: String,
    pub iface: Option<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub workers: usize,
    /// TUN device name (default: flannel0 for udp, flannel.<VNI> for vxlan, as flanneld names them).
    pub tun_name: Option<String>,
    pub ip_masq: bool,
    pub worker: WorkerConfig,
    pub socket_buffer: usize,
    pub store_poll: Duration,
    pub stats_file: Option<PathBuf>,
}

/// Smallest underlay MTU that leaves IPv4 pods the 576 bytes every host must accept.
const MIN_UNDERLAY_MTU: u32 = 576 + 28;

fn swap_if_changed(
    store: &mut dyn Store,
    public_ip: Ipv4Addr,
    live: &ArcSwap<Tables>,
    pool: &WorkerPool,
    direct: &mut Option<netdev::DirectRoutes>,
) {
    if !store.changed() {
        return;
    }
    let started = Instant::now();
    let view = match store.load() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "store update rejected; keeping the last good subnet map");
            return;
        }
    };
    match tables::build(&view, public_ip) {
        Ok(new) => {
            let old = live.load();
            if new.local != old.local || new.peer_port != old.peer_port || new.encap != old.encap {
                tracing::error!(
                    old = %old.local.subnet, new = %new.local.subnet,
                    "own lease, backend port, VNI or VtepMAC changed in the store; restart podwire to apply it; keeping the last good map"
                );
                return;
            }
            let leases = new.map.len();
            if let Some(d) = direct.as_mut() {
                d.sync(new.local.subnet, new.map.nodes());
            }
            live.store(Arc::new(new));
            pool.wake_all();
            tracing::info!(
                leases,
                took_us = started.elapsed().as_micros() as u64,
                "subnet map updated"
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "store update rejected; keeping the last good subnet map")
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(opts: RunOptions) -> Result<()> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&shutdown))
            .context("installing signal handlers")?;
    }
    let mut store = store::open(&opts.store)?;
    let view = store
        .load()
        .with_context(|| format!("reading {}", store.describe()))?;
    let iface = netdev::resolve_iface(opts.iface.as_deref())?;
    let public_ip = opts.public_ip.unwrap_or(iface.addr);
    let (port, default_tun) = match view.config.backend {
        BackendConfig::Udp { port } => (port, "flannel0".to_string()),
        BackendConfig::Vxlan { vni, port, .. } => (port, format!("flannel.{vni}")),
    };
    if iface.mtu < MIN_UNDERLAY_MTU {
        bail!(
            "{} has MTU {}: too small to carry pods (need at least {MIN_UNDERLAY_MTU})",
            iface.name,
            iface.mtu
        );
    }
    let tun_mtu = iface.mtu - view.config.backend.overhead();
    let initial =
        tables::build(&view, public_ip).with_context(|| format!("in {}", store.describe()))?;
    let lease = initial.local.subnet;
    tracing::info!(
        store = %store.describe(), iface = %iface.name, iface_ip = %iface.addr, %public_ip, %lease,
        network = %view.config.network, backend = view.config.backend.name(), port, leases = initial.map.len(), "starting"
    );
    if let Encap::Vxlan { vni, local_mac } = initial.encap {
        tracing::info!(%vni, vtep_mac = %local_mac, "vxlan: our lease must advertise this VtepMAC for peers to reach us");
    }

    let workers = opts.workers.max(1);
    let (queues, tun_name) = tun::open(opts.tun_name.as_deref().unwrap_or(&default_tun), workers)?;
    netdev::configure_tun(&tun_name, lease, view.config.network, tun_mtu)?;
    let bind = SocketAddrV4::new(iface.addr, port);
    let vxlan = matches!(view.config.backend, BackendConfig::Vxlan { .. });
    let mut ports = Vec::with_capacity(workers);
    for tun in queues {
        let udp = UdpPort::bind(bind, opts.worker.batch_size, opts.socket_buffer)?;
        let raw = if vxlan {
            Some(RawIpPort::open(opts.worker.batch_size, opts.socket_buffer)?)
        } else {
            None
        };
        ports.push(WorkerPorts { tun, udp, raw });
    }

    SubnetEnv {
        network: view.config.network,
        subnet: lease,
        mtu: tun_mtu,
        ip_masq: opts.ip_masq,
    }
    .write(&opts.subnet_file)
    .with_context(|| format!("writing {}", opts.subnet_file.display()))?;

    let mut direct = match view.config.backend {
        BackendConfig::Vxlan {
            direct_routing: true,
            ..
        } => {
            let mut d = netdev::DirectRoutes::new(iface.clone());
            d.sync(initial.local.subnet, initial.map.nodes());
            Some(d)
        }
        _ => None,
    };
    let live = Arc::new(ArcSwap::from_pointee(initial));
    let pool = WorkerPool::start(opts.worker.clone(), Arc::clone(&live), ports)?;
    tracing::info!(tun = %tun_name, mtu = tun_mtu, workers, %bind, subnet_file = %opts.subnet_file.display(), "forwarding");

    let tick = Duration::from_millis(100);
    let mut last_poll = Instant::now();
    let mut last_stats = Instant::now();
    let mut failure = None;
    while !shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(tick);
        if let Some(w) = pool.dead_worker() {
            failure = Some(w);
            break;
        }
        if last_poll.elapsed() >= opts.store_poll {
            last_poll = Instant::now();
            swap_if_changed(store.as_mut(), public_ip, &live, &pool, &mut direct);
        }
        if let Some(path) = &opts.stats_file {
            if last_stats.elapsed() >= Duration::from_secs(1) {
                last_stats = Instant::now();
                let _ = report::write_json(path, &report::stats_json(&pool.stats()));
            }
        }
    }
    let stats = pool.stats();
    let stopped = pool.stop();
    if let Some(d) = direct.as_mut() {
        d.clear();
    }
    let total = report::stats_json(&stats);
    if let Some(path) = &opts.stats_file {
        report::write_json(path, &total).with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!(stats = %total["total"], "stopped");
    if let Some(w) = failure {
        stopped.with_context(|| format!("worker {w} stopped"))?;
        bail!("worker {w} stopped unexpectedly");
    }
    stopped?;
    Ok(())
}
