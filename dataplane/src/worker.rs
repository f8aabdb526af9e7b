//! The poll-mode worker pool.
//!
//! Each worker owns one TUN queue and one underlay socket (plus a raw socket for VXLAN) and runs
//! them to completion: read a
//! batch, decide it (`pipeline::process`), send it, repeat. The kernel keeps a flow on one worker
//! (TUN queues are chosen by flow hash, SO_REUSEPORT sockets by 4-tuple hash), so workers share
//! nothing on the hot path but the read-only table snapshot, which they re-load between batches.
//!
//! A worker that finds no work busy-polls for `busy_poll` and then sleeps in epoll until a port
//! becomes readable (or a timeout, to notice shutdown): an idle node costs no CPU. Only after it
//! has seen EAGAIN on both ports does it sleep, so epoll's edge-triggered wakeups are never missed.

use crate::batch::Batch;
use crate::capture::{Capture, CapturePoint};
use crate::pipeline::{self, Direction, Flows, Tables, WorkerState};
use crate::port::raw::RawIpPort;
use crate::port::socket_errors::SocketErrorKind;
use crate::port::tun::TunQueue;
use crate::port::udp::UdpPort;
use crate::port::xdp::pod::PodPorts;
use crate::port::xdp::underlay::XdpUnderlayPort;
use crate::port::xdp::xsk::XskActivity;
use crate::port::{PortError, RxPort, TxOutcome, TxPort};
use crate::stats::{Counter, LocalStats, SharedStats};
use crate::sys;
use crate::verdict::{DropReason, Verdict};
use crate::wire::MacAddr;
use arc_swap::ArcSwap;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::net::Ipv4Addr;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod fault;
pub mod l2;
mod peers;

use fault::FaultPoint;
pub use fault::{FaultInjector, NoSuchWorker};
use peers::PeerQueues;

/// Most packets a worker moves per batch (the batch's bound, re-exported for the daemon's flags).
pub use crate::batch::MAX_BATCH;

const TUN: Token = Token(0);
const UDP: Token = Token(1);
const WAKE: Token = Token(2);
const XDP: Token = Token(3);
/// Every pod port's AF_XDP socket: readiness only wakes the worker, which reads them all.
const PODS: Token = Token(4);
/// Conntrack slots each worker examines for expiry per round.
const GC_SLOTS_PER_ROUND: usize = 32;
/// Rounds between samples of the kernel's drop counters while busy (one getsockopt per
/// socket; also sampled before every sleep).
const KERNEL_DROP_SAMPLE_ROUNDS: u32 = 4096;
/// Longest epoll sleep, so a stalled wakeup can never hang a worker for long.
const IDLE_SLEEP: Duration = Duration::from_millis(200);

/// How workers run.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Packets per batch (1..=MAX_BATCH).
    pub batch_size: usize,
    /// Bytes per packet slot, headroom included.
    pub frame_size: usize,
    /// How long a worker keeps polling an idle port before sleeping in epoll.
    pub busy_poll: Duration,
    /// Pin worker i to the i-th allowed CPU.
    pub pin: bool,
    /// A receive socket per peer (see `peers`), so a flooding peer cannot starve the others.
    pub peer_queues: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch_size: 64,
            frame_size: 16384,
            busy_poll: Duration::from_micros(50),
            pin: true,
            peer_queues: true,
        }
    }
}

/// Why the pool could not start or a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker {worker}: {source}")]
    Port { worker: usize, source: PortError },
    #[error("worker {worker}: epoll: {source}")]
    Poll {
        worker: usize,
        source: std::io::Error,
    },
    #[error("worker {worker} panicked")]
    Panicked { worker: usize },
}

