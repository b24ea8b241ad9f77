//! The event catalog. Events are facts in the past tense; they are versioned and never edited.
//! A new optional field is a compatible change; anything else is a new schema version.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::workflow::WorkflowDef;

/// Every event Taskmesh appends. Serialised adjacently tagged: `{"type": "...", "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum Event {
    TenantCreated(TenantCreated),
    ApiKeyCreated(ApiKeyCreated),
    ApiKeyRevoked(ApiKeyRevoked),
    RunSubmitted(RunSubmitted),
    RunStarted(RunStarted),
    StepDispatched(StepDispatched),
    StepWaiting(StepWaiting),
    StepAdmitted(StepAdmitted),
    RunWaiting(RunWaiting),
    RunAdmitted(RunAdmitted),
    StepStarted(StepStarted),
    StepAttemptLost(StepAttemptLost),
    StepSucceeded(StepSucceeded),
    StepFailed(StepFailed),
    StepSkipped(StepSkipped),
    StepAttemptFailed(StepAttemptFailed),
    StepCancelled(StepCancelled),
    RunCancelRequested(RunCancelRequested),
    RunSucceeded(RunFinished),
    RunFailed(RunFinished),
    RunCancelled(RunFinished),
    RunTimedOut(RunFinished),
    RepoConnectionCreated(RepoConnectionCreated),
    WebhookEndpointCreated(WebhookEndpointCreated),
    WorkflowVersionStored(WorkflowVersionStored),
    ScheduleCreated(ScheduleCreated),
    SchedulePaused(ScheduleToggled),
    ScheduleResumed(ScheduleToggled),
    ScheduleTicked(ScheduleTicked),
    ScheduleDeleted(ScheduleDeleted),
    ScheduleUpdated(ScheduleUpdated),
    ScheduleTriggered(ScheduleTriggered),
    ScheduleRunRefused(ScheduleRunRefused),
    SecretSet(SecretSet),
    SecretDeleted(SecretDeleted),
    ApiKeyUsed(ApiKeyUsed),
    AuditRecorded(AuditRecorded),
    WebhookEndpointDeleted(WebhookEndpointDeleted),
    RepoConnectionDeleted(RepoConnectionDeleted),
    AuditBatchRecorded(AuditBatchRecorded),
    WebhookDeliveryFailed(WebhookDeliveryFailed),
    WebhookDeliveryRetried(WebhookDeliveryRetried),
    WebhookEndpointDisabled(WebhookEndpointDisabled),
    WebhookEndpointEnabled(WebhookEndpointEnabled),
    WebhookEndpointRecovered(WebhookEndpointRecovered),
    CommitStatusFailed(CommitStatusFailed),
    CommitStatusRecovered(CommitStatusRecovered),
    RepoConnectionUpdated(RepoConnectionUpdated),
    WebhookEndpointUpdated(WebhookEndpointUpdated),
    WebhookEndpointSecretRotated(WebhookEndpointSecretRotated),
    RunsSwept(RunsSwept),
    AuditSwept(AuditSwept),
}

impl Event {
    /// Whether it ends a resource's log (a webhook endpoint, a repository connection or a
    /// schedule deleted): nothing follows it there.
    pub fn is_deletion(&self) -> bool {
        matches!(self, Event::WebhookEndpointDeleted(_) | Event::RepoConnectionDeleted(_) | Event::ScheduleDeleted(_))
    }

    /// A repository connection's settings as this event leaves them (its creation, or a
    /// change of them); none for any other event.
    pub fn repo_connection(&self) -> Option<&RepoConnectionCreated> {
        match self {
            Event::RepoConnectionCreated(c) | Event::RepoConnectionUpdated(RepoConnectionUpdated(c)) => Some(c),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Event::TenantCreated(_) => "TenantCreated",
            Event::ApiKeyCreated(_) => "ApiKeyCreated",
            Event::ApiKeyRevoked(_) => "ApiKeyRevoked",
            Event::RunSubmitted(_) => "RunSubmitted",
            Event::RunStarted(_) => "RunStarted",
            Event::StepDispatched(_) => "StepDispatched",
            Event::StepWaiting(_) => "StepWaiting",
            Event::StepAdmitted(_) => "StepAdmitted",
            Event::RunWaiting(_) => "RunWaiting",
            Event::RunAdmitted(_) => "RunAdmitted",
            Event::StepStarted(_) => "StepStarted",
            Event::StepAttemptLost(_) => "StepAttemptLost",
            Event::StepSucceeded(_) => "StepSucceeded",
            Event::StepFailed(_) => "StepFailed",
            Event::StepSkipped(_) => "StepSkipped",
            Event::StepAttemptFailed(_) => "StepAttemptFailed",
            Event::StepCancelled(_) => "StepCancelled",
            Event::RunCancelRequested(_) => "RunCancelRequested",
            Event::RunSucceeded(_) => "RunSucceeded",
            Event::RunFailed(_) => "RunFailed",
            Event::RunCancelled(_) => "RunCancelled",
            Event::RunTimedOut(_) => "RunTimedOut",
            Event::RepoConnectionCreated(_) => "RepoConnectionCreated",
            Event::WebhookEndpointCreated(_) => "WebhookEndpointCreated",
            Event::WorkflowVersionStored(_) => "WorkflowVersionStored",
            Event::ScheduleCreated(_) => "ScheduleCreated",
            Event::SchedulePaused(_) => "SchedulePaused",
            Event::ScheduleResumed(_) => "ScheduleResumed",
            Event::ScheduleTicked(_) => "ScheduleTicked",
            Event::ScheduleDeleted(_) => "ScheduleDeleted",
            Event::ScheduleUpdated(_) => "ScheduleUpdated",
            Event::ScheduleTriggered(_) => "ScheduleTriggered",
            Event::ScheduleRunRefused(_) => "ScheduleRunRefused",
            Event::SecretSet(_) => "SecretSet",
            Event::SecretDeleted(_) => "SecretDeleted",
            Event::ApiKeyUsed(_) => "ApiKeyUsed",
            Event::AuditRecorded(_) => "AuditRecorded",
            Event::WebhookEndpointDeleted(_) => "WebhookEndpointDeleted",
            Event::RepoConnectionDeleted(_) => "RepoConnectionDeleted",
            Event::AuditBatchRecorded(_) => "AuditBatchRecorded",
            Event::RunsSwept(_) => "RunsSwept",
            Event::AuditSwept(_) => "AuditSwept",
            Event::WebhookDeliveryFailed(_) => "WebhookDeliveryFailed",
            Event::WebhookDeliveryRetried(_) => "WebhookDeliveryRetried",
            Event::WebhookEndpointDisabled(_) => "WebhookEndpointDisabled",
            Event::WebhookEndpointEnabled(_) => "WebhookEndpointEnabled",
            Event::WebhookEndpointRecovered(_) => "WebhookEndpointRecovered",
            Event::CommitStatusFailed(_) => "CommitStatusFailed",
            Event::CommitStatusRecovered(_) => "CommitStatusRecovered",
            Event::RepoConnectionUpdated(_) => "RepoConnectionUpdated",
            Event::WebhookEndpointUpdated(_) => "WebhookEndpointUpdated",
            Event::WebhookEndpointSecretRotated(_) => "WebhookEndpointSecretRotated",
        }
    }

