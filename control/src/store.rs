//! The cluster store: where the network config and every node's lease live.
//!
//! `Store` is what the daemon needs of it; `FileStore` is the embedded store, a JSON file that
//! mirrors flannel's etcd keyspace exactly, so moving to etcd changes no data:
//! `{"config": <net-conf.json>, "subnets": {"10.244.1.0-24": <lease JSON>, ...}}`.

use crate::config::{ConfigError, NetConfJson, NetworkConfig};
use crate::lease::LeaseAttrs;
use podwire_dataplane::route::Ipv4Net;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Why the store could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: ConfigError },
    #[error("unsupported store {0:?} (want file:PATH)")]
    Spec(String),
}

/// One lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
}

/// Everything read from the store at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    pub config: NetworkConfig,
    pub leases: Vec<Lease>,
}

/// A cluster store.
pub trait Store: Send {
    /// A short description for logs ("file:/etc/podwire/cluster.json").
    fn describe(&self) -> String;
    /// Reads the whole config and lease set.
    fn load(&mut self) -> Result<ClusterView, StoreError>;
    /// Cheap check whether `load` could return something new since the last `load`.
    fn changed(&mut self) -> bool;
}

/// Opens a store from its spec (`file:PATH`).
pub fn open(spec: &str) -> Result<Box<dyn Store>, StoreError> {
    match spec.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(Box::new(FileStore::new(path))),
        _ => Err(StoreError::Spec(spec.to_string())),
    }
}

#[derive(Debug, Deserialize)]
struct ClusterFile {
    config: NetConfJson,
    #[serde(default)]
    subnets: BTreeMap<String, LeaseAttrs>,
}

/// Parses a cluster file's text; errors name the key that is wrong.
pub fn parse_cluster(text: &str) -> Result<ClusterView, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let file: ClusterFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::new(
            if path == "." || path == "?" {
                "(document)".to_string()
            } else {
                path
            },
            e.inner().to_string(),
        )
    })?;
    let config = file.config.validate("config.")?;
    let mut leases = Vec::with_capacity(file.subnets.len());
    for (key, attrs) in file.subnets {
        let at = format!("subnets.{key}");
        let subnet = Ipv4Net::from_flannel_key(&key)
            .map_err(|e| ConfigError::new(&at, format!("bad subnet key: {e}")))?;
        if !config.network.covers(&subnet) || subnet.prefix() != config.subnet_len {
            return Err(ConfigError::new(
                &at,
                format!(
                    "lease {subnet} is not a /{} inside the network {}",
                    config.subnet_len, config.network
                ),
            ));
        }
        attrs.to_node(subnet, &at)?;
        leases.push(Lease { subnet, attrs });
    }
    Ok(ClusterView { config, leases })
}

/// The embedded store: one JSON file, re-read when it changes.
pub struct FileStore {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl FileStore {
    pub fn new(path: impl AsRef<Path>) -> FileStore {
        FileStore {
            path: path.as_ref().to_path_buf(),
            seen: None,
        }
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(&self.path).ok()?;
        Some((m.modified().ok()?, m.len()))
    }
}

impl Store for FileStore {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn load(&mut self) -> Result<ClusterView, StoreError> {
        let stamp = self.stamp();
        let text = std::fs::read_to_string(&self.path).map_err(|source| StoreError::Read {
            path: self.path.clone(),
            source,
        })?;
        self.seen = stamp;
        parse_cluster(&text).map_err(|source| StoreError::Invalid {
            path: self.path.clone(),
            source,
        })
    }

    fn changed(&mut self) -> bool {
        self.stamp() != self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "config": {"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}},
        "subnets": {
            "10.244.1.0-24": {"PublicIP": "192.168.0.1", "PublicIPv6": null},
            "10.244.2.0-24": {"PublicIP": "192.168.0.2", "PublicIPv6": null, "BackendType": "vxlan",
                              "BackendData": {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}}
        }
    }"#;

    #[test]
    fn test_parse_good_file() {
        let v = parse_cluster(GOOD).unwrap();
        assert_eq!(v.leases.len(), 2);
        assert_eq!(v.leases[0].subnet.to_string(), "10.244.1.0/24");
        assert_eq!(v.config.subnet_len, 24);
    }

    #[test]
    fn test_errors_name_the_key() {
        let cases = [
            (
                GOOD.replace("10.244.1.0-24", "10.244.1.0/24"),
                "subnets.10.244.1.0/24",
            ),
            (
                GOOD.replace("10.244.1.0-24", "10.245.1.0-24"),
                "subnets.10.245.1.0-24",
            ),
            (
                GOOD.replace("10.244.1.0-24", "10.244.1.0-25"),
                "subnets.10.244.1.0-25",
            ),
            (
                GOOD.replace("\"192.168.0.1\"", "\"192.168.0\""),
                "subnets.10.244.1.0-24.PublicIP",
            ),
            (
                GOOD.replace("c6:d2:32:6f:8f:44", "c6:d2"),
                "subnets.10.244.2.0-24.BackendData.VtepMAC",
            ),
            (
                GOOD.replace("10.244.0.0/16", "10.244.0.0/33"),
                "config.Network",
            ),
            (GOOD.replace("\"config\"", "\"konfig\""), "(document)"),
            ("{ not json".to_string(), "(document)"),
        ];
        for (text, key) in cases {
            let e = parse_cluster(&text).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn test_file_store_notices_changes() {
        let dir = std::env::temp_dir().join(format!("podwire-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.json");
        std::fs::write(&path, GOOD).unwrap();
        let mut store = open(&format!("file:{}", path.display())).unwrap();
        assert!(store.changed());
        assert_eq!(store.load().unwrap().leases.len(), 2);
        assert!(!store.changed());
        std::fs::write(
            &path,
            GOOD.replace(
                ",\n            \"10.244.2.0-24\"",
                ",\n            \"10.244.3.0-24\"",
            ),
        )
        .unwrap();
        assert!(store.changed());
        assert_eq!(
            store.load().unwrap().leases[1].subnet.to_string(),
            "10.244.3.0/24"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(open("etcd:x").is_err());
    }
}
