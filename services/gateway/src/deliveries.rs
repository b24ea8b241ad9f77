//! `/v1/webhook-endpoints/{id}/failed-deliveries`: an endpoint's webhook deliveries that were
//! given up (dead letters: refused for good, or failed on their last attempt), and sending one
//! of them again; `/v1/webhook-endpoints/{id}/enable`: an endpoint disabled after failing for
//! too long, enabled again.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::ErrorCode;
use taskmesh_events::command::{EnableWebhookEndpoint, RetryWebhookDelivery};
use taskmesh_http::{ApiError, ApiResult};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/webhook-endpoints/{id}/failed-deliveries", get(list))
        .route("/v1/webhook-endpoints/{id}/failed-deliveries/retry", post(retry_all))
        .route("/v1/webhook-endpoints/{id}/failed-deliveries/{message_id}/retry", post(retry))
        .route("/v1/webhook-endpoints/{id}/enable", post(enable))
}

/// Longest message id looked up (the ids Taskmesh gives are UUIDs).
const MAX_MESSAGE_ID: usize = 200;

/// Paging.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FailedDeliveryParams {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(minimum = 0)]
    pub cursor: Option<i64>,
}

/// A webhook delivery that was given up.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailedDelivery {
    /// The delivery's `webhook-id`: the id of the event it tells of.
    pub message_id: String,
    /// The attempts made before it was given up.
    pub attempts: i32,
    /// Why the last attempt failed (the endpoint's answer, or what went wrong on the way).
    pub error: String,
    /// The body it carries, as it was to be sent.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub failed_at: DateTime<Utc>,
    /// When it was last sent again, if it was since it failed (a later failure shows as a
    /// later `failed_at`).
    pub retried_at: Option<DateTime<Utc>>,
    /// Its failure's event is no longer in the log (removed by hand, or aged out under a
    /// version before 2026-12-07: retention now keeps an endpoint's failures while the endpoint
    /// exists), and with it what would be sent: it can no longer be sent again.
    pub expired: bool,
}

/// A page of an endpoint's failed deliveries, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailedDeliveryPage {
    pub items: Vec<FailedDelivery>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<i64>,
}

/// The delivery is queued to be sent again.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetryAccepted {
    pub message_id: String,
    /// The sequence of the `WebhookDeliveryRetried` event: send it as `Taskmesh-Min-Seq` to
    /// read the list with it applied.
    pub seq: u64,
}

/// The log's first sequence still kept: a failure recorded below it was removed (by hand, or
/// aged out under a version before 2026-12-07; retention keeps an endpoint's failures now). 1
/// (none was) when the stream does not answer.
async fn first_kept(state: &AppState) -> u64 {
    crate::log_state(state).await.map_or(1, |s| s.first_sequence)
}

/// Whether a failure recorded at `seq` has aged out of a log whose first kept is `first`
/// (`retry_all`'s query says the same in SQL).
fn is_expired(seq: i64, first: u64) -> bool {
    (seq as u64) < first
}

/// Whether sending the failure recorded at `seq` again was not found because its event was
/// removed from the start of the log (the log is looked at only then: the usual answer costs
/// nothing more).
async fn aged_out<T>(state: &AppState, seq: i64, answer: &taskmesh_events::command::Reply<T>) -> bool {
    matches!(answer, Err(p) if p.code == ErrorCode::NotFound) && is_expired(seq, first_kept(state).await)
}

/// A failure whose event has aged out of the log.
fn expired() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "this failed delivery's event is no longer in the log: it can no longer be sent again",
    )
}

/// The tenant's endpoint `id`, or a 404.
async fn endpoint(state: &AppState, caller: &Caller, id: &str) -> ApiResult<Uuid> {
    let not_found = || ApiError::not_found("webhook endpoint");
    let id: Uuid = id.parse().map_err(|_| not_found())?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2)")
            .bind(&caller.tenant)
            .bind(id)
            .fetch_one(&state.pool)
            .await?;
    if !exists {
        return Err(not_found());
    }
    Ok(id)
}

