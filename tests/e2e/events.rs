//! Generic event triggers (CloudEvents into `POST /v1/events`) and a run's live events as
//! Server-Sent Events, resumed with `Last-Event-ID`.

use std::time::Duration;

use serde_json::{Value, json};
use taskmesh_testkit::eventually;

use crate::helpers::*;

async fn store(tm: &TestMesh, workflow: Value) {
    let name = workflow["name"].as_str().unwrap().to_string();
    let res = tm.auth(tm.http.put(format!("{}/v1/workflows/{name}", tm.api))).json(&workflow).send().await.unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
}

async fn publish(tm: &TestMesh, event: &Value) -> (u16, Value) {
    let res = tm
        .auth(tm.http.post(format!("{}/v1/events", tm.api)))
        .header("content-type", "application/cloudevents+json")
        .body(event.to_string())
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

fn workflows_of(accepted: &Value) -> Vec<String> {
    let mut names: Vec<String> =
        accepted["runs"].as_array().unwrap().iter().map(|r| r["workflow"].as_str().unwrap().to_string()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cloudevent_starts_each_matching_stored_workflow_once() {
    let tm = spawn_mesh().await;
    store(
        &tm,
        json!({
            "name": "big-orders",
            "inputs": {"order": {"type": "string"}, "amount": {"type": "integer"}},
            "on": {"events": [{
                "type": "com.example.order.created",
                "if": "event.data.amount > 100",
                "inputs": {"order": "${{ event.data.id }}", "amount": "${{ event.data.amount }}"}
            }]},
            "steps": [{"id": "ship", "run": "echo order ${{ inputs.order }} for ${{ inputs.amount }}"}]
        }),
    )
    .await;
    store(
        &tm,
        json!({"name": "every-order", "on": {"events": [{"type": "com.example.order.created"}]},
               "steps": [{"id": "count", "uses": "noop"}]}),
    )
    .await;
    store(
        &tm,
        json!({"name": "refunds", "on": {"events": [{"type": "com.example.order.refunded"}]},
               "steps": [{"id": "r", "uses": "noop"}]}),
    )
    .await;
    // A trigger is part of the definition and is validated with it.
    let res = tm
        .auth(tm.http.put(format!("{}/v1/workflows/bad", tm.api)))
        .json(&json!({"name": "bad", "on": {"events": [{"type": "x", "if": "event.data.("}]}, "steps": [{"id": "a", "uses": "noop"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "on.events[0].if", "{problem}");
    tm.wait_projected().await;

    // Structured mode.
    let big = json!({"specversion": "1.0", "id": "evt-1", "source": "/shop", "type": "com.example.order.created",
                     "subject": "o-1", "data": {"id": "o-1", "amount": 150}});
    let (status, accepted) = publish(&tm, &big).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(workflows_of(&accepted), ["big-orders", "every-order"]);
    assert_eq!(accepted["errors"], json!([]));
    let big_run = accepted["runs"].as_array().unwrap().iter().find(|r| r["workflow"] == "big-orders").unwrap();
    let big_run: uuid::Uuid = big_run["run_id"].as_str().unwrap().parse().unwrap();
    let run = tm.wait_run(big_run, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["inputs"], json!({"order": "o-1", "amount": 150}), "the amount stays a number");
    assert_eq!(
        run["trigger"],
        json!({"kind": "event", "source": "/shop", "id": "evt-1", "type": "com.example.order.created"})
    );
    assert_eq!(step(&run, "ship")["output"], "order o-1 for 150\n");

    // The same event again (same source and id) starts nothing new.
    let (status, again) = publish(&tm, &big).await;
    assert_eq!(status, 202);
    assert_eq!(workflows_of(&again), ["big-orders", "every-order"]);
    assert!(again["runs"].as_array().unwrap().iter().all(|r| r["duplicate"] == true), "{again}");
    let same: Vec<Value> = accepted["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["duplicate"] = json!(true);
            r
        })
        .collect();
    assert_eq!(again["runs"], Value::Array(same), "the same runs");

    // Binary mode, below the filter's threshold: only the unfiltered trigger fires.
    let res = tm
        .auth(tm.http.post(format!("{}/v1/events", tm.api)))
        .header("ce-specversion", "1.0")
        .header("ce-id", "evt-2")
        .header("ce-source", "/shop")
        .header("ce-type", "com.example.order.created")
        .header("content-type", "application/json")
        .body(json!({"id": "o-2", "amount": 50}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let small: Value = res.json().await.unwrap();
    assert_eq!(workflows_of(&small), ["every-order"]);

    // An event nothing listens to starts nothing; the run list shows what events started.
    let (_, none) =
        publish(&tm, &json!({"specversion": "1.0", "id": "e3", "source": "/x", "type": "com.example.unknown"})).await;
    assert_eq!(none["runs"], json!([]));
    let page = eventually("event-triggered runs listed", Duration::from_secs(20), || async {
        let page = tm.get_json(format!("{}/v1/runs?trigger=event", tm.api)).await;
        Ok((page["items"].as_array().map(Vec::len) == Some(3)).then_some(page))
    })
    .await
    .unwrap();
    assert!(page["items"].as_array().unwrap().iter().all(|r| r["trigger"] == "event"));
    let api_runs = tm.get_json(format!("{}/v1/runs?trigger=api", tm.api)).await;
    assert_eq!(api_runs["items"], json!([]));

    // Bad events are problems and start nothing.
    let cases = [
        (json!({"specversion": "0.3", "id": "a", "source": "/s", "type": "t"}), 400),
        (json!({"specversion": "1.0", "id": "", "source": "/s", "type": "t"}), 400),
        (json!({"specversion": "1.0", "source": "/s", "type": "t"}), 400),
    ];
    for (event, want) in cases {
        let (status, problem) = publish(&tm, &event).await;
        assert_eq!(status, want, "{event}: {problem}");
    }
    let res = tm.auth(tm.http.post(format!("{}/v1/events", tm.api))).body("{}").send().await.unwrap();
    assert_eq!(res.status(), 415, "neither structured nor binary");
    tm.finish().await;
}

/// `(id, event, data)` of each Server-Sent Event in `text`.
fn sse(text: &str) -> Vec<(Option<String>, String, String)> {
    let mut events = Vec::new();
    for block in text.split("\n\n") {
        let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !data.is_empty() || id.is_some() {
            events.push((id, event, data));
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runs_events_stream_live_and_resume_after_the_last_event_id() {
    let tm = spawn_mesh().await;
    let id = tm
        .submit(
            "name: streamed\nsteps:\n  - {id: a, run: 'sleep 0.5; echo a'}\n  - {id: b, needs: [a], run: 'echo b'}\n",
        )
        .await;
    let url = format!("{}/v1/runs/{id}/events", tm.api);
    let seen = eventually("the run to be readable", Duration::from_secs(10), || async {
        let res = tm.auth(tm.http.get(&url)).send().await?;
        Ok((res.status() == 200).then_some(res))
    })
    .await
    .unwrap();
    assert_eq!(seen.headers()["content-type"], "text/event-stream");
    // Read live: the stream ends by itself after the run's last event.
    let text = tokio::time::timeout(Duration::from_secs(30), seen.text()).await.expect("the stream ends").unwrap();
    let events = sse(&text);
    let types: Vec<&str> = events.iter().map(|(_, e, _)| e.as_str()).collect();
    assert_eq!(types.first(), Some(&"RunSubmitted"), "{types:?}");
    assert_eq!(&types[types.len() - 2..], ["RunSucceeded", "end"], "{types:?}");
    for step in ["a", "b"] {
        assert!(
            events
                .iter()
                .any(|(_, e, d)| e == "StepSucceeded"
                    && serde_json::from_str::<Value>(d).unwrap()["data"]["step"] == step),
            "{step} succeeded: {types:?}"
        );
    }
    // An event's id is its sequence; events appended together share one, and all but the
    // last of them carry their place in it (`{seq}.{n}`).
    let position = |id: &str| -> (u64, u32) {
        match id.split_once('.') {
            Some((seq, n)) => (seq.parse().unwrap(), n.parse().unwrap()),
            None => (id.parse().unwrap(), u32::MAX),
        }
    };
    let ids: Vec<String> = events.iter().filter_map(|(id, _, _)| id.clone()).collect();
    assert!(ids.windows(2).all(|w| position(&w[0]) < position(&w[1])), "ids are increasing positions: {ids:?}");
    let envelope: Value = serde_json::from_str(&events[0].2).unwrap();
    assert_eq!(envelope["data"]["run_id"], id.to_string());

    // Resume after the third event: exactly the rest.
    let res = tm.auth(tm.http.get(&url)).header("last-event-id", ids[2].as_str()).send().await.unwrap();
    let rest = sse(&res.text().await.unwrap());
    let rest_ids: Vec<String> = rest.iter().filter_map(|(id, _, _)| id.clone()).collect();
    assert_eq!(rest_ids, ids[3..], "resumed after {}", ids[2]);
    assert_eq!(rest.last().unwrap().1, "end");
    // Resume from within a commit (a step's success and the next step's dispatch): the rest of
    // it, then what follows.
    let inside = ids.iter().position(|id| id.contains('.')).expect("some events were appended together");
    let res = tm.auth(tm.http.get(&url)).header("last-event-id", ids[inside].as_str()).send().await.unwrap();
    let rest = sse(&res.text().await.unwrap());
    let rest_ids: Vec<String> = rest.iter().filter_map(|(id, _, _)| id.clone()).collect();
    assert_eq!(rest_ids, ids[inside + 1..], "resumed after {}", ids[inside]);
    // Resuming after the last event of an ended run just ends.
    let res = tm.auth(tm.http.get(&url)).header("last-event-id", ids.last().unwrap().as_str()).send().await.unwrap();
    let after_end = sse(&res.text().await.unwrap());
    assert_eq!(after_end.iter().map(|(_, e, _)| e.as_str()).collect::<Vec<_>>(), ["end"]);

    // What one noop step costs in the log (docs/benchmarks.md counts on it): five events in
    // three appends: the submission with the step's dispatch, its start, and its success with
    // the run's end.
    let one = tm.submit("name: one\nsteps:\n  - {id: a, uses: noop}\n").await;
    tm.wait_run(one, Duration::from_secs(30)).await;
    let res = tm.auth(tm.http.get(format!("{}/v1/runs/{one}/events", tm.api))).send().await.unwrap();
    let one_events = sse(&res.text().await.unwrap());
    let types: Vec<&str> = one_events.iter().map(|(_, e, _)| e.as_str()).filter(|e| *e != "end").collect();
    assert_eq!(
        types,
        ["RunSubmitted", "StepDispatched", "StepStarted", "StepSucceeded", "RunSucceeded"],
        "a one-step run's events"
    );
    let seqs: std::collections::BTreeSet<u64> =
        one_events.iter().filter_map(|(id, _, _)| id.as_deref().map(|id| position(id).0)).collect();
    assert_eq!(seqs.len(), 3, "a one-step run's appends: {one_events:?}");
    for first_of_two in [0, 3] {
        assert!(one_events[first_of_two].0.as_deref().is_some_and(|id| id.ends_with(".0")), "{one_events:?}");
    }

    for bad in ["soon", "5.x", "0.1", "-1"] {
        let res = tm.auth(tm.http.get(&url)).header("last-event-id", bad).send().await.unwrap();
        assert_eq!(res.status(), 400, "Last-Event-ID {bad}");
    }
    let res = tm.auth(tm.http.get(format!("{}/v1/runs/{}/events", tm.api, uuid::Uuid::now_v7()))).send().await.unwrap();
    assert_eq!(res.status(), 404);
    tm.finish().await;
}
