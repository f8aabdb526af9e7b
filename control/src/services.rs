//! Where services come from: a services file (`--services file:PATH`, re-read when it changes)
//! or the store (`<prefix>/services/<namespace>/<name>` in etcd, the API's objects with
//! `--kube-subnet-mgr`). Each object is one of two shapes:
//!
//! - an **API record**: a Service and its EndpointSlices as the Kubernetes API holds them
//!   (every field kube-proxy reads: ports with names and NodePorts, sessionAffinity and its
//!   timeout, internalTrafficPolicy, externalTrafficPolicy and healthCheckNodePort,
//!   externalIPs and the load balancer's ingress IPs;
//!   endpoints with their conditions ready, serving and terminating, nodeName, zone), read by
//!   [`crate::kube_services::specs`]:
//!
//! ```json
//! {"service": {"metadata": {"namespace": "default", "name": "web"},
//!              "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}},
//!  "endpointSlices": [{"addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
//!    "endpoints": [{"addresses": ["10.244.2.2"], "conditions": {"ready": true},
//!                   "nodeName": "node-2"}]}]}
//! ```
//!
//! - a **port record**, one service port in short:
//!
//! ```json
//! {"name": "default/web", "clusterIP": "10.96.0.10", "protocol": "TCP",
//!   "port": 80, "endpoints": [{"ip": "10.244.2.2", "port": 8080}],
//!   "sessionAffinity": "ClientIP", "sessionAffinityTimeoutSeconds": 10800,
//!   "nodePort": 30080, "externalIPs": ["192.0.2.10"]}
//! ```
//!
//!   `protocol` defaults to TCP, `sessionAffinity` to None, its timeout to Kubernetes' 10800 s;
//!   its endpoints are ready ones.
//!
//! In etcd the key names the object, which may then leave its name out.
//!
//! Each object stands alone: one that does not parse is left out with why, and [`snapshot`]
//! hands the rest to the dataplane's checks ([`Services::admit`]), which leave out a bad
//! service, endpoint or NodePort the same way. What is left out is logged once per snapshot
//! and counted; the rest is applied.

use crate::dir_watch::DirWatch;
use crate::services_split::{self, Layout, Piece};
use podwire_dataplane::conntrack::{PROTO_TCP, PROTO_UDP};
use podwire_dataplane::nat::{
    Admission, Report, ServiceOptions, ServiceSpec, Services, DEFAULT_AFFINITY_TIMEOUT,
};
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// What a source's last parse made of each object, by the name it was read under and its
/// exact text, so that an update parses only the objects it changed. Bad objects are not kept
/// (they are parsed again, and named again). An object is found by a hash of its name and text
/// and then compared in full: two objects whose hashes collide cost a parse, never a mix-up.
#[derive(Debug, Default)]
pub struct ParseCache {
    objects: rustc_hash::FxHashMap<u64, CachedObject>,
}

#[derive(Debug)]
struct CachedObject {
    name: Box<str>,
    text: Box<str>,
    specs: Arc<[Arc<ServiceSpec>]>,
}

/// An object's services, shared by the cache and the parses that found it unchanged.
type ObjectSpecs = Arc<[Arc<ServiceSpec>]>;

impl ParseCache {
    fn hash(name: &str, text: &str) -> u64 {
        use std::hash::BuildHasher;
        rustc_hash::FxBuildHasher.hash_one((name, text))
    }

    /// The object's services and the hash it is cached under: the last parse's if it had the
    /// same name and text, else parsed now (`parse`); kept in `next`, the cache of this parse.
    fn specs(
        &mut self,
        next: &mut ParseCache,
        name: &str,
        text: &str,
        parse: impl FnOnce() -> Result<Vec<ServiceSpec>, ServicesError>,
    ) -> Result<(u64, ObjectSpecs), ServicesError> {
        let hash = ParseCache::hash(name, text);
        if let Some(specs) = self.carry(next, hash, name, text) {
            return Ok((hash, specs));
        }
        let specs: ObjectSpecs = parse()?.into_iter().map(Arc::new).collect();
        let object = CachedObject {
            name: name.into(),
            text: text.into(),
            specs: Arc::clone(&specs),
        };
        next.objects.insert(hash, object);
        Ok((hash, specs))
    }

