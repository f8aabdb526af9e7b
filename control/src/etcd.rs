//! The etcd store: flannel's v3 keyspace, shared with flanneld nodes.
//!
//! Keys (reference: flannel's `pkg/subnet/etcd`):
//! - `<prefix>/config`: net-conf.json.
//! - `<prefix>/subnets/<a.b.c.d>-<len>`: one lease per node, its value flanneld's lease JSON,
//!   attached to an etcd lease of 24 h (a key without an etcd lease is a reservation).
//!
//! Taking a lease follows flanneld (`tryAcquireLease`), except that a lost creation race is
//! retried instead of aborting start-up. Renewal grants a fresh etcd lease and re-puts the key,
//! as flanneld does, so flanneld sees nothing new. The lease set is kept current by one watch
//! on `<prefix>/subnets/` from the revision of the last full read; when the watch breaks (etcd
//! down, compaction) the store re-reads everything once etcd answers again, with backoff.
//!
//! etcd-client is async; this store owns a single-threaded tokio runtime and blocks on it, so
//! the control thread stays a plain loop and no async reaches the rest of podwire.

use crate::allocate::{self, Choice};
use crate::config::{parse_net_conf, NetworkConfig};
use crate::lease::LeaseAttrs;
use crate::secret::Secret;
use crate::store::{KeyValues, Lease, LeaseRequest, OwnLease, Store, StoreError};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use podwire_dataplane::route::Ipv4Net;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// flanneld's `subnetTTL`.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// flanneld's default `-etcd-endpoints`.
pub const DEFAULT_ENDPOINTS: &str = "http://127.0.0.1:4001,http://127.0.0.1:2379";
/// flanneld's default `-etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// Attempts at creating a subnet before giving up (each loss means another node won it).
const MAX_CREATE_ATTEMPTS: usize = 50;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// `fut` bounded by `limit`; the timer is made inside the runtime (it needs its clock).
async fn within<F: Future>(
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout(limit, fut).await
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    /// Never printed: its `Debug` is `<redacted>`.
    pub password: Option<Secret>,
    /// TTL of the leases we write (flanneld: 24 h).
    pub lease_ttl: Duration,
    /// Longest wait for any one request.
    pub timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: DEFAULT_ENDPOINTS.split(',').map(str::to_string).collect(),
            prefix: DEFAULT_PREFIX.to_string(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
            lease_ttl: LEASE_TTL,
            timeout: Duration::from_secs(5),
        }
    }
}

impl EtcdOptions {
    /// What these options would send in clear text, and to which endpoints: a user name and
    /// password (or a client key) with `http://` endpoints, or scheme-less ones without TLS
    /// options (etcd-client dials those over plain HTTP). Empty when nothing secret is
    /// configured or every endpoint is TLS.
    pub fn cleartext_exposure(&self) -> Option<(&'static str, Vec<&str>)> {
        let what = match (self.password.is_some(), self.key_file.is_some()) {
            (true, true) => "the etcd user name and password, and the client key's identity",
            (true, false) => "the etcd user name and password",
            (false, true) => "the etcd client key's identity",
            (false, false) => return None,
        };
        let tls = self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some();
        let plain: Vec<&str> = self
            .endpoints
            .iter()
            .map(String::as_str)
            .filter(|e| e.starts_with("http://") || (!e.contains("://") && !tls))
            .collect();
        (!plain.is_empty()).then_some((what, plain))
    }
}

/// A key under `<prefix>/subnets/` as read, with the etcd lease it hangs on (0: none).
#[derive(Debug, Clone)]
struct RawLease {
    subnet: Ipv4Net,
    attrs: LeaseAttrs,
    etcd_lease: i64,
}