    /// The schema version of this event type. Every type is at version 1 so far.
    pub fn schema_version(&self) -> u16 {
        1
    }

    /// Whether this event ends a run.
    pub fn is_run_terminal(&self) -> bool {
        matches!(self, Event::RunSucceeded(_) | Event::RunFailed(_) | Event::RunCancelled(_) | Event::RunTimedOut(_))
    }

    /// For a run's end: the state its commit shows, and the run's status.
    pub fn run_end(&self) -> Option<(crate::command::CommitState, Status)> {
        use crate::command::CommitState;
        match self {
            Event::RunSucceeded(_) => Some((CommitState::Success, Status::Succeeded)),
            Event::RunFailed(_) => Some((CommitState::Failure, Status::Failed)),
            Event::RunCancelled(_) => Some((CommitState::Cancelled, Status::Cancelled)),
            Event::RunTimedOut(_) => Some((CommitState::Failure, Status::TimedOut)),
            _ => None,
        }
    }
}

/// A tenant came into being.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TenantCreated {
    pub tenant_id: String,
    pub name: String,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything within the tenant, including keys.
    Admin,
    /// Submit, cancel and rerun runs; read everything.
    Operator,
    /// Read only.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// An API key was issued. Only its SHA-256 hash is recorded, never the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiKeyCreated {
    pub key_id: Uuid,
    pub role: Role,
    /// Lower-case hex SHA-256 of the whole key.
    pub key_hash: String,
    /// The key's first characters, to tell keys apart in listings.
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// An API key was revoked: it authenticates nothing from now on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiKeyRevoked {
    pub key_id: Uuid,
}

/// An outbound webhook endpoint was deleted: nothing more is delivered to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookEndpointDeleted {
    pub endpoint_id: Uuid,
}

/// A webhook delivery was given up (a dead letter): the endpoint refused it for good, or its
/// last attempt failed. Asking for it again sends it once more (`WebhookDeliveryRetried`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookDeliveryFailed {
    pub endpoint_id: Uuid,
    /// The delivery's `webhook-id`: the id of the event it tells of.
    pub message_id: String,
    /// The attempts made.
    pub attempts: u32,
    /// Why the last one failed (at most [`WebhookDeliveryFailed::MAX_ERROR`] bytes).
    pub error: String,
    /// The body it carries.
    pub payload: serde_json::Value,
    /// Since when the endpoint's deliveries have been failing: this failure's time, or that of
    /// the earliest since the endpoint last took a delivery (or was created or enabled). Absent
    /// from failures recorded before it was: their own time is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<DateTime<Utc>>,
}

impl WebhookDeliveryFailed {
    /// Most bytes of `error` kept.
    pub const MAX_ERROR: usize = 1000;

    /// The delivery of `payload` as `message_id` to `endpoint_id`, given up after `attempts`
    /// for `error` (cut to [`Self::MAX_ERROR`] bytes).
    pub fn new(
        endpoint_id: Uuid,
        message_id: String,
        attempts: u32,
        mut error: String,
        payload: serde_json::Value,
        failing_since: DateTime<Utc>,
    ) -> Self {
        truncate_at_char(&mut error, Self::MAX_ERROR);
        Self { endpoint_id, message_id, attempts, error, payload, failing_since: Some(failing_since) }
    }
}

/// Since when an endpoint's deliveries have been failing, as the last event on its log says:
/// a failure, a failure's retry, a change or a rotation carry it; `None` after anything else
/// (the endpoint took a delivery, or was created, enabled or disabled, since: a disabled
/// endpoint's count starts again).
pub fn failing_since(last: &crate::Envelope) -> Option<DateTime<Utc>> {
    match &last.event {
        Event::WebhookDeliveryFailed(f) => Some(f.failing_since.unwrap_or(last.occurred_at)),
        Event::WebhookDeliveryRetried(r) => r.failing_since,
        Event::WebhookEndpointUpdated(u) => u.failing_since,
        Event::WebhookEndpointSecretRotated(r) => r.failing_since,
        _ => None,
    }
}

/// An endpoint was disabled: every delivery to it had failed for the notifiers'
/// `disable_after_secs`. Nothing is sent to it until it is enabled again: the runs' ends it
/// misses meanwhile are given up unsent and listed (for the notifiers' `disabled_listed_secs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookEndpointDisabled {
    pub endpoint_id: Uuid,
    /// Why, in words.
    pub reason: String,
}

/// An endpoint's address, or the events it is sent, were changed: the fields given, as they
/// now are (one left out is unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookEndpointUpdated {
    pub endpoint_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Empty: every event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_types: Option<Vec<String>>,
    /// Since when its deliveries had been failing, carried on from the event before (see
    /// `WebhookDeliveryFailed::failing_since`): a change does not restart that clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<DateTime<Utc>>,
}

/// Longest a secret replaced (a connection's webhook secret, an endpoint's signing secret)
/// goes on serving beside the new one: 7 days.
pub const MAX_SECRET_OVERLAP_SECS: u64 = 7 * 86_400;

/// The end of a replaced secret's overlap, held to [`MAX_SECRET_OVERLAP_SECS`] from now.
pub fn overlap_until(until: DateTime<Utc>) -> DateTime<Utc> {
    until.min(Utc::now() + chrono::Duration::seconds(MAX_SECRET_OVERLAP_SECS as i64))
}

/// An endpoint's signing secret was replaced. Deliveries are signed with `secret` from now
/// on, and also with the secret it replaces until `previous_until` (none: not at all), so a
/// receiver has that long to take the new one without refusing a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookEndpointSecretRotated {
    pub endpoint_id: Uuid,
    /// The new Standard Webhooks signing secret, sealed (AES-256-GCM).
    pub secret: taskmesh_secrets::Sealed,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_until: Option<DateTime<Utc>>,
    /// Since when its deliveries had been failing, carried on (as on `WebhookEndpointUpdated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<DateTime<Utc>>,
}

/// A disabled endpoint was enabled again; its failures so far no longer count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookEndpointEnabled {
    pub endpoint_id: Uuid,
}

/// An endpoint with failures recorded took a delivery: those failures no longer count toward
/// disabling it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookEndpointRecovered {
    pub endpoint_id: Uuid,
}

