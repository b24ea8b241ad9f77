//! apalis + Redis reference benchmark: the workloads of Taskmesh's load generator
//! (bench/loadgen) and of bench/celery, run on apalis 1.0 with its Redis backend, with the same
//! JSON output shape.
//!
//! ```text
//! apalis-bench throughput --n 1000 [--concurrency 64]
//! apalis-bench dag --n 200 [--concurrency 32]
//! apalis-bench roundtrip --n 200
//!     [--redis redis://127.0.0.1:6379/14] [--poll-us 1000]
//! ```
//!
//! One process holds a worker (apalis's default: tasks of a fetched batch run concurrently) and
//! the client. Each noop task, when its handler runs, tells the client over an in-process
//! channel; that is how the client learns a task has finished. apalis's own
//! `WaitForCompletion` polls Redis every 100 ms, which would measure the poll and not apalis.
//! The in-process signal flatters apalis a little: the client hears of a task before the worker
//! has written its result back to Redis.
//!
//! apalis-redis 1.0.0 files every pushed task in its scheduled set (its push clamps `run_at` to
//! now), and a worker promotes scheduled tasks only when it fetches. An idle worker fetches
//! when polled, so it runs with `poll_with_interval(--poll-us)`: 1 ms unless told otherwise.
//! While tasks keep arriving it fetches again at once after each batch.
//!
//! Workloads:
//! - `throughput`: N noop tasks pushed by `--concurrency` submitters, one push each (as
//!   bench/loadgen submits runs one request each); figures from the first push until the last
//!   task has run.
//! - `dag`: N workflows of shape 1 → 10 → 1. apalis has no fan-in of its own on this backend, so
//!   the workflow is what an apalis user would write: the head task pushes the ten middle tasks
//!   in one batch; each middle task counts itself with a Redis `INCR` on the workflow's key (as
//!   Celery's chord counter does), and the tenth pushes the tail. steps_per_second = 12 N / time.
//! - `roundtrip`: N sequential pushes, each awaited until its task has run.
//!
//! Before each workload one task runs end to end (warm-up). Prints one JSON line on stdout;
//! progress goes to stderr. Exits non-zero with nothing on stdout on any error, or when the
//! tasks have not all run within 10 minutes.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_redis::{Config, ConnectionManager, RedisStorage};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

const DEADLINE: Duration = Duration::from_secs(600);
const MIDDLE: u64 = 10;

/// One task. `stage` 0 is a plain noop or a workflow's head, 1 a middle task, 2 the tail.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u64,
    stage: u8,
    dag: bool,
}

struct Shared {
    storage: RedisStorage<Job>,
    conn: ConnectionManager,
    queue: String,
    /// Ids of finished tasks (plain noops) or finished workflows (their tail), in the order they
    /// finish. Bounded: sized by the caller for everything it will submit.
    done: mpsc::Sender<u64>,
}

async fn handle(job: Job, shared: Data<Arc<Shared>>) -> Result<(), BoxDynError> {
    if !job.dag || job.stage == 2 {
        shared.done.send(job.id).await?;
        return Ok(());
    }
    let mut storage = shared.storage.clone();
    if job.stage == 0 {
        let middle = (0..MIDDLE).map(|_| Job { id: job.id, stage: 1, dag: true }).collect();
        storage.push_bulk(middle).await?;
    } else {
        let key = format!("{}:wf:{}", shared.queue, job.id);
        let mut conn = shared.conn.clone();
        let seen: u64 = conn.incr(&key, 1).await?;
        if seen == MIDDLE {
            let _: () = conn.del(&key).await?;
            storage.push(Job { id: job.id, stage: 2, dag: true }).await?;
        }
    }
    Ok(())
}

struct Args {
    workload: String,
    n: usize,
    concurrency: usize,
    redis: String,
    poll: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let workload = it
        .next()
        .ok_or("usage: apalis-bench throughput|dag|roundtrip [--n N] [--concurrency C] [--redis URL] [--poll-us US]")?;
    if !["throughput", "dag", "roundtrip"].contains(&workload.as_str()) {
        return Err(format!("unknown workload {workload:?}: throughput, dag or roundtrip"));
    }
    let mut args = Args {
        workload,
        n: 500,
        concurrency: 64,
        redis: "redis://127.0.0.1:6379/14".into(),
        poll: Duration::from_micros(1000),
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|e| format!("{flag} {value:?}: {e}"));
        match flag.as_str() {
            "--n" => args.n = number()? as usize,
            "--concurrency" => args.concurrency = number()? as usize,
            "--poll-us" => args.poll = Duration::from_micros(number()?),
            "--redis" => args.redis = value,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if args.n == 0 || args.concurrency == 0 || args.poll.is_zero() {
        return Err("--n, --concurrency and --poll-us must be at least 1".into());
    }
    Ok(args)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[apalis-bench] {}", msg.as_ref());
}

/// Same rule as bench/loadgen: the element at index round((len - 1) * p) of the sorted list.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn latency_summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({
        "count": ms.len(),
        "p50_ms": percentile(&ms, 0.5),
        "p90_ms": percentile(&ms, 0.9),
        "p99_ms": percentile(&ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(f64::NAN),
    })
}

