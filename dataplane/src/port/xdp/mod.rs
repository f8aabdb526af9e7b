//! The XDP program on an interface: built from `ebpf/podwire_xdp.c` by build.rs, embedded,
//! loaded and attached with aya. It steers what podwire owns into the AF_XDP socket of the
//! receiving queue and passes the rest to the kernel (see the C source).
//!
//! Driver (native) mode is tried first, then generic (SKB) mode. The attachment is a bpf_link
//! where the kernel has them (5.9+): dropping an [`XdpProgram`] detaches it, and so does the
//! process's end, even by SIGKILL, since the link lives in a descriptor. (Kernels before 5.9
//! get a netlink attachment, which outlives a killed process; the next start takes it off
//! before attaching, see the daemon.)
//!
//! The ports behind the program are this folder's modules: [`xsk`] an AF_XDP socket on one
//! queue, [`underlay`] the underlay through it, [`pod`] pods' veth host ends through it.

pub mod pod;
pub mod underlay;
pub mod xsk;

use crate::route::Ipv4Net;
use crate::sys::bpf::{XdpConfig, ROLE_BRIDGE_PORT, ROLE_POD, ROLE_UNDERLAY};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// The compiled program (built with the `xdp` feature only).
#[cfg(feature = "xdp")]
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/podwire_xdp.o"));
/// The compiled program, for tools that load it themselves (`ip link set ... xdp obj`).
#[cfg(feature = "xdp")]
pub fn object() -> &'static [u8] {
    OBJECT
}

/// The program to load, if this build has one.
fn embedded() -> Result<&'static [u8], XdpError> {
    #[cfg(feature = "xdp")]
    return Ok(OBJECT);
    #[cfg(not(feature = "xdp"))]
    Err(XdpError::NotBuilt)
}

/// Its entry point, as `ip link` shows it.
pub const PROGRAM_NAME: &str = "podwire_xdp";

/// What the program does on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node's uplink: UDP to `local_ip:port` goes to podwire, the rest to the kernel;
    /// also TCP and UDP to `local_ip` with a destination port in `masq_ports` (the replies of
    /// masqueraded connections) or among the NodePorts set with [`XdpProgram::set_node_ports`].
    Underlay {
        local_ip: Ipv4Addr,
        port: u16,
        masq_ports: Option<(u16, u16)>,
    },
    /// A pod's veth host end (whose own address is `local_ip`): IPv4 from the pod to the
    /// cluster `network` outside this node's `lease`, to the `services` range and, when
    /// podwire masquerades, TCP and UDP to anywhere else goes to podwire; the rest (the host,
    /// the node's other pods, ARP, IPv6) to the kernel.
    Pod {
        local_ip: Ipv4Addr,
        network: Ipv4Net,
        lease: Ipv4Net,
        services: Ipv4Net,
        masquerade: bool,
        /// The pod's address: only packets from it are redirected; the rest is the kernel's.
        pod_ip: Ipv4Addr,
        /// The node's underlay address: packets to it are the kernel's (never masqueraded).
        node_ip: Ipv4Addr,
    },
    /// A pod's veth host end as a port of podwire's bridge (L2 mode): every frame goes to
    /// podwire (an Ethernet header is all the program checks).
    BridgePort,
}

/// How the program runs on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In the driver, before an skb exists.
    Driver,
    /// Generic XDP, after the skb is built (any driver).
    Skb,
}

