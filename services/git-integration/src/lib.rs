//! Git integration: forges' webhooks in. A push to a connected repository starts a run of the
//! connection's workflow, once per delivery.
//!
//! `POST /hooks/github/{connection}` verifies `X-Hub-Signature-256` (HMAC-SHA256 of the exact
//! body with the connection's secret) before anything else; a bad or missing signature is a 401
//! and nothing is appended. The run is submitted with the idempotency key
//! `github:{connection}:{X-GitHub-Delivery}`, so a redelivered webhook starts no second run.
//!
//! # Layout
//! - [`github`]: signature verification and the push payload.
//! - this file: the router, [`build`] and branch filters.

pub mod github;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Serialize;
use sqlx::{PgPool, Row};
use taskmesh_bus::Bus;
use taskmesh_config::HttpSettings;
use taskmesh_events::command::SubmitRun;
use taskmesh_events::{ErrorCode, Forge, Trigger};
use taskmesh_http::{ApiError, ApiResult, Server};
use taskmesh_ingest::IngestClient;
use taskmesh_secrets::Keyring;
use uuid::Uuid;

/// Largest webhook body accepted (GitHub caps payloads at 25 MB; pushes are far smaller).
pub const MAX_WEBHOOK_BYTES: usize = 5 * 1024 * 1024;

#[derive(Clone)]
struct GitState {
    pool: PgPool,
    ingest: IngestClient,
    /// Opens connections' sealed webhook secrets.
    keyring: Option<Arc<Keyring>>,
}

/// What a webhook delivery led to.
#[derive(Debug, Serialize)]
pub struct HookResponse {
    /// `started` or `ignored`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl HookResponse {
    fn ignored(reason: impl Into<String>) -> (StatusCode, Json<Self>) {
        (
            StatusCode::ACCEPTED,
            Json(Self { outcome: "ignored", run_id: None, duplicate: None, reason: Some(reason.into()) }),
        )
    }
}

/// The router, separate from serving so tests can call it directly.
pub fn router(pool: PgPool, bus: Bus, body_limit: usize, keyring: Option<Arc<Keyring>>) -> axum::Router {
    let state = GitState { pool, ingest: IngestClient::new(bus), keyring };
    let router = axum::Router::new()
        .route("/hooks/github/{connection}", post(github_hook))
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .layer(DefaultBodyLimit::max(body_limit.max(MAX_WEBHOOK_BYTES)))
        .with_state(state);
    taskmesh_http::finish(router)
}

/// Binds the service (port 0 picks a free port).
pub async fn build(
    settings: &HttpSettings,
    pool: PgPool,
    bus: Bus,
    keyring: Option<Arc<Keyring>>,
) -> anyhow::Result<Server> {
    Server::bind(settings.listen, router(pool, bus, settings.body_limit_bytes, keyring)).await
}

async fn ready(State(state): State<GitState>) -> ApiResult<Json<serde_json::Value>> {
    sqlx::query("SELECT 1")
        .execute(&state.pool)
        .await
        .map_err(|_| ApiError::new(ErrorCode::Unavailable, "postgres does not answer"))?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

struct Connection {
    tenant: String,
    repository: String,
    /// The sealed webhook secret, as stored.
    secret: String,
    branches: Vec<String>,
    workflow: serde_json::Value,
}

async fn connection(pool: &PgPool, id: Uuid) -> ApiResult<Connection> {
    let row = sqlx::query("SELECT tenant_id, repository, secret, branches, workflow FROM repo_connections WHERE id = $1 AND forge = 'github'")
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| ApiError::not_found("repository connection"))?;
    Ok(Connection {
        tenant: row.get("tenant_id"),
        repository: row.get("repository"),
        secret: row.get("secret"),
        branches: row.get("branches"),
        workflow: row.get::<sqlx::types::Json<serde_json::Value>, _>("workflow").0,
    })
}

