//! The `taskmesh` client commands: submit and follow runs, list and manage them, read logs; store
//! and read workflows; manage schedules and secrets.
//!
//! The server and key come from `--url`/`--key`, else `TASKMESH_URL`/`TASKMESH_API_KEY`, else
//! the chosen profile of the profile file, else `http://127.0.0.1:8080` and the development key in
//! `.taskmesh/api-key`. The profile file is `$TASKMESH_PROFILE_FILE`, else
//! `$XDG_CONFIG_HOME/taskmesh/config.toml` (by default `~/.config/taskmesh/config.toml`):
//!
//! ```toml
//! default = "local"
//! [profiles.local]
//! url = "http://127.0.0.1:8080"
//! key = "tm_..."
//! ```
//!
//! `--profile NAME` (or `TASKMESH_PROFILE`) picks a profile, else the file's `default` does.
//! `--output json` prints the API's JSON for scripts; exit codes reflect the run: 0 succeeded,
//! 1 anything else.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use eventsource_stream::Eventsource;
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};

/// The gateway URL when nothing else names one.
const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// The development key `taskmesh up` writes, relative to the working directory.
const DEFAULT_KEY_FILE: &str = ".taskmesh/api-key";

/// Where and how to talk to the API.
#[derive(clap::Args, Clone)]
pub struct Connection {
    /// Gateway URL; else TASKMESH_URL, the profile's, or http://127.0.0.1:8080.
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// API key; else TASKMESH_API_KEY, the profile's, or the one in .taskmesh/api-key.
    #[arg(long, global = true)]
    pub key: Option<String>,
    /// A profile of the profile file; else TASKMESH_PROFILE, or the file's `default`.
    #[arg(long, global = true)]
    pub profile: Option<String>,
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
        /// Only runs of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only runs with this label, `key=value`.
        #[arg(long)]
        label: Option<String>,
        /// Only runs started this way: api, schedule, rerun, webhook or event.
        #[arg(long)]
        trigger: Option<String>,
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
        /// Run the rerun steps with `cache:` rather than reuse kept outcomes.
        #[arg(long)]
        refresh_cache: bool,
    },
    /// Report a push-started run's state on its commit again (after the forge refused it).
    CommitStatus { id: String },
}

#[derive(clap::Subcommand)]
pub enum Workflows {
    /// Store a workflow file (YAML or JSON) as the next version of the workflow it names.
    Push { file: PathBuf },
    /// List stored workflows, each at its latest version.
    Ls,
    /// Print a stored workflow's definition, as YAML (JSON with --output json).
    Get {
        name: String,
        /// This version rather than the latest.
        #[arg(long)]
        version: Option<u32>,
    },
}

/// What `schedules create` and `schedules set` both take.
#[derive(clap::Args)]
pub struct ScheduleOptions {
    /// IANA time zone the expression is read in (UTC unless given).
    #[arg(long)]
    timezone: Option<String>,
    /// An input, `key=value` (repeatable). Changing a schedule, the inputs not named are kept
    /// and `key=null` removes one.
    #[arg(long = "input", short = 'i')]
    inputs: Vec<String>,
    /// While the previous run goes on: skip (the default), allow or cancel_previous.
    #[arg(long)]
    overlap: Option<String>,
    /// Ticks missed while no scheduler ran: none (the default), last or all.
    #[arg(long)]
    catch_up: Option<String>,
}

impl ScheduleOptions {
    /// Puts the options given into a schedule's spec (or a patch of it).
    fn into_spec(self, spec: &mut serde_json::Map<String, Value>) -> anyhow::Result<()> {
        for (field, value) in [("timezone", self.timezone), ("overlap", self.overlap), ("catch_up", self.catch_up)] {
            if let Some(value) = value {
                spec.insert(field.into(), json!(value));
            }
        }
        if !self.inputs.is_empty() {
            spec.insert("inputs".into(), json!(parse_inputs(self.inputs)?));
        }
        Ok(())
    }
}

#[derive(clap::Subcommand)]
pub enum Schedules {
    /// List schedules.
    Ls,
    /// Run a stored workflow on a cron expression; prints the schedule's id.
    Create {
        /// 5 fields, or 6 with seconds first.
        #[arg(long)]
        cron: String,
        /// A stored workflow: `name` (its latest version when a tick fires) or `name@version`.
        #[arg(long)]
        workflow: String,
        #[command(flatten)]
        options: ScheduleOptions,
    },
    /// Change a schedule in place (what is not given is kept); it keeps its id and its runs.
    Set {
        id: String,
        /// Change it only if it is still at this version (`VERSION` in `schedules ls`): refused
        /// if anything changed it since, a tick or a pause too.
        #[arg(long)]
        if_version: Option<u64>,
        /// A new cron expression.
        #[arg(long)]
        cron: Option<String>,
        /// Another stored workflow to run.
        #[arg(long)]
        workflow: Option<String>,
        #[command(flatten)]
        options: ScheduleOptions,
    },
    /// Start a run of the schedule's workflow now, paused or not; prints the run's id.
    Trigger { id: String },
    /// Run the schedule's past ticks in a range (at most 100); a tick that had its run is not
    /// run again. Prints each tick, its run and whether it started now.
    Backfill {
        id: String,
        /// The first tick's earliest time, RFC 3339 (e.g. 2026-12-01T00:00:00Z).
        #[arg(long)]
        from: String,
        /// The last tick's latest time, RFC 3339; not in the future.
        #[arg(long)]
        to: String,
    },
    /// Pause a schedule: no tick fires until it is resumed.
    Pause { id: String },
    /// Resume a paused schedule from its next tick.
    Resume { id: String },
    /// Delete a schedule: no tick fires after it (the runs it started are kept).
    Rm {
        id: String,
        /// Delete it only if it is still at this version (`VERSION` in `schedules ls`).
        #[arg(long)]
        if_version: Option<u64>,
    },
}