/// Per-CPU counts summed: what the program did with the frames it saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// Redirected to an AF_XDP socket.
    pub redirected: u64,
    /// Ours, but the queue had no socket: passed to the kernel.
    pub no_socket: u64,
    /// Not ours: passed to the kernel.
    pub passed: u64,
    /// Shorter than the headers it claims: passed (the kernel drops it).
    pub malformed: u64,
    /// Pod role: from a source other than the pod's own address: passed to the kernel.
    pub foreign_source: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("this podwire was built without XDP (podwire-dataplane's `xdp` feature, which needs clang): no XDP program to attach, no AF_XDP sockets")]
    NotBuilt,
    #[error("loading the XDP program: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("XDP program: {0}")]
    Program(Box<aya::programs::ProgramError>),
    #[error("XDP map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("XDP map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("attaching XDP to {ifname}: driver mode: {driver}; generic mode: {skb}")]
    Attach {
        ifname: String,
        driver: Box<aya::programs::ProgramError>,
        skb: Box<aya::programs::ProgramError>,
    },
}

impl From<aya::EbpfError> for XdpError {
    fn from(e: aya::EbpfError) -> XdpError {
        XdpError::Load(Box::new(e))
    }
}

impl From<aya::programs::ProgramError> for XdpError {
    fn from(e: aya::programs::ProgramError) -> XdpError {
        XdpError::Program(Box::new(e))
    }
}

/// A map error, named.
fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> XdpError {
    move |source| XdpError::Map {
        name,
        source: Box::new(source),
    }
}

/// The program, attached to one interface until dropped.
pub struct XdpProgram {
    // Dropping it detaches the program and frees it (and its maps, unless a socket holds them).
    ebpf: Ebpf,
    ifname: String,
    mode: Mode,
    counters: Arc<ProgramCounters>,
}

/// An attached program's counters map, readable from any thread. Each read is a map lookup
/// (a syscall): for the control side at scrape time, never a worker's path.
pub struct ProgramCounters {
    array: PerCpuArray<MapData, u64>,
    ifname: String,
}

impl ProgramCounters {
    /// The interface the program is attached to.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The program's counts so far, summed over CPUs.
    pub fn read(&self) -> Result<XdpCounters, XdpError> {
        let sum = |i: u32| -> Result<u64, XdpError> {
            let values = self.array.get(&i, 0).map_err(map_err("counters"))?;
            Ok(values.iter().sum())
        };
        Ok(XdpCounters {
            redirected: sum(0)?,
            no_socket: sum(1)?,
            passed: sum(2)?,
            malformed: sum(3)?,
            foreign_source: sum(4)?,
        })
    }
}

