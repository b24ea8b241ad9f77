//! Deliveries pulled tenant by tenant, so that one tenant's backlog, retries or slow endpoint
//! do not hold up another's.
//!
//! Each tenant's deliveries are on their own subject of the `{NS}_DELIVERIES` work queue, and
//! a tenant with deliveries gets its own durable pull consumer on that subject
//! (`deliveries-{tenant}`, which the server removes once idle for [`idle_consumer`]). (A single
//! consumer for all tenants, as before, handed out one delivery at a time: a tenant whose
//! endpoint timed out held everyone's webhooks, and 1,000 deliveries waiting for their retries,
//! the server's default limit of unacknowledged messages, stopped all of them.)
//!
//! A notifier runs a puller for at most `tenants_at_once` tenants at once (1,024). A puller takes its
//! tenant's next delivery only when one of the tenant's `per_tenant_concurrency` places is free
//! (nothing is pulled ahead), and a delivery waits for one of the `concurrency` request places,
//! shared by all tenants first come first served, with its ack deadline renewed while it waits
//! and while it is attempted. The notifier learns that a tenant has deliveries by hearing them
//! enqueued (a plain subscription on the queue's subjects) and from the queue's per-subject
//! counts every [`SWEEP`] (what it could not hear: its own restart, another process's enqueues
//! while it was away, retries come due for a tenant without a puller). A puller stops once its
//! consumer holds nothing to deliver and nothing unacknowledged. When tenants wait for a place
//! (in arrival order), pullers give theirs up: one whose tenant has only retries waiting at its
//! next look (a pull's wait at most), a busy one once it has held its place for its slice
//! (`notification.tenant_slice_secs`; it then takes nothing more and goes when what is under
//! way ends); their tenants are found again by the sweep and wait their turn.
//!
//! Crash safety is the work queue's: a delivery leaves the queue only when acknowledged after
//! its attempt, and one whose notifier died is redelivered after its ack deadline.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Notifier;

/// Most tenants waiting for a place (beyond it, the sweep finds them again).
const MAX_WAITING: usize = 100_000;
/// How often the queue's subjects are read for tenants with deliveries.
pub const SWEEP: Duration = Duration::from_secs(2);
/// A tenant's consumer unused this long past the longest retry delay is removed by the server
/// (and made again when needed); see [`idle_consumer`].
pub const IDLE_CONSUMER: Duration = Duration::from_secs(3600);

/// How long a tenant's consumer may sit unused before the server removes it: an hour past the
/// schedule's longest delay. Deliveries waiting for a retry (handed back with a delay) are
/// unacknowledged on it, and the server does not count them as use: removed while no notifier
/// pulled (all of them down), the consumer would be made again with each delivery's count of
/// attempts back at one, its schedule started over.
pub fn idle_consumer(retry_delays_secs: &[u64]) -> Duration {
    IDLE_CONSUMER + Duration::from_secs(retry_delays_secs.iter().copied().max().unwrap_or(0))
}
/// How long one pull for a tenant's next delivery waits on the server.
const PULL_FOR: Duration = Duration::from_secs(10);
/// The consumer all tenants shared, which a work queue does not allow beside theirs.
const SHARED_CONSUMER: &str = "deliveries";
/// A warning repeated for every tenant is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The name of `tenant`'s delivery consumer (tenant ids are subject tokens, safe here too).
pub fn consumer_name(tenant: &str) -> String {
    format!("deliveries-{tenant}")
}

/// A running puller, as the pool sees it.
struct Puller {
    /// Tells this puller from a later one of the same tenant.
    generation: u64,
    /// Deliveries were heard for the tenant since the puller last looked: it must not stop.
    again: bool,
    /// The puller's last look found nothing to deliver (only retries waiting, if anything).
    idle: bool,
    /// Asked to give its place up (a tenant waits for one): it does when idle, or once it has
    /// held the place for its slice (then taking nothing more, and going when what is under
    /// way ends).
    asked: bool,
    since: Instant,
}

#[derive(Default)]
struct Places {
    running: HashMap<String, Puller>,
    /// Tenants turned away at `tenants_at_once`, in arrival order (and as a set).
    waiting: VecDeque<String>,
    queued: HashSet<String>,
    generation: u64,
}

struct Pool {
    notifier: Notifier,
    places: Mutex<Places>,
    /// Requests under way across tenants.
    requests: Arc<Semaphore>,
    per_tenant: usize,
    /// Most pullers at once.
    tenants: usize,
    /// How long a busy puller keeps its place while a tenant waits for one.
    slice: Duration,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// When a consumer could last not be made (logged once a minute, not once a tenant).
    warned: Mutex<Option<Instant>>,
}

