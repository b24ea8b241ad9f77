//! Schedules: arming their ticks as timers, and handling each due tick exactly once.
//!
//! A tick is recorded as `ScheduleTicked` on the schedule's subject with the expected last
//! sequence, so of two replicas handling the same tick one wins and the other re-reads and finds
//! it done. The tick's run has an id derived from `schedule:{id}:{tick}`, so starting it again
//! after a crash finds it started. Ticks missed while no scheduler ran are fired or skipped by
//! the catch-up policy.

use chrono::{DateTime, Utc};
use taskmesh_bus::{BusError, Stored};
use taskmesh_events::command::{CancelRun, SubmitRun, Timer, TimerKind};
use taskmesh_events::schedule::{Overlap, ScheduleSpec, ScheduleState, tick_key};
use taskmesh_events::{ErrorCode, Event, EventMeta, Problem, RunKey, ScheduleRunRefused, ScheduleTicked};
use uuid::Uuid;

use crate::{MAX_CONFLICTS, Scheduler};

/// How long after a tick was recorded its run is still submitted should it be missing: past
/// that, a missing run is taken as one whose events were removed (retention removes an ended
/// run's after `events_max_age_days`, a day at least), and a tick recorded before a long outage
/// or pause is not started that late.
const REDO_WITHIN: chrono::Duration = chrono::Duration::hours(1);

/// The tick to arm when none is due at `now` from `from`: `from` if it is still to come, else
/// (a timer of an expression since changed, say) the spec's next.
fn next_to_arm(spec: &ScheduleSpec, from: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match from {
        Some(f) if f > now => Some(f),
        Some(_) => spec.next_after(now),
        None => None,
    }
}

/// Whether ingest refused a tick's run for what it is: its workflow, inputs or a quota.
fn refused(p: &Problem) -> bool {
    match p.code {
        ErrorCode::InvalidInput | ErrorCode::InvalidWorkflow | ErrorCode::NotFound | ErrorCode::QuotaExceeded => true,
        ErrorCode::BadRequest => !p.detail.starts_with("malformed command"),
        _ => false,
    }
}

impl Scheduler {
    /// Puts a schedule's tick on the timers queue (deduplicated per tick).
    pub(crate) async fn arm(&self, tenant: &str, schedule_id: Uuid, tick: DateTime<Utc>) -> Result<(), BusError> {
        let timer =
            Timer { tenant: tenant.to_string(), due: tick, kind: TimerKind::ScheduleTick { schedule_id, tick } };
        let ns = self.bus.namespace();
        let msg_id = format!("tick:{schedule_id}:{}", tick.to_rfc3339());
        self.bus.enqueue(ns.timer(tenant), &msg_id, &timer, None).await.map(|_| ())
    }

    /// Arms the first tick of a created schedule, and the next one of a resumed schedule.
    pub(crate) async fn on_schedule_event(&self, stored: &Stored) -> Result<(), BusError> {
        let (id, tick) = match &stored.envelope.event {
            Event::ScheduleCreated(c) => (c.schedule_id, c.first_tick),
            Event::ScheduleResumed(r) => (r.schedule_id, r.next_tick),
            Event::ScheduleUpdated(u) => (u.schedule_id, u.next_tick),
            _ => return Ok(()),
        };
        match tick {
            Some(tick) => self.arm(&stored.envelope.tenant, id, tick).await,
            None => Ok(()),
        }
    }

