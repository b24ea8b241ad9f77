//! Git integration: forges' webhooks in. A push to a connected repository (and, where the
//! connection asks, a pull or merge request from one of its branches, opened, given new commits
//! or reopened) starts a run of the connection's workflow, or of the workflow its pipeline file
//! holds at the commit, once per delivery.
//!
//! `POST /hooks/{forge}/{connection}` (`github`, `gitlab` or `gitea`, as the connection says)
//! verifies the delivery with the connection's secret before anything else: GitHub's
//! `X-Hub-Signature-256` and Gitea's (or Forgejo's) `X-Gitea-Signature` are HMAC-SHA256 of the
//! exact body, GitLab's `X-Gitlab-Token` is the secret itself. A bad or missing one is a 401 and
//! nothing is appended. The run is submitted with the idempotency key
//! `{forge}:{connection}:{delivery}`, so a redelivered webhook starts no second run.
//!
//! # Layout
//! - [`github`], [`gitlab`], [`gitea`]: each forge's verification, push and pull request
//!   payloads, read into a [`Hook`].
//! - [`pipeline`]: a connection's workflow read from a file in the repository at the commit
//!   pushed (or a pull request's head).
//! - this file: the router, [`build`], the filters and the run a push or a pull request starts.

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
use taskmesh_events::command::{CancelRun, SubmitRun};
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
#[derive(Debug, Default, Serialize)]
pub struct HookResponse {
    /// `started`, `cancelled` (a pull request closed: the runs in `cancelled`) or `ignored`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The runs asked to cancel.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cancelled: Vec<Uuid>,
}

impl HookResponse {
    fn ignored(reason: impl Into<String>) -> (StatusCode, Json<Self>) {
        (StatusCode::ACCEPTED, Json(Self { outcome: "ignored", reason: Some(reason.into()), ..Default::default() }))
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
    /// The sealed secret it replaced, while that is still taken.
    previous_secret: Option<String>,
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
    /// Its pull requests start runs.
    pull_requests: bool,
}

impl Connection {
    /// Whether its `branches` take `branch` (none named: every branch).
    fn takes_branch(&self, branch: &str) -> bool {
        self.branches.is_empty() || self.branches.iter().any(|p| glob_match(p, branch))
    }
}

/// What a verified delivery asks of Taskmesh.
pub enum Hook {
    /// A push: a run, if it passes the connection's filters; once per `delivery`.
    Push { delivery: String, push: Push },
    /// A pull (merge) request's event: a run, if the connection takes pull requests and it
    /// passes its filters; once per `delivery`. Its payload is judged only where the
    /// connection takes them (a 400 when it does not fit).
    PullRequest { delivery: String, pr: Result<PullRequest, ApiError> },
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

/// A pull (GitLab: merge) request's event, as every forge describes it.
pub struct PullRequest {
    /// The repository it asks to merge into (`owner/name`; GitLab: the project's path).
    pub repository: String,
    /// Its number (GitLab: its `iid`).
    pub number: u64,
    /// The branch its commits are on.
    pub head_branch: String,
    /// The branch it asks to merge into.
    pub target_branch: String,
    /// Its head commit.
    pub commit: String,
    /// Its title (GitLab: and its head commit's message), where `[skip ci]` counts.
    pub title: String,
    /// Its head is another repository's (a fork's), or unknown.
    pub fork: bool,
    /// Why this event starts no run (closed, labelled, edited, …); none: it may.
    pub inactive: Option<String>,
    /// It was closed (GitLab: or merged): its runs not yet ended are cancelled.
    pub closed: bool,
    /// When it was last closed or changed, as the forge says: a close cancels only the runs
    /// started before it (not those of a reopening that a late or redelivered close follows).
    pub closed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The repository's git URL over HTTP(S), where the payload has it.
    pub clone_url: Option<String>,
}

/// What a delivery that passed the connection's filters starts a run of.
struct Start {
    repository: String,
    commit: String,
    branch: Option<String>,
    tag: Option<String>,
    /// A pull request's number and the branch it asks to merge into.
    pull_request: Option<(u64, String)>,
    clone_url: Option<String>,
}

/// Whether a commit message or title asks to skip CI.
fn skips_ci(text: &str) -> bool {
    text.contains("[skip ci]") || text.contains("[ci skip]")
}

/// What a push starts, or why it starts nothing.
fn push_start(conn: &Connection, push: Push) -> Result<Start, String> {
    if !push.repository.eq_ignore_ascii_case(&conn.repository) {
        return Err(format!("push to {}, but this connection is for {}", push.repository, conn.repository));
    }
    if push.deleted {
        return Err("ref deleted".into());
    }
    let matches = |patterns: &[String], name: &str| patterns.iter().any(|p| glob_match(p, name));
    let (branch, tag) = if let Some(branch) = push.r#ref.strip_prefix("refs/heads/") {
        if !conn.takes_branch(branch) {
            return Err(format!("branch {branch} matches none of the connection's branches"));
        }
        // A branch push changes files; a tag push names a commit. A push listing no file at
        // all (a branch made at a commit already pushed) is not judged: it starts its run.
        if let Some(changed) = push.changed.as_ref().filter(|c| !conn.paths.is_empty() && !c.is_empty())
            && !changed.iter().any(|f| matches(&conn.paths, f))
        {
            return Err("no file it changes matches the connection's paths".into());
        }
        (Some(branch.to_string()), None)
    } else if let Some(tag) = push.r#ref.strip_prefix("refs/tags/") {
        if !matches(&conn.tags, tag) {
            return Err(format!("tag {tag} matches none of the connection's tags"));
        }
        (None, Some(tag.to_string()))
    } else {
        return Err(format!("{} is neither a branch nor a tag", push.r#ref));
    };
    if push.message.as_deref().is_some_and(skips_ci) {
        return Err("the head commit asks to skip CI".into());
    }
    Ok(Start {
        repository: push.repository,
        commit: push.commit,
        branch,
        tag,
        pull_request: None,
        clone_url: push.clone_url,
    })
}

/// A time in a forge's payload: RFC 3339 (GitHub, Gitea, recent GitLab), or GitLab's older
/// `2013-12-03 17:23:34 UTC`.
pub(crate) fn forge_time(text: Option<&str>) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = text?;
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.to_utc())
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S UTC").map(|t| t.and_utc()))
        .ok()
}

