//! `/v1/repo-connections` and `/v1/webhook-endpoints`: the integrations a tenant configures.

use axum::Json;
use axum::extract::Path;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get};
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::command::{
    CreateRepoConnection, CreateWebhookEndpoint, DeleteIntegration, IntegrationKind, RotateWebhookSecret,
    UpdateRepoConnection, UpdateWebhookEndpoint, present,
};
use taskmesh_events::{EndpointFormat, ErrorCode, Forge};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use taskmesh_http::body;
use taskmesh_http::{ApiError, ApiResult};

/// The keyring that seals integration secrets; without one they cannot be stored.
fn keyring(state: &AppState) -> Result<&taskmesh_secrets::Keyring, ApiError> {
    state.keyring.as_deref().ok_or_else(|| {
        ApiError::new(ErrorCode::Unavailable, "no secrets key is configured (TASKMESH_SECRETS__KEY)").lasting()
    })
}

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/repo-connections", get(list_repo_connections).post(create_repo_connection))
        .route("/v1/repo-connections/{id}", delete(delete_repo_connection).patch(update_repo_connection))
        .route("/v1/webhook-endpoints", get(list_webhook_endpoints).post(create_webhook_endpoint))
        .route("/v1/webhook-endpoints/{id}", delete(delete_webhook_endpoint).patch(update_webhook_endpoint))
        .route("/v1/webhook-endpoints/{id}/rotate-secret", axum::routing::post(rotate_webhook_secret))
}

async fn delete_integration(
    state: &AppState,
    caller: &Caller,
    kind: IntegrationKind,
    id: &str,
    headers: &HeaderMap,
) -> ApiResult<crate::Written> {
    caller.require_admin()?;
    let if_match = crate::if_match(headers)?;
    let what = match kind {
        IntegrationKind::WebhookEndpoint => "webhook endpoint",
        IntegrationKind::RepoConnection => "repository connection",
    };
    let id: uuid::Uuid = id.parse().map_err(|_| ApiError::not_found(what))?;
    let cmd = DeleteIntegration { tenant: caller.tenant.clone(), kind, id, if_match };
    let written = state.ingest.delete_integration(&cmd).await?;
    Ok(crate::Written(written.seq))
}

