//! Git integration: forges' webhooks in. A push to a connected repository starts a run of the
//! connection's workflow, or of the workflow its pipeline file holds at the pushed commit, once
//! per delivery.
//!
//! `POST /hooks/{forge}/{connection}` (`github`, `gitlab` or `gitea`, as the connection says)
//! verifies the delivery with the connection's secret before anything else: GitHub's
//! `X-Hub-Signature-256` and Gitea's (or Forgejo's) `X-Gitea-Signature` are HMAC-SHA256 of the
//! exact body, GitLab's `X-Gitlab-Token` is the secret itself. A bad or missing one is a 401 and
//! nothing is appended. The run is submitted with the idempotency key
//! `{forge}:{connection}:{delivery}`, so a redelivered webhook starts no second run.
//!
//! # Layout
//! - [`github`], [`gitlab`], [`gitea`]: each forge's verification and push payload, read into
//!   a [`Hook`].
//! - [`pipeline`]: a connection's workflow read from a file in the repository at the pushed
//!   commit.
//! - this file: the router, [`build`], the filters and the run a push starts.

pub mod gitea;
pub mod github;
pub mod gitlab;
pub mod pipeline;

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
use taskmesh_events::{ErrorCode, Forge, Trigger, glob_match};
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
    /// Reads pipeline files from forges' APIs, where `egress` permits.
    http: reqwest::Client,
    egress: Arc<taskmesh_egress::Egress>,
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
pub fn router(
    pool: PgPool,
    bus: Bus,
    settings: &HttpSettings,
    keyring: Option<Arc<Keyring>>,
    egress: taskmesh_egress::Egress,
) -> anyhow::Result<axum::Router> {
    let body_limit = settings.body_limit_bytes;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let egress = Arc::new(egress);
    let builder = reqwest::Client::builder()
        .timeout(pipeline::FETCH_TIMEOUT)
        .user_agent(concat!("Taskmesh/", env!("CARGO_PKG_VERSION")));
    // A redirect is followed only where the egress rules permit it, as every hop is.
    let http = egress.client(builder, 3)?;
    let state = GitState { pool, ingest: IngestClient::new(bus), keyring, http, egress };
    let router = axum::Router::new()
        .route("/hooks/github/{connection}", post(|s, p, h, b| hook(Forge::Github, s, p, h, b)))
        .route("/hooks/gitlab/{connection}", post(|s, p, h, b| hook(Forge::Gitlab, s, p, h, b)))
        .route("/hooks/gitea/{connection}", post(|s, p, h, b| hook(Forge::Gitea, s, p, h, b)))
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .layer(DefaultBodyLimit::max(body_limit.max(MAX_WEBHOOK_BYTES)))
        .with_state(state);
    Ok(taskmesh_http::finish(router, settings.metrics))
}

/// Binds the service (port 0 picks a free port).
pub async fn build(
    settings: &HttpSettings,
    pool: PgPool,
    bus: Bus,
    keyring: Option<Arc<Keyring>>,
    egress: taskmesh_egress::Egress,
) -> anyhow::Result<Server> {
    Server::bind(settings.listen, router(pool, bus, settings, keyring, egress)?).await
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
    tags: Vec<String>,
    paths: Vec<String>,
    /// Its workflow; none: read from `pipeline_file`.
    workflow: Option<serde_json::Value>,
    pipeline_file: Option<String>,
    /// The sealed token of the forge's API, if it has one: runs then report their state on
    /// the commit, and a pipeline file is read with it.
    status_token: Option<String>,
    api_url: Option<String>,
}

/// What a verified delivery asks of Taskmesh.
pub enum Hook {
    /// A push: a run, if it passes the connection's filters; once per `delivery`.
    Push { delivery: String, push: Push },
    /// A ping (GitHub's, when a webhook is set up): answered `200`.
    Ping,
    /// Any other event, by its name: acknowledged and ignored.
    Other(String),
}

/// A push, as every forge describes it.
pub struct Push {
    /// `owner/name` (GitLab: the project's path with its namespace).
    pub repository: String,
    /// `refs/heads/…` for a branch.
    pub r#ref: String,
    /// The commit the ref points to now.
    pub commit: String,
    /// The ref was deleted.
    pub deleted: bool,
    /// The head commit's message, where the payload has it.
    pub message: Option<String>,
    /// Every file the push adds, changes or removes, if the payload lists them all (none: it
    /// may not, and path filters do not apply).
    pub changed: Option<Vec<String>>,
    /// The repository's git URL over HTTP(S), where the payload has it.
    pub clone_url: Option<String>,
}

