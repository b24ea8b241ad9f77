//! The run aggregate: a run's state folded from its events ([`RunState::apply`], no
//! decisions) and the decisions taken on it ([`RunState::decide`], [`RunState::lease`],
//! [`RunState::report`], [`RunState::time_out`]). The scheduler keeps runs' states and appends
//! their decisions; ingest takes a new run's first decision (the steps it can start at once) so
//! it goes into the log with the `RunSubmitted` itself.
//!
//! Final status rules: a run past its `timeout_seconds` ends `timed_out`; a run whose
//! cancellation was asked for ends `cancelled`; otherwise a
//! run with a failed (or timed-out) step that does not `continue_on_error` ends `failed`;
//! otherwise `succeeded`.
//!
//! # Layout
//! - this file: [`RunState`] and [`StepState`], folding and deciding; `topological_order`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use chrono::{DateTime, Utc};
use serde_json::json;
use taskmesh_events::command::{HandBack, Lease, LeaseDecision, ReportAck, ResultReport};
use taskmesh_events::expr::Scope;
use taskmesh_events::workflow::{StepDef, WorkflowDef};
use taskmesh_events::{
    Event, RunConcurrency, RunFinished, RunKey, StepAttemptFailed, StepAttemptLost, StepCancelled, StepDispatched,
    StepFailed, StepOutcome, StepSkipped, StepStarted, StepSucceeded,
};

/// Rounds of follow-up decisions [`RunState::decide_ahead`] gathers into one decision (one is
/// the rule: a decision's dispatches and skips cascade within it, and a run's end ends it).
pub const FOLLOW_UPS: usize = 4;

/// Where a step is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    /// Waiting for the steps it needs.
    Pending,
    /// On the dispatch queue, not yet started.
    Dispatched,
    Running,
    /// An attempt failed; the next dispatch is due at `retry_at`.
    Retrying,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl StepPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, StepPhase::Succeeded | StepPhase::Failed | StepPhase::Skipped | StepPhase::Cancelled)
    }

    fn as_str(self) -> &'static str {
        match self {
            StepPhase::Pending | StepPhase::Dispatched | StepPhase::Retrying => "queued",
            StepPhase::Running => "running",
            StepPhase::Succeeded => "succeeded",
            StepPhase::Failed => "failed",
            StepPhase::Skipped => "skipped",
            StepPhase::Cancelled => "cancelled",
        }
    }
}

/// One step's state.
#[derive(Debug, Clone)]
pub struct StepState {
    pub id: String,
    pub needs: Vec<usize>,
    pub phase: StepPhase,
    /// The current dispatch (0: never dispatched).
    pub dispatch: u32,
    /// The lease of the current (or last) attempt.
    pub lease: Option<Lease>,
    pub executor: Option<String>,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts abandoned because their executor was lost.
    pub lost: u32,
    /// Attempts given back unfinished by their executors as they stopped, not counted in `lost`.
    pub handed_back: u32,
    /// The last attempt recorded as lost (so deciding again never records it twice).
    pub last_lost: Option<u32>,
    pub retry_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub outputs: BTreeMap<String, String>,
}

/// What becomes of a pending step.
enum Verdict {
    Wait,
    Run,
    Skip(String),
    Fail(String),
}

/// Whether the run as a whole has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunPhase {
    Active,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

/// The state of one run, as its events say.
#[derive(Debug, Clone)]
pub struct RunState {
    pub key: RunKey,
    /// Stream sequence of its `RunSubmitted`.
    pub submitted_seq: u64,
    /// Stream sequence of the last event applied.
    pub last_seq: u64,
    pub workflow: WorkflowDef,
    pub inputs: serde_json::Value,
    /// No step starts before this (a delayed run).
    pub not_before: Option<DateTime<Utc>>,
    pub phase: RunPhase,
    pub started: bool,
    pub cancel_requested: bool,
    /// The cancellation came from the run's own timeout.
    pub timed_out: bool,
    /// What started the run.
    pub trigger: taskmesh_events::Trigger,
    /// The commit its `checkout` steps get, if it has one.
    pub checkout: Option<taskmesh_events::Checkout>,
    /// Its `cache:` steps run rather than reuse kept outcomes.
    pub refresh_cache: bool,
    /// Correlation and trace of the submission, carried by every event the run causes.
    pub correlation_id: Option<uuid::Uuid>,
    pub traceparent: Option<String>,
    /// The run's dispatch priority (a step's own overrides it).
    pub priority: i32,
    /// The run's concurrency group, if it has one.
    pub concurrency: Option<RunConcurrency>,
    /// The tenant's limit of concurrent runs, if the run counts against one.
    pub tenant_max_runs: Option<u32>,
    /// Whether its steps may start: always, unless the run waits for its concurrency group.
    pub admitted: bool,
    pub steps: Vec<StepState>,
    index: HashMap<String, usize>,
    /// Step indices in an order where every step comes after the steps it needs.
    topo: Vec<usize>,
    /// Each step's position in `topo`.
    topo_pos: Vec<usize>,
    /// The steps that need each step.
    dependents: Vec<Vec<usize>>,
    /// How many of each step's needs have not ended.
    open_needs: Vec<usize>,
    /// Steps a decision may act on: pending ones whose needs have all ended, and retrying
    /// ones; keyed by topological position. Deciding looks at these (and what they cascade
    /// to), never at the whole run.
    candidates: BTreeSet<(usize, usize)>,
    /// Steps not yet in a terminal phase.
    unfinished: usize,
}

