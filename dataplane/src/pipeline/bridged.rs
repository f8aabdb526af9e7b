//! L2 mode's decisions, sans I/O: podwire as the node's bridge, extended across nodes over
//! VXLAN. Frames and the FDB in, a [`Verdict`] out, as for routed mode beside it.
//!
//! - A frame from a local bridge port goes where the FDB says: out of one port
//!   ([`Verdict::ToPort`]), to one remote node's VTEP ([`Verdict::ToPeer`]), flooded
//!   ([`Verdict::Flood`]: every flooding port but the ingress one, and every VTEP), or dropped.
//! - A datagram from the underlay is accepted only from a VTEP the bridge knows, through the
//!   same VXLAN receive checks as routed mode's ([`super::vxlan_receive`]: exactly the I flag,
//!   our VNI), then decapsulated (the frame's start moves past the VXLAN header) and bridged;
//!   the bridge never sends a frame from the tunnel back into it (`Hairpin`). Unlike routed
//!   mode the inner frame's addresses are not tied to the sender's lease: in one L2 domain a
//!   pod keeps its address when it moves to another node.
//!
//! How a verdict is carried out (a TAP write, a VXLAN header and a UDP send, head-end
//! replication of a flood) is the worker's business.

use super::{vxlan_receive, Encap, Tables};
use crate::batch::Batch;
use crate::bridge::{Bridge, Decision, PortId, Station};
use crate::route::Backend;
use crate::verdict::{DropReason, Verdict};
use crate::wire::vxlan::{self, Vni};
use crate::wire::MacAddr;
use core::net::Ipv4Addr;

/// Where a batch of frames came from in L2 mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeIngress {
    /// A local bridge port (a pod's, or the host's).
    Port(PortId),
    /// The underlay: VXLAN datagrams, each from its sender (`Meta::peer`).
    Underlay,
}

/// Decides every frame of `batch`, which came in by `from`, against `bridge` (learning as it
/// goes). `vni` is the bridge's VXLAN network (None until the tables say VXLAN: then nothing
/// from the underlay is accepted). `now` is the time in milliseconds.
pub fn process_bridged(
    bridge: &mut Bridge,
    vni: Option<Vni>,
    from: BridgeIngress,
    batch: &mut Batch,
    now: u64,
) {
    for i in 0..batch.len() {
        let (slot, meta) = batch.slot_mut(i);
        meta.verdict = if from == BridgeIngress::Underlay && vni.is_none() {
            // Not a VXLAN bridge (yet): no sender is a VTEP.
            Verdict::Drop(DropReason::UnknownPeer)
        } else if meta.oversized {
            Verdict::Drop(DropReason::Oversized)
        } else {
            match from {
                BridgeIngress::Port(p) => {
                    let frame = &slot[meta.start..meta.start + meta.len];
                    from_port(bridge, p, frame, now)
                }
                BridgeIngress::Underlay => {
                    let datagram = &slot[meta.start..meta.start + meta.len];
                    match decap(bridge, vni, *meta.peer.ip(), datagram) {
                        Ok(()) => {
                            meta.start += vxlan::HEADER_LEN;
                            meta.len -= vxlan::HEADER_LEN;
                            let frame = &slot[meta.start..meta.start + meta.len];
                            from_tunnel(bridge, *meta.peer.ip(), frame, now)
                        }
                        Err(r) => Verdict::Drop(r),
                    }
                }
            }
        };
    }
}

/// Takes what L2 mode needs from a table snapshot into `bridge`: the VTEPs (every other node
/// whose lease is VXLAN's with our VNI) and, as static remote entries, their host ports' MACs
/// (advertised as their leases' VtepMACs). `installed` holds the entries a previous snapshot
/// installed: they are withdrawn first (only those: a pod's or the host port's entry for the
/// same MAC stays, and a remote entry never replaces one, which the bridge refuses and counts),
/// and it is left holding this snapshot's. Returns the VNI; None (and no VTEP) when the tables
/// are not VXLAN's. Runs on a snapshot swap, not per packet.
pub fn sync_peers(
    bridge: &mut Bridge,
    tables: &Tables,
    installed: &mut Vec<MacAddr>,
) -> Option<Vni> {
    let Encap::Vxlan { vni, local_mac } = tables.encap else {
        bridge.set_vteps(&[]);
        return None;
    };
    let me = tables.local.public_ip;
    let peers: Vec<(Ipv4Addr, MacAddr)> = tables
        .map
        .nodes()
        .filter(|n| n.public_ip != me)
        .filter_map(|n| match n.backend {
            Backend::Vxlan { vni: v, vtep_mac } if v == vni => Some((n.public_ip, vtep_mac)),
            _ => None,
        })
        .collect();
    let vteps: Vec<Ipv4Addr> = peers.iter().map(|p| p.0).collect();
    bridge.set_vteps(&vteps);
    for mac in installed.drain(..) {
        bridge.remove_remote_static(mac);
    }
    for (ip, mac) in peers {
        if mac != local_mac && bridge.add_static(mac, Station::Remote(ip)).is_ok() {
            installed.push(mac);
        }
    }
    Some(vni)
}

/// A frame from local port `port`.
fn from_port(bridge: &mut Bridge, port: PortId, frame: &[u8], now: u64) -> Verdict {
    match bridge.input(Station::Port(port), frame, now) {
        Decision::Port(p) => Verdict::ToPort(p),
        Decision::Remote(ip) => Verdict::ToPeer(ip),
        Decision::Flood => Verdict::Flood,
        Decision::Drop(r) => Verdict::Drop(r),
    }
}

/// The checks a VXLAN datagram from `sender` passes before its frame is bridged: a VTEP the
/// bridge knows, then routed mode's VXLAN receive checks.
fn decap(
    bridge: &Bridge,
    vni: Option<Vni>,
    sender: Ipv4Addr,
    datagram: &[u8],
) -> Result<(), DropReason> {
    let Some(vni) = vni else {
        return Err(DropReason::UnknownPeer);
    };
    if bridge.vteps().binary_search(&sender).is_err() {
        return Err(DropReason::UnknownPeer);
    }
    vxlan_receive(datagram, vni).map(|_| ())
}

/// A decapsulated frame from the VTEP at `sender`.
fn from_tunnel(bridge: &mut Bridge, sender: Ipv4Addr, frame: &[u8], now: u64) -> Verdict {
    match bridge.input(Station::Remote(sender), frame, now) {
        Decision::Port(p) => Verdict::ToPort(p),
        Decision::Flood => Verdict::Flood,
        // The bridge never sends a frame from the tunnel back into it.
        Decision::Remote(_) => Verdict::Drop(DropReason::Hairpin),
        Decision::Drop(r) => Verdict::Drop(r),
    }
}
