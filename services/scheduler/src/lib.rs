//! The scheduler: runs' state machines. It reacts to run events (a durable pull consumer on
//! `{ns}.evt.*.run.*`), decides what follows (dispatch ready steps, skip blocked ones, finish
//! runs), grants executors their leases and records their results.
//!
//! Every decision is appended with expected-last-subject-sequence on the run's subject, so
//! several scheduler replicas can share the work: a replica that decided on a stale view gets a
//! conflict, reloads the run from the log and decides again. The state kept in memory is only a
//! cache of what the log says; a restarted scheduler rebuilds it from the log.
//!
//! # Layout
//! - [`state`]: the run aggregate (`apply`, `decide`, `lease`, `report`): the `taskmesh-run`
//!   crate, which ingest shares.
//! - `dispatch`: admission control: tenant limits, priorities, rate limits, concurrency
//!   groups; one leader replica at a time.
//! - `schedules`: cron schedules: arming ticks, handling each exactly once.
//! - [`retention`]: sweeps of the event log's part older than `nats.events_max_age_days`, and
//!   their timer (`arm`, `arm_after`, `SWEEP_EVERY`).
//! - this file: [`Scheduler`]: the cache, the reactor loop, the command handlers, the timers
//!   (`on_timer`; the sweep's, `sweep_on`).

mod dispatch;
pub mod retention;
mod schedules;
pub use taskmesh_run as state;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::{AckKind, Message};
use taskmesh_bus::{Bus, BusError, Stored};
use taskmesh_config::{LimitsSettings, SchedulerSettings};
use taskmesh_events::command::{
    CancelSignal, CommitState, CommitStatus, Dispatch, HandBack, LeaseDecision, LeaseRequest, Ready, ReadyStep,
    ReportAck, ResultReport, Timer, TimerKind,
};
use taskmesh_events::workflow::MAX_TIMEOUT_SECS;
use taskmesh_events::{ErrorCode, Event, EventMeta, Problem, RunKey, StepDispatched, Trigger};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use state::RunState;

/// The durable consumer the scheduler replicas share.
pub const CONSUMER: &str = "scheduler";
/// The durable consumer of schedule events.
pub const SCHEDULES: &str = "schedules";
/// The durable consumer of the timers queue.
pub const TIMERS: &str = "timers";
/// How long a delivered timer is the replica's before the queue gives it to another.
const TIMERS_ACK_WAIT: Duration = Duration::from_secs(30);
/// Longest a not-yet-due timer is handed back for before it is looked at again.
const TIMER_RECHECK: Duration = Duration::from_secs(300);
/// Longest a failed timer waits before it is tried again (see [`retry_after`]).
const TIMER_RETRY_MAX: Duration = Duration::from_secs(60);
/// Most timers whose failures in a row a replica counts at once (past it, it starts counting
/// afresh: their next waits are short again).
const TIMER_FAILURES_KEPT: usize = 10_000;
/// Most bytes of one `READY` entry of several steps (NATS's own limit on a message is 1 MiB by
/// default).
const READY_ENTRY_BYTES: usize = 256 * 1024;
/// Conflicts tolerated in a row before a decision is given up (and the event redelivered).
pub(crate) const MAX_CONFLICTS: usize = 16;

/// How long a timer that has failed `failures` times in a row waits before it is tried again:
/// a second, then twice as long each time, up to [`TIMER_RETRY_MAX`]. A failure that passes
/// (ingest restarting) is retried at once, however late the timer already is; one that lasts
/// (a tick's run that cannot be submitted) is not retried every second for as long.
fn retry_after(failures: u32) -> Duration {
    Duration::from_secs(1u64 << (failures.clamp(1, 7) - 1)).min(TIMER_RETRY_MAX)
}

/// When a run submitted at `submitted` is due to time out after `secs`. At most
/// [`MAX_TIMEOUT_SECS`] on: a submission validated before that bound (or an operator's
/// `scheduler.max_run_seconds`) may name a time past the calendar's end, which would otherwise
/// panic the scheduler on every delivery of the run's submission.
fn deadline_of(submitted: chrono::DateTime<chrono::Utc>, secs: u64) -> chrono::DateTime<chrono::Utc> {
    let secs = secs.min(MAX_TIMEOUT_SECS) as i64;
    submitted.checked_add_signed(chrono::Duration::seconds(secs)).unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// How often each timer (by its message's stream sequence) failed in a row on this replica,
/// for at most [`TIMER_FAILURES_KEPT`] timers (past it, counting starts afresh).
#[derive(Default)]
struct TimerFailures(std::sync::Mutex<HashMap<u64, u32>>);

impl TimerFailures {
    /// Counts one more failure of the timer `seq` (a timer without one counts as its first):
    /// how long it waits before it is tried again, and its failures in a row.
    fn failed(&self, seq: Option<u64>) -> (Duration, u32) {
        let mut failures = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= TIMER_FAILURES_KEPT {
            failures.clear();
        }
        let n = seq.map_or(1, |s| {
            let n = failures.entry(s).or_default();
            *n += 1;
            *n
        });
        (retry_after(n), n)
    }

    /// Forgets the timer `seq`'s failures: it is done with.
    fn succeeded(&self, seq: Option<u64>) {
        if let Some(s) = seq {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&s);
        }
    }
}

/// A scheduler replica.
#[derive(Clone)]
pub struct Scheduler {
    bus: Bus,
    settings: SchedulerSettings,
    limits: LimitsSettings,
    cache: Arc<Cache>,
    /// Schedules' states as last folded (see [`taskmesh_ingest::schedules::Folded`]).
    schedules: Arc<taskmesh_ingest::schedules::Folded>,
    /// How often each timer (by its stream sequence) failed in a row here (see [`retry_after`]).
    timer_failures: Arc<TimerFailures>,
    /// Whether this replica is sweeping the event log (see [`Scheduler::sweep_on`]).
    sweeping: Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when the replica stops (set by [`Scheduler::run`]): ends a sweep.
    stopping: CancellationToken,
    /// Tasks [`Scheduler::run`] waits for as it stops (a sweep handing its timer back).
    tasks: tokio_util::task::TaskTracker,
}

/// The runs this replica has in memory, each behind its own lock: work on one run (its events,
/// its executors' leases and reports) is serialised, while different runs proceed side by side.
#[derive(Default)]
struct Cache {
    runs: std::sync::Mutex<HashMap<RunKey, Arc<Entry>>>,
}

/// One run's place in the cache: its slot, and the commands waiting for it.
#[derive(Default)]
struct Entry {
    /// Commands (leases, reports, a run's time-out) that arrived while the slot was held, in
    /// order of arrival: the next command to take the slot decides them all at once (see
    /// [`Scheduler::command`]). Bounded by how many commands the servers handle at once.
    waiting: std::sync::Mutex<Vec<Box<dyn Pending>>>,
    slot: Mutex<Slot>,
}

