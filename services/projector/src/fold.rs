//! A batch's run events → the `runs`, `steps` and `step_attempts` rows, folded in memory: every
//! row the batch touches is read once, changed by each event in log order exactly as the
//! event's own statement would change it, and written once (one statement per table for new
//! rows, one for changed ones).
//!
//! Rows are read whole by run (the run's row, all its steps, all their attempts), and only for
//! runs the [`RowCache`] does not hold and the batch does not submit under a fresh id: the
//! projector keeps the rows of the runs its batches left running, and a run submitted in the
//! batch without an idempotency key has none in the tables yet, so such a run costs writes and
//! no reads.
//!
//! A one-step run is eight row writes when its events come one per batch (its run row
//! inserted, started and ended; its step inserted, started and finished; its attempt inserted
//! and finished), and each is a new row version with its index entries. When the projector
//! falls behind, a batch holds whole lifetimes, and the same run costs three rows written
//! once each: the read side catches up faster the further behind it is, instead of paying
//! per event.
//!
//! The rules each event follows are the statements this module replaced; they are written
//! out on [`RunRows::apply`]. `tests/e2e/projection.rs` checks that one log applied one event at
//! a time, all at once, and in batches of many sizes leaves the same rows.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, Row};
use taskmesh_bus::Stored;
use taskmesh_events::{Event, Status, StepOutcome};
use taskmesh_store::{Alongside, Binds, StoreError};
use uuid::Uuid;

type RunKey = (String, Uuid);
type StepKey = (String, Uuid, String);
type AttemptKey = (String, Uuid, String, i32);
type BoxDynError = sqlx::error::BoxDynError;

/// Whether an event belongs to a run (and is folded here rather than applied on its own).
pub fn is_run_event(event: &Event) -> bool {
    matches!(
        event,
        Event::RunSubmitted(_)
            | Event::RunStarted(_)
            | Event::RunWaiting(_)
            | Event::RunAdmitted(_)
            | Event::RunCancelRequested(_)
            | Event::RunSucceeded(_)
            | Event::RunFailed(_)
            | Event::RunCancelled(_)
            | Event::RunTimedOut(_)
            | Event::StepDispatched(_)
            | Event::StepWaiting(_)
            | Event::StepAdmitted(_)
            | Event::StepStarted(_)
            | Event::StepAttemptLost(_)
            | Event::StepSucceeded(_)
            | Event::StepFailed(_)
            | Event::StepAttemptFailed(_)
            | Event::StepCancelled(_)
            | Event::StepSkipped(_)
    )
}

/// The run an event belongs to: named by the event, or by its subject's last token.
fn run_of(stored: &Stored) -> Option<Uuid> {
    match &stored.envelope.event {
        Event::RunSubmitted(e) => Some(e.run_id),
        _ => stored.envelope.subject.rsplit('.').next().and_then(|s| s.parse().ok()),
    }
}

/// The step a step event names (its row, its attempts, or both).
fn step_named(event: &Event) -> Option<&str> {
    Some(match event {
        Event::StepStarted(e) => &e.step,
        Event::StepSucceeded(e) => &e.step,
        Event::StepFailed(e) => &e.step,
        Event::StepAttemptFailed(e) => &e.step,
        Event::StepCancelled(e) => &e.step,
        Event::StepAttemptLost(e) => &e.step,
        Event::StepSkipped(e) => &e.step,
        _ => return None,
    })
}

/// A row as the batch found it (`stored`: it is in the table) and as it leaves it.
struct Slot<T> {
    stored: bool,
    /// What the table holds, for rows found there (to write only what changed).
    before: Option<T>,
    row: T,
}

impl<T: Clone> Slot<T> {
    /// A row as the table holds it.
    fn stored(row: T) -> Self {
        Slot { stored: true, before: Some(row.clone()), row }
    }
}

/// What the batch may change of a `runs` row, and, for a row the batch inserts, the rest.
#[derive(Clone, PartialEq)]
struct RunRow {
    status: String,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    last_seq: i64,
    cancel_requested_at: Option<DateTime<Utc>>,
    wait_reason: Option<String>,
    new: Option<Box<NewRun>>,
}

#[derive(Clone, PartialEq)]
struct NewRun {
    workflow_name: String,
    trigger: Value,
    inputs: Value,
    idempotency_key: Option<String>,
    created_at: DateTime<Utc>,
    workflow_version: Option<i32>,
    priority: i32,
    labels: Value,
    refresh_cache: bool,
}

#[derive(Clone, PartialEq)]
struct StepRow {
    status: String,
    attempts: i32,
    exit_code: Option<i32>,
    output: Option<String>,
    output_truncated: bool,
    error: Option<String>,
    reason: Option<String>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    outputs: Value,
    retry_at: Option<DateTime<Utc>>,
    wait_reason: Option<String>,
    /// Position, kind and needs, for a row the batch inserts.
    new: Option<(i32, String, String)>,
}

#[derive(Clone, PartialEq)]
struct AttemptRow {
    status: String,
    exit_code: Option<i32>,
    error: Option<String>,
    finished_at: Option<DateTime<Utc>>,
    outputs: Value,
    /// Executor and start, for a row the batch inserts.
    new: Option<(String, DateTime<Utc>)>,
}

/// Most bytes (roughly counted) of rows [`RowCache`] holds.
pub const CACHE_BYTES: usize = 32 << 20;

/// The rows of runs not yet ended, as the projector's committed batches left them, so that a
/// batch reads from the tables only the runs it has not seen (after a start, or evicted): a
/// run's later events are then writes and no read. A run is held whole (its row, every step,
/// every attempt), so a step it does not hold does not exist; a batch takes out only the run's
/// row and the steps its events name, and puts them back once it has committed. It is valid
/// only while this projector alone writes these tables; a run whose parts a failed batch took
/// out is read again when next touched, and a projector that fails starts over with an empty
/// cache (see `Projector::run`). Bounded by [`CACHE_BYTES`]: past it, the runs used least
/// recently are dropped (and read again when next touched).
#[derive(Default)]
pub struct RowCache {
    runs: HashMap<RunKey, CachedRun>,
    bytes: usize,
    /// Counts puts: each run remembers the count at its last, so the least recently used go
    /// first when it is over its bound.
    clock: u64,
}

