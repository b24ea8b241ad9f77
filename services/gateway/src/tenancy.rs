//! Tenants and API keys. The platform administrator (a key from configuration) creates tenants;
//! each tenant's admins issue and revoke its keys. Keys are shown once, stored as SHA-256 only.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{delete, get};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::command::{CreateApiKey, CreateTenant, RevokeApiKey};
use taskmesh_events::{ErrorCode, Role};
use taskmesh_http::{ApiError, ApiResult, body};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{id}", delete(revoke_key))
        .route("/v1/whoami", get(whoami))
}

/// The caller, as its key says.
#[derive(Debug, Serialize, ToSchema)]
pub struct Whoami {
    pub tenant: String,
    /// The key's id.
    pub key_id: Uuid,
    /// `admin`, `operator` or `viewer`.
    pub role: String,
    /// The key's first characters.
    pub prefix: String,
}

/// Who the caller is (any role): its tenant and its key's id and role, so that a client (the
/// dashboard) offers only what the role may do.
#[utoipa::path(get, operation_id = "whoami", path = "/v1/whoami", tag = "tenancy",
    responses((status = 200, body = Whoami)),
    security(("bearer" = [])))]
pub async fn whoami(caller: Caller) -> Json<Whoami> {
    Json(Whoami {
        tenant: caller.tenant,
        key_id: caller.key_id,
        role: caller.role.as_str().into(),
        prefix: caller.prefix,
    })
}

/// The platform administrator: the bearer of the configured admin key.
pub struct PlatformAdmin;

impl FromRequestParts<AppState> for PlatformAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let unauthorized = || ApiError::new(ErrorCode::Unauthorized, "this needs the platform administrator's key");
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        given.is_some_and(|g| is_admin_key(state, g.trim())).then_some(PlatformAdmin).ok_or_else(unauthorized)
    }
}

/// Whether `given` is the platform administrator's key (none is, when none is configured).
/// Compared as hashes: equal length, and no early exit on the secret itself.
pub(crate) fn is_admin_key(state: &AppState, given: &str) -> bool {
    state.admin_key.as_ref().is_some_and(|expected| {
        hmac_sha256::Hash::hash(given.as_bytes()) == hmac_sha256::Hash::hash(expected.expose_secret().as_bytes())
    })
}

/// A new tenant.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantRequest {
    /// Letters, digits, `_`, `-`; at most 64.
    pub id: String,
    pub name: String,
}

/// A created tenant and its first admin key (shown only here).
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantCreatedResponse {
    pub id: String,
    pub admin_key: String,
    pub admin_key_id: Uuid,
}

/// Create a tenant with a first admin key (platform administrator).
#[utoipa::path(post, operation_id = "create_tenant", path = "/v1/tenants", tag = "tenancy", request_body = TenantRequest,
    responses(
        (status = 201, body = TenantCreatedResponse),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The tenant exists", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create_tenant(
    State(state): State<AppState>,
    _: PlatformAdmin,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<TenantCreatedResponse>)> {
    let (_, bytes) = body::read(&headers, body, false)?;
    let req: TenantRequest = body::json(&bytes)?;
    match state.ingest.create_tenant(&CreateTenant { tenant_id: req.id.clone(), name: req.name }).await {
        Ok(_) => {}
        // Created by an earlier call whose first key was not issued (it failed after the
        // tenant's creation, or its answer was lost): the key is issued now, or the tenant
        // would have none and no way to get one.
        Err(p) if p.code == ErrorCode::Conflict && !has_keys(&state, &req.id).await? => {}
        Err(p) => return Err(p.into()),
    }
    let (key, id, _) = issue(&state, &req.id, Role::Admin, Some("first admin key".into())).await?;
    // The platform administrator's call opens the new tenant's audit log.
    let record = taskmesh_events::AuditRecorded {
        key_id: None,
        actor: "platform-admin".into(),
        method: "POST".into(),
        path: "/v1/tenants".into(),
        route: Some("/v1/tenants".into()),
        status: 201,
        ip: None,
        user_agent: crate::access::user_agent(&headers),
        at: Utc::now(),
    };
    state.audit.record(&req.id, record).await;
    Ok((StatusCode::CREATED, Json(TenantCreatedResponse { id: req.id, admin_key: key, admin_key_id: id })))
}

/// Whether any API key of `tenant` was ever created (the log, not the read side, which may
/// not have it yet).
async fn has_keys(state: &AppState, tenant: &str) -> Result<bool, ApiError> {
    let ns = state.bus.namespace();
    let counts = state.bus.subject_counts(&ns.events_stream(), &ns.api_keys_of(tenant)).await.map_err(|e| {
        tracing::warn!(error = %e, "reading a tenant's keys");
        ApiError::new(ErrorCode::Unavailable, "could not read the tenant's keys; retry")
    })?;
    Ok(!counts.is_empty())
}

