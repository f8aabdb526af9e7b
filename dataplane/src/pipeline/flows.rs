//! The stateful step of the pipeline: every packet through connection tracking, the first
//! packet of a connection to a ClusterIP through service selection, and every packet of a
//! translated connection rewritten (ICMP errors through the connection they quote).

use super::Tables;
use crate::conntrack::{
    self, tcp::Segment, CtError, Dir, NatPlan, Tuple, L4, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};
use crate::nat::{rewrite, Affinity, External, NoBackend};
use crate::verdict::DropReason;
use crate::wire::{icmpv4, ipv4, tcp};
use core::net::Ipv4Addr;

/// Connection state shared by all workers: the connection table and the services' client
/// affinity.
pub struct Flows {
    pub conntrack: conntrack::Conntrack,
    pub affinity: Affinity,
    /// The origin of the workers' millisecond clock.
    pub epoch: std::time::Instant,
}

impl core::fmt::Debug for Flows {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Flows")
            .field("conntrack", &self.conntrack.counters())
            .finish_non_exhaustive()
    }
}

impl Flows {
    pub fn new(config: conntrack::Config) -> Flows {
        Flows {
            conntrack: conntrack::Conntrack::new(config),
            affinity: Affinity::default(),
            epoch: std::time::Instant::now(),
        }
    }

    /// Milliseconds since `epoch`: the time the workers track with.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// What tracking did to a packet that may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Tracked (or untracked as netfilter would), bytes unchanged.
    Unchanged,
    /// NAT rewrote the packet: its destination may now be local.
    Translated,
}

/// Why tracking stopped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Drop(DropReason),
    /// A connection to a service that cannot be served: answer with ICMP port unreachable,
    /// as kube-proxy's REJECT rule does.
    Reject,
    /// A pod's segment of a TCP connection whose service endpoint left: answer with the RST
    /// that ends the connection at the client.
    Reset,
    /// The backend's segment of a TCP connection whose service endpoint left, towards its
    /// client: replaced by the RST that ends the connection there, from the address the client
    /// knows (the segment's translation, this tuple), so that a client whose handshake or
    /// request was in flight when the endpoint left fails at once instead of waiting out its
    /// timeout.
    ResetClient(Tuple),
}

/// Where a tracked packet came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// From the TUN: the node's pods (and host).
    Pods,
    /// From the underlay, decapsulated: another node's pods.
    Underlay,
    /// From the wire, to the node's own address (`--io xdp`).
    Wire,
}

/// The tuple and L4 facts of an IPv4 packet whose header was checked, or what to do instead.
enum Parsed {
    Flow(Tuple, L4),
    IcmpError,
    /// Not trackable (a non-first fragment): passes as netfilter without defragmentation would.
    Untracked,
}

fn parse(pkt: &[u8]) -> Result<Parsed, DropReason> {
    let p = ipv4::Packet::new_unchecked(pkt);
    if p.is_non_first_fragment() {
        return Ok(Parsed::Untracked);
    }
    let l4 = p.payload();
    let (src, dst) = (p.src(), p.dst());
    let proto = u8::from(p.protocol());
    Ok(match proto {
        PROTO_TCP => {
            let t = tcp::Packet::new_checked(l4).map_err(|_| DropReason::Truncated)?;
            let seg = Segment {
                flags: t.flags(),
                seq: t.seq(),
                ack: t.ack(),
                window: t.window(),
                len: (l4.len() - t.header_len()) as u32,
                wscale: window_scale(&l4[tcp::HEADER_LEN..t.header_len()]),
            };
            Parsed::Flow(
                Tuple::new(src, t.src_port(), dst, t.dst_port(), PROTO_TCP),
                L4::Tcp(seg),
            )
        }
        PROTO_UDP => {
            if l4.len() < 8 {
                return Err(DropReason::Truncated);
            }
            let sport = u16::from_be_bytes([l4[0], l4[1]]);
            let dport = u16::from_be_bytes([l4[2], l4[3]]);
            Parsed::Flow(Tuple::new(src, sport, dst, dport, PROTO_UDP), L4::Udp)
        }
        PROTO_ICMP => {
            let i = icmpv4::Packet::new_checked(l4).map_err(|_| DropReason::Truncated)?;
            if icmpv4::is_error(i.kind()) {
                Parsed::IcmpError
            } else {
                let ty = u16::from(i.kind()) << 8 | u16::from(i.code());
                Parsed::Flow(
                    Tuple::new(src, i.echo_ident(), dst, ty, PROTO_ICMP),
                    L4::IcmpQuery,
                )
            }
        }
        _ => Parsed::Flow(Tuple::new(src, 0, dst, 0, proto), L4::Other),
    })
}

/// The window scale option of a TCP header's options, if present.
fn window_scale(mut opts: &[u8]) -> Option<u8> {
    while let Some(&kind) = opts.first() {
        match kind {
            0 => return None,
            1 => opts = &opts[1..],
            _ => {
                let len = usize::from(*opts.get(1)?);
                if len < 2 || len > opts.len() {
                    return None;
                }
                if kind == 3 && len == 3 {
                    return Some(opts[2]);
                }
                opts = &opts[len..];
            }
        }
    }
    None
}

/// A run of packets of one steady connection (plain ACK segments of an established TCP
/// connection, datagrams of an assured UDP flow), consecutive in a batch (a segmented
/// superframe, a burst): the first went through conntrack, the rest are credited to it at once
/// when the run ends.
#[derive(Debug, Clone, Copy)]
struct Run {
    tuple: Tuple,
    to: Tuple,
    service: Option<conntrack::ServiceBinding>,
    /// Segments after the first, their bytes, and the latest of them.
    packets: u64,
    bytes: u64,
    last: Option<Segment>,
}

/// Tracking for one batch: the shared state, the batch's time, and the current run.
pub struct Tracker<'a> {
    flows: &'a Flows,
    now: u64,
    run: Option<Run>,
}

