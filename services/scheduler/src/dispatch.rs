//! The dispatcher: admission control between "a step is ready" and "executors may take it".
//!
//! Ready work is published to the READY stream (`command::Ready`; the steps one decision
//! dispatched share an entry); the stream holds what waits, since an entry is deleted once
//! all it holds is admitted (so a fan-out's admitted steps stay on it while one of them is
//! held). One scheduler replica at a time, the
//! holder of a leader lease (a subject of the LEASES stream, claimed and renewed with
//! expected-last-subject-sequence, expiring by the stream's `max_age`), reads READY from its
//! start and lets work through when:
//!
//! - the tenant has fewer than its limit of steps on the dispatch queue or running (the DISPATCH
//!   work queue holds a message per step from admission until its executor acks it, so its
//!   per-subject counts are the truth, whoever admitted them and whatever crashed since);
//! - the step's circuit breaker (if any) is not open (see [`Breaker`]), its rate-limit bucket
//!   has a token, and its `not_before` has passed;
//! - for a run with a concurrency group, or of a tenant with a limit of concurrent runs: the
//!   group (and the tenant's implicit group of runs) has room. The GROUPS stream holds one
//!   message per active run of a group, purged when the run ends.
//!
//! Within a tenant the highest priority goes first, then the oldest; tenants take turns, one
//! step each, so one tenant's backlog never holds another's work behind it. A step held for
//! longer than [`REPORT_AFTER`] gets a `StepWaiting` event with the reason (and `StepAdmitted`
//! when it goes), so the API can say why it waits; a held run gets `RunWaiting`.
//!
//! Crash safety: admitting is "enqueue on DISPATCH (deduplicated by message id), then remove
//! from READY"; a leader dying in between leaves the entry for the next leader, whose enqueue is
//! deduplicated (and a duplicate that slipped through is refused by the lease check). Admitted
//! entries are removed together: everything below the oldest entry still held goes in one purge
//! request after each round (on a task of its own, one at a time, so the next round need not
//! wait for it); an admitted entry above one that is held (a retry waiting for its
//! backoff, a tenant at its limit) is deleted on its own once it has waited [`REMOVE_AFTER`].
//! Rate-limit buckets and circuit breakers live in the leader's memory: a new leader starts
//! buckets full. Breakers it reads back from `{NS}_BREAKERS`, where the leader keeps each
//! one's state as it changes (best effort; no probe out is kept, so one goes once the cooldown
//! has passed). Executors tell the leader how attempts behind a breaker went on
//! `{ns}.ctl.breaker` (core NATS, best effort).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use taskmesh_bus::{Bus, BusError};
use taskmesh_config::{LimitsSettings, SchedulerSettings};
use taskmesh_events::command::{BreakerSignal, BreakerState, CancelSignal, Dispatch, ExecutorBeat, Pool, Ready};
use taskmesh_events::subjects::pool_token;
use taskmesh_events::workflow::labels_match;
use taskmesh_events::workflow::{CircuitBreakerDef, GroupPolicy};
use taskmesh_events::{
    Event, EventMeta, RunAdmitted, RunCancelRequested, RunConcurrency, RunKey, RunWaiting, StepAdmitted, StepWaiting,
    TENANT_RUNS_GROUP,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The key of the dispatcher's leader lease.
const LEASE_KEY: &str = "dispatcher";
/// A hold shorter than this is not worth an event.
pub const REPORT_AFTER: Duration = Duration::from_millis(500);
/// How often held work is looked at again without a signal.
const TICK: Duration = Duration::from_millis(100);
/// How often, at most, a label set that could not be recorded on POOLS is logged.
const POOL_WARNING_EVERY: Duration = Duration::from_secs(30);
/// Most entries read from READY before an admission round.
const READ_BATCH: usize = 4_096;
/// Most publishes (or deletions) in flight at once while a round's admissions go out.
pub(crate) const PIPELINE: usize = 256;
/// How long an admitted READY entry may wait for a purge to take it before it is deleted on
/// its own (see [`Removals`]).
const REMOVE_AFTER: Duration = Duration::from_secs(1);
/// Most admitted steps kept to be judged once executors could have been heard of.
const UNJUDGED: usize = 10_000;
/// How long a read of DISPATCH's counts serves admission rounds, at most (see [`InFlight`]).
const COUNTS_FOR: Duration = Duration::from_secs(1);

pub(crate) struct Dispatcher {
    bus: Bus,
    settings: SchedulerSettings,
    limits: LimitsSettings,
    id: String,
}

/// A step waiting for admission.
struct HeldStep {
    dispatch: Dispatch,
    since: Instant,
    /// A `StepWaiting` was recorded for it.
    reported: bool,
}

/// A run waiting for its concurrency group or its tenant's run limit.
struct HeldRun {
    tenant: String,
    run_id: Uuid,
    concurrency: Option<RunConcurrency>,
    tenant_max_runs: Option<u32>,
    reported: bool,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    /// Tokens per second, and most tokens held, as the last step using it said.
    rate: f64,
    cap: f64,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.cap);
        self.at = now;
    }
}

/// A circuit breaker of a tenant's, in the leader's memory (see `CircuitBreakerDef`): closed
/// (`open_until` none), open until a time, then half-open with one probe out.
struct Breaker {
    /// Failed attempts in a row, as their executors said, and when the last was heard.
    failures: u32,
    failed_at: Option<Instant>,
    open_until: Option<Instant>,
    /// The probe (run, step) and until when it is waited for, while one is out.
    probe: Option<((Uuid, String), Instant)>,
    /// The threshold and the cooldown, as the last held step naming it said (or, for one first
    /// heard of by a signal, that signal).
    threshold: u32,
    cooldown: Duration,
}

/// What a breaker lets through now.
#[derive(PartialEq)]
enum Gate {
    Closed,
    Open,
    /// Open past its cooldown with no probe out: the step that goes is the probe.
    Probe,
}

impl Breaker {
    fn new(threshold: u32, cooldown_seconds: u64) -> Self {
        Self {
            failures: 0,
            failed_at: None,
            open_until: None,
            probe: None,
            threshold,
            cooldown: Duration::from_secs(cooldown_seconds),
        }
    }

    fn configure(&mut self, threshold: u32, cooldown_seconds: u64) {
        (self.threshold, self.cooldown) = (threshold, Duration::from_secs(cooldown_seconds));
    }

    fn gate(&self, now: Instant) -> Gate {
        match (self.open_until, &self.probe) {
            (None, _) => Gate::Closed,
            (Some(until), _) if now < until => Gate::Open,
            (Some(_), Some((_, wait_until))) if now < *wait_until => Gate::Open,
            (Some(_), _) => Gate::Probe,
        }
    }

    /// `step` (run, step id) went as the probe; it is waited for until `wait_until` (then, not
    /// heard of, another goes).
    fn probing(&mut self, step: (Uuid, String), wait_until: Instant) {
        self.probe = Some((step, wait_until));
    }

    /// An attempt of `step` ended: `Some(succeeded)`, or `None` when it gave no verdict (it
    /// took a cached outcome, could not start, or was cancelled). Closed, a success clears the
    /// count and a failure adds to it, opening the breaker at `threshold`; open, only the probe
    /// counts: its success closes the breaker, its failure opens it again, and no verdict lets
    /// another probe go. Whether what a next leader would read of it changed (the probe is not
    /// kept).
    fn record(&mut self, step: &(Uuid, String), verdict: Option<bool>, now: Instant) -> bool {
        if self.open_until.is_none() {
            match verdict {
                Some(true) => return std::mem::take(&mut self.failures) > 0,
                Some(false) => {
                    self.failures = self.failures.saturating_add(1);
                    self.failed_at = Some(now);
                    if self.failures >= self.threshold {
                        self.open_until = Some(now + self.cooldown);
                    }
                    return true;
                }
                None => return false,
            }
        }
        if self.probe.as_ref().is_none_or(|(probe, _)| probe != step) {
            return false;
        }
        self.probe = None;
        match verdict {
            Some(true) => (self.failures, self.open_until) = (0, None),
            Some(false) => {
                self.failures = self.failures.saturating_add(1);
                self.failed_at = Some(now);
                self.open_until = Some(now + self.cooldown);
            }
            None => return false,
        }
        true
    }

    /// Its state for the next leader, its instants as wall-clock times (`wall` being `now`).
    fn kept(&self, tenant: &str, key: &str, now: Instant, wall: DateTime<Utc>) -> BreakerState {
        let at = |i: Instant| match i.checked_duration_since(now) {
            Some(ahead) => wall + chrono::Duration::from_std(ahead).unwrap_or_default(),
            None => wall - chrono::Duration::from_std(now.duration_since(i)).unwrap_or_default(),
        };
        BreakerState {
            tenant: tenant.to_string(),
            key: key.to_string(),
            failures: self.failures,
            failed_at: self.failed_at.map(at),
            open_until: self.open_until.map(at),
            threshold: self.threshold,
            cooldown_seconds: self.cooldown.as_secs(),
        }
    }

    /// The breaker a previous leader kept, as of `now` (`wall`), if it is within bounds: open
    /// at most its cooldown longer, whatever the record says; no probe out (one goes once the
    /// cooldown has passed).
    fn from_kept(k: &BreakerState, now: Instant, wall: DateTime<Utc>) -> Option<Self> {
        if !in_bounds(&k.tenant, &k.key, k.threshold, k.cooldown_seconds) {
            return None;
        }
        let cooldown = Duration::from_secs(k.cooldown_seconds);
        let past = |t: DateTime<Utc>| now.checked_sub((wall - t).to_std().unwrap_or_default()).unwrap_or(now);
        let until = |t: DateTime<Utc>| now + (t - wall).to_std().unwrap_or_default().min(cooldown);
        Some(Self {
            failures: k.failures,
            failed_at: k.failed_at.map(past),
            // An opening already past stays open (past), so a probe goes at once.
            open_until: k.open_until.map(|t| if t > wall { until(t) } else { past(t) }),
            probe: None,
            threshold: k.threshold,
            cooldown,
        })
    }

    /// Nothing to remember: closed with no failures; or a day past its last failure, its
    /// cooldown and any probe's wait, with no step having come to it (it starts closed should
    /// a step name it again).
    fn is_idle(&self, now: Instant) -> bool {
        if self.open_until.is_none() && self.failures == 0 {
            return true;
        }
        let last = [self.failed_at, self.open_until, self.probe.as_ref().map(|(_, wait)| *wait)];
        last.into_iter().flatten().max().is_some_and(|last| now.saturating_duration_since(last) > FORGET_AFTER)
    }
}

