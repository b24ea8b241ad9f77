//! `GET /v1/runs/{id}/steps/{step}/logs`: a step's output lines, paged, or followed live as
//! Server-Sent Events until the step has ended.

use std::convert::Infallible;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::command::LogLine;
use taskmesh_events::{ErrorCode, RunKey};
use taskmesh_http::{ApiError, ApiResult};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/runs/{id}/steps/{step}/logs", get(logs))
}

/// Paging and following.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    /// Lines after this `seq` (the previous page's `next`, or an SSE event id).
    pub after: Option<u64>,
    /// Page size, 1 to 1000 (default 500).
    pub limit: Option<usize>,
    /// Stream lines as Server-Sent Events until the step has ended.
    pub follow: Option<bool>,
}

/// One output line.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogEntry {
    /// Position in the log stream: pass as `after` to continue.
    pub seq: u64,
    pub attempt: u32,
    /// Line number within the attempt.
    pub n: u64,
    pub ts: chrono::DateTime<chrono::Utc>,
    /// `stdout`, `stderr` or `system`.
    pub stream: String,
    pub line: String,
}

/// A page of lines.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogPage {
    pub lines: Vec<LogEntry>,
    /// `after` for the next page; absent when there were no more lines yet.
    pub next: Option<u64>,
}

fn entry(seq: u64, payload: &[u8]) -> Option<LogEntry> {
    let l: LogLine = serde_json::from_slice(payload).ok()?;
    let stream = serde_json::to_value(l.stream).ok()?.as_str()?.to_string();
    Some(LogEntry { seq, attempt: l.attempt, n: l.n, ts: l.ts, stream, line: l.line })
}

/// Read a step's output: a page of lines, or with `follow=true` a live Server-Sent Events
/// stream (`id` = `seq`, so `Last-Event-ID` resumes) that ends with an `end` event once the step
/// has ended. Lines are kept for a bounded time and size (see operations).
#[utoipa::path(get, operation_id = "get_step_logs", path = "/v1/runs/{id}/steps/{step}/logs", tag = "runs",
    params(("id" = Uuid, Path), ("step" = String, Path), LogParams),
    responses(
        (status = 200, description = "A page of lines, or an event stream with follow=true", body = LogPage),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 404, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, step)): Path<(String, String)>,
    headers: HeaderMap,
    params: Result<Query<LogParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let run_id: Uuid = id.parse().map_err(|_| ApiError::not_found("run"))?;
    let exists = sqlx::query("SELECT 1 FROM steps WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3")
        .bind(&caller.tenant)
        .bind(run_id)
        .bind(&step)
        .fetch_optional(&state.pool)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("step"));
    }
    let resumed = match crate::last_event_id(&headers)? {
        Some((seq, None)) => Some(seq),
        Some((_, Some(_))) => {
            return Err(ApiError::new(ErrorCode::BadRequest, "Last-Event-ID must be a log line's sequence"));
        }
        None => None,
    };
    let after = params.after.or(resumed).unwrap_or(0);
    let limit = params.limit.unwrap_or(500);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(ErrorCode::BadRequest, "limit must be 1 to 1000"));
    }
    let key = RunKey { tenant: caller.tenant.clone(), run_id };
    let subject = state.bus.namespace().log(&key, &step);
    if params.follow.unwrap_or(false) {
        let slot = state.streams.take(&caller.tenant)?;
        // Opened before answering: a stream that cannot be read is a 503, not an empty stream.
        let messages = ordered(&state, &subject, after).await?;
        return Ok(follow(state, caller.tenant, run_id, step, messages, slot).into_response());
    }
    Ok(Json(page(&state, &subject, after, limit).await?).into_response())
}

/// An ordered consumer of `subject` in `stream`, from just after sequence `after`.
pub(crate) async fn ordered_on(
    state: &AppState,
    stream: String,
    subject: &str,
    after: u64,
) -> Result<async_nats::jetstream::consumer::pull::Ordered, ApiError> {
    let unavailable = |e: String| {
        tracing::warn!(error = %e, "reading a stream");
        ApiError::new(ErrorCode::Unavailable, "the stream is unavailable; retry")
    };
    let stream = state.bus.jetstream().get_stream_no_info(stream).await.map_err(|e| unavailable(e.to_string()))?;
    let deliver_policy = match after {
        0 => DeliverPolicy::All,
        _ => DeliverPolicy::ByStartSequence {
            start_sequence: after
                .checked_add(1)
                .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, "no sequence comes after that one"))?,
        },
    };
    let consumer = stream
        .create_consumer(OrderedConfig { filter_subject: subject.to_string(), deliver_policy, ..Default::default() })
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    consumer.messages().await.map_err(|e| unavailable(e.to_string()))
}

