//! Commands over the bus: a server in the asker's own process is reached without NATS, one in
//! another process over NATS, and a stopped server by no one (not even the commands from its own
//! process that were waiting for their turn). Work-queue messages likewise: handed to their
//! consumer in the sender's process, or else enqueued.

use std::time::Duration;

use futures::StreamExt;
use taskmesh_bus::BusError;
use taskmesh_events::{ErrorCode, Problem};
use taskmesh_testkit::{TestEnv, eventually};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_goes_straight_to_a_server_in_this_process_and_over_nats_to_another() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let bus = env.bus().await?;
    // A second connection stands for another process: it shares no servers with `bus`.
    let other = env.bus().await?;
    let subject = bus.namespace().scheduler_command("double");
    let stop = CancellationToken::new();
    let server = {
        let (bus, subject, stop) = (bus.clone(), subject.clone(), stop.clone());
        tokio::spawn(async move {
            taskmesh_bus::serve(&bus, subject, "test", 4, stop.cancelled_owned(), |_, n: u32| async move {
                match n {
                    0 => Err(Problem::new(ErrorCode::BadRequest, "zero")),
                    n => Ok(n * 2),
                }
            })
            .await
        })
    };
    // From another process: over NATS.
    eventually("the server answers over NATS", Duration::from_secs(5), || async {
        Ok(other.request::<_, u32>(subject.clone(), &21).await.ok())
    })
    .await?;
    // Too large for NATS is too large either way.
    let huge = "x".repeat(other.client().server_info().max_payload + 1);
    assert!(matches!(other.request::<_, u32>(subject.clone(), &huge).await, Err(BusError::Nats(_))));
    assert!(matches!(bus.request::<_, u32>(subject.clone(), &huge).await, Err(BusError::Nats(_))));
    // What crosses nats-server from here on, as a watcher on the subject sees it.
    let mut crossing = other.client().subscribe(subject.clone()).await?;
    other.client().flush().await?;
    // From its own: answered, problems passed back, a malformed command refused as over NATS.
    assert_eq!(bus.request::<_, u32>(subject.clone(), &5).await?, 10);
    match bus.request::<_, u32>(subject.clone(), &0).await {
        Err(BusError::Rejected(p)) => assert_eq!((p.code, p.detail.as_str()), (ErrorCode::BadRequest, "zero")),
        other => panic!("expected the handler's problem, got {other:?}"),
    }
    match bus.request::<_, u32>(subject.clone(), &"five").await {
        Err(BusError::Rejected(p)) => assert_eq!(p.code, ErrorCode::BadRequest),
        other => panic!("expected a malformed command to be refused, got {other:?}"),
    }
    // None of those three crossed nats-server: the first message the watcher sees is a marker
    // sent over NATS after them.
    assert_eq!(other.request::<_, u32>(subject.clone(), &7).await?, 14);
    let first = tokio::time::timeout(Duration::from_secs(5), crossing.next()).await?.expect("subscribed");
    assert_eq!(std::str::from_utf8(&first.payload)?, "7", "a request from the server's own process crossed NATS");
    // Stopped, it answers neither way (and no one else listens).
    drop(crossing);
    stop.cancel();
    server.await??;
    assert!(matches!(bus.request::<_, u32>(subject.clone(), &5).await, Err(BusError::Unavailable(_))));
    assert!(matches!(other.request::<_, u32>(subject, &5).await, Err(BusError::Unavailable(_))));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_handles_none_of_its_own_process_commands_still_waiting_for_their_turn() -> anyhow::Result<()>
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let env = TestEnv::new().await?;
    let bus = env.bus().await?;
    let subject = bus.namespace().scheduler_command("slow");
    let (release, handled) = (Arc::new(tokio::sync::Notify::new()), Arc::new(AtomicUsize::new(0)));
    let stop = CancellationToken::new();
    // One handler at a time; 0 is answered at once, anything else once released.
    let server = {
        let (bus, subject, stop, release, handled) =
            (bus.clone(), subject.clone(), stop.clone(), release.clone(), handled.clone());
        tokio::spawn(async move {
            taskmesh_bus::serve(&bus, subject, "test", 1, stop.cancelled_owned(), move |_, n: u32| {
                let (release, handled) = (release.clone(), handled.clone());
                async move {
                    if n > 0 {
                        handled.fetch_add(1, Ordering::SeqCst);
                        release.notified().await;
                    }
                    Ok::<_, Problem>(n)
                }
            })
            .await
        })
    };
    eventually("the server answers", Duration::from_secs(5), || async {
        Ok(bus.request::<_, u32>(subject.clone(), &0).await.ok())
    })
    .await?;
    let ask = |n: u32| {
        let (bus, subject) = (bus.clone(), subject.clone());
        tokio::spawn(async move { bus.request::<_, u32>(subject, &n).await })
    };
    // The first holds the one handler; the second waits for its turn.
    let first = ask(1);
    eventually("the first handled", Duration::from_secs(5), || async {
        Ok((handled.load(Ordering::SeqCst) == 1).then_some(()))
    })
    .await?;
    // Polled once, the second is handed to the server (which waits for the handler) before the
    // stop: it cannot go over NATS instead.
    let mut second = Box::pin(bus.request::<_, u32>(subject.clone(), &2));
    assert!(futures::poll!(&mut second).is_pending());
    // Stopped, the server lets the first finish and answer, and never handles the second.
    stop.cancel();
    server.await??;
    release.notify_one();
    assert_eq!(first.await??, 1);
    assert!(matches!(second.await, Err(BusError::Unavailable(_))));
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    env.cleanup().await;
    Ok(())
}

