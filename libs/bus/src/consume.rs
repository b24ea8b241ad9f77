//! A durable pull consumer loop that survives its message stream ending.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;

use crate::Bus;

/// Pulls from the durable consumer `name` on `stream` (created or updated to `config`) and
/// hands each message to `handle`, one at a time, until `shutdown` resolves; the message is
/// then acked the way `handle` says (ack, nak with a delay, term). At most `prefetch`
/// messages are pulled ahead. When the server ends the pull (consumer deleted, server restarted)
/// or is unreachable, the loop recreates the consumer and carries on: a consumer never stops
/// silently while its process looks healthy.
pub async fn consume<Fut>(
    bus: &Bus,
    stream: &str,
    name: &str,
    config: PullConfig,
    prefetch: usize,
    shutdown: impl std::future::Future<Output = ()>,
    handle: impl Fn(Arc<Message>) -> Fut,
) where
    Fut: std::future::Future<Output = AckKind>,
{
    consume_in_lanes(bus, stream, name, config, prefetch, Lanes::ONE, shutdown, handle).await
}

/// How a consumer's messages are spread over concurrent handlers: `count` lanes, each handling
/// its messages one at a time and in order; a message goes to the lane its subject hashes to,
/// so messages of one subject (one aggregate) are handled in order while different subjects'
/// proceed side by side.
#[derive(Debug, Clone, Copy)]
pub struct Lanes {
    pub count: usize,
    /// Messages queued per lane before the puller waits (the bound on what is held in memory
    /// is `prefetch` plus `count * depth`).
    pub depth: usize,
}

impl Lanes {
    /// One lane: every message in delivery order.
    pub const ONE: Lanes = Lanes { count: 1, depth: 1 };
}

/// [`consume`] with messages spread over [`Lanes`] by subject.
#[allow(clippy::too_many_arguments)]
pub async fn consume_in_lanes<Fut>(
    bus: &Bus,
    stream: &str,
    name: &str,
    config: PullConfig,
    prefetch: usize,
    lanes: Lanes,
    shutdown: impl std::future::Future<Output = ()>,
    handle: impl Fn(Arc<Message>) -> Fut,
) where
    Fut: std::future::Future<Output = AckKind>,
{
    let count = lanes.count.max(1);
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..count).map(|_| tokio::sync::mpsc::channel::<Arc<Message>>(lanes.depth.max(1))).unzip();
    let handle = &handle;
    // Each lane handles its messages in order and acks each as its handler says.
    let workers = futures::future::join_all(receivers.into_iter().map(|mut rx| async move {
        while let Some(msg) = rx.recv().await {
            let kind = handle(msg.clone()).await;
            if let Err(e) = msg.ack_with(kind).await {
                tracing::warn!(consumer = name, error = %e, "ack failed; the message will be redelivered");
            }
        }
    }));
    // The puller owns the senders: when it stops, the lanes finish what they hold and end.
    let puller = async move {
        tokio::pin!(shutdown);
        loop {
            let messages = async {
                let consumer = bus.durable(stream, name, config.clone()).await?;
                let messages = consumer
                    .stream()
                    .max_messages_per_batch(prefetch.max(1))
                    .heartbeat(Duration::from_secs(5))
                    .messages()
                    .await
                    .map_err(crate::BusError::nats)?;
                Ok::<_, crate::BusError>(messages)
            };
            let mut messages = tokio::select! {
                _ = &mut shutdown => return,
                m = messages => match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(consumer = name, error = %e, "consumer unavailable; retrying");
                        tokio::select! {
                            _ = &mut shutdown => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            loop {
                let next = tokio::select! {
                    _ = &mut shutdown => return,
                    m = messages.next() => m,
                };
                match next {
                    Some(Ok(msg)) => {
                        let lane = if count == 1 { 0 } else { lane_of(&msg.subject, count) };
                        tokio::select! {
                            _ = &mut shutdown => return,
                            sent = senders[lane].send(Arc::new(msg)) => if sent.is_err() { return },
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(consumer = name, error = %e, "pull failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    None => {
                        tracing::warn!(consumer = name, "message stream ended; recreating the consumer");
                        break;
                    }
                }
            }
        }
    };
    futures::future::join(puller, workers).await;
}

/// The lane a subject's messages go to.
fn lane_of(subject: &str, count: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    subject.hash(&mut h);
    (h.finish() % count as u64) as usize
}
