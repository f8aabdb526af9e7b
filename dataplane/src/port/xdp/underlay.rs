//! The underlay through AF_XDP: what the kernel's IP and UDP layers do for podwire's UDP
//! socket, done here for the frames the XDP program steers to an [`XskPort`].
//!
//! Receive: a frame must be IPv4 with a valid header checksum, addressed to us, unfragmented,
//! UDP to our port with a length that fits and a valid (or absent) checksum. What remains is
//! what the UDP socket would have returned: the payload, and the sender's address and port.
//! A frame that fails is left empty in the batch, so the pipeline counts it as truncated.
//!
//! Send: packets start at their outer IPv4 header (the pipeline writes outer IPv4 and UDP, as
//! for the raw socket); this port puts the Ethernet header in front, with the next hop's MAC
//! from the kernel's neighbour table. A packet to a neighbour not resolved yet goes through the
//! kernel instead (a raw socket, when the port has one): the kernel resolves the neighbour and
//! holds the packet meanwhile, as it would for its own. Without one, the packet is refused
//! (counted as a send error by the worker) and the kernel is asked to resolve the neighbour.

use super::xsk::{ipv4_ethernet_header, XskPort};
use crate::batch::Batch;
use crate::port::neighbours::Neighbours;
use crate::port::raw::RawIpPort;
use crate::port::udp::UdpPort;
use crate::port::{PortError, RxPort, TxOutcome, TxPort};
use crate::wire::{ethernet, ipv4, udp, IpProtocol, MacAddr};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

/// Ethernet header length.
const ETH: usize = 14;
/// Ethernet, IPv4 and UDP headers in front of a datagram's payload.
const DATAGRAM_HEADERS: usize = ETH + ipv4::HEADER_LEN + udp::HEADER_LEN;
/// The outer TTL of datagrams, as the kernel's UDP socket sends them (`ip_default_ttl`).
const DATAGRAM_TTL: u8 = 64;

/// Why a received frame is not one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotIpv4,
    BadIpHeader,
    NotForUs,
    Fragment,
    BadUdp,
}

/// The IPv4 packet of an Ethernet frame, if its header is whole and its checksum right.
fn ipv4_of(frame: &[u8]) -> Result<ipv4::Packet<&[u8]>, Refused> {
    if frame.len() < ETH || u16::from_be_bytes([frame[12], frame[13]]) != ethernet::ethertype::IPV4
    {
        return Err(Refused::NotIpv4);
    }
    let ip = ipv4::Packet::new_checked(&frame[ETH..]).map_err(|_| Refused::BadIpHeader)?;
    if ip.version() != 4 || !ip.verify_checksum() {
        return Err(Refused::BadIpHeader);
    }
    Ok(ip)
}

/// Where the UDP payload of `frame` is and who sent it, if `frame` is a datagram to
/// `local`:`port` that the kernel's UDP socket would have accepted.
pub fn udp_payload(
    frame: &[u8],
    local: Ipv4Addr,
    port: u16,
) -> Result<(core::ops::Range<usize>, SocketAddrV4), Refused> {
    let ip = ipv4_of(frame)?;
    if ip.dst() != local || ip.protocol() != IpProtocol::Udp {
        return Err(Refused::NotForUs);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Err(Refused::Fragment);
    }
    let datagram = udp::Packet::new_checked(ip.payload()).map_err(|_| Refused::BadUdp)?;
    if datagram.dst_port() != port {
        return Err(Refused::NotForUs);
    }
    if !datagram.verify_checksum(ip.src(), ip.dst()) {
        return Err(Refused::BadUdp);
    }
    let start = ETH + ip.header_len() + udp::HEADER_LEN;
    let len = usize::from(datagram.len()) - udp::HEADER_LEN;
    Ok((
        start..start + len,
        SocketAddrV4::new(ip.src(), datagram.src_port()),
    ))
}

/// Where the IPv4 packet in `frame` is, if it is TCP, UDP or ICMP to `local` that the kernel's
/// IP layer would have accepted (valid header, unfragmented, its length within the frame): what
/// the XDP program steers to podwire besides the underlay's datagrams (NodePorts, answers to
/// masqueraded connections, ICMP errors about them).
pub fn wire_packet(
    frame: &[u8],
    local: Ipv4Addr,
) -> Result<(core::ops::Range<usize>, Ipv4Addr), Refused> {
    let ip = ipv4_of(frame)?;
    let ours = matches!(
        ip.protocol(),
        IpProtocol::Tcp | IpProtocol::Udp | IpProtocol::Icmp
    );
    if ip.dst() != local || !ours {
        return Err(Refused::NotForUs);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Err(Refused::Fragment);
    }
    Ok((ETH..ETH + usize::from(ip.total_len()), ip.src()))
}

