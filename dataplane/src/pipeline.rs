//! The forwarding decisions, sans I/O: bytes and tables in, a `Verdict` out.
//!
//! Two encapsulations, chosen per cluster (`Tables::encap`):
//!
//! **flannel udp** (the raw inner IPv4 packet as a UDP payload, port 8285):
//! - TUN -> underlay: the inner destination's lease names the node; TTL is decremented (RFC 1624
//!   checksum patch) and the packet goes to `PublicIP:port`.
//! - underlay -> TUN: TTL decremented again, as flanneld does on both ends.
//!
//! **VXLAN** (RFC 7348, as the kernel's `flannel.<VNI>` device sends it):
//! - TUN -> underlay: the pipeline writes the whole outer packet into the headroom in front of the
//!   inner one: IPv4 (TTL 64, DF clear, ECN copied from the inner packet), UDP (source port from
//!   the inner flow hash in the kernel's range, checksum filled), VXLAN (I flag, VNI) and
//!   Ethernet (dst = the peer lease's VtepMAC, src = ours). Only leases of BackendType vxlan are
//!   routes, as for flannel's vxlan backend; the inner TTL is left alone, as the kernel device
//!   leaves it.
//! - underlay -> TUN: accepted only with exactly the I flag, our VNI, our VtepMAC as inner
//!   destination and an IPv4 inner frame (the kernel's `vxlan_rcv` rules), then stripped.
//!
//! Both decapsulations also require a sender that is a node's PublicIP, an inner source inside
//! that node's own lease (anti-spoofing, which neither flannel nor the kernel does) and an inner
//! destination inside ours. A destination in no (usable) lease gets an ICMP net-unreachable
//! written back into the TUN, as flanneld does, except for ICMP errors, non-first fragments and
//! unusable sources (RFC 1122 3.2.2).
//!
//! What comes from the TUN (or a pod's port) is held to its origin the same way: a source
//! outside our lease that is not one of the node's own addresses is a pod posing as someone
//! else (`SpoofedSource`, [`LocalNode::may_send_from`]); a pod's port (`Meta::bound_src`)
//! accepts its pod's own address only.
//!
//! Everything rejected is a `Drop(DropReason)`: counted by the worker, never logged, never a
//! panic. Nothing here allocates, locks or makes a syscall.

use crate::batch::{Batch, Meta, HEADROOM};
use crate::route::{Backend, Ipv4Net, Node, SubnetMap};
use crate::wire::vxlan::Vni;
use crate::wire::{self, checksum, ethernet, icmpv4, ipv4, tcp, udp, vxlan, IpProtocol, MacAddr};
use core::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

// Re-exported: the verdicts are the pipeline's answers, and the control side names them here.
pub use crate::verdict::{DropReason, Verdict};

mod bridged;
mod flows;
mod worker_state;
use crate::nat::Services;
pub use bridged::{process_bridged, sync_peers, BridgeIngress};
pub use flows::{Flows, Tracker};
use flows::{Ingress, Outcome, Stop};
pub use worker_state::{IcmpRateLimit, PathMtus, WorkerState};

/// Which port a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    FromTun,
    FromUnderlay,
}

/// How this cluster encapsulates pod traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// flannel's udp backend: the inner IPv4 packet is the UDP payload.
    FlannelUdp,
    /// VXLAN with our VNI and VTEP MAC.
    Vxlan { vni: Vni, local_mac: MacAddr },
}

/// This node, as the pipeline needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalNode {
    /// Our lease.
    pub subnet: Ipv4Net,
    /// Our underlay address (the lease's PublicIP).
    pub public_ip: Ipv4Addr,
    /// The TUN device's address (the lease's `.0`), source of the ICMP errors we generate.
    pub tun_addr: Ipv4Addr,
}

impl LocalNode {
    /// Whether a packet read from the TUN (or a pod's port) may carry `src`: an address of our
    /// lease (the pods, and the TUN's own `.0`, which the host's traffic routed into the TUN
    /// leaves from), or the node's underlay address (a host process bound to it, or answering
    /// from it, toward a pod or a ClusterIP). The kernel never forwards a pod's packet with a
    /// source that is one of the node's own addresses (a martian "source is local"), so that
    /// exception gives pods nothing; anything else is a pod posing as someone else.
    #[inline]
    pub fn may_send_from(&self, src: Ipv4Addr) -> bool {
        self.subnet.contains(src) || src == self.public_ip || src == self.tun_addr
    }
}

/// Everything the pipeline reads: one immutable snapshot, swapped whole by the control thread.
#[derive(Debug, Clone)]
pub struct Tables {
    pub map: SubnetMap,
    pub local: LocalNode,
    /// UDP port peers listen on (flannel udp default 8285, VXLAN 8472).
    pub peer_port: u16,
    pub encap: Encap,
    /// The services whose ClusterIPs are translated (when flows are tracked).
    pub services: Arc<Services>,
    /// Fill the outer UDP checksum of VXLAN packets. Off when they leave through a UDP socket,
    /// which drops the outer headers the pipeline wrote and has the kernel write its own.
    pub outer_udp_checksum: bool,
    /// `--io xdp`: podwire owns the node's address on the wire for NodePorts and masquerade.
    pub wire: Option<WireNat>,
}

/// What podwire does with the node's own address when it owns the NIC (`--io xdp`): serve
/// the services' NodePorts on it, and (with `masquerade`) SNAT pods' TCP and UDP to hosts
/// outside the cluster network to it, with source ports from `masq_ports`, which the kernel
/// does not use (its ephemeral ports end at 60999).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireNat {
    pub masquerade: bool,
    pub masq_ports: (u16, u16),
}

/// The masquerade source ports: above the kernel's default `ip_local_port_range`.
pub const MASQ_PORTS: (u16, u16) = (61000, 65535);

/// TTL of the ICMP errors we generate (the kernel's default hop limit).
pub const ICMP_ERROR_TTL: u8 = 64;
/// TOS of generated ICMP errors: precedence "internetwork control", as Linux's `icmp_send`.
pub const ICMP_ERROR_TOS: u8 = 0xc0;
/// Outer TTL of VXLAN packets (the kernel's "ttl auto": the default hop limit).
pub const VXLAN_OUTER_TTL: u8 = 64;
/// Bytes VXLAN puts in front of the inner IPv4 packet: outer IPv4, UDP, VXLAN, inner Ethernet.
pub const VXLAN_OVERHEAD: usize = ipv4::HEADER_LEN + udp::HEADER_LEN + VXLAN_INNER_OFFSET;
/// Offset of the inner IPv4 packet in a VXLAN payload (VXLAN header + Ethernet header).
pub const VXLAN_INNER_OFFSET: usize = vxlan::HEADER_LEN + ethernet::HEADER_LEN;
const _: () = assert!(
    HEADROOM >= VXLAN_OVERHEAD,
    "batch headroom must fit the VXLAN headers"
);
/// The kernel's default `ip_local_port_range`, which VXLAN source ports are drawn from.
pub const SRC_PORT_MIN: u16 = 32768;
pub const SRC_PORT_MAX: u16 = 60999;

/// Decides every packet of a batch received from `dir`, statelessly (no connection tracking,
/// no services).
pub fn process(tables: &Tables, dir: Direction, batch: &mut Batch) {
    process_with(tables, None, 0, dir, batch)
}

/// Decides every packet of a batch received from `dir`; with `flows`, every packet is tracked
/// and translated. `now` is the time in milliseconds, read once per batch.
pub fn process_with(
    tables: &Tables,
    flows: Option<&Flows>,
    now: u64,
    dir: Direction,
    batch: &mut Batch,
) {
    decide(tables, flows, None, now, dir, batch)
}

/// [`process_with`] as a worker runs it, with its [`WorkerState`]: path MTUs toward peers and
/// the ICMP rate limits applied to what the pods send. `now` is in milliseconds.
pub fn process_in_worker(
    tables: &Tables,
    flows: Option<&Flows>,
    state: &mut WorkerState,
    now: u64,
    dir: Direction,
    batch: &mut Batch,
) {
    decide(tables, flows, Some(state), now, dir, batch)
}

