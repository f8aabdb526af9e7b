//! net-conf.json, read and validated the way flanneld does (`CheckNetworkConfig`).
//!
//! Defaults: `SubnetLen` 24 when the Network is a /22 or shorter, else prefix+2; `SubnetMin` the
//! second subnet; `SubnetMax` the last one. A missing `Backend` means `udp`, as in flannel
//! (whose docs wrongly say vxlan). Unknown keys are ignored, as flanneld ignores them.

use podwire_dataplane::route::Ipv4Net;
use podwire_dataplane::wire::vxlan::Vni;
use serde::Deserialize;
use std::net::Ipv4Addr;

/// flannel udp backend's default port.
pub const UDP_DEFAULT_PORT: u16 = 8285;
/// The Linux (and flannel) VXLAN default port; IANA's is 4789.
pub const VXLAN_DEFAULT_PORT: u16 = 8472;

/// A config value that is wrong, with the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {msg}")]
pub struct ConfigError {
    pub key: String,
    pub msg: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, msg: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            msg: msg.into(),
        }
    }
}

/// net-conf.json as written (flannel's field names).
#[derive(Debug, Clone, Deserialize)]
pub struct NetConfJson {
    #[serde(rename = "Network")]
    pub network: Option<String>,
    #[serde(rename = "SubnetLen", default)]
    pub subnet_len: u8,
    #[serde(rename = "SubnetMin")]
    pub subnet_min: Option<Ipv4Addr>,
    #[serde(rename = "SubnetMax")]
    pub subnet_max: Option<Ipv4Addr>,
    #[serde(rename = "EnableIPv4")]
    pub enable_ipv4: Option<bool>,
    #[serde(rename = "EnableIPv6", default)]
    pub enable_ipv6: bool,
    #[serde(rename = "Backend")]
    pub backend: Option<serde_json::Value>,
}

/// The backend a cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendConfig {
    Udp {
        port: u16,
    },
    Vxlan {
        vni: Vni,
        port: u16,
        direct_routing: bool,
    },
}

impl BackendConfig {
    pub fn name(&self) -> &'static str {
        match self {
            BackendConfig::Udp { .. } => "udp",
            BackendConfig::Vxlan { .. } => "vxlan",
        }
    }
    /// Bytes of encapsulation overhead, which the pod MTU gives up (flannel's `MTU()`).
    pub fn overhead(&self) -> u32 {
        match self {
            BackendConfig::Udp { .. } => 28,
            BackendConfig::Vxlan { .. } => 50,
        }
    }
}

/// A validated network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
}

impl NetConfJson {
    /// Applies flannel's defaults and checks; errors name the key at fault under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<NetworkConfig, ConfigError> {
        let key = |k: &str| format!("{prefix}{k}");
        if self.enable_ipv4 == Some(false) || self.enable_ipv6 {
            return Err(ConfigError::new(
                key("EnableIPv6"),
                "only IPv4 pod networks are supported (EnableIPv4 true, EnableIPv6 false)",
            ));
        }
        let net_str = self
            .network
            .as_deref()
            .ok_or_else(|| ConfigError::new(key("Network"), "missing"))?;
        let network: Ipv4Net = net_str
            .parse()
            .map_err(|e| ConfigError::new(key("Network"), format!("{e}")))?;
        let subnet_len = if self.subnet_len > 0 {
            if self.subnet_len > 30 {
                return Err(ConfigError::new(key("SubnetLen"), "must be /30 or shorter"));
            }
            if self.subnet_len < network.prefix() + 2 {
                return Err(ConfigError::new(
                    key("SubnetLen"),
                    format!(
                        "{network} must hold at least four /{} subnets",
                        self.subnet_len
                    ),
                ));
            }
            self.subnet_len
        } else if network.prefix() < 23 {
            24
        } else {
            network.prefix() + 2
        };
        if subnet_len > 30 {
            return Err(ConfigError::new(
                key("Network"),
                format!("{network} is too small for four subnets"),
            ));
        }
        let subnet_size = 1u32 << (32 - u32::from(subnet_len));
        let aligned = |ip: Ipv4Addr| ip.to_bits() & !(subnet_size - 1) == ip.to_bits();
        let subnet_min = match self.subnet_min {
            None => network.nth(subnet_size),
            Some(ip) if !network.contains(ip) => {
                return Err(ConfigError::new(
                    key("SubnetMin"),
                    format!("{ip} is not in {network}"),
                ))
            }
            Some(ip) => ip,
        };
        let subnet_max = match self.subnet_max {
            None => Ipv4Addr::from_bits(
                network
                    .addr()
                    .to_bits()
                    .wrapping_add((network.size() as u32).wrapping_sub(subnet_size)),
            ),
            Some(ip) if !network.contains(ip) => {
                return Err(ConfigError::new(
                    key("SubnetMax"),
                    format!("{ip} is not in {network}"),
                ))
            }
            Some(ip) => ip,
        };
        if !aligned(subnet_min) {
            return Err(ConfigError::new(
                key("SubnetMin"),
                format!("{subnet_min} is not on a /{subnet_len} boundary"),
            ));
        }
        if !aligned(subnet_max) {
            return Err(ConfigError::new(
                key("SubnetMax"),
                format!("{subnet_max} is not on a /{subnet_len} boundary"),
            ));
        }
        if subnet_min > subnet_max {
            return Err(ConfigError::new(
                key("SubnetMin"),
                format!("{subnet_min} is above SubnetMax {subnet_max}"),
            ));
        }
        let backend = parse_backend(self.backend.as_ref(), &key("Backend"))?;
        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
        })
    }
}

