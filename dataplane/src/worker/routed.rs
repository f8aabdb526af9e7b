//! Routed mode's rounds: the TUN queue and the pods' AF_XDP ports on one side, the underlay
//! (its socket, the per-peer queues, its AF_XDP socket) on the other, every batch decided by
//! `pipeline::process_in_worker` and carried out by [`Dispatch`].
//!
//! The TUN and the underlay are read every round until a read finds nothing (their epoll
//! registrations are edge-triggered, so only EAGAIN proves a port drained); the peer queues,
//! one socket per peer, are read when epoll said so.

use super::dispatch::Dispatch;
use super::event_loop::Rounds;
use super::peers::PeerQueues;
use super::{count_xsk_activity, take_socket_errors, WorkerPorts, GC_SLOTS_PER_ROUND};
use crate::batch::Batch;
use crate::capture::{Capture, CapturePoint};
use crate::pipeline::{self, Direction, Flows, Tables, WorkerState};
use crate::port::{PortError, RxPort};
use crate::stats::{Counter, LocalStats};
use mio::{Registry, Token};
use std::sync::Arc;
use std::time::Instant;

/// One routed worker: its ports and what deciding their batches needs.
pub(super) struct Routed {
    pub ports: WorkerPorts,
    /// A receive socket per peer this worker owns (`--peer-queues`).
    pub peers: Option<PeerQueues>,
    /// Where peer sockets are registered with the worker's epoll.
    pub registry: Registry,
    pub flows: Option<Arc<Flows>>,
    pub capture: Arc<Capture>,
    pub state: WorkerState,
    pub from_pods: Batch,
    pub from_underlay: Batch,
    pub dispatch: Dispatch,
    /// The shared socket's kernel drop count when last sampled.
    pub shared_drops_seen: u32,
}

/// What deciding one batch needs, for one round.
struct Decide<'a> {
    tables: &'a Tables,
    flows: Option<&'a Flows>,
    now: u64,
}

impl Decide<'_> {
    /// Decides `batch`, read from `dir`'s side, and sends it.
    fn run(
        &self,
        dir: Direction,
        batch: &mut Batch,
        r: &mut RoutedSinks<'_>,
        local: &mut LocalStats,
    ) {
        // With the worker's state: the ICMP errors it generates toward the wire are limited.
        pipeline::process_in_worker(self.tables, self.flows, r.state, self.now, dir, batch);
        r.dispatch.run(batch, r.ports, local);
    }
}

/// The parts of a routed worker a decided batch goes through.
struct RoutedSinks<'a> {
    ports: &'a mut WorkerPorts,
    dispatch: &'a mut Dispatch,
    state: &'a mut WorkerState,
}

impl Routed {
    /// What the TUN queue has, as the pods sent it.
    fn read_tun(&mut self, d: &Decide, local: &mut LocalStats) -> Result<usize, PortError> {
        let batch = &mut self.from_pods;
        let n = self.ports.tun.rx_batch(batch)?;
        if n > 0 {
            local.add(Counter::RxTun, n as u64);
            if self.capture.wants(CapturePoint::Tun) {
                self.capture.record(CapturePoint::Tun, batch);
            }
            let mut sinks = RoutedSinks {
                ports: &mut self.ports,
                dispatch: &mut self.dispatch,
                state: &mut self.state,
            };
            d.run(Direction::FromTun, batch, &mut sinks, local);
        }
        Ok(n)
    }

    /// What the pods sent through their AF_XDP ports, as if read from the TUN.
    fn read_pod_ports(&mut self, d: &Decide, local: &mut LocalStats) -> Result<usize, PortError> {
        if self.ports.pods.is_empty() {
            return Ok(0);
        }
        self.ports.pods.tick(Instant::now());
        let mut moved = 0;
        for k in 0..self.ports.pods.ports.len() {
            let port = &mut self.ports.pods.ports[k];
            // Frames the kernel still holds to send need a kick in copy mode.
            port.xsk().flush();
            let batch = &mut self.from_pods;
            let n = port.rx_batch(batch)?;
            count_xsk_activity(local, port.xsk().take_activity());
            if n == 0 {
                continue;
            }
            moved += n;
            local.add(Counter::RxPods, n as u64);
            // The pods' side of the node, as the TUN's packets are.
            if self.capture.wants(CapturePoint::Tun) {
                self.capture.record(CapturePoint::Tun, batch);
            }
            for i in 0..n {
                let (slot, meta) = batch.slot_mut(i);
                let pkt = &mut slot[meta.start..meta.start + meta.len];
                if pipeline::complete_partial_checksum(pkt) {
                    local.add(Counter::ChecksumsCompleted, 1);
                }
            }
            let mut sinks = RoutedSinks {
                ports: &mut self.ports,
                dispatch: &mut self.dispatch,
                state: &mut self.state,
            };
            d.run(Direction::FromTun, batch, &mut sinks, local);
        }
        Ok(moved)
    }

