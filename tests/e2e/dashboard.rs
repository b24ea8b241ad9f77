//! The web dashboard: its files are served to anyone under a strict policy, and the answers
//! to the requests it makes carry every field it reads.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_is_served_and_the_api_answers_what_it_reads() {
    let tm = spawn_mesh().await;
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let res = no_redirects.get(format!("{}/ui", tm.api)).send().await.unwrap();
    assert_eq!((res.status().as_u16(), &res.headers()["location"]), (308, &"/ui/".parse().unwrap()));
    for (path, content_type, holds) in [
        ("/ui/", "text/html; charset=utf-8", "<script src=\"app.js\"></script>"),
        ("/ui/app.js", "text/javascript; charset=utf-8", "function runView"),
        ("/ui/app.css", "text/css; charset=utf-8", "svg.dag"),
    ] {
        // No key: the files hold no data.
        let res = tm.http.get(format!("{}{path}", tm.api)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert_eq!(res.headers()["content-type"], content_type, "{path}");
        let policy = res.headers()["content-security-policy"].to_str().unwrap().to_string();
        assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
        assert!(res.text().await.unwrap().contains(holds), "{path}");
    }
    // ...while what it shows needs one.
    assert_eq!(tm.http.get(format!("{}/v1/runs", tm.api)).send().await.unwrap().status(), 401);

    // The requests it makes, and the fields it reads from their answers.
    let id =
        tm.submit("name: shown\nsteps:\n  - {id: a, run: 'echo hello'}\n  - {id: b, needs: [a], uses: noop}\n").await;
    tm.wait_run(id, Duration::from_secs(30)).await;
    let tm = &tm;
    let get = |path: String| async move {
        let res = tm.auth(tm.http.get(format!("{}{path}", tm.api))).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        res.json::<serde_json::Value>().await.unwrap()
    };
    let page = get("/v1/runs?limit=50".into()).await;
    let listed = page["items"].as_array().unwrap().iter().find(|r| r["id"] == id.to_string()).expect("listed").clone();
    for field in ["id", "workflow", "status", "trigger", "created_at", "finished_at"] {
        assert!(listed.get(field).is_some(), "runs list: {field} in {listed}");
    }
    let run = get(format!("/v1/runs/{id}")).await;
    for field in
        ["id", "workflow", "status", "trigger", "created_at", "started_at", "finished_at", "inputs", "wait_reason"]
    {
        assert!(run.get(field).is_some(), "run: {field} in {run}");
    }
    assert_eq!(run["trigger"]["kind"], "api");
    let b = &run["steps"][1];
    assert_eq!(b["needs"], serde_json::json!(["a"]), "the DAG's edges");
    for field in
        ["id", "kind", "status", "attempts", "started_at", "finished_at", "exit_code", "error", "reason", "outputs"]
    {
        assert!(b.get(field).is_some(), "step: {field} in {b}");
    }
    let attempt = &run["steps"][0]["attempt_history"][0];
    for field in ["attempt", "executor", "status", "exit_code", "error", "started_at", "finished_at"] {
        assert!(attempt.get(field).is_some(), "attempt: {field} in {attempt}");
    }
    let log = get(format!("/v1/runs/{id}/steps/a/logs?after=0&limit=1000")).await;
    let line = &log["lines"][0];
    assert_eq!((&line["line"], &line["stream"]), (&serde_json::json!("hello"), &serde_json::json!("stdout")));
    assert!(line["seq"].as_u64().is_some());
    let later = get(format!("/v1/runs/{id}/steps/a/logs?after={}&limit=1000", line["seq"])).await;
    assert_eq!(later["lines"], serde_json::json!([]), "after the last line, nothing");
    let executors = get("/v1/executors".into()).await;
    let x = &executors["items"][0];
    for field in ["id", "labels", "slots", "slots_in_use", "last_heartbeat", "stopping"] {
        assert!(x.get(field).is_some(), "executor: {field} in {x}");
    }
    for field in ["runs_on", "queued", "executors"] {
        assert!(executors["pools"][0].get(field).is_some(), "pool: {field} in {executors}");
    }
    let who = get("/v1/whoami".into()).await;
    assert_eq!((&who["tenant"], &who["role"]), (&serde_json::json!("default"), &serde_json::json!("admin")));
    assert!(who["key_id"].is_string(), "the keys page tells its own key by it: {who}");
    let keys = get("/v1/keys".into()).await;
    for field in ["id", "name", "role", "prefix", "created_at", "last_used_at", "revoked_at"] {
        assert!(keys["items"][0].get(field).is_some(), "key: {field} in {keys}");
    }
}