impl<'a> Tracker<'a> {
    pub fn new(flows: &'a Flows, now: u64) -> Tracker<'a> {
        Tracker {
            flows,
            now,
            run: None,
        }
    }

    /// Credits the current run, if any; call at the end of the batch.
    pub fn finish(&mut self) {
        if let Some(run) = self.run.take().filter(|r| r.packets > 0) {
            let ct = &self.flows.conntrack;
            ct.credit(
                &run.tuple,
                run.packets,
                run.bytes,
                run.last.as_ref(),
                self.now,
            );
        }
    }

    /// Tracks and translates one packet (see [`track`]).
    pub fn track(&mut self, t: &Tables, pkt: &mut [u8], from: Ingress) -> Result<Outcome, Stop> {
        track(t, self, pkt, from)
    }
}

/// Whether a packet may continue a run: a UDP datagram, or a plain ACK segment (no SYN, FIN or
/// RST, a valid flag set), which in ESTABLISHED changes nothing but counters and window.
fn runs_on(l4: &L4) -> bool {
    use conntrack::tcp::flag::{ACK, FIN, RST, SYN};
    match l4 {
        L4::Udp => true,
        L4::Tcp(seg) => {
            seg.flags & (SYN | FIN | RST) == 0
                && seg.flags & ACK != 0
                && conntrack::tcp::valid_flags(seg.flags)
        }
        _ => false,
    }
}

/// Tracks the IPv4 packet `pkt` (header checked, `len` its total length) that came in `from`,
/// and translates it.
fn track(t: &Tables, tr: &mut Tracker, pkt: &mut [u8], from: Ingress) -> Result<Outcome, Stop> {
    let (flows, now) = (tr.flows, tr.now);
    let (tuple, l4) = match parse(pkt).map_err(Stop::Drop)? {
        Parsed::Flow(tuple, l4) => (tuple, l4),
        Parsed::IcmpError => return Ok(related_icmp_error(flows, now, pkt)),
        Parsed::Untracked => {
            let dst = ipv4::Packet::new_unchecked(&pkt[..]).dst();
            if t.services.is_frontend(dst) {
                // A service's connection is DNATed by its first fragment's ports, which later
                // fragments do not carry: they cannot be translated.
                return Err(Stop::Drop(DropReason::Fragmented));
            }
            return Ok(Outcome::Unchanged);
        }
    };
    let to_service = from == Ingress::Pods && t.services.is_frontend(tuple.dst);
    if to_service && ipv4::Packet::new_unchecked(&pkt[..]).more_frags() {
        return Err(Stop::Drop(DropReason::Fragmented));
    }
    // The next packet of the current run: no lookup, no lock. A run whose endpoint left goes
    // the long way, which knows the packet's direction.
    if let Some(run) = tr.run.as_mut().filter(|r| {
        r.tuple == tuple && runs_on(&l4) && r.service.is_none_or(|b| t.services.binding_alive(&b))
    }) {
        run.packets += 1;
        run.bytes += pkt.len() as u64;
        if let L4::Tcp(seg) = l4 {
            run.last = Some(seg);
        }
        let to = run.to;
        return Ok(translate(pkt, &tuple, &to));
    }
    tr.finish();
    if from == Ingress::Pods && !to_service && masquerade_forbidden(t, &tuple) {
        return Err(Stop::Drop(DropReason::MartianDestination));
    }
    let mut tracked = track_new(t, tr, &tuple, &l4, pkt.len(), from)?;
    if let Some(binding) = tracked.service {
        if tracked.retired || !t.services.binding_alive(&binding) {
            if tracked.dir != Dir::Original || !replans(&tuple, &l4, from) {
                let gone = Gone {
                    dir: tracked.dir,
                    from,
                    to: tracked.to,
                };
                return Err(endpoint_gone(flows, &tuple, &l4, gone, now));
            }
            flows.conntrack.remove(&tuple);
            tracked = track_new(t, tr, &tuple, &l4, pkt.len(), from)?;
        }
    } else if to_service && tracked.dir == Dir::Original {
        // A connection tracked before its ClusterIP became a service: not ours to guess.
        return Err(Stop::Reject);
    }
    if tracked.steady && runs_on(&l4) {
        tr.run = Some(Run {
            tuple,
            to: tracked.to,
            service: tracked.service,
            packets: 0,
            bytes: 0,
            last: None,
        });
    }
    Ok(translate(pkt, &tuple, &tracked.to))
}

/// Whether a packet in the original direction of a service connection that lost its endpoint
/// starts that flow anew rather than being dropped: a UDP datagram from the client (kube-proxy
/// clears such UDP conntrack entries, so the client's next datagram reaches a live endpoint),
/// or a TCP SYN from the client (a connection not yet answered, or the tuple reused by a new
/// one: either way nothing at the new backend holds it). A TCP connection past its SYN cannot
/// move: [`endpoint_gone`].
fn replans(tuple: &Tuple, l4: &L4, from: Ingress) -> bool {
    let opens = match l4 {
        L4::Udp => true,
        L4::Tcp(seg) => conntrack::tcp::FlagClass::of(seg.flags) == conntrack::tcp::FlagClass::Syn,
        _ => false,
    };
    matches!(tuple.proto, PROTO_UDP | PROTO_TCP) && opens && from != Ingress::Underlay
}

/// Looks `tuple` up in conntrack, creating its entry (with its NAT plan) if it is new.
fn track_new(
    t: &Tables,
    tr: &Tracker,
    tuple: &Tuple,
    l4: &L4,
    len: usize,
    from: Ingress,
) -> Result<conntrack::Tracked, Stop> {
    let (flows, now) = (tr.flows, tr.now);
    let to_service = from == Ingress::Pods && t.services.is_frontend(tuple.dst);
    let mut refusal = None;
    let outside = External {
        cluster_ip: t.local.tun_addr,
        // With podwire's masquerade on the wire, policy routing steers the pods' answers to
        // outside into podwire (`masq::steer_pods`).
        clients_kept: t.wire.is_some_and(|w| w.masquerade),
        network: t.map.network(),
    };
    let r = flows.conntrack.track(tuple, l4, len, now, |orig| {
        if to_service {
            let (local, network) = (t.local.subnet, t.map.network());
            return t
                .services
                .plan_frontend(orig, local, network, outside, &flows.affinity, now)
                .map_err(|e| refusal = Some(e));
        }
        match from {
            Ingress::Wire => t
                .services
                .plan_node_port(orig, t.local.subnet, outside, &flows.affinity, now)
                .map_err(|e| refusal = Some(e)),
            Ingress::Pods => Ok(masquerade(t, orig).unwrap_or_default()),
            Ingress::Underlay => Ok(Default::default()),
        }
    });
    match r {
        Ok(tracked) => Ok(tracked),
        Err(CtError::Invalid) => Err(Stop::Drop(DropReason::CtInvalid)),
        Err(CtError::TableFull) => Err(Stop::Drop(DropReason::CtTableFull)),
        Err(CtError::NoPort) => Err(Stop::Drop(DropReason::SnatPortsExhausted)),
        Err(CtError::Refused) => match (refusal, from) {
            // From the wire, only a NodePort without endpoints is refused; anything else to the
            // node's owned ports is no connection of ours.
            (Some(NoBackend::NoService), Ingress::Wire) => {
                Err(Stop::Drop(DropReason::NotForThisNode))
            }
            (Some(NoBackend::NoEndpoints | NoBackend::NoService), _) => Err(Stop::Reject),
            (Some(NoBackend::NoLocalEndpoints), _) => Err(Stop::Drop(DropReason::NoLocalEndpoints)),
            (None, _) => Err(Stop::Drop(DropReason::CtInvalid)),
        },
    }
}

/// Whether `orig` would be masqueraded (TCP or UDP from the cluster network to outside it and
/// the service range) but to a destination that no masquerade may reach: the node's own
/// addresses (a pod's packet would come back to the host as from the node itself), loopback,
/// link-local, "this network", multicast or broadcast. Those are dropped
/// (`martian_destination`), not left to the kernel: the kernel never routes such a packet
/// into the TUN (its local table comes before the steering rules; martians are not routed),
/// so only a pod's port, past the host's stack, can bring one.
fn masquerade_forbidden(t: &Tables, orig: &Tuple) -> bool {
    if !t.wire.is_some_and(|w| w.masquerade) || !masquerade_candidate(t, orig) {
        return false;
    }
    let d = orig.dst;
    let o = d.octets();
    d == t.local.public_ip
        || d == t.local.tun_addr
        || o[0] == 0
        || d.is_loopback()
        || d.is_link_local()
        || d.is_multicast()
        || d.is_broadcast()
}

/// TCP or UDP from the cluster network to outside it and the service range.
fn masquerade_candidate(t: &Tables, orig: &Tuple) -> bool {
    let network = t.map.network();
    matches!(orig.proto, PROTO_TCP | PROTO_UDP)
        && network.contains(orig.src)
        && !network.contains(orig.dst)
        && !t.services.is_frontend(orig.dst)
}

/// flannel's "pod to outside" masquerade, done here when podwire owns the node's address
/// (`--io xdp`): TCP and UDP from the cluster network to anywhere outside it leave from the
/// node's address, with a port of the masquerade range ([`masquerade_forbidden`] destinations
/// never get here).
fn masquerade(t: &Tables, orig: &Tuple) -> Option<NatPlan> {
    let wire = t.wire.filter(|w| w.masquerade)?;
    let eligible = masquerade_candidate(t, orig) && !orig.dst.is_multicast();
    eligible.then_some(NatPlan {
        dnat: None,
        snat: Some(t.local.public_ip),
        snat_ports: Some(wire.masq_ports),
        service: None,
    })
}

/// A packet of a connection whose backend left its service, dropped rather than black-holed.
/// A UDP flow is forgotten (its client's next datagram starts over). A TCP connection is
/// retired, not forgotten: both ends may still hold it, so its packets keep being dropped
/// (a mid-stream segment must not be picked up as a new connection to another backend) and
/// its tuples stay taken (a new connection from the same client port that lands on the old
/// backend is remapped instead of meeting the stale connection there).
/// Either end's segment towards a pod client (its own, or the old backend's answer past the
/// handshake from the tunnel) becomes the RST that ends the connection at the client, so that
/// the client fails at once rather than retransmitting, or waiting for an answer, until it
/// gives up.
fn endpoint_gone(flows: &Flows, tuple: &Tuple, l4: &L4, gone: Gone, now: u64) -> Stop {
    use conntrack::tcp::flag::{ACK, RST, SYN};
    let L4::Tcp(seg) = l4 else {
        flows.conntrack.remove(tuple);
        return Stop::Drop(DropReason::EndpointGone);
    };
    flows.conntrack.retire(tuple, now);
    let answerable = seg.flags & ACK != 0 && seg.flags & RST == 0;
    // A SYN-ACK is dropped, not turned into a reset: the client's SYN, retransmitted, is then
    // planned anew onto a live endpoint ([`replans`]) and its connect() succeeds a second
    // later, where a reset would fail it with "connection refused".
    let handshake = seg.flags & SYN != 0;
    match (gone.dir, gone.from) {
        (Dir::Original, Ingress::Pods) if answerable => Stop::Reset,
        (Dir::Reply, Ingress::Underlay) if answerable && !handshake => Stop::ResetClient(gone.to),
        _ => Stop::Drop(DropReason::EndpointGone),
    }
}

/// Which way a packet of a connection that lost its endpoint went, and where its translation
/// would have taken it.
#[derive(Debug, Clone, Copy)]
struct Gone {
    dir: Dir,
    from: Ingress,
    to: Tuple,
}

/// Rewrites `pkt` from tuple `from` to `to`, if they differ.
fn translate(pkt: &mut [u8], from: &Tuple, to: &Tuple) -> Outcome {
    if from == to {
        return Outcome::Unchanged;
    }
    rewrite::apply(pkt, from, to);
    Outcome::Translated
}

/// An ICMP error is RELATED to the connection of the packet it quotes; a translated connection
/// gets the error translated inside (the quoted packet) and out. Errors quoting no known
/// connection, or too little of one, pass untouched (netfilter's "untracked").
fn related_icmp_error(flows: &Flows, now: u64, pkt: &mut [u8]) -> Outcome {
    let (outer_src, outer_dst, quoted) = {
        let p = ipv4::Packet::new_unchecked(&pkt[..]);
        let q = &p.payload()[icmpv4::HEADER_LEN..];
        let Ok(Parsed::Flow(it, _)) = parse_quoted(q) else {
            return Outcome::Unchanged;
        };
        (p.src(), p.dst(), it)
    };
    // netfilter: RELATED only if the error goes to the quoted packet's sender.
    if outer_dst != quoted.src {
        return Outcome::Unchanged;
    }
    let Some(inv) = quoted.invert() else {
        return Outcome::Unchanged;
    };
    let Some((this_dir, other_dir)) = flows.conntrack.find(&inv, now) else {
        return Outcome::Unchanged;
    };
    let Some(to) = other_dir.invert() else {
        return Outcome::Unchanged;
    };
    if to == this_dir {
        return Outcome::Unchanged;
    }
    let new_src: Ipv4Addr = if outer_src == this_dir.src {
        to.src
    } else {
        outer_src
    };
    rewrite::apply_icmp_error(pkt, new_src, to.dst, &quoted, &other_dir);
    Outcome::Translated
}

/// The tuple of a quoted packet: only its IPv4 header and the first 8 bytes of its payload are
/// guaranteed (RFC 792), so ports are read from those.
fn parse_quoted(q: &[u8]) -> Result<Parsed, DropReason> {
    if q.len() < ipv4::HEADER_LEN || q[0] >> 4 != 4 {
        return Err(DropReason::Truncated);
    }
    let inner = ipv4::Packet::new_unchecked(q);
    let ihl = inner.header_len();
    if ihl < ipv4::HEADER_LEN {
        return Err(DropReason::BadIpHeader);
    }
    let l4 = q.get(ihl..ihl + 8).ok_or(DropReason::Truncated)?;
    let (src, dst) = (inner.src(), inner.dst());
    let proto = u8::from(inner.protocol());
    let port = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    Ok(match proto {
        PROTO_TCP | PROTO_UDP => {
            Parsed::Flow(Tuple::new(src, port(0), dst, port(2), proto), L4::Other)
        }
        PROTO_ICMP => Parsed::Flow(
            Tuple::new(
                src,
                port(4),
                dst,
                u16::from(l4[0]) << 8 | u16::from(l4[1]),
                PROTO_ICMP,
            ),
            L4::Other,
        ),
        _ => Parsed::Flow(Tuple::new(src, 0, dst, 0, proto), L4::Other),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{process_with, Direction, Encap, LocalNode, Verdict};
    use super::*;
    use crate::batch::Batch;
    use crate::nat::{ServiceOptions, ServiceSpec, Services};
    use crate::route::{Backend, Node, SubnetMap};
    use core::net::SocketAddrV4;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use std::sync::Arc;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const LOCAL_EP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
    const REMOTE_EP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
    const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);

    fn tables(endpoints: &[SocketAddrV4]) -> Tables {
        let mut map = SubnetMap::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        for (subnet, ip) in [("10.244.1.0/24", NODE_A), ("10.244.2.0/24", NODE_B)] {
            map.insert(Node {
                subnet: subnet.parse().unwrap(),
                public_ip: ip,
                backend: Backend::Udp,
            })
            .unwrap();
        }
        let services = Services::build(
            ServiceOptions::new("10.96.0.0/12".parse().unwrap()),
            vec![
                ServiceSpec {
                    name: "default/web".into(),
                    cluster_ip: VIP,
                    port: 80,
                    proto: PROTO_TCP,
                    endpoints: endpoints.to_vec(),
                    affinity_timeout: None,
                    node_port: None,
                    ..Default::default()
                },
                ServiceSpec {
                    name: "default/empty".into(),
                    cluster_ip: VIP,
                    port: 81,
                    proto: PROTO_TCP,
                    endpoints: vec![],
                    affinity_timeout: None,
                    node_port: None,
                    ..Default::default()
                },
            ],
        )
        .unwrap();
        Tables {
            map,
            local: LocalNode {
                subnet: "10.244.1.0/24".parse().unwrap(),
                public_ip: NODE_A,
                tun_addr: Ipv4Addr::new(10, 244, 1, 0),
            },
            peer_port: 8285,
            encap: Encap::FlannelUdp,
            services: Arc::new(services),
            outer_udp_checksum: true,
            wire: None,
        }
    }

    fn tcp(src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16, syn: bool, ack: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).tcp(sp, dp, 1000, 64000);
        if syn {
            b = b.syn();
        }
        if ack {
            b = b.ack(1);
        }
        b.write(&mut out, b"data").unwrap();
        out
    }

    fn run(
        t: &Tables,
        f: &Flows,
        dir: Direction,
        pkt: &[u8],
        peer: Ipv4Addr,
    ) -> (Verdict, Vec<u8>) {
        run_as(t, f, dir, pkt, peer, false)
    }

    /// `run`, the packet coming from the wire (the AF_XDP port's TCP and UDP to the node).
    fn from_wire(t: &Tables, f: &Flows, pkt: &[u8]) -> (Verdict, Vec<u8>) {
        let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        run_as(t, f, Direction::FromUnderlay, pkt, src, true)
    }

    fn run_as(
        t: &Tables,
        f: &Flows,
        dir: Direction,
        pkt: &[u8],
        peer: Ipv4Addr,
        wire: bool,
    ) -> (Verdict, Vec<u8>) {
        let mut b = Batch::new(1, 2048);
        b.rx_slot(0)[..pkt.len()].copy_from_slice(pkt);
        b.commit_rx(0, pkt.len(), SocketAddrV4::new(peer, 8285), false);
        b.slot_mut(0).1.wire = wire;
        process_with(t, Some(f), 0, dir, &mut b);
        (b.meta(0).verdict, b.packet(0).to_vec())
    }

    const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 200);
    const NODE_PORT: u16 = 30080;