/// How long a probe is waited for, from when it was admitted, before another goes: this, or the
/// step's time limit (its `timeout_seconds`, or its kind's default) and a minute, or the
/// cooldown, whichever is longest (a lost signal or a crashed executor otherwise holds the
/// breaker).
const PROBE_WAIT: Duration = Duration::from_secs(300);
/// A breaker nothing has happened to for this long (no failure, cooldown or probe) is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(86_400);
/// Most circuit breakers remembered per tenant; a signal for another is not counted.
const MAX_BREAKERS: usize = 1_000;
/// Most tenants with breakers remembered; a signal for another tenant is not counted.
const MAX_BREAKER_TENANTS: usize = 10_000;
/// Most breaker signals taken at once before the next admission round.
const SIGNAL_BATCH: usize = 1_024;
/// Most breaker states waiting to be kept for the next leader.
const KEEP_QUEUE: usize = 4_096;
/// How long a leader that stops waits for the breaker states it queued to be kept.
const KEEP_FLUSH: Duration = Duration::from_millis(500);
/// How long a new leader reads the kept breakers before it gives up on them.
const LOAD_WITHIN: Duration = Duration::from_secs(2);
/// Longest a step's own time limit stretches how long its probe is waited for.
const PROBE_WAIT_MAX: Duration = Duration::from_secs(7 * 86_400);

/// Steps on DISPATCH (queued or running), per tenant and in all: its per-subject counts as last
/// read, plus every step this leader has admitted since. Steps leave DISPATCH only when their
/// executors ack them, and within a leader's term only this leader adds any, so these figures
/// are never below what DISPATCH holds: admitting on them never takes a tenant past its limit
/// (invariant 9), while sparing a stream-info request on every round. They are read afresh
/// when they could hold a step back (`held` would reach a limit on them), when they are older
/// than [`COUNTS_FOR`], and by every new leader.
struct InFlight {
    read_at: Instant,
    tenants: HashMap<String, u64>,
    total: u64,
}

impl InFlight {
    fn new(counts: HashMap<String, u64>, ns: &taskmesh_events::subjects::Namespace, now: Instant) -> Self {
        let mut tenants: HashMap<String, u64> = HashMap::new();
        let mut total = 0;
        for (subject, n) in counts {
            total += n;
            if let Some((tenant, _pool)) = ns.parse_dispatch(&subject) {
                *tenants.entry(tenant.to_string()).or_default() += n;
            }
        }
        Self { read_at: now, tenants, total }
    }

    fn of(&self, tenant: &str) -> u64 {
        self.tenants.get(tenant).copied().unwrap_or(0)
    }

    fn admitted(&mut self, tenant: &str) {
        *self.tenants.entry(tenant.to_string()).or_default() += 1;
        self.total += 1;
    }

    /// Whether these figures may still decide a round over `held` (steps waiting, per tenant):
    /// they are recent, and admitting everything held would take no tenant to its limit
    /// (`limit` of a tenant, 0 for none) nor the total to `window` (0: none).
    fn serves<'a>(
        &self,
        now: Instant,
        held: impl Iterator<Item = (&'a str, usize)>,
        limit: impl Fn(&str) -> u32,
        window: u32,
    ) -> bool {
        if now.duration_since(self.read_at) >= COUNTS_FOR {
            return false;
        }
        let mut all = self.total;
        for (tenant, n) in held {
            let (n, limit) = (n as u64, u64::from(limit(tenant)));
            if limit > 0 && self.of(tenant) + n >= limit {
                return false;
            }
            all += n;
        }
        window == 0 || all < u64::from(window)
    }
}

/// Until when the leader may admit: a margin inside its lease, pushed on by each renewal.
#[derive(Clone)]
struct Validity(std::sync::Arc<std::sync::Mutex<Instant>>);

impl Validity {
    fn new(until: Instant) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(until)))
    }
    fn extend(&self, until: Instant) {
        *self.0.lock().expect("not poisoned") = until;
    }
    /// Ends it now: nothing more is admitted under this lease.
    fn end(&self) {
        self.extend(Instant::now());
    }
    fn check(&self) -> Result<(), BusError> {
        if Instant::now() < *self.0.lock().expect("not poisoned") {
            Ok(())
        } else {
            Err(BusError::Nats("the dispatcher lease was not renewed in time".into()))
        }
    }
}

/// READY entries this leader is done with (admitted, or dropped) and has not yet removed, by
/// sequence. READY is read in order, so every entry below both the last one read and the oldest
/// still held is done, and one purge removes them all: in a flood, one request per round where
/// there was one per step.
#[derive(Default)]
struct Removals {
    /// The highest READY sequence read so far.
    last_read: u64,
    /// Entries done but still on READY, and since when.
    pending: BTreeMap<u64, Instant>,
    /// Entries of several steps, with how many of their steps are not yet done.
    parts_left: HashMap<u64, usize>,
}

impl Removals {
    /// Notes that the entry `seq` holds `parts` steps: it is done with once each of them is
    /// (at once when it holds none).
    fn holds(&mut self, seq: u64, parts: usize) {
        match parts {
            0 => self.done(seq),
            1 => {}
            _ => {
                self.parts_left.insert(seq, parts);
            }
        }
    }

    /// Notes an entry (or one of its steps) as done with: once all its steps are, it goes with
    /// the next purge below it, or on its own once overdue.
    fn done(&mut self, seq: u64) {
        if let Some(left) = self.parts_left.get_mut(&seq) {
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.parts_left.remove(&seq);
        }
        self.pending.insert(seq, Instant::now());
    }

    /// What to remove now, given the oldest entry still held (`None`: nothing is): the sequence
    /// to purge below (if any done entry lies below it), and the entries above it that have
    /// waited past `after` for a purge, to delete one by one. Both leave `pending`.
    fn due(&mut self, oldest_held: Option<u64>, now: Instant, after: Duration) -> (Option<u64>, Vec<u64>) {
        let low = oldest_held.unwrap_or(u64::MAX).min(self.last_read.saturating_add(1));
        let purge = match self.pending.range(..low).next_back() {
            Some(_) => {
                self.pending = self.pending.split_off(&low);
                Some(low)
            }
            None => None,
        };
        let overdue: Vec<u64> =
            self.pending.iter().filter(|(_, at)| now.duration_since(**at) >= after).map(|(seq, _)| *seq).collect();
        for seq in &overdue {
            self.pending.remove(seq);
        }
        (purge, overdue)
    }
}

#[derive(Default)]
struct Held {
    /// Per tenant, in admission order: priority (highest first), then READY sequence, then the
    /// step's place in its entry.
    steps: HashMap<String, BTreeMap<StepKey, HeldStep>>,
    /// By READY sequence: submission order.
    runs: BTreeMap<u64, HeldRun>,
    /// Tenants in turn order.
    turns: VecDeque<String>,
    buckets: HashMap<(String, String), Bucket>,
    /// Circuit breakers with something to remember, by tenant, then key.
    breakers: HashMap<String, HashMap<String, Breaker>>,
    /// Breakers (tenant, key) whose state changed since it was last kept for the next leader.
    breakers_changed: Vec<(String, String)>,
    /// Runs already asked to cancel for a `cancel_in_progress` group.
    cancelling: HashSet<Uuid>,
    /// Pools (label sets) registered on the POOLS stream by this leader.
    pools: HashSet<String>,
    /// When a label set that could not be recorded was last logged.
    pools_warned: Option<Instant>,
    /// Live executors' labels as last read, and when.
    executors: Option<(Instant, Vec<BTreeMap<String, String>>)>,
    /// When this leader first read the live executors: until a few heartbeats have had time
    /// to arrive, seeing none is not evidence that none runs (they may be starting too).
    first_look: Option<Instant>,
    /// What is on DISPATCH, at most (none until the first round of this term).
    in_flight: Option<InFlight>,
    /// Entries done with and not yet removed from READY.
    removals: Removals,
    /// Steps admitted before any executor was heard of and before heartbeats had had time to
    /// arrive: whether one can take them is judged once either holds (at most [`UNJUDGED`]).
    unjudged: Vec<(RunKey, String, BTreeMap<String, String>)>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.steps.values().all(BTreeMap::is_empty) && self.unjudged.is_empty()
    }

    /// Holds a step read from READY, the `part`-th of the entry at `seq`.
    fn hold_step(&mut self, seq: u64, part: u32, dispatch: Dispatch, priority: i32) {
        if !self.steps.contains_key(&dispatch.tenant) {
            self.turns.push_back(dispatch.tenant.clone());
        }
        let tenant = dispatch.tenant.clone();
        let entry = HeldStep { dispatch, since: Instant::now(), reported: false };
        self.steps.entry(tenant).or_default().insert((Reverse(priority), seq, part), entry);
    }

    /// The READY sequence of the oldest entry still held.
    fn oldest(&self) -> Option<u64> {
        let steps = self.steps.values().flat_map(|q| q.keys().map(|k| k.1)).min();
        let runs = self.runs.keys().next().copied();
        steps.into_iter().chain(runs).min()
    }
}

impl Dispatcher {
    pub fn new(bus: Bus, settings: SchedulerSettings, limits: LimitsSettings) -> Self {
        Self { bus, settings, limits, id: Uuid::now_v7().to_string() }
    }

