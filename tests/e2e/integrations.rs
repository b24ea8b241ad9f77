//! Forge webhooks in, signed notifications out.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use taskmesh_testkit::eventually;

use crate::helpers::*;

const PUSH: &[u8] = include_bytes!("../fixtures/webhooks/github/push.json");
const SECRET: &str = "a-shared-webhook-secret";

fn github_signature(body: &[u8]) -> String {
    github_signature_with(body, SECRET)
}

fn github_signature_with(body: &[u8], secret: &str) -> String {
    format!("sha256={}", hex::encode(hmac_sha256::HMAC::mac(body, secret.as_bytes())))
}

/// A signed GitHub push delivery of `body` to `hook`.
fn github_push(tm: &TestMesh, hook: &str, body: &[u8], delivery: &str) -> reqwest::RequestBuilder {
    github_event(tm, hook, "push", body, delivery)
}

/// A delivery of `body` to `hook` with the forge's `headers`.
fn forge_delivery(tm: &TestMesh, hook: &str, headers: [(&str, &str); 3], body: Vec<u8>) -> reqwest::RequestBuilder {
    let req = tm.http.post(hook).header("content-type", "application/json");
    headers.into_iter().fold(req, |req, (name, value)| req.header(name, value)).body(body)
}

/// A signed GitHub delivery of `event` (`push`, `pull_request`) with `body` to `hook`.
fn github_event(tm: &TestMesh, hook: &str, event: &str, body: &[u8], delivery: &str) -> reqwest::RequestBuilder {
    let signature = github_signature(body);
    let headers = [("x-github-event", event), ("x-github-delivery", delivery), ("x-hub-signature-256", &signature)];
    forge_delivery(tm, hook, headers, body.to_vec())
}

/// A GitLab merge request delivery of `body` to `hook`, with [`SECRET`] as its token.
fn gitlab_merge_request(tm: &TestMesh, hook: &str, body: Vec<u8>, delivery: &str) -> reqwest::RequestBuilder {
    gitlab_event(tm, hook, "Merge Request Hook", body, delivery)
}

/// A GitLab delivery of `event` (`Push Hook`, `Merge Request Hook`) with `body` to `hook`,
/// with [`SECRET`] as its token.
fn gitlab_event(tm: &TestMesh, hook: &str, event: &str, body: Vec<u8>, delivery: &str) -> reqwest::RequestBuilder {
    let headers = [("x-gitlab-event", event), ("x-gitlab-token", SECRET), ("idempotency-key", delivery)];
    forge_delivery(tm, hook, headers, body)
}

/// Gitea's (and Forgejo's) signature of `body`: a bare hex HMAC-SHA256 with [`SECRET`].
fn gitea_signature(body: &[u8]) -> String {
    hex::encode(hmac_sha256::HMAC::mac(body, SECRET.as_bytes()))
}

/// A signed Gitea delivery of `event` (`push`, `pull_request`) with `body` to `hook`.
fn gitea_event(tm: &TestMesh, hook: &str, event: &str, body: &[u8], delivery: &str) -> reqwest::RequestBuilder {
    let signature = gitea_signature(body);
    let headers = [("x-gitea-event", event), ("x-gitea-delivery", delivery), ("x-gitea-signature", &signature)];
    forge_delivery(tm, hook, headers, body.to_vec())
}

/// What a hook answered `req`.
async fn answer(req: reqwest::RequestBuilder) -> serde_json::Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// The run a hook's `answer` says it started.
fn started_run(answer: &serde_json::Value) -> uuid::Uuid {
    assert_eq!(answer["outcome"], "started", "{answer}");
    answer["run_id"].as_str().unwrap().parse().unwrap()
}

/// A merge patch of the repository connection `id` (the last segment of its webhook URL).
fn patch_connection(tm: &TestMesh, id: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
    let req = tm.auth(tm.http.patch(format!("{}/v1/repo-connections/{id}", tm.api)));
    req.header("content-type", "application/merge-patch+json").body(body.to_string())
}

/// Asks for `run`'s commit status to be sent again.
fn resend_status(tm: &TestMesh, run: impl std::fmt::Display) -> reqwest::RequestBuilder {
    tm.auth(tm.http.post(format!("{}/v1/runs/{run}/commit-status", tm.api)))
}

/// Connects `repository` on `forge` (its branches `master` and `release/*`, secret [`SECRET`],
/// and the fields of `more`) to a one-step workflow; returns the URL its webhooks go to, once
/// the gateway has it.
async fn connect(tm: &TestMesh, forge: &str, repository: &str, more: serde_json::Value) -> String {
    let mut body = serde_json::json!({
        "forge": forge,
        "repository": repository,
        "secret": SECRET,
        "branches": ["master", "release/*"],
        "workflow": {"name": "ci", "steps": [{"id": "test", "run": "echo tested"}]}
    });
    body.as_object_mut().unwrap().extend(more.as_object().cloned().unwrap_or_default());
    let res = tm.auth(tm.http.post(format!("{}/v1/repo-connections", tm.api))).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let created: serde_json::Value = res.json().await.unwrap();
    let path = created["webhook_path"].as_str().unwrap();
    assert!(path.starts_with(&format!("/hooks/{forge}/")), "{path}");
    tm.wait_projected().await;
    format!("{}{path}", tm.git)
}

