//! The one event loop every worker runs, routed or bridged: pick up new tables, move what is
//! waiting, keep house, then busy-poll a while and sleep in epoll when there is nothing to do.
//!
//! What differs by mode (which ports, how a batch is decided and sent) is behind [`Rounds`];
//! when to spin, sample the kernel's counters, publish stats, wait and wake is decided here
//! once.

use super::{FaultPoint, WorkerError, IDLE_SLEEP};
use crate::pipeline::Tables;
use crate::port::PortError;
use crate::stats::{Counter, LocalStats, SharedStats};
use arc_swap::ArcSwap;
use mio::{Events, Poll, Token};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rounds between samples of the kernel's drop counters while busy (one getsockopt per
/// socket; also sampled before every sleep).
const KERNEL_SAMPLE_ROUNDS: u32 = 4096;

/// What a worker of one mode does in each round of the loop.
pub(super) trait Rounds {
    /// The control plane swapped the tables: take what the mode keeps from them (peer
    /// sockets, VTEPs, next hops to resolve).
    fn tables_changed(&mut self, tables: &Arc<Tables>, local: &mut LocalStats);
    /// Between rounds, off the packet path: requests from the control plane.
    fn serve_requests(&mut self) {}
    /// Reads, decides and sends what its ports have; returns how many packets it moved.
    fn forward(
        &mut self,
        tables: &Tables,
        now: u64,
        local: &mut LocalStats,
    ) -> Result<usize, PortError>;
    /// Expiry (connections, FDB entries) a slice at a time: on busy rounds and before sleeps.
    fn keep_house(&mut self, now: u64, local: &mut LocalStats);
    /// The kernel's counters (queue drops, socket errors): every few thousand busy rounds and
    /// before a sleep, not in the idle spin in between.
    fn sample_kernel(&mut self, now: u64, local: &mut LocalStats);
    /// A port known to hold more than the last round took (it may not wake epoll again).
    fn pending(&self) -> bool;
    /// Whether to ask epoll, without waiting, which ports are readable after a busy round.
    fn wants_readiness(&self) -> bool;
    /// Epoll reported `token` readable.
    fn ready(&mut self, token: Token);
}

/// What every worker's loop runs on besides its mode.
pub(super) struct EventLoop {
    pub id: usize,
    pub poll: Poll,
    pub tables: Arc<ArcSwap<Tables>>,
    pub stats: Arc<SharedStats>,
    pub shutdown: Arc<AtomicBool>,
    pub fault: FaultPoint,
    /// How long to keep polling with nothing to do before sleeping in epoll.
    pub busy_poll: Duration,
    /// Time zero of the mode's clock (connection tracking, FDB ageing, path MTUs), in ms.
    pub epoch: Instant,
}

impl EventLoop {
    /// Runs `mode` until shutdown, or until a port or epoll fails.
    pub(super) fn run(mut self, mode: &mut impl Rounds) -> Result<(), WorkerError> {
        let id = self.id;
        let port_err = |source| WorkerError::Port { worker: id, source };
        let mut local = LocalStats::default();
        let mut events = Events::with_capacity(64);
        let mut synced: *const Tables = std::ptr::null();
        let mut last_work = Instant::now();
        let mut rounds = 0u32;
        while !self.shutdown.load(Ordering::Acquire) {
            self.fault.check(id);
            // One atomic load per round; the mode looks at a snapshot only when it changed.
            let tables = self.tables.load();
            if !std::ptr::eq(synced, Arc::as_ptr(&tables)) {
                synced = Arc::as_ptr(&tables);
                mode.tables_changed(&tables, &mut local);
            }
            mode.serve_requests();
            let now = self.epoch.elapsed().as_millis() as u64;
            let moved = mode.forward(&tables, now, &mut local).map_err(port_err)?;
            drop(tables);
            let idle = moved == 0 && !mode.pending();
            let spun_out = last_work.elapsed() >= self.busy_poll;
            if !idle || spun_out {
                mode.keep_house(now, &mut local);
            }
            rounds = rounds.wrapping_add(1);
            let sleeping = idle && spun_out;
            if sleeping || rounds.is_multiple_of(KERNEL_SAMPLE_ROUNDS) {
                mode.sample_kernel(now, &mut local);
            }
            let wait = if sleeping {
                local.add(Counter::IdleSleeps, 1);
                self.stats.flush(&mut local);
                Some(IDLE_SLEEP)
            } else {
                if moved > 0 {
                    self.stats.flush(&mut local);
                    last_work = Instant::now();
                }
                (!mode.pending() && mode.wants_readiness()).then_some(Duration::ZERO)
            };
            if let Some(wait) = wait {
                self.wait(&mut events, wait, mode)?;
                if sleeping {
                    last_work = Instant::now();
                }
            }
        }
        self.stats.flush(&mut local);
        Ok(())
    }

    /// Waits up to `wait` in epoll and hands the mode what became readable.
    fn wait(
        &mut self,
        events: &mut Events,
        wait: Duration,
        mode: &mut impl Rounds,
    ) -> Result<(), WorkerError> {
        match self.poll.poll(events, Some(wait)) {
            Ok(()) => events.iter().for_each(|e| mode.ready(e.token())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(WorkerError::Poll {
                    worker: self.id,
                    source,
                })
            }
        }
        Ok(())
    }
}
