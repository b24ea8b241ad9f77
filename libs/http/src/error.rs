//! [`ApiError`]: every error the gateway answers, rendered as RFC 9457 problem+json.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use taskmesh_events::{ErrorCode, Problem};

/// The media type of every error response.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error answered to a client. A `429` or `503` says when to try again (`Retry-After`,
/// see [`problem_response`]) unless it is [`ApiError::lasting`], and as long as
/// [`ApiError::retry_after`] says when that is set.
#[derive(Debug)]
pub struct ApiError(pub Problem, Retry);

/// When a `429` or `503` says to try again.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// As [`problem_response`] says.
    Soon,
    /// In this many seconds.
    After(u64),
    /// Not until something is changed: no `Retry-After`.
    Never,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self(Problem::new(code, detail), Retry::Soon)
    }
    /// A refusal that asking again will not change (a feature configured off): answered
    /// without `Retry-After`, so clients do not keep asking.
    pub fn lasting(mut self) -> Self {
        self.1 = Retry::Never;
        self
    }
    /// A `429` or `503` that says to try again after `wait` (whole seconds, rounded up, at
    /// least one), as what it waits on said (a forge's rate limit).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.1 = Retry::After(secs.max(1));
        self
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("no such {what}"))
    }
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        Self(p, Retry::Soon)
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
        let mut res = problem_response(&self.0);
        // Only a refusal to try again later says when (`problem_response` sets it).
        if res.headers().contains_key(header::RETRY_AFTER) {
            match self.1 {
                Retry::Soon => {}
                Retry::After(secs) => {
                    res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                Retry::Never => {
                    res.headers_mut().remove(header::RETRY_AFTER);
                }
            }
        }
        res
    }
}

/// The problem as an answer. A refusal to try again later (`429`, `503`) says when: `Retry-After`
/// is a second unless whoever refused sets it (the rate limiter sets its own), so that a client
/// does not ask again at once while the gateway is busy.
pub fn problem_response(p: &Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, serde_json::to_vec(p).unwrap_or_default()).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_to_try_later_say_when_and_others_do_not() {
        for code in [ErrorCode::RateLimited, ErrorCode::Unavailable] {
            let res = ApiError::new(code, "later").into_response();
            assert_eq!(res.headers()[header::RETRY_AFTER], "1", "{code:?}");
            assert_eq!(res.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        }
        for code in [ErrorCode::BadRequest, ErrorCode::NotFound, ErrorCode::Internal] {
            let res = ApiError::new(code, "no").into_response();
            assert!(res.headers().get(header::RETRY_AFTER).is_none(), "{code:?}");
        }
        let off = ApiError::new(ErrorCode::Unavailable, "no secrets key is configured").lasting().into_response();
        assert_eq!(off.status(), 503);
        assert!(off.headers().get(header::RETRY_AFTER).is_none(), "a lasting refusal");
        let wait = |d| ApiError::new(ErrorCode::Unavailable, "rate limited").retry_after(d).into_response();
        assert_eq!(wait(std::time::Duration::from_secs(42)).headers()[header::RETRY_AFTER], "42");
        assert_eq!(wait(std::time::Duration::from_millis(1500)).headers()[header::RETRY_AFTER], "2", "rounded up");
        assert_eq!(wait(std::time::Duration::ZERO).headers()[header::RETRY_AFTER], "1", "a second at least");
        let not_later = ApiError::new(ErrorCode::BadRequest, "no").retry_after(std::time::Duration::from_secs(5));
        assert!(not_later.into_response().headers().get(header::RETRY_AFTER).is_none(), "only a 429 or 503 says it");
    }
}