/// One run's rows: its own (none while a batch holds it), and its steps' with their attempts.
#[derive(Default)]
struct CachedRun {
    run: Option<RunRow>,
    steps: HashMap<String, CachedStep>,
    /// Roughly the bytes its steps hold.
    bytes: usize,
    /// [`RowCache::clock`] when it was last put back.
    used: u64,
}

struct CachedStep {
    row: StepRow,
    attempts: Vec<(i32, AttemptRow)>,
}

impl CachedStep {
    /// Roughly the bytes it holds.
    fn bytes(&self, id: &str) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let s = &self.row;
        let attempts: usize = self.attempts.iter().map(|(_, a)| 96 + text(&a.error) + json_bytes(&a.outputs)).sum();
        160 + id.len() + text(&s.output) + text(&s.error) + text(&s.reason) + json_bytes(&s.outputs) + attempts
    }
}

/// Roughly the bytes a run's own row takes in the cache.
const RUN_BYTES: usize = 256;

/// Roughly the bytes a JSON value holds.
fn json_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => 24 + s.len(),
        Value::Array(a) => 24 + a.iter().map(json_bytes).sum::<usize>(),
        Value::Object(o) => 24 + o.iter().map(|(k, v)| 24 + k.len() + json_bytes(v)).sum::<usize>(),
        _ => 16,
    }
}

impl RowCache {
    /// How many runs it holds.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Forgets a run (its rows deleted, or to be read again when next touched).
    pub(crate) fn remove(&mut self, key: &RunKey) {
        if let Some(run) = self.runs.remove(key) {
            self.bytes -= RUN_BYTES + run.bytes;
        }
    }

    /// Takes out a held run's row and the rows of the steps in `steps` that it has (the others
    /// do not exist). None when it does not hold the run whole.
    fn take(&mut self, key: &RunKey, steps: &HashSet<String>) -> Option<(RunRow, Vec<(String, CachedStep)>)> {
        let held = self.runs.get_mut(key)?;
        let Some(run) = held.run.take() else {
            // Parts of it went to a batch that did not put them back.
            self.remove(key);
            return None;
        };
        let mut taken = Vec::with_capacity(steps.len());
        for id in steps {
            if let Some(step) = held.steps.remove(id) {
                let bytes = step.bytes(id);
                held.bytes -= bytes;
                self.bytes -= bytes;
                taken.push((id.clone(), step));
            }
        }
        Some((run, taken))
    }

    /// Puts back (or in) a run's row and the rows of some of its steps.
    fn put(&mut self, key: RunKey, run: RunRow, steps: Vec<(String, CachedStep)>) {
        let held = self.runs.entry(key).or_insert_with(|| {
            self.bytes += RUN_BYTES;
            CachedRun::default()
        });
        held.run = Some(run);
        self.clock += 1;
        held.used = self.clock;
        for (id, step) in steps {
            let bytes = step.bytes(&id);
            held.bytes += bytes;
            self.bytes += bytes;
            if let Some(old) = held.steps.insert(id.clone(), step) {
                let old = old.bytes(&id);
                held.bytes -= old;
                self.bytes -= old;
            }
        }
    }

    /// Drops runs, least recently used first, until it is under three quarters of
    /// [`CACHE_BYTES`], if it is over it (so that a full cache does not evict on every batch).
    fn trim(&mut self) {
        if self.bytes <= CACHE_BYTES {
            return;
        }
        let mut victims: Vec<(u64, RunKey)> = self.runs.iter().map(|(k, r)| (r.used, k.clone())).collect();
        victims.sort_unstable_by_key(|(used, _)| *used);
        for (_, key) in victims {
            if self.bytes <= CACHE_BYTES / 4 * 3 {
                break;
            }
            self.remove(&key);
        }
    }
}

/// The run rows one batch touches.
#[derive(Default)]
pub struct RunRows {
    runs: HashMap<RunKey, Slot<RunRow>>,
    steps: HashMap<StepKey, Slot<StepRow>>,
    attempts: HashMap<AttemptKey, Slot<AttemptRow>>,
    /// Each step's attempts among `attempts` (a cancelled step's running ones end with it).
    attempts_of: HashMap<StepKey, Vec<i32>>,
    /// Runs that ended in the batch, announced when it commits.
    pub ended: Vec<Uuid>,
    /// How many runs [`RunRows::load`] looked for in the tables.
    read: usize,
    /// Runs the batch submits again (see [`RunRows::load`]), whose rows are to go first.
    replaced: Vec<RunKey>,
}

