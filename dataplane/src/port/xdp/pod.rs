//! Pods through AF_XDP: a pod's veth host end with podwire's XDP program in its pod role, so
//! the pod's packets that podwire routes skip the host's stack (and the TUN) both ways.
//!
//! Receive: the program hands over the pod's IPv4 frames that podwire routes (to other nodes'
//! pods, to services, masqueraded); the port strips Ethernet and leaves the IPv4 packet, as the
//! TUN would have given it. Send: packets for the pod get Ethernet with the pod's MAC, from the
//! kernel's neighbour table of the device ([`PodPorts`] keeps the pods of all a worker's ports
//! in one map, so finding a packet's port is one lookup). A pod not resolved yet is not
//! found, and the worker writes its packets into the TUN, whose route the kernel follows
//! (resolving the pod on the way, which the next refresh of the table picks up).

use super::xsk::{ipv4_ethernet_header, XskPort};
use crate::batch::Batch;
use crate::port::neighbours::Neighbours;
use crate::port::{PortError, RxPort, TxOutcome};
use crate::wire::{ethernet, MacAddr};
use rustc_hash::FxHashMap;
use std::net::Ipv4Addr;
use std::time::Instant;

const ETH: usize = 14;

/// One pod's veth host end.
pub struct XdpPodPort {
    xsk: XskPort,
    mac: MacAddr,
    /// The pod's address: the only source its packets may have (`Meta::bound_src`).
    pod_ip: Ipv4Addr,
    neighbours: Neighbours,
    /// Send scratch: each packet's Ethernet header and index.
    framed: Vec<([u8; ETH], u16)>,
}

impl XdpPodPort {
    /// `xsk` is bound to queue 0 of `device`, whose MAC is `mac` and address `local_ip`; the
    /// pod behind it has address `pod_ip`.
    pub fn new(
        xsk: XskPort,
        device: &str,
        mac: MacAddr,
        local_ip: Ipv4Addr,
        pod_ip: Ipv4Addr,
    ) -> XdpPodPort {
        XdpPodPort {
            xsk,
            mac,
            pod_ip,
            neighbours: Neighbours::new(device, local_ip),
            framed: Vec::with_capacity(crate::batch::MAX_BATCH),
        }
    }

    pub fn xsk(&mut self) -> &mut XskPort {
        &mut self.xsk
    }

    /// Sends the packets `items` names (index, the pod's MAC) to the pod.
    pub fn send(&mut self, batch: &Batch, items: &[(u16, MacAddr)]) -> TxOutcome {
        self.framed.clear();
        for &(i, mac) in items {
            self.framed.push((ipv4_ethernet_header(mac, self.mac), i));
        }
        let framed = &self.framed;
        let sent = self.xsk.send_parts(
            framed
                .iter()
                .map(|(h, i)| (&h[..], batch.packet(usize::from(*i)))),
        );
        TxOutcome {
            sent,
            failed: items.len() - sent,
        }
    }
}

impl RxPort for XdpPodPort {
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        let n = self.xsk.rx_batch(batch)?;
        for i in 0..n {
            let (slot, meta) = batch.slot_mut(i);
            let frame = &slot[meta.start..meta.start + meta.len];
            let ipv4 = frame.len() > ETH
                && u16::from_be_bytes([frame[12], frame[13]]) == ethernet::ethertype::IPV4;
            if ipv4 {
                meta.start += ETH;
                meta.len -= ETH;
                meta.bound_src = Some(self.pod_ip);
            } else {
                // The program passes everything else; counted as truncated if it ever comes.
                meta.len = 0;
            }
        }
        Ok(n)
    }
}

/// A worker's pod ports and where each pod is: one map from a pod's address to its port and
/// MAC, rebuilt from the ports' neighbour tables when they are re-read (about every second).
pub struct PodPorts {
    pub ports: Vec<XdpPodPort>,
    by_ip: FxHashMap<Ipv4Addr, (u16, MacAddr)>,
    /// The time of the last [`PodPorts::tick`], and of the last re-read on a miss.
    now: Option<Instant>,
    reread_at: Option<Instant>,
}

/// Least time between two re-reads for packets to pods not found.
const REREAD_ON_MISS: std::time::Duration = std::time::Duration::from_millis(20);

impl PodPorts {
    pub fn new(ports: Vec<XdpPodPort>) -> PodPorts {
        PodPorts {
            ports,
            by_ip: FxHashMap::default(),
            now: None,
            reread_at: None,
        }
    }

    fn rebuild(&mut self) {
        self.by_ip.clear();
        for (k, p) in self.ports.iter().enumerate() {
            for (ip, mac) in p.neighbours.resolved() {
                self.by_ip.insert(ip, (k as u16, mac));
            }
        }
    }

    /// A packet for `ip` found no pod: if one of these ports reaches `ip`, re-read the tables
    /// (at most every 20 ms, by the round's time), since the kernel may have resolved it
    /// meanwhile. (A pod of another worker's port is not these ports' to re-read for.)
    pub fn missed(&mut self, ip: Ipv4Addr) {
        let Some(now) = self.now else { return };
        if self
            .reread_at
            .is_some_and(|t| now.duration_since(t) < REREAD_ON_MISS)
        {
            return;
        }
        // Rate-limits the scan of the ports' routes too: misses for another worker's pods
        // come with every one of their packets.
        self.reread_at = Some(now);
        if !self.ports.iter().any(|p| p.neighbours.on_link(ip)) {
            return;
        }
        for p in &mut self.ports {
            p.neighbours.reread(now);
        }
        self.rebuild();
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// Re-reads the neighbour tables if due (once per round, with the round's time).
    pub fn tick(&mut self, now: Instant) {
        self.now = Some(now);
        let mut changed = false;
        for p in &mut self.ports {
            changed |= p.neighbours.tick(now);
        }
        if changed {
            self.rebuild();
        }
    }

    /// The port and MAC of the pod at `ip`, if it is one of these ports' and resolved.
    #[inline]
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<(u16, MacAddr)> {
        self.by_ip.get(&ip).copied()
    }
}
