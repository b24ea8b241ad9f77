//! Schedules: run a workflow on a cron expression, in a time zone, with an overlap policy and a
//! catch-up policy for ticks missed while no scheduler ran.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, FieldError, Problem};

/// What to do when a tick comes while the schedule's previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Skip the tick.
    #[default]
    Skip,
    /// Start another run alongside.
    Allow,
    /// Cancel the previous run and start the new one.
    CancelPrevious,
}

/// Which ticks missed while no scheduler ran are fired when one comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// None: only a tick less than [`GRACE_SECS`] late fires.
    #[default]
    None,
    /// Only the latest missed tick.
    Last,
    /// Every missed tick, oldest first, up to `catch_up_limit` (the latest ones).
    All,
}

/// The idempotency key of a tick's run: the scheduler's, when the tick fires, and a backfill's,
/// so the two find one run.
pub fn tick_key(schedule_id: uuid::Uuid, tick: DateTime<Utc>) -> String {
    format!("schedule:{schedule_id}:{}", tick.to_rfc3339())
}

/// The most bytes a schedule's spec takes as JSON, and its workflow with matrices expanded: each
/// change carries the spec, each tick's run the workflow, and an event must fit a NATS message
/// (1 MiB by default) with room to spare.
pub const MAX_SPEC_BYTES: usize = 512 * 1024;

/// How late a tick may fire and still count as on time under `catch_up: none`.
pub const GRACE_SECS: i64 = 30;

/// A schedule as its owner wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Cron expression: 5 fields (minute precision), 6 (with seconds first) or 7 (and a year
    /// last), or a nickname (`@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@hourly`).
    pub cron: String,
    /// IANA time zone the expression is read in, e.g. `Europe/Paris`.
    #[serde(default = "ScheduleSpec::utc")]
    pub timezone: String,
    /// A stored workflow's name (`name` or `name@version`) or an inline definition.
    pub workflow: serde_json::Value,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default)]
    pub catch_up: CatchUp,
    /// With `catch_up: all`, the most missed ticks fired (the latest ones).
    #[serde(default = "ScheduleSpec::default_limit")]
    pub catch_up_limit: u32,
}

impl ScheduleSpec {
    fn utc() -> String {
        "UTC".into()
    }
    fn default_limit() -> u32 {
        100
    }

    fn cron(&self) -> Result<Cron, String> {
        let parser = CronParser::builder().seconds(Seconds::Optional).build();
        parser.parse(&self.cron).map_err(|e| format!("invalid cron expression '{}': {e}", self.cron))
    }

    fn tz(&self) -> Result<chrono_tz::Tz, String> {
        chrono_tz::Tz::from_str(&self.timezone).map_err(|_| format!("unknown time zone '{}'", self.timezone))
    }

    /// Checks the cron expression, the time zone and the limits.
    pub fn validate(&self) -> Result<(), Problem> {
        let mut errors = Vec::new();
        if let Err(e) = self.cron() {
            errors.push(FieldError { field: "cron".into(), message: e });
        }
        if let Err(e) = self.tz() {
            errors.push(FieldError { field: "timezone".into(), message: e });
        }
        if !(1..=10_000).contains(&self.catch_up_limit) {
            errors.push(FieldError { field: "catch_up_limit".into(), message: "must be 1 to 10000".into() });
        }
        let size = serde_json::to_vec(self).map_or(usize::MAX, |j| j.len());
        if size > MAX_SPEC_BYTES {
            errors.push(FieldError {
                field: "spec".into(),
                message: format!(
                    "{size} bytes as JSON; at most {MAX_SPEC_BYTES} (its inline workflow and inputs included)"
                ),
            });
        }
        if !(self.workflow.is_string() || self.workflow.is_object()) {
            errors.push(FieldError {
                field: "workflow".into(),
                message: "a stored workflow's name or a definition".into(),
            });
        }
        if errors.is_empty() {
            return Ok(());
        }
        let detail = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
        Err(Problem::new(ErrorCode::InvalidInput, detail).with_errors(errors))
    }