    /// `tables` owning the node's address, the web service on NodePort 30080.
    fn wire_tables(endpoints: &[SocketAddrV4]) -> Tables {
        let t = tables(endpoints);
        let mut specs: Vec<ServiceSpec> = t.services.specs().cloned().collect();
        let web = specs.iter_mut().find(|s| s.name == "default/web").unwrap();
        web.node_port = Some(NODE_PORT);
        let services = Services::build(*t.services.options(), specs).unwrap();
        Tables {
            services: Arc::new(services),
            wire: Some(super::super::WireNat {
                masquerade: true,
                masq_ports: super::super::MASQ_PORTS,
            }),
            ..t
        }
    }

    #[test]
    fn test_node_port_to_a_remote_backend_is_masqueraded_to_the_nodes_cluster_address() {
        let t = wire_tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let f = Flows::new(Default::default());
        let syn = tcp(OUTSIDE, 50000, NODE_A, NODE_PORT, true, false);
        let (v, out) = from_wire(&t, &f, &syn);
        assert_eq!(v, Verdict::ToUnderlay(SocketAddrV4::new(NODE_B, 8285)));
        let (src, sport, dst, dport) = tuple_of(&out);
        assert_eq!((src, dst, dport), (t.local.tun_addr, REMOTE_EP, 8080));
        // Routed from eth0 into the tunnel, and by flannel's udp backend (which decrements too).
        assert_eq!(out[8], 62);
        // The backend answers the node's cluster address, through the tunnel: out on the wire
        // from the NodePort, to the client.
        let synack = tcp(REMOTE_EP, 8080, t.local.tun_addr, sport, true, true);
        let (v, out) = run(&t, &f, Direction::FromUnderlay, &synack, NODE_B);
        assert_eq!(v, Verdict::ToWire(OUTSIDE));
        assert_eq!(tuple_of(&out), (NODE_A, NODE_PORT, OUTSIDE, 50000));
    }

