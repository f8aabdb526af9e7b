//! Objects to start with: a JSON `List` (`{"kind": "List", "items": [...]}`) of Node, Service
//! and EndpointSlice objects, as `kubectl get -o json` writes it.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

/// A seed file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("seed: not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("seed: expected an object with an \"items\" array")]
    NotAList,
    #[error("seed: item {index}: kind {kind:?} is not one of Node, Service, EndpointSlice")]
    UnknownKind { index: usize, kind: String },
    #[error("seed: item {index} ({kind}): {source}")]
    Item {
        index: usize,
        kind: String,
        source: serde_json::Error,
    },
}

/// One seed object.
#[derive(Clone, Debug, PartialEq)]
pub enum SeedObject {
    Node(Box<Node>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

/// Reads a seed list.
pub fn parse(text: &str) -> Result<Vec<SeedObject>, SeedError> {
    let list: Value = serde_json::from_str(text)?;
    let items = list
        .get("items")
        .and_then(Value::as_array)
        .ok_or(SeedError::NotAList)?;
    items
        .iter()
        .enumerate()
        .map(|(index, item)| parse_item(index, item))
        .collect()
}

fn parse_item(index: usize, item: &Value) -> Result<SeedObject, SeedError> {
    let kind = item
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let wrap = |source| SeedError::Item {
        index,
        kind: kind.clone(),
        source,
    };
    match kind.as_str() {
        "Node" => serde_json::from_value(item.clone())
            .map(|node| SeedObject::Node(Box::new(node)))
            .map_err(wrap),
        "Service" => serde_json::from_value(item.clone())
            .map(|service| SeedObject::Service(Box::new(service)))
            .map_err(wrap),
        "EndpointSlice" => serde_json::from_value(item.clone())
            .map(|slice| SeedObject::EndpointSlice(Box::new(slice)))
            .map_err(wrap),
        _ => Err(SeedError::UnknownKind { index, kind }),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse, SeedObject};

    #[test]
    fn reads_a_list() {
        let text = r#"{"kind":"List","apiVersion":"v1","items":[
            {"kind":"Node","apiVersion":"v1","metadata":{"name":"n1"},"spec":{"podCIDR":"10.244.1.0/24"}},
            {"kind":"Service","apiVersion":"v1","metadata":{"name":"dns","namespace":"kube-system"}},
            {"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"dns-1"},"addressType":"IPv4","endpoints":[]}
        ]}"#;
        let objects = parse(text).unwrap();
        assert_eq!(objects.len(), 3);
        assert!(
            matches!(&objects[0], SeedObject::Node(node) if node.metadata.name.as_deref() == Some("n1"))
        );
        assert!(parse(r#"{"items":[{"kind":"Pod"}]}"#).is_err());
        assert!(parse(r#"{"kind":"List"}"#).is_err());
    }
}
