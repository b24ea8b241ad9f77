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
    /// Cron expression, 5 fields (minute precision) or 6 (with seconds first).
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

    /// The first tick strictly after `t` (ticks fall on whole seconds).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let (cron, tz) = (self.cron().ok()?, self.tz().ok()?);
        let t = t.trunc_subsecs(0);
        cron.find_next_occurrence(&t.with_timezone(&tz), false).ok().map(|d| d.with_timezone(&Utc).trunc_subsecs(0))
    }

    /// The ticks from `from` (inclusive) to `until` (inclusive), at most `cap` of them. Ticks
    /// fall on whole seconds, so one within a second before `from` is not one; nor is one the
    /// expression's library finds before `from` (in the hour a time zone repeats when its clocks
    /// go back, it reads a local time as its first instance).
    pub fn ticks(&self, from: DateTime<Utc>, until: DateTime<Utc>, cap: usize) -> Vec<DateTime<Utc>> {
        let (Ok(cron), Ok(tz)) = (self.cron(), self.tz()) else { return Vec::new() };
        let from = match from.trunc_subsecs(0) {
            whole if whole < from => whole + chrono::Duration::seconds(1),
            whole => whole,
        };
        let mut out = Vec::new();
        let mut at = from.with_timezone(&tz);
        let mut inclusive = true;
        // Bounded whatever the library answers: each step moves on, and those before `from`
        // are an hour's worth at most.
        for _ in 0..cap.saturating_add(4096) {
            if out.len() >= cap {
                break;
            }
            match cron.find_next_occurrence(&at, inclusive) {
                Ok(t) if t.with_timezone(&Utc) <= until => {
                    let tick = t.with_timezone(&Utc).trunc_subsecs(0);
                    if tick >= from {
                        out.push(tick);
                    }
                    at = t;
                    inclusive = false;
                }
                _ => break,
            }
        }
        out
    }

    /// Of the ticks due at `now` (the earliest being `first`), the ones to fire by the catch-up
    /// policy, oldest first; and the last due tick, which the schedule moves past either way.
    pub fn due(&self, first: DateTime<Utc>, now: DateTime<Utc>) -> (Vec<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let cap = (self.catch_up_limit as usize).max(1);
        // Bounded: a long outage of an every-second schedule is not walked tick by tick beyond
        // what could be fired.
        let mut due = self.ticks(first, now, cap.saturating_mul(4).max(4096));
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
        // in the second pass of 02:xx yields nothing from before it.
        let paris = spec("*/15 * * * *", "Europe/Paris", CatchUp::All);
        let from = Utc.with_ymd_and_hms(2026, 10, 25, 1, 10, 0).unwrap();
        let until = Utc.with_ymd_and_hms(2026, 10, 25, 2, 20, 0).unwrap();
        let ticks = paris.ticks(from, until, 100);
        assert!(ticks.iter().all(|t| *t >= from && *t <= until), "{ticks:?}");
        assert!(ticks.contains(&Utc.with_ymd_and_hms(2026, 10, 25, 2, 15, 0).unwrap()), "{ticks:?}");
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
    }
}