/// The TLS files' contents (PEM).
#[derive(Clone)]
struct TlsPem {
    ca: Option<Vec<u8>>,
    /// Certificate and key.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// flannel's keyspace in etcd.
pub struct EtcdStore {
    rt: tokio::runtime::Runtime,
    opts: EtcdOptions,
    tls_pem: Option<TlsPem>,
    client: Option<Client>,
    config: Option<NetworkConfig>,
    /// Valid leases by key, as of `revision`.
    leases: BTreeMap<String, Lease>,
    /// Keys under `subnets/` whose value is left out as invalid (malformed, unroutable).
    invalid: BTreeSet<String>,
    revision: i64,
    /// Revision of the last full read: watch events up to it are already in `leases`.
    snapshot_revision: i64,
    watch: Option<WatchStream>,
    /// Watch on `<prefix>/services/`; None until the services are first read (or after the
    /// watch broke: the next call reads them all again).
    services_watch: Option<WatchStream>,
    services_retry_at: Instant,
    /// Set when `leases` changed since the caller last heard.
    dirty: bool,
    retry_at: Instant,
    backoff: Duration,
    synced_once: bool,
    reconnects: u64,
    lost_races: u64,
    rng: StdRng,
}

impl EtcdStore {
    /// A store for `opts`; nothing is contacted until the first request.
    pub fn new(opts: EtcdOptions) -> Result<EtcdStore, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // The blocking pool's threads (name resolution) need no capability; some start
            // before the daemon drops its own (see crate::privs), so each drops them itself.
            .on_thread_start(|| {
                if let Err(e) = crate::privs::drop_all() {
                    tracing::warn!(error = %e, "a tokio thread keeps its capabilities");
                }
            })
            .build()
            .map_err(|source| StoreError::Read {
                path: "tokio runtime".into(),
                source,
            })?;
        Ok(EtcdStore {
            rt,
            opts,
            tls_pem: None,
            client: None,
            config: None,
            leases: BTreeMap::new(),
            invalid: BTreeSet::new(),
            revision: 0,
            snapshot_revision: 0,
            watch: None,
            services_watch: None,
            services_retry_at: Instant::now(),
            dirty: false,
            retry_at: Instant::now(),
            backoff: BACKOFF_MIN,
            synced_once: false,
            reconnects: 0,
            lost_races: 0,
            rng: StdRng::from_os_rng(),
        })
    }

    /// Subnet creations lost to another node (each one retried).
    pub fn lost_races(&self) -> u64 {
        self.lost_races
    }

