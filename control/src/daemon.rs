//! `podwire run`: the node daemon.
//!
//! Start-up: read the network config from the store, find the underlay interface, take our
//! lease (as flanneld: the one with our PublicIP, else our previous subnet, else a free one),
//! open one TUN queue and one underlay socket per worker, configure the TUN device like flanneld,
//! drop every capability the running daemon does not use (see `podwire::privs`), start the
//! workers, write subnet.env. A store that cannot be reached at start is retried with
//! backoff; a config that is wrong is reported and podwire exits.
//!
//! Then the control loop (this thread) never touches packets: it waits on the store's lease
//! watch and swaps new tables into the workers, renews our lease before it expires, takes it
//! again if someone deleted it, serves /healthz, /readyz and /metrics, writes the stats file,
//! and stops everything on SIGTERM/SIGINT, keeping the lease (as flanneld does) so a restart
//! gets the same subnet. While the store is unreachable, forwarding goes on with the last map.

use crate::services_sync::{self, ServiceSources, ServicesSink};
use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use podwire::config::{BackendConfig, NetworkConfig};
use podwire::ctl::{self, CtlState};
use podwire::etcd::{EtcdOptions, EtcdStore};
use podwire::health::{self, Health};
use podwire::kube_store::{KubeOptions, KubeStore};
use podwire::lease::LeaseAttrs;
use podwire::masq;
use podwire::netdev;
use podwire::node;
use podwire::node_lock::{self, NodeLock};
use podwire::privs;
use podwire::report;
use podwire::service_health::ServiceHealth;
use podwire::services::{self, ServicesFile};
use podwire::store::{self, ClusterView, Lease, LeaseRequest, OwnLease, Store, StoreError};
use podwire::subnet_env::{self, SubnetEnv};
use podwire::tables;
use podwire_dataplane::bridge::{self, Bridge};
use podwire_dataplane::capture::Capture;
use podwire_dataplane::conntrack;
use podwire_dataplane::nat::{Admission, Algorithm, OwnPort, PortRange, ServiceOptions, Services};
use podwire_dataplane::pipeline::{Encap, Flows, Tables, WireNat, MASQ_PORTS};
use podwire_dataplane::port::underlay::Underlay;
use podwire_dataplane::port::xdp::pod::{PodPorts, XdpPodPort};
use podwire_dataplane::port::xdp::underlay::XdpUnderlayPort;
use podwire_dataplane::port::xdp::xsk::{XskConfig, XskPort};
use podwire_dataplane::port::{raw::RawIpPort, tun, udp::UdpPort, xdp};
use podwire_dataplane::route::Ipv4Net;
use podwire_dataplane::stats::Component;
use podwire_dataplane::worker::{WorkerConfig, WorkerPool, WorkerPorts};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Where the cluster lives.
#[derive(Debug, Clone)]
pub enum StoreSpec {
    /// `file:PATH`, the embedded read-only store.
    File(String),
    Etcd(EtcdOptions),
    /// `--kube-subnet-mgr`: Node podCIDRs and annotations.
    Kube(KubeOptions),
}

impl StoreSpec {
    /// Whether the store is also where services come from (etcd's `<prefix>/services/`, the
    /// Kubernetes API's Services and EndpointSlices).
    pub fn holds_services(&self) -> bool {
        matches!(self, StoreSpec::Etcd(_) | StoreSpec::Kube(_))
    }
}

/// Everything `podwire run` is told.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub store: StoreSpec,
    /// Underlay interface candidates, tried in order (none: the default route's).
    pub iface: Vec<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub workers: usize,
    /// TUN device name (default: flannel0 for udp, flannel.<VNI> for vxlan, as flanneld names them).
    pub tun_name: Option<String>,
    pub ip_masq: bool,
    /// Accept the cluster network in iptables' FORWARD chain, as flanneld's
    /// -iptables-forward-rules.
    pub forward_rules: bool,
    pub worker: WorkerConfig,
    pub socket_buffer: usize,
    /// Send runs of same-size datagrams to one peer with UDP GSO.
    pub udp_gso: bool,
    /// Receive on the underlay with UDP GRO (falls back if refused).
    pub udp_gro: bool,
    /// VXLAN leaves through the UDP socket (source port 8472, UDP GSO) instead of the raw
    /// socket (a source port per flow, as the kernel picks them, but no GSO).
    pub vxlan_via_socket: bool,
    /// `--io xdp`: the underlay through AF_XDP sockets fed by podwire's XDP program.
    pub io_xdp: bool,
    /// `--pod-ports`: pods' veth host ends that podwire reads and writes through AF_XDP.
    pub pod_ports: Vec<String>,
    /// With `vxlan_via_socket`: source-port sockets per worker (0: send from 8472 itself).
    pub vxlan_tx_sockets: usize,
    /// Ask the TUN device for TSO superframes and partial checksums (falls back if refused).
    pub tun_offload: bool,
    /// Renew our lease this long before it expires (flanneld's `-subnet-lease-renew-margin`).
    pub renew_margin: Duration,
    /// Where to serve /healthz, /readyz and /metrics.
    pub healthz: Option<SocketAddr>,
    pub stats_file: Option<PathBuf>,
    /// Track connections (needed for services).
    pub conntrack: bool,
    /// The connection table's size and timeouts.
    pub conntrack_config: conntrack::Config,
    /// Services to translate, from this file (re-read when it changes).
    pub services_file: Option<PathBuf>,
    pub service_cidr: Ipv4Net,
    /// Where NodePorts may be (kube-apiserver's `--service-node-port-range`).
    pub node_port_range: PortRange,
    pub service_lb: Algorithm,
    /// Where `podwire ctl` finds us.
    pub ctl_socket: Option<PathBuf>,
    /// Answer `ctl fault` (tests of the supervisor path).
    pub fault_injection: bool,
    /// L2 mode (`--mode l2`): podwire is the node's bridge; None: routed mode through the TUN.
    pub l2: Option<L2Options>,
}

/// `--mode l2`'s settings.
#[derive(Debug, Clone)]
pub struct L2Options {
    /// Ageing, FDB bound and tunnel learning (the VNI comes from the network config).
    pub bridge: bridge::Config,
    /// Name of the host's bridge port (a TAP device carrying the node's gateway address).
    pub host_port: String,
    /// `--l2-pods xdp`: `podwire ctl attach` gives a pod a veth pair served through AF_XDP.
    pub pods_xdp: bool,
}

/// Static FDB entries the bridge has room for beyond its learned ones: the pods' and the
/// other nodes' host ports.
const L2_STATIC_ROOM: usize = 4096;

/// Smallest underlay MTU that leaves IPv4 pods the 576 bytes every host must accept.
const MIN_UNDERLAY_MTU: u32 = 576 + 28;
/// How long the control loop waits on the store before it looks at workers and signals again.
const TICK: Duration = Duration::from_millis(100);
/// Pause between retries of a failed lease renewal.
const RENEW_RETRY: Duration = Duration::from_secs(10);

fn open_store(spec: &StoreSpec) -> Result<Box<dyn Store>> {
    Ok(match spec {
        StoreSpec::File(s) => {
            // Read once now: a file that is not there fails at once instead of being waited
            // for as an unreachable store would be.
            if let Some(path) = s.strip_prefix("file:") {
                std::fs::File::open(path).with_context(|| format!("--store {s}"))?;
            }
            store::open(s)?
        }
        StoreSpec::Etcd(o) => Box::new(EtcdStore::new(o.clone())?),
        StoreSpec::Kube(o) => Box::new(KubeStore::new(o.clone())?),
    })
}

/// Errors no retry can fix: bad config, no lease in a read-only store, no subnet left.
fn is_permanent(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Invalid { .. }
            | StoreError::Spec(_)
            | StoreError::NoLease { .. }
            | StoreError::Exhausted
            | StoreError::TlsFile { .. }
    )
}