    /// Competes for the leader lease and, while holding it, admits work; until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ttl = Duration::from_millis(self.settings.leader_ttl_ms.max(300));
        if let Err(e) = self.bus.provision_leases(ttl).await {
            tracing::error!(error = %e, "no lease stream: this replica cannot dispatch");
            return Err(e.into());
        }
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // The lease runs from before it was asked for: a slow answer shortens it.
            let asked = Instant::now();
            match self.bus.claim_lease(LEASE_KEY, &self.id, None).await {
                Ok(claim) => {
                    tracing::info!(id = %self.id, "leading the dispatcher");
                    let lost = CancellationToken::new();
                    // Admissions stop a margin before the lease could have expired unrenewed,
                    // so a stalled leader never admits alongside its successor.
                    let valid = Validity::new(asked + ttl * 2 / 3);
                    let renew = {
                        let (bus, id, lost, shutdown, valid) =
                            (self.bus.clone(), self.id.clone(), lost.clone(), shutdown.clone(), valid.clone());
                        tokio::spawn(async move {
                            let mut claim = claim;
                            loop {
                                tokio::select! {
                                    _ = shutdown.cancelled() => break,
                                    _ = lost.cancelled() => break,
                                    _ = tokio::time::sleep(ttl / 3) => {}
                                }
                                let asked = Instant::now();
                                match bus.claim_lease(LEASE_KEY, &id, Some(claim)).await {
                                    Ok(c) => {
                                        claim = c;
                                        valid.extend(asked + ttl * 2 / 3);
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "lost the dispatcher lease");
                                        lost.cancel();
                                        return None;
                                    }
                                }
                            }
                            // Nothing more is admitted from now on; the lease is given up once
                            // the leader has stopped (below), not while its round may still be
                            // sending what a successor would not count.
                            valid.end();
                            lost.cancel();
                            Some(claim)
                        })
                    };
                    if let Err(e) = self.lead(lost.clone(), valid).await {
                        tracing::warn!(error = %e, "dispatcher stopped leading");
                    }
                    lost.cancel();
                    // Handed over at once rather than at the lease's expiry.
                    if let Ok(Some(claim)) = renew.await
                        && let Err(e) = self.bus.release_lease(claim).await
                    {
                        tracing::debug!(error = %e, "could not give up the dispatcher lease; it runs out");
                    }
                }
                Err(e) => {
                    if !matches!(e, BusError::Conflict { .. }) {
                        tracing::warn!(error = %e, "could not compete for the dispatcher lease");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(ttl / 3) => {}
                    }
                }
            }
        }
    }

    /// Reads READY from its start and admits what may go, until the lease is `lost`.
    async fn lead(&self, lost: CancellationToken, valid: Validity) -> anyhow::Result<()> {
        let ns = self.bus.namespace();
        let stream = self.bus.jetstream().get_stream(ns.ready_stream()).await?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: ns.ready_all(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut ready = consumer.messages().await?;
        let mut signals = self.bus.client().subscribe(ns.slot_signals()).await?;
        let mut ended = self.bus.client().subscribe(ns.run_ended_signals()).await?;
        let mut breaker_signals = self.bus.client().subscribe(ns.breaker_signals()).await?;
        let mut held = Held { breakers: kept_breakers(&self.bus).await, ..Held::default() };
        let (report_tx, report_rx) = tokio::sync::mpsc::channel::<Event2>(8_192);
        let reporter = tokio::spawn(report(self.bus.clone(), report_rx));
        let (keep_tx, keep_rx) = tokio::sync::mpsc::channel::<Keeping>(KEEP_QUEUE);
        let keeper = tokio::spawn(keep_breakers(self.bus.clone(), keep_rx));
        let mut removing = None;
        let result: anyhow::Result<()> = async {
            loop {
                let wait =
                    if held.is_empty() && held.removals.pending.is_empty() { Duration::from_secs(3600) } else { TICK };
                tokio::select! {
                    _ = lost.cancelled() => return Ok(()),
                    msg = ready.next() => {
                        let Some(msg) = msg else { anyhow::bail!("the READY consumer ended") };
                        self.take(&mut held, msg?);
                        // Take whatever else is already here before deciding.
                        for _ in 0..READ_BATCH {
                            match futures::FutureExt::now_or_never(ready.next()) {
                                Some(Some(msg)) => self.take(&mut held, msg?),
                                _ => break,
                            }
                        }
                    }
                    _ = signals.next() => {
                        while futures::FutureExt::now_or_never(signals.next()).flatten().is_some() {}
                    }
                    Some(msg) = ended.next() => {
                        if let Ok(run) = serde_json::from_slice::<CancelSignal>(&msg.payload) {
                            self.drop_run(&mut held, &run);
                        }
                    }
                    Some(msg) = breaker_signals.next() => {
                        let now = Instant::now();
                        breaker_signal(&mut held, &msg.payload, now);
                        for _ in 0..SIGNAL_BATCH {
                            let Some(Some(msg)) = futures::FutureExt::now_or_never(breaker_signals.next()) else { break };
                            breaker_signal(&mut held, &msg.payload, now);
                        }
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                if !held.runs.is_empty()
                    && let Err(e) = self.admit_runs(&mut held, &report_tx, &valid).await
                {
                    tracing::warn!(error = %e, "admitting runs failed; retrying");
                }
                if let Err(e) = self.admit(&mut held, &report_tx, &valid).await {
                    tracing::warn!(error = %e, "admission round failed; retrying");
                    tokio::time::sleep(TICK).await;
                }
                // What signals changed, and breakers the round forgot, go to the keeper.
                keep_changed_breakers(&mut held, &keep_tx, Instant::now());
                if removing.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                    removing = self.remove_done(&mut held);
                }
            }
        }
        .await;
        // What is not yet reported is only informational; a new leader says it again. Entries
        // not yet removed are admitted again by the next leader, deduplicated. The gauges are
        // the leader's: no longer leading, this replica shows nothing held.
        set_gauges(&Held::default(), Instant::now());
        reporter.abort();
        // What is queued to be kept goes out first (briefly: the next leader may be reading).
        drop(keep_tx);
        let mut keeper = keeper;
        if tokio::time::timeout(KEEP_FLUSH, &mut keeper).await.is_err() {
            keeper.abort();
        }
        if let Some(removal) = removing {
            removal.abort();
        }
        result
    }

    /// Removes the READY entries this leader is done with (see [`Removals`]). A failure is
    /// logged, not returned: the entries are already out of this leader's memory, and were a
    /// later leader to admit them again, the dispatch queue's deduplication and the lease check
    /// keep them harmless.
    ///
    /// The requests go out on a task of their own, so the next round does not wait for them:
    /// the caller starts the next removal only once this one is done.
    fn remove_done(&self, held: &mut Held) -> Option<tokio::task::JoinHandle<()>> {
        let oldest = held.oldest();
        let (purge, overdue) = held.removals.due(oldest, Instant::now(), REMOVE_AFTER);
        if purge.is_none() && overdue.is_empty() {
            return None;
        }
        let bus = self.bus.clone();
        Some(tokio::spawn(async move {
            let stream = bus.namespace().ready_stream();
            if let Some(below) = purge
                && let Err(e) = bus.purge_below(&stream, below).await
            {
                tracing::warn!(error = %e, below, "could not remove admitted READY entries");
            }
            futures::stream::iter(overdue.into_iter().map(|seq| {
                let (stream, bus) = (&stream, &bus);
                async move {
                    if let Err(e) = bus.delete_message(stream, seq).await {
                        tracing::warn!(error = %e, seq, "could not delete an admitted READY entry");
                    }
                }
            }))
            .buffer_unordered(PIPELINE)
            .collect::<()>()
            .await;
        }))
    }

    /// Forgets the held steps of a run that ended, deleting their READY entries.
    fn drop_run(&self, held: &mut Held, run: &CancelSignal) {
        let runs: Vec<u64> = held.runs.iter().filter(|(_, r)| r.run_id == run.run_id).map(|(k, _)| *k).collect();
        for seq in runs {
            held.runs.remove(&seq);
            held.removals.done(seq);
        }
        let Some(queue) = held.steps.get_mut(&run.tenant) else { return };
        let gone: Vec<StepKey> =
            queue.iter().filter(|(_, s)| s.dispatch.run_id == run.run_id).map(|(k, _)| *k).collect();
        for k in &gone {
            queue.remove(k);
            held.removals.done(k.1);
        }
    }

    fn take(&self, held: &mut Held, msg: async_nats::jetstream::Message) {
        let seq = match msg.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => {
                tracing::error!(error = %e, "READY message without metadata");
                return;
            }
        };
        held.removals.last_read = held.removals.last_read.max(seq);
        match serde_json::from_slice::<Ready>(&msg.payload) {
            Ok(Ready::Step(step)) => held.hold_step(seq, 0, step.dispatch, step.priority),
            Ok(Ready::Steps { steps }) => {
                held.removals.holds(seq, steps.len());
                for (i, step) in steps.into_iter().enumerate() {
                    held.hold_step(seq, i as u32, step.dispatch, step.priority);
                }
            }
            Ok(Ready::Run { tenant, run_id, concurrency, tenant_max_runs }) => {
                held.runs.insert(seq, HeldRun { tenant, run_id, concurrency, tenant_max_runs, reported: false });
            }
            Err(e) => {
                tracing::error!(error = %e, seq, "undecodable READY entry; dropping it");
                held.removals.done(seq);
            }
        }
    }

    /// Records a label set on the POOLS stream, so executors with those labels attach to it.
    async fn register_pool(&self, token: &str, runs_on: &BTreeMap<String, String>) -> Result<(), BusError> {
        let ns = self.bus.namespace();
        let pool = Pool { token: token.to_string(), runs_on: runs_on.clone() };
        self.bus.put(ns.pool(token), &pool).await.map(|_| ())
    }

    /// The labels of the live executors, read at most once a second (a failed read counts as
    /// none known, which only affects the reasons shown).
    async fn live_executors(&self, held: &mut Held) -> Vec<BTreeMap<String, String>> {
        if let Some((at, labels)) = &held.executors
            && at.elapsed() < Duration::from_secs(1)
        {
            return labels.clone();
        }
        let ns = self.bus.namespace();
        let now = chrono::Utc::now();
        let labels: Vec<BTreeMap<String, String>> =
            match self.bus.latest_per_subject::<ExecutorBeat>(&ns.executors_stream(), &ns.executors_all()).await {
                Ok(beats) => beats.into_iter().filter(|b| b.is_live(now)).map(|b| b.labels).collect(),
                Err(e) => {
                    tracing::debug!(error = %e, "reading live executors");
                    return Vec::new();
                }
            };
        held.executors = Some((Instant::now(), labels.clone()));
        labels
    }

    /// Says why admitted steps that no live executor can take wait on the dispatch queue
    /// (where autoscalers see them).
    async fn report_unserved(
        &self,
        held: &mut Held,
        mut sent: Vec<(RunKey, String, BTreeMap<String, String>)>,
        reports: &tokio::sync::mpsc::Sender<Event2>,
    ) {
        // A step no live executor can take waits on the dispatch queue (where autoscalers see
        // it): say so. Steps admitted before executors could have been heard of are judged
        // once they could (a loaded machine may delay the first heartbeats past the first
        // admissions: those steps must still be told why they wait).
        if !sent.is_empty() || !held.unjudged.is_empty() {
            let live = self.live_executors(held).await;
            let settled = held.first_look.get_or_insert_with(Instant::now).elapsed()
                >= Duration::from_secs(3 * ExecutorBeat::EVERY_SECS);
            if !settled && live.is_empty() {
                let room = UNJUDGED.saturating_sub(held.unjudged.len());
                held.unjudged.extend(sent.into_iter().take(room));
                sent = Vec::new();
            } else {
                sent.append(&mut held.unjudged);
            }
            let mut unserved: HashMap<(RunKey, String), Vec<String>> = HashMap::new();
            for (key, step, runs_on) in sent {
                if !live.iter().any(|labels| labels_match(&runs_on, labels)) {
                    let reason = if runs_on.is_empty() {
                        "no executor is running".to_string()
                    } else {
                        let wanted: Vec<String> = runs_on.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        format!("no live executor has labels {}", wanted.join(", "))
                    };
                    unserved.entry((key, reason)).or_default().push(step);
                }
            }
            for ((key, reason), steps) in unserved {
                let _ = reports.try_send(Event2::new(key, Event::StepWaiting(StepWaiting { steps, reason })));
            }
        }
    }

    /// One admission round over everything held.
    async fn admit(
        &self,
        held: &mut Held,
        reports: &tokio::sync::mpsc::Sender<Event2>,
        valid: &Validity,
    ) -> Result<(), BusError> {
        if held.steps.values().all(BTreeMap::is_empty) {
            held.steps.clear();
            held.turns.clear();
            forget_idle_breakers(held, Instant::now());
            set_gauges(held, Instant::now());
            self.report_unserved(held, Vec::new(), reports).await;
            return Ok(());
        }
        let ns = self.bus.namespace().clone();
        let now = Instant::now();
        let wall = chrono::Utc::now();
        let window = self.settings.dispatch_window;
        // Taken out for the round and put back only when the round went through: a round that
        // failed half-way reads the counts afresh next time.
        let mut in_flight = match held.in_flight.take() {
            Some(f)
                if f.serves(
                    now,
                    held.steps.iter().map(|(t, q)| (t.as_str(), q.len())),
                    |t| self.limits.max_steps(t),
                    window,
                ) =>
            {
                f
            }
            _ => InFlight::new(self.bus.subject_counts(&ns.dispatch_stream(), &ns.dispatch_all()).await?, &ns, now),
        };
        let mut sent: Vec<(RunKey, String, BTreeMap<String, String>)> = Vec::new();
        // Tenants take turns, one step each, until nobody can admit more.
        let mut blocked: HashSet<String> = HashSet::new();
        let mut admitted: HashMap<RunKey, Vec<String>> = HashMap::new();
        let mut outgoing: Vec<Outgoing> = Vec::new();
        // Breakers (tenant, keys) whose probe this round chose: one probe per breaker.
        let mut probes: HashMap<String, HashSet<String>> = HashMap::new();
        // Pools (label sets) this round could not record: their steps wait for the next.
        let mut unrecorded: HashSet<String> = HashSet::new();
        loop {
            let mut admitted_any = false;
            for _ in 0..held.turns.len() {
                let Some(tenant) = held.turns.pop_front() else { break };
                held.turns.push_back(tenant.clone());
                if blocked.contains(&tenant) {
                    continue;
                }
                if window > 0 && in_flight.total >= u64::from(window) {
                    blocked.insert(tenant);
                    continue;
                }
                let limit = self.limits.max_steps(&tenant);
                if limit > 0 && in_flight.of(&tenant) >= u64::from(limit) {
                    blocked.insert(tenant);
                    continue;
                }
                let Some(queue) = held.steps.get_mut(&tenant) else { continue };
                let mut chosen = None;
                let mut probe = None;
                for (k, step) in queue.iter() {
                    if step.dispatch.not_before.is_some_and(|t| t > wall) {
                        continue;
                    }
                    if !unrecorded.is_empty() && unrecorded.contains(&pool_token(&step.dispatch.step.runs_on)) {
                        continue;
                    }
                    // Held by its breaker while open, or while this round sends its probe.
                    let gate = match &step.dispatch.step.circuit_breaker {
                        Some(cb) => match held.breakers.get_mut(&tenant).and_then(|b| b.get_mut(&cb.key)) {
                            Some(b) => {
                                b.configure(cb.failures, cb.cooldown_seconds);
                                match b.gate(now) {
                                    Gate::Probe if probes.get(&tenant).is_some_and(|p| p.contains(&cb.key)) => {
                                        Gate::Open
                                    }
                                    gate => gate,
                                }
                            }
                            None => Gate::Closed,
                        },
                        None => Gate::Closed,
                    };
                    if gate == Gate::Open {
                        continue;
                    }
                    if let Some(rl) = &step.dispatch.step.rate_limit {
                        let cap = f64::from(rl.burst.unwrap_or(1));
                        let bucket = held.buckets.entry((tenant.clone(), rl.key.clone())).or_insert_with(|| Bucket {
                            tokens: cap,
                            at: now,
                            rate: rl.per_second,
                            cap,
                        });
                        (bucket.rate, bucket.cap) = (rl.per_second, cap);
                        bucket.refill(now);
                        if bucket.tokens < 1.0 {
                            continue;
                        }
                        bucket.tokens -= 1.0;
                    }
                    if gate == Gate::Probe {
                        probe = step.dispatch.step.circuit_breaker.as_ref().map(|cb| cb.key.clone());
                    }
                    chosen = Some(*k);
                    break;
                }
                let Some(k) = chosen else {
                    blocked.insert(tenant);
                    continue;
                };
                if let Some(key) = probe {
                    probes.entry(tenant.clone()).or_default().insert(key);
                }
                if let Err(e) = valid.check() {
                    hold_again(held, outgoing);
                    return Err(e);
                }
                let step = queue.remove(&k).expect("chosen from the queue");
                let pool = pool_token(&step.dispatch.step.runs_on);
                if !held.pools.contains(&pool) {
                    if let Err(e) = self.register_pool(&pool, &step.dispatch.step.runs_on).await {
                        // Kept for the next round, which tries again; the rest of this round goes
                        // on without the steps of that label set (POOLS full, say, must not stop
                        // every tenant's other steps).
                        if held.pools_warned.is_none_or(|at| at.elapsed() >= POOL_WARNING_EVERY) {
                            tracing::warn!(error = %e, %pool, "a label set could not be recorded; its steps wait");
                            held.pools_warned = Some(now);
                        }
                        // What choosing it took is given back: its rate limit's token, its probe.
                        if let Some(rl) = &step.dispatch.step.rate_limit
                            && let Some(bucket) = held.buckets.get_mut(&(tenant.clone(), rl.key.clone()))
                        {
                            bucket.tokens += 1.0;
                        }
                        if let Some(cb) = &step.dispatch.step.circuit_breaker
                            && let Some(p) = probes.get_mut(&tenant)
                        {
                            p.remove(&cb.key);
                        }
                        held.steps.get_mut(&tenant).expect("chosen from this tenant's queue").insert(k, step);
                        unrecorded.insert(pool);
                        continue;
                    }
                    held.pools.insert(pool.clone());
                }
                outgoing.push((tenant.clone(), k, ns.dispatch(&tenant, &pool), step));
                in_flight.admitted(&tenant);
                admitted_any = true;
            }
            if !admitted_any {
                break;
            }
        }
        // The round's admissions go out together: every enqueue in flight at once, then every
        // admitted READY entry deleted at once. An enqueue that fails keeps its step held for
        // the next round; one that succeeded is not sent again, since its READY entry goes.
        // Each enqueue checks the lease first: a leader whose lease ran out while its round was
        // in flight stops there, so it cannot add to what a successor has counted.
        let results = futures::stream::iter(outgoing.into_iter().map(|(tenant, k, subject, step)| async move {
            let d = &step.dispatch;
            let msg_id = format!("{}:{}:{}", d.run_id, d.step.id, d.dispatch);
            let result = match valid.check() {
                Ok(()) => self.bus.enqueue(subject, &msg_id, d, d.traceparent.as_deref()).await,
                Err(e) => Err(e),
            };
            (tenant, k, step, result)
        }))
        .buffered(PIPELINE)
        .collect::<Vec<_>>()
        .await;
        let mut failure = None;
        let mut done = Vec::new();
        for (tenant, k, step, result) in results {
            if let Err(e) = result {
                held.steps.entry(tenant).or_default().insert(k, step);
                failure = Some(e);
                continue;
            }
            done.push(k.1);
            if let Some(cb) = &step.dispatch.step.circuit_breaker
                && probes.get(&tenant).is_some_and(|p| p.contains(&cb.key))
                && let Some(b) = held.breakers.get_mut(&tenant).and_then(|b| b.get_mut(&cb.key))
                && b.gate(now) == Gate::Probe
            {
                let d = &step.dispatch;
                let limit = Duration::from_secs(d.step.time_limit_secs().unwrap_or(0).saturating_add(60));
                let wait = PROBE_WAIT.max(b.cooldown).max(limit.min(PROBE_WAIT_MAX));
                b.probing((d.run_id, d.step.id.clone()), now + wait);
            }
            let key = RunKey { tenant: tenant.clone(), run_id: step.dispatch.run_id };
            if step.reported {
                admitted.entry(key.clone()).or_default().push(step.dispatch.step.id.clone());
            }
            sent.push((key, step.dispatch.step.id.clone(), step.dispatch.step.runs_on.clone()));
        }
        metrics::counter!("taskmesh_dispatch_admitted_total").increment(done.len() as u64);
        for seq in done {
            held.removals.done(seq);
        }
        for (key, steps) in admitted {
            let _ = reports.try_send(Event2::new(key, Event::StepAdmitted(StepAdmitted { steps })));
        }
        self.report_unserved(held, sent, reports).await;
        // Say why the rest waits, once each, for holds that last: one event per run and reason.
        let mut waiting: HashMap<(RunKey, String), Vec<String>> = HashMap::new();
        for (tenant, queue) in held.steps.iter_mut() {
            let limit = self.limits.max_steps(tenant);
            let used = in_flight.of(tenant);
            for step in queue.values_mut().filter(|s| !s.reported && now.duration_since(s.since) >= REPORT_AFTER) {
                // A step held only by its `not_before` shows its `retry_at` instead.
                let reason = if step.dispatch.not_before.is_some_and(|t| t > wall) {
                    continue;
                } else if limit > 0 && used >= u64::from(limit) {
                    format!("tenant concurrency limit ({limit} steps)")
                } else if window > 0 && in_flight.total >= u64::from(window) {
                    format!("dispatch window full ({window} steps across tenants)")
                } else if let Some((key, b)) = step.dispatch.step.circuit_breaker.as_ref().and_then(|cb| {
                    let b = held.breakers.get(tenant)?.get(&cb.key).filter(|b| b.gate(now) != Gate::Closed)?;
                    Some((&cb.key, b))
                }) {
                    format!("circuit breaker '{key}' open ({} failed attempts in a row)", b.failures)
                } else if let Some(rl) = &step.dispatch.step.rate_limit {
                    format!("rate limit '{}' ({}/s)", rl.key, rl.per_second)
                } else {
                    continue;
                };
                let key = RunKey { tenant: tenant.clone(), run_id: step.dispatch.run_id };
                waiting.entry((key, reason)).or_default().push(step.dispatch.step.id.clone());
                step.reported = true;
            }
        }
        for ((key, reason), steps) in waiting {
            let _ = reports.try_send(Event2::new(key, Event::StepWaiting(StepWaiting { steps, reason })));
        }
        held.steps.retain(|_, q| !q.is_empty());
        held.turns.retain(|t| held.steps.contains_key(t));
        if let Some(e) = failure {
            return Err(e);
        }
        held.in_flight = Some(in_flight);
        forget_idle_breakers(held, now);
        set_gauges(held, now);
        // A bucket that has filled up again is the same as a new one.
        held.buckets.retain(|_, b| {
            b.refill(now);
            b.tokens < b.cap
        });
        Ok(())
    }

    /// Admits runs whose concurrency group and tenant run limit both have room, in submission
    /// order per group. A run waiting for one group does not hold back runs of other groups.
    async fn admit_runs(
        &self,
        held: &mut Held,
        reports: &tokio::sync::mpsc::Sender<Event2>,
        valid: &Validity,
    ) -> Result<(), BusError> {
        let ns = self.bus.namespace().clone();
        let mut members: HashMap<(String, String), HashSet<Uuid>> = HashMap::new();
        let mut full: HashSet<(String, String)> = HashSet::new();
        let seqs: Vec<u64> = held.runs.keys().copied().collect();
        for seq in seqs {
            let (tenant, run_id, group, tenant_max_runs) = {
                let run = &held.runs[&seq];
                (run.tenant.clone(), run.run_id, run.concurrency.clone(), run.tenant_max_runs)
            };
            let key = RunKey { tenant: tenant.clone(), run_id };
            // The groups the run must enter: (group, limit).
            let mut groups: Vec<((String, String), u32)> = Vec::new();
            if let Some(c) = &group {
                groups.push(((tenant.clone(), c.token()), c.limit));
            }
            if let Some(n) = tenant_max_runs {
                groups.push(((tenant.clone(), TENANT_RUNS_GROUP.to_string()), n));
            }
            let mut lacking = Vec::new();
            for (g, limit) in &groups {
                if !members.contains_key(g) {
                    let counts = self.bus.subject_counts(&ns.groups_stream(), &ns.group_all(&g.0, &g.1)).await?;
                    let ids = counts.keys().filter_map(|s| s.rsplit('.').next()?.parse::<Uuid>().ok()).collect();
                    members.insert(g.clone(), ids);
                }
                let active = &members[g];
                let room = active.contains(&run_id) || (!full.contains(g) && active.len() < *limit as usize);
                if !room {
                    lacking.push((g.clone(), *limit));
                }
            }
            let decisive = lacking.is_empty() || group.as_ref().is_some_and(|c| c.policy != GroupPolicy::Queue);
            if decisive {
                // About to admit, skip, or cancel others: a run that ended while it waited
                // (cancelled) no longer wants a place. (Waiting runs are not looked up every
                // round; a cancelled one is dropped by its `run_ended` signal, or here.)
                // One whose events aged out of the log (none left) is as good as ended: it takes
                // no place it would never give back.
                let last = self.bus.last(&ns.run(&key)).await?;
                if last.is_none_or(|last| last.envelope.event.is_run_terminal()) {
                    held.runs.remove(&seq);
                    held.removals.done(seq);
                    continue;
                }
            }
            if lacking.is_empty() {
                valid.check()?;
                for (g, _) in &groups {
                    let member = ns.group_member(&g.0, &g.1, run_id);
                    self.bus.enqueue(member, &format!("group:{}:{run_id}", g.1), &run_id, None).await?;
                    members.get_mut(g).expect("loaded").insert(run_id);
                }
                let admitted = Event::RunAdmitted(RunAdmitted { run_id });
                append_to_run(&self.bus, &key, admitted, &format!("admit:{run_id}")).await?;
                held.runs.remove(&seq);
                held.removals.done(seq);
                continue;
            }
            // Later runs of a full group wait behind this one.
            full.extend(lacking.iter().map(|(g, _)| g.clone()));
            let group_full = group.as_ref().filter(|c| lacking.iter().any(|(g, _)| g.1 == c.token()));
            if let Some(c) = group_full {
                match c.policy {
                    GroupPolicy::Skip => {
                        let event = Event::RunCancelRequested(RunCancelRequested {
                            run_id,
                            reason: format!("skipped: concurrency group '{}' is full (limit {})", c.key, c.limit),
                            key_id: None,
                            timed_out: false,
                        });
                        append_to_run(&self.bus, &key, event, &format!("skip:{run_id}")).await?;
                        held.runs.remove(&seq);
                        held.removals.done(seq);
                        continue;
                    }
                    GroupPolicy::CancelInProgress => {
                        let active: Vec<Uuid> = members[&(tenant.clone(), c.token())].iter().copied().collect();
                        for old in active {
                            if held.cancelling.insert(old) {
                                let event = Event::RunCancelRequested(RunCancelRequested {
                                    run_id: old,
                                    reason: format!("superseded by run {run_id} in concurrency group '{}'", c.key),
                                    key_id: None,
                                    timed_out: false,
                                });
                                let old_key = RunKey { tenant: tenant.clone(), run_id: old };
                                // Asked only once it is in the log: a failed append is tried
                                // again by the next round, rather than never.
                                let appended =
                                    append_to_run(&self.bus, &old_key, event, &format!("supersede:{old}")).await;
                                if appended.is_err() {
                                    held.cancelling.remove(&old);
                                }
                                appended?;
                            }
                        }
                    }
                    GroupPolicy::Queue => {}
                }
            }
            let run = held.runs.get_mut(&seq).expect("present");
            if !run.reported {
                let reason = match group_full {
                    Some(c) => format!("concurrency group '{}' is full (limit {})", c.key, c.limit),
                    None => format!("tenant concurrent-run limit ({} runs)", lacking[0].1),
                };
                let _ = reports.try_send(Event2::new(key.clone(), Event::RunWaiting(RunWaiting { run_id, reason })));
                run.reported = true;
            }
        }
        // Runs asked to cancel are gone from their groups once no group lists them.
        let listed: HashSet<Uuid> = members.values().flatten().copied().collect();
        held.cancelling.retain(|r| listed.contains(r));
        Ok(())
    }
}

