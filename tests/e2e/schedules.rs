//! Cron schedules: each tick fires exactly once, with two scheduler replicas and after the
//! scheduler was down (catch-up `all`); a deleted schedule fires no more; a changed one ticks by
//! its new spec; a run started by hand runs beside the ticks.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use taskmesh::mesh::Mesh;
use taskmesh_events::{Event, ScheduleTicked};
use taskmesh_scheduler::Scheduler;
use taskmesh_testkit::eventually;

use crate::helpers::*;

async fn create(tm: &TestMesh, spec: Value) -> reqwest::Response {
    tm.auth(tm.http.post(format!("{}/v1/schedules", tm.api))).json(&spec).send().await.unwrap()
}

fn every_second() -> Value {
    json!({
        "cron": "* * * * * *",
        "workflow": {"name": "tick", "steps": [{"id": "a", "uses": "noop"}]},
        "overlap": "allow",
        "catch_up": "all",
    })
}

/// The ticks recorded on the schedule's subject, and the runs they started.
async fn ticks(tm: &TestMesh, id: &str) -> (Vec<DateTime<Utc>>, Vec<uuid::Uuid>) {
    let subject = tm.bus.namespace().schedule("default", id.parse().unwrap());
    let mut ticks = Vec::new();
    let mut runs = Vec::new();
    for e in tm.bus.read_subject(&subject, 0).await.unwrap() {
        if let Event::ScheduleTicked(t) = e.envelope.event {
            ticks.push(t.tick);
            runs.extend(t.run_id);
        }
    }
    (ticks, runs)
}

/// Ticks must be one second apart with none twice and none skipped.
fn assert_consecutive(ticks: &[DateTime<Utc>]) {
    let distinct: BTreeSet<_> = ticks.iter().collect();
    assert_eq!(distinct.len(), ticks.len(), "no tick fired twice: {ticks:?}");
    for pair in ticks.windows(2) {
        assert_eq!((pair[1] - pair[0]).num_milliseconds(), 1000, "no tick skipped: {ticks:?}");
    }
}