impl Push {
    /// A push of `commit` to `r#ref`; a commit of all zeros (what forges send for a deleted
    /// ref) makes it a deletion.
    pub fn new(repository: String, r#ref: String, commit: String, message: Option<String>) -> Self {
        let deleted = is_zero_sha(&commit);
        Self { repository, r#ref, commit, deleted, message, changed: None, clone_url: None }
    }
}

/// A commit's files as GitHub, GitLab and Gitea list them in a push.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct CommitFiles {
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    modified: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
}

/// The files `commits` add, change or remove, all of them, in order, once each.
pub(crate) fn changed_files(commits: &[CommitFiles]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    commits
        .iter()
        .flat_map(|c| c.added.iter().chain(&c.modified).chain(&c.removed))
        .filter(|f| seen.insert(f.as_str()))
        .cloned()
        .collect()
}

/// A request header, if it is text.
pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A delivery id from header `name`: present, and at most 128 characters.
pub(crate) fn delivery(value: Option<&str>, name: &str) -> ApiResult<String> {
    value
        .filter(|d| !d.is_empty() && d.len() <= 128)
        .map(String::from)
        .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, format!("{name} is missing or longer than 128 characters")))
}

/// Checks a bare hex HMAC-SHA256 of `body` keyed with `secret`, in constant time.
pub(crate) fn verify_hex_hmac(secret: &[u8], body: &[u8], hex_sig: &str) -> bool {
    let Ok(bytes) = hex::decode(hex_sig) else { return false };
    let Ok(expected) = <[u8; 32]>::try_from(bytes.as_slice()) else { return false };
    hmac_sha256::HMAC::verify(body, secret, &expected)
}

/// The repository URL a push names, if a step may fetch from it: http(s), without credentials
/// of its own, of a sane length, and naming the connected repository (its path ends in
/// `/{repository}` or `/{repository}.git`). Anything else is ignored, and `checkout` steps of
/// the run are refused.
fn repository_url(url: &str, repository: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok().filter(|_| url.len() <= 2048)?;
    let http = matches!(parsed.scheme(), "http" | "https") && parsed.has_host();
    let bare = parsed.username().is_empty() && parsed.password().is_none();
    let path = parsed.path().trim_end_matches('/').to_ascii_lowercase();
    let path = path.strip_suffix(".git").unwrap_or(&path);
    let named = path.ends_with(&format!("/{}", repository.to_ascii_lowercase()));
    (http && bare && named).then(|| url.to_string())
}

/// Whether a commit id is all zeros: what forges send as the new commit of a deleted ref.
fn is_zero_sha(sha: &str) -> bool {
    !sha.is_empty() && sha.bytes().all(|b| b == b'0')
}

async fn connection(pool: &PgPool, id: Uuid, forge: Forge) -> ApiResult<Connection> {
    let row = sqlx::query(
        "SELECT tenant_id, repository, secret, branches, tags, paths, workflow, pipeline_file, status_token, api_url
         FROM repo_connections WHERE id = $1 AND forge = $2",
    )
    .bind(id)
    .bind(forge.as_str())
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| ApiError::not_found("repository connection"))?;
    Ok(Connection {
        tenant: row.get("tenant_id"),
        repository: row.get("repository"),
        secret: row.get("secret"),
        branches: row.get("branches"),
        tags: row.get("tags"),
        paths: row.get("paths"),
        workflow: row.get::<Option<sqlx::types::Json<serde_json::Value>>, _>("workflow").map(|w| w.0),
        pipeline_file: row.get("pipeline_file"),
        status_token: row.get("status_token"),
        api_url: row.get("api_url"),
    })
}

