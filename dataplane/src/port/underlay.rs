//! The underlay as one port: the worker's UDP socket (GSO and GRO), a raw IP socket, an AF_XDP
//! socket on the uplink and the per-flow source-port sockets, behind the three sends the
//! pipeline's verdicts ask for.
//!
//! - [`Underlay::send_datagrams`]: payloads (flannel-udp, or VXLAN onwards) each to the peer in
//!   its metadata, from our port: runs to one peer go out as one GSO send.
//! - [`Underlay::send_replicas`]: the same, with packets paired with peers, a packet possibly
//!   with several (head-end replication of a flood).
//! - [`Underlay::send_encapsulated`]: packets with the outer IPv4 and UDP headers the pipeline
//!   wrote (VXLAN with a source port per flow): as they are through the raw or AF_XDP socket;
//!   through the UDP sockets, the outer headers are read through the wire views, taken off,
//!   and the payload leaves from the socket the outer source port picks.
//!
//! Which device carries what is decided here once, from what the node set up; the pipeline's
//! verdicts never name one.

use crate::batch::{Batch, MAX_BATCH};
use crate::port::raw::RawIpPort;
use crate::port::udp::{PeerSocket, UdpPort};
use crate::port::xdp::underlay::XdpUnderlayPort;
use crate::port::xdp::xsk::XskActivity;
use crate::port::{PortError, RxPort, TxOutcome, TxPort};
use crate::wire::{ipv4, udp};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

/// Most source-port sockets VXLAN leaves through.
pub const MAX_FLOW_SOCKETS: usize = 16;

/// The devices one worker reaches the other nodes through.
pub struct Underlay {
    /// Bound to our port: receives everything the kernel delivers, sends flannel-udp and
    /// (without flow sockets) VXLAN from our port.
    socket: UdpPort,
    /// Sends packets with the outer headers the pipeline wrote, so each flow keeps its own
    /// source port.
    raw: Option<RawIpPort>,
    /// `--io xdp`: receives what the XDP program steers to this queue, and sends what `raw`
    /// would, with Ethernet in front; `socket` still receives what the program passes.
    xdp: Option<XdpUnderlayPort>,
    /// Sockets on other source ports that VXLAN leaves through, with GSO, a flow on one of
    /// them by its outer source port (so flows still spread over paths and a receiver's
    /// queues). Empty: VXLAN leaves from `socket`.
    flow_sockets: Vec<UdpPort>,
    /// Send scratch: per flow socket, the packets leaving through it.
    by_flow_socket: Box<[[u16; MAX_BATCH]; MAX_FLOW_SOCKETS]>,
    n_by_flow_socket: [usize; MAX_FLOW_SOCKETS],
    /// Send scratch: packets whose outer headers were taken off, for `socket`.
    stripped: [u16; MAX_BATCH],
}

impl Underlay {
    /// The underlay of a worker; at most [`MAX_FLOW_SOCKETS`] flow sockets are used.
    pub fn new(
        socket: UdpPort,
        raw: Option<RawIpPort>,
        xdp: Option<XdpUnderlayPort>,
        mut flow_sockets: Vec<UdpPort>,
    ) -> Underlay {
        flow_sockets.truncate(MAX_FLOW_SOCKETS);
        Underlay {
            socket,
            raw,
            xdp,
            flow_sockets,
            by_flow_socket: Box::new([[0; MAX_BATCH]; MAX_FLOW_SOCKETS]),
            n_by_flow_socket: [0; MAX_FLOW_SOCKETS],
            stripped: [0; MAX_BATCH],
        }
    }

    /// The socket on our port (peer queues are connected from it; its errors and drops are
    /// read from it).
    pub fn socket(&mut self) -> &mut UdpPort {
        &mut self.socket
    }

    /// The AF_XDP socket, with `--io xdp` on this worker's queue.
    pub fn xdp(&mut self) -> Option<&mut XdpUnderlayPort> {
        self.xdp.as_mut()
    }

    /// The descriptors to wait on: the socket's, and the AF_XDP socket's if any.
    pub fn raw_fds(&mut self) -> (RawFd, Option<RawFd>) {
        let xdp = self.xdp.as_mut().map(|x| x.xsk().raw_fd());
        (self.socket.raw_fd(), xdp)
    }

    /// Reads a batch from the socket on our port.
    pub fn rx_socket(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        self.socket.rx_batch(batch)
    }

    /// Reads a batch from a peer's own queue.
    pub fn rx_peer(&mut self, peer: &PeerSocket, batch: &mut Batch) -> Result<usize, PortError> {
        self.socket.rx_batch_from(peer, batch)
    }

    /// Reads a batch from the AF_XDP socket (nothing without one): the frames read, and how
    /// many of them were packets to the node rather than underlay datagrams. Like every
    /// receive, it replaces the batch's contents, so an empty read leaves an empty batch.
    pub fn rx_xdp(&mut self, batch: &mut Batch) -> Result<(usize, u64), PortError> {
        match self.xdp.as_mut() {
            Some(x) => {
                let n = x.rx_batch(batch)?;
                Ok((n, x.take_wire()))
            }
            None => {
                batch.clear();
                Ok((0, 0))
            }
        }
    }

