//! The L2-mode worker: podwire as the node's bridge, extended across nodes over VXLAN.
//!
//! One thread owns the [`Bridge`] and every port: the pods' TAP devices (or AF_XDP sockets on
//! their veth host ends), the host's TAP port, and the underlay (a UDP socket, or an AF_XDP
//! socket on the uplink) that all remote VTEPs sit behind. Owning the FDB alone, it learns
//! and forwards without a lock. Ports come and go at run time through [`L2Handle`] (attach,
//! detach, and a copy of the FDB for `podwire ctl fdb`), read between batches.
//!
//! A port is read only when epoll said it is readable, until it comes up short of a batch
//! (drained), so an idle pod costs nothing however many there are. Frames for remote stations
//! get an 8-byte VXLAN header in their headroom and leave through the underlay socket (the
//! kernel adds the outer IP and UDP headers); a flood from a local port is written to every
//! other port and sent once per VTEP from the same buffer (head-end replication).
//!
//! Decapsulation accepts a datagram only from a VTEP in the subnet map, with exactly the I
//! flag and our VNI (the kernel's `vxlan_rcv` rules). Unlike routed mode, the inner source
//! address is not tied to the sender's lease: in one L2 domain a pod keeps its address when
//! it moves to another node.
//!
//! The VTEPs and the control plane's static entries (each node's host-port MAC, advertised as
//! the VtepMAC of its lease, behind its PublicIP) come from the same table snapshot the
//! routed workers read, re-synced when the control plane swaps it.

use super::{FaultPoint, WorkerConfig, WorkerError, WorkerPool, IDLE_SLEEP, MAX_BATCH};
use crate::batch::Batch;
use crate::bridge::{Bridge, BridgeError, EntryView, PortId, PortOptions, Station};
use crate::offload::segment;
use crate::pipeline::{self, BridgeIngress, Tables};
use crate::port::tap::TapPort;
use crate::port::udp::UdpPort;
use crate::port::xdp::underlay::XdpUnderlayPort;
use crate::port::xdp::xsk::XskPort;
use crate::port::{PortError, RxPort, TxOutcome, TxPort};
use crate::stats::{Counter, LocalStats, SharedStats};
use crate::verdict::{DropReason, Verdict};
use crate::wire::MacAddr;
use crate::wire::{ethernet, vnet, vxlan};
use arc_swap::ArcSwap;
use core::net::{Ipv4Addr, SocketAddrV4};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

const UDP: Token = Token(0);
const WAKE: Token = Token(1);
const XDP: Token = Token(2);
/// Port `p` is registered as token `PORT_TOKENS + p`.
const PORT_TOKENS: usize = 16;
/// FDB slots examined for ageing per round.
const AGE_SLOTS_PER_ROUND: usize = 64;
/// Slots of the tunnel's transmit batch (segments of superframes, flood copies).
const TUNNEL_TX_SLOTS: usize = 256;
/// A receive slot that holds a whole TSO superframe with its virtio-net header.
const SUPERFRAME_SLOT: usize = 65_536 + vnet::HEADER_LEN + crate::batch::HEADROOM;
/// How long a management request waits for the worker.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A pod (or host) port as `podwire ctl fdb` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub id: PortId,
    /// The TAP device's name when it was created (before it moved into the pod's namespace).
    pub device: String,
    /// What the port is attached for: the pod's namespace, or "host".
    pub label: String,
}

/// The FDB and the ports, as one copy for `podwire ctl fdb`.
#[derive(Debug, Clone, Default)]
pub struct FdbDump {
    pub entries: Vec<EntryView>,
    pub ports: Vec<PortInfo>,
    pub vteps: Vec<Ipv4Addr>,
}

/// What a bridge port is on the node.
pub enum BridgeDevice {
    /// A TAP device; closing it deletes the device.
    Tap(TapPort),
    /// An AF_XDP socket on a pod's veth host end, which podwire's XDP program (bridge-port
    /// role) feeds every frame. Frames carry no virtio-net header: the bridge runs without
    /// offload.
    Xsk(Box<XskPort>),
}