#[tracing::instrument(skip_all, fields(forge = forge.as_str(), connection = %connection_id))]
async fn hook(
    forge: Forge,
    State(state): State<GitState>,
    Path(connection_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<HookResponse>)> {
    let id: Uuid = connection_id.parse().map_err(|_| ApiError::not_found("repository connection"))?;
    let (_, body) = taskmesh_http::body::read(&headers, body, false)?;
    let conn = connection(&state.pool, id, forge).await?;
    let secret = open_secret(&state, &taskmesh_secrets::repo_secret_aad(&conn.tenant), &conn.secret)?;
    let read = match forge {
        Forge::Github => github::read,
        Forge::Gitlab => gitlab::read,
        Forge::Gitea => gitea::read,
    };
    let (delivery, push) = match read(&headers, &body, &secret)? {
        Hook::Push { delivery, push } => (delivery, push),
        Hook::Ping => {
            let pong = HookResponse { outcome: "ignored", run_id: None, duplicate: None, reason: Some("pong".into()) };
            return Ok((StatusCode::OK, Json(pong)));
        }
        Hook::Other(event) => return Ok(HookResponse::ignored(format!("event '{event}' starts no run"))),
    };
    if !push.repository.eq_ignore_ascii_case(&conn.repository) {
        return Ok(HookResponse::ignored(format!(
            "push to {}, but this connection is for {}",
            push.repository, conn.repository
        )));
    }
    if push.deleted {
        return Ok(HookResponse::ignored("ref deleted"));
    }
    let matches = |patterns: &[String], name: &str| patterns.iter().any(|p| glob_match(p, name));
    let (branch, tag) = if let Some(branch) = push.r#ref.strip_prefix("refs/heads/") {
        if !conn.branches.is_empty() && !matches(&conn.branches, branch) {
            return Ok(HookResponse::ignored(format!("branch {branch} matches none of the connection's branches")));
        }
        // A branch push changes files; a tag push names a commit. A push listing no file at
        // all (a branch made at a commit already pushed) is not judged: it starts its run.
        if let Some(changed) = push.changed.as_ref().filter(|c| !conn.paths.is_empty() && !c.is_empty())
            && !changed.iter().any(|f| matches(&conn.paths, f))
        {
            return Ok(HookResponse::ignored("no file it changes matches the connection's paths"));
        }
        (Some(branch), None)
    } else if let Some(tag) = push.r#ref.strip_prefix("refs/tags/") {
        if !matches(&conn.tags, tag) {
            return Ok(HookResponse::ignored(format!("tag {tag} matches none of the connection's tags")));
        }
        (None, Some(tag))
    } else {
        return Ok(HookResponse::ignored(format!("{} is neither a branch nor a tag", push.r#ref)));
    };
    if push.message.as_ref().is_some_and(|m| m.contains("[skip ci]") || m.contains("[ci skip]")) {
        return Ok(HookResponse::ignored("the head commit asks to skip CI"));
    }
    // The workflow, and the file it was read from, if it was.
    let (workflow, pipeline_file) = match (&conn.workflow, &conn.pipeline_file) {
        (Some(workflow), _) => (workflow.clone(), None),
        (None, Some(path)) => match pipeline_workflow(&state, &conn, forge, path, &push.commit).await? {
            Some(workflow) => (workflow, Some(path.clone())),
            None => return Ok(HookResponse::ignored(format!("the commit has no pipeline file {path}"))),
        },
        (None, None) => {
            tracing::error!("a repository connection with neither a workflow nor a pipeline file");
            return Err(ApiError::new(ErrorCode::Internal, "internal error"));
        }
    };
    let mut inputs = BTreeMap::from([
        ("repository".to_string(), serde_json::json!(push.repository)),
        ("commit".to_string(), serde_json::json!(push.commit)),
    ]);
    match (branch, tag) {
        (Some(branch), _) => inputs.insert("branch".to_string(), serde_json::json!(branch)),
        (_, tag) => inputs.insert("tag".to_string(), serde_json::json!(tag)),
    };
    let accepted = state
        .ingest
        .submit_run(&SubmitRun {
            tenant: conn.tenant,
            workflow,
            inputs,
            trigger: Trigger::Webhook {
                forge,
                connection_id: id,
                delivery: delivery.clone(),
                repository: push.repository.clone(),
                branch: branch.map(String::from),
                commit: Some(push.commit.clone()),
                tag: tag.map(String::from),
                reports_status: conn.status_token.is_some(),
                clone_url: push.clone_url.as_deref().and_then(|u| repository_url(u, &push.repository)),
            },
            idempotency_key: Some(format!("{}:{id}:{delivery}", forge.as_str())),
            priority: None,
            labels: Default::default(),
            traceparent: taskmesh_telemetry::current_traceparent(),
            not_before: None,
            refresh_cache: false,
        })
        .await
        .map_err(|mut p| {
            // Said of a file in the repository, the problem names it (the forge shows it).
            if let (Some(path), ErrorCode::InvalidWorkflow | ErrorCode::InvalidInput) = (&pipeline_file, p.code) {
                p.detail = format!("the pipeline file {path} at {}: {}", push.commit, p.detail);
            }
            p
        })?;
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

/// The workflow in a connection's pipeline file at `commit`; `None` if there is no such file.
async fn pipeline_workflow(
    state: &GitState,
    conn: &Connection,
    forge: Forge,
    path: &str,
    commit: &str,
) -> ApiResult<Option<serde_json::Value>> {
    let sealed = conn.status_token.as_deref().ok_or_else(|| {
        tracing::error!("a repository connection with a pipeline file but no token");
        ApiError::new(ErrorCode::Internal, "internal error")
    })?;
    let token = open_secret(state, &taskmesh_secrets::repo_status_token_aad(&conn.tenant), sealed)?;
    let token = String::from_utf8(token).map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?;
    let api_url = conn.api_url.as_deref().or(forge.default_api_url()).ok_or_else(|| {
        tracing::error!("a repository connection with a pipeline file but no API URL");
        ApiError::new(ErrorCode::Internal, "internal error")
    })?;
    let source = pipeline::Source { forge, api_url, repository: &conn.repository, path, commit, token: &token };
    pipeline::fetch(&state.http, &state.egress, &source).await
}

/// Opens one of a connection's sealed values (its webhook secret, its token) sealed with `aad`.
fn open_secret(state: &GitState, aad: &str, stored: &str) -> ApiResult<Vec<u8>> {
    let keyring =
        state.keyring.as_ref().ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "no secrets key is configured"))?;
    let sealed: taskmesh_secrets::Sealed = serde_json::from_str(stored).map_err(|e| {
        tracing::error!(error = %e, "a stored connection secret is not sealed");
        ApiError::new(ErrorCode::Internal, "internal error")
    })?;
    keyring.open(aad, &sealed).map_err(|e| {
        tracing::error!(error = %e, "cannot open a connection's secret");
        ApiError::new(ErrorCode::Internal, "internal error")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_of_the_zero_commit_deletes_its_ref() {
        let push = |commit: &str| Push::new("o/r".into(), "refs/heads/main".into(), commit.into(), None);
        assert!(push("0000000000000000000000000000000000000000").deleted);
        assert!(!push("da1560886d4f094c3e6c9ef40349f7d38b5d27d7").deleted);
        assert!(!push("").deleted);
    }

    #[test]
    fn each_forges_push_names_its_repositorys_url() {
        let fixture = |forge: &str| {
            let path = format!("{}/../../tests/fixtures/webhooks/{forge}/push.json", env!("CARGO_MANIFEST_DIR"));
            std::fs::read(path).unwrap()
        };
        let github = github::push(&fixture("github"), false).unwrap();
        assert_eq!(github.clone_url.as_deref(), Some("https://github.com/binkkatal/sample_app.git"));
        let gitea = github::push(&fixture("gitea"), true).unwrap();
        assert_eq!(gitea.clone_url.as_deref(), Some("http://localhost:3000/example/example.git"));
        let secret = b"s";
        let headers: HeaderMap = [("x-gitlab-token", "s"), ("x-gitlab-event", "Push Hook")]
            .into_iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect();
        let Ok(Hook::Push { push: gitlab, .. }) = gitlab::read(&headers, &fixture("gitlab"), secret) else {
            panic!("a GitLab push")
        };
        assert_eq!(gitlab.clone_url.as_deref(), Some("http://example.com/mike/diaspora.git"));
    }

    #[test]
    fn only_an_http_url_of_the_pushed_repository_is_kept() {
        let kept = |url: &str| repository_url(url, "Mike/Diaspora").is_some();
        assert!(kept("http://example.com/mike/diaspora.git"));
        assert!(kept("https://example.com/gitlab/mike/diaspora"));
        assert!(!kept("https://example.com/mike/other.git"));
        assert!(!kept("https://example.com/xmike/diaspora.git"));
        assert!(!kept("ssh://git@example.com/mike/diaspora.git"));
        assert!(!kept("file:///srv/mike/diaspora.git"));
        assert!(!kept("https://user:pass@example.com/mike/diaspora.git"));
        assert!(!kept(&format!("https://example.com/{}/mike/diaspora.git", "a".repeat(2048))));
    }
}
