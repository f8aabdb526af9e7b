//! The subnet map: which node holds the lease for an inner destination.
//!
//! flannel gives every node one lease of the same length (`SubnetLen`) inside the cluster
//! `Network`, so a destination's lease is found by masking it to `SubnetLen` and one hash lookup:
//! O(1) in the number of nodes (flannel's udp proxy scans a list). The map is immutable once
//! built; the control thread builds a new one and swaps it into the workers.

use crate::wire::vxlan::Vni;
use crate::wire::MacAddr;
use core::fmt;
use core::net::Ipv4Addr;
use core::str::FromStr;
use rustc_hash::{FxHashMap, FxHashSet};

/// An IPv4 prefix whose host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

/// Why a string or value is not an IPv4 prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("{0:?} is not an IPv4 prefix (want a.b.c.d/len)")]
    Syntax(String),
    #[error("prefix length {0} is longer than 32")]
    PrefixLen(u8),
    #[error("{0} has host bits set")]
    HostBits(String),
}

impl Ipv4Net {
    /// A prefix; the address must have no host bits set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Ipv4Net, NetError> {
        if prefix > 32 {
            return Err(NetError::PrefixLen(prefix));
        }
        let net = Ipv4Net { addr, prefix };
        if addr.to_bits() & !net.mask() != 0 {
            return Err(NetError::HostBits(format!("{addr}/{prefix}")));
        }
        Ok(net)
    }

    /// The prefix of `prefix` bits containing `addr` (host bits cleared).
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Ipv4Net {
        let prefix = prefix.min(32);
        let mask = mask_of(prefix);
        Ipv4Net {
            addr: Ipv4Addr::from_bits(addr.to_bits() & mask),
            prefix,
        }
    }

    fn from_parts(addr: &str, len: &str, whole: &str) -> Result<Ipv4Net, NetError> {
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| NetError::Syntax(whole.to_string()))?;
        let prefix: u8 = len
            .parse()
            .map_err(|_| NetError::Syntax(whole.to_string()))?;
        Ipv4Net::new(addr, prefix)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    pub fn mask(&self) -> u32 {
        mask_of(self.prefix)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & self.mask() == self.addr.to_bits()
    }
    /// True if `other` lies entirely inside `self`.
    pub fn covers(&self, other: &Ipv4Net) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
    /// The n-th address of the prefix (`.0` is 0, the gateway `.1` is 1).
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.addr.to_bits().wrapping_add(n))
    }
    /// The number of addresses in the prefix, as u64 (a /0 has 2^32).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
}

fn mask_of(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| NetError::Syntax(s.to_string()))?;
        Self::from_parts(a, l, s)
    }
}

/// How a node wants to be reached, from its lease's `BackendType`/`BackendData`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// flannel's udp backend (also a lease without `BackendType`).
    Udp,
    /// VXLAN with the node's VTEP MAC.
    Vxlan { vni: Vni, vtep_mac: MacAddr },
    /// Any other backend (host-gw, wireguard, ...): known, but not reachable by us.
    Other,
}

/// A node as its lease describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub backend: Backend,
}

/// Why a lease cannot go into the map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("lease {subnet} is outside the cluster network {network}")]
    OutsideNetwork { subnet: Ipv4Net, network: Ipv4Net },
    #[error("lease {subnet} is not a /{subnet_len} like every lease of this network")]
    WrongLength { subnet: Ipv4Net, subnet_len: u8 },
    #[error("SubnetLen {subnet_len} is shorter than the network {network}")]
    SubnetLen { network: Ipv4Net, subnet_len: u8 },
}

/// Lease subnet -> node, for one cluster network. Immutable once built.
#[derive(Debug, Clone)]
pub struct SubnetMap {
    network: Ipv4Net,
    subnet_len: u8,
    subnet_mask: u32,
    by_subnet: FxHashMap<u32, Node>,
    public_ips: FxHashSet<Ipv4Addr>,
}

impl SubnetMap {
    /// An empty map for `network`, whose leases are all `/subnet_len`.
    pub fn new(network: Ipv4Net, subnet_len: u8) -> Result<SubnetMap, MapError> {
        if subnet_len < network.prefix() || subnet_len > 32 {
            return Err(MapError::SubnetLen {
                network,
                subnet_len,
            });
        }
        Ok(SubnetMap {
            network,
            subnet_len,
            subnet_mask: mask_of(subnet_len),
            by_subnet: FxHashMap::default(),
            public_ips: FxHashSet::default(),
        })
    }