    /// The services of an object known by its hash, if it is the one cached under it (or was
    /// carried into `next` already, as a second copy of one object is), carried into `next`.
    fn carry(
        &mut self,
        next: &mut ParseCache,
        hash: u64,
        name: &str,
        text: &str,
    ) -> Option<ObjectSpecs> {
        let same = |o: &CachedObject| *o.name == *name && *o.text == *text;
        if let Some(o) = next.objects.get(&hash).filter(|o| same(o)) {
            return Some(Arc::clone(&o.specs));
        }
        let object = self.objects.remove(&hash)?;
        if !same(&object) {
            // A collision: the other object may come later in this parse.
            self.objects.insert(hash, object);
            return None;
        }
        let specs = Arc::clone(&object.specs);
        next.objects.insert(hash, object);
        Some(specs)
    }

    /// Objects held.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

/// What the last parse of a services file made of it: its objects (by text), and where each
/// lay in the text, so that a new version is split again only where it differs.
#[derive(Debug, Default)]
pub struct FileCache {
    objects: ParseCache,
    /// The text last parsed (also one that was refused: the same text is not parsed again).
    text: String,
    /// Where its objects lie, and the hash each is cached under (None: it did not parse);
    /// None when it was refused or held no objects.
    layout: Option<(Layout, Vec<Option<u64>>)>,
    /// The text before it, kept as a buffer for the next read: a file of megabytes read into
    /// memory already mapped costs no page faults.
    spare: String,
}

impl FileCache {
    /// The text last parsed.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Objects held.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// An empty buffer for the next text (the one before the last, cleared).
    pub fn buffer(&mut self) -> String {
        let mut spare = std::mem::take(&mut self.spare);
        spare.clear();
        spare
    }

    /// Takes `text` as the last one, keeping the one before as [`FileCache::buffer`].
    fn keep(&mut self, text: String) {
        self.spare = std::mem::replace(&mut self.text, text);
    }

    /// The next parse splits the whole text (its objects are still found by their text).
    pub fn forget_text(&mut self) {
        self.text.clear();
        self.layout = None;
    }
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
    /// The Service's externalIPs and load balancer ingress IPs, alike.
    #[serde(default, rename = "externalIPs")]
    external_ips: Vec<Ipv4Addr>,
}

/// A Service and its EndpointSlices as the API holds them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ApiRecord {
    service: k8s_openapi::api::core::v1::Service,
    #[serde(default)]
    endpoint_slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
}

impl ApiRecord {
    /// Its service ports; `name` (`namespace/name`) names a Service whose metadata does not.
    fn into_specs(mut self, name: &str) -> Result<Vec<ServiceSpec>, ServicesError> {
        let meta = &mut self.service.metadata;
        if meta.name.as_deref().unwrap_or_default().is_empty() {
            let (ns, n) = name.split_once('/').unwrap_or(("default", name));
            if n.is_empty() {
                return Err(ServicesError::Invalid {
                    name: name.to_string(),
                    why: "no name".into(),
                });
            }
            meta.namespace = Some(ns.to_string());
            meta.name = Some(n.to_string());
        }
        let slices: Vec<_> = self.endpoint_slices.iter().collect();
        crate::kube_services::specs(&self.service, &slices)
    }
}

/// Parses one object of either shape (see the module's documentation); `name` is what names
/// it when it does not name itself (its etcd key), `what` where it came from (for errors).
fn parse_value(
    value: serde_json::Value,
    name: &str,
    what: &str,
) -> Result<Vec<ServiceSpec>, ServicesError> {
    let json_err = |source| ServicesError::Json {
        what: what.to_string(),
        source,
    };
    if value.get("service").is_some() {
        return serde_json::from_value::<ApiRecord>(value)
            .map_err(json_err)?
            .into_specs(name);
    }
    let mut s: ServiceJson = serde_json::from_value(value).map_err(json_err)?;
    if s.name.is_empty() {
        s.name = name.to_string();
    }
    s.into_spec().map(|spec| vec![spec])
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
        let proto = protocol(&self.protocol)
            .ok_or_else(|| invalid(format!("protocol {:?}: TCP or UDP", self.protocol)))?;
        let affinity_timeout = session_affinity(
            self.session_affinity.as_deref(),
            self.session_affinity_timeout_seconds,
        )
        .map_err(invalid)?;
        if self.port == 0 {
            return Err(invalid("port 0".into()));
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
            external_ips: self.external_ips,
            ..Default::default()
        })
    }
}

