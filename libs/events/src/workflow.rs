//! Workflow definitions: the format users write (YAML or JSON), its parsing and validation.
//!
//! ```yaml
//! name: example
//! steps:
//!   - id: build
//!     run: echo building
//!   - id: test
//!     needs: [build]
//!     run: echo testing
//! ```

use std::collections::{BTreeMap, HashMap};

use petgraph::graphmap::DiGraphMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, FieldError, Problem};
use crate::subjects::is_token;

/// Most steps one workflow may have.
pub const MAX_STEPS: usize = 5_000;
/// Longest `run` script, in bytes.
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;

/// A workflow: a DAG of steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Typed inputs: each a JSON Schema. An input without a `default` is required. With no
    /// declared inputs, a run takes whatever inputs it is given.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, serde_json::Value>,
    /// Cancel the whole run after this many seconds (1 to 31,536,000: a year); it ends
    /// `timed_out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Dispatch priority of the workflow's steps under contention (-100 to 100, higher first;
    /// default 0). A run's own `priority` overrides it; a step's overrides both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// A concurrency group: at most `limit` runs with the same rendered `group` key are active
    /// at once; `policy` says what a run that finds the group full does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyDef>,
    /// What starts the workflow besides API calls: CloudEvents posted to `POST /v1/events`.
    /// Only stored workflows are triggered (their latest version).
    #[serde(default, rename = "on", skip_serializing_if = "Option::is_none")]
    pub triggers: Option<TriggersDef>,
    pub steps: Vec<StepDef>,
}

/// `on:` on a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggersDef {
    /// CloudEvents that start a run, each matched by type and an optional filter.
    #[serde(default)]
    pub events: Vec<EventTrigger>,
}

/// One CloudEvents trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventTrigger {
    /// The CloudEvents `type` to match, exactly (e.g. `com.example.order.created`).
    #[serde(rename = "type")]
    pub event_type: String,
    /// A CEL filter over `event` (the whole CloudEvent: `event.data`, `event.source`,
    /// `event.subject`, …), e.g. `event.data.amount > 100`. No filter: every event of the type.
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// The run's inputs, from the event: a value that is exactly `${{ expr }}` keeps the
    /// expression's type (a number stays a number); other strings are templates.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, serde_json::Value>,
}

/// At most this many event triggers per workflow.
pub const MAX_EVENT_TRIGGERS: usize = 32;

/// `concurrency:` on a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyDef {
    /// The group's key, a `${{ }}` template over `inputs` and `run` (e.g.
    /// `deploy-${{ inputs.branch }}`); rendered when the run is submitted.
    pub group: String,
    /// Runs of the group active at once (1 to 1,000; default 1).
    #[serde(default = "one")]
    pub limit: u32,
    #[serde(default)]
    pub policy: GroupPolicy,
}

fn one() -> u32 {
    1
}

/// What a run does when its concurrency group is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupPolicy {
    /// Wait, in submission order, until a run of the group ends.
    #[default]
    Queue,
    /// Cancel the group's active runs, then start once they have ended.
    CancelInProgress,
    /// Do not run: the run ends `cancelled` at once.
    Skip,
}

/// `circuit_breaker:` on a step: a named breaker of the tenant's around what the step calls.
/// Steps sharing a key share it. After `failures` attempts in a row of such steps failed, it
/// opens: its steps wait (they are never failed for it) for `cooldown_seconds`; then one goes
/// as a probe, and its success closes the breaker, its failure opens it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerDef {
    /// The breaker's name: letters, digits, `_` or `-`.
    pub key: String,
    /// Failed attempts in a row that open it: 1 to 1,000 (default 5).
    #[serde(default = "CircuitBreakerDef::default_failures")]
    pub failures: u32,
    /// How long it stays open before a probe goes: 1 to 86,400 seconds (default 30).
    #[serde(default = "CircuitBreakerDef::default_cooldown")]
    pub cooldown_seconds: u64,
}

impl CircuitBreakerDef {
    /// The range of `failures`.
    pub const FAILURES: std::ops::RangeInclusive<u32> = 1..=1_000;
    /// The range of `cooldown_seconds`.
    pub const COOLDOWN_SECS: std::ops::RangeInclusive<u64> = 1..=86_400;

    fn default_failures() -> u32 {
        5
    }
    fn default_cooldown() -> u64 {
        30
    }
}

/// `cache:` on a step: its outcome, when it succeeds, is kept for the tenant, and a later step
/// whose rendered definition and `key` are the same succeeds at once with that outcome (its
/// outputs, exit code and output), without running, while the outcome is younger than the later
/// step's `ttl_seconds` (counted from when the step that ran finished).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheDef {
    /// More to tell outcomes apart by, beyond the step's definition: a template such as
    /// `${{ inputs.day }}` (at most 1,024 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The oldest kept outcome this step takes, in seconds since the step that ran finished: 1
    /// to 2,592,000 (30 days); default 86,400. Not part of the match.
    #[serde(default = "CacheDef::default_ttl")]
    pub ttl_seconds: u64,
}

impl CacheDef {
    /// Longest a kept outcome is reused (and kept): 30 days.
    pub const MAX_TTL_SECS: u64 = 30 * 86_400;
    /// Longest `key`, in bytes, as written (rendered, it is hashed whatever its length).
    pub const MAX_KEY: usize = 1024;
    fn default_ttl() -> u64 {
        86_400
    }
}

/// `rate_limit:` on a step: a named token bucket of the tenant's. Steps sharing a key share
/// the bucket; a step finding it empty waits (it is never failed for it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitDef {
    /// The bucket's name: letters, digits, `_` or `-`.
    pub key: String,
    /// Steps started per second, on average (0.001 to 10,000).
    pub per_second: f64,
    /// Steps that may start at once after a quiet spell (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// A step's `checkout`: off, `true` (the pushed commit alone), or `{depth, tags, path,
/// submodules}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutDef {
    /// Whether the pushed commit is checked out.
    pub enabled: bool,
    /// Commits of history fetched, the pushed one included: 1 (the default) the commit alone,
    /// 0 all of its history.
    pub depth: u32,
    /// The repository's tags are fetched too (for `git describe`).
    pub tags: bool,
    /// Where in the step's working directory the repository goes (a relative path of plain
    /// names, made as needed); `None`: the working directory itself.
    pub path: Option<String>,
    /// Its submodules are checked out too, and theirs, at the commits it records (over http(s),
    /// with the connection's token only for the repositories its `submodule_repositories`
    /// names).
    pub submodules: bool,
}

impl Default for CheckoutDef {
    fn default() -> Self {
        Self { enabled: false, depth: 1, tags: false, path: None, submodules: false }
    }
}

impl CheckoutDef {
    /// Most commits of history a checkout may ask for (0 asks for all).
    pub const MAX_DEPTH: u32 = 100_000;
    /// Longest `path`, in bytes.
    pub const MAX_PATH: usize = 255;

    /// Why `path` cannot be where a checkout goes, if it cannot: it must be relative, made of
    /// plain names (no `.`, `..`, `.git` or empty ones), not start at the step's output file,
    /// and be at most [`Self::MAX_PATH`] bytes.
    pub fn path_problem(path: &str) -> Option<String> {
        if path.is_empty() || path.len() > Self::MAX_PATH {
            return Some(format!("1 to {} bytes", Self::MAX_PATH));
        }
        if !is_plain_relative_path(path, Self::MAX_PATH) || path.split('/').any(|n| n.eq_ignore_ascii_case(".git")) {
            return Some(format!(
                "'{path}' is not a relative path of plain names (no '.', '..', '.git' or empty ones, no control characters or '\\')"
            ));
        }
        if path.split('/').next() == Some(OUTPUT_FILE) {
            return Some(format!("'{OUTPUT_FILE}' is the step's output file"));
        }
        None
    }

    pub fn is_off(&self) -> bool {
        !self.enabled
    }
}

