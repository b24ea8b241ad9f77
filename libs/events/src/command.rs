//! Request/reply contracts: commands sent to ingest, and lease requests and result reports
//! sent by executors to the scheduler. Replies are `Result<T, Problem>` as JSON
//! (`{"Ok": ...}` or `{"Err": problem}`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::{Forge, Role, StepOutcome, Trigger};
use crate::error::Problem;
use crate::workflow::StepDef;

/// Every reply on a command subject.
pub type Reply<T> = Result<T, Problem>;

/// `{ns}.cmd.ingest.submit_run`: start a run of an inline workflow.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SubmitRun {
    pub tenant: String,
    /// The workflow: a definition (validated by ingest), or the name of a stored workflow as a
    /// string, `name` (its latest version) or `name@version`.
    pub workflow: serde_json::Value,
    #[serde(default)]
    pub inputs: BTreeMap<String, serde_json::Value>,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Start no step before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<chrono::DateTime<chrono::Utc>>,
    /// Dispatch priority under contention (-100 to 100, higher first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Labels to find the run by: at most 16, keys 1 to 64 letters, digits, `_`, `-` or `.`,
    /// values at most 256 bytes.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The run's `cache:` steps run rather than reuse a kept outcome (theirs replace it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh_cache: bool,
}

impl SubmitRun {
    /// The run of a schedule's spec for `tick`: its workflow and inputs, triggered by the
    /// schedule (`manual`: by hand, not by the tick's timer).
    pub fn of_schedule(
        tenant: &str,
        schedule_id: Uuid,
        spec: &crate::schedule::ScheduleSpec,
        tick: chrono::DateTime<chrono::Utc>,
        manual: bool,
        idempotency_key: Option<String>,
    ) -> Self {
        Self {
            tenant: tenant.to_string(),
            workflow: spec.workflow.clone(),
            inputs: spec.inputs.clone(),
            trigger: Trigger::Schedule { schedule_id, tick, manual },
            idempotency_key,
            traceparent: None,
            not_before: None,
            priority: None,
            labels: BTreeMap::new(),
            refresh_cache: false,
        }
    }
}

/// `{ns}.cmd.ingest.rerun_run`: a new run of an ended run's workflow and inputs that keeps
/// the steps that succeeded, except those `from` reruns: `failed` (every step that did not
/// succeed) or a step id; either with everything downstream.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RerunRun {
    pub tenant: String,
    pub run_id: Uuid,
    pub from: String,
    #[serde(default)]
    pub key_id: Option<Uuid>,
    /// The new run's `cache:` steps run rather than reuse a kept outcome (theirs replace it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh_cache: bool,
}

/// The reply to [`SubmitRun`].
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RunAccepted {
    pub run_id: Uuid,
    /// Stream sequence of the `RunSubmitted` event.
    pub seq: u64,
    /// True when the idempotency key had been seen: `run_id` is the first run's.
    pub duplicate: bool,
}

/// `{ns}.cmd.ingest.store_workflow`: store a new version of a named workflow.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct StoreWorkflow {
    pub tenant: String,
    pub name: String,
    pub workflow: serde_json::Value,
}

/// The reply to [`StoreWorkflow`].
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowStored {
    pub name: String,
    pub version: u32,
    pub seq: u64,
}

/// `{ns}.cmd.ingest.cancel_run`: cancel a run (queued steps are cancelled, running ones killed).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CancelRun {
    pub tenant: String,
    pub run_id: Uuid,
    pub reason: String,
    #[serde(default)]
    pub key_id: Option<Uuid>,
}

/// A message on the timers work queue: something the scheduler must do at `due`. Until then the
/// consumer hands it back with a nak delayed to `due`, so timers survive restarts and are shared
/// by the scheduler replicas.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Timer {
    /// Whose timer it is; empty for the platform's own (the event log's sweep).
    pub tenant: String,
    pub due: chrono::DateTime<chrono::Utc>,
    pub kind: TimerKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TimerKind {
    /// The run's `timeout_seconds` are up.
    RunTimeout {
        run_id: Uuid,
        /// The stream sequence of the `RunSubmitted` of the run it is the deadline of (none
        /// on timers armed before 2026-12-07): a run of the same id submitted since (its
        /// idempotency key, once the first's events aged out of the log) has a deadline of its
        /// own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        submitted_seq: Option<u64>,
    },
    /// A schedule's tick is due.
    ScheduleTick { schedule_id: Uuid, tick: chrono::DateTime<chrono::Utc> },
    /// The event log's sweep is due (`nats.events_max_age_days`): one timer, on
    /// `Namespace::sweep_timer`, that the scheduler replicas share, so one of them sweeps.
    EventLogSweep,
}

