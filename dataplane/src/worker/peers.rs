//! Per-peer receive queues, so one peer flooding the node cannot starve the others.
//!
//! With one underlay socket per worker, every peer's datagrams share one kernel queue: a peer
//! sending faster than the worker drains fills it, and the kernel then drops whatever arrives
//! next, from whichever peer. Here each peer a worker is responsible for gets a socket of its
//! own, connected to the peer's address and port ([`PeerSocket`]); the kernel delivers a
//! datagram to the matching connected socket before it considers the SO_REUSEPORT group. A
//! flood then overflows only the flooder's queue, and the worker reads the ready queues round
//! robin, one batch each per round, so the flooder also gets no more than its share of CPU.
//!
//! What it covers: peers that send from the well-known port, as flannel's udp backend does and
//! podwire's VXLAN with `--vxlan-tx-sockets 0` (from port 8472). The kernel's VXLAN device sends
//! from a source port per flow, and podwire's VXLAN by default from ephemeral ports (one per
//! `--vxlan-tx` socket), so their datagrams (and anything else) still land on the shared socket.
//!
//! The sockets are made and closed by the worker itself when the subnet map changes (off the
//! packet path); each peer belongs to one worker, by address hash.

use crate::pipeline::{Encap, Tables};
use crate::port::udp::{PeerSocket, UdpPort};
use crate::port::PortError;
use crate::route::Backend;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

/// Peer sockets' epoll tokens: slot = token - FIRST_TOKEN.
use super::FIRST_SLOT_TOKEN as FIRST_TOKEN;

struct Slot {
    socket: PeerSocket,
    /// Epoll said readable and we have not seen it drained since.
    ready: bool,
    /// The socket's kernel drop count when last sampled.
    drops_seen: u32,
}

/// One worker's peer sockets.
pub(crate) struct PeerQueues {
    worker: usize,
    workers: usize,
    slots: Vec<Option<Slot>>,
    /// Where the next round starts, so no peer is always read first.
    next: usize,
}

impl PeerQueues {
    pub(crate) fn new(worker: usize, workers: usize) -> PeerQueues {
        PeerQueues {
            worker,
            workers: workers.max(1),
            slots: Vec::new(),
            next: 0,
        }
    }

    /// The peers this worker should have sockets for under `tables`.
    fn wanted(&self, tables: &Tables) -> Vec<SocketAddrV4> {
        let me = tables.local.public_ip;
        let mut out: Vec<SocketAddrV4> = tables
            .map
            .nodes()
            .filter(|n| n.public_ip != me && !n.public_ip.is_unspecified())
            .filter(|n| match (tables.encap, n.backend) {
                (Encap::FlannelUdp, Backend::Udp) => true,
                (Encap::Vxlan { vni, .. }, Backend::Vxlan { vni: v, .. }) => v == vni,
                _ => false,
            })
            .filter(|n| owner(n.public_ip, self.workers) == self.worker)
            .map(|n| SocketAddrV4::new(n.public_ip, tables.peer_port))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Makes sockets for new peers and closes those of peers that left. A socket that cannot
    /// be made is skipped (its peer's datagrams go to the shared socket) and counted.
    pub(crate) fn sync(
        &mut self,
        tables: &Arc<Tables>,
        udp: &UdpPort,
        registry: &Registry,
    ) -> SyncOutcome {
        let wanted = self.wanted(tables);
        let mut outcome = SyncOutcome::default();
        for slot in &mut self.slots {
            if let Some(s) = slot {
                if wanted.binary_search(&s.socket.peer()).is_err() {
                    let _ = registry.deregister(&mut SourceFd(&s.socket.raw_fd()));
                    *slot = None;
                    outcome.closed += 1;
                }
            }
        }
        for peer in wanted {
            if self.slots.iter().flatten().any(|s| s.socket.peer() == peer) {
                continue;
            }
            let socket = match udp.connect_peer(peer) {
                Ok(s) => s,
                Err(_) => {
                    outcome.failed += 1;
                    continue;
                }
            };
            let i = match self.slots.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            let token = Token(FIRST_TOKEN + i);
            if registry
                .register(&mut SourceFd(&socket.raw_fd()), token, Interest::READABLE)
                .is_err()
            {
                outcome.failed += 1;
                continue;
            }
            let drops_seen = socket.rx_drops();
            self.slots[i] = Some(Slot {
                socket,
                // Datagrams may have queued before registration: look once.
                ready: true,
                drops_seen,
            });
            outcome.opened += 1;
        }
        outcome
    }

    /// Epoll reported `token` readable.
    pub(crate) fn mark_ready(&mut self, token: Token) {
        if let Some(Some(s)) = token
            .0
            .checked_sub(FIRST_TOKEN)
            .and_then(|i| self.slots.get_mut(i))
        {
            s.ready = true;
        }
    }

    /// Whether this worker has any peer socket.
    pub(crate) fn any(&self) -> bool {
        self.slots.iter().any(Option::is_some)
    }

    /// Reads this round's sockets in round-robin order: `f(socket)` is called once per ready
    /// socket and returns how many datagrams it read and whether the socket may hold more
    /// (anything was read). Returns the datagrams read in all.
    pub(crate) fn read_round(
        &mut self,
        mut f: impl FnMut(&PeerSocket) -> Result<(usize, bool), PortError>,
    ) -> Result<usize, PortError> {
        let n = self.slots.len();
        if n == 0 {
            return Ok(0);
        }
        let start = self.next % n;
        self.next = self.next.wrapping_add(1);
        let mut total = 0;
        for k in 0..n {
            let Some(s) = &mut self.slots[(start + k) % n] else {
                continue;
            };
            if !s.ready {
                continue;
            }
            let (got, more) = f(&s.socket)?;
            total += got;
            // Only an empty read proves the queue drained: a short one may be short because
            // of the receive buffers, and a full queue whose space the kernel has not yet
            // released drops new arrivals without the wakeup edge-triggered epoll waits for.
            s.ready = more;
        }
        Ok(total)
    }

    /// Datagrams the kernel dropped at the peer sockets since the last call (their queues were
    /// full): what a flooding peer lost, and nobody else.
    pub(crate) fn take_kernel_drops(&mut self) -> u64 {
        let mut total = 0u64;
        for s in self.slots.iter_mut().flatten() {
            let now = s.socket.rx_drops();
            total += u64::from(now.wrapping_sub(s.drops_seen));
            s.drops_seen = now;
        }
        total
    }
}

/// What a sync did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyncOutcome {
    pub opened: usize,
    pub closed: usize,
    pub failed: usize,
}

/// The worker a peer's socket belongs to: a hash of its address, stable across map changes.
fn owner(ip: Ipv4Addr, workers: usize) -> usize {
    let h = u32::from(ip).wrapping_mul(0x9e37_79b1);
    (h >> 16) as usize % workers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_spread_over_workers_and_each_has_one_owner() {
        let mut per_worker = [0usize; 4];
        for i in 0..400u32 {
            let ip = Ipv4Addr::from(0x0a00_0000 + i);
            let o = owner(ip, 4);
            assert_eq!(o, owner(ip, 4));
            per_worker[o] += 1;
        }
        assert!(per_worker.iter().all(|&n| n > 50), "{per_worker:?}");
        assert_eq!(owner(Ipv4Addr::new(10, 0, 0, 1), 1), 0);
    }
}
