//! Notification: tells subscribers when runs end, by outbound webhooks signed per the
//! Standard Webhooks specification, Slack messages or e-mails.
//!
//! Two loops. The fan-out reads the runs that ended from the `{NS}_ENDED` work queue (durable
//! consumer `fan-out`; the scheduler puts each run's terminal event there as it consumes it,
//! so this service reads one message per run, not every run event; a scheduler in this
//! process hands it over directly instead, `Bus::hand_over`) and enqueues one delivery
//! per subscribed endpoint on the `{NS}_DELIVERIES` work queue, deduplicated by
//! `{event id}:{endpoint id}`. Each tenant's endpoints are kept in memory between runs' ends
//! ([`EndpointCache`]), forgotten as a trigger on `webhook_endpoints` announces their change
//! (and all of them while that announcement cannot be heard), so a run's end costs no query.
//! The delivery loop (a durable consumer per tenant, [`tenants`], so that one tenant's slow
//! endpoint or backlog does not hold up another's) POSTs each one with `webhook-id` (the
//! event id, stable across retries so the receiver can deduplicate), `webhook-timestamp` and
//! `webhook-signature` (after a rotation of its secret, a signature with each of the last two
//! for a while); a failure is retried after the configured delays, then given up: recorded
//! on the endpoint's log as failed (`WebhookDeliveryFailed`, listed by the API and sent again on
//! request), and the endpoint disabled once every delivery to it has failed for
//! `disable_after_secs` (a disabled endpoint's deliveries are given up unsent, and listed). Slack endpoints get a Slack message instead, e-mail endpoints an
//! e-mail (`email`).
//!
//! The same queue carries commit statuses ([`CommitStatus`]): the scheduler enqueues a
//! webhook-triggered run's state when it is submitted and when it ends, and the delivery loop
//! reports it to the forge's API (GitHub, GitLab or Gitea) with the connection's status token,
//! as the status `taskmesh/{workflow}` of the pushed commit (`taskmesh/{workflow}/pr` of a pull
//! request's head: [`CommitStatus::context`]). A connection without a token
//! reports nothing; a `pending` that would land after the run's end is not sent.
//!
//! # Layout
//! - this file: [`Notifier`] (the fan-out, one delivery's attempt, Slack messages, commit
//!   statuses), [`Delivery`], [`sign`];
//! - [`tenants`]: the delivery loop, pulling each tenant's deliveries on its own;
//! - `email`: e-mail endpoints' messages, sent through the operator's SMTP server.

mod email;
pub mod tenants;

use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::{AckKind, Message};
use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;
use sqlx::{PgPool, Row};
use taskmesh_bus::{AfterLast, Bus};
use taskmesh_config::NotificationSettings;
use taskmesh_events::command::{CommitState, CommitStatus};
use taskmesh_events::{Event, Forge, RunKey};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// How long a delivery given up keeps trying to record its failure before going back to the
/// queue.
const RECORD_FOR: Duration = Duration::from_secs(120);

/// What a delivery's last attempt learnt that giving it up needs.
#[derive(Debug, Default, Clone, Copy)]
struct Attempted {
    /// The endpoint was found disabled.
    disabled: bool,
    /// The state a commit status was sent as.
    sent_as: Option<CommitState>,
}

/// A failed delivery's error when its endpoint was disabled: queued while it was (or before,
/// or sent again since), it was not sent.
const DISABLED: &str = "the endpoint is disabled";

/// The consumer of runs that ended.
pub const FAN_OUT: &str = "fan-out";
/// Runs' ends handed over by the scheduler of this process that are fanned out at once (more
/// go onto the queue).
const HANDED_OVER_AT_ONCE: usize = 64;
/// A run's deliveries on their way onto the queue at once (one an endpoint of its tenant).
const ENQUEUED_AT_ONCE: usize = 32;

pub use taskmesh_events::command::Delivery;

/// What the deliveries stream carries: webhook deliveries and commit statuses.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Outgoing {
    Webhook(Delivery),
    Status(CommitStatus),
}

/// Signs `body` per Standard Webhooks: `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`
/// keyed with the base64 part of the `whsec_` secret.
pub fn sign(secret: &str, message_id: &str, timestamp: i64, body: &[u8]) -> anyhow::Result<String> {
    let webhook = standardwebhooks::Webhook::new(secret).map_err(|e| anyhow::anyhow!("bad signing secret: {e:?}"))?;
    webhook.sign(message_id, timestamp, body).map_err(|e| anyhow::anyhow!("signing: {e:?}"))
}

/// A webhook endpoint as the fan-out needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Subscriber {
    pub id: Uuid,
    /// The events it is sent; empty: all.
    pub event_types: Vec<String>,
    pub disabled_at: Option<chrono::DateTime<Utc>>,
}

/// Each tenant's webhook endpoints, by tenant; see [`taskmesh_store::NotifiedCache`].
pub type EndpointCache = taskmesh_store::NotifiedCache<std::sync::Arc<[Subscriber]>>;
/// Most tenants whose endpoints are kept in memory.
const MAX_CACHED_TENANTS: usize = 10_000;
/// Longest an entry of [`EndpointCache`] is kept, should an announcement be lost all the same.
const CACHED_ENDPOINTS_TTL: Duration = Duration::from_secs(60);

/// The notification service.
#[derive(Clone)]
pub struct Notifier {
    bus: Bus,
    pool: PgPool,
    settings: NotificationSettings,
    /// Connects only where `egress` permits.
    http: reqwest::Client,
    egress: std::sync::Arc<taskmesh_egress::Egress>,
    /// Opens endpoints' sealed signing secrets.
    keyring: Option<std::sync::Arc<taskmesh_secrets::Keyring>>,
    endpoints: std::sync::Arc<EndpointCache>,
    /// The dashboard statuses link to.
    dashboard: Option<url::Url>,
    /// Sends e-mail endpoints' messages; none without an SMTP server.
    mailer: Option<std::sync::Arc<email::Mailer>>,
}

