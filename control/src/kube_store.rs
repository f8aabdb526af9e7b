//! The Kubernetes API as the cluster store (`--kube-subnet-mgr`), as flanneld's kube subnet
//! manager keeps it (reference: flannel's `pkg/subnet/kube`):
//!
//! - A node's subnet is its Node's `spec.podCIDRs` (the IPv4 one) or `spec.podCIDR`, given by
//!   kube-controller-manager; nothing is allocated here.
//! - The node publishes its lease as annotations under a prefix (default
//!   `flannel.alpha.coreos.com`): `backend-type`, `backend-data` (the backend's JSON, `null`
//!   for udp), `public-ip`, and `kube-subnet-manager: "true"`. They are written with a
//!   strategic merge patch through `nodes/<name>/status`, as flanneld writes them, and only
//!   when they differ. Then the node's `NetworkUnavailable` condition is set false.
//! - Every Node with `kube-subnet-manager: "true"` and valid annotations is a lease; the rest
//!   are left out (counted as rejected when they claim to be managed but do not parse).
//! - net-conf.json is a file (`--net-config-path`, flanneld's `/etc/kube-flannel/net-conf.json`).
//!
//! Nodes are followed by kube-rs's watcher (list, then watch; a broken or expired watch is
//! relisted with backoff) on a runtime thread of the store's own; the control thread reads the
//! last complete view, so an API server that goes away leaves the last good map in place.

use crate::config::{parse_net_conf, NetworkConfig};
use crate::kube_services::{self, PROXY_SELECTOR};
use crate::lease::LeaseAttrs;
use crate::store::{KeyValues, Lease, LeaseRequest, OwnLease, Store, StoreError};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config};
use podwire_dataplane::route::Ipv4Net;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// flanneld's default `--kube-annotation-prefix`.
pub const DEFAULT_ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com";
/// flanneld's default `--net-config-path`.
pub const DEFAULT_NET_CONF: &str = "/etc/kube-flannel/net-conf.json";
/// How long one request to the API server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the API server and which Node is ours.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// `--kube-api-url`: the API server, overriding the kubeconfig's or the in-cluster one.
    pub api_url: Option<String>,
    /// `--kubeconfig-file`; without it, the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// `--kube-annotation-prefix`.
    pub annotation_prefix: String,
    /// This node's Node name (`NODE_NAME`, from the downward API).
    pub node_name: String,
    /// `--net-config-path`.
    pub net_conf: PathBuf,
}

/// The annotation keys under one prefix.
#[derive(Debug, Clone)]
pub struct AnnotationKeys {
    pub backend_type: String,
    pub backend_data: String,
    pub backend_v6_data: String,
    pub public_ip: String,
    pub public_ipv6: String,
    pub public_ip_overwrite: String,
    pub managed: String,
}

impl AnnotationKeys {
    /// The keys under `prefix`; a prefix that cannot start an annotation key is refused.
    pub fn new(prefix: &str) -> Result<AnnotationKeys, StoreError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b))
            && !prefix.ends_with('/');
        if !ok {
            return Err(StoreError::Kube(format!(
                "--kube-annotation-prefix {prefix:?} is not a DNS-style prefix"
            )));
        }
        let key = |name: &str| format!("{prefix}/{name}");
        Ok(AnnotationKeys {
            backend_type: key("backend-type"),
            backend_data: key("backend-data"),
            backend_v6_data: key("backend-v6-data"),
            public_ip: key("public-ip"),
            public_ipv6: key("public-ipv6"),
            public_ip_overwrite: key("public-ip-overwrite"),
            managed: key("kube-subnet-manager"),
        })
    }
}

