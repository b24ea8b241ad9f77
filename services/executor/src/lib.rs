//! The executor: runs steps. It pulls dispatch messages from the `{NS}_DISPATCH` work queue
//! only when it has a free slot, asks the scheduler for the step's lease, runs the step (or,
//! for a `cache:` step, takes a kept outcome of the same thing instead, and keeps its own
//! success), reports the result, tells the dispatcher how an attempt behind a circuit breaker
//! went (`{ns}.ctl.breaker`), and only then acks the message. It counts its steps' outcomes
//! and durations for `/metrics`.
//!
//! Steps are queued per label set (a pool, `{ns}.dispatch.<tenant>.<pool>`), each pool with
//! its own durable consumer (`executors` for steps that need no labels). An executor pulls from
//! every pool whose labels it has, found on the POOLS stream, and says it is alive (labels,
//! slots in use) with a heartbeat on the EXECUTORS stream every few seconds.
//!
//! The dispatch message's ack deadline is the step's lease: while a step runs the executor
//! renews it with in-progress acks. An executor that dies stops renewing, JetStream redelivers
//! the message after the deadline, and the next executor's lease request (with the higher
//! delivery count) makes the scheduler record the old attempt as lost and start a new one. A
//! result from a superseded attempt is answered `stale` and changes nothing.
//!
//! # Layout
//! - [`step`]: running one step (shell, container or in-process kinds), isolation, output
//!   capture, timeouts.
//! - [`cache`]: `cache:` steps' kept outcomes.
//! - [`checkout`]: fetching a run's pushed commit into a `checkout` step's working directory.
//! - [`remote`]: the `http` and `llm` step kinds.
//! - [`labels`]: detected and configured labels, GPUs, the container CLI.
//! - this file: [`Executor`]: slots, the pull loop, leases, heartbeats, reports, draining.

pub mod cache;
pub mod checkout;
pub mod labels;
pub mod remote;
pub mod step;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::message::Acker;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use taskmesh_bus::{Bus, BusError};
use taskmesh_config::ExecutorSettings;

use taskmesh_events::StepOutcome;
use taskmesh_events::command::{
    BreakerSignal, CancelSignal, Dispatch, ExecutorBeat, Lease, LeaseDecision, LeaseRequest, LogLine, LogStream, Pool,
    ReportAck, ResultReport,
};
use taskmesh_events::subjects::{ANY_POOL, pool_consumer};
use taskmesh_events::workflow::labels_match;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// How often the POOLS stream is looked at for new label sets this executor can serve.
const POOL_LOOK: Duration = Duration::from_secs(1);
/// Shortest time between two signals of freed slots (see [`Executor::signal_slots`]).
const SLOT_SIGNAL_GAP: Duration = Duration::from_millis(5);
/// Most bytes a step's outcome takes as JSON in its report (and so in its event): well inside
/// NATS's default 1 MiB message, beside the rest of the report and of the event's commit.
const MAX_OUTCOME_BYTES: usize = 512 * 1024;

/// A step's outcome made to fit in `most` bytes of JSON, so that its report can be sent and
/// recorded: one that cannot be is never recorded, and its step is run again until it counts
/// as lost. Its output is cut first (marked truncated); if its outputs alone are still too
/// large, they are dropped and the step fails, saying why.
fn fit_outcome(succeeded: bool, mut outcome: StepOutcome, most: usize) -> (bool, StepOutcome) {
    let size = |o: &StepOutcome| serde_json::to_vec(o).map_or(usize::MAX, |j| j.len());
    if size(&outcome) <= most {
        return (succeeded, outcome);
    }
    let output = std::mem::take(&mut outcome.output);
    outcome.output_truncated = true;
    if size(&outcome) <= most {
        // The longest beginning of the output that fits (`fits` does, `over` does not).
        let (mut fits, mut over) = (0, output.len());
        loop {
            let mut mid = (fits + over) / 2;
            while !output.is_char_boundary(mid) {
                mid -= 1;
            }
            if mid <= fits {
                break;
            }
            outcome.output = output[..mid].to_string();
            if size(&outcome) <= most {
                fits = mid;
            } else {
                over = mid;
            }
        }
        outcome.output = output[..fits].to_string();
        return (succeeded, outcome);
    }
    let bytes = size(&outcome);
    outcome.outputs.clear();
    let error = format!("its outcome takes {bytes} bytes as JSON without its output, more than it may ({most})");
    outcome.error = Some(match outcome.error.take() {
        // Its own error, cut to what fits beside this one.
        Some(e) => format!("{error}; {}", e.chars().take(1000).collect::<String>()),
        None => error,
    });
    (false, outcome)
}

