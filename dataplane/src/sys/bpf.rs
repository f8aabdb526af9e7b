//! Values shared with the XDP program (`ebpf/podwire_xdp.c`) through its maps.

/// `struct config` of the XDP program, field for field: its role on the interface and, for the
/// underlay, the node's address and the data port (network byte order), and the masquerade
/// port range (host byte order, empty when `masq_lo > masq_hi`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpConfig {
    pub role: u32,
    pub local_ip: u32,
    pub port: u16,
    pub pad: u16,
    pub masq_lo: u16,
    pub masq_hi: u16,
    /// Pod role, network byte order: the cluster network, the node's lease, the service range.
    pub net_addr: u32,
    pub net_mask: u32,
    pub lease_addr: u32,
    pub lease_mask: u32,
    pub svc_addr: u32,
    pub svc_mask: u32,
    /// Pod role, network byte order: the pod's own address.
    pub pod_addr: u32,
    /// Pod role, network byte order: the node's underlay address.
    pub node_addr: u32,
}

// SAFETY: `XdpConfig` is `repr(C)`, `Copy`, has no padding (4 + 4 + 2 * 4 + 8 * 4 bytes,
// alignment 4) and every bit pattern is a valid value, which is what aya's `Pod` asks of map
// values.
unsafe impl aya::Pod for XdpConfig {}

/// Roles, as the program's `ROLE_*`.
pub const ROLE_UNDERLAY: u32 = 0;
pub const ROLE_POD: u32 = 1;
/// A pod's veth host end as a bridge port: every frame.
pub const ROLE_BRIDGE_PORT: u32 = 2;
