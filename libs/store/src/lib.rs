//! Postgres for Taskmesh: the connection pool, the read-model schema (embedded migrations) and
//! projection checkpoints.
//!
//! Postgres holds only projections of the event log. A projector writes its checkpoint (the
//! last stream sequence it applied) in the same transaction as the rows that event produced,
//! so a redelivered event is recognised and skipped, and a crash never applies one twice.
//!
//! # Layout
//! Everything is in this file; the schema is in `migrations/`.

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use taskmesh_config::PostgresSettings;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrating the read-model schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The read-model schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Empties every read model; a rebuild then replays the log into them.
const TRUNCATE_READ_MODELS: &str = "TRUNCATE tenants, api_keys, runs, steps, step_attempts, repo_connections, webhook_endpoints, workflows, schedules, secrets, audit_log";

/// Connects a pool (lazily: it does not fail when Postgres is down at start).
pub fn connect(settings: &PostgresSettings) -> Result<PgPool> {
    let options: PgConnectOptions = settings.url.expose_secret().parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The last stream sequence `projection` applied (0 for none), locking its row until the
/// transaction ends so two projectors never interleave. One statement once the row exists.
pub async fn checkpoint(tx: &mut Transaction<'_, Postgres>, projection: &str) -> Result<u64> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT last_seq FROM projection_checkpoints WHERE projection = $1 FOR UPDATE")
            .bind(projection)
            .fetch_optional(&mut **tx)
            .await?;
    if let Some(seq) = seq {
        return Ok(seq as u64);
    }
    // The first batch ever (or after a rebuild): create the row, then lock it (a concurrent
    // creator's row is the same row).
    sqlx::query("INSERT INTO projection_checkpoints (projection, last_seq) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(projection)
        .execute(&mut **tx)
        .await?;
    let seq: i64 = sqlx::query_scalar("SELECT last_seq FROM projection_checkpoints WHERE projection = $1 FOR UPDATE")
        .bind(projection)
        .fetch_one(&mut **tx)
        .await?;
    Ok(seq as u64)
}

/// The channel a checkpoint's advance is announced on (`NOTIFY`, payload `{projection}:{seq}`);
/// Postgres delivers it when the transaction that wrote the checkpoint commits.
pub const CHECKPOINT_CHANNEL: &str = "taskmesh_checkpoint";

/// The channel a run's end is announced on once it is in the read model (`NOTIFY`, payload
/// the run's id), for reads that wait for runs to end (see [`RunEnds`]).
pub const RUN_ENDED_CHANNEL: &str = "taskmesh_run_ended";

/// Records that `projection` applied everything up to `seq`, and announces it on
/// [`CHECKPOINT_CHANNEL`], and the end of each run in `ended` on [`RUN_ENDED_CHANNEL`], once the
/// transaction commits. One statement.
pub async fn set_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    projection: &str,
    seq: u64,
    ended: &[uuid::Uuid],
) -> Result<()> {
    sqlx::query(
        "UPDATE projection_checkpoints SET last_seq = $2 WHERE projection = $1
         RETURNING pg_notify($3, projection || ':' || last_seq),
                   (SELECT count(pg_notify($4, run::text)) FROM UNNEST($5::uuid[]) AS run)",
    )
    .bind(projection)
    .bind(seq as i64)
    .bind(CHECKPOINT_CHANNEL)
    .bind(RUN_ENDED_CHANNEL)
    .bind(ended)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Reads waiting for runs to end, by run: [`RunEnds::wait`] registers one, and the listener of
/// [`follow_checkpoint`] wakes a run's waiters when the projector announces its end (and every
/// waiter whenever announcements may have been missed, so each looks again). Bounded: past
/// `max` waiting reads, [`RunEnds::wait`] refuses.
pub struct RunEnds {
    max: usize,
    waiting: std::sync::Mutex<Waiting>,
}

/// How many reads wait, and per run how many and their wake-up.
#[derive(Default)]
struct Waiting {
    total: usize,
    runs: std::collections::HashMap<uuid::Uuid, (usize, std::sync::Arc<tokio::sync::Notify>)>,
}

/// One registered wait; dropping it unregisters.
pub struct RunEndWait {
    ends: std::sync::Arc<RunEnds>,
    run: uuid::Uuid,
    notify: std::sync::Arc<tokio::sync::Notify>,
}

impl RunEndWait {
    /// Resolves at the next announcement of the run's end (or a wake-up of every waiter).
    /// Create it before looking at the run: an announcement after its creation is not missed.
    pub fn ended(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for RunEndWait {
    fn drop(&mut self) {
        let mut waiting = self.ends.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.total -= 1;
        if let Some((n, _)) = waiting.runs.get_mut(&self.run) {
            *n -= 1;
            if *n == 0 {
                waiting.runs.remove(&self.run);
            }
        }
    }
}

impl RunEnds {
    pub fn new(max: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { max, waiting: Default::default() })
    }

    /// Registers a read waiting for `run` to end; `None` when `max` reads already wait.
    pub fn wait(self: &std::sync::Arc<Self>, run: uuid::Uuid) -> Option<RunEndWait> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.total >= self.max {
            return None;
        }
        waiting.total += 1;
        let (n, notify) = waiting.runs.entry(run).or_default();
        *n += 1;
        Some(RunEndWait { ends: self.clone(), run, notify: notify.clone() })
    }

    /// How many reads wait.
    pub fn waiting(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    fn ended(&self, run: uuid::Uuid) {
        if let Some((_, notify)) = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).runs.get(&run) {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for (_, notify) in self.waiting.lock().unwrap_or_else(|p| p.into_inner()).runs.values() {
            notify.notify_waiters();
        }
    }
}

/// Follows `projection`'s checkpoint as it is committed: a background task listens on
/// [`CHECKPOINT_CHANNEL`] over a connection of its own (not one of `pool`'s) and publishes
/// each advance. After (re)connecting it reads the table, so an announcement missed while
/// disconnected is made up for. Waiting readers get woken by commits instead of polling the
/// table. The task ends when every receiver is dropped.
pub fn follow_checkpoint(
    pool: &PgPool,
    projection: &'static str,
    ends: std::sync::Arc<RunEnds>,
) -> tokio::sync::watch::Receiver<u64> {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let own = PgPoolOptions::new().max_connections(1).connect_lazy_with((*pool.connect_options()).clone());
    let pool = pool.clone();
    tokio::spawn(async move {
        while !tx.is_closed() {
            tokio::select! {
                _ = tx.closed() => return,
                Err(e) = listen_to_checkpoint(&own, &pool, projection, &tx, &ends) => {
                    tracing::debug!(error = %e, "following the projection checkpoint; reconnecting");
                },
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    rx
}

/// Listens on [`CHECKPOINT_CHANNEL`] over `own` and moves `tx` on with each announcement of
/// `projection`'s checkpoint (and sets it to the table's value on connecting and after a
/// dropped connection), and on [`RUN_ENDED_CHANNEL`] to wake the waiters of each run that ended (every
/// waiter on connecting and after a dropped connection); returns only on an error.
async fn listen_to_checkpoint(
    own: &PgPool,
    pool: &PgPool,
    projection: &str,
    tx: &tokio::sync::watch::Sender<u64>,
    ends: &RunEnds,
) -> Result<std::convert::Infallible> {
    let advance = |seq: u64| {
        tx.send_if_modified(|at| {
            let moved = seq > *at;
            *at = (*at).max(seq);
            moved
        });
    };
    let prefix = format!("{projection}:");
    let mut listener = sqlx::postgres::PgListener::connect_with(own).await?;
    listener.listen_all([CHECKPOINT_CHANNEL, RUN_ENDED_CHANNEL]).await?;
    // The table's value replaces the last one heard: should Postgres have lost commits (the
    // projector's are asynchronous), the checkpoint moves back until they are replayed, rather
    // than vouching for rows that are gone.
    tx.send_replace(read_checkpoint(pool, projection).await?);
    ends.wake_all();
    loop {
        match listener.try_recv().await? {
            Some(n) if n.channel() == RUN_ENDED_CHANNEL => {
                if let Ok(run) = n.payload().parse() {
                    ends.ended(run);
                }
            }
            Some(n) => {
                if let Some(seq) = n.payload().strip_prefix(&prefix).and_then(|s| s.parse().ok()) {
                    advance(seq);
                }
            }
            // The connection dropped (the next call reconnects): catch up from the table, and
            // have every waiting read look again.
            None => {
                tx.send_replace(read_checkpoint(pool, projection).await?);
                ends.wake_all();
            }
        }
    }
}

/// The checkpoint outside a transaction (for lag reports and rebuild decisions).
pub async fn read_checkpoint(pool: &PgPool, projection: &str) -> Result<u64> {
    let seq: Option<i64> = sqlx::query_scalar("SELECT last_seq FROM projection_checkpoints WHERE projection = $1")
        .bind(projection)
        .fetch_optional(pool)
        .await?;
    Ok(seq.unwrap_or(0) as u64)
}

/// Empties every read model and resets `projection`'s checkpoint to 0, in one transaction.
pub async fn reset_read_models(pool: &PgPool, projection: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(TRUNCATE_READ_MODELS).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1").bind(projection).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}
