//! `/v1/runs`: submit runs, list them, read one with its steps and attempts.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::command::{CancelRun, RerunRun, SubmitRun};
use taskmesh_events::{ErrorCode, Trigger};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;
use taskmesh_http::body::{self, Format};
use taskmesh_http::{ApiError, ApiResult};

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/runs", post(submit).get(list))
        .route("/v1/runs/batch", post(submit_batch))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/cancel", post(cancel))
        .route("/v1/runs/{id}/rerun", post(rerun))
        .route("/v1/runs/{id}/commit-status", post(resend_commit_status))
}

/// A run submission: an inline workflow and its inputs. With `Content-Type: application/yaml`
/// the body is the workflow itself.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRunRequest {
    /// A workflow definition (see docs/workflows.md), or the name of a stored workflow as a
    /// string: `"name"` (latest version) or `"name@3"`.
    #[schema(value_type = Object)]
    pub workflow: serde_json::Value,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub inputs: BTreeMap<String, serde_json::Value>,
    /// Start no step before this time (RFC 3339); at most a year ahead.
    #[serde(default)]
    pub not_before: Option<DateTime<Utc>>,
    /// Dispatch priority under contention, -100 to 100 (higher first); overrides the
    /// workflow's `priority`.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Labels to find the run by (`GET /v1/runs?label=key=value`): at most 16; keys 1 to 64
    /// letters, digits, `_`, `.` or `-`; values at most 256 bytes.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The run's steps with `cache:` run rather than reuse an outcome kept by an earlier
    /// success, and theirs replace it (for an outcome known to be stale or wrong).
    #[serde(default)]
    pub refresh_cache: bool,
}

impl SubmitRunRequest {
    /// The ingest command that submits this run for `caller`.
    fn into_command(self, caller: &Caller, idempotency_key: Option<String>, traceparent: Option<String>) -> SubmitRun {
        SubmitRun {
            tenant: caller.tenant.clone(),
            workflow: self.workflow,
            inputs: self.inputs,
            trigger: Trigger::Api { key_id: Some(caller.key_id) },
            idempotency_key,
            traceparent,
            not_before: self.not_before,
            priority: self.priority,
            labels: self.labels,
            refresh_cache: self.refresh_cache,
        }
    }
}

/// The answer to a submission.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunAcceptedResponse {
    pub id: Uuid,
    /// `queued` for a new run; for a replayed idempotency key, the run's current status if known.
    pub status: String,
    /// Stream sequence of the `RunSubmitted` event.
    pub seq: u64,
    /// True when the `Idempotency-Key` had been used: this is the first run.
    pub duplicate: bool,
}

impl From<taskmesh_events::command::RunAccepted> for RunAcceptedResponse {
    fn from(a: taskmesh_events::command::RunAccepted) -> Self {
        Self { id: a.run_id, status: "queued".into(), seq: a.seq, duplicate: a.duplicate }
    }
}

/// Submit a run of an inline workflow.
#[utoipa::path(post, operation_id = "submit_run", path = "/v1/runs", tag = "runs",
    request_body(content(
        (SubmitRunRequest = "application/json"),
        (String = "application/yaml", example = "name: hello\nsteps:\n  - id: build\n    run: echo building\n")
    )),
    params(("Idempotency-Key" = Option<String>, Header, description = "Submitting again with the same key returns the first run"), SubmitParams),
    responses(
        (status = 202, description = "Accepted; the run starts shortly", body = RunAcceptedResponse,
         headers(("Location" = String, description = "The run's URL"))),
        (status = 400, description = "Malformed body", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or bad API key", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such stored workflow", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid workflow or inputs", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 503, description = "A dependency is unavailable", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    params: Result<Query<SubmitParams>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    caller.require_operator()?;
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    check_active_runs_quota(&state, &caller.tenant, 1).await?;
    let (format, bytes) = body::read(&headers, body, true)?;
    let mut request = match format {
        Format::Json => body::json::<SubmitRunRequest>(&bytes)?,
        Format::Yaml => {
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "the body is not UTF-8"))?;
            let workflow = taskmesh_events::workflow::yaml_to_json(text)
                .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("malformed YAML: {e}")))?;
            SubmitRunRequest {
                workflow,
                inputs: BTreeMap::new(),
                not_before: None,
                priority: None,
                labels: BTreeMap::new(),
                refresh_cache: false,
            }
        }
    };
    request.refresh_cache |= params.refresh_cache;
    let idempotency_key = idempotency_key(&headers)?;
    let accepted = state
        .ingest
        .submit_run(&request.into_command(&caller, idempotency_key, taskmesh_telemetry::current_traceparent()))
        .await?;
    Ok(accepted_response(&state, accepted.into()))
}