/// A service port's protocol as the API spells it, if podwire serves it: TCP or UDP.
pub(crate) fn protocol(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        _ => None,
    }
}

/// `sessionAffinity` and its timeout as the API spells them: the timeout in seconds for
/// ClientIP (Kubernetes' default if none is given), None for None; anything else is why not.
pub(crate) fn session_affinity(
    kind: Option<&str>,
    timeout: Option<u32>,
) -> Result<Option<u32>, String> {
    match kind {
        None | Some("None") => Ok(None),
        Some("ClientIP") => Ok(Some(timeout.unwrap_or(DEFAULT_AFFINITY_TIMEOUT))),
        Some(other) => Err(format!("sessionAffinity {other:?}: None or ClientIP")),
    }
}

/// Services read from one source, and the objects of it that were left out, with why.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Shared with the parse cache: an update clones none of the services it did not change.
    pub specs: Vec<Arc<ServiceSpec>>,
    pub rejected: Vec<ServicesError>,
}

/// Parses a services file's contents. A file that is not `{"services": [...]}` is refused
/// whole; within it, an object that is not a valid service is left out, named, and the others
/// are kept.
pub fn parse_file(text: &str, what: &str) -> Result<Parsed, ServicesError> {
    parse_file_after(&mut FileCache::default(), text, what)
}

/// [`parse_file`], taking from `cache` what the last parse made of the objects this text has
/// unchanged, and leaving in it what this one made. Where the text is the last one's but for
/// a stretch, only the objects in that stretch are split out again
/// ([`services_split::split_after`]).
pub fn parse_file_after(
    cache: &mut FileCache,
    text: &str,
    what: &str,
) -> Result<Parsed, ServicesError> {
    parse_file_text(cache, text.to_string(), what)
}

/// [`parse_file_after`] of a text the cache then keeps (for the next one to be compared with).
pub fn parse_file_text(
    cache: &mut FileCache,
    text: String,
    what: &str,
) -> Result<Parsed, ServicesError> {
    let reused = cache.layout.take().and_then(|(layout, hashes)| {
        let (pieces, layout) = services_split::split_after(&cache.text, &layout, &text)?;
        Some((pieces, Some(layout), hashes))
    });
    let (pieces, layout, old_hashes) = match reused {
        Some(found) => found,
        None => match whole_split(&text) {
            Ok((pieces, layout)) => (pieces, layout, Vec::new()),
            Err(source) => {
                cache.keep(text);
                return Err(ServicesError::Json {
                    what: what.to_string(),
                    source,
                });
            }
        },
    };
    let mut out = Parsed::default();
    let mut next = ParseCache::default();
    let mut hashes = Vec::with_capacity(pieces.len());
    for (i, piece) in pieces.iter().enumerate() {
        let object = &text[piece.span.clone()];
        let known = piece.was.and_then(|w| old_hashes[w]);
        let carried = known.and_then(|hash| {
            let specs = cache.objects.carry(&mut next, hash, "", object)?;
            Some((hash, specs))
        });
        let parsed = match carried {
            Some(found) => Ok(found),
            None => cache
                .objects
                .specs(&mut next, "", object, || parse_file_object(object, what, i)),
        };
        match parsed {
            Ok((hash, specs)) => {
                hashes.push(Some(hash));
                out.specs.extend(specs.iter().cloned());
            }
            Err(e) => {
                hashes.push(None);
                out.rejected.push(e);
            }
        }
    }
    cache.objects = next;
    cache.keep(text);
    cache.layout = layout.map(|l| (l, hashes));
    Ok(out)
}

