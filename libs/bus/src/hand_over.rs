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
//! returns, so that a crash before then makes it hand the message over again. The message
//! goes onto the queue instead, as without a taker, when:
//! - no service of this process takes the stream;
//! - the taker holds as many messages as it may;
//! - the taker fails (or panics: it runs as a task of its own, so its panic is not the
//!   sender's);
//! - the taker does not finish within [`HAND_OVER_WAIT`] (it is then stopped where it is, and
//!   the queue's consumer handles the message again, so a taker must be safe to stop and to
//!   repeat), and for [`SLOW_TAKER_PAUSE`] after that, so that a taker stuck on something
//!   (its database, say) does not hold up every sender in turn.
//!
//! Unlike a command to a server of this process ([`crate::serve`]), a message has no second
//! taker standing by: with two takers of one stream in a process (replicas in one test), the
//! first takes, and once it stops the messages go onto the queue.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::registry::{Place, Registry};
use crate::{Bus, Result};

/// Longest a sender waits for a taker before putting the message onto the queue: well under
/// the ack wait of the message the sender holds meanwhile.
pub const HAND_OVER_WAIT: Duration = Duration::from_secs(1);

/// How long a taker that did not finish within [`HAND_OVER_WAIT`] is passed over.
pub const SLOW_TAKER_PAUSE: Duration = Duration::from_secs(10);

/// Handles one message's payload; `None` when the taker holds as many as it may.
type TakeFn = dyn Fn(Bytes) -> Option<BoxFuture<'static, std::result::Result<(), String>>> + Send + Sync;

/// One taker: how it handles a message, and until when it is passed over.
pub(crate) struct Take {
    handle: Box<TakeFn>,
    paused_until: Mutex<Option<Instant>>,
}

impl Take {
    fn paused(&self) -> bool {
        self.paused_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|until| Instant::now() < until)
    }

    fn pause(&self) {
        *self.paused_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + SLOW_TAKER_PAUSE);
    }
}

/// The takers of this process, by the stream they consume (see the module's docs).
pub(crate) type Takers = Registry<Take>;

/// A taker's place, given up when dropped (see [`Bus::take_locally`]).
#[must_use = "the taker stops taking messages when this is dropped"]
pub struct Taking {
    _place: Place<Take>,
}

impl Bus {
    /// Takes the messages that this process's services hand over for `stream` (see the
    /// module's docs), handling them with `handle`, at most `concurrency` at once, until the
    /// returned [`Taking`] drops. `handle` must do with a payload what the stream's consumer
    /// does with a message of it, and fail where that consumer would have it redelivered.
    pub fn take_locally<F, Fut>(&self, stream: &str, concurrency: usize, handle: F) -> Taking
    where
        F: Fn(Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
    {
        let places = Arc::new(Semaphore::new(concurrency.max(1)));
        let take = Arc::new(Take {
            handle: Box::new(move |payload| {
                let place = places.clone().try_acquire_owned().ok()?;
                let handled = handle(payload);
                Some(Box::pin(async move {
                    let handled = handled.await;
                    drop(place);
                    handled
                }))
            }),
            paused_until: Mutex::new(None),
        });
        Taking { _place: self.takers.register(stream, take) }
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
        let taker = self.takers.get(stream).filter(|t| !t.paused());
        if let Some((taker, handled)) = taker.and_then(|t| (t.handle)(payload.clone()).map(|h| (t, h))) {
            let mut handled = tokio::spawn(handled);
            match tokio::time::timeout(HAND_OVER_WAIT, &mut handled).await {
                Ok(Ok(Ok(()))) => return Ok(true),
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, stream, "handed over, the message failed; enqueueing it"),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, stream, "handed over, the message's taker panicked; enqueueing it")
                }
                Err(_) => {
                    handled.abort();
                    taker.pause();
                    tracing::warn!(
                        stream,
                        "handed over, the message took over {HAND_OVER_WAIT:?}; enqueueing it, and the next ones for {SLOW_TAKER_PAUSE:?}"
                    );
                }
            }
        }
        self.enqueue_payload(subject, msg_id, payload, traceparent).await?;
        Ok(false)
    }
}
