//! Two scheduler replicas on one stream never both dispatch a step; a fan-out's leases and
//! reports that arrive together are appended together; a run's first step goes out once while
//! its deadline cannot be armed; an old run's deadline leaves alone the run its idempotency key
//! submitted again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use taskmesh_bus::BusError;
use taskmesh_events::command::{Lease, LeaseDecision, LeaseRequest, ReportAck, ResultReport};
use taskmesh_events::{Event, EventMeta, RunKey, StepOutcome};
use taskmesh_scheduler::state::StepPhase;
use taskmesh_scheduler::{RunState, Scheduler};
use taskmesh_testkit::eventually;

use crate::helpers::*;

/// Folds a run's log into a fresh state, as a replica with an empty cache would.
async fn load(tm: &TestMesh, key: &RunKey) -> RunState {
    let events = tm.bus.read_subject(&tm.bus.namespace().run(key), 0).await.unwrap();
    let mut state = RunState::from_submitted(key.clone(), events[0].seq, &events[0].envelope.event).unwrap();
    for e in &events[1..] {
        state.apply(e.seq, &e.envelope.event);
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_replicas_conflict_and_the_loser_redecides_to_nothing() {
    // No scheduler runs: the test plays two replicas by hand to force the race.
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway], |_| {}).await;
    let id = tm.submit("name: race\nsteps:\n  - {id: a, run: 'true'}\n  - {id: b, needs: [a], run: 'true'}\n").await;
    let key = RunKey { tenant: "default".into(), run_id: id };
    let subject = tm.bus.namespace().run(&key);
    let meta = EventMeta::new("default");
    // Ingest took the first decision with the submission: `a` is dispatched, nothing is left.
    let first = load(&tm, &key).await;
    assert!(first.step("a").is_some_and(|s| s.phase == StepPhase::Dispatched));
    assert!(first.decide().is_empty(), "ingest dispatched `a` with the submission");
    // `a` starts and succeeds (played by hand), so the next decision is `b`'s dispatch.
    let lease = Lease { dispatch: 1, message: 1, delivery: 1 };
    let (granted, started) = first.lease("a", lease, "x", 3);
    assert!(matches!(granted, LeaseDecision::Granted { attempt: 1 }), "{granted:?}");
    tm.bus.append_commit(first.last_seq, &[meta.envelope(subject.clone(), started[0].clone())]).await.unwrap();
    let running = load(&tm, &key).await;
    let report = ResultReport {
        tenant: key.tenant.clone(),
        run_id: id,
        step: "a".into(),
        lease,
        succeeded: true,
        outcome: StepOutcome { exit_code: Some(0), ..Default::default() },
    };
    let (ack, done) = running.report(&report);
    assert!(matches!(ack, ReportAck::Recorded));
    tm.bus.append_commit(running.last_seq, &[meta.envelope(subject.clone(), done[0].clone())]).await.unwrap();

    let (a, b) = (load(&tm, &key).await, load(&tm, &key).await);
    assert_eq!(a.last_seq, b.last_seq);
    let (da, db) = (a.decide(), b.decide());
    assert_eq!(da.len(), 1);
    assert!(matches!(&da[0], Event::StepDispatched(d) if d.step == "b"), "{da:?}");
    assert_eq!(da, db, "both replicas decide the same dispatch");
    let (ea, eb) = (meta.envelope(subject.clone(), da[0].clone()), meta.envelope(subject.clone(), db[0].clone()));
    let (ra, rb) = tokio::join!(tm.bus.append(a.last_seq, &ea), tm.bus.append(b.last_seq, &eb));
    let conflicts = [&ra, &rb].iter().filter(|r| matches!(r, Err(BusError::Conflict { .. }))).count();
    assert_eq!(conflicts, 1, "exactly one append wins: {ra:?} {rb:?}");
    assert_eq!([&ra, &rb].iter().filter(|r| r.is_ok()).count(), 1);
    // The loser reloads and decides again: nothing is left to dispatch.
    let mut loser = if ra.is_err() { a } else { b };
    for e in tm.bus.read_subject(&subject, loser.last_seq).await.unwrap() {
        loser.apply(e.seq, &e.envelope.event);
    }
    assert!(loser.decide().is_empty(), "the loser re-decides to nothing");
    let dispatched: Vec<String> = tm
        .run_events(id)
        .await
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepDispatched(d) => Some(d.step.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(dispatched, ["a", "b"], "each step dispatched once");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_scheduler_replicas_dispatch_every_step_exactly_once() {
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway, Svc::Executor, Svc::Scheduler], |s| {
        s.executor.slots = 8
    })
    .await;
    // A second replica with its own cache, sharing the durable consumer and command subjects.
    let second = Scheduler::new(tm.bus.clone(), tm.env.settings.scheduler.clone(), tm.env.settings.limits.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let replica = tokio::spawn(second.run(stop.clone()));
    let yaml = "name: fan\nsteps:\n  - {id: a, uses: noop}\n  - {id: b, needs: [a], uses: noop}\n  - {id: c, needs: [a], uses: noop}\n  - {id: d, needs: [a], run: 'true'}\n  - {id: e, needs: [b, c, d], uses: noop}\n";
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(tm.submit(yaml).await);
    }
    for id in &ids {
        let run = tm.wait_run(*id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
        let mut per_step: HashMap<(String, &str), usize> = HashMap::new();
        for e in tm.run_events(*id).await {
            let (name, step) = match &e.event {
                Event::StepDispatched(d) => ("dispatched", d.step.clone()),
                Event::StepStarted(s) => ("started", s.step.clone()),
                Event::StepSucceeded(s) => ("succeeded", s.step.clone()),
                _ => continue,
            };
            *per_step.entry((step, name)).or_default() += 1;
        }
        assert_eq!(per_step.len(), 15, "{per_step:?}");
        assert!(per_step.values().all(|&n| n == 1), "every step dispatched, started and finished once: {per_step:?}");
    }
    stop.cancel();
    replica.await.unwrap().unwrap();
    tm.finish().await;
}

/// The stream sequences (the commits) of the run's events that `pick` selects, one per event.
async fn seqs_of(tm: &TestMesh, key: &RunKey, pick: impl Fn(&Event) -> bool) -> Vec<u64> {
    let events = tm.bus.read_subject(&tm.bus.namespace().run(key), 0).await.unwrap();
    events.iter().filter(|e| pick(&e.envelope.event)).map(|e| e.seq).collect()
}

fn distinct(seqs: &[u64]) -> usize {
    seqs.iter().collect::<HashSet<_>>().len()
}

/// On a single-threaded runtime: the commands are polled in turn in this one task (`join_all`
/// polls up to 30 futures in order), and nothing the first one awaits from NATS (its load of
/// the run, its append) can be answered before the others have all been polled and are
/// waiting, since the NATS client's task runs on this same thread. On several threads it
/// could: in about one run in ten beside two CPU hogs (2026-12-07) the first command ended
/// within its first poll, so the next found the slot free and took it alone, presumably
/// because this thread was preempted after sending and the answer was there when it looked.
/// None in 60 runs on one thread.
#[tokio::test]
async fn a_fan_outs_leases_and_reports_arriving_together_are_decided_and_appended_together() {
    // No scheduler service runs: the test asks one replica directly, as executors would.
    let tm = spawn_with(&[Svc::Ingest, Svc::Projector, Svc::Gateway], |_| {}).await;
    const WIDE: usize = 12;
    let mut yaml = String::from("name: wide\nsteps:\n");
    for i in 0..WIDE {
        yaml.push_str(&format!("  - {{id: s{i}, uses: noop}}\n"));
    }
    let id = tm.submit(&yaml).await;
    let key = RunKey { tenant: "default".into(), run_id: id };
    let submitted = load(&tm, &key).await;
    assert!(submitted.steps.iter().all(|s| s.phase == StepPhase::Dispatched), "ingest dispatched every step");
    let scheduler = Scheduler::new(tm.bus.clone(), tm.env.settings.scheduler.clone(), tm.env.settings.limits.clone());
    let lease = |i: u64| Lease { dispatch: 1, message: i + 1, delivery: 1 };
    let request = |step: String, lease: Lease, executor: &str| LeaseRequest {
        tenant: key.tenant.clone(),
        run_id: id,
        step,
        lease,
        executor: executor.into(),
    };

    // Every step's lease at once, and a second executor asking for the first step's message
    // (a duplicate delivery): polled in this order in one task, the first takes the run's
    // slot and loads the run from the log, and the rest wait for it together.
    let mut asked: Vec<LeaseRequest> = (0..WIDE).map(|i| request(format!("s{i}"), lease(i as u64), "x")).collect();
    asked.push(request("s0".into(), lease(0), "y"));
    let decisions = futures::future::join_all(asked.into_iter().map(|r| scheduler.lease(r))).await;
    for (i, d) in decisions[..WIDE].iter().enumerate() {
        assert!(matches!(d, Ok(LeaseDecision::Granted { attempt: 1 })), "s{i}: {d:?}");
    }
    // Decided on the state the others leave, after a look at the log: x holds that message.
    assert!(matches!(&decisions[WIDE], Ok(LeaseDecision::Denied { ack: false, .. })), "{:?}", decisions[WIDE]);
    let started = seqs_of(&tm, &key, |e| matches!(e, Event::StepStarted(_))).await;
    assert_eq!(started.len(), WIDE, "every step started once");
    // One append for the first lease, one for all that waited while it was appended (they
    // were one each, in turn).
    assert_eq!(distinct(&started), 2, "the leases that waited together were appended together");

    // Every step's report at once, and x asking again for s1's lease after them (a repeated
    // request): decided on the state s1's report leaves, ahead of the log, it is refused.
    let reports = (0..WIDE).map(|i| {
        scheduler.report(ResultReport {
            tenant: key.tenant.clone(),
            run_id: id,
            step: format!("s{i}"),
            lease: lease(i as u64),
            succeeded: true,
            outcome: StepOutcome { exit_code: Some(0), ..Default::default() },
        })
    });
    let again = scheduler.lease(request("s1".into(), lease(1), "x"));
    let (acks, again) = tokio::join!(futures::future::join_all(reports), again);
    assert!(acks.iter().all(|a| matches!(a, Ok(ReportAck::Recorded))), "{acks:?}");
    assert!(matches!(&again, Ok(LeaseDecision::Denied { ack: true, .. })), "s1 has ended: {again:?}");
    let succeeded = seqs_of(&tm, &key, |e| matches!(e, Event::StepSucceeded(_))).await;
    assert_eq!(succeeded.len(), WIDE, "every step succeeded once");
    assert_eq!(distinct(&succeeded), 2, "the reports that waited together were appended together");
    // The end was decided with the results it follows from, and appended with them.
    let ended = seqs_of(&tm, &key, |e| matches!(e, Event::RunSucceeded(_))).await;
    assert_eq!(ended, [*succeeded.iter().max().unwrap()], "the run ended in the last results' commit");
    let run = tm.wait_run(id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    tm.finish().await;
}

/// A new run's first steps and its deadline timer go out together. While the timers queue
/// refuses the deadline, the step still goes out, once: the run's first commit, not acked
/// until the deadline is armed, is delivered again every half second, and its `READY` entry is
/// not sent again, even past the queues' deduplication window, while the step waits (here for
/// an executor with a GPU, which none has). Once the queue takes the timer, the deadline is
/// armed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_step_goes_out_once_while_its_runs_deadline_cannot_be_armed() {
    let tm = spawn_with(&Svc::ALL, |s| s.nats.duplicate_window_secs = 1).await;
    let ns = tm.bus.namespace().clone();
    let js = tm.bus.jetstream();
    let mut timers = js.get_stream(ns.timers_stream()).await.unwrap();
    let mut refusing = timers.info().await.unwrap().config.clone();
    refusing.max_bytes = 1;
    js.update_stream(&refusing).await.unwrap();
    let ready_seq =
        || async { js.get_stream(ns.ready_stream()).await.unwrap().info().await.unwrap().state.last_sequence };
    let before = ready_seq().await;
    let id = tm.submit("name: gpu\nsteps:\n  - {id: train, runs_on: {gpu: nvidia}, run: 'echo trained'}\n").await;
    eventually("the step's READY entry", Duration::from_secs(10), || async {
        Ok((ready_seq().await > before).then_some(()))
    })
    .await
    .unwrap();
    // Past the window, the first commit delivered again meanwhile.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(ready_seq().await - before, 1, "the step's READY entry went out once");
    assert_eq!(timers.info().await.unwrap().state.messages, 0, "no deadline armed yet");
    tm.bus.provision().await.unwrap();
    let timer = eventually("the deadline to be armed", Duration::from_secs(5), || async {
        let stream = js.get_stream(ns.timers_stream()).await?;
        Ok(stream.get_last_raw_message_by_subject(&ns.timer("default")).await.ok())
    })
    .await
    .unwrap();
    let timer: taskmesh_events::command::Timer = serde_json::from_slice(&timer.payload).unwrap();
    assert!(
        matches!(timer.kind, taskmesh_events::command::TimerKind::RunTimeout { run_id, .. } if run_id == id),
        "{timer:?}"
    );
    tm.finish().await;
}

/// A run whose events aged out of the log before it ended leaves its deadline timer behind;
/// its idempotency key then submits a new run under the same id. When the old run's deadline
/// comes due it names the old run's submission, so the new run is not timed out by it (the
/// scheduler passes the timer's submission to the run's state, which ignores another run's),
/// and the new run's own deadline is armed (its timer's message id names its submission, so
/// the queue does not take it for the old one's within its deduplication window).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_runs_deadline_does_not_time_out_the_run_its_key_submitted_again() {
    let tm = spawn_with(&Svc::ALL, |_| {}).await;
    let ns = tm.bus.namespace().clone();
    let js = tm.bus.jetstream();
    let submit = |yaml| tm.submit_keyed("train-2026-12-07", yaml);
    let timers = || async {
        let mut stream = js.get_stream(ns.timers_stream()).await.unwrap();
        let mut timers = Vec::new();
        let last = stream.info().await.unwrap().state.last_sequence;
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                timers.push(serde_json::from_slice::<taskmesh_events::command::Timer>(&m.payload).unwrap().kind);
            }
        }
        timers
    };
    let deadline = |run: uuid::Uuid, seq: u64| taskmesh_events::command::TimerKind::RunTimeout {
        run_id: run,
        submitted_seq: Some(seq),
    };
    // Steps no executor here can take (none has a GPU): each run waits until its deadline.
    let (id, _) =
        submit("name: first\ntimeout_seconds: 8\nsteps:\n  - {id: a, runs_on: {gpu: nvidia}, run: 'true'}\n").await;
    let subject = ns.run(&RunKey { tenant: "default".into(), run_id: id });
    let first = tm.bus.read_subject(&subject, 0).await.unwrap()[0].seq;
    eventually("the first run's deadline armed", Duration::from_secs(10), || async {
        Ok(timers().await.contains(&deadline(id, first)).then_some(()))
    })
    .await
    .unwrap();
    // What `nats.events_max_age_days` does to a run older than that, still running.
    tm.bus.purge_subject(&ns.events_stream(), &subject).await.unwrap();
    let second = "name: second\ntimeout_seconds: 600\nsteps:\n  - {id: b, runs_on: {gpu: nvidia}, run: 'true'}\n";
    // (The dispatcher's note that the first run's step waits for an executor, appended to an
    // empty subject, would make this a repeat: it appends nothing there.)
    assert_eq!(submit(second).await, (id, false.into()), "the key's run id, submitted anew");
    let submitted = tm.bus.read_subject(&subject, 0).await.unwrap()[0].seq;
    assert!(submitted > first);
    assert!(timers().await.contains(&deadline(id, first)), "the first run's deadline is not yet due");
    // The first run's deadline comes due (eight seconds after its submission) and is taken off
    // the queue: only the new run's is left.
    eventually("the first run's deadline fired", Duration::from_secs(20), || async {
        Ok((timers().await == vec![deadline(id, submitted)]).then_some(()))
    })
    .await
    .unwrap();
    let events = tm.bus.read_subject(&subject, 0).await.unwrap();
    assert!(
        events
            .iter()
            .all(|e| !matches!(e.envelope.event, Event::RunCancelRequested(_)) && !e.envelope.event.is_run_terminal()),
        "the new run is neither timed out nor ended: {:?}",
        events.iter().map(|e| e.envelope.type_name()).collect::<Vec<_>>()
    );
    tm.finish().await;
}
