//! From a cluster view to the dataplane's tables: the subnet map and this node's identity.

use crate::config::{BackendConfig, ConfigError};
use crate::store::ClusterView;
use podwire_dataplane::pipeline::{Encap, LocalNode, Tables};
use podwire_dataplane::route::{Backend, Ipv4Net, SubnetMap};
use podwire_dataplane::wire::MacAddr;
use std::net::Ipv4Addr;

/// Builds the tables a node with `public_ip` forwards with. Its own lease is `own` when the
/// store handed it out, else the one whose PublicIP is ours (as flanneld reuses a lease by
/// PublicIP). With `own` given, other leases that claim our PublicIP (stale ones a store may
/// still hold) are left out: routing them would send traffic back to ourselves.
pub fn build(
    view: &ClusterView,
    public_ip: Ipv4Addr,
    own: Option<Ipv4Net>,
) -> Result<Tables, ConfigError> {
    let cfg = &view.config;
    let mut map = SubnetMap::new(cfg.network, cfg.subnet_len)
        .map_err(|e| ConfigError::new("config.SubnetLen", e.to_string()))?;
    let mut own_found: Option<(Ipv4Net, Backend)> = None;
    for lease in &view.leases {
        let key = format!("subnets.{}", lease.subnet.flannel_key());
        if own.is_some_and(|o| o != lease.subnet) && lease.attrs.public_ip == public_ip {
            tracing::warn!(%key, "leaving out a second lease with our PublicIP");
            continue;
        }
        let node = lease.attrs.to_node(lease.subnet, &key)?;
        map.insert(node)
            .map_err(|e| ConfigError::new(&key, e.to_string()))?;
        if lease.attrs.public_ip == public_ip {
            if let Some((first, _)) = own_found {
                return Err(ConfigError::new(
                    &key,
                    format!("a second lease for PublicIP {public_ip} (first: {first})"),
                ));
            }
            own_found = Some((lease.subnet, node.backend));
        }
    }
    let (subnet, own_backend) = own_found.ok_or_else(|| {
        ConfigError::new(
            "subnets",
            format!("no lease has PublicIP {public_ip}: add this node's lease"),
        )
    })?;
    let (peer_port, encap) = match cfg.backend {
        BackendConfig::Udp { port } => (port, Encap::FlannelUdp),
        BackendConfig::Vxlan { vni, port, .. } => {
            // Our VtepMAC is the one our lease advertises, so it survives restarts; a lease
            // without one (written by a udp node) gets one derived from the PublicIP, stable too.
            let local_mac = match own_backend {
                Backend::Vxlan { vtep_mac, .. } => vtep_mac,
                Backend::Udp | Backend::Other => derived_vtep_mac(public_ip),
            };
            (port, Encap::Vxlan { vni, local_mac })
        }
    };
    Ok(Tables {
        map,
        local: LocalNode {
            subnet,
            public_ip,
            tun_addr: subnet.addr(),
        },
        peer_port,
        encap,
        // The daemon puts the current services snapshot in.
        services: Default::default(),
        // And says whether the outer headers reach the wire as the pipeline wrote them.
        outer_udp_checksum: true,
        wire: None,
    })
}

/// A locally administered unicast MAC that depends only on `public_ip`: `0e:70:` + the address.
pub fn derived_vtep_mac(public_ip: Ipv4Addr) -> MacAddr {
    let o = public_ip.octets();
    MacAddr([0x0e, 0x70, o[0], o[1], o[2], o[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::parse_cluster;

    const FILE: &str = r#"{"config": {"Network": "10.244.0.0/16"}, "subnets": {
        "10.244.1.0-24": {"PublicIP": "192.168.0.1", "PublicIPv6": null},
        "10.244.2.0-24": {"PublicIP": "192.168.0.2", "PublicIPv6": null}}}"#;

    #[test]
    fn test_own_lease_by_public_ip() {
        let t = build(
            &parse_cluster(FILE).unwrap(),
            "192.168.0.2".parse().unwrap(),
            None,
        )
        .unwrap();
        assert_eq!(t.local.subnet.to_string(), "10.244.2.0/24");
        assert_eq!(t.local.tun_addr, Ipv4Addr::new(10, 244, 2, 0));
        assert_eq!(t.peer_port, 8285);
        assert_eq!(t.map.len(), 2);
        assert_eq!(t.encap, Encap::FlannelUdp);
    }

    #[test]
    fn test_vxlan_mac_from_own_lease_or_derived() {
        let vx = FILE.replace(r#""Network": "10.244.0.0/16"}"#, r#""Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}}"#)
            .replace(r#""192.168.0.2", "PublicIPv6": null}"#, r#""192.168.0.2", "PublicIPv6": null, "BackendType": "vxlan", "BackendData": {"VNI": 7, "VtepMAC": "c6:d2:32:6f:8f:44"}}"#);
        let view = parse_cluster(&vx).unwrap();
        let t = build(&view, "192.168.0.2".parse().unwrap(), None).unwrap();
        let vni = podwire_dataplane::wire::vxlan::Vni::new(7).unwrap();
        assert_eq!(
            t.encap,
            Encap::Vxlan {
                vni,
                local_mac: "c6:d2:32:6f:8f:44".parse().unwrap()
            }
        );
        assert_eq!(t.peer_port, 8472);
        let t = build(&view, "192.168.0.1".parse().unwrap(), None).unwrap();
        let mac = derived_vtep_mac("192.168.0.1".parse().unwrap());
        assert!(mac.is_local_unicast());
        assert_eq!(
            t.encap,
            Encap::Vxlan {
                vni,
                local_mac: mac
            }
        );
    }

    #[test]
    fn test_missing_or_double_own_lease() {
        let view = parse_cluster(FILE).unwrap();
        assert_eq!(
            build(&view, "192.168.0.9".parse().unwrap(), None)
                .unwrap_err()
                .key,
            "subnets"
        );
        let double = parse_cluster(&FILE.replace("192.168.0.2", "192.168.0.1")).unwrap();
        assert_eq!(
            build(&double, "192.168.0.1".parse().unwrap(), None)
                .unwrap_err()
                .key,
            "subnets.10.244.2.0-24"
        );
        // A store that handed out our lease: the stale twin is left out of the map.
        let t = build(
            &double,
            "192.168.0.1".parse().unwrap(),
            Some("10.244.1.0/24".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(t.local.subnet.to_string(), "10.244.1.0/24");
        assert_eq!(t.map.len(), 1);
    }
}
