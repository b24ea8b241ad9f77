//! `taskmesh-bench`: drives a running Taskmesh through its public REST API and reports
//! throughput and latency figures as JSON (stdout) and a table (stderr).
//!
//! Workloads: `throughput` (N one-step `noop` runs submitted concurrently, until all have
//! succeeded in the read side), `dag` (N runs of a 1 → 10 → 1 DAG), `roundtrip` (runs submitted
//! one after another, each awaited), `chain` (one run of a sequential chain: time per hop) and
//! `api` (`GET /v1/runs/{id}` under concurrent load, `--concurrency` in flight), `api-open`
//! (the same read at a fixed `--rate`, each request sent on schedule whether or not earlier
//! ones have answered, latency from its scheduled time), `openloop` (runs arriving at a fixed
//! rate, whatever the mesh does: time from submit to step start and to run end) and `limits`
//! (what JetStream and Postgres themselves sustain here, without Taskmesh). `throughput` and
//! `dag` also sample projection lag: how long after a submission is accepted it is readable
//! (`Taskmesh-Min-Seq`). Medians over repetitions are the caller's business (`scripts/bench`
//! runs each several times).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde_json::{Value, json};

/// A time on this machine's clock.
type Utc = chrono::DateTime<chrono::Utc>;

#[derive(Parser)]
struct Args {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key (or the path of a file holding it, prefixed with @); every workload but
    /// `limits` and `drop-namespace` needs one.
    #[arg(long, default_value = "")]
    key: String,
    #[arg(value_enum)]
    workload: Workload,
    /// Runs (throughput, dag, roundtrip), hops (chain) or requests (api).
    #[arg(long, default_value_t = 500)]
    n: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Runs per submission request (throughput, dag): 1 posts each run to `/v1/runs`; more
    /// posts them in batches to `/v1/runs/batch` (at most 100).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    batch: u16,
    /// Arrivals per second (openloop, api-open).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// NATS server (limits, drop-namespace).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The Taskmesh namespace whose streams `drop-namespace` deletes.
    #[arg(long)]
    namespace: Option<String>,
    /// Round trip: learn of each run's end by polling its view every 0.5 ms, instead of one
    /// read that waits for it (`GET /v1/runs/{id}?wait=`).
    #[arg(long)]
    poll: bool,
    /// Open loop: no read held for each run while the runs arrive (submit → visible as
    /// finished is then not measured, and the runs' ends are awaited after the last arrival),
    /// to tell what those held reads cost the mesh.
    #[arg(long)]
    no_wait: bool,
    /// Postgres database (limits): a scratch table is created and dropped in it.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Workload {
    Throughput,
    Dag,
    Roundtrip,
    Chain,
    Api,
    ApiOpen,
    Openloop,
    Limits,
    /// Not a workload: deletes a finished benchmark mesh's streams, whose storage JetStream
    /// would otherwise keep reserved.
    DropNamespace,
}

struct Api {
    http: reqwest::Client,
    url: String,
    key: String,
}

/// The id and `RunSubmitted` sequence of an accepted run, as `POST /v1/runs` answers it (and
/// each accepted run of a batch).
fn accepted(run: &Value) -> anyhow::Result<(String, u64)> {
    Ok((run["id"].as_str().context("id")?.to_string(), run["seq"].as_u64().unwrap_or(0)))
}

impl Api {
    async fn submit(&self, workflow: &Value) -> anyhow::Result<(String, u64)> {
        let res = self
            .http
            .post(format!("{}/v1/runs", self.url))
            .bearer_auth(&self.key)
            .json(&json!({"workflow": workflow}))
            .send()
            .await?;
        if res.status() != 202 {
            bail!("submit answered {}: {}", res.status(), res.text().await.unwrap_or_default());
        }
        accepted(&res.json().await?)
    }

