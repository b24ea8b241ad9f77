//! Bad input gets a clear problem+json error, and appends nothing.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_submissions_are_problems_and_append_nothing() {
    let tm = spawn_with(&Svc::ALL, |s| s.gateway.body_limit_bytes = 16 * 1024).await;
    let before = tm.event_count().await;
    let url = format!("{}/v1/runs", tm.api);
    let json = |body: String| tm.auth(tm.http.post(&url)).header("content-type", "application/json").body(body);
    let yaml =
        |body: &str| tm.auth(tm.http.post(&url)).header("content-type", "application/yaml").body(body.to_string());
    let wf = |steps: &str| format!(r#"{{"workflow": {{"name": "x", "steps": {steps}}}}}"#);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str, &str)> = vec![
        ("malformed JSON", json("{\"workflow\": ".into()), 400, "bad-request", "malformed JSON"),
        (
            "unknown top-level field",
            json(r#"{"workflow": {"name": "x", "steps": [{"id": "a", "run": "true"}]}, "bogus": 1}"#.into()),
            400,
            "bad-request",
            "bogus",
        ),
        (
            "unknown step field",
            json(wf(r#"[{"id": "a", "run": "true", "colour": "red"}]"#)),
            422,
            "invalid-workflow",
            "colour",
        ),
        (
            "cycle in needs",
            json(wf(r#"[{"id": "a", "run": "true", "needs": ["b"]}, {"id": "b", "run": "true", "needs": ["a"]}]"#)),
            422,
            "invalid-workflow",
            "cycle",
        ),
        (
            "duplicate step ids",
            json(wf(r#"[{"id": "a", "run": "true"}, {"id": "a", "run": "true"}]"#)),
            422,
            "invalid-workflow",
            "duplicate step id",
        ),
        (
            "needs naming no step",
            json(wf(r#"[{"id": "a", "run": "true", "needs": ["ghost"]}]"#)),
            422,
            "invalid-workflow",
            "ghost",
        ),
        ("no steps", json(wf("[]")), 422, "invalid-workflow", "at least one step"),
        (
            "yaml cycle",
            yaml("name: x\nsteps:\n  - {id: a, run: 'true', needs: [a]}\n"),
            422,
            "invalid-workflow",
            "itself",
        ),
        (
            "priority out of range",
            yaml("name: x\nsteps:\n  - {id: a, run: 'true', priority: 1000}\n"),
            422,
            "invalid-workflow",
            "steps[0].priority: 1000 is out of range",
        ),
        (
            "bad rate limit",
            yaml("name: x\nsteps:\n  - {id: a, run: 'true', rate_limit: {key: 'no spaces', per_second: 0}}\n"),
            422,
            "invalid-workflow",
            "steps[0].rate_limit.per_second",
        ),
        (
            "bad concurrency group expression",
            yaml("name: x\nconcurrency: {group: 'deploy-${{ inputs. }}'}\nsteps:\n  - {id: a, run: 'true'}\n"),
            422,
            "invalid-workflow",
            "concurrency.group",
        ),
        (
            "unknown concurrency policy",
            yaml("name: x\nconcurrency: {group: g, policy: sometimes}\nsteps:\n  - {id: a, run: 'true'}\n"),
            422,
            "invalid-workflow",
            "sometimes",
        ),
        (
            "run priority out of range",
            json(r#"{"workflow": {"name": "x", "steps": [{"id": "a", "run": "true"}]}, "priority": -500}"#.into()),
            400,
            "bad-request",
            "priority: -500 is out of range",
        ),
        ("malformed YAML", yaml("name: [x\n"), 400, "bad-request", "YAML"),
        (
            "over the size limit",
            json(wf(&format!(r#"[{{"id": "a", "run": "{}"}}]"#, "x".repeat(20 * 1024)))),
            413,
            "payload-too-large",
            "size limit",
        ),
        (
            "wrong content type",
            tm.auth(tm.http.post(&url)).header("content-type", "text/plain").body("hi"),
            415,
            "unsupported-media-type",
            "text/plain",
        ),
        (
            "no key",
            tm.http.post(&url).header("content-type", "application/json").body(wf("[]")),
            401,
            "unauthorized",
            "Bearer",
        ),
        (
            "wrong key",
            tm.http.post(&url).bearer_auth("tm_not-a-key").header("content-type", "application/json").body(wf("[]")),
            401,
            "unauthorized",
            "Bearer",
        ),
        ("unknown route", tm.auth(tm.http.get(format!("{}/v1/nothing", tm.api))), 404, "not-found", "route"),
        ("wrong method", tm.auth(tm.http.delete(&url)), 405, "method-not-allowed", "Method"),
        (
            "another tenant's or no run",
            tm.auth(tm.http.get(format!("{url}/01a1ff9d-e3d1-70ad-970c-7b516d0686f7"))),
            404,
            "not-found",
            "run",
        ),
        ("not a run id", tm.auth(tm.http.get(format!("{url}/nope"))), 404, "not-found", "run"),
    ];
    for (what, req, status, slug, needle) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{what}");
        assert_eq!(res.headers()["content-type"], "application/problem+json", "{what}");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert_eq!(problem["type"], format!("https://taskmesh.dev/problems/{slug}"), "{what}: {problem}");
        assert_eq!(problem["status"], status, "{what}");
        assert!(problem["detail"].as_str().unwrap().contains(needle), "{what}: {problem}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(tm.event_count().await, before, "nothing was appended");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_cannot_see_each_others_runs() {
    let tm = spawn_mesh().await;
    let id = tm.submit("name: mine\nsteps:\n  - {id: a, uses: noop}\n").await;
    tm.wait_run(id, std::time::Duration::from_secs(30)).await;
    // A second tenant with its own admin key.
    let ingest = taskmesh_ingest::Ingest::new(tm.bus.clone());
    ingest
        .create_tenant(taskmesh_events::command::CreateTenant { tenant_id: "other".into(), name: "Other".into() })
        .await
        .unwrap();
    let (key, hash, prefix) = taskmesh_ingest::generate_api_key();
    ingest
        .create_api_key(taskmesh_events::command::CreateApiKey {
            tenant: "other".into(),
            key_id: uuid::Uuid::now_v7(),
            role: taskmesh_events::Role::Admin,
            key_hash: hash,
            prefix,
            name: None,
        })
        .await
        .unwrap();
    tm.wait_projected().await;
    let res = tm.http.get(format!("{}/v1/runs/{id}", tm.api)).bearer_auth(&key).send().await.unwrap();
    assert_eq!(res.status(), 404, "another tenant's run is not found, not forbidden");
    let page: serde_json::Value =
        tm.http.get(format!("{}/v1/runs", tm.api)).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["items"], serde_json::json!([]));
    let own: serde_json::Value = tm.get_json(format!("{}/v1/runs", tm.api)).await;
    assert_eq!(own["items"][0]["id"], id.to_string());
    // Keys are stored hashed only.
    let leaked: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE key_hash = $1 OR prefix = $1")
        .bind(&key)
        .fetch_one(&tm.pool)
        .await
        .unwrap();
    assert_eq!(leaked, 0);
    tm.finish().await;
}