/// Delete a repository connection (admin): its forge's webhooks start nothing more.
#[utoipa::path(delete, operation_id = "delete_repo_connection", path = "/v1/repo-connections/{id}", tag = "integrations",
    params(("id" = uuid::Uuid, Path), ("If-Match" = Option<String>, Header, description = "Its version as listed, `\"{version}\"`: deleted only if it is still at it")),
    responses(
        (status = 204, description = "Deleted (or already gone)", headers(("Taskmesh-Seq" = u64, description = "The write's seq: send it as Taskmesh-Min-Seq to read it"))),
        (status = 412, description = "Not at a version If-Match names", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_repo_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<crate::Written> {
    delete_integration(&state, &caller, IntegrationKind::RepoConnection, &id, &headers).await
}

/// Delete an outbound webhook endpoint (admin): nothing more is delivered to it, retries
/// included.
#[utoipa::path(delete, operation_id = "delete_webhook_endpoint", path = "/v1/webhook-endpoints/{id}", tag = "integrations",
    params(("id" = uuid::Uuid, Path), ("If-Match" = Option<String>, Header, description = "Its version as listed, `\"{version}\"`: deleted only if it is still at it")),
    responses(
        (status = 204, description = "Deleted (or already gone)", headers(("Taskmesh-Seq" = u64, description = "The write's seq: send it as Taskmesh-Min-Seq to read it"))),
        (status = 412, description = "Not at a version If-Match names", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete_webhook_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<crate::Written> {
    delete_integration(&state, &caller, IntegrationKind::WebhookEndpoint, &id, &headers).await
}

/// A repository connection, without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct RepoConnectionView {
    pub id: uuid::Uuid,
    pub forge: String,
    pub repository: String,
    pub branches: Vec<String>,
    pub tags: Vec<String>,
    pub paths: Vec<String>,
    /// The workflow's name; none when it is read from `pipeline_file`.
    pub workflow: Option<String>,
    /// The path in the repository each push reads its workflow from.
    pub pipeline_file: Option<String>,
    /// Its runs report their state on their commits (it has a status token).
    pub reports_status: bool,
    /// The forge's API base URL it was given, if any.
    pub api_url: Option<String>,
    /// After its webhook secret was changed: until when the one replaced is still taken; null
    /// when only the current one is.
    pub previous_secret_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Repositories at the forge its checkouts may fetch as submodules with its token.
    pub submodule_repositories: Vec<String>,
    /// Its pull (merge) requests from the repository's own branches start runs.
    pub pull_requests: bool,
    /// The path the forge posts to on the git-integration service.
    pub webhook_path: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Its last commit status given up, until one is reported again; none while they go
    /// through.
    pub status_failure: Option<StatusFailure>,
    /// The log sequence of its last event, which `PATCH` and `DELETE` take in `If-Match` (as `"{version}"`);
    /// none for a connection last changed before versions were kept, until its next event.
    pub version: Option<u64>,
}

/// A commit status given up: the forge refused it for good (a wrong token, say), or every
/// attempt on the retry schedule failed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusFailure {
    pub at: chrono::DateTime<chrono::Utc>,
    pub run_id: uuid::Uuid,
    /// The pushed commit it was for.
    pub commit: String,
    /// The state it was to report: `pending`, `success`, `failure` or `cancelled`.
    pub state: String,
    /// Why it was given up (the forge's answer, say).
    pub error: String,
}

/// The tenant's repository connections.
#[derive(Debug, Serialize, ToSchema)]
pub struct RepoConnectionList {
    pub items: Vec<RepoConnectionView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<uuid::Uuid>,
}

/// List the tenant's repository connections (their secrets are never shown).
#[utoipa::path(get, operation_id = "list_repo_connections", path = "/v1/repo-connections", tag = "integrations",
    params(crate::PageParams),
    responses((status = 200, body = RepoConnectionList), (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_repo_connections(
    State(state): State<AppState>,
    caller: Caller,
    page: crate::Page,
) -> ApiResult<Json<RepoConnectionList>> {
    let sql = "SELECT id, forge, repository, branches, tags, paths, workflow->>'name' AS workflow, pipeline_file,
        status_token IS NOT NULL AS reports_status, api_url, submodule_repositories, pull_requests, created_at, status_failure, version,
        CASE WHEN previous_secret_until > now() THEN previous_secret_until END AS previous_secret_until
        FROM repo_connections WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3";
    let (rows, next_cursor) = page.of_tenant::<uuid::Uuid>(&state.pool, sql, &caller.tenant, "id").await?;
    let items = rows
        .iter()
        .map(|r| {
            let id: uuid::Uuid = r.get("id");
            let forge: String = r.get("forge");
            RepoConnectionView {
                id,
                webhook_path: format!("/hooks/{forge}/{id}"),
                forge,
                repository: r.get("repository"),
                branches: r.get("branches"),
                tags: r.get("tags"),
                paths: r.get("paths"),
                workflow: r.get("workflow"),
                pipeline_file: r.get("pipeline_file"),
                reports_status: r.get("reports_status"),
                api_url: r.get("api_url"),
                submodule_repositories: r.get("submodule_repositories"),
                previous_secret_until: r.get("previous_secret_until"),
                pull_requests: r.get("pull_requests"),
                created_at: r.get("created_at"),
                // (A shape this version does not read is shown as none, not a failed list.)
                status_failure: r
                    .try_get::<Option<sqlx::types::Json<StatusFailure>>, _>("status_failure")
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "a connection's status_failure is unreadable");
                        None
                    })
                    .map(|j| j.0),
                version: crate::row_version(r),
            }
        })
        .collect();
    Ok(Json(RepoConnectionList { items, next_cursor }))
}

/// An outbound webhook endpoint, without its signing secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointView {
    pub id: uuid::Uuid,
    pub url: String,
    /// The events sent to it; empty means every one.
    pub event_types: Vec<String>,
    /// `standard_webhooks`, `slack` or `email`.
    pub format: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When it was disabled, after every delivery to it had failed for too long (nothing is
    /// sent to it until `POST /v1/webhook-endpoints/{id}/enable`); null while enabled.
    pub disabled_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why it was disabled.
    pub disabled_reason: Option<String>,
    /// After `POST …/rotate-secret`: until when the secret it replaced signs deliveries too;
    /// null when only the current one does.
    pub previous_secret_until: Option<chrono::DateTime<chrono::Utc>>,
    /// The log sequence of its last event (a failed delivery's record too), which `PATCH`
    /// and `DELETE` take in `If-Match` (as `"{version}"`); none for an endpoint last changed before versions
    /// were kept, until its next event.
    pub version: Option<u64>,
}

/// The tenant's webhook endpoints.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointList {
    pub items: Vec<WebhookEndpointView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<uuid::Uuid>,
}

