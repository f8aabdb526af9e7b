//! Host network setup: finding the underlay interface and configuring the TUN device.
//!
//! Addresses, MTU and routes are set through rtnetlink ([`crate::rtnl`]), in-process, once at
//! start-up (never per packet).

use crate::rtnl::{LinkChange, Route, Rtnl, RtnlError};
use podwire_dataplane::route::Ipv4Net;
use std::net::Ipv4Addr;

/// Why host network setup failed.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("no interface {0:?} with an IPv4 address")]
    NoSuchInterface(String),
    #[error("no default route to pick the underlay interface from: pass --iface")]
    NoDefaultRoute,
    #[error("cannot list interfaces: {0}")]
    Ifaddrs(nix::Error),
    #[error("cannot read the MTU of {iface}: {source}")]
    Mtu {
        iface: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netlink(#[from] RtnlError),
    #[error("cannot write {path}: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read the MAC address of {iface}: {detail}")]
    Mac { iface: String, detail: String },
    #[error("{iface} already runs XDP program {name:?} (id {id}), which is not podwire's: detach it first (ip link set dev {iface} xdp off)")]
    ForeignXdp {
        iface: String,
        name: String,
        id: u64,
    },
    #[error("{iface} runs podwire's XDP program (id {id}) held by a live process: is another podwire running on it?")]
    XdpBusy { iface: String, id: u64 },
    #[error("cannot read {iface}'s XDP state: {detail}")]
    XdpState { iface: String, detail: String },
    #[error("XDP on {iface}: {source}")]
    Xdp {
        iface: String,
        source: podwire_dataplane::port::xdp::XdpError,
    },
}

/// Attaches podwire's XDP program to `iface` in `role`, first taking off one that a podwire
/// now gone left there.
pub fn attach_xdp(
    iface: &str,
    role: podwire_dataplane::port::xdp::Role,
) -> Result<podwire_dataplane::port::xdp::XdpProgram, NetdevError> {
    use podwire_dataplane::port::xdp;
    if let Some(id) = remove_stale_xdp(iface, xdp::PROGRAM_NAME)? {
        tracing::warn!(device = %iface, id, "took off podwire's XDP program that a podwire now gone left attached (netlink)");
    }
    let prog = xdp::XdpProgram::attach(iface, role).map_err(|source| NetdevError::Xdp {
        iface: iface.to_string(),
        source,
    })?;
    tracing::info!(device = %iface, mode = ?prog.mode(), ?role, "XDP program attached");
    Ok(prog)
}

/// An XDP program on a device, as rtnetlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedXdp {
    pub id: u32,
    /// 1 driver, 2 generic, 3 offloaded (the kernel's XDP_ATTACHED_*).
    pub mode: u8,
}

/// The XDP program on a link, if one is attached.
pub fn attached_xdp(link: &netlink_packet_route::link::LinkMessage) -> Option<AttachedXdp> {
    use netlink_packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};
    let xdp = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(x) => Some(x),
        _ => None,
    })?;
    let mut found = AttachedXdp { id: 0, mode: 0 };
    for x in xdp {
        match x {
            LinkXdp::ProgId(id) => found.id = *id,
            LinkXdp::Attached(XdpAttached::Driver) => found.mode = 1,
            LinkXdp::Attached(XdpAttached::SocketBuffer) => found.mode = 2,
            LinkXdp::Attached(XdpAttached::Hardware) => found.mode = 3,
            _ => {}
        }
    }
    (found.id != 0).then_some(found)
}

/// The name of loaded BPF program `id` (empty if it cannot be read).
fn program_name(id: u32) -> String {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Removes podwire's XDP program from `iface` if a podwire that is gone left it attached (a
/// netlink attachment, as kernels before 5.9 make, or one made by hand), so that this start
/// can attach its own; returns the removed program's id. A program that is not podwire's
/// (`ours` is its name) is an error, as is podwire's held by a live process (a bpf_link,
/// which netlink cannot detach).
pub fn remove_stale_xdp(iface: &str, ours: &str) -> Result<Option<u32>, NetdevError> {
    let mut rtnl = Rtnl::open()?;
    let link = rtnl.link(iface)?.ok_or_else(|| NetdevError::XdpState {
        iface: iface.to_string(),
        detail: "no such device".into(),
    })?;
    let Some(prog) = attached_xdp(&link) else {
        return Ok(None);
    };
    let name = program_name(prog.id);
    if name != ours {
        return Err(NetdevError::ForeignXdp {
            iface: iface.to_string(),
            name,
            id: u64::from(prog.id),
        });
    }
    rtnl.xdp_off(link.header.index, prog.mode)
        .map_err(|_| NetdevError::XdpBusy {
            iface: iface.to_string(),
            id: u64::from(prog.id),
        })?;
    Ok(Some(prog.id))
}

/// The underlay interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub addr: Ipv4Addr,
    /// The interface's own subnet (address and netmask): the peers it reaches without a gateway.
    pub net: Ipv4Net,
    pub mtu: u32,
}

