//! What the pipeline decided for a packet, and why a packet was dropped: a leaf module every
//! layer (batch, bridge, stats, pipeline, ports, worker) may import without a cycle.
//!
//! The drop reasons are listed once, in [`drop_reasons!`]'s invocation below: the enum, its
//! metrics names ([`DropReason::as_str`]), [`DropReason::from_name`], [`DropReason::ALL`] and
//! [`DropReason::COUNT`] are all generated from that one list.

use core::net::{Ipv4Addr, SocketAddrV4};

/// Generates [`DropReason`] from one list of `Variant => "metrics_name"` entries.
macro_rules! drop_reasons {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)+) => {
        /// Why a packet was not forwarded. The names are the metrics labels.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DropReason {
            $($(#[$doc])* $variant,)+
        }

        impl DropReason {
            /// Every reason, in declaration order (the order of the metrics and of the stats
            /// arrays indexed by `reason as usize`).
            pub const ALL: [DropReason; DropReason::COUNT] = [$(DropReason::$variant,)+];
            /// How many reasons there are.
            pub const COUNT: usize = [$(stringify!($variant),)+].len();

            /// The metrics label.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(DropReason::$variant => $name,)+
                }
            }

            /// The reason whose metrics label is `name`.
            pub fn from_name(name: &str) -> Option<DropReason> {
                match name {
                    $($name => Some(DropReason::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

drop_reasons! {
    /// Shorter than its headers, or than a length a header claims.
    Truncated => "truncated",
    /// An IPv4 header with an impossible version, header length or total length.
    BadIpHeader => "bad_ip_header",
    /// An inner IPv4 header whose checksum is wrong.
    BadChecksum => "bad_checksum",
    /// Not IPv4 (IPv6, ARP or garbage) on a path that carries only IPv4.
    NotIpv4 => "not_ipv4",
    /// TTL would reach zero.
    TtlExpired => "ttl_expired",
    /// No lease holds the destination and no ICMP error may be sent for this packet.
    NoRoute => "no_route",
    /// A packet from the TUN for our own lease, a frame from our own VtepMAC, or an underlay
    /// datagram from our own address: it would loop.
    LoopToSelf => "loop_to_self",
    /// An underlay datagram from an address that is no node's PublicIP.
    UnknownPeer => "unknown_peer",
    /// An inner source address outside the sending node's lease.
    SpoofedSource => "spoofed_source",
    /// An inner destination outside this node's lease.
    NotForThisNode => "not_for_this_node",
    /// A VXLAN header without the I flag, or with another flag or reserved bit set.
    BadVxlanHeader => "bad_vxlan_header",
    /// A VXLAN header with a VNI other than ours.
    WrongVni => "wrong_vni",
    /// An inner Ethernet frame not addressed to our VtepMAC.
    WrongDstMac => "wrong_dst_mac",
    /// A datagram or frame larger than the receive buffer.
    Oversized => "oversized",
    /// The device or socket refused the packet on transmit.
    TxError => "tx_error",
    /// Connection tracking calls it INVALID (netfilter's rules): bad TCP flags, a transition
    /// the state table forbids, an out-of-window RST, an answer to no connection.
    CtInvalid => "ct_invalid",
    /// The connection table is full and nothing in reach could be early-dropped.
    CtTableFull => "ct_table_full",
    /// A packet of a service connection whose backend no longer backs the service.
    EndpointGone => "endpoint_gone",
    /// A new connection to a service whose traffic policy is Local, from where no endpoint of
    /// it is on this node though some are elsewhere (kube-proxy's "has no local endpoints").
    NoLocalEndpoints => "no_local_endpoints",
    /// A fragment of a packet to a service (its ports, and so its backend, are unknown).
    Fragmented => "fragment_to_service",
    /// No free source port for a hairpin connection's SNAT.
    SnatPortsExhausted => "snat_ports_exhausted",
    /// An Ethernet frame whose source MAC is multicast or all zeros (L2 mode).
    InvalidSourceMac => "invalid_source_mac",
    /// A frame to an IEEE link-local group (STP, LACP, 802.1X), which bridges never forward
    /// (L2 mode).
    LinkLocal => "link_local",
    /// A frame whose destination sits behind the port it came in by, which is not in hairpin
    /// mode (L2 mode).
    Hairpin => "hairpin",
    /// An ICMP error we would have generated, over the kernel's `icmp_ratelimit` for its
    /// destination or `icmp_msgs_per_sec` for the node.
    IcmpRateLimited => "icmp_rate_limited",
    /// A pod's packet that podwire would masquerade to a destination no masquerade may reach:
    /// the node's own addresses, loopback, link-local, "this network" (0.0.0.0/8), multicast or
    /// broadcast (`--ip-masq` with `--io xdp`).
    MartianDestination => "martian_destination",
}

impl core::fmt::Display for DropReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not processed yet.
    Pending,
    /// flannel udp: the packet's bytes are the payload of one underlay datagram to this peer
    /// node's address and port.
    ToUnderlay(SocketAddrV4),
    /// VXLAN: to the peer node at this address, encapsulated: the pipeline wrote the whole
    /// outer IPv4/UDP/VXLAN/Ethernet headers in front of the inner packet (an underlay that
    /// writes its own outer IPv4 and UDP headers sends what follows them).
    ToUnderlayIp(Ipv4Addr),
    /// Write the packet into the TUN device.
    ToTun,
    /// The packet was replaced by an ICMP error for its sender: write it back into the TUN.
    IcmpToTun,
    /// The TCP segment was replaced by the RST its sender gets (its connection's service
    /// endpoint left): write it back into the TUN.
    ResetToTun,
    /// A whole IPv4 packet from this node's address, or to it translated, for a host outside
    /// the cluster (`--io xdp`: NodePort answers, masqueraded pod traffic): send it on the
    /// node's wire towards this address.
    ToWire(Ipv4Addr),
    /// L2 mode: out of this local bridge port.
    ToPort(PortId),
    /// L2 mode: to the node whose underlay address (and so VTEP) this is, into the tunnel.
    ToPeer(Ipv4Addr),
    /// L2 mode: out of every flooding port but the one it came in by, and to every VTEP when
    /// it came from a local port (the bridge's `flood_ports` and `floods_to_tunnel`).
    Flood,
    /// Count and forget.
    Drop(DropReason),
}

/// A bridge port, by index. [`crate::bridge::TUNNEL`] is the VXLAN port that every remote
/// VTEP sits behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "ALL is in declaration order");
            assert!(seen.insert(r.as_str()), "{} twice", r.as_str());
            assert_eq!(DropReason::from_name(r.as_str()), Some(*r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(DropReason::COUNT, seen.len());
        assert_eq!(DropReason::from_name("no_such_reason"), None);
    }
}
