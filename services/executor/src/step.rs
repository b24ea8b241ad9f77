//! Running one step: a shell script in a fresh working directory with a clean environment, or
//! a built-in. Output (stdout and stderr, interleaved as they arrive) is capped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use taskmesh_events::StepOutcome;
use taskmesh_events::command::LogStream;
use taskmesh_events::workflow::{Builtin, StepDef};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// PATH given to steps: the executor's own environment is never passed on.
const STEP_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Most bytes of `$TASKMESH_OUTPUT` read, and most keys kept.
pub const OUTPUT_FILE_LIMIT: usize = 64 * 1024;
pub const MAX_OUTPUTS: usize = 100;

/// Why a running step was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The executor is shutting down: hand the step back (another executor runs it).
    HandBack,
    /// The run was cancelled: the step ends cancelled.
    Cancel,
}

/// Longest log line published; a longer one is cut.
pub const MAX_LOG_LINE: usize = 16 * 1024;

/// What a step attempt needs to know besides its definition.
pub struct StepContext {
    pub run_id: Uuid,
    pub attempt: u32,
    pub output_limit: usize,
    pub work_dir: Option<PathBuf>,
    /// Where output lines go as they are read (bounded: lines are dropped, and counted, when
    /// it is full rather than slowing the step down).
    pub logs: Option<tokio::sync::mpsc::Sender<(LogStream, String)>>,
    /// The step's secrets, opened: (name, value). Given as environment variables and masked
    /// wherever the step's output goes.
    pub secrets: Vec<(String, String)>,
}

/// Runs `step`. `None` when `hand_back` fired first (the process group was killed and the
/// step is to be handed back); otherwise whether it succeeded and what it produced. `cancel`
/// kills it too, and it ends cancelled.
pub async fn run(
    step: &StepDef,
    ctx: &StepContext,
    hand_back: CancellationToken,
    cancel: CancellationToken,
) -> Option<(bool, StepOutcome)> {
    let started_at = Utc::now();
    let finish = |ok: bool, exit_code: Option<i32>, output: String, output_truncated: bool, error: Option<String>| {
        (
            ok,
            StepOutcome {
                exit_code,
                output,
                output_truncated,
                error,
                started_at,
                finished_at: Utc::now(),
                ..Default::default()
            },
        )
    };
    if let Some(Builtin::Noop) = step.uses {
        return Some(finish(true, None, String::new(), false, None));
    }
    let Some(script) = &step.run else {
        return Some(finish(false, None, String::new(), false, Some("the step has nothing to run".into())));
    };
    let workspace = match ctx.work_dir.as_ref().map_or_else(tempfile::tempdir, tempfile::tempdir_in) {
        Ok(dir) => dir,
        Err(e) => return Some(finish(false, None, String::new(), false, Some(format!("creating the workspace: {e}")))),
    };
    let output_file = workspace.path().join(".taskmesh-output");
    let masks: Vec<String> = ctx.secrets.iter().map(|(_, v)| v.clone()).collect();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .current_dir(workspace.path())
        .env_clear()
        .env("PATH", STEP_PATH)
        .env("HOME", workspace.path())
        .env("TASKMESH_WORKSPACE", workspace.path())
        .env("TASKMESH_RUN_ID", ctx.run_id.to_string())
        .env("TASKMESH_STEP_ID", &step.id)
        .env("TASKMESH_ATTEMPT", ctx.attempt.to_string())
        .env("TASKMESH_OUTPUT", &output_file)
        .envs(&step.env)
        .envs(ctx.secrets.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Some(finish(false, None, String::new(), false, Some(format!("starting sh: {e}")))),
    };
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let output = Mutex::new(Capture { buf: Vec::new(), limit: ctx.output_limit, truncated: false });
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let timeout = step.timeout_seconds.map(Duration::from_secs).unwrap_or(Duration::MAX);
    let kill_group = move || {
        if let Some(pgid) = pgid {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    };
    let work = async {
        let pumps = async {
            tokio::join!(
                pump(stdout, &output, ctx.logs.clone(), LogStream::Stdout, &masks),
                pump(stderr, &output, ctx.logs.clone(), LogStream::Stderr, &masks)
            )
        };
        tokio::pin!(pumps);
        let (status, drained) = tokio::select! {
            status = child.wait() => (status, false),
            // Output can end before the exit; then only the exit is awaited.
            _ = &mut pumps => (child.wait().await, true),
        };
        // Whatever the script left running in the background dies with it; otherwise it would
        // hold the pipes open and the step would never end.
        kill_group();
        if !drained {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut pumps).await;
        }
        status
    };
    let result = tokio::select! {
        status = work => Ok(status),
        _ = tokio::time::sleep(timeout) => Err(None),
        _ = hand_back.cancelled() => Err(Some(Stop::HandBack)),
        _ = cancel.cancelled() => Err(Some(Stop::Cancel)),
    };
    let capture = output.into_inner();
    let text = taskmesh_secrets::mask(&String::from_utf8_lossy(&capture.buf), &masks);
    match result {
        Ok(Ok(status)) => {
            let code =
                status.code().or_else(|| std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s));
            let ok = status.success();
            let error = (!ok).then(|| format!("exited with {}", code.map_or("a signal".into(), |c| c.to_string())));
            let (mut ok, mut out) = finish(ok, code, text, capture.truncated, error);
            match read_outputs(&output_file).await {
                Ok(outputs) => {
                    out.outputs = outputs.into_iter().map(|(k, v)| (k, taskmesh_secrets::mask(&v, &masks))).collect();
                }
                Err(e) => {
                    ok = false;
                    out.error = Some(e);
                }
            }
            Some((ok, out))
        }
        Ok(Err(e)) => Some(finish(false, None, text, capture.truncated, Some(format!("waiting for the step: {e}")))),
        Err(stop) => {
            kill_group();
            let _ = child.wait().await;
            match stop {
                None => {
                    let secs = step.timeout_seconds.unwrap_or_default();
                    let (ok, mut out) =
                        finish(false, None, text, capture.truncated, Some(format!("timed out after {secs} s")));
                    out.timed_out = true;
                    Some((ok, out))
                }
                Some(Stop::Cancel) => {
                    let (ok, mut out) = finish(false, None, text, capture.truncated, Some("cancelled".into()));
                    out.cancelled = true;
                    Some((ok, out))
                }
                Some(Stop::HandBack) => None,
            }
        }
    }
}