/// How many receive queues device `name` has (`/sys/class/net/NAME/queues/rx-*`; 1 if that
/// cannot be read).
pub fn rx_queues(name: &str) -> usize {
    std::fs::read_dir(format!("/sys/class/net/{name}/queues"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        })
        .unwrap_or(1)
        .max(1)
}

/// The MAC address of device `name`.
pub fn mac_of(name: &str) -> Result<podwire_dataplane::wire::MacAddr, NetdevError> {
    let path = format!("/sys/class/net/{name}/address");
    let err = |detail: String| NetdevError::Mac {
        iface: name.to_string(),
        detail,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(format!("{path}: {e}")))?;
    text.trim()
        .parse()
        .map_err(|_| err(format!("{path}: {:?}", text.trim())))
}

fn ipv4_addrs() -> Result<Vec<(String, Ipv4Addr, u8)>, NetdevError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(NetdevError::Ifaddrs)?;
    Ok(addrs
        .filter_map(|a| {
            let ip = a.address.as_ref()?.as_sockaddr_in()?.ip();
            let mask = a
                .netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map(|m| m.ip().to_bits());
            Some((
                a.interface_name,
                ip,
                mask.map_or(32, |m| m.count_ones() as u8),
            ))
        })
        .collect())
}

fn default_route_iface() -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    text.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let name = f.next()?;
        (f.next()? == "00000000").then(|| name.to_string())
    })
}

/// Resolves `--iface` (a name or one of its IPv4 addresses; default: the default route's).
pub fn resolve_iface(iface: Option<&str>) -> Result<Iface, NetdevError> {
    let addrs = ipv4_addrs()?;
    let wanted = match iface {
        Some(s) => s.to_string(),
        None => default_route_iface().ok_or(NetdevError::NoDefaultRoute)?,
    };
    let (name, addr, prefix) = match wanted.parse::<Ipv4Addr>() {
        Ok(ip) => addrs.into_iter().find(|(_, a, _)| *a == ip),
        Err(_) => addrs.into_iter().find(|(n, _, _)| *n == wanted),
    }
    .ok_or_else(|| NetdevError::NoSuchInterface(wanted.clone()))?;
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .and_then(|s| {
            s.trim()
                .parse::<u32>()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })
        .map_err(|source| NetdevError::Mtu {
            iface: name.clone(),
            source,
        })?;
    Ok(Iface {
        name,
        addr,
        net: Ipv4Net::containing(addr, prefix),
        mtu,
    })
}

/// The first of `candidates` (names or IPv4 addresses) that the node has, tried in order as
/// flanneld tries repeated `-iface` flags; none given: the default route's interface.
pub fn resolve_first_iface(candidates: &[String]) -> Result<Iface, NetdevError> {
    if candidates.is_empty() {
        return resolve_iface(None);
    }
    for c in candidates {
        match resolve_iface(Some(c)) {
            Err(NetdevError::NoSuchInterface(_)) => continue,
            other => return other,
        }
    }
    Err(NetdevError::NoSuchInterface(candidates.join(", ")))
}

/// Removes a kernel VXLAN device called `name`: what flanneld's vxlan backend leaves behind
/// when it stops (`flannel.<VNI>`), holding the name podwire's device takes and the VXLAN port.
/// Returns whether there was one.
pub fn remove_vxlan_device(name: &str) -> Result<bool, NetdevError> {
    use netlink_packet_route::link::InfoKind;
    let mut rtnl = Rtnl::open()?;
    if rtnl.link_kind(name)? != Some(InfoKind::Vxlan) {
        return Ok(false);
    }
    rtnl.link_del(name)?;
    Ok(true)
}

/// Packets the kernel holds for podwire in the TUN's queue (its `txqueuelen`; Linux gives a
/// TUN 500). The worker that reads it may be descheduled for a moment on a busy node, and 500
/// packets are 25 ms at 20k pps: the soak lost datagrams exactly there. 10000 rides out a
/// quarter second at that rate, like a NIC's receive ring.
pub const TUN_QUEUE_LEN: u32 = 10_000;

