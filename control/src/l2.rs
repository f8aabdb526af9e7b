//! L2 mode's devices: the host's bridge port and the pods' TAP interfaces.
//!
//! `podwire run --mode l2` replaces the node's Linux bridge (cni0): the host gets a TAP port
//! carrying the lease's gateway address (`.1`) with the cluster network's prefix, so the host
//! reaches every pod of the L2 domain on-link, and its MAC is the lease's VtepMAC, which the
//! other nodes install as a static FDB entry behind our PublicIP.
//!
//! A pod is attached (`podwire ctl attach --netns NS --ip CIDR`) by creating a TAP device here,
//! moving it into the pod's namespace, and configuring it there as the pod's interface (name,
//! MAC, MTU, address, default route via the node's gateway). The descriptor stays with podwire:
//! closing it (detach, exit, crash) deletes the device.
//!
//! With `run --l2-pods xdp` the pod gets one end of a veth pair instead, and podwire serves the
//! host end through AF_XDP: its XDP program (bridge-port role) hands every frame to a socket
//! that is the bridge port. The pair is removed on detach and when the daemon stops (after a
//! crash it stays, as a CNI plugin's pair would, until the pod's namespace goes).

use crate::netdev::{attach_xdp, NetdevError};
use crate::rtnl::{LinkChange, Route, Rtnl, RtnlError};
use podwire_dataplane::bridge::{PodBinding, PortId, PortOptions};
use podwire_dataplane::port::tap::TapPort;
use podwire_dataplane::port::xdp::xsk::{XskConfig, XskPort};
use podwire_dataplane::port::xdp::{Role, XdpProgram};
use podwire_dataplane::port::PortError;
use podwire_dataplane::route::Ipv4Net;
use podwire_dataplane::wire::MacAddr;
use podwire_dataplane::worker::l2::{BridgeDevice, L2Error, L2Handle};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

/// A pod's veth pair served through AF_XDP: the program on its host end, and the pair, which
/// is deleted when this is dropped.
pub struct VethPort {
    host_end: String,
    program: Option<XdpProgram>,
}

impl Drop for VethPort {
    fn drop(&mut self) {
        // The program comes off first, then the pair goes (both ends with it).
        drop(self.program.take());
        let deleted = Rtnl::open().and_then(|mut r| r.link_del(&self.host_end));
        if let Err(e) = deleted {
            tracing::warn!(device = %self.host_end, error = %e, "deleting a pod's veth pair");
        }
    }
}

/// The pods' veth pairs, by the label of their bridge port (the pod's namespace).
pub type Veths = Arc<Mutex<HashMap<String, VethPort>>>;

