//! JSON patch, RFC 6902: `add`, `remove`, `replace`, `move`, `copy`, `test`, with RFC 6901
//! pointers. The operations apply in order to a copy; on any failure the document is left as
//! it was.

use serde_json::Value;

/// A patch that is not a list of well-formed operations.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("json patch: the patch must be a JSON array of operations")]
    NotAnArray,
    #[error("json patch: operation {0} is missing {1:?}")]
    Missing(usize, &'static str),
    #[error("json patch: operation {0} has unknown op {1:?}")]
    UnknownOp(usize, String),
}

/// An operation that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("jsonpatch {op} operation does not apply: doc is missing path: {path}")]
    MissingPath { op: &'static str, path: String },
    #[error("testing value {path} failed: test failed")]
    TestFailed { path: String },
    #[error("invalid JSON pointer {0:?}")]
    BadPointer(String),
}

/// One operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    Add { path: String, value: Value },
    Remove { path: String },
    Replace { path: String, value: Value },
    Move { from: String, path: String },
    Copy { from: String, path: String },
    Test { path: String, value: Value },
}

/// Reads a patch document into its operations.
pub fn parse(patch: &Value) -> Result<Vec<Operation>, ParseError> {
    let operations = patch.as_array().ok_or(ParseError::NotAnArray)?;
    operations
        .iter()
        .enumerate()
        .map(|(index, operation)| parse_one(index, operation))
        .collect()
}

fn parse_one(index: usize, operation: &Value) -> Result<Operation, ParseError> {
    let text = |field: &'static str| {
        operation
            .get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(ParseError::Missing(index, field))
    };
    let value = || {
        operation
            .get("value")
            .cloned()
            .ok_or(ParseError::Missing(index, "value"))
    };
    let op = text("op")?;
    Ok(match op.as_str() {
        "add" => Operation::Add {
            path: text("path")?,
            value: value()?,
        },
        "remove" => Operation::Remove {
            path: text("path")?,
        },
        "replace" => Operation::Replace {
            path: text("path")?,
            value: value()?,
        },
        "move" => Operation::Move {
            from: text("from")?,
            path: text("path")?,
        },
        "copy" => Operation::Copy {
            from: text("from")?,
            path: text("path")?,
        },
        "test" => Operation::Test {
            path: text("path")?,
            value: value()?,
        },
        _ => return Err(ParseError::UnknownOp(index, op)),
    })
}

/// Applies `operations` to `document`, all or nothing.
pub fn apply(document: &mut Value, operations: &[Operation]) -> Result<(), ApplyError> {
    let mut work = document.clone();
    for operation in operations {
        apply_one(&mut work, operation)?;
    }
    *document = work;
    Ok(())
}

fn apply_one(document: &mut Value, operation: &Operation) -> Result<(), ApplyError> {
    match operation {
        Operation::Add { path, value } => add(document, path, value.clone(), "add"),
        Operation::Remove { path } => remove(document, path, "remove").map(drop),
        Operation::Replace { path, value } => {
            remove(document, path, "replace")?;
            add(document, path, value.clone(), "replace")
        }
        Operation::Move { from, path } => {
            let value = remove(document, from, "move")?;
            add(document, path, value, "move")
        }
        Operation::Copy { from, path } => {
            let value = document
                .pointer(from)
                .cloned()
                .ok_or_else(|| ApplyError::MissingPath {
                    op: "copy",
                    path: from.clone(),
                })?;
            add(document, path, value, "copy")
        }
        Operation::Test { path, value } => match document.pointer(path) {
            Some(found) if found == value => Ok(()),
            Some(_) => Err(ApplyError::TestFailed { path: path.clone() }),
            None => Err(ApplyError::MissingPath {
                op: "test",
                path: path.clone(),
            }),
        },
    }
}

/// The parent's pointer and the last reference token (unescaped) of `path`.
fn split(path: &str) -> Result<(&str, String), ApplyError> {
    if !path.starts_with('/') {
        return Err(ApplyError::BadPointer(path.to_owned()));
    }
    let cut = path.rfind('/').unwrap_or(0);
    Ok((
        &path[..cut],
        path[cut + 1..].replace("~1", "/").replace("~0", "~"),
    ))
}

fn add(document: &mut Value, path: &str, value: Value, op: &'static str) -> Result<(), ApplyError> {
    if path.is_empty() {
        *document = value;
        return Ok(());
    }
    let (parent, token) = split(path)?;
    let missing = || ApplyError::MissingPath {
        op,
        path: path.to_owned(),
    };
    match document.pointer_mut(parent).ok_or_else(missing)? {
        Value::Object(map) => {
            map.insert(token, value);
            Ok(())
        }
        Value::Array(list) => {
            let index = if token == "-" {
                list.len()
            } else {
                token.parse::<usize>().map_err(|_| missing())?
            };
            if index > list.len() {
                return Err(missing());
            }
            list.insert(index, value);
            Ok(())
        }
        _ => Err(missing()),
    }
}

fn remove(document: &mut Value, path: &str, op: &'static str) -> Result<Value, ApplyError> {
    let (parent, token) = split(path)?;
    let missing = || ApplyError::MissingPath {
        op,
        path: path.to_owned(),
    };
    match document.pointer_mut(parent).ok_or_else(missing)? {
        Value::Object(map) => map.remove(&token).ok_or_else(missing),
        Value::Array(list) => {
            let index = token.parse::<usize>().map_err(|_| missing())?;
            if index >= list.len() {
                return Err(missing());
            }
            Ok(list.remove(index))
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{apply, parse};

    #[test]
    fn operations_apply_in_order() {
        let mut doc = json!({"metadata": {"annotations": {"a/b": "1"}}, "list": [1, 3]});
        let patch = json!([
            {"op": "test", "path": "/metadata/annotations/a~1b", "value": "1"},
            {"op": "add", "path": "/list/1", "value": 2},
            {"op": "add", "path": "/list/-", "value": 4},
            {"op": "replace", "path": "/metadata/annotations/a~1b", "value": "2"},
            {"op": "copy", "from": "/list/0", "path": "/first"},
            {"op": "move", "from": "/first", "path": "/metadata/first"},
            {"op": "remove", "path": "/list/0"},
        ]);
        apply(&mut doc, &parse(&patch).unwrap()).unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"annotations": {"a/b": "2"}, "first": 1}, "list": [2, 3, 4]})
        );
    }

    #[test]
    fn a_failed_test_changes_nothing() {
        let mut doc = json!({"a": 1});
        let patch = json!([{"op": "add", "path": "/b", "value": 2}, {"op": "test", "path": "/a", "value": 2}]);
        assert!(apply(&mut doc, &parse(&patch).unwrap()).is_err());
        assert_eq!(doc, json!({"a": 1}));
        assert!(apply(
            &mut doc,
            &parse(&json!([{"op": "replace", "path": "/missing", "value": 1}])).unwrap()
        )
        .is_err());
        assert!(parse(&json!([{"op": "frobnicate", "path": "/a"}])).is_err());
        assert!(parse(&json!({"op": "add"})).is_err());
    }
}
