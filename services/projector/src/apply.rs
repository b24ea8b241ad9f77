//! One event → its effect on the read models. Only what the event says is written (no clock,
//! no randomness), so replaying the log rebuilds identical rows.

use sqlx::{Postgres, Transaction};
use taskmesh_bus::Stored;
use taskmesh_events::Event;

type Tx<'a> = Transaction<'a, Postgres>;

/// Applies one event inside the projector's transaction: every event but a run's (those are
/// folded per batch by [`crate::fold`]).
pub async fn apply(tx: &mut Tx<'_>, stored: &Stored) -> Result<(), sqlx::Error> {
    let env = &stored.envelope;
    let tenant = env.tenant.as_str();
    let at = env.occurred_at;
    let seq = stored.seq as i64;
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
        // Run events are folded per batch (see `fold`); nothing else is left out.
        event => debug_assert!(crate::fold::is_run_event(event), "{} is not projected", event.type_name()),
    }
    Ok(())
}
