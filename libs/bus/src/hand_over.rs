//! Work-queue messages handed to their consumer in this process rather than through
//! nats-server.
//!
//! A service that consumes a work-queue stream can also take that stream's messages straight
//! from the services of its own process ([`Bus::take_locally`]). [`Bus::hand_over`] then gives
//! a message to it and waits until it is handled, rather than enqueueing it for the consumer to
//! pull: the message is the same bytes, handled by the same code. What it spares is four
//! messages through nats-server (the publish, its acknowledgement, the delivery and the
//! consumer's ack) and their waits.
//!
//! A message handed over is durable only as long as its sender keeps what it came from: the
//! sender must hold an unacknowledged message of its own (or the like) until `hand_over`
//! returns, so that a crash before then makes it hand the message over again. A stream no
//! service of this process takes, a taker that holds as many messages as it may, or one that
//! fails or does not finish in time, gets the message on the queue instead, as without it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::Semaphore;

use crate::{Bus, Result};

/// Handles one message's payload; `None` when the taker holds as many as it may.
type Take = Arc<dyn Fn(Bytes) -> Option<BoxFuture<'static, std::result::Result<(), String>>> + Send + Sync>;

/// The takers of this process, by the stream they consume (see the module's docs).
#[derive(Default)]
pub(crate) struct Takers {
    takers: RwLock<HashMap<String, Take>>,
}

impl Takers {
    fn get(&self, stream: &str) -> Option<Take> {
        self.takers.read().unwrap_or_else(|e| e.into_inner()).get(stream).cloned()
    }
}

/// A taker's place, given up when dropped (see [`Bus::take_locally`]).
#[must_use = "the taker stops taking messages when this is dropped"]
pub struct Taking {
    takers: Arc<Takers>,
    stream: String,
    take: Take,
}

impl Drop for Taking {
    fn drop(&mut self) {
        let mut takers = self.takers.takers.write().unwrap_or_else(|e| e.into_inner());
        if takers.get(&self.stream).is_some_and(|t| Arc::ptr_eq(t, &self.take)) {
            takers.remove(&self.stream);
        }
    }
}

impl Bus {
    /// Takes the messages that this process's services hand over for `stream` (see the
    /// module's docs), handling them with `handle`, at most `concurrency` at once, until the
    /// returned [`Taking`] drops. `handle` must do with a payload what the stream's consumer
    /// does with a message of it, and fail where that consumer would have it redelivered.
    /// Of two takers of one stream in a process (replicas in one test, say), the first
    /// takes.
    pub fn take_locally<F, Fut>(&self, stream: &str, concurrency: usize, handle: F) -> Taking
    where
        F: Fn(Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
    {
        let places = Arc::new(Semaphore::new(concurrency.max(1)));
        let take: Take = Arc::new(move |payload| {
            let place = places.clone().try_acquire_owned().ok()?;
            let handled = handle(payload);
            Some(Box::pin(async move {
                let handled = handled.await;
                drop(place);
                handled
            }))
        });
        let mut takers = self.takers.takers.write().unwrap_or_else(|e| e.into_inner());
        takers.entry(stream.to_string()).or_insert_with(|| take.clone());
        Taking { takers: self.takers.clone(), stream: stream.to_string(), take }
    }

    /// Hands `body` to this process's taker of `stream`, and waits until it has handled it;
    /// where none takes it (see the module's docs), enqueues it on `subject` of that stream,
    /// deduplicated by `msg_id`, as [`Bus::enqueue`] does. Returns whether it was handed over.
    pub async fn hand_over<T: serde::Serialize>(
        &self,
        stream: &str,
        subject: String,
        msg_id: &str,
        body: &T,
        traceparent: Option<&str>,
    ) -> Result<bool> {
        let payload = Bytes::from(serde_json::to_vec(body).map_err(crate::BusError::nats)?);
        if let Some(handled) = self.takers.get(stream).and_then(|take| take(payload.clone())) {
            let limit = Duration::from_millis(self.settings.request_timeout_ms);
            match tokio::time::timeout(limit, handled).await {
                Ok(Ok(())) => return Ok(true),
                Ok(Err(e)) => tracing::warn!(error = %e, stream, "handed over, the message failed; enqueueing it"),
                Err(_) => tracing::warn!(stream, "handed over, the message took over {limit:?}; enqueueing it"),
            }
        }
        self.enqueue_payload(subject, msg_id, payload, traceparent).await?;
        Ok(false)
    }
}