/// A command on a run (an executor's lease or report, or the run's time-out), waiting to be
/// decided.
trait Pending: Send {
    /// Decides the command on `state`: its events (none for a refusal or a repeated request).
    /// Its answer is kept for [`Pending::answer`]; a later decision replaces it.
    fn decide(&mut self, state: &RunState) -> Vec<Event>;
    /// Sends whoever waits the answer last decided, or `problem`.
    fn answer(self: Box<Self>, problem: Option<Problem>);
    /// Whether nobody waits for the answer any more (the asker's task was dropped).
    fn abandoned(&self) -> bool;
}

/// A [`Pending`] command deciding with `decide`, answered through `answered`.
struct Command<R, F> {
    decide: F,
    decided: Option<R>,
    answered: tokio::sync::oneshot::Sender<Result<R, Problem>>,
}

impl<R, F> Pending for Command<R, F>
where
    R: Send,
    F: Fn(&RunState) -> (R, Vec<Event>) + Send,
{
    fn decide(&mut self, state: &RunState) -> Vec<Event> {
        let (answer, events) = (self.decide)(state);
        self.decided = Some(answer);
        events
    }

    fn answer(self: Box<Self>, problem: Option<Problem>) {
        // Every command is decided before it is answered without a problem.
        let answer = match problem {
            Some(problem) => Err(problem),
            None => self.decided.ok_or_else(|| Problem::new(ErrorCode::Internal, "a command answered undecided")),
        };
        // Whoever asked may have stopped waiting.
        let _ = self.answered.send(answer);
    }

    fn abandoned(&self) -> bool {
        self.answered.is_closed()
    }
}

/// One run's cached state.
#[derive(Default)]
struct Slot {
    /// `None` until loaded (or when the log has no such run).
    state: Option<RunState>,
    /// Dispatches (step, dispatch n) this process has enqueued, so the reactor does not
    /// enqueue them again.
    enqueued: HashSet<(String, u32)>,
    /// The sequence of the `RunSubmitted` last folded: another one means another run of the
    /// same id (see [`Slot::fold`]).
    submitted_seq: u64,
}

/// Lanes of the run-event reactor: events of one run in order, different runs side by side.
const REACTOR_LANES: taskmesh_bus::Lanes = taskmesh_bus::Lanes { count: 32, depth: 16 };

impl Scheduler {
    pub fn new(bus: Bus, settings: SchedulerSettings, limits: LimitsSettings) -> Self {
        Self {
            bus,
            settings,
            limits,
            cache: Arc::new(Cache::default()),
            schedules: Default::default(),
            timer_failures: Default::default(),
            sweeping: Default::default(),
            stopping: CancellationToken::new(),
            tasks: Default::default(),
        }
    }

