//! Ingest: Taskmesh's write edge. Commands (from the gateway, git-integration, the CLI) become
//! events here, after validation; nothing else turns outside input into events.
//!
//! Ingest serves request/reply subjects `{ns}.cmd.ingest.*` in the queue group `ingest`, so any
//! number of replicas share the load. A run submission with an idempotency key is deduplicated
//! by JetStream's `Nats-Msg-Id` within the duplicate window (and by the gateway's read model
//! after it), creations guard on an empty subject, and deletions of what is gone are done. A
//! change appends after the resource's last event, read again on a race; one carrying a new
//! secret (a connection's, an endpoint's rotation) is a change each time it is sent.
//!
//! A run's `RunSubmitted` goes into the log with the run's first decision (the steps it can
//! start at once), taken by the run aggregate the scheduler also uses (`taskmesh-run`).
//!
//! # Layout
//! - this file: [`Ingest`] (the command handlers) and [`Ingest::run`];
//! - [`schedules`]: schedules' states folded from their logs, kept between uses (by ingest's
//!   schedule commands and the scheduler's ticks).

use std::collections::BTreeMap;
use std::future::Future;

use base64::Engine;
use taskmesh_bus::{AfterLast, Bus, BusError};
use taskmesh_events::command::*;
use taskmesh_events::schedule::{ScheduleSpec, ScheduleState, tick_key};
use taskmesh_events::workflow::WorkflowDef;
use taskmesh_events::{
    ApiKeyCreated, ApiKeyRevoked, ApiKeyUsed, AuditBatchRecorded, AuditRecorded, Checkout, ErrorCode, Event, EventMeta,
    Forge, MAX_AUDIT_BATCH, Problem, RepoConnectionCreated, RepoConnectionDeleted, RepoConnectionUpdated, ReusedStep,
    RunCancelRequested, RunKey, RunSubmitted, ScheduleCreated, ScheduleDeleted, ScheduleToggled, ScheduleTriggered,
    ScheduleUpdated, SecretDeleted, SecretSet, TenantCreated, Trigger, WebhookDeliveryRetried, WebhookEndpointCreated,
    WebhookEndpointDeleted, WebhookEndpointEnabled, WebhookEndpointSecretRotated, WebhookEndpointUpdated,
    WorkflowVersionStored, subjects::is_token,
};
use taskmesh_run::RunState;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub mod schedules;

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

type Reply<T> = Result<T, Problem>;

fn invalid(field: &str, message: impl Into<String>) -> Problem {
    let message = message.into();
    Problem::new(ErrorCode::BadRequest, format!("{field}: {message}"))
        .with_errors(vec![taskmesh_events::FieldError { field: field.into(), message }])
}

/// A repository connection's settings `was`, with the changes `cmd` asks for (`workflow`, its
/// workflow parsed).
fn changed(
    was: &RepoConnectionCreated,
    cmd: &UpdateRepoConnection,
    workflow: &Option<WorkflowDef>,
) -> RepoConnectionCreated {
    let mut now = was.clone();
    let set = |field: &mut Vec<String>, to: &Option<Vec<String>>| {
        if let Some(to) = to {
            field.clone_from(to);
        }
    };
    set(&mut now.branches, &cmd.branches);
    set(&mut now.tags, &cmd.tags);
    set(&mut now.paths, &cmd.paths);
    set(&mut now.submodule_repositories, &cmd.submodule_repositories);
    if let Some(on) = cmd.pull_requests {
        now.pull_requests = on;
    }
    if let Some(repository) = &cmd.repository {
        now.repository.clone_from(repository);
    }
    if let Some(secret) = &cmd.secret {
        // The secret replaced is still taken for a while, if asked (the one before it no more),
        // for 7 days at most whatever the command says.
        let until = cmd.previous_secret_until.map(taskmesh_events::overlap_until);
        now.previous_secret = until.map(|_| was.secret.clone());
        now.previous_secret_until = until;
        now.secret = secret.clone();
    }
    if let Some(w) = workflow {
        now.workflow = Some(w.clone());
        now.pipeline_file = None;
    }
    if let Some(path) = &cmd.pipeline_file {
        now.pipeline_file = Some(path.clone());
        now.workflow = None;
    }
    if let Some(token) = &cmd.status_token {
        now.status_token = token.clone();
    }
    if let Some(api) = &cmd.api_url {
        now.api_url = api.clone();
    }
    now
}

/// Refuses a workflow with `checkout` steps for a run that has no pushed commit.
fn nothing_to_check_out(workflow: &WorkflowDef) -> Reply<()> {
    match workflow.steps.iter().position(|s| s.checkout.enabled) {
        Some(i) => Err(invalid(
            &format!("steps[{i}].checkout"),
            "only a run started by a forge push (whose payload names the repository's http(s) URL) has a commit to check out",
        )),
        None => Ok(()),
    }
}

fn check_tenant(tenant: &str) -> Reply<()> {
    if is_token(tenant) { Ok(()) } else { Err(invalid("tenant", "not a valid tenant id")) }
}

/// A schedule never created, or deleted.
/// Refuses a change conditional on `versions` (a command's `if_match`: see
/// [`UpdateSchedule::if_match`]) of a `what` at version `current` unless it is one of them.
fn check_version(versions: Option<&[u64]>, current: u64, what: &str) -> Reply<()> {
    match versions {
        Some(versions) if !versions.contains(&current) => Err(Problem::new(
            ErrorCode::PreconditionFailed,
            format!("the {what} is at version {current}, not the one the request is conditional on (If-Match)"),
        )),
        _ => Ok(()),
    }
}

fn no_such_schedule() -> Problem {
    Problem::new(ErrorCode::NotFound, "no such schedule")
}

/// The command handlers.
#[derive(Clone)]
pub struct Ingest {
    bus: Bus,
    limits: taskmesh_config::LimitsSettings,
    egress: taskmesh_egress::Egress,
    /// E-mail endpoints may be created, to the addresses these settings permit.
    email: Option<taskmesh_config::NotificationSettings>,
    /// Schedules' states as last folded, shared by the replicas' handlers in this process.
    schedules: std::sync::Arc<schedules::Folded>,
}

impl Ingest {
    /// Ingest with no per-tenant run limit (see [`Ingest::with_limits`]) and the default
    /// egress rules (see [`Ingest::with_egress`]).
    pub fn new(bus: Bus) -> Self {
        Self { bus, limits: Default::default(), egress: Default::default(), email: None, schedules: Default::default() }
    }

    /// The outbound address rules: a webhook endpoint whose URL names an address they deny is
    /// refused when it is created (the notifier judges every delivery too, names included).
    pub fn with_egress(mut self, egress: taskmesh_egress::Egress) -> Self {
        self.egress = egress;
        self
    }

    /// E-mail endpoints may be created when the notifiers have an SMTP server, to the
    /// addresses `settings` permits.
    pub fn with_email(mut self, settings: &taskmesh_config::NotificationSettings) -> Self {
        self.email = settings.smtp_url.is_some().then(|| settings.clone());
        self
    }

    /// Records each tenant's limit of concurrent runs in the runs it accepts.
    pub fn with_limits(mut self, limits: taskmesh_config::LimitsSettings) -> Self {
        self.limits = limits;
        self
    }