/// Runs `op` until it succeeds, backing off between attempts while the store is unreachable
/// (as flanneld waits for etcd). `None` if asked to shut down meanwhile.
fn retry<T>(
    what: &str,
    shutdown: &AtomicBool,
    health: &Health,
    mut op: impl FnMut() -> Result<T, StoreError>,
) -> Result<Option<T>> {
    let mut pause = Duration::from_millis(200);
    loop {
        match op() {
            Ok(v) => {
                health.store_reachable.store(true, Ordering::Relaxed);
                return Ok(Some(v));
            }
            Err(e) if is_permanent(&e) => return Err(e).context(what.to_string()),
            Err(e) => {
                health.store_errors.fetch_add(1, Ordering::Relaxed);
                health.store_reachable.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "{what}: store not ready; retrying");
            }
        }
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if shutdown.load(Ordering::Relaxed) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

/// The lease value flanneld writes for our backend. A vxlan VtepMAC is derived from the
/// PublicIP, so it is the same after every restart and peers' FDB entries stay right.
fn lease_attrs(cfg: &NetworkConfig, public_ip: Ipv4Addr) -> LeaseAttrs {
    let mut attrs = LeaseAttrs::udp(public_ip);
    if let BackendConfig::Vxlan { vni, .. } = cfg.backend {
        attrs.backend_type = Some("vxlan".into());
        attrs.backend_data = Some(json!({
            "VNI": vni.get(),
            "VtepMAC": tables::derived_vtep_mac(public_ip).to_string(),
        }));
    }
    attrs
}

/// Our subnet of the previous run, from its subnet.env (`FLANNEL_SUBNET=10.244.1.1/24`).
fn previous_subnet(path: &Path) -> Option<Ipv4Net> {
    let value = subnet_env::read_value(path, "FLANNEL_SUBNET")?;
    let (ip, len) = value.split_once('/')?;
    Some(Ipv4Net::containing(ip.parse().ok()?, len.parse().ok()?))
}

/// When to renew a lease expiring at `expires`: `margin` before, or half-way through a TTL
/// shorter than twice the margin.
fn renew_at(own: &OwnLease, margin: Duration, ttl: Duration) -> Option<SystemTime> {
    let expires = own.expires?;
    Some(expires - margin.min(ttl / 2))
}

/// Hands the leases left out of a new map to /metrics: the store's invalid ones, and those
/// `tables::build_checked` left out for a VtepMAC another node has too.
fn publish_left_out(health: &Health, store: &dyn Store, left_out: &[tables::LeftOut]) {
    let conflicts = left_out
        .iter()
        .filter(|l| matches!(l.why, tables::LeftOutReason::SharedVtepMac(_)))
        .count();
    health
        .leases_vtep_conflict
        .store(conflicts as u64, Ordering::Relaxed);
    health
        .leases_invalid
        .store(store.rejected_leases(), Ordering::Relaxed);
}

/// What services are checked against on this node: its own addresses are never an endpoint,
/// and NodePorts stay inside `range` and off podwire's own ports.
fn node_admission(
    config: &NetworkConfig,
    node_addrs: &[Ipv4Addr],
    backend_port: u16,
    healthz_port: Option<u16>,
    range: PortRange,
) -> Admission {
    let mut own_ports = vec![(PortRange::one(backend_port), OwnPort::Backend)];
    if let Some(h) = healthz_port {
        own_ports.push((PortRange::one(h), OwnPort::Healthz));
    }
    own_ports.push((
        PortRange::new(MASQ_PORTS.0, MASQ_PORTS.1),
        OwnPort::Masquerade,
    ));
    let mut node_addrs = node_addrs.to_vec();
    node_addrs.sort_unstable();
    node_addrs.dedup();
    Admission {
        node_addrs,
        pod_network: Some((config.network, config.subnet_len)),
        node_port_range: range,
        // Port 0 (a backend or healthz port the kernel picks) is no port to keep free.
        own_ports: own_ports
            .into_iter()
            .filter_map(|(r, what)| r.ok().map(|r| (r, what)))
            .collect(),
        local_subnet: None,
    }
}

/// The control loop's state once forwarding runs.
struct Control<'a> {
    store: Box<dyn Store>,
    req: LeaseRequest,
    own: OwnLease,
    live: &'a ArcSwap<Tables>,
    pool: &'a WorkerPool,
    /// DirectRouting's routes follow the map; the XDP program is told the NodePorts.
    host: &'a mut Host,
    health: &'a Health,
    lease_ttl: Duration,
    services: &'a Mutex<ServiceSources>,
    /// Services also come from the store, read here when it changes.
    services_from_store: bool,
    /// Set on SIGHUP: the services file's thread reads the file, changed or not.
    reread_services: &'a AtomicBool,
    /// The snapshot the host was told last (NodePorts, external IP routes).
    host_synced_for: Option<Arc<Services>>,
    /// Held until the daemon exits; answered every tick.
    locks: &'a [NodeLock],
}

/// The address a pod port (`--pod-ports NAME[=IP]`) holds its pod to: the one given, else the
/// only address of the lease (other than the device's own) that the kernel has resolved on the
/// device, i.e. the pod that has already spoken to its gateway. It must lie in the lease.
fn pod_port_address(
    name: &str,
    own: Ipv4Addr,
    lease: Ipv4Net,
    given: Option<Ipv4Addr>,
) -> anyhow::Result<Ipv4Addr> {
    let ip = match given {
        Some(ip) => ip,
        None => {
            let mut neighbours = podwire_dataplane::port::neighbours::Neighbours::new(name, own);
            neighbours.reread(std::time::Instant::now());
            let found: Vec<Ipv4Addr> = neighbours
                .resolved()
                .map(|(ip, _)| ip)
                .filter(|&ip| lease.contains(ip) && ip != own)
                .collect();
            match found[..] {
                [ip] => ip,
                _ => bail!(
                    "pod port {name}: cannot tell its pod's address from the neighbour table \
                     ({found:?}); give it as --pod-ports {name}=IP"
                ),
            }
        }
    };
    if !lease.contains(ip) || ip == own || ip == lease.addr() {
        bail!("pod port {name}: {ip} is no pod address of this node's lease {lease}");
    }
    Ok(ip)
}

/// Tells the XDP program which NodePorts to steer to podwire.
fn sync_node_ports(prog: &mut xdp::XdpProgram, services: &Services) {
    let ports: Vec<(u8, u16)> = services.node_ports().collect();
    match prog.set_node_ports(&ports) {
        Ok(n) => tracing::info!(node_ports = n, "NodePorts served on the node's address"),
        Err(e) => tracing::error!(error = %e, "cannot tell the XDP program the NodePorts"),
    }
}