/// A work-queue message is handed to a taker of its stream in the sender's process, and
/// enqueued (deduplicated by its message id) when the taker fails or panics, holds as many as
/// it may, is too slow (and then for a while after), or has stopped, or when it is sent from
/// another process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_message_goes_straight_to_its_taker_in_this_process_and_onto_the_queue_otherwise() -> anyhow::Result<()>
{
    use std::sync::Arc;
    use tokio::sync::{Notify, mpsc};
    let env = TestEnv::new().await?;
    let bus = env.bus().await?;
    // A second connection stands for another process: it shares no takers with `bus`.
    let other = env.bus().await?;
    let ns = bus.namespace().clone();
    let (stream, subject) = (ns.ended_stream(), ns.ended("acme"));
    let queued =
        || async { anyhow::Ok(bus.subject_counts(&stream, &subject).await?.get(&subject).copied().unwrap_or(0)) };
    // One at a time: "fail" fails, "panic" panics, "hold" is held until released, "stall"
    // never ends, anything else is taken.
    let (taken, mut took) = mpsc::unbounded_channel::<String>();
    let (holding, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let taking = {
        let (holding, release) = (holding.clone(), release.clone());
        bus.take_locally(&stream, 1, move |payload| {
            let (taken, holding, release) = (taken.clone(), holding.clone(), release.clone());
            async move {
                let body: String = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
                match body.as_str() {
                    "fail" => return Err("refused".to_string()),
                    "panic" => panic!("a taker's panic (expected by this test)"),
                    "stall" => std::future::pending::<()>().await,
                    "hold" => {
                        holding.notify_one();
                        release.notified().await;
                    }
                    _ => {}
                }
                taken.send(body).map_err(|e| e.to_string())
            }
        })
    };
    let hand_over = |bus: &taskmesh_bus::Bus, msg_id: &'static str, body: &'static str| {
        let (bus, stream, subject) = (bus.clone(), stream.clone(), subject.clone());
        async move { bus.hand_over(&stream, subject, msg_id, &body, None).await }
    };

    // Taken, and nothing queued.
    assert!(hand_over(&bus, "m1", "one").await?);
    assert_eq!(took.try_recv()?, "one", "handed over only once taken");
    assert_eq!(queued().await?, 0);
    // The taker fails, or panics: queued, and the next is taken again.
    assert!(!hand_over(&bus, "m2", "fail").await?);
    assert!(!hand_over(&bus, "m2b", "panic").await?);
    assert_eq!(queued().await?, 2);
    assert!(hand_over(&bus, "m2c", "after").await?);
    assert_eq!(took.try_recv()?, "after");
    // From another process: queued, and only once however often it is sent.
    assert!(!hand_over(&other, "m3", "three").await?);
    assert!(!hand_over(&other, "m3", "three").await?);
    assert_eq!(queued().await?, 3);
    // The taker holds one, as many as it may: the next is queued, not waited for.
    let held = tokio::spawn(hand_over(&bus, "m4", "hold"));
    holding.notified().await;
    let started = tokio::time::Instant::now();
    assert!(!hand_over(&bus, "m5", "five").await?);
    assert!(started.elapsed() < taskmesh_bus::HAND_OVER_WAIT / 2, "a busy taker was waited for");
    assert_eq!(queued().await?, 4);
    release.notify_one();
    assert!(held.await??);
    assert_eq!(took.try_recv()?, "hold");
    // Too slow: queued once the sender has waited its while, and the next ones at once.
    let started = tokio::time::Instant::now();
    assert!(!hand_over(&bus, "m6", "stall").await?);
    let paused_at = tokio::time::Instant::now();
    assert!(paused_at - started >= taskmesh_bus::HAND_OVER_WAIT);
    assert!(!hand_over(&bus, "m7", "seven").await?);
    assert!(paused_at.elapsed() < taskmesh_bus::HAND_OVER_WAIT / 2, "a slow taker was waited for again");
    assert_eq!(queued().await?, 6);
    // Once its pause is over, it takes again.
    tokio::time::sleep_until(paused_at + taskmesh_bus::SLOW_TAKER_PAUSE).await;
    assert!(hand_over(&bus, "m7b", "again").await?, "still passed over after its pause");
    assert_eq!(took.try_recv()?, "again");
    // Stopped: its place is given up (a taker registered since takes, where the first one
    // registered would), and with none left the message is queued.
    drop(taking);
    let next = bus.take_locally(&stream, 1, |_| async { Ok(()) });
    assert!(hand_over(&bus, "m8", "eight").await?, "the stopped taker kept its place");
    drop(next);
    assert!(!hand_over(&bus, "m9", "nine").await?);
    assert_eq!(queued().await?, 7);
    assert!(took.try_recv().is_err(), "the taker took what it should not have");
    env.cleanup().await;
    Ok(())
}