impl RunState {
    /// A run's state from its first event, which must be `RunSubmitted`.
    pub fn from_submitted(key: RunKey, seq: u64, event: &Event) -> Option<Self> {
        let Event::RunSubmitted(submitted) = event else { return None };
        let workflow = submitted.workflow.clone();
        let index: HashMap<String, usize> = workflow.steps.iter().enumerate().map(|(i, s)| (s.id.clone(), i)).collect();
        let steps: Vec<StepState> = workflow
            .steps
            .iter()
            .map(|s| StepState {
                id: s.id.clone(),
                needs: s.needs.iter().filter_map(|n| index.get(n).copied()).collect(),
                phase: StepPhase::Pending,
                dispatch: 0,
                lease: None,
                executor: None,
                attempts: 0,
                lost: 0,
                handed_back: 0,
                last_lost: None,
                retry_at: None,
                exit_code: None,
                timed_out: false,
                outputs: BTreeMap::new(),
            })
            .collect();
        let mut steps = steps;
        for s in &mut steps {
            if let Some(reused) = submitted.reused.get(&s.id) {
                s.phase = StepPhase::Succeeded;
                s.exit_code = reused.outcome.exit_code;
                s.outputs = reused.outcome.outputs.clone();
            }
        }
        let topo = topological_order(&steps);
        let mut topo_pos = vec![0; steps.len()];
        for (pos, &i) in topo.iter().enumerate() {
            topo_pos[i] = pos;
        }
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
        for (i, s) in steps.iter().enumerate() {
            for &n in &s.needs {
                dependents[n].push(i);
            }
        }
        let open_needs: Vec<usize> =
            steps.iter().map(|s| s.needs.iter().filter(|&&n| !steps[n].phase.is_terminal()).count()).collect();
        let candidates = (0..steps.len())
            .filter(|&i| steps[i].phase == StepPhase::Pending && open_needs[i] == 0)
            .map(|i| (topo_pos[i], i))
            .collect();
        let unfinished = steps.iter().filter(|s| !s.phase.is_terminal()).count();
        let priority = submitted.priority.or(workflow.priority).unwrap_or(0);
        Some(Self {
            key,
            trigger: submitted.trigger.clone(),
            checkout: submitted.checkout.clone(),
            refresh_cache: submitted.refresh_cache,
            priority,
            concurrency: submitted.concurrency.clone(),
            tenant_max_runs: submitted.tenant_max_runs,
            admitted: !submitted.needs_admission(),
            topo_pos,
            dependents,
            open_needs,
            candidates,
            unfinished,
            not_before: submitted.not_before,
            submitted_seq: seq,
            last_seq: seq,
            inputs: serde_json::to_value(&submitted.inputs).unwrap_or_default(),
            workflow,
            phase: RunPhase::Active,
            started: false,
            cancel_requested: false,
            timed_out: false,
            correlation_id: None,
            traceparent: None,
            steps,
            index,
            topo,
        })
    }

    /// The step's position in the workflow (and in `steps`).
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub fn step(&self, id: &str) -> Option<&StepState> {
        self.index.get(id).map(|&i| &self.steps[i])
    }

    fn step_mut(&mut self, id: &str) -> Option<&mut StepState> {
        self.index.get(id).copied().map(move |i| &mut self.steps[i])
    }

    pub fn is_finished(&self) -> bool {
        self.phase != RunPhase::Active
    }

    /// Folds one event into the state. Makes no decisions.
    pub fn apply(&mut self, seq: u64, event: &Event) {
        self.last_seq = self.last_seq.max(seq);
        match event {
            Event::RunStarted(_) => self.started = true,
            Event::RunCancelRequested(e) => {
                self.cancel_requested = true;
                self.timed_out |= e.timed_out;
            }
            Event::RunAdmitted(_) => self.admitted = true,
            Event::StepDispatched(e) => {
                self.set_phase(&e.step, StepPhase::Dispatched);
                if let Some(s) = self.step_mut(&e.step) {
                    s.dispatch = e.dispatch;
                }
            }
            Event::StepStarted(e) => {
                self.started = true;
                self.set_phase(&e.step, StepPhase::Running);
                if let Some(s) = self.step_mut(&e.step) {
                    s.lease = Some(Lease { dispatch: e.dispatch, message: e.message, delivery: e.delivery });
                    s.executor = Some(e.executor.clone());
                    s.attempts = e.attempt;
                }
            }
            Event::StepAttemptLost(e) => {
                if let Some(s) = self.step_mut(&e.step)
                    && s.last_lost != Some(e.attempt)
                {
                    // One given back is not one lost to a failure.
                    if e.handed_back {
                        s.handed_back += 1;
                    } else {
                        s.lost += 1;
                    }
                    s.last_lost = Some(e.attempt);
                }
            }
            Event::StepAttemptFailed(e) => {
                self.set_phase(&e.step, StepPhase::Retrying);
                if let Some(s) = self.step_mut(&e.step) {
                    s.retry_at = Some(e.retry_at);
                }
            }
            Event::StepSucceeded(e) => self.finish_step(&e.step, StepPhase::Succeeded, Some(&e.outcome)),
            Event::StepFailed(e) => self.finish_step(&e.step, StepPhase::Failed, Some(&e.outcome)),
            Event::StepSkipped(e) => self.finish_step(&e.step, StepPhase::Skipped, None),
            Event::StepCancelled(e) => self.finish_step(&e.step, StepPhase::Cancelled, None),
            Event::RunSucceeded(_) => self.phase = RunPhase::Succeeded,
            Event::RunFailed(_) => self.phase = RunPhase::Failed,
            Event::RunCancelled(_) => self.phase = RunPhase::Cancelled,
            Event::RunTimedOut(_) => self.phase = RunPhase::TimedOut,
            _ => {}
        }
    }

    /// Moves a step to `phase`, keeping the dependency counts and the candidates current:
    /// O(the step's dependents).
    fn set_phase(&mut self, id: &str, phase: StepPhase) {
        let Some(&i) = self.index.get(id) else { return };
        let old = self.steps[i].phase;
        if old.is_terminal() {
            // Terminal is final: a late or repeated event changes nothing.
            return;
        }
        self.steps[i].phase = phase;
        self.candidates.remove(&(self.topo_pos[i], i));
        if phase == StepPhase::Retrying || (phase == StepPhase::Pending && self.open_needs[i] == 0) {
            self.candidates.insert((self.topo_pos[i], i));
        }
        if phase.is_terminal() {
            self.unfinished -= 1;
            // A step without a condition is skipped as soon as any need did not succeed, even
            // while others still run.
            let blocks =
                !(phase == StepPhase::Succeeded || (phase == StepPhase::Failed && self.def(i).continue_on_error));
            for k in 0..self.dependents[i].len() {
                let d = self.dependents[i][k];
                self.open_needs[d] -= 1;
                let pending = self.steps[d].phase == StepPhase::Pending;
                if pending && (self.open_needs[d] == 0 || (blocks && self.def(d).condition.is_none())) {
                    self.candidates.insert((self.topo_pos[d], d));
                }
            }
        }
    }

