//! One event → its effect on the read models. Only what the event says is written (no clock,
//! no randomness), so replaying the log rebuilds identical rows.

use sqlx::{Postgres, Transaction};
use taskmesh_bus::Stored;
use taskmesh_events::{Event, Status, StepOutcome};

type Tx<'a> = Transaction<'a, Postgres>;

/// Applies one event inside the projector's transaction.
pub async fn apply(tx: &mut Tx<'_>, stored: &Stored, touched: &mut Touched) -> Result<(), sqlx::Error> {
    let env = &stored.envelope;
    let tenant = env.tenant.as_str();
    let at = env.occurred_at;
    let seq = stored.seq as i64;
    let run_id = || match &env.event {
        Event::RunSubmitted(e) => Some(e.run_id),
        _ => env.subject.rsplit('.').next().and_then(|s| s.parse().ok()),
    };
    match &env.event {
        Event::TenantCreated(e) => {
            sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(&e.tenant_id)
                .bind(&e.name)
                .bind(at)
                .execute(&mut **tx)
                .await?;
        }
        Event::ApiKeyCreated(e) => {
            sqlx::query(
                "INSERT INTO api_keys (id, tenant_id, role, key_hash, prefix, name, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(e.key_id)
            .bind(tenant)
            .bind(e.role.as_str())
            .bind(&e.key_hash)
            .bind(&e.prefix)
            .bind(&e.name)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
        Event::ApiKeyUsed(e) => {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = GREATEST(last_used_at, $3) WHERE tenant_id = $1 AND id = $2",
            )
            .bind(tenant)
            .bind(e.key_id)
            .bind(e.at)
            .execute(&mut **tx)
            .await?;
        }
        Event::AuditRecorded(e) => {
            sqlx::query(
                "INSERT INTO audit_log (tenant_id, seq, id, key_id, actor, method, path, route, status, ip, user_agent, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING",
            )
            .bind(tenant)
            .bind(seq)
            .bind(env.id)
            .bind(e.key_id)
            .bind(&e.actor)
            .bind(&e.method)
            .bind(&e.path)
            .bind(&e.route)
            .bind(i32::from(e.status))
            .bind(&e.ip)
            .bind(&e.user_agent)
            .bind(e.at)
            .execute(&mut **tx)
            .await?;
        }
        Event::ApiKeyRevoked(e) => {
            // Announced (before this batch's checkpoint) to the gateways' key caches.
            sqlx::query(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) WHERE tenant_id = $1 AND id = $2
                 RETURNING pg_notify($4, key_hash)",
            )
            .bind(tenant)
            .bind(e.key_id)
            .bind(at)
            .bind(taskmesh_store::KEY_REVOKED_CHANNEL)
            .execute(&mut **tx)
            .await?;
        }
        Event::RunSubmitted(e) => {
            let inserted = sqlx::query(
                "INSERT INTO runs (tenant_id, id, workflow_name, status, trigger, inputs, idempotency_key, created_at, last_seq, workflow_version, priority, labels)
                 VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
            )
            .bind(tenant)
            .bind(e.run_id)
            .bind(&e.workflow.name)
            .bind(sqlx::types::Json(&e.trigger))
            .bind(sqlx::types::Json(&e.inputs))
            .bind(&e.idempotency_key)
            .bind(at)
            .bind(seq)
            .bind(e.workflow_version.map(|v| v as i32))
            .bind(e.priority.or(e.workflow.priority).unwrap_or(0))
            .bind(sqlx::types::Json(&e.labels))
            .execute(&mut **tx)
            .await?;
            touched.wrote(tenant, e.run_id, seq, inserted.rows_affected());
            let ids: Vec<&str> = e.workflow.steps.iter().map(|s| s.id.as_str()).collect();
            let positions: Vec<i32> = (0..ids.len() as i32).collect();
            let kinds: Vec<&str> = e
                .workflow
                .steps
                .iter()
                .map(|s| match s.kind() {
                    Some("uses") | None => "builtin",
                    Some(k) => k,
                })
                .collect();
            let needs: Vec<String> = e.workflow.steps.iter().map(|s| s.needs.join(",")).collect();
            sqlx::query(
                "INSERT INTO steps (tenant_id, run_id, step_id, position, kind, needs, status)
                 SELECT $1, $2, id, pos, kind, CASE WHEN needs = '' THEN '{}'::text[] ELSE string_to_array(needs, ',') END, 'queued'
                 FROM UNNEST($3::text[], $4::int[], $5::text[], $6::text[]) AS t(id, pos, kind, needs)
                 ON CONFLICT DO NOTHING",
            )
            .bind(tenant)
            .bind(e.run_id)
            .bind(&ids)
            .bind(&positions)
            .bind(&kinds)
            .bind(&needs)
            .execute(&mut **tx)
            .await?;
            for (step, reused) in &e.reused {
                sqlx::query(
                    "UPDATE steps SET status = 'succeeded', exit_code = $4, output = $5, output_truncated = $6, outputs = $7,
                            reason = $8, started_at = $9, finished_at = $10
                     WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3",
                )
                .bind(tenant)
                .bind(e.run_id)
                .bind(step)
                .bind(reused.outcome.exit_code)
                .bind(&reused.outcome.output)
                .bind(reused.outcome.output_truncated)
                .bind(sqlx::types::Json(&reused.outcome.outputs))
                .bind(format!("reused from run {}", reused.from_run))
                .bind(reused.outcome.started_at)
                .bind(reused.outcome.finished_at)
                .execute(&mut **tx)
                .await?;
            }
        }
        // (Appended by logs before 2026-12-03; since, the first `StepStarted` says it.)
        Event::RunStarted(e) => start_run(tx, touched, tenant, e.run_id, at, seq).await?,
        Event::StepDispatched(_) => touched.record(tenant, run_id(), seq),
        Event::StepWaiting(e) => {
            sqlx::query(
                "UPDATE steps SET wait_reason = $4 WHERE tenant_id = $1 AND run_id = $2 AND step_id = ANY($3) AND status = 'queued'",
            )
            .bind(tenant)
            .bind(run_id())
            .bind(&e.steps)
            .bind(&e.reason)
            .execute(&mut **tx)
            .await?;
            touched.record(tenant, run_id(), seq);
        }
        Event::StepAdmitted(e) => {
            sqlx::query(
                "UPDATE steps SET wait_reason = NULL WHERE tenant_id = $1 AND run_id = $2 AND step_id = ANY($3)",
            )
            .bind(tenant)
            .bind(run_id())
            .bind(&e.steps)
            .execute(&mut **tx)
            .await?;
            touched.record(tenant, run_id(), seq);
        }
        Event::RunWaiting(e) => {
            sqlx::query("UPDATE runs SET wait_reason = $3 WHERE tenant_id = $1 AND id = $2 AND status = 'queued'")
                .bind(tenant)
                .bind(e.run_id)
                .bind(&e.reason)
                .execute(&mut **tx)
                .await?;
            touched.record(tenant, Some(e.run_id), seq);
        }
        Event::RunAdmitted(_) => {
            sqlx::query("UPDATE runs SET wait_reason = NULL WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(run_id())
                .execute(&mut **tx)
                .await?;
            touched.record(tenant, run_id(), seq);
        }
        Event::StepStarted(e) => {
            sqlx::query(
                "UPDATE steps SET status = 'running', attempts = $4, started_at = COALESCE(started_at, $5), wait_reason = NULL
                 WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3",
            )
            .bind(tenant)
            .bind(run_id())
            .bind(&e.step)
            .bind(e.attempt as i32)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            sqlx::query(
                "INSERT INTO step_attempts (tenant_id, run_id, step_id, attempt, executor, status, started_at)
                 VALUES ($1, $2, $3, $4, $5, 'running', $6) ON CONFLICT DO NOTHING",
            )
            .bind(tenant)
            .bind(run_id())
            .bind(&e.step)
            .bind(e.attempt as i32)
            .bind(&e.executor)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            match run_id() {
                Some(id) if e.run_started => start_run(tx, touched, tenant, id, at, seq).await?,
                _ => touched.record(tenant, run_id(), seq),
            }
        }
        Event::StepAttemptLost(e) => {
            sqlx::query(
                "UPDATE step_attempts SET status = 'lost', error = $5, finished_at = $6
                 WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3 AND attempt = $4",
            )
            .bind(tenant)
            .bind(run_id())
            .bind(&e.step)
            .bind(e.attempt as i32)
            .bind(&e.reason)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            touched.record(tenant, run_id(), seq);
        }
        Event::StepSucceeded(e) => {
            finish_step(tx, touched, tenant, run_id(), &e.step, e.attempt, Status::Succeeded, &e.outcome, seq).await?
        }
        Event::StepFailed(e) => {
            let status = if e.outcome.timed_out { Status::TimedOut } else { Status::Failed };
            finish_step(tx, touched, tenant, run_id(), &e.step, e.attempt, status, &e.outcome, seq).await?
        }
        Event::StepAttemptFailed(e) => {
            let status = if e.outcome.timed_out { Status::TimedOut } else { Status::Failed };
            finish_attempt(tx, tenant, run_id(), &e.step, e.attempt, status, &e.outcome).await?;
            sqlx::query(
                "UPDATE steps SET status = 'queued', exit_code = $4, output = $5, output_truncated = $6, error = $7, retry_at = $8
                 WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3",
            )
            .bind(tenant)
            .bind(run_id())
            .bind(&e.step)
            .bind(e.outcome.exit_code)
            .bind(&e.outcome.output)
            .bind(e.outcome.output_truncated)
            .bind(&e.outcome.error)
            .bind(e.retry_at)
            .execute(&mut **tx)
            .await?;
            touched.record(tenant, run_id(), seq);
        }
        Event::StepCancelled(e) => {
            sqlx::query(
                "UPDATE steps SET status = 'cancelled', reason = $4, finished_at = $5, retry_at = NULL, wait_reason = NULL
                 WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3",
            )
            .bind(tenant)
            .bind(run_id())
            .bind(&e.step)
            .bind(&e.reason)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            sqlx::query(
                "UPDATE step_attempts SET status = 'cancelled', finished_at = $4
                 WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3 AND status = 'running'",
            )
            .bind(tenant)
            .bind(run_id())
            .bind(&e.step)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            touched.record(tenant, run_id(), seq);
        }
        Event::RunCancelRequested(e) => {
            let updated =
                sqlx::query("UPDATE runs SET cancel_requested_at = $3, last_seq = $4 WHERE tenant_id = $1 AND id = $2")
                    .bind(tenant)
                    .bind(e.run_id)
                    .bind(at)
                    .bind(seq)
                    .execute(&mut **tx)
                    .await?;
            touched.wrote(tenant, e.run_id, seq, updated.rows_affected());
        }
        Event::StepSkipped(e) => {
            sqlx::query(
                "UPDATE steps SET status = 'skipped', reason = $4, finished_at = $5, wait_reason = NULL
                 WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3",
            )
            .bind(tenant)
            .bind(run_id())
            .bind(&e.step)
            .bind(&e.reason)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            touched.record(tenant, run_id(), seq);
        }
        Event::RunSucceeded(e) | Event::RunFailed(e) | Event::RunCancelled(e) | Event::RunTimedOut(e) => {
            let status = match env.event {
                Event::RunSucceeded(_) => Status::Succeeded,
                Event::RunFailed(_) => Status::Failed,
                Event::RunTimedOut(_) => Status::TimedOut,
                _ => Status::Cancelled,
            };
            let updated = sqlx::query(
                "UPDATE runs SET status = $3, finished_at = $4, last_seq = $5, wait_reason = NULL WHERE tenant_id = $1 AND id = $2",
            )
            .bind(tenant)
            .bind(e.run_id)
            .bind(status.as_str())
            .bind(at)
            .bind(seq)
            .execute(&mut **tx)
            .await?;
            touched.wrote(tenant, e.run_id, seq, updated.rows_affected());
            touched.ended.push(e.run_id);
        }
        Event::RepoConnectionCreated(e) => {
            sqlx::query(
                "INSERT INTO repo_connections (id, tenant_id, forge, repository, secret, branches, workflow, created_at)
                 VALUES ($1, $2, 'github', $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(e.connection_id)
            .bind(tenant)
            .bind(&e.repository)
            .bind(serde_json::to_string(&e.secret).expect("serialises"))
            .bind(&e.branches)
            .bind(sqlx::types::Json(&e.workflow))
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
        Event::WorkflowVersionStored(e) => {
            sqlx::query(
                "INSERT INTO workflows (tenant_id, name, version, definition, created_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(tenant)
            .bind(&e.name)
            .bind(e.version as i32)
            .bind(sqlx::types::Json(&e.workflow))
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
        Event::ScheduleCreated(e) => {
            sqlx::query("INSERT INTO schedules (tenant_id, id, spec, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                .bind(tenant)
                .bind(e.schedule_id)
                .bind(sqlx::types::Json(&e.spec))
                .bind(at)
                .execute(&mut **tx)
                .await?;
        }
        Event::SchedulePaused(e) | Event::ScheduleResumed(e) => {
            sqlx::query("UPDATE schedules SET paused = $3 WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(e.schedule_id)
                .bind(matches!(env.event, Event::SchedulePaused(_)))
                .execute(&mut **tx)
                .await?;
        }
        Event::ScheduleDeleted(e) => {
            sqlx::query("DELETE FROM schedules WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(e.schedule_id)
                .execute(&mut **tx)
                .await?;
        }
        Event::ScheduleTicked(e) => {
            sqlx::query(
                "UPDATE schedules SET last_tick = $3, last_run_id = COALESCE($4, last_run_id), ticks = ticks + 1
                 WHERE tenant_id = $1 AND id = $2",
            )
            .bind(tenant)
            .bind(e.schedule_id)
            .bind(e.tick)
            .bind(e.run_id)
            .execute(&mut **tx)
            .await?;
        }
        Event::SecretSet(e) => {
            sqlx::query(
                "INSERT INTO secrets (tenant_id, name, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant_id, name) DO UPDATE SET updated_at = EXCLUDED.updated_at",
            )
            .bind(tenant)
            .bind(&e.name)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
        Event::SecretDeleted(e) => {
            sqlx::query("DELETE FROM secrets WHERE tenant_id = $1 AND name = $2")
                .bind(tenant)
                .bind(&e.name)
                .execute(&mut **tx)
                .await?;
        }
        Event::WebhookEndpointDeleted(e) => {
            sqlx::query("DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(e.endpoint_id)
                .execute(&mut **tx)
                .await?;
        }
        Event::RepoConnectionDeleted(e) => {
            sqlx::query("DELETE FROM repo_connections WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(e.connection_id)
                .execute(&mut **tx)
                .await?;
        }
        Event::WebhookEndpointCreated(e) => {
            sqlx::query(
                "INSERT INTO webhook_endpoints (id, tenant_id, url, secret, event_types, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(e.endpoint_id)
            .bind(tenant)
            .bind(&e.url)
            .bind(serde_json::to_string(&e.secret).expect("serialises"))
            .bind(&e.event_types)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// Each run's last applied sequence in a batch (read-your-writes and ETags key on it), written
/// once per run at the batch's end: most events of a run only move its `last_seq`, so one
/// statement serves the batch instead of one per event. A run whose row a statement of the
/// batch already left at its latest sequence (its submission, start, cancel request or end) is
/// not written again: each write of a `runs` row is a new row version. Also the runs that
/// ended in the batch, whose ends are announced when it commits.
#[derive(Default)]
pub struct Touched {
    seqs: std::collections::HashMap<(String, uuid::Uuid), (i64, i64)>,
    ended: Vec<uuid::Uuid>,
}

impl Touched {
    /// An event of the run at `seq` that its row's other columns do not show.
    fn record(&mut self, tenant: &str, run_id: Option<uuid::Uuid>, seq: i64) {
        if let Some(run_id) = run_id {
            let (touched, _) = self.seqs.entry((tenant.to_string(), run_id)).or_default();
            *touched = (*touched).max(seq);
        }
    }

    /// A statement set the run's `last_seq` to `seq` (if it changed a row).
    fn wrote(&mut self, tenant: &str, run_id: uuid::Uuid, seq: i64, rows: u64) {
        if rows > 0 {
            let (_, written) = self.seqs.entry((tenant.to_string(), run_id)).or_default();
            *written = (*written).max(seq);
        }
    }

    /// Writes the recorded sequences (a run's `last_seq` only ever grows); returns the runs
    /// that ended.
    pub async fn flush(self, tx: &mut Tx<'_>) -> Result<Vec<uuid::Uuid>, sqlx::Error> {
        let (mut tenants, mut ids, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        for ((tenant, id), (seq, written)) in self.seqs {
            if seq > written {
                tenants.push(tenant);
                ids.push(id);
                seqs.push(seq);
            }
        }
        if ids.is_empty() {
            return Ok(self.ended);
        }
        sqlx::query(
            "UPDATE runs r SET last_seq = GREATEST(r.last_seq, t.seq)
             FROM UNNEST($1::text[], $2::uuid[], $3::bigint[]) AS t(tenant, id, seq)
             WHERE r.tenant_id = t.tenant AND r.id = t.id",
        )
        .bind(&tenants)
        .bind(&ids)
        .bind(&seqs)
        .execute(&mut **tx)
        .await?;
        Ok(self.ended)
    }
}

/// A queued run is running from `at` on.
async fn start_run(
    tx: &mut Tx<'_>,
    touched: &mut Touched,
    tenant: &str,
    run_id: uuid::Uuid,
    at: chrono::DateTime<chrono::Utc>,
    seq: i64,
) -> Result<(), sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE runs SET status = 'running', started_at = COALESCE(started_at, $3), last_seq = $4, wait_reason = NULL
         WHERE tenant_id = $1 AND id = $2 AND status = 'queued'",
    )
    .bind(tenant)
    .bind(run_id)
    .bind(at)
    .bind(seq)
    .execute(&mut **tx)
    .await?;
    touched.record(tenant, Some(run_id), seq);
    touched.wrote(tenant, run_id, seq, updated.rows_affected());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn finish_step(
    tx: &mut Tx<'_>,
    touched: &mut Touched,
    tenant: &str,
    run_id: Option<uuid::Uuid>,
    step: &str,
    attempt: u32,
    status: Status,
    outcome: &StepOutcome,
    seq: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE steps SET status = $4, exit_code = $5, output = $6, output_truncated = $7, error = $8, wait_reason = NULL,
                started_at = COALESCE(started_at, $9), finished_at = $10, outputs = $11, retry_at = NULL
         WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3",
    )
    .bind(tenant)
    .bind(run_id)
    .bind(step)
    .bind(status.as_str())
    .bind(outcome.exit_code)
    .bind(&outcome.output)
    .bind(outcome.output_truncated)
    .bind(&outcome.error)
    .bind(outcome.started_at)
    .bind(outcome.finished_at)
    .bind(sqlx::types::Json(&outcome.outputs))
    .execute(&mut **tx)
    .await?;
    finish_attempt(tx, tenant, run_id, step, attempt, status, outcome).await?;
    touched.record(tenant, run_id, seq);
    Ok(())
}

/// Records how an attempt ended (a lost attempt keeps its `lost` status).
async fn finish_attempt(
    tx: &mut Tx<'_>,
    tenant: &str,
    run_id: Option<uuid::Uuid>,
    step: &str,
    attempt: u32,
    status: Status,
    outcome: &StepOutcome,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE step_attempts SET status = $5, exit_code = $6, error = $7, finished_at = $8, outputs = $9
         WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3 AND attempt = $4 AND status <> 'lost'",
    )
    .bind(tenant)
    .bind(run_id)
    .bind(step)
    .bind(attempt as i32)
    .bind(status.as_str())
    .bind(outcome.exit_code)
    .bind(&outcome.error)
    .bind(outcome.finished_at)
    .bind(sqlx::types::Json(&outcome.outputs))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