/// The request's `Idempotency-Key`, if any.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "Idempotency-Key must be ASCII"))
        })
        .transpose()
}

/// The most runs one batch may carry.
pub const MAX_BATCH_RUNS: usize = 100;

/// Several run submissions in one request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRunsRequest {
    /// 1 to 100 runs, each submitted as `POST /v1/runs` would submit it. (Read item by item
    /// with [`batch_run`]: serde does not refuse unknown fields of a flattened struct.)
    #[schema(value_type = Vec<BatchRunRequest>)]
    pub runs: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// One run of a batch: a run submission, with its idempotency key in the body. (Only the
/// documented shape: [`batch_run`] reads it.)
#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchRunRequest {
    /// Submitting again with the same key returns the first run (as `Idempotency-Key` does
    /// for a single submission): give every run a key and a retried batch starts nothing twice.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(flatten)]
    pub run: SubmitRunRequest,
}

/// Reads the run at `index` of a batch: its idempotency key, then the rest as a
/// [`SubmitRunRequest`] (unknown fields refused, with the run's position in the message).
fn batch_run(
    index: usize,
    mut item: serde_json::Map<String, serde_json::Value>,
) -> ApiResult<(Option<String>, SubmitRunRequest)> {
    let at = |mut e: ApiError| {
        e.0.detail = format!("runs[{index}]: {}", e.0.detail);
        e
    };
    let key = match item.remove("idempotency_key") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(k)) => Some(k),
        Some(_) => return Err(at(ApiError::new(ErrorCode::BadRequest, "idempotency_key: must be a string"))),
    };
    let bytes = serde_json::to_vec(&item).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    Ok((key, body::json::<SubmitRunRequest>(&bytes).map_err(at)?))
}

/// The answer to a batch: one outcome per run, in the order they were sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubmitRunsResponse {
    /// How many runs were accepted (new or found by their idempotency key).
    pub accepted: usize,
    /// How many were refused; each refused run's `problem` says why.
    pub rejected: usize,
    pub runs: Vec<BatchRunOutcome>,
}

/// What became of one run of a batch: `run` when it was accepted, `problem` when it was not.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchRunOutcome {
    /// The run's position in the request, from 0.
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<RunAcceptedResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<taskmesh_events::Problem>,
}

