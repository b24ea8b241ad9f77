//! Test kit: every test gets its own JetStream namespace and its own Postgres database on the
//! real servers, so tests run in parallel without seeing each other.
//!
//! The servers come from `TM_TEST_NATS_URL` (default `nats://127.0.0.1:4222`) and
//! `TM_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`, a database the
//! kit creates others from). `./scripts/test` starts both when they are not running. Logs are
//! shown with `TEST_LOG=1`.
//!
//! # Layout
//! Everything is in this file: [`TestEnv`], [`eventually`], [`init_logs`], [`audit_record`].

use std::future::Future;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use secrecy::SecretString;
use sqlx::{ConnectOptions, PgPool};
use taskmesh_bus::Bus;
use taskmesh_config::Settings;

/// Streams of test namespaces start with this (upper-cased).
const PREFIX: &str = "tt";

/// Shows tracing output when `TEST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            ))
            .with_test_writer()
            .try_init();
    }
}

/// A namespace and a database of one's own, and settings pointing at them.
pub struct TestEnv {
    pub settings: Settings,
    pub database: String,
    admin_url: String,
}

impl TestEnv {
    /// Creates the database and picks a namespace. HTTP services get port 0; leases are short.
    pub async fn new() -> anyhow::Result<Self> {
        init_logs();
        // reqwest is built without a default TLS provider; tests' clients use ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let nats_url = std::env::var("TM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let admin_url = std::env::var("TM_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        // The random tail of a v7 id (its head is the clock, shared by tests started together).
        let id = uuid::Uuid::now_v7().simple().to_string();
        let database = format!("tm_test_{id}");
        let mut admin = admin_url.parse::<sqlx::postgres::PgConnectOptions>()?.connect().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&mut admin).await?;
        let db_url = {
            let (base, _) = admin_url.rsplit_once('/').expect("a database URL ends in /<name>");
            format!("{base}/{database}")
        };
        let mut settings = Settings::defaults();
        settings.nats.url = nats_url;
        settings.nats.namespace = format!("{PREFIX}{}", &id[20..]);
        settings.postgres.url = SecretString::from(db_url);
        settings.postgres.max_connections = 5;
        settings.gateway.listen = "127.0.0.1:0".parse()?;
        settings.git.listen = "127.0.0.1:0".parse()?;
        settings.executor.lease_secs = 2;
        settings.executor.drain_timeout_secs = 5;
        settings.scheduler.event_ack_wait_secs = 3;
        settings.scheduler.leader_ttl_ms = 1_500;
        settings.secrets.key = Some(SecretString::from(taskmesh_secrets::Keyring::generate_key()));
        settings.notification.retry_delays_secs = vec![1, 1, 1];
        settings.notification.timeout_ms = 2_000;
        // JetStream sets aside each stream's byte cap on disk when the stream is made: tests
        // running side by side (and namespaces a killed test left behind, until swept) must
        // not add up to the server's limit.
        settings.nats.logs_max_bytes = 64 << 20;
        settings.nats.cache_max_bytes = 64 << 20;
        let env = Self { settings, database, admin_url };
        // Before this test's streams are made, so stale ones do not stand in their way.
        sweep_stale_streams(&Bus::connect(&env.settings.nats).await?).await;
        Ok(env)
    }

    /// A bus connection with the streams provisioned.
    pub async fn bus(&self) -> anyhow::Result<Bus> {
        let bus = Bus::connect(&self.settings.nats).await?;
        bus.provision().await?;
        Ok(bus)
    }

    /// A pool on the test database (migrations applied).
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        let pool = PgPool::connect(secrecy::ExposeSecret::expose_secret(&self.settings.postgres.url)).await?;
        sqlx::migrate::Migrator::new(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../store/migrations")))
            .await?
            .run(&pool)
            .await?;
        Ok(pool)
    }

    /// Deletes the namespace's streams and drops the database.
    pub async fn cleanup(self) {
        if let Ok(bus) = Bus::connect(&self.settings.nats).await {
            let _ = bus.delete_streams().await;
        }
        if let Ok(opts) = self.admin_url.parse::<sqlx::postgres::PgConnectOptions>()
            && let Ok(mut admin) = opts.connect().await
        {
            let _ =
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database)))
                    .execute(&mut admin)
                    .await;
        }
    }
}

/// Deletes streams of test namespaces older than an hour (left by tests that failed).
async fn sweep_stale_streams(bus: &Bus) {
    let prefix = PREFIX.to_ascii_uppercase();
    let mut names = bus.jetstream().stream_names();
    let mut stale = Vec::new();
    while let Some(Ok(name)) = names.next().await {
        if name.starts_with(&prefix) {
            stale.push(name);
        }
    }
    for name in stale {
        if let Ok(mut stream) = bus.jetstream().get_stream(&name).await {
            let old = stream.info().await.ok().map(|i| {
                let created = SystemTime::UNIX_EPOCH + Duration::from_secs(i.created.unix_timestamp().max(0) as u64);
                created.elapsed().unwrap_or_default() > Duration::from_secs(3600)
            });
            if old == Some(true) {
                let _ = bus.jetstream().delete_stream(&name).await;
            }
        }
    }
}

/// An audit record of a `POST` to `path` answered `200`, made now by a key.
pub fn audit_record(path: &str) -> taskmesh_events::AuditRecorded {
    taskmesh_events::AuditRecorded {
        key_id: None,
        actor: "key:tm_test".into(),
        method: "POST".into(),
        path: path.into(),
        route: None,
        status: 200,
        ip: None,
        user_agent: None,
        at: chrono::Utc::now(),
    }
}

/// Polls `probe` until it yields `Some`, or fails after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