    /// The dispatch priority of step `i`: its own, else the run's.
    pub fn priority_of(&self, i: usize) -> i32 {
        self.def(i).priority.unwrap_or(self.priority)
    }

    /// How many steps the next decision looks at first (see `candidates`).
    pub fn candidate_count(&self) -> usize {
        self.candidates.len()
    }

    fn finish_step(&mut self, id: &str, phase: StepPhase, outcome: Option<&StepOutcome>) {
        self.set_phase(id, phase);
        if let Some(s) = self.step_mut(id)
            && let Some(o) = outcome
        {
            s.exit_code = o.exit_code;
            s.timed_out = o.timed_out;
            s.outputs = o.outputs.clone();
        }
    }

    fn def(&self, i: usize) -> &StepDef {
        &self.workflow.steps[i]
    }

    /// Whether step `n`, as `phase` has it, lets the steps that need it go on.
    fn ok(&self, phase: &dyn Fn(usize) -> StepPhase, n: usize) -> bool {
        let p = phase(n);
        p == StepPhase::Succeeded || (p == StepPhase::Failed && self.def(n).continue_on_error)
    }

    /// The steps the expressions of step `i` name, when every use of `steps` in them is
    /// `steps.<id>` or `steps['<id>']` with a literal id; `None` (every step) when an expression
    /// picks steps at run time (`steps[inputs.x]`, `steps.exists(...)`). Keeps a scope's cost
    /// in proportion to what the step refers to, not to the size of the run.
    fn referenced(&self, i: usize) -> Option<Vec<usize>> {
        let def = self.def(i);
        let templates = def.templates();
        let texts = def.condition.iter().chain(templates.iter().map(|(_, t)| *t));
        let mut out: Vec<usize> = Vec::new();
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        for text in texts {
            let mut from = 0;
            while let Some(at) = text[from..].find("steps").map(|k| k + from) {
                from = at + "steps".len();
                let before = text[..at].chars().next_back();
                let rest = &text[from..];
                if before.is_some_and(|c| word(c) || c == '.') || rest.starts_with(word) {
                    continue; // part of another name
                }
                let id = if let Some(r) = rest.strip_prefix('.') {
                    r.split(|c: char| !(word(c) || c == '-')).next().unwrap_or("")
                } else if let Some(r) = rest.strip_prefix("['").or_else(|| rest.strip_prefix("[\"")) {
                    r.split(['\'', '"']).next().unwrap_or("")
                } else {
                    return None;
                };
                // `steps.a-b` parses as `steps.a - b`: either reading may be meant.
                let candidates = std::iter::once(id).chain(id.split('-').take(1));
                let mut found = false;
                for c in candidates {
                    if let Some(&j) = self.index.get(c) {
                        found = true;
                        if !out.contains(&j) {
                            out.push(j);
                        }
                    }
                }
                if !found {
                    return None;
                }
            }
        }
        Some(out)
    }

    /// What expressions of step `i` see, given each step's `phase`.
    fn scope(&self, i: usize, phase: &dyn Fn(usize) -> StepPhase) -> Scope {
        let named = self.referenced(i).unwrap_or_else(|| (0..self.steps.len()).collect());
        let steps: serde_json::Map<String, serde_json::Value> = named
            .into_iter()
            .map(|j| {
                let (s, p) = (&self.steps[j], phase(j));
                let status = if p == StepPhase::Failed && s.timed_out { "timed_out" } else { p.as_str() };
                (s.id.clone(), json!({"status": status, "outputs": s.outputs, "exit_code": s.exit_code}))
            })
            .collect();
        let needs = &self.steps[i].needs;
        Scope {
            inputs: self.inputs.clone(),
            steps: serde_json::Value::Object(steps),
            run: json!({"id": self.key.run_id.to_string(), "workflow": self.workflow.name}),
            matrix: serde_json::to_value(&self.def(i).matrix_values).unwrap_or_default(),
            needs_succeeded: needs.iter().all(|&n| self.ok(phase, n)),
            needs_failed: needs.iter().any(|&n| phase(n) == StepPhase::Failed),
            cancelled: self.cancel_requested,
            event: serde_json::Value::Null,
        }
    }

    /// What step `i` checks out into its working directory: the run's commit, if the step
    /// asks for it.
    pub fn checkout_of(&self, i: usize) -> Option<taskmesh_events::Checkout> {
        self.def(i).checkout.enabled.then(|| self.checkout.clone()).flatten()
    }

    /// Step `i`'s definition with its `${{ }}` templates rendered for dispatch.
    pub fn render(&self, i: usize) -> Result<StepDef, String> {
        self.render_with(i, &|j| self.steps[j].phase)
    }

    fn render_with(&self, i: usize, phases: &dyn Fn(usize) -> StepPhase) -> Result<StepDef, String> {
        let def = self.def(i);
        let templated = def.templates().iter().any(|(_, t)| t.contains("${{"));
        if !templated {
            return Ok(def.clone());
        }
        let scope = self.scope(i, phases);
        let mut out = def.clone();
        for text in out.templates_mut() {
            if text.contains("${{") {
                *text = scope.render(text)?;
            }
        }
        Ok(out)
    }

    /// Applies `events` (decided on this state, not yet appended) ahead of their append. If the
    /// append fails, this state is ahead of the log: fold it afresh.
    pub fn apply_ahead(&mut self, events: &[Event]) {
        let seq = self.last_seq;
        for event in events {
            self.apply(seq, event);
        }
    }

