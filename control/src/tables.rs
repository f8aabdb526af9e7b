//! From a cluster view to the dataplane's tables: the subnet map and this node's identity.

use crate::config::{BackendConfig, ConfigError};
use crate::store::ClusterView;
use podwire_dataplane::pipeline::{LocalNode, Tables};
use podwire_dataplane::route::{Ipv4Net, SubnetMap};
use std::net::Ipv4Addr;

/// Builds the tables a node with `public_ip` forwards with. Its own lease is the one whose
/// PublicIP is ours, as flanneld reuses a lease by PublicIP.
pub fn build(view: &ClusterView, public_ip: Ipv4Addr) -> Result<Tables, ConfigError> {
    let cfg = &view.config;
    let mut map = SubnetMap::new(cfg.network, cfg.subnet_len)
        .map_err(|e| ConfigError::new("config.SubnetLen", e.to_string()))?;
    let mut own: Option<Ipv4Net> = None;
    for lease in &view.leases {
        let key = format!("subnets.{}", lease.subnet.flannel_key());
        let node = lease.attrs.to_node(lease.subnet, &key)?;
        map.insert(node)
            .map_err(|e| ConfigError::new(&key, e.to_string()))?;
        if lease.attrs.public_ip == public_ip {
            if let Some(first) = own {
                return Err(ConfigError::new(
                    &key,
                    format!("a second lease for PublicIP {public_ip} (first: {first})"),
                ));
            }
            own = Some(lease.subnet);
        }
    }
    let subnet = own.ok_or_else(|| {
        ConfigError::new(
            "subnets",
            format!("no lease has PublicIP {public_ip}: add this node's lease"),
        )
    })?;
    let peer_port = match cfg.backend {
        BackendConfig::Udp { port } => port,
        BackendConfig::Vxlan { port, .. } => port,
    };
    Ok(Tables {
        map,
        local: LocalNode {
            subnet,
            public_ip,
            tun_addr: subnet.addr(),
        },
        peer_port,
    })
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
        )
        .unwrap();
        assert_eq!(t.local.subnet.to_string(), "10.244.2.0/24");
        assert_eq!(t.local.tun_addr, Ipv4Addr::new(10, 244, 2, 0));
        assert_eq!(t.peer_port, 8285);
        assert_eq!(t.map.len(), 2);
    }

    #[test]
    fn test_missing_or_double_own_lease() {
        let view = parse_cluster(FILE).unwrap();
        assert_eq!(
            build(&view, "192.168.0.9".parse().unwrap())
                .unwrap_err()
                .key,
            "subnets"
        );
        let double = parse_cluster(&FILE.replace("192.168.0.2", "192.168.0.1")).unwrap();
        assert_eq!(
            build(&double, "192.168.0.1".parse().unwrap())
                .unwrap_err()
                .key,
            "subnets.10.244.2.0-24"
        );
    }
}
