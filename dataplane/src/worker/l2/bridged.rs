//! The bridge worker's rounds: podwire's bridge and every port of it (pods' TAP devices or
//! AF_XDP sockets, the host's TAP port, the underlay that all remote VTEPs sit behind), each
//! batch decided by `pipeline::process_bridged` and carried out here.
//!
//! A port is read only when epoll said it is readable, until it comes up short of a batch
//! (drained), so an idle pod costs nothing however many there are.

use super::{BridgeDevice, Command, FdbDump, PortInfo};
use crate::batch::{Batch, MAX_BATCH};
use crate::bridge::{Bridge, BridgeError, PortId, PortOptions, Station};
use crate::pipeline::{self, BridgeIngress, Tables};
use crate::port::underlay::Underlay;
use crate::port::PortError;
use crate::stats::{Counter, LocalStats};
use crate::verdict::{DropReason, Verdict};
use crate::wire::{vnet, vxlan, MacAddr};
use crate::worker::event_loop::Rounds;
use crate::worker::{count_sent, count_xsk_activity, take_socket_errors};
use crate::worker::{FIRST_SLOT_TOKEN, UDP, WAKE, XDP};
use core::net::SocketAddrV4;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

/// FDB slots examined for ageing per round.
const AGE_SLOTS_PER_ROUND: usize = 64;

pub(super) struct LocalPort {
    pub dev: BridgeDevice,
    pub info: PortInfo,
    /// Indices of the current batch leaving by this port.
    pub out: Vec<u16>,
    pub ready: bool,
}

/// The bridge worker: the bridge, its ports, and the tunnel to the other nodes.
pub(super) struct L2Worker {
    pub bridge: Bridge,
    /// Every port carries virtio-net headers (TSO superframes in, passed whole between ports).
    pub offload: bool,
    /// The batch every port is read into (taken out for a round, put back after).
    pub batch: Option<Batch>,
    /// Frames for the tunnel, cut into segments where they were superframes, encapsulated.
    pub tunnel_tx: Batch,
    pub ports: Vec<Option<LocalPort>>,
    /// The underlay's socket (and with `--io xdp` an AF_XDP socket on the uplink's queue 0,
    /// the socket then sending only to next hops not resolved yet, and receiving what arrives
    /// on other queues).
    pub underlay: Underlay,
    pub socket_ready: bool,
    pub xdp_ready: bool,
    /// AF_XDP frames the kernel still held to send after the last round.
    pub in_flight: usize,
    /// Packets of the current batch for the tunnel, with their VTEP.
    pub remote: Vec<(u16, SocketAddrV4)>,
    /// Which packets of the current batch carry a VXLAN header already.
    pub encapsulated: [bool; MAX_BATCH],
    pub vni: Option<vxlan::Vni>,
    pub peer_port: u16,
    /// Our own host-port MAC and the other nodes' (installed as static entries).
    pub control_statics: Vec<MacAddr>,
    pub commands: Receiver<Command>,
    pub fdb_entries: Arc<AtomicU64>,
    /// Where ports attached at run time are registered with the worker's epoll.
    pub registry: Registry,
    pub batch_size: usize,
    pub epoch: Instant,
}

impl L2Worker {
    pub(super) fn attach(
        &mut self,
        dev: BridgeDevice,
        label: String,
        options: PortOptions,
        mac: Option<MacAddr>,
    ) -> Result<PortId, BridgeError> {
        if dev.offload() != self.offload {
            // Offload is all or nothing: a frame's header is written to every port.
            return Err(BridgeError::PortMismatch);
        }
        let id = self.bridge.add_port(options)?;
        if let Some(mac) = mac {
            if let Err(e) = self.bridge.add_static(mac, Station::Port(id)) {
                let _ = self.bridge.remove_port(id);
                return Err(e);
            }
        }
        let token = Token(FIRST_SLOT_TOKEN + usize::from(id.0));
        let registered =
            self.registry
                .register(&mut SourceFd(&dev.raw_fd()), token, Interest::READABLE);
        if registered.is_err() {
            let _ = self.bridge.remove_port(id);
            return Err(BridgeError::NoSuchPort(id.0));
        }
        let slot = usize::from(id.0);
        if self.ports.len() <= slot {
            self.ports.resize_with(slot + 1, || None);
        }
        let info = PortInfo {
            id,
            device: dev.name().to_string(),
            label,
        };
        self.ports[slot] = Some(LocalPort {
            dev,
            info,
            out: Vec::with_capacity(MAX_BATCH),
            ready: true,
        });
        Ok(id)
    }

    fn detach(&mut self, label: &str) -> bool {
        let Some(slot) = self.ports.iter().position(|p| {
            p.as_ref()
                .is_some_and(|p| p.info.label == label && p.info.label != "host")
        }) else {
            return false;
        };
        let port = self.ports[slot].take().expect("found above");
        let _ = self.registry.deregister(&mut SourceFd(&port.dev.raw_fd()));
        let _ = self.bridge.remove_port(port.info.id);
        true
    }