impl RunRows {
    /// Reads every row of every run the batch's events touch (`events` after the checkpoint
    /// only): from `cache` where it holds the run (taking it out), the rest from the tables,
    /// each such run whole (its row, all its steps and all their attempts), but for runs the
    /// events submit.
    ///
    /// A run whose `RunSubmitted` is among the events, and whose id is a fresh UUID v7 (one
    /// submitted without an idempotency key, or a rerun), has no rows to read: no event can
    /// have named that id before. Its `RunSubmitted` is appended expecting the run's subject
    /// empty (see `taskmesh_ingest`), so all its events are after the checkpoint, and the
    /// tables, which hold only what was applied up to it, hold nothing of the run. A batch of
    /// such runs, and the cache's other runs, thus costs no read. A run id derived from an
    /// idempotency key is read all the same: once the log has dropped the run's events
    /// (`nats.events_max_age_days`), the same key submits it again, with a new
    /// `RunSubmitted` on an empty subject while the tables still hold the run's rows.
    ///
    /// Such a run, submitted again, is a new run (a rebuild from the log, which no longer
    /// holds the first, shows only the new one): its rows are left out here, as if the tables
    /// did not hold them, and listed in [`RunRows::replaced`], to be deleted before the batch
    /// is written. Its rows are read from the tables, never the cache: taken from there, a run
    /// comes with only the steps the batch names, where all of the old run's must go.
    pub async fn load<'e>(
        conn: &mut PgConnection,
        events: impl Iterator<Item = &'e Stored>,
        cache: &mut RowCache,
    ) -> Result<Self, sqlx::Error> {
        let mut rows = RunRows::default();
        // The runs the events touch, and the steps each names.
        let mut touched: HashMap<RunKey, HashSet<String>> = HashMap::new();
        // The runs the events submit under fresh ids (none of their rows is in the tables).
        let mut submitted: HashSet<RunKey> = HashSet::new();
        // The runs the events submit under an idempotency key's id (their rows may be there).
        let mut keyed: HashSet<RunKey> = HashSet::new();
        for stored in events.filter(|s| is_run_event(&s.envelope.event)) {
            let Some(run) = run_of(stored) else { continue };
            let key = (stored.envelope.tenant.clone(), run);
            let steps = touched.entry(key.clone()).or_default();
            match &stored.envelope.event {
                Event::RunSubmitted(e) => {
                    steps.extend(e.workflow.steps.iter().map(|s| s.id.clone()));
                    if e.idempotency_key.is_none() {
                        submitted.insert(key);
                    } else {
                        keyed.insert(key);
                    }
                }
                Event::StepWaiting(taskmesh_events::StepWaiting { steps: ids, .. })
                | Event::StepAdmitted(taskmesh_events::StepAdmitted { steps: ids }) => {
                    steps.extend(ids.iter().cloned())
                }
                event => steps.extend(step_named(event).map(str::to_string)),
            }
        }
        for key in &keyed {
            cache.remove(key);
        }
        let mut missing: HashSet<RunKey> = HashSet::new();
        for (key, steps) in touched {
            match cache.take(&key, &steps) {
                Some((run, steps)) => rows.hold(key, run, steps),
                None if submitted.contains(&key) => {}
                None => {
                    missing.insert(key);
                }
            }
        }
        rows.read = missing.len();
        if missing.is_empty() {
            return Ok(rows);
        }
        let (tenants, ids): (Vec<String>, Vec<Uuid>) = missing.into_iter().unzip();
        let found = by_runs(
            conn,
            "SELECT r.tenant_id, r.id, r.status, r.started_at, r.finished_at, r.last_seq, r.cancel_requested_at, r.wait_reason
             FROM runs r JOIN UNNEST($1::text[], $2::uuid[]) AS k(tenant, id) ON r.tenant_id = k.tenant AND r.id = k.id",
            &tenants,
            &ids,
        )
        .await?;
        // Steps and attempts only of runs the table holds (none, for a batch of new runs).
        let (mut tenants, mut ids) = (Vec::new(), Vec::new());
        for r in found {
            let row = RunRow {
                status: r.get("status"),
                started_at: r.get("started_at"),
                finished_at: r.get("finished_at"),
                last_seq: r.get("last_seq"),
                cancel_requested_at: r.get("cancel_requested_at"),
                wait_reason: r.get("wait_reason"),
                new: None,
            };
            let key: RunKey = (r.get("tenant_id"), r.get("id"));
            tenants.push(key.0.clone());
            ids.push(key.1);
            rows.runs.insert(key, Slot::stored(row));
        }
        if ids.is_empty() {
            return Ok(rows);
        }
        let found = by_runs(
            conn,
            "SELECT s.tenant_id, s.run_id, s.step_id, s.status, s.attempts, s.exit_code, s.output, s.output_truncated,
                    s.error, s.reason, s.started_at, s.finished_at, s.outputs, s.retry_at, s.wait_reason
             FROM steps s JOIN UNNEST($1::text[], $2::uuid[]) AS k(tenant, run)
               ON s.tenant_id = k.tenant AND s.run_id = k.run",
            &tenants,
            &ids,
        )
        .await?;
        for r in found {
            let row = StepRow {
                status: r.get("status"),
                attempts: r.get("attempts"),
                exit_code: r.get("exit_code"),
                output: r.get("output"),
                output_truncated: r.get("output_truncated"),
                error: r.get("error"),
                reason: r.get("reason"),
                started_at: r.get("started_at"),
                finished_at: r.get("finished_at"),
                outputs: r.get::<Json<Value>, _>("outputs").0,
                retry_at: r.get("retry_at"),
                wait_reason: r.get("wait_reason"),
                new: None,
            };
            rows.steps.insert((r.get("tenant_id"), r.get("run_id"), r.get("step_id")), Slot::stored(row));
        }
        let found = by_runs(
            conn,
            "SELECT a.tenant_id, a.run_id, a.step_id, a.attempt, a.status, a.exit_code, a.error, a.finished_at, a.outputs
             FROM step_attempts a JOIN UNNEST($1::text[], $2::uuid[]) AS k(tenant, run)
               ON a.tenant_id = k.tenant AND a.run_id = k.run",
            &tenants,
            &ids,
        )
        .await?;
        for r in found {
            let row = AttemptRow {
                status: r.get("status"),
                exit_code: r.get("exit_code"),
                error: r.get("error"),
                finished_at: r.get("finished_at"),
                outputs: r.get::<Json<Value>, _>("outputs").0,
                new: None,
            };
            let key: AttemptKey = (r.get("tenant_id"), r.get("run_id"), r.get("step_id"), r.get("attempt"));
            rows.add_attempt(key, Slot::stored(row));
        }
        for key in keyed {
            if rows.runs.remove(&key).is_some() {
                let of_run = |tenant: &String, run: &Uuid| (tenant, run) == (&key.0, &key.1);
                rows.steps.retain(|(tenant, run, _), _| !of_run(tenant, run));
                rows.attempts.retain(|(tenant, run, _, _), _| !of_run(tenant, run));
                rows.attempts_of.retain(|(tenant, run, _), _| !of_run(tenant, run));
                rows.replaced.push(key);
            }
        }
        Ok(rows)
    }

    /// The runs the batch submits again, whose rows must be deleted before it is written (in
    /// its transaction, which rolls back should the checkpoint have moved; see
    /// [`RunRows::load`]).
    pub fn replaced(&self) -> &[RunKey] {
        &self.replaced
    }

    /// How many runs [`RunRows::load`] looked for in the tables (neither in the cache nor
    /// submitted by the batch).
    pub fn runs_read(&self) -> usize {
        self.read
    }

    /// Takes in a run's row and some of its steps' rows from the cache, as the table holds them.
    fn hold(&mut self, (tenant, run): RunKey, row: RunRow, steps: Vec<(String, CachedStep)>) {
        for (step, cached) in steps {
            for (attempt, row) in cached.attempts {
                self.add_attempt((tenant.clone(), run, step.clone(), attempt), Slot::stored(row));
            }
            self.steps.insert((tenant.clone(), run, step), Slot::stored(cached.row));
        }
        self.runs.insert((tenant, run), Slot::stored(row));
    }

    fn add_attempt(&mut self, key: AttemptKey, slot: Slot<AttemptRow>) {
        self.attempts_of.entry((key.0.clone(), key.1, key.2.clone())).or_default().push(key.3);
        self.attempts.insert(key, slot);
    }

    /// Once the batch has committed: its rows as the table now holds them go into `cache`,
    /// but for runs that ended (their rows change no more), which leave it.
    pub fn keep(self, cache: &mut RowCache) {
        let ended: HashSet<Uuid> = self.ended.into_iter().collect();
        let mut steps: HashMap<RunKey, Vec<(String, CachedStep)>> = HashMap::new();
        let mut attempts: HashMap<StepKey, Vec<(i32, AttemptRow)>> = HashMap::new();
        for ((tenant, run, step, attempt), slot) in self.attempts {
            attempts.entry((tenant, run, step)).or_default().push((attempt, AttemptRow { new: None, ..slot.row }));
        }
        for ((tenant, run, step), slot) in self.steps {
            let held = attempts.remove(&(tenant.clone(), run, step.clone())).unwrap_or_default();
            let cached = CachedStep { row: StepRow { new: None, ..slot.row }, attempts: held };
            steps.entry((tenant, run)).or_default().push((step, cached));
        }
        // Attempts of a step with no row (none are made so): such a run is not held whole.
        let partial: HashSet<RunKey> = attempts.into_keys().map(|(t, r, _)| (t, r)).collect();
        for (key, slot) in self.runs {
            // A run that ended (in this batch, or before it: a late event brought it back)
            // changes no more.
            if ended.contains(&key.1) || slot.row.finished_at.is_some() || partial.contains(&key) {
                cache.remove(&key);
                continue;
            }
            let steps = steps.remove(&key).unwrap_or_default();
            cache.put(key, RunRow { new: None, ..slot.row }, steps);
        }
        cache.trim();
    }

    fn run(&mut self, tenant: &str, run: Uuid) -> Option<&mut RunRow> {
        self.runs.get_mut(&(tenant.to_string(), run)).map(|s| &mut s.row)
    }

    fn step(&mut self, tenant: &str, run: Uuid, step: &str) -> Option<&mut StepRow> {
        self.steps.get_mut(&(tenant.to_string(), run, step.to_string())).map(|s| &mut s.row)
    }

    fn attempt(&mut self, tenant: &str, run: Uuid, step: &str, attempt: u32) -> Option<&mut AttemptRow> {
        self.attempts.get_mut(&(tenant.to_string(), run, step.to_string(), attempt as i32)).map(|s| &mut s.row)
    }

    /// Folds one run event into the rows, as its statement would have changed them. Rows the
    /// table does not hold (and the batch did not insert) are left alone, as an `UPDATE` that
    /// matches nothing would. Every event of a run that has a row moves its `last_seq` on,
    /// except a `RunSubmitted` whose run was already there (`INSERT … ON CONFLICT DO NOTHING`).
    pub fn apply(&mut self, stored: &Stored) {
        let Some(run) = run_of(stored) else { return };
        let env = &stored.envelope;
        let tenant = env.tenant.as_str();
        let (at, seq) = (env.occurred_at, stored.seq as i64);
        if let Event::RunSubmitted(e) = &env.event {
            self.submit(tenant, e, at, seq);
            return;
        }
        if let Some(r) = self.run(tenant, run) {
            r.last_seq = r.last_seq.max(seq);
        }
        match &env.event {
            // status = 'running', started_at = COALESCE(started_at, at), wait_reason = NULL
            // WHERE status = 'queued'
            Event::RunStarted(_) => self.start_run(tenant, run, at),
            // steps: wait_reason = reason WHERE step_id = ANY(steps) AND status = 'queued'
            Event::StepWaiting(e) => {
                for id in &e.steps {
                    if let Some(s) = self.step(tenant, run, id).filter(|s| s.status == "queued") {
                        s.wait_reason = Some(e.reason.clone());
                    }
                }
            }
            // steps: wait_reason = NULL WHERE step_id = ANY(steps)
            Event::StepAdmitted(e) => {
                for id in &e.steps {
                    if let Some(s) = self.step(tenant, run, id) {
                        s.wait_reason = None;
                    }
                }
            }
            // runs: wait_reason = reason WHERE status = 'queued'
            Event::RunWaiting(e) => {
                if let Some(r) = self.run(tenant, run).filter(|r| r.status == "queued") {
                    r.wait_reason = Some(e.reason.clone());
                }
            }
            // runs: wait_reason = NULL
            Event::RunAdmitted(_) => {
                if let Some(r) = self.run(tenant, run) {
                    r.wait_reason = None;
                }
            }
            // steps: status = 'running', attempts = n, started_at = COALESCE(started_at, at),
            // wait_reason = NULL; the attempt inserted (ON CONFLICT DO NOTHING); the run
            // started with its first.
            Event::StepStarted(e) => {
                if let Some(s) = self.step(tenant, run, &e.step) {
                    s.status = "running".into();
                    s.attempts = e.attempt as i32;
                    s.started_at = s.started_at.or(Some(at));
                    s.wait_reason = None;
                }
                let key = (tenant.to_string(), run, e.step.clone(), e.attempt as i32);
                if let Entry::Vacant(vacant) = self.attempts.entry(key) {
                    let row = AttemptRow {
                        status: "running".into(),
                        exit_code: None,
                        error: None,
                        finished_at: None,
                        outputs: Value::Object(Default::default()),
                        new: Some((e.executor.clone(), at)),
                    };
                    self.attempts_of
                        .entry((tenant.to_string(), run, e.step.clone()))
                        .or_default()
                        .push(e.attempt as i32);
                    vacant.insert(Slot { stored: false, before: None, row });
                }
                if e.run_started {
                    self.start_run(tenant, run, at);
                }
            }
            // attempt: status = 'lost', error = reason, finished_at = at
            Event::StepAttemptLost(e) => {
                if let Some(a) = self.attempt(tenant, run, &e.step, e.attempt) {
                    a.status = "lost".into();
                    a.error = Some(e.reason.clone());
                    a.finished_at = Some(at);
                }
            }
            Event::StepSucceeded(e) => self.finish_step(tenant, run, &e.step, e.attempt, Status::Succeeded, &e.outcome),
            Event::StepFailed(e) => {
                let status = if e.outcome.timed_out { Status::TimedOut } else { Status::Failed };
                self.finish_step(tenant, run, &e.step, e.attempt, status, &e.outcome)
            }
            // The attempt ends; steps: status = 'queued', exit_code, output, output_truncated,
            // error, retry_at = the retry's time
            Event::StepAttemptFailed(e) => {
                let status = if e.outcome.timed_out { Status::TimedOut } else { Status::Failed };
                self.finish_attempt(tenant, run, &e.step, e.attempt, status, &e.outcome);
                if let Some(s) = self.step(tenant, run, &e.step) {
                    s.status = "queued".into();
                    s.exit_code = e.outcome.exit_code;
                    s.output = Some(e.outcome.output.clone());
                    s.output_truncated = e.outcome.output_truncated;
                    s.error = e.outcome.error.clone();
                    s.retry_at = Some(e.retry_at);
                }
            }
            // steps: status = 'cancelled', reason, finished_at = at, retry_at and wait_reason
            // NULL; its running attempts: status = 'cancelled', finished_at = at
            Event::StepCancelled(e) => {
                if let Some(s) = self.step(tenant, run, &e.step) {
                    s.status = "cancelled".into();
                    s.reason = Some(e.reason.clone());
                    s.finished_at = Some(at);
                    s.retry_at = None;
                    s.wait_reason = None;
                }
                let step = (tenant.to_string(), run, e.step.clone());
                for n in self.attempts_of.get(&step).cloned().unwrap_or_default() {
                    let key = (step.0.clone(), run, step.2.clone(), n);
                    if let Some(a) = self.attempts.get_mut(&key).map(|s| &mut s.row).filter(|a| a.status == "running") {
                        a.status = "cancelled".into();
                        a.finished_at = Some(at);
                    }
                }
            }
            // runs: cancel_requested_at = at
            Event::RunCancelRequested(_) => {
                if let Some(r) = self.run(tenant, run) {
                    r.cancel_requested_at = Some(at);
                }
            }
            // steps: status = 'skipped', reason, finished_at = at, wait_reason = NULL
            Event::StepSkipped(e) => {
                if let Some(s) = self.step(tenant, run, &e.step) {
                    s.status = "skipped".into();
                    s.reason = Some(e.reason.clone());
                    s.finished_at = Some(at);
                    s.wait_reason = None;
                }
            }
            // runs: status, finished_at = at, wait_reason = NULL; announced on commit
            Event::RunSucceeded(e) | Event::RunFailed(e) | Event::RunCancelled(e) | Event::RunTimedOut(e) => {
                let status = match env.event {
                    Event::RunSucceeded(_) => Status::Succeeded,
                    Event::RunFailed(_) => Status::Failed,
                    Event::RunTimedOut(_) => Status::TimedOut,
                    _ => Status::Cancelled,
                };
                if let Some(r) = self.run(tenant, e.run_id) {
                    r.status = status.as_str().into();
                    r.finished_at = Some(at);
                    r.wait_reason = None;
                }
                self.ended.push(e.run_id);
            }
            _ => {}
        }
    }

    /// The run's row and its steps' rows, each inserted unless there (ON CONFLICT DO NOTHING);
    /// then each reused step: status = 'succeeded' with the reused outcome and its reason.
    fn submit(&mut self, tenant: &str, e: &taskmesh_events::RunSubmitted, at: DateTime<Utc>, seq: i64) {
        if let Entry::Vacant(vacant) = self.runs.entry((tenant.to_string(), e.run_id)) {
            let new = NewRun {
                workflow_name: e.workflow.name.clone(),
                trigger: serde_json::to_value(&e.trigger).unwrap_or_default(),
                inputs: serde_json::to_value(&e.inputs).unwrap_or_default(),
                idempotency_key: e.idempotency_key.clone(),
                created_at: at,
                workflow_version: e.workflow_version.map(|v| v as i32),
                priority: e.priority.or(e.workflow.priority).unwrap_or(0),
                labels: serde_json::to_value(&e.labels).unwrap_or_default(),
                refresh_cache: e.refresh_cache,
            };
            let row = RunRow {
                status: "queued".into(),
                started_at: None,
                finished_at: None,
                last_seq: seq,
                cancel_requested_at: None,
                wait_reason: None,
                new: Some(Box::new(new)),
            };
            vacant.insert(Slot { stored: false, before: None, row });
        }
        for (position, step) in e.workflow.steps.iter().enumerate() {
            let Entry::Vacant(vacant) = self.steps.entry((tenant.to_string(), e.run_id, step.id.clone())) else {
                continue;
            };
            let kind = match step.kind() {
                Some("uses") | None => "builtin",
                Some(k) => k,
            };
            let row = StepRow {
                status: "queued".into(),
                attempts: 0,
                exit_code: None,
                output: None,
                output_truncated: false,
                error: None,
                reason: None,
                started_at: None,
                finished_at: None,
                outputs: Value::Object(Default::default()),
                retry_at: None,
                wait_reason: None,
                new: Some((position as i32, kind.to_string(), step.needs.join(","))),
            };
            vacant.insert(Slot { stored: false, before: None, row });
        }
        for (id, reused) in &e.reused {
            if let Some(s) = self.step(tenant, e.run_id, id) {
                let o = &reused.outcome;
                s.status = "succeeded".into();
                s.exit_code = o.exit_code;
                s.output = Some(o.output.clone());
                s.output_truncated = o.output_truncated;
                s.outputs = serde_json::to_value(&o.outputs).unwrap_or_default();
                s.reason = Some(format!("reused from run {}", reused.from_run));
                s.started_at = Some(o.started_at);
                s.finished_at = Some(o.finished_at);
            }
        }
    }

    fn start_run(&mut self, tenant: &str, run: Uuid, at: DateTime<Utc>) {
        if let Some(r) = self.run(tenant, run).filter(|r| r.status == "queued") {
            r.status = "running".into();
            r.started_at = r.started_at.or(Some(at));
            r.wait_reason = None;
        }
    }

    /// steps: status, exit_code, output, output_truncated, error, wait_reason = NULL,
    /// started_at = COALESCE(started_at, outcome's), finished_at, outputs, retry_at = NULL,
    /// reason = where a cached outcome came from; and the attempt ends.
    fn finish_step(&mut self, tenant: &str, run: Uuid, step: &str, attempt: u32, status: Status, o: &StepOutcome) {
        if let Some(s) = self.step(tenant, run, step) {
            s.status = status.as_str().into();
            s.exit_code = o.exit_code;
            s.output = Some(o.output.clone());
            s.output_truncated = o.output_truncated;
            s.error = o.error.clone();
            s.wait_reason = None;
            s.started_at = s.started_at.or(Some(o.started_at));
            s.finished_at = Some(o.finished_at);
            s.outputs = serde_json::to_value(&o.outputs).unwrap_or_default();
            s.retry_at = None;
            if let Some(from) = &o.cached_from {
                s.reason = Some(format!("cached from run {} (step {})", from.run_id, from.step));
            }
        }
        self.finish_attempt(tenant, run, step, attempt, status, o);
    }

    /// attempt: status, exit_code, error, finished_at, outputs, unless it was lost.
    fn finish_attempt(&mut self, tenant: &str, run: Uuid, step: &str, attempt: u32, status: Status, o: &StepOutcome) {
        if let Some(a) = self.attempt(tenant, run, step, attempt).filter(|a| a.status != "lost") {
            a.status = status.as_str().into();
            a.exit_code = o.exit_code;
            a.error = o.error.clone();
            a.finished_at = Some(o.finished_at);
            a.outputs = serde_json::to_value(&o.outputs).unwrap_or_default();
        }
    }

    /// Adds to `writes` what the batch changed: new rows in one `INSERT` per table, changed
    /// ones in one `UPDATE` per table (each table's new and changed rows are different rows,
    /// as one statement needs). Returns the runs that ended.
    pub fn write(&self, writes: &mut Alongside) -> Result<&[Uuid], StoreError> {
        self.write_runs(writes)?;
        self.write_steps(writes)?;
        self.write_attempts(writes)?;
        Ok(&self.ended)
    }

    fn write_runs(&self, writes: &mut Alongside) -> Result<(), StoreError> {
        let mut new = RunColumns::default();
        let mut changed = RunColumns::default();
        let (mut names, mut triggers, mut inputs, mut keys, mut created, mut versions, mut priorities, mut labels) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut refreshes = Vec::new();
        for ((tenant, id), slot) in &self.runs {
            if slot.stored {
                if slot.before.as_ref() != Some(&slot.row) {
                    changed.push(tenant, *id, &slot.row);
                }
                continue;
            }
            let n = slot.row.new.as_ref().expect("a new run has its columns");
            names.push(n.workflow_name.as_str());
            triggers.push(Json(&n.trigger));
            inputs.push(Json(&n.inputs));
            keys.push(n.idempotency_key.as_deref());
            created.push(n.created_at);
            versions.push(n.workflow_version);
            priorities.push(n.priority);
            labels.push(Json(&n.labels));
            refreshes.push(n.refresh_cache);
            new.push(tenant, *id, &slot.row);
        }
        if !new.ids.is_empty() {
            writes.add(
                "INSERT INTO runs (tenant_id, id, status, started_at, finished_at, last_seq, cancel_requested_at, wait_reason,
                                       workflow_name, trigger, inputs, idempotency_key, created_at, workflow_version, priority, labels,
                                       refresh_cache)
                     SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::bigint[],
                                          $7::timestamptz[], $8::text[], $9::text[], $10::jsonb[], $11::jsonb[], $12::text[],
                                          $13::timestamptz[], $14::int[], $15::int[], $16::jsonb[], $17::bool[])
                     WHERE {if_checkpoint_moved}
                     ON CONFLICT DO NOTHING",
                |b| {
                    new.bind(b)?.bind(&names)?.bind(&triggers)?.bind(&inputs)?.bind(&keys)?.bind(&created)?.bind(&versions)?.bind(&priorities)?.bind(&labels)?.bind(&refreshes)?;
                    Ok(())
                },
            )?;
        }
        if !changed.ids.is_empty() {
            writes.add(
                "UPDATE runs r SET status = t.status, started_at = t.started_at, finished_at = t.finished_at,
                            last_seq = t.last_seq, cancel_requested_at = t.cancel_requested_at, wait_reason = t.wait_reason
                     FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::bigint[],
                                 $7::timestamptz[], $8::text[])
                          AS t(tenant, id, status, started_at, finished_at, last_seq, cancel_requested_at, wait_reason)
                     WHERE r.tenant_id = t.tenant AND r.id = t.id AND {if_checkpoint_moved}",
                |b| {
                    changed.bind(b)?;
                    Ok(())
                },
            )?;
        }
        Ok(())
    }

    fn write_steps(&self, writes: &mut Alongside) -> Result<(), StoreError> {
        let mut new = StepColumns::default();
        let (mut positions, mut kinds, mut needs) = (Vec::new(), Vec::new(), Vec::new());
        let mut changed = StepColumns::default();
        for (key, slot) in &self.steps {
            if slot.stored {
                if slot.before.as_ref() != Some(&slot.row) {
                    changed.push(key, &slot.row);
                }
            } else {
                let (position, kind, need) = slot.row.new.as_ref().expect("a new step has its columns");
                positions.push(*position);
                kinds.push(kind.as_str());
                needs.push(need.as_str());
                new.push(key, &slot.row);
            }
        }
        if !new.tenants.is_empty() {
            writes.add(
                "INSERT INTO steps (tenant_id, run_id, step_id, status, attempts, exit_code, output, output_truncated, error,
                                        reason, started_at, finished_at, outputs, retry_at, wait_reason, position, kind, needs)
                     SELECT tenant, run, step, status, attempts, exit_code, output, output_truncated, error, reason, started_at,
                            finished_at, outputs, retry_at, wait_reason, position, kind,
                            CASE WHEN needs = '' THEN '{}'::text[] ELSE string_to_array(needs, ',') END
                     FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::int[], $7::text[], $8::bool[],
                                 $9::text[], $10::text[], $11::timestamptz[], $12::timestamptz[], $13::jsonb[], $14::timestamptz[],
                                 $15::text[], $16::int[], $17::text[], $18::text[])
                          AS t(tenant, run, step, status, attempts, exit_code, output, output_truncated, error, reason, started_at,
                               finished_at, outputs, retry_at, wait_reason, position, kind, needs)
                     WHERE {if_checkpoint_moved}
                     ON CONFLICT DO NOTHING",
                |b| {
                    new.bind(b)?.bind(&positions)?.bind(&kinds)?.bind(&needs)?;
                    Ok(())
                },
            )?;
        }
        if !changed.tenants.is_empty() {
            writes.add(
                "UPDATE steps s SET status = t.status, attempts = t.attempts, exit_code = t.exit_code, output = t.output,
                            output_truncated = t.output_truncated, error = t.error, reason = t.reason, started_at = t.started_at,
                            finished_at = t.finished_at, outputs = t.outputs, retry_at = t.retry_at, wait_reason = t.wait_reason
                     FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::int[], $7::text[], $8::bool[],
                                 $9::text[], $10::text[], $11::timestamptz[], $12::timestamptz[], $13::jsonb[], $14::timestamptz[],
                                 $15::text[])
                          AS t(tenant, run, step, status, attempts, exit_code, output, output_truncated, error, reason, started_at,
                               finished_at, outputs, retry_at, wait_reason)
                     WHERE s.tenant_id = t.tenant AND s.run_id = t.run AND s.step_id = t.step AND {if_checkpoint_moved}",
                |b| {
                    changed.bind(b)?;
                    Ok(())
                },
            )?;
        }
        Ok(())
    }

    fn write_attempts(&self, writes: &mut Alongside) -> Result<(), StoreError> {
        let mut new = AttemptColumns::default();
        let (mut executors, mut started) = (Vec::new(), Vec::new());
        let mut changed = AttemptColumns::default();
        for (key, slot) in &self.attempts {
            if slot.stored {
                if slot.before.as_ref() != Some(&slot.row) {
                    changed.push(key, &slot.row);
                }
            } else {
                let (executor, at) = slot.row.new.as_ref().expect("a new attempt has its columns");
                executors.push(executor.as_str());
                started.push(*at);
                new.push(key, &slot.row);
            }
        }
        if !new.tenants.is_empty() {
            writes.add(
                "INSERT INTO step_attempts (tenant_id, run_id, step_id, attempt, status, exit_code, error, finished_at, outputs,
                                                executor, started_at)
                     SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::int[], $7::text[],
                                          $8::timestamptz[], $9::jsonb[], $10::text[], $11::timestamptz[])
                     WHERE {if_checkpoint_moved}
                     ON CONFLICT DO NOTHING",
                |b| {
                    new.bind(b)?.bind(&executors)?.bind(&started)?;
                    Ok(())
                },
            )?;
        }
        if !changed.tenants.is_empty() {
            writes.add(
                "UPDATE step_attempts a SET status = t.status, exit_code = t.exit_code, error = t.error,
                            finished_at = t.finished_at, outputs = t.outputs
                     FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::int[], $7::text[],
                                 $8::timestamptz[], $9::jsonb[])
                          AS t(tenant, run, step, attempt, status, exit_code, error, finished_at, outputs)
                     WHERE a.tenant_id = t.tenant AND a.run_id = t.run AND a.step_id = t.step AND a.attempt = t.attempt
                       AND {if_checkpoint_moved}",
                |b| {
                    changed.bind(b)?;
                    Ok(())
                },
            )?;
        }
        Ok(())
    }
}

