//! The `taskmesh` client: `run --wait --follow` shows progress and logs, and its exit code
//! reflects the run; workflows, schedules, secrets, labels and profiles from the command line.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use taskmesh_testkit::eventually;

use crate::helpers::*;

/// The `taskmesh` binary, with none of this process's TASKMESH_* variables.
fn command() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskmesh"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKMESH_") {
            cmd.env_remove(k);
        }
    }
    // A client that hangs fails its test (below) instead of holding up the suite.
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// How long any one `taskmesh` command of these tests may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

fn outcome(out: std::process::Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) async fn taskmesh(tm: &TestMesh, args: &[&str]) -> (i32, String, String) {
    let mut cmd = command();
    cmd.args(args).args(["--url", &tm.api, "--key", &tm.key]);
    let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await;
    outcome(out.unwrap_or_else(|_| panic!("taskmesh {} did not end in {COMMAND_TIMEOUT:?}", args.join(" "))).unwrap())
}

/// `taskmesh ARGS` with `input` on its standard input.
async fn taskmesh_stdin(tm: &TestMesh, args: &[&str], input: &str) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut cmd = command();
    cmd.args(args)
        .args(["--url", &tm.api, "--key", &tm.key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    outcome(child.wait_with_output().await.unwrap())
}

/// `taskmesh ARGS` without --url or --key, in `dir` (no .taskmesh/api-key there), with
/// TASKMESH_PROFILE_FILE=`profiles` and `env`.
async fn taskmesh_profile(profiles: &Path, dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = command();
    cmd.args(args).current_dir(dir).env_remove("XDG_CONFIG_HOME").env("TASKMESH_PROFILE_FILE", profiles);
    for (k, v) in env {
        cmd.env(k, v);
    }
    outcome(cmd.output().await.unwrap())
}

/// Waits until the first step of run `id` runs.
async fn first_step_running(tm: &TestMesh, id: &str) {
    eventually("the step running", Duration::from_secs(20), || async {
        let run: Value =
            tm.http.get(format!("{}/v1/runs/{id}", tm.api)).bearer_auth(&tm.key).send().await?.json().await?;
        Ok((run["steps"][0]["status"] == "running").then_some(()))
    })
    .await
    .unwrap();
}

/// Polls `taskmesh ARGS --output json` until `found` accepts the answer (reads trail writes);
/// returns it. A failing command fails at once.
async fn poll_json<F: Fn(&Value) -> bool>(tm: &TestMesh, what: &str, args: &[&str], found: F) -> Value {
    let found = &found;
    eventually(what, Duration::from_secs(20), move || async move {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let (code, out, err) = taskmesh(tm, &all).await;
        anyhow::ensure!(code == 0, "taskmesh {}: exit {code}: {out} {err}", all.join(" "));
        let answer: Value = serde_json::from_str(out.trim())?;
        Ok(found(&answer).then_some(answer))
    })
    .await
    .unwrap()
}

/// The `field` of every item of a list answer.
fn items(answer: &Value, field: &str) -> Vec<String> {
    answer["items"].as_array().unwrap().iter().map(|i| i[field].as_str().unwrap().to_string()).collect()
}

/// The item of a list answer whose `id` is `id`.
fn item(answer: &Value, id: &str) -> Option<Value> {
    answer["items"].as_array()?.iter().find(|i| i["id"] == id).cloned()
}

fn parse(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
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
    // Without --follow, woken by the run's event stream: every step's end is shown.
    let (code, out, err) = taskmesh(&tm, &["run", hello, "--wait"]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("✓ build succeeded") && err.contains("✓ package succeeded"), "progress is shown: {err}");
    assert!(!out.contains("[build]"), "no logs without --follow: {out}");

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
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let (code, out, _) = taskmesh(&tm, &["run", path.to_str().unwrap(), "--input", "n=3"]).await;
    assert_eq!(code, 0, "without --wait it only submits");
    let id = out.trim().to_string();
    tm.wait_run(id.parse().unwrap(), std::time::Duration::from_secs(30)).await;
    let (code, out, _) = taskmesh(&tm, &["logs", &id, "a"]).await;
    assert_eq!((code, out.as_str()), (0, "about to fail\n"));
    let (code, _, err) = taskmesh(&tm, &["runs", "get", "not-a-run"]).await;
    assert_eq!(code, 2, "an API error is a clear message: {err}");
    assert!(err.contains("404"), "{err}");
    // A step's reason is shown: here, where a cached outcome came from.
    std::fs::write(&path, "name: kept\nsteps:\n  - {id: a, run: 'echo once', cache: {}}\n").unwrap();
    let (code, _, err) = taskmesh(&tm, &["run", path.to_str().unwrap(), "--wait"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("✓ a succeeded\n"), "{err}");
    let first = err.lines().find_map(|l| l.strip_prefix("run ")?.strip_suffix(" submitted")).expect("the run's id");
    let first = first.to_string();
    let (code, _, err) = taskmesh(&tm, &["run", path.to_str().unwrap(), "--wait"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("✓ a succeeded (cached from run {first} (step a))")), "{err}");
    let id = err.lines().find_map(|l| l.strip_prefix("run ")?.strip_suffix(" submitted")).expect("the run's id");
    let (code, shown, err) = taskmesh(&tm, &["runs", "get", id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains("(cached from run "), "{shown}");
    // `--refresh-cache` runs it, and a rerun with it runs it again.
    let (code, _, err) = taskmesh(&tm, &["run", path.to_str().unwrap(), "--wait", "--refresh-cache"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("✓ a succeeded\n"), "it ran: {err}");
    let (code, rerun, err) = taskmesh(&tm, &["runs", "rerun", id, "--from", "a", "--refresh-cache"]).await;
    assert_eq!(code, 0, "{err}");
    let rerun = tm.wait_run(rerun.trim().parse().unwrap(), std::time::Duration::from_secs(30)).await;
    assert_eq!(step(&rerun, "a")["reason"], Value::Null, "{rerun:#}");
    // Purged, the outcome kept is forgotten.
    let (code, out, err) = taskmesh(&tm, &["cache", "purge"]).await;
    assert_eq!((code, out.as_str()), (0, "1 kept outcomes forgotten\n"), "{err}");
    let (code, out, err) = taskmesh(&tm, &["cache", "purge", "--output", "json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), serde_json::json!({"purged": 0}));
    let _ = std::fs::remove_file(path);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn following_a_chatty_step_shows_every_line_once_in_order_and_stops_when_it_ends() {
    let tm = spawn_mesh().await;
    // A pause, then 2,500 lines at once (more than a page of 1,000) just before the step ends.
    let path = std::env::temp_dir().join(format!("{}-chatty.yml", tm.env.database));
    std::fs::write(&path, "name: chatty\nsteps:\n  - {id: a, run: 'echo first; sleep 2; seq 1 2500'}\n").unwrap();
    let path = path.to_str().unwrap();
    let expected: Vec<String> = ["first".to_string()].into_iter().chain((1..=2500).map(|i| i.to_string())).collect();

    let (code, out, err) = taskmesh(&tm, &["run", path, "--wait", "--follow"]).await;
    assert_eq!(code, 0, "{err}");
    let shown: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("[a] ")).collect();
    assert_eq!(shown, expected, "run --follow shows every line once, in order");

    // `logs -f` from while the step runs: the lines so far, then the rest as they come, and it
    // returns once the step has ended.
    let (code, out, _) = taskmesh(&tm, &["run", path]).await;
    assert_eq!(code, 0);
    let id = out.trim().to_string();
    first_step_running(&tm, &id).await;
    let (code, out, err) = taskmesh(&tm, &["logs", &id, "a", "-f"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "logs -f shows every line once, in order");
    let (_, run, _) = taskmesh(&tm, &["runs", "get", &id, "--output", "json"]).await;
    let run = parse(&run);
    assert_ne!(run["steps"][0]["status"], "running", "it returned before the step ended: {run}");
    // As JSON, a line is an object.
    let (code, out, _) = taskmesh(&tm, &["logs", &id, "a", "-f", "--output", "json"]).await;
    assert_eq!(code, 0);
    let last = parse(out.lines().last().unwrap());
    assert_eq!((last["line"].as_str(), last["stream"].as_str()), (Some("2500"), Some("stdout")));
    let _ = std::fs::remove_file(path);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn following_logs_through_connections_that_break_off_shows_every_line_once_in_order() {
    let tm = spawn_mesh().await;
    // A proxy in front of the gateway that cuts every connection 700 ms after it opened.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via = format!("http://{}", proxy.local_addr().unwrap());
    let upstream = tm.api.trim_start_matches("http://").to_string();
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepting = {
        let opened = opened.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = proxy.accept().await {
                opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let cut = Duration::from_millis(700);
                    let _ = tokio::time::timeout(cut, tokio::io::copy_bidirectional(&mut client, &mut server)).await;
                });
            }
        })
    };
    let path = std::env::temp_dir().join(format!("{}-slow.yml", tm.env.database));
    std::fs::write(
        &path,
        "name: slow\nsteps:\n  - {id: a, run: 'for i in $(seq 1 40); do echo $i; sleep 0.1; done'}\n",
    )
    .unwrap();
    let (code, out, _) = taskmesh(&tm, &["run", path.to_str().unwrap()]).await;
    assert_eq!(code, 0);
    let id = out.trim().to_string();
    first_step_running(&tm, &id).await;
    let before = opened.load(std::sync::atomic::Ordering::SeqCst);
    let mut cmd = command();
    cmd.args(["logs", &id, "a", "-f", "--url", &via, "--key", &tm.key]);
    let (code, out, err) = outcome(tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await.unwrap().unwrap());
    assert_eq!(code, 0, "{err}");
    let expected: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "every line once, in order: {err}");
    // It took several connections (the step ran for 4 s), each reopened after the last line shown.
    let connections = opened.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(connections >= 4, "{connections} connections");
    accepting.abort();
    let _ = std::fs::remove_file(path);
    tm.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workflows_schedules_secrets_labels_and_profiles_from_the_command_line() {
    let tm = spawn_mesh().await;
    let dir = tempfile::tempdir().unwrap();

    // Workflows: two pushes are two versions; the list has the latest; get reads either.
    let flow_path = dir.path().join("flow.yml");
    std::fs::write(
        &flow_path,
        "name: cli-flow\ninputs:\n  who: {type: string, default: world}\nsteps:\n  - id: greet\n    run: echo hello ${{ inputs.who }}\n",
    )
    .unwrap();
    let flow = flow_path.to_str().unwrap();
    let (code, out, err) = taskmesh(&tm, &["workflows", "push", flow]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out.trim(), "stored cli-flow version 1");
    let (code, out, err) = taskmesh(&tm, &["workflows", "push", flow, "--output", "json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    let stored = parse(&out);
    assert_eq!((stored["name"].as_str(), stored["version"].as_u64()), (Some("cli-flow"), Some(2)), "{stored}");
    let list = poll_json(&tm, "the workflow's version 2 listed", &["workflows", "ls"], |v| {
        v["items"].as_array().is_some_and(|i| i.iter().any(|w| w["name"] == "cli-flow" && w["version"] == 2))
    })
    .await;
    assert_eq!(items(&list, "name"), ["cli-flow"], "one entry per workflow: {list}");
    let (code, out, err) = taskmesh(&tm, &["workflows", "get", "cli-flow", "--output", "json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    let got = parse(&out);
    assert_eq!(got["version"], 2, "{got}");
    assert_eq!(got["definition"]["name"], "cli-flow", "{got}");
    assert_eq!(got["definition"]["steps"][0]["id"], "greet", "{got}");
    let (code, out, err) = taskmesh(&tm, &["workflows", "get", "cli-flow", "--version", "1"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.starts_with("# cli-flow version 1"), "{out}");
    let yaml: Value = serde_yaml_ng::from_str(&out).unwrap();
    assert_eq!(yaml["name"], "cli-flow", "the definition is printed as YAML: {out}");
    assert_eq!(yaml["steps"][0]["id"], "greet", "{out}");
    let (code, _, err) = taskmesh(&tm, &["workflows", "get", "no-such-flow"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("404"), "{err}");

    // Labels: set on submission, found by a URL-encoded filter; other filters too.
    let (code, out, err) = taskmesh(&tm, &["run", flow, "--label", "team=a"]).await;
    assert_eq!(code, 0, "{out} {err}");
    let labelled = out.trim().to_string();
    let (code, out, err) = taskmesh(&tm, &["run", flow, "--label", "team=b", "--label", "note=x&y z"]).await;
    assert_eq!(code, 0, "{out} {err}");
    let other = out.trim().to_string();
    // Both are listed before filtering, so that a filter letting too much through would show.
    poll_json(&tm, "both runs listed", &["runs", "ls"], |v| {
        let ids = items(v, "id");
        ids.contains(&labelled) && ids.contains(&other)
    })
    .await;
    let (code, out, err) = taskmesh(&tm, &["runs", "ls", "--label", "team=a", "--output", "json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    let page = parse(&out);
    assert_eq!(items(&page, "id"), std::slice::from_ref(&labelled), "{page}");
    assert_eq!(page["items"][0]["labels"]["team"], "a", "{page}");
    let (code, out, err) = taskmesh(&tm, &["runs", "ls", "--label", "note=x&y z", "--output", "json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(items(&parse(&out), "id"), std::slice::from_ref(&other), "'&' and ' ' are part of the value");
    let (code, out, err) =
        taskmesh(&tm, &["runs", "ls", "--workflow", "cli-flow", "--trigger", "api", "--output", "json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(items(&parse(&out), "id").len(), 2, "{out}");
    let (code, out, err) = taskmesh(&tm, &["runs", "ls", "--trigger", "schedule", "--output", "json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(items(&parse(&out), "id").is_empty(), "no run was started by a schedule: {out}");
    let (code, out, err) = taskmesh(&tm, &["runs", "ls", "--workflow", "another", "--output", "json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(items(&parse(&out), "id").is_empty(), "{out}");
    let (code, _, err) = taskmesh(&tm, &["runs", "ls", "--label", "team"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("key=value"), "{err}");

    // Schedules: create (yearly, so it does not fire here), list, pause, resume, delete.
    let (code, out, err) = taskmesh(
        &tm,
        &[
            "schedules",
            "create",
            "--cron",
            "0 0 1 1 *",
            "--workflow",
            "cli-flow",
            "--timezone",
            "Europe/Paris",
            "--input",
            "who=cron",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    let schedule = out.trim().to_string();
    assert!(schedule.parse::<uuid::Uuid>().is_ok(), "the schedule's id: {out}");
    let list = poll_json(&tm, "the schedule listed", &["schedules", "ls"], |v| item(v, &schedule).is_some()).await;
    let created = item(&list, &schedule).unwrap();
    assert_eq!(created["spec"]["cron"], "0 0 1 1 *", "{created}");
    assert_eq!(created["spec"]["timezone"], "Europe/Paris", "{created}");
    assert_eq!(created["spec"]["workflow"], "cli-flow", "{created}");
    assert_eq!(created["spec"]["inputs"]["who"], "cron", "{created}");
    assert_eq!(created["paused"], false, "{created}");
    let (code, out, err) = taskmesh(&tm, &["schedules", "pause", &schedule]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out.trim(), format!("paused {schedule}"));
    poll_json(&tm, "the schedule paused", &["schedules", "ls"], |v| {
        item(v, &schedule).is_some_and(|s| s["paused"] == true)
    })
    .await;
    let (code, out, err) = taskmesh(&tm, &["schedules", "ls"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        out.lines().any(|l| l.starts_with(schedule.as_str()) && l.contains("cli-flow") && l.contains("paused")),
        "{out}"
    );
    let (code, out, err) = taskmesh(&tm, &["schedules", "resume", &schedule]).await;
    assert_eq!(code, 0, "{out} {err}");
    poll_json(&tm, "the schedule resumed", &["schedules", "ls"], |v| {
        item(v, &schedule).is_some_and(|s| s["paused"] == false)
    })
    .await;
    // Changed in place: what is not given is kept.
    let (code, out, err) =
        taskmesh(&tm, &["schedules", "set", &schedule, "--cron", "0 0 2 1 *", "--input", "who=patched"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out.trim(), format!("changed {schedule}"));
    let list = poll_json(&tm, "the schedule changed", &["schedules", "ls"], |v| {
        item(v, &schedule).is_some_and(|s| s["spec"]["cron"] == "0 0 2 1 *")
    })
    .await;
    let changed = item(&list, &schedule).unwrap();
    assert_eq!(changed["spec"]["inputs"]["who"], "patched", "{changed}");
    assert_eq!(changed["spec"]["timezone"], "Europe/Paris", "kept: {changed}");
    let (code, _, err) = taskmesh(&tm, &["schedules", "set", &schedule]).await;
    assert_ne!(code, 0);
    assert!(err.contains("nothing to change"), "{err}");
    // Conditional: at a version it has moved past (its creation's), refused; at its own, made.
    let version = |s: &Value| s["version"].as_u64().unwrap_or_else(|| panic!("a version: {s}"));
    let (stale, current) = (version(&created).to_string(), version(&changed).to_string());
    let set = ["schedules", "set", &schedule, "--overlap", "allow", "--if-version"];
    let (code, _, err) = taskmesh(&tm, &[&set[..], &[&stale]].concat()).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("412") && err.contains(&format!("version {current}")), "{err}");
    let (code, out, err) = taskmesh(&tm, &[&set[..], &[&current]].concat()).await;
    assert_eq!(code, 0, "{out} {err}");
    let list = poll_json(&tm, "the conditional change made", &["schedules", "ls"], |v| {
        item(v, &schedule).is_some_and(|s| s["spec"]["overlap"] == "allow")
    })
    .await;
    let now = version(&item(&list, &schedule).unwrap());
    assert!(now > version(&changed), "a new version");
    let (code, out, err) = taskmesh(&tm, &["schedules", "ls"]).await;
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.starts_with(schedule.as_str())).unwrap_or_else(|| panic!("{out}"));
    assert!(out.starts_with("ID") && out.lines().next().unwrap().contains(" VERSION "), "{out}");
    // The last two columns: VERSION, NEXT (a time, or `-`).
    assert_eq!(
        line.split_whitespace().rev().nth(1),
        Some(now.to_string().as_str()),
        "the table shows the version --if-version takes: {out}"
    );
    // Run now: the run's id, started by the schedule by hand.
    let (code, out, err) = taskmesh(&tm, &["schedules", "trigger", &schedule]).await;
    assert_eq!(code, 0, "{out} {err}");
    let run: uuid::Uuid = out.trim().parse().unwrap_or_else(|_| panic!("a run id: {out}"));
    let view = tm.wait_run(run, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(view["trigger"]["kind"], "schedule", "{view}");
    assert_eq!(view["trigger"]["manual"], true, "{view}");
    assert_eq!(view["inputs"]["who"], "patched", "{view}");
    // Backfill: midnight of 2 January in Paris is 23:00 UTC on the 1st; the same range again
    // finds its run.
    let range = ["--from", "2026-01-01T00:00:00Z", "--to", "2026-01-02T00:00:00Z"];
    let (code, out, err) = taskmesh(&tm, &[&["schedules", "backfill", &schedule][..], &range].concat()).await;
    assert_eq!(code, 0, "{out} {err}");
    let line: Vec<&str> = out.split_whitespace().collect();
    assert_eq!((line.len(), line[0], line[2]), (3, "2026-01-01T23:00:00Z", "started"), "{out}");
    let (code, out, err) = taskmesh(&tm, &[&["schedules", "backfill", &schedule][..], &range].concat()).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.trim().ends_with(&format!("{} had run", line[1])), "{out}");
    let (code, _, err) =
        taskmesh(&tm, &["schedules", "create", "--cron", "not a cron", "--workflow", "cli-flow"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("422") && err.contains("cron"), "{err}");
    let (code, _, err) = taskmesh(&tm, &["schedules", "rm", &schedule, "--if-version", &current]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("412") && err.contains("version"), "a deletion at a version it has moved past: {err}");
    let (code, out, err) = taskmesh(&tm, &["schedules", "rm", &schedule]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out.trim(), format!("deleted {schedule}"));
    poll_json(&tm, "the schedule gone", &["schedules", "ls"], |v| item(v, &schedule).is_none()).await;

    // Secrets: names are listed, values never printed; stdin works and loses its newline.
    let value = format!("v4lue-{}", uuid::Uuid::now_v7().simple());
    let (code, out, err) = taskmesh(&tm, &["secrets", "set", "CLI_TOKEN", "--value", &value]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out.trim(), "secret CLI_TOKEN set");
    assert!(!out.contains(&value) && !err.contains(&value));
    let listed = poll_json(&tm, "the secret listed", &["secrets", "ls"], |v| {
        items(v, "name").contains(&"CLI_TOKEN".to_string())
    })
    .await;
    assert!(!listed.to_string().contains(&value), "{listed}");
    let (code, out, err) = taskmesh(&tm, &["secrets", "ls"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("CLI_TOKEN") && !out.contains(&value), "{out}");
    let (code, out, err) = taskmesh_stdin(&tm, &["secrets", "set", "FROM_STDIN"], "piped value\n").await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(!out.contains("piped value") && !err.contains("piped value"), "{out} {err}");
    tm.wait_projected().await;
    let check = dir.path().join("check.yml");
    std::fs::write(
        &check,
        "name: check\nsteps:\n  - id: a\n    secrets: [FROM_STDIN]\n    run: '[ \"$FROM_STDIN\" = \"piped value\" ]'\n",
    )
    .unwrap();
    let (code, out, err) = taskmesh(&tm, &["run", check.to_str().unwrap(), "--wait"]).await;
    assert_eq!(code, 0, "the step got the piped value without its newline: {out} {err}");
    let (code, out, err) = taskmesh(&tm, &["secrets", "rm", "CLI_TOKEN"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out.trim(), "secret CLI_TOKEN removed");
    poll_json(&tm, "the secret removed", &["secrets", "ls"], |v| {
        let names = items(v, "name");
        !names.contains(&"CLI_TOKEN".to_string()) && names.contains(&"FROM_STDIN".to_string())
    })
    .await;

    // A profile file gives the server and key; --profile and TASKMESH_PROFILE pick another;
    // flags beat it; the key is never shown.
    let home = tempfile::tempdir().unwrap();
    let profiles = home.path().join("config.toml");
    std::fs::write(
        &profiles,
        format!(
            "# profiles for the test\ndefault = \"good\"\n\n[profiles.good]\nurl = \"{api}\"\nkey = \"{key}\"  # an admin key\n\n[profiles.\"broken\"]\nurl = '{api}'\nkey = \"tm_not_a_key\"\n",
            api = tm.api,
            key = tm.key
        ),
    )
    .unwrap();
    let at = home.path();
    let (code, out, err) = taskmesh_profile(&profiles, at, &[], &["runs", "ls", "--output", "json"]).await;
    assert_eq!(code, 0, "the default profile gives the server and key: {out} {err}");
    assert!(items(&parse(&out), "id").contains(&labelled), "{out}");
    let (code, _, err) = taskmesh_profile(&profiles, at, &[], &["runs", "ls", "--profile", "broken"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("401"), "--profile picks the profile with a bad key: {err}");
    let (code, _, err) = taskmesh_profile(&profiles, at, &[("TASKMESH_PROFILE", "broken")], &["runs", "ls"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("401"), "TASKMESH_PROFILE picks it too: {err}");
    let (code, out, err) =
        taskmesh_profile(&profiles, at, &[("TASKMESH_PROFILE", "broken")], &["runs", "ls", "--key", &tm.key]).await;
    assert_eq!(code, 0, "--key beats the profile's key: {out} {err}");
    let (code, _, err) = taskmesh_profile(&profiles, at, &[], &["runs", "ls", "--profile", "nope"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'nope'") && err.contains(profiles.to_str().unwrap()), "{err}");

    let (code, out, err) = taskmesh_profile(&profiles, at, &[], &["profile", "show", "--output", "json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(!out.contains(&tm.key), "the key is never shown: {out}");
    let shown = parse(&out);
    assert_eq!(shown["url"], tm.api.as_str(), "{shown}");
    assert_eq!(shown["url_from"], "profile 'good'", "{shown}");
    assert_eq!(shown["key"], format!("{}…", &tm.key[..10]), "{shown}");
    assert_eq!(shown["profile"], "good", "{shown}");
    let (code, out, err) =
        taskmesh_profile(&profiles, at, &[], &["profile", "show", "--url", "http://elsewhere.invalid:1"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("http://elsewhere.invalid:1  (from --url)"), "{out}");
    assert!(!out.contains(&tm.key), "{out}");
    assert!(!out.contains(&tm.key[..10]), "a profile's key is not sent to another server: {out}");

    // A malformed profile file is an error naming the file and the line.
    let bad = home.path().join("bad.toml");
    std::fs::write(&bad, "default = good\n").unwrap();
    let (code, _, err) = taskmesh_profile(&bad, at, &[], &["runs", "ls"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(bad.to_str().unwrap()) && err.contains("line 1"), "{err}");

    tm.finish().await;
}

/// The `ls` commands list every page, not the first: 201 secrets are more than a page of 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_lists_every_page() {
    use futures::StreamExt;
    let tm = spawn_mesh().await;
    let names: Vec<String> = (0..201).map(|i| format!("PAGED_{i:03}")).collect();
    let mesh = &tm;
    futures::stream::iter(&names)
        .for_each_concurrent(8, |name| async move {
            let body = serde_json::json!({"value": "x"});
            let res = mesh.send_json(reqwest::Method::PUT, &format!("/v1/secrets/{name}"), &body).await;
            assert_eq!(res.status(), 204, "{name}");
        })
        .await;
    tm.wait_projected().await;
    let (code, out, err) = taskmesh(&tm, &["secrets", "ls", "--output", "json"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(items(&parse(&out), "name"), names, "every secret, once each, by name");
    let (code, out, err) = taskmesh(&tm, &["secrets", "ls"]).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out.lines().count(), 202, "a heading and a line a secret: {out}");
    tm.finish().await;
}

/// `taskmesh endpoints` lists endpoints, rotates a signing secret (printing the new one, which
/// then signs deliveries) and enables one; `taskmesh connections` lists connections and gives
/// one a new status token from standard input, never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoints_and_connections_are_listed_and_their_secrets_replaced_from_the_cli() {
    let tm = spawn_mesh().await;
    let (url, seen) = crate::integrations::receiver().await;
    let endpoint = crate::integrations::subscribe_url(&tm, &url).await;
    let id = endpoint["id"].as_str().unwrap();
    let connection = tm
        .send_json(
            reqwest::Method::POST,
            "/v1/repo-connections",
            &serde_json::json!({"forge": "github", "repository": "o/r", "secret": "12345678",
                "workflow": {"name": "ci", "steps": [{"id": "a", "uses": "noop"}]}}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    let connection = connection["id"].as_str().unwrap();
    tm.wait_projected().await;

    let (code, out, err) = taskmesh(&tm, &["endpoints", "ls"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(id) && out.contains("standard_webhooks") && out.contains("enabled"), "{out}");
    let (code, out, err) = taskmesh(&tm, &["endpoints", "rotate-secret", id, "--previous-valid-seconds", "0"]).await;
    assert_eq!(code, 0, "{err}");
    let secret = out.trim().to_string();
    assert!(secret.starts_with("whsec_") && secret != endpoint["secret"].as_str().unwrap(), "{out}");
    assert!(err.contains("no longer signs"), "{err}");
    tm.wait_projected().await;
    tm.submit("name: told\nsteps:\n  - {id: a, uses: noop}\n").await;
    taskmesh_testkit::eventually("the delivery", std::time::Duration::from_secs(30), || async {
        Ok((!seen.lock().unwrap().is_empty()).then_some(()))
    })
    .await
    .unwrap();
    let (headers, body) = seen.lock().unwrap()[0].clone();
    assert!(crate::integrations::signed_with(&headers, &body, &secret).0, "signed with the secret printed");
    let (code, out, err) = taskmesh(&tm, &["endpoints", "enable", id]).await;
    assert_eq!((code, out.trim()), (0, format!("endpoint {id} enabled").as_str()), "{err}");
    let (code, _, err) = taskmesh(&tm, &["endpoints", "rotate-secret", &uuid::Uuid::now_v7().to_string()]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no such webhook endpoint"), "{err}");

    let listed = || {
        let tm = &tm;
        async move {
            let (code, out, err) = taskmesh(tm, &["connections", "ls", "--output", "json"]).await;
            assert_eq!(code, 0, "{err}");
            let listed: Value = serde_json::from_str(&out).unwrap();
            listed["items"].as_array().unwrap().iter().find(|c| c["id"] == connection).unwrap().clone()
        }
    };
    let created = listed().await["version"].as_u64().expect("a version");
    let (code, out, err) = taskmesh(&tm, &["connections", "ls"]).await;
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.starts_with(connection)).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("/hooks/github/") && line.contains(" no "), "{out}");
    assert_eq!(line.split_whitespace().nth(3), Some(created.to_string().as_str()), "its version listed: {out}");
    let (code, out, err) = taskmesh_stdin(&tm, &["connections", "set-token", connection], "ghp-new-token\n").await;
    assert_eq!((code, out.trim()), (0, format!("connection {connection}: status token set").as_str()), "{err}");
    assert!(!out.contains("ghp-new-token") && !err.contains("ghp-new-token"));
    tm.wait_projected().await;
    let mine = listed().await;
    assert_eq!(mine["reports_status"], true, "{mine}");
    // Conditional: at its creation's version, which the token moved it past, refused; at its
    // own, made.
    let current = mine["version"].as_u64().expect("a version");
    assert!(current > created, "{mine}");
    let at = |v: u64| ["connections", "set-token", connection, "--if-version", &v.to_string()].map(String::from);
    let (code, _, err) = taskmesh_stdin(&tm, &at(created).each_ref().map(String::as_str), "ghp-stale\n").await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("412") && err.contains(&format!("version {current}")), "{err}");
    let (code, _, err) = taskmesh_stdin(&tm, &at(current).each_ref().map(String::as_str), "ghp-current\n").await;
    assert_eq!(code, 0, "{err}");
    tm.wait_projected().await;
    assert!(listed().await["version"].as_u64().unwrap() > current, "a new version");
    assert!(!tm.postgres_text().await.contains("ghp-new-token"), "stored sealed");
    // From a file, its trailing newline (as `echo $TOKEN > f` writes it) is no part of it.
    let file = std::env::temp_dir().join(format!("{}-token", tm.env.database));
    std::fs::write(&file, "ghp-from-file\n").unwrap();
    let (code, _, err) =
        taskmesh(&tm, &["connections", "set-token", connection, "--from-file", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_file(&file);
    let (code, _, err) = taskmesh_stdin(&tm, &["connections", "set-token", connection], "").await;
    assert_ne!(code, 0);
    assert!(err.contains("no status token"), "{err}");
    tm.finish().await;
}
