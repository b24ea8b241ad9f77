//! Deliveries pulled tenant by tenant, so that one tenant's backlog, retries or slow endpoint
//! never hold up another's.
//!
//! Each tenant's deliveries are on their own subject of the `{NS}_DELIVERIES` work queue, and
//! a tenant with deliveries gets its own durable pull consumer on that subject
//! (`deliveries-{tenant}`, which the server removes once idle for [`IDLE_CONSUMER`]). A single
//! consumer for all tenants, as before, handed out one delivery at a time: a tenant whose
//! endpoint timed out held everyone's webhooks, and deliveries waiting for their retries
//! counted against the consumer's one limit of unacknowledged messages.
//!
//! This notifier pulls from at most [`MAX_TENANTS`] tenants' consumers at once; a tenant's next
//! delivery only when one of its `per_tenant_concurrency` places is free (nothing is pulled
//! ahead, so nothing sits out its ack deadline in memory); and sends at most `concurrency`
//! requests at once across tenants, first come first served, a delivery waiting for its turn
//! having its ack deadline renewed. It learns that a tenant has deliveries by hearing them
//! enqueued (a plain subscription on the queue's subjects) and by reading the queue's
//! per-subject counts every [`SWEEP`] (what it could not hear: its own restart, another
//! process's enqueues while it was away). A tenant's puller stops when its consumer holds
//! nothing to deliver and nothing unacknowledged (a retry waiting for its time is the latter).
//!
//! Crash safety is the work queue's: a delivery leaves the queue only when acknowledged after
//! its attempt, and one whose notifier died is redelivered after its ack deadline.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Notifier;

/// Most tenants whose consumers one notifier pulls from at once (others wait for a place; the
/// sweep finds them again).
pub const MAX_TENANTS: usize = 1024;
/// How often the queue's subjects are read for tenants with deliveries.
pub const SWEEP: Duration = Duration::from_secs(2);
/// A tenant's consumer unused this long is removed by the server (and made again when needed).
pub const IDLE_CONSUMER: Duration = Duration::from_secs(3600);
/// How long one pull for a tenant's next delivery waits on the server.
const PULL_FOR: Duration = Duration::from_secs(10);
/// The consumer all tenants shared, which a work queue does not allow beside theirs.
const SHARED_CONSUMER: &str = "deliveries";

/// The name of `tenant`'s delivery consumer (tenant ids are subject tokens, safe here too).
pub fn consumer_name(tenant: &str) -> String {
    format!("deliveries-{tenant}")
}