/// List the tenant's outbound webhook endpoints (their secrets are never shown again).
#[utoipa::path(get, operation_id = "list_webhook_endpoints", path = "/v1/webhook-endpoints", tag = "integrations",
    params(crate::PageParams),
    responses((status = 200, body = WebhookEndpointList), (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_webhook_endpoints(
    State(state): State<AppState>,
    caller: Caller,
    page: crate::Page,
) -> ApiResult<Json<WebhookEndpointList>> {
    let sql = "SELECT id, url, event_types, format, created_at, disabled_at, disabled_reason, version,
            CASE WHEN previous_until > now() THEN previous_until END AS previous_until
        FROM webhook_endpoints WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3";
    let (rows, next_cursor) = page.of_tenant::<uuid::Uuid>(&state.pool, sql, &caller.tenant, "id").await?;
    let items = rows
        .iter()
        .map(|r| WebhookEndpointView {
            id: r.get("id"),
            url: r.get("url"),
            event_types: r.get("event_types"),
            format: r.get("format"),
            created_at: r.get("created_at"),
            disabled_at: r.get("disabled_at"),
            disabled_reason: r.get("disabled_reason"),
            previous_secret_until: r.get("previous_until"),
            version: crate::row_version(r),
        })
        .collect();
    Ok(Json(WebhookEndpointList { items, next_cursor }))
}

/// Connect a repository: pushes to matching branches (and tags) start `workflow`, or the
/// workflow in the repository's `pipeline_file` at the pushed commit.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepoConnectionRequest {
    /// `github`, `gitlab` or `gitea` (Gitea and Forgejo).
    #[schema(value_type = String, example = "github")]
    pub forge: Forge,
    /// `owner/name`.
    pub repository: String,
    /// The webhook secret configured on the forge (8 to 256 characters).
    pub secret: String,
    /// Branch names or patterns with `*`; empty means every branch.
    #[serde(default)]
    pub branches: Vec<String>,
    /// Tag names or patterns with `*` whose pushes start runs too (input `tag`); empty: tag
    /// pushes start none.
    #[serde(default)]
    pub tags: Vec<String>,
    /// File path patterns with `*` (any run of characters, `/` included): a branch push starts
    /// a run only if it changes a matching file. Empty: any push. Where the payload may not
    /// list every changed file (GitHub's lists at most 20 commits; GitLab's says how many it
    /// left out), the push starts its run.
    #[serde(default)]
    pub paths: Vec<String>,
    /// The workflow a push runs. Give this or `pipeline_file`.
    #[schema(value_type = Option<Object>)]
    pub workflow: Option<serde_json::Value>,
    /// The path of a workflow file in the repository (YAML or JSON, as `POST /v1/runs` takes,
    /// at most 1 MiB), such as `.taskmesh.yml`: each push runs the workflow that file holds at
    /// the pushed commit, read through the forge's API with `status_token`. A commit without
    /// the file starts nothing; one whose file is not a valid workflow is refused (`422`, which
    /// the forge shows on the delivery). Give this or `workflow`.
    pub pipeline_file: Option<String>,
    /// A token of the forge's API (GitHub: a token that may write commit statuses, and read
    /// contents for `pipeline_file`; GitLab: a token with the `api` scope; Gitea: an access
    /// token with write access to the repository). With it, each run the connection starts
    /// shows on the pushed commit as the status `taskmesh/{workflow}`: pending, then its
    /// outcome; a `pipeline_file` is read with it. Stored sealed, never shown.
    pub status_token: Option<String>,
    /// The forge's API base URL: `https://api.github.com` (the default for GitHub), or your
    /// GitLab's or Gitea's (`https://gitlab.com` for GitLab's service); required for GitLab and
    /// Gitea when `status_token` is set, so that a token is never sent to a server by default.
    pub api_url: Option<String>,
    /// Repositories at the forge (`owner/name` patterns with `*`, such as `acme/*`) that
    /// `checkout: {submodules: true}` may fetch with `status_token`, for private submodules.
    /// Empty (the default): submodules are fetched without it. A push chooses its submodules,
    /// and the token may read more than the pusher may: name only what any pusher may read.
    #[serde(default)]
    pub submodule_repositories: Vec<String>,
    /// Pull requests (GitLab: merge requests) from a branch of the repository itself start
    /// runs too, at their head commit, when opened, given new commits or reopened (GitHub and
    /// Gitea: `pull_request` events; GitLab: `Merge Request Hook`), with inputs `branch` (its
    /// head's), `target_branch` and `pull_request` (its number); `branches` then filters the
    /// branch it asks to merge into. Those from forks start none. Default false.
    #[serde(default)]
    pub pull_requests: bool,
}

/// A created repository connection.
#[derive(Debug, Serialize, ToSchema)]
pub struct RepoConnectionCreatedResponse {
    pub id: String,
    /// The path the forge posts to on the git-integration service.
    pub webhook_path: String,
    pub seq: u64,
}

/// Connect a repository.
#[utoipa::path(post, operation_id = "create_repo_connection", path = "/v1/repo-connections", tag = "integrations", request_body = RepoConnectionRequest,
    responses(
        (status = 201, body = RepoConnectionCreatedResponse),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 422, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create_repo_connection(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<RepoConnectionCreatedResponse>)> {
    caller.require_admin()?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let req: RepoConnectionRequest = body::json(&bytes)?;
    let keyring = keyring(&state)?;
    let secret = seal_secret(keyring, &caller, &req.secret)?;
    let status_token = req.status_token.as_deref().map(|t| seal_token(keyring, &caller, t)).transpose()?;
    let req_forge = req.forge;
    let created = state
        .ingest
        .create_repo_connection(&CreateRepoConnection {
            tenant: caller.tenant,
            forge: req.forge,
            repository: req.repository,
            secret,
            branches: req.branches,
            tags: req.tags,
            paths: req.paths,
            workflow: req.workflow,
            pipeline_file: req.pipeline_file,
            status_token,
            api_url: req.api_url,
            submodule_repositories: req.submodule_repositories,
            pull_requests: req.pull_requests,
        })
        .await?;
    let webhook_path = format!("/hooks/{}/{}", req_forge.as_str(), created.id);
    Ok((StatusCode::CREATED, Json(RepoConnectionCreatedResponse { id: created.id, webhook_path, seq: created.seq })))
}

/// A connection's webhook secret (8 to 256 characters), sealed.
fn seal_secret(
    keyring: &taskmesh_secrets::Keyring,
    caller: &Caller,
    secret: &str,
) -> Result<taskmesh_secrets::Sealed, ApiError> {
    if secret.len() < 8 || secret.len() > 256 {
        return Err(ApiError::new(ErrorCode::BadRequest, "secret: must be 8 to 256 characters"));
    }
    Ok(keyring.seal(&taskmesh_secrets::repo_secret_aad(&caller.tenant), secret.as_bytes()))
}

/// A connection's status token (1 to 1024 characters), sealed.
fn seal_token(
    keyring: &taskmesh_secrets::Keyring,
    caller: &Caller,
    token: &str,
) -> Result<taskmesh_secrets::Sealed, ApiError> {
    if token.is_empty() || token.len() > 1024 {
        return Err(ApiError::new(ErrorCode::BadRequest, "status_token: must be 1 to 1024 characters"));
    }
    // It goes in a header: a newline (from a file, say) would fail every request it is sent with.
    if token.trim() != token || token.chars().any(char::is_control) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "status_token: must have no spaces around it and no control characters (a newline, say)",
        ));
    }
    Ok(keyring.seal(&taskmesh_secrets::repo_status_token_aad(&caller.tenant), token.as_bytes()))
}

