//! The tenant's audit log: `GET /v1/audit` reads it, newest first; [`AuditWriter`] appends
//! the record of every mutating call that [`crate::access`] hands it, gathering the calls that
//! arrive while an append is under way into one event.

use axum::Json;
use axum::extract::{Query, State};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use taskmesh_events::ErrorCode;
use taskmesh_events::command::RecordAudits;
use taskmesh_events::{AuditRecorded, AuditedCall};
use taskmesh_http::{ApiError, ApiResult};
use taskmesh_ingest::IngestClient;
use tokio::sync::{mpsc, oneshot};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::Caller;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/v1/audit", get(list))
}

/// Filters and paging.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Only calls made with this key.
    pub key_id: Option<Uuid>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page (a record's position: its event's sequence × 1024 plus
    /// its place in the event).
    #[param(minimum = 0)]
    pub cursor: Option<i64>,
}

/// One recorded call.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    pub id: Uuid,
    /// The key that made the call; null for the platform administrator.
    pub key_id: Option<Uuid>,
    /// `key:<prefix>` or `platform-admin`.
    pub actor: String,
    pub method: String,
    pub path: String,
    /// The route's template, e.g. `/v1/runs/{id}/cancel`.
    pub route: Option<String>,
    /// The status the call was answered with.
    pub status: i32,
    /// The peer address it came from.
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub at: DateTime<Utc>,
}

/// A page of the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEntry>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<i64>,
}

/// List the tenant's audit log, newest first (admin): who (key), what (method, path, status),
/// when, and from where, for every mutating call, refused ones included.
#[utoipa::path(get, operation_id = "list_audit", path = "/v1/audit", tag = "tenancy", params(AuditParams),
    responses(
        (status = 200, body = AuditPage),
        (status = 400, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 401, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 403, body = taskmesh_events::Problem, content_type = "application/problem+json"),
        (status = 429, body = taskmesh_events::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AuditPage>> {
    caller.require_admin()?;
    let Query(params) = params.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let limit = crate::page_limit(params.limit)?;
    let position = params.cursor.map(|c| (c / PARTS, (c % PARTS) as i32));
    let mut rows = sqlx::query(
        "SELECT seq, part, id, key_id, actor, method, path, route, status, ip, user_agent, at FROM audit_log
         WHERE tenant_id = $1 AND ($2::uuid IS NULL OR key_id = $2) AND ($3::bigint IS NULL OR (seq, part) < ($3, $4))
         ORDER BY seq DESC, part DESC LIMIT $5",
    )
    .bind(&caller.tenant)
    .bind(params.key_id)
    .bind(position.map(|p| p.0))
    .bind(position.map(|p| p.1))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let next_cursor =
        crate::cut_page(&mut rows, limit, |r| r.get::<i64, _>("seq") * PARTS + i64::from(r.get::<i32, _>("part")));
    let items: Vec<AuditEntry> = rows
        .iter()
        .map(|r| AuditEntry {
            id: r.get("id"),
            key_id: r.get("key_id"),
            actor: r.get("actor"),
            method: r.get("method"),
            path: r.get("path"),
            route: r.get("route"),
            status: r.get("status"),
            ip: r.get("ip"),
            user_agent: r.get("user_agent"),
            at: r.get("at"),
        })
        .collect();
    Ok(Json(AuditPage { items, next_cursor }))
}

/// A cursor is a record's event sequence × `PARTS` plus its place in the event.
const PARTS: i64 = 1024;
const _: () = assert!(taskmesh_events::MAX_AUDIT_BATCH as i64 <= PARTS);

/// Most records waiting to be appended; a call that finds the queue full waits for room.
const QUEUE: usize = 4096;
/// Most bytes of records (roughly counted) one append carries: well under NATS's payload limit.
const MAX_APPEND_BYTES: usize = 256 * 1024;

/// Appends audit records through ingest (`record_audits`), one append at a time: the records
/// that arrive while an append is under way go together in the next, one event per tenant. A
/// lone call is appended at once; under load, many calls share an event.
#[derive(Clone)]
pub struct AuditWriter {
    queue: mpsc::Sender<Pending>,
}

/// A record waiting to be appended, and whom to tell once it is.
struct Pending {
    tenant: String,
    call: AuditedCall,
    appended: oneshot::Sender<()>,
}

impl AuditWriter {
    /// Starts the task that appends; it ends once every `AuditWriter` is dropped and the
    /// queue is empty.
    pub fn start(ingest: IngestClient) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(append_all(ingest, rx));
        Self { queue }
    }

    /// Appends `record` to `tenant`'s audit log, and returns once it is appended. A failure is
    /// logged, not answered: the call itself is done.
    pub async fn record(&self, tenant: &str, mut record: AuditRecorded) {
        // Cut to what the log keeps, so that ingest refuses no record, and no batch for it.
        record.clip();
        let (appended, done) = oneshot::channel();
        let call = AuditedCall { id: Uuid::now_v7(), call: record };
        if self.queue.send(Pending { tenant: tenant.to_string(), call, appended }).await.is_err() {
            tracing::warn!(tenant, "recording an audit entry failed: the writer has stopped");
            return;
        }
        // Dropped unanswered only if the writer stopped; it logged why.
        let _ = done.await;
    }
}

/// About how many bytes a record takes in a command.
fn size(call: &AuditedCall) -> usize {
    let c = &call.call;
    let optional = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    256 + c.actor.len() + c.path.len() + optional(&c.route) + optional(&c.ip) + optional(&c.user_agent)
}

async fn append_all(ingest: IngestClient, mut rx: mpsc::Receiver<Pending>) {
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Whatever else is waiting, as far as one append carries.
        let mut bytes = size(&first.call);
        let mut batch = vec![first];
        while batch.len() < taskmesh_events::MAX_AUDIT_BATCH {
            let Ok(p) = rx.try_recv() else { break };
            bytes += size(&p.call);
            if bytes > MAX_APPEND_BYTES {
                carried = Some(p);
                break;
            }
            batch.push(p);
        }
        // One command per tenant, all at once.
        let mut tenants: Vec<(String, Vec<AuditedCall>, Vec<oneshot::Sender<()>>)> = Vec::new();
        for p in batch {
            let i = match tenants.iter().position(|(t, ..)| *t == p.tenant) {
                Some(i) => i,
                None => {
                    tenants.push((p.tenant, Vec::new(), Vec::new()));
                    tenants.len() - 1
                }
            };
            tenants[i].1.push(p.call);
            tenants[i].2.push(p.appended);
        }
        let appends = tenants.into_iter().map(|(tenant, records, waiting)| {
            let ingest = &ingest;
            async move {
                append(ingest, RecordAudits { tenant, records }).await;
                for w in waiting {
                    let _ = w.send(());
                }
            }
        });
        futures::future::join_all(appends).await;
    }
}

