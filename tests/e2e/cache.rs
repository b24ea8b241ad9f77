//! `cache:` steps: an earlier success's outcome reused, within its time, by the same tenant's
//! same step; failures, other keys and other tenants run. (Bad `cache` fields: the workflow
//! validation's unit tests.)

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use taskmesh_events::Event;

use crate::helpers::*;

const PLATFORM_KEY: &str = "platform-admin-key-for-cache-tests";

/// A run whose `gen` step (cached, `ttl` seconds, `key`) makes a new value each time it runs,
/// and whose `use` step (not cached) prints it.
fn workflow(ttl: u64, key: &str) -> String {
    format!(
        "name: cached\nsteps:\n  - id: gen\n    run: 'echo made; echo n=$(date +%s%N)-$$ >> $TASKMESH_OUTPUT'\n    cache: {{key: '{key}', ttl_seconds: {ttl}}}\n  - {{id: use, needs: [gen], run: 'echo got ${{{{ steps.gen.outputs.n }}}}'}}\n"
    )
}

/// Runs `yaml` to its end as the `key`'s tenant; returns the run's id and view.
async fn run(tm: &TestMesh, key: &str, yaml: &str) -> (uuid::Uuid, Value) {
    let id = tm.submit_as(key, yaml).await;
    (id, tm.wait_run_as(key, id, Duration::from_secs(30)).await)
}

fn n(view: &Value) -> String {
    step(view, "gen")["outputs"]["n"].as_str().unwrap().to_string()
}

/// The `cached_from` of the step's success in the run's log.
async fn cached_from(tm: &TestMesh, id: uuid::Uuid, step: &str) -> Option<taskmesh_events::CachedFrom> {
    let events = tm.run_events(id).await;
    let succeeded = events.into_iter().find_map(|e| match e.event {
        Event::StepSucceeded(s) if s.step == step => Some(s.outcome.cached_from),
        _ => None,
    });
    succeeded.expect("the step's StepSucceeded")
}

