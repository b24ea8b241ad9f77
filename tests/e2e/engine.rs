//! The workflow engine: a table of workflows in `tests/workflows/` with their expected
//! outcomes, plus retries' backoff and cancellation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use taskmesh_events::Event;
use taskmesh_testkit::eventually;

use crate::helpers::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[serde(default)]
    inputs: Value,
    expect: Expect,
    workflow: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    run: String,
    steps: BTreeMap<String, String>,
    #[serde(default)]
    attempts: BTreeMap<String, i64>,
    #[serde(default)]
    outputs: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    output: BTreeMap<String, String>,
    #[serde(default)]
    exit_codes: BTreeMap<String, i64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_workflow_in_the_table_ends_as_expected() {
    let tm = spawn_with(&Svc::ALL, |s| s.executor.slots = 8).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workflows");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 30, "the table has {} workflows", files.len());
    let mut runs = Vec::new();
    for file in &files {
        let case: Case = serde_yaml_ng::from_str(&std::fs::read_to_string(file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let inputs = if case.inputs.is_null() { serde_json::json!({}) } else { case.inputs.clone() };
        let res = tm
            .auth(tm.http.post(format!("{}/v1/runs", tm.api)))
            .json(&serde_json::json!({"workflow": case.workflow, "inputs": inputs}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202, "{}: {}", file.display(), res.text().await.unwrap());
        let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
        runs.push((file.file_name().unwrap().to_string_lossy().to_string(), case.expect, id));
    }
    for (name, expect, id) in runs {
        let run = tm.wait_run(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], expect.run, "{name}: {run:#}");
        assert_eq!(
            run["steps"].as_array().unwrap().len(),
            expect.steps.len(),
            "{name}: every step is listed in the expectation"
        );
        for (step_id, status) in &expect.steps {
            assert_eq!(step(&run, step_id)["status"], status.as_str(), "{name}: step {step_id}: {run:#}");
        }
        for (step_id, attempts) in &expect.attempts {
            let s = step(&run, step_id);
            assert_eq!(s["attempts"], *attempts, "{name}: attempts of {step_id}: {run:#}");
            assert_eq!(
                s["attempt_history"].as_array().unwrap().len() as i64,
                *attempts,
                "{name}: one record per attempt"
            );
        }
        for (step_id, outputs) in &expect.outputs {
            assert_eq!(
                step(&run, step_id)["outputs"],
                serde_json::to_value(outputs).unwrap(),
                "{name}: outputs of {step_id}"
            );
        }
        for (step_id, output) in &expect.output {
            assert_eq!(step(&run, step_id)["output"], output.as_str(), "{name}: output of {step_id}");
        }
        for (step_id, code) in &expect.exit_codes {
            assert_eq!(step(&run, step_id)["exit_code"], *code, "{name}: exit code of {step_id}");
        }
    }
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_keep_every_attempt_and_back_off_within_bounds() {
    let tm = spawn_mesh().await;
    let (initial, max) = (400u64, 700u64);
    let id = tm
        .submit(&format!(
            "name: backoff\nsteps:\n  - id: flaky\n    run: '[ \"$TASKMESH_ATTEMPT\" -ge 3 ] || exit 9'\n    retry: {{max_attempts: 3, initial_delay_ms: {initial}, max_delay_ms: {max}, multiplier: 2}}\n"
        ))
        .await;
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let history = step(&run, "flaky")["attempt_history"].as_array().unwrap().clone();
    let statuses: Vec<&str> = history.iter().map(|a| a["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["failed", "failed", "succeeded"], "a later attempt never erases an earlier one");
    assert_eq!(history[0]["exit_code"], 9);
    let events = tm.run_events(id).await;
    let failed: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepAttemptFailed(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 2);
    for (n, f) in failed.iter().enumerate() {
        let ceiling = (initial * 2u64.pow(n as u32)).min(max);
        assert!(
            (ceiling / 2..=ceiling).contains(&f.delay_ms),
            "retry {} delay {} within [{}, {ceiling}]",
            n + 1,
            f.delay_ms,
            ceiling / 2
        );
        // The next attempt did not start before its backoff was over.
        let next_start = ts(&history[n + 1], "started_at");
        let prev_end = ts(&history[n], "finished_at");
        assert!(next_start >= f.retry_at, "attempt {} started at {next_start}, before {}", n + 2, f.retry_at);
        assert!((next_start - prev_end).num_milliseconds() >= (ceiling / 2) as i64, "gap honours the backoff");
    }
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_kills_running_steps_and_ends_the_run_cancelled_quickly() {
    let tm = spawn_mesh().await;
    let marker = format!("{}.{}", 30, rand_digits());
    let id = tm
        .submit(&format!(
            "name: cancel-me\nsteps:\n  - {{id: long, run: 'sleep {marker}'}}\n  - {{id: never, needs: [long], run: 'true'}}\n  - {{id: also-long, run: 'sleep {marker}'}}\n"
        ))
        .await;
    eventually("both long steps to run", Duration::from_secs(30), || async {
        let (status, run) = tm.get_run(id).await;
        Ok((status == 200
            && step(&run, "long")["status"] == "running"
            && step(&run, "also-long")["status"] == "running")
            .then_some(()))
    })
    .await
    .unwrap();
    eventually("the steps' processes to run", Duration::from_secs(10), || async {
        Ok(sleeping(&marker).then_some(()))
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let res = tm
        .auth(tm.http.post(format!("{}/v1/runs/{id}/cancel", tm.api)))
        .json(&serde_json::json!({"reason": "changed my mind"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let run = tm.wait_run(id, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_eq!(run["status"], "cancelled", "{run:#}");
    // Under 2 s from the request to the run's end, by the log's clock (not the test's, which
    // also counts projection and polling on a loaded machine); loosely bounded as seen over HTTP.
    let events = tm.run_events(id).await;
    let requested = events
        .iter()
        .find(|e| matches!(e.event, Event::RunCancelRequested(_)))
        .expect("a RunCancelRequested event")
        .occurred_at;
    let cancelled =
        events.iter().find(|e| matches!(e.event, Event::RunCancelled(_))).expect("a RunCancelled event").occurred_at;
    let logged = (cancelled - requested).num_milliseconds();
    assert!(logged < 2000, "cancelled in {logged} ms (RunCancelRequested to RunCancelled)");
    assert!(took < Duration::from_secs(8), "cancelled in {took:?} as seen over HTTP");
    for s in ["long", "also-long", "never"] {
        assert_eq!(step(&run, s)["status"], "cancelled", "{run:#}");
    }
    assert!(!sleeping(&marker), "the killed processes are gone");
    assert_eq!(step(&run, "never")["attempts"], 0);
    // Cancelling again, or a finished run, changes nothing; another tenant's run is not found.
    let again = tm.auth(tm.http.post(format!("{}/v1/runs/{id}/cancel", tm.api))).send().await.unwrap();
    assert_eq!(again.status(), 202);
    let missing =
        tm.auth(tm.http.post(format!("{}/v1/runs/{}/cancel", tm.api, uuid::Uuid::now_v7()))).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tm.get_run(id).await.1["status"], "cancelled");
    tm.finish().await;
}

fn rand_digits() -> String {
    format!("{:06}", uuid::Uuid::now_v7().as_u128() % 1_000_000)
}

/// Whether a `sleep <marker>` process is alive.
fn sleeping(marker: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", &format!("sleep {marker}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_workflows_are_versioned_and_typed_inputs_are_checked_by_name() {
    let tm = spawn_mesh().await;
    let put = |yaml: String| {
        tm.auth(tm.http.put(format!("{}/v1/workflows/deploy", tm.api)))
            .header("content-type", "application/yaml")
            .body(yaml)
    };
    let def = |echo: &str| {
        format!(
            "name: deploy\ninputs:\n  env: {{type: string, enum: [staging, prod]}}\n  replicas: {{type: integer, minimum: 1, default: 2}}\nsteps:\n  - {{id: go, run: 'echo {echo} ${{{{ inputs.env }}}} x${{{{ inputs.replicas }}}}'}}\n"
        )
    };
    let v1: Value = put(def("v1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v1["version"], 1, "{v1}");
    let v2 = put(def("v2")).send().await.unwrap();
    assert_eq!(v2.status(), 201);
    let location = v2.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(location, format!("{}/v1/workflows/deploy?version=2", tm.api));
    assert_eq!(v2.json::<Value>().await.unwrap()["version"], 2);
    let wrong_name = put(def("v3").replace("name: deploy", "name: other")).send().await.unwrap();
    assert_eq!(wrong_name.status(), 422);
    let invalid = put("name: deploy\nsteps:\n  - {id: a, run: 'true', needs: [zz]}\n".into()).send().await.unwrap();
    assert_eq!(invalid.status(), 422);
    tm.wait_projected().await;
    assert_eq!(tm.get_json(&location).await["version"], 2, "the Location reads the stored version");

    let submit = |workflow: &str, inputs: Value| {
        tm.auth(tm.http.post(format!("{}/v1/runs", tm.api)))
            .json(&serde_json::json!({"workflow": workflow, "inputs": inputs}))
            .send()
    };
    let latest: Value = submit("deploy", serde_json::json!({"env": "prod"})).await.unwrap().json().await.unwrap();
    let pinned: Value =
        submit("deploy@1", serde_json::json!({"env": "staging", "replicas": 5})).await.unwrap().json().await.unwrap();
    let run = tm.wait_run(latest["id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(run["workflow_version"], 2);
    assert_eq!(run["inputs"], serde_json::json!({"env": "prod", "replicas": 2}), "defaults filled in");
    assert_eq!(step(&run, "go")["output"], "v2 prod x2\n");
    let run = tm.wait_run(pinned["id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(run["workflow_version"], 1);
    assert_eq!(step(&run, "go")["output"], "v1 staging x5\n");

    let bad = submit("deploy", serde_json::json!({"env": "dev", "replicas": 0})).await.unwrap();
    assert_eq!(bad.status(), 422);
    let problem: Value = bad.json().await.unwrap();
    assert_eq!(problem["type"], "https://taskmesh.dev/problems/invalid-input");
    let mut fields: Vec<String> =
        problem["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap().to_string()).collect();
    fields.sort();
    assert_eq!(fields, ["inputs.env", "inputs.replicas"]);
    let missing = submit("nope", serde_json::json!({})).await.unwrap();
    assert_eq!(missing.status(), 404);
    let no_version = submit("deploy@9", serde_json::json!({"env": "prod"})).await.unwrap();
    assert_eq!(no_version.status(), 404);

    let list: Value = tm.get_json(format!("{}/v1/workflows", tm.api)).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["version"], 2);
    let first: Value = tm.get_json(format!("{}/v1/workflows/deploy?version=1", tm.api)).await;
    assert_eq!(first["definition"]["steps"][0]["run"], "echo v1 ${{ inputs.env }} x${{ inputs.replicas }}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rerun_from_failed_keeps_succeeded_outputs_and_the_first_history() {
    let tm = spawn_mesh().await;
    let marker = std::env::temp_dir().join(format!("tm-rerun-{}", uuid::Uuid::now_v7()));
    let yaml = format!(
        "name: rerun\nsteps:\n  - {{id: build, run: 'echo built; echo artifact=abc-$RANDOM >> $TASKMESH_OUTPUT'}}\n  - {{id: flaky, needs: [build], run: '[ -f {m} ] || {{ touch {m}; exit 1; }}'}}\n  - {{id: deploy, needs: [flaky], run: 'echo deploying ${{{{ steps.build.outputs.artifact }}}}'}}\n",
        m = marker.display()
    );
    let first_id = tm.submit(&yaml).await;
    let first = tm.wait_run(first_id, Duration::from_secs(30)).await;
    assert_eq!(first["status"], "failed", "{first:#}");
    let artifact = step(&first, "build")["outputs"]["artifact"].as_str().unwrap().to_string();

    let rerun = |id: uuid::Uuid, from: &str| {
        tm.auth(tm.http.post(format!("{}/v1/runs/{id}/rerun", tm.api))).json(&serde_json::json!({"from": from})).send()
    };
    let res = rerun(first_id, "failed").await.unwrap();
    assert_eq!(res.status(), 202);
    let second_id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    let second = tm.wait_run(second_id, Duration::from_secs(30)).await;
    assert_eq!(second["status"], "succeeded", "{second:#}");
    let build = step(&second, "build");
    assert_eq!(build["status"], "succeeded");
    assert_eq!(build["attempts"], 0, "build was reused, not run again");
    assert_eq!(build["outputs"]["artifact"], artifact.as_str());
    assert!(build["reason"].as_str().unwrap().contains(&first_id.to_string()));
    assert_eq!(step(&second, "deploy")["output"], format!("deploying {artifact}\n"), "reused outputs flow downstream");
    assert_eq!(second["trigger"]["kind"], "rerun");
    // The first run's history is untouched.
    let again = tm.get_run(first_id).await.1;
    assert_eq!(again["status"], "failed");
    assert_eq!(step(&again, "flaky")["attempt_history"][0]["status"], "failed");

    // From a step: it and what follows run again; the rest is reused.
    let third_id = rerun(second_id, "deploy").await.unwrap().json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let third = tm.wait_run(third_id, Duration::from_secs(30)).await;
    assert_eq!(third["status"], "succeeded");
    assert_eq!(step(&third, "flaky")["attempts"], 0);
    assert_eq!(step(&third, "deploy")["attempts"], 1);
    assert_eq!(step(&third, "deploy")["output"], format!("deploying {artifact}\n"));

    assert_eq!(rerun(third_id, "failed").await.unwrap().status(), 409, "nothing failed");
    assert_eq!(rerun(third_id, "nope").await.unwrap().status(), 400);
    assert_eq!(rerun(uuid::Uuid::now_v7(), "failed").await.unwrap().status(), 404);
    let _ = std::fs::remove_file(marker);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_runs_start_no_step_before_not_before() {
    let tm = spawn_mesh().await;
    let not_before = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let res = tm
        .auth(tm.http.post(format!("{}/v1/runs", tm.api)))
        .json(&serde_json::json!({"workflow": {"name": "later", "steps": [{"id": "a", "run": "true"}]}, "not_before": not_before}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
    assert!(ts(step(&run, "a"), "started_at") >= not_before, "{run:#}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_submits_each_run_on_its_own_and_is_refused_whole_only_when_malformed() {
    let tm = spawn_with(&Svc::ALL, |s| s.executor.slots = 4).await;
    let url = format!("{}/v1/runs/batch", tm.api);
    let post = |body: Value| {
        let req = tm.auth(tm.http.post(&url)).json(&body);
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let ok = |name: &str| serde_json::json!({"name": name, "steps": [{"id": "a", "run": "echo hi"}]});
    let cyclic = serde_json::json!({"name": "bad", "steps": [
        {"id": "a", "needs": ["b"], "run": "true"}, {"id": "b", "needs": ["a"], "run": "true"}]});
    let batch = serde_json::json!({"runs": [
        {"workflow": ok("one"), "labels": {"batch": "b1"}},
        {"workflow": cyclic},
        {"workflow": ok("three"), "idempotency_key": "batch-k1", "priority": 5},
    ]});
    let (status, first) = post(batch.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        (first["accepted"].clone(), first["rejected"].clone()),
        (serde_json::json!(2), serde_json::json!(1)),
        "{first}"
    );
    let runs = first["runs"].as_array().unwrap();
    assert_eq!(runs.iter().map(|r| r["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2], "in order");
    assert!(runs[1]["run"].is_null(), "{first}");
    assert_eq!(runs[1]["problem"]["type"], "https://taskmesh.dev/problems/invalid-workflow", "{first}");
    assert_eq!(runs[1]["problem"]["status"], 422, "{first}");
    let id = |r: &Value| -> uuid::Uuid { r["run"]["id"].as_str().unwrap().parse().unwrap() };
    for r in [&runs[0], &runs[2]] {
        assert!(r["problem"].is_null(), "{first}");
        assert_eq!(r["run"]["status"], "queued");
        assert_eq!(r["run"]["duplicate"], false);
        assert!(r["run"]["seq"].as_u64().unwrap() > 0);
    }
    for r in [&runs[0], &runs[2]] {
        let run = tm.wait_run(id(r), Duration::from_secs(30)).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
    }
    let (_, labelled) = {
        let res = tm.auth(tm.http.get(format!("{}/v1/runs?label=batch=b1", tm.api))).send().await.unwrap();
        (res.status(), res.json::<Value>().await.unwrap())
    };
    assert_eq!(labelled["items"][0]["id"], runs[0]["run"]["id"], "the run keeps its labels: {labelled}");

    // Sent again: the run with an idempotency key is found, not started twice; the other is new.
    let (status, again) = post(batch).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["runs"][2]["run"]["id"], runs[2]["run"]["id"], "{again}");
    assert_eq!(again["runs"][2]["run"]["duplicate"], true, "{again}");
    assert_ne!(again["runs"][0]["run"]["id"], runs[0]["run"]["id"], "{again}");
    tm.wait_projected().await;
    let (_, three) = {
        let res = tm.auth(tm.http.get(format!("{}/v1/runs?workflow=three", tm.api))).send().await.unwrap();
        (res.status(), res.json::<Value>().await.unwrap())
    };
    assert_eq!(three["items"].as_array().unwrap().len(), 1, "one run of the keyed workflow: {three}");

    // Refused whole: no runs, too many, an unknown field, not JSON.
    let noop = serde_json::json!({"workflow": ok("n")});
    let too_many: Vec<Value> = std::iter::repeat_n(noop.clone(), 101).collect();
    for (body, needle) in [
        (serde_json::json!({"runs": []}), "1 to 100 runs, not 0"),
        (serde_json::json!({"runs": too_many}), "1 to 100 runs, not 101"),
        (serde_json::json!({"runs": [noop.clone()], "extra": 1}), "extra"),
        (serde_json::json!({"runs": [{"workflow": ok("n"), "bogus": true}]}), "bogus"),
    ] {
        let (status, problem) = post(body).await;
        assert_eq!(status, 400, "{problem}");
        assert_eq!(problem["type"], "https://taskmesh.dev/problems/bad-request", "{problem}");
        assert!(problem["detail"].as_str().unwrap().contains(needle), "{needle}: {problem}");
    }
    let res =
        tm.auth(tm.http.post(&url)).header("content-type", "application/yaml").body("runs: []").send().await.unwrap();
    assert_eq!(res.status(), 415);
    tm.finish().await;
}
