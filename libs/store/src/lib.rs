//! Postgres for Taskmesh: the connection pool, the read-model schema (embedded migrations),
//! projection checkpoints, and what readers keep of the projector's announcements (the
//! checkpoint, runs' ends, API keys' revocations: [`follow_checkpoint`], [`RunEnds`],
//! [`NotifiedCache`]), and caches kept true by announcements of their rows' changes
//! ([`follow_invalidations`]).
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
    /// The listening connection of [`follow_checkpoint`] closed, or went silent.
    #[error("the listening connection was lost")]
    ListenerLost,
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The read-model schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Empties every read model; a rebuild then replays the log into them.
const TRUNCATE_READ_MODELS: &str = "TRUNCATE tenants, api_keys, runs, steps, step_attempts, repo_connections, webhook_endpoints, webhook_delivery_failures, workflows, schedules, secrets, audit_log";

/// How long a pooled connection may have been idle and still be handed out unchecked.
pub const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Connects a pool (lazily: it does not fail when Postgres is down at start).
///
/// A connection idle for [`CHECK_IDLE_AFTER`] or longer is checked (a round trip) before the
/// pool hands it out, and replaced if Postgres has dropped it meanwhile (a restart, a
/// failover); one used more recently is not. sqlx's default checks every one, which costs
/// each statement a round trip more under load, when connections are idle for microseconds
/// (and the pool checks each connection as it takes it back besides).
pub fn connect(settings: &PostgresSettings) -> Result<PgPool> {
    let options: PgConnectOptions = settings.url.expose_secret().parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                check_if_idle(conn, meta.idle_for).await?;
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Checks that a connection idle for `idle_for` is still alive (a round trip, answered within
/// 5 s), if that is [`CHECK_IDLE_AFTER`] or longer: the check [`connect`]'s pools make as they
/// hand one out, for connections held outside a pool too.
pub async fn check_if_idle(conn: &mut sqlx::PgConnection, idle_for: Duration) -> std::result::Result<(), sqlx::Error> {
    if idle_for < CHECK_IDLE_AFTER {
        return Ok(());
    }
    match tokio::time::timeout(Duration::from_secs(5), sqlx::Connection::ping(conn)).await {
        Ok(pinged) => pinged,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer to a ping"))),
    }
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

/// The channel an API key's revocation is announced on once it is in the read model
/// (`NOTIFY`, payload the key's hash, or `*` when the table was emptied for a rebuild), for
/// caches of keys (see [`NotifiedCache`]). It is sent
/// before the checkpoint of the same commit, so a reader that has seen the checkpoint has seen
/// the revocation.
pub const KEY_REVOKED_CHANNEL: &str = "taskmesh_key_revoked";

/// The channel a change to a tenant's webhook endpoints is announced on (`NOTIFY` by a trigger
/// on `webhook_endpoints`, payload the tenant, or `*` when the table was emptied), for caches of
/// each tenant's endpoints (see [`follow_invalidations`]).
pub const WEBHOOK_ENDPOINTS_CHANNEL: &str = "taskmesh_webhook_endpoints";

/// The checkpoint's statement; its parameters are numbered after those of the writes that go
/// with it in one statement ([`Alongside`]).
const SET_CHECKPOINT: &str = "UPDATE projection_checkpoints SET last_seq = $2 WHERE projection = $1 AND last_seq = $6
     RETURNING pg_notify($3, projection || ':' || last_seq) AS moved,
               (SELECT count(pg_notify($4, run::text)) FROM UNNEST($5::uuid[]) AS run) AS ended";

/// Where a write alongside a checkpoint says it happens only if the checkpoint moves: a
/// condition, written into its `WHERE` (see [`Alongside`]).
pub const IF_MOVED: &str = "{if_checkpoint_moved}";

/// Writes sent in the same statement as a checkpoint's move ([`set_checkpoint`]), as
/// data-modifying `WITH` parts before it: one round trip to Postgres for all of them. Each
/// part is a statement of its own text, parameters numbered from `$1`, renumbered here to
/// follow the ones before. The parts run on one snapshot and see nothing of each other's
/// writes, so no two may touch the same row. Each part's `WHERE` holds [`IF_MOVED`], so that it
/// writes nothing when the checkpoint does not move.
#[derive(Default)]
pub struct Alongside {
    parts: Vec<String>,
    args: sqlx::postgres::PgArguments,
    params: usize,
}

impl Alongside {
    /// Adds a write (`INSERT`, `UPDATE` or `DELETE` without `RETURNING`) whose parameters,
    /// `$1` to `$n`, `bind` adds in order, and whose `WHERE` names [`IF_MOVED`]. An error (no
    /// [`IF_MOVED`], a value that does not encode, or a count of values that is not `n`) leaves
    /// the writes unusable: drop them.
    pub fn add(
        &mut self,
        sql: &str,
        bind: impl FnOnce(&mut Binds<'_>) -> std::result::Result<(), sqlx::error::BoxDynError>,
    ) -> Result<()> {
        if !sql.contains(IF_MOVED) {
            return Err(
                sqlx::Error::Protocol(format!("a write alongside a checkpoint must name {IF_MOVED}: {sql}")).into()
            );
        }
        let before = self.params;
        let mut binds = Binds { args: &mut self.args, added: 0 };
        bind(&mut binds).map_err(sqlx::Error::Encode)?;
        let added = binds.added;
        let (sql, highest) = renumber(sql, before);
        if highest != added {
            return Err(sqlx::Error::Protocol(format!(
                "a write alongside the checkpoint names {highest} parameters but {added} were bound"
            ))
            .into());
        }
        self.params += added;
        self.parts.push(sql);
        Ok(())
    }

    /// How many writes it holds.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// Adds parameters to an [`Alongside`] write.
pub struct Binds<'a> {
    args: &'a mut sqlx::postgres::PgArguments,
    added: usize,
}

impl Binds<'_> {
    pub fn bind<'q, T>(&mut self, value: T) -> std::result::Result<&mut Self, sqlx::error::BoxDynError>
    where
        T: sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + 'q,
    {
        sqlx::Arguments::add(self.args, value)?;
        self.added += 1;
        Ok(self)
    }
}

/// `sql` with each parameter `$n` made `$(n + offset)`, and the highest `n` it names. What is
/// not a parameter is left as it is: string literals (`'…'`, `E'…'`), quoted identifiers
/// (`"…"`), dollar-quoted strings (`$$…$$`, `$tag$…$tag$`), comments, and a `$` inside an
/// identifier (`a$1`).
fn renumber(sql: &str, offset: usize) -> (String, usize) {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 16);
    let mut highest = 0;
    // `copied` is where the text not yet copied to `out` starts; `i` is the scan position.
    let (mut copied, mut i) = (0, 0);
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    // The index just past the first `end` at or after `from` (the text's end if none).
    let past = |from: usize, end: &str| sql[from..].find(end).map_or(sql.len(), |at| from + at + end.len());
    while i < bytes.len() {
        i = match bytes[i] {
            // A doubled quote inside reads as two literals back to back: the same here.
            // (`E'…\'…'` escapes are not read: nothing here writes them.)
            b'\'' => past(i + 1, "'"),
            b'"' => past(i + 1, "\""),
            b'-' if bytes.get(i + 1) == Some(&b'-') => past(i, "\n"),
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                // Block comments nest.
                let (mut depth, mut j) = (1, i + 2);
                while depth > 0 && j < bytes.len() {
                    if bytes[j..].starts_with(b"/*") {
                        (depth, j) = (depth + 1, j + 2);
                    } else if bytes[j..].starts_with(b"*/") {
                        (depth, j) = (depth - 1, j + 2);
                    } else {
                        j += 1;
                    }
                }
                j
            }
            b'$' if i > 0 && ident(bytes[i - 1]) => i + 1,
            b'$' => {
                let digits = bytes[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
                if digits > 0 {
                    let n: usize = sql[i + 1..i + 1 + digits].parse().expect("digits");
                    highest = highest.max(n);
                    out.push_str(&sql[copied..i]);
                    out.push_str(&format!("${}", n + offset));
                    copied = i + 1 + digits;
                    copied
                } else {
                    // A dollar quote's opening tag (`$$`, `$tag$`) runs to its closing one.
                    let tag = bytes[i + 1..].iter().take_while(|b| ident(**b)).count();
                    match bytes.get(i + 1 + tag) {
                        Some(b'$') => past(i + tag + 2, &sql[i..i + tag + 2]),
                        _ => i + 1,
                    }
                }
            }
            _ => i + 1,
        };
    }
    out.push_str(&sql[copied..]);
    (out, highest)
}

/// Records that `projection` applied everything up to `seq`, provided its checkpoint is still
/// `from`, and announces it on [`CHECKPOINT_CHANNEL`], and the end of each run in `ended` on
/// [`RUN_ENDED_CHANNEL`], once committed. The `writes` go in the same statement, each made only
/// if the checkpoint moves (its [`IF_MOVED`] asks the checkpoint's `UPDATE`, a part of the
/// same statement, whether it updated its row): one round trip for a batch's rows and its
/// checkpoint, atomic by itself outside a transaction. False (nothing written) when the
/// checkpoint is not `from`, or has no row: someone else moved it, or Postgres lost what moved
/// it there. The update locks the row, so of two statements moving the same checkpoint on from
/// the same place, the second finds it moved.
pub async fn set_checkpoint(
    conn: &mut sqlx::PgConnection,
    projection: &str,
    from: u64,
    seq: u64,
    ended: &[uuid::Uuid],
    writes: Alongside,
) -> Result<bool> {
    let Alongside { parts, mut args, params } = writes;
    let mut binds = Binds { args: &mut args, added: 0 };
    let bound = (|| {
        binds
            .bind(projection)?
            .bind(seq as i64)?
            .bind(CHECKPOINT_CHANNEL)?
            .bind(RUN_ENDED_CHANNEL)?
            .bind(ended)?
            .bind(from as i64)?;
        Ok::<_, sqlx::error::BoxDynError>(())
    })();
    bound.map_err(sqlx::Error::Encode)?;
    let sql = with_checkpoint(&parts, params);
    let moved: i64 = sqlx::query_scalar_with(sqlx::AssertSqlSafe(sql), args).fetch_one(conn).await?;
    Ok(moved == 1)
}

/// The statement moving a checkpoint (its parameters numbered after the `params` of the
/// writes) with the writes' `parts`, each asking whether it moved.
fn with_checkpoint(parts: &[String], params: usize) -> String {
    let (checkpoint, _) = renumber(SET_CHECKPOINT, params);
    let mut with = vec![format!("checkpoint AS ({checkpoint})")];
    with.extend(
        parts
            .iter()
            .enumerate()
            .map(|(i, p)| format!("w{i} AS ({})", p.replace(IF_MOVED, "EXISTS (SELECT 1 FROM checkpoint)"))),
    );
    format!("WITH {} SELECT count(*) FROM checkpoint", with.join(", "))
}

/// Creates `projection`'s checkpoint at 0 if it has none (a new database, or after a rebuild),
/// so that [`set_checkpoint`] finds a row to move on.
pub async fn ensure_checkpoint(pool: &PgPool, projection: &str) -> Result<()> {
    sqlx::query("INSERT INTO projection_checkpoints (projection, last_seq) VALUES ($1, 0) ON CONFLICT DO NOTHING")
        .bind(projection)
        .execute(pool)
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

/// Hears that what a cache holds under a key changed: API keys' revocations (from the listener
/// of [`follow_checkpoint`]), a tenant's webhook endpoints (from [`follow_invalidations`]).
pub trait Invalidations: Send + Sync {
    /// What is held under `key` changed (a key with this hash was revoked, …).
    fn invalidated(&self, key: &str);
    /// Changes may have been missed (`false`: from now until `true` again, they are not
    /// heard at all).
    fn missed(&self, listening: bool);
}

/// Values looked up in the read model, by key, kept only while changes to them are heard, so a
/// hot lookup costs no query: an entry goes when its change is announced (an API key's
/// revocation on [`KEY_REVOKED_CHANNEL`], a tenant's endpoints on
/// [`WEBHOOK_ENDPOINTS_CHANNEL`]), every entry goes when announcements may have been missed
/// (and none is kept or served while the listener is down), and each lives at most `ttl`
/// anyway. Bounded to `max` entries.
pub struct NotifiedCache<V> {
    max: usize,
    ttl: Duration,
    inner: std::sync::Mutex<CacheEntries<V>>,
}

struct CacheEntries<V> {
    by_hash: std::collections::HashMap<String, (V, std::time::Instant)>,
    /// Moves on at every change heard and every miss: a lookup that began before one must not
    /// be kept (its answer may predate the change).
    generation: u64,
    listening: bool,
}

/// A lookup's place in a [`NotifiedCache`]'s history; see [`NotifiedCache::keep`].
pub struct CacheTicket(u64);

impl<V: Clone> NotifiedCache<V> {
    pub fn new(max: usize, ttl: Duration) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            max,
            ttl,
            inner: std::sync::Mutex::new(CacheEntries { by_hash: Default::default(), generation: 0, listening: false }),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, CacheEntries<V>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached value, or a ticket to [`NotifiedCache::keep`] what the read model says.
    pub fn get(&self, key_hash: &str) -> std::result::Result<V, CacheTicket> {
        let entries = self.entries();
        match entries.by_hash.get(key_hash) {
            Some((v, at)) if entries.listening && at.elapsed() < self.ttl => Ok(v.clone()),
            _ => Err(CacheTicket(entries.generation)),
        }
    }

    /// Keeps a value looked up since `ticket` was issued, unless a change to it (or a miss)
    /// was heard meanwhile.
    pub fn keep(&self, ticket: CacheTicket, key_hash: &str, value: V) {
        let mut entries = self.entries();
        if self.max == 0 || !entries.listening || entries.generation != ticket.0 {
            return;
        }
        if entries.by_hash.len() >= self.max {
            let ttl = self.ttl;
            entries.by_hash.retain(|_, (_, at)| at.elapsed() < ttl);
            // Still full of live keys: the older half goes (at least one), so the scans this
            // costs come once per `max / 2` keys kept, not once per key.
            if entries.by_hash.len() >= self.max {
                let mut ages: Vec<(std::time::Instant, String)> =
                    entries.by_hash.iter().map(|(k, (_, at))| (*at, k.clone())).collect();
                let older = (ages.len() / 2).max(1);
                ages.select_nth_unstable_by_key(older - 1, |(at, _)| *at);
                for (_, key) in &ages[..older] {
                    entries.by_hash.remove(key);
                }
            }
        }
        entries.by_hash.insert(key_hash.to_string(), (value, std::time::Instant::now()));
    }

    /// How many keys are cached.
    pub fn len(&self) -> usize {
        self.entries().by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V: Clone + Send> Invalidations for NotifiedCache<V> {
    fn invalidated(&self, key_hash: &str) {
        let mut entries = self.entries();
        entries.generation += 1;
        entries.by_hash.remove(key_hash);
    }

    fn missed(&self, listening: bool) {
        let mut entries = self.entries();
        entries.generation += 1;
        entries.by_hash.clear();
        entries.listening = listening;
    }
}

/// The prefix of the channel each gateway's listener sends itself a notification on every
/// [`PING_EVERY`] (one channel per listener), to tell a live listening connection from one
/// that has died without a word.
pub const PING_CHANNEL: &str = "taskmesh_ping";
/// How often the listener of [`follow_checkpoint`] pings itself.
pub const PING_EVERY: Duration = Duration::from_secs(2);
/// A listener that has heard nothing for this long (three pings) is taken for dead.
pub const SILENCE: Duration = Duration::from_secs(6);

/// Follows `projection`'s checkpoint as it is committed: a background task listens on
/// [`CHECKPOINT_CHANNEL`] over a connection of its own (not one of `pool`'s) and publishes
/// each advance. After (re)connecting it reads the table, so an announcement missed while
/// disconnected is made up for. Waiting readers get woken by commits instead of polling the
/// table. `keys` keeps and serves entries only once the listener has heard its own first ping
/// (announcements are seen to arrive). While the connection is lost (closed, or silent for
/// [`SILENCE`] though pinged), the checkpoint reads 0 (readers look at the table), `keys`
/// serves nothing, and then the listener starts afresh. The task ends when every receiver is
/// dropped.
pub fn follow_checkpoint(
    pool: &PgPool,
    projection: &'static str,
    ends: std::sync::Arc<RunEnds>,
    keys: std::sync::Arc<dyn Invalidations>,
) -> tokio::sync::watch::Receiver<u64> {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let pool = pool.clone();
    tokio::spawn(async move {
        keep_listening(
            &pool,
            tx.closed(),
            |own, ping| {
                let (pool, tx, ends, keys) = (&pool, &tx, &*ends, &*keys);
                async move { listen_to_checkpoint(&own, pool, projection, &ping, tx, ends, keys).await }
            },
            || {
                keys.missed(false);
                tx.send_replace(0);
                ends.wake_all();
            },
        )
        .await
    });
    rx
}

/// Keeps `cache` true to the announcements on `channel` (payload: the key whose value changed,
/// or `*` for all): a background task listens over a connection of its own, pinged as
/// [`follow_checkpoint`]'s is, and tells `cache` of each change, and that changes may have been
/// missed whenever the connection is lost (closed, or silent for [`SILENCE`]), until it listens
/// again. The task ends when `stopped` resolves.
pub fn follow_invalidations(
    pool: &PgPool,
    channel: &'static str,
    cache: std::sync::Arc<dyn Invalidations>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let listen = |own: PgPool, ping: String| {
            let cache = cache.clone();
            async move {
                let mut listening = Listening::open(&own, &[channel], &ping).await?;
                loop {
                    let heard = listening.next(&*cache).await?;
                    match heard.payload() {
                        "*" => listening.all_changed(&*cache),
                        key => cache.invalidated(key),
                    }
                }
            }
        };
        keep_listening(&pool, stopped, listen, || cache.missed(false)).await
    })
}

/// Runs `listen` over fresh connections of its own until `stopped` resolves: `listen` gets
/// them and the name of the channel they are pinged on every [`PING_EVERY`], and returns only
/// on an error (a lost connection, or [`SILENCE`]); `lost` is called then, and it starts
/// afresh a second later. `lost` is called once more when it stops.
async fn keep_listening<Fut>(
    pool: &PgPool,
    stopped: impl std::future::Future<Output = ()>,
    listen: impl Fn(PgPool, String) -> Fut,
    lost: impl Fn(),
) where
    Fut: std::future::Future<Output = Result<std::convert::Infallible>>,
{
    let options = (*pool.connect_options()).clone();
    // This listener's own ping channel: it hears its pings, not every listener's.
    let channel = format!("{PING_CHANNEL}_{}", uuid::Uuid::now_v7().simple());
    tokio::pin!(stopped);
    loop {
        // Two connections of its own, afresh for each attempt (not `pool`'s, which may be
        // busy): one to listen on, one to ping it with. A connection that died silently
        // may stay held by a background task until TCP gives up on it; a new pool does not
        // wait for it.
        let own = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options.clone());
        let ping = async {
            loop {
                tokio::time::sleep(PING_EVERY).await;
                let sent = sqlx::query("SELECT pg_notify($1, '')").bind(&channel).execute(&own).await;
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "pinging a listener");
                }
            }
        };
        tokio::select! {
            _ = &mut stopped => break,
            _ = ping => {},
            Err(e) = listen(own.clone(), channel.clone()) => {
                tracing::debug!(error = %e, "listening for announcements; reconnecting");
            },
        }
        lost();
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    // Nothing is heard any more: a cache that outlives this task must not serve what it kept.
    lost();
}

/// A listener on some channels and on its ping channel, which reports a lost connection at
/// once (it is then dropped) rather than mending it quietly: what was announced meanwhile is
/// lost, and the caller must know. A cache is told changes are heard only once the listener's
/// own first ping is: announcements may not arrive though `LISTEN` succeeded (behind a
/// transaction-mode pooler, say).
struct Listening {
    listener: sqlx::postgres::PgListener,
    ping: String,
    heard_ping: bool,
}

impl Listening {
    /// Listens on `channels` and `ping` over `own`, and pings itself once.
    async fn open(own: &PgPool, channels: &[&str], ping: &str) -> Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect_with(own).await?;
        listener.eager_reconnect(false);
        listener.listen_all(channels.iter().copied().chain([ping])).await?;
        sqlx::query("SELECT pg_notify($1, '')").bind(ping).execute(own).await?;
        Ok(Self { listener, ping: ping.to_string(), heard_ping: false })
    }

    /// The next announcement other than a ping; an error if the connection is lost or silent
    /// for [`SILENCE`]. At the first ping heard, `cache` is told that changes are heard.
    async fn next(&mut self, cache: &dyn Invalidations) -> Result<sqlx::postgres::PgNotification> {
        loop {
            // (A timeout drops the listener, so whatever it was reading is not needed.)
            let next = tokio::time::timeout(SILENCE, self.listener.try_recv())
                .await
                .map_err(|_| StoreError::ListenerLost)??
                .ok_or(StoreError::ListenerLost)?;
            if next.channel() != self.ping {
                return Ok(next);
            }
            if !self.heard_ping {
                self.heard_ping = true;
                cache.missed(true);
            }
        }
    }

    /// Tells `cache` that everything it holds may have changed (`*` was announced).
    fn all_changed(&self, cache: &dyn Invalidations) {
        cache.missed(self.heard_ping);
    }
}

