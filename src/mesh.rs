//! Starting services in one process. Each service is a library with a `run` taking a shutdown
//! token; a [`Mesh`] is a set of them sharing one bus connection and one Postgres pool.

use std::net::SocketAddr;

use anyhow::Context;
use sqlx::PgPool;
use taskmesh_bus::Bus;
use taskmesh_config::Settings;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The services a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Service {
    Gateway,
    Ingest,
    Scheduler,
    Executor,
    GitIntegration,
    Notification,
    Projector,
}

impl Service {
    pub const ALL: [Service; 7] = [
        Service::Projector,
        Service::Ingest,
        Service::Scheduler,
        Service::Executor,
        Service::Notification,
        Service::GitIntegration,
        Service::Gateway,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Ingest => "ingest",
            Service::Scheduler => "scheduler",
            Service::Executor => "executor",
            Service::GitIntegration => "git-integration",
            Service::Notification => "notification",
            Service::Projector => "projector",
        }
    }

    /// Whether the service reads or writes Postgres.
    pub fn needs_postgres(self) -> bool {
        matches!(self, Service::Gateway | Service::GitIntegration | Service::Notification | Service::Projector)
    }
}

/// Connects to NATS (provisioning the streams) and, when `postgres` is true, to Postgres
/// (creating the database if missing and applying migrations).
pub async fn connect(settings: &Settings, postgres: bool) -> anyhow::Result<(Bus, Option<PgPool>)> {
    let bus = Bus::connect(&settings.nats).await?;
    bus.provision().await?;
    let pool = if postgres {
        crate::infra::ensure_database(&settings.postgres).await?;
        let pool = taskmesh_store::connect(&settings.postgres)?;
        taskmesh_store::migrate(&pool).await.context("migrating Postgres")?;
        Some(pool)
    } else {
        None
    };
    Ok((bus, pool))
}

/// The secrets keyring from the settings, if a key is configured.
pub fn keyring(settings: &Settings) -> anyhow::Result<Option<std::sync::Arc<taskmesh_secrets::Keyring>>> {
    use secrecy::ExposeSecret;
    let Some(key) = settings.secrets.key.as_ref().filter(|k| !k.expose_secret().trim().is_empty()) else {
        return Ok(None);
    };
    let previous: Vec<&str> = settings.secrets.previous_keys.iter().map(|k| k.expose_secret()).collect();
    let ring = taskmesh_secrets::Keyring::new(key.expose_secret(), &previous).context("secrets.key")?;
    Ok(Some(std::sync::Arc::new(ring)))
}

/// Services running in this process.
pub struct Mesh {
    pub gateway: Option<SocketAddr>,
    pub git: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: JoinSet<(Service, anyhow::Result<()>)>,
}

impl Mesh {
    /// Starts `services`. HTTP services are bound before this returns.
    pub async fn start(
        settings: &Settings,
        bus: Bus,
        pool: Option<PgPool>,
        services: &[Service],
    ) -> anyhow::Result<Self> {
        // The process's metrics recorder, before anything records (see `GET /metrics`).
        taskmesh_telemetry::metrics::install();
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut mesh = Mesh { gateway: None, git: None, shutdown: shutdown.clone(), tasks: JoinSet::new() };
        let pool = || pool.clone().context("this service needs Postgres");
        for &service in services {
            let token = shutdown.clone();
            let bus = bus.clone();
            match service {
                Service::Gateway => {
                    let server = taskmesh_gateway::build(
                        &settings.gateway,
                        pool()?,
                        bus,
                        keyring(settings)?,
                        settings.limits.clone(),
                    )
                    .await?;
                    mesh.gateway = Some(server.local_addr());
                    tasks.spawn(async move { (service, server.run_until_stopped(token).await) });
                }
                Service::GitIntegration => {
                    let server = taskmesh_git_integration::build(
                        &settings.git,
                        pool()?,
                        bus,
                        keyring(settings)?,
                        taskmesh_egress::Egress::new(&settings.egress),
                    )
                    .await?;
                    mesh.git = Some(server.local_addr());
                    tasks.spawn(async move { (service, server.run_until_stopped(token).await) });
                }
                Service::Ingest => {
                    let ingest = taskmesh_ingest::Ingest::new(bus)
                        .with_limits(settings.limits.clone())
                        .with_egress(taskmesh_egress::Egress::new(&settings.egress))
                        .with_email(&settings.notification);
                    tasks.spawn(async move { (service, ingest.run(token).await) });
                }
                Service::Scheduler => {
                    let scheduler =
                        taskmesh_scheduler::Scheduler::new(bus, settings.scheduler.clone(), settings.limits.clone());
                    tasks.spawn(async move { (service, scheduler.run(token).await) });
                }
                Service::Executor => {
                    let executor = taskmesh_executor::Executor::new(bus, settings.executor.clone(), keyring(settings)?)
                        .with_egress(taskmesh_egress::Egress::new(&settings.egress));
                    tasks.spawn(async move { (service, executor.run(token).await) });
                }
                Service::Notification => {
                    let notifier = taskmesh_notification::Notifier::new(
                        bus,
                        pool()?,
                        settings.notification.clone(),
                        keyring(settings)?,
                        taskmesh_egress::Egress::new(&settings.egress),
                    )?
                    .with_dashboard(settings.notification.dashboard(&settings.gateway).map_err(anyhow::Error::msg)?);
                    tasks.spawn(async move { (service, notifier.run(token).await) });
                }
                Service::Projector => {
                    let projector = taskmesh_projector::Projector::new(bus, pool()?);
                    tasks.spawn(async move { (service, projector.run(token).await) });
                }
            }
            tracing::info!(service = service.name(), "started");
        }
        mesh.tasks = tasks;
        Ok(mesh)
    }

    /// The token that stops every service of the mesh.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until a service ends (an error, or all stopped after shutdown).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        while let Some(joined) = self.tasks.join_next().await {
            let (service, result) = joined.context("a service panicked")?;
            if let Err(e) = result {
                self.shutdown.cancel();
                return Err(e.context(format!("{} failed", service.name())));
            }
            if !self.shutdown.is_cancelled() {
                tracing::warn!(service = service.name(), "service stopped on its own");
            }
        }
        Ok(())
    }

    /// Stops every service and waits for them to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}