/// An AF_XDP socket on the underlay, speaking in datagrams.
pub struct XdpUnderlayPort {
    xsk: XskPort,
    local_mac: MacAddr,
    local_ip: Ipv4Addr,
    port: u16,
    neighbours: Neighbours,
    /// Frames refused on receive since the last [`XdpUnderlayPort::take_refused`].
    refused: u64,
    /// Send scratch: each packet's Ethernet header and index (reused, never reallocated past
    /// a batch).
    framed: Vec<([u8; ETH], u16)>,
    /// Sends what has no next-hop MAC yet through the kernel.
    fallback: Option<RawIpPort>,
    /// Send scratch: packets for the fallback.
    unresolved: Vec<u16>,
    /// Packets sent through the fallback since the last [`XdpUnderlayPort::take_via_kernel`].
    via_kernel: u64,
    /// Wire packets received since the last [`XdpUnderlayPort::take_wire`].
    wire: u64,
    /// Datagram send scratch: each datagram's headers and index.
    datagrams: Vec<([u8; DATAGRAM_HEADERS], u16)>,
    /// Send scratch: datagrams whose next hop is not resolved yet, for the caller's socket.
    unresolved_datagrams: Vec<(u16, SocketAddrV4)>,
    /// The IPv4 identification of the next datagram (they may be fragmented on the way).
    ident: u16,
    /// Whether datagrams carry a UDP checksum (flannel's udp backend, as its socket sent
    /// them) or none (VXLAN, as the kernel's VXLAN device sends it).
    udp_checksum: bool,
}

impl XdpUnderlayPort {
    /// `xsk` is bound to a queue of `device`, which has `local_mac` and `local_ip`; `port` is
    /// the backend's UDP port.
    pub fn new(
        xsk: XskPort,
        device: &str,
        local_mac: MacAddr,
        local_ip: Ipv4Addr,
        port: u16,
    ) -> XdpUnderlayPort {
        XdpUnderlayPort {
            xsk,
            local_mac,
            local_ip,
            port,
            neighbours: Neighbours::new(device, local_ip),
            refused: 0,
            framed: Vec::with_capacity(crate::batch::MAX_BATCH),
            fallback: None,
            unresolved: Vec::with_capacity(crate::batch::MAX_BATCH),
            via_kernel: 0,
            wire: 0,
            datagrams: Vec::with_capacity(crate::batch::MAX_BATCH),
            unresolved_datagrams: Vec::with_capacity(crate::batch::MAX_BATCH),
            ident: 0,
            udp_checksum: true,
        }
    }

    /// Whether [`XdpUnderlayPort::send_datagrams`] writes UDP checksums (the default).
    pub fn with_udp_checksum(mut self, on: bool) -> XdpUnderlayPort {
        self.udp_checksum = on;
        self
    }

    /// Sends each item's packet as the payload of a UDP datagram from our address and port to
    /// its address, as the underlay's UDP socket would: this port writes the Ethernet, IPv4
    /// and UDP headers in front. Datagrams to a next hop not resolved yet go through `socket`
    /// (the worker's UDP socket on our port), so the kernel resolves the neighbour.
    pub fn send_datagrams(
        &mut self,
        batch: &Batch,
        items: impl IntoIterator<Item = (u16, SocketAddrV4)>,
        socket: &mut UdpPort,
    ) -> TxOutcome {
        let mut out = self.send_resolved_datagrams(batch, items);
        if !self.unresolved_datagrams.is_empty() {
            let via = socket.tx_to(batch, &self.unresolved_datagrams);
            self.via_kernel += via.sent as u64;
            out.sent += via.sent;
            out.failed += via.failed;
        }
        out
    }

