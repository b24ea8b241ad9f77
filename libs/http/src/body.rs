//! Request bodies: JSON, or YAML where a workflow is sent, with every rejection a problem.

use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use taskmesh_events::ErrorCode;

use crate::error::ApiError;

/// The body's format, from `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

/// A body that could not be read: too large (413), or otherwise malformed (400).
pub fn rejection(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, "the request body is over the size limit")
    } else {
        ApiError::new(ErrorCode::BadRequest, r.body_text())
    }
}

/// Reads the body and its format; `yaml_ok` says whether YAML is accepted on this route.
pub fn read(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    yaml_ok: bool,
) -> Result<(Format, Bytes), ApiError> {
    let body = body.map_err(rejection)?;
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let format = match mime.as_str() {
        "application/json" => Format::Json,
        m if m.starts_with("application/") && m.ends_with("+json") => Format::Json,
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" if yaml_ok => Format::Yaml,
        _ => {
            let accepted = if yaml_ok { "application/json or application/yaml" } else { "application/json" };
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType, format!("send {accepted}, not '{ct}'")));
        }
    };
    Ok((format, body))
}

/// An optional JSON body: an empty one is `T::default()`; any other is checked by [`read`]
/// (JSON only) and parsed by [`json`].
pub fn json_or_default<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    match body {
        Ok(b) if b.is_empty() => Ok(T::default()),
        other => json(&read(headers, other, false)?.1),
    }
}

/// Parses a JSON body into `T`, naming what is wrong when it does not fit.
pub fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let detail = if inner.is_syntax() || inner.is_eof() || path == "." {
            format!("malformed JSON: {inner}")
        } else {
            format!("{path}: {inner}")
        };
        ApiError::new(ErrorCode::BadRequest, detail)
    })
}