/// A held step's place in its tenant's queue: priority (highest first), then its READY entry's
/// sequence, then its place in that entry.
type StepKey = (Reverse<i32>, u64, u32);

/// A step a round has chosen: its tenant, its key among the tenant's held steps, the subject
/// it goes to, the step.
type Outgoing = (String, StepKey, String, HeldStep);

/// Records what an executor said of an attempt behind a circuit breaker (a `BreakerSignal`).
/// A signal that does not parse or names no valid tenant, key or limits is dropped (anyone on
/// the bus could send one); a success or no verdict for a breaker not remembered changes
/// nothing, and a tenant remembering [`MAX_BREAKERS`] adds no more.
fn breaker_signal(held: &mut Held, payload: &[u8], now: Instant) {
    let Ok(b) = serde_json::from_slice::<BreakerSignal>(payload) else { return };
    if !in_bounds(&b.tenant, &b.key, b.failures, b.cooldown_seconds) {
        tracing::warn!(tenant = %b.tenant, key = %b.key, "a circuit breaker signal out of bounds; dropped");
        return;
    }
    let verdict = match b.succeeded {
        Some(true) => "success",
        Some(false) => "failure",
        None => "none",
    };
    metrics::counter!("taskmesh_circuit_breaker_signals_total", "verdict" => verdict).increment(1);
    let step = (b.run_id, b.step);
    if let Some(breaker) = held.breakers.get_mut(&b.tenant).and_then(|t| t.get_mut(&b.key)) {
        // One with nothing left to remember goes at the round that follows every signal.
        if breaker.record(&step, b.succeeded, now) {
            held.breakers_changed.push((b.tenant, b.key));
        }
        return;
    }
    // Only a failure starts a breaker's memory.
    if b.succeeded != Some(false) {
        return;
    }
    let mut breaker = Breaker::new(b.failures, b.cooldown_seconds);
    breaker.record(&step, b.succeeded, now);
    if insert_capped(&mut held.breakers, &b.tenant, &b.key, breaker) {
        held.breakers_changed.push((b.tenant, b.key));
    }
}