/// What can go wrong attaching a pod.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    #[error(transparent)]
    Netlink(#[from] RtnlError),
    #[error(transparent)]
    Bridge(#[from] L2Error),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ethtool(#[from] crate::ethtool::EthtoolError),
}

/// A name for a new veth host end (`pwvN`, its pod end `pwvNp`) that no device has.
fn free_veth_name() -> Result<String, AttachError> {
    let exists = |n: &str| std::path::Path::new("/sys/class/net").join(n).exists();
    (0..100_000)
        .map(|n| format!("pwv{n}"))
        .find(|n| !exists(n) && !exists(&format!("{n}p")))
        .ok_or_else(|| AttachError::Invalid("no free veth name".into()))
}

/// Creates a veth pair whose host end podwire serves through AF_XDP; returns the pod's end's
/// name (still in our namespace), the bridge port's device and the pair's owner.
fn veth_port(mtu: u32) -> Result<(String, BridgeDevice, VethPort), AttachError> {
    let host_end = free_veth_name()?;
    let pod_end = format!("{host_end}p");
    let mut rtnl = Rtnl::open()?;
    rtnl.veth_add(&host_end, &pod_end)?;
    let mut owner = VethPort {
        host_end: host_end.clone(),
        program: None,
    };
    // AF_XDP sees the pod's frames as sent, with no skb to say a checksum was left to
    // offload: the pod's end finishes its checksums. GRO on it lets native XDP on veth
    // redirect its frames.
    let mut offloads: Vec<(&str, bool)> = crate::ethtool::TX_CHECKSUMS
        .iter()
        .map(|&f| (f, false))
        .collect();
    offloads.push((crate::ethtool::GRO, true));
    crate::ethtool::set_features(&pod_end, &offloads)?;
    rtnl.link_set(
        &host_end,
        &LinkChange {
            mtu: Some(mtu),
            up: true,
            ..LinkChange::default()
        },
    )?;
    let mut program = attach_xdp(&host_end, Role::BridgePort)?;
    // A pod's port needs less room than an uplink queue: 1024 frames of 2 KiB (2 MiB of UMEM
    // per pod, not 8), half for receiving, half for sending.
    let config = XskConfig {
        frames: 1024,
        ..XskConfig::default()
    };
    let xsk = XskPort::bind(&host_end, 0, config)?;
    program
        .set_socket(0, &xsk.raw_fd())
        .map_err(|e| AttachError::Invalid(format!("XDP on {host_end}: {e}")))?;
    owner.program = Some(program);
    Ok((pod_end, BridgeDevice::Xsk(Box::new(xsk)), owner))
}

/// An address with its prefix length, as `ip addr` takes it (`10.244.1.10/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for IfAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<IfAddr, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s}: expected ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{a}: not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|&p| (1..=32).contains(&p))
            .ok_or_else(|| format!("{p}: not a prefix length (1..32)"))?;
        Ok(IfAddr { addr, prefix })
    }
}

impl std::fmt::Display for IfAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A pod to attach.
#[derive(Debug, Clone)]
pub struct Attach {
    /// The pod's network namespace (a name under /run/netns).
    pub netns: String,
    pub ip: IfAddr,
    /// The interface's MAC (default: the kernel's random one).
    pub mac: Option<MacAddr>,
    /// The interface's name in the pod.
    pub ifname: String,
    /// The pod's default gateway (default: the node's gateway, the host port's address).
    pub gateway: Option<Ipv4Addr>,
}

/// What an attach did.
#[derive(Debug, Clone)]
pub struct Attached {
    pub port: PortId,
    pub device: String,
    pub mac: MacAddr,
}

/// Creates the host's bridge port `name` with MAC `mac`, address `addr` and MTU `mtu`.
pub fn host_port(
    name: &str,
    mac: MacAddr,
    addr: IfAddr,
    mtu: u32,
    offload: bool,
) -> Result<TapPort, AttachError> {
    // A port left by a crashed run is still a TAP device nobody holds: open it again. With
    // offload where the kernel allows it and `offload` asks for it (the pods' ports follow
    // the host's).
    let tap = match offload.then(|| TapPort::open_offload(name)) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            tracing::warn!(error = %e, "TAP offload refused; the bridge moves one frame per syscall");
            TapPort::open(name)?
        }
        None => TapPort::open(name)?,
    };
    let dev = tap.name().to_string();
    let mut rtnl = Rtnl::open()?;
    rtnl.link_set(
        &dev,
        &LinkChange {
            address: Some(mac),
            mtu: Some(mtu),
            ..LinkChange::default()
        },
    )?;
    rtnl.addr_replace(&dev, addr.addr, addr.prefix)?;
    rtnl.link_set(
        &dev,
        &LinkChange {
            up: true,
            ..LinkChange::default()
        },
    )?;
    Ok(tap)
}

