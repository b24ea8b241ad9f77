//! `/v1/schedules`: run workflows on cron expressions.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::command::{
    BackfillSchedule, Backfilled, CreateSchedule, DeleteSchedule, MAX_BACKFILL_TICKS, ToggleSchedule, TriggerSchedule,
    UpdateSchedule,
};
use taskmesh_events::schedule::ScheduleSpec;
use taskmesh_http::{ApiError, ApiResult, body};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/schedules", post(create).get(list))
        .route("/v1/schedules/{id}", get(get_one).delete(delete).patch(update))
        .route("/v1/schedules/{id}/pause", post(pause))
        .route("/v1/schedules/{id}/trigger", post(trigger))
        .route("/v1/schedules/{id}/backfill", post(backfill))
        .route("/v1/schedules/{id}/resume", post(resume))
}

/// A schedule and what it did last.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleView {
    pub id: Uuid,
    /// `{cron, timezone, workflow, inputs, overlap, catch_up, catch_up_limit}`.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    pub paused: bool,
    pub last_tick: Option<DateTime<Utc>>,
    pub last_run_id: Option<Uuid>,
    /// Ticks handled so far (started or skipped).
    pub ticks: i64,
    /// The next tick, unless paused.
    pub next_tick: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The log sequence of its last event (a tick too): `GET /v1/schedules/{id}` answers it as
    /// its `ETag`, and `PATCH` and `DELETE` take it in `If-Match`. None for a schedule last changed before
    /// versions were kept, until its next event.
    pub version: Option<u64>,
}

/// A created schedule.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleCreatedResponse {
    pub id: String,
    pub seq: u64,
}

/// Create a schedule. Body: `{"cron": "*/5 * * * *", "timezone": "Europe/Paris", "workflow":
/// "nightly" | {definition}, "inputs": {}, "overlap": "skip" | "allow" | "cancel_previous",
/// "catch_up": "none" | "last" | "all", "catch_up_limit": 100}`.
#[utoipa::path(post, operation_id = "create_schedule", path = "/v1/schedules", tag = "schedules", request_body(content = Object, content_type = "application/json"),
    responses(
        (status = 201, body = ScheduleCreatedResponse, headers(("Location" = String, description = "The schedule's URL"))),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such stored workflow", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid cron, time zone, workflow or inputs", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<axum::response::Response> {
    caller.require_operator()?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let spec: ScheduleSpec = body::json(&bytes)?;
    let created = state.ingest.create_schedule(&CreateSchedule { tenant: caller.tenant, spec }).await?;
    let path = format!("/v1/schedules/{}", created.id);
    Ok(crate::located(
        &state,
        StatusCode::CREATED,
        Json(ScheduleCreatedResponse { id: created.id, seq: created.seq }),
        &path,
    ))
}

fn view(row: &sqlx::postgres::PgRow) -> ScheduleView {
    let spec: serde_json::Value = row.get::<sqlx::types::Json<serde_json::Value>, _>("spec").0;
    let paused: bool = row.get("paused");
    let last_tick: Option<DateTime<Utc>> = row.get("last_tick");
    let next_tick = (!paused)
        .then(|| serde_json::from_value::<ScheduleSpec>(spec.clone()).ok())
        .flatten()
        .and_then(|s| s.next_after(last_tick.unwrap_or_default().max(Utc::now())));
    ScheduleView {
        id: row.get("id"),
        spec,
        paused,
        last_tick,
        last_run_id: row.get("last_run_id"),
        ticks: row.get("ticks"),
        next_tick,
        created_at: row.get("created_at"),
        version: crate::row_version(row),
    }
}

/// The tenant's schedules.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleList {
    pub items: Vec<ScheduleView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<Uuid>,
}

