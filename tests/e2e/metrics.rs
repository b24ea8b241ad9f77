//! `GET /metrics`: the process's Prometheus metrics, on every HTTP server of the mesh.

use std::time::Duration;

use taskmesh_testkit::eventually;

use crate::helpers::*;

const PLATFORM_KEY: &str = "platform-admin-key-for-metrics-tests";

/// A metric, the labels its samples must have, and their sum.
type Expected = (&'static str, Vec<(&'static str, &'static str)>, f64);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_runs_steps_the_cache_and_requests_and_name_no_tenant() {
    let tm = spawn_with(&Svc::ALL, |s| s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY))).await;
    let tenant = "metered-tenant-x7";
    let key = tm.new_tenant(PLATFORM_KEY, tenant).await;
    let cached = "name: measured\nsteps:\n  - {id: a, run: 'echo once', cache: {}}\n";
    for yaml in [cached, cached, "name: failing\nsteps:\n  - {id: a, run: 'exit 3'}\n"] {
        let id = tm.submit_as(&key, yaml).await;
        tm.wait_run_as(&key, id, Duration::from_secs(30)).await;
    }
    // Once more, refreshing its cache: the step runs.
    let req = tm.http.post(format!("{}/v1/runs?refresh_cache=true", tm.api)).bearer_auth(&key);
    let res = req.header("content-type", "application/yaml").body(cached).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let id = res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    tm.wait_run_as(&key, id, Duration::from_secs(30)).await;
    // Each test runs in a process of its own under nextest: the counts are this test's alone,
    // so exact; under plain `cargo test` other tests add to them.
    let exact = std::env::var_os("NEXTEST_RUN_ID").is_some();
    let expected: [Expected; 15] = [
        ("taskmesh_runs_submitted_total", vec![], 4.0),
        ("taskmesh_runs_finished_total", vec![("status", "succeeded")], 3.0),
        ("taskmesh_runs_finished_total", vec![("status", "failed")], 1.0),
        ("taskmesh_steps_finished_total", vec![("outcome", "succeeded")], 2.0),
        ("taskmesh_steps_finished_total", vec![("outcome", "cached")], 1.0),
        ("taskmesh_steps_finished_total", vec![("outcome", "failed")], 1.0),
        ("taskmesh_step_cache_lookups_total", vec![("result", "miss")], 1.0),
        ("taskmesh_step_cache_lookups_total", vec![("result", "hit")], 1.0),
        ("taskmesh_step_cache_lookups_total", vec![("result", "refresh")], 1.0),
        ("taskmesh_step_duration_seconds_count", vec![("kind", "run")], 3.0),
        ("taskmesh_dispatch_admitted_total", vec![], 4.0),
        ("taskmesh_http_requests_total", vec![("method", "POST"), ("route", "/v1/runs"), ("status", "202")], 4.0),
        ("taskmesh_http_requests_total", vec![("method", "POST"), ("route", "/v1/tenants"), ("status", "201")], 1.0),
        ("taskmesh_build_info", vec![("version", env!("CARGO_PKG_VERSION"))], 1.0),
        ("taskmesh_dispatch_held_steps", vec![], 0.0),
    ];
    // What is counted after a run's end is recorded (the scheduler's count of the end, the
    // executor's of the step) may come after the read side shows the end.
    let counted = eventually("the metrics to count every run and step", Duration::from_secs(20), || async {
        let text = tm.metrics().await;
        let checkpoint = taskmesh_store::read_checkpoint(&tm.pool, taskmesh_projector::NAME).await?;
        let all = expected.iter().all(|(name, labels, want)| {
            let got = sample(&text, name, labels);
            if exact { got == *want } else { got >= *want }
        });
        let projected = sample(&text, "taskmesh_projector_checkpoint", &[]) == checkpoint as f64;
        Ok((all && projected).then_some(text))
    })
    .await;
    let text = match counted {
        Ok(text) => text,
        Err(e) => panic!("{e}: {}", tm.metrics().await),
    };
    assert!(sample(&text, "taskmesh_http_request_duration_seconds_count", &[("route", "/v1/runs/{id}")]) >= 1.0);
    assert!(sample(&text, "taskmesh_projector_events_total", &[]) >= 3.0);
    let batches = sample(&text, "taskmesh_projector_batch_seconds_count", &[]);
    assert!(batches >= 1.0, "the projector's batches are timed:\n{text}");
    assert!(text.contains("# TYPE taskmesh_projector_batch_seconds histogram"), "{text}");
    assert!(sample(&text, "taskmesh_projector_last_event_timestamp_seconds", &[]) > 1.7e9, "a Unix time");
    assert!(text.contains("# TYPE taskmesh_step_duration_seconds histogram"), "{text}");
    assert!(text.contains("\ntaskmesh_dispatch_held_steps "), "the held-steps gauge is exported:\n{text}");
    assert!(text.contains("# HELP taskmesh_runs_submitted_total"), "{text}");
    assert!(!text.contains(tenant) && !text.contains("tenant=\""), "no metric names a tenant:\n{text}");
    // Another HTTP server of the process answers the same.
    let git = scrape(&tm.http, &format!("{}/metrics", tm.git)).await;
    assert!(sample(&git, "taskmesh_runs_submitted_total", &[]) >= 3.0, "{git}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_answers_metrics_on_its_health_listener_and_labels_stay_bounded() {
    // Everything but the executor here; the executor is a child process with a health listener.
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Projector, Svc::Gateway, Svc::Notification], |_| {}).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut executor = tm
        .serve_command("executor")
        .env("TASKMESH_HEALTH__LISTEN", format!("127.0.0.1:{port}"))
        .env("TASKMESH_EXECUTOR__LEASE_SECS", tm.env.settings.executor.lease_secs.to_string())
        .spawn()
        .expect("spawning the executor");
    let id = tm.submit("name: remote\nsteps:\n  - {id: a, run: 'true'}\n").await;
    assert_eq!(tm.wait_run(id, Duration::from_secs(30)).await["status"], "succeeded");
    let url = format!("http://127.0.0.1:{port}/metrics");
    let counted = eventually("the executor's metrics", Duration::from_secs(20), || async {
        let text = match tm.http.get(&url).send().await {
            Ok(res) if res.status() == 200 => res.text().await?,
            _ => return Ok(None),
        };
        Ok((sample(&text, "taskmesh_steps_finished_total", &[("outcome", "succeeded")]) == 1.0).then_some(text))
    })
    .await
    .unwrap();
    assert_eq!(
        sample(&counted, "taskmesh_runs_submitted_total", &[]),
        0.0,
        "its own process's: no runs submitted there"
    );
    scrape(&tm.http, &url).await;

    // Whatever the path or method, the labels are from a fixed set: route templates, known methods.
    let run_id = uuid::Uuid::now_v7();
    let odd = reqwest::Method::from_bytes(b"FROB").unwrap();
    tm.http.request(odd, format!("{}/v1/runs/{run_id}", tm.api)).send().await.unwrap();
    tm.http.get(format!("{}/no/such/{run_id}", tm.api)).send().await.unwrap();
    let text = tm.metrics().await;
    assert!(!text.contains(&run_id.to_string()), "no path in a label:\n{text}");
    assert!(sample(&text, "taskmesh_http_requests_total", &[("method", "other")]) >= 1.0, "{text}");
    assert!(sample(&text, "taskmesh_http_requests_total", &[("route", "unmatched")]) >= 1.0, "{text}");
    executor.start_kill().unwrap();
    let _ = executor.wait().await;
    tm.finish().await;
}

/// `gateway.metrics = false` takes `/metrics` off the gateway's port (a public one, say):
/// it is then an unknown route there, while git-integration's port still answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_with_metrics_off_does_not_answer_them() {
    let tm = spawn_with(&Svc::ALL, |s| s.gateway.metrics = false).await;
    let res = tm.http.get(format!("{}/metrics", tm.api)).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["type"], "https://taskmesh.dev/problems/not-found", "{problem}");
    let git = scrape(&tm.http, &format!("{}/metrics", tm.git)).await;
    assert!(git.contains("# TYPE taskmesh_build_info gauge"), "{git}");
    tm.finish().await;
    // And git-integration's, the other way round.
    let tm = spawn_with(&Svc::ALL, |s| s.git.metrics = false).await;
    assert_eq!(tm.http.get(format!("{}/metrics", tm.git)).send().await.unwrap().status(), 404);
    let gateway = scrape(&tm.http, &format!("{}/metrics", tm.api)).await;
    assert!(gateway.contains("# TYPE taskmesh_build_info gauge"), "{gateway}");
    tm.finish().await;
}
