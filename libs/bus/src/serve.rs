//! A request/reply server loop: bounded concurrency, JSON in, `Result<T, Problem>` JSON out.
//!
//! A server is also reachable without NATS by requests made through the same [`Bus`] (the
//! services of one process share one): while [`serve`] runs, it is registered under its subject
//! in the bus's table of what runs in this process ([`Local`]), and [`Bus::request`] hands a request for that subject straight
//! to it. The request is still JSON, answered with the same handler, under the same bound on
//! concurrent handlers and the same timeout, and the handler runs to its end as its own task
//! whether or not the asker still waits, as it does for a request over NATS. What it spares is
//! two messages through nats-server and their wait (request and reply); a subject served by no
//! one in this process goes over NATS, to the other processes' servers.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use taskmesh_events::{ErrorCode, Problem};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::registry::Registry;
use crate::{Bus, BusError, Result, TRACEPARENT_HEADER};

/// Answers one request's payload (with its caller's trace context) with the reply's payload;
/// `None` when the server holds as many requests as it may (see [`LOCAL_WAITING`]). The answer
/// is `None` when the server stopped before the request's turn came: over NATS, a request
/// still waiting in the subscription then is never handled, and the asker hears nothing.
pub(crate) type Respond = dyn Fn(Bytes, Option<String>) -> Option<BoxFuture<'static, Option<Bytes>>> + Send + Sync;

/// The servers running in this process, by the subject they serve (see the module's docs). Of
/// two servers of one subject in a process (replicas in one test, say), the first started
/// answers; the other takes over when it stops.
pub(crate) type Local = Registry<Respond>;

/// Most requests from its own process a server holds beyond those it is handling; more go over
/// NATS, where its subscription's own bound applies.
const LOCAL_WAITING: usize = 1_024;

/// Serves requests on `subject` in queue group `group` until `shutdown` resolves, running at
/// most `concurrency` handlers at once. A request that does not decode as `Req` is answered
/// with a `bad-request` problem; the handler's own problems are passed back as they are.
/// Requests made through this process's [`Bus`] reach it without NATS (see the module's docs).
pub async fn serve<Req, Resp, F, Fut>(
    bus: &Bus,
    subject: String,
    group: &str,
    concurrency: usize,
    shutdown: impl Future<Output = ()>,
    handler: F,
) -> Result<()>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(String, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Resp, Problem>> + Send + 'static,
{
    let client = bus.client().clone();
    let mut sub = client.queue_subscribe(subject.clone(), group.to_string()).await.map_err(BusError::nats)?;
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let stopped = Arc::new(AtomicBool::new(false));
    let respond: Arc<Respond> = {
        let (handler, permits, subject, stopped) = (handler.clone(), permits.clone(), subject.clone(), stopped.clone());
        let held = Arc::new(Semaphore::new(concurrency.max(1) + LOCAL_WAITING));
        Arc::new(move |payload, traceparent| {
            let place = held.clone().try_acquire_owned().ok()?;
            let (handler, permits, subject, stopped) =
                (handler.clone(), permits.clone(), subject.clone(), stopped.clone());
            Some(Box::pin(async move {
                let _permit = permits.acquire_owned().await.expect("semaphore is never closed");
                if stopped.load(Ordering::Acquire) {
                    return None;
                }
                let reply = answer(&handler, subject, &payload, traceparent.as_deref()).await;
                drop(place);
                Some(reply)
            }))
        })
    };
    let mut registered = bus.local.register(&subject, respond);
    tokio::pin!(shutdown);
    loop {
        let msg = tokio::select! {
            _ = &mut shutdown => break,
            msg = sub.next() => match msg { Some(m) => m, None => break },
        };
        registered.claim();
        let Some(reply_to) = msg.reply.clone() else { continue };
        // Stopping while every handler is busy stops at once, handling no more.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let handler = handler.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let traceparent = msg.headers.as_ref().and_then(|h| h.get(TRACEPARENT_HEADER)).map(|v| v.as_str());
            let body = answer(&handler, msg.subject.to_string(), &msg.payload, traceparent).await;
            if let Err(e) = client.publish(reply_to, body).await {
                tracing::warn!(error = %e, "could not reply");
            }
            drop(permit);
        });
    }
    // Requests from this process not yet handled are refused from now on, as those still in
    // the subscription are never handled.
    stopped.store(true, Ordering::Release);
    drop(registered);
    let _ = sub.unsubscribe().await;
    Ok(())
}

/// Decodes a request, runs the handler on it in a span continuing the caller's trace, and
/// encodes its reply.
async fn answer<Req, Resp, F, Fut>(handler: &F, subject: String, payload: &[u8], traceparent: Option<&str>) -> Bytes
where
    Req: DeserializeOwned,
    Resp: Serialize,
    F: Fn(String, Req) -> Fut,
    Fut: Future<Output = std::result::Result<Resp, Problem>>,
{
    let span = tracing::info_span!("command", subject = %subject);
    taskmesh_telemetry::set_parent(&span, traceparent);
    async move {
        let reply: std::result::Result<Resp, Problem> = match serde_json::from_slice::<Req>(payload) {
            Ok(req) => handler(subject, req).await,
            Err(e) => Err(Problem::new(ErrorCode::BadRequest, format!("malformed command: {e}"))),
        };
        if let Err(p) = &reply
            && matches!(p.code, ErrorCode::Internal | ErrorCode::Unavailable)
        {
            tracing::warn!(problem = %p, "command failed");
        }
        serde_json::to_vec(&reply).unwrap_or_default().into()
    }
    .instrument(span)
    .await
}