/// `{ns}.cmd.ingest.set_secret`: the value arrives sealed; ingest never sees it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SetSecret {
    pub tenant: String,
    pub name: String,
    pub sealed: taskmesh_secrets::Sealed,
}

/// `{ns}.cmd.ingest.delete_secret`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DeleteSecret {
    pub tenant: String,
    pub name: String,
}

/// `{ns}.cmd.ingest.purge_cache`: forget every `cache:` outcome the tenant has kept.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PurgeCache {
    pub tenant: String,
}

/// The reply to [`PurgeCache`]: how many kept outcomes went.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct Purged {
    pub purged: u64,
}

/// `{ns}.cmd.ingest.resend_commit_status`: report a push-started run's state on its commit
/// again (after the forge was down, or refused the connection's token).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ResendCommitStatus {
    pub tenant: String,
    pub run_id: Uuid,
}

/// The reply to [`ResendCommitStatus`]: the state queued for the commit.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct StatusQueued {
    pub state: CommitState,
}

/// `{ns}.cmd.ingest.create_schedule`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreateSchedule {
    pub tenant: String,
    pub spec: crate::schedule::ScheduleSpec,
}

/// `{ns}.cmd.ingest.delete_schedule`: delete a schedule (idempotent).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DeleteSchedule {
    pub tenant: String,
    pub schedule_id: Uuid,
    /// The versions the deletion is conditional on (`If-Match`; see [`UpdateSchedule::if_match`]);
    /// one deleted already stays deleted, whatever it names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_match: Option<Vec<u64>>,
}

/// `{ns}.cmd.ingest.update_schedule`: change a schedule's spec in place by a JSON merge patch
/// (RFC 7396) of it. Answers [`Created`] (the last seq, for a patch that changes nothing).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct UpdateSchedule {
    pub tenant: String,
    pub schedule_id: Uuid,
    /// The merge patch: an object whose fields replace the spec's (`inputs` and an inline
    /// `workflow` are merged in turn); `null` removes one (back to its default).
    pub patch: serde_json::Value,
    /// The versions (the sequence of the schedule's last event) the change is conditional on,
    /// from `If-Match`: refused with `precondition-failed` unless the schedule is at one of
    /// them (none given: never). Absent: unconditional. (The same for the other resources'
    /// changes that take it.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_match: Option<Vec<u64>>,
}

