//! The projector: turns the event log into the Postgres read models the gateway serves.
//!
//! It reads `{ns}.evt.>` in stream order through the durable pull consumer `projector`, and
//! applies each batch (whatever has arrived, up to 512 events) atomically, the run events
//! folded into rows written once each ([`fold`]), together with its checkpoint (the last
//! stream sequence applied): one statement for a batch of run events, one transaction for
//! others. A redelivered event at or below the checkpoint is skipped, so nothing is applied
//! twice; after a crash the consumer is recreated at the checkpoint, so nothing is
//! missed. Batches commit without waiting for the disk (see [`Projector::apply_batch`]):
//! should Postgres lose the last of them, the projector notices and replays them. Each commit
//! announces the checkpoint, and the runs that ended, with `NOTIFY`. Rows are written only from what events say (their timestamps included), so
//! replaying the log from sequence 1 rebuilds the same rows: see [`Projector::rebuild`].
//!
//! One projector runs per mesh (it owns the consumer's position).
//!
//! # Layout
//! - [`apply`]: one event → SQL, for every event but a run's.
//! - [`fold`]: a batch's run events → `runs`, `steps` and `step_attempts` rows, each read and
//!   written once per batch.
//! - this file: [`Projector`]: the consume loop, checkpoints, rebuild.

pub mod apply;
pub mod fold;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use futures::StreamExt;
use sqlx::PgPool;
use taskmesh_bus::{Bus, Stored};
use tokio_util::sync::CancellationToken;

/// The durable consumer and the checkpoint's name.
pub const NAME: &str = "projector";
/// Most events gathered into one transaction (a commit's events are never split, so a batch
/// may end up to one commit past it).
const BATCH: usize = 512;
/// Most step rows a batch's submissions may create (each is held in memory until the batch is
/// written; see [`fold`]).
const BATCH_STEPS: usize = 20_000;

/// Whether a batch folds or gathers this event into its one statement (run events, audit
/// records) rather than applying it with a statement of its own.
fn gathered(stored: &Stored) -> bool {
    fold::is_run_event(&stored.envelope.event) || apply::is_audit(&stored.envelope.event)
}

/// What [`Projector::move_on`] did with a batch.
enum MovedOn {
    /// Wrote it and moved the checkpoint to this sequence; the rows to keep in the cache once
    /// committed.
    To(u64, Box<fold::RunRows>),
    /// Nothing: the checkpoint was not where the batch left from.
    CheckpointMoved,
    /// Nothing: the batch submits a run again under its idempotency key, once its first
    /// submission's events aged out of the log (see `fold::RunRows::load`), and the old run's
    /// rows must go before it is written, in the same transaction.
    NeedsTransaction,
}

/// How often an idle projector looks for batches Postgres lost.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Fails when the table's `checkpoint` is behind the `committed` one: Postgres lost batches.
fn lost_batches(checkpoint: u64, committed: u64) -> anyhow::Result<()> {
    if checkpoint < committed {
        anyhow::bail!(
            "the read models' checkpoint is {checkpoint}, but batches up to {committed} were committed: Postgres lost them (a crash?), or a rebuild started; replaying from {checkpoint}"
        );
    }
    Ok(())
}

/// The settings the projector's own connections ask for at startup (see
/// [`Projector::apply_batch`]).
const SESSION_SETTINGS: [(&str, &str); 2] = [("synchronous_commit", "off"), ("plan_cache_mode", "force_custom_plan")];

/// Whether connecting failed because something in front of Postgres refuses the startup
/// parameter that carries [`SESSION_SETTINGS`]: PgBouncer answers `unsupported startup
/// parameter: options` (or, in later versions, `unsupported startup parameter in options: …`)
/// unless `options` is in its `ignore_startup_parameters`. Its refusal of another parameter
/// is not this: connecting without the settings would fail alike.
fn refuses_settings(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(d) = e else { return false };
    let m = d.message();
    m.contains("unsupported startup parameter: options") || m.contains("unsupported startup parameter in options")
}

