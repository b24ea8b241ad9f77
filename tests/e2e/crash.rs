//! Crash safety with real processes: an executor, a scheduler replica, a notifier, and a
//! scheduler with its notifier in one process killed with SIGKILL mid-work, an executor
//! drained with SIGTERM.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use taskmesh::mesh::Mesh;
use taskmesh_events::Event;
use taskmesh_testkit::eventually;

use crate::admission::step_wait_reason;
use crate::helpers::*;

/// Starts `taskmesh serve executor` as a child process on the test's namespace.
fn spawn_executor(tm: &TestMesh, id: &str) -> tokio::process::Child {
    spawn_executor_with(tm, id, &[])
}

/// [`spawn_executor`] with more environment variables.
fn spawn_executor_with(tm: &TestMesh, id: &str, env: &[(&str, &str)]) -> tokio::process::Child {
    let mut cmd = tm.serve_command("executor");
    cmd.env("TASKMESH_EXECUTOR__LEASE_SECS", tm.env.settings.executor.lease_secs.to_string())
        .env("TASKMESH_EXECUTOR__SLOTS", "1")
        .env("TASKMESH_EXECUTOR__ID", id)
        .envs(env.iter().copied());
    cmd.spawn().expect("spawning the executor")
}

/// Once run `id`'s first step runs, sends the `executor` child SIGTERM and waits for its clean
/// exit.
async fn sigterm_once_running(tm: &TestMesh, executor: &mut tokio::process::Child, id: uuid::Uuid) {
    eventually("the step to start", Duration::from_secs(30), || async {
        let (status, run) = tm.get_run(id).await;
        Ok((status == 200 && run["steps"][0]["status"] == "running").then_some(()))
    })
    .await
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(executor.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status =
        tokio::time::timeout(Duration::from_secs(20), executor.wait()).await.expect("exits after draining").unwrap();
    assert!(status.success(), "a clean exit: {status:?}");
}

/// Subscribes a webhook endpoint that answers each delivery after `delay`, keeping the
/// webhook-id of each it answered (a request cut off by a kill is not answered, so not kept).
async fn told_endpoint(tm: &TestMesh, delay: Duration) -> Arc<Mutex<Vec<String>>> {
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    let store = answered.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let store = store.clone();
        async move {
            tokio::time::sleep(delay).await;
            let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            store.lock().unwrap().push(id);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    crate::integrations::subscribe_url(tm, &url).await;
    tm.wait_projected().await;
    answered
}

/// Waits until each of the runs `ids` has ended and its end has been told to the endpoint that
/// keeps `answered` (each at least once, and nothing else).
async fn wait_every_end_told(tm: &TestMesh, ids: &[uuid::Uuid], answered: &Mutex<Vec<String>>) {
    let mut want = std::collections::BTreeSet::new();
    for id in ids {
        tm.wait_run(*id, Duration::from_secs(60)).await;
        let events = tm.run_events(*id).await;
        let end = events.iter().rev().find(|e| e.event.is_run_terminal()).expect("the run's end");
        want.insert(end.id.to_string());
    }
    eventually("every run's end told", Duration::from_secs(60), || async {
        let told: std::collections::BTreeSet<String> = answered.lock().unwrap().iter().cloned().collect();
        Ok((told == want).then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_executor_loses_its_lease_and_the_step_finishes_once_on_another() {
    // Everything but the executor in this process; the first executor is a child process.
    // A 4 s lease (the kit's is 2 s): a survivor stalled by a loaded machine keeps its lease,
    // so the step is not handed out a third time. The doomed child gets the same lease.
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Projector, Svc::Gateway, Svc::Notification], |s| {
        s.executor.lease_secs = 4
    })
    .await;
    let mut doomed = spawn_executor(&tm, "doomed");
    let id = tm.submit("name: crash\nsteps:\n  - {id: slow, run: 'sleep 3; echo finished'}\n  - {id: after, needs: [slow], run: 'echo after'}\n").await;
    eventually("the step to start on the doomed executor", Duration::from_secs(30), || async {
        let (_, run) = tm.get_run(id).await;
        Ok((run["steps"][0]["status"] == "running").then_some(()))
    })
    .await
    .unwrap();
    doomed.start_kill().unwrap();
    let status = doomed.wait().await.unwrap();
    assert!(!status.success(), "killed: {status:?}");

    // A survivor joins; the dispatch is redelivered to it once the lease (4 s) expires.
    let survivor = Mesh::start(&tm.env.settings, tm.bus.clone(), None, &[Svc::Executor]).await.unwrap();
    let run = tm.wait_run(id, Duration::from_secs(40)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let slow = step(&run, "slow");
    assert_eq!(slow["attempts"], 2, "{run:#}");
    assert_eq!(slow["output"], "finished\n");
    let history = slow["attempt_history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0]["executor"], "doomed");
    assert_eq!(history[0]["status"], "lost");
    assert_eq!(history[1]["status"], "succeeded");
    assert_ne!(history[1]["executor"], "doomed");
    let events = tm.run_events(id).await;
    let finished = events.iter().filter(|e| matches!(&e.event, Event::StepSucceeded(s) if s.step == "slow")).count();
    assert_eq!(finished, 1, "the step finished exactly once");
    assert_eq!(events.iter().filter(|e| e.type_name() == "RunSucceeded").count(), 1);
    survivor.stop().await.unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_scheduler_replica_loses_no_run_repeats_no_step_and_skips_no_tick() {
    // One scheduler replica in this process, one as a child process that gets SIGKILLed.
    let tm = spawn_with(&Svc::ALL, |s| s.executor.slots = 16).await;
    // Every run's end reaches a webhook endpoint: the replicas announce ends to the notifier
    // as they consume them, and the killed one's unacked events are announced by the other.
    let (seen, _) = crate::integrations::subscribe(&tm).await;
    tm.wait_projected().await;
    let mut doomed = tm.serve_command("scheduler").spawn().unwrap();
    let schedule: serde_json::Value = tm
        .auth(tm.http.post(format!("{}/v1/schedules", tm.api)))
        .json(&serde_json::json!({
            "cron": "* * * * * *",
            "workflow": {"name": "tick", "steps": [{"id": "a", "uses": "noop"}]},
            "overlap": "allow",
            "catch_up": "all"
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schedule_id: uuid::Uuid = schedule["id"].as_str().unwrap().parse().unwrap();
    let yaml = "name: busy\nsteps:\n  - {id: a, run: 'sleep 0.05'}\n  - {id: b, needs: [a], uses: noop}\n  - {id: c, needs: [a], run: 'true'}\n  - {id: d, needs: [b, c], uses: noop}\n";
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(tm.submit(yaml).await);
        if i == 100 {
            doomed.start_kill().unwrap();
        }
    }
    let status = doomed.wait().await.unwrap();
    assert!(!status.success(), "the replica was killed: {status:?}");
    for id in &ids {
        let run = tm.wait_run(*id, Duration::from_secs(120)).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
    }
    for id in &ids {
        let mut per_step = std::collections::HashMap::<String, (usize, usize)>::new();
        for e in tm.run_events(*id).await {
            match &e.event {
                Event::StepStarted(s) => per_step.entry(s.step.clone()).or_default().0 += 1,
                Event::StepSucceeded(s) => per_step.entry(s.step.clone()).or_default().1 += 1,
                _ => {}
            }
        }
        assert_eq!(per_step.len(), 4);
        assert!(per_step.values().all(|&(started, done)| started == 1 && done == 1), "run {id}: {per_step:?}");
    }
    let want: std::collections::BTreeSet<String> = ids.iter().map(|id| id.to_string()).collect();
    eventually("every run's end to be notified", Duration::from_secs(60), || async {
        let notified: std::collections::BTreeSet<String> = seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, body)| serde_json::from_slice::<serde_json::Value>(body).ok())
            .filter(|p| p["type"] == "run.succeeded")
            .filter_map(|p| p["data"]["run_id"].as_str().map(String::from))
            .collect();
        Ok(want.is_subset(&notified).then_some(()))
    })
    .await
    .unwrap();
    let res = tm.auth(tm.http.post(format!("{}/v1/schedules/{schedule_id}/pause", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let subject = tm.bus.namespace().schedule("default", schedule_id);
    let ticks: Vec<_> = tm
        .events_on(&subject)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::ScheduleTicked(t) => Some(t.tick),
            _ => None,
        })
        .collect();
    assert!(ticks.len() >= 2, "{ticks:?}");
    for pair in ticks.windows(2) {
        assert_eq!((pair[1] - pair[0]).num_milliseconds(), 1000, "every tick once, none skipped: {ticks:?}");
    }
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_running_step_finish_and_takes_no_new_one() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Projector, Svc::Gateway], |_| {}).await;
    let mut draining = spawn_executor(&tm, "draining");
    let id = tm.submit("name: drain\nsteps:\n  - {id: slow, run: 'sleep 3; echo finished'}\n  - {id: next, needs: [slow], run: 'true'}\n").await;
    sigterm_once_running(&tm, &mut draining, id).await;
    // The scheduler acknowledged the report before the executor exited, so the outcome is in
    // the log; the projection follows it shortly.
    let run = eventually("the finished step to be projected", Duration::from_secs(20), || async {
        let (_, run) = tm.get_run(id).await;
        Ok((step(&run, "slow")["status"] != "running").then_some(run))
    })
    .await
    .unwrap();
    let slow = step(&run, "slow");
    assert_eq!(slow["status"], "succeeded", "the running step finished and was recorded: {run:#}");
    assert_eq!(slow["output"], "finished\n");
    assert_eq!(slow["attempts"], 1);
    assert_eq!(step(&run, "next")["status"], "queued", "no new step started on the draining executor");
    // Another executor picks up what is left.
    let other = Mesh::start(&tm.env.settings, tm.bus.clone(), None, &[Svc::Executor]).await.unwrap();
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
    assert_ne!(step(&run, "next")["attempt_history"][0]["executor"], "draining");
    other.stop().await.unwrap();
    tm.finish().await;
}

/// A step still running when a drain runs out of time is handed back: another executor runs it
/// again, and the attempt given back is not counted among those lost (one lost attempt fails
/// the step here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_handed_back_by_a_drain_runs_again_without_counting_as_lost() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Projector, Svc::Gateway], |s| {
        s.scheduler.max_lost_attempts = 1;
    })
    .await;
    let mut draining = spawn_executor_with(&tm, "draining", &[("TASKMESH_EXECUTOR__DRAIN_TIMEOUT_SECS", "1")]);
    let id = tm.submit("name: long\nsteps:\n  - {id: long, run: 'sleep 4; echo finished'}\n").await;
    sigterm_once_running(&tm, &mut draining, id).await;
    let other = Mesh::start(&tm.env.settings, tm.bus.clone(), None, &[Svc::Executor]).await.unwrap();
    let run = tm.wait_run(id, Duration::from_secs(60)).await;
    let long = step(&run, "long");
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(long["output"], "finished\n");
    let history = long["attempt_history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{run:#}");
    assert_eq!((&history[0]["executor"], &history[0]["status"]), (&json!("draining"), &json!("lost")));
    assert!(history[0]["error"].as_str().unwrap().contains("gave it back"), "{run:#}");
    assert_eq!(history[1]["status"], "succeeded");
    other.stop().await.unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_notifier_leaves_its_deliveries_to_another_and_every_run_end_is_told() {
    use secrecy::ExposeSecret;
    // Everything but the notifier in this process; the first notifier is a child process.
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Executor, Svc::Projector, Svc::Gateway], |s| {
        s.notification.timeout_ms = 1_000
    })
    .await;
    // The endpoint takes half a second over each delivery.
    let answered = told_endpoint(&tm, Duration::from_millis(500)).await;

    let mut doomed = tm.serve_command("notification");
    doomed
        .env("TASKMESH_POSTGRES__URL", tm.env.settings.postgres.url.expose_secret())
        .env("TASKMESH_SECRETS__KEY", tm.env.settings.secrets.key.as_ref().unwrap().expose_secret())
        .env("TASKMESH_NOTIFICATION__TIMEOUT_MS", "1000");
    let mut doomed = doomed.spawn().unwrap();
    let mut ids = Vec::new();
    for _ in 0..16 {
        ids.push(tm.submit("name: told\nsteps:\n  - {id: a, uses: noop}\n").await);
    }
    // Killed with four of its deliveries under way (four at a time per tenant).
    eventually("the doomed notifier's first deliveries", Duration::from_secs(30), || async {
        Ok((answered.lock().unwrap().len() >= 4).then_some(()))
    })
    .await
    .unwrap();
    doomed.start_kill().unwrap();
    let status = doomed.wait().await.unwrap();
    assert!(!status.success(), "killed: {status:?}");
    let before = answered.lock().unwrap().len();
    assert!(before < 16, "killed with deliveries left ({before} of 16 answered)");

    // Another notifier delivers the rest, and those the killed one held once their ack
    // deadline (twelve seconds) passes.
    let survivor =
        Mesh::start(&tm.env.settings, tm.bus.clone(), Some(tm.pool.clone()), &[Svc::Notification]).await.unwrap();
    wait_every_end_told(&tm, &ids, &answered).await;
    // At least once: one the kill cut off after its answer and before its ack is told again;
    // no more than the four that were under way.
    let total = answered.lock().unwrap().len();
    assert!(total <= 16 + 4, "{total} answers for 16 runs");
    survivor.stop().await.unwrap();
    tm.finish().await;
}

/// A scheduler and a notifier in one process, where runs' ends go from one to the other
/// without a queue, killed with SIGKILL while runs end: every run's end is still told, once
/// the next such process has started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_scheduler_with_its_notifier_in_one_process_loses_no_run_end() {
    use secrecy::ExposeSecret;
    const RUNS: usize = 120;
    // The scheduler and the notifier are a child process, both in it.
    let tm = spawn_with(&[Svc::Ingest, Svc::Executor, Svc::Projector, Svc::Gateway], |_| {}).await;
    let answered = told_endpoint(&tm, Duration::ZERO).await;
    let both = || {
        let mut cmd = tm.serve_command("scheduler");
        cmd.arg("notification")
            .env("TASKMESH_SCHEDULER__LEADER_TTL_MS", "1500")
            .env("TASKMESH_POSTGRES__URL", tm.env.settings.postgres.url.expose_secret())
            .env("TASKMESH_SECRETS__KEY", tm.env.settings.secrets.key.as_ref().unwrap().expose_secret());
        cmd.spawn().unwrap()
    };
    let mut doomed = both();

    // Runs are submitted throughout; the process is killed once a few of their ends are told.
    let submitting = async {
        let mut ids = Vec::new();
        for _ in 0..RUNS {
            ids.push(tm.submit("name: told\nsteps:\n  - {id: a, uses: noop}\n").await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ids
    };
    let killing = async {
        eventually("the doomed process's first runs' ends told", Duration::from_secs(30), || async {
            Ok((answered.lock().unwrap().len() >= RUNS / 4).then_some(()))
        })
        .await
        .unwrap();
        doomed.start_kill().unwrap();
        doomed.wait().await.unwrap()
    };
    let (ids, killed) = tokio::join!(submitting, killing);
    assert!(!killed.success(), "killed: {killed:?}");
    let before = answered.lock().unwrap().len();
    assert!(before < RUNS, "killed with runs' ends left to tell ({before} of {RUNS} told)");

    // The next process finishes the runs and tells every end.
    let mut next = both();
    wait_every_end_told(&tm, &ids, &answered).await;
    // At least once, and again only for the deliveries under way at the kill (four at a time
    // per tenant): an end handed over again after the kill is deduplicated.
    let total = answered.lock().unwrap().len();
    assert!(total <= RUNS + 4, "{total} answers for {RUNS} runs");
    // Most ends went straight from the scheduler to the notifier: the queue saw few, if any.
    let queued = tm.stream_state(&tm.bus.namespace().ended_stream()).await.last_sequence;
    assert!(queued < RUNS as u64 / 2, "{queued} of {RUNS} runs' ends went through the queue");
    next.start_kill().unwrap();
    next.wait().await.unwrap();
    tm.finish().await;
}

/// A circuit breaker open at a dispatcher leader killed with SIGKILL is still open at the next
/// one: the held step stays held, and a new step behind it is held with the failures counted
/// before, while other work goes on through the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_circuit_breaker_outlives_its_dispatcher_leader() {
    // No scheduler in this process: each leader is a child process, the first one killed.
    let services = [Svc::Ingest, Svc::Projector, Svc::Gateway, Svc::Executor, Svc::Notification];
    let tm = spawn_with(&services, |_| {}).await;
    let scheduler = || tm.serve_command("scheduler").env("TASKMESH_SCHEDULER__LEADER_TTL_MS", "1500").spawn().unwrap();
    let mut first = scheduler();
    let calls = "name: calls\nsteps:\n  - {id: call, run: 'exit 1', circuit_breaker: {key: down, failures: 2, cooldown_seconds: 600}}\n";
    for _ in 0..2 {
        let id = tm.submit(calls).await;
        assert_eq!(tm.wait_run(id, Duration::from_secs(60)).await["status"], "failed");
    }
    let open = "circuit breaker 'down' open (2 failed attempts in a row)";
    let held = tm.submit(calls).await;
    assert_eq!(step_wait_reason(&tm, held, Duration::from_secs(30)).await, open);
    // Its state is written in the background: killed once it is kept.
    let ns = tm.bus.namespace();
    eventually("the open breaker's state kept", Duration::from_secs(10), || async {
        let kept = tm.bus.subject_counts(&ns.breakers_stream(), &ns.breakers_all()).await?;
        Ok(kept.contains_key(&ns.breaker("default", "down")).then_some(()))
    })
    .await
    .unwrap();
    first.start_kill().unwrap();
    first.wait().await.unwrap();

    // The next leader admits other work, and holds the breaker's steps as the first did.
    let mut second = scheduler();
    let other = tm.submit("name: other\nsteps:\n  - {id: a, run: 'true'}\n").await;
    assert_eq!(tm.wait_run(other, Duration::from_secs(60)).await["status"], "succeeded");
    let later = tm.submit(calls).await;
    assert_eq!(
        step_wait_reason(&tm, later, Duration::from_secs(30)).await,
        open,
        "the failures counted before are the new leader's"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in [held, later] {
        let (_, run) = tm.get_run(id).await;
        assert_eq!(run["steps"][0]["status"], "queued", "still held: {run:#}");
    }
    second.start_kill().unwrap();
    second.wait().await.unwrap();
    tm.finish().await;
}