    /// Kicks the AF_XDP socket to send what the kernel still holds (copy mode sends a budget
    /// per kick); returns the frames still in flight.
    pub fn flush(&mut self) -> usize {
        self.xdp.as_mut().map_or(0, |x| x.xsk().flush())
    }

    /// What the AF_XDP socket did since the last call (frames moved, wakeups taken).
    pub fn take_activity(&mut self) -> XskActivity {
        self.xdp
            .as_mut()
            .map_or_else(XskActivity::default, |x| x.xsk().take_activity())
    }

    /// Asks for the next hops of `peers` now, so the first frame to each finds its MAC.
    pub fn prime(&mut self, peers: impl IntoIterator<Item = Ipv4Addr>) {
        if let Some(x) = self.xdp.as_mut() {
            x.prime(peers);
        }
    }

    /// Datagrams sent through the kernel for want of a resolved next hop, since the last call.
    pub fn take_via_kernel(&mut self) -> u64 {
        self.xdp.as_mut().map_or(0, |x| x.take_via_kernel())
    }

    /// The packets at `indices`, each the payload of a datagram to its metadata's peer.
    pub fn send_datagrams(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        match self.xdp.as_mut() {
            Some(xdp) => {
                let items = indices
                    .iter()
                    .map(|&i| (i, batch.meta(usize::from(i)).peer));
                // Those to a next hop not resolved yet leave through the socket, so the
                // kernel resolves it.
                xdp.send_datagrams(batch, items, &mut self.socket)
            }
            None => self.socket.tx_batch(batch, indices),
        }
    }

    /// Each item's packet as the payload of a datagram to the item's peer (a packet may be
    /// listed for several).
    pub fn send_replicas(&mut self, batch: &Batch, items: &[(u16, SocketAddrV4)]) -> TxOutcome {
        match self.xdp.as_mut() {
            Some(xdp) => xdp.send_datagrams(batch, items.iter().copied(), &mut self.socket),
            None => self.socket.tx_to(batch, items),
        }
    }

    /// Whole IPv4 packets to the wire (not datagrams of ours): through the raw or AF_XDP
    /// socket; refused where the node has neither.
    pub fn send_ip(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        match (self.xdp.as_mut(), self.raw.as_mut()) {
            (Some(xdp), _) => xdp.tx_batch(batch, indices),
            (None, Some(raw)) => raw.tx_batch(batch, indices),
            (None, None) => TxOutcome {
                sent: 0,
                failed: indices.len(),
            },
        }
    }

    /// Packets with the outer IPv4 and UDP headers the pipeline wrote.
    pub fn send_encapsulated(&mut self, batch: &mut Batch, indices: &[u16]) -> TxOutcome {
        if self.xdp.is_some() || self.raw.is_some() {
            return self.send_ip(batch, indices);
        }
        let mut out = TxOutcome::default();
        let (mut n_stripped, pool) = (0, self.flow_sockets.len());
        self.n_by_flow_socket = [0; MAX_FLOW_SOCKETS];
        for &i in indices {
            let Some(flow_port) = strip_outer_headers(batch, usize::from(i)) else {
                out.failed += 1;
                continue;
            };
            if pool > 0 {
                let s = usize::from(flow_port) % pool;
                self.by_flow_socket[s][self.n_by_flow_socket[s]] = i;
                self.n_by_flow_socket[s] += 1;
            } else {
                self.stripped[n_stripped] = i;
                n_stripped += 1;
            }
        }
        for (s, socket) in self.flow_sockets.iter_mut().enumerate() {
            let n = self.n_by_flow_socket[s];
            if n > 0 {
                add(
                    &mut out,
                    socket.tx_batch(batch, &self.by_flow_socket[s][..n]),
                );
            }
        }
        if n_stripped > 0 {
            add(
                &mut out,
                self.socket.tx_batch(batch, &self.stripped[..n_stripped]),
            );
        }
        out
    }
}

fn add(total: &mut TxOutcome, out: TxOutcome) {
    total.sent += out.sent;
    total.failed += out.failed;
}

