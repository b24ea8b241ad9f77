//! Generates `proto/`: a JSON Schema per event type, one for the envelope and the commands, and
//! an AsyncAPI 3.0 document describing the streams, subjects and messages.
//!
//! `cargo test -p taskmesh-events` fails when `proto/` differs from what these types generate;
//! `TASKMESH_BLESS=1 cargo test -p taskmesh-events proto` rewrites it.

use std::collections::BTreeMap;

use schemars::{JsonSchema, schema_for};
use serde_json::{Value, json};

use crate::catalog::*;
use crate::command::*;
use crate::envelope::{Commit, Envelope};

fn pretty<T: JsonSchema>() -> String {
    let mut s = serde_json::to_string_pretty(&schema_for!(T)).expect("schemas serialise");
    s.push('\n');
    s
}

/// (event type, JSON Schema of its `data`, one-line description) for every event in the catalog.
fn events() -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("TenantCreated", pretty::<TenantCreated>(), "A tenant came into being."),
        ("ApiKeyCreated", pretty::<ApiKeyCreated>(), "An API key was issued (its hash only)."),
        ("ApiKeyRevoked", pretty::<ApiKeyRevoked>(), "An API key was revoked."),
        ("RunSubmitted", pretty::<RunSubmitted>(), "A run was accepted, with its whole workflow."),
        (
            "RunStarted",
            pretty::<RunStarted>(),
            "The first step of a run started (no longer appended: the first StepStarted says so with run_started).",
        ),
        ("StepDispatched", pretty::<StepDispatched>(), "A ready step was queued for admission and executors."),
        ("StepWaiting", pretty::<StepWaiting>(), "Admission control holds a dispatched step back, and why."),
        ("StepAdmitted", pretty::<StepAdmitted>(), "A held step was let through to the executors."),
        ("RunWaiting", pretty::<RunWaiting>(), "A run waits for a place in its concurrency group."),
        ("RunAdmitted", pretty::<RunAdmitted>(), "A run got its place in its concurrency group."),
        ("StepStarted", pretty::<StepStarted>(), "An executor was granted a step's lease."),
        ("StepAttemptLost", pretty::<StepAttemptLost>(), "An attempt's executor lost its lease."),
        ("StepSucceeded", pretty::<StepSucceeded>(), "A step attempt succeeded."),
        ("StepFailed", pretty::<StepFailed>(), "A step attempt failed."),
        ("StepSkipped", pretty::<StepSkipped>(), "A step will not run."),
        ("StepAttemptFailed", pretty::<StepAttemptFailed>(), "An attempt failed; the step will be retried."),
        ("StepCancelled", pretty::<StepCancelled>(), "A step was cancelled with its run."),
        ("RunCancelRequested", pretty::<RunCancelRequested>(), "Cancelling a run was asked for."),
        ("RunSucceeded", pretty::<RunFinished>(), "Every step of a run succeeded."),
        ("RunFailed", pretty::<RunFinished>(), "A run ended with failed steps."),
        ("RunCancelled", pretty::<RunFinished>(), "A run ended cancelled."),
        ("RunTimedOut", pretty::<RunFinished>(), "A run ran past its timeout and ended."),
        ("RepoConnectionCreated", pretty::<RepoConnectionCreated>(), "A repository was connected."),
        ("WebhookEndpointCreated", pretty::<WebhookEndpointCreated>(), "An outbound webhook endpoint was registered."),
        ("WorkflowVersionStored", pretty::<WorkflowVersionStored>(), "A new version of a stored workflow."),
        ("ScheduleCreated", pretty::<ScheduleCreated>(), "A schedule was created."),
        ("SchedulePaused", pretty::<ScheduleToggled>(), "A schedule was paused."),
        ("ScheduleResumed", pretty::<ScheduleToggled>(), "A schedule was resumed."),
        ("ScheduleTicked", pretty::<ScheduleTicked>(), "A schedule's tick was handled, once."),
        ("ScheduleDeleted", pretty::<ScheduleDeleted>(), "A schedule was deleted: no tick fires after it."),
        (
            "ScheduleUpdated",
            pretty::<ScheduleUpdated>(),
            "A schedule's spec was changed in place; its ticks and runs are kept.",
        ),
        ("ScheduleTriggered", pretty::<ScheduleTriggered>(), "A run was started from a schedule by hand."),
        (
            "ScheduleRunRefused",
            pretty::<ScheduleRunRefused>(),
            "Ingest refused a schedule's tick its run; the tick is passed over.",
        ),
        ("SecretSet", pretty::<SecretSet>(), "A secret was set (sealed; never its value)."),
        ("SecretDeleted", pretty::<SecretDeleted>(), "A secret was deleted."),
        ("ApiKeyUsed", pretty::<ApiKeyUsed>(), "An API key was used (at most once a minute per key and gateway)."),
        ("AuditRecorded", pretty::<AuditRecorded>(), "A mutating API call, for the tenant's audit log."),
        ("WebhookEndpointDeleted", pretty::<WebhookEndpointDeleted>(), "An outbound webhook endpoint was deleted."),
        ("RepoConnectionDeleted", pretty::<RepoConnectionDeleted>(), "A repository connection was deleted."),
        (
            "RepoConnectionUpdated",
            pretty::<RepoConnectionUpdated>(),
            "A repository connection's settings were changed: all of them as they now are.",
        ),
        (
            "AuditBatchRecorded",
            pretty::<AuditBatchRecorded>(),
            "Several mutating API calls of one tenant, for its audit log, recorded together.",
        ),
        (
            "AuditSwept",
            pretty::<AuditSwept>(),
            "Retention removed the tenant's audit records below a sequence from the log: the read side drops their rows.",
        ),
        (
            "RunsSwept",
            pretty::<RunsSwept>(),
            "Retention removed these ended runs' events from the log: the read side drops their rows.",
        ),
        (
            "WebhookDeliveryFailed",
            pretty::<WebhookDeliveryFailed>(),
            "A webhook delivery was given up (refused for good, or its last attempt failed).",
        ),
        ("WebhookDeliveryRetried", pretty::<WebhookDeliveryRetried>(), "A failed webhook delivery was sent once more."),
        (
            "CommitStatusFailed",
            pretty::<CommitStatusFailed>(),
            "A commit status was given up (refused for good by the forge, or its last attempt failed).",
        ),
        (
            "CommitStatusRecovered",
            pretty::<CommitStatusRecovered>(),
            "A connection whose last commit status failed reported one: the failure is cleared.",
        ),
        (
            "WebhookEndpointDisabled",
            pretty::<WebhookEndpointDisabled>(),
            "A webhook endpoint was disabled: its deliveries had failed for too long.",
        ),
        (
            "WebhookEndpointEnabled",
            pretty::<WebhookEndpointEnabled>(),
            "A disabled webhook endpoint was enabled again.",
        ),
        (
            "WebhookEndpointUpdated",
            pretty::<WebhookEndpointUpdated>(),
            "A webhook endpoint's URL or event types were changed.",
        ),
        (
            "WebhookEndpointSecretRotated",
            pretty::<WebhookEndpointSecretRotated>(),
            "A webhook endpoint's signing secret was replaced (the old one signing too for a while).",
        ),
        (
            "WebhookEndpointRecovered",
            pretty::<WebhookEndpointRecovered>(),
            "A webhook endpoint with failures recorded took a delivery.",
        ),
    ]
}

