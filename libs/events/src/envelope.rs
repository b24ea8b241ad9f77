//! The envelope every event travels in.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::Event;

/// One event as stored on the bus: metadata around an [`Event`].
///
/// `type`, `schema_version` and `data` come from the event itself; the rest says who, where,
/// when and why. The envelope is the unit of the event log: it is never edited once appended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Envelope {
    /// Event id, a UUID v7 (time ordered).
    pub id: Uuid,
    /// The tenant the event belongs to.
    pub tenant: String,
    /// The aggregate subject the event was appended to.
    pub subject: String,
    /// The event: `type`, `schema_version` and `data`.
    #[serde(flatten)]
    pub event: Event,
    /// Version of the event type's schema; a breaking change is a new version with an upcaster.
    pub schema_version: u16,
    /// When the fact happened (the appender's clock).
    pub occurred_at: DateTime<Utc>,
    /// The id shared by every event caused by one outside request.
    pub correlation_id: Uuid,
    /// The event or command that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// W3C trace context of the span that appended the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Who and why, for building envelopes: carried from a command or event to what it causes.
#[derive(Debug, Clone)]
pub struct EventMeta {
    pub tenant: String,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub traceparent: Option<String>,
}

impl EventMeta {
    /// Metadata for a new chain of events started by an outside request.
    pub fn new(tenant: impl Into<String>) -> Self {
        Self { tenant: tenant.into(), correlation_id: Uuid::now_v7(), causation_id: None, traceparent: None }
    }

    /// Metadata for events caused by `cause`.
    pub fn caused_by(cause: &Envelope) -> Self {
        Self {
            tenant: cause.tenant.clone(),
            correlation_id: cause.correlation_id,
            causation_id: Some(cause.id),
            traceparent: cause.traceparent.clone(),
        }
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        if traceparent.is_some() {
            self.traceparent = traceparent;
        }
        self
    }

    /// Wrap `event` for `subject`, with a fresh id and the current time.
    pub fn envelope(&self, subject: impl Into<String>, event: Event) -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            tenant: self.tenant.clone(),
            subject: subject.into(),
            schema_version: event.schema_version(),
            event,
            occurred_at: Utc::now(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            traceparent: self.traceparent.clone(),
        }
    }
}

impl Envelope {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }

    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }

    /// The event's `type` name, e.g. `RunSubmitted`.
    pub fn type_name(&self) -> &'static str {
        self.event.type_name()
    }
}

/// A message on the events stream: the events one decision appended together, atomically, to
/// one aggregate's subject, at one stream sequence.
///
/// One event is stored as its envelope (a JSON object), as every event was before commits
/// existed; two or more as a JSON array of envelopes, in order. A reader takes either
/// ([`Commit::from_json`]), so logs written before commits replay unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Commit {
    /// One event.
    One(Box<Envelope>),
    /// Two or more events, in the order they happened.
    Many(Vec<Envelope>),
}

impl Commit {
    /// The JSON of a message holding `envelopes` (one: the envelope itself; more: an array).
    pub fn to_json(envelopes: &[Envelope]) -> Vec<u8> {
        match envelopes {
            [one] => one.to_json(),
            many => serde_json::to_vec(many).expect("envelopes always serialise"),
        }
    }

    /// The events of a stored message, in order. An empty array is malformed.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Vec<Envelope>> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'[') {
            let many: Vec<Envelope> = serde_json::from_slice(bytes)?;
            if many.is_empty() {
                return Err(serde::de::Error::custom("a commit holds at least one event"));
            }
            Ok(many)
        } else {
            Ok(vec![Envelope::from_json(bytes)?])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RunFinished, StepDispatched};

    fn envelopes(n: usize) -> Vec<Envelope> {
        let meta = EventMeta::new("t");
        (0..n)
            .map(|i| {
                meta.envelope(
                    "tm.evt.t.run.r",
                    Event::StepDispatched(StepDispatched { step: format!("s{i}"), dispatch: 1, not_before: None }),
                )
            })
            .collect()
    }

    #[test]
    fn one_event_is_stored_as_its_envelope_and_several_as_an_array_in_order() {
        let one = envelopes(1);
        assert_eq!(Commit::to_json(&one), one[0].to_json(), "a commit of one is what a lone event always was");
        assert_eq!(Commit::from_json(&one[0].to_json()).unwrap(), one);
        let mut three = envelopes(2);
        three.push(EventMeta::new("t").envelope(
            "tm.evt.t.run.r",
            Event::RunSucceeded(RunFinished { run_id: Uuid::now_v7(), failed_steps: vec![] }),
        ));
        let json = Commit::to_json(&three);
        assert_eq!(json[0], b'[');
        assert_eq!(Commit::from_json(&json).unwrap(), three);
        assert!(Commit::from_json(b"[]").is_err(), "a commit holds at least one event");
        assert!(Commit::from_json(b"  {\"nope\": 1}").is_err());
    }
}