#[derive(clap::Subcommand)]
pub enum Secrets {
    /// Set a secret from --value, --from-file, or else standard input (one trailing newline
    /// dropped). The value is never printed.
    Set {
        name: String,
        /// The value (visible to other local users in the process list; prefer stdin).
        #[arg(long, conflicts_with = "from_file")]
        value: Option<String>,
        /// Read the value from this file, as it is.
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// List secret names (never values).
    Ls,
    /// Remove a secret.
    Rm { name: String },
}

#[derive(clap::Subcommand)]
pub enum Endpoints {
    /// List the tenant's webhook endpoints (never their secrets).
    Ls,
    /// Give an endpoint a new signing secret, printed once; the one it replaces signs too for
    /// --previous-valid-seconds (a day by default; 0: it stops at once, as for a leaked one).
    RotateSecret {
        id: String,
        #[arg(long)]
        previous_valid_seconds: Option<u64>,
    },
    /// Enable an endpoint that was disabled after failing for too long.
    Enable { id: String },
}

#[derive(clap::Subcommand)]
pub enum Connections {
    /// List the tenant's repository connections (never their secrets or tokens).
    Ls,
    /// Give a connection a new status token (before the old one expires, say) from
    /// --from-file, or else standard input (one trailing newline dropped). Never printed.
    SetToken {
        id: String,
        /// Read the token from this file (trailing newlines dropped).
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// Set it only if the connection is still at this version (`VERSION` in `connections
        /// ls`): refused if anything changed it since.
        #[arg(long)]
        if_version: Option<u64>,
    },
}

#[derive(clap::Subcommand)]
pub enum Cache {
    /// Forget every outcome the tenant's `cache:` steps kept: they run again next time (to
    /// replace only a run's, submit it with `taskmesh run --refresh-cache`).
    Purge,
}

#[derive(clap::Subcommand)]
pub enum Profiles {
    /// Show the URL the client commands use, the key's first characters, and where each
    /// comes from.
    Show,
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
        let target = Target::resolve(c, false)?;
        let key = target.key.context(
            "no API key: pass --key, set TASKMESH_API_KEY, choose a profile with a key, or run where .taskmesh/api-key is",
        )?;
        Ok(Self {
            http: reqwest::Client::new(),
            url: target.url.trim_end_matches('/').to_string(),
            key,
            json: c.output == "json",
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.send(method, path, body, &[]).await
    }

    /// [`Client::call`], changing the resource only if it is still at `version` (`If-Match`;
    /// the gateway answers `412` when anything has changed it since).
    async fn call_at(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        version: Option<u64>,
    ) -> anyhow::Result<Value> {
        let tag = version.map(|v| (reqwest::header::IF_MATCH.as_str(), format!("\"{v}\"")));
        self.send(method, path, body, tag.as_slice()).await
    }

    /// Every item of the list at `path`, page after page (as `{"items": […]}`).
    async fn list_all(&self, path: &str) -> anyhow::Result<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_path = format!("{path}{}", query(&[("limit", Some("200")), ("cursor", cursor.as_deref())]));
            let mut page = self.call(reqwest::Method::GET, &page_path, None).await?;
            items.extend(page["items"].as_array_mut().map(std::mem::take).unwrap_or_default());
            cursor = match page["next_cursor"].take() {
                Value::Null => return Ok(json!({ "items": items })),
                Value::String(c) => Some(c),
                other => Some(other.to_string()),
            };
        }
    }

    /// [`Client::call`], answered once the read side shows the log up to `min_seq` (the
    /// gateway waits a few seconds for it: `Taskmesh-Min-Seq`).
    async fn call_after(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        min_seq: Option<u64>,
    ) -> anyhow::Result<Value> {
        let seq = min_seq.map(|seq| (taskmesh_gateway::MIN_SEQ_HEADER, seq.to_string()));
        self.send(method, path, body, seq.as_slice()).await
    }

