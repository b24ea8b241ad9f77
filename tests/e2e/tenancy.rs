//! Tenant isolation and roles, route by route: another tenant's resources are 404 (or an empty
//! list), and each role gets exactly the verbs it should.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

const PLATFORM_KEY: &str = "platform-admin-key-for-tests";

struct Client<'a> {
    tm: &'a TestMesh,
    key: String,
}

impl Client<'_> {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.tm.http.request(method, format!("{}{path}", self.tm.api)).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_are_isolated_and_roles_hold_on_every_route() {
    let tm = spawn_with(&Svc::ALL, |s| s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY))).await;
    let platform = Client { tm: &tm, key: PLATFORM_KEY.into() };
    let a = Client { tm: &tm, key: tm.key.clone() };

    // The platform administrator creates tenant B; tenant keys cannot.
    assert_eq!(a.call(Method::POST, "/v1/tenants", Some(json!({"id": "beta", "name": "Beta"}))).await.0, 401);
    let (status, beta) = platform.call(Method::POST, "/v1/tenants", Some(json!({"id": "beta", "name": "Beta"}))).await;
    assert_eq!(status, 201, "{beta}");
    assert_eq!(platform.call(Method::POST, "/v1/tenants", Some(json!({"id": "beta", "name": "Beta"}))).await.0, 409);
    let b = Client { tm: &tm, key: beta["admin_key"].as_str().unwrap().into() };

    // Tenant A's resources.
    let (_, viewer) = a.call(Method::POST, "/v1/keys", Some(json!({"role": "viewer"}))).await;
    let (_, operator) = a.call(Method::POST, "/v1/keys", Some(json!({"role": "operator"}))).await;
    let viewer_key = Client { tm: &tm, key: viewer["key"].as_str().unwrap().into() };
    let operator_key = Client { tm: &tm, key: operator["key"].as_str().unwrap().into() };
    let run = tm.submit("name: mine\nsteps:\n  - {id: a, run: 'echo hi'}\n").await;
    tm.wait_run(run, Duration::from_secs(30)).await;
    assert_eq!(
        a.call(Method::PUT, "/v1/workflows/wf", Some(json!({"name": "wf", "steps": [{"id": "a", "uses": "noop"}]})))
            .await
            .0,
        201
    );
    let (_, schedule) =
        a.call(Method::POST, "/v1/schedules", Some(json!({"cron": "0 0 1 1 *", "workflow": "wf"}))).await;
    let schedule = schedule["id"].as_str().unwrap().to_string();
    assert_eq!(a.call(Method::PUT, "/v1/secrets/A_SECRET", Some(json!({"value": "x"}))).await.0, 204);
    tm.wait_projected().await;

    // Tenant B sees none of it.
    let not_found = [
        (Method::GET, format!("/v1/runs/{run}"), None),
        (Method::POST, format!("/v1/runs/{run}/cancel"), Some(json!({}))),
        (Method::POST, format!("/v1/runs/{run}/rerun"), Some(json!({"from": "failed"}))),
        (Method::GET, format!("/v1/runs/{run}/steps/a/logs"), None),
        (Method::GET, "/v1/workflows/wf".to_string(), None),
        (Method::POST, "/v1/runs".to_string(), Some(json!({"workflow": "wf"}))),
        (Method::GET, format!("/v1/schedules/{schedule}"), None),
        (Method::POST, format!("/v1/schedules/{schedule}/pause"), None),
        (Method::DELETE, "/v1/secrets/A_SECRET".to_string(), None),
        (Method::DELETE, format!("/v1/keys/{}", viewer["id"].as_str().unwrap()), None),
    ];
    for (method, path, body) in not_found {
        let (status, problem) = b.call(method.clone(), &path, body).await;
        assert_eq!(status, 404, "{method} {path} as another tenant: {problem}");
        assert_eq!(problem["type"], "https://taskmesh.dev/problems/not-found");
    }
    for path in ["/v1/runs", "/v1/workflows", "/v1/schedules", "/v1/secrets"] {
        let (status, page) = b.call(Method::GET, path, None).await;
        assert_eq!(status, 200);
        assert_eq!(page["items"], json!([]), "{path} lists nothing of another tenant's");
    }
    let (_, keys) = b.call(Method::GET, "/v1/keys", None).await;
    assert_eq!(keys.as_array().unwrap().len(), 1, "B sees only its own key");

    // Roles: (verb, path, body, viewer, operator, admin).
    let wf = json!({"name": "wf", "steps": [{"id": "a", "uses": "noop"}]});
    let cases: Vec<(Method, String, Option<Value>, u16, u16, u16)> = vec![
        (Method::GET, "/v1/runs".into(), None, 200, 200, 200),
        (Method::GET, format!("/v1/runs/{run}"), None, 200, 200, 200),
        (Method::POST, "/v1/runs".into(), Some(json!({"workflow": "wf"})), 403, 202, 202),
        (Method::POST, format!("/v1/runs/{run}/cancel"), Some(json!({})), 403, 202, 202),
        (Method::PUT, "/v1/workflows/wf".into(), Some(wf.clone()), 403, 201, 201),
        (Method::POST, "/v1/schedules".into(), Some(json!({"cron": "0 0 1 1 *", "workflow": "wf"})), 403, 201, 201),
        (Method::POST, format!("/v1/schedules/{schedule}/pause"), None, 403, 202, 202),
        (Method::PUT, "/v1/secrets/X".into(), Some(json!({"value": "x"})), 403, 403, 204),
        (Method::GET, "/v1/secrets".into(), None, 200, 200, 200),
        (Method::GET, "/v1/keys".into(), None, 403, 403, 200),
        (Method::POST, "/v1/keys".into(), Some(json!({"role": "viewer"})), 403, 403, 201),
        (Method::POST, "/v1/webhook-endpoints".into(), Some(json!({"url": "http://127.0.0.1:9/x"})), 403, 403, 201),
        (
            Method::POST,
            "/v1/repo-connections".into(),
            Some(json!({"forge": "github", "repository": "o/r", "secret": "12345678", "workflow": wf})),
            403,
            403,
            201,
        ),
    ];
    for (method, path, body, v, o, ad) in cases {
        for (who, client, want) in [("viewer", &viewer_key, v), ("operator", &operator_key, o), ("admin", &a, ad)] {
            let (status, answer) = client.call(method.clone(), &path, body.clone()).await;
            assert_eq!(status, want, "{who}: {method} {path}: {answer}");
        }
    }

    // A revoked key authenticates nothing.
    assert_eq!(a.call(Method::DELETE, &format!("/v1/keys/{}", viewer["id"].as_str().unwrap()), None).await.0, 204);
    tm.wait_projected().await;
    assert_eq!(viewer_key.call(Method::GET, "/v1/runs", None).await.0, 401);
    let (_, keys) = a.call(Method::GET, "/v1/keys", None).await;
    assert!(keys.as_array().unwrap().iter().any(|k| k["id"] == viewer["id"] && !k["revoked_at"].is_null()));
    tm.finish().await;
}
