//! The L2-mode worker: podwire as the node's bridge, extended across nodes over VXLAN.
//!
//! One thread owns the [`Bridge`] and every port: the pods' TAP devices (or AF_XDP sockets on
//! their veth host ends), the host's TAP port, and the underlay (a UDP socket, or an AF_XDP
//! socket on the uplink) that all remote VTEPs sit behind. Owning the FDB alone, it learns
//! and forwards without a lock. Ports come and go at run time through [`L2Handle`] (attach,
//! detach, and a copy of the FDB for `podwire ctl fdb`), read between batches.
//!
//! The worker runs the same event loop as a routed one (`event_loop`), over the rounds in
//! `bridged`. A port is read only when epoll said it is readable, until it comes up short of
//! a batch (drained), so an idle pod costs nothing however many there are. Frames for remote stations
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

use super::event_loop::EventLoop;
use super::{FaultPoint, WorkerConfig, WorkerError, WorkerPool, MAX_BATCH, UDP, WAKE, XDP};
use crate::batch::Batch;
use crate::bridge::{Bridge, BridgeError, EntryView, PortId, PortOptions};
use crate::pipeline::Tables;
use crate::port::tap::TapPort;
use crate::port::underlay::Underlay;
use crate::port::xdp::xsk::XskPort;
use crate::port::{PortError, RxPort, TxOutcome, TxPort};
use crate::stats::SharedStats;
use crate::wire::{vnet, MacAddr};
use arc_swap::ArcSwap;
use bridged::L2Worker;
use core::net::Ipv4Addr;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Waker};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod bridged;
mod tunnel;

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

impl WorkerPool {
    /// Starts the L2 worker with the host's port `host` (whose MAC is `host_mac`) and the
    /// `underlay` (its socket, and with `--io xdp` an AF_XDP socket); the VNI, the VTEPs and
    /// the peers' host-port MACs come from `tables` (which must be VXLAN's).
    pub fn start_l2(
        config: WorkerConfig,
        bridge: Bridge,
        tables: Arc<ArcSwap<Tables>>,
        host: TapPort,
        host_mac: MacAddr,
        mut underlay: Underlay,
    ) -> Result<(WorkerPool, L2Handle), WorkerError> {
        let err = |source| WorkerError::Poll { worker: 0, source };
        let poll = Poll::new().map_err(err)?;
        let register = |fd, token| {
            poll.registry()
                .register(&mut SourceFd(&fd), token, Interest::READABLE)
        };
        let (socket, xdp) = underlay.raw_fds();
        register(socket, UDP).map_err(err)?;
        if let Some(fd) = xdp {
            register(fd, XDP).map_err(err)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).map_err(err)?);
        let (commands, rx) = mpsc::channel();
        let fdb_entries = Arc::new(AtomicU64::new(0));
        let size = config.batch_size.clamp(1, MAX_BATCH);
        let offload = host.offload();
        let frame = if offload {
            config.frame_size.max(SUPERFRAME_SLOT)
        } else {
            config.frame_size
        };
        let epoch = Instant::now();
        let mut worker = L2Worker {
            bridge,
            offload,
            batch: Some(Batch::new(size, frame)),
            tunnel_tx: Batch::new(tunnel::TUNNEL_TX_SLOTS, config.frame_size),
            ports: Vec::new(),
            underlay,
            socket_ready: true,
            xdp_ready: true,
            in_flight: 0,
            remote: Vec::with_capacity(size * 4),
            encapsulated: [false; MAX_BATCH],
            vni: None,
            peer_port: 0,
            control_statics: Vec::new(),
            commands: rx,
            fdb_entries: Arc::clone(&fdb_entries),
            registry: poll.registry().try_clone().map_err(err)?,
            batch_size: size,
            epoch,
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
        let stats = Arc::new(SharedStats::default());
        let shutdown = Arc::new(AtomicBool::new(false));
        let fault = FaultPoint::new();
        let event_loop = EventLoop {
            id: 0,
            poll,
            tables,
            stats: Arc::clone(&stats),
            shutdown: Arc::clone(&shutdown),
            fault: fault.clone(),
            busy_poll: config.busy_poll,
            epoch,
        };
        let handle = std::thread::Builder::new()
            .name("podwire-l2".into())
            .spawn(move || event_loop.run(&mut worker))
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