    /// Sends a request with `headers`; the answer's JSON, or its problem as the error.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        for (name, value) in headers {
            req = req.header(*name, value);
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

/// A Server-Sent Events stream the gateway answers.
type Events = std::pin::Pin<
    Box<
        dyn futures::Stream<
                Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
            > + Send,
    >,
>;

/// Opens the event stream at `path`; none if the gateway answers anything but one.
async fn open_events(client: &Client, path: &str) -> Option<Events> {
    let res = client.http.get(format!("{}{path}", client.url)).bearer_auth(&client.key).send().await.ok()?;
    let is_events = res
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if !(res.status().is_success() && is_events) {
        return None;
    }
    // The bytes, until none come for SILENT_FOR: keep-alives (comments, which the parser
    // drops) count, so only a dead connection ends a quiet stream.
    let bytes = futures::stream::unfold(Box::pin(res.bytes_stream()), |mut bytes| async move {
        match tokio::time::timeout(SILENT_FOR, bytes.next()).await {
            Ok(Some(chunk)) => Some((chunk, bytes)),
            _ => None,
        }
    });
    Some(Box::pin(bytes.eventsource()))
}

/// The log sequence an event's `id` (`{seq}` or `{seq}.{part}`) names.
fn event_seq(event: &eventsource_stream::Event) -> Option<u64> {
    event.id.split('.').next().and_then(|s| s.parse().ok())
}

/// A run's event stream (`GET /v1/runs/{id}/events`), read only to learn that something
/// happened and up to which log sequence.
struct RunEvents {
    events: Events,
}

/// What waiting on [`RunEvents`] found.
enum Woken {
    /// Events up to this log sequence arrived.
    Event(u64),
    /// Nothing within the time given.
    Quiet,
    /// The stream ended (after the run's end) or failed.
    Closed,
}

impl RunEvents {
    async fn open(client: &Client, run: &str) -> Option<Self> {
        open_events(client, &format!("/v1/runs/{run}/events")).await.map(|events| Self { events })
    }

    /// Waits up to `wait` for the next events; says the highest sequence among those that
    /// have arrived.
    async fn next(&mut self, wait: Duration) -> Woken {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let event = match tokio::time::timeout_at(until, self.events.next()).await {
                Err(_) => return Woken::Quiet,
                Ok(Some(Ok(event))) => event,
                Ok(_) => return Woken::Closed,
            };
            let Some(mut seen) = event_seq(&event) else { continue };
            while let Some(Some(Ok(more))) = self.events.next().now_or_never() {
                seen = seen.max(event_seq(&more).unwrap_or(0));
            }
            return Woken::Event(seen);
        }
    }
}

/// Prints every line of a step's log after sequence `after`, a page at a time, with `show`,
/// moving `after` on with each page (so a page that fails leaves it after the last one shown).
async fn print_pages(
    client: &Client,
    run: &str,
    step: &str,
    after: &mut u64,
    show: impl Fn(&Value),
) -> anyhow::Result<()> {
    loop {
        let path = format!("/v1/runs/{run}/steps/{step}/logs?after={after}&limit=1000");
        let page = client.call(reqwest::Method::GET, &path, None).await?;
        page["lines"].as_array().into_iter().flatten().for_each(&show);
        match page["next"].as_u64() {
            Some(next) => *after = next,
            None => return Ok(()),
        }
    }
}

