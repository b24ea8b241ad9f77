//! Taskmesh's bus: NATS JetStream as the event log, the dispatch queue and the command channel.
//!
//! - [`Bus::provision`] creates or updates the streams idempotently.
//! - [`Bus::append`] appends an event, and [`Bus::append_commit`] the events of one decision
//!   together (one message, a [`taskmesh_events::Commit`]), with `Nats-Msg-Id` dedup and
//!   expected-last-subject-sequence concurrency; a lost race is [`BusError::Conflict`]. Every
//!   appended message also carries the sequence it expected in the `Tm-Prev-Seq` header, so a
//!   reader can tell whether it saw every event of a subject in order. [`Bus::append_decision`]
//!   appends a decision too long for one message as several commits in turn.
//! - [`Bus::read_subject`] reads one aggregate's events back (an ephemeral consumer).
//! - [`Bus::durable`] provisions durable pull consumers with explicit ack.
//! - [`Bus::request`] and [`serve`] carry commands over core NATS request/reply, or straight
//!   to the server when it runs in the same process.
//! - [`Bus::hand_over`] gives a work-queue message straight to its consumer when it runs in the
//!   same process ([`Bus::take_locally`]), and enqueues it otherwise.
//!
//! Trace context travels in the `traceparent` header of every message sent on a caller's behalf
//! (the platform's own timers, [`Bus::enqueue_after`], carry none).
//!
//! # Layout
//! - this file: [`Bus`], [`Stored`], errors.
//! - [`serve`]: a bounded request/reply server loop.
//! - `hand_over`: work-queue messages handed to a consumer in the same process.
//! - [`consume`]: a durable consumer loop that recreates its consumer when the pull ends.
//! - `registry`: what runs in this process by name (servers, takers), found without NATS.

mod consume;
mod hand_over;
mod registry;
mod serve;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use taskmesh_config::NatsSettings;
use taskmesh_events::{Commit, Envelope, Namespace, Problem};

pub use consume::{Lanes, consume, consume_in_lanes};
pub use hand_over::{HAND_OVER_WAIT, SLOW_TAKER_PAUSE, Taking};
pub use serve::serve;

/// The header carrying the sequence an event was appended after (its subject's previous event).
pub const PREV_SEQ_HEADER: &str = "Tm-Prev-Seq";
/// The header carrying the event type (a commit's types, comma-separated), so consumers can
/// filter without decoding.
pub const EVENT_TYPE_HEADER: &str = "Tm-Event-Type";
/// W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Someone appended to the subject since the caller read it: reload and decide again.
    #[error("conflict appending to {subject}: it moved past sequence {expected}")]
    Conflict { subject: String, expected: u64 },
    /// Nobody answers on a command subject, or not in time.
    #[error("no service answered on {0}")]
    Unavailable(String),
    /// A command was answered with a problem.
    #[error(transparent)]
    Rejected(#[from] Problem),
    #[error("malformed message on {subject}: {reason}")]
    Malformed { subject: String, reason: String },
    /// A stream refused a message: it holds as many as it may in all.
    #[error("full: {0}")]
    Full(String),
    /// A stream refused a message: it holds as many as it may for the message's subject (a
    /// tenant's share).
    #[error("share full: {0}")]
    SubjectFull(String),
    #[error("nats: {0}")]
    Nats(String),
}

impl BusError {
    fn nats(e: impl std::fmt::Display) -> Self {
        BusError::Nats(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, BusError>;

/// An event read back from the log, with its position: its message's stream sequence, and its
/// place among the events that message holds (a commit of several events shares one sequence).
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    /// The subject's previous sequence the appender expected, if it appended with a check.
    pub prev: Option<u64>,
    pub envelope: Envelope,
    /// Its index in its commit (0 for an event stored alone).
    pub part: u32,
    /// How many events its commit holds (1 for an event stored alone).
    pub parts: u32,
}

impl Stored {
    /// Whether it is its commit's last event (after it, the next sequence).
    pub fn ends_commit(&self) -> bool {
        self.part + 1 == self.parts
    }
}

/// Most bytes one commit's message holds: a decision with more is appended as several commits
/// (NATS refuses messages over its `max_payload`, 1 MiB by default).
pub const COMMIT_MAX_BYTES: usize = 256 * 1024;
/// Most events one commit holds.
pub const COMMIT_MAX_EVENTS: usize = 1_000;

/// What [`Bus::append_decision`] got into the log.
#[derive(Debug)]
pub struct DecisionAppended {
    /// The first commit's sequence, if any was appended.
    pub first: Option<u64>,
    /// The last commit's sequence (the expected one, if none was appended).
    pub last: u64,
    /// How many of the decision's events the appended commits hold, from its start.
    pub events: usize,
    /// Why it stopped short, if it did.
    pub error: Option<BusError>,
}

/// The result of an append.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub seq: u64,
    /// The message id had been seen within the duplicate window: nothing new was stored and
    /// `seq` is the first copy's.
    pub duplicate: bool,
}

/// What follows from a subject's last event, as [`Bus::append_after_last`] asks it.
pub enum AfterLast<T> {
    /// Append these events (one commit) under `msg_id` (none: the first event's id), if the
    /// event read is the subject's last still.
    Append { events: Vec<Envelope>, msg_id: Option<String> },
    /// Append nothing: done, with this.
    Done(T),
}

/// How [`Bus::append_after_last`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled<T> {
    /// The commit appended, at this sequence.
    Appended(u64),
    /// Nothing was to be appended.
    Done(T),
}

impl Settled<u64> {
    /// The sequence either way: the commit's, or the one the decision settled on.
    pub fn seq(self) -> u64 {
        match self {
            Settled::Appended(seq) | Settled::Done(seq) => seq,
        }
    }
}

/// The last message on `subject` of `stream`, if it has one.
async fn last_raw(
    stream: &async_nats::jetstream::stream::Stream<()>,
    subject: &str,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(msg) => Ok(Some(msg)),
        Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(BusError::Nats(format!("reading last of {subject}: {e}"))),
    }
}

/// A message of the event log without its body ([`Bus::headings_before`]).
#[derive(Debug, Clone)]
pub struct Heading {
    pub seq: u64,
    pub subject: String,
    /// When the stream stored it.
    pub stored: chrono::DateTime<chrono::Utc>,
    /// The types of the events it holds (`Tm-Event-Type`; none on a message without the header).
    pub types: Vec<String>,
}