    /// Decides what follows on this state, applying it ahead of its append (see
    /// [`RunState::apply_ahead`]), for up to [`FOLLOW_UPS`] rounds. Returns what follows, in
    /// order: one decision's worth, to append together with what led to it.
    pub fn decide_ahead(&mut self) -> Vec<Event> {
        let mut all = Vec::new();
        for _ in 0..FOLLOW_UPS {
            let more = self.decide();
            if more.is_empty() {
                break;
            }
            self.apply_ahead(&more);
            all.extend(more);
        }
        all
    }

    /// What follows from the state: ready steps are dispatched (their conditions hold), blocked
    /// ones skipped, failed attempts with retries left dispatched again, and a run whose steps
    /// all ended ends. Looks only at the candidates (steps whose needs have all ended, and
    /// retrying ones) and at what their skips cascade to, in dependency order: the cost is
    /// proportional to the steps the last events affected, not to the size of the run.
    pub fn decide(&self) -> Vec<Event> {
        if self.is_finished() {
            return Vec::new();
        }
        if self.cancel_requested {
            return self.decide_cancelled();
        }
        if !self.admitted {
            return Vec::new();
        }
        let mut changed: HashMap<usize, StepPhase> = HashMap::new();
        let mut events = Vec::new();
        let now = Utc::now();
        let mut work: BinaryHeap<Reverse<(usize, usize)>> = self.candidates.iter().copied().map(Reverse).collect();
        let mut newly_terminal = 0;
        while let Some(Reverse((_, i))) = work.pop() {
            let phase = |j: usize| changed.get(&j).copied().unwrap_or(self.steps[j].phase);
            let step = &self.steps[i];
            let id = step.id.clone();
            let next = match phase(i) {
                StepPhase::Retrying => {
                    events.push(Event::StepDispatched(StepDispatched {
                        step: id,
                        dispatch: step.dispatch + 1,
                        not_before: step.retry_at,
                    }));
                    StepPhase::Dispatched
                }
                StepPhase::Pending => match self.verdict(i, &phase) {
                    Verdict::Wait => continue,
                    Verdict::Run => {
                        let not_before = self.not_before.filter(|t| *t > now);
                        events.push(Event::StepDispatched(StepDispatched { step: id, dispatch: 1, not_before }));
                        StepPhase::Dispatched
                    }
                    Verdict::Skip(reason) => {
                        events.push(Event::StepSkipped(StepSkipped { step: id, reason }));
                        StepPhase::Skipped
                    }
                    Verdict::Fail(error) => {
                        let outcome =
                            StepOutcome { error: Some(error), started_at: now, finished_at: now, ..Default::default() };
                        events.push(Event::StepFailed(StepFailed { step: id, attempt: 0, outcome }));
                        StepPhase::Failed
                    }
                },
                _ => continue,
            };
            changed.insert(i, next);
            if next.is_terminal() {
                newly_terminal += 1;
                // What this step ended may now be decidable too (`verdict` says `Wait` for a
                // step whose needs have not all ended, unless one already blocks it).
                for &d in &self.dependents[i] {
                    work.push(Reverse((self.topo_pos[d], d)));
                }
            }
        }
        if self.unfinished == newly_terminal {
            let phase = |j: usize| changed.get(&j).copied().unwrap_or(self.steps[j].phase);
            events.push(self.finished(&phase));
        }
        events
    }

    /// Deciding on a run being cancelled: every step not running is cancelled, and once no
    /// step runs, the run ends. Happens once per run, so it may look at every step.
    fn decide_cancelled(&self) -> Vec<Event> {
        let mut phases: Vec<StepPhase> = self.steps.iter().map(|s| s.phase).collect();
        let mut events = Vec::new();
        for &i in &self.topo {
            if matches!(phases[i], StepPhase::Pending | StepPhase::Dispatched | StepPhase::Retrying) {
                phases[i] = StepPhase::Cancelled;
                events.push(Event::StepCancelled(StepCancelled {
                    step: self.steps[i].id.clone(),
                    reason: "the run was cancelled".into(),
                }));
            }
        }
        if phases.iter().all(|p| p.is_terminal()) {
            events.push(self.finished(&|j| phases[j]));
        }
        events
    }

    /// The run's final event, by the documented rules.
    fn finished(&self, phase: &dyn Fn(usize) -> StepPhase) -> Event {
        let failed_steps: Vec<String> = (0..self.steps.len())
            .filter(|&i| phase(i) == StepPhase::Failed && !self.def(i).continue_on_error)
            .map(|i| self.steps[i].id.clone())
            .collect();
        let finished = RunFinished { run_id: self.key.run_id, failed_steps };
        if self.timed_out {
            Event::RunTimedOut(finished)
        } else if self.cancel_requested {
            Event::RunCancelled(finished)
        } else if finished.failed_steps.is_empty() {
            Event::RunSucceeded(finished)
        } else {
            Event::RunFailed(finished)
        }
    }

    /// Whether pending step `i` runs now, waits, is skipped, or fails before running (a
    /// condition or template that cannot be evaluated).
    fn verdict(&self, i: usize, phases: &dyn Fn(usize) -> StepPhase) -> Verdict {
        let needs = &self.steps[i].needs;
        let needs_ended = needs.iter().all(|&n| phases(n).is_terminal());
        match &self.def(i).condition {
            None => {
                if let Some(&blocker) = needs.iter().find(|&&n| phases(n).is_terminal() && !self.ok(phases, n)) {
                    return Verdict::Skip(format!("needs '{}', which did not succeed", self.steps[blocker].id));
                }
                if !needs_ended {
                    return Verdict::Wait;
                }
            }
            Some(_) if !needs_ended => return Verdict::Wait,
            Some(cond) => match self.scope(i, phases).condition(cond) {
                Ok(true) => {}
                Ok(false) => return Verdict::Skip(format!("its condition '{cond}' is false")),
                Err(e) => return Verdict::Fail(e),
            },
        }
        match self.render_with(i, phases) {
            Ok(_) => Verdict::Run,
            Err(e) => Verdict::Fail(e),
        }
    }

