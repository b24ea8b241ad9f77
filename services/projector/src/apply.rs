//! One event → its effect on the read models. Only what the event says is written (no clock,
//! no randomness), so replaying the log rebuilds identical rows.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use taskmesh_bus::Stored;
use taskmesh_events::{AuditRecorded, Event};
use taskmesh_store::{Alongside, StoreError};
use uuid::Uuid;

type Tx<'a> = Transaction<'a, Postgres>;

/// Applies one event inside the projector's transaction: every event but a run's (those are
/// folded per batch by [`crate::fold`]). A versioned resource's version goes into `versions`,
/// written once for the whole batch ([`Versions::write`]).
pub async fn apply(tx: &mut Tx<'_>, stored: &Stored, versions: &mut Versions) -> Result<(), sqlx::Error> {
    apply_event(tx, stored).await?;
    versions.note(stored);
    Ok(())
}

/// The resources whose subjects a transaction's events are on, each with the sequence of the
/// last of them: a versioned resource's version is the sequence of the last event on its
/// subject, whatever the event.
#[derive(Default)]
pub struct Versions {
    /// By read model (an index into [`SET_VERSIONS`]), then tenant and id.
    seen: [HashMap<(String, Uuid), i64>; SET_VERSIONS.len()],
}

/// The read models that keep a version, by the kind of their subjects: one statement each
/// sets the versions of its rows (`$1` tenants, `$2` ids, `$3` versions).
const SET_VERSIONS: [(&str, &str); 3] = [
    (
        "schedule",
        "UPDATE schedules t SET version = v.seq FROM UNNEST($1::text[], $2::uuid[], $3::bigint[]) AS v(tenant_id, id, seq)
          WHERE t.tenant_id = v.tenant_id AND t.id = v.id",
    ),
    (
        "endpoint",
        "UPDATE webhook_endpoints t SET version = v.seq FROM UNNEST($1::text[], $2::uuid[], $3::bigint[]) AS v(tenant_id, id, seq)
          WHERE t.tenant_id = v.tenant_id AND t.id = v.id",
    ),
    (
        "repo",
        "UPDATE repo_connections t SET version = v.seq FROM UNNEST($1::text[], $2::uuid[], $3::bigint[]) AS v(tenant_id, id, seq)
          WHERE t.tenant_id = v.tenant_id AND t.id = v.id",
    ),
];

impl Versions {
    /// Notes the event's subject if it is a versioned resource's: its version is the highest
    /// sequence noted.
    fn note(&mut self, stored: &Stored) {
        if let Some((table, id)) = versioned(&stored.envelope.subject) {
            let seq = stored.seq as i64;
            self.seen[table]
                .entry((stored.envelope.tenant.clone(), id))
                .and_modify(|v| *v = seq.max(*v))
                .or_insert(seq);
        }
    }

