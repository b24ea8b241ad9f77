//! Commands over the bus: a server in the asker's own process is reached without NATS, one in
//! another process over NATS, and a stopped server by no one.

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
