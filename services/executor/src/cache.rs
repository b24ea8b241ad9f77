//! `cache:` steps: the outcome of a success is kept, and a later step of the tenant's that would
//! do the same thing succeeds at once with it, without running.
//!
//! "The same thing" is a SHA-256 over what decides a step's outcome: its definition as
//! dispatched (templates rendered, so inputs and upstream outputs it uses count), without what
//! only names, orders or schedules it (`id`, `name`, `needs`, `if`, `continue_on_error`,
//! `retry`, `priority`, `rate_limit`, `circuit_breaker`, `timeout_seconds`; and
//! `cache.ttl_seconds`); its
//! `cache.key`, rendered; and, for a `checkout` step, the repository connection, the URL and
//! the commit. A matrix instance's values count (they are in the definition). Secrets count
//! by name, not value; the step's secrets and checkout are opened before the cache is looked
//! at, so a step whose secret was deleted fails as it would have.
//!
//! Each tenant's outcomes live on the `{NS}_CACHE` stream, one subject per key
//! (`{ns}.cache.<tenant>.<sha256>`) holding the latest success. The stream keeps none longer
//! than [`CacheDef::MAX_TTL_SECS`] and, past 1,000,000 outcomes or `nats.cache_max_bytes`,
//! drops the oldest. A step reuses one only if it finished within the reusing step's own
//! `ttl_seconds`. A success is kept before it is reported, so a run seen to have ended has
//! kept its steps' outcomes.
//!
//! The cache is not the source of truth: the run's log holds the outcome a step got (with
//! `cached_from` naming where it came from), so replaying the log needs no cache. An outcome
//! lost (the executor killed before keeping it, or the stream's oldest dropped) is a step run
//! again; steps with the same key running at the same time both run.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use taskmesh_bus::Bus;
use taskmesh_events::command::Dispatch;
use taskmesh_events::expr::unrendered;

use taskmesh_events::workflow::{
    Builtin, CacheDef, CheckoutDef, ContainerStep, HttpStep, LlmStep, StepDef, StepLimits,
};
use taskmesh_events::{CachedFrom, StepOutcome};
use uuid::Uuid;

/// What is kept for a key: the outcome, and the step that got it.
#[derive(Serialize, Deserialize)]
struct Kept {
    run_id: Uuid,
    step: String,
    attempt: u32,
    outcome: StepOutcome,
}

/// What the key hashes (see the module's docs).
#[derive(Serialize)]
struct Material<'a> {
    v: u8,
    step: Does<'a>,
    key: Option<&'a str>,
    checkout: Option<(Uuid, &'a str, &'a str)>,
}

/// The fields of a step that say what it does (see [`key`]).
#[derive(Serialize)]
struct Does<'a> {
    run: &'a Option<String>,
    checkout: &'a CheckoutDef,
    uses: &'a Option<Builtin>,
    http: &'a Option<HttpStep>,
    llm: &'a Option<LlmStep>,
    container: &'a Option<ContainerStep>,
    sleep: &'a Option<f64>,
    runs_on: &'a BTreeMap<String, String>,
    network: &'a Option<bool>,
    limits: &'a Option<StepLimits>,
    env: &'a BTreeMap<String, String>,
    matrix: &'a Option<BTreeMap<String, Vec<serde_json::Value>>>,
    matrix_values: &'a Option<BTreeMap<String, serde_json::Value>>,
    /// Only their names count, whatever their order.
    secrets: BTreeSet<&'a str>,
}

/// The key of a `cache:` step's outcome (a hex SHA-256), `None` for a step without `cache`,
/// or one whose templates are not all rendered (they failed to render: the step fails).
pub fn key(dispatch: &Dispatch) -> Option<String> {
    let cache = dispatch.step.cache.as_ref()?;
    if dispatch.step.templates().iter().any(|(_, t)| unrendered(t)) {
        return None;
    }
    // Every field, so that a new one is placed on one side or the other, not left out.
    let StepDef {
        // What only names, orders or schedules it.
        id: _,
        name: _,
        needs: _,
        condition: _,
        continue_on_error: _,
        retry: _,
        priority: _,
        rate_limit: _,
        circuit_breaker: _,
        timeout_seconds: _,
        cache: _,
        // What it does.
        run,
        checkout,
        uses,
        http,
        llm,
        container,
        sleep,
        runs_on,
        network,
        limits,
        env,
        matrix,
        matrix_values,
        secrets,
    } = &dispatch.step;
    let does = Does {
        run,
        checkout,
        uses,
        http,
        llm,
        container,
        sleep,
        runs_on,
        network,
        limits,
        env,
        matrix,
        matrix_values,
        secrets: secrets.iter().map(String::as_str).collect(),
    };
    // The connection too: another connection of the tenant's naming the same URL (a push's
    // payload names it) must not take an outcome fetched with this one's token.
    let checkout = dispatch
        .checkout
        .as_ref()
        .filter(|_| dispatch.step.checkout.enabled)
        .map(|c| (c.connection_id, c.url.as_str(), c.commit.as_str()));
    let material = Material { v: 1, step: does, key: cache.key.as_deref(), checkout };
    let bytes = serde_json::to_vec(&material).ok()?;
    Some(hex::encode(hmac_sha256::Hash::hash(&bytes)))
}