// Only its JSON Schema is used: `CheckoutDef` reads and writes itself.
/// `checkout` as written: a flag, or options (which turn it on).
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum CheckoutInput {
    Flag(bool),
    Options(CheckoutOptions),
}

/// `checkout`'s options.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CheckoutOptions {
    /// Commits of history, the pushed one included: 1 (the default) the commit alone, 0 all.
    #[serde(default = "one")]
    #[schemars(range(max = CheckoutDef::MAX_DEPTH))]
    depth: u32,
    /// Fetch the repository's tags too.
    #[serde(default)]
    tags: bool,
    /// Where in the step's working directory the repository goes: a relative path of plain
    /// names (no `.`, `..`, `.git` or empty ones, no control characters or `\`, not starting at
    /// `.taskmesh-output`), at most 255 bytes; absent: the working directory itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = CheckoutDef::MAX_PATH))]
    path: Option<String>,
    /// Check out the repository's submodules too, and theirs (at most 8 levels and 256 in all),
    /// at the commits it records, as deep as `depth`; each over http(s) from a host the
    /// executor's egress rules permit, with the connection's token only for the repositories
    /// at its forge that the connection's `submodule_repositories` names, otherwise without.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    submodules: bool,
}

impl Serialize for CheckoutDef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // `true` as written before options existed, so older readers read it still.
        if !self.enabled || (self.depth == 1 && !self.tags && self.path.is_none() && !self.submodules) {
            serializer.serialize_bool(self.enabled)
        } else {
            let (depth, tags, path, submodules) = (self.depth, self.tags, self.path.clone(), self.submodules);
            CheckoutOptions { depth, tags, path, submodules }.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for CheckoutDef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // By hand rather than as the untagged `CheckoutInput`, so that a mistake is named
        // ("unknown field `depht`", "invalid type: string") rather than "no variant matched".
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CheckoutDef;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or {depth, tags, path, submodules}")
            }

            fn visit_bool<E: serde::de::Error>(self, enabled: bool) -> Result<CheckoutDef, E> {
                Ok(CheckoutDef { enabled, ..CheckoutDef::default() })
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<CheckoutDef, A::Error> {
                let o = CheckoutOptions::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(CheckoutDef { enabled: true, depth: o.depth, tags: o.tags, path: o.path, submodules: o.submodules })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for CheckoutDef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CheckoutDef".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        CheckoutInput::json_schema(generator)
    }
}

/// Whether `path` is a relative path of plain names, of 1 to `max` bytes: no empty, `.` or `..`
/// name (so no leading `/`), no backslash and no control character. Such a path stays inside
/// whatever it is joined to.
pub fn is_plain_relative_path(path: &str, max: usize) -> bool {
    !path.is_empty()
        && path.len() <= max
        && !path.chars().any(|c| c.is_control() || c == '\\')
        && path.split('/').all(|name| !matches!(name, "" | "." | ".."))
}

/// The file in a step's working directory that the step writes its outputs to.
pub const OUTPUT_FILE: &str = ".taskmesh-output";

/// Lowest and highest priorities.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;

/// One step. Exactly one of `run`, `uses`, `http`, `llm`, `container` or `sleep` says what it
/// does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// Unique within the workflow: letters, digits, `_` and `-`, at most 64.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Steps that must succeed before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// A shell script, run with `sh -c` in a fresh working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Start a shell or container step with the pushed commit checked out in its working
    /// directory (runs started by a forge push, and their reruns): `true`, or
    /// `{depth, tags, path}` for more of its history (`depth: 0`, all of it), the repository's
    /// tags, and a directory under the working directory to check it out into.
    #[serde(default, skip_serializing_if = "CheckoutDef::is_off")]
    pub checkout: CheckoutDef,
    /// A built-in step: `noop` does nothing and succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<Builtin>,
    /// An HTTP request, made by the executor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpStep>,
    /// A chat completion from an OpenAI-compatible API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmStep>,
    /// A command in a container image, run with the executor's docker- or podman-compatible CLI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerStep>,
    /// Wait this many seconds inside the executor (no process), then succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep: Option<f64>,
    /// Labels an executor must have to run the step, e.g. `{gpu: nvidia}` or
    /// `{arch: aarch64, pool: fast}`; `"*"` matches any value of a label the executor has.
    /// Until a live executor has them all, the step waits with that reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runs_on: BTreeMap<String, String>,
    /// Network access for a sandboxed or container step (default: none when sandboxed, the
    /// runtime's default for containers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<bool>,
    /// Resource limits on the step's processes (shell and container steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<StepLimits>,
    /// Environment variables for the step (the executor's own are never passed on).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Kill the step after this many seconds (1 to 31,536,000: a year); it ends `timed_out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// A CEL condition: the step runs only if it is true. Without one, a step runs when every
    /// step it needs succeeded (`success()`). With one, it is evaluated once every step it
    /// needs has ended; `always()`, `failure()` and `cancelled()` make clean-up steps.
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// A failure of this step neither fails the run nor stops the steps that need it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_error: bool,
    /// Run the step again when it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Fan out: one instance of the step per combination of these values, with ids
    /// `<id>-1`, `<id>-2`, … in order; `${{ matrix.<key> }}` is the instance's value. A step that
    /// needs `<id>` needs every instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix: Option<BTreeMap<String, Vec<serde_json::Value>>>,
    /// Secrets the step gets as environment variables of the same names. Their values are
    /// masked (`***`) in its output, outputs and logs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Dispatch priority under contention (-100 to 100, higher first); overrides the run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Hold the step until the named rate-limit bucket has a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitDef>,
    /// Instead of running, take the kept outcome of an earlier success of the tenant's that did
    /// the same thing, in any step, workflow or run (see [`CacheDef`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheDef>,
    /// Hold the step while the named circuit breaker is open (see [`CircuitBreakerDef`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerDef>,
    /// Set on each instance by the matrix expansion: its combination of values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix_values: Option<BTreeMap<String, serde_json::Value>>,
}

/// Whether `name` is a valid secret name (an environment variable name, upper case).
pub fn is_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Most instances one matrix may produce.
pub const MAX_MATRIX: usize = 256;

/// When and how often a failed step is tried again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 to 20).
    pub max_attempts: u32,
    /// Delay before the first retry; each next one is `multiplier` times longer, up to
    /// `max_delay_ms`. The actual delay is drawn uniformly between half the delay and the
    /// delay (jitter), so retries of many steps do not fall in step.
    #[serde(default = "RetryPolicy::default_initial")]
    pub initial_delay_ms: u64,
    #[serde(default = "RetryPolicy::default_max")]
    pub max_delay_ms: u64,
    #[serde(default = "RetryPolicy::default_multiplier")]
    pub multiplier: f64,
    /// Which failures are retried: exit codes, `timeout`, or `failure` (any non-zero exit).
    /// Empty: every failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOn>,
}

/// A failure class a retry policy retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RetryOn {
    ExitCode(i32),
    Class(FailureClass),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// Any non-zero exit (or a step that could not start).
    Failure,
    /// The step ran past `timeout_seconds`.
    Timeout,
}

impl RetryPolicy {
    fn default_initial() -> u64 {
        1_000
    }
    fn default_max() -> u64 {
        60_000
    }
    fn default_multiplier() -> f64 {
        2.0
    }

    /// Whether a failure with this exit code (or timeout) is retried.
    pub fn retries(&self, exit_code: Option<i32>, timed_out: bool) -> bool {
        self.on.is_empty()
            || self.on.iter().any(|on| match on {
                RetryOn::ExitCode(c) => exit_code == Some(*c),
                RetryOn::Class(FailureClass::Timeout) => timed_out,
                RetryOn::Class(FailureClass::Failure) => !timed_out,
            })
    }

    /// The upper bound of the delay before retry number `retry` (1 for the first).
    pub fn ceiling_ms(&self, retry: u32) -> u64 {
        let d = self.initial_delay_ms as f64 * self.multiplier.powi(retry.saturating_sub(1) as i32);
        (d.min(self.max_delay_ms as f64)) as u64
    }
}

