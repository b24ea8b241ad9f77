//! `GET /v1/runs/{id}/events`: a run's events as Server-Sent Events, live, straight from the
//! event log. Each SSE event's `id` is the event's stream sequence (`{seq}.{n}` for the n-th of
//! a commit's events but its last), so a client that reconnects with `Last-Event-ID` resumes
//! exactly after the last event it saw. The stream ends with an `end` event once the run has
//! ended.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::Event as SseEvent;
use axum::routing::get;
use sqlx::Row;
use taskmesh_events::RunKey;
use taskmesh_http::{ApiError, ApiResult};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/runs/{id}/events", get(run_events))
}

/// Follow a run's events as Server-Sent Events: `event` is the event type (`RunSubmitted`,
/// `StepStarted`, …), `data` the whole event envelope as JSON, `id` its stream sequence (events
/// appended together share a sequence: all but the last of them get `{seq}.{n}`, n counting
/// from 0). Reconnecting with `Last-Event-ID` resumes after that event. After the run's final
/// event comes an `end` event and the stream closes.
#[utoipa::path(get, operation_id = "stream_run_events", path = "/v1/runs/{id}/events", tag = "runs",
    params(
        ("id" = Uuid, Path, description = "Run id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event (an SSE `id` seen before)"),
    ),
    responses(
        (status = 200, description = "An event stream: each event's data is an event envelope (see proto/envelope.schema.json)", content_type = "text/event-stream", body = serde_json::Value),
        (status = 404, description = "No such run in the caller's tenant", body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn run_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let run_id: Uuid = id.parse().map_err(|_| ApiError::not_found("run"))?;
    if run_status(&state, &caller.tenant, run_id).await?.is_none() {
        return Err(ApiError::not_found("run"));
    }
    let (after, after_part) = match crate::last_event_id(&headers)? {
        None => (0, None),
        // Within a commit: from the commit again, past the parts seen.
        Some((seq, Some(part))) => (seq - 1, Some((seq, part))),
        Some((seq, None)) => (seq, None),
    };
    let slot = state.streams.take(&caller.tenant)?;
    let subject = state.bus.namespace().run(&RunKey { tenant: caller.tenant.clone(), run_id });
    let messages = crate::logs::ordered_on(&state, state.bus.namespace().events_stream(), &subject, after).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
    tokio::spawn(async move {
        let _slot = slot;
        let to_event = |msg: &async_nats::jetstream::Message| {
            let Ok(commit) = taskmesh_bus::decode(msg) else { return Vec::new() };
            commit
                .iter()
                .filter(|s| after_part.is_none_or(|(seq, part)| s.seq != seq || s.part > part))
                .filter_map(|s| {
                    let id = if s.ends_commit() { s.seq.to_string() } else { format!("{}.{}", s.seq, s.part) };
                    let event = SseEvent::default().id(id).event(s.envelope.type_name()).json_data(&s.envelope).ok()?;
                    Some((event, s.envelope.event.is_run_terminal()))
                })
                .collect()
        };
        let ended = || async {
            run_status(&state, &caller.tenant, run_id)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| !matches!(s.as_str(), "queued" | "running"))
        };
        // Broken off, the stream just ends: the client opens it again from its last event.
        if crate::logs::follow_until_ended(messages, &tx, to_event, ended).await {
            let _ = tx.send(SseEvent::default().event("end").data("the run has ended")).await;
        }
    });
    Ok(crate::logs::sse(rx))
}

async fn run_status(state: &AppState, tenant: &str, run_id: Uuid) -> Result<Option<String>, ApiError> {
    Ok(sqlx::query("SELECT status FROM runs WHERE tenant_id = $1 AND id = $2")
        .bind(tenant)
        .bind(run_id)
        .fetch_optional(&state.pool)
        .await?
        .map(|r| r.get("status")))
}