/// Submit up to 100 runs in one request. Each run is validated and accepted on its own, as
/// `POST /v1/runs` would: one run's problem does not refuse the others. The request as a
/// whole is refused (beyond what refuses any request: key, size, type, rate limit) only when it
/// is malformed, holds no runs or more than 100, or the tenant's quota of runs not yet ended has
/// no room for all of them. A batch takes one token from the rate limits.
#[utoipa::path(post, operation_id = "submit_runs", path = "/v1/runs/batch", tag = "runs",
    request_body(content((SubmitRunsRequest = "application/json"))),
    responses(
        (status = 200, description = "Each run's outcome", body = SubmitRunsResponse),
        (status = 400, description = "Malformed body, or not 1 to 100 runs", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or bad API key", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an operator, or over the quota of runs not yet ended", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 503, description = "A dependency is unavailable", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn submit_batch(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    caller.require_operator()?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let request = body::json::<SubmitRunsRequest>(&bytes)?;
    let n = request.runs.len();
    if !(1..=MAX_BATCH_RUNS).contains(&n) {
        return Err(ApiError::new(ErrorCode::BadRequest, format!("a batch holds 1 to {MAX_BATCH_RUNS} runs, not {n}")));
    }
    let runs =
        request.runs.into_iter().enumerate().map(|(i, item)| batch_run(i, item)).collect::<ApiResult<Vec<_>>>()?;
    check_active_runs_quota(&state, &caller.tenant, n as i64).await?;
    let traceparent = taskmesh_telemetry::current_traceparent();
    // Every run's command is in flight at once, over the one NATS connection.
    let outcomes = futures::future::join_all(runs.into_iter().map(|(idempotency_key, run)| {
        let cmd = run.into_command(&caller, idempotency_key, traceparent.clone());
        let ingest = state.ingest.clone();
        async move { ingest.submit_run(&cmd).await }
    }))
    .await;
    let runs: Vec<BatchRunOutcome> = outcomes
        .into_iter()
        .enumerate()
        .map(|(index, outcome)| match outcome {
            Ok(a) => BatchRunOutcome { index, run: Some(a.into()), problem: None },
            Err(problem) => BatchRunOutcome { index, run: None, problem: Some(problem) },
        })
        .collect();
    let accepted = runs.iter().filter(|r| r.run.is_some()).count();
    Ok(Json(SubmitRunsResponse { accepted, rejected: n - accepted, runs }).into_response())
}

/// How many more runs the tenant's quota of runs not yet ended allows (none: no quota),
/// counted in the read model (so the few runs submitted in the moment before they are
/// projected can pass it).
pub(crate) async fn active_runs_room(state: &AppState, tenant: &str) -> ApiResult<Option<i64>> {
    let max = state.access.limits().max_active_runs(tenant);
    if max == 0 {
        return Ok(None);
    }
    let active: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM runs WHERE tenant_id = $1 AND status IN ('queued', 'running') LIMIT $2) a",
    )
    .bind(tenant)
    .bind(i64::from(max))
    .fetch_one(&state.pool)
    .await?;
    Ok(Some(i64::from(max) - active))
}

/// The quota problem for a tenant at its limit of runs not yet ended.
pub(crate) fn active_runs_exceeded(state: &AppState, tenant: &str) -> ApiError {
    let max = state.access.limits().max_active_runs(tenant);
    ApiError::new(ErrorCode::QuotaExceeded, format!("this tenant has {max} runs not yet ended, its quota"))
}

/// Refuses `runs` new runs when the tenant's quota of runs not yet ended has no room for
/// them all. Far from the quota, a count made in the last second serves several submissions
/// (see `Access::take_counted_room`), so a flood of submissions does not count the table each
/// time.
pub(crate) async fn check_active_runs_quota(state: &AppState, tenant: &str, runs: i64) -> ApiResult<()> {
    if state.access.take_counted_room(tenant, runs) {
        return Ok(());
    }
    match active_runs_room(state, tenant).await? {
        Some(room) if room < runs && runs > 1 => {
            let max = state.access.limits().max_active_runs(tenant);
            Err(ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "the quota of runs not yet ended ({max}) has room for {} more; the batch has {runs}",
                    room.max(0)
                ),
            ))
        }
        Some(room) if room < runs => Err(active_runs_exceeded(state, tenant)),
        Some(room) => {
            state.access.counted_room(tenant, room, runs);
            Ok(())
        }
        None => Ok(()),
    }
}

pub(crate) fn accepted_response(state: &AppState, accepted: RunAcceptedResponse) -> Response {
    let path = format!("/v1/runs/{}", accepted.id);
    crate::located(state, StatusCode::ACCEPTED, Json(accepted), &path)
}