/// A Node's IPv4 pod CIDR: the IPv4 one of `spec.podCIDRs`, else `spec.podCIDR`.
pub fn pod_cidr(node: &Node) -> Result<Ipv4Net, String> {
    let spec = node.spec.as_ref();
    let listed = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .filter(|l| !l.is_empty());
    let text = match listed {
        Some(l) if l.len() > 2 => return Err("more than two podCIDRs".into()),
        Some(l) => l
            .iter()
            .find(|c| !c.contains(':'))
            .ok_or("no IPv4 podCIDR (IPv6-only nodes are not carried)")?,
        None => spec
            .and_then(|s| s.pod_cidr.as_ref())
            .filter(|c| !c.is_empty())
            .ok_or("no podCIDR assigned")?,
    };
    text.parse()
        .map_err(|e| format!("podCIDR {text:?} does not parse: {e}"))
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The lease a Node's annotations describe; `Ok(None)` when the node does not say it is
/// managed (`kube-subnet-manager: "true"`), as flanneld skips such nodes.
pub fn node_lease(node: &Node, keys: &AnnotationKeys) -> Result<Option<Lease>, String> {
    if annotation(node, &keys.managed) != Some("true") {
        return Ok(None);
    }
    let ip_text = annotation(node, &keys.public_ip).unwrap_or_default();
    let public_ip: Ipv4Addr = ip_text
        .parse()
        .map_err(|_| format!("public-ip {ip_text:?} is not an IPv4 address"))?;
    let json = |key: &str| -> Result<Option<serde_json::Value>, String> {
        match annotation(node, key).filter(|t| !t.is_empty()) {
            None => Ok(None),
            Some(t) => match serde_json::from_str(t) {
                Ok(serde_json::Value::Null) => Ok(None),
                Ok(v) => Ok(Some(v)),
                Err(e) => Err(format!("{key} is not JSON: {e}")),
            },
        }
    };
    let attrs = LeaseAttrs {
        public_ip,
        public_ipv6: annotation(node, &keys.public_ipv6).and_then(|t| t.parse::<Ipv6Addr>().ok()),
        backend_type: annotation(node, &keys.backend_type)
            .filter(|t| !t.is_empty())
            .map(str::to_string),
        backend_data: json(&keys.backend_data)?,
        backend_v6_data: json(&keys.backend_v6_data)?,
    };
    let subnet = pod_cidr(node)?;
    attrs
        .to_node(subnet, "annotations")
        .map_err(|e| e.to_string())?;
    Ok(Some(Lease { subnet, attrs }))
}

/// The annotations a node publishes for `attrs`, as flanneld writes them.
pub fn lease_annotations(keys: &AnnotationKeys, attrs: &LeaseAttrs) -> BTreeMap<String, String> {
    let data = |v: &Option<serde_json::Value>| match v {
        Some(v) => v.to_string(),
        None => "null".to_string(),
    };
    let mut out = BTreeMap::from([
        (
            keys.backend_type.clone(),
            attrs.backend_type.clone().unwrap_or_default(),
        ),
        (keys.backend_data.clone(), data(&attrs.backend_data)),
        (keys.public_ip.clone(), attrs.public_ip.to_string()),
        (keys.managed.clone(), "true".to_string()),
    ]);
    if let Some(v6) = attrs.public_ipv6 {
        out.insert(keys.public_ipv6.clone(), v6.to_string());
        out.insert(keys.backend_v6_data.clone(), data(&attrs.backend_v6_data));
    }
    out
}

/// What a watcher has seen of one kind, shared with the control thread.
struct Mirror<K> {
    /// Every object (by `namespace/name`, or name) as of the last complete list plus the
    /// events since.
    objects: BTreeMap<String, K>,
    /// A relist in progress: the objects it has brought so far.
    relisting: Option<BTreeMap<String, K>>,
    /// A complete list has been seen.
    synced: bool,
    /// Bumped on every change to `objects`.
    generation: u64,
    /// The last watch error, until the next event that arrived well.
    failing: Option<String>,
    /// Times the watch came back after an error.
    recoveries: u64,
}

impl<K> Default for Mirror<K> {
    fn default() -> Self {
        Mirror {
            objects: BTreeMap::new(),
            relisting: None,
            synced: false,
            generation: 0,
            failing: None,
            recoveries: 0,
        }
    }
}

/// An object's key in a [`Mirror`].
fn object_key(meta: &kube::api::ObjectMeta) -> String {
    let name = meta.name.clone().unwrap_or_default();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name,
    }
}