/// Built-in step kinds that run inside the executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    Noop,
}

/// `http:` on a step. `url`, header values and string parts of `body` may hold `${{ }}`
/// templates, and `${{ secrets.NAME }}` for a secret the step declares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpStep {
    /// GET (default), HEAD, POST, PUT, PATCH, DELETE or OPTIONS.
    #[serde(default = "HttpStep::default_method")]
    pub method: String,
    /// An `http://` or `https://` URL.
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// A string is sent as it is; any other JSON value is sent as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// Statuses that mean success: codes (`204`), classes (`"2xx"`) or ranges (`"200-399"`).
    /// Default: any 2xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub success: Vec<StatusMatch>,
    /// Most bytes of the response body kept as the `body` output (1 to 1 MiB; default 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
}

impl HttpStep {
    fn default_method() -> String {
        "GET".into()
    }
    pub const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    pub const DEFAULT_BODY_BYTES: usize = 64 * 1024;
    pub const MAX_BODY_BYTES: usize = 1024 * 1024;

    /// Whether `status` counts as success.
    pub fn succeeds(&self, status: u16) -> bool {
        if self.success.is_empty() {
            return (200..300).contains(&status);
        }
        self.success.iter().any(|m| m.range().is_ok_and(|r| r.contains(&status)))
    }
}

/// One entry of `http.success`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum StatusMatch {
    Code(u16),
    Pattern(String),
}

impl StatusMatch {
    /// The statuses it matches.
    pub fn range(&self) -> Result<std::ops::RangeInclusive<u16>, String> {
        let valid = |c: u16| (100..=599).contains(&c);
        let r = match self {
            StatusMatch::Code(c) => *c..=*c,
            StatusMatch::Pattern(p) => {
                let p = p.trim();
                if let Some(class) = p.strip_suffix("xx").and_then(|d| d.parse::<u16>().ok()) {
                    class * 100..=class * 100 + 99
                } else if let Some((a, b)) = p.split_once('-') {
                    let a = a.trim().parse::<u16>().map_err(|_| format!("'{p}' is not a status range"))?;
                    let b = b.trim().parse::<u16>().map_err(|_| format!("'{p}' is not a status range"))?;
                    a..=b
                } else {
                    let c = p.parse::<u16>().map_err(|_| format!("'{p}' is not a status, class (2xx) or range"))?;
                    c..=c
                }
            }
        };
        if valid(*r.start()) && valid(*r.end()) && r.start() <= r.end() {
            Ok(r)
        } else {
            Err("statuses are 100 to 599".into())
        }
    }
}

/// `llm:` on a step: one chat completion. `base_url`, `model`, `system` and `prompt` are `${{ }}`
/// templates over inputs and upstream outputs. The reply becomes the `reply` output (and the step's output),
/// token usage the `prompt_tokens`, `completion_tokens` and `total_tokens` outputs. Rate-limit
/// and quota answers (429, 503) are waited out, honouring `Retry-After`, until the step's
/// deadline (`timeout_seconds`, default 10 minutes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmStep {
    /// The API's base URL, e.g. `https://api.openai.com/v1`; `/chat/completions` is appended.
    pub base_url: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub prompt: String,
    /// 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// 1 to 1,000,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// The secret holding the API key, sent as `Authorization: Bearer`. It need not be listed
    /// in `secrets` as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<String>,
}

impl LlmStep {
    /// The deadline when the step sets no `timeout_seconds`.
    pub const DEFAULT_TIMEOUT_SECS: u64 = 600;
}

/// `container:` on a step. The step's workspace is mounted at `/workspace` (the working
/// directory); `env` and declared secrets are passed as environment variables (secret values
/// never on the command line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerStep {
    /// An image reference, e.g. `alpine:3.20`.
    pub image: String,
    /// The command and its arguments; the image's default command if empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

/// `limits:` on a step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepLimits {
    /// CPU seconds the step's processes may use (each process; RLIMIT_CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<u64>,
    /// Memory in MiB each process may map (RLIMIT_AS; containers: the container's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
}

/// Fields where `${{ secrets.NAME }}` is filled in by the executor (elsewhere a secret is an
/// environment variable, so its value never lands in a command line).
pub const SECRET_FIELDS: &[&str] =
    &["http.url", "http.headers", "http.body", "llm.base_url", "llm.system", "llm.prompt"];

/// The HTTP step's default deadline when it sets no `timeout_seconds`.
pub const HTTP_DEFAULT_TIMEOUT_SECS: u64 = 60;
/// The longest `sleep`.
pub const MAX_SLEEP_SECS: f64 = 7.0 * 86_400.0;
/// The longest `timeout_seconds`, a run's or a step's: a year. (A deadline is a time that has
/// to exist: one far past the calendar's end would make no timer.)
pub const MAX_TIMEOUT_SECS: u64 = 365 * 86_400;

/// What is wrong with a `timeout_seconds`, if anything.
fn timeout_problem(secs: Option<u64>) -> Option<String> {
    secs.filter(|s| !(1..=MAX_TIMEOUT_SECS).contains(s)).map(|_| format!("must be 1 to {MAX_TIMEOUT_SECS} (a year)"))
}

impl StepDef {
    /// How long the step may run before it is killed: its `timeout_seconds`, else its kind's
    /// default (`http` 60 s, `llm` 600 s), else no limit.
    pub fn time_limit_secs(&self) -> Option<u64> {
        self.timeout_seconds.or(match self.kind() {
            Some("http") => Some(HTTP_DEFAULT_TIMEOUT_SECS),
            Some("llm") => Some(LlmStep::DEFAULT_TIMEOUT_SECS),
            _ => None,
        })
    }

    /// What the step does, by the field that says it (`None` if not exactly one does).
    pub fn kind(&self) -> Option<&'static str> {
        let set = [
            (self.run.is_some(), "run"),
            (self.uses.is_some(), "uses"),
            (self.http.is_some(), "http"),
            (self.llm.is_some(), "llm"),
            (self.container.is_some(), "container"),
            (self.sleep.is_some(), "sleep"),
        ];
        let mut kinds = set.iter().filter(|(on, _)| *on).map(|(_, k)| *k);
        match (kinds.next(), kinds.next()) {
            (Some(k), None) => Some(k),
            _ => None,
        }
    }

    /// Every field that may hold `${{ }}` templates, with its path under the step.
    pub fn templates(&self) -> Vec<(String, &String)> {
        let mut out: Vec<(String, &String)> = Vec::new();
        if let Some(run) = &self.run {
            out.push(("run".into(), run));
        }
        for (k, v) in &self.env {
            out.push((format!("env.{k}"), v));
        }
        if let Some(h) = &self.http {
            out.push(("http.url".into(), &h.url));
            for (k, v) in &h.headers {
                out.push((format!("http.headers.{k}"), v));
            }
            if let Some(body) = &h.body {
                json_strings(body, &mut |s| out.push(("http.body".into(), s)));
            }
        }
        if let Some(l) = &self.llm {
            out.push(("llm.base_url".into(), &l.base_url));
            out.push(("llm.model".into(), &l.model));
            if let Some(s) = &l.system {
                out.push(("llm.system".into(), s));
            }
            out.push(("llm.prompt".into(), &l.prompt));
        }
        if let Some(c) = &self.container {
            out.push(("container.image".into(), &c.image));
            for (n, a) in c.command.iter().enumerate() {
                out.push((format!("container.command[{n}]"), a));
            }
        }
        if let Some(key) = self.cache.as_ref().and_then(|c| c.key.as_ref()) {
            out.push(("cache.key".into(), key));
        }
        out
    }

    /// The same fields as [`StepDef::templates`], to render them.
    pub fn templates_mut(&mut self) -> Vec<&mut String> {
        let mut out: Vec<&mut String> = Vec::new();
        out.extend(self.run.as_mut());
        out.extend(self.env.values_mut());
        if let Some(h) = &mut self.http {
            out.push(&mut h.url);
            out.extend(h.headers.values_mut());
            if let Some(body) = &mut h.body {
                json_strings_mut(body, &mut out);
            }
        }
        if let Some(l) = &mut self.llm {
            out.push(&mut l.base_url);
            out.push(&mut l.model);
            out.extend(l.system.as_mut());
            out.push(&mut l.prompt);
        }
        if let Some(c) = &mut self.container {
            out.push(&mut c.image);
            out.extend(c.command.iter_mut());
        }
        out.extend(self.cache.as_mut().and_then(|c| c.key.as_mut()));
        out
    }

    /// The secrets the executor opens for the step: those it declares, and the LLM API key.
    pub fn secret_names(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        if let Some(name) = self.llm.as_ref().and_then(|l| l.api_key_secret.as_deref())
            && !out.contains(&name)
        {
            out.push(name);
        }
        out
    }
}

