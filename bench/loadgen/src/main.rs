//! `taskmesh-bench`: drives a running Taskmesh through its public REST API and reports
//! throughput and latency figures as JSON (stdout) and a table (stderr).
//!
//! Workloads: `throughput` (N one-step `noop` runs submitted concurrently, until all have
//! succeeded in the read side), `dag` (N runs of a 1 → 10 → 1 DAG), `roundtrip` (runs submitted
//! one after another, each awaited), `chain` (one run of a sequential chain: time per hop) and
//! `api` (`GET /v1/runs/{id}` under concurrent load). Medians over repetitions are the
//! caller's business (`scripts/bench` runs each several times).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key (or the path of a file holding it, prefixed with @).
    #[arg(long)]
    key: String,
    #[arg(value_enum)]
    workload: Workload,
    /// Runs (throughput, dag, roundtrip), hops (chain) or requests (api).
    #[arg(long, default_value_t = 500)]
    n: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Workload {
    Throughput,
    Dag,
    Roundtrip,
    Chain,
    Api,
}

struct Api {
    http: reqwest::Client,
    url: String,
    key: String,
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
        let body: Value = res.json().await?;
        Ok((body["id"].as_str().context("id")?.to_string(), body["seq"].as_u64().unwrap_or(0)))
    }

    async fn status(&self, id: &str) -> anyhow::Result<String> {
        let res = self.http.get(format!("{}/v1/runs/{id}", self.url)).bearer_auth(&self.key).send().await?;
        if res.status() == 404 {
            return Ok("unknown".into());
        }
        let body: Value = res.json().await?;
        Ok(body["status"].as_str().unwrap_or("").to_string())
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
            let page: Value = self.http.get(url).bearer_auth(&self.key).send().await?.json().await?;
            total += page["items"].as_array().map_or(0, Vec::len);
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return Ok(total),
            }
        }
    }

    /// Polls until the run has ended; returns its status.
    async fn wait(&self, id: &str) -> anyhow::Result<String> {
        loop {
            let s = self.status(id).await?;
            if ["succeeded", "failed", "cancelled", "timed_out"].contains(&s.as_str()) {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
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

/// Submits `n` runs of `workflow` (renamed uniquely) with `concurrency` in flight, then waits
/// until all have ended, counting them through the list endpoint every 50 ms (polling each run
/// would load the machine more than Taskmesh does); returns (seconds to submit, seconds until
/// all ended, failures).
async fn flood(api: Arc<Api>, mut workflow: Value, n: usize, concurrency: usize) -> anyhow::Result<(f64, f64, usize)> {
    let name = format!("bench-{}", uuid::Uuid::now_v7().simple());
    workflow["name"] = json!(name);
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|_| {
            let (api, wf) = (api.clone(), workflow.clone());
            async move { api.submit(&wf).await.map(|_| ()) }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    let submitted = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ok = api.count(&name, "succeeded").await?;
        let failed = api.count(&name, "failed").await?;
        if ok + failed >= n {
            return Ok((submitted, start.elapsed().as_secs_f64(), failed));
        }
        if Instant::now() > deadline {
            bail!("only {} of {n} runs ended in 10 minutes", ok + failed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
        Workload::Throughput | Workload::Dag => {
            let (workflow, steps) = if matches!(args.workload, Workload::Dag) { (dag(), 12) } else { (noop(), 1) };
            let (submitted, done, failed) = flood(api, workflow, args.n, args.concurrency).await?;
            json!({
                "workload": if steps == 1 { "throughput" } else { "dag" },
                "runs": args.n, "failed": failed,
                "submit_seconds": submitted, "total_seconds": done,
                "runs_per_second": args.n as f64 / done,
                "steps_per_second": (args.n * steps) as f64 / done,
            })
        }
        Workload::Roundtrip => {
            let mut ms = Vec::with_capacity(args.n);
            for _ in 0..args.n {
                let t = Instant::now();
                let (id, _) = api.submit(&noop()).await?;
                api.wait(&id).await?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            json!({"workload": "roundtrip", "latency": latency_summary(ms)})
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
            let ms: Vec<f64> = futures::stream::iter(0..args.n)
                .map(|_| {
                    let (api, id) = (api.clone(), id.clone());
                    async move {
                        let t = Instant::now();
                        api.status(&id).await.map(|_| t.elapsed().as_secs_f64() * 1000.0)
                    }
                })
                .buffer_unordered(args.concurrency)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<anyhow::Result<_>>()?;
            let rps = args.n as f64 / start.elapsed().as_secs_f64();
            json!({"workload": "api", "requests": args.n, "concurrency": args.concurrency, "requests_per_second": rps, "latency": latency_summary(ms)})
        }
    };
    println!("{report}");
    Ok(())
}