/// Kill switches of the steps held here, by run and step (each with its holder's id: two
/// deliveries of one step may be held at once, one of them to be denied its lease).
type KillSwitches = Arc<std::sync::Mutex<HashMap<Uuid, HashMap<String, Vec<(u64, CancellationToken)>>>>>;

/// A held step's kill switch, registered for its run's cancellation signals from before its
/// lease is asked for until the executor is done with the step, so that a signal sent while
/// the step starts (its lease granted just before the run's cancellation) is not missed.
struct KillSwitch {
    switches: KillSwitches,
    run_id: Uuid,
    step: String,
    id: u64,
    token: CancellationToken,
}

impl KillSwitch {
    fn register(switches: &KillSwitches, run_id: Uuid, step: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let (id, token) = (NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), CancellationToken::new());
        let mut held = switches.lock().expect("not poisoned");
        held.entry(run_id).or_default().entry(step.to_string()).or_default().push((id, token.clone()));
        Self { switches: switches.clone(), run_id, step: step.to_string(), id, token }
    }
}

impl Drop for KillSwitch {
    fn drop(&mut self) {
        let mut held = self.switches.lock().expect("not poisoned");
        let Some(steps) = held.get_mut(&self.run_id) else { return };
        if let Some(tokens) = steps.get_mut(&self.step) {
            tokens.retain(|(id, _)| *id != self.id);
            if tokens.is_empty() {
                steps.remove(&self.step);
            }
        }
        if steps.is_empty() {
            held.remove(&self.run_id);
        }
    }
}

/// One executor process.
#[derive(Clone)]
pub struct Executor {
    bus: Bus,
    settings: ExecutorSettings,
    id: String,
    /// Kill switches of the steps held here, by run: a cancellation signal fires them.
    running: KillSwitches,
    /// Opens the secrets steps declare; without it, such steps fail.
    keyring: Option<Arc<taskmesh_secrets::Keyring>>,
    /// What steps run with: found out at start.
    runtime: Arc<step::Runtime>,
    /// Where `http` and `llm` steps may connect.
    egress: Arc<taskmesh_egress::Egress>,
    labels: Arc<BTreeMap<String, String>>,
    /// Steps being handled right now (slots held by a waiting pull are not counted).
    busy: Arc<std::sync::atomic::AtomicU32>,
    /// Slots freed since the last signal to the dispatcher (see [`Executor::signal_slots`]).
    slots_freed: Arc<tokio::sync::Notify>,
}