impl Control<'_> {
    /// Swaps in a new services snapshot when the store's services changed (the services
    /// file has its own thread). Each bad service, endpoint or NodePort is left out (logged,
    /// counted) and the rest applied.
    fn reload_store_services(&mut self) {
        if !self.services_from_store {
            return;
        }
        let since = Instant::now();
        match self.store.services() {
            Ok(Some(items)) => {
                let sink = ServicesSink {
                    live: self.live,
                    pool: self.pool,
                    health: self.health,
                };
                let mut sources = services_sync::lock(self.services);
                let s = &mut *sources;
                s.store_services = services::parse_etcd_after(&mut s.store_cache, &items);
                s.apply(&sink, since);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read services from the store; keeping the last ones")
            }
        }
    }

    /// Tells the host what the live services need of it when they changed: the XDP program
    /// their NodePorts, the routing table their external IPs.
    fn sync_host_services(&mut self) {
        let live = Arc::clone(&self.live.load().services);
        if self
            .host_synced_for
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &live))
        {
            return;
        }
        if let Some(prog) = self.host.xdp.as_mut() {
            sync_node_ports(prog, &live);
        }
        if let Some(routes) = self.host.external_routes.as_mut() {
            routes.sync(live.external_ips());
        }
        self.host_synced_for = Some(live);
    }

    /// Re-reads the leases and swaps new tables in; takes our lease again if it vanished.
    fn refresh(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut leases = match self.store.leases() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "store update rejected; keeping the last good subnet map");
                return Ok(());
            }
        };
        if !leases.iter().any(|l| l.subnet == self.own.subnet) {
            tracing::warn!(subnet = %self.own.subnet, "our lease was deleted from the store; taking it again");
            self.health.lease_held.store(false, Ordering::Relaxed);
            let mut req = self.req.clone();
            req.previous = Some(self.own.subnet);
            match self.store.acquire(&req) {
                Ok(own) if own.subnet == self.own.subnet => {
                    self.own = own;
                    self.health.lease_held.store(true, Ordering::Relaxed);
                    self.health.set_lease_expiry(self.own.expires);
                    self.health
                        .lease_reacquisitions
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(subnet = %self.own.subnet, "lease taken again");
                }
                Ok(other) => bail!(
                    "our subnet {} was deleted and taken by another node meanwhile; we now hold {} \
                     (restart podwire to re-plumb the node and its pods onto it)",
                    self.own.subnet,
                    other.subnet
                ),
                Err(e) => {
                    self.health.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "cannot take our lease again yet; keeping the last map");
                    return Ok(());
                }
            }
            leases = match self.store.leases() {
                Ok(l) => l,
                Err(_) => return Ok(()),
            };
        }
        // The store's watch may not have delivered our own (re)written key yet.
        if !leases.iter().any(|l| l.subnet == self.own.subnet) {
            leases.push(Lease {
                subnet: self.own.subnet,
                attrs: self.own.attrs.clone(),
            });
        }
        let view = ClusterView {
            config: self.req.config.clone(),
            leases,
        };
        match tables::build_checked(&view, self.req.public_ip, Some(self.own.subnet)) {
            Ok((new, left_out)) => {
                let old = self.live.load();
                let new = Tables {
                    services: Arc::clone(&old.services),
                    outer_udp_checksum: old.outer_udp_checksum,
                    wire: old.wire,
                    ..new
                };
                if new.local != old.local
                    || new.peer_port != old.peer_port
                    || new.encap != old.encap
                {
                    tracing::error!(
                        old = %old.local.subnet, new = %new.local.subnet,
                        "own lease, backend port, VNI or VtepMAC changed in the store; restart podwire to apply it; keeping the last good map"
                    );
                    return Ok(());
                }
                let leases = new.map.len();
                publish_left_out(self.health, self.store.as_ref(), &left_out);
                if let Some(d) = self.host.direct.as_mut() {
                    d.sync(new.local.subnet, new.map.nodes());
                }
                // The services file's thread may have swapped new services in meanwhile.
                self.live.rcu(|cur| {
                    Arc::new(Tables {
                        services: Arc::clone(&cur.services),
                        ..Tables::clone(&new)
                    })
                });
                self.pool.wake_all();
                self.health
                    .map_leases
                    .store(leases as u64, Ordering::Relaxed);
                self.health.map_updates.fetch_add(1, Ordering::Relaxed);
                self.health.map_update_latency.observe(started.elapsed());
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
        Ok(())
    }

    fn renew(&mut self) -> Result<()> {
        match self.store.renew(&self.req, &self.own) {
            Ok(own) => {
                self.own = own;
                self.health.set_lease_expiry(self.own.expires);
                self.health.lease_renewals.fetch_add(1, Ordering::Relaxed);
                tracing::info!(subnet = %self.own.subnet, "lease renewed");
                Ok(())
            }
            Err(StoreError::LeaseLost(_)) => self.refresh(),
            Err(e) => {
                self.health.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "lease renewal failed; retrying");
                Ok(())
            }
        }
    }
}

/// Warns when the kernel's ephemeral ports overlap podwire's masquerade ports: a connection of
/// the host's own on such a port would have its answers taken by podwire.
fn warn_if_kernel_uses_masq_ports() {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|w| w.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (it.next(), it.next()) {
        if lo <= MASQ_PORTS.1 && hi >= MASQ_PORTS.0 {
            tracing::warn!(
                kernel = ?(lo, hi), podwire = ?MASQ_PORTS,
                "net.ipv4.ip_local_port_range overlaps podwire's masquerade ports; lower its end below 61000"
            );
        }
    }
}

/// Once node setup is done, before the workers start: keeps only the capabilities the running
/// daemon still uses in this mode (the table in [`podwire::privs`]), sets no_new_privs, and
/// checks that no thread of the process holds more. `port` is the backend's.
fn drop_privileges(opts: &RunOptions, port: u16) -> Result<()> {
    let needs = privs::RuntimeNeeds {
        bpf_maps: opts.io_xdp || !opts.pod_ports.is_empty(),
        pod_netns: opts.l2.is_some(),
        xdp_at_run_time: opts.l2.as_ref().is_some_and(|l| l.pods_xdp),
        // Routed mode's workers bind a socket per new peer to the backend's port.
        low_port_binds: opts.l2.is_none() && opts.worker.peer_queues && port < 1024,
    };
    let keep = privs::runtime_caps(needs);
    let dropped = privs::drop_to(&keep).context("dropping capabilities after node setup")?;
    if !dropped.missing.is_empty() {
        tracing::warn!(missing = %privs::names(&dropped.missing), "started without capabilities the running daemon uses; what needs them will fail");
    }
    if dropped.bounding_left {
        tracing::warn!("no CAP_SETPCAP: the bounding set stays as it was (no_new_privs is set)");
    }
    let others = privs::privileged_threads(&keep).context("checking the threads' capabilities")?;
    if !others.is_empty() {
        let list: Vec<String> = others.iter().map(ToString::to_string).collect();
        bail!(
            "threads still privileged after the capability drop: {}",
            list.join("; ")
        );
    }
    tracing::info!(kept = %privs::names(&dropped.kept), "node set up: dropped every other capability; no_new_privs set");
    Ok(())
}

/// What joining the cluster gave: the store, our lease, and the first tables.
struct Joined {
    store: Box<dyn Store>,
    config: NetworkConfig,
    iface: netdev::Iface,
    public_ip: Ipv4Addr,
    /// The backend's port.
    port: u16,
    /// The device's name when `--tun-name` is not given (flanneld's).
    default_tun: String,
    /// The pods' MTU: the underlay's less the backend's overhead.
    tun_mtu: u32,
    req: LeaseRequest,
    own: OwnLease,
    initial: Tables,
    lease_ttl: Duration,
}

impl Joined {
    fn lease(&self) -> Ipv4Net {
        self.initial.local.subnet
    }
}

/// Host state the node owns, undone when this is dropped (field by field, in this order),
/// which the daemon does after the workers stopped. See [`podwire::node`].
#[derive(Default)]
struct Host {
    /// `--io xdp`: the program on the underlay, told the NodePorts as services change.
    xdp: Option<xdp::XdpProgram>,
    /// The pod ports' programs (`--pod-ports`).
    pod_programs: Vec<xdp::XdpProgram>,
    /// L2 mode's pods on veth pairs (`--l2-pods xdp`).
    veths: Option<node::OwnedVeths>,
    direct: Option<netdev::DirectRoutes>,
    /// The service range routed into the TUN.
    service_route: Option<node::HostRoute>,
    /// The services' external IPs routed into the TUN, as they change.
    external_routes: Option<node::ExternalIpRoutes>,
    steering: Option<node::PodSteering>,
    masq: Option<node::MasqTable>,
    forward: Option<node::ForwardRules>,
}