struct Pool {
    notifier: Notifier,
    /// Tenants with a puller.
    active: Mutex<HashSet<String>>,
    /// Requests under way across tenants.
    requests: Arc<Semaphore>,
    per_tenant: usize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Delivers until `shutdown` is cancelled, then lets the attempts under way finish.
pub(crate) async fn run(notifier: Notifier, shutdown: CancellationToken) -> anyhow::Result<()> {
    let ns = notifier.bus.namespace().clone();
    let stream = ns.deliveries_stream();
    // A work queue refuses a tenant's consumer beside one that takes every tenant's. Its
    // unacknowledged deliveries stay in the queue for the tenants' consumers.
    match notifier.bus.jetstream().delete_consumer_from_stream(SHARED_CONSUMER, &stream).await {
        Ok(_) => tracing::info!("removed the consumer all tenants shared; deliveries are pulled per tenant"),
        Err(e) if e.to_string().contains("not found") => {}
        Err(e) => tracing::warn!(error = %e, "could not remove the consumer all tenants shared"),
    }
    let pool = Arc::new(Pool {
        requests: Arc::new(Semaphore::new(notifier.settings.concurrency.max(1))),
        per_tenant: notifier.settings.per_tenant_concurrency.max(1),
        notifier,
        active: Mutex::default(),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
    });
    let prefix = format!("{}.delivery.", ns.as_str());
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
                    if let Some(tenant) = msg.subject.as_str().strip_prefix(&prefix) {
                        pool.start(tenant);
                    }
                }
                None => heard = None,
            },
            _ = sweep.tick() => match pool.notifier.bus.subject_counts(&stream, &ns.deliveries_all()).await {
                Ok(counts) => {
                    for (subject, count) in counts {
                        if let (Some(tenant), true) = (subject.strip_prefix(&prefix), count > 0) {
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

impl Pool {
    /// Starts `tenant`'s puller unless it has one (or [`MAX_TENANTS`] are running).
    fn start(self: &Arc<Self>, tenant: &str) {
        {
            let mut active = self.active.lock().unwrap();
            if active.contains(tenant) || active.len() >= MAX_TENANTS || self.shutdown.is_cancelled() {
                return;
            }
            active.insert(tenant.to_string());
        }
        let me = self.clone();
        let tenant = tenant.to_string();
        self.tasks.spawn(async move {
            me.pull(&tenant).await;
            me.active.lock().unwrap().remove(&tenant);
        });
    }

    /// Pulls `tenant`'s deliveries until its consumer holds none (or shutdown).
    async fn pull(self: &Arc<Self>, tenant: &str) {
        let notifier = &self.notifier;
        let ns = notifier.bus.namespace();
        let timeout = Duration::from_millis(notifier.settings.timeout_ms);
        let config = PullConfig {
            filter_subject: ns.delivery(tenant),
            ack_policy: AckPolicy::Explicit,
            // A pending status may take two requests (its own, and the outcome's again).
            ack_wait: 2 * timeout + Duration::from_secs(10),
            // Unlimited: an attempt past the schedule ends without a request (`deliver_one`),
            // so a last attempt whose ack was lost still leaves the queue.
            max_deliver: -1,
            // Deliveries waiting for their retry are unacknowledged: they must not stop the
            // tenant's others (the queue's share per tenant bounds them).
            max_ack_pending: -1,
            inactive_threshold: IDLE_CONSUMER,
            ..Default::default()
        };
        let consumer = match notifier.bus.durable(&ns.deliveries_stream(), &consumer_name(tenant), config).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%tenant, error = %e, "cannot pull the tenant's deliveries; trying again later");
                return;
            }
        };
        let places = Arc::new(Semaphore::new(self.per_tenant));
        loop {
            let place = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                p = places.clone().acquire_owned() => p.expect("never closed"),
            };
            let pulled = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                b = async {
                    let mut batch = consumer.batch().max_messages(1).expires(PULL_FOR).messages().await?;
                    batch.next().await.transpose()
                } => b,
            };
            match pulled {
                Ok(Some(msg)) => {
                    let me = self.clone();
                    self.tasks.spawn(async move {
                        me.attempt(msg).await;
                        drop(place);
                    });
                }
                Ok(None) => {
                    drop(place);
                    // Nothing came: stop when nothing is under way here and the consumer holds
                    // nothing unacknowledged (another notifier's, or a retry's wait).
                    if places.available_permits() < self.per_tenant {
                        continue;
                    }
                    match consumer.clone().info().await {
                        Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => return,
                        Ok(_) => {}
                        Err(e) => tracing::debug!(%tenant, error = %e, "reading the consumer failed"),
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

    /// One delivery: waits for a request's turn (renewing its ack deadline meanwhile), attempts
    /// it, and acks it as the attempt says.
    async fn attempt(&self, msg: async_nats::jetstream::Message) {
        let turn = {
            let wait = self.requests.clone().acquire_owned();
            tokio::pin!(wait);
            let mut renew = tokio::time::interval(
                Duration::from_millis(self.notifier.settings.timeout_ms).max(Duration::from_secs(3)),
            );
            renew.tick().await;
            loop {
                tokio::select! {
                    turn = &mut wait => break turn.expect("never closed"),
                    _ = self.shutdown.cancelled() => {
                        // Not attempted: handed back for another notifier (or this one, restarted).
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        return;
                    }
                    _ = renew.tick() => {
                        if let Err(e) = msg.ack_with(AckKind::Progress).await {
                            tracing::debug!(error = %e, "renewing a waiting delivery's deadline failed");
                        }
                    }
                }
            }
        };
        let kind = self.notifier.deliver_one(&msg).await;
        drop(turn);
        if let Err(e) = msg.ack_with(kind).await {
            tracing::warn!(error = %e, "ack failed; the delivery will be redelivered");
        }
    }
}