/// `{ns}.cmd.ingest.trigger_schedule`: start a run of the schedule's workflow and inputs now,
/// paused or not. Answers [`RunAccepted`].
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TriggerSchedule {
    pub tenant: String,
    pub schedule_id: Uuid,
    /// Triggering again with the same key finds the first run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// How the idempotency keys Taskmesh makes itself begin: a schedule's ticks and runs by hand
/// (`schedule:{id}:`, see [`crate::schedule::tick_key`]), a forge delivery's
/// (`github:{connection}:`, `gitlab:…`, `gitea:…`; ids are UUIDs) and a CloudEvent's
/// (`cloudevent:`). A client's key may not be shaped so ([`is_system_key`]): the run id it
/// derives would be taken before Taskmesh's own key took it, and that tick or event would find
/// the client's run as its own.
pub const SYSTEM_KEY_PREFIXES: [&str; 5] = ["cloudevent:", "schedule:", "github:", "gitlab:", "gitea:"];

/// Whether `key` has the shape of a key Taskmesh makes itself: `cloudevent:` and anything, or
/// `schedule:`, `github:`, `gitlab:` or `gitea:` followed by a UUID and `:` (keys are compared
/// exactly, so only that shape can name the same run; `github:org/repo@sha` is a client's).
pub fn is_system_key(key: &str) -> bool {
    let [cloudevent, by_id @ ..] = SYSTEM_KEY_PREFIXES;
    key.starts_with(cloudevent)
        || by_id
            .iter()
            .filter_map(|p| key.strip_prefix(p))
            .any(|rest| rest.split_once(':').is_some_and(|(id, _)| id.len() == 36 && Uuid::parse_str(id).is_ok()))
}

/// `{ns}.cmd.ingest.backfill_schedule`: start the runs of a schedule's ticks from `from` to
/// `to` (both included, `to` not in the future, at most [`MAX_BACKFILL_TICKS`] ticks; an active
/// schedule's ticks its timers may still fire are left to them). A tick's run is the one its
/// timer starts (the same idempotency key), so a tick that has its run already is not run
/// again. Answers [`Backfilled`].
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct BackfillSchedule {
    pub tenant: String,
    pub schedule_id: Uuid,
    pub from: chrono::DateTime<chrono::Utc>,
    pub to: chrono::DateTime<chrono::Utc>,
}

/// The most ticks one backfill starts (as many as a batch of runs).
pub const MAX_BACKFILL_TICKS: usize = 100;

impl BackfillSchedule {
    /// Checks the range: `from` not after `to`, `to` not after `now`, `from` not before 1970
    /// (the time zone library has no answer for times far back).
    pub fn check_range(&self, now: chrono::DateTime<chrono::Utc>) -> Result<(), Problem> {
        let refuse = |field: &str, message: &str| {
            Err(Problem::new(crate::error::ErrorCode::BadRequest, format!("{field}: {message}"))
                .with_errors(vec![crate::error::FieldError { field: field.into(), message: message.into() }]))
        };
        if self.from > self.to {
            return refuse("from", "must not be after to");
        }
        if self.to > now {
            return refuse("to", "must not be in the future: the ticks to come fire on their own");
        }
        if self.from < chrono::DateTime::UNIX_EPOCH {
            return refuse("from", "must not be before 1970");
        }
        Ok(())
    }
}

/// The reply to [`BackfillSchedule`]: each tick's run, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct Backfilled {
    pub runs: Vec<BackfilledRun>,
    /// The range's end as run: `to`, or, for a schedule not paused, just before the first tick
    /// its timers may still fire (they fire it, or catch it up, or record it skipped).
    pub until: chrono::DateTime<chrono::Utc>,
}

/// A tick of a backfill and its run.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct BackfilledRun {
    pub tick: chrono::DateTime<chrono::Utc>,
    pub run_id: Uuid,
    /// The tick had its run already (its timer's, or an earlier backfill's): not run again.
    pub duplicate: bool,
}

/// `{ns}.cmd.ingest.toggle_schedule`: pause or resume.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ToggleSchedule {
    pub tenant: String,
    pub schedule_id: Uuid,
    pub pause: bool,
}

/// `{ns}.ctl.cancel` (core NATS, to every executor): kill this run's running steps.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CancelSignal {
    pub tenant: String,
    pub run_id: Uuid,
}

/// `{ns}.ctl.breaker` (core NATS, to the dispatcher leader): how an attempt of a step with a
/// `circuit_breaker` went, as its executor reported it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct BreakerSignal {
    pub tenant: String,
    /// The breaker's key.
    pub key: String,
    /// The breaker as the step defines it: failed attempts in a row that open it, and how long.
    pub failures: u32,
    pub cooldown_seconds: u64,
    /// The attempt's step, so a breaker waiting for its probe hears only the probe.
    pub run_id: Uuid,
    pub step: String,
    /// How the attempt went: `null` when it gave no verdict (it took a cached outcome, could
    /// not start, was cancelled, or its lease was denied).
    pub succeeded: Option<bool>,
}

/// `{ns}.cmd.ingest.create_tenant`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreateTenant {
    pub tenant_id: String,
    pub name: String,
}

/// `{ns}.cmd.ingest.create_api_key`: the caller generated the key and sends only its hash.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreateApiKey {
    pub tenant: String,
    pub key_id: Uuid,
    pub role: Role,
    pub key_hash: String,
    pub prefix: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// `{ns}.cmd.ingest.revoke_api_key`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RevokeApiKey {
    pub tenant: String,
    pub key_id: Uuid,
}