/// Configures the pod's interface `dev`, just moved into its namespace, with `rtnl` there:
/// its name, MAC, MTU, address, up (and `lo`), and the default route via `gateway`. Returns
/// its MAC.
fn configure_pod_end(
    rtnl: &mut Rtnl,
    dev: &str,
    req: &Attach,
    mtu: u32,
    gateway: Ipv4Addr,
) -> Result<MacAddr, RtnlError> {
    let ifname = req.ifname.as_str();
    rtnl.link_set(
        dev,
        &LinkChange {
            name: Some(ifname.to_string()),
            ..LinkChange::default()
        },
    )?;
    rtnl.link_set(
        ifname,
        &LinkChange {
            address: req.mac,
            mtu: Some(mtu),
            ..LinkChange::default()
        },
    )?;
    rtnl.addr_replace(ifname, req.ip.addr, req.ip.prefix)?;
    let up = LinkChange {
        up: true,
        ..LinkChange::default()
    };
    rtnl.link_set("lo", &up)?;
    rtnl.link_set(ifname, &up)?;
    if gateway != req.ip.addr {
        let index = rtnl.index_of(ifname)?;
        rtnl.route_replace(&Route {
            via: Some(gateway),
            onlink: true,
            scope: netlink_packet_route::route::RouteScope::Universe,
            ..Route::dev(Ipv4Net::containing(Ipv4Addr::UNSPECIFIED, 0), index)
        })?;
    }
    rtnl.link_mac(ifname)
}

/// Creates a TAP device (with `veths`, a veth pair kept there), moves it (the pod's end) into
/// the pod's namespace, configures it there and attaches it to the bridge. On any failure the
/// device is gone again (its descriptor, or the pair's owner, is dropped).
pub fn attach(
    handle: &L2Handle,
    req: &Attach,
    mtu: u32,
    node_gateway: Ipv4Addr,
    veths: Option<&Veths>,
) -> Result<Attached, AttachError> {
    if req.netns.is_empty() || req.netns.contains('/') || req.ifname.is_empty() {
        return Err(AttachError::Invalid(
            "netns and ifname must be plain names".into(),
        ));
    }
    if let Some(mac) = req.mac {
        if mac.is_multicast() || mac == MacAddr::ZERO {
            return Err(AttachError::Invalid(format!("{mac} is not a unicast MAC")));
        }
    }
    let ns = req.netns.as_str();
    if let Some(v) = veths {
        if v.lock().expect("veths").contains_key(ns) {
            return Err(AttachError::Invalid(format!(
                "a pod is attached from netns {ns:?} already"
            )));
        }
    }
    let (dev, device, owner) = match veths {
        Some(_) => {
            let (pod_end, device, owner) = veth_port(mtu)?;
            (pod_end, device, Some(owner))
        }
        None => {
            let tap = if handle.offload {
                TapPort::open_offload("pwtap%d")?
            } else {
                TapPort::open("pwtap%d")?
            };
            (tap.name().to_string(), BridgeDevice::Tap(tap), None)
        }
    };
    let netns =
        std::fs::File::open(format!("/run/netns/{ns}")).map_err(|source| RtnlError::Netns {
            path: format!("/run/netns/{ns}"),
            source,
        })?;
    Rtnl::open()?.link_to_netns(&dev, &netns)?;
    let gateway = req.gateway.unwrap_or(node_gateway);
    let mac = crate::rtnl::in_netns(ns, |rtnl| configure_pod_end(rtnl, &dev, req, mtu, gateway))?;
    // The pod is held to the MAC and address it was given: anything else it sends is
    // dropped at its port (`spoofed_source`).
    let options = PortOptions {
        pod: Some(PodBinding {
            mac,
            ip: Some(req.ip.addr),
        }),
        ..PortOptions::default()
    };
    let port = handle.attach(device, ns, options, Some(mac))?;
    if let (Some(v), Some(owner)) = (veths, owner) {
        v.lock().expect("veths").insert(ns.to_string(), owner);
    }
    Ok(Attached {
        port,
        device: dev,
        mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ifaddr_parses_what_ip_addr_takes() {
        let a: IfAddr = "10.244.1.10/16".parse().unwrap();
        assert_eq!(a.addr, Ipv4Addr::new(10, 244, 1, 10));
        assert_eq!(a.prefix, 16);
        assert_eq!(a.to_string(), "10.244.1.10/16");
        for bad in [
            "10.244.1.10",
            "10.244.1.10/33",
            "10.244.1.10/0",
            "x/16",
            "10.1/8",
        ] {
            assert!(bad.parse::<IfAddr>().is_err(), "{bad}");
        }
    }
}