/// Whether a breaker's tenant and key are tokens and its limits within a step's bounds (a
/// signal or a kept state may come from anyone on the bus).
fn in_bounds(tenant: &str, key: &str, threshold: u32, cooldown_seconds: u64) -> bool {
    taskmesh_events::subjects::is_token(tenant)
        && taskmesh_events::subjects::is_token(key)
        && CircuitBreakerDef::FAILURES.contains(&threshold)
        && CircuitBreakerDef::COOLDOWN_SECS.contains(&cooldown_seconds)
}

/// Remembers `breaker` unless that would pass [`MAX_BREAKER_TENANTS`] tenants or
/// [`MAX_BREAKERS`] of the tenant's; whether it did.
fn insert_capped(
    breakers: &mut HashMap<String, HashMap<String, Breaker>>,
    tenant: &str,
    key: &str,
    breaker: Breaker,
) -> bool {
    if !breakers.contains_key(tenant) && breakers.len() >= MAX_BREAKER_TENANTS {
        return false;
    }
    let keyed = breakers.entry(tenant.to_string()).or_default();
    if keyed.len() >= MAX_BREAKERS && !keyed.contains_key(key) {
        return false;
    }
    keyed.insert(key.to_string(), breaker);
    true
}

/// What the keeper of breakers' states is to do with one.
enum Keeping {
    /// Keep its state.
    Put(BreakerState),
    /// Forget it (closed, nothing to remember): its subject is purged.
    Forget { tenant: String, key: String },
}