    /// Validates a workflow and appends `RunSubmitted`.
    #[tracing::instrument(skip_all, fields(tenant = %cmd.tenant))]
    pub async fn submit_run(&self, cmd: SubmitRun) -> Reply<RunAccepted> {
        check_tenant(&cmd.tenant)?;
        let (workflow, workflow_version) = match cmd.workflow {
            serde_json::Value::String(reference) => {
                let (def, version) = self.stored_workflow(&cmd.tenant, &reference).await?;
                (def, Some(version))
            }
            inline => (WorkflowDef::from_value(inline)?, None),
        };
        self.check_steps_quota(&cmd.tenant, &workflow)?;
        let checkout = Checkout::of(&cmd.trigger);
        if checkout.is_none() {
            nothing_to_check_out(&workflow)?;
        }
        let inputs = workflow.resolve_inputs(cmd.inputs)?;
        let workflow = workflow.expand_matrices()?;
        if let Some(t) = cmd.not_before
            && t > chrono::Utc::now() + chrono::Duration::days(366)
        {
            return Err(invalid("not_before", "at most a year ahead"));
        }
        if let Some(key) = &cmd.idempotency_key
            && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || key.chars().any(char::is_control))
        {
            return Err(invalid("Idempotency-Key", format!("must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")));
        }
        // A client's key may not take the run id of a tick's, an event's or a delivery's.
        if let Some(key) = &cmd.idempotency_key
            && matches!(cmd.trigger, Trigger::Api { .. })
            && taskmesh_events::command::is_system_key(key)
        {
            return Err(invalid(
                "Idempotency-Key",
                "may not begin with `cloudevent:`, nor with `schedule:`, `github:`, `gitlab:` or `gitea:` and a UUID: \
                 those are the keys of schedules, CloudEvents and forge deliveries",
            ));
        }
        // With an idempotency key the run id is derived from it, so a repeat finds the run's
        // subject taken (expected sequence 0 fails) however long after the first submission.
        let run_id = match &cmd.idempotency_key {
            Some(k) => idempotent_run_id(&cmd.tenant, k),
            None => Uuid::now_v7(),
        };
        check_labels(&cmd.labels)?;
        if let Some(p) = cmd.priority.filter(|p| !taskmesh_events::workflow::PRIORITY_RANGE.contains(p)) {
            return Err(invalid("priority", format!("{p} is out of range: -100 to 100")));
        }
        let concurrency =
            workflow.concurrency.as_ref().map(|c| concurrency_of(c, &inputs, &workflow.name, run_id)).transpose()?;
        let key = RunKey { tenant: cmd.tenant.clone(), run_id };
        let meta = EventMeta::new(&cmd.tenant).with_traceparent(cmd.traceparent);
        let envelope = meta.envelope(
            self.bus.namespace().run(&key),
            Event::RunSubmitted(RunSubmitted {
                run_id,
                workflow,
                inputs,
                trigger: cmd.trigger,
                idempotency_key: cmd.idempotency_key.clone(),
                workflow_version,
                not_before: cmd.not_before,
                reused: Default::default(),
                priority: cmd.priority,
                concurrency,
                tenant_max_runs: Some(self.limits.max_runs(&cmd.tenant)).filter(|n| *n > 0),
                labels: cmd.labels,
                checkout,
                refresh_cache: cmd.refresh_cache,
            }),
        );
        match self.append_submission(&key, envelope.clone()).await {
            Ok(seq) => Ok(RunAccepted { run_id, seq, duplicate: false }),
            Err(BusError::Conflict { .. }) if cmd.idempotency_key.is_some() => {
                let seq = self.bus.first_seq(&envelope.subject).await?;
                Ok(RunAccepted { run_id, seq, duplicate: true })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The tenant's quota of steps per run (a matrix step counts once).
    fn check_steps_quota(&self, tenant: &str, workflow: &WorkflowDef) -> Reply<()> {
        let max = self.limits.max_steps_per_run(tenant);
        if max > 0 && workflow.steps.len() > max as usize {
            return Err(Problem::new(
                ErrorCode::QuotaExceeded,
                format!("the workflow has {} steps; this tenant's quota is {max} steps per run", workflow.steps.len()),
            ));
        }
        Ok(())
    }

    /// The tenant's quota of stored workflows, counted in the log: one subject per name.
    async fn check_workflows_quota(&self, tenant: &str) -> Reply<()> {
        let max = self.limits.max_workflows(tenant);
        if max == 0 {
            return Ok(());
        }
        let ns = self.bus.namespace();
        let stored = self.bus.subject_counts(&ns.events_stream(), &ns.workflow(tenant, "*")).await?.len();
        if stored >= max as usize {
            return Err(Problem::new(
                ErrorCode::QuotaExceeded,
                format!("this tenant stores {stored} workflows; its quota is {max}"),
            ));
        }
        Ok(())
    }

    /// A tenant's quota of resources of one kind not deleted (schedules, webhook endpoints):
    /// counted in the log, from the `filter`'s subjects (and, when there are as many as the
    /// quota, the last event of each). Like the
    /// workflows' quota it is checked before the append, so creations at the same moment may
    /// pass it together.
    async fn check_resources_quota(&self, filter: String, max: u32, what: &str) -> Reply<()> {
        if max == 0 {
            return Ok(());
        }
        let stream = self.bus.namespace().events_stream();
        // Subjects are counted in one request; only when there are enough to reach the quota
        // are their last events read, to leave the deleted ones out.
        if self.bus.subject_counts(&stream, &filter).await?.len() < max as usize {
            return Ok(());
        }
        let lasts = self.bus.last_of_each::<taskmesh_events::Envelope>(&stream, &filter).await?;
        let live = lasts.iter().filter(|last| !last.event.is_deletion()).count();
        if live >= max as usize {
            return Err(Problem::new(
                ErrorCode::QuotaExceeded,
                format!("this tenant has {live} {what}; its quota is {max}"),
            ));
        }
        Ok(())
    }

    /// A stored workflow by reference: `name` (the latest version) or `name@version`.
    async fn stored_workflow(&self, tenant: &str, reference: &str) -> Reply<(WorkflowDef, u32)> {
        let (name, version) = match reference.split_once('@') {
            Some((n, v)) => {
                (n, Some(v.parse::<u32>().map_err(|_| invalid("workflow", format!("'{v}' is not a version number")))?))
            }
            None => (reference, None),
        };
        let not_found = || Problem::new(ErrorCode::NotFound, format!("no stored workflow '{reference}'"));
        if !is_token(name) {
            return Err(not_found());
        }
        let subject = self.bus.namespace().workflow(tenant, name);
        let stored = match version {
            None => self.bus.last(&subject).await?,
            Some(v) => self
                .bus
                .read_subject(&subject, 0)
                .await?
                .into_iter()
                .find(|s| matches!(&s.envelope.event, Event::WorkflowVersionStored(w) if w.version == v)),
        };
        match stored.map(|s| s.envelope.event) {
            Some(Event::WorkflowVersionStored(w)) => Ok((w.workflow, w.version)),
            _ => Err(not_found()),
        }
    }

    /// Stores a new, immutable version of a named workflow. Versions count up from 1 in the
    /// order the log accepts them (appended with the subject's last sequence expected).
    #[tracing::instrument(skip_all, fields(tenant = %cmd.tenant, workflow = %cmd.name))]
    pub async fn store_workflow(&self, cmd: StoreWorkflow) -> Reply<WorkflowStored> {
        check_tenant(&cmd.tenant)?;
        if !is_token(&cmd.name) {
            return Err(invalid("name", "stored workflow names are 1 to 64 letters, digits, '_' or '-'"));
        }
        let workflow = WorkflowDef::from_value(cmd.workflow)?;
        if workflow.name != cmd.name {
            return Err(Problem::new(
                ErrorCode::InvalidWorkflow,
                format!("the definition is named '{}', not '{}'", workflow.name, cmd.name),
            )
            .with_errors(vec![taskmesh_events::FieldError {
                field: "name".into(),
                message: "must match the URL".into(),
            }]));
        }
        self.check_steps_quota(&cmd.tenant, &workflow)?;
        // A stored workflow runs from the API, a schedule or an event: never from a push.
        nothing_to_check_out(&workflow)?;
        let subject = self.bus.namespace().workflow(&cmd.tenant, &cmd.name);
        for attempt in 0..16 {
            let last = self.bus.last(&subject).await?;
            if attempt == 0 && last.is_none() {
                self.check_workflows_quota(&cmd.tenant).await?;
            }
            let (expected, version) = match &last {
                Some(s) => match &s.envelope.event {
                    Event::WorkflowVersionStored(w) => (s.seq, w.version + 1),
                    _ => (s.seq, 1),
                },
                None => (0, 1),
            };
            let envelope = EventMeta::new(&cmd.tenant).envelope(
                subject.clone(),
                Event::WorkflowVersionStored(WorkflowVersionStored {
                    name: cmd.name.clone(),
                    version,
                    workflow: workflow.clone(),
                }),
            );
            match self.bus.append(expected, &envelope).await {
                Ok(seq) => return Ok(WorkflowStored { name: cmd.name, version, seq }),
                Err(BusError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Problem::new(ErrorCode::Unavailable, "too many concurrent versions of this workflow; retry"))
    }

    /// Records a sealed secret (last write wins).
    pub async fn set_secret(&self, cmd: SetSecret) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        if !taskmesh_events::workflow::is_secret_name(&cmd.name) {
            return Err(invalid("name", "A-Z, 0-9 and '_', not starting with a digit, at most 64"));
        }
        if cmd.sealed.ciphertext.len() > 96 * 1024 {
            return Err(Problem::new(ErrorCode::PayloadTooLarge, "a secret holds at most 64 KiB"));
        }
        let envelope = EventMeta::new(&cmd.tenant).envelope(
            self.bus.namespace().secret(&cmd.tenant, &cmd.name),
            Event::SecretSet(SecretSet { name: cmd.name.clone(), sealed: cmd.sealed }),
        );
        let appended = self.bus.append_with_id(None, &envelope, &envelope.id.to_string()).await?;
        Ok(Created { id: cmd.name, seq: appended.seq })
    }

    /// Forgets every `cache:` outcome the tenant has kept (`TM_CACHE` is not the log: nothing
    /// is appended, and steps that would have reused one run again).
    pub async fn purge_cache(&self, cmd: PurgeCache) -> Reply<Purged> {
        check_tenant(&cmd.tenant)?;
        let ns = self.bus.namespace();
        let purged = self.bus.purge_subject(&ns.cache_stream(), &ns.cache_tenant(&cmd.tenant)).await?;
        Ok(Purged { purged })
    }

    /// Queues a push-started run's state for its commit again (`pending` while it runs, its
    /// outcome once it ended), as the scheduler queues it: the notifier sends it with the
    /// connection's token as it is now. Nothing is appended. A run another trigger started, or
    /// whose connection is gone or has no status token, is a 409.
    pub async fn resend_commit_status(&self, cmd: ResendCommitStatus) -> Reply<StatusQueued> {
        check_tenant(&cmd.tenant)?;
        let ns = self.bus.namespace();
        let key = RunKey { tenant: cmd.tenant.clone(), run_id: cmd.run_id };
        let events = self.bus.read_subject(&ns.run(&key), 0).await?;
        let Some(Event::RunSubmitted(submitted)) = events.first().map(|e| &e.envelope.event) else {
            return Err(Problem::new(ErrorCode::NotFound, "no such run"));
        };
        // Its state is decided below; the connection and commit are the push's.
        let Some(mut status) =
            CommitStatus::of_run(&key, &submitted.trigger, &submitted.workflow.name, CommitState::Pending)
        else {
            return Err(Problem::new(ErrorCode::Conflict, "the run was not started by a forge push: it has no commit"));
        };
        let connection = self.bus.last(&ns.repo_connection(&cmd.tenant, status.connection_id)).await?;
        match connection.as_ref().and_then(|c| c.envelope.event.repo_connection()) {
            Some(c) if c.status_token.is_some() => {}
            Some(_) => {
                return Err(Problem::new(ErrorCode::Conflict, "the run's repository connection has no status_token"));
            }
            None => return Err(Problem::new(ErrorCode::Conflict, "the run's repository connection was deleted")),
        }
        // (A cancellation asked for after the end may follow it in the log.)
        let end = events.iter().rev().find_map(|e| e.envelope.event.run_end());
        let state = end.map_or(CommitState::Pending, |(s, _)| s);
        status.state = state;
        let msg_id = format!("status:resend:{}", Uuid::now_v7());
        self.bus.enqueue(ns.delivery(&cmd.tenant), &msg_id, &status, None).await?;
        Ok(StatusQueued { state })
    }

    /// Deletes a secret; a missing one is a 404.
    pub async fn delete_secret(&self, cmd: DeleteSecret) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let subject = self.bus.namespace().secret(&cmd.tenant, &cmd.name);
        if !taskmesh_events::workflow::is_secret_name(&cmd.name)
            || !matches!(self.bus.last(&subject).await?.map(|s| s.envelope.event), Some(Event::SecretSet(_)))
        {
            return Err(Problem::new(ErrorCode::NotFound, "no such secret"));
        }
        let envelope = EventMeta::new(&cmd.tenant)
            .envelope(subject, Event::SecretDeleted(SecretDeleted { name: cmd.name.clone() }));
        let appended = self.bus.append_with_id(None, &envelope, &envelope.id.to_string()).await?;
        Ok(Created { id: cmd.name, seq: appended.seq })
    }

    /// Checks a schedule's expression, time zone and limits, and its workflow with its inputs.
    async fn check_schedule(&self, tenant: &str, spec: &ScheduleSpec) -> Reply<()> {
        spec.validate()?;
        let workflow = match &spec.workflow {
            serde_json::Value::String(reference) => self.stored_workflow(tenant, reference).await?.0,
            inline => WorkflowDef::from_value(inline.clone())?,
        };
        // What a tick's run is checked against, so that a tick is not refused its run.
        self.check_steps_quota(tenant, &workflow)?;
        let inputs = workflow.resolve_inputs(spec.inputs.clone())?;
        // A schedule's runs have no pushed commit.
        nothing_to_check_out(&workflow)?;
        // Each tick's run carries the workflow as expanded and the inputs: they must fit an event.
        let expanded = serde_json::to_vec(&workflow.expand_matrices()?)
            .and_then(|w| Ok(w.len() + serde_json::to_vec(&inputs)?.len()))
            .unwrap_or(usize::MAX);
        if expanded > taskmesh_events::schedule::MAX_SPEC_BYTES {
            return Err(Problem::new(
                ErrorCode::InvalidInput,
                format!(
                    "workflow and inputs: {expanded} bytes as JSON with the matrices expanded; at most {}",
                    taskmesh_events::schedule::MAX_SPEC_BYTES
                ),
            )
            .with_errors(vec![taskmesh_events::FieldError {
                field: "workflow".into(),
                message: "too big with its matrices expanded and the inputs".into(),
            }]));
        }
        Ok(())
    }

    /// Creates a schedule after checking its expression, time zone and workflow.
    #[tracing::instrument(skip_all, fields(tenant = %cmd.tenant))]
    pub async fn create_schedule(&self, cmd: CreateSchedule) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        self.check_schedule(&cmd.tenant, &cmd.spec).await?;
        let max = self.limits.max_schedules(&cmd.tenant);
        self.check_resources_quota(self.bus.namespace().schedules_of(&cmd.tenant), max, "schedules").await?;
        let id = Uuid::now_v7();
        let first_tick = cmd.spec.next_after(chrono::Utc::now());
        let envelope = EventMeta::new(&cmd.tenant).envelope(
            self.bus.namespace().schedule(&cmd.tenant, id),
            Event::ScheduleCreated(ScheduleCreated { schedule_id: id, spec: cmd.spec, first_tick }),
        );
        let seq = self.append_new(&envelope, "schedule").await?;
        Ok(Created { id: id.to_string(), seq })
    }

    /// Changes a schedule's spec by a JSON merge patch, checked as a new schedule is. Its id,
    /// ticks, last run and pause stay; the new spec ticks from its first tick after the change
    /// (the old spec's armed ticks find nothing due). A patch that changes nothing appends
    /// nothing.
    #[tracing::instrument(skip_all, fields(tenant = %cmd.tenant, schedule = %cmd.schedule_id))]
    pub async fn update_schedule(&self, cmd: UpdateSchedule) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let cmd = &cmd;
        let Some(fields) = cmd.patch.as_object() else {
            return Err(Problem::new(
                ErrorCode::BadRequest,
                "a schedule's patch is a JSON object of the fields to change",
            ));
        };
        for field in ["cron", "workflow"] {
            if fields.get(field).is_some_and(serde_json::Value::is_null) {
                return Err(invalid(field, "cannot be removed (null): give a value, or leave it out to keep it"));
            }
        }
        self.change_schedule(&cmd.tenant, cmd.schedule_id, |state, last| async move {
            let ScheduleState { spec, paused, .. } = state.ok_or_else(no_such_schedule)?;
            check_version(cmd.if_match.as_deref(), last, "schedule")?;
            let mut patched =
                serde_json::to_value(&*spec).map_err(|e| Problem::new(ErrorCode::Internal, e.to_string()))?;
            json_patch::merge(&mut patched, &cmd.patch);
            // A workflow given is the new one, not merged into the old (whose `on`, say, would
            // otherwise stay).
            if let Some(workflow) = fields.get("workflow") {
                patched["workflow"] = workflow.clone();
            }
            let new: ScheduleSpec = serde_path_to_error::deserialize(patched).map_err(|e| {
                let (field, message) = (e.path().to_string(), e.into_inner().to_string());
                match field.as_str() {
                    "." => Problem::new(ErrorCode::BadRequest, format!("the patched schedule: {message}")),
                    _ => invalid(&field, message),
                }
            })?;
            if new == *spec {
                return Ok(None);
            }
            self.check_schedule(&cmd.tenant, &new).await?;
            // Paused, it is armed again on resuming.
            let next_tick = if paused { None } else { new.next_after(chrono::Utc::now()) };
            Ok(Some(Event::ScheduleUpdated(ScheduleUpdated { schedule_id: cmd.schedule_id, spec: new, next_tick })))
        })
        .await
    }

