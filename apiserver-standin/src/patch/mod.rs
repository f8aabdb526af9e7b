//! PATCH bodies: JSON merge patch (RFC 7386), strategic merge patch (Kubernetes') and JSON
//! patch (RFC 6902), chosen by the request's Content-Type.

mod json_patch;
mod merge;
mod strategic;

use serde_json::Value;

use crate::status::ApiError;

/// The format of a PATCH body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`
    Merge,
    /// `application/strategic-merge-patch+json`
    Strategic,
    /// `application/json-patch+json`
    Json,
}

impl PatchKind {
    /// The patch format a Content-Type names (parameters such as `charset` ignored); 415
    /// UnsupportedMediaType for anything else.
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, ApiError> {
        let media_type = content_type
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        match media_type.to_ascii_lowercase().as_str() {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/json-patch+json" => Ok(Self::Json),
            _ => Err(ApiError::UnsupportedMediaType),
        }
    }
}

/// Applies a PATCH `body` of `kind` to `document`. A body that is not JSON, or not the shape its
/// format needs, is 400 BadRequest; a JSON patch that cannot be applied (a failed `test`, a
/// missing path) is 422 Invalid.
pub fn apply(kind: PatchKind, document: &mut Value, body: &[u8]) -> Result<(), ApiError> {
    let patch: Value = serde_json::from_slice(body)
        .map_err(|err| ApiError::BadRequest(format!("error decoding patch: {err}")))?;
    match kind {
        PatchKind::Merge => {
            require_object(&patch)?;
            merge::merge(document, &patch);
            Ok(())
        }
        PatchKind::Strategic => {
            require_object(&patch)?;
            strategic::merge(document, &patch)
        }
        PatchKind::Json => {
            let operations =
                json_patch::parse(&patch).map_err(|err| ApiError::BadRequest(err.to_string()))?;
            json_patch::apply(document, &operations)
                .map_err(|err| ApiError::Invalid(err.to_string()))
        }
    }
}

fn require_object(patch: &Value) -> Result<(), ApiError> {
    if patch.is_object() {
        Ok(())
    } else {
        Err(ApiError::BadRequest(
            "error decoding patch: a merge patch must be a JSON object".to_owned(),
        ))
    }
}
