//! Stream, subject and consumer names. Everything lives under a namespace (default `tm`), so
//! several meshes, or several tests, can share one NATS server without seeing each other.
//!
//! The main streams (docs/architecture.md lists every stream, its limits and its consumers):
//!
//! | stream | subjects | retention | what |
//! |---|---|---|---|
//! | `{NS}_EVENTS` | `{ns}.evt.{tenant}.{aggregate}.{id}` | limits | the event log |
//! | `{NS}_READY` | `{ns}.ready.{tenant}` | limits | work waiting for admission |
//! | `{NS}_DISPATCH` | `{ns}.dispatch.{tenant}.{pool}` | work queue | admitted steps, per label set |
//! | `{NS}_DELIVERIES` | `{ns}.delivery.{tenant}` | work queue | webhook, Slack and e-mail deliveries; commit statuses |
//! | `{NS}_ENDED` | `{ns}.ended.{tenant}` | work queue | runs' ends, for the notifier |
//! | `{NS}_TIMERS` | `{ns}.timer.{tenant}`, `{ns}.timer._platform.sweep` | work queue | run deadlines, schedule ticks, the event log's sweep |
//! | `{NS}_LOGS` | `{ns}.log.{tenant}.{run}.{step}` | limits (age, bytes) | steps' output lines |
//! | `{NS}_CACHE` | `{ns}.cache.{tenant}.{key}` | limits (one per subject) | `cache:` steps' kept outcomes |
//! | `{NS}_BREAKERS` | `{ns}.breaker.{tenant}.{key}` | limits (one per subject) | circuit breakers' state |
//!
//! Commands travel on core NATS request/reply: `{ns}.cmd.ingest.{command}` (queue group
//! `ingest`) and `{ns}.cmd.scheduler.{lease|report}` (queue group `scheduler`); signals on
//! `{ns}.ctl.*`.

use uuid::Uuid;

/// A namespace: the prefix of every stream and subject of one mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

/// Identifies one run aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey {
    pub tenant: String,
    pub run_id: Uuid,
}

