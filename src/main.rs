//! `taskmesh`: runs any Taskmesh service, all of them in one process, or administers a mesh.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use taskmesh::mesh::{Mesh, Service};
use taskmesh_config::Settings;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than the system allocator: the services allocate many small, short-lived
/// buffers (messages, JSON), where glibc's malloc showed up at the top of the profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "taskmesh", version, about = "Taskmesh: workflows and tasks for people and their repositories")]
struct Cli {
    /// A TOML configuration file; TASKMESH_<SECTION>__<KEY> environment variables override it.
    #[arg(long, global = true, env = "TASKMESH_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a workflow file (YAML or JSON); with --wait show progress, with --follow also logs.
    /// Exits 0 if the run succeeded, 1 otherwise.
    Run {
        file: PathBuf,
        /// An input, `key=value` (repeatable).
        #[arg(long = "input", short = 'i')]
        inputs: Vec<String>,
        /// A label to find the run by, `key=value` (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Run the steps with `cache:` rather than reuse kept outcomes, and keep theirs instead.
        #[arg(long)]
        refresh_cache: bool,
        #[arg(long)]
        wait: bool,
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// List, show, cancel and rerun runs; send a run's commit status again.
    Runs {
        #[command(subcommand)]
        action: taskmesh::cli::Runs,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// Print a step's output; -f follows it until the step ends.
    Logs {
        run: String,
        step: String,
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// Store, list and show workflow definitions.
    Workflows {
        #[command(subcommand)]
        action: taskmesh::cli::Workflows,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// List, create, change, trigger, backfill, pause, resume and delete schedules.
    Schedules {
        #[command(subcommand)]
        action: taskmesh::cli::Schedules,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// Set, list and remove secrets (admin keys).
    Secrets {
        #[command(subcommand)]
        action: taskmesh::cli::Secrets,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// List webhook endpoints (any key); rotate their signing secrets, enable them again (admin
    /// keys).
    Endpoints {
        #[command(subcommand)]
        action: taskmesh::cli::Endpoints,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// List repository connections (any key); give them a new status token (admin keys).
    Connections {
        #[command(subcommand)]
        action: taskmesh::cli::Connections,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// Forget the tenant's kept `cache:` step outcomes (operator and admin keys).
    Cache {
        #[command(subcommand)]
        action: taskmesh::cli::Cache,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// Which server and key the client commands use, from flags, environment or profile file.
    Profile {
        #[command(subcommand)]
        action: taskmesh::cli::Profiles,
        #[command(flatten)]
        conn: taskmesh::cli::Connection,
    },
    /// Run every service in this process, starting nats-server and a private Postgres under the
    /// data directory when none answers, and ensure the `default` tenant and its admin key.
    Up,
    /// Run one service, or several in one process (`taskmesh serve scheduler notification`):
    /// services that share a process hand each other commands and runs' ends without NATS.
    Serve {
        #[arg(value_enum, required = true)]
        services: Vec<Service>,
    },
    /// Provision the JetStream streams and apply Postgres migrations, then exit.
    Migrate,
    /// Ensure tenant `default` and an admin key (written to <data dir>/api-key), then exit.
    Bootstrap,
    /// Projection maintenance.
    Projector {
        #[command(subcommand)]
        action: ProjectorAction,
    },
}

#[derive(Subcommand)]
enum ProjectorAction {
    /// Empty the read models and reset the checkpoint; the next projector start replays the
    /// whole event log. Stop the projector first.
    Rebuild,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Client commands talk to a server over its API; they need none of its configuration.
    let client = match cli.command {
        Command::Run { file, inputs, labels, refresh_cache, wait, follow, conn } => {
            taskmesh::cli::run(&conn, file, inputs, labels, refresh_cache, wait, follow).await
        }
        Command::Runs { action, conn } => taskmesh::cli::runs(&conn, action).await,
        Command::Logs { run, step, follow, conn } => taskmesh::cli::logs(&conn, run, step, follow).await,
        Command::Workflows { action, conn } => taskmesh::cli::workflows(&conn, action).await,
        Command::Schedules { action, conn } => taskmesh::cli::schedules(&conn, action).await,
        Command::Secrets { action, conn } => taskmesh::cli::secrets(&conn, action).await,
        Command::Cache { action, conn } => taskmesh::cli::cache(&conn, action).await,
        Command::Endpoints { action, conn } => taskmesh::cli::endpoints(&conn, action).await,
        Command::Connections { action, conn } => taskmesh::cli::connections(&conn, action).await,
        Command::Profile { action, conn } => taskmesh::cli::profile(&conn, action),
        command => return server(command, cli.config).await,
    };
    match client {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("taskmesh: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn server(command: Command, config: Option<PathBuf>) -> std::process::ExitCode {
    let settings = match Settings::load(config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("taskmesh: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let command = match command {
        // A service named twice runs once (and is named once).
        Command::Serve { mut services } => {
            let mut seen = std::collections::HashSet::new();
            services.retain(|s| seen.insert(*s));
            Command::Serve { services }
        }
        other => other,
    };
    let name = match &command {
        Command::Serve { services } => services.iter().map(|s| s.name()).collect::<Vec<_>>().join("+"),
        _ => "taskmesh".to_string(),
    };
    let _telemetry = taskmesh_telemetry::init(&name, &settings.telemetry);
    match run(command, settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("taskmesh: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Cancels the token on SIGTERM or SIGINT.
fn on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping");
        token.cancel();
    });
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Up => up(settings).await,
        Command::Serve { services } => serve(services, settings).await,
        Command::Migrate => {
            taskmesh::mesh::connect(&settings, true).await?;
            println!("streams provisioned, migrations applied");
            Ok(())
        }
        Command::Bootstrap => {
            let (bus, _) = taskmesh::mesh::connect(&settings, false).await?;
            taskmesh::bootstrap::ensure_dev_tenant(&bus, &settings.data_dir()).await?;
            println!("tenant 'default' ready; admin key in {}", settings.data_dir().join("api-key").display());
            Ok(())
        }
        Command::Run { .. }
        | Command::Runs { .. }
        | Command::Logs { .. }
        | Command::Workflows { .. }
        | Command::Schedules { .. }
        | Command::Secrets { .. }
        | Command::Cache { .. }
        | Command::Endpoints { .. }
        | Command::Connections { .. }
        | Command::Profile { .. } => {
            anyhow::bail!("client commands run without the server's configuration")
        }
        Command::Projector { action: ProjectorAction::Rebuild } => {
            let (_, pool) = taskmesh::mesh::connect(&settings, true).await?;
            taskmesh_projector::Projector::rebuild(&pool.context("postgres")?).await?;
            println!("read models emptied; the projector replays the log when it starts");
            Ok(())
        }
    }
}

async fn up(mut settings: Settings) -> anyhow::Result<()> {
    let children = taskmesh::infra::ensure(&settings).await?;
    if settings.secrets.key.is_none() {
        settings.secrets.key = Some(taskmesh::bootstrap::dev_secrets_key(&settings.data_dir())?);
    }
    let result = async {
        let (bus, pool) = taskmesh::mesh::connect(&settings, true).await?;
        let data = settings.data_dir();
        taskmesh::bootstrap::ensure_dev_tenant(&bus, &data).await?;
        settings.executor.work_dir.get_or_insert_with(std::env::temp_dir);
        let mut mesh = Mesh::start(&settings, bus, pool, &Service::ALL).await?;
        on_signal(mesh.shutdown_token());
        let gateway = mesh.gateway.expect("gateway started");
        let git = mesh.git.expect("git-integration started");
        println!("Taskmesh is up.");
        println!("  API          http://{gateway}  (spec: /openapi.json)");
        println!("  Webhooks     http://{git}/hooks/github/<connection-id>");
        println!("  API key      {}", data.join("api-key").display());
        println!(
            "  Try          curl -H \"Authorization: Bearer $(cat {})\" http://{gateway}/v1/runs",
            data.join("api-key").display()
        );
        mesh.wait().await
    }
    .await;
    children.stop().await;
    result
}

async fn serve(services: Vec<Service>, settings: Settings) -> anyhow::Result<()> {
    let (bus, pool) = taskmesh::mesh::connect(&settings, services.iter().any(|s| s.needs_postgres())).await?;
    let mut mesh = Mesh::start(&settings, bus.clone(), pool, &services).await?;
    let token = mesh.shutdown_token();
    on_signal(token.clone());
    if let Some(addr) = settings.health.listen {
        // The internal port: it answers `/metrics` whatever the public listeners do.
        let health = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" })).route(
            "/readyz",
            axum::routing::get(move || {
                let bus = bus.clone();
                async move {
                    if bus.client().connection_state() == async_nats::connection::State::Connected {
                        Ok("ready")
                    } else {
                        Err(taskmesh_http::ApiError::new(
                            taskmesh_events::ErrorCode::Unavailable,
                            "nats is not connected",
                        ))
                    }
                }
            }),
        );
        let server = taskmesh_http::Server::bind(addr, taskmesh_http::finish(health, true)).await?;
        tokio::spawn(server.run_until_stopped(token));
    }
    mesh.wait().await
}
