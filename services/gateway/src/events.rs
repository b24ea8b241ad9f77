//! `POST /v1/events`: generic event triggers. A CloudEvents 1.0 event, in structured mode
//! (`Content-Type: application/cloudevents+json`, or `application/json` without `ce-*` headers:
//! the whole event as JSON) or binary mode
//! (`ce-*` headers, the body as `data`), starts a run of every stored workflow whose
//! `on.events` has a trigger with the event's `type` and whose filter, if any, holds.
//! Posting the same event again (same `source` and `id`) starts nothing new.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::command::SubmitRun;
use taskmesh_events::expr::Scope;
use taskmesh_events::workflow::WorkflowDef;
use taskmesh_events::{ErrorCode, Trigger};
use taskmesh_http::{ApiError, ApiResult};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/events", post(publish))
}

/// A CloudEvents 1.0 event in structured mode.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CloudEvent {
    /// Must be `1.0`.
    pub specversion: String,
    /// Identifies the event; with `source`, unique per event.
    pub id: String,
    /// Where the event comes from (a URI reference).
    pub source: String,
    /// The kind of event, e.g. `com.example.order.created`.
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    /// The payload: any JSON value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub data: Option<serde_json::Value>,
    /// The payload, base64-encoded, for binary data (instead of `data`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// Extension attributes.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

/// A run an event started (or had started before, for a repeated event).
#[derive(Debug, Serialize, ToSchema)]
pub struct TriggeredRun {
    pub workflow: String,
    pub workflow_version: i32,
    pub run_id: Uuid,
    /// Stream sequence of the run's `RunSubmitted`.
    pub seq: u64,
    /// True when this event had already started this run.
    pub duplicate: bool,
}

/// What an event started.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventAccepted {
    /// Runs of the workflows whose triggers matched.
    pub runs: Vec<TriggeredRun>,
    /// Triggers whose filter or inputs could not be evaluated for this event, with why.
    pub errors: Vec<TriggerError>,
}

/// A trigger that failed to evaluate.
#[derive(Debug, Serialize, ToSchema)]
pub struct TriggerError {
    pub workflow: String,
    pub message: String,
}

/// The longest CloudEvents attribute accepted.
const MAX_ATTRIBUTE: usize = 1024;

/// Reads the event from either content mode.
fn parse(headers: &HeaderMap, bytes: &Bytes) -> Result<CloudEvent, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    // Structured mode; a structured event sent as plain `application/json` (no `ce-*` headers)
    // is taken as one too, as many senders do.
    let structured = essence == "application/cloudevents+json"
        || (essence == "application/json" && headers.get("ce-specversion").is_none());
    let event = if structured {
        serde_json::from_slice::<CloudEvent>(bytes)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("not a structured CloudEvent: {e}")))?
    } else if let Some(spec) = headers.get("ce-specversion") {
        let attr = |name: &str| -> Result<Option<String>, ApiError> {
            headers
                .get(name)
                .map(|v| {
                    v.to_str()
                        .map(str::to_owned)
                        .map_err(|_| ApiError::new(ErrorCode::BadRequest, format!("{name} must be ASCII")))
                })
                .transpose()
        };
        let required = |name: &str| -> Result<String, ApiError> {
            attr(name)?
                .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, format!("binary mode needs a {name} header")))
        };
        let data = if bytes.is_empty() {
            None
        } else if essence == "application/json" || essence.ends_with("+json") {
            Some(
                serde_json::from_slice(bytes)
                    .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("malformed JSON data: {e}")))?,
            )
        } else {
            let text = std::str::from_utf8(bytes)
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "binary data must be UTF-8 text or JSON"))?;
            Some(serde_json::Value::String(text.to_string()))
        };
        CloudEvent {
            specversion: spec.to_str().unwrap_or_default().to_string(),
            id: required("ce-id")?,
            source: required("ce-source")?,
            event_type: required("ce-type")?,
            subject: attr("ce-subject")?,
            time: attr("ce-time")?,
            datacontenttype: (!content_type.is_empty()).then(|| content_type.to_string()),
            dataschema: attr("ce-dataschema")?,
            data,
            data_base64: None,
            extensions: Default::default(),
        }
    } else {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send a structured CloudEvent (application/cloudevents+json or application/json) or a binary one (ce-* headers)",
        ));
    };
    if event.specversion != "1.0" {
        return Err(ApiError::new(ErrorCode::BadRequest, format!("specversion '{}' is not 1.0", event.specversion)));
    }
    for (name, value) in [("id", &event.id), ("source", &event.source), ("type", &event.event_type)] {
        if value.is_empty() || value.len() > MAX_ATTRIBUTE {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("{name} must be 1 to {MAX_ATTRIBUTE} characters"),
            ));
        }
    }
    Ok(event)
}