/// Splits a whole services file into its objects' spans.
fn whole_split(text: &str) -> Result<(Vec<Piece>, Option<Layout>), serde_json::Error> {
    let (objects, layout) = services_split::split(text)?;
    let pieces = objects
        .into_iter()
        .map(|span| Piece { span, was: None })
        .collect();
    Ok((pieces, layout))
}

/// Parses the `i`th object of a services file.
fn parse_file_object(text: &str, what: &str, i: usize) -> Result<Vec<ServiceSpec>, ServicesError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|source| ServicesError::Json {
            what: format!("{what}: services[{i}]"),
            source,
        })?;
    let label = file_object_label(&value, what, i);
    parse_value(value, "", &label)
}

/// Names a file's object by its name if it has one, else by its place in the file.
fn file_object_label(value: &serde_json::Value, what: &str, i: usize) -> String {
    let str_at = |p: &str| value.pointer(p).and_then(|n| n.as_str());
    let named = match str_at("/service/metadata/name") {
        Some(n) => Some(format!(
            "{}/{n}",
            str_at("/service/metadata/namespace").unwrap_or("default")
        )),
        None => str_at("/name").map(str::to_string),
    };
    match named {
        Some(n) if !n.is_empty() => format!("{what}: service {n}"),
        _ => format!("{what}: services[{i}]"),
    }
}

/// Parses one service object (an etcd value) stored under `name` (`namespace/name`), which it
/// takes as its name unless it names itself: its service ports.
pub fn parse_one(text: &[u8], name: &str) -> Result<Vec<ServiceSpec>, ServicesError> {
    let value = serde_json::from_slice(text).map_err(|source| ServicesError::Json {
        what: name.to_string(),
        source,
    })?;
    parse_value(value, name, name)
}

/// The services of `<prefix>/services/<namespace>/<name>` keys; a malformed one is left out
/// (as a malformed lease is) and returned with why, so one bad object cannot take the others
/// down.
pub fn parse_etcd(items: &[(String, Vec<u8>)]) -> Parsed {
    parse_etcd_after(&mut ParseCache::default(), items)
}

/// [`parse_etcd`], taking from `cache` the objects whose key and value have not changed since
/// the last parse, and leaving in it those of this one.
pub fn parse_etcd_after(cache: &mut ParseCache, items: &[(String, Vec<u8>)]) -> Parsed {
    let mut out = Parsed::default();
    let mut next = ParseCache::default();
    for (key, value) in items {
        let name = key
            .split_once("/services/")
            .map_or(key.as_str(), |(_, n)| n);
        // A value that is not UTF-8 is not JSON either: parsed (and refused) every time.
        let parsed = match std::str::from_utf8(value) {
            Ok(text) => cache
                .specs(&mut next, name, text, || parse_one(value, name))
                .map(|(_, specs)| specs.to_vec()),
            Err(_) => parse_one(value, name).map(|specs| specs.into_iter().map(Arc::new).collect()),
        };
        match parsed {
            Ok(specs) => out.specs.extend(specs),
            Err(e) => out.rejected.push(e),
        }
    }
    *cache = next;
    out
}

/// One services snapshot of every source, and what was left out of it.
pub struct Snapshot {
    pub services: Services,
    /// What the dataplane's checks left out.
    pub report: Report,
    /// Objects that did not parse as services.
    pub malformed: usize,
}

impl Snapshot {
    /// Services left out whole: malformed, or refused by the checks.
    pub fn rejected_services(&self) -> usize {
        self.malformed + self.report.rejected.len()
    }
}