impl Executor {
    pub fn new(bus: Bus, settings: ExecutorSettings, keyring: Option<Arc<taskmesh_secrets::Keyring>>) -> Self {
        let id = settings.id.clone().unwrap_or_else(|| {
            let host =
                nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "executor".into());
            format!("{host}-{}", std::process::id())
        });
        Self {
            bus,
            settings,
            id,
            running: Arc::default(),
            keyring,
            runtime: Arc::default(),
            egress: Arc::default(),
            labels: Arc::default(),
            busy: Arc::default(),
            slots_freed: Arc::default(),
        }
    }

    /// Holds `http` and `llm` steps to `egress` (the default denies only link-local and
    /// instance-metadata addresses).
    pub fn with_egress(mut self, egress: taskmesh_egress::Egress) -> Self {
        self.egress = Arc::new(egress);
        self
    }

    /// Finds out what this executor can do (container CLI, sandbox, user, GPUs) and its labels.
    /// A sandbox or user that is configured but unusable is an error: never run unprotected
    /// what was meant to be protected.
    async fn prepare(&mut self) -> anyhow::Result<()> {
        let s = &self.settings;
        let sandbox = match s.sandbox.as_str() {
            "none" | "" => None,
            mode @ ("bwrap" | "auto") => {
                let works =
                    labels::probe("bwrap", &["--ro-bind", "/", "/", "--unshare-all", "--", "true"]).await.is_some();
                match (works, mode) {
                    (true, _) => Some("bwrap".into()),
                    (false, "auto") => {
                        tracing::warn!(
                            "sandbox = auto but bubblewrap is missing or cannot run: steps are not sandboxed"
                        );
                        None
                    }
                    _ => anyhow::bail!(
                        "executor.sandbox = bwrap, but bubblewrap (bwrap) is not installed or cannot create namespaces here"
                    ),
                }
            }
            other => anyhow::bail!("executor.sandbox must be none, bwrap or auto, not '{other}'"),
        };
        let mut runtime = step::Runtime { sandbox, ..step::Runtime::new(self.egress.clone()) };
        if let Some(user) = &s.run_as {
            let found = match user.parse::<u32>() {
                Ok(uid) => nix::unistd::User::from_uid(uid.into()),
                Err(_) => nix::unistd::User::from_name(user),
            };
            let user_entry = found
                .map_err(|e| anyhow::anyhow!("looking up executor.run_as '{user}': {e}"))?
                .ok_or_else(|| anyhow::anyhow!("executor.run_as: no user '{user}'"))?;
            anyhow::ensure!(nix::unistd::geteuid().is_root(), "executor.run_as needs the executor to run as root");
            runtime.run_as = Some((user_entry.uid.as_raw(), user_entry.gid.as_raw()));
        }
        if s.cpu_seconds.is_some() || s.memory_mb.is_some() {
            runtime.limits =
                Some(taskmesh_events::workflow::StepLimits { cpu_seconds: s.cpu_seconds, memory_mb: s.memory_mb });
        }
        let (container_cli, gpus) = tokio::join!(labels::detect_container_cli(&s.container_cli), labels::detect_gpus());
        runtime.container_cli = container_cli;
        self.labels = Arc::new(labels::labels(
            gpus.as_ref(),
            runtime.container_cli.as_deref(),
            runtime.sandbox.is_some(),
            &s.labels,
        ));
        self.runtime = Arc::new(runtime);
        Ok(())
    }

    /// This executor's subject token on the EXECUTORS stream.
    fn token(&self) -> String {
        self.id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' }).collect()
    }

    /// Publishes a heartbeat every few seconds until `stop`, then one saying it is stopping.
    async fn heartbeat(self, stop: CancellationToken) {
        let started_at = chrono::Utc::now();
        let subject = self.bus.namespace().executor(&self.token());
        let slots = self.settings.slots as u32;
        let mut tick = tokio::time::interval(Duration::from_secs(ExecutorBeat::EVERY_SECS));
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tick.tick() => false,
            };
            let beat = ExecutorBeat {
                id: self.id.clone(),
                labels: (*self.labels).clone(),
                slots,
                in_use: self.busy.load(std::sync::atomic::Ordering::Relaxed).min(slots),
                started_at,
                at: chrono::Utc::now(),
                stopping,
                version: env!("CARGO_PKG_VERSION").to_string(),
            };
            if let Err(e) = self.bus.put(subject.clone(), &beat).await {
                tracing::debug!(error = %e, "heartbeat not published");
            }
            if stopping {
                return;
            }
        }
    }

    /// Fires the kill switches of a cancelled run's steps running here.
    async fn listen_for_cancellations(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut signals = self.bus.client().subscribe(self.bus.namespace().cancel_signals()).await?;
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = signals.next() => match m { Some(m) => m, None => return Ok(()) },
            };
            let Ok(signal) = serde_json::from_slice::<CancelSignal>(&msg.payload) else { continue };
            let tokens = self.running.lock().expect("not poisoned").get(&signal.run_id).cloned().unwrap_or_default();
            for (_, token) in tokens.into_values().flatten() {
                tracing::info!(run = %signal.run_id, "killing a cancelled run's step");
                token.cancel();
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    async fn consumer(&self, pool: &str) -> Result<PullConsumer, BusError> {
        let ns = self.bus.namespace();
        self.bus
            .durable(
                &ns.dispatch_stream(),
                &pool_consumer(pool),
                PullConfig {
                    filter_subject: ns.dispatch_pool(pool),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.settings.lease(),
                    max_deliver: -1,
                    max_ack_pending: 100_000,
                    ..Default::default()
                },
            )
            .await
    }

    /// Pulls and runs steps until `shutdown` is cancelled; then stops pulling, lets running
    /// steps finish for up to the drain timeout, and hands back the ones still running.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.prepare().await?;
        let slots = self.settings.slots;
        let permits = Arc::new(Semaphore::new(slots));
        let hand_back = CancellationToken::new();
        let listener = tokio::spawn(self.clone().listen_for_cancellations(shutdown.clone()));
        let signaller = tokio::spawn(self.clone().signal_slots());
        let beats_stop = CancellationToken::new();
        let beats = tokio::spawn(self.clone().heartbeat(beats_stop.clone()));
        tracing::info!(executor = %self.id, slots, labels = ?self.labels, "executor started");
        let pools_active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut loops = tokio::task::JoinSet::new();
        let mut attached: HashSet<String> = HashSet::new();
        let ns = self.bus.namespace().clone();
        let mut look = tokio::time::interval(POOL_LOOK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = look.tick() => {}
            }
            let mut pools = vec![Pool { token: ANY_POOL.into(), runs_on: BTreeMap::new() }];
            match self.bus.latest_per_subject::<Pool>(&ns.pools_stream(), &ns.pools_all()).await {
                Ok(found) => pools.extend(found),
                Err(e) => tracing::debug!(error = %e, "reading pools"),
            }
            for pool in pools {
                if attached.contains(&pool.token) || !labels_match(&pool.runs_on, &self.labels) {
                    continue;
                }
                let consumer = match self.consumer(&pool.token).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, pool = %pool.token, "attaching to a pool");
                        continue;
                    }
                };
                tracing::info!(pool = %pool.token, runs_on = ?pool.runs_on, "pulling from pool");
                attached.insert(pool.token.clone());
                pools_active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                loops.spawn(self.clone().pull(
                    consumer,
                    permits.clone(),
                    pools_active.clone(),
                    hand_back.clone(),
                    shutdown.clone(),
                ));
            }
        }
        while loops.join_next().await.is_some() {}
        tracing::info!(executor = %self.id, "draining");
        beats_stop.cancel();
        let _ = beats.await;
        let drain = Duration::from_secs(self.settings.drain_timeout_secs);
        if tokio::time::timeout(drain, permits.acquire_many(slots as u32)).await.is_err() {
            tracing::warn!("drain timeout: handing back running steps");
            hand_back.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), permits.acquire_many(slots as u32)).await;
        }
        // Gone: no longer listed as alive.
        let _ = self.bus.purge_subject(&ns.executors_stream(), &ns.executor(&self.token())).await;
        listener.abort();
        signaller.abort();
        Ok(())
    }

    /// Pulls one pool's steps whenever a slot is free, until `shutdown`.
    async fn pull(
        self,
        consumer: PullConsumer,
        permits: Arc<Semaphore>,
        pools_active: Arc<std::sync::atomic::AtomicUsize>,
        hand_back: CancellationToken,
        shutdown: CancellationToken,
    ) {
        let slots = self.settings.slots;
        'pull: loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break 'pull,
                p = permits.clone().acquire_owned() => p.expect("never closed"),
            };
            let mut held = vec![first];
            while held.len() < slots {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            // A pull holds its slots while it waits: with several pools, wait less, so an
            // idle pool does not keep a slot from a busy one for long.
            let expires = if pools_active.load(std::sync::atomic::Ordering::Relaxed) > 1 {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(2)
            };
            let batch = consumer.batch().max_messages(held.len()).expires(expires).messages();
            let mut batch = match batch.await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "pulling steps");
                    drop(held);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break 'pull,
                    n = batch.next() => n,
                };
                let Some(msg) = next else { break };
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "pull batch ended");
                        break;
                    }
                };
                let Some(permit) = held.pop() else { break };
                let me = self.clone();
                let hand_back = hand_back.clone();
                tokio::spawn(async move {
                    me.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    me.handle(msg, hand_back).await;
                    me.busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    drop(permit);
                });
            }
        }
    }

    async fn handle(&self, msg: async_nats::jetstream::Message, hand_back: CancellationToken) {
        let (delivery, message) = msg.info().map(|i| (i.delivered.max(1) as u32, i.stream_sequence)).unwrap_or((1, 0));
        let (msg, acker) = msg.split();
        let dispatch: Dispatch = match serde_json::from_slice(&msg.payload) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "undecodable dispatch; terminating it");
                let _ = acker.ack_with(AckKind::Term).await;
                return;
            }
        };
        if let Some(not_before) = dispatch.not_before {
            let wait = (not_before - chrono::Utc::now()).to_std().unwrap_or_default();
            if !wait.is_zero() {
                // A retry's backoff: JetStream redelivers the message when it is due.
                let _ = acker.ack_with(AckKind::Nak(Some(wait))).await;
                return;
            }
        }
        let span = tracing::info_span!("step", run = %dispatch.run_id, step = %dispatch.step.id, delivery);
        taskmesh_telemetry::set_parent(&span, dispatch.traceparent.as_deref());
        let lease = Lease { dispatch: dispatch.dispatch, message, delivery };
        self.execute(dispatch, lease, Arc::new(acker), hand_back).instrument(span).await
    }

    /// For a `checkout` step, where its commit comes from: the repository connection's latest
    /// event must be its creation or a change (not its deletion), and its token (opened, as it
    /// is now) goes along where it may.
    async fn open_checkout(&self, dispatch: &Dispatch) -> Result<Option<checkout::Source>, String> {
        let Some(c) = &dispatch.checkout else {
            return match dispatch.step.checkout.enabled {
                true => Err("checkout: the run has no pushed commit to check out".into()),
                false => Ok(None),
            };
        };
        let subject = self.bus.namespace().repo_connection(&dispatch.tenant, c.connection_id);
        let last = self.bus.last(&subject).await.map_err(|e| format!("reading the repository connection: {e}"))?;
        let Some(conn) = last.as_ref().and_then(|s| s.envelope.event.repo_connection()) else {
            return Err(format!("checkout: the repository connection {} was deleted", c.connection_id));
        };
        // The run's repository must still be the connection's (a renamed one is another).
        let same_repository = c.repository.eq_ignore_ascii_case(&conn.repository);
        let token = match &conn.status_token {
            Some(sealed) if same_repository && c.token_goes_to(conn.api_url.as_deref()) => {
                let keyring = self
                    .keyring
                    .as_ref()
                    .ok_or("checkout: this executor has no secrets key (TASKMESH_SECRETS__KEY) to open the token")?;
                let aad = taskmesh_secrets::repo_status_token_aad(&dispatch.tenant);
                let token = keyring.open(&aad, sealed).map_err(|e| format!("checkout: the connection's token: {e}"))?;
                Some(String::from_utf8(token).map_err(|_| "checkout: the connection's token is not UTF-8")?)
            }
            _ => None,
        };
        checkout::Source::new(c, token)
            .map(|source| {
                let source = source.with_submodule_token(c, conn.api_url.as_deref(), &conn.submodule_repositories);
                Some(source.with_options(dispatch.step.checkout.clone()))
            })
            .map_err(|e| format!("checkout: {e}"))
    }

    /// Opens the secrets the step declares, from the latest `SecretSet` on each one's subject.
    async fn open_secrets(&self, dispatch: &Dispatch) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for name in dispatch.step.secret_names() {
            let keyring = self.keyring.as_ref().ok_or("this executor has no secrets key (TASKMESH_SECRETS__KEY)")?;
            let subject = self.bus.namespace().secret(&dispatch.tenant, name);
            let last = self.bus.last(&subject).await.map_err(|e| format!("reading secret {name}: {e}"))?;
            let Some(taskmesh_events::Event::SecretSet(set)) = last.map(|s| s.envelope.event) else {
                return Err(format!("secret {name} is not set"));
            };
            let aad = taskmesh_secrets::step_secret_aad(&dispatch.tenant, name);
            let value = keyring.open(&aad, &set.sealed).map_err(|e| format!("secret {name}: {e}"))?;
            out.push((name.to_string(), String::from_utf8(value).map_err(|_| format!("secret {name} is not UTF-8"))?));
        }
        Ok(out)
    }

    /// A bounded channel for the attempt's output lines, and the task publishing them to the
    /// log stream in order (core NATS publishes: the stream stores them, nobody waits).
    fn log_publisher(
        &self,
        dispatch: &Dispatch,
        attempt: u32,
    ) -> (tokio::sync::mpsc::Sender<(LogStream, String)>, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(LogStream, String)>(4096);
        let key = taskmesh_events::RunKey { tenant: dispatch.tenant.clone(), run_id: dispatch.run_id };
        let subject = self.bus.namespace().log(&key, &dispatch.step.id);
        let client = self.bus.client().clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some((stream, line)) = rx.recv().await {
                n += 1;
                let entry = LogLine { attempt, n, ts: chrono::Utc::now(), stream, line };
                let body = serde_json::to_vec(&entry).expect("serialises");
                if let Err(e) = client.publish(subject.clone(), body.into()).await {
                    tracing::debug!(error = %e, "log line not published");
                }
            }
            // Lines are out of this process before the result is reported (a step that
            // printed nothing has nothing to wait for).
            if n > 0 {
                let _ = client.flush().await;
            }
        });
        (tx, task)
    }

    /// Asks for the lease, asking again with the same request while the scheduler cannot
    /// decide (no replica answers, or one failed to record its decision): a timed-out request
    /// may still have been granted, and asking again with the same lease gets the same answer,
    /// whereas handing the message back would make the next delivery a new attempt. The
    /// message's lease is renewed meanwhile; after four lease periods the executor gives up.
    async fn request_lease(&self, request: &LeaseRequest) -> Result<LeaseDecision, BusError> {
        let subject = self.bus.namespace().scheduler_command("lease");
        let deadline = tokio::time::Instant::now() + self.settings.lease() * 4;
        let mut delay = Duration::from_millis(200);
        loop {
            let transient = match self.bus.request::<_, LeaseDecision>(subject.clone(), request).await {
                Err(BusError::Unavailable(s)) => s,
                Err(BusError::Rejected(p))
                    if matches!(
                        p.code,
                        taskmesh_events::ErrorCode::Conflict
                            | taskmesh_events::ErrorCode::Unavailable
                            | taskmesh_events::ErrorCode::Internal
                    ) =>
                {
                    p.to_string()
                }
                other => return other,
            };
            if tokio::time::Instant::now() + delay >= deadline {
                return Err(BusError::Unavailable(transient));
            }
            tracing::warn!(reason = %transient, "no lease decision yet; asking again");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn execute(&self, dispatch: Dispatch, lease: Lease, acker: Arc<Acker>, hand_back: CancellationToken) {
        let ns = self.bus.namespace();
        let request = LeaseRequest {
            tenant: dispatch.tenant.clone(),
            run_id: dispatch.run_id,
            step: dispatch.step.id.clone(),
            lease,
            executor: self.id.clone(),
        };
        // Renew the message's lease from the moment it is held: while the lease is asked for
        // (a reply may take a while when a scheduler replica dies), while the step runs and
        // while its result is reported.
        let heartbeat = tokio_util::task::AbortOnDropHandle::new({
            let acker = acker.clone();
            let every = self.settings.lease() / 3;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if let Err(e) = acker.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "lease renewal failed");
                    }
                }
            })
        });
        // Fired by a cancellation signal from now on, granted or not yet.
        let kill = KillSwitch::register(&self.running, dispatch.run_id, &dispatch.step.id);
        let attempt = match self.request_lease(&request).await {
            Ok(LeaseDecision::Granted { attempt }) => attempt,
            Ok(LeaseDecision::Denied { reason, ack }) => {
                tracing::info!(%reason, ack, "lease denied");
                // Without `ack` the message is another executor's current lease: leave it be.
                if ack {
                    self.breaker_signal(&dispatch, None).await;
                    let _ = acker.ack().await;
                    self.slot_freed();
                }
                return;
            }
            Err(BusError::Rejected(p)) if p.code == taskmesh_events::ErrorCode::NotFound => {
                tracing::error!(problem = %p, "dispatch for an unknown run; terminating it");
                let _ = acker.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                // Back off more with every delivery, so a scheduler outage is not a busy loop.
                let delay = Duration::from_secs(u64::from(lease.delivery).min(30));
                tracing::warn!(error = %e, ?delay, "no lease decision; handing the step back");
                let _ = acker.ack_with(AckKind::Nak(Some(delay))).await;
                return;
            }
        };
        // Should the drain run out of time, the scheduler is told the attempt is handed back at
        // once, beside the step's stopping (a container's removal can take longer than the
        // process has left), and before the message goes back: its next delivery then starts
        // a new attempt without counting this one lost (unanswered, it is counted lost).
        let told = {
            let (bus, given_back, subject) = (self.bus.clone(), hand_back.clone(), ns.scheduler_command("handback"));
            let cmd = taskmesh_events::command::HandBack {
                tenant: dispatch.tenant.clone(),
                run_id: dispatch.run_id,
                step: dispatch.step.id.clone(),
                lease,
            };
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                given_back.cancelled().await;
                if let Err(e) = bus.request::<_, ReportAck>(subject, &cmd).await {
                    tracing::warn!(error = %e, "could not say the step is handed back; it counts as lost");
                }
            }))
        };
        // A `cache:` step that would do what an earlier success did takes its outcome instead,
        // once what it runs with is there (secrets deleted or a connection gone fail it, as
        // they would a run).
        let cache_key = cache::key(&dispatch);
        // Whether the step ran here (its outcome then counts for its circuit breaker).
        let mut ran = false;
        // A line the step's log opens with (a refresh's), before the step's own.
        let mut first_line = None;
        let outcome = match self.open(&dispatch).await {
            Err(outcome) => Some((false, outcome)),
            Ok(opened) => {
                let cached = match &cache_key {
                    // Run, with what was kept forgotten first: should the step fail, later
                    // steps do not reuse an outcome the refresh was to replace.
                    Some(key) if dispatch.refresh_cache => {
                        let line = match cache::forget(&self.bus, &dispatch, key).await {
                            Ok(0) => "cache: refreshing (nothing was kept); the step runs".to_string(),
                            Ok(_) => "cache: refreshing: the kept outcome is forgotten; the step runs".to_string(),
                            Err(e) => {
                                tracing::warn!(error = %e, "could not forget the step's kept outcome");
                                format!(
                                    "cache: refreshing, but the kept outcome could not be forgotten ({e}); the step runs"
                                )
                            }
                        };
                        metrics::counter!("taskmesh_step_cache_lookups_total", "result" => "refresh").increment(1);
                        first_line = Some(line);
                        None
                    }
                    Some(key) => {
                        let found = cache::lookup(&self.bus, &dispatch, key).await;
                        let result = if found.is_some() { "hit" } else { "miss" };
                        metrics::counter!("taskmesh_step_cache_lookups_total", "result" => result).increment(1);
                        found
                    }
                    None => None,
                };
                match cached {
                    Some(outcome) => {
                        if let Some(from) = &outcome.cached_from {
                            self.log_cached(&dispatch, attempt, from).await;
                        }
                        Some((true, outcome))
                    }
                    None => {
                        ran = true;
                        self.run_here(&dispatch, attempt, opened, &hand_back, &kill.token, first_line).await
                    }
                }
            }
        };
        let Some((succeeded, outcome)) = outcome else {
            if hand_back.is_cancelled() {
                let _ = told.await;
            }
            drop(heartbeat);
            tracing::info!("step handed back");
            let _ = acker.ack_with(AckKind::Nak(None)).await;
            return;
        };
        // It finished here: a drain running out from now on hands nothing back.
        drop(told);
        let (succeeded, outcome) = fit_outcome(succeeded, outcome, MAX_OUTCOME_BYTES);
        // Kept before it is reported, so a run seen to have ended has kept its outcomes.
        if let Some(key) = cache_key.filter(|_| succeeded && outcome.cached_from.is_none()) {
            cache::keep(&self.bus, &dispatch, &key, attempt, &outcome).await;
        }
        let report = ResultReport {
            tenant: dispatch.tenant.clone(),
            run_id: dispatch.run_id,
            step: dispatch.step.id.clone(),
            lease,
            succeeded,
            outcome,
        };
        let deadline = tokio::time::Instant::now() + self.settings.lease() * 4;
        loop {
            match self.bus.request::<_, ReportAck>(ns.scheduler_command("report"), &report).await {
                Ok(ReportAck::Recorded) => break,
                Ok(ReportAck::Stale) => {
                    // The message now belongs to the attempt that superseded this one.
                    tracing::info!("result was stale: the step had been given to another attempt");
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "reporting result; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    // The message will be redelivered; the scheduler then decides again.
                    tracing::error!(error = %e, "could not report result");
                    return;
                }
            }
        }
        let o = &report.outcome;
        let outcome = if o.cached_from.is_some() {
            "cached"
        } else if report.succeeded {
            "succeeded"
        } else if o.cancelled {
            "cancelled"
        } else if o.timed_out {
            "timed_out"
        } else {
            "failed"
        };
        metrics::counter!("taskmesh_steps_finished_total", "outcome" => outcome).increment(1);
        if ran {
            let secs = (o.finished_at - o.started_at).to_std().unwrap_or_default().as_secs_f64();
            let kind = dispatch.step.kind().unwrap_or("none");
            metrics::histogram!("taskmesh_step_duration_seconds", "kind" => kind).record(secs);
        }
        // The breaker hears of it as soon as the report is recorded, before the ack (a retry
        // without a backoff may still be admitted before it has).
        let verdict = (ran && !report.outcome.cancelled).then_some(report.succeeded);
        self.breaker_signal(&dispatch, verdict).await;
        drop(heartbeat);
        if let Err(e) = acker.double_ack().await {
            tracing::warn!(error = %e, "ack after report failed; a redelivery will be denied");
        }
        self.slot_freed();
    }

    /// Tells the dispatcher how an attempt behind a circuit breaker went (best effort: a lost
    /// signal is one attempt the breaker does not count, or a probe it waits for longer).
    /// `verdict`: how it went, `None` when it gave none (a cached outcome, a step that could not
    /// start or was cancelled, a lease denied): a breaker waiting for it as its probe then lets
    /// another go. Nothing for a step without a breaker.
    async fn breaker_signal(&self, dispatch: &Dispatch, verdict: Option<bool>) {
        let Some(breaker) = &dispatch.step.circuit_breaker else { return };
        let signal = BreakerSignal {
            tenant: dispatch.tenant.clone(),
            key: breaker.key.clone(),
            failures: breaker.failures,
            cooldown_seconds: breaker.cooldown_seconds,
            run_id: dispatch.run_id,
            step: dispatch.step.id.clone(),
            succeeded: verdict,
        };
        let body = serde_json::to_vec(&signal).expect("serialises");
        if let Err(e) = self.bus.client().publish(self.bus.namespace().breaker_signals(), body.into()).await {
            tracing::warn!(error = %e, "could not tell the dispatcher how a step behind a circuit breaker went");
        }
    }

    /// Opens the step's secrets and checkout; a step for which they cannot be opened fails,
    /// having run nothing (the outcome saying why).
    async fn open(&self, dispatch: &Dispatch) -> Result<Opened, taskmesh_events::StepOutcome> {
        let opened = async {
            Ok(Opened { secrets: self.open_secrets(dispatch).await?, checkout: self.open_checkout(dispatch).await? })
        };
        opened.await.map_err(|error: String| {
            let now = chrono::Utc::now();
            taskmesh_events::StepOutcome { error: Some(error), started_at: now, finished_at: now, ..Default::default() }
        })
    }

    /// Runs the step here with what [`Self::open`] opened: its success and outcome, or `None`
    /// when it was handed back.
    async fn run_here(
        &self,
        dispatch: &Dispatch,
        attempt: u32,
        Opened { secrets, checkout }: Opened,
        hand_back: &CancellationToken,
        kill: &CancellationToken,
        first_line: Option<String>,
    ) -> Option<(bool, taskmesh_events::StepOutcome)> {
        let (logs, publisher) = self.log_publisher(dispatch, attempt);
        // Through the step's own publisher, so its lines are numbered on from it.
        if let Some(line) = first_line {
            let _ = logs.send((LogStream::System, line)).await;
        }
        let ctx = step::StepContext {
            run_id: dispatch.run_id,
            attempt,
            output_limit: self.settings.output_limit_bytes,
            work_dir: self.settings.work_dir.clone(),
            logs: Some(logs),
            secrets,
            checkout,
            runtime: self.runtime.clone(),
            masks: Default::default(),
        };
        let outcome = step::run(&dispatch.step, &ctx, hand_back.clone(), kill.clone()).await;
        // Every line is out before the result: a follower sees the whole log, then the end.
        drop(ctx);
        let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
        outcome
    }

    /// Says in the step's log where its cached outcome came from.
    async fn log_cached(&self, dispatch: &Dispatch, attempt: u32, from: &taskmesh_events::CachedFrom) {
        let line = format!(
            "cached: the outcome of run {}'s step {} (attempt {}, finished {}); the step did not run",
            from.run_id,
            from.step,
            from.attempt,
            from.finished_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        );
        let (logs, publisher) = self.log_publisher(dispatch, attempt);
        let _ = logs.send((LogStream::System, line)).await;
        drop(logs);
        let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    }

    /// Tells the dispatcher a message left the dispatch queue, so held work can go out at once
    /// rather than at its next periodic look (see [`Executor::signal_slots`]).
    fn slot_freed(&self) {
        self.slots_freed.notify_one();
    }

    /// Tells the dispatcher that slots were freed, so held work can go (core NATS, best effort:
    /// it also looks again every 100 ms). One signal serves every slot freed while the last
    /// was going out or within [`SLOT_SIGNAL_GAP`] after it: a busy executor sends a few
    /// hundred a second at most, rather than one per step, each of which woke the dispatcher
    /// for a round of its own.
    async fn signal_slots(self) {
        loop {
            self.slots_freed.notified().await;
            let _ = self.bus.client().publish(self.bus.namespace().slot_signals(), Vec::<u8>::new().into()).await;
            tokio::time::sleep(SLOT_SIGNAL_GAP).await;
        }
    }
}

