//! Label selectors (`k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`; comma is
//! AND) and field selectors (`metadata.name` and `metadata.namespace` with `=`, `==`, `!=`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::status::ApiError;

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelRequirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelRequirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::In(key, values) => labels.get(key).is_some_and(|value| values.contains(value)),
            Self::NotIn(key, values) => labels.get(key).is_none_or(|value| !values.contains(value)),
            Self::Exists(key) => labels.contains_key(key),
            Self::NotExists(key) => !labels.contains_key(key),
        }
    }
}

/// The comma-separated parts of a selector, commas inside parentheses kept.
fn split_top_level(selector: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (index, byte) in selector.bytes().enumerate() {
        match byte {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b',' if depth == 0 => {
                parts.push(&selector[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect()
}

fn bad(selector: &str, why: &str) -> ApiError {
    ApiError::BadRequest(format!("unable to parse requirement: {selector:?}: {why}"))
}

fn value_set(text: &str, whole: &str) -> Result<Vec<String>, ApiError> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| bad(whole, "expected a parenthesised set of values"))?;
    Ok(inner
        .split(',')
        .map(|value| value.trim().to_owned())
        .collect())
}

fn parse_requirement(part: &str) -> Result<LabelRequirement, ApiError> {
    let valid_key = |key: &str| !key.is_empty() && !key.contains(char::is_whitespace);
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(LabelRequirement::NotExists(key.to_owned()))
        } else {
            Err(bad(part, "bad key"))
        };
    }
    let requirement = if let Some((key, value)) = part.split_once("!=") {
        LabelRequirement::NotIn(key.trim().to_owned(), vec![value.trim().to_owned()])
    } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        LabelRequirement::In(key.trim().to_owned(), vec![value.trim().to_owned()])
    } else if let Some((key, values)) = part.split_once(" notin ") {
        LabelRequirement::NotIn(key.trim().to_owned(), value_set(values, part)?)
    } else if let Some((key, values)) = part.split_once(" in ") {
        LabelRequirement::In(key.trim().to_owned(), value_set(values, part)?)
    } else if valid_key(part) {
        LabelRequirement::Exists(part.to_owned())
    } else {
        return Err(bad(
            part,
            "expected a key, key=value, key!=value, key in (...) or !key",
        ));
    };
    match &requirement {
        LabelRequirement::In(key, _) | LabelRequirement::NotIn(key, _) if !valid_key(key) => {
            Err(bad(part, "bad key"))
        }
        _ => Ok(requirement),
    }
}

/// A parsed `labelSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelRequirement>);

impl LabelSelector {
    /// Parses a selector; the empty selector selects everything.
    pub fn parse(selector: &str) -> Result<Self, ApiError> {
        split_top_level(selector)
            .into_iter()
            .map(parse_requirement)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether an object with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|requirement| requirement.matches(labels))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldRequirement {
    field: Field,
    equal: bool,
    value: String,
}

/// A parsed `fieldSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<FieldRequirement>);

impl FieldSelector {
    /// Parses a selector over `metadata.name` and `metadata.namespace`; other fields are 400.
    pub fn parse(selector: &str) -> Result<Self, ApiError> {
        let parse_one = |part: &str| {
            let (field, equal, value) = if let Some((field, value)) = part.split_once("!=") {
                (field, false, value)
            } else if let Some((field, value)) =
                part.split_once("==").or_else(|| part.split_once('='))
            {
                (field, true, value)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                )));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "field label not supported: {other}"
                    )))
                }
            };
            Ok(FieldRequirement {
                field,
                equal,
                value: value.trim().to_owned(),
            })
        };
        split_top_level(selector)
            .into_iter()
            .map(parse_one)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether an object with `meta` is selected.
    pub fn matches(&self, meta: &ObjectMeta) -> bool {
        self.0.iter().all(|requirement| {
            let actual = match requirement.field {
                Field::Name => meta.name.as_deref(),
                Field::Namespace => meta.namespace.as_deref(),
            };
            (actual.unwrap_or("") == requirement.value) == requirement.equal
        })
    }
}

/// What a LIST or WATCH selects: a namespace (from the path), labels, fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub namespace: Option<String>,
    /// The object's name, for a watch on a named path.
    pub name: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selection {
    /// Whether an object with `meta` is selected.
    pub fn matches(&self, meta: &ObjectMeta) -> bool {
        let empty = BTreeMap::new();
        self.namespace
            .as_ref()
            .is_none_or(|namespace| meta.namespace.as_ref() == Some(namespace))
            && self
                .name
                .as_ref()
                .is_none_or(|name| meta.name.as_ref() == Some(name))
            && self.labels.matches(meta.labels.as_ref().unwrap_or(&empty))
            && self.fields.matches(meta)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::LabelSelector;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn label_selector_forms() {
        let proxy = LabelSelector::parse(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        )
        .unwrap();
        assert!(proxy.matches(&labels(&[("app", "x")])));
        assert!(!proxy.matches(&labels(&[("service.kubernetes.io/headless", "")])));
        let set = LabelSelector::parse("tier in (web, db),env!=prod,app").unwrap();
        assert!(set.matches(&labels(&[("tier", "db"), ("app", "")])));
        assert!(!set.matches(&labels(&[("tier", "db"), ("app", ""), ("env", "prod")])));
        assert!(!set.matches(&labels(&[("tier", "cache"), ("app", "")])));
        assert!(LabelSelector::parse("a==1")
            .unwrap()
            .matches(&labels(&[("a", "1")])));
        assert!(LabelSelector::parse("tier notin (a)")
            .unwrap()
            .matches(&labels(&[])));
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("").unwrap().matches(&labels(&[])));
    }
}
