//! The `taskmesh` client: `run --wait --follow` shows progress and logs, and its exit code
//! reflects the run.

use std::process::Stdio;

use crate::helpers::*;

async fn taskmesh(tm: &TestMesh, args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmesh"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKMESH_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.args(args).args(["--url", &tm.api, "--key", &tm.key]).stdin(Stdio::null()).output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_wait_follow_shows_progress_and_logs_and_exits_with_the_outcome() {
    let tm = spawn_mesh().await;
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello.yml");
    let (code, out, err) = taskmesh(&tm, &["run", hello, "--wait", "--follow"]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("[build] building on"), "logs are shown: {out}");
    assert!(out.contains("[package] packaged"), "{out}");
    assert!(err.contains("✓ build succeeded") && err.contains("succeeded"), "progress is shown: {err}");

    let failing = tm.env.database.clone() + ".yml";
    let path = std::env::temp_dir().join(failing);
    std::fs::write(&path, "name: nope\nsteps:\n  - {id: a, run: 'echo about to fail; exit 3'}\n").unwrap();
    let (code, out, err) = taskmesh(&tm, &["run", path.to_str().unwrap(), "--wait", "--follow"]).await;
    assert_eq!(code, 1, "a failed run exits non-zero: {out} {err}");
    assert!(out.contains("[a] about to fail"));
    assert!(err.contains("✗ a failed"), "{err}");

    let (code, out, _) = taskmesh(&tm, &["runs", "ls", "--output", "json"]).await;
    assert_eq!(code, 0);
    let page: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let (code, out, _) = taskmesh(&tm, &["run", path.to_str().unwrap(), "--input", "n=3"]).await;
    assert_eq!(code, 0, "without --wait it only submits");
    let id = out.trim().to_string();
    tm.wait_run(id.parse().unwrap(), std::time::Duration::from_secs(30)).await;
    let (code, out, _) = taskmesh(&tm, &["logs", &id, "a"]).await;
    assert_eq!((code, out.as_str()), (0, "about to fail\n"));
    let (code, _, err) = taskmesh(&tm, &["runs", "get", "not-a-run"]).await;
    assert_eq!(code, 2, "an API error is a clear message: {err}");
    assert!(err.contains("404"), "{err}");
    let _ = std::fs::remove_file(path);
    tm.finish().await;
}