/// The rows `sql` selects for runs, given as `UNNEST($1::text[], $2::uuid[])`.
async fn by_runs(
    conn: &mut PgConnection,
    sql: &'static str,
    tenants: &[String],
    ids: &[Uuid],
) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
    sqlx::query(sql).bind(tenants).bind(ids).fetch_all(conn).await
}

/// The columns a batch may change of `runs` rows, one array each, for `UNNEST`.
#[derive(Default)]
struct RunColumns<'a> {
    tenants: Vec<&'a str>,
    ids: Vec<Uuid>,
    status: Vec<&'a str>,
    started_at: Vec<Option<DateTime<Utc>>>,
    finished_at: Vec<Option<DateTime<Utc>>>,
    last_seq: Vec<i64>,
    cancel_requested_at: Vec<Option<DateTime<Utc>>>,
    wait_reason: Vec<Option<&'a str>>,
}

impl<'a> RunColumns<'a> {
    /// Binds the columns, in order, as the statement's first parameters.
    fn bind<'b, 'c>(&self, b: &'b mut Binds<'c>) -> Result<&'b mut Binds<'c>, BoxDynError> {
        b.bind(&self.tenants)?
            .bind(&self.ids)?
            .bind(&self.status)?
            .bind(&self.started_at)?
            .bind(&self.finished_at)?
            .bind(&self.last_seq)?
            .bind(&self.cancel_requested_at)?
            .bind(&self.wait_reason)
    }

