//! `/v1/workflows`: stored, versioned workflow definitions. Runs name them as `name` (latest)
//! or `name@version`.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::ErrorCode;
use taskmesh_events::command::StoreWorkflow;
use taskmesh_http::body::{self, Format};
use taskmesh_http::{ApiError, ApiResult};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/workflows", get(list))
        .route("/v1/workflows/{name}", put(store).get(get_one))
        .route("/v1/workflows/{name}/versions", get(versions))
}

/// A stored workflow version.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowVersion {
    pub name: String,
    pub version: i32,
    /// The definition, as stored.
    #[schema(value_type = Object)]
    pub definition: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// The answer to storing a version.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowStoredResponse {
    pub name: String,
    pub version: u32,
    pub seq: u64,
}

/// Store a new version of a workflow (YAML or JSON; its `name` must match the URL). Versions are
/// immutable and count up from 1.
#[utoipa::path(put, operation_id = "store_workflow", path = "/v1/workflows/{name}", tag = "workflows",
    params(("name" = String, Path, description = "Workflow name: letters, digits, '_' or '-'")),
    request_body(content((Object = "application/json"), (String = "application/yaml"))),
    responses(
        (status = 201, body = WorkflowStoredResponse, headers(("Location" = String, description = "The stored version's URL: `/v1/workflows/{name}?version={version}`"))),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid definition", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn store(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<axum::response::Response> {
    caller.require_operator()?;
    let (format, bytes) = body::read(&headers, body, true)?;
    let workflow: serde_json::Value = match format {
        Format::Json => body::json(&bytes)?,
        Format::Yaml => {
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "the body is not UTF-8"))?;
            taskmesh_events::workflow::yaml_to_json(text)
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("malformed YAML: {e}")))?
        }
    };
    let stored = state.ingest.store_workflow(&StoreWorkflow { tenant: caller.tenant, name, workflow }).await?;
    let path = format!("/v1/workflows/{}?version={}", stored.name, stored.version);
    let body = Json(WorkflowStoredResponse { name: stored.name, version: stored.version, seq: stored.seq });
    Ok(crate::located(&state, StatusCode::CREATED, body, &path))
}

/// Which version to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct VersionParam {
    /// A version number; the latest if absent.
    pub version: Option<i32>,
}

/// Read a stored workflow: its latest version, or `?version=N`.
#[utoipa::path(get, operation_id = "get_workflow", path = "/v1/workflows/{name}", tag = "workflows",
    params(("name" = String, Path), VersionParam),
    responses(
        (status = 200, body = WorkflowVersion),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    params: Result<Query<VersionParam>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<WorkflowVersion>> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let row = sqlx::query(
        "SELECT name, version, definition, created_at FROM workflows
         WHERE tenant_id = $1 AND name = $2 AND ($3::int IS NULL OR version = $3)
         ORDER BY version DESC LIMIT 1",
    )
    .bind(&caller.tenant)
    .bind(&name)
    .bind(params.version)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| ApiError::not_found("workflow"))?;
    Ok(Json(to_version(&row)))
}

fn to_version(row: &sqlx::postgres::PgRow) -> WorkflowVersion {
    WorkflowVersion {
        name: row.get("name"),
        version: row.get("version"),
        definition: row.get::<sqlx::types::Json<serde_json::Value>, _>("definition").0,
        created_at: row.get("created_at"),
    }
}

/// A page of the tenant's stored workflows, each at its latest version, by name.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowList {
    pub items: Vec<WorkflowVersion>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// List stored workflows (latest versions), by name.
#[utoipa::path(get, operation_id = "list_workflows", path = "/v1/workflows", tag = "workflows",
    params(crate::PageParams),
    responses(
        (status = 200, body = WorkflowList),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller, page: crate::Page) -> ApiResult<Json<WorkflowList>> {
    let sql = "SELECT DISTINCT ON (name) name, version, definition, created_at FROM workflows
        WHERE tenant_id = $1 AND ($2::text IS NULL OR name > $2) ORDER BY name, version DESC LIMIT $3";
    let (rows, next_cursor) = page.of_tenant::<String>(&state.pool, sql, &caller.tenant, "name").await?;
    Ok(Json(WorkflowList { items: rows.iter().map(to_version).collect(), next_cursor }))
}

/// A page of one workflow's stored versions, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowVersionList {
    pub items: Vec<WorkflowVersion>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<i32>,
}

/// Every stored version of one workflow, newest first.
#[utoipa::path(get, operation_id = "list_workflow_versions", path = "/v1/workflows/{name}/versions", tag = "workflows",
    params(("name" = String, Path), crate::PageParams),
    responses(
        (status = 200, body = WorkflowVersionList),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn versions(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    page: crate::Page,
) -> ApiResult<Json<WorkflowVersionList>> {
    let sql = "SELECT name, version, definition, created_at FROM workflows
               WHERE tenant_id = $1 AND name = $2 AND ($3::int IS NULL OR version < $3) ORDER BY version DESC LIMIT $4";
    let query = sqlx::query(sql).bind(&caller.tenant).bind(&name);
    let (rows, next_cursor) = page.fetch::<i32>(&state.pool, query, "version").await?;
    // (An empty first page: never stored. A later one may be empty, its cursor the workflow's
    // first version: a 404 only when the workflow has none.)
    if rows.is_empty() && page.after::<i32>()?.is_none() {
        return Err(ApiError::not_found("workflow"));
    }
    if rows.is_empty() {
        let stored: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM workflows WHERE tenant_id = $1 AND name = $2)")
                .bind(&caller.tenant)
                .bind(&name)
                .fetch_one(&state.pool)
                .await?;
        if !stored {
            return Err(ApiError::not_found("workflow"));
        }
    }
    Ok(Json(WorkflowVersionList { items: rows.iter().map(to_version).collect(), next_cursor }))
}