    /// The timeout is up of the run submitted at `submitted_seq` (none: whichever run this
    /// is): cancel what is left, ending `timed_out`. Nothing for another run of the same id,
    /// submitted since under the same idempotency key.
    pub fn time_out(&self, submitted_seq: Option<u64>) -> ((), Vec<Event>) {
        if self.is_finished() || self.cancel_requested || submitted_seq.is_some_and(|s| s != self.submitted_seq) {
            return ((), Vec::new());
        }
        let reason = match self.workflow.timeout_seconds {
            Some(secs) => format!("the run timed out after {secs} s"),
            None => "the run passed the platform's longest run time (scheduler.max_run_seconds)".into(),
        };
        let event = Event::RunCancelRequested(taskmesh_events::RunCancelRequested {
            run_id: self.key.run_id,
            reason,
            key_id: None,
            timed_out: true,
        });
        ((), vec![event])
    }

    /// Decides a lease request. A delivery of the current dispatch message that is newer than
    /// the running attempt's means that attempt's executor stopped renewing its lease: the
    /// attempt is lost and a new one starts, unless the step has lost `max_lost` attempts.
    /// Deciding again on a state that already holds part of a decision adds only the rest.
    pub fn lease(&self, step_id: &str, lease: Lease, executor: &str, max_lost: u32) -> (LeaseDecision, Vec<Event>) {
        // `ack`: whether the executor may ack (delete) the message it holds.
        let deny = |reason: &str, ack: bool| (LeaseDecision::Denied { reason: reason.to_string(), ack }, Vec::new());
        let Some(step) = self.step(step_id) else { return deny("no such step", true) };
        if self.is_finished() || step.phase.is_terminal() {
            return deny("the step has finished", true);
        }
        if step.dispatch != lease.dispatch || !matches!(step.phase, StepPhase::Dispatched | StepPhase::Running) {
            return deny("superseded dispatch", true);
        }
        let mut events = Vec::new();
        if step.phase == StepPhase::Running {
            let current = step.lease.expect("a running step has a lease");
            if current.message != lease.message {
                return deny("a duplicate dispatch message", true);
            }
            if current.delivery == lease.delivery {
                return if step.executor.as_deref() == Some(executor) {
                    (LeaseDecision::Granted { attempt: step.attempts }, Vec::new())
                } else {
                    deny("leased by another executor", false)
                };
            }
            if lease.delivery < current.delivery {
                return deny("superseded delivery", false);
            }
            if step.last_lost != Some(step.attempts) {
                events.push(Event::StepAttemptLost(StepAttemptLost {
                    step: step.id.clone(),
                    attempt: step.attempts,
                    reason: "the executor stopped renewing its lease".into(),
                    handed_back: false,
                }));
            }
            if self.cancel_requested {
                events.push(Event::StepCancelled(StepCancelled {
                    step: step.id.clone(),
                    reason: "the run was cancelled".into(),
                }));
                return (LeaseDecision::Denied { reason: "the run was cancelled".into(), ack: true }, events);
            }
            let lost = if step.last_lost == Some(step.attempts) { step.lost } else { step.lost + 1 };
            if lost >= max_lost {
                let now = Utc::now();
                events.push(Event::StepFailed(StepFailed {
                    step: step.id.clone(),
                    attempt: step.attempts,
                    outcome: StepOutcome {
                        error: Some(if step.handed_back > 0 {
                            format!("lost its executor {lost} times (and was handed back {} times)", step.handed_back)
                        } else {
                            format!("lost its executor {lost} times")
                        }),
                        started_at: now,
                        finished_at: now,
                        ..Default::default()
                    },
                }));
                return (
                    LeaseDecision::Denied { reason: "the step lost its executor too often".into(), ack: true },
                    events,
                );
            }
        } else if self.cancel_requested {
            return deny("the run was cancelled", true);
        }
        let attempt = step.attempts + 1;
        events.push(Event::StepStarted(StepStarted {
            step: step.id.clone(),
            attempt,
            dispatch: lease.dispatch,
            message: lease.message,
            delivery: lease.delivery,
            executor: executor.to_string(),
            // The run starts with it: one append fewer than a `RunStarted` of its own.
            run_started: !self.started,
        }));
        (LeaseDecision::Granted { attempt }, events)
    }

    /// Decides an executor's hand-back of an attempt it stopped unfinished: only the holder of
    /// the current lease is heard. The attempt is recorded lost but, for the first
    /// [`HandBack::MAX`] of the step, not counted against its lost attempts; the dispatch
    /// message's next delivery starts the next attempt ([`RunState::lease`]).
    pub fn hand_back(&self, step_id: &str, lease: Lease) -> (ReportAck, Vec<Event>) {
        let Some(step) = self.step(step_id) else { return (ReportAck::Stale, Vec::new()) };
        if step.lease != Some(lease) || step.phase != StepPhase::Running || self.is_finished() {
            return (ReportAck::Stale, Vec::new());
        }
        // The same hand-back again (its reply was lost): recorded already.
        if step.last_lost == Some(step.attempts) {
            return (ReportAck::Recorded, Vec::new());
        }
        let counted = step.handed_back >= HandBack::MAX;
        let reason = if counted {
            format!(
                "its executor gave it back unfinished as it stopped (more than {} times: counted as lost)",
                HandBack::MAX
            )
        } else {
            "its executor gave it back unfinished as it stopped".to_string()
        };
        let lost = StepAttemptLost { step: step.id.clone(), attempt: step.attempts, reason, handed_back: !counted };
        (ReportAck::Recorded, vec![Event::StepAttemptLost(lost)])
    }