/// Publish a CloudEvent: every stored workflow with a matching trigger starts a run. Structured
/// mode: `Content-Type: application/cloudevents+json` and the event as JSON. Binary mode: the
/// data as the body (JSON or text) with `ce-specversion`, `ce-id`, `ce-source` and `ce-type`
/// headers.
#[utoipa::path(post, operation_id = "publish_event", path = "/v1/events", tag = "events",
    request_body(content(
        (CloudEvent = "application/cloudevents+json"),
        (Object = "application/json"),
    )),
    responses(
        (status = 202, description = "The runs the event started", body = EventAccepted),
    ),
    security(("bearer" = [])))]
pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<EventAccepted>)> {
    caller.require_operator()?;
    let bytes = body.map_err(taskmesh_http::body::rejection)?;
    let event = parse(&headers, &bytes)?;
    let event_json = serde_json::to_value(&event).map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
    // The latest version of each stored workflow with a trigger of this type.
    let rows = sqlx::query(
        "SELECT name, version, definition FROM (
            SELECT DISTINCT ON (name) name, version, definition FROM workflows WHERE tenant_id = $1
            ORDER BY name, version DESC) w
         WHERE definition->'on'->'events' @> $2 ORDER BY name LIMIT 1000",
    )
    .bind(&caller.tenant)
    .bind(sqlx::types::Json(serde_json::json!([{ "type": event.event_type }])))
    .fetch_all(&state.pool)
    .await?;
    let scope = Scope { event: event_json, ..Default::default() };
    let mut accepted = EventAccepted { runs: Vec::new(), errors: Vec::new() };
    // Room left in the quota of runs not yet ended: read once, at the first new run.
    let mut room: Option<Option<i64>> = None;
    for row in rows {
        let name: String = row.get("name");
        let version: i32 = row.get("version");
        let def: WorkflowDef =
            match serde_json::from_value(row.get::<sqlx::types::Json<serde_json::Value>, _>("definition").0) {
                Ok(d) => d,
                Err(_) => continue,
            };
        let triggers = def.triggers.iter().flat_map(|t| &t.events).filter(|t| t.event_type == event.event_type);
        for trigger in triggers {
            let matched = match trigger.condition.as_deref().map(|c| scope.condition(c)) {
                None | Some(Ok(true)) => true,
                Some(Ok(false)) => false,
                Some(Err(message)) => {
                    accepted.errors.push(TriggerError { workflow: name.clone(), message });
                    false
                }
            };
            if !matched {
                continue;
            }
            let mut inputs = std::collections::BTreeMap::new();
            let mut failed = None;
            for (key, value) in &trigger.inputs {
                let v = match value.as_str() {
                    Some(template) => scope.value(template),
                    None => Ok(value.clone()),
                };
                match v {
                    Ok(v) => {
                        inputs.insert(key.clone(), v);
                    }
                    Err(e) => failed = Some(format!("inputs.{key}: {e}")),
                }
            }
            if let Some(message) = failed {
                accepted.errors.push(TriggerError { workflow: name.clone(), message });
                continue;
            }
            // One run per workflow and event, however often the event is posted.
            let digest = hex::encode(hmac_sha256::Hash::hash(format!("{}\n{}", event.source, event.id).as_bytes()));
            let idempotency_key = format!("cloudevent:{name}:{digest}");
            // A new run counts against the quota of runs not yet ended; a repeat does not.
            let run_id = taskmesh_ingest::idempotent_run_id(&caller.tenant, &idempotency_key);
            let seen = sqlx::query("SELECT 1 FROM runs WHERE tenant_id = $1 AND id = $2")
                .bind(&caller.tenant)
                .bind(run_id)
                .fetch_optional(&state.pool)
                .await?
                .is_some();
            if !seen {
                if room.is_none() {
                    room = Some(crate::runs::active_runs_room(&state, &caller.tenant).await?);
                }
                if let Some(Some(left)) = room.as_mut() {
                    if *left <= 0 {
                        let problem = crate::runs::active_runs_exceeded(&state, &caller.tenant);
                        accepted.errors.push(TriggerError { workflow: name.clone(), message: problem.0.detail });
                        break;
                    }
                    *left -= 1;
                }
            }
            let reply = state
                .ingest
                .submit_run(&SubmitRun {
                    tenant: caller.tenant.clone(),
                    workflow: serde_json::Value::String(format!("{name}@{version}")),
                    inputs,
                    trigger: Trigger::Event {
                        source: event.source.clone(),
                        id: event.id.clone(),
                        event_type: event.event_type.clone(),
                    },
                    idempotency_key: Some(idempotency_key),
                    traceparent: taskmesh_telemetry::current_traceparent(),
                    not_before: None,
                    priority: None,
                    labels: Default::default(),
                    refresh_cache: false,
                })
                .await;
            match reply {
                Ok(run) => accepted.runs.push(TriggeredRun {
                    workflow: name.clone(),
                    workflow_version: version,
                    run_id: run.run_id,
                    seq: run.seq,
                    duplicate: run.duplicate,
                }),
                Err(problem) if problem.status < 500 => {
                    accepted.errors.push(TriggerError { workflow: name.clone(), message: problem.detail })
                }
                Err(problem) => return Err(problem.into()),
            }
            break; // one run per workflow, even if several of its triggers match
        }
    }
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}