/// List a webhook endpoint's failed deliveries (dead letters), newest first: those its
/// endpoint refused for good, or whose last attempt on the retry schedule failed. One entry
/// per delivery: a delivery sent again that fails again shows its latest failure.
#[utoipa::path(get, operation_id = "list_failed_deliveries", path = "/v1/webhook-endpoints/{id}/failed-deliveries",
    tag = "integrations",
    params(("id" = Uuid, Path), FailedDeliveryParams),
    responses(
        (status = 200, body = FailedDeliveryPage),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    params: Result<Query<FailedDeliveryParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<FailedDeliveryPage>> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let limit = crate::page_limit(params.limit)?;
    let id = endpoint(&state, &caller, &id).await?;
    let mut rows = sqlx::query(
        "SELECT message_id, attempts, error, payload, failed_at, retried_at, seq FROM webhook_delivery_failures
         WHERE tenant_id = $1 AND endpoint_id = $2 AND ($3::bigint IS NULL OR seq < $3)
         ORDER BY seq DESC LIMIT $4",
    )
    .bind(&caller.tenant)
    .bind(id)
    .bind(params.cursor)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let next_cursor = crate::cut_page(&mut rows, limit, |r| r.get::<i64, _>("seq"));
    // (An empty page asks the log nothing.)
    let first = if rows.is_empty() { 1 } else { first_kept(&state).await };
    let items = rows
        .iter()
        .map(|r| FailedDelivery {
            message_id: r.get("message_id"),
            attempts: r.get("attempts"),
            error: r.get("error"),
            payload: r.get::<sqlx::types::Json<serde_json::Value>, _>("payload").0,
            failed_at: r.get("failed_at"),
            retried_at: r.get("retried_at"),
            expired: is_expired(r.get("seq"), first),
        })
        .collect();
    Ok(Json(FailedDeliveryPage { items, next_cursor }))
}

/// Send a failed delivery again (operator): the same body under the same `webhook-id`, signed
/// afresh, on the retry schedule of every delivery; if it fails again, it is listed again with
/// its new failure. Asked again for the same failure within the queue's deduplication window
/// (`nats.duplicate_window_secs`, two minutes), it is sent once. One whose event has aged out
/// of the log (`expired`) is a 404 that says so.
#[utoipa::path(post, operation_id = "retry_failed_delivery",
    path = "/v1/webhook-endpoints/{id}/failed-deliveries/{message_id}/retry", tag = "integrations",
    params(("id" = Uuid, Path), ("message_id" = String, Path, description = "The failed delivery's `message_id`")),
    responses(
        (status = 202, body = RetryAccepted),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 409, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 503, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, message_id)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<RetryAccepted>)> {
    caller.require_operator()?;
    let id = endpoint(&state, &caller, &id).await?;
    let not_found = || ApiError::not_found("failed delivery");
    if message_id.len() > MAX_MESSAGE_ID {
        return Err(not_found());
    }
    let seq: Option<i64> = sqlx::query_scalar(
        "SELECT seq FROM webhook_delivery_failures WHERE tenant_id = $1 AND endpoint_id = $2 AND message_id = $3",
    )
    .bind(&caller.tenant)
    .bind(id)
    .bind(&message_id)
    .fetch_optional(&state.pool)
    .await?;
    let seq = seq.ok_or_else(not_found)?;
    let cmd = RetryWebhookDelivery {
        tenant: caller.tenant.clone(),
        endpoint_id: id,
        message_id: message_id.clone(),
        seq: seq as u64,
    };
    let answer = state.ingest.retry_webhook_delivery(&cmd).await;
    if aged_out(&state, seq, &answer).await {
        return Err(expired());
    }
    let done = answer?;
    Ok((StatusCode::ACCEPTED, Json(RetryAccepted { message_id, seq: done.seq })))
}

/// Which failed deliveries to send again.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryAllRequest {
    /// Only those that failed at or after this time; absent: all.
    pub since: Option<DateTime<Utc>>,
}

