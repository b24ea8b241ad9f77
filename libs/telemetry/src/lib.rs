//! Logs, traces and metrics for every Taskmesh process.
//!
//! [`init`] installs a `tracing` subscriber (text or JSON logs, filtered by `RUST_LOG` or the
//! configured filter) and an OpenTelemetry tracer, exporting over OTLP/HTTP when an endpoint is
//! configured. Spans always carry W3C trace context, so a trace follows a run across the bus:
//! [`current_traceparent`] reads it to put in NATS headers and envelopes, [`set_parent`]
//! continues it on the receiving side. [`metrics::install`] installs the process's Prometheus
//! recorder.
//!
//! # Layout
//! - [`metrics`]: the Prometheus recorder and what it describes.
//! - this file: logs and traces.

pub mod metrics;

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use taskmesh_config::TelemetrySettings;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes and stops trace export when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();

fn propagator() -> &'static TraceContextPropagator {
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// Installs logging and tracing for the process `service`. Call once, from `main`.
pub fn init(service: &str, settings: &TelemetrySettings) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log_filter));
    let mut builder = SdkTracerProvider::builder()
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(format!("taskmesh-{service}")).build());
    if let Some(endpoint) = &settings.otlp_endpoint {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => eprintln!("taskmesh: OTLP exporter disabled: {e}"),
        }
    }
    let provider = builder.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("taskmesh"));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = if settings.log_format == "json" {
        registry.with(tracing_subscriber::fmt::layer().json().with_current_span(false)).try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_target(true)).try_init()
    };
    if result.is_err() {
        // A subscriber was installed already (tests, or the all-in-one binary): keep it.
        return TelemetryGuard { provider: None };
    }
    TelemetryGuard { provider: Some(provider) }
}

/// The W3C `traceparent` of the current span, if it has a valid trace context.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    propagator().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `traceparent` the parent of `span`, continuing a trace that crossed the bus.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let carrier: HashMap<String, String> = HashMap::from([("traceparent".to_string(), tp.to_string())]);
        let cx = propagator().extract(&carrier);
        let _ = span.set_parent(cx);
    }
}

/// The trace id inside a `traceparent` value.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1)
}
