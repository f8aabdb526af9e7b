//! The lab's closed choices as types, and the combinations of [`LabOptions`] it refuses.
//!
//! The variants carry plain comments, not doc comments: clap would list those in `--help`
//! beside the option's own text, which names every value already.

use super::LabOptions;
use clap::ValueEnum;

/// What the lab's nodes run between them (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    // podwire with flannel's udp encapsulation.
    #[value(name = "udp")]
    Udp,
    // podwire with VXLAN.
    #[value(name = "vxlan")]
    Vxlan,
    // No podwire: the kernel's VXLAN, configured as flanneld's vxlan backend does.
    #[value(name = "kernel-vxlan")]
    KernelVxlan,
}

/// How podwire nodes send VXLAN (`podwire run --vxlan-tx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VxlanTx {
    // UDP sockets with GSO.
    #[value(name = "socket")]
    Socket,
    // A raw socket, with a source port per flow as the kernel's.
    #[value(name = "flow-ports")]
    FlowPorts,
}

/// Which of kube-proxy's modes is the baseline's service proxy on a kernel node 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KubeProxyMode {
    /// iptables-restore of KUBE-SERVICES/KUBE-SVC-*/KUBE-SEP-* chains.
    #[value(name = "iptables")]
    Iptables,
    /// `nft -f` of the `ip kube-proxy` table (verdict maps), with
    /// `--conntrack-tcp-be-liberal` as kube-proxy's docs ask of that mode.
    #[value(name = "nftables")]
    Nftables,
}

/// The name a user types for `v`, e.g. `kernel-vxlan`.
pub fn value_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

impl std::fmt::Display for VxlanTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

/// A combination of lab options the lab does not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("--nodes must be between 2 and 100")]
    Nodes,
    #[error("--direct-routing is a VXLAN option (Backend.DirectRouting)")]
    DirectRoutingWithoutVxlan,
    #[error("--peer kernel goes with --backend vxlan (kernel nodes speak VXLAN)")]
    PeerKernelWithoutVxlan,
    #[error("--extra-leases goes with --store etcd")]
    ExtraLeasesWithoutEtcd,
    #[error("--services needs 3 nodes or more, and node 1 (its pod is the client) running podwire, or kube-proxy's rules with --backend kernel-vxlan")]
    ServicesNodes,
    #[error("--services needs connection tracking")]
    ServicesWithoutConntrack,
    #[error("--extra-leases: at most 30000")]
    TooManyExtraLeases,
    #[error("--mode l2 goes with --backend vxlan (podwire on every node, no DirectRouting)")]
    L2WithoutPodwireVxlan,
    #[error("--mode l2 does not combine with --services, --ip-masq or --store etcd or kube yet")]
    L2With,
    #[error("--extra-leases goes with --store etcd, not kube")]
    KubeWithExtraLeases,
    #[error("--forward-drop tests the kernel's FORWARD chain, which --mode l2's pods (on podwire's bridge) never pass")]
    ForwardDropWithL2,
}

