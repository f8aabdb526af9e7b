//! Strategic merge patch, the part of it the stand-in's kinds need.
//!
//! Maps merge as in a JSON merge patch (so labels and annotations merge key by key). Lists
//! whose Go field carries `patchStrategy:"merge"` merge: by their `patchMergeKey` for lists of
//! objects (`status.conditions` by `type`, a service's `spec.ports` by `port`,
//! `metadata.ownerReferences` by `uid`), as a set union for lists of strings (`spec.podCIDRs`,
//! `metadata.finalizers`). Every other list is replaced. Directives: `$patch: delete` on an
//! element of a keyed list removes that element, `$patch: replace` on a map replaces the map;
//! `$setElementOrder/...` and `$retainKeys` are accepted and ignored.

use serde_json::{Map, Value};

use crate::status::ApiError;

/// How a list field merges.
enum ListStrategy {
    /// Elements are objects identified by this key.
    ByKey(&'static str),
    /// Elements are scalars; the result is the union.
    Union,
}

/// The lists with `patchStrategy:"merge"` in Node, Service and EndpointSlice, by path.
fn list_strategy(path: &[String]) -> Option<ListStrategy> {
    match path.join(".").as_str() {
        "status.conditions" => Some(ListStrategy::ByKey("type")),
        "spec.ports" => Some(ListStrategy::ByKey("port")),
        "metadata.ownerReferences" => Some(ListStrategy::ByKey("uid")),
        "spec.podCIDRs" | "metadata.finalizers" => Some(ListStrategy::Union),
        _ => None,
    }
}

/// Merges a strategic merge `patch` into `target`.
pub fn merge(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    merge_at(target, patch, &mut Vec::new())
}

fn directive(value: &Value) -> Option<&str> {
    value.get("$patch").and_then(Value::as_str)
}

fn without_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(key, _)| !key.starts_with('$'))
                .map(|(key, value)| (key.clone(), without_directives(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn merge_at(target: &mut Value, patch: &Value, path: &mut Vec<String>) -> Result<(), ApiError> {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match directive(patch) {
        Some("replace") => {
            *target = without_directives(patch);
            return Ok(());
        }
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unknown patch type: {other:?} in map at {}",
                path.join(".")
            )))
        }
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return Ok(());
    };
    for (key, value) in patch_map {
        if key.starts_with("$setElementOrder/") || key == "$retainKeys" {
            continue;
        }
        path.push(key.clone());
        if value.is_null() {
            target_map.remove(key);
        } else {
            let slot = target_map.entry(key.clone()).or_insert(Value::Null);
            match (list_strategy(path), value) {
                (Some(strategy), Value::Array(items)) => merge_list(slot, items, &strategy, path)?,
                _ => merge_at(slot, value, path)?,
            }
        }
        path.pop();
    }
    Ok(())
}

fn merge_list(
    target: &mut Value,
    items: &[Value],
    strategy: &ListStrategy,
    path: &mut Vec<String>,
) -> Result<(), ApiError> {
    if !target.is_array() {
        *target = Value::Array(Vec::new());
    }
    let Value::Array(list) = target else {
        return Ok(());
    };
    match strategy {
        ListStrategy::Union => {
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
        }
        ListStrategy::ByKey(key) => {
            for item in items {
                let id = item.get(*key).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "map: {item} does not contain declared merge key: {key}"
                    ))
                })?;
                let position = list
                    .iter()
                    .position(|existing| existing.get(*key) == Some(id));
                match (directive(item), position) {
                    (Some("delete"), Some(position)) => {
                        list.remove(position);
                    }
                    (Some("delete"), None) => {}
                    (_, Some(position)) => merge_at(&mut list[position], item, path)?,
                    (_, None) => list.push(without_directives(item)),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::merge;

    #[test]
    fn conditions_merge_by_type_other_lists_replace() {
        let mut node = json!({
            "metadata": {"annotations": {"a": "1", "b": "2"}},
            "spec": {"podCIDRs": ["10.244.1.0/24"], "taints": [{"key": "x", "effect": "NoSchedule"}]},
            "status": {"conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "NetworkUnavailable", "status": "True"},
            ]},
        });
        let patch = json!({
            "metadata": {"annotations": {"b": null, "c": "3"}},
            "spec": {"podCIDRs": ["fd00::/64"], "taints": [{"key": "y", "effect": "NoExecute"}]},
            "status": {"conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
                {"type": "MemoryPressure", "status": "False"},
            ]},
        });
        merge(&mut node, &patch).unwrap();
        assert_eq!(
            node,
            json!({
                "metadata": {"annotations": {"a": "1", "c": "3"}},
                "spec": {"podCIDRs": ["10.244.1.0/24", "fd00::/64"], "taints": [{"key": "y", "effect": "NoExecute"}]},
                "status": {"conditions": [
                    {"type": "Ready", "status": "False"},
                    {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
                    {"type": "MemoryPressure", "status": "False"},
                ]},
            })
        );
    }

    #[test]
    fn delete_and_replace_directives() {
        let mut node = json!({"status": {"conditions": [{"type": "A"}, {"type": "B"}]}, "metadata": {"labels": {"x": "1"}}});
        let patch = json!({
            "status": {"conditions": [{"type": "A", "$patch": "delete"}], "$setElementOrder/conditions": [{"type": "B"}]},
            "metadata": {"labels": {"$patch": "replace", "y": "2"}},
        });
        merge(&mut node, &patch).unwrap();
        assert_eq!(
            node,
            json!({"status": {"conditions": [{"type": "B"}]}, "metadata": {"labels": {"y": "2"}}})
        );
    }

    #[test]
    fn keyed_element_without_its_key_is_refused() {
        let mut node = json!({"status": {"conditions": []}});
        assert!(merge(
            &mut node,
            &json!({"status": {"conditions": [{"status": "True"}]}})
        )
        .is_err());
    }
}
