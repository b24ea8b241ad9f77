//! Retention of the event log (`nats.events_max_age_days`): what is older than that is removed,
//! except what is still in force.
//!
//! The stream has no age limit of its own: JetStream's `max_age` removes the oldest messages
//! whatever they are, and a tenant's keys, secrets, workflows, schedules and endpoints are
//! events like a run's, created once and read for as long as they exist. A sweep walks the
//! log's part older than the limit (headers only) and removes, subject by subject:
//! - a run's events, once the run has ended and its last event is that old;
//! - the audit log's, keys' uses' and commit statuses' records that old (the newest of each
//!   subject stays, as its last sequence);
//! - a schedule's ticks (and its runs by hand, and refusals) that old, all but the last two
//!   ticks and what follows them;
//! - the whole log of a schedule, secret, endpoint, repository connection or key deleted
//!   (revoked) that long ago.
//!
//! Everything else stays. Each removal is bounded by the sequence the sweep looked at, so an
//! event appended meanwhile (a key submitting its run again) is never removed with it. Sweeps
//! on several replicas at once remove the same messages, which is harmless.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use taskmesh_bus::{Bus, BusError, Heading};

/// Messages read per round of a sweep (headers only).
const ROUND: usize = 20_000;

/// Events that end a run.
const RUN_ENDS: [&str; 4] = ["RunSucceeded", "RunFailed", "RunCancelled", "RunTimedOut"];
/// Events after which an aggregate is gone.
const DELETIONS: [&str; 5] =
    ["ScheduleDeleted", "SecretDeleted", "WebhookEndpointDeleted", "RepoConnectionDeleted", "ApiKeyRevoked"];
/// A schedule's events that each tick (or run by hand) adds.
const TICKS: [&str; 3] = ["ScheduleTicked", "ScheduleTriggered", "ScheduleRunRefused"];
/// Subjects that are records appended one after another, none of which is needed once old.
const RECORDS: [&str; 3] = ["audit", "keyuse", "repostatus"];

/// What a sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Messages read.
    pub read: usize,
    /// Ended runs whose events were removed.
    pub runs: usize,
    /// Deleted aggregates whose events were removed.
    pub deleted: usize,
    /// Old records (audit, key uses, statuses) and schedule ticks removed.
    pub records: u64,
}

/// Removes what the event log holds from before `cutoff` and is no longer in force (see the
/// module's docs).
pub async fn sweep(bus: &Bus, cutoff: DateTime<Utc>) -> Result<Swept, BusError> {
    let mut swept = Swept::default();
    // Runs seen ending, across rounds (a run's end and its last event may fall in two).
    let mut ended = HashSet::new();
    let mut from = 1;
    loop {
        let (headings, more) = bus.headings_before(from, cutoff, ROUND).await?;
        let Some(last) = headings.last() else { break };
        from = last.seq + 1;
        swept.read += headings.len();
        round(bus, &headings, &mut ended, &mut swept).await?;
        if !more {
            break;
        }
    }
    Ok(swept)
}

/// One round: `headings`, all older than the cutoff, in order.
async fn round(
    bus: &Bus,
    headings: &[Heading],
    ended: &mut HashSet<String>,
    swept: &mut Swept,
) -> Result<(), BusError> {
    let ns = bus.namespace();
    // Per subject: the last sequence seen; and a schedule's messages.
    let mut last_seen: HashMap<&str, u64> = HashMap::new();
    let mut records: HashMap<&str, (u64, usize)> = HashMap::new();
    let mut schedules: HashMap<&str, Vec<&Heading>> = HashMap::new();
    let mut deleted: HashMap<&str, u64> = HashMap::new();
    for h in headings {
        let subject = h.subject.as_str();
        last_seen.insert(subject, h.seq);
        let has = |names: &[&str]| h.types.iter().any(|t| names.contains(&t.as_str()));
        match ns.event_kind(subject) {
            Some("run") if has(&RUN_ENDS) => {
                ended.insert(h.subject.clone());
            }
            Some(kind) if RECORDS.contains(&kind) => {
                let entry = records.entry(subject).or_default();
                *entry = (h.seq, entry.1 + 1);
            }
            Some(kind) => {
                if kind == "schedule" {
                    schedules.entry(subject).or_default().push(h);
                }
                if has(&DELETIONS) {
                    deleted.insert(subject, h.seq);
                } else {
                    deleted.remove(subject);
                }
            }
            None => {}
        }
    }
    // An ended run all of whose events are old: gone.
    for (subject, seen) in &last_seen {
        if !ended.contains(*subject) {
            continue;
        }
        if bus.last_seq(subject).await? == *seen {
            bus.purge_subject_below(subject, seen + 1).await?;
            ended.remove(*subject);
            swept.runs += 1;
        }
    }
    // A deleted aggregate with nothing since: gone.
    for (subject, seq) in deleted {
        if bus.last_seq(subject).await? == seq {
            bus.purge_subject_below(subject, seq + 1).await?;
            schedules.remove(subject);
            swept.deleted += 1;
        }
    }
    // Old records: all but the newest of each subject.
    for (subject, (newest, count)) in records {
        if count > 1 {
            swept.records += bus.purge_subject_below(subject, newest).await?;
        }
    }
    // A schedule's old ticks: those before its last two ticks (which its state is folded from).
    let stream = ns.events_stream();
    for messages in schedules.values() {
        let is_tick = |h: &&&Heading| !h.types.is_empty() && h.types.iter().all(|t| TICKS.contains(&t.as_str()));
        let ticked: Vec<u64> =
            messages.iter().filter(|h| h.types.iter().any(|t| t == "ScheduleTicked")).map(|h| h.seq).collect();
        let Some(&keep_from) = ticked.len().checked_sub(2).and_then(|i| ticked.get(i)) else { continue };
        for h in messages.iter().filter(|h| h.seq < keep_from).filter(is_tick) {
            bus.delete_message(&stream, h.seq).await?;
            swept.records += 1;
        }
    }
    Ok(())
}