    /// Submits runs of `workflow` in one `POST /v1/runs/batch`; their ids and sequences, in order.
    async fn submit_batch(&self, workflow: &Value, n: usize) -> anyhow::Result<Vec<(String, u64)>> {
        let runs: Vec<Value> = (0..n).map(|_| json!({"workflow": workflow})).collect();
        let res = self
            .http
            .post(format!("{}/v1/runs/batch", self.url))
            .bearer_auth(&self.key)
            .json(&json!({"runs": runs}))
            .send()
            .await?;
        if res.status() != 200 {
            bail!("batch submit answered {}: {}", res.status(), res.text().await.unwrap_or_default());
        }
        let body: Value = res.json().await?;
        let outcomes = body["runs"].as_array().context("runs")?;
        outcomes
            .iter()
            .map(|o| match o["run"].as_object() {
                Some(_) => accepted(&o["run"]),
                None => bail!("a run of the batch was refused: {}", o["problem"]),
            })
            .collect()
    }

    /// One read of a run for the API workloads: whether it was answered (`false`: refused, a
    /// `429` or `503`, counted apart so that only reads answered are timed); another failure
    /// is an error.
    async fn timed_read(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self.read_status(id).await?.is_ok())
    }

    /// A run's status ("unknown" while the read side does not hold it), or how long a refusal
    /// (`429`, `503`) asks the client to wait.
    async fn read_status(&self, id: &str) -> anyhow::Result<Result<String, Duration>> {
        let res = self.http.get(format!("{}/v1/runs/{id}", self.url)).bearer_auth(&self.key).send().await?;
        match res.status().as_u16() {
            404 => return Ok(Ok("unknown".into())),
            429 | 503 => return Ok(Err(retry_after(&res))),
            _ => {}
        }
        let body: Value = res.error_for_status()?.json().await?;
        Ok(Ok(body["status"].as_str().unwrap_or("").to_string()))
    }

    /// How many runs of `workflow` have `status`, paging through the list (200 a page).
    async fn count(&self, workflow: &str, status: &str) -> anyhow::Result<usize> {
        let mut total = 0;
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{}/v1/runs?workflow={workflow}&status={status}&limit=200", self.url);
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page = self.listing(url, None).await?;
            total += page["items"].as_array().map_or(0, Vec::len);
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return Ok(total),
            }
        }
    }

    /// Whether any run of `workflow` has `status` (one row asked for), once the read side has
    /// applied sequence `seq`.
    async fn any(&self, workflow: &str, status: &str, seq: u64) -> anyhow::Result<bool> {
        let url = format!("{}/v1/runs?workflow={workflow}&status={status}&limit=1", self.url);
        let page = self.listing(url, Some(seq)).await?;
        Ok(page["items"].as_array().is_some_and(|items| !items.is_empty()))
    }

    /// A page of a listing (with `Taskmesh-Min-Seq: seq`, once the read side has applied it).
    /// A refusal (`429`; `503`, the read side further behind than the gateway waits for) is
    /// asked again when its answer says, up to 20 times.
    async fn listing(&self, url: String, seq: Option<u64>) -> anyhow::Result<Value> {
        let mut tries = 0;
        loop {
            let mut req = self.http.get(&url).bearer_auth(&self.key);
            if let Some(seq) = seq {
                req = req.header("taskmesh-min-seq", seq.to_string());
            }
            let res = req.send().await?;
            tries += 1;
            if !matches!(res.status().as_u16(), 429 | 503) || tries == 20 {
                return Ok(res.error_for_status()?.json().await?);
            }
            tokio::time::sleep(retry_after(&res)).await;
        }
    }

    /// A run's view.
    async fn run(&self, id: &str) -> anyhow::Result<Value> {
        let res = self.http.get(format!("{}/v1/runs/{id}", self.url)).bearer_auth(&self.key).send().await?;
        Ok(res.error_for_status()?.json().await?)
    }

    /// Reads a run once the read side has applied sequence `seq` (the gateway holds the read).
    async fn read_after(&self, id: &str, seq: u64) -> anyhow::Result<()> {
        let res = self
            .http
            .get(format!("{}/v1/runs/{id}", self.url))
            .bearer_auth(&self.key)
            .header("taskmesh-min-seq", seq.to_string())
            .send()
            .await?;
        res.error_for_status()?;
        Ok(())
    }

    /// Reads the run once it has ended: one read the gateway holds until then (re-asked
    /// should its 60 s run out); returns its status. With `seq` (the submission's), the
    /// gateway first waits for the read side to hold the run; without, a run not yet there
    /// is asked for again every 0.5 ms.
    async fn wait_ended(&self, id: &str, seq: Option<u64>) -> anyhow::Result<String> {
        loop {
            let mut req = self.http.get(format!("{}/v1/runs/{id}?wait=60", self.url)).bearer_auth(&self.key);
            if let Some(seq) = seq {
                req = req.header("taskmesh-min-seq", seq.to_string());
            }
            let res = req.send().await?;
            let status = res.status();
            // 404: not projected yet (the wait is for an end, not for a submission to appear).
            if status == 404 {
                // With the submission's sequence, the read side holds the run: gone is gone.
                if seq.is_some() {
                    bail!("run {id} not found at its submission's sequence");
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
                continue;
            }
            // 429: the tenant holds as many waiting reads as the gateway gives one; 503: the
            // read side is further behind than the gateway waits for, or the gateway holds
            // all the reads it may. Asked again when the answer says, as a client should:
            // asking again at once would flood the gateway while the mesh is behind.
            if status == 429 || status == 503 {
                tokio::time::sleep(retry_after(&res)).await;
                continue;
            }
            let body: Value = res.error_for_status()?.json().await?;
            let s = body["status"].as_str().unwrap_or("").to_string();
            if ["succeeded", "failed", "cancelled", "timed_out"].contains(&s.as_str()) {
                return Ok(s);
            }
        }
    }

    /// Polls until the run has ended (every 0.5 ms, or when a refusal says); returns its
    /// status.
    async fn wait(&self, id: &str) -> anyhow::Result<String> {
        loop {
            match self.read_status(id).await? {
                Ok(s) if ["succeeded", "failed", "cancelled", "timed_out"].contains(&s.as_str()) => return Ok(s),
                Ok(_) => tokio::time::sleep(Duration::from_micros(500)).await,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

/// How long a refusal asks the client to wait (`Retry-After`, as the egress crate reads it), a
/// second without one, at least a second and at most a minute.
fn retry_after(res: &reqwest::Response) -> Duration {
    let asked = taskmesh_egress::retry_after(res.headers()).unwrap_or(Duration::from_secs(1));
    asked.clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// The API workloads' answered reads' times, and how many were refused.
fn answered(answers: Vec<Option<f64>>) -> (Vec<f64>, usize) {
    let refused = answers.iter().filter(|a| a.is_none()).count();
    (answers.into_iter().flatten().collect(), refused)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn latency_summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    json!({"count": ms.len(), "p50_ms": percentile(&ms, 0.5), "p90_ms": percentile(&ms, 0.9), "p99_ms": percentile(&ms, 0.99), "max_ms": ms.last().copied().unwrap_or(f64::NAN)})
}

fn noop() -> Value {
    json!({"name": "bench-noop", "steps": [{"id": "a", "uses": "noop"}]})
}

fn dag() -> Value {
    let mut steps = vec![json!({"id": "start", "uses": "noop"})];
    let middle: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
    for m in &middle {
        steps.push(json!({"id": m, "needs": ["start"], "uses": "noop"}));
    }
    steps.push(json!({"id": "end", "needs": middle, "uses": "noop"}));
    json!({"name": "bench-dag", "steps": steps})
}

fn chain(n: usize) -> Value {
    let steps: Vec<Value> = (0..n)
        .map(|i| {
            if i == 0 {
                json!({"id": "s0", "uses": "noop"})
            } else {
                json!({"id": format!("s{i}"), "needs": [format!("s{}", i - 1)], "uses": "noop"})
            }
        })
        .collect();
    json!({"name": "bench-chain", "steps": steps})
}

/// Submits `n` runs of `workflow` (renamed uniquely), `batch` per request, with `concurrency`
/// requests in flight, then waits
/// until all have ended in the read side: every 50 ms it asks whether any run of the workflow
/// is still `queued` or `running` (one row each, read once the read side holds every
/// submission), then counts the failed and succeeded once at the end. (Counting every run
/// through the list on each poll, as it did before, put a load on the gateway and Postgres that
/// grew with the backlog and was the benchmark's own.) About 200 of the submissions are followed
/// by a read that waits for the read side to hold them (`Taskmesh-Min-Seq`): its latency is the
/// projection lag under this load. Those reads run beside the submissions, not in their place,
/// so a lagging read side does not slow the submitting. Returns (seconds to submit, seconds
/// until all ended, failures, lag in ms).
async fn flood(
    api: Arc<Api>,
    mut workflow: Value,
    n: usize,
    concurrency: usize,
    batch: usize,
) -> anyhow::Result<(f64, f64, usize, Vec<f64>)> {
    let name = format!("bench-{}", uuid::Uuid::now_v7().simple());
    workflow["name"] = json!(name);
    let every = (n / 200).max(1);
    let start = Instant::now();
    let mut lag_reads = tokio::task::JoinSet::new();
    let mut last_seq = 0;
    let mut submissions = futures::stream::iter((0..n).step_by(batch))
        .map(|first| {
            let (api, wf) = (api.clone(), workflow.clone());
            let size = batch.min(n - first);
            async move {
                let runs = if batch == 1 { vec![api.submit(&wf).await?] } else { api.submit_batch(&wf, size).await? };
                anyhow::Ok(runs.into_iter().enumerate().map(move |(k, (id, seq))| (first + k, id, seq)))
            }
        })
        .buffer_unordered(concurrency);
    while let Some(submitted) = submissions.next().await {
        for (i, id, seq) in submitted? {
            last_seq = last_seq.max(seq);
            if i % every == 0 {
                let api = api.clone();
                lag_reads.spawn(async move {
                    let t = Instant::now();
                    api.read_after(&id, seq).await?;
                    anyhow::Ok(t.elapsed().as_secs_f64() * 1000.0)
                });
            }
        }
    }
    let submitted = start.elapsed().as_secs_f64();
    let mut lags = Vec::new();
    while let Some(lag) = lag_reads.join_next().await {
        lags.push(Some(lag??));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if !api.any(&name, "queued", last_seq).await? && !api.any(&name, "running", last_seq).await? {
            let done = start.elapsed().as_secs_f64();
            let ok = api.count(&name, "succeeded").await?;
            let failed = api.count(&name, "failed").await?;
            if ok + failed != n {
                bail!("{n} runs submitted, but {ok} succeeded and {failed} failed");
            }
            return Ok((submitted, done, failed, lags.into_iter().flatten().collect()));
        }
        if Instant::now() > deadline {
            bail!("runs of {name} were still queued or running after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Milliseconds from `from` to the RFC 3339 time `to` (both this machine's clock).
fn ms_between(from: chrono::DateTime<chrono::Utc>, to: &Value) -> Option<f64> {
    let to = chrono::DateTime::parse_from_rfc3339(to.as_str()?).ok()?;
    Some((to.to_utc() - from).num_microseconds()? as f64 / 1000.0)
}

/// A run's events as its event stream sends them (the run has ended, so the stream closes):
/// (type, occurred_at) in log order.
async fn run_events(api: &Api, id: &str) -> anyhow::Result<Vec<(String, Utc)>> {
    let res = api.http.get(format!("{}/v1/runs/{id}/events", api.url)).bearer_auth(&api.key).send().await?;
    let body = res.error_for_status()?.text().await?;
    Ok(body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|env| {
            let at = chrono::DateTime::parse_from_rfc3339(env["occurred_at"].as_str()?).ok()?.to_utc();
            Some((env["type"].as_str()?.to_string(), at))
        })
        .collect())
}

/// Where a round trip's time goes. The marks of each run: the request sent, each of its events
/// in log order (named by type, at its `occurred_at`), and the read that saw it ended; each hop
/// is from one mark to the next, and `RunSubmitted -> answer received` is how long the answer
/// to the submission took after its event. Medians and p99 over the runs, in ms (this
/// machine's one clock).
async fn roundtrip_hops(api: &Api, marks: Vec<(String, Utc, Utc, Utc)>) -> anyhow::Result<Value> {
    let ms = |a: Utc, b: Utc| (b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0;
    let mut hops: Vec<(String, Vec<f64>)> = Vec::new();
    let mut answer = Vec::new();
    for (id, sent, answered, seen) in marks {
        let mut points = vec![("request sent".to_string(), sent)];
        points.extend(run_events(api, &id).await?);
        if let Some((_, submitted)) = points.get(1) {
            answer.push(ms(*submitted, answered));
        }
        points.push(("read side shows it ended".to_string(), seen));
        for (i, pair) in points.windows(2).enumerate() {
            let name = format!("{} -> {}", pair[0].0, pair[1].0);
            match hops.get_mut(i) {
                None => hops.push((name, vec![ms(pair[0].1, pair[1].1)])),
                // A run whose events differ from the first's (none should) is left out of the rest.
                Some((n, _)) if *n != name => break,
                Some((_, v)) => v.push(ms(pair[0].1, pair[1].1)),
            }
        }
    }
    hops.push(("RunSubmitted -> answer received".into(), answer));
    Ok(hops
        .into_iter()
        .map(|(hop, v)| {
            let summary = latency_summary(v);
            json!({"hop": hop, "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"], "count": summary["count"]})
        })
        .collect())
}

/// Waits, 10 minutes at most, until an open-loop run (submitted at `seq`) has ended in the read
/// side.
async fn open_run_ended(api: &Api, id: &str, seq: u64) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(600), api.wait_ended(id, Some(seq)))
        .await
        .context("an open-loop run did not end in 10 minutes")??;
    Ok(())
}

/// Open-loop arrivals: `n` one-step runs submitted at `rate` per second on a fixed schedule,
/// whether or not earlier ones are done (a closed loop would hide queueing). Each submission
/// is followed by one read the gateway holds until the run has ended (`?wait`, after the read
/// side holds the submission), as a client awaiting its result would: submit → visible as
/// finished is when that answer arrives. Then, from each run's record: submit → its step
/// started, and submit → the run finished (the events' own times, this machine's clock); and
/// where the time goes, hop by hop, as for the round trip.
async fn openloop(api: Arc<Api>, rate: f64, n: usize, hold: bool) -> anyhow::Result<Value> {
    let name = format!("bench-open-{}", uuid::Uuid::now_v7().simple());
    let mut workflow = noop();
    workflow["name"] = json!(name);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (api, wf) = (api.clone(), workflow.clone());
        tasks.push(tokio::spawn(async move {
            let sent = chrono::Utc::now();
            let (id, seq) = api.submit(&wf).await?;
            let answered = chrono::Utc::now();
            // As a client awaiting its result would: one read, held until the run has ended.
            if hold {
                open_run_ended(&api, &id, seq).await?;
            }
            anyhow::Ok((id, seq, sent, answered, chrono::Utc::now()))
        }));
    }
    let offered = start.elapsed().as_secs_f64();
    let mut submitted = Vec::with_capacity(n);
    let mut visible = Vec::with_capacity(n);
    let mut marks = Vec::new();
    // Where the time goes, from at most 200 of the runs, spread over the whole arrival (a run
    // whose events differ from the first's, a step held long enough to be reported waiting,
    // leaves the later hops: with the tenant's step limit off, as `scripts/bench` runs, none do).
    let sample = n.div_ceil(200).max(1);
    for (i, t) in tasks.into_iter().enumerate() {
        let (id, seq, sent, answered, seen) = t.await??;
        if hold {
            visible.push((seen - sent).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            if i % sample == 0 {
                marks.push((id.clone(), sent, answered, seen));
            }
        }
        submitted.push((id, seq, sent));
    }
    let hops = roundtrip_hops(&api, marks).await?;
    let views: Vec<(chrono::DateTime<chrono::Utc>, Value)> = futures::stream::iter(submitted)
        .map(|(id, seq, sent)| {
            let api = api.clone();
            async move {
                if !hold {
                    open_run_ended(&api, &id, seq).await?;
                }
                api.run(&id).await.map(|v| (sent, v))
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let started: Vec<f64> =
        views.iter().filter_map(|(sent, v)| ms_between(*sent, &v["steps"][0]["started_at"])).collect();
    let finished: Vec<f64> = views.iter().filter_map(|(sent, v)| ms_between(*sent, &v["finished_at"])).collect();
    Ok(json!({
        "workload": "openloop", "rate": rate, "runs": n, "offered_seconds": offered, "held_reads": hold,
        "start_latency": latency_summary(started), "finish_latency": latency_summary(finished),
        "visible_latency": latency_summary(visible), "hops": hops,
    }))
}

/// Deletes the streams of Taskmesh namespace `ns`, as the mesh's own tests do.
async fn drop_namespace(nats: &str, ns: &str) -> anyhow::Result<()> {
    let settings =
        taskmesh_config::NatsSettings { url: nats.to_string(), namespace: ns.to_string(), ..Default::default() };
    taskmesh_bus::Bus::connect(&settings).await?.delete_streams().await?;
    Ok(())
}

/// What the parts sustain here without Taskmesh: JetStream publishes acknowledged one at a
/// time (what one event append costs) and pipelined (256 in flight), a pull consumer's rate
/// with an ack per message, and Postgres single-row commits and 1,000-row batched inserts.
async fn limits(nats: &str, postgres: &str, n: usize) -> anyhow::Result<Value> {
    use async_nats::jetstream::{self, consumer, stream};
    let client = async_nats::connect(nats).await?;
    let js = jetstream::new(client);
    let id = uuid::Uuid::now_v7().simple().to_string();
    let subject = format!("benchlimits.{id}");
    let mut s = js
        .create_stream(stream::Config {
            name: format!("BENCHLIMITS_{id}"),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let payload = bytes::Bytes::from(vec![b'x'; 512]);
    let one_by_one = 2_000.min(n);
    let t = Instant::now();
    for _ in 0..one_by_one {
        js.publish(subject.clone(), payload.clone()).await?.await?;
    }
    let sequential = one_by_one as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        inflight.push(js.publish(subject.clone(), payload.clone()).await?.into_future());
        if inflight.len() >= 256 {
            inflight.next().await.context("an ack")??;
        }
    }
    while let Some(ack) = inflight.next().await {
        ack?;
    }
    let pipelined = n as f64 / t.elapsed().as_secs_f64();
    let total = s.info().await?.state.messages as usize;
    let consumer = s
        .create_consumer(consumer::pull::Config { ack_policy: consumer::AckPolicy::Explicit, ..Default::default() })
        .await?;
    let t = Instant::now();
    let mut messages = consumer.stream().max_messages_per_batch(500).messages().await?;
    for _ in 0..total {
        let msg = messages.next().await.context("a message")?.map_err(|e| anyhow::anyhow!("{e}"))?;
        msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let consumed = total as f64 / t.elapsed().as_secs_f64();
    js.delete_stream(format!("BENCHLIMITS_{id}")).await?;

    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(postgres).await?;
    let table = format!("bench_limits_{id}");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE {table} (id bigint, payload text)"))).execute(&pool).await?;
    let insert = format!("INSERT INTO {table} (id, payload) VALUES ($1, $2)");
    let rows = 2_000.min(n);
    let text = "x".repeat(512);
    let t = Instant::now();
    for i in 0..rows {
        sqlx::query(sqlx::AssertSqlSafe(insert.clone())).bind(i as i64).bind(&text).execute(&pool).await?;
    }
    let commits = rows as f64 / t.elapsed().as_secs_f64();
    let batch = format!("INSERT INTO {table} (id, payload) SELECT * FROM UNNEST($1::bigint[], $2::text[])");
    let t = Instant::now();
    let batches = (n / 1_000).max(1);
    for b in 0..batches {
        let ids: Vec<i64> = (0..1_000).map(|i| (b * 1_000 + i) as i64).collect();
        let texts = vec![text.clone(); 1_000];
        sqlx::query(sqlx::AssertSqlSafe(batch.clone())).bind(&ids).bind(&texts).execute(&pool).await?;
    }
    let batched = (batches * 1_000) as f64 / t.elapsed().as_secs_f64();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(&pool).await?;
    Ok(json!({
        "workload": "limits", "payload_bytes": 512,
        "jetstream_publish_acked_one_by_one_per_second": sequential,
        "jetstream_publish_pipelined_per_second": pipelined,
        "jetstream_consume_acked_per_second": consumed,
        "postgres_single_row_commits_per_second": commits,
        "postgres_batched_rows_per_second": batched,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let key = match args.key.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?.trim().to_string(),
        None => args.key.clone(),
    };
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    let api = Arc::new(Api { http, url: args.url.trim_end_matches('/').to_string(), key });
    let report = match args.workload {
        Workload::DropNamespace => {
            let ns = args.namespace.as_deref().context("drop-namespace needs --namespace")?;
            drop_namespace(&args.nats, ns).await?;
            json!({"workload": "drop_namespace", "namespace": ns})
        }
        Workload::Throughput | Workload::Dag => {
            let (workflow, steps) = if matches!(args.workload, Workload::Dag) { (dag(), 12) } else { (noop(), 1) };
            let batch = usize::from(args.batch);
            let (submitted, done, failed, lag) = flood(api, workflow, args.n, args.concurrency, batch).await?;
            let workload = if steps == 1 { "throughput" } else { "dag" };
            json!({
                "workload": if batch == 1 { workload.to_string() } else { format!("{workload}_batch") },
                "batch": batch,
                "runs": args.n, "failed": failed,
                "submit_seconds": submitted, "total_seconds": done,
                "runs_per_second": args.n as f64 / done,
                "steps_per_second": (args.n * steps) as f64 / done,
                "projection_lag": latency_summary(lag),
            })
        }
        Workload::Roundtrip => {
            let mut ms = Vec::with_capacity(args.n);
            let mut marks = Vec::with_capacity(args.n);
            for _ in 0..args.n {
                let sent = chrono::Utc::now();
                let t = Instant::now();
                let (id, seq) = api.submit(&noop()).await?;
                let answered = chrono::Utc::now();
                if args.poll {
                    api.wait(&id).await?;
                } else {
                    // As docs/api.md tells a client to: one read, held until the read side
                    // holds the submission and then until the run has ended.
                    api.wait_ended(&id, Some(seq)).await?;
                }
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                marks.push((id, sent, answered, chrono::Utc::now()));
            }
            // Afterwards, so it costs the measured loop nothing: where each round trip's time
            // went, from its events' own times.
            let hops = roundtrip_hops(&api, marks).await?;
            let workload = if args.poll { "roundtrip_poll" } else { "roundtrip" };
            json!({"workload": workload, "latency": latency_summary(ms), "hops": hops})
        }
        Workload::Chain => {
            let t = Instant::now();
            let (id, _) = api.submit(&chain(args.n)).await?;
            let status = api.wait(&id).await?;
            let total = t.elapsed().as_secs_f64();
            json!({"workload": "chain", "hops": args.n, "status": status, "total_seconds": total, "ms_per_hop": total * 1000.0 / args.n as f64})
        }
        Workload::Api => {
            let (id, _) = api.submit(&noop()).await?;
            api.wait(&id).await?;
            let start = Instant::now();
            let answers: Vec<Option<f64>> = futures::stream::iter(0..args.n)
                .map(|_| {
                    let (api, id) = (api.clone(), id.clone());
                    async move {
                        let t = Instant::now();
                        api.timed_read(&id).await.map(|read| read.then(|| t.elapsed().as_secs_f64() * 1000.0))
                    }
                })
                .buffer_unordered(args.concurrency)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<anyhow::Result<_>>()?;
            let (ms, refused) = answered(answers);
            let rps = ms.len() as f64 / start.elapsed().as_secs_f64();
            json!({"workload": "api", "requests": args.n, "refused": refused, "concurrency": args.concurrency, "requests_per_second": rps, "latency": latency_summary(ms)})
        }
        Workload::ApiOpen => {
            let (id, _) = api.submit(&noop()).await?;
            api.wait(&id).await?;
            let interval = Duration::from_secs_f64(1.0 / args.rate);
            let start = tokio::time::Instant::now();
            let mut tasks = Vec::with_capacity(args.n);
            for i in 0..args.n {
                let due = start + interval * i as u32;
                tokio::time::sleep_until(due).await;
                let (api, id) = (api.clone(), id.clone());
                // From the scheduled time, not the send: a late send is the server's queue too.
                tasks.push(tokio::spawn(async move {
                    api.timed_read(&id).await.map(|read| read.then(|| due.elapsed().as_secs_f64() * 1000.0))
                }));
            }
            let mut answers = Vec::with_capacity(args.n);
            for t in tasks {
                answers.push(t.await??);
            }
            let (ms, refused) = answered(answers);
            let rps = ms.len() as f64 / start.elapsed().as_secs_f64();
            json!({"workload": "api_open", "rate": args.rate, "requests": args.n, "refused": refused, "requests_per_second": rps, "latency": latency_summary(ms)})
        }
        Workload::Openloop => openloop(api, args.rate, args.n, !args.no_wait).await?,
        Workload::Limits => limits(&args.nats, &args.postgres, args.n).await?,
    };
    println!("{report}");
    Ok(())
}
