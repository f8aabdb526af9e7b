//! Where services come from: a services file (`--services file:PATH`, re-read when it changes)
//! whose objects are kube-proxy's view of a Service and its EndpointSlices:
//!
//! ```json
//! {"services": [{"name": "default/web", "clusterIP": "10.96.0.10", "protocol": "TCP",
//!   "port": 80, "endpoints": [{"ip": "10.244.2.2", "port": 8080}],
//!   "sessionAffinity": "ClientIP", "sessionAffinityTimeoutSeconds": 10800,
//!   "nodePort": 30080}]}
//! ```
//!
//! `protocol` defaults to TCP, `sessionAffinity` to None, its timeout to Kubernetes' 10800 s.
//! The same object, one per key, is what `<prefix>/services/<namespace>/<name>` holds in etcd.

use podwire_dataplane::conntrack::{PROTO_TCP, PROTO_UDP};
use podwire_dataplane::nat::{ServiceSpec, DEFAULT_AFFINITY_TIMEOUT};
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("service {name}: {why}")]
    Invalid { name: String, why: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    services: Vec<ServiceJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceJson {
    /// `namespace/name`; in etcd the key says it and this may be left out.
    #[serde(default)]
    name: String,
    #[serde(rename = "clusterIP")]
    cluster_ip: Ipv4Addr,
    #[serde(default = "tcp")]
    protocol: String,
    port: u16,
    #[serde(default)]
    endpoints: Vec<EndpointJson>,
    #[serde(default)]
    session_affinity: Option<String>,
    #[serde(default)]
    session_affinity_timeout_seconds: Option<u32>,
    #[serde(default)]
    node_port: Option<u16>,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointJson {
    ip: Ipv4Addr,
    port: u16,
}

impl ServiceJson {
    fn into_spec(self) -> Result<ServiceSpec, ServicesError> {
        if self.name.is_empty() {
            return Err(ServicesError::Invalid {
                name: self.cluster_ip.to_string(),
                why: "no name".into(),
            });
        }
        let invalid = |why: String| ServicesError::Invalid {
            name: self.name.clone(),
            why,
        };
        let proto = match self.protocol.as_str() {
            "TCP" => PROTO_TCP,
            "UDP" => PROTO_UDP,
            other => return Err(invalid(format!("protocol {other:?}: TCP or UDP"))),
        };
        let affinity_timeout = match self.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => Some(
                self.session_affinity_timeout_seconds
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT),
            ),
            Some(other) => {
                return Err(invalid(format!(
                    "sessionAffinity {other:?}: None or ClientIP"
                )))
            }
        };
        if self.port == 0 {
            return Err(invalid("port 0".into()));
        }
        if let Some(e) = self.endpoints.iter().find(|e| e.port == 0) {
            return Err(invalid(format!("endpoint {}:0", e.ip)));
        }
        Ok(ServiceSpec {
            endpoints: self
                .endpoints
                .iter()
                .map(|e| SocketAddrV4::new(e.ip, e.port))
                .collect(),
            name: self.name,
            cluster_ip: self.cluster_ip,
            port: self.port,
            proto,
            affinity_timeout,
            node_port: self.node_port,
        })
    }
}

/// Parses a services file's contents.
pub fn parse_file(text: &str, what: &str) -> Result<Vec<ServiceSpec>, ServicesError> {
    let f: File = serde_json::from_str(text).map_err(|source| ServicesError::Json {
        what: what.to_string(),
        source,
    })?;
    f.services.into_iter().map(ServiceJson::into_spec).collect()
}

/// Parses one service object (an etcd value) stored under `name` (`namespace/name`), which it
/// takes as its name unless it names itself.
pub fn parse_one(text: &[u8], name: &str) -> Result<ServiceSpec, ServicesError> {
    let mut s: ServiceJson =
        serde_json::from_slice(text).map_err(|source| ServicesError::Json {
            what: name.to_string(),
            source,
        })?;
    if s.name.is_empty() {
        s.name = name.to_string();
    }
    s.into_spec()
}