    /// Handles a due tick of a schedule, and any ticks missed before it, exactly once.
    pub(crate) async fn tick(&self, tenant: &str, schedule_id: Uuid, tick: DateTime<Utc>) -> Result<(), Problem> {
        let subject = self.bus.namespace().schedule(tenant, schedule_id);
        for _ in 0..MAX_CONFLICTS {
            // What this scheduler folded before, and the events since (all of them, the first time).
            let state = self.schedules.load(&self.bus, tenant, schedule_id).await?.state;
            let state = state.ok_or_else(|| Problem::new(ErrorCode::NotFound, "no such schedule"))?;
            if self.see_to_last_tick(tenant, schedule_id, &state).await? {
                continue; // a refusal recorded, or the log moved on: decide on it as it is now
            }
            if state.paused {
                return Ok(()); // resuming arms the next tick
            }
            // A timer may fire a few milliseconds early: its own tick is due all the same.
            let now = Utc::now().max(tick);
            let from = state.first_due(tick);
            let (fire, last_due) = from.map(|f| state.spec.due(f, now)).unwrap_or_default();
            // Due ticks, none of which catch-up fires: the last is recorded skipped.
            let caught_none = fire.is_empty();
            let Some(last_due) = last_due else {
                // Nothing new is due: this timer was a duplicate. Make sure the next tick is armed.
                if let Some(next) = next_to_arm(&state.spec, from, now) {
                    self.arm(tenant, schedule_id, next).await?;
                }
                return Ok(());
            };
            // Each tick is decided, recorded, its cancels asked and its run started before the
            // next is decided: a caught-up tick's overlap policy sees the run the one before it
            // started (under `skip`, a catch-up fires one run while it runs). Under
            // `cancel_previous`, each would cancel the one before: of ticks caught up at once,
            // all but the last are recorded superseded instead of starting runs to cancel. Killed
            // between, only the last tick recorded lacks its run (and maybe its cancels), which
            // the next timer sees to first.
            let ticks = if caught_none { vec![last_due] } else { fire };
            let superseded = match state.spec.overlap {
                Overlap::CancelPrevious => ticks.len() - 1,
                _ => 0,
            };
            // The runs a tick's overlap policy looks at: the last tick's, and the last run by hand.
            let mut previous: Vec<Uuid> = state.last_run.into_iter().chain(state.last_manual).collect();
            let meta = EventMeta::new(tenant);
            let mut seq = state.last_seq;
            let mut lost_race = false;
            for (i, t) in ticks.into_iter().enumerate() {
                // Why it starts no run, or the runs its overlap policy cancels.
                let decided: Result<Vec<Uuid>, &str> = if caught_none {
                    Err("missed while no scheduler was running (catch_up: none)")
                } else if i < superseded {
                    Err("superseded by a later tick due at once (overlap: cancel_previous)")
                } else if state.spec.overlap == Overlap::Allow {
                    Ok(Vec::new())
                } else {
                    let active = self.active_of(tenant, previous.iter().copied()).await?;
                    match state.spec.overlap {
                        Overlap::Skip if !active.is_empty() => Err("the previous run is still running"),
                        Overlap::CancelPrevious => Ok(active),
                        _ => Ok(Vec::new()),
                    }
                };
                let run_id = decided.is_ok().then(|| taskmesh_ingest::tick_run_id(tenant, schedule_id, t));
                let skipped = decided.as_ref().err().map(|why| why.to_string());
                // Counted on from the state folded: a tick recorded under a lost race is not
                // kept (the loop decides again on the log as it is).
                let count = Some(state.ticks + i as u64 + 1);
                let ticked = ScheduleTicked { schedule_id, tick: t, run_id, skipped, count };
                let envelope = meta.envelope(subject.clone(), Event::ScheduleTicked(ticked));
                // The tick's record, then its cancels and its run; a refusal recorded after it.
                let recorded = match self.bus.append(seq, &envelope).await {
                    Ok(s) => {
                        seq = s;
                        self.cancel_previous(tenant, decided.unwrap_or_default()).await?;
                        match run_id {
                            None => Ok(seq),
                            Some(run_id) => match self.start_run(tenant, schedule_id, &state.spec, t).await? {
                                None => {
                                    previous = vec![run_id];
                                    Ok(seq)
                                }
                                // Refused, it never runs: the runs before it are still the previous ones.
                                Some(reason) => self.record_refusal(tenant, schedule_id, t, run_id, reason, seq).await,
                            },
                        }
                    }
                    Err(e) => Err(e),
                };
                match recorded {
                    Ok(s) => seq = s,
                    Err(BusError::Conflict { .. }) => {
                        lost_race = true;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if lost_race {
                continue; // another replica moved the schedule on: decide again on the fresh log
            }
            if let Some(next) = state.spec.next_after(last_due.max(now)) {
                self.arm(tenant, schedule_id, next).await?;
            }
            return Ok(());
        }
        Err(Problem::new(ErrorCode::Unavailable, "too much contention on this schedule; retry"))
    }

    /// Sees to the last tick recorded with a run, should that run be missing: killed between
    /// recording and submitting it, or its submission failed and this timer was handed back. It
    /// is submitted before anything else (paused since, or later ticks due, it would be passed
    /// over for good), after the cancels its overlap policy asked for (killed before them, say)
    /// of the runs before it still running; found started, it costs one read. Within
    /// [`REDO_WITHIN`] of its record only. True when its refusal was recorded (or the log moved
    /// on meanwhile): the caller decides again on the log as it is now.
    async fn see_to_last_tick(&self, tenant: &str, schedule_id: Uuid, state: &ScheduleState) -> Result<bool, Problem> {
        // (A tick that ran is the last run a tick started.)
        let (Some(last), true, Some(at), Some(run_id)) =
            (state.last_tick, state.last_tick_ran, state.last_tick_at, state.last_run)
        else {
            return Ok(false);
        };
        if Utc::now() - at >= REDO_WITHIN || self.run_exists(tenant, run_id).await? {
            return Ok(false);
        }
        // As the tick was decided: a change of the schedule since is not its.
        let spec = &state.tick_spec;
        if spec.overlap == Overlap::CancelPrevious {
            let (run, by_hand) = state.before_last_run;
            let active = self.active_of(tenant, run.into_iter().chain(by_hand)).await?;
            self.cancel_previous(tenant, active).await?;
        }
        let Some(reason) = self.start_run(tenant, schedule_id, spec, last).await? else { return Ok(false) };
        // After what was folded: not after a delete, or another replica's later tick.
        match self.record_refusal(tenant, schedule_id, last, run_id, reason, state.last_seq).await {
            Ok(_) | Err(BusError::Conflict { .. }) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts (or finds started) the run of one tick. A refusal (a `4xx`: its stored workflow
    /// gone, or now wanting an input the schedule lacks, or over a quota) is logged, counted and
    /// answered with why, for the caller to record: the tick has no run, and the schedule goes
    /// on with its next. (A refusal whose record lost a race is submitted, refused and counted
    /// once more.) Anything else is an error, and the timer is retried.
    async fn start_run(
        &self,
        tenant: &str,
        schedule_id: Uuid,
        spec: &ScheduleSpec,
        tick: DateTime<Utc>,
    ) -> Result<Option<String>, Problem> {
        let ingest = taskmesh_ingest::IngestClient::new(self.bus.clone());
        let run = SubmitRun::of_schedule(tenant, schedule_id, spec, tick, false, Some(tick_key(schedule_id, tick)));
        match ingest.submit_run(&run).await {
            // What ingest refuses of the run itself; not a command it could not read (from a
            // newer scheduler, say), which a later ingest may.
            Err(p) if refused(&p) => {
                metrics::counter!("taskmesh_schedule_runs_refused_total").increment(1);
                tracing::warn!(%tenant, %schedule_id, %tick, problem = %p.detail, "a schedule's tick was refused its run");
                Ok(Some(p.detail))
            }
            done => done.map(|_| None),
        }
    }

    /// Records that a tick's run was refused (`ScheduleRunRefused`, once per tick), after
    /// `expected`: the tick is passed over, not submitted again by a later timer.
    async fn record_refusal(
        &self,
        tenant: &str,
        schedule_id: Uuid,
        tick: DateTime<Utc>,
        run_id: Uuid,
        reason: String,
        expected: u64,
    ) -> Result<u64, BusError> {
        let reason: String = reason.chars().take(1_000).collect();
        let refused = ScheduleRunRefused { schedule_id, tick, run_id, reason };
        let subject = self.bus.namespace().schedule(tenant, schedule_id);
        let envelope = EventMeta::new(tenant).envelope(subject, Event::ScheduleRunRefused(refused));
        let msg_id = format!("refused:{schedule_id}:{}", tick.to_rfc3339());
        Ok(self.bus.append_with_id(Some(expected), &envelope, &msg_id).await?.seq)
    }

    /// Whether a run exists (was submitted).
    async fn run_exists(&self, tenant: &str, run_id: Uuid) -> Result<bool, BusError> {
        let subject = self.bus.namespace().run(&RunKey { tenant: tenant.to_string(), run_id });
        Ok(self.bus.last_seq(&subject).await? > 0)
    }

    /// Of `runs`, those not ended yet.
    async fn active_of(&self, tenant: &str, runs: impl Iterator<Item = Uuid>) -> Result<Vec<Uuid>, BusError> {
        let mut active = Vec::new();
        for run in runs {
            if self.run_active(tenant, run).await? {
                active.push(run);
            }
        }
        Ok(active)
    }

    /// Asks to cancel `runs`, superseded by a newer tick's run (`overlap: cancel_previous`).
    async fn cancel_previous(&self, tenant: &str, runs: Vec<Uuid>) -> Result<(), Problem> {
        let ingest = taskmesh_ingest::IngestClient::new(self.bus.clone());
        for run_id in runs {
            let reason = "a newer run of its schedule started (overlap: cancel_previous)".to_string();
            ingest.cancel_run(&CancelRun { tenant: tenant.to_string(), run_id, reason, key_id: None }).await?;
        }
        Ok(())
    }

    /// Whether a run has not ended yet.
    async fn run_active(&self, tenant: &str, run_id: Uuid) -> Result<bool, BusError> {
        let subject = self.bus.namespace().run(&RunKey { tenant: tenant.to_string(), run_id });
        Ok(self.bus.last(&subject).await?.is_some_and(|s| !s.envelope.event.is_run_terminal()))
    }
}

#[cfg(test)]
mod tests {
    use taskmesh_events::{ScheduleCreated, ScheduleDeleted, ScheduleToggled, ScheduleTriggered, ScheduleUpdated};

    use super::*;

    /// Folds `events` (those after `state`'s `last_seq`; all of them when `state` is `None`) onto
    /// `state`, as ingest folds them.
    fn fold(state: Option<ScheduleState>, events: &[Stored]) -> Option<ScheduleState> {
        ScheduleState::fold(state, events.iter().map(|e| (e.seq, &e.envelope)))
    }

    fn stored(seq: u64, event: Event) -> Stored {
        let envelope = EventMeta::new("acme").envelope("tm.evt.acme.schedule.x", event);
        Stored { seq, prev: None, envelope, part: 0, parts: 1 }
    }

    /// What a tick decides on: paused, last tick, last run, last sequence.
    type Seen = (bool, Option<DateTime<Utc>>, Option<Uuid>, u64);

    fn seen(state: &Option<ScheduleState>) -> Option<Seen> {
        state.as_ref().map(|s| (s.paused, s.last_tick, s.last_run, s.last_seq))
    }

    #[test]
    fn folding_the_events_since_a_fold_gives_what_folding_them_all_gives() {
        let id = Uuid::now_v7();
        let spec: ScheduleSpec =
            serde_json::from_value(serde_json::json!({"cron": "* * * * *", "workflow": "w"})).unwrap();
        let now = Utc::now();
        let at = |m: i64| now + chrono::Duration::minutes(m);
        let (run1, run2) = (Uuid::now_v7(), Uuid::now_v7());
        let toggled = ScheduleToggled { schedule_id: id, next_tick: None };
        let ticked = |m, run_id, skipped: Option<&str>| {
            Event::ScheduleTicked(ScheduleTicked {
                schedule_id: id,
                tick: at(m),
                run_id,
                skipped: skipped.map(Into::into),
                count: None,
            })
        };
        let events = vec![
            stored(3, Event::ScheduleCreated(ScheduleCreated { schedule_id: id, spec, first_tick: Some(at(1)) })),
            stored(7, ticked(1, Some(run1), None)),
            stored(9, Event::SchedulePaused(toggled.clone())),
            stored(12, Event::ScheduleResumed(toggled)),
            stored(15, ticked(2, None, Some("the previous run is still running"))),
            stored(20, ticked(3, Some(run2), None)),
        ];
        let whole = fold(None, &events);
        assert_eq!(seen(&whole), Some((false, Some(at(3)), Some(run2), 20)));
        for cut in 1..events.len() {
            let earlier = fold(None, &events[..cut]);
            assert_eq!(seen(&fold(earlier, &events[cut..])), seen(&whole), "folded up to event {cut}, then the rest");
        }
        // A skipped tick keeps the last run; a pause shows.
        assert_eq!(seen(&fold(None, &events[..5])).map(|s| (s.0, s.2)), Some((false, Some(run1))));
        assert_eq!(seen(&fold(None, &events[..3])).map(|s| s.0), Some(true));
        // Deleted, or never created: no schedule.
        let deleted = fold(whole, &[stored(21, Event::ScheduleDeleted(ScheduleDeleted { schedule_id: id }))]);
        assert!(deleted.is_none());
        assert!(fold(None, &events[1..]).is_none(), "no ScheduleCreated first");
        assert!(fold(None, &[]).is_none());
    }

    #[test]
    fn a_changed_spec_a_triggered_run_and_a_skipped_tick_fold_as_a_tick_needs_them() {
        let id = Uuid::now_v7();
        let spec = |cron: &str| -> ScheduleSpec {
            serde_json::from_value(serde_json::json!({"cron": cron, "workflow": "w"})).unwrap()
        };
        let now = Utc::now();
        let at = |m: i64| now + chrono::Duration::minutes(m);
        let (ticked, manual) = (Uuid::now_v7(), Uuid::now_v7());
        let created = ScheduleCreated { schedule_id: id, spec: spec("* * * * *"), first_tick: Some(at(1)) };
        let events = vec![
            stored(1, Event::ScheduleCreated(created)),
            stored(
                2,
                Event::ScheduleTicked(ScheduleTicked {
                    schedule_id: id,
                    tick: at(1),
                    run_id: Some(ticked),
                    skipped: None,
                    count: None,
                }),
            ),
            stored(3, Event::ScheduleTriggered(ScheduleTriggered { schedule_id: id, run_id: manual })),
            stored(
                4,
                Event::ScheduleUpdated(ScheduleUpdated {
                    schedule_id: id,
                    spec: spec("0 * * * *"),
                    next_tick: Some(at(60)),
                }),
            ),
        ];
        let state = fold(None, &events).unwrap();
        assert_eq!(state.spec.cron, "0 * * * *", "the spec as last changed");
        assert_eq!(state.ticks_from, Some(at(60)), "the new spec ticks from its first tick after the change");
        assert_eq!((state.last_run, state.last_manual), (Some(ticked), Some(manual)), "a tick's run and one by hand");
        assert!(state.last_tick_ran);
        assert_eq!(state.tick_spec.cron, "* * * * *", "the last tick's run is submitted as its tick was decided");
        // A skipped tick: the last tick started no run (a duplicate timer must not start one).
        let skipped =
            ScheduleTicked { schedule_id: id, tick: at(2), run_id: None, skipped: Some("running".into()), count: None };
        let state = fold(Some(state), &[stored(5, Event::ScheduleTicked(skipped))]).unwrap();
        assert!(!state.last_tick_ran);
        assert!(std::sync::Arc::ptr_eq(&state.tick_spec, &state.spec), "a tick after the change: the spec now");
        assert_eq!((state.last_tick, state.last_run), (Some(at(2)), Some(ticked)));
        // Changed while paused (no next tick): from the change on.
        let paused = ScheduleUpdated { schedule_id: id, spec: spec("*/5 * * * *"), next_tick: None };
        let event = stored(6, Event::ScheduleUpdated(paused));
        let changed_at = event.envelope.occurred_at;
        assert_eq!(fold(Some(state), &[event]).unwrap().ticks_from, Some(changed_at));
    }

    #[test]
    fn a_timer_looks_for_due_ticks_from_its_own_or_the_changed_expressions_first_and_arms_one_to_come() {
        use chrono::TimeZone;
        let id = Uuid::now_v7();
        let spec = |cron: &str| -> ScheduleSpec {
            serde_json::from_value(serde_json::json!({"cron": cron, "workflow": "w"})).unwrap()
        };
        let noon = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let min = |m: i64| noon + chrono::Duration::minutes(m);
        let created = ScheduleCreated { schedule_id: id, spec: spec("* * * * *"), first_tick: Some(noon) };
        let state = fold(None, &[stored(1, Event::ScheduleCreated(created))]).unwrap();
        assert_eq!(state.first_due(noon), Some(noon), "its own tick");
        let ticked =
            ScheduleTicked { schedule_id: id, tick: noon, run_id: Some(Uuid::now_v7()), skipped: None, count: None };
        let state = fold(Some(state), &[stored(2, Event::ScheduleTicked(ticked))]).unwrap();
        assert_eq!(state.first_due(noon), Some(min(1)), "a duplicate: after the last tick handled");
        assert_eq!(state.first_due(min(3)), Some(min(3)), "a later timer: its own, the missed ones by catch-up");
        // Other inputs: the ticks go on as they were, a due one included.
        let inputs = serde_json::json!({"cron": "* * * * *", "workflow": "w", "inputs": {"a": 1}});
        let mut changed =
            ScheduleUpdated { schedule_id: id, spec: serde_json::from_value(inputs).unwrap(), next_tick: Some(min(1)) };
        let state = fold(Some(state), &[stored(3, Event::ScheduleUpdated(changed.clone()))]).unwrap();
        assert_eq!((state.ticks_from, state.first_due(min(1))), (Some(noon), Some(min(1))));
        // Another expression: from its first tick after the change; an old timer before it arms
        // that tick rather than its own, long passed.
        changed.spec = spec("0 * * * *");
        changed.next_tick = Some(min(60));
        let state = fold(Some(state), &[stored(4, Event::ScheduleUpdated(changed))]).unwrap();
        assert_eq!(state.first_due(min(2)), Some(min(60)));
        assert_eq!(next_to_arm(&state.spec, state.first_due(min(2)), min(2)), Some(min(60)));
        assert_eq!(next_to_arm(&state.spec, Some(min(2)), min(5)), Some(min(60)), "passed: the spec's next");
        assert_eq!(next_to_arm(&state.spec, None, min(5)), None, "an expression that never fires again");
    }
}