async fn ordered(
    state: &AppState,
    subject: &str,
    after: u64,
) -> Result<async_nats::jetstream::consumer::pull::Ordered, ApiError> {
    ordered_on(state, state.bus.namespace().logs_stream(), subject, after).await
}

async fn page(state: &AppState, subject: &str, after: u64, limit: usize) -> Result<LogPage, ApiError> {
    let stream = state.bus.jetstream().get_stream_no_info(state.bus.namespace().logs_stream()).await.ok();
    let last = match stream {
        Some(s) => s.get_last_raw_message_by_subject(subject).await.map(|m| m.sequence).unwrap_or(0),
        None => 0,
    };
    if last <= after {
        return Ok(LogPage { lines: Vec::new(), next: None });
    }
    let mut messages = ordered(state, subject, after).await?;
    let mut lines = Vec::new();
    while lines.len() < limit {
        let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await else { break };
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        lines.extend(entry(seq, &msg.payload));
        if seq >= last {
            break;
        }
    }
    let next = lines.last().map(|l| l.seq);
    Ok(LogPage { lines, next })
}

/// Streams lines as they come; ends once the step has ended and every line is out.
fn follow(
    state: AppState,
    tenant: String,
    run_id: Uuid,
    step: String,
    messages: async_nats::jetstream::consumer::pull::Ordered,
    slot: crate::places::Place,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
    tokio::spawn(async move {
        let _slot = slot;
        let to_event = |msg: &async_nats::jetstream::Message| {
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            let Some(e) = entry(seq, &msg.payload) else { return Vec::new() };
            SseEvent::default()
                .id(seq.to_string())
                .event("line")
                .json_data(&e)
                .ok()
                .map(|e| (e, false))
                .into_iter()
                .collect()
        };
        // Executors publish every line before reporting, so once the step has ended, what is
        // left is already in the stream.
        let ended = || async {
            sqlx::query("SELECT status FROM steps WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3")
                .bind(&tenant)
                .bind(run_id)
                .bind(&step)
                .fetch_optional(&state.pool)
                .await
                .ok()
                .flatten()
                .map(|r| r.get::<String, _>("status"))
                .is_some_and(|s| !matches!(s.as_str(), "queued" | "running"))
        };
        // Broken off, the stream just ends: the client opens it again from its last line.
        if follow_until_ended(messages, &tx, to_event, ended).await {
            let _ = tx.send(SseEvent::default().event("end").data("the step has ended")).await;
        }
    });
    sse(rx)
}

/// Sends each message of `messages` as the events `to_event` makes of it (the flag says it
/// was the last there will be) until the client goes away, the last one is sent, or `ended`
/// says the source has ended and a short wait brings nothing more. Says whether it got to the
/// end (not when the client went away or the messages broke off: then the client must not be
/// told the source has ended).
pub(crate) async fn follow_until_ended<F, E, Fut>(
    mut messages: async_nats::jetstream::consumer::pull::Ordered,
    tx: &tokio::sync::mpsc::Sender<SseEvent>,
    to_event: F,
    ended: E,
) -> bool
where
    F: Fn(&async_nats::jetstream::Message) -> Vec<(SseEvent, bool)>,
    E: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut draining = false;
    let until = tokio::time::Instant::now() + MAX_STREAM_LIFETIME;
    loop {
        if tokio::time::Instant::now() >= until {
            return false; // as if broken off: the client opens it again from its last event
        }
        let wait = Duration::from_millis(if draining { 300 } else { 500 });
        match tokio::time::timeout(wait, messages.next()).await {
            Ok(Some(Ok(msg))) => {
                for (event, last) in to_event(&msg) {
                    if tx.send(event).await.is_err() {
                        return false; // the client went away
                    }
                    if last {
                        return true;
                    }
                }
            }
            Ok(_) => {
                tracing::debug!("a followed stream broke off");
                return false;
            }
            Err(_) if tx.is_closed() => return false,
            Err(_) if draining => return true,
            Err(_) => draining = ended().await,
        }
    }
}

/// Most streams (a run's events, a step's log followed) one gateway serves at once.
pub const MAX_STREAMS: usize = 10_000;
/// Most of them one tenant has open on one gateway, so one tenant cannot take them all.
pub const MAX_TENANT_STREAMS: usize = 1_000;
/// Longest one stream lasts: then it ends as a stream broken off does, and the client opens it
/// again from its last event (`Last-Event-ID`), so a stream on a run that never ends does not
/// hold its place (and look at the run twice a second) for ever.
pub const MAX_STREAM_LIFETIME: Duration = Duration::from_secs(3600);

/// A Server-Sent Events answer of what arrives on `rx`.
pub(crate) fn sse(rx: tokio::sync::mpsc::Receiver<SseEvent>) -> Response {
    let events =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