async fn recv(done: &Mutex<mpsc::Receiver<u64>>, until: Instant) -> Result<u64, String> {
    let mut done = done.lock().await;
    match tokio::time::timeout_at(until.into(), done.recv()).await {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err("the worker stopped".into()),
        Err(_) => Err(format!("tasks did not all run within {} s", DEADLINE.as_secs())),
    }
}

/// Pushes `n` jobs (ids 1..=n) from `concurrency` submitters, then waits for `n` completions.
/// Returns (submit seconds, total seconds).
async fn flood(
    storage: &RedisStorage<Job>,
    done: &Mutex<mpsc::Receiver<u64>>,
    n: usize,
    concurrency: usize,
    dag: bool,
) -> Result<(f64, f64), String> {
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let mut submitters = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let mut storage = storage.clone();
        let next = next.clone();
        submitters.spawn(async move {
            loop {
                let id = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if id > n as u64 {
                    return Ok::<_, String>(());
                }
                storage.push(Job { id, stage: 0, dag }).await.map_err(|e| format!("push: {e}"))?;
            }
        });
    }
    while let Some(joined) = submitters.join_next().await {
        joined.map_err(|e| e.to_string())??;
    }
    let submitted = start.elapsed().as_secs_f64();
    log(format!("submitted {n} in {submitted:.3} s; waiting for them to run"));
    let until = start + DEADLINE;
    for _ in 0..n {
        recv(done, until).await?;
    }
    Ok((submitted, start.elapsed().as_secs_f64()))
}

async fn run(args: Args) -> Result<Value, String> {
    let conn = apalis_redis::connect(args.redis.as_str()).await.map_err(|e| format!("redis {}: {e}", args.redis))?;
    let queue = format!("tm-bench-{}-{}", std::process::id(), args.workload);
    let storage = RedisStorage::<Job>::new(conn.clone()).with_config(Config::default().queue(&queue));
    // Room for every completion this process will see: the warm-up, then n runs or workflows.
    let (done_tx, done_rx) = mpsc::channel(args.n + 1);
    let done = Mutex::new(done_rx);
    let shared = Arc::new(Shared { storage: storage.clone(), conn, queue: queue.clone(), done: done_tx });
    let worker = WorkerBuilder::new(format!("{queue}-worker"))
        .backend(storage.clone().poll_with_interval(args.poll))
        .data(shared)
        .build(handle);
    tokio::spawn(async move {
        if let Err(e) = worker.run().await {
            log(format!("worker stopped: {e}"));
        }
    });
    log(format!(
        "{}: n={}, queue {queue}, poll every {} µs, redis {}",
        args.workload,
        args.n,
        args.poll.as_micros(),
        args.redis
    ));

    // Warm-up: one task end to end, so the worker is registered and polling.
    let mut client = storage.clone();
    client.push(Job { id: 0, stage: 0, dag: false }).await.map_err(|e| format!("push: {e}"))?;
    recv(&done, Instant::now() + Duration::from_secs(30)).await?;

    Ok(match args.workload.as_str() {
        "throughput" | "dag" => {
            let dag = args.workload == "dag";
            let (submit, total) = flood(&storage, &done, args.n, args.concurrency, dag).await?;
            let steps = if dag { MIDDLE + 2 } else { 1 };
            log(format!("{}: {} ended in {total:.3} s", args.workload, args.n));
            json!({
                "workload": format!("apalis-{}", args.workload), "runs": args.n, "failed": 0,
                "submit_seconds": submit, "total_seconds": total,
                "runs_per_second": args.n as f64 / total,
                "steps_per_second": (args.n as u64 * steps) as f64 / total,
            })
        }
        _ => {
            let mut ms = Vec::with_capacity(args.n);
            for id in 1..=args.n as u64 {
                let t = Instant::now();
                client.push(Job { id, stage: 0, dag: false }).await.map_err(|e| format!("push: {e}"))?;
                let got = recv(&done, t + Duration::from_secs(60)).await?;
                if got != id {
                    return Err(format!("expected task {id} to finish, {got} did"));
                }
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let latency = latency_summary(ms);
            log(format!("roundtrip: {} done; p50 {} ms, p99 {} ms", args.n, latency["p50_ms"], latency["p99_ms"]));
            json!({ "workload": "apalis-roundtrip", "latency": latency })
        }
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let outcome = match parse_args() {
        Ok(args) => run(args).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(report) => {
            println!("{report}");
            // The worker task is still polling; the process ends here.
            std::process::exit(0);
        }
        Err(e) => {
            log(format!("ERROR: {e}"));
            std::process::exit(1);
        }
    }
}