    /// What the underlay has: the shared socket, the AF_XDP socket, the ready peer queues.
    fn read_underlay(&mut self, d: &Decide, local: &mut LocalStats) -> Result<usize, PortError> {
        let Routed {
            ports,
            peers,
            capture,
            from_underlay: batch,
            dispatch,
            state,
            ..
        } = self;
        let mut sinks = RoutedSinks {
            ports,
            dispatch,
            state,
        };
        // Each receive replaces the batch's contents (an empty read leaves it empty), so each
        // batch is decided once.
        let received = |batch: &mut Batch, sinks: &mut RoutedSinks, local: &mut LocalStats| {
            if batch.is_empty() {
                return;
            }
            local.add(Counter::RxUnderlay, batch.len() as u64);
            if capture.wants(CapturePoint::Underlay) {
                capture.record(CapturePoint::Underlay, batch);
            }
            d.run(Direction::FromUnderlay, batch, sinks, local);
        };
        let mut moved = sinks.ports.underlay.rx_socket(batch)?;
        received(batch, &mut sinks, local);
        // Frames the kernel still holds to send need a kick in copy mode.
        sinks.ports.underlay.flush();
        let (n, wire) = sinks.ports.underlay.rx_xdp(batch)?;
        local.add(Counter::RxWire, wire);
        // What the AF_XDP socket did since the last round: frames moved and wakeups taken.
        count_xsk_activity(local, sinks.ports.underlay.take_activity());
        received(batch, &mut sinks, local);
        moved += n;
        if let Some(p) = peers.as_mut().filter(|p| p.any()) {
            moved += p.read_round(|sock| {
                let n = sinks.ports.underlay.rx_peer(sock, batch)?;
                received(batch, &mut sinks, local);
                Ok((n, n > 0))
            })?;
        }
        Ok(moved)
    }
}

impl Routed {
    fn read_all(&mut self, d: &Decide, local: &mut LocalStats) -> Result<usize, PortError> {
        let moved = self.read_tun(d, local)? + self.read_pod_ports(d, local)?;
        Ok(moved + self.read_underlay(d, local)?)
    }
}

impl Rounds for Routed {
    fn tables_changed(&mut self, tables: &Arc<Tables>, local: &mut LocalStats) {
        if let Some(p) = self.peers.as_mut() {
            let done = p.sync(tables, self.ports.underlay.socket(), &self.registry);
            local.add(Counter::PeerSocketErrors, done.failed as u64);
        }
        let me = tables.local.public_ip;
        let peers = tables.map.nodes().map(|n| n.public_ip);
        self.ports.underlay.prime(peers.filter(|&ip| ip != me));
    }

    fn forward(
        &mut self,
        tables: &Tables,
        now: u64,
        local: &mut LocalStats,
    ) -> Result<usize, PortError> {
        // Out of `self` for the round, so the batch's readers can borrow the rest mutably
        // (an Option's take, not a reference count).
        let flows = self.flows.take();
        let d = Decide {
            tables,
            flows: flows.as_deref(),
            now,
        };
        let moved = self.read_all(&d, local);
        self.flows = flows;
        moved
    }

    fn keep_house(&mut self, now: u64, _local: &mut LocalStats) {
        if let Some(f) = self.flows.as_deref() {
            // Incremental expiry: a slice of one shard per busy round and before each sleep.
            f.conntrack.gc_step(now, GC_SLOTS_PER_ROUND);
        }
    }

    fn sample_kernel(&mut self, now: u64, local: &mut LocalStats) {
        let underlay = &mut self.ports.underlay;
        let shared = underlay.socket().rx_drops();
        local.add(
            Counter::UnderlayQueueFull,
            u64::from(shared.wrapping_sub(self.shared_drops_seen)),
        );
        self.shared_drops_seen = shared;
        if let Some(p) = self.peers.as_mut() {
            local.add(Counter::PeerQueueFull, p.take_kernel_drops());
        }
        local.add(Counter::XdpViaKernel, underlay.take_via_kernel());
        let path_mtus = &mut self.state.path_mtus;
        take_socket_errors(underlay.socket(), local, |peer, mtu| {
            path_mtus.learn(peer, mtu, now)
        });
    }

    fn pending(&self) -> bool {
        // Every port is read until it comes back empty, each round.
        false
    }

    fn wants_readiness(&self) -> bool {
        self.peers.as_ref().is_some_and(PeerQueues::any)
    }

    fn ready(&mut self, token: Token) {
        if let Some(p) = self.peers.as_mut() {
            p.mark_ready(token);
        }
    }
}