/// One attempt at a step.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    pub attempt: i32,
    pub executor: String,
    /// `running`, `succeeded`, `failed` or `lost` (its executor stopped renewing the lease).
    pub status: String,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// Outputs the attempt wrote to `$TASKMESH_OUTPUT`.
    #[schema(value_type = Object)]
    pub outputs: serde_json::Value,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A step of a run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StepView {
    pub id: String,
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled`, `skipped` or `timed_out`.
    pub status: String,
    /// `run`, `http`, `llm`, `container`, `sleep` or `builtin` (`uses: noop`).
    pub kind: String,
    pub needs: Vec<String>,
    /// Attempts started.
    pub attempts: i32,
    pub exit_code: Option<i32>,
    /// Captured stdout and stderr (capped; see `output_truncated`).
    pub output: Option<String>,
    pub output_truncated: bool,
    pub error: Option<String>,
    /// Why a step was skipped or cancelled, or where its outcome came from: `reused from run …`
    /// (a rerun), `cached from run … (step …)` (`cache:`; the step did not run).
    pub reason: Option<String>,
    /// `key=value` outputs the step wrote to `$TASKMESH_OUTPUT`; `${{ steps.<id>.outputs.<key> }}`.
    #[schema(value_type = Object)]
    pub outputs: serde_json::Value,
    /// When a failed attempt will be retried.
    pub retry_at: Option<DateTime<Utc>>,
    /// Why a queued step is held back, e.g. `tenant concurrency limit (5 steps)` or
    /// `rate limit 'openai' (5/s)`; null when it only waits for a free executor.
    pub wait_reason: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub attempt_history: Vec<AttemptView>,
}

/// A run with its steps.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunView {
    pub id: Uuid,
    pub workflow: String,
    /// The stored workflow version the run was started from, if any.
    pub workflow_version: Option<i32>,
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled` or `timed_out`.
    pub status: String,
    #[schema(value_type = Object)]
    pub trigger: serde_json::Value,
    #[schema(value_type = Object)]
    pub inputs: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When cancelling the run was asked for.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Dispatch priority under contention (-100 to 100, higher first).
    pub priority: i32,
    pub labels: BTreeMap<String, String>,
    /// Submitted with `refresh_cache`: its `cache:` steps ran rather than reuse kept outcomes.
    pub refresh_cache: bool,
    /// Why a queued run has not started, e.g. `concurrency group 'deploy-main' is full (limit 1)`.
    pub wait_reason: Option<String>,
    /// The stream sequence of the last event this view reflects.
    pub seq: i64,
    pub steps: Vec<StepView>,
}

/// Read a run, its steps and every attempt.
#[utoipa::path(get, operation_id = "get_run", path = "/v1/runs/{id}", tag = "runs",
    params(
        ("id" = Uuid, Path, description = "Run id"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier read: 304 if the run has not changed"),
        ("Taskmesh-Min-Seq" = Option<String>, Header, description = "A decimal sequence number, a write's `seq`: the read waits (up to 5 s) until the read side has applied it"),
        GetRunParams,
    ),
    responses(
        (status = 200, body = RunView, headers(("ETag" = String, description = "Changes whenever the run does"))),
        (status = 304, description = "Not modified since the ETag given"),
        (status = 400, description = "`wait` is not a whole number of seconds from 0 to 60, or `Taskmesh-Min-Seq` is not a sequence or is beyond the log's last", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such run in the caller's tenant", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited (see the RateLimit headers), or the tenant holds as many reads waiting for runs to end as a gateway gives one (1,000); see Retry-After", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The gateway holds all the waiting reads it may, the read side has not reached `Taskmesh-Min-Seq` within 5 s, or the database does not answer; see Retry-After", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    params: Result<Query<GetRunParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let wait = match params.wait {
        None | Some(0) => None,
        Some(s) if s <= MAX_WAIT_SECONDS => Some(std::time::Duration::from_secs(s)),
        Some(_) => {
            return Err(ApiError::new(ErrorCode::BadRequest, format!("wait: at most {MAX_WAIT_SECONDS} seconds")));
        }
    };
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("run"))?;
    let view = match wait {
        None => run_view(&state, &caller.tenant, id).await?,
        Some(wait) => {
            let _place = state.waiting_reads.take(&caller.tenant)?;
            let registered = state.run_ends.wait(id).ok_or_else(|| {
                ApiError::new(ErrorCode::Unavailable, "too many reads are waiting for runs to end; retry")
            })?;
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                // Registered before the read, so an end announced after it wakes this wait.
                let ended = registered.ended();
                let view = run_view(&state, &caller.tenant, id).await?;
                if is_ended(&view.status) {
                    break view;
                }
                tokio::select! {
                    _ = ended => {}
                    _ = tokio::time::sleep_until(deadline) => break view,
                }
            }
        }
    };
    // The view changes exactly when the run gets a new event: its sequence is the entity tag.
    let seq = u64::try_from(view.seq).ok();
    Ok(crate::versioned(&headers, seq, view))
}

