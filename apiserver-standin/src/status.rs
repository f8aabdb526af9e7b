//! Errors as the apiserver answers them: a `Status` object (kind Status, apiVersion v1, status
//! Failure, message, reason, code, details) with the same HTTP code.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, StatusDetails};

use crate::kinds::KindTag;

/// A request the apiserver refuses, with the message kube-apiserver gives for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{kind} {name_part}is forbidden: User \"{user}\" cannot {verb} resource \"{kind}\" in API group \"{group}\"", name_part = quoted(name), group = kind.group())]
    Forbidden {
        kind: KindTag,
        name: String,
        user: &'static str,
        verb: &'static str,
    },
    #[error("{kind} \"{name}\" not found")]
    NotFound { kind: KindTag, name: String },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists { kind: KindTag, name: String },
    #[error("Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; please apply your changes to the latest version and try again")]
    Conflict { kind: KindTag, name: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json")]
    UnsupportedMediaType,
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("too old resource version: {requested} ({oldest})")]
    Expired { requested: u64, oldest: u64 },
    /// An error the test asked for (`Handle::fail_next`).
    #[error("injected failure (stand-in fail_next)")]
    Injected { code: u16 },
}

fn quoted(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!("\"{name}\" ")
    }
}

impl ApiError {
    /// The HTTP status code (and the Status's `code`).
    pub fn code(&self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::Forbidden { .. } => 403,
            Self::NotFound { .. } | Self::NoRoute => 404,
            Self::AlreadyExists { .. } | Self::Conflict { .. } => 409,
            Self::BadRequest(_) => 400,
            Self::Invalid(_) => 422,
            Self::UnsupportedMediaType => 415,
            Self::MethodNotAllowed => 405,
            Self::Expired { .. } => 410,
            Self::Injected { code } => *code,
        }
    }

    /// The Status's `reason`, as metav1.StatusReason spells it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden { .. } => "Forbidden",
            Self::NotFound { .. } | Self::NoRoute => "NotFound",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict { .. } => "Conflict",
            Self::BadRequest(_) => "BadRequest",
            Self::Invalid(_) => "Invalid",
            Self::UnsupportedMediaType => "UnsupportedMediaType",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::Expired { .. } => "Expired",
            Self::Injected { code: 503 } => "ServiceUnavailable",
            Self::Injected { code: 504 } => "Timeout",
            Self::Injected { .. } => "InternalError",
        }
    }

    fn details(&self) -> Option<StatusDetails> {
        let (kind, name) = match self {
            Self::Forbidden { kind, name, .. }
            | Self::NotFound { kind, name }
            | Self::AlreadyExists { kind, name }
            | Self::Conflict { kind, name } => (kind, name),
            Self::NoRoute => return Some(StatusDetails::default()),
            _ => return None,
        };
        Some(StatusDetails {
            group: Some(kind.group().to_owned()).filter(|group| !group.is_empty()),
            kind: Some(kind.plural().to_owned()),
            name: Some(name.clone()).filter(|name| !name.is_empty()),
            ..StatusDetails::default()
        })
    }

    /// The Status object the apiserver sends for this error.
    pub fn to_status(&self) -> Status {
        Status {
            code: Some(i32::from(self.code())),
            details: self.details(),
            message: Some(self.to_string()),
            reason: Some(self.reason().to_owned()),
            status: Some("Failure".to_owned()),
            ..Status::default()
        }
    }
}