/// What was sent again.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetriedAll {
    /// How many deliveries were queued again (at most 100 a request).
    pub retried: usize,
    /// More are left to send again: ask again.
    pub more: bool,
    /// The sequence of the last `WebhookDeliveryRetried` (for `Taskmesh-Min-Seq`); absent when
    /// none was sent.
    pub seq: Option<u64>,
}

/// Most failed deliveries one `retry` of them all sends again.
pub const MAX_RETRY_ALL: i64 = 100;

/// Send an endpoint's failed deliveries again (operator), oldest first: those not sent again
/// since they failed and not `expired`, that failed at or after `since` if given, at most 100
/// a request (`more` says whether to ask again). Each goes as `POST …/{message_id}/retry`
/// sends one: the same body under the same `webhook-id`, on the retry schedule of every
/// delivery. For an endpoint back after an outage (enable a disabled one first: its
/// deliveries would fail at once).
#[utoipa::path(post, operation_id = "retry_failed_deliveries",
    path = "/v1/webhook-endpoints/{id}/failed-deliveries/retry", tag = "integrations",
    params(("id" = Uuid, Path)),
    request_body(content = Option<RetryAllRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = RetriedAll),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 409, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 503, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn retry_all(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<bytes::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<RetriedAll>> {
    caller.require_operator()?;
    let request: RetryAllRequest = taskmesh_http::body::json_or_default(&headers, body)?;
    let id = endpoint(&state, &caller, &id).await?;
    // Those whose events aged out of the log are passed over: they can no longer be sent
    // (`seq >= $5`: not `is_expired`).
    let first = first_kept(&state).await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT message_id, seq FROM webhook_delivery_failures
         WHERE tenant_id = $1 AND endpoint_id = $2 AND retried_at IS NULL AND ($3::timestamptz IS NULL OR failed_at >= $3)
           AND seq >= $5
         ORDER BY seq LIMIT $4",
    )
    .bind(&caller.tenant)
    .bind(id)
    .bind(request.since)
    .bind(MAX_RETRY_ALL + 1)
    .bind(first as i64)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > MAX_RETRY_ALL;
    let (mut retried, mut seq) = (0, None);
    for (message_id, failed) in rows.into_iter().take(MAX_RETRY_ALL as usize) {
        let cmd =
            RetryWebhookDelivery { tenant: caller.tenant.clone(), endpoint_id: id, message_id, seq: failed as u64 };
        let answer = state.ingest.retry_webhook_delivery(&cmd).await;
        // One that aged out since the query is passed over too.
        if aged_out(&state, failed, &answer).await {
            continue;
        }
        let done = answer?;
        retried += 1;
        seq = Some(done.seq);
    }
    Ok(Json(RetriedAll { retried, more, seq }))
}

/// The endpoint is enabled.
#[derive(Debug, Serialize, ToSchema)]
pub struct Enabled {
    pub id: Uuid,
    /// The sequence of the `WebhookEndpointEnabled` event (for `Taskmesh-Min-Seq`).
    pub seq: u64,
}

/// Enable a webhook endpoint again (admin): one disabled after every delivery to it had failed
/// for too long (`disabled_at` in `GET /v1/webhook-endpoints`). Runs' ends are sent to it again
/// from now on, and its failures so far no longer count toward disabling it; those given up
/// meanwhile can be sent again from its failed deliveries. Enabling one that is not disabled
/// only restarts its count of failures.
#[utoipa::path(post, operation_id = "enable_webhook_endpoint", path = "/v1/webhook-endpoints/{id}/enable",
    tag = "integrations",
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, body = Enabled),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 409, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn enable(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Enabled>> {
    caller.require_admin()?;
    let id = endpoint(&state, &caller, &id).await?;
    let done = state
        .ingest
        .enable_webhook_endpoint(&EnableWebhookEndpoint { tenant: caller.tenant.clone(), endpoint_id: id })
        .await?;
    Ok(Json(Enabled { id, seq: done.seq }))
}
