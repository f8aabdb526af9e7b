//! What each verb does to a kind's objects.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta;

use crate::body::ResponseBody;
use crate::kinds::StoredKind;
use crate::patch::PatchKind;
use crate::query::Query;
use crate::route::Target;
use crate::selector::Selection;
use crate::server::{json_response, Shared};
use crate::status::ApiError;
use crate::store::{ObjectKey, Part};
use crate::verb::Verb;
use crate::watch;

/// An authorized request on a resource.
#[derive(Debug)]
pub struct Call<'a> {
    pub target: &'a Target,
    pub verb: Verb,
    pub query: Query,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

type Answer = Result<hyper::Response<ResponseBody>, ApiError>;

/// Answers `call` on kind `K`.
pub fn serve<K: StoredKind>(shared: &Arc<Shared>, call: Call<'_>) -> Answer {
    let target = call.target;
    let key = ObjectKey {
        namespace: target.namespace.clone().unwrap_or_default(),
        name: target.name.clone().unwrap_or_default(),
    };
    let part = if target.status {
        Part::Status
    } else {
        Part::Object
    };
    let store = &shared.store;
    let object = match call.verb {
        Verb::List => return Ok(list::<K>(shared, selection(target, &call.query))),
        Verb::Watch => {
            return Ok(watch::start::<K>(
                Arc::clone(shared),
                selection(target, &call.query),
                &call.query,
            ))
        }
        Verb::Create => return create::<K>(shared, target, call.body),
        Verb::Get => store
            .read(|tables| tables.table::<K>().get(&key).cloned())
            .ok_or(ApiError::NotFound {
                kind: K::TAG,
                name: key.name,
            })?,
        Verb::Update => {
            let object = decode::<K>(call.body)?;
            store.write(|tables| tables.update(&key, object, part, true))?
        }
        Verb::Patch => {
            let kind = PatchKind::from_content_type(call.content_type)?;
            store.write(|tables| tables.patch::<K>(&key, part, kind, call.body))?
        }
        Verb::Delete => store.write(|tables| tables.delete::<K>(&key))?,
    };
    Ok(json_response(200, &object))
}

/// What a LIST or WATCH on `target` with `query` selects.
fn selection(target: &Target, query: &Query) -> Selection {
    Selection {
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        labels: query.labels.clone(),
        fields: query.fields.clone(),
    }
}

fn decode<K: StoredKind>(body: &[u8]) -> Result<K, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::BadRequest(format!("error decoding {}: {err}", K::KIND)))
}

fn list<K: StoredKind>(shared: &Shared, selection: Selection) -> hyper::Response<ResponseBody> {
    let (items, revision) = shared.store.read(|tables| {
        let items: Vec<K> = tables
            .table::<K>()
            .objects()
            .filter(|object| selection.matches(object.metadata()))
            .cloned()
            .collect();
        (items, tables.revision())
    });
    let list = k8s_openapi::List {
        items,
        metadata: ListMeta {
            resource_version: Some(revision.to_string()),
            ..ListMeta::default()
        },
    };
    json_response(200, &list)
}

fn create<K: StoredKind>(shared: &Shared, target: &Target, body: &[u8]) -> Answer {
    let mut object = decode::<K>(body)?;
    let meta = k8s_openapi::Metadata::metadata_mut(&mut object);
    if K::TAG.namespaced() {
        match (&meta.namespace, &target.namespace) {
            (Some(given), Some(path)) if given != path => {
                return Err(ApiError::BadRequest("the namespace of the provided object does not match the namespace sent on the request".to_owned()));
            }
            _ => meta.namespace.clone_from(&target.namespace),
        }
    } else {
        meta.namespace = None;
    }
    let created = shared.store.write(|tables| tables.create(object))?;
    Ok(json_response(201, &created))
}