impl BridgeDevice {
    fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            BridgeDevice::Tap(t) => t.raw_fd(),
            BridgeDevice::Xsk(x) => x.raw_fd(),
        }
    }

    /// Whether frames carry a virtio-net header.
    pub fn offload(&self) -> bool {
        matches!(self, BridgeDevice::Tap(t) if t.offload())
    }

    pub fn name(&self) -> &str {
        match self {
            BridgeDevice::Tap(t) => t.name(),
            BridgeDevice::Xsk(x) => x.ifname(),
        }
    }

    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        match self {
            BridgeDevice::Tap(t) => t.rx_batch(batch),
            BridgeDevice::Xsk(x) => x.rx_batch(batch),
        }
    }

    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        match self {
            BridgeDevice::Tap(t) => t.tx_batch(batch, indices),
            BridgeDevice::Xsk(x) => x.tx_batch(batch, indices),
        }
    }

    /// The AF_XDP socket, if the port has one.
    fn xsk(&mut self) -> Option<&mut XskPort> {
        match self {
            BridgeDevice::Tap(_) => None,
            BridgeDevice::Xsk(x) => Some(x),
        }
    }
}

enum Command {
    Attach {
        dev: BridgeDevice,
        label: String,
        options: PortOptions,
        mac: Option<MacAddr>,
        reply: SyncSender<Result<PortId, BridgeError>>,
    },
    Detach {
        label: String,
        reply: SyncSender<bool>,
    },
    Dump {
        reply: SyncSender<FdbDump>,
    },
}

/// Why a management request failed.
#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error("the bridge worker did not answer (stopped or stuck)")]
    NoAnswer,
}

/// The control plane's hold on a running L2 worker.
#[derive(Clone)]
pub struct L2Handle {
    commands: Sender<Command>,
    waker: Arc<Waker>,
    /// FDB entries, as of the worker's last round.
    pub fdb_entries: Arc<AtomicU64>,
    /// Whether the bridge's ports use offload (as the host port does): pods' TAP devices
    /// must be opened the same way ([`TapPort::open_offload`]), and AF_XDP ports need it off.
    pub offload: bool,
}

impl L2Handle {
    fn ask<T>(&self, make: impl FnOnce(SyncSender<T>) -> Command) -> Result<T, L2Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.commands
            .send(make(tx))
            .map_err(|_| L2Error::NoAnswer)?;
        let _ = self.waker.wake();
        rx.recv_timeout(REQUEST_TIMEOUT)
            .map_err(|_| L2Error::NoAnswer)
    }

    /// Adds `dev` as a bridge port labelled `label`; with `mac`, that station is installed as
    /// a static entry behind it (so it is known before it speaks).
    pub fn attach(
        &self,
        dev: BridgeDevice,
        label: &str,
        options: PortOptions,
        mac: Option<MacAddr>,
    ) -> Result<PortId, L2Error> {
        let label = label.to_string();
        Ok(self.ask(|reply| Command::Attach {
            dev,
            label,
            options,
            mac,
            reply,
        })??)
    }

    /// Removes the port labelled `label` (closing its TAP device, which deletes it, or its
    /// AF_XDP socket) and its FDB entries. False if there was none.
    pub fn detach(&self, label: &str) -> Result<bool, L2Error> {
        let label = label.to_string();
        self.ask(|reply| Command::Detach { label, reply })
    }

    /// A copy of the FDB, the ports and the VTEPs.
    pub fn dump(&self) -> Result<FdbDump, L2Error> {
        self.ask(|reply| Command::Dump { reply })
    }
}

struct LocalPort {
    dev: BridgeDevice,
    info: PortInfo,
    /// Indices of the current batch leaving by this port.
    out: Vec<u16>,
    ready: bool,
}

struct L2Worker {
    bridge: Bridge,
    /// Every port carries virtio-net headers (TSO superframes in, passed whole between ports).
    offload: bool,
    /// Frames for the tunnel, cut into segments where they were superframes, encapsulated.
    tunnel_tx: Batch,
    ports: Vec<Option<LocalPort>>,
    udp: UdpPort,
    udp_ready: bool,
    /// `--io xdp`: the underlay through an AF_XDP socket on the uplink's queue 0 (the UDP
    /// socket then sends only to next hops not resolved yet, and receives what arrives on
    /// other queues).
    xdp: Option<XdpUnderlayPort>,
    xdp_ready: bool,
    /// Packets of the current batch for the tunnel, with their VTEP.
    remote: Vec<(u16, SocketAddrV4)>,
    /// The tunnel's transmit batch's packets with their VTEP (send scratch).
    tunnel_items: Vec<(u16, SocketAddrV4)>,
    /// Which packets of the current batch carry a VXLAN header already.
    encapsulated: [bool; MAX_BATCH],
    tables: Arc<ArcSwap<Tables>>,
    synced: Option<Arc<Tables>>,
    vni: Option<vxlan::Vni>,
    peer_port: u16,
    /// Our own host-port MAC and the other nodes' (installed as static entries).
    control_statics: Vec<MacAddr>,
    commands: Receiver<Command>,
    fdb_entries: Arc<AtomicU64>,
    stats: Arc<SharedStats>,
    shutdown: Arc<AtomicBool>,
    fault: FaultPoint,
    poll: Poll,
    config: WorkerConfig,
    epoch: Instant,
}