/// Longest `wait` of `GET /v1/runs/{id}`.
pub const MAX_WAIT_SECONDS: u64 = 60;

/// Options of a submission that a YAML body (the workflow alone) cannot carry.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SubmitParams {
    /// As the JSON body's `refresh_cache`: the run's `cache:` steps run rather than reuse kept
    /// outcomes, and theirs replace them.
    #[serde(default)]
    pub refresh_cache: bool,
}

/// Options of reading a run.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct GetRunParams {
    /// Hold the answer until the run has ended in the read side (`succeeded`, `failed`,
    /// `cancelled` or `timed_out`), for at most this many seconds; then answer the view as it
    /// is. 0 or absent: answer at once.
    #[param(minimum = 0, maximum = 60)]
    pub wait: Option<u64>,
}

/// Whether a run with this status has ended.
fn is_ended(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled" | "timed_out")
}

/// A run, with its steps (in workflow order) and each step's attempts as JSON built by
/// Postgres, the keys named as [`StepView`]'s and [`AttemptView`]'s fields.
const RUN_VIEW_SQL: &str = "
SELECT r.id, r.workflow_name, r.workflow_version, r.status, r.trigger, r.inputs, r.created_at, r.started_at,
       r.finished_at, r.cancel_requested_at, r.last_seq, r.priority, r.wait_reason, r.labels, r.refresh_cache,
       COALESCE((
           SELECT json_agg(json_build_object(
                      'id', s.step_id, 'status', s.status, 'kind', s.kind, 'needs', s.needs,
                      'attempts', s.attempts, 'exit_code', s.exit_code, 'output', s.output,
                      'output_truncated', s.output_truncated, 'error', s.error, 'reason', s.reason,
                      'outputs', s.outputs, 'retry_at', s.retry_at, 'wait_reason', s.wait_reason,
                      'started_at', s.started_at, 'finished_at', s.finished_at,
                      'attempt_history', COALESCE((
                          SELECT json_agg(json_build_object(
                                     'attempt', a.attempt, 'executor', a.executor, 'status', a.status,
                                     'exit_code', a.exit_code, 'error', a.error, 'outputs', a.outputs,
                                     'started_at', a.started_at, 'finished_at', a.finished_at)
                                 ORDER BY a.attempt)
                          FROM step_attempts a
                          WHERE a.tenant_id = s.tenant_id AND a.run_id = s.run_id AND a.step_id = s.step_id
                      ), '[]'::json))
                  ORDER BY s.position)
           FROM steps s WHERE s.tenant_id = r.tenant_id AND s.run_id = r.id
       ), '[]'::json) AS steps
FROM runs r WHERE r.tenant_id = $1 AND r.id = $2";

/// A run's view in `tenant`, with its steps and every attempt; 404 if there is none.
async fn run_view(state: &AppState, tenant: &str, id: Uuid) -> ApiResult<RunView> {
    // One statement, so one snapshot: the run, its steps and their attempts agree with each
    // other (and with `seq`), and a read costs one round trip.
    let row = sqlx::query(RUN_VIEW_SQL)
        .bind(tenant)
        .bind(id)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("run"))?;
    let steps = row.try_get::<sqlx::types::Json<Vec<StepView>>, _>("steps")?.0;
    Ok(RunView {
        id: row.get("id"),
        workflow: row.get("workflow_name"),
        workflow_version: row.get("workflow_version"),
        status: row.get("status"),
        trigger: row.get::<sqlx::types::Json<serde_json::Value>, _>("trigger").0,
        inputs: row.get::<sqlx::types::Json<serde_json::Value>, _>("inputs").0,
        created_at: row.get("created_at"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
        cancel_requested_at: row.get("cancel_requested_at"),
        priority: row.get("priority"),
        labels: row.get::<sqlx::types::Json<BTreeMap<String, String>>, _>("labels").0,
        refresh_cache: row.get("refresh_cache"),
        wait_reason: row.get("wait_reason"),
        seq: row.get("last_seq"),
        steps,
    })
}

/// Why a run is being cancelled.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub reason: Option<String>,
}

/// The answer to a cancellation request.
#[derive(Debug, Serialize, ToSchema)]
pub struct CancelAccepted {
    pub id: Uuid,
    /// Stream sequence of the `RunCancelRequested` event.
    pub seq: u64,
}