/// `{ns}.cmd.ingest.touch_api_key`: the key was used (for its last-used time).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TouchApiKey {
    pub tenant: String,
    pub key_id: Uuid,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// `{ns}.cmd.ingest.record_audit`: one mutating API call, for the tenant's audit log.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RecordAudit {
    pub tenant: String,
    /// Unique per call: the audit event's id, so a retried command records it once.
    pub id: Uuid,
    pub record: crate::AuditRecorded,
}

/// `{ns}.cmd.ingest.record_audits`: several mutating API calls of one tenant (1 to
/// [`crate::MAX_AUDIT_BATCH`]), appended as one `AuditBatchRecorded`. The first record's id
/// deduplicates the append, so a retried command records them once.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RecordAudits {
    pub tenant: String,
    pub records: Vec<crate::AuditedCall>,
}

/// `{ns}.cmd.ingest.create_repo_connection`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreateRepoConnection {
    pub tenant: String,
    pub forge: Forge,
    pub repository: String,
    /// Sealed by the gateway.
    pub secret: taskmesh_secrets::Sealed,
    #[serde(default)]
    pub branches: Vec<String>,
    /// Tag patterns whose pushes start runs; empty: none.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Path patterns a branch push must change a file of; empty: any.
    #[serde(default)]
    pub paths: Vec<String>,
    /// The workflow its pushes run; none: the one in `pipeline_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<serde_json::Value>,
    /// The path of the workflow's file in the repository, read at each pushed commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_file: Option<String>,
    /// A token of the forge's API, sealed by the gateway: runs then report commit statuses
    /// (and the pipeline file is read with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_token: Option<taskmesh_secrets::Sealed>,
    /// The forge's API base URL; none: the forge's public one (required for Gitea).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// Repositories at the forge a checkout may fetch as submodules with the token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub submodule_repositories: Vec<String>,
    /// Pull requests from the repository's own branches start runs too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pull_requests: bool,
}

/// `{ns}.cmd.ingest.update_repo_connection`: change a connection's settings. A field left
/// out keeps its value; `null` (for `status_token` and `api_url`) removes it. Giving
/// `workflow` drops a `pipeline_file`, and the other way round. The outcome is checked as a
/// new connection is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct UpdateRepoConnection {
    pub tenant: String,
    pub connection_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// A new webhook secret, sealed by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<taskmesh_secrets::Sealed>,
    /// With a new `secret`: until when the one it replaces is still taken; none: not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_until: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branches: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_file: Option<String>,
    /// A new token sealed by the gateway; `null`: the connection keeps none.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub status_token: Option<Option<taskmesh_secrets::Sealed>>,
    /// A new API base URL; `null`: the forge's public one.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub api_url: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submodule_repositories: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_requests: Option<bool>,
    /// The versions the change is conditional on (`If-Match`; see [`UpdateSchedule::if_match`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_match: Option<Vec<u64>>,
}

/// For a field that may be left out, given, or given as `null` (`Option<Option<T>>` with
/// `#[serde(default, deserialize_with = "present")]`): a field that is there, `null` included,
/// is `Some`.
pub fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A run's state as a forge shows it on a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommitState {
    /// Started, not ended.
    Pending,
    Success,
    /// Failed or timed out.
    Failure,
    /// Cancelled.
    Cancelled,
}

/// A message on the deliveries stream (`{ns}.delivery.{tenant}`, beside the webhook
/// deliveries): a webhook-triggered run's state, to report on its commit through the forge's
/// API with its connection's status token. The scheduler enqueues one when the run is
/// submitted (`pending`) and one when it ends.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CommitStatus {
    pub tenant: String,
    pub connection_id: Uuid,
    pub forge: Forge,
    /// `owner/name`, or GitLab's project path.
    pub repository: String,
    pub commit: String,
    pub state: CommitState,
    pub run_id: Uuid,
    /// The workflow's name: the status is named after it on the commit (see
    /// [`CommitStatus::context`]).
    pub workflow: String,
    /// A pull (merge) request's run: the status is `taskmesh/{workflow}/pr`, apart from the
    /// push's on the same commit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pull_request: bool,
}