impl WorkerPool {
    /// Starts the L2 worker with the host's port `host` (whose MAC is `host_mac`) and the
    /// underlay socket `udp` (and with `xdp`, an AF_XDP socket on the underlay); the VNI, the
    /// VTEPs and the peers' host-port MACs come from `tables` (which must be VXLAN's).
    pub fn start_l2(
        config: WorkerConfig,
        bridge: Bridge,
        tables: Arc<ArcSwap<Tables>>,
        host: TapPort,
        host_mac: MacAddr,
        udp: UdpPort,
        xdp: Option<XdpUnderlayPort>,
    ) -> Result<(WorkerPool, L2Handle), WorkerError> {
        let err = |source| WorkerError::Poll { worker: 0, source };
        let poll = Poll::new().map_err(err)?;
        poll.registry()
            .register(&mut SourceFd(&udp.raw_fd()), UDP, Interest::READABLE)
            .map_err(err)?;
        let mut xdp = xdp;
        if let Some(x) = xdp.as_mut() {
            poll.registry()
                .register(&mut SourceFd(&x.xsk().raw_fd()), XDP, Interest::READABLE)
                .map_err(err)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).map_err(err)?);
        let (commands, rx) = mpsc::channel();
        let stats = Arc::new(SharedStats::default());
        let shutdown = Arc::new(AtomicBool::new(false));
        let fdb_entries = Arc::new(AtomicU64::new(0));
        let fault = FaultPoint::new();
        let size = config.batch_size.clamp(1, MAX_BATCH);
        let offload = host.offload();
        let mut worker = L2Worker {
            bridge,
            offload,
            tunnel_tx: Batch::new(TUNNEL_TX_SLOTS, config.frame_size),
            ports: Vec::new(),
            udp,
            udp_ready: true,
            xdp,
            xdp_ready: true,
            remote: Vec::with_capacity(size * 4),
            tunnel_items: Vec::with_capacity(TUNNEL_TX_SLOTS),
            encapsulated: [false; MAX_BATCH],
            tables,
            synced: None,
            vni: None,
            peer_port: 0,
            control_statics: Vec::new(),
            commands: rx,
            fdb_entries: Arc::clone(&fdb_entries),
            stats: Arc::clone(&stats),
            shutdown: Arc::clone(&shutdown),
            fault: fault.clone(),
            poll,
            config,
            epoch: Instant::now(),
        };
        let options = PortOptions {
            host: true,
            ..PortOptions::default()
        };
        worker
            .attach(
                BridgeDevice::Tap(host),
                "host".into(),
                options,
                Some(host_mac),
            )
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        let handle = std::thread::Builder::new()
            .name("podwire-l2".into())
            .spawn(move || worker.run())
            .map_err(err)?;
        let pool = WorkerPool {
            handles: vec![handle],
            wakers: vec![Arc::clone(&waker)],
            stats: vec![stats],
            shutdown,
            fault,
        };
        Ok((
            pool,
            L2Handle {
                commands,
                waker,
                fdb_entries,
                offload,
            },
        ))
    }
}