/// The projector.
#[derive(Clone)]
pub struct Projector {
    bus: Bus,
    /// Its own connections, opened with [`SESSION_SETTINGS`].
    tuned: PgPool,
    /// Its own connections without them, for when those are refused.
    plain: PgPool,
    /// Whether [`Projector::tuned`]'s settings were refused (then [`Projector::plain`] serves).
    refused: Arc<AtomicBool>,
}

impl Projector {
    /// A projector writing to `pool`'s database over connections of its own, which commit
    /// without waiting for the disk and plan each statement for its keys (see
    /// [`Projector::apply_batch`]). Where a pooler refuses those settings, it connects
    /// without them (and says so in the log once).
    pub fn new(bus: Bus, pool: PgPool) -> Self {
        let own = |options| {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options)
        };
        let plain = (*pool.connect_options()).clone();
        let tuned = plain.clone().options(SESSION_SETTINGS);
        Self { bus, tuned: own(tuned), plain: own(plain), refused: Arc::new(AtomicBool::new(false)) }
    }

    /// The connections to use: the tuned ones, unless their settings were refused.
    fn pool(&self) -> &PgPool {
        if self.refused.load(Ordering::Relaxed) { &self.plain } else { &self.tuned }
    }

    /// Connects once, with the settings; if they are refused, uses connections without them
    /// from now on.
    async fn connect(&self) -> anyhow::Result<()> {
        if self.refused.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.tuned.acquire().await {
            Ok(_) => Ok(()),
            Err(e) if refuses_settings(&e) => {
                tracing::warn!(
                    error = %e,
                    "Postgres (or a pooler in front of it) refuses the projector's connection settings; connecting without them: commits wait for the disk, and statements may be planned generically (see docs/operations.md)"
                );
                self.refused.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// (Re)creates the consumer so that it delivers from the checkpoint on.
    async fn consumer(&self, checkpoint: u64) -> anyhow::Result<PullConsumer> {
        let ns = self.bus.namespace();
        let stream = self.bus.jetstream().get_stream(ns.events_stream()).await?;
        let _ = stream.delete_consumer(NAME).await;
        let deliver_policy = if checkpoint == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence { start_sequence: checkpoint + 1 }
        };
        let consumer = self
            .bus
            .durable(
                &ns.events_stream(),
                NAME,
                PullConfig {
                    filter_subject: ns.events_all(),
                    deliver_policy,
                    ack_policy: AckPolicy::All,
                    ack_wait: Duration::from_secs(60),
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await?;
        tracing::info!(checkpoint, "projector consuming");
        Ok(consumer)
    }

    /// Projects until `shutdown` is cancelled. Any failure restarts from the checkpoint.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        while !shutdown.is_cancelled() {
            if let Err(e) = self.project(&shutdown).await {
                tracing::warn!(error = %e, "projector restarting from its checkpoint");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        Ok(())
    }

    async fn project(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        self.connect().await?;
        taskmesh_store::ensure_checkpoint(self.pool(), NAME).await?;
        let checkpoint = taskmesh_store::read_checkpoint(self.pool(), NAME).await?;
        let consumer = self.consumer(checkpoint).await?;
        let mut stream = self.bus.jetstream().get_stream(self.bus.namespace().events_stream()).await?;
        let first = stream.info().await?.state.first_sequence;
        if first > checkpoint + 1 && checkpoint > 0 {
            tracing::error!(
                checkpoint,
                first,
                "events after the checkpoint have expired from the stream; the read models miss them (rebuild to start over)"
            );
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("pulling events: {e}"))?;
        // The stream holds only event subjects, so a jump in sequences means a message was lost
        // in flight, and applying past it would skip it for good, unless the messages between
        // were removed from the stream (retention's sweeps remove ended runs and old records
        // from anywhere in it): that is asked of the stream when a jump comes.
        let mut expected: Option<u64> = Some((checkpoint + 1).max(first));
        // What this consumer's batches have committed: the table must never be found behind it.
        let mut committed = Some(checkpoint);
        // Rows of the runs this consumer's batches left running: valid while every batch
        // commits (a failure ends this call, and the next starts with none).
        let mut cache = fold::RowCache::default();
        // One connection for every batch: taken from the pool for each, it would cost two
        // round trips more (the pool makes sure of a connection as it hands it out, and again
        // as it takes it back). One idle for a while is checked first, as the pool would (see
        // `taskmesh_store::connect`), and replaced if Postgres dropped it meanwhile. Should it
        // break under a batch, the batch fails, and the next call takes another.
        let mut conn = self.pool().acquire().await?;
        let mut used = std::time::Instant::now();
        loop {
            let mut events = Vec::new();
            let mut last = None;
            let mut steps = 0;
            while events.len() < BATCH && steps < BATCH_STEPS {
                // Wait for the first event; then take only what has already arrived (group
                // commit: while a batch is applied the next one gathers, so batches grow with
                // the load and an event never waits for others that have not come).
                let next = if events.is_empty() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        n = messages.next() => n,
                        // Idle: look whether Postgres has lost what was committed meanwhile,
                        // so the read side does not stay behind until the next event.
                        _ = tokio::time::sleep(IDLE_CHECK) => {
                            // (Postgres not answering is no reason to restart: the next batch
                            // will find out, or the next look.)
                            match (committed, taskmesh_store::read_checkpoint(self.pool(), NAME).await) {
                                (Some(committed), Ok(table)) => lost_batches(table, committed)?,
                                (_, Err(e)) => tracing::debug!(error = %e, "looking at the checkpoint"),
                                (None, Ok(_)) => {}
                            }
                            continue;
                        }
                    }
                } else {
                    match futures::FutureExt::now_or_never(messages.next()) {
                        Some(n) => n,
                        None => break,
                    }
                };
                let msg = next
                    .ok_or_else(|| anyhow::anyhow!("event stream ended"))?
                    .map_err(|e| anyhow::anyhow!("pulling events: {e}"))?;
                let commit = taskmesh_bus::decode_without_nul(&msg)?;
                let seq = commit[0].seq;
                if let Some(want) = expected
                    && seq > want
                    && (1..seq).contains(&self.bus.next_kept(&self.bus.namespace().events_all(), want).await?)
                {
                    anyhow::bail!("gap in the event stream: expected sequence {want}, got {seq}");
                }
                // Delivered again (its ack was late, the batch before it long in Postgres) after
                // the batch already took it: taken once. (A later message's ack covers it.)
                if expected.is_some_and(|want| seq < want) {
                    continue;
                }
                if expected.is_none_or(|want| seq >= want) {
                    expected = Some(seq + 1);
                }
                steps += commit
                    .iter()
                    .map(|s| match &s.envelope.event {
                        taskmesh_events::Event::RunSubmitted(e) => e.workflow.steps.len(),
                        _ => 0,
                    })
                    .sum::<usize>();
                events.extend(commit);
                last = Some(msg);
            }
            let Some(last) = last else { continue };
            if taskmesh_store::check_if_idle(&mut conn, used.elapsed()).await.is_err() {
                tracing::info!("the projector's connection was lost while idle; taking another");
                conn.close_on_drop();
                conn = self.pool().acquire().await?;
            }
            let applying = std::time::Instant::now();
            let checkpoint = match self.apply_on(&mut conn, &events, committed, &mut cache).await {
                Ok(checkpoint) => checkpoint,
                Err(e) => {
                    // Not handed back to the pool, whose check of it could wait on a dead peer.
                    conn.close_on_drop();
                    return Err(e);
                }
            };
            used = std::time::Instant::now();
            metrics::histogram!("taskmesh_projector_batch_seconds").record(applying.elapsed().as_secs_f64());
            committed = Some(checkpoint);
            metrics::counter!("taskmesh_projector_events_total").increment(events.len() as u64);
            metrics::gauge!("taskmesh_projector_checkpoint").set(checkpoint as f64);
            if let Some(newest) = events.last() {
                let at = newest.envelope.occurred_at.timestamp_micros() as f64 / 1e6;
                metrics::gauge!("taskmesh_projector_last_event_timestamp_seconds").set(at);
            }
            last.ack().await.map_err(|e| anyhow::anyhow!("acking: {e}"))?;
        }
    }

    /// Applies events atomically with the checkpoint; skips what was applied already. Returns
    /// the checkpoint committed.
    ///
    /// `committed` is the checkpoint the caller's last batch committed (`None`: unknown, so it
    /// is read, and locked, first). The batch moves the checkpoint on from there, and only if
    /// the table still says so: a table behind it means Postgres lost batches, one ahead that
    /// another projector moved it; either way nothing of the batch is written and this fails,
    /// and the projector restarts from the table's checkpoint.
    ///
    /// A batch of run events only (the common case) is one statement and no transaction: its
    /// rows' writes and the checkpoint's move together, each write made only if the checkpoint
    /// moves ([`taskmesh_store::set_checkpoint`]), after reading the runs the cache
    /// lacks. Any other event needs statements of its own, and the batch is one transaction;
    /// so does a run submitted again under its idempotency key ([`MovedOn::NeedsTransaction`]).
    ///
    /// Commits are asynchronous (the projector's connections set `synchronous_commit = off`):
    /// they do not wait for the WAL to reach the disk. Postgres may then lose the last batches
    /// in a crash of its own, but only whole (rows and checkpoint commit together), and the
    /// projector finds out as above, replaying them from the log. The read models are derived
    /// data; the log is what must not lose a write.
    ///
    /// `cache` holds the rows of runs earlier batches left running ([`fold::RowCache`]): the
    /// batch reads from the tables only the runs it does not hold, and leaves the rows it
    /// wrote in it once it has committed. Give it the same cache only for batches applied one
    /// after another by this projector, with nothing else writing the run tables meanwhile (a
    /// rebuild, say): after a failure or such a write, start a new one.
    ///
    /// Its statements are planned for the keys they are given each time (the connections set
    /// `plan_cache_mode = force_custom_plan`): a cached generic plan is made from the first few
    /// executions, when the tables may be nearly empty, and kept until the tables are next
    /// analysed. Where nothing analyses them (autovacuum off), such a plan joins a batch's keys
    /// against whole tables, and a run's end took ever longer to reach the read side as they
    /// grew (docs/benchmarks.md).
    pub async fn apply_batch(
        &self,
        events: &[Stored],
        committed: Option<u64>,
        cache: &mut fold::RowCache,
    ) -> anyhow::Result<u64> {
        let mut conn = self.pool().acquire().await?;
        self.apply_on(&mut conn, events, committed, cache).await
    }

    /// [`Projector::apply_batch`] on a connection the caller holds.
    async fn apply_on(
        &self,
        conn: &mut sqlx::PgConnection,
        events: &[Stored],
        committed: Option<u64>,
        cache: &mut fold::RowCache,
    ) -> anyhow::Result<u64> {
        let fresh = |from: u64| events.iter().filter(move |s| s.seq > from);
        if let Some(from) = committed
            && fresh(from).all(gathered)
        {
            // Only run rows and audit records: one statement, no transaction.
            match self.move_on(conn, events, from, cache, false).await? {
                MovedOn::To(checkpoint, runs) => {
                    runs.keep(cache);
                    return Ok(checkpoint);
                }
                MovedOn::CheckpointMoved => return Err(self.moved_under(from).await),
                MovedOn::NeedsTransaction => {}
            }
        }
        let mut tx = sqlx::Connection::begin(conn).await?;
        let from = match committed {
            Some(c) => c,
            None => taskmesh_store::checkpoint(&mut tx, NAME).await?,
        };
        let mut versions = apply::Versions::default();
        // Runs and audit records retention removed go once the batch's run rows and audit
        // records are written: a batch that brings in a run's last events, or old audit
        // records (a projector behind by the retention age), and the record of their removal
        // leaves no rows of them.
        let is_swept = |s: &&Stored| {
            matches!(s.envelope.event, taskmesh_events::Event::RunsSwept(_) | taskmesh_events::Event::AuditSwept(_))
        };
        for stored in fresh(from).filter(|s| !gathered(s)).filter(|s| !is_swept(s)) {
            apply::apply(&mut tx, stored, &mut versions).await?;
        }
        versions.write(&mut tx).await?;
        let MovedOn::To(checkpoint, runs) = self.move_on(&mut tx, events, from, cache, true).await? else {
            drop(tx);
            return Err(self.moved_under(from).await);
        };
        // (Records of removed runs are of no versioned resource.)
        let mut no_versions = apply::Versions::default();
        for stored in fresh(from).filter(is_swept) {
            apply::apply(&mut tx, stored, &mut no_versions).await?;
        }
        tx.commit().await?;
        runs.keep(cache);
        // Nor any cached rows of them (a run whose end was removed before it was projected
        // looks running): read again, should a run of the same id come.
        for stored in fresh(from).filter(is_swept) {
            if let taskmesh_events::Event::RunsSwept(e) = &stored.envelope.event {
                for run in &e.runs {
                    cache.remove(&(stored.envelope.tenant.clone(), run.run_id));
                }
            }
        }
        Ok(checkpoint)
    }

    /// Folds the batch's run events and gathers its audit records (those after `from`), and
    /// writes them with the checkpoint's move in one statement (`in_transaction`: on a
    /// connection in a transaction, which a batch submitting a run again needs: see
    /// [`MovedOn::NeedsTransaction`]).
    async fn move_on(
        &self,
        conn: &mut sqlx::PgConnection,
        events: &[Stored],
        from: u64,
        cache: &mut fold::RowCache,
        in_transaction: bool,
    ) -> anyhow::Result<MovedOn> {
        // A commit's events share its sequence: the checkpoint moves to the sequence once all of
        // them are applied (a batch holds whole messages).
        let fresh = || events.iter().filter(|s| s.seq > from);
        let checkpoint = fresh().map(|s| s.seq).max().unwrap_or(from);
        let mut runs = fold::RunRows::load(conn, fresh(), cache).await?;
        if !runs.replaced().is_empty() {
            if !in_transaction {
                // Nothing changed: the rows go back to the cache as they were taken.
                runs.keep(cache);
                return Ok(MovedOn::NeedsTransaction);
            }
            // The deletion stands only if the batch's statement moves the checkpoint on: the
            // transaction is rolled back otherwise.
            let (tenants, ids): (Vec<&str>, Vec<uuid::Uuid>) =
                runs.replaced().iter().map(|(t, id)| (t.as_str(), *id)).unzip();
            sqlx::query(
                "WITH k AS (SELECT * FROM UNNEST($1::text[], $2::uuid[]) AS k(tenant, id)),
                      a AS (DELETE FROM step_attempts t USING k WHERE t.tenant_id = k.tenant AND t.run_id = k.id),
                      s AS (DELETE FROM steps t USING k WHERE t.tenant_id = k.tenant AND t.run_id = k.id)
                 DELETE FROM runs t USING k WHERE t.tenant_id = k.tenant AND t.id = k.id",
            )
            .bind(&tenants)
            .bind(&ids)
            .execute(&mut *conn)
            .await?;
        }
        let mut audit = apply::AuditRows::default();
        for stored in fresh().filter(|s| gathered(s)) {
            if !audit.take(stored) {
                runs.apply(stored);
            }
        }
        let mut writes = taskmesh_store::Alongside::default();
        audit.write(&mut writes)?;
        let ended = runs.write(&mut writes)?;
        let moved = taskmesh_store::set_checkpoint(conn, NAME, from, checkpoint, ended, writes).await?;
        Ok(if moved { MovedOn::To(checkpoint, Box::new(runs)) } else { MovedOn::CheckpointMoved })
    }

    /// Why a batch left from checkpoint `from` could not move it on: Postgres lost batches (the
    /// table is behind), or another projector or a rebuild is at work.
    async fn moved_under(&self, from: u64) -> anyhow::Error {
        let table = match taskmesh_store::read_checkpoint(self.pool(), NAME).await {
            Ok(table) => table,
            Err(e) => return e.into(),
        };
        if let Err(lost) = lost_batches(table, from) {
            return lost;
        }
        anyhow::anyhow!(
            "the read models' checkpoint moved under this projector (it left {from}, the table says {table}): another projector, or a rebuild, is at work"
        )
    }

    /// Empties the read models and resets the checkpoint: the next [`Projector::run`] replays
    /// the whole log. Stop the running projector first.
    pub async fn rebuild(pool: &PgPool) -> anyhow::Result<()> {
        taskmesh_store::reset_read_models(pool, NAME).await?;
        Ok(())
    }
}