/// Takes the outer IPv4 and UDP headers off packet `i`, leaving the datagram's payload with
/// its peer (destination address and port) in the metadata; returns the outer source port.
/// None for a packet whose outer headers do not parse (the pipeline wrote them, so a bug).
fn strip_outer_headers(batch: &mut Batch, i: usize) -> Option<u16> {
    let (slot, meta) = batch.slot_mut(i);
    let outer = slot.get(meta.start..meta.start + meta.len)?;
    let ip = ipv4::Packet::new_checked(outer).ok()?;
    let headers = ip.header_len() + udp::HEADER_LEN;
    let datagram = udp::Packet::new_checked(ip.payload()).ok()?;
    let (src_port, peer) = (
        datagram.src_port(),
        SocketAddrV4::new(ip.dst(), datagram.dst_port()),
    );
    meta.start += headers;
    meta.len -= headers;
    meta.peer = peer;
    Some(src_port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::IpProtocol;

    fn encapsulated(batch: &mut Batch, payload: &[u8], src_port: u16) {
        let len = ipv4::HEADER_LEN + udp::HEADER_LEN + payload.len();
        let mut pkt = vec![0u8; len];
        ipv4::Repr {
            src: Ipv4Addr::new(192, 168, 1, 1),
            dst: Ipv4Addr::new(192, 168, 1, 2),
            protocol: IpProtocol::Udp,
            payload_len: udp::HEADER_LEN + payload.len(),
            ttl: 64,
            dscp_ecn: 0,
            ident: 0,
            dont_frag: false,
        }
        .emit(&mut pkt);
        let (_, l4) = pkt.split_at_mut(ipv4::HEADER_LEN);
        let (hdr, body) = l4.split_at_mut(udp::HEADER_LEN);
        body.copy_from_slice(payload);
        let repr = udp::Repr {
            src_port,
            dst_port: 8472,
            payload_len: payload.len(),
        };
        repr.emit_unchecked(hdr);
        let j = batch.len();
        batch.rx_slot(j)[..len].copy_from_slice(&pkt);
        batch.commit_rx(j, len, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), false);
    }

    #[test]
    fn test_outer_headers_come_off_through_the_views() {
        let mut batch = Batch::new(4, 2048);
        encapsulated(&mut batch, b"vxlan and frame", 40001);
        assert_eq!(strip_outer_headers(&mut batch, 0), Some(40001));
        assert_eq!(batch.packet(0), b"vxlan and frame");
        assert_eq!(
            batch.meta(0).peer,
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 2), 8472)
        );
    }

    #[test]
    fn test_a_packet_whose_outer_headers_do_not_parse_is_refused() {
        let mut batch = Batch::new(4, 2048);
        encapsulated(&mut batch, b"payload", 40001);
        // Cut short: the IPv4 total length claims more than there is.
        batch.slot_mut(0).1.len -= 3;
        assert_eq!(strip_outer_headers(&mut batch, 0), None);
        assert_eq!(
            batch.packet(0).len(),
            ipv4::HEADER_LEN + udp::HEADER_LEN + 4
        );
    }

    /// Without an AF_XDP socket a read empties the batch: what an earlier receive left in it
    /// must not be decided a second time (it was, once: see the lab's decided-once check).
    #[test]
    fn test_a_read_without_an_af_xdp_socket_leaves_an_empty_batch() {
        let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let mut underlay =
            Underlay::new(UdpPort::bind(lo, 16, 1 << 20).unwrap(), None, None, vec![]);
        let mut batch = Batch::new(4, 2048);
        encapsulated(&mut batch, b"read from the socket", 40001);
        assert_eq!(underlay.rx_xdp(&mut batch).unwrap(), (0, 0));
        assert!(batch.is_empty());
    }

    /// Without raw or AF_XDP sockets, encapsulated packets leave from the flow socket their
    /// outer source port picks, without the outer headers.
    #[test]
    fn test_encapsulated_packets_leave_through_the_flow_sockets() {
        use std::net::UdpSocket;
        use std::time::Duration;
        let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let bind = || UdpPort::bind(lo, 16, 1 << 20).unwrap();
        let flows = vec![bind(), bind()];
        let flow_addrs: Vec<_> = flows.iter().map(|s| s.local_addr().unwrap()).collect();
        let mut underlay = Underlay::new(bind(), None, None, flows);
        let receiver = UdpSocket::bind(lo).unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let std::net::SocketAddr::V4(to) = receiver.local_addr().unwrap() else {
            panic!()
        };
        let mut batch = Batch::new(4, 2048);
        for port in [40000u16, 40001] {
            encapsulated(&mut batch, &port.to_be_bytes(), port);
        }
        // The views read the destination the pipeline wrote; point it at the receiver.
        for i in 0..2 {
            let (slot, meta) = batch.slot_mut(i);
            let mut ip = ipv4::Packet::new_checked(&mut slot[meta.start..]).unwrap();
            ip.set_dst(*to.ip());
            let l4 = ip.payload_mut();
            l4[2..4].copy_from_slice(&to.port().to_be_bytes());
        }
        let out = underlay.send_encapsulated(&mut batch, &[0, 1]);
        assert_eq!(out, TxOutcome { sent: 2, failed: 0 });
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            let (n, from) = receiver.recv_from(&mut buf).unwrap();
            let port = u16::from_be_bytes([buf[0], buf[1]]);
            assert_eq!(n, 2);
            let std::net::SocketAddr::V4(from) = from else {
                panic!()
            };
            assert_eq!(from, flow_addrs[usize::from(port) % 2], "flow port {port}");
        }
    }
}