fn commands() -> Vec<(&'static str, String)> {
    vec![
        ("SubmitRun", pretty::<SubmitRun>()),
        ("RunAccepted", pretty::<RunAccepted>()),
        ("CreateTenant", pretty::<CreateTenant>()),
        ("CreateApiKey", pretty::<CreateApiKey>()),
        ("RevokeApiKey", pretty::<RevokeApiKey>()),
        ("TouchApiKey", pretty::<TouchApiKey>()),
        ("RecordAudit", pretty::<RecordAudit>()),
        ("RecordAudits", pretty::<RecordAudits>()),
        ("DeleteIntegration", pretty::<DeleteIntegration>()),
        ("CreateRepoConnection", pretty::<CreateRepoConnection>()),
        ("UpdateRepoConnection", pretty::<UpdateRepoConnection>()),
        ("CreateWebhookEndpoint", pretty::<CreateWebhookEndpoint>()),
        ("RetryWebhookDelivery", pretty::<RetryWebhookDelivery>()),
        ("EnableWebhookEndpoint", pretty::<EnableWebhookEndpoint>()),
        ("UpdateWebhookEndpoint", pretty::<UpdateWebhookEndpoint>()),
        ("RotateWebhookSecret", pretty::<RotateWebhookSecret>()),
        ("Created", pretty::<Created>()),
        ("CancelRun", pretty::<CancelRun>()),
        ("RerunRun", pretty::<RerunRun>()),
        ("StoreWorkflow", pretty::<StoreWorkflow>()),
        ("CreateSchedule", pretty::<CreateSchedule>()),
        ("SetSecret", pretty::<SetSecret>()),
        ("DeleteSecret", pretty::<DeleteSecret>()),
        ("PurgeCache", pretty::<PurgeCache>()),
        ("Purged", pretty::<Purged>()),
        ("ResendCommitStatus", pretty::<ResendCommitStatus>()),
        ("StatusQueued", pretty::<StatusQueued>()),
        ("BreakerState", pretty::<BreakerState>()),
        ("ToggleSchedule", pretty::<ToggleSchedule>()),
        ("UpdateSchedule", pretty::<UpdateSchedule>()),
        ("TriggerSchedule", pretty::<TriggerSchedule>()),
        ("BackfillSchedule", pretty::<BackfillSchedule>()),
        ("Backfilled", pretty::<Backfilled>()),
        ("DeleteSchedule", pretty::<DeleteSchedule>()),
        ("WorkflowStored", pretty::<WorkflowStored>()),
        ("CancelSignal", pretty::<CancelSignal>()),
        ("BreakerSignal", pretty::<BreakerSignal>()),
        ("Dispatch", pretty::<Dispatch>()),
        ("Timer", pretty::<Timer>()),
        ("CommitStatus", pretty::<CommitStatus>()),
        ("LogLine", pretty::<LogLine>()),
        ("LeaseRequest", pretty::<LeaseRequest>()),
        ("LeaseDecision", pretty::<LeaseDecision>()),
        ("ResultReport", pretty::<ResultReport>()),
        ("HandBack", pretty::<HandBack>()),
        ("ReportAck", pretty::<ReportAck>()),
        ("ExecutorBeat", pretty::<ExecutorBeat>()),
        ("Pool", pretty::<Pool>()),
        ("Problem", pretty::<crate::Problem>()),
    ]
}

