//! `/v1/secrets`: write-only secrets. A value is sealed (AES-256-GCM) here, as it arrives, so it
//! never crosses the bus or reaches Postgres in clear; only executors open it, for the steps
//! that declare it.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, put};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::ErrorCode;
use taskmesh_events::command::{DeleteSecret, SetSecret};
use taskmesh_http::{ApiError, ApiResult, body};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Caller;

/// Largest secret value.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/secrets", get(list)).route("/v1/secrets/{name}", put(set).delete(delete))
}

/// A secret's value (write-only: it is never returned).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretValue {
    pub value: String,
}

/// A secret's name and when it was last set; never its value.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretInfo {
    pub name: String,
    pub updated_at: DateTime<Utc>,
}

/// The tenant's secrets.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretList {
    pub items: Vec<SecretInfo>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Set a secret (admin). Steps get it by listing its name in `secrets:`; its value is masked as
/// `***` in their output, outputs and logs.
#[utoipa::path(put, operation_id = "set_secret", path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "A-Z, 0-9 and '_', not starting with a digit")),
    request_body = SecretValue,
    responses(
        (status = 204, description = "Set", headers(("Taskmesh-Seq" = u64, description = "The write's seq: send it as Taskmesh-Min-Seq to read it"))),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 413, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 503, description = "No secrets key is configured", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn set(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<crate::Written> {
    caller.require_admin()?;
    if !taskmesh_events::workflow::is_secret_name(&name) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "secret names are A-Z, 0-9 and '_', not starting with a digit, at most 64",
        ));
    }
    let keyring = state.keyring.as_ref().ok_or_else(|| {
        ApiError::new(ErrorCode::Unavailable, "secrets are off: no secrets key is configured (TASKMESH_SECRETS__KEY)")
            .lasting()
    })?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let value: SecretValue = body::json(&bytes)?;
    if value.value.len() > MAX_SECRET_BYTES {
        return Err(ApiError::new(ErrorCode::PayloadTooLarge, "a secret holds at most 64 KiB"));
    }
    let sealed = keyring.seal(&taskmesh_secrets::step_secret_aad(&caller.tenant, &name), value.value.as_bytes());
    let written = state.ingest.set_secret(&SetSecret { tenant: caller.tenant, name, sealed }).await?;
    Ok(crate::Written(written.seq))
}

/// List the tenant's secrets: names and times, never values.
#[utoipa::path(get, operation_id = "list_secrets", path = "/v1/secrets", tag = "secrets",
    params(crate::PageParams),
    responses((status = 200, body = SecretList), (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"), (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller, page: crate::Page) -> ApiResult<Json<SecretList>> {
    let sql = "SELECT name, updated_at FROM secrets WHERE tenant_id = $1 AND ($2::text IS NULL OR name > $2)
        ORDER BY name LIMIT $3";
    let (rows, next_cursor) = page.of_tenant::<String>(&state.pool, sql, &caller.tenant, "name").await?;
    let items = rows.iter().map(|r| SecretInfo { name: r.get("name"), updated_at: r.get("updated_at") }).collect();
    Ok(Json(SecretList { items, next_cursor }))
}

/// Delete a secret (admin).
#[utoipa::path(delete, operation_id = "delete_secret", path = "/v1/secrets/{name}", tag = "secrets", params(("name" = String, Path)),
    responses(
        (status = 204, description = "Deleted", headers(("Taskmesh-Seq" = u64, description = "The write's seq: send it as Taskmesh-Min-Seq to read it"))),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<crate::Written> {
    caller.require_admin()?;
    let written = state.ingest.delete_secret(&DeleteSecret { tenant: caller.tenant, name }).await?;
    Ok(crate::Written(written.seq))
}