/// The services of `<prefix>/services/<namespace>/<name>` keys; a malformed one is left out
/// with a warning (as a malformed lease is), so one bad object cannot take the others down.
pub fn parse_etcd(items: &[(String, Vec<u8>)]) -> Vec<ServiceSpec> {
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items {
        let name = key
            .split_once("/services/")
            .map_or(key.as_str(), |(_, n)| n);
        match parse_one(value, name) {
            Ok(spec) => out.push(spec),
            Err(e) => tracing::warn!(%key, error = %e, "ignoring a malformed service in etcd"),
        }
    }
    out
}

/// A services file watched by modification time and size.
pub struct ServicesFile {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl ServicesFile {
    pub fn new(path: &Path) -> ServicesFile {
        ServicesFile {
            path: path.to_path_buf(),
            seen: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the next `poll` read the file whether it changed or not (SIGHUP).
    pub fn forget(&mut self) {
        self.seen = None;
    }

    /// The services if the file changed since the last call (always on the first).
    pub fn poll(&mut self) -> Result<Option<Vec<ServiceSpec>>, ServicesError> {
        let read_err = |source| ServicesError::Read {
            path: self.path.clone(),
            source,
        };
        let md = std::fs::metadata(&self.path).map_err(read_err)?;
        let stamp = (md.modified().map_err(read_err)?, md.len());
        if self.seen == Some(stamp) {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.path).map_err(read_err)?;
        self.seen = Some(stamp);
        parse_file(&text, &self.path.display().to_string()).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_issue_format_parses_with_defaults() {
        let specs = parse_file(
            r#"{"services": [
                {"name": "default/web", "clusterIP": "10.96.0.10", "protocol": "TCP", "port": 80,
                 "endpoints": [{"ip": "10.244.2.2", "port": 8080}, {"ip": "10.244.3.2", "port": 8080}],
                 "sessionAffinity": "None", "nodePort": 30080},
                {"name": "kube-system/dns", "clusterIP": "10.96.0.53", "protocol": "UDP", "port": 53,
                 "endpoints": [], "sessionAffinity": "ClientIP"},
                {"name": "default/bare", "clusterIP": "10.96.0.11", "port": 443}
            ]}"#,
            "test",
        )
        .unwrap();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].proto, PROTO_TCP);
        assert_eq!(specs[0].endpoints.len(), 2);
        assert_eq!(specs[0].node_port, Some(30080));
        assert_eq!(specs[0].affinity_timeout, None);
        assert_eq!(specs[1].proto, PROTO_UDP);
        assert_eq!(specs[1].affinity_timeout, Some(10_800));
        assert_eq!(specs[2].proto, PROTO_TCP);
        assert!(specs[2].endpoints.is_empty());
    }

    #[test]
    fn test_etcd_objects_take_their_name_from_the_key_and_bad_ones_are_skipped() {
        let items = vec![
            (
                "/coreos.com/network/services/default/web".to_string(),
                br#"{"clusterIP": "10.96.0.10", "port": 80, "endpoints": [{"ip": "10.244.2.2", "port": 8080}]}"#.to_vec(),
            ),
            (
                "/coreos.com/network/services/default/broken".to_string(),
                b"{not json".to_vec(),
            ),
            (
                "/coreos.com/network/services/kube-system/dns".to_string(),
                br#"{"name": "kube-system/kube-dns", "clusterIP": "10.96.0.53", "protocol": "UDP", "port": 53}"#.to_vec(),
            ),
        ];
        let specs = parse_etcd(&items);
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "default/web");
        assert_eq!(specs[1].name, "kube-system/kube-dns");
    }

    #[test]
    fn test_bad_services_are_named() {
        for (text, want) in [
            (
                r#"{"services":[{"name":"a/b","clusterIP":"10.96.0.1","port":80,"protocol":"SCTP"}]}"#,
                "a/b",
            ),
            (
                r#"{"services":[{"name":"a/c","clusterIP":"10.96.0.1","port":0}]}"#,
                "port 0",
            ),
            (
                r#"{"services":[{"name":"a/d","clusterIP":"10.96.0.1","port":1,"sessionAffinity":"Cookie"}]}"#,
                "Cookie",
            ),
            (
                r#"{"services":[{"name":"a/e","clusterIP":"10.96.0.300","port":1}]}"#,
                "test",
            ),
            (
                r#"{"services":[{"name":"a/f","clusterIP":"10.96.0.1","port":1,"typo":1}]}"#,
                "typo",
            ),
        ] {
            let e = parse_file(text, "test").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
