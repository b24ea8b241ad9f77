//! Retention of the event log: a sweep removes what is old and no longer in force (ended
//! runs, deleted secrets, a secret's old values, old audit records, a schedule's old ticks)
//! and leaves what still is (a tenant's secrets and keys, a schedule, a running run); a
//! rebuild of the read side from the log swept leaves the removed out.

use std::time::Duration;

use serde_json::json;
use taskmesh_events::schedule::ScheduleState;
use taskmesh_events::{Event, EventMeta, RunCancelRequested, RunKey, RunsSwept, SweptRun};
use taskmesh_scheduler::retention::{sweep, sweep_in_rounds};
use taskmesh_testkit::eventually;

use crate::helpers::*;

async fn put_secret(tm: &TestMesh, name: &str, value: &str) {
    let res = tm.send_json(reqwest::Method::PUT, &format!("/v1/secrets/{name}"), &json!({"value": value})).await;
    assert!(res.status().is_success(), "{}", res.status());
}

/// Messages on `subject` of the event log.
async fn count(tm: &TestMesh, subject: &str) -> usize {
    tm.bus.read_subject(subject, 0).await.unwrap().len()
}

async fn schedule_state(tm: &TestMesh, subject: &str) -> ScheduleState {
    let events = tm.bus.read_subject(subject, 0).await.unwrap();
    ScheduleState::fold(None, events.iter().map(|s| (s.seq, &s.envelope))).expect("the schedule is still there")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_removes_what_is_old_and_done_and_keeps_what_is_in_force() {
    // Its scheduler's own sweep comes a minute after it starts: past this test's end.
    let mut tm = spawn_with(&Svc::ALL, |s| s.nats.events_max_age_days = 30).await;
    let ns = tm.bus.namespace().clone();
    // The stream keeps no age limit of its own (it would remove what is in force too).
    let stream = tm.bus.jetstream().get_stream(ns.events_stream()).await.unwrap();
    assert_eq!(stream.cached_info().config.max_age, Duration::ZERO);
    put_secret(&tm, "KEPT", "kept-value-0").await;
    put_secret(&tm, "KEPT", "kept-value-1").await;
    put_secret(&tm, "GONE", "gone-value-1").await;
    let res = tm.auth(tm.http.delete(format!("{}/v1/secrets/GONE", tm.api))).send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());

    // A schedule ticking every second, paused after a few ticks.
    let res = tm
        .send_json(
            reqwest::Method::POST,
            "/v1/schedules",
            &json!({
                "cron": "* * * * * *",
                "workflow": {"name": "tick", "steps": [{"id": "a", "uses": "noop"}]},
                "overlap": "allow",
            }),
        )
        .await;
    assert_eq!(res.status(), 201);
    let schedule: uuid::Uuid = res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    let schedule_subject = ns.schedule("default", schedule);
    let ticked = |events: Vec<taskmesh_bus::Stored>| {
        events.iter().filter(|s| matches!(s.envelope.event, Event::ScheduleTicked(_))).count()
    };
    eventually("five ticks", Duration::from_secs(30), || async {
        Ok((ticked(tm.bus.read_subject(&schedule_subject, 0).await?) >= 5).then_some(()))
    })
    .await
    .unwrap();
    let res = tm.auth(tm.http.post(format!("{}/v1/schedules/{schedule}/pause", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 202);
    // The timer armed for the next tick fires (and finds it paused) before anything is swept:
    // one firing after the sweep would find its last tick's run gone within the hour in which a
    // missing run is submitted again (past it, as with any real limit of a day or more, not).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let done = tm.submit("name: done\nsteps:\n  - {id: a, uses: noop}\n").await;
    tm.wait_run(done, Duration::from_secs(30)).await;
    // Running while the sweep runs; its second step needs the secret afterwards.
    let running = tm
        .submit("name: running\nsteps:\n  - {id: a, run: 'sleep 8'}\n  - {id: b, needs: [a], secrets: [KEPT], run: '[ \"$KEPT\" = kept-value-1 ]'}\n")
        .await;
    let running_subject = ns.run(&RunKey { tenant: "default".into(), run_id: running });
    eventually("the long step to start", Duration::from_secs(30), || async {
        let events = tm.run_events(running).await;
        Ok(events.iter().any(|e| matches!(e.event, Event::StepStarted(_))).then_some(()))
    })
    .await
    .unwrap();
    tm.wait_projected().await;
    let audit = ns.audit("default");
    let audit_before = count(&tm, &audit).await;
    assert!(audit_before >= 2, "writes are audited: {audit_before}");
    let newest_audit = tm.bus.last_seq(&audit).await.unwrap() as i64;
    let old_audit_rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_log WHERE tenant_id = 'default' AND seq < $1")
            .bind(newest_audit)
            .fetch_one(&tm.pool)
            .await
            .unwrap()
    };
    assert!(old_audit_rows().await > 0, "the read side has the older records");
    let schedule_before = schedule_state(&tm, &schedule_subject).await;
    let ticks_before: i64 = sqlx::query_scalar("SELECT ticks FROM schedules WHERE id = $1")
        .bind(schedule)
        .fetch_one(&tm.pool)
        .await
        .unwrap();
    assert_eq!(ticks_before as u64, schedule_before.ticks, "the read side counts as the fold does");
    assert!(ticks_before >= 5, "{ticks_before}");
    let running_before = count(&tm, &running_subject).await;
    let tenant_before = count(&tm, &ns.tenant("default")).await;
    let keys_before = tm.bus.subject_counts(&ns.events_stream(), &ns.api_keys_of("default")).await.unwrap();

    // Everything so far is past the limit.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let swept = sweep(&tm.bus, chrono::Utc::now()).await.unwrap();
    assert!(swept.runs >= 5 && swept.deleted == 1 && swept.records >= 3, "{swept:?}");
    // The read side drops the removed runs' rows as the sweep records them (`RunsSwept`), not
    // only at a rebuild.
    eventually("the swept run gone from the read side", Duration::from_secs(10), || async {
        Ok((tm.get_run(done).await.0 == 404).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(tm.get_run(running).await.0, 200);
    // A record naming a run's id with an earlier sequence than its rows have (a run of the
    // same id submitted since it was removed) leaves them.
    let stale = RunsSwept { runs: vec![SweptRun { run_id: running, last_seq: 1 }] };
    let stale = EventMeta::new("default").envelope(ns.runs_swept("default"), Event::RunsSwept(stale));
    tm.bus.append_with_id(None, &stale, "stale-sweep-record").await.unwrap();
    tm.wait_projected().await;
    assert_eq!(tm.get_run(running).await.0, 200, "a later run of the same id keeps its rows");

    // Done and deleted: gone.
    assert!(tm.run_events(done).await.is_empty(), "an ended run's events are removed");
    assert_eq!(count(&tm, &ns.secret("default", "GONE")).await, 0, "a deleted secret's are too");
    assert_eq!(count(&tm, &audit).await, 1, "old audit records: all but the newest");
    // The read side drops their rows as the sweep records them (`AuditSwept`).
    eventually("the old audit rows gone from the read side", Duration::from_secs(10), || async {
        Ok((old_audit_rows().await == 0).then_some(()))
    })
    .await
    .unwrap();
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE tenant_id = 'default' AND seq >= $1")
        .bind(newest_audit)
        .fetch_one(&tm.pool)
        .await
        .unwrap();
    assert!(kept >= 1, "the newest record's rows stay");
    // In force: kept as they were.
    assert_eq!(count(&tm, &running_subject).await, running_before, "a running run's events stay");
    // A secret: its value in force only.
    assert_eq!(count(&tm, &ns.secret("default", "KEPT")).await, 1);
    assert!(matches!(
        tm.bus.last(&ns.secret("default", "KEPT")).await.unwrap().map(|s| s.envelope.event),
        Some(Event::SecretSet(_))
    ));
    assert_eq!(count(&tm, &ns.tenant("default")).await, tenant_before);
    assert_eq!(tm.bus.subject_counts(&ns.events_stream(), &ns.api_keys_of("default")).await.unwrap(), keys_before);
    // The schedule: its creation and last two ticks, folding to the state it had.
    let events = tm.bus.read_subject(&schedule_subject, 0).await.unwrap();
    assert!(matches!(events[0].envelope.event, Event::ScheduleCreated(_)));
    // What a reader that meets a jump asks the stream: the next message it keeps, by subject
    // or across the log, and none for a subject removed.
    let all = ns.events_all();
    assert_eq!(tm.bus.next_kept(&schedule_subject, 1).await.unwrap(), events[0].seq);
    assert_eq!(tm.bus.next_kept(&all, events[1].seq).await.unwrap(), events[1].seq);
    assert_eq!(tm.bus.next_kept(&ns.run(&RunKey { tenant: "default".into(), run_id: done }), 1).await.unwrap(), 0);
    assert_eq!(ticked(events), 2);
    let after = schedule_state(&tm, &schedule_subject).await;
    assert_eq!(
        (
            after.last_tick,
            after.last_run,
            after.last_tick_ran,
            after.paused,
            after.ticks_from,
            after.last_seq,
            after.ticks
        ),
        (
            schedule_before.last_tick,
            schedule_before.last_run,
            schedule_before.last_tick_ran,
            schedule_before.paused,
            schedule_before.ticks_from,
            schedule_before.last_seq,
            schedule_before.ticks
        )
    );

    // The running run goes on, and its step opens the secret kept.
    let run = tm.wait_run(running, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // Once it has ended, the next sweep removes it, reading one message a round: its end and
    // an event after it (as a late note would be) fall in two rounds, and the run is removed
    // in the second. Another sweep finds no more runs.
    let last = tm.bus.last_seq(&running_subject).await.unwrap();
    let cancel = RunCancelRequested { run_id: running, reason: "late".into(), key_id: None, timed_out: false };
    let after_end = EventMeta::new("default").envelope(running_subject.clone(), Event::RunCancelRequested(cancel));
    tm.bus.append(last, &after_end).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cutoff = chrono::Utc::now();
    let swept = sweep_in_rounds(&tm.bus, cutoff, 1).await.unwrap();
    assert!(swept.runs >= 1 && swept.read > 5, "{swept:?}");
    assert_eq!(count(&tm, &running_subject).await, 0);
    let again = sweep(&tm.bus, cutoff).await.unwrap();
    // Nothing more, but the first of the two records of removed runs before the cutoff (the
    // first sweep's and the stale one), which rounds of one message each never saw together.
    assert_eq!((again.runs, again.deleted, again.records), (0, 0, 1), "{again:?}");

    // A rebuild of the read side from the log as swept: the removed runs are left out, what
    // is in force is there. (A last write, so the log does not end with a message removed,
    // which the projector, having nothing to apply, never reaches.)
    put_secret(&tm, "LAST", "last-value").await;
    tm.mesh.take().unwrap().stop().await.unwrap();
    taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
    let projector =
        taskmesh::mesh::Mesh::start(&tm.env.settings, tm.bus.clone(), Some(tm.pool.clone()), &[Svc::Projector])
            .await
            .unwrap();
    tm.wait_projected().await;
    let pool = tm.pool.clone();
    let rows = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    let left: Vec<(String, String)> =
        sqlx::query_as("SELECT workflow_name, status FROM runs").fetch_all(&tm.pool).await.unwrap();
    assert!(left.is_empty(), "ended runs swept: {left:?}");
    assert_eq!(rows("SELECT count(*) FROM tenants WHERE id = 'default'").await, 1);
    assert_eq!(rows("SELECT count(*) FROM api_keys WHERE tenant_id = 'default'").await, keys_before.len() as i64);
    assert_eq!(rows("SELECT count(*) FROM secrets WHERE tenant_id = 'default'").await, 2);
    assert_eq!(rows("SELECT count(*) FROM schedules WHERE tenant_id = 'default'").await, 1);
    // Its ticks as counted before the sweep, though only the last two are left in the log.
    assert_eq!(rows("SELECT ticks::bigint FROM schedules WHERE tenant_id = 'default'").await, ticks_before);
    assert!(rows("SELECT count(*) FROM audit_log WHERE tenant_id = 'default'").await >= 1, "the newest record's");
    projector.stop().await.unwrap();
    tm.finish().await;
}

/// The event log's sweep timer on the timers queue (the subject's last), with its sequence, if
/// one is there.
async fn sweep_timer(tm: &TestMesh) -> Option<(u64, taskmesh_events::command::Timer)> {
    let ns = tm.bus.namespace();
    let stream = tm.bus.jetstream().get_stream(ns.timers_stream()).await.unwrap();
    let raw = stream.get_last_raw_message_by_subject(&ns.sweep_timer()).await.ok()?;
    Some((raw.sequence, serde_json::from_slice(&raw.payload).unwrap()))
}

/// Whether the timers queue still holds the message at `seq`.
async fn timer_held(tm: &TestMesh, seq: u64) -> bool {
    let stream = tm.bus.jetstream().get_stream(tm.bus.namespace().timers_stream()).await.unwrap();
    stream.get_raw_message(seq).await.is_ok()
}

/// How many sweep timers the timers queue holds.
async fn sweep_timers(tm: &TestMesh) -> u64 {
    let ns = tm.bus.namespace();
    let counts = tm.bus.subject_counts(&ns.timers_stream(), &ns.sweep_timer()).await.unwrap();
    counts.get(&ns.sweep_timer()).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_is_one_timer_the_replicas_share_and_one_of_them_sweeps() {
    use taskmesh_scheduler::retention::{arm, arm_after};
    let tm = spawn_with(&Svc::ALL, |s| s.nats.events_max_age_days = 30).await;
    let ns = tm.bus.namespace().clone();
    // The scheduler armed it as it started, due a minute later.
    let (first, armed) =
        eventually("the sweep armed", Duration::from_secs(10), || async { Ok(sweep_timer(&tm).await) }).await.unwrap();
    assert_eq!(armed.kind, taskmesh_events::command::TimerKind::EventLogSweep);
    let in_secs = (armed.due - chrono::Utc::now()).num_seconds();
    assert!((40..=60).contains(&in_secs), "due in {in_secs} s");
    // A second replica, which arms it too as it starts (as every replica does hourly): still
    // the one timer.
    let second = taskmesh_scheduler::Scheduler::new(
        tm.bus.clone(),
        tm.env.settings.scheduler.clone(),
        tm.env.settings.limits.clone(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let replica = tokio::spawn(second.run(stop.clone()));
    assert!(!arm(&tm.bus, chrono::Utc::now()).await.unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sweep_timers(&tm).await, 1);
    assert_eq!(sweep_timer(&tm).await.unwrap().0, first, "no other put");

    // Due now: one replica of the two sweeps, then puts the next an hour on and acks this one.
    tm.bus.purge_subject(&ns.timers_stream(), &ns.sweep_timer()).await.unwrap();
    assert!(arm(&tm.bus, chrono::Utc::now()).await.unwrap());
    let (due_now, _) = sweep_timer(&tm).await.unwrap();
    let (next, _) = eventually("the sweep done and the next armed", Duration::from_secs(20), || async {
        let next = sweep_timer(&tm).await;
        Ok(next.filter(|(_, t)| t.due > chrono::Utc::now() + chrono::Duration::minutes(50)))
    })
    .await
    .unwrap();
    eventually("the swept timer acked", Duration::from_secs(5), || async {
        Ok((!timer_held(&tm, due_now).await).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(sweep_timers(&tm).await, 1);
    // Each test runs in a process of its own under nextest, the two replicas in this one: the
    // count is theirs alone. (Under plain `cargo test`, other tests add to it.)
    let exact = std::env::var_os("NEXTEST_RUN_ID").is_some();
    let sweeps = || async { sample(&tm.metrics().await, "taskmesh_event_log_sweeps_total", &[("outcome", "done")]) };
    if exact {
        assert_eq!(sweeps().await, 1.0, "one sweep of the two replicas");
    }

    // A timer due with another put after it (a sweep whose ack was lost put the next) is
    // acked without a sweep.
    tm.bus.purge_subject(&ns.timers_stream(), &ns.sweep_timer()).await.unwrap();
    assert!(!timer_held(&tm, next).await);
    let soon = chrono::Utc::now() + chrono::Duration::seconds(2);
    assert!(arm(&tm.bus, soon).await.unwrap());
    let (stale, _) = sweep_timer(&tm).await.unwrap();
    assert!(arm_after(&tm.bus, stale, chrono::Utc::now() + chrono::Duration::hours(1)).await.unwrap());
    eventually("the stale timer acked", Duration::from_secs(10), || async {
        Ok((!timer_held(&tm, stale).await).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(sweep_timers(&tm).await, 1);
    if exact {
        assert_eq!(sweeps().await, 1.0, "no sweep for it");
    }
    stop.cancel();
    replica.await.unwrap().unwrap();
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_stopped_between_two_removals_records_what_it_removed_and_leaves_the_rest() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use taskmesh_scheduler::retention::sweep_in_rounds_unless;
    let tm = spawn_with(&Svc::ALL, |s| s.nats.events_max_age_days = 30).await;
    let ns = tm.bus.namespace().clone();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(tm.submit("name: done\nsteps:\n  - {id: a, uses: noop}\n").await);
    }
    for id in &ids {
        tm.wait_run(*id, Duration::from_secs(30)).await;
    }
    put_secret(&tm, "GONE", "gone-value-1").await;
    let res = tm.auth(tm.http.delete(format!("{}/v1/secrets/GONE", tm.api))).send().await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    tm.wait_projected().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cutoff = chrono::Utc::now();
    let mesh = &tm;
    let gone = |id| async move { mesh.get_run(id).await.0 == 404 };

    // Stopped before it began: it reads and removes nothing, and says it was stopped (so its
    // timer is handed back, not armed an hour on).
    let swept = sweep_in_rounds_unless(&tm.bus, cutoff, 100_000, &|| true).await.unwrap();
    assert_eq!((swept.read, swept.runs, swept.stopped), (0, 0, true), "{swept:?}");

    // Stopped after its first removal: asked before the round, before the first run's purge
    // and before the second's, it stops there. The run it removed is recorded (the read side
    // drops it); the other runs and the deleted secret stay in the log.
    let asked = AtomicUsize::new(0);
    let third = || asked.fetch_add(1, SeqCst) >= 2;
    let swept = sweep_in_rounds_unless(&tm.bus, cutoff, 100_000, &third).await.unwrap();
    assert_eq!((swept.runs, swept.deleted, swept.stopped), (1, 0, true), "{swept:?}");
    let removed = eventually("the removed run gone from the read side", Duration::from_secs(10), || async {
        let mut removed = Vec::new();
        for id in &ids {
            if gone(*id).await {
                removed.push(*id);
            }
        }
        Ok((!removed.is_empty()).then_some(removed))
    })
    .await
    .unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    for id in ids.iter().filter(|id| !removed.contains(id)) {
        assert!(!tm.run_events(*id).await.is_empty(), "a run not reached keeps its events");
    }
    assert!(tm.bus.last_seq(&ns.secret("default", "GONE")).await.unwrap() > 0, "the rest of the round is left");

    // Let run: the rest goes, and is recorded.
    let swept = sweep_in_rounds_unless(&tm.bus, cutoff, 2, &|| false).await.unwrap();
    assert!(swept.runs >= 2 && swept.deleted == 1 && !swept.stopped, "{swept:?}");
    for id in ids {
        eventually("the removed run gone from the read side", Duration::from_secs(10), || async {
            Ok(gone(id).await.then_some(()))
        })
        .await
        .unwrap();
    }
    tm.finish().await;
}