    fn endpoints(&self) -> String {
        self.opts.endpoints.join(",")
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.opts.prefix.trim_end_matches('/'))
    }

    fn subnet_key(&self, subnet: &Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), crate::subnet_key::of(subnet))
    }

    fn etcd_err(&self, error: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints(),
            error,
        }
    }

    /// Blocks on `fut` for at most the configured timeout, errors mapped to `StoreError`.
    fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let timeout = self.opts.timeout;
        match self.rt.block_on(within(timeout, fut)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.etcd_err(e)),
            Err(_) => Err(StoreError::Timeout {
                endpoints: self.endpoints(),
                timeout,
            }),
        }
    }

    /// Runs one request with the configured timeout.
    fn call<T, F>(&mut self, make: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client()?;
        self.bounded(make(client))
    }

    /// The TLS files' contents, read at the first connection and kept: a reconnection after
    /// the daemon dropped its capabilities needs no file access (a key file readable only by
    /// its owner, not root, stays usable), as flanneld reads them once.
    fn tls_pem(&mut self) -> Result<&TlsPem, StoreError> {
        if self.tls_pem.is_none() {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|source| StoreError::TlsFile {
                    path: p.clone(),
                    source,
                })
            };
            let ca = self.opts.ca_file.as_ref().map(read).transpose()?;
            // As flanneld: a client identity only when both the certificate and the key are given.
            let identity = match (&self.opts.cert_file, &self.opts.key_file) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            };
            self.tls_pem = Some(TlsPem { ca, identity });
        }
        Ok(self.tls_pem.as_ref().expect("just read"))
    }

    fn connect_options(&mut self) -> Result<ConnectOptions, StoreError> {
        let pem = self.tls_pem()?.clone();
        let mut o = ConnectOptions::new()
            .with_connect_timeout(self.opts.timeout)
            .with_timeout(self.opts.timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let (Some(u), Some(p)) = (&self.opts.username, &self.opts.password) {
            o = o.with_user(u, p.expose());
        }
        let mut tls = None;
        if let Some(ca) = pem.ca {
            tls = Some(TlsOptions::new().ca_certificate(Certificate::from_pem(ca)));
        }
        if let Some((cert, key)) = pem.identity {
            let id = Identity::from_pem(cert, key);
            tls = Some(tls.unwrap_or_default().identity(id));
        }
        if let Some(t) = tls {
            o = o.with_tls(t);
        }
        Ok(o)
    }

    fn client(&mut self) -> Result<Client, StoreError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let options = self.connect_options()?;
        let endpoints = self.opts.endpoints.clone();
        let client = self.bounded(Client::connect(endpoints, Some(options)))?;
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Every key under `subnets/` that parses, the keys that do not, and the revision of the
    /// read.
    fn list(&mut self) -> Result<(Vec<RawLease>, Vec<String>, i64), StoreError> {
        let prefix = self.subnets_prefix();
        let resp = self.call(|mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut out = Vec::with_capacity(resp.kvs().len());
        let mut malformed = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            match self.parse_lease(&key, kv.value()) {
                Ok((subnet, attrs)) => out.push(RawLease {
                    subnet,
                    attrs,
                    etcd_lease: kv.lease(),
                }),
                Err(why) => {
                    tracing::warn!(%key, %why, "ignoring a malformed lease in etcd");
                    malformed.push(key.into_owned());
                }
            }
        }
        Ok((out, malformed, revision))
    }

    fn services_prefix(&self) -> String {
        format!("{}/services/", self.opts.prefix.trim_end_matches('/'))
    }

    /// Every key and value under `services/`, and the revision read at.
    fn read_services(&mut self) -> Result<(KeyValues, i64), StoreError> {
        let prefix = self.services_prefix();
        let resp = self.call(|mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let items = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect();
        Ok((items, revision))
    }

    /// Full read of the services and a watch from just after it.
    fn resync_services(&mut self) -> Result<KeyValues, StoreError> {
        let (items, read_at) = self.read_services()?;
        let prefix = self.services_prefix();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(read_at + 1);
        let mut stream = self.call(|mut c| async move { c.watch(prefix, Some(opts)).await })?;
        if self.bounded(stream.message())?.is_none() {
            return Err(StoreError::Reconnecting {
                endpoints: self.endpoints(),
                retry_in: Duration::ZERO,
            });
        }
        self.services_watch = Some(stream);
        Ok(items)
    }

    /// A key and value under `subnets/` as a lease, or why not.
    fn parse_lease(&self, key: &str, value: &[u8]) -> Result<(Ipv4Net, LeaseAttrs), String> {
        let name = key
            .strip_prefix(&self.subnets_prefix())
            .ok_or("not under the subnets prefix")?;
        let subnet = crate::subnet_key::parse(name).map_err(|e| format!("bad key: {e}"))?;
        let attrs: LeaseAttrs =
            serde_json::from_slice(value).map_err(|e| format!("bad lease JSON: {e}"))?;
        Ok((subnet, attrs))
    }

    /// Whether a parsed lease can go into the map under the current config.
    fn usable(&self, key: &str, subnet: &Ipv4Net, attrs: &LeaseAttrs) -> Result<(), String> {
        if let Some(cfg) = &self.config {
            if !cfg.network.covers(subnet) || subnet.prefix() != cfg.subnet_len {
                return Err(format!(
                    "{subnet} is not a /{} inside {}",
                    cfg.subnet_len, cfg.network
                ));
            }
        }
        attrs
            .to_node(*subnet, key)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn insert_lease(&mut self, key: &str, subnet: Ipv4Net, attrs: LeaseAttrs) {
        match self.usable(key, &subnet, &attrs) {
            Ok(()) => {
                self.invalid.remove(key);
                let lease = Lease { subnet, attrs };
                if self.leases.get(key) != Some(&lease) {
                    self.leases.insert(key.to_string(), lease);
                    self.dirty = true;
                }
            }
            Err(why) => {
                tracing::warn!(%key, %why, "ignoring a lease that cannot be routed to");
                self.leave_out(key);
            }
        }
    }

    /// A lease key whose value is left out as invalid: counted until it is fixed or deleted.
    fn leave_out(&mut self, key: &str) {
        self.invalid.insert(key.to_string());
        if self.leases.remove(key).is_some() {
            self.dirty = true;
        }
    }

    /// A lease key deleted from the store.
    fn forget_lease(&mut self, key: &str) {
        self.invalid.remove(key);
        if self.leases.remove(key).is_some() {
            self.dirty = true;
        }
    }

    /// Replaces the lease cache with a full read; sets `dirty` if the lease set differs.
    fn load_all(&mut self) -> Result<i64, StoreError> {
        let (raw, malformed, revision) = self.list()?;
        let before = std::mem::take(&mut self.leases);
        self.invalid = malformed.into_iter().collect();
        for r in raw {
            let key = self.subnet_key(&r.subnet);
            self.insert_lease(&key, r.subnet, r.attrs);
        }
        self.dirty = self.leases != before;
        self.revision = revision;
        Ok(revision)
    }

    /// Full read, then a watch from just after it. etcd serves a watch that starts in the past
    /// from a catch-up loop that runs every 100 ms, so if anything changed between the read and
    /// the watch (nodes starting together), read and watch again (a few times at most) rather
    /// than hear of it up to 100 ms late. Replayed events already in the read are skipped.
    fn resync(&mut self) -> Result<(), StoreError> {
        let mut dirty = false;
        for _ in 0..3 {
            let read_at = self.load_all()?;
            dirty |= self.dirty;
            let prefix = self.subnets_prefix();
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(read_at + 1);
            let mut stream = self.call(|mut c| async move { c.watch(prefix, Some(opts)).await })?;
            let created = match self.bounded(stream.message())? {
                Some(r) => r,
                None => {
                    return Err(StoreError::Reconnecting {
                        endpoints: self.endpoints(),
                        retry_in: Duration::ZERO,
                    })
                }
            };
            self.watch = Some(stream);
            self.snapshot_revision = read_at;
            self.apply(&created);
            dirty |= self.dirty;
            if created.header().is_none_or(|h| h.revision() <= read_at) {
                break; // nothing happened since the read: the watch is live
            }
        }
        self.dirty = dirty;
        if self.synced_once {
            self.reconnects += 1;
            tracing::info!(
                revision = self.revision,
                leases = self.leases.len(),
                "etcd reachable again; lease set re-read"
            );
        }
        self.synced_once = true;
        self.backoff = BACKOFF_MIN;
        Ok(())
    }

    fn fail(&mut self) {
        self.watch = None;
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn apply(&mut self, resp: &etcd_client::WatchResponse) {
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            if kv.mod_revision() <= self.snapshot_revision {
                continue; // already in the full read
            }
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match ev.event_type() {
                EventType::Put => match self.parse_lease(&key, kv.value()) {
                    Ok((subnet, attrs)) => self.insert_lease(&key, subnet, attrs),
                    Err(why) => {
                        tracing::warn!(%key, %why, "ignoring a malformed lease in etcd");
                        self.leave_out(&key);
                    }
                },
                EventType::Delete => self.forget_lease(&key),
            }
        }
        if let Some(h) = resp.header() {
            self.revision = self.revision.max(h.revision());
        }
    }

    fn grant(&mut self) -> Result<(i64, SystemTime), StoreError> {
        let ttl = self.opts.lease_ttl.as_secs().max(1) as i64;
        let resp = self.call(|mut c| async move { c.lease_grant(ttl, None).await })?;
        let granted = Duration::from_secs(resp.ttl().max(1) as u64);
        Ok((resp.id(), SystemTime::now() + granted))
    }

    fn revoke(&mut self, id: i64) {
        if id != 0 {
            if let Err(e) = self.call(|mut c| async move { c.lease_revoke(id).await }) {
                tracing::debug!(error = %e, id, "revoking a spare etcd lease failed; it expires by itself");
            }
        }
    }

    fn value(attrs: &LeaseAttrs) -> Vec<u8> {
        serde_json::to_vec(attrs).expect("lease attrs serialise")
    }

    /// Puts our lease under a fresh etcd lease, only if `key` is in the state `cond` says.
    fn put_leased(
        &mut self,
        subnet: &Ipv4Net,
        attrs: &LeaseAttrs,
        cond: Compare,
    ) -> Result<Option<OwnLease>, StoreError> {
        let key = self.subnet_key(subnet);
        let (id, expires) = self.grant()?;
        let txn = Txn::new().when([cond]).and_then([TxnOp::put(
            key,
            Self::value(attrs),
            Some(PutOptions::new().with_lease(id)),
        )]);
        let resp = self.call(|mut c| async move { c.txn(txn).await })?;
        if !resp.succeeded() {
            self.revoke(id);
            return Ok(None);
        }
        Ok(Some(OwnLease {
            subnet: *subnet,
            attrs: attrs.clone(),
            expires: Some(expires),
        }))
    }
}

/// Direct writes, for the lab and the tests: playing other nodes and the operator.
impl EtcdStore {
    /// Puts every `(key, value)`, under one fresh etcd lease of `ttl` if given, in transactions
    /// of up to 100 keys (etcd's default limit is 128 operations).
    pub fn put_many(
        &mut self,
        kvs: &[(String, String)],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let lease = match ttl {
            Some(t) => {
                let secs = t.as_secs().max(1) as i64;
                self.call(|mut c| async move { c.lease_grant(secs, None).await })?
                    .id()
            }
            None => 0,
        };
        for chunk in kvs.chunks(100) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| {
                    let o = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                    TxnOp::put(k.as_str(), v.as_str(), o)
                })
                .collect();
            let txn = Txn::new().and_then(ops);
            self.call(|mut c| async move { c.txn(txn).await })?;
        }
        Ok(())
    }

    /// Deletes `key`.
    pub fn delete_key(&mut self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.call(|mut c| async move { c.delete(key, None).await })
            .map(|_| ())
    }

    /// The value of `key`, if set.
    pub fn get_key(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_string();
        let resp = self.call(|mut c| async move { c.get(key, None).await })?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}

impl Store for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints(), self.opts.prefix)
    }

    fn config(&mut self) -> Result<NetworkConfig, StoreError> {
        let key = format!("{}/config", self.opts.prefix.trim_end_matches('/'));
        let k = key.clone();
        let resp = self.call(|mut c| async move { c.get(k, None).await })?;
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| StoreError::NoConfig(key.clone()))?;
        let text = String::from_utf8_lossy(kv.value());
        let cfg = parse_net_conf(&text).map_err(|source| StoreError::Invalid {
            at: key.clone(),
            source,
        })?;
        self.config = Some(cfg.clone());
        Ok(cfg)
    }

    fn acquire(&mut self, req: &LeaseRequest) -> Result<OwnLease, StoreError> {
        self.config = Some(req.config.clone());
        for attempt in 1..=MAX_CREATE_ATTEMPTS {
            let (raw, _, _) = self.list()?;
            let decision = allocate::choose(
                &req.config,
                raw.iter().map(|r| (r.subnet, &r.attrs)),
                req.public_ip,
                req.previous,
                &mut self.rng,
            );
            for stale in &decision.delete {
                let key = self.subnet_key(stale);
                tracing::warn!(%key, "deleting our old lease: it does not fit the network config");
                self.call(|mut c| async move { c.delete(key, None).await })?;
            }
            match decision.choice {
                Choice::Reuse(subnet) => {
                    let old = raw
                        .iter()
                        .find(|r| r.subnet == subnet)
                        .map_or(0, |r| r.etcd_lease);
                    let key = self.subnet_key(&subnet);
                    if old == 0 {
                        // A reservation: keep it one (no etcd lease), only refresh the value.
                        let value = Self::value(&req.attrs);
                        self.call(|mut c| async move { c.put(key, value, None).await })?;
                        tracing::info!(%subnet, "using our reserved subnet");
                        return Ok(OwnLease {
                            subnet,
                            attrs: req.attrs.clone(),
                            expires: None,
                        });
                    }
                    let cond = Compare::version(key, CompareOp::Greater, 0);
                    if let Some(own) = self.put_leased(&subnet, &req.attrs, cond)? {
                        self.revoke(old);
                        tracing::info!(%subnet, "reusing the lease that has our PublicIP");
                        return Ok(own);
                    }
                }
                Choice::Create(subnet) => {
                    let key = self.subnet_key(&subnet);
                    let cond = Compare::version(key, CompareOp::Equal, 0);
                    if let Some(own) = self.put_leased(&subnet, &req.attrs, cond)? {
                        tracing::info!(%subnet, attempt, "took a new subnet");
                        return Ok(own);
                    }
                    self.lost_races += 1;
                    tracing::info!(%subnet, attempt, "another node took this subnet first; choosing again");
                }
                Choice::Exhausted => return Err(StoreError::Exhausted),
            }
            // Whoever won is writing now; a short random pause spreads the next round.
            let pause = Duration::from_millis(self.rng.random_range(5..50));
            std::thread::sleep(pause);
        }
        Err(StoreError::Contended(MAX_CREATE_ATTEMPTS))
    }

    fn renew(&mut self, req: &LeaseRequest, own: &OwnLease) -> Result<OwnLease, StoreError> {
        if own.expires.is_none() {
            return Ok(own.clone());
        }
        let key = self.subnet_key(&own.subnet);
        // Only while the key is still ours: if it went (deleted, expired) the caller re-acquires.
        let cond = Compare::version(key.clone(), CompareOp::Greater, 0);
        let old = self
            .call(|mut c| async move { c.get(key, None).await })?
            .kvs()
            .first()
            .map_or(0, |kv| kv.lease());
        match self.put_leased(&own.subnet, &req.attrs, cond)? {
            Some(renewed) => {
                self.revoke(old);
                Ok(renewed)
            }
            None => Err(StoreError::LeaseLost(own.subnet)),
        }
    }

    fn leases(&mut self) -> Result<Vec<Lease>, StoreError> {
        if !self.synced_once {
            self.resync()?;
        }
        self.dirty = false;
        Ok(self.leases.values().cloned().collect())
    }

    fn wait_changes(&mut self, wait: Duration) -> Result<bool, StoreError> {
        let deadline = Instant::now() + wait;
        if self.watch.is_none() {
            let now = Instant::now();
            if now < self.retry_at {
                std::thread::sleep(wait.min(self.retry_at - now));
                return Err(StoreError::Reconnecting {
                    endpoints: self.endpoints(),
                    retry_in: self.retry_at.saturating_duration_since(Instant::now()),
                });
            }
            if let Err(e) = self.resync() {
                self.fail();
                return Err(e);
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let stream = self.watch.as_mut().expect("watch set above");
            let next = self.rt.block_on(within(left, stream.message()));
            match next {
                Err(_elapsed) => break,
                Ok(Ok(Some(resp))) => {
                    if resp.canceled() {
                        tracing::warn!(
                            compact_revision = resp.compact_revision(),
                            reason = resp.cancel_reason(),
                            "etcd cancelled the lease watch; re-reading every lease"
                        );
                        self.watch = None;
                        self.retry_at = Instant::now();
                        break;
                    }
                    self.apply(&resp);
                    // Take whatever else is already queued, then report once.
                    if self.dirty {
                        while let Some(stream) = self.watch.as_mut() {
                            let more = self.rt.block_on(within(Duration::ZERO, stream.message()));
                            match more {
                                Ok(Ok(Some(m))) if !m.canceled() => self.apply(&m),
                                Ok(Ok(Some(_))) => {
                                    self.watch = None;
                                    self.retry_at = Instant::now();
                                }
                                _ => break,
                            }
                        }
                        break;
                    }
                }
                Ok(Ok(None)) => {
                    tracing::warn!(
                        "etcd closed the lease watch; keeping the last map and reconnecting"
                    );
                    self.fail();
                    break;
                }
                Ok(Err(e)) => {
                    let e = self.etcd_err(e);
                    self.fail();
                    return Err(e);
                }
            }
        }
        Ok(std::mem::take(&mut self.dirty))
    }

    fn services(&mut self) -> Result<Option<KeyValues>, StoreError> {
        if self.services_watch.is_none() {
            if Instant::now() < self.services_retry_at {
                return Ok(None);
            }
            return match self.resync_services() {
                Ok(items) => Ok(Some(items)),
                Err(e) => {
                    self.services_retry_at = Instant::now() + self.backoff;
                    Err(e)
                }
            };
        }
        // Drain what the watch has queued without waiting; any event means a re-read.
        let mut changed = false;
        while let Some(stream) = self.services_watch.as_mut() {
            match self.rt.block_on(within(Duration::ZERO, stream.message())) {
                Err(_nothing_yet) => break,
                Ok(Ok(Some(m))) if m.canceled() => {
                    tracing::warn!("etcd cancelled the services watch; re-reading them");
                    self.services_watch = None;
                }
                Ok(Ok(Some(m))) => changed |= !m.events().is_empty(),
                Ok(Ok(None)) => self.services_watch = None,
                Ok(Err(e)) => {
                    self.services_watch = None;
                    self.services_retry_at = Instant::now() + self.backoff;
                    return Err(self.etcd_err(e));
                }
            }
        }
        if self.services_watch.is_none() {
            // Broken: the next call reads everything again.
            return Ok(None);
        }
        if changed {
            return self.read_services().map(|(items, _)| Some(items));
        }
        Ok(None)
    }

    fn reconnects(&self) -> u64 {
        self.reconnects
    }

    fn rejected_leases(&self) -> u64 {
        self.invalid.len() as u64
    }
}

