//! Tenant isolation and roles, route by route: another tenant's resources are 404 (or an empty
//! list), and each role gets exactly the verbs it should. The test reads the served OpenAPI
//! document and fails if any operation in it is not exercised here.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use taskmesh_testkit::eventually;

use crate::helpers::*;

const PLATFORM_KEY: &str = "platform-admin-key-for-tests";

struct Client<'a> {
    tm: &'a TestMesh,
    key: String,
}

impl Client<'_> {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.tm.http.request(method, format!("{}{path}", self.tm.api));
        if !self.key.is_empty() {
            req = req.bearer_auth(&self.key);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// One row of the role matrix: a route (as the spec names it), a concrete call, and the
/// status each role gets.
struct Case {
    method: Method,
    route: &'static str,
    path: String,
    body: Option<Value>,
    viewer: u16,
    operator: u16,
    admin: u16,
}

fn case(method: Method, route: &'static str, path: impl Into<String>, body: Option<Value>, want: [u16; 3]) -> Case {
    Case { method, route, path: path.into(), body, viewer: want[0], operator: want[1], admin: want[2] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_are_isolated_and_roles_hold_on_every_route() {
    let tm = spawn_with(&Svc::ALL, |s| s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY))).await;
    let platform = Client { tm: &tm, key: PLATFORM_KEY.into() };
    let a = Client { tm: &tm, key: tm.key.clone() };
    let anonymous = Client { tm: &tm, key: String::new() };

    // The platform administrator creates tenant B; tenant keys cannot.
    assert_eq!(a.call(Method::POST, "/v1/tenants", Some(json!({"id": "beta", "name": "Beta"}))).await.0, 401);
    let (status, beta) = platform.call(Method::POST, "/v1/tenants", Some(json!({"id": "beta", "name": "Beta"}))).await;
    assert_eq!(status, 201, "{beta}");
    assert_eq!(platform.call(Method::POST, "/v1/tenants", Some(json!({"id": "beta", "name": "Beta"}))).await.0, 409);
    // A tenant whose creation's first key was never issued (the call failed after creating
    // it): a second call issues it; then a third is a conflict.
    let ingest = taskmesh_ingest::IngestClient::new(tm.bus.clone());
    let keyless = taskmesh_events::command::CreateTenant { tenant_id: "keyless".into(), name: "K".into() };
    ingest.create_tenant(&keyless).await.unwrap();
    let again = || platform.call(Method::POST, "/v1/tenants", Some(json!({"id": "keyless", "name": "K"})));
    let (status, issued) = again().await;
    assert_eq!(status, 201, "{issued}");
    assert!(issued["admin_key"].as_str().is_some_and(|k| k.starts_with("tm_")), "{issued}");
    assert_eq!(again().await.0, 409);
    tm.wait_projected().await;
    let (status, tenants) = platform.call(Method::GET, "/v1/tenants", None).await;
    assert_eq!(status, 200);
    assert!(tenants["items"].as_array().unwrap().iter().any(|t| t["id"] == "beta"));
    let b = Client { tm: &tm, key: beta["admin_key"].as_str().unwrap().into() };

    // Tenant A's resources: keys, a run, a stored workflow with an event trigger, a schedule,
    // a secret, a webhook endpoint and a repository connection.
    let (_, viewer) = a.call(Method::POST, "/v1/keys", Some(json!({"role": "viewer"}))).await;
    let (_, operator) = a.call(Method::POST, "/v1/keys", Some(json!({"role": "operator"}))).await;
    let (_, doomed) = a.call(Method::POST, "/v1/keys", Some(json!({"role": "viewer", "name": "to revoke"}))).await;
    let viewer_key = Client { tm: &tm, key: viewer["key"].as_str().unwrap().into() };
    let operator_key = Client { tm: &tm, key: operator["key"].as_str().unwrap().into() };
    let run = tm.submit("name: mine\nsteps:\n  - {id: a, run: 'echo hi'}\n").await;
    tm.wait_run(run, Duration::from_secs(30)).await;
    let wf =
        json!({"name": "wf", "on": {"events": [{"type": "com.example.iso"}]}, "steps": [{"id": "a", "uses": "noop"}]});
    assert_eq!(a.call(Method::PUT, "/v1/workflows/wf", Some(wf.clone())).await.0, 201);
    let (_, schedule) =
        a.call(Method::POST, "/v1/schedules", Some(json!({"cron": "0 0 1 1 *", "workflow": "wf"}))).await;
    let schedule = schedule["id"].as_str().unwrap().to_string();
    assert_eq!(a.call(Method::PUT, "/v1/secrets/A_SECRET", Some(json!({"value": "x"}))).await.0, 204);
    let (status, endpoint) =
        a.call(Method::POST, "/v1/webhook-endpoints", Some(json!({"url": "http://127.0.0.1:9/a"}))).await;
    assert_eq!(status, 201);
    let endpoint = endpoint["id"].as_str().unwrap().to_string();
    let repo = json!({"forge": "github", "repository": "o/r", "secret": "12345678", "workflow": wf});
    let (status, connection) = a.call(Method::POST, "/v1/repo-connections", Some(repo.clone())).await;
    assert_eq!(status, 201);
    let connection = connection["id"].as_str().unwrap().to_string();
    tm.wait_projected().await;

    // Tenant B sees none of it: 404 on each of A's resources, whatever the verb.
    let not_found = [
        (Method::GET, format!("/v1/runs/{run}"), None),
        (Method::POST, format!("/v1/runs/{run}/cancel"), Some(json!({}))),
        (Method::POST, format!("/v1/runs/{run}/rerun"), Some(json!({"from": "failed"}))),
        (Method::GET, format!("/v1/runs/{run}/steps/a/logs"), None),
        (Method::GET, format!("/v1/runs/{run}/steps/a/logs?follow=true"), None),
        (Method::GET, format!("/v1/runs/{run}/events"), None),
        (Method::GET, "/v1/workflows/wf".to_string(), None),
        (Method::GET, "/v1/workflows/wf/versions".to_string(), None),
        (Method::POST, "/v1/runs".to_string(), Some(json!({"workflow": "wf"}))),
        (Method::GET, format!("/v1/schedules/{schedule}"), None),
        (Method::POST, format!("/v1/schedules/{schedule}/pause"), None),
        (Method::POST, format!("/v1/schedules/{schedule}/resume"), None),
        (Method::PATCH, format!("/v1/schedules/{schedule}"), Some(json!({"cron": "0 0 2 1 *"}))),
        (Method::POST, format!("/v1/schedules/{schedule}/trigger"), None),
        (
            Method::POST,
            format!("/v1/schedules/{schedule}/backfill"),
            Some(json!({"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"})),
        ),
        (Method::DELETE, format!("/v1/schedules/{schedule}"), None),
        (Method::DELETE, "/v1/secrets/A_SECRET".to_string(), None),
        (Method::DELETE, format!("/v1/keys/{}", viewer["id"].as_str().unwrap()), None),
        (Method::GET, format!("/v1/webhook-endpoints/{endpoint}/failed-deliveries"), None),
        (Method::POST, format!("/v1/webhook-endpoints/{endpoint}/failed-deliveries/m/retry"), None),
        (Method::POST, format!("/v1/webhook-endpoints/{endpoint}/enable"), None),
        (Method::POST, format!("/v1/webhook-endpoints/{endpoint}/failed-deliveries/retry"), None),
        (Method::PATCH, format!("/v1/webhook-endpoints/{endpoint}"), Some(json!({"event_types": []}))),
        (Method::POST, format!("/v1/webhook-endpoints/{endpoint}/rotate-secret"), None),
        (Method::DELETE, format!("/v1/webhook-endpoints/{endpoint}"), None),
        (Method::PATCH, format!("/v1/repo-connections/{connection}"), Some(json!({"branches": ["x"]}))),
        (Method::DELETE, format!("/v1/repo-connections/{connection}"), None),
    ];
    for (method, path, body) in not_found {
        let (status, problem) = b.call(method.clone(), &path, body).await;
        assert_eq!(status, 404, "{method} {path} as another tenant: {problem}");
        assert_eq!(problem["type"], "https://taskmesh.dev/problems/not-found");
    }
    // A batch naming A's stored workflow starts nothing: its one run is refused as not found.
    let (status, batch) = b.call(Method::POST, "/v1/runs/batch", Some(json!({"runs": [{"workflow": "wf"}]}))).await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!((batch["accepted"].clone(), batch["rejected"].clone()), (json!(0), json!(1)), "{batch}");
    assert_eq!(batch["runs"][0]["problem"]["type"], "https://taskmesh.dev/problems/not-found", "{batch}");
    // Its lists hold nothing of A's.
    for path in
        ["/v1/runs", "/v1/workflows", "/v1/schedules", "/v1/secrets", "/v1/webhook-endpoints", "/v1/repo-connections"]
    {
        let (status, page) = b.call(Method::GET, path, None).await;
        assert_eq!(status, 200);
        assert_eq!(page["items"], json!([]), "{path} lists nothing of another tenant's");
    }
    let (_, keys) = b.call(Method::GET, "/v1/keys", None).await;
    assert_eq!(keys["items"].as_array().unwrap().len(), 1, "B sees only its own key");
    let (_, audit) = b.call(Method::GET, "/v1/audit", None).await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == "platform-admin" || e["key_id"] == beta["admin_key_id"]),
        "B's audit log holds only B's calls: {audit}"
    );
    let (_, executors) = b.call(Method::GET, "/v1/executors", None).await;
    assert!(executors["pools"].as_array().unwrap().iter().all(|p| p["queued"] == 0), "{executors}");
    // B's events trigger none of A's workflows.
    let event = json!({"specversion": "1.0", "id": "iso-1", "source": "/b", "type": "com.example.iso"});
    let res = tm
        .http
        .post(format!("{}/v1/events", tm.api))
        .bearer_auth(&b.key)
        .header("content-type", "application/cloudevents+json")
        .body(event.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.json::<Value>().await.unwrap()["runs"], json!([]));
    // A tenant's name for a workflow is its own: B storing `wf` leaves A's untouched.
    assert_eq!(
        b.call(Method::PUT, "/v1/workflows/wf", Some(json!({"name": "wf", "steps": [{"id": "b", "run": "true"}]})))
            .await
            .0,
        201
    );
    tm.wait_projected().await;
    let (_, mine) = a.call(Method::GET, "/v1/workflows/wf", None).await;
    assert_eq!(mine["version"], 1, "{mine}");
    assert_eq!(mine["definition"]["steps"][0]["id"], "a", "{mine}");

    // Roles: each route, each role.
    let wf2 = json!({"name": "wf", "steps": [{"id": "a", "uses": "noop"}]});
    let event = |id: &str| Some(json!({"specversion": "1.0", "id": id, "source": "/a", "type": "com.example.none"}));
    let cases = vec![
        case(Method::GET, "/v1/runs", "/v1/runs", None, [200, 200, 200]),
        case(Method::GET, "/v1/runs/{id}", format!("/v1/runs/{run}"), None, [200, 200, 200]),
        case(Method::GET, "/v1/runs/{id}/events", format!("/v1/runs/{run}/events"), None, [200, 200, 200]),
        case(
            Method::GET,
            "/v1/runs/{id}/steps/{step}/logs",
            format!("/v1/runs/{run}/steps/a/logs"),
            None,
            [200, 200, 200],
        ),
        case(Method::POST, "/v1/runs", "/v1/runs", Some(json!({"workflow": "wf"})), [403, 202, 202]),
        case(
            Method::POST,
            "/v1/runs/batch",
            "/v1/runs/batch",
            Some(json!({"runs": [{"workflow": "wf"}]})),
            [403, 200, 200],
        ),
        case(
            Method::POST,
            "/v1/runs/{id}/rerun",
            format!("/v1/runs/{run}/rerun"),
            Some(json!({"from": "a"})),
            [403, 202, 202],
        ),
        case(Method::POST, "/v1/runs/{id}/cancel", format!("/v1/runs/{run}/cancel"), Some(json!({})), [403, 202, 202]),
        // Operators may send a run's commit status again (this run has no commit: a 409).
        case(
            Method::POST,
            "/v1/runs/{id}/commit-status",
            format!("/v1/runs/{run}/commit-status"),
            None,
            [403, 409, 409],
        ),
        case(Method::GET, "/v1/workflows", "/v1/workflows", None, [200, 200, 200]),
        case(Method::GET, "/v1/workflows/{name}", "/v1/workflows/wf", None, [200, 200, 200]),
        case(Method::GET, "/v1/workflows/{name}/versions", "/v1/workflows/wf/versions", None, [200, 200, 200]),
        case(Method::PUT, "/v1/workflows/{name}", "/v1/workflows/wf", Some(wf2.clone()), [403, 201, 201]),
        case(Method::POST, "/v1/events", "/v1/events", event("e1"), [403, 202, 202]),
        case(Method::GET, "/v1/schedules", "/v1/schedules", None, [200, 200, 200]),
        case(Method::GET, "/v1/schedules/{id}", format!("/v1/schedules/{schedule}"), None, [200, 200, 200]),
        case(
            Method::POST,
            "/v1/schedules",
            "/v1/schedules",
            Some(json!({"cron": "0 0 1 1 *", "workflow": "wf"})),
            [403, 201, 201],
        ),
        case(
            Method::POST,
            "/v1/schedules/{id}/pause",
            format!("/v1/schedules/{schedule}/pause"),
            None,
            [403, 202, 202],
        ),
        case(
            Method::POST,
            "/v1/schedules/{id}/resume",
            format!("/v1/schedules/{schedule}/resume"),
            None,
            [403, 202, 202],
        ),
        case(
            Method::PATCH,
            "/v1/schedules/{id}",
            format!("/v1/schedules/{schedule}"),
            Some(json!({"timezone": "Europe/Paris"})),
            [403, 200, 200],
        ),
        case(
            Method::POST,
            "/v1/schedules/{id}/trigger",
            format!("/v1/schedules/{schedule}/trigger"),
            None,
            [403, 202, 202],
        ),
        case(
            Method::POST,
            "/v1/schedules/{id}/backfill",
            format!("/v1/schedules/{schedule}/backfill"),
            Some(json!({"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"})),
            [403, 202, 202],
        ),
        // Last of the schedule's cases: the operator deletes it, the admin finds it deleted.
        case(Method::DELETE, "/v1/schedules/{id}", format!("/v1/schedules/{schedule}"), None, [403, 204, 204]),
        case(Method::GET, "/v1/secrets", "/v1/secrets", None, [200, 200, 200]),
        case(Method::PUT, "/v1/secrets/{name}", "/v1/secrets/X", Some(json!({"value": "x"})), [403, 403, 204]),
        case(Method::DELETE, "/v1/secrets/{name}", "/v1/secrets/X", None, [403, 403, 204]),
        case(Method::DELETE, "/v1/cache", "/v1/cache", None, [403, 200, 200]),
        case(Method::GET, "/v1/executors", "/v1/executors", None, [200, 200, 200]),
        case(Method::GET, "/v1/circuit-breakers", "/v1/circuit-breakers", None, [200, 200, 200]),
        case(Method::GET, "/v1/webhook-endpoints", "/v1/webhook-endpoints", None, [200, 200, 200]),
        case(
            Method::GET,
            "/v1/webhook-endpoints/{id}/failed-deliveries",
            format!("/v1/webhook-endpoints/{endpoint}/failed-deliveries"),
            None,
            [200, 200, 200],
        ),
        // Operators may send a failed delivery again (this one failed never: a 404).
        case(
            Method::POST,
            "/v1/webhook-endpoints/{id}/failed-deliveries/{message_id}/retry",
            format!("/v1/webhook-endpoints/{endpoint}/failed-deliveries/m/retry"),
            None,
            [403, 404, 404],
        ),
        case(
            Method::POST,
            "/v1/webhook-endpoints/{id}/failed-deliveries/retry",
            format!("/v1/webhook-endpoints/{endpoint}/failed-deliveries/retry"),
            None,
            [403, 200, 200],
        ),
        case(
            Method::POST,
            "/v1/webhook-endpoints/{id}/enable",
            format!("/v1/webhook-endpoints/{endpoint}/enable"),
            None,
            [403, 403, 200],
        ),
        case(
            Method::PATCH,
            "/v1/webhook-endpoints/{id}",
            format!("/v1/webhook-endpoints/{endpoint}"),
            Some(json!({"event_types": ["run.failed"]})),
            [403, 403, 200],
        ),
        case(
            Method::POST,
            "/v1/webhook-endpoints/{id}/rotate-secret",
            format!("/v1/webhook-endpoints/{endpoint}/rotate-secret"),
            None,
            [403, 403, 200],
        ),
        case(
            Method::POST,
            "/v1/webhook-endpoints",
            "/v1/webhook-endpoints",
            Some(json!({"url": "http://127.0.0.1:9/x"})),
            [403, 403, 201],
        ),
        case(Method::GET, "/v1/repo-connections", "/v1/repo-connections", None, [200, 200, 200]),
        case(Method::POST, "/v1/repo-connections", "/v1/repo-connections", Some(repo), [403, 403, 201]),
        case(
            Method::DELETE,
            "/v1/webhook-endpoints/{id}",
            format!("/v1/webhook-endpoints/{endpoint}"),
            None,
            [403, 403, 204],
        ),
        case(
            Method::PATCH,
            "/v1/repo-connections/{id}",
            format!("/v1/repo-connections/{connection}"),
            Some(json!({"branches": ["main"]})),
            [403, 403, 200],
        ),
        case(
            Method::DELETE,
            "/v1/repo-connections/{id}",
            format!("/v1/repo-connections/{connection}"),
            None,
            [403, 403, 204],
        ),
        case(Method::GET, "/v1/keys", "/v1/keys", None, [403, 403, 200]),
        case(Method::POST, "/v1/keys", "/v1/keys", Some(json!({"role": "viewer"})), [403, 403, 201]),
        case(
            Method::DELETE,
            "/v1/keys/{id}",
            format!("/v1/keys/{}", doomed["id"].as_str().unwrap()),
            None,
            [403, 403, 204],
        ),
        case(Method::GET, "/v1/audit", "/v1/audit", None, [403, 403, 200]),
        case(Method::GET, "/v1/whoami", "/v1/whoami", None, [200, 200, 200]),
        // The platform administrator's routes: no tenant key will do.
        case(Method::GET, "/v1/tenants", "/v1/tenants", None, [401, 401, 401]),
        case(Method::POST, "/v1/tenants", "/v1/tenants", Some(json!({"id": "gamma", "name": "G"})), [401, 401, 401]),
        // Open to all.
        case(Method::GET, "/healthz", "/healthz", None, [200, 200, 200]),
        case(Method::GET, "/readyz", "/readyz", None, [200, 200, 200]),
        case(Method::GET, "/metrics", "/metrics", None, [200, 200, 200]),
    ];
    let mut covered = BTreeSet::new();
    for c in &cases {
        covered.insert((c.method.to_string(), c.route.to_string()));
        for (who, client, want) in
            [("viewer", &viewer_key, c.viewer), ("operator", &operator_key, c.operator), ("admin", &a, c.admin)]
        {
            // Each mutating call gets a body of its own where one must be unique.
            let body = match (&c.body, c.route) {
                (Some(_), "/v1/events") => event(&format!("e-{who}")),
                (b, _) => b.clone(),
            };
            let (status, answer) = client.call(c.method.clone(), &c.path, body).await;
            assert_eq!(status, want, "{who}: {} {}: {answer}", c.method, c.path);
            if c.route == "/v1/runs/batch" && status == 200 {
                assert_eq!(answer["accepted"], 1, "{who}: the batch's run itself is accepted: {answer}");
            }
        }
        // Without a key, only the open routes answer.
        let open = matches!(c.route, "/healthz" | "/readyz" | "/metrics");
        let (status, _) = anonymous.call(c.method.clone(), &c.path, c.body.clone()).await;
        assert_eq!(status == 401, !open, "no key: {} {} -> {status}", c.method, c.path);
    }
    // The docs and the spec are open, and the docs work offline (their assets are ours).
    let (status, spec) = anonymous.call(Method::GET, "/openapi.json", None).await;
    assert_eq!(status, 200);
    let res = tm.http.get(format!("{}/docs/", tm.api)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let page = res.text().await.unwrap();
    assert!(page.contains("swagger-ui") && !page.contains("cdn") && !page.contains("unpkg"), "{page:.500}");
    let res = tm.http.get(format!("{}/docs/swagger-ui-bundle.js", tm.api)).send().await.unwrap();
    assert_eq!(res.status(), 200, "the bundle is served from the binary");

    // Every operation the spec lists was exercised above.
    let mut in_spec = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            in_spec.insert((method.to_uppercase(), path.clone()));
        }
    }
    let missing: Vec<_> = in_spec.difference(&covered).collect();
    assert!(missing.is_empty(), "routes in the spec but not in the matrix: {missing:?}");

    // A revoked key authenticates nothing.
    assert_eq!(a.call(Method::DELETE, &format!("/v1/keys/{}", viewer["id"].as_str().unwrap()), None).await.0, 204);
    tm.wait_projected().await;
    eventually("the revoked key to be refused", Duration::from_secs(5), || async {
        Ok((viewer_key.call(Method::GET, "/v1/runs", None).await.0 == 401).then_some(()))
    })
    .await
    .unwrap();
    let (_, keys) = a.call(Method::GET, "/v1/keys", None).await;
    assert!(keys["items"].as_array().unwrap().iter().any(|k| k["id"] == viewer["id"] && !k["revoked_at"].is_null()));
    tm.finish().await;
}