/// Changes to a repository connection (a JSON merge patch, RFC 7396): each field given
/// replaces the connection's; one left out keeps it. Its id, forge and webhook path stay.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepoConnectionPatch {
    /// `owner/name` (after the repository was renamed or moved, say). Cannot be `null`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub repository: Option<Option<String>>,
    /// A new webhook secret (8 to 256 characters). Deliveries signed with the old one are still
    /// taken for `previous_secret_valid_seconds`, so the forge's setting can follow; then
    /// refused. Cannot be `null`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub secret: Option<Option<String>>,
    /// With `secret`: how long the secret it replaces is still taken, in seconds, 0 (not at
    /// all: for a secret that leaked) to 604,800 (7 days); default 3,600 (an hour).
    pub previous_secret_valid_seconds: Option<u64>,
    /// Replaces the branch patterns; `null` or `[]`: every branch.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>, nullable)]
    pub branches: Option<Option<Vec<String>>>,
    /// Replaces the tag patterns; `null` or `[]`: tag pushes start nothing.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>, nullable)]
    pub tags: Option<Option<Vec<String>>>,
    /// Replaces the path patterns; `null` or `[]`: any change.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>, nullable)]
    pub paths: Option<Option<Vec<String>>>,
    /// A workflow to run instead (the connection then reads no `pipeline_file`). Cannot be
    /// `null`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Object>)]
    pub workflow: Option<Option<serde_json::Value>>,
    /// A pipeline file to read instead (the connection then has no `workflow` of its own).
    /// Cannot be `null`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub pipeline_file: Option<Option<String>>,
    /// A new token (say, before the old one expires); `null` removes it, and with it commit
    /// statuses. A new `api_url` needs the token given again.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, nullable)]
    pub status_token: Option<Option<String>>,
    /// A new API base URL; `null`: none (GitHub's public API for GitHub; a GitLab or Gitea
    /// connection then cannot keep a token).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, nullable)]
    pub api_url: Option<Option<String>>,
    /// Replaces the repositories private submodules may be fetched from with the token;
    /// `null` or `[]`: none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>, nullable)]
    pub submodule_repositories: Option<Option<Vec<String>>>,
    /// Whether pull requests start runs. Cannot be `null`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<bool>)]
    pub pull_requests: Option<Option<bool>>,
}

