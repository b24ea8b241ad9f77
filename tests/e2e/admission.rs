//! Admission control: per-tenant concurrency limits and fairness, priorities, rate-limit
//! buckets, concurrency groups, and the reasons a wait shows in the API.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use taskmesh_config::TenantLimits;
use taskmesh_events::Event;
use taskmesh_testkit::eventually;
use uuid::Uuid;

use crate::helpers::*;

const PLATFORM_KEY: &str = "platform-admin-key-for-admission-tests";

/// Something's key, when it started and when it ended (if it did).
type Span<K> = (K, DateTime<Utc>, Option<DateTime<Utc>>);

/// A step's id and attempt, when the attempt started and when it ended (if it did).
type Interval = Span<(String, u32)>;

/// When each attempt of each step of a run started and ended, from the log. An attempt ends
/// with its success, failure or loss (a second attempt, after a lost lease or a redelivery,
/// is an interval of its own), or with its step's cancellation.
async fn intervals(tm: &TestMesh, tenant: &str, id: Uuid) -> Vec<Interval> {
    let mut out: Vec<Interval> = Vec::new();
    let end = |step: &str, attempt: Option<u32>, at: DateTime<Utc>, out: &mut Vec<Interval>| {
        if let Some(i) = out.iter_mut().find(|i| i.0.0 == step && attempt.is_none_or(|a| i.0.1 == a) && i.2.is_none()) {
            i.2 = Some(at);
        }
    };
    for e in tm.tenant_run_events(tenant, id).await {
        match &e.event {
            Event::StepStarted(s) => out.push(((s.step.clone(), s.attempt), e.occurred_at, None)),
            Event::StepSucceeded(s) => end(&s.step, Some(s.attempt), e.occurred_at, &mut out),
            Event::StepFailed(s) => end(&s.step, Some(s.attempt), e.occurred_at, &mut out),
            Event::StepAttemptFailed(s) => end(&s.step, Some(s.attempt), e.occurred_at, &mut out),
            Event::StepAttemptLost(s) => end(&s.step, Some(s.attempt), e.occurred_at, &mut out),
            Event::StepCancelled(s) => end(&s.step, None, e.occurred_at, &mut out),
            _ => {}
        }
    }
    out
}

/// Most intervals open at once.
fn peak<K>(intervals: &[Span<K>]) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for (_, start, end) in intervals {
        edges.push((*start, 1));
        edges.push((end.unwrap_or(DateTime::<Utc>::MAX_UTC), -1));
    }
    // At equal times an end comes before a start: the slot was freed first.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

