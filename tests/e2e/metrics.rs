//! `GET /metrics`: the process's Prometheus metrics, on every HTTP server of the mesh.

use std::time::Duration;

use taskmesh_testkit::eventually;

use crate::helpers::*;

/// The sum of the samples of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_runs_steps_the_cache_and_requests_and_name_no_tenant() {
    let tm = spawn_mesh().await;
    let cached = "name: measured\nsteps:\n  - {id: a, run: 'echo once', cache: {}}\n";
    for yaml in [cached, cached, "name: failing\nsteps:\n  - {id: a, run: 'exit 3'}\n"] {
        let id = tm.submit(yaml).await;
        tm.wait_run(id, Duration::from_secs(30)).await;
    }
    let scrape = |url: String| {
        let http = tm.http.clone();
        async move {
            let res = http.get(url).send().await.unwrap();
            assert_eq!(res.status(), 200, "no key needed");
            let kind = res.headers()["content-type"].to_str().unwrap().to_string();
            assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
            res.text().await.unwrap()
        }
    };
    // The scheduler counts a run's end as it handles the event, which may come after the read
    // side shows it.
    let text = eventually("the metrics to count every run", Duration::from_secs(20), || async {
        let text = scrape(format!("{}/metrics", tm.api)).await;
        Ok((sample(&text, "taskmesh_runs_finished_total", &[]) >= 3.0).then_some(text))
    })
    .await
    .unwrap();
    let at_least = [
        ("taskmesh_runs_submitted_total", vec![], 3.0),
        ("taskmesh_runs_finished_total", vec![("status", "succeeded")], 2.0),
        ("taskmesh_runs_finished_total", vec![("status", "failed")], 1.0),
        ("taskmesh_steps_finished_total", vec![("outcome", "succeeded")], 1.0),
        ("taskmesh_steps_finished_total", vec![("outcome", "cached")], 1.0),
        ("taskmesh_steps_finished_total", vec![("outcome", "failed")], 1.0),
        ("taskmesh_step_cache_lookups_total", vec![("result", "miss")], 1.0),
        ("taskmesh_step_cache_lookups_total", vec![("result", "hit")], 1.0),
        ("taskmesh_step_duration_seconds_count", vec![("kind", "run")], 2.0),
        ("taskmesh_dispatch_admitted_total", vec![], 3.0),
        ("taskmesh_http_requests_total", vec![("method", "POST"), ("route", "/v1/runs"), ("status", "202")], 3.0),
        ("taskmesh_http_request_duration_seconds_count", vec![("method", "GET"), ("route", "/v1/runs/{id}")], 1.0),
        ("taskmesh_projector_events_total", vec![], 3.0),
        ("taskmesh_projector_checkpoint", vec![], 1.0),
        ("taskmesh_build_info", vec![("version", env!("CARGO_PKG_VERSION"))], 1.0),
    ];
    for (name, labels, least) in at_least {
        let got = sample(&text, name, &labels);
        assert!(got >= least, "{name}{labels:?} is {got}, not at least {least}:\n{text}");
    }
    assert!(text.contains("# TYPE taskmesh_step_duration_seconds histogram"), "{text}");
    assert!(text.contains("# HELP taskmesh_runs_submitted_total"), "{text}");
    assert!(!text.contains("tenant"), "no metric names a tenant:\n{text}");
    // Another HTTP server of the process answers the same.
    let git = scrape(format!("{}/metrics", tm.git)).await;
    assert!(sample(&git, "taskmesh_runs_submitted_total", &[]) >= 3.0, "{git}");
    tm.finish().await;
}