/// An etcd client error in one line: what failed and its root cause (`tcp connect error:
/// Connection refused (os error 111)`), not the transport's nested debug text.
pub fn readable(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (what, mut next): (String, Option<&dyn std::error::Error>) = match e {
        etcd_client::Error::GRpcStatus(s) if s.message().is_empty() => {
            (s.code().description().to_string(), s.source())
        }
        etcd_client::Error::GRpcStatus(s) => (s.message().to_string(), s.source()),
        etcd_client::Error::TransportError(t) => ("transport error".to_string(), t.source()),
        other => (other.to_string(), None),
    };
    let mut root = None;
    while let Some(s) = next {
        root = Some(s);
        next = s.source();
    }
    match root {
        Some(r) if !what.contains(&r.to_string()) => format!("{what}: {r}"),
        _ => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_leases_left_out_as_invalid_are_counted_until_fixed_or_gone() {
        let mut s = EtcdStore::new(EtcdOptions::default()).unwrap();
        let vxlan = |mac: &str| -> LeaseAttrs {
            serde_json::from_str(&format!(
                r#"{{"PublicIP":"192.168.0.2","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
            ))
            .unwrap()
        };
        let subnet: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        let key = s.subnet_key(&subnet);
        s.insert_lease(&key, subnet, vxlan("01:00:5e:00:00:01"));
        assert!(s.leases.is_empty());
        assert_eq!(s.rejected_leases(), 1);
        // The same key again is still one lease left out.
        s.insert_lease(&key, subnet, vxlan("00:00:00:00:00:00"));
        assert_eq!(s.rejected_leases(), 1);
        s.insert_lease(&key, subnet, vxlan("0e:70:c0:a8:00:02"));
        assert_eq!((s.leases.len(), s.rejected_leases()), (1, 0));
        let other: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let other_key = s.subnet_key(&other);
        s.insert_lease(&other_key, other, vxlan("ff:ff:ff:ff:ff:ff"));
        assert_eq!(s.rejected_leases(), 1);
        s.forget_lease(&other_key);
        assert_eq!(s.rejected_leases(), 0);
    }

    #[test]
    fn test_debug_never_shows_the_password() {
        let opts = EtcdOptions {
            username: Some("flannel".into()),
            password: Some("hunter2-s3cret".into()),
            ..Default::default()
        };
        let shown = format!("{opts:?} {opts:#?}");
        assert!(!shown.contains("hunter2-s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("flannel"), "the rest stays visible: {shown}");
    }

    #[test]
    fn test_cleartext_credentials_are_noticed() {
        let with = |endpoints: &[&str], password: bool, key: bool, ca: bool| EtcdOptions {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            username: password.then(|| "flannel".into()),
            password: password.then(|| "pw".into()),
            key_file: key.then(|| "/k.pem".into()),
            cert_file: key.then(|| "/c.pem".into()),
            ca_file: ca.then(|| "/ca.pem".into()),
            ..Default::default()
        };
        // No credentials: nothing to say, whatever the scheme.
        assert_eq!(
            with(&["http://e:2379"], false, false, false).cleartext_exposure(),
            None
        );
        // The default endpoints are http://.
        let defaults = EtcdOptions {
            password: Some("pw".into()),
            ..Default::default()
        };
        let (what, plain) = defaults.cleartext_exposure().unwrap();
        assert!(what.contains("password"));
        assert_eq!(plain, ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]);
        // Only the plain ones are named.
        let o = with(&["https://a:2379", "http://b:2379"], true, false, true);
        assert_eq!(o.cleartext_exposure().unwrap().1, ["http://b:2379"]);
        assert_eq!(
            with(&["https://a:2379"], true, true, true).cleartext_exposure(),
            None
        );
        // Scheme-less: plain unless TLS options are given.
        assert_eq!(
            with(&["a:2379"], true, false, false)
                .cleartext_exposure()
                .unwrap()
                .1,
            ["a:2379"]
        );
        assert_eq!(
            with(&["a:2379"], true, false, true).cleartext_exposure(),
            None
        );
        let (what, _) = with(&["http://b:2379"], false, true, false)
            .cleartext_exposure()
            .unwrap();
        assert!(what.contains("client key"), "{what}");
    }
}
