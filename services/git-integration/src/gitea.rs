//! Gitea and Forgejo: webhook signatures and delivery headers (push and pull request payloads
//! have GitHub's fields, read by [`crate::github::push`] and [`crate::github::pull_request`]).

use axum::http::HeaderMap;
use taskmesh_events::ErrorCode;
use taskmesh_http::ApiError;

use crate::{Hook, header};

/// Verifies a delivery (`X-Gitea-Signature`, or Forgejo's `X-Forgejo-Signature`: bare hex
/// HMAC-SHA256 of the body) and reads what it asks: a `push` (one run per `X-Gitea-Delivery`
/// or `X-Forgejo-Delivery`), or another event. Gitea's "Redeliver" sends a new delivery id:
/// it starts a new run, as asked.
pub fn read(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<Hook, ApiError> {
    let either = |gitea: &str, forgejo: &str| header(headers, gitea).or_else(|| header(headers, forgejo));
    let signature = either("x-gitea-signature", "x-forgejo-signature").unwrap_or("");
    if !crate::verify_hex_hmac(secret, body, signature) {
        return Err(ApiError::new(ErrorCode::Unauthorized, "X-Gitea-Signature is missing or does not match the body"));
    }
    let delivery = crate::delivery(either("x-gitea-delivery", "x-forgejo-delivery"), "X-Gitea-Delivery")?;
    match either("x-gitea-event", "x-forgejo-event").unwrap_or("") {
        "push" => Ok(Hook::Push { delivery, push: crate::github::push(body, true)? }),
        "pull_request" => Ok(Hook::PullRequest { delivery, pr: crate::github::pull_request(body) }),
        other => Ok(Hook::Other(other.to_string())),
    }
}