    /// Decides a result report: only the holder of the current lease is heard. A failure the
    /// step's retry policy covers, with attempts left and the run not being cancelled, becomes
    /// `StepAttemptFailed` with a jittered exponential backoff.
    pub fn report(&self, report: &ResultReport) -> (ReportAck, Vec<Event>) {
        let Some(i) = self.index.get(&report.step).copied() else { return (ReportAck::Stale, Vec::new()) };
        let step = &self.steps[i];
        if step.lease != Some(report.lease) {
            return (ReportAck::Stale, Vec::new());
        }
        match step.phase {
            StepPhase::Running if !self.is_finished() => {
                let (id, attempt, outcome) = (step.id.clone(), step.attempts, report.outcome.clone());
                let tries = attempt.saturating_sub(step.handed_back).max(1);
                let event = if report.succeeded {
                    Event::StepSucceeded(StepSucceeded { step: id, attempt, outcome })
                } else if self.cancel_requested || outcome.cancelled {
                    Event::StepCancelled(StepCancelled { step: id, reason: "the run was cancelled".into() })
                } else if let Some(policy) = self
                    .def(i)
                    .retry
                    .as_ref()
                    // Attempts handed back (not counted lost) are not tries either.
                    .filter(|p| tries < p.max_attempts && p.retries(outcome.exit_code, outcome.timed_out))
                {
                    let ceiling = policy.ceiling_ms(tries);
                    let jittered = ceiling / 2 + rand::random_range(0..=ceiling - ceiling / 2);
                    // The far end's `Retry-After` is honoured (up to a day).
                    let delay_ms = jittered.max(outcome.retry_after_ms.unwrap_or(0).min(86_400_000));
                    let retry_at = Utc::now() + chrono::Duration::milliseconds(delay_ms as i64);
                    Event::StepAttemptFailed(StepAttemptFailed { step: id, attempt, outcome, retry_at, delay_ms })
                } else {
                    Event::StepFailed(StepFailed { step: id, attempt, outcome })
                };
                (ReportAck::Recorded, vec![event])
            }
            // The same report again (its reply was lost): already recorded.
            StepPhase::Succeeded | StepPhase::Failed | StepPhase::Retrying | StepPhase::Cancelled => {
                (ReportAck::Recorded, Vec::new())
            }
            _ => (ReportAck::Stale, Vec::new()),
        }
    }
}