    #[test]
    fn test_node_port_to_a_local_backend_goes_through_the_hairpin_address() {
        let t = wire_tables(&[SocketAddrV4::new(LOCAL_EP, 8080)]);
        let f = Flows::new(Default::default());
        let hairpin = t.services.options().hairpin_ip;
        let syn = tcp(OUTSIDE, 50000, NODE_A, NODE_PORT, true, false);
        let (v, out) = from_wire(&t, &f, &syn);
        assert_eq!(v, Verdict::ToTun);
        let (src, sport, dst, dport) = tuple_of(&out);
        assert_eq!((src, dst, dport), (hairpin, LOCAL_EP, 8080));
        let synack = tcp(LOCAL_EP, 8080, hairpin, sport, true, true);
        let (v, out) = run(&t, &f, Direction::FromTun, &synack, LOCAL_EP);
        assert_eq!(v, Verdict::ToWire(OUTSIDE));
        assert_eq!(tuple_of(&out), (NODE_A, NODE_PORT, OUTSIDE, 50000));
    }

    #[test]
    fn test_pods_are_masqueraded_to_the_node_with_ports_of_the_masquerade_range() {
        let t = wire_tables(&[]);
        let f = Flows::new(Default::default());
        let (lo, hi) = super::super::MASQ_PORTS;
        let mut seen = std::collections::HashSet::new();
        for sport in 40000..40100 {
            let syn = tcp(CLIENT, sport, OUTSIDE, 443, true, false);
            let (v, out) = run(&t, &f, Direction::FromTun, &syn, CLIENT);
            assert_eq!(v, Verdict::ToWire(OUTSIDE));
            let (src, masq, dst, dport) = tuple_of(&out);
            assert_eq!((src, dst, dport), (NODE_A, OUTSIDE, 443));
            assert!((lo..=hi).contains(&masq), "port {masq}");
            assert!(seen.insert(masq), "port {masq} twice");
            // The answer comes in on the wire and goes back to the pod.
            let synack = tcp(OUTSIDE, 443, NODE_A, masq, true, true);
            let (v, out) = from_wire(&t, &f, &synack);
            assert_eq!(v, Verdict::ToTun);
            assert_eq!(tuple_of(&out), (OUTSIDE, 443, CLIENT, sport));
        }
        // Pod to pod keeps its addresses; nothing is masqueraded without --ip-masq.
        let (v, out) = run(
            &t,
            &f,
            Direction::FromTun,
            &tcp(CLIENT, 1, REMOTE_EP, 2, true, false),
            CLIENT,
        );
        assert_eq!(v, Verdict::ToUnderlay(SocketAddrV4::new(NODE_B, 8285)));
        assert_eq!(tuple_of(&out), (CLIENT, 1, REMOTE_EP, 2));
        let t = Tables {
            wire: Some(super::super::WireNat {
                masquerade: false,
                masq_ports: super::super::MASQ_PORTS,
            }),
            ..wire_tables(&[])
        };
        let syn = tcp(CLIENT, 40000, OUTSIDE, 443, true, false);
        let (v, _) = run(
            &t,
            &Flows::new(Default::default()),
            Direction::FromTun,
            &syn,
            CLIENT,
        );
        assert_eq!(v, Verdict::IcmpToTun, "no route outside without masquerade");
    }

    #[test]
    fn test_nothing_is_masqueraded_to_the_node_itself_or_to_martian_destinations() {
        let t = wire_tables(&[]);
        let f = Flows::new(Default::default());
        for dst in [
            NODE_A,
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(169, 254, 169, 254),
            Ipv4Addr::new(0, 1, 2, 3),
            Ipv4Addr::new(224, 0, 0, 251),
            Ipv4Addr::new(239, 1, 2, 3),
            Ipv4Addr::BROADCAST,
        ] {
            for pkt in [tcp(CLIENT, 40000, dst, 443, true, false), {
                let mut out = Vec::new();
                PacketBuilder::ipv4(CLIENT.octets(), dst.octets(), 64)
                    .udp(40000, 53)
                    .write(&mut out, b"q")
                    .unwrap();
                out
            }] {
                let (v, _) = run(&t, &f, Direction::FromTun, &pkt, CLIENT);
                assert_eq!(v, Verdict::Drop(DropReason::MartianDestination), "to {dst}");
            }
        }
        assert!(
            f.conntrack.entries(0).is_empty(),
            "no connection was opened"
        );
        // Outside hosts still are.
        let (v, _) = run(
            &t,
            &f,
            Direction::FromTun,
            &tcp(CLIENT, 40000, OUTSIDE, 443, true, false),
            CLIENT,
        );
        assert_eq!(v, Verdict::ToWire(OUTSIDE));
    }