/// The workers, stopped when this is dropped (an error after they started).
struct Workers(Option<WorkerPool>);

impl Workers {
    fn pool(&self) -> &WorkerPool {
        self.0.as_ref().expect("workers running")
    }

    fn stop(mut self) -> Result<(), podwire_dataplane::worker::WorkerError> {
        self.0.take().map_or(Ok(()), WorkerPool::stop)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            let _ = pool.stop();
        }
    }
}

/// A node set up and forwarding.
struct Node {
    host: Host,
    workers: Workers,
    live: Arc<ArcSwap<Tables>>,
    flows: Option<Arc<Flows>>,
    services: Mutex<ServiceSources>,
    /// Watched by its own thread while the node forwards.
    services_file: Option<ServicesFile>,
    l2: Option<ctl::L2Ctl>,
    /// Packets `podwire ctl capture` asks the workers for.
    capture: Arc<Capture>,
    /// The TUN device's (routed) or the host port's (L2) name.
    device: String,
    offload: bool,
    gro: bool,
}

/// The ctl socket's file, removed on drop.
struct CtlSocket(Option<PathBuf>);

impl Drop for CtlSocket {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// SIGTERM/SIGINT set the first flag, SIGHUP the second.
fn install_signals() -> Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&shutdown))
            .context("installing signal handlers")?;
    }
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hangup))
        .context("installing the SIGHUP handler")?;
    Ok((shutdown, hangup))
}

/// /healthz, /readyz and /metrics, once the etcd endpoints are checked for clear text.
fn start_health(opts: &RunOptions) -> Result<Arc<Health>> {
    if let StoreSpec::Etcd(o) = &opts.store {
        if let Some((what, plain)) = o.cleartext_exposure() {
            tracing::warn!(
                endpoints = %plain.join(","),
                "{what} configured, but these etcd endpoints are not TLS: they would cross the network in clear text; use https:// endpoints (and --etcd-cafile)"
            );
        }
    }
    let health = Arc::new(Health::default());
    if let Some(addr) = opts.healthz {
        let bound = health::serve(addr, Arc::clone(&health))
            .with_context(|| format!("serving /healthz on {addr}"))?;
        tracing::info!(%bound, "serving /healthz, /readyz, /metrics");
    }
    Ok(health)
}