/// Whether `labels` satisfy every requirement (`"*"`: the label is present).
pub fn labels_match(required: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    required.iter().all(|(k, v)| labels.get(k).is_some_and(|have| v == "*" || have.eq_ignore_ascii_case(v)))
}

fn json_strings<'a>(v: &'a serde_json::Value, f: &mut dyn FnMut(&'a String)) {
    match v {
        serde_json::Value::String(s) => f(s),
        serde_json::Value::Array(items) => items.iter().for_each(|i| json_strings(i, f)),
        serde_json::Value::Object(map) => map.values().for_each(|i| json_strings(i, f)),
        _ => {}
    }
}

fn json_strings_mut<'a>(v: &'a mut serde_json::Value, out: &mut Vec<&'a mut String>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| json_strings_mut(i, out)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|i| json_strings_mut(i, out)),
        _ => {}
    }
}

/// How much a YAML text may expand to, its aliases replayed, counted as one for each node
/// (mapping, sequence, scalar) and each byte of each string: [`YAML_EXPANSION_PER_BYTE`] for
/// each of its bytes, and never less than [`YAML_EXPANSION_FLOOR`]. A few kilobytes of anchors
/// and aliases (of many nodes, or of one long string) can otherwise expand to billions (a
/// "billion laughs"), and a pipeline file from any pushed commit is parsed by the shared
/// git-integration service.
const YAML_EXPANSION_PER_BYTE: usize = 4;
/// What any YAML text may expand to, however short: more than a workflow an event can carry.
const YAML_EXPANSION_FLOOR: usize = 4 << 20;

/// Checks that YAML `text` expands, its aliases replayed, to no more than its size allows (see
/// [`YAML_EXPANSION_PER_BYTE`]), walking it without building anything; the error says why not.
pub fn check_yaml_expansion(text: &str) -> Result<(), String> {
    let budget = YAML_EXPANSION_FLOOR.max(text.len().saturating_mul(YAML_EXPANSION_PER_BYTE));
    let left = std::cell::Cell::new(budget);
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde::de::DeserializeSeed::deserialize(YamlNodes(&left), de).map_err(|e| e.to_string())
}

/// YAML `text` as JSON, once [`check_yaml_expansion`] has passed it.
pub fn yaml_to_json(text: &str) -> Result<serde_json::Value, String> {
    check_yaml_expansion(text)?;
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}

/// Counts the nodes of a YAML document down from what is left, failing at none.
#[derive(Clone, Copy)]
struct YamlNodes<'a>(&'a std::cell::Cell<usize>);

impl YamlNodes<'_> {
    fn take<E: serde::de::Error>(self) -> Result<(), E> {
        self.take_n(1)
    }
    fn take_n<E: serde::de::Error>(self, n: usize) -> Result<(), E> {
        match self.0.get().checked_sub(n) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom("it expands to more than its size allows (anchors and aliases repeated too often)")),
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for YamlNodes<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for YamlNodes<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.take()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.take()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.take()
    }
    fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<(), E> {
        self.take()
    }
    fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<(), E> {
        self.take()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.take()
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.take_n(v.len().saturating_add(1))
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.take_n(v.len().saturating_add(1))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.take()
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.take()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.take()?;
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.take()?;
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.take()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.take()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): the tag, then its value.
        self.take()?;
        let ((), variant) = data.variant_seed(self)?;
        serde::de::VariantAccess::newtype_variant_seed(variant, self)
    }
}

impl WorkflowDef {
    /// Parses YAML (a superset of JSON) and validates.
    pub fn parse_yaml(text: &str) -> Result<Self, Problem> {
        check_yaml_expansion(text).map_err(|e| Problem::new(ErrorCode::InvalidWorkflow, e))?;
        let def: WorkflowDef =
            serde_yaml_ng::from_str(text).map_err(|e| Problem::new(ErrorCode::InvalidWorkflow, e.to_string()))?;
        def.validate()?;
        Ok(def)
    }

    /// Parses a JSON value and validates.
    pub fn from_value(value: serde_json::Value) -> Result<Self, Problem> {
        let def: WorkflowDef =
            serde_json::from_value(value).map_err(|e| Problem::new(ErrorCode::InvalidWorkflow, e.to_string()))?;
        def.validate()?;
        Ok(def)
    }

    /// Replaces every step with a `matrix` by its instances (`<id>-1` … in the order of the
    /// combinations, last key varying fastest) and points `needs` of its dependents at all of
    /// them. A workflow without matrices is returned as it is.
    pub fn expand_matrices(self) -> Result<Self, Problem> {
        if self.steps.iter().all(|s| s.matrix.is_none()) {
            return Ok(self);
        }
        let mut instances: HashMap<String, Vec<String>> = HashMap::new();
        let mut steps = Vec::new();
        for step in &self.steps {
            let Some(matrix) = &step.matrix else {
                steps.push(step.clone());
                continue;
            };
            let mut combos: Vec<BTreeMap<String, serde_json::Value>> = vec![BTreeMap::new()];
            for (key, values) in matrix {
                combos = combos
                    .into_iter()
                    .flat_map(|c| {
                        values.iter().map(move |v| {
                            let mut c = c.clone();
                            c.insert(key.clone(), v.clone());
                            c
                        })
                    })
                    .collect();
            }
            let ids: Vec<String> = (1..=combos.len()).map(|n| format!("{}-{n}", step.id)).collect();
            for (id, values) in ids.iter().zip(combos) {
                let mut instance = step.clone();
                instance.id = id.clone();
                instance.matrix = None;
                instance.matrix_values = Some(values);
                steps.push(instance);
            }
            instances.insert(step.id.clone(), ids);
        }
        for step in &mut steps {
            step.needs =
                step.needs.iter().flat_map(|n| instances.get(n).cloned().unwrap_or_else(|| vec![n.clone()])).collect();
        }
        let expanded = WorkflowDef { steps, ..self };
        expanded.validate()?;
        Ok(expanded)
    }

