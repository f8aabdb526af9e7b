//! The query parameters of a request (`watch`, `resourceVersion`, selectors, bookmarks,
//! `timeoutSeconds`), percent-decoded. `limit` and `continue` are read past: lists are never
//! paginated.

use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;

/// Decodes `%XX` escapes and `+` (a space in a query string).
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = bytes
            .get(index + 1..index + 3)
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match (bytes[index], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                index += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                index += 1;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query parameters the stand-in understands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub watch: bool,
    /// `resourceVersion`, when given and not empty.
    pub resource_version: Option<u64>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub allow_watch_bookmarks: bool,
    pub timeout_seconds: Option<u64>,
}

fn truthy(value: &str) -> bool {
    matches!(value, "true" | "1" | "True")
}

impl Query {
    /// Parses a query string (without the `?`). Malformed values are 400 BadRequest.
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut parsed = Self::default();
        for pair in query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match percent_decode(key).as_str() {
                "watch" => parsed.watch = truthy(&value),
                "allowWatchBookmarks" => parsed.allow_watch_bookmarks = truthy(&value),
                "labelSelector" => parsed.labels = LabelSelector::parse(&value)?,
                "fieldSelector" => parsed.fields = FieldSelector::parse(&value)?,
                "resourceVersion" if !value.is_empty() => {
                    let version = value.parse().map_err(|_| ApiError::BadRequest(format!("resourceVersion: Invalid value: {value:?}: must be an unsigned integer")))?;
                    parsed.resource_version = Some(version);
                }
                "timeoutSeconds" => {
                    let seconds = value.parse().map_err(|_| {
                        ApiError::BadRequest(format!("timeoutSeconds: Invalid value: {value:?}"))
                    })?;
                    parsed.timeout_seconds = Some(seconds);
                }
                _ => {}
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::{percent_decode, Query};

    #[test]
    fn decodes_kube_proxy_selector() {
        assert_eq!(percent_decode("%21a%2Cb+c"), "!a,b c");
        let query = Query::parse(Some(
            "watch=1&resourceVersion=12&labelSelector=%21x&timeoutSeconds=5&limit=500",
        ))
        .unwrap();
        assert!(query.watch);
        assert_eq!(query.resource_version, Some(12));
        assert_eq!(query.timeout_seconds, Some(5));
        assert!(Query::parse(Some("resourceVersion=abc")).is_err());
    }
}