/// A merge patch's field that cannot be removed: its value, or `None` when it is left out;
/// `null` is a 400.
fn kept<T>(field: &str, value: Option<Option<T>>) -> Result<Option<T>, ApiError> {
    match value {
        Some(None) => Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("{field}: cannot be removed (null): give a value, or leave it out to keep it"),
        )),
        other => Ok(other.flatten()),
    }
}

/// A merge patch's list: `null` empties it, as `[]` does.
fn list(value: Option<Option<Vec<String>>>) -> Option<Vec<String>> {
    value.map(Option::unwrap_or_default)
}

/// A changed repository connection or webhook endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntegrationUpdated {
    pub id: Uuid,
    /// The sequence of the event that changed it (for `Taskmesh-Min-Seq`); for a patch that
    /// changed nothing, its last event's.
    pub seq: u64,
}

/// Change a repository connection (admin): rotate its webhook secret or status token, change
/// its filters, its workflow or pipeline file, or its repository, keeping its webhook path.
#[utoipa::path(patch, operation_id = "update_repo_connection", path = "/v1/repo-connections/{id}", tag = "integrations",
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, description = "The connection's version as listed, `\"{version}\"`: the change is made only if it is still at it")),
    request_body(content(
        (RepoConnectionPatch = "application/merge-patch+json"),
        (RepoConnectionPatch = "application/json"),
    )),
    responses(
        (status = 200, body = IntegrationUpdated, headers(("ETag" = String, description = "The version after the change"))),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 409, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 412, description = "Not at a version If-Match names", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 422, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn update_repo_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<axum::response::Response> {
    caller.require_admin()?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("repository connection"))?;
    let if_match = crate::if_match(&headers)?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let patch: RepoConnectionPatch = body::json(&bytes)?;
    let keyring = keyring(&state)?;
    let secret = kept("secret", patch.secret)?.map(|s| seal_secret(keyring, &caller, &s)).transpose()?;
    let previous_secret_until = match (&secret, patch.previous_secret_valid_seconds) {
        (None, Some(_)) => {
            return Err(ApiError::new(ErrorCode::BadRequest, "previous_secret_valid_seconds: goes with a new secret"));
        }
        (None, None) => None,
        (Some(_), seconds) => previous_until(seconds.unwrap_or(3_600), "previous_secret_valid_seconds")?,
    };
    let status_token = match patch.status_token {
        Some(Some(t)) => Some(Some(seal_token(keyring, &caller, &t)?)),
        Some(None) => Some(None),
        None => None,
    };
    let updated = state
        .ingest
        .update_repo_connection(&UpdateRepoConnection {
            tenant: caller.tenant,
            connection_id: id,
            repository: kept("repository", patch.repository)?,
            secret,
            previous_secret_until,
            branches: list(patch.branches),
            tags: list(patch.tags),
            paths: list(patch.paths),
            workflow: kept("workflow", patch.workflow)?,
            pipeline_file: kept("pipeline_file", patch.pipeline_file)?,
            status_token,
            api_url: patch.api_url,
            submodule_repositories: list(patch.submodule_repositories),
            pull_requests: kept("pull_requests", patch.pull_requests)?,
            if_match,
        })
        .await?;
    Ok(crate::changed(updated.seq, IntegrationUpdated { id, seq: updated.seq }))
}

