//! The cluster store: where the network config and every node's lease live.
//!
//! `Store` is what the daemon needs of it: the config, our own lease (taken and renewed as
//! flanneld does), and every lease, kept current. Two stores implement it:
//! - [`crate::etcd::EtcdStore`]: flannel's etcd v3 keyspace, shared with flanneld nodes.
//! - [`FileStore`], the embedded store: a JSON file that mirrors the same keyspace exactly, so
//!   moving to etcd changes no data:
//!   `{"config": <net-conf.json>, "subnets": {"10.244.1.0-24": <lease JSON>, ...}}`.
//!   It is read-only: every node's lease is written into it beforehand.

use crate::allocate;
use crate::config::{ConfigError, NetConfJson, NetworkConfig};
use crate::lease::LeaseAttrs;
use podwire_dataplane::route::Ipv4Net;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{at}: {source}")]
    Invalid { at: String, source: ConfigError },
    #[error("unsupported store {0:?} (want file:PATH)")]
    Spec(String),
    #[error("{0} is missing: write the network config (net-conf.json) there first")]
    NoConfig(String),
    #[error("{store}: no lease has PublicIP {public_ip} (a file store is read-only: add this node's lease to it)")]
    NoLease { store: String, public_ip: Ipv4Addr },
    #[error("no free subnet left between SubnetMin and SubnetMax")]
    Exhausted,
    #[error("gave up taking a subnet after {0} attempts lost to other nodes")]
    Contended(usize),
    #[error("our lease {0} is gone from the store")]
    LeaseLost(Ipv4Net),
    /// Not a `source`: its chain is folded into one readable line here, so it is not
    /// repeated (as nested debug text) below the message.
    #[error("etcd ({endpoints}): {}", crate::etcd::readable(.error))]
    Etcd {
        endpoints: String,
        error: etcd_client::Error,
    },
    #[error("etcd ({endpoints}): no answer within {timeout:?}")]
    Timeout {
        endpoints: String,
        timeout: Duration,
    },
    #[error("etcd ({endpoints}) unreachable; next attempt in {retry_in:?}")]
    Reconnecting {
        endpoints: String,
        retry_in: Duration,
    },
    /// The Kubernetes API (`--kube-subnet-mgr`): the request and what went wrong, one line.
    #[error("kube: {0}")]
    Kube(String),
    #[error("etcd TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
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

/// What a node asks for when it takes its lease.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    pub config: NetworkConfig,
    pub public_ip: Ipv4Addr,
    /// The value to write (flanneld's form for our backend).
    pub attrs: LeaseAttrs,
    /// The subnet of the previous run (from subnet.env), taken again if it is still free.
    pub previous: Option<Ipv4Net>,
}

/// The lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
    /// When it runs out unless renewed; `None` for leases that never expire (a file store's,
    /// or an etcd reservation: a key without an etcd lease).
    pub expires: Option<SystemTime>,
}

/// A cluster store.
/// Keys and their values, as read from the store.
pub type KeyValues = Vec<(String, Vec<u8>)>;

pub trait Store: Send {
    /// A short description for logs ("file:/etc/podwire/cluster.json", "etcd http://...").
    fn describe(&self) -> String;
    /// Reads and validates the network config.
    fn config(&mut self) -> Result<NetworkConfig, StoreError>;
    /// Takes this node's lease as flanneld does: the lease with our PublicIP, else the previous
    /// subnet if free, else a random free one; a lost race is retried.
    fn acquire(&mut self, req: &LeaseRequest) -> Result<OwnLease, StoreError>;
    /// Extends our lease by a full TTL; `LeaseLost` if it is no longer in the store.
    fn renew(&mut self, req: &LeaseRequest, own: &OwnLease) -> Result<OwnLease, StoreError>;
    /// Every valid lease as the store last showed it (leases that fail validation are logged
    /// and left out, so one bad key cannot freeze the cluster's map).
    fn leases(&mut self) -> Result<Vec<Lease>, StoreError>;
    /// Waits at most `wait` for lease changes; true if `leases` has something new. An error
    /// means the store is unreachable: the caller keeps its last map and calls again.
    fn wait_changes(&mut self, wait: Duration) -> Result<bool, StoreError>;
    /// The services the store holds (`<prefix>/services/<namespace>/<name>` in etcd, as
    /// (key, value) pairs) if they changed since the last call; always on the first. None:
    /// unchanged, or a store without services.
    fn services(&mut self) -> Result<Option<KeyValues>, StoreError> {
        Ok(None)
    }
    /// Times the store connection was re-established after a failure.
    fn reconnects(&self) -> u64 {
        0
    }
    /// Leases the store holds that `leases` leaves out as invalid (0 for a store that refuses
    /// a bad lease whole, as the file store does).
    fn rejected_leases(&self) -> u64 {
        0
    }
}

/// Opens a file store from its spec (`file:PATH`).
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
        let subnet = crate::subnet_key::parse(&key)
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

impl FileStore {
    /// Reads the whole file.
    pub fn load(&mut self) -> Result<ClusterView, StoreError> {
        let stamp = self.stamp();
        let text = std::fs::read_to_string(&self.path).map_err(|source| StoreError::Read {
            path: self.path.clone(),
            source,
        })?;
        self.seen = stamp;
        parse_cluster(&text).map_err(|source| StoreError::Invalid {
            at: self.path.display().to_string(),
            source,
        })
    }

    /// Cheap check whether the file changed since the last `load`.
    pub fn changed(&self) -> bool {
        self.stamp() != self.seen
    }
}

impl Store for FileStore {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn config(&mut self) -> Result<NetworkConfig, StoreError> {
        Ok(self.load()?.config)
    }

    fn acquire(&mut self, req: &LeaseRequest) -> Result<OwnLease, StoreError> {
        let view = self.load()?;
        view.leases
            .into_iter()
            .find(|l| {
                l.attrs.public_ip == req.public_ip && allocate::compatible(&view.config, &l.subnet)
            })
            .map(|l| OwnLease {
                subnet: l.subnet,
                attrs: l.attrs,
                expires: None,
            })
            .ok_or_else(|| StoreError::NoLease {
                store: self.describe(),
                public_ip: req.public_ip,
            })
    }

    fn renew(&mut self, _req: &LeaseRequest, own: &OwnLease) -> Result<OwnLease, StoreError> {
        Ok(own.clone())
    }

    fn leases(&mut self) -> Result<Vec<Lease>, StoreError> {
        Ok(self.load()?.leases)
    }

    fn wait_changes(&mut self, wait: Duration) -> Result<bool, StoreError> {
        std::thread::sleep(wait);
        Ok(self.changed())
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
        let mut store = FileStore::new(&path);
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
        assert!(open(&format!("file:{}", path.display())).is_ok());
    }
}