fn port_field(
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    default: u16,
) -> Result<u16, ConfigError> {
    match obj.get("Port") {
        None => Ok(default),
        Some(v) => match v.as_u64() {
            Some(0) => Ok(default),
            Some(p) if p <= 65535 => Ok(p as u16),
            _ => Err(ConfigError::new(
                format!("{key}.Port"),
                format!("{v} is not a UDP port"),
            )),
        },
    }
}

fn parse_backend(
    value: Option<&serde_json::Value>,
    key: &str,
) -> Result<BackendConfig, ConfigError> {
    let empty = serde_json::Map::new();
    let obj = match value {
        None | Some(serde_json::Value::Null) => &empty,
        Some(serde_json::Value::Object(o)) => o,
        Some(other) => return Err(ConfigError::new(key, format!("{other} is not an object"))),
    };
    let kind = match obj.get("Type") {
        None => "udp".to_string(),
        Some(serde_json::Value::String(s)) => s.to_lowercase(),
        Some(other) => {
            return Err(ConfigError::new(
                format!("{key}.Type"),
                format!("{other} is not a string"),
            ))
        }
    };
    match kind.as_str() {
        "udp" => Ok(BackendConfig::Udp {
            port: port_field(obj, key, UDP_DEFAULT_PORT)?,
        }),
        "vxlan" => {
            let vni = match obj.get("VNI") {
                None => 1,
                Some(v) => v.as_u64().ok_or_else(|| {
                    ConfigError::new(format!("{key}.VNI"), format!("{v} is not a number"))
                })?,
            };
            let vni = u32::try_from(vni).ok().and_then(Vni::new).ok_or_else(|| {
                ConfigError::new(format!("{key}.VNI"), format!("{vni} does not fit 24 bits"))
            })?;
            let direct_routing = obj
                .get("DirectRouting")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            Ok(BackendConfig::Vxlan {
                vni,
                port: port_field(obj, key, VXLAN_DEFAULT_PORT)?,
                direct_routing,
            })
        }
        other => Err(ConfigError::new(
            format!("{key}.Type"),
            format!("backend {other:?} is not one podwire speaks (udp, vxlan)"),
        )),
    }
}

/// Parses and validates a net-conf.json document.
pub fn parse_net_conf(text: &str) -> Result<NetworkConfig, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let raw: NetConfJson = serde_path_to_error::deserialize(de)
        .map_err(|e| ConfigError::new(e.path().to_string(), e.inner().to_string()))?;
    raw.validate("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        parse_net_conf(s)
    }

    #[test]
    fn test_flannel_defaults() {
        let c = parse(r#"{"Network": "10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend, BackendConfig::Udp { port: 8285 });
        let small = parse(r#"{"Network": "10.0.0.0/24"}"#).unwrap();
        assert_eq!(small.subnet_len, 26);
        assert_eq!(small.subnet_min, Ipv4Addr::new(10, 0, 0, 64));
        assert_eq!(small.subnet_max, Ipv4Addr::new(10, 0, 0, 192));
    }

    #[test]
    fn test_backends() {
        let c = parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "UDP", "Port": 9999}}"#)
            .unwrap();
        assert_eq!(c.backend, BackendConfig::Udp { port: 9999 });
        let c = parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#).unwrap();
        assert_eq!(
            c.backend,
            BackendConfig::Vxlan {
                vni: Vni::new(1).unwrap(),
                port: 8472,
                direct_routing: false
            }
        );
        let c = parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 42, "Port": 4789, "DirectRouting": true}}"#).unwrap();
        assert_eq!(
            c.backend,
            BackendConfig::Vxlan {
                vni: Vni::new(42).unwrap(),
                port: 4789,
                direct_routing: true
            }
        );
    }

    #[test]
    fn test_errors_name_the_key() {
        let cases = [
            (r#"{}"#, "Network"),
            (r#"{"Network": "10.244.0.1/16"}"#, "Network"),
            (r#"{"Network": 7}"#, "Network"),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetLen": 31}"#,
                "SubnetLen",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetLen": 17}"#,
                "SubnetLen",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetMin": "10.245.0.0"}"#,
                "SubnetMin",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.3.7"}"#,
                "SubnetMax",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#,
                "Backend.Type",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 70000}}"#,
                "Backend.Port",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}"#,
                "Backend.VNI",
            ),
            (
                r#"{"Network": "10.244.0.0/16", "EnableIPv6": true}"#,
                "EnableIPv6",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
    }
}