/// An ephemeral consumer made by [`Bus::reader`], deleted in the background once dropped
/// (whether its reading ended, failed or was given up), rather than left for its inactivity
/// threshold.
struct Reader {
    stream: jetstream::stream::Stream<()>,
    consumer: PullConsumer,
}

impl Reader {
    /// Hands what the consumer has to `each`, in order, until none is left, `each` answers
    /// `false`, or `limit` were read; whether some may be left (`false` once `each` stopped).
    /// Nothing coming while some are left, a few times over, is an error rather than part of
    /// them taken for all.
    async fn read(
        &self,
        what: &str,
        limit: usize,
        mut each: impl FnMut(&jetstream::Message) -> Result<bool>,
    ) -> Result<bool> {
        let mut left = self.consumer.cached_info().num_pending;
        let (mut read, mut empty_fetches) = (0, 0);
        while left > 0 && read < limit {
            let mut batch = self
                .consumer
                .batch()
                .max_messages((limit - read).min(1_000))
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .map_err(BusError::nats)?;
            let mut got = 0;
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(BusError::nats)?;
                (got, read) = (got + 1, read + 1);
                left = msg.info().map_err(BusError::nats)?.pending;
                if !each(&msg)? {
                    return Ok(false);
                }
                if left == 0 || read >= limit {
                    break;
                }
            }
            if got == 0 {
                empty_fetches += 1;
                if empty_fetches > 3 {
                    return Err(BusError::Nats(format!("reading {what}: stopped with {left} left")));
                }
            }
        }
        Ok(left > 0)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let (stream, name) = (self.stream.clone(), self.consumer.cached_info().name.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = stream.delete_consumer(&name).await;
            });
        }
    }
}

/// The latest message on `subject` of `stream`, decoded (`None`: none, or undecodable).
async fn latest_on<T: serde::de::DeserializeOwned>(
    stream: &async_nats::jetstream::stream::Stream<()>,
    subject: &str,
) -> Result<Option<T>> {
    Ok(last_raw(stream, subject).await?.and_then(|msg| serde_json::from_slice(&msg.payload).ok()))
}

/// A connection to the bus under one namespace.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: Context,
    ns: Namespace,
    settings: NatsSettings,
    /// The request servers running in this process ([`serve`]), reached without NATS.
    local: std::sync::Arc<serve::Local>,
    /// The work-queue consumers in this process that take messages without NATS ([`hand_over`]).
    takers: std::sync::Arc<hand_over::Takers>,
}