/// Each kept outcome's subject on `TM_CACHE`, with its last message's sequence.
async fn kept(tm: &TestMesh) -> Vec<(String, u64)> {
    let ns = tm.bus.namespace();
    let subjects = tm.bus.subject_counts(&ns.cache_stream(), &ns.cache_all()).await.unwrap();
    let stream = tm.bus.jetstream().get_stream(ns.cache_stream()).await.unwrap();
    let mut out = Vec::new();
    for subject in subjects.into_keys() {
        out.push((subject.clone(), stream.get_last_raw_message_by_subject(&subject).await.unwrap().sequence));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_step_reuses_an_earlier_success_of_its_tenant_until_its_time_runs_out() {
    let tm = spawn_with(&Svc::ALL, |s| s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY))).await;
    let yaml = workflow(600, "a");

    // The first run runs it; the second takes its outcome, and the step downstream gets it.
    let (first, one) = run(&tm, &tm.key, &yaml).await;
    assert_eq!(one["status"], "succeeded", "{one:#}");
    assert_eq!(step(&one, "gen")["reason"], Value::Null);
    assert_eq!(cached_from(&tm, first, "gen").await, None);
    let made = n(&one);
    let after_first = kept(&tm).await;
    assert_eq!(after_first.len(), 1, "one outcome kept: {after_first:?}");
    let (second, two) = run(&tm, &tm.key, &yaml).await;
    assert_eq!(two["status"], "succeeded", "{two:#}");
    let gen_step = step(&two, "gen");
    assert_eq!(n(&two), made, "the outcome is the first run's");
    assert_eq!(gen_step["output"], "made\n");
    assert_eq!(gen_step["reason"], format!("cached from run {first} (step gen)"));
    assert_eq!(step(&two, "use")["output"], format!("got {made}\n"), "its outputs flow downstream");
    assert_eq!(step(&two, "use")["reason"], Value::Null, "a step without cache runs");
    let from = cached_from(&tm, second, "gen").await.expect("the log says where the outcome came from");
    assert_eq!((from.run_id, from.step.as_str(), from.attempt), (first, "gen", 1));
    assert_eq!(kept(&tm).await, after_first, "a reused outcome is not kept again");
    let logs: Value = tm.get_json(format!("{}/v1/runs/{second}/steps/gen/logs", tm.api)).await;
    let lines = logs["lines"].as_array().unwrap();
    assert!(
        lines.iter().any(|l| l["stream"] == "system" && l["line"].as_str().unwrap().contains(&first.to_string())),
        "the step's log says it was cached: {logs:#}"
    );

    // What names or orders a step is not what it does: another id, name and retry policy reuse it.
    let renamed = yaml
        .replace("- id: gen\n", "- id: make\n    name: Generate\n    retry: {max_attempts: 2}\n")
        .replace("needs: [gen]", "needs: [make]")
        .replace("steps.gen.", "steps.make.");
    let (third, three) = run(&tm, &tm.key, &renamed).await;
    assert_eq!(step(&three, "make")["outputs"]["n"], made.as_str(), "{three:#}");
    assert_eq!(step(&three, "use")["output"], format!("got {made}\n"));
    let from = cached_from(&tm, third, "make").await.expect("cached");
    assert_eq!((from.run_id, from.step.as_str()), (first, "gen"));
    // Another key, or another script, is another outcome.
    let (_, other_key) = run(&tm, &tm.key, &workflow(600, "b")).await;
    assert_ne!(n(&other_key), made);
    assert_eq!(step(&other_key, "gen")["reason"], Value::Null);
    let (_, other_script) = run(&tm, &tm.key, &yaml.replace("echo made", "echo made again")).await;
    assert_ne!(n(&other_script), made);

    // Another tenant's same step runs: outcomes are the tenant's own.
    let beta_key = tm.new_tenant(PLATFORM_KEY, "beta").await;
    let (_, theirs) = run(&tm, &beta_key, &yaml).await;
    assert_eq!(theirs["status"], "succeeded", "{theirs:#}");
    assert_ne!(n(&theirs), made, "tenant beta's step ran");
    assert_eq!(step(&theirs, "gen")["reason"], Value::Null);

    // A step's secrets are opened before the cache is looked at: once one is deleted, the step
    // fails as it would have, though its outcome is kept.
    let put = tm.send_json(Method::PUT, "/v1/secrets/CACHE_TOKEN", &json!({"value": "s3cret"})).await;
    assert_eq!(put.status(), 204);
    tm.wait_projected().await;
    let with_secret = "name: secret\nsteps:\n  - {id: gen, run: 'echo n=$$ >> $TASKMESH_OUTPUT', secrets: [CACHE_TOKEN], cache: {}}\n";
    let (_, ran) = run(&tm, &tm.key, with_secret).await;
    assert_eq!(ran["status"], "succeeded", "{ran:#}");
    let (_, hit) = run(&tm, &tm.key, with_secret).await;
    assert_eq!(n(&hit), n(&ran), "a one-step run's outcome is kept by the time the run ends");
    assert!(step(&hit, "gen")["reason"].as_str().is_some_and(|r| r.starts_with("cached from run")), "{hit:#}");
    let deleted = tm.send_json(Method::DELETE, "/v1/secrets/CACHE_TOKEN", &json!({})).await;
    assert_eq!(deleted.status(), 204);
    tm.wait_projected().await;
    let (_, refused) = run(&tm, &tm.key, with_secret).await;
    assert_eq!(refused["status"], "failed", "{refused:#}");
    assert!(step(&refused, "gen")["error"].as_str().unwrap().contains("CACHE_TOKEN"), "{refused:#}");

    // A failure is not kept: the same failing step runs each time, and TM_CACHE is unchanged.
    let before = kept(&tm).await;
    let failing = "name: failing\nsteps:\n  - {id: gen, run: 'echo no; exit 3', cache: {}}\n";
    for _ in 0..2 {
        let (_, failed) = run(&tm, &tm.key, failing).await;
        assert_eq!(failed["status"], "failed", "{failed:#}");
        assert_eq!(step(&failed, "gen")["exit_code"], 3);
        assert_eq!(step(&failed, "gen")["reason"], Value::Null);
    }
    assert_eq!(kept(&tm).await, before, "no failure kept");

    // Purged, the tenant's kept outcomes go (another tenant's stay): the step runs again.
    let key_of = |role: &'static str| {
        let tm = &tm;
        async move {
            let res = tm.send_json(Method::POST, "/v1/keys", &json!({"role": role})).await;
            assert_eq!(res.status(), 201);
            res.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_string()
        }
    };
    let (viewer, operator) = (key_of("viewer").await, key_of("operator").await);
    tm.wait_projected().await;
    let purge = |key: String| tm.http.delete(format!("{}/v1/cache", tm.api)).bearer_auth(key).send();
    assert_eq!(purge(viewer).await.unwrap().status(), 403, "a viewer may not purge");
    let ours = kept(&tm).await.iter().filter(|(s, _)| s.contains(".cache.default.")).count();
    let res = purge(operator).await.unwrap();
    assert_eq!(res.status(), 200, "an operator may");
    assert_eq!(res.json::<Value>().await.unwrap()["purged"], ours as u64, "every outcome of the tenant's");
    let left = kept(&tm).await;
    assert!(!left.is_empty() && left.iter().all(|(s, _)| s.contains(".cache.beta.")), "beta's stay: {left:?}");
    let (_, anew) = run(&tm, &tm.key, &yaml).await;
    assert_eq!(step(&anew, "gen")["reason"], Value::Null, "the step ran again");
    assert_ne!(n(&anew), made);

    // The reusing step's ttl counts: an outcome older than it is not reused (though the step
    // that kept it would have), and the new one is kept for a step with a longer ttl.
    let short = workflow(1, "a");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, fresh) = run(&tm, &tm.key, &short).await;
    assert_ne!(n(&fresh), n(&anew), "a second-old outcome is too old for a one-second ttl");
    assert_eq!(step(&fresh, "gen")["reason"], Value::Null);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, reused) = run(&tm, &tm.key, &yaml).await;
    assert_eq!(n(&reused), n(&fresh), "the latest success is the one kept, and young enough for ten minutes");
    tm.finish().await;
}