    /// Runs the reactor and the lease/report handlers until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Its own token: cancelled by `shutdown`, and as the replica stops for any reason.
        self.stopping = shutdown.child_token();
        let lease = self.serve_command("lease", &shutdown, |me, req: LeaseRequest| async move { me.lease(req).await });
        let report =
            self.serve_command("report", &shutdown, |me, req: ResultReport| async move { me.report(req).await });
        let hand_back =
            self.serve_command("handback", &shutdown, |me, req: HandBack| async move { me.hand_back(req).await });
        let reactor = self.clone().react(shutdown.clone());
        let timers = self.clone().timers(shutdown.clone());
        let schedules = self.clone().schedules(shutdown.clone());
        let retention = self.clone().retention(shutdown.clone());
        let dispatcher = dispatch::Dispatcher::new(self.bus.clone(), self.settings.clone(), self.limits.clone())
            .run(shutdown.clone());
        let ran = tokio::try_join!(lease, report, hand_back, reactor, timers, schedules, retention, dispatcher);
        self.stopping.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        ran?;
        Ok(())
    }

    /// Serves the executors' command `cmd.scheduler.{name}` with `handle` (on a clone of this
    /// scheduler), 64 at a time, until `shutdown`.
    async fn serve_command<Req, Resp, H, Fut>(
        &self,
        name: &str,
        shutdown: &CancellationToken,
        handle: H,
    ) -> anyhow::Result<()>
    where
        Req: serde::de::DeserializeOwned + Send + 'static,
        Resp: serde::Serialize + Send + 'static,
        H: Fn(Scheduler, Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Resp, Problem>> + Send + 'static,
    {
        let me = self.clone();
        let subject = self.bus.namespace().scheduler_command(name);
        let handler = move |_, req| handle(me.clone(), req);
        Ok(taskmesh_bus::serve(&self.bus, subject, "scheduler", 64, shutdown.clone().cancelled_owned(), handler)
            .await?)
    }

    /// With `nats.events_max_age_days` set, arms the event log's sweep ([`retention::arm`]),
    /// due a minute later, unless it is armed already, as the replica starts and hourly after
    /// that (so a timer lost, taken out by a version that did not know it, comes back). The
    /// replica the timer is delivered to sweeps ([`Scheduler::sweep_on`]).
    async fn retention(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if self.bus.settings().events_max_age_days == 0 {
            return Ok(());
        }
        loop {
            let due = chrono::Utc::now() + chrono::Duration::seconds(60);
            match retention::arm(&self.bus, due).await {
                Ok(true) => tracing::info!(%due, "armed the event log's sweep"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "arming the event log's sweep failed; trying again in an hour"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(retention::SWEEP_EVERY) => {}
            }
        }
    }

    /// The event log's sweep timer, due. The sweep runs in a task of its own (on a long log it
    /// takes a while, and the timers behind this one must not wait for it), the timer kept in
    /// progress meanwhile, so no other replica takes it. Once the sweep is done, or has failed,
    /// the next timer, due in [`retention::SWEEP_EVERY`], is put after this one (expecting it
    /// to be the subject's last, so the subject never goes empty for a replica to arm another
    /// meanwhile), and this one acked. (Handed back with a delay instead, it could have the
    /// progress ack the consumer sends as this returns arrive after that, and shorten the delay
    /// to the ack wait.) Should that fail, it is handed back for as long. A timer that is not
    /// its subject's last (a next one was put after it already, by a sweep whose ack was lost,
    /// or two armed at once) is acked without a sweep. A replica that stops mid-sweep ends it
    /// before its next removal (the runs removed recorded) and hands the timer back, for
    /// another to sweep; one that dies leaves it to be delivered again once its ack wait has
    /// run out. With retention turned off here, the timer is taken out.
    async fn sweep_on(&self, msg: &Arc<Message>) -> AckKind {
        use std::sync::atomic::Ordering::SeqCst;
        let days = self.bus.settings().events_max_age_days;
        if days == 0 {
            return AckKind::Ack;
        }
        let seq = match msg.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => {
                tracing::error!(error = %e, "a sweep timer without its delivery's details; terminating it");
                return AckKind::Term;
            }
        };
        let ns = self.bus.namespace();
        match self.bus.last_seq_in(&ns.timers_stream(), &ns.sweep_timer()).await {
            Ok(last) if last != seq => return AckKind::Ack,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading the event log's sweep timers failed; trying again");
                return AckKind::Nak(Some(Duration::from_secs(1)));
            }
        }
        if self.sweeping.swap(true, SeqCst) {
            // Delivered again while this replica sweeps (its progress acks did not arrive).
            return AckKind::Progress;
        }
        let (me, msg) = (self.clone(), msg.clone());
        self.tasks.spawn(async move {
            let cutoff = chrono::Utc::now() - chrono::Duration::days(days.min(1_000_000) as i64);
            // A stop ends it before its next removal (see `sweep_unless_stopped`).
            let sweep = retention::sweep_unless_stopped(&me.bus, cutoff, &me.stopping);
            tokio::pin!(sweep);
            let mut progress = tokio::time::interval_at(
                tokio::time::Instant::now() + TIMERS_ACK_WAIT / 3,
                TIMERS_ACK_WAIT / 3,
            );
            let swept = loop {
                tokio::select! {
                    swept = &mut sweep => break swept,
                    _ = progress.tick() => {
                        if let Err(e) = msg.ack_with(AckKind::Progress).await {
                            tracing::warn!(error = %e, "keeping the event log's sweep timer failed");
                        }
                    }
                }
            };
            let stopped = matches!(&swept, Ok(s) if s.stopped);
            match swept {
                // Stopped: another replica takes it over, and starts over.
                Ok(swept) if swept.stopped => {
                    tracing::info!(?swept, "stopped sweeping the event log; handing the sweep to another replica");
                }
                Ok(swept) => {
                    tracing::info!(?swept, %cutoff, "swept the event log");
                    let removed =
                        [("runs", swept.runs as u64), ("deleted", swept.deleted as u64), ("records", swept.records)];
                    for (what, n) in removed {
                        metrics::counter!("taskmesh_event_log_swept_total", "what" => what).increment(n);
                    }
                    metrics::counter!("taskmesh_event_log_sweeps_total", "outcome" => "done").increment(1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sweeping the event log failed; trying again in an hour");
                    metrics::counter!("taskmesh_event_log_sweeps_total", "outcome" => "failed").increment(1);
                }
            }
            let handed_back = if stopped {
                msg.ack_with(AckKind::Nak(None)).await.err().map(|e| e.to_string())
            } else {
                let next =
                    chrono::Utc::now() + chrono::Duration::from_std(retention::SWEEP_EVERY).unwrap_or_default();
                let rearmed = async {
                    // `false`: another was put after this one since (see above).
                    retention::arm_after(&me.bus, seq, next).await?;
                    msg.double_ack().await.map_err(|e| BusError::Nats(format!("acking the sweep's timer: {e}")))
                };
                match rearmed.await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "arming the next sweep of the event log failed; handing this one back for as long");
                        msg.ack_with(AckKind::Nak(Some(retention::SWEEP_EVERY))).await.err().map(|e| e.to_string())
                    }
                }
            };
            if let Some(e) = handed_back {
                tracing::warn!(error = %e, "handing back the event log's sweep timer failed; it comes back after its ack wait");
            }
            me.sweeping.store(false, SeqCst);
        });
        AckKind::Progress
    }

    /// Consumes run events and acts on them, acking each only once its consequences are in
    /// the log. The consumer delivers from the log's start when first created, so runs
    /// submitted before any scheduler ever ran are scheduled too.
    async fn react(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ns = self.bus.namespace();
        let config = PullConfig {
            filter_subject: ns.runs_all(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(self.settings.event_ack_wait_secs.max(1)),
            max_ack_pending: 10_000,
            ..Default::default()
        };
        let me = &self;
        taskmesh_bus::consume_in_lanes(
            &self.bus,
            &ns.events_stream(),
            CONSUMER,
            config,
            256,
            REACTOR_LANES,
            shutdown.cancelled(),
            |msg| async move { me.on_message(&msg).await },
        )
        .await;
        Ok(())
    }

    /// Consumes the timers queue: a timer not yet due is handed back with a nak delayed until
    /// it is; a due one is acted on, then acked.
    async fn timers(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ns = self.bus.namespace();
        let config = PullConfig {
            filter_subject: ns.timers_all(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: TIMERS_ACK_WAIT,
            max_deliver: -1,
            ..Default::default()
        };
        let me = &self;
        taskmesh_bus::consume(
            &self.bus,
            &ns.timers_stream(),
            TIMERS,
            config,
            256,
            shutdown.cancelled(),
            |msg| async move { me.on_timer(&msg).await },
        )
        .await;
        Ok(())
    }

    /// Arms timers for created and resumed schedules (consumer `schedules`, from the log's start).
    async fn schedules(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ns = self.bus.namespace();
        let config = PullConfig {
            filter_subject: ns.schedules_all(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        };
        let me = &self;
        taskmesh_bus::consume(
            &self.bus,
            &ns.events_stream(),
            SCHEDULES,
            config,
            64,
            shutdown.cancelled(),
            |msg| async move { me.on_schedule_message(&msg).await },
        )
        .await;
        Ok(())
    }

    /// A timer not yet due goes back with a nak delayed until it is; a due one is fired.
    async fn on_timer(&self, msg: &Arc<Message>) -> AckKind {
        let timer = match serde_json::from_slice::<Timer>(&msg.payload) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "undecodable timer; terminating it");
                return AckKind::Term;
            }
        };
        if let Ok(wait) = (timer.due - chrono::Utc::now()).to_std()
            && wait > Duration::from_millis(5)
        {
            // A run's deadline is looked at again every few minutes, and dropped once the run
            // has ended, so the timers queue holds only live runs' deadlines.
            if let TimerKind::RunTimeout { run_id, .. } = timer.kind
                && msg.info().is_ok_and(|i| i.delivered > 1)
            {
                let key = RunKey { tenant: timer.tenant.clone(), run_id };
                if let Ok(Some(last)) = self.bus.last(&self.bus.namespace().run(&key)).await
                    && last.envelope.event.is_run_terminal()
                {
                    return AckKind::Ack;
                }
            }
            return AckKind::Nak(Some(wait.min(TIMER_RECHECK)));
        }
        if timer.kind == TimerKind::EventLogSweep {
            return self.sweep_on(msg).await;
        }
        let fired = self.fire(&timer).await;
        // Failures in a row are counted by the timer's message, on this replica (another's, or
        // one restarted, starts again at a second).
        let seq = msg.info().map(|i| i.stream_sequence).ok();
        match fired {
            Err(p) if p.code != ErrorCode::NotFound => {
                let (wait, failures) = self.timer_failures.failed(seq);
                tracing::warn!(problem = %p, ?wait, failures, "timer failed; retrying");
                AckKind::Nak(Some(wait))
            }
            done => {
                self.timer_failures.succeeded(seq);
                if done.is_ok() { AckKind::Ack } else { AckKind::Term }
            }
        }
    }

    async fn on_schedule_message(&self, msg: &Message) -> AckKind {
        let stored = match taskmesh_bus::decode(msg) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "undecodable schedule event; terminating it");
                return AckKind::Term;
            }
        };
        let armed = async {
            for stored in &stored {
                self.on_schedule_event(stored).await?;
            }
            Ok::<_, BusError>(())
        };
        match armed.await {
            Ok(()) => AckKind::Ack,
            Err(e) => {
                tracing::warn!(error = %e, "arming a schedule failed; retrying");
                AckKind::Nak(Some(Duration::from_secs(1)))
            }
        }
    }

    async fn fire(&self, timer: &Timer) -> Result<(), Problem> {
        match &timer.kind {
            TimerKind::RunTimeout { run_id, submitted_seq } => {
                let key = RunKey { tenant: timer.tenant.clone(), run_id: *run_id };
                let submitted_seq = *submitted_seq;
                self.command(&key, move |state| state.time_out(submitted_seq)).await
            }
            TimerKind::ScheduleTick { schedule_id, tick } => self.tick(&timer.tenant, *schedule_id, *tick).await,
            // Taken by `on_timer` before it comes here.
            TimerKind::EventLogSweep => Ok(()),
        }
    }

    /// Handles one delivered message of run events (one event, or a commit's several); says
    /// how to ack it.
    async fn on_message(&self, msg: &Message) -> AckKind {
        let commit = match taskmesh_bus::decode(msg) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "undecodable event; terminating it");
                return AckKind::Term;
            }
        };
        let span = tracing::info_span!(
            "react",
            seq = commit[0].seq,
            r#type = commit[0].envelope.type_name(),
            events = commit.len()
        );
        taskmesh_telemetry::set_parent(&span, commit[0].envelope.traceparent.as_deref());
        match self.on_event(&commit).instrument(span).await {
            Ok(()) => AckKind::Ack,
            Err(e) => {
                tracing::warn!(error = %e, "could not process event; it will be redelivered");
                AckKind::Nak(Some(Duration::from_millis(500)))
            }
        }
    }

    /// Applies one delivered message's events (a commit: one or more, all of one run) and
    /// appends whatever follows from them.
    pub async fn on_event(&self, commit: &[Stored]) -> Result<(), BusError> {
        let ns = self.bus.namespace();
        let Some(first) = commit.first() else { return Ok(()) };
        let Some(key) = ns.parse_run(&first.envelope.subject) else { return Ok(()) };
        let result = self.on_run_commit(&key, commit).await;
        self.cache.evict(self.settings.cache_runs);
        result
    }

    async fn on_run_commit(&self, key: &RunKey, commit: &[Stored]) -> Result<(), BusError> {
        let entry = self.cache.entry(key);
        let mut slot = entry.slot.lock().await;
        let slot = &mut *slot;
        if slot.ensure(&self.bus, key, Some(commit)).await?.is_none() {
            tracing::warn!(subject = %commit[0].envelope.subject, "events for a run with no RunSubmitted");
            return Ok(());
        }
        let last = &commit[commit.len() - 1];
        let meta = EventMeta::caused_by(&last.envelope);
        // What the events ask of the world (a new run's deadline, a commit status, a run's end)
        // and the steps they dispatched go out at once, each seen through whether the other
        // fails: the commit counts as handled (is acked) only once both are done, so a failure
        // of either has the commit delivered again. Steps that went out are not sent again by
        // this replica then (however long the other keeps failing: the queues' deduplication
        // lasts only their window), and a step that started meanwhile keeps its run's
        // deadline, armed by a redelivery. (`enqueue_dispatched`, apart: its publish and its
        // markers around the effects, which borrow the slot.)
        let (markers, entries) = ready_entries(slot, key, commit.iter().map(|s| &s.envelope.event), &meta)?;
        let effects = async {
            for stored in commit {
                self.on_run_event(slot, key, stored).await?;
            }
            Ok::<_, BusError>(())
        };
        let (effects, ready) = tokio::join!(effects, self.publish_ready(key, &entries, &meta));
        ready?;
        slot.enqueued.extend(markers);
        effects?;
        self.decide_and_append(slot, key, &meta).await
    }

    /// What one event asks of the world beyond the run's own log (admission, deadlines,
    /// cancellation signals, announcing the end), done before the event is acked; the steps a
    /// commit dispatched are enqueued at the same time (see `on_run_commit`).
    async fn on_run_event(&self, slot: &Slot, key: &RunKey, stored: &Stored) -> Result<(), BusError> {
        let state = slot.state.as_ref().expect("ensured");
        match &stored.envelope.event {
            Event::RunSubmitted(submitted) if !state.is_finished() => {
                let ns = self.bus.namespace();
                // Its admission (when it needs one) and its deadline are independent: both go
                // out together.
                let admission = async {
                    if state.admitted {
                        return Ok(());
                    }
                    let ready = Ready::Run {
                        tenant: key.tenant.clone(),
                        run_id: key.run_id,
                        concurrency: submitted.concurrency.clone(),
                        tenant_max_runs: submitted.tenant_max_runs,
                    };
                    self.bus
                        .enqueue(ns.ready(&key.tenant), &format!("run:{}", key.run_id), &ready, None)
                        .await
                        .map(|_| ())
                };
                // Every run has a deadline: its own timeout, or the platform's longest run time.
                let deadline = async {
                    let limit =
                        submitted.workflow.timeout_seconds.or(Some(self.settings.max_run_seconds).filter(|s| *s > 0));
                    let Some(secs) = limit else { return Ok(()) };
                    let timer = Timer {
                        tenant: key.tenant.clone(),
                        due: deadline_of(stored.envelope.occurred_at, secs),
                        kind: TimerKind::RunTimeout { run_id: key.run_id, submitted_seq: Some(stored.seq) },
                    };
                    // Named by the submission too: a run its idempotency key submitted again
                    // under the same id (the first's events aged out) has a deadline of its own.
                    let msg_id = format!("timeout:{}:{}", key.run_id, stored.seq);
                    self.bus.enqueue(ns.timer(&key.tenant), &msg_id, &timer, None).await.map(|_| ())
                };
                let status = self.report_status(
                    key,
                    &submitted.trigger,
                    &submitted.workflow.name,
                    CommitState::Pending,
                    &stored.envelope,
                );
                tokio::try_join!(admission, deadline, status)?;
            }
            // Running steps are killed where they run; their executors report them cancelled.
            Event::RunCancelRequested(_) if !state.is_finished() => {
                let signal = CancelSignal { tenant: key.tenant.clone(), run_id: key.run_id };
                let body = serde_json::to_vec(&signal).expect("serialises");
                if let Err(e) = self.bus.client().publish(self.bus.namespace().cancel_signals(), body.into()).await {
                    tracing::warn!(error = %e, "could not signal executors to cancel");
                }
            }
            // A run leaving its concurrency group makes room for the next.
            Event::RunSucceeded(_) | Event::RunFailed(_) | Event::RunCancelled(_) | Event::RunTimedOut(_) => {
                if matches!(stored.envelope.event, Event::RunCancelled(_) | Event::RunTimedOut(_)) {
                    // Steps of the run still held for admission need not go out at all.
                    let signal = CancelSignal { tenant: key.tenant.clone(), run_id: key.run_id };
                    let body = serde_json::to_vec(&signal).expect("serialises");
                    let _ = self.bus.client().publish(self.bus.namespace().run_ended_signals(), body.into()).await;
                }
                // The notifier learns of the end from a queue of its own rather than by reading
                // every run event: announced before this event is acked, so a crash in between
                // announces it again (the message id deduplicates; a notifier in this process,
                // handed it directly, deduplicates its deliveries). Independent of leaving the
                // groups: both go out together.
                let env = &stored.envelope;
                let (ns, msg_id) = (self.bus.namespace(), format!("ended:{}", env.id));
                let stream = ns.ended_stream();
                let announce =
                    self.bus.hand_over(&stream, ns.ended(&key.tenant), &msg_id, env, env.traceparent.as_deref());
                let (end, status) =
                    env.event.run_end().unwrap_or((CommitState::Failure, taskmesh_events::Status::Failed));
                tokio::try_join!(leave_groups(&self.bus, key, state), announce)?;
                self.report_status(key, &state.trigger, &state.workflow.name, end, env).await?;
                // Counted once its end was handled (a redelivery after a crash counts again).
                metrics::counter!("taskmesh_runs_finished_total", "status" => status.as_str()).increment(1);
            }
            // Admitted after it ended (it was cancelled while the dispatcher admitted it): the
            // places it was given are left again, or nobody would ever free them.
            Event::RunAdmitted(_) if state.is_finished() => leave_groups(&self.bus, key, state).await?,
            _ => {}
        }
        Ok(())
    }

    /// Enqueues a webhook-triggered run's `state` for its commit (see [`CommitStatus`]), once
    /// per event (`event`'s id deduplicates it); nothing for runs other triggers started, or
    /// whose connection has no status token. A `pending` that cannot be enqueued is logged and
    /// dropped, so it never holds a run's start up; an outcome fails, so the end is handled
    /// again (after the run's groups were left and its end announced).
    async fn report_status(
        &self,
        key: &RunKey,
        trigger: &Trigger,
        workflow: &str,
        state: CommitState,
        event: &taskmesh_events::Envelope,
    ) -> Result<(), BusError> {
        let Some(status) = CommitStatus::of_run(key, trigger, workflow, state)
            .filter(|_| matches!(trigger, Trigger::Webhook { reports_status: true, .. }))
        else {
            return Ok(());
        };
        let ns = self.bus.namespace();
        let msg_id = format!("status:{}", event.id);
        match self.bus.enqueue(ns.delivery(&key.tenant), &msg_id, &status, event.traceparent.as_deref()).await {
            Ok(_) => Ok(()),
            Err(e) if state == CommitState::Pending => {
                tracing::warn!(error = %e, run = %key.run_id, "a pending commit status could not be enqueued; it is not reported");
                Ok(())
            }
            // The tenant's deliveries fill its share of the queue (a forge refusing them for
            // hours, say), or all deliveries fill the queue: the outcome is dropped rather than
            // holding up the run's end (a retry of its pending status still sends it).
            Err(e @ (BusError::SubjectFull(_) | BusError::Full(_))) => {
                tracing::error!(error = %e, run = %key.run_id, tenant = %key.tenant, "the delivery queue is full; the run's commit status is dropped");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Decides on the run's current state and appends the decisions, retrying on conflicts.
    async fn decide_and_append(&self, slot: &mut Slot, key: &RunKey, meta: &EventMeta) -> Result<(), BusError> {
        for _ in 0..MAX_CONFLICTS {
            let Some(state) = slot.state.as_mut() else { return Ok(()) };
            let events = state.decide();
            if events.is_empty() {
                return Ok(());
            }
            state.apply_ahead(&events);
            match self.commit(slot, key, events, meta).await {
                Ok(_) => return Ok(()),
                Err(BusError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(BusError::Nats(format!("gave up deciding {key:?} after {MAX_CONFLICTS} conflicts")))
    }

    /// Appends `events` (decided on the cached state, and applied to it ahead of the log), and
    /// everything the run then decides, as one commit (several for a decision too big for one
    /// message), applies what follows to the cache too, and enqueues the steps they
    /// dispatched. Returns how many of `events` the log holds: all, or (a later commit of a
    /// long decision lost a race) the ones before it; what follows them is left for the next
    /// decision. A conflict on the first commit is [`BusError::Conflict`], and any failure
    /// leaves the cache reloaded from the log.
    ///
    /// What follows from `events` is decided on the state they leave, before anything is
    /// appended: a step's success goes into the log together with the dispatches of the steps
    /// it unblocks, or with the run's end: one append, where each was one of its own.
    async fn commit(
        &self,
        slot: &mut Slot,
        key: &RunKey,
        events: Vec<Event>,
        meta: &EventMeta,
    ) -> Result<usize, BusError> {
        let wanted = events.len();
        let subject = self.bus.namespace().run(key);
        let state = slot.state.as_mut().expect("committing to a cached run");
        let expected = state.last_seq;
        let mut all = events;
        all.extend(state.decide_ahead());
        let envelopes: Vec<_> = all.iter().map(|e| meta.envelope(subject.clone(), e.clone())).collect();
        let done = self.bus.append_decision(expected, &envelopes).await;
        if let Some(e) = done.error {
            slot.reload(&self.bus, key).await?;
            return match e {
                // A later commit conflicting means someone else appended meanwhile: what was
                // appended stands; the rest is decided again on a fresh view.
                BusError::Conflict { .. } if done.events > 0 => {
                    self.enqueue_dispatched(slot, key, &all[..done.events], meta).await?;
                    Ok(done.events.min(wanted))
                }
                e => Err(e),
            };
        }
        slot.state.as_mut().expect("committed to a cached run").last_seq = done.last;
        self.enqueue_dispatched(slot, key, &all, meta).await?;
        Ok(wanted)
    }

    /// Enqueues the steps `events` dispatched that are still dispatched and not yet enqueued
    /// here, on the tenant's `READY` queue, where admission control lets them through to the
    /// executors (see `dispatch`), as [`ready_entries`] groups them.
    async fn enqueue_dispatched<'e>(
        &self,
        slot: &mut Slot,
        key: &RunKey,
        events: impl IntoIterator<Item = &'e Event>,
        meta: &EventMeta,
    ) -> Result<(), BusError> {
        let (markers, entries) = ready_entries(slot, key, events, meta)?;
        self.publish_ready(key, &entries, meta).await?;
        slot.enqueued.extend(markers);
        Ok(())
    }

    /// Publishes `READY` entries (see [`ready_entries`]), pipelined
    /// (`dispatch::PIPELINE` at a time, in order), each acknowledged.
    async fn publish_ready(&self, key: &RunKey, entries: &ReadyEntries, meta: &EventMeta) -> Result<(), BusError> {
        let subject = self.bus.namespace().ready(&key.tenant);
        for chunk in entries.chunks(dispatch::PIPELINE) {
            let publishes = chunk.iter().map(|(msg_id, body)| {
                self.bus.enqueue_payload(subject.clone(), msg_id, body.clone(), meta.traceparent.as_deref())
            });
            futures::future::try_join_all(publishes).await?;
        }
        Ok(())
    }

    /// Grants or denies an executor's lease on a step.
    #[tracing::instrument(skip_all, fields(run = %req.run_id, step = %req.step, delivery = req.lease.delivery))]
    pub async fn lease(&self, req: LeaseRequest) -> Result<LeaseDecision, Problem> {
        let key = RunKey { tenant: req.tenant.clone(), run_id: req.run_id };
        let max_lost = self.settings.max_lost_attempts;
        self.command(&key, move |state| state.lease(&req.step, req.lease, &req.executor, max_lost)).await
    }

    /// Records an executor's result if it holds the step's current lease.
    #[tracing::instrument(skip_all, fields(run = %req.run_id, step = %req.step))]
    pub async fn report(&self, req: ResultReport) -> Result<ReportAck, Problem> {
        let key = RunKey { tenant: req.tenant.clone(), run_id: req.run_id };
        self.command(&key, move |state| state.report(&req)).await
    }

    /// Records an executor's hand-back of an attempt it stopped unfinished, if it holds the
    /// step's current lease.
    #[tracing::instrument(skip_all, fields(run = %req.run_id, step = %req.step, delivery = req.lease.delivery))]
    pub async fn hand_back(&self, req: HandBack) -> Result<ReportAck, Problem> {
        let key = RunKey { tenant: req.tenant.clone(), run_id: req.run_id };
        self.command(&key, move |state| state.hand_back(&req.step, req.lease)).await
    }

    /// Runs a command against the run's state, appends its events (retrying on conflict),
    /// then decides what follows so the next steps go out without waiting for the reactor.
    ///
    /// Commands on one run that arrive while its slot is held (the leases and reports of a
    /// fan-out's steps, which executors send at about the same time) wait together, and the
    /// next of them to take the slot decides them all and appends their events as one
    /// decision, rather than one append each in turn (see [`Scheduler::decide_commands`]).
    /// Each is answered only once its events are in the log.
    async fn command<R: Send + 'static>(
        &self,
        key: &RunKey,
        decide: impl Fn(&RunState) -> (R, Vec<Event>) + Send + 'static,
    ) -> Result<R, Problem> {
        let entry = self.cache.entry(key);
        let (answered, mut answer) = tokio::sync::oneshot::channel();
        entry.waiting.lock().expect("not poisoned").push(Box::new(Command { decide, decided: None, answered }));
        // Answered by whoever takes the slot first: this command, or one waiting before it
        // that took this one along (then there is no need to wait for the slot).
        let early = tokio::select! {
            biased;
            answered = &mut answer => Some(answered),
            mut slot = entry.slot.lock() => {
                let mut waiting = std::mem::take(&mut *entry.waiting.lock().expect("not poisoned"));
                // A command nobody waits for any more (its asker stopped) is not carried out.
                waiting.retain(|command| !command.abandoned());
                // Empty when whoever held the slot before took this command with its own.
                if !waiting.is_empty() {
                    let problem = self.decide_commands(&mut slot, key, &mut waiting).await.err();
                    for command in waiting {
                        command.answer(problem.clone());
                    }
                }
                None
            }
        };
        drop(entry);
        self.cache.evict(self.settings.cache_runs);
        let answered = match early {
            Some(answered) => answered,
            None => answer.await,
        };
        answered.unwrap_or_else(|_| {
            Err(Problem::new(ErrorCode::Unavailable, "the scheduler stopped before deciding this command; retry"))
        })
    }

    /// Decides `waiting` (commands on one run, in order of arrival), each on the state the
    /// ones before it leave, and appends all their events, with what follows from them, as
    /// one decision (see [`Scheduler::commit`]). The answers are left in the commands; an
    /// error is every command's (a retry is then a repeat, answered as the first was).
    ///
    /// It decides on the cached state first: events are appended with the cache's last
    /// sequence as the expected one, so they, and the batch's decisions without events, stand
    /// only if the cache was the log's latest (a conflict reloads, and all are decided again).
    /// A batch without events (refusals, repeated requests) proves nothing about freshness, so
    /// it is decided again on the log's latest before it is answered.
    async fn decide_commands(
        &self,
        slot: &mut Slot,
        key: &RunKey,
        waiting: &mut [Box<dyn Pending>],
    ) -> Result<(), Problem> {
        let loaded = slot.state.is_none();
        let Some(state) = slot.ensure(&self.bus, key, None).await? else {
            return Err(Problem::new(ErrorCode::NotFound, "no such run"));
        };
        let meta = {
            let mut meta = EventMeta::new(&key.tenant).with_traceparent(state.traceparent.clone());
            meta.correlation_id = state.correlation_id.unwrap_or(meta.correlation_id);
            meta
        };
        // Just loaded from the log: as fresh as a refresh would make it.
        let mut fresh = loaded;
        for _ in 0..MAX_CONFLICTS {
            // Each command decides on the state the ones before it leave: their events are
            // applied to the cache ahead of the log (a failed append folds it afresh).
            let Some(state) = slot.state.as_mut() else {
                return Err(Problem::new(ErrorCode::NotFound, "no such run"));
            };
            let mut events = Vec::new();
            for command in waiting.iter_mut() {
                let decided = command.decide(state);
                state.apply_ahead(&decided);
                events.extend(decided);
            }
            // Appending checks every decision of the batch against the log, those that
            // appended nothing included (they saw the same state). Without events, nothing
            // does: a refusal or a repeated request proves nothing about the cache's freshness,
            // so they are decided again on the log's latest before they are answered.
            if events.is_empty() {
                if fresh {
                    return Ok(());
                }
                slot.refresh(&self.bus, key).await?;
                fresh = true;
                continue;
            }
            // What follows (the next steps' dispatches, the run's end) goes into the same
            // commit, so the next steps go out without waiting for the reactor.
            let wanted = events.len();
            match self.commit(slot, key, events, &meta).await {
                // The answers stand only if all their events are in the log; a partial append
                // (someone appended in between) is decided again on the fresh state.
                Ok(appended) if appended == wanted => return Ok(()),
                Ok(_) | Err(BusError::Conflict { .. }) => fresh = true,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Problem::new(ErrorCode::Unavailable, "too much contention on this run; retry"))
    }
}

/// `READY` entries: each one's message id and body.
type ReadyEntries = Vec<(String, bytes::Bytes)>;

/// The `READY` entries (each with its message id) for the steps `events` dispatched that are
/// still dispatched and not yet enqueued here, with their markers, to be added to
/// `slot.enqueued` once the entries are in `READY`. The steps of one decision (a fan-out's) go
/// as one entry (several for a large decision: [`READY_ENTRY_BYTES`] each), so they cost one
/// message rather than one each and reach the executors together (and their leases come back
/// together: see [`Scheduler::command`]).
fn ready_entries<'e>(
    slot: &Slot,
    key: &RunKey,
    events: impl IntoIterator<Item = &'e Event>,
    meta: &EventMeta,
) -> Result<(Vec<(String, u32)>, ReadyEntries), BusError> {
    let (markers, steps): (Vec<_>, Vec<_>) = events
        .into_iter()
        .filter_map(|e| match e {
            Event::StepDispatched(d) => ready_of(slot, key, d, meta),
            _ => None,
        })
        .unzip();
    if steps.is_empty() {
        return Ok((markers, Vec::new()));
    }
    let bodies =
        Ready::entries(steps, READY_ENTRY_BYTES).map_err(|e| BusError::Nats(format!("encoding READY entries: {e}")))?;
    // Each entry's id names the steps it holds: the markers, in entry order.
    let mut left = markers.as_slice();
    let entries = bodies
        .into_iter()
        .map(|(body, n)| {
            let (held, rest) = left.split_at(n);
            left = rest;
            (Ready::entry_id(key.run_id, held), bytes::Bytes::from(body))
        })
        .collect();
    Ok((markers, entries))
}

/// The `READY` part of a dispatched step, with its marker (step, dispatch n); `None` if the
/// step is no longer at that dispatch, or this process enqueued it already.
fn ready_of(slot: &Slot, key: &RunKey, d: &StepDispatched, meta: &EventMeta) -> Option<((String, u32), ReadyStep)> {
    let state = slot.state.as_ref()?;
    let i = state.index_of(&d.step)?;
    let step = &state.steps[i];
    if step.phase != state::StepPhase::Dispatched || step.dispatch != d.dispatch {
        return None;
    }
    let marker = (d.step.clone(), d.dispatch);
    if slot.enqueued.contains(&marker) {
        return None;
    }
    // Templates were checked when the step was dispatched; they render the same now.
    let step = state.render(i).unwrap_or_else(|_| state.workflow.steps[i].clone());
    let priority = state.priority_of(i);
    let refresh_cache = state.refresh_cache && step.cache.is_some();
    let dispatch = Dispatch {
        tenant: key.tenant.clone(),
        run_id: key.run_id,
        dispatch: d.dispatch,
        step,
        not_before: d.not_before,
        traceparent: meta.traceparent.clone(),
        checkout: state.checkout_of(i),
        refresh_cache,
    };
    Some((marker, ReadyStep { dispatch, priority }))
}

/// Takes the run out of the groups it counts in (its concurrency group, its tenant's runs),
/// and wakes the dispatcher to give the places to whoever waits.
async fn leave_groups(bus: &Bus, key: &RunKey, state: &RunState) -> Result<(), BusError> {
    let tokens: Vec<String> = state
        .concurrency
        .iter()
        .map(|c| c.token())
        .chain(state.tenant_max_runs.map(|_| taskmesh_events::TENANT_RUNS_GROUP.to_string()))
        .collect();
    let ns = bus.namespace();
    for token in &tokens {
        bus.purge_subject(&ns.groups_stream(), &ns.group_member(&key.tenant, token, key.run_id)).await?;
    }
    if !tokens.is_empty() {
        let _ = bus.client().publish(ns.slot_signals(), Vec::<u8>::new().into()).await;
    }
    Ok(())
}

impl Cache {
    /// The run's entry, created with an empty slot if it has none.
    fn entry(&self, key: &RunKey) -> Arc<Entry> {
        let mut runs = self.runs.lock().expect("not poisoned");
        match runs.get(key) {
            Some(slot) => slot.clone(),
            None => runs.entry(key.clone()).or_default().clone(),
        }
    }

    /// Keeps the cache bounded: when it holds more than `cap` runs, slots nobody is using go,
    /// finished (or empty) runs first, then any, down to nine tenths of `cap`.
    fn evict(&self, cap: usize) {
        let mut runs = self.runs.lock().expect("not poisoned");
        if runs.len() <= cap {
            return;
        }
        // A slot only the map holds is in nobody's hands, and nobody can take it while the
        // map is locked.
        let idle = |entry: &Arc<Entry>| Arc::strong_count(entry) == 1;
        runs.retain(|_, entry| {
            !idle(entry) || entry.slot.try_lock().is_ok_and(|s| s.state.as_ref().is_some_and(|st| !st.is_finished()))
        });
        let target = cap - cap / 10;
        if runs.len() > target {
            let surplus: Vec<RunKey> = runs
                .iter()
                .filter(|(_, entry)| idle(entry))
                .map(|(k, _)| k.clone())
                .take(runs.len() - target)
                .collect();
            for k in surplus {
                runs.remove(&k);
            }
        }
    }
}

impl Slot {
    /// The run's state, loading it from the log when not cached, and catching up when `next`
    /// (a delivered commit) shows events were missed (another replica may have appended them).
    /// A run's first commit (its `RunSubmitted`, appended to an empty subject, and whatever was
    /// decided with it) is the whole state: no read needed.
    async fn ensure(
        &mut self,
        bus: &Bus,
        key: &RunKey,
        next: Option<&[Stored]>,
    ) -> Result<Option<&RunState>, BusError> {
        let next = next.filter(|c| !c.is_empty());
        match (&mut self.state, next) {
            (None, Some(first)) if first[0].prev == Some(0) => self.fold(key, first),
            (None, _) => {
                let events = bus.read_subject(&bus.namespace().run(key), 0).await?;
                self.fold(key, &events);
            }
            (Some(state), Some(next)) if next[0].seq > state.last_seq => {
                if next[0].prev == Some(state.last_seq) {
                    for stored in next {
                        state.apply(stored.seq, &stored.envelope.event);
                    }
                } else {
                    self.refresh(bus, key).await?;
                }
            }
            (Some(_), _) => {}
        }
        Ok(self.state.as_ref())
    }

    /// Caches the run's state folded from its events, the first being its `RunSubmitted`
    /// (none without one). A `RunSubmitted` other than the cached run's is another run of the
    /// same id: the cached one's events aged out of the log (`nats.events_max_age_days`)
    /// before its idempotency key submitted it again. What this process enqueued for the
    /// other run is then forgotten (the same steps at the same dispatch are the new run's to
    /// enqueue).
    fn fold(&mut self, key: &RunKey, events: &[Stored]) {
        self.state = None;
        let Some(first) = events.first() else { return };
        let Some(mut state) = RunState::from_submitted(key.clone(), first.seq, &first.envelope.event) else { return };
        state.correlation_id = Some(first.envelope.correlation_id);
        state.traceparent = first.envelope.traceparent.clone();
        for e in &events[1..] {
            state.apply(e.seq, &e.envelope.event);
        }
        if first.seq != self.submitted_seq {
            self.enqueued.clear();
            self.submitted_seq = first.seq;
        }
        self.state = Some(state);
    }

    /// Applies whatever the log has for the run beyond the cached state; from a `RunSubmitted`
    /// among it, the run submitted again (see [`Slot::fold`]), folds it afresh.
    async fn refresh(&mut self, bus: &Bus, key: &RunKey) -> Result<(), BusError> {
        let Some(state) = self.state.as_mut() else { return Ok(()) };
        let events = bus.read_subject(&bus.namespace().run(key), state.last_seq).await?;
        if let Some(i) = events.iter().rposition(|e| matches!(e.envelope.event, Event::RunSubmitted(_))) {
            self.fold(key, &events[i..]);
            return Ok(());
        }
        for e in events {
            state.apply(e.seq, &e.envelope.event);
        }
        Ok(())
    }

    /// Folds the run's state from the log afresh (the cached one holds events that may not
    /// have been appended).
    async fn reload(&mut self, bus: &Bus, key: &RunKey) -> Result<(), BusError> {
        self.state = None;
        let events = bus.read_subject(&bus.namespace().run(key), 0).await?;
        self.fold(key, &events);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_past_the_calendars_end_is_a_years_after_its_submission() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-12-07T10:00:00Z").unwrap().to_utc();
        assert_eq!(deadline_of(t, 60), t + chrono::Duration::seconds(60));
        let year = t + chrono::Duration::seconds(MAX_TIMEOUT_SECS as i64);
        assert_eq!(deadline_of(t, 10_000_000_000_000), year, "no panic on a time past the calendar's end");
        assert_eq!(deadline_of(t, u64::MAX), year, "nor on seconds past i64");
    }

    #[test]
    fn a_timers_failures_in_a_row_are_counted_by_timer_and_forgotten_once_it_is_done() {
        let failures = TimerFailures::default();
        let secs = |(wait, n): (Duration, u32)| (wait.as_secs(), n);
        assert_eq!(secs(failures.failed(Some(7))), (1, 1));
        assert_eq!(secs(failures.failed(Some(7))), (2, 2));
        assert_eq!(secs(failures.failed(Some(8))), (1, 1), "counted per timer");
        assert_eq!(secs(failures.failed(Some(7))), (4, 3));
        failures.succeeded(Some(7));
        assert_eq!(secs(failures.failed(Some(7))), (1, 1), "a success starts it afresh");
        assert_eq!(secs(failures.failed(None)), (1, 1), "without a sequence, always the first");
        assert_eq!(secs(failures.failed(None)), (1, 1));
        for seq in 100..100 + TIMER_FAILURES_KEPT as u64 {
            failures.failed(Some(seq));
        }
        assert_eq!(secs(failures.failed(Some(8))), (1, 1), "past the bound, counting starts afresh");
    }

    /// A run's first commit as the log stores it: its `RunSubmitted` at `seq`, on an empty
    /// subject.
    fn submitted(key: &RunKey, seq: u64, yaml: &str) -> Vec<Stored> {
        let workflow = taskmesh_events::workflow::WorkflowDef::parse_yaml(yaml).unwrap();
        let event = Event::RunSubmitted(taskmesh_events::RunSubmitted {
            idempotency_key: Some("k".into()),
            ..taskmesh_events::RunSubmitted::new(key.run_id, workflow, Trigger::Api { key_id: None })
        });
        let subject = taskmesh_events::subjects::Namespace::new("tm").unwrap().run(key);
        let envelope = EventMeta::new(&key.tenant).envelope(subject, event);
        vec![Stored { seq, prev: Some(0), envelope, part: 0, parts: 1 }]
    }

    #[test]
    fn folding_another_submission_of_the_same_run_id_forgets_what_was_enqueued_for_the_first() {
        let key = RunKey { tenant: "t".into(), run_id: uuid::Uuid::now_v7() };
        let mut slot = Slot::default();
        slot.fold(&key, &submitted(&key, 5, "name: first\nsteps:\n  - {id: a, uses: noop}\n"));
        slot.enqueued.insert(("a".into(), 1));
        // The same run folded again (a failed append reloads it): its enqueued steps stay so.
        slot.fold(&key, &submitted(&key, 5, "name: first\nsteps:\n  - {id: a, uses: noop}\n"));
        assert!(slot.enqueued.contains(&("a".to_string(), 1)));
        // Submitted again under its key once its events aged out: step `a` at dispatch 1 is the
        // new run's, not yet enqueued.
        slot.fold(&key, &submitted(&key, 40, "name: second\nsteps:\n  - {id: a, uses: noop}\n"));
        assert!(slot.enqueued.is_empty());
        assert_eq!(slot.state.as_ref().map(|s| s.workflow.name.as_str()), Some("second"));
        slot.fold(&key, &[]);
        assert!(slot.state.is_none(), "no RunSubmitted, no run");
        // Nor is what was enqueued forgotten then: folding the same submission again keeps it.
        slot.enqueued.insert(("a".into(), 1));
        slot.fold(&key, &submitted(&key, 40, "name: second\nsteps:\n  - {id: a, uses: noop}\n"));
        assert!(slot.enqueued.contains(&("a".to_string(), 1)));
    }

    #[test]
    fn a_failed_timer_is_retried_at_once_then_less_often_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_after(0), Duration::from_secs(1));
        assert_eq!(retry_after(u32::MAX), TIMER_RETRY_MAX);
    }
}