/// Appends one tenant's records. Should ingest refuse them (it should not: they are clipped),
/// they are sent again one by one, so only a bad record is lost.
async fn append(ingest: &IngestClient, cmd: RecordAudits) {
    let e = match send(ingest, &cmd).await {
        Ok(()) => return,
        Err(e) => e,
    };
    if e.code == ErrorCode::BadRequest && cmd.records.len() > 1 {
        for record in cmd.records {
            let one = RecordAudits { tenant: cmd.tenant.clone(), records: vec![record] };
            if let Err(e) = send(ingest, &one).await {
                tracing::warn!(error = %e, tenant = one.tenant, "recording an audit entry failed");
            }
        }
        return;
    }
    tracing::warn!(error = %e, tenant = cmd.tenant, count = cmd.records.len(), "recording audit entries failed");
}

/// Sends `cmd`, and once more, unchanged, if it was not refused (no answer, say): its first
/// record's id deduplicates the append, should the first have been made.
async fn send(ingest: &IngestClient, cmd: &RecordAudits) -> Result<(), taskmesh_events::Problem> {
    match ingest.record_audits(cmd).await {
        Err(e) if e.code != ErrorCode::BadRequest => ingest.record_audits(cmd).await.map(drop),
        answered => answered.map(drop),
    }
}

#[cfg(test)]
mod tests {
    use taskmesh_events::Event;
    use tokio_util::sync::CancellationToken;

    use super::*;

    use taskmesh_testkit::audit_record as call;

    /// The paths of each event on `tenant`'s audit subject.
    async fn appended(bus: &taskmesh_bus::Bus, tenant: &str) -> Vec<Vec<String>> {
        let stored = bus.read_subject(&bus.namespace().audit(tenant), 0).await.unwrap();
        stored
            .iter()
            .map(|s| match &s.envelope.event {
                Event::AuditBatchRecorded(b) => b.records.iter().map(|r| r.call.path.clone()).collect(),
                other => panic!("{other:?} on the audit subject"),
            })
            .collect()
    }

    #[tokio::test]
    async fn records_are_clipped_and_a_refused_batch_goes_again_one_by_one() {
        let env = taskmesh_testkit::TestEnv::new().await.unwrap();
        let bus = env.bus().await.unwrap();
        let stop = CancellationToken::new();
        let ingest = tokio::spawn(taskmesh_ingest::Ingest::new(bus.clone()).run(stop.clone()));
        let client = IngestClient::new(bus.clone());
        let probe = || RecordAudits {
            tenant: "probe".into(),
            records: vec![AuditedCall { id: Uuid::now_v7(), call: call("/") }],
        };
        taskmesh_testkit::eventually("ingest to answer", std::time::Duration::from_secs(10), || async {
            Ok(client.record_audits(&probe()).await.ok())
        })
        .await
        .unwrap();

        // A path of 3,000 bytes (in two-byte characters) is cut to what the log keeps.
        let writer = AuditWriter::start(client.clone());
        writer.record("clipped", call(&"é".repeat(1_500))).await;
        let clipped = appended(&bus, "clipped").await;
        assert_eq!(clipped.len(), 1);
        assert_eq!(clipped[0][0].len(), 2_048);

        // A batch ingest refuses (one record too long) goes again a record at a time: only the
        // bad one is lost.
        let records = [call("/a"), call(&"x".repeat(3_000)), call("/b")];
        let records = records.into_iter().map(|c| AuditedCall { id: Uuid::now_v7(), call: c }).collect();
        append(&client, RecordAudits { tenant: "mixed".into(), records }).await;
        assert_eq!(appended(&bus, "mixed").await, [vec!["/a".to_string()], vec!["/b".to_string()]]);

        stop.cancel();
        ingest.await.unwrap().unwrap();
        env.cleanup().await;
    }
}
