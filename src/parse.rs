//! NOTIFY payload -> [`Notice`], and [`Event`] -> the client's `event` frame.
//!
//! Pure: no I/O, so plain unit tests and the fuzz target cover it. The capture
//! trigger sends either the whole envelope or, for rows too large for NOTIFY,
//! only `{"id":N,"channel":...}`; both decode here. The frame text a client
//! receives is produced only by [`Event::frame`], once per event, whether the
//! event came from a NOTIFY or from a replay query.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One captured row change, as stored in `pgrelay.events`.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub id: i64,
    pub channel: String,
    pub table: String,
    pub op: String,
    /// Commit time, UTC, RFC 3339 with microseconds.
    pub at: String,
    /// The row payload as JSON text, forwarded without re-encoding.
    pub data: Box<RawValue>,
}

/// What a NOTIFY told us.
#[derive(Debug)]
pub enum Notice {
    /// The whole event was in the payload.
    Full(Event),
    /// The event was too large for NOTIFY: read it from `pgrelay.events`.
    IdOnly { id: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("notification payload is not a pgrelay envelope: {0}")]
    Shape(#[source] serde_json::Error),
    #[error("notification payload names channel {payload:?} but arrived on {channel:?}")]
    ChannelMismatch { payload: String, channel: String },
    #[error("notification payload has a non-positive id {0}")]
    BadId(i64),
    #[error("event data is not a JSON object")]
    DataNotObject,
}

/// Either shape of the payload: every field but `id` and `channel` is optional
/// so that the id-only form decodes with the same code.
#[derive(Deserialize)]
struct Envelope {
    id: i64,
    channel: String,
    table: Option<String>,
    op: Option<String>,
    at: Option<String>,
    data: Option<Box<RawValue>>,
}

/// Decodes a NOTIFY payload received on `channel`.
pub fn parse_notification(channel: &str, payload: &str) -> Result<Notice, ParseError> {
    let envelope: Envelope = serde_json::from_str(payload).map_err(ParseError::Shape)?;
    if envelope.channel != channel {
        return Err(ParseError::ChannelMismatch {
            payload: envelope.channel,
            channel: channel.to_owned(),
        });
    }
    if envelope.id <= 0 {
        return Err(ParseError::BadId(envelope.id));
    }
    match envelope {
        Envelope {
            id,
            channel,
            table: Some(table),
            op: Some(op),
            at: Some(at),
            data: Some(data),
        } => {
            check_object(&data)?;
            Ok(Notice::Full(Event {
                id,
                channel,
                table,
                op,
                at,
                data,
            }))
        }
        Envelope {
            id,
            table: None,
            op: None,
            at: None,
            data: None,
            ..
        } => Ok(Notice::IdOnly { id }),
        _ => Err(ParseError::Shape(serde::de::Error::custom(
            "envelope must have all of table, op, at, data, or none of them",
        ))),
    }
}

/// Row payloads are JSON objects: routing reads their top-level fields.
pub fn check_object(data: &RawValue) -> Result<(), ParseError> {
    if data.get().trim_start().starts_with('{') {
        Ok(())
    } else {
        Err(ParseError::DataNotObject)
    }
}

#[derive(Serialize)]
struct EventFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: i64,
    channel: &'a str,
    table: &'a str,
    op: &'a str,
    at: &'a str,
    data: &'a RawValue,
}

impl Event {
    /// The `event` frame sent to clients, serialised once and shared by every
    /// socket that receives it.
    pub fn frame(&self) -> String {
        let frame = EventFrame {
            kind: "event",
            id: self.id,
            channel: &self.channel,
            table: &self.table,
            op: &self.op,
            at: &self.at,
            data: &self.data,
        };
        // Serialising borrowed strings and already-valid raw JSON cannot fail.
        serde_json::to_string(&frame).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(channel: &str, payload: &str, expect: Result<&str, &str>) {
        let got = match parse_notification(channel, payload) {
            Ok(Notice::Full(event)) => Ok(event.frame()),
            Ok(Notice::IdOnly { id }) => Ok(format!("id-only {id}")),
            Err(e) => Err(e.to_string()),
        };
        match (got, expect) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "payload {payload}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{got:?} lacks {want:?}"),
            (got, want) => panic!("payload {payload}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn envelopes() {
        check(
            "business_events",
            r#"{"id" : 7, "channel" : "business_events", "table" : "businesses", "op" : "INSERT", "at" : "2026-11-25T18:40:00.123456Z", "data" : {"id": 3, "owner_id": 42}}"#,
            Ok(
                r#"{"type":"event","id":7,"channel":"business_events","table":"businesses","op":"INSERT","at":"2026-11-25T18:40:00.123456Z","data":{"id": 3, "owner_id": 42}}"#,
            ),
        );
        check(
            "business_events",
            r#"{"id":8,"channel":"business_events"}"#,
            Ok("id-only 8"),
        );
    }

    #[test]
    fn rejects_bad_payloads() {
        check("c", "not json", Err("not a pgrelay envelope"));
        check("c", "", Err("not a pgrelay envelope"));
        check("c", "[]", Err("not a pgrelay envelope"));
        check(
            "c",
            r#"{"id":"x","channel":"c"}"#,
            Err("not a pgrelay envelope"),
        );
        check("c", r#"{"id":1,"channel":"d"}"#, Err("arrived on"));
        check("c", r#"{"id":0,"channel":"c"}"#, Err("non-positive id"));
        check(
            "c",
            r#"{"id":1,"channel":"c","op":"INSERT"}"#,
            Err("none of them"),
        );
        check(
            "c",
            r#"{"id":1,"channel":"c","table":"t","op":"INSERT","at":"x","data":[1]}"#,
            Err("not a JSON object"),
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever someone NOTIFYs, decoding returns, never panics, and a
        /// decoded event always has a positive id and an object as data.
        #[test]
        fn any_payload_decodes_or_is_refused(payload in ".{0,200}") {
            if let Ok(Notice::Full(event)) = parse_notification("c", &payload) {
                prop_assert!(event.id > 0);
                prop_assert!(event.data.get().trim_start().starts_with('{'), "data must be an object");
                let frame: serde_json::Value = serde_json::from_str(&event.frame()).expect("frame is JSON");
                prop_assert_eq!(frame["type"].as_str(), Some("event"));
            }
        }

        /// Well-formed envelopes always decode, with their fields intact.
        #[test]
        fn envelopes_round_trip(id in 1i64.., table in "[a-z_]{1,10}", name in ".{0,20}") {
            let data = serde_json::json!({"name": name});
            let payload = serde_json::json!({
                "id": id, "channel": "c", "table": table, "op": "UPDATE",
                "at": "2026-11-25T00:00:00.000000Z", "data": data,
            }).to_string();
            match parse_notification("c", &payload) {
                Ok(Notice::Full(event)) => {
                    prop_assert_eq!(event.id, id);
                    prop_assert_eq!(&event.table, &table);
                    let back: serde_json::Value = serde_json::from_str(event.data.get()).expect("json");
                    prop_assert_eq!(back, data);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