impl LabOptions {
    /// The first rule these options break, in the order the lab has always checked them.
    pub fn validate(&self) -> Result<(), Refused> {
        let o = self;
        let kernel = Backend::KernelVxlan;
        let refusals = [
            (!(2..=100).contains(&o.nodes), Refused::Nodes),
            (
                o.direct_routing && !o.vxlan(),
                Refused::DirectRoutingWithoutVxlan,
            ),
            (
                o.peer_kernel && o.backend != Backend::Vxlan,
                Refused::PeerKernelWithoutVxlan,
            ),
            (
                o.extra_leases > 0 && !o.etcd,
                Refused::ExtraLeasesWithoutEtcd,
            ),
            (
                o.services && (o.nodes < 3 || (o.is_kernel_node(1) && o.backend != kernel)),
                Refused::ServicesNodes,
            ),
            (
                o.services && !o.conntrack,
                Refused::ServicesWithoutConntrack,
            ),
            (o.extra_leases > 30_000, Refused::TooManyExtraLeases),
            (
                o.l2 && (o.backend != Backend::Vxlan || o.peer_kernel || o.direct_routing),
                Refused::L2WithoutPodwireVxlan,
            ),
            (
                o.l2 && (o.services || o.ip_masq || o.etcd || o.kube),
                Refused::L2With,
            ),
            (o.kube && o.extra_leases > 0, Refused::KubeWithExtraLeases),
            (o.l2 && o.forward_drop, Refused::ForwardDropWithL2),
        ];
        match refusals.into_iter().find(|(refused, _)| *refused) {
            Some((_, why)) => Err(why),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn lab() -> LabOptions {
        LabOptions {
            podwire: PathBuf::from("podwire"),
            nodes: 2,
            backend: Backend::Udp,
            peer_kernel: false,
            direct_routing: false,
            transfer_mb: 1,
            workers: 1,
            ping_count: 1,
            udp_count: 1,
            json: None,
            capture: None,
            keep_logs: false,
            etcd: false,
            kube: false,
            extra_leases: 0,
            vxlan_tx: VxlanTx::Socket,
            services: false,
            ip_masq: false,
            kube_proxy: KubeProxyMode::Iptables,
            conntrack: true,
            soak_seconds: 0,
            soak_pps: 1,
            udp_gro: true,
            peer_queues: true,
            io_xdp: false,
            pod_xdp: false,
            l2: false,
            forward_drop: false,
        }
    }

    /// Every refused combination is refused with its own reason, and its allowed neighbour is
    /// not.
    #[test]
    fn test_each_refused_combination_names_its_rule() {
        let vxlan = || LabOptions {
            backend: Backend::Vxlan,
            ..lab()
        };
        let cases: [(LabOptions, LabOptions, Refused); 11] = [
            (LabOptions { nodes: 1, ..lab() }, lab(), Refused::Nodes),
            (
                LabOptions {
                    direct_routing: true,
                    ..lab()
                },
                LabOptions {
                    direct_routing: true,
                    backend: Backend::KernelVxlan,
                    ..lab()
                },
                Refused::DirectRoutingWithoutVxlan,
            ),
            (
                LabOptions {
                    peer_kernel: true,
                    backend: Backend::KernelVxlan,
                    ..lab()
                },
                LabOptions {
                    peer_kernel: true,
                    ..vxlan()
                },
                Refused::PeerKernelWithoutVxlan,
            ),
            (
                LabOptions {
                    extra_leases: 5,
                    ..lab()
                },
                LabOptions {
                    extra_leases: 5,
                    etcd: true,
                    ..lab()
                },
                Refused::ExtraLeasesWithoutEtcd,
            ),
            (
                LabOptions {
                    services: true,
                    ..lab()
                },
                LabOptions {
                    services: true,
                    nodes: 3,
                    ..lab()
                },
                Refused::ServicesNodes,
            ),
            (
                LabOptions {
                    services: true,
                    nodes: 3,
                    conntrack: false,
                    ..lab()
                },
                LabOptions {
                    nodes: 3,
                    conntrack: false,
                    ..lab()
                },
                Refused::ServicesWithoutConntrack,
            ),
            (
                LabOptions {
                    extra_leases: 30_001,
                    etcd: true,
                    ..lab()
                },
                LabOptions {
                    extra_leases: 30_000,
                    etcd: true,
                    ..lab()
                },
                Refused::TooManyExtraLeases,
            ),
            (
                LabOptions {
                    kube: true,
                    etcd: true,
                    extra_leases: 5,
                    ..lab()
                },
                LabOptions {
                    etcd: true,
                    extra_leases: 5,
                    ..lab()
                },
                Refused::KubeWithExtraLeases,
            ),
            (
                LabOptions { l2: true, ..lab() },
                LabOptions {
                    l2: true,
                    ..vxlan()
                },
                Refused::L2WithoutPodwireVxlan,
            ),
            (
                LabOptions {
                    l2: true,
                    ip_masq: true,
                    ..vxlan()
                },
                LabOptions {
                    ip_masq: true,
                    ..vxlan()
                },
                Refused::L2With,
            ),
            (
                LabOptions {
                    l2: true,
                    forward_drop: true,
                    ..vxlan()
                },
                LabOptions {
                    forward_drop: true,
                    ..vxlan()
                },
                Refused::ForwardDropWithL2,
            ),
        ];
        for (refused, allowed, why) in cases {
            assert_eq!(refused.validate(), Err(why.clone()), "{why}");
            assert_eq!(allowed.validate(), Ok(()), "the neighbour of {why}");
        }
    }

    /// The names users type, as the lab has always spelled them.
    #[test]
    fn test_names_are_the_typed_spellings() {
        let names = |all: &[Backend]| all.iter().map(Backend::to_string).collect::<Vec<_>>();
        assert_eq!(
            names(Backend::value_variants()),
            ["udp", "vxlan", "kernel-vxlan"]
        );
        assert_eq!(VxlanTx::FlowPorts.to_string(), "flow-ports");
        assert_eq!(VxlanTx::Socket.to_string(), "socket");
    }
}