/// A commit status was given up: the forge refused it for good, or its last attempt failed.
/// Appended on the connection's status subject (`{ns}.evt.{tenant}.repostatus.{id}`), apart
/// from the connection's own log, which holds its creation and deletion only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommitStatusFailed {
    pub connection_id: Uuid,
    pub run_id: Uuid,
    /// The pushed commit whose status it was.
    pub commit: String,
    /// The state it was to report.
    pub state: crate::command::CommitState,
    /// Why it was given up (at most [`WebhookDeliveryFailed::MAX_ERROR`] bytes).
    pub error: String,
}

impl CommitStatusFailed {
    /// The event for a status given up with `error` (cut to [`WebhookDeliveryFailed::MAX_ERROR`]
    /// bytes).
    pub fn new(
        connection_id: Uuid,
        run_id: Uuid,
        commit: String,
        state: crate::command::CommitState,
        mut error: String,
    ) -> Self {
        truncate_at_char(&mut error, WebhookDeliveryFailed::MAX_ERROR);
        Self { connection_id, run_id, commit, state, error }
    }
}

/// A connection whose last commit status had failed reported one: that failure is cleared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommitStatusRecovered {
    pub connection_id: Uuid,
}

/// A failed webhook delivery was sent once more, on the schedule of every delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookDeliveryRetried {
    pub endpoint_id: Uuid,
    pub message_id: String,
    /// The sequence of the `WebhookDeliveryFailed` it sends again.
    pub failed_seq: u64,
    /// The endpoint's failures' start, carried on (see `WebhookDeliveryFailed::failing_since`);
    /// none when the endpoint had taken a delivery since the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<DateTime<Utc>>,
}

/// A repository connection was deleted: its webhooks start nothing more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RepoConnectionDeleted {
    pub connection_id: Uuid,
}

/// An API key authenticated a request (recorded at most once a minute per key and gateway
/// replica, for the key's last-used time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApiKeyUsed {
    pub key_id: Uuid,
    pub at: DateTime<Utc>,
}

/// A mutating API call was made: the tenant's audit log. Recorded whatever its outcome,
/// refusals included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditRecorded {
    /// The key that made the call; none for the platform administrator.
    pub key_id: Option<Uuid>,
    /// `key:<prefix>` or `platform-admin`.
    pub actor: String,
    pub method: String,
    /// The path called, without its query.
    pub path: String,
    /// The route's template, e.g. `/v1/runs/{id}/cancel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
    /// The peer address the call came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    pub at: DateTime<Utc>,
}

impl AuditRecorded {
    /// Longest `method`, `actor`, `path` and `user_agent` the audit log keeps, in bytes.
    pub const MAX_METHOD: usize = 16;
    pub const MAX_ACTOR: usize = 128;
    pub const MAX_PATH: usize = 2048;
    pub const MAX_USER_AGENT: usize = 512;

    /// Whether every field is within what the audit log keeps.
    pub fn fits(&self) -> bool {
        self.method.len() <= Self::MAX_METHOD
            && self.actor.len() <= Self::MAX_ACTOR
            && self.path.len() <= Self::MAX_PATH
            && self.user_agent.as_ref().is_none_or(|u| u.len() <= Self::MAX_USER_AGENT)
    }

    /// Cuts every field to what the audit log keeps, at a character boundary: then it
    /// [`fits`](Self::fits).
    pub fn clip(&mut self) {
        truncate_at_char(&mut self.method, Self::MAX_METHOD);
        truncate_at_char(&mut self.actor, Self::MAX_ACTOR);
        truncate_at_char(&mut self.path, Self::MAX_PATH);
        if let Some(u) = self.user_agent.as_mut() {
            truncate_at_char(u, Self::MAX_USER_AGENT);
        }
    }
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
pub fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let end = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(end);
    }
}

/// Most runs one [`RunsSwept`] names.
pub const MAX_RUNS_SWEPT: usize = 500;

/// Retention (`nats.events_max_age_days`) removed the events of these ended runs of the
/// tenant from the log: the read side drops their rows, which a rebuild from the log would
/// not have. Appended by the sweep once it has removed them, on the tenant's
/// `{ns}.evt.{tenant}.retention.runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunsSwept {
    /// 1 to 500 runs ([`MAX_RUNS_SWEPT`]).
    pub runs: Vec<SweptRun>,
}

/// A run whose events were removed: its rows go only while they are of the run removed (up
/// to `last_seq`), not of a run of the same id submitted since (its idempotency key free
/// again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SweptRun {
    pub run_id: Uuid,
    /// The last sequence removed from the run's subject.
    pub last_seq: u64,
}

/// Retention removed the tenant's audit records older than the limit from the log: those of
/// its audit log's events at sequences below `below_seq` (the newest of them stays). The read
/// side drops their rows. Appended by the sweep once it has removed them, on the tenant's
/// `{ns}.evt.{tenant}.retention.audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditSwept {
    pub below_seq: u64,
}

/// Most records one [`AuditBatchRecorded`] holds.
pub const MAX_AUDIT_BATCH: usize = 256;

/// Several mutating API calls of one tenant, recorded together: a gateway appends the calls
/// answered while its previous append was under way as one event. Each keeps its own id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditBatchRecorded {
    /// 1 to 256 records ([`MAX_AUDIT_BATCH`]), in the order the gateway took them.
    pub records: Vec<AuditedCall>,
}

/// One record of an [`AuditBatchRecorded`]: an [`AuditRecorded`] and its own id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditedCall {
    pub id: Uuid,
    #[serde(flatten)]
    pub call: AuditRecorded,
}

/// What started a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// A REST API call, by the key that made it.
    Api { key_id: Option<Uuid> },
    /// A schedule's tick; or, `manual`, a run started from the schedule by hand
    /// (`POST /v1/schedules/{id}/trigger`) at `tick`.
    Schedule {
        schedule_id: Uuid,
        tick: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        manual: bool,
    },
    /// A rerun of an earlier run: `from` is `failed` or a step id.
    Rerun { run_id: Uuid, from: String, key_id: Option<Uuid> },
    /// A CloudEvent posted to `POST /v1/events` matched the workflow's `on.events`.
    Event {
        /// The CloudEvent's `source`, `id` and `type`.
        source: String,
        id: String,
        #[serde(rename = "type")]
        event_type: String,
    },
    /// A forge webhook.
    Webhook {
        forge: Forge,
        connection_id: Uuid,
        delivery: String,
        repository: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        branch: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit: Option<String>,
        /// The tag pushed, for a tag push (then no `branch`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        /// The connection has a status token: the run's state is reported on the commit.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reports_status: bool,
        /// The repository's git URL over HTTP(S), as the push gave it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clone_url: Option<String>,
        /// For a pull (GitLab: merge) request's run: its number (GitLab: its `iid`); `branch`
        /// and `commit` are then its head's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pull_request: Option<u64>,
        /// For a pull request's run: the branch it asks to merge into.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target_branch: Option<String>,
    },
}

