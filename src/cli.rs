//! The `taskmesh` client commands: submit and follow runs, list and manage them, read logs.
//!
//! The server and key come from `--url`/`--key`, else `TASKMESH_URL`/`TASKMESH_API_KEY`, else
//! `http://127.0.0.1:8080` and the development key in `.taskmesh/api-key`. `--output json`
//! prints the API's JSON for scripts; exit codes reflect the run: 0 succeeded, 1 anything else.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Where and how to talk to the API.
#[derive(clap::Args, Clone)]
pub struct Connection {
    /// Gateway URL.
    #[arg(long, global = true, env = "TASKMESH_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key; by default the one in .taskmesh/api-key.
    #[arg(long, global = true, env = "TASKMESH_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// `text` for people, `json` for scripts.
    #[arg(long, global = true, default_value = "text")]
    pub output: String,
}

#[derive(clap::Subcommand)]
pub enum Runs {
    /// List runs, newest first.
    Ls {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show a run and its steps.
    Get { id: String },
    /// Cancel a run.
    Cancel { id: String },
    /// Rerun an ended run from its failed steps (or from a step).
    Rerun {
        id: String,
        #[arg(long, default_value = "failed")]
        from: String,
    },
}

struct Client {
    http: reqwest::Client,
    url: String,
    key: String,
    json: bool,
}

impl Client {
    fn new(c: &Connection) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = match &c.key {
            Some(k) => k.clone(),
            None => std::fs::read_to_string(".taskmesh/api-key")
                .map(|k| k.trim().to_string())
                .context("no API key: pass --key, set TASKMESH_API_KEY, or run where .taskmesh/api-key is")?,
        };
        Ok(Self {
            http: reqwest::Client::new(),
            url: c.url.trim_end_matches('/').to_string(),
            key,
            json: c.output == "json",
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.with_context(|| format!("no answer from {}", self.url))?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let detail = body["detail"].as_str().unwrap_or("");
            bail!("{status}: {detail}");
        }
        Ok(body)
    }
}

fn exit_code(status: &str) -> i32 {
    if status == "succeeded" { 0 } else { 1 }
}

/// `taskmesh run FILE`: submits a workflow; with `--wait` shows progress until it ends, with
/// `--follow` also every step's output as it comes. Returns the process exit code.
pub async fn run(
    conn: &Connection,
    file: PathBuf,
    inputs: Vec<String>,
    wait: bool,
    follow: bool,
) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let workflow: Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("{} is not YAML or JSON", file.display()))?;
    let mut input_map = BTreeMap::new();
    for kv in inputs {
        let (k, v) = kv.split_once('=').with_context(|| format!("--input {kv}: expected key=value"))?;
        // Numbers, booleans and JSON pass as such; anything else is a string.
        input_map.insert(k.to_string(), serde_json::from_str(v).unwrap_or(Value::String(v.to_string())));
    }
    let accepted = client
        .call(reqwest::Method::POST, "/v1/runs", Some(json!({"workflow": workflow, "inputs": input_map})))
        .await?;
    let id = accepted["id"].as_str().context("the answer has no run id")?.to_string();
    if !(wait || follow) {
        if client.json {
            println!("{accepted}");
        } else {
            println!("{id}");
        }
        return Ok(0);
    }
    if !client.json {
        eprintln!("run {id} submitted");
    }
    let mut shown: HashMap<String, String> = HashMap::new();
    let mut log_after: HashMap<String, u64> = HashMap::new();
    loop {
        let run = client.call(reqwest::Method::GET, &format!("/v1/runs/{id}"), None).await.unwrap_or(Value::Null);
        if let Some(steps) = run["steps"].as_array() {
            for step in steps {
                let sid = step["id"].as_str().unwrap_or("?").to_string();
                let status = step["status"].as_str().unwrap_or("").to_string();
                if follow && status != "queued" {
                    let after = log_after.get(&sid).copied().unwrap_or(0);
                    let page = client
                        .call(
                            reqwest::Method::GET,
                            &format!("/v1/runs/{id}/steps/{sid}/logs?after={after}&limit=1000"),
                            None,
                        )
                        .await
                        .unwrap_or(Value::Null);
                    for line in page["lines"].as_array().into_iter().flatten() {
                        if !client.json {
                            println!("[{sid}] {}", line["line"].as_str().unwrap_or(""));
                        }
                    }
                    if let Some(next) = page["next"].as_u64() {
                        log_after.insert(sid.clone(), next);
                    }
                }
                if shown.get(&sid) != Some(&status) && !client.json {
                    let mark = match status.as_str() {
                        "succeeded" => "✓",
                        "failed" | "timed_out" => "✗",
                        "running" => "…",
                        "skipped" | "cancelled" => "-",
                        _ => " ",
                    };
                    if status != "queued" {
                        eprintln!("{mark} {sid} {status}");
                    }
                }
                shown.insert(sid, status);
            }
        }
        let status = run["status"].as_str().unwrap_or("");
        if ["succeeded", "failed", "cancelled", "timed_out"].contains(&status) {
            if client.json {
                println!("{run}");
            } else {
                eprintln!("run {id} {status}");
            }
            return Ok(exit_code(status));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `taskmesh runs …`.
pub async fn runs(conn: &Connection, cmd: Runs) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    match cmd {
        Runs::Ls { status, limit } => {
            let mut path = format!("/v1/runs?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={s}"));
            }
            let page = client.call(reqwest::Method::GET, &path, None).await?;
            if client.json {
                println!("{page}");
            } else {
                println!("{:<38} {:<24} {:<10} CREATED", "ID", "WORKFLOW", "STATUS");
                for r in page["items"].as_array().into_iter().flatten() {
                    println!(
                        "{:<38} {:<24} {:<10} {}",
                        r["id"].as_str().unwrap_or(""),
                        r["workflow"].as_str().unwrap_or(""),
                        r["status"].as_str().unwrap_or(""),
                        r["created_at"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(0)
        }
        Runs::Get { id } => {
            let run = client.call(reqwest::Method::GET, &format!("/v1/runs/{id}"), None).await?;
            if client.json {
                println!("{run}");
            } else {
                println!(
                    "run {} ({}): {}",
                    run["id"].as_str().unwrap_or(""),
                    run["workflow"].as_str().unwrap_or(""),
                    run["status"].as_str().unwrap_or("")
                );
                for s in run["steps"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<24} {:<10} attempts {}",
                        s["id"].as_str().unwrap_or(""),
                        s["status"].as_str().unwrap_or(""),
                        s["attempts"]
                    );
                }
            }
            Ok(exit_code(run["status"].as_str().unwrap_or("")))
        }
        Runs::Cancel { id } => {
            let done = client.call(reqwest::Method::POST, &format!("/v1/runs/{id}/cancel"), Some(json!({}))).await?;
            println!("{}", if client.json { done.to_string() } else { format!("cancelling {id}") });
            Ok(0)
        }
        Runs::Rerun { id, from } => {
            let accepted = client
                .call(reqwest::Method::POST, &format!("/v1/runs/{id}/rerun"), Some(json!({"from": from})))
                .await?;
            println!(
                "{}",
                if client.json { accepted.to_string() } else { accepted["id"].as_str().unwrap_or("").to_string() }
            );
            Ok(0)
        }
    }
}

/// `taskmesh logs RUN STEP [-f]`.
pub async fn logs(conn: &Connection, run: String, step: String, follow: bool) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    let mut after = 0u64;
    loop {
        let page = client
            .call(reqwest::Method::GET, &format!("/v1/runs/{run}/steps/{step}/logs?after={after}&limit=1000"), None)
            .await?;
        for line in page["lines"].as_array().into_iter().flatten() {
            if client.json {
                println!("{line}");
            } else {
                println!("{}", line["line"].as_str().unwrap_or(""));
            }
        }
        if let Some(next) = page["next"].as_u64() {
            after = next;
            continue;
        }
        if !follow {
            return Ok(0);
        }
        let status = client.call(reqwest::Method::GET, &format!("/v1/runs/{run}"), None).await?;
        let ended = status["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|x| x["id"] == step.as_str()))
            .is_some_and(|s| !matches!(s["status"].as_str(), Some("queued" | "running")));
        if ended {
            // One last page: every line is out before a step ends.
            let last = client
                .call(reqwest::Method::GET, &format!("/v1/runs/{run}/steps/{step}/logs?after={after}&limit=1000"), None)
                .await?;
            for line in last["lines"].as_array().into_iter().flatten() {
                println!("{}", line["line"].as_str().unwrap_or(""));
            }
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