fn decide(
    tables: &Tables,
    flows: Option<&Flows>,
    mut state: Option<&mut WorkerState>,
    now: u64,
    dir: Direction,
    batch: &mut Batch,
) {
    let mut tracker = flows.map(|f| Tracker::new(f, now));
    for i in 0..batch.len() {
        let (slot, meta) = batch.slot_mut(i);
        let tr = tracker.as_mut();
        meta.verdict = match dir {
            Direction::FromTun => from_tun(tables, tr, slot, meta),
            Direction::FromUnderlay => from_underlay(tables, tr, slot, meta),
        };
        if let Some(st) = state.as_deref_mut() {
            st.revise(tables, dir, slot, meta, now);
        }
        // DELIBERATELY BROKEN with `fuzz-broken-undecided` (fuzz tests only).
        #[cfg(feature = "fuzz-broken-undecided")]
        if meta.verdict == Verdict::Drop(DropReason::TtlExpired) {
            meta.verdict = Verdict::Pending;
        }
        match meta.verdict {
            Verdict::ToUnderlay(dst) => meta.peer = dst,
            Verdict::ToUnderlayIp(dst) | Verdict::ToWire(dst) => {
                meta.peer = SocketAddrV4::new(dst, 0)
            }
            _ => {}
        }
    }
    if let Some(tr) = tracker.as_mut() {
        tr.finish();
    }
}

fn parse_ipv4(data: &[u8]) -> Result<ipv4::Packet<&[u8]>, DropReason> {
    match data.first() {
        None => return Err(DropReason::Truncated),
        Some(b) if b >> 4 != 4 => return Err(DropReason::NotIpv4),
        Some(_) => {}
    }
    ipv4::Packet::new_checked(data).map_err(|e| match e {
        wire::Error::Truncated => DropReason::Truncated,
        wire::Error::Malformed => DropReason::BadIpHeader,
    })
}