    fn dump(&self) -> FdbDump {
        FdbDump {
            entries: self.bridge.entries(self.now()),
            ports: self
                .ports
                .iter()
                .flatten()
                .map(|p| p.info.clone())
                .collect(),
            vteps: self.bridge.vteps().to_vec(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Takes the VNI, the VTEPs and the peers' host-port MACs from a new table snapshot.
    fn sync(&mut self, tables: &Arc<Tables>) {
        self.vni = pipeline::sync_peers(&mut self.bridge, tables, &mut self.control_statics);
        if self.vni.is_none() {
            return;
        }
        self.peer_port = tables.peer_port;
        let vteps = self.bridge.vteps();
        // The first frame to each VTEP finds its next hop's MAC.
        self.underlay.prime(vteps.iter().copied());
        // Room for a whole batch flooded to every VTEP, so sending never allocates.
        let need = self.batch_size * (vteps.len() + 1);
        self.remote.reserve(need.saturating_sub(self.remote.len()));
    }

    fn handle_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Attach {
                    dev,
                    label,
                    options,
                    mac,
                    reply,
                } => {
                    let _ = reply.send(self.attach(dev, label, options, mac));
                }
                Command::Detach { label, reply } => {
                    let _ = reply.send(self.detach(&label));
                }
                Command::Dump { reply } => {
                    let _ = reply.send(self.dump());
                }
            }
        }
    }

    /// Reads every ready port, then the underlay; returns the frames moved.
    fn read_all(
        &mut self,
        batch: &mut Batch,
        now: u64,
        local: &mut LocalStats,
    ) -> Result<usize, PortError> {
        let mut moved = 0;
        for slot in 0..self.ports.len() {
            let Some(port) = self.ports[slot].as_mut().filter(|p| p.ready) else {
                continue;
            };
            let n = port.dev.rx_batch(batch)?;
            port.ready = n == batch.capacity();
            if n > 0 {
                local.add(Counter::RxTap, n as u64);
                let from = BridgeIngress::Port(port.info.id);
                self.decide_and_send(from, batch, now, local);
                moved += n;
            }
        }
        if self.socket_ready {
            let n = self.underlay.rx_socket(batch)?;
            // Read until a receive comes back empty: with GRO, one receive takes a fixed
            // number of messages, which may split into fewer datagrams than a batch while
            // more wait in the socket (whose edge epoll has already reported).
            self.socket_ready = n > 0;
            if n > 0 {
                local.add(Counter::RxUnderlay, n as u64);
                self.decide_and_send(BridgeIngress::Underlay, batch, now, local);
                moved += n;
            }
        }
        if self.xdp_ready {
            // Only the underlay's datagrams are steered here in L2 mode.
            let (n, wire) = self.underlay.rx_xdp(batch)?;
            self.xdp_ready = n == batch.capacity();
            if n > 0 {
                local.add(Counter::RxUnderlay, n as u64);
                local.add(Counter::RxWire, wire);
                self.decide_and_send(BridgeIngress::Underlay, batch, now, local);
                moved += n;
            }
        }
        Ok(moved)
    }

    /// Kicks the AF_XDP sockets to send what the kernel still holds (copy mode sends a budget
    /// per kick), and counts what they did.
    fn flush_xsks(&mut self, local: &mut LocalStats) {
        let mut in_flight = 0;
        for xsk in self.ports.iter_mut().flatten().filter_map(|p| p.dev.xsk()) {
            in_flight += xsk.flush();
            count_xsk_activity(local, xsk.take_activity());
        }
        in_flight += self.underlay.flush();
        count_xsk_activity(local, self.underlay.take_activity());
        self.in_flight = in_flight;
    }
}

impl Rounds for L2Worker {
    fn tables_changed(&mut self, tables: &Arc<Tables>, _local: &mut LocalStats) {
        self.sync(tables);
    }

    fn serve_requests(&mut self) {
        self.handle_commands();
    }

    fn forward(
        &mut self,
        _tables: &Tables,
        now: u64,
        local: &mut LocalStats,
    ) -> Result<usize, PortError> {
        let mut batch = self.batch.take().expect("put back after every round");
        let moved = self.read_all(&mut batch, now, local);
        self.batch = Some(batch);
        self.flush_xsks(local);
        moved
    }

    fn keep_house(&mut self, now: u64, local: &mut LocalStats) {
        self.bridge.age(now, AGE_SLOTS_PER_ROUND);
        let c = self.bridge.take_counts();
        local.add(Counter::Flooded, c.flooded);
        local.add(Counter::FdbLearned, c.learned);
        local.add(Counter::FdbMoved, c.moved);
        local.add(Counter::FdbAged, c.aged);
        local.add(Counter::FdbLearnRefused, c.learn_refused);
        local.add(Counter::FdbRemoteRefused, c.remote_refused);
        self.fdb_entries
            .store(self.bridge.len() as u64, Ordering::Relaxed);
    }