    /// Adds or replaces the node holding `node.subnet`.
    pub fn insert(&mut self, node: Node) -> Result<(), MapError> {
        if !self.network.covers(&node.subnet) {
            return Err(MapError::OutsideNetwork {
                subnet: node.subnet,
                network: self.network,
            });
        }
        if node.subnet.prefix() != self.subnet_len {
            return Err(MapError::WrongLength {
                subnet: node.subnet,
                subnet_len: self.subnet_len,
            });
        }
        if let Some(old) = self.by_subnet.insert(node.subnet.addr().to_bits(), node) {
            self.rebuild_public_ips_without(old.public_ip);
        }
        self.public_ips.insert(node.public_ip);
        Ok(())
    }

    fn rebuild_public_ips_without(&mut self, ip: Ipv4Addr) {
        if !self.by_subnet.values().any(|n| n.public_ip == ip) {
            self.public_ips.remove(&ip);
        }
    }

    /// The node whose lease contains `dst`: one mask and one hash lookup.
    #[inline]
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<&Node> {
        if !self.network.contains(dst) {
            return None;
        }
        self.by_subnet.get(&(dst.to_bits() & self.subnet_mask))
    }

    /// True if some lease names `ip` as its PublicIP (a packet from it comes from a cluster node).
    #[inline]
    pub fn is_node(&self, ip: Ipv4Addr) -> bool {
        self.public_ips.contains(&ip)
    }

    pub fn network(&self) -> Ipv4Net {
        self.network
    }
    pub fn subnet_len(&self) -> u8 {
        self.subnet_len
    }
    pub fn len(&self) -> usize {
        self.by_subnet.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_subnet.is_empty()
    }
    /// All nodes, in no particular order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.by_subnet.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn node(subnet: &str, public: &str) -> Node {
        Node {
            subnet: subnet.parse().unwrap(),
            public_ip: ip(public),
            backend: Backend::Udp,
        }
    }

    fn map() -> SubnetMap {
        let mut m = SubnetMap::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        m.insert(node("10.244.1.0/24", "192.168.0.1")).unwrap();
        m.insert(node("10.244.2.0/24", "192.168.0.2")).unwrap();
        m
    }

    #[test]
    fn test_net_parse_and_display() {
        let n: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        assert_eq!(n.to_string(), "10.244.0.0/16");
        assert!(matches!(
            "10.244.1.1/24".parse::<Ipv4Net>(),
            Err(NetError::HostBits(_))
        ));
        assert!(matches!(
            "10.244.1.0/33".parse::<Ipv4Net>(),
            Err(NetError::PrefixLen(33))
        ));
        assert!(matches!(
            "10.244.1.0".parse::<Ipv4Net>(),
            Err(NetError::Syntax(_))
        ));
        assert_eq!(
            Ipv4Net::containing(ip("10.244.1.77"), 24).to_string(),
            "10.244.1.0/24"
        );
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().size(), 1 << 32);
        assert_eq!(n.nth(257), ip("10.244.1.1"));
    }

    #[test]
    fn test_lookup() {
        let m = map();
        assert_eq!(
            m.lookup(ip("10.244.1.77")).unwrap().public_ip,
            ip("192.168.0.1")
        );
        assert_eq!(
            m.lookup(ip("10.244.2.255")).unwrap().public_ip,
            ip("192.168.0.2")
        );
        assert!(m.lookup(ip("10.244.3.1")).is_none());
        assert!(m.lookup(ip("10.245.1.1")).is_none());
        assert!(m.is_node(ip("192.168.0.1")));
        assert!(!m.is_node(ip("192.168.0.3")));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn test_replace_updates_public_ips() {
        let mut m = map();
        m.insert(node("10.244.2.0/24", "192.168.0.9")).unwrap();
        assert!(!m.is_node(ip("192.168.0.2")));
        assert!(m.is_node(ip("192.168.0.9")));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn test_rejects_foreign_leases() {
        let mut m = map();
        assert!(matches!(
            m.insert(node("10.245.1.0/24", "1.1.1.1")),
            Err(MapError::OutsideNetwork { .. })
        ));
        assert!(matches!(
            m.insert(node("10.244.4.0/25", "1.1.1.1")),
            Err(MapError::WrongLength { .. })
        ));
        assert!(SubnetMap::new("10.244.0.0/16".parse().unwrap(), 8).is_err());
    }

    #[test]
    fn test_lookup_scales_to_many_leases() {
        let mut m = SubnetMap::new("10.0.0.0/8".parse().unwrap(), 24).unwrap();
        for i in 0..65536u32 {
            let subnet = Ipv4Net::new(Ipv4Addr::from_bits(0x0a00_0000 | (i << 8)), 24).unwrap();
            m.insert(Node {
                subnet,
                public_ip: Ipv4Addr::from_bits(0xc0a8_0000 + i),
                backend: Backend::Udp,
            })
            .unwrap();
        }
        assert_eq!(
            m.lookup(ip("10.255.255.9")).unwrap().public_ip,
            Ipv4Addr::from_bits(0xc0a8_0000 + 65535)
        );
    }
}