/// Whether the step has ended (is neither queued nor running).
async fn step_ended(client: &Client, run: &str, step: &str) -> anyhow::Result<bool> {
    let view = client.call(reqwest::Method::GET, &format!("/v1/runs/{run}"), None).await?;
    Ok(view["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["id"] == step))
        .is_some_and(|s| !matches!(s["status"].as_str(), Some("queued" | "running"))))
}

/// The longest an event stream may send no bytes at all: the gateway sends a keep-alive every
/// 15 s, so a connection quiet for longer is dead (the host gone without closing it, say).
const SILENT_FOR: Duration = Duration::from_secs(45);

/// How following a step's log stream ended.
enum Followed {
    /// The gateway said the step has ended, every line out.
    Ended,
    /// The stream broke off.
    Broken,
    /// No stream could be had.
    Unavailable,
}

/// Prints a step's log lines with `show` as the gateway streams them (`follow=true`), from
/// after `after`, moving `after` on with each.
async fn follow_log(client: &Client, run: &str, step: &str, after: &mut u64, show: impl Fn(&Value)) -> Followed {
    let path = format!("/v1/runs/{run}/steps/{step}/logs?follow=true&after={after}");
    let Some(mut events) = open_events(client, &path).await else { return Followed::Unavailable };
    while let Some(event) = events.next().await {
        let Ok(event) = event else { return Followed::Broken };
        match event.event.as_str() {
            "end" => return Followed::Ended,
            "line" => {
                let Ok(line) = serde_json::from_str::<Value>(&event.data) else { continue };
                show(&line);
                *after = line["seq"].as_u64().unwrap_or(*after);
            }
            _ => {}
        }
    }
    Followed::Broken
}

/// The server and key the client commands use, and where each came from.
struct Target {
    url: String,
    url_from: String,
    key: Option<String>,
    key_from: String,
    /// The chosen profile and what chose it.
    profile: Option<(String, String)>,
    /// The profile file looked at, and whether it exists.
    file: Option<(PathBuf, bool)>,
}

impl Target {
    /// Each of the URL and the key: the flag, else the environment, else the chosen profile, else
    /// the default. The profile file is read only when it can matter (a profile is named, or the
    /// URL or the key is not given otherwise), or when `always`.
    fn resolve(c: &Connection, always: bool) -> anyhow::Result<Self> {
        let url = given(c.url.as_deref(), "--url", "TASKMESH_URL");
        let key = given(c.key.as_deref(), "--key", "TASKMESH_API_KEY");
        let named = given(c.profile.as_deref(), "--profile", "TASKMESH_PROFILE");
        let mut file: Option<(PathBuf, bool)> = None;
        let mut chosen: Option<(String, String, ProfileSettings)> = None;
        if always || named.is_some() || url.is_none() || key.is_none() {
            let location = profile_file();
            let loaded: Option<(PathBuf, ProfileFile)> = match &location {
                Some((path, must_exist)) => read_profiles(path, *must_exist)?.map(|f| (path.clone(), f)),
                None => None,
            };
            file = location.map(|(path, _)| {
                let exists = loaded.is_some();
                (path, exists)
            });
            let pick = named.or_else(|| {
                loaded.as_ref().and_then(|(_, f)| f.default.clone()).map(|d| (d, "the file's default".to_string()))
            });
            if let Some((name, why)) = pick {
                let Some((path, profiles)) = &loaded else {
                    match &file {
                        Some((path, _)) => {
                            bail!("profile '{name}' (from {why}): there is no profile file {}", path.display())
                        }
                        None => bail!("profile '{name}' (from {why}): no profile file; set TASKMESH_PROFILE_FILE"),
                    }
                };
                let Some(settings) = profiles.profiles.get(&name) else {
                    bail!("profile '{name}' (from {why}) is not defined in {}", path.display());
                };
                chosen = Some((name, why, settings.clone()));
            }
        }
        let profile_url = chosen.as_ref().and_then(|(n, _, p)| p.url.clone().map(|u| (u, format!("profile '{n}'"))));
        // A profile's key goes only to the profile's server: never to a URL given otherwise.
        let same_server = match (&url, &profile_url) {
            (None, _) => true,
            (Some((given, _)), Some((theirs, _))) => given.trim_end_matches('/') == theirs.trim_end_matches('/'),
            (Some(_), None) => false,
        };
        let profile_key = chosen
            .as_ref()
            .filter(|_| same_server)
            .and_then(|(n, _, p)| p.key.clone().map(|k| (k, format!("profile '{n}'"))));
        let (url, url_from) =
            url.or(profile_url).unwrap_or_else(|| (DEFAULT_URL.to_string(), "the default".to_string()));
        let (key, key_from) = match key.or(profile_key) {
            Some((k, from)) => (Some(k), from),
            None => match std::fs::read_to_string(DEFAULT_KEY_FILE) {
                Ok(k) => (Some(k.trim().to_string()), DEFAULT_KEY_FILE.to_string()),
                Err(_) => (None, "nowhere".to_string()),
            },
        };
        Ok(Self { url, url_from, key, key_from, profile: chosen.map(|(n, why, _)| (n, why)), file })
    }
}

/// A flag's value and its name, else the environment variable's value and its name.
fn given(flag: Option<&str>, flag_name: &str, var: &str) -> Option<(String, String)> {
    match flag {
        Some(v) => Some((v.to_string(), flag_name.to_string())),
        None => env_var(var).map(|v| (v, var.to_string())),
    }
}

/// An environment variable, if set and not empty.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The profile file, and whether it must exist: `$TASKMESH_PROFILE_FILE` (it must), else
/// `$XDG_CONFIG_HOME/taskmesh/config.toml`, else `~/.config/taskmesh/config.toml`.
fn profile_file() -> Option<(PathBuf, bool)> {
    if let Some(path) = env_var("TASKMESH_PROFILE_FILE") {
        return Some((PathBuf::from(path), true));
    }
    let config = env_var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| env_var("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some((config.join("taskmesh").join("config.toml"), false))
}

/// What the profile file holds.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    default: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, ProfileSettings>,
}

/// One profile.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileSettings {
    url: Option<String>,
    key: Option<String>,
}

/// Reads and parses the profile file (TOML); `None` if it does not exist and need not.
fn read_profiles(path: &Path, must_exist: bool) -> anyhow::Result<Option<ProfileFile>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => return Ok(None),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("reading the profile file {}", path.display())));
        }
    };
    match toml::from_str::<ProfileFile>(&text) {
        Ok(file) => Ok(Some(file)),
        Err(e) => bail!("the profile file {} is malformed: {e}", path.display()),
    }
}

/// The first characters of a key, then `…`: ten of them, or half of a short key; never all.
fn key_hint(key: &str) -> String {
    let shown = (key.chars().count() / 2).min(10);
    format!("{}…", key.chars().take(shown).collect::<String>())
}

/// Percent-encodes `s` for a URL path segment or query value: all but `A-Za-z0-9-._~`.
fn enc(s: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// A listed resource's `version` (what `--if-version` takes) for a table: `-` for one last
/// changed before versions were kept (it has one after its next change).
fn version_column(version: &Value) -> String {
    version.as_u64().map_or_else(|| "-".into(), |v| v.to_string())
}

/// `?k=v&…` of the pairs that have a value (encoded), or nothing.
fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs.iter().filter_map(|&(k, v)| v.map(|v| format!("{k}={}", enc(v)))).collect();
    if parts.is_empty() { String::new() } else { format!("?{}", parts.join("&")) }
}

/// A workflow file, YAML or JSON.
fn read_workflow(file: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_yaml_ng::from_str(&text).with_context(|| format!("{} is not YAML or JSON", file.display()))
}

