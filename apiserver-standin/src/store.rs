//! The objects, one global revision counter (like etcd's), and each kind's bounded history of
//! changes that watches are served from.
//!
//! Every write takes the next revision and stamps it as `metadata.resourceVersion`; a write
//! that changes nothing is not a write (no new revision, no event), as in the apiserver.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde_json::Value;
use tokio::sync::watch;

use crate::kinds::StoredKind;
use crate::patch::{self, PatchKind};
use crate::status::ApiError;

/// Where an object lives: its namespace (empty for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// The key of a cluster-scoped object.
    pub fn cluster(name: &str) -> Self {
        Self {
            namespace: String::new(),
            name: name.to_owned(),
        }
    }

    /// The key of a namespaced object.
    pub fn namespaced(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The key an object's metadata names.
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// What a change did to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as watches see it.
#[derive(Clone, Debug)]
pub struct Change<K> {
    /// The revision the write took.
    pub revision: u64,
    pub change: ChangeType,
    /// The object after the write (for a deletion: its last state, with the deletion's
    /// resourceVersion).
    pub object: K,
    /// The object before the write (`None` for an addition).
    pub previous: Option<K>,
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The main endpoint: everything but `status`.
    Object,
    /// The `/status` subresource: `status` and `metadata`, not `spec`.
    Status,
    /// Everything (the control API, which plays every controller at once).
    All,
}

/// One kind's objects and retained changes.
#[derive(Debug)]
pub struct Table<K> {
    objects: BTreeMap<ObjectKey, K>,
    history: VecDeque<Change<K>>,
    /// Changes after this revision are all retained; a watch from before it gets 410.
    oldest: u64,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            oldest: 0,
        }
    }
}

impl<K: StoredKind> Table<K> {
    /// The object stored under `key`.
    pub fn get(&self, key: &ObjectKey) -> Option<&K> {
        self.objects.get(key)
    }

    /// Every stored object, in key order.
    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.objects.values()
    }

    /// Every retained change after `revision`, or `Expired` when some of them are forgotten.
    pub fn changes_after(&self, revision: u64) -> Result<Vec<Change<K>>, ApiError> {
        if revision < self.oldest {
            return Err(ApiError::Expired {
                requested: revision,
                oldest: self.oldest,
            });
        }
        let start = self
            .history
            .partition_point(|change| change.revision <= revision);
        Ok(self.history.range(start..).cloned().collect())
    }

    fn record(&mut self, change: Change<K>, history_size: usize) {
        self.history.push_back(change);
        while self.history.len() > history_size {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest = dropped.revision;
            }
        }
    }

    fn forget_history(&mut self, revision: u64) {
        self.history.clear();
        self.oldest = revision;
    }
}

/// Every kind's table and the global revision.
#[derive(Debug)]
pub struct Tables {
    revision: u64,
    history_size: usize,
    pub(crate) nodes: Table<Node>,
    pub(crate) services: Table<Service>,
    pub(crate) endpoint_slices: Table<EndpointSlice>,
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|err| ApiError::Invalid(err.to_string()))
}

fn from_json<K: StoredKind>(value: Value) -> Result<K, ApiError> {
    serde_json::from_value(value).map_err(|err| {
        ApiError::Invalid(format!(
            "{} in version \"{}\" cannot be handled as a {}: {err}",
            K::KIND,
            K::API_VERSION,
            K::KIND
        ))
    })
}

/// `value` without `metadata` and `status`: what a generation counts.
fn spec_of(value: &Value) -> Value {
    let mut spec = value.clone();
    if let Value::Object(map) = &mut spec {
        map.remove("metadata");
        map.remove("status");
    }
    spec
}

fn set_field(value: &mut Value, field: &str, to: Option<&Value>) {
    if let Value::Object(map) = value {
        match to {
            Some(to) => map.insert(field.to_owned(), to.clone()),
            None => map.remove(field),
        };
    }
}