fn asyncapi() -> Value {
    let mut messages = serde_json::Map::new();
    for (name, _, summary) in events() {
        messages.insert(
            name.to_string(),
            json!({
                "name": name,
                "summary": summary,
                "contentType": "application/json",
                "payload": {
                    "allOf": [
                        {"$ref": "envelope.schema.json"},
                        {"type": "object", "properties": {
                            "type": {"const": name},
                            "data": {"$ref": format!("events/{name}.schema.json")}
                        }}
                    ]
                }
            }),
        );
    }
    for (name, _) in commands() {
        messages.insert(
            name.to_string(),
            json!({"name": name, "contentType": "application/json", "payload": {"$ref": format!("commands/{name}.schema.json")}}),
        );
    }
    let refs = |names: &[&str]| -> Value {
        names
            .iter()
            .map(|n| (n.to_string(), json!({"$ref": format!("#/components/messages/{n}")})))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let run_events: Vec<&str> = events()
        .iter()
        .map(|e| e.0)
        .filter(|n| n.starts_with("Run") || n.starts_with("Step"))
        .filter(|n| *n != "RunsSwept")
        .collect();
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Taskmesh event bus",
            "version": "1",
            "description": "Streams and subjects on NATS JetStream. Every event is an envelope (envelope.schema.json) whose `data` follows events/<type>.schema.json. A message on the events stream is a commit (commit.schema.json): one envelope, or an array of two or more envelopes that one decision appended together, atomically, at one stream sequence (headers `Tm-Event-Type` lists their types, comma-separated; `Nats-Msg-Id` is the first event's id). `{ns}` is the mesh's namespace (default `tm`)."
        },
        "defaultContentType": "application/json",
        "channels": {
            "runEvents": {
                "address": "{ns}.evt.{tenant}.run.{runId}",
                "description": "Stream {NS}_EVENTS. One subject per run aggregate; appended with expected-last-subject-sequence. Each message is a commit: one of these events, or several appended together (e.g. StepSucceeded with the StepDispatched of the steps it unblocks, or with the run's end).",
                "parameters": {"ns": {}, "tenant": {}, "runId": {}},
                "messages": refs(&run_events)
            },
            "tenantEvents": {
                "address": "{ns}.evt.{tenant}.{aggregate}.{id}",
                "description": "Stream {NS}_EVENTS. A tenant's other aggregates and records: the tenant, API keys and their uses, the audit log, repository connections and their failed commit statuses, webhook endpoints, workflows, schedules, secrets, and the runs and audit records retention removed.",
                "parameters": {"ns": {}, "tenant": {}, "aggregate": {"enum": ["tenant", "apikey", "keyuse", "audit", "repo", "repostatus", "endpoint", "workflow", "schedule", "secret", "retention"]}, "id": {}},
                "messages": refs(&["TenantCreated", "ApiKeyCreated", "ApiKeyRevoked", "ApiKeyUsed", "AuditRecorded", "AuditBatchRecorded", "RepoConnectionCreated", "RepoConnectionUpdated", "RepoConnectionDeleted", "WebhookEndpointCreated", "WebhookEndpointDeleted", "WebhookDeliveryFailed", "WebhookDeliveryRetried", "WebhookEndpointDisabled", "WebhookEndpointEnabled", "WebhookEndpointRecovered", "WebhookEndpointUpdated", "WebhookEndpointSecretRotated", "CommitStatusFailed", "CommitStatusRecovered", "WorkflowVersionStored", "ScheduleCreated", "SchedulePaused", "ScheduleResumed", "ScheduleTicked", "ScheduleDeleted", "ScheduleUpdated", "ScheduleTriggered", "ScheduleRunRefused", "SecretSet", "SecretDeleted", "RunsSwept", "AuditSwept"])
            },
            "dispatch": {
                "address": "{ns}.dispatch.{tenant}.{pool}",
                "description": "Stream {NS}_DISPATCH (work queue): steps admitted to run. `pool` is the token of the step's `runs_on` label set (`any` for none); each pool has its own durable consumer (`executors`, or `executors-{pool}`) shared by the executors that have its labels.",
                "parameters": {"ns": {}, "tenant": {}, "pool": {}},
                "messages": refs(&["Dispatch"])
            },
            "executors": {
                "address": "{ns}.executor.{id}",
                "description": "Stream {NS}_EXECUTORS (memory, last message per subject, max age 60 s): each live executor's latest heartbeat.",
                "parameters": {"ns": {}, "id": {}},
                "messages": refs(&["ExecutorBeat"])
            },
            "pools": {
                "address": "{ns}.pool.{pool}",
                "description": "Stream {NS}_POOLS (last message per subject): the label sets steps have been dispatched for, so executors with those labels attach to their consumers.",
                "parameters": {"ns": {}, "pool": {}},
                "messages": refs(&["Pool"])
            },
            "cancelSignals": {
                "address": "{ns}.ctl.cancel",
                "description": "Core NATS, every executor: kill the running steps of a run being cancelled.",
                "parameters": {"ns": {}},
                "messages": refs(&["CancelSignal"])
            },
            "breakerSignals": {
                "address": "{ns}.ctl.breaker",
                "description": "Core NATS, the dispatcher leader: how an attempt of a step with a circuit_breaker went (its executor says so after its report is recorded).",
                "parameters": {"ns": {}},
                "messages": refs(&["BreakerSignal"])
            },
            "endedRuns": {
                "address": "{ns}.ended.{tenant}",
                "description": "Stream {NS}_ENDED (work queue, 7 days, oldest dropped when full), durable consumer `fan-out` (notification): each run's terminal event, as its envelope, enqueued by the scheduler as it consumes the event (Nats-Msg-Id `ended:{event id}`).",
                "parameters": {"ns": {}, "tenant": {}},
                "messages": refs(&["RunSucceeded", "RunFailed", "RunCancelled", "RunTimedOut"])
            },
            "timers": {
                "address": "{ns}.timer.{tenant}",
                "description": "Stream {NS}_TIMERS (work queue), durable consumer `timers`: what the scheduler must do later; handed back with a delayed nak until due. The event log's sweep is one timer of the platform's own (`tenant` empty) on `{ns}.timer._platform.sweep`, armed only while that subject holds none.",
                "parameters": {"ns": {}, "tenant": {}},
                "messages": refs(&["Timer"])
            },
            "logs": {
                "address": "{ns}.log.{tenant}.{runId}.{step}",
                "description": "Stream {NS}_LOGS (limits: age and bytes, oldest dropped first): each line of a step's output as the executor reads it.",
                "parameters": {"ns": {}, "tenant": {}, "runId": {}, "step": {}},
                "messages": refs(&["LogLine"])
            },
            "breakers": {
                "address": "{ns}.breaker.{tenant}.{key}",
                "description": "Stream {NS}_BREAKERS (last message per subject, 2 days): a circuit breaker's state while it has something to remember, written by the dispatcher leader as signals change it (a closed one's subject purged), read by the next leader and by GET /v1/circuit-breakers.",
                "parameters": {"ns": {}, "tenant": {}, "key": {}},
                "messages": refs(&["BreakerState"])
            },
            "ingestCommands": {
                "address": "{ns}.cmd.ingest.{command}",
                "description": "Core NATS request/reply, queue group `ingest`. Replies are {\"Ok\": ...} or {\"Err\": Problem}.",
                "parameters": {"ns": {}, "command": {"enum": ["submit_run", "cancel_run", "rerun_run", "store_workflow", "create_schedule", "toggle_schedule", "delete_schedule", "update_schedule", "trigger_schedule", "backfill_schedule", "set_secret", "delete_secret", "purge_cache", "resend_commit_status", "revoke_api_key", "touch_api_key", "record_audit", "record_audits", "delete_integration", "create_tenant", "create_api_key", "create_repo_connection", "update_repo_connection", "create_webhook_endpoint", "retry_webhook_delivery", "enable_webhook_endpoint", "update_webhook_endpoint", "rotate_webhook_secret"]}},
                "messages": refs(&["SubmitRun", "CancelRun", "RerunRun", "StoreWorkflow", "WorkflowStored", "CreateSchedule", "ToggleSchedule", "DeleteSchedule", "UpdateSchedule", "TriggerSchedule", "BackfillSchedule", "Backfilled", "SetSecret", "DeleteSecret", "PurgeCache", "ResendCommitStatus", "RevokeApiKey", "TouchApiKey", "RecordAudit", "RecordAudits", "DeleteIntegration", "CreateTenant", "CreateApiKey", "CreateRepoConnection", "UpdateRepoConnection", "CreateWebhookEndpoint", "RetryWebhookDelivery", "EnableWebhookEndpoint", "UpdateWebhookEndpoint", "RotateWebhookSecret", "RunAccepted", "Created", "Purged", "StatusQueued", "Problem"])
            },
            "schedulerCommands": {
                "address": "{ns}.cmd.scheduler.{command}",
                "description": "Core NATS request/reply, queue group `scheduler`: executors' lease requests, result reports and hand-backs.",
                "parameters": {"ns": {}, "command": {"enum": ["lease", "report", "handback"]}},
                "messages": refs(&["LeaseRequest", "LeaseDecision", "ResultReport", "HandBack", "ReportAck", "Problem"])
            }
        },
        "operations": {
            "appendRunEvent": {"action": "send", "channel": {"$ref": "#/channels/runEvents"}},
            "consumeRunEvents": {"action": "receive", "channel": {"$ref": "#/channels/runEvents"}, "description": "Durable consumers `scheduler`, `projector`."},
            "announceEndedRun": {"action": "send", "channel": {"$ref": "#/channels/endedRuns"}},
            "fanOutEndedRun": {"action": "receive", "channel": {"$ref": "#/channels/endedRuns"}},
            "dispatchStep": {"action": "send", "channel": {"$ref": "#/channels/dispatch"}},
            "pullStep": {"action": "receive", "channel": {"$ref": "#/channels/dispatch"}},
            "heartbeat": {"action": "send", "channel": {"$ref": "#/channels/executors"}},
            "registerPool": {"action": "send", "channel": {"$ref": "#/channels/pools"}},
            "sendIngestCommand": {"action": "send", "channel": {"$ref": "#/channels/ingestCommands"}},
            "sendSchedulerCommand": {"action": "send", "channel": {"$ref": "#/channels/schedulerCommands"}}
        },
        "components": {"messages": messages}
    })
}