impl Notifier {
    pub fn new(
        bus: Bus,
        pool: PgPool,
        settings: NotificationSettings,
        keyring: Option<std::sync::Arc<taskmesh_secrets::Keyring>>,
        egress: taskmesh_egress::Egress,
    ) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let egress = std::sync::Arc::new(egress);
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .user_agent(concat!("Taskmesh-Webhooks/", env!("CARGO_PKG_VERSION")));
        // A redirect is an answer (a failed delivery), never followed.
        let http = egress.client(builder, 0)?;
        let endpoints = EndpointCache::new(MAX_CACHED_TENANTS, CACHED_ENDPOINTS_TTL);
        let mailer = email::Mailer::new(&settings)?.map(std::sync::Arc::new);
        Ok(Self { bus, pool, settings, http, egress, keyring, endpoints, dashboard: None, mailer })
    }

    /// Commit statuses link to their run's page in the dashboard at `url` (`…/ui/`).
    pub fn with_dashboard(mut self, url: Option<url::Url>) -> Self {
        self.dashboard = url;
        self
    }

    /// Runs the fan-out and the deliveries until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stopped = shutdown.clone().cancelled_owned();
        let endpoints = self.endpoints.clone();
        taskmesh_store::follow_invalidations(&self.pool, taskmesh_store::WEBHOOK_ENDPOINTS_CHANNEL, endpoints, stopped);
        tokio::try_join!(self.clone().fan_out(shutdown.clone()), self.deliver(shutdown))?;
        Ok(())
    }

    async fn fan_out(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ns = self.bus.namespace();
        let stream = ns.ended_stream();
        let config = PullConfig {
            filter_subject: ns.ended_all(),
            // Runs that ended before the notifier first ran wait in the queue: they are
            // notified too (at least once is the contract).
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        };
        // The scheduler in this process hands runs' ends over directly (the same payload,
        // handled the same way) rather than through the queue.
        let _taking = self.bus.take_locally(&stream, HANDED_OVER_AT_ONCE, {
            let me = self.clone();
            move |payload| {
                let me = me.clone();
                async move { me.fan_out_one(&payload).await.map_err(|e| e.to_string()) }
            }
        });
        let me = &self;
        taskmesh_bus::consume(&self.bus, &stream, FAN_OUT, config, 64, shutdown.cancelled(), |msg| async move {
            match me.fan_out_one(&msg.payload).await {
                Ok(()) => AckKind::Ack,
                Err(e) => {
                    tracing::warn!(error = %e, "fan-out failed; retrying");
                    AckKind::Nak(Some(Duration::from_secs(1)))
                }
            }
        })
        .await;
        Ok(())
    }

    /// Enqueues a delivery of a run's end (a notice from `{NS}_ENDED`, or handed over by the
    /// scheduler in this process) to each endpoint subscribed to it.
    async fn fan_out_one(&self, notice: &[u8]) -> anyhow::Result<()> {
        let env = &match taskmesh_events::Envelope::from_json(notice) {
            Ok(env) => env,
            Err(e) => {
                tracing::error!(error = %e, "undecodable notice of an ended run; dropping it");
                return Ok(());
            }
        };
        let (type_name, status, finished) = match &env.event {
            Event::RunSucceeded(f) => ("run.succeeded", "succeeded", f),
            Event::RunFailed(f) => ("run.failed", "failed", f),
            Event::RunCancelled(f) => ("run.cancelled", "cancelled", f),
            Event::RunTimedOut(f) => ("run.timed_out", "timed_out", f),
            _ => return Ok(()),
        };
        let endpoints = self.endpoints_of(&env.tenant).await?;
        let payload = serde_json::json!({
            "type": type_name,
            "timestamp": env.occurred_at,
            "data": {
                "tenant": env.tenant,
                "run_id": finished.run_id,
                "status": status,
                "failed_steps": finished.failed_steps,
            }
        });
        // A disabled endpoint is queued what it misses (given up unsent, listed) for a while.
        let listed_for = i64::try_from(self.settings.disabled_listed_secs).unwrap_or(i64::MAX);
        let told: Vec<Uuid> = endpoints
            .iter()
            .filter(|endpoint| {
                let types = &endpoint.event_types;
                let disabled_long = endpoint
                    .disabled_at
                    .is_some_and(|at| listed_for == 0 || (env.occurred_at - at).num_seconds() > listed_for);
                (types.is_empty() || types.iter().any(|t| t == type_name)) && !disabled_long
            })
            .map(|endpoint| endpoint.id)
            .collect();
        let payload = &payload;
        let enqueue = |endpoint_id: Uuid| async move {
            let delivery = Delivery {
                tenant: env.tenant.clone(),
                endpoint_id,
                message_id: env.id.to_string(),
                payload: payload.clone(),
            };
            let msg_id = format!("{}:{endpoint_id}", env.id);
            let subject = self.bus.namespace().delivery(&env.tenant);
            (endpoint_id, self.bus.enqueue(subject, &msg_id, &delivery, env.traceparent.as_deref()).await)
        };
        // The endpoints' deliveries are enqueued together, a bounded number at a time.
        let mut queued = futures::stream::iter(told).map(enqueue).buffer_unordered(ENQUEUED_AT_ONCE);
        while let Some((endpoint_id, result)) = queued.next().await {
            match result {
                Ok(_) => {}
                // Its endpoints' deliveries fill the tenant's share of the queue (one refusing
                // them for hours, say): this one is dropped, not every tenant's held up. (A
                // queue full in all is waited out: the end is retried from TM_ENDED.)
                Err(e @ taskmesh_bus::BusError::SubjectFull(_)) => tracing::error!(
                    error = %e, tenant = %env.tenant, endpoint = %endpoint_id, run = %finished.run_id,
                    "the tenant's share of the delivery queue is full; the webhook is dropped"
                ),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// A tenant's endpoints, disabled ones too (a run's end is queued for one all the same, for
    /// `disabled_listed_secs` after it was disabled, and given up unsent: listed among its failed
    /// deliveries, which can be sent again once it is enabled), from memory when their changes
    /// are being heard.
    async fn endpoints_of(&self, tenant: &str) -> sqlx::Result<std::sync::Arc<[Subscriber]>> {
        let ticket = match self.endpoints.get(tenant) {
            Ok(endpoints) => return Ok(endpoints),
            Err(ticket) => ticket,
        };
        let rows = sqlx::query_as::<_, Subscriber>(
            "SELECT id, event_types, disabled_at FROM webhook_endpoints WHERE tenant_id = $1 ORDER BY id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        let endpoints: std::sync::Arc<[Subscriber]> = rows.into();
        self.endpoints.keep(ticket, tenant, endpoints.clone());
        Ok(endpoints)
    }

    /// The delivery loop: each tenant's deliveries pulled on their own ([`tenants`]).
    async fn deliver(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tenants::run(self, shutdown).await
    }

    /// Attempts one delivery; says how to ack it.
    async fn deliver_one(&self, msg: &Message, shutdown: &CancellationToken) -> AckKind {
        let attempt = msg.info().map(|i| i.delivered.max(1) as usize).unwrap_or(1);
        let outgoing: Outgoing = match serde_json::from_slice(&msg.payload) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "undecodable delivery; dropping it");
                return AckKind::Term;
            }
        };
        let msg_id = msg.headers.as_ref().and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID)).map(|v| v.as_str());
        // A delivery also counts one when it is handed back unattempted (a notifier stopping,
        // or dying, while it waited for its turn): a few such are allowed for, so a delivery
        // is never dropped without its last attempt.
        if attempt > self.settings.retry_delays_secs.len() + 1 + UNATTEMPTED_DELIVERIES {
            // Its last attempt was made, and its ack lost (a notifier stopped mid-way, say).
            tracing::error!(attempts = attempt - 1, "delivery failed for good (its last attempt's outcome was lost)");
            let error = "its last attempt's outcome was lost (a notifier stopped during it)";
            return self.give_up(&outgoing, msg_id, attempt - 1, error, Attempted::default(), shutdown).await;
        }
        let span = match &outgoing {
            Outgoing::Webhook(d) => {
                tracing::info_span!("deliver", endpoint = %d.endpoint_id, message = %d.message_id, attempt)
            }
            Outgoing::Status(s) => {
                tracing::info_span!("commit_status", connection = %s.connection_id, run = %s.run_id, state = ?s.state, attempt)
            }
        };
        // `Ok(Some(seq))`: a commit status went through where the read side held the failure
        // recorded at `seq`.
        let mut sent_as = None;
        let attempted = async {
            match &outgoing {
                Outgoing::Webhook(d) => self.post(d).await.map(|()| None),
                Outgoing::Status(s) => self.post_status(s, &mut sent_as).await,
            }
        };
        // However it is sent (an SMTP server that stops answering mid-way, say), an attempt
        // that takes much longer than its requests may ends as a failed one.
        let limit = 3 * Duration::from_millis(self.settings.timeout_ms) + Duration::from_secs(10);
        let result = match tokio::time::timeout(limit, attempted.instrument(span.clone())).await {
            Ok(result) => result,
            Err(_) => Err(Outcome::Failed(format!("the attempt took over {limit:?}"))),
        };
        let known = Attempted { disabled: false, sent_as };
        // `None`: refused for good; else the least wait before a retry.
        let (reason, at_least) = match result {
            Ok(seen) => {
                match (&outgoing, seen) {
                    (Outgoing::Webhook(d), _) => self.took(d).instrument(span).await,
                    (Outgoing::Status(s), Some(seen)) => self.status_recovered(s, seen).instrument(span).await,
                    (Outgoing::Status(_), None) => {}
                }
                return AckKind::Ack;
            }
            Err(Outcome::Gone) => return AckKind::Term,
            // Never attempted: given up at once, as the attempts before this one.
            Err(Outcome::Disabled) => {
                span.in_scope(|| tracing::info!("the endpoint is disabled: listed as failed, not sent"));
                let known = Attempted { disabled: true, ..known };
                return self.give_up(&outgoing, msg_id, attempt - 1, DISABLED, known, shutdown).instrument(span).await;
            }
            Err(Outcome::Refused(reason)) => (reason, None),
            Err(Outcome::Failed(reason)) => (reason, Some(Duration::ZERO)),
            // A throttled endpoint's own wait, when longer than the schedule's.
            Err(Outcome::Later(reason, wait)) => (reason, Some(wait)),
        };
        // A failed attempt is retried after the schedule's next delay, or given up when it was
        // the last.
        let next = self.settings.retry_delays_secs.get(attempt - 1).map(|&d| Duration::from_secs(d));
        match (at_least, next) {
            (Some(at_least), Some(delay)) => {
                let delay = delay.max(at_least);
                span.in_scope(
                    || tracing::info!(%reason, retry_in_secs = delay.as_secs(), "delivery failed; will retry"),
                );
                return AckKind::Nak(Some(delay));
            }
            (None, _) => span.in_scope(|| tracing::error!(%reason, "refused for good: not retried")),
            (Some(_), None) => {
                span.in_scope(|| tracing::error!(%reason, attempts = attempt, "delivery failed for good (dead letter)"))
            }
        }
        self.give_up(&outgoing, msg_id, attempt, &reason, known, shutdown).instrument(span).await
    }

    /// A delivery given up: a webhook's is recorded as failed on its endpoint
    /// (`WebhookDeliveryFailed`, which the API lists and can send again), a commit status's on
    /// its connection ([`Self::record_status_failure`]), then terminated. Recording is tried
    /// again here (its ack deadline renewed meanwhile) for up to [`RECORD_FOR`] (or until
    /// shutdown); only then is the delivery handed back, to be attempted once more. `known`:
    /// what its last attempt learnt (none when that attempt's outcome was lost).
    async fn give_up(
        &self,
        outgoing: &Outgoing,
        msg_id: Option<&str>,
        attempts: usize,
        error: &str,
        known: Attempted,
        shutdown: &CancellationToken,
    ) -> AckKind {
        let disabled = match outgoing {
            Outgoing::Webhook(d) => known.disabled || self.disabled(d).await,
            Outgoing::Status(_) => false,
        };
        // The state a status was sent as (a pending whose run had ended went as the outcome):
        // as its attempt sent it, else as it would have.
        let sent_as = match (outgoing, known.sent_as) {
            (Outgoing::Status(s), None) if s.state == CommitState::Pending => self.run_end(s).await.ok().flatten(),
            (_, sent_as) => sent_as,
        };
        let started = tokio::time::Instant::now();
        let mut wait = Duration::from_millis(250);
        loop {
            let recorded = match outgoing {
                Outgoing::Webhook(d) => self.record_failure(d, msg_id, attempts, error, disabled).await,
                Outgoing::Status(s) => self.record_status_failure(s, sent_as.unwrap_or(s.state), msg_id, error).await,
            };
            match recorded {
                Ok(()) => return AckKind::Term,
                Err(e) if started.elapsed() + wait < RECORD_FOR && !shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, "could not record the failed delivery; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not record the failed delivery; it goes back to the queue");
                    return AckKind::Nak(Some(Duration::from_secs(5)));
                }
            }
        }
    }

    /// Whether a delivery's endpoint is disabled already, as far as the read side knows (a second
    /// disabling is harmless); true also when that cannot be read, so that its failure is
    /// recorded all the same, deciding nothing.
    async fn disabled(&self, d: &Delivery) -> bool {
        match sqlx::query_scalar(
            "SELECT disabled_at IS NOT NULL FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2",
        )
        .bind(d.endpoint_id)
        .bind(&d.tenant)
        .fetch_optional(&self.pool)
        .await
        {
            Ok(disabled) => disabled.unwrap_or(true),
            Err(e) => {
                tracing::warn!(error = %e, "reading the endpoint failed; its failure is recorded without deciding to disable it");
                true
            }
        }
    }

    /// Appends `WebhookDeliveryFailed` to the endpoint's events, unless it was deleted, with
    /// `WebhookEndpointDisabled` in the same commit when every delivery to it has now failed
    /// for `disable_after_secs`. Its message id is the delivery's own, so a delivery given up
    /// twice (its notifier died between the two) is recorded once; the read side keeps one row
    /// per delivery anyway.
    /// `disabled`: the endpoint is disabled already, or that could not be read ([`Self::disabled`]).
    async fn record_failure(
        &self,
        d: &Delivery,
        msg_id: Option<&str>,
        attempts: usize,
        error: &str,
        disabled: bool,
    ) -> Result<(), taskmesh_bus::BusError> {
        let subject = self.bus.namespace().webhook_endpoint(&d.tenant, d.endpoint_id);
        let id = match msg_id {
            Some(id) => format!("failed:{id}"),
            None => format!("failed:{}:{}", d.message_id, d.endpoint_id),
        };
        let (subject, id) = (&subject, &id);
        self.bus
            .append_after_last(subject, 5, |last| async move {
                let last = match last {
                    Some(last) if !last.envelope.event.is_deletion() => last,
                    Some(_) => return Ok(AfterLast::Done(())),
                    None => {
                        // Its events were removed from the log (by hand, or by an older version's
                        // retention; retention now keeps an endpoint's while it exists).
                        tracing::warn!(endpoint = %d.endpoint_id, "the endpoint has no events left; its failed delivery is not recorded");
                        return Ok(AfterLast::Done(()));
                    }
                };
                let now = chrono::Utc::now();
                let since = taskmesh_events::failing_since(&last.envelope).unwrap_or(now);
                let meta = taskmesh_events::EventMeta::new(&d.tenant);
                let mut events = vec![meta.envelope(
                    subject.clone(),
                    Event::WebhookDeliveryFailed(taskmesh_events::WebhookDeliveryFailed::new(
                        d.endpoint_id,
                        d.message_id.clone(),
                        u32::try_from(attempts).unwrap_or(u32::MAX),
                        error.to_string(),
                        d.payload.clone(),
                        since,
                    )),
                )];
                let after = self.settings.disable_after_secs;
                if after > 0 && !disabled && (now - since).num_seconds() >= i64::try_from(after).unwrap_or(i64::MAX) {
                    let mut reason = format!("every delivery since {} failed (the last: {error})", since.to_rfc3339());
                    taskmesh_events::truncate_at_char(&mut reason, taskmesh_events::WebhookDeliveryFailed::MAX_ERROR);
                    tracing::warn!(endpoint = %d.endpoint_id, %reason, "disabling the webhook endpoint");
                    events.push(meta.envelope(
                        subject.clone(),
                        Event::WebhookEndpointDisabled(taskmesh_events::WebhookEndpointDisabled {
                            endpoint_id: d.endpoint_id,
                            reason,
                        }),
                    ));
                }
                Ok::<_, taskmesh_bus::BusError>(AfterLast::Append { events, msg_id: Some(id.clone()) })
            })
            .await?;
        Ok(())
    }

    /// `d`'s endpoint took it: were failures on record for it, they no longer count toward
    /// disabling it (`WebhookEndpointRecovered`). Its log's last event is read on every
    /// delivery taken (one direct read: remembered instead, a success this notifier skipped
    /// could miss a failure another recorded meanwhile); best effort, as a miss is made up on
    /// the endpoint's next delivery taken.
    async fn took(&self, d: &Delivery) {
        let subject = self.bus.namespace().webhook_endpoint(&d.tenant, d.endpoint_id);
        let recovered = taskmesh_events::WebhookEndpointRecovered { endpoint_id: d.endpoint_id };
        let failing = |last: &taskmesh_bus::Stored| taskmesh_events::failing_since(&last.envelope).is_some();
        self.clear_failure(&d.tenant, &subject, failing, Event::WebhookEndpointRecovered(recovered)).await;
    }

    /// Appends `recovered` to `subject` (`tenant`'s) if the subject's last event says it is
    /// `failing`; best effort (a failure to is logged), as a miss is made up on the next success.
    async fn clear_failure(
        &self,
        tenant: &str,
        subject: &str,
        failing: impl Fn(&taskmesh_bus::Stored) -> bool,
        recovered: Event,
    ) {
        let (recovered, failing) = (&recovered, &failing);
        let cleared = self
            .bus
            .append_after_last(subject, 5, |last| async move {
                if !last.is_some_and(|last| failing(&last)) {
                    return Ok(AfterLast::Done(()));
                }
                let events = vec![taskmesh_events::EventMeta::new(tenant).envelope(subject, recovered.clone())];
                Ok::<_, taskmesh_bus::BusError>(AfterLast::Append { events, msg_id: None })
            })
            .await;
        if let Err(e) = cleared {
            tracing::warn!(error = %e, subject, "recording that failures are over failed");
        }
    }

    /// A commit status given up: recorded as the connection's last failed one
    /// (`CommitStatusFailed`, on its status subject), which `GET /v1/repo-connections` shows,
    /// with the state it was sent as (a pending one whose run had ended goes as the outcome).
    /// Its message id is the queued status's own, so one given up twice (its notifier died
    /// between the two) is recorded once.
    async fn record_status_failure(
        &self,
        s: &CommitStatus,
        state: CommitState,
        msg_id: Option<&str>,
        error: &str,
    ) -> Result<(), taskmesh_bus::BusError> {
        let subject = self.bus.namespace().repo_statuses(&s.tenant, s.connection_id);
        let failed = Event::CommitStatusFailed(taskmesh_events::CommitStatusFailed::new(
            s.connection_id,
            s.run_id,
            s.commit.clone(),
            state,
            error.to_string(),
        ));
        let id = match msg_id {
            Some(id) => format!("failed:{id}"),
            None => format!("failed:{}:{}:{state:?}", s.connection_id, s.run_id),
        };
        let envelope = taskmesh_events::EventMeta::new(&s.tenant).envelope(subject, failed);
        self.bus.append_with_id(None, &envelope, &id).await.map(|_| ())
    }

    /// A commit status went through for a connection whose failed one at `seen` the read side
    /// held when it was sent: cleared (`CommitStatusRecovered`), if the log's last event on its
    /// status subject is that failure or an earlier one (not one recorded since, even of this
    /// status's run, nor another notifier's clearing): by the log's sequences, not clocks. A
    /// failure left so shows until the next status goes through. Best effort, as an endpoint's
    /// recovery ([`Self::took`]).
    async fn status_recovered(&self, s: &CommitStatus, seen: u64) {
        let subject = self.bus.namespace().repo_statuses(&s.tenant, s.connection_id);
        let recovered = taskmesh_events::CommitStatusRecovered { connection_id: s.connection_id };
        let failing = |last: &taskmesh_bus::Stored| {
            matches!(last.envelope.event, Event::CommitStatusFailed(_)) && last.seq <= seen
        };
        self.clear_failure(&s.tenant, &subject, failing, Event::CommitStatusRecovered(recovered)).await;
    }

    /// Opens a sealed secret (an endpoint's signing secret, a connection's status token),
    /// stored as JSON, sealed for `aad`.
    fn open_secret(&self, aad: &str, sealed: &str) -> Result<String, String> {
        let keyring = self.keyring.as_ref().ok_or("no secrets key is configured")?;
        let sealed: taskmesh_secrets::Sealed =
            serde_json::from_str(sealed).map_err(|e| format!("stored secret: {e}"))?;
        let plain = keyring.open(aad, &sealed).map_err(|e| e.to_string())?;
        String::from_utf8(plain).map_err(|_| "the stored secret is not UTF-8".to_string())
    }

    /// How the run ended, by its last event in the log (none: not ended).
    /// Either of two readings says so: the log's last event on the run (the freshest, but a
    /// cancellation asked for after the end can follow it) and the read model's status (which
    /// may lag, and may still be an earlier run's of the same id: see [`projected_end`]).
    async fn run_end(&self, s: &CommitStatus) -> Result<Option<CommitState>, Outcome> {
        let subject = self.bus.namespace().run(&RunKey { tenant: s.tenant.clone(), run_id: s.run_id });
        let last = self.bus.last(&subject).await.map_err(|e| Outcome::Failed(format!("reading the run: {e}")))?;
        let logged = last.and_then(|l| l.envelope.event.run_end()).map(|(state, _)| state);
        if logged.is_some() {
            return Ok(logged);
        }
        let projected: Option<(String, i64)> =
            sqlx::query_as("SELECT status, last_seq FROM runs WHERE tenant_id = $1 AND id = $2")
                .bind(&s.tenant)
                .bind(s.run_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| Outcome::Failed(format!("reading the run: {e}")))?;
        let Some((status, last_seq)) = projected.filter(|(status, _)| ended_as(status).is_some()) else {
            return Ok(None);
        };
        let first = self
            .bus
            .first_seq(&subject)
            .await
            .map_err(|e| Outcome::Failed(format!("reading the run's first event: {e}")))?;
        Ok(projected_end(&status, last_seq, first))
    }

    /// Reports a run's state on its commit through the forge's API. A `pending` never stays
    /// over the outcome: none is sent for a run that has ended (its outcome is sent instead),
    /// and should the run end while one is sent (its outcome perhaps sent before, by another
    /// replica), the outcome is sent again after it.
    /// `Ok(Some(seq))`: sent, and the connection had the failed status recorded at `seq` on
    /// record (the latest of those its sends read).
    /// `sent_as`: the state last sent (for a failure's record: a pending whose run had ended
    /// goes as the outcome).
    async fn post_status(&self, s: &CommitStatus, sent_as: &mut Option<CommitState>) -> Result<Option<u64>, Outcome> {
        if s.state != CommitState::Pending {
            *sent_as = Some(s.state);
            return self.send_status(s, s.state).await;
        }
        if let Some(end) = self.run_end(s).await? {
            // Perhaps sent before, its pending landing after it (a retry): sent again.
            *sent_as = Some(end);
            return self.send_status(s, end).await;
        }
        *sent_as = Some(CommitState::Pending);
        let failing = self.send_status(s, CommitState::Pending).await?;
        match self.run_end(s).await? {
            Some(end) => {
                *sent_as = Some(end);
                Ok(self.send_status(s, end).await?.max(failing))
            }
            None => Ok(failing),
        }
    }

    /// Sends `state` for the run of `s` to the forge's API; `Ok(Some(seq))` when the connection
    /// had a failed status on record, the one recorded at `seq` (as the read side says).
    async fn send_status(&self, s: &CommitStatus, state: CommitState) -> Result<Option<u64>, Outcome> {
        let failed = |what: &str, e: sqlx::Error| Outcome::Failed(format!("reading {what}: {e}"));
        let row = sqlx::query(
            "SELECT repository, status_token, api_url, (status_failure->>'seq')::bigint AS failing FROM repo_connections
             WHERE id = $1 AND tenant_id = $2",
        )
        .bind(s.connection_id)
        .bind(&s.tenant)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| failed("the connection", e))?;
        let Some(row) = row else {
            return Err(self.missing(&self.bus.namespace().repo_connection(&s.tenant, s.connection_id)).await);
        };
        let Some(sealed) = row.get::<Option<String>, _>("status_token") else { return Ok(None) };
        let token =
            self.open_secret(&taskmesh_secrets::repo_status_token_aad(&s.tenant), &sealed).map_err(Outcome::Failed)?;
        let repository: String = row.get("repository");
        let base = row
            .get::<Option<String>, _>("api_url")
            .or_else(|| s.forge.default_api_url().map(String::from))
            .ok_or_else(|| Outcome::Refused("the connection names no API URL".into()))?;
        if s.commit.is_empty() || s.commit.len() > 64 || !s.commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Outcome::Refused(format!("'{}' is not a commit id", s.commit)));
        }
        let (commit, context) = (&s.commit, s.context());
        let description = match state {
            CommitState::Pending => "running",
            CommitState::Success => "succeeded",
            CommitState::Failure => "failed",
            CommitState::Cancelled => "cancelled",
        };
        let mut body = match s.forge {
            Forge::Github | Forge::Gitea => {
                serde_json::json!({"state": github_state(state), "context": context, "description": description})
            }
            Forge::Gitlab => {
                serde_json::json!({"state": gitlab_state(state), "name": context, "description": description})
            }
        };
        if let Some(dashboard) = &self.dashboard {
            body["target_url"] = run_page(dashboard, &s.run_id.to_string()).to_string().into();
        }
        let parsed = s.forge.repo_api_url(&base, &repository, &["statuses", commit]).map_err(Outcome::Refused)?;
        let url = parsed.to_string();
        let auth = s.forge.api_auth(&token);
        // Denied like a webhook delivery: retried, as the rules may change.
        self.egress.check_url(&parsed).map_err(|d| Outcome::Failed(format!("POST {url}: {d}")))?;
        let mut res = self
            .http
            .post(parsed)
            .header(auth.0, auth.1)
            .header("accept", "application/json")
            .json(&body)
            .send()
            .await
            .map_err(|e| Outcome::Failed(format!("POST {url}: {}", taskmesh_egress::error_chain(&e))))?;
        let status = res.status();
        let failing = row.get::<Option<i64>, _>("failing").and_then(|seq| u64::try_from(seq).ok());
        // Rate limited: GitHub answers 403 or 429 so, by its headers or, for a secondary limit,
        // only in its message.
        if let Some(wait) = taskmesh_egress::rate_limited(&mut res).await {
            return Err(Outcome::Later(format!("POST {url} answered {status}, asking to wait {wait:?}"), wait));
        }
        if status.as_u16() == 400 && s.forge == Forge::Gitlab {
            let start = taskmesh_egress::body_start(&mut res, 4096).await;
            if gitlab_already_shows(state, &start) {
                return Ok(failing);
            }
        }
        match status.as_u16() {
            200..=299 => Ok(failing),
            // The token, the repository or the commit is wrong: asking again changes nothing.
            400..=499 if !matches!(status.as_u16(), 408 | 429) => {
                Err(Outcome::Refused(format!("POST {url} answered {status}")))
            }
            _ => Err(Outcome::Failed(format!("POST {url} answered {status}"))),
        }
    }

    /// What a delivery's endpoint (or connection) that the read side does not show is, by the
    /// last event of its `subject` in the log: gone when it was deleted, or has no events left;
    /// else the read side is behind the log (a rebuild under way, or batches Postgres lost in
    /// a crash and the projector replays), and the delivery is tried again later rather than
    /// dropped.
    async fn missing(&self, subject: &str) -> Outcome {
        match self.bus.last(subject).await {
            Ok(None) => Outcome::Gone,
            Ok(Some(last)) if last.envelope.event.is_deletion() => Outcome::Gone,
            Ok(Some(_)) => Outcome::Failed("the read side does not show it yet (a rebuild under way?)".into()),
            Err(e) => Outcome::Failed(format!("reading its log: {e}")),
        }
    }

    async fn post(&self, d: &Delivery) -> Result<(), Outcome> {
        let row = sqlx::query(
            "SELECT url, secret, format, disabled_at IS NOT NULL AS disabled,
                    CASE WHEN previous_until > now() THEN previous_secret END AS previous_secret
             FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2",
        )
        .bind(d.endpoint_id)
        .bind(&d.tenant)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| Outcome::Failed(format!("reading the endpoint: {e}")))?;
        let Some(row) = row else {
            return Err(self.missing(&self.bus.namespace().webhook_endpoint(&d.tenant, d.endpoint_id)).await);
        };
        if row.get::<bool, _>("disabled") {
            return Err(Outcome::Disabled);
        }
        let (url, sealed, format): (String, String, String) = (row.get("url"), row.get("secret"), row.get("format"));
        if format == "email" {
            let mailer = self.mailer.as_ref().ok_or_else(|| {
                Outcome::Refused("an e-mail endpoint, but no SMTP server is configured (notification.smtp_url)".into())
            })?;
            let to = taskmesh_events::catalog::mailto_recipients(&url).map_err(Outcome::Refused)?;
            // Created before the domains were narrowed, perhaps: the others still get it.
            let (to, barred): (Vec<String>, Vec<String>) = to.into_iter().partition(|a| self.settings.email_allowed(a));
            if !barred.is_empty() {
                let barred = barred.join(", ");
                if to.is_empty() {
                    return Err(Outcome::Refused(format!("{barred}: not in notification.email_domains")));
                }
                tracing::warn!(%barred, "not mailed: not in notification.email_domains");
            }
            let summary = self.summary(d).await?;
            let (subject, body) = email::text(&summary, self.dashboard.as_ref());
            return mailer.send(&to, &subject, body, &format!("{}.{}", d.message_id, d.endpoint_id)).await;
        }
        // After a rotation, the secret replaced signs too for a while (see
        // `WebhookEndpointSecretRotated`): the header lists both signatures.
        // One that cannot be opened (its key dropped from the keyring, say) is left out rather
        // than fail the delivery.
        let aad = taskmesh_secrets::endpoint_secret_aad(&d.tenant);
        let mut secrets = vec![self.open_secret(&aad, &sealed).map_err(Outcome::Failed)?];
        if let Some(previous) = row.get::<Option<String>, _>("previous_secret") {
            match self.open_secret(&aad, &previous) {
                Ok(secret) => secrets.push(secret),
                Err(e) => {
                    tracing::warn!(endpoint = %d.endpoint_id, error = %e, "the secret a rotation replaced cannot be opened: signing with the new one alone")
                }
            }
        }
        let body = match format.as_str() {
            "slack" => self.slack_message(d).await?,
            _ => serde_json::to_vec(&d.payload).map_err(|e| Outcome::Failed(e.to_string()))?,
        };
        let timestamp = Utc::now().timestamp();
        let signature = secrets
            .iter()
            .map(|secret| sign(secret, &d.message_id, timestamp, &body))
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| Outcome::Failed(e.to_string()))?
            .join(" ");
        let parsed = reqwest::Url::parse(&url).map_err(|e| Outcome::Failed(format!("'{url}' is not a URL: {e}")))?;
        self.egress.check_url(&parsed).map_err(|d| Outcome::Failed(format!("POST {url}: {d}")))?;
        let res = self
            .http
            .post(parsed)
            .header("content-type", "application/json")
            .header("webhook-id", &d.message_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| Outcome::Failed(format!("POST {url}: {}", taskmesh_egress::error_chain(&e))))?;
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        let reason = format!("POST {url} answered {status}");
        if let Some(wait) = taskmesh_egress::rate_limit_wait(status, res.headers()) {
            return Err(Outcome::Later(reason, wait));
        }
        match status.as_u16() {
            // Slack says so for a bad message, a revoked webhook, an archived or deleted
            // channel: asking again for hours changes nothing. (A standard endpoint's 4xx is
            // retried, as Standard Webhooks senders do: it may be a deploy under way.)
            400..=499 if format == "slack" && !matches!(status.as_u16(), 408 | 429) => Err(Outcome::Refused(reason)),
            _ => Err(Outcome::Failed(reason)),
        }
    }
}

