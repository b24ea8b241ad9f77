//! Retention of the event log (`nats.events_max_age_days`): what is older than that is removed,
//! except what is still in force.
//!
//! The stream has no age limit of its own: JetStream's `max_age` removes the oldest messages
//! whatever they are, and a tenant's keys, secrets, workflows, schedules and endpoints are
//! events like a run's, created once and read for as long as they exist. A sweep walks the
//! log's part older than the limit (headers only) and removes, subject by subject:
//! - a run's events, once the run has ended and its last event is that old;
//! - the audit log's, keys' uses' and commit statuses' records that old, and a secret's values
//!   set before its latest (the newest of each subject stays, as its last sequence);
//! - a schedule's ticks (and its runs by hand, and refusals) that old, but those its state is
//!   folded from: its last tick, the ticks that started its last two runs not refused, its
//!   last run by hand while fewer than two such runs followed it, and what follows the
//!   earliest of them (and only when the state folded without them is the same);
//! - the whole log of a schedule, secret, endpoint or repository connection deleted that long
//!   ago (a key revoked stays: a tenant's keys, revoked or not, tell that it has had some).
//!
//! Everything else stays. Each removal is bounded by the sequence the sweep looked at, so an
//! event appended meanwhile (a key submitting its run again) is never removed with it.
//!
//! When: one timer on the timers queue ([`arm`]; `Namespace::sweep_timer`), which every
//! scheduler replica arms if it is not there, and whichever replica it is delivered to sweeps
//! (see the scheduler's `sweep_on`), so several replicas sweep once a round between them. Two
//! sweeps at once (a replica stalled past the timer's ack wait, another taking it over)
//! remove the same messages, which is harmless.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use taskmesh_bus::{Bus, BusError, Heading};
use taskmesh_events::{AuditSwept, Event, EventMeta, MAX_RUNS_SWEPT, RunsSwept, SweptRun};

/// Messages read per round of a sweep (headers only).
const ROUND: usize = 20_000;

/// How long after one sweep's end the next is due.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(3_600);

/// Puts the sweep's timer on the timers queue, due at `due`, unless one is there (armed, or
/// taken by a replica sweeping): `false` then.
pub async fn arm(bus: &Bus, due: DateTime<Utc>) -> Result<bool, BusError> {
    arm_after(bus, 0, due).await
}

/// Puts the sweep's next timer, due at `due`, on the timers queue after the one at stream
/// sequence `last`, unless another was put there since: `false` then. The one at `last` is
/// still there, so no replica arms one meanwhile ([`arm`] expects none).
pub async fn arm_after(bus: &Bus, last: u64, due: DateTime<Utc>) -> Result<bool, BusError> {
    let timer = taskmesh_events::command::Timer {
        tenant: String::new(),
        due,
        kind: taskmesh_events::command::TimerKind::EventLogSweep,
    };
    bus.enqueue_after(bus.namespace().sweep_timer(), last, &timer).await
}

/// Events that end a run.
const RUN_ENDS: [&str; 4] = ["RunSucceeded", "RunFailed", "RunCancelled", "RunTimedOut"];
/// Events after which an aggregate is gone.
const DELETIONS: [&str; 4] = ["ScheduleDeleted", "SecretDeleted", "WebhookEndpointDeleted", "RepoConnectionDeleted"];
/// A schedule's events that each tick (or run by hand) adds.
const TICKS: [&str; 3] = ["ScheduleTicked", "ScheduleTriggered", "ScheduleRunRefused"];
/// Subjects whose messages each stand alone, the newest saying all that is needed (records
/// appended one after another; a secret's values, the latest in force; the runs a sweep
/// removed).
const RECORDS: [&str; 5] = ["audit", "keyuse", "repostatus", "secret", "retention"];

/// What a sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Messages read.
    pub read: usize,
    /// Ended runs whose events were removed.
    pub runs: usize,
    /// Deleted aggregates whose events were removed.
    pub deleted: usize,
    /// Old records (audit, key uses, statuses), a secret's superseded values, and schedule
    /// ticks removed.
    pub records: u64,
    /// Whether a stop ended it before it had looked at all of the log older than the cutoff.
    pub stopped: bool,
}

