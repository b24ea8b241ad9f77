//! Cron schedules: each tick fires exactly once, with two scheduler replicas and after the
//! scheduler was down (catch-up `all`); a deleted schedule fires no more.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use taskmesh::mesh::Mesh;
use taskmesh_events::Event;
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
