//! Step kinds (http, llm, container, sleep), labels and sandboxing, through the whole mesh.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};
use taskmesh_events::Event;
use taskmesh_testkit::eventually;

use crate::helpers::*;

/// Serves `router` on a free local port; returns its base URL.
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

async fn set_secret(tm: &TestMesh, name: &str, value: &str) {
    let res = tm
        .auth(tm.http.put(format!("{}/v1/secrets/{name}", tm.api)))
        .json(&json!({"value": value}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    tm.wait_projected().await;
}

/// Submits and expects a 422 naming `field`.
async fn rejected(tm: &TestMesh, yaml: &str, field: &str) {
    let res = tm
        .auth(tm.http.post(format!("{}/v1/runs", tm.api)))
        .header("content-type", "application/yaml")
        .body(yaml.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert!(problem["errors"].as_array().unwrap().iter().any(|e| e["field"] == field), "{field} in {problem:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_steps_succeed_fail_honour_retry_after_time_out_and_reject_bad_config() {
    let token = format!("tok-{}", uuid::Uuid::now_v7().simple());
    let expected = format!("Bearer {token}");
    let server = serve(
        axum::Router::new()
            .route(
                "/hello/{name}",
                post(
                    move |headers: HeaderMap, axum::extract::Path(name): axum::extract::Path<String>, body: String| {
                        let expected = expected.clone();
                        async move {
                            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
                                return (StatusCode::UNAUTHORIZED, "bad token".to_string()).into_response();
                            }
                            let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                            ([("x-greeting", "yes")], Json(json!({"hello": name, "got": body}))).into_response()
                        }
                    },
                ),
            )
            .route("/busy", get(|| async { (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")], "busy") }))
            .route("/gone", get(|| async { (StatusCode::GONE, "gone") }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            ),
    )
    .await;
    let tm = spawn_mesh().await;
    set_secret(&tm, "API_TOKEN", &token).await;
    let id = tm
        .submit(&format!(
            r#"name: http-kinds
inputs:
  who: {{type: string, default: world}}
steps:
  - id: call
    secrets: [API_TOKEN]
    http:
      method: post
      url: "{server}/hello/${{{{ inputs.who }}}}"
      headers: {{Authorization: "Bearer ${{{{ secrets.API_TOKEN }}}}"}}
      body: {{n: 1, who: "${{{{ inputs.who }}}}"}}
  - id: use
    needs: [call]
    run: 'echo "status=${{{{ steps.call.outputs.status }}}}"'
  - id: gone_ok
    http: {{url: "{server}/gone", success: ["2xx", 410]}}
  - id: busy
    continue_on_error: true
    retry: {{max_attempts: 2, initial_delay_ms: 10, max_delay_ms: 20}}
    http: {{url: "{server}/busy"}}
  - id: slow
    continue_on_error: true
    timeout_seconds: 1
    http: {{url: "{server}/slow"}}
"#
        ))
        .await;
    let run = tm.wait_run(id, Duration::from_secs(60)).await;
    let call = step(&run, "call");
    assert_eq!(call["status"], "succeeded", "{run:#}");
    assert_eq!(call["outputs"]["status"], "200");
    let body: Value = serde_json::from_str(call["outputs"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"hello": "world", "got": {"n": 1, "who": "world"}}));
    let headers: Value = serde_json::from_str(call["outputs"]["headers"].as_str().unwrap()).unwrap();
    assert_eq!(headers["x-greeting"], "yes");
    assert_eq!(step(&run, "use")["output"], "status=200\n");
    assert_eq!(step(&run, "gone_ok")["status"], "succeeded", "410 was declared a success");
    let busy = step(&run, "busy");
    assert_eq!(busy["status"], "failed");
    assert_eq!(busy["attempts"], 2);
    assert!(busy["error"].as_str().unwrap().contains("HTTP 503"), "{busy:#}");
    let slow = step(&run, "slow");
    assert_eq!(slow["status"], "timed_out", "{slow:#}");
    // The retry waited for the server's Retry-After (1 s), not the policy's 20 ms.
    let events = tm.run_events(id).await;
    let delay = events
        .iter()
        .find_map(|e| match &e.event {
            Event::StepAttemptFailed(f) if f.step == "busy" => Some(f.delay_ms),
            _ => None,
        })
        .expect("the first attempt failed and was retried");
    assert!(delay >= 1000, "Retry-After honoured: {delay} ms");
    // The token reached the server (it answered 200) but is nowhere in the record.
    tm.wait_projected().await;
    let ns = tm.bus.namespace();
    assert!(!tm.stream_text(&ns.events_stream()).await.contains(&token));
    assert!(!tm.stream_text(&ns.logs_stream()).await.contains(&token));
    assert!(!tm.postgres_text().await.contains(&token));

    rejected(&tm, "name: x\nsteps:\n  - {id: a, http: {url: 'ftp://example.com'}}\n", "steps[0].http.url").await;
    rejected(&tm, "name: x\nsteps:\n  - {id: a, http: {url: 'http://x', method: BREW}}\n", "steps[0].http.method")
        .await;
    rejected(
        &tm,
        "name: x\nsteps:\n  - {id: a, http: {url: 'http://x/${{ secrets.UNDECLARED }}'}}\n",
        "steps[0].http.url",
    )
    .await;
    tm.finish().await;
}

/// A small OpenAI-compatible chat-completions server, for tests (no internet here): model
/// `echo` answers "echo: <prompt>" after `throttle` 429s, `missing` is a 400, `broke` is an
/// endless quota error.
fn openai_standin(key: String, throttle: u32, calls: Arc<AtomicU32>) -> axum::Router {
    axum::Router::new().route(
        "/v1/chat/completions",
        post(move |headers: HeaderMap, Json(req): Json<Value>| {
            let (key, calls) = (key.clone(), calls.clone());
            async move {
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(format!("Bearer {key}").as_str()) {
                    let e = json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}});
                    return (StatusCode::UNAUTHORIZED, Json(e)).into_response();
                }
                let model = req["model"].as_str().unwrap_or_default().to_string();
                match model.as_str() {
                    "broke" => {
                        let e = json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}});
                        return (StatusCode::TOO_MANY_REQUESTS, Json(e)).into_response();
                    }
                    "echo" => {}
                    _ => {
                        let e = json!({"error": {"message": format!("The model `{model}` does not exist"), "type": "invalid_request_error", "code": "model_not_found"}});
                        return (StatusCode::NOT_FOUND, Json(e)).into_response();
                    }
                }
                if calls.fetch_add(1, Ordering::SeqCst) < throttle {
                    let e = json!({"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}});
                    return (StatusCode::TOO_MANY_REQUESTS, [("retry-after-ms", "200")], Json(e)).into_response();
                }
                let messages = req["messages"].as_array().cloned().unwrap_or_default();
                let prompt = messages.iter().rev().find(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).unwrap_or("");
                let system = messages.iter().find(|m| m["role"] == "system").and_then(|m| m["content"].as_str()).unwrap_or("");
                let reply = format!("echo: {prompt} [{system}] t={}", req["temperature"]);
                Json(json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "echo-1",
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
                    "usage": {"prompt_tokens": prompt.split_whitespace().count(), "completion_tokens": 7, "total_tokens": prompt.split_whitespace().count() + 7}
                }))
                .into_response()
            }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn llm_steps_wait_out_rate_limits_report_usage_and_fail_clearly() {
    let key = format!("sk-{}", uuid::Uuid::now_v7().simple());
    let calls = Arc::new(AtomicU32::new(0));
    let server = serve(openai_standin(key.clone(), 2, calls.clone())).await;
    let tm = spawn_mesh().await;
    set_secret(&tm, "OPENAI_KEY", &key).await;
    let id = tm
        .submit(&format!(
            r#"name: llm-kinds
inputs:
  topic: {{type: string, default: databases}}
steps:
  - id: name
    run: echo "lang=rust" >> $TASKMESH_OUTPUT
  - id: ask
    needs: [name]
    llm:
      base_url: "{server}/v1"
      model: echo
      system: "be brief"
      prompt: "Summarise ${{{{ inputs.topic }}}} in ${{{{ steps.name.outputs.lang }}}}"
      temperature: 0.5
      max_tokens: 50
      api_key_secret: OPENAI_KEY
  - id: missing
    continue_on_error: true
    llm: {{base_url: "{server}/v1", model: nope, prompt: hi, api_key_secret: OPENAI_KEY}}
  - id: broke
    continue_on_error: true
    timeout_seconds: 2
    llm: {{base_url: "{server}/v1", model: broke, prompt: hi, api_key_secret: OPENAI_KEY}}
"#
        ))
        .await;
    let run = tm.wait_run(id, Duration::from_secs(60)).await;
    let ask = step(&run, "ask");
    assert_eq!(ask["status"], "succeeded", "{run:#}");
    assert_eq!(ask["attempts"], 1, "rate limits are waited out inside the attempt, not failed");
    assert_eq!(ask["outputs"]["reply"], "echo: Summarise databases in rust [be brief] t=0.5");
    assert_eq!(ask["outputs"]["prompt_tokens"], "4");
    assert_eq!(ask["outputs"]["total_tokens"], "11");
    assert_eq!(ask["outputs"]["finish_reason"], "stop");
    assert_eq!(ask["output"], "echo: Summarise databases in rust [be brief] t=0.5");
    assert!(calls.load(Ordering::SeqCst) >= 3, "two 429s, then the answer");
    let logs: Value = tm.get_json(format!("{}/v1/runs/{id}/steps/ask/logs", tm.api)).await;
    let waits =
        logs["lines"].as_array().unwrap().iter().filter(|l| l["line"].as_str().unwrap().contains("HTTP 429")).count();
    assert_eq!(waits, 2, "each wait is in the log: {logs:#}");
    let missing = step(&run, "missing");
    assert_eq!(missing["status"], "failed");
    assert!(missing["error"].as_str().unwrap().contains("does not exist"), "{missing:#}");
    let broke = step(&run, "broke");
    assert_eq!(broke["status"], "timed_out", "a quota error is waited out until the deadline: {broke:#}");
    tm.wait_projected().await;
    let ns = tm.bus.namespace();
    assert!(!tm.stream_text(&ns.events_stream()).await.contains(&key));
    assert!(!tm.postgres_text().await.contains(&key));

    rejected(
        &tm,
        "name: x\nsteps:\n  - {id: a, llm: {base_url: 'nope', model: m, prompt: p}}\n",
        "steps[0].llm.base_url",
    )
    .await;
    rejected(
        &tm,
        "name: x\nsteps:\n  - {id: a, llm: {base_url: 'http://x', model: m, prompt: p, temperature: 9}}\n",
        "steps[0].llm.temperature",
    )
    .await;
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn container_steps_fail_clearly_without_a_runtime() {
    let tm = spawn_with(&Svc::ALL, |s| s.executor.container_cli = "/nonexistent/docker".into()).await;
    let id = tm.submit("name: c\nsteps:\n  - {id: c, container: {image: 'alpine:3.20', command: [echo, hi]}}\n").await;
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed");
    assert!(step(&run, "c")["error"].as_str().unwrap().contains("no container runtime"), "{run:#}");
    let executors = tm.get_json(format!("{}/v1/executors", tm.api)).await;
    let labels = &executors["items"][0]["labels"];
    assert!(labels.get("os").is_some() && labels.get("container").is_none(), "{executors:#}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn container_steps_run_through_the_cli_with_workspace_env_and_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let standin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/container-cli-standin.sh");
    // The executor gives the CLI a clean environment: the log's path is baked into a wrapper.
    let cli = dir.path().join("docker");
    std::fs::write(&cli, format!("#!/bin/sh\nSTANDIN_LOG='{}' exec '{}' \"$@\"\n", log.display(), standin.display()))
        .unwrap();
    std::fs::set_permissions(&cli, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let tm = spawn_with(&Svc::ALL, |s| s.executor.container_cli = cli.display().to_string()).await;
    set_secret(&tm, "REGISTRY_TOKEN", "reg-s3cret-value").await;
    let id = tm
        .submit(
            r#"name: c
steps:
  - id: ok
    secrets: [REGISTRY_TOKEN]
    env: {GREETING: hello}
    network: false
    limits: {memory_mb: 256}
    container:
      image: alpine:3.20
      command: [sh, -c, 'echo "$GREETING from $(pwd) token=$REGISTRY_TOKEN"; echo v=1 >> $TASKMESH_OUTPUT']
  - id: bad
    continue_on_error: true
    container: {image: alpine:3.20, command: [sh, -c, 'exit 3']}
  - id: slow
    continue_on_error: true
    timeout_seconds: 1
    container: {image: alpine:3.20, command: [sleep, '30']}
"#,
        )
        .await;
    let run = tm.wait_run(id, Duration::from_secs(60)).await;
    let ok = step(&run, "ok");
    assert_eq!(ok["status"], "succeeded", "{run:#}");
    assert!(ok["output"].as_str().unwrap().starts_with("hello from "), "{ok:#}");
    assert!(ok["output"].as_str().unwrap().contains("token=***"));
    assert_eq!(ok["outputs"]["v"], "1");
    assert_eq!(step(&run, "bad")["status"], "failed");
    assert_eq!(step(&run, "bad")["exit_code"], 3);
    assert_eq!(step(&run, "slow")["status"], "timed_out");
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(!calls.contains("reg-s3cret-value"), "secret values never go on the command line");
    let ok_call = calls.split("--call--").find(|c| c.contains("GREETING")).unwrap();
    for arg in [
        "run",
        "--rm",
        "--workdir",
        "/workspace",
        "--network",
        "none",
        "--memory",
        "256m",
        "REGISTRY_TOKEN",
        "alpine:3.20",
    ] {
        assert!(ok_call.lines().any(|l| l == arg), "{arg} in {ok_call}");
    }
    assert!(ok_call.lines().any(|l| l.ends_with(":/workspace")), "the workspace is mounted: {ok_call}");
    let removed = calls.split("--call--").any(|c| c.lines().nth(1) == Some("rm") && c.contains("-slow-"));
    assert!(removed, "the timed-out container is removed: {calls}");
    let executors = tm.get_json(format!("{}/v1/executors", tm.api)).await;
    assert_eq!(executors["items"][0]["labels"]["container"], "docker");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sleep_and_noop_run_in_process_and_sleep_times_out() {
    let tm = spawn_mesh().await;
    let id = tm
        .submit("name: s\nsteps:\n  - {id: nap, sleep: 0.3}\n  - {id: long, sleep: 30, timeout_seconds: 1, continue_on_error: true}\n  - {id: n, uses: noop, needs: [nap]}\n")
        .await;
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    let nap = step(&run, "nap");
    assert_eq!(nap["status"], "succeeded");
    let took = ts(nap, "finished_at") - ts(nap, "started_at");
    assert!(took >= chrono::Duration::milliseconds(300), "{took}");
    assert_eq!(step(&run, "long")["status"], "timed_out");
    assert_eq!(step(&run, "n")["status"], "succeeded");
    rejected(&tm, "name: x\nsteps:\n  - {id: a, sleep: -2}\n", "steps[0].sleep").await;
    rejected(&tm, "name: x\nsteps:\n  - {id: a, sleep: 1, run: 'true'}\n", "steps[0]").await;
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_admitted_before_any_executor_is_heard_of_is_still_told_why_it_waits() {
    // No executor yet: the GPU step is admitted before any heartbeat could have arrived (as on
    // a loaded machine whose executors start late), so whether one can take it is judged once
    // an executor is heard of.
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Projector, Svc::Gateway], |_| {}).await;
    let id = tm.submit("name: gpu\nsteps:\n  - {id: train, runs_on: {gpu: nvidia}, run: 'echo trained'}\n").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let executor = taskmesh::mesh::Mesh::start(&tm.env.settings, tm.bus.clone(), None, &[Svc::Executor]).await.unwrap();
    eventually("the GPU step to wait with its reason", Duration::from_secs(20), || async {
        let (_, run) = tm.get_run(id).await;
        let train = run["steps"].as_array().into_iter().flatten().find(|s| s["id"] == "train");
        Ok(train.and_then(|s| s["wait_reason"].as_str()).filter(|r| r.contains("gpu=nvidia")).map(String::from))
    })
    .await
    .unwrap();
    executor.stop().await.unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_that_needs_a_gpu_waits_until_an_executor_with_one_joins() {
    let tm = spawn_mesh().await;
    let id = tm
        .submit("name: gpu\nsteps:\n  - {id: prep, run: 'echo cpu'}\n  - {id: train, needs: [prep], runs_on: {gpu: nvidia}, run: 'echo trained'}\n")
        .await;
    let run = eventually("the GPU step to wait with its reason", Duration::from_secs(30), || async {
        let (_, run) = tm.get_run(id).await;
        let train = run["steps"].as_array().into_iter().flatten().find(|s| s["id"] == "train");
        let reason = train.and_then(|s| s["wait_reason"].as_str()).unwrap_or("").to_string();
        Ok(reason.contains("gpu=nvidia").then_some(run))
    })
    .await
    .unwrap();
    assert_eq!(step(&run, "prep")["status"], "succeeded");
    assert_eq!(step(&run, "train")["status"], "queued");
    assert_eq!(step(&run, "train")["wait_reason"], "no live executor has labels gpu=nvidia");
    let listed = tm.get_json(format!("{}/v1/executors", tm.api)).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed:#}");
    let pool = listed["pools"].as_array().unwrap().iter().find(|p| p["runs_on"]["gpu"] == "nvidia").cloned();
    let pool = pool.unwrap_or_else(|| panic!("the GPU label set is listed: {listed:#}"));
    assert_eq!((pool["queued"].as_u64(), pool["executors"].as_u64()), (Some(1), Some(0)), "{listed:#}");
    // Still waiting a while later: the CPU executor never takes it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(step(&tm.get_run(id).await.1, "train")["status"], "queued");

    let mut settings = tm.env.settings.executor.clone();
    settings.id = Some("gpu-box-1".into());
    settings.labels.insert("gpu".into(), "nvidia".into());
    let gpu = taskmesh_executor::Executor::new(tm.bus.clone(), settings, None);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(gpu.run(stop.clone()));
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step(&run, "train")["output"], "trained\n");
    let started = tm.run_events(id).await.into_iter().find_map(|e| match e.event {
        Event::StepStarted(s) if s.step == "train" => Some(s.executor),
        _ => None,
    });
    assert_eq!(started.as_deref(), Some("gpu-box-1"));
    let listed = tm.get_json(format!("{}/v1/executors", tm.api)).await;
    let ids: Vec<&str> = listed["items"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"gpu-box-1"), "{listed:#}");
    stop.cancel();
    task.await.unwrap().unwrap();
    eventually("the stopped executor to leave the list", Duration::from_secs(10), || async {
        let listed = tm.get_json(format!("{}/v1/executors", tm.api)).await;
        Ok((!listed.to_string().contains("gpu-box-1")).then_some(()))
    })
    .await
    .unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_bubblewrap_a_step_cannot_see_the_executors_environment_or_write_outside_its_workspace() {
    assert!(
        std::process::Command::new("bwrap").arg("--version").output().is_ok_and(|o| o.status.success()),
        "bubblewrap is installed by ./scripts/test (apt-get install bubblewrap)"
    );
    let canary = format!("canary-{}", uuid::Uuid::now_v7().simple());
    // SAFETY: set before the mesh (and its threads) start; each test is its own process.
    unsafe { std::env::set_var("TM_EXECUTOR_CANARY", &canary) };
    let escape = format!("tm-escape-{}", uuid::Uuid::now_v7().simple());
    let tm = spawn_with(&Svc::ALL, |s| s.executor.sandbox = "bwrap".into()).await;
    let id = tm
        .submit(&format!(
            r#"name: sandbox
steps:
  - id: probe
    env: {{EXECUTOR_PID: "{pid}"}}
    run: |
      env | grep -c TM_EXECUTOR_CANARY || true
      cat /proc/$EXECUTOR_PID/environ >/dev/null 2>&1 && echo "read-environ" || echo "no-environ"
      ls /proc | grep -c '^[0-9]' >> $TASKMESH_WORKSPACE/procs
      touch /usr/{escape} 2>/dev/null && echo "wrote-usr" || echo "no-usr"
      touch /tmp/{escape} && echo "tmp-private"
      touch "$TASKMESH_WORKSPACE/../{escape}" && echo "parent-private"
      [ -d /root/.cargo ] && echo "sees-root" || echo "no-root"
      [ -e /etc/shadow ] || [ -e /etc/taskmesh ] && echo "sees-etc" || echo "no-etc-secrets"
      echo "tcp=$(wc -l < /proc/net/tcp)"
      echo inside > "$TASKMESH_WORKSPACE/file" && echo "workspace-ok"
      echo "procs=$(cat $TASKMESH_WORKSPACE/procs)" >> $TASKMESH_OUTPUT
"#,
            pid = std::process::id()
        ))
        .await;
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    let probe = step(&run, "probe");
    assert_eq!(probe["status"], "succeeded", "{run:#}");
    let lines: Vec<&str> = probe["output"].as_str().unwrap().lines().collect();
    assert_eq!(
        lines,
        [
            "0",
            "no-environ",
            "no-usr",
            "tmp-private",
            "parent-private",
            "no-root",
            "no-etc-secrets",
            "tcp=1",
            "workspace-ok"
        ],
        "{probe:#}"
    );
    let procs: u32 = probe["outputs"]["procs"].as_str().unwrap().parse().unwrap();
    assert!(procs < 10, "a private pid namespace shows only the step's processes: {procs}");
    assert!(!std::path::Path::new("/tmp").join(&escape).exists(), "/tmp writes stay inside");
    assert!(!std::env::temp_dir().join(&escape).exists());
    assert!(!std::path::Path::new("/usr").join(&escape).exists());
    let executors = tm.get_json(format!("{}/v1/executors", tm.api)).await;
    assert_eq!(executors["items"][0]["labels"]["sandbox"], "bwrap");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_steps_cached_response_spares_the_endpoint_until_its_templated_key_changes() {
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let server = serve(axum::Router::new().route(
        "/price",
        get(move || {
            let counted = counted.clone();
            async move { Json(json!({"call": counted.fetch_add(1, Ordering::SeqCst) + 1})) }
        }),
    ))
    .await;
    let tm = spawn_mesh().await;
    let priced = |day: &str| {
        format!(
            "name: priced\ninputs:\n  day: {{type: string, default: {day}}}\nsteps:\n  - id: price\n    http: {{url: '{server}/price'}}\n    cache: {{key: 'prices-${{{{ inputs.day }}}}', ttl_seconds: 600}}\n"
        )
    };
    let body = |run: &Value| step(run, "price")["outputs"]["body"].as_str().unwrap().to_string();
    let mut runs = Vec::new();
    for day in ["mon", "mon", "tue"] {
        let id = tm.submit(&priced(day)).await;
        let run = tm.wait_run(id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
        runs.push(run);
    }
    assert_eq!(body(&runs[1]), body(&runs[0]), "the second took the first's response");
    assert!(step(&runs[1], "price")["reason"].as_str().is_some_and(|r| r.starts_with("cached from run")));
    assert_ne!(body(&runs[2]), body(&runs[0]), "another day's key is another outcome");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the endpoint was called for monday once, and for tuesday");
    tm.finish().await;
}

/// An `llm` step's reply is kept and reused as any `cache:` step's: a repeated prompt costs no
/// call (its secret counted by name, so a new value of it still hits), another prompt or a
/// refreshing run calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_llm_steps_cached_reply_spares_the_api_until_its_prompt_changes() {
    let key = format!("sk-{}", uuid::Uuid::now_v7().simple());
    let calls = Arc::new(AtomicU32::new(0));
    let server = serve(openai_standin(key.clone(), 0, calls.clone())).await;
    let tm = spawn_mesh().await;
    set_secret(&tm, "OPENAI_KEY", &key).await;
    let asked = |topic: &str, refresh: bool| {
        let workflow = json!({"name": "summary", "inputs": {"topic": {"type": "string"}}, "steps": [{"id": "ask",
            "llm": {"base_url": format!("{server}/v1"), "model": "echo", "prompt": "Summarise ${{ inputs.topic }}",
                    "api_key_secret": "OPENAI_KEY"},
            "cache": {"ttl_seconds": 600}}]});
        let body = json!({"workflow": workflow, "inputs": {"topic": topic}, "refresh_cache": refresh});
        let tm = &tm;
        async move {
            let id = tm.submit_json_as(&tm.key, body).await;
            let run = tm.wait_run(id, Duration::from_secs(30)).await;
            assert_eq!(run["status"], "succeeded", "{run:#}");
            let ask = step(&run, "ask");
            (ask["outputs"]["reply"].as_str().unwrap().to_string(), ask["reason"].clone())
        }
    };
    let (first, reason) = asked("databases", false).await;
    assert_eq!((first.as_str(), &reason), ("echo: Summarise databases [] t=null", &Value::Null));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let (again, reason) = asked("databases", false).await;
    assert_eq!(again, first);
    assert!(reason.as_str().is_some_and(|r| r.starts_with("cached from run")), "{reason}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the kept reply, no call");
    // The secret counts by name: a new value of it is not another outcome.
    set_secret(&tm, "OPENAI_KEY", &format!("{key}-rotated")).await;
    let (rotated, _) = asked("databases", false).await;
    assert_eq!((rotated.as_str(), calls.load(Ordering::SeqCst)), (first.as_str(), 1));
    set_secret(&tm, "OPENAI_KEY", &key).await;
    let (other, _) = asked("queues", false).await;
    assert_eq!((other.as_str(), calls.load(Ordering::SeqCst)), ("echo: Summarise queues [] t=null", 2));
    let (_, reason) = asked("databases", true).await;
    assert_eq!((reason, calls.load(Ordering::SeqCst)), (Value::Null, 3), "a refreshing run calls again");
    tm.finish().await;
}