    /// Checks `given` against the declared inputs and fills in defaults. Unknown inputs and
    /// values that do not fit their schema are a 422 naming each input.
    pub fn resolve_inputs(
        &self,
        mut given: BTreeMap<String, serde_json::Value>,
    ) -> Result<BTreeMap<String, serde_json::Value>, Problem> {
        if self.inputs.is_empty() {
            return Ok(given);
        }
        for (name, schema) in &self.inputs {
            if let Some(default) = schema.get("default")
                && !given.contains_key(name)
            {
                given.insert(name.clone(), default.clone());
            }
        }
        let required: Vec<&String> =
            self.inputs.iter().filter(|(_, s)| s.get("default").is_none()).map(|(n, _)| n).collect();
        let schema = serde_json::json!({
            "type": "object",
            "properties": self.inputs,
            "required": required,
            "additionalProperties": false,
        });
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| Problem::new(ErrorCode::InvalidWorkflow, format!("inputs: {e}")))?;
        let instance = serde_json::to_value(&given).expect("a map serialises");
        let errors: Vec<FieldError> = validator
            .iter_errors(&instance)
            .map(|e| {
                let path = e.instance_path().to_string();
                let field = path
                    .trim_start_matches('/')
                    .split('/')
                    .filter(|p| !p.is_empty())
                    .fold("inputs".to_string(), |f, p| format!("{f}.{p}"));
                FieldError { field, message: e.to_string() }
            })
            .collect();
        if errors.is_empty() {
            Ok(given)
        } else {
            let detail = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
            Err(Problem::new(ErrorCode::InvalidInput, detail).with_errors(errors))
        }
    }

    pub fn step(&self, id: &str) -> Option<&StepDef> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// Checks everything that can be checked before a run: ids, references, cycles, sizes.
    pub fn validate(&self) -> Result<(), Problem> {
        let mut errors = Vec::new();
        let mut err = |field: String, message: String| errors.push(FieldError { field, message });
        if self.name.trim().is_empty() || self.name.len() > 128 {
            err("name".into(), "must be 1 to 128 characters".into());
        }
        if let Some(m) = timeout_problem(self.timeout_seconds) {
            err("timeout_seconds".into(), m);
        }
        if let Some(p) = self.priority.filter(|p| !PRIORITY_RANGE.contains(p)) {
            err("priority".into(), format!("{p} is out of range: -100 to 100"));
        }
        if let Some(c) = &self.concurrency {
            if c.group.trim().is_empty() || c.group.len() > 256 {
                err("concurrency.group".into(), "must be 1 to 256 characters".into());
            } else if let Err(e) = crate::expr::check_template(&c.group) {
                err("concurrency.group".into(), e);
            }
            if !(1..=1000).contains(&c.limit) {
                err("concurrency.limit".into(), "must be 1 to 1000".into());
            }
        }
        if let Some(on) = &self.triggers {
            if on.events.len() > MAX_EVENT_TRIGGERS {
                err("on.events".into(), format!("at most {MAX_EVENT_TRIGGERS} triggers"));
            }
            for (i, t) in on.events.iter().enumerate() {
                let t_ok = !t.event_type.is_empty()
                    && t.event_type.len() <= 256
                    && !t.event_type.chars().any(|c| c.is_control() || c.is_whitespace());
                if !t_ok {
                    err(format!("on.events[{i}].type"), "must be 1 to 256 characters without spaces".into());
                }
                if let Some(Err(e)) = t.condition.as_deref().map(crate::expr::check_trigger) {
                    err(format!("on.events[{i}].if"), e);
                }
                for (name, value) in &t.inputs {
                    if !self.inputs.is_empty() && !self.inputs.contains_key(name) {
                        err(format!("on.events[{i}].inputs.{name}"), "the workflow declares no such input".into());
                    }
                    if let Some(Err(e)) = value.as_str().map(crate::expr::check_trigger_template) {
                        err(format!("on.events[{i}].inputs.{name}"), e);
                    }
                }
            }
        }
        if self.steps.is_empty() {
            err("steps".into(), "a workflow needs at least one step".into());
        }
        if self.steps.len() > MAX_STEPS {
            err("steps".into(), format!("at most {MAX_STEPS} steps"));
        }
        for (name, schema) in &self.inputs {
            if !is_token(name) {
                err(format!("inputs.{name}"), "input names are letters, digits, '_' or '-'".into());
            } else if !schema.is_object() {
                err(format!("inputs.{name}"), "must be a JSON Schema object, e.g. {type: string}".into());
            } else if let Err(e) = jsonschema::meta::validate(schema) {
                err(format!("inputs.{name}"), format!("not a valid JSON Schema: {e}"));
            }
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            if !is_token(&step.id) {
                err(format!("steps[{i}].id"), "must be 1 to 64 letters, digits, '_' or '-'".into());
            }
            if let Some(first) = index.insert(&step.id, i) {
                err(format!("steps[{i}].id"), format!("duplicate step id '{}' (also steps[{first}])", step.id));
            }
            if step.kind().is_none() {
                err(
                    format!("steps[{i}]"),
                    "set exactly one of 'run' (a shell script), 'uses' (a built-in), 'http', 'llm', 'container' or 'sleep'"
                        .into(),
                );
            }
            if step.run.as_ref().is_some_and(|s| s.len() > MAX_SCRIPT_BYTES) {
                err(format!("steps[{i}].run"), format!("at most {MAX_SCRIPT_BYTES} bytes"));
            }
            validate_kinds(step, &mut |f, m| err(format!("steps[{i}].{f}"), m));
            if let Some(m) = timeout_problem(step.timeout_seconds) {
                err(format!("steps[{i}].timeout_seconds"), m);
            }
            if let Some(p) = step.priority.filter(|p| !PRIORITY_RANGE.contains(p)) {
                err(format!("steps[{i}].priority"), format!("{p} is out of range: -100 to 100"));
            }
            if let Some(r) = &step.rate_limit {
                if !is_token(&r.key) {
                    err(format!("steps[{i}].rate_limit.key"), "must be 1 to 64 letters, digits, '_' or '-'".into());
                }
                if !(r.per_second.is_finite() && (0.001..=10_000.0).contains(&r.per_second)) {
                    err(format!("steps[{i}].rate_limit.per_second"), "must be 0.001 to 10000".into());
                }
                if r.burst.is_some_and(|b| !(1..=10_000).contains(&b)) {
                    err(format!("steps[{i}].rate_limit.burst"), "must be 1 to 10000".into());
                }
            }
            if let Some(b) = &step.circuit_breaker {
                if !is_token(&b.key) {
                    err(
                        format!("steps[{i}].circuit_breaker.key"),
                        "must be 1 to 64 letters, digits, '_' or '-'".into(),
                    );
                }
                if !CircuitBreakerDef::FAILURES.contains(&b.failures) {
                    err(format!("steps[{i}].circuit_breaker.failures"), "must be 1 to 1000".into());
                }
                if !CircuitBreakerDef::COOLDOWN_SECS.contains(&b.cooldown_seconds) {
                    err(format!("steps[{i}].circuit_breaker.cooldown_seconds"), "must be 1 to 86400".into());
                }
            }
            if let Some(c) = &step.cache {
                if c.key.as_ref().is_some_and(|k| k.is_empty() || k.len() > CacheDef::MAX_KEY) {
                    err(format!("steps[{i}].cache.key"), format!("1 to {} bytes", CacheDef::MAX_KEY));
                }
                if !(1..=CacheDef::MAX_TTL_SECS).contains(&c.ttl_seconds) {
                    err(format!("steps[{i}].cache.ttl_seconds"), format!("must be 1 to {}", CacheDef::MAX_TTL_SECS));
                }
            }
            if let Some(cond) = &step.condition
                && let Err(e) = crate::expr::check(cond)
            {
                err(format!("steps[{i}].if"), e);
            }
            for (path, text) in step.templates() {
                if let Err(e) = crate::expr::check_template(text) {
                    err(format!("steps[{i}].{path}"), e);
                }
                let refs = crate::expr::secret_refs(text);
                let fillable = SECRET_FIELDS.iter().any(|f| path == *f || path.starts_with(&format!("{f}.")));
                if let Some(name) = refs.first().filter(|_| !fillable) {
                    err(
                        format!("steps[{i}].{path}"),
                        format!(
                            "${{{{ secrets.{name} }}}} is filled in only in http url, headers and body and llm base_url, system and prompt; here, declare the secret and use the environment variable {name}"
                        ),
                    );
                }
                for name in refs {
                    if !step.secret_names().contains(&name) {
                        err(
                            format!("steps[{i}].{path}"),
                            format!("uses secret {name}, which the step does not declare in 'secrets'"),
                        );
                    }
                }
            }
            for (j, name) in step.secrets.iter().enumerate() {
                if !is_secret_name(name) {
                    err(
                        format!("steps[{i}].secrets[{j}]"),
                        "secret names are A-Z, 0-9 and '_', not starting with a digit".into(),
                    );
                }
            }
            if let Some(m) = &step.matrix {
                let size = m.values().map(Vec::len).product::<usize>();
                if m.is_empty() || m.values().any(Vec::is_empty) {
                    err(format!("steps[{i}].matrix"), "every key needs at least one value".into());
                } else if size > MAX_MATRIX {
                    err(format!("steps[{i}].matrix"), format!("{size} combinations; at most {MAX_MATRIX}"));
                }
                if let Some(k) = m.keys().find(|k| !is_token(k)) {
                    err(format!("steps[{i}].matrix.{k}"), "keys are letters, digits, '_' or '-'".into());
                }
                if m.values().flatten().any(|v| v.is_object() || v.is_array()) {
                    err(format!("steps[{i}].matrix"), "values are strings, numbers or booleans".into());
                }
            }
            if let Some(r) = &step.retry {
                if !(1..=20).contains(&r.max_attempts) {
                    err(format!("steps[{i}].retry.max_attempts"), "must be 1 to 20".into());
                }
                if !(1.0..=10.0).contains(&r.multiplier) {
                    err(format!("steps[{i}].retry.multiplier"), "must be 1 to 10".into());
                }
                if r.initial_delay_ms > r.max_delay_ms || r.max_delay_ms > 86_400_000 {
                    err(format!("steps[{i}].retry"), "need initial_delay_ms <= max_delay_ms <= one day".into());
                }
            }
            for name in step.env.keys() {
                let ok = !name.is_empty()
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ok {
                    err(format!("steps[{i}].env.{name}"), "not a valid environment variable name".into());
                }
            }
        }
        let mut graph = DiGraphMap::<usize, ()>::new();
        for (i, step) in self.steps.iter().enumerate() {
            graph.add_node(i);
            for (j, need) in step.needs.iter().enumerate() {
                match index.get(need.as_str()) {
                    None => err(format!("steps[{i}].needs[{j}]"), format!("no step has id '{need}'")),
                    Some(&dep) if dep == i => err(format!("steps[{i}].needs[{j}]"), "a step cannot need itself".into()),
                    Some(&dep) => {
                        graph.add_edge(dep, i, ());
                    }
                }
            }
        }
        if let Err(cycle) = petgraph::algo::toposort(&graph, None) {
            let i = cycle.node_id();
            err(format!("steps[{i}].needs"), format!("step '{}' is part of a cycle in 'needs'", self.steps[i].id));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            let detail = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
            Err(Problem::new(ErrorCode::InvalidWorkflow, detail).with_errors(errors))
        }
    }
}