    fn push(&mut self, tenant: &'a str, id: Uuid, r: &'a RunRow) {
        self.tenants.push(tenant);
        self.ids.push(id);
        self.status.push(&r.status);
        self.started_at.push(r.started_at);
        self.finished_at.push(r.finished_at);
        self.last_seq.push(r.last_seq);
        self.cancel_requested_at.push(r.cancel_requested_at);
        self.wait_reason.push(r.wait_reason.as_deref());
    }
}

/// The columns a batch may change of `steps` rows.
#[derive(Default)]
struct StepColumns<'a> {
    tenants: Vec<&'a str>,
    runs: Vec<Uuid>,
    steps: Vec<&'a str>,
    status: Vec<&'a str>,
    attempts: Vec<i32>,
    exit_code: Vec<Option<i32>>,
    output: Vec<Option<&'a str>>,
    output_truncated: Vec<bool>,
    error: Vec<Option<&'a str>>,
    reason: Vec<Option<&'a str>>,
    started_at: Vec<Option<DateTime<Utc>>>,
    finished_at: Vec<Option<DateTime<Utc>>>,
    outputs: Vec<Json<&'a Value>>,
    retry_at: Vec<Option<DateTime<Utc>>>,
    wait_reason: Vec<Option<&'a str>>,
}

