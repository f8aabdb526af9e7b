//! From a cluster view to the dataplane's tables: the subnet map and this node's identity.

use crate::config::{BackendConfig, ConfigError};
use crate::store::ClusterView;
use podwire_dataplane::pipeline::{Encap, LocalNode, Tables};
use podwire_dataplane::route::{Backend, Ipv4Net, SubnetMap};
use podwire_dataplane::wire::MacAddr;
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

/// Builds the tables a node with `public_ip` forwards with. Its own lease is `own` when the
/// store handed it out, else the one whose PublicIP is ours (as flanneld reuses a lease by
/// PublicIP). With `own` given, other leases that claim our PublicIP (stale ones a store may
/// still hold) are left out: routing them would send traffic back to ourselves. Leases whose
/// VtepMAC another node's lease has too are left out (see [`build_checked`]).
pub fn build(
    view: &ClusterView,
    public_ip: Ipv4Addr,
    own: Option<Ipv4Net>,
) -> Result<Tables, ConfigError> {
    build_checked(view, public_ip, own).map(|(t, _)| t)
}

/// [`build`], and the leases it left out (each logged here). A VtepMAC names one VTEP, behind
/// one PublicIP: where leases of different PublicIPs advertise the same one, nothing says
/// which is the real node, so all of them are left out, on every node alike, except our own
/// lease on this node, which keeps its VtepMAC (the others claiming it are left out). Leases
/// of one PublicIP sharing a VtepMAC are one node's (a stale lease and its new one) and stay.
pub fn build_checked(
    view: &ClusterView,
    public_ip: Ipv4Addr,
    own: Option<Ipv4Net>,
) -> Result<(Tables, Vec<LeftOut>), ConfigError> {
    let cfg = &view.config;
    let mut map = SubnetMap::new(cfg.network, cfg.subnet_len)
        .map_err(|e| ConfigError::new("config.SubnetLen", e.to_string()))?;
    // Every lease as a node, or None for a second lease of ours.
    let mut nodes = Vec::with_capacity(view.leases.len());
    for lease in &view.leases {
        let key = format!("subnets.{}", crate::subnet_key::of(&lease.subnet));
        if own.is_some_and(|o| o != lease.subnet) && lease.attrs.public_ip == public_ip {
            nodes.push((key, None));
            continue;
        }
        let node = lease.attrs.to_node(lease.subnet, &key)?;
        nodes.push((key, Some(node)));
    }
    // VtepMAC -> the PublicIPs advertising it; ours with the MAC we will use.
    let mut claims: HashMap<MacAddr, BTreeSet<Ipv4Addr>> = HashMap::new();
    let mut our_mac = None;
    for node in nodes.iter().filter_map(|(_, n)| n.as_ref()) {
        match node.backend {
            Backend::Vxlan { vtep_mac, .. } => {
                claims.entry(vtep_mac).or_default().insert(node.public_ip);
            }
            _ if node.public_ip == public_ip => our_mac = Some(derived_vtep_mac(public_ip)),
            _ => {}
        }
    }
    if let (Some(mac), BackendConfig::Vxlan { .. }) = (our_mac, cfg.backend) {
        claims.entry(mac).or_default().insert(public_ip);
    }
    let mut left_out = Vec::new();
    let mut own_found: Option<(Ipv4Net, Backend)> = None;
    for (key, node) in nodes {
        let Some(node) = node else {
            tracing::warn!(%key, "leaving out a second lease with our PublicIP");
            left_out.push(LeftOut {
                key,
                why: LeftOutReason::OurPublicIp,
            });
            continue;
        };
        if let Backend::Vxlan { vtep_mac, .. } = node.backend {
            let holders = &claims[&vtep_mac];
            if holders.len() > 1 && node.public_ip != public_ip {
                let other = holders.iter().find(|&&ip| ip != node.public_ip);
                tracing::warn!(
                    %key, %vtep_mac, public_ip = %node.public_ip, other = ?other,
                    "leaving out a lease whose VtepMAC another node's lease advertises too"
                );
                left_out.push(LeftOut {
                    key,
                    why: LeftOutReason::SharedVtepMac(vtep_mac),
                });
                continue;
            }
        }
        map.insert(node)
            .map_err(|e| ConfigError::new(&key, e.to_string()))?;
        if node.public_ip == public_ip {
            if let Some((first, _)) = own_found {
                return Err(ConfigError::new(
                    &key,
                    format!("a second lease for PublicIP {public_ip} (first: {first})"),
                ));
            }
            own_found = Some((node.subnet, node.backend));
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
    let tables = Tables {
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
    };
    Ok((tables, left_out))
}

/// A lease left out of the subnet map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    /// `subnets.<net>-<len>`.
    pub key: String,
    pub why: LeftOutReason,
}

/// Why a lease was left out of the subnet map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftOutReason {
    /// A second lease with our PublicIP (a stale one of ours).
    OurPublicIp,
    /// Its VtepMAC is also another node's (a lease with another PublicIP).
    SharedVtepMac(MacAddr),
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

    /// A vxlan cluster of `(subnet's third octet, PublicIP's last octet, VtepMAC's last byte)`.
    fn vxlan_view(leases: &[(u8, u8, u8)]) -> ClusterView {
        let subnets: Vec<String> = leases
            .iter()
            .map(|(n, ip, mac)| {
                format!(
                    r#""10.244.{n}.0-24": {{"PublicIP": "192.168.0.{ip}", "PublicIPv6": null, "BackendType": "vxlan", "BackendData": {{"VNI": 1, "VtepMAC": "0e:70:00:00:00:{mac:02x}"}}}}"#
                )
            })
            .collect();
        parse_cluster(&format!(
            r#"{{"config": {{"Network": "10.244.0.0/16", "Backend": {{"Type": "vxlan"}}}}, "subnets": {{{}}}}}"#,
            subnets.join(",")
        ))
        .unwrap()
    }

    #[test]
    fn test_leases_sharing_a_vtep_mac_are_left_out() {
        let view = vxlan_view(&[
            (1, 1, 1),
            (2, 2, 2),
            (3, 3, 2), // node 2's VtepMAC
            (4, 4, 1), // node 1's
            (5, 5, 5),
            (6, 6, 6),
            (7, 6, 6), // node 6 twice (a stale lease): one node, one VtepMAC
        ]);
        let subnets = |t: &Tables| {
            let mut v: Vec<String> = t.map.nodes().map(|n| n.subnet.to_string()).collect();
            v.sort();
            v
        };
        let ip = |last: u8| Ipv4Addr::new(192, 168, 0, last);
        let own = |n: u8| Some(Ipv4Net::new(Ipv4Addr::new(10, 244, n, 0), 24).unwrap());
        // Node 1 keeps its own lease and leaves out whoever claims its VtepMAC.
        let t = build(&view, ip(1), own(1)).unwrap();
        assert_eq!(
            subnets(&t),
            [
                "10.244.1.0/24",
                "10.244.5.0/24",
                "10.244.6.0/24",
                "10.244.7.0/24"
            ]
        );
        // Node 5 cannot tell node 1 from node 4: both are left out.
        let (t, left) = build_checked(&view, ip(5), own(5)).unwrap();
        assert_eq!(
            subnets(&t),
            ["10.244.5.0/24", "10.244.6.0/24", "10.244.7.0/24"]
        );
        let left: Vec<(&str, LeftOutReason)> =
            left.iter().map(|l| (l.key.as_str(), l.why)).collect();
        let mac = |b: u8| LeftOutReason::SharedVtepMac(MacAddr([0x0e, 0x70, 0, 0, 0, b]));
        assert_eq!(
            left,
            [
                ("subnets.10.244.1.0-24", mac(1)),
                ("subnets.10.244.2.0-24", mac(2)),
                ("subnets.10.244.3.0-24", mac(2)),
                ("subnets.10.244.4.0-24", mac(1)),
            ]
        );
        let (_, left) = build_checked(&view, ip(6), own(6)).unwrap();
        assert_eq!(left.len(), 5);
        assert_eq!(left[4].why, LeftOutReason::OurPublicIp);
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