impl<K: kube::Resource> Mirror<K> {
    fn apply(&mut self, event: Event<K>) {
        match event {
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(object_key(o.meta()), o);
            }
            Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.synced = true;
                self.generation += 1;
            }
            Event::Apply(o) => {
                self.objects.insert(object_key(o.meta()), o);
                self.generation += 1;
            }
            Event::Delete(o) => {
                self.objects.remove(&object_key(o.meta()));
                self.generation += 1;
            }
        }
    }
}

struct Shared<K> {
    state: Mutex<Mirror<K>>,
    changed: Condvar,
}

impl<K> Shared<K> {
    fn new() -> Arc<Shared<K>> {
        Arc::new(Shared {
            state: Mutex::new(Mirror::default()),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Mirror<K>> {
        // A panic while holding the lock cannot leave the map half-written (each change is
        // one insert or swap), so a poisoned lock's data is still good.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Services and EndpointSlices, followed once services are first asked for.
struct ServiceMirrors {
    services: Arc<Shared<Service>>,
    slices: Arc<Shared<EndpointSlice>>,
    /// The two generations when the records were last handed out.
    seen: Option<(u64, u64)>,
}

/// The Kubernetes API as a [`Store`].
pub struct KubeStore {
    rt: tokio::runtime::Runtime,
    opts: KubeOptions,
    keys: AnnotationKeys,
    nodes: Api<Node>,
    url: String,
    client: Client,
    shared: Arc<Shared<Node>>,
    service_mirrors: Option<ServiceMirrors>,
    config: Option<NetworkConfig>,
    /// `generation` when the caller last heard of a change.
    seen: u64,
    rejected: u64,
}

/// The client configuration, as flanneld builds it (`BuildConfigFromFlags`): the kubeconfig
/// if given, else the in-cluster service account; `--kube-api-url` overrides the server.
async fn client_config(opts: &KubeOptions) -> Result<Config, StoreError> {
    let mut config = match &opts.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
                StoreError::Kube(format!("--kubeconfig-file {}: {e}", path.display()))
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    StoreError::Kube(format!("--kubeconfig-file {}: {e}", path.display()))
                })?
        }
        None => match (Config::incluster(), &opts.api_url) {
            (Ok(c), _) => c,
            (Err(_), Some(url)) => Config::new(
                url.parse()
                    .map_err(|e| StoreError::Kube(format!("--kube-api-url {url:?}: {e}")))?,
            ),
            (Err(e), None) => {
                return Err(StoreError::Kube(format!(
                    "not in a cluster ({e}): give --kubeconfig-file or --kube-api-url"
                )))
            }
        },
    };
    if let Some(url) = &opts.api_url {
        config.cluster_url = url
            .parse()
            .map_err(|e| StoreError::Kube(format!("--kube-api-url {url:?}: {e}")))?;
    }
    config.read_timeout = Some(Duration::from_secs(300));
    Ok(config)
}

impl KubeStore {
    /// Connects (no request is made yet) and starts following the cluster's Nodes.
    pub fn new(opts: KubeOptions) -> Result<KubeStore, StoreError> {
        let keys = AnnotationKeys::new(&opts.annotation_prefix)?;
        if opts.node_name.is_empty() {
            return Err(StoreError::Kube(
                "NODE_NAME is not set: the kube subnet manager needs this node's Node name".into(),
            ));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("podwire-kube")
            .enable_all()
            .on_thread_start(|| {
                if let Err(e) = crate::privs::drop_all() {
                    tracing::warn!(error = %e, "a tokio thread keeps its capabilities");
                }
            })
            .build()
            .map_err(|e| StoreError::Kube(format!("tokio runtime: {e}")))?;
        let config = rt.block_on(client_config(&opts))?;
        let url = config.cluster_url.to_string();
        let client = rt
            .block_on(async { Client::try_from(config) })
            .map_err(|e| StoreError::Kube(format!("client for {url}: {e}")))?;
        let nodes: Api<Node> = Api::all(client.clone());
        let shared = Shared::new();
        rt.spawn(follow(
            nodes.clone(),
            watcher::Config::default(),
            shared.clone(),
        ));
        Ok(KubeStore {
            rt,
            opts,
            keys,
            nodes,
            url,
            client,
            shared,
            service_mirrors: None,
            config: None,
            seen: 0,
            rejected: 0,
        })
    }

    /// Runs one API request on the store's runtime, bounded by [`REQUEST_TIMEOUT`].
    fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, StoreError> {
        match self
            .rt
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, fut).await })
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Kube(format!("{what}: {e}"))),
            Err(_) => Err(StoreError::Kube(format!(
                "{what}: no answer from {} within {REQUEST_TIMEOUT:?}",
                self.url
            ))),
        }
    }

    /// Writes our annotations if any differs (a strategic merge patch through
    /// `nodes/<name>/status`, as flanneld), and keeps the patched Node in the view so the
    /// next read of the leases has our own.
    fn publish(&self, node: &Node, attrs: &LeaseAttrs) -> Result<(), StoreError> {
        let want = lease_annotations(&self.keys, attrs);
        let differs = want
            .iter()
            .any(|(k, v)| annotation(node, k) != Some(v.as_str()));
        if !differs {
            return Ok(());
        }
        let patch = serde_json::json!({ "metadata": { "annotations": want } });
        let name = &self.opts.node_name;
        let patched = self.call(
            &format!("patching Node {name}'s annotations"),
            self.nodes
                .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch)),
        )?;
        let mut state = self.shared.lock();
        state.objects.insert(name.clone(), patched);
        state.generation += 1;
        Ok(())
    }

    /// Sets the Node's NetworkUnavailable condition false, as flanneld does once its lease is
    /// taken. Not fatal: the network works without it.
    fn mark_network_available(&self) {
        let now = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let patch = serde_json::json!({ "status": { "conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "podwire is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        let name = &self.opts.node_name;
        if let Err(e) = self.call(
            &format!("setting Node {name}'s NetworkUnavailable condition"),
            self.nodes
                .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch)),
        ) {
            tracing::warn!(error = %e, "NetworkUnavailable condition left as it was");
        }
    }
}