async fn pause(tm: &TestMesh, id: &str) {
    let res = tm.auth(tm.http.post(format!("{}/v1/schedules/{id}/pause", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 202);
}

/// Every run a schedule started exists, once, triggered by its tick.
async fn assert_runs(tm: &TestMesh, runs: &[uuid::Uuid], ticks: &[DateTime<Utc>]) {
    assert_eq!(runs.len(), ticks.len());
    for (run, tick) in runs.iter().zip(ticks) {
        let view = tm.wait_run(*run, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "succeeded");
        assert_eq!(view["trigger"]["kind"], "schedule");
        assert_eq!(view["trigger"]["tick"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), *tick);
    }
    let scheduled: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE trigger->>'kind' = 'schedule'")
        .fetch_one(&tm.pool)
        .await
        .unwrap();
    assert_eq!(scheduled as usize, runs.len(), "no run started twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_tick_fires_once_with_two_scheduler_replicas() {
    let tm = spawn_mesh().await;
    let second = Scheduler::new(tm.bus.clone(), tm.env.settings.scheduler.clone(), tm.env.settings.limits.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let replica = tokio::spawn(second.run(stop.clone()));
    let res = create(&tm, every_second()).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    eventually("three ticks", Duration::from_secs(30), || async {
        Ok((ticks(&tm, &id).await.0.len() >= 3).then_some(()))
    })
    .await
    .unwrap();
    // A tick moves the schedule's version (the sequence of its last event), as any event does.
    let subject = tm.bus.namespace().schedule("default", id.parse().unwrap());
    let events = tm.bus.read_subject(&subject, 0).await.unwrap();
    let third_tick = events.iter().filter(|e| matches!(e.envelope.event, Event::ScheduleTicked(_))).nth(2).unwrap().seq;
    eventually("the read side's version at the third tick or later", Duration::from_secs(30), || async {
        let view: Value = tm.get_json(format!("{}/v1/schedules/{id}", tm.api)).await;
        Ok((view["version"].as_u64() >= Some(third_tick)).then_some(()))
    })
    .await
    .unwrap();
    pause(&tm, &id).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ticks, runs) = ticks(&tm, &id).await;
    assert!(ticks.len() >= 3, "{ticks:?}");
    assert_consecutive(&ticks);
    // Paused: nothing more fires.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(self::ticks(&tm, &id).await.0.len(), ticks.len(), "a paused schedule does not tick");
    tm.wait_projected().await;
    assert_runs(&tm, &runs, &ticks).await;
    let view: Value = tm.get_json(format!("{}/v1/schedules/{id}", tm.api)).await;
    assert_eq!(view["paused"], true);
    assert_eq!(view["ticks"], ticks.len());
    stop.cancel();
    replica.await.unwrap().unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ticks_missed_while_the_scheduler_was_down_are_caught_up_once() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway, Svc::Executor], |_| {}).await;
    let res = create(&tm, every_second()).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let created = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(ticks(&tm, &id).await.0.is_empty(), "nothing fires without a scheduler");
    let scheduler = Mesh::start(&tm.env.settings, tm.bus.clone(), None, &[Svc::Scheduler]).await.unwrap();
    eventually("the missed ticks and a live one", Duration::from_secs(30), || async {
        Ok((ticks(&tm, &id).await.0.len() >= 4).then_some(()))
    })
    .await
    .unwrap();
    pause(&tm, &id).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (ticks, runs) = ticks(&tm, &id).await;
    assert_consecutive(&ticks);
    assert!(ticks[0] <= created + chrono::Duration::seconds(1), "catch-up starts at the first missed tick: {ticks:?}");
    assert!(ticks.len() >= 4, "the missed ticks and the live ones: {ticks:?}");
    tm.wait_projected().await;
    assert_runs(&tm, &runs, &ticks).await;
    scheduler.stop().await.unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_catch_up_honours_the_overlap_policy_tick_by_tick() {
    // No executor: a run started stays queued, still running when the next tick comes.
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway], |_| {}).await;
    let mut ids = Vec::new();
    for overlap in ["skip", "cancel_previous"] {
        let mut spec = every_second();
        spec["overlap"] = json!(overlap);
        spec["catch_up_limit"] = json!(3);
        let res = create(&tm, spec).await;
        assert_eq!(res.status(), 201);
        ids.push(res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let scheduler = Mesh::start(&tm.env.settings, tm.bus.clone(), None, &[Svc::Scheduler]).await.unwrap();
    for id in &ids {
        eventually("the caught-up ticks", Duration::from_secs(30), || async {
            Ok((ticks(&tm, id).await.0.len() >= 3).then_some(()))
        })
        .await
        .unwrap();
        pause(&tm, id).await;
    }
    let status = |run: uuid::Uuid| {
        let tm = &tm;
        async move {
            tm.wait_projected().await;
            let (code, view) = tm.get_run(run).await;
            assert_eq!(code, 200, "{view}");
            view["status"].as_str().unwrap().to_string()
        }
    };
    // Skip: the first caught-up tick's run is running, so every tick after it is skipped.
    let (skip_ticks, skip_runs) = ticks(&tm, &ids[0]).await;
    assert!(skip_ticks.len() >= 3, "{skip_ticks:?}");
    assert_eq!(skip_runs.len(), 1, "one run while it runs: {skip_runs:?}");
    assert_eq!(status(skip_runs[0]).await, "queued");
    // Cancel previous: of the ticks caught up at once only the last starts a run (the others'
    // would be cancelled by it), and each tick after cancels the one before; the last is left.
    // (A timer late past its next tick supersedes that one too.)
    let subject = tm.bus.namespace().schedule("default", ids[1].parse().unwrap());
    let recorded: Vec<ScheduleTicked> = tm
        .events_on(&subject)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::ScheduleTicked(t) => Some(t),
            _ => None,
        })
        .collect();
    let superseded = |t: &ScheduleTicked| t.skipped.as_deref().is_some_and(|s| s.contains("superseded"));
    assert!(superseded(&recorded[0]) && superseded(&recorded[1]), "{recorded:?}");
    assert!(recorded[2].run_id.is_some(), "the last caught up runs: {recorded:?}");
    assert!(recorded.iter().all(|t| t.run_id.is_some() || superseded(t)), "{recorded:?}");
    let (_, cancel_runs) = ticks(&tm, &ids[1]).await;
    let (last, before) = cancel_runs.split_last().unwrap();
    // (The scheduler ends a run asked to cancel: it still runs.)
    for run in before {
        let view = tm.wait_run(*run, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "cancelled", "{view}");
    }
    assert_eq!(status(*last).await, "queued");
    scheduler.stop().await.unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_schedules_are_problems_naming_the_field() {
    let tm = spawn_mesh().await;
    for (spec, field) in [
        (json!({"cron": "61 * * * *", "workflow": {"name": "x", "steps": [{"id": "a", "uses": "noop"}]}}), "cron"),
        (json!({"cron": "* * * * *", "timezone": "Mars/Olympus", "workflow": "x"}), "timezone"),
    ] {
        let res = create(&tm, spec).await;
        assert_eq!(res.status(), 422);
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    // Each tick's run carries the workflow with its matrices expanded and the inputs: each fits
    // (about 300 and 250 KB; the spec about 250), both together would not fit an event.
    let n: Vec<u32> = (0..100).collect();
    let workflow = json!({
        "name": "big",
        "inputs": {"blob": {"type": "string"}},
        "steps": [{"id": "a", "name": "x".repeat(3_000), "matrix": {"n": n}, "uses": "noop"}],
    });
    let spec = |blob: usize| json!({"cron": "0 0 1 1 *", "workflow": workflow, "inputs": {"blob": "y".repeat(blob)}});
    let res = create(&tm, spec(250_000)).await;
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "workflow", "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("workflow and inputs"), "{problem}");
    assert_eq!(create(&tm, spec(10)).await.status(), 201, "each alone fits");
    assert_eq!(create(&tm, json!({"cron": "* * * * *", "workflow": "missing"})).await.status(), 404);
    assert_eq!(create(&tm, json!({"cron": "* * * * *", "workflow": "x", "bogus": 1})).await.status(), 400);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_schedule_ticks_no_more_and_is_gone_from_the_read_side() {
    let tm = spawn_mesh().await;
    let res = create(&tm, every_second()).await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("{}/v1/schedules/{id}", tm.api));
    let other = create(&tm, every_second()).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    pause(&tm, &other).await;
    eventually("a tick", Duration::from_secs(30), || async { Ok((!ticks(&tm, &id).await.0.is_empty()).then_some(())) })
        .await
        .unwrap();
    tm.wait_projected().await;
    assert_eq!(tm.get_json(&location).await["id"], id.as_str(), "the Location reads the schedule");
    let delete = |id: String| {
        let req = tm.auth(tm.http.delete(format!("{}/v1/schedules/{id}", tm.api)));
        async move { req.send().await.unwrap() }
    };
    // (written_seq checks each is a 204.)
    let deleted = TestMesh::written_seq(&delete(id.clone()).await);
    let again = TestMesh::written_seq(&delete(id.clone()).await);
    assert_eq!(again, deleted, "deleting twice is fine, and answers the deletion's seq");
    assert_eq!(delete(uuid::Uuid::now_v7().to_string()).await.status(), 404);
    assert_eq!(delete("not-a-uuid".into()).await.status(), 404);
    // Nothing ticks after the deletion, which is the subject's last event.
    let (before, runs) = ticks(&tm, &id).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (after, _) = ticks(&tm, &id).await;
    assert_eq!(after, before, "a deleted schedule does not tick");
    let subject = tm.bus.namespace().schedule("default", id.parse().unwrap());
    let events = tm.bus.read_subject(&subject, 0).await.unwrap();
    assert_eq!(events.iter().filter(|e| matches!(e.envelope.event, Event::ScheduleDeleted(_))).count(), 1);
    assert!(matches!(events.last().unwrap().envelope.event, Event::ScheduleDeleted(_)));
    // Gone from the read side; the other schedule and the runs it started stay.
    tm.wait_projected().await;
    let res = tm.auth(tm.http.get(&location)).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let list = tm.get_json(format!("{}/v1/schedules", tm.api)).await;
    let listed: Vec<&str> = list["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [other.as_str()]);
    for run in runs {
        assert_eq!(tm.get_run(run).await.0, 200, "a deleted schedule's runs are kept");
    }
    // A deleted schedule can be neither paused nor resumed.
    for action in ["pause", "resume"] {
        let res = tm.auth(tm.http.post(format!("{}/v1/schedules/{id}/{action}", tm.api))).send().await.unwrap();
        assert_eq!(res.status(), 404, "{action}");
    }
    tm.finish().await;
}

async fn patch(tm: &TestMesh, id: &str, body: Value) -> reqwest::Response {
    let req =
        tm.http.patch(format!("{}/v1/schedules/{id}", tm.api)).header("content-type", "application/merge-patch+json");
    tm.auth(req).body(body.to_string()).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_schedule_ticks_by_its_new_spec_and_keeps_its_id_ticks_and_inputs_not_named() {
    let tm = spawn_mesh().await;
    let mut spec = every_second();
    spec["workflow"] = json!({
        "name": "tick",
        "inputs": {"env": {"type": "string"}, "region": {"type": "string", "default": "us"}},
        "steps": [{"id": "a", "uses": "noop"}],
    });
    spec["inputs"] = json!({"env": "staging", "region": "eu"});
    let res = create(&tm, spec).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    eventually("a tick", Duration::from_secs(30), || async { Ok((!ticks(&tm, &id).await.0.is_empty()).then_some(())) })
        .await
        .unwrap();

    // Every third second from now on, another input; `region` is kept.
    let res = patch(&tm, &id, json!({"cron": "*/3 * * * * *", "inputs": {"env": "prod"}})).await;
    assert_eq!(res.status(), 200);
    let seq = res.json::<Value>().await.unwrap()["seq"].as_u64().unwrap();
    let subject = tm.bus.namespace().schedule("default", id.parse().unwrap());
    let update = tm.bus.read_subject(&subject, seq - 1).await.unwrap().into_iter().find(|e| e.seq == seq).unwrap();
    let Event::ScheduleUpdated(updated) = &update.envelope.event else { panic!("{:?}", update.envelope.event) };
    let (changed, next_tick) = (update.envelope.occurred_at, updated.next_tick.unwrap());
    assert_eq!(next_tick.timestamp() % 3, 0, "{next_tick}");
    let before = ticks(&tm, &id).await.0.len();
    eventually("two ticks of the new spec", Duration::from_secs(30), || async {
        Ok((ticks(&tm, &id).await.0.len() >= before + 2).then_some(()))
    })
    .await
    .unwrap();
    pause(&tm, &id).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (all, runs) = ticks(&tm, &id).await;
    // The old spec's ticks: one a second, up to the change; the new one's: every third second
    // from its first after the change. None between: the old spec's armed tick found nothing
    // due.
    let (old, new): (Vec<_>, Vec<_>) = all.iter().zip(&runs).partition(|(t, _)| **t < next_tick);
    let old_ticks: Vec<_> = old.iter().map(|(t, _)| **t).collect();
    assert_consecutive(&old_ticks);
    assert!(old_ticks.iter().all(|t| *t <= changed), "none between the change and the new first tick: {all:?}");
    assert!(new.len() >= 2, "{all:?}");
    assert_eq!(*new[0].0, next_tick, "{all:?} (changed {changed})");
    for (tick, run) in &new {
        assert_eq!(tick.timestamp() % 3, 0, "only the new spec's ticks after the change: {all:?} (changed {changed})");
        let view = tm.wait_run(**run, Duration::from_secs(30)).await;
        assert_eq!(view["inputs"], json!({"env": "prod", "region": "eu"}), "the patched inputs, merged: {view}");
    }
    for (_, run) in &old {
        assert_eq!(tm.wait_run(**run, Duration::from_secs(30)).await["inputs"]["env"], "staging");
    }
    // The read side: the same schedule, its ticks counted on, the new spec.
    tm.wait_projected().await;
    let view = tm.get_json_after(format!("{}/v1/schedules/{id}", tm.api), seq).await;
    assert_eq!(view["id"], id.as_str());
    assert_eq!(view["spec"]["cron"], "*/3 * * * * *", "{view}");
    assert_eq!(view["spec"]["inputs"], json!({"env": "prod", "region": "eu"}), "{view}");
    assert_eq!(view["ticks"], all.len(), "{view}");
    assert_eq!(view["paused"], true, "{view}");

    // Changed while paused, it stays paused; null puts a field back to its default and removes
    // an input.
    let res = patch(&tm, &id, json!({"cron": "* * * * * *", "overlap": null, "inputs": {"region": null}})).await;
    assert_eq!(res.status(), 200);
    let Some(Event::ScheduleUpdated(updated)) = tm.events_on(&subject).await.pop() else { panic!("an update last") };
    assert_eq!(updated.next_tick, None, "paused: no tick armed");
    assert_eq!(updated.spec.overlap, taskmesh_events::schedule::Overlap::Skip, "null: the default");
    assert_eq!(updated.spec.inputs.len(), 1, "{:?}", updated.spec.inputs);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ticks(&tm, &id).await.0.len(), all.len(), "a paused schedule changed stays paused");

    // A patch that changes nothing appends nothing and answers the last seq.
    let last = tm.bus.read_subject(&subject, 0).await.unwrap().last().unwrap().seq;
    let res = patch(&tm, &id, json!({"cron": "* * * * * *"})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["seq"], last);
    assert_eq!(tm.bus.read_subject(&subject, 0).await.unwrap().last().unwrap().seq, last);

    // Refusals change nothing.
    for (body, status, field) in [
        (json!({"cron": null}), 400, Some("cron")),
        (json!({"workflow": null}), 400, Some("workflow")),
        (json!({"cron": "61 * * * *"}), 422, Some("cron")),
        (json!({"timezone": "Mars/Olympus"}), 422, Some("timezone")),
        (json!({"catch_up_limit": 0}), 422, Some("catch_up_limit")),
        (json!({"inputs": {"colour": "blue"}}), 422, None),
        (json!({"bogus": 1}), 400, None),
        (json!({"overlap": "sometimes"}), 400, Some("overlap")),
        (json!([{"cron": "* * * * *"}]), 400, None),
        (json!({"workflow": "no-such-workflow"}), 404, None),
    ] {
        let res = patch(&tm, &id, body.clone()).await;
        assert_eq!(res.status(), status, "{body}");
        assert_eq!(res.headers()["content-type"], "application/problem+json", "{body}");
        let problem: Value = res.json().await.unwrap();
        if let Some(field) = field {
            assert_eq!(problem["errors"][0]["field"], field, "{body}: {problem}");
        }
    }
    assert_eq!(tm.bus.read_subject(&subject, 0).await.unwrap().last().unwrap().seq, last, "refusals append nothing");
    assert_eq!(patch(&tm, &uuid::Uuid::now_v7().to_string(), json!({"cron": "* * * * *"})).await.status(), 404);
    let res = tm.auth(tm.http.delete(format!("{}/v1/schedules/{id}", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(patch(&tm, &id, json!({"cron": "0 * * * *"})).await.status(), 404, "deleted");
    tm.finish().await;
}

/// A `PATCH` of schedule `id` conditional on `if_match`.
async fn patch_if(tm: &TestMesh, id: &str, if_match: &str, body: Value) -> reqwest::Response {
    let req = tm.http.patch(format!("{}/v1/schedules/{id}", tm.api)).header("if-match", if_match);
    tm.auth(req).header("content-type", "application/merge-patch+json").body(body.to_string()).send().await.unwrap()
}

/// Its `ETag` header.
fn etag(res: &reqwest::Response) -> String {
    res.headers()["etag"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patch_with_if_match_changes_a_schedule_only_at_the_version_it_names() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway], |_| {}).await;
    let yearly = json!({"cron": "0 0 1 1 *", "workflow": {"name": "y", "steps": [{"id": "a", "uses": "noop"}]}});
    let res = create(&tm, yearly).await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let (id, seq) = (created["id"].as_str().unwrap().to_string(), created["seq"].as_u64().unwrap());
    let url = format!("{}/v1/schedules/{id}", tm.api);

    // A read's strong ETag is the schedule's version: the sequence of its last event.
    let res = tm.auth(tm.http.get(&url)).header("Taskmesh-Min-Seq", seq.to_string()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let read = etag(&res);
    assert_eq!(read, format!("\"{seq}\""));
    assert_eq!(res.json::<Value>().await.unwrap()["version"], seq);
    let res = tm.auth(tm.http.get(&url)).header("if-none-match", &read).send().await.unwrap();
    assert_eq!(res.status(), 304, "not changed since");

    // Changed at that version: the answer's ETag is the new one.
    let res = patch_if(&tm, &id, &read, json!({"overlap": "allow"})).await;
    assert_eq!(res.status(), 200);
    let changed = etag(&res);
    let after: u64 = res.json::<Value>().await.unwrap()["seq"].as_u64().unwrap();
    assert_eq!(changed, format!("\"{after}\""));
    assert!(after > seq);

    // The version read before is stale now, and a weak tag never matches: refused, nothing
    // appended, whether or not the patch would change anything.
    let subject = tm.bus.namespace().schedule("default", id.parse().unwrap());
    for (if_match, body) in [
        (read.clone(), json!({"overlap": "cancel_previous"})),
        (read.clone(), json!({"overlap": "allow"})),
        (format!("W/{changed}"), json!({"overlap": "cancel_previous"})),
        ("\"not-a-version\"".to_string(), json!({"overlap": "cancel_previous"})),
    ] {
        let res = patch_if(&tm, &id, &if_match, body).await;
        assert_eq!(res.status(), 412, "{if_match}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["type"], "https://taskmesh.dev/problems/precondition-failed", "{problem}");
        assert!(problem["detail"].as_str().unwrap().contains(&format!("version {after}")), "{problem}");
    }
    assert_eq!(tm.bus.last_seq(&subject).await.unwrap(), after, "a refused patch appends nothing");
    // A list naming the current version among others, and `*`, match.
    let res = patch_if(&tm, &id, &format!("{read}, {changed}"), json!({"catch_up": "last"})).await;
    assert_eq!(res.status(), 200);
    let res = patch_if(&tm, &id, "*", json!({"catch_up": "all"})).await;
    assert_eq!(res.status(), 200);
    let before_pause = etag(&res);
    // Any event of the schedule moves its version, a pause too.
    let res = tm.auth(tm.http.post(format!("{url}/pause"))).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let last = format!("\"{}\"", res.json::<Value>().await.unwrap()["seq"]);
    assert_eq!(patch_if(&tm, &id, &before_pause, json!({"overlap": "skip"})).await.status(), 412);
    // The read side's version follows (after the change is projected); a schedule that does
    // not exist is a 404, not a 412.
    let last_seq: u64 = last.trim_matches('"').parse().unwrap();
    let res = tm.auth(tm.http.get(&url)).header("Taskmesh-Min-Seq", last_seq.to_string()).send().await.unwrap();
    assert_eq!(etag(&res), last);
    let view: Value = res.json().await.unwrap();
    assert_eq!(
        (view["spec"]["overlap"].as_str(), view["spec"]["catch_up"].as_str()),
        (Some("allow"), Some("all")),
        "{view}"
    );
    let res = patch_if(&tm, &uuid::Uuid::now_v7().to_string(), &last, json!({"overlap": "allow"})).await;
    assert_eq!(res.status(), 404);
    // A deletion takes If-Match too: at a stale version it is refused; at the current one it
    // is made; made already, it stays made (204) whatever it names.
    let delete_if = |if_match: &str| tm.auth(tm.http.delete(&url)).header("if-match", if_match).send();
    assert_eq!(delete_if(&changed).await.unwrap().status(), 412);
    assert_eq!(tm.bus.last_seq(&subject).await.unwrap(), last_seq, "a refused deletion appends nothing");
    assert_eq!(delete_if(&last).await.unwrap().status(), 204);
    assert_eq!(delete_if(&changed).await.unwrap().status(), 204, "deleted already");
    tm.finish().await;
}

async fn trigger(tm: &TestMesh, id: &str, key: Option<&str>) -> reqwest::Response {
    let mut req = tm.auth(tm.http.post(format!("{}/v1/schedules/{id}/trigger", tm.api)));
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_started_by_hand_runs_beside_the_ticks_once_per_key_and_the_overlap_policy_sees_it() {
    let tm = spawn_mesh().await;
    // Yearly for now (so no tick comes before the pause), skipping a tick while the last run
    // goes on.
    let spec = json!({
        "cron": "0 0 1 1 *",
        "workflow": {"name": "slow", "steps": [{"id": "a", "sleep": 60}]},
        "overlap": "skip",
    });
    let res = create(&tm, spec).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    pause(&tm, &id).await;

    // Paused or not, it runs now; a retry with the same key finds the same run.
    let res = trigger(&tm, &id, Some("by-hand-1")).await;
    assert_eq!(res.status(), 202);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    let first: Value = res.json().await.unwrap();
    let run: uuid::Uuid = first["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(location, format!("{}/v1/runs/{run}", tm.api));
    assert_eq!(first["duplicate"], false);
    let again: Value = trigger(&tm, &id, Some("by-hand-1")).await.json().await.unwrap();
    assert_eq!((again["id"].as_str(), again["duplicate"].as_bool()), (Some(run.to_string().as_str()), Some(true)));
    let subject = tm.bus.namespace().schedule("default", id.parse().unwrap());
    let recorded: Vec<_> = tm
        .events_on(&subject)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::ScheduleTriggered(t) => Some(t.run_id),
            _ => None,
        })
        .collect();
    assert_eq!(recorded, [run], "recorded once, as the schedule's last run");

    // Resumed, and made to tick every second, while that run sleeps: the ticks meanwhile are
    // skipped, as for a tick's run.
    let res = tm.auth(tm.http.post(format!("{}/v1/schedules/{id}/resume", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(patch(&tm, &id, json!({"cron": "* * * * * *"})).await.status(), 200);
    eventually("a tick", Duration::from_secs(30), || async {
        Ok(tm.events_on(&subject).await.into_iter().find_map(|e| match e {
            Event::ScheduleTicked(t) => Some(t),
            _ => None,
        }))
    })
    .await
    .map(|t| {
        assert_eq!(t.run_id, None, "{t:?}");
        assert_eq!(t.skipped.as_deref(), Some("the previous run is still running"), "{t:?}");
    })
    .unwrap();
    pause(&tm, &id).await;
    let res = tm.auth(tm.http.post(format!("{}/v1/runs/{run}/cancel", tm.api))).json(&json!({})).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let view = tm.wait_run(run, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    assert_eq!(view["trigger"]["kind"], "schedule");
    assert_eq!(view["trigger"]["schedule_id"], id.as_str());
    assert_eq!(view["trigger"]["manual"], true);
    tm.wait_projected().await;
    let schedule = tm.get_json(format!("{}/v1/schedules/{id}", tm.api)).await;
    assert_eq!(schedule["last_run_id"], run.to_string(), "{schedule}");

    // Without a key, each call is a run of its own; unknown and deleted schedules are 404s.
    let a: Value = trigger(&tm, &id, None).await.json().await.unwrap();
    let b: Value = trigger(&tm, &id, None).await.json().await.unwrap();
    assert_ne!(a["id"], b["id"]);
    for run in [&a["id"], &b["id"]] {
        let run = run.as_str().unwrap();
        tm.auth(tm.http.post(format!("{}/v1/runs/{run}/cancel", tm.api))).json(&json!({})).send().await.unwrap();
    }
    let res = trigger(&tm, &id, Some(&"k".repeat(202))).await;
    assert_eq!(res.status(), 400, "a key too long to scope");
    assert_eq!(trigger(&tm, &uuid::Uuid::now_v7().to_string(), None).await.status(), 404);
    assert_eq!(trigger(&tm, "not-a-uuid", None).await.status(), 404);
    let res = tm.auth(tm.http.delete(format!("{}/v1/schedules/{id}", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(trigger(&tm, &id, None).await.status(), 404, "deleted");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_runs_each_past_tick_once_and_finds_the_runs_its_ticks_started() {
    let tm = spawn_mesh().await;
    let res = create(&tm, every_second()).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    eventually("two ticks", Duration::from_secs(30), || async {
        Ok((ticks(&tm, &id).await.0.len() >= 2).then_some(()))
    })
    .await
    .unwrap();
    let backfill = |body: Value| {
        let req = tm.auth(tm.http.post(format!("{}/v1/schedules/{id}/backfill", tm.api))).json(&body);
        async move { req.send().await.unwrap() }
    };
    // Active, the schedule keeps the ticks its timers may still fire: the range ends before
    // the first after the last it handled.
    let first = ticks(&tm, &id).await.0[0];
    let res = backfill(json!({"from": first, "to": Utc::now()})).await;
    assert_eq!(res.status(), 202);
    let active: Value = res.json().await.unwrap();
    let until: DateTime<Utc> = active["until"].as_str().unwrap().parse().unwrap();
    let handled = ticks(&tm, &id).await.0;
    assert!(handled.contains(&until), "ends at a tick the schedule handled: {until} {handled:?}");
    for run in active["runs"].as_array().unwrap() {
        let tick: DateTime<Utc> = run["tick"].as_str().unwrap().parse().unwrap();
        assert!(tick <= until && handled.contains(&tick), "{active}");
        // Not even the last tick handled, whose run its timer may not have started yet: the
        // backfill finds each run, it starts none marked as by hand.
        assert_eq!(run["duplicate"], true, "{active}");
    }
    pause(&tm, &id).await;
    let (fired, fired_runs) = ticks(&tm, &id).await;
    // Each fired tick's run exists before the backfill looks (a tick is recorded first).
    for run in &fired_runs {
        tm.wait_run(*run, Duration::from_secs(30)).await;
    }
    // Three seconds before the first tick, up to the last: three ticks that had no run, and the
    // ones that fired, which are found.
    let (from, to) = (fired[0] - chrono::Duration::seconds(3), *fired.last().unwrap());
    let res = backfill(json!({"from": from, "to": to})).await;
    assert_eq!(res.status(), 202);
    let runs = res.json::<Value>().await.unwrap()["runs"].as_array().unwrap().clone();
    assert_eq!(runs.len(), fired.len() + 3, "{runs:?}");
    for (i, run) in runs.iter().enumerate() {
        let tick: DateTime<Utc> = run["tick"].as_str().unwrap().parse().unwrap();
        assert_eq!(tick, from + chrono::Duration::seconds(i as i64), "every tick, oldest first: {runs:?}");
        let run_id: uuid::Uuid = run["run_id"].as_str().unwrap().parse().unwrap();
        match fired.iter().position(|t| *t == tick) {
            Some(at) => {
                assert_eq!(run["duplicate"], true, "{run}");
                assert_eq!(run_id, fired_runs[at], "the tick's own run: {run}");
            }
            None => {
                assert_eq!(run["duplicate"], false, "{run}");
                let view = tm.wait_run(run_id, Duration::from_secs(30)).await;
                assert_eq!(view["status"], "succeeded", "{view}");
                assert_eq!(view["trigger"]["tick"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), tick);
                assert_eq!(view["trigger"]["manual"], true, "{view}");
            }
        }
    }
    // Again: every tick has its run.
    let again = backfill(json!({"from": from, "to": to})).await.json::<Value>().await.unwrap();
    let ids = |runs: &[Value]| runs.iter().map(|r| r["run_id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(again["runs"].as_array().unwrap()), ids(&runs));
    assert!(again["runs"].as_array().unwrap().iter().all(|r| r["duplicate"] == true), "{again}");
    tm.wait_projected().await;
    let scheduled: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE trigger->>'kind' = 'schedule'")
        .fetch_one(&tm.pool)
        .await
        .unwrap();
    assert_eq!(scheduled as usize, fired.len() + 3, "no tick run twice");

    // Refusals.
    let now = Utc::now();
    for (body, status) in [
        (json!({"from": to, "to": from}), 400),
        (json!({"from": now, "to": now + chrono::Duration::seconds(60)}), 400),
        (json!({"from": now - chrono::Duration::seconds(600), "to": now}), 400),
        (json!({"from": "1969-12-31T23:59:59Z", "to": to}), 400),
        (json!({"from": "-262144-01-01T00:00:00Z", "to": to}), 400),
        (json!({"from": from}), 400),
        (json!({"from": from, "to": to, "bogus": 1}), 400),
    ] {
        let res = backfill(body.clone()).await;
        assert_eq!(res.status(), status, "{body}");
        assert_eq!(res.headers()["content-type"], "application/problem+json", "{body}");
    }
    let res = tm
        .auth(tm.http.post(format!("{}/v1/schedules/{}/backfill", tm.api, uuid::Uuid::now_v7())))
        .json(&json!({"from": from, "to": to}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_previous_cancels_the_ticks_run_and_the_one_by_hand_alike() {
    let tm = spawn_mesh().await;
    let spec = json!({
        "cron": "* * * * * *",
        "workflow": {"name": "long", "steps": [{"id": "a", "sleep": 60}]},
        "overlap": "cancel_previous",
    });
    let res = create(&tm, spec).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let first =
        eventually("a tick's run", Duration::from_secs(30), || async { Ok(ticks(&tm, &id).await.1.first().copied()) })
            .await
            .unwrap();
    let by_hand: Value = trigger(&tm, &id, None).await.json().await.unwrap();
    let by_hand: uuid::Uuid = by_hand["id"].as_str().unwrap().parse().unwrap();
    // The next ticks cancel both, the one by hand beside the tick's.
    for run in [first, by_hand] {
        let view = tm.wait_run(run, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "cancelled", "{view}");
    }
    pause(&tm, &id).await;
    // The last tick's run is not left sleeping.
    if let Some(run) = ticks(&tm, &id).await.1.last() {
        tm.auth(tm.http.post(format!("{}/v1/runs/{run}/cancel", tm.api))).json(&json!({})).send().await.unwrap();
    }
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_refused_its_run_is_passed_over_and_the_schedule_goes_on() {
    let tm = spawn_mesh().await;
    let store = |inputs: Value| {
        let wf = json!({"name": "nightly", "inputs": inputs, "steps": [{"id": "a", "uses": "noop"}]});
        let req = tm.auth(tm.http.put(format!("{}/v1/workflows/nightly", tm.api))).json(&wf);
        async move { assert_eq!(req.send().await.unwrap().status(), 201) }
    };
    store(json!({})).await;
    let spec = json!({"cron": "* * * * * *", "workflow": "nightly", "overlap": "allow", "catch_up": "all"});
    let res = create(&tm, spec).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    eventually("a tick's run", Duration::from_secs(30), || async { Ok(ticks(&tm, &id).await.1.first().copied()) })
        .await
        .unwrap();
    // A new version wants an input the schedule does not give: its ticks' runs are refused.
    store(json!({"region": {"type": "string"}})).await;
    let changed = ticks(&tm, &id).await.0.len();
    eventually("three ticks after the change", Duration::from_secs(30), || async {
        Ok((ticks(&tm, &id).await.0.len() >= changed + 3).then_some(()))
    })
    .await
    .unwrap();
    pause(&tm, &id).await;
    let (all, runs) = ticks(&tm, &id).await;
    assert_consecutive(&all);
    // The last ticks' runs were refused: none of them exists.
    tm.wait_projected().await;
    let last = runs.last().unwrap();
    assert_eq!(tm.get_run(*last).await.0, 404, "the last tick's run was refused");
    // Each refused once, and counted: its timer acknowledged, not retried.
    let text = tm.metrics().await;
    let refused: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("taskmesh_schedule_runs_refused_total "))
        .unwrap_or_else(|| panic!("no refusals counted: {text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        // At most two more: a tick recorded before the change and submitted after it, and a
        // refusal whose record lost a race (to the pause) submitted and counted again.
        refused >= 3.0 && refused <= (all.len() - changed + 2) as f64,
        "{refused} of {} ticks",
        all.len() - changed
    );
    // Each refusal is on the log, once per tick, naming the tick's run: no later timer submits
    // it again, and the read side no longer names it as the last run.
    let subject = tm.bus.namespace().schedule("default", id.parse().unwrap());
    let refusals = || async {
        let mut refusals = Vec::new();
        for e in tm.events_on(&subject).await {
            if let Event::ScheduleRunRefused(r) = e {
                refusals.push((r.tick, r.run_id));
            }
        }
        refusals
    };
    let last = *all.last().unwrap();
    eventually("the last tick's refusal", Duration::from_secs(30), || async {
        Ok(refusals().await.iter().any(|(tick, _)| *tick == last).then_some(()))
    })
    .await
    .unwrap();
    let refusals = refusals().await;
    assert!(refusals.len() >= 3, "{refusals:?}");
    assert_eq!(
        refusals.iter().map(|r| r.0).collect::<BTreeSet<_>>().len(),
        refusals.len(),
        "once a tick: {refusals:?}"
    );
    // Every tick named its run (overlap: allow): a refusal names that tick's.
    assert_eq!(runs.len(), all.len());
    for (tick, run) in &refusals {
        let at = all.iter().position(|t| t == tick).unwrap_or_else(|| panic!("a tick handled: {tick}"));
        assert_eq!(runs[at], *run, "{tick}");
    }
    tm.wait_projected().await;
    let view = tm.get_json(format!("{}/v1/schedules/{id}", tm.api)).await;
    assert_eq!(view["last_run_id"], Value::Null, "the last tick's run was refused: {view}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_schedule_ticks_from_its_next_tick_and_a_backfill_runs_the_ones_before() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway, Svc::Executor], |_| {}).await;
    let res = create(&tm, every_second()).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let created = Utc::now();
    // Its first ticks come due while no scheduler runs; then it is paused and resumed, and only
    // then does a scheduler come, with the first tick's timer still to handle.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    pause(&tm, &id).await;
    let resumed = Utc::now();
    let res = tm.auth(tm.http.post(format!("{}/v1/schedules/{id}/resume", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let scheduler = Mesh::start(&tm.env.settings, tm.bus.clone(), None, &[Svc::Scheduler]).await.unwrap();
    eventually("two ticks", Duration::from_secs(30), || async {
        Ok((ticks(&tm, &id).await.0.len() >= 2).then_some(()))
    })
    .await
    .unwrap();
    // The timers tick from the resume on: the ticks before it (the pause's, and those missed
    // before the pause) are not caught up.
    let fired = ticks(&tm, &id).await.0;
    assert!(fired[0] > resumed, "{resumed}: {fired:?}");
    // Active, a backfill from the creation on runs the ticks before the resume, and finds the
    // timers' own runs after it: the two agree on where the timers' ticks start.
    let res = tm
        .auth(tm.http.post(format!("{}/v1/schedules/{id}/backfill", tm.api)))
        .json(&json!({"from": created, "to": Utc::now()}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let backfilled: Value = res.json().await.unwrap();
    pause(&tm, &id).await;
    let (fired, fired_runs) = ticks(&tm, &id).await;
    assert_consecutive(&fired);
    let runs = backfilled["runs"].as_array().unwrap();
    let mut all: Vec<DateTime<Utc>> = Vec::new();
    for run in runs {
        let tick: DateTime<Utc> = run["tick"].as_str().unwrap().parse().unwrap();
        let run_id: uuid::Uuid = run["run_id"].as_str().unwrap().parse().unwrap();
        match fired.iter().position(|t| *t == tick) {
            Some(at) => {
                assert_eq!((run["duplicate"].clone(), run_id), (json!(true), fired_runs[at]), "the timer's own: {run}")
            }
            None => {
                assert!(tick < fired[0], "only ticks before the timers' are run: {backfilled}");
                assert_eq!(run["duplicate"], false, "{run}");
                all.push(tick);
            }
        }
    }
    assert!(all.len() >= 2, "the ticks missed before the pause and during it: {backfilled}");
    assert!(all[0] <= created + chrono::Duration::seconds(1), "from the first: {backfilled}");
    // The backfill's and the timers' ticks, together, are every second from the first on.
    all.extend(fired.iter().copied());
    assert_consecutive(&all);
    scheduler.stop().await.unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_recorded_without_its_run_gets_it_though_later_ticks_are_due_and_a_backfill_submits_it_as_its_timer() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway, Svc::Executor], |_| {}).await;
    let mut spec = every_second();
    spec["workflow"] =
        json!({"name": "tick", "inputs": {"env": {"type": "string"}}, "steps": [{"id": "a", "uses": "noop"}]});
    spec["inputs"] = json!({"env": "first"});
    let res = create(&tm, spec).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let schedule_id: uuid::Uuid = id.parse().unwrap();
    let subject = tm.bus.namespace().schedule("default", schedule_id);
    let first = match &tm.events_on(&subject).await[0] {
        Event::ScheduleCreated(c) => c.first_tick.unwrap(),
        other => panic!("{other:?}"),
    };
    let second = first + chrono::Duration::seconds(1);
    let run_of = |tick| taskmesh_ingest::tick_run_id("default", schedule_id, tick);
    // A scheduler records a tick and is killed before submitting its run.
    let (bus, subject) = (&tm.bus, &subject);
    let record = |tick| {
        let ticked = taskmesh_events::ScheduleTicked {
            schedule_id,
            tick,
            run_id: Some(run_of(tick)),
            skipped: None,
            count: None,
        };
        let envelope =
            taskmesh_events::EventMeta::new("default").envelope(subject.clone(), Event::ScheduleTicked(ticked));
        async move { bus.append(bus.last_seq(subject).await.unwrap(), &envelope).await.unwrap() }
    };
    let exists = |run_id| async move {
        let key = taskmesh_events::RunKey { tenant: "default".into(), run_id };
        bus.last_seq(&bus.namespace().run(&key)).await.unwrap() > 0
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    record(first).await;
    // Paused, a backfill over it submits its run as its timer does: not marked as by hand, and
    // with the inputs its tick was decided with, not those of a change since.
    pause(&tm, &id).await;
    assert_eq!(patch(&tm, &id, json!({"inputs": {"env": "second"}})).await.status(), 200);
    let res = tm
        .auth(tm.http.post(format!("{}/v1/schedules/{id}/backfill", tm.api)))
        .json(&json!({"from": first, "to": first}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let backfilled: Value = res.json().await.unwrap();
    assert_eq!(
        backfilled["runs"],
        json!([{"tick": first, "run_id": run_of(first), "duplicate": false}]),
        "{backfilled}"
    );
    assert!(exists(run_of(first)).await);
    // The next tick recorded without its run; resumed, later ticks are due by the time a
    // scheduler comes: that tick gets its run before them.
    record(second).await;
    assert!(!exists(run_of(second)).await);
    assert_eq!(patch(&tm, &id, json!({"inputs": {"env": "later"}})).await.status(), 200);
    let res = tm.auth(tm.http.post(format!("{}/v1/schedules/{id}/resume", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let scheduler = Mesh::start(&tm.env.settings, tm.bus.clone(), None, &[Svc::Scheduler]).await.unwrap();
    for tick in [first, second] {
        let view = tm.wait_run(run_of(tick), Duration::from_secs(30)).await;
        assert_eq!(view["status"], "succeeded", "{view}");
        assert_eq!(view["trigger"]["tick"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), tick);
        assert!(view["trigger"].get("manual").is_none(), "the timer's run: {view}");
    }
    for (tick, env) in [(first, "first"), (second, "second")] {
        assert_eq!(tm.wait_run(run_of(tick), Duration::from_secs(30)).await["inputs"], json!({"env": env}));
    }
    eventually("later ticks", Duration::from_secs(30), || async {
        Ok((ticks(&tm, &id).await.0.len() >= 4).then_some(()))
    })
    .await
    .unwrap();
    pause(&tm, &id).await;
    let (ticks, runs) = ticks(&tm, &id).await;
    assert_eq!(ticks[..2], [first, second]);
    assert_consecutive(&ticks[2..]);
    tm.wait_projected().await;
    assert_runs(&tm, &runs, &ticks).await;
    assert_eq!(tm.wait_run(runs[2], Duration::from_secs(30)).await["inputs"], json!({"env": "later"}));
    scheduler.stop().await.unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_recorded_before_its_cancels_gets_them_from_the_next_timer_within_the_hour() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway, Svc::Executor], |_| {}).await;
    let spec = json!({
        "cron": "0 0 1 1 *",
        "workflow": {"name": "long", "steps": [{"id": "a", "sleep": 60}]},
        "overlap": "cancel_previous",
    });
    let res = create(&tm, spec).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let schedule_id: uuid::Uuid = id.parse().unwrap();
    // A run by hand, not ended (queued: no scheduler runs yet).
    let by_hand: Value = trigger(&tm, &id, None).await.json().await.unwrap();
    let by_hand: uuid::Uuid = by_hand["id"].as_str().unwrap().parse().unwrap();
    // A scheduler recorded this year's tick and was killed before asking to cancel the run by
    // hand and submitting the tick's run; the tick's timer comes again.
    let tick: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
    let run_id = taskmesh_ingest::tick_run_id("default", schedule_id, tick);
    let subject = tm.bus.namespace().schedule("default", schedule_id);
    let ticked =
        taskmesh_events::ScheduleTicked { schedule_id, tick, run_id: Some(run_id), skipped: None, count: None };
    let envelope = taskmesh_events::EventMeta::new("default").envelope(subject.clone(), Event::ScheduleTicked(ticked));
    tm.bus.append(tm.bus.last_seq(&subject).await.unwrap(), &envelope).await.unwrap();
    // Another schedule's tick, recorded two hours ago without its run: past the hour in which
    // a timer still submits a missing run (it may have aged out of the stream), its timer,
    // handled first, starts nothing.
    let stale = json!({"cron": "0 0 1 1 *", "workflow": {"name": "stale", "steps": [{"id": "a", "uses": "noop"}]}});
    let res = create(&tm, stale).await;
    assert_eq!(res.status(), 201);
    let stale_id: uuid::Uuid = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    let stale_run = taskmesh_ingest::tick_run_id("default", stale_id, tick);
    let stale_subject = tm.bus.namespace().schedule("default", stale_id);
    let ticked = taskmesh_events::ScheduleTicked {
        schedule_id: stale_id,
        tick,
        run_id: Some(stale_run),
        skipped: None,
        count: None,
    };
    let mut envelope =
        taskmesh_events::EventMeta::new("default").envelope(stale_subject.clone(), Event::ScheduleTicked(ticked));
    envelope.occurred_at = Utc::now() - chrono::Duration::hours(2);
    tm.bus.append(tm.bus.last_seq(&stale_subject).await.unwrap(), &envelope).await.unwrap();
    for (id, msg_id) in [(stale_id, "stale"), (schedule_id, "again")] {
        let kind = taskmesh_events::command::TimerKind::ScheduleTick { schedule_id: id, tick };
        let timer = taskmesh_events::command::Timer { tenant: "default".into(), due: tick, kind };
        tm.bus.enqueue(tm.bus.namespace().timer("default"), msg_id, &timer, None).await.unwrap();
    }
    let scheduler = Mesh::start(&tm.env.settings, tm.bus.clone(), None, &[Svc::Scheduler]).await.unwrap();
    // The run by hand is cancelled, and the tick's run started.
    let view = tm.wait_run(by_hand, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    let key = taskmesh_events::RunKey { tenant: "default".into(), run_id };
    eventually("the tick's run", Duration::from_secs(30), || async {
        Ok((tm.bus.last_seq(&tm.bus.namespace().run(&key)).await.unwrap() > 0).then_some(()))
    })
    .await
    .unwrap();
    let res =
        tm.auth(tm.http.post(format!("{}/v1/runs/{run_id}/cancel", tm.api))).json(&json!({})).send().await.unwrap();
    assert_eq!(res.status(), 202);
    let stale = taskmesh_events::RunKey { tenant: "default".into(), run_id: stale_run };
    assert_eq!(tm.bus.last_seq(&tm.bus.namespace().run(&stale)).await.unwrap(), 0, "a stale tick's run is not started");
    scheduler.stop().await.unwrap();
    tm.finish().await;
}