/// Listens over `own`: on [`CHECKPOINT_CHANNEL`] it moves `tx` on with each announcement of
/// `projection`'s checkpoint (having set it to the table's value once listening), on
/// [`RUN_ENDED_CHANNEL`] it wakes the waiters of each run that ended (every waiter once
/// listening), and on [`KEY_REVOKED_CHANNEL`] it tells `keys` (`*`: every key may be gone).
/// Returns only on an error: a lost connection, or [`SILENCE`].
async fn listen_to_checkpoint(
    own: &PgPool,
    pool: &PgPool,
    projection: &str,
    ping_channel: &str,
    tx: &tokio::sync::watch::Sender<u64>,
    ends: &RunEnds,
    keys: &dyn Invalidations,
) -> Result<std::convert::Infallible> {
    let advance = |seq: u64| {
        tx.send_if_modified(|at| {
            let moved = seq > *at;
            *at = (*at).max(seq);
            moved
        });
    };
    let prefix = format!("{projection}:");
    let mut listening =
        Listening::open(own, &[CHECKPOINT_CHANNEL, RUN_ENDED_CHANNEL, KEY_REVOKED_CHANNEL], ping_channel).await?;
    // The table's value replaces the last one heard: should Postgres have lost commits (the
    // projector's are asynchronous), the checkpoint moves back until they are replayed, rather
    // than vouching for rows that are gone.
    tx.send_replace(read_checkpoint(pool, projection).await?);
    ends.wake_all();
    loop {
        let n = listening.next(keys).await?;
        match n.channel() {
            KEY_REVOKED_CHANNEL => match n.payload() {
                "*" => listening.all_changed(keys),
                hash => keys.invalidated(hash),
            },
            RUN_ENDED_CHANNEL => {
                if let Ok(run) = n.payload().parse() {
                    ends.ended(run);
                }
            }
            _ => {
                if let Some(seq) = n.payload().strip_prefix(&prefix).and_then(|s| s.parse().ok()) {
                    advance(seq);
                }
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
    // Keys gone from the table may not come back: caches forget them all.
    sqlx::query("SELECT pg_notify($1, '*')").bind(KEY_REVOKED_CHANNEL).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1").bind(projection).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_alongside_a_checkpoint_are_numbered_after_the_ones_before() {
        assert_eq!(
            renumber("UPDATE t SET a = $1 WHERE b = $12 AND c = '$x'", 6),
            ("UPDATE t SET a = $7 WHERE b = $18 AND c = '$x'".into(), 12)
        );
        // Only parameters: not what literals, quoted names, dollar quotes, comments or names
        // hold.
        let sql = "SELECT $2, 'a $1 ''$3''', \"col $1\", $$ $1 $$, $f$ $1 $f$, a$1 -- $1\n, $1 /* $9 */";
        let want = "SELECT $12, 'a $1 ''$3''', \"col $1\", $$ $1 $$, $f$ $1 $f$, a$1 -- $1\n, $11 /* $9 */";
        assert_eq!(renumber(sql, 10), (want.into(), 2));
        assert_eq!(renumber("'unterminated $1", 1), ("'unterminated $1".into(), 0));
        assert_eq!(renumber("/* a /* $1 */ $2 */ $3", 1), ("/* a /* $1 */ $2 */ $4".into(), 3));
        let mut writes = Alongside::default();
        writes
            .add("INSERT INTO t SELECT * FROM UNNEST($1::int[], $2::text[]) WHERE {if_checkpoint_moved}", |b| {
                b.bind(vec![1])?.bind(vec!["a"])?;
                Ok(())
            })
            .unwrap();
        writes
            .add("DELETE FROM t WHERE a = $1 AND {if_checkpoint_moved}", |b| {
                b.bind(1)?;
                Ok(())
            })
            .unwrap();
        assert_eq!(writes.params, 3);
        assert_eq!(writes.parts[1], "DELETE FROM t WHERE a = $3 AND {if_checkpoint_moved}");
        let mismatched = writes.add("DELETE FROM t WHERE (a = $1 OR a = $2) AND {if_checkpoint_moved}", |b| {
            b.bind(1)?;
            Ok(())
        });
        assert!(mismatched.is_err(), "a write naming more parameters than it binds is refused");
        assert_eq!(writes.len(), 2);
    }

    #[test]
    fn a_checkpoint_guards_each_write_alongside_and_counts_its_row() {
        let mut writes = Alongside::default();
        writes
            .add("DELETE FROM t WHERE a = $1 AND {if_checkpoint_moved}", |b| {
                b.bind(1)?;
                Ok(())
            })
            .unwrap();
        let sql = with_checkpoint(&writes.parts, writes.params);
        assert!(sql.starts_with("WITH checkpoint AS (UPDATE projection_checkpoints SET last_seq = $3"), "{sql}");
        assert!(sql.contains("w0 AS (DELETE FROM t WHERE a = $1 AND EXISTS (SELECT 1 FROM checkpoint))"), "{sql}");
        assert!(sql.ends_with("SELECT count(*) FROM checkpoint"), "{sql}");
    }

    #[test]
    fn a_cached_key_serves_until_its_revocation_is_heard() {
        let cache = NotifiedCache::<u32>::new(10, Duration::from_secs(60));
        // Nothing is kept before the listener is up.
        let ticket = cache.get("a").unwrap_err();
        cache.keep(ticket, "a", 1);
        assert!(cache.is_empty());
        cache.missed(true);
        let ticket = cache.get("a").unwrap_err();
        cache.keep(ticket, "a", 1);
        assert_eq!(cache.get("a").ok(), Some(1));
        cache.invalidated("b");
        assert_eq!(cache.get("a").ok(), Some(1), "another key's revocation leaves it");
        cache.invalidated("a");
        assert!(cache.get("a").is_err());
    }

    #[test]
    fn a_lookup_that_began_before_a_revocation_is_not_kept() {
        let cache = NotifiedCache::<u32>::new(10, Duration::from_secs(60));
        cache.missed(true);
        // The read model answered before the revocation was committed; the announcement
        // arrives before the answer is kept.
        let ticket = cache.get("a").unwrap_err();
        cache.invalidated("a");
        cache.keep(ticket, "a", 1);
        assert!(cache.get("a").is_err());
        // So does one that began before announcements were missed.
        let ticket = cache.get("a").unwrap_err();
        cache.missed(true);
        cache.keep(ticket, "a", 1);
        assert!(cache.get("a").is_err());
    }

    #[test]
    fn nothing_is_served_while_revocations_go_unheard_and_entries_age_out() {
        let cache = NotifiedCache::<u32>::new(4, Duration::from_millis(100));
        cache.missed(true);
        for key in ["a", "b", "c", "d", "e"] {
            let ticket = cache.get(key).unwrap_err();
            cache.keep(ticket, key, 1);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(cache.len(), 3, "bounded: when full, the older half went");
        assert!(cache.get("a").is_err() && cache.get("b").is_err(), "the oldest went");
        for key in ["c", "d", "e"] {
            assert_eq!(cache.get(key).ok(), Some(1));
        }
        cache.missed(false);
        assert!(cache.get("c").is_err(), "the listener is down");
        cache.missed(true);
        let ticket = cache.get("c").unwrap_err();
        cache.keep(ticket, "c", 1);
        std::thread::sleep(Duration::from_millis(110));
        assert!(cache.get("c").is_err(), "older than its time to live");
        let none = NotifiedCache::<u32>::new(0, Duration::from_secs(60));
        none.missed(true);
        none.keep(none.get("a").unwrap_err(), "a", 1);
        assert!(none.is_empty(), "a cache of no entries keeps none");
    }
}
