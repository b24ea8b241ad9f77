//! Prometheus metrics. One recorder per process ([`install`], on first use): the services
//! record through the `metrics` crate's macros, and the process's HTTP servers answer
//! `GET /metrics` with [`render`] (`taskmesh_http::finish` adds the route, unless the
//! listener's `metrics` setting is off). No metric carries a
//! tenant: the figures are the platform's, and tenants' names stay out of a scrape.
//!
//! The metrics, each described in `docs/operations.md`:
//! - `taskmesh_http_requests_total{method, route, status}`, `taskmesh_http_request_duration_seconds{method, route}`;
//! - `taskmesh_runs_submitted_total`, `taskmesh_runs_finished_total{status}`;
//! - `taskmesh_steps_finished_total{outcome}`, `taskmesh_step_duration_seconds{kind}`,
//!   `taskmesh_step_cache_lookups_total{result}`;
//! - `taskmesh_dispatch_admitted_total`, `taskmesh_dispatch_held_steps`,
//!   `taskmesh_circuit_breakers_open`, `taskmesh_circuit_breaker_signals_total{verdict}`;
//! - `taskmesh_projector_events_total`, `taskmesh_projector_batch_seconds`,
//!   `taskmesh_projector_checkpoint`, `taskmesh_projector_last_event_timestamp_seconds`;
//! - `taskmesh_deliveries_total{outcome}`;
//! - `taskmesh_event_log_sweeps_total{outcome}`, `taskmesh_event_log_swept_total{what}`;
//! - `taskmesh_build_info{version}`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Bucket bounds of every histogram, in seconds: from a millisecond to ten minutes.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];
/// How often histograms' recent samples are folded into their buckets, scraped or not (so
/// an unscraped process holds no more than a few seconds' samples).
const UPKEEP: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on the first call. Where another recorder was installed
/// first, metrics go to it and this one stays empty.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new().set_buckets(&BUCKETS).expect("non-empty buckets");
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            Err(e) => {
                tracing::warn!(error = %e, "a metrics recorder was installed already; /metrics stays empty");
                return PrometheusBuilder::new().build_recorder().handle();
            }
        };
        describe();
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP);
                    upkeep.run_upkeep();
                }
            })
            .expect("a thread for metrics upkeep");
        handle
    })
}

/// The process's metrics in the Prometheus text format.
pub fn render() -> String {
    install().render()
}

fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};
    describe_counter!("taskmesh_http_requests_total", "HTTP requests answered, by method, route and status");
    describe_histogram!(
        "taskmesh_http_request_duration_seconds",
        Unit::Seconds,
        "Time until an HTTP response's status and headers were ready (a streamed body is not timed), by method and route"
    );
    describe_counter!("taskmesh_runs_submitted_total", "Runs accepted (a repeated idempotent submission not counted)");
    describe_counter!("taskmesh_runs_finished_total", "Runs that ended, by status (as the scheduler saw each end)");
    describe_counter!(
        "taskmesh_steps_finished_total",
        "Step attempts whose result was recorded, by outcome: succeeded, failed, timed_out, cancelled, cached"
    );
    describe_histogram!("taskmesh_step_duration_seconds", Unit::Seconds, "Time a step attempt ran here, by kind");
    describe_counter!(
        "taskmesh_step_cache_lookups_total",
        "cache: steps looked up, by result: hit, miss, or refresh (not looked up: the kept outcome forgotten)"
    );
    describe_counter!("taskmesh_dispatch_admitted_total", "Steps the dispatcher let through to the executors");
    describe_gauge!("taskmesh_dispatch_held_steps", "Steps the dispatcher holds back, after its last round");
    describe_gauge!("taskmesh_circuit_breakers_open", "Circuit breakers open (or half-open), after the last round");
    describe_counter!(
        "taskmesh_circuit_breaker_signals_total",
        "Attempts behind circuit breakers the dispatcher heard of, by verdict: success, failure, none"
    );
    describe_counter!("taskmesh_projector_events_total", "Events in the batches the projector committed");
    describe_histogram!(
        "taskmesh_projector_batch_seconds",
        Unit::Seconds,
        "Time the projector took to write a batch of events to the read models and commit it (its count is the batches committed)"
    );
    describe_gauge!("taskmesh_projector_checkpoint", "The last event-log sequence the read models hold");
    describe_gauge!(
        "taskmesh_projector_last_event_timestamp_seconds",
        Unit::Seconds,
        "When the newest event the read models hold happened (Unix time): the read side's lag is now minus this, while events arrive"
    );
    describe_counter!(
        "taskmesh_deliveries_total",
        "Outbound deliveries (webhooks, Slack, e-mail, commit statuses) handled, by outcome: sent, retry (handed back to be tried again), given_up (failed for good, or dropped unattempted)"
    );
    describe_counter!(
        "taskmesh_event_log_sweeps_total",
        "Sweeps of the event log (retention) this process ran to their end, by outcome: done, failed"
    );
    describe_counter!(
        "taskmesh_event_log_swept_total",
        "What the sweeps removed, by what: runs (ended runs whose events went), deleted (deleted aggregates whose events went), records (messages: old records, superseded secret values, schedule ticks)"
    );
    describe_gauge!("taskmesh_build_info", "Always 1, labelled with the version");
    gauge!("taskmesh_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}