    /// Starts a run of a schedule's workflow and inputs now, paused or not (an idempotency key
    /// finds the first run), and records it as the schedule's last run.
    #[tracing::instrument(skip_all, fields(tenant = %cmd.tenant, schedule = %cmd.schedule_id))]
    pub async fn trigger_schedule(&self, cmd: TriggerSchedule) -> Reply<RunAccepted> {
        check_tenant(&cmd.tenant)?;
        // Scoped to the schedule, it must still fit a run's.
        let prefix = format!("schedule:{}:trigger:", cmd.schedule_id);
        let most = MAX_IDEMPOTENCY_KEY - prefix.len();
        if let Some(key) = &cmd.idempotency_key
            && (key.is_empty() || key.len() > most || key.chars().any(char::is_control))
        {
            return Err(invalid("Idempotency-Key", format!("must be 1 to {most} printable characters")));
        }
        let spec = self.schedule(&cmd.tenant, cmd.schedule_id).await?.spec;
        let key = cmd.idempotency_key.map(|k| prefix + &k);
        let run = SubmitRun::of_schedule(&cmd.tenant, cmd.schedule_id, &spec, chrono::Utc::now(), true, key);
        let run = SubmitRun { traceparent: cmd.traceparent, ..run };
        let accepted = self.submit_run(run).await?;
        let (run_id, duplicate, submitted) = (accepted.run_id, accepted.duplicate, accepted.seq);
        let recorded = self
            .change_schedule(&cmd.tenant, cmd.schedule_id, |state, _| async move {
                // Found again by its key, it is recorded unless the run by hand on record came
                // after it (its first record failed; or a tick's run came since, and a tick's
                // overlap policy looks at it only while it runs): never over a newer one. One
                // stream's sequences order the run's submission and the record.
                let state = state.ok_or_else(no_such_schedule)?;
                let known = state.last_manual == Some(run_id)
                    || (duplicate && state.last_manual.is_some() && state.last_manual_seq > submitted);
                Ok((!known)
                    .then_some(Event::ScheduleTriggered(ScheduleTriggered { schedule_id: cmd.schedule_id, run_id })))
            })
            .await;
        // The run started whatever became of its record (deleted meanwhile, the bus busy): a
        // client told otherwise would start another.
        if let Err(p) = recorded
            && p.code != ErrorCode::NotFound
        {
            tracing::warn!(%run_id, problem = %p.detail, "a schedule's run by hand started but is not recorded on it");
        }
        Ok(accepted)
    }

