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
        ("workflows", "tenant_id, name, version"),
        ("schedules", "tenant_id, id"),
        ("secrets", "tenant_id, name"),
        ("audit_log", "tenant_id, seq"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_projector_catches_up_and_a_rebuild_equals_the_live_rows() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Executor, Svc::Gateway, Svc::Projector], |_| {}).await;
    let first = tm.submit("name: before\nsteps:\n  - {id: a, run: 'echo one'}\n").await;
    tm.wait_run(first, Duration::from_secs(30)).await;

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
    assert!(live.iter().filter(|r| r.starts_with("runs:")).count() == 6);

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