/// Hands the state of the breakers changed since the last call to the task that keeps them for
/// the next leader: a breaker with something to remember is kept, one closed with none is
/// forgotten (best effort: with its queue full, a state is not kept, and a new leader would
/// start from the one before).
fn keep_changed_breakers(held: &mut Held, keep: &tokio::sync::mpsc::Sender<Keeping>, now: Instant) {
    let wall = Utc::now();
    let mut changed = std::mem::take(&mut held.breakers_changed);
    changed.sort();
    changed.dedup();
    for (tenant, key) in changed {
        let keeping = match held.breakers.get(&tenant).and_then(|b| b.get(&key)) {
            Some(breaker) if !breaker.is_idle(now) => Keeping::Put(breaker.kept(&tenant, &key, now, wall)),
            _ => Keeping::Forget { tenant: tenant.clone(), key: key.clone() },
        };
        if keep.try_send(keeping).is_err() {
            tracing::warn!(%tenant, %key, "a circuit breaker's state was not kept: the queue is full");
        }
    }
}

/// Keeps (or forgets) each breaker state it is handed on `{NS}_BREAKERS`, in order.
async fn keep_breakers(bus: Bus, mut states: tokio::sync::mpsc::Receiver<Keeping>) {
    let ns = bus.namespace().clone();
    while let Some(keeping) = states.recv().await {
        let done = match &keeping {
            Keeping::Put(state) => bus.put(ns.breaker(&state.tenant, &state.key), state).await.map(drop),
            Keeping::Forget { tenant, key } => {
                bus.purge_subject(&ns.breakers_stream(), &ns.breaker(tenant, key)).await.map(drop)
            }
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not keep a circuit breaker's state");
        }
    }
}

/// The breakers a previous leader kept, with something to remember (within the caps): a new
/// leader starts from them, not with every breaker closed. Read through one consumer, within
/// [`LOAD_WITHIN`] (admissions wait for it): past that, they start closed.
async fn kept_breakers(bus: &Bus) -> HashMap<String, HashMap<String, Breaker>> {
    let ns = bus.namespace();
    let (stream, filter) = (ns.breakers_stream(), ns.breakers_all());
    let read = bus.last_of_each::<BreakerState>(&stream, &filter);
    let kept = match tokio::time::timeout(LOAD_WITHIN, read).await {
        Ok(Ok(kept)) => kept,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not read the circuit breakers' kept state; they start closed");
            return HashMap::new();
        }
        Err(_) => {
            tracing::warn!("the circuit breakers' kept state took too long to read; they start closed");
            return HashMap::new();
        }
    };
    let (now, wall) = (Instant::now(), Utc::now());
    let mut breakers: HashMap<String, HashMap<String, Breaker>> = HashMap::new();
    for k in kept {
        if let Some(breaker) = Breaker::from_kept(&k, now, wall).filter(|b| !b.is_idle(now)) {
            insert_capped(&mut breakers, &k.tenant, &k.key, breaker);
        }
    }
    breakers
}

/// The leader's gauges: steps held, and breakers open (or half-open).
fn set_gauges(held: &Held, now: Instant) {
    let steps: usize = held.steps.values().map(BTreeMap::len).sum();
    metrics::gauge!("taskmesh_dispatch_held_steps").set(steps as f64);
    let open = held.breakers.values().flat_map(HashMap::values).filter(|b| b.gate(now) != Gate::Closed).count();
    metrics::gauge!("taskmesh_circuit_breakers_open").set(open as f64);
}

/// Forgets breakers with nothing to remember (see [`Breaker::is_idle`]), noting each as
/// changed, so its kept state goes too.
fn forget_idle_breakers(held: &mut Held, now: Instant) {
    let Held { breakers, breakers_changed, .. } = held;
    for (tenant, keyed) in breakers.iter_mut() {
        keyed.retain(|key, b| {
            let idle = b.is_idle(now);
            if idle {
                breakers_changed.push((tenant.clone(), key.clone()));
            }
            !idle
        });
    }
    breakers.retain(|_, b| !b.is_empty());
}

/// Puts steps a round had chosen but not sent back among the held ones (their READY entries
/// are still there), so a round that stops half-way loses none of them.
fn hold_again(held: &mut Held, outgoing: Vec<Outgoing>) {
    for (tenant, k, _, step) in outgoing {
        held.steps.entry(tenant).or_default().insert(k, step);
    }
}

/// An informational event for a run, appended in the background (losing one to a crash
/// costs only the reason shown in the API).
struct Event2 {
    key: RunKey,
    event: Event,
}

impl Event2 {
    fn new(key: RunKey, event: Event) -> Self {
        Self { key, event }
    }
}

/// Appends the dispatcher's informational events, a few at a time.
async fn report(bus: Bus, mut rx: tokio::sync::mpsc::Receiver<Event2>) {
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    while let Some(e) = rx.recv().await {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let bus = bus.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let msg_id = Uuid::now_v7().to_string();
            if let Err(err) = append_to_run(&bus, &e.key, e.event, &msg_id).await {
                tracing::debug!(error = %err, "informational event not appended");
            }
        });
    }
    let _ = limit.acquire_many(8).await;
}

