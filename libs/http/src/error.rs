//! [`ApiError`]: every error the gateway answers, rendered as RFC 9457 problem+json.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use taskmesh_events::{ErrorCode, Problem};

/// The media type of every error response.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError(pub Problem);

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self(Problem::new(code, detail))
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("no such {what}"))
    }
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        Self(p)
    }
}

impl From<sqlx::Error> for ApiError {
    /// Database details go to the log, never to the client.
    fn from(e: sqlx::Error) -> Self {
        tracing::error!(error = %e, "database error");
        let unavailable = match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
            // The connection was lost (SQLSTATE class 08), or Postgres is shutting down, starting
            // or dropped it (57P01 to 57P05: a restart, a failover, an administrator). Class 08
            // holds 08P01 too, which Postgres also gives a malformed message, but which a pooler
            // such as PgBouncer gives its own disconnections.
            sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        };
        if unavailable {
            Self::new(ErrorCode::Unavailable, "the database is unavailable; retry later")
        } else {
            Self::new(ErrorCode::Internal, "internal error")
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(&self.0)
    }
}

pub fn problem_response(p: &Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, serde_json::to_vec(p).unwrap_or_default()).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    res
}

/// Rewrites responses axum produces on its own (405, and any bodiless 4xx/5xx) as problems,
/// so every error a client sees has the same shape.
pub async fn problems_everywhere(res: Response) -> Response {
    let status = res.status();
    let is_problem =
        res.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if is_problem || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    };
    let (mut parts, _) = res.into_parts();
    let mut fresh = problem_response(&Problem::new(code, status.canonical_reason().unwrap_or("error").to_string()));
    if let Some(allow) = parts.headers.remove(header::ALLOW) {
        fresh.headers_mut().insert(header::ALLOW, allow);
    }
    fresh
}