    /// Sets the versions noted, one statement per read model that has any: after the events'
    /// own statements, so a resource created in the same transaction has its row.
    pub async fn write(self, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
        for ((_, sql), seen) in SET_VERSIONS.iter().zip(self.seen) {
            if seen.is_empty() {
                continue;
            }
            let (keys, seqs): (Vec<_>, Vec<_>) = seen.into_iter().unzip();
            let (tenants, ids): (Vec<_>, Vec<_>) = keys.into_iter().unzip();
            sqlx::query(*sql).bind(tenants).bind(ids).bind(seqs).execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// The read model ([`SET_VERSIONS`]'s index) of the resource whose subject this is, and its
/// id: such subjects are `<ns>.evt.<tenant>.<kind>.<id>` (see `taskmesh_events::Namespace`).
fn versioned(subject: &str) -> Option<(usize, Uuid)> {
    let [_, "evt", _, kind, id] = subject.split('.').collect::<Vec<_>>()[..] else { return None };
    let table = SET_VERSIONS.iter().position(|(k, _)| *k == kind)?;
    Some((table, id.parse().ok()?))
}

async fn apply_event(tx: &mut Tx<'_>, stored: &Stored) -> Result<(), sqlx::Error> {
    let env = &stored.envelope;
    let tenant = env.tenant.as_str();
    let at = env.occurred_at;
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
        // A change holds the whole connection: its row takes every setting (not its creation
        // time). A commit status failure on record stays, unless the token, API URL or
        // repository it was of changed.
        Event::RepoConnectionCreated(e) | Event::RepoConnectionUpdated(taskmesh_events::RepoConnectionUpdated(e)) => {
            sqlx::query(
                "INSERT INTO repo_connections (id, tenant_id, forge, repository, secret, branches, workflow, created_at,
                                              status_token, api_url, tags, paths, pipeline_file, submodule_repositories,
                                              pull_requests, previous_secret, previous_secret_until)
                 VALUES ($1, $2, $8, $3, $4, $5, $6, $7, $9, $10, $11, $12, $13, $14, $15, $16, $17)
                 ON CONFLICT (id) DO UPDATE SET repository = EXCLUDED.repository, secret = EXCLUDED.secret,
                     branches = EXCLUDED.branches, workflow = EXCLUDED.workflow, status_token = EXCLUDED.status_token,
                     api_url = EXCLUDED.api_url, tags = EXCLUDED.tags, paths = EXCLUDED.paths,
                     pipeline_file = EXCLUDED.pipeline_file, submodule_repositories = EXCLUDED.submodule_repositories,
                     pull_requests = EXCLUDED.pull_requests, previous_secret = EXCLUDED.previous_secret,
                     previous_secret_until = EXCLUDED.previous_secret_until,
                     status_failure = CASE
                         WHEN repo_connections.status_token IS DISTINCT FROM EXCLUDED.status_token
                           OR repo_connections.api_url IS DISTINCT FROM EXCLUDED.api_url
                           OR repo_connections.repository IS DISTINCT FROM EXCLUDED.repository
                         THEN NULL ELSE repo_connections.status_failure END
                 WHERE repo_connections.tenant_id = EXCLUDED.tenant_id",
            )
            .bind(e.connection_id)
            .bind(tenant)
            .bind(&e.repository)
            .bind(serde_json::to_string(&e.secret).expect("serialises"))
            .bind(&e.branches)
            .bind(e.workflow.as_ref().map(sqlx::types::Json))
            .bind(at)
            .bind(e.forge.as_str())
            .bind(e.status_token.as_ref().map(|t| serde_json::to_string(t).expect("serialises")))
            .bind(&e.api_url)
            .bind(&e.tags)
            .bind(&e.paths)
            .bind(&e.pipeline_file)
            .bind(&e.submodule_repositories)
            .bind(e.pull_requests)
            .bind(e.previous_secret.as_ref().map(|s| serde_json::to_string(s).expect("serialises")))
            .bind(e.previous_secret_until)
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
                "UPDATE schedules SET last_tick = $3, last_run_id = COALESCE($4, last_run_id),
                   ticks = GREATEST(ticks + 1, COALESCE($5, 0))
                 WHERE tenant_id = $1 AND id = $2",
            )
            .bind(tenant)
            .bind(e.schedule_id)
            .bind(e.tick)
            .bind(e.run_id)
            .bind(e.count.map(|c| i64::try_from(c).unwrap_or(i64::MAX)))
            .execute(&mut **tx)
            .await?;
        }
        Event::ScheduleUpdated(e) => {
            sqlx::query("UPDATE schedules SET spec = $3 WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(e.schedule_id)
                .bind(sqlx::types::Json(&e.spec))
                .execute(&mut **tx)
                .await?;
        }
        Event::ScheduleRunRefused(e) => {
            // That run never existed (when it is still the last tick's, as the fold judges it).
            sqlx::query(
                "UPDATE schedules SET last_run_id = NULL
                 WHERE tenant_id = $1 AND id = $2 AND last_run_id = $3 AND last_tick = $4",
            )
            .bind(tenant)
            .bind(e.schedule_id)
            .bind(e.run_id)
            .bind(e.tick)
            .execute(&mut **tx)
            .await?;
        }
        Event::ScheduleTriggered(e) => {
            sqlx::query("UPDATE schedules SET last_run_id = $3 WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(e.schedule_id)
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
            // Its failed deliveries go with it (none can be sent again).
            for delete in [
                "DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2",
                "DELETE FROM webhook_delivery_failures WHERE tenant_id = $1 AND endpoint_id = $2",
            ] {
                sqlx::query(delete).bind(tenant).bind(e.endpoint_id).execute(&mut **tx).await?;
            }
        }
        // One row per delivery: a later failure (of a retry) replaces an earlier one; a
        // redelivered event changes nothing.
        Event::WebhookDeliveryFailed(e) => {
            sqlx::query(
                "INSERT INTO webhook_delivery_failures
                 (tenant_id, endpoint_id, message_id, attempts, error, payload, failed_at, seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (endpoint_id, message_id) DO UPDATE SET attempts = EXCLUDED.attempts,
                   error = EXCLUDED.error, payload = EXCLUDED.payload, failed_at = EXCLUDED.failed_at,
                   seq = EXCLUDED.seq, retried_at = NULL
                 WHERE webhook_delivery_failures.seq < EXCLUDED.seq",
            )
            .bind(tenant)
            .bind(e.endpoint_id)
            .bind(&e.message_id)
            .bind(i32::try_from(e.attempts).unwrap_or(i32::MAX))
            .bind(&e.error)
            .bind(sqlx::types::Json(&e.payload))
            .bind(at)
            .bind(stored.seq as i64)
            .execute(&mut **tx)
            .await?;
        }
        // The first disabling stands (two notifiers may both decide it).
        Event::WebhookEndpointDisabled(e) => {
            sqlx::query(
                "UPDATE webhook_endpoints SET disabled_at = $3, disabled_reason = $4
                 WHERE tenant_id = $1 AND id = $2 AND disabled_at IS NULL",
            )
            .bind(tenant)
            .bind(e.endpoint_id)
            .bind(at)
            .bind(&e.reason)
            .execute(&mut **tx)
            .await?;
        }
        Event::WebhookEndpointEnabled(e) => {
            sqlx::query(
                "UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL WHERE tenant_id = $1 AND id = $2",
            )
            .bind(tenant)
            .bind(e.endpoint_id)
            .execute(&mut **tx)
            .await?;
        }
        Event::WebhookEndpointUpdated(e) => {
            sqlx::query(
                "UPDATE webhook_endpoints SET url = COALESCE($3, url), event_types = COALESCE($4, event_types)
                 WHERE tenant_id = $1 AND id = $2",
            )
            .bind(tenant)
            .bind(e.endpoint_id)
            .bind(&e.url)
            .bind(&e.event_types)
            .execute(&mut **tx)
            .await?;
        }
        // The secret replaced signs too until `previous_until` (on the right of `SET`, `secret`
        // is the row's before the update).
        Event::WebhookEndpointSecretRotated(e) => {
            sqlx::query(
                "UPDATE webhook_endpoints SET secret = $3, previous_until = $4,
                     previous_secret = CASE WHEN $4::timestamptz IS NULL THEN NULL ELSE secret END
                 WHERE tenant_id = $1 AND id = $2",
            )
            .bind(tenant)
            .bind(e.endpoint_id)
            .bind(serde_json::to_string(&e.secret).expect("serialises"))
            .bind(e.previous_until)
            .execute(&mut **tx)
            .await?;
        }
        // Only the notifiers read it (on the endpoint's log).
        Event::WebhookEndpointRecovered(_) => {}
        Event::CommitStatusFailed(e) => {
            // (`seq`: which failure this is, for a notifier deciding whether a status sent since
            // clears it.)
            let failure = serde_json::json!({
                "at": at, "run_id": e.run_id, "commit": e.commit, "state": e.state, "error": e.error,
                "seq": stored.seq,
            });
            sqlx::query("UPDATE repo_connections SET status_failure = $3 WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(e.connection_id)
                .bind(sqlx::types::Json(failure))
                .execute(&mut **tx)
                .await?;
        }
        Event::CommitStatusRecovered(e) => {
            sqlx::query("UPDATE repo_connections SET status_failure = NULL WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(e.connection_id)
                .execute(&mut **tx)
                .await?;
        }
        // Marks the failure it sent again, not one that came after it.
        Event::WebhookDeliveryRetried(e) => {
            sqlx::query(
                "UPDATE webhook_delivery_failures SET retried_at = $4
                 WHERE tenant_id = $1 AND endpoint_id = $2 AND message_id = $3 AND seq = $5",
            )
            .bind(tenant)
            .bind(e.endpoint_id)
            .bind(&e.message_id)
            .bind(at)
            .bind(e.failed_seq as i64)
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
                "INSERT INTO webhook_endpoints (id, tenant_id, url, secret, event_types, created_at, format)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(e.endpoint_id)
            .bind(tenant)
            .bind(&e.url)
            .bind(serde_json::to_string(&e.secret).expect("serialises"))
            .bind(&e.event_types)
            .bind(at)
            .bind(e.format.as_str())
            .execute(&mut **tx)
            .await?;
        }
        // Retention removed these ended runs' events: their rows go, as a rebuild would not have
        // them, unless they are of a run of the same id submitted since (a later sequence).
        // Applied after the batch's run rows are written, and the runs then dropped from the
        // fold's cache (`Projector::apply_on`).
        Event::RunsSwept(e) => {
            let (ids, seqs): (Vec<Uuid>, Vec<i64>) =
                e.runs.iter().map(|r| (r.run_id, i64::try_from(r.last_seq).unwrap_or(i64::MAX))).unzip();
            sqlx::query(
                "WITH k AS (SELECT r.id FROM runs r JOIN UNNEST($2::uuid[], $3::bigint[]) AS s(id, seq) ON r.id = s.id
                             WHERE r.tenant_id = $1 AND r.last_seq <= s.seq),
                      a AS (DELETE FROM step_attempts t USING k WHERE t.tenant_id = $1 AND t.run_id = k.id),
                      s AS (DELETE FROM steps t USING k WHERE t.tenant_id = $1 AND t.run_id = k.id)
                 DELETE FROM runs t USING k WHERE t.tenant_id = $1 AND t.id = k.id",
            )
            .bind(tenant)
            .bind(&ids)
            .bind(&seqs)
            .execute(&mut **tx)
            .await?;
        }
        // Retention removed the tenant's audit records below this sequence (applied after the
        // batch's own audit records, as `RunsSwept` is).
        Event::AuditSwept(e) => {
            sqlx::query("DELETE FROM audit_log WHERE tenant_id = $1 AND seq < $2")
                .bind(tenant)
                .bind(i64::try_from(e.below_seq).unwrap_or(i64::MAX))
                .execute(&mut **tx)
                .await?;
        }
        // Run events are folded per batch (see `fold`), audit records gathered ([`AuditRows`]);
        // nothing else is left out.
        event => {
            debug_assert!(crate::fold::is_run_event(event) || is_audit(event), "{} is not projected", event.type_name())
        }
    }
    Ok(())
}

/// Whether an event is an audit record (gathered into [`AuditRows`], not applied on its own).
pub fn is_audit(event: &Event) -> bool {
    matches!(event, Event::AuditRecorded(_) | Event::AuditBatchRecorded(_))
}

/// A batch's audit records (`AuditRecorded`, and each record of an `AuditBatchRecorded` at its
/// place, `part`, in the event), inserted in one statement with the batch's
/// checkpoint: a request's record costs no statement of its own, and a batch of run events
/// and audit records needs no transaction (see `Projector::apply_batch`).
#[derive(Default)]
pub struct AuditRows<'a> {
    tenants: Vec<&'a str>,
    seqs: Vec<i64>,
    parts: Vec<i32>,
    ids: Vec<Uuid>,
    key_ids: Vec<Option<Uuid>>,
    actors: Vec<&'a str>,
    methods: Vec<&'a str>,
    paths: Vec<&'a str>,
    routes: Vec<Option<&'a str>>,
    statuses: Vec<i32>,
    ips: Vec<Option<&'a str>>,
    user_agents: Vec<Option<&'a str>>,
    ats: Vec<DateTime<Utc>>,
}

impl<'a> AuditRows<'a> {
    /// Takes `stored` if it is an audit record, or several; says whether it was.
    pub fn take(&mut self, stored: &'a Stored) -> bool {
        match &stored.envelope.event {
            Event::AuditRecorded(e) => self.push(stored, 0, stored.envelope.id, e),
            Event::AuditBatchRecorded(b) => {
                for (part, r) in (0..).zip(&b.records) {
                    self.push(stored, part, r.id, &r.call);
                }
            }
            _ => return false,
        }
        true
    }

    fn push(&mut self, stored: &'a Stored, part: i32, id: Uuid, e: &'a AuditRecorded) {
        self.tenants.push(&stored.envelope.tenant);
        self.seqs.push(stored.seq as i64);
        self.parts.push(part);
        self.ids.push(id);
        self.key_ids.push(e.key_id);
        self.actors.push(&e.actor);
        self.methods.push(&e.method);
        self.paths.push(&e.path);
        self.routes.push(e.route.as_deref());
        self.statuses.push(i32::from(e.status));
        self.ips.push(e.ip.as_deref());
        self.user_agents.push(e.user_agent.as_deref());
        self.ats.push(e.at);
    }

    /// Adds the insert of what it took to `writes` (nothing, if it took nothing).
    pub fn write(&self, writes: &mut Alongside) -> Result<(), StoreError> {
        if self.seqs.is_empty() {
            return Ok(());
        }
        writes.add(
            "INSERT INTO audit_log (tenant_id, seq, part, id, key_id, actor, method, path, route, status, ip, user_agent, at)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::int[], $4::uuid[], $5::uuid[], $6::text[], $7::text[],
                                  $8::text[], $9::text[], $10::int[], $11::text[], $12::text[], $13::timestamptz[])
             WHERE {if_checkpoint_moved}
             ON CONFLICT DO NOTHING",
            |b| {
                b.bind(&self.tenants)?
                    .bind(&self.seqs)?
                    .bind(&self.parts)?
                    .bind(&self.ids)?
                    .bind(&self.key_ids)?
                    .bind(&self.actors)?
                    .bind(&self.methods)?
                    .bind(&self.paths)?
                    .bind(&self.routes)?
                    .bind(&self.statuses)?
                    .bind(&self.ips)?
                    .bind(&self.user_agents)?
                    .bind(&self.ats)?;
                Ok(())
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resources_version_is_kept_in_its_own_read_model_found_from_its_subject() {
        let id = Uuid::now_v7();
        let ns = taskmesh_events::Namespace::new("tm").unwrap();
        let table =
            |subject: String| versioned(&subject).map(|(i, id)| (SET_VERSIONS[i].1.split(' ').nth(1).unwrap(), id));
        assert_eq!(table(ns.schedule("t", id)), Some(("schedules", id)));
        assert_eq!(table(ns.webhook_endpoint("t", id)), Some(("webhook_endpoints", id)));
        assert_eq!(table(ns.repo_connection("t", id)), Some(("repo_connections", id)));
        assert_eq!(table(ns.repo_statuses("t", id)), None, "a connection's statuses are not it");
        assert_eq!(table(ns.secret("t", "NAME")), None);
        assert_eq!(table(ns.audit("t")), None);
        assert_eq!(table(format!("tm.cmd.t.schedule.{id}")), None, "not an event's subject");
    }

    #[test]
    fn a_batch_notes_each_resources_highest_sequence_and_nothing_else() {
        use taskmesh_events::{Event, EventMeta, ScheduleTriggered};
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let ns = taskmesh_events::Namespace::new("tm").unwrap();
        let stored = |subject: String, seq: u64| {
            let event = Event::ScheduleTriggered(ScheduleTriggered { schedule_id: a, run_id: a });
            Stored { seq, prev: None, envelope: EventMeta::new("t").envelope(subject, event), part: 0, parts: 1 }
        };
        let mut versions = Versions::default();
        for (subject, seq) in
            [(ns.schedule("t", a), 5), (ns.schedule("t", b), 6), (ns.schedule("t", a), 9), (ns.secret("t", "S"), 10)]
        {
            versions.note(&stored(subject, seq));
        }
        versions.note(&stored(ns.schedule("t", a), 7));
        let schedules: HashMap<_, _> = versions.seen[0].iter().map(|((_, id), v)| (*id, *v)).collect();
        assert_eq!(schedules, HashMap::from([(a, 9), (b, 6)]));
        assert!(versions.seen[1..].iter().all(HashMap::is_empty), "a secret keeps no version");
    }
}