    #[test]
    fn test_an_icmp_error_about_a_masqueraded_connection_reaches_its_pod() {
        let t = wire_tables(&[]);
        let f = Flows::new(Default::default());
        let syn = tcp(CLIENT, 40000, OUTSIDE, 443, true, false);
        let (v, sent) = run(&t, &f, Direction::FromTun, &syn, CLIENT);
        assert_eq!(v, Verdict::ToWire(OUTSIDE));
        let (_, masq, _, _) = tuple_of(&sent);
        // A router on the way: fragmentation needed, quoting what the node sent.
        let router = Ipv4Addr::new(192, 168, 100, 254);
        let mut err = Vec::new();
        PacketBuilder::ipv4(router.octets(), NODE_A.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                },
            ))
            .write(&mut err, &sent[..28])
            .unwrap();
        let (v, out) = from_wire(&t, &f, &err);
        assert_eq!(v, Verdict::ToTun);
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&out).unwrap();
        assert_eq!((ip.source_addr(), ip.destination_addr()), (router, CLIENT));
        // The quoted packet is the pod's own again.
        let quoted = &out[28..];
        assert_eq!(&quoted[12..16], &CLIENT.octets());
        assert_eq!(u16::from_be_bytes([quoted[20], quoted[21]]), 40000);
        assert_ne!(masq, 40000);
    }

    #[test]
    fn test_wire_packets_that_are_no_connection_of_ours_are_dropped() {
        let t = wire_tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let f = Flows::new(Default::default());
        let cases = [
            // An answer to no masqueraded connection.
            tcp(OUTSIDE, 443, NODE_A, 61000, true, true),
            // A port that is no NodePort.
            tcp(OUTSIDE, 50000, NODE_A, 30081, true, false),
            // Not to the node's address.
            tcp(OUTSIDE, 50000, NODE_B, NODE_PORT, true, false),
        ];
        for pkt in cases {
            let (v, _) = from_wire(&t, &f, &pkt);
            assert!(
                matches!(
                    v,
                    Verdict::Drop(DropReason::NotForThisNode | DropReason::CtInvalid)
                ),
                "{v:?}"
            );
        }
        // A NodePort whose service has no endpoints: port unreachable, from the node.
        let mut specs: Vec<ServiceSpec> = t.services.specs().cloned().collect();
        let empty = specs
            .iter_mut()
            .find(|s| s.name == "default/empty")
            .unwrap();
        empty.node_port = Some(30082);
        let services = Services::build(*t.services.options(), specs).unwrap();
        let t2 = Tables {
            services: Arc::new(services),
            ..t.clone()
        };
        let syn = tcp(OUTSIDE, 50000, NODE_A, 30082, true, false);
        let (v, out) = from_wire(&t2, &f, &syn);
        assert_eq!(v, Verdict::ToWire(OUTSIDE));
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&out).unwrap();
        assert_eq!((ip.source_addr(), ip.destination_addr()), (NODE_A, OUTSIDE));
        assert_eq!((out[20], out[21]), (3, 3), "port unreachable");
        // In a worker, those answers to one client are limited as the kernel's REJECT is: a
        // burst of six, then counted drops.
        let mut state = super::super::WorkerState::default();
        let verdicts: Vec<Verdict> = (0..10u16)
            .map(|i| {
                let syn = tcp(OUTSIDE, 50001 + i, NODE_A, 30082, true, false);
                let mut b = Batch::new(1, 2048);
                b.rx_slot(0)[..syn.len()].copy_from_slice(&syn);
                b.commit_rx(0, syn.len(), SocketAddrV4::new(OUTSIDE, 8285), false);
                b.slot_mut(0).1.wire = true;
                let dir = Direction::FromUnderlay;
                super::super::process_in_worker(&t2, Some(&f), &mut state, 5000, dir, &mut b);
                b.meta(0).verdict
            })
            .collect();
        let answered = verdicts
            .iter()
            .filter(|v| **v == Verdict::ToWire(OUTSIDE))
            .count();
        assert_eq!(answered, 6, "{verdicts:?}");
        assert_eq!(verdicts[9], Verdict::Drop(DropReason::IcmpRateLimited));
        // Without owning the wire, nothing from it is taken.
        let t = tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let syn = tcp(OUTSIDE, 50000, NODE_A, NODE_PORT, true, false);
        assert_eq!(
            from_wire(&t, &f, &syn).0,
            Verdict::Drop(DropReason::NotForThisNode)
        );
    }

    /// Found by the fuzz test: a NodePort SYN from the wire with a corrupted IPv4 header was
    /// translated (its checksum patched, still wrong) and opened a connection; the kernel's
    /// ip_rcv drops it before conntrack sees it.
    #[test]
    fn test_a_wire_packet_with_a_bad_header_checksum_opens_nothing() {
        let t = wire_tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let f = Flows::new(Default::default());
        let mut syn = tcp(OUTSIDE, 50000, NODE_A, NODE_PORT, true, false);
        syn[10] ^= 0x01;
        let (v, _) = from_wire(&t, &f, &syn);
        assert_eq!(v, Verdict::Drop(DropReason::BadChecksum));
        assert!(
            f.conntrack.entries(0).is_empty(),
            "no connection was opened"
        );
    }

    /// Found by the fuzz test: a NodePort SYN from the wire with the node's own address as its
    /// source opened a connection, and its backend's answer went out on the wire to the node
    /// itself. The kernel drops such sources (martians) on input; so do we.
    #[test]
    fn test_wire_packets_from_martian_sources_open_nothing() {
        let t = wire_tables(&[SocketAddrV4::new(LOCAL_EP, 8080)]);
        let f = Flows::new(Default::default());
        for src in [
            NODE_A,
            t.local.tun_addr,
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::BROADCAST,
        ] {
            let syn = tcp(src, 50000, NODE_A, NODE_PORT, true, false);
            let (v, _) = from_wire(&t, &f, &syn);
            assert_eq!(v, Verdict::Drop(DropReason::SpoofedSource), "from {src}");
        }
        assert!(
            f.conntrack.entries(0).is_empty(),
            "no connection was opened"
        );
        // Anyone else is served.
        let syn = tcp(OUTSIDE, 50000, NODE_A, NODE_PORT, true, false);
        assert_eq!(from_wire(&t, &f, &syn).0, Verdict::ToTun);
    }

    /// Found by the long fuzz run: a SYN from the wire to a NodePort without endpoints, from an
    /// address of the cluster network that no lease holds, got its port unreachable sent out on
    /// the wire toward the cluster network. Such a source is refused; a pod of a lease still
    /// gets its answer through the tunnel.
    #[test]
    fn test_wire_packets_from_a_pod_of_no_lease_open_nothing() {
        let t = wire_tables(&[SocketAddrV4::new(LOCAL_EP, 8080)]);
        let f = Flows::new(Default::default());
        let nowhere = Ipv4Addr::new(10, 244, 3, 7);
        for port in [NODE_PORT, 30082] {
            let syn = tcp(nowhere, 50000, NODE_A, port, true, false);
            assert_eq!(
                from_wire(&t, &f, &syn).0,
                Verdict::Drop(DropReason::SpoofedSource)
            );
        }
        assert!(
            f.conntrack.entries(0).is_empty(),
            "no connection was opened"
        );
        let syn = tcp(
            Ipv4Addr::new(10, 244, 2, 9),
            50000,
            NODE_A,
            NODE_PORT,
            true,
            false,
        );
        assert_eq!(from_wire(&t, &f, &syn).0, Verdict::ToTun);
    }

    /// Found by the fuzz test: the answer to a connection from the node's own address (a host
    /// process bound to it, which `may_send_from` admits) to a ClusterIP with a local backend
    /// went out on the wire to the node's own address with `--io xdp`, and became an ICMP
    /// net unreachable without it. It is the host's: into the TUN, for the kernel to deliver.
    #[test]
    fn test_the_answer_to_the_nodes_own_connection_to_a_service_goes_into_the_tun() {
        for t in [
            wire_tables(&[SocketAddrV4::new(LOCAL_EP, 8080)]),
            tables(&[SocketAddrV4::new(LOCAL_EP, 8080)]),
        ] {
            let f = Flows::new(Default::default());
            let syn = tcp(NODE_A, 40000, VIP, 80, true, false);
            let (v, out) = run(&t, &f, Direction::FromTun, &syn, NODE_A);
            assert_eq!(v, Verdict::ToTun);
            let (src, sport, dst, dport) = tuple_of(&out);
            assert_eq!((dst, dport), (LOCAL_EP, 8080));
            let synack = tcp(LOCAL_EP, 8080, src, sport, true, true);
            let (v, out) = run(&t, &f, Direction::FromTun, &synack, LOCAL_EP);
            assert_eq!(v, Verdict::ToTun, "wire: {}", t.wire.is_some());
            assert_eq!(tuple_of(&out), (VIP, 80, NODE_A, 40000));
        }
    }

    /// Source, destination and ports of a packet, its checksums verified.
    fn tuple_of(pkt: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
        let s = SlicedPacket::from_ip(pkt).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
            panic!("not ipv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        let (sp, dp) = match &s.transport {
            Some(TransportSlice::Tcp(t)) => {
                let c = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
                assert_eq!(c, t.checksum(), "tcp checksum");
                (t.source_port(), t.destination_port())
            }
            Some(TransportSlice::Udp(u)) => {
                let c = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                assert_eq!(c, u.checksum(), "udp checksum");
                (u.source_port(), u.destination_port())
            }
            _ => (0, 0),
        };
        (h.source.into(), sp, h.destination.into(), dp)
    }

    #[test]
    fn test_remote_backend_dnat_and_reverse_nat_of_the_reply() {
        let t = tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let f = Flows::new(Default::default());
        let (v, out) = run(
            &t,
            &f,
            Direction::FromTun,
            &tcp(CLIENT, 40000, VIP, 80, true, false),
            CLIENT,
        );
        assert_eq!(v, Verdict::ToUnderlay(SocketAddrV4::new(NODE_B, 8285)));
        assert_eq!(tuple_of(&out), (CLIENT, 40000, REMOTE_EP, 8080));
        let synack = tcp(REMOTE_EP, 8080, CLIENT, 40000, true, true);
        let (v, out) = run(&t, &f, Direction::FromUnderlay, &synack, NODE_B);
        assert_eq!(v, Verdict::ToTun);
        assert_eq!(tuple_of(&out), (VIP, 80, CLIENT, 40000));
        let e = &f.conntrack.entries(0)[0];
        assert_eq!(e.tcp_state, Some(conntrack::tcp::TcpState::SynRecv));
    }

    #[test]
    fn test_local_backend_is_hairpinned_through_the_tun_with_snat() {
        let t = tables(&[SocketAddrV4::new(LOCAL_EP, 8080)]);
        let f = Flows::new(Default::default());
        let hairpin = t.services.options().hairpin_ip;
        let (v, out) = run(
            &t,
            &f,
            Direction::FromTun,
            &tcp(CLIENT, 40000, VIP, 80, true, false),
            CLIENT,
        );
        assert_eq!(v, Verdict::ToTun);
        let (src, sport, dst, dport) = tuple_of(&out);
        assert_eq!((src, dst, dport), (hairpin, LOCAL_EP, 8080));
        assert_eq!(out[8], 63, "one routing hop");
        // The backend answers the hairpin address, which routes into the TUN.
        let (v, out) = run(
            &t,
            &f,
            Direction::FromTun,
            &tcp(LOCAL_EP, 8080, hairpin, sport, true, true),
            LOCAL_EP,
        );
        assert_eq!(v, Verdict::ToTun);
        assert_eq!(tuple_of(&out), (VIP, 80, CLIENT, 40000));
    }

    /// `tables` with the web service also on an external IP.
    fn external_ip_tables(endpoints: &[SocketAddrV4]) -> Tables {
        let t = tables(endpoints);
        let mut specs: Vec<ServiceSpec> = t.services.specs().cloned().collect();
        let web = specs.iter_mut().find(|s| s.name == "default/web").unwrap();
        web.external_ips = vec![EXTERNAL_IP];
        let services = Services::build(*t.services.options(), specs).unwrap();
        Tables {
            services: Arc::new(services),
            ..t
        }
    }

    const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    /// An outside client's connection to an external IP, forwarded by the node into the TUN:
    /// not a spoofed pod packet; DNATed to the backend on node B and SNATed to this node's
    /// cluster address, so the answer comes back here and leaves from the external IP.
    #[test]
    fn test_an_outside_client_reaches_an_external_ip_through_the_tun() {
        let t = external_ip_tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let f = Flows::new(Default::default());
        let syn = tcp(OUTSIDE, 40000, EXTERNAL_IP, 80, true, false);
        let (v, out) = run(&t, &f, Direction::FromTun, &syn, OUTSIDE);
        assert_eq!(v, Verdict::ToUnderlay(SocketAddrV4::new(NODE_B, 8285)));
        let (src, sport, dst, dport) = tuple_of(&out);
        assert_eq!((src, dst, dport), (t.local.tun_addr, REMOTE_EP, 8080));
        let synack = tcp(REMOTE_EP, 8080, t.local.tun_addr, sport, true, true);
        let (v, out) = run(&t, &f, Direction::FromUnderlay, &synack, NODE_B);
        assert_eq!(v, Verdict::ToTun);
        assert_eq!(tuple_of(&out), (EXTERNAL_IP, 80, OUTSIDE, 40000));
        // Anything else from outside the cluster network through the TUN is still a pod
        // posing as someone else, and so is a pod of another node's lease.
        let other = tcp(
            OUTSIDE,
            40001,
            Ipv4Addr::new(192, 0, 2, 11),
            80,
            true,
            false,
        );
        let (v, _) = run(&t, &f, Direction::FromTun, &other, OUTSIDE);
        assert_eq!(v, Verdict::Drop(DropReason::SpoofedSource));
        let posing = tcp(REMOTE_EP, 40002, EXTERNAL_IP, 80, true, false);
        let (v, _) = run(&t, &f, Direction::FromTun, &posing, REMOTE_EP);
        assert_eq!(v, Verdict::Drop(DropReason::SpoofedSource));
    }

    #[test]
    fn test_service_without_endpoints_or_unknown_port_is_rejected_from_the_vip() {
        let t = tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let f = Flows::new(Default::default());
        for port in [81, 82] {
            let (v, out) = run(
                &t,
                &f,
                Direction::FromTun,
                &tcp(CLIENT, 40000, VIP, port, true, false),
                CLIENT,
            );
            assert_eq!(v, Verdict::IcmpToTun);
            assert_eq!(&out[12..16], &VIP.octets());
            assert_eq!((out[20], out[21]), (3, 3), "port unreachable");
        }
        assert_eq!(f.conntrack.counters().entries, 0);
    }

    #[test]
    fn test_removed_endpoint_drops_its_flows_and_keeps_others() {
        let a = SocketAddrV4::new(REMOTE_EP, 8080);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 3), 8080);
        let t = tables(&[a, b]);
        let f = Flows::new(Default::default());
        let client = |sport, syn, ack| tcp(CLIENT, sport, VIP, 80, syn, ack);
        let mut on_a = Vec::new();
        let mut on_b = Vec::new();
        for sport in 40000..40040 {
            let (_, out) = run(
                &t,
                &f,
                Direction::FromTun,
                &client(sport, true, false),
                CLIENT,
            );
            let (_, _, dst, _) = tuple_of(&out);
            let synack = tcp(dst, 8080, CLIENT, sport, true, true);
            let (v, _) = run(&t, &f, Direction::FromUnderlay, &synack, NODE_B);
            assert_eq!(v, Verdict::ToTun);
            let (_, out) = run(
                &t,
                &f,
                Direction::FromTun,
                &client(sport, false, true),
                CLIENT,
            );
            assert_eq!(tuple_of(&out).2, dst, "established");
            if dst == *a.ip() {
                on_a.push(sport)
            } else {
                on_b.push(sport)
            }
        }
        assert!(!on_a.is_empty() && !on_b.is_empty());
        let t2 = tables(&[b]);
        // Every later segment the client sends on the removed endpoint's connections is
        // answered with the RST that ends it there (from the address it sent to, with the
        // sequence number it expects), the second as the first: none is picked up mid-stream
        // as a new connection to the live backend.
        for _ in 0..2 {
            for &sport in &on_a {
                let (v, out) = run(
                    &t2,
                    &f,
                    Direction::FromTun,
                    &client(sport, false, true),
                    CLIENT,
                );
                assert_eq!(v, Verdict::ResetToTun);
                assert_eq!(tuple_of(&out), (VIP, 80, CLIENT, sport));
                let rst = etherparse::TcpHeader::from_slice(&out[20..]).unwrap().0;
                assert!(rst.rst && !rst.ack && rst.sequence_number == 1, "{rst:?}");
            }
        }
        // The backend's segment towards the client becomes the RST that ends the connection
        // there, from the service address, with the segment's sequence and acknowledgement
        // numbers; the client's own RST is dropped.
        let answer = tcp(*a.ip(), 8080, CLIENT, on_a[0], false, true);
        let (v, out) = run(&t2, &f, Direction::FromUnderlay, &answer, NODE_B);
        assert_eq!(v, Verdict::ResetToTun);
        assert_eq!(tuple_of(&out), (VIP, 80, CLIENT, on_a[0]));
        let rst = etherparse::TcpHeader::from_slice(&out[20..]).unwrap().0;
        assert!(rst.rst && rst.ack && !rst.syn, "{rst:?}");
        assert_eq!((rst.sequence_number, rst.acknowledgment_number), (1000, 1));
        assert!(out.len() == 40, "no payload");
        let mut reset = Vec::new();
        PacketBuilder::ipv4(CLIENT.octets(), VIP.octets(), 64)
            .tcp(on_a[0], 80, 1000, 0)
            .rst()
            .ack(1)
            .write(&mut reset, &[])
            .unwrap();
        let (v, _) = run(&t2, &f, Direction::FromTun, &reset, CLIENT);
        assert_eq!(v, Verdict::Drop(DropReason::EndpointGone));
        for &sport in &on_b {
            let (_, out) = run(
                &t2,
                &f,
                Direction::FromTun,
                &client(sport, false, true),
                CLIENT,
            );
            assert_eq!(tuple_of(&out).2, *b.ip(), "kept its backend");
        }
        // A SYN on a removed endpoint's tuple (the client's socket is new) starts over on a
        // live backend.
        let (_, out) = run(
            &t2,
            &f,
            Direction::FromTun,
            &client(on_a[0], true, false),
            CLIENT,
        );
        assert_eq!(tuple_of(&out).2, *b.ip());
    }

    /// A handshake in flight when its endpoint leaves: the old backend's SYN-ACK is dropped
    /// (not reset, which would fail the client's connect() with "connection refused"), and the
    /// client's retransmitted SYN is planned anew onto a live endpoint.
    #[test]
    fn test_a_synack_from_a_removed_endpoint_lets_the_syn_retry_elsewhere() {
        let a = SocketAddrV4::new(REMOTE_EP, 8080);
        let f = Flows::new(Default::default());
        let syn = tcp(CLIENT, 40000, VIP, 80, true, false);
        let (_, out) = run(&tables(&[a]), &f, Direction::FromTun, &syn, CLIENT);
        assert_eq!(tuple_of(&out), (CLIENT, 40000, *a.ip(), 8080));
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 3), 8080);
        let t2 = tables(&[b]);
        let synack = tcp(*a.ip(), 8080, CLIENT, 40000, true, true);
        let (v, _) = run(&t2, &f, Direction::FromUnderlay, &synack, NODE_B);
        assert_eq!(v, Verdict::Drop(DropReason::EndpointGone));
        let (_, out) = run(&t2, &f, Direction::FromTun, &syn, CLIENT);
        assert_eq!(
            tuple_of(&out),
            (CLIENT, 40000, *b.ip(), 8080),
            "retried elsewhere"
        );
    }

    /// `tables` with one UDP service, 10.96.0.53:53, backed by `endpoints`.
    fn udp_tables(endpoints: &[SocketAddrV4]) -> Tables {
        let t = tables(&[]);
        let dns = ServiceSpec {
            name: "kube-system/dns".into(),
            cluster_ip: DNS_VIP,
            port: 53,
            proto: PROTO_UDP,
            endpoints: endpoints.to_vec(),
            ..Default::default()
        };
        let services = Services::build(*t.services.options(), vec![dns]).unwrap();
        Tables {
            services: Arc::new(services),
            ..t
        }
    }

    const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);

    fn dgram(src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
            .udp(sp, dp)
            .write(&mut out, b"0123456789")
            .unwrap();
        out
    }

    #[test]
    fn test_a_udp_flow_whose_endpoint_left_moves_to_a_live_one_without_a_drop() {
        let old = SocketAddrV4::new(REMOTE_EP, 5353);
        let new = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 9), 5353);
        let f = Flows::new(Default::default());
        let query = dgram(CLIENT, 5000, DNS_VIP, 53);
        let t = udp_tables(&[old]);
        let out = run_batch(
            &t,
            &f,
            Direction::FromTun,
            std::slice::from_ref(&query),
            CLIENT,
        );
        assert_eq!(tuple_of(&out[0].1).2, *old.ip());
        // The server pod cycles: its replacement has another address. The client keeps
        // sending, in a batch (a run) and alone: every datagram reaches the new one.
        let t2 = udp_tables(&[new]);
        let out = run_batch(&t2, &f, Direction::FromTun, &vec![query.clone(); 8], CLIENT);
        for (v, pkt) in &out {
            assert!(!matches!(v, Verdict::Drop(_)), "{v:?}");
            assert_eq!(tuple_of(pkt).2, *new.ip());
        }
        // A late answer of the old pod is no longer translated: it is pod-to-pod traffic now.
        let late = dgram(*old.ip(), 5353, CLIENT, 5000);
        let (_, out) = run(&t2, &f, Direction::FromUnderlay, &late, NODE_B);
        assert_eq!(tuple_of(&out).0, *old.ip());
        // The new pod's answer comes back from the ClusterIP.
        let answer = dgram(*new.ip(), 5353, CLIENT, 5000);
        let (_, out) = run(&t2, &f, Direction::FromUnderlay, &answer, NODE_B);
        assert_eq!(tuple_of(&out), (DNS_VIP, 53, CLIENT, 5000));
    }

    #[test]
    fn test_added_endpoint_leaves_existing_flows_on_their_backend() {
        let a = SocketAddrV4::new(REMOTE_EP, 8080);
        let t = tables(&[a]);
        let f = Flows::new(Default::default());
        let syn = |sport| tcp(CLIENT, sport, VIP, 80, true, false);
        for sport in 40000..40100 {
            run(&t, &f, Direction::FromTun, &syn(sport), CLIENT);
        }
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 3), 8080);
        let t2 = tables(&[a, b]);
        let mut new_on_b = 0;
        for sport in 40000..40200 {
            let (_, out) = run(&t2, &f, Direction::FromTun, &syn(sport), CLIENT);
            let dst = tuple_of(&out).2;
            if sport < 40100 {
                assert_eq!(dst, REMOTE_EP, "an existing flow moved");
            } else if dst == *b.ip() {
                new_on_b += 1;
            }
        }
        assert!(
            new_on_b > 20,
            "new flows use the new endpoint: {new_on_b} of 100"
        );
    }

    #[test]
    fn test_icmp_error_from_the_backend_comes_back_from_the_vip() {
        let t = tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let f = Flows::new(Default::default());
        let (_, sent) = run(
            &t,
            &f,
            Direction::FromTun,
            &tcp(CLIENT, 40000, VIP, 80, true, false),
            CLIENT,
        );
        let mut err = Vec::new();
        PacketBuilder::ipv4(REMOTE_EP.octets(), CLIENT.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut err, &sent[..28])
            .unwrap();
        let (v, out) = run(&t, &f, Direction::FromUnderlay, &err, NODE_B);
        assert_eq!(v, Verdict::ToTun);
        assert_eq!(&out[12..16], &VIP.octets(), "outer source");
        let quoted = &out[28..];
        assert_eq!(&quoted[12..16], &CLIENT.octets());
        assert_eq!(&quoted[16..20], &VIP.octets());
        assert_eq!(u16::from_be_bytes([quoted[22], quoted[23]]), 80);
        assert_eq!(
            crate::wire::checksum::checksum(&out[20..]),
            0,
            "icmp checksum"
        );
        // An error quoting a connection nobody made passes untranslated.
        let mut stray = err.clone();
        stray[28 + 20..28 + 22].copy_from_slice(&1u16.to_be_bytes());
        let (v, out) = run(&t, &f, Direction::FromUnderlay, &stray, NODE_B);
        assert_eq!(v, Verdict::ToTun);
        assert_eq!(&out[12..16], &REMOTE_EP.octets());
    }

    #[test]
    fn test_bad_tcp_and_fragments_to_services_are_counted_drops() {
        let t = tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let f = Flows::new(Default::default());
        let mut synfin = tcp(CLIENT, 40000, REMOTE_EP, 80, true, false);
        synfin[33] |= 0x01;
        let (v, _) = run(&t, &f, Direction::FromTun, &synfin, CLIENT);
        assert_eq!(v, Verdict::Drop(DropReason::CtInvalid));
        // A SYN-ACK out of nowhere.
        let (v, _) = run(
            &t,
            &f,
            Direction::FromUnderlay,
            &tcp(REMOTE_EP, 80, CLIENT, 1, true, true),
            NODE_B,
        );
        assert_eq!(v, Verdict::Drop(DropReason::CtInvalid));
        let mut frag = tcp(CLIENT, 40000, VIP, 80, true, false);
        frag[6] = 0x20; // more fragments
        frag[10..12].copy_from_slice(&[0, 0]);
        let c = crate::wire::checksum::checksum(&frag[..20]);
        frag[10..12].copy_from_slice(&c.to_be_bytes());
        let (v, _) = run(&t, &f, Direction::FromTun, &frag, CLIENT);
        assert_eq!(v, Verdict::Drop(DropReason::Fragmented));
        // Truncated TCP header.
        let mut short = tcp(CLIENT, 40000, REMOTE_EP, 80, true, false);
        short.truncate(30);
        short[2..4].copy_from_slice(&30u16.to_be_bytes());
        short[10..12].copy_from_slice(&[0, 0]);
        let c = crate::wire::checksum::checksum(&short[..20]);
        short[10..12].copy_from_slice(&c.to_be_bytes());
        let (v, _) = run(&t, &f, Direction::FromTun, &short, CLIENT);
        assert_eq!(v, Verdict::Drop(DropReason::Truncated));
    }

    /// A TCP segment with explicit sequence numbers and flags.
    fn seg(
        src: Ipv4Addr,
        sp: u16,
        dst: Ipv4Addr,
        dp: u16,
        seq: u32,
        ack: u32,
        flags: &str,
    ) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).tcp(sp, dp, seq, 64000);
        for f in flags.chars() {
            b = match f {
                'S' => b.syn(),
                'A' => b.ack(ack),
                'F' => b.fin(),
                'P' => b.psh(),
                _ => b,
            };
        }
        let mut out = Vec::new();
        b.write(
            &mut out,
            &[7u8; 100][..if flags.contains('P') { 100 } else { 0 }],
        )
        .unwrap();
        out
    }

    fn run_batch(
        t: &Tables,
        f: &Flows,
        dir: Direction,
        pkts: &[Vec<u8>],
        peer: Ipv4Addr,
    ) -> Vec<(Verdict, Vec<u8>)> {
        let mut b = Batch::new(pkts.len(), 2048);
        for (i, p) in pkts.iter().enumerate() {
            b.rx_slot(i)[..p.len()].copy_from_slice(p);
            b.commit_rx(i, p.len(), SocketAddrV4::new(peer, 8285), false);
        }
        process_with(t, Some(f), 5, dir, &mut b);
        (0..pkts.len())
            .map(|i| (b.meta(i).verdict, b.packet(i).to_vec()))
            .collect()
    }

    #[test]
    fn test_runs_of_plain_acks_are_credited_and_a_fin_ends_the_run() {
        let t = tables(&[SocketAddrV4::new(REMOTE_EP, 8080)]);
        let f = Flows::new(Default::default());
        let (c, v) = (CLIENT, VIP);
        run_batch(
            &t,
            &f,
            Direction::FromTun,
            &[seg(c, 40000, v, 80, 100, 0, "S")],
            c,
        );
        let back = |seq, ack, flags| seg(REMOTE_EP, 8080, c, 40000, seq, ack, flags);
        run_batch(
            &t,
            &f,
            Direction::FromUnderlay,
            &[back(500, 101, "SA")],
            NODE_B,
        );
        run_batch(
            &t,
            &f,
            Direction::FromTun,
            &[seg(c, 40000, v, 80, 101, 501, "A")],
            c,
        );
        run_batch(
            &t,
            &f,
            Direction::FromUnderlay,
            &[back(501, 101, "A")],
            NODE_B,
        );
        // Ten data segments in one batch, then a FIN, then more data after it.
        let mut pkts: Vec<Vec<u8>> = (0..10)
            .map(|k| seg(c, 40000, v, 80, 101 + 100 * k, 501, "PA"))
            .collect();
        pkts.push(seg(c, 40000, v, 80, 1101, 501, "FA"));
        pkts.push(seg(c, 40000, v, 80, 1102, 501, "A"));
        let out = run_batch(&t, &f, Direction::FromTun, &pkts, c);
        for (verdict, pkt) in &out {
            assert_eq!(
                *verdict,
                Verdict::ToUnderlay(SocketAddrV4::new(NODE_B, 8285))
            );
            assert_eq!(
                tuple_of(pkt),
                (CLIENT, 40000, REMOTE_EP, 8080),
                "every one translated"
            );
        }
        let e = &f.conntrack.entries(5)[0];
        assert_eq!(e.packets[0], 2 + 12, "the run's segments all counted");
        assert_eq!(e.bytes[0], 2 * 40 + 10 * 140 + 40 + 40);
        // The FIN ended the run (FIN_WAIT), and the ACK after it was tracked, not credited:
        // netfilter's table takes an ORIGINAL ACK in FIN_WAIT to CLOSE_WAIT.
        assert_eq!(e.tcp_state, Some(conntrack::tcp::TcpState::CloseWait));
        // An RST at the sequence number the run reached is in window.
        let rst = seg(REMOTE_EP, 8080, c, 40000, 501, 0, "");
        let mut rst = rst;
        rst[33] = 0x04;
        let out = run_batch(&t, &f, Direction::FromUnderlay, &[rst], NODE_B);
        assert_eq!(out[0].0, Verdict::ToTun);
    }

    #[test]
    fn test_a_burst_of_an_assured_udp_flow_is_credited_whole() {
        let t = tables(&[]);
        let f = Flows::new(Default::default());
        let dgram = |src, sp, dst, dp| {
            let mut out = Vec::new();
            PacketBuilder::ipv4(Ipv4Addr::octets(&src), Ipv4Addr::octets(&dst), 64)
                .udp(sp, dp)
                .write(&mut out, b"0123456789")
                .unwrap();
            out
        };
        let out = dgram(CLIENT, 5000, REMOTE_EP, 53);
        let back = dgram(REMOTE_EP, 53, CLIENT, 5000);
        run_batch(
            &t,
            &f,
            Direction::FromTun,
            std::slice::from_ref(&out),
            CLIENT,
        );
        run_batch(
            &t,
            &f,
            Direction::FromUnderlay,
            std::slice::from_ref(&back),
            NODE_B,
        );
        // Past the 2 s stream mark (the batch helper runs at t = 5 ms): assure it.
        let mut b = Batch::new(1, 2048);
        b.rx_slot(0)[..out.len()].copy_from_slice(&out);
        b.commit_rx(0, out.len(), SocketAddrV4::new(CLIENT, 0), false);
        process_with(&t, Some(&f), 3000, Direction::FromTun, &mut b);
        assert!(f.conntrack.entries(3000)[0].assured);
        let burst = vec![out.clone(); 20];
        let mut b = Batch::new(20, 2048);
        for (i, p) in burst.iter().enumerate() {
            b.rx_slot(i)[..p.len()].copy_from_slice(p);
            b.commit_rx(i, p.len(), SocketAddrV4::new(CLIENT, 0), false);
        }
        process_with(&t, Some(&f), 4000, Direction::FromTun, &mut b);
        let e = &f.conntrack.entries(4000)[0];
        assert_eq!(e.packets, [22, 1]);
        assert_eq!(e.bytes[0], 22 * 38);
        assert_eq!(e.expires_in, 120, "refreshed with the stream timeout");
    }

    #[test]
    fn test_pod_to_pod_flows_are_tracked_untranslated() {
        let t = tables(&[]);
        let f = Flows::new(Default::default());
        let syn = tcp(CLIENT, 40000, REMOTE_EP, 80, true, false);
        let (v, out) = run(&t, &f, Direction::FromTun, &syn, CLIENT);
        assert_eq!(v, Verdict::ToUnderlay(SocketAddrV4::new(NODE_B, 8285)));
        assert_eq!(out[20..], syn[20..]);
        let (v, _) = run(
            &t,
            &f,
            Direction::FromUnderlay,
            &tcp(REMOTE_EP, 80, CLIENT, 40000, true, true),
            NODE_B,
        );
        assert_eq!(v, Verdict::ToTun);
        assert_eq!(f.conntrack.counters().entries, 1);
    }
}