/// The commit a run's `checkout` steps find in their workspace: the one a forge push was for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Checkout {
    pub forge: Forge,
    /// The repository connection the push came through: its token, if it has one, fetches
    /// the commit.
    pub connection_id: Uuid,
    /// `owner/name`.
    pub repository: String,
    /// The repository's git URL over HTTP(S).
    pub url: String,
    /// The commit's full id.
    pub commit: String,
}

impl Checkout {
    /// What a run started by `trigger` checks out: the pushed commit of a forge webhook whose
    /// payload named the repository's HTTP(S) URL.
    pub fn of(trigger: &Trigger) -> Option<Self> {
        match trigger {
            Trigger::Webhook {
                forge, connection_id, repository, commit: Some(commit), clone_url: Some(url), ..
            } => Some(Self {
                forge: *forge,
                connection_id: *connection_id,
                repository: repository.clone(),
                url: url.clone(),
                commit: commit.clone(),
            }),
            _ => None,
        }
    }

    /// Whether the connection's token may go with the fetch: only to the repository it is a
    /// token for, at the forge it is a token of. The URL must be at the origin (scheme, host,
    /// port) of the connection's API (for `https://api.github.com`, at `https://github.com`),
    /// and its path must be the API's own path (GitHub Enterprise's `/api/v3` aside: a forge
    /// served under a path prefix) followed by the connected repository, with or without
    /// `.git`. A push names the repository's URL itself, and whoever holds the webhook secret
    /// can write a push: the token never goes to another host, nor to another repository on
    /// the same forge.
    pub fn token_goes_to(&self, api_url: Option<&str>) -> bool {
        self.forge_repository(api_url, &self.url).is_some_and(|r| r == self.repository.to_ascii_lowercase())
    }

    /// The repository `url` names at the connection's forge (`owner/name`, lower-case,
    /// without `.git`), judged as [`Checkout::token_goes_to`] judges the pushed one's; none for
    /// a URL elsewhere.
    pub fn forge_repository(&self, api_url: Option<&str>, url: &str) -> Option<String> {
        let api = api_url.or(self.forge.default_api_url()).and_then(|u| url::Url::parse(u).ok())?;
        let repo = url::Url::parse(url).ok()?;
        // No credentials, query or fragment of its own: nothing a fetch could read otherwise.
        let plain = repo.username().is_empty() && repo.password().is_none();
        if !plain || repo.query().is_some() || repo.fragment().is_some() {
            return None;
        }
        let github = api.scheme() == "https" && api.host_str() == Some("api.github.com");
        let at_the_forge = match github {
            true => repo.scheme() == "https" && repo.host_str() == Some("github.com") && repo.port().is_none(),
            false => repo.origin() == api.origin(),
        };
        let prefix = match (github, self.forge) {
            (true, _) => "",
            (false, Forge::Github) => api.path().trim_end_matches('/').trim_end_matches("/api/v3"),
            (false, _) => api.path().trim_end_matches('/'),
        };
        let path = repo.path().trim_end_matches('/').to_ascii_lowercase();
        let rest = path.strip_prefix(&format!("{}/", prefix.to_ascii_lowercase()))?;
        let name = rest.strip_suffix(".git").unwrap_or(rest);
        // A repository's path, never an owner alone (under which a header scoped to it would
        // reach every repository).
        (at_the_forge && self.forge.is_repository_path(name)).then(|| name.to_string())
    }
}

/// Whether `sha` is a full commit id: 40 (SHA-1) or 64 (SHA-256) hex digits.
pub fn is_commit_id(sha: &str) -> bool {
    matches!(sha.len(), 40 | 64) && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether a `submodule_repositories` pattern names its owner (or GitLab group) in full, as in
/// `acme/*` or `acme/lib-*`: never `*` or `*/lib`, which would send a token to whatever it can
/// read. Ingest refuses others; an executor skips any it finds.
pub fn submodule_pattern_ok(pattern: &str) -> bool {
    pattern.split_once('/').is_some_and(|(owner, _)| !owner.is_empty() && !owner.contains('*'))
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters (`/`
/// included): branch, tag, path and repository filters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// A git forge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Forge {
    Github,
    Gitlab,
    /// Gitea, and Forgejo (which signs and names its deliveries alike).
    Gitea,
}

impl Forge {
    /// Whether `path` is a repository's path on this forge: `owner/name`, or on GitLab groups
    /// within groups too (`group/subgroup/project`, at most 21 parts), each part of letters,
    /// digits, `-`, `_` and `.` (not `.` or `..`), at most 512 bytes in all.
    pub fn is_repository_path(&self, path: &str) -> bool {
        let parts = path.split('/').count();
        let nested = *self == Forge::Gitlab && parts > 2 && parts <= 21;
        (parts == 2 || nested)
            && path.len() <= 512
            && path.split('/').all(|p| {
                !matches!(p, "" | "." | "..") && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            })
    }

    /// Where its API is when a connection names none: GitHub's public service. GitLab and Gitea
    /// are often self-hosted, so a connection to them names its server: a token is never sent
    /// to a server by default.
    pub fn default_api_url(&self) -> Option<&'static str> {
        match self {
            Forge::Github => Some("https://api.github.com"),
            Forge::Gitlab | Forge::Gitea => None,
        }
    }

    /// The URL of `path` (segments, each escaped as one) within `repository`'s part of the
    /// forge's API at `base`: GitHub's `/repos/{owner}/{name}`, GitLab's
    /// `/api/v4/projects/{group%2Fproject}`, Gitea's `/api/v1/repos/{owner}/{name}`.
    pub fn repo_api_url(&self, base: &str, repository: &str, path: &[&str]) -> Result<url::Url, String> {
        let mut url = url::Url::parse(base).map_err(|e| format!("'{base}' is not a URL: {e}"))?;
        {
            let mut segments = url.path_segments_mut().map_err(|_| format!("'{base}' cannot be a base URL"))?;
            segments.pop_if_empty();
            match self {
                Forge::Github => segments.push("repos").extend(repository.split('/')),
                Forge::Gitlab => segments.extend(["api", "v4", "projects", repository]),
                Forge::Gitea => segments.extend(["api", "v1", "repos"]).extend(repository.split('/')),
            };
            segments.extend(path);
        }
        Ok(url)
    }

    /// The `Authorization` header a git request over HTTP(S) carries `token` in: basic
    /// authentication with the user name each forge documents for tokens (GitHub
    /// `x-access-token`, GitLab `oauth2`; Gitea takes the token as the user name).
    pub fn git_auth(&self, token: &str) -> String {
        use base64::Engine as _;
        let user_pass = match self {
            Forge::Github => format!("x-access-token:{token}"),
            Forge::Gitlab => format!("oauth2:{token}"),
            Forge::Gitea => format!("{token}:x-oauth-basic"),
        };
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_pass))
    }

    /// The header a request to its API carries `token` in.
    pub fn api_auth(&self, token: &str) -> (&'static str, String) {
        match self {
            Forge::Github => ("authorization", format!("Bearer {token}")),
            Forge::Gitlab => ("authorization", format!("Bearer {token}")),
            Forge::Gitea => ("authorization", format!("token {token}")),
        }
    }

    /// Its name in the API, in webhook paths and in the read models.
    pub fn as_str(&self) -> &'static str {
        match self {
            Forge::Github => "github",
            Forge::Gitlab => "gitlab",
            Forge::Gitea => "gitea",
        }
    }
}