    /// The first tick strictly after `t` (ticks fall on whole seconds). Found as [`Self::ticks`]
    /// finds them, never before `t`: in the hour a time zone repeats, the expression's library
    /// reads a local time as its first instance, and answered one before `t` (so a schedule
    /// created then had a first tick before it, and caught up ticks from before it existed).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let from = t.trunc_subsecs(0) + chrono::Duration::seconds(1);
        self.ticks(from, DateTime::<Utc>::MAX_UTC, 1).into_iter().next()
    }

    /// Whether an expression ticks in both passes of an hour its time zone repeats: one with a
    /// wildcard (`*`, `*/15`) in its second, minute or hour field, as cron runs such jobs
    /// (Vixie cron's rule; `@hourly` is `0 * * * *`). One of fixed times (`30 2 * * *`,
    /// `0,30 2 * * *`) ticks in the first pass only.
    fn both_passes(cron: &Cron) -> bool {
        let p = &cron.pattern;
        p.seconds.from_wildcard || p.minutes.from_wildcard || p.hours.from_wildcard
    }

    /// The ticks from `from` (inclusive) to `until` (inclusive), at most `cap` of them. Ticks
    /// fall on whole seconds, so one within a second before `from` is not one; nor is one the
    /// expression's library finds before `from` (in the hour a time zone repeats when its clocks
    /// go back, it reads a local time as its first instance). An expression with a wildcard in
    /// a time field ticks in that hour's second pass too ([`Self::both_passes`]): each local
    /// time it matches there is taken at its second instance.
    pub fn ticks(&self, from: DateTime<Utc>, until: DateTime<Utc>, cap: usize) -> Vec<DateTime<Utc>> {
        use chrono::{Offset, TimeZone};
        let (Ok(cron), Ok(tz)) = (self.cron(), self.tz()) else { return Vec::new() };
        let both = Self::both_passes(&cron);
        let offset = |t: DateTime<Utc>| tz.offset_from_utc_datetime(&t.naive_utc()).fix().local_minus_utc();
        let from = match from.trunc_subsecs(0) {
            whole if whole < from => whole + chrono::Duration::seconds(1),
            whole => whole,
        };
        let mut out: Vec<DateTime<Utc>> = Vec::new();
        // A tick at `from` that the library finds only walking into it: where clocks jump to,
        // for an expression of one time of day that the jump skips (`30 2 * * *` at 03:00).
        // Looked for from a second before, lest the timer of that tick find nothing due.
        if cap > 0
            && from <= until
            && let Ok(t) = cron.find_next_occurrence(&(from - chrono::Duration::seconds(1)).with_timezone(&tz), false)
            && t.with_timezone(&Utc) == from
        {
            out.push(from);
        }
        let mut at = from.with_timezone(&tz);
        // (Found there, `from` is taken: the walk goes on after it.)
        let mut inclusive = out.is_empty();
        // The repeated hour whose second pass was walked already (see below), if any.
        let mut walked: Option<DateTime<Utc>> = None;
        // Bounded whatever the library answers: each step moves on, and those before `from`
        // are of an hour a time zone repeats (two at most, as Antarctica/Troll does), every
        // second at most, walked once in each pass.
        for _ in 0..cap.saturating_add(4 * 3600 + 2) {
            if out.len() >= cap {
                break;
            }
            let Ok(t) = cron.find_next_occurrence(&at, inclusive) else { break };
            let found = t.with_timezone(&Utc).trunc_subsecs(0);
            let last = out.last().copied();
            if found < from || last.is_some_and(|l| found <= l) {
                // A local time of a repeated hour, read as its first instance: in its second
                // pass, for an expression that ticks there, its second instance is the tick.
                if both
                    && let Some(late) = tz.from_local_datetime(&t.naive_local()).latest()
                    && let late = late.with_timezone(&Utc).trunc_subsecs(0)
                    && late >= from
                    && last.is_none_or(|l| late > l)
                {
                    if late > until {
                        break;
                    }
                    out.push(late);
                }
                at = t;
                inclusive = false;
                continue;
            }
            // Past a repeated hour (the offset went down between where the walk was and this
            // tick) whose second pass it has not walked: walk it first, from its start. Only
            // within a day of where the walk was: a local time the expression matches in the
            // second pass it matched in the first, so the walk was within the repeat of it (and
            // a year-long gap between ticks may hold other changes of offset).
            let was = last.unwrap_or(from).max(at.with_timezone(&Utc));
            let near = found.min(was + chrono::Duration::days(1));
            if both && offset(was) > offset(near) {
                let (mut lo, mut hi) = (was, near);
                while hi - lo > chrono::Duration::seconds(1) {
                    let mid = lo + (hi - lo) / 2;
                    if offset(mid) == offset(was) { lo = mid } else { hi = mid }
                }
                if hi > from && walked != Some(hi) {
                    walked = Some(hi);
                    at = hi.with_timezone(&tz);
                    inclusive = true;
                    continue;
                }
            }
            if found > until {
                break;
            }
            out.push(found);
            at = t;
            inclusive = false;
        }
        out
    }

    /// Of the ticks due at `now` (the earliest being `first`), the ones to fire by the catch-up
    /// policy, oldest first; and the last due tick, which the schedule moves past either way.
    pub fn due(&self, first: DateTime<Utc>, now: DateTime<Utc>) -> (Vec<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let cap = (self.catch_up_limit as usize).max(1);
        // Bounded: a long outage of an every-second schedule is not walked tick by tick beyond
        // what could be fired.
        let walk = cap.saturating_mul(4).max(4096);
        let mut due = self.ticks(first, now, walk);
        if due.len() == walk {
            // The walk stopped short of `now`: the latest ticks are later. Walked again back
            // from `now`, over a span that holds at most `walk` ticks (a second apart at the
            // least), doubled until it holds `cap` of them or reaches back to `first`.
            let back = |span: i64| self.ticks(first.max(now - chrono::Duration::seconds(span)), now, walk);
            let mut span = walk as i64 - 1;
            // A span holding too few ticks.
            let mut short = 0;
            loop {
                let latest = back(span);
                if latest.len() == walk {
                    // Stopped short of `now` again (the ticks between the last span and this
                    // were dense): narrowed between the two. The count changes by one a second
                    // at most, so a span holding `cap` to `walk` ticks lies between them.
                    let mut long = span;
                    let mut found = None;
                    while long - short > 1 {
                        let mid = short + (long - short) / 2;
                        let ticks = back(mid);
                        if ticks.len() == walk {
                            long = mid;
                        } else if ticks.len() < cap {
                            short = mid;
                        } else {
                            found = Some(ticks);
                            break;
                        }
                    }
                    due = found.unwrap_or_else(|| back(short));
                    break;
                }
                if latest.len() >= cap || first >= now - chrono::Duration::seconds(span) {
                    due = latest;
                    break;
                }
                short = span;
                span *= 2;
            }
        }
        let last = due.last().copied();
        let fire = match self.catch_up {
            CatchUp::All => {
                let skip = due.len().saturating_sub(cap);
                due.drain(..skip);
                due
            }
            CatchUp::Last => last.into_iter().collect(),
            CatchUp::None => last.filter(|t| (now - *t).num_seconds() <= GRACE_SECS).into_iter().collect(),
        };
        (fire, last)
    }
}

