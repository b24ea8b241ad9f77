//! Notification: tells subscribers when runs end, by outbound webhooks signed per the
//! Standard Webhooks specification.
//!
//! Two loops. The fan-out reads the runs that ended from the `{NS}_ENDED` work queue (durable
//! consumer `fan-out`; the scheduler puts each run's terminal event there as it consumes it,
//! so this service reads one message per run, not every run event) and enqueues one delivery
//! per subscribed endpoint on the `{NS}_DELIVERIES` work queue, deduplicated by
//! `{event id}:{endpoint id}`. The delivery loop (durable consumer
//! `deliveries`) POSTs each one with `webhook-id` (the event id, stable across retries so the
//! receiver can deduplicate), `webhook-timestamp` and `webhook-signature`; a failure is retried
//! after the configured delays, then dropped with an error log (dead letter).
//!
//! # Layout
//! Everything is in this file: [`Notifier`], [`Delivery`], [`sign`].

use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::{AckKind, Message};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use taskmesh_bus::Bus;
use taskmesh_config::NotificationSettings;
use taskmesh_events::Event;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// The consumer of runs that ended.
pub const FAN_OUT: &str = "fan-out";
/// The delivery consumer.
pub const DELIVERIES: &str = "deliveries";

/// One notification to one endpoint: a message on the deliveries queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub tenant: String,
    pub endpoint_id: Uuid,
    /// `webhook-id`: the event's id.
    pub message_id: String,
    /// The exact JSON body to send.
    pub payload: serde_json::Value,
}

