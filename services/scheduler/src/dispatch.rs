//! The dispatcher: admission control between "a step is ready" and "executors may take it".
//!
//! Ready work is published to the READY stream (`command::Ready`); the stream holds exactly
//! what waits, since an entry is deleted once admitted. One scheduler replica at a time, the
//! holder of a leader lease (a subject of the LEASES stream, claimed and renewed with
//! expected-last-subject-sequence, expiring by the stream's `max_age`), reads READY from its
//! start and lets work through when:
//!
//! - the tenant has fewer than its limit of steps on the dispatch queue or running (the DISPATCH
//!   work queue holds a message per step from admission until its executor acks it, so its
//!   per-subject counts are the truth, whoever admitted them and whatever crashed since);
//! - the step's rate-limit bucket has a token, and its `not_before` has passed;
//! - for a run with a concurrency group: the group has room (the GROUPS stream holds one message
//!   per active run of a group, purged when the run ends).
//!
//! Within a tenant the highest priority goes first, then the oldest; tenants take turns, one
//! step each, so one tenant's backlog never holds another's work behind it. A step held for
//! longer than [`REPORT_AFTER`] gets a `StepWaiting` event with the reason (and `StepAdmitted`
//! when it goes), so the API can say why it waits; a held run gets `RunWaiting`.
//!
//! Crash safety: admitting is "enqueue on DISPATCH (deduplicated by message id), then delete
//! from READY"; a leader dying in between leaves the entry for the next leader, whose enqueue is
//! deduplicated (and a duplicate that slipped through is refused by the lease check).
//! Rate-limit buckets live in the leader's memory: a new leader starts them full.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use futures::StreamExt;
use taskmesh_bus::{Bus, BusError};
use taskmesh_config::SchedulerSettings;
use taskmesh_events::command::{CancelSignal, Dispatch, Ready};
use taskmesh_events::workflow::GroupPolicy;
use taskmesh_events::{
    Event, EventMeta, RunAdmitted, RunCancelRequested, RunConcurrency, RunKey, RunWaiting, StepAdmitted, StepWaiting,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The key of the dispatcher's leader lease.
const LEASE_KEY: &str = "dispatcher";
/// A hold shorter than this is not worth an event.
pub const REPORT_AFTER: Duration = Duration::from_millis(500);
/// How often held work is looked at again without a signal.
const TICK: Duration = Duration::from_millis(100);
/// Most entries read from READY before an admission round.
const READ_BATCH: usize = 4_096;

pub(crate) struct Dispatcher {
    bus: Bus,
    settings: SchedulerSettings,
    id: String,
}

/// A step waiting for admission.
struct HeldStep {
    dispatch: Dispatch,
    since: Instant,
    /// A `StepWaiting` was recorded for it.
    reported: bool,
}

/// A run waiting for its concurrency group.
struct HeldRun {
    tenant: String,
    run_id: Uuid,
    concurrency: RunConcurrency,
    reported: bool,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Held {
    /// Per tenant, in admission order: priority (highest first), then READY sequence.
    steps: HashMap<String, BTreeMap<(Reverse<i32>, u64), HeldStep>>,
    /// By READY sequence: submission order.
    runs: BTreeMap<u64, HeldRun>,
    /// Tenants in turn order.
    turns: VecDeque<String>,
    buckets: HashMap<(String, String), Bucket>,
    /// Runs already asked to cancel for a `cancel_in_progress` group.
    cancelling: HashSet<Uuid>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.steps.values().all(BTreeMap::is_empty)
    }
}

/// Why a step is held.
enum Hold {
    TenantLimit(u32),
    Window(u32),
    RateLimit(String),
    NotBefore,
}

impl Dispatcher {
    pub fn new(bus: Bus, settings: SchedulerSettings) -> Self {
        Self { bus, settings, id: Uuid::now_v7().to_string() }
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
            match self.bus.claim_lease(LEASE_KEY, &self.id, None).await {
                Ok(claim) => {
                    tracing::info!(id = %self.id, "leading the dispatcher");
                    let lost = CancellationToken::new();
                    let renew = {
                        let (bus, id, lost, shutdown) =
                            (self.bus.clone(), self.id.clone(), lost.clone(), shutdown.clone());
                        tokio::spawn(async move {
                            let mut claim = claim;
                            loop {
                                tokio::select! {
                                    _ = shutdown.cancelled() => {
                                        // Hand over at once rather than at the lease's expiry.
                                        let _ = bus.release_lease(LEASE_KEY).await;
                                        lost.cancel();
                                        return;
                                    }
                                    _ = tokio::time::sleep(ttl / 3) => {}
                                }
                                match bus.claim_lease(LEASE_KEY, &id, Some(claim)).await {
                                    Ok(c) => claim = c,
                                    Err(e) => {
                                        tracing::warn!(error = %e, "lost the dispatcher lease");
                                        lost.cancel();
                                        return;
                                    }
                                }
                            }
                        })
                    };
                    if let Err(e) = self.lead(lost.clone()).await {
                        tracing::warn!(error = %e, "dispatcher stopped leading");
                    }
                    lost.cancel();
                    let _ = renew.await;
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
    async fn lead(&self, lost: CancellationToken) -> anyhow::Result<()> {
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
        let mut held = Held::default();
        let (report_tx, report_rx) = tokio::sync::mpsc::channel::<Event2>(8_192);
        let reporter = tokio::spawn(report(self.bus.clone(), report_rx));
        let result: anyhow::Result<()> = async {
            loop {
                let wait = if held.is_empty() { Duration::from_secs(3600) } else { TICK };
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
                    _ = tokio::time::sleep(wait) => {}
                }
                if let Err(e) = self.admit(&mut held, &report_tx).await {
                    tracing::warn!(error = %e, "admission round failed; retrying");
                    tokio::time::sleep(TICK).await;
                }
            }
        }
        .await;
        drop(report_tx);
        let _ = reporter.await;
        result
    }

    /// Forgets the held steps of a run that ended, deleting their READY entries.
    fn drop_run(&self, held: &mut Held, run: &CancelSignal) {
        let Some(queue) = held.steps.get_mut(&run.tenant) else { return };
        let gone: Vec<(Reverse<i32>, u64)> =
            queue.iter().filter(|(_, s)| s.dispatch.run_id == run.run_id).map(|(k, _)| *k).collect();
        if gone.is_empty() {
            return;
        }
        for k in &gone {
            queue.remove(k);
        }
        let bus = self.bus.clone();
        tokio::spawn(async move {
            let stream = bus.namespace().ready_stream();
            for (_, seq) in gone {
                let _ = bus.delete_message(&stream, seq).await;
            }
        });
    }

    fn take(&self, held: &mut Held, msg: async_nats::jetstream::Message) {
        let seq = match msg.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => {
                tracing::error!(error = %e, "READY message without metadata");
                return;
            }
        };
        match serde_json::from_slice::<Ready>(&msg.payload) {
            Ok(Ready::Step { dispatch, priority }) => {
                let tenant = dispatch.tenant.clone();
                if !held.steps.contains_key(&tenant) {
                    held.turns.push_back(tenant.clone());
                }
                let entry = HeldStep { dispatch: *dispatch, since: Instant::now(), reported: false };
                held.steps.entry(tenant).or_default().insert((Reverse(priority), seq), entry);
            }
            Ok(Ready::Run { tenant, run_id, concurrency }) => {
                held.runs.insert(seq, HeldRun { tenant, run_id, concurrency, reported: false });
            }
            Err(e) => {
                tracing::error!(error = %e, seq, "undecodable READY entry; dropping it");
                let bus = self.bus.clone();
                tokio::spawn(async move {
                    let _ = bus.delete_message(&bus.namespace().ready_stream(), seq).await;
                });
            }
        }
    }

    /// One admission round over everything held.
    async fn admit(&self, held: &mut Held, reports: &tokio::sync::mpsc::Sender<Event2>) -> Result<(), BusError> {
        if !held.runs.is_empty() {
            self.admit_runs(held, reports).await?;
        }
        if held.steps.values().all(BTreeMap::is_empty) {
            held.steps.clear();
            held.turns.clear();
            return Ok(());
        }
        let ns = self.bus.namespace().clone();
        let counts = self.bus.subject_counts(&ns.dispatch_stream(), &ns.dispatch_all()).await?;
        let mut in_flight: HashMap<String, u64> = HashMap::new();
        let mut total: u64 = 0;
        let prefix = format!("{}.dispatch.", ns.as_str());
        for (subject, n) in counts {
            total += n;
            if let Some(tenant) = subject.strip_prefix(&prefix) {
                *in_flight.entry(tenant.to_string()).or_default() += n;
            }
        }
        let now = Instant::now();
        let wall = chrono::Utc::now();
        let window = self.settings.dispatch_window;
        // Tenants take turns, one step each, until nobody can admit more.
        let mut blocked: HashSet<String> = HashSet::new();
        let mut admitted: HashMap<RunKey, Vec<String>> = HashMap::new();
        loop {
            let mut admitted_any = false;
            for _ in 0..held.turns.len() {
                let Some(tenant) = held.turns.pop_front() else { break };
                held.turns.push_back(tenant.clone());
                if blocked.contains(&tenant) {
                    continue;
                }
                if window > 0 && total >= u64::from(window) {
                    blocked.insert(tenant);
                    continue;
                }
                let limit = self.settings.tenant_limit(&tenant);
                let used = in_flight.get(&tenant).copied().unwrap_or(0);
                if limit > 0 && used >= u64::from(limit) {
                    blocked.insert(tenant);
                    continue;
                }
                let Some(queue) = held.steps.get_mut(&tenant) else { continue };
                let mut chosen = None;
                for (k, step) in queue.iter() {
                    if step.dispatch.not_before.is_some_and(|t| t > wall) {
                        continue;
                    }
                    if let Some(rl) = &step.dispatch.step.rate_limit {
                        let bucket = held
                            .buckets
                            .entry((tenant.clone(), rl.key.clone()))
                            .or_insert_with(|| Bucket { tokens: f64::from(rl.burst.unwrap_or(1)), at: now });
                        let cap = f64::from(rl.burst.unwrap_or(1));
                        bucket.tokens =
                            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rl.per_second).min(cap);
                        bucket.at = now;
                        if bucket.tokens < 1.0 {
                            continue;
                        }
                        bucket.tokens -= 1.0;
                    }
                    chosen = Some(*k);
                    break;
                }
                let Some(k) = chosen else {
                    blocked.insert(tenant);
                    continue;
                };
                let step = queue.remove(&k).expect("chosen from the queue");
                let seq = k.1;
                let msg_id = format!("{}:{}:{}", step.dispatch.run_id, step.dispatch.step.id, step.dispatch.dispatch);
                let subject = ns.dispatch(&tenant);
                if let Err(e) =
                    self.bus.enqueue(subject, &msg_id, &step.dispatch, step.dispatch.traceparent.as_deref()).await
                {
                    // Keep it; the next round tries again.
                    queue.insert(k, step);
                    return Err(e);
                }
                self.bus.delete_message(&ns.ready_stream(), seq).await?;
                if step.reported {
                    let key = RunKey { tenant: tenant.clone(), run_id: step.dispatch.run_id };
                    admitted.entry(key).or_default().push(step.dispatch.step.id.clone());
                }
                *in_flight.entry(tenant).or_default() += 1;
                total += 1;
                admitted_any = true;
            }
            if !admitted_any {
                break;
            }
        }
        for (key, steps) in admitted {
            let _ = reports.try_send(Event2::new(key, Event::StepAdmitted(StepAdmitted { steps })));
        }
        // Say why the rest waits, once each, for holds that last: one event per run and reason.
        let mut waiting: HashMap<(RunKey, String), Vec<String>> = HashMap::new();
        for (tenant, queue) in held.steps.iter_mut() {
            let limit = self.settings.tenant_limit(tenant);
            let used = in_flight.get(tenant).copied().unwrap_or(0);
            for step in queue.values_mut().filter(|s| !s.reported && now.duration_since(s.since) >= REPORT_AFTER) {
                let hold = if step.dispatch.not_before.is_some_and(|t| t > wall) {
                    Hold::NotBefore
                } else if limit > 0 && used >= u64::from(limit) {
                    Hold::TenantLimit(limit)
                } else if window > 0 && total >= u64::from(window) {
                    Hold::Window(window)
                } else if let Some(rl) = &step.dispatch.step.rate_limit {
                    Hold::RateLimit(format!("rate limit '{}' ({}/s)", rl.key, rl.per_second))
                } else {
                    continue;
                };
                let reason = match hold {
                    Hold::NotBefore => continue,
                    Hold::TenantLimit(n) => format!("tenant concurrency limit ({n} steps)"),
                    Hold::Window(n) => format!("dispatch window full ({n} steps across tenants)"),
                    Hold::RateLimit(r) => r,
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
        Ok(())
    }

    /// Admits runs whose concurrency group has room, in submission order per group.
    async fn admit_runs(&self, held: &mut Held, reports: &tokio::sync::mpsc::Sender<Event2>) -> Result<(), BusError> {
        let ns = self.bus.namespace().clone();
        let mut members: HashMap<(String, String), HashSet<Uuid>> = HashMap::new();
        let mut full: HashSet<(String, String)> = HashSet::new();
        let seqs: Vec<u64> = held.runs.keys().copied().collect();
        for seq in seqs {
            let (run_id, c) = {
                let run = &held.runs[&seq];
                (run.run_id, run.concurrency.clone())
            };
            let tenant = held.runs[&seq].tenant.clone();
            let group = (tenant.clone(), c.token());
            let key = RunKey { tenant, run_id };
            let subject = ns.run(&key);
            // A run that ended while it waited (cancelled) no longer wants a place.
            if let Some(last) = self.bus.last(&subject).await?
                && matches!(
                    last.envelope.event,
                    Event::RunSucceeded(_) | Event::RunFailed(_) | Event::RunCancelled(_) | Event::RunTimedOut(_)
                )
            {
                held.runs.remove(&seq);
                self.bus.delete_message(&ns.ready_stream(), seq).await?;
                continue;
            }
            if !members.contains_key(&group) {
                let counts = self.bus.subject_counts(&ns.groups_stream(), &ns.group_all(&group.0, &group.1)).await?;
                let ids = counts.keys().filter_map(|s| s.rsplit('.').next()?.parse::<Uuid>().ok()).collect();
                members.insert(group.clone(), ids);
            }
            let active = members.get_mut(&group).expect("loaded");
            let has_room = active.contains(&run_id) || (!full.contains(&group) && active.len() < c.limit as usize);
            if has_room {
                let member = ns.group_member(&group.0, &group.1, run_id);
                self.bus.enqueue(member, &format!("group:{}", run_id), &run_id, None).await?;
                let admitted = Event::RunAdmitted(RunAdmitted { run_id });
                append_to_run(&self.bus, &key, admitted, &format!("admit:{}", run_id)).await?;
                active.insert(run_id);
                held.runs.remove(&seq);
                self.bus.delete_message(&ns.ready_stream(), seq).await?;
                continue;
            }
            // Later runs of a full group wait behind this one.
            full.insert(group.clone());
            match c.policy {
                GroupPolicy::Skip => {
                    let event = Event::RunCancelRequested(RunCancelRequested {
                        run_id,
                        reason: format!("skipped: concurrency group '{}' is full (limit {})", c.key, c.limit),
                        key_id: None,
                        timed_out: false,
                    });
                    append_to_run(&self.bus, &key, event, &format!("skip:{}", run_id)).await?;
                    held.runs.remove(&seq);
                    self.bus.delete_message(&ns.ready_stream(), seq).await?;
                    continue;
                }
                GroupPolicy::CancelInProgress => {
                    let newer = run_id;
                    for &old in active.iter() {
                        if held.cancelling.insert(old) {
                            let event = Event::RunCancelRequested(RunCancelRequested {
                                run_id: old,
                                reason: format!("superseded by run {newer} in concurrency group '{}'", c.key),
                                key_id: None,
                                timed_out: false,
                            });
                            let old_key = RunKey { tenant: group.0.clone(), run_id: old };
                            append_to_run(&self.bus, &old_key, event, &format!("supersede:{old}")).await?;
                        }
                    }
                }
                GroupPolicy::Queue => {}
            }
            let run = held.runs.get_mut(&seq).expect("present");
            if !run.reported {
                let reason = format!("concurrency group '{}' is full (limit {})", c.key, c.limit);
                let event = Event::RunWaiting(RunWaiting { run_id, reason });
                let _ = reports.try_send(Event2::new(key.clone(), event));
                run.reported = true;
            }
        }
        Ok(())
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
pub(crate) async fn append_to_run(bus: &Bus, key: &RunKey, event: Event, msg_id: &str) -> Result<(), BusError> {
    let subject = bus.namespace().run(key);
    let envelope = EventMeta::new(&key.tenant).envelope(subject.clone(), event);
    for _ in 0..crate::MAX_CONFLICTS {
        let last = bus.last_seq(&subject).await?;
        match bus.append_with_id(Some(last), &envelope, msg_id).await {
            Ok(_) => return Ok(()),
            Err(BusError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(BusError::Nats(format!("gave up appending to {subject}")))
}