/// `new` cut down to what a write through `part` may change, the rest taken from `old`.
fn restrict<K: StoredKind>(part: Part, old: &K, new: K) -> Result<K, ApiError> {
    if part == Part::All || !K::TAG.has_status() {
        return Ok(new);
    }
    let old = to_json(old)?;
    let mut new = to_json(&new)?;
    if part == Part::Object {
        set_field(&mut new, "status", old.get("status"));
    } else {
        let mut result = old;
        set_field(&mut result, "status", new.get("status"));
        set_field(&mut result, "metadata", new.get("metadata"));
        new = result;
    }
    from_json(new)
}

fn now() -> Time {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let seconds = i64::try_from(seconds).unwrap_or(0);
    Time(
        k8s_openapi::jiff::Timestamp::from_second(seconds)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

impl Tables {
    fn new(history_size: usize) -> Self {
        Self {
            revision: 0,
            history_size,
            nodes: Table::default(),
            services: Table::default(),
            endpoint_slices: Table::default(),
        }
    }

    /// The latest revision (the resourceVersion of the last write).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The table of kind `K`.
    pub fn table<K: StoredKind>(&self) -> &Table<K> {
        K::table(self)
    }

    fn commit<K: StoredKind>(
        &mut self,
        key: ObjectKey,
        change: ChangeType,
        object: K,
        previous: Option<K>,
    ) {
        let table = K::table_mut(self);
        match change {
            ChangeType::Deleted => table.objects.remove(&key),
            ChangeType::Added | ChangeType::Modified => table.objects.insert(key, object.clone()),
        };
        let history_size = self.history_size;
        let change = Change {
            revision: self.revision,
            change,
            object,
            previous,
        };
        K::table_mut(self).record(change, history_size);
    }

    fn next_revision(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }

    /// Stores a new object (POST): 409 AlreadyExists when the name is taken.
    pub fn create<K: StoredKind>(&mut self, mut object: K) -> Result<K, ApiError> {
        let key = ObjectKey::of(object.metadata());
        if key.name.is_empty() {
            return Err(ApiError::Invalid(format!("{} \"\" is invalid: metadata.name: Required value: name or generateName is required", K::TAG)));
        }
        if K::table(self).get(&key).is_some() {
            return Err(ApiError::AlreadyExists {
                kind: K::TAG,
                name: key.name,
            });
        }
        let revision = self.next_revision();
        let meta = object.metadata_mut();
        meta.resource_version = Some(revision);
        meta.uid = Some(format!("00000000-0000-4000-8000-{:012x}", self.revision));
        meta.creation_timestamp = Some(now());
        meta.generation = Some(1);
        meta.managed_fields = None;
        self.commit(key, ChangeType::Added, object.clone(), None);
        Ok(object)
    }

    /// Replaces the object under `key` with `new`, as far as `part` allows. With
    /// `check_version`, a resourceVersion in `new` other than the stored one is a 409 Conflict.
    pub fn update<K: StoredKind>(
        &mut self,
        key: &ObjectKey,
        new: K,
        part: Part,
        check_version: bool,
    ) -> Result<K, ApiError> {
        let old = K::table(self)
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::NotFound {
                kind: K::TAG,
                name: key.name.clone(),
            })?;
        let requested = new
            .metadata()
            .resource_version
            .clone()
            .filter(|version| !version.is_empty());
        if check_version && requested.is_some() && requested != old.metadata().resource_version {
            return Err(ApiError::Conflict {
                kind: K::TAG,
                name: key.name.clone(),
            });
        }
        if let Some(name) = new
            .metadata()
            .name
            .as_ref()
            .filter(|name| **name != key.name)
        {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({name}) does not match the name on the URL ({})",
                key.name
            )));
        }
        let mut new = restrict(part, &old, new)?;
        let (old_json, new_json) = (to_json(&old)?, to_json(&new)?);
        let old_meta = old.metadata();
        let generation =
            old_meta.generation.unwrap_or(1) + i64::from(spec_of(&old_json) != spec_of(&new_json));
        let meta = new.metadata_mut();
        meta.name = Some(key.name.clone());
        meta.namespace = Some(key.namespace.clone()).filter(|namespace| !namespace.is_empty());
        meta.uid.clone_from(&old_meta.uid);
        meta.creation_timestamp
            .clone_from(&old_meta.creation_timestamp);
        meta.generation = Some(generation);
        meta.resource_version.clone_from(&old_meta.resource_version);
        meta.managed_fields = None;
        if to_json(&new)? == old_json {
            return Ok(old);
        }
        new.metadata_mut().resource_version = Some(self.next_revision());
        self.commit(key.clone(), ChangeType::Modified, new.clone(), Some(old));
        Ok(new)
    }

    /// Applies a PATCH body of `kind` to the object under `key`, as far as `part` allows.
    pub fn patch<K: StoredKind>(
        &mut self,
        key: &ObjectKey,
        part: Part,
        kind: PatchKind,
        body: &[u8],
    ) -> Result<K, ApiError> {
        let old = K::table(self).get(key).ok_or_else(|| ApiError::NotFound {
            kind: K::TAG,
            name: key.name.clone(),
        })?;
        let mut document = to_json(old)?;
        patch::apply(kind, &mut document, body)?;
        let new: K = from_json(document)?;
        self.update(key, new, part, true)
    }

    /// Removes the object under `key`; returns its last state.
    pub fn delete<K: StoredKind>(&mut self, key: &ObjectKey) -> Result<K, ApiError> {
        let old = K::table(self)
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::NotFound {
                kind: K::TAG,
                name: key.name.clone(),
            })?;
        let mut last = old.clone();
        last.metadata_mut().resource_version = Some(self.next_revision());
        self.commit(key.clone(), ChangeType::Deleted, last.clone(), Some(old));
        Ok(last)
    }

    /// Creates `object`, or replaces the stored one with it whole (spec, status, metadata).
    pub fn apply<K: StoredKind>(&mut self, object: K) -> Result<K, ApiError> {
        let key = ObjectKey::of(object.metadata());
        if K::table(self).get(&key).is_some() {
            self.update(&key, object, Part::All, false)
        } else {
            self.create(object)
        }
    }

    /// Forgets every kind's history: a watch from any revision before now gets 410.
    pub fn compact(&mut self) {
        let revision = self.revision;
        self.nodes.forget_history(revision);
        self.services.forget_history(revision);
        self.endpoint_slices.forget_history(revision);
    }
}