/// Follows every object of `api` into `shared` until the runtime stops: kube-rs's watcher
/// lists, then watches from the list's resourceVersion, and relists (with backoff) after a
/// watch breaks or expires (410). Errors are kept for the control thread to report.
async fn follow<K>(api: Api<K>, config: watcher::Config, shared: Arc<Shared<K>>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(item) = events.next().await {
        let mut state = shared.lock();
        match item {
            Ok(event) => {
                if state.failing.take().is_some() {
                    state.recoveries += 1;
                }
                state.apply(event);
            }
            Err(e) => state.failing = Some(e.to_string()),
        }
        drop(state);
        shared.changed.notify_all();
    }
}

impl Store for KubeStore {
    fn describe(&self) -> String {
        format!("kube {} node {}", self.url, self.opts.node_name)
    }

    fn config(&mut self) -> Result<NetworkConfig, StoreError> {
        let path = &self.opts.net_conf;
        let text = std::fs::read_to_string(path).map_err(|source| StoreError::Read {
            path: path.clone(),
            source,
        })?;
        let cfg = parse_net_conf(&text).map_err(|source| StoreError::Invalid {
            at: path.display().to_string(),
            source,
        })?;
        self.config = Some(cfg.clone());
        Ok(cfg)
    }

    fn acquire(&mut self, req: &LeaseRequest) -> Result<OwnLease, StoreError> {
        self.config = Some(req.config.clone());
        let name = self.opts.node_name.clone();
        let node = self.call(&format!("reading Node {name}"), self.nodes.get(&name))?;
        let invalid = |what: String| StoreError::Invalid {
            at: format!("Node {name}"),
            source: crate::config::ConfigError::new("spec.podCIDR", what),
        };
        // Not permanent: kube-controller-manager may not have assigned it yet.
        let subnet = pod_cidr(&node).map_err(|e| StoreError::Kube(format!("Node {name}: {e}")))?;
        let cfg = &req.config;
        if !cfg.network.covers(&subnet) || subnet.prefix() != cfg.subnet_len {
            return Err(invalid(format!(
                "podCIDR {subnet} is not a /{} inside the network {}",
                cfg.subnet_len, cfg.network
            )));
        }
        if let Some(other) = annotation(&node, &self.keys.public_ip_overwrite)
            .filter(|ip| !ip.is_empty() && *ip != req.public_ip.to_string())
        {
            return Err(invalid(format!(
                "annotation {} asks for public IP {other}; start podwire with --public-ip {other}",
                self.keys.public_ip_overwrite
            )));
        }
        self.publish(&node, &req.attrs)?;
        self.mark_network_available();
        Ok(OwnLease {
            subnet,
            attrs: req.attrs.clone(),
            expires: None,
        })
    }

