//! The read side catches up after an outage, and a rebuild from the log equals the live rows.

use std::time::Duration;

use taskmesh::mesh::Mesh;
use taskmesh_events::RunKey;
use taskmesh_testkit::eventually;

use crate::helpers::*;

/// Every read-model row, in a stable order, as JSON text.
async fn dump(pool: &sqlx::PgPool) -> Vec<String> {
    let mut out = Vec::new();
    let tables = [
        ("tenants", "id"),
        ("api_keys", "id"),
        ("runs", "tenant_id, id"),
        ("steps", "tenant_id, run_id, step_id"),
        ("step_attempts", "tenant_id, run_id, step_id, attempt"),
        ("repo_connections", "id"),
        ("webhook_endpoints", "id"),
        ("webhook_delivery_failures", "endpoint_id, message_id"),
        ("workflows", "tenant_id, name, version"),
        ("schedules", "tenant_id, id"),
        ("secrets", "tenant_id, name"),
        ("audit_log", "tenant_id, seq, part"),
    ];
    // Every read model is compared: a new table must be added above.
    let mut all: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'
         AND tablename NOT IN ('projection_checkpoints', '_sqlx_migrations')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    all.sort();
    let mut listed: Vec<String> = tables.iter().map(|(t, _)| t.to_string()).collect();
    listed.sort();
    assert_eq!(listed, all, "dump() compares every read-model table");
    for (table, order) in tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT row_to_json(t)::text FROM (SELECT * FROM {table} ORDER BY {order}) t"
        )))
        .fetch_all(pool)
        .await
        .unwrap();
        out.extend(rows.into_iter().map(|r| format!("{table}: {r}")));
    }
    out
}

