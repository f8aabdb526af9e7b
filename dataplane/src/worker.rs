//! The poll-mode worker pool.
//!
//! Each worker runs one [`event_loop::EventLoop`] over the ports of its mode, to completion:
//! read a batch, decide it (the pipeline), carry out the verdicts, repeat. In routed mode a
//! worker owns one TUN queue and its underlay ([`Underlay`]: a UDP socket, and a raw or AF_XDP
//! socket); the kernel keeps a flow on one worker (TUN queues are chosen by flow hash,
//! SO_REUSEPORT sockets by 4-tuple hash), so workers share nothing on the hot path but the
//! read-only table snapshot, which they re-load between batches. In L2 mode one worker owns
//! the bridge and all its ports (`l2`).
//!
//! A worker that finds no work busy-polls for `busy_poll` and then sleeps in epoll until a port
//! becomes readable (or a timeout, to notice shutdown): an idle node costs no CPU. Only after it
//! has seen EAGAIN on its ports does it sleep, so epoll's edge-triggered wakeups are never
//! missed.

use crate::batch::Batch;
use crate::capture::Capture;
use crate::pipeline::{Flows, Tables, WorkerState};
use crate::port::socket_errors::SocketErrorKind;
use crate::port::tun::TunQueue;
use crate::port::udp::UdpPort;
use crate::port::underlay::Underlay;
use crate::port::xdp::pod::PodPorts;
use crate::port::xdp::xsk::XskActivity;
use crate::port::{PortError, TxOutcome};
use crate::stats::{Counter, LocalStats, SharedStats};
use crate::sys;
use crate::verdict::DropReason;
use arc_swap::ArcSwap;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Registry, Token, Waker};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod dispatch;
mod event_loop;
mod fault;
pub mod l2;
mod peers;
mod routed;

use event_loop::EventLoop;
use fault::FaultPoint;
pub use fault::{FaultInjector, NoSuchWorker};
use peers::PeerQueues;

/// Most packets a worker moves per batch (the batch's bound, re-exported for the daemon's flags).
pub use crate::batch::MAX_BATCH;
/// Most source-port sockets a worker sends VXLAN through.
pub use crate::port::underlay::MAX_FLOW_SOCKETS as MAX_VXLAN_TX_SOCKETS;

// Epoll tokens, the same in both modes.
const TUN: Token = Token(0);
const UDP: Token = Token(1);
const WAKE: Token = Token(2);
const XDP: Token = Token(3);
/// Every pod port's AF_XDP socket: readiness only wakes the worker, which reads them all.
const PODS: Token = Token(4);
/// Tokens from here on are ports added at run time (peer queues; bridge ports), by slot.
const FIRST_SLOT_TOKEN: usize = 16;
/// Conntrack slots each worker examines for expiry per round.
const GC_SLOTS_PER_ROUND: usize = 32;
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

/// The ports one routed worker owns.
pub struct WorkerPorts {
    /// Its queue of the TUN device.
    pub tun: TunQueue,
    /// Its way to the other nodes.
    pub underlay: Underlay,
    /// `--pod-ports`: pods' veth host ends through AF_XDP, read like the TUN; packets for
    /// their pods leave through them (those for pods not found, through the TUN).
    pub pods: PodPorts,
}

impl WorkerPorts {
    /// Registers every port with `registry`, each under its mode's token.
    fn register(&mut self, registry: &Registry) -> std::io::Result<()> {
        let register = |fd, token| registry.register(&mut SourceFd(&fd), token, Interest::READABLE);
        register(self.tun.raw_fd(), TUN)?;
        let (socket, xdp) = self.underlay.raw_fds();
        register(socket, UDP)?;
        if let Some(fd) = xdp {
            register(fd, XDP)?;
        }
        self.pods
            .ports
            .iter_mut()
            .try_for_each(|p| register(p.xsk().raw_fd(), PODS))
    }
}

/// The CPU worker `id` runs on when pinned: the allowed CPUs in turn.
fn cpu_for(id: usize, cpus: &[usize]) -> Option<usize> {
    (!cpus.is_empty()).then(|| cpus[id % cpus.len()])
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
            let err = |source| WorkerError::Poll { worker: id, source };
            let poll = Poll::new().map_err(err)?;
            ports.register(poll.registry()).map_err(err)?;
            let waker = Waker::new(poll.registry(), WAKE).map_err(err)?;
            let stats = Arc::new(SharedStats::default());
            let size = config.batch_size.clamp(1, MAX_BATCH);
            let mut routed = routed::Routed {
                dispatch: dispatch::Dispatch::new(ports.pods.ports.len()),
                shared_drops_seen: ports.underlay.socket().rx_drops(),
                ports,
                peers: config.peer_queues.then(|| PeerQueues::new(id, workers)),
                registry: poll.registry().try_clone().map_err(err)?,
                flows: flows.clone(),
                capture: Arc::clone(&capture),
                state: WorkerState::default(),
                from_pods: Batch::new(size, config.frame_size),
                from_underlay: Batch::new(size, config.frame_size),
            };
            let event_loop = EventLoop {
                id,
                poll,
                tables: Arc::clone(&tables),
                stats: Arc::clone(&stats),
                shutdown: Arc::clone(&pool.shutdown),
                fault: pool.fault.clone(),
                busy_poll: config.busy_poll,
                epoch: flows.as_ref().map_or_else(Instant::now, |f| f.epoch),
            };
            let cpu = cpu_for(id, &cpus);
            let handle = std::thread::Builder::new()
                .name(format!("podwire-w{id}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        // Best effort: a container may forbid it; the worker works unpinned.
                        let _ = sys::affinity::pin_current_thread(cpu);
                    }
                    event_loop.run(&mut routed)
                })
                .map_err(err)?;
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

/// Counts what a device did with a send: the packets sent under `sent`, the refused ones as
/// `tx_error` drops.
fn count_sent(local: &mut LocalStats, sent: Counter, out: TxOutcome) {
    local.add(sent, out.sent as u64);
    local.drops[DropReason::TxError as usize] += out.failed as u64;
}
