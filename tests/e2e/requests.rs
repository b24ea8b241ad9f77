//! Commands over the bus: a server in the asker's own process is reached without NATS, one in
//! another process over NATS, and a stopped server by no one (not even the commands from its own
//! process that were waiting for their turn).

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
