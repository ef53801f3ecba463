//! NOTIFY payload -> the event id it wakes us for; [`Event`], one row of the
//! log (its `event` frame is built in `wire`).
//!
//! Pure: no I/O, so plain unit tests and the fuzz target cover it. The capture
//! trigger's NOTIFY payload is the event's id and nothing else (LISTEN needs no
//! privilege, so a payload is readable by every role): events themselves are
//! read from `pgrelay.events` by `db::LogReader`, on the listener's own
//! connection for new events and through the pool for replays; parsing here
//! does no read. The frame text a client receives is produced
//! only by `Event::frame` (in `wire`, with the rest of the contract): once per
//! event for live delivery (and for the rows priming reads at start),
//! outside the hub's lock, the bytes shared by every socket and by replays
//! from memory; only a replay from the log and a history page
//! (`wire::history`) build the frames of the rows they read, for their own
//! client.

use serde::Deserialize;
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

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("notification payload is not an event id")]
    NotAnId,
    #[error("notification payload has a non-positive id {0}")]
    BadId(i64),
    #[error("event data is not a JSON object")]
    DataNotObject,
}

/// Decodes a NOTIFY payload: the id of the event that woke us, as decimal
/// text. Anything else was not sent by a capture trigger.
pub fn parse_wakeup(payload: &str) -> Result<i64, ParseError> {
    // Digits in canonical form only ("007", "+7" are not what a trigger sends).
    let canonical = match payload.as_bytes() {
        [] => false,
        [b'0', _, ..] => false,
        digits => digits.iter().all(u8::is_ascii_digit),
    };
    let id: i64 = payload
        .parse()
        .ok()
        .filter(|_| canonical)
        .ok_or(ParseError::NotAnId)?;
    if id <= 0 {
        return Err(ParseError::BadId(id));
    }
    Ok(id)
}

/// Row payloads are JSON objects: routing reads their top-level fields.
pub fn check_object(data: &RawValue) -> Result<(), ParseError> {
    if data.get().trim_start().starts_with('{') {
        Ok(())
    } else {
        Err(ParseError::DataNotObject)
    }
}

/// Fields of at most this many bytes (as JSON) survive in a stub: ids,
/// numbers, short strings, which is what routing reads.
pub const STUB_FIELD_BYTES: usize = 256;

/// The stub delivered in place of a payload larger than the cap, by the same
/// rule as capture's (triggers/capture.sql): the payload's fields of at most
/// [`STUB_FIELD_BYTES`], and `"truncated": true`. Only the oversized path
/// pays for this parse.
pub fn truncated(data: &str) -> Box<RawValue> {
    let mut stub: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str::<std::collections::BTreeMap<String, &RawValue>>(data)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, value)| value.get().len() <= STUB_FIELD_BYTES)
            .filter_map(|(key, value)| Some((key, serde_json::from_str(value.get()).ok()?)))
            .collect();
    stub.insert("truncated".into(), serde_json::Value::Bool(true));
    serde_json::value::to_raw_value(&stub)
        .unwrap_or_else(|_| unreachable!("a map of JSON values serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(payload: &str, expect: Result<i64, ParseError>) {
        assert_eq!(parse_wakeup(payload), expect, "payload {payload:?}");
    }

    #[test]
    fn wakeups() {
        check("7", Ok(7));
        check("9223372036854775807", Ok(i64::MAX));
        check("0", Err(ParseError::BadId(0)));
        check("", Err(ParseError::NotAnId));
        check("-1", Err(ParseError::NotAnId));
        check("+1", Err(ParseError::NotAnId));
        check(" 1", Err(ParseError::NotAnId));
        check("1.0", Err(ParseError::NotAnId));
        check("007", Err(ParseError::NotAnId));
        check("9223372036854775808", Err(ParseError::NotAnId));
        check(r#"{"id":7,"channel":"c"}"#, Err(ParseError::NotAnId));
    }

    #[test]
    fn stubs() {
        let stub = |data: &str| truncated(data).get().to_owned();
        let long = "z".repeat(STUB_FIELD_BYTES);
        assert_eq!(
            stub(&format!(
                r#"{{"id": 42, "owner_id": "7", "blob": "{long}"}}"#
            )),
            r#"{"id":42,"owner_id":"7","truncated":true}"#
        );
        assert_eq!(
            stub(r#"{"id": "a-b", "tags": [1, 2]}"#),
            r#"{"id":"a-b","tags":[1,2],"truncated":true}"#
        );
        assert_eq!(stub("not json"), r#"{"truncated":true}"#);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever someone NOTIFYs, decoding returns, never panics, and a
        /// decoded id is positive and is exactly the payload.
        #[test]
        fn any_payload_decodes_or_is_refused(payload in ".{0,40}") {
            if let Ok(id) = parse_wakeup(&payload) {
                prop_assert!(id > 0);
                prop_assert_eq!(id.to_string(), payload);
            }
        }

        /// Every id a capture trigger sends decodes to itself.
        #[test]
        fn ids_round_trip(id in 1i64..) {
            prop_assert_eq!(parse_wakeup(&id.to_string()), Ok(id));
        }
    }
}