/// A tenant.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantView {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// A page of tenants, by id.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantList {
    pub items: Vec<TenantView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// List tenants (platform administrator).
#[utoipa::path(get, operation_id = "list_tenants", path = "/v1/tenants", tag = "tenancy",
    params(crate::PageParams),
    responses((status = 200, body = TenantList), (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"), (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_tenants(
    State(state): State<AppState>,
    _: PlatformAdmin,
    page: crate::Page,
) -> ApiResult<Json<TenantList>> {
    let sql = "SELECT id, name, created_at FROM tenants WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2";
    let (rows, next_cursor) = page.fetch::<String>(&state.pool, sqlx::query(sql), "id").await?;
    let items = rows
        .iter()
        .map(|r| TenantView { id: r.get("id"), name: r.get("name"), created_at: r.get("created_at") })
        .collect();
    Ok(Json(TenantList { items, next_cursor }))
}

/// Issues a key: the key, its id and the sequence of its `ApiKeyCreated`.
async fn issue(state: &AppState, tenant: &str, role: Role, name: Option<String>) -> ApiResult<(String, Uuid, u64)> {
    let (key, hash, prefix) = taskmesh_ingest::generate_api_key();
    let key_id = Uuid::now_v7();
    let created = state
        .ingest
        .create_api_key(&CreateApiKey { tenant: tenant.to_string(), key_id, role, key_hash: hash, prefix, name })
        .await?;
    Ok((key, key_id, created.seq))
}

/// A key to issue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// `admin`, `operator` or `viewer`.
    #[schema(value_type = String, example = "operator")]
    pub role: Role,
    pub name: Option<String>,
}

/// An issued key; `key` is shown only here.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyCreatedResponse {
    pub id: Uuid,
    pub key: String,
    #[schema(value_type = String)]
    pub role: Role,
    /// The sequence of its `ApiKeyCreated` event: the key authenticates once the read side
    /// holds it (send it as `Taskmesh-Min-Seq` with the creator's key to wait for that).
    pub seq: u64,
}

/// Issue an API key for the caller's tenant (admin).
#[utoipa::path(post, operation_id = "create_key", path = "/v1/keys", tag = "tenancy", request_body = KeyRequest,
    responses(
        (status = 201, body = KeyCreatedResponse),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<KeyCreatedResponse>)> {
    caller.require_admin()?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let req: KeyRequest = body::json(&bytes)?;
    if req.name.as_ref().is_some_and(|n| n.len() > 200) {
        return Err(ApiError::new(ErrorCode::BadRequest, "name: at most 200 bytes"));
    }
    let (key, id, seq) = issue(&state, &caller.tenant, req.role, req.name).await?;
    Ok((StatusCode::CREATED, Json(KeyCreatedResponse { id, key, role: req.role, seq })))
}

/// A key, without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: Uuid,
    pub role: String,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// When the key last authenticated a request (to the minute).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A page of the tenant's keys, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub items: Vec<KeyView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

/// List the tenant's keys (admin), oldest first.
#[utoipa::path(get, operation_id = "list_keys", path = "/v1/keys", tag = "tenancy",
    params(crate::PageParams),
    responses((status = 200, body = KeyList), (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"), (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    page: Result<crate::Page, ApiError>,
) -> ApiResult<Json<KeyList>> {
    // (A viewer is told it may not list keys, whatever its query.)
    caller.require_admin()?;
    let page = page?;
    let sql = "SELECT id, role, prefix, name, created_at, revoked_at, last_used_at FROM api_keys
        WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3";
    let (rows, next_cursor) = page.of_tenant::<Uuid>(&state.pool, sql, &caller.tenant, "id").await?;
    let items = rows
        .iter()
        .map(|r| KeyView {
            id: r.get("id"),
            role: r.get("role"),
            prefix: r.get("prefix"),
            name: r.get("name"),
            created_at: r.get("created_at"),
            revoked_at: r.get("revoked_at"),
            last_used_at: r.get("last_used_at"),
        })
        .collect();
    Ok(Json(KeyList { items, next_cursor }))
}

/// Revoke a key of the tenant (admin); it authenticates nothing afterwards.
#[utoipa::path(delete, operation_id = "revoke_key", path = "/v1/keys/{id}", tag = "tenancy", params(("id" = Uuid, Path)),
    responses(
        (status = 204, description = "Revoked", headers(("Taskmesh-Seq" = u64, description = "The write's seq: send it as Taskmesh-Min-Seq to read it"))),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<crate::Written> {
    caller.require_admin()?;
    let key_id: Uuid = id.parse().map_err(|_| ApiError::not_found("key"))?;
    let written = state.ingest.revoke_api_key(&RevokeApiKey { tenant: caller.tenant, key_id }).await?;
    Ok(crate::Written(written.seq))
}