/// A schedule as its events leave it: what the scheduler's timers and ingest's commands both
/// decide on, folded one way so that the two read one log alike.
#[derive(Debug, Clone)]
pub struct ScheduleState {
    /// Its spec as last changed (shared: a copy of the state does not copy the spec).
    pub spec: std::sync::Arc<ScheduleSpec>,
    /// Its spec when the last tick was handled: what that tick's run is submitted with,
    /// should it be missing (a `PATCH` since changes the ticks after it, not it).
    pub tick_spec: std::sync::Arc<ScheduleSpec>,
    pub paused: bool,
    /// The last tick handled (its run started, or it was skipped).
    pub last_tick: Option<DateTime<Utc>>,
    /// When the last tick was handled (its record's time: a tick caught up is handled late).
    pub last_tick_at: Option<DateTime<Utc>>,
    /// Whether the last tick handled has a run (rather than being skipped).
    pub last_tick_ran: bool,
    /// The last run a tick started.
    pub last_run: Option<uuid::Uuid>,
    /// The last run started by hand since the last tick's run.
    pub last_manual: Option<uuid::Uuid>,
    /// The stream sequence of the last run by hand's record (0: none).
    pub last_manual_seq: u64,
    /// `last_run` and `last_manual` before the last tick's run: what they are again should
    /// ingest refuse that run (`ScheduleRunRefused`).
    pub before_last_run: (Option<uuid::Uuid>, Option<uuid::Uuid>),
    /// Where its ticks start: the expression's first tick after the schedule was created,
    /// resumed or given another expression or time zone (the moment it was, where none comes).
    /// The ticks before it are not its timers' to fire: a pause's, or the old expression's.
    pub ticks_from: Option<DateTime<Utc>>,
    /// The stream sequence of the last event folded.
    pub last_seq: u64,
    /// Its ticks recorded so far: the last tick's `count`, or, for ticks recorded without
    /// one, those folded.
    pub ticks: u64,
}

impl ScheduleState {
    /// A schedule as created with `spec`, its ticks starting at `ticks_from`, folded up to
    /// `last_seq`: nothing handled, run or paused yet.
    pub fn new(spec: ScheduleSpec, ticks_from: Option<DateTime<Utc>>, last_seq: u64) -> Self {
        let spec = std::sync::Arc::new(spec);
        ScheduleState {
            tick_spec: spec.clone(),
            spec,
            paused: false,
            last_tick: None,
            last_tick_at: None,
            last_tick_ran: false,
            last_run: None,
            last_manual: None,
            last_manual_seq: 0,
            before_last_run: (None, None),
            ticks_from,
            last_seq,
            ticks: 0,
        }
    }

    /// Folds `events` (sequence and envelope; those after `state`'s `last_seq`, or all of them
    /// when `state` is `None`) onto `state`. `None`: no such schedule (never created, or deleted).
    pub fn fold<'a>(
        state: Option<ScheduleState>,
        events: impl IntoIterator<Item = (u64, &'a crate::Envelope)>,
    ) -> Option<ScheduleState> {
        let mut events = events.into_iter();
        let mut state = match state {
            Some(state) => state,
            None => {
                let (seq, first) = events.next()?;
                let crate::Event::ScheduleCreated(created) = &first.event else { return None };
                ScheduleState::new(created.spec.clone(), created.first_tick.or(Some(first.occurred_at)), seq)
            }
        };
        for (seq, e) in events {
            state.last_seq = seq;
            match &e.event {
                // A deleted schedule is no schedule: its timers are dropped.
                crate::Event::ScheduleDeleted(_) => return None,
                crate::Event::SchedulePaused(_) => state.paused = true,
                crate::Event::ScheduleResumed(r) => {
                    // The ticks of the pause are not caught up, whenever a timer comes.
                    state.paused = false;
                    state.ticks_from = r.next_tick.or(Some(e.occurred_at));
                }
                crate::Event::ScheduleTicked(t) => {
                    state.ticks = t.count.unwrap_or(state.ticks + 1);
                    state.last_tick = Some(t.tick);
                    state.last_tick_at = Some(e.occurred_at);
                    state.last_tick_ran = t.run_id.is_some();
                    state.tick_spec = state.spec.clone();
                    if t.run_id.is_some() {
                        state.before_last_run = (state.last_run, state.last_manual);
                        state.last_run = t.run_id;
                        // Its overlap policy looked at the run by hand: ended, or now asked to
                        // cancel (or alongside, as allowed); the tick's run is the previous one.
                        state.last_manual = None;
                    }
                }
                crate::Event::ScheduleTriggered(t) => {
                    (state.last_manual, state.last_manual_seq) = (Some(t.run_id), seq)
                }
                // The last tick's run never existed: the tick is passed over, and the runs a
                // tick's overlap policy looks at are those before it again.
                crate::Event::ScheduleRunRefused(r)
                    if state.last_tick == Some(r.tick) && state.last_run == Some(r.run_id) =>
                {
                    state.last_tick_ran = false;
                    // A run by hand recorded since the tick is newer than any before it.
                    state.last_run = state.before_last_run.0;
                    state.last_manual = state.last_manual.or(state.before_last_run.1);
                }
                crate::Event::ScheduleUpdated(u) => {
                    // Another expression or time zone ticks from its first tick after the
                    // change; other changes keep the ticks as they were, due ones included.
                    if (&u.spec.cron, &u.spec.timezone) != (&state.spec.cron, &state.spec.timezone) {
                        state.ticks_from = u.next_tick.or(Some(e.occurred_at));
                    }
                    state.spec = std::sync::Arc::new(u.spec.clone());
                }
                _ => {}
            }
        }
        Some(state)
    }