/// Deliveries of one message that may have been no attempt (see `deliver_one`).
const UNATTEMPTED_DELIVERIES: usize = 3;

/// What a message about a run's end says (Slack's, an e-mail's).
pub(crate) struct Summary {
    /// The run's workflow, from the run's first event in the log.
    pub workflow: Option<String>,
    pub run_id: String,
    /// `succeeded`, `failed`, `cancelled`, `timed_out`.
    pub status: String,
    pub failed_steps: Vec<String>,
}

impl Notifier {
    /// What a delivery's run's end says: its workflow (from the run's first event in the log,
    /// not the read side, which may not have it yet), how it ended, its failed steps.
    async fn summary(&self, d: &Delivery) -> Result<Summary, Outcome> {
        let data = &d.payload["data"];
        let run_id = data["run_id"].as_str().unwrap_or_default();
        let workflow = match run_id.parse::<Uuid>() {
            Ok(id) => {
                let subject =
                    self.bus.namespace().run(&taskmesh_events::RunKey { tenant: d.tenant.clone(), run_id: id });
                match self.bus.first(&subject).await.map_err(|e| Outcome::Failed(format!("reading the run: {e}")))? {
                    Some(first) => match first.envelope.event {
                        Event::RunSubmitted(s) => Some(s.workflow.name),
                        _ => None,
                    },
                    None => None,
                }
            }
            Err(_) => None,
        };
        let failed_steps = data["failed_steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .map(String::from)
            .collect();
        Ok(Summary {
            workflow,
            run_id: run_id.to_string(),
            status: data["status"].as_str().unwrap_or("ended").to_string(),
            failed_steps,
        })
    }

    /// A Slack incoming webhook's message for a run's end, with a link to it in the dashboard
    /// when the notifier knows where that is.
    async fn slack_message(&self, d: &Delivery) -> Result<Vec<u8>, Outcome> {
        let s = self.summary(d).await?;
        let failed: Vec<&str> = s.failed_steps.iter().map(String::as_str).collect();
        let text = slack_text(s.workflow.as_deref(), &s.run_id, &s.status, &failed, self.dashboard.as_ref());
        serde_json::to_vec(&serde_json::json!({"text": text})).map_err(|e| Outcome::Failed(e.to_string()))
    }
}

/// The page of run `run_id` in the dashboard at `dashboard` (which routes by the fragment).
fn run_page(dashboard: &url::Url, run_id: &str) -> url::Url {
    let mut page = dashboard.clone();
    page.set_fragment(Some(&format!("/runs/{run_id}")));
    page
}

/// `text` with a space for each control character: a newline in a name would start a line of
/// its own (in a Slack message, an e-mail's subject).
fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Escapes what Slack's message format gives a meaning (`&`, `<`, `>`), on one line.
fn slack_escape(text: &str) -> String {
    one_line(text).replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The text of a Slack message for a run's end.
fn slack_text(
    workflow: Option<&str>,
    run_id: &str,
    status: &str,
    failed: &[&str],
    dashboard: Option<&url::Url>,
) -> String {
    let mark = match status {
        "succeeded" => ":white_check_mark:",
        "failed" => ":x:",
        "timed_out" => ":hourglass:",
        _ => ":no_entry_sign:",
    };
    let name = slack_escape(workflow.unwrap_or("A run"));
    let name = match dashboard {
        // A `|` would end the link's address early.
        Some(dashboard) => {
            format!("<{}|{name}>", slack_escape(run_page(dashboard, run_id).as_str()).replace('|', "%7C"))
        }
        None => format!("*{name}*"),
    };
    let mut text = format!("{mark} {name} {} (run `{run_id}`)", status.replace('_', " "));
    if !failed.is_empty() {
        let steps: Vec<String> = failed.iter().map(|s| format!("`{}`", slack_escape(s))).collect();
        text.push_str(&format!("\nFailed steps: {}", steps.join(", ")));
    }
    text
}

pub(crate) enum Outcome {
    /// The endpoint (or connection) no longer exists: drop the delivery.
    Gone,
    /// The endpoint is disabled: give the delivery up unsent (its failed deliveries list it,
    /// with the error [`DISABLED`], to be sent again on request once it is enabled).
    Disabled,
    /// Retrying changes nothing: give it up (recorded as failed: a webhook's on its endpoint, a
    /// commit status's on its connection).
    Refused(String),
    /// Retry it later.
    Failed(String),
    /// Retry it, but not before this long (the endpoint's `Retry-After`).
    Later(String, Duration),
}

/// A state as GitHub and Gitea name it.
fn github_state(s: CommitState) -> &'static str {
    match s {
        CommitState::Pending => "pending",
        CommitState::Success => "success",
        CommitState::Failure => "failure",
        CommitState::Cancelled => "error",
    }
}

/// A state as GitLab names it.
fn gitlab_state(s: CommitState) -> &'static str {
    match s {
        CommitState::Pending => "running",
        CommitState::Success => "success",
        CommitState::Failure => "failed",
        CommitState::Cancelled => "canceled",
    }
}