impl L2Worker {
    fn attach(
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
        let token = Token(PORT_TOKENS + usize::from(id.0));
        let registered =
            self.poll
                .registry()
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
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&port.dev.raw_fd()));
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
        self.synced = Some(Arc::clone(tables));
        self.vni = pipeline::sync_peers(&mut self.bridge, tables, &mut self.control_statics);
        if self.vni.is_none() {
            return;
        }
        self.peer_port = tables.peer_port;
        let vteps = self.bridge.vteps();
        if let Some(x) = self.xdp.as_mut() {
            // The first frame to each VTEP finds its next hop's MAC.
            x.prime(vteps.iter().copied());
        }
        // Room for a whole batch flooded to every VTEP, so sending never allocates.
        let need = self.config.batch_size.clamp(1, MAX_BATCH) * (vteps.len() + 1);
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

    fn run(mut self) -> Result<(), WorkerError> {
        let size = self.config.batch_size.clamp(1, MAX_BATCH);
        let frame = if self.offload {
            self.config.frame_size.max(SUPERFRAME_SLOT)
        } else {
            self.config.frame_size
        };
        let mut batch = Batch::new(size, frame);
        let mut local = LocalStats::default();
        let mut events = Events::with_capacity(64);
        let mut last_work = Instant::now();
        let port_err = |source: PortError| WorkerError::Port { worker: 0, source };
        while !self.shutdown.load(Ordering::Acquire) {
            self.fault.check(0);
            // One atomic load per round; a new snapshot is taken only when it changed.
            let tables = self.tables.load();
            if !self
                .synced
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, &tables))
            {
                self.sync(&Arc::clone(&tables));
            }
            drop(tables);
            self.handle_commands();
            let now = self.now();
            let mut moved = 0;
            for slot in 0..self.ports.len() {
                let Some(port) = self.ports[slot].as_mut().filter(|p| p.ready) else {
                    continue;
                };
                let n = port.dev.rx_batch(&mut batch).map_err(port_err)?;
                port.ready = n == batch.capacity();
                if n > 0 {
                    local.add(Counter::RxTap, n as u64);
                    let from = BridgeIngress::Port(port.info.id);
                    self.forward(from, &mut batch, now, &mut local);
                    moved += n;
                }
            }
            if self.udp_ready {
                let n = self.udp.rx_batch(&mut batch).map_err(port_err)?;
                // Read until a receive comes back empty: with GRO, one receive takes a fixed
                // number of messages, which may split into fewer datagrams than a batch while
                // more wait in the socket (whose edge epoll has already reported).
                self.udp_ready = n > 0;
                if n > 0 {
                    local.add(Counter::RxUnderlay, n as u64);
                    self.forward(BridgeIngress::Underlay, &mut batch, now, &mut local);
                    moved += n;
                }
            }
            if self.xdp_ready {
                if let Some(x) = self.xdp.as_mut() {
                    let n = x.rx_batch(&mut batch).map_err(port_err)?;
                    self.xdp_ready = n == batch.capacity();
                    // Only the underlay's datagrams are steered here in L2 mode.
                    let wire = x.take_wire();
                    if n > 0 {
                        local.add(Counter::RxUnderlay, n as u64);
                        local.add(Counter::RxWire, wire);
                        self.forward(BridgeIngress::Underlay, &mut batch, now, &mut local);
                        moved += n;
                    }
                }
            }
            // AF_XDP sockets: kick what the kernel still holds to send (copy mode sends a
            // budget per kick), and count what they did.
            let mut in_flight = 0;
            let xsks = self.ports.iter_mut().flatten().filter_map(|p| p.dev.xsk());
            for xsk in xsks.chain(self.xdp.as_mut().map(|x| x.xsk())) {
                in_flight += xsk.flush();
                super::count_xsk_activity(&mut local, xsk.take_activity());
            }
            if let Some(x) = self.xdp.as_mut() {
                local.add(Counter::XdpViaKernel, x.take_via_kernel());
            }
            // The bridge's socket is unconnected: the kernel reports it no ICMP errors, but
            // count whatever a receive returned all the same.
            super::take_socket_errors(&mut self.udp, &mut local, |_, _| {});
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
            let busy = moved > 0;
            let any_ready = self.udp_ready
                || (self.xdp.is_some() && self.xdp_ready)
                || in_flight > 0
                || self.ports.iter().flatten().any(|p| p.ready);
            if busy {
                self.stats.flush(&mut local);
                last_work = Instant::now();
            }
            let timeout = if any_ready {
                continue;
            } else if last_work.elapsed() < self.config.busy_poll {
                Duration::ZERO
            } else {
                local.add(Counter::IdleSleeps, 1);
                self.stats.flush(&mut local);
                IDLE_SLEEP
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(WorkerError::Poll { worker: 0, source }),
            }
            for ev in events.iter() {
                match ev.token() {
                    UDP => self.udp_ready = true,
                    XDP => self.xdp_ready = true,
                    WAKE => {}
                    Token(t) => {
                        if let Some(Some(p)) = self.ports.get_mut(t.wrapping_sub(PORT_TOKENS)) {
                            p.ready = true;
                        }
                    }
                }
            }
            if timeout == IDLE_SLEEP {
                last_work = Instant::now();
            }
        }
        self.stats.flush(&mut local);
        Ok(())
    }

    /// Decides (the pipeline's bridge decisions) and sends a batch read from `from`.
    fn forward(
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
            stats.add(Counter::TxTap, out.sent as u64);
            stats.drops[DropReason::TxError as usize] += out.failed as u64;
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
        let out = tunnel_send(&mut self.udp, self.xdp.as_mut(), batch, &self.remote);
        stats.add(Counter::TxUnderlay, out.sent as u64);
        stats.drops[DropReason::TxError as usize] += out.failed as u64;
        self.remote.clear();
    }
}