/// List schedules, newest first.
#[utoipa::path(get, operation_id = "list_schedules", path = "/v1/schedules", tag = "schedules",
    params(crate::PageParams),
    responses((status = 200, body = ScheduleList), (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"), (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller, page: crate::Page) -> ApiResult<Json<ScheduleList>> {
    let sql =
        "SELECT * FROM schedules WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3";
    let (rows, next_cursor) = page.of_tenant::<Uuid>(&state.pool, sql, &caller.tenant, "id").await?;
    Ok(Json(ScheduleList { items: rows.iter().map(view).collect(), next_cursor }))
}

/// Read a schedule. Its `ETag` is its version (changed by every event of it, a tick too; its
/// `next_tick`, computed at the read, aside), which `PATCH` takes in `If-Match`.
#[utoipa::path(get, operation_id = "get_schedule", path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = Uuid, Path), ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier read: 304 if the schedule has no event since")),
    responses(
        (status = 200, body = ScheduleView, headers(("ETag" = String, description = "The schedule's version, as `\"{version}\"`"))),
        (status = 304, description = "Not modified since the ETag given"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<axum::response::Response> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("schedule"))?;
    let row = sqlx::query("SELECT * FROM schedules WHERE tenant_id = $1 AND id = $2")
        .bind(&caller.tenant)
        .bind(id)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| ApiError::not_found("schedule"))?;
    let view = view(&row);
    Ok(crate::versioned(&headers, view.version, view))
}

async fn toggle(
    state: AppState,
    caller: Caller,
    id: String,
    pause: bool,
) -> ApiResult<(StatusCode, Json<ScheduleCreatedResponse>)> {
    caller.require_operator()?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("schedule"))?;
    let done = state.ingest.toggle_schedule(&ToggleSchedule { tenant: caller.tenant, schedule_id: id, pause }).await?;
    Ok((StatusCode::ACCEPTED, Json(ScheduleCreatedResponse { id: done.id, seq: done.seq })))
}

/// Pause a schedule: no tick fires until it is resumed.
#[utoipa::path(post, operation_id = "pause_schedule", path = "/v1/schedules/{id}/pause", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 202, body = ScheduleCreatedResponse), (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<ScheduleCreatedResponse>)> {
    toggle(state, caller, id, true).await
}