impl CommitStatus {
    /// The status to report `state` of run `key` with, if a forge push or pull (merge) request
    /// started it (`trigger`).
    pub fn of_run(key: &crate::RunKey, trigger: &crate::Trigger, workflow: &str, state: CommitState) -> Option<Self> {
        let crate::Trigger::Webhook { forge, connection_id, repository, commit: Some(commit), pull_request, .. } =
            trigger
        else {
            return None;
        };
        Some(Self {
            tenant: key.tenant.clone(),
            connection_id: *connection_id,
            forge: *forge,
            repository: repository.clone(),
            commit: commit.clone(),
            state,
            run_id: key.run_id,
            workflow: workflow.to_string(),
            pull_request: pull_request.is_some(),
        })
    }

    /// The status's name on the commit: `taskmesh/{workflow}`, with `/pr` for a pull request's.
    pub fn context(&self) -> String {
        match self.pull_request {
            true => format!("taskmesh/{}/pr", self.workflow),
            false => format!("taskmesh/{}", self.workflow),
        }
    }
}

/// A circuit breaker's state as the dispatcher leader keeps it on `{NS}_BREAKERS`
/// (`{ns}.breaker.{tenant}.{key}`), for the next leader and for `GET /v1/circuit-breakers`,
/// while it has something to remember. Times are wall-clock; the probe out, if any, is not
/// kept.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct BreakerState {
    pub tenant: String,
    pub key: String,
    /// Failed attempts in a row.
    pub failures: u32,
    /// When the last failure was heard of.
    pub failed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Until when it is open (past: the next step goes as a probe); none: closed.
    pub open_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Failed attempts in a row that open it, and how long it stays open.
    pub threshold: u32,
    pub cooldown_seconds: u64,
}

/// `{ns}.cmd.ingest.delete_integration`: delete a webhook endpoint or a repository connection.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DeleteIntegration {
    pub tenant: String,
    pub kind: IntegrationKind,
    pub id: Uuid,
    /// The versions the deletion is conditional on (`If-Match`; see [`UpdateSchedule::if_match`]);
    /// one deleted already stays deleted, whatever it names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_match: Option<Vec<u64>>,
}

/// Which kind of integration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IntegrationKind {
    WebhookEndpoint,
    RepoConnection,
}

/// `{ns}.cmd.ingest.create_webhook_endpoint`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreateWebhookEndpoint {
    pub tenant: String,
    pub url: String,
    /// The signing secret, generated and sealed by the gateway.
    pub secret: taskmesh_secrets::Sealed,
    #[serde(default)]
    pub event_types: Vec<String>,
    #[serde(default, skip_serializing_if = "crate::catalog::EndpointFormat::is_standard")]
    pub format: crate::catalog::EndpointFormat,
}

/// One notification to one webhook endpoint: a message on the deliveries queue (from the
/// notifier's fan-out, or a failed one's retry).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Delivery {
    pub tenant: String,
    pub endpoint_id: Uuid,
    /// `webhook-id`: the event's id.
    pub message_id: String,
    /// The exact JSON body to send.
    pub payload: serde_json::Value,
}

/// `{ns}.cmd.ingest.retry_webhook_delivery`: send a failed webhook delivery once more.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RetryWebhookDelivery {
    pub tenant: String,
    pub endpoint_id: Uuid,
    pub message_id: String,
    /// The sequence of its `WebhookDeliveryFailed` event (its body is read from there).
    pub seq: u64,
}

/// `{ns}.cmd.ingest.enable_webhook_endpoint`: enable a disabled webhook endpoint again.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct EnableWebhookEndpoint {
    pub tenant: String,
    pub endpoint_id: Uuid,
}

/// `{ns}.cmd.ingest.update_webhook_endpoint`: change an endpoint's URL or the events it is
/// sent (a field left out is unchanged).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct UpdateWebhookEndpoint {
    pub tenant: String,
    pub endpoint_id: Uuid,
    /// The endpoint's format, as the gateway read it (it never changes): a new URL is checked
    /// for it.
    pub format: crate::catalog::EndpointFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_types: Option<Vec<String>>,
    /// The versions the change is conditional on (`If-Match`; see [`UpdateSchedule::if_match`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_match: Option<Vec<u64>>,
}