/// What a step runs with, opened: its secrets (name, value) and where its checkout comes from.
struct Opened {
    secrets: Vec<(String, String)>,
    checkout: Option<checkout::Source>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_too_large_to_report_is_cut_to_fit_or_fails_saying_why() {
        let at = chrono::Utc::now();
        let outcome = |output: String, outputs: &[(&str, String)]| StepOutcome {
            output,
            outputs: outputs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            started_at: at,
            finished_at: at,
            ..Default::default()
        };
        let json = |o: &StepOutcome| serde_json::to_vec(o).unwrap().len();
        // Fits: unchanged.
        let small = outcome("ok\n".into(), &[("a", "1".into())]);
        assert_eq!(fit_outcome(true, small.clone(), 4096), (true, small));
        // Control bytes take six each in JSON: the output is cut, the outputs kept.
        let (ok, cut) = fit_outcome(true, outcome("\u{1}é".repeat(20_000), &[("a", "1".into())]), 16 * 1024);
        assert!(ok && cut.output_truncated && json(&cut) <= 16 * 1024, "{}", json(&cut));
        assert!(!cut.output.is_empty() && cut.outputs["a"] == "1");
        // Outputs too large by themselves: dropped, and the step fails saying why.
        let (ok, failed) = fit_outcome(true, outcome("x".into(), &[("body", "\u{1}".repeat(10_000))]), 16 * 1024);
        assert!(!ok && failed.outputs.is_empty() && failed.output.is_empty());
        assert!(failed.error.unwrap().contains("more than it may"));
    }

    /// Two deliveries of one step held at once each have a kill switch; one let go leaves the
    /// other's in place, and the last let go leaves nothing behind.
    #[test]
    fn a_steps_kill_switches_are_kept_per_holder_and_removed_with_the_last() {
        let switches = KillSwitches::default();
        let run = Uuid::now_v7();
        let first = KillSwitch::register(&switches, run, "a");
        let second = KillSwitch::register(&switches, run, "a");
        let other = KillSwitch::register(&switches, run, "b");
        drop(second);
        let held = |step: &str| switches.lock().unwrap().get(&run).and_then(|s| s.get(step)).map(Vec::len);
        assert_eq!((held("a"), held("b")), (Some(1), Some(1)));
        // What a cancellation signal fires: the switches still held.
        let fired: Vec<_> = switches.lock().unwrap()[&run].values().flatten().map(|(_, t)| t.clone()).collect();
        fired.iter().for_each(CancellationToken::cancel);
        assert!(first.token.is_cancelled() && other.token.is_cancelled());
        drop((first, other));
        assert!(switches.lock().unwrap().is_empty());
    }
}