/// Checks a subject token: tenant ids, step ids and namespaces must be safe to put in a subject.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Namespace {
    /// A namespace; `None` unless `name` is a valid subject token.
    pub fn new(name: &str) -> Option<Self> {
        is_token(name).then(|| Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn stream(&self, what: &str) -> String {
        format!("{}_{what}", self.0.to_ascii_uppercase().replace('-', "_"))
    }

    pub fn events_stream(&self) -> String {
        self.stream("EVENTS")
    }
    pub fn dispatch_stream(&self) -> String {
        self.stream("DISPATCH")
    }
    /// Work waiting for admission (see `command::Ready`).
    pub fn ready_stream(&self) -> String {
        self.stream("READY")
    }
    pub fn ready_all(&self) -> String {
        format!("{}.ready.>", self.0)
    }
    pub fn ready(&self, tenant: &str) -> String {
        format!("{}.ready.{tenant}", self.0)
    }
    /// One message per active run of a concurrency group: the group's occupancy.
    pub fn groups_stream(&self) -> String {
        self.stream("GROUPS")
    }
    pub fn groups_all(&self) -> String {
        format!("{}.group.>", self.0)
    }
    /// Every active run of one group.
    pub fn group_all(&self, tenant: &str, token: &str) -> String {
        format!("{}.group.{tenant}.{token}.*", self.0)
    }
    pub fn group_member(&self, tenant: &str, token: &str, run_id: Uuid) -> String {
        format!("{}.group.{tenant}.{token}.{run_id}", self.0)
    }
    /// Core NATS request: every gateway answers (an empty body), so each can count the
    /// gateways sharing the rate limits.
    pub fn gateway_pings(&self) -> String {
        format!("{}.ctl.gateways", self.0)
    }
    /// Core NATS: "a dispatch slot may have freed up", for the dispatcher.
    pub fn slot_signals(&self) -> String {
        format!("{}.ctl.slot", self.0)
    }
    /// Core NATS: a run ended cancelled or timed out, so the dispatcher drops its held steps
    /// (a `command::CancelSignal` body).
    pub fn run_ended_signals(&self) -> String {
        format!("{}.ctl.run_ended", self.0)
    }
    /// Core NATS: how an attempt of a step with a `circuit_breaker` went, for the dispatcher (a
    /// `command::BreakerSignal` body).
    pub fn breaker_signals(&self) -> String {
        format!("{}.ctl.breaker", self.0)
    }
    /// Leader leases: one subject per lease.
    pub fn leases_stream(&self) -> String {
        self.stream("LEASES")
    }
    pub fn leases_all(&self) -> String {
        format!("{}.lease.>", self.0)
    }
    pub fn lease(&self, name: &str) -> String {
        format!("{}.lease.{name}", self.0)
    }
    pub fn deliveries_stream(&self) -> String {
        self.stream("DELIVERIES")
    }
    pub fn logs_stream(&self) -> String {
        self.stream("LOGS")
    }
    pub fn logs_all(&self) -> String {
        format!("{}.log.>", self.0)
    }
    /// The log subject of one step of one run.
    pub fn log(&self, key: &RunKey, step: &str) -> String {
        format!("{}.log.{}.{}.{step}", self.0, key.tenant, key.run_id)
    }
    /// Circuit breakers' state, kept by the dispatcher leader for the next one: a subject per
    /// tenant and breaker (its key, a token), holding the last.
    pub fn breakers_stream(&self) -> String {
        self.stream("BREAKERS")
    }
    pub fn breakers_all(&self) -> String {
        format!("{}.breaker.>", self.0)
    }
    /// Every breaker state of one tenant.
    pub fn breakers_tenant(&self, tenant: &str) -> String {
        format!("{}.breaker.{tenant}.*", self.0)
    }
    /// The state of one breaker (its key, a token) of one tenant.
    pub fn breaker(&self, tenant: &str, key: &str) -> String {
        format!("{}.breaker.{tenant}.{key}", self.0)
    }
    /// Kept step outcomes (`cache:`): a subject per tenant and cache key, holding its last.
    pub fn cache_stream(&self) -> String {
        self.stream("CACHE")
    }
    pub fn cache_all(&self) -> String {
        format!("{}.cache.>", self.0)
    }
    /// The kept outcome of one cache key (a hex digest) of one tenant.
    pub fn cache(&self, tenant: &str, key: &str) -> String {
        format!("{}.cache.{tenant}.{key}", self.0)
    }
    /// Every kept outcome of one tenant.
    pub fn cache_tenant(&self, tenant: &str) -> String {
        format!("{}.cache.{tenant}.*", self.0)
    }
    pub fn timers_stream(&self) -> String {
        self.stream("TIMERS")
    }
    pub fn timers_all(&self) -> String {
        format!("{}.timer.>", self.0)
    }
    pub fn timer(&self, tenant: &str) -> String {
        format!("{}.timer.{tenant}", self.0)
    }
    /// The event log's sweep timer (`command::TimerKind::EventLogSweep`): a subject of two
    /// tokens after `timer`, which no tenant's timers subject is.
    pub fn sweep_timer(&self) -> String {
        format!("{}.timer._platform.sweep", self.0)
    }

    /// Every event subject: `{ns}.evt.>`.
    pub fn events_all(&self) -> String {
        format!("{}.evt.>", self.0)
    }
    /// Every run subject of every tenant: `{ns}.evt.*.run.*`.
    pub fn runs_all(&self) -> String {
        format!("{}.evt.*.run.*", self.0)
    }
    /// The subject of one run aggregate.
    pub fn run(&self, key: &RunKey) -> String {
        format!("{}.evt.{}.run.{}", self.0, key.tenant, key.run_id)
    }
    pub fn tenant(&self, tenant: &str) -> String {
        format!("{}.evt.{tenant}.tenant.{tenant}", self.0)
    }
    pub fn api_key(&self, tenant: &str, key_id: Uuid) -> String {
        format!("{}.evt.{tenant}.apikey.{key_id}", self.0)
    }
    /// Every API key subject of one tenant.
    pub fn api_keys_of(&self, tenant: &str) -> String {
        format!("{}.evt.{tenant}.apikey.*", self.0)
    }
    /// Where a key's uses are recorded: apart from the key's own subject, so a use never
    /// races a revocation's expected-sequence append.
    pub fn api_key_use(&self, tenant: &str, key_id: Uuid) -> String {
        format!("{}.evt.{tenant}.keyuse.{key_id}", self.0)
    }
    pub fn repo_connection(&self, tenant: &str, id: Uuid) -> String {
        format!("{}.evt.{tenant}.repo.{id}", self.0)
    }
    /// A repository connection's commit statuses given up, and their clearing: apart from the
    /// connection's own log, whose last event tells executors the connection (and its token).
    pub fn repo_statuses(&self, tenant: &str, id: Uuid) -> String {
        format!("{}.evt.{tenant}.repostatus.{id}", self.0)
    }
    pub fn workflow(&self, tenant: &str, name: &str) -> String {
        format!("{}.evt.{tenant}.workflow.{name}", self.0)
    }
    pub fn secret(&self, tenant: &str, name: &str) -> String {
        format!("{}.evt.{tenant}.secret.{name}", self.0)
    }
    pub fn schedule(&self, tenant: &str, id: Uuid) -> String {
        format!("{}.evt.{tenant}.schedule.{id}", self.0)
    }
    /// Every schedule subject of one tenant.
    pub fn schedules_of(&self, tenant: &str) -> String {
        format!("{}.evt.{tenant}.schedule.*", self.0)
    }
    /// Every schedule subject of every tenant.
    pub fn schedules_all(&self) -> String {
        format!("{}.evt.*.schedule.*", self.0)
    }
    /// Where retention records the runs it removed of a tenant (`RunsSwept`).
    pub fn runs_swept(&self, tenant: &str) -> String {
        format!("{}.evt.{tenant}.retention.runs", self.0)
    }
    /// Where retention records the audit records it removed of a tenant (`AuditSwept`).
    pub fn audit_swept(&self, tenant: &str) -> String {
        format!("{}.evt.{tenant}.retention.audit", self.0)
    }
    /// The tenant an event subject is of: the token after `evt`.
    pub fn event_tenant<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.strip_prefix(self.0.as_str())?.strip_prefix(".evt.")?.split('.').next()
    }
    /// A tenant's audit log: `{ns}.evt.<tenant>.audit.log`.
    pub fn audit(&self, tenant: &str) -> String {
        format!("{}.evt.{tenant}.audit.log", self.0)
    }
    pub fn webhook_endpoint(&self, tenant: &str, id: Uuid) -> String {
        format!("{}.evt.{tenant}.endpoint.{id}", self.0)
    }
    /// Every webhook endpoint subject of one tenant.
    pub fn webhook_endpoints_of(&self, tenant: &str) -> String {
        format!("{}.evt.{tenant}.endpoint.*", self.0)
    }

    /// The kind of aggregate an event subject is of (`run`, `schedule`, `audit`, …): the token
    /// after the tenant's.
    pub fn event_kind<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject.strip_prefix(self.0.as_str())?.strip_prefix(".evt.")?;
        rest.split('.').nth(1)
    }

    /// Parses a run subject back into its key.
    pub fn parse_run(&self, subject: &str) -> Option<RunKey> {
        let rest = subject.strip_prefix(&self.0)?.strip_prefix(".evt.")?;
        let mut parts = rest.split('.');
        let tenant = parts.next()?;
        (parts.next()? == "run").then_some(())?;
        let run_id = parts.next()?.parse().ok()?;
        parts.next().is_none().then(|| RunKey { tenant: tenant.to_string(), run_id })
    }

    pub fn dispatch_all(&self) -> String {
        format!("{}.dispatch.>", self.0)
    }
    /// A step of `tenant` for executors of label set `pool` (see [`pool_token`]).
    pub fn dispatch(&self, tenant: &str, pool: &str) -> String {
        format!("{}.dispatch.{tenant}.{pool}", self.0)
    }
    /// Every queued step of one tenant.
    pub fn dispatch_tenant(&self, tenant: &str) -> String {
        format!("{}.dispatch.{tenant}.*", self.0)
    }
    /// Every queued step for one label set: the filter of that pool's consumer.
    pub fn dispatch_pool(&self, pool: &str) -> String {
        format!("{}.dispatch.*.{pool}", self.0)
    }
    /// The (tenant, pool) of a dispatch subject.
    pub fn parse_dispatch<'a>(&self, subject: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = subject.strip_prefix(self.0.as_str())?.strip_prefix(".dispatch.")?;
        rest.split_once('.')
    }
    /// Live executors: one message per executor, its latest heartbeat (`command::ExecutorBeat`).
    pub fn executors_stream(&self) -> String {
        self.stream("EXECUTORS")
    }
    pub fn executors_all(&self) -> String {
        format!("{}.executor.*", self.0)
    }
    pub fn executor(&self, id: &str) -> String {
        format!("{}.executor.{id}", self.0)
    }
    /// Label sets steps have been dispatched for: one message per pool (`command::Pool`).
    pub fn pools_stream(&self) -> String {
        self.stream("POOLS")
    }
    pub fn pools_all(&self) -> String {
        format!("{}.pool.*", self.0)
    }
    pub fn pool(&self, token: &str) -> String {
        format!("{}.pool.{token}", self.0)
    }
    /// Runs that ended, for the notifier: a work queue the scheduler fills from the run
    /// events it consumes (each message is a terminal event's envelope).
    pub fn ended_stream(&self) -> String {
        self.stream("ENDED")
    }
    pub fn ended_all(&self) -> String {
        format!("{}.ended.>", self.0)
    }
    pub fn ended(&self, tenant: &str) -> String {
        format!("{}.ended.{tenant}", self.0)
    }
    pub fn deliveries_all(&self) -> String {
        format!("{}.delivery.>", self.0)
    }
    pub fn delivery(&self, tenant: &str) -> String {
        format!("{}.delivery.{tenant}", self.0)
    }
    /// The tenant of a delivery subject.
    pub fn parse_delivery<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.strip_prefix(self.0.as_str())?.strip_prefix(".delivery.").filter(|t| is_token(t))
    }

    /// A command handled by ingest.
    pub fn ingest_command(&self, command: &str) -> String {
        format!("{}.cmd.ingest.{command}", self.0)
    }
    pub fn ingest_commands(&self) -> String {
        format!("{}.cmd.ingest.*", self.0)
    }
    /// Cancellation signals to every executor (core NATS).
    pub fn cancel_signals(&self) -> String {
        format!("{}.ctl.cancel", self.0)
    }
    /// Lease requests and result reports from executors to the scheduler.
    pub fn scheduler_command(&self, command: &str) -> String {
        format!("{}.cmd.scheduler.{command}", self.0)
    }
    pub fn scheduler_commands(&self) -> String {
        format!("{}.cmd.scheduler.*", self.0)
    }
}