/// The outcome kept for the step's `key`, if one finished within its `cache.ttl_seconds`: as
/// this step's outcome, started and finished now, saying where it came from. A failure to read
/// the cache is logged and counts as a miss (the step runs).
pub async fn lookup(bus: &Bus, dispatch: &Dispatch, key: &str) -> Option<StepOutcome> {
    let ttl = dispatch.step.cache.as_ref()?.ttl_seconds.min(CacheDef::MAX_TTL_SECS);
    let ns = bus.namespace();
    let kept = match bus.latest::<Kept>(&ns.cache_stream(), &ns.cache(&dispatch.tenant, key)).await {
        Ok(kept) => kept?,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the step cache; the step runs");
            return None;
        }
    };
    let now = Utc::now();
    if now.signed_duration_since(kept.outcome.finished_at) >= chrono::Duration::seconds(ttl as i64) {
        return None;
    }
    let from = CachedFrom {
        run_id: kept.run_id,
        step: kept.step,
        attempt: kept.attempt,
        finished_at: kept.outcome.finished_at,
    };
    Some(StepOutcome { started_at: now, finished_at: now, cached_from: Some(from), ..kept.outcome })
}

/// Forgets the outcome kept under `key`, for a step of a run submitted with `refresh_cache`:
/// whatever becomes of the step, later ones do not reuse what was there. How many were
/// forgotten (0 or 1).
pub async fn forget(bus: &Bus, dispatch: &Dispatch, key: &str) -> Result<u64, taskmesh_bus::BusError> {
    let ns = bus.namespace();
    bus.purge_subject(&ns.cache_stream(), &ns.cache(&dispatch.tenant, key)).await
}

/// Keeps a success's outcome under `key` (best effort: a failure is logged, and the next such
/// step runs).
pub async fn keep(bus: &Bus, dispatch: &Dispatch, key: &str, attempt: u32, outcome: &StepOutcome) {
    let kept = Kept { run_id: dispatch.run_id, step: dispatch.step.id.clone(), attempt, outcome: outcome.clone() };
    if let Err(e) = bus.put(bus.namespace().cache(&dispatch.tenant, key), &kept).await {
        tracing::warn!(error = %e, "could not keep the step's outcome in the cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskmesh_events::workflow::WorkflowDef;

    fn dispatch(step_yaml: &str) -> Dispatch {
        let workflow = WorkflowDef::parse_yaml(&format!("name: w\nsteps:\n  - {step_yaml}\n")).unwrap();
        Dispatch {
            tenant: "t".into(),
            run_id: Uuid::now_v7(),
            dispatch: 1,
            step: workflow.steps[0].clone(),
            not_before: None,
            traceparent: None,
            checkout: None,
            refresh_cache: false,
        }
    }

    #[test]
    fn a_key_follows_what_a_step_does_not_what_names_or_orders_it() {
        let base = key(&dispatch("{id: a, run: 'echo hi', cache: {}}")).unwrap();
        assert_eq!(base.len(), 64);
        assert_eq!(key(&dispatch("{id: a, run: 'echo hi'}")), None, "no cache, no key");
        for same in [
            "{id: b, name: B, run: 'echo hi', cache: {ttl_seconds: 5}}",
            "{id: a, run: 'echo hi', cache: {}, retry: {max_attempts: 3}, priority: 5, timeout_seconds: 9}",
            "{id: a, run: 'echo hi', cache: {}, continue_on_error: true, rate_limit: {key: k, per_second: 1}}",
            "{id: a, run: 'echo hi', cache: {}, circuit_breaker: {key: k}}",
        ] {
            assert_eq!(key(&dispatch(same)).unwrap(), base, "{same}");
        }
        // What the scheduler set on it: its needs and condition.
        let mut ordered = dispatch("{id: a, run: 'echo hi', cache: {}}");
        ordered.step.needs = vec!["first".into()];
        ordered.step.condition = Some("always()".into());
        assert_eq!(key(&ordered).unwrap(), base, "needs and if do not count");
        let mut instance = dispatch("{id: a, run: 'echo hi', cache: {}}");
        instance.step.matrix_values = Some([("n".to_string(), serde_json::json!(1))].into());
        assert_ne!(key(&instance).unwrap(), base, "a matrix instance's values count");
        for other in [
            "{id: a, run: 'echo ho', cache: {}}",
            "{id: a, run: 'echo hi', cache: {key: x}}",
            "{id: a, run: 'echo hi', cache: {}, env: {A: b}}",
            "{id: a, run: 'echo hi', cache: {}, secrets: [TOKEN]}",
            "{id: a, run: 'echo hi', cache: {}, runs_on: {gpu: nvidia}}",
        ] {
            assert_ne!(key(&dispatch(other)).unwrap(), base, "{other}");
        }
        assert_eq!(
            key(&dispatch("{id: a, run: 'echo hi', cache: {}, secrets: [B, A]}")),
            key(&dispatch("{id: a, run: 'echo hi', cache: {}, secrets: [A, B]}")),
            "secrets count by name, in any order"
        );
        // A step whose templates did not render has no key: it fails rather than share one.
        assert_eq!(key(&dispatch("{id: a, run: 'echo ${{ inputs.x }}', cache: {}}")), None);
        let secret_ref = "{id: a, http: {url: 'http://h/${{ secrets.T }}'}, secrets: [T], cache: {}}";
        assert!(key(&dispatch(secret_ref)).is_some(), "secret references stay until the step runs");
        // A checkout step's outcome follows the connection and the commit.
        let connection = Uuid::now_v7();
        let with = |connection: Uuid, commit: &str| {
            let mut d = dispatch("{id: a, run: 'make', checkout: true, cache: {}}");
            d.checkout = Some(taskmesh_events::Checkout {
                forge: taskmesh_events::Forge::Github,
                connection_id: connection,
                repository: "o/r".into(),
                url: "https://github.com/o/r.git".into(),
                commit: commit.into(),
            });
            key(&d).unwrap()
        };
        let a = "a".repeat(40);
        assert_eq!(with(connection, &a), with(connection, &a));
        assert_ne!(with(connection, &a), with(connection, &"b".repeat(40)));
        assert_ne!(with(connection, &a), with(Uuid::now_v7(), &a), "another connection naming the same URL");
    }
}
