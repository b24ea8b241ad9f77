//! The API against its published contract, with standard third-party tools from PyPI:
//! Schemathesis fuzzes every operation of `/openapi.json`, and a client generated from
//! `docs/openapi.json` by openapi-python-client drives a run end to end.
//!
//! The tools live in a virtualenv that `scripts/test` prepares (`scripts/lib/python-tools.sh`);
//! `TM_PYTHON_TOOLS` names it (default: `.taskmesh/venv` in the repository).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

/// The virtualenv holding schemathesis and openapi-python-client.
fn tools() -> PathBuf {
    let venv = std::env::var_os("TM_PYTHON_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".taskmesh/venv"));
    assert!(
        venv.join("bin/st").exists() && venv.join("bin/openapi-python-client").exists(),
        "{} lacks schemathesis or openapi-python-client: run ./scripts/test, or scripts/lib/python-tools.sh",
        venv.display()
    );
    venv
}

async fn output(cmd: &mut tokio::process::Command) -> (bool, String) {
    let out = cmd.stdin(std::process::Stdio::null()).output().await.expect("running a python tool");
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_no_server_error_and_no_response_that_breaks_the_spec() {
    let venv = tools();
    // No executor: whatever workflow the fuzzer makes up is accepted or refused, never run.
    // No rate limit: the fuzzer is one fast client.
    let tm = spawn_with(&[Svc::Ingest, Svc::Scheduler, Svc::Projector, Svc::Gateway], |s| {
        s.limits.requests_per_second = 0;
        s.limits.key_requests_per_second = 0;
    })
    .await;
    // Something to find: a run, a stored workflow, a secret.
    tm.submit("name: fuzzed\nsteps:\n  - {id: a, run: 'echo hi'}\n").await;
    let report = tempfile::tempdir().unwrap();
    let (ok, text) = output(
        tokio::process::Command::new(venv.join("bin/st"))
            .arg("run")
            .arg(format!("{}/openapi.json", tm.api))
            .args(["--header", &format!("Authorization: Bearer {}", tm.key)])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
            ])
            .args(["--max-examples", "30", "--workers", "2", "--seed", "20261122", "--request-timeout", "10"])
            .args(["--phases", "examples,coverage,fuzzing"])
            .arg("--report-dir")
            .arg(report.path())
            .current_dir(report.path())
            .env("NO_COLOR", "1")
            .env("SCHEMATHESIS_HOOKS", ""),
    )
    .await;
    assert!(ok, "schemathesis found problems:\n{text}");
    assert!(text.contains("passed"), "schemathesis ran operations:\n{text}");
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_generated_from_the_spec_creates_a_run_waits_for_it_and_reads_its_logs() {
    let venv = tools();
    let tm = spawn_mesh().await;
    let out = tempfile::tempdir().unwrap();
    let package = out.path().join("taskmesh_api_client");
    let spec = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let (ok, text) = output(
        tokio::process::Command::new(venv.join("bin/openapi-python-client"))
            .args(["generate", "--meta", "none", "--path"])
            .arg(&spec)
            .arg("--output-path")
            .arg(&package),
    )
    .await;
    assert!(ok, "generating the client failed:\n{text}");
    assert!(!text.contains("will not be generated"), "every endpoint is generated:\n{text}");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/client_roundtrip.py");
    let (ok, text) = output(
        tokio::process::Command::new(venv.join("bin/python"))
            .arg(&script)
            .env("PYTHONPATH", out.path())
            .env("TASKMESH_URL", &tm.api)
            .env("TASKMESH_API_KEY", &tm.key),
    )
    .await;
    assert!(ok, "the generated client's round trip failed:\n{text}");
    let summary: Value = serde_json::from_str(text.trim().lines().last().unwrap()).unwrap();
    assert_eq!(summary["status"], "succeeded", "{summary}");
    assert_eq!(summary["steps"], serde_json::json!({"greet": "succeeded", "after": "succeeded"}));
    assert_eq!(summary["lines"], serde_json::json!(["hello python", "second line"]));
    assert_eq!(summary["listed"], serde_json::json!([summary["id"]]));
    assert_eq!(summary["missing"], "not-found");
    let id = summary["id"].as_str().unwrap().parse().unwrap();
    tm.wait_run(id, Duration::from_secs(5)).await;
    tm.finish().await;
}