/// `{ns}.cmd.ingest.rotate_webhook_secret`: replace an endpoint's signing secret.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RotateWebhookSecret {
    pub tenant: String,
    pub endpoint_id: Uuid,
    /// The new secret, generated and sealed by the gateway.
    pub secret: taskmesh_secrets::Sealed,
    /// Until when the secret it replaces signs too; none: not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// The reply to a command that creates, changes or deletes a resource: its id and the
/// sequence of the event written (or of its last, where nothing was).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Created {
    pub id: String,
    pub seq: u64,
}

/// A message on the dispatch stream: one step ready to run.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Dispatch {
    pub tenant: String,
    pub run_id: Uuid,
    pub dispatch: u32,
    /// The step, with its `${{ }}` templates rendered.
    pub step: StepDef,
    /// Not to start before this time: the executor hands the message back until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// For a `checkout` step: the commit to check out into its working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout: Option<crate::catalog::Checkout>,
    /// For a `cache:` step: run it rather than reuse a kept outcome, and keep its success in
    /// place of that (its run was submitted with `refresh_cache`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh_cache: bool,
}

/// `{ns}.ready.<tenant>`: work waiting for admission control (the scheduler's dispatcher).
/// The READY stream holds what waits: an entry is deleted once all it holds is admitted.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ready {
    /// A dispatched step, to go onto the dispatch queue once the tenant's concurrency limit, its
    /// rate-limit bucket and its `not_before` allow. (Entries since 2026-12-06 are `Steps`,
    /// even of one step; the dispatcher still reads this form.)
    Step(Box<ReadyStep>),
    /// Steps that one decision dispatched together (a fan-out's), in order: one entry for
    /// all, each admitted on its own as a `Step` would be. The entry is removed once the last
    /// of them is admitted.
    Steps { steps: Vec<ReadyStep> },
    /// A run to be admitted once its concurrency group and its tenant's limit of concurrent
    /// runs both have room.
    Run {
        tenant: String,
        run_id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        concurrency: Option<crate::catalog::RunConcurrency>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant_max_runs: Option<u32>,
    },
}

impl Ready {
    /// The message id of a `READY` entry of run `run_id` holding the steps `markers` (step,
    /// dispatch n), in order, so that the same entry enqueued again, and only it, is
    /// deduplicated: a lone step's is `{run}:{step}:{dispatch}` (as before entries held
    /// several); several steps' adds their count and a digest of them all.
    pub fn entry_id(run_id: Uuid, markers: &[(String, u32)]) -> String {
        let Some((step, dispatch)) = markers.first() else { return format!("{run_id}:") };
        if markers.len() == 1 {
            return format!("{run_id}:{step}:{dispatch}");
        }
        let all: String = markers.iter().map(|(s, d)| format!("{s}:{d}\n")).collect();
        let digest = hex::encode(&hmac_sha256::Hash::hash(all.as_bytes())[..8]);
        format!("{run_id}:{step}:{dispatch}+{}:{digest}", markers.len())
    }

    /// Encodes `steps` (dispatched together, in order) as `READY` entries of [`Ready::Steps`],
    /// each of at most `max_bytes` unless a single step is larger (it then goes alone). Returns
    /// each entry's body with how many of `steps`, taken in order, it holds.
    pub fn entries(steps: Vec<ReadyStep>, max_bytes: usize) -> serde_json::Result<Vec<(Vec<u8>, usize)>> {
        const HEAD: &[u8] = br#"{"kind":"steps","steps":["#;
        const TAIL: &[u8] = b"]}";
        let mut entries = Vec::new();
        let (mut body, mut n) = (Vec::new(), 0);
        for step in steps {
            let item = serde_json::to_vec(&step)?;
            if n > 0 && body.len() + 1 + item.len() + TAIL.len() > max_bytes {
                body.extend_from_slice(TAIL);
                entries.push((std::mem::take(&mut body), std::mem::take(&mut n)));
            }
            body.extend_from_slice(if n == 0 { HEAD } else { b"," });
            body.extend_from_slice(&item);
            n += 1;
        }
        if n > 0 {
            body.extend_from_slice(TAIL);
            entries.push((body, n));
        }
        Ok(entries)
    }
}

/// A step waiting for admission: one of a [`Ready::Steps`] entry (or a [`Ready::Step`]).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ReadyStep {
    pub dispatch: Dispatch,
    /// Effective priority: the step's, else the run's, else the workflow's, else 0.
    pub priority: i32,
}