impl XdpProgram {
    /// Loads the program, sets its role and attaches it to `ifname`, in driver mode if the
    /// driver has it, else in generic mode.
    pub fn attach(ifname: &str, role: Role) -> Result<XdpProgram, XdpError> {
        let mut ebpf = Ebpf::load(embedded()?)?;
        let config = match role {
            Role::Underlay {
                local_ip,
                port,
                masq_ports,
            } => {
                let (masq_lo, masq_hi) = masq_ports.unwrap_or((1, 0));
                XdpConfig {
                    role: ROLE_UNDERLAY,
                    local_ip: u32::from_ne_bytes(local_ip.octets()),
                    port: port.to_be(),
                    masq_lo,
                    masq_hi,
                    ..XdpConfig::default()
                }
            }
            Role::Pod {
                local_ip,
                network,
                lease,
                services,
                masquerade,
                pod_ip,
                node_ip,
            } => {
                let be = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
                let mask = |net: Ipv4Net| u32::from_ne_bytes(net.mask().to_be_bytes());
                let (masq_lo, masq_hi) = if masquerade { (0, u16::MAX) } else { (1, 0) };
                XdpConfig {
                    role: ROLE_POD,
                    local_ip: be(local_ip),
                    masq_lo,
                    masq_hi,
                    net_addr: be(network.addr()),
                    net_mask: mask(network),
                    lease_addr: be(lease.addr()),
                    lease_mask: mask(lease),
                    svc_addr: be(services.addr()),
                    svc_mask: mask(services),
                    pod_addr: be(pod_ip),
                    node_addr: be(node_ip),
                    ..XdpConfig::default()
                }
            }
            Role::BridgePort => XdpConfig {
                role: ROLE_BRIDGE_PORT,
                ..XdpConfig::default()
            },
        };
        {
            let map = ebpf
                .map_mut("config_map")
                .ok_or(XdpError::MissingMap("config_map"))?;
            let mut array: Array<&mut MapData, XdpConfig> =
                Array::try_from(map).map_err(map_err("config_map"))?;
            array.set(0, config, 0).map_err(map_err("config_map"))?;
        }
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(XdpError::MissingMap(PROGRAM_NAME))?
            .try_into()?;
        prog.load()?;
        let mode = match prog.attach(ifname, XdpMode::Driver) {
            Ok(_) => Mode::Driver,
            Err(driver) => match prog.attach(ifname, XdpMode::Skb) {
                Ok(_) => Mode::Skb,
                Err(skb) => {
                    return Err(XdpError::Attach {
                        ifname: ifname.to_string(),
                        driver: Box::new(driver),
                        skb: Box::new(skb),
                    })
                }
            },
        };
        // Taken out of the object so other threads can read it; the program holds it too.
        let map = ebpf
            .take_map("counters")
            .ok_or(XdpError::MissingMap("counters"))?;
        let counters = Arc::new(ProgramCounters {
            array: PerCpuArray::try_from(map).map_err(map_err("counters"))?,
            ifname: ifname.to_string(),
        });
        Ok(XdpProgram {
            ebpf,
            ifname: ifname.to_string(),
            mode,
            counters,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Hands queue `queue`'s frames to the AF_XDP socket `socket`.
    pub fn set_socket(&mut self, queue: u32, socket: &impl AsRawFd) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut("xsks_map")
            .ok_or(XdpError::MissingMap("xsks_map"))?;
        let mut xsks = XskMap::try_from(map).map_err(map_err("xsks_map"))?;
        xsks.set(queue, socket.as_raw_fd(), 0)
            .map_err(map_err("xsks_map"))
    }

    /// Makes `ports` (protocol number, port) the NodePorts steered to podwire: adds the new
    /// ones and removes the rest. Returns how many are set.
    pub fn set_node_ports(&mut self, ports: &[(u8, u16)]) -> Result<usize, XdpError> {
        let map = self
            .ebpf
            .map_mut("node_ports")
            .ok_or(XdpError::MissingMap("node_ports"))?;
        let mut set: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(map).map_err(map_err("node_ports"))?;
        let want: std::collections::HashSet<u32> = ports
            .iter()
            .map(|&(proto, port)| u32::from(proto) << 16 | u32::from(port))
            .collect();
        let stale: Vec<u32> = set
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains(k))
            .collect();
        for k in stale {
            set.remove(&k).map_err(map_err("node_ports"))?;
        }
        for &k in &want {
            set.insert(k, 1, 0).map_err(map_err("node_ports"))?;
        }
        Ok(want.len())
    }

    /// The program's counts so far, summed over CPUs.
    pub fn counters(&self) -> Result<XdpCounters, XdpError> {
        self.counters.read()
    }

    /// Its counters, for another thread to read while the program is attached (and after:
    /// the map lives as long as a reader holds it).
    pub fn counter_reader(&self) -> Arc<ProgramCounters> {
        Arc::clone(&self.counters)
    }
}

#[cfg(test)]
#[cfg(not(feature = "xdp"))]
mod tests {
    use super::*;

    #[test]
    fn test_without_the_xdp_feature_attaching_and_binding_are_errors() {
        let role = Role::Underlay {
            local_ip: Ipv4Addr::LOCALHOST,
            port: 8472,
            masq_ports: None,
        };
        assert!(matches!(
            XdpProgram::attach("lo", role),
            Err(XdpError::NotBuilt)
        ));
        let bound = crate::port::xdp::xsk::XskPort::bind("lo", 0, Default::default());
        assert!(matches!(
            bound,
            Err(crate::port::PortError::Open { ref source, .. })
                if source.kind() == std::io::ErrorKind::Unsupported
        ));
    }
}
