//! Links, addresses, routes and policy rules through rtnetlink, in-process: what node setup
//! used to ask iproute2's `ip` for. Messages are built and parsed by `netlink-packet-route`
//! (rust-netlink); the socket is a blocking `netlink-sys` one, used on the calling thread, so
//! the kernel checks that thread's capabilities (setup and teardown run on the main thread,
//! which keeps `CAP_NET_ADMIN`: see [`crate::privs`]).
//!
//! [`in_netns`] runs a closure on a thread that has joined another network namespace (a pod's
//! for `podwire ctl attach`), with a socket opened there.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use podwire_dataplane::route::Ipv4Net;
use podwire_dataplane::wire::MacAddr;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;

/// What a netlink request ran into.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: cannot parse the kernel's answer: {detail}")]
    Decode { what: String, detail: String },
    #[error("no device {0:?}")]
    NoDevice(String),
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
}

impl RtnlError {
    /// The errno the kernel answered with, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A route `ip route` would show as `[TYPE] DST [via GW] [dev DEV] [table T] [proto P]
/// [scope S] [onlink]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub via: Option<Ipv4Addr>,
    pub dev: Option<u32>,
    /// The routing table (254: main).
    pub table: u32,
    pub protocol: u8,
    pub scope: RouteScope,
    pub kind: RouteType,
    pub onlink: bool,
}

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;
/// `proto boot`, what `ip route add` gives a route by default.
pub const PROTO_BOOT: u8 = 3;

impl Route {
    /// `DST dev DEV` in the main table, as `ip route replace` adds it.
    pub fn dev(dst: Ipv4Net, dev: u32) -> Route {
        Route {
            dst,
            via: None,
            dev: Some(dev),
            table: MAIN_TABLE,
            protocol: PROTO_BOOT,
            scope: RouteScope::Link,
            kind: RouteType::Unicast,
            onlink: false,
        }
    }

    fn message(&self) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = self.dst.prefix();
        m.header.table = u8::try_from(self.table).unwrap_or(0);
        m.header.protocol = RouteProtocol::from(self.protocol);
        m.header.scope = self.scope;
        m.header.kind = self.kind;
        if self.onlink {
            m.header.flags = RouteFlags::Onlink;
        }
        m.attributes.push(RouteAttribute::Table(self.table));
        if self.dst.prefix() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(
                    self.dst.addr(),
                )));
        }
        if let Some(gw) = self.via {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        if let Some(dev) = self.dev {
            m.attributes.push(RouteAttribute::Oif(dev));
        }
        m
    }
}

/// Changes to a link, as `ip link set` makes them.
#[derive(Debug, Clone, Default)]
pub struct LinkChange {
    pub mtu: Option<u32>,
    pub txqueuelen: Option<u32>,
    pub address: Option<MacAddr>,
    pub name: Option<String>,
    pub up: bool,
}