#[tracing::instrument(skip_all, fields(connection = %connection_id))]
async fn github_hook(
    State(state): State<GitState>,
    Path(connection_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<HookResponse>)> {
    let id: Uuid = connection_id.parse().map_err(|_| ApiError::not_found("repository connection"))?;
    let (_, body) = taskmesh_http::body::read(&headers, body, false)?;
    let conn = connection(&state.pool, id).await?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signature = header("x-hub-signature-256").unwrap_or("");
    let secret = open_secret(&state, &conn)?;
    if !github::verify_signature(&secret, &body, signature) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "X-Hub-Signature-256 is missing or does not match the body",
        ));
    }
    let delivery = header("x-github-delivery")
        .filter(|d| !d.is_empty() && d.len() <= 128)
        .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, "X-GitHub-Delivery is missing"))?;
    match header("x-github-event").unwrap_or("") {
        "ping" => {
            return Ok((
                StatusCode::OK,
                Json(HookResponse { outcome: "ignored", run_id: None, duplicate: None, reason: Some("pong".into()) }),
            ));
        }
        "push" => {}
        other => return Ok(HookResponse::ignored(format!("event '{other}' starts no run"))),
    }
    let push: github::Push = taskmesh_http::body::json(&body)?;
    if !push.repository.full_name.eq_ignore_ascii_case(&conn.repository) {
        return Ok(HookResponse::ignored(format!(
            "push to {}, but this connection is for {}",
            push.repository.full_name, conn.repository
        )));
    }
    if push.deleted {
        return Ok(HookResponse::ignored("branch deleted"));
    }
    let Some(branch) = push.r#ref.strip_prefix("refs/heads/") else {
        return Ok(HookResponse::ignored(format!("{} is not a branch", push.r#ref)));
    };
    if !conn.branches.is_empty() && !conn.branches.iter().any(|p| glob_match(p, branch)) {
        return Ok(HookResponse::ignored(format!("branch {branch} matches none of the connection's branches")));
    }
    if push.head_commit.as_ref().is_some_and(|c| c.message.contains("[skip ci]") || c.message.contains("[ci skip]")) {
        return Ok(HookResponse::ignored("the head commit asks to skip CI"));
    }
    let inputs = BTreeMap::from([
        ("repository".to_string(), serde_json::json!(push.repository.full_name)),
        ("branch".to_string(), serde_json::json!(branch)),
        ("commit".to_string(), serde_json::json!(push.after)),
    ]);
    let accepted = state
        .ingest
        .submit_run(&SubmitRun {
            tenant: conn.tenant,
            workflow: conn.workflow,
            inputs,
            trigger: Trigger::Webhook {
                forge: Forge::Github,
                connection_id: id,
                delivery: delivery.to_string(),
                repository: push.repository.full_name.clone(),
                branch: Some(branch.to_string()),
                commit: Some(push.after.clone()),
            },
            idempotency_key: Some(format!("github:{id}:{delivery}")),
            priority: None,
            labels: Default::default(),
            traceparent: taskmesh_telemetry::current_traceparent(),
            not_before: None,
        })
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(HookResponse {
            outcome: "started",
            run_id: Some(accepted.run_id),
            duplicate: Some(accepted.duplicate),
            reason: None,
        }),
    ))
}

/// Opens a connection's sealed webhook secret.
fn open_secret(state: &GitState, conn: &Connection) -> ApiResult<Vec<u8>> {
    let keyring =
        state.keyring.as_ref().ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "no secrets key is configured"))?;
    let sealed: taskmesh_secrets::Sealed = serde_json::from_str(&conn.secret).map_err(|e| {
        tracing::error!(error = %e, "a stored connection secret is not sealed");
        ApiError::new(ErrorCode::Internal, "internal error")
    })?;
    keyring.open(&taskmesh_secrets::repo_secret_aad(&conn.tenant), &sealed).map_err(|e| {
        tracing::error!(error = %e, "cannot open a connection's secret");
        ApiError::new(ErrorCode::Internal, "internal error")
    })
}

/// Matches a branch against a pattern where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn branch_patterns() {
        assert!(glob_match("main", "main"));
        assert!(!glob_match("main", "main2"));
        assert!(glob_match("release/*", "release/1.2"));
        assert!(!glob_match("release/*", "feature/x"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxc"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