impl<'a> StepColumns<'a> {
    /// Binds the columns, in order, as the statement's first parameters.
    fn bind<'b, 'c>(&self, b: &'b mut Binds<'c>) -> Result<&'b mut Binds<'c>, BoxDynError> {
        b.bind(&self.tenants)?
            .bind(&self.runs)?
            .bind(&self.steps)?
            .bind(&self.status)?
            .bind(&self.attempts)?
            .bind(&self.exit_code)?
            .bind(&self.output)?
            .bind(&self.output_truncated)?
            .bind(&self.error)?
            .bind(&self.reason)?
            .bind(&self.started_at)?
            .bind(&self.finished_at)?
            .bind(&self.outputs)?
            .bind(&self.retry_at)?
            .bind(&self.wait_reason)
    }

    fn push(&mut self, (tenant, run, step): &'a StepKey, s: &'a StepRow) {
        self.tenants.push(tenant);
        self.runs.push(*run);
        self.steps.push(step);
        self.status.push(&s.status);
        self.attempts.push(s.attempts);
        self.exit_code.push(s.exit_code);
        self.output.push(s.output.as_deref());
        self.output_truncated.push(s.output_truncated);
        self.error.push(s.error.as_deref());
        self.reason.push(s.reason.as_deref());
        self.started_at.push(s.started_at);
        self.finished_at.push(s.finished_at);
        self.outputs.push(Json(&s.outputs));
        self.retry_at.push(s.retry_at);
        self.wait_reason.push(s.wait_reason.as_deref());
    }
}

