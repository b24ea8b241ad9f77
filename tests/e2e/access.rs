//! Rate limits under a burst, the audit log, keys' last use, and keys never in clear text.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use taskmesh_config::TenantLimits;
use taskmesh_testkit::eventually;
use tokio::io::AsyncReadExt;

use crate::helpers::*;

const PLATFORM_KEY: &str = "platform-admin-key-for-access-tests";

async fn call(tm: &TestMesh, key: &str, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut req = tm.http.request(method, format!("{}{path}", tm.api)).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

async fn new_tenant(tm: &TestMesh, id: &str) -> String {
    tm.new_tenant(PLATFORM_KEY, id).await
}

/// What a burst of `clients` concurrent clients, `each` requests apiece, got.
struct Burst {
    ok: usize,
    limited: usize,
    elapsed: Duration,
}

async fn burst(tm: &TestMesh, keys: &[String], clients: usize, each: usize) -> Burst {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let key = keys[c % keys.len()].clone();
        let http = tm.http.clone();
        let url = format!("{}/v1/runs?limit=1", tm.api);
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..each {
                let res = http.get(&url).bearer_auth(&key).send().await.unwrap();
                let status = res.status().as_u16();
                let headers = res.headers().clone();
                let body: Value = res.json().await.unwrap_or(Value::Null);
                answers.push((status, headers, body));
            }
            answers
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        for (status, headers, body) in t.await.unwrap() {
            for h in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy"] {
                assert!(headers.contains_key(h), "{status} without {h}");
            }
            match status {
                200 => ok += 1,
                429 => {
                    limited += 1;
                    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                    assert!((1..=2).contains(&retry), "Retry-After {retry}");
                    assert_eq!(headers["ratelimit-remaining"], "0");
                    assert_eq!(body["type"], "https://taskmesh.dev/problems/rate-limited", "{body}");
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    Burst { ok, limited, elapsed: start.elapsed() }
}

/// Tenant `default` gets a small bucket (20, refilled at 10/s) shared by its keys, whose own
/// buckets are large.
fn small_bucket_for_default(s: &mut taskmesh_config::Settings) {
    s.limits.tenants.insert(
        "default".into(),
        TenantLimits {
            requests_per_second: Some(10),
            request_burst: Some(20),
            key_requests_per_second: Some(1000),
            key_request_burst: Some(1000),
            ..Default::default()
        },
    );
}

/// The most a token bucket lets through in `elapsed`: its size, plus what refilled, plus one
/// for a token refilled while the last answer travelled.
fn bucket_allows(rate: u32, burst: u32, elapsed: Duration) -> usize {
    (burst as f64 + rate as f64 * elapsed.as_secs_f64()).floor() as usize + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_from_50_clients_is_held_to_the_buckets_and_another_tenant_is_unaffected() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway], |s| {
        s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY));
        small_bucket_for_default(s);
        // Tenant `beta`: a small bucket per key, a large one for the tenant.
        s.limits.tenants.insert(
            "beta".into(),
            TenantLimits { key_requests_per_second: Some(5), key_request_burst: Some(5), ..Default::default() },
        );
    })
    .await;
    let beta_key = new_tenant(&tm, "beta").await;
    let res = call(&tm, &beta_key, Method::POST, "/v1/keys", Some(json!({"role": "viewer"}))).await;
    let beta_viewer = res.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_string();
    // A key of beta's kept fresh for later.
    let res = call(&tm, &beta_key, Method::POST, "/v1/keys", Some(json!({"role": "viewer"}))).await;
    let fresh = res.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_string();
    // Another key of `default`, so the burst comes from two keys of one tenant.
    let res = call(&tm, &tm.key, Method::POST, "/v1/keys", Some(json!({"role": "viewer"}))).await;
    let second = res.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    tokio::time::sleep(Duration::from_secs(3)).await; // refill what set-up used

    // 50 clients of `default`, 6 requests each, while 10 clients of `beta` ask 2 each with
    // two keys: beta's per-key buckets hold 5 each.
    let keys_a = [tm.key.clone(), second];
    let keys_b = [beta_key.clone(), beta_viewer.clone()];
    let (a, b) = tokio::join!(burst(&tm, &keys_a, 50, 6), burst(&tm, &keys_b, 10, 2));
    assert_eq!(a.ok + a.limited, 300);
    assert!(a.ok >= 20, "the tenant's whole burst is served: {}", a.ok);
    assert!(
        a.ok <= bucket_allows(10, 20, a.elapsed),
        "{} requests served in {:?}: more than the tenant's bucket allows",
        a.ok,
        a.elapsed
    );
    assert!(a.limited > 0);
    assert_eq!(b.ok + b.limited, 20);
    assert!(b.ok <= 2 * bucket_allows(5, 5, b.elapsed), "beta's keys hold {} in {:?}", b.ok, b.elapsed);

    // Another tenant's requests are unaffected by `default`'s flood: a fresh beta key gets
    // every one of a small burst while `default` is still throttled.
    let (a2, b2) = tokio::join!(burst(&tm, &keys_a, 50, 2), burst(&tm, std::slice::from_ref(&fresh), 5, 1));
    assert!(a2.limited > 0, "default is still held back");
    assert_eq!((b2.ok, b2.limited), (5, 0), "beta is not");

    // After waiting as told, a throttled client gets through.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(call(&tm, &tm.key, Method::GET, "/v1/runs", None).await.status(), 200);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateways_of_one_mesh_share_a_tenants_rate_limit() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway], small_bucket_for_default).await;
    let second = taskmesh::mesh::Mesh::start(&tm.env.settings, tm.bus.clone(), Some(tm.pool.clone()), &[Svc::Gateway])
        .await
        .unwrap();
    let apis = [tm.api.clone(), format!("http://{}", second.gateway.unwrap())];
    // Each gateway counts two, and takes half of the tenant's bucket, as its RateLimit-Limit says.
    let limit_is = |api: String, limit: &'static str| {
        let tm = &tm;
        async move {
            eventually(&format!("{api} to take a bucket of {limit}"), Duration::from_secs(20), || async {
                let res = tm.http.get(format!("{api}/v1/runs?limit=1")).bearer_auth(&tm.key).send().await?;
                Ok(res.headers().get("ratelimit-limit").is_some_and(|v| v == limit).then_some(()))
            })
            .await
            .unwrap();
        }
    };
    limit_is(apis[0].clone(), "10").await;
    limit_is(apis[1].clone(), "10").await;
    tokio::time::sleep(Duration::from_secs(3)).await; // refill what that used

    // 40 requests at each gateway at once: together they serve what the tenant's one bucket
    // allows, each about half.
    let fire = |api: &str| {
        let calls = (0..40).map(|_| {
            let req = tm.http.get(format!("{api}/v1/runs?limit=1")).bearer_auth(&tm.key);
            async move { req.send().await.unwrap().status().as_u16() }
        });
        futures::future::join_all(calls)
    };
    let start = Instant::now();
    let (a, b) = tokio::join!(fire(&apis[0]), fire(&apis[1]));
    let elapsed = start.elapsed();
    let served = |s: &[u16]| s.iter().filter(|&&c| c == 200).count();
    assert!(a.iter().chain(&b).all(|&c| c == 200 || c == 429), "{a:?} {b:?}");
    let (a, b) = (served(&a), served(&b));
    assert!(a >= 10 && b >= 10, "each serves its half of the burst: {a} and {b}");
    assert!(
        a + b <= bucket_allows(10, 20, elapsed) + 1,
        "{a} + {b} served in {elapsed:?}: more than the tenant's bucket allows"
    );

    // Alone again, a gateway takes the whole bucket (within a count, 5 s).
    second.stop().await.unwrap();
    limit_is(apis[0].clone(), "20").await;
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_mutating_call_is_audited_and_keys_show_their_last_use() {
    let tm = spawn_with(&Svc::ALL, |s| {
        s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY));
        // The test's own address stands in for an ingress in front of the gateway.
        s.gateway.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let beta_key = new_tenant(&tm, "beta").await;
    let res = call(&tm, &tm.key, Method::POST, "/v1/keys", Some(json!({"role": "viewer", "name": "ro"}))).await;
    let viewer: Value = res.json().await.unwrap();
    let viewer_key = viewer["key"].as_str().unwrap().to_string();
    tm.wait_projected().await;

    let run = tm.submit("name: audited\nsteps:\n  - {id: a, run: 'echo hi'}\n").await;
    let res = tm
        .http
        .put(format!("{}/v1/secrets/TOKEN", tm.api))
        .bearer_auth(&tm.key)
        .header("user-agent", "audit-test/1")
        .header("x-forwarded-for", "6.6.6.6, 198.51.100.7")
        .json(&json!({"value": "s3cret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    // A refused call is recorded too.
    let res = call(&tm, &viewer_key, Method::POST, &format!("/v1/runs/{run}/cancel"), Some(json!({}))).await;
    assert_eq!(res.status(), 403);
    // Reads are not.
    assert_eq!(call(&tm, &viewer_key, Method::GET, "/v1/runs", None).await.status(), 200);

    let entries = eventually("the audit log", Duration::from_secs(20), || async {
        let res = call(&tm, &tm.key, Method::GET, "/v1/audit", None).await;
        let page: Value = res.json().await?;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        Ok((items.len() >= 4).then_some(items))
    })
    .await
    .unwrap();
    let find = |method: &str, route: &str| {
        entries
            .iter()
            .find(|e| e["method"] == method && e["route"] == route)
            .unwrap_or_else(|| panic!("no {method} {route} in {entries:#?}"))
            .clone()
    };
    let submitted = find("POST", "/v1/runs");
    assert_eq!(submitted["status"], 202);
    assert_eq!(submitted["ip"], "127.0.0.1");
    assert!(submitted["actor"].as_str().unwrap().starts_with("key:tm_"));
    let secret = find("PUT", "/v1/secrets/{name}");
    assert_eq!(secret["path"], "/v1/secrets/TOKEN");
    assert_eq!(secret["user_agent"], "audit-test/1");
    assert_eq!(secret["ip"], "198.51.100.7", "the address the trusted proxy heard from");
    let refused = find("POST", "/v1/runs/{id}/cancel");
    assert_eq!(refused["status"], 403);
    assert_eq!(refused["key_id"], viewer["id"]);
    find("POST", "/v1/keys");
    assert!(!entries.iter().any(|e| e["method"] == "GET"), "reads are not audited");
    let opened = entries.iter().find(|e| e["actor"] == "platform-admin");
    assert!(opened.is_none(), "tenant default was not created by the platform administrator");
    assert!(!serde_json::to_string(&entries).unwrap().contains("s3cret"), "no bodies in the audit log");

    // Newest first, paged by cursor; filtered by key.
    let res = call(&tm, &tm.key, Method::GET, "/v1/audit?limit=1", None).await;
    let page: Value = res.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let cursor = page["next_cursor"].as_i64().unwrap();
    let res = call(&tm, &tm.key, Method::GET, &format!("/v1/audit?limit=200&cursor={cursor}"), None).await;
    let rest: Value = res.json().await.unwrap();
    assert_eq!(rest["items"].as_array().unwrap().len(), entries.len() - 1);
    let res =
        call(&tm, &tm.key, Method::GET, &format!("/v1/audit?key_id={}", viewer["id"].as_str().unwrap()), None).await;
    let by_viewer: Value = res.json().await.unwrap();
    assert_eq!(by_viewer["items"].as_array().unwrap().len(), 1);

    // Only admins read it; another tenant sees only its own (its creation by the platform).
    assert_eq!(call(&tm, &viewer_key, Method::GET, "/v1/audit", None).await.status(), 403);
    let res = call(&tm, &beta_key, Method::GET, "/v1/audit", None).await;
    let beta: Value = res.json().await.unwrap();
    let beta_items = beta["items"].as_array().unwrap();
    assert_eq!(beta_items.len(), 1, "{beta}");
    assert_eq!(beta_items[0]["actor"], "platform-admin");
    assert_eq!(beta_items[0]["path"], "/v1/tenants");

    // Keys show when they were last used.
    let keys = eventually("last-used times", Duration::from_secs(20), || async {
        let keys: Value = call(&tm, &tm.key, Method::GET, "/v1/keys", None).await.json().await?;
        let all_used =
            keys["items"].as_array().is_some_and(|k| k.len() == 2 && k.iter().all(|k| !k["last_used_at"].is_null()));
        Ok(all_used.then_some(keys))
    })
    .await
    .unwrap();
    let used = chrono::DateTime::parse_from_rfc3339(keys["items"][0]["last_used_at"].as_str().unwrap()).unwrap();
    assert!((chrono::Utc::now() - used.to_utc()).num_seconds() < 60);
    tm.finish().await;
}

/// A tenant's whole audit log, newest first, read in pages of `limit`; each page's cursor is
/// before the last one's.
async fn audit_log(tm: &TestMesh, key: &str, limit: usize) -> anyhow::Result<Vec<Value>> {
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let after = cursor.map(|c| format!("&cursor={c}")).unwrap_or_default();
        let page: Value =
            call(tm, key, Method::GET, &format!("/v1/audit?limit={limit}{after}"), None).await.json().await?;
        seen.extend(page["items"].as_array().cloned().unwrap_or_default());
        let Some(next) = page["next_cursor"].as_i64() else { return Ok(seen) };
        assert!(cursor.is_none_or(|before| next < before), "cursor {next} after {cursor:?}");
        cursor = Some(next);
    }
}

/// The paths of the entries whose path starts with `prefix`, sorted.
fn paths_under(entries: &[Value], prefix: &str) -> Vec<String> {
    let mut paths: Vec<String> =
        entries.iter().filter_map(|e| e["path"].as_str()).filter(|p| p.starts_with(prefix)).map(String::from).collect();
    paths.sort();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_made_together_are_audited_together_each_once_and_paged_in_order() {
    let mesh = spawn_with(&Svc::ALL, |s| {
        s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY));
    })
    .await;
    let tm = &mesh;
    let beta = new_tenant(tm, "beta").await;
    // 80 calls at once, two tenants' interleaved: the gateway appends those that arrive while
    // an append is under way together, one event per tenant.
    let calls = (0..80).map(|i| {
        let (key, path) =
            if i % 2 == 0 { (&tm.key, format!("/v1/secrets/S{i}")) } else { (&beta, format!("/v1/secrets/B{i}")) };
        async move {
            let res = call(tm, key, Method::PUT, &path, Some(json!({"value": "v"}))).await;
            assert_eq!(res.status(), 204);
        }
    });
    futures::future::join_all(calls).await;
    let expected = |letter: &str, parity: usize| {
        let mut p: Vec<String> =
            (0..80).filter(|i| i % 2 == parity).map(|i| format!("/v1/secrets/{letter}{i}")).collect();
        p.sort();
        p
    };

    // Each tenant's log holds its own calls, each once, read whole one record a page.
    let default_log = eventually("default's audit log", Duration::from_secs(20), || async {
        let log = audit_log(tm, &tm.key, 1).await?;
        Ok((paths_under(&log, "/v1/secrets/").len() >= 40).then_some(log))
    })
    .await
    .unwrap();
    assert_eq!(paths_under(&default_log, "/v1/secrets/"), expected("S", 0));
    let beta_log = audit_log(tm, &beta, 7).await.unwrap();
    assert_eq!(paths_under(&beta_log, "/v1/secrets/"), expected("B", 1));
    let mut ids: Vec<&str> = default_log.iter().chain(&beta_log).map(|e| e["id"].as_str().unwrap()).collect();
    let all = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all, "each record has its own id");

    // Fewer events than records: calls shared appends.
    let (records, events): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (tenant_id, seq)) FROM audit_log WHERE path LIKE '/v1/secrets/%'",
    )
    .fetch_one(&tm.pool)
    .await
    .unwrap();
    assert_eq!(records, 80);
    assert!(events < records, "{events} events for {records} records: no call shared an append");

    // The commands themselves: a retried batch is recorded once; a bad one is refused whole;
    // one record (`record_audit`, what gateways sent before) is its event's part 0.
    let ingest = taskmesh_ingest::IngestClient::new(tm.bus.clone());
    let record = |path: &str| taskmesh_events::AuditedCall {
        id: uuid::Uuid::now_v7(),
        call: taskmesh_testkit::audit_record(path),
    };
    let batch = |records| taskmesh_events::command::RecordAudits { tenant: "default".into(), records };
    let twice = batch(vec![record("/retried/0"), record("/retried/1")]);
    let first = ingest.record_audits(&twice).await.unwrap();
    assert_eq!(ingest.record_audits(&twice).await.unwrap().seq, first.seq, "the retry is the same append");
    for bad in [vec![], vec![record("/ok"), record(&"x".repeat(2049))], (0..257).map(|_| record("/many")).collect()] {
        let problem = ingest.record_audits(&batch(bad)).await.unwrap_err();
        assert_eq!(problem.code, taskmesh_events::ErrorCode::BadRequest, "{problem:?}");
    }
    let single = record("/single");
    let cmd = taskmesh_events::command::RecordAudit { tenant: "default".into(), id: single.id, record: single.call };
    ingest.record_audit(&cmd).await.unwrap();
    tm.wait_projected().await;
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT path, part FROM audit_log WHERE path LIKE '/retried/%' OR path IN ('/single', '/ok', '/many') ORDER BY path",
    )
    .fetch_all(&tm.pool)
    .await
    .unwrap();
    let rows: Vec<(&str, i32)> = rows.iter().map(|(p, n)| (p.as_str(), *n)).collect();
    assert_eq!(rows, [("/retried/0", 0), ("/retried/1", 1), ("/single", 0)], "nothing of a refused batch");
    // Paged one record at a time, the two records of one event are both read, in order.
    let log = audit_log(tm, &tm.key, 1).await.unwrap();
    let newest: Vec<&str> = log.iter().take(3).map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(newest, ["/single", "/retried/1", "/retried/0"]);
    assert_eq!(log.len(), default_log.len() + 3);
    mesh.finish().await;
}

