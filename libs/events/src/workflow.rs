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
    /// Cancel the whole run after this many seconds; it ends `timed_out`.
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
    pub steps: Vec<StepDef>,
}

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

impl GroupPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupPolicy::Queue => "queue",
            GroupPolicy::CancelInProgress => "cancel_in_progress",
            GroupPolicy::Skip => "skip",
        }
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

/// Lowest and highest priorities.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;

/// One step. Exactly one of `run` or `uses` says what it does.
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
    /// A built-in step: `noop` does nothing and succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<Builtin>,
    /// Environment variables for the step (the executor's own are never passed on).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Kill the step after this many seconds; it ends `timed_out`.
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

impl WorkflowDef {
    /// Parses YAML (a superset of JSON) and validates.
    pub fn parse_yaml(text: &str) -> Result<Self, Problem> {
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
        if self.timeout_seconds == Some(0) {
            err("timeout_seconds".into(), "must be at least 1".into());
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
            match (&step.run, &step.uses) {
                (Some(_), Some(_)) => err(format!("steps[{i}]"), "set either 'run' or 'uses', not both".into()),
                (None, None) => err(format!("steps[{i}]"), "set 'run' (a shell script) or 'uses' (a built-in)".into()),
                (Some(script), None) if script.len() > MAX_SCRIPT_BYTES => {
                    err(format!("steps[{i}].run"), format!("at most {MAX_SCRIPT_BYTES} bytes"))
                }
                _ => {}
            }
            if step.timeout_seconds == Some(0) {
                err(format!("steps[{i}].timeout_seconds"), "must be at least 1".into());
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
            if let Some(cond) = &step.condition
                && let Err(e) = crate::expr::check(cond)
            {
                err(format!("steps[{i}].if"), e);
            }
            if let Some(script) = &step.run
                && let Err(e) = crate::expr::check_template(script)
            {
                err(format!("steps[{i}].run"), e);
            }
            for (name, value) in &step.env {
                if let Err(e) = crate::expr::check_template(value) {
                    err(format!("steps[{i}].env.{name}"), e);
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

#[cfg(test)]
mod tests {
    use super::*;

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