async fn delete_schedule(tm: &TestMesh, id: &str) {
    let res = tm.auth(tm.http.delete(format!("{}/v1/schedules/{id}", tm.api))).send().await.unwrap();
    TestMesh::written_seq(&res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_projector_catches_up_and_a_rebuild_equals_the_live_rows() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Executor, Svc::Gateway, Svc::Projector], |_| {}).await;
    let first = tm.submit("name: before\nsteps:\n  - {id: a, run: 'echo one'}\n").await;
    tm.wait_run(first, Duration::from_secs(30)).await;
    // Three yearly schedules: one deleted now, one while the projector is down, one kept.
    let schedule = || async {
        let spec = serde_json::json!({"cron": "0 0 1 1 *", "workflow": {"name": "yearly", "steps": [{"id": "a", "uses": "noop"}]}});
        let res = tm.auth(tm.http.post(format!("{}/v1/schedules", tm.api))).json(&spec).send().await.unwrap();
        assert_eq!(res.status(), 201);
        res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string()
    };
    let (gone, gone_later, kept_schedule) = (schedule().await, schedule().await, schedule().await);
    delete_schedule(&tm, &gone).await;
    // Webhook endpoints of both formats, one deleted (the projector is the only service that
    // reads their events here: nothing is delivered).
    let mut endpoints = Vec::new();
    for (format, types) in [("slack", vec!["run.failed"]), ("standard_webhooks", vec![]), ("slack", vec![])] {
        let body = serde_json::json!({"url": "https://hooks.example/x", "format": format, "event_types": types});
        let res = tm.send_json(reqwest::Method::POST, "/v1/webhook-endpoints", &body).await;
        assert_eq!(res.status(), 201);
        endpoints.push(res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    // Failed deliveries, as a notifier records them: of a kept endpoint, one failed twice and
    // then sent again from its first failure (which marks nothing: its latest failure came
    // after), and one failed and sent again; of the endpoint deleted below, one failed.
    let mut failures = std::collections::HashMap::new(); // message: its first failure's seq
    for (endpoint, message, attempts) in [
        (1, "m1", Some(6)),
        (1, "m1", Some(7)),
        (1, "m1", None),
        (1, "m2", Some(1)),
        (1, "m2", None),
        (2, "m3", Some(6)),
    ] {
        let endpoint_id: uuid::Uuid = endpoints[endpoint].parse().unwrap();
        let event = match attempts {
            Some(attempts) => {
                taskmesh_events::Event::WebhookDeliveryFailed(taskmesh_events::WebhookDeliveryFailed::new(
                    endpoint_id,
                    message.into(),
                    attempts,
                    format!("POST https://hooks.example/x answered 500 ({attempts})"),
                    serde_json::json!({"type": "run.failed", "data": {"message": message}}),
                    chrono::Utc::now(),
                ))
            }
            None => taskmesh_events::Event::WebhookDeliveryRetried(taskmesh_events::WebhookDeliveryRetried {
                endpoint_id,
                message_id: message.into(),
                failed_seq: *failures.get(message).unwrap(),
                failing_since: None,
            }),
        };
        let subject = tm.bus.namespace().webhook_endpoint("default", endpoint_id);
        let last = tm.bus.last_seq(&subject).await.unwrap();
        let envelope = taskmesh_events::EventMeta::new("default").envelope(subject, event);
        let seq = tm.bus.append(last, &envelope).await.unwrap();
        // A retry names the message's first failure.
        if attempts.is_some() {
            failures.entry(message).or_insert(seq);
        }
    }
    let res =
        tm.auth(tm.http.delete(format!("{}/v1/webhook-endpoints/{}", tm.api, endpoints[2]))).send().await.unwrap();
    assert_eq!(res.status(), 204);
    // A kept endpoint moved and refiltered, its secret rotated now and again while the
    // projector is down.
    tm.wait_projected().await;
    let kept = format!("/v1/webhook-endpoints/{}", endpoints[1]);
    let moved = serde_json::json!({"url": "https://hooks.example/moved", "event_types": ["run.failed"]});
    assert_eq!(tm.send_json(reqwest::Method::PATCH, &kept, &moved).await.status(), 200);
    let rotate = format!("{kept}/rotate-secret");
    assert_eq!(tm.send_json(reqwest::Method::POST, &rotate, &serde_json::json!({})).await.status(), 200);
    // A repository connection, changed now and again while the projector is down.
    let repo = serde_json::json!({"forge": "github", "repository": "o/r", "secret": "12345678", "status_token": "t",
        "workflow": {"name": "ci", "steps": [{"id": "a", "uses": "noop"}]}});
    let res = tm.send_json(reqwest::Method::POST, "/v1/repo-connections", &repo).await;
    assert_eq!(res.status(), 201);
    let connection =
        format!("/v1/repo-connections/{}", res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap());
    let changed = serde_json::json!({"branches": ["main"], "status_token": null});
    assert_eq!(tm.send_json(reqwest::Method::PATCH, &connection, &changed).await.status(), 200);
    tm.wait_projected().await;

    // Projector down: runs still execute, their events pile up in the log.
    let rest = Mesh::start(
        &tm.env.settings,
        tm.bus.clone(),
        Some(tm.pool.clone()),
        &[Svc::Ingest, Svc::Scheduler, Svc::Executor, Svc::Gateway],
    )
    .await
    .unwrap();
    tm.mesh.as_ref().unwrap().shutdown_token().cancel();
    let mut tm = tm;
    tm.mesh.take().unwrap().stop().await.unwrap();
    tm.mesh = Some(rest);
    tm.api = format!("http://{}", tm.mesh.as_ref().unwrap().gateway.unwrap());
    delete_schedule(&tm, &gone_later).await;
    // The kept schedule changed and run by hand while the projector is down.
    let kept_schedule = format!("/v1/schedules/{kept_schedule}");
    let res = tm.send_json(reqwest::Method::PATCH, &kept_schedule, &serde_json::json!({"cron": "0 0 2 1 *"})).await;
    assert_eq!(res.status(), 200);
    let res = tm.send_json(reqwest::Method::POST, &format!("{kept_schedule}/trigger"), &serde_json::json!({})).await;
    assert_eq!(res.status(), 202);
    let by_hand = res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(tm.send_json(reqwest::Method::POST, &rotate, &serde_json::json!({})).await.status(), 200);
    let res = tm.send_json(reqwest::Method::PATCH, &connection, &serde_json::json!({"repository": "o/renamed"})).await;
    assert_eq!(res.status(), 200);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(tm.submit(&format!("name: during\nsteps:\n  - {{id: a, run: 'echo {i}'}}\n  - {{id: b, needs: [a], run: 'exit 1'}}\n  - {{id: c, needs: [b], run: 'true'}}\n")).await);
    }
    for id in &ids {
        let key = RunKey { tenant: "default".into(), run_id: *id };
        let subject = tm.bus.namespace().run(&key);
        eventually("the run to end in the log", Duration::from_secs(30), || async {
            let events = tm.bus.read_subject(&subject, 0).await?;
            Ok(events.last().filter(|e| e.envelope.event.is_run_terminal()).map(|_| ()))
        })
        .await
        .unwrap();
        assert_eq!(tm.get_run(*id).await.0, 404, "not projected while the projector is down");
    }

    // Projector back: it catches up from its checkpoint.
    let projector =
        Mesh::start(&tm.env.settings, tm.bus.clone(), Some(tm.pool.clone()), &[Svc::Projector]).await.unwrap();
    for id in &ids {
        let run = tm.wait_run(*id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "failed");
        assert_eq!(step(&run, "c")["status"], "skipped");
    }
    tm.wait_projected().await;
    let live = dump(&tm.pool).await;
    assert_eq!(live.iter().filter(|r| r.starts_with("runs:")).count(), 7, "with the schedule's run by hand");
    let schedules: Vec<&String> = live.iter().filter(|r| r.starts_with("schedules:")).collect();
    assert_eq!(schedules.len(), 1, "deleted schedules are gone");
    assert!(
        schedules[0].contains("0 0 2 1 *") && schedules[0].contains(&by_hand),
        "changed, run by hand: {schedules:?}"
    );
    let hooks: Vec<&String> = live.iter().filter(|r| r.starts_with("webhook_endpoints:")).collect();
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    let repos: Vec<&String> = live.iter().filter(|r| r.starts_with("repo_connections:")).collect();
    assert_eq!(repos.len(), 1, "{repos:?}");
    for changed in [r#""repository":"o/renamed""#, r#""branches":["main"]"#, r#""status_token":null"#] {
        assert!(repos[0].contains(changed), "{changed}: {repos:?}");
    }
    assert!(hooks.iter().any(|r| r.contains(r#""format":"slack""#)), "{hooks:?}");
    let moved = hooks.iter().find(|r| r.contains("https://hooks.example/moved")).expect("the moved endpoint");
    let row: serde_json::Value = serde_json::from_str(moved.trim_start_matches("webhook_endpoints: ")).unwrap();
    assert_eq!(row["event_types"], serde_json::json!(["run.failed"]), "{row}");
    assert!(row["previous_until"].is_string(), "{row}");
    // Two rotations: the second's secret signs, beside the first's (not the creation's).
    let subject = tm.bus.namespace().webhook_endpoint("default", endpoints[1].parse().unwrap());
    let rotated: Vec<String> = tm
        .events_on(&subject)
        .await
        .into_iter()
        .filter_map(|e| match e {
            taskmesh_events::Event::WebhookEndpointSecretRotated(r) => Some(serde_json::to_string(&r.secret).unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(rotated.len(), 2);
    let kept = (&row["secret"], &row["previous_secret"]);
    assert_eq!(kept, (&serde_json::json!(rotated[1]), &serde_json::json!(rotated[0])), "{row}");
    let failed: Vec<&String> = live.iter().filter(|r| r.starts_with("webhook_delivery_failures:")).collect();
    assert_eq!(failed.len(), 2, "one row a delivery, none of the deleted endpoint: {failed:?}");
    assert!(failed[0].contains(r#""attempts":7"#) && failed[0].contains(r#""retried_at":null"#), "{failed:?}");
    assert!(failed[1].contains(r#""message_id":"m2""#) && !failed[1].contains(r#""retried_at":null"#), "{failed:?}");

    // Rebuild: drop every row, replay the log from sequence 1.
    projector.stop().await.unwrap();
    taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
    assert!(dump(&tm.pool).await.is_empty());
    let projector =
        Mesh::start(&tm.env.settings, tm.bus.clone(), Some(tm.pool.clone()), &[Svc::Projector]).await.unwrap();
    tm.wait_projected().await;
    let rebuilt = dump(&tm.pool).await;
    assert_eq!(rebuilt, live, "a rebuild from the log equals the live projection");
    projector.stop().await.unwrap();
    tm.finish().await;
}

/// A mesh whose projector ran until the API key was readable, then stopped: the test applies
/// the runs' events itself.
async fn without_projector() -> TestMesh {
    without_projector_with(|_| {}).await
}

/// [`without_projector`] with settings of the test's own.
async fn without_projector_with(tweak: impl FnOnce(&mut taskmesh_config::Settings)) -> TestMesh {
    let mut tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Executor, Svc::Gateway, Svc::Projector], |s| {
        s.executor.slots = 8;
        tweak(s);
    })
    .await;
    let services = [Svc::Ingest, Svc::Scheduler, Svc::Executor, Svc::Gateway];
    let rest = Mesh::start(&tm.env.settings, tm.bus.clone(), Some(tm.pool.clone()), &services).await.unwrap();
    tm.mesh.as_ref().unwrap().shutdown_token().cancel();
    tm.mesh.take().unwrap().stop().await.unwrap();
    tm.mesh = Some(rest);
    tm.api = format!("http://{}", tm.mesh.as_ref().unwrap().gateway.unwrap());
    tm
}

/// A run's events from the log, once it has ended there.
async fn ended_in_the_log(tm: &TestMesh, id: uuid::Uuid) -> Vec<taskmesh_bus::Stored> {
    let subject = tm.bus.namespace().run(&RunKey { tenant: "default".into(), run_id: id });
    eventually("the run to end in the log", Duration::from_secs(30), || async {
        let events = tm.bus.read_subject(&subject, 0).await?;
        Ok(events.last().is_some_and(|e| e.envelope.event.is_run_terminal()).then_some(events))
    })
    .await
    .unwrap()
}

/// Every row of `runs`, `steps` and `step_attempts`, in a stable order, as JSON text.
async fn run_rows(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT row_to_json(r)::text FROM runs r UNION ALL SELECT row_to_json(s)::text FROM steps s
         UNION ALL SELECT row_to_json(a)::text FROM step_attempts a ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A batch of events leaves the rows that the same events one message per batch would:
/// fan-out, fan-in, retries, a failure with skips and a chain, applied both ways. (The projector
/// folds a batch's run events into rows written once each; this is what keeps it honest.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_that_gathers_events_writes_the_rows_one_event_at_a_time_would() {
    let tm = without_projector().await;
    let workflows = [
        "name: fan\nsteps:\n  - {id: a, run: 'echo a'}\n  - {id: b1, needs: [a], run: 'echo b1'}\n  - {id: b2, needs: [a], run: 'echo b2'}\n  - {id: b3, needs: [a], run: 'echo b3'}\n  - {id: c, needs: [b1, b2, b3], run: 'echo c'}\n",
        "name: retry\nsteps:\n  - {id: flaky, run: '[ \"$TASKMESH_ATTEMPT\" -ge 3 ] || exit 7', retry: {max_attempts: 3, initial_delay_ms: 50}}\n  - {id: after, needs: [flaky], run: 'true'}\n",
        "name: fails\nsteps:\n  - {id: a, run: 'exit 1'}\n  - {id: b, needs: [a], run: 'true'}\n  - {id: c, needs: [b], run: 'true'}\n",
        "name: chain\nsteps:\n  - {id: a, run: 'true'}\n  - {id: b, needs: [a], run: 'true'}\n  - {id: c, needs: [b], run: 'true'}\n",
    ];
    let mut ids = Vec::new();
    for wf in workflows.iter().cycle().take(8) {
        ids.push(tm.submit(wf).await);
    }
    let mut events = Vec::new();
    let mut run_of = std::collections::HashMap::new();
    for id in &ids {
        let run_events = ended_in_the_log(&tm, *id).await;
        run_of.extend(run_events.iter().map(|e| (e.seq, *id)));
        events.extend(run_events);
    }
    events.sort_by_key(|e| e.seq);
    let projector = taskmesh_projector::Projector::new(tm.bus.clone(), tm.pool.clone());
    let run_rows = |rows: Vec<String>| -> Vec<String> {
        rows.into_iter().filter(|r| ["runs:", "steps:", "step_attempts:"].iter().any(|t| r.starts_with(t))).collect()
    };

    // A batch holds whole messages: a commit's events (one sequence) go together.
    let messages: Vec<Vec<taskmesh_bus::Stored>> = events.chunk_by(|a, b| a.seq == b.seq).map(|m| m.to_vec()).collect();
    assert!(messages.len() < events.len(), "some events were appended together, as commits");
    taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
    // One event at a time, each batch reading its runs from the tables (a new cache each);
    // then all at once; then in chunks, each batch handing its rows to the next in one cache.
    for m in &messages {
        projector.apply_batch(m, None, &mut Default::default()).await.unwrap();
    }
    let one_at_a_time = run_rows(dump(&tm.pool).await);
    assert_eq!(one_at_a_time.iter().filter(|r| r.starts_with("runs:")).count(), 8);
    assert!(one_at_a_time.iter().any(|r| r.starts_with("step_attempts:") && r.contains("\"attempt\":3")));

    // A batch looks in the tables only for runs it neither holds in its cache nor submits. The
    // tables now hold every run; still, a run's submission reads nothing (no row of a run can
    // be there before its first event), and its later events, with nothing cached, read it.
    let first = &messages[0];
    assert!(matches!(first[0].envelope.event, taskmesh_events::Event::RunSubmitted(_)));
    let later = messages.iter().find(|m| m[0].seq > first[0].seq && run_of[&m[0].seq] == run_of[&first[0].seq]);
    let mut conn = tm.pool.acquire().await.unwrap();
    for (message, read) in [(first, 0), (later.unwrap(), 1)] {
        let mut cache = Default::default();
        let rows = taskmesh_projector::fold::RunRows::load(&mut conn, message.iter(), &mut cache).await.unwrap();
        assert_eq!(rows.runs_read(), read, "runs read for {}", message[0].envelope.event.type_name());
    }
    drop(conn);

    taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
    projector.apply_batch(&events, None, &mut Default::default()).await.unwrap();
    let gathered = run_rows(dump(&tm.pool).await);
    assert_eq!(gathered, one_at_a_time, "one batch writes what one event at a time writes");

    // Batches that end mid-run, at every offset a chunk size lands on: after each, every run's
    // `last_seq` is its last event applied (a run whose write at a batch's end is wrongly
    // skipped shows up here), and at the end the rows are what one event at a time writes.
    for size in [2, 3, 5, 7, 13] {
        taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
        let mut want = std::collections::BTreeMap::new();
        // Each batch after the first knows the checkpoint it leaves from, as the running
        // projector does: the batches go as one statement each, without a transaction.
        let mut cache = taskmesh_projector::fold::RowCache::default();
        let mut committed = None;
        for chunk in messages.chunks(size) {
            let chunk: Vec<taskmesh_bus::Stored> = chunk.concat();
            committed = Some(projector.apply_batch(&chunk, committed, &mut cache).await.unwrap());
            want.extend(chunk.iter().map(|e| (run_of[&e.seq], e.seq as i64)));
            let have: std::collections::BTreeMap<uuid::Uuid, i64> =
                sqlx::query_as::<_, (uuid::Uuid, i64)>("SELECT id, last_seq FROM runs")
                    .fetch_all(&tm.pool)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect();
            assert_eq!(have, want, "each run's last_seq after a batch of {size}");
        }
        assert!(cache.is_empty(), "every run ended, and the cache keeps no ended run's rows");
        let chunked = run_rows(dump(&tm.pool).await);
        assert_eq!(chunked, one_at_a_time, "batches of {size} write what one event at a time writes");
    }

    // A batch of run events is one statement outside a transaction; left from a checkpoint the
    // table does not hold, it writes nothing (each write asks whether the checkpoint moved).
    taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
    let refused = projector.apply_batch(&events, Some(1), &mut Default::default()).await;
    assert!(refused.is_err(), "the table holds no checkpoint 1");
    assert!(run_rows(dump(&tm.pool).await).is_empty(), "nothing of a refused batch is written");
    tm.finish().await;
}

/// The projector commits without waiting for Postgres's disk, so a crash of Postgres may lose
/// its last batches, rows and checkpoint together. Here that loss is made by hand (a run's rows
/// deleted, the checkpoint put back before the run) under a running projector: its next batch
/// finds the checkpoint behind what it committed, and it replays the lost events from the log
/// rather than carrying on past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_that_finds_its_committed_batches_lost_replays_them() {
    let tm = spawn_mesh().await;
    let lost = tm.submit("name: lost\nsteps:\n  - {id: a, uses: noop}\n").await;
    let run = tm.wait_run(lost, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
    tm.wait_projected().await;
    let first = tm
        .bus
        .read_subject(&tm.bus.namespace().run(&RunKey { tenant: "default".into(), run_id: lost }), 0)
        .await
        .unwrap()
        .first()
        .map(|s| s.seq)
        .expect("the run has events");
    let mut tx = tm.pool.begin().await.unwrap();
    for table in ["step_attempts", "steps"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE run_id = $1")))
            .bind(lost)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("DELETE FROM runs WHERE id = $1").bind(lost).execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE projection_checkpoints SET last_seq = $1 WHERE projection = 'projector'")
        .bind(first as i64 - 1)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(tm.get_run(lost).await.0, 404, "the run's rows are gone");
    // A batch applied on top of a table behind what was committed refuses to commit.
    let projector = taskmesh_projector::Projector::new(tm.bus.clone(), tm.pool.clone());
    let refused = projector.apply_batch(&[], Some(first + 1_000_000), &mut Default::default()).await;
    assert!(refused.is_err(), "a checkpoint behind the committed one is a loss");
    // With nothing new in the log, the idle projector finds the loss by itself.
    let back = tm.wait_run(lost, Duration::from_secs(30)).await;
    assert_eq!(back["status"], "succeeded", "replayed from the log: {back:#}");
    assert_eq!(back["steps"][0]["status"], "succeeded");
    // And with something new, it goes on from there.
    let next = tm.submit("name: next\nsteps:\n  - {id: a, uses: noop}\n").await;
    assert_eq!(tm.wait_run(next, Duration::from_secs(30)).await["status"], "succeeded");
    tm.finish().await;
}

/// A run id derived from an idempotency key can come round: once the log has dropped the run's
/// events (purged here by hand, as `nats.events_max_age_days` would), the key submits the run
/// again, while its rows from the first time are still in the read side. A batch holding the
/// whole second submission leaves the rows its events one message at a time would: it reads
/// the run's rows, finds the run submitted again, and has them deleted before it writes the
/// new run's (see the next test for the whole of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_run_submitted_again_after_its_events_expired_is_projected_as_one_event_at_a_time_would() {
    let tm = without_projector().await;
    let submit =
        || async { tm.submit_keyed("nightly-2026-12-07", "name: keyed\nsteps:\n  - {id: a, uses: noop}\n").await.0 };
    let id = submit().await;
    let first = ended_in_the_log(&tm, id).await;
    let subject = tm.bus.namespace().run(&RunKey { tenant: "default".into(), run_id: id });
    tm.bus.purge_subject(&tm.bus.namespace().events_stream(), &subject).await.unwrap();
    assert_eq!(submit().await, id, "the key's run id, submitted anew");
    // Its submission, with the steps it dispatches at once: the rest of the new run waits on
    // the queues' deduplication window (two minutes), which still holds the first run's step
    // (see the next test). Only the submission is compared.
    let second: Vec<_> =
        tm.bus.read_subject(&subject, 0).await.unwrap().into_iter().take_while(|e| e.prev == Some(0)).collect();
    assert!(second[0].seq > first.last().unwrap().seq);
    assert!(matches!(second[0].envelope.event, taskmesh_events::Event::RunSubmitted(_)));
    let messages = |events: &[taskmesh_bus::Stored]| -> Vec<Vec<taskmesh_bus::Stored>> {
        events.chunk_by(|a, b| a.seq == b.seq).map(|m| m.to_vec()).collect()
    };
    let projector = taskmesh_projector::Projector::new(tm.bus.clone(), tm.pool.clone());
    let runs = || run_rows(&tm.pool);

    taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
    for m in messages(&first).iter().chain(&messages(&second)) {
        projector.apply_batch(m, None, &mut Default::default()).await.unwrap();
    }
    let one_at_a_time = runs().await;
    let last_seq: i64 =
        sqlx::query_scalar("SELECT last_seq FROM runs WHERE id = $1").bind(id).fetch_one(&tm.pool).await.unwrap();
    assert_eq!(last_seq as u64, second.last().unwrap().seq, "the second submission's events applied");

    taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
    let committed = projector.apply_batch(&first, None, &mut Default::default()).await.unwrap();
    projector.apply_batch(&second, Some(committed), &mut Default::default()).await.unwrap();
    assert_eq!(runs().await, one_at_a_time, "the second submission in one batch");
    tm.finish().await;
}

/// An idempotency key whose run's events aged out of the log is free again: it submits a new
/// run, under the same id, while the scheduler may still cache the old run and the read side
/// still holds its rows. The new run runs to its end (the scheduler, remembering the old run
/// as ended, took the new one for ended too, and it never ended), and the read side shows the
/// new run only, as a rebuild from the log (which holds only the new run) does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_run_submitted_again_after_its_events_expired_runs_and_is_shown_as_a_rebuild_shows_it() {
    // The queues deduplicate a dispatch of the same step of the same run id within their window
    // (two minutes by default): the run's events age out days later.
    let tm = without_projector_with(|s| s.nats.duplicate_window_secs = 1).await;
    let projector =
        Mesh::start(&tm.env.settings, tm.bus.clone(), Some(tm.pool.clone()), &[Svc::Projector]).await.unwrap();
    let submit = |yaml| tm.submit_keyed("nightly-2026-12-07", yaml);
    let (id, _) =
        submit("name: first\nsteps:\n  - {id: a, run: 'exit 3'}\n  - {id: b, needs: [a], uses: noop}\n").await;
    let first = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!((&first["status"], &first["workflow"]), (&"failed".into(), &"first".into()), "{first}");
    let subject = tm.bus.namespace().run(&RunKey { tenant: "default".into(), run_id: id });
    // What `nats.events_max_age_days` does, days later: the log's oldest events, the run's
    // among them, are gone (the read side keeps what it made of them).
    tm.wait_projected().await;
    let events_stream = tm.bus.namespace().events_stream();
    let last_seq =
        tm.bus.jetstream().get_stream(&events_stream).await.unwrap().info().await.unwrap().state.last_sequence;
    tm.bus.purge_below(&events_stream, last_seq + 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let second = "name: second\nsteps:\n  - {id: c, uses: noop}\n  - {id: a, needs: [c], uses: noop}\n";
    assert_eq!(submit(second).await, (id, false.into()), "the key's run id, submitted anew, not a repeat");
    let events = eventually("the second run to end in the log", Duration::from_secs(30), || async {
        let events = tm.bus.read_subject(&subject, last_seq).await?;
        Ok(events.last().is_some_and(|e| e.envelope.event.is_run_terminal()).then_some(events))
    })
    .await
    .unwrap();
    let end = &events.last().unwrap().envelope.event;
    assert!(matches!(end, taskmesh_events::Event::RunSucceeded(_)), "{end:?}");
    tm.wait_projected().await;
    let (status, run) = tm.get_run(id).await;
    assert_eq!(status, 200);
    assert_eq!((&run["status"], &run["workflow"]), (&"succeeded".into(), &"second".into()), "{run}");
    let steps: Vec<_> =
        run["steps"].as_array().unwrap().iter().map(|s| (s["id"].clone(), s["status"].clone())).collect();
    let expected: Vec<(serde_json::Value, serde_json::Value)> =
        vec![("c".into(), "succeeded".into()), ("a".into(), "succeeded".into())];
    assert_eq!(steps, expected, "{run}");
    // The rows of runs (the log no longer has the tenant's and its key's creation, which a
    // rebuild would not show).
    let runs = || run_rows(&tm.pool);
    let live = runs().await;
    projector.stop().await.unwrap();
    taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
    let projector =
        Mesh::start(&tm.env.settings, tm.bus.clone(), Some(tm.pool.clone()), &[Svc::Projector]).await.unwrap();
    tm.wait_projected().await;
    assert_eq!(runs().await, live, "a rebuild from the log shows the runs as the live projection does");
    projector.stop().await.unwrap();
    tm.finish().await;
}

/// Postgres drops every connection to the mesh's database (a restart, a failover, an
/// administrator's `pg_terminate_backend`) while the mesh is idle: no read fails on a dead
/// connection (the pool's check is tested on its own below), and the projector, whose held
/// connection was dropped, finds it dead before its next batch and takes another, without
/// failing the batch and restarting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_postgres_drops_are_replaced_without_a_failed_read_or_a_lost_event() {
    let tm = spawn_mesh().await;
    let noop = "name: noop\nsteps:\n  - {id: a, uses: noop}\n";
    let before = tm.submit(noop).await;
    assert_eq!(tm.wait_run(before, Duration::from_secs(30)).await["status"], "succeeded");
    // The projector's consumer, which it makes anew whenever it restarts.
    let consumer_created = || async {
        let stream = tm.bus.jetstream().get_stream(tm.bus.namespace().events_stream()).await.unwrap();
        stream.consumer_info(taskmesh_projector::NAME).await.unwrap().created
    };
    let created = consumer_created().await;
    // From a connection outside the mesh's pool (which the test shares), so none is spared.
    let mut admin = sqlx::ConnectOptions::connect(&*tm.pool.connect_options()).await.unwrap();
    let dropped: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(dropped >= 2, "the pool's and the projector's connections were dropped ({dropped})");
    // Idle past the pool's bound: each connection is checked as it is next handed out.
    tokio::time::sleep(taskmesh_store::CHECK_IDLE_AFTER + Duration::from_millis(300)).await;
    for _ in 0..4 {
        let (status, run) = tm.get_run(before).await;
        assert_eq!((status, &run["status"]), (200, &serde_json::json!("succeeded")), "{run}");
    }
    let after = tm.submit(noop).await;
    assert_eq!(tm.wait_run(after, Duration::from_secs(30)).await["status"], "succeeded");
    assert_eq!(consumer_created().await, created, "the projector replaced its idle connection without a restart");
    tm.finish().await;
}

/// A pool's connection that Postgres dropped while it sat idle (past
/// `taskmesh_store::CHECK_IDLE_AFTER`) is found dead as it is handed out and replaced: the
/// statement given to the pool does not fail.
#[tokio::test]
async fn a_pooled_connection_dropped_while_idle_is_replaced_before_it_is_used() {
    let env = taskmesh_testkit::TestEnv::new().await.unwrap();
    let settings = taskmesh_config::PostgresSettings { max_connections: 1, ..env.settings.postgres.clone() };
    let pool = taskmesh_store::connect(&settings).unwrap();
    let backend = "SELECT pg_backend_pid()";
    let pid: i32 = sqlx::query_scalar(backend).fetch_one(&pool).await.unwrap();
    let mut admin = sqlx::ConnectOptions::connect(&*pool.connect_options()).await.unwrap();
    // Dropped only once the pool has it back (the pool checks each connection as it takes it
    // back, and would find it dead then).
    eventually("the connection back in the pool", Duration::from_secs(5), || async {
        Ok((pool.num_idle() == 1).then_some(()))
    })
    .await
    .unwrap();
    let dropped: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(&mut admin).await.unwrap();
    assert!(dropped);
    tokio::time::sleep(taskmesh_store::CHECK_IDLE_AFTER + Duration::from_millis(300)).await;
    let again: i32 = sqlx::query_scalar(backend).fetch_one(&pool).await.expect("a live connection");
    assert_ne!(again, pid, "a new connection");
    // A statement on a connection Postgres dropped fails, and an API call answers it 503
    // (retry), not 500: such is the lot of one used within the last second, which the pool
    // hands out unchecked.
    let mut held = pool.acquire().await.unwrap();
    let pid: i32 = sqlx::query_scalar(backend).fetch_one(&mut *held).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&mut admin).await.unwrap();
    let failed = sqlx::query_scalar::<_, i32>(backend).fetch_one(&mut *held).await.expect_err("a dead connection");
    let answer = taskmesh_http::ApiError::from(failed).0;
    assert_eq!(answer.code, taskmesh_events::ErrorCode::Unavailable, "{}", answer.detail);
    drop(held);
    let last: i32 = sqlx::query_scalar(backend).fetch_one(&pool).await.expect("the next statement is answered");
    assert_ne!(last, pid);
    drop(admin);
    pool.close().await;
    env.cleanup().await;
}

/// A NUL character, which Postgres's `text` and `jsonb` refuse, in a step's output and in a
/// run's inputs: the read side shows a replacement character and goes on projecting (it
/// failed on that event again and again, for every tenant).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nul_in_an_output_or_an_input_does_not_stop_the_read_side() {
    let tm = spawn_mesh().await;
    let body = serde_json::json!({
        "workflow": {
            "name": "nul",
            "inputs": {"x": {"type": "string"}},
            "steps": [{"id": "a", "run": "printf 'a\\000b'"}],
        },
        "inputs": {"x": "c\u{0}d"},
    });
    let id = tm.submit_json_as(&tm.key, body).await;
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["output"], "a\u{FFFD}b", "{run}");
    assert_eq!(run["inputs"]["x"], "c\u{FFFD}d", "{run}");
    // And the read side goes on.
    let after = tm.submit("name: after\nsteps:\n  - {id: a, uses: noop}\n").await;
    assert_eq!(tm.wait_run(after, Duration::from_secs(30)).await["status"], "succeeded");
    tm.finish().await;
}

/// Retention's record of a run removed (`RunsSwept`) in the same batch as the run's own
/// events (a projector behind by the retention age): applied after them, it leaves no rows of
/// the run and nothing of it cached; one naming an earlier sequence than the run's rows have
/// (a run of the same id submitted since) leaves the rows (the cache forgets the run either
/// way, to read it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runs_removal_in_the_batch_that_brings_its_events_leaves_no_rows_of_it() {
    use taskmesh_events::{Event, EventMeta, RunsSwept, SweptRun};
    let tm = without_projector().await;
    let id = tm.submit("name: one\nsteps:\n  - {id: a, run: 'true'}\n").await;
    let events = ended_in_the_log(&tm, id).await;
    // Its first commit only: the run looks running, so its rows stay in the cache.
    let first: Vec<taskmesh_bus::Stored> = events.iter().filter(|e| e.seq == events[0].seq).cloned().collect();
    let removed = |last_seq: u64| {
        let event = Event::RunsSwept(RunsSwept { runs: vec![SweptRun { run_id: id, last_seq }] });
        let envelope = EventMeta::new("default").envelope(tm.bus.namespace().runs_swept("default"), event);
        taskmesh_bus::Stored { seq: events[0].seq + 1, prev: None, envelope, part: 0, parts: 1 }
    };
    let projector = taskmesh_projector::Projector::new(tm.bus.clone(), tm.pool.clone());
    let count = |sql: &'static str| {
        let pool = tm.pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    for (names, left) in [(events[0].seq - 1, 1), (events[0].seq, 0)] {
        taskmesh_projector::Projector::rebuild(&tm.pool).await.unwrap();
        let mut batch = first.clone();
        batch.push(removed(names));
        let mut cache = taskmesh_projector::fold::RowCache::default();
        projector.apply_batch(&batch, None, &mut cache).await.unwrap();
        let rows = (count("SELECT count(*) FROM runs").await, count("SELECT count(*) FROM steps").await);
        assert_eq!(rows, (left, left), "a record naming {names}");
        // Not cached either way (it looked running): read again when next touched.
        assert!(cache.is_empty(), "nothing cached of a run a removal names");
    }
    tm.finish().await;
}