/// A free TCP port on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_never_stored_or_logged_in_clear_text() {
    // The gateway is a child process logging everything (trace) to a pipe we read; the rest of
    // the mesh runs here.
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Scheduler, Svc::Executor], |s| {
        s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY))
    })
    .await;
    let port = free_port();
    use secrecy::ExposeSecret;
    let mut child = tm
        .service_command()
        .args(["serve", "gateway"])
        .env("TASKMESH_POSTGRES__URL", tm.env.settings.postgres.url.expose_secret())
        .env("TASKMESH_GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
        .env("TASKMESH_GATEWAY__ADMIN_KEY", PLATFORM_KEY)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    for mut pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let log = log.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    let api = format!("http://127.0.0.1:{port}");
    eventually("the gateway child", Duration::from_secs(30), || async {
        Ok(tm.http.get(format!("{api}/readyz")).send().await.ok().filter(|r| r.status() == 200).map(|_| ()))
    })
    .await
    .unwrap();

    // Keys made every way there is, each then used for reads and writes.
    let res = tm
        .http
        .post(format!("{api}/v1/tenants"))
        .bearer_auth(PLATFORM_KEY)
        .json(&json!({"id": "gamma", "name": "Gamma"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let gamma = res.json::<Value>().await.unwrap()["admin_key"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    let mut keys = vec![tm.key.clone(), gamma.clone()];
    let mut issued = Vec::new();
    for role in ["admin", "operator", "viewer"] {
        let res = tm
            .http
            .post(format!("{api}/v1/keys"))
            .bearer_auth(&gamma)
            .json(&json!({"role": role}))
            .send()
            .await
            .unwrap();
        let body: Value = res.json().await.unwrap();
        issued.push(body["id"].as_str().unwrap().to_string());
        keys.push(body["key"].as_str().unwrap().to_string());
    }
    tm.wait_projected().await;
    for key in &keys {
        let res = tm.http.get(format!("{api}/v1/runs")).bearer_auth(key).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let res = tm
            .http
            .post(format!("{api}/v1/runs"))
            .bearer_auth(key)
            .header("content-type", "application/yaml")
            .body("name: k\nsteps:\n  - {id: a, run: 'echo ok'}\n")
            .send()
            .await
            .unwrap();
        assert!(matches!(res.status().as_u16(), 202 | 403), "{}", res.status());
    }
    // A revoked key, and a wrong one, are refused (and logged as refusals, not as keys).
    let res = tm.http.delete(format!("{api}/v1/keys/{}", issued[2])).bearer_auth(&gamma).send().await.unwrap();
    assert_eq!(res.status(), 204);
    tm.wait_projected().await;
    // The key was used above, so the gateway holds it looked up: the projector's announcement
    // of the revocation (moments after its commit) is what turns it away.
    eventually("the revoked key to be refused", Duration::from_secs(5), || async {
        let res = tm.http.get(format!("{api}/v1/runs")).bearer_auth(&keys[4]).send().await?;
        Ok((res.status() == 401).then_some(()))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.start_kill().unwrap();
    let _ = child.wait().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let log = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(log.contains("TRACE") || log.contains("DEBUG"), "the child logged at trace level: {log:.2000}");
    let rows = tm.postgres_text().await;
    let events = tm.stream_text(&tm.bus.namespace().events_stream()).await;
    assert!(rows.contains(&taskmesh_ingest::hash_api_key(&gamma)), "keys are stored as hashes");
    for key in keys.iter().chain([&PLATFORM_KEY.to_string()]) {
        // The whole key, and its secret part without the prefix shown in listings.
        let secret_part = &key[10.min(key.len())..];
        for (what, text) in [("the log", &log), ("Postgres", &rows), ("the event log", &events)] {
            assert!(!text.contains(secret_part), "a key is in {what} in clear text");
        }
    }
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_carry_entity_tags_and_an_unchanged_one_is_a_304() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway], |_| {}).await;
    let url = format!("{}/v1/workflows", tm.api);
    let first = tm.auth(tm.http.get(&url)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let tag = first.headers()["etag"].to_str().unwrap().to_string();
    assert!(tag.starts_with("W/\""), "{tag}");
    let again = tm.auth(tm.http.get(&url)).header("if-none-match", &tag).send().await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"], tag.as_str());
    assert!(again.bytes().await.unwrap().is_empty());

    let res = tm
        .auth(tm.http.put(format!("{url}/tagged")))
        .json(&json!({"name": "tagged", "steps": [{"id": "a", "uses": "noop"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    tm.wait_projected().await;
    let changed = tm.auth(tm.http.get(&url)).header("if-none-match", &tag).send().await.unwrap();
    assert_eq!(changed.status(), 200, "the list changed");
    assert_ne!(changed.headers()["etag"], tag.as_str());
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_refuse_what_is_over_them_with_a_clear_problem() {
    // No executor: submitted runs stay queued, so they count as not yet ended.
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Projector, Svc::Gateway], |s| {
        s.limits.tenants.insert(
            "default".into(),
            TenantLimits {
                max_active_runs: Some(2),
                max_workflows: Some(2),
                max_schedules: Some(1),
                max_webhook_endpoints: Some(1),
                max_steps_per_run: Some(3),
                max_payload_bytes: Some(2_000),
                ..Default::default()
            },
        );
    })
    .await;
    let submit = |n: usize| submit_steps(&tm, n);
    let quota = |body: &Value, needle: &str| {
        assert_eq!(body["type"], "https://taskmesh.dev/problems/quota-exceeded", "{body}");
        assert!(body["detail"].as_str().unwrap().contains(needle), "{body}");
    };
    // Steps per run.
    let res = submit(4).await;
    assert_eq!(res.status(), 403);
    quota(&res.json().await.unwrap(), "3 steps per run");
    // A batch is refused whole when the quota has no room for all of its runs.
    let one = json!({"workflow": {"name": "q", "steps": [{"id": "s0", "uses": "noop"}]}});
    let res = call(&tm, &tm.key, Method::POST, "/v1/runs/batch", Some(json!({"runs": [one, one, one]}))).await;
    assert_eq!(res.status(), 403);
    let body: Value = res.json().await.unwrap();
    quota(&body, "runs not yet ended");
    quota(&body, "room for 2 more; the batch has 3");
    // Runs not yet ended: two fit, the third does not.
    assert_eq!(submit(3).await.status(), 202);
    assert_eq!(submit(1).await.status(), 202);
    tm.wait_projected().await;
    let res = submit(1).await;
    assert_eq!(res.status(), 403);
    quota(&res.json().await.unwrap(), "runs not yet ended");
    // Stored workflows: two names fit; a new version of one of them is not a new name.
    let store = |name: &'static str, on: Value| store_workflow(&tm, name, on);
    let on = json!({"events": [{"type": "com.example.q"}]});
    assert_eq!(store("one", on.clone()).await.status(), 201);
    assert_eq!(store("two", on.clone()).await.status(), 201);
    let res = store("three", on.clone()).await;
    assert_eq!(res.status(), 403);
    quota(&res.json().await.unwrap(), "quota is 2");
    assert_eq!(store("one", on).await.status(), 201, "a new version of a stored name");
    tm.wait_projected().await;
    // An event that would start runs past the quota starts none and says why.
    let res = tm
        .auth(tm.http.post(format!("{}/v1/events", tm.api)))
        .header("content-type", "application/cloudevents+json")
        .body(json!({"specversion": "1.0", "id": "q1", "source": "/q", "type": "com.example.q"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let accepted: Value = res.json().await.unwrap();
    assert_eq!(accepted["runs"], json!([]), "{accepted}");
    assert!(accepted["errors"][0]["message"].as_str().unwrap().contains("runs not yet ended"), "{accepted}");
    // Schedules: one whose runs would have more steps than a run may is refused when created;
    // run by hand or backfilled past the runs not yet ended, nothing starts.
    let steps = |n: usize| (0..n).map(|i| json!({"id": format!("s{i}"), "uses": "noop"})).collect::<Vec<_>>();
    let yearly = |n| json!({"cron": "0 0 1 1 *", "workflow": {"name": "q", "steps": steps(n)}});
    let res = call(&tm, &tm.key, Method::POST, "/v1/schedules", Some(yearly(4))).await;
    assert_eq!(res.status(), 403);
    quota(&res.json().await.unwrap(), "3 steps per run");
    let res = call(&tm, &tm.key, Method::POST, "/v1/schedules", Some(yearly(1))).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    let res = call(&tm, &tm.key, Method::POST, &format!("/v1/schedules/{id}/trigger"), None).await;
    assert_eq!(res.status(), 403);
    quota(&res.json().await.unwrap(), "runs not yet ended");
    let range = json!({"from": "2020-01-01T00:00:00Z", "to": "2022-01-01T00:00:00Z"});
    let res = call(&tm, &tm.key, Method::POST, &format!("/v1/schedules/{id}/backfill"), Some(range)).await;
    assert_eq!(res.status(), 403);
    quota(&res.json().await.unwrap(), "runs not yet ended");
    // No such schedule is a 404 all the same, not the quota's 403.
    let unknown = uuid::Uuid::now_v7();
    let res = call(&tm, &tm.key, Method::POST, &format!("/v1/schedules/{unknown}/trigger"), None).await;
    assert_eq!(res.status(), 404);
    let range = json!({"from": "2020-01-01T00:00:00Z", "to": "2022-01-01T00:00:00Z"});
    let res = call(&tm, &tm.key, Method::POST, &format!("/v1/schedules/{unknown}/backfill"), Some(range)).await;
    assert_eq!(res.status(), 404);
    // Schedules and webhook endpoints: one of each fits; a deleted one no longer counts.
    let res = call(&tm, &tm.key, Method::POST, "/v1/schedules", Some(yearly(1))).await;
    assert_eq!(res.status(), 403);
    quota(&res.json().await.unwrap(), "1 schedules; its quota is 1");
    let endpoint = |n: u32| json!({"url": format!("http://127.0.0.1:9/{n}")});
    let res = call(&tm, &tm.key, Method::POST, "/v1/webhook-endpoints", Some(endpoint(1))).await;
    assert_eq!(res.status(), 201);
    let first = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let res = call(&tm, &tm.key, Method::POST, "/v1/webhook-endpoints", Some(endpoint(2))).await;
    assert_eq!(res.status(), 403);
    quota(&res.json().await.unwrap(), "1 webhook endpoints; its quota is 1");
    let res = call(&tm, &tm.key, Method::DELETE, &format!("/v1/webhook-endpoints/{first}"), None).await;
    assert!(res.status().is_success(), "{}", res.status());
    let res = call(&tm, &tm.key, Method::POST, "/v1/webhook-endpoints", Some(endpoint(3))).await;
    assert_eq!(res.status(), 201, "the deleted endpoint no longer counts");
    // A disabled endpoint still counts: it can be enabled again.
    let third = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    crate::integrations::disable_endpoint(&tm, &third, chrono::Duration::zero()).await;
    let res = call(&tm, &tm.key, Method::POST, "/v1/webhook-endpoints", Some(endpoint(4))).await;
    assert_eq!(res.status(), 403, "a disabled endpoint counts");
    quota(&res.json().await.unwrap(), "1 webhook endpoints; its quota is 1");
    let res = call(&tm, &tm.key, Method::DELETE, &format!("/v1/schedules/{id}"), None).await;
    assert!(res.status().is_success(), "{}", res.status());
    let res = call(&tm, &tm.key, Method::POST, "/v1/schedules", Some(yearly(1))).await;
    assert_eq!(res.status(), 201, "the deleted schedule no longer counts");
    tm.wait_projected().await;
    let scheduled: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE trigger->>'kind' = 'schedule'")
        .fetch_one(&tm.pool)
        .await
        .unwrap();
    assert_eq!(scheduled, 0, "no schedule's run started");
    // Payload bytes: a declared length over the quota, and a chunked body that runs past it.
    let big = "x".repeat(3_000);
    let res = call(&tm, &tm.key, Method::PUT, "/v1/secrets/BIG", Some(json!({"value": big}))).await;
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("2000 bytes"), "{body}");
    let status = chunked_put(&tm, "/v1/secrets/BIG", &json!({"value": big}).to_string()).await;
    assert_eq!(status, 413, "a chunked body is cut off at the quota");
    let status = chunked_put(&tm, "/v1/secrets/SMALL", &json!({"value": "small"}).to_string()).await;
    assert_eq!(status, 204, "a small chunked body is fine");
    tm.finish().await;
}

async fn submit_steps(tm: &TestMesh, n: usize) -> reqwest::Response {
    let steps: Vec<Value> = (0..n).map(|i| json!({"id": format!("s{i}"), "uses": "noop"})).collect();
    call(tm, &tm.key, Method::POST, "/v1/runs", Some(json!({"workflow": {"name": "q", "steps": steps}}))).await
}

async fn store_workflow(tm: &TestMesh, name: &str, on: Value) -> reqwest::Response {
    let wf = json!({"name": name, "on": on, "steps": [{"id": "a", "uses": "noop"}]});
    call(tm, &tm.key, Method::PUT, &format!("/v1/workflows/{name}"), Some(wf)).await
}

/// Sends `body` with `Transfer-Encoding: chunked` (no length) and returns the status.
async fn chunked_put(tm: &TestMesh, path: &str, body: &str) -> u16 {
    use tokio::io::AsyncWriteExt;
    let addr = tm.api.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        tm.key
    );
    for chunk in body.as_bytes().chunks(500) {
        req.push_str(&format!("{:x}\r\n{}\r\n", chunk.len(), std::str::from_utf8(chunk).unwrap()));
    }
    req.push_str("0\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A new viewer key of tenant `default`, used once (so the gateway has looked it up and keeps
/// it): its id and the key.
async fn used_key(tm: &TestMesh) -> (String, String) {
    let res = call(tm, &tm.key, Method::POST, "/v1/keys", Some(json!({"role": "viewer"}))).await;
    let made: Value = res.json().await.unwrap();
    tm.wait_projected().await;
    let key = made["key"].as_str().unwrap().to_string();
    assert_eq!(call(tm, &key, Method::GET, "/v1/runs", None).await.status(), 200);
    (made["id"].as_str().unwrap().to_string(), key)
}

async fn revoke(tm: &TestMesh, id: &str) {
    let seq = TestMesh::written_seq(&call(tm, &tm.key, Method::DELETE, &format!("/v1/keys/{id}"), None).await);
    listed_revoked_after(tm, id, seq).await;
    tm.wait_projected().await;
}

/// Read after `seq`, key `id` is listed revoked.
async fn listed_revoked_after(tm: &TestMesh, id: &str, seq: u64) {
    let keys = tm.get_json_after(format!("{}/v1/keys", tm.api), seq).await;
    assert!(keys["items"].as_array().unwrap().iter().any(|k| k["id"] == id && k["revoked_at"].is_string()), "{keys}");
}

/// Revocations of one key at once (a double click, two admins): every one answers the
/// revocation's seq, so a read after any of them sees the key revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_revocations_of_a_key_all_answer_the_revocations_seq() {
    let tm = spawn_mesh().await;
    let (id, key) = used_key(&tm).await;
    let path = format!("/v1/keys/{id}");
    let answers = futures::future::join_all((0..16).map(|_| call(&tm, &tm.key, Method::DELETE, &path, None))).await;
    let seqs: Vec<u64> = answers.iter().map(TestMesh::written_seq).collect();
    assert!(seqs.iter().all(|s| *s == seqs[0]), "{seqs:?}");
    // The one seq is the revocation's: the key's log ends with it (its uses go elsewhere).
    let subject = tm.bus.namespace().api_key("default", id.parse().unwrap());
    assert_eq!(tm.bus.last_seq(&subject).await.unwrap(), seqs[0]);
    listed_revoked_after(&tm, &id, seqs[0]).await;
    eventually("the revoked key refused", Duration::from_secs(5), || async {
        Ok((call(&tm, &key, Method::GET, "/v1/runs", None).await.status() == 401).then_some(()))
    })
    .await
    .unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_while_the_gateway_cannot_hear_of_it_is_refused_all_the_same() {
    let tm = spawn_mesh().await;
    let (id, key) = used_key(&tm).await;
    // Cut the gateway's listening connection (the one that hears of keys; the notifier has one
    // of its own), and revoke the key before it listens again: the
    // announcement goes unheard, so the gateway must not answer from what it kept.
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%taskmesh_key_revoked%'",
    )
    .fetch_one(&tm.pool)
    .await
    .unwrap();
    assert_eq!(cut, 1, "the gateway listens over one connection");
    revoke(&tm, &id).await;
    assert_eq!(call(&tm, &key, Method::GET, "/v1/runs", None).await.status(), 401);
    // It listens again: a key used and revoked afterwards goes too, and reads that want the
    // projector's latest are answered.
    eventually("the gateway to listen again", Duration::from_secs(10), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%taskmesh_key_revoked%'",
        )
        .fetch_one(&tm.pool)
        .await?;
        Ok((n == 1).then_some(()))
    })
    .await
    .unwrap();
    let (id, key) = used_key(&tm).await;
    revoke(&tm, &id).await;
    eventually("the second revoked key to be refused", Duration::from_secs(5), || async {
        Ok((call(&tm, &key, Method::GET, "/v1/runs", None).await.status() == 401).then_some(()))
    })
    .await
    .unwrap();
    let run = tm.submit("name: after\nsteps:\n  - {id: a, uses: noop}\n").await;
    assert_eq!(tm.wait_run(run, Duration::from_secs(30)).await["status"], "succeeded");
    tm.finish().await;
}

/// Copies `from` to `to`, holding what it has read while `frozen` is set (nothing closes: the
/// connection just goes quiet, as one that died without a word).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::AsyncWriteExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_whose_connection_goes_silent_serves_no_kept_key_and_listens_afresh() {
    let tm = spawn_mesh().await;
    tm.wait_projected().await;
    // A proxy in front of Postgres whose connections can be made to go quiet.
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = proxy.local_addr().unwrap().port();
    let upstream = {
        let o = tm.pool.connect_options();
        format!("{}:{}", o.get_host(), o.get_port())
    };
    let accepting = {
        let frozen = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = proxy.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
                tokio::spawn(pump(cr, sw, frozen.clone()));
                tokio::spawn(pump(sr, cw, frozen.clone()));
            }
        })
    };
    let via_proxy = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with((*tm.pool.connect_options()).clone().host("127.0.0.1").port(port));
    let keys = taskmesh_store::NotifiedCache::<u32>::new(10, Duration::from_secs(60));
    let checkpoint = taskmesh_store::follow_checkpoint(
        &via_proxy,
        taskmesh_projector::NAME,
        taskmesh_store::RunEnds::new(10),
        keys.clone(),
    );
    let table = taskmesh_store::read_checkpoint(&tm.pool, taskmesh_projector::NAME).await.unwrap();
    assert!(table > 0);
    let kept = || {
        if let Err(ticket) = keys.get("k") {
            keys.keep(ticket, "k", 1);
        }
        keys.get("k").is_ok() && *checkpoint.borrow() >= table
    };
    eventually("the listener to listen", Duration::from_secs(10), || async { Ok(kept().then_some(())) }).await.unwrap();
    // Silence: within a few pings the listener gives up, serves nothing and vouches for nothing.
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually("the silent listener to give up", Duration::from_secs(12), || async {
        Ok((keys.get("k").is_err() && *checkpoint.borrow() == 0).then_some(()))
    })
    .await
    .unwrap();
    assert!(!kept(), "nothing is kept while the listener is down");
    // Connections flow again: it listens afresh, on new connections.
    frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually("the listener to listen again", Duration::from_secs(20), || async { Ok(kept().then_some(())) })
        .await
        .unwrap();
    // A rebuild empties the keys table, and every cache with it.
    taskmesh_store::reset_read_models(&tm.pool, taskmesh_projector::NAME).await.unwrap();
    eventually("the rebuild to empty the cache", Duration::from_secs(5), || async {
        Ok(keys.get("k").is_err().then_some(()))
    })
    .await
    .unwrap();
    accepting.abort();
    tm.finish().await;
}

/// Copies Postgres's answers over, less every notification: a connection on which `LISTEN`
/// succeeds and nothing is heard, as behind a transaction-mode pooler. Counts those it drops.
async fn pump_without_notifications(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dropped: Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::AsyncWriteExt;
    let (mut buf, mut pending) = (vec![0u8; 16 * 1024], Vec::new());
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        // Whole messages only: a type byte, then a length that counts itself.
        let (mut at, mut out) = (0, Vec::new());
        while pending.len() - at >= 5 {
            let len = u32::from_be_bytes(pending[at + 1..at + 5].try_into().unwrap()) as usize;
            if pending.len() - at < 1 + len {
                break;
            }
            if pending[at] == b'A' {
                dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            } else {
                out.extend_from_slice(&pending[at..at + 1 + len]);
            }
            at += 1 + len;
        }
        pending.drain(..at);
        if to.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_that_hears_nothing_though_it_listens_keeps_nothing() {
    let tm = spawn_with(&[Svc::Projector], |_| {}).await;
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = proxy.local_addr().unwrap().port();
    let upstream = {
        let o = tm.pool.connect_options();
        format!("{}:{}", o.get_host(), o.get_port())
    };
    let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepting = {
        let dropped = dropped.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = proxy.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
                tokio::spawn(pump(cr, sw, Arc::new(std::sync::atomic::AtomicBool::new(false))));
                tokio::spawn(pump_without_notifications(sr, cw, dropped.clone()));
            }
        })
    };
    // (Unencrypted, so the proxy can read the messages.)
    let options = (*tm.pool.connect_options()).clone().ssl_mode(sqlx::postgres::PgSslMode::Disable);
    let via_proxy =
        sqlx::postgres::PgPoolOptions::new().connect_lazy_with(options.clone().host("127.0.0.1").port(port));
    let direct = sqlx::postgres::PgPoolOptions::new().connect_lazy_with(options);
    let follow = |pool: &sqlx::PgPool| {
        let cache = taskmesh_store::NotifiedCache::<u32>::new(10, Duration::from_secs(60));
        let task = taskmesh_store::follow_invalidations(
            pool,
            taskmesh_store::WEBHOOK_ENDPOINTS_CHANNEL,
            cache.clone(),
            std::future::pending(),
        );
        (cache, task)
    };
    let kept = |cache: &taskmesh_store::NotifiedCache<u32>| {
        if let Err(ticket) = cache.get("k") {
            cache.keep(ticket, "k", 1);
        }
        cache.get("k").is_ok()
    };
    let (deaf, deaf_task) = follow(&via_proxy);
    let (hearing, hearing_task) = follow(&direct);
    // Where announcements arrive, the first ping shows it, and entries are kept.
    eventually("a listener that hears to keep", Duration::from_secs(5), || async { Ok(kept(&hearing).then_some(())) })
        .await
        .unwrap();
    // Where they do not, nothing is, though each `LISTEN` succeeded: not before the listener
    // gives up on its silence (6 s), nor after, as it listens afresh.
    for _ in 0..80 {
        assert!(!kept(&deaf), "a listener that hears nothing keeps nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let through: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&via_proxy).await.unwrap();
    assert_eq!(through, 1, "the proxy carries everything else");
    // The listener through it did listen: its pings reached its socket, and were dropped there.
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst) > 0, "no notification came through the proxy");
    for task in [deaf_task, hearing_task, accepting] {
        task.abort();
    }
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn made_up_keys_are_limited_per_address_and_keys_already_seen_still_pass() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway], |s| {
        s.limits.failed_auth_per_second = 1;
        s.limits.failed_auth_burst = 3;
        s.gateway.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY));
    })
    .await;
    // The platform administrator's key is no tenant's, and no failed authentication: its calls
    // take nothing from the address's bucket.
    for _ in 0..5 {
        assert_eq!(call(&tm, PLATFORM_KEY, Method::GET, "/v1/tenants", None).await.status(), 200);
    }
    // A real key the gateway has not looked up yet.
    let res = call(&tm, &tm.key, Method::POST, "/v1/keys", Some(json!({"role": "viewer"}))).await;
    let unseen = res.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    assert_eq!(call(&tm, &tm.key, Method::GET, "/v1/runs", None).await.status(), 200);

    // Three made-up keys are each a 401; the fourth finds the address's bucket empty.
    for i in 0..3 {
        let res = call(&tm, &format!("tm_made_up_{i}"), Method::GET, "/v1/runs", None).await;
        assert_eq!(res.status(), 401, "made-up key {i}");
    }
    let res = call(&tm, "tm_made_up_3", Method::GET, "/v1/runs", None).await;
    assert_eq!(res.status(), 429);
    let wait: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "retry after {wait} s");
    assert_eq!(res.headers()["ratelimit-policy"], "3;w=3;scope=address");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], "https://taskmesh.dev/problems/rate-limited", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("unknown API keys"), "{body}");
    // While the address is refused: a key already seen passes; one never looked up is not
    // looked up (so a flood of made-up keys cannot pass for it either).
    assert_eq!(call(&tm, &tm.key, Method::GET, "/v1/runs", None).await.status(), 200);
    assert_eq!(call(&tm, PLATFORM_KEY, Method::GET, "/v1/tenants", None).await.status(), 200);
    assert_eq!(call(&tm, &unseen, Method::GET, "/v1/runs", None).await.status(), 429);
    assert_eq!(call(&tm, "tm_made_up_4", Method::GET, "/v1/runs", None).await.status(), 429);
    // Another client behind the same (trusted) proxy has a bucket of its own.
    let other = tm
        .http
        .get(format!("{}/v1/runs", tm.api))
        .bearer_auth("tm_made_up_5")
        .header("x-forwarded-for", "198.51.100.8")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 401, "198.51.100.8 has failed no authentication yet");
    // Once the wait is over, the real key is looked up and passes.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(call(&tm, &unseen, Method::GET, "/v1/runs", None).await.status(), 200);
    tm.finish().await;
}
