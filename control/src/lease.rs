//! Lease values in flanneld's JSON form (`LeaseAttrs`), byte for byte.
//!
//! `PublicIPv6` is always written (null when unset); `BackendType`/`BackendData` are omitted when
//! empty, which is exactly what flanneld's udp backend writes: `{"PublicIP":"x","PublicIPv6":null}`.

use crate::config::ConfigError;
use podwire_dataplane::route::{Backend, Ipv4Net, Node};
use podwire_dataplane::wire::vxlan::Vni;
use podwire_dataplane::wire::MacAddr;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

/// One lease's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_type: Option<String>,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<serde_json::Value>,
}

impl LeaseAttrs {
    /// The attrs flanneld's udp backend writes for `public_ip`.
    pub fn udp(public_ip: Ipv4Addr) -> LeaseAttrs {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: None,
            backend_data: None,
            backend_v6_data: None,
        }
    }

    /// The node this lease describes; `key` names the lease in errors.
    pub fn to_node(&self, subnet: Ipv4Net, key: &str) -> Result<Node, ConfigError> {
        let backend = match self
            .backend_type
            .as_deref()
            .map(str::to_lowercase)
            .as_deref()
        {
            None | Some("") | Some("udp") => Backend::Udp,
            Some("vxlan") => {
                let data = self
                    .backend_data
                    .as_ref()
                    .and_then(|d| d.as_object())
                    .ok_or_else(|| {
                        ConfigError::new(
                            format!("{key}.BackendData"),
                            "a vxlan lease needs BackendData {VNI, VtepMAC}",
                        )
                    })?;
                let vni = data
                    .get("VNI")
                    .and_then(|v| v.as_u64())
                    .and_then(|v| u32::try_from(v).ok())
                    .and_then(Vni::new)
                    .ok_or_else(|| {
                        ConfigError::new(
                            format!("{key}.BackendData.VNI"),
                            "missing or not a 24-bit number",
                        )
                    })?;
                let vtep_mac: MacAddr = data
                    .get("VtepMAC")
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| {
                        ConfigError::new(format!("{key}.BackendData.VtepMAC"), "missing")
                    })?
                    .parse()
                    .map_err(|e| {
                        ConfigError::new(format!("{key}.BackendData.VtepMAC"), format!("{e}"))
                    })?;
                // A VTEP is one station: a group address is flooded, all-zero is a kernel
                // VXLAN FDB's default (head-end replication) entry. flanneld advertises its
                // device's own address, always unicast.
                if vtep_mac.is_multicast() || vtep_mac == MacAddr::ZERO {
                    return Err(ConfigError::new(
                        format!("{key}.BackendData.VtepMAC"),
                        format!("{vtep_mac} is not a unicast MAC"),
                    ));
                }
                Backend::Vxlan { vni, vtep_mac }
            }
            Some(_) => Backend::Other,
        };
        Ok(Node {
            subnet,
            public_ip: self.public_ip,
            backend,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_udp_lease_is_byte_compatible_with_flanneld() {
        let json = serde_json::to_string(&LeaseAttrs::udp(Ipv4Addr::new(192, 168, 64, 3))).unwrap();
        assert_eq!(json, r#"{"PublicIP":"192.168.64.3","PublicIPv6":null}"#);
    }

    #[test]
    fn test_flannel_vxlan_lease_round_trips() {
        let text = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let attrs: LeaseAttrs = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&attrs).unwrap(), text);
        let node = attrs
            .to_node("10.244.1.0/24".parse().unwrap(), "k")
            .unwrap();
        assert_eq!(
            node.backend,
            Backend::Vxlan {
                vni: Vni::new(1).unwrap(),
                vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap()
            }
        );
    }

    #[test]
    fn test_bad_vxlan_data_names_the_key() {
        let attrs: LeaseAttrs = serde_json::from_str(r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#).unwrap();
        let e = attrs
            .to_node("10.244.1.0/24".parse().unwrap(), "subnets.10.244.1.0-24")
            .unwrap_err();
        assert_eq!(e.key, "subnets.10.244.1.0-24.BackendData.VtepMAC");
    }

    #[test]
    fn test_multicast_and_all_zero_vtep_macs_are_refused() {
        for mac in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "33:33:00:00:00:01",
            "00:00:00:00:00:00",
        ] {
            let attrs: LeaseAttrs = serde_json::from_str(&format!(
                r#"{{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
            ))
            .unwrap();
            let e = attrs
                .to_node("10.244.1.0/24".parse().unwrap(), "subnets.10.244.1.0-24")
                .unwrap_err();
            assert_eq!(e.key, "subnets.10.244.1.0-24.BackendData.VtepMAC", "{mac}");
        }
    }

    #[test]
    fn test_other_backends_are_known_but_other() {
        let attrs: LeaseAttrs = serde_json::from_str(
            r#"{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendType":"host-gw"}"#,
        )
        .unwrap();
        assert_eq!(
            attrs
                .to_node("10.244.1.0/24".parse().unwrap(), "k")
                .unwrap()
                .backend,
            Backend::Other
        );
    }
}
