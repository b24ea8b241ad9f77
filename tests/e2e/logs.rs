//! Live logs: lines are streamed as a step prints them.

use std::time::Duration;

use serde_json::Value;
use taskmesh_testkit::eventually;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn following_a_step_shows_each_line_within_half_a_second() {
    let tm = spawn_mesh().await;
    let id = tm
        .submit("name: chatty\nsteps:\n  - {id: talk, run: 'sleep 1; for i in $(seq 1 10); do echo line $i; echo warn $i >&2; sleep 0.1; done'}\n")
        .await;
    eventually("the run to be visible", Duration::from_secs(10), || async {
        Ok((tm.get_run(id).await.0 == 200).then_some(()))
    })
    .await
    .unwrap();
    // Lines printed before the client connected are replayed: their lag counts from connecting.
    let connected = chrono::Utc::now();
    let mut res =
        tm.auth(tm.http.get(format!("{}/v1/runs/{id}/steps/talk/logs?follow=true", tm.api))).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut buf = String::new();
    let mut lines: Vec<(Value, chrono::DateTime<chrono::Utc>)> = Vec::new();
    let mut ended = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ended {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Ok(Some(chunk))) = tokio::time::timeout(left, res.chunk()).await else { break };
        let received = chrono::Utc::now();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if event.lines().any(|l| l == "event: end") {
                ended = true;
            }
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: "))
                && event.lines().any(|l| l == "event: line")
            {
                lines.push((serde_json::from_str(data).unwrap(), received));
            }
        }
    }
    assert!(lines.len() >= 20, "saw {} of 20 lines (stream ended: {ended})", lines.len());
    assert!(ended, "the stream ends once the step has ended");
    let stdout: Vec<&str> =
        lines.iter().filter(|(l, _)| l["stream"] == "stdout").map(|(l, _)| l["line"].as_str().unwrap()).collect();
    let expected: Vec<String> = (1..=10).map(|i| format!("line {i}")).collect();
    assert_eq!(stdout, expected, "every stdout line, in order");
    assert_eq!(lines.iter().filter(|(l, _)| l["stream"] == "stderr").count(), 10);
    for (line, received) in &lines {
        let printed: chrono::DateTime<chrono::Utc> = line["ts"].as_str().unwrap().parse().unwrap();
        let lag = (*received - printed.max(connected)).num_milliseconds();
        assert!(lag <= 500, "{} arrived {lag} ms after it was printed (or the client connected)", line["line"]);
    }

    // Paged reading: everything, then nothing after the last line; Last-Event-ID style resume.
    let page: Value = tm.get_json(format!("{}/v1/runs/{id}/steps/talk/logs?limit=5", tm.api)).await;
    assert_eq!(page["lines"].as_array().unwrap().len(), 5);
    let next = page["next"].as_u64().unwrap();
    let rest: Value = tm.get_json(format!("{}/v1/runs/{id}/steps/talk/logs?after={next}&limit=1000", tm.api)).await;
    assert_eq!(rest["lines"].as_array().unwrap().len(), 15);
    let done: Value = tm.get_json(format!("{}/v1/runs/{id}/steps/talk/logs?after={}", tm.api, rest["next"])).await;
    assert_eq!(done["lines"], serde_json::json!([]));
    assert_eq!(
        tm.auth(tm.http.get(format!("{}/v1/runs/{id}/steps/nope/logs", tm.api))).send().await.unwrap().status(),
        404
    );
    tm.finish().await;
}