    /// Starts the runs of a schedule's ticks in a past range, each the run its timer would have
    /// started (found, not run again, where it did), at most [`MAX_BACKFILL_TICKS`] of them.
    /// Whatever stops it midway, the runs started stay, and the same backfill again starts only
    /// the rest.
    #[tracing::instrument(skip_all, fields(tenant = %cmd.tenant, schedule = %cmd.schedule_id))]
    pub async fn backfill_schedule(&self, cmd: BackfillSchedule) -> Reply<Backfilled> {
        check_tenant(&cmd.tenant)?;
        cmd.check_range(chrono::Utc::now())?;
        let schedule = self.schedule(&cmd.tenant, cmd.schedule_id).await?;
        let spec = &schedule.spec;
        // The ticks its timers may still fire (catch up, or record skipped) are theirs: run here
        // too, a timer's overlap policy would take the backfill's run for its previous one.
        let until = match schedule.timers_from() {
            Some(first) => cmd.to.min(first - chrono::Duration::seconds(1)),
            None => cmd.to,
        };
        let ticks = if cmd.from <= until { spec.ticks(cmd.from, until, MAX_BACKFILL_TICKS + 1) } else { Vec::new() };
        if ticks.len() > MAX_BACKFILL_TICKS {
            return Err(invalid(
                "to",
                format!("the range holds more than {MAX_BACKFILL_TICKS} ticks: backfill it in parts"),
            ));
        }
        use futures::{StreamExt, TryStreamExt};
        let runs = futures::stream::iter(ticks)
            .map(|tick| {
                let key = tick_key(cmd.schedule_id, tick);
                // The last tick recorded with a run may not have it yet (its timer paused, or
                // killed, meanwhile): submitted as its timer submits it, not marked as by hand.
                let timers = schedule.last_tick == Some(tick) && schedule.last_tick_ran;
                // That one with the spec its tick was decided with; the others with the spec now.
                let spec = if timers { &schedule.tick_spec } else { spec };
                let run = SubmitRun::of_schedule(&cmd.tenant, cmd.schedule_id, spec, tick, !timers, Some(key));
                async move {
                    let accepted = self.submit_run(run).await?;
                    Ok::<_, Problem>(BackfilledRun { tick, run_id: accepted.run_id, duplicate: accepted.duplicate })
                }
            })
            .buffered(8)
            .try_collect()
            .await?;
        Ok(Backfilled { runs, until })
    }

    /// Pauses or resumes a schedule (idempotent).
    pub async fn toggle_schedule(&self, cmd: ToggleSchedule) -> Reply<Created> {
        self.change_schedule(&cmd.tenant, cmd.schedule_id, |state, _| async move {
            let ScheduleState { spec, paused, .. } = state.ok_or_else(no_such_schedule)?;
            Ok((paused != cmd.pause).then(|| {
                if cmd.pause {
                    Event::SchedulePaused(ScheduleToggled { schedule_id: cmd.schedule_id, next_tick: None })
                } else {
                    let next_tick = spec.next_after(chrono::Utc::now());
                    Event::ScheduleResumed(ScheduleToggled { schedule_id: cmd.schedule_id, next_tick })
                }
            }))
        })
        .await
    }

    /// Deletes a schedule: no tick fires after it. Deleting a deleted schedule changes nothing.
    pub async fn delete_schedule(&self, cmd: DeleteSchedule) -> Reply<Created> {
        let subject = self.bus.namespace().schedule(&cmd.tenant, cmd.schedule_id);
        let (subject, if_match) = (&subject, cmd.if_match.as_deref());
        self.change_schedule(&cmd.tenant, cmd.schedule_id, |state, last| async move {
            let deleted = Event::ScheduleDeleted(ScheduleDeleted { schedule_id: cmd.schedule_id });
            match (state, last) {
                (Some(_), _) => {
                    check_version(if_match, last, "schedule")?;
                    Ok(Some(deleted))
                }
                (None, 0) => Err(no_such_schedule()),
                // Its events fold to none: deleted already, or (its first event aged out of
                // the stream, say) deleted now.
                (None, _) => match self.bus.last(subject).await?.map(|e| e.envelope.event) {
                    Some(Event::ScheduleDeleted(_)) => Ok(None),
                    _ => {
                        check_version(if_match, last, "schedule")?;
                        Ok(Some(deleted))
                    }
                },
            }
        })
        .await
    }

    /// A schedule as its events leave it; `NotFound` for one never created, or deleted.
    async fn schedule(&self, tenant: &str, schedule_id: Uuid) -> Reply<ScheduleState> {
        check_tenant(tenant)?;
        self.schedules.load(&self.bus, tenant, schedule_id).await?.state.ok_or_else(no_such_schedule)
    }