/// Cancel a run: queued steps are cancelled, running ones are killed on their executors, and
/// the run ends `cancelled`. Cancelling a finished run changes nothing.
#[utoipa::path(post, operation_id = "cancel_run", path = "/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = Uuid, Path, description = "Run id")),
    request_body(content = Option<CancelRequest>, content_type = "application/json"),
    responses(
        (status = 202, body = CancelAccepted),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<CancelAccepted>)> {
    caller.require_operator()?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("run"))?;
    let request: CancelRequest = body::json_or_default(&headers, body)?;
    let reason = request.reason.unwrap_or_else(|| "cancelled through the API".into());
    let done = state
        .ingest
        .cancel_run(&CancelRun { tenant: caller.tenant.clone(), run_id: id, reason, key_id: Some(caller.key_id) })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(CancelAccepted { id, seq: done.seq })))
}

/// What a rerun starts from.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RerunRequest {
    /// `failed` (every step that did not succeed) or a step id; either with everything
    /// downstream of it. The other steps keep their outcomes and outputs.
    pub from: String,
    /// The rerun steps with `cache:` run rather than reuse an outcome kept by an earlier
    /// success, and theirs replace it.
    #[serde(default)]
    pub refresh_cache: bool,
}

/// Report a push-started run's state on its commit again: `pending` while it runs, its outcome
/// once it ended, sent with the repository connection's token (after the forge was down, or
/// refused it for a while). It replaces whatever the commit shows for the workflow, so a run
/// with a newer one of the same workflow on the same commit is refused (send the newer's).
#[utoipa::path(post, operation_id = "resend_commit_status", path = "/v1/runs/{id}/commit-status", tag = "runs",
    params(("id" = Uuid, Path, description = "The run")),
    responses(
        (status = 202, description = "The state queued for the commit", body = taskmesh_events::command::StatusQueued),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The run was not started by a forge push, or its connection is gone or has no status token, or a newer run of its workflow on its commit reports its status", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn resend_commit_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<taskmesh_events::command::StatusQueued>)> {
    caller.require_operator()?;
    let run_id: Uuid = id.parse().map_err(|_| ApiError::not_found("run"))?;
    // The forge shows a commit's latest status of a name: this run's state would replace a
    // newer run's (as the read side has the runs) that could itself be sent again.
    let newer: Option<Uuid> = sqlx::query_scalar(
        "SELECT n.id FROM runs r JOIN runs n
            ON n.tenant_id = r.tenant_id AND n.trigger->>'kind' = 'webhook'
           AND n.trigger->>'commit' = r.trigger->>'commit'
           AND n.trigger->>'forge' = r.trigger->>'forge'
           AND lower(n.trigger->>'repository') = lower(r.trigger->>'repository')
           AND n.workflow_name = r.workflow_name
           AND (n.trigger ? 'pull_request') = (r.trigger ? 'pull_request')
           AND n.trigger->>'reports_status' = 'true'
           AND (n.created_at, n.id) > (r.created_at, r.id)
           -- (A newer run whose connection is gone, or has no token, cannot be sent again.)
           AND EXISTS (SELECT 1 FROM repo_connections c WHERE c.tenant_id = n.tenant_id
                       AND c.id = (n.trigger->>'connection_id')::uuid AND c.status_token IS NOT NULL)
         WHERE r.tenant_id = $1 AND r.id = $2 AND r.trigger->>'kind' = 'webhook'
         ORDER BY n.created_at DESC, n.id DESC LIMIT 1",
    )
    .bind(&caller.tenant)
    .bind(run_id)
    .fetch_optional(&state.pool)
    .await?;
    if let Some(newer) = newer {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "run {newer} of the same workflow on the same commit is newer, and the forge shows the latest status: this run's would replace it; send that run's"
            ),
        ));
    }
    let cmd = taskmesh_events::command::ResendCommitStatus { tenant: caller.tenant.clone(), run_id };
    Ok((StatusCode::ACCEPTED, Json(state.ingest.resend_commit_status(&cmd).await?)))
}