fn topological_order(steps: &[StepState]) -> Vec<usize> {
    // Workflows are validated acyclic at submission; Kahn's algorithm over the needs.
    let mut indegree: Vec<usize> = steps.iter().map(|s| s.needs.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, s) in steps.iter().enumerate() {
        for &n in &s.needs {
            dependents[n].push(i);
        }
    }
    let mut order: Vec<usize> = (0..steps.len()).filter(|&i| indegree[i] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        let i = order[next];
        next += 1;
        for &d in &dependents[i] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                order.push(d);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskmesh_events::{RunSubmitted, Trigger};
    use uuid::Uuid;

    fn run(yaml: &str) -> RunState {
        let workflow = WorkflowDef::parse_yaml(yaml).unwrap();
        let run_id = Uuid::now_v7();
        let event = Event::RunSubmitted(RunSubmitted::new(run_id, workflow, Trigger::Api { key_id: None }));
        RunState::from_submitted(RunKey { tenant: "t".into(), run_id }, 1, &event).unwrap()
    }

    #[test]
    fn a_deadline_times_out_only_the_run_submitted_when_it_was_armed() {
        // Submitted at sequence 1 (see `run`).
        let state = run("name: r\nsteps:\n  - {id: a, uses: noop}\n");
        let names =
            |(_, events): ((), Vec<Event>)| events.iter().map(|e| e.type_name().to_string()).collect::<Vec<_>>();
        assert_eq!(names(state.time_out(Some(1))), ["RunCancelRequested"]);
        assert_eq!(names(state.time_out(None)), ["RunCancelRequested"], "a timer armed before it said which");
        // An earlier run of the same id, whose events aged out, armed this one.
        assert!(names(state.time_out(Some(40))).is_empty());
    }

    fn apply_all(state: &mut RunState, events: &[Event]) {
        for e in events {
            let seq = state.last_seq + 1;
            state.apply(seq, e);
        }
    }

    fn names(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::StepDispatched(d) => format!("dispatch {}", d.step),
                Event::StepSkipped(s) => format!("skip {}", s.step),
                other => other.type_name().to_string(),
            })
            .collect()
    }

    fn finish(state: &mut RunState, step: &str, ok: bool) -> Vec<Event> {
        let lease = Lease { dispatch: 1, message: 7, delivery: 1 };
        let (_, ev) = state.lease(step, lease, "x", 3);
        apply_all(state, &ev);
        let now = chrono::Utc::now();
        let outcome = StepOutcome {
            exit_code: Some(if ok { 0 } else { 1 }),
            started_at: now,
            finished_at: now,
            ..Default::default()
        };
        let report = ResultReport {
            tenant: "t".into(),
            run_id: state.key.run_id,
            step: step.into(),
            lease,
            succeeded: ok,
            outcome,
        };
        let (_, ev) = state.report(&report);
        apply_all(state, &ev);
        let next = state.decide();
        apply_all(state, &next);
        next
    }

    const DIAMOND: &str = "name: d\nsteps:\n  - {id: a, run: 'true'}\n  - {id: b, run: 'true', needs: [a]}\n  - {id: c, run: 'true', needs: [a]}\n  - {id: d, run: 'true', needs: [b, c]}\n";

    #[test]
    fn diamond_dispatches_in_dependency_order() {
        let mut s = run(DIAMOND);
        let first = s.decide();
        assert_eq!(names(&first), ["dispatch a"]);
        apply_all(&mut s, &first);
        assert!(s.decide().is_empty(), "deciding twice adds nothing");
        assert_eq!(names(&finish(&mut s, "a", true)), ["dispatch b", "dispatch c"]);
        assert!(finish(&mut s, "b", true).is_empty());
        assert_eq!(names(&finish(&mut s, "c", true)), ["dispatch d"]);
        assert_eq!(names(&finish(&mut s, "d", true)), ["RunSucceeded"]);
    }

    #[test]
    fn failure_skips_dependents_transitively_and_fails_the_run() {
        let mut s = run(DIAMOND);
        let first = s.decide();
        apply_all(&mut s, &first);
        assert_eq!(names(&finish(&mut s, "a", false)), ["skip b", "skip c", "skip d", "RunFailed"]);
    }

    #[test]
    fn an_attempt_handed_back_is_not_counted_lost() {
        let mut s = run("name: x\nsteps:\n  - {id: a, run: 'sleep 60'}\n");
        let first = s.decide();
        apply_all(&mut s, &first);
        let l1 = Lease { dispatch: 1, message: 7, delivery: 1 };
        let (_, ev) = s.lease("a", l1, "e1", 1);
        apply_all(&mut s, &ev);
        // Not the current lease: nothing.
        let other = Lease { delivery: 9, ..l1 };
        assert!(matches!(s.hand_back("a", other), (ReportAck::Stale, ref e) if e.is_empty()));
        let (ack, ev) = s.hand_back("a", l1);
        assert!(matches!(ack, ReportAck::Recorded));
        assert!(matches!(&ev[..], [Event::StepAttemptLost(l)] if l.handed_back && l.attempt == 1), "{ev:?}");
        apply_all(&mut s, &ev);
        // Said again (its reply lost): nothing more.
        assert!(matches!(s.hand_back("a", l1), (ReportAck::Recorded, ref e) if e.is_empty()));
        // Its next delivery starts attempt 2, even where one lost attempt fails the step.
        let mut delivery = 2;
        let (d, ev) = s.lease("a", Lease { delivery, ..l1 }, "e2", 1);
        assert!(matches!(d, LeaseDecision::Granted { attempt: 2 }), "{d:?}");
        assert_eq!(names(&ev), ["StepStarted"]);
        apply_all(&mut s, &ev);
        assert_eq!((s.step("a").unwrap().lost, s.step("a").unwrap().handed_back), (0, 1));
        // Given back again and again: past `HandBack::MAX`, one counts, and fails the step here.
        for _ in 1..HandBack::MAX {
            let (_, ev) = s.hand_back("a", Lease { delivery, ..l1 });
            apply_all(&mut s, &ev);
            delivery += 1;
            let (d, ev) = s.lease("a", Lease { delivery, ..l1 }, "e2", 1);
            assert!(matches!(d, LeaseDecision::Granted { .. }), "{d:?}");
            apply_all(&mut s, &ev);
        }
        let (_, ev) = s.hand_back("a", Lease { delivery, ..l1 });
        assert!(matches!(&ev[..], [Event::StepAttemptLost(l)] if !l.handed_back), "{ev:?}");
        apply_all(&mut s, &ev);
        let (d, ev) = s.lease("a", Lease { delivery: delivery + 1, ..l1 }, "e3", 1);
        assert!(matches!(d, LeaseDecision::Denied { ack: true, .. }), "{d:?}");
        assert_eq!(names(&ev), ["StepFailed"]);
    }

    #[test]
    fn an_attempt_handed_back_is_not_a_try_of_the_retry_policy() {
        let mut s = run("name: x\nsteps:\n  - {id: a, run: 'false', retry: {max_attempts: 2}}\n");
        let first = s.decide();
        apply_all(&mut s, &first);
        let l1 = Lease { dispatch: 1, message: 7, delivery: 1 };
        let (_, ev) = s.lease("a", l1, "e1", 3);
        apply_all(&mut s, &ev);
        let (_, ev) = s.hand_back("a", l1);
        apply_all(&mut s, &ev);
        let l2 = Lease { delivery: 2, ..l1 };
        let (_, ev) = s.lease("a", l2, "e2", 3);
        apply_all(&mut s, &ev);
        let now = chrono::Utc::now();
        let outcome = StepOutcome { exit_code: Some(1), started_at: now, finished_at: now, ..Default::default() };
        let report = ResultReport {
            tenant: "t".into(),
            run_id: s.key.run_id,
            step: "a".into(),
            lease: l2,
            succeeded: false,
            outcome,
        };
        // Attempt 2, but its first try: the policy's second is still to come.
        assert_eq!(names(&s.report(&report).1), ["StepAttemptFailed"]);
    }

    #[test]
    fn leases_fence_stale_and_foreign_executors() {
        let mut s = run("name: x\nsteps:\n  - {id: a, run: 'true'}\n");
        let first = s.decide();
        apply_all(&mut s, &first);
        let l1 = Lease { dispatch: 1, message: 7, delivery: 1 };
        let (d, ev) = s.lease("a", l1, "e1", 3);
        assert!(matches!(d, LeaseDecision::Granted { attempt: 1 }));
        // The run's first start says the run started: no `RunStarted` of its own.
        assert_eq!(names(&ev), ["StepStarted"]);
        assert!(matches!(&ev[0], Event::StepStarted(e) if e.run_started));
        apply_all(&mut s, &ev);
        assert!(s.started);
        // The same request again is granted without new events; another executor is refused.
        assert!(matches!(s.lease("a", l1, "e1", 3), (LeaseDecision::Granted { attempt: 1 }, ref e) if e.is_empty()));
        assert!(matches!(s.lease("a", l1, "e2", 3).0, LeaseDecision::Denied { ack: false, .. }));
        // A duplicate message for the same dispatch is refused and may be acked away.
        let dup = Lease { dispatch: 1, message: 8, delivery: 1 };
        assert!(matches!(s.lease("a", dup, "e1", 3).0, LeaseDecision::Denied { ack: true, .. }));
        // Redelivery after a lost lease: attempt 2, attempt 1 recorded as lost.
        let l2 = Lease { dispatch: 1, message: 7, delivery: 2 };
        let (d, ev) = s.lease("a", l2, "e2", 3);
        assert!(matches!(d, LeaseDecision::Granted { attempt: 2 }));
        assert_eq!(names(&ev), ["StepAttemptLost", "StepStarted"]);
        assert!(matches!(&ev[1], Event::StepStarted(e) if !e.run_started));
        // Deciding again on a state holding only the first event adds only the rest.
        let mut partial = s.clone();
        apply_all(&mut partial, &ev[..1]);
        assert_eq!(names(&partial.lease("a", l2, "e2", 3).1), ["StepStarted"]);
        apply_all(&mut s, &ev);
        // The superseded holder is refused and must not ack the message.
        assert!(matches!(s.lease("a", l1, "e1", 3).0, LeaseDecision::Denied { ack: false, .. }));
        // A late report from attempt 1 is stale and changes nothing.
        let now = chrono::Utc::now();
        let outcome = StepOutcome { exit_code: Some(0), started_at: now, finished_at: now, ..Default::default() };
        let late = ResultReport {
            tenant: "t".into(),
            run_id: s.key.run_id,
            step: "a".into(),
            lease: l1,
            succeeded: true,
            outcome,
        };
        assert!(matches!(s.report(&late), (ReportAck::Stale, ref e) if e.is_empty()));
    }

    /// A chain of `n` noop steps, `s0` … `s{n-1}`.
    fn chain(n: usize) -> RunState {
        let mut yaml = String::from("name: chain\nsteps:\n  - {id: s0, uses: noop}\n");
        for i in 1..n {
            yaml.push_str(&format!("  - {{id: s{i}, needs: [s{}], uses: noop}}\n", i - 1));
        }
        run(&yaml)
    }

    #[test]
    fn a_2000_step_chain_decides_one_step_at_a_time() {
        let mut s = chain(2000);
        let first = s.decide();
        assert_eq!(names(&first), ["dispatch s0"]);
        apply_all(&mut s, &first);
        for i in 0..2000 {
            // Each decision looks at the one step the last result unblocked, not at the run.
            assert!(s.candidate_count() <= 1, "{} candidates after step {i}", s.candidate_count());
            let next = finish(&mut s, &format!("s{i}"), true);
            let want = if i == 1999 { "RunSucceeded".to_string() } else { format!("dispatch s{}", i + 1) };
            assert_eq!(names(&next), [want]);
        }
    }

    #[test]
    fn a_500_way_fan_out_dispatches_once_and_fans_in_once() {
        let mut yaml = String::from("name: fan\nsteps:\n  - {id: a, uses: noop}\n");
        for i in 0..500 {
            yaml.push_str(&format!("  - {{id: b{i}, needs: [a], uses: noop}}\n"));
        }
        let all: Vec<String> = (0..500).map(|i| format!("b{i}")).collect();
        yaml.push_str(&format!("  - {{id: c, needs: [{}], uses: noop}}\n", all.join(", ")));
        let mut s = run(&yaml);
        let first = s.decide();
        apply_all(&mut s, &first);
        let fanned = finish(&mut s, "a", true);
        assert_eq!(fanned.len(), 500);
        assert_eq!(s.candidate_count(), 0, "dispatched steps are no longer candidates");
        for (i, b) in all.iter().enumerate() {
            let next = finish(&mut s, b, true);
            if i < 499 {
                assert!(next.is_empty(), "nothing to do while {} of the fan-out run", 499 - i);
            } else {
                assert_eq!(names(&next), ["dispatch c"]);
            }
        }
        assert_eq!(names(&finish(&mut s, "c", true)), ["RunSucceeded"]);
    }

    #[test]
    fn a_failure_early_in_a_long_chain_skips_the_rest_in_one_decision() {
        let mut s = chain(1000);
        let first = s.decide();
        apply_all(&mut s, &first);
        let next = finish(&mut s, "s0", false);
        assert_eq!(next.len(), 1000, "999 skips and the run's end");
        assert_eq!(names(&next[998..]), ["skip s999", "RunFailed"]);
    }

    #[test]
    fn a_run_in_a_concurrency_group_waits_for_admission() {
        let mut s = run("name: g\nsteps:\n  - {id: a, uses: noop}\n");
        s.admitted = false;
        assert!(s.decide().is_empty(), "nothing starts before RunAdmitted");
        let run_id = s.key.run_id;
        apply_all(&mut s, &[Event::RunAdmitted(taskmesh_events::RunAdmitted { run_id })]);
        assert_eq!(names(&s.decide()), ["dispatch a"]);
    }

    #[test]
    fn a_failed_need_skips_its_dependent_while_other_needs_still_run() {
        let mut s = run(
            "name: x\nsteps:\n  - {id: a, uses: noop}\n  - {id: b, uses: noop}\n  - {id: c, needs: [a, b], uses: noop}\n",
        );
        let first = s.decide();
        apply_all(&mut s, &first);
        assert_eq!(names(&finish(&mut s, "a", false)), ["skip c"], "b still runs, c is skipped already");
        assert_eq!(names(&finish(&mut s, "b", true)), ["RunFailed"]);
    }

    #[test]
    fn an_expression_that_picks_steps_at_run_time_sees_every_step() {
        let yaml = "name: x\nsteps:\n  - {id: a, uses: noop, continue_on_error: true}\n  - {id: b, uses: noop}\n  - {id: c, needs: [a, b], if: \"steps[inputs.which].status == 'failed'\", uses: noop}\n";
        let mut s = run(yaml);
        s.inputs = json!({"which": "a"});
        assert!(s.referenced(2).is_none(), "a run-time pick of steps needs them all");
        let first = s.decide();
        apply_all(&mut s, &first);
        assert!(finish(&mut s, "a", false).is_empty());
        assert_eq!(names(&finish(&mut s, "b", true)), ["dispatch c"]);
        let named = run(
            "name: y\nsteps:\n  - {id: a, uses: noop}\n  - {id: b-2, uses: noop}\n  - {id: c, needs: [a], if: \"steps.a.status == 'succeeded' && steps['b-2'].status != 'x'\", uses: noop}\n",
        );
        assert_eq!(named.referenced(2), Some(vec![0, 1]));
    }
}