/// Appends one event to a run's subject after whatever is there, deduplicated by `msg_id`.
/// A subject with nothing there gets nothing: the run's events aged out of the log (it waited
/// longer than `nats.events_max_age_days`), and a run's log begins with its submission. An
/// event alone there would stand in the way of the next submission of the run's idempotency
/// key, which would be answered as a repeat of it.
pub(crate) async fn append_to_run(bus: &Bus, key: &RunKey, event: Event, msg_id: &str) -> Result<(), BusError> {
    let subject = bus.namespace().run(key);
    let envelope = EventMeta::new(&key.tenant).envelope(subject.clone(), event);
    for _ in 0..crate::MAX_CONFLICTS {
        let last = bus.last_seq(&subject).await?;
        if last == 0 {
            tracing::debug!(%subject, "the run's events are gone from the log; nothing appended");
            return Ok(());
        }
        match bus.append_with_id(Some(last), &envelope, msg_id).await {
            Ok(_) => return Ok(()),
            Err(BusError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(BusError::Nats(format!("gave up appending to {subject}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskmesh_events::subjects::Namespace;

    fn read(counts: &[(&str, &str, u64)], now: Instant) -> InFlight {
        let ns = Namespace::new("tm").expect("a valid namespace");
        let counts = counts.iter().map(|(tenant, pool, n)| (ns.dispatch(tenant, pool), *n)).collect();
        InFlight::new(counts, &ns, now)
    }

    #[test]
    fn a_kept_breaker_is_read_back_by_the_next_leader_as_it_was_within_its_bounds() {
        let (t0, wall) = (Instant::now(), Utc::now());
        let secs = Duration::from_secs;
        let mut b = Breaker::new(2, 10);
        b.record(&(Uuid::nil(), "a".into()), Some(false), t0);
        b.record(&(Uuid::nil(), "b".into()), Some(false), t0);
        b.probing((Uuid::nil(), "c".into()), t0 + secs(60));
        let kept: BreakerState =
            serde_json::from_slice(&serde_json::to_vec(&b.kept("t", "k", t0, wall)).unwrap()).unwrap();
        assert_eq!((kept.failures, kept.threshold, kept.cooldown_seconds), (2, 2, 10));
        // Another leader, three seconds later on the wall clock, on its own clock.
        let (t1, later) = (Instant::now(), wall + chrono::Duration::seconds(3));
        let read = Breaker::from_kept(&kept, t1, later).unwrap();
        assert_eq!(read.failures, 2);
        assert!(read.gate(t1 + secs(6)) == Gate::Open, "still open for the rest of its cooldown");
        assert!(read.gate(t1 + secs(7)) == Gate::Probe, "then a probe goes: the old leader's is not waited for");
        // A record opening it for longer than its cooldown is held to the cooldown; one whose
        // opening has passed lets a probe go at once; one out of bounds is not read.
        let long = BreakerState { open_until: Some(wall + chrono::Duration::days(400)), ..kept };
        let read = Breaker::from_kept(&long, t1, wall).unwrap();
        assert!(read.gate(t1 + secs(10)) == Gate::Probe);
        let passed = BreakerState { open_until: Some(wall - chrono::Duration::seconds(5)), ..long };
        assert!(Breaker::from_kept(&passed, t1, wall).unwrap().gate(t1) == Gate::Probe);
        let closed = BreakerState { open_until: None, failures: 0, ..passed };
        assert!(Breaker::from_kept(&closed, t1, wall).unwrap().is_idle(t1), "nothing to remember");
        for bad in [
            BreakerState { threshold: 0, ..b.kept("t", "k", t0, wall) },
            BreakerState { cooldown_seconds: 1 << 40, ..b.kept("t", "k", t0, wall) },
            b.kept("t", "no such.key", t0, wall),
            b.kept("t.x", "k", t0, wall),
        ] {
            assert!(Breaker::from_kept(&bad, t1, wall).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_breaker_opens_on_failures_in_a_row_and_then_hears_only_its_probe() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let step = |n: u8| (Uuid::from_bytes([n; 16]), format!("s{n}"));
        let mut b = Breaker::new(2, 10);
        b.record(&step(1), Some(false), t0);
        b.record(&step(2), Some(true), t0);
        b.record(&step(3), Some(false), t0);
        assert!(!b.record(&step(4), None, t0), "no verdict changes nothing to keep");
        assert!(b.gate(t0) == Gate::Closed, "a success in between starts the count again; no verdict counts nothing");
        b.record(&step(5), Some(false), t0);
        assert!(b.gate(t0) == Gate::Open && b.gate(t0 + secs(9)) == Gate::Open);
        // Attempts that went before it opened are not heard while it is open.
        assert!(!b.record(&step(6), Some(true), t0 + secs(1)), "nor does an attempt other than the probe");
        assert!(!b.record(&step(7), Some(false), t0 + secs(1)));
        assert!(b.gate(t0 + secs(9)) == Gate::Open, "a late success does not close it");
        assert!(b.gate(t0 + secs(10)) == Gate::Probe, "nor does a late failure push the cooldown back");
        b.probing(step(8), t0 + secs(10) + PROBE_WAIT);
        assert!(b.gate(t0 + secs(11)) == Gate::Open, "one probe at a time");
        b.record(&step(9), Some(true), t0 + secs(12));
        assert!(b.gate(t0 + secs(12)) == Gate::Open, "only the probe closes it");
        assert!(b.gate(t0 + secs(10) + PROBE_WAIT) == Gate::Probe, "a probe not heard of is given up");
        b.record(&step(8), None, t0 + secs(12));
        assert!(b.gate(t0 + secs(12)) == Gate::Probe, "a probe without a verdict lets another go");
        b.probing(step(10), t0 + secs(12) + PROBE_WAIT);
        b.record(&step(10), Some(false), t0 + secs(13));
        assert!(b.gate(t0 + secs(22)) == Gate::Open, "a failed probe opens it again, for a cooldown");
        assert!(b.gate(t0 + secs(23)) == Gate::Probe);
        assert_eq!(b.failures, 3);
        b.probing(step(11), t0 + secs(23) + PROBE_WAIT);
        b.record(&step(11), Some(true), t0 + secs(24));
        assert!(b.gate(t0 + secs(24)) == Gate::Closed && b.is_idle(t0), "the probe's success closes it");
        // An open breaker nobody comes to is forgotten a day after its cooldown.
        let mut lonely = Breaker::new(1, 10);
        lonely.record(&step(12), Some(false), t0);
        assert!(!lonely.is_idle(t0 + secs(10)) && lonely.is_idle(t0 + secs(11) + FORGET_AFTER));
        // So is a closed one with failures, a day after the last; and one whose probe was never
        // heard of, a day after its wait.
        let mut failing = Breaker::new(3, 10);
        failing.record(&step(13), Some(false), t0);
        assert!(!failing.is_idle(t0 + FORGET_AFTER) && failing.is_idle(t0 + secs(1) + FORGET_AFTER));
        lonely.probing(step(14), t0 + secs(20));
        assert!(!lonely.is_idle(t0 + secs(19) + FORGET_AFTER) && lonely.is_idle(t0 + secs(21) + FORGET_AFTER));
    }

    #[test]
    fn breaker_signals_out_of_bounds_or_for_breakers_not_remembered_change_nothing() {
        let now = Instant::now();
        let mut held = Held::default();
        let signal = |tenant: &str, failures: u32, cooldown: u64, succeeded: Option<bool>| {
            serde_json::to_vec(&BreakerSignal {
                tenant: tenant.into(),
                key: "k".into(),
                failures,
                cooldown_seconds: cooldown,
                run_id: Uuid::now_v7(),
                step: "s".into(),
                succeeded,
            })
            .unwrap()
        };
        let bad_key = serde_json::to_vec(&serde_json::json!({
            "tenant": "t", "key": "a b", "failures": 1, "cooldown_seconds": 1,
            "run_id": Uuid::now_v7(), "step": "s", "succeeded": false
        }))
        .unwrap();
        for bad in [
            signal("t", 1, u64::MAX, Some(false)),
            signal("t", 1, 86_401, Some(false)),
            signal("t", 0, 1, Some(false)),
            signal("t", 1_001, 1, Some(false)),
            signal("a.b", 1, 1, Some(false)),
            bad_key,
        ] {
            breaker_signal(&mut held, &bad, now);
        }
        breaker_signal(&mut held, b"not json", now);
        breaker_signal(&mut held, &signal("t", 1, 1, Some(true)), now);
        breaker_signal(&mut held, &signal("t", 1, 1, None), now);
        assert!(held.breakers.is_empty(), "nothing remembered");
        breaker_signal(&mut held, &signal("t", 1, 30, Some(false)), now);
        assert!(held.breakers["t"]["k"].gate(now) == Gate::Open, "a failure opens a one-failure breaker");
        // A tenant remembers at most MAX_BREAKERS.
        for n in 0..=MAX_BREAKERS {
            let failed = BreakerSignal {
                tenant: "many".into(),
                key: format!("k{n}"),
                failures: 5,
                cooldown_seconds: 30,
                run_id: Uuid::now_v7(),
                step: "s".into(),
                succeeded: Some(false),
            };
            breaker_signal(&mut held, &serde_json::to_vec(&failed).unwrap(), now);
        }
        assert_eq!(held.breakers["many"].len(), MAX_BREAKERS);
        // Forgotten a day after its cooldown, a breaker is noted as changed, so its kept
        // state is purged too.
        held.breakers_changed.clear();
        held.breakers.remove("many");
        forget_idle_breakers(&mut held, now + Duration::from_secs(30) + FORGET_AFTER + Duration::from_secs(1));
        assert!(held.breakers.is_empty());
        assert_eq!(held.breakers_changed, [("t".to_string(), "k".to_string())]);
    }

    #[test]
    fn done_entries_below_the_oldest_held_go_in_one_purge_and_the_rest_once_overdue() {
        let t0 = Instant::now();
        let mut r = Removals { last_read: 10, ..Default::default() };
        // 1..=4 and 6..=8 admitted; 5 still held (a retry waiting for its backoff).
        r.pending.extend([1, 2, 3, 4, 6, 7, 8].map(|s| (s, t0)));
        let (purge, overdue) = r.due(Some(5), t0, REMOVE_AFTER);
        assert_eq!(purge, Some(5), "everything below the held entry in one request");
        assert!(overdue.is_empty());
        assert_eq!(r.pending.keys().copied().collect::<Vec<_>>(), [6, 7, 8]);
        // Nothing new below the held entry: no request at all.
        assert_eq!(r.due(Some(5), t0, REMOVE_AFTER), (None, Vec::new()));
        // Still held a second later: the entries above it go one by one.
        let (purge, overdue) = r.due(Some(5), t0 + REMOVE_AFTER, REMOVE_AFTER);
        assert_eq!((purge, overdue), (None, vec![6, 7, 8]));
        assert!(r.pending.is_empty());
        // Nothing held: everything read so far may go, but never what has not been read.
        r.pending.extend([5, 9].map(|s| (s, t0)));
        assert_eq!(r.due(None, t0, REMOVE_AFTER), (Some(11), Vec::new()));
        r.last_read = 20;
        r.pending.insert(15, t0);
        assert_eq!(r.due(Some(12), t0, REMOVE_AFTER), (None, Vec::new()), "15 is above the held 12");
        assert_eq!(r.due(None, t0, REMOVE_AFTER), (Some(21), Vec::new()));
    }

    #[test]
    fn an_entry_of_several_steps_is_removed_only_once_each_of_its_steps_is_done() {
        let t0 = Instant::now();
        let mut held = Held::default();
        let step = |id: &str| noop_dispatch("t", id);
        // Entry 1 holds one step; entry 2 a fan-out of three, the last with a higher priority.
        held.removals.last_read = 2;
        held.hold_step(1, 0, step("a"), 0);
        held.removals.holds(2, 3);
        for (i, (id, priority)) in [("b", 0), ("c", 0), ("d", 5)].into_iter().enumerate() {
            held.hold_step(2, i as u32, step(id), priority);
        }
        let queue = &held.steps["t"];
        let order: Vec<_> = queue.values().map(|s| s.dispatch.step.id.as_str()).collect();
        assert_eq!(order, ["d", "a", "b", "c"], "priority first, then the entry, then the place in it");
        // All but one of entry 2's steps admitted, and entry 1's.
        for k in [(Reverse(5), 2, 2), (Reverse(0), 1, 0), (Reverse(0), 2, 0)] {
            held.steps.get_mut("t").unwrap().remove(&k).unwrap();
            held.removals.done(k.1);
        }
        assert_eq!(held.oldest(), Some(2));
        let (purge, overdue) = held.removals.due(held.oldest(), t0 + REMOVE_AFTER * 2, REMOVE_AFTER);
        assert_eq!((purge, overdue), (Some(2), Vec::new()), "entry 1 goes; entry 2 still holds a step");
        // Its last step admitted, the entry goes too.
        held.steps.get_mut("t").unwrap().remove(&(Reverse(0), 2, 1)).unwrap();
        held.removals.done(2);
        assert_eq!(held.oldest(), None);
        assert_eq!(held.removals.due(held.oldest(), t0, REMOVE_AFTER), (Some(3), Vec::new()));
        assert!(held.removals.parts_left.is_empty());
        // An entry of no steps is done with at once.
        held.removals.last_read = 3;
        held.removals.holds(3, 0);
        assert_eq!(held.removals.due(None, t0, REMOVE_AFTER), (Some(4), Vec::new()));
    }

    #[test]
    fn counts_add_up_each_tenants_pools_and_what_was_admitted_since() {
        let now = Instant::now();
        let mut f = read(&[("a", "any", 3), ("a", "l0123", 2), ("b", "any", 1)], now);
        assert_eq!((f.of("a"), f.of("b"), f.of("c"), f.total), (5, 1, 0, 6));
        f.admitted("c");
        f.admitted("a");
        assert_eq!((f.of("a"), f.of("c"), f.total), (6, 1, 8));
    }

    #[test]
    fn counts_serve_only_while_everything_held_fits_under_the_limits() {
        let now = Instant::now();
        let f = read(&[("a", "any", 5)], now);
        let limit = |t: &str| if t == "a" { 10 } else { 0 };
        // Room for all four held: no need to ask DISPATCH again.
        assert!(f.serves(now, [("a", 4)].into_iter(), limit, 0));
        // Admitting all five would reach the limit: what is there must be read afresh.
        assert!(!f.serves(now, [("a", 5)].into_iter(), limit, 0));
        // A tenant without a limit never needs it; a window does.
        assert!(f.serves(now, [("b", 1_000)].into_iter(), limit, 0));
        assert!(f.serves(now, [("b", 9)].into_iter(), limit, 15));
        assert!(!f.serves(now, [("b", 10)].into_iter(), limit, 15));
    }

    #[test]
    fn counts_are_read_again_once_they_are_old() {
        let then = Instant::now();
        let f = read(&[], then);
        assert!(f.serves(then + COUNTS_FOR / 2, [("a", 1)].into_iter(), |_| 0, 0));
        assert!(!f.serves(then + COUNTS_FOR, [("a", 1)].into_iter(), |_| 0, 0));
    }

    /// The first dispatch of a `noop` step `id` of a new run of `tenant`'s.
    fn noop_dispatch(tenant: &str, id: &str) -> Dispatch {
        Dispatch {
            tenant: tenant.into(),
            run_id: Uuid::now_v7(),
            dispatch: 1,
            step: serde_json::from_value(serde_json::json!({"id": id, "uses": "noop"})).unwrap(),
            not_before: None,
            traceparent: None,
            checkout: None,
            refresh_cache: false,
        }
    }

    /// A dispatcher on a test environment of its own, with its bus and namespace.
    async fn dispatcher_env() -> (taskmesh_testkit::TestEnv, Bus, Namespace, Dispatcher) {
        let env = taskmesh_testkit::TestEnv::new().await.unwrap();
        let bus = env.bus().await.unwrap();
        let dispatcher = Dispatcher::new(bus.clone(), env.settings.scheduler.clone(), LimitsSettings::default());
        let ns = bus.namespace().clone();
        (env, bus, ns, dispatcher)
    }

    /// Makes `stream` refuse every new message (a limit on a message's size: lowering its byte
    /// limit would remove what it holds as well); returns its configuration, to restore.
    async fn refusing(bus: &Bus, stream: String) -> async_nats::jetstream::stream::Config {
        let config = bus.jetstream().get_stream(stream).await.unwrap().info().await.unwrap().config.clone();
        let refusing = async_nats::jetstream::stream::Config { max_message_size: 1, ..config.clone() };
        bus.jetstream().update_stream(&refusing).await.unwrap();
        config
    }

    /// A step of `tenant`, held as if read from READY at sequence `seq`.
    fn hold(held: &mut Held, tenant: &str, seq: u64) {
        held.hold_step(seq, 0, noop_dispatch(tenant, &format!("s{seq}")), 0);
    }

    #[tokio::test]
    async fn an_event_for_a_run_whose_events_are_gone_is_not_appended() {
        let env = taskmesh_testkit::TestEnv::new().await.unwrap();
        let bus = env.bus().await.unwrap();
        let key = RunKey { tenant: "t".into(), run_id: Uuid::now_v7() };
        let subject = bus.namespace().run(&key);
        let waiting = || Event::RunWaiting(RunWaiting { run_id: key.run_id, reason: "held".into() });
        append_to_run(&bus, &key, waiting(), "w1").await.unwrap();
        assert_eq!(bus.last_seq(&subject).await.unwrap(), 0, "nothing on an empty subject");
        let first = bus.append(0, &EventMeta::new("t").envelope(subject.clone(), waiting())).await.unwrap();
        append_to_run(&bus, &key, waiting(), "w2").await.unwrap();
        assert!(bus.last_seq(&subject).await.unwrap() > first, "appended after the run's last event");
        env.cleanup().await;
    }

    /// A `cancel_in_progress` group's newcomer asks the run holding the group to cancel; an ask
    /// that could not be appended is made again by a later round.
    #[tokio::test]
    async fn a_supersession_that_failed_to_append_is_asked_again() {
        let (env, bus, ns, dispatcher) = dispatcher_env().await;
        let group = RunConcurrency { key: "deploy-prod".into(), limit: 1, policy: GroupPolicy::CancelInProgress };
        let (old, new) = (Uuid::now_v7(), Uuid::now_v7());
        let old_subject = ns.run(&RunKey { tenant: "t".into(), run_id: old });
        // Both runs have events in the log (a run whose events are gone is dropped, not admitted).
        for run_id in [old, new] {
            let waiting = Event::RunWaiting(RunWaiting { run_id, reason: "held".into() });
            let subject = ns.run(&RunKey { tenant: "t".into(), run_id });
            bus.append(0, &EventMeta::new("t").envelope(subject, waiting)).await.unwrap();
        }
        bus.enqueue(ns.group_member("t", &group.token(), old), "member", &old, None).await.unwrap();
        let mut held = Held::default();
        held.runs.insert(
            7,
            HeldRun {
                tenant: "t".into(),
                run_id: new,
                concurrency: Some(group),
                tenant_max_runs: None,
                reported: true,
            },
        );
        let (reports, _rx) = tokio::sync::mpsc::channel(16);
        let valid = Validity::new(Instant::now() + Duration::from_secs(60));
        let asked = || async {
            bus.read_subject(&old_subject, 0)
                .await
                .unwrap()
                .iter()
                .any(|e| matches!(e.envelope.event, Event::RunCancelRequested(_)))
        };
        // The log refuses appends.
        let events = refusing(&bus, ns.events_stream()).await;
        assert!(dispatcher.admit_runs(&mut held, &reports, &valid).await.is_err());
        assert!(!asked().await);
        bus.jetstream().update_stream(&events).await.unwrap();
        dispatcher.admit_runs(&mut held, &reports, &valid).await.unwrap();
        assert!(asked().await, "asked again once the log takes it");
        assert!(held.runs.contains_key(&7), "the newcomer waits for the old run to end");
        env.cleanup().await;
    }

    /// A run held for admission whose events aged out of the log meanwhile is dropped: it takes
    /// no place in its group it would never give back.
    #[tokio::test]
    async fn a_held_run_whose_events_are_gone_takes_no_place() {
        let (env, bus, ns, dispatcher) = dispatcher_env().await;
        let group = RunConcurrency { key: "nightly".into(), limit: 1, policy: GroupPolicy::Queue };
        let mut held = Held::default();
        let run = HeldRun {
            tenant: "t".into(),
            run_id: Uuid::now_v7(),
            concurrency: Some(group.clone()),
            tenant_max_runs: None,
            reported: false,
        };
        held.runs.insert(3, run);
        let (reports, _rx) = tokio::sync::mpsc::channel(16);
        let valid = Validity::new(Instant::now() + Duration::from_secs(60));
        dispatcher.admit_runs(&mut held, &reports, &valid).await.unwrap();
        assert!(held.runs.is_empty(), "dropped");
        let members = bus.subject_counts(&ns.groups_stream(), &ns.group_all("t", &group.token())).await.unwrap();
        assert!(members.is_empty(), "no place taken: {members:?}");
        env.cleanup().await;
    }

    /// A step whose label set cannot be recorded on POOLS (full) waits for a later round; the
    /// round admits every other tenant's steps meanwhile.
    #[tokio::test]
    async fn a_label_set_that_cannot_be_recorded_holds_only_its_own_steps() {
        let (env, bus, ns, dispatcher) = dispatcher_env().await;
        let mut held = Held::default();
        let mut gpu = noop_dispatch("a", "train");
        gpu.step.runs_on = BTreeMap::from([("gpu".to_string(), "nvidia".to_string())]);
        held.hold_step(1, 0, gpu, 0);
        hold(&mut held, "b", 2);
        let pools = refusing(&bus, ns.pools_stream()).await;
        let queued = |pool: String| {
            let (bus, ns) = (bus.clone(), ns.clone());
            async move {
                bus.subject_counts(&ns.dispatch_stream(), &ns.dispatch("*", &pool)).await.unwrap().values().sum::<u64>()
            }
        };
        let (reports, _rx) = tokio::sync::mpsc::channel(16);
        let valid = Validity::new(Instant::now() + Duration::from_secs(60));
        held.pools.insert(taskmesh_events::subjects::ANY_POOL.to_string());
        dispatcher.admit(&mut held, &reports, &valid).await.unwrap();
        assert_eq!(queued(taskmesh_events::subjects::ANY_POOL.to_string()).await, 1, "tenant b's step went out");
        assert_eq!(held.steps.values().map(BTreeMap::len).sum::<usize>(), 1, "tenant a's waits");
        bus.jetstream().update_stream(&pools).await.unwrap();
        dispatcher.admit(&mut held, &reports, &valid).await.unwrap();
        assert!(held.steps.is_empty(), "recorded now, it goes out too");
        let gpu_pool = pool_token(&BTreeMap::from([("gpu".to_string(), "nvidia".to_string())]));
        assert_eq!(queued(gpu_pool).await, 1);
        env.cleanup().await;
    }

    /// A leader gives up only its own claim: one who claimed the lease after ours ran out keeps
    /// it.
    #[tokio::test]
    async fn giving_up_the_lease_leaves_a_later_holders_claim() {
        let env = taskmesh_testkit::TestEnv::new().await.unwrap();
        let bus = env.bus().await.unwrap();
        let ns = bus.namespace().clone();
        bus.provision_leases(Duration::from_secs(3)).await.unwrap();
        let ours = bus.claim_lease(LEASE_KEY, "a", None).await.unwrap();
        // Ours ran out (the stream's age limit removes it) and another replica claimed it.
        bus.purge_subject(&ns.leases_stream(), &ns.lease(LEASE_KEY)).await.unwrap();
        let theirs = bus.claim_lease(LEASE_KEY, "b", None).await.unwrap();
        bus.release_lease(ours).await.unwrap();
        let claimed = bus.claim_lease(LEASE_KEY, "c", None).await;
        assert!(matches!(claimed, Err(BusError::Conflict { .. })), "still held: {claimed:?}");
        bus.release_lease(theirs).await.unwrap();
        bus.claim_lease(LEASE_KEY, "c", None).await.unwrap();
        env.cleanup().await;
    }

    #[tokio::test]
    async fn a_round_whose_lease_ran_out_sends_nothing_and_loses_no_step() {
        let (env, bus, _, dispatcher) = dispatcher_env().await;
        let mut held = Held::default();
        for (seq, tenant) in [(1, "a"), (2, "a"), (3, "b")] {
            hold(&mut held, tenant, seq);
        }
        let queued = || async {
            let ns = bus.namespace();
            bus.jetstream().get_stream(ns.dispatch_stream()).await.unwrap().info().await.unwrap().state.messages
        };
        let (reports, _rx) = tokio::sync::mpsc::channel(16);
        // Its lease ran out (another replica may lead by now): the round stops before sending.
        let lapsed = Validity::new(Instant::now() - Duration::from_millis(1));
        assert!(dispatcher.admit(&mut held, &reports, &lapsed).await.is_err());
        assert_eq!(held.steps.values().map(BTreeMap::len).sum::<usize>(), 3, "every step still held");
        assert_eq!(held.removals.pending.len(), 0, "no READY entry counted as done");
        assert_eq!(queued().await, 0, "nothing went onto the dispatch queue");
        // Steps a round had chosen when it stopped are held again.
        let mut chosen = Vec::new();
        let ns = bus.namespace();
        for (tenant, queue) in held.steps.iter_mut() {
            let (k, step) = queue.pop_first().unwrap();
            chosen.push((tenant.clone(), k, ns.dispatch(tenant, taskmesh_events::subjects::ANY_POOL), step));
        }
        hold_again(&mut held, chosen);
        assert_eq!(held.steps.values().map(BTreeMap::len).sum::<usize>(), 3);
        // Renewed, the next round sends them all, once each.
        let valid = Validity::new(Instant::now() + Duration::from_secs(30));
        dispatcher.admit(&mut held, &reports, &valid).await.unwrap();
        assert!(held.steps.is_empty());
        assert_eq!(held.removals.pending.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(queued().await, 3);
        env.cleanup().await;
    }
}
