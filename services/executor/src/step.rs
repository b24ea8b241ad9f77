//! Running one step: a shell script or a container in a fresh working directory with a clean
//! environment (optionally sandboxed with bubblewrap, as another user, under resource limits),
//! or an in-process kind: an HTTP call, an LLM completion, `sleep`, `noop`. Output (stdout and
//! stderr, interleaved as they arrive) is capped; secret values are masked wherever it goes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use taskmesh_events::StepOutcome;
use taskmesh_events::command::LogStream;
use taskmesh_events::workflow::{OUTPUT_FILE, StepDef, StepLimits};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::remote;

/// PATH given to steps: the executor's own environment is never passed on.
const STEP_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Most bytes of `$TASKMESH_OUTPUT` read, and most keys kept.
pub const OUTPUT_FILE_LIMIT: usize = 64 * 1024;
pub const MAX_OUTPUTS: usize = 100;
/// Where a container step's workspace is mounted.
pub const CONTAINER_WORKSPACE: &str = "/workspace";

/// What a sandboxed step sees of /etc.
const SANDBOX_ETC: &[&str] = &[
    "passwd",
    "group",
    "hosts",
    "resolv.conf",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "mime.types",
    "protocols",
    "services",
    "os-release",
    "debian_version",
];

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

/// What this executor can run steps with, found out once at start.
#[derive(Clone)]
pub struct Runtime {
    /// For `http` and `llm` steps: connects only where `egress` permits.
    pub http: reqwest::Client,
    /// Where `http` and `llm` steps may connect.
    pub egress: Arc<taskmesh_egress::Egress>,
    /// A docker- or podman-compatible CLI that answered `info`; without one, container steps
    /// fail.
    pub container_cli: Option<String>,
    /// bubblewrap, when shell steps are sandboxed.
    pub sandbox: Option<PathBuf>,
    /// Run shell steps as this user and group.
    pub run_as: Option<(u32, u32)>,
    /// The executor's limits: the default, and a ceiling a step's `limits` can only lower.
    pub limits: Option<StepLimits>,
}

impl Runtime {
    /// An HTTP client held to `egress`, and nothing else: no container CLI, no sandbox, no
    /// limits.
    pub fn new(egress: Arc<taskmesh_egress::Egress>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = reqwest::Client::builder().user_agent(concat!("taskmesh-executor/", env!("CARGO_PKG_VERSION")));
        let http = egress.client(builder, 5).expect("an HTTP client with the ring provider builds");
        Self { http, egress, container_cli: None, sandbox: None, run_as: None, limits: None }
    }
}

impl Default for Runtime {
    /// [`Runtime::new`] with the default egress rules.
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

/// What a step attempt needs to know besides its definition.
pub struct StepContext {
    pub run_id: Uuid,
    pub attempt: u32,
    pub output_limit: usize,
    pub work_dir: Option<PathBuf>,
    /// Where output lines go as they are read (bounded: lines are dropped, and counted, when
    /// it is full rather than slowing the step down).
    pub logs: Option<tokio::sync::mpsc::Sender<(LogStream, String)>>,
    /// The step's secrets, opened: (name, value). Shell and container steps get them as
    /// environment variables, `http` and `llm` steps where they name them; masked wherever the
    /// step's output goes.
    pub secrets: Vec<(String, String)>,
    /// For a `checkout` step: the commit to fetch into its working directory first.
    pub checkout: Option<crate::checkout::Source>,
    pub runtime: Arc<Runtime>,
    /// The secrets' values and forms masked ([`StepContext::masks`]), made at their first use.
    pub masks: std::sync::OnceLock<Vec<String>>,
}

impl StepContext {
    /// Masks every secret value in `text`.
    pub fn mask(&self, text: &str) -> String {
        taskmesh_secrets::mask(text, self.masks())
    }

    /// Masks `text`, the start of something cut short, as [`taskmesh_secrets::mask_cut`] does.
    pub fn mask_cut(&self, text: &str) -> String {
        taskmesh_secrets::mask_cut(text, self.masks())
    }

