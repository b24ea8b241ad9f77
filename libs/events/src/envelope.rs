//! The envelope every event travels in.

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::value::{MapAccessDeserializer, StrDeserializer};
use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::Event;

/// One event as stored on the bus: metadata around an [`Event`].
///
/// `type`, `schema_version` and `data` come from the event itself; the rest says who, where,
/// when and why. The envelope is the unit of the event log: it is never edited once appended.
// Its `Deserialize` is written out (below) rather than derived.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
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

// A derived `Deserialize` of a struct with a `#[serde(flatten)]` field first copies the whole
// envelope into serde's generic tree of content (an allocation for each key and value), then
// reads the event back out of it: a fifth or so of what a scheduler or projector spent on the
// log went on that. This one reads each field as it comes, and an event's `data` straight into
// its type, `type` coming before it as every writer puts it (`data` first is read into a
// `serde_json::Value`, then into its type). Unknown fields are ignored, as the derive did.
impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Id,
    Tenant,
    Subject,
    Type,
    Data,
    SchemaVersion,
    OccurredAt,
    CorrelationId,
    CausationId,
    Traceparent,
    #[serde(other)]
    Other,
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event's envelope")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let (mut id, mut tenant, mut subject, mut kind, mut event, mut data_first) =
            (None, None, None, None, None, None);
        let (mut schema_version, mut occurred_at, mut correlation_id) = (None, None, None);
        let (mut causation_id, mut traceparent) = (None, None);
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Id => id = Some(map.next_value()?),
                Field::Tenant => tenant = Some(map.next_value()?),
                Field::Subject => subject = Some(map.next_value()?),
                Field::Type => kind = Some(map.next_value::<String>()?),
                Field::Data => match kind.as_deref() {
                    Some(kind) => event = Some(map.next_value_seed(EventData(kind))?),
                    None => data_first = Some(map.next_value::<serde_json::Value>()?),
                },
                Field::SchemaVersion => schema_version = Some(map.next_value()?),
                Field::OccurredAt => occurred_at = Some(map.next_value()?),
                Field::CorrelationId => correlation_id = Some(map.next_value()?),
                Field::CausationId => causation_id = map.next_value()?,
                Field::Traceparent => traceparent = map.next_value()?,
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let kind = kind.ok_or_else(|| A::Error::missing_field("type"))?;
        let event = match (event, data_first) {
            (Some(event), _) => event,
            (None, Some(data)) => EventData(&kind).deserialize(data).map_err(A::Error::custom)?,
            // No `data`: the event's own deserializer says what it lacks.
            (None, None) => Event::deserialize(MapAccessDeserializer::new(Tagged::<serde_json::Value> {
                kind: Some(&kind),
                data: None,
            }))
            .map_err(A::Error::custom)?,
        };
        Ok(Envelope {
            id: id.ok_or_else(|| A::Error::missing_field("id"))?,
            tenant: tenant.ok_or_else(|| A::Error::missing_field("tenant"))?,
            subject: subject.ok_or_else(|| A::Error::missing_field("subject"))?,
            event,
            schema_version: schema_version.ok_or_else(|| A::Error::missing_field("schema_version"))?,
            occurred_at: occurred_at.ok_or_else(|| A::Error::missing_field("occurred_at"))?,
            correlation_id: correlation_id.ok_or_else(|| A::Error::missing_field("correlation_id"))?,
            causation_id,
            traceparent,
        })
    }
}

/// Reads an event's `data` as the event `type` it names.
struct EventData<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for EventData<'_> {
    type Value = Event;

    fn deserialize<D: Deserializer<'de>>(self, data: D) -> Result<Event, D::Error> {
        Event::deserialize(MapAccessDeserializer::new(Tagged { kind: Some(self.0), data: Some(data) }))
    }
}

/// An event's `type` and `data` as the map [`Event`]'s derived `Deserialize` reads (adjacently
/// tagged), `type` first.
struct Tagged<'a, D> {
    kind: Option<&'a str>,
    data: Option<D>,
}

impl<'de, D: Deserializer<'de>> MapAccess<'de> for Tagged<'_, D> {
    type Error = D::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, D::Error> {
        let key = match (&self.kind, &self.data) {
            (Some(_), _) => "type",
            (None, Some(_)) => "data",
            (None, None) => return Ok(None),
        };
        seed.deserialize(StrDeserializer::<D::Error>::new(key)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, D::Error> {
        if let Some(kind) = self.kind.take() {
            return seed.deserialize(StrDeserializer::<D::Error>::new(kind));
        }
        match self.data.take() {
            Some(data) => seed.deserialize(data),
            None => Err(D::Error::custom("a value asked for with no key before it")),
        }
    }
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

    #[test]
    fn an_envelope_reads_back_as_written_whatever_the_order_of_its_fields() {
        let mut written = envelopes(1).remove(0);
        written.causation_id = Some(Uuid::now_v7());
        written.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let json = written.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.find("\"type\"").unwrap() < text.find("\"data\"").unwrap(), "written type first: {text}");
        assert_eq!(Envelope::from_json(&json).unwrap(), written);
        // Keys sorted (`data` before `type`), and a field this version does not know: the same.
        let mut value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        value["added_later"] = serde_json::json!({"x": [1, 2]});
        let sorted = serde_json::to_vec(&value).unwrap();
        let text = String::from_utf8(sorted.clone()).unwrap();
        assert!(text.find("\"data\"").unwrap() < text.find("\"type\"").unwrap(), "{text}");
        assert_eq!(Envelope::from_json(&sorted).unwrap(), written);
        // Absent optional fields are none; anything missing or wrong is an error naming it.
        value.as_object_mut().unwrap().remove("causation_id");
        value.as_object_mut().unwrap().remove("traceparent");
        let read = Envelope::from_json(&serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!((read.causation_id, read.traceparent), (None, None));
        for (field, bad) in [
            ("type", None),
            ("data", None),
            ("id", None),
            ("occurred_at", None),
            ("type", Some(serde_json::json!("NoSuchEvent"))),
            ("data", Some(serde_json::json!({"step": 5}))),
        ] {
            let mut broken = value.clone();
            match &bad {
                None => drop(broken.as_object_mut().unwrap().remove(field)),
                Some(v) => broken[field] = v.clone(),
            }
            let e = Envelope::from_json(&serde_json::to_vec(&broken).unwrap()).unwrap_err().to_string();
            let named = match field {
                "data" if bad.is_some() => "invalid type",
                "type" if bad.is_some() => "NoSuchEvent",
                field => field,
            };
            assert!(e.contains(named), "{field} {bad:?}: {e}");
        }
    }
}