/// One services snapshot of what the sources hold (the file's, then the store's): every
/// service that passes the dataplane's checks ([`Services::admit`]), the rest left out. Each
/// service, endpoint or NodePort left out is logged here, once per snapshot, with its name and
/// why.
/// `previous` is the snapshot this one replaces: what it built for services whose endpoints did
/// not change is reused ([`Services::admit_after`]).
pub fn snapshot(
    previous: Option<&Services>,
    options: ServiceOptions,
    admission: &Admission,
    sources: &[&Parsed],
) -> Snapshot {
    let specs = sources
        .iter()
        .flat_map(|p| p.specs.iter().cloned())
        .collect::<Vec<_>>();
    let (services, report) = Services::admit_after(previous, options, admission, specs);
    let mut malformed = 0;
    for e in sources.iter().flat_map(|p| &p.rejected) {
        malformed += 1;
        tracing::warn!(error = %e, "service left out: malformed");
    }
    for e in &report.rejected {
        tracing::warn!(error = %e, "service left out");
    }
    for e in &report.endpoints_removed {
        tracing::warn!(error = %e, "endpoint left out");
    }
    for e in &report.node_ports_refused {
        tracing::warn!(error = %e, "NodePort refused; the service stays, ClusterIP only");
    }
    for e in &report.external_ips_refused {
        tracing::warn!(error = %e, "external IP refused; the service stays without it");
    }
    Snapshot {
        services,
        report,
        malformed,
    }
}

/// A services file watched by modification time and size, and woken on by its directory's
/// changes (inotify) so that an update applies at once rather than at the next poll.
pub struct ServicesFile {
    path: PathBuf,
    /// The file's identity and times when last read.
    seen: Option<Stamp>,
    /// The directory's watch reported a change since the last read.
    dirty: bool,
    /// What the last read made of the file, and its text: a change the stamp cannot see (two
    /// writes of one size within one tick of the kernel's coarse file clock) is told from it.
    cache: FileCache,
    /// None where inotify is not to be had: the file is then polled only.
    watch: Option<DirWatch>,
}

impl ServicesFile {
    pub fn new(path: &Path) -> ServicesFile {
        let watch = DirWatch::new(path)
            .inspect_err(|e| tracing::warn!(error = %e, "services file polled only"))
            .ok();
        ServicesFile {
            path: path.to_path_buf(),
            seen: None,
            dirty: false,
            cache: FileCache::default(),
            watch,
        }
    }