    fn renew(&mut self, _req: &LeaseRequest, own: &OwnLease) -> Result<OwnLease, StoreError> {
        // A Node's annotations do not expire (flanneld's kube RenewLease is unimplemented).
        Ok(own.clone())
    }

    fn leases(&mut self) -> Result<Vec<Lease>, StoreError> {
        let state = self.shared.lock();
        let mut out = Vec::with_capacity(state.objects.len());
        let mut rejected = 0;
        for (name, node) in &state.objects {
            let lease = node_lease(node, &self.keys).and_then(|l| match (l, &self.config) {
                (Some(l), Some(cfg))
                    if !cfg.network.covers(&l.subnet) || l.subnet.prefix() != cfg.subnet_len =>
                {
                    Err(format!(
                        "podCIDR {} is not a /{} inside the network {}",
                        l.subnet, cfg.subnet_len, cfg.network
                    ))
                }
                (l, _) => Ok(l),
            });
            match lease {
                Ok(Some(l)) => out.push(l),
                Ok(None) => {}
                Err(e) => {
                    rejected += 1;
                    if rejected > self.rejected {
                        tracing::warn!(node = %name, error = %e, "Node left out of the subnet map");
                    }
                }
            }
        }
        self.rejected = rejected;
        Ok(out)
    }

    fn wait_changes(&mut self, wait: Duration) -> Result<bool, StoreError> {
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .changed
            .wait_timeout_while(state, wait, |s| {
                s.generation == self.seen && s.failing.is_none()
            })
            .unwrap_or_else(|p| p.into_inner());
        if state.generation != self.seen {
            self.seen = state.generation;
            return Ok(true);
        }
        match &state.failing {
            Some(e) => {
                let e = StoreError::Kube(format!("watching Nodes at {}: {e}", self.url));
                drop(state);
                // An error is no reason to come back early: the watcher retries with backoff.
                std::thread::sleep(wait);
                Err(e)
            }
            None => Ok(false),
        }
    }

    fn reconnects(&self) -> u64 {
        self.shared.lock().recoveries
    }