/// A blocking rtnetlink socket.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Rtnl, RtnlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        socket.bind_auto().map_err(RtnlError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(RtnlError::Socket)?;
        // Errors name the attribute the kernel refused, where it can.
        let _ = socket.set_ext_ack(true);
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends `msg` with `flags` and collects the answers until the ACK (or the dump's end).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(RtnlError::Socket)?;
        let mut answers = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(RtnlError::Socket)?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| RtnlError::Decode {
                        what: what(),
                        detail: e.to_string(),
                    })?;
                let len = reply.header.length as usize;
                offset += if len == 0 {
                    data.len()
                } else {
                    len.next_multiple_of(4)
                };
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(answers),
                        Some(code) => {
                            return Err(RtnlError::Kernel {
                                what: what(),
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            })
                        }
                    },
                    NetlinkPayload::InnerMessage(m) => {
                        answers.push(m);
                        if flags & NLM_F_DUMP != NLM_F_DUMP {
                            // A single answer (a get) comes without an ACK of its own.
                            if flags & NLM_F_ACK == 0 {
                                return Ok(answers);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// The index of device `name`, if there is one.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, RtnlError> {
        Ok(self.link(name)?.map(|l| l.header.index))
    }

    /// The index of device `name`; an error if there is none.
    pub fn index_of(&mut self, name: &str) -> Result<u32, RtnlError> {
        self.link_index(name)?
            .ok_or_else(|| RtnlError::NoDevice(name.to_string()))
    }

    /// Device `name`'s link message, if there is one.
    pub fn link(&mut self, name: &str) -> Result<Option<LinkMessage>, RtnlError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(m), 0, &|| {
            format!("reading device {name}")
        }) {
            Ok(mut v) => Ok(v.pop().and_then(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if e.errno() == Some(nix::errno::Errno::ENODEV as i32) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The kind of device `name` (`vxlan`, `tun`, `veth`, ...; None for a plain device or
    /// none at all).
    pub fn link_kind(&mut self, name: &str) -> Result<Option<InfoKind>, RtnlError> {
        let Some(link) = self.link(name)? else {
            return Ok(None);
        };
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(k.clone()),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// Applies `change` to device `name` (`ip link set dev NAME ...`).
    pub fn link_set(&mut self, name: &str, change: &LinkChange) -> Result<(), RtnlError> {
        let mut m = LinkMessage::default();
        m.header.index = self.index_of(name)?;
        if change.up {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        }
        if let Some(mtu) = change.mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(q) = change.txqueuelen {
            m.attributes.push(LinkAttribute::TxQueueLen(q));
        }
        if let Some(mac) = change.address {
            m.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        if let Some(new) = &change.name {
            m.attributes.push(LinkAttribute::IfName(new.clone()));
        }
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK, &|| {
            format!("setting {change:?} on {name}")
        })
        .map(drop)
    }

    /// Moves device `name` into the network namespace `ns` (an open /run/netns file).
    pub fn link_to_netns(&mut self, name: &str, ns: &impl AsFd) -> Result<(), RtnlError> {
        use std::os::fd::AsRawFd;
        let mut m = LinkMessage::default();
        m.header.index = self.index_of(name)?;
        m.attributes
            .push(LinkAttribute::NetNsFd(ns.as_fd().as_raw_fd()));
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK, &|| {
            format!("moving {name} to another network namespace")
        })
        .map(drop)
    }

    /// Sends a prepared link change.
    pub fn set_link(&mut self, m: LinkMessage) -> Result<(), RtnlError> {
        let index = m.header.index;
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK, &|| {
            format!("changing device {index}")
        })
        .map(drop)
    }

    /// Takes a netlink-attached XDP program off device `index`, attached in `mode` (1 driver,
    /// 2 generic, 3 offloaded), as `ip link set dev X xdp off` does.
    pub fn xdp_off(&mut self, index: u32, mode: u8) -> Result<(), RtnlError> {
        // XDP_FLAGS_DRV_MODE, _HW_MODE, _SKB_MODE.
        let flags = match mode {
            1 => 1 << 2,
            3 => 1 << 3,
            _ => 1 << 1,
        };
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Xdp(vec![
            LinkXdp::Fd(-1),
            LinkXdp::Flags(flags),
        ]));
        self.set_link(m)
    }

    /// Deletes device `name` (`ip link del`).
    pub fn link_del(&mut self, name: &str) -> Result<(), RtnlError> {
        let mut m = LinkMessage::default();
        m.header.index = self.index_of(name)?;
        self.request(RouteNetlinkMessage::DelLink(m), NLM_F_ACK, &|| {
            format!("deleting device {name}")
        })
        .map(drop)
    }

    /// Creates the veth pair `name`/`peer` (`ip link add NAME type veth peer name PEER`).
    pub fn veth_add(&mut self, name: &str, peer: &str) -> Result<(), RtnlError> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_string()));
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &|| format!("creating veth pair {name}/{peer}"),
        )
        .map(drop)
    }

    /// The MAC address of device `name`.
    pub fn link_mac(&mut self, name: &str) -> Result<MacAddr, RtnlError> {
        let link = self
            .link(name)?
            .ok_or_else(|| RtnlError::NoDevice(name.to_string()))?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
                _ => None,
            })
            .map(MacAddr)
            .ok_or_else(|| RtnlError::Decode {
                what: format!("reading {name}'s MAC address"),
                detail: "no 6-byte address".into(),
            })
    }

    /// Sets `addr/prefix` on device `dev`, replacing it if it is there (`ip addr replace`).
    pub fn addr_replace(&mut self, dev: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), RtnlError> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.index = self.index_of(dev)?;
        m.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr)));
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &|| format!("setting address {addr}/{prefix} on {dev}"),
        )
        .map(drop)
    }

    /// Adds or replaces `route` (`ip route replace`).
    pub fn route_replace(&mut self, route: &Route) -> Result<(), RtnlError> {
        self.request(
            RouteNetlinkMessage::NewRoute(route.message()),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &|| format!("installing route {route:?}"),
        )
        .map(drop)
    }

    /// Deletes `route` (`ip route del`).
    pub fn route_del(&mut self, route: &Route) -> Result<(), RtnlError> {
        let mut m = route.message();
        // Deleting matches on what is given: any protocol and scope.
        m.header.protocol = RouteProtocol::Unspec;
        m.header.scope = RouteScope::NoWhere;
        self.request(RouteNetlinkMessage::DelRoute(m), NLM_F_ACK, &|| {
            format!("deleting route {route:?}")
        })
        .map(drop)
    }

    /// The IPv4 routes of `table`, as `ip route show table T` lists them.
    pub fn routes(&mut self, table: u32) -> Result<Vec<Route>, RtnlError> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        let answers = self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP, &|| {
            "listing routes".to_string()
        })?;
        Ok(answers
            .into_iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewRoute(r) => parse_route(&r),
                _ => None,
            })
            .filter(|r| r.table == table)
            .collect())
    }

    /// Adds the rule `priority P from SRC ipproto PROTO lookup TABLE` (`ip rule add`).
    pub fn rule_add(
        &mut self,
        priority: u32,
        from: Ipv4Net,
        proto: IpProtocol,
        table: u32,
    ) -> Result<(), RtnlError> {
        let m = rule_message(priority, Some((from, proto)), table);
        self.request(
            RouteNetlinkMessage::NewRule(m),
            NLM_F_ACK | NLM_F_CREATE,
            &|| format!("adding rule {priority} from {from} {proto:?} lookup {table}"),
        )
        .map(drop)
    }

    /// Deletes one rule of `priority` that looks up `table` (`ip rule del priority P table T`).
    pub fn rule_del(&mut self, priority: u32, table: u32) -> Result<(), RtnlError> {
        let m = rule_message(priority, None, table);
        self.request(RouteNetlinkMessage::DelRule(m), NLM_F_ACK, &|| {
            format!("deleting rule {priority} lookup {table}")
        })
        .map(drop)
    }
}