impl L2Worker {
    /// The tunnel's share of a batch from offload ports, in order: each frame copied (or, a
    /// superframe, cut into segments) into the tunnel's transmit batch, once per VTEP, with
    /// partial checksums finished, encapsulated, and sent with UDP GSO.
    fn send_segmented(&mut self, batch: &Batch, vni: vxlan::Vni, stats: &mut LocalStats) {
        self.tunnel_tx.clear();
        for k in 0..self.remote.len() {
            let (i, peer) = self.remote[k];
            let i = usize::from(i);
            let (Some(with_hdr), frame) = (
                batch.packet_with_prefix(i, vnet::HEADER_LEN),
                batch.packet(i),
            ) else {
                stats.drop(DropReason::Truncated);
                continue;
            };
            let Ok(hdr) = vnet::VnetHeader::parse(with_hdr) else {
                stats.drop(DropReason::Truncated);
                continue;
            };
            let count = if hdr.is_gso() && frame.len() > ethernet::HEADER_LEN {
                segment::segment_count(&hdr, &frame[ethernet::HEADER_LEN..])
            } else {
                Ok(1)
            };
            let Ok(count) = count else {
                stats.drop(DropReason::Oversized);
                continue;
            };
            for seg in 0..count {
                if self.tunnel_tx.len() == self.tunnel_tx.capacity() {
                    self.flush_tunnel(stats);
                }
                let j = self.tunnel_tx.len();
                let slot = self.tunnel_tx.rx_slot(j);
                let len = if hdr.is_gso() {
                    let (eth, rest) = slot.split_at_mut(ethernet::HEADER_LEN);
                    eth.copy_from_slice(&frame[..ethernet::HEADER_LEN]);
                    segment::segment(&hdr, &frame[ethernet::HEADER_LEN..], seg, rest)
                        .map(|n| n + ethernet::HEADER_LEN)
                        .ok()
                } else if frame.len() <= slot.len() {
                    slot[..frame.len()].copy_from_slice(frame);
                    let finished = hdr.flags & vnet::F_NEEDS_CSUM == 0
                        || segment::finish_checksum(
                            &mut slot[..frame.len()],
                            usize::from(hdr.csum_start),
                            usize::from(hdr.csum_offset),
                        )
                        .is_ok();
                    finished.then_some(frame.len())
                } else {
                    None
                };
                let Some(len) = len else {
                    stats.drop(DropReason::Oversized);
                    continue;
                };
                self.tunnel_tx.commit_rx(j, len, peer, false);
                let (slot, meta) = self.tunnel_tx.slot_mut(j);
                meta.start -= vxlan::HEADER_LEN;
                meta.len += vxlan::HEADER_LEN;
                vxlan::Repr { vni }.emit(&mut slot[meta.start..]);
            }
        }
        self.flush_tunnel(stats);
        self.remote.clear();
    }

    fn flush_tunnel(&mut self, stats: &mut LocalStats) {
        let n = self.tunnel_tx.len();
        if n == 0 {
            return;
        }
        let out = if self.xdp.is_some() {
            self.tunnel_items.clear();
            let metas = (0..n).map(|k| (k as u16, self.tunnel_tx.meta(k).peer));
            self.tunnel_items.extend(metas);
            let items = &self.tunnel_items;
            tunnel_send(&mut self.udp, self.xdp.as_mut(), &self.tunnel_tx, items)
        } else {
            let indices: [u16; TUNNEL_TX_SLOTS] = core::array::from_fn(|k| k as u16);
            self.udp.tx_batch(&self.tunnel_tx, &indices[..n])
        };
        stats.add(Counter::TxUnderlay, out.sent as u64);
        stats.drops[DropReason::TxError as usize] += out.failed as u64;
        self.tunnel_tx.clear();
    }
}

/// Sends each item's packet (VXLAN onwards) as a datagram to its VTEP: through AF_XDP when
/// the underlay has it (and the socket for next hops not resolved yet), else the socket.
fn tunnel_send(
    udp: &mut UdpPort,
    xdp: Option<&mut XdpUnderlayPort>,
    batch: &Batch,
    items: &[(u16, SocketAddrV4)],
) -> TxOutcome {
    match xdp {
        Some(xdp) => xdp.send_datagrams(batch, items.iter().copied(), udp),
        None => udp.tx_to(batch, items),
    }
}

fn push_out(ports: &mut [Option<LocalPort>], p: PortId, i: u16) {
    if let Some(Some(port)) = ports.get_mut(usize::from(p.0)) {
        port.out.push(i);
    }
}