/// Delivers until `shutdown` is cancelled, then lets the attempts under way finish.
pub(crate) async fn run(notifier: Notifier, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ns = notifier.bus.namespace().clone();
    let stream = ns.deliveries_stream();
    // A work queue refuses a tenant's consumer beside one that takes every tenant's. Its
    // unacknowledged deliveries stay in the queue for the tenants' consumers.
    match notifier.bus.jetstream().delete_consumer_from_stream(SHARED_CONSUMER, &stream).await {
        Ok(_) => tracing::info!("removed the consumer all tenants shared; deliveries are pulled per tenant"),
        Err(e) if is_not_found(&e) => {}
        Err(e) => tracing::warn!(error = %e, "could not remove the consumer all tenants shared"),
    }
    let pool = Arc::new(Pool {
        requests: Arc::new(Semaphore::new(notifier.settings.concurrency.max(1))),
        per_tenant: notifier.settings.per_tenant_concurrency.max(1),
        tenants: notifier.settings.tenants_at_once.max(1),
        slice: Duration::from_secs(notifier.settings.tenant_slice_secs.max(1)),
        notifier,
        places: Mutex::default(),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
        warned: Mutex::default(),
    });
    // Heard as they are enqueued (by any process); a hint only: a lost one waits for the sweep.
    let mut heard = match pool.notifier.bus.client().subscribe(ns.deliveries_all()).await {
        Ok(sub) => Some(sub),
        Err(e) => {
            tracing::warn!(error = %e, "cannot hear deliveries enqueued; finding them every {SWEEP:?}");
            None
        }
    };
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = async { heard.as_mut().unwrap().next().await }, if heard.is_some() => match msg {
                Some(msg) => {
                    if let Some(tenant) = ns.parse_delivery(msg.subject.as_str()) {
                        pool.start(tenant);
                    }
                }
                None => heard = None,
            },
            _ = sweep.tick() => match pool.notifier.bus.subject_counts(&stream, &ns.deliveries_all()).await {
                Ok(counts) => {
                    for (subject, count) in counts {
                        if let (Some(tenant), true) = (ns.parse_delivery(&subject), count > 0) {
                            pool.start(tenant);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the delivery queue's tenants failed"),
            },
        }
    }
    pool.tasks.close();
    pool.tasks.wait().await;
    Ok(())
}

/// JetStream's "consumer not found".
fn is_not_found(e: &async_nats::jetstream::stream::ConsumerError) -> bool {
    use async_nats::jetstream::stream::ConsumerErrorKind;
    matches!(e.kind(), ConsumerErrorKind::JetStream(js)
        if js.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND)
}

impl Pool {
    /// Sees that `tenant` has a puller: says so to its puller if it runs, starts one if there is
    /// a place, or else queues the tenant and asks pullers to give their places up.
    fn start(self: &Arc<Self>, tenant: &str) {
        let mut places = self.places.lock().unwrap();
        if let Some(puller) = places.running.get_mut(tenant) {
            puller.again = true;
            return;
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        if places.running.len() < self.tenants {
            self.spawn(&mut places, tenant.to_string());
            return;
        }
        if !places.queued.contains(tenant) && places.queued.len() < MAX_WAITING {
            if places.queued.is_empty() {
                tracing::warn!(tenants = self.tenants, "every puller's place is taken; tenants wait for one");
            }
            places.queued.insert(tenant.to_string());
            places.waiting.push_back(tenant.to_string());
        }
        // As many pullers are asked as tenants wait beyond those already asked: idle ones
        // first, then those that have held their place for a slice.
        let asked = places.running.values().filter(|p| p.asked).count();
        let mut wanted = places.waiting.len().saturating_sub(asked);
        for busy in [false, true] {
            for puller in places.running.values_mut() {
                if wanted == 0 {
                    return;
                }
                let eligible = if busy { puller.since.elapsed() >= self.slice } else { puller.idle };
                if !puller.asked && eligible {
                    // It sees it at its next look (within a pull's wait): a pull cut short
                    // could leave a delivery to wait out its ack deadline.
                    puller.asked = true;
                    wanted -= 1;
                }
            }
        }
    }

    /// Starts `tenant`'s puller (a place is free: the caller checked, holding the lock).
    fn spawn(self: &Arc<Self>, places: &mut Places, tenant: String) {
        places.generation += 1;
        let generation = places.generation;
        let puller = Puller { generation, again: false, idle: false, asked: false, since: Instant::now() };
        places.running.insert(tenant.clone(), puller);
        let me = self.clone();
        self.tasks.spawn(async move {
            // Its place is freed however the puller ends (a panic too), and given to the
            // first tenant waiting.
            let _leaving = Leaving { pool: me.clone(), tenant: tenant.clone(), generation };
            me.pull(&tenant, generation).await;
        });
    }

    /// Frees the place of `tenant`'s puller `generation` (if it still holds it) and gives the
    /// free places to the tenants waiting.
    fn leave(self: &Arc<Self>, tenant: &str, generation: u64) {
        let mut places = self.places.lock().unwrap();
        if places.running.get(tenant).is_some_and(|p| p.generation == generation) {
            places.running.remove(tenant);
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        while places.running.len() < self.tenants {
            let Some(next) = places.waiting.pop_front() else { break };
            places.queued.remove(&next);
            if !places.running.contains_key(&next) {
                self.spawn(&mut places, next);
            }
        }
    }

    /// Whether `tenant`'s puller `generation` may stop, its consumer holding nothing: not if
    /// something was heard for it since it looked (it looks again). Decided, and its place
    /// freed, under the lock `start` takes, so nothing heard is missed.
    fn may_stop(&self, tenant: &str, generation: u64) -> bool {
        let mut places = self.places.lock().unwrap();
        match places.running.get_mut(tenant) {
            Some(p) if p.generation == generation && p.again => {
                p.again = false;
                false
            }
            Some(p) if p.generation == generation => {
                places.running.remove(tenant);
                true
            }
            _ => true,
        }
    }

    /// Whether `tenant`'s puller `generation`, with nothing under way, gives its place up now
    /// (freed under the lock): asked while a tenant still waits, and idle or past its slice.
    fn gives_up(&self, tenant: &str, generation: u64) -> bool {
        let mut places = self.places.lock().unwrap();
        let waiting = !places.waiting.is_empty();
        let Some(p) = places.running.get_mut(tenant).filter(|p| p.generation == generation) else { return true };
        if !p.asked {
            return false;
        }
        if !waiting {
            p.asked = false;
            return false;
        }
        if p.idle || p.since.elapsed() >= self.slice {
            places.running.remove(tenant);
            return true;
        }
        false
    }

    /// Whether `tenant`'s puller `generation`, busy, stops taking deliveries to give its place
    /// up: asked while a tenant still waits, and past its slice.
    fn drains(&self, tenant: &str, generation: u64) -> bool {
        let mut places = self.places.lock().unwrap();
        let waiting = !places.waiting.is_empty();
        let Some(p) = places.running.get_mut(tenant).filter(|p| p.generation == generation) else { return false };
        if p.asked && !waiting {
            p.asked = false;
        }
        p.asked && p.since.elapsed() >= self.slice
    }

    fn set_idle(&self, tenant: &str, generation: u64, idle: bool) {
        if let Some(p) = self.places.lock().unwrap().running.get_mut(tenant).filter(|p| p.generation == generation) {
            p.idle = idle;
        }
    }

    /// Pulls `tenant`'s deliveries until its consumer holds none, it gives its place up to a
    /// tenant waiting, or shutdown.
    async fn pull(self: &Arc<Self>, tenant: &str, generation: u64) {
        let notifier = &self.notifier;
        let ns = notifier.bus.namespace();
        let timeout = Duration::from_millis(notifier.settings.timeout_ms);
        let config = PullConfig {
            filter_subject: ns.delivery(tenant),
            ack_policy: AckPolicy::Explicit,
            // Renewed while a delivery waits and while it is attempted (see `attempt`).
            ack_wait: 2 * timeout + Duration::from_secs(10),
            // Unlimited: an attempt past the schedule ends without a request (`deliver_one`),
            // so a last attempt whose ack was lost still leaves the queue.
            max_deliver: -1,
            // Deliveries waiting for their retry are unacknowledged: they must not stop the
            // tenant's others (the queue's share per tenant bounds them).
            max_ack_pending: -1,
            inactive_threshold: idle_consumer(&notifier.settings.retry_delays_secs),
            ..Default::default()
        };
        let consumer = match notifier.bus.durable(&ns.deliveries_stream(), &consumer_name(tenant), config).await {
            Ok(c) => c,
            Err(e) => {
                let mut warned = self.warned.lock().unwrap();
                if warned.is_none_or(|at| at.elapsed() > WARN_EVERY) {
                    *warned = Some(Instant::now());
                    tracing::warn!(%tenant, error = %e, "cannot pull a tenant's deliveries (an older notifier running beside this one?); trying again on the next sweep");
                }
                return;
            }
        };
        let places = Arc::new(Semaphore::new(self.per_tenant));
        loop {
            if self.drains(tenant, generation) {
                // Its slice is over and a tenant waits: it takes nothing more, lets what is
                // under way finish, and goes.
                let all = u32::try_from(self.per_tenant).unwrap_or(u32::MAX);
                tokio::select! {
                    _ = self.shutdown.cancelled() => {}
                    _ = places.acquire_many(all) => {}
                }
                self.leave(tenant, generation);
                return;
            }
            let place = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                p = places.clone().acquire_owned() => p.expect("never closed"),
            };
            // Nothing under way here: the place may be given up.
            let free = places.available_permits() + 1 == self.per_tenant;
            if free && self.gives_up(tenant, generation) {
                return;
            }
            let pulled = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                b = async {
                    let mut batch = consumer.batch().max_messages(1).expires(PULL_FOR).messages().await?;
                    batch.next().await.transpose()
                } => b,
            };
            match pulled {
                Ok(Some(msg)) => {
                    self.set_idle(tenant, generation, false);
                    let me = self.clone();
                    self.tasks.spawn(async move {
                        me.attempt(msg).await;
                        drop(place);
                    });
                }
                Ok(None) => {
                    drop(place);
                    if places.available_permits() < self.per_tenant {
                        continue;
                    }
                    // Nothing came and nothing is under way here.
                    let info = match consumer.get_info().await {
                        Ok(info) => info,
                        Err(e) => {
                            tracing::debug!(%tenant, error = %e, "reading the consumer failed");
                            continue;
                        }
                    };
                    if info.num_pending == 0 {
                        if info.num_ack_pending == 0 && self.may_stop(tenant, generation) {
                            return;
                        }
                        // Only retries waiting: a place it gives up when asked.
                        self.set_idle(tenant, generation, info.num_ack_pending > 0);
                    }
                }
                Err(e) => {
                    drop(place);
                    tracing::warn!(%tenant, error = %e, "pulling a delivery failed");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// One delivery: waits for a request's turn, attempts it, and acks it as the attempt says,
    /// renewing its ack deadline all the while.
    async fn attempt(&self, msg: async_nats::jetstream::Message) {
        let every = Duration::from_millis(self.notifier.settings.timeout_ms)
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let mut renew = tokio::time::interval(every);
        renew.tick().await;
        let progress = || async {
            if let Err(e) = msg.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "renewing a delivery's ack deadline failed");
            }
        };
        let turn = {
            let wait = self.requests.clone().acquire_owned();
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    turn = &mut wait => break turn.expect("never closed"),
                    _ = self.shutdown.cancelled() => {
                        // Not attempted: handed back for another notifier (or this one, restarted).
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        return;
                    }
                    _ = renew.tick() => progress().await,
                }
            }
        };
        // The deadline starts afresh with the attempt, and is renewed while it lasts (a pending
        // commit status may take two requests and reads of the log).
        progress().await;
        let kind = {
            let attempt = self.notifier.deliver_one(&msg, &self.shutdown);
            tokio::pin!(attempt);
            loop {
                tokio::select! {
                    kind = &mut attempt => break kind,
                    _ = renew.tick() => progress().await,
                }
            }
        };
        drop(turn);
        let outcome = match kind {
            AckKind::Ack => "sent",
            AckKind::Nak(_) => "retry",
            _ => "given_up",
        };
        metrics::counter!("taskmesh_deliveries_total", "outcome" => outcome).increment(1);
        if let Err(e) = msg.ack_with(kind).await {
            tracing::warn!(error = %e, "ack failed; the delivery will be redelivered");
        }
    }
}

/// Frees a puller's place when it ends.
struct Leaving {
    pool: Arc<Pool>,
    tenant: String,
    generation: u64,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        self.pool.leave(&self.tenant, self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_consumer_outlasts_the_longest_retry_delay_by_an_hour() {
        let hours = |h: u64| Duration::from_secs(h * 3600);
        assert_eq!(idle_consumer(&[5, 30, 120, 600, 1800, 3600, 10800]), hours(4));
        assert_eq!(idle_consumer(&[]), hours(1));
    }
}
