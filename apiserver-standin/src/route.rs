//! Request paths: which kind, namespace, object and subresource a URL names.

use crate::kinds::KindTag;
use crate::query::percent_decode;

/// A resource path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub kind: KindTag,
    /// The namespace in the path (`/namespaces/{ns}/...`), if any.
    pub namespace: Option<String>,
    /// The object's name; `None` for the collection.
    pub name: Option<String>,
    /// Whether the path ends in `/status`.
    pub status: bool,
}

/// What a path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/version`
    Version,
    /// A served resource.
    Resource(Target),
    /// Anything else: 404.
    Unknown,
}

impl Route {
    /// Reads a path such as `/api/v1/nodes/n1/status` or
    /// `/apis/discovery.k8s.io/v1/namespaces/default/endpointslices`.
    pub fn parse(path: &str) -> Self {
        let segments: Vec<String> = path
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .map(percent_decode)
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let (group, rest) = match segments.as_slice() {
            ["version"] => return Self::Version,
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io", rest),
            _ => return Self::Unknown,
        };
        let (namespace, rest) = match rest {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
                (Some((*namespace).to_owned()), rest)
            }
            rest => (None, rest),
        };
        let (plural, name, status) = match rest {
            [plural] => (*plural, None, false),
            [plural, name] => (*plural, Some((*name).to_owned()), false),
            [plural, name, "status"] => (*plural, Some((*name).to_owned()), true),
            _ => return Self::Unknown,
        };
        let Some(kind) = KindTag::from_group_plural(group, plural) else {
            return Self::Unknown;
        };
        let scoped_right = if kind.namespaced() {
            namespace.is_some() || name.is_none()
        } else {
            namespace.is_none()
        };
        if !scoped_right || (status && !kind.has_status()) {
            return Self::Unknown;
        }
        Self::Resource(Target {
            kind,
            namespace,
            name,
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Route, Target};
    use crate::kinds::KindTag;

    #[test]
    fn paths() {
        let target = |kind, namespace: Option<&str>, name: Option<&str>, status| {
            Route::Resource(Target {
                kind,
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
                status,
            })
        };
        assert_eq!(
            Route::parse("/api/v1/nodes"),
            target(KindTag::Nodes, None, None, false)
        );
        assert_eq!(
            Route::parse("/api/v1/nodes/n1/status"),
            target(KindTag::Nodes, None, Some("n1"), true)
        );
        assert_eq!(
            Route::parse("/api/v1/services"),
            target(KindTag::Services, None, None, false)
        );
        assert_eq!(
            Route::parse("/api/v1/namespaces/default/services/dns"),
            target(KindTag::Services, Some("default"), Some("dns"), false)
        );
        assert_eq!(
            Route::parse("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices"),
            target(KindTag::EndpointSlices, Some("kube-system"), None, false)
        );
        assert_eq!(Route::parse("/version"), Route::Version);
        for unknown in [
            "/api/v1/services/dns",
            "/api/v1/namespaces/x/nodes",
            "/api/v1/pods",
            "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/b/status",
            "/api",
            "/apis",
        ] {
            assert_eq!(Route::parse(unknown), Route::Unknown, "{unknown}");
        }
    }
}
