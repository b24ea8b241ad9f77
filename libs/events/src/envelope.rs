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
// reads the event back out of it (in a profile under load, 30 of the 75 samples spent
// decoding the log's messages were there). This one reads each field as it comes, and an
// event's `data` straight into its type, `type` coming before it as every writer puts it
// (`data` first is read into a `serde_json::Value`, then into its type). Unknown fields are
// ignored and a field given twice is refused, as the derive did (a test compares the two).
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
        let (mut causation_id, mut traceparent) = (None::<Option<Uuid>>, None::<Option<String>>);
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Id => once(&mut map, &mut id, "id")?,
                Field::Tenant => once(&mut map, &mut tenant, "tenant")?,
                Field::Subject => once(&mut map, &mut subject, "subject")?,
                Field::Type => once::<_, String>(&mut map, &mut kind, "type")?,
                Field::Data if event.is_some() || data_first.is_some() => {
                    return Err(A::Error::duplicate_field("data"));
                }
                Field::Data => match kind.as_deref() {
                    Some(kind) => event = Some(map.next_value_seed(EventData(kind))?),
                    None => data_first = Some(map.next_value::<serde_json::Value>()?),
                },
                Field::SchemaVersion => once(&mut map, &mut schema_version, "schema_version")?,
                Field::OccurredAt => once(&mut map, &mut occurred_at, "occurred_at")?,
                Field::CorrelationId => once(&mut map, &mut correlation_id, "correlation_id")?,
                Field::CausationId => once(&mut map, &mut causation_id, "causation_id")?,
                Field::Traceparent => once(&mut map, &mut traceparent, "traceparent")?,
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let (causation_id, traceparent) = (causation_id.flatten(), traceparent.flatten());
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

/// Sets `slot` to the map's next value; a field given twice is refused, as the derived
/// `Deserialize` refused it.
fn once<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    slot: &mut Option<T>,
    name: &'static str,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(A::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value()?);
    Ok(())
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

    /// The derived `Deserialize` the written-out one replaced, to compare the two: serde's
    /// `remote` derive reads an [`Envelope`] through this mirror of its fields.
    #[derive(Deserialize)]
    #[serde(remote = "Envelope")]
    struct Derived {
        id: Uuid,
        tenant: String,
        subject: String,
        #[serde(flatten)]
        event: Event,
        schema_version: u16,
        occurred_at: DateTime<Utc>,
        correlation_id: Uuid,
        #[serde(default)]
        causation_id: Option<Uuid>,
        #[serde(default)]
        traceparent: Option<String>,
    }

    /// The JSON of an object of these fields, in this order (duplicates kept).
    fn object(fields: &[(&str, serde_json::Value)]) -> Vec<u8> {
        let parts: Vec<String> =
            fields.iter().map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap())).collect();
        format!("{{{}}}", parts.join(",")).into_bytes()
    }

    #[test]
    fn an_envelope_is_read_as_the_derived_deserialize_read_it_whatever_the_order_of_its_fields() {
        let mut written = envelopes(1).remove(0);
        written.causation_id = Some(Uuid::now_v7());
        written.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        assert_eq!(Envelope::from_json(&written.to_json()).unwrap(), written);
        let value = serde_json::to_value(&written).unwrap();
        let required = ["id", "tenant", "subject", "type", "data", "schema_version", "occurred_at", "correlation_id"];
        let as_written: Vec<(&str, serde_json::Value)> =
            required.iter().chain(&["causation_id", "traceparent"]).map(|k| (*k, value[*k].clone())).collect();
        let without = |gone: &str| as_written.iter().filter(|(k, _)| *k != gone).cloned().collect::<Vec<_>>();
        let and = |mut fields: Vec<(&'static str, serde_json::Value)>, extra: (&'static str, serde_json::Value)| {
            fields.insert(3, extra);
            fields
        };
        let mut cases: Vec<(String, Vec<(&str, serde_json::Value)>)> = vec![
            ("as written".into(), as_written.clone()),
            ("no causation_id".into(), without("causation_id")),
            ("no traceparent".into(), without("traceparent")),
            ("a null causation_id".into(), and(without("causation_id"), ("causation_id", serde_json::Value::Null))),
            (
                "a field not known".into(),
                and(as_written.clone(), ("added_later", serde_json::json!({"x": [1, "type"]}))),
            ),
            ("an unknown event".into(), and(without("type"), ("type", serde_json::json!("NoSuchEvent")))),
            ("an id twice".into(), and(as_written.clone(), ("id", value["id"].clone()))),
            ("type twice".into(), and(as_written.clone(), ("type", value["type"].clone()))),
            ("data twice".into(), [as_written.clone(), vec![("data", value["data"].clone())]].concat()),
            ("data of the wrong shape".into(), and(without("data"), ("data", serde_json::json!({"step": 5})))),
        ];
        cases.extend(required.iter().map(|gone| (format!("no {gone}"), without(gone))));
        for (case, fields) in cases {
            // As given, and with the fields the other way round (`data` before `type`).
            let reversed: Vec<_> = fields.iter().rev().cloned().collect();
            for (order, json) in [("in order", object(&fields)), ("reversed", object(&reversed))] {
                let ours = Envelope::from_json(&json);
                let derived = Derived::deserialize(&mut serde_json::Deserializer::from_slice(&json));
                match (&ours, &derived) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "{case}, {order}"),
                    (Err(e), Err(_)) => {
                        if let Some(gone) = case.strip_prefix("no ").filter(|g| required.contains(g)) {
                            assert!(e.to_string().contains(&format!("missing field `{gone}`")), "{case}, {order}: {e}");
                        }
                    }
                    _ => panic!("{case}, {order}: written-out {ours:?}, derived {derived:?}"),
                }
            }
        }
        // A second `type` naming another event is refused, not read as the first.
        let mut twice = as_written.clone();
        twice.push(("type", serde_json::json!("RunSucceeded")));
        assert!(Envelope::from_json(&object(&twice)).unwrap_err().to_string().contains("duplicate field `type`"));
    }
}
