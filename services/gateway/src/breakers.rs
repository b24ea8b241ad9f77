//! `GET /v1/circuit-breakers`: the tenant's circuit breakers with something to remember, as the
//! dispatcher leader last kept them on the BREAKERS stream (live state, read there rather than
//! from a projection).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::Serialize;
use taskmesh_events::ErrorCode;
use taskmesh_events::command::BreakerState;
use taskmesh_http::{ApiError, ApiResult};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Caller;

/// How long the breakers are read before the request is answered `503`.
const READ_WITHIN: Duration = Duration::from_secs(2);

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/circuit-breakers", get(list))
}

/// A circuit breaker of the tenant's.
#[derive(Debug, Serialize, ToSchema)]
pub struct BreakerView {
    /// Its `circuit_breaker.key`.
    pub key: String,
    /// `open` (its steps wait), `probing` (its cooldown is over: the next step goes as a probe,
    /// or has), or `closed` (failures counted, below its threshold).
    pub state: String,
    /// Failed attempts in a row.
    pub failures: u32,
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Until when it is open.
    pub open_until: Option<DateTime<Utc>>,
    pub threshold: u32,
    pub cooldown_seconds: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BreakerList {
    /// By key. Breakers with nothing to remember (closed, no failures) are not listed.
    pub items: Vec<BreakerView>,
}

/// List the tenant's circuit breakers that are open, or have counted failures, as the
/// dispatcher leader last kept them (a moment behind it).
#[utoipa::path(get, operation_id = "list_circuit_breakers", path = "/v1/circuit-breakers", tag = "runs",
    responses(
        (status = 200, body = BreakerList),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 503, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<BreakerList>> {
    let ns = state.bus.namespace();
    let (stream, filter) = (ns.breakers_stream(), ns.breakers_tenant(&caller.tenant));
    let read = state.bus.last_of_each::<BreakerState>(&stream, &filter);
    let unavailable = || ApiError::new(ErrorCode::Unavailable, "the circuit breakers cannot be read right now");
    let kept = match tokio::time::timeout(READ_WITHIN, read).await {
        Ok(Ok(kept)) => kept,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reading the circuit breakers");
            return Err(unavailable());
        }
        Err(_) => return Err(unavailable()),
    };
    let now = Utc::now();
    let mut items: Vec<BreakerView> = kept
        .into_iter()
        .filter(|b| b.tenant == caller.tenant)
        .map(|b| BreakerView {
            state: state_at(b.open_until, now).into(),
            key: b.key,
            failures: b.failures,
            last_failure_at: b.failed_at,
            open_until: b.open_until,
            threshold: b.threshold,
            cooldown_seconds: b.cooldown_seconds,
        })
        .collect();
    items.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Json(BreakerList { items }))
}

/// A kept breaker's state at `now`, by when it is open until.
fn state_at(open_until: Option<DateTime<Utc>>, now: DateTime<Utc>) -> &'static str {
    match open_until {
        Some(until) if until > now => "open",
        Some(_) => "probing",
        None => "closed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaker_is_open_until_its_cooldown_ends_then_probing() {
        let now = Utc::now();
        assert_eq!(state_at(Some(now + chrono::Duration::seconds(1)), now), "open");
        assert_eq!(state_at(Some(now), now), "probing");
        assert_eq!(state_at(None, now), "closed");
    }
}