/// A run was accepted. Carries the whole workflow definition, so a run never depends on
/// anything that may change after it was submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunSubmitted {
    pub run_id: Uuid,
    pub workflow: WorkflowDef,
    #[serde(default)]
    pub inputs: BTreeMap<String, serde_json::Value>,
    pub trigger: Trigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The stored workflow version this run was started from, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_version: Option<u32>,
    /// No step starts before this time (a delayed run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// A rerun's steps kept from the earlier run: they count as succeeded with these outcomes
    /// (outputs included) and do not run again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reused: BTreeMap<String, ReusedStep>,
    /// The run's dispatch priority (-100 to 100), when the submission set one; otherwise the
    /// workflow's, otherwise 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// The run's concurrency group, its key rendered from the inputs. Such a run starts no step
    /// before `RunAdmitted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<RunConcurrency>,
    /// The tenant's limit of concurrent runs when the run was submitted, if it had one. Such a
    /// run starts no step before `RunAdmitted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_max_runs: Option<u32>,
    /// The submitter's labels, for finding runs (`GET /v1/runs?label=k=v`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The commit the run's `checkout` steps get in their workspace: a forge push's (a rerun
    /// keeps its earlier run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout: Option<Checkout>,
    /// The run's `cache:` steps run rather than reuse a kept outcome, and their successes
    /// replace what was kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh_cache: bool,
}

impl RunSubmitted {
    /// A submission of `workflow` as run `run_id` with nothing else set: no inputs, no key,
    /// no stored version, delay, priority, group, tenant run limit, labels or checkout, no
    /// steps reused, and kept outcomes used.
    pub fn new(run_id: Uuid, workflow: WorkflowDef, trigger: Trigger) -> Self {
        RunSubmitted {
            run_id,
            workflow,
            inputs: Default::default(),
            trigger,
            idempotency_key: None,
            workflow_version: None,
            not_before: None,
            reused: Default::default(),
            priority: None,
            concurrency: None,
            tenant_max_runs: None,
            labels: Default::default(),
            checkout: None,
            refresh_cache: false,
        }
    }

    /// Whether the run waits for `RunAdmitted` before its steps may start.
    pub fn needs_admission(&self) -> bool {
        self.concurrency.is_some() || self.tenant_max_runs.is_some()
    }
}

/// The token of the implicit group of a tenant's runs (never a hash: hashes are hex).
pub const TENANT_RUNS_GROUP: &str = "tenant-runs";

/// A run's concurrency group, as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunConcurrency {
    /// The rendered group key.
    pub key: String,
    pub limit: u32,
    pub policy: crate::workflow::GroupPolicy,
}

impl RunConcurrency {
    /// The key as a subject token: a hash, since keys are free text.
    pub fn token(&self) -> String {
        let digest = hmac_sha256::Hash::hash(self.key.as_bytes());
        hex::encode(&digest[..12])
    }
}

/// Dispatched steps of a run are held back by admission control (the tenant's concurrency
/// limit, the dispatch window or a rate-limit bucket). Recorded once per held dispatch, when a
/// hold has lasted a moment; the steps held for one reason in one look go in one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepWaiting {
    pub steps: Vec<String>,
    /// Why, for people: e.g. "tenant concurrency limit (5 steps)".
    pub reason: String,
}

/// Steps that had been held (`StepWaiting`) were let through to the executors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepAdmitted {
    pub steps: Vec<String>,
}

/// A run waits for a place in its concurrency group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunWaiting {
    pub run_id: Uuid,
    pub reason: String,
}

/// A run got its place in its concurrency group; its steps may start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunAdmitted {
    pub run_id: Uuid,
}

/// A step a rerun kept from an earlier run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReusedStep {
    pub from_run: Uuid,
    pub outcome: StepOutcome,
}

/// A new, immutable version of a stored workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowVersionStored {
    pub name: String,
    /// 1 for the first version; each store adds one.
    pub version: u32,
    pub workflow: WorkflowDef,
}

/// A schedule was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleCreated {
    pub schedule_id: Uuid,
    pub spec: crate::schedule::ScheduleSpec,
    /// The first tick after creation (none: the expression never fires again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_tick: Option<DateTime<Utc>>,
}

/// A schedule was paused (`SchedulePaused`) or resumed (`ScheduleResumed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleToggled {
    pub schedule_id: Uuid,
    /// On resuming: the next tick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_tick: Option<DateTime<Utc>>,
}

/// A tick was handled: a run started, or the tick was skipped (overlap, or missed while no
/// scheduler ran). Appended once per tick: replicas race on the schedule's subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleTicked {
    pub schedule_id: Uuid,
    pub tick: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// The schedule's ticks recorded so far, this one included, so that the count survives
    /// retention removing old ticks from the log. Absent from ticks recorded before
    /// 2026-12-08: a reader counts those one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// A schedule's spec was changed in place (`PATCH /v1/schedules/{id}`): the whole new spec. It
/// keeps its id, its ticks and its last run; ticks of the new spec come from `next_tick` on (ticks
/// the new spec would have had before the change are not caught up).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleUpdated {
    pub schedule_id: Uuid,
    pub spec: crate::schedule::ScheduleSpec,
    /// The new spec's first tick after the change; none while the schedule is paused (resuming
    /// arms the next) or when the expression never fires again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_tick: Option<DateTime<Utc>>,
}

/// A run was started from a schedule by hand (`POST /v1/schedules/{id}/trigger`), whatever its
/// ticks. It is the schedule's last run: a tick under `overlap: skip` or `cancel_previous` finds it
/// running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleTriggered {
    pub schedule_id: Uuid,
    pub run_id: Uuid,
}