/// The ports one worker owns.
pub struct WorkerPorts {
    /// Its queue of the TUN device.
    pub tun: TunQueue,
    /// Its underlay socket (receives, and sends flannel-udp datagrams).
    pub udp: UdpPort,
    /// Sends packets whose outer headers the pipeline wrote (VXLAN), so each flow keeps its own
    /// UDP source port. None for flannel udp, and for VXLAN sent through `udp` instead (from
    /// our port 8472, with UDP GSO): the outer IP and UDP headers are then left to the kernel.
    pub raw: Option<RawIpPort>,
    /// `--io xdp`: an AF_XDP socket on the underlay device's queue, which receives what the
    /// XDP program steers to it and sends what `raw` would (packets with the outer IPv4 and
    /// UDP headers the pipeline wrote), with Ethernet in front. `udp` still receives what the
    /// program passes to the kernel (a queue without a socket, fragments).
    pub xdp: Option<XdpUnderlayPort>,
    /// With `raw` None and VXLAN: sockets on different source ports that VXLAN leaves
    /// through, with UDP GSO, each inner flow on one of them (by its flow hash), so flows
    /// still spread over the underlay's paths and a receiver's queues. Empty: VXLAN leaves
    /// through `udp` (port 8472).
    pub vxlan_tx: Vec<UdpPort>,
    /// `--pod-ports`: pods' veth host ends through AF_XDP, read like the TUN; packets for
    /// their pods leave through them (those for pods not found, through the TUN).
    pub pods: PodPorts,
}

/// Most source-port sockets a worker sends VXLAN through.
pub const MAX_VXLAN_TX_SOCKETS: usize = 16;

struct Worker {
    id: usize,
    ports: WorkerPorts,
    tables: Arc<ArcSwap<Tables>>,
    flows: Option<Arc<Flows>>,
    capture: Arc<Capture>,
    stats: Arc<SharedStats>,
    shutdown: Arc<AtomicBool>,
    fault: FaultPoint,
    poll: Poll,
    config: WorkerConfig,
    cpu: Option<usize>,
    /// How many workers the pool has (peers are shared out among them).
    workers: usize,
}

/// Running workers.
pub struct WorkerPool {
    handles: Vec<JoinHandle<Result<(), WorkerError>>>,
    wakers: Vec<Arc<Waker>>,
    stats: Vec<Arc<SharedStats>>,
    shutdown: Arc<AtomicBool>,
    fault: FaultPoint,
}