/// Identifies one lease on a step: the dispatch, the dispatch message's stream sequence, and
/// JetStream's delivery count of that message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Lease {
    pub dispatch: u32,
    /// Stream sequence of the dispatch message: tells a redelivery (same message) from a
    /// duplicate message for the same dispatch.
    pub message: u64,
    pub delivery: u32,
}

/// `{ns}.cmd.scheduler.lease`: an executor asks to start a delivered step.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct LeaseRequest {
    pub tenant: String,
    pub run_id: Uuid,
    pub step: String,
    pub lease: Lease,
    pub executor: String,
}

/// The scheduler's answer to a [`LeaseRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum LeaseDecision {
    /// Run it; this is attempt `attempt`.
    Granted { attempt: u32 },
    /// Do not run it. `ack`: the message is done with (the step finished, or the message is a
    /// duplicate) and may be acked; otherwise another executor holds this very message, and
    /// acking would take it from them: leave it alone.
    Denied { reason: String, ack: bool },
}

/// `{ns}.cmd.scheduler.report`: an executor reports how its attempt ended.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ResultReport {
    pub tenant: String,
    pub run_id: Uuid,
    pub step: String,
    pub lease: Lease,
    pub succeeded: bool,
    pub outcome: StepOutcome,
}

/// `{ns}.cmd.scheduler.handback`: an executor gives an attempt back unfinished, as it stops (a
/// drain that ran out of time), before it puts the dispatch message back. The attempt is
/// recorded lost (`StepAttemptLost` with `handed_back`) but not counted against the step's
/// lost attempts (up to [`HandBack::MAX`] times), and the message's next delivery starts a new
/// one. Answered with a [`ReportAck`]. (Its own command, not a kind of report, so that a
/// scheduler older than it answers no one, and the attempt counts as lost, as it did.)
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct HandBack {
    pub tenant: String,
    pub run_id: Uuid,
    pub step: String,
    pub lease: Lease,
}

impl HandBack {
    /// The most hand-backs of one step not counted as lost: past them, each counts (a step
    /// whose executors keep stopping under it, whatever the reason, fails in the end).
    pub const MAX: u32 = 10;
}

/// The scheduler's answer to a [`ResultReport`].
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ReportAck {
    /// Recorded (or had been recorded already).
    Recorded,
    /// The lease was superseded: the report changed nothing. Do not ack: the message belongs
    /// to the current lease holder.
    Stale,
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Written by Taskmesh (e.g. lines dropped because the step wrote too fast).
    System,
}

/// One line of a step's output, on `{ns}.log.{tenant}.{run}.{step}` (stream `{NS}_LOGS`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct LogLine {
    pub attempt: u32,
    /// Line number within the attempt, from 1.
    pub n: u64,
    /// When the executor read the line.
    pub ts: chrono::DateTime<chrono::Utc>,
    pub stream: LogStream,
    pub line: String,
}

/// `{ns}.executor.<id>` on the EXECUTORS stream (last message per subject): an executor's
/// latest heartbeat. Not an event: live state, expired by the stream's `max_age`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExecutorBeat {
    pub id: String,
    /// Detected (os, arch, cpus, memory_mb, gpu, gpu_model, gpus, gpu_memory_mb, container,
    /// sandbox) and configured labels.
    pub labels: std::collections::BTreeMap<String, String>,
    pub slots: u32,
    pub in_use: u32,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub at: chrono::DateTime<chrono::Utc>,
    /// Draining after SIGTERM: takes no new steps.
    #[serde(default)]
    pub stopping: bool,
    pub version: String,
}

impl ExecutorBeat {
    /// Seconds between heartbeats.
    pub const EVERY_SECS: u64 = 5;

    /// Alive: it beat recently and is not stopping.
    pub fn is_live(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        !self.stopping && now - self.at < chrono::Duration::seconds(3 * Self::EVERY_SECS as i64)
    }
}