/// Signs `body` per Standard Webhooks: `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`
/// keyed with the base64 part of the `whsec_` secret.
pub fn sign(secret: &str, message_id: &str, timestamp: i64, body: &[u8]) -> anyhow::Result<String> {
    let webhook = standardwebhooks::Webhook::new(secret).map_err(|e| anyhow::anyhow!("bad signing secret: {e:?}"))?;
    webhook.sign(message_id, timestamp, body).map_err(|e| anyhow::anyhow!("signing: {e:?}"))
}

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
        Ok(Self { bus, pool, settings, http, egress, keyring })
    }

    /// Runs the fan-out and the deliveries until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tokio::try_join!(self.clone().fan_out(shutdown.clone()), self.deliver(shutdown))?;
        Ok(())
    }

    async fn fan_out(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ns = self.bus.namespace();
        let config = PullConfig {
            filter_subject: ns.ended_all(),
            // Runs that ended before the notifier first ran wait in the queue: they are
            // notified too (at least once is the contract).
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        };
        let me = &self;
        taskmesh_bus::consume(
            &self.bus,
            &ns.ended_stream(),
            FAN_OUT,
            config,
            64,
            shutdown.cancelled(),
            |msg| async move {
                match me.fan_out_one(&msg).await {
                    Ok(()) => AckKind::Ack,
                    Err(e) => {
                        tracing::warn!(error = %e, "fan-out failed; retrying");
                        AckKind::Nak(Some(Duration::from_secs(1)))
                    }
                }
            },
        )
        .await;
        Ok(())
    }

    async fn fan_out_one(&self, msg: &Message) -> anyhow::Result<()> {
        let env = &match taskmesh_events::Envelope::from_json(&msg.payload) {
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
        let endpoints = sqlx::query("SELECT id, event_types FROM webhook_endpoints WHERE tenant_id = $1")
            .bind(&env.tenant)
            .fetch_all(&self.pool)
            .await?;
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
        for row in endpoints {
            let endpoint_id: Uuid = row.get("id");
            let types: Vec<String> = row.get("event_types");
            if !types.is_empty() && !types.iter().any(|t| t == type_name) {
                continue;
            }
            let delivery = Delivery {
                tenant: env.tenant.clone(),
                endpoint_id,
                message_id: env.id.to_string(),
                payload: payload.clone(),
            };
            let msg_id = format!("{}:{endpoint_id}", env.id);
            self.bus
                .enqueue(self.bus.namespace().delivery(&env.tenant), &msg_id, &delivery, env.traceparent.as_deref())
                .await?;
        }
        Ok(())
    }

    async fn deliver(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ns = self.bus.namespace();
        let config = PullConfig {
            filter_subject: ns.deliveries_all(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(self.settings.timeout_ms) + Duration::from_secs(10),
            max_deliver: self.settings.retry_delays_secs.len() as i64 + 1,
            ..Default::default()
        };
        let me = &self;
        // One delivery pulled at a time: a prefetched one would sit out its ack wait behind a
        // slow endpoint and be redelivered while still held.
        taskmesh_bus::consume(
            &self.bus,
            &ns.deliveries_stream(),
            DELIVERIES,
            config,
            1,
            shutdown.cancelled(),
            |msg| async move { me.deliver_one(&msg).await },
        )
        .await;
        Ok(())
    }

    /// Attempts one delivery; says how to ack it.
    async fn deliver_one(&self, msg: &Message) -> AckKind {
        let attempt = msg.info().map(|i| i.delivered.max(1) as usize).unwrap_or(1);
        let delivery: Delivery = match serde_json::from_slice(&msg.payload) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "undecodable delivery; dropping it");
                return AckKind::Term;
            }
        };
        let span =
            tracing::info_span!("deliver", endpoint = %delivery.endpoint_id, message = %delivery.message_id, attempt);
        let result = self.post(&delivery).instrument(span.clone()).await;
        let _guard = span.enter();
        match result {
            Ok(()) => AckKind::Ack,
            Err(Outcome::Gone) => AckKind::Term,
            Err(Outcome::Failed(reason)) => match self.settings.retry_delays_secs.get(attempt - 1) {
                Some(&delay) => {
                    tracing::info!(%reason, retry_in_secs = delay, "delivery failed; will retry");
                    AckKind::Nak(Some(Duration::from_secs(delay)))
                }
                None => {
                    tracing::error!(%reason, attempts = attempt, "delivery failed for good (dead letter)");
                    AckKind::Term
                }
            },
        }
    }

    /// Opens an endpoint's sealed signing secret.
    fn open_secret(&self, tenant: &str, sealed: &str) -> Result<String, String> {
        let keyring = self.keyring.as_ref().ok_or("no secrets key is configured")?;
        let sealed: taskmesh_secrets::Sealed =
            serde_json::from_str(sealed).map_err(|e| format!("stored secret: {e}"))?;
        let plain = keyring.open(&taskmesh_secrets::endpoint_secret_aad(tenant), &sealed).map_err(|e| e.to_string())?;
        String::from_utf8(plain).map_err(|_| "the signing secret is not UTF-8".to_string())
    }

    async fn post(&self, d: &Delivery) -> Result<(), Outcome> {
        let row = sqlx::query("SELECT url, secret FROM webhook_endpoints WHERE id = $1 AND tenant_id = $2")
            .bind(d.endpoint_id)
            .bind(&d.tenant)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| Outcome::Failed(format!("reading the endpoint: {e}")))?
            .ok_or(Outcome::Gone)?;
        let (url, sealed): (String, String) = (row.get("url"), row.get("secret"));
        let secret = self.open_secret(&d.tenant, &sealed).map_err(Outcome::Failed)?;
        let body = serde_json::to_vec(&d.payload).map_err(|e| Outcome::Failed(e.to_string()))?;
        let timestamp = Utc::now().timestamp();
        let signature = sign(&secret, &d.message_id, timestamp, &body).map_err(|e| Outcome::Failed(e.to_string()))?;
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
        if res.status().is_success() {
            Ok(())
        } else {
            Err(Outcome::Failed(format!("POST {url} answered {}", res.status())))
        }
    }
}

enum Outcome {
    /// The endpoint no longer exists: drop the delivery.
    Gone,
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

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
