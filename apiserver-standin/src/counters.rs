//! What the stand-in counts for tests: requests by verb and kind, open and expired watches.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::kinds::KindTag;
use crate::verb::Verb;

/// Request and watch counters.
#[derive(Debug, Default)]
pub struct Counters {
    requests: Mutex<BTreeMap<(Verb, KindTag), u64>>,
    watches_open: AtomicUsize,
    watches_expired: AtomicU64,
}

/// An open watch, counted until dropped.
#[derive(Debug)]
pub struct OpenWatch(Arc<Counters>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.watches_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Counters {
    /// Counts one authenticated request for a resource.
    pub fn record(&self, verb: Verb, kind: KindTag) {
        *self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((verb, kind))
            .or_default() += 1;
    }

    /// Requests so far with `verb` on `kind`.
    pub fn requests(&self, verb: Verb, kind: KindTag) -> u64 {
        self.all_requests().get(&(verb, kind)).copied().unwrap_or(0)
    }

    /// Every request count so far.
    pub fn all_requests(&self) -> BTreeMap<(Verb, KindTag), u64> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Counts a watch as open until the returned guard is dropped.
    pub fn open_watch(self: &Arc<Self>) -> OpenWatch {
        self.watches_open.fetch_add(1, Ordering::Relaxed);
        OpenWatch(Arc::clone(self))
    }

    /// Watches open now.
    pub fn watches_open(&self) -> usize {
        self.watches_open.load(Ordering::Relaxed)
    }

    /// Counts a watch ended with `410 Expired`.
    pub fn record_expired(&self) {
        self.watches_expired.fetch_add(1, Ordering::Relaxed);
    }

    /// Watches ended with `410 Expired` so far.
    pub fn watches_expired(&self) -> u64 {
        self.watches_expired.load(Ordering::Relaxed)
    }
}