/// Subscribe an endpoint to run notifications.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpointRequest {
    /// `http` or `https` URL the notifications are POSTed to.
    pub url: String,
    /// `run.succeeded`, `run.failed`; empty means all.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// `standard_webhooks` (the default): the event, signed; `slack`: a Slack incoming
    /// webhook's message. Null or absent: the default.
    #[serde(default)]
    #[schema(example = "slack")]
    pub format: Option<taskmesh_events::EndpointFormat>,
}

/// A created endpoint, with its signing secret (shown only here).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointCreatedResponse {
    pub id: String,
    /// Standard Webhooks signing secret (`whsec_…`): verify `webhook-signature` with it.
    pub secret: String,
    pub seq: u64,
}

/// Register an outbound webhook endpoint.
#[utoipa::path(post, operation_id = "create_webhook_endpoint", path = "/v1/webhook-endpoints", tag = "integrations", request_body = WebhookEndpointRequest,
    responses(
        (status = 201, body = WebhookEndpointCreatedResponse),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create_webhook_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<WebhookEndpointCreatedResponse>)> {
    caller.require_admin()?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let req: WebhookEndpointRequest = body::json(&bytes)?;
    let (plain, secret) = signing_secret(&state, &caller)?;
    let created = state
        .ingest
        .create_webhook_endpoint(&CreateWebhookEndpoint {
            tenant: caller.tenant,
            url: req.url,
            event_types: req.event_types,
            format: req.format.unwrap_or_default(),
            secret,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(WebhookEndpointCreatedResponse { id: created.id, secret: plain, seq: created.seq })))
}

/// A new Standard Webhooks signing secret (`whsec_` and 24 random bytes in base64), and it
/// sealed for the caller's tenant.
fn signing_secret(state: &AppState, caller: &Caller) -> Result<(String, taskmesh_secrets::Sealed), ApiError> {
    let plain = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 24]>()));
    let sealed = keyring(state)?.seal(&taskmesh_secrets::endpoint_secret_aad(&caller.tenant), plain.as_bytes());
    Ok((plain, sealed))
}

/// The format of the caller's endpoint `id` (as the read side has it); 404 for another
/// tenant's, a deleted one, or one never made.
async fn endpoint_format(state: &AppState, caller: &Caller, id: &str) -> ApiResult<(Uuid, EndpointFormat)> {
    let not_found = || ApiError::not_found("webhook endpoint");
    let id: Uuid = id.parse().map_err(|_| not_found())?;
    let format: Option<String> =
        sqlx::query_scalar("SELECT format FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2")
            .bind(&caller.tenant)
            .bind(id)
            .fetch_optional(&state.pool)
            .await?;
    let format = format.ok_or_else(not_found)?;
    let format = serde_json::from_value(serde_json::Value::String(format)).map_err(|e| {
        tracing::error!(error = %e, "an endpoint's format is unreadable");
        ApiError::new(ErrorCode::Internal, "internal error")
    })?;
    Ok((id, format))
}

/// Changes to a webhook endpoint (a JSON merge patch, RFC 7396): each field given replaces
/// the endpoint's; one left out keeps it. Its id, format and secret stay.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpointPatch {
    /// Where its notifications go from now on (checked as a new endpoint's is). Cannot be
    /// `null`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub url: Option<Option<String>>,
    /// The events it is sent; `null` or `[]`: every one.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>, nullable)]
    pub event_types: Option<Option<Vec<String>>>,
}

