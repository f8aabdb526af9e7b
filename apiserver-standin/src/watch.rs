//! WATCH: a stream of newline-delimited JSON events, as the apiserver sends them.
//!
//! From `resourceVersion` N > 0: every retained change after N, then changes as they happen;
//! without one (or from 0): a synthetic ADDED for every selected object first. A watch whose
//! position is older than the kind's retained history gets one `ERROR` event (a Status with
//! code 410, reason Expired) and the stream ends. Selectors apply to every event: an object
//! that leaves the selection is sent as DELETED, one that enters it as ADDED.

use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{interval_at, sleep_until, Instant, Interval};

use crate::body::{ResponseBody, StreamBroken};
use crate::kinds::StoredKind;
use crate::query::Query;
use crate::selector::Selection;
use crate::server::Shared;
use crate::store::{Change, ChangeType};

/// How a watch was asked for.
#[derive(Clone, Copy, Debug)]
struct Options {
    from: Option<u64>,
    bookmarks: bool,
    timeout: Option<Duration>,
}

/// Starts a watch of kind `K` and answers with its stream.
pub fn start<K: StoredKind>(
    shared: Arc<Shared>,
    selection: Selection,
    query: &Query,
) -> Response<ResponseBody> {
    let options = Options {
        from: query.resource_version.filter(|version| *version > 0),
        bookmarks: query.allow_watch_bookmarks,
        timeout: query.timeout_seconds.map(Duration::from_secs),
    };
    let (lines, receiver) = mpsc::channel(256);
    tokio::spawn(run::<K>(shared, selection, options, lines));
    let mut response = Response::new(ResponseBody::Stream(receiver));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

type Lines = mpsc::Sender<Result<Bytes, StreamBroken>>;

fn line(event: &serde_json::Value) -> Bytes {
    let mut bytes = serde_json::to_vec(event).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn event<K: StoredKind>(kind: &str, object: &K) -> Bytes {
    line(&json!({"type": kind, "object": object}))
}

/// The event a change is to a watch with `selection`, if any.
fn event_for<K: StoredKind>(selection: &Selection, change: &Change<K>) -> Option<Bytes> {
    let after = selection.matches(change.object.metadata());
    let before = change
        .previous
        .as_ref()
        .is_some_and(|previous| selection.matches(previous.metadata()));
    let kind = match (change.change, before, after) {
        (ChangeType::Added, _, true) | (ChangeType::Modified, false, true) => "ADDED",
        (ChangeType::Modified, true, true) => "MODIFIED",
        (ChangeType::Modified, true, false) | (ChangeType::Deleted, true, _) => "DELETED",
        _ => return None,
    };
    Some(event(kind, &change.object))
}

fn bookmark<K: StoredKind>(revision: u64) -> Bytes {
    line(&json!({
        "type": "BOOKMARK",
        "object": {"kind": K::KIND, "apiVersion": K::API_VERSION, "metadata": {"resourceVersion": revision.to_string()}},
    }))
}

async fn send_all(lines: &Lines, batch: Vec<Bytes>) -> bool {
    for line in batch {
        if lines.send(Ok(line)).await.is_err() {
            return false;
        }
    }
    true
}

async fn tick(bookmarks: &mut Option<Interval>) {
    match bookmarks {
        Some(interval) => drop(interval.tick().await),
        None => pending().await,
    }
}

async fn run<K: StoredKind>(
    shared: Arc<Shared>,
    selection: Selection,
    options: Options,
    lines: Lines,
) {
    let _open = shared.counters.open_watch();
    let mut revisions = shared.store.subscribe();
    let mut breaks = shared.breaks.subscribe();
    let deadline = options.timeout.map(|timeout| Instant::now() + timeout);
    let interval = shared.config.bookmark_interval;
    let mut bookmarks = options
        .bookmarks
        .then(|| interval_at(Instant::now() + interval, interval));
    let mut position = match options.from {
        Some(version) => version,
        None => {
            let (initial, revision) = shared.store.read(|tables| {
                let objects = tables
                    .table::<K>()
                    .objects()
                    .filter(|object| selection.matches(object.metadata()));
                (
                    objects.map(|object| event("ADDED", object)).collect(),
                    tables.revision(),
                )
            });
            if !send_all(&lines, initial).await {
                return;
            }
            revision
        }
    };
    loop {
        revisions.borrow_and_update();
        let step = shared.store.read(|tables| {
            tables
                .table::<K>()
                .changes_after(position)
                .map(|changes| (changes, tables.revision()))
        });
        match step {
            Ok((changes, revision)) => {
                // Every change of this kind up to `revision` has been read: the watch is there.
                position = position.max(revision);
                if !send_all(
                    &lines,
                    changes
                        .iter()
                        .filter_map(|change| event_for(&selection, change))
                        .collect(),
                )
                .await
                {
                    return;
                }
            }
            Err(expired) => {
                shared.counters.record_expired();
                let _ = lines
                    .send(Ok(line(
                        &json!({"type": "ERROR", "object": expired.to_status()}),
                    )))
                    .await;
                return;
            }
        }
        tokio::select! {
            _ = revisions.changed() => {}
            () = tick(&mut bookmarks) => {
                if lines.send(Ok(bookmark::<K>(position))).await.is_err() {
                    return;
                }
            }
            () = async { match deadline { Some(deadline) => sleep_until(deadline).await, None => pending().await } } => return,
            _ = breaks.changed() => {
                let _ = lines.send(Err(StreamBroken)).await;
                return;
            }
            () = lines.closed() => return,
        }
    }
}