/// Waits for the run a hook answer started, and checks what it was started with.
async fn check_started(tm: &TestMesh, answer: &serde_json::Value, forge: &str, repository: &str, commit: &str) {
    assert_eq!(answer["outcome"], "started", "{answer}");
    let run = tm.wait_run(answer["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["trigger"]["kind"], "webhook");
    assert_eq!(run["trigger"]["forge"], forge);
    assert_eq!(run["trigger"]["branch"], "master");
    assert_eq!(run["trigger"]["commit"], commit);
    assert_eq!(run["inputs"]["repository"], repository);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn github_push_is_verified_and_starts_one_run_per_delivery() {
    let tm = spawn_mesh().await;
    let hook = connect(&tm, "github", "binkkatal/sample_app", serde_json::json!({})).await;
    let send_body = |body: Vec<u8>, signature: String, delivery: &'static str| {
        let headers =
            [("x-github-event", "push"), ("x-github-delivery", delivery), ("x-hub-signature-256", &signature)];
        forge_delivery(&tm, &hook, headers, body).send()
    };
    let send = |signature: String, delivery: &'static str| send_body(PUSH.to_vec(), signature, delivery);

    let before = tm.event_count().await;
    for bad in [github_signature(b"something else"), String::new(), "sha256=zz".into()] {
        let res = send(bad, "d-1").await.unwrap();
        assert_eq!(res.status(), 401);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert_eq!(problem["type"], "https://taskmesh.dev/problems/unauthorized");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tm.event_count().await, before, "a bad signature appends nothing");

    let first: serde_json::Value = send(github_signature(PUSH), "d-1").await.unwrap().json().await.unwrap();
    assert_eq!(first["outcome"], "started", "{first}");
    let again: serde_json::Value = send(github_signature(PUSH), "d-1").await.unwrap().json().await.unwrap();
    assert_eq!(again["run_id"], first["run_id"], "the same delivery starts one run");
    assert_eq!(again["duplicate"], true);
    check_started(&tm, &first, "github", "binkkatal/sample_app", "fd489864e7642b48eaad6e3f155c10e46810ec72").await;
    tm.wait_projected().await;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs").fetch_one(&tm.pool).await.unwrap();
    assert_eq!(runs, 1);
    // The connection's secret is stored sealed: it is in no event and no row.
    assert!(!tm.stream_text(&tm.bus.namespace().events_stream()).await.contains(SECRET));
    assert!(!tm.postgres_text().await.contains(SECRET));

    // A branch outside the filter is acknowledged and ignored.
    let other = String::from_utf8_lossy(PUSH).replace("refs/heads/master", "refs/heads/feature-x");
    let res = send_body(other.clone().into_bytes(), github_signature(other.as_bytes()), "d-2").await.unwrap();
    assert_eq!(res.status(), 202);
    let res: serde_json::Value = res.json().await.unwrap();
    assert_eq!(res["outcome"], "ignored");
    tm.finish().await;
}

const GITLAB_PUSH: &[u8] = include_bytes!("../fixtures/webhooks/gitlab/push.json");
const GITLAB_TAG_PUSH: &[u8] = include_bytes!("../fixtures/webhooks/gitlab/tag_push.json");
const GITEA_PUSH: &[u8] = include_bytes!("../fixtures/webhooks/gitea/push.json");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gitlab_and_gitea_pushes_are_verified_and_start_one_run_per_delivery() {
    let tm = spawn_mesh().await;

    // GitLab: the token is the secret itself; a delivery is its Idempotency-Key, or its body.
    let hook = connect(&tm, "gitlab", "mike/diaspora", serde_json::json!({})).await;
    let gitlab_with = |event: &str, token: &str, id: Option<(&str, &str)>| {
        let mut req = tm.http.post(&hook).header("content-type", "application/json").header("x-gitlab-event", event);
        req = req.header("x-gitlab-token", token);
        if let Some((name, value)) = id {
            req = req.header(name, value);
        }
        async move { req.body(GITLAB_PUSH.to_vec()).send().await.unwrap() }
    };
    let gitlab =
        |event, token, key: Option<&'static str>| gitlab_with(event, token, key.map(|k| ("idempotency-key", k)));
    let answer = |res: reqwest::Response| async move { res.json::<serde_json::Value>().await.unwrap() };
    let before = tm.event_count().await;
    for bad in ["not-the-secret", ""] {
        let res = gitlab("Push Hook", bad, Some("k-1")).await;
        assert_eq!(res.status(), 401);
        assert_eq!(answer(res).await["type"], "https://taskmesh.dev/problems/unauthorized");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tm.event_count().await, before, "a bad token appends nothing");
    let first = answer(gitlab("Push Hook", SECRET, Some("k-1")).await).await;
    let again = answer(gitlab("Push Hook", SECRET, Some("k-1")).await).await;
    assert_eq!((&again["run_id"], &again["duplicate"]), (&first["run_id"], &serde_json::json!(true)));
    // GitLab before 17.4 sends no Idempotency-Key: its X-Gitlab-Event-UUID names the delivery.
    let event_id = Some(("x-gitlab-event-uuid", "e-1"));
    let by_event = answer(gitlab_with("Push Hook", SECRET, event_id).await).await;
    assert_ne!(by_event["run_id"], first["run_id"]);
    let by_event_again = answer(gitlab_with("Push Hook", SECRET, event_id).await).await;
    assert_eq!(by_event_again["run_id"], by_event["run_id"]);
    // With neither, each is a delivery of its own, even with the same body: two real pushes
    // can have the same (a branch made again at the same commit).
    let bare = answer(gitlab("Push Hook", SECRET, None).await).await;
    let bare_again = answer(gitlab("Push Hook", SECRET, None).await).await;
    assert_ne!(bare["run_id"], bare_again["run_id"]);
    assert_eq!((bare["outcome"].as_str(), bare_again["duplicate"].as_bool()), (Some("started"), Some(false)));
    check_started(&tm, &first, "gitlab", "mike/diaspora", "da1560886d4f094c3e6c9ef40349f7d38b5d27d7").await;
    // A merge request, where the connection takes none, is acknowledged and starts nothing,
    // whatever its body holds (a push's, the second time).
    let mr =
        tm.http.post(&hook).header("content-type", "application/json").header("x-gitlab-event", "Merge Request Hook");
    let res = mr.header("x-gitlab-token", SECRET).body(GITLAB_MR.to_vec()).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let ignored = answer(res).await;
    assert_eq!(ignored["outcome"], "ignored");
    assert!(ignored["reason"].as_str().unwrap().contains("pull_requests: false"), "{ignored}");
    let res = gitlab("Merge Request Hook", SECRET, Some("k-2")).await;
    assert_eq!(res.status(), 202);
    assert_eq!(answer(res).await["outcome"], "ignored");
    // A tag's push comes as `Tag Push Hook`; it starts a run where the connection names the tag.
    let tagged = connect(&tm, "gitlab", "jsmith/example", serde_json::json!({"tags": ["v1.*"]})).await;
    let req =
        tm.http.post(&tagged).header("content-type", "application/json").header("x-gitlab-event", "Tag Push Hook");
    let res = req.header("x-gitlab-token", SECRET).body(GITLAB_TAG_PUSH).send().await.unwrap();
    let started = answer(res).await;
    assert_eq!(started["outcome"], "started", "{started}");
    let run = tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(run["trigger"]["tag"], "v1.0.0");

    // Gitea: a bare hex HMAC-SHA256; Forgejo's own header names are read alike.
    let hook = connect(&tm, "gitea", "example/example", serde_json::json!({})).await;
    let gitea = |prefix: &str, signature: String, delivery: &str| {
        let req = tm
            .http
            .post(&hook)
            .header("content-type", "application/json")
            .header(format!("x-{prefix}-event"), "push")
            .header(format!("x-{prefix}-delivery"), delivery)
            .header(format!("x-{prefix}-signature"), signature);
        async move { req.body(GITEA_PUSH.to_vec()).send().await.unwrap() }
    };
    for bad in [gitea_signature(b"something else"), github_signature(GITEA_PUSH), String::new()] {
        assert_eq!(gitea("gitea", bad, "g-1").await.status(), 401);
    }
    let first = answer(gitea("gitea", gitea_signature(GITEA_PUSH), "g-1").await).await;
    let again = answer(gitea("forgejo", gitea_signature(GITEA_PUSH), "g-1").await).await;
    assert_eq!((&again["run_id"], &again["duplicate"]), (&first["run_id"], &serde_json::json!(true)));
    check_started(&tm, &first, "gitea", "example/example", "67b56589a45103f891bdee7c0546e5d40bc02001").await;

    // A connection answers on its own forge's path only.
    let id = hook.rsplit('/').next().unwrap();
    let res = tm.http.post(format!("{}/hooks/github/{id}", tm.git)).header("content-type", "application/json");
    let res = res.body("{}").send().await.unwrap();
    assert_eq!(res.status(), 404);
    tm.finish().await;
}

/// What a forge's API stand-in was sent: method and path, headers, and body per request.
type ApiCalls = Arc<Mutex<Vec<(String, HeaderMap, serde_json::Value)>>>;

/// The `state` of each request's body, in order: the commit statuses a forge was sent.
fn states_sent(calls: &ApiCalls) -> Vec<String> {
    calls.lock().unwrap().iter().map(|(_, _, b)| b["state"].as_str().unwrap_or("").to_string()).collect()
}

/// A local stand-in for a forge's API: records every request and answers `201`.
async fn forge_api() -> (String, ApiCalls) {
    forge_files(Vec::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_a_push_starts_show_on_its_commit_on_each_forge() {
    // The statuses link to each run's page in the dashboard.
    let tm = spawn_with(&Svc::ALL, |s| s.notification.dashboard_url = Some("https://tm.example/ui/".into())).await;
    let (api, calls) = forge_api().await;
    // Each run takes a while, so that its pending status is sent while it runs.
    let with_token = |token: &str, exit: u8| {
        serde_json::json!({"status_token": token, "api_url": api,
            "workflow": {"name": "ci", "steps": [{"id": "test", "run": format!("sleep 1.5; exit {exit}")}]}})
    };
    let github = connect(&tm, "github", "binkkatal/sample_app", with_token("gh-token", 0)).await;
    // The same repository connected again without a token: its runs report nothing.
    let untold = connect(&tm, "github", "binkkatal/sample_app", serde_json::json!({})).await;
    let gitlab = connect(&tm, "gitlab", "mike/diaspora", with_token("gl-token", 0)).await;
    // Gitea's workflow fails: its commit shows the failure.
    let gitea = connect(&tm, "gitea", "example/example", with_token("gt-token", 3)).await;
    let started = [
        answer(github_push(&tm, &github, PUSH, "s-1")).await,
        answer(github_push(&tm, &untold, PUSH, "s-1")).await,
        answer(gitlab_event(&tm, &gitlab, "Push Hook", GITLAB_PUSH.to_vec(), "s-1")).await,
        answer(gitea_event(&tm, &gitea, "push", GITEA_PUSH, "s-1")).await,
    ];
    for s in &started {
        assert_eq!(s["outcome"], "started", "{s}");
        tm.wait_run(s["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    }
    // Each run shows on its commit: pending when it was submitted, then its outcome. (Were the
    // pending status late, after the run's end, the outcome would be sent in its place; with
    // the runs' pause it is not late.)
    let expected = [
        (
            "POST /repos/binkkatal/sample_app/statuses/fd489864e7642b48eaad6e3f155c10e46810ec72",
            "authorization",
            "Bearer gh-token",
            "context",
            ["pending", "success"],
            &started[0],
        ),
        (
            "POST /api/v4/projects/mike%2Fdiaspora/statuses/da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "authorization",
            "Bearer gl-token",
            "name",
            ["running", "success"],
            &started[2],
        ),
        (
            "POST /api/v1/repos/example/example/statuses/67b56589a45103f891bdee7c0546e5d40bc02001",
            "authorization",
            "token gt-token",
            "context",
            ["pending", "failure"],
            &started[3],
        ),
    ];
    eventually("two statuses per commit", Duration::from_secs(20), || async {
        Ok((calls.lock().unwrap().len() >= 6).then_some(()))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = calls.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "two each, no more: {seen:?}");
    for (line, auth, token, name, states, run) in expected {
        let mine: Vec<_> = seen.iter().filter(|(l, ..)| l == line).collect();
        let got: Vec<&str> = mine.iter().map(|(_, _, b)| b["state"].as_str().unwrap_or("")).collect();
        assert_eq!(got, states, "{line}: {seen:?}");
        for (_, headers, body) in mine {
            assert_eq!(headers[auth], token);
            assert_eq!(body[name], "taskmesh/ci");
            assert_eq!(body["target_url"], format!("https://tm.example/ui/#/runs/{}", run["run_id"].as_str().unwrap()));
        }
    }
    // GitLab and Gitea name their server (a token is never sent anywhere by default); an API URL
    // is one, without credentials; a repository path stays a path.
    for (forge, more, field) in [
        ("gitea", serde_json::json!({"status_token": "t"}), "api_url"),
        ("gitlab", serde_json::json!({"status_token": "t"}), "api_url"),
        ("gitea", serde_json::json!({"status_token": "t", "api_url": "ftp://example.com"}), "api_url"),
        ("gitea", serde_json::json!({"status_token": "t", "api_url": "https://u:p@example.com"}), "api_url"),
        ("gitea", serde_json::json!({"status_token": ""}), "status_token"),
        ("github", serde_json::json!({"repository": "o/.."}), "repository"),
    ] {
        let mut body = serde_json::json!({"forge": forge, "repository": "o/r", "secret": SECRET,
            "workflow": {"name": "ci", "steps": [{"id": "t", "run": "true"}]}});
        body.as_object_mut().unwrap().extend(more.as_object().cloned().unwrap());
        let res = tm.auth(tm.http.post(format!("{}/v1/repo-connections", tm.api))).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 400, "{more}");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().starts_with(field), "{problem}");
    }
    // Tokens are stored sealed, like webhook secrets.
    for token in ["gh-token", "gl-token", "gt-token"] {
        assert!(!tm.postgres_text().await.contains(token));
        assert!(!tm.stream_text(&tm.bus.namespace().events_stream()).await.contains(token));
    }
    tm.finish().await;
}

const GITHUB_PR: &[u8] = include_bytes!("../fixtures/webhooks/github/pull_request.json");
const GITLAB_MR: &[u8] = include_bytes!("../fixtures/webhooks/gitlab/merge_request.json");
const GITEA_PR: &[u8] = include_bytes!("../fixtures/webhooks/gitea/pull_request.json");

/// `body` (JSON) with the value at each pointer replaced.
fn edited(body: &[u8], changes: &[(&str, serde_json::Value)]) -> Vec<u8> {
    let mut json: serde_json::Value = serde_json::from_slice(body).unwrap();
    for (pointer, value) in changes {
        *json.pointer_mut(pointer).unwrap() = value.clone();
    }
    serde_json::to_vec(&json).unwrap()
}

/// Pull (GitLab: merge) requests from a branch of the repository itself start runs where the
/// connection takes them, at their head commit, with their number and target branch, and
/// show on that commit; a connection that does not take them, a closed one, one from a fork,
/// or one into a branch the connection does not name, starts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_requests_start_runs_at_their_head_on_each_forge_and_show_there() {
    let tm = spawn_mesh().await;
    let (api, calls) = forge_api().await;
    let prs = serde_json::json!({"pull_requests": true, "branches": ["master"], "status_token": "t", "api_url": api});
    let github = connect(&tm, "github", "baxterthehacker/public-repo", prs.clone()).await;
    let gitlab = connect(&tm, "gitlab", "gitlabhq/gitlab-test", prs.clone()).await;
    let gitea = connect(&tm, "gitea", "example/example", prs.clone()).await;
    let without = connect(&tm, "github", "baxterthehacker/public-repo", serde_json::json!({})).await;
    let to_github =
        |url: &str, body: Vec<u8>, delivery: &str| answer(github_event(&tm, url, "pull_request", &body, delivery));
    let to_gitlab = |body: Vec<u8>, delivery: &str| answer(gitlab_merge_request(&tm, &gitlab, body, delivery));
    let to_gitea = |body: Vec<u8>, delivery: &str| answer(gitea_event(&tm, &gitea, "pull_request", &body, delivery));
    // Gitea's fixture comes from a fork; the same from a branch of the repository itself.
    let own = edited(
        GITEA_PR,
        &[("/pull_request/head/repo/full_name", "example/example".into()), ("/pull_request/head/repo/id", 1.into())],
    );
    let started = [
        (to_github(&github, GITHUB_PR.to_vec(), "p-1").await, "changes", 1, "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"),
        (to_gitlab(GITLAB_MR.to_vec(), "p-1").await, "ms-viewport", 1, "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"),
        (to_gitea(own, "p-1").await, "master", 2, "48e773f892a831faa47c0a160d1b7f0cd369ae2a"),
    ];
    for (answer, branch, number, commit) in &started {
        assert_eq!(answer["outcome"], "started", "{answer}");
        let run = tm.wait_run(answer["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let inputs = &run["inputs"];
        assert_eq!((&inputs["branch"], &inputs["commit"]), (&serde_json::json!(branch), &serde_json::json!(commit)));
        assert_eq!(
            (&inputs["pull_request"], &inputs["target_branch"]),
            (&serde_json::json!(number), &serde_json::json!("master"))
        );
        assert_eq!(run["trigger"]["pull_request"], *number, "{run}");
        assert_eq!(run["trigger"]["target_branch"], "master", "{run}");
    }
    // Each shows on its head commit: pending (GitLab: running), then its outcome.
    let lines = [
        "POST /repos/baxterthehacker/public-repo/statuses/0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
        "POST /api/v4/projects/gitlabhq%2Fgitlab-test/statuses/da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
        "POST /api/v1/repos/example/example/statuses/48e773f892a831faa47c0a160d1b7f0cd369ae2a",
    ];
    eventually("each head commit's outcome", Duration::from_secs(20), || async {
        let seen = calls.lock().unwrap().clone();
        let done = lines.iter().all(|line| seen.iter().any(|(l, _, b)| l == line && b["state"] == "success"));
        Ok(done.then_some(()))
    })
    .await
    .unwrap();
    // Named apart from a push's on the same commit (GitLab names it `name`).
    for (line, _, body) in calls.lock().unwrap().iter() {
        let name = body.get("context").or_else(|| body.get("name")).unwrap();
        assert_eq!(name, "taskmesh/ci/pr", "{line}: {body}");
    }

    // A workflow that declares its inputs, without the request's, is given none of them
    // (it would refuse them); the trigger still names the request.
    let typed = serde_json::json!({"name": "typed", "inputs": {"repository": {"type": "string"},
        "branch": {"type": "string"}, "commit": {"type": "string"}}, "steps": [{"id": "a", "uses": "noop"}]});
    let declared = connect(
        &tm,
        "github",
        "baxterthehacker/public-repo",
        serde_json::json!({"pull_requests": true, "workflow": typed}),
    )
    .await;
    let answer = to_github(&declared, GITHUB_PR.to_vec(), "p-7").await;
    assert_eq!(answer["outcome"], "started", "{answer}");
    let run = tm.wait_run(answer["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["inputs"].get("pull_request"), None, "{run}");
    assert_eq!(run["trigger"]["pull_request"], 1, "{run}");

    // What starts nothing, and says why.
    let closed = edited(GITHUB_PR, &[("/action", "closed".into())]);
    let into_other = edited(GITHUB_PR, &[("/pull_request/base/ref", "develop".into())]);
    let retitled = edited(GITLAB_MR, &[("/object_attributes/action", "update".into())]);
    let before = tm.event_count().await;
    for (answer, says) in [
        (to_github(&without, GITHUB_PR.to_vec(), "p-2").await, "pull_requests: false"),
        (to_github(&github, closed, "p-3").await, "closed"),
        (to_github(&github, into_other, "p-4").await, "target branch develop"),
        (to_gitea(GITEA_PR.to_vec(), "p-5").await, "fork"),
        (to_gitlab(retitled, "p-6").await, "without new commits"),
    ] {
        assert_eq!(answer["outcome"], "ignored", "{answer}");
        assert!(answer["reason"].as_str().unwrap().contains(says), "{says}: {answer}");
    }
    assert_eq!(tm.event_count().await, before, "nothing appended for them");
    // Where the connection takes requests, one whose body is not a request's is a 400.
    let res = github_event(&tm, &github, "pull_request", PUSH, "p-8").send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    tm.finish().await;
}

/// A pull (GitLab: merge) request closed or merged cancels its runs not yet ended; another
/// request's runs and a push's on the same connection go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_pull_request_cancels_its_runs_and_no_others() {
    let tm = spawn_mesh().await;
    let slow = serde_json::json!({"pull_requests": true,
        "workflow": {"name": "slow", "steps": [{"id": "a", "sleep": 600}]}});
    let github = connect(&tm, "github", "baxterthehacker/public-repo", slow.clone()).await;
    let gitlab = connect(&tm, "gitlab", "gitlabhq/gitlab-test", slow).await;
    let to_github =
        |event: &str, body: Vec<u8>, delivery: &str| answer(github_event(&tm, &github, event, &body, delivery));
    let to_gitlab = |body: Vec<u8>, delivery: &str| answer(gitlab_merge_request(&tm, &gitlab, body, delivery));
    let opened = started_run(&to_github("pull_request", GITHUB_PR.to_vec(), "c-1").await);
    let other = started_run(&to_github("pull_request", edited(GITHUB_PR, &[("/number", 2.into())]), "c-2").await);
    let push = edited(PUSH, &[("/repository/full_name", "baxterthehacker/public-repo".into())]);
    let pushed = started_run(&to_github("push", push, "c-3").await);
    let merge_request = started_run(&to_gitlab(GITLAB_MR.to_vec(), "c-4").await);
    tm.wait_projected().await;

    // Closed (merged) now, as each forge's payload says.
    let now = || serde_json::json!(chrono::Utc::now().to_rfc3339());
    let close = edited(GITHUB_PR, &[("/action", "closed".into()), ("/pull_request/closed_at", now())]);
    let closed = to_github("pull_request", close.clone(), "c-5").await;
    assert_eq!(closed["outcome"], "cancelled", "{closed}");
    assert_eq!(closed["cancelled"], serde_json::json!([opened]), "{closed}");
    let merge =
        edited(GITLAB_MR, &[("/object_attributes/action", "merge".into()), ("/object_attributes/updated_at", now())]);
    let merged = to_gitlab(merge, "c-6").await;
    assert_eq!(merged["outcome"], "cancelled", "{merged}");
    assert_eq!(merged["cancelled"], serde_json::json!([merge_request]), "{merged}");
    for run in [opened, merge_request] {
        let view = tm.wait_run(run, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "cancelled", "{view}");
    }
    for run in [other, pushed] {
        let (status, view) = tm.get_run(run).await;
        assert_eq!(status, 200);
        assert!(["queued", "running"].contains(&view["status"].as_str().unwrap()), "goes on: {view}");
    }
    // Reopened, then the close delivered again (late, or redelivered): the reopening's run was
    // started after the close, and goes on.
    tm.wait_projected().await;
    let reopened =
        started_run(&to_github("pull_request", edited(GITHUB_PR, &[("/action", "reopened".into())]), "c-7").await);
    tm.wait_projected().await;
    let again = to_github("pull_request", close.clone(), "c-5").await;
    assert_eq!(again["outcome"], "ignored", "{again}");
    assert!(again["reason"].as_str().unwrap().contains("none of its runs"), "{again}");
    // A close sent where the connection takes no requests, or for another repository, is not
    // this connection's to act on.
    let plain = connect(&tm, "github", "baxterthehacker/public-repo", serde_json::json!({})).await;
    let answer = answer(github_event(&tm, &plain, "pull_request", &close, "c-8")).await;
    assert!(answer["reason"].as_str().unwrap().contains("pull_requests: false"), "{answer}");
    let elsewhere = edited(&close, &[("/repository/full_name", "someone/else".into())]);
    let answer = to_github("pull_request", elsewhere, "c-9").await;
    assert_eq!(answer["outcome"], "ignored", "{answer}");
    assert!(answer["reason"].as_str().unwrap().contains("connection is for"), "{answer}");
    // A rerun of a request's run, and a rerun of that rerun, are the request's runs too: its
    // close cancels the one not yet ended. Another request's rerun goes on.
    let mut latest = started_run(&to_github("pull_request", edited(GITHUB_PR, &[("/number", 3.into())]), "c-10").await);
    for _ in 0..2 {
        latest = cancel_and_rerun(&tm, latest).await;
    }
    let other = cancel_and_rerun(&tm, other).await;
    tm.wait_projected().await;
    let close_third = edited(&close, &[("/number", 3.into()), ("/pull_request/closed_at", now())]);
    let closed = to_github("pull_request", close_third.clone(), "c-11").await;
    assert_eq!(closed["cancelled"], serde_json::json!([latest]), "{closed}");
    assert_eq!(tm.wait_run(latest, Duration::from_secs(30)).await["status"], "cancelled");
    // A rerun made after the close's time (of the run it cancelled) is left be when the close
    // comes again.
    let after = rerun(&tm, latest).await;
    tm.wait_projected().await;
    let again = to_github("pull_request", close_third, "c-12").await;
    assert_eq!(again["outcome"], "ignored", "{again}");
    for run in [other, pushed, reopened, after] {
        let (_, view) = tm.get_run(run).await;
        assert!(["queued", "running"].contains(&view["status"].as_str().unwrap()), "goes on: {view}");
        cancel_run(&tm, run).await;
    }
    tm.finish().await;
}

/// Cancels `run` through the API (answered `202`).
async fn cancel_run(tm: &TestMesh, run: uuid::Uuid) {
    let res = tm.send_json(reqwest::Method::POST, &format!("/v1/runs/{run}/cancel"), &serde_json::json!({})).await;
    assert_eq!(res.status(), 202);
}

/// Cancels `run`, waits for it to end, and reruns it from its failed steps: the rerun's id.
async fn cancel_and_rerun(tm: &TestMesh, run: uuid::Uuid) -> uuid::Uuid {
    cancel_run(tm, run).await;
    assert_eq!(tm.wait_run(run, Duration::from_secs(30)).await["status"], "cancelled");
    rerun(tm, run).await
}

/// Reruns the ended `run` from its failed steps: the rerun's id.
async fn rerun(tm: &TestMesh, run: uuid::Uuid) -> uuid::Uuid {
    let body = serde_json::json!({"from": "failed"});
    let rerun: serde_json::Value =
        tm.send_json(reqwest::Method::POST, &format!("/v1/runs/{run}/rerun"), &body).await.json().await.unwrap();
    rerun["id"].as_str().unwrap_or_else(|| panic!("{rerun}")).parse().unwrap()
}

/// A local stand-in for forges' APIs: answers `GET {path}?{query}` with what `files` says for
/// it (status and body), any other `GET` with `404` and any `POST` with `201`; records every
/// request (method, path and query, headers, JSON body).
async fn forge_files(files: Vec<(String, u16, &'static str)>) -> (String, ApiCalls) {
    forge_stand_in(files, 0).await
}

/// [`forge_files`], whose first `failing_posts` `POST`s are answered `500` (`usize::MAX`: all of
/// them, which makes it a webhook endpoint refusing everything too).
async fn forge_stand_in(files: Vec<(String, u16, &'static str)>, failing_posts: usize) -> (String, ApiCalls) {
    forge_stand_in_failing(files, failing_posts, (500, "{}")).await
}

/// [`forge_stand_in`] whose failing `POST`s are answered `failure` (a status and a body).
async fn forge_stand_in_failing(
    files: Vec<(String, u16, &'static str)>,
    failing_posts: usize,
    failure: (u16, &'static str),
) -> (String, ApiCalls) {
    let seen: ApiCalls = Arc::default();
    let store = seen.clone();
    let files = Arc::new(files);
    let failing = Arc::new(std::sync::atomic::AtomicUsize::new(failing_posts));
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (store, files, failing) = (store.clone(), files.clone(), failing.clone());
        async move {
            let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
            let line = format!("{} {target}", req.method());
            let (post, headers) = (req.method() == axum::http::Method::POST, req.headers().clone());
            let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap();
            store.lock().unwrap().push((line, headers, serde_json::from_slice(&body).unwrap_or_default()));
            if post {
                let fail = failing.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok();
                return if fail {
                    (axum::http::StatusCode::from_u16(failure.0).unwrap(), failure.1)
                } else {
                    (axum::http::StatusCode::CREATED, "{}")
                };
            }
            match files.iter().find(|(t, ..)| *t == target) {
                Some((_, status, body)) => (axum::http::StatusCode::from_u16(*status).unwrap(), *body),
                None => (axum::http::StatusCode::NOT_FOUND, "{\"message\": \"Not Found\"}"),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_file_in_the_repository_is_the_workflow_its_pushes_run() {
    let tm = spawn_mesh().await;
    const GITHUB_COMMIT: &str = "fd489864e7642b48eaad6e3f155c10e46810ec72";
    const GITLAB_COMMIT: &str = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7";
    let github_file = |path: &str| format!("/repos/binkkatal/sample_app/contents/{path}?ref={GITHUB_COMMIT}");
    let (api, calls) = forge_files(vec![
        (github_file(".taskmesh.yml"), 200, "name: from-repo\nsteps:\n  - id: build\n    run: echo built\n"),
        (
            format!("/api/v4/projects/mike%2Fdiaspora/repository/files/ci%2Fpipeline.yml/raw?ref={GITLAB_COMMIT}"),
            200,
            r#"{"name": "from-gitlab", "steps": [{"id": "check", "run": "true"}]}"#,
        ),
        (github_file("malformed.yml"), 200, "name: [unclosed\n"),
        (github_file("no-steps.yml"), 200, "name: empty\nsteps: 3\n"),
        (github_file("denied.yml"), 401, "{\"message\": \"Bad credentials\"}"),
        (github_file("busy.yml"), 502, "{}"),
        (github_file("limited.yml"), 403, "{\"message\": \"You have exceeded a secondary rate limit.\"}"),
        // Gitea shows the commit, so a 404 for its file means there is none. GitHub does not
        // show its commit here, as to a token that cannot see the repository.
        ("/api/v1/repos/example/example/git/commits/67b56589a45103f891bdee7c0546e5d40bc02001?stat=false&verification=false&files=false".into(), 200, "{}"),
    ])
    .await;
    let from_file = |token: &str, path: &str| serde_json::json!({"workflow": null, "pipeline_file": path, "status_token": token, "api_url": api});
    let github = |path: &str| connect(&tm, "github", "binkkatal/sample_app", from_file("gh-token", path));
    let push = |hook: String, delivery: &'static str| github_push(&tm, &hook, PUSH, delivery).send();

    // The workflow a push runs is the file's at the pushed commit, read with the token.
    let res = push(github(".taskmesh.yml").await, "f-1").await.unwrap();
    assert_eq!(res.status(), 202);
    let started: serde_json::Value = res.json().await.unwrap();
    assert_eq!(started["outcome"], "started", "{started}");
    let run = tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!((&run["status"], &run["workflow"]), (&serde_json::json!("succeeded"), &serde_json::json!("from-repo")));
    assert_eq!(run["steps"][0]["id"], "build");
    assert_eq!(run["trigger"]["commit"], GITHUB_COMMIT);
    let read = |line: String| calls.lock().unwrap().iter().find(|(l, ..)| *l == line).map(|(_, h, _)| h.clone());
    let headers = read(format!("GET {}", github_file(".taskmesh.yml"))).expect("the file was read");
    assert_eq!(headers["authorization"], "Bearer gh-token");
    assert_eq!(headers["accept"], "application/vnd.github.raw+json");

    // GitLab: a file in a directory, in JSON, with GitLab's token header.
    let gitlab = connect(&tm, "gitlab", "mike/diaspora", from_file("gl-token", "ci/pipeline.yml")).await;
    let req = tm.http.post(gitlab).header("content-type", "application/json").header("x-gitlab-event", "Push Hook");
    let started: serde_json::Value =
        req.header("x-gitlab-token", SECRET).body(GITLAB_PUSH).send().await.unwrap().json().await.unwrap();
    assert_eq!(started["outcome"], "started", "{started}");
    let run = tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(
        (&run["status"], &run["workflow"]),
        (&serde_json::json!("succeeded"), &serde_json::json!("from-gitlab"))
    );
    let line =
        format!("GET /api/v4/projects/mike%2Fdiaspora/repository/files/ci%2Fpipeline.yml/raw?ref={GITLAB_COMMIT}");
    // GitLab's own header would survive a redirect to another host; `Authorization` does not.
    assert_eq!(read(line).expect("the file was read")["authorization"], "Bearer gl-token");

    // Gitea: the commit has no such file, so the push starts nothing.
    let gitea = connect(&tm, "gitea", "example/example", from_file("gt-token", ".taskmesh.yml")).await;
    let ignored = answer(gitea_event(&tm, &gitea, "push", GITEA_PUSH, "f-1")).await;
    assert_eq!(ignored["outcome"], "ignored", "{ignored}");
    assert!(ignored["reason"].as_str().unwrap().contains("no pipeline file .taskmesh.yml"), "{ignored}");
    let line = "GET /api/v1/repos/example/example/raw/.taskmesh.yml?ref=67b56589a45103f891bdee7c0546e5d40bc02001";
    assert_eq!(read(line.into()).expect("the file was looked for")["authorization"], "token gt-token");
    let line = "GET /api/v1/repos/example/example/git/commits/67b56589a45103f891bdee7c0546e5d40bc02001?stat=false&verification=false&files=false";
    assert_eq!(read(line.into()).expect("the commit was looked at")["authorization"], "token gt-token");

    // A file that is no workflow is refused, saying why (the forge shows it on the delivery);
    // a forge refusing the token is a 503, so the delivery can be sent again once it is fixed,
    // with no Retry-After (asking again changes nothing until then); a forge failing is a 503
    // to try again after a second, and a forge's rate limit one to try again when it says
    // (GitHub's secondary limit, said only in its message: a minute).
    for (path, status, says, retry_after) in [
        ("malformed.yml", 422, "not YAML", None),
        ("no-steps.yml", 422, "the pipeline file no-steps.yml at fd48", None),
        ("denied.yml", 503, "answered 401", None),
        ("absent.yml", 503, "404, and 404 for the commit itself", None),
        ("busy.yml", 503, "answered 502", Some("1")),
        ("limited.yml", 503, "answered 403", Some("60")),
    ] {
        let res = push(github(path).await, "f-2").await.unwrap();
        assert_eq!(res.status(), status, "{path}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert_eq!(res.headers().get("retry-after").map(|v| v.to_str().unwrap()), retry_after, "{path}");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().contains(says), "{path}: {problem}");
    }
    // A forge that does not answer (it drops every connection at once) may later: a 503 to
    // try again after a second.
    let dropping = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dropped = dropping.local_addr().unwrap().port();
    let dropper = tokio::spawn(async move {
        while let Ok((conn, _)) = dropping.accept().await {
            drop(conn);
        }
    });
    let silent = serde_json::json!({"workflow": null, "pipeline_file": ".taskmesh.yml", "status_token": "gh-token",
        "api_url": format!("http://127.0.0.1:{dropped}")});
    let res = push(connect(&tm, "github", "binkkatal/sample_app", silent).await, "f-3").await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let problem: serde_json::Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("reading the pipeline file .taskmesh.yml"), "{problem}");
    dropper.abort();

    // The list shows where each connection's workflow comes from.
    let list: serde_json::Value =
        tm.auth(tm.http.get(format!("{}/v1/repo-connections", tm.api))).send().await.unwrap().json().await.unwrap();
    let gitlab_view = list["items"].as_array().unwrap().iter().find(|c| c["forge"] == "gitlab").unwrap();
    assert_eq!(gitlab_view["pipeline_file"], "ci/pipeline.yml");
    assert_eq!(gitlab_view["workflow"], serde_json::Value::Null);
    assert!(gitlab_view["webhook_path"].as_str().unwrap().starts_with("/hooks/gitlab/"), "{gitlab_view}");
    assert_eq!(gitlab_view["reports_status"], true);

    // A connection names a workflow or a pipeline file (not both, not neither), read with a
    // token, at a path within the repository.
    for (more, field) in [
        (serde_json::json!({"pipeline_file": ".taskmesh.yml"}), "workflow"),
        (serde_json::json!({"workflow": null}), "workflow"),
        (serde_json::json!({"workflow": null, "pipeline_file": ".taskmesh.yml"}), "pipeline_file"),
        (serde_json::json!({"workflow": null, "pipeline_file": "../x.yml", "status_token": "t"}), "pipeline_file"),
        (serde_json::json!({"workflow": null, "pipeline_file": "/x.yml", "status_token": "t"}), "pipeline_file"),
    ] {
        let mut body = serde_json::json!({"forge": "github", "repository": "o/r", "secret": SECRET,
            "workflow": {"name": "ci", "steps": [{"id": "t", "run": "true"}]}});
        body.as_object_mut().unwrap().extend(more.as_object().cloned().unwrap());
        let res = tm.auth(tm.http.post(format!("{}/v1/repo-connections", tm.api))).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 400, "{more}");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().starts_with(field), "{more}: {problem}");
    }
    // Deleted, a connection is gone from the list read after the delete's seq.
    let gitlab = gitlab_view["id"].as_str().unwrap().to_string();
    let res = tm.auth(tm.http.delete(format!("{}/v1/repo-connections/{gitlab}", tm.api))).send().await.unwrap();
    let deleted = TestMesh::written_seq(&res);
    let list = tm.get_json_after(format!("{}/v1/repo-connections", tm.api), deleted).await;
    assert!(!list["items"].as_array().unwrap().iter().any(|c| c["id"] == gitlab.as_str()), "{list}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_run_shows_as_an_error_on_its_commit() {
    let tm = spawn_mesh().await;
    let (api, calls) = forge_api().await;
    let more = serde_json::json!({"status_token": "gh-token", "api_url": api,
        "workflow": {"name": "ci", "steps": [{"id": "test", "run": "sleep 30"}]}});
    let hook = connect(&tm, "github", "binkkatal/sample_app", more).await;
    let res = github_event(&tm, &hook, "push", PUSH, "c-1").send().await.unwrap();
    let started: serde_json::Value = res.json().await.unwrap();
    let run = started["run_id"].as_str().unwrap().to_string();
    let states = || states_sent(&calls);
    eventually("the pending status", Duration::from_secs(20), || async { Ok((states() == ["pending"]).then_some(())) })
        .await
        .unwrap();
    let res = tm.auth(tm.http.post(format!("{}/v1/runs/{run}/cancel", tm.api))).json(&serde_json::json!({})).send();
    assert_eq!(res.await.unwrap().status(), 202);
    let ended = tm.wait_run(run.parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(ended["status"], "cancelled");
    eventually("the outcome", Duration::from_secs(20), || async { Ok((states().len() >= 2).then_some(())) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(states(), ["pending", "error"]);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_status_retried_after_the_run_ended_is_sent_as_its_outcome() {
    let tm = spawn_with(&Svc::ALL, |s| s.notification.retry_delays_secs = vec![2, 2]).await;
    // The forge fails the first status it is sent: the pending one, sent as the run starts.
    let (api, calls) = forge_stand_in(Vec::new(), 1).await;
    // The run ends (after a second) before the pending status is retried (after two).
    let more = serde_json::json!({"status_token": "gh-token", "api_url": api,
        "workflow": {"name": "ci", "steps": [{"id": "test", "run": "sleep 1"}]}});
    let hook = connect(&tm, "github", "binkkatal/sample_app", more).await;
    let started: serde_json::Value = github_push(&tm, &hook, PUSH, "p-1").send().await.unwrap().json().await.unwrap();
    assert_eq!(started["outcome"], "started", "{started}");
    let ended = tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(ended["status"], "succeeded");
    let states = || states_sent(&calls);
    eventually("the retry", Duration::from_secs(20), || async { Ok((states().len() >= 3).then_some(())) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The pending (refused), the outcome, and the pending's retry, which finds the run ended
    // and sends the outcome in its place: the commit never goes back to pending.
    assert_eq!(states(), ["pending", "success", "success"]);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_and_path_filters_choose_which_pushes_start_runs() {
    let tm = spawn_mesh().await;
    let github = |more| connect(&tm, "github", "binkkatal/sample_app", more);
    let send = |hook: String, body: Vec<u8>, delivery: &'static str| {
        let req = github_push(&tm, &hook, &body, delivery);
        async move { req.send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    // The fixture's push changes `.razorops.yaml` and `app/controllers/application_controller.rb`.
    let docs_only = github(serde_json::json!({"paths": ["docs/*"]})).await;
    let app = github(serde_json::json!({"paths": ["app/*", "lib/*"]})).await;
    let ignored = send(docs_only.clone(), PUSH.to_vec(), "p-1").await;
    assert_eq!(ignored["outcome"], "ignored", "{ignored}");
    assert!(ignored["reason"].as_str().unwrap().contains("paths"), "{ignored}");
    check_started(
        &tm,
        &send(app, PUSH.to_vec(), "p-1").await,
        "github",
        "binkkatal/sample_app",
        "fd489864e7642b48eaad6e3f155c10e46810ec72",
    )
    .await;

    // A branch made at a commit already pushed lists no file: it is not judged by the paths.
    let mut created: serde_json::Value = serde_json::from_slice(PUSH).unwrap();
    created["commits"] = serde_json::json!([]);
    let created = serde_json::to_vec(&created).unwrap();
    let res = send(docs_only.clone(), created, "p-2").await;
    assert_eq!(res["outcome"], "started", "{res}");

    // A tag push starts a run where the connection names the tag, with input `tag`.
    let tag_push = String::from_utf8_lossy(PUSH).replace("refs/heads/master", "refs/tags/v1.2.0").into_bytes();
    let tagged = github(serde_json::json!({"tags": ["v*"]})).await;
    let started = send(tagged, tag_push.clone(), "t-1").await;
    assert_eq!(started["outcome"], "started", "{started}");
    let run = tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(
        (&run["trigger"]["tag"], &run["trigger"]["branch"]),
        (&serde_json::json!("v1.2.0"), &serde_json::Value::Null)
    );
    assert_eq!(run["inputs"]["tag"], "v1.2.0");
    let untagged = send(docs_only, tag_push, "t-1").await;
    assert_eq!(untagged["outcome"], "ignored", "a connection naming no tags starts nothing for one");

    // GitLab's payload says it left commits out (4 pushed, 2 listed): the push starts its run
    // whatever the paths, as a file left out might match.
    let gitlab = connect(&tm, "gitlab", "mike/diaspora", serde_json::json!({"paths": ["docs/*"]})).await;
    let req = tm.http.post(gitlab).header("content-type", "application/json").header("x-gitlab-event", "Push Hook");
    let res = req.header("x-gitlab-token", SECRET).body(GITLAB_PUSH).send().await.unwrap();
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["outcome"], "started");
    tm.finish().await;
}

/// A connection changed in place keeps its webhook path: the new secret is the one checked,
/// the new token the one sent, the new filters the ones applied. What a new connection could
/// not have is refused, a change that changes nothing appends nothing, and a deleted
/// connection cannot be changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_changed_in_place_keeps_its_webhook_path() {
    let tm = spawn_mesh().await;
    let (api, calls) = forge_api().await;
    let hook = connect(
        &tm,
        "github",
        "binkkatal/sample_app",
        serde_json::json!({"status_token": "old-token", "api_url": api}),
    )
    .await;
    let id = hook.rsplit('/').next().unwrap().to_string();
    let path = format!("/v1/repo-connections/{id}");
    let patch = |body: serde_json::Value| {
        let req = patch_connection(&tm, &id, body);
        async move { req.send().await.unwrap() }
    };
    let push = |secret: &str, branch: &str, delivery: &str| {
        let body = String::from_utf8_lossy(PUSH).replace("refs/heads/master", &format!("refs/heads/{branch}"));
        let signature = github_signature_with(body.as_bytes(), secret);
        let headers =
            [("x-github-event", "push"), ("x-github-delivery", delivery), ("x-hub-signature-256", &signature)];
        let req = forge_delivery(&tm, &hook, headers, body.into_bytes());
        async move { req.send().await.unwrap() }
    };
    const NEW_SECRET: &str = "the-webhook-secret-rotated";

    // A new secret (the old one taken no more: as for one that leaked) and a new token, at once.
    let changed =
        serde_json::json!({"secret": NEW_SECRET, "previous_secret_valid_seconds": 0, "status_token": "new-token"});
    let res = patch(changed).await;
    assert_eq!(res.status(), 200);
    let changed: serde_json::Value = res.json().await.unwrap();
    assert_eq!(changed["id"], id.as_str());
    tm.wait_projected().await;
    assert_eq!(push(SECRET, "master", "c-1").await.status(), 401, "the old secret is refused");
    let started: serde_json::Value = push(NEW_SECRET, "master", "c-1").await.json().await.unwrap();
    check_started(&tm, &started, "github", "binkkatal/sample_app", "fd489864e7642b48eaad6e3f155c10e46810ec72").await;
    eventually("the run's statuses", Duration::from_secs(20), || async {
        Ok((calls.lock().unwrap().len() >= 2).then_some(()))
    })
    .await
    .unwrap();
    for (line, headers, _) in calls.lock().unwrap().iter() {
        assert_eq!(headers["authorization"], "Bearer new-token", "{line}");
    }

    // New filters: master no longer starts runs.
    let res = patch(serde_json::json!({"branches": ["release/*"]})).await;
    assert_eq!(res.status(), 200);
    let filtered: serde_json::Value = res.json().await.unwrap();
    tm.wait_projected().await;
    let ignored: serde_json::Value = push(NEW_SECRET, "master", "c-2").await.json().await.unwrap();
    assert_eq!(ignored["outcome"], "ignored", "{ignored}");
    let started: serde_json::Value = push(NEW_SECRET, "release/1.0", "c-3").await.json().await.unwrap();
    assert_eq!(started["outcome"], "started", "{started}");
    tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    eventually("the second run's statuses", Duration::from_secs(20), || async {
        Ok((calls.lock().unwrap().len() >= 4).then_some(()))
    })
    .await
    .unwrap();

    // What a new connection could not have is refused, and so is a field the API does not
    // know (the forge, say) or a token sent to a new server unseen.
    let before = tm.event_count().await;
    for (body, field) in [
        (serde_json::json!({"repository": "o/.."}), "repository"),
        (serde_json::json!({"secret": "short"}), "secret"),
        (serde_json::json!({"status_token": ""}), "status_token"),
        (serde_json::json!({"status_token": "tok\n"}), "status_token"),
        (serde_json::json!({"api_url": "https://u:p@example.com"}), "api_url"),
        (serde_json::json!({"api_url": "http://127.0.0.1:9"}), "status_token"),
        (serde_json::json!({"pipeline_file": ".taskmesh.yml", "status_token": null}), "pipeline_file"),
        (serde_json::json!({"pipeline_file": "../x.yml"}), "pipeline_file"),
        (serde_json::json!({"workflow": {"name": "ci", "steps": []}, "pipeline_file": "ci.yml"}), "workflow"),
        (serde_json::json!({"tags": [""]}), "tags"),
        (serde_json::json!({"submodule_repositories": ["o/*"], "status_token": null}), "submodule_repositories"),
        (serde_json::json!({"submodule_repositories": ["*"]}), "submodule_repositories"),
        (serde_json::json!({"submodule_repositories": ["*/lib"]}), "submodule_repositories"),
        (serde_json::json!({"secret": null}), "secret"),
        (serde_json::json!({"repository": null}), "repository"),
        (serde_json::json!({"workflow": null}), "workflow"),
        (serde_json::json!({"previous_secret_valid_seconds": 60}), "previous_secret_valid_seconds"),
        (
            serde_json::json!({"secret": "yet-another-one", "previous_secret_valid_seconds": 604_801}),
            "previous_secret_valid_seconds",
        ),
    ] {
        let res = patch(body.clone()).await;
        assert_eq!(res.status(), 400, "{body}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().starts_with(field), "{body}: {problem}");
    }
    let res = patch(serde_json::json!({"forge": "gitlab"})).await;
    assert_eq!(res.status(), 400, "an unknown field");
    let res =
        patch(serde_json::json!({"workflow": {"name": "ci", "steps": [{"id": "a", "needs": ["b"], "run": "true"}]}}))
            .await;
    assert_eq!(res.status(), 422, "a workflow that is not valid");
    // A change that changes nothing appends nothing, and answers the last event's seq.
    let res = patch(serde_json::json!({"branches": ["release/*"]})).await;
    assert_eq!(res.status(), 200);
    let same: serde_json::Value = res.json().await.unwrap();
    assert_eq!(tm.event_count().await, before, "refusals and a change to nothing append nothing");
    assert_eq!(same["seq"], filtered["seq"], "the last change's seq");

    // Without its token the connection reports nothing more, and a new server is taken
    // with no token to send there; the list shows both.
    let res = patch(serde_json::json!({"status_token": null, "api_url": "https://forge.example/api"})).await;
    assert_eq!(res.status(), 200);
    let seq = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
    let listed = tm.get_json_after(format!("{}/v1/repo-connections", tm.api), seq).await;
    let mine = listed["items"].as_array().unwrap().iter().find(|c| c["id"] == id.as_str()).unwrap().clone();
    assert_eq!(mine["reports_status"], false, "{mine}");
    assert_eq!(mine["api_url"], "https://forge.example/api", "{mine}");
    assert_eq!(mine["branches"], serde_json::json!(["release/*"]), "{mine}");
    assert_eq!(mine["webhook_path"], format!("/hooks/github/{id}"), "{mine}");
    let sent = calls.lock().unwrap().len();
    let started: serde_json::Value = push(NEW_SECRET, "release/1.0", "c-4").await.json().await.unwrap();
    let run = tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    // Whether a run reports its state is decided as it starts, from the connection then: no
    // status is queued for it at all.
    assert_eq!(run["trigger"]["reports_status"], serde_json::Value::Null, "{run}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.lock().unwrap().len(), sent, "no status without a token");

    // `null` empties a list of patterns: every branch again.
    let res = patch(serde_json::json!({"branches": null})).await;
    assert_eq!(res.status(), 200);
    let seq = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
    let listed = tm.get_json_after(format!("{}/v1/repo-connections", tm.api), seq).await;
    let mine = listed["items"].as_array().unwrap().iter().find(|c| c["id"] == id.as_str()).unwrap().clone();
    assert_eq!(mine["branches"], serde_json::json!([]), "{mine}");
    let started: serde_json::Value = push(NEW_SECRET, "master", "c-5").await.json().await.unwrap();
    assert_eq!(started["outcome"], "started", "{started}");

    // A new secret, the one it replaces still taken for an hour (by default) so the forge's
    // setting can follow: either signs a delivery that is taken; the one before both, not.
    const THIRD: &str = "the-webhook-secret-third";
    let res = patch(serde_json::json!({"secret": THIRD})).await;
    assert_eq!(res.status(), 200);
    let seq = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
    let listed = tm.get_json_after(format!("{}/v1/repo-connections", tm.api), seq).await;
    let mine = listed["items"].as_array().unwrap().iter().find(|c| c["id"] == id.as_str()).unwrap().clone();
    let until: chrono::DateTime<chrono::Utc> = mine["previous_secret_until"].as_str().unwrap().parse().unwrap();
    let left = until - chrono::Utc::now();
    assert!(left > chrono::Duration::minutes(59) && left <= chrono::Duration::hours(1), "{mine}");
    for (secret, delivery) in [(NEW_SECRET, "c-6"), (THIRD, "c-7")] {
        let res = push(secret, "master", delivery).await;
        assert_eq!(res.status(), 202, "{secret}");
        assert_eq!(res.json::<serde_json::Value>().await.unwrap()["outcome"], "started");
    }
    assert_eq!(push(SECRET, "master", "c-8").await.status(), 401, "the one before both");
    // Another change meanwhile keeps the window; another secret drops the oldest of the two.
    assert_eq!(patch(serde_json::json!({"tags": ["v*"]})).await.status(), 200);
    tm.wait_projected().await;
    assert_eq!(push(NEW_SECRET, "master", "c-9").await.status(), 202, "still taken");
    const FOURTH: &str = "the-webhook-secret-fourth";
    assert_eq!(patch(serde_json::json!({"secret": FOURTH})).await.status(), 200);
    tm.wait_projected().await;
    assert_eq!(push(NEW_SECRET, "master", "c-10").await.status(), 401, "only the last two are taken");
    for (secret, delivery) in [(THIRD, "c-11"), (FOURTH, "c-12")] {
        assert_eq!(push(secret, "master", delivery).await.status(), 202, "{secret}");
    }
    // The same secret sent again ends the overlap: the one before it is the previous now.
    assert_eq!(patch(serde_json::json!({"secret": FOURTH})).await.status(), 200);
    tm.wait_projected().await;
    assert_eq!(push(THIRD, "master", "c-13").await.status(), 401, "the overlap ended");
    // An overlap ends when its time is up: a second's, then the one replaced is refused and
    // the list says nothing more of it.
    const FIFTH: &str = "the-webhook-secret-fifth";
    let res = patch(serde_json::json!({"secret": FIFTH, "previous_secret_valid_seconds": 1})).await;
    let seq = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
    let listed = tm.get_json_after(format!("{}/v1/repo-connections", tm.api), seq).await;
    let mine = listed["items"].as_array().unwrap().iter().find(|c| c["id"] == id.as_str()).unwrap().clone();
    let until: chrono::DateTime<chrono::Utc> = mine["previous_secret_until"].as_str().unwrap().parse().unwrap();
    assert_eq!(push(FOURTH, "master", "c-14").await.status(), 202, "within its second");
    tokio::time::sleep((until - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(200)).await;
    assert_eq!(push(FOURTH, "master", "c-15").await.status(), 401, "its time is up");
    let listed = tm.get_json(format!("{}/v1/repo-connections", tm.api)).await;
    let mine = listed["items"].as_array().unwrap().iter().find(|c| c["id"] == id.as_str()).unwrap().clone();
    assert_eq!(mine["previous_secret_until"], serde_json::Value::Null, "{mine}");

    // The new secret and token are stored sealed, as the first ones were.
    for plain in [NEW_SECRET, "new-token"] {
        assert!(!tm.postgres_text().await.contains(plain));
        assert!(!tm.stream_text(&tm.bus.namespace().events_stream()).await.contains(plain));
    }

    // Another connection's id, or a deleted one, is a 404.
    let unknown = tm
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/repo-connections/{}", uuid::Uuid::now_v7()),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(tm.auth(tm.http.delete(format!("{}{path}", tm.api))).send().await.unwrap().status(), 204);
    let res = patch(serde_json::json!({"branches": []})).await;
    assert_eq!(res.status(), 404);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["type"], "https://taskmesh.dev/problems/not-found");
    tm.finish().await;
}

/// Whether `secret` alone verifies a delivery (its Standard Webhooks headers and body), and how
/// many signatures its `webhook-signature` lists.
pub(crate) fn signed_with(headers: &HeaderMap, body: &[u8], secret: &str) -> (bool, usize) {
    let mut h = http::HeaderMap::new();
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        h.insert(name, headers[name].to_str().unwrap().parse().unwrap());
    }
    let signatures = headers["webhook-signature"].to_str().unwrap().split(' ').count();
    (standardwebhooks::Webhook::new(secret).unwrap().verify(body, &h).is_ok(), signatures)
}

/// What a receiver was sent: headers and body per request.
pub(crate) type Received = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A local receiver that records what it is sent and answers 200.
pub(crate) async fn receiver() -> (String, Received) {
    receiver_on("127.0.0.1").await
}

/// [`receiver`] on the loopback address `ip`; `/ok` answers GETs too.
async fn receiver_on(ip: &str) -> (String, Received) {
    let (url, seen, _) = switchable_receiver_on(ip, true).await;
    (url, seen)
}

/// [`receiver`] on the loopback address `ip` that answers `500` without recording anything
/// while its switch (returned, first set to `up`) is off.
pub(crate) async fn switchable_receiver_on(
    ip: &str,
    up: bool,
) -> (String, Received, Arc<std::sync::atomic::AtomicBool>) {
    let seen: Received = Arc::default();
    let switch = Arc::new(std::sync::atomic::AtomicBool::new(up));
    let (store, on) = (seen.clone(), switch.clone());
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (store, on) = (store.clone(), on.clone());
                async move {
                    if !on.load(SeqCst) {
                        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down");
                    }
                    store.lock().unwrap().push((headers, body.to_vec()));
                    (axum::http::StatusCode::OK, "ok")
                }
            }),
        )
        .route("/ok", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen, switch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_failing_for_too_long_is_disabled_until_enabled_and_a_success_resets_the_clock() {
    // One attempt a delivery; an endpoint failing for 2 s is disabled.
    let tm = spawn_with(&Svc::ALL, |s| {
        s.notification.retry_delays_secs = vec![];
        s.notification.disable_after_secs = 2;
    })
    .await;
    let (endpoint, seen, up) = down_endpoint(&tm).await;
    let failed = failed_deliveries(&tm, &endpoint);
    let run_ends = |name: &'static str| {
        let tm = &tm;
        async move {
            let run = tm.submit(&format!("name: {name}\nsteps:\n  - {{id: a, uses: noop}}\n")).await;
            tm.wait_run(run, Duration::from_secs(30)).await;
            run
        }
    };
    let failures = |n: usize| {
        let (tm, endpoint) = (&tm, &endpoint);
        async move {
            eventually(&format!("{n} failed deliveries"), Duration::from_secs(30), || async {
                Ok((failed_items(tm, endpoint).await.len() == n).then_some(()))
            })
            .await
            .unwrap();
        }
    };
    let received = |n: usize| {
        let seen = seen.clone();
        async move {
            eventually(&format!("{n} deliveries"), Duration::from_secs(30), || async {
                Ok((seen.lock().unwrap().len() == n).then_some(()))
            })
            .await
            .unwrap();
        }
    };
    let disabled = || {
        let tm = &tm;
        let endpoint = endpoint.clone();
        async move {
            tm.wait_projected().await;
            let list = tm.get_json(format!("{}/v1/webhook-endpoints", tm.api)).await;
            let me = list["items"].as_array().unwrap().iter().find(|e| e["id"] == endpoint.as_str()).unwrap().clone();
            me["disabled_at"].is_string().then(|| me["disabled_reason"].as_str().unwrap().to_string())
        }
    };
    let endpoint_log = tm.bus.namespace().webhook_endpoint("default", endpoint.parse().unwrap());

    // A failure, then a delivery taken: the failure no longer counts.
    run_ends("one").await;
    failures(1).await;
    up.store(true, SeqCst);
    run_ends("two").await;
    received(1).await;
    eventually("the endpoint recorded as recovered", Duration::from_secs(10), || async {
        let last = tm.bus.last(&endpoint_log).await?.unwrap();
        Ok(matches!(last.envelope.event, taskmesh_events::Event::WebhookEndpointRecovered(_)).then_some(()))
    })
    .await
    .unwrap();
    // Failing again, over 2 s after the first failure: not disabled, as its clock started again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    up.store(false, SeqCst);
    run_ends("three").await;
    failures(2).await;
    assert_eq!(disabled().await, None, "a delivery was taken since the first failure");
    // Still failing 2 s on: disabled, though meanwhile its secret was rotated and it was changed
    // (neither restarts the clock, as a delivery taken or an enabling does).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let path = format!("{}/v1/webhook-endpoints/{endpoint}", tm.api);
    assert_eq!(tm.auth(tm.http.post(format!("{path}/rotate-secret"))).send().await.unwrap().status(), 200);
    let res = tm.auth(tm.http.patch(&path)).json(&serde_json::json!({"event_types": []})).send().await.unwrap();
    assert_eq!(res.status(), 200);
    tm.wait_projected().await;
    run_ends("four").await;
    failures(3).await;
    let reason = disabled().await.expect("disabled");
    assert!(reason.contains("every delivery since") && reason.contains("500"), "{reason}");
    // While disabled, nothing is sent to it, though it would take it now: a run's end is
    // listed among its failed deliveries at once, unsent.
    up.store(true, SeqCst);
    let five = run_ends("five").await.to_string();
    failures(4).await;
    let missed = failed_items(&tm, &endpoint).await[0].clone();
    assert_eq!(missed["payload"]["data"]["run_id"], five.as_str(), "{missed}");
    assert_eq!(
        (&missed["error"], &missed["attempts"]),
        (&serde_json::json!("the endpoint is disabled"), &serde_json::json!(0)),
        "{missed}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing is sent to a disabled endpoint");
    assert_eq!(disabled().await, Some(reason), "a delivery given up while disabled changes nothing");
    // Enabled again (by an admin): the next run's end is sent.
    enable_endpoint(&tm, &endpoint).await;
    assert_eq!(disabled().await, None);
    let six = tm.submit("name: six\nsteps:\n  - {id: a, uses: noop}\n").await;
    received(2).await;
    let body: serde_json::Value = serde_json::from_slice(&seen.lock().unwrap()[1].1).unwrap();
    assert_eq!(body["data"]["run_id"], six.to_string(), "run six's end, not run five's sent late");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(seen.lock().unwrap().len(), 2);
    // What it missed while disabled is sent on request.
    assert_eq!(retry_one(&tm, &failed, missed["message_id"].as_str().unwrap()).await.status(), 202);
    received(3).await;
    let body: serde_json::Value = serde_json::from_slice(&seen.lock().unwrap()[2].1).unwrap();
    assert_eq!(body["data"]["run_id"], five, "run five's end, missed while disabled");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decision_on_an_endpoints_log_is_taken_again_when_someone_appended_meanwhile() {
    use taskmesh_bus::{AfterLast, Settled};
    use taskmesh_events::{Event, EventMeta, WebhookEndpointEnabled, WebhookEndpointRecovered};
    let tm = spawn_mesh().await;
    let endpoint_id = uuid::Uuid::now_v7();
    let subject = tm.bus.namespace().webhook_endpoint("default", endpoint_id);
    let event = |e| EventMeta::new("default").envelope(subject.clone(), e);
    let first =
        tm.bus.append(0, &event(Event::WebhookEndpointEnabled(WebhookEndpointEnabled { endpoint_id }))).await.unwrap();
    // The first decision is overtaken by a racing writer's append: it is read and decided
    // again, and the second, seeing the race's event, appends after it.
    let seen = std::sync::Mutex::new(Vec::new());
    let settled = tm
        .bus
        .append_after_last(&subject, 5, |last| {
            let (tm, seen, event) = (&tm, &seen, &event);
            async move {
                let last = last.unwrap();
                let tries = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(last.seq);
                    seen.len()
                };
                if tries == 1 {
                    let racing = event(Event::WebhookEndpointRecovered(WebhookEndpointRecovered { endpoint_id }));
                    tm.bus.append(last.seq, &racing).await?;
                }
                let ours = event(Event::WebhookEndpointEnabled(WebhookEndpointEnabled { endpoint_id }));
                Ok::<_, taskmesh_bus::BusError>(AfterLast::<()>::Append { events: vec![ours], msg_id: None })
            }
        })
        .await
        .unwrap();
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 2, "decided twice: {seen:?}");
    assert_eq!(seen[0], first);
    let Settled::Appended(seq) = settled else { panic!("appended: {settled:?}") };
    assert!(seq > seen[1] && seen[1] > first, "after the racing append: {seen:?} {seq}");
    let types: Vec<&str> =
        tm.bus.read_subject(&subject, 0).await.unwrap().iter().map(|e| e.envelope.type_name()).collect();
    assert_eq!(types, ["WebhookEndpointEnabled", "WebhookEndpointRecovered", "WebhookEndpointEnabled"]);
    // One that keeps losing gives up with the conflict.
    let lost = tm
        .bus
        .append_after_last(&subject, 2, |last| {
            let (tm, event) = (&tm, &event);
            async move {
                let last = last.unwrap();
                let racing = event(Event::WebhookEndpointRecovered(WebhookEndpointRecovered { endpoint_id }));
                tm.bus.append(last.seq, &racing).await?;
                let ours = event(Event::WebhookEndpointEnabled(WebhookEndpointEnabled { endpoint_id }));
                Ok::<_, taskmesh_bus::BusError>(AfterLast::<()>::Append { events: vec![ours], msg_id: None })
            }
        })
        .await;
    assert!(matches!(lost, Err(taskmesh_bus::BusError::Conflict { .. })), "{lost:?}");
    tm.finish().await;
}

/// What a disabled endpoint misses is listed for `disabled_listed_secs` after its disabling,
/// and no longer: an endpoint abandoned disabled stops costing a record per run's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disabled_endpoints_missed_runs_are_listed_only_for_a_while() {
    let tm = spawn_with(&Svc::ALL, |s| s.notification.disabled_listed_secs = 3600).await;
    let (endpoint, seen, up) = down_endpoint(&tm).await;
    up.store(true, SeqCst);
    // Another endpoint, disabled just now throughout, tells when a run's end has gone the same
    // way (fanned out, given up, listed).
    let (witness, _, _) = down_endpoint(&tm).await;
    disable_endpoint(&tm, &witness, chrono::Duration::zero()).await;
    let listed = || async { failed_items(&tm, &endpoint).await.len() };
    // Disabled just now: a run's end is listed, unsent.
    disable_endpoint(&tm, &endpoint, chrono::Duration::zero()).await;
    let run = tm.submit("name: soon\nsteps:\n  - {id: a, uses: noop}\n").await;
    tm.wait_run(run, Duration::from_secs(30)).await;
    eventually("the missed run listed", Duration::from_secs(20), || async { Ok((listed().await == 1).then_some(())) })
        .await
        .unwrap();
    // Disabled two hours ago, past its hour: a run's end is neither queued for it nor listed.
    enable_endpoint(&tm, &endpoint).await;
    tm.wait_projected().await;
    disable_endpoint(&tm, &endpoint, chrono::Duration::hours(2)).await;
    let later = tm.submit("name: later\nsteps:\n  - {id: a, uses: noop}\n").await;
    eventually("the other endpoint listing it", Duration::from_secs(30), || async {
        let items = failed_items(&tm, &witness).await;
        Ok(items.iter().any(|i| i["payload"]["data"]["run_id"] == later.to_string()).then_some(()))
    })
    .await
    .unwrap();
    // (Were it queued for this one too, it would have been given up and listed by now.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    tm.wait_projected().await;
    assert_eq!(listed().await, 1, "only the run that ended within the hour");
    assert!(seen.lock().unwrap().is_empty(), "nothing sent to a disabled endpoint");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_queued_before_its_endpoint_was_disabled_is_not_sent_but_listed_as_failed() {
    // Two attempts, 5 s apart; the clock disables nothing here. No run's end after a disabling
    // is listed (`disabled_listed_secs` 0), but a delivery queued before it still is.
    let tm = spawn_with(&Svc::ALL, |s| {
        s.notification.retry_delays_secs = vec![5];
        s.notification.disable_after_secs = 0;
        s.notification.disabled_listed_secs = 0;
    })
    .await;
    let (endpoint, seen, up) = down_endpoint(&tm).await;
    let run = tm.submit("name: told\nsteps:\n  - {id: a, uses: noop}\n").await;
    tm.wait_run(run, Duration::from_secs(30)).await;
    // Its first attempt has failed; before the retry the endpoint is disabled (as a notifier
    // does once it has failed for too long) and is back up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    disable_endpoint(&tm, &endpoint, chrono::Duration::zero()).await;
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    // The retry finds it disabled: nothing is sent, and the delivery is listed as failed, to be
    // sent again once the endpoint is enabled.
    let listed = eventually("the delivery given up", Duration::from_secs(30), || async {
        Ok(failed_items(&tm, &endpoint).await.first().cloned())
    })
    .await
    .unwrap();
    assert_eq!(listed["error"], "the endpoint is disabled", "{listed}");
    assert_eq!(listed["payload"]["data"]["run_id"], run.to_string(), "{listed}");
    assert!(seen.lock().unwrap().is_empty(), "nothing sent to a disabled endpoint");
    tm.finish().await;
}

/// The read side loses an endpoint's row for a while (a rebuild under way, or batches
/// Postgres lost in a crash): a delivery to it is tried again, not dropped as if the endpoint
/// had been deleted, and goes through once the row is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_whose_endpoint_the_read_side_lost_for_a_while_is_not_dropped() {
    let tm = spawn_with(&Svc::ALL, |s| s.notification.retry_delays_secs = vec![2, 1, 1, 1, 1, 1]).await;
    let (endpoint, seen, up) = down_endpoint(&tm).await;
    let run = tm.submit("name: told\nsteps:\n  - {id: a, uses: noop}\n").await;
    tm.wait_run(run, Duration::from_secs(30)).await;
    // Its first attempt has failed; the next, two seconds later, finds no row.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id: uuid::Uuid = endpoint.parse().unwrap();
    sqlx::query("CREATE TABLE lost_endpoint AS SELECT * FROM webhook_endpoints WHERE id = $1")
        .bind(id)
        .execute(&tm.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1").bind(id).execute(&tm.pool).await.unwrap();
    up.store(true, SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(seen.lock().unwrap().is_empty(), "not sent while the read side lacks the endpoint");
    sqlx::query("INSERT INTO webhook_endpoints SELECT * FROM lost_endpoint").execute(&tm.pool).await.unwrap();
    eventually("the delivery to go through", Duration::from_secs(15), || async {
        Ok((!seen.lock().unwrap().is_empty()).then_some(()))
    })
    .await
    .unwrap();
    let (_, body) = seen.lock().unwrap()[0].clone();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["data"]["run_id"], run.to_string(), "{body}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_delivery_is_listed_and_sent_again_on_request() {
    // Two attempts: the first, and one retry a second later.
    let tm = spawn_with(&Svc::ALL, |s| s.notification.retry_delays_secs = vec![1]).await;
    let (endpoint, seen, up) = down_endpoint(&tm).await;
    let failed = failed_deliveries(&tm, &endpoint);

    // Two runs end while the endpoint is down: both deliveries are given up, and listed newest
    // first with what they carry.
    let mut ends = Vec::new();
    for name in ["first", "second"] {
        let run = tm.submit(&format!("name: {name}\nsteps:\n  - {{id: a, run: 'exit 3'}}\n")).await;
        tm.wait_run(run, Duration::from_secs(30)).await;
        let events = tm.run_events(run).await;
        ends.push((run, events.iter().rev().find(|e| e.event.is_run_terminal()).unwrap().id.to_string()));
        eventually("the delivery given up", Duration::from_secs(30), || async {
            Ok((failed_items(&tm, &endpoint).await.len() == ends.len()).then_some(()))
        })
        .await
        .unwrap();
    }
    let page = tm.get_json(format!("{failed}?limit=1")).await;
    let newest = &page["items"][0];
    assert_eq!(newest["message_id"], ends[1].1, "{page}");
    assert_eq!(newest["attempts"], 2, "{page}");
    assert!(newest["error"].as_str().unwrap().contains("500"), "{page}");
    assert_eq!(newest["payload"]["type"], "run.failed");
    assert_eq!(newest["payload"]["data"]["run_id"], ends[1].0.to_string());
    assert_eq!(newest["retried_at"], serde_json::Value::Null);
    let cursor = page["next_cursor"].as_i64().expect("a second page");
    let older = tm.get_json(format!("{failed}?limit=1&cursor={cursor}")).await;
    assert_eq!(older["items"][0]["message_id"], ends[0].1, "{older}");
    assert_eq!(older["next_cursor"], serde_json::Value::Null);
    assert!(seen.lock().unwrap().is_empty());

    // The endpoint is back: the first is sent again, as it was, under its webhook-id.
    up.store(true, SeqCst);
    let res = retry_one(&tm, &failed, &ends[0].1).await;
    assert_eq!(res.status(), 202);
    let seq = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
    eventually("the delivery sent again", Duration::from_secs(30), || async {
        Ok((!seen.lock().unwrap().is_empty()).then_some(()))
    })
    .await
    .unwrap();
    // Asked again at once: the same failure is sent once.
    assert_eq!(retry_one(&tm, &failed, &ends[0].1).await.status(), 202);
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0["webhook-id"], ends[0].1.as_str());
        let body: serde_json::Value = serde_json::from_slice(&seen[0].1).unwrap();
        assert_eq!(body, older["items"][0]["payload"], "the body it was to carry");
    }
    // Read with the retry applied: it says when it was sent again.
    let page = tm.get_json_after(&failed, seq).await;
    let entry = page["items"].as_array().unwrap().iter().find(|i| i["message_id"] == ends[0].1.as_str()).unwrap();
    assert!(entry["retried_at"].is_string(), "{page}");

    // Ingest reads the body from the failure's own event: a sequence that is not that
    // endpoint's failure of that message (another event; the same, for another tenant) is
    // not found, whatever a caller says.
    let ingest = taskmesh_ingest::Ingest::new(tm.bus.clone());
    let failures = logged_failures(&tm, &endpoint).await.unwrap();
    let failure_seq = failures.iter().find(|(_, message)| *message == ends[1].1).unwrap().0;
    for (tenant, message, seq) in [
        ("default", &ends[0].1, failure_seq),
        ("default", &ends[1].1, failure_seq - 1),
        ("beta", &ends[1].1, failure_seq),
    ] {
        let cmd = taskmesh_events::command::RetryWebhookDelivery {
            tenant: tenant.into(),
            endpoint_id: endpoint.parse().unwrap(),
            message_id: message.clone(),
            seq,
        };
        let refused = ingest.retry_webhook_delivery(cmd).await.unwrap_err();
        assert_eq!(refused.code, taskmesh_events::ErrorCode::NotFound, "{tenant} {message} {seq}: {refused:?}");
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing more was sent");
    // All of them again: those not sent again since they failed (the second), and only those
    // that failed since the time given.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    assert_eq!(retry_all(&tm, &failed, Some(serde_json::json!({"since": later})), None).await["retried"], 0);
    let sent = retry_all(&tm, &failed, Some(serde_json::json!({})), None).await;
    assert_eq!((&sent["retried"], &sent["more"]), (&serde_json::json!(1), &serde_json::json!(false)), "{sent}");
    eventually("the second sent again", Duration::from_secs(30), || async {
        Ok((seen.lock().unwrap().len() == 2).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(seen.lock().unwrap()[1].0["webhook-id"], ends[1].1.as_str());
    // What is not there is a 404 problem.
    for res in [
        retry_one(&tm, &failed, "no-such-message").await,
        tm.auth(tm.http.get(failed_deliveries(&tm, uuid::Uuid::now_v7()))).send().await.unwrap(),
    ] {
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    // An endpoint deleted takes its failed deliveries with it.
    let res = tm.auth(tm.http.delete(format!("{}/v1/webhook-endpoints/{endpoint}", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 204);
    tm.wait_projected().await;
    assert_eq!(retry_one(&tm, &failed, &ends[1].1).await.status(), 404);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_failed_deliveries_are_sent_again_a_hundred_a_request_oldest_first() {
    // One attempt a delivery: a run's end the endpoint refuses is given up at once.
    let tm = spawn_with(&Svc::ALL, |s| s.notification.retry_delays_secs = vec![]).await;
    let (endpoint, seen, up) = down_endpoint(&tm).await;
    let before = chrono::Utc::now();
    // 101 runs end while the endpoint is down.
    for n in [100, 1] {
        let runs: Vec<serde_json::Value> = (0..n)
            .map(|i| serde_json::json!({"workflow": {"name": format!("r{i}"), "steps": [{"id": "a", "run": "true"}]}}))
            .collect();
        let res = tm.send_json(reqwest::Method::POST, "/v1/runs/batch", &serde_json::json!({"runs": runs})).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<serde_json::Value>().await.unwrap()["accepted"], n);
    }
    let failures = eventually("101 deliveries given up", Duration::from_secs(60), || async {
        let failures = logged_failures(&tm, &endpoint).await?;
        Ok((failures.len() == 101).then_some(failures))
    })
    .await
    .unwrap();
    tm.wait_projected().await;
    up.store(true, SeqCst);

    // Each request sends at most 100, oldest first, and says whether more are left; read
    // after its answer's `seq`, the next does not pick those again. `since` before them all
    // takes them all in.
    let failed = failed_deliveries(&tm, &endpoint);
    let all = |after: &serde_json::Value| {
        retry_all(&tm, &failed, Some(serde_json::json!({"since": before})), after["seq"].as_u64())
    };
    let first = all(&serde_json::Value::Null).await;
    assert_eq!((&first["retried"], &first["more"]), (&serde_json::json!(100), &serde_json::json!(true)), "{first}");
    let newest = tm.get_json_after(format!("{failed}?limit=1"), first["seq"].as_u64().unwrap()).await;
    assert_eq!(newest["items"].as_array().unwrap().len(), 1, "{newest}");
    assert_eq!(newest["items"][0]["message_id"], failures[100].1.as_str(), "{newest}");
    assert_eq!(newest["items"][0]["retried_at"], serde_json::Value::Null, "the newest is left for the next: {newest}");
    let second = all(&first).await;
    assert_eq!((&second["retried"], &second["more"]), (&serde_json::json!(1), &serde_json::json!(false)), "{second}");
    let third = all(&second).await;
    assert_eq!((&third["retried"], &third["more"]), (&serde_json::json!(0), &serde_json::json!(false)), "{third}");
    eventually("the 101 sent again", Duration::from_secs(60), || async {
        Ok((seen.lock().unwrap().len() >= 101).then_some(()))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: std::collections::BTreeSet<String> =
        seen.lock().unwrap().iter().map(|(headers, _)| headers["webhook-id"].to_str().unwrap().to_string()).collect();
    assert_eq!((seen.lock().unwrap().len(), ids.len()), (101, 101), "each failure sent again once");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_delivery_whose_event_aged_out_is_listed_as_expired_and_not_sent_again() {
    // One attempt a delivery: a run's end the endpoint refuses is given up at once.
    let tm = spawn_with(&Svc::ALL, |s| s.notification.retry_delays_secs = vec![]).await;
    let (endpoint, seen, up) = down_endpoint(&tm).await;
    let failed = failed_deliveries(&tm, &endpoint);
    for name in ["older", "newer"] {
        let run = tm.submit(&format!("name: {name}\nsteps:\n  - {{id: a, run: 'true'}}\n")).await;
        tm.wait_run(run, Duration::from_secs(30)).await;
    }
    let failures = eventually("both deliveries given up", Duration::from_secs(30), || async {
        let failures = logged_failures(&tm, &endpoint).await?;
        Ok((failures.len() == 2).then_some(failures))
    })
    .await
    .unwrap();
    tm.wait_projected().await;
    // Everything before the newer failure is removed from the log (by hand here, as a version
    // before 2026-12-07's retention would have: it aged out the whole log, oldest first), the
    // older failure with it.
    let events = tm.bus.jetstream().get_stream(tm.bus.namespace().events_stream()).await.unwrap();
    events.purge().sequence(failures[1].0).await.unwrap();
    up.store(true, SeqCst);

    let page = tm.get_json(&failed).await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{page}");
    assert_eq!(
        (&items[0]["message_id"], &items[0]["expired"]),
        (&serde_json::json!(failures[1].1), &serde_json::json!(false))
    );
    assert_eq!(
        (&items[1]["message_id"], &items[1]["expired"]),
        (&serde_json::json!(failures[0].1), &serde_json::json!(true))
    );
    // Sending them all again passes over the expired one (it would fail every request).
    let sent = retry_all(&tm, &failed, None, None).await;
    assert_eq!((&sent["retried"], &sent["more"]), (&serde_json::json!(1), &serde_json::json!(false)), "{sent}");
    eventually("the newer sent again", Duration::from_secs(30), || async {
        Ok((!seen.lock().unwrap().is_empty()).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(seen.lock().unwrap()[0].0["webhook-id"], failures[1].1.as_str());
    // Asked for alone, the expired one is a 404 that says why.
    let res = tm.auth(tm.http.post(format!("{failed}/{}/retry", failures[0].1))).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let problem = res.json::<serde_json::Value>().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("no longer in the log"), "{problem}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(seen.lock().unwrap().len(), 1, "the expired one was not sent");
    tm.finish().await;
}

/// A local receiver subscribed as a webhook endpoint: what it is sent, and the created endpoint.
pub(crate) async fn subscribe(tm: &TestMesh) -> (Received, serde_json::Value) {
    let (url, seen) = receiver().await;
    (seen, subscribe_url(tm, &url).await)
}

/// Asks to create a webhook endpoint for `url`.
async fn post_endpoint(tm: &TestMesh, url: &str) -> reqwest::Response {
    tm.auth(tm.http.post(format!("{}/v1/webhook-endpoints", tm.api)))
        .json(&serde_json::json!({"url": url}))
        .send()
        .await
        .unwrap()
}

/// Subscribes `url` as a webhook endpoint; returns the created endpoint.
pub(crate) async fn subscribe_url(tm: &TestMesh, url: &str) -> serde_json::Value {
    let res = post_endpoint(tm, url).await;
    assert_eq!(res.status(), 201);
    res.json().await.unwrap()
}

/// A webhook endpoint that is down (a [`switchable_receiver_on`] loopback, answering 500 until
/// its switch is on), subscribed and visible to the gateway: its id, what it is sent once up,
/// and its switch.
async fn down_endpoint(tm: &TestMesh) -> (String, Received, Arc<std::sync::atomic::AtomicBool>) {
    let (url, seen, up) = switchable_receiver_on("127.0.0.1", false).await;
    let endpoint = subscribe_url(tm, &url).await["id"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    (endpoint, seen, up)
}

/// Disables endpoint `endpoint` as a notifier does once it has failed for too long, as if
/// `ago` before now, and waits for the read side to have it.
pub(crate) async fn disable_endpoint(tm: &TestMesh, endpoint: &str, ago: chrono::Duration) {
    use taskmesh_events::{Event, EventMeta, WebhookEndpointDisabled};
    let endpoint_id: uuid::Uuid = endpoint.parse().unwrap();
    let subject = tm.bus.namespace().webhook_endpoint("default", endpoint_id);
    let mut disabled = EventMeta::new("default").envelope(
        subject.clone(),
        Event::WebhookEndpointDisabled(WebhookEndpointDisabled { endpoint_id, reason: "failing".into() }),
    );
    disabled.occurred_at -= ago;
    tm.bus.append(tm.bus.last_seq(&subject).await.unwrap(), &disabled).await.unwrap();
    tm.wait_projected().await;
}

/// Enables webhook endpoint `endpoint` again, as an admin does (`200`).
async fn enable_endpoint(tm: &TestMesh, endpoint: &str) {
    let res = tm.auth(tm.http.post(format!("{}/v1/webhook-endpoints/{endpoint}/enable", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

/// Asks to send the failed delivery `message` of the failed-deliveries list at `failed` again.
async fn retry_one(tm: &TestMesh, failed: &str, message: &str) -> reqwest::Response {
    tm.auth(tm.http.post(format!("{failed}/{message}/retry"))).send().await.unwrap()
}

/// The address of webhook endpoint `id`'s failed deliveries.
fn failed_deliveries(tm: &TestMesh, id: impl std::fmt::Display) -> String {
    format!("{}/v1/webhook-endpoints/{id}/failed-deliveries", tm.api)
}

/// What webhook endpoint `id`'s failed deliveries list holds (its first page).
async fn failed_items(tm: &TestMesh, id: &str) -> Vec<serde_json::Value> {
    tm.get_json(failed_deliveries(tm, id)).await["items"].as_array().unwrap().clone()
}

/// Tenant `default`'s webhook endpoint `endpoint`'s failures as its log holds them: (sequence,
/// message id), oldest first.
async fn logged_failures(tm: &TestMesh, endpoint: &str) -> taskmesh_bus::Result<Vec<(u64, String)>> {
    let subject = tm.bus.namespace().webhook_endpoint("default", endpoint.parse().unwrap());
    let log = tm.bus.read_subject(&subject, 0).await?;
    Ok(log
        .iter()
        .filter_map(|e| match &e.envelope.event {
            taskmesh_events::Event::WebhookDeliveryFailed(f) => Some((e.seq, f.message_id.clone())),
            _ => None,
        })
        .collect())
}

/// Sends again the failed deliveries `failed` (their list's address) lists, as `body` asks (none:
/// a request without a body), read after `min_seq` if given: the answer (`retried`, `more`,
/// `seq`), which must be a 200.
async fn retry_all(
    tm: &TestMesh,
    failed: &str,
    body: Option<serde_json::Value>,
    min_seq: Option<u64>,
) -> serde_json::Value {
    let mut req = tm.auth(tm.http.post(format!("{failed}/retry")));
    if let Some(body) = body {
        req = req.json(&body);
    }
    if let Some(seq) = min_seq {
        req = req.header("Taskmesh-Min-Seq", seq.to_string());
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// A mesh (set as `tweak` says) where tenant `default`'s endpoint answers every delivery 500,
/// and a failed delivery waits ten minutes for its retry (in the queue, unacknowledged), while
/// tenant `beta`'s endpoint takes what it is sent: the mesh, what `default`'s endpoint was
/// sent, `beta`'s key and what its endpoint heard.
async fn refusing_default_and_receiving_beta(
    tweak: impl FnOnce(&mut taskmesh_config::Settings),
) -> (TestMesh, ApiCalls, String, Received) {
    const PLATFORM_KEY: &str = "platform-key-for-two-tenants";
    let tm = spawn_with(&Svc::ALL, |s| {
        s.notification.retry_delays_secs = vec![600];
        s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY));
        tweak(s);
    })
    .await;
    let (refusing, refused) = forge_stand_in(Vec::new(), usize::MAX).await;
    subscribe_url(&tm, &format!("{refusing}/hook")).await;
    let (beta_key, beta_seen) = tenant_with_receiver(&tm, PLATFORM_KEY, "beta").await;
    (tm, refused, beta_key, beta_seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_whose_endpoint_refuses_everything_fills_only_its_own_share_of_the_delivery_queue() {
    let (tm, refused, beta_key, beta_seen) =
        refusing_default_and_receiving_beta(|s| s.nats.deliveries_per_tenant = 2).await;

    // Four of `default`'s runs end: two deliveries fill its share, the other two are dropped,
    // and every run ends all the same.
    for _ in 0..4 {
        let run = tm.submit("name: quick\nsteps:\n  - {id: a, uses: noop}\n").await;
        assert_eq!(tm.wait_run(run, Duration::from_secs(30)).await["status"], "succeeded");
    }
    let ns = tm.bus.namespace();
    eventually("every end fanned out", Duration::from_secs(20), || async {
        let waiting = tm.bus.jetstream().get_stream(ns.ended_stream()).await?.info().await?.state.messages;
        Ok((waiting == 0).then_some(()))
    })
    .await
    .unwrap();
    let held = tm.bus.subject_counts(&ns.deliveries_stream(), &ns.delivery("default")).await.unwrap();
    assert_eq!(held.get(&ns.delivery("default")).copied(), Some(2), "{held:?}");
    // `beta`'s run is notified as ever.
    beta_is_told(&tm, &beta_key, &beta_seen).await;
    assert_eq!(refused.lock().unwrap().len(), 2, "only the two deliveries queued were attempted");
    tm.finish().await;
}

/// Creates tenant `id` (with the platform key) and subscribes a [`receiver`] of its own to its
/// runs' ends: its admin key and what the receiver hears.
async fn tenant_with_receiver(tm: &TestMesh, platform_key: &str, id: &str) -> (String, Received) {
    let key = tm.new_tenant(platform_key, id).await;
    let (url, seen) = receiver().await;
    let res = tm
        .http
        .post(format!("{}/v1/webhook-endpoints", tm.api))
        .bearer_auth(&key)
        .json(&serde_json::json!({"url": url}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    tm.wait_projected().await;
    (key, seen)
}

/// Submits a one-step run as `beta` (its key) and waits until its endpoint hears of it.
async fn beta_is_told(tm: &TestMesh, beta_key: &str, beta_seen: &Received) {
    submit_as(tm, beta_key).await;
    eventually("beta's webhook", Duration::from_secs(30), || async {
        Ok((!beta_seen.lock().unwrap().is_empty()).then_some(()))
    })
    .await
    .unwrap();
}

/// Submits a one-step run with tenant `key`.
async fn submit_as(tm: &TestMesh, key: &str) {
    tm.submit_as(key, "name: quick\nsteps:\n  - {id: a, uses: noop}\n").await;
}

/// The requests an endpoint holds now, and the most it held at once.
type HeldRequests = Arc<(std::sync::atomic::AtomicUsize, std::sync::atomic::AtomicUsize)>;

/// Submits `runs` one-step runs (as `default`) and waits until `started` counts `under_way`
/// attempts.
async fn end_runs_until_attempted(
    tm: &TestMesh,
    runs: usize,
    started: &std::sync::atomic::AtomicUsize,
    under_way: usize,
) {
    for _ in 0..runs {
        tm.submit("name: quick\nsteps:\n  - {id: a, uses: noop}\n").await;
    }
    attempted(started, under_way).await;
}

/// Waits until `started` counts `n` attempts.
async fn attempted(started: &std::sync::atomic::AtomicUsize, n: usize) {
    eventually(&format!("{n} attempts"), Duration::from_secs(60), || async {
        Ok((started.load(SeqCst) >= n).then_some(()))
    })
    .await
    .unwrap();
}

/// A webhook endpoint that never answers (it holds each request a minute): its URL, how many
/// requests it was sent, and how many it holds now and held at most at once.
async fn hanging_endpoint() -> (String, Arc<std::sync::atomic::AtomicUsize>, HeldRequests) {
    use std::sync::atomic::AtomicUsize;
    let held = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let count = held.clone();
    struct Leaving(Arc<(AtomicUsize, AtomicUsize)>);
    impl Drop for Leaving {
        fn drop(&mut self) {
            self.0.0.fetch_sub(1, SeqCst);
        }
    }
    let started = Arc::new(AtomicUsize::new(0));
    let starts = started.clone();
    let app = axum::Router::new().fallback(move || {
        let (count, starts) = (count.clone(), starts.clone());
        async move {
            starts.fetch_add(1, SeqCst);
            let now = count.0.fetch_add(1, SeqCst) + 1;
            count.1.fetch_max(now, SeqCst);
            let _leaving = Leaving(count);
            tokio::time::sleep(Duration::from_secs(60)).await;
            "late"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, started, held)
}

/// A mesh (set as `tweak` says) where tenant `default`'s endpoint never answers (each delivery
/// takes the whole timeout, then waits ten minutes for its retry, unacknowledged meanwhile)
/// and tenant `beta`'s takes what it is sent: the mesh, the [`hanging_endpoint`]'s counts,
/// `beta`'s key and what its endpoint heard.
async fn hanging_default_and_receiving_beta(
    tweak: impl FnOnce(&mut taskmesh_config::Settings),
) -> (TestMesh, Arc<std::sync::atomic::AtomicUsize>, HeldRequests, String, Received) {
    const PLATFORM_KEY: &str = "platform-key-for-a-hanging-endpoint";
    let tm = spawn_with(&Svc::ALL, |s| {
        s.notification.retry_delays_secs = vec![600];
        s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY));
        tweak(s);
    })
    .await;
    let (hanging, started, held) = hanging_endpoint().await;
    subscribe_url(&tm, &hanging).await;
    let (beta_key, beta_seen) = tenant_with_receiver(&tm, PLATFORM_KEY, "beta").await;
    (tm, started, held, beta_key, beta_seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_whose_endpoint_hangs_does_not_hold_up_another_tenants_webhooks() {
    let (tm, started, held, beta_key, beta_seen) = hanging_default_and_receiving_beta(|s| {
        s.notification.timeout_ms = 5_000;
        s.notification.per_tenant_concurrency = 2;
    })
    .await;

    // Six of `default`'s runs end: six deliveries of five seconds each, two at a time.
    end_runs_until_attempted(&tm, 6, &started, 2).await;
    // `beta`'s run is notified while `default`'s first two are still hanging (one at a time,
    // as before, it would have waited out all six: thirty seconds).
    beta_is_told(&tm, &beta_key, &beta_seen).await;
    let tried = started.load(SeqCst);
    assert!(tried <= 4, "beta's webhook came after {tried} of default's six attempts, not after all of them");
    // Every one of `default`'s is tried in the end (the waits for their retries unacknowledged
    // hold up none of them), never more than two at once.
    attempted(&started, 6).await;
    assert_eq!(held.1.load(SeqCst), 2, "two of the tenant's deliveries at once, at most");
    // Deliveries waiting for their retries count against no limit of unacknowledged messages
    // (the server's default of 1,000 stopped every delivery once reached).
    let consumer = tm
        .bus
        .jetstream()
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            taskmesh_notification::tenants::consumer_name("default"),
            tm.bus.namespace().deliveries_stream(),
        )
        .await
        .unwrap();
    let info = consumer.get_info().await.unwrap();
    assert_eq!((info.config.max_ack_pending, info.num_ack_pending), (-1, 6), "{info:?}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_with_only_retries_waiting_gives_its_pullers_place_to_another() {
    // One tenant pulled for at a time. `default`'s endpoint refuses its delivery, which then
    // waits ten minutes for its retry.
    let (tm, refused, beta_key, beta_seen) =
        refusing_default_and_receiving_beta(|s| s.notification.tenants_at_once = 1).await;
    let run = tm.submit("name: quick\nsteps:\n  - {id: a, uses: noop}\n").await;
    tm.wait_run(run, Duration::from_secs(30)).await;
    eventually("default's attempt", Duration::from_secs(30), || async {
        Ok((!refused.lock().unwrap().is_empty()).then_some(()))
    })
    .await
    .unwrap();
    // `beta`'s delivery gets the place: the puller with only a retry waiting gives it up.
    beta_is_told(&tm, &beta_key, &beta_seen).await;
    assert_eq!(refused.lock().unwrap().len(), 1, "default's delivery waits for its retry");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_tenant_gives_its_pullers_place_to_another_after_its_slice() {
    // One tenant pulled for at a time, for a slice of 2 s while another waits. `default`'s
    // twelve deliveries keep its puller busy for eighteen seconds, one after another.
    let (tm, started, _, beta_key, beta_seen) = hanging_default_and_receiving_beta(|s| {
        s.notification.tenants_at_once = 1;
        s.notification.tenant_slice_secs = 2;
        s.notification.timeout_ms = 1_500;
        s.notification.per_tenant_concurrency = 1;
    })
    .await;
    const RUNS: usize = 12;
    end_runs_until_attempted(&tm, RUNS, &started, 1).await;
    // `beta`'s delivery waits for the place, which `default`'s puller gives up once its slice
    // is over and its delivery under way has ended, though more of `default`'s are waiting (a
    // busy puller that kept its place would have beta wait for all twelve).
    beta_is_told(&tm, &beta_key, &beta_seen).await;
    let tried = started.load(SeqCst);
    assert!(tried < RUNS, "beta's webhook came after {tried} of default's {RUNS} attempts, not after all of them");
    // `default` gets its place back: every one of its deliveries is tried in the end.
    attempted(&started, RUNS).await;
    tm.finish().await;
}

/// A commit status the forge refuses is not lost without a word: the connection shows its last
/// one given up (when, for which run and commit, why) until a status goes through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_shows_its_last_commit_status_given_up_until_one_goes_through() {
    let tm = spawn_mesh().await;
    // The first run's two statuses (pending, then its outcome) are refused: a wrong token.
    let (api, calls) = forge_stand_in_failing(Vec::new(), 2, (401, r#"{"message": "Bad credentials"}"#)).await;
    // (A step of a second, so that each run's pending status goes before its outcome.)
    let more = serde_json::json!({"status_token": "gh-token", "api_url": api,
        "workflow": {"name": "ci", "steps": [{"id": "test", "run": "sleep 1"}]}});
    let hook = connect(&tm, "github", "binkkatal/sample_app", more).await;
    let connection: uuid::Uuid = hook.rsplit('/').next().unwrap().parse().unwrap();
    let failure_of = |connection: uuid::Uuid| {
        let tm = &tm;
        async move {
            let list = tm.get_json(format!("{}/v1/repo-connections", tm.api)).await;
            list["items"].as_array().unwrap().iter().find(|c| c["id"] == connection.to_string()).unwrap()["status_failure"]
                .clone()
        }
    };
    let shown = || failure_of(connection);
    assert_eq!(shown().await, serde_json::Value::Null, "none before any status");
    let started: serde_json::Value = github_push(&tm, &hook, PUSH, "sf-1").send().await.unwrap().json().await.unwrap();
    let first = started["run_id"].as_str().unwrap().to_string();
    tm.wait_run(first.parse().unwrap(), Duration::from_secs(30)).await;
    let failure = eventually("the refused outcome shown", Duration::from_secs(20), || async {
        let failure = shown().await;
        Ok((failure["state"] == "success").then_some(failure))
    })
    .await
    .unwrap();
    assert_eq!(failure["run_id"], first.as_str(), "{failure}");
    assert_eq!(failure["commit"], "fd489864e7642b48eaad6e3f155c10e46810ec72", "{failure}");
    assert!(failure["error"].as_str().unwrap().contains("401"), "{failure}");
    assert!(failure["at"].is_string(), "{failure}");
    assert_eq!(states_sent(&calls), ["pending", "success"], "each refusal given up at once, not retried");
    // The next run's statuses go through: the failure is cleared, once.
    let started: serde_json::Value = github_push(&tm, &hook, PUSH, "sf-2").send().await.unwrap().json().await.unwrap();
    tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    eventually("the failure cleared", Duration::from_secs(20), || async {
        Ok((states_sent(&calls).len() == 4 && shown().await.is_null()).then_some(()))
    })
    .await
    .unwrap();
    // (The outcome's own look at the log, after its success, has had time to add a second
    // clearing, were it to.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = tm.bus.read_subject(&tm.bus.namespace().repo_statuses("default", connection), 0).await.unwrap();
    let types: Vec<&str> = log.iter().map(|e| e.envelope.type_name()).collect();
    assert_eq!(types, ["CommitStatusFailed", "CommitStatusFailed", "CommitStatusRecovered"]);

    // A failure on record is cleared too when the connection is given another token (or API
    // URL, or repository): it was of the old one.
    let (api, _) = forge_stand_in_failing(Vec::new(), 2, (401, r#"{"message": "Bad credentials"}"#)).await;
    let more = serde_json::json!({"status_token": "gh-token", "api_url": api});
    let hook = connect(&tm, "github", "binkkatal/sample_app", more).await;
    let connection: uuid::Uuid = hook.rsplit('/').next().unwrap().parse().unwrap();
    let started: serde_json::Value = github_push(&tm, &hook, PUSH, "sf-3").send().await.unwrap().json().await.unwrap();
    tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    eventually("the refusal shown", Duration::from_secs(20), || async {
        Ok((!failure_of(connection).await.is_null()).then_some(()))
    })
    .await
    .unwrap();
    let res = tm
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/repo-connections/{connection}"),
            &serde_json::json!({"status_token": "gh-token-2"}),
        )
        .await;
    let seq = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
    let list = tm.get_json_after(format!("{}/v1/repo-connections", tm.api), seq).await;
    let mine = list["items"].as_array().unwrap().iter().find(|c| c["id"] == connection.to_string()).unwrap();
    assert_eq!(mine["status_failure"], serde_json::Value::Null, "{mine}");
    tm.finish().await;
}

/// `POST /v1/runs/{id}/commit-status` sends a push-started run's state to its commit again
/// (here after the forge refused it), which clears the failure shown; a run with no commit,
/// whose connection has no token, or with a newer run of its workflow on its commit, is a 409,
/// and an unknown run a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runs_commit_status_is_sent_again_on_request() {
    let tm = spawn_mesh().await;
    let (api, calls) = forge_stand_in_failing(Vec::new(), 2, (401, r#"{"message": "Bad credentials"}"#)).await;
    let more = serde_json::json!({"status_token": "gh-token", "api_url": api,
        "workflow": {"name": "ci", "steps": [{"id": "test", "run": "sleep 1"}]}});
    let hook = connect(&tm, "github", "binkkatal/sample_app", more).await;
    let resend = |run: &str| resend_status(&tm, run).send();
    let started: serde_json::Value = github_push(&tm, &hook, PUSH, "rs-1").send().await.unwrap().json().await.unwrap();
    let run = started["run_id"].as_str().unwrap().to_string();
    tm.wait_run(run.parse().unwrap(), Duration::from_secs(30)).await;
    let shown = || {
        let tm = &tm;
        async move {
            let list = tm.get_json(format!("{}/v1/repo-connections", tm.api)).await;
            list["items"][0]["status_failure"].clone()
        }
    };
    eventually("the refused outcome shown", Duration::from_secs(20), || async {
        Ok((shown().await["state"] == "success" && states_sent(&calls).len() == 2).then_some(()))
    })
    .await
    .unwrap();
    // (Its pending and its outcome, both refused; a pending sent after the run's end goes as
    // the outcome.)
    assert_eq!(states_sent(&calls)[1], "success");
    // Sent again: the forge takes it now, and the failure is cleared.
    let res = resend(&run).await.unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"state": "success"}));
    eventually("the status sent again and the failure cleared", Duration::from_secs(20), || async {
        Ok((states_sent(&calls).len() == 3 && shown().await.is_null()).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(states_sent(&calls)[2], "success");
    let (code, out, err) = crate::cli::taskmesh(&tm, &["runs", "commit-status", &run]).await;
    assert_eq!((code, out.as_str()), (0, "success queued for the commit\n"), "{err}");
    eventually("the CLI's status sent", Duration::from_secs(20), || async {
        Ok((states_sent(&calls).len() == 4).then_some(()))
    })
    .await
    .unwrap();
    let sent = calls.lock().unwrap()[2].0.clone();
    assert!(sent.ends_with("/repos/binkkatal/sample_app/statuses/fd489864e7642b48eaad6e3f155c10e46810ec72"), "{sent}");
    // A newer run of the workflow on the same commit: the older's state would replace its own,
    // so it is refused, naming the newer, which is sent.
    let started: serde_json::Value = github_push(&tm, &hook, PUSH, "rs-3").send().await.unwrap().json().await.unwrap();
    let newer = started["run_id"].as_str().unwrap().to_string();
    tm.wait_run(newer.parse().unwrap(), Duration::from_secs(30)).await;
    let res = resend(&run).await.unwrap();
    assert_eq!(res.status(), 409);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains(&format!("run {newer} ")), "{problem}");
    assert_eq!(resend(&newer).await.unwrap().status(), 202);

    // A run no push started has no commit; an unknown run is not found.
    let api_run = tm.submit("name: plain\nsteps:\n  - {id: a, run: 'true'}\n").await;
    tm.wait_run(api_run, Duration::from_secs(30)).await;
    let res = resend(&api_run.to_string()).await.unwrap();
    assert_eq!(res.status(), 409);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("not started by a forge push"), "{problem}");
    assert_eq!(resend(&uuid::Uuid::now_v7().to_string()).await.unwrap().status(), 404);
    assert_eq!(resend("not-a-run").await.unwrap().status(), 404);
    // A run of a connection without a token has nothing to send with.
    let quiet = connect(&tm, "github", "binkkatal/other_app", serde_json::json!({})).await;
    let mut body: serde_json::Value = serde_json::from_slice(PUSH).unwrap();
    body["repository"]["full_name"] = "binkkatal/other_app".into();
    let started: serde_json::Value = github_push(&tm, &quiet, &serde_json::to_vec(&body).unwrap(), "rs-2")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let res = resend(started["run_id"].as_str().unwrap()).await.unwrap();
    assert_eq!(res.status(), 409);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("no status_token"), "{problem}");
    // Nor has a run whose connection was deleted.
    let connection = hook.rsplit('/').next().unwrap();
    let deleted = tm.auth(tm.http.delete(format!("{}/v1/repo-connections/{connection}", tm.api))).send().await.unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    tm.wait_projected().await;
    // (The older run is no longer held back by the newer, which cannot be sent again.)
    for run in [&newer, &run] {
        let res = resend(run).await.unwrap();
        assert_eq!(res.status(), 409);
        let problem: serde_json::Value = res.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().contains("was deleted"), "{problem}");
    }
    tm.finish().await;
}

/// A run's state sent again while it runs is `pending`, and goes to its commit as such; once it
/// has ended, its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_runs_commit_status_sent_again_is_pending_then_its_outcome() {
    let tm = spawn_mesh().await;
    let (api, calls) = forge_api().await;
    let more = serde_json::json!({"status_token": "gh-token", "api_url": api,
        "workflow": {"name": "ci", "steps": [{"id": "wait", "run": "sleep 10"}]}});
    let hook = connect(&tm, "github", "binkkatal/sample_app", more).await;
    let started: serde_json::Value = github_push(&tm, &hook, PUSH, "rp-1").send().await.unwrap().json().await.unwrap();
    let run: uuid::Uuid = started["run_id"].as_str().unwrap().parse().unwrap();
    let resend = || resend_status(&tm, run).send();
    // Its own pending first (sent as it was submitted), then the one asked for.
    eventually("the run's pending status", Duration::from_secs(20), || async {
        Ok((states_sent(&calls) == ["pending"]).then_some(()))
    })
    .await
    .unwrap();
    let res = resend().await.unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"state": "pending"}));
    eventually("the pending sent again", Duration::from_secs(20), || async {
        Ok((states_sent(&calls).len() >= 2).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(states_sent(&calls)[1], "pending", "sent again while the run runs");
    let view = tm.wait_run(run, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "succeeded", "{view}");
    let res = resend().await.unwrap();
    assert_eq!(res.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"state": "success"}));
    eventually("the outcome, and the outcome sent again", Duration::from_secs(20), || async {
        Ok((states_sent(&calls).iter().filter(|s| *s == "success").count() == 2).then_some(()))
    })
    .await
    .unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_status_refused_for_a_secondary_rate_limit_waits_a_minute_rather_than_being_dropped() {
    // Retried a second after a failure, were it one.
    let tm = spawn_with(&Svc::ALL, |s| s.notification.retry_delays_secs = vec![1, 1]).await;
    // GitHub's secondary rate limit: a 403 saying so only in its message, no Retry-After.
    let limited = (403, r#"{"message": "You have exceeded a secondary rate limit. Please wait a few minutes."}"#);
    let (api, calls) = forge_stand_in_failing(Vec::new(), usize::MAX, limited).await;
    let more = serde_json::json!({"status_token": "gh-token", "api_url": api,
        "workflow": {"name": "ci", "steps": [{"id": "test", "run": "sleep 1"}]}});
    let hook = connect(&tm, "github", "binkkatal/sample_app", more).await;
    let started: serde_json::Value = github_push(&tm, &hook, PUSH, "rl-1").send().await.unwrap().json().await.unwrap();
    let run = tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
    eventually("the pending and the outcome tried", Duration::from_secs(20), || async {
        Ok((calls.lock().unwrap().len() >= 2).then_some(()))
    })
    .await
    .unwrap();
    // Three seconds on, neither was asked again (a failure's retry would have been) nor
    // dropped (a refusal's would have): both wait in the queue for their minute.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(calls.lock().unwrap().len(), 2, "{:?}", states_sent(&calls));
    let ns = tm.bus.namespace();
    let held = tm.bus.subject_counts(&ns.deliveries_stream(), &ns.delivery("default")).await.unwrap();
    assert_eq!(held.get(&ns.delivery("default")).copied(), Some(2), "{held:?}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcome_status_the_full_delivery_queue_refuses_does_not_hold_up_the_runs_end() {
    let tm = spawn_with(&Svc::ALL, |s| {
        s.nats.deliveries_per_tenant = 1;
        s.notification.retry_delays_secs = vec![600];
    })
    .await;
    // The forge refuses every status: the pending one then waits ten minutes for its retry,
    // filling the tenant's one place in the queue.
    let (api, calls) = forge_stand_in(Vec::new(), usize::MAX).await;
    let more = serde_json::json!({"status_token": "gh-token", "api_url": api,
        "workflow": {"name": "ci", "steps": [{"id": "test", "run": "sleep 1"}]}});
    let hook = connect(&tm, "github", "binkkatal/sample_app", more).await;
    let started: serde_json::Value = github_push(&tm, &hook, PUSH, "q-1").send().await.unwrap().json().await.unwrap();
    assert_eq!(started["outcome"], "started", "{started}");
    let ended = tm.wait_run(started["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(ended["status"], "succeeded");
    // The outcome is dropped, and the scheduler is done with the run's end: nothing of it
    // waits for an ack or a redelivery.
    let ns = tm.bus.namespace();
    eventually("the scheduler done with every event", Duration::from_secs(20), || async {
        let mut consumer = tm
            .bus
            .jetstream()
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                taskmesh_scheduler::CONSUMER,
                ns.events_stream(),
            )
            .await?;
        let info = consumer.info().await?;
        Ok((info.num_ack_pending == 0 && info.num_pending == 0).then_some(()))
    })
    .await
    .unwrap();
    let held = tm.bus.subject_counts(&ns.deliveries_stream(), &ns.delivery("default")).await.unwrap();
    assert_eq!(held.get(&ns.delivery("default")).copied(), Some(1), "the pending status alone: {held:?}");
    assert_eq!(states_sent(&calls), ["pending"]);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steps_and_webhooks_reach_only_the_addresses_the_egress_rules_permit() {
    // Every non-public address denied, but for 127.0.0.1: 127.0.0.2 (loopback too) is not.
    let tm = spawn_with(&Svc::ALL, |s| {
        s.egress.deny_private = true;
        s.egress.allow = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let (permitted, permitted_seen) = receiver_on("127.0.0.1").await;
    let (denied, denied_seen) = receiver_on("127.0.0.2").await;
    subscribe_url(&tm, &permitted).await;
    // An endpoint whose URL names a denied address is refused when it is created.
    let res = post_endpoint(&tm, &denied).await;
    assert_eq!(res.status(), 400);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("egress to 127.0.0.2 is denied"), "{problem}");
    // One created before the rules were tightened (by an ingest with the default rules) is
    // judged at each delivery.
    let keyring = taskmesh::mesh::keyring(&tm.env.settings).unwrap().unwrap();
    taskmesh_ingest::Ingest::new(tm.bus.clone())
        .create_webhook_endpoint(taskmesh_events::command::CreateWebhookEndpoint {
            tenant: "default".into(),
            url: denied.clone(),
            secret: keyring.seal(&taskmesh_secrets::endpoint_secret_aad("default"), b"whsec_AAAA"),
            event_types: vec![],
            format: Default::default(),
        })
        .await
        .unwrap();
    tm.wait_projected().await;
    let ok = permitted.replace("/hook", "/ok");
    let denied_ok = denied.replace("/hook", "/ok");
    let denied_port = denied_ok.rsplit(':').next().unwrap().trim_end_matches("/ok").to_string();
    let id = tm
        .submit(&format!(
            r#"name: egress
steps:
  - {{id: permitted, http: {{url: "{ok}"}}}}
  - {{id: loopback, continue_on_error: true, http: {{url: "{denied_ok}"}}}}
  - {{id: mapped, continue_on_error: true, http: {{url: "http://[::ffff:127.0.0.2]:{denied_port}/ok"}}}}
  - {{id: metadata, continue_on_error: true, http: {{url: "http://169.254.169.254/latest/meta-data/"}}}}
  - {{id: llm, continue_on_error: true, llm: {{base_url: "http://127.0.0.2:{denied_port}/v1", model: m, prompt: hi}}}}
"#
        ))
        .await;
    let run = tm.wait_run(id, Duration::from_secs(60)).await;
    // A repository connection made before the rules were tightened: its pipeline file is not
    // read from a denied address, a 503 that lasts until the connection or the rules change
    // (no Retry-After).
    taskmesh_ingest::Ingest::new(tm.bus.clone())
        .create_repo_connection(taskmesh_events::command::CreateRepoConnection {
            tenant: "default".into(),
            forge: taskmesh_events::Forge::Github,
            repository: "binkkatal/sample_app".into(),
            secret: keyring.seal(&taskmesh_secrets::repo_secret_aad("default"), SECRET.as_bytes()),
            branches: vec!["master".into()],
            tags: vec![],
            paths: vec![],
            workflow: None,
            pipeline_file: Some(".taskmesh.yml".into()),
            status_token: Some(keyring.seal(&taskmesh_secrets::repo_status_token_aad("default"), b"gh-token")),
            api_url: Some(format!("http://127.0.0.2:{denied_port}")),
            submodule_repositories: vec![],
            pull_requests: false,
        })
        .await
        .unwrap();
    tm.wait_projected().await;
    let list: serde_json::Value =
        tm.auth(tm.http.get(format!("{}/v1/repo-connections", tm.api))).send().await.unwrap().json().await.unwrap();
    let hook = format!("{}{}", tm.git, list["items"][0]["webhook_path"].as_str().unwrap());
    let res = github_push(&tm, &hook, PUSH, "e-1").send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("retry-after").is_none(), "{:?}", res.headers());
    let problem: serde_json::Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("egress to 127.0.0.2 is denied"), "{problem}");
    assert_eq!(step(&run, "permitted")["status"], "succeeded", "{run:#}");
    for (name, addr) in
        [("loopback", "127.0.0.2"), ("mapped", "127.0.0.2"), ("metadata", "169.254.169.254"), ("llm", "127.0.0.2")]
    {
        let s = step(&run, name);
        assert_eq!(s["status"], "failed", "{name}: {s:#}");
        let error = s["error"].as_str().unwrap();
        assert!(error.contains(&format!("egress to {addr} is denied")), "{name}: {error}");
    }
    // Both endpoints were due the run's notification; only the permitted one got it.
    eventually("the permitted endpoint's notification", Duration::from_secs(30), || async {
        Ok((!permitted_seen.lock().unwrap().is_empty()).then_some(()))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(denied_seen.lock().unwrap().is_empty(), "nothing reached 127.0.0.2");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_run_is_notified_with_a_valid_standard_webhooks_signature() {
    let tm = spawn_mesh().await;
    let (seen, endpoint) = subscribe(&tm).await;
    let secret = endpoint["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    let key = secret.trim_start_matches("whsec_").to_string();
    // Two more endpoints of the tenant: a run's end is queued for each.
    let others = [subscribe(&tm).await.0, subscribe(&tm).await.0];
    tm.wait_projected().await;

    let id = tm.submit("name: notify-me\nsteps:\n  - {id: a, run: 'exit 1'}\n").await;
    let (headers, body) =
        eventually("the notification", Duration::from_secs(30), || async { Ok(seen.lock().unwrap().first().cloned()) })
            .await
            .unwrap();
    assert_eq!(signed_with(&headers, &body, &secret), (true, 1), "a valid Standard Webhooks signature");
    assert!(!signed_with(&headers, &body, "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").0);
    let payload: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(payload["type"], "run.failed");
    assert_eq!(payload["data"]["run_id"], id.to_string());
    assert_eq!(payload["data"]["failed_steps"], serde_json::json!(["a"]));
    for other in &others {
        eventually("the others' notifications", Duration::from_secs(30), || async {
            Ok((!other.lock().unwrap().is_empty()).then_some(()))
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(seen.lock().unwrap().len(), 1, "delivered once");
    for other in &others {
        let other = other.lock().unwrap();
        assert_eq!(other.len(), 1, "delivered once to each endpoint");
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&other[0].1).unwrap()["data"]["run_id"], id.to_string());
    }
    // The scheduler handed the run's end to the notifier of its own process: nothing went
    // through the queue of runs' ends.
    let ended = tm.stream_state(&tm.bus.namespace().ended_stream()).await;
    assert_eq!(ended.last_sequence, 0, "a run's end went through the queue: {ended:?}");
    // The signing secret is stored sealed: it is in no event and no row.
    assert!(!tm.stream_text(&tm.bus.namespace().events_stream()).await.contains(&key));
    assert!(!tm.postgres_text().await.contains(&key));
    tm.finish().await;
}

/// A change of a webhook endpoint or a repository connection conditional on the version its
/// list shows (`If-Match`) is made only while it is still at that version; the answer's `ETag`
/// is the version after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_or_a_connection_changed_with_if_match_is_changed_only_at_the_version_listed() {
    let tm = spawn_mesh().await;
    let endpoint = subscribe_url(&tm, "http://127.0.0.1:9/hook").await;
    let hook = connect(&tm, "github", "baxterthehacker/public-repo", serde_json::json!({})).await;
    let connection = hook.rsplit('/').next().unwrap().to_string();
    let endpoint = endpoint["id"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    // (list path, item id, a change, another change, the log's subject)
    let ns = tm.bus.namespace();
    let resources = [
        (
            "webhook-endpoints",
            endpoint.clone(),
            serde_json::json!({"event_types": ["run.failed"]}),
            serde_json::json!({"event_types": ["run.succeeded"]}),
            ns.webhook_endpoint("default", endpoint.parse().unwrap()),
        ),
        (
            "repo-connections",
            connection.clone(),
            serde_json::json!({"branches": ["main"]}),
            serde_json::json!({"branches": ["dev"]}),
            ns.repo_connection("default", connection.parse().unwrap()),
        ),
    ];
    for (list, id, change, other, subject) in resources {
        let items = tm.get_json(format!("{}/v1/{list}", tm.api)).await;
        let item = items["items"].as_array().unwrap().iter().find(|i| i["id"] == id.as_str()).unwrap().clone();
        let version = item["version"].as_u64().unwrap_or_else(|| panic!("{list}: {item}"));
        assert_eq!(version, tm.bus.last_seq(&subject).await.unwrap(), "{list}: the version is its last event's");
        let patch = |if_match: String, body: serde_json::Value| {
            let req = tm.auth(tm.http.patch(format!("{}/v1/{list}/{id}", tm.api))).header("if-match", if_match);
            let req = req.header("content-type", "application/merge-patch+json").body(body.to_string());
            async move { req.send().await.unwrap() }
        };
        let res = patch(format!("\"{version}\""), change).await;
        assert_eq!(res.status(), 200, "{list}");
        let etag = res.headers()["etag"].to_str().unwrap().to_string();
        let after = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
        assert_eq!(etag, format!("\"{after}\""), "{list}");
        // The version listed before is stale now: refused, and nothing appended.
        let res = patch(format!("\"{version}\""), other.clone()).await;
        assert_eq!(res.status(), 412, "{list}");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert_eq!(problem["type"], "https://taskmesh.dev/problems/precondition-failed", "{list}: {problem}");
        assert_eq!(tm.bus.last_seq(&subject).await.unwrap(), after, "{list}: a refused change appends nothing");
        // With the new one, it is made; and the list shows the version after it.
        let res = patch(etag, other).await;
        assert_eq!(res.status(), 200, "{list}");
        let last = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
        let items = tm.get_json_after(format!("{}/v1/{list}", tm.api), last).await;
        let item = items["items"].as_array().unwrap().iter().find(|i| i["id"] == id.as_str()).unwrap().clone();
        assert_eq!(item["version"], last, "{list}: {item}");
    }
    // Any event on an endpoint's log moves its version, a rotation of its secret too; one
    // deleted is a 404, not a 412.
    let path = format!("{}/v1/webhook-endpoints/{endpoint}", tm.api);
    let before =
        tm.bus.last_seq(&tm.bus.namespace().webhook_endpoint("default", endpoint.parse().unwrap())).await.unwrap();
    let res = tm.auth(tm.http.post(format!("{path}/rotate-secret"))).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let rotated = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
    let refilter = |if_match: String| {
        let req = tm.auth(tm.http.patch(&path)).header("if-match", if_match).header("content-type", "application/json");
        async move { req.body(r#"{"event_types": []}"#).send().await.unwrap().status() }
    };
    assert_eq!(refilter(format!("\"{before}\"")).await, 412, "rotated since");
    let delete_if = |path: String, version: u64| {
        let req = tm.auth(tm.http.delete(path)).header("if-match", format!("\"{version}\""));
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(delete_if(path.clone(), before).await, 412, "a deletion at a stale version");
    assert_eq!(delete_if(path.clone(), rotated).await, 204, "a deletion at the current one");
    assert_eq!(delete_if(path.clone(), before).await, 204, "deleted already");
    tm.wait_projected().await;
    assert_eq!(refilter(format!("\"{before}\"")).await, 404, "deleted");
    // A connection's too.
    let connection_path = format!("{}/v1/repo-connections/{connection}", tm.api);
    let subject = tm.bus.namespace().repo_connection("default", connection.parse().unwrap());
    let current = tm.bus.last_seq(&subject).await.unwrap();
    assert_eq!(
        delete_if(connection_path.clone(), current - 1).await,
        412,
        "a connection's deletion at a stale version"
    );
    assert_eq!(delete_if(connection_path, current).await, 204);
    tm.finish().await;
}

/// The notifiers keep a tenant's endpoints in memory and forget them when told of a change of
/// them; a new version alone (a failed delivery recorded moves it) is not announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoints_new_version_alone_is_not_announced_to_the_notifiers() {
    let tm = spawn_mesh().await;
    let endpoint = subscribe_url(&tm, "http://127.0.0.1:9/hook").await;
    let id: uuid::Uuid = endpoint["id"].as_str().unwrap().parse().unwrap();
    tm.wait_projected().await;
    // (A pool of its own: the listener holds its connection.)
    let own = sqlx::postgres::PgPoolOptions::new().connect_lazy_with((*tm.pool.connect_options()).clone());
    let mut listener = sqlx::postgres::PgListener::connect_with(&own).await.unwrap();
    listener.listen(taskmesh_store::WEBHOOK_ENDPOINTS_CHANNEL).await.unwrap();
    for change in ["version = version + 1", "event_types = '{run.failed}'"] {
        let sql = format!("UPDATE webhook_endpoints SET {change} WHERE id = $1");
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).execute(&tm.pool).await.unwrap();
    }
    let told = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.unwrap().unwrap();
    assert_eq!(told.payload(), "default");
    let more = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(more.is_err(), "announced twice: the version alone too");
    tm.finish().await;
}

/// An endpoint changed in place: a new URL is where its notifications go and new event types
/// choose them; a rotated secret signs beside the one it replaced for the time asked (each
/// verifies the delivery alone), or alone; what a new endpoint could not have is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_is_moved_refiltered_and_its_secret_rotated_in_place() {
    let tm = spawn_mesh().await;
    let (first, first_seen) = receiver().await;
    let (second, second_seen) = receiver().await;
    let endpoint = subscribe_url(&tm, &first).await;
    let id = endpoint["id"].as_str().unwrap().to_string();
    let original = endpoint["secret"].as_str().unwrap().to_string();
    let path = format!("{}/v1/webhook-endpoints/{id}", tm.api);
    let send = |method: reqwest::Method, url: String, body: Option<serde_json::Value>| {
        let mut req = tm.auth(tm.http.request(method, url));
        if let Some(body) = body {
            req = req.header("content-type", "application/merge-patch+json").body(body.to_string());
        }
        async move { req.send().await.unwrap() }
    };
    let patch = |body: serde_json::Value| send(reqwest::Method::PATCH, path.clone(), Some(body));
    let rotate = |body: Option<serde_json::Value>| send(reqwest::Method::POST, format!("{path}/rotate-secret"), body);
    // Whether `secret` alone verifies the `n`th delivery to `seen`, and how many signatures
    // it carried.
    let verifies = |seen: &Received, n: usize, secret: &str| {
        let (headers, body) = seen.lock().unwrap()[n].clone();
        signed_with(&headers, &body, secret)
    };
    let delivered = |seen: Received, n: usize| async move {
        eventually("a delivery", Duration::from_secs(30), || async {
            Ok((seen.lock().unwrap().len() >= n).then_some(()))
        })
        .await
        .unwrap()
    };
    tm.wait_projected().await;

    // Moved, and told only of failures.
    let res = patch(serde_json::json!({"url": second, "event_types": ["run.failed"]})).await;
    assert_eq!(res.status(), 200);
    tm.wait_projected().await;
    // The run each delivery was for.
    let run_of = |n: usize| {
        let payload: serde_json::Value = serde_json::from_slice(&second_seen.lock().unwrap()[n].1).unwrap();
        payload["data"]["run_id"].as_str().unwrap().to_string()
    };
    let failed = tm.submit("name: fails\nsteps:\n  - {id: a, run: 'exit 1'}\n").await;
    delivered(second_seen.clone(), 1).await;
    assert_eq!(run_of(0), failed.to_string());
    assert_eq!(verifies(&second_seen, 0, &original), (true, 1));
    let succeeded = tm.submit("name: passes\nsteps:\n  - {id: a, run: 'true'}\n").await;
    tm.wait_run(succeeded, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(second_seen.lock().unwrap().len(), 1, "a success is not among its events now");

    // Rotated: the new secret and the one it replaced both sign, each alone verifying.
    let res = rotate(None).await;
    assert_eq!(res.status(), 200);
    let rotated: serde_json::Value = res.json().await.unwrap();
    let new = rotated["secret"].as_str().unwrap().to_string();
    assert!(new.starts_with("whsec_") && new != original, "{rotated}");
    let until: chrono::DateTime<chrono::Utc> = rotated["previous_valid_until"].as_str().unwrap().parse().unwrap();
    let day = until - chrono::Utc::now();
    assert!(day > chrono::Duration::hours(23) && day <= chrono::Duration::hours(24), "a day by default: {rotated}");
    let listed = tm.get_json_after(format!("{}/v1/webhook-endpoints", tm.api), rotated["seq"].as_u64().unwrap()).await;
    assert_eq!(listed["items"][0]["previous_secret_until"], rotated["previous_valid_until"], "{listed}");
    assert_eq!(listed["items"][0]["url"], second.as_str(), "{listed}");
    let failed = tm.submit("name: fails\nsteps:\n  - {id: a, run: 'exit 1'}\n").await;
    delivered(second_seen.clone(), 2).await;
    assert_eq!(run_of(1), failed.to_string(), "not the success's, sent late");
    assert_eq!(verifies(&second_seen, 1, &new), (true, 2));
    assert_eq!(verifies(&second_seen, 1, &original), (true, 2));

    // Rotated at once: the newest alone signs.
    let res = rotate(Some(serde_json::json!({"previous_valid_seconds": 0}))).await;
    assert_eq!(res.status(), 200);
    let newest: serde_json::Value = res.json().await.unwrap();
    assert_eq!(newest["previous_valid_until"], serde_json::Value::Null);
    let newest_seq = newest["seq"].clone();
    let newest = newest["secret"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    let failed = tm.submit("name: fails\nsteps:\n  - {id: a, run: 'exit 1'}\n").await;
    delivered(second_seen.clone(), 3).await;
    assert_eq!(run_of(2), failed.to_string());
    assert_eq!(verifies(&second_seen, 2, &newest), (true, 1));
    assert!(!verifies(&second_seen, 2, &new).0, "the secret replaced no longer signs");

    // Refused as a new endpoint's would be, and appending nothing.
    let before = tm.event_count().await;
    for (body, field) in [
        (serde_json::json!({"url": "ftp://hooks.example/x"}), "url"),
        (serde_json::json!({"url": null}), "url"),
        (serde_json::json!({"event_types": ["run.exploded"]}), "event_types"),
        (serde_json::json!({"format": "slack"}), "format"),
    ] {
        let res = patch(body.clone()).await;
        assert_eq!(res.status(), 400, "{body}");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().contains(field), "{body}: {problem}");
    }
    let res = rotate(Some(serde_json::json!({"previous_valid_seconds": 604_801}))).await;
    assert_eq!(res.status(), 400);
    // A patch that changes nothing appends nothing either, and answers the last event's seq.
    let res = patch(serde_json::json!({})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["seq"], newest_seq);
    assert_eq!(tm.event_count().await, before, "refusals and a change to nothing append nothing");

    // The secret replaced signs only for the time given: 1 s, then the newest alone.
    let res = rotate(Some(serde_json::json!({"previous_valid_seconds": 1}))).await;
    assert_eq!(res.status(), 200);
    let briefly: serde_json::Value = res.json().await.unwrap();
    let until: chrono::DateTime<chrono::Utc> = briefly["previous_valid_until"].as_str().unwrap().parse().unwrap();
    tm.wait_projected().await;
    let left = (until - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(200)).await;
    let listed = tm.get_json(format!("{}/v1/webhook-endpoints", tm.api)).await;
    assert_eq!(listed["items"][0]["previous_secret_until"], serde_json::Value::Null, "{listed}");
    let failed = tm.submit("name: fails\nsteps:\n  - {id: a, run: 'exit 1'}\n").await;
    delivered(second_seen.clone(), 4).await;
    assert_eq!(run_of(3), failed.to_string());
    assert_eq!(verifies(&second_seen, 3, briefly["secret"].as_str().unwrap()), (true, 1), "the old one expired");

    // `null` event types: every event again.
    let res = patch(serde_json::json!({"event_types": null})).await;
    assert_eq!(res.status(), 200);
    let seq = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
    let listed = tm.get_json_after(format!("{}/v1/webhook-endpoints", tm.api), seq).await;
    assert_eq!(listed["items"][0]["event_types"], serde_json::json!([]), "{listed}");

    // The secrets are stored sealed.
    for secret in [&new, &newest] {
        let key = secret.trim_start_matches("whsec_");
        assert!(!tm.stream_text(&tm.bus.namespace().events_stream()).await.contains(key));
        assert!(!tm.postgres_text().await.contains(key));
    }

    // Another's, or a deleted one, is a 404.
    let unknown = format!("{}/v1/webhook-endpoints/{}", tm.api, uuid::Uuid::now_v7());
    assert_eq!(send(reqwest::Method::PATCH, unknown.clone(), Some(serde_json::json!({}))).await.status(), 404);
    assert_eq!(send(reqwest::Method::POST, format!("{unknown}/rotate-secret"), None).await.status(), 404);
    let res = send(reqwest::Method::DELETE, path.clone(), None).await;
    let deleted = TestMesh::written_seq(&res);
    tm.get_json_after(format!("{}/v1/webhook-endpoints", tm.api), deleted).await;
    assert_eq!(patch(serde_json::json!({"event_types": []})).await.status(), 404);
    assert_eq!(rotate(None).await.status(), 404);
    assert!(first_seen.lock().unwrap().is_empty(), "nothing went to the old URL");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slack_endpoint_is_told_how_a_run_ended_with_a_link_to_it() {
    // The dashboard is under the gateway's public URL: messages link to the run there.
    let tm = spawn_with(&Svc::ALL, |s| s.gateway.public_url = Some("https://tm.example".into())).await;
    let (url, seen) = receiver().await;
    let body = serde_json::json!({"url": url, "format": "slack", "event_types": ["run.failed"]});
    let res = tm.send_json(reqwest::Method::POST, "/v1/webhook-endpoints", &body).await;
    assert_eq!(res.status(), 201);
    let bad = serde_json::json!({"url": url, "format": "teams"});
    let res = tm.send_json(reqwest::Method::POST, "/v1/webhook-endpoints", &bad).await;
    assert_eq!(res.status(), 400, "an unknown format");
    tm.wait_projected().await;
    let listed: serde_json::Value =
        tm.auth(tm.http.get(format!("{}/v1/webhook-endpoints", tm.api))).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["items"][0]["format"], "slack", "{listed}");

    let id = tm.submit("name: nightly\nsteps:\n  - {id: build, run: 'exit 1'}\n").await;
    let (_, body) =
        eventually("the message", Duration::from_secs(30), || async { Ok(seen.lock().unwrap().first().cloned()) })
            .await
            .unwrap();
    let message: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let text = format!(":x: <https://tm.example/ui/#/runs/{id}|nightly> failed (run `{id}`)\nFailed steps: `build`");
    assert_eq!(message, serde_json::json!({ "text": text }));
    // A run that succeeds is not of the types it asked for.
    let ok = tm.submit("name: nightly\nsteps:\n  - {id: build, run: 'true'}\n").await;
    tm.wait_run(ok, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(seen.lock().unwrap().len(), 1, "one message, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slack_refusal_is_not_retried_and_a_retry_after_is_waited_out() {
    let tm = spawn_with(&Svc::ALL, |s| s.notification.retry_delays_secs = vec![1, 1]).await;
    // `/slack` answers as Slack does for a deleted channel; `/standard` the same 404 (a
    // Standard Webhooks endpoint mid-deploy, say); `/busy` asks for three seconds' rest once.
    let hits: Arc<Mutex<Vec<(String, std::time::Instant)>>> = Arc::default();
    let store = hits.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let store = store.clone();
        async move {
            use axum::response::IntoResponse;
            let path = uri.path().to_string();
            let before = store.lock().unwrap().iter().filter(|(p, _)| *p == path).count();
            store.lock().unwrap().push((path.clone(), std::time::Instant::now()));
            match path.as_str() {
                "/busy" if before == 0 => {
                    (axum::http::StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3")], "").into_response()
                }
                "/busy" => "ok".into_response(),
                _ => (axum::http::StatusCode::NOT_FOUND, "channel_not_found").into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut ids = std::collections::HashMap::new();
    for (path, format) in [("slack", "slack"), ("standard", "standard_webhooks"), ("busy", "slack")] {
        let body = serde_json::json!({"url": format!("{base}/{path}"), "format": format});
        let res = tm.send_json(reqwest::Method::POST, "/v1/webhook-endpoints", &body).await;
        assert_eq!(res.status(), 201);
        let created = res.json::<serde_json::Value>().await.unwrap();
        ids.insert(path, created["id"].as_str().unwrap().to_string());
    }
    tm.wait_projected().await;
    let id = tm.submit("name: told\nsteps:\n  - {id: a, run: 'true'}\n").await;
    tm.wait_run(id, Duration::from_secs(30)).await;
    let count = |path: &str| hits.lock().unwrap().iter().filter(|(p, _)| p == path).count();
    // The standard endpoint is tried three times (the first attempt and two retries).
    eventually("the standard endpoint's retries", Duration::from_secs(30), || async {
        Ok((count("/standard") == 3 && count("/busy") == 2).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(count("/slack"), 1, "Slack's 404 is not asked again");
    let busy: Vec<std::time::Instant> =
        hits.lock().unwrap().iter().filter(|(p, _)| p == "/busy").map(|(_, at)| *at).collect();
    let waited = busy[1] - busy[0];
    assert!(waited >= Duration::from_millis(2900), "Retry-After 3 was waited out, not the schedule's 1 s: {waited:?}");
    // Slack's refusal and the standard endpoint's last failure are listed as failed
    // deliveries, each with the attempts it had; the busy endpoint's delivery, which got
    // through, is not.
    let (slack, standard) = eventually("the failures listed", Duration::from_secs(10), || async {
        let (slack, standard) = (failed_items(&tm, &ids["slack"]).await, failed_items(&tm, &ids["standard"]).await);
        Ok((slack.len() == 1 && standard.len() == 1).then_some((slack, standard)))
    })
    .await
    .unwrap();
    for (entry, attempts) in [(&slack[0], 1), (&standard[0], 3)] {
        assert_eq!(entry["attempts"], attempts, "{entry}");
        assert!(entry["error"].as_str().unwrap().contains("404"), "{entry}");
        assert_eq!(entry["payload"]["type"], "run.succeeded", "the event, as a standard endpoint is sent it: {entry}");
    }
    // Were busy's delivery given up, its failure would be recorded right after its attempt.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tm.wait_projected().await;
    assert!(failed_items(&tm, &ids["busy"]).await.is_empty());
    tm.finish().await;
}

/// aiosmtpd (a real SMTP server, from PyPI into the tests' virtualenv by
/// `scripts/lib/python-tools.sh`) listening on a free port, keeping what it receives in the
/// maildir `dir` and the recipients it was asked for in `dir.rcpt`; it refuses `gone@` for
/// good and `later@` once (`tests/python/smtp_refusing.py`). None where it is not installed
/// (outside CI).
async fn smtp_server(dir: &std::path::Path) -> Option<(tokio::process::Child, u16)> {
    let venv = std::env::var_os("TM_PYTHON_TOOLS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".taskmesh/venv"));
    let python = venv.join("bin/python");
    let installed =
        std::process::Command::new(&python).args(["-c", "import aiosmtpd"]).status().is_ok_and(|s| s.success());
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "aiosmtpd is missing from {} (scripts/test installs it)",
            venv.display()
        );
        eprintln!("skipped: aiosmtpd is not installed (scripts/test installs it)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = tokio::process::Command::new(&python)
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "smtp_refusing.RefusingMailbox"])
        .arg(dir)
        .env("PYTHONPATH", std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting aiosmtpd");
    eventually("the SMTP server to listen", Duration::from_secs(30), || async {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ()))
    })
    .await
    .unwrap();
    Some((child, port))
}

/// The messages in maildir `dir`, as text, oldest first.
fn mails(dir: &std::path::Path) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("new")).into_iter().flatten().flatten().collect();
    files.sort_by_key(|f| f.metadata().and_then(|m| m.modified()).ok());
    files.iter().map(|f| std::fs::read_to_string(f.path()).unwrap()).collect()
}

/// A mesh mailing through an [`smtp_server`] of its own, from `taskmesh@example.com` to
/// `example.com` only (and set as `tweak` says).
struct Mailing {
    tm: TestMesh,
    maildir: std::path::PathBuf,
    _smtp: tokio::process::Child,
    _dir: tempfile::TempDir,
}

/// A [`Mailing`] mesh (bind every field: the server and its maildir go with theirs); None
/// where aiosmtpd is not installed (outside CI).
async fn mailing_mesh(tweak: impl FnOnce(&mut taskmesh_config::Settings)) -> Option<Mailing> {
    let dir = tempfile::tempdir().unwrap();
    // aiosmtpd makes the maildir (and its tmp, new and cur) only where nothing is.
    let maildir = dir.path().join("mail");
    let (smtp, port) = smtp_server(&maildir).await?;
    let tm = spawn_with(&Svc::ALL, |s| {
        s.notification.smtp_url = Some(secrecy::SecretString::from(format!("smtp://127.0.0.1:{port}")));
        s.notification.email_from = Some("Taskmesh <taskmesh@example.com>".into());
        s.notification.email_domains = vec!["example.com".into()];
        tweak(s);
    })
    .await;
    Some(Mailing { tm, maildir, _smtp: smtp, _dir: dir })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_endpoint_is_mailed_how_a_run_ended_through_the_smtp_server() {
    let Some(Mailing { tm, maildir, _smtp, _dir }) =
        mailing_mesh(|s| s.gateway.public_url = Some("https://tm.example".into())).await
    else {
        return;
    };
    let create = |body: serde_json::Value| {
        let tm = &tm;
        async move { tm.send_json(reqwest::Method::POST, "/v1/webhook-endpoints", &body).await }
    };
    let res = create(serde_json::json!({"url": "mailto:ops@example.com, dev@example.com", "format": "email",
        "event_types": ["run.failed"]}))
    .await;
    assert_eq!(res.status(), 201);
    let endpoint = res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    // Headers, not a mailto: URL, not an address, a domain e-mail may not go to.
    for bad in [
        "mailto:ops@example.com?cc=boss@example.com",
        "https://example.com/hook",
        "mailto:ops",
        "mailto:ops@example.org",
    ] {
        let res = create(serde_json::json!({"url": bad, "format": "email"})).await;
        assert_eq!(res.status(), 400, "{bad}");
    }
    // A mailto: URL is an e-mail endpoint's only.
    assert_eq!(create(serde_json::json!({"url": "mailto:ops@example.com"})).await.status(), 400);
    tm.wait_projected().await;
    // Its mails are not signed: it has no secret to rotate. A new address is checked as a new
    // endpoint's is.
    let endpoint_path = format!("/v1/webhook-endpoints/{endpoint}");
    let res =
        tm.send_json(reqwest::Method::POST, &format!("{endpoint_path}/rotate-secret"), &serde_json::json!({})).await;
    assert_eq!(res.status(), 400);
    let moved = serde_json::json!({"url": "https://example.com/hook"});
    assert_eq!(tm.send_json(reqwest::Method::PATCH, &endpoint_path, &moved).await.status(), 400);

    let failed = tm.submit("name: nightly\nsteps:\n  - {id: build, run: 'exit 1'}\n").await;
    // One SMTP transaction a recipient.
    let first = eventually("the e-mails", Duration::from_secs(30), || async {
        let all = mails(&maildir);
        Ok((all.len() >= 2).then_some(all))
    })
    .await
    .unwrap();
    let events = tm.run_events(failed).await;
    let end = events.iter().rev().find(|e| e.event.is_run_terminal()).unwrap();
    let mut rcpt: Vec<String> = first.iter().map(|m| mail_header(m, "X-RcptTo")).collect();
    rcpt.sort();
    assert_eq!(rcpt, ["dev@example.com", "ops@example.com"]);
    for mail in &first {
        for expected in [
            "From: Taskmesh <taskmesh@example.com>".to_string(),
            "To: ops@example.com, dev@example.com".to_string(),
            "Subject: [Taskmesh] nightly failed".to_string(),
            "Auto-Submitted: auto-generated".to_string(),
            format!("Message-ID: <{}.{endpoint}@taskmesh>", end.id),
            format!(
                "The run {failed} of nightly failed.\nFailed steps: build\n\nhttps://tm.example/ui/#/runs/{failed}"
            ),
        ] {
            assert!(mail.replace("\r\n", "\n").contains(&expected), "{expected} in\n{mail}");
        }
    }
    // A run that succeeds is not of the types it asked for; the next failure is mailed.
    let ok = tm.submit("name: nightly\nsteps:\n  - {id: build, run: 'true'}\n").await;
    tm.wait_run(ok, Duration::from_secs(30)).await;
    let again = tm.submit("name: again\nsteps:\n  - {id: build, run: 'exit 1'}\n").await;
    tm.wait_run(again, Duration::from_secs(30)).await;
    eventually("the second e-mails", Duration::from_secs(30), || async {
        Ok((mails(&maildir).len() >= 4).then_some(()))
    })
    .await
    .unwrap();
    let all = mails(&maildir);
    assert_eq!(all.len(), 4, "the success is not mailed");
    assert!(all.iter().all(|m| m.contains("failed")), "{all:?}");

    // An ingest whose notifiers have no SMTP server refuses e-mail endpoints.
    let keyring = taskmesh::mesh::keyring(&tm.env.settings).unwrap().unwrap();
    let refused = taskmesh_ingest::Ingest::new(tm.bus.clone())
        .create_webhook_endpoint(taskmesh_events::command::CreateWebhookEndpoint {
            tenant: "default".into(),
            url: "mailto:ops@example.com".into(),
            secret: keyring.seal(&taskmesh_secrets::endpoint_secret_aad("default"), b"whsec_AAAA"),
            event_types: vec![],
            format: taskmesh_events::EndpointFormat::Email,
        })
        .await
        .unwrap_err();
    assert!(refused.detail.contains("SMTP"), "{refused:?}");
    tm.finish().await;
}

/// Waits for later@'s e-mail, then `settle` more (for any further attempt to show), and checks
/// that ops@ and later@ each have it once, under one `Message-ID`; the mails.
async fn mailed_ops_and_later_once(maildir: &std::path::Path, settle: Duration) -> Vec<String> {
    eventually("later@'s e-mail", Duration::from_secs(30), || async {
        Ok(mails(maildir).iter().any(|m| mail_header(m, "X-RcptTo") == "later@example.com").then_some(()))
    })
    .await
    .unwrap();
    tokio::time::sleep(settle).await;
    let all = mails(maildir);
    let mut to: Vec<String> = all.iter().map(|m| mail_header(m, "X-RcptTo")).collect();
    to.sort();
    assert_eq!(to, ["later@example.com", "ops@example.com"], "ops@ has it once: {all:?}");
    let ids: std::collections::BTreeSet<String> = all.iter().map(|m| mail_header(m, "Message-ID")).collect();
    assert_eq!(ids.len(), 1, "one message, sent again: {ids:?}");
    all
}

/// The recipients aiosmtpd was asked for (`RCPT TO`), in order.
fn asked(maildir: &std::path::Path) -> Vec<String> {
    let log = std::fs::read_to_string(maildir.with_extension("rcpt")).unwrap_or_default();
    log.lines().map(str::to_string).collect()
}

/// A mail's `name:` header's value.
fn mail_header(mail: &str, name: &str) -> String {
    let prefix = format!("{name}: ");
    mail.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_default().trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_reaches_the_recipients_the_server_takes_and_one_refused_for_good_is_not_asked_again() {
    let Some(Mailing { tm, maildir, _smtp, _dir }) =
        mailing_mesh(|s| s.notification.retry_delays_secs = vec![1, 1]).await
    else {
        return;
    };
    // Created when e-mail could also go to example.org; the notifiers' list has been narrowed
    // since. And one whose only recipient the server will never take.
    let mut wider = tm.env.settings.notification.clone();
    wider.email_domains.push("example.org".into());
    let keyring = taskmesh::mesh::keyring(&tm.env.settings).unwrap().unwrap();
    let ingest = taskmesh_ingest::Ingest::new(tm.bus.clone()).with_email(&wider);
    let mut endpoints = Vec::new();
    // And one whose recipients are refused for good, one on the first attempt, the other on
    // the retry.
    for url in [
        "mailto:ops@example.com, gone@example.com, later@example.com, stranger@example.org",
        "mailto:gone@lists.example.com",
        "mailto:gone@mail.example.com, closing@example.com",
    ] {
        let created = ingest
            .create_webhook_endpoint(taskmesh_events::command::CreateWebhookEndpoint {
                tenant: "default".into(),
                url: url.into(),
                secret: keyring.seal(&taskmesh_secrets::endpoint_secret_aad("default"), b"whsec_AAAA"),
                event_types: vec![],
                format: taskmesh_events::EndpointFormat::Email,
            })
            .await
            .unwrap();
        endpoints.push(created.id);
    }
    tm.wait_projected().await;

    let run = tm.submit("name: nightly\nsteps:\n  - {id: build, run: 'true'}\n").await;
    tm.wait_run(run, Duration::from_secs(30)).await;
    // The first attempt mails ops@ and is refused gone@ for good and later@ for now; the retry,
    // a second on, asks only later@, the one left, under the same Message-ID.
    // Two more attempts would have come 2.5 s on, were either delivery still retried.
    let all = mailed_ops_and_later_once(&maildir, Duration::from_millis(2500)).await;
    for mail in &all {
        assert_eq!(mail_header(mail, "To"), "ops@example.com, gone@example.com, later@example.com", "{mail}");
    }
    let asked = asked(&maildir);
    let times = |address: &str| asked.iter().filter(|a| a.as_str() == address).count();
    assert_eq!(times("gone@example.com"), 1, "refused for good, not asked on the retry: {asked:?}");
    assert_eq!(times("ops@example.com"), 1, "took it, not asked on the retry: {asked:?}");
    assert_eq!(times("gone@lists.example.com"), 1, "refused for good: not asked again: {asked:?}");
    assert_eq!(times("stranger@example.org"), 0, "not in the domains e-mail may go to: {asked:?}");
    assert_eq!(times("gone@mail.example.com"), 1, "refused for good, not asked on the retry: {asked:?}");
    assert_eq!(times("closing@example.com"), 2, "refused for now, then for good on the retry: {asked:?}");
    // The endpoint whose every recipient was refused for good lists its delivery as failed,
    // after its one attempt; the other, whose recipients all took it or were refused, none.
    let refused = eventually("the refused e-mail listed", Duration::from_secs(10), || async {
        let items = failed_items(&tm, &endpoints[1]).await;
        Ok((!items.is_empty()).then_some(items))
    })
    .await
    .unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["attempts"], 1, "{refused:?}");
    let error = refused[0]["error"].as_str().unwrap();
    assert!(error.contains("refused every recipient") && error.contains("gone@lists.example.com"), "{error}");
    assert_eq!(refused[0]["payload"]["data"]["run_id"], run.to_string());
    tm.wait_projected().await;
    assert!(failed_items(&tm, &endpoints[0]).await.is_empty());
    // Refused every recipient over two attempts: the failure names both.
    let closing = eventually("the e-mail refused over two attempts listed", Duration::from_secs(10), || async {
        let items = failed_items(&tm, &endpoints[2]).await;
        Ok((!items.is_empty()).then_some(items))
    })
    .await
    .unwrap();
    assert_eq!(closing[0]["attempts"], 2, "{closing:?}");
    let error = closing[0]["error"].as_str().unwrap();
    for address in ["refused every recipient", "gone@mail.example.com", "closing@example.com"] {
        assert!(error.contains(address), "{address} in {error}");
    }
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_email_sent_again_on_request_mails_only_the_addresses_left() {
    // One attempt a delivery: an address refused for now fails the delivery at once.
    let Some(Mailing { tm, maildir, _smtp, _dir }) = mailing_mesh(|s| s.notification.retry_delays_secs = vec![]).await
    else {
        return;
    };
    let body = serde_json::json!({"url": "mailto:ops@example.com, later@example.com", "format": "email"});
    let res = tm.send_json(reqwest::Method::POST, "/v1/webhook-endpoints", &body).await;
    assert_eq!(res.status(), 201);
    let endpoint = res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    let run = tm.submit("name: nightly\nsteps:\n  - {id: build, run: 'true'}\n").await;
    tm.wait_run(run, Duration::from_secs(30)).await;
    // ops@ took it; later@ was refused it for now (once), and with no retry left the delivery
    // is given up and listed.
    let failed = failed_deliveries(&tm, &endpoint);
    let item = eventually("the e-mail listed as failed", Duration::from_secs(30), || async {
        Ok(failed_items(&tm, &endpoint).await.first().cloned())
    })
    .await
    .unwrap();
    let res = retry_one(&tm, &failed, item["message_id"].as_str().unwrap()).await;
    assert_eq!(res.status(), 202);
    mailed_ops_and_later_once(&maildir, Duration::from_millis(500)).await;
    let asked = asked(&maildir);
    let times = |address: &str| asked.iter().filter(|a| a.as_str() == address).count();
    assert_eq!(
        (times("ops@example.com"), times("later@example.com")),
        (1, 2),
        "only the one left asked again: {asked:?}"
    );
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_webhook_endpoint_is_sent_nothing_more() {
    let tm = spawn_mesh().await;
    let (seen, endpoint) = subscribe(&tm).await;
    let id = endpoint["id"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    let first = tm.submit("name: before\nsteps:\n  - {id: a, run: 'true'}\n").await;
    tm.wait_run(first, Duration::from_secs(30)).await;
    eventually("the first notification", Duration::from_secs(30), || async {
        Ok((seen.lock().unwrap().len() == 1).then_some(()))
    })
    .await
    .unwrap();

    let res = tm.auth(tm.http.delete(format!("{}/v1/webhook-endpoints/{id}", tm.api))).send().await.unwrap();
    let deleted = TestMesh::written_seq(&res);
    let again = tm.auth(tm.http.delete(format!("{}/v1/webhook-endpoints/{id}", tm.api))).send().await.unwrap();
    assert_eq!(TestMesh::written_seq(&again), deleted, "deleting twice is fine, and answers the deletion's seq");
    let listed = tm.get_json_after(format!("{}/v1/webhook-endpoints", tm.api), deleted).await;
    assert!(!listed["items"].as_array().unwrap().iter().any(|e| e["id"] == id.as_str()), "{listed}");
    let never = tm
        .auth(tm.http.delete(format!("{}/v1/webhook-endpoints/{}", tm.api, uuid::Uuid::now_v7())))
        .send()
        .await
        .unwrap();
    assert_eq!(never.status(), 404);
    tm.wait_projected().await;
    let list = tm.get_json(format!("{}/v1/webhook-endpoints", tm.api)).await;
    assert_eq!(list["items"], serde_json::json!([]));

    let second = tm.submit("name: after\nsteps:\n  - {id: a, run: 'true'}\n").await;
    tm.wait_run(second, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing is sent to a deleted endpoint");

    // The notifier keeps a tenant's endpoints in memory between runs' ends (it has just kept
    // "none"): an endpoint added since is told of the next run's end all the same.
    let (later, _) = subscribe(&tm).await;
    tm.wait_projected().await;
    let third = tm.submit("name: later\nsteps:\n  - {id: a, run: 'true'}\n").await;
    eventually("the new endpoint's notification", Duration::from_secs(30), || async {
        Ok(later.lock().unwrap().first().cloned())
    })
    .await
    .unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&later.lock().unwrap()[0].1).unwrap();
    assert_eq!(payload["data"]["run_id"], third.to_string());
    assert_eq!(seen.lock().unwrap().len(), 1, "the deleted endpoint still hears nothing");
    tm.finish().await;
}

/// A git server over smart HTTP (`git http-backend`, as forges run it) for the bare
/// repositories under `root`, at `/<owner>/<name>.git`. With `token`, a git request must carry
/// GitHub's basic authentication for it (`x-access-token`), else `401`. Every git request's
/// `Authorization` header (or `None`) is kept; anything else is a forge API stand-in answering
/// `POST`s `201` (commit statuses) and the rest `404`.
async fn git_forge(root: std::path::PathBuf, token: Option<&str>) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    use base64::Engine as _;
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let store = seen.clone();
    let expected = token
        .map(|t| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{t}"))));
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (root, store, expected) = (root.clone(), store.clone(), expected.clone());
        async move {
            use axum::response::IntoResponse;
            let path = req.uri().path().to_string();
            if !path.contains(".git/") {
                let status = if req.method() == axum::http::Method::POST { 201 } else { 404 };
                return (axum::http::StatusCode::from_u16(status).unwrap(), "{}").into_response();
            }
            let headers = req.headers().clone();
            let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(String::from);
            let auth = header("authorization");
            store.lock().unwrap().push(auth.clone());
            if expected.is_some() && auth != expected {
                return (axum::http::StatusCode::UNAUTHORIZED, [("www-authenticate", "Basic realm=\"git\"")], "")
                    .into_response();
            }
            let mut cgi = tokio::process::Command::new("git");
            cgi.arg("http-backend")
                .env("GIT_PROJECT_ROOT", &root)
                .env("GIT_HTTP_EXPORT_ALL", "1")
                .env("PATH_INFO", &path)
                .env("QUERY_STRING", req.uri().query().unwrap_or(""))
                .env("REQUEST_METHOD", req.method().as_str())
                .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
                .env("GIT_PROTOCOL", header("git-protocol").unwrap_or_default())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped());
            let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap();
            let mut child = cgi.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut stdin, &body).await.unwrap();
            drop(stdin);
            let out = child.wait_with_output().await.unwrap().stdout;
            // A CGI answer: header lines, a blank line, the body.
            let split = out.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
            let (end, gap) = split.or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2))).unwrap();
            let mut response = axum::response::Response::new(axum::body::Body::from(out[end + gap..].to_vec()));
            for line in String::from_utf8_lossy(&out[..end]).lines() {
                let Some((name, value)) = line.split_once(':') else { continue };
                match name.trim().eq_ignore_ascii_case("status") {
                    true => *response.status_mut() = value.trim()[..3].parse().unwrap(),
                    false => {
                        let name = axum::http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap();
                        response.headers_mut().append(name, value.trim().parse().unwrap());
                    }
                }
            }
            response
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// Pushes `commit` of the repository at `clone_url` to `hook` (GitHub's push); the run it
/// started, once it has ended.
async fn push_commit(
    tm: &TestMesh,
    hook: &str,
    clone_url: &str,
    commit: &str,
    delivery: &str,
) -> (uuid::Uuid, serde_json::Value) {
    let mut body: serde_json::Value = serde_json::from_slice(PUSH).unwrap();
    body["after"] = commit.into();
    body["repository"]["clone_url"] = clone_url.into();
    let res = github_push(tm, hook, &serde_json::to_vec(&body).unwrap(), delivery).send().await.unwrap();
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["outcome"], "started", "{answer}");
    let run_id: uuid::Uuid = answer["run_id"].as_str().unwrap().parse().unwrap();
    (run_id, tm.wait_run(run_id, Duration::from_secs(60)).await)
}

/// A repository made in `root/<name>` with one file per commit (`(file, contents)`), cloned
/// bare to `root/<bare>`; its commits.
fn repository(root: &std::path::Path, name: &str, bare: &str, commits: &[(&str, &str)]) -> Vec<String> {
    let work = root.join(name);
    std::fs::create_dir_all(&work).unwrap();
    git_in(&work, &["init", "-q"]);
    let mut made = Vec::new();
    for (file, contents) in commits {
        std::fs::write(work.join(file), contents).unwrap();
        git_in(&work, &["add", file]);
        git_in(&work, &["commit", "-q", "-m", file]);
        made.push(git_in(&work, &["rev-parse", "HEAD"]));
    }
    git_in(root, &["clone", "-q", "--bare", name, bare]);
    made
}

/// Records `commit` of the bare repository `bare` as a submodule at `path` of the repository
/// in `work`, with `url` in its `.gitmodules`, and commits that.
fn add_submodule(work: &std::path::Path, bare: &std::path::Path, commit: &str, path: &str, url: &str) -> String {
    let bare = bare.to_str().unwrap();
    git_in(work, &["-c", "protocol.file.allow=always", "submodule", "add", "-q", bare, path]);
    git_in(&work.join(path), &["checkout", "-q", commit]);
    git_in(work, &["config", "-f", ".gitmodules", &format!("submodule.{path}.url"), url]);
    git_in(work, &["add", ".gitmodules", path]);
    git_in(work, &["commit", "-q", "-m", path]);
    git_in(work, &["rev-parse", "HEAD"])
}

/// `checkout: {submodules: true}` checks out the submodules, and theirs, at the commits
/// recorded, from the URLs git resolves (relative ones against their superproject's); the
/// connection's token is not in git's environment for them, so even a repository under the
/// connected one's URL is asked for without it and fails, until the connection names the
/// repositories at its forge that the token may go to (`submodule_repositories`); a URL that is not plain http(s),
/// one whose host the egress rules deny (reached by climbing out of the repository's path),
/// or a gitlink at a path with a control character fails the step, naming it, before anything
/// is fetched from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkout_with_submodules_checks_them_out_without_the_token_from_permitted_hosts() {
    let tm = spawn_with(&Svc::ALL, |s| s.egress.deny = vec!["127.0.0.2/32".parse().unwrap()]).await;
    let (root, open_root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (forge, fetches) = git_forge(root.path().to_path_buf(), Some("gh-token")).await;
    let (open, open_fetches) = git_forge(open_root.path().to_path_buf(), None).await;
    // At the open forge: a library, with a submodule of its own by a URL relative to its own;
    // each recorded at a commit that is not its tip.
    let deep =
        repository(open_root.path(), "deep", "o/deep.git", &[("deep.txt", "deep one\n"), ("deep.txt", "deep two\n")]);
    let lib = repository(open_root.path(), "lib", "o/lib.git", &[("lib.txt", "lib one\n")]);
    let lib_work = open_root.path().join("lib");
    let lib_recorded = add_submodule(&lib_work, &open_root.path().join("o/deep.git"), &deep[0], "deep", "../deep.git");
    std::fs::write(lib_work.join("lib.txt"), "lib two\n").unwrap();
    git_in(&lib_work, &["commit", "-q", "-am", "two"]);
    git_in(&lib_work, &["push", "-q", open_root.path().join("o/lib.git").to_str().unwrap(), "HEAD:master"]);
    let lib_tip = git_in(&open_root.path().join("o/lib.git"), &["rev-parse", "HEAD"]);
    assert!(lib_tip != lib_recorded && lib_tip != lib[0], "the library moved on past the commit recorded");
    // At the token's forge: the repository, and a private one under its URL.
    repository(root.path(), "app", "binkkatal/sample_app.git", &[("app.txt", "app\n")]);
    repository(root.path(), "private", "binkkatal/sample_app.git/private.git", &[("secret.txt", "private\n")]);
    let app = root.path().join("app");
    let lib_bare = open_root.path().join("o/lib.git");
    let pushed = add_submodule(&app, &lib_bare, &lib_recorded, "vendor/lib", &format!("{open}/o/lib.git"));
    let private_bare = root.path().join("binkkatal/sample_app.git/private.git");
    let private_head = git_in(&private_bare, &["rev-parse", "HEAD"]);
    let with_private = add_submodule(&app, &private_bare, &private_head, "vendor/private", "./private.git");
    git_in(&app, &["rm", "-q", "--cached", "vendor/private"]);
    git_in(&app, &["config", "-f", ".gitmodules", "--remove-section", "submodule.vendor/private"]);
    // Commits that each change the library's URL, or add a gitlink at `sub\r`.
    let commit = |url: &str, cr: bool| {
        git_in(&app, &["config", "-f", ".gitmodules", "submodule.vendor/lib.url", url]);
        if cr {
            git_in(&app, &["update-index", "--add", "--cacheinfo", &format!("160000,{},sub\r", deep[0])]);
        }
        // Not `commit -a`: it would take the gitlink, with nothing at its path, as deleted.
        git_in(&app, &["add", ".gitmodules"]);
        git_in(&app, &["commit", "-q", "-m", url]);
        git_in(&app, &["rev-parse", "HEAD"])
    };
    // A user name in the URL (as Bitbucket's carry) is dropped; with a password, git could
    // fetch it from the open forge, but it is refused.
    let with_user = commit(&format!("{}/o/lib.git", open.replace("http://", "http://u@")), false);
    let with_password = commit(&format!("{}/o/lib.git", open.replace("http://", "http://u:p@")), false);
    // git resolves this against `http://127.0.0.1:<port>/binkkatal/sample_app.git` to
    // `http://127.0.0.2:9/o/lib.git`, a host the mesh's egress rules deny.
    let climbing = commit("../../../127.0.0.2:9/o/lib.git", false);
    let with_cr = commit(&format!("{open}/o/lib.git"), true);
    let app_bare = root.path().join("binkkatal/sample_app.git");
    git_in(&app, &["push", "-q", "--force", app_bare.to_str().unwrap(), "HEAD:master"]);

    let workflow = serde_json::json!({"name": "ci", "steps": [
        {"id": "build", "checkout": {"submodules": true},
         "run": "cat app.txt vendor/lib/lib.txt vendor/lib/deep/deep.txt; git -C vendor/lib rev-parse HEAD; git -C vendor/lib/deep rev-parse HEAD"},
    ]});
    let more = serde_json::json!({"workflow": workflow, "status_token": "gh-token", "api_url": forge});
    let hook = connect(&tm, "github", "binkkatal/sample_app", more).await;
    let clone_url = format!("{forge}/binkkatal/sample_app.git");
    let run = push_commit(&tm, &hook, &clone_url, &pushed, "s-1").await.1;
    assert_eq!(run["status"], "succeeded", "{run}");
    let expected = format!("app\nlib one\ndeep one\n{lib_recorded}\n{}\n", deep[0]);
    assert_eq!(run["steps"][0]["output"], expected, "both levels at the commits recorded: {run}");
    let basic = "Basic eC1hY2Nlc3MtdG9rZW46Z2gtdG9rZW4="; // x-access-token:gh-token
    let sent = fetches.lock().unwrap().clone();
    assert!(!sent.is_empty() && sent.iter().all(|a| a.as_deref() == Some(basic)), "{sent:?}");
    let sent_open = open_fetches.lock().unwrap().clone();
    assert!(sent_open.iter().all(Option::is_none), "no token to the open forge: {sent_open:?}");

    // A private repository under the repository's own URL (`./private.git`), where a token
    // scoped to that URL would go, is asked for without it, so the step fails.
    let before = fetches.lock().unwrap().len();
    let run = push_commit(&tm, &hook, &clone_url, &with_private, "s-2").await.1;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with(&format!("checking out {with_private}: git submodule failed")), "{run}");
    let sent = fetches.lock().unwrap()[before..].to_vec();
    assert!(sent.contains(&Some(basic.to_string())) && sent.contains(&None), "{sent:?}");

    // The user name dropped, the library is fetched without it.
    let run = push_commit(&tm, &hook, &clone_url, &with_user, "s-6").await.1;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["output"], expected, "{run}");

    // Refused, each naming why. The URL with a password is one git could fetch from the
    // library's forge: nothing is asked of it.
    let before = open_fetches.lock().unwrap().len();
    let refused = [
        (
            &with_password,
            "s-3",
            format!(
                "submodule vendor/lib: '{}/o/lib.git' is not an http(s) URL",
                open.replace("http://", "http://u:p@")
            ),
        ),
        (&climbing, "s-4", "submodule vendor/lib: egress to 127.0.0.2 is denied".to_string()),
        (&with_cr, "s-5", "submodule path 'sub\\r' is not a relative path of plain names".to_string()),
    ];
    for (commit, delivery, says) in refused {
        let run = push_commit(&tm, &hook, &clone_url, commit, delivery).await.1;
        assert_eq!(run["status"], "failed", "{run}");
        let error = run["steps"][0]["error"].as_str().unwrap_or_default();
        assert!(error.contains(&says), "{says}: {run}");
    }
    assert_eq!(open_fetches.lock().unwrap().len(), before, "nothing asked of the library's forge");

    // Once the connection names them, private repositories at the token's forge are fetched as
    // submodules with the token; one not named is still asked for without it, and fails.
    let private_lib =
        repository(root.path(), "private-lib", "binkkatal/private-lib.git", &[("p.txt", "private lib\n")]);
    let other = repository(root.path(), "other", "binkkatal/other.git", &[("o.txt", "other\n")]);
    git_in(&app, &["rm", "-q", "--cached", "sub\r"]);
    let private_lib_bare = root.path().join("binkkatal/private-lib.git");
    let named = add_submodule(&app, &private_lib_bare, &private_lib[0], "vendor/private-lib", "../private-lib.git");
    let other_bare = root.path().join("binkkatal/other.git");
    let unnamed = add_submodule(&app, &other_bare, &other[0], "vendor/other", "../other.git");
    // Under a repository named, where git would send the token too, but not itself named.
    let beneath = add_submodule(&app, &other_bare, &other[0], "vendor/beneath", "../private-lib.git/x.git");
    git_in(&app, &["push", "-q", "--force", app_bare.to_str().unwrap(), "HEAD:master"]);
    let id = hook.rsplit('/').next().unwrap();
    let workflow = serde_json::json!({"name": "ci", "steps": [
        {"id": "build", "checkout": {"submodules": true}, "run": "cat vendor/private-lib/p.txt vendor/lib/lib.txt"},
    ]});
    let res = tm
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/repo-connections/{id}"),
            &serde_json::json!({"submodule_repositories": ["BinkKatal/private-*"], "workflow": workflow}),
        )
        .await;
    assert_eq!(res.status(), 200);
    tm.wait_projected().await;
    let before = (fetches.lock().unwrap().len(), open_fetches.lock().unwrap().len());
    let run = push_commit(&tm, &hook, &clone_url, &named, "s-7").await.1;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["output"], "private lib\nlib one\n", "{run}");
    let sent = fetches.lock().unwrap()[before.0..].to_vec();
    assert!(!sent.is_empty() && sent.iter().all(|a| a.as_deref() == Some(basic)), "{sent:?}");
    let sent_open = open_fetches.lock().unwrap()[before.1..].to_vec();
    assert!(!sent_open.is_empty() && sent_open.iter().all(Option::is_none), "{sent_open:?}");
    let before = fetches.lock().unwrap().len();
    let run = push_commit(&tm, &hook, &clone_url, &unnamed, "s-8").await.1;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with(&format!("checking out {unnamed}: git submodule failed")), "{run}");
    let sent = fetches.lock().unwrap()[before..].to_vec();
    assert!(sent.contains(&Some(basic.to_string())) && sent.contains(&None), "{sent:?}");
    let before = fetches.lock().unwrap().len();
    let run = push_commit(&tm, &hook, &clone_url, &beneath, "s-9").await.1;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["steps"][0]["error"].as_str().unwrap_or_default();
    let says = format!("submodule vendor/beneath: '{forge}/binkkatal/private-lib.git/x.git' is under");
    assert!(error.contains(&says), "{run}");
    let sent = fetches.lock().unwrap()[before..].to_vec();
    assert!(!sent.contains(&None), "no submodule asked for: {sent:?}");
    tm.finish().await;
}

/// Runs `git args` in `dir`, as a test sets up a repository.
fn git_in(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=master"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkout_step_starts_in_the_pushed_commit_fetched_with_the_token_only_from_its_forge() {
    let tm = spawn_mesh().await;
    // A repository with two commits; the push is of the first, so the step must get that one
    // by its id, not whatever the branch points to now.
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir(&work).unwrap();
    git_in(&work, &["init", "-q"]);
    std::fs::write(work.join("version.txt"), "one\n").unwrap();
    git_in(&work, &["add", "version.txt"]);
    git_in(&work, &["commit", "-q", "-m", "one"]);
    let pushed = git_in(&work, &["rev-parse", "HEAD"]);
    git_in(&work, &["tag", "v1.0"]);
    std::fs::write(work.join("version.txt"), "two\n").unwrap();
    git_in(&work, &["commit", "-q", "-am", "two"]);
    let second = git_in(&work, &["rev-parse", "HEAD"]);
    std::fs::create_dir(root.path().join("binkkatal")).unwrap();
    git_in(root.path(), &["clone", "-q", "--bare", "work", "binkkatal/sample_app.git"]);

    let (forge, fetches) = git_forge(root.path().to_path_buf(), Some("gh-token")).await;
    let workflow = serde_json::json!({"name": "ci", "steps": [
        {"id": "build", "checkout": true,
         "run": "cat version.txt; git rev-parse HEAD; git remote get-url origin; git config --get-regexp extraheader || echo no-header"},
        // The pushed commit alone by default; all its history and the tags when asked.
        {"id": "shallow", "checkout": true, "run": "git rev-list --count HEAD; git tag | wc -l"},
        {"id": "history", "checkout": {"depth": 0, "tags": true}, "run": "git rev-list --count HEAD; git describe --tags"},
        // Into a directory of the working directory, made as it goes.
        {"id": "nested", "checkout": {"path": "src/app"},
         "run": "cat src/app/version.txt; git -C src/app rev-parse HEAD; test -e .git || echo 'nothing at the top'"},
    ]});
    let hook = connect(
        &tm,
        "github",
        "binkkatal/sample_app",
        serde_json::json!({"workflow": workflow, "status_token": "gh-token", "api_url": forge}),
    )
    .await;
    let run_of_push = async |clone_url: &str, commit: &str, delivery: &str| {
        push_commit(&tm, &hook, clone_url, commit, delivery).await
    };
    let clone_url = format!("{forge}/binkkatal/sample_app.git");
    let (run_id, run) = run_of_push(&clone_url, &pushed, "c-1").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // The pushed commit's files, that commit, `origin` set, and no token left in the checkout.
    assert_eq!(run["steps"][0]["output"], format!("one\n{pushed}\n{clone_url}\nno-header\n"), "{run}");
    let sent = fetches.lock().unwrap().clone();
    assert!(!sent.is_empty());
    let basic = "Basic eC1hY2Nlc3MtdG9rZW46Z2gtdG9rZW4="; // x-access-token:gh-token
    assert!(sent.iter().all(|a| a.as_deref() == Some(basic)), "{sent:?}");
    assert_eq!(step(&run, "history")["output"], "1\nv1.0\n", "{run}");
    assert_eq!(step(&run, "nested")["output"], format!("one\n{pushed}\nnothing at the top\n"), "{run}");
    // The second commit: by default itself alone, without tags; with `depth: 0` and `tags`,
    // its parent too, and `git describe` finds the tag on it.
    let (_, later) = run_of_push(&clone_url, &second, "c-4").await;
    assert_eq!(later["status"], "succeeded", "{later}");
    assert!(step(&later, "build")["output"].as_str().unwrap().starts_with(&format!("two\n{second}\n")), "{later}");
    assert_eq!(step(&later, "shallow")["output"], "1\n0\n", "{later}");
    let described = step(&later, "history")["output"].as_str().unwrap().to_string();
    assert!(described.starts_with("2\nv1.0-1-g"), "{described}");

    // A rerun checks out the same commit, fetching it again.
    let fetched_before = fetches.lock().unwrap().len();
    let rerun = tm.auth(tm.http.post(format!("{}/v1/runs/{run_id}/rerun", tm.api)));
    let rerun: serde_json::Value =
        rerun.json(&serde_json::json!({"from": "build"})).send().await.unwrap().json().await.unwrap();
    let again = tm.wait_run(rerun["id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(60)).await;
    assert_eq!((&again["status"], &again["steps"][0]["output"]), (&run["status"], &run["steps"][0]["output"]));
    assert!(fetches.lock().unwrap().len() > fetched_before);

    // Another repository at the forge's origin gets no token either: whoever holds the webhook
    // secret writes the push, and the token is the connected repository's.
    let fetched_before = fetches.lock().unwrap().len();
    let (_, run) = run_of_push(&format!("{forge}/x/binkkatal/sample_app.git"), &pushed, "c-0").await;
    assert_eq!(run["status"], "failed", "{run}");
    let sent = fetches.lock().unwrap()[fetched_before..].to_vec();
    assert!(!sent.is_empty() && sent.iter().all(Option::is_none), "{sent:?}");

    // A repository URL at another origin than the connection's API gets no token: this server
    // wants none, and sees none.
    let (elsewhere, open_fetches) = git_forge(root.path().to_path_buf(), None).await;
    let other_url = format!("{elsewhere}/binkkatal/sample_app.git");
    let (_, run) = run_of_push(&other_url, &pushed, "c-2").await;
    assert_eq!(run["steps"][0]["output"], format!("one\n{pushed}\n{other_url}\nno-header\n"), "{run}");
    let sent = open_fetches.lock().unwrap().clone();
    assert!(!sent.is_empty() && sent.iter().all(Option::is_none), "{sent:?}");

    // A pull request from a branch of the repository checks out its head commit, with the token.
    let id = hook.rsplit('/').next().unwrap();
    let res = tm
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/repo-connections/{id}"),
            &serde_json::json!({"pull_requests": true}),
        )
        .await;
    assert_eq!(res.status(), 200);
    tm.wait_projected().await;
    let opened = edited(
        GITHUB_PR,
        &[
            ("/repository/full_name", "binkkatal/sample_app".into()),
            ("/repository/clone_url", clone_url.clone().into()),
            ("/pull_request/head/repo/full_name", "binkkatal/sample_app".into()),
            ("/pull_request/head/sha", second.clone().into()),
        ],
    );
    let fetched_before = fetches.lock().unwrap().len();
    let res = github_event(&tm, &hook, "pull_request", &opened, "c-5").send().await.unwrap();
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["outcome"], "started", "{answer}");
    let run = tm.wait_run(answer["run_id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(step(&run, "build")["output"].as_str().unwrap().starts_with(&format!("two\n{second}\n")), "{run}");
    let sent = fetches.lock().unwrap()[fetched_before..].to_vec();
    assert!(!sent.is_empty() && sent.iter().all(|a| a.as_deref() == Some(basic)), "{sent:?}");

    // A commit the repository does not have fails the step, saying why.
    let missing = "0123456789abcdef0123456789abcdef01234567";
    let (_, run) = run_of_push(&clone_url, missing, "c-3").await;
    assert_eq!(run["status"], "failed");
    let error = run["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with(&format!("checking out {missing}: git fetch failed")), "{run}");

    // Once the connection names another repository (renamed, say), a rerun of a run pushed
    // before asks for the old one without the token: this forge, which wants it, refuses.
    let id = hook.rsplit('/').next().unwrap();
    let renamed = serde_json::json!({"repository": "binkkatal/renamed"});
    let res = tm.send_json(reqwest::Method::PATCH, &format!("/v1/repo-connections/{id}"), &renamed).await;
    assert_eq!(res.status(), 200);
    let fetched_before = fetches.lock().unwrap().len();
    let rerun = tm.auth(tm.http.post(format!("{}/v1/runs/{run_id}/rerun", tm.api)));
    let rerun: serde_json::Value =
        rerun.json(&serde_json::json!({"from": "build"})).send().await.unwrap().json().await.unwrap();
    let again = tm.wait_run(rerun["id"].as_str().unwrap().parse().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(again["status"], "failed", "{again}");
    let sent = fetches.lock().unwrap()[fetched_before..].to_vec();
    assert!(!sent.is_empty() && sent.iter().all(Option::is_none), "{sent:?}");

    // A run that no push started has nothing to check out: it is refused as it is submitted.
    let res = tm.auth(tm.http.post(format!("{}/v1/runs", tm.api))).json(&serde_json::json!({"workflow": workflow}));
    let res = res.send().await.unwrap();
    assert_eq!(res.status(), 400);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "steps[0].checkout", "{problem}");
    // Nor does a stored workflow's (it runs from the API, a schedule or an event), nor a
    // schedule's: they are refused as they are stored or created, not at every run.
    let res = tm.auth(tm.http.put(format!("{}/v1/workflows/ci", tm.api))).json(&workflow).send().await.unwrap();
    assert_eq!(res.status(), 400);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "steps[0].checkout", "{problem}");
    let schedule = serde_json::json!({"cron": "0 * * * *", "workflow": workflow});
    let res = tm.auth(tm.http.post(format!("{}/v1/schedules", tm.api))).json(&schedule).send().await.unwrap();
    assert_eq!(res.status(), 400);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "steps[0].checkout", "{problem}");
}

/// What holds a run's status back from being sent again (above) is only a newer run of the
/// same kind, of the same workflow, that reports its status, on the same commit: a pull
/// request's run and a push's show apart on the forge, another workflow's run shows under
/// another name, and a run that reported nothing (its connection had no token then) shows
/// nothing to replace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_newer_run_of_the_same_kind_and_workflow_that_reports_holds_a_status_back() {
    let tm = spawn_mesh().await;
    let (api, _calls) = forge_api().await;
    let more = serde_json::json!({"pull_requests": true, "status_token": "t", "api_url": api});
    let hook = connect(&tm, "github", "baxterthehacker/public-repo", more).await;
    let connection = hook.rsplit('/').next().unwrap().to_string();
    let patch = |body: serde_json::Value| {
        let (req, tm) = (patch_connection(&tm, &connection, body), &tm);
        async move {
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 200);
            tm.wait_projected().await;
        }
    };
    let resend = |run: uuid::Uuid| resend_status(&tm, run).send();
    // Every run here is on the pull request's head commit, pushed to master too.
    let head = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c";
    let push =
        edited(PUSH, &[("/repository/full_name", "baxterthehacker/public-repo".into()), ("/after", head.into())]);
    let run = |event: &'static str, body: Vec<u8>, delivery: &'static str| {
        let (req, tm) = (github_event(&tm, &hook, event, &body, delivery), &tm);
        async move {
            let run = started_run(&answer(req).await);
            let view = tm.wait_run(run, Duration::from_secs(30)).await;
            assert_eq!(view["trigger"]["commit"], head, "{view}");
            (run, view)
        }
    };
    let (older, _) = run("push", push.clone(), "n-1").await;

    // A pull request's run on the commit, newer: each is sent again.
    let (pr, view) = run("pull_request", GITHUB_PR.to_vec(), "n-2").await;
    assert_eq!(view["trigger"]["pull_request"], 1, "{view}");
    assert_eq!(resend(older).await.unwrap().status(), 202);
    assert_eq!(resend(pr).await.unwrap().status(), 202);
    // Another workflow's push run on the commit, newer: still sent.
    patch(serde_json::json!({"workflow": {"name": "other", "steps": [{"id": "test", "run": "true"}]}})).await;
    let (other, view) = run("push", push.clone(), "n-3").await;
    assert_eq!(view["workflow"], "other", "{view}");
    assert_eq!(resend(older).await.unwrap().status(), 202);
    // A newer run of the workflow that reported nothing (no token then, one again now).
    patch(
        serde_json::json!({"status_token": null, "workflow": {"name": "ci", "steps": [{"id": "test", "run": "true"}]}}),
    )
    .await;
    let (_, view) = run("push", push.clone(), "n-4").await;
    assert_ne!(view["trigger"]["reports_status"], true, "{view}");
    patch(serde_json::json!({"status_token": "t"})).await;
    assert_eq!(resend(older).await.unwrap().status(), 202);
    // One that reports: now the older is held back, by it alone.
    let (newest, _) = run("push", push, "n-5").await;
    let res = resend(older).await.unwrap();
    assert_eq!(res.status(), 409);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains(&format!("run {newest} ")), "{problem}");
    for run in [pr, other, newest] {
        assert_eq!(resend(run).await.unwrap().status(), 202, "run {run}");
    }
    tm.finish().await;
}