/// Change a webhook endpoint (admin): where its notifications go, or which events it is sent.
#[utoipa::path(patch, operation_id = "update_webhook_endpoint", path = "/v1/webhook-endpoints/{id}", tag = "integrations",
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, description = "The endpoint's version as listed, `\"{version}\"`: the change is made only if it is still at it")),
    request_body(content(
        (WebhookEndpointPatch = "application/merge-patch+json"),
        (WebhookEndpointPatch = "application/json"),
    )),
    responses(
        (status = 200, body = IntegrationUpdated, headers(("ETag" = String, description = "The version after the change"))),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 409, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 412, description = "Not at a version If-Match names", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn update_webhook_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<axum::response::Response> {
    caller.require_admin()?;
    let if_match = crate::if_match(&headers)?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let patch: WebhookEndpointPatch = body::json(&bytes)?;
    let (id, format) = endpoint_format(&state, &caller, &id).await?;
    let updated = state
        .ingest
        .update_webhook_endpoint(&UpdateWebhookEndpoint {
            tenant: caller.tenant,
            endpoint_id: id,
            format,
            url: kept("url", patch.url)?,
            event_types: list(patch.event_types),
            if_match,
        })
        .await?;
    Ok(crate::changed(updated.seq, IntegrationUpdated { id, seq: updated.seq }))
}

/// Until when a secret replaced goes on serving, `seconds` from now (in whole seconds, as the
/// read side keeps it and the answer says); none for 0. More than
/// [`taskmesh_events::MAX_SECRET_OVERLAP_SECS`] is a
/// 400 on `field`.
fn previous_until(seconds: u64, field: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    let max = taskmesh_events::MAX_SECRET_OVERLAP_SECS;
    if seconds > max {
        return Err(ApiError::new(ErrorCode::BadRequest, format!("{field}: at most {max} (7 days)")));
    }
    let until = chrono::Utc::now().timestamp() + seconds as i64;
    Ok((seconds > 0).then(|| chrono::DateTime::from_timestamp(until, 0)).flatten())
}

/// How a signing secret is rotated.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecretRequest {
    /// How long the secret replaced goes on signing deliveries beside the new one, in seconds:
    /// 0 to 604,800 (7 days); default 86,400 (a day).
    #[serde(default = "default_previous_seconds")]
    pub previous_valid_seconds: u64,
}

impl Default for RotateSecretRequest {
    fn default() -> Self {
        Self { previous_valid_seconds: default_previous_seconds() }
    }
}

fn default_previous_seconds() -> u64 {
    86_400
}

/// A rotated signing secret (shown only here).
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretRotatedResponse {
    pub id: Uuid,
    /// The new Standard Webhooks signing secret (`whsec_…`).
    pub secret: String,
    /// Until when the secret replaced signs deliveries too (each delivery's
    /// `webhook-signature` then lists both); null: it no longer does.
    pub previous_valid_until: Option<chrono::DateTime<chrono::Utc>>,
    pub seq: u64,
}

/// Rotate a webhook endpoint's signing secret (admin): deliveries are signed with a new secret
/// from now on, and also with the one it replaces for `previous_valid_seconds` (a day by
/// default), so the receiver can take the new one without refusing a delivery meanwhile.
#[utoipa::path(post, operation_id = "rotate_webhook_secret", path = "/v1/webhook-endpoints/{id}/rotate-secret",
    tag = "integrations",
    params(("id" = Uuid, Path)),
    request_body(content = Option<RotateSecretRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = SecretRotatedResponse),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 409, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn rotate_webhook_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<SecretRotatedResponse>> {
    caller.require_admin()?;
    let req: RotateSecretRequest = body::json_or_default(&headers, body)?;
    let previous_until = previous_until(req.previous_valid_seconds, "previous_valid_seconds")?;
    let (id, format) = endpoint_format(&state, &caller, &id).await?;
    if format == EndpointFormat::Email {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "an e-mail endpoint's deliveries are not signed: it has no secret to rotate",
        ));
    }
    let (plain, secret) = signing_secret(&state, &caller)?;
    let rotated = state
        .ingest
        .rotate_webhook_secret(&RotateWebhookSecret { tenant: caller.tenant, endpoint_id: id, secret, previous_until })
        .await?;
    Ok(Json(SecretRotatedResponse { id, secret: plain, previous_valid_until: previous_until, seq: rotated.seq }))
}