/// Checks the kind-specific fields of a step; `err(field, message)` for each problem.
fn validate_kinds(step: &StepDef, err: &mut dyn FnMut(&str, String)) {
    if step.checkout.enabled && step.run.is_none() && step.container.is_none() {
        err("checkout", "only shell (run) and container steps have a working directory to check out into".into());
    }
    if step.checkout.depth > CheckoutDef::MAX_DEPTH {
        err("checkout.depth", format!("at most {} (0 fetches all of the history)", CheckoutDef::MAX_DEPTH));
    }
    if let Some(problem) = step.checkout.path.as_deref().and_then(CheckoutDef::path_problem) {
        err("checkout.path", problem);
    }
    if let Some(h) = &step.http {
        if !HttpStep::METHODS.contains(&h.method.to_ascii_uppercase().as_str()) {
            err("http.method", format!("'{}' is not one of {}", h.method, HttpStep::METHODS.join(", ")));
        }
        if !h.url.contains("${{") && url::Url::parse(&h.url).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
            err("http.url", format!("'{}' is not an http:// or https:// URL", h.url));
        }
        for (n, m) in h.success.iter().enumerate() {
            if let Err(e) = m.range() {
                err(&format!("http.success[{n}]"), e);
            }
        }
        if h.max_body_bytes.is_some_and(|b| b == 0 || b > HttpStep::MAX_BODY_BYTES) {
            err("http.max_body_bytes", format!("must be 1 to {}", HttpStep::MAX_BODY_BYTES));
        }
        for name in h.headers.keys() {
            if http_header_name_invalid(name) {
                err(&format!("http.headers.{name}"), "not a valid header name".into());
            }
        }
    }
    if let Some(l) = &step.llm {
        if !l.base_url.contains("${{")
            && url::Url::parse(&l.base_url).map_or(true, |u| !matches!(u.scheme(), "http" | "https"))
        {
            err("llm.base_url", format!("'{}' is not an http:// or https:// URL", l.base_url));
        }
        if l.model.trim().is_empty() {
            err("llm.model", "must not be empty".into());
        }
        if l.prompt.trim().is_empty() {
            err("llm.prompt", "must not be empty".into());
        }
        if l.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            err("llm.temperature", "must be 0 to 2".into());
        }
        if l.max_tokens.is_some_and(|t| !(1..=1_000_000).contains(&t)) {
            err("llm.max_tokens", "must be 1 to 1000000".into());
        }
        if l.api_key_secret.as_deref().is_some_and(|s| !is_secret_name(s)) {
            err("llm.api_key_secret", "secret names are A-Z, 0-9 and '_', not starting with a digit".into());
        }
    }
    if let Some(c) = &step.container {
        let image_ok = !c.image.is_empty()
            && c.image.len() <= 512
            && !c.image.starts_with('-')
            && c.image.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@${} ".contains(&b));
        if !image_ok {
            err("container.image", format!("'{}' is not an image reference", c.image));
        }
    }
    if let Some(s) = step.sleep
        && !(s.is_finite() && (0.0..=MAX_SLEEP_SECS).contains(&s))
    {
        err("sleep", format!("must be 0 to {MAX_SLEEP_SECS} seconds"));
    }
    for (k, v) in &step.runs_on {
        if !is_token(k) || v.is_empty() || v.len() > 128 {
            err(&format!("runs_on.{k}"), "labels are letters, digits, '_' or '-', with a non-empty value".into());
        }
    }
    if let Some(l) = &step.limits {
        if l.cpu_seconds == Some(0) {
            err("limits.cpu_seconds", "must be at least 1".into());
        }
        if l.memory_mb.is_some_and(|m| m < 4) {
            err("limits.memory_mb", "must be at least 4".into());
        }
    }
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn checkout_is_a_flag_or_options_and_reads_as_written_before() {
        let read = |v: serde_json::Value| serde_json::from_value::<CheckoutDef>(v);
        let on = CheckoutDef { enabled: true, ..Default::default() };
        assert_eq!(read(serde_json::json!(true)).unwrap(), on);
        assert_eq!(read(serde_json::json!(false)).unwrap(), CheckoutDef::default());
        let all = read(serde_json::json!({"depth": 0, "tags": true})).unwrap();
        assert_eq!(all, CheckoutDef { enabled: true, depth: 0, tags: true, ..Default::default() });
        // Submodules only when asked for, and written only then (older readers know no such field).
        let with_submodules = read(serde_json::json!({"submodules": true})).unwrap();
        assert_eq!(with_submodules, CheckoutDef { enabled: true, submodules: true, ..Default::default() });
        assert_eq!(
            serde_json::to_value(&with_submodules).unwrap(),
            serde_json::json!({"depth": 1, "tags": false, "submodules": true})
        );
        let nested = read(serde_json::json!({"path": "src/app"})).unwrap();
        assert_eq!(nested, CheckoutDef { enabled: true, path: Some("src/app".into()), ..Default::default() });
        assert_eq!(
            serde_json::to_value(&nested).unwrap(),
            serde_json::json!({"depth": 1, "tags": false, "path": "src/app"})
        );
        assert_eq!(read(serde_json::json!({"tags": true})).unwrap().depth, 1, "depth 1 unless said");
        // A mistake is named, not "no variant matched".
        let unknown = read(serde_json::json!({"depht": 5})).unwrap_err().to_string();
        assert!(unknown.contains("unknown field `depht`"), "{unknown}");
        let string = read(serde_json::json!("yes")).unwrap_err().to_string();
        assert!(string.contains("expected true, false or {depth, tags, path, submodules}"), "{string}");
        assert!(read(serde_json::json!({"depth": -1})).is_err());
        // Written as `true` where nothing more is asked, so older readers still read it.
        assert_eq!(serde_json::to_value(&on).unwrap(), serde_json::json!(true));
        assert_eq!(serde_json::to_value(&all).unwrap(), serde_json::json!({"depth": 0, "tags": true}));
        let step: StepDef = serde_yaml_ng::from_str("{id: a, run: 'true', checkout: {depth: 200000}}").unwrap();
        let mut errors = Vec::new();
        validate_kinds(&step, &mut |field, message| errors.push(format!("{field}: {message}")));
        assert!(errors.iter().any(|e| e.starts_with("checkout.depth")), "{errors:?}");
        // A path stays inside the working directory.
        let wide = "é".repeat(200); // 200 characters, 400 bytes
        for bad in [
            "",
            ".",
            "..",
            "/etc",
            "../up",
            "a/../../b",
            "a//b",
            "./a",
            "a/",
            "a\\b",
            "a\0b",
            "a\nb",
            ".git",
            "src/.GIT/x",
            ".taskmesh-output",
            &wide,
            &"x".repeat(256),
        ] {
            assert!(CheckoutDef::path_problem(bad).is_some(), "{bad:?}");
        }
        for good in ["src", "src/app", "a.b/c-d_e", ".hidden", "src/.taskmesh-output", "a.git"] {
            assert_eq!(CheckoutDef::path_problem(good), None, "{good:?}");
        }
        let step: StepDef = serde_yaml_ng::from_str("{id: a, run: 'true', checkout: {path: ../x}}").unwrap();
        let mut errors = Vec::new();
        validate_kinds(&step, &mut |field, message| errors.push(format!("{field}: {message}")));
        assert!(errors.iter().any(|e| e.starts_with("checkout.path")), "{errors:?}");
    }

    use super::*;

    #[test]
    fn yaml_that_expands_past_its_size_is_refused_and_ordinary_anchors_pass() {
        // 3,000 aliases of a list of 3,000 items: nine million nodes from 15 kB.
        let wide = format!("a: &a [{}]\nb: [{}]\n", vec!["x"; 3000].join(","), vec!["*a"; 3000].join(","));
        let refused = yaml_to_json(&wide).unwrap_err();
        assert!(refused.contains("expands to more than its size allows"), "{refused}");
        assert!(WorkflowDef::parse_yaml(&wide).is_err());
        // 1,000 aliases of one string of 64 kB: 64 MB from 70 kB.
        let long = format!("a: &a \"{}\"\nb: [{}]\n", "x".repeat(64 * 1024), vec!["*a"; 1000].join(","));
        assert!(serde_yaml_ng::from_str::<serde_json::Value>(&long).is_ok(), "the parser alone takes it");
        assert!(yaml_to_json(&long).unwrap_err().contains("expands to more than its size allows"));
        // Settings shared through an anchor, as people write them.
        let shared = "name: w\nx-env: &e {REGION: eu}\nsteps:\n  - {id: a, run: 'true', env: *e}\n  - {id: b, run: 'true', env: *e}\n";
        let value = yaml_to_json(shared).unwrap();
        assert_eq!(value["steps"][1]["env"]["REGION"], "eu");
        assert!(check_yaml_expansion("!tag {a: [1, 2.5, null, true, ~, -3]}").is_ok(), "tags and every scalar kind");
        assert!(yaml_to_json("a: [").is_err(), "malformed");
    }

    #[test]
    fn a_timeout_is_one_second_to_a_year() {
        let fields = |yaml: &str| match WorkflowDef::parse_yaml(yaml) {
            Ok(_) => Vec::new(),
            Err(p) => p.errors.into_iter().map(|e| e.field).collect::<Vec<_>>(),
        };
        let both = |run: u64, step: u64| {
            fields(&format!(
                "name: t\ntimeout_seconds: {run}\nsteps:\n  - {{id: a, run: 'true', timeout_seconds: {step}}}\n"
            ))
        };
        assert_eq!(both(1, MAX_TIMEOUT_SECS), Vec::<String>::new());
        assert_eq!(both(0, MAX_TIMEOUT_SECS + 1), ["timeout_seconds", "steps[0].timeout_seconds"]);
        assert_eq!(both(10_000_000_000_000, 1), ["timeout_seconds"], "a time past the calendar's end");
    }

    #[test]
    fn step_kinds_validate_their_fields() {
        let ok = WorkflowDef::parse_yaml(
            "name: k\nsteps:\n  - {id: h, http: {url: 'https://example.com/${{ inputs.x }}', success: [200, 2xx, '300-302'], headers: {Authorization: 'Bearer ${{ secrets.TOKEN }}'}}, secrets: [TOKEN]}\n  - {id: l, llm: {base_url: 'http://127.0.0.1:1/v1', model: m, prompt: 'hi ${{ inputs.x }}', api_key_secret: KEY}}\n  - {id: c, container: {image: 'alpine:3.20', command: [echo, hi]}}\n  - {id: s, sleep: 0.5, runs_on: {gpu: nvidia}}\n",
        )
        .unwrap();
        assert_eq!(
            ok.steps.iter().map(|s| s.kind().unwrap()).collect::<Vec<_>>(),
            ["http", "llm", "container", "sleep"]
        );
        assert!(ok.steps[0].http.as_ref().unwrap().succeeds(301));
        assert!(!ok.steps[0].http.as_ref().unwrap().succeeds(404));
        assert_eq!(ok.steps[1].secret_names(), ["KEY"]);
        let p = problem(
            "name: k\nsteps:\n  - {id: h, http: {method: FETCH, url: 'ftp://x', success: [700, 'abc']}}\n  - {id: l, llm: {base_url: nope, model: '', prompt: x, temperature: 3}}\n  - {id: c, container: {image: '--privileged'}}\n  - {id: s, sleep: -1}\n  - {id: t, run: 'true', sleep: 1}\n  - {id: u, http: {url: 'http://x/${{ secrets.NOPE }}'}}\n  - {id: v, secrets: [T], run: 'echo ${{ secrets.T }}'}\n  - {id: w, uses: noop, checkout: true}\n  - {id: x, run: make, checkout: true}\n",
        );
        let fields: Vec<&str> = p.errors.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "steps[0].http.method",
            "steps[0].http.url",
            "steps[0].http.success[0]",
            "steps[0].http.success[1]",
            "steps[1].llm.base_url",
            "steps[1].llm.model",
            "steps[1].llm.temperature",
            "steps[2].container.image",
            "steps[3].sleep",
            "steps[4]",
            "steps[5].http.url",
            "steps[6].run",
            "steps[7].checkout",
        ] {
            assert!(fields.contains(&f), "{f} in {fields:?}");
        }
        assert!(!fields.iter().any(|f| f.starts_with("steps[8]")), "a shell step may check out: {fields:?}");
    }

    #[test]
    fn labels_match_exactly_or_by_wildcard() {
        let have: BTreeMap<String, String> = [("gpu".into(), "nvidia".into()), ("os".into(), "linux".into())].into();
        let need = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(labels_match(&need(&[]), &have));
        assert!(labels_match(&need(&[("gpu", "NVIDIA")]), &have));
        assert!(labels_match(&need(&[("gpu", "*"), ("os", "linux")]), &have));
        assert!(!labels_match(&need(&[("gpu", "amd")]), &have));
        assert!(!labels_match(&need(&[("arch", "*")]), &have));
    }

    fn problem(yaml: &str) -> Problem {
        WorkflowDef::parse_yaml(yaml).expect_err("should be invalid")
    }

    #[test]
    fn parses_the_documented_example() {
        let def = WorkflowDef::parse_yaml(
            "name: example\nsteps:\n  - id: build\n    run: echo building\n  - id: test\n    needs: [build]\n    run: echo testing\n",
        )
        .unwrap();
        assert_eq!(def.steps.len(), 2);
        assert_eq!(def.steps[1].needs, vec!["build".to_string()]);
    }

    #[test]
    fn rejects_unknown_fields_by_name() {
        let p = problem("name: x\nsteps:\n  - id: a\n    run: 'true'\n    bogus: 1\n");
        assert_eq!(p.code, ErrorCode::InvalidWorkflow);
        assert!(p.detail.contains("bogus"), "{}", p.detail);
    }

    #[test]
    fn rejects_cycles_duplicates_and_unknown_needs() {
        let p =
            problem("name: x\nsteps:\n  - {id: a, run: 'true', needs: [b]}\n  - {id: b, run: 'true', needs: [a]}\n");
        assert!(p.detail.contains("cycle"), "{}", p.detail);
        let p = problem("name: x\nsteps:\n  - {id: a, run: 'true'}\n  - {id: a, run: 'true'}\n");
        assert!(p.detail.contains("duplicate step id 'a'"), "{}", p.detail);
        let p = problem("name: x\nsteps:\n  - {id: a, run: 'true', needs: [zz]}\n");
        assert_eq!(p.errors[0].field, "steps[0].needs[0]");
        let p = problem("name: x\nsteps:\n  - {id: a, run: 'true', needs: [a]}\n");
        assert!(p.detail.contains("itself"), "{}", p.detail);
    }

    #[test]
    fn rejects_bad_expressions_and_retry_policies() {
        let p = problem(
            "name: x\nsteps:\n  - {id: a, run: 'echo ${{ inputs.x', if: 'inputs.x ==', retry: {max_attempts: 0}}\n",
        );
        let fields: Vec<&str> = p.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["steps[0].if", "steps[0].run", "steps[0].retry.max_attempts"], "{p:?}");
        let p = problem("name: x\nsteps:\n  - {id: a, run: 'true', if: 'secrets.x'}\n");
        assert!(p.detail.contains("unknown variable 'secrets'"), "{}", p.detail);
    }

    #[test]
    fn rejects_a_cache_with_a_bad_key_or_time_to_live() {
        let long = "k".repeat(CacheDef::MAX_KEY + 1);
        for (cache, field) in [
            ("{ttl_seconds: 0}".to_string(), "steps[0].cache.ttl_seconds"),
            ("{ttl_seconds: 2592001}".to_string(), "steps[0].cache.ttl_seconds"),
            (format!("{{key: {long}}}"), "steps[0].cache.key"),
            ("{key: ''}".to_string(), "steps[0].cache.key"),
            ("{key: '${{ inputs. }}'}".to_string(), "steps[0].cache.key"),
        ] {
            let p = problem(&format!("name: x\nsteps:\n  - {{id: a, uses: noop, cache: {cache}}}\n"));
            let fields: Vec<&str> = p.errors.iter().map(|e| e.field.as_str()).collect();
            assert_eq!(fields, [field], "{cache}: {p:?}");
        }
        let ok = WorkflowDef::parse_yaml("name: x\nsteps:\n  - {id: a, uses: noop, cache: {}}\n").unwrap();
        assert_eq!(ok.steps[0].cache, Some(CacheDef { key: None, ttl_seconds: 86_400 }), "a day by default");
    }

    #[test]
    fn rejects_a_circuit_breaker_with_a_bad_key_threshold_or_cooldown() {
        for (breaker, field) in [
            ("{key: 'a b'}", "steps[0].circuit_breaker.key"),
            ("{key: k, failures: 0}", "steps[0].circuit_breaker.failures"),
            ("{key: k, failures: 1001}", "steps[0].circuit_breaker.failures"),
            ("{key: k, cooldown_seconds: 0}", "steps[0].circuit_breaker.cooldown_seconds"),
            ("{key: k, cooldown_seconds: 86401}", "steps[0].circuit_breaker.cooldown_seconds"),
        ] {
            let p = problem(&format!("name: x\nsteps:\n  - {{id: a, uses: noop, circuit_breaker: {breaker}}}\n"));
            let fields: Vec<&str> = p.errors.iter().map(|e| e.field.as_str()).collect();
            assert_eq!(fields, [field], "{breaker}: {p:?}");
        }
        let ok =
            WorkflowDef::parse_yaml("name: x\nsteps:\n  - {id: a, uses: noop, circuit_breaker: {key: k}}\n").unwrap();
        let want = CircuitBreakerDef { key: "k".into(), failures: 5, cooldown_seconds: 30 };
        assert_eq!(ok.steps[0].circuit_breaker, Some(want), "five failures, thirty seconds by default");
    }

    #[test]
    fn retry_policies_classify_failures_and_cap_delays() {
        let r: RetryPolicy =
            serde_yaml_ng::from_str("{max_attempts: 3, on: [2, timeout], initial_delay_ms: 100, max_delay_ms: 300}")
                .unwrap();
        assert!(r.retries(Some(2), false));
        assert!(!r.retries(Some(1), false));
        assert!(r.retries(None, true));
        assert_eq!((r.ceiling_ms(1), r.ceiling_ms(2), r.ceiling_ms(3)), (100, 200, 300));
    }

    #[test]
    fn typed_inputs_get_defaults_and_reject_misfits_by_name() {
        let def = WorkflowDef::parse_yaml(
            "name: x\ninputs:\n  env: {type: string, enum: [staging, prod]}\n  replicas: {type: integer, minimum: 1, default: 2}\nsteps:\n  - {id: a, run: 'true'}\n",
        )
        .unwrap();
        let ok = def.resolve_inputs([("env".to_string(), serde_json::json!("prod"))].into()).unwrap();
        assert_eq!(ok["replicas"], 2);
        let p = def
            .resolve_inputs(
                [("env".to_string(), serde_json::json!("dev")), ("replicas".to_string(), serde_json::json!(0))].into(),
            )
            .unwrap_err();
        assert_eq!(p.code, ErrorCode::InvalidInput);
        let mut fields: Vec<&str> = p.errors.iter().map(|e| e.field.as_str()).collect();
        fields.sort();
        assert_eq!(fields, ["inputs.env", "inputs.replicas"], "{p:?}");
        let p = def.resolve_inputs(Default::default()).unwrap_err();
        assert!(p.detail.contains("env"), "missing required input named: {}", p.detail);
        let p = def
            .resolve_inputs([("env".into(), serde_json::json!("prod")), ("typo".into(), serde_json::json!(1))].into())
            .unwrap_err();
        assert!(p.detail.contains("typo"), "{}", p.detail);
        let bad = problem("name: x\ninputs:\n  n: {type: nonsense}\nsteps:\n  - {id: a, run: 'true'}\n");
        assert_eq!(bad.errors[0].field, "inputs.n");
    }

    #[test]
    fn matrices_expand_into_instances_and_fan_in() {
        let def = WorkflowDef::parse_yaml(
            "name: m\nsteps:\n  - {id: test, matrix: {os: [linux, mac], v: [1, 2]}, run: 'echo ${{ matrix.os }}'}\n  - {id: report, needs: [test], run: 'true'}\n",
        )
        .unwrap()
        .expand_matrices()
        .unwrap();
        let ids: Vec<&str> = def.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["test-1", "test-2", "test-3", "test-4", "report"]);
        assert_eq!(def.steps[1].matrix_values.as_ref().unwrap()["os"], "linux");
        assert_eq!(def.steps[1].matrix_values.as_ref().unwrap()["v"], 2);
        assert_eq!(def.steps[4].needs, ["test-1", "test-2", "test-3", "test-4"]);
        let p = problem("name: m\nsteps:\n  - {id: t, matrix: {os: []}, run: 'true'}\n");
        assert_eq!(p.errors[0].field, "steps[0].matrix");
    }

    #[test]
    fn rejects_bad_ids_and_missing_bodies() {
        let p = problem("name: x\nsteps:\n  - {id: 'a.b', run: 'true'}\n  - {id: c}\n");
        assert_eq!(p.errors.len(), 2, "{p:?}");
    }
}