async fn run_of(tm: &TestMesh, key: &str, id: Uuid) -> Value {
    tm.get_run_as(key, id).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_flood_does_not_starve_another_and_stays_within_its_limit() {
    const LIMIT: usize = 3;
    let tm = spawn_with(&Svc::ALL, |s| {
        s.gateway.admin_key = Some(secrecy::SecretString::from(PLATFORM_KEY));
        s.executor.slots = 4;
        s.limits.tenants.insert(
            "default".into(),
            TenantLimits { max_steps: Some(LIMIT as u32), max_runs: None, ..Default::default() },
        );
    })
    .await;
    let beta_key = tm.new_tenant(PLATFORM_KEY, "beta").await;

    // Tenant A (`default`): 5,000 steps, ten runs of 500.
    let steps: Vec<Value> = (0..500).map(|i| json!({"id": format!("s{i}"), "uses": "noop"})).collect();
    let mut a_runs = Vec::new();
    for r in 0..10 {
        a_runs.push(
            tm.submit_json_as(&tm.key, json!({"workflow": {"name": format!("flood-{r}"), "steps": steps}})).await,
        );
    }
    // A's backlog is held back for the tenant's limit, and the API says so.
    let reason = step_wait_reason(&tm, a_runs[9], Duration::from_secs(60)).await;
    assert_eq!(reason, format!("tenant concurrency limit ({LIMIT} steps)"));

    // Tenant B: ten steps, submitted behind A's backlog.
    let b_steps: Vec<Value> = (0..10).map(|i| json!({"id": format!("b{i}"), "uses": "noop"})).collect();
    let b_run = tm.submit_json_as(&beta_key, json!({"workflow": {"name": "small", "steps": b_steps}})).await;
    let b = tm.wait_run_as(&beta_key, b_run, Duration::from_secs(60)).await;
    assert_eq!(b["status"], "succeeded");

    // When B was done, A's backlog had not drained.
    let mut a_done = 0;
    for id in &a_runs {
        let run = run_of(&tm, &tm.key, *id).await;
        a_done += run["steps"].as_array().unwrap().iter().filter(|s| s["status"] == "succeeded").count();
    }
    assert!(a_done < 4_000, "B finished before A's backlog drained ({a_done} of A's 5000 steps done)");

    // Cancelling A's runs ends them, held steps and all.
    for id in &a_runs {
        let res = tm.auth(tm.http.post(format!("{}/v1/runs/{id}/cancel", tm.api))).send().await.unwrap();
        assert!(res.status() == 202 || res.status() == 409, "{}", res.status());
    }
    for id in &a_runs {
        let run = tm.wait_run(*id, Duration::from_secs(60)).await;
        assert!(["cancelled", "succeeded"].contains(&run["status"].as_str().unwrap()), "{}", run["status"]);
    }

    // A never had more than its limit of steps running at once. Measured once every run has
    // ended, so that every attempt has its end in the log: read while they still ran, one run
    // after another, a step that ended after its run was read would look as if it ran on
    // beside steps started later in runs read later.
    let mut all = Vec::new();
    for id in &a_runs {
        all.extend(intervals(&tm, "default", *id).await);
    }
    if all.is_empty() {
        let mut seen = Vec::new();
        for id in &a_runs {
            let events = tm.tenant_run_events("default", *id).await;
            seen.push(events.iter().map(|e| e.type_name()).collect::<Vec<_>>().join(","));
        }
        panic!("no step of tenant A's runs started; their events: {seen:#?}");
    }
    if peak(&all) > LIMIT {
        // Which attempts overlapped, to tell a real breach from a measuring artefact.
        let mut open: Vec<_> = all
            .iter()
            .filter(|a| all.iter().filter(|b| b.1 <= a.1 && b.2.is_none_or(|e| e > a.1)).count() > LIMIT)
            .collect();
        open.sort_by_key(|i| i.1);
        panic!(
            "tenant A ran {} steps at once (limit {LIMIT}); attempts starting at such a moment: {open:?}",
            peak(&all)
        );
    }

    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_contention_the_higher_priority_goes_first() {
    let tm = spawn_with(&Svc::ALL, |s| {
        s.limits
            .tenants
            .insert("default".into(), TenantLimits { max_steps: Some(1), max_runs: None, ..Default::default() });
    })
    .await;
    let blocker = tm
        .submit_json_as(&tm.key, json!({"workflow": {"name": "blocker", "steps": [{"id": "hold", "run": "sleep 2"}]}}))
        .await;
    eventually("the blocker to run", Duration::from_secs(30), || async {
        let run = run_of(&tm, &tm.key, blocker).await;
        Ok((run["steps"][0]["status"] == "running").then_some(()))
    })
    .await
    .unwrap();
    let one = |name: &str| json!({"name": name, "steps": [{"id": "go", "run": "true"}]});
    let low = tm.submit_json_as(&tm.key, json!({"workflow": one("low"), "priority": -10})).await;
    let mid = tm.submit_json_as(&tm.key, json!({"workflow": one("mid")})).await;
    // A step's own priority beats the run's.
    let high = tm.submit_json_as(&tm.key,
        json!({"workflow": {"name": "high", "steps": [{"id": "go", "run": "true", "priority": 50}]}, "priority": -20}),
    )
    .await;
    let mut started = Vec::new();
    for (name, id) in [("low", low), ("mid", mid), ("high", high)] {
        let run = tm.wait_run(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded");
        started.push((ts(step(&run, "go"), "started_at"), name));
    }
    assert_eq!(run_of(&tm, &tm.key, low).await["priority"], -10);
    started.sort();
    let order: Vec<&str> = started.iter().map(|(_, n)| *n).collect();
    assert_eq!(order, ["high", "mid", "low"], "dispatched by priority, not submission order");
    tm.finish().await;
}

/// The steps one decision dispatched (here a run's five first steps) are one `READY` entry,
/// each admitted on its own as the tenant's limit allows: the entry stays while any of them is
/// held, and goes once the last is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fan_outs_steps_are_one_ready_entry_kept_until_the_last_is_admitted() {
    let tm = spawn_with(&Svc::ALL, |s| {
        s.limits.tenants.insert("default".into(), TenantLimits { max_steps: Some(2), ..Default::default() });
    })
    .await;
    let ready = || async { tm.stream_state(&tm.bus.namespace().ready_stream()).await.messages };
    let steps: Vec<Value> = (0..5).map(|i| json!({"id": format!("s{i}"), "run": "sleep 4"})).collect();
    let id = tm.submit_json_as(&tm.key, json!({"workflow": {"name": "fan", "steps": steps}})).await;
    let reason = step_wait_reason(&tm, id, Duration::from_secs(30)).await;
    assert_eq!(reason, "tenant concurrency limit (2 steps)");
    // The leader's gauge counts the three held back (until the first two end, four seconds
    // in), and none once all are admitted. Under nextest the process is this test's alone; under
    // plain `cargo test` other tests' leaders set the same gauge.
    let exact = std::env::var_os("NEXTEST_RUN_ID").is_some();
    let held_gauge = |want: f64| {
        let tm = &tm;
        async move {
            let got = sample(&tm.metrics().await, "taskmesh_dispatch_held_steps", &[]);
            anyhow::Ok((!exact || got == want).then_some(()))
        }
    };
    eventually("the held-steps gauge to count three", Duration::from_secs(3), || held_gauge(3.0)).await.unwrap();
    // Past the second after which an admitted entry above a held one would be deleted on its
    // own (the last step is held until the first four have run, about eight seconds in).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, run) = tm.get_run(id).await;
    let held = run["steps"].as_array().unwrap().iter().filter(|s| s["started_at"].is_null()).count();
    assert!(held > 0, "a step still held: {run}");
    assert_eq!(ready().await, 1, "some of the five admitted, the rest held: their one entry stays");
    let run = tm.wait_run(id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    eventually("the held-steps gauge to count none", Duration::from_secs(10), || held_gauge(0.0)).await.unwrap();
    // The entry removed (and nothing else left queued).
    tm.wait_queues_drained().await;
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_step_runs_at_the_buckets_rate_and_none_fails_for_it() {
    let tm = spawn_with(&Svc::ALL, |s| s.executor.slots = 8).await;
    let id = tm
        .submit(
            "name: throttled\nsteps:\n  - id: call\n    matrix: {n: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}\n    rate_limit: {key: partner, per_second: 5}\n    uses: noop\n",
        )
        .await;
    let run = tm.wait_run(id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 12);
    assert!(steps.iter().all(|s| s["status"] == "succeeded" && s["attempts"] == 1), "none failed or retried: {run:#}");
    let mut starts: Vec<DateTime<Utc>> = steps.iter().map(|s| ts(s, "started_at")).collect();
    starts.sort();
    // A bucket of 5/s with a burst of 1: the n-th start comes no sooner than n/5 s after the
    // first (less 150 ms: an executor may be slower to start one step than the next), and the
    // whole lot not much later than that.
    for (n, t) in starts.iter().enumerate() {
        let earliest = chrono::Duration::milliseconds(n as i64 * 200 - 150);
        assert!(
            *t - starts[0] >= earliest,
            "start {n} came {} ms after the first",
            (*t - starts[0]).num_milliseconds()
        );
    }
    let span = (starts[11] - starts[0]).num_milliseconds();
    assert!(span < 6_000, "11 intervals at 5/s took {span} ms");
    let waits = waiting_reasons(&tm, id).await;
    assert!(waits.iter().all(|r| r == "rate limit 'partner' (5/s)"), "{waits:?}");
    assert!(!waits.is_empty(), "the held steps said why they waited");
    tm.finish().await;
}

const GROUP: &str = "name: deploy\ninputs:\n  env: {type: string}\nconcurrency: {group: 'deploy-${{ inputs.env }}', limit: 1, policy: POLICY}\nsteps:\n  - {id: go, run: 'sleep SECS'}\n";

async fn submit_group(tm: &TestMesh, policy: &str, secs: &str, env: &str) -> Uuid {
    let yaml = GROUP.replace("POLICY", policy).replace("SECS", secs);
    let workflow: Value = serde_yaml_ng::from_str(&yaml).unwrap();
    tm.submit_json_as(&tm.key, json!({"workflow": workflow, "inputs": {"env": env}})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_group_runs_one_at_a_time_in_order_and_other_keys_are_free() {
    let tm = spawn_with(&Svc::ALL, |s| s.executor.slots = 4).await;
    let first = submit_group(&tm, "queue", "2", "prod").await;
    let second = submit_group(&tm, "queue", "1", "prod").await;
    let third = submit_group(&tm, "queue", "1", "prod").await;
    let other = submit_group(&tm, "queue", "1", "dev").await;
    let reason = eventually("the waiting run's reason", Duration::from_secs(30), || async {
        let run = run_of(&tm, &tm.key, third).await;
        Ok(run["wait_reason"].as_str().map(str::to_owned))
    })
    .await
    .unwrap();
    assert_eq!(reason, "concurrency group 'deploy-prod' is full (limit 1)");
    let mut spans = Vec::new();
    for id in [first, second, third] {
        let run = tm.wait_run(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded");
        spans.push((ts(&run, "started_at"), ts(&run, "finished_at")));
    }
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "one run of the group at a time, in submission order: {spans:?}");
    }
    let other = tm.wait_run(other, Duration::from_secs(60)).await;
    assert_eq!(other["status"], "succeeded");
    assert!(ts(&other, "started_at") < spans[0].1, "another key's run did not wait for the group");
    tm.wait_queues_drained().await;
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_in_progress_cancels_the_running_one_and_skip_drops_the_newcomer() {
    let tm = spawn_with(&Svc::ALL, |s| s.executor.slots = 4).await;
    // cancel_in_progress: the newer run replaces the older.
    let old = submit_group(&tm, "cancel_in_progress", "30", "prod").await;
    eventually("the old run to run", Duration::from_secs(30), || async {
        Ok((run_of(&tm, &tm.key, old).await["status"] == "running").then_some(()))
    })
    .await
    .unwrap();
    let new = submit_group(&tm, "cancel_in_progress", "0", "prod").await;
    let old_run = tm.wait_run(old, Duration::from_secs(30)).await;
    assert_eq!(old_run["status"], "cancelled");
    let new_run = tm.wait_run(new, Duration::from_secs(30)).await;
    assert_eq!(new_run["status"], "succeeded");
    assert!(ts(&new_run, "started_at") >= ts(&old_run, "finished_at"), "the new run waited for the old to end");
    let reason = tm.run_events(old).await.into_iter().find_map(|e| match e.event {
        Event::RunCancelRequested(c) => Some(c.reason),
        _ => None,
    });
    assert_eq!(reason, Some(format!("superseded by run {new} in concurrency group 'deploy-prod'")));

    // skip: a run finding its group full does not run at all.
    let busy = submit_group(&tm, "skip", "3", "stage").await;
    eventually("the busy run to run", Duration::from_secs(30), || async {
        Ok((run_of(&tm, &tm.key, busy).await["status"] == "running").then_some(()))
    })
    .await
    .unwrap();
    let skipped = submit_group(&tm, "skip", "0", "stage").await;
    let skipped_run = tm.wait_run(skipped, Duration::from_secs(30)).await;
    assert_eq!(skipped_run["status"], "cancelled");
    assert_eq!(step(&skipped_run, "go")["attempts"], 0, "the skipped run's step never ran");
    let busy_run = tm.wait_run(busy, Duration::from_secs(30)).await;
    assert_eq!(busy_run["status"], "succeeded");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_run_limit_queues_its_runs_in_order() {
    let tm = spawn_with(&Svc::ALL, |s| {
        s.executor.slots = 6;
        s.limits
            .tenants
            .insert("default".into(), TenantLimits { max_steps: None, max_runs: Some(2), ..Default::default() });
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let yaml =
            format!("name: r{i}\nsteps:\n  - {{id: a, run: 'sleep 1'}}\n  - {{id: b, needs: [a], uses: noop}}\n");
        ids.push(tm.submit(&yaml).await);
    }
    let reason = eventually("a waiting run's reason", Duration::from_secs(30), || async {
        Ok(run_of(&tm, &tm.key, ids[4]).await["wait_reason"].as_str().map(str::to_owned))
    })
    .await
    .unwrap();
    assert_eq!(reason, "tenant concurrent-run limit (2 runs)");
    let mut spans = Vec::new();
    for id in &ids {
        let run = tm.wait_run(*id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded");
        spans.push((String::new(), ts(&run, "started_at"), Some(ts(&run, "finished_at"))));
    }
    assert!(peak(&spans) <= 2, "at most two runs at once: {spans:?}");
    // The first two went at once; the rest in submission order.
    assert!(spans[2].1 >= spans[0].1 && spans[4].1 >= spans[2].1, "{spans:?}");
    tm.wait_queues_drained().await;
    tm.finish().await;
}

/// Why steps of run `id` waited, from its `StepWaiting` events, in order.
async fn waiting_reasons(tm: &TestMesh, id: Uuid) -> Vec<String> {
    let events = tm.run_events(id).await;
    events
        .into_iter()
        .filter_map(|e| match e.event {
            Event::StepWaiting(w) => Some(w.reason),
            _ => None,
        })
        .collect()
}

/// The `wait_reason` a held step of run `id` shows, once it shows one (within `timeout`).
pub(crate) async fn step_wait_reason(tm: &TestMesh, id: Uuid, timeout: Duration) -> String {
    eventually("the held step's wait_reason", timeout, || async {
        let (_, run) = tm.get_run(id).await;
        Ok(run["steps"].as_array().and_then(|s| s.iter().find_map(|s| s["wait_reason"].as_str().map(str::to_owned))))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_circuit_breaker_opens_after_failures_in_a_row_holds_its_steps_and_a_probe_closes_it() {
    let tm = spawn_mesh().await;
    let dir = tempfile::tempdir().unwrap();
    // The service the steps call is up while this file exists.
    let up = dir.path().join("up");
    let calls = |key: &str, cooldown: u64| {
        format!(
            "name: calls\nsteps:\n  - {{id: call, run: '[ -f {} ]', circuit_breaker: {{key: {key}, failures: 2, cooldown_seconds: {cooldown}}}}}\n",
            up.display()
        )
    };
    let run = |yaml: String| {
        let tm = &tm;
        async move {
            let id = tm.submit(&yaml).await;
            (id, tm.wait_run(id, Duration::from_secs(60)).await)
        }
    };
    let call = |run: &Value, field: &str| ts(step(run, "call"), field);
    // Whether a step of run `id` was held by a breaker, from its log.
    let held_by_breaker = |id: Uuid| {
        let tm = &tm;
        async move { waiting_reasons(tm, id).await.iter().any(|r| r.starts_with("circuit breaker")) }
    };
    // Waits until the dispatcher has heard `n` attempts' verdicts of this kind in all (the
    // executor tells it after the run's end is recorded, which the read side may show first).
    let heard = |verdict: &'static str, n: f64| {
        let tm = &tm;
        async move {
            eventually(&format!("{n} '{verdict}' breaker signals"), Duration::from_secs(20), || async {
                let text = tm.metrics().await;
                Ok((sample(&text, "taskmesh_circuit_breaker_signals_total", &[("verdict", verdict)]) >= n)
                    .then_some(()))
            })
            .await
            .unwrap();
        }
    };

    // A step that could not start gives no verdict: this one-failure breaker stays closed.
    let unopened = "name: unopened\nsteps:\n  - {id: call, run: 'true', secrets: [NOT_SET], circuit_breaker: {key: quiet, failures: 1, cooldown_seconds: 600}}\n";
    for _ in 0..2 {
        let (id, ended) = run(unopened.into()).await;
        assert_eq!(ended["status"], "failed", "{ended:#}");
        assert!(!held_by_breaker(id).await, "a step that could not start does not open its breaker");
    }
    heard("none", 2.0).await;

    // Open, it holds its steps, never failing them, while other steps go.
    for _ in 0..2 {
        assert_eq!(run(calls("slow", 600)).await.1["status"], "failed");
    }
    heard("failure", 2.0).await;
    let held = tm.submit(&calls("slow", 600)).await;
    assert_eq!(
        step_wait_reason(&tm, held, Duration::from_secs(20)).await,
        "circuit breaker 'slow' open (2 failed attempts in a row)"
    );
    let other =
        "name: other\nsteps:\n  - {id: a, run: 'true', circuit_breaker: {key: other}}\n  - {id: b, run: 'true'}\n";
    assert_eq!(run(other.into()).await.1["status"], "succeeded", "another breaker's step and one without went");
    assert_eq!(tm.get_run(held).await.1["status"], "queued", "held, not failed");
    let cancelled = tm.auth(tm.http.post(format!("{}/v1/runs/{held}/cancel", tm.api))).send().await.unwrap();
    assert!(cancelled.status().is_success());
    assert_eq!(tm.wait_run(held, Duration::from_secs(30)).await["status"], "cancelled");

    // One failure leaves a breaker closed; two in a row open it. Past the cooldown one step
    // goes as a probe, and its success closes it. (Times here are lower bounds only.)
    let cooldown = chrono::Duration::seconds(6);
    assert_eq!(run(calls("partner", 6)).await.1["status"], "failed");
    // Listed closed, with the failure counted.
    eventually("partner listed closed", Duration::from_secs(10), || async {
        let listed = tm.get_json(format!("{}/v1/circuit-breakers", tm.api)).await;
        let partner = listed["items"].as_array().unwrap().iter().find(|b| b["key"] == "partner").cloned();
        Ok(partner.filter(|b| b["state"] == "closed" && b["failures"] == 1 && b["open_until"].is_null()))
    })
    .await
    .unwrap();
    let (second_id, second) = run(calls("partner", 6)).await;
    assert_eq!(second["status"], "failed");
    assert!(!held_by_breaker(second_id).await, "one failure did not open it");
    heard("failure", 4.0).await;
    // Open, its state is kept for the next leader (as `slow`'s is).
    let kept = |tm: &TestMesh| {
        let ns = tm.bus.namespace().clone();
        let bus = tm.bus.clone();
        async move {
            let subjects = bus.subject_counts(&ns.breakers_stream(), &ns.breakers_all()).await.unwrap();
            let mut subjects: Vec<String> = subjects.into_keys().collect();
            subjects.sort();
            subjects
        }
    };
    let ns = tm.bus.namespace();
    eventually("partner's state kept", Duration::from_secs(10), || async {
        Ok((kept(&tm).await == [ns.breaker("default", "partner"), ns.breaker("default", "slow")]).then_some(()))
    })
    .await
    .unwrap();
    // The tenant sees both open, with their failures and limits.
    let listed = tm.get_json(format!("{}/v1/circuit-breakers", tm.api)).await;
    let items = listed["items"].as_array().unwrap();
    let shown: Vec<_> = items
        .iter()
        .map(|b| {
            (
                b["key"].as_str().unwrap(),
                b["state"].as_str().unwrap(),
                b["failures"].as_u64().unwrap(),
                b["threshold"].as_u64().unwrap(),
                b["cooldown_seconds"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shown, [("partner", "open", 2, 2, 6), ("slow", "open", 2, 2, 600)], "{listed:#}");
    assert!(items.iter().all(|b| b["open_until"].is_string() && b["last_failure_at"].is_string()), "{listed:#}");
    let opened = call(&second, "finished_at");
    let held = tm.submit(&calls("partner", 6)).await;
    std::fs::write(&up, "").unwrap();
    let probed = tm.wait_run(held, Duration::from_secs(60)).await;
    assert_eq!(probed["status"], "succeeded", "{probed:#}");
    assert!(held_by_breaker(held).await, "it was held");
    let waited = call(&probed, "started_at") - opened;
    assert!(waited >= cooldown, "the probe went {} ms after it opened", waited.num_milliseconds());
    heard("success", 1.0).await;
    // The leader keeps what it must remember for the next one: the open breaker `slow`; the
    // closed `partner`'s state is forgotten, and `quiet` (never opened) was never kept.
    eventually("only the open breaker kept", Duration::from_secs(10), || async {
        Ok((kept(&tm).await == [ns.breaker("default", "slow")]).then_some(()))
    })
    .await
    .unwrap();
    let listed = tm.get_json(format!("{}/v1/circuit-breakers", tm.api)).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "the closed one is not listed: {listed:#}");
    let (closed_id, closed) = run(calls("partner", 6)).await;
    assert_eq!(closed["status"], "succeeded");
    assert!(!held_by_breaker(closed_id).await, "closed again: the next step did not wait");
    heard("success", 2.0).await;

    // A failed probe opens it again at once, without waiting for two failures.
    std::fs::remove_file(&up).unwrap();
    assert_eq!(run(calls("partner", 6)).await.1["status"], "failed");
    let (_, fourth) = run(calls("partner", 6)).await;
    assert_eq!(fourth["status"], "failed");
    heard("failure", 6.0).await;
    let (_, failed_probe) = run(calls("partner", 6)).await;
    assert_eq!(failed_probe["status"], "failed");
    let waited = call(&failed_probe, "started_at") - call(&fourth, "finished_at");
    assert!(waited >= cooldown, "it went as the probe, past the cooldown ({} ms)", waited.num_milliseconds());
    heard("failure", 7.0).await;
    let reopened = call(&failed_probe, "finished_at");
    let again = tm.submit(&calls("partner", 6)).await;
    std::fs::write(&up, "").unwrap();
    let last = tm.wait_run(again, Duration::from_secs(60)).await;
    assert_eq!(last["status"], "succeeded");
    assert!(call(&last, "started_at") - reopened >= cooldown, "it waited out another cooldown");
    let reasons = waiting_reasons(&tm, again).await;
    assert_eq!(reasons, ["circuit breaker 'partner' open (3 failed attempts in a row)"], "the failed probe counted");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_behind_an_opened_breaker_waits_out_its_cooldown() {
    let tm = spawn_mesh().await;
    let id = tm
        .submit(
            "name: retried\nsteps:\n  - id: call\n    run: 'exit 1'\n    retry: {max_attempts: 2, initial_delay_ms: 1000, max_delay_ms: 1000}\n    circuit_breaker: {key: flaky, failures: 1, cooldown_seconds: 4}\n",
        )
        .await;
    let run = tm.wait_run(id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let history = step(&run, "call")["attempt_history"].as_array().unwrap().clone();
    assert_eq!(history.len(), 2, "{run:#}");
    // Its own backoff is a second at most; the breaker its first failure opened holds it four.
    let waited = ts(&history[1], "started_at") - ts(&history[0], "finished_at");
    assert!(
        waited >= chrono::Duration::seconds(4),
        "the retry went {} ms after the failure",
        waited.num_milliseconds()
    );
    assert!(waiting_reasons(&tm, id).await.iter().any(|r| r.starts_with("circuit breaker 'flaky' open")));
    tm.finish().await;
}