    fn sample_kernel(&mut self, _now: u64, local: &mut LocalStats) {
        local.add(Counter::XdpViaKernel, self.underlay.take_via_kernel());
        // The bridge's socket is unconnected: the kernel reports it no ICMP errors, but
        // count whatever a receive returned all the same.
        take_socket_errors(self.underlay.socket(), local, |_, _| {});
    }

    fn pending(&self) -> bool {
        self.socket_ready
            || self.xdp_ready
            || self.in_flight > 0
            || self.ports.iter().flatten().any(|p| p.ready)
    }

    fn wants_readiness(&self) -> bool {
        true
    }

    fn ready(&mut self, token: Token) {
        match token {
            UDP => self.socket_ready = true,
            XDP => self.xdp_ready = true,
            WAKE => {}
            Token(t) => {
                if let Some(Some(p)) = self.ports.get_mut(t.wrapping_sub(FIRST_SLOT_TOKEN)) {
                    p.ready = true;
                }
            }
        }
    }
}

impl L2Worker {
    /// Decides (the pipeline's bridge decisions) and sends a batch read from `from`.
    fn decide_and_send(
        &mut self,
        from: BridgeIngress,
        batch: &mut Batch,
        now: u64,
        stats: &mut LocalStats,
    ) {
        pipeline::process_bridged(&mut self.bridge, self.vni, from, batch, now);
        let peer_port = self.peer_port;
        for i in 0..batch.len() {
            let idx = i as u16;
            let (slot, meta) = batch.slot_mut(i);
            let verdict = meta.verdict;
            if self.offload
                && from == BridgeIngress::Underlay
                && !matches!(verdict, Verdict::Drop(_))
            {
                // Offload ports expect a virtio-net header in front of a decapsulated frame:
                // a plain one.
                slot[meta.start - vnet::HEADER_LEN..meta.start].copy_from_slice(&vnet::PLAIN);
            }
            match verdict {
                Verdict::ToPort(p) => push_out(&mut self.ports, p, idx),
                Verdict::ToPeer(ip) => self.remote.push((idx, SocketAddrV4::new(ip, peer_port))),
                Verdict::Flood => {
                    let ingress = match from {
                        BridgeIngress::Port(p) => Station::Port(p),
                        BridgeIngress::Underlay => Station::Remote(*batch.meta(i).peer.ip()),
                    };
                    self.flood(ingress, idx, batch.packet(i));
                }
                Verdict::Drop(r) => stats.drop(r),
                // Routed mode's verdicts: the bridge gives none.
                Verdict::Pending
                | Verdict::ToUnderlay(_)
                | Verdict::ToUnderlayIp(_)
                | Verdict::ToTun
                | Verdict::IcmpToTun
                | Verdict::ResetToTun
                | Verdict::ToWire(_) => {}
            }
        }
        self.send(batch, stats);
    }

    /// Queues packet `idx` of the batch, which came in by `from`, on every port a flood of it
    /// leaves by, and for every VTEP when it came from a local port.
    fn flood(&mut self, from: Station, idx: u16, frame: &[u8]) {
        for p in self.bridge.flood_ports(from, frame) {
            push_out(&mut self.ports, p, idx);
        }
        if Bridge::floods_to_tunnel(from) {
            for &ip in self.bridge.vteps() {
                self.remote
                    .push((idx, SocketAddrV4::new(ip, self.peer_port)));
            }
        }
    }

    /// Writes each port's share of the batch, then encapsulates what goes into the tunnel
    /// (after the local copies were written from the same bytes) and sends it.
    fn send(&mut self, batch: &mut Batch, stats: &mut LocalStats) {
        for port in self.ports.iter_mut().flatten() {
            if port.out.is_empty() {
                continue;
            }
            let out = port.dev.tx_batch(batch, &port.out);
            count_sent(stats, Counter::TxTap, out);
            port.out.clear();
        }
        if self.remote.is_empty() {
            return;
        }
        let Some(vni) = self.vni else {
            for _ in self.remote.drain(..) {
                stats.drop(DropReason::NoRoute);
            }
            return;
        };
        if self.offload {
            self.send_segmented(batch, vni, stats);
            return;
        }
        self.encapsulated[..batch.len()].fill(false);
        for &(i, _) in &self.remote {
            let i = usize::from(i);
            if !self.encapsulated[i] {
                self.encapsulated[i] = true;
                let (slot, meta) = batch.slot_mut(i);
                meta.start -= vxlan::HEADER_LEN;
                meta.len += vxlan::HEADER_LEN;
                vxlan::Repr { vni }.emit(&mut slot[meta.start..]);
            }
        }
        let out = self.underlay.send_replicas(batch, &self.remote);
        count_sent(stats, Counter::TxUnderlay, out);
        self.remote.clear();
    }
}

fn push_out(ports: &mut [Option<LocalPort>], p: PortId, i: u16) {
    if let Some(Some(port)) = ports.get_mut(usize::from(p.0)) {
        port.out.push(i);
    }
}