/// Why a pull request's event starts nothing where the connection takes none.
const PULL_REQUESTS_OFF: &str = "this connection's pull requests start no runs (pull_requests: false)";

/// What a pull request's event starts, for a connection that takes them, or why it starts
/// nothing. Its files are not listed, so `paths` does not judge it; `branches` judges the
/// branch it asks to merge into.
fn pull_request_start(conn: &Connection, pr: PullRequest) -> Result<Start, String> {
    if !pr.repository.eq_ignore_ascii_case(&conn.repository) {
        return Err(format!("pull request to {}, but this connection is for {}", pr.repository, conn.repository));
    }
    if let Some(why) = pr.inactive {
        return Err(why);
    }
    // A fork's code and pipeline file are whoever opened it's: they run with the tenant's
    // secrets nowhere.
    if pr.fork {
        return Err(format!(
            "pull request #{} comes from a fork: only the repository's own branches start runs",
            pr.number
        ));
    }
    if !conn.takes_branch(&pr.target_branch) {
        return Err(format!("target branch {} matches none of the connection's branches", pr.target_branch));
    }
    if !taskmesh_events::is_commit_id(&pr.commit) || is_zero_sha(&pr.commit) {
        return Err(format!("pull request #{} names no head commit", pr.number));
    }
    if skips_ci(&pr.title) {
        return Err("the pull request asks to skip CI".into());
    }
    Ok(Start {
        repository: pr.repository,
        commit: pr.commit,
        branch: Some(pr.head_branch),
        tag: None,
        pull_request: Some((pr.number, pr.target_branch)),
        clone_url: pr.clone_url,
    })
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
        "SELECT tenant_id, repository, secret, branches, tags, paths, workflow, pipeline_file, status_token, api_url,
                pull_requests, CASE WHEN previous_secret_until > now() THEN previous_secret END AS previous_secret
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
        previous_secret: row.get("previous_secret"),
        branches: row.get("branches"),
        tags: row.get("tags"),
        paths: row.get("paths"),
        workflow: row.get::<Option<sqlx::types::Json<serde_json::Value>>, _>("workflow").map(|w| w.0),
        pipeline_file: row.get("pipeline_file"),
        status_token: row.get("status_token"),
        api_url: row.get("api_url"),
        pull_requests: row.get("pull_requests"),
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
    // Signed with the secret a change replaced, while it is still taken, it is verified too.
    let hook = match (read(&headers, &body, &secret), &conn.previous_secret) {
        // (One that no longer opens, its key dropped from the keyring, takes nothing.)
        (Err(e), Some(previous)) if e.0.code == ErrorCode::Unauthorized => {
            match open_secret(&state, &taskmesh_secrets::repo_secret_aad(&conn.tenant), previous) {
                // Refused by this one too: the first refusal says so; anything else is its own.
                Ok(previous) => read(&headers, &body, &previous)
                    .map_err(|second| if second.0.code == ErrorCode::Unauthorized { e } else { second })?,
                Err(_) => return Err(e),
            }
        }
        (hook, _) => hook?,
    };
    let (delivery, start) = match hook {
        Hook::Push { delivery, push } => (delivery, push_start(&conn, push)),
        // (Its payload is judged only where the connection takes pull requests.)
        Hook::PullRequest { delivery, .. } if !conn.pull_requests => (delivery, Err(PULL_REQUESTS_OFF.to_string())),
        Hook::PullRequest { pr: Ok(pr), .. } if pr.closed && pr.repository.eq_ignore_ascii_case(&conn.repository) => {
            return cancel_pull_request_runs(&state, &conn, id, pr.number, pr.closed_at).await;
        }
        Hook::PullRequest { delivery, pr } => (delivery, pull_request_start(&conn, pr?)),
        Hook::Ping => {
            let pong = HookResponse { outcome: "ignored", reason: Some("pong".into()), ..Default::default() };
            return Ok((StatusCode::OK, Json(pong)));
        }
        Hook::Other(event) => return Ok(HookResponse::ignored(format!("event '{event}' starts no run"))),
    };
    let start = match start {
        Ok(start) => start,
        Err(reason) => return Ok(HookResponse::ignored(reason)),
    };
    // The workflow, and the file it was read from, if it was.
    let (workflow, pipeline_file) = match (&conn.workflow, &conn.pipeline_file) {
        (Some(workflow), _) => (workflow.clone(), None),
        (None, Some(path)) => match pipeline_workflow(&state, &conn, forge, path, &start.commit).await? {
            Some(workflow) => (workflow, Some(path.clone())),
            None => return Ok(HookResponse::ignored(format!("the commit has no pipeline file {path}"))),
        },
        (None, None) => {
            tracing::error!("a repository connection with neither a workflow nor a pipeline file");
            return Err(ApiError::new(ErrorCode::Internal, "internal error"));
        }
    };
    let mut inputs = BTreeMap::from([
        ("repository".to_string(), serde_json::json!(start.repository)),
        ("commit".to_string(), serde_json::json!(start.commit)),
    ]);
    for (name, value) in [("branch", &start.branch), ("tag", &start.tag)] {
        if let Some(value) = value {
            inputs.insert(name.to_string(), serde_json::json!(value));
        }
    }
    if let Some((number, target)) = &start.pull_request {
        // A workflow that declares its inputs takes no others: these two go where it declares
        // them, or declares none (the trigger carries them anyway).
        let declared = |name: &str| {
            let inputs = workflow.get("inputs").and_then(|i| i.as_object()).filter(|i| !i.is_empty());
            inputs.is_none_or(|i| i.contains_key(name))
        };
        for (name, value) in [("pull_request", serde_json::json!(number)), ("target_branch", serde_json::json!(target))]
        {
            if declared(name) {
                inputs.insert(name.to_string(), value);
            }
        }
    }
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
                repository: start.repository.clone(),
                branch: start.branch.clone(),
                commit: Some(start.commit.clone()),
                tag: start.tag.clone(),
                reports_status: conn.status_token.is_some(),
                clone_url: start.clone_url.as_deref().and_then(|u| repository_url(u, &start.repository)),
                pull_request: start.pull_request.as_ref().map(|(n, _)| *n),
                target_branch: start.pull_request.as_ref().map(|(_, t)| t.clone()),
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
                p.detail = format!("the pipeline file {path} at {}: {}", start.commit, p.detail);
            }
            p
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(HookResponse {
            outcome: "started",
            run_id: Some(accepted.run_id),
            duplicate: Some(accepted.duplicate),
            ..Default::default()
        }),
    ))
}

