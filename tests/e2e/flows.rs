//! The skeleton flows: DAGs run in dependency order, in parallel where they can, and failures
//! skip what depends on them.

use std::time::Duration;

use serde_json::json;
use taskmesh_testkit::eventually;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn diamond_runs_b_and_c_in_parallel_and_d_after_both() {
    let tm = spawn_with(&Svc::ALL, |s| s.executor.slots = 2).await;
    // A barrier: b and c each wait for the other to have started, so they must overlap.
    let barrier = tempfile::tempdir().unwrap();
    let bar = barrier.path().display();
    let id = tm
        .submit(&format!(
            "name: diamond
steps:
  - {{id: a, run: 'echo a'}}
  - {{id: b, needs: [a], run: 'touch {bar}/b; until [ -f {bar}/c ]; do sleep 0.05; done; echo b', timeout_seconds: 20}}
  - {{id: c, needs: [a], run: 'touch {bar}/c; until [ -f {bar}/b ]; do sleep 0.05; done; echo c', timeout_seconds: 20}}
  - {{id: d, needs: [b, c], run: 'echo d'}}
"
        ))
        .await;
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    for s in ["a", "b", "c", "d"] {
        assert_eq!(step(&run, s)["status"], "succeeded");
        assert_eq!(step(&run, s)["exit_code"], 0);
        assert_eq!(step(&run, s)["output"], format!("{s}\n"));
    }
    let (b, c, d) = (step(&run, "b"), step(&run, "c"), step(&run, "d"));
    assert!(
        ts(b, "started_at") < ts(c, "finished_at") && ts(c, "started_at") < ts(b, "finished_at"),
        "b and c overlap: {run:#}"
    );
    assert!(ts(d, "started_at") >= ts(b, "finished_at").max(ts(c, "finished_at")), "d starts after b and c: {run:#}");
    assert!(ts(b, "started_at") >= ts(step(&run, "a"), "finished_at"));
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_step_fails_the_run_and_its_dependents_never_run() {
    let tm = spawn_mesh().await;
    let id = tm
        .submit(
            "name: fails
steps:
  - {id: a, run: 'echo boom >&2; exit 3'}
  - {id: b, needs: [a], run: 'echo should-not-run'}
  - {id: c, needs: [b], run: 'echo should-not-run'}
  - {id: side, run: 'echo independent'}
",
        )
        .await;
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let a = step(&run, "a");
    assert_eq!(a["status"], "failed");
    assert_eq!(a["exit_code"], 3);
    assert_eq!(a["output"], "boom\n");
    for s in ["b", "c"] {
        assert_eq!(step(&run, s)["status"], "skipped", "{run:#}");
        assert_eq!(step(&run, s)["attempts"], 0, "{s} never ran");
        assert!(step(&run, s)["attempt_history"].as_array().unwrap().is_empty());
    }
    assert_eq!(step(&run, "side")["status"], "succeeded");
    let started: Vec<_> = tm.run_events(id).await.into_iter().filter(|e| e.type_name() == "StepStarted").collect();
    assert_eq!(started.len(), 2, "only a and side started");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_idempotency_key_twice_creates_one_run() {
    let tm = spawn_mesh().await;
    let post = |key: &'static str| {
        tm.auth(tm.http.post(format!("{}/v1/runs", tm.api)))
            .header("idempotency-key", key)
            .json(&serde_json::json!({"workflow": {"name": "once", "steps": [{"id": "a", "run": "true"}]}}))
            .send()
    };
    let first: serde_json::Value = post("order-42").await.unwrap().json().await.unwrap();
    let second: serde_json::Value = post("order-42").await.unwrap().json().await.unwrap();
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    let id = first["id"].as_str().unwrap().parse().unwrap();
    tm.wait_run(id, Duration::from_secs(30)).await;
    // After the read side has it, the key is still honoured (beyond JetStream's window too).
    let third: serde_json::Value = post("order-42").await.unwrap().json().await.unwrap();
    assert_eq!(third["id"], first["id"]);
    let other: serde_json::Value = post("order-43").await.unwrap().json().await.unwrap();
    assert_ne!(other["id"], first["id"]);
    // A key shaped as Taskmesh's own (a schedule's tick, a forge delivery) is refused: it
    // would take the run id that tick or delivery derives.
    let tick = "schedule:0190a6a5-0000-7000-8000-000000000000:2026-12-07T00:00:00+00:00";
    let refused = post(tick).await.unwrap();
    assert_eq!(refused.status(), 400);
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "Idempotency-Key", "{problem}");
    let run =
        |key: &str| json!({"idempotency_key": key, "workflow": {"name": "x", "steps": [{"id": "a", "run": "true"}]}});
    let delivery = "github:0190a6a5-0000-7000-8000-000000000000:d-1";
    let batch =
        tm.send_json(reqwest::Method::POST, "/v1/runs/batch", &json!({"runs": [run(delivery), run("order-44")]})).await;
    let batch: serde_json::Value = batch.json().await.unwrap();
    assert_eq!((&batch["accepted"], &batch["rejected"]), (&json!(1), &json!(1)), "{batch}");
    assert!(batch["runs"][0]["problem"]["detail"].as_str().unwrap().contains("may not begin"), "{batch}");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE idempotency_key = 'order-42'")
        .fetch_one(&tm.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    tm.wait_projected().await;
    let submitted: i64 = sqlx::query_scalar("SELECT count(*) FROM runs").fetch_one(&tm.pool).await.unwrap();
    assert_eq!(submitted, 3, "order-42, order-43 and the batch's order-44");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_and_one_correlation_follow_a_run_across_the_bus() {
    // Real tracing with OpenTelemetry (no exporter): spans get W3C trace context.
    let _guard = taskmesh_telemetry::init("e2e", &taskmesh_config::TelemetrySettings::default());
    let tm = spawn_mesh().await;
    let id = tm.submit("name: traced\nsteps:\n  - {id: a, uses: noop}\n  - {id: b, needs: [a], run: 'true'}\n").await;
    tm.wait_run(id, Duration::from_secs(30)).await;
    let events = tm.run_events(id).await;
    assert!(events.len() >= 8, "{events:?}");
    let trace = taskmesh_telemetry::trace_id(events[0].traceparent.as_deref().expect("the submission is traced"))
        .unwrap()
        .to_string();
    assert_ne!(trace, "00000000000000000000000000000000");
    for e in &events {
        let tp = e.traceparent.as_deref().unwrap_or_else(|| panic!("{} has no traceparent", e.type_name()));
        assert_eq!(
            taskmesh_telemetry::trace_id(tp),
            Some(trace.as_str()),
            "{} is in the submission's trace",
            e.type_name()
        );
        assert_eq!(e.correlation_id, events[0].correlation_id, "{} shares the correlation id", e.type_name());
    }
    // Events caused by another event name it.
    assert!(events.iter().skip(1).any(|e| e.causation_id.is_some()));
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_the_read_side_does_not_reach_in_time_is_a_503_to_retry_and_one_beyond_the_log_a_400() {
    let tm = spawn_mesh().await;
    tm.wait_projected().await;
    // Hold the projector back: each of its batches' checkpoint update waits on the row's lock.
    let mut hold = tm.pool.begin().await.unwrap();
    sqlx::query("SELECT last_seq FROM projection_checkpoints WHERE projection = 'projector' FOR UPDATE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let workflow = serde_json::json!({"workflow": {"name": "held", "steps": [{"id": "a", "uses": "noop"}]}});
    let res = tm.send_json(reqwest::Method::POST, "/v1/runs", &workflow).await;
    let accepted: serde_json::Value = res.json().await.unwrap();
    let (id, seq) = (accepted["id"].as_str().unwrap().to_string(), accepted["seq"].as_u64().unwrap());
    let read = |min_seq: u64| {
        tm.auth(tm.http.get(format!("{}/v1/runs/{id}", tm.api))).header("taskmesh-min-seq", min_seq.to_string()).send()
    };
    // In the log, but the read side does not get there: held for the wait, then a 503 saying
    // when to ask again.
    let started = std::time::Instant::now();
    let behind = read(seq).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(behind.status(), 503);
    assert_eq!(behind.headers()["retry-after"], "1");
    assert!(waited >= Duration::from_millis(4_900) && waited < Duration::from_secs(8), "{waited:?}");
    assert!(behind.text().await.unwrap().contains(&format!("not yet {seq}")));
    // Beyond the log: a 400 well before the wait is over, the read side behind as it is.
    let started = std::time::Instant::now();
    let beyond = read(seq + 1_000_000).await.unwrap();
    assert_eq!(beyond.status(), 400);
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    // Let go, the read side catches up and the same read is answered.
    hold.rollback().await.unwrap();
    let answered = read(seq).await.unwrap();
    assert_eq!(answered.status(), 200);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_reads_its_own_write_and_etags_spare_unchanged_reads() {
    let tm = spawn_mesh().await;
    let res = tm
        .auth(tm.http.post(format!("{}/v1/runs", tm.api)))
        .json(&serde_json::json!({"workflow": {"name": "ryw", "steps": [{"id": "a", "run": "sleep 0.3"}]}}))
        .send()
        .await
        .unwrap();
    let accepted: serde_json::Value = res.json().await.unwrap();
    let (id, seq) = (accepted["id"].as_str().unwrap(), accepted["seq"].as_u64().unwrap());
    // Right after the write, with its sequence: the run is there (no 404 while the projector lags).
    // 503 means the projector is still behind the sequence: asking again is what a client does.
    let status = eventually("a read at the write's sequence to be answered", Duration::from_secs(30), || async {
        let res = tm
            .auth(tm.http.get(format!("{}/v1/runs/{id}", tm.api)))
            .header("taskmesh-min-seq", seq.to_string())
            .send()
            .await
            .unwrap();
        Ok((res.status() != 503).then_some(res.status()))
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    let bad = tm
        .auth(tm.http.get(format!("{}/v1/runs/{id}", tm.api)))
        .header("taskmesh-min-seq", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // A sequence the log has not reached is refused, not waited for until the read gives up.
    let started = std::time::Instant::now();
    let beyond = tm
        .auth(tm.http.get(format!("{}/v1/runs/{id}", tm.api)))
        .header("taskmesh-min-seq", (seq + 1_000_000).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), 400);
    assert!(beyond.text().await.unwrap().contains("beyond the log"));
    assert!(started.elapsed() < Duration::from_secs(4), "answered before the 5 s wait is over");

    let run = tm.wait_run(id.parse().unwrap(), Duration::from_secs(30)).await;
    let res = tm.auth(tm.http.get(format!("{}/v1/runs/{id}", tm.api))).send().await.unwrap();
    let etag = res.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", run["seq"]));
    let again =
        tm.auth(tm.http.get(format!("{}/v1/runs/{id}", tm.api))).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(again.status(), 304, "unchanged: not sent again");
    let stale =
        tm.auth(tm.http.get(format!("{}/v1/runs/{id}", tm.api))).header("if-none-match", "\"1\"").send().await.unwrap();
    assert_eq!(stale.status(), 200);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_with_wait_answers_once_the_run_has_ended_or_the_wait_is_over() {
    let tm = spawn_mesh().await;
    let submit = |workflow: serde_json::Value| {
        let req = tm.auth(tm.http.post(format!("{}/v1/runs", tm.api))).json(&serde_json::json!({"workflow": workflow}));
        async move {
            let accepted: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
            (accepted["id"].as_str().unwrap().to_string(), accepted["seq"].as_u64().unwrap())
        }
    };
    let read = |id: String, seq: u64, wait: &'static str| {
        let req = tm
            .auth(tm.http.get(format!("{}/v1/runs/{id}?wait={wait}", tm.api)))
            .header("taskmesh-min-seq", seq.to_string());
        async move {
            let started = std::time::Instant::now();
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<serde_json::Value>().await.unwrap(), started.elapsed())
        }
    };

    // Held until the run has ended: it cannot have succeeded before its step slept 0.5 s, and
    // the answer comes when it ends, long before the wait is over.
    let (id, seq) = submit(serde_json::json!({"name": "w", "steps": [{"id": "a", "run": "sleep 0.5"}]})).await;
    let (status, run, took) = read(id.clone(), seq, "30").await;
    assert_eq!(status, 200, "{run:#}");
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert!(took < Duration::from_secs(20), "woken by the end, not by the wait running out: {took:?}");
    // An ended run is answered at once.
    let (status, again, _) = read(id, seq, "30").await;
    assert_eq!((status, &again["status"]), (200, &run["status"]));

    // A run that does not end within the wait: the view as it is when the wait is over.
    let (id, seq) = submit(serde_json::json!({"name": "w", "steps": [{"id": "a", "run": "sleep 30"}]})).await;
    let (status, run, took) = read(id.clone(), seq, "1").await;
    assert_eq!(status, 200, "{run:#}");
    assert!(["queued", "running"].contains(&run["status"].as_str().unwrap()), "{run:#}");
    assert!(took >= Duration::from_secs(1), "held for the wait: {took:?}");
    // Ended by a cancel while a read waits: the read sees the end.
    let waiting = tokio::spawn(read(id.clone(), seq, "30"));
    let res = tm.auth(tm.http.post(format!("{}/v1/runs/{id}/cancel", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let (status, run, _) = waiting.await.unwrap();
    assert_eq!((status, run["status"].as_str().unwrap()), (200, "cancelled"), "{run:#}");

    // A wait that is not 0 to 60 seconds is a 400 problem.
    for bad in ["61", "soon", "-1"] {
        let res = tm.auth(tm.http.get(format!("{}/v1/runs/{id}?wait={bad}", tm.api))).send().await.unwrap();
        assert_eq!(res.status(), 400, "wait={bad}");
        assert_eq!(res.headers()["content-type"], "application/problem+json", "wait={bad}");
    }
    tm.finish().await;
}