/// Configures the TUN device as flanneld does for the udp backend: the lease's `.0/32` address,
/// the MTU, up, and a route for the whole cluster network through it; and a longer queue
/// ([`TUN_QUEUE_LEN`]).
///
/// Also sets `accept_local` on it: the ICMP errors we write into the TUN come from the device's
/// own address (as flanneld's do), which the kernel otherwise discards as a martian source.
/// And turns IPv6 off on it, since it carries IPv4 only.
pub fn configure_tun(
    name: &str,
    lease: Ipv4Net,
    network: Ipv4Net,
    mtu: u32,
) -> Result<(), NetdevError> {
    let sysctl = format!("/proc/sys/net/ipv4/conf/{name}/accept_local");
    std::fs::write(&sysctl, "1").map_err(|source| NetdevError::Sysctl {
        path: sysctl,
        source,
    })?;
    // The device carries IPv4 only: without IPv6 on it, the host sends no router
    // solicitations or MLD reports into it for podwire to drop (as not_ipv4). Best effort: a
    // kernel without IPv6 has no such file.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let mut rtnl = Rtnl::open()?;
    rtnl.addr_replace(name, lease.addr(), 32)?;
    rtnl.link_set(
        name,
        &LinkChange {
            mtu: Some(mtu),
            txqueuelen: Some(TUN_QUEUE_LEN),
            up: true,
            ..LinkChange::default()
        },
    )?;
    let dev = rtnl.index_of(name)?;
    // flanneld's route: the whole network through the device, scope global.
    rtnl.route_replace(&Route {
        scope: netlink_packet_route::route::RouteScope::Universe,
        ..Route::dev(network, dev)
    })?;
    Ok(())
}

/// `ip route replace DST dev DEV`.
pub fn route_replace_dev(dst: Ipv4Net, dev: &str) -> Result<(), NetdevError> {
    let mut rtnl = Rtnl::open()?;
    let dev = rtnl.index_of(dev)?;
    Ok(rtnl.route_replace(&Route::dev(dst, dev))?)
}

/// `ip route del DST dev DEV`.
pub fn route_del_dev(dst: Ipv4Net, dev: &str) -> Result<(), NetdevError> {
    let mut rtnl = Rtnl::open()?;
    let dev = rtnl.index_of(dev)?;
    Ok(rtnl.route_del(&Route::dev(dst, dev))?)
}

/// The plain routes of VXLAN `DirectRouting`: a peer whose PublicIP is on our interface's own
/// subnet is reached without encapsulation, by a kernel route `lease via PublicIP dev iface`, as
/// flanneld installs it. Those routes are more specific than the cluster Network's route through
/// the TUN, so that traffic never enters podwire. Kept in step with the subnet map; removed on
/// exit.
///
/// They carry routing protocol [`ROUTE_PROTOCOL`] (`ip route` shows `proto 112`), so a start after a
/// crash adopts the routes the previous run left and withdraws those whose lease vanished
/// meanwhile, without touching anyone else's routes.
#[derive(Debug)]
pub struct DirectRoutes {
    iface: Iface,
    installed: std::collections::BTreeMap<Ipv4Net, Ipv4Addr>,
}

/// The routing protocol number podwire's routes carry (unassigned in iproute2's rt_protos).
pub const ROUTE_PROTOCOL: u8 = 112;
/// [`ROUTE_PROTOCOL`] as `ip route ... proto` takes it (the lab plants such routes).
pub const ROUTE_PROTO: &str = "112";

impl DirectRoutes {
    /// Starts with the routes an earlier run left on `iface` (protocol [`ROUTE_PROTOCOL`]); the
    /// first [`DirectRoutes::sync`] keeps those still wanted and withdraws the rest.
    pub fn new(iface: Iface) -> DirectRoutes {
        let installed = leftover_routes(&iface.name);
        if !installed.is_empty() {
            tracing::info!(routes = installed.len(), iface = %iface.name, "adopting direct routes left by an earlier run");
        }
        DirectRoutes { iface, installed }
    }