    fn services(&mut self) -> Result<Option<KeyValues>, StoreError> {
        let mirrors = match &mut self.service_mirrors {
            Some(m) => m,
            None => {
                // As kube-proxy lists them: not another proxy's, not headless.
                let cfg = watcher::Config::default().labels(PROXY_SELECTOR);
                let services = Shared::new();
                let slices = Shared::new();
                self.rt.spawn(follow(
                    Api::<Service>::all(self.client.clone()),
                    cfg.clone(),
                    Arc::clone(&services),
                ));
                self.rt.spawn(follow(
                    Api::<EndpointSlice>::all(self.client.clone()),
                    cfg,
                    Arc::clone(&slices),
                ));
                self.service_mirrors.insert(ServiceMirrors {
                    services,
                    slices,
                    seen: None,
                })
            }
        };
        let services = mirrors.services.lock();
        let slices = mirrors.slices.lock();
        if let Some(e) = services.failing.as_ref().or(slices.failing.as_ref()) {
            return Err(StoreError::Kube(format!(
                "watching Services and EndpointSlices: {e}"
            )));
        }
        let now = (services.generation, slices.generation);
        if !(services.synced && slices.synced) || mirrors.seen == Some(now) {
            return Ok(None);
        }
        let records = kube_services::records(&services.objects, &slices.objects)
            .into_iter()
            .map(|(k, v)| (format!("kube/services/{k}"), v))
            .collect();
        drop((services, slices));
        mirrors.seen = Some(now);
        Ok(Some(records))
    }

    fn rejected_leases(&self) -> u64 {
        self.rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;
    use kube::api::ObjectMeta;

    fn keys() -> AnnotationKeys {
        AnnotationKeys::new(DEFAULT_ANNOTATION_PREFIX).unwrap()
    }

    fn node(cidr: &str, annotations: &[(&str, &str)]) -> Node {
        let p = DEFAULT_ANNOTATION_PREFIX;
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (format!("{p}/{k}"), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    const VXLAN: &[(&str, &str)] = &[
        ("kube-subnet-manager", "true"),
        ("backend-type", "vxlan"),
        ("backend-data", r#"{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:00"}"#),
        ("public-ip", "192.168.50.11"),
    ];

    #[test]
    fn test_flanneld_annotations_are_a_lease_and_round_trip() {
        let lease = node_lease(&node("10.244.1.0/24", VXLAN), &keys())
            .unwrap()
            .unwrap();
        assert_eq!(lease.subnet.to_string(), "10.244.1.0/24");
        assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(192, 168, 50, 11));
        assert_eq!(lease.attrs.backend_type.as_deref(), Some("vxlan"));
        let written = lease_annotations(&keys(), &lease.attrs);
        for (k, v) in VXLAN {
            assert_eq!(
                written[&format!("{DEFAULT_ANNOTATION_PREFIX}/{k}")],
                *v,
                "{k}"
            );
        }
        // flanneld's udp backend: no type, data null.
        let udp = lease_annotations(&keys(), &LeaseAttrs::udp(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(udp[&keys().backend_data], "null");
        assert_eq!(udp[&keys().backend_type], "");
    }

    #[test]
    fn test_unmanaged_and_malformed_nodes() {
        let unmanaged = node("10.244.1.0/24", &VXLAN[1..]);
        assert!(node_lease(&unmanaged, &keys()).unwrap().is_none());
        let mut bad_ip = VXLAN.to_vec();
        bad_ip[3] = ("public-ip", "not-an-ip");
        assert!(node_lease(&node("10.244.1.0/24", &bad_ip), &keys()).is_err());
        let mut bad_data = VXLAN.to_vec();
        bad_data[2] = ("backend-data", "{");
        assert!(node_lease(&node("10.244.1.0/24", &bad_data), &keys()).is_err());
        assert!(node_lease(&node("", VXLAN), &keys())
            .unwrap_err()
            .contains("no podCIDR"));
        assert!(node_lease(&node("10.244.1.0/33", VXLAN), &keys()).is_err());
    }

    #[test]
    fn test_dual_stack_node_takes_its_ipv4_cidr() {
        let mut n = node("fd00:1::/64", VXLAN);
        n.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["fd00:1::/64".into(), "10.244.7.0/24".into()]);
        assert_eq!(pod_cidr(&n).unwrap().to_string(), "10.244.7.0/24");
    }

    #[test]
    fn test_annotation_prefix_is_checked() {
        assert!(AnnotationKeys::new("example.com/net").is_ok());
        for bad in ["", "has space", "trailing/", "a\"b"] {
            assert!(AnnotationKeys::new(bad).is_err(), "{bad:?}");
        }
    }
}