/// Every file under `proto/`, by relative path.
pub fn generate() -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    files.insert("envelope.schema.json".to_string(), pretty::<Envelope>());
    files.insert("commit.schema.json".to_string(), pretty::<Commit>());
    for (name, schema, _) in events() {
        files.insert(format!("events/{name}.schema.json"), schema);
    }
    for (name, schema) in commands() {
        files.insert(format!("commands/{name}.schema.json"), schema);
    }
    let mut doc = serde_json::to_string_pretty(&asyncapi()).expect("json");
    doc.push('\n');
    files.insert("asyncapi.json".to_string(), doc);
    files
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn proto_is_up_to_date() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
        let files = super::generate();
        if std::env::var_os("TASKMESH_BLESS").is_some() {
            let _ = std::fs::remove_dir_all(&root);
            for (path, text) in &files {
                let p = root.join(path);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, text).unwrap();
            }
        }
        let mut stale = Vec::new();
        for (path, text) in &files {
            match std::fs::read_to_string(root.join(path)) {
                Ok(on_disk) if &on_disk == text => {}
                _ => stale.push(path.clone()),
            }
        }
        for dir in ["events", "commands"] {
            for entry in std::fs::read_dir(root.join(dir)).into_iter().flatten().flatten() {
                let rel = format!("{dir}/{}", entry.file_name().to_string_lossy());
                if !files.contains_key(&rel) {
                    stale.push(format!("{rel} (no longer generated)"));
                }
            }
        }
        assert!(
            stale.is_empty(),
            "proto/ is stale: {stale:?}\nregenerate with: TASKMESH_BLESS=1 cargo test -p taskmesh-events proto"
        );
    }
}
