//! A request/reply server loop: bounded concurrency, JSON in, `Result<T, Problem>` JSON out.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use taskmesh_events::{ErrorCode, Problem};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::{Bus, BusError, Result, TRACEPARENT_HEADER};

/// Serves requests on `subject` in queue group `group` until `shutdown` resolves, running at
/// most `concurrency` handlers at once. A request that does not decode as `Req` is answered
/// with a `bad-request` problem; the handler's own problems are passed back as they are.
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
    tokio::pin!(shutdown);
    loop {
        let msg = tokio::select! {
            _ = &mut shutdown => break,
            msg = sub.next() => match msg { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else { continue };
        let permit = permits.clone().acquire_owned().await.expect("semaphore is never closed");
        let handler = handler.clone();
        let client = client.clone();
        let span = tracing::info_span!("command", subject = %msg.subject);
        taskmesh_telemetry::set_parent(
            &span,
            msg.headers.as_ref().and_then(|h| h.get(TRACEPARENT_HEADER)).map(|v| v.as_str()),
        );
        tokio::spawn(
            async move {
                let reply: std::result::Result<Resp, Problem> = match serde_json::from_slice::<Req>(&msg.payload) {
                    Ok(req) => handler(msg.subject.to_string(), req).await,
                    Err(e) => Err(Problem::new(ErrorCode::BadRequest, format!("malformed command: {e}"))),
                };
                if let Err(p) = &reply
                    && matches!(p.code, ErrorCode::Internal | ErrorCode::Unavailable)
                {
                    tracing::warn!(problem = %p, "command failed");
                }
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                if let Err(e) = client.publish(reply_to, body.into()).await {
                    tracing::warn!(error = %e, "could not reply");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    let _ = sub.unsubscribe().await;
    Ok(())
}