/// Reads the network config, takes our lease and builds the first tables. `None` if asked to
/// shut down meanwhile.
fn join(opts: &RunOptions, shutdown: &AtomicBool, health: &Health) -> Result<Option<Joined>> {
    let lease_ttl = match &opts.store {
        StoreSpec::Etcd(o) => o.lease_ttl,
        // Node annotations do not expire.
        StoreSpec::File(_) | StoreSpec::Kube(_) => Duration::MAX,
    };
    // The interface is the node's own: a missing one fails now, not after the store answers.
    let iface = netdev::resolve_first_iface(&opts.iface)?;
    let mut store = open_store(&opts.store)?;
    let describe = store.describe();
    let Some(config) = retry("reading the network config", shutdown, health, || {
        store.config()
    })?
    else {
        return Ok(None);
    };
    let public_ip = opts.public_ip.unwrap_or(iface.addr);
    let (port, default_tun) = match config.backend {
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
    let tun_mtu = iface.mtu - config.backend.overhead();
    let req = LeaseRequest {
        config: config.clone(),
        public_ip,
        attrs: lease_attrs(&config, public_ip),
        previous: previous_subnet(&opts.subnet_file),
    };
    let Some(own) = retry("taking our lease", shutdown, health, || store.acquire(&req))? else {
        return Ok(None);
    };
    health.lease_held.store(true, Ordering::Relaxed);
    health.set_lease_expiry(own.expires);
    let Some(mut leases) = retry("reading the leases", shutdown, health, || store.leases())? else {
        return Ok(None);
    };
    if !leases.iter().any(|l| l.subnet == own.subnet) {
        leases.push(Lease {
            subnet: own.subnet,
            attrs: own.attrs.clone(),
        });
    }
    let view = ClusterView {
        config: config.clone(),
        leases,
    };
    let (mut initial, left_out) = tables::build_checked(&view, public_ip, Some(own.subnet))
        .with_context(|| format!("in {describe}"))?;
    publish_left_out(health, store.as_ref(), &left_out);
    // VXLAN through UDP sockets: the kernel writes the outer headers (and their checksum).
    initial.outer_udp_checksum = !opts.vxlan_via_socket;
    health
        .map_leases
        .store(initial.map.len() as u64, Ordering::Relaxed);
    tracing::info!(
        store = %describe, iface = %iface.name, iface_ip = %iface.addr, %public_ip, lease = %initial.local.subnet,
        network = %config.network, backend = config.backend.name(), port, leases = initial.map.len(), "starting"
    );
    if let Encap::Vxlan { vni, local_mac } = initial.encap {
        tracing::info!(%vni, vtep_mac = %local_mac, "vxlan: our lease advertises this VtepMAC");
    }
    Ok(Some(Joined {
        store,
        config,
        iface,
        public_ip,
        port,
        default_tun,
        tun_mtu,
        req,
        own,
        initial,
        lease_ttl,
    }))
}

/// Options that do not go together with the cluster's network, refused before any host state
/// is made. Combinations of flags alone are refused earlier, by `run_args`'s one check.
fn check_options(opts: &RunOptions, j: &Joined) -> Result<()> {
    if opts.l2.is_none() {
        return Ok(());
    }
    if !matches!(j.initial.encap, Encap::Vxlan { .. }) {
        bail!("--mode l2 carries Ethernet over VXLAN: the network's backend must be vxlan");
    }
    if matches!(
        j.config.backend,
        BackendConfig::Vxlan {
            direct_routing: true,
            ..
        }
    ) {
        bail!("--mode l2 does not support DirectRouting (pods share one L2 domain over VXLAN)");
    }
    Ok(())
}

/// Where services come from (none unless a routed node translates them), nothing read yet.
fn service_sources(opts: &RunOptions, j: &Joined) -> (ServiceSources, Option<ServicesFile>) {
    let lease = j.lease();
    let routed = opts.l2.is_none();
    let file = opts
        .services_file
        .as_deref()
        .filter(|_| routed)
        .map(ServicesFile::new);
    let options = ServiceOptions {
        algorithm: opts.service_lb,
        ..ServiceOptions::new(opts.service_cidr)
    };
    let sources = ServiceSources {
        from_store: routed && opts.store.holds_services() && opts.conntrack,
        file_services: services::Parsed::default(),
        store_services: services::Parsed::default(),
        store_cache: services::ParseCache::default(),
        options,
        current: Arc::new(Services::empty(options)),
        health_checks: None,
        admission: Admission {
            local_subnet: Some(lease),
            ..node_admission(
                &j.config,
                &[j.public_ip, j.iface.addr, lease.nth(0), lease.nth(1)],
                j.port,
                opts.healthz.map(|h| h.port()),
                opts.node_port_range,
            )
        },
    };
    (sources, file)
}

/// The parts of the node this daemon runs, whose counters `/metrics` and `ctl stats` show.
fn components(opts: &RunOptions) -> Vec<Component> {
    let mut shown = match &opts.l2 {
        Some(_) => vec![Component::Underlay, Component::Bridge],
        None => vec![Component::Tun, Component::Underlay, Component::Tunnel],
    };
    let pods_xdp = opts.l2.as_ref().is_some_and(|l2| l2.pods_xdp);
    if opts.io_xdp || pods_xdp {
        shown.push(Component::Xdp);
    }
    if opts.l2.is_none() && !opts.pod_ports.is_empty() {
        shown.push(Component::PodPorts);
    }
    shown.push(Component::Worker);
    shown
}

/// One daemon per device and underlay port in this network namespace: a second one stops
/// here, before it touches the node, naming the first one's pid.
fn lock_node(opts: &RunOptions, j: &Joined) -> Result<[NodeLock; 2]> {
    let device = match &opts.l2 {
        Some(l2) => l2.host_port.as_str(),
        None => opts.tun_name.as_deref().unwrap_or(&j.default_tun),
    };
    Ok([
        NodeLock::take(&node_lock::Owned::Device(device))?,
        NodeLock::take(&node_lock::Owned::Port(j.port))?,
    ])
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(opts: RunOptions) -> Result<()> {
    let (shutdown, hangup) = install_signals()?;
    let health = start_health(&opts)?;
    let Some(mut joined) = join(&opts, &shutdown, &health)? else {
        return Ok(());
    };
    check_options(&opts, &joined)?;
    let locks = lock_node(&opts, &joined)?;
    let mut steps = node::Steps::from_env(opts.fault_injection);
    let mut node = match &opts.l2 {
        Some(l2) => setup_bridged(&opts, l2, &joined, &health, &mut steps)?,
        None => setup_routed(&opts, &mut joined, &health, &mut steps)?,
    };
    let _ctl_socket = serve_ctl(&opts, &mut node, &health, &mut steps)?;
    SubnetEnv {
        network: joined.config.network,
        subnet: joined.lease(),
        mtu: joined.tun_mtu,
        ip_masq: opts.ip_masq,
    }
    .write(&opts.subnet_file)
    .with_context(|| format!("writing {}", opts.subnet_file.display()))?;
    health.subnet_env_written.store(true, Ordering::Relaxed);
    steps.done("subnet.env")?;
    let status = format!("forwarding {} on {}", joined.lease(), node.device);
    if let Err(e) = podwire::sd_notify::ready(&status) {
        tracing::warn!("sd_notify READY: {e}");
    }
    let bind = SocketAddrV4::new(joined.iface.addr, joined.port);
    if opts.udp_gro && !node.gro {
        tracing::warn!("the kernel refused UDP GRO on the underlay socket; one datagram per slot");
    }
    tracing::info!(device = %node.device, mtu = joined.tun_mtu, tun_offload = node.offload, udp_gro = node.gro,
        workers = opts.workers.max(1), %bind, subnet_file = %opts.subnet_file.display(), "forwarding");
    let reread_services = AtomicBool::new(false);
    let stop_watching = AtomicBool::new(false);
    let sink = ServicesSink {
        live: &node.live,
        pool: node.workers.pool(),
        health: &health,
    };
    let result = std::thread::scope(|scope| {
        if let Some(file) = node.services_file.take() {
            let (sources, sink) = (&node.services, &sink);
            let (reread, stop) = (&reread_services, &stop_watching);
            std::thread::Builder::new()
                .name("podwire-services".into())
                .spawn_scoped(scope, move || {
                    services_sync::watch_file(file, sources, sink, TICK, reread, stop)
                })
                .context("starting the services file's thread")?;
        }
        let mut control = Control {
            store: joined.store,
            req: joined.req,
            own: joined.own,
            live: &node.live,
            pool: node.workers.pool(),
            host: &mut node.host,
            health: &health,
            lease_ttl: joined.lease_ttl,
            services_from_store: services_sync::lock(&node.services).from_store,
            services: &node.services,
            reread_services: &reread_services,
            // Synced at the first tick: the initial services' external IPs get their routes.
            host_synced_for: None,
            locks: &locks,
        };
        let result = control_loop(&mut control, &opts, &shutdown, &hangup);
        stop_watching.store(true, Ordering::Relaxed);
        result
    });
    if let Err(e) = podwire::sd_notify::stopping() {
        tracing::warn!("sd_notify STOPPING: {e}");
    }
    stop(node, &opts, result)
}

/// Stops the workers, then undoes the node's setup; writes the stats file.
fn stop(node: Node, opts: &RunOptions, result: Result<Option<usize>>) -> Result<()> {
    let Node {
        host, workers, l2, ..
    } = node;
    let stats = workers.pool().stats();
    drop(l2);
    let stopped = workers.stop();
    if let Some(prog) = &host.xdp {
        match prog.counters() {
            Ok(c) => tracing::info!(
                redirected = c.redirected,
                no_socket = c.no_socket,
                passed = c.passed,
                malformed = c.malformed,
                "detaching the XDP program"
            ),
            Err(e) => tracing::warn!(error = %e, "reading the XDP program's counters"),
        }
    }
    // After the workers closed their sockets: programs off, pairs, routes, rules, table gone.
    drop(host);
    let total = report::stats_json(&stats);
    if let Some(path) = &opts.stats_file {
        report::write_json(path, &total).with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!(stats = %total["total"], "stopped");
    match result? {
        Some(w) => {
            tracing::error!(
                worker = w,
                "a worker stopped; exiting non-zero for the supervisor to restart podwire"
            );
            stopped.with_context(|| format!("worker {w} stopped"))?;
            bail!("worker {w} stopped unexpectedly");
        }
        None => stopped?,
    }
    Ok(())
}

/// Hands the workers' and programs' counters to /metrics, and serves `podwire ctl`.
fn serve_ctl(
    opts: &RunOptions,
    node: &mut Node,
    health: &Arc<Health>,
    steps: &mut node::Steps,
) -> Result<CtlSocket> {
    let pool = node.workers.pool();
    health.set_workers(pool.shared_stats());
    health.set_components(components(opts));
    // The programs' counters for /metrics and `ctl stats`, read from their maps when asked.
    health.set_xdp_programs(
        node.host
            .xdp
            .iter()
            .chain(&node.host.pod_programs)
            .map(|p| health::XdpProgramCounters::of(p.counter_reader()))
            .collect(),
    );
    let mut socket = CtlSocket(None);
    if let Some(path) = &opts.ctl_socket {
        let state = CtlState::new(
            Arc::clone(&node.live),
            node.flows.clone(),
            Arc::clone(&node.capture),
            pool.shared_stats(),
            Arc::clone(health),
        )
        .with_l2(node.l2.take())
        .with_faults(opts.fault_injection.then(|| pool.fault_injector()));
        socket.0 = Some(path.clone());
        ctl::serve(path, Arc::new(state))?;
        tracing::info!(socket = %path.display(), "podwire ctl answers here");
        steps.done("ctl socket")?;
    }
    health.map_loaded.store(true, Ordering::Relaxed);
    Ok(socket)
}

/// L2 mode: the host's bridge port (a TAP device with the gateway address and the VtepMAC),
/// the underlay socket (and AF_XDP with `--io xdp`), then the bridge's worker.
fn setup_bridged(
    opts: &RunOptions,
    l2: &L2Options,
    j: &Joined,
    health: &Health,
    steps: &mut node::Steps,
) -> Result<Node> {
    let Encap::Vxlan { vni, local_mac } = j.initial.encap else {
        bail!("--mode l2 carries Ethernet over VXLAN: the network's backend must be vxlan");
    };
    let mut host = Host::default();
    let gateway = j.lease().nth(1);
    let host_addr = podwire::l2::IfAddr {
        addr: gateway,
        prefix: j.config.network.prefix(),
    };
    // AF_XDP ports carry no virtio-net header: with them, no port of the bridge does.
    let port =
        podwire::l2::host_port(&l2.host_port, local_mac, host_addr, j.tun_mtu, !l2.pods_xdp)?;
    steps.done("host bridge port")?;
    forward_rules(opts, j, &mut host, steps)?;
    let device = port.name().to_string();
    let offload = port.offload();
    let mut udp = UdpPort::bind(
        SocketAddrV4::new(j.iface.addr, j.port),
        opts.worker.batch_size,
        opts.socket_buffer,
    )?;
    let gro = udp.set_gro(opts.udp_gro);
    // Segments of a superframe go to one VTEP alike: one GSO send.
    udp.set_gso(opts.udp_gso);
    let bridge = Bridge::new(
        bridge::Config {
            vni: vni.get(),
            ..l2.bridge.clone()
        },
        L2_STATIC_ROOM,
    );
    let underlay_xdp = if opts.io_xdp {
        Some(l2_underlay_xdp(j, &mut host, steps)?)
    } else {
        None
    };
    drop_privileges(opts, j.port)?;
    steps.done("capabilities dropped")?;
    let live = Arc::new(ArcSwap::from_pointee(j.initial.clone()));
    let (pool, handle) = WorkerPool::start_l2(
        opts.worker.clone(),
        bridge,
        Arc::clone(&live),
        port,
        local_mac,
        Underlay::new(udp, None, underlay_xdp, Vec::new()),
    )?;
    let workers = Workers(Some(pool));
    steps.done("bridge worker")?;
    health.set_fdb_entries(Arc::clone(&handle.fdb_entries));
    tracing::info!(bridge_port = %device, %host_addr, %vni, ageing_s = l2.bridge.ageing_ms / 1000, fdb_max = l2.bridge.max_learned, "L2 mode: podwire is the node's bridge");
    let veths = podwire::l2::Veths::default();
    host.veths = Some(node::OwnedVeths::new(Arc::clone(&veths)));
    let l2 = ctl::L2Ctl {
        handle,
        mtu: j.tun_mtu,
        gateway,
        pods_xdp: l2.pods_xdp,
        veths,
    };
    Ok(Node {
        host,
        workers,
        live,
        flows: None,
        services: Mutex::new(service_sources(opts, j).0),
        services_file: None,
        l2: Some(l2),
        capture: Arc::new(Capture::default()),
        device,
        offload,
        gro,
    })
}

/// L2 mode's `--io xdp`: one worker, an AF_XDP socket on queue 0. What other queues receive
/// passes to the kernel (no socket there), which hands it to the UDP socket.
fn l2_underlay_xdp(
    j: &Joined,
    host: &mut Host,
    steps: &mut node::Steps,
) -> Result<XdpUnderlayPort> {
    let iface = &j.iface;
    let role = xdp::Role::Underlay {
        local_ip: iface.addr,
        port: j.port,
        masq_ports: None,
    };
    let prog = host.xdp.insert(netdev::attach_xdp(&iface.name, role)?);
    steps.done("underlay XDP program")?;
    let queues = netdev::rx_queues(&iface.name);
    if queues > 1 {
        tracing::warn!(device = %iface.name, queues, "L2 mode reads queue 0 through AF_XDP; the other queues' datagrams come through the kernel's UDP socket");
    }
    let xsk = XskPort::bind(&iface.name, 0, XskConfig::default())?;
    prog.set_socket(0, &xsk.raw_fd())?;
    tracing::info!(device = %iface.name, zero_copy = xsk.zero_copy(), "AF_XDP socket bound");
    let mac = netdev::mac_of(&iface.name)?;
    // VXLAN without a UDP checksum, as the kernel's VXLAN device sends it.
    Ok(XdpUnderlayPort::new(xsk, &iface.name, mac, iface.addr, j.port).with_udp_checksum(false))
}

/// Routed mode: the TUN device as flanneld configures it, masquerade, services, XDP, the
/// workers' ports, DirectRouting's routes, then the workers.
fn setup_routed(
    opts: &RunOptions,
    j: &mut Joined,
    health: &Arc<Health>,
    steps: &mut node::Steps,
) -> Result<Node> {
    let workers = opts.workers.max(1);
    let mut host = Host::default();
    let wanted = opts.tun_name.as_deref().unwrap_or(&j.default_tun);
    if netdev::remove_vxlan_device(wanted)? {
        tracing::warn!(device = wanted, "removed a kernel VXLAN device of that name (flanneld's, left behind when it stopped); podwire's device takes its place");
    }
    // The device lives while its queues are open: here, then in the workers' ports.
    let (queues, device, offload) = tun::open(wanted, workers, opts.tun_offload)?;
    steps.done("TUN device")?;
    if opts.tun_offload && !offload {
        tracing::warn!("the kernel refused TUN offload (IFF_VNET_HDR, TSO); one packet per read");
    }
    netdev::configure_tun(&device, j.lease(), j.config.network, j.tun_mtu)?;
    steps.done("TUN configured")?;
    routed_masquerade(opts, j, &device, &mut host, steps)?;
    forward_rules(opts, j, &mut host, steps)?;
    let (mut services, mut services_file) = service_sources(opts, j);
    if services_file.is_some() || services.from_store {
        let server = ServiceHealth::start(Ipv4Addr::UNSPECIFIED, Arc::clone(health))
            .context("starting the service health check server")?;
        services.health_checks = Some(server);
    }
    let mut initial = j.initial.clone();
    load_services(
        &mut services,
        services_file.as_mut(),
        j,
        health,
        &mut initial,
    )?;
    if services_file.is_some() || services.from_store {
        // The service range is routed into podwire: ClusterIPs, and the hairpin address that
        // local backends answer.
        host.service_route = Some(node::HostRoute::replace(opts.service_cidr, &device)?);
        host.external_routes = Some(node::ExternalIpRoutes::new(&device));
        tracing::info!(cidr = %opts.service_cidr, hairpin = %services.options.hairpin_ip, "service range routed into podwire");
        steps.done("service route")?;
    }
    let flows = opts
        .conntrack
        .then(|| Arc::new(Flows::new(opts.conntrack_config.clone())));
    let masq_userspace = opts.io_xdp && opts.ip_masq;
    // Owning the node's address on the wire: NodePorts, and masquerade with --ip-masq.
    initial.wire = (opts.io_xdp && opts.conntrack).then_some(WireNat {
        masquerade: masq_userspace,
        masq_ports: MASQ_PORTS,
    });
    if let Some(f) = &flows {
        health.set_flows(Arc::clone(f));
    }
    if opts.io_xdp {
        let role = xdp::Role::Underlay {
            local_ip: j.iface.addr,
            port: j.port,
            masq_ports: masq_userspace.then_some(MASQ_PORTS),
        };
        let prog = host.xdp.insert(netdev::attach_xdp(&j.iface.name, role)?);
        if initial.wire.is_some() {
            sync_node_ports(prog, &initial.services);
        }
        steps.done("underlay XDP program")?;
    }
    let pods = pod_ports(opts, j, &mut host, steps)?;
    let (ports, gro) = worker_ports(opts, j, queues, pods, &mut host)?;
    steps.done("worker ports")?;
    if let BackendConfig::Vxlan {
        direct_routing: true,
        ..
    } = j.config.backend
    {
        let direct = host
            .direct
            .insert(netdev::DirectRoutes::new(j.iface.clone()));
        direct.sync(initial.local.subnet, initial.map.nodes());
        steps.done("direct routes")?;
    }
    drop_privileges(opts, j.port)?;
    steps.done("capabilities dropped")?;
    let live = Arc::new(ArcSwap::from_pointee(initial));
    let capture = Arc::new(Capture::default());
    let pool = WorkerPool::start(
        opts.worker.clone(),
        Arc::clone(&live),
        flows.clone(),
        Arc::clone(&capture),
        ports,
    )?;
    let workers = Workers(Some(pool));
    steps.done("workers")?;
    Ok(Node {
        host,
        workers,
        live,
        flows,
        services: Mutex::new(services),
        services_file,
        l2: None,
        capture,
        device,
        offload,
        gro,
    })
}

/// `--iptables-forward-rules` (on unless turned off): the cluster network accepted in iptables'
/// FORWARD chain, for hosts whose FORWARD policy is DROP.
fn forward_rules(
    opts: &RunOptions,
    j: &Joined,
    host: &mut Host,
    steps: &mut node::Steps,
) -> Result<()> {
    if !opts.forward_rules {
        return Ok(());
    }
    host.forward = Some(node::ForwardRules::install(j.config.network));
    steps.done("FORWARD accept rules")?;
    Ok(())
}

/// `--ip-masq`: the policy rules that steer pods' TCP and UDP into podwire (with `--io xdp`),
/// and flannel's masquerade rules in nftables.
fn routed_masquerade(
    opts: &RunOptions,
    j: &Joined,
    tun: &str,
    host: &mut Host,
    steps: &mut node::Steps,
) -> Result<()> {
    if !opts.ip_masq {
        return Ok(());
    }
    let lease = j.lease();
    // With --io xdp podwire owns the node's address on the wire, and masquerades itself.
    let masq_userspace = opts.io_xdp;
    if masq_userspace {
        let mut keep = vec![j.config.network];
        if opts.conntrack {
            keep.push(opts.service_cidr);
        }
        host.steering = Some(node::PodSteering::install(tun, lease, &keep)?);
        warn_if_kernel_uses_masq_ports();
        tracing::info!(
            ports = ?MASQ_PORTS,
            "pods' TCP and UDP leaving the cluster are masqueraded by podwire (to the node's address); other protocols by the kernel"
        );
        steps.done("pod steering rules")?;
    }
    let services = (opts.conntrack
        && (opts.services_file.is_some() || opts.store.holds_services()))
    .then_some(opts.service_cidr);
    host.masq = Some(node::MasqTable::install(
        j.config.network,
        lease,
        services,
        masq_userspace.then_some(tun),
    )?);
    tracing::info!(
        table = masq::TABLE,
        "pod traffic leaving the cluster is masqueraded (nftables, flannel's rules)"
    );
    steps.done("masquerade table")?;
    Ok(())
}

/// Reads the services to start with (the file's, the store's) into `initial`.
fn load_services(
    s: &mut ServiceSources,
    file: Option<&mut ServicesFile>,
    j: &mut Joined,
    health: &Health,
    initial: &mut Tables,
) -> Result<()> {
    let any = file.is_some() || s.from_store;
    if let Some(src) = file {
        s.file_services = src
            .poll()?
            .context("services file vanished while starting")?;
    }
    if s.from_store {
        match j.store.services() {
            Ok(items) => {
                let items = items.unwrap_or_default();
                s.store_services = services::parse_etcd_after(&mut s.store_cache, &items);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read services from the store yet; retrying")
            }
        }
    }
    if any {
        initial.services = s.snapshot(health);
    }
    Ok(())
}

/// Pods' veth host ends (`--pod-ports`): the program in its pod role, a socket on queue 0, and
/// the port to worker k % workers.
fn pod_ports(
    opts: &RunOptions,
    j: &Joined,
    host: &mut Host,
    steps: &mut node::Steps,
) -> Result<Vec<Vec<XdpPodPort>>> {
    let workers = opts.workers.max(1);
    let lease = j.lease();
    let mut pod_ports: Vec<Vec<XdpPodPort>> = (0..workers).map(|_| Vec::new()).collect();
    for (k, spec) in opts.pod_ports.iter().enumerate() {
        let (name, given) = match spec.split_once('=') {
            Some((name, ip)) => {
                let ip: Ipv4Addr = ip
                    .parse()
                    .with_context(|| format!("pod port {spec}: NAME=IPv4 address"))?;
                (name, Some(ip))
            }
            None => (spec.as_str(), None),
        };
        let dev = netdev::resolve_iface(Some(name)).with_context(|| format!("pod port {name}"))?;
        let pod_ip = pod_port_address(name, dev.addr, lease, given)?;
        let role = xdp::Role::Pod {
            local_ip: dev.addr,
            network: j.config.network,
            lease,
            services: opts.service_cidr,
            masquerade: opts.io_xdp && opts.ip_masq,
            pod_ip,
            node_ip: j.public_ip,
        };
        host.pod_programs.push(netdev::attach_xdp(name, role)?);
        let prog = host.pod_programs.last_mut().expect("just pushed");
        let xsk = XskPort::bind(name, 0, XskConfig::default())?;
        prog.set_socket(0, &xsk.raw_fd())?;
        let mac = netdev::mac_of(name)?;
        tracing::info!(device = %name, pod = %pod_ip, mode = ?prog.mode(), worker = k % workers, "pod port through AF_XDP, held to its pod's address");
        pod_ports[k % workers].push(XdpPodPort::new(xsk, name, mac, dev.addr, pod_ip));
        steps.done("pod port")?;
    }
    Ok(pod_ports)
}

/// One TUN queue, underlay socket(s), and with `--io xdp` an AF_XDP socket per worker; and
/// whether the kernel took UDP GRO.
fn worker_ports(
    opts: &RunOptions,
    j: &Joined,
    queues: Vec<tun::TunQueue>,
    pod_ports: Vec<Vec<XdpPodPort>>,
    host: &mut Host,
) -> Result<(Vec<WorkerPorts>, bool)> {
    let iface = &j.iface;
    let vxlan = matches!(j.config.backend, BackendConfig::Vxlan { .. });
    let iface_mac = if opts.io_xdp {
        netdev::mac_of(&iface.name)?
    } else {
        Default::default()
    };
    let underlay_queues = netdev::rx_queues(&iface.name);
    if opts.io_xdp && underlay_queues < queues.len() {
        tracing::warn!(device = %iface.name, queues = underlay_queues, workers = queues.len(), "fewer receive queues than workers: the workers past them send through the kernel and receive nothing through AF_XDP");
    }
    let mut gro = false;
    let mut ports = Vec::with_capacity(queues.len());
    for ((queue, tun), pods) in queues.into_iter().enumerate().zip(pod_ports) {
        let mut udp = UdpPort::bind(
            SocketAddrV4::new(iface.addr, j.port),
            opts.worker.batch_size,
            opts.socket_buffer,
        )?;
        // A superframe's segments, encapsulated alike, go out as one GSO send. VXLAN through
        // the raw socket (per-flow source ports) cannot use GSO.
        udp.set_gso(opts.udp_gso && (!vxlan || opts.vxlan_via_socket));
        gro = udp.set_gro(opts.udp_gro);
        // A worker past the device's receive queues has no AF_XDP socket: it sends through
        // the kernel (its underlay traffic arrives on the queues that have one).
        let has_xsk = host.xdp.is_some() && queue < underlay_queues;
        let raw = if vxlan && !opts.vxlan_via_socket && !has_xsk {
            Some(RawIpPort::open(opts.worker.batch_size, opts.socket_buffer)?)
        } else {
            None
        };
        let vxlan_tx = if vxlan && opts.vxlan_via_socket {
            vxlan_tx_sockets(opts, iface.addr)?
        } else {
            Vec::new()
        };
        let xdp = match host.xdp.as_mut().filter(|_| has_xsk) {
            Some(prog) => Some(xdp_underlay_port(
                opts,
                j,
                prog,
                queue as u32,
                iface_mac,
                vxlan,
            )?),
            None => None,
        };
        ports.push(WorkerPorts {
            tun,
            underlay: Underlay::new(udp, raw, xdp, vxlan_tx),
            pods: PodPorts::new(pods),
        });
    }
    Ok((ports, gro))
}

/// Ephemeral source ports on the underlay address: flows spread over them by hash.
fn vxlan_tx_sockets(opts: &RunOptions, addr: Ipv4Addr) -> Result<Vec<UdpPort>> {
    (0..opts.vxlan_tx_sockets)
        .map(|_| {
            let mut s = UdpPort::bind(
                SocketAddrV4::new(addr, 0),
                opts.worker.batch_size,
                opts.socket_buffer,
            )?;
            s.set_gso(opts.udp_gso);
            Ok(s)
        })
        .collect()
}

/// A worker's AF_XDP socket on the underlay's `queue`, with the kernel as its fallback.
fn xdp_underlay_port(
    opts: &RunOptions,
    j: &Joined,
    prog: &mut xdp::XdpProgram,
    queue: u32,
    iface_mac: podwire_dataplane::wire::MacAddr,
    vxlan: bool,
) -> Result<XdpUnderlayPort> {
    let iface = &j.iface;
    let xsk = XskPort::bind(&iface.name, queue, XskConfig::default())?;
    prog.set_socket(queue, &xsk.raw_fd())?;
    tracing::info!(device = %iface.name, queue, zero_copy = xsk.zero_copy(), "AF_XDP socket bound");
    // Until a next hop is resolved, the kernel sends (and resolves) for us.
    let fallback = RawIpPort::open(opts.worker.batch_size, opts.socket_buffer)?;
    Ok(
        XdpUnderlayPort::new(xsk, &iface.name, iface_mac, iface.addr, j.port)
            .with_fallback(fallback)
            // flannel's udp backend checksums its datagrams (a kernel socket).
            .with_udp_checksum(!vxlan),
    )
}

/// Until shutdown: store changes, lease renewal, worker health, the stats file. Returns the
/// index of a worker that died, if one did.
fn control_loop(
    c: &mut Control,
    opts: &RunOptions,
    shutdown: &AtomicBool,
    hangup: &AtomicBool,
) -> Result<Option<usize>> {
    let mut last_stats = Instant::now();
    let mut last_forward_check = Instant::now();
    let mut next_renew_try = Instant::now();
    let mut reachable = true;
    while !shutdown.load(Ordering::Relaxed) {
        if hangup.swap(false, Ordering::Relaxed) {
            // SIGHUP: re-read what comes from files now, changed or not.
            tracing::info!("SIGHUP: re-reading the cluster store and the services");
            c.reread_services.store(true, Ordering::Relaxed);
            c.refresh()?;
        }
        if let Some(w) = c.pool.dead_worker() {
            return Ok(Some(w));
        }
        match c.store.wait_changes(TICK) {
            Ok(changed) => {
                if !reachable {
                    tracing::info!("store reachable again");
                }
                reachable = true;
                if changed {
                    c.refresh()?;
                }
            }
            Err(e) => {
                c.health.store_errors.fetch_add(1, Ordering::Relaxed);
                if reachable {
                    tracing::warn!(error = %e, "store unreachable; forwarding on the last subnet map and reconnecting");
                }
                reachable = false;
            }
        }
        c.reload_store_services();
        c.sync_host_services();
        c.locks.iter().for_each(NodeLock::answer);
        c.health.store_reachable.store(reachable, Ordering::Relaxed);
        c.health
            .store_reconnects
            .store(c.store.reconnects(), Ordering::Relaxed);
        if let Some(at) = renew_at(&c.own, opts.renew_margin, c.lease_ttl) {
            if SystemTime::now() >= at && Instant::now() >= next_renew_try {
                next_renew_try = Instant::now() + RENEW_RETRY;
                c.renew()?;
            }
        }
        if let Some(rules) = c.host.forward.as_mut() {
            if last_forward_check.elapsed() >= podwire::forward::RESYNC {
                last_forward_check = Instant::now();
                rules.resync();
            }
        }
        if let Some(path) = &opts.stats_file {
            if last_stats.elapsed() >= Duration::from_secs(1) {
                last_stats = Instant::now();
                let _ = report::write_json(path, &report::stats_json(&c.pool.stats()));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_renewal_time() {
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
        let own = OwnLease {
            subnet: "10.244.1.0/24".parse().unwrap(),
            attrs: LeaseAttrs::udp(Ipv4Addr::new(192, 168, 0, 1)),
            expires: Some(expires),
        };
        let hour = Duration::from_secs(3600);
        // flanneld: the margin before expiry.
        assert_eq!(
            renew_at(&own, hour, 24 * hour),
            Some(expires - hour),
            "60 min before a 24 h lease runs out"
        );
        // A TTL shorter than twice the margin renews half-way instead of constantly.
        assert_eq!(
            renew_at(&own, hour, Duration::from_secs(60)),
            Some(expires - Duration::from_secs(30))
        );
        let forever = OwnLease {
            expires: None,
            ..own
        };
        assert_eq!(renew_at(&forever, hour, 24 * hour), None);
    }

    #[test]
    fn test_previous_subnet_from_subnet_env() {
        let dir = std::env::temp_dir().join(format!("podwire-prev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("subnet.env");
        assert_eq!(previous_subnet(&path), None);
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.7.0/24".parse().unwrap(),
            mtu: 1472,
            ip_masq: false,
        }
        .write(&path)
        .unwrap();
        assert_eq!(
            previous_subnet(&path),
            Some("10.244.7.0/24".parse().unwrap())
        );
        std::fs::write(&path, "FLANNEL_SUBNET=garbage\n").unwrap();
        assert_eq!(previous_subnet(&path), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_node_admission_keeps_the_nodes_addresses_and_podwires_ports() {
        use podwire_dataplane::nat::{BadAddress, DEFAULT_NODE_PORT_RANGE};
        let cfg = podwire::config::parse_net_conf(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let node = Ipv4Addr::new(192, 168, 0, 1);
        let lease: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let addrs = [node, node, lease.nth(0), lease.nth(1)];
        let wide = PortRange::new(1, 65_535).unwrap();
        let a = node_admission(&cfg, &addrs, 8285, Some(9100), wide);
        assert_eq!(a.node_addrs, [lease.nth(0), lease.nth(1), node]);
        assert_eq!(a.pod_network, Some((cfg.network, 24)));
        let owner = |port: u16| {
            a.own_ports
                .iter()
                .find(|(r, _)| r.contains(port))
                .map(|(_, w)| *w)
        };
        assert_eq!(owner(8285), Some(OwnPort::Backend));
        assert_eq!(owner(9100), Some(OwnPort::Healthz));
        assert_eq!(owner(61_000), Some(OwnPort::Masquerade));
        assert_eq!(owner(65_535), Some(OwnPort::Masquerade));
        assert_eq!(owner(2379), None);
        let options = ServiceOptions::new(
            podwire_dataplane::nat::DEFAULT_SERVICE_CIDR
                .parse()
                .unwrap(),
        );
        let bad = |ip| podwire_dataplane::nat::bad_endpoint_address(&options, &a, ip);
        assert_eq!(bad(lease.nth(1)), Some(BadAddress::Node));
        assert_eq!(
            bad(Ipv4Addr::new(10, 244, 7, 255)),
            Some(BadAddress::Broadcast)
        );
        assert_eq!(bad(Ipv4Addr::new(10, 244, 7, 2)), None);
        // No healthz endpoint, or one on a port the kernel picks: no port kept for it.
        let a = node_admission(&cfg, &addrs, 8472, Some(0), DEFAULT_NODE_PORT_RANGE);
        assert_eq!(a.own_ports.len(), 2);
        assert_eq!(a.node_port_range, DEFAULT_NODE_PORT_RANGE);
    }

    #[test]
    fn test_lease_attrs_per_backend() {
        let udp = podwire::config::parse_net_conf(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let ip = Ipv4Addr::new(10, 99, 0, 11);
        assert_eq!(
            serde_json::to_string(&lease_attrs(&udp, ip)).unwrap(),
            r#"{"PublicIP":"10.99.0.11","PublicIPv6":null}"#
        );
        let vxlan = podwire::config::parse_net_conf(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":7}}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&lease_attrs(&vxlan, ip)).unwrap(),
            r#"{"PublicIP":"10.99.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":7,"VtepMAC":"0e:70:0a:63:00:0b"}}"#
        );
    }
}