/// Ingest refused the run of a tick the schedule handled (its `ScheduleTicked` named it): its
/// stored workflow gone or now wanting an input the schedule lacks, or over a quota. The run
/// never exists; the tick is passed over (not submitted again by a later timer) and the
/// schedule's last run is what it was before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleRunRefused {
    pub schedule_id: Uuid,
    pub tick: DateTime<Utc>,
    pub run_id: Uuid,
    /// Why, as ingest said.
    pub reason: String,
}

/// A schedule was deleted: no tick fires after it (a tick is appended expecting the schedule's
/// last sequence, so none can come after), and its row is gone. The last event of its subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleDeleted {
    pub schedule_id: Uuid,
}

/// A secret was set: only its sealed form (AES-256-GCM) is recorded, never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SecretSet {
    pub name: String,
    pub sealed: taskmesh_secrets::Sealed,
}

/// A secret was deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SecretDeleted {
    pub name: String,
}

/// The first step of a run started. No longer appended (since 2026-12-03): the first
/// `StepStarted` of a run says so itself (`run_started`). Still applied where old logs hold it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunStarted {
    pub run_id: Uuid,
}

/// The scheduler found a step ready and put it on the dispatch queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepDispatched {
    pub step: String,
    /// 1 for the first dispatch of the step; a retry is a new dispatch.
    pub dispatch: u32,
    /// Not to start before this time (a retry's backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
}

/// An executor was granted the step's lease and started an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepStarted {
    pub step: String,
    /// Attempt number, 1-based, counting every start of the step.
    pub attempt: u32,
    pub dispatch: u32,
    /// Stream sequence of the dispatch message the executor holds.
    #[serde(default)]
    pub message: u64,
    /// JetStream's delivery count of the dispatch message: > 1 after a lost lease.
    pub delivery: u32,
    pub executor: String,
    /// This is the run's first start of a step: the run is running from this event on. (Logs
    /// written before 2026-12-03 say so with a `RunStarted` event before it instead.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub run_started: bool,
}

/// An attempt's executor stopped renewing its lease; the attempt is abandoned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepAttemptLost {
    pub step: String,
    pub attempt: u32,
    pub reason: String,
    /// Its executor gave it back unfinished as it stopped (a drain that ran out of time),
    /// rather than going silent: not counted against `scheduler.max_lost_attempts`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_back: bool,
}

/// What a step attempt produced.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct StepOutcome {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Captured stdout and stderr, capped; see `output_truncated`.
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub output_truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `key=value` lines the step wrote to `$TASKMESH_OUTPUT`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
    /// The step ran past its timeout and was killed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// The step was killed because its run was cancelled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
    /// The far end asked to be tried again no sooner than this (an HTTP step's `Retry-After`);
    /// a retry waits at least this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The step did not run: this is the kept outcome of an earlier success (`cache:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_from: Option<CachedFrom>,
}

/// Where a cached outcome came from: the step that ran, and when it finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CachedFrom {
    pub run_id: Uuid,
    pub step: String,
    pub attempt: u32,
    pub finished_at: DateTime<Utc>,
}

/// A step attempt finished successfully.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepSucceeded {
    pub step: String,
    pub attempt: u32,
    #[serde(flatten)]
    pub outcome: StepOutcome,
}

/// A step attempt failed (non-zero exit, or could not run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepFailed {
    pub step: String,
    pub attempt: u32,
    #[serde(flatten)]
    pub outcome: StepOutcome,
}

/// A step will not run, e.g. because a step it needs did not succeed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepSkipped {
    pub step: String,
    pub reason: String,
}

/// An attempt failed and the step will be tried again (its retry policy allows it); the next
/// dispatch follows with `not_before` = `retry_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepAttemptFailed {
    pub step: String,
    pub attempt: u32,
    #[serde(flatten)]
    pub outcome: StepOutcome,
    pub retry_at: DateTime<Utc>,
    pub delay_ms: u64,
}

/// A step will not run, or was stopped, because its run is being cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepCancelled {
    pub step: String,
    pub reason: String,
}

/// Someone asked to cancel the run: queued steps are cancelled, running ones are killed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCancelRequested {
    pub run_id: Uuid,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Uuid>,
    /// The run ran past its `timeout_seconds`: it ends `timed_out` rather than `cancelled`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
}

/// A run ended (`RunSucceeded`, `RunFailed` or `RunCancelled`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunFinished {
    pub run_id: Uuid,
    /// Steps that failed, in definition order; empty on success.
    #[serde(default)]
    pub failed_steps: Vec<String>,
}

/// A repository was connected: its webhooks start runs of `workflow` (or of the workflow in
/// its `pipeline_file` at the pushed commit) on matching branches and tags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RepoConnectionCreated {
    pub connection_id: Uuid,
    pub forge: Forge,
    /// `owner/name`.
    pub repository: String,
    /// The webhook secret the forge signs with, sealed (AES-256-GCM).
    pub secret: taskmesh_secrets::Sealed,
    /// Branch names or patterns (`*` matches any run of characters); empty means every branch.
    #[serde(default)]
    pub branches: Vec<String>,
    /// Tag names or patterns whose pushes start runs too; empty: tag pushes start none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Path patterns: a branch push starts a run only if it changes a file matching one
    /// (when the payload lists every changed file); empty: any change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// The workflow its pushes run; none when it is read from the repository
    /// (`pipeline_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<WorkflowDef>,
    /// The path of the workflow's file in the repository, read at each pushed commit with
    /// `status_token`; none: `workflow` is the connection's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_file: Option<String>,
    /// A token of the forge's API, sealed (AES-256-GCM): with it, runs report their state to
    /// the pushed commit (a commit status), and a pipeline file is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_token: Option<taskmesh_secrets::Sealed>,
    /// The forge's API base URL (its server, for GitLab and Gitea); none: the forge's public one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// The webhook secret `secret` replaced (sealed), which a delivery may still be signed with
    /// until `previous_secret_until`: the forge's setting can follow a change without a
    /// delivery refused meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret: Option<taskmesh_secrets::Sealed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_until: Option<DateTime<Utc>>,
    /// Pull requests (GitLab: merge requests) from a branch of the repository itself start
    /// runs too, at their head commit, when opened, given new commits or reopened; `branches`
    /// then filters the branch they ask to merge into. Those from forks start none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pull_requests: bool,
    /// Repositories at the forge (`owner/name` patterns, `*` for any run of characters, each
    /// naming its owner in full: see [`submodule_pattern_ok`]) that a checkout may fetch as
    /// submodules with `status_token`; empty: submodules are fetched
    /// without it. Chosen by whoever administers the connection, never by a push: the token
    /// may read more than the pusher may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub submodule_repositories: Vec<String>,
}

/// A repository connection's settings were changed (its webhook secret, token, filters,
/// workflow or repository): the event holds all of them as they now are, its id and forge
/// unchanged, so the connection's last event is always the whole of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct RepoConnectionUpdated(pub RepoConnectionCreated);