/// Reads the `key=value` lines a step wrote to `$TASKMESH_OUTPUT` (absent: none). Blank lines
/// and `#` comments are ignored; anything else malformed fails the step, as does a file over
/// the size limit.
async fn read_outputs(path: &std::path::Path) -> Result<std::collections::BTreeMap<String, String>, String> {
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(format!("reading $TASKMESH_OUTPUT: {e}")),
    };
    if bytes.len() > OUTPUT_FILE_LIMIT {
        return Err(format!("$TASKMESH_OUTPUT is over {OUTPUT_FILE_LIMIT} bytes"));
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut outputs = std::collections::BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("$TASKMESH_OUTPUT line {}: expected key=value", n + 1));
        };
        if !taskmesh_events::subjects::is_token(key) {
            return Err(format!("$TASKMESH_OUTPUT line {}: '{key}' is not a valid output name", n + 1));
        }
        outputs.insert(key.to_string(), value.to_string());
        if outputs.len() > MAX_OUTPUTS {
            return Err(format!("$TASKMESH_OUTPUT has more than {MAX_OUTPUTS} outputs"));
        }
    }
    Ok(outputs)
}

struct Capture {
    buf: Vec<u8>,
    limit: usize,
    truncated: bool,
}

/// Copies a pipe into the capture until EOF, keeping at most `limit` bytes in all, and sends
/// each complete line to `logs`.
async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    capture: &Mutex<Capture>,
    logs: Option<tokio::sync::mpsc::Sender<(LogStream, String)>>,
    stream: LogStream,
    masks: &[String],
) {
    let mut chunk = [0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let mut dropped = 0u64;
    let emit = |line: &mut Vec<u8>, dropped: &mut u64| {
        if let Some(logs) = &logs {
            let text =
                String::from_utf8_lossy(&line[..line.len().min(MAX_LOG_LINE)]).trim_end_matches('\r').to_string();
            let text = taskmesh_secrets::mask(&text, masks);
            if logs.try_send((stream, text)).is_err() {
                *dropped += 1;
            }
        }
        line.clear();
    };
    loop {
        let n = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut c = capture.lock().await;
            let room = c.limit.saturating_sub(c.buf.len());
            if n > room {
                c.truncated = true;
            }
            let take = n.min(room);
            c.buf.extend_from_slice(&chunk[..take]);
        }
        for &b in &chunk[..n] {
            if b == b'\n' {
                emit(&mut line, &mut dropped);
            } else if line.len() <= MAX_LOG_LINE {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        emit(&mut line, &mut dropped);
    }
    if dropped > 0
        && let Some(logs) = &logs
    {
        let _ = logs
            .send((
                LogStream::System,
                format!("{dropped} lines not streamed (the step wrote faster than they could be sent)"),
            ))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(yaml: &str) -> StepDef {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn ctx(limit: usize) -> StepContext {
        StepContext {
            run_id: Uuid::now_v7(),
            attempt: 1,
            output_limit: limit,
            work_dir: None,
            logs: None,
            secrets: Vec::new(),
        }
    }

    #[tokio::test]
    async fn captures_output_and_exit_code_without_the_executors_environment() {
        // SAFETY: set before any thread of this test reads the environment.
        unsafe { std::env::set_var("TM_EXECUTOR_SECRET", "hunter2") };
        let s = step(
            "{id: a, run: 'echo out; echo err >&2; echo \"[$TM_EXECUTOR_SECRET]\"; echo $FOO; exit 3', env: {FOO: bar}}",
        );
        let (ok, out) = run(&s, &ctx(1024), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(!ok);
        assert_eq!(out.exit_code, Some(3));
        for line in ["out", "err", "[]", "bar"] {
            assert!(out.output.lines().any(|l| l == line), "{line:?} in {:?}", out.output);
        }
        assert!(!out.output.contains("hunter2"));
    }

    #[tokio::test]
    async fn output_lines_are_streamed_as_they_come() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        let mut c = ctx(1000);
        c.logs = Some(tx);
        let s = step("{id: a, run: 'echo one; echo two >&2; printf three'}");
        let (ok, _) = run(&s, &c, CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok);
        let mut got = Vec::new();
        while let Ok(l) = rx.try_recv() {
            got.push(l);
        }
        got.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(
            got,
            [(LogStream::Stdout, "one".into()), (LogStream::Stdout, "three".into()), (LogStream::Stderr, "two".into())]
        );
    }

    #[tokio::test]
    async fn secrets_arrive_as_env_and_are_masked_everywhere() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        let mut c = ctx(1000);
        c.logs = Some(tx);
        c.secrets = vec![("TOKEN".into(), "s3cr3t-xyz".into())];
        let s = step(
            "{id: a, run: 'echo \"token=$TOKEN\"; echo t=$TOKEN >> $TASKMESH_OUTPUT; [ \"$TOKEN\" = s3cr3t-xyz ]'}",
        );
        let (ok, out) = run(&s, &c, CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok, "the step received the value: {out:?}");
        assert_eq!(out.output, "token=***\n");
        assert_eq!(out.outputs["t"], "***");
        assert_eq!(rx.try_recv().unwrap().1, "token=***");
    }

    #[tokio::test]
    async fn caps_output_and_marks_it_truncated() {
        let s = step("{id: a, run: 'yes | head -c 100000'}");
        let (ok, out) = run(&s, &ctx(1000), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok);
        assert_eq!(out.output.len(), 1000);
        assert!(out.output_truncated);
    }

    #[tokio::test]
    async fn background_processes_do_not_keep_a_finished_step_running() {
        let s = step("{id: a, run: 'sleep 60 & echo started'}");
        let t = std::time::Instant::now();
        let (ok, out) = run(&s, &ctx(1000), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok);
        assert_eq!(out.output, "started\n");
        assert!(t.elapsed() < Duration::from_secs(10), "finished when the script did");
    }

    #[tokio::test]
    async fn outputs_are_read_from_the_output_file() {
        let s = step(
            "{id: a, run: 'echo version=1.2.3 >> $TASKMESH_OUTPUT; echo \"# note\" >> $TASKMESH_OUTPUT; echo url=http://x/?a=b >> $TASKMESH_OUTPUT'}",
        );
        let (ok, out) = run(&s, &ctx(1000), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok, "{out:?}");
        assert_eq!(out.outputs["version"], "1.2.3");
        assert_eq!(out.outputs["url"], "http://x/?a=b");
        let bad = step("{id: a, run: 'echo not-a-pair >> $TASKMESH_OUTPUT'}");
        let (ok, out) = run(&bad, &ctx(1000), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(!ok);
        assert!(out.error.unwrap().contains("key=value"));
    }

    #[tokio::test]
    async fn cancel_kills_the_step_and_marks_it_cancelled() {
        let s = step("{id: a, run: 'sleep 30'}");
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.cancel();
        });
        let t = std::time::Instant::now();
        let (ok, out) = run(&s, &ctx(1000), CancellationToken::new(), cancel).await.unwrap();
        assert!(!ok && out.cancelled);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let s = step("{id: a, run: 'sleep 30 & sleep 30; echo never', timeout_seconds: 1}");
        let t = std::time::Instant::now();
        let (ok, out) = run(&s, &ctx(1000), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(!ok);
        assert!(out.timed_out);
        assert!(out.error.unwrap().contains("timed out"));
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