/// A sweep's stop: whether to stop now, asked before each removal and round; or none.
type Stop<'a> = Option<&'a (dyn Fn() -> bool + Send + Sync)>;

/// Whether `stop` says to stop now, noted in `swept`.
fn stops_now(stop: Stop<'_>, swept: &mut Swept) -> bool {
    swept.stopped = stop.is_some_and(|s| s());
    swept.stopped
}

/// Removes what the event log holds from before `cutoff` and is no longer in force (see the
/// module's docs).
pub async fn sweep(bus: &Bus, cutoff: DateTime<Utc>) -> Result<Swept, BusError> {
    sweep_in_rounds(bus, cutoff, ROUND).await
}

/// [`sweep`], reading `per_round` messages a round (tests cross rounds with a few).
pub async fn sweep_in_rounds(bus: &Bus, cutoff: DateTime<Utc>, per_round: usize) -> Result<Swept, BusError> {
    rounds(bus, cutoff, per_round, None).await
}

/// [`sweep`] until `stop` is cancelled: it stops before its next removal, once the runs it
/// removed are recorded for the read side (so a stop waits for the removal under way, or the
/// read of a round's headings, and that record), returning what it removed so far, `stopped`.
pub async fn sweep_unless_stopped(
    bus: &Bus,
    cutoff: DateTime<Utc>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Swept, BusError> {
    rounds(bus, cutoff, ROUND, Some(&|| stop.is_cancelled())).await
}

/// [`sweep_unless_stopped`], reading `per_round` messages a round, stopping when `stop` says
/// so (asked before each round and each removal: tests stop it at a given removal).
pub async fn sweep_in_rounds_unless(
    bus: &Bus,
    cutoff: DateTime<Utc>,
    per_round: usize,
    stop: &(dyn Fn() -> bool + Send + Sync),
) -> Result<Swept, BusError> {
    rounds(bus, cutoff, per_round, Some(stop)).await
}

async fn rounds(bus: &Bus, cutoff: DateTime<Utc>, per_round: usize, stop: Stop<'_>) -> Result<Swept, BusError> {
    let mut swept = Swept::default();
    // Runs seen ending, across rounds (a run's end and its last event may fall in two).
    let mut ended = HashSet::new();
    let mut from = 1;
    loop {
        if stops_now(stop, &mut swept) {
            break;
        }
        let (headings, more) = bus.headings_before(from, cutoff, per_round.max(1)).await?;
        let Some(last) = headings.last() else { break };
        from = last.seq + 1;
        swept.read += headings.len();
        round(bus, &headings, &mut ended, &mut swept, stop).await?;
        if swept.stopped || !more {
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
    stop: Stop<'_>,
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
            Some("run") => {}
            Some(kind) => {
                if RECORDS.contains(&kind) {
                    let entry = records.entry(subject).or_default();
                    *entry = (h.seq, entry.1 + 1);
                }
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
    // An ended run all of whose events are old: gone, and recorded as gone for the read side
    // (what was removed before a failure too).
    let mut removed: HashMap<String, Vec<SweptRun>> = HashMap::new();
    let purged = async {
        for (subject, seen) in &last_seen {
            if !ended.contains(*subject) {
                continue;
            }
            if stops_now(stop, swept) {
                break;
            }
            let last = bus.last_seq(subject).await?;
            if last == *seen {
                bus.purge_subject_below(subject, seen + 1).await?;
                swept.runs += 1;
                if let Some(key) = ns.parse_run(subject) {
                    removed.entry(key.tenant).or_default().push(SweptRun { run_id: key.run_id, last_seq: *seen });
                }
            }
            // Removed (here, or by another replica's sweep), or to be looked at again when a
            // later round sees its last event.
            if last <= *seen {
                ended.remove(*subject);
            }
        }
        Ok::<_, BusError>(())
    }
    .await;
    let recorded = record_removed(bus, removed).await;
    if let (Err(_), Err(e)) = (&purged, &recorded) {
        tracing::warn!(error = %e, "recording the runs removed failed: their rows stay in the read side until a rebuild");
    }
    purged?;
    recorded?;
    if swept.stopped {
        return Ok(());
    }
    // Stopped, the rest of the round is left before its next removal: each removal below
    // (with its record, for audit records; a schedule's ticks, decided as a whole) is done
    // whole.
    // A deleted aggregate with nothing since: gone.
    for (subject, seq) in deleted {
        if stops_now(stop, swept) {
            return Ok(());
        }
        if bus.last_seq(subject).await? == seq {
            bus.purge_subject_below(subject, seq + 1).await?;
            schedules.remove(subject);
            records.remove(subject);
            swept.deleted += 1;
        }
    }
    // Old records: all but the newest of each subject; a tenant's audit records removed are
    // recorded for the read side (as runs are, above).
    for (subject, (newest, count)) in records {
        if stops_now(stop, swept) {
            return Ok(());
        }
        if count > 1 {
            let purged = bus.purge_subject_below(subject, newest).await?;
            swept.records += purged;
            if let (Some("audit"), Some(tenant)) = (ns.event_kind(subject), ns.event_tenant(subject))
                && purged > 0
            {
                let event = Event::AuditSwept(AuditSwept { below_seq: newest });
                let envelope = EventMeta::new(tenant).envelope(ns.audit_swept(tenant), event);
                let recorded = bus.append_with_id(None, &envelope, &format!("audit-swept:{tenant}:{newest}")).await;
                if let Err(e) = recorded {
                    // They go from the read side at the tenant's next audit purge (the delete
                    // is of all below), or at a rebuild.
                    tracing::warn!(error = %e, tenant, "recording the audit records removed failed");
                    return Err(e);
                }
            }
        }
    }
    // A schedule's old ticks, but those its state is folded from.
    let stream = ns.events_stream();
    let is_tick = |h: &Heading| !h.types.is_empty() && h.types.iter().all(|t| TICKS.contains(&t.as_str()));
    for (subject, messages) in schedules {
        if stops_now(stop, swept) {
            return Ok(());
        }
        // Fewer than three ticks of any kind: nothing to gain from reading it.
        if messages.iter().filter(|h| is_tick(h)).count() < 3 {
            continue;
        }
        // Up to the last of its messages this round looks at: the state folded from them
        // being the same without those removed, it is the same after whatever follows. (So a
        // read is at most about a round's messages, and the few kept before them.)
        let until = messages.last().map_or(0, |h| h.seq);
        let events = bus.read_subject_until(subject, until).await?;
        let keep_from = folded_from(&events);
        let doomed: HashSet<u64> = messages.iter().filter(|h| h.seq < keep_from && is_tick(h)).map(|h| h.seq).collect();
        // Only if the schedule folds to the same state without them: what `folded_from`
        // overlooks keeps them all.
        if doomed.is_empty() || decisive(&events, &HashSet::new()) != decisive(&events, &doomed) {
            continue;
        }
        for seq in doomed {
            bus.delete_message(&stream, seq).await?;
            swept.records += 1;
        }
    }
    Ok(())
}

/// Appends, a tenant at a time and at most [`MAX_RUNS_SWEPT`] runs an event, `RunsSwept` for
/// the runs whose events were `removed`, so the read side drops their rows. (Should it fail,
/// the rows stay until a rebuild of the read side, which leaves them out: the sweep's error
/// says so.)
async fn record_removed(bus: &Bus, removed: HashMap<String, Vec<SweptRun>>) -> Result<(), BusError> {
    let ns = bus.namespace();
    for (tenant, runs) in removed {
        for chunk in runs.chunks(MAX_RUNS_SWEPT) {
            let event = Event::RunsSwept(RunsSwept { runs: chunk.to_vec() });
            let envelope = EventMeta::new(&tenant).envelope(ns.runs_swept(&tenant), event);
            // A retried append of the same chunk is appended once (chunks of another sweep may
            // differ: a run recorded twice is harmless, its rows already gone).
            let msg_id = format!("swept:{}:{}:{}", tenant, chunk[0].run_id, chunk[0].last_seq);
            bus.append_with_id(None, &envelope, &msg_id).await?;
        }
    }
    Ok(())
}

/// Of a schedule's events, the sequence from which its state needs its ticks, runs by hand and
/// refusals: its last tick, the ticks that started its last two runs not refused (its overlap
/// policy looks at the last; a refusal of the next turns to it), and its last run by hand
/// while fewer than two such runs followed it.
fn folded_from(events: &[taskmesh_bus::Stored]) -> u64 {
    let (mut ticks, mut runs, mut manual) = (Vec::new(), Vec::new(), None);
    for e in events {
        match &e.envelope.event {
            Event::ScheduleTicked(t) => {
                ticks.push(e.seq);
                if let Some(run) = t.run_id {
                    runs.push((e.seq, run, t.tick));
                }
            }
            Event::ScheduleRunRefused(r) => runs.retain(|&(_, run, tick)| (run, tick) != (r.run_id, r.tick)),
            Event::ScheduleTriggered(_) => manual = Some(e.seq),
            _ => {}
        }
    }
    let runs_from = runs.len().checked_sub(2).and_then(|i| runs.get(i)).or(runs.first()).map(|r| r.0);
    let manual = manual.filter(|&m| runs.iter().filter(|r| r.0 > m).count() < 2);
    [ticks.last().copied(), runs_from, manual].into_iter().flatten().min().unwrap_or(0)
}

/// What a schedule's ticks decide on, folded from `events` without those at `skipped`.
fn decisive(events: &[taskmesh_bus::Stored], skipped: &HashSet<u64>) -> Option<impl PartialEq + use<>> {
    let kept = events.iter().filter(|e| !skipped.contains(&e.seq)).map(|e| (e.seq, &e.envelope));
    let s = taskmesh_events::schedule::ScheduleState::fold(None, kept)?;
    // The run by hand's sequence says something only while that run is looked at.
    let manual_seq = (s.last_manual.is_some() || s.before_last_run.1.is_some()).then_some(s.last_manual_seq);
    Some((
        (s.paused, s.last_tick, s.last_tick_at, s.last_tick_ran, s.ticks_from, s.last_seq, s.ticks),
        (s.last_run, s.last_manual, manual_seq, s.before_last_run),
        ((*s.spec).clone(), (*s.tick_spec).clone()),
    ))
}

#[cfg(test)]
mod tests {
    use taskmesh_bus::Stored;
    use taskmesh_events::schedule::ScheduleSpec;
    use taskmesh_events::{EventMeta, ScheduleCreated, ScheduleRunRefused, ScheduleTicked, ScheduleTriggered};
    use uuid::Uuid;

    use super::*;

    fn stored(seq: u64, event: Event) -> Stored {
        let envelope = EventMeta::new("acme").envelope("tm.evt.acme.schedule.x", event);
        Stored { seq, prev: None, envelope, part: 0, parts: 1 }
    }

    fn tick(seq: u64, ran: bool) -> Stored {
        let run_id = ran.then(Uuid::now_v7);
        stored(
            seq,
            Event::ScheduleTicked(ScheduleTicked {
                schedule_id: Uuid::nil(),
                tick: Utc::now(),
                run_id,
                skipped: None,
                count: None,
            }),
        )
    }

    #[test]
    fn a_schedule_keeps_the_ticks_its_state_is_folded_from() {
        // Every tick ran: from the second to last.
        assert_eq!(folded_from(&[tick(2, true), tick(3, true), tick(4, true), tick(5, true)]), 4);
        // Ticks skipped since a run that still runs (`overlap: skip`): from the tick that
        // started it, which the policy looks at.
        assert_eq!(folded_from(&[tick(2, true), tick(3, true), tick(4, false), tick(5, false), tick(6, false)]), 2);
        // A run by hand before the last two ticks, none of which ran: from it.
        let by_hand =
            stored(3, Event::ScheduleTriggered(ScheduleTriggered { schedule_id: Uuid::nil(), run_id: Uuid::nil() }));
        assert_eq!(folded_from(&[tick(1, false), tick(2, false), by_hand, tick(4, false), tick(5, false)]), 3);
        assert_eq!(folded_from(&[tick(2, false), tick(4, true), tick(5, false), tick(6, false)]), 4);
        assert_eq!(folded_from(&[]), 0, "nothing to go by: nothing removed");
        // Runs refused are passed over: from the tick of the last run that was not.
        let at = |m: i64| Utc::now() + chrono::Duration::minutes(m);
        let (t2, t3, t5) = (at(2), at(3), at(5));
        let (r0, r1, r2) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // Each tick with its count (as recorded since 2026-12-08), the sequence standing in.
        let ticked = |seq, tick, run| {
            let t =
                ScheduleTicked { schedule_id: Uuid::nil(), tick, run_id: Some(run), skipped: None, count: Some(seq) };
            stored(seq, Event::ScheduleTicked(t))
        };
        let refused = |seq, tick, run_id| {
            let r = ScheduleRunRefused { schedule_id: Uuid::nil(), tick, run_id, reason: "no".into() };
            stored(seq, Event::ScheduleRunRefused(r))
        };
        let events = [ticked(2, t2, r0), ticked(3, t3, r1), refused(4, t3, r1), ticked(5, t5, r2), refused(6, t5, r2)];
        assert_eq!(folded_from(&events), 2);
        // A late refusal of an older tick's run, which the fold passes over: the rule would
        // start from the next tick, but the state folded without the older one differs (the
        // run before the last), so the sweep keeps them.
        let spec: ScheduleSpec =
            serde_json::from_value(serde_json::json!({"cron": "* * * * *", "workflow": "w"})).unwrap();
        let created = || {
            let c = ScheduleCreated { schedule_id: Uuid::nil(), spec: spec.clone(), first_tick: Some(t2) };
            stored(0, Event::ScheduleCreated(c))
        };
        let late = [created(), ticked(1, t2, r0), ticked(2, t3, r1), refused(3, t2, r0)];
        assert_eq!(folded_from(&late), 2);
        let without_first: HashSet<u64> = [1].into();
        assert!(decisive(&late, &HashSet::new()).is_some());
        assert!(decisive(&late, &without_first) != decisive(&late, &HashSet::new()));
        let all = [created(), ticked(1, t2, r0), ticked(2, t3, r1), ticked(4, t5, r2), ticked(5, at(6), r2)];
        assert!(decisive(&all, &without_first) == decisive(&all, &HashSet::new()));
        // Ticks recorded without a count (before 2026-12-08) are counted one by one: removing
        // one would change the count, so they stay.
        let uncounted = |seq, tick, run| {
            let t = ScheduleTicked { schedule_id: Uuid::nil(), tick, run_id: Some(run), skipped: None, count: None };
            stored(seq, Event::ScheduleTicked(t))
        };
        let old =
            [created(), uncounted(1, t2, r0), uncounted(2, t3, r1), uncounted(4, t5, r2), uncounted(5, at(6), r2)];
        assert!(decisive(&old, &without_first) != decisive(&old, &HashSet::new()));
        // A run by hand followed by two runs of ticks is no longer looked at: removing it
        // leaves the state as it was.
        let by_hand = stored(1, Event::ScheduleTriggered(ScheduleTriggered { schedule_id: Uuid::nil(), run_id: r0 }));
        let kept = [created(), by_hand, ticked(2, t2, r0), ticked(3, t3, r1), ticked(4, t5, r2)];
        assert_eq!(folded_from(&kept), 3);
        assert!(decisive(&kept, &[1, 2].into()) == decisive(&kept, &HashSet::new()));
        let by_hand = stored(1, Event::ScheduleTriggered(ScheduleTriggered { schedule_id: Uuid::nil(), run_id: r0 }));
        assert_eq!(folded_from(&[by_hand, tick(2, true), tick(3, true), tick(4, true)]), 3);
    }
}