    /// Appends to a schedule's subject the event `decide` makes of its state (none: no such
    /// schedule) and its subject's last sequence (none: nothing to do), expecting that
    /// sequence: a tick a scheduler appended meanwhile makes it look again.
    async fn change_schedule<D>(
        &self,
        tenant: &str,
        schedule_id: Uuid,
        decide: impl Fn(Option<ScheduleState>, u64) -> D,
    ) -> Reply<Created>
    where
        D: std::future::Future<Output = Reply<Option<Event>>> + Send,
    {
        check_tenant(tenant)?;
        let subject = self.bus.namespace().schedule(tenant, schedule_id);
        for _ in 0..16 {
            let schedules::Loaded { state, last_seq: last } =
                self.schedules.load(&self.bus, tenant, schedule_id).await?;
            let Some(event) = decide(state, last).await? else {
                return Ok(Created { id: schedule_id.to_string(), seq: last });
            };
            let envelope = EventMeta::new(tenant).envelope(subject.clone(), event);
            match self.bus.append(last, &envelope).await {
                Ok(seq) => return Ok(Created { id: schedule_id.to_string(), seq }),
                Err(BusError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Problem::new(ErrorCode::Unavailable, "the schedule is too busy; retry"))
    }

    /// Starts a rerun of an ended run: its workflow and inputs again, keeping the steps that
    /// succeeded (with their outputs) except those `from` reruns and everything downstream.
    /// The earlier run and its history stay as they were.
    #[tracing::instrument(skip_all, fields(tenant = %cmd.tenant, run = %cmd.run_id))]
    pub async fn rerun_run(&self, cmd: RerunRun) -> Reply<RunAccepted> {
        check_tenant(&cmd.tenant)?;
        let key = RunKey { tenant: cmd.tenant.clone(), run_id: cmd.run_id };
        let events = self.bus.read_subject(&self.bus.namespace().run(&key), 0).await?;
        let Some(Event::RunSubmitted(original)) = events.first().map(|e| e.envelope.event.clone()) else {
            return Err(Problem::new(ErrorCode::NotFound, "no such run"));
        };
        if !events.last().is_some_and(|e| e.envelope.event.is_run_terminal()) {
            return Err(Problem::new(ErrorCode::Conflict, "the run has not ended; cancel it first or wait"));
        }
        // What each step ended with: reused or succeeded steps keep their outcome.
        let mut succeeded: BTreeMap<String, ReusedStep> = original.reused.clone();
        for e in &events {
            if let Event::StepSucceeded(s) = &e.envelope.event {
                succeeded.insert(s.step.clone(), ReusedStep { from_run: cmd.run_id, outcome: s.outcome.clone() });
            }
        }
        let steps = &original.workflow.steps;
        let mut rerun: std::collections::HashSet<&str> = match cmd.from.as_str() {
            "failed" => steps.iter().map(|s| s.id.as_str()).filter(|id| !succeeded.contains_key(*id)).collect(),
            step if steps.iter().any(|s| s.id == step) => [step].into(),
            other => return Err(invalid("from", format!("'failed' or a step of the run; '{other}' is neither"))),
        };
        if rerun.is_empty() {
            return Err(Problem::new(ErrorCode::Conflict, "every step succeeded: nothing to rerun from 'failed'"));
        }
        // Everything downstream reruns too (steps are in an order where needs come first or
        // later, so iterate to a fixed point).
        loop {
            let before = rerun.len();
            for s in steps {
                if s.needs.iter().any(|n| rerun.contains(n.as_str())) {
                    rerun.insert(&s.id);
                }
            }
            if rerun.len() == before {
                break;
            }
        }
        let reused: BTreeMap<String, ReusedStep> =
            succeeded.into_iter().filter(|(id, _)| !rerun.contains(id.as_str())).collect();
        let run_id = Uuid::now_v7();
        let new_key = RunKey { tenant: cmd.tenant.clone(), run_id };
        let envelope = EventMeta::new(&cmd.tenant).envelope(
            self.bus.namespace().run(&new_key),
            Event::RunSubmitted(RunSubmitted {
                run_id,
                workflow: original.workflow,
                inputs: original.inputs,
                trigger: Trigger::Rerun { run_id: cmd.run_id, from: cmd.from, key_id: cmd.key_id },
                idempotency_key: None,
                workflow_version: original.workflow_version,
                not_before: None,
                reused,
                priority: original.priority,
                concurrency: original.concurrency,
                tenant_max_runs: Some(self.limits.max_runs(&cmd.tenant)).filter(|n| *n > 0),
                labels: original.labels,
                checkout: original.checkout,
                refresh_cache: cmd.refresh_cache,
            }),
        );
        let seq = self.append_submission(&new_key, envelope).await?;
        Ok(RunAccepted { run_id, seq, duplicate: false })
    }

    /// Appends a new run's `RunSubmitted` to its (empty) subject together with the run's first
    /// decision, which depends on nothing but the submission: the steps that can start at once
    /// dispatched (or skipped, or failed on a template), and, for a run with nothing left to
    /// do, its end. One commit, so the scheduler's first act on the run is to queue its steps,
    /// not to append their dispatch. Returns the commit's sequence (the run's `seq`). A first
    /// decision too big for one message goes on in further commits; should one of those fail,
    /// the scheduler decides what is missing when it sees the first.
    async fn append_submission(&self, key: &RunKey, submitted: taskmesh_events::Envelope) -> Result<u64, BusError> {
        let mut envelopes = vec![submitted];
        if let Some(mut state) = RunState::from_submitted(key.clone(), 0, &envelopes[0].event) {
            let meta = EventMeta::caused_by(&envelopes[0]);
            let subject = envelopes[0].subject.clone();
            let decided = state.decide_ahead();
            envelopes.extend(decided.into_iter().map(|e| meta.envelope(subject.clone(), e)));
        }
        let done = self.bus.append_decision(0, &envelopes).await;
        if done.first.is_some() {
            metrics::counter!("taskmesh_runs_submitted_total").increment(1);
        }
        match (done.first, done.error) {
            (Some(seq), None) => Ok(seq),
            (Some(seq), Some(e)) => {
                tracing::warn!(error = %e, "the rest of a run's first decision is left to the scheduler");
                Ok(seq)
            }
            (None, e) => Err(e.unwrap_or_else(|| BusError::Nats("nothing to append".into()))),
        }
    }

    /// Asks for a run to be cancelled: appends `RunCancelRequested` after the run's last event
    /// (retrying if the scheduler appends meanwhile). The scheduler does the rest.
    #[tracing::instrument(skip_all, fields(tenant = %cmd.tenant, run = %cmd.run_id))]
    pub async fn cancel_run(&self, cmd: CancelRun) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        if cmd.reason.len() > 1024 {
            return Err(invalid("reason", "at most 1024 bytes"));
        }
        let key = RunKey { tenant: cmd.tenant.clone(), run_id: cmd.run_id };
        let subject = self.bus.namespace().run(&key);
        let envelope = EventMeta::new(&cmd.tenant).envelope(
            subject.clone(),
            Event::RunCancelRequested(RunCancelRequested {
                run_id: cmd.run_id,
                reason: cmd.reason,
                key_id: cmd.key_id,
                timed_out: false,
            }),
        );
        for _ in 0..16 {
            let last = self.bus.last_seq(&subject).await?;
            if last == 0 {
                return Err(Problem::new(ErrorCode::NotFound, "no such run"));
            }
            match self.bus.append(last, &envelope).await {
                Ok(seq) => return Ok(Created { id: cmd.run_id.to_string(), seq }),
                Err(BusError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Problem::new(ErrorCode::Unavailable, "the run is too busy to cancel right now; retry"))
    }

    /// Creates a tenant; a second creation of the same id is a conflict.
    pub async fn create_tenant(&self, cmd: CreateTenant) -> Reply<Created> {
        if !is_token(&cmd.tenant_id) {
            return Err(invalid("tenant_id", "must be 1 to 64 letters, digits, '_' or '-'"));
        }
        let meta = EventMeta::new(&cmd.tenant_id);
        let envelope = meta.envelope(
            self.bus.namespace().tenant(&cmd.tenant_id),
            Event::TenantCreated(TenantCreated { tenant_id: cmd.tenant_id.clone(), name: cmd.name }),
        );
        let seq = self.append_new(&envelope, "tenant").await?;
        Ok(Created { id: cmd.tenant_id, seq })
    }

    /// Records a new API key (its hash; the caller generated the key).
    pub async fn create_api_key(&self, cmd: CreateApiKey) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        if cmd.key_hash.len() != 64 || !cmd.key_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("key_hash", "must be a hex SHA-256"));
        }
        let envelope = EventMeta::new(&cmd.tenant).envelope(
            self.bus.namespace().api_key(&cmd.tenant, cmd.key_id),
            Event::ApiKeyCreated(ApiKeyCreated {
                key_id: cmd.key_id,
                role: cmd.role,
                key_hash: cmd.key_hash,
                prefix: cmd.prefix,
                name: cmd.name,
            }),
        );
        let seq = self.append_new(&envelope, "API key").await?;
        Ok(Created { id: cmd.key_id.to_string(), seq })
    }

