//! `/v1/executors`: the live executors (from their heartbeats on the EXECUTORS stream, which is
//! live state rather than history, so it is read there and not from a projection) and, per
//! label set steps have been dispatched for, how many of the caller's steps wait for it.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::Serialize;
use taskmesh_events::command::{ExecutorBeat, Pool};
use taskmesh_events::subjects::{ANY_POOL, pool_consumer, pool_token};
use taskmesh_events::workflow::labels_match;
use taskmesh_http::{ApiError, ApiResult};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/executors", get(list))
}

/// A live executor.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutorView {
    pub id: String,
    /// Detected (os, arch, cpus, memory_mb, gpu, gpu_model, gpus, gpu_memory_mb, container,
    /// sandbox) and configured labels.
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    pub slots_in_use: u32,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
    /// Draining after SIGTERM: it takes no new steps.
    pub stopping: bool,
    pub version: String,
}

/// A label set steps are queued for (`runs_on`; empty: any executor).
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolView {
    pub runs_on: BTreeMap<String, String>,
    /// The JetStream durable consumer of this label set on the dispatch stream: the one an
    /// autoscaler (KEDA's NATS JetStream scaler) watches for this pool.
    pub consumer: String,
    /// The caller's steps on the dispatch queue for this label set, not yet finished by an
    /// executor (queued or running).
    pub queued: u64,
    /// Live executors that have these labels.
    pub executors: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutorList {
    pub items: Vec<ExecutorView>,
    pub pools: Vec<PoolView>,
}

/// List live executors, their labels and slots, and the queue depth per label set.
#[utoipa::path(get, operation_id = "list_executors", path = "/v1/executors", tag = "executors",
    responses(
        (status = 200, body = ExecutorList),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 503, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<ExecutorList>> {
    let ns = state.bus.namespace();
    let unavailable = |e: taskmesh_bus::BusError| {
        tracing::warn!(error = %e, "reading executors");
        ApiError::new(taskmesh_events::ErrorCode::Unavailable, "the executor registry cannot be read right now")
    };
    let now = Utc::now();
    let mut beats: Vec<ExecutorBeat> = state
        .bus
        .latest_per_subject::<ExecutorBeat>(&ns.executors_stream(), &ns.executors_all())
        .await
        .map_err(unavailable)?
        .into_iter()
        .filter(|b| b.stopping || b.is_live(now))
        .collect();
    beats.sort_by(|a, b| a.id.cmp(&b.id));
    let mut pools: Vec<Pool> =
        state.bus.latest_per_subject::<Pool>(&ns.pools_stream(), &ns.pools_all()).await.map_err(unavailable)?;
    if !pools.iter().any(|p| p.token == ANY_POOL) {
        pools.push(Pool { token: ANY_POOL.into(), runs_on: BTreeMap::new() });
    }
    let counts = state
        .bus
        .subject_counts(&ns.dispatch_stream(), &ns.dispatch_tenant(&caller.tenant))
        .await
        .map_err(unavailable)?;
    let mut queued: BTreeMap<String, u64> = BTreeMap::new();
    for (subject, n) in counts {
        if let Some((_, pool)) = ns.parse_dispatch(&subject) {
            *queued.entry(pool.to_string()).or_default() += n;
        }
    }
    let mut pools: Vec<PoolView> = pools
        .into_iter()
        .filter(|p| p.token == pool_token(&p.runs_on))
        .map(|p| PoolView {
            consumer: pool_consumer(&p.token),
            queued: queued.get(&p.token).copied().unwrap_or(0),
            executors: beats.iter().filter(|b| b.is_live(now) && labels_match(&p.runs_on, &b.labels)).count(),
            runs_on: p.runs_on,
        })
        .collect();
    pools.sort_by(|a, b| a.runs_on.cmp(&b.runs_on));
    let items = beats
        .into_iter()
        .map(|b| ExecutorView {
            id: b.id,
            labels: b.labels,
            slots: b.slots,
            slots_in_use: b.in_use,
            started_at: b.started_at,
            last_heartbeat: b.at,
            stopping: b.stopping,
            version: b.version,
        })
        .collect();
    Ok(Json(ExecutorList { items, pools }))
}
