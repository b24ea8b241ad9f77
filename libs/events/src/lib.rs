//! Taskmesh's event contracts: everything two services must agree on to talk over the bus.
//!
//! Every state change in Taskmesh is an [`Envelope`] appended to NATS JetStream. This crate owns
//! the envelope, the event catalog ([`Event`]), the subject and stream names ([`Namespace`]),
//! the workflow definition format that runs carry ([`workflow`]), the commands and replies that
//! cross request/reply subjects ([`command`]), and the error code shared by every service and its
//! HTTP mapping ([`ErrorCode`], [`Problem`]). `proto/` is generated from these types
//! ([`schema`]); a test fails when it is stale.
//!
//! # Layout
//! - [`envelope`]: the versioned envelope around every event, and the commit: the events one
//!   decision appends together, in one message.
//! - [`catalog`]: the events themselves, facts in the past tense, and what they are judged by
//!   (a forge's repository paths and tokens' destinations, `*` patterns).
//! - [`subjects`]: stream names, subjects and consumer names under a namespace.
//! - [`workflow`]: workflow and step definitions, parsing and validation.
//! - [`command`]: request/reply contracts between the gateway, ingest, git-integration,
//!   the scheduler and executors.
//! - [`error`]: the shared error code, RFC 9457 problem documents.
//! - [`expr`]: CEL conditions and `${{ }}` templates.
//! - [`schedule`]: cron schedules: spec, ticks, catch-up.
//! - [`schema`]: JSON Schema and AsyncAPI generation for `proto/`.

pub mod catalog;
pub mod command;
pub mod envelope;
pub mod error;
pub mod expr;
pub mod schedule;
pub mod schema;
pub mod subjects;
pub mod workflow;

pub use catalog::*;
pub use envelope::{Commit, Envelope, EventMeta};
pub use error::{ErrorCode, FieldError, Problem};
pub use subjects::{Namespace, RunKey};