/// `refresh_cache` on a submission or a rerun: its `cache:` steps run rather than reuse the
/// kept outcome, and theirs replace it, so later runs reuse the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_with_refresh_cache_runs_its_cached_steps_and_later_runs_reuse_their_outcomes() {
    let tm = spawn_mesh().await;
    let workflow = json!({"name": "refreshed", "steps": [{"id": "gen", "cache": {"ttl_seconds": 600},
        "run": "echo made; echo n=$(date +%s%N)-$$ >> $TASKMESH_OUTPUT"}]});
    // Submits (`POST path` with `body`) and waits for the run's end.
    let submitted = async |path: String, body: Value| {
        let res = tm.send_json(Method::POST, &path, &body).await;
        assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
        let id: uuid::Uuid = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
        let view = tm.wait_run(id, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "succeeded", "{view:#}");
        (id, view)
    };
    let (_, one) = submitted("/v1/runs".into(), json!({"workflow": workflow})).await;
    let (_, two) = submitted("/v1/runs".into(), json!({"workflow": workflow})).await;
    assert_eq!(n(&two), n(&one), "reused");

    // Refreshed: it runs, and what it made is what the next run reuses.
    let (refreshed, three) = submitted("/v1/runs".into(), json!({"workflow": workflow, "refresh_cache": true})).await;
    assert_ne!(n(&three), n(&one), "the step ran");
    assert_eq!((&one["refresh_cache"], &three["refresh_cache"]), (&json!(false), &json!(true)), "the run shows it");
    assert_eq!(step(&three, "gen")["reason"], Value::Null);
    assert_eq!(cached_from(&tm, refreshed, "gen").await, None);
    let (later, four) = submitted("/v1/runs".into(), json!({"workflow": workflow})).await;
    assert_eq!(n(&four), n(&three), "the refreshed outcome replaced the first");
    assert_eq!(cached_from(&tm, later, "gen").await.map(|c| c.run_id), Some(refreshed));
    let logs: Value = tm.get_json(format!("{}/v1/runs/{refreshed}/steps/gen/logs", tm.api)).await;
    // The refresh's line opens the attempt's log, numbered with the step's own lines.
    let lines: Vec<(u64, &str, &str)> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["n"].as_u64().unwrap(), l["stream"].as_str().unwrap(), l["line"].as_str().unwrap()))
        .collect();
    let refreshing = "cache: refreshing: the kept outcome is forgotten; the step runs";
    assert_eq!(lines, [(1, "system", refreshing), (2, "stdout", "made")], "{logs:#}");
    // A rerun does not take the flag from the run it reruns: this one reuses.
    let (_, again) = submitted(format!("/v1/runs/{refreshed}/rerun"), json!({"from": "gen"})).await;
    assert_eq!(n(&again), n(&three), "{again:#}");

    // A rerun may refresh too; without it, a rerun step reuses as any run does.
    let (_, five) = submitted(format!("/v1/runs/{later}/rerun"), json!({"from": "gen", "refresh_cache": true})).await;
    assert_ne!(n(&five), n(&four), "the rerun step ran");
    assert_eq!(five["refresh_cache"], true);
    let (_, six) = submitted(format!("/v1/runs/{later}/rerun"), json!({"from": "gen"})).await;
    assert_eq!(n(&six), n(&five), "and its outcome is the one kept");
    // A YAML body (the workflow alone; JSON is YAML too) asks for it in the query.
    let yaml = |query: &str| {
        let req = tm.auth(tm.http.post(format!("{}/v1/runs?{query}", tm.api)));
        req.header("content-type", "application/yaml").body(workflow.to_string()).send()
    };
    let res = yaml("refresh_cache=true").await.unwrap();
    assert_eq!(res.status(), 202);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    let seven = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_ne!(n(&seven), n(&six), "the step ran: {seven:#}");
    for bad in ["refresh_cache=maybe", "refresh=true"] {
        let res = yaml(bad).await.unwrap();
        assert_eq!(res.status(), 400, "{bad}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }

    // A refreshing run forgets the kept outcome before its step runs: should the step fail,
    // the next run reuses nothing.
    let toggle = std::env::temp_dir().join(format!("{}-fail", uuid::Uuid::now_v7()));
    let flaky = json!({"name": "flaky", "steps": [{"id": "gen", "cache": {"ttl_seconds": 600},
        "run": format!("test -e {} && exit 1; echo n=$(date +%s%N)-$$ >> $TASKMESH_OUTPUT", toggle.display())}]});
    let (_, kept) = submitted("/v1/runs".into(), json!({"workflow": flaky})).await;
    std::fs::write(&toggle, "").unwrap();
    let id = tm.submit_json_as(&tm.key, json!({"workflow": flaky, "refresh_cache": true})).await;
    assert_eq!(tm.wait_run(id, Duration::from_secs(30)).await["status"], "failed");
    std::fs::remove_file(&toggle).unwrap();
    let (_, after) = submitted("/v1/runs".into(), json!({"workflow": flaky})).await;
    assert_ne!(n(&after), n(&kept), "the step ran: the outcome the refresh was to replace is gone");
    assert_eq!(step(&after, "gen")["reason"], Value::Null);
    tm.finish().await;
}
