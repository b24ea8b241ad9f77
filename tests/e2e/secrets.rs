//! Secrets: a step gets what it declares, and the value is nowhere else.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_reaches_its_step_and_appears_nowhere_else() {
    let tm = spawn_mesh().await;
    let value = format!("s3cr3t-{}", uuid::Uuid::now_v7().simple());
    let res = tm
        .auth(tm.http.put(format!("{}/v1/secrets/DEPLOY_TOKEN", tm.api)))
        .json(&serde_json::json!({"value": value}))
        .send()
        .await
        .unwrap();
    // Read after the write's seq, the list has it at once.
    let set = TestMesh::written_seq(&res);
    let listed = tm.get_json_after(format!("{}/v1/secrets", tm.api), set).await;
    assert_eq!(listed["items"][0]["name"], "DEPLOY_TOKEN", "{listed}");
    tm.wait_projected().await;
    let digest = hex::encode(hmac_sha256::Hash::hash(value.as_bytes()));
    let id = tm
        .submit(&format!(
            "name: uses-secret\nsteps:\n  - id: deploy\n    secrets: [DEPLOY_TOKEN]\n    run: |\n      echo \"token is $DEPLOY_TOKEN\"\n      echo \"echoed=$DEPLOY_TOKEN\" >> $TASKMESH_OUTPUT\n      [ \"$(printf %s \"$DEPLOY_TOKEN\" | sha256sum | cut -c1-64)\" = {digest} ]\n  - {{id: without, needs: [deploy], run: 'echo \"[$DEPLOY_TOKEN]\"'}}\n"
        ))
        .await;
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "the step received the value: {run:#}");
    assert_eq!(step(&run, "deploy")["output"], "token is ***\n");
    assert_eq!(step(&run, "deploy")["outputs"]["echoed"], "***");
    assert_eq!(step(&run, "without")["output"], "[]\n", "a step that does not declare it does not get it");
    let logs: Value = tm.get_json(format!("{}/v1/runs/{id}/steps/deploy/logs", tm.api)).await;
    assert_eq!(logs["lines"][0]["line"], "token is ***");
    tm.wait_projected().await;

    // Scan everything: the event log, the logs, every Postgres table, the API's answers.
    let ns = tm.bus.namespace();
    let events = tm.stream_text(&ns.events_stream()).await;
    assert!(events.contains("DEPLOY_TOKEN") && events.contains("SecretSet"), "the secret's event is in the log");
    assert!(!events.contains(&value), "the value is in no event");
    assert!(!tm.stream_text(&ns.logs_stream()).await.contains(&value), "the value is in no log line");
    assert!(!tm.postgres_text().await.contains(&value), "the value is in no Postgres row");
    let listed = tm.auth(tm.http.get(format!("{}/v1/secrets", tm.api))).send().await.unwrap().text().await.unwrap();
    assert!(listed.contains("DEPLOY_TOKEN") && !listed.contains(&value), "listing shows names only: {listed}");
    assert!(!serde_json::to_string(&run).unwrap().contains(&value));

    // A step declaring a secret that is not set fails without running; names are checked.
    let missing = tm.submit("name: missing\nsteps:\n  - {id: a, secrets: [NOPE], run: 'echo ran'}\n").await;
    let run = tm.wait_run(missing, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed");
    assert!(step(&run, "a")["error"].as_str().unwrap().contains("NOPE is not set"));
    assert_eq!(step(&run, "a")["output"], "");
    let bad = tm
        .auth(tm.http.put(format!("{}/v1/secrets/lower", tm.api)))
        .json(&serde_json::json!({"value": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let res = tm.auth(tm.http.delete(format!("{}/v1/secrets/DEPLOY_TOKEN", tm.api))).send().await.unwrap();
    let deleted = TestMesh::written_seq(&res);
    assert!(deleted > set);
    let listed = tm.get_json_after(format!("{}/v1/secrets", tm.api), deleted).await;
    assert_eq!(listed["items"], serde_json::json!([]), "gone once read after its delete");
    let res = tm.auth(tm.http.delete(format!("{}/v1/secrets/DEPLOY_TOKEN", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 404);
    tm.finish().await;
}