impl WorkerPool {
    /// Starts one worker per set of ports, all reading `tables` and, when given, tracking
    /// connections in `flows`; received packets go to `capture` while it is armed.
    pub fn start(
        config: WorkerConfig,
        tables: Arc<ArcSwap<Tables>>,
        flows: Option<Arc<Flows>>,
        capture: Arc<Capture>,
        ports: Vec<WorkerPorts>,
    ) -> Result<WorkerPool, WorkerError> {
        let cpus = if config.pin {
            sys::affinity::allowed_cpus().unwrap_or_default()
        } else {
            Vec::new()
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut pool = WorkerPool {
            handles: Vec::new(),
            wakers: Vec::new(),
            stats: Vec::new(),
            shutdown,
            fault: FaultPoint::new(),
        };
        let workers = ports.len();
        for (id, mut ports) in ports.into_iter().enumerate() {
            let poll = Poll::new().map_err(|source| WorkerError::Poll { worker: id, source })?;
            let reg = poll.registry();
            let register = |fd, token| reg.register(&mut SourceFd(&fd), token, Interest::READABLE);
            register(ports.tun.raw_fd(), TUN)
                .and_then(|_| register(ports.udp.raw_fd(), UDP))
                .and_then(|_| match ports.xdp.as_mut() {
                    Some(x) => register(x.xsk().raw_fd(), XDP),
                    None => Ok(()),
                })
                .and_then(|_| {
                    ports
                        .pods
                        .ports
                        .iter_mut()
                        .try_for_each(|p| register(p.xsk().raw_fd(), PODS))
                })
                .map_err(|source| WorkerError::Poll { worker: id, source })?;
            let waker =
                Waker::new(reg, WAKE).map_err(|source| WorkerError::Poll { worker: id, source })?;
            let stats = Arc::new(SharedStats::default());
            let worker = Worker {
                id,
                ports,
                tables: Arc::clone(&tables),
                flows: flows.clone(),
                capture: Arc::clone(&capture),
                stats: Arc::clone(&stats),
                shutdown: Arc::clone(&pool.shutdown),
                fault: pool.fault.clone(),
                poll,
                config: config.clone(),
                cpu: if cpus.is_empty() {
                    None
                } else {
                    Some(cpus[id % cpus.len()])
                },
                workers,
            };
            let handle = std::thread::Builder::new()
                .name(format!("podwire-w{id}"))
                .spawn(move || worker.run())
                .map_err(|source| WorkerError::Poll { worker: id, source })?;
            pool.handles.push(handle);
            pool.wakers.push(Arc::new(waker));
            pool.stats.push(stats);
        }
        Ok(pool)
    }

    /// Each worker's counts so far.
    pub fn stats(&self) -> Vec<LocalStats> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// The workers' shared counters, for readers on other threads (metrics).
    pub fn shared_stats(&self) -> Vec<Arc<SharedStats>> {
        self.stats.clone()
    }

    /// The first worker that has stopped on its own, if any (it failed or panicked).
    pub fn dead_worker(&self) -> Option<usize> {
        self.handles.iter().position(|h| h.is_finished())
    }

    /// A handle that makes a worker panic on request (`--fault-injection`).
    pub fn fault_injector(&self) -> FaultInjector {
        FaultInjector::new(self.fault.clone(), self.wakers.clone())
    }

    /// Wakes every worker so it sees new tables (or shutdown) now instead of after its sleep.
    pub fn wake_all(&self) {
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    /// Stops the workers and returns the first error one of them ended with.
    pub fn stop(self) -> Result<(), WorkerError> {
        self.shutdown.store(true, Ordering::Release);
        self.wake_all();
        let mut first = Ok(());
        for (id, h) in self.handles.into_iter().enumerate() {
            let r = h
                .join()
                .unwrap_or(Err(WorkerError::Panicked { worker: id }));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// What deciding a batch from the underlay needs, for one round.
struct Underlay<'a> {
    tables: &'a Tables,
    flows: Option<&'a Flows>,
    now: u64,
    capture: &'a Capture,
}

impl Underlay<'_> {
    /// Decides and sends a batch read from an underlay socket (the shared one or a peer's).
    fn run(
        &self,
        batch: &mut Batch,
        dispatch: &mut Dispatch,
        ports: &mut WorkerPorts,
        local: &mut LocalStats,
        state: &mut WorkerState,
    ) {
        if batch.is_empty() {
            return;
        }
        local.add(Counter::RxUnderlay, batch.len() as u64);
        if self.capture.wants(CapturePoint::Underlay) {
            self.capture.record(CapturePoint::Underlay, batch);
        }
        let dir = Direction::FromUnderlay;
        // With the worker's state: the ICMP errors it generates toward the wire are limited.
        pipeline::process_in_worker(self.tables, self.flows, state, self.now, dir, batch);
        dispatch.run(batch, ports, local);
    }
}

/// Counts the ICMP errors about earlier sends that `udp`'s receives returned, and hands the
/// path MTUs the kernel lowered to `learn`.
pub(crate) fn take_socket_errors(
    udp: &mut UdpPort,
    local: &mut LocalStats,
    mut learn: impl FnMut(Ipv4Addr, u32),
) {
    let errors = udp.socket_errors();
    for (kind, n) in SocketErrorKind::ALL.into_iter().zip(errors.take_counts()) {
        let c = match kind {
            SocketErrorKind::NetUnreachable => Counter::UnderlayErrNetUnreachable,
            SocketErrorKind::HostUnreachable => Counter::UnderlayErrHostUnreachable,
            SocketErrorKind::ProtocolUnreachable => Counter::UnderlayErrProtoUnreachable,
            SocketErrorKind::PortUnreachable => Counter::UnderlayErrPortUnreachable,
            SocketErrorKind::FragNeeded => Counter::UnderlayErrFragNeeded,
            SocketErrorKind::ParameterProblem => Counter::UnderlayErrParamProblem,
            SocketErrorKind::Other => Counter::UnderlayErrOther,
        };
        local.add(c, n);
    }
    for (peer, mtu) in errors.drain_path_mtus() {
        learn(peer, mtu);
    }
}

/// Adds what an AF_XDP socket did (frames moved, wakeups taken) to the counters.
fn count_xsk_activity(local: &mut LocalStats, a: XskActivity) {
    local.add(Counter::XdpRxFrames, a.rx_frames);
    local.add(Counter::XdpRxBatches, a.rx_batches);
    local.add(Counter::XdpTxFrames, a.tx_frames);
    local.add(Counter::XdpWakeups, a.wakeups);
}

/// Packet indices of one batch, per destination port.
struct Dispatch {
    to_underlay: [u16; MAX_BATCH],
    n_underlay: usize,
    to_pool: [[u16; MAX_BATCH]; MAX_VXLAN_TX_SOCKETS],
    n_pool: [usize; MAX_VXLAN_TX_SOCKETS],
    to_raw: [u16; MAX_BATCH],
    n_raw: usize,
    to_tun: [u16; MAX_BATCH],
    n_tun: usize,
    /// Per pod port: the packets for its pods and their MACs (capacity reserved at start).
    to_pods: Vec<Vec<(u16, MacAddr)>>,
}

/// Outer IPv4 (20) and UDP (8) headers of an encapsulated packet.
const OUTER_IP_UDP: usize = 28;

impl Dispatch {
    fn new(pod_ports: usize) -> Dispatch {
        Dispatch {
            to_pods: (0..pod_ports)
                .map(|_| Vec::with_capacity(MAX_BATCH))
                .collect(),
            to_underlay: [0; MAX_BATCH],
            n_underlay: 0,
            to_pool: [[0; MAX_BATCH]; MAX_VXLAN_TX_SOCKETS],
            n_pool: [0; MAX_VXLAN_TX_SOCKETS],
            to_raw: [0; MAX_BATCH],
            n_raw: 0,
            to_tun: [0; MAX_BATCH],
            n_tun: 0,
        }
    }

    /// Packet `i` for a pod of this node: through its pod port if it has one here and is
    /// resolved, else into the TUN for the kernel to deliver.
    fn queue_for_pod(&mut self, batch: &Batch, i: usize, pods: &mut PodPorts) {
        if !pods.is_empty() {
            let pkt = batch.packet(i);
            if let Some(d) = pkt.get(16..20) {
                let dst = Ipv4Addr::new(d[0], d[1], d[2], d[3]);
                if let Some((k, mac)) = pods.lookup(dst) {
                    self.to_pods[usize::from(k)].push((i as u16, mac));
                    return;
                }
                pods.missed(dst);
            }
        }
        self.to_tun[self.n_tun] = i as u16;
        self.n_tun += 1;
    }

    /// Sorts the decided batch by verdict, counts drops, and sends.
    fn run(&mut self, batch: &mut Batch, ports: &mut WorkerPorts, stats: &mut LocalStats) {
        self.n_underlay = 0;
        self.n_pool = [0; MAX_VXLAN_TX_SOCKETS];
        self.n_raw = 0;
        let pool = ports.vxlan_tx.len().min(MAX_VXLAN_TX_SOCKETS);
        self.n_tun = 0;
        for i in 0..batch.len() {
            match batch.meta(i).verdict {
                Verdict::ToUnderlay(_) => {
                    self.to_underlay[self.n_underlay] = i as u16;
                    self.n_underlay += 1;
                }
                Verdict::ToUnderlayIp(peer) if ports.raw.is_none() && ports.xdp.is_none() => {
                    // Through the UDP socket: hand it the datagram's payload (VXLAN onwards) and
                    // the peer's port from the outer UDP header the pipeline wrote.
                    let (slot, meta) = batch.slot_mut(i);
                    let outer = &slot[meta.start..meta.start + meta.len];
                    if meta.len > OUTER_IP_UDP {
                        let flow_port = u16::from_be_bytes([outer[20], outer[21]]);
                        let port = u16::from_be_bytes([outer[22], outer[23]]);
                        meta.start += OUTER_IP_UDP;
                        meta.len -= OUTER_IP_UDP;
                        meta.peer = SocketAddrV4::new(peer, port);
                        if pool > 0 {
                            let s = usize::from(flow_port) % pool;
                            self.to_pool[s][self.n_pool[s]] = i as u16;
                            self.n_pool[s] += 1;
                        } else {
                            self.to_underlay[self.n_underlay] = i as u16;
                            self.n_underlay += 1;
                        }
                    }
                }
                Verdict::ToUnderlayIp(_) => {
                    self.to_raw[self.n_raw] = i as u16;
                    self.n_raw += 1;
                }
                Verdict::ToWire(_) => {
                    // Out of the same port as the underlay's packets: whole IPv4 packets.
                    stats.add(Counter::TxWire, 1);
                    self.to_raw[self.n_raw] = i as u16;
                    self.n_raw += 1;
                }
                Verdict::ToTun => {
                    if batch.meta(i).completed_checksum {
                        stats.add(Counter::ChecksumsCompleted, 1);
                    }
                    self.queue_for_pod(batch, i, &mut ports.pods);
                }
                Verdict::IcmpToTun => {
                    stats.add(Counter::IcmpUnreachable, 1);
                    self.queue_for_pod(batch, i, &mut ports.pods);
                }
                Verdict::Drop(r) => stats.drop(r),
                // L2 mode's verdicts: the routed pipeline gives none.
                Verdict::ToPort(_) | Verdict::ToPeer(_) | Verdict::Flood | Verdict::Pending => {}
            }
        }
        if self.n_underlay > 0 {
            let to_underlay = &self.to_underlay[..self.n_underlay];
            let out = match ports.xdp.as_mut() {
                // Datagrams through AF_XDP; those to a next hop not resolved yet through the
                // socket, so the kernel resolves it.
                Some(xdp) => {
                    let items = to_underlay
                        .iter()
                        .map(|&i| (i, batch.meta(usize::from(i)).peer));
                    xdp.send_datagrams(batch, items, &mut ports.udp)
                }
                None => ports.udp.tx_batch(batch, to_underlay),
            };
            stats.add(Counter::TxUnderlay, out.sent as u64);
            stats.drops[DropReason::TxError as usize] += out.failed as u64;
        }
        for (s, port) in ports.vxlan_tx.iter_mut().enumerate().take(pool) {
            if self.n_pool[s] > 0 {
                let out = port.tx_batch(batch, &self.to_pool[s][..self.n_pool[s]]);
                stats.add(Counter::TxUnderlay, out.sent as u64);
                stats.drops[DropReason::TxError as usize] += out.failed as u64;
            }
        }
        if self.n_raw > 0 {
            let to_raw = &self.to_raw[..self.n_raw];
            let out = match (ports.xdp.as_mut(), ports.raw.as_mut()) {
                (Some(xdp), _) => xdp.tx_batch(batch, to_raw),
                (None, Some(raw)) => raw.tx_batch(batch, to_raw),
                (None, None) => TxOutcome {
                    sent: 0,
                    failed: to_raw.len(),
                },
            };
            stats.add(Counter::TxUnderlay, out.sent as u64);
            stats.drops[DropReason::TxError as usize] += out.failed as u64;
        }
        for (k, items) in self.to_pods.iter_mut().enumerate() {
            if !items.is_empty() {
                let out = ports.pods.ports[k].send(batch, items);
                stats.add(Counter::TxPods, out.sent as u64);
                stats.drops[DropReason::TxError as usize] += out.failed as u64;
                items.clear();
            }
        }
        if self.n_tun > 0 {
            let out = ports.tun.tx_batch(batch, &self.to_tun[..self.n_tun]);
            stats.add(Counter::TxTun, out.sent as u64);
            stats.drops[DropReason::TxError as usize] += out.failed as u64;
        }
    }
}

impl Worker {
    fn run(mut self) -> Result<(), WorkerError> {
        if let Some(cpu) = self.cpu {
            // Best effort: a container may forbid it; the worker works unpinned.
            let _ = sys::affinity::pin_current_thread(cpu);
        }
        let size = self.config.batch_size.clamp(1, MAX_BATCH);
        let mut from_tun = Batch::new(size, self.config.frame_size);
        let mut from_udp = Batch::new(size, self.config.frame_size);
        let mut dispatch = Dispatch::new(self.ports.pods.ports.len());
        let mut local = LocalStats::default();
        let mut events = Events::with_capacity(64);
        let mut last_work = Instant::now();
        let id = self.id;
        let port_err = |source| WorkerError::Port { worker: id, source };
        let epoch = self.flows.as_ref().map_or_else(Instant::now, |f| f.epoch);
        let mut state = WorkerState::default();
        let flows = self.flows.as_deref();
        let mut peers = self
            .config
            .peer_queues
            .then(|| PeerQueues::new(id, self.workers));
        let mut shared_drops_seen = self.ports.udp.rx_drops();
        // The tables whose peers the AF_XDP port last resolved.
        let mut xdp_primed: *const Tables = std::ptr::null();
        let mut rounds = 0u32;
        while !self.shutdown.load(Ordering::Acquire) {
            self.fault.check(id);
            let tables = self.tables.load();
            if let Some(p) = peers.as_mut().filter(|p| p.stale(&tables)) {
                let done = p.sync(&tables, &self.ports.udp, self.poll.registry());
                local.add(Counter::PeerSocketErrors, done.failed as u64);
            }
            if let Some(x) = self.ports.xdp.as_mut() {
                if !std::ptr::eq(xdp_primed, Arc::as_ptr(&tables)) {
                    xdp_primed = Arc::as_ptr(&tables);
                    let me = tables.local.public_ip;
                    x.prime(
                        tables
                            .map
                            .nodes()
                            .map(|n| n.public_ip)
                            .filter(|&ip| ip != me),
                    );
                }
            }
            // Connection-tracking (and path MTU, ICMP limit) time, once per round, in ms.
            let now = epoch.elapsed().as_millis() as u64;
            let n_tun = self.ports.tun.rx_batch(&mut from_tun).map_err(port_err)?;
            if n_tun > 0 {
                local.add(Counter::RxTun, n_tun as u64);
                if self.capture.wants(CapturePoint::Tun) {
                    self.capture.record(CapturePoint::Tun, &from_tun);
                }
                let st = &mut state;
                pipeline::process_in_worker(
                    &tables,
                    flows,
                    st,
                    now,
                    Direction::FromTun,
                    &mut from_tun,
                );
                dispatch.run(&mut from_tun, &mut self.ports, &mut local);
            }
            // Pods through AF_XDP: what they send, as if read from the TUN.
            let mut n_pods = 0;
            if !self.ports.pods.is_empty() {
                self.ports.pods.tick(Instant::now());
                for k in 0..self.ports.pods.ports.len() {
                    let port = &mut self.ports.pods.ports[k];
                    // Frames the kernel still holds to send need a kick in copy mode.
                    port.xsk().flush();
                    let n = port.rx_batch(&mut from_tun).map_err(port_err)?;
                    count_xsk_activity(&mut local, port.xsk().take_activity());
                    if n == 0 {
                        continue;
                    }
                    n_pods += n;
                    local.add(Counter::RxPods, n as u64);
                    // The pods' side of the node, as the TUN's packets are.
                    if self.capture.wants(CapturePoint::Tun) {
                        self.capture.record(CapturePoint::Tun, &from_tun);
                    }
                    for i in 0..n {
                        let (slot, meta) = from_tun.slot_mut(i);
                        let pkt = &mut slot[meta.start..meta.start + meta.len];
                        if pipeline::complete_partial_checksum(pkt) {
                            local.add(Counter::ChecksumsCompleted, 1);
                        }
                    }
                    let st = &mut state;
                    pipeline::process_in_worker(
                        &tables,
                        flows,
                        st,
                        now,
                        Direction::FromTun,
                        &mut from_tun,
                    );
                    dispatch.run(&mut from_tun, &mut self.ports, &mut local);
                }
            }
            let n_udp = self.ports.udp.rx_batch(&mut from_udp).map_err(port_err)?;
            let (capture, ports) = (&*self.capture, &mut self.ports);
            let underlay = Underlay {
                tables: &tables,
                flows,
                now,
                capture,
            };
            underlay.run(&mut from_udp, &mut dispatch, ports, &mut local, &mut state);
            let mut n_xdp = 0;
            if let Some(x) = ports.xdp.as_mut() {
                // Frames the kernel still holds to send need a kick in copy mode.
                x.xsk().flush();
                n_xdp = x.rx_batch(&mut from_udp).map_err(port_err)?;
                local.add(Counter::RxWire, x.take_wire());
                // What the socket did since the last round: frames moved and wakeups taken.
                count_xsk_activity(&mut local, x.xsk().take_activity());
                underlay.run(&mut from_udp, &mut dispatch, ports, &mut local, &mut state);
            }
            let mut n_peers = 0;
            if let Some(p) = peers.as_mut().filter(|p| p.any()) {
                // Which peer queues have datagrams: epoll, without waiting.
                match self.poll.poll(&mut events, Some(Duration::ZERO)) {
                    Ok(()) => events.iter().for_each(|e| p.mark_ready(e.token())),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(source) => return Err(WorkerError::Poll { worker: id, source }),
                }
                n_peers = p
                    .read_round(|sock| {
                        let n = ports.udp.rx_batch_from(sock, &mut from_udp)?;
                        underlay.run(&mut from_udp, &mut dispatch, ports, &mut local, &mut state);
                        Ok((n, n > 0))
                    })
                    .map_err(port_err)?;
            }
            drop(tables);
            let idle = n_tun + n_udp + n_xdp + n_peers + n_pods == 0;
            if let Some(f) = flows.filter(|_| !idle || last_work.elapsed() >= self.config.busy_poll)
            {
                // Incremental expiry: a slice of one shard per busy round and before each sleep.
                f.conntrack.gc_step(now, GC_SLOTS_PER_ROUND);
            }
            rounds = rounds.wrapping_add(1);
            let sleeping = idle && last_work.elapsed() >= self.config.busy_poll;
            if sleeping || rounds % KERNEL_DROP_SAMPLE_ROUNDS == 0 {
                // What the kernel dropped before we could read it, by queue: sampled every few
                // thousand busy rounds and before a sleep, not in the idle spin in between.
                let shared = self.ports.udp.rx_drops();
                local.add(
                    Counter::UnderlayQueueFull,
                    u64::from(shared.wrapping_sub(shared_drops_seen)),
                );
                shared_drops_seen = shared;
                if let Some(p) = peers.as_mut() {
                    local.add(Counter::PeerQueueFull, p.take_kernel_drops());
                }
                if let Some(x) = self.ports.xdp.as_mut() {
                    local.add(Counter::XdpViaKernel, x.take_via_kernel());
                }
                take_socket_errors(&mut self.ports.udp, &mut local, |peer, mtu| {
                    state.path_mtus.learn(peer, mtu, now)
                });
            }
            if !idle {
                self.stats.flush(&mut local);
                last_work = Instant::now();
            } else if sleeping {
                local.add(Counter::IdleSleeps, 1);
                self.stats.flush(&mut local);
                match self.poll.poll(&mut events, Some(IDLE_SLEEP)) {
                    Ok(()) => {
                        if let Some(p) = peers.as_mut() {
                            events.iter().for_each(|e| p.mark_ready(e.token()));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(source) => return Err(WorkerError::Poll { worker: id, source }),
                }
                last_work = Instant::now();
            }
        }
        self.stats.flush(&mut local);
        Ok(())
    }
}