/// `--input key=value`s: numbers, booleans and JSON pass as such; anything else is a string.
fn parse_inputs(pairs: Vec<String>) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for kv in pairs {
        let (k, v) = kv.split_once('=').with_context(|| format!("--input {kv}: expected key=value"))?;
        out.insert(k.to_string(), serde_json::from_str(v).unwrap_or(Value::String(v.to_string())));
    }
    Ok(out)
}

/// `--label key=value`s.
fn parse_labels(pairs: Vec<String>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for kv in pairs {
        let (k, v) = kv.split_once('=').with_context(|| format!("--label {kv}: expected key=value"))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
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
    labels: Vec<String>,
    refresh_cache: bool,
    wait: bool,
    follow: bool,
) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    let input_map = parse_inputs(inputs)?;
    let labels = parse_labels(labels)?;
    let workflow = read_workflow(&file)?;
    let mut body = json!({"workflow": workflow, "inputs": input_map});
    if !labels.is_empty() {
        body["labels"] = json!(labels);
    }
    if refresh_cache {
        body["refresh_cache"] = json!(true);
    }
    let accepted = client.call(reqwest::Method::POST, "/v1/runs", Some(body)).await?;
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
    // The run is read again whenever its event stream says something happened (asking for the
    // read side to show the log up to that event), or after a pause; by polling where the
    // stream cannot be had.
    let mut events: Option<RunEvents> = None;
    let mut opened = false;
    let mut min_seq = accepted["seq"].as_u64();
    loop {
        let path = format!("/v1/runs/{id}");
        let run = client.call_after(reqwest::Method::GET, &path, None, min_seq).await.unwrap_or(Value::Null);
        if let Some(steps) = run["steps"].as_array() {
            for step in steps {
                let sid = step["id"].as_str().unwrap_or("?").to_string();
                let status = step["status"].as_str().unwrap_or("").to_string();
                if follow && status != "queued" {
                    // Every line there is, however many: those of a step that has ended are
                    // all out, and the run may be over now.
                    let show = |line: &Value| {
                        if !client.json {
                            println!("[{sid}] {}", line["line"].as_str().unwrap_or(""));
                        }
                    };
                    let after = log_after.entry(sid.clone()).or_insert(0);
                    // One that fails is read again, from after what was shown, next time round.
                    let _ = print_pages(&client, &id, &sid, after, show).await;
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
                        // Why it was skipped or cancelled, or where its outcome came from.
                        match step["reason"].as_str() {
                            Some(reason) => eprintln!("{mark} {sid} {status} ({reason})"),
                            None => eprintln!("{mark} {sid} {status}"),
                        }
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
        if !opened && !run.is_null() {
            opened = true;
            events = RunEvents::open(&client, &id).await;
        }
        // Following logs, look often: lines are not events.
        let pause = if follow { Duration::from_millis(200) } else { Duration::from_secs(2) };
        match events.as_mut() {
            Some(stream) => match stream.next(pause).await {
                Woken::Event(seq) => min_seq = min_seq.max(Some(seq)),
                Woken::Quiet => {}
                Woken::Closed => {
                    events = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// `taskmesh runs …`.
pub async fn runs(conn: &Connection, cmd: Runs) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    match cmd {
        Runs::Ls { status, workflow, label, trigger, limit } => {
            if label.as_deref().is_some_and(|l| !l.contains('=')) {
                bail!("--label: expected key=value");
            }
            let limit = limit.to_string();
            let path = format!(
                "/v1/runs{}",
                query(&[
                    ("limit", Some(limit.as_str())),
                    ("status", status.as_deref()),
                    ("workflow", workflow.as_deref()),
                    ("label", label.as_deref()),
                    ("trigger", trigger.as_deref()),
                ])
            );
            let page = client.call(reqwest::Method::GET, &path, None).await?;
            if client.json {
                println!("{page}");
            } else {
                println!("{:<38} {:<24} {:<10} {:<9} CREATED", "ID", "WORKFLOW", "STATUS", "TRIGGER");
                for r in page["items"].as_array().into_iter().flatten() {
                    println!(
                        "{:<38} {:<24} {:<10} {:<9} {}",
                        r["id"].as_str().unwrap_or(""),
                        r["workflow"].as_str().unwrap_or(""),
                        r["status"].as_str().unwrap_or(""),
                        r["trigger"].as_str().unwrap_or(""),
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
                    let reason = s["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default();
                    println!(
                        "  {:<24} {:<10} attempts {}{reason}",
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
        Runs::CommitStatus { id } => {
            let queued = client.call(reqwest::Method::POST, &format!("/v1/runs/{id}/commit-status"), None).await?;
            if client.json {
                println!("{queued}");
            } else {
                println!("{} queued for the commit", queued["state"].as_str().unwrap_or("?"));
            }
            Ok(0)
        }
        Runs::Rerun { id, from, refresh_cache } => {
            let mut body = json!({"from": from});
            if refresh_cache {
                body["refresh_cache"] = json!(true);
            }
            let accepted = client.call(reqwest::Method::POST, &format!("/v1/runs/{id}/rerun"), Some(body)).await?;
            println!(
                "{}",
                if client.json { accepted.to_string() } else { accepted["id"].as_str().unwrap_or("").to_string() }
            );
            Ok(0)
        }
    }
}

/// `taskmesh logs RUN STEP [-f]`: the step's lines so far; with `-f`, then each as it comes,
/// until the step has ended.
pub async fn logs(conn: &Connection, run: String, step: String, follow: bool) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    let show = |line: &Value| {
        if client.json {
            println!("{line}");
        } else {
            println!("{}", line["line"].as_str().unwrap_or(""));
        }
    };
    let mut after = 0;
    print_pages(&client, &run, &step, &mut after, show).await?;
    if !follow {
        return Ok(0);
    }
    // The gateway streams lines as they come and ends the stream once the step has ended and
    // every line is out. A stream that breaks off is opened again after the last line shown;
    // where none can be had, or one broke off having brought nothing, the step itself is looked
    // at (executors send every line before they report, so once it has ended, a last read
    // gets the rest). The pause grows while nothing comes, up to 2 s.
    let mut pause = Duration::from_millis(200);
    loop {
        let before = after;
        let followed = follow_log(&client, &run, &step, &mut after, show).await;
        if matches!(followed, Followed::Ended) {
            return Ok(0);
        }
        if after == before || matches!(followed, Followed::Unavailable) {
            let ended = step_ended(&client, &run, &step).await?;
            print_pages(&client, &run, &step, &mut after, show).await?;
            if ended {
                return Ok(0);
            }
        }
        pause = if after == before { (pause * 2).min(Duration::from_secs(2)) } else { Duration::from_millis(200) };
        tokio::time::sleep(pause).await;
    }
}

/// `taskmesh workflows …`.
pub async fn workflows(conn: &Connection, cmd: Workflows) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    match cmd {
        Workflows::Push { file } => {
            let workflow = read_workflow(&file)?;
            let name =
                workflow["name"].as_str().with_context(|| format!("{} has no `name`", file.display()))?.to_string();
            let stored =
                client.call(reqwest::Method::PUT, &format!("/v1/workflows/{}", enc(&name)), Some(workflow)).await?;
            if client.json {
                println!("{stored}");
            } else {
                println!("stored {} version {}", stored["name"].as_str().unwrap_or(name.as_str()), stored["version"]);
            }
            Ok(0)
        }
        Workflows::Ls => {
            let list = client.list_all("/v1/workflows").await?;
            if client.json {
                println!("{list}");
            } else {
                println!("{:<32} {:<8} CREATED", "NAME", "VERSION");
                for w in list["items"].as_array().into_iter().flatten() {
                    println!(
                        "{:<32} {:<8} {}",
                        w["name"].as_str().unwrap_or(""),
                        w["version"].to_string(),
                        w["created_at"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(0)
        }
        Workflows::Get { name, version } => {
            let version = version.map(|v| v.to_string());
            let path = format!("/v1/workflows/{}{}", enc(&name), query(&[("version", version.as_deref())]));
            let stored = client.call(reqwest::Method::GET, &path, None).await?;
            if client.json {
                println!("{stored}");
            } else {
                // A comment line, so that the output can be pushed again as it is.
                println!(
                    "# {} version {}, stored {}",
                    stored["name"].as_str().unwrap_or(name.as_str()),
                    stored["version"],
                    stored["created_at"].as_str().unwrap_or("")
                );
                let yaml =
                    serde_yaml_ng::to_string(&stored["definition"]).context("rendering the definition as YAML")?;
                print!("{yaml}");
            }
            Ok(0)
        }
    }
}

/// `taskmesh schedules …`.
pub async fn schedules(conn: &Connection, cmd: Schedules) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    match cmd {
        Schedules::Ls => {
            let list = client.list_all("/v1/schedules").await?;
            if client.json {
                println!("{list}");
            } else {
                println!(
                    "{:<38} {:<24} {:<16} {:<16} {:<7} {:<8} NEXT",
                    "ID", "WORKFLOW", "CRON", "TIMEZONE", "STATE", "VERSION"
                );
                for s in list["items"].as_array().into_iter().flatten() {
                    let spec = &s["spec"];
                    let workflow = match &spec["workflow"] {
                        Value::String(name) => name.clone(),
                        inline => format!("{} (inline)", inline["name"].as_str().unwrap_or("?")),
                    };
                    println!(
                        "{:<38} {:<24} {:<16} {:<16} {:<7} {:<8} {}",
                        s["id"].as_str().unwrap_or(""),
                        workflow,
                        spec["cron"].as_str().unwrap_or(""),
                        spec["timezone"].as_str().unwrap_or(""),
                        if s["paused"].as_bool().unwrap_or(false) { "paused" } else { "active" },
                        version_column(&s["version"]),
                        s["next_tick"].as_str().unwrap_or("-")
                    );
                }
            }
            Ok(0)
        }
        Schedules::Create { cron, workflow, options } => {
            let mut spec = serde_json::Map::new();
            spec.insert("cron".into(), json!(cron));
            spec.insert("workflow".into(), json!(workflow));
            options.into_spec(&mut spec)?;
            let spec = Value::Object(spec);
            let created = client.call(reqwest::Method::POST, "/v1/schedules", Some(spec)).await?;
            if client.json {
                println!("{created}");
            } else {
                println!("{}", created["id"].as_str().unwrap_or(""));
            }
            Ok(0)
        }
        Schedules::Set { id, if_version, cron, workflow, options } => {
            let mut patch = serde_json::Map::new();
            for (field, value) in [("cron", cron), ("workflow", workflow)] {
                if let Some(value) = value {
                    patch.insert(field.into(), json!(value));
                }
            }
            options.into_spec(&mut patch)?;
            if patch.is_empty() {
                anyhow::bail!(
                    "nothing to change: give --cron, --workflow, --timezone, --input, --overlap or --catch-up"
                );
            }
            let path = format!("/v1/schedules/{}", enc(&id));
            let done = client.call_at(reqwest::Method::PATCH, &path, Some(Value::Object(patch)), if_version).await?;
            println!("{}", if client.json { done.to_string() } else { format!("changed {id}") });
            Ok(0)
        }
        Schedules::Trigger { id } => {
            let path = format!("/v1/schedules/{}/trigger", enc(&id));
            let accepted = client.call(reqwest::Method::POST, &path, None).await?;
            println!(
                "{}",
                if client.json { accepted.to_string() } else { accepted["id"].as_str().unwrap_or("").into() }
            );
            Ok(0)
        }
        Schedules::Backfill { id, from, to } => {
            let path = format!("/v1/schedules/{}/backfill", enc(&id));
            let done = client.call(reqwest::Method::POST, &path, Some(json!({"from": from, "to": to}))).await?;
            if client.json {
                println!("{done}");
            } else {
                for run in done["runs"].as_array().into_iter().flatten() {
                    let how = if run["duplicate"].as_bool().unwrap_or(false) { "had run" } else { "started" };
                    println!("{} {} {how}", run["tick"].as_str().unwrap_or(""), run["run_id"].as_str().unwrap_or(""));
                }
                // An active schedule's range ends before the ticks its own timers still handle.
                let time = |v: &str| v.parse::<chrono::DateTime<chrono::Utc>>().ok();
                if let (Some(until), Some(asked)) = (done["until"].as_str().and_then(time), time(&to))
                    && until < asked
                {
                    eprintln!("ended at {}: the later ticks are the schedule's own timers'", until.to_rfc3339());
                }
            }
            Ok(0)
        }
        Schedules::Pause { id } => {
            let done = client.call(reqwest::Method::POST, &format!("/v1/schedules/{}/pause", enc(&id)), None).await?;
            println!("{}", if client.json { done.to_string() } else { format!("paused {id}") });
            Ok(0)
        }
        Schedules::Resume { id } => {
            let done = client.call(reqwest::Method::POST, &format!("/v1/schedules/{}/resume", enc(&id)), None).await?;
            println!("{}", if client.json { done.to_string() } else { format!("resumed {id}") });
            Ok(0)
        }
        Schedules::Rm { id, if_version } => {
            client.call_at(reqwest::Method::DELETE, &format!("/v1/schedules/{}", enc(&id)), None, if_version).await?;
            println!("{}", if client.json { json!({"deleted": id}).to_string() } else { format!("deleted {id}") });
            Ok(0)
        }
    }
}

/// `taskmesh secrets …`. A value is sent, never printed.
pub async fn secrets(conn: &Connection, cmd: Secrets) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    match cmd {
        Secrets::Set { name, value, from_file } => {
            let value = match value {
                Some(value) => value,
                None => read_value(from_file.as_deref(), &format!("value of {name}"))?,
            };
            client
                .call(reqwest::Method::PUT, &format!("/v1/secrets/{}", enc(&name)), Some(json!({"value": value})))
                .await?;
            if client.json {
                println!("{}", json!({"name": name}));
            } else {
                println!("secret {name} set");
            }
            Ok(0)
        }
        Secrets::Ls => {
            let list = client.list_all("/v1/secrets").await?;
            if client.json {
                println!("{list}");
            } else {
                println!("{:<32} UPDATED", "NAME");
                for s in list["items"].as_array().into_iter().flatten() {
                    println!("{:<32} {}", s["name"].as_str().unwrap_or(""), s["updated_at"].as_str().unwrap_or(""));
                }
            }
            Ok(0)
        }
        Secrets::Rm { name } => {
            client.call(reqwest::Method::DELETE, &format!("/v1/secrets/{}", enc(&name)), None).await?;
            if client.json {
                println!("{}", json!({"name": name}));
            } else {
                println!("secret {name} removed");
            }
            Ok(0)
        }
    }
}

/// A value to send, never shown: the file's contents as they are, or else standard input's,
/// one trailing newline dropped (`echo value | taskmesh …` means `value`); `what` names it in a
/// prompt when standard input is a terminal.
fn read_value(from_file: Option<&Path>, what: &str) -> anyhow::Result<String> {
    if let Some(path) = from_file {
        return std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
    }
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("{what} (then Ctrl-D):");
    }
    let mut value = String::new();
    stdin.read_to_string(&mut value).context("reading standard input")?;
    if let Some(v) = value.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v).to_string()) {
        value = v;
    }
    if value.is_empty() {
        bail!("no {what}: pass it with its flag or --from-file, or write it to standard input");
    }
    Ok(value)
}

/// `taskmesh endpoints …`.
pub async fn endpoints(conn: &Connection, cmd: Endpoints) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    match cmd {
        Endpoints::Ls => {
            let list = client.list_all("/v1/webhook-endpoints").await?;
            if client.json {
                println!("{list}");
            } else {
                println!("{:<38} {:<18} {:<9} URL", "ID", "FORMAT", "STATE");
                for e in list["items"].as_array().into_iter().flatten() {
                    let state = if e["disabled_at"].is_string() { "disabled" } else { "enabled" };
                    let (id, format, url) = (e["id"].as_str(), e["format"].as_str(), e["url"].as_str());
                    let (id, format, url) = (id.unwrap_or(""), format.unwrap_or(""), url.unwrap_or(""));
                    println!("{id:<38} {format:<18} {state:<9} {url}");
                }
            }
            Ok(0)
        }
        Endpoints::RotateSecret { id, previous_valid_seconds } => {
            let body =
                previous_valid_seconds.map(|s| json!({"previous_valid_seconds": s})).unwrap_or_else(|| json!({}));
            let path = format!("/v1/webhook-endpoints/{}/rotate-secret", enc(&id));
            let rotated = client.call(reqwest::Method::POST, &path, Some(body)).await?;
            if client.json {
                println!("{rotated}");
            } else {
                println!("{}", rotated["secret"].as_str().unwrap_or(""));
                match rotated["previous_valid_until"].as_str() {
                    Some(until) => eprintln!("the secret it replaces signs too until {until}"),
                    None => eprintln!("the secret it replaces no longer signs"),
                }
            }
            Ok(0)
        }
        Endpoints::Enable { id } => {
            let path = format!("/v1/webhook-endpoints/{}/enable", enc(&id));
            let enabled = client.call(reqwest::Method::POST, &path, None).await?;
            if client.json {
                println!("{enabled}");
            } else {
                println!("endpoint {id} enabled");
            }
            Ok(0)
        }
    }
}

/// `taskmesh connections …`.
pub async fn connections(conn: &Connection, cmd: Connections) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    match cmd {
        Connections::Ls => {
            let list = client.list_all("/v1/repo-connections").await?;
            if client.json {
                println!("{list}");
            } else {
                println!("{:<38} {:<7} {:<8} {:<8} WEBHOOK PATH / REPOSITORY", "ID", "FORGE", "STATUSES", "VERSION");
                for c in list["items"].as_array().into_iter().flatten() {
                    let statuses = if c["reports_status"] == true { "yes" } else { "no" };
                    let (id, forge) = (c["id"].as_str().unwrap_or(""), c["forge"].as_str().unwrap_or(""));
                    let (path, repo) =
                        (c["webhook_path"].as_str().unwrap_or(""), c["repository"].as_str().unwrap_or(""));
                    let version = version_column(&c["version"]);
                    println!("{id:<38} {forge:<7} {statuses:<8} {version:<8} {path} {repo}");
                }
            }
            Ok(0)
        }
        Connections::SetToken { id, from_file, if_version } => {
            // A token goes in a header: the newline that ends a file (`echo $TOKEN > f`) is no
            // part of it.
            let token = read_value(from_file.as_deref(), "status token")?.trim_end_matches(['\n', '\r']).to_string();
            let path = format!("/v1/repo-connections/{}", enc(&id));
            let body = Some(json!({"status_token": token}));
            let changed = client.call_at(reqwest::Method::PATCH, &path, body, if_version).await?;
            if client.json {
                println!("{changed}");
            } else {
                println!("connection {id}: status token set");
            }
            Ok(0)
        }
    }
}

/// `taskmesh cache purge`.
pub async fn cache(conn: &Connection, cmd: Cache) -> anyhow::Result<i32> {
    let client = Client::new(conn)?;
    match cmd {
        Cache::Purge => {
            let purged = client.call(reqwest::Method::DELETE, "/v1/cache", None).await?;
            if client.json {
                println!("{purged}");
            } else {
                println!("{} kept outcomes forgotten", purged["purged"].as_u64().unwrap_or(0));
            }
            Ok(0)
        }
    }
}

/// `taskmesh profile show`: the URL the client commands use and where it comes from, and the
/// same for the key, of which only the first characters are shown.
pub fn profile(conn: &Connection, cmd: Profiles) -> anyhow::Result<i32> {
    match cmd {
        Profiles::Show => {
            let target = Target::resolve(conn, true)?;
            let key = target.key.as_deref().map(key_hint);
            if conn.output == "json" {
                let shown = json!({
                    "url": target.url,
                    "url_from": target.url_from,
                    "key": key,
                    "key_from": target.key_from,
                    "profile": target.profile.as_ref().map(|(name, _)| name.clone()),
                    "profile_from": target.profile.as_ref().map(|(_, why)| why.clone()),
                    "file": target.file.as_ref().map(|(path, _)| path.display().to_string()),
                    "file_exists": target.file.as_ref().is_some_and(|(_, exists)| *exists),
                });
                println!("{shown}");
            } else {
                println!("url      {}  (from {})", target.url, target.url_from);
                match &key {
                    Some(k) => println!("key      {k}  (from {})", target.key_from),
                    None => println!("key      none"),
                }
                match &target.profile {
                    Some((name, why)) => println!("profile  {name}  (from {why})"),
                    None => println!("profile  none"),
                }
                match &target.file {
                    Some((path, true)) => println!("file     {}", path.display()),
                    Some((path, false)) => println!("file     none ({} does not exist)", path.display()),
                    None => println!("file     none"),
                }
            }
            Ok(0)
        }
    }
}
