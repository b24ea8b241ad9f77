//! Expressions in workflows: CEL (the Common Expression Language) for `if:` conditions and
//! `${{ … }}` templates in `run` and `env`.
//!
//! Variables: `inputs` (the run's inputs), `matrix` (a matrix instance's values), `steps` (`steps.<id>.status`,
//! `steps.<id>.outputs.<key>`, `steps.<id>.exit_code`) and `run` (`run.id`). Functions on top of
//! CEL's standard library: `success()` (every step this one needs succeeded, or failed with
//! `continue_on_error`), `failure()` (one of them failed or timed out), `cancelled()` (the run
//! is being cancelled) and `always()`. Expressions are compiled when a workflow is submitted, so
//! a syntax error or an unknown variable is a 422, not a failure at run time.

use std::sync::Arc;

use cel::{Context, Program};

/// The variables an expression may use.
pub const VARIABLES: &[&str] = &["inputs", "steps", "run", "matrix"];
/// The status functions.
pub const FUNCTIONS: &[&str] = &["success", "failure", "cancelled", "always"];

/// The variables a trigger's filter and inputs may use: the CloudEvent.
pub const TRIGGER_VARIABLES: &[&str] = &["event"];
/// What a [`Scope`] evaluates against; validation has already narrowed each use.
const EVERY_VARIABLE: &[&str] = &["inputs", "steps", "run", "matrix", "event"];

/// Compiles `source` and checks it only names variables in `known`.
fn compile(source: &str, known: &[&str]) -> Result<Program, String> {
    let program = Program::compile(source).map_err(|e| format!("invalid expression '{source}': {e}"))?;
    let refs = program.references();
    if let Some(unknown) = refs.variables().into_iter().find(|v| !known.contains(v)) {
        return Err(format!("unknown variable '{unknown}' in '{source}' (known: {})", known.join(", ")));
    }
    Ok(program)
}

/// Compiles a step's or workflow's expression: it may name [`VARIABLES`].
pub fn check(source: &str) -> Result<Program, String> {
    compile(source, VARIABLES)
}

/// Compiles a trigger's filter: it may name [`TRIGGER_VARIABLES`].
pub fn check_trigger(source: &str) -> Result<Program, String> {
    compile(source, TRIGGER_VARIABLES)
}

/// Checks every `${{ … }}` of a trigger's input template.
pub fn check_trigger_template(template: &str) -> Result<(), String> {
    segments(template)?.into_iter().try_for_each(|(_, _, source)| check_trigger(source).map(drop))
}

/// The `${{ … }}` parts of a template, as (start, end, expression) byte ranges.
fn segments(template: &str) -> Result<Vec<(usize, usize, &str)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(open) = template[at..].find("${{") {
        let start = at + open;
        let close = template[start..].find("}}").ok_or_else(|| format!("unclosed '${{{{' in '{template}'"))?;
        let end = start + close + 2;
        out.push((start, end, template[start + 3..end - 2].trim()));
        at = end;
    }
    Ok(out)
}

/// Checks every `${{ … }}` of a template. `${{ secrets.NAME }}` is left for the executor.
pub fn check_template(template: &str) -> Result<(), String> {
    for (_, _, source) in segments(template)? {
        if secret_ref(source).is_none() {
            check(source)?;
        }
    }
    Ok(())
}

/// `NAME` when `source` is exactly `secrets.NAME`: a secret the executor fills in, never the
/// scheduler (events carry secret names, never values).
fn secret_ref(source: &str) -> Option<&str> {
    source.strip_prefix("secrets.").filter(|n| crate::workflow::is_secret_name(n))
}

/// The secrets a template names with `${{ secrets.NAME }}` (none if it does not parse).
pub fn secret_refs(template: &str) -> Vec<&str> {
    segments(template)
        .map(|parts| parts.into_iter().filter_map(|(_, _, s)| secret_ref(s)).collect())
        .unwrap_or_default()
}

/// Whether `template` still holds an expression a render would have replaced (anything but a
/// secret reference, which is left for the executor), or does not parse.
pub fn unrendered(template: &str) -> bool {
    segments(template).map_or(true, |parts| parts.iter().any(|(_, _, s)| secret_ref(s).is_none()))
}

/// Fills in `${{ secrets.NAME }}` from `secrets` (name, value); other text is kept as it is.
/// A name not in `secrets` is an error.
pub fn render_secrets(template: &str, secrets: &[(String, String)]) -> Result<String, String> {
    let parts = segments(template)?;
    let mut out = String::with_capacity(template.len());
    let mut at = 0;
    for (start, end, source) in parts {
        let Some(name) = secret_ref(source) else { continue };
        let value = secrets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("secret {name} was not opened for this step"))?;
        out.push_str(&template[at..start]);
        out.push_str(value);
        at = end;
    }
    out.push_str(&template[at..]);
    Ok(out)
}