    /// Unless paused, the first tick whose run is its timers' to start (or catch up, or record
    /// skipped): the last one handled if it has a run (the next timer starts it, should a
    /// crash have come between), else the one after; never before where ticks start. A backfill
    /// ends before it, so that no run of a timer's tick is a backfill's.
    pub fn timers_from(&self) -> Option<DateTime<Utc>> {
        if self.paused {
            return None;
        }
        let handled = self.last_tick.map(|t| if self.last_tick_ran { t } else { t + chrono::Duration::seconds(1) });
        self.ticks_from.max(handled)
    }

    /// Where a timer for `tick` looks for due ticks from: its own tick, or after the last tick
    /// handled if that was this one or later (a duplicate); never before where ticks start.
    pub fn first_due(&self, tick: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let from = match self.last_tick {
            Some(last) if last >= tick => self.spec.next_after(last),
            _ => Some(tick),
        };
        match (from, self.ticks_from) {
            (Some(f), Some(first)) => Some(f.max(first)),
            (from, _) => from,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn spec(cron: &str, tz: &str, catch_up: CatchUp) -> ScheduleSpec {
        ScheduleSpec {
            cron: cron.into(),
            timezone: tz.into(),
            workflow: serde_json::json!("w"),
            inputs: Default::default(),
            overlap: Overlap::Skip,
            catch_up,
            catch_up_limit: 3,
        }
    }

    #[test]
    fn next_ticks_honour_seconds_and_time_zones() {
        let s = spec("*/10 * * * * *", "UTC", CatchUp::All);
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 5).unwrap() + chrono::Duration::milliseconds(587);
        assert_eq!(s.next_after(t), Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 10).unwrap()), "on whole seconds");
        // 09:00 in Paris is 08:00 UTC in winter.
        let paris = spec("0 9 * * *", "Europe/Paris", CatchUp::None);
        assert_eq!(paris.next_after(t), Some(Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap()));
        assert!(spec("61 * * * *", "UTC", CatchUp::None).validate().is_err());
        // Nicknames and a year, as api.md has them.
        for cron in ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly", "0 30 2 * * * 2027"] {
            assert!(spec(cron, "UTC", CatchUp::None).validate().is_ok(), "{cron}");
        }
        let in_2027 = spec("0 30 2 * * * 2027", "UTC", CatchUp::None);
        assert_eq!(in_2027.next_after(t), Some(Utc.with_ymd_and_hms(2027, 1, 1, 2, 30, 0).unwrap()));
        let p = spec("* * * * *", "Mars/Olympus", CatchUp::None).validate().unwrap_err();
        assert_eq!(p.errors[0].field, "timezone");
        // Bounded: patches that each fit a request cannot grow a spec past what an event holds.
        let mut big = spec("* * * * *", "UTC", CatchUp::None);
        big.inputs.insert("a".into(), serde_json::json!("x".repeat(MAX_SPEC_BYTES / 2)));
        assert!(big.validate().is_ok());
        big.inputs.insert("b".into(), serde_json::json!("x".repeat(MAX_SPEC_BYTES / 2)));
        assert_eq!(big.validate().unwrap_err().errors[0].field, "spec");
    }

    #[test]
    fn ticks_in_a_range_start_at_its_start_on_whole_seconds_and_through_a_repeated_hour() {
        let s = spec("*/10 * * * * *", "UTC", CatchUp::All);
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 10).unwrap();
        let ticks = s.ticks(t + chrono::Duration::milliseconds(500), t + chrono::Duration::seconds(30), 10);
        assert_eq!(
            ticks,
            [t + chrono::Duration::seconds(10), t + chrono::Duration::seconds(20), t + chrono::Duration::seconds(30)]
        );
        assert_eq!(s.ticks(t, t, 10), [t], "inclusive");
        // Paris goes back from 03:00 CEST to 02:00 CET on 25 October 2026 (01:00 UTC): a range
        // in the second pass of 02:xx yields nothing from before it, and its ticks there.
        let paris = spec("*/15 * * * *", "Europe/Paris", CatchUp::All);
        let from = Utc.with_ymd_and_hms(2026, 10, 25, 1, 10, 0).unwrap();
        let until = Utc.with_ymd_and_hms(2026, 10, 25, 2, 20, 0).unwrap();
        let ticks = paris.ticks(from, until, 100);
        assert!(ticks.iter().all(|t| *t >= from && *t <= until), "{ticks:?}");
        assert!(ticks.contains(&Utc.with_ymd_and_hms(2026, 10, 25, 2, 15, 0).unwrap()), "{ticks:?}");
    }

    #[test]
    fn in_an_hour_a_time_zone_repeats_wildcard_hours_tick_in_both_passes_and_fixed_ones_once() {
        // Paris goes back from 03:00 CEST to 02:00 CET on 25 October 2026 at 01:00 UTC: 00:00
        // to 01:00 UTC is 02:xx CEST, 01:00 to 02:00 UTC is 02:xx CET.
        let utc = |h, m| Utc.with_ymd_and_hms(2026, 10, 25, h, m, 0).unwrap();
        let quarterly = spec("*/15 * * * *", "Europe/Paris", CatchUp::None);
        assert_eq!(quarterly.next_after(utc(0, 40)), Some(utc(0, 45)), "in the first pass");
        // From the first pass into the second, through it, and on: every quarter of an hour of
        // real time. (The library alone answered 00:15 UTC for 01:10 UTC, the past.)
        assert_eq!(quarterly.next_after(utc(0, 50)), Some(utc(1, 0)));
        assert_eq!(quarterly.next_after(utc(1, 10)), Some(utc(1, 15)));
        assert_eq!(quarterly.next_after(utc(1, 59)), Some(utc(2, 0)));
        let every_quarter: Vec<_> = (0..=9).map(|q| utc(0, 0) + chrono::Duration::minutes(15 * q)).collect();
        assert_eq!(quarterly.ticks(utc(0, 0), utc(2, 15), 100), every_quarter);
        assert_eq!(quarterly.ticks(utc(1, 5), utc(1, 50), 100), [utc(1, 15), utc(1, 30), utc(1, 45)], "from within");
        assert_eq!(quarterly.ticks(utc(0, 50), utc(1, 20), 100), [utc(1, 0), utc(1, 15)], "into it, up to a bound");
        // Every two hours: 02:00 comes twice, an hour apart.
        let two_hourly = spec("0 */2 * * *", "Europe/Paris", CatchUp::None);
        assert_eq!(two_hourly.ticks(utc(0, 0), utc(3, 0), 10), [utc(0, 0), utc(1, 0), utc(3, 0)]);
        // An expression of fixed times ticks once, in the first pass; a wildcard minute is
        // enough to tick in both.
        let fixed = spec("30 2 * * *", "Europe/Paris", CatchUp::None);
        assert_eq!(fixed.ticks(utc(0, 0), utc(23, 0), 10), [utc(0, 30)]);
        let two_times = spec("0,30 2 * * *", "Europe/Paris", CatchUp::None);
        assert_eq!(two_times.ticks(utc(0, 0), utc(23, 0), 10), [utc(0, 0), utc(0, 30)]);
        let in_the_hour = spec("*/30 2 * * *", "Europe/Paris", CatchUp::None);
        assert_eq!(in_the_hour.ticks(utc(0, 0), utc(23, 0), 10), [utc(0, 0), utc(0, 30), utc(1, 0), utc(1, 30)]);
        let hourly = spec("@hourly", "Europe/Paris", CatchUp::None);
        assert_eq!(hourly.ticks(utc(0, 0), utc(2, 0), 10), [utc(0, 0), utc(1, 0), utc(2, 0)]);
        assert_eq!(
            fixed.next_after(utc(0, 40)).map(|t| t.date_naive()),
            Some(utc(0, 0).date_naive().succ_opt().unwrap())
        );
        // Every second, through a pass and a half, within the walk's bound.
        let every = spec("* * * * * *", "Europe/Paris", CatchUp::None);
        assert_eq!(every.next_after(utc(1, 10)), Some(utc(1, 10) + chrono::Duration::seconds(1)));
        let seconds = every.ticks(utc(0, 30), utc(2, 30), 10_000);
        assert_eq!(seconds.len(), 2 * 3600 + 1);
        assert!(seconds.windows(2).all(|w| (w[1] - w[0]).num_seconds() == 1));
        // Troll repeats two hours (01:00 UTC on 25 October 2026: +02 to +00).
        let troll = spec("* * * * * *", "Antarctica/Troll", CatchUp::None);
        assert_eq!(troll.next_after(utc(1, 30)), Some(utc(1, 30) + chrono::Duration::seconds(1)));
        // Santiago goes back at local midnight on 5 April 2026 (03:00 UTC): 23:00 on the 4th
        // comes twice. An expression of that day only, whose next tick is a year away: its
        // second 23:00 is found, not a change of offset months later.
        let santiago = spec("0 * 4 4 *", "America/Santiago", CatchUp::None);
        let april = |d, h| Utc.with_ymd_and_hms(2026, 4, d, h, 0, 0).unwrap();
        let day: Vec<_> = santiago.ticks(april(4, 0), april(10, 0), 100);
        assert_eq!(day.len(), 25, "{day:?}");
        assert_eq!(day[23..], [april(5, 2), april(5, 3)]);
        let troll_hourly = spec("0 * * * *", "Antarctica/Troll", CatchUp::None);
        let hours: Vec<_> = (0..=4).map(|h| utc(h, 0)).collect();
        assert_eq!(
            troll_hourly.ticks(utc(0, 0), utc(4, 0), 10),
            hours,
            "local 02:00 +02, then 01:00, 02:00, 03:00 and 04:00 +00"
        );
    }

    #[test]
    fn when_clocks_go_forward_a_fixed_hour_ticks_at_the_jump_and_wildcard_hours_skip_it() {
        // Paris goes forward from 02:00 CET to 03:00 CEST on 29 March 2026 at 01:00 UTC.
        let utc = |h, m| Utc.with_ymd_and_hms(2026, 3, 29, h, m, 0).unwrap();
        let ticks = |cron: &str| spec(cron, "Europe/Paris", CatchUp::None).ticks(utc(0, 0), utc(2, 0), 20);
        assert_eq!(ticks("30 2 * * *"), [utc(1, 0)], "02:30 does not exist: 03:00 CEST");
        // Its timer looks for due ticks from that tick, and finds it; so does the day before's.
        let fixed = spec("30 2 * * *", "Europe/Paris", CatchUp::None);
        assert_eq!(fixed.ticks(utc(1, 0), utc(1, 0), 5), [utc(1, 0)]);
        assert_eq!(fixed.due(utc(1, 0), utc(1, 0)), (vec![utc(1, 0)], Some(utc(1, 0))));
        assert_eq!(fixed.next_after(utc(0, 59) + chrono::Duration::seconds(59)), Some(utc(1, 0)));
        assert_eq!(
            ticks("0,30 2 * * *"),
            Vec::<DateTime<Utc>>::new(),
            "fixed times, but more than one: skipped (the library's rule)"
        );
        let quarters: Vec<_> = (0..=8).map(|q| utc(0, 0) + chrono::Duration::minutes(15 * q)).collect();
        assert_eq!(ticks("*/15 * * * *"), quarters, "01:xx CET, then 03:00 CEST on");
        assert_eq!(ticks("0 */2 * * *"), [utc(2, 0)], "02:00 does not exist; 04:00 CEST");
    }

    #[test]
    fn catch_up_policies_pick_missed_ticks() {
        let first = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let now = first + chrono::Duration::seconds(5);
        let (all, last) = spec("* * * * * *", "UTC", CatchUp::All).due(first, now);
        assert_eq!(all.len(), 3, "the latest catch_up_limit ticks");
        assert_eq!(all[2], now);
        assert_eq!(last, Some(now));
        let (one, _) = spec("* * * * * *", "UTC", CatchUp::Last).due(first, now);
        assert_eq!(one, vec![now]);
        let (on_time, _) = spec("* * * * * *", "UTC", CatchUp::None).due(first, now);
        assert_eq!(on_time, vec![now], "a tick a few seconds late still fires");
        let late = now + chrono::Duration::seconds(600);
        let (none, _) = spec("0 0 * * *", "UTC", CatchUp::None).due(first, late);
        assert!(none.is_empty(), "a tick ten minutes late is missed");
        // Three days missed, more ticks than one walk takes: still the latest ones.
        let days = first + chrono::Duration::days(3) + chrono::Duration::seconds(30);
        let newest = first + chrono::Duration::days(3);
        let (one, last) = spec("* * * * *", "UTC", CatchUp::Last).due(first, days);
        assert_eq!((one, last), (vec![newest], Some(newest)), "the latest tick, not the 4096th");
        let (all, last) = spec("* * * * *", "UTC", CatchUp::All).due(first, days);
        let latest: Vec<_> = (0..3).rev().map(|m| newest - chrono::Duration::minutes(m)).collect();
        assert_eq!((all, last), (latest, Some(newest)), "the latest catch_up_limit ticks");
        let (each_second, _) = spec("* * * * * *", "UTC", CatchUp::Last).due(first, days);
        assert_eq!(each_second, vec![days]);
        // Sparse, then dense: every second of two hours a day, late in the day.
        let dense = spec("* * 8,9 * * *", "UTC", CatchUp::Last);
        // (At 14:40, the spans walked back hold no tick up to 4.5 hours, then 7,200.)
        let afternoon = first + chrono::Duration::days(3) + chrono::Duration::minutes(14 * 60 + 40);
        let (one, last) = dense.due(first, afternoon);
        let ten = first + chrono::Duration::days(3) + chrono::Duration::hours(10) - chrono::Duration::seconds(1);
        assert_eq!((one, last), (vec![ten], Some(ten)), "the day's last tick, 09:59:59");
    }

    /// Folds `events`, numbered from 1, each happening at the time given.
    fn fold_at(events: Vec<(DateTime<Utc>, crate::Event)>) -> Option<ScheduleState> {
        let envelopes: Vec<crate::Envelope> = events
            .into_iter()
            .map(|(at, event)| {
                let mut e = crate::EventMeta::new("acme").envelope("tm.evt.acme.schedule.x", event);
                e.occurred_at = at;
                e
            })
            .collect();
        ScheduleState::fold(None, envelopes.iter().enumerate().map(|(i, e)| (i as u64 + 1, e)))
    }

    #[test]
    fn a_resumed_schedule_ticks_from_its_next_tick_and_a_backfill_ends_before_its_timers_ticks() {
        use crate::{Event, ScheduleCreated, ScheduleTicked, ScheduleToggled, ScheduleUpdated};
        let id = uuid::Uuid::now_v7();
        let noon = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let min = |m: i64| noon + chrono::Duration::minutes(m);
        let every_minute = spec("* * * * *", "UTC", CatchUp::All);
        let created = (
            min(0),
            Event::ScheduleCreated(ScheduleCreated { schedule_id: id, spec: every_minute, first_tick: Some(min(1)) }),
        );
        let ticked = |m, ran: bool| {
            let (run_id, skipped) =
                if ran { (Some(uuid::Uuid::now_v7()), None) } else { (None, Some("running".into())) };
            (
                min(m),
                Event::ScheduleTicked(ScheduleTicked { schedule_id: id, tick: min(m), run_id, skipped, count: None }),
            )
        };
        let toggled = |next_tick| ScheduleToggled { schedule_id: id, next_tick };

        // Created: from its first tick.
        let state = fold_at(vec![created.clone()]).unwrap();
        assert_eq!((state.timers_from(), state.first_due(min(1))), (Some(min(1)), Some(min(1))));
        // A tick that ran is still its timers' (a duplicate starts its run); one skipped is not.
        let state = fold_at(vec![created.clone(), ticked(1, true)]).unwrap();
        assert_eq!(state.timers_from(), Some(min(1)));
        let state = fold_at(vec![created.clone(), ticked(1, true), ticked(2, false)]).unwrap();
        assert_eq!(state.timers_from(), Some(min(2) + chrono::Duration::seconds(1)));

        // Paused at 12:02:30 and resumed at 12:10:30: a timer of 12:02 coming after the resume
        // (no scheduler ran meanwhile) catches up nothing of the pause; its timers own the
        // ticks from 12:11, a backfill the ones before.
        let paused = (min(2) + chrono::Duration::seconds(30), Event::SchedulePaused(toggled(None)));
        let resumed = (min(10) + chrono::Duration::seconds(30), Event::ScheduleResumed(toggled(Some(min(11)))));
        let state = fold_at(vec![created.clone(), ticked(1, true), paused.clone()]).unwrap();
        assert_eq!(state.timers_from(), None, "paused: a backfill may run any tick");
        let state = fold_at(vec![created.clone(), ticked(1, true), paused.clone(), resumed.clone()]).unwrap();
        assert_eq!(state.first_due(min(2)), Some(min(11)));
        assert_eq!(state.timers_from(), Some(min(11)));
        let (fire, last) = state.spec.due(state.first_due(min(2)).unwrap(), min(11));
        assert_eq!((fire, last), (vec![min(11)], Some(min(11))));
        // Resumed with an expression that never fires again: from the resume.
        let never = (resumed.0, Event::ScheduleResumed(toggled(None)));
        let state = fold_at(vec![created.clone(), paused.clone(), never]).unwrap();
        assert_eq!(state.timers_from(), Some(resumed.0));

        // Given another expression: from its first tick after the change, even one that never
        // fires again (from the change), not from the old expression's last tick.
        let hourly = spec("0 * * * *", "UTC", CatchUp::All);
        let changed = |next_tick| {
            (min(5), Event::ScheduleUpdated(ScheduleUpdated { schedule_id: id, spec: hourly.clone(), next_tick }))
        };
        let state = fold_at(vec![created.clone(), ticked(1, true), changed(Some(min(60)))]).unwrap();
        assert_eq!((state.timers_from(), state.first_due(min(2))), (Some(min(60)), Some(min(60))));
        let state = fold_at(vec![created.clone(), ticked(1, true), changed(None)]).unwrap();
        assert_eq!(state.timers_from(), Some(min(5)));
        // Other changes keep the ticks where they were.
        let mut inputs = spec("* * * * *", "UTC", CatchUp::All);
        inputs.inputs.insert("a".into(), serde_json::json!(1));
        let other = (
            min(1) + chrono::Duration::seconds(30),
            Event::ScheduleUpdated(ScheduleUpdated { schedule_id: id, spec: inputs, next_tick: Some(min(2)) }),
        );
        let state = fold_at(vec![created.clone(), ticked(1, true), other]).unwrap();
        assert_eq!((state.timers_from(), state.first_due(min(2))), (Some(min(1)), Some(min(2))));
        assert_eq!(state.spec.inputs["a"], 1);
    }

    #[test]
    fn a_refused_run_passes_its_tick_over_and_gives_back_the_runs_before_it() {
        use crate::{Event, ScheduleCreated, ScheduleRunRefused, ScheduleTicked, ScheduleTriggered};
        let id = uuid::Uuid::now_v7();
        let noon = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let min = |m: i64| noon + chrono::Duration::minutes(m);
        let every_minute = spec("* * * * *", "UTC", CatchUp::All);
        let (before, by_hand, refused) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let ticked = |m, run| {
            Event::ScheduleTicked(ScheduleTicked {
                schedule_id: id,
                tick: min(m),
                run_id: Some(run),
                skipped: None,
                count: None,
            })
        };
        let refusal = |m, run_id| {
            Event::ScheduleRunRefused(ScheduleRunRefused { schedule_id: id, tick: min(m), run_id, reason: "no".into() })
        };
        let events = |tail: Vec<Event>| {
            let mut all = vec![
                (
                    min(0),
                    Event::ScheduleCreated(ScheduleCreated {
                        schedule_id: id,
                        spec: every_minute.clone(),
                        first_tick: Some(min(1)),
                    }),
                ),
                (min(1), ticked(1, before)),
                (min(1), Event::ScheduleTriggered(ScheduleTriggered { schedule_id: id, run_id: by_hand })),
                (min(2), ticked(2, refused)),
            ];
            all.extend(tail.into_iter().map(|e| (min(2), e)));
            fold_at(all).unwrap()
        };
        let state = events(vec![]);
        assert!(state.last_tick_ran);
        assert_eq!((state.last_run, state.last_manual, state.timers_from()), (Some(refused), None, Some(min(2))));
        let state = events(vec![refusal(2, refused)]);
        assert!(!state.last_tick_ran, "not submitted again by a later timer");
        assert_eq!((state.last_run, state.last_manual), (Some(before), Some(by_hand)), "the runs before it");
        assert_eq!(state.timers_from(), Some(min(2) + chrono::Duration::seconds(1)), "a backfill may run it");
        // A run by hand recorded between the tick and its refusal stays the last one by hand.
        let newer = uuid::Uuid::now_v7();
        let trigger = Event::ScheduleTriggered(ScheduleTriggered { schedule_id: id, run_id: newer });
        let state = events(vec![trigger, refusal(2, refused)]);
        assert_eq!((state.last_run, state.last_manual), (Some(before), Some(newer)));
        // A refusal of another tick's run (a later tick handled since) changes nothing.
        let state = events(vec![ticked(3, uuid::Uuid::now_v7()), refusal(2, refused)]);
        assert!(state.last_tick_ran);
        assert_eq!(state.last_tick, Some(min(3)));
    }

    #[test]
    fn ticks_in_a_range_come_whole_after_a_two_hour_repeat() {
        // Antarctica/Troll goes from UTC+2 back to UTC+0 at 03:00 local on the last Sunday of
        // October (01:00 UTC): local 01:00 to 03:00 comes twice. A range starting in the second
        // pass has its ticks there, every second from its start, and on past it.
        let s = spec("* * * * * *", "Antarctica/Troll", CatchUp::All);
        let from = Utc.with_ymd_and_hms(2026, 10, 25, 1, 0, 0).unwrap();
        let after = Utc.with_ymd_and_hms(2026, 10, 25, 3, 0, 0).unwrap();
        let ticks = s.ticks(from, after + chrono::Duration::seconds(99), 100);
        assert_eq!(ticks.len(), 100, "the range's ticks, not cut short by the walk");
        assert!(ticks.windows(2).all(|w| (w[1] - w[0]).num_seconds() == 1), "{:?}", &ticks[..3]);
        assert_eq!(ticks[0], from);
        let all = s.ticks(from, after + chrono::Duration::seconds(99), 10_000);
        assert_eq!((all.len(), all.last().copied()), (2 * 3600 + 100, Some(after + chrono::Duration::seconds(99))));
    }

    #[test]
    fn a_schedules_tick_count_is_its_last_ticks_count_or_its_ticks_counted() {
        use crate::{Event, ScheduleCreated, ScheduleTicked};
        let id = uuid::Uuid::now_v7();
        let noon = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let min = |m: i64| noon + chrono::Duration::minutes(m);
        let created = (
            min(0),
            Event::ScheduleCreated(ScheduleCreated {
                schedule_id: id,
                spec: spec("* * * * *", "UTC", CatchUp::All),
                first_tick: Some(min(1)),
            }),
        );
        let ticked = |m, count| {
            let t = ScheduleTicked { schedule_id: id, tick: min(m), run_id: None, skipped: Some("x".into()), count };
            (min(m), Event::ScheduleTicked(t))
        };
        // Recorded before ticks carried a count: counted.
        assert_eq!(fold_at(vec![created.clone(), ticked(1, None), ticked(2, None)]).unwrap().ticks, 2);
        // The ticks before these two were removed from the log: their count says how many.
        let kept = fold_at(vec![created.clone(), ticked(41, Some(41)), ticked(42, Some(42))]).unwrap();
        assert_eq!(kept.ticks, 42);
        // Counted on from the last count.
        assert_eq!(fold_at(vec![created, ticked(41, Some(41)), ticked(42, None)]).unwrap().ticks, 42);
    }
}