/// Resume a paused schedule from its next tick.
#[utoipa::path(post, operation_id = "resume_schedule", path = "/v1/schedules/{id}/resume", tag = "schedules", params(("id" = Uuid, Path)),
    responses((status = 202, body = ScheduleCreatedResponse), (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<ScheduleCreatedResponse>)> {
    toggle(state, caller, id, false).await
}

/// Changes to a schedule (a JSON merge patch, RFC 7396, of its spec): each field given replaces
/// the schedule's, one left out keeps it, and `null` puts a field back to its default. `inputs`
/// (and an inline `workflow`) are merged in turn: `{"inputs": {"env": "staging"}}` changes one
/// input and keeps the others; `{"inputs": null}` removes them all.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; it is read as JSON and merged by ingest
pub struct SchedulePatch {
    /// A new cron expression. Cannot be `null`.
    pub cron: Option<String>,
    /// An IANA time zone; `null`: UTC.
    pub timezone: Option<String>,
    /// A stored workflow's name (`name` or `name@version`) or an inline definition. Cannot be
    /// `null`.
    #[schema(value_type = Option<Object>)]
    pub workflow: Option<serde_json::Value>,
    /// Inputs to set (each `null` removes one); `null`: none.
    #[schema(value_type = Option<Object>)]
    pub inputs: Option<serde_json::Value>,
    /// `skip`, `allow` or `cancel_previous`; `null`: `skip`.
    pub overlap: Option<String>,
    /// `none`, `last` or `all`; `null`: `none`.
    pub catch_up: Option<String>,
    /// 1 to 10,000; `null`: 100.
    pub catch_up_limit: Option<u32>,
}

/// Change a schedule in place: its cron expression, time zone, workflow, inputs, overlap or
/// catch-up. It keeps its id, ticks, last run and pause. The new spec ticks from its first tick
/// after the change; ticks it would have had before are not caught up. Checked as a new schedule
/// is; a patch that changes nothing appends nothing (and answers the last `seq`). With
/// `If-Match`, only a schedule at a version it names is changed (`412` otherwise). The answer's
/// `seq`, also its `ETag`, is the schedule's version after the change.
#[utoipa::path(patch, operation_id = "update_schedule", path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, description = "The schedule's ETag as last read: the change is made only if it is still at that version")),
    request_body(content(
        (SchedulePatch = "application/merge-patch+json"),
        (SchedulePatch = "application/json"),
    )),
    responses(
        (status = 200, body = ScheduleCreatedResponse, headers(("ETag" = String, description = "The schedule's version after the change"))),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such schedule, or no such stored workflow", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 412, description = "The schedule is not at a version If-Match names", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid cron, time zone, workflow or inputs", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<axum::response::Response> {
    caller.require_operator()?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("schedule"))?;
    let if_match = crate::if_match(&headers)?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let patch: serde_json::Value = body::json(&bytes)?;
    let cmd = UpdateSchedule { tenant: caller.tenant, schedule_id: id, patch, if_match };
    let done = state.ingest.update_schedule(&cmd).await?;
    Ok(crate::changed(done.seq, ScheduleCreatedResponse { id: done.id, seq: done.seq }))
}

/// Run a schedule's workflow with its inputs now, paused or not, beside its ticks (whatever its
/// overlap policy). The run's trigger is `{"kind": "schedule", "schedule_id", "tick": <now>,
/// "manual": true}`, and it becomes the schedule's last run, which a tick's overlap policy then
/// looks at. Answered as `POST /v1/runs` is.
#[utoipa::path(post, operation_id = "trigger_schedule", path = "/v1/schedules/{id}/trigger", tag = "schedules",
    params(("id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "Triggering again with the same key returns the first run")),
    responses(
        (status = 202, body = crate::runs::RunAcceptedResponse, headers(("Location" = String, description = "The run's URL"))),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such schedule (answered before the quota's 403), or its stored workflow is gone", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 422, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<axum::response::Response> {
    caller.require_operator()?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("schedule"))?;
    quota_or_not_found(&state, &caller.tenant, id, 1).await?;
    let accepted = state
        .ingest
        .trigger_schedule(&TriggerSchedule {
            tenant: caller.tenant,
            schedule_id: id,
            idempotency_key: crate::runs::idempotency_key(&headers)?,
            traceparent: taskmesh_telemetry::current_traceparent(),
        })
        .await?;
    Ok(crate::runs::accepted_response(&state, accepted.into()))
}

/// A range of a schedule's past ticks to run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackfillRequest {
    /// The first tick's earliest time (included).
    pub from: DateTime<Utc>,
    /// The last tick's latest time (included); not in the future.
    pub to: DateTime<Utc>,
}

/// Run a schedule's ticks from `from` to `to` (at most 100 ticks), paused or not, all at once
/// whatever its overlap policy (a concurrency group in the workflow holds them back). Each is
/// the run its timer starts (the same id): a tick that has its run (fired, or backfilled
/// before) is not run again, so a backfill stopped midway can be sent again. The runs'
/// trigger is `{"kind": "schedule", "schedule_id", "tick", "manual": true}`.
#[utoipa::path(post, operation_id = "backfill_schedule", path = "/v1/schedules/{id}/backfill", tag = "schedules",
    params(("id" = Uuid, Path)),
    request_body = BackfillRequest,
    responses(
        (status = 202, body = Backfilled),
        (status = 400, description = "A bad range: from after to, to in the future, or more than 100 ticks, or from before 1970", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such schedule (answered before the quota's 403), or its stored workflow is gone", body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 422, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn backfill(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Backfilled>)> {
    caller.require_operator()?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("schedule"))?;
    let (_, bytes) = body::read(&headers, body, false)?;
    let range: BackfillRequest = body::json(&bytes)?;
    let cmd = BackfillSchedule { tenant: caller.tenant.clone(), schedule_id: id, from: range.from, to: range.to };
    cmd.check_range(Utc::now())?;
    backfill_quota(&state, &caller.tenant, id, &cmd).await?;
    Ok((StatusCode::ACCEPTED, Json(state.ingest.backfill_schedule(&cmd).await?)))
}

/// A backfill's runs count against the quota of runs not yet ended: the ticks of its range (as
/// the read side has the schedule; as many as a backfill may start, before it has it) whose run
/// does not exist yet.
async fn backfill_quota(state: &AppState, tenant: &str, id: Uuid, cmd: &BackfillSchedule) -> ApiResult<()> {
    let spec = sqlx::query_scalar::<_, sqlx::types::Json<serde_json::Value>>(
        "SELECT spec FROM schedules WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    // Read as it is written, or (a field of a later version, say) left to ingest.
    let new = match spec.map(|j| serde_json::from_value::<ScheduleSpec>(j.0)) {
        // Not on the read side yet (just created), or no such schedule (see below).
        None => MAX_BACKFILL_TICKS as i64,
        Some(Err(_)) => return Ok(()),
        Some(Ok(spec)) => {
            let ticks = spec.ticks(cmd.from, cmd.to, MAX_BACKFILL_TICKS + 1);
            if ticks.len() > MAX_BACKFILL_TICKS {
                return Ok(()); // ingest refuses it
            }
            let ids: Vec<Uuid> = ticks.iter().map(|t| taskmesh_ingest::tick_run_id(tenant, id, *t)).collect();
            let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE tenant_id = $1 AND id = ANY($2)")
                .bind(tenant)
                .bind(&ids)
                .fetch_one(&state.pool)
                .await?;
            ids.len() as i64 - existing
        }
    };
    if new > 0 {
        quota_or_not_found(state, tenant, id, new).await?;
    }
    Ok(())
}

/// The quota of runs not yet ended, for `n` more runs of schedule `id`. Where it refuses, a
/// schedule the log does not have is answered `404` first, as documented (where it does not,
/// ingest answers that).
async fn quota_or_not_found(state: &AppState, tenant: &str, id: Uuid, n: i64) -> ApiResult<()> {
    match crate::runs::check_active_runs_quota(state, tenant, n).await {
        Err(over) if on_log(state, tenant, id).await? => Err(over),
        Err(_) => Err(ApiError::not_found("schedule")),
        Ok(()) => Ok(()),
    }
}

/// Whether the log has schedule `id` (its last event is not its deletion): for a schedule the
/// read side does not have, as it may not yet.
async fn on_log(state: &AppState, tenant: &str, id: Uuid) -> ApiResult<bool> {
    let subject = state.bus.namespace().schedule(tenant, id);
    let last = state.bus.last(&subject).await.map_err(taskmesh_events::Problem::from)?;
    Ok(last.is_some_and(|s| !s.envelope.event.is_deletion()))
}

/// Delete a schedule: no tick fires after it, and it is no longer listed. Runs it started are
/// kept. Deleting a deleted schedule is fine. With `If-Match`, only a schedule at a version it
/// names is deleted (`412` otherwise; one deleted already stays so, `204`).
#[utoipa::path(delete, operation_id = "delete_schedule", path = "/v1/schedules/{id}", tag = "schedules",
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, description = "The schedule's ETag as last read: deleted only if it is still at that version")),
    responses(
        (status = 204, description = "Deleted (or already gone)", headers(("Taskmesh-Seq" = u64, description = "The write's seq: send it as Taskmesh-Min-Seq to read it"))),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 412, description = "The schedule is not at a version If-Match names", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<crate::Written> {
    caller.require_operator()?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("schedule"))?;
    let if_match = crate::if_match(&headers)?;
    let written =
        state.ingest.delete_schedule(&DeleteSchedule { tenant: caller.tenant, schedule_id: id, if_match }).await?;
    Ok(crate::Written(written.seq))
}