    /// The step's secret values and the forms they may be printed in
    /// ([`taskmesh_secrets::masked_forms`]), made once.
    fn masks(&self) -> &[String] {
        self.masks.get_or_init(|| {
            let values: Vec<String> = self.secrets.iter().map(|(_, v)| v.clone()).collect();
            taskmesh_secrets::masked_forms(&values)
        })
    }

    /// Sends a line to the step's log (best effort), masked.
    pub fn log(&self, stream: LogStream, line: &str) {
        if let Some(logs) = &self.logs {
            let _ = logs.try_send((stream, taskmesh_secrets::mask_line(line, self.masks())));
        }
    }
}

/// What a finished attempt produced, before it is stamped with its times.
#[derive(Debug, Default)]
pub struct Done {
    pub ok: bool,
    pub exit_code: Option<i32>,
    pub output: String,
    pub output_truncated: bool,
    pub error: Option<String>,
    pub outputs: BTreeMap<String, String>,
    pub retry_after_ms: Option<u64>,
}

impl Done {
    pub fn failed(error: impl Into<String>) -> Self {
        Done { error: Some(error.into()), ..Default::default() }
    }
}

/// Runs `step`. `None` when `hand_back` fired first (the step was stopped and is to be handed
/// back); otherwise whether it succeeded and what it produced. `cancel` stops it too, and it
/// ends cancelled; past its deadline it ends timed out.
pub async fn run(
    step: &StepDef,
    ctx: &StepContext,
    hand_back: CancellationToken,
    cancel: CancellationToken,
) -> Option<(bool, StepOutcome)> {
    let started_at = Utc::now();
    let kind = step.kind().unwrap_or("none");
    let deadline_secs = step.time_limit_secs();
    let timeout = deadline_secs.map(Duration::from_secs).unwrap_or(Duration::MAX);
    let stamp = |done: Done, timed_out: bool, cancelled: bool| {
        let ok = done.ok;
        (
            ok,
            StepOutcome {
                exit_code: done.exit_code,
                output: done.output,
                output_truncated: done.output_truncated,
                error: done.error,
                outputs: done.outputs,
                timed_out,
                cancelled,
                retry_after_ms: done.retry_after_ms,
                started_at,
                finished_at: Utc::now(),
                cached_from: None,
            },
        )
    };
    if matches!(kind, "run" | "container") {
        return run_process(step, ctx, hand_back, cancel, timeout, deadline_secs)
            .await
            .map(|(done, timed_out, cancelled)| stamp(done, timed_out, cancelled));
    }
    let work = async {
        match kind {
            "uses" => Done { ok: true, ..Default::default() },
            "sleep" => {
                let secs = step.sleep.unwrap_or_default();
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                Done { ok: true, ..Default::default() }
            }
            "http" => remote::http(step.http.as_ref().expect("kind http"), ctx).await,
            "llm" => remote::llm(step.llm.as_ref().expect("kind llm"), ctx).await,
            _ => Done::failed("the step has nothing to run"),
        }
    };
    tokio::select! {
        done = work => Some(stamp(done, false, false)),
        _ = tokio::time::sleep(timeout) => {
            let secs = deadline_secs.unwrap_or_default();
            Some(stamp(Done::failed(format!("timed out after {secs} s")), true, false))
        }
        _ = hand_back.cancelled() => None,
        _ = cancel.cancelled() => Some(stamp(Done::failed("cancelled"), false, true)),
    }
}

/// A step's limits within the executor's: each of the executor's is a default and a ceiling.
fn effective_limits(step: Option<StepLimits>, executor: Option<StepLimits>) -> Option<StepLimits> {
    let lower = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match (step, executor) {
        (Some(s), Some(e)) => Some(StepLimits {
            cpu_seconds: lower(s.cpu_seconds, e.cpu_seconds),
            memory_mb: lower(s.memory_mb, e.memory_mb),
        }),
        (s, e) => s.or(e),
    }
}

/// How a process step is started: the command, and the container to remove when it is stopped.
struct Launch {
    cmd: tokio::process::Command,
    container: Option<(String, String)>,
    output_file: PathBuf,
}

/// Builds the command of a shell or container step in `workspace`.
fn launch(step: &StepDef, ctx: &StepContext, workspace: &std::path::Path) -> Result<Launch, String> {
    let rt = &ctx.runtime;
    let limits = effective_limits(step.limits, rt.limits);
    if let Some(c) = &step.container {
        let cli = rt.container_cli.as_deref().ok_or(
            "this executor has no container runtime (no docker- or podman-compatible CLI answered `info`); \
             route container steps to executors that have one with runs_on: {container: '*'}",
        )?;
        let name = format!("taskmesh-{}-{}-{}", ctx.run_id, step.id, ctx.attempt);
        let mut cmd = tokio::process::Command::new(cli);
        cmd.arg("run")
            .arg("--rm")
            .arg("--name")
            .arg(&name)
            .arg("--volume")
            .arg(format!("{}:{CONTAINER_WORKSPACE}", workspace.display()))
            .arg("--workdir")
            .arg(CONTAINER_WORKSPACE);
        if step.network == Some(false) {
            cmd.arg("--network").arg("none");
        }
        if let Some(mb) = limits.and_then(|l| l.memory_mb) {
            cmd.arg("--memory").arg(format!("{mb}m"));
        }
        if let Some(cpu) = limits.and_then(|l| l.cpu_seconds) {
            cmd.arg("--ulimit").arg(format!("cpu={cpu}:{cpu}"));
        }
        // Values travel in the CLI's environment; only names are on its command line.
        let mut env: Vec<(String, String)> = vec![
            ("TASKMESH_WORKSPACE".into(), CONTAINER_WORKSPACE.into()),
            ("TASKMESH_OUTPUT".into(), format!("{CONTAINER_WORKSPACE}/{OUTPUT_FILE}")),
            ("TASKMESH_RUN_ID".into(), ctx.run_id.to_string()),
            ("TASKMESH_STEP_ID".into(), step.id.clone()),
            ("TASKMESH_ATTEMPT".into(), ctx.attempt.to_string()),
        ];
        // The checkout belongs to the executor's user (or run_as), not to the container's
        // (often root), whose git would refuse it as of dubious ownership. git matches the
        // repository's own top directory: the checkout's `path`, if it has one.
        if let Some(checkout) = &ctx.checkout
            && !step.env.contains_key("GIT_CONFIG_COUNT")
        {
            let top = checkout.path().map_or(CONTAINER_WORKSPACE.to_string(), |p| format!("{CONTAINER_WORKSPACE}/{p}"));
            env.extend([
                ("GIT_CONFIG_COUNT".into(), "1".into()),
                ("GIT_CONFIG_KEY_0".into(), "safe.directory".into()),
                ("GIT_CONFIG_VALUE_0".into(), top),
            ]);
        }
        env.extend(step.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(ctx.secrets.iter().cloned());
        for (k, _) in &env {
            cmd.arg("--env").arg(k);
        }
        cmd.arg("--").arg(&c.image).args(&c.command);
        cmd.env_clear().env("PATH", STEP_PATH).env("HOME", workspace).envs(env);
        // The CLI finds its engine the way its operator configured it.
        for var in ["DOCKER_HOST", "DOCKER_CONFIG", "CONTAINER_HOST", "XDG_RUNTIME_DIR"] {
            if let Ok(v) = std::env::var(var) {
                cmd.env(var, v);
            }
        }
        return Ok(Launch { cmd, container: Some((cli.to_string(), name)), output_file: workspace.join(OUTPUT_FILE) });
    }
    let script = step.run.as_deref().ok_or("the step has nothing to run")?;
    let output_file = workspace.join(OUTPUT_FILE);
    let mut cmd = match &rt.sandbox {
        Some(bwrap) => {
            let mut cmd = tokio::process::Command::new(bwrap);
            for dir in ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64"] {
                cmd.arg("--ro-bind-try").arg(dir).arg(dir);
            }
            // Only the parts of /etc programs need: not the executor's own configuration.
            for entry in SANDBOX_ETC {
                let path = format!("/etc/{entry}");
                cmd.arg("--ro-bind-try").arg(&path).arg(&path);
            }
            cmd.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run"])
                .arg("--bind")
                .arg(workspace)
                .arg(workspace)
                .arg("--chdir")
                .arg(workspace)
                .args(["--unshare-all", "--hostname", "taskmesh-step", "--die-with-parent", "--new-session"]);
            if step.network == Some(true) {
                cmd.arg("--share-net");
            }
            cmd.args(["--", "sh", "-c", script]);
            cmd
        }
        None => {
            let mut cmd = tokio::process::Command::new("sh");
            cmd.arg("-c").arg(script);
            cmd
        }
    };
    cmd.current_dir(workspace)
        .env_clear()
        .env("PATH", STEP_PATH)
        .env("HOME", workspace)
        .env("TASKMESH_WORKSPACE", workspace)
        .env("TASKMESH_RUN_ID", ctx.run_id.to_string())
        .env("TASKMESH_STEP_ID", &step.id)
        .env("TASKMESH_ATTEMPT", ctx.attempt.to_string())
        .env("TASKMESH_OUTPUT", &output_file)
        .envs(&step.env)
        .envs(ctx.secrets.iter().map(|(k, v)| (k, v)));
    if let Some((uid, gid)) = rt.run_as {
        nix::unistd::chown(workspace, Some(uid.into()), Some(gid.into()))
            .map_err(|e| format!("giving the workspace to uid {uid}: {e}"))?;
        cmd.uid(uid).gid(gid);
    }
    if let Some(l) = limits {
        let (cpu, mem) = (l.cpu_seconds, l.memory_mb.map(|m| m * 1024 * 1024));
        // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                use nix::sys::resource::{Resource, setrlimit};
                if let Some(c) = cpu {
                    // SIGXCPU at the soft limit (a clear cause), SIGKILL a second later.
                    setrlimit(Resource::RLIMIT_CPU, c, c + 1).map_err(std::io::Error::from)?;
                }
                if let Some(m) = mem {
                    setrlimit(Resource::RLIMIT_AS, m, m).map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
    }
    Ok(Launch { cmd, container: None, output_file })
}

/// Runs a shell or container step: `None` when handed back, else what it did and whether it
/// timed out or was cancelled.
async fn run_process(
    step: &StepDef,
    ctx: &StepContext,
    hand_back: CancellationToken,
    cancel: CancellationToken,
    timeout: Duration,
    deadline_secs: Option<u64>,
) -> Option<(Done, bool, bool)> {
    let workspace = match ctx.work_dir.as_ref().map_or_else(tempfile::tempdir, tempfile::tempdir_in) {
        Ok(dir) => dir,
        Err(e) => return Some((Done::failed(format!("creating the workspace: {e}")), false, false)),
    };
    let started = tokio::time::Instant::now();
    if let Some(source) = &ctx.checkout {
        let with_token = if source.authenticated() { ", with the connection's token" } else { "" };
        ctx.log(LogStream::System, &format!("checking out {} from {}{with_token}", source.commit, source.url));
        let fetch = crate::checkout::fetch(source, workspace.path(), &ctx.runtime.egress, ctx.runtime.run_as);
        let fetched = tokio::select! {
            biased;
            fetched = fetch => fetched,
            _ = tokio::time::sleep(timeout) => {
                let secs = deadline_secs.unwrap_or_default();
                return Some((Done::failed(format!("timed out after {secs} s, checking out")), true, false));
            }
            _ = hand_back.cancelled() => return None,
            _ = cancel.cancelled() => return Some((Done::failed("cancelled"), false, true)),
        };
        if let Err(e) = fetched {
            return Some((Done::failed(format!("checking out {}: {e}", source.commit)), false, false));
        }
    }
    // The checkout counts against the step's time.
    let timeout = timeout.saturating_sub(started.elapsed());
    let Launch { mut cmd, container, output_file } = match launch(step, ctx, workspace.path()) {
        Ok(l) => l,
        Err(e) => return Some((Done::failed(e), false, false)),
    };
    // The output file is the step's to write: one a checkout brought (a file, or a link) is not
    // its outputs. (Removing a link removes the link.)
    if let Err(e) = std::fs::remove_file(&output_file)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Some((Done::failed(format!("removing {OUTPUT_FILE} from the workspace: {e}")), false, false));
    }
    let masks = ctx.masks();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let program = cmd.as_std().get_program().to_string_lossy().into_owned();
            return Some((Done::failed(format!("starting {program}: {e}")), false, false));
        }
    };
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let output = Mutex::new(Capture::new(ctx.output_limit));
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let kill_group = move || {
        if let Some(pgid) = pgid {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    };
    let work = async {
        let pumps = async {
            tokio::join!(
                pump(stdout, &output, ctx.logs.clone(), LogStream::Stdout, masks),
                pump(stderr, &output, ctx.logs.clone(), LogStream::Stderr, masks)
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
        // A step that has finished is finished, whatever else is ready at once.
        biased;
        status = work => Ok(status),
        _ = tokio::time::sleep(timeout) => Err(None),
        _ = hand_back.cancelled() => Err(Some(Stop::HandBack)),
        _ = cancel.cancelled() => Err(Some(Stop::Cancel)),
    };
    if result.is_err()
        && let Some((cli, name)) = &container
    {
        // Killing the CLI does not stop the container: remove it.
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(cli)
                .args(["rm", "--force", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status(),
        )
        .await;
    }
    let mut capture = output.into_inner();
    // What a step stopped before its lines ended had printed of them.
    capture.release(0);
    capture.release(1);
    let text = String::from_utf8_lossy(&capture.buf);
    let text =
        if capture.truncated { taskmesh_secrets::mask_cut(&text, masks) } else { taskmesh_secrets::mask(&text, masks) };
    let done = |ok: bool, exit_code: Option<i32>, error: Option<String>| Done {
        ok,
        exit_code,
        output: text.clone(),
        output_truncated: capture.truncated,
        error,
        ..Default::default()
    };
    match result {
        Ok(Ok(status)) => {
            let code =
                status.code().or_else(|| std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s));
            let ok = status.success();
            let error = (!ok).then(|| match std::os::unix::process::ExitStatusExt::signal(&status) {
                Some(9) if effective_limits(step.limits, ctx.runtime.limits).is_some() => {
                    "killed (signal 9): over a resource limit?".to_string()
                }
                Some(24) => "killed: over its CPU-time limit (signal 24)".to_string(),
                Some(s) => format!("killed by signal {s}"),
                None => format!("exited with {}", code.map_or("?".into(), |c| c.to_string())),
            });
            let mut out = done(ok, code, error);
            match read_outputs(&output_file).await {
                Ok(outputs) => {
                    out.outputs = outputs.into_iter().map(|(k, v)| (k, taskmesh_secrets::mask(&v, masks))).collect();
                }
                Err(e) => {
                    out.ok = false;
                    out.error = Some(e);
                }
            }
            Some((out, false, false))
        }
        Ok(Err(e)) => Some((done(false, None, Some(format!("waiting for the step: {e}"))), false, false)),
        Err(stop) => {
            kill_group();
            let _ = child.wait().await;
            match stop {
                None => {
                    let secs = deadline_secs.unwrap_or_default();
                    Some((done(false, None, Some(format!("timed out after {secs} s"))), true, false))
                }
                Some(Stop::Cancel) => Some((done(false, None, Some("cancelled".into())), false, true)),
                Some(Stop::HandBack) => None,
            }
        }
    }
}

/// Reads the `key=value` lines a step wrote to `$TASKMESH_OUTPUT` (absent: none). Blank lines
/// and `#` comments are ignored; anything else malformed fails the step, as does a file over
/// the size limit.
async fn read_outputs(path: &std::path::Path) -> Result<std::collections::BTreeMap<String, String>, String> {
    let path = path.to_owned();
    let read = tokio::task::spawn_blocking(move || read_output_file(&path)).await;
    let Some(bytes) = read.map_err(|e| format!("reading $TASKMESH_OUTPUT: {e}"))?? else {
        return Ok(Default::default());
    };
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

/// The bytes of a step's output file, if it wrote one. The executor reads it outside the
/// step's sandbox (or container), so the file must not lead anywhere the step could not read
/// itself: only a regular file with no other name is read (not a symbolic link, which could
/// name the executor's own `/proc/self/environ`; not a pipe, which would never end; not a
/// device such as `/dev/zero`; not a hard link), and only up to [`OUTPUT_FILE_LIMIT`] bytes.
fn read_output_file(path: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let failed = |e: std::io::Error| format!("reading $TASKMESH_OUTPUT: {e}");
    let not_regular = || "$TASKMESH_OUTPUT must be a regular file (not a link, a pipe or a device)".to_string();
    let over = || format!("$TASKMESH_OUTPUT is over {OUTPUT_FILE_LIMIT} bytes");
    // Looked at before it is opened (opening some devices acts on them), and again once open,
    // in case it was replaced meanwhile.
    let seen = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(e)),
    };
    if !seen.is_file() || seen.nlink() != 1 {
        return Err(not_regular());
    }
    let opened = std::fs::OpenOptions::new()
        .read(true)
        // Non-blocking, so that opening a pipe put there meanwhile returns at once (refused).
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Err(not_regular()),
        Err(e) => return Err(failed(e)),
    };
    let meta = file.metadata().map_err(failed)?;
    if !meta.is_file() || meta.nlink() != 1 || (meta.dev(), meta.ino()) != (seen.dev(), seen.ino()) {
        return Err(not_regular());
    }
    if meta.len() > OUTPUT_FILE_LIMIT as u64 {
        return Err(over());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(OUTPUT_FILE_LIMIT as u64 + 1).read_to_end(&mut bytes).map_err(failed)?;
    if bytes.len() > OUTPUT_FILE_LIMIT {
        return Err(over());
    }
    Ok(Some(bytes))
}

struct Capture {
    buf: Vec<u8>,
    limit: usize,
    truncated: bool,
    /// Each stream's current line, not yet in `buf` (stdout's, then stderr's).
    held: [Vec<u8>; 2],
}

/// The longest part of a line a pump holds back from the capture until the line ends.
const HELD_LINE: usize = 64 * 1024;

impl Capture {
    fn new(limit: usize) -> Self {
        Capture { buf: Vec::new(), limit, truncated: false, held: Default::default() }
    }

    /// Appends `bytes`, as far as the limit allows.
    fn take(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.buf.len());
        if bytes.len() > room {
            self.truncated = true;
        }
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// Appends what `stream` read of its current line (at its end, or when the step stopped
    /// before the line ended).
    fn release(&mut self, stream: usize) {
        let held = std::mem::take(&mut self.held[stream]);
        self.take(&held);
    }
}

/// Copies a pipe into the capture until EOF, keeping at most `limit` bytes in all, and sends
/// each complete line to `logs`. The capture takes whole lines (a line's start is held back
/// until it ends, up to [`HELD_LINE`] bytes), so stdout and stderr interleave there line by
/// line: a secret printed in two writes with the other stream's output between them stays
/// whole, and is masked.
async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    capture: &Mutex<Capture>,
    logs: Option<tokio::sync::mpsc::Sender<(LogStream, String)>>,
    stream: LogStream,
    masks: &[String],
) {
    let mut chunk = [0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    let at = usize::from(stream != LogStream::Stdout);
    let mut dropped = 0u64;
    let emit = |line: &mut Vec<u8>, dropped: &mut u64| {
        if let Some(logs) = &logs {
            let text =
                String::from_utf8_lossy(&line[..line.len().min(MAX_LOG_LINE)]).trim_end_matches('\r').to_string();
            let text = if line.len() > MAX_LOG_LINE {
                taskmesh_secrets::mask_cut(&text, masks)
            } else {
                taskmesh_secrets::mask_line(&text, masks)
            };
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
            let read = &chunk[..n];
            let mut c = capture.lock().await;
            match read.iter().rposition(|&b| b == b'\n') {
                Some(end) => {
                    c.release(at);
                    c.take(&read[..=end]);
                    c.held[at].extend_from_slice(&read[end + 1..]);
                }
                None => c.held[at].extend_from_slice(read),
            }
            if c.held[at].len() >= HELD_LINE {
                c.release(at);
            }
        }
        for &b in &chunk[..n] {
            if b == b'\n' {
                emit(&mut line, &mut dropped);
            } else if line.len() <= MAX_LOG_LINE {
                line.push(b);
            }
        }
    }
    capture.lock().await.release(at);
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
            checkout: None,
            runtime: Arc::default(),
            masks: Default::default(),
        }
    }

    #[test]
    fn a_container_step_may_use_git_in_its_checkout() {
        let checkout = taskmesh_events::Checkout {
            forge: taskmesh_events::Forge::Github,
            connection_id: Uuid::now_v7(),
            repository: "o/r".into(),
            url: "https://github.com/o/r.git".into(),
            commit: "a".repeat(40),
        };
        let runtime = Runtime { container_cli: Some("docker".into()), ..Runtime::default() };
        let mut c = StepContext { runtime: Arc::new(runtime), ..ctx(1024) };
        let s = step("{id: c, checkout: true, container: {image: 'alpine:3.20', command: [git, status]}}");
        let env_of = |c: &StepContext| {
            let launch = launch(&s, c, std::path::Path::new("/tmp/ws")).unwrap();
            let env: BTreeMap<String, String> = launch
                .cmd
                .as_std()
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
                .collect();
            env
        };
        assert!(!env_of(&c).contains_key("GIT_CONFIG_COUNT"), "only with a checkout");
        c.checkout = Some(crate::checkout::Source::new(&checkout, None).unwrap());
        let env = env_of(&c);
        assert_eq!(env["GIT_CONFIG_KEY_0"], "safe.directory");
        assert_eq!(env["GIT_CONFIG_VALUE_0"], CONTAINER_WORKSPACE);
        // Checked out under a path: that is the repository git is to trust.
        let options = taskmesh_events::workflow::CheckoutDef {
            enabled: true,
            path: Some("src/app".into()),
            ..Default::default()
        };
        c.checkout = Some(crate::checkout::Source::new(&checkout, None).unwrap().with_options(options));
        assert_eq!(env_of(&c)["GIT_CONFIG_VALUE_0"], format!("{CONTAINER_WORKSPACE}/src/app"));
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
            "{id: a, run: 'echo \"token=$TOKEN\"; echo t=$TOKEN >> $TASKMESH_OUTPUT; [ \"$TOKEN\" = s3cr3t-xyz ]; printf %s \"u:$TOKEN\" | base64'}",
        );
        let (ok, out) = run(&s, &c, CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok, "the step received the value: {out:?}");
        // Encoded, in a basic-auth-like `user:token`, all but what holds the user's bytes.
        assert_eq!(out.output, "token=***\ndTp***\n");
        assert_eq!(out.outputs["t"], "***");
        assert_eq!(rx.try_recv().unwrap().1, "token=***");
    }

    /// The capture interleaves stdout and stderr line by line: a secret written in two parts
    /// with the other stream's output between them stays whole, and masked; a line cut short
    /// by the step's end is kept.
    #[tokio::test]
    async fn a_secret_written_in_parts_around_the_other_streams_output_is_masked() {
        let mut c = ctx(1000);
        c.secrets = vec![("TOKEN".into(), "s3cr3t-xyz".into())];
        let s = step(
            "{id: a, run: 'printf \"tok=s3cr\"; sleep 0.2; echo between >&2; sleep 0.2; printf \"3t-xyz\\nlast\"'}",
        );
        let (ok, out) = run(&s, &c, CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok, "{out:?}");
        assert_eq!(out.output, "between\ntok=***\nlast");
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

    /// Output cut at the limit inside a secret shows none of it, and a multi-line secret's
    /// lines are masked in the log, which is masked a line at a time.
    #[tokio::test]
    async fn a_secret_cut_short_or_spread_over_lines_is_masked() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let mut c = StepContext { logs: Some(tx), ..ctx(12) };
        c.secrets =
            vec![("TOKEN".into(), "hunter2-token".into()), ("KEY".into(), "line-one-of-key\nline-two-of-key".into())];
        let s = step("{id: a, run: 'printf \"out: hunter2-token\\nline-two-of-key\\n\"'}");
        let (ok, out) = run(&s, &c, CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok && out.output_truncated, "{out:?}");
        assert_eq!(out.output, "out: ***");
        drop(c);
        let mut lines = Vec::new();
        while let Some((_, line)) = rx.recv().await {
            lines.push(line);
        }
        assert_eq!(lines, ["out: ***", "***"]);
    }

    /// The executor reads the output file outside the step's sandbox: a link to a file the
    /// step may not read (here the executor's own environment), a pipe that never ends, a device
    /// without end, a hard link, and a file over the limit each fail the step, reading nothing.
    #[tokio::test]
    async fn an_output_file_that_is_not_a_plain_file_of_the_steps_own_is_not_read() {
        for (script, why) in [
            ("ln -s /proc/self/environ $TASKMESH_OUTPUT", "a regular file"),
            ("mkfifo $TASKMESH_OUTPUT", "a regular file"),
            ("ln -s /dev/zero $TASKMESH_OUTPUT", "a regular file"),
            ("echo a=b > o; ln o $TASKMESH_OUTPUT", "a regular file"),
            ("head -c 70000 /dev/zero | tr '\\0' a > $TASKMESH_OUTPUT", "over 65536 bytes"),
        ] {
            let s: StepDef = serde_json::from_value(serde_json::json!({"id": "a", "run": script})).unwrap();
            let t = std::time::Instant::now();
            let (ok, out) = run(&s, &ctx(1000), CancellationToken::new(), CancellationToken::new()).await.unwrap();
            assert!(!ok && out.outputs.is_empty(), "{script}: {out:?}");
            assert!(out.error.as_deref().is_some_and(|e| e.contains(why)), "{script}: {out:?}");
            assert!(t.elapsed() < Duration::from_secs(10), "{script}: did not hang");
        }
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

    fn ctx_with(runtime: Runtime) -> StepContext {
        StepContext { runtime: Arc::new(runtime), ..ctx(4096) }
    }

    #[tokio::test]
    async fn run_as_switches_user() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: switching users needs root");
            return;
        }
        let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a nobody user");
        let rt = Runtime { run_as: Some((nobody.uid.as_raw(), nobody.gid.as_raw())), ..Runtime::default() };
        let s = step("{id: a, run: 'id -u; touch $TASKMESH_WORKSPACE/mine && echo wrote'}");
        let (ok, out) = run(&s, &ctx_with(rt), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok, "{out:?}");
        assert_eq!(out.output, format!("{}\nwrote\n", nobody.uid));
    }

    #[test]
    fn executor_limits_are_defaults_and_ceilings() {
        let l = |cpu: Option<u64>, mem: Option<u64>| Some(StepLimits { cpu_seconds: cpu, memory_mb: mem });
        assert_eq!(effective_limits(None, l(Some(10), Some(512))), l(Some(10), Some(512)));
        assert_eq!(effective_limits(l(Some(5), None), l(Some(10), Some(512))), l(Some(5), Some(512)));
        assert_eq!(effective_limits(l(Some(60), Some(4096)), l(Some(10), Some(512))), l(Some(10), Some(512)));
        assert_eq!(effective_limits(l(Some(60), None), None), l(Some(60), None));
        assert_eq!(effective_limits(None, None), None);
    }

    #[tokio::test]
    async fn limits_stop_runaway_steps() {
        let cpu = step("{id: a, run: 'while :; do :; done', limits: {cpu_seconds: 1}, timeout_seconds: 20}");
        let t = std::time::Instant::now();
        let (ok, out) = run(&cpu, &ctx(1000), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(!ok && !out.timed_out, "{out:?}");
        assert!(out.error.as_deref().unwrap().contains("CPU-time limit"), "{out:?}");
        assert!(t.elapsed() < Duration::from_secs(10));

        let mem = step(
            "{id: a, run: 'x=$(head -c 300000000 /dev/zero | tr \"\\\\0\" a); echo ${#x}', limits: {memory_mb: 64}}",
        );
        let (ok, out) = run(&mem, &ctx(1000), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(!ok, "300 MB do not fit in 64: {out:?}");
        let unlimited = step(
            "{id: a, run: 'x=$(head -c 3000000 /dev/zero | tr \"\\\\0\" a); echo ${#x}', limits: {memory_mb: 64}}",
        );
        let (ok, out) = run(&unlimited, &ctx(1000), CancellationToken::new(), CancellationToken::new()).await.unwrap();
        assert!(ok && out.output == "3000000\n", "3 MB do: {out:?}");
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