/// The columns a batch may change of `step_attempts` rows.
#[derive(Default)]
struct AttemptColumns<'a> {
    tenants: Vec<&'a str>,
    runs: Vec<Uuid>,
    steps: Vec<&'a str>,
    attempts: Vec<i32>,
    status: Vec<&'a str>,
    exit_code: Vec<Option<i32>>,
    error: Vec<Option<&'a str>>,
    finished_at: Vec<Option<DateTime<Utc>>>,
    outputs: Vec<Json<&'a Value>>,
}

impl<'a> AttemptColumns<'a> {
    /// Binds the columns, in order, as the statement's first parameters.
    fn bind<'b, 'c>(&self, b: &'b mut Binds<'c>) -> Result<&'b mut Binds<'c>, BoxDynError> {
        b.bind(&self.tenants)?
            .bind(&self.runs)?
            .bind(&self.steps)?
            .bind(&self.attempts)?
            .bind(&self.status)?
            .bind(&self.exit_code)?
            .bind(&self.error)?
            .bind(&self.finished_at)?
            .bind(&self.outputs)
    }

    fn push(&mut self, (tenant, run, step, attempt): &'a AttemptKey, a: &'a AttemptRow) {
        self.tenants.push(tenant);
        self.runs.push(*run);
        self.steps.push(step);
        self.attempts.push(*attempt);
        self.status.push(&a.status);
        self.exit_code.push(a.exit_code);
        self.error.push(a.error.as_deref());
        self.finished_at.push(a.finished_at);
        self.outputs.push(Json(&a.outputs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_row() -> RunRow {
        RunRow {
            status: "running".into(),
            started_at: None,
            finished_at: None,
            last_seq: 1,
            cancel_requested_at: None,
            wait_reason: None,
            new: None,
        }
    }

    fn step_with_output(bytes: usize) -> CachedStep {
        let row = StepRow {
            status: "succeeded".into(),
            attempts: 1,
            exit_code: Some(0),
            output: Some("x".repeat(bytes)),
            output_truncated: false,
            error: None,
            reason: None,
            started_at: None,
            finished_at: None,
            outputs: serde_json::json!({"k": "v"}),
            retry_at: None,
            wait_reason: None,
            new: None,
        };
        CachedStep { row, attempts: Vec::new() }
    }

    fn counted(cache: &RowCache) -> usize {
        cache.runs.values().map(|r| RUN_BYTES + r.steps.iter().map(|(id, s)| s.bytes(id)).sum::<usize>()).sum()
    }

    #[test]
    fn the_row_cache_drops_runs_past_its_byte_bound_and_counts_what_it_holds() {
        let mut cache = RowCache::default();
        let each = RUN_BYTES + step_with_output(64 * 1024).bytes("a");
        let n = CACHE_BYTES / each * 2;
        for _ in 0..n {
            cache.put(("t".into(), Uuid::now_v7()), run_row(), vec![("a".into(), step_with_output(64 * 1024))]);
            cache.trim();
            assert!(cache.bytes <= CACHE_BYTES, "{} bytes held", cache.bytes);
        }
        assert!(cache.len() < n && cache.len() >= CACHE_BYTES / 2 / each, "{} runs held", cache.len());
        assert_eq!(cache.bytes, counted(&cache));
    }

    #[test]
    fn past_its_bound_the_row_cache_drops_the_runs_used_least_recently() {
        let mut cache = RowCache::default();
        let each = RUN_BYTES + step_with_output(64 * 1024).bytes("a");
        let fill = CACHE_BYTES / each;
        let keys: Vec<RunKey> = (0..fill).map(|_| ("t".into(), Uuid::now_v7())).collect();
        for key in &keys {
            cache.put(key.clone(), run_row(), vec![("a".into(), step_with_output(64 * 1024))]);
        }
        // The first run is used again (taken by a batch and put back): now the most recent.
        let a: HashSet<String> = ["a".to_string()].into();
        let (run, steps) = cache.take(&keys[0], &a).expect("held");
        cache.put(keys[0].clone(), run, steps);
        // New runs push it over its bound.
        let mut newer = Vec::new();
        while cache.bytes <= CACHE_BYTES {
            let key: RunKey = ("t".into(), Uuid::now_v7());
            cache.put(key.clone(), run_row(), vec![("a".into(), step_with_output(64 * 1024))]);
            newer.push(key);
        }
        cache.trim();
        assert!(cache.runs.contains_key(&keys[0]), "the run used again stays");
        assert!(newer.iter().all(|k| cache.runs.contains_key(k)), "the newest stay");
        assert!(!cache.runs.contains_key(&keys[1]), "the least recently used goes first");
        let dropped = keys[1..].iter().filter(|k| !cache.runs.contains_key(*k)).count();
        let kept_old = keys[1..].iter().skip(dropped).all(|k| cache.runs.contains_key(k));
        assert!(kept_old, "runs go in the order they were last used");
        assert_eq!(cache.bytes, counted(&cache));
    }

    #[test]
    fn a_batch_takes_out_the_steps_it_names_and_a_run_not_put_back_is_read_again() {
        let mut cache = RowCache::default();
        let key: RunKey = ("t".into(), Uuid::now_v7());
        let steps = (0..3).map(|i| (format!("s{i}"), step_with_output(10))).collect();
        cache.put(key.clone(), run_row(), steps);
        let named: HashSet<String> = ["s1".to_string(), "nope".to_string()].into();
        let (_, taken) = cache.take(&key, &named).expect("held");
        assert_eq!(taken.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["s1"], "only what exists");
        assert_eq!(cache.runs[&key].steps.len(), 2, "the others stay");
        assert_eq!(cache.bytes, counted(&cache));
        // Not put back (the batch failed): the run is no longer held whole.
        assert!(cache.take(&key, &named).is_none());
        assert!(cache.is_empty() && cache.bytes == 0);
    }
}
