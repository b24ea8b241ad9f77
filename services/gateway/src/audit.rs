//! `GET /v1/audit`: the tenant's audit log, newest first. Every mutating call is recorded by
//! [`crate::access`].

use axum::Json;
use axum::extract::{Query, State};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::ErrorCode;
use taskmesh_http::{ApiError, ApiResult};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/audit", get(list))
}

/// Filters and paging.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Only calls made with this key.
    pub key_id: Option<Uuid>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(minimum = 0)]
    pub cursor: Option<i64>,
}

/// One recorded call.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    pub id: Uuid,
    /// The key that made the call; null for the platform administrator.
    pub key_id: Option<Uuid>,
    /// `key:<prefix>` or `platform-admin`.
    pub actor: String,
    pub method: String,
    pub path: String,
    /// The route's template, e.g. `/v1/runs/{id}/cancel`.
    pub route: Option<String>,
    /// The status the call was answered with.
    pub status: i32,
    /// The peer address it came from.
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub at: DateTime<Utc>,
}

/// A page of the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<i64>,
}

/// List the tenant's audit log, newest first (admin): who (key), what (method, path, status),
/// when, and from where, for every mutating call, refused ones included.
#[utoipa::path(get, operation_id = "list_audit", path = "/v1/audit", tag = "tenancy", params(AuditParams),
    responses(
        (status = 200, body = AuditPage),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 429, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AuditPage>> {
    caller.require_admin()?;
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let limit = crate::page_limit(params.limit)?;
    let mut rows = sqlx::query(
        "SELECT seq, id, key_id, actor, method, path, route, status, ip, user_agent, at FROM audit_log
         WHERE tenant_id = $1 AND ($2::uuid IS NULL OR key_id = $2) AND ($3::bigint IS NULL OR seq < $3)
         ORDER BY seq DESC LIMIT $4",
    )
    .bind(&caller.tenant)
    .bind(params.key_id)
    .bind(params.cursor)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = crate::cut_page(&mut rows, limit, |r| r.get::<i64, _>("seq"));
    let items: Vec<AuditEntry> = rows
        .iter()
        .map(|r| AuditEntry {
            id: r.get("id"),
            key_id: r.get("key_id"),
            actor: r.get("actor"),
            method: r.get("method"),
            path: r.get("path"),
            route: r.get("route"),
            status: r.get("status"),
            ip: r.get("ip"),
            user_agent: r.get("user_agent"),
            at: r.get("at"),
        })
        .collect();
    Ok(Json(AuditPage { items, next_cursor }))
}
