//! `DELETE /v1/cache`: forget the tenant's kept `cache:` outcomes.

use axum::extract::State;
use axum::routing::delete;
use axum::{Json, Router};
use taskmesh_events::command::{PurgeCache, Purged};

use taskmesh_http::ApiResult;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/cache", delete(purge))
}

/// Forget every outcome `cache:` steps of the tenant kept (operator or admin): steps that
/// would have reused one run again, and keep theirs anew. Runs that reused one are unchanged.
#[utoipa::path(delete, operation_id = "purge_cache", path = "/v1/cache", tag = "runs",
    responses(
        (status = 200, body = Purged, description = "How many kept outcomes went"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn purge(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Purged>> {
    caller.require_operator()?;
    Ok(Json(state.ingest.purge_cache(&PurgeCache { tenant: caller.tenant }).await?))
}
