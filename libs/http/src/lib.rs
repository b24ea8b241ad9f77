//! The HTTP edge conventions every Taskmesh HTTP service shares: RFC 9457 problem responses,
//! body reading with size limits and content types, and serving with graceful shutdown.
//!
//! # Layout
//! - [`error`]: [`ApiError`], problem rendering, rewriting axum's own error responses.
//! - [`body`]: reading JSON or YAML bodies with every rejection a problem.
//! - this file: [`finish`] (the shared layers, request metrics, `GET /metrics`) and [`Server`],
//!   a bound listener plus router.

pub mod body;
pub mod error;

use std::net::SocketAddr;

use axum::serve::ListenerExt;
pub use error::{ApiError, ApiResult, PROBLEM_JSON};
use tokio_util::sync::CancellationToken;

/// Wraps a router with the shared layers: problem+json for every error axum produces itself,
/// request metrics and tracing; and, with `metrics`, adds `GET /metrics`, the process's
/// Prometheus metrics (unauthenticated, as `/healthz` is: no metric names a tenant).
pub fn finish(router: axum::Router, metrics: bool) -> axum::Router {
    let router = match metrics {
        true => router.route("/metrics", axum::routing::get(serve_metrics)),
        false => router,
    };
    router
        .layer(axum::middleware::from_fn(track))
        .layer(axum::middleware::map_response(error::problems_everywhere))
        // An INFO span per request, so the trace context it carries survives an `info` filter.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO)),
        )
}

/// `GET /metrics`: the Prometheus text format.
async fn serve_metrics() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        taskmesh_telemetry::metrics::render(),
    )
}

/// Counts and times each request by method, route (its template, not its path, so ids do not
/// multiply the series) and status.
async fn track(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let started = std::time::Instant::now();
    // Extension methods are anyone's to make up: one series for all of them.
    let method: &'static str = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::PATCH => "PATCH",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    ::metrics::counter!("taskmesh_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    ::metrics::histogram!("taskmesh_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A bound, not yet serving, HTTP service (port 0 picks a free port, for tests).
pub struct Server {
    listener: tokio::net::TcpListener,
    router: axum::Router,
}

impl Server {
    pub async fn bind(addr: SocketAddr, router: axum::Router) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
        Ok(Self { listener, router })
    }

    /// Binds first, building the router once the address is known.
    pub async fn bind_with(addr: SocketAddr, router: impl FnOnce(SocketAddr) -> axum::Router) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
        let local = listener.local_addr()?;
        Ok(Self { listener, router: router(local) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // The peer's address reaches handlers as `ConnectInfo<SocketAddr>` (the audit log's `ip`).
        let app = self.router.into_make_service_with_connect_info::<SocketAddr>();
        // What is written goes out at once, not held back until the peer acknowledges the last
        // segment (Nagle's algorithm): a live stream's (SSE) small events, written one after
        // another, would otherwise wait for the peer's delayed acknowledgement.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
        });
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
        Ok(())
    }
}