/// Whether GitLab's `400` answer (`said`) refuses a status only because the commit already shows
/// `state` ("Cannot transition status via :run from :running"): a status sent again, or a
/// retry of one that went through, is then sent.
fn gitlab_already_shows(state: CommitState, said: &[u8]) -> bool {
    let said = String::from_utf8_lossy(said).to_ascii_lowercase();
    said.contains("cannot transition status") && said.contains(&format!("from :{}", gitlab_state(state)))
}

/// The commit state of a run's status in the read side, `succeeded`, `failed`, `timed_out` or
/// `cancelled`; none for a run not ended.
fn ended_as(status: &str) -> Option<CommitState> {
    match status {
        "succeeded" => Some(CommitState::Success),
        "failed" | "timed_out" => Some(CommitState::Failure),
        "cancelled" => Some(CommitState::Cancelled),
        _ => None,
    }
}

/// How the run ended by its row in the read side (`status`, moved on to `last_seq` by the
/// run's events), when the log's first event on the run is at `first` (0: none). A row older
/// than that first event is an earlier run of the same id, whose events aged out before its
/// idempotency key submitted it again: not this run's end.
fn projected_end(status: &str, last_seq: i64, first: u64) -> Option<CommitState> {
    ended_as(status).filter(|_| u64::try_from(last_seq).is_ok_and(|seq| seq >= first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_projected_end_counts_only_for_a_row_of_the_run_the_log_holds() {
        // The run ended at 12; a cancellation asked for after it is the log's last event.
        assert_eq!(projected_end("succeeded", 12, 9), Some(CommitState::Success));
        assert_eq!(projected_end("timed_out", 12, 9), Some(CommitState::Failure));
        // Its events gone from the log (none left on the subject): the row is all there is.
        assert_eq!(projected_end("cancelled", 12, 0), Some(CommitState::Cancelled));
        // Submitted again at 40 after its events aged out: the row is the earlier run's.
        assert_eq!(projected_end("failed", 12, 40), None);
        assert_eq!(projected_end("running", 50, 40), None, "not ended");
    }

    #[test]
    fn gitlab_refusing_the_state_a_commit_already_shows_is_no_failure() {
        let said = |from: &str| format!(r#"{{"message":"Cannot transition status via :run from :{from}"}}"#);
        assert!(gitlab_already_shows(CommitState::Pending, said("running").as_bytes()));
        assert!(!gitlab_already_shows(CommitState::Pending, said("success").as_bytes()), "another state: refused");
        let success = br#"{"message":"Cannot transition status via :success from :success"}"#;
        assert!(gitlab_already_shows(CommitState::Success, success));
        assert!(!gitlab_already_shows(CommitState::Failure, success));
        assert!(!gitlab_already_shows(CommitState::Success, br#"{"message":"400 Bad request - state is missing"}"#));
    }

    #[test]
    fn a_slack_message_says_how_the_run_ended_and_links_to_it() {
        let dashboard = url::Url::parse("https://tm.example/ui/").unwrap();
        let id = "01a2-run";
        assert_eq!(
            slack_text(Some("deploy <prod> & more"), id, "failed", &["test", "lint"], Some(&dashboard)),
            ":x: <https://tm.example/ui/#/runs/01a2-run|deploy &lt;prod&gt; &amp; more> failed (run `01a2-run`)\n\
             Failed steps: `test`, `lint`"
        );
        assert_eq!(
            slack_text(Some("ci"), id, "succeeded", &[], None),
            ":white_check_mark: *ci* succeeded (run `01a2-run`)"
        );
        assert_eq!(slack_text(None, id, "timed_out", &[], None), ":hourglass: *A run* timed out (run `01a2-run`)");
        let piped = url::Url::parse("https://tm.example/a|b/").unwrap();
        assert_eq!(
            slack_text(Some("two\nlines"), id, "cancelled", &[], Some(&piped)),
            ":no_entry_sign: <https://tm.example/a%7Cb/#/runs/01a2-run|two lines> cancelled (run `01a2-run`)",
            "a name stays on its line, and a | cannot end the link early"
        );
    }

    #[test]
    fn reproduces_the_standard_webhooks_test_vector() {
        // Published in the Standard Webhooks specification's reference libraries.
        let sig = sign(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }
}