/// The tables behind a lock, and a channel that says when the revision moved.
#[derive(Debug)]
pub struct Store {
    tables: Mutex<Tables>,
    revisions: watch::Sender<u64>,
}

impl Store {
    /// An empty store whose kinds each keep `history_size` changes.
    pub fn new(history_size: usize) -> Self {
        Self {
            tables: Mutex::new(Tables::new(history_size)),
            revisions: watch::Sender::new(0),
        }
    }

    /// Reads the tables.
    pub fn read<R>(&self, read: impl FnOnce(&Tables) -> R) -> R {
        read(&self.tables.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Changes the tables; wakes every watch when the revision moved.
    pub fn write<R>(&self, write: impl FnOnce(&mut Tables) -> R) -> R {
        let (result, revision) = {
            let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
            let result = write(&mut tables);
            (result, tables.revision)
        };
        self.revisions
            .send_if_modified(|current| std::mem::replace(current, revision) != revision);
        result
    }

    /// A receiver that changes whenever the revision moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// The latest revision.
    pub fn revision(&self) -> u64 {
        self.read(Tables::revision)
    }

    /// Wakes every watch (after a compaction, so watches behind it learn they expired).
    pub fn wake_watches(&self) {
        self.revisions.send_modify(|_| {});
    }
}