/// A packet read from the TUN device: where does it go?
pub fn from_tun(
    t: &Tables,
    tracker: Option<&mut Tracker>,
    slot: &mut [u8],
    meta: &mut Meta,
) -> Verdict {
    if meta.oversized {
        return Verdict::Drop(DropReason::Oversized);
    }
    let (src, dst, total_len) = {
        let p = match parse_ipv4(&slot[meta.start..meta.start + meta.len]) {
            Ok(p) => p,
            Err(r) => return Verdict::Drop(r),
        };
        (p.src(), p.dst(), usize::from(p.total_len()))
    };
    let held = match meta.bound_src {
        // A pod's port: its pod's own address only.
        Some(pod) => src == pod,
        None => t.local.may_send_from(src) || outside_client_of_external_ip(t, src, dst),
    };
    // DELIBERATELY BROKEN with `fuzz-broken-tun-spoof` (fuzz tests only).
    let held = held || cfg!(feature = "fuzz-broken-tun-spoof");
    if !held {
        return Verdict::Drop(DropReason::SpoofedSource);
    }
    meta.len = total_len;
    let mut dst = dst;
    let mut translated = false;
    if let Some(tr) = tracker {
        let pkt = &mut slot[meta.start..meta.start + meta.len];
        match tr.track(t, pkt, Ingress::Pods) {
            Ok(Outcome::Unchanged) => {}
            Ok(Outcome::Translated) => {
                translated = true;
                dst = ipv4::Packet::new_unchecked(&pkt[..]).dst();
            }
            Err(Stop::Drop(r)) => return Verdict::Drop(r),
            Err(Stop::Reject) => {
                return icmp_unreachable(slot, meta, icmpv4::unreachable::PORT, dst)
            }
            Err(Stop::Reset) => return tcp_reset(slot, meta),
            // Only the tunnel brings backends' answers.
            Err(Stop::ResetClient(_)) => return Verdict::Drop(DropReason::EndpointGone),
        }
    }
    let node = match t.map.lookup(dst) {
        Some(node) => node,
        // The answer to a connection of the node's own address (a host process bound to it) to
        // a service: the kernel delivers it.
        None if translated && dst == t.local.public_ip => return Verdict::ToTun,
        // Masqueraded, or the answer to a NodePort client: the kernel routed it here already.
        None if translated && t.wire.is_some() => return Verdict::ToWire(dst),
        None => return net_unreachable(t, slot, meta),
    };
    if node.subnet == t.local.subnet {
        if !translated {
            return Verdict::Drop(DropReason::LoopToSelf);
        }
        // A translated packet for a pod of this node (a local backend, or the answer to a local
        // client): back into the TUN for the kernel to deliver, one routing hop.
        if !decrement_ttl(&mut slot[meta.start..meta.start + meta.len]) {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        return Verdict::ToTun;
    }
    to_node(t, slot, meta, node)
}

/// Decrements the TTL of an IPv4 packet, unless it would expire (false).
fn decrement_ttl(pkt: &mut [u8]) -> bool {
    let mut p = ipv4::Packet::new_unchecked(pkt);
    if p.ttl() <= 1 {
        return false;
    }
    p.decrement_ttl();
    true
}

/// A pod packet for `node`, another node: encapsulated for it.
fn to_node(t: &Tables, slot: &mut [u8], meta: &mut Meta, node: &Node) -> Verdict {
    match t.encap {
        Encap::FlannelUdp => {
            let mut p = ipv4::Packet::new_unchecked(&mut slot[meta.start..meta.start + meta.len]);
            if p.ttl() <= 1 {
                return Verdict::Drop(DropReason::TtlExpired);
            }
            p.decrement_ttl();
            Verdict::ToUnderlay(SocketAddrV4::new(node.public_ip, t.peer_port))
        }
        Encap::Vxlan { vni, local_mac } => match node.backend {
            Backend::Vxlan { vtep_mac, .. } => {
                let peer = node.public_ip;
                vxlan_encap(t, slot, meta, peer, vtep_mac, vni, local_mac)
            }
            // flannel's vxlan backend installs no route for other backends' leases.
            Backend::Udp | Backend::Other => net_unreachable(t, slot, meta),
        },
    }
}

/// A packet from the node's own address (translated, or an ICMP error of the node's) for
/// `dst`: on the wire, unless `dst` is a pod (a client in the cluster that came in over the
/// wire, as pods of DirectRouting nodes do): then through the cluster's routes.
fn out_as_node(t: &Tables, slot: &mut [u8], meta: &mut Meta, dst: Ipv4Addr) -> Verdict {
    match t.map.lookup(dst) {
        // An address of the cluster network in no lease is nowhere, least of all on the wire.
        None if t.map.network().contains(dst) => Verdict::Drop(DropReason::NoRoute),
        None => Verdict::ToWire(dst),
        Some(node) if node.subnet == t.local.subnet => Verdict::ToTun,
        Some(node) => to_node(t, slot, meta, node),
    }
}

/// A packet from the wire to the node's own address that the XDP program steered to podwire:
/// a NodePort connection (translated to its backend, here or on another node) or the answer to
/// a masqueraded one (translated back to its pod). Anything else is not ours.
pub fn from_wire(
    t: &Tables,
    tracker: Option<&mut Tracker>,
    slot: &mut [u8],
    meta: &mut Meta,
) -> Verdict {
    if meta.oversized {
        return Verdict::Drop(DropReason::Oversized);
    }
    let (Some(tr), Some(_)) = (tracker, t.wire) else {
        return Verdict::Drop(DropReason::NotForThisNode);
    };
    meta.len = match parse_ipv4(&slot[meta.start..meta.start + meta.len]) {
        // Nothing checked it before us (the XDP program takes it before the kernel's ip_rcv,
        // which drops it): no connection is opened or translated for a corrupted header.
        Ok(p) if !p.verify_checksum() => return Verdict::Drop(DropReason::BadChecksum),
        // A source the kernel calls martian on input (ip_route_input): the node's own address,
        // loopback, "this network", multicast, broadcast. Its answers would go to the wire
        // addressed to the node itself, or nowhere.
        Ok(p) if martian_source(t, p.src()) => return Verdict::Drop(DropReason::SpoofedSource),
        Ok(p) if p.dst() != t.local.public_ip => return Verdict::Drop(DropReason::NotForThisNode),
        Ok(p) => usize::from(p.total_len()),
        Err(r) => return Verdict::Drop(r),
    };
    let pkt = &mut slot[meta.start..meta.start + meta.len];
    match tr.track(t, pkt, Ingress::Wire) {
        Ok(Outcome::Translated) => {}
        Ok(Outcome::Unchanged) => return Verdict::Drop(DropReason::NotForThisNode),
        Err(Stop::Drop(r)) => return Verdict::Drop(r),
        // Resets are for pods' segments only.
        Err(Stop::Reset | Stop::ResetClient(_)) => return Verdict::Drop(DropReason::EndpointGone),
        // A NodePort without endpoints: port unreachable from the node, as kube-proxy's REJECT.
        Err(Stop::Reject) => {
            let client = ipv4::Packet::new_unchecked(&pkt[..]).src();
            let unreachable = icmpv4::unreachable::PORT;
            return match icmp_unreachable(slot, meta, unreachable, t.local.public_ip) {
                Verdict::IcmpToTun => out_as_node(t, slot, meta, client),
                other => other,
            };
        }
    }
    let dst = ipv4::Packet::new_unchecked(&pkt[..]).dst();
    match t.map.lookup(dst) {
        // The kernel routes it from the TUN to the pod (one hop, as from eth0 to cni0).
        Some(node) if node.subnet == t.local.subnet => Verdict::ToTun,
        Some(node) => {
            // Routed here, from the wire to another node, as the kernel would have.
            if !decrement_ttl(pkt) {
                return Verdict::Drop(DropReason::TtlExpired);
            }
            to_node(t, slot, meta, node)
        }
        None => Verdict::Drop(DropReason::NoRoute),
    }
}

/// Whether a packet read from the TUN is an outside client's, forwarded by the node into
/// podwire because it is addressed to a service's external IP: a source outside the cluster
/// network and the services' addresses (and not a martian). The TUN cannot tell it from a pod posing as an outside host;
/// such a pod reaches no more than it could through the kernel, which forwards its packets
/// to outside hosts without podwire (the node's `rp_filter` is what holds pods there).
#[inline]
fn outside_client_of_external_ip(t: &Tables, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    !t.services.in_cidr(dst)
        && t.services.is_frontend(dst)
        && !t.map.network().contains(src)
        && !t.services.is_frontend(src)
        && !martian_source(t, src)
}

/// Whether a packet from the wire with source `src` is one the kernel drops as a martian, or
/// claims an address of the cluster network that no lease holds (a pod of no node: its answers
/// could go nowhere).
fn martian_source(t: &Tables, src: Ipv4Addr) -> bool {
    (t.map.network().contains(src) && t.map.lookup(src).is_none())
        || src == t.local.public_ip
        || src == t.local.tun_addr
        || src.is_loopback()
        || src.is_multicast()
        || src.is_broadcast()
        || src.octets()[0] == 0
}

/// The kernel's `udp_flow_src_port` over our own flow hash of the inner packet: one flow, one
/// source port, spread over `SRC_PORT_MIN..=SRC_PORT_MAX` so ECMP and RSS spread flows.
fn flow_src_port(inner: &[u8]) -> u16 {
    let p = ipv4::Packet::new_unchecked(inner);
    let mut h = u64::from(p.src().to_bits()) << 32 | u64::from(p.dst().to_bits());
    h ^= u64::from(u8::from(p.protocol()));
    let l4 = p.payload();
    if !p.is_non_first_fragment()
        && l4.len() >= 4
        && matches!(p.protocol(), IpProtocol::Tcp | IpProtocol::Udp)
    {
        h ^= u64::from(u32::from_be_bytes([l4[0], l4[1], l4[2], l4[3]])) << 17;
    }
    // A 64-bit multiply-xorshift mix; the kernel's own hash is keyed and not reproducible anyway.
    h = (h ^ (h >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut hash = (h >> 32) as u32;
    hash ^= hash << 16;
    let span = u64::from(SRC_PORT_MAX - SRC_PORT_MIN);
    ((u64::from(hash) * span) >> 32) as u16 + SRC_PORT_MIN
}

/// Writes the outer IPv4/UDP/VXLAN/Ethernet headers in front of the inner packet.
fn vxlan_encap(
    t: &Tables,
    slot: &mut [u8],
    meta: &mut Meta,
    peer: Ipv4Addr,
    peer_mac: MacAddr,
    vni: Vni,
    local_mac: MacAddr,
) -> Verdict {
    let inner = &slot[meta.start..meta.start + meta.len];
    let src_port = flow_src_port(inner);
    let ecn = ipv4::Packet::new_unchecked(inner).dscp_ecn() & 0x03;
    let start = meta.start - VXLAN_OVERHEAD;
    let total = VXLAN_OVERHEAD + meta.len;
    let out = &mut slot[start..start + total];
    let (ip_hdr, rest) = out.split_at_mut(ipv4::HEADER_LEN);
    {
        let eth = &mut rest[udp::HEADER_LEN + vxlan::HEADER_LEN..];
        ethernet::Repr {
            dst: peer_mac,
            src: local_mac,
            ethertype: ethernet::ethertype::IPV4,
        }
        .emit(&mut ethernet::Packet::new_unchecked(eth));
        vxlan::Repr { vni }.emit(&mut rest[udp::HEADER_LEN..]);
    }
    let udp_payload = total - ipv4::HEADER_LEN - udp::HEADER_LEN;
    let outer_udp = udp::Repr {
        src_port,
        dst_port: t.peer_port,
        payload_len: udp_payload,
    };
    if t.outer_udp_checksum {
        outer_udp.emit(rest, t.local.public_ip, peer);
    } else {
        outer_udp.emit_unchecked(rest);
    }
    ipv4::Repr {
        src: t.local.public_ip,
        dst: peer,
        protocol: IpProtocol::Udp,
        payload_len: udp::HEADER_LEN + udp_payload,
        ttl: VXLAN_OUTER_TTL,
        dscp_ecn: ecn,
        ident: 0,
        dont_frag: false,
    }
    .emit(ip_hdr);
    meta.start = start;
    meta.len = total;
    Verdict::ToUnderlayIp(peer)
}

/// A datagram received on the underlay socket: may it enter the TUN?
pub fn from_underlay(
    t: &Tables,
    tracker: Option<&mut Tracker>,
    slot: &mut [u8],
    meta: &mut Meta,
) -> Verdict {
    if meta.wire {
        return from_wire(t, tracker, slot, meta);
    }
    if meta.oversized {
        return Verdict::Drop(DropReason::Oversized);
    }
    let sender = *meta.peer.ip();
    if !t.map.is_node(sender) {
        return Verdict::Drop(DropReason::UnknownPeer);
    }
    if sender == t.local.public_ip {
        // We never send to ourselves over the underlay: a forgery, or a loop.
        return Verdict::Drop(DropReason::LoopToSelf);
    }
    match t.encap {
        Encap::FlannelUdp => {
            let data = &slot[meta.start..meta.start + meta.len];
            meta.len = match check_inner(t, sender, data) {
                Ok(len) => len,
                // DELIBERATELY BROKEN with `fuzz-broken-relay` (fuzz tests only).
                #[cfg(feature = "fuzz-broken-relay")]
                Err(DropReason::NotForThisNode) => {
                    let p = ipv4::Packet::new_unchecked(data);
                    let len = usize::from(p.total_len());
                    match t.map.lookup(p.dst()) {
                        Some(node) if node.subnet != t.local.subnet => {
                            meta.len = len;
                            return to_node(t, slot, meta, node);
                        }
                        _ => return Verdict::Drop(DropReason::NotForThisNode),
                    }
                }
                Err(r) => return Verdict::Drop(r),
            };
            let mut p = ipv4::Packet::new_unchecked(&mut slot[meta.start..meta.start + meta.len]);
            if p.ttl() <= 1 {
                return Verdict::Drop(DropReason::TtlExpired);
            }
            // DELIBERATELY BROKEN with `fuzz-broken-ttl-checksum` (fuzz tests only).
            if cfg!(feature = "fuzz-broken-ttl-checksum") {
                let ttl = p.ttl();
                p.set_ttl(ttl - 1);
            } else {
                p.decrement_ttl();
            }
            track_inbound(t, tracker, slot, meta)
        }
        Encap::Vxlan { vni, local_mac } => {
            let data = &slot[meta.start..meta.start + meta.len];
            match vxlan_decap(t, sender, data, vni, local_mac) {
                Ok(len) => {
                    meta.start += VXLAN_INNER_OFFSET;
                    meta.len = len;
                    let pkt = &mut slot[meta.start..meta.start + meta.len];
                    meta.completed_checksum = complete_partial_checksum(pkt);
                    track_inbound(t, tracker, slot, meta)
                }
                Err(r) => Verdict::Drop(r),
            }
        }
    }
}

/// Tracks (and reverse-translates) a checked inner packet from the underlay on its way into
/// the TUN; the answer to a NodePort client outside the cluster goes to the wire instead.
fn track_inbound(
    t: &Tables,
    tracker: Option<&mut Tracker>,
    slot: &mut [u8],
    meta: &mut Meta,
) -> Verdict {
    let pkt = &mut slot[meta.start..meta.start + meta.len];
    match tracker.map(|tr| tr.track(t, pkt, Ingress::Underlay)) {
        None | Some(Ok(Outcome::Unchanged)) => Verdict::ToTun,
        Some(Ok(Outcome::Translated)) => {
            let dst = ipv4::Packet::new_unchecked(&pkt[..]).dst();
            if t.local.subnet.contains(dst) || t.services.in_cidr(dst) || t.wire.is_none() {
                return Verdict::ToTun;
            }
            // Routed from the tunnel towards the client, as the kernel would have.
            if !decrement_ttl(pkt) {
                return Verdict::Drop(DropReason::TtlExpired);
            }
            out_as_node(t, slot, meta, dst)
        }
        Some(Err(Stop::Drop(r))) => Verdict::Drop(r),
        // Only packets from pods open service connections.
        Some(Err(Stop::Reject)) => Verdict::Drop(DropReason::CtInvalid),
        // Resets are for pods' segments only.
        Some(Err(Stop::Reset)) => Verdict::Drop(DropReason::EndpointGone),
        Some(Err(Stop::ResetClient(to))) if t.local.subnet.contains(to.dst) => {
            tcp_reset_client(slot, meta, &to)
        }
        Some(Err(Stop::ResetClient(_))) => Verdict::Drop(DropReason::EndpointGone),
    }
}

/// The kernel's VXLAN receive checks, then ours; returns the inner IPv4 packet's length.
/// The VXLAN receive checks both modes share (the kernel's `vxlan_rcv` rules): a whole
/// header, exactly the I flag with every reserved bit zero, and our VNI. Returns the inner frame.
fn vxlan_receive(data: &[u8], vni: Vni) -> Result<&[u8], DropReason> {
    let v = vxlan::Packet::new_checked(data).map_err(|_| DropReason::Truncated)?;
    v.check_strict().map_err(|_| DropReason::BadVxlanHeader)?;
    if v.vni() != vni {
        return Err(DropReason::WrongVni);
    }
    Ok(&data[vxlan::HEADER_LEN..])
}

fn vxlan_decap(
    t: &Tables,
    sender: Ipv4Addr,
    data: &[u8],
    vni: Vni,
    local_mac: MacAddr,
) -> Result<usize, DropReason> {
    let frame = vxlan_receive(data, vni)?;
    let eth = ethernet::Packet::new_checked(frame).map_err(|_| DropReason::Truncated)?;
    if eth.src() == local_mac {
        return Err(DropReason::LoopToSelf);
    }
    if eth.dst() != local_mac {
        return Err(DropReason::WrongDstMac);
    }
    if eth.ethertype() != ethernet::ethertype::IPV4 {
        return Err(DropReason::NotIpv4);
    }
    check_inner(t, sender, &data[VXLAN_INNER_OFFSET..])
}

/// Completes an inner TCP or UDP checksum that the sending kernel left for offload.
///
/// A kernel that hands a packet to a device with checksum offload (`CHECKSUM_PARTIAL`) writes only
/// the pseudo-header sum into the L4 checksum field and lets the NIC finish it. Over veth (a
/// kernel VXLAN peer on the same host) nothing finishes it, and a UDP socket hands us the bytes
/// as they are; the kernel would then reject the packet when we write it into the TUN. A field
/// that equals the pseudo-header sum exactly is that signature (1 in 65536 by chance, and then
/// recomputing is still right for intact bytes): recompute it. Costs one comparison otherwise.
/// Returns whether it completed one.
pub fn complete_partial_checksum(pkt: &mut [u8]) -> bool {
    let (offset, proto, l4_len, src, dst) = {
        let p = ipv4::Packet::new_unchecked(&pkt[..]);
        if p.is_non_first_fragment() || p.more_frags() {
            return false;
        }
        let (offset, min_len) = match p.protocol() {
            IpProtocol::Tcp => (16, 20),
            IpProtocol::Udp => (6, 8),
            _ => return false,
        };
        let l4_len = p.payload().len();
        if l4_len < min_len {
            return false;
        }
        (
            p.header_len() + offset,
            u8::from(p.protocol()),
            l4_len,
            p.src(),
            p.dst(),
        )
    };
    let field = u16::from_be_bytes([pkt[offset], pkt[offset + 1]]);
    let pseudo = checksum::fold(checksum::pseudo_header_v4(src, dst, proto, l4_len as u16));
    if field != pseudo {
        return false;
    }
    pkt[offset..offset + 2].copy_from_slice(&[0, 0]);
    let l4_start = pkt.len() - l4_len;
    let mut c = !checksum::l4_sum_v4(src, dst, proto, &pkt[l4_start..]);
    if c == 0 && proto == 17 {
        c = 0xffff;
    }
    pkt[offset..offset + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Checks a decapsulated inner IPv4 packet from `sender`; returns its length (trailing bytes
/// beyond Total Length are not part of it).
fn check_inner(t: &Tables, sender: Ipv4Addr, data: &[u8]) -> Result<usize, DropReason> {
    let p = parse_ipv4(data)?;
    if !p.verify_checksum() {
        return Err(DropReason::BadChecksum);
    }
    if !t.local.subnet.contains(p.dst()) {
        return Err(DropReason::NotForThisNode);
    }
    match t.map.lookup(p.src()) {
        Some(node) if node.public_ip == sender => Ok(usize::from(p.total_len())),
        // DELIBERATELY BROKEN with `fuzz-broken-spoof` (fuzz tests only).
        Some(_) if cfg!(feature = "fuzz-broken-spoof") => Ok(usize::from(p.total_len())),
        _ => Err(DropReason::SpoofedSource),
    }
}

/// Most of the offending packet an ICMP error quotes: its IP header (up to 60 bytes) plus the
/// first 8 bytes of its payload (RFC 792).
const MAX_QUOTE: usize = 60 + 8;

/// Replaces the packet in `slot` by an ICMP net-unreachable for its sender, if one may be sent.
fn net_unreachable(t: &Tables, slot: &mut [u8], meta: &mut Meta) -> Verdict {
    icmp_unreachable(slot, meta, icmpv4::unreachable::NET, t.local.tun_addr)
}

/// Replaces the packet in `slot` by an ICMP destination-unreachable with `code` from `src`, if
/// one may be sent (otherwise it is dropped as `NoRoute`).
fn icmp_unreachable(slot: &mut [u8], meta: &mut Meta, code: u8, src: Ipv4Addr) -> Verdict {
    icmp_error(slot, meta, code, 0, src)
}

/// [`icmp_unreachable`] with the next-hop MTU field (RFC 1191) set, for "fragmentation needed".
fn icmp_error(slot: &mut [u8], meta: &mut Meta, code: u8, mtu: u16, src: Ipv4Addr) -> Verdict {
    let mut quote = [0u8; MAX_QUOTE];
    let (quote_len, orig_src) = {
        let p = ipv4::Packet::new_unchecked(&slot[meta.start..meta.start + meta.len]);
        if !may_send_icmp_error(&p) {
            return Verdict::Drop(DropReason::NoRoute);
        }
        let n = p.header_len() + p.payload().len().min(8);
        quote[..n].copy_from_slice(&slot[meta.start..meta.start + n]);
        (n, p.src())
    };
    let total = ipv4::HEADER_LEN + icmpv4::HEADER_LEN + quote_len;
    let out = &mut slot[meta.start..meta.start + total];
    ipv4::Repr {
        src,
        dst: orig_src,
        protocol: IpProtocol::Icmp,
        payload_len: icmpv4::HEADER_LEN + quote_len,
        ttl: ICMP_ERROR_TTL,
        dscp_ecn: ICMP_ERROR_TOS,
        ident: 0,
        dont_frag: false,
    }
    .emit(out);
    let mut icmp = icmpv4::Packet::new_unchecked(&mut out[ipv4::HEADER_LEN..]);
    icmp.set_kind(icmpv4::kind::DEST_UNREACHABLE);
    icmp.set_code(code);
    icmp.set_rest(0, mtu);
    icmp.data_mut().copy_from_slice(&quote[..quote_len]);
    icmp.fill_checksum();
    meta.len = total;
    meta.icmp_error = true;
    Verdict::IcmpToTun
}

/// Replaces a pod's TCP segment, of a connection that cannot go on, by the RST its sender gets
/// for it (`<SEQ=SEG.ACK><CTL=RST>`, which the sender's TCP accepts: it is the next sequence
/// number it expects), from the address and port it sent to; back into the TUN. The client
/// fails at once instead of retransmitting into a connection nobody holds.
fn tcp_reset(slot: &mut [u8], meta: &mut Meta) -> Verdict {
    let (client, server, seq) = {
        let p = ipv4::Packet::new_unchecked(&slot[meta.start..meta.start + meta.len]);
        let Ok(seg) = tcp::Packet::new_checked(p.payload()) else {
            return Verdict::Drop(DropReason::EndpointGone);
        };
        (
            (p.src(), seg.src_port()),
            (p.dst(), seg.dst_port()),
            seg.ack(),
        )
    };
    reset_in_place(slot, meta, server, client, seq, None)
}

/// Replaces the old backend's segment towards a pod client, of a connection whose endpoint
/// left, by the RST that ends it at the client: from the service address the client knows
/// (`to`, the segment's translation), `<SEQ=SEG.SEQ><ACK=SEG.ACK><CTL=RST,ACK>`, which the
/// client's TCP accepts (its sequence number is the next one expected, when the segment's
/// was; otherwise the client's challenge ACK is answered with an RST it accepts); into the
/// TUN.
fn tcp_reset_client(slot: &mut [u8], meta: &mut Meta, to: &crate::conntrack::Tuple) -> Verdict {
    let (seq, ack) = {
        let p = ipv4::Packet::new_unchecked(&slot[meta.start..meta.start + meta.len]);
        let Ok(seg) = tcp::Packet::new_checked(p.payload()) else {
            return Verdict::Drop(DropReason::EndpointGone);
        };
        (seg.seq(), seg.ack())
    };
    let (from, client) = ((to.src, to.sport), (to.dst, to.dport));
    reset_in_place(slot, meta, from, client, seq, Some(ack))
}

/// Writes over the packet in `slot` an IPv4 TCP RST `from` -> `to` (with ACK and `ack` if
/// given), no options, no payload, for the TUN.
fn reset_in_place(
    slot: &mut [u8],
    meta: &mut Meta,
    from: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
    seq: u32,
    ack: Option<u32>,
) -> Verdict {
    let total = ipv4::HEADER_LEN + tcp::HEADER_LEN;
    let out = &mut slot[meta.start..meta.start + total];
    ipv4::Repr {
        src: from.0,
        dst: to.0,
        protocol: IpProtocol::Tcp,
        payload_len: tcp::HEADER_LEN,
        ttl: 64,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: true,
    }
    .emit(out);
    let seg = &mut out[ipv4::HEADER_LEN..];
    match ack {
        Some(ack) => tcp::emit_reset_ack(seg, from, to, seq, ack),
        None => tcp::emit_reset(seg, from, to, seq),
    };
    meta.len = total;
    Verdict::ResetToTun
}

/// RFC 1122 3.2.2: never answer an ICMP error, a non-first fragment, or a source that is not a
/// single host.
fn may_send_icmp_error(p: &ipv4::Packet<&[u8]>) -> bool {
    if p.is_non_first_fragment() {
        return false;
    }
    let src = p.src();
    if src.is_unspecified() || src.is_multicast() || src.is_broadcast() {
        return false;
    }
    if p.protocol() == IpProtocol::Icmp {
        match p.payload().first() {
            Some(&kind) => !icmpv4::is_error(kind),
            None => false,
        }
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Backend, Node};
    use crate::wire::checksum;

    const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
    const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
    const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);

    fn tables() -> Tables {
        let mut map = SubnetMap::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        for (subnet, ip) in [("10.244.1.0/24", NODE_A), ("10.244.2.0/24", NODE_B)] {
            map.insert(Node {
                subnet: subnet.parse().unwrap(),
                public_ip: ip,
                backend: Backend::Udp,
            })
            .unwrap();
        }
        Tables {
            map,
            local: LocalNode {
                subnet: "10.244.1.0/24".parse().unwrap(),
                public_ip: NODE_A,
                tun_addr: Ipv4Addr::new(10, 244, 1, 0),
            },
            peer_port: 8285,
            encap: Encap::FlannelUdp,
            services: Default::default(),
            outer_udp_checksum: true,
            wire: None,
        }
    }

    const MAC_A: MacAddr = MacAddr([0x0e, 0, 0, 0, 0, 0x0a]);
    const MAC_B: MacAddr = MacAddr([0x0e, 0, 0, 0, 0, 0x0b]);
    const NODE_C: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 3);

    /// Node A (us) and B speak VXLAN VNI 1; node C holds a udp lease.
    fn vxlan_tables() -> Tables {
        let vni = Vni::new(1).unwrap();
        let mut map = SubnetMap::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        for (subnet, ip, backend) in [
            (
                "10.244.1.0/24",
                NODE_A,
                Backend::Vxlan {
                    vni,
                    vtep_mac: MAC_A,
                },
            ),
            (
                "10.244.2.0/24",
                NODE_B,
                Backend::Vxlan {
                    vni,
                    vtep_mac: MAC_B,
                },
            ),
            ("10.244.3.0/24", NODE_C, Backend::Udp),
        ] {
            map.insert(Node {
                subnet: subnet.parse().unwrap(),
                public_ip: ip,
                backend,
            })
            .unwrap();
        }
        Tables {
            encap: Encap::Vxlan {
                vni,
                local_mac: MAC_A,
            },
            peer_port: 8472,
            ..tables()
        }
        .with_map(map)
    }

    impl Tables {
        fn with_map(mut self, map: SubnetMap) -> Tables {
            self.map = map;
            self
        }
    }

    fn run_with(t: &Tables, dir: Direction, pkt: &[u8], peer: Ipv4Addr) -> (Verdict, Vec<u8>) {
        let mut b = Batch::new(1, 2048);
        b.rx_slot(0)[..pkt.len()].copy_from_slice(pkt);
        b.commit_rx(0, pkt.len(), SocketAddrV4::new(peer, 8472), false);
        process(t, dir, &mut b);
        (b.meta(0).verdict, b.packet(0).to_vec())
    }

    /// A VXLAN payload (what the UDP socket hands us) built with etherparse for the Ethernet
    /// part: flags, VNI, inner dst/src MAC, inner packet.
    fn vxlan_payload(
        flags: u8,
        vni: u32,
        dst: MacAddr,
        src: MacAddr,
        ethertype: u16,
        inner: &[u8],
    ) -> Vec<u8> {
        let mut out = vec![flags, 0, 0, 0];
        out.extend_from_slice(&(vni << 8).to_be_bytes());
        etherparse::Ethernet2Header {
            destination: dst.0,
            source: src.0,
            ether_type: etherparse::EtherType(ethertype),
        }
        .write(&mut out)
        .unwrap();
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn test_vxlan_encap_writes_what_the_kernel_would() {
        let inner = udp_packet(POD_A, POD_B, 63);
        let (v, out) = run_with(&vxlan_tables(), Direction::FromTun, &inner, NODE_A);
        assert_eq!(v, Verdict::ToUnderlayIp(NODE_B));
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&out).unwrap();
        assert_eq!(
            (ip.source, ip.destination, ip.time_to_live),
            (NODE_A.octets(), NODE_B.octets(), 64)
        );
        assert!(!ip.dont_fragment);
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        assert_eq!(usize::from(ip.total_len), out.len());
        let (u, payload) = etherparse::UdpHeader::from_slice(rest).unwrap();
        assert_eq!(u.destination_port, 8472);
        assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&u.source_port));
        assert_ne!(u.checksum, 0);
        assert_eq!(u.checksum, u.calc_checksum_ipv4(&ip, payload).unwrap());
        assert_eq!(
            payload,
            vxlan_payload(0x08, 1, MAC_B, MAC_A, 0x0800, &inner)
        );
    }

    #[test]
    fn test_vxlan_for_a_socket_leaves_the_outer_checksum_to_the_kernel() {
        let inner = udp_packet(POD_A, POD_B, 63);
        let t = Tables {
            outer_udp_checksum: false,
            ..vxlan_tables()
        };
        let (v, out) = run_with(&t, Direction::FromTun, &inner, NODE_A);
        assert_eq!(v, Verdict::ToUnderlayIp(NODE_B));
        let (_, rest) = etherparse::Ipv4Header::from_slice(&out).unwrap();
        let (u, payload) = etherparse::UdpHeader::from_slice(rest).unwrap();
        assert_eq!((u.destination_port, u.checksum), (8472, 0));
        assert_eq!(usize::from(u.length), 8 + payload.len());
        assert_eq!(
            payload,
            vxlan_payload(0x08, 1, MAC_B, MAC_A, 0x0800, &inner)
        );
    }

    #[test]
    fn test_vxlan_source_port_follows_the_flow_and_ecn_is_copied() {
        let t = vxlan_tables();
        let port = |pkt: &[u8]| {
            let out = run_with(&t, Direction::FromTun, pkt, NODE_A).1;
            u16::from_be_bytes([out[20], out[21]])
        };
        let a = udp_packet(POD_A, POD_B, 64);
        assert_eq!(port(&a), port(&a));
        let mut other = Vec::new();
        etherparse::PacketBuilder::ipv4(POD_A.octets(), POD_B.octets(), 64)
            .udp(5001, 6000)
            .write(&mut other, b"payload!")
            .unwrap();
        let ports: std::collections::HashSet<u16> = (5000..5064u16)
            .map(|sp| {
                let mut p = Vec::new();
                etherparse::PacketBuilder::ipv4(POD_A.octets(), POD_B.octets(), 64)
                    .udp(sp, 6000)
                    .write(&mut p, b"x")
                    .unwrap();
                port(&p)
            })
            .collect();
        assert!(
            ports.len() > 48,
            "64 flows should spread over source ports, got {}",
            ports.len()
        );
        let mut ecn = udp_packet(POD_A, POD_B, 64);
        ecn[1] = 0xb9; // DSCP EF + ECT(1): only the ECN bits go outside
        ecn[10..12].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&ecn[..20]);
        ecn[10..12].copy_from_slice(&c.to_be_bytes());
        let out = run_with(&t, Direction::FromTun, &ecn, NODE_A).1;
        assert_eq!(out[1], 0x01);
    }

    #[test]
    fn test_vxlan_ignores_leases_of_other_backends() {
        let (v, out) = run_with(
            &vxlan_tables(),
            Direction::FromTun,
            &udp_packet(POD_A, Ipv4Addr::new(10, 244, 3, 3), 64),
            NODE_A,
        );
        assert_eq!(v, Verdict::IcmpToTun);
        assert_eq!(out[20], icmpv4::kind::DEST_UNREACHABLE);
    }

    #[test]
    fn test_vxlan_decap_strips_and_keeps_ttl() {
        let inner = udp_packet(POD_B, POD_A, 63);
        let (v, out) = run_with(
            &vxlan_tables(),
            Direction::FromUnderlay,
            &vxlan_payload(0x08, 1, MAC_A, MAC_B, 0x0800, &inner),
            NODE_B,
        );
        assert_eq!(v, Verdict::ToTun);
        assert_eq!(out, inner);
    }

    #[test]
    fn test_partial_checksum_is_completed_and_good_ones_are_kept() {
        for mut pkt in [udp_packet(POD_B, POD_A, 63), {
            let mut t = Vec::new();
            etherparse::PacketBuilder::ipv4(POD_B.octets(), POD_A.octets(), 63)
                .tcp(80, 40000, 7, 1000)
                .syn()
                .ack(1)
                .write(&mut t, b"data")
                .unwrap();
            t
        }] {
            let good = pkt.clone();
            assert!(
                !complete_partial_checksum(&mut pkt),
                "a correct checksum is left alone"
            );
            assert_eq!(pkt, good);
            // What the kernel leaves for offload: the pseudo-header sum, not complemented.
            let proto = pkt[9];
            let off = 20 + if proto == 6 { 16 } else { 6 };
            let pseudo = checksum::fold(checksum::pseudo_header_v4(
                POD_B,
                POD_A,
                proto,
                (pkt.len() - 20) as u16,
            ));
            pkt[off..off + 2].copy_from_slice(&pseudo.to_be_bytes());
            let (v, out) = run_with(
                &vxlan_tables(),
                Direction::FromUnderlay,
                &vxlan_payload(0x08, 1, MAC_A, MAC_B, 0x0800, &pkt),
                NODE_B,
            );
            assert_eq!(v, Verdict::ToTun);
            assert_eq!(out, good, "completed to the real checksum");
        }
    }

    #[test]
    fn test_vxlan_decap_rejects() {
        let t = vxlan_tables();
        let inner = udp_packet(POD_B, POD_A, 63);
        let cases: Vec<(Vec<u8>, Ipv4Addr, DropReason)> = vec![
            (
                vxlan_payload(0x08, 1, MAC_A, MAC_B, 0x0800, &inner),
                Ipv4Addr::new(192, 168, 100, 66),
                DropReason::UnknownPeer,
            ),
            (
                vxlan_payload(0x00, 1, MAC_A, MAC_B, 0x0800, &inner),
                NODE_B,
                DropReason::BadVxlanHeader,
            ),
            (
                vxlan_payload(0x88, 1, MAC_A, MAC_B, 0x0800, &inner),
                NODE_B,
                DropReason::BadVxlanHeader,
            ),
            (
                {
                    let mut p = vxlan_payload(0x08, 1, MAC_A, MAC_B, 0x0800, &inner);
                    p[7] = 1;
                    p
                },
                NODE_B,
                DropReason::BadVxlanHeader,
            ),
            (
                vxlan_payload(0x08, 2, MAC_A, MAC_B, 0x0800, &inner),
                NODE_B,
                DropReason::WrongVni,
            ),
            (
                vxlan_payload(0x08, 1, MAC_B, MAC_B, 0x0800, &inner),
                NODE_B,
                DropReason::WrongDstMac,
            ),
            (
                vxlan_payload(0x08, 1, MacAddr::BROADCAST, MAC_B, 0x0806, &[0; 28]),
                NODE_B,
                DropReason::WrongDstMac,
            ),
            (
                vxlan_payload(0x08, 1, MAC_A, MAC_A, 0x0800, &inner),
                NODE_B,
                DropReason::LoopToSelf,
            ),
            (
                vxlan_payload(0x08, 1, MAC_A, MAC_B, 0x86dd, &inner),
                NODE_B,
                DropReason::NotIpv4,
            ),
            (
                vxlan_payload(
                    0x08,
                    1,
                    MAC_A,
                    MAC_B,
                    0x0800,
                    &udp_packet(Ipv4Addr::new(10, 244, 1, 7), POD_A, 63),
                ),
                NODE_B,
                DropReason::SpoofedSource,
            ),
            (
                vxlan_payload(
                    0x08,
                    1,
                    MAC_A,
                    MAC_B,
                    0x0800,
                    &udp_packet(POD_B, Ipv4Addr::new(10, 244, 2, 7), 63),
                ),
                NODE_B,
                DropReason::NotForThisNode,
            ),
            (
                vxlan_payload(0x08, 1, MAC_A, MAC_B, 0x0800, &inner[..15]),
                NODE_B,
                DropReason::Truncated,
            ),
            (vec![0x08, 0, 0, 0, 0, 0, 1], NODE_B, DropReason::Truncated),
            (
                vxlan_payload(0x08, 1, MAC_A, MAC_B, 0x0800, &[])[..20].to_vec(),
                NODE_B,
                DropReason::Truncated,
            ),
        ];
        for (payload, sender, want) in cases {
            let (v, _) = run_with(&t, Direction::FromUnderlay, &payload, sender);
            assert_eq!(v, Verdict::Drop(want), "{payload:02x?}");
        }
    }

    fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), ttl)
            .udp(5000, 6000)
            .write(&mut out, b"payload!")
            .unwrap();
        out
    }

    fn run(dir: Direction, pkt: &[u8], peer: Ipv4Addr) -> (Verdict, Vec<u8>) {
        let mut b = Batch::new(1, 2048);
        b.rx_slot(0)[..pkt.len()].copy_from_slice(pkt);
        b.commit_rx(0, pkt.len(), SocketAddrV4::new(peer, 8285), false);
        process(&tables(), dir, &mut b);
        (b.meta(0).verdict, b.packet(0).to_vec())
    }

    #[test]
    fn test_encap_to_lease_owner_with_ttl_decremented() {
        let (v, out) = run(Direction::FromTun, &udp_packet(POD_A, POD_B, 64), NODE_A);
        assert_eq!(v, Verdict::ToUnderlay(SocketAddrV4::new(NODE_B, 8285)));
        assert_eq!(out, udp_packet(POD_A, POD_B, 63));
    }

    #[test]
    fn test_decap_into_tun() {
        let (v, out) = run(
            Direction::FromUnderlay,
            &udp_packet(POD_B, POD_A, 63),
            NODE_B,
        );
        assert_eq!(v, Verdict::ToTun);
        assert_eq!(out, udp_packet(POD_B, POD_A, 62));
    }

    #[test]
    fn test_ttl_expiry_both_ways() {
        for ttl in [0, 1] {
            let (v, _) = run(Direction::FromTun, &udp_packet(POD_A, POD_B, ttl), NODE_A);
            assert_eq!(v, Verdict::Drop(DropReason::TtlExpired));
            let (v, _) = run(
                Direction::FromUnderlay,
                &udp_packet(POD_B, POD_A, ttl),
                NODE_B,
            );
            assert_eq!(v, Verdict::Drop(DropReason::TtlExpired));
        }
    }

    #[test]
    fn test_no_lease_gets_icmp_net_unreachable() {
        let orig = udp_packet(POD_A, Ipv4Addr::new(10, 244, 9, 9), 64);
        let (v, out) = run(Direction::FromTun, &orig, NODE_A);
        assert_eq!(v, Verdict::IcmpToTun);
        let ip = ipv4::Packet::new_checked(&out[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(
            (ip.src(), ip.dst(), ip.ttl()),
            (Ipv4Addr::new(10, 244, 1, 0), POD_A, 64)
        );
        let icmp = icmpv4::Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!((icmp.kind(), icmp.code()), (3, 0));
        assert_eq!(icmp.data(), &orig[..28]);
        assert_eq!(checksum::sum(ip.payload()), 0xffff);
    }

    /// A pod packet in a batch of one, decided by a worker holding `state` at `now`.
    fn run_in_worker(
        t: &Tables,
        state: &mut WorkerState,
        pkt: &[u8],
        now: u64,
    ) -> (Verdict, Vec<u8>) {
        let mut b = Batch::new(1, 2048);
        b.rx_slot(0)[..pkt.len()].copy_from_slice(pkt);
        b.commit_rx(0, pkt.len(), SocketAddrV4::new(NODE_A, 0), false);
        process_in_worker(t, None, state, now, Direction::FromTun, &mut b);
        (b.meta(0).verdict, b.packet(0).to_vec())
    }

    fn udp_packet_sized(src: Ipv4Addr, dst: Ipv4Addr, ip_len: usize, df: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let ip = etherparse::Ipv4Header {
            time_to_live: 64,
            source: src.octets(),
            destination: dst.octets(),
            dont_fragment: df,
            ..Default::default()
        };
        etherparse::PacketBuilder::ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
            .udp(5000, 6000)
            .write(&mut out, &vec![7u8; ip_len - 28])
            .unwrap();
        out
    }

    /// After the kernel lowered the path MTU to node B, a DF packet that no longer fits once
    /// encapsulated is answered with "fragmentation needed" carrying the tunnel's MTU, in both
    /// encapsulations; one that fits, or has no DF, goes on; the learned MTU expires.
    #[test]
    fn test_lowered_path_mtu_answers_frag_needed_for_df_packets() {
        for (t, overhead) in [(tables(), 28usize), (vxlan_tables(), VXLAN_OVERHEAD)] {
            let mut st = WorkerState::default();
            st.path_mtus.learn(NODE_B, 1400, 0);
            let tunnel_mtu = 1400 - overhead;
            let big = udp_packet_sized(POD_A, POD_B, tunnel_mtu + 1, true);
            let (v, out) = run_in_worker(&t, &mut st, &big, 5);
            assert_eq!(v, Verdict::IcmpToTun, "overhead {overhead}");
            let ip = ipv4::Packet::new_checked(&out[..]).unwrap();
            assert_eq!((ip.src(), ip.dst()), (Ipv4Addr::new(10, 244, 1, 0), POD_A));
            let icmp = icmpv4::Packet::new_checked(ip.payload()).unwrap();
            assert!(icmp.verify_checksum());
            assert_eq!((icmp.kind(), icmp.code()), (3, 4));
            assert_eq!(&ip.payload()[6..8], &(tunnel_mtu as u16).to_be_bytes());
            // The quote is the header as forwarded (flannel's udp has decremented the TTL, as
            // the kernel's forwarding does before a tunnel refuses the packet).
            let quote = icmp.data();
            assert_eq!(&quote[..8], &big[..8], "quotes the pod's header");
            assert_eq!(&quote[12..28], &big[12..28], "quotes the pod's header");
            let fits = udp_packet_sized(POD_A, POD_B, tunnel_mtu, true);
            assert!(!matches!(
                run_in_worker(&t, &mut st, &fits, 5).0,
                Verdict::IcmpToTun
            ));
            let no_df = udp_packet_sized(POD_A, POD_B, tunnel_mtu + 1, false);
            assert!(!matches!(
                run_in_worker(&t, &mut st, &no_df, 5).0,
                Verdict::IcmpToTun
            ));
            let later = worker_state::PATH_MTU_EXPIRES_MS;
            assert!(!matches!(
                run_in_worker(&t, &mut st, &big, later).0,
                Verdict::IcmpToTun
            ));
        }
    }

    /// Generated net-unreachables to one pod are limited as the kernel limits them: a burst of
    /// six, then one a second; the rest are counted drops.
    #[test]
    fn test_generated_icmp_errors_are_rate_limited() {
        let t = tables();
        let mut st = WorkerState::default();
        let nowhere = udp_packet(POD_A, Ipv4Addr::new(10, 244, 9, 9), 64);
        let verdicts: Vec<Verdict> = (0..10)
            .map(|_| run_in_worker(&t, &mut st, &nowhere, 1000).0)
            .collect();
        assert_eq!(
            verdicts
                .iter()
                .filter(|v| **v == Verdict::IcmpToTun)
                .count(),
            6
        );
        assert_eq!(
            verdicts[9],
            Verdict::Drop(DropReason::IcmpRateLimited),
            "{verdicts:?}"
        );
        assert_eq!(
            run_in_worker(&t, &mut st, &nowhere, 2000).0,
            Verdict::IcmpToTun
        );
    }

    #[test]
    fn test_no_icmp_about_icmp_errors_or_fragments() {
        let far = Ipv4Addr::new(10, 244, 9, 9);
        let mut err = Vec::new();
        etherparse::PacketBuilder::ipv4(POD_A.octets(), far.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
                etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
            ))
            .write(&mut err, &[0u8; 28])
            .unwrap();
        assert_eq!(
            run(Direction::FromTun, &err, NODE_A).0,
            Verdict::Drop(DropReason::NoRoute)
        );
        let mut frag = udp_packet(POD_A, far, 64);
        frag[7] = 0x10;
        let c = {
            frag[10] = 0;
            frag[11] = 0;
            checksum::checksum(&frag[..20])
        };
        frag[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            run(Direction::FromTun, &frag, NODE_A).0,
            Verdict::Drop(DropReason::NoRoute)
        );
        let mut echo = Vec::new();
        etherparse::PacketBuilder::ipv4(POD_A.octets(), far.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, b"x")
            .unwrap();
        assert_eq!(run(Direction::FromTun, &echo, NODE_A).0, Verdict::IcmpToTun);
    }

    #[test]
    fn test_own_subnet_from_tun_is_a_loop() {
        let (v, _) = run(
            Direction::FromTun,
            &udp_packet(POD_A, Ipv4Addr::new(10, 244, 1, 9), 64),
            NODE_A,
        );
        assert_eq!(v, Verdict::Drop(DropReason::LoopToSelf));
    }

    #[test]
    fn test_tun_holds_pods_to_the_lease() {
        // A pod posing as a pod of node B, or as anyone outside the cluster: dropped, in both
        // encapsulations, before anything is sent.
        for t in [tables(), vxlan_tables()] {
            for src in [
                Ipv4Addr::new(10, 244, 2, 9),
                Ipv4Addr::new(8, 8, 8, 8),
                Ipv4Addr::new(10, 244, 255, 1),
                NODE_B,
                Ipv4Addr::UNSPECIFIED,
            ] {
                let (v, _) = run_with(&t, Direction::FromTun, &udp_packet(src, POD_B, 64), NODE_A);
                assert_eq!(v, Verdict::Drop(DropReason::SpoofedSource), "source {src}");
            }
            // The lease (pods, and the TUN's own .0, which the host's traffic into the TUN
            // leaves from) and the node's underlay address (a host process bound to it) pass.
            for src in [POD_A, t.local.tun_addr, NODE_A] {
                let (v, _) = run_with(&t, Direction::FromTun, &udp_packet(src, POD_B, 64), NODE_A);
                assert!(
                    matches!(v, Verdict::ToUnderlay(_) | Verdict::ToUnderlayIp(_)),
                    "source {src}: {v:?}"
                );
            }
        }
    }

    #[test]
    fn test_a_pod_port_holds_its_pod_to_its_own_address() {
        let t = tables();
        let from_port = |src: Ipv4Addr| {
            let pkt = udp_packet(src, POD_B, 64);
            let mut b = Batch::new(1, 2048);
            b.rx_slot(0)[..pkt.len()].copy_from_slice(&pkt);
            b.commit_rx(0, pkt.len(), SocketAddrV4::new(NODE_A, 0), false);
            b.slot_mut(0).1.bound_src = Some(POD_A);
            process(&t, Direction::FromTun, &mut b);
            b.meta(0).verdict
        };
        assert_eq!(
            from_port(POD_A),
            Verdict::ToUnderlay(SocketAddrV4::new(NODE_B, 8285))
        );
        // A neighbour's address (in the lease), the TUN's and the node's own: not the pod's.
        for src in [
            Ipv4Addr::new(10, 244, 1, 5),
            Ipv4Addr::new(10, 244, 1, 0),
            NODE_A,
        ] {
            assert_eq!(
                from_port(src),
                Verdict::Drop(DropReason::SpoofedSource),
                "source {src}"
            );
        }
    }

    #[test]
    fn test_underlay_rejects() {
        let good = udp_packet(POD_B, POD_A, 64);
        let stranger = Ipv4Addr::new(192, 168, 100, 66);
        assert_eq!(
            run(Direction::FromUnderlay, &good, stranger).0,
            Verdict::Drop(DropReason::UnknownPeer)
        );
        // Node B claiming a source in node A's lease.
        let spoofed = udp_packet(Ipv4Addr::new(10, 244, 1, 7), POD_A, 64);
        assert_eq!(
            run(Direction::FromUnderlay, &spoofed, NODE_B).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
        let outside = udp_packet(Ipv4Addr::new(8, 8, 8, 8), POD_A, 64);
        assert_eq!(
            run(Direction::FromUnderlay, &outside, NODE_B).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
        let elsewhere = udp_packet(POD_B, Ipv4Addr::new(10, 244, 2, 9), 64);
        assert_eq!(
            run(Direction::FromUnderlay, &elsewhere, NODE_B).0,
            Verdict::Drop(DropReason::NotForThisNode)
        );
        let mut bad_sum = good.clone();
        bad_sum[10] ^= 0xff;
        assert_eq!(
            run(Direction::FromUnderlay, &bad_sum, NODE_B).0,
            Verdict::Drop(DropReason::BadChecksum)
        );
    }

    #[test]
    fn test_malformed_input_is_counted_not_fatal() {
        let good = udp_packet(POD_A, POD_B, 64);
        let cases: Vec<(Vec<u8>, DropReason)> = vec![
            (vec![], DropReason::Truncated),
            (good[..10].to_vec(), DropReason::Truncated),
            (good[..good.len() - 1].to_vec(), DropReason::Truncated),
            (
                {
                    let mut b = good.clone();
                    b[0] = 0x44;
                    b
                },
                DropReason::BadIpHeader,
            ),
            (
                {
                    let mut b = good.clone();
                    b[2] = 0;
                    b[3] = 10;
                    b
                },
                DropReason::BadIpHeader,
            ),
            (
                {
                    let mut b = good.clone();
                    b[0] = 0x60;
                    b
                },
                DropReason::NotIpv4,
            ),
            (vec![0xff; 64], DropReason::NotIpv4),
        ];
        for (pkt, want) in cases {
            assert_eq!(
                run(Direction::FromTun, &pkt, NODE_A).0,
                Verdict::Drop(want),
                "{pkt:02x?}"
            );
            assert_eq!(
                run(Direction::FromUnderlay, &pkt, NODE_B).0,
                Verdict::Drop(want),
                "{pkt:02x?}"
            );
        }
    }

    #[test]
    fn test_trailing_bytes_are_trimmed() {
        let mut padded = udp_packet(POD_A, POD_B, 64);
        let len = padded.len();
        padded.extend_from_slice(&[0u8; 6]);
        let (v, out) = run(Direction::FromTun, &padded, NODE_A);
        assert!(matches!(v, Verdict::ToUnderlay(_)));
        assert_eq!(out.len(), len);
    }

    #[test]
    fn test_oversized_is_dropped() {
        let pkt = udp_packet(POD_B, POD_A, 64);
        let mut b = Batch::new(1, 2048);
        b.rx_slot(0)[..pkt.len()].copy_from_slice(&pkt);
        b.commit_rx(0, pkt.len(), SocketAddrV4::new(NODE_B, 8285), true);
        process(&tables(), Direction::FromUnderlay, &mut b);
        assert_eq!(b.meta(0).verdict, Verdict::Drop(DropReason::Oversized));
    }

    #[test]
    fn test_drop_reason_names_round_trip() {
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_name(r.as_str()), Some(r));
        }
    }
}