impl Bus {
    /// Connects to NATS. Fails with a clear error when no server answers.
    pub async fn connect(settings: &NatsSettings) -> Result<Self> {
        let ns = Namespace::new(&settings.namespace)
            .ok_or_else(|| BusError::Nats(format!("invalid namespace {:?}", settings.namespace)))?;
        let client = async_nats::ConnectOptions::new()
            .name("taskmesh")
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(settings.url.as_str())
            .await
            .map_err(|e| BusError::Nats(format!("connecting to {}: {e}", settings.url)))?;
        // Wait for the first connection so start-up errors surface here, not later.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                return Err(BusError::Nats(format!("no NATS server answers at {}", settings.url)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let js = jetstream::new(client.clone());
        Ok(Self { client, js, ns, settings: settings.clone(), local: Default::default(), takers: Default::default() })
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
    pub fn jetstream(&self) -> &Context {
        &self.js
    }
    pub fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    /// Creates the streams, or updates their configuration; safe to run at every start.
    pub async fn provision(&self) -> Result<()> {
        let dup = Duration::from_secs(self.settings.duplicate_window_secs.max(1));
        let events = StreamConfig {
            name: self.ns.events_stream(),
            description: Some("Taskmesh event log".into()),
            subjects: vec![self.ns.events_all()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.settings.replicas,
            // No age limit: `events_max_age_days` is kept by the scheduler's sweeps, which
            // leave what is still in force (a tenant's keys, secrets, schedules…).
            max_age: Duration::ZERO,
            max_bytes: self.settings.events_max_bytes,
            // A full event log refuses new events rather than silently dropping history.
            discard: DiscardPolicy::New,
            duplicate_window: dup,
            allow_direct: true,
            ..Default::default()
        };
        // A bounded stream that refuses new messages when full (the publisher backs off).
        let bounded = |name: String, subject: String, what: &str| StreamConfig {
            name,
            description: Some(what.into()),
            subjects: vec![subject],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.settings.replicas,
            max_messages: 1_000_000,
            discard: DiscardPolicy::New,
            duplicate_window: dup,
            ..Default::default()
        };
        let queue = |name: String, subject: String, what: &str| StreamConfig {
            retention: RetentionPolicy::WorkQueue,
            ..bounded(name, subject, what)
        };
        let logs = StreamConfig {
            name: self.ns.logs_stream(),
            description: Some("Taskmesh step logs".into()),
            subjects: vec![self.ns.logs_all()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.settings.replicas,
            max_age: Duration::from_secs(self.settings.logs_max_age_days.max(1) * 86_400),
            max_bytes: self.settings.logs_max_bytes,
            max_message_size: 64 * 1024,
            // Logs are not the source of truth: a full log stream drops its oldest lines.
            discard: DiscardPolicy::Old,
            ..Default::default()
        };
        // What waits for admission: entries are deleted once admitted, so the stream holds
        // exactly the waiting work and a new dispatcher reads it back from the start.
        let ready = bounded(self.ns.ready_stream(), self.ns.ready_all(), "Taskmesh work waiting for admission");
        // One message per active run of a concurrency group, purged when the run ends.
        let groups = StreamConfig {
            max_messages_per_subject: 1,
            ..bounded(self.ns.groups_stream(), self.ns.groups_all(), "Taskmesh concurrency groups' active runs")
        };
        // Live executors' latest heartbeats: the stream forgets an executor that stopped
        // beating. Old messages give way, so heartbeats never block.
        let executors = StreamConfig {
            max_messages_per_subject: 1,
            max_messages: 100_000,
            max_age: Duration::from_secs(60),
            duplicate_window: Duration::from_secs(30),
            discard: DiscardPolicy::Old,
            storage: StorageType::Memory,
            ..bounded(self.ns.executors_stream(), self.ns.executors_all(), "Taskmesh live executors")
        };
        // The label sets steps were dispatched for, so executors find their pools' consumers.
        let pools = StreamConfig {
            max_messages_per_subject: 1,
            max_messages: 100_000,
            ..bounded(self.ns.pools_stream(), self.ns.pools_all(), "Taskmesh executor pools (label sets)")
        };
        // Ended runs waiting for the notifier. A notifier that is not deployed, or far behind,
        // loses the oldest notices rather than stopping the scheduler (as the event log's own
        // limits would drop the events themselves).
        let ended = StreamConfig {
            max_age: Duration::from_secs(7 * 86_400),
            discard: DiscardPolicy::Old,
            ..queue(self.ns.ended_stream(), self.ns.ended_all(), "Taskmesh runs that ended, for notifications")
        };
        // One subject per tenant, each bounded: a tenant past its share is refused new
        // deliveries rather than filling the queue for all (discard new per subject:
        // nats-server 2.9 and later; 0: no share).
        let per_tenant = match self.settings.deliveries_per_tenant {
            0 => -1,
            n => i64::from(n),
        };
        let deliveries = StreamConfig {
            max_messages_per_subject: per_tenant,
            discard_new_per_subject: per_tenant > 0,
            ..queue(
                self.ns.deliveries_stream(),
                self.ns.deliveries_all(),
                "Taskmesh outbound deliveries: webhooks and commit statuses",
            )
        };
        // Kept step outcomes (`cache:`), the last one per key: not the source of truth (a
        // lost one is a step run again), so a full stream (bytes, or a million keys, all
        // tenants' together) drops its oldest, and none outlives the longest time a step may
        // reuse one.
        let cache = StreamConfig {
            max_messages_per_subject: 1,
            max_age: Duration::from_secs(taskmesh_events::workflow::CacheDef::MAX_TTL_SECS),
            max_bytes: self.settings.cache_max_bytes,
            discard: DiscardPolicy::Old,
            ..bounded(self.ns.cache_stream(), self.ns.cache_all(), "Taskmesh kept step outcomes (cache:)")
        };
        // Circuit breakers' state as the dispatcher leader last wrote it, for the next leader:
        // the last per breaker, none older than two days (a breaker idle for one is forgotten).
        let breakers = StreamConfig {
            max_messages_per_subject: 1,
            max_age: Duration::from_secs(2 * 86_400),
            max_message_size: 4 * 1024,
            discard: DiscardPolicy::Old,
            ..bounded(self.ns.breakers_stream(), self.ns.breakers_all(), "Taskmesh circuit breakers' state")
        };
        let streams = [
            events,
            ended,
            logs,
            ready,
            groups,
            executors,
            pools,
            cache,
            breakers,
            queue(self.ns.dispatch_stream(), self.ns.dispatch_all(), "Taskmesh steps ready to run"),
            deliveries,
            queue(
                self.ns.timers_stream(),
                self.ns.timers_all(),
                "Taskmesh timers: run timeouts, schedule ticks, the event log's sweep",
            ),
        ];
        for config in streams {
            let name = config.name.clone();
            self.js
                .create_or_update_stream(config)
                .await
                .map_err(|e| BusError::Nats(format!("provisioning stream {name}: {e}")))?;
        }
        Ok(())
    }

    /// Deletes this namespace's streams (tests clean up with it).
    pub async fn delete_streams(&self) -> Result<()> {
        for name in [
            self.ns.events_stream(),
            self.ns.dispatch_stream(),
            self.ns.deliveries_stream(),
            self.ns.ended_stream(),
            self.ns.timers_stream(),
            self.ns.logs_stream(),
            self.ns.ready_stream(),
            self.ns.groups_stream(),
            self.ns.leases_stream(),
            self.ns.executors_stream(),
            self.ns.pools_stream(),
            self.ns.cache_stream(),
            self.ns.breakers_stream(),
        ] {
            let _ = self.js.delete_stream(&name).await;
        }
        Ok(())
    }

    /// Appends `envelope` to its subject if the subject's last sequence is `expected` (0: the
    /// subject must be empty). The message id is the event id, so a retried append is
    /// deduplicated while a different decision by a racing writer is a [`BusError::Conflict`].
    pub async fn append(&self, expected: u64, envelope: &Envelope) -> Result<u64> {
        self.append_commit(expected, std::slice::from_ref(envelope)).await
    }

    /// Appends `envelopes` (one decision's events, all for one subject, at most
    /// [`COMMIT_MAX_EVENTS`] of them) as one message, atomically, if the subject's last
    /// sequence is `expected`; every event gets the returned sequence. The message id is the
    /// first event's id. Use [`commits`] to cut a longer decision into commits that fit.
    pub async fn append_commit(&self, expected: u64, envelopes: &[Envelope]) -> Result<u64> {
        let first = envelopes.first().ok_or_else(|| BusError::Nats("appending an empty commit".into()))?;
        let json = Commit::to_json(envelopes);
        Ok(self.append_message(Some(expected), envelopes, json, &first.id.to_string()).await?.seq)
    }

    /// Appends one decision's `envelopes` (all for one subject) after sequence `expected`, as
    /// few commits as fit ([`commits`]), one after another, each expecting the one before.
    /// Stops at the first failure; what was appended before it stands.
    pub async fn append_decision(&self, expected: u64, envelopes: &[Envelope]) -> DecisionAppended {
        let mut done = DecisionAppended { first: None, last: expected, events: 0, error: None };
        for Cut { envelopes, json } in commits(envelopes) {
            let appended = self.append_message(Some(done.last), envelopes, json, &envelopes[0].id.to_string()).await;
            match appended {
                Ok(Appended { seq, .. }) => {
                    done.first.get_or_insert(seq);
                    done.last = seq;
                    done.events += envelopes.len();
                }
                Err(e) => {
                    done.error = Some(e);
                    break;
                }
            }
        }
        done
    }

    /// Appends one event with an explicit message id, and optionally without a sequence check.
    pub async fn append_with_id(&self, expected: Option<u64>, envelope: &Envelope, msg_id: &str) -> Result<Appended> {
        self.append_message(expected, std::slice::from_ref(envelope), envelope.to_json(), msg_id).await
    }

    /// Publishes `json`, the message of `envelopes` ([`Commit::to_json`]), with their headers.
    #[tracing::instrument(skip_all, fields(subject = %envelopes[0].subject, r#type = envelopes[0].type_name(), events = envelopes.len()), err(level = "debug"))]
    async fn append_message(
        &self,
        expected: Option<u64>,
        envelopes: &[Envelope],
        json: Vec<u8>,
        msg_id: &str,
    ) -> Result<Appended> {
        let first = &envelopes[0];
        let mut publish = PublishMessage::build().payload(Bytes::from(json)).message_id(msg_id);
        publish = match envelopes {
            [one] => publish.header(EVENT_TYPE_HEADER, one.type_name()),
            many => publish
                .header(EVENT_TYPE_HEADER, many.iter().map(Envelope::type_name).collect::<Vec<_>>().join(",").as_str()),
        };
        if let Some(expected) = expected {
            publish =
                publish.expected_last_subject_sequence(expected).header(PREV_SEQ_HEADER, expected.to_string().as_str());
        }
        if let Some(tp) =
            first.traceparent.as_deref().map(str::to_owned).or_else(taskmesh_telemetry::current_traceparent)
        {
            publish = publish.header(TRACEPARENT_HEADER, tp.as_str());
        }
        let subject = first.subject.clone();
        let ack = async { self.js.send_publish(subject.clone(), publish).await?.await }.await;
        match ack {
            Ok(ack) => Ok(Appended { seq: ack.sequence, duplicate: ack.duplicate }),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(BusError::Conflict { subject, expected: expected.unwrap_or(0) })
            }
            Err(e) => Err(BusError::Nats(format!("appending to {subject}: {e}"))),
        }
    }

    /// Reads `subject`'s last event (none when it has none), asks `decide` what follows from it,
    /// and appends that if the event read is the last still. When someone appended meanwhile,
    /// reads and decides again, `tries` times at most; then the conflict is the error.
    pub async fn append_after_last<T, E, F, Fut>(
        &self,
        subject: &str,
        tries: usize,
        mut decide: F,
    ) -> std::result::Result<Settled<T>, E>
    where
        F: FnMut(Option<Stored>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<AfterLast<T>, E>>,
        E: From<BusError>,
    {
        let mut expected = 0;
        for _ in 0..tries.max(1) {
            let last = self.last(subject).await?;
            expected = last.as_ref().map_or(0, |l| l.seq);
            let (events, msg_id) = match decide(last).await? {
                AfterLast::Done(done) => return Ok(Settled::Done(done)),
                AfterLast::Append { events, msg_id } => (events, msg_id),
            };
            let Some(first) = events.first() else {
                let reason = "an empty commit".to_string();
                return Err(BusError::Malformed { subject: subject.to_string(), reason }.into());
            };
            let msg_id = msg_id.unwrap_or_else(|| first.id.to_string());
            match self.append_message(Some(expected), &events, Commit::to_json(&events), &msg_id).await {
                Ok(appended) => return Ok(Settled::Appended(appended.seq)),
                Err(BusError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(BusError::Conflict { subject: subject.to_string(), expected }.into())
    }

    /// The sequence of the last event on `subject`, 0 when it has none.
    pub async fn last_seq(&self, subject: &str) -> Result<u64> {
        self.last_seq_in(&self.ns.events_stream(), subject).await
    }

    /// The stream sequence of the last message on `subject` of `stream` (0 if none).
    pub async fn last_seq_in(&self, stream: &str, subject: &str) -> Result<u64> {
        let stream = self.js.get_stream_no_info(stream).await.map_err(BusError::nats)?;
        Ok(last_raw(&stream, subject).await?.map_or(0, |msg| msg.sequence))
    }

    /// The last event on `subject` (of a commit, its last event), if any.
    pub async fn last(&self, subject: &str) -> Result<Option<Stored>> {
        let stream = self.js.get_stream_no_info(self.ns.events_stream()).await.map_err(BusError::nats)?;
        let Some(msg) = last_raw(&stream, subject).await? else { return Ok(None) };
        Ok(decode_parts(&msg.subject, msg.sequence, Some(&msg.headers), &msg.payload)?.pop())
    }

    /// The event at sequence `seq` (of a commit, its first event), if any.
    pub async fn at(&self, seq: u64) -> Result<Option<Stored>> {
        let stream = self.js.get_stream_no_info(self.ns.events_stream()).await.map_err(BusError::nats)?;
        match stream.get_raw_message(seq).await {
            Ok(msg) => {
                Ok(decode_parts(&msg.subject, msg.sequence, Some(&msg.headers), &msg.payload)?.into_iter().next())
            }
            Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(BusError::Nats(format!("reading event {seq}: {e}"))),
        }
    }

    /// The first event on `subject` (of a commit, its first event), if any.
    pub async fn first(&self, subject: &str) -> Result<Option<Stored>> {
        let stream = self.js.get_stream_no_info(self.ns.events_stream()).await.map_err(BusError::nats)?;
        match stream.direct_get_next_for_subject(subject, None).await {
            Ok(msg) => {
                Ok(decode_parts(&msg.subject, msg.sequence, Some(&msg.headers), &msg.payload)?.into_iter().next())
            }
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(BusError::Nats(format!("reading first of {subject}: {e}"))),
        }
    }

    /// The sequence of the first event on `subject`, 0 when it has none.
    pub async fn first_seq(&self, subject: &str) -> Result<u64> {
        self.next_kept(subject, 1).await
    }

    /// The sequence of the first event on `subject` (a filter: wildcards allowed) at or after
    /// `from`, 0 when it has none: where a reader finds a jump in sequences, whether the
    /// messages between were removed (retention) or missed.
    pub async fn next_kept(&self, subject: &str, from: u64) -> Result<u64> {
        let stream = self.js.get_stream_no_info(self.ns.events_stream()).await.map_err(BusError::nats)?;
        match stream.direct_get_next_for_subject(subject, Some(from.max(1))).await {
            Ok(msg) => Ok(msg.sequence),
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => Ok(0),
            Err(e) => Err(BusError::Nats(format!("reading {subject} from {from}: {e}"))),
        }
    }

    /// Every event on `subject` after sequence `after`, in order.
    pub async fn read_subject(&self, subject: &str, after: u64) -> Result<Vec<Stored>> {
        Ok(self.read_subject_to_last(subject, after).await?.0)
    }

    /// [`Bus::read_subject`], with the subject's last sequence when it was read (0: no event;
    /// below `after`: the stream no longer has what `after` was).
    pub async fn read_subject_to_last(&self, subject: &str, after: u64) -> Result<(Vec<Stored>, u64)> {
        let last = self.last_seq(subject).await?;
        Ok((self.read_subject_between(subject, after, last).await?, last))
    }

    /// The events on `subject` up to sequence `until` (and the commit holding it), in order:
    /// the start of a long subject, where what comes after is not needed.
    pub async fn read_subject_until(&self, subject: &str, until: u64) -> Result<Vec<Stored>> {
        let last = self.last_seq(subject).await?;
        self.read_subject_between(subject, 0, until.min(last)).await
    }

    /// The events on `subject` after `after`, up to the message at or past `last`.
    async fn read_subject_between(&self, subject: &str, after: u64, last: u64) -> Result<Vec<Stored>> {
        if last <= after {
            return Ok(Vec::new());
        }
        let start = DeliverPolicy::ByStartSequence { start_sequence: after + 1 };
        let reader = self.reader(&self.ns.events_stream(), subject, start).await?;
        let consumer = &reader.consumer;
        let mut out = Vec::new();
        let mut empty_fetches = 0;
        'outer: while out.last().map(|s: &Stored| s.seq).unwrap_or(after) < last {
            let mut batch = consumer
                .batch()
                .max_messages(1_000)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .map_err(BusError::nats)?;
            let before = out.len();
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(BusError::nats)?;
                let commit = decode(&msg)?;
                let (seq, prev) = (commit[0].seq, commit[0].prev);
                // Every message on an aggregate subject names the one before it: a break in
                // that chain means a message went missing in flight, and a state folded from
                // it would be wrong, unless the messages between were removed from the stream
                // (by retention): then this is the subject's next message still kept.
                let before = out.last().map(|s: &Stored| s.seq).unwrap_or(after);
                if let Some(prev) = prev
                    && prev != before
                    && (before != after || prev > after)
                    && (1..seq).contains(&self.next_kept(subject, before + 1).await?)
                {
                    return Err(BusError::Nats(format!("reading {subject}: event {seq} follows {prev}, not {before}")));
                }
                out.extend(commit);
                if seq >= last {
                    break 'outer;
                }
            }
            if out.len() == before {
                empty_fetches += 1;
                if empty_fetches > 10 {
                    return Err(BusError::Nats(format!("reading {subject}: stopped short of sequence {last}")));
                }
            }
        }
        Ok(out)
    }

    /// A durable pull consumer with explicit ack, created or updated to `config`.
    pub async fn durable(&self, stream: &str, name: &str, mut config: PullConfig) -> Result<PullConsumer> {
        config.durable_name = Some(name.to_string());
        let stream = self.js.get_stream(stream).await.map_err(|e| BusError::Nats(format!("stream {stream}: {e}")))?;
        match stream.create_consumer(config.clone()).await {
            Ok(c) => Ok(c),
            // An older server may refuse to change some settings of an existing consumer.
            Err(create) => {
                stream.get_consumer(name).await.map_err(|e| BusError::Nats(format!("consumer {name}: {create}; {e}")))
            }
        }
    }

    /// Enqueues a message on a work-queue stream, deduplicated by `msg_id`.
    pub async fn enqueue<T: Serialize>(
        &self,
        subject: String,
        msg_id: &str,
        body: &T,
        traceparent: Option<&str>,
    ) -> Result<u64> {
        let payload = serde_json::to_vec(body).map_err(BusError::nats)?;
        self.enqueue_payload(subject, msg_id, payload.into(), traceparent).await
    }

    /// Enqueues `body` on `subject` of a work-queue stream only while the subject's last
    /// message is at `last` (its stream sequence; 0: the subject holds none), so that however
    /// many replicas enqueue it, one is there (or one after the message at `last`). `false`:
    /// the subject's last message is another.
    pub async fn enqueue_after<T: Serialize>(&self, subject: String, last: u64, body: &T) -> Result<bool> {
        let payload = serde_json::to_vec(body).map_err(BusError::nats)?;
        match self.publish_after(subject, payload.into(), last).await {
            Ok(_) => Ok(true),
            Err(BusError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Publishes `payload` on `subject` only while the subject's last message is at `last`
    /// (0: it holds none); returns its sequence. Another last message is a
    /// [`BusError::Conflict`].
    async fn publish_after(&self, subject: String, payload: Bytes, last: u64) -> Result<u64> {
        let publish = PublishMessage::build().payload(payload).expected_last_subject_sequence(last);
        match async { self.js.send_publish(subject.clone(), publish).await?.await }.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(BusError::Conflict { subject, expected: last })
            }
            Err(e) => Err(BusError::Nats(format!("publishing to {subject}: {e}"))),
        }
    }

    /// Enqueues an already encoded message on a work-queue stream, deduplicated by `msg_id`
    /// (see [`Bus::enqueue`]).
    pub async fn enqueue_payload(
        &self,
        subject: String,
        msg_id: &str,
        payload: Bytes,
        traceparent: Option<&str>,
    ) -> Result<u64> {
        let mut publish = PublishMessage::build().payload(payload).message_id(msg_id);
        if let Some(tp) = traceparent {
            publish = publish.header(TRACEPARENT_HEADER, tp);
        }
        let ack = async { self.js.send_publish(subject.clone(), publish).await?.await }.await.map_err(|e| {
            let e = format!("enqueueing on {subject}: {e}");
            // JetStream's words when a stream with `discard: new` is at a limit.
            if e.contains("maximum messages per subject") {
                BusError::SubjectFull(e)
            } else if e.contains("maximum messages") {
                BusError::Full(e)
            } else {
                BusError::Nats(e)
            }
        })?;
        Ok(ack.sequence)
    }

    /// How many messages each subject matching `filter` holds in `stream` (subjects with none
    /// are absent). One request, whatever the number of messages.
    pub async fn subject_counts(&self, stream: &str, filter: &str) -> Result<std::collections::HashMap<String, u64>> {
        let stream = self.js.get_stream_no_info(stream).await.map_err(BusError::nats)?;
        let mut subjects = stream.info_with_subjects(filter).await.map_err(BusError::nats)?;
        let mut counts = std::collections::HashMap::new();
        while let Some(entry) = subjects.next().await {
            let (subject, count) = entry.map_err(BusError::nats)?;
            counts.insert(subject, count as u64);
        }
        Ok(counts)
    }

    /// The latest message of each subject of `stream` matching `filter`, decoded (undecodable
    /// ones are skipped), for small registries such as live executors and pools.
    pub async fn latest_per_subject<T: serde::de::DeserializeOwned>(
        &self,
        stream: &str,
        filter: &str,
    ) -> Result<Vec<T>> {
        let subjects = self.subject_counts(stream, filter).await?;
        let stream = self.js.get_stream_no_info(stream).await.map_err(BusError::nats)?;
        let mut out = Vec::with_capacity(subjects.len());
        for subject in subjects.keys() {
            out.extend(latest_on(&stream, subject).await?);
        }
        Ok(out)
    }

    /// An ephemeral consumer of `stream` reading `filter` from `start`, acknowledging nothing
    /// (deleted once the [`Reader`] is dropped; else gone 30 s after its last use).
    async fn reader(&self, stream: &str, filter: &str, start: DeliverPolicy) -> Result<Reader> {
        let stream = self.js.get_stream_no_info(stream).await.map_err(BusError::nats)?;
        let config = PullConfig {
            filter_subject: filter.to_string(),
            deliver_policy: start,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(BusError::nats)?;
        Ok(Reader { stream, consumer })
    }

    /// The last message of each subject of `stream` matching `filter`, decoded (those that do
    /// not decode are skipped), read through one consumer rather than a request a subject: for
    /// registries that may hold many.
    pub async fn last_of_each<T: serde::de::DeserializeOwned>(&self, stream: &str, filter: &str) -> Result<Vec<T>> {
        let reader = self.reader(stream, filter, DeliverPolicy::LastPerSubject).await?;
        let mut out = Vec::new();
        reader
            .read(filter, usize::MAX, |msg| {
                out.extend(serde_json::from_slice(&msg.payload).ok());
                Ok(true)
            })
            .await?;
        Ok(out)
    }

    /// The latest message on `subject` of `stream`, decoded: `None` when it has none, or it
    /// does not decode.
    pub async fn latest<T: serde::de::DeserializeOwned>(&self, stream: &str, subject: &str) -> Result<Option<T>> {
        let stream = self.js.get_stream_no_info(stream).await.map_err(BusError::nats)?;
        latest_on(&stream, subject).await
    }

    /// Publishes `body` on a stream subject and waits for the stream's acknowledgement.
    pub async fn put<T: Serialize>(&self, subject: String, body: &T) -> Result<u64> {
        let payload = serde_json::to_vec(body).map_err(BusError::nats)?;
        let ack = async { self.js.publish(subject.clone(), payload.into()).await?.await }
            .await
            .map_err(|e| BusError::Nats(format!("publishing on {subject}: {e}")))?;
        Ok(ack.sequence)
    }

    /// Deletes one message of `stream` (already gone is fine).
    pub async fn delete_message(&self, stream: &str, seq: u64) -> Result<()> {
        let stream = self.js.get_stream_no_info(stream).await.map_err(BusError::nats)?;
        match stream.delete_message(seq).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("no message found") => Ok(()),
            Err(e) => Err(BusError::Nats(format!("deleting message {seq}: {e}"))),
        }
    }

    /// Removes every message of `stream` below sequence `below` (one request, however many).
    pub async fn purge_below(&self, stream: &str, below: u64) -> Result<()> {
        let stream = self.js.get_stream_no_info(stream).await.map_err(BusError::nats)?;
        stream.purge().sequence(below).await.map_err(|e| BusError::Nats(format!("purging below {below}: {e}")))?;
        Ok(())
    }

    /// Removes the messages of `subject` of the event log below sequence `below` (those at or
    /// after it, appended since the caller looked, stay); returns how many.
    pub async fn purge_subject_below(&self, subject: &str, below: u64) -> Result<u64> {
        let stream = self.js.get_stream_no_info(self.ns.events_stream()).await.map_err(BusError::nats)?;
        let purged = stream
            .purge()
            .filter(subject)
            .sequence(below)
            .await
            .map_err(|e| BusError::Nats(format!("purging {subject} below {below}: {e}")))?;
        Ok(purged.purged)
    }

    /// The event log's messages from sequence `from` on, in order, as long as they were stored
    /// before `until`, without their payloads: at most `limit`, and whether some before `until`
    /// may be left (the limit was reached). For sweeps of the log's oldest part that must not
    /// read its bodies.
    pub async fn headings_before(
        &self,
        from: u64,
        until: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<(Vec<Heading>, bool)> {
        let stream = self.js.get_stream_no_info(self.ns.events_stream()).await.map_err(BusError::nats)?;
        let config = PullConfig {
            filter_subject: self.ns.events_all(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from.max(1) },
            ack_policy: AckPolicy::None,
            headers_only: true,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(BusError::nats)?;
        let reader = Reader { stream, consumer };
        let mut out = Vec::new();
        let more = reader
            .read("the log", limit, |msg| {
                let info = msg.info().map_err(BusError::nats)?;
                let nanos = info.published.unix_timestamp_nanos();
                let stored = chrono::DateTime::from_timestamp_nanos(i64::try_from(nanos).unwrap_or(i64::MAX));
                if stored >= until {
                    return Ok(false);
                }
                let types = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(EVENT_TYPE_HEADER))
                    .map(|v| v.as_str().split(',').map(str::to_string).collect())
                    .unwrap_or_default();
                out.push(Heading { seq: info.stream_sequence, subject: msg.subject.to_string(), stored, types });
                Ok(true)
            })
            .await?;
        Ok((out, more))
    }

    /// Removes every message of `subject` (a filter: wildcards allowed) from `stream`; returns how many.
    pub async fn purge_subject(&self, stream: &str, subject: &str) -> Result<u64> {
        let stream = self.js.get_stream_no_info(stream).await.map_err(BusError::nats)?;
        let purged =
            stream.purge().filter(subject).await.map_err(|e| BusError::Nats(format!("purging {subject}: {e}")))?;
        Ok(purged.purged)
    }

    /// Provisions the stream of leader leases: one message per lease subject, expiring after
    /// `ttl` unless renewed. (A key-value bucket in all but name; a plain stream keeps to what
    /// every server version since 2.9 answers the same way.)
    pub async fn provision_leases(&self, ttl: Duration) -> Result<()> {
        let config = StreamConfig {
            name: self.ns.leases_stream(),
            description: Some("Taskmesh leader leases".into()),
            subjects: vec![self.ns.leases_all()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.settings.replicas,
            max_messages_per_subject: 1,
            max_age: ttl,
            duplicate_window: ttl.min(Duration::from_secs(120)),
            ..Default::default()
        };
        self.js.create_or_update_stream(config).await.map_err(|e| BusError::Nats(format!("lease stream: {e}")))?;
        Ok(())
    }

    /// Takes (`held` = None: only if nobody holds it) or renews (`held` = the sequence of
    /// our last claim) the lease `name` for `holder`. Returns the claim's sequence; someone
    /// else holding it is a [`BusError::Conflict`].
    pub async fn claim_lease(&self, name: &str, holder: &str, held: Option<u64>) -> Result<u64> {
        self.publish_after(self.ns.lease(name), holder.as_bytes().to_vec().into(), held.unwrap_or(0)).await
    }

    /// Gives up a lease we hold by our `claim` (its sequence, as [`Bus::claim_lease`]
    /// returned it): only that claim's message is removed, so one who claimed the lease since
    /// (ours ran out) keeps it.
    pub async fn release_lease(&self, claim: u64) -> Result<()> {
        self.delete_message(&self.ns.leases_stream(), claim).await
    }

    /// Sends a command and waits for its reply: `Ok(Resp)`, or the problem the service answered.
    /// A command whose server runs in this process goes to it directly (see [`serve`]).
    pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: String,
        request: &Req,
    ) -> Result<Resp> {
        let payload = Bytes::from(serde_json::to_vec(request).map_err(BusError::nats)?);
        let traceparent = taskmesh_telemetry::current_traceparent();
        let timeout = Duration::from_millis(self.settings.request_timeout_ms);
        let local = self.local.get(&subject).and_then(|respond| {
            // As NATS would, refuse what it would not carry: the same request must not pass
            // or fail by where its server runs.
            // NATS counts the headers too: "NATS/1.0\r\n", "traceparent: …\r\n", "\r\n".
            let headers = traceparent.as_ref().map_or(0, |tp| 10 + TRACEPARENT_HEADER.len() + 2 + tp.len() + 2 + 2);
            // The limit the client checks its own publishes against (an atomic read).
            let (max, size) = (self.client.max_payload(), headers + payload.len());
            if size > max {
                return Some(Err(BusError::Nats(format!(
                    "{subject}: a request of {size} bytes is over the server's max_payload of {max}"
                ))));
            }
            respond(payload.clone(), traceparent.clone()).map(Ok)
        });
        let reply = match local {
            // Served in this process: handed over directly, the handler running as its own task
            // as it would for a request over NATS (see `serve`). A server that stopped before
            // handling it, or a handler that panicked, answers nothing, as over NATS.
            Some(answer) => {
                let answer = tokio::spawn(answer?);
                tokio::time::timeout(timeout, answer)
                    .await
                    .ok()
                    .and_then(|joined| joined.ok().flatten())
                    .ok_or_else(|| BusError::Unavailable(subject.clone()))?
            }
            None => {
                let mut headers = HeaderMap::new();
                if let Some(tp) = traceparent {
                    headers.insert(TRACEPARENT_HEADER, tp.as_str());
                }
                tokio::time::timeout(timeout, self.client.request_with_headers(subject.clone(), headers, payload))
                    .await
                    .map_err(|_| BusError::Unavailable(subject.clone()))?
                    .map_err(|e| match e.kind() {
                        async_nats::RequestErrorKind::NoResponders | async_nats::RequestErrorKind::TimedOut => {
                            BusError::Unavailable(subject.clone())
                        }
                        _ => BusError::nats(e),
                    })?
                    .payload
            }
        };
        let reply: std::result::Result<Resp, Problem> = serde_json::from_slice(&reply)
            .map_err(|e| BusError::Malformed { subject: subject.clone(), reason: e.to_string() })?;
        Ok(reply?)
    }
}

/// Decodes the events of a message delivered by a consumer (one, or a commit's several, in
/// order; never none).
pub fn decode(msg: &jetstream::Message) -> Result<Vec<Stored>> {
    let seq = msg
        .info()
        .map_err(|e| BusError::Malformed { subject: msg.subject.to_string(), reason: e.to_string() })?
        .stream_sequence;
    decode_parts(&msg.subject, seq, msg.headers.as_ref(), &msg.payload)
}

/// Decodes a delivered message of events as [`decode`] does, with every NUL character in their
/// text (in JSON, the escape `\u0000`) read as U+FFFD: Postgres's `text` and `jsonb` refuse NUL,
/// so a read model's writer that met one (a step's output with a NUL byte in it, say) would
/// fail on that event for ever. The replacement is the same on every reading, so a rebuild
/// writes what the live projection did.
pub fn decode_without_nul(msg: &jetstream::Message) -> Result<Vec<Stored>> {
    match without_nul_escapes(&msg.payload) {
        std::borrow::Cow::Borrowed(_) => decode(msg),
        std::borrow::Cow::Owned(payload) => {
            let seq = msg
                .info()
                .map_err(|e| BusError::Malformed { subject: msg.subject.to_string(), reason: e.to_string() })?
                .stream_sequence;
            decode_parts(&msg.subject, seq, msg.headers.as_ref(), &payload)
        }
    }
}

/// `json` with every escaped NUL (`\u0000`) in its strings replaced by an escaped U+FFFD;
/// borrowed when it has none. Other escapes are copied whole, so an escaped backslash
/// followed by `u0000` (the text `\u0000`) is left as it is.
fn without_nul_escapes(json: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    const NUL: &[u8] = b"\\u0000";
    if !json.windows(NUL.len()).any(|w| w == NUL) {
        return std::borrow::Cow::Borrowed(json);
    }
    let mut out = Vec::with_capacity(json.len());
    let mut i = 0;
    while i < json.len() {
        if json[i] == b'\\' {
            if json[i..].starts_with(NUL) {
                out.extend_from_slice(b"\\ufffd");
                i += NUL.len();
            } else {
                let end = (i + 2).min(json.len());
                out.extend_from_slice(&json[i..end]);
                i = end;
            }
            continue;
        }
        out.push(json[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

fn decode_parts(subject: &str, seq: u64, headers: Option<&HeaderMap>, payload: &[u8]) -> Result<Vec<Stored>> {
    let envelopes = Commit::from_json(payload)
        .map_err(|e| BusError::Malformed { subject: subject.to_string(), reason: e.to_string() })?;
    let prev = headers.and_then(|h| h.get(PREV_SEQ_HEADER)).and_then(|v| v.as_str().parse().ok());
    let parts = envelopes.len() as u32;
    Ok(envelopes
        .into_iter()
        .enumerate()
        .map(|(part, envelope)| Stored { seq, prev, envelope, part: part as u32, parts })
        .collect())
}

/// One commit of a decision cut by [`commits`]: its events, and its message.
#[derive(Debug)]
pub struct Cut<'a> {
    pub envelopes: &'a [Envelope],
    /// The message: the same bytes as [`Commit::to_json`] of `envelopes`.
    pub json: Vec<u8>,
}

/// Cuts one decision's `envelopes` into commits that fit a message: at most
/// [`COMMIT_MAX_EVENTS`] events and [`COMMIT_MAX_BYTES`] of JSON each (an event bigger than
/// that alone goes alone), in order. Each envelope is serialised once, into its commit's
/// message, which is measured as it grows.
pub fn commits(envelopes: &[Envelope]) -> Vec<Cut<'_>> {
    // A commit of n > 1 envelopes is `[` + each envelope followed by `,` or `]`: one byte for
    // the opening bracket, and each envelope's length plus one. A commit of one is the
    // envelope alone, so its bracket is taken off when it is cut.
    fn cut<'a>(envelopes: &'a [Envelope], mut json: Vec<u8>) -> Cut<'a> {
        match envelopes.len() {
            1 => {
                json.remove(0);
            }
            _ => json.push(b']'),
        }
        Cut { envelopes, json }
    }
    let mut out = Vec::new();
    let (mut start, mut json) = (0, vec![b'[']);
    let mut item = Vec::new();
    for (i, envelope) in envelopes.iter().enumerate() {
        item.clear();
        serde_json::to_writer(&mut item, envelope).expect("an envelope always serialises");
        // The commit with this envelope: what it holds, a comma, the envelope, `]`.
        if i > start && (i - start >= COMMIT_MAX_EVENTS || json.len() + 1 + item.len() + 1 > COMMIT_MAX_BYTES) {
            out.push(cut(&envelopes[start..i], std::mem::replace(&mut json, vec![b'['])));
            start = i;
        }
        if i > start {
            json.push(b',');
        }
        json.extend_from_slice(&item);
    }
    if start < envelopes.len() {
        out.push(cut(&envelopes[start..], json));
    }
    out
}

/// The `traceparent` header of a message, if any.
pub fn traceparent(headers: Option<&HeaderMap>) -> Option<String> {
    headers.and_then(|h| h.get(TRACEPARENT_HEADER)).map(|v| v.as_str().to_string())
}

impl From<BusError> for Problem {
    /// How a bus failure looks to a client: a lost race is a conflict, an unreachable service
    /// or JetStream is "unavailable" (retry later), anything else is internal.
    fn from(e: BusError) -> Self {
        use taskmesh_events::ErrorCode;
        match e {
            BusError::Conflict { .. } => Problem::new(ErrorCode::Conflict, e.to_string()),
            BusError::Unavailable(_) | BusError::Nats(_) | BusError::Full(_) | BusError::SubjectFull(_) => {
                tracing::warn!(error = %e, "bus unavailable");
                Problem::new(ErrorCode::Unavailable, "the event bus is unavailable; retry later")
            }
            BusError::Rejected(p) => p,
            BusError::Malformed { .. } => {
                tracing::error!(error = %e, "malformed message");
                Problem::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskmesh_events::{Event, EventMeta, StepDispatched};

    #[test]
    fn an_escaped_nul_reads_as_a_replacement_character_and_nothing_else_changes() {
        let json = br#"{"a":"x\u0000y","b":"\\u0000","c":"\"\u0000"}"#;
        let clean = without_nul_escapes(json);
        assert_eq!(std::str::from_utf8(&clean).unwrap(), r#"{"a":"x\ufffdy","b":"\\u0000","c":"\"\ufffd"}"#);
        let value: serde_json::Value = serde_json::from_slice(&clean).unwrap();
        assert_eq!(value["a"], "x\u{FFFD}y");
        assert_eq!(value["b"], "\\u0000", "the text \\u0000 is left alone");
        assert!(matches!(without_nul_escapes(br#"{"a":"\n"}"#), std::borrow::Cow::Borrowed(_)));
        assert_eq!(&*without_nul_escapes(b"\\"), b"\\", "a lone backslash at the end");
    }

    fn dispatched(n: usize, pad: usize) -> Vec<Envelope> {
        let meta = EventMeta::new("t");
        (0..n)
            .map(|i| {
                let step = format!("s{i}-{}", "x".repeat(pad));
                meta.envelope(
                    "tm.evt.t.run.r",
                    Event::StepDispatched(StepDispatched { step, dispatch: 1, not_before: None }),
                )
            })
            .collect()
    }

    #[test]
    fn a_long_decision_is_cut_into_commits_that_fit_a_message_in_order() {
        let small = dispatched(10, 0);
        let one = commits(&small);
        assert_eq!(one.len(), 1, "a small decision is one commit");
        assert_eq!(one[0].json, Commit::to_json(&small));
        let alone = commits(&small[..1]);
        assert_eq!(alone[0].json, small[0].to_json(), "an event alone is its envelope, not an array");
        for long in [dispatched(COMMIT_MAX_EVENTS * 2 + 5, 0), dispatched(40, 20_000)] {
            let cut = commits(&long);
            assert!(cut.len() > 1);
            // Each but the last is as full as it may be: with the next event it would not fit.
            let mut start = 0;
            for c in &cut[..cut.len() - 1] {
                let more = &long[start..start + c.envelopes.len() + 1];
                assert!(
                    more.len() > COMMIT_MAX_EVENTS || Commit::to_json(more).len() > COMMIT_MAX_BYTES,
                    "a commit of {} could have taken one more",
                    c.envelopes.len()
                );
                start += c.envelopes.len();
            }
            for c in &cut {
                assert!(c.envelopes.len() <= COMMIT_MAX_EVENTS && c.json.len() <= COMMIT_MAX_BYTES, "each commit fits");
                assert_eq!(c.json, Commit::to_json(c.envelopes), "its message is the commit's JSON");
            }
            let order: Vec<_> = cut.iter().flat_map(|c| c.envelopes).map(|e| e.id).collect();
            assert_eq!(order, long.iter().map(|e| e.id).collect::<Vec<_>>(), "nothing lost or reordered");
        }
        // Two events whose lengths plus separators fill a commit exactly go together; one byte
        // more and they part, since the array's brackets count too.
        for (extra, parts) in [(0, 1), (1, 2)] {
            let mut pair = dispatched(2, 0);
            let len = |e: &Envelope| serde_json::to_vec(e).unwrap().len();
            let fill = COMMIT_MAX_BYTES - 3 - len(&pair[0]) - len(&pair[1]) + extra;
            if let Event::StepDispatched(d) = &mut pair[1].event {
                d.step.push_str(&"x".repeat(fill));
            }
            assert_eq!(Commit::to_json(&pair).len(), COMMIT_MAX_BYTES + extra);
            let cut = commits(&pair);
            assert_eq!(cut.len(), parts, "a pair {extra} byte(s) over the bound");
            assert!(cut.iter().all(|c| c.json == Commit::to_json(c.envelopes)));
        }
        // An event bigger than a commit may be goes alone.
        let huge = dispatched(3, COMMIT_MAX_BYTES);
        let cut = commits(&huge);
        assert_eq!(cut.len(), 3);
        assert!(cut.iter().all(|c| c.json == c.envelopes[0].to_json()));
        assert!(commits(&[]).is_empty());
    }
}