/// `{ns}.pool.<token>` on the POOLS stream: a label set steps have been dispatched for, so
/// executors with those labels attach to its consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Pool {
    pub token: String,
    pub runs_on: std::collections::BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_keys_are_told_by_their_shape() {
        let id = "0190a6a5-0000-7000-8000-000000000000";
        for key in [
            format!("schedule:{id}:2026-12-07T00:00:00+00:00"),
            format!("schedule:{id}:trigger:mine"),
            format!("github:{id}:delivery-1"),
            format!("gitea:{id}:x"),
            "cloudevent:deploy:abc".to_string(),
        ] {
            assert!(is_system_key(&key), "{key}");
        }
        for key in ["github:org/repo@sha", "schedule:nightly", "GitHub:1:2", "order-42", &format!("gitlab:{id}")] {
            assert!(!is_system_key(key), "{key}");
        }
    }

    fn ready_step(id: &str, script_bytes: usize) -> ReadyStep {
        let step = serde_json::json!({"id": id, "run": "x".repeat(script_bytes)});
        let dispatch = serde_json::json!({"tenant": "t", "run_id": Uuid::nil(), "dispatch": 1, "step": step});
        ReadyStep { dispatch: serde_json::from_value(dispatch).unwrap(), priority: 3 }
    }

    fn ids(body: &[u8]) -> Vec<String> {
        match serde_json::from_slice::<Ready>(body).unwrap() {
            Ready::Steps { steps } => steps.into_iter().map(|s| s.dispatch.step.id).collect(),
            other => panic!("not a Steps entry: {other:?}"),
        }
    }

    #[test]
    fn a_one_step_entry_written_before_entries_of_several_still_reads() {
        let step = serde_json::json!({"id": "a", "run": "true"});
        let dispatch = serde_json::json!({"tenant": "t", "run_id": Uuid::nil(), "dispatch": 1, "step": step});
        let old = serde_json::json!({"kind": "step", "dispatch": dispatch, "priority": 4});
        match serde_json::from_value::<Ready>(old).unwrap() {
            Ready::Step(s) => assert_eq!((s.dispatch.step.id.as_str(), s.priority), ("a", 4)),
            other => panic!("not a Step entry: {other:?}"),
        }
    }

    #[test]
    fn a_ready_entrys_id_names_all_its_steps() {
        let run = Uuid::nil();
        let m = |ids: &[&str]| ids.iter().map(|s| (s.to_string(), 1)).collect::<Vec<_>>();
        assert_eq!(Ready::entry_id(run, &m(&["a"])), format!("{run}:a:1"), "a lone step's id as before");
        let abc = Ready::entry_id(run, &m(&["a", "b", "c"]));
        assert!(abc.starts_with(&format!("{run}:a:1+3:")), "{abc}");
        assert_eq!(abc, Ready::entry_id(run, &m(&["a", "b", "c"])));
        // Same first step and count, another step among them: another entry.
        assert_ne!(abc, Ready::entry_id(run, &m(&["a", "x", "c"])));
        assert_ne!(abc, Ready::entry_id(run, &m(&["a", "b", "d"])));
        assert_ne!(
            Ready::entry_id(run, &[("a".into(), 1), ("b".into(), 1)]),
            Ready::entry_id(run, &[("a".into(), 1), ("b".into(), 2)])
        );
    }

    #[test]
    fn ready_entries_hold_steps_in_order_and_split_at_the_byte_bound() {
        // Small steps share one entry, which decodes as the steps, in order.
        let steps: Vec<_> = ["a", "b", "c"].into_iter().map(|id| ready_step(id, 10)).collect();
        let entries = Ready::entries(steps, 64 * 1024).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1, 3);
        assert_eq!(ids(&entries[0].0), ["a", "b", "c"]);
        // Past the bound, the next entry starts; a step larger than the bound goes alone.
        let steps = vec![ready_step("a", 400), ready_step("b", 400), ready_step("big", 5_000), ready_step("c", 10)];
        let entries = Ready::entries(steps, 1_500).unwrap();
        let held: Vec<_> = entries.iter().map(|(body, n)| (ids(body), *n)).collect();
        assert_eq!(
            held,
            [(vec!["a".to_string(), "b".into()], 2), (vec!["big".into()], 1), (vec!["c".into()], 1)],
            "{held:?}"
        );
        assert!(entries.iter().filter(|(_, n)| *n > 1).all(|(body, _)| body.len() <= 1_500));
        assert!(Ready::entries(Vec::new(), 1_500).unwrap().is_empty());
    }
}