/// What expressions see: the JSON values of `inputs`, `steps` and `run`, and the outcome of the
/// step's needs for the status functions.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub inputs: serde_json::Value,
    pub steps: serde_json::Value,
    pub run: serde_json::Value,
    /// The step instance's matrix values (`null` outside a matrix).
    pub matrix: serde_json::Value,
    pub needs_succeeded: bool,
    pub needs_failed: bool,
    pub cancelled: bool,
    /// The CloudEvent that triggers a run, for trigger filters and inputs (`null` elsewhere).
    pub event: serde_json::Value,
}

impl Scope {
    fn context(&self) -> Result<Context<'_, '_>, String> {
        let mut ctx = Context::default();
        ctx.add_variable_from_value("inputs", to_cel(&self.inputs));
        ctx.add_variable_from_value("steps", to_cel(&self.steps));
        ctx.add_variable_from_value("run", to_cel(&self.run));
        ctx.add_variable_from_value("matrix", to_cel(&self.matrix));
        ctx.add_variable_from_value("event", to_cel(&self.event));
        let (ok, failed, cancelled) = (self.needs_succeeded, self.needs_failed, self.cancelled);
        let flags: Arc<[bool; 3]> = Arc::new([ok, failed, cancelled]);
        let f = flags.clone();
        ctx.add_function("success", move || f[0]).map_err(|e| format!("{e:?}"))?;
        let f = flags.clone();
        ctx.add_function("failure", move || f[1]).map_err(|e| format!("{e:?}"))?;
        let f = flags;
        ctx.add_function("cancelled", move || f[2]).map_err(|e| format!("{e:?}"))?;
        ctx.add_function("always", || true).map_err(|e| format!("{e:?}"))?;
        Ok(ctx)
    }

    /// Evaluates a condition; it must be a boolean.
    pub fn condition(&self, source: &str) -> Result<bool, String> {
        let program = compile(source, EVERY_VARIABLE)?;
        match program.execute(&self.context()?).map_err(|e| format!("evaluating '{source}': {e}"))? {
            cel::Value::Bool(b) => Ok(b),
            other => Err(format!("'{source}' is {other:?}, not a boolean")),
        }
    }

    /// A value from a template: a template that is exactly one `${{ expr }}` gives the
    /// expression's value with its type; any other string is rendered as text.
    pub fn value(&self, template: &str) -> Result<serde_json::Value, String> {
        let parts = segments(template)?;
        if let [(0, end, source)] = parts.as_slice()
            && *end == template.len()
            && secret_ref(source).is_none()
        {
            let value = compile(source, EVERY_VARIABLE)?
                .execute(&self.context()?)
                .map_err(|e| format!("evaluating '{source}': {e}"))?;
            return value.json().map_err(|e| format!("'{source}' has no JSON value: {e}"));
        }
        self.render(template).map(serde_json::Value::String)
    }

    /// Renders a template, replacing each `${{ … }}` with its value as text.
    pub fn render(&self, template: &str) -> Result<String, String> {
        let parts = segments(template)?;
        if parts.is_empty() {
            return Ok(template.to_string());
        }
        let ctx = self.context()?;
        let mut out = String::with_capacity(template.len());
        let mut at = 0;
        for (start, end, source) in parts {
            if secret_ref(source).is_some() {
                continue; // the executor's to fill in
            }
            out.push_str(&template[at..start]);
            let value =
                compile(source, EVERY_VARIABLE)?.execute(&ctx).map_err(|e| format!("evaluating '{source}': {e}"))?;
            let value = text(&value);
            // A value must not smuggle in a template of its own (say `${{ secrets.TOKEN }}` in
            // an input, for the executor to fill in): refuse it.
            if value.contains("${{") {
                return Err(format!("the value of '{source}' contains '${{{{', which would be read as a template"));
            }
            out.push_str(&value);
            at = end;
        }
        out.push_str(&template[at..]);
        Ok(out)
    }
}

