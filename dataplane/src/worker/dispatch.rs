//! Carrying out a routed batch's verdicts: each packet sorted to the device its verdict names
//! (the underlay, a pod's AF_XDP port, the TUN), then one send per device.

use super::{count_sent, WorkerPorts};
use crate::batch::{Batch, MAX_BATCH};
use crate::port::xdp::pod::PodPorts;
use crate::port::TxPort;
use crate::stats::{Counter, LocalStats};
use crate::verdict::Verdict;
use crate::wire::{ipv4, MacAddr};

/// Packet indices of one batch, per kind of send.
pub(super) struct Dispatch {
    /// Datagram payloads to their metadata's peer (flannel-udp).
    datagrams: [u16; MAX_BATCH],
    n_datagrams: usize,
    /// Packets with the outer IPv4 and UDP headers the pipeline wrote (VXLAN).
    encapsulated: [u16; MAX_BATCH],
    n_encapsulated: usize,
    /// Whole IPv4 packets to the wire (errors about what the underlay sent us).
    to_wire: [u16; MAX_BATCH],
    n_wire: usize,
    to_tun: [u16; MAX_BATCH],
    n_tun: usize,
    /// Per pod port: the packets for its pods and their MACs (capacity reserved at start).
    to_pods: Vec<Vec<(u16, MacAddr)>>,
}

impl Dispatch {
    pub(super) fn new(pod_ports: usize) -> Dispatch {
        Dispatch {
            datagrams: [0; MAX_BATCH],
            n_datagrams: 0,
            encapsulated: [0; MAX_BATCH],
            n_encapsulated: 0,
            to_wire: [0; MAX_BATCH],
            n_wire: 0,
            to_tun: [0; MAX_BATCH],
            n_tun: 0,
            to_pods: (0..pod_ports)
                .map(|_| Vec::with_capacity(MAX_BATCH))
                .collect(),
        }
    }

    /// Sorts the decided batch by verdict, counts drops, and sends.
    pub(super) fn run(
        &mut self,
        batch: &mut Batch,
        ports: &mut WorkerPorts,
        stats: &mut LocalStats,
    ) {
        self.sort(batch, &mut ports.pods, stats);
        let underlay = &mut ports.underlay;
        if self.n_datagrams > 0 {
            let out = underlay.send_datagrams(batch, &self.datagrams[..self.n_datagrams]);
            count_sent(stats, Counter::TxUnderlay, out);
        }
        if self.n_encapsulated > 0 {
            let indices = &self.encapsulated[..self.n_encapsulated];
            let out = underlay.send_encapsulated(batch, indices);
            count_sent(stats, Counter::TxUnderlay, out);
        }
        if self.n_wire > 0 {
            let out = underlay.send_ip(batch, &self.to_wire[..self.n_wire]);
            count_sent(stats, Counter::TxUnderlay, out);
        }
        for (k, items) in self.to_pods.iter_mut().enumerate() {
            if !items.is_empty() {
                let out = ports.pods.ports[k].send(batch, items);
                count_sent(stats, Counter::TxPods, out);
                items.clear();
            }
        }
        if self.n_tun > 0 {
            let out = ports.tun.tx_batch(batch, &self.to_tun[..self.n_tun]);
            count_sent(stats, Counter::TxTun, out);
        }
    }

    fn sort(&mut self, batch: &Batch, pods: &mut PodPorts, stats: &mut LocalStats) {
        self.n_datagrams = 0;
        self.n_encapsulated = 0;
        self.n_wire = 0;
        self.n_tun = 0;
        for i in 0..batch.len() {
            let idx = i as u16;
            match batch.meta(i).verdict {
                Verdict::ToUnderlay(_) => push(&mut self.datagrams, &mut self.n_datagrams, idx),
                Verdict::ToUnderlayIp(_) => {
                    push(&mut self.encapsulated, &mut self.n_encapsulated, idx);
                }
                Verdict::ToWire(_) => {
                    stats.add(Counter::TxWire, 1);
                    push(&mut self.to_wire, &mut self.n_wire, idx);
                }
                Verdict::ToTun => {
                    if batch.meta(i).completed_checksum {
                        stats.add(Counter::ChecksumsCompleted, 1);
                    }
                    self.queue_for_pod(batch, i, pods);
                }
                Verdict::IcmpToTun => {
                    stats.add(Counter::IcmpUnreachable, 1);
                    self.queue_for_pod(batch, i, pods);
                }
                Verdict::ResetToTun => {
                    stats.add(Counter::TcpResets, 1);
                    self.queue_for_pod(batch, i, pods);
                }
                Verdict::Drop(r) => stats.drop(r),
                // L2 mode's verdicts: the routed pipeline gives none.
                Verdict::ToPort(_) | Verdict::ToPeer(_) | Verdict::Flood | Verdict::Pending => {}
            }
        }
    }

    /// Packet `i` for a pod of this node: through its pod port if it has one here and is
    /// resolved, else into the TUN for the kernel to deliver.
    fn queue_for_pod(&mut self, batch: &Batch, i: usize, pods: &mut PodPorts) {
        if !pods.is_empty() {
            let pkt = batch.packet(i);
            if pkt.len() >= ipv4::HEADER_LEN {
                let dst = ipv4::Packet::new_unchecked(pkt).dst();
                if let Some((k, mac)) = pods.lookup(dst) {
                    self.to_pods[usize::from(k)].push((i as u16, mac));
                    return;
                }
                pods.missed(dst);
            }
        }
        push(&mut self.to_tun, &mut self.n_tun, i as u16);
    }
}

fn push(list: &mut [u16; MAX_BATCH], n: &mut usize, i: u16) {
    list[*n] = i;
    *n += 1;
}
