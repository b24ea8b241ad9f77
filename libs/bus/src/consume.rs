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
    mut handle: impl FnMut(Arc<Message>) -> Fut,
) where
    Fut: std::future::Future<Output = AckKind>,
{
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
                    let msg = Arc::new(msg);
                    let kind = handle(msg.clone()).await;
                    if let Err(e) = msg.ack_with(kind).await {
                        tracing::warn!(consumer = name, error = %e, "ack failed; the message will be redelivered");
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
}