/// The pool of steps that need no labels.
pub const ANY_POOL: &str = "any";

/// A label set's pool token: [`ANY_POOL`] for none, else `l` and 16 hex digits of a hash of
/// the sorted `key=value` pairs (values compared case-insensitively, as matching does).
pub fn pool_token(runs_on: &std::collections::BTreeMap<String, String>) -> String {
    if runs_on.is_empty() {
        return ANY_POOL.to_string();
    }
    let canonical: String = runs_on.iter().map(|(k, v)| format!("{k}={}\n", v.to_ascii_lowercase())).collect();
    let digest = hmac_sha256::Hash::hash(canonical.as_bytes());
    format!("l{}", hex::encode(&digest[..8]))
}

/// The durable consumer executors of a pool share: `executors` for [`ANY_POOL`].
pub fn pool_consumer(token: &str) -> String {
    if token == ANY_POOL { "executors".to_string() } else { format!("executors-{token}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_subject_round_trips() {
        let ns = Namespace::new("tm").unwrap();
        let key = RunKey { tenant: "default".into(), run_id: Uuid::now_v7() };
        assert_eq!(ns.parse_run(&ns.run(&key)), Some(key.clone()));
        assert_eq!(ns.parse_run("tm.evt.default.repo.x"), None);
        assert_eq!(ns.parse_run("other.evt.default.run.x"), None);
        assert_eq!(ns.event_kind(&ns.run(&key)), Some("run"));
        assert_eq!(ns.event_kind(&ns.audit("acme")), Some("audit"));
        assert_eq!(ns.event_kind(&ns.schedule("acme", Uuid::now_v7())), Some("schedule"));
        assert_eq!(ns.event_kind("other.evt.acme.run.x"), None);
    }

    #[test]
    fn tokens_reject_subject_syntax() {
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
            assert!(!is_token(bad), "{bad:?}");
        }
        assert!(is_token("build-1_x"));
    }

    #[test]
    fn pool_tokens_are_stable_subject_tokens() {
        let set = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(pool_token(&set(&[])), ANY_POOL);
        let gpu = pool_token(&set(&[("gpu", "nvidia"), ("os", "linux")]));
        assert_eq!(gpu, pool_token(&set(&[("os", "linux"), ("gpu", "NVIDIA")])));
        assert_ne!(gpu, pool_token(&set(&[("gpu", "amd")])));
        assert!(is_token(&gpu) && gpu.len() == 17, "{gpu}");
        let ns = Namespace::new("tm").unwrap();
        assert_eq!(ns.parse_dispatch(&ns.dispatch("acme", &gpu)), Some(("acme", gpu.as_str())));
        assert_eq!(ns.parse_delivery(&ns.delivery("acme")), Some("acme"));
        assert_eq!(ns.parse_delivery("tm.delivery.a.b"), None);
        assert_eq!(ns.parse_delivery("other.delivery.acme"), None);
        assert_eq!(pool_consumer(ANY_POOL), "executors");
    }
}