/// `chromedriver`: `TM_TEST_CHROMEDRIVER`, or Debian's (`chromium-driver`, which
/// `scripts/test` installs with `chromium`).
fn chromedriver() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("TM_TEST_CHROMEDRIVER") {
        return Some(p.into());
    }
    ["/usr/bin/chromedriver", "/usr/local/bin/chromedriver"].iter().map(std::path::PathBuf::from).find(|p| p.exists())
}

/// A headless Chromium driven over WebDriver (plain HTTP and JSON), ended when dropped.
struct Browser {
    driver: tokio::process::Child,
    session: String,
    http: reqwest::Client,
}

/// A page script's expression for the list row whose text includes `text`.
fn row_with(text: &str) -> String {
    let text = serde_json::to_string(text).unwrap();
    format!("[...document.querySelectorAll('main tbody tr')].find((r) => r.innerText.includes({text}))")
}

impl Browser {
    async fn start(bin: &std::path::Path) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = tokio::process::Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        taskmesh_testkit::eventually("chromedriver to answer", Duration::from_secs(20), || async {
            let Ok(ready) = http.get(format!("{base}/status")).send().await else { return Ok(None) };
            let ready: serde_json::Value = ready.json().await?;
            Ok(ready["value"]["ready"].as_bool().filter(|r| *r))
        })
        .await
        .unwrap();
        let mut args = vec!["--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"];
        if nix::unistd::geteuid().is_root() {
            args.push("--no-sandbox");
        }
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"args": args}}}});
        let res = http.post(format!("{base}/session")).json(&caps).send().await.unwrap();
        let created: serde_json::Value = res.json().await.unwrap();
        let id = created["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("a session: {created}"));
        Browser { driver, session: format!("{base}/session/{id}"), http }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: serde_json::Value) -> serde_json::Value {
        let res = self.http.request(method, format!("{}{path}", self.session)).json(&body).send().await.unwrap();
        let answer: serde_json::Value = res.json().await.unwrap();
        assert!(answer["value"].get("error").is_none(), "{path}: {answer}");
        answer["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", serde_json::json!({"url": url})).await;
    }

    /// Runs `script` (a function body) in the page; its return value.
    async fn run(&self, script: &str) -> serde_json::Value {
        self.call(reqwest::Method::POST, "/execute/sync", serde_json::json!({"script": script, "args": []})).await
    }

    /// Waits until `script` returns true.
    async fn until(&self, what: &str, script: &str) {
        let waited = taskmesh_testkit::eventually(what, Duration::from_secs(20), || async {
            Ok((self.run(script).await == serde_json::Value::Bool(true)).then_some(()))
        })
        .await;
        if let Err(e) = waited {
            panic!("{e}; the page shows: {}", self.run("return document.body.innerText").await);
        }
    }

    async fn click(&self, css: &str) {
        let found = self
            .call(reqwest::Method::POST, "/element", serde_json::json!({"using": "css selector", "value": css}))
            .await;
        let id = found.as_object().and_then(|o| o.values().next()).and_then(|v| v.as_str()).unwrap().to_string();
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), serde_json::json!({})).await;
    }

    /// Arms and confirms `row`'s destructive button in one script (the list's redraw, every
    /// 5 s, draws the button afresh): what the armed button said, with " (then disabled)" if
    /// the confirmed one is disabled.
    async fn confirm(&self, row: &str) -> serde_json::Value {
        let script = format!(
            "const b = {row}.querySelector('button.delete'); b.click(); const said = b.innerText; b.click(); return said + (b.disabled ? ' (then disabled)' : '')"
        );
        self.run(&script).await
    }

    async fn type_into(&self, css: &str, text: &str) {
        let found = self
            .call(reqwest::Method::POST, "/element", serde_json::json!({"using": "css selector", "value": css}))
            .await;
        let id = found.as_object().and_then(|o| o.values().next()).and_then(|v| v.as_str()).unwrap().to_string();
        self.call(reqwest::Method::POST, &format!("/element/{id}/value"), serde_json::json!({"text": text})).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (and its Chromium) before the driver is killed.
        let (http, session) = (self.http.clone(), self.session.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async { http.delete(&session).send().await.ok() });
        })
        .join();
        let _ = self.driver.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_browser_the_dashboard_signs_in_and_shows_a_runs_dag_and_log() {
    let Some(bin) = chromedriver() else {
        assert!(std::env::var_os("CI").is_none(), "chromedriver is missing (scripts/test installs chromium-driver)");
        eprintln!("skipped: chromedriver is not installed (scripts/test installs chromium-driver)");
        return;
    };
    let tm = spawn_mesh().await;
    let yaml = "name: pictured\nsteps:\n  - {id: build, run: 'echo built it; echo oops >&2'}\n  - {id: test, needs: [build], run: 'exit 3'}\n  - {id: docs, needs: [build], uses: noop}\n";
    let id = tm.submit(yaml).await;
    tm.wait_run(id, Duration::from_secs(30)).await;
    let retried = tm
        .submit("name: retried\nsteps:\n  - {id: flaky, run: 'echo try $TASKMESH_ATTEMPT; [ $TASKMESH_ATTEMPT -ge 2 ]', retry: {max_attempts: 2, initial_delay_ms: 10}}\n")
        .await;
    assert_eq!(tm.wait_run(retried, Duration::from_secs(30)).await["status"], "succeeded");
    // A stored workflow, and a yearly schedule of it.
    let stored = serde_json::json!({"name": "stored", "steps": [{"id": "a", "uses": "noop"}]});
    let res = tm.send_json(reqwest::Method::PUT, "/v1/workflows/stored", &stored).await;
    assert_eq!(res.status(), 201);
    let yearly = serde_json::json!({"cron": "0 0 1 1 *", "workflow": "stored"});
    let res = tm.send_json(reqwest::Method::POST, "/v1/schedules", &yearly).await;
    assert_eq!(res.status(), 201);
    let schedule = res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    // A webhook endpoint that is down: the end of a run is given up after its retries.
    let (hook, hook_seen, hook_up) = crate::integrations::switchable_receiver_on("127.0.0.1", false).await;
    let endpoint = crate::integrations::subscribe_url(&tm, &hook).await["id"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    let told = tm.submit("name: told\nsteps:\n  - {id: a, uses: noop}\n").await;
    let told_too = tm.submit("name: told\nsteps:\n  - {id: a, uses: noop}\n").await;
    tm.wait_run(told, Duration::from_secs(30)).await;
    tm.wait_run(told_too, Duration::from_secs(30)).await;
    tm.wait_projected().await;
    let browser = Browser::start(&bin).await;

    // Without a key it asks for one; a wrong one is refused, saying so.
    browser.go(&format!("{}/ui/", tm.api)).await;
    browser.until("the sign-in form", "return !!document.querySelector('input[name=key]')").await;
    browser.type_into("input[name=key]", "tm_not-a-key").await;
    browser.click("button[type=submit]").await;
    browser
        .until("the refusal", "return document.querySelector('main').innerText.includes('That key was refused')")
        .await;
    // With a good one, the runs list shows the run.
    browser.type_into("input[name=key]", &tm.key).await;
    browser.click("button[type=submit]").await;
    let listed = format!("return document.querySelector('main').innerText.includes('{id}')");
    browser.until("the run in the list", &listed).await;
    assert_eq!(browser.run("return sessionStorage.getItem('taskmesh.key')").await, tm.key.as_str());
    // Its id is a link (to open in a new tab); the header says who the key is.
    let link = format!("return !!document.querySelector('tbody a[href=\"#/runs/{id}\"]')");
    assert_eq!(browser.run(&link).await, true);
    browser.until("who the key is", "return document.getElementById('who').innerText === 'default · admin'").await;

    // The schedules: the stored workflow's yearly one, paused from the page (and shown so at
    // once: the next look waits for the read side to have the change).
    browser.go(&format!("{}/ui/#/schedules", tm.api)).await;
    browser.until("the schedule", "return document.querySelector('main').innerText.includes('0 0 1 1 *')").await;
    browser.click("main td button").await;
    browser.until("the schedule paused", "return !!document.querySelector('main .status.paused')").await;
    let (status, paused) = {
        let res = tm.auth(tm.http.get(format!("{}/v1/schedules/{schedule}", tm.api))).send().await.unwrap();
        (res.status(), res.json::<serde_json::Value>().await.unwrap())
    };
    assert_eq!((status.as_u16(), &paused["paused"]), (200, &serde_json::json!(true)), "{paused}");
    // Changed from the page: a bad expression is refused and the page says why; a good one is
    // the schedule's, listed once the read side has it, and the schedule stays paused.
    // The inputs' patch: keys gone are removed, nested ones too; unchanged ones are left out.
    let patch = browser
        .run("return JSON.stringify(mergePatch({a: 1, c: {x: 1, y: 2}, d: [1]}, {c: {x: 1}, b: 2, d: [1]}))")
        .await;
    assert_eq!(patch, r#"{"a":null,"c":{"y":null},"b":2}"#);
    // Found and clicked in one script: the list is drawn afresh every few seconds.
    let open_edit = |what: &'static str| {
        let browser = &browser;
        async move {
            browser.run("document.querySelector('main button.edit').click(); return true").await;
            browser.until(what, "return !document.getElementById('schedule-edit').hidden").await;
        }
    };
    open_edit("the edit form").await;
    let save = |cron: &str| {
        format!(
            "const f = document.getElementById('schedule-edit'); f.querySelector('input[name=cron]').value = '{cron}'; f.querySelector('button[type=submit]').click(); return true"
        )
    };
    browser.run(&save("61 * * * *")).await;
    browser
        .until(
            "the refusal said",
            "const e = document.querySelector('#schedule-edit .error'); return !!e && e.innerText.includes('cron')",
        )
        .await;
    // The policies are chosen beside it.
    assert_eq!(
        browser.run("return document.querySelector('#schedule-edit select[name=overlap]').value").await,
        "skip",
        "the schedule's own overlap shown"
    );
    browser
        .run("const f = document.getElementById('schedule-edit'); f.querySelector('select[name=overlap]').value = 'cancel_previous'; f.querySelector('select[name=catch_up]').value = 'last'; return true")
        .await;
    browser.run(&save("0 0 2 1 *")).await;
    browser
        .until(
            "the new expression listed",
            "return document.querySelector('main tbody').innerText.includes('0 0 2 1 *')",
        )
        .await;
    assert_eq!(browser.run("return document.getElementById('schedule-edit').hidden").await, true);
    let changed: serde_json::Value =
        tm.auth(tm.http.get(format!("{}/v1/schedules/{schedule}", tm.api))).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (&changed["spec"]["cron"], &changed["paused"]),
        (&serde_json::json!("0 0 2 1 *"), &serde_json::json!(true))
    );
    assert_eq!(changed["spec"]["workflow"], "stored", "the rest kept: {changed}");
    assert_eq!(
        (&changed["spec"]["overlap"], &changed["spec"]["catch_up"]),
        (&serde_json::json!("cancel_previous"), &serde_json::json!("last")),
        "{changed}"
    );
    // Saved over a change made since Edit was clicked: refused (it is sent with the version
    // Edit had, in If-Match), the page says so, and the other change stays.
    open_edit("the edit form again").await;
    let path = format!("/v1/schedules/{schedule}");
    let res = tm.send_json(reqwest::Method::PATCH, &path, &serde_json::json!({"catch_up": "all"})).await;
    assert_eq!(res.status(), 200);
    let other_change = res.json::<serde_json::Value>().await.unwrap()["seq"].as_u64().unwrap();
    browser.run(&save("0 0 3 1 *")).await;
    browser
        .until(
            "the stale save refused",
            "const e = document.querySelector('#schedule-edit .error'); return !!e && e.innerText.includes('was changed since Edit')",
        )
        .await;
    let kept = tm.get_json_after(format!("{}{path}", tm.api), other_change).await;
    assert_eq!(
        (&kept["spec"]["cron"], &kept["spec"]["catch_up"]),
        (&serde_json::json!("0 0 2 1 *"), &serde_json::json!("all"))
    );
    // Resumed since Edit was clicked: its version moved but not its spec, so it is saved.
    // (The page afresh, so the list Edit reads from has the change above.)
    browser.go(&format!("{}/ui/#/workflows", tm.api)).await;
    browser.go(&format!("{}/ui/#/schedules", tm.api)).await;
    browser.until("the schedule again", "return document.querySelector('main').innerText.includes('0 0 2 1 *')").await;
    open_edit("the edit form once more").await;
    let res = tm.auth(tm.http.post(format!("{}{path}/resume", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 202);
    tm.wait_projected().await;
    browser.run(&save("0 0 4 1 *")).await;
    browser
        .until(
            "the save over a resume listed",
            "return document.querySelector('main tbody').innerText.includes('0 0 4 1 *')",
        )
        .await;
    // The audit log: the pause just made, by this key; the key's link lists its calls only.
    tm.wait_projected().await;
    browser
        .until(
            "the audit log's link, for an admin",
            "return !document.querySelector('#nav a[href=\"#/audit\"]').hidden",
        )
        .await;
    browser.go(&format!("{}/ui/#/audit", tm.api)).await;
    let pause = format!("POST /v1/schedules/{schedule}/pause");
    browser
        .until(
            "the pause in the audit log",
            &format!("return document.querySelector('main').innerText.includes('{pause}')"),
        )
        .await;
    browser.click("main td a[href^=\"#/audit?key_id=\"]").await;
    browser
        .until("one key's calls", "return document.querySelector('main').innerText.includes('Calls of one key only')")
        .await;
    browser
        .until("the pause among them", &format!("return document.querySelector('main').innerText.includes('{pause}')"))
        .await;
    // The stored workflows, each linking to its runs.
    browser.go(&format!("{}/ui/#/workflows", tm.api)).await;
    browser.until("the stored workflow", "return document.querySelector('main').innerText.includes('stored')").await;
    assert_eq!(browser.run("return !!document.querySelector('main a[href=\"#/runs?workflow=stored\"]')").await, true);

    // The webhooks: the endpoint, and its failed deliveries (once given up), a page at a time,
    // one sent again from the page once the endpoint is back, then the rest all at once.
    browser.go(&format!("{}/ui/#/webhooks", tm.api)).await;
    browser.until("the endpoint", &format!("return document.querySelector('main').innerText.includes('{hook}')")).await;
    browser.go(&format!("{}/ui/#/webhooks/{endpoint}?limit=1", tm.api)).await;
    browser
        .until("a page of one, older ones behind it", "return !!document.querySelector('main a[href*=\"cursor=\"]')")
        .await;
    assert_eq!(browser.run("return document.querySelectorAll('main tbody tr').length").await, 1);
    let newest = browser.run("return document.querySelector('main td a').getAttribute('href')").await;
    let older = if newest.as_str() == Some(&format!("#/runs/{told}")) { told_too } else { told };
    browser.click("main a[href*=\"cursor=\"]").await;
    browser
        .until("the older page", &format!("return !!document.querySelector('main a[href=\"#/runs/{older}\"]')"))
        .await;
    browser.go(&format!("{}/ui/#/webhooks", tm.api)).await;
    let endpoint_link = format!("main a[href=\"#/webhooks/{endpoint}\"]");
    browser.until("the endpoint's link", &format!("return !!document.querySelector('{endpoint_link}')")).await;
    browser.click(&endpoint_link).await;
    for run in [told, told_too] {
        browser
            .until("both failures", &format!("return !!document.querySelector('main a[href=\"#/runs/{run}\"]')"))
            .await;
    }
    hook_up.store(true, std::sync::atomic::Ordering::SeqCst);
    browser.click("main td button").await;
    browser
        .until(
            "the delivery sent again",
            "return [...document.querySelectorAll('main td')].some((td) => td.cellIndex === 4 && td.innerText !== '')",
        )
        .await;
    let received = |n: usize| {
        let hook_seen = hook_seen.clone();
        async move {
            taskmesh_testkit::eventually("the endpoint to receive them", Duration::from_secs(30), || async {
                let seen = hook_seen.lock().unwrap();
                Ok((seen.len() >= n).then(|| {
                    seen.iter()
                        .map(|(_, body)| {
                            serde_json::from_slice::<serde_json::Value>(body).unwrap()["data"]["run_id"].clone()
                        })
                        .collect::<Vec<_>>()
                }))
            })
            .await
            .unwrap()
        }
    };
    assert_eq!(received(1).await, [serde_json::json!(newest.as_str().unwrap().trim_start_matches("#/runs/"))]);
    // "Send all again" sends the one not sent again yet, and only it.
    browser.click("main button.send-all").await;
    browser.until("what was sent", "return document.querySelector('main').innerText.includes('1 sent again.')").await;
    assert_eq!(received(2).await[1], serde_json::json!(older.to_string()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hook_seen.lock().unwrap().len(), 2, "each run's end sent again once");

    // An admin adds an endpoint from the page (its secret shown once) and deletes it (a second
    // click confirms).
    let (added, _, _) = crate::integrations::switchable_receiver_on("127.0.0.1", true).await;
    browser.go(&format!("{}/ui/#/webhooks", tm.api)).await;
    browser
        .until("the form to add one, for an admin", "return !!document.querySelector('main form:not([hidden])')")
        .await;
    browser.type_into("main input[name=url]", &added).await;
    browser.click("main form button[type=submit]").await;
    browser
        .until("its secret, shown once", "return !!document.querySelector('main code.secret') && document.querySelector('main code.secret').innerText.startsWith('whsec_')")
        .await;
    let row = row_with(&added);
    browser.until("the endpoint added", &format!("return !!{row}")).await;
    let listed = tm.get_json(format!("{}/v1/webhook-endpoints", tm.api)).await;
    assert!(listed["items"].as_array().unwrap().iter().any(|e| e["url"] == added.as_str()), "{listed}");
    assert_eq!(browser.confirm(&row).await, "Delete? Click again (then disabled)");
    browser.until("the endpoint gone", &format!("return !{row}")).await;
    let listed = tm.get_json(format!("{}/v1/webhook-endpoints", tm.api)).await;
    assert!(!listed["items"].as_array().unwrap().iter().any(|e| e["url"] == added.as_str()), "{listed}");

    // An admin sets a secret from the page (only its name is listed) and deletes it.
    browser.go(&format!("{}/ui/#/secrets", tm.api)).await;
    browser
        .until("the form to set one, for an admin", "return !!document.querySelector('main form:not([hidden])')")
        .await;
    browser.type_into("main input[name=name]", "DEPLOY_TOKEN").await;
    browser.type_into("main input[name=value]", "s3cr3t-from-the-page").await;
    browser.click("main form button[type=submit]").await;
    let secret_row = row_with("DEPLOY_TOKEN");
    browser.until("the secret listed", &format!("return !!{secret_row}")).await;
    assert_eq!(browser.run("return document.querySelector('main').innerText.includes('s3cr3t')").await, false);
    let listed = tm.get_json(format!("{}/v1/secrets", tm.api)).await;
    assert!(listed["items"].as_array().unwrap().iter().any(|x| x["name"] == "DEPLOY_TOKEN"), "{listed}");
    // Confirmed, the button is disabled: a third click does not send the delete again.
    assert_eq!(browser.confirm(&secret_row).await, "Delete? Click again (then disabled)");
    browser.until("the secret gone", &format!("return !{secret_row}")).await;
    browser
        .until(
            "the page saying so",
            "return document.querySelector('main').innerText.includes('DEPLOY_TOKEN is deleted.')",
        )
        .await;
    // Set again after its delete (the name is still in the form), it can be deleted again.
    browser.type_into("main input[name=value]", "another").await;
    browser.click("main form button[type=submit]").await;
    browser
        .until(
            "the secret listed again, with its Delete",
            &format!("return !!{secret_row} && !!{secret_row}.querySelector('button.delete')"),
        )
        .await;
    // A list shows a page and links to the next; its address takes the API's `limit`.
    let res = tm.send_json(reqwest::Method::PUT, "/v1/secrets/A_FIRST", &serde_json::json!({"value": "x"})).await;
    tm.get_json_after(format!("{}/v1/secrets", tm.api), TestMesh::written_seq(&res)).await;
    browser.go(&format!("{}/ui/#/secrets?limit=1", tm.api)).await;
    let first_row = row_with("A_FIRST");
    let next_link = "document.querySelector(\"main a[href^='#/secrets?']\")";
    browser
        .until("a page of one, linking to the next", &format!("return !!{first_row} && !{secret_row} && !!{next_link}"))
        .await;
    browser.click("main a[href^='#/secrets?']").await;
    browser.until("the next page, the last", &format!("return !!{secret_row} && !{first_row} && !{next_link}")).await;

    // The Repositories page lists a connection (its pushes, its commit statuses, the last one
    // given up with its run and why) and an admin deletes it (a second click confirms).
    let repo = serde_json::json!({"forge": "github", "repository": "acme/site", "secret": "12345678",
        "branches": ["main"], "status_token": "gh-token",
        "workflow": {"name": "ci", "steps": [{"id": "a", "uses": "noop"}]}});
    let res = tm.send_json(reqwest::Method::POST, "/v1/repo-connections", &repo).await;
    assert_eq!(res.status(), 201);
    let created = res.json::<serde_json::Value>().await.unwrap();
    let connection: uuid::Uuid = created["id"].as_str().unwrap().parse().unwrap();
    let hook_path = serde_json::to_string(created["webhook_path"].as_str().unwrap()).unwrap();
    browser.click("#nav a[href=\"#/repositories\"]").await;
    let repo_row = row_with("github: acme/site");
    browser
        .until(
            "the connection listed, with its pushes, workflow and webhook path",
            &format!("const r = {repo_row}; return !!r && r.innerText.includes('branches main') && r.innerText.includes('active') && r.innerText.includes('ci') && r.innerText.includes({hook_path})"),
        )
        .await;
    let its_run = uuid::Uuid::now_v7();
    let failed = taskmesh_events::EventMeta::new("default").envelope(
        tm.bus.namespace().repo_statuses("default", connection),
        taskmesh_events::Event::CommitStatusFailed(taskmesh_events::CommitStatusFailed::new(
            connection,
            its_run,
            "fd489864e7642b48eaad6e3f155c10e46810ec72".into(),
            taskmesh_events::command::CommitState::Success,
            "POST https://api.github.com/… answered 401 Unauthorized".into(),
        )),
    );
    tm.bus.append(0, &failed).await.unwrap();
    browser
        .until(
            "the status given up shown",
            &format!("return !!{repo_row} && {repo_row}.innerText.includes('success: POST') && {repo_row}.innerText.includes('401') && !!{repo_row}.querySelector('a[href=\"#/runs/{its_run}\"]')"),
        )
        .await;
    assert_eq!(browser.confirm(&repo_row).await, "Delete? Click again (then disabled)");
    browser.until("the connection gone", &format!("return !{repo_row}")).await;
    let listed = tm.get_json(format!("{}/v1/repo-connections", tm.api)).await;
    assert_eq!(listed["items"], serde_json::json!([]), "{listed}");

    // An admin issues a key from the Keys page (shown once; it works) and revokes it (a second
    // click confirms; it then works no more). The page's own key offers no Revoke.
    browser.click("#nav a[href=\"#/keys\"]").await;
    browser
        .until(
            "the form to issue one, for an admin",
            "return !!document.querySelector('main form:not([hidden]) select[name=role]')",
        )
        .await;
    browser.type_into("main input[name=name]", "ci-bot").await;
    browser.run("document.querySelector('main select[name=role]').value = 'operator'; return true").await;
    browser.click("main form button[type=submit]").await;
    browser
        .until("the key, shown once", "return !!document.querySelector('main code.secret') && document.querySelector('main code.secret').innerText.startsWith('tm_')")
        .await;
    let issued = browser.run("return document.querySelector('main code.secret').innerText").await;
    let issued = issued.as_str().unwrap().to_string();
    let whoami = |key: String| {
        let tm = &tm;
        async move { tm.http.get(format!("{}/v1/whoami", tm.api)).bearer_auth(key).send().await.unwrap() }
    };
    let key_row = row_with("ci-bot");
    browser.until("the key listed", &format!("return !!{key_row} && !!{key_row}.querySelector('button.delete')")).await;
    // Listed after the read side held its creation: it authenticates now.
    let res = whoami(issued.clone()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["role"], "operator");
    // The page's own key: marked so, with no button.
    let own_row = row_with("this page's key");
    assert_eq!(browser.run(&format!("return !!{own_row} && !{own_row}.querySelector('button')")).await, true);
    // The key itself is above the list, and in no row of it.
    assert_eq!(
        browser
            .run(&format!(
                "return document.querySelector('main').innerText.includes('{issued}') && !document.querySelector('main tbody').innerText.includes('{issued}')"
            ))
            .await,
        true
    );
    assert_eq!(browser.confirm(&key_row).await, "Revoke? Click again (then disabled)");
    browser
        .until(
            "the key shown revoked",
            &format!(
                "return !{key_row}.querySelector('button') && {key_row}.classList.contains('muted') && {key_row}.children[5].innerText.trim() !== ''"
            ),
        )
        .await;
    taskmesh_testkit::eventually("the revoked key refused", Duration::from_secs(10), || async {
        Ok((whoami(issued.clone()).await.status() == 401).then_some(()))
    })
    .await
    .unwrap();

    // The run: its DAG (three steps, two edges), each step's state, the timeline, the log.
    browser.go(&format!("{}/ui/#/runs/{id}/steps/build", tm.api)).await;
    browser.until("the DAG", "return document.querySelectorAll('svg.dag .node').length === 3").await;
    assert_eq!(browser.run("return document.querySelectorAll('svg.dag path').length").await, 2);
    let text = "return document.querySelector('main').innerText";
    browser.until("the step's log", "return document.querySelector('pre').innerText.includes('built it')").await;
    let shown = browser.run(text).await.as_str().unwrap().to_string();
    for expected in ["pictured", "failed", "succeeded", "Rerun failed steps", "oops"] {
        assert!(shown.contains(expected), "{expected} in {shown}");
    }
    assert_eq!(browser.run("return document.querySelector('pre .stderr').innerText").await, "oops\n");
    // Looks a second apart, and none shows a line twice.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = browser.run("return document.querySelector('pre').innerText").await;
    // (stdout and stderr lines are in the order they were read, either way round here)
    let mut lines: Vec<&str> = log.as_str().unwrap().lines().collect();
    lines.sort();
    assert_eq!(lines, ["built it", "oops"], "{log}");
    // The policy let the script set the timeline's bars (styles set from script, not inline).
    let width = browser.run("return document.querySelector('.timeline span').style.width").await;
    assert!(width.as_str().is_some_and(|w| w.ends_with('%')), "{width}");

    // Rerunning from the page starts a new run and shows it.
    browser.click(".actions button").await;
    browser
        .until(
            "the rerun's page",
            &format!("return !location.hash.includes('{id}') && location.hash.startsWith('#/runs/')"),
        )
        .await;
    let hash = browser.run("return location.hash").await;
    let rerun: uuid::Uuid = hash.as_str().unwrap().trim_start_matches("#/runs/").parse().unwrap();
    let (status, run) = tm.get_run(rerun).await;
    assert_eq!((status, &run["trigger"]["kind"]), (200, &serde_json::json!("rerun")));

    // A link whose run id is not one is not followed into the API's paths.
    browser.go(&format!("{}/ui/#/runs/..%2Fkeys%23", tm.api)).await;
    browser
        .until("the refusal of the link", "return document.querySelector('main').innerText.includes('not a run id')")
        .await;

    // A retried step's log shows each attempt's lines under its number.
    browser.go(&format!("{}/ui/#/runs/{retried}/steps/flaky", tm.api)).await;
    browser.until("the retried step's log", "return document.querySelector('pre').innerText.includes('try 2')").await;
    assert_eq!(browser.run("return document.querySelector('pre').innerText").await, "try 1\n── attempt 2 ──\ntry 2\n");

    // Signing out forgets the key.
    browser.click("#sign-out").await;
    browser.until("the sign-in form again", "return !!document.querySelector('input[name=key]')").await;
    assert_eq!(browser.run("return sessionStorage.getItem('taskmesh.key')").await, serde_json::Value::Null);

    // A link to the run (a commit status's, a Slack message's) opens that run once signed in.
    browser.go(&format!("{}/ui/#/runs/{id}", tm.api)).await;
    browser.until("the sign-in form for the link", "return !!document.querySelector('input[name=key]')").await;
    browser.type_into("input[name=key]", &tm.key).await;
    browser.click("button[type=submit]").await;
    browser.until("the linked run's DAG", "return document.querySelectorAll('svg.dag .node').length === 3").await;
    assert_eq!(browser.run("return location.hash").await, format!("#/runs/{id}").as_str());
    assert_eq!(browser.run("return !!document.querySelector('.actions button')").await, true, "an admin may rerun");

    // A viewer's key is offered no cancel or rerun.
    let res = tm.send_json(reqwest::Method::POST, "/v1/keys", &serde_json::json!({"role": "viewer"})).await;
    assert_eq!(res.status(), 201);
    let viewer = res.json::<serde_json::Value>().await.unwrap()["key"].as_str().unwrap().to_string();
    tm.wait_projected().await;
    browser.click("#sign-out").await;
    browser.go(&format!("{}/ui/#/runs/{id}", tm.api)).await;
    browser.until("the sign-in form for the viewer", "return !!document.querySelector('input[name=key]')").await;
    browser.type_into("input[name=key]", &viewer).await;
    browser.click("button[type=submit]").await;
    browser.until("the run, for the viewer", "return document.querySelectorAll('svg.dag .node').length === 3").await;
    browser.until("the viewer named", "return document.getElementById('who').innerText === 'default · viewer'").await;
    let admin_links =
        "const a = [...document.querySelectorAll('#nav a.admin')]; return a.length > 0 && a.every((l) => l.hidden)";
    assert_eq!(browser.run(admin_links).await, true, "a viewer is offered no admin pages");
    assert_eq!(browser.run("return document.querySelector('.actions')").await, serde_json::Value::Null);
}