    /// Revokes an API key of the tenant (idempotent); another tenant's key is a 404.
    pub async fn revoke_api_key(&self, cmd: RevokeApiKey) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let subject = self.bus.namespace().api_key(&cmd.tenant, cmd.key_id);
        // A revocation that loses a race to another reads it and answers its seq (not the
        // creation's): what a read must wait for to see the key revoked.
        let settled = self
            .bus
            .append_after_last(&subject, 5, |last| {
                let (subject, tenant, key_id) = (&subject, &cmd.tenant, cmd.key_id);
                async move {
                    let Some(last) = last else { return Err(Problem::new(ErrorCode::NotFound, "no such key")) };
                    if matches!(last.envelope.event, Event::ApiKeyRevoked(_)) {
                        return Ok(AfterLast::Done(last.seq));
                    }
                    let revoked = Event::ApiKeyRevoked(ApiKeyRevoked { key_id });
                    Ok(AfterLast::Append {
                        events: vec![EventMeta::new(tenant).envelope(subject.clone(), revoked)],
                        msg_id: None,
                    })
                }
            })
            .await?;
        Ok(Created { id: cmd.key_id.to_string(), seq: settled.seq() })
    }

    /// Records that a key was used; the event is deduplicated per key and minute.
    pub async fn touch_api_key(&self, cmd: TouchApiKey) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let envelope = EventMeta::new(&cmd.tenant).envelope(
            self.bus.namespace().api_key_use(&cmd.tenant, cmd.key_id),
            Event::ApiKeyUsed(ApiKeyUsed { key_id: cmd.key_id, at: cmd.at }),
        );
        let msg_id = format!("used:{}:{}", cmd.key_id, cmd.at.timestamp() / 60);
        let appended = self.bus.append_with_id(None, &envelope, &msg_id).await?;
        Ok(Created { id: cmd.key_id.to_string(), seq: appended.seq })
    }

    /// Appends one record to the tenant's audit log, once per record id.
    pub async fn record_audit(&self, cmd: RecordAudit) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        check_audit(&cmd.record, "record")?;
        let mut envelope = EventMeta::new(&cmd.tenant)
            .envelope(self.bus.namespace().audit(&cmd.tenant), Event::AuditRecorded(cmd.record));
        envelope.id = cmd.id;
        let appended = self.bus.append_with_id(None, &envelope, &cmd.id.to_string()).await?;
        Ok(Created { id: cmd.id.to_string(), seq: appended.seq })
    }

    /// Appends several records to the tenant's audit log as one event, once per first record
    /// id. Answers with that id.
    pub async fn record_audits(&self, cmd: RecordAudits) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let Some(first) = cmd.records.first().map(|r| r.id) else {
            return Err(invalid("records", "at least one record"));
        };
        if cmd.records.len() > MAX_AUDIT_BATCH {
            return Err(invalid("records", format!("at most {MAX_AUDIT_BATCH} records")));
        }
        for (i, r) in cmd.records.iter().enumerate() {
            check_audit(&r.call, &format!("records[{i}]"))?;
        }
        let mut envelope = EventMeta::new(&cmd.tenant).envelope(
            self.bus.namespace().audit(&cmd.tenant),
            Event::AuditBatchRecorded(AuditBatchRecorded { records: cmd.records }),
        );
        envelope.id = first;
        let appended = self.bus.append_with_id(None, &envelope, &first.to_string()).await?;
        Ok(Created { id: first.to_string(), seq: appended.seq })
    }

    /// Connects a repository: its signed webhooks will start runs of the given workflow.
    pub async fn create_repo_connection(&self, cmd: CreateRepoConnection) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let workflow = match (cmd.workflow, &cmd.pipeline_file) {
            (Some(w), None) => Some(WorkflowDef::from_value(w)?),
            (None, Some(_)) => None,
            (Some(_), Some(_)) => return Err(invalid("workflow", "give a workflow or a pipeline_file, not both")),
            (None, None) => return Err(invalid("workflow", "give a workflow, or the pipeline_file it is read from")),
        };
        let id = Uuid::now_v7();
        let connection = RepoConnectionCreated {
            connection_id: id,
            forge: cmd.forge,
            repository: cmd.repository,
            secret: cmd.secret,
            branches: cmd.branches,
            tags: cmd.tags,
            paths: cmd.paths,
            workflow,
            pipeline_file: cmd.pipeline_file,
            status_token: cmd.status_token,
            api_url: cmd.api_url,
            submodule_repositories: cmd.submodule_repositories,
            pull_requests: cmd.pull_requests,
            previous_secret: None,
            previous_secret_until: None,
        };
        self.check_connection(&connection, None)?;
        let envelope = EventMeta::new(&cmd.tenant)
            .envelope(self.bus.namespace().repo_connection(&cmd.tenant, id), Event::RepoConnectionCreated(connection));
        let seq = self.append_new(&envelope, "repository connection").await?;
        Ok(Created { id: id.to_string(), seq })
    }

    /// Changes a repository connection's settings (see [`UpdateRepoConnection`]): the
    /// connection as it is in the log, with the changes, checked as a new one is, appended as
    /// `RepoConnectionUpdated` if that is its last event still (else read again). A deleted
    /// connection, or one never made, is a 404; a change that changes nothing appends nothing.
    /// A token is never sent to an API URL it was not given with: changing `api_url` while a
    /// token is kept needs the token given again.
    pub async fn update_repo_connection(&self, cmd: UpdateRepoConnection) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let workflow = match (&cmd.workflow, &cmd.pipeline_file) {
            (Some(_), Some(_)) => return Err(invalid("workflow", "give a workflow or a pipeline_file, not both")),
            (Some(w), None) => Some(WorkflowDef::from_value(w.clone())?),
            _ => None,
        };
        let subject = self.bus.namespace().repo_connection(&cmd.tenant, cmd.connection_id);
        let settled = self
            .bus
            .append_after_last(&subject, 5, |last| {
                let (cmd, workflow, subject) = (&cmd, &workflow, &subject);
                async move {
                    let Some((seq, was)) =
                        last.as_ref().and_then(|l| Some((l.seq, l.envelope.event.repo_connection()?)))
                    else {
                        return Err(Problem::new(ErrorCode::NotFound, "no such repository connection"));
                    };
                    check_version(cmd.if_match.as_deref(), seq, "repository connection")?;
                    let now = changed(was, cmd, workflow);
                    self.check_connection(&now, Some(was))?;
                    if now.api_url != was.api_url && now.status_token.is_some() && cmd.status_token.is_none() {
                        return Err(invalid(
                            "status_token",
                            "give the token again with a new api_url: a kept token is never sent to another server",
                        ));
                    }
                    if now == *was {
                        return Ok(AfterLast::Done(seq));
                    }
                    let event = Event::RepoConnectionUpdated(RepoConnectionUpdated(now));
                    Ok(AfterLast::Append {
                        events: vec![EventMeta::new(&cmd.tenant).envelope(subject.clone(), event)],
                        msg_id: None,
                    })
                }
            })
            .await?;
        Ok(Created { id: cmd.connection_id.to_string(), seq: settled.seq() })
    }

    /// Refuses a repository connection's settings that a new connection could not have. The
    /// egress rules judge `api_url` only when it is new (not `was`'s): a secret can be rotated
    /// after the rules were tightened (the notifier judges each status's address anyway).
    fn check_connection(&self, c: &RepoConnectionCreated, was: Option<&RepoConnectionCreated>) -> Reply<()> {
        if let Some(path) = &c.pipeline_file {
            check_pipeline_file(path)?;
            if c.status_token.is_none() {
                return Err(invalid("pipeline_file", "is read with the connection's status_token: give one"));
            }
        }
        // GitLab's projects sit in groups within groups: `group/subgroup/project`.
        if !c.forge.is_repository_path(&c.repository) {
            let what = if c.forge == Forge::Gitlab { "'group/project' (groups may nest)" } else { "'owner/name'" };
            return Err(invalid("repository", format!("must be {what}")));
        }
        if let Some(api) = &c.api_url {
            let url = url::Url::parse(api).map_err(|_| invalid("api_url", "not a URL"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || api.len() > 2048 {
                return Err(invalid("api_url", "must be an http or https URL with a host"));
            }
            if !url.username().is_empty()
                || url.password().is_some()
                || url.query().is_some()
                || url.fragment().is_some()
            {
                return Err(invalid(
                    "api_url",
                    "must carry no credentials, query or fragment (the token goes in a header)",
                ));
            }
            if was.is_none_or(|w| w.api_url != c.api_url) {
                self.egress.check_url(&url).map_err(|denied| invalid("api_url", denied.to_string()))?;
            }
        }
        if c.status_token.is_some() && c.api_url.is_none() && c.forge.default_api_url().is_none() {
            return Err(invalid(
                "api_url",
                "a GitLab or Gitea connection that reports statuses needs its server's URL",
            ));
        }
        let patterns = [
            ("branches", &c.branches),
            ("tags", &c.tags),
            ("paths", &c.paths),
            ("submodule_repositories", &c.submodule_repositories),
        ];
        for (field, patterns) in patterns {
            if patterns.len() > 100 || patterns.iter().any(|b| b.is_empty() || b.len() > 255) {
                return Err(invalid(field, "at most 100 patterns of 1 to 255 characters"));
            }
        }
        if !c.submodule_repositories.is_empty() && c.status_token.is_none() {
            return Err(invalid("submodule_repositories", "name where the status_token goes: give one"));
        }
        // Each names its owner (or group) in full: `acme/*`, never `*` or `*/lib`, which would
        // send the token to whatever it can read.
        if let Some(bad) = c.submodule_repositories.iter().find(|p| !taskmesh_events::submodule_pattern_ok(p)) {
            return Err(invalid(
                "submodule_repositories",
                format!("'{bad}' must name its owner in full, as in 'acme/*' or 'acme/lib-*'"),
            ));
        }
        Ok(())
    }

    /// Deletes a webhook endpoint or a repository connection of the tenant (idempotent); another
    /// tenant's, or one never made, is a 404.
    pub async fn delete_integration(&self, cmd: DeleteIntegration) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let ns = self.bus.namespace();
        let (subject, event, what) = match cmd.kind {
            IntegrationKind::WebhookEndpoint => (
                ns.webhook_endpoint(&cmd.tenant, cmd.id),
                Event::WebhookEndpointDeleted(WebhookEndpointDeleted { endpoint_id: cmd.id }),
                "webhook endpoint",
            ),
            IntegrationKind::RepoConnection => (
                ns.repo_connection(&cmd.tenant, cmd.id),
                Event::RepoConnectionDeleted(RepoConnectionDeleted { connection_id: cmd.id }),
                "repository connection",
            ),
        };
        // Others append to an endpoint's subject too (its failed deliveries, their retries): a
        // conflict is read again, never taken for a deletion.
        let if_match = cmd.if_match.as_deref();
        let settled = self
            .bus
            .append_after_last(&subject, 5, |last| {
                let (event, subject, tenant) = (event.clone(), &subject, &cmd.tenant);
                async move {
                    let Some(last) = last else {
                        return Err(Problem::new(ErrorCode::NotFound, format!("no such {what}")));
                    };
                    if last.envelope.event.is_deletion() {
                        return Ok(AfterLast::Done(last.seq));
                    }
                    check_version(if_match, last.seq, what)?;
                    Ok(AfterLast::Append {
                        events: vec![EventMeta::new(tenant).envelope(subject.clone(), event)],
                        msg_id: None,
                    })
                }
            })
            .await?;
        let seq = settled.seq();
        Ok(Created { id: cmd.id.to_string(), seq })
    }

    /// Registers an outbound webhook endpoint and generates its signing secret.
    pub async fn create_webhook_endpoint(&self, cmd: CreateWebhookEndpoint) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        self.check_endpoint_url(cmd.format, &cmd.url)?;
        check_event_types(&cmd.event_types)?;
        let max = self.limits.max_webhook_endpoints(&cmd.tenant);
        let filter = self.bus.namespace().webhook_endpoints_of(&cmd.tenant);
        self.check_resources_quota(filter, max, "webhook endpoints").await?;
        let id = Uuid::now_v7();
        let envelope = EventMeta::new(&cmd.tenant).envelope(
            self.bus.namespace().webhook_endpoint(&cmd.tenant, id),
            Event::WebhookEndpointCreated(WebhookEndpointCreated {
                endpoint_id: id,
                url: cmd.url,
                secret: cmd.secret,
                event_types: cmd.event_types,
                format: cmd.format,
            }),
        );
        let seq = self.append_new(&envelope, "webhook endpoint").await?;
        Ok(Created { id: id.to_string(), seq })
    }

    /// Sends a failed webhook delivery (its `WebhookDeliveryFailed` event at `seq`) once more,
    /// on the schedule of every delivery, and records that it was. A delivery of an endpoint
    /// deleted since, or not of this tenant and endpoint, is a 404. Asked twice for the same
    /// failure within the queue's deduplication window (`nats.duplicate_window_secs`), it is
    /// sent once.
    pub async fn retry_webhook_delivery(&self, cmd: RetryWebhookDelivery) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let not_found = || Problem::new(ErrorCode::NotFound, "no such failed delivery");
        let ns = self.bus.namespace();
        let subject = ns.webhook_endpoint(&cmd.tenant, cmd.endpoint_id);
        let failed = match self.bus.at(cmd.seq).await? {
            Some(stored) if stored.envelope.subject == subject => match stored.envelope.event {
                Event::WebhookDeliveryFailed(f) if f.message_id == cmd.message_id => f,
                _ => return Err(not_found()),
            },
            _ => return Err(not_found()),
        };
        let delivery = Delivery {
            tenant: cmd.tenant.clone(),
            endpoint_id: cmd.endpoint_id,
            message_id: failed.message_id,
            payload: failed.payload,
        };
        let (cmd, delivery, subject) = (&cmd, &delivery, &subject);
        let settled = self
            .bus
            .append_after_last(subject, 5, |last| async move {
                let last = match last {
                    Some(last) if !last.envelope.event.is_deletion() => last,
                    _ => return Err(Problem::new(ErrorCode::NotFound, "no such webhook endpoint")),
                };
                // Sent before it is recorded: a crash in between leaves it shown as failed,
                // and asked again, it is sent again (under the same `webhook-id`), never
                // recorded as sent without having been.
                let msg_id = format!("{}:{}:retry:{}", delivery.message_id, cmd.endpoint_id, cmd.seq);
                self.bus.enqueue(ns.delivery(&cmd.tenant), &msg_id, delivery, None).await?;
                let retried = Event::WebhookDeliveryRetried(WebhookDeliveryRetried {
                    endpoint_id: cmd.endpoint_id,
                    message_id: cmd.message_id.clone(),
                    failed_seq: cmd.seq,
                    failing_since: taskmesh_events::failing_since(&last.envelope),
                });
                Ok(AfterLast::Append {
                    events: vec![EventMeta::new(&cmd.tenant).envelope(subject.clone(), retried)],
                    msg_id: None,
                })
            })
            .await?;
        let seq = settled.seq();
        Ok(Created { id: cmd.message_id.clone(), seq })
    }

    /// Enables a webhook endpoint again (one disabled after failing for too long): runs' ends
    /// are queued for it again, and its failures so far no longer count (for an endpoint that
    /// is not disabled, that is all it does). A deleted endpoint, or another tenant's, is a 404.
    pub async fn enable_webhook_endpoint(&self, cmd: EnableWebhookEndpoint) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        // Enabling restarts the endpoint's failing time: nothing carries it on.
        let enabled =
            |_: Option<_>| Some(Event::WebhookEndpointEnabled(WebhookEndpointEnabled { endpoint_id: cmd.endpoint_id }));
        self.append_to_endpoint(&cmd.tenant, cmd.endpoint_id, None, enabled).await
    }

    /// Refuses a URL an endpoint of `format` cannot be sent to.
    fn check_endpoint_url(&self, format: taskmesh_events::EndpointFormat, url: &str) -> Reply<()> {
        if format == taskmesh_events::EndpointFormat::Email {
            let Some(email) = &self.email else {
                return Err(invalid(
                    "format",
                    "e-mail endpoints need an SMTP server, and none is configured (notification.smtp_url)",
                ));
            };
            // Sent through the operator's SMTP server, which the egress rules do not govern.
            if url.len() > 2048 {
                return Err(invalid("url", "at most 2,048 bytes"));
            }
            let to = taskmesh_events::catalog::mailto_recipients(url).map_err(|e| invalid("url", e))?;
            if let Some(other) = to.iter().find(|a| !email.email_allowed(a)) {
                return Err(invalid(
                    "url",
                    format!("'{other}' is not in a domain e-mail may go to (notification.email_domains)"),
                ));
            }
        } else {
            let parsed = url::Url::parse(url).map_err(|_| invalid("url", "not a URL"))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() || url.len() > 2048 {
                return Err(invalid(
                    "url",
                    "must be an http or https URL with a host (a mailto: URL for format email)",
                ));
            }
            self.egress.check_url(&parsed).map_err(|denied| invalid("url", denied.to_string()))?;
        }
        Ok(())
    }

    /// Changes an endpoint's URL or the events it is sent, checked as a new endpoint's are:
    /// appended after the endpoint's last event, unless that is its deletion (a 404).
    pub async fn update_webhook_endpoint(&self, cmd: UpdateWebhookEndpoint) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        if let Some(url) = &cmd.url {
            self.check_endpoint_url(cmd.format, url)?;
        }
        if let Some(types) = &cmd.event_types {
            check_event_types(types)?;
        }
        let updated = |failing_since| {
            let changes = cmd.url.is_some() || cmd.event_types.is_some();
            changes.then(|| {
                Event::WebhookEndpointUpdated(WebhookEndpointUpdated {
                    endpoint_id: cmd.endpoint_id,
                    url: cmd.url.clone(),
                    event_types: cmd.event_types.clone(),
                    failing_since,
                })
            })
        };
        self.append_to_endpoint(&cmd.tenant, cmd.endpoint_id, cmd.if_match.as_deref(), updated).await
    }

    /// Replaces an endpoint's signing secret (the old one signing too until `previous_until`, held to
    /// 7 days).
    pub async fn rotate_webhook_secret(&self, cmd: RotateWebhookSecret) -> Reply<Created> {
        check_tenant(&cmd.tenant)?;
        let rotated = |failing_since| {
            Some(Event::WebhookEndpointSecretRotated(WebhookEndpointSecretRotated {
                endpoint_id: cmd.endpoint_id,
                secret: cmd.secret.clone(),
                previous_until: cmd.previous_until.map(taskmesh_events::overlap_until),
                failing_since,
            }))
        };
        self.append_to_endpoint(&cmd.tenant, cmd.endpoint_id, None, rotated).await
    }

    /// Appends the event `event` makes of the time the endpoint's deliveries have been failing
    /// since (as its last event says; carried on, so a change does not restart the clock that
    /// disables it) to its log after that last event, unless that is its deletion, or there is
    /// none (a 404), or it is not at a version `if_match` names; read again when another event
    /// came meanwhile. `event` making none appends nothing and answers the last event's
    /// sequence.
    async fn append_to_endpoint(
        &self,
        tenant: &str,
        endpoint_id: Uuid,
        if_match: Option<&[u64]>,
        event: impl Fn(Option<chrono::DateTime<chrono::Utc>>) -> Option<Event>,
    ) -> Reply<Created> {
        let subject = self.bus.namespace().webhook_endpoint(tenant, endpoint_id);
        let (event, subject) = (&event, &subject);
        let settled = self
            .bus
            .append_after_last(subject, 5, |last| async move {
                let last = match last {
                    Some(last) if !last.envelope.event.is_deletion() => last,
                    _ => return Err(Problem::new(ErrorCode::NotFound, "no such webhook endpoint")),
                };
                check_version(if_match, last.seq, "webhook endpoint")?;
                let Some(event) = event(taskmesh_events::failing_since(&last.envelope)) else {
                    return Ok(AfterLast::Done(last.seq));
                };
                let events = vec![EventMeta::new(tenant).envelope(subject.clone(), event)];
                Ok::<_, Problem>(AfterLast::<u64>::Append { events, msg_id: None })
            })
            .await?;
        Ok(Created { id: endpoint_id.to_string(), seq: settled.seq() })
    }

    async fn append_new(&self, envelope: &taskmesh_events::Envelope, what: &str) -> Reply<u64> {
        match self.bus.append(0, envelope).await {
            Ok(seq) => Ok(seq),
            Err(BusError::Conflict { .. }) => {
                Err(Problem::new(ErrorCode::Conflict, format!("that {what} exists already")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Serves every ingest command until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ns = self.bus.namespace().clone();
        let bus = self.bus.clone();
        let s = || shutdown.clone().cancelled_owned();
        macro_rules! serve {
            ($cmd:literal, $method:ident) => {{
                let me = self.clone();
                taskmesh_bus::serve(&bus, ns.ingest_command($cmd), "ingest", 64, s(), move |_, req| {
                    let me = me.clone();
                    async move { me.$method(req).await }
                })
            }};
        }
        tokio::try_join!(
            serve!("submit_run", submit_run),
            serve!("cancel_run", cancel_run),
            serve!("rerun_run", rerun_run),
            serve!("store_workflow", store_workflow),
            serve!("create_schedule", create_schedule),
            serve!("set_secret", set_secret),
            serve!("delete_secret", delete_secret),
            serve!("purge_cache", purge_cache),
            serve!("resend_commit_status", resend_commit_status),
            serve!("toggle_schedule", toggle_schedule),
            serve!("delete_schedule", delete_schedule),
            serve!("update_schedule", update_schedule),
            serve!("trigger_schedule", trigger_schedule),
            serve!("backfill_schedule", backfill_schedule),
            serve!("create_tenant", create_tenant),
            serve!("create_api_key", create_api_key),
            serve!("revoke_api_key", revoke_api_key),
            serve!("touch_api_key", touch_api_key),
            serve!("record_audit", record_audit),
            serve!("record_audits", record_audits),
            serve!("delete_integration", delete_integration),
            serve!("create_repo_connection", create_repo_connection),
            serve!("update_webhook_endpoint", update_webhook_endpoint),
            serve!("rotate_webhook_secret", rotate_webhook_secret),
            serve!("update_repo_connection", update_repo_connection),
            serve!("create_webhook_endpoint", create_webhook_endpoint),
            serve!("retry_webhook_delivery", retry_webhook_delivery),
            serve!("enable_webhook_endpoint", enable_webhook_endpoint),
        )?;
        Ok(())
    }
}

/// Sends ingest commands: what the gateway, git-integration and the CLI use.
#[derive(Clone)]
pub struct IngestClient {
    bus: Bus,
}

impl IngestClient {
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }

    fn call<Req: serde::Serialize + Sync, Resp: serde::de::DeserializeOwned>(
        &self,
        command: &'static str,
        req: &Req,
    ) -> impl Future<Output = Reply<Resp>> {
        let subject = self.bus.namespace().ingest_command(command);
        let bus = self.bus.clone();
        let body = serde_json::to_value(req);
        async move {
            let body = body.map_err(|e| Problem::new(ErrorCode::Internal, e.to_string()))?;
            bus.request(subject, &body).await.map_err(Problem::from)
        }
    }

    pub async fn submit_run(&self, cmd: &SubmitRun) -> Reply<RunAccepted> {
        self.call("submit_run", cmd).await
    }
    pub async fn cancel_run(&self, cmd: &CancelRun) -> Reply<Created> {
        self.call("cancel_run", cmd).await
    }
    pub async fn rerun_run(&self, cmd: &RerunRun) -> Reply<RunAccepted> {
        self.call("rerun_run", cmd).await
    }
    pub async fn store_workflow(&self, cmd: &StoreWorkflow) -> Reply<WorkflowStored> {
        self.call("store_workflow", cmd).await
    }
    pub async fn create_schedule(&self, cmd: &CreateSchedule) -> Reply<Created> {
        self.call("create_schedule", cmd).await
    }
    pub async fn set_secret(&self, cmd: &SetSecret) -> Reply<Created> {
        self.call("set_secret", cmd).await
    }
    pub async fn delete_secret(&self, cmd: &DeleteSecret) -> Reply<Created> {
        self.call("delete_secret", cmd).await
    }
    pub async fn purge_cache(&self, cmd: &PurgeCache) -> Reply<Purged> {
        self.call("purge_cache", cmd).await
    }
    pub async fn resend_commit_status(&self, cmd: &ResendCommitStatus) -> Reply<StatusQueued> {
        self.call("resend_commit_status", cmd).await
    }
    pub async fn toggle_schedule(&self, cmd: &ToggleSchedule) -> Reply<Created> {
        self.call("toggle_schedule", cmd).await
    }
    pub async fn delete_schedule(&self, cmd: &DeleteSchedule) -> Reply<Created> {
        self.call("delete_schedule", cmd).await
    }
    pub async fn update_schedule(&self, cmd: &UpdateSchedule) -> Reply<Created> {
        self.call("update_schedule", cmd).await
    }
    pub async fn trigger_schedule(&self, cmd: &TriggerSchedule) -> Reply<RunAccepted> {
        self.call("trigger_schedule", cmd).await
    }
    pub async fn backfill_schedule(&self, cmd: &BackfillSchedule) -> Reply<Backfilled> {
        self.call("backfill_schedule", cmd).await
    }
    pub async fn create_tenant(&self, cmd: &CreateTenant) -> Reply<Created> {
        self.call("create_tenant", cmd).await
    }
    pub async fn create_api_key(&self, cmd: &CreateApiKey) -> Reply<Created> {
        self.call("create_api_key", cmd).await
    }
    pub async fn create_repo_connection(&self, cmd: &CreateRepoConnection) -> Reply<Created> {
        self.call("create_repo_connection", cmd).await
    }
    pub async fn update_repo_connection(&self, cmd: &UpdateRepoConnection) -> Reply<Created> {
        self.call("update_repo_connection", cmd).await
    }
    pub async fn revoke_api_key(&self, cmd: &RevokeApiKey) -> Reply<Created> {
        self.call("revoke_api_key", cmd).await
    }
    pub async fn touch_api_key(&self, cmd: &TouchApiKey) -> Reply<Created> {
        self.call("touch_api_key", cmd).await
    }
    pub async fn record_audit(&self, cmd: &RecordAudit) -> Reply<Created> {
        self.call("record_audit", cmd).await
    }
    pub async fn record_audits(&self, cmd: &RecordAudits) -> Reply<Created> {
        self.call("record_audits", cmd).await
    }
    pub async fn delete_integration(&self, cmd: &DeleteIntegration) -> Reply<Created> {
        self.call("delete_integration", cmd).await
    }
    pub async fn create_webhook_endpoint(&self, cmd: &CreateWebhookEndpoint) -> Reply<Created> {
        self.call("create_webhook_endpoint", cmd).await
    }
    pub async fn retry_webhook_delivery(&self, cmd: &RetryWebhookDelivery) -> Reply<Created> {
        self.call("retry_webhook_delivery", cmd).await
    }
    pub async fn enable_webhook_endpoint(&self, cmd: &EnableWebhookEndpoint) -> Reply<Created> {
        self.call("enable_webhook_endpoint", cmd).await
    }
    pub async fn update_webhook_endpoint(&self, cmd: &UpdateWebhookEndpoint) -> Reply<Created> {
        self.call("update_webhook_endpoint", cmd).await
    }
    pub async fn rotate_webhook_secret(&self, cmd: &RotateWebhookSecret) -> Reply<Created> {
        self.call("rotate_webhook_secret", cmd).await
    }
}

/// Refuses an event type endpoints are not sent.
fn check_event_types(types: &[String]) -> Reply<()> {
    const TYPES: &[&str] = &["run.succeeded", "run.failed", "run.cancelled", "run.timed_out"];
    match types.iter().find(|t| !TYPES.contains(&t.as_str())) {
        Some(bad) => Err(invalid("event_types", format!("unknown event type '{bad}'; known: {}", TYPES.join(", ")))),
        None => Ok(()),
    }
}

/// An audit record's fields are within what the audit log keeps.
fn check_audit(r: &AuditRecorded, field: &str) -> Reply<()> {
    if !r.fits() {
        return Err(invalid(field, "a field is too long"));
    }
    Ok(())
}

/// A run's labels: at most 16, keys 1 to 64 of `[A-Za-z0-9_.-]`, values at most 256 bytes
/// without control characters.
fn check_labels(labels: &BTreeMap<String, String>) -> Reply<()> {
    if labels.len() > 16 {
        return Err(invalid("labels", "at most 16 labels"));
    }
    for (k, v) in labels {
        let key_ok =
            !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !key_ok {
            return Err(invalid(&format!("labels.{k}"), "keys are 1 to 64 letters, digits, '_', '.' or '-'"));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(invalid(&format!("labels.{k}"), "values are at most 256 bytes, without control characters"));
        }
    }
    Ok(())
}

/// The run id of a schedule's tick: the one its timer and a backfill both submit it under.
pub fn tick_run_id(tenant: &str, schedule_id: Uuid, tick: chrono::DateTime<chrono::Utc>) -> Uuid {
    idempotent_run_id(tenant, &tick_key(schedule_id, tick))
}

/// The run id for an idempotency key: a UUID v8 from SHA-256 of the tenant and the key.
pub fn idempotent_run_id(tenant: &str, key: &str) -> Uuid {
    let digest = hmac_sha256::Hash::hash(format!("{tenant}\n{key}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::new_v8(bytes)
}

/// Generates an API key: `tm_` + 43 url-safe base64 characters (256 bits). Returns the key, its
/// SHA-256 hex (all that is ever stored) and a display prefix.
pub fn generate_api_key() -> (String, String, String) {
    let key = format!("tm_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()));
    let hash = hash_api_key(&key);
    let prefix = key[..10].to_string();
    (key, hash, prefix)
}

/// The stored form of an API key.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(hmac_sha256::Hash::hash(key.as_bytes()))
}

/// A run's concurrency group: the workflow's `concurrency.group` rendered over the inputs.
fn concurrency_of(
    def: &taskmesh_events::workflow::ConcurrencyDef,
    inputs: &BTreeMap<String, serde_json::Value>,
    workflow: &str,
    run_id: Uuid,
) -> Reply<taskmesh_events::RunConcurrency> {
    let scope = taskmesh_events::expr::Scope {
        inputs: serde_json::to_value(inputs).unwrap_or_default(),
        steps: serde_json::json!({}),
        run: serde_json::json!({"id": run_id.to_string(), "workflow": workflow}),
        matrix: serde_json::Value::Null,
        needs_succeeded: true,
        needs_failed: false,
        cancelled: false,
        event: serde_json::Value::Null,
    };
    let key = scope.render(&def.group).map_err(|e| invalid("concurrency.group", e))?;
    if key.is_empty() || key.len() > 512 {
        return Err(invalid("concurrency.group", "renders to an empty or over-long key"));
    }
    Ok(taskmesh_events::RunConcurrency { key, limit: def.limit, policy: def.policy })
}

/// A pipeline file's path: relative to the repository's root, `/`-separated, with no empty, `.`
/// or `..` part, of 1 to 255 bytes, printable.
fn check_pipeline_file(path: &str) -> Result<(), Problem> {
    if taskmesh_events::workflow::is_plain_relative_path(path, 255) {
        Ok(())
    } else {
        Err(invalid("pipeline_file", "must be a path within the repository, like '.taskmesh.yml' or 'ci/build.yml'"))
    }
}
