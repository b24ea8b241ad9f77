//! The error code every service shares, and its rendering as an RFC 9457 problem document.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Stable error codes. Each maps to one HTTP status and one problem `type` URI, documented in
/// `docs/api.md`; clients may rely on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    BadRequest,
    InvalidWorkflow,
    InvalidInput,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    /// Too many requests: the tenant's or the key's rate limit; see `Retry-After`.
    RateLimited,
    /// A tenant quota (active runs, stored workflows, schedules, webhook endpoints, steps per
    /// run) would be exceeded.
    QuotaExceeded,
    /// A conditional change (`If-Match`) whose resource is at another version.
    PreconditionFailed,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::InvalidWorkflow => 422,
            ErrorCode::InvalidInput => 422,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::RateLimited => 429,
            ErrorCode::QuotaExceeded => 403,
            ErrorCode::PreconditionFailed => 412,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    pub fn slug(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::InvalidWorkflow => "invalid-workflow",
            ErrorCode::InvalidInput => "invalid-input",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not-found",
            ErrorCode::MethodNotAllowed => "method-not-allowed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload-too-large",
            ErrorCode::UnsupportedMediaType => "unsupported-media-type",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::QuotaExceeded => "quota-exceeded",
            ErrorCode::PreconditionFailed => "precondition-failed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The problem `type`: a stable URI per code.
    pub fn type_uri(self) -> String {
        format!("https://taskmesh.dev/problems/{}", self.slug())
    }

    pub fn title(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "The request is malformed",
            ErrorCode::InvalidWorkflow => "The workflow definition is invalid",
            ErrorCode::InvalidInput => "The run's inputs do not fit the workflow",
            ErrorCode::Unauthorized => "Missing or invalid credentials",
            ErrorCode::Forbidden => "The key's role does not allow this",
            ErrorCode::NotFound => "No such resource",
            ErrorCode::MethodNotAllowed => "Method not allowed on this resource",
            ErrorCode::Conflict => "The request conflicts with the current state",
            ErrorCode::PayloadTooLarge => "The request body is too large",
            ErrorCode::UnsupportedMediaType => "Unsupported content type",
            ErrorCode::RateLimited => "Too many requests",
            ErrorCode::QuotaExceeded => "A tenant quota would be exceeded",
            ErrorCode::PreconditionFailed => "The resource is not at the version the request is conditional on",
            ErrorCode::Unavailable => "A service Taskmesh depends on is unavailable",
            ErrorCode::Internal => "Internal error",
        }
    }
}

/// One problem with one field of the input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct FieldError {
    /// Where, as a path: `steps[2].needs[0]`.
    pub field: String,
    pub message: String,
}

/// An RFC 9457 problem document, plus the stable `code` and per-field `errors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: ErrorCode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl Problem {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            type_uri: code.type_uri(),
            title: code.title().to_string(),
            status: code.status(),
            detail: detail.into(),
            code,
            errors: Vec::new(),
        }
    }

    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.slug(), self.detail)
    }
}

impl std::error::Error for Problem {}