/// A subscriber registered an endpoint for outbound webhooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookEndpointCreated {
    pub endpoint_id: Uuid,
    pub url: String,
    /// The Standard Webhooks signing secret (`whsec_` + base64), sealed (AES-256-GCM).
    pub secret: taskmesh_secrets::Sealed,
    /// Event types delivered (`run.succeeded`, `run.failed`); empty means all.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// What its requests carry.
    #[serde(default, skip_serializing_if = "EndpointFormat::is_standard")]
    pub format: EndpointFormat,
}

/// What a webhook endpoint is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndpointFormat {
    /// The event as JSON, signed per Standard Webhooks.
    #[default]
    StandardWebhooks,
    /// A Slack incoming webhook's message (`{"text": …}`; Mattermost's and others' take it too),
    /// saying how the run ended with a link to it in the dashboard.
    Slack,
    /// An e-mail to the addresses of a `mailto:` URL, through the operator's SMTP server,
    /// saying how the run ended with a link to it in the dashboard.
    Email,
}

/// Most recipients of an e-mail endpoint.
pub const MAX_MAIL_RECIPIENTS: usize = 10;

/// The addresses of an e-mail endpoint's `mailto:` URL (`mailto:ops@example.com,dev@example.com`):
/// 1 to [`MAX_MAIL_RECIPIENTS`] plain addresses, without headers (`?subject=`, `?cc=`) or
/// percent-encoding; an error says what is wrong.
pub fn mailto_recipients(url: &str) -> Result<Vec<String>, String> {
    let rest = url
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("mailto:"))
        .map(|_| &url[7..])
        .ok_or("must be a mailto: URL")?;
    if rest.contains(['?', '%']) {
        return Err("takes addresses only, without headers or percent-encoding".into());
    }
    let addresses: Vec<String> = rest.split(',').map(|a| a.trim().to_string()).collect();
    if addresses.len() > MAX_MAIL_RECIPIENTS {
        return Err(format!("at most {MAX_MAIL_RECIPIENTS} addresses"));
    }
    for address in &addresses {
        let (local, domain) = address.rsplit_once('@').ok_or_else(|| format!("'{address}' is not an address"))?;
        // A dot-atom (RFC 5322): no dot first, last, or twice in a row.
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && local.bytes().all(|b| b.is_ascii_graphic() && !b"<>()[]\\,;:\"@".contains(&b))
            && local.split('.').all(|atom| !atom.is_empty());
        let domain_ok = !domain.is_empty()
            && domain.len() <= 253
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !local_ok || !domain_ok {
            return Err(format!("'{address}' is not an address"));
        }
    }
    Ok(addresses)
}

impl EndpointFormat {
    pub fn is_standard(&self) -> bool {
        *self == EndpointFormat::StandardWebhooks
    }

    /// Its name in the API and the read model.
    pub fn as_str(&self) -> &'static str {
        match self {
            EndpointFormat::StandardWebhooks => "standard_webhooks",
            EndpointFormat::Slack => "slack",
            EndpointFormat::Email => "email",
        }
    }
}