/// JSON to CEL, with whole numbers as CEL `int` (JSON has no unsigned type, and CEL does not
/// mix `uint` with `int` literals).
fn to_cel(v: &serde_json::Value) -> cel::Value {
    use serde_json::Value as J;
    match v {
        J::Null => cel::Value::Null,
        J::Bool(b) => cel::Value::Bool(*b),
        J::Number(n) => {
            n.as_i64().map(cel::Value::Int).or_else(|| n.as_f64().map(cel::Value::Float)).unwrap_or(cel::Value::Null)
        }
        J::String(s) => cel::Value::String(Arc::new(s.clone())),
        J::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        J::Object(map) => cel::Value::from(
            map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect::<std::collections::HashMap<_, _>>(),
        ),
    }
}

fn text(value: &cel::Value) -> String {
    match value {
        cel::Value::String(s) => s.to_string(),
        cel::Value::Null => String::new(),
        other => match other.json() {
            Ok(serde_json::Value::String(s)) => s,
            Ok(v) => v.to_string(),
            Err(_) => format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope() -> Scope {
        Scope {
            inputs: json!({"env": "prod", "n": 3}),
            steps: json!({"build": {"status": "succeeded", "outputs": {"version": "1.2.3"}}}),
            run: json!({"id": "r1"}),
            matrix: json!({"os": "linux"}),
            needs_succeeded: true,
            needs_failed: false,
            cancelled: false,
            event: json!({"type": "order.created", "data": {"amount": 120, "id": "o-1"}}),
        }
    }

    #[test]
    fn a_value_cannot_smuggle_in_a_template() {
        let mut s = scope();
        s.inputs = json!({"url": "https://x.example/${{ secrets.TOKEN }}"});
        let err = s.render("${{ inputs.url }}").unwrap_err();
        assert!(err.contains("would be read as a template"), "{err}");
    }

    #[test]
    fn a_lone_expression_keeps_its_type_and_templates_render_as_text() {
        let s = scope();
        assert_eq!(s.value("${{ event.data.amount }}").unwrap(), json!(120));
        assert_eq!(s.value("${{ event.data.amount > 100 }}").unwrap(), json!(true));
        assert_eq!(s.value("order ${{ event.data.id }}").unwrap(), json!("order o-1"));
        assert_eq!(s.value("plain").unwrap(), json!("plain"));
        assert!(s.condition("event.type == 'order.created' && event.data.amount > 100").unwrap());
    }

    #[test]
    fn conditions_see_inputs_steps_and_status_functions() {
        let s = scope();
        assert!(s.condition("inputs.env == 'prod' && success()").unwrap());
        assert!(!s.condition("failure()").unwrap());
        assert!(s.condition("always()").unwrap());
        assert!(s.condition("steps.build.outputs.version.startsWith('1.')").unwrap());
        assert!(s.condition("inputs.n > 2").unwrap());
        assert!(s.condition("'x'").unwrap_err().contains("not a boolean"));
    }

    #[test]
    fn templates_render_values_as_text() {
        let s = scope();
        assert_eq!(
            s.render("deploy ${{ steps.build.outputs.version }} to ${{inputs.env}}").unwrap(),
            "deploy 1.2.3 to prod"
        );
        assert_eq!(s.render("n=${{ inputs.n + 1 }}").unwrap(), "n=4");
        assert_eq!(s.render("plain").unwrap(), "plain");
        assert_eq!(s.render("on ${{ matrix.os }}").unwrap(), "on linux");
    }

    #[test]
    fn secret_references_are_left_for_the_executor() {
        let s = scope();
        let t = "Bearer ${{ secrets.TOKEN }} for ${{ inputs.env }}";
        check_template(t).unwrap();
        let rendered = s.render(t).unwrap();
        assert_eq!(rendered, "Bearer ${{ secrets.TOKEN }} for prod");
        assert_eq!(secret_refs(&rendered), ["TOKEN"]);
        assert_eq!(render_secrets(&rendered, &[("TOKEN".into(), "abc".into())]).unwrap(), "Bearer abc for prod");
        assert!(render_secrets(&rendered, &[]).is_err());
        assert!(check_template("${{ secrets.lower }}").is_err());
        assert!(!unrendered(&rendered), "only a secret reference is left");
        assert!(unrendered(t) && unrendered("${{ oops"));
        assert!(!unrendered("no templates"));
    }

    #[test]
    fn checks_catch_typos_before_runtime() {
        assert!(check("inputs.env ==").unwrap_err().contains("invalid expression"));
        assert!(check("input.env == 'x'").unwrap_err().contains("unknown variable 'input'"));
        assert!(check_template("echo ${{ inputs.x").unwrap_err().contains("unclosed"));
        assert!(check_template("echo ${{ nope.x }}").is_err());
        assert!(check_template("echo ${{ inputs.x }} and ${{ steps.a.status }}").is_ok());
    }
}