    /// [`XdpUnderlayPort::send_datagrams`] of the datagrams whose next hop is resolved; the
    /// others are left in `unresolved_datagrams`.
    fn send_resolved_datagrams(
        &mut self,
        batch: &Batch,
        items: impl IntoIterator<Item = (u16, SocketAddrV4)>,
    ) -> TxOutcome {
        self.datagrams.clear();
        self.unresolved_datagrams.clear();
        let now = Instant::now();
        self.neighbours.tick(now);
        let mut oversized = 0;
        for (i, to) in items {
            let payload = batch.packet(usize::from(i));
            let Some(mac) = self.neighbours.lookup(*to.ip(), now) else {
                self.unresolved_datagrams.push((i, to));
                continue;
            };
            if payload.len() > usize::from(u16::MAX) - ipv4::HEADER_LEN - udp::HEADER_LEN {
                oversized += 1;
                continue;
            }
            let mut headers = [0u8; DATAGRAM_HEADERS];
            let (eth, rest) = headers.split_at_mut(ETH);
            let (ip, l4) = rest.split_at_mut(ipv4::HEADER_LEN);
            eth.copy_from_slice(&ipv4_ethernet_header(mac, self.local_mac));
            ipv4::Repr {
                src: self.local_ip,
                dst: *to.ip(),
                protocol: IpProtocol::Udp,
                payload_len: udp::HEADER_LEN + payload.len(),
                ttl: DATAGRAM_TTL,
                dscp_ecn: 0,
                ident: self.ident,
                dont_frag: false,
            }
            .emit(ip);
            self.ident = self.ident.wrapping_add(1);
            let repr = udp::Repr {
                src_port: self.port,
                dst_port: to.port(),
                payload_len: payload.len(),
            };
            let l4: &mut [u8; udp::HEADER_LEN] = l4.try_into().expect("sized above");
            if self.udp_checksum {
                repr.emit_detached(l4, payload, self.local_ip, *to.ip());
            } else {
                repr.emit_unchecked(l4);
            }
            self.datagrams.push((headers, i));
        }
        let ready = self.datagrams.len();
        let datagrams = &self.datagrams;
        let sent = self.xsk.send_parts(
            datagrams
                .iter()
                .map(|(h, i)| (&h[..], batch.packet(usize::from(*i)))),
        );
        TxOutcome {
            sent,
            failed: oversized + (ready - sent),
        }
    }

    /// Packets to neighbours not resolved yet go through `raw`, so the kernel resolves them
    /// and sends them once it has (instead of their being refused).
    pub fn with_fallback(mut self, raw: RawIpPort) -> XdpUnderlayPort {
        self.fallback = Some(raw);
        self
    }

    /// Packets sent through the kernel for want of a resolved neighbour, since the last call.
    pub fn take_via_kernel(&mut self) -> u64 {
        std::mem::take(&mut self.via_kernel)
    }

    pub fn xsk(&mut self) -> &mut XskPort {
        &mut self.xsk
    }

    /// Asks for the next hops of `peers` now, so the first packet to each finds its MAC
    /// (the kernel would queue a few packets while resolving; this port refuses them).
    pub fn prime(&mut self, peers: impl IntoIterator<Item = Ipv4Addr>) {
        let now = Instant::now();
        self.neighbours.tick(now);
        for ip in peers {
            let _ = self.neighbours.lookup(ip, now);
        }
    }

    /// Packets from the wire to the node's address (not underlay datagrams) received since
    /// the last call.
    pub fn take_wire(&mut self) -> u64 {
        std::mem::take(&mut self.wire)
    }

    /// Frames refused on receive since the last call.
    pub fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.refused)
    }
}

impl RxPort for XdpUnderlayPort {
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        let n = self.xsk.rx_batch(batch)?;
        for i in 0..n {
            let (slot, meta) = batch.slot_mut(i);
            let frame = &slot[meta.start..meta.start + meta.len];
            let arrival = match udp_payload(frame, self.local_ip, self.port) {
                Ok((range, peer)) => Ok((range, peer, false)),
                Err(Refused::NotForUs) => wire_packet(frame, self.local_ip)
                    .map(|(range, src)| (range, SocketAddrV4::new(src, 0), true)),
                Err(e) => Err(e),
            };
            match arrival {
                Ok((range, peer, wire)) => {
                    meta.start += range.start;
                    meta.len = range.len();
                    meta.peer = peer;
                    meta.wire = wire;
                    self.wire += u64::from(wire);
                }
                Err(_) => {
                    self.refused += 1;
                    meta.len = 0;
                }
            }
        }
        Ok(n)
    }
}

