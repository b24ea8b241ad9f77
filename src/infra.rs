//! What `taskmesh up` starts when nothing answers: `nats-server -js` and a private Postgres
//! cluster, as child processes with their data under the data directory, stopped on exit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::ExposeSecret;
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;
use taskmesh_config::{PostgresSettings, Settings};
use tokio::process::{Child, Command};

/// Child processes started for the mesh; stopped (gracefully) by [`Children::stop`].
#[derive(Default)]
pub struct Children {
    children: Vec<(&'static str, Child)>,
}

impl Children {
    /// Stops the children: SIGINT (Postgres' fast shutdown, NATS' clean exit), then waits.
    pub async fn stop(mut self) {
        for (name, child) in self.children.iter_mut().rev() {
            if let Some(pid) = child.id() {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT);
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
                tracing::warn!(name, "did not stop in time; killing");
                let _ = child.kill().await;
            }
        }
    }
}

async fn answers(host: &str, port: u16) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

async fn wait_for(host: &str, port: u16, what: &str, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    for _ in 0..150 {
        if answers(host, port).await {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited with {status}; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not start listening on {host}:{port}; see {}", log.display())
}

/// Finds an executable on PATH or in `extra` directories (Debian keeps nats-server in /usr/sbin
/// and PostgreSQL's binaries in /usr/lib/postgresql/<version>/bin).
fn find(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(extra.iter().cloned()).map(|d| d.join(name)).find(|p| p.is_file())
}

fn postgres_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse();
    dirs
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// Starts what does not answer: NATS at `nats.url` and Postgres at `postgres.url`.
pub async fn ensure(settings: &Settings) -> anyhow::Result<Children> {
    let mut children = Children::default();
    let data = std::path::absolute(settings.data_dir())?;
    std::fs::create_dir_all(&data)?;

    let nats = settings.nats.url.trim_start_matches("nats://");
    let (host, port) = nats
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.parse().unwrap_or(4222)))
        .unwrap_or((nats.to_string(), 4222));
    if !answers(&host, port).await {
        let bin = find("nats-server", &["/usr/sbin".into(), "/usr/local/sbin".into()])
            .context("no NATS server answers and nats-server is not installed: apt-get install nats-server")?;
        let dir = data.join("nats");
        std::fs::create_dir_all(&dir)?;
        let log = data.join("nats.log");
        tracing::info!(%host, port, "starting nats-server");
        let mut child = Command::new(bin)
            .args(["-js", "-a", &host, "-p", &port.to_string(), "-sd"])
            .arg(&dir)
            .stdout(log_file(&log)?)
            .stderr(Stdio::from(log_file(&data.join("nats.err.log"))?))
            .kill_on_drop(true)
            .spawn()
            .context("starting nats-server")?;
        wait_for(&host, port, "nats-server", &mut child, &log).await?;
        children.children.push(("nats-server", child));
    }

    let opts: PgConnectOptions = settings.postgres.url.expose_secret().parse()?;
    let (host, port) = (opts.get_host().to_string(), opts.get_port());
    if !answers(&host, port).await {
        children.children.push(("postgres", start_postgres(&data, &host, port).await?));
    }
    Ok(children)
}

async fn start_postgres(data: &Path, host: &str, port: u16) -> anyhow::Result<Child> {
    let dirs = postgres_bin_dirs();
    let missing = "no Postgres answers and PostgreSQL is not installed: apt-get install postgresql";
    let initdb = find("initdb", &dirs).context(missing)?;
    let postgres = find("postgres", &dirs).context(missing)?;
    // Postgres refuses to run as root: run it as the `postgres` user, in a directory it owns.
    let run_as = if nix::unistd::geteuid().is_root() {
        Some(
            nix::unistd::User::from_name("postgres")?
                .context("running as root needs a 'postgres' user (apt-get install postgresql)")?,
        )
    } else {
        None
    };
    let mut dir = data.join("pg");
    if run_as.is_some() && data.starts_with("/root") {
        dir = PathBuf::from(format!("/var/tmp/taskmesh-pg-{port}"));
    }
    std::fs::create_dir_all(&dir)?;
    let as_user = |cmd: &mut Command| {
        if let Some(user) = &run_as {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
    };
    if let Some(user) = &run_as {
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    }
    if !dir.join("PG_VERSION").exists() {
        tracing::info!(dir = %dir.display(), "initialising a private Postgres cluster");
        let mut cmd = Command::new(&initdb);
        cmd.arg("-D")
            .arg(&dir)
            .args(["-U", "postgres", "--auth=trust", "--encoding=UTF8"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut cmd);
        let out = cmd.output().await.context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let log = data.join("postgres.log");
    let mut cmd = Command::new(&postgres);
    cmd.arg("-D")
        .arg(&dir)
        .args(["-p", &port.to_string(), "-k", "/tmp", "-c", &format!("listen_addresses={host}")])
        .stdout(Stdio::null())
        .stderr(log_file(&log)?)
        .kill_on_drop(true);
    as_user(&mut cmd);
    tracing::info!(%host, port, "starting postgres");
    let mut child = cmd.spawn().context("starting postgres")?;
    wait_for(host, port, "postgres", &mut child, &log).await?;
    // Listening is not yet accepting: wait for a real connection.
    let url = format!("postgres://postgres@{host}:{port}/postgres");
    for _ in 0..100 {
        if let Ok(opts) = url.parse::<PgConnectOptions>()
            && opts.connect().await.is_ok()
        {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("postgres does not accept connections; see {}", log.display())
}

/// Creates the configured database when the server answers but the database is missing.
pub async fn ensure_database(settings: &PostgresSettings) -> anyhow::Result<()> {
    let opts: PgConnectOptions = settings.url.expose_secret().parse()?;
    match opts.connect().await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let name = opts.get_database().unwrap_or("taskmesh").to_string();
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                bail!("database {name:?} does not exist; create it first");
            }
            tracing::info!(database = %name, "creating the database");
            let mut admin = opts.database("postgres").connect().await.context("connecting to create the database")?;
            let create = format!("CREATE DATABASE \"{name}\"");
            match sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&mut admin).await {
                Ok(_) => Ok(()),
                // Another process created it meanwhile.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
                Err(e) => Err(e).context("creating the database"),
            }
        }
        Err(e) => Err(e).context("connecting to Postgres"),
    }
}
