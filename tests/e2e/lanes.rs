//! The consumer loop's lanes: one subject's messages are handled in order, different subjects'
//! side by side, and every message is acked once handled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use taskmesh_bus::Lanes;
use taskmesh_testkit::TestEnv;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn lanes_keep_each_subjects_order_and_run_subjects_side_by_side() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let bus = env.bus().await?;
    let ns = bus.namespace().clone();
    // The timers work queue serves as a scratch stream: ten tenants' subjects, 30 messages each.
    let subjects: Vec<String> = (0..10).map(|t| ns.timer(&format!("t{t}"))).collect();
    for i in 0..30u32 {
        for (s, subject) in subjects.iter().enumerate() {
            bus.enqueue(subject.clone(), &format!("{s}:{i}"), &i, None).await?;
        }
    }
    let seen: Arc<Mutex<HashMap<String, Vec<u32>>>> = Default::default();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let config = PullConfig {
        filter_subject: ns.timers_all(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    };
    let consumer = {
        let (bus, seen, in_flight, most, stop) =
            (bus.clone(), seen.clone(), in_flight.clone(), most.clone(), stop.clone());
        let stream = ns.timers_stream();
        tokio::spawn(async move {
            taskmesh_bus::consume_in_lanes(
                &bus,
                &stream,
                "lanes-test",
                config,
                64,
                Lanes { count: 8, depth: 4 },
                stop.cancelled(),
                |msg| {
                    let (seen, in_flight, most) = (seen.clone(), in_flight.clone(), most.clone());
                    async move {
                        let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        let i: u32 = serde_json::from_slice(&msg.payload).expect("a number");
                        seen.lock().unwrap().entry(msg.subject.to_string()).or_default().push(i);
                        in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        AckKind::Ack
                    }
                },
            )
            .await
        })
    };
    // Every message handled, and acked: the work queue empties.
    taskmesh_testkit::eventually("the queue to be drained", Duration::from_secs(20), || {
        let bus = bus.clone();
        let stream = ns.timers_stream();
        async move {
            let mut s = bus.jetstream().get_stream(&stream).await?;
            Ok((s.info().await?.state.messages == 0).then_some(()))
        }
    })
    .await?;
    stop.cancel();
    consumer.await?;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 10, "every subject's messages were handled");
    for (subject, order) in &seen {
        assert_eq!(order, &(0..30).collect::<Vec<u32>>(), "{subject}'s messages in order, each once");
    }
    let most = most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(most > 1, "different subjects were handled side by side (at most {most} at once)");
    assert!(most <= 8, "no more handlers at once than lanes ({most})");
    env.cleanup().await;
    Ok(())
}