impl TxPort for XdpUnderlayPort {
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        self.framed.clear();
        self.unresolved.clear();
        // One clock read per batch, not per packet.
        let now = Instant::now();
        self.neighbours.tick(now);
        let mut malformed = 0;
        for &i in indices {
            let pkt = batch.packet(usize::from(i));
            let Some(dst) = pkt
                .get(16..20)
                .map(|d| Ipv4Addr::new(d[0], d[1], d[2], d[3]))
            else {
                malformed += 1;
                continue;
            };
            let Some(mac) = self.neighbours.lookup(dst, now) else {
                self.unresolved.push(i);
                continue;
            };
            self.framed
                .push((ipv4_ethernet_header(mac, self.local_mac), i));
        }
        let ready = self.framed.len();
        let framed = &self.framed;
        let sent = self.xsk.send_parts(
            framed
                .iter()
                .map(|(h, i)| (&h[..], batch.packet(usize::from(*i)))),
        );
        let mut out = TxOutcome {
            sent,
            failed: malformed + (ready - sent),
        };
        match self.fallback.as_mut() {
            Some(raw) if !self.unresolved.is_empty() => {
                let via = raw.tx_batch(batch, &self.unresolved);
                self.via_kernel += via.sent as u64;
                out.sent += via.sent;
                out.failed += via.failed;
            }
            _ => out.failed += self.unresolved.len(),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        let total = 20 + 8 + payload.len();
        let mut ip = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ];
        ip.extend_from_slice(&[10, 99, 0, 2]);
        ip.extend_from_slice(&dst.octets());
        let mut p = ipv4::Packet::new_unchecked(&mut ip[..]);
        p.fill_checksum();
        out.extend_from_slice(&ip);
        let ulen = (8 + payload.len()) as u16;
        out.extend_from_slice(&5555u16.to_be_bytes());
        out.extend_from_slice(&dport.to_be_bytes());
        out.extend_from_slice(&ulen.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_datagram_to_us_yields_its_payload_and_sender() {
        let me = Ipv4Addr::new(10, 99, 0, 1);
        let f = frame(me, 8472, b"vxlan!");
        let (range, peer) = udp_payload(&f, me, 8472).unwrap();
        assert_eq!(&f[range], b"vxlan!");
        assert_eq!(peer, SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 2), 5555));
    }

    #[test]
    fn tcp_udp_and_icmp_to_us_are_wire_packets_and_the_rest_is_refused() {
        let me = Ipv4Addr::new(10, 99, 0, 1);
        let mut f = frame(me, 30080, b"syn?");
        let (range, src) = wire_packet(&f, me).unwrap();
        assert_eq!(range, ETH..f.len());
        assert_eq!(src, Ipv4Addr::new(10, 99, 0, 2));
        // Not a datagram of the underlay's port: the underlay refuses it as not ours.
        assert_eq!(udp_payload(&f, me, 8472), Err(Refused::NotForUs));
        assert_eq!(
            wire_packet(&frame(Ipv4Addr::new(10, 99, 0, 9), 30080, b"x"), me),
            Err(Refused::NotForUs)
        );
        f[14 + 9] = 47; // GRE
        let mut p = ipv4::Packet::new_unchecked(&mut f[14..]);
        p.fill_checksum();
        assert_eq!(wire_packet(&f, me), Err(Refused::NotForUs));
        let good = frame(me, 30080, b"x");
        for cut in 0..good.len() - 1 {
            assert!(wire_packet(&good[..cut], me).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn frames_the_udp_socket_would_not_see_are_refused() {
        let me = Ipv4Addr::new(10, 99, 0, 1);
        let good = frame(me, 8472, b"x");
        assert_eq!(
            udp_payload(&frame(Ipv4Addr::new(10, 99, 0, 9), 8472, b"x"), me, 8472),
            Err(Refused::NotForUs)
        );
        assert_eq!(
            udp_payload(&frame(me, 9999, b"x"), me, 8472),
            Err(Refused::NotForUs)
        );
        let mut bad_sum = good.clone();
        bad_sum[24] ^= 1;
        assert_eq!(udp_payload(&bad_sum, me, 8472), Err(Refused::BadIpHeader));
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(udp_payload(&arp, me, 8472), Err(Refused::NotIpv4));
        for cut in 0..good.len() - 1 {
            assert!(udp_payload(&good[..cut], me, 8472).is_err(), "cut at {cut}");
        }
        let mut frag = good.clone();
        frag[20] |= 0x20; // more fragments
        let mut p = ipv4::Packet::new_unchecked(&mut frag[14..]);
        p.fill_checksum();
        assert_eq!(udp_payload(&frag, me, 8472), Err(Refused::Fragment));
        let mut bad_udp_sum = good.clone();
        let n = bad_udp_sum.len();
        bad_udp_sum[n - 3] = 0x12; // a checksum that does not match
        assert_eq!(udp_payload(&bad_udp_sum, me, 8472), Err(Refused::BadUdp));
    }
}