    /// Installs and withdraws routes so that exactly the on-link peers of `nodes` (other than our
    /// own lease) have one. Failures are logged and retried at the next sync.
    pub fn sync<'a>(
        &mut self,
        own: Ipv4Net,
        nodes: impl Iterator<Item = &'a podwire_dataplane::route::Node>,
    ) {
        let wanted: std::collections::BTreeMap<Ipv4Net, Ipv4Addr> = nodes
            .filter(|n| {
                n.subnet != own
                    && self.iface.net.contains(n.public_ip)
                    && n.public_ip != self.iface.addr
            })
            .map(|n| (n.subnet, n.public_ip))
            .collect();
        let stale: Vec<(Ipv4Net, Ipv4Addr)> = self
            .installed
            .iter()
            .filter(|(k, v)| wanted.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect();
        let mut rtnl = match Rtnl::open().and_then(|mut r| Ok((r.index_of(&self.iface.name)?, r))) {
            Ok((dev, rtnl)) => (dev, rtnl),
            Err(e) => {
                tracing::warn!(iface = %self.iface.name, error = %e, "cannot sync the direct routes");
                return;
            }
        };
        let route = |subnet, via| Route {
            via: Some(via),
            protocol: ROUTE_PROTOCOL,
            scope: netlink_packet_route::route::RouteScope::Universe,
            ..Route::dev(subnet, rtnl.0)
        };
        for (subnet, via) in stale {
            match rtnl.1.route_del(&route(subnet, via)) {
                Ok(()) => tracing::info!(%subnet, %via, "direct route removed"),
                Err(e) => {
                    tracing::warn!(%subnet, %via, error = %e, "removing a direct route failed")
                }
            }
            self.installed.remove(&subnet);
        }
        for (subnet, via) in wanted {
            if self.installed.get(&subnet) == Some(&via) {
                continue;
            }
            match rtnl.1.route_replace(&route(subnet, via)) {
                Ok(()) => {
                    tracing::info!(%subnet, %via, "direct route installed");
                    self.installed.insert(subnet, via);
                }
                Err(e) => {
                    tracing::warn!(%subnet, %via, error = %e, "installing a direct route failed")
                }
            }
        }
    }

    /// Removes every route this installed.
    pub fn clear(&mut self) {
        self.sync(
            Ipv4Net::containing(Ipv4Addr::UNSPECIFIED, 32),
            std::iter::empty(),
        );
    }
}

impl Drop for DirectRoutes {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Routes with our protocol on `dev` in the main table.
fn leftover_routes(dev: &str) -> std::collections::BTreeMap<Ipv4Net, Ipv4Addr> {
    let listed = Rtnl::open().and_then(|mut r| {
        let dev = r.link_index(dev)?;
        Ok((dev, r.routes(crate::rtnl::MAIN_TABLE)?))
    });
    match listed {
        Ok((Some(dev), routes)) => ours(dev, routes),
        Ok((None, _)) => Default::default(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the routes an earlier run left");
            Default::default()
        }
    }
}

/// Destination and gateway of the routes with our protocol through device `dev`.
fn ours(dev: u32, routes: Vec<Route>) -> std::collections::BTreeMap<Ipv4Net, Ipv4Addr> {
    routes
        .into_iter()
        .filter(|r| r.dev == Some(dev) && r.protocol == ROUTE_PROTOCOL)
        .filter_map(|r| Some((r.dst, r.via?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_attached_xdp_is_read_from_the_link() {
        use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached};
        let mut link = LinkMessage::default();
        assert_eq!(attached_xdp(&link), None);
        link.attributes.push(LinkAttribute::Xdp(vec![
            LinkXdp::Attached(XdpAttached::SocketBuffer),
            LinkXdp::ProgId(653),
        ]));
        assert_eq!(attached_xdp(&link), Some(AttachedXdp { id: 653, mode: 2 }));
    }

    #[test]
    fn test_leftover_routes_are_ours_on_the_device() {
        let dst = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let gw = Ipv4Addr::new(192, 168, 99, 12);
        let ours_on_3 = Route {
            via: Some(gw),
            protocol: ROUTE_PROTOCOL,
            ..Route::dev(dst("10.244.2.0/24"), 3)
        };
        let routes = vec![
            ours_on_3.clone(),
            Route {
                dst: dst("10.244.4.0/24"),
                protocol: crate::rtnl::PROTO_BOOT,
                ..ours_on_3.clone()
            },
            Route::dev(dst("10.244.3.0/24"), 3),
            Route {
                dst: dst("10.244.5.0/24"),
                dev: Some(4),
                ..ours_on_3
            },
        ];
        assert_eq!(ROUTE_PROTO, ROUTE_PROTOCOL.to_string());
        let r = ours(3, routes);
        assert_eq!(r.len(), 1);
        assert_eq!(r.get(&dst("10.244.2.0/24")), Some(&gw));
    }

    #[test]
    fn test_loopback_resolves_by_name_and_address() {
        let by_name = resolve_iface(Some("lo")).unwrap();
        assert_eq!(by_name.addr, Ipv4Addr::LOCALHOST);
        assert_eq!(by_name.net.to_string(), "127.0.0.0/8");
        assert!(by_name.mtu > 0);
        assert_eq!(resolve_iface(Some("127.0.0.1")).unwrap().name, "lo");
        assert!(matches!(
            resolve_iface(Some("no-such-if0")),
            Err(NetdevError::NoSuchInterface(_))
        ));
    }

    #[test]
    fn test_repeated_ifaces_are_tried_in_order() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let got = resolve_first_iface(&names(&["no-such-if0", "lo", "127.0.0.1"])).unwrap();
        assert_eq!(got.name, "lo");
        let err = resolve_first_iface(&names(&["no-such-if0", "no-such-if1"])).unwrap_err();
        assert!(
            err.to_string().contains("no-such-if0, no-such-if1"),
            "{err}"
        );
    }
}