/// Most runs of one pull request a delivery of its closing cancels.
const MAX_CANCELLED: i64 = 1_000;

/// A pull request closed (or merged): its runs not yet ended, as the read side has them, and
/// reruns of its runs (of reruns of them, and so on) not yet ended, started before `closed_at`
/// (where the payload says when), are asked to cancel. Sent again (a redelivery), it asks again
/// those still not ended; a run of a reopening since is left be (the forge's clock and ours may
/// differ by a few seconds).
async fn cancel_pull_request_runs(
    state: &GitState,
    conn: &Connection,
    id: Uuid,
    number: u64,
    closed_at: Option<chrono::DateTime<chrono::Utc>>,
) -> ApiResult<(StatusCode, Json<HookResponse>)> {
    // Reruns are found from the tenant's reruns not yet ended, up their chains of earlier runs
    // (bounded, though a chain cannot loop: a rerun is always of an ended run). The two parts
    // cannot overlap (webhook runs, reruns), and a rerun's chain reaches one first run, so
    // `UNION ALL` lists each run once, and the limit can stop the walk early.
    let runs: Vec<Uuid> = sqlx::query_scalar(
        "WITH RECURSIVE earlier (id, of, depth) AS (
             SELECT id, (trigger->>'run_id')::uuid, 1 FROM runs
              WHERE tenant_id = $1 AND status IN ('queued', 'running') AND trigger->>'kind' = 'rerun'
                AND ($5::timestamptz IS NULL OR created_at <= $5)
           UNION ALL
             SELECT e.id, (r.trigger->>'run_id')::uuid, e.depth + 1 FROM earlier e
               JOIN runs r ON r.tenant_id = $1 AND r.id = e.of AND r.trigger->>'kind' = 'rerun'
              WHERE e.depth < 1000
         )
         SELECT id FROM runs WHERE tenant_id = $1 AND status IN ('queued', 'running') AND trigger ? 'pull_request'
           AND trigger->>'kind' = 'webhook' AND trigger->>'connection_id' = $2 AND trigger->>'pull_request' = $3
           AND ($5::timestamptz IS NULL OR created_at <= $5)
         UNION ALL
         SELECT e.id FROM earlier e JOIN runs r ON r.tenant_id = $1 AND r.id = e.of
          WHERE r.trigger->>'kind' = 'webhook' AND r.trigger->>'connection_id' = $2 AND r.trigger->>'pull_request' = $3
         LIMIT $4",
    )
    .bind(&conn.tenant)
    .bind(id.to_string())
    .bind(number.to_string())
    .bind(MAX_CANCELLED)
    .bind(closed_at)
    .fetch_all(&state.pool)
    .await?;
    if runs.is_empty() {
        return Ok(HookResponse::ignored(format!("pull request #{number} closed; none of its runs is running")));
    }
    // A few at once: the forge waits for the answer (GitHub for 10 seconds).
    use futures::{StreamExt, TryStreamExt};
    let why = format!("pull request #{number} was closed");
    futures::stream::iter(runs.iter().copied())
        .map(|run_id| {
            let cancel = CancelRun { tenant: conn.tenant.clone(), run_id, reason: why.clone(), key_id: None };
            async move {
                match state.ingest.cancel_run(&cancel).await {
                    Ok(_) => Ok(()),
                    Err(p) if p.code == ErrorCode::NotFound => Ok(()), // (its events aged out)
                    Err(p) => Err(p),
                }
            }
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await?;
    let reason = Some(format!("pull request #{number} closed"));
    Ok((
        StatusCode::ACCEPTED,
        Json(HookResponse { outcome: "cancelled", reason, cancelled: runs, ..Default::default() }),
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
    let keyring = state
        .keyring
        .as_ref()
        .ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "no secrets key is configured").lasting())?;
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

    /// A payload of `tests/fixtures/webhooks/{forge}/{name}.json`.
    fn fixture(forge: &str, name: &str) -> Vec<u8> {
        let path = format!("{}/../../tests/fixtures/webhooks/{forge}/{name}.json", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(path).unwrap()
    }

    /// `body` with the JSON value at `pointer` set to `value` (added to its object if absent).
    fn with(body: &[u8], pointer: &str, value: serde_json::Value) -> Vec<u8> {
        let mut json: serde_json::Value = serde_json::from_slice(body).unwrap();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        json.pointer_mut(parent).unwrap().as_object_mut().unwrap().insert(key.to_string(), value);
        serde_json::to_vec(&json).unwrap()
    }

    fn connection(pull_requests: bool, branches: &[&str]) -> Connection {
        Connection {
            tenant: "t".into(),
            repository: "baxterthehacker/public-repo".into(),
            secret: String::new(),
            previous_secret: None,
            branches: branches.iter().map(|b| b.to_string()).collect(),
            tags: vec![],
            paths: vec!["docs/*".into()],
            workflow: None,
            pipeline_file: None,
            status_token: None,
            api_url: None,
            pull_requests,
        }
    }

    #[test]
    fn forge_times_are_read_in_rfc_3339_and_gitlabs_older_form() {
        use chrono::TimeZone;
        let t = chrono::Utc.with_ymd_and_hms(2013, 12, 3, 17, 23, 34).unwrap();
        assert_eq!(forge_time(Some("2013-12-03T17:23:34Z")), Some(t));
        assert_eq!(forge_time(Some("2013-12-04T02:23:34+09:00")), Some(t));
        assert_eq!(forge_time(Some("2013-12-03 17:23:34 UTC")), Some(t));
        assert_eq!(forge_time(Some("yesterday")), None);
        assert_eq!(forge_time(None), None);
    }

    #[test]
    fn each_forges_pull_request_is_read_with_its_head_its_target_and_whether_it_is_a_forks() {
        let github = github::pull_request(&fixture("github", "pull_request")).unwrap();
        assert_eq!((github.repository.as_str(), github.number), ("baxterthehacker/public-repo", 1));
        assert_eq!((github.head_branch.as_str(), github.target_branch.as_str()), ("changes", "master"));
        assert_eq!(github.commit, "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c");
        assert!(!github.fork && github.inactive.is_none());
        assert_eq!(github.clone_url.as_deref(), Some("https://github.com/baxterthehacker/public-repo.git"));
        // Gitea's is from a fork; a closed one, or a head whose repository is gone, starts nothing.
        let gitea = github::pull_request(&fixture("gitea", "pull_request")).unwrap();
        assert_eq!((gitea.repository.as_str(), gitea.number, gitea.fork), ("example/example", 2, true));
        let closed_json = with(&fixture("github", "pull_request"), "/action", "closed".into());
        let closed = github::pull_request(&closed_json).unwrap();
        assert!(closed.closed && closed.inactive.unwrap().contains("closed"));
        assert!(!github.closed);
        // The fixture's `closed_at` is null: the close's time is its `updated_at`.
        assert_eq!(closed.closed_at, forge_time(Some("2015-05-05T23:40:27Z")));
        let at = with(&closed_json, "/pull_request/closed_at", "2015-05-05T23:41:00Z".into());
        assert_eq!(github::pull_request(&at).unwrap().closed_at, forge_time(Some("2015-05-05T23:41:00Z")));
        let gone = with(&fixture("github", "pull_request"), "/pull_request/head/repo", serde_json::Value::Null);
        assert!(github::pull_request(&gone).unwrap().fork);
        // A fork of the same name elsewhere is told by its id; Gitea's AGit request, whose head
        // is the repository itself at `refs/pull/N/head`, is no branch of it.
        let renamed =
            with(&fixture("gitea", "pull_request"), "/pull_request/head/repo/full_name", "example/example".into());
        assert!(github::pull_request(&renamed).unwrap().fork, "ids differ");
        let own = with(&renamed, "/pull_request/head/repo/id", 1.into());
        assert!(!github::pull_request(&own).unwrap().fork);
        let agit = with(&own, "/pull_request/head/ref", "refs/pull/2/head".into());
        assert!(github::pull_request(&agit).unwrap().fork, "an AGit request");
        let synced = with(&fixture("gitea", "pull_request"), "/action", "synchronized".into());
        assert!(github::pull_request(&synced).unwrap().inactive.is_none());

        let headers: HeaderMap = [("x-gitlab-token", "s"), ("x-gitlab-event", "Merge Request Hook")]
            .into_iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect();
        let read = |body: &[u8]| match gitlab::read(&headers, body, b"s") {
            Ok(Hook::PullRequest { pr: Ok(pr), .. }) => pr,
            _ => panic!("a GitLab merge request"),
        };
        let gitlab = read(&fixture("gitlab", "merge_request"));
        assert_eq!((gitlab.repository.as_str(), gitlab.number), ("gitlabhq/gitlab-test", 1));
        assert_eq!((gitlab.head_branch.as_str(), gitlab.target_branch.as_str()), ("ms-viewport", "master"));
        assert_eq!(gitlab.commit, "da1560886d4f094c3e6c9ef40349f7d38b5d27d7");
        assert!(!gitlab.fork && gitlab.inactive.is_none());
        // An update starts a run only with new commits (`oldrev`).
        let edited = with(&fixture("gitlab", "merge_request"), "/object_attributes/action", "update".into());
        assert!(read(&edited).inactive.is_some());
        let pushed = with(&edited, "/object_attributes/oldrev", "1".repeat(40).into());
        assert!(read(&pushed).inactive.is_none());
        let forked = with(&fixture("gitlab", "merge_request"), "/object_attributes/source_project_id", 15.into());
        assert!(read(&forked).fork);
        assert!(!gitlab.closed && !read(&pushed).closed);
        for action in ["close", "merge"] {
            let closed = with(&fixture("gitlab", "merge_request"), "/object_attributes/action", action.into());
            assert!(read(&closed).closed && read(&closed).inactive.is_some(), "{action}");
        }
    }

    #[test]
    fn a_pull_request_starts_a_run_only_where_its_target_passes_and_it_is_the_repositorys_own() {
        let pr = || github::pull_request(&fixture("github", "pull_request")).unwrap();
        let start = pull_request_start(&connection(true, &["master"]), pr()).unwrap();
        assert_eq!((start.branch.as_deref(), start.pull_request), (Some("changes"), Some((1, "master".into()))));
        assert_eq!(start.commit, "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c");
        // `paths` does not judge it: its files are not listed.
        // (Where the connection takes none, `hook` answers before this: tested end to end.)
        let elsewhere = pull_request_start(&connection(true, &["release/*"]), pr()).err().unwrap();
        assert!(elsewhere.contains("target branch master"), "{elsewhere}");
        let mut forked = pr();
        forked.fork = true;
        assert!(pull_request_start(&connection(true, &[]), forked).err().unwrap().contains("fork"));
        let mut skipped = pr();
        skipped.title = "Docs only [skip ci]".into();
        assert!(pull_request_start(&connection(true, &[]), skipped).err().unwrap().contains("skip CI"));
        let mut headless = pr();
        headless.commit = String::new();
        assert!(pull_request_start(&connection(true, &[]), headless).err().unwrap().contains("names no head commit"));
        let mut other = pr();
        other.repository = "someone/else".into();
        assert!(pull_request_start(&connection(true, &[]), other).err().unwrap().contains("someone/else"));
    }

    #[test]
    fn each_forges_push_names_its_repositorys_url() {
        let fixture = |forge: &str| fixture(forge, "push");
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