/// The status of a run or a step, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
    TimedOut,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Skipped => "skipped",
            Status::TimedOut => "timed_out",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoints_failures_count_from_the_first_since_it_last_took_a_delivery() {
        let meta = crate::EventMeta::new("t");
        let endpoint_id = Uuid::now_v7();
        let at = |event| meta.envelope("tm.evt.t.endpoint.e", event);
        let since = Utc::now() - chrono::Duration::days(3);
        let failed = WebhookDeliveryFailed::new(endpoint_id, "m".into(), 8, "500".into(), serde_json::json!({}), since);
        assert_eq!(failing_since(&at(Event::WebhookDeliveryFailed(failed.clone()))), Some(since));
        let retried = |failing_since| {
            at(Event::WebhookDeliveryRetried(WebhookDeliveryRetried {
                endpoint_id,
                message_id: "m".into(),
                failed_seq: 7,
                failing_since,
            }))
        };
        assert_eq!(failing_since(&retried(Some(since))), Some(since), "carried through a retry");
        assert_eq!(failing_since(&retried(None)), None);
        for took in [
            Event::WebhookEndpointRecovered(WebhookEndpointRecovered { endpoint_id }),
            Event::WebhookEndpointEnabled(WebhookEndpointEnabled { endpoint_id }),
        ] {
            assert_eq!(failing_since(&at(took)), None);
        }
        // A failure recorded before `failing_since` was counts from its own time.
        let mut older = at(Event::WebhookDeliveryFailed(failed));
        let mut json: serde_json::Value = serde_json::from_slice(&older.to_json()).unwrap();
        json["data"].as_object_mut().unwrap().remove("failing_since").unwrap();
        older = crate::Envelope::from_json(&serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(failing_since(&older), Some(older.occurred_at));
    }

    #[test]
    fn a_clipped_audit_record_fits_and_is_cut_at_a_character_boundary() {
        let mut r = AuditRecorded {
            key_id: None,
            actor: "key:tm_abc".into(),
            method: "POST".into(),
            // 'é' is two bytes: 2,047 of them end in the middle of one.
            path: format!("/{}", "é".repeat(1_500)),
            route: None,
            status: 200,
            ip: None,
            user_agent: Some("ü".repeat(300)),
            at: Utc::now(),
        };
        assert!(!r.fits());
        r.clip();
        assert!(r.fits());
        assert_eq!(r.path.len(), 2_047, "the last whole character before 2,048 bytes");
        assert_eq!(r.user_agent.as_ref().unwrap().len(), 512);
        assert_eq!((r.actor.as_str(), r.method.as_str()), ("key:tm_abc", "POST"), "what fits is kept");
    }

    #[test]
    fn a_token_goes_only_to_its_forge() {
        let at = |forge: Forge, url: &str| Checkout {
            forge,
            connection_id: Uuid::now_v7(),
            repository: "o/r".into(),
            url: url.into(),
            commit: "0".repeat(40),
        };
        // GitHub's API and its git host.
        assert!(at(Forge::Github, "https://github.com/o/r.git").token_goes_to(None));
        assert!(!at(Forge::Github, "http://github.com/o/r.git").token_goes_to(None));
        assert!(!at(Forge::Github, "https://github.com:8443/o/r.git").token_goes_to(None));
        assert!(!at(Forge::Github, "https://gitlab.com/o/r.git").token_goes_to(None));
        // Elsewhere (GitHub Enterprise, GitLab, Gitea), the API's origin only.
        assert!(at(Forge::Github, "https://ghe.example/o/r.git").token_goes_to(Some("https://ghe.example/api/v3")));
        assert!(at(Forge::Gitea, "https://git.example/o/r.git").token_goes_to(Some("https://git.example")));
        assert!(!at(Forge::Gitea, "https://git.example.evil/o/r.git").token_goes_to(Some("https://git.example")));
        assert!(!at(Forge::Gitlab, "http://git.example/o/r.git").token_goes_to(Some("https://git.example")));
        assert!(!at(Forge::Gitlab, "https://git.example:444/o/r.git").token_goes_to(Some("https://git.example")));
        // A self-hosted forge without an API URL has no token sent anywhere.
        assert!(!at(Forge::Gitlab, "https://gitlab.com/o/r.git").token_goes_to(None));
        // Only to the connected repository, under the forge's path prefix, `.git` or not.
        assert!(at(Forge::Github, "https://github.com/O/R").token_goes_to(None));
        assert!(!at(Forge::Github, "https://github.com/o/other.git").token_goes_to(None));
        assert!(!at(Forge::Github, "https://github.com/x/o/r.git").token_goes_to(None));
        assert!(!at(Forge::Github, "https://github.com/o/r.git/../other.git").token_goes_to(None));
        assert!(at(Forge::Gitlab, "https://h.example/gitlab/o/r.git").token_goes_to(Some("https://h.example/gitlab/")));
        assert!(!at(Forge::Gitlab, "https://h.example/o/r.git").token_goes_to(Some("https://h.example/gitlab")));
        assert!(
            !at(Forge::Gitlab, "https://h.example/gitlab/g/o/r.git").token_goes_to(Some("https://h.example/gitlab"))
        );
        // Another repository's URL (a submodule's) names it only at the same forge.
        let pushed = at(Forge::Gitlab, "https://h.example/gitlab/o/r.git");
        let named = |url: &str| pushed.forge_repository(Some("https://h.example/gitlab"), url);
        assert_eq!(named("https://h.example/gitlab/Acme/Sub/Lib.git").as_deref(), Some("acme/sub/lib"));
        assert_eq!(named("https://h.example/gitlab/acme/lib/").as_deref(), Some("acme/lib"));
        for elsewhere in [
            "https://h.example/acme/lib.git",
            "http://h.example/gitlab/acme/lib.git",
            "https://h.example:8443/gitlab/acme/lib.git",
            "https://h.example.evil/gitlab/acme/lib.git",
            "https://h.example/gitlab/",
            "https://h.example/gitlabx/acme/lib.git",
            "https://h.example/gitlab/acme",
            "https://h.example/gitlab/acme//lib",
        ] {
            assert_eq!(named(elsewhere), None, "{elsewhere}");
        }
        let github = at(Forge::Github, "https://github.com/o/r.git");
        assert_eq!(github.forge_repository(None, "https://github.com/acme/lib").as_deref(), Some("acme/lib"));
        assert_eq!(github.forge_repository(None, "https://api.github.com/acme/lib"), None);
        assert_eq!(github.forge_repository(None, "https://github.com/acme"), None, "an owner is no repository");
        assert_eq!(github.forge_repository(None, "https://github.com/acme/lib/x"), None, "nor a path under one");
    }

    #[test]
    fn a_change_or_a_rotation_carries_the_failing_clock_and_an_enabling_does_not() {
        let since = Utc::now() - chrono::Duration::hours(3);
        let id = Uuid::now_v7();
        let at = |event: Event| crate::EventMeta::new("t").envelope("s".to_string(), event);
        let updated =
            WebhookEndpointUpdated { endpoint_id: id, url: None, event_types: None, failing_since: Some(since) };
        assert_eq!(failing_since(&at(Event::WebhookEndpointUpdated(updated))), Some(since));
        let sealed = taskmesh_secrets::Sealed { key_id: "k".into(), nonce: "n".into(), ciphertext: "c".into() };
        let rotated = WebhookEndpointSecretRotated {
            endpoint_id: id,
            secret: sealed,
            previous_until: None,
            failing_since: Some(since),
        };
        assert_eq!(failing_since(&at(Event::WebhookEndpointSecretRotated(rotated))), Some(since));
        assert_eq!(failing_since(&at(Event::WebhookEndpointEnabled(WebhookEndpointEnabled { endpoint_id: id }))), None);
    }

    #[test]
    fn a_replaced_secrets_overlap_is_held_to_seven_days() {
        let week = chrono::Duration::seconds(MAX_SECRET_OVERLAP_SECS as i64);
        let asked = Utc::now() + chrono::Duration::days(30);
        let held = overlap_until(asked);
        assert!(held < asked && held <= Utc::now() + week && held > Utc::now() + week - chrono::Duration::minutes(1));
        let hour = Utc::now() + chrono::Duration::hours(1);
        assert_eq!(overlap_until(hour), hour, "a shorter one is kept");
    }

    #[test]
    fn a_star_matches_any_run_of_characters() {
        assert!(glob_match("main", "main"));
        assert!(!glob_match("main", "main2"));
        assert!(glob_match("release/*", "release/1.2"));
        assert!(!glob_match("release/*", "feature/x"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxc"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("acme/*", "acme/group/lib"), "`/` included");
    }

    #[test]
    fn git_authentication_uses_each_forges_user_name_for_tokens() {
        use base64::Engine as _;
        let decoded = |f: Forge| {
            let header = f.git_auth("tok");
            let encoded = header.strip_prefix("Basic ").unwrap();
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded).unwrap()).unwrap()
        };
        assert_eq!(decoded(Forge::Github), "x-access-token:tok");
        assert_eq!(decoded(Forge::Gitlab), "oauth2:tok");
        assert_eq!(decoded(Forge::Gitea), "tok:x-oauth-basic");
    }

    #[test]
    fn an_email_endpoint_names_plain_addresses_in_a_mailto_url() {
        assert_eq!(
            mailto_recipients("mailto:ops@example.com, dev+ci@mail.example.org").unwrap(),
            ["ops@example.com", "dev+ci@mail.example.org"]
        );
        assert_eq!(mailto_recipients("MAILTO:a@b").unwrap(), ["a@b"]);
        for refused in [
            "https://example.com/",
            "mailto:",
            "mailto:ops@example.com?subject=hi",
            "mailto:ops%40example.com",
            "mailto:ops",
            "mailto:<ops@example.com>",
            "mailto:ops@exa mple.com",
            "mailto:ops@-example.com",
            "mailto:a@b\r\nBcc: c@d",
            "mailto:\"quoted\"@example.com",
            "mailto:.ops@example.com",
            "mailto:ops.@example.com",
            "mailto:o..ps@example.com",
        ] {
            assert!(mailto_recipients(refused).is_err(), "{refused}");
        }
        let eleven = (0..11).map(|i| format!("u{i}@example.com")).collect::<Vec<_>>().join(",");
        assert!(mailto_recipients(&format!("mailto:{eleven}")).is_err());
    }
}