    /// Waits until something changed where the file is, or `timeout` passed; `poll` then tells
    /// whether the file itself changed.
    pub fn wait(&mut self, timeout: Duration) {
        let Some(watch) = &self.watch else {
            return std::thread::sleep(timeout);
        };
        match watch.wait(timeout) {
            Ok(changed) => self.dirty |= changed,
            Err(e) => {
                tracing::warn!(error = %e, "services file polled only from now on");
                self.watch = None;
                std::thread::sleep(timeout);
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the next `poll` read the file whether it changed or not (SIGHUP).
    pub fn forget(&mut self) {
        self.seen = None;
        self.cache.forget_text();
    }

    /// The services if the file changed since the last call (always on the first). It is read
    /// when its stamp changed or its directory's watch saw a change, and parsed when what it
    /// holds differs from the last read.
    pub fn poll(&mut self) -> Result<Option<Parsed>, ServicesError> {
        let read_err = |source| ServicesError::Read {
            path: self.path.clone(),
            source,
        };
        let md = std::fs::metadata(&self.path).map_err(read_err)?;
        let stamp = Stamp::of(&md);
        if self.seen == Some(stamp) && !std::mem::take(&mut self.dirty) {
            return Ok(None);
        }
        self.dirty = false;
        let mut text = self.cache.buffer();
        let read = std::fs::File::open(&self.path)
            .and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut text));
        if let Err(e) = read {
            self.cache.spare = text;
            return Err(read_err(e));
        }
        self.seen = Some(stamp);
        if text == self.cache.text() && !text.is_empty() {
            self.cache.spare = text;
            return Ok(None);
        }
        let what = self.path.display().to_string();
        parse_file_text(&mut self.cache, text, &what).map(Some)
    }
}

/// What tells a file's versions apart without reading it: a replacement (a rename onto the
/// path) has another inode; a write in place moves the modification time and often the size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(md: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_issue_format_parses_with_defaults() {
        let parsed = parse_file(
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
        assert!(parsed.rejected.is_empty());
        let specs = parsed.specs;
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
    fn test_api_records_in_the_file_and_in_etcd() {
        let record = r#"{"service": {"metadata": {"namespace": "default", "name": "web"},
              "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
                       "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                                 {"name": "metrics", "port": 9090}]}},
            "endpointSlices": [{"metadata": {"name": "web-abc"}, "addressType": "IPv4",
              "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}],
              "endpoints": [
                {"addresses": ["10.244.2.2"], "conditions": {"ready": true}, "nodeName": "n2", "zone": "a"},
                {"addresses": ["10.244.3.2"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "n3"}
              ]}]}"#;
        let parsed = parse_file(&format!(r#"{{"services": [{record}]}}"#), "test").unwrap();
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let names: Vec<_> = parsed.specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["default/web:http", "default/web:metrics"]);
        let http = &parsed.specs[0];
        assert_eq!(http.endpoints, ["10.244.2.2:8080".parse().unwrap()]);
        assert_eq!(http.terminating, ["10.244.3.2:8080".parse().unwrap()]);
        assert_eq!(http.node_port, Some(30080));
        assert!(http.internal_local);
        assert!(http.external_local);
        assert_eq!(http.health_check_node_port, Some(31000));
        assert_eq!(parsed.specs[1].endpoints[0].port(), 9100);
        // A policy podwire does not know is refused; Cluster has no health check.
        let bad = record.replace(
            r#""externalTrafficPolicy": "Local""#,
            r#""externalTrafficPolicy": "Nearby""#,
        );
        let parsed = parse_file(&format!(r#"{{"services": [{bad}]}}"#), "test").unwrap();
        assert!(
            parsed.rejected[0]
                .to_string()
                .contains("externalTrafficPolicy \"Nearby\""),
            "{:?}",
            parsed.rejected
        );
        let cluster = record.replace(
            r#""externalTrafficPolicy": "Local""#,
            r#""externalTrafficPolicy": "Cluster""#,
        );
        let parsed = parse_file(&format!(r#"{{"services": [{cluster}]}}"#), "test").unwrap();
        assert!(!parsed.specs[0].external_local);
        assert_eq!(parsed.specs[0].health_check_node_port, None);
        // In etcd the key names a Service whose metadata does not.
        let unnamed = record.replace(
            r#""metadata": {"namespace": "default", "name": "web"},"#,
            "",
        );
        let parsed = parse_etcd(&[(
            "/coreos.com/network/services/shop/cart".to_string(),
            unnamed.into_bytes(),
        )]);
        assert_eq!(parsed.specs[0].name, "shop/cart:http");
        // A record with a field the API does not have is refused, named.
        let typo = record.replace("endpointSlices", "endpointSlice");
        let parsed = parse_file(&format!(r#"{{"services": [{typo}]}}"#), "test").unwrap();
        let e = parsed.rejected[0].to_string();
        assert!(
            e.contains("default/web") && e.contains("endpointSlice"),
            "{e}"
        );
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
        let parsed = parse_etcd(&items);
        assert_eq!(parsed.rejected.len(), 1);
        assert!(parsed.rejected[0].to_string().contains("default/broken"));
        let specs = parsed.specs;
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
            // One bad object is left out, named, not the whole file.
            let parsed = parse_file(text, "test").unwrap();
            assert!(parsed.specs.is_empty());
            let e = parsed.rejected[0].to_string();
            assert!(e.contains(want), "{e}");
        }
        // What is not a services file at all is still refused whole.
        assert!(parse_file(r#"{"services": 1}"#, "test").is_err());
        assert!(parse_file("{", "test").is_err());
    }

    #[test]
    fn test_a_file_with_one_bad_object_keeps_the_others() {
        let parsed = parse_file(
            r#"{"services": [
                {"name": "default/a", "clusterIP": "10.96.0.10", "port": 80},
                {"name": "default/sctp", "clusterIP": "10.96.0.11", "port": 80, "protocol": "SCTP"},
                {"name": "default/typo", "clusterIP": "10.96.0.12", "port": 80, "prot": "UDP"},
                {"clusterIP": "10.96.0.13", "port": 80},
                {"name": "default/b", "clusterIP": "10.96.0.14", "port": 53, "protocol": "UDP"}
            ]}"#,
            "test",
        )
        .unwrap();
        let names: Vec<_> = parsed.specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["default/a", "default/b"]);
        let why: Vec<_> = parsed.rejected.iter().map(|e| e.to_string()).collect();
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(
            why[0].contains("default/sctp") && why[0].contains("SCTP"),
            "{why:?}"
        );
        assert!(why[1].contains("prot"), "{why:?}");
        assert!(why[2].contains("no name"), "{why:?}");
    }

    /// A re-read takes unchanged objects from the cache and parses changed ones: the result is
    /// what a fresh parse gives, bad objects are named every time, and the cache holds only
    /// the objects of the last read.
    #[test]
    fn test_a_reread_parses_only_the_objects_that_changed() {
        let file = |b_port: u16| {
            format!(
                r#"{{"services": [
                {{"name": "default/a", "clusterIP": "10.96.0.10", "port": 80}},
                {{"name": "default/bad", "clusterIP": "10.96.0.11", "port": 0}},
                {{"name": "default/b", "clusterIP": "10.96.0.14", "port": {b_port}}}
            ]}}"#
            )
        };
        let mut cache = FileCache::default();
        let first = parse_file_after(&mut cache, &file(53), "test").unwrap();
        assert_eq!(cache.len(), 2);
        let second = parse_file_after(&mut cache, &file(54), "test").unwrap();
        assert_eq!(cache.len(), 2);
        let fresh = parse_file(&file(54), "test").unwrap();
        assert_eq!(second.specs, fresh.specs);
        assert_ne!(second.specs, first.specs);
        assert_eq!(second.specs[1].port, 54);
        assert_eq!(second.rejected.len(), 1);
        assert!(second.rejected[0].to_string().contains("default/bad"));
        // The same object under another etcd key is another service.
        let value = br#"{"clusterIP": "10.96.0.20", "port": 80}"#.to_vec();
        let mut cache = ParseCache::default();
        let a = parse_etcd_after(&mut cache, &[("/p/services/ns/x".into(), value.clone())]);
        let b = parse_etcd_after(&mut cache, &[("/p/services/ns/y".into(), value)]);
        assert_eq!(a.specs[0].name, "ns/x");
        assert_eq!(b.specs[0].name, "ns/y");
    }

    proptest::proptest! {
        /// Whatever a file becomes, a parse that builds on the last one (its split and its
        /// objects) gives what a first parse of it gives: the same services, the same objects
        /// left out with the same words, the same refusal of a file that is not one.
        #[test]
        fn test_a_reparse_is_a_first_parse(
            first in proptest::collection::vec(0u16..12, 0..10),
            steps in proptest::collection::vec((0u16..12, 0usize..64, 0u8..4), 1..6),
        ) {
            // Port 0 makes a bad object; 11 a malformed one.
            let object = |port: u16| match port {
                11 => r#"{"name": "ns/broken", "clusterIP": 1}"#.to_string(),
                p => format!(r#"{{"name": "ns/s{p}", "clusterIP": "10.96.0.{p}", "port": {p}}}"#),
            };
            let file = |ports: &[u16]| {
                let objects: Vec<String> = ports.iter().map(|&p| object(p)).collect();
                format!("{{\"services\": [\n{}\n]}}", objects.join(",\n"))
            };
            let mut ports = first;
            let mut cache = FileCache::default();
            let _ = parse_file_after(&mut cache, &file(&ports), "f");
            for (port, at, how) in steps {
                let text = match how {
                    0 => { ports.insert(at % (ports.len() + 1), port); file(&ports) }
                    1 if !ports.is_empty() => { let n = ports.len(); ports.remove(at % n); file(&ports) }
                    2 if !ports.is_empty() => { let n = ports.len(); ports[at % n] = port; file(&ports) }
                    _ => {
                        // A byte changed somewhere, this once.
                        let mut b = file(&ports).into_bytes();
                        let i = at % b.len();
                        b[i] = b",]}1"[usize::from(port) % 4];
                        String::from_utf8(b).unwrap()
                    }
                };
                let again = parse_file_after(&mut cache, &text, "f");
                let fresh = parse_file(&text, "f");
                let words = |p: &Result<Parsed, ServicesError>| match p {
                    Ok(p) => Ok((p.specs.clone(), p.rejected.iter().map(|e| e.to_string()).collect::<Vec<_>>())),
                    Err(e) => Err(e.to_string()),
                };
                proptest::prop_assert_eq!(words(&again), words(&fresh), "{}", text);
            }
        }
    }

    /// Writes of one size in quick succession, in place or by a rename, each land: the kernel's
    /// file clock is coarse (a few ms), so their times can be equal; the inode and the watch's
    /// wake-up (the file then read and compared) tell them apart.
    #[test]
    fn test_every_one_of_quick_same_size_writes_is_seen() {
        let dir = std::env::temp_dir().join(format!("podwire-svcfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.json");
        let text = |port: u16| {
            format!(
                r#"{{"services": [{{"name": "a/b", "clusterIP": "10.96.0.10", "port": {port}}}]}}"#
            )
        };
        std::fs::write(&path, text(1000)).unwrap();
        let mut file = ServicesFile::new(&path);
        assert_eq!(file.poll().unwrap().unwrap().specs[0].port, 1000);
        assert!(file.poll().unwrap().is_none());
        let tmp = dir.join(".services.json.tmp");
        for port in 1001..1200 {
            // Every other one replaced by a rename, as atomic writers do: a new file, whose
            // times no one has read yet (so the kernel gives it coarse ones).
            if port % 2 == 0 {
                std::fs::write(&tmp, text(port)).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            } else {
                std::fs::write(&path, text(port)).unwrap();
            }
            file.wait(Duration::from_secs(1));
            let got = file.poll().unwrap().map(|p| p.specs[0].port);
            assert_eq!(got, Some(port));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_snapshot_applies_the_good_services_and_counts_the_rest() {
        use podwire_dataplane::nat::{Admission, ServiceOptions, DEFAULT_SERVICE_CIDR};
        let file = parse_file(
            r#"{"services": [
                {"name": "default/web", "clusterIP": "10.96.0.10", "port": 80, "nodePort": 30080,
                 "endpoints": [{"ip": "10.244.2.2", "port": 8080}, {"ip": "127.0.0.1", "port": 22}]},
                {"name": "default/outside", "clusterIP": "10.244.0.10", "port": 80},
                {"name": "default/ssh", "clusterIP": "10.96.0.22", "port": 22, "nodePort": 22,
                 "endpoints": [{"ip": "10.244.2.3", "port": 22}]},
                {"name": "default/sctp", "clusterIP": "10.96.0.11", "port": 80, "protocol": "SCTP"}
            ]}"#,
            "test",
        )
        .unwrap();
        let store = parse_etcd(&[
            (
                "/coreos.com/network/services/kube-system/dns".to_string(),
                br#"{"clusterIP": "10.96.0.53", "protocol": "UDP", "port": 53}"#.to_vec(),
            ),
            (
                "/coreos.com/network/services/zz/web-twin".to_string(),
                br#"{"clusterIP": "10.96.0.10", "port": 80}"#.to_vec(),
            ),
        ]);
        let options = ServiceOptions::new(DEFAULT_SERVICE_CIDR.parse().unwrap());
        let snap = snapshot(None, options, &Admission::default(), &[&file, &store]);
        let names: Vec<_> = snap.services.specs().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["default/ssh", "default/web", "kube-system/dns"]);
        // default/outside, zz/web-twin (default/web's ClusterIP:port) and default/sctp.
        assert_eq!(snap.rejected_services(), 3);
        assert_eq!(snap.report.endpoints_removed.len(), 1);
        assert_eq!(snap.report.node_ports_refused.len(), 1);
        assert_eq!(
            snap.services.node_ports().collect::<Vec<_>>(),
            vec![(PROTO_TCP, 30080)]
        );
    }
}