fn rule_message(priority: u32, from: Option<(Ipv4Net, IpProtocol)>, table: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.action = RuleAction::ToTable;
    m.header.table = u8::try_from(table).unwrap_or(0);
    m.attributes.push(RuleAttribute::Priority(priority));
    m.attributes.push(RuleAttribute::Table(table));
    if let Some((src, proto)) = from {
        m.header.src_len = src.prefix();
        m.attributes
            .push(RuleAttribute::Source(IpAddr::V4(src.addr())));
        m.attributes.push(RuleAttribute::IpProtocol(proto));
    }
    m
}

fn parse_route(r: &RouteMessage) -> Option<Route> {
    let mut route = Route {
        dst: Ipv4Net::containing(Ipv4Addr::UNSPECIFIED, 0),
        via: None,
        dev: None,
        table: u32::from(r.header.table),
        protocol: u8::from(r.header.protocol),
        scope: r.header.scope,
        kind: r.header.kind,
        onlink: r.header.flags.contains(RouteFlags::Onlink),
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                route.dst = Ipv4Net::new(*d, r.header.destination_prefix_length).ok()?;
            }
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.via = Some(*g),
            RouteAttribute::Oif(i) => route.dev = Some(*i),
            RouteAttribute::Table(t) => route.table = *t,
            _ => {}
        }
    }
    Some(route)
}

/// Runs `f` with a netlink socket in the network namespace `netns` (a name under /run/netns),
/// on a thread of its own that joins the namespace: the calling thread stays where it is.
pub fn in_netns<T: Send>(
    netns: &str,
    f: impl FnOnce(&mut Rtnl) -> Result<T, RtnlError> + Send,
) -> Result<T, RtnlError> {
    let path = format!("/run/netns/{netns}");
    let ns_err = |source| RtnlError::Netns {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(ns_err)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| ns_err(e.into()))?;
            let mut rtnl = Rtnl::open()?;
            f(&mut rtnl)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_route_message_carries_what_ip_route_gives() {
        let r = Route {
            via: Some(Ipv4Addr::new(192, 168, 0, 2)),
            protocol: 112,
            onlink: true,
            ..Route::dev("10.244.2.0/24".parse().unwrap(), 7)
        };
        let m = r.message();
        assert_eq!(m.header.destination_prefix_length, 24);
        assert_eq!(u8::from(m.header.protocol), 112);
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(parse_route(&m), Some(r));
    }
}