/// Rerun an ended run: a new run with the same workflow and inputs that keeps the steps that
/// succeeded (shown as `succeeded` with `reason: reused from run …`) and runs the rest. The
/// earlier run and its attempts stay as they were.
#[utoipa::path(post, operation_id = "rerun_run", path = "/v1/runs/{id}/rerun", tag = "runs",
    params(("id" = Uuid, Path, description = "The run to rerun")),
    request_body = RerunRequest,
    responses(
        (status = 202, description = "The new run", body = RunAcceptedResponse, headers(("Location" = String))),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 409, description = "The run has not ended, or nothing failed", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn rerun(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    caller.require_operator()?;
    check_active_runs_quota(&state, &caller.tenant, 1).await?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("run"))?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let request: RerunRequest = body::json(&bytes)?;
    let accepted = state
        .ingest
        .rerun_run(&RerunRun {
            tenant: caller.tenant.clone(),
            run_id: id,
            from: request.from,
            key_id: Some(caller.key_id),
            refresh_cache: request.refresh_cache,
        })
        .await?;
    Ok(accepted_response(
        &state,
        RunAcceptedResponse { id: accepted.run_id, status: "queued".into(), seq: accepted.seq, duplicate: false },
    ))
}

/// Filters and paging for listing runs.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only runs with this status.
    pub status: Option<String>,
    /// Only runs of this workflow.
    pub workflow: Option<String>,
    /// Only runs started this way: `api`, `schedule`, `rerun`, `webhook` or `event`.
    pub trigger: Option<String>,
    /// Only runs created at or after this time (RFC 3339).
    pub created_after: Option<DateTime<Utc>>,
    /// Only runs created before this time (RFC 3339).
    pub created_before: Option<DateTime<Utc>>,
    /// Only runs with this label, `key=value`.
    pub label: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<Uuid>,
}

/// A run in a listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunSummary {
    pub id: Uuid,
    pub workflow: String,
    pub status: String,
    /// How the run started: `api`, `schedule`, `rerun`, `webhook` or `event`.
    pub trigger: String,
    pub labels: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A page of runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunPage {
    pub items: Vec<RunSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

/// List the tenant's runs, newest first.
#[utoipa::path(get, operation_id = "list_runs", path = "/v1/runs", tag = "runs", params(ListParams),
    responses(
        (status = 200, body = RunPage),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<RunPage>> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let limit = crate::page_limit(params.limit)?;
    let label = match params.label.as_deref().map(|l| l.split_once('=')) {
        None => None,
        Some(Some((k, v))) => Some(serde_json::json!({ k: v })),
        Some(None) => return Err(ApiError::new(ErrorCode::BadRequest, "label must be key=value")),
    };
    let mut rows = sqlx::query(
        "SELECT id, workflow_name, status, trigger->>'kind' AS trigger_kind, labels, created_at, finished_at FROM runs
         WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR workflow_name = $3)
           AND ($4::uuid IS NULL OR id < $4) AND ($6::text IS NULL OR trigger->>'kind' = $6)
           AND ($7::timestamptz IS NULL OR created_at >= $7) AND ($8::timestamptz IS NULL OR created_at < $8)
           AND ($9::jsonb IS NULL OR labels @> $9)
         ORDER BY id DESC LIMIT $5",
    )
    .bind(&caller.tenant)
    .bind(&params.status)
    .bind(&params.workflow)
    .bind(params.cursor)
    .bind(limit + 1)
    .bind(&params.trigger)
    .bind(params.created_after)
    .bind(params.created_before)
    .bind(label.map(sqlx::types::Json))
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = crate::cut_page(&mut rows, limit, |r| r.get::<Uuid, _>("id"));
    let items: Vec<RunSummary> = rows
        .iter()
        .map(|r| RunSummary {
            id: r.get("id"),
            workflow: r.get("workflow_name"),
            status: r.get("status"),
            trigger: r.get::<Option<String>, _>("trigger_kind").unwrap_or_default(),
            labels: r.get::<sqlx::types::Json<BTreeMap<String, String>>, _>("labels").0,
            created_at: r.get("created_at"),
            finished_at: r.get("finished_at"),
        })
        .collect();
    Ok(Json(RunPage { items, next_cursor }))
}
