//! The wire contract, in one place: the endpoints and their paths
//! ([`Endpoint`], [`Transport`]), the resume parameters ([`Resume`], from the
//! query or an SSE `Last-Event-ID`), the server's frames (`hello`, `event`,
//! `reset`, `read`) and their Server-Sent Events form ([`write_sse_event`]), the client's
//! messages ([`ClientMessage`]) and the close codes with their reasons
//! ([`Close`]). DESIGN.md's "WebSocket endpoints" is the prose of what is
//! defined here.
//!
//! Pure: no I/O. The server, the session, `tail`, the bench and the tests
//! name codes and frames from here instead of repeating numbers and JSON.
//! Frame bytes are part of the contract: `hello` and `reset` keep their keys
//! in sorted order (what `serde_json::json!` produced before they moved
//! here), `event` its fixed order starting with `type`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use hyper_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use hyper_tungstenite::tungstenite::protocol::frame::FrameHeader;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::parse::Event;
use crate::route::{Stream, READ_CHANNEL};

/// An endpoint: what a socket or an event stream receives.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws/dashboard/`: every routed event with audience `dashboard`.
    Dashboard,
    /// `/ws/notifications/`: the events addressed to the socket's user.
    Notifications,
    /// `/ws/NAME/KEY/`: the events of one key of configured stream `index`.
    Stream {
        index: usize,
        name: String,
        key: String,
    },
}

/// How an endpoint is served: `/ws/...` or `/sse/...`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    ServerSentEvents,
}

/// The longest stream key a path may carry, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

impl Endpoint {
    /// The name clients see in `hello` and metrics carry as a label (a
    /// stream's name, never its key).
    pub fn name(&self) -> &str {
        match self {
            Endpoint::Dashboard => "dashboard",
            Endpoint::Notifications => "notifications",
            Endpoint::Stream { name, .. } => name,
        }
    }

    /// The endpoint a request path names: `/ws/dashboard/`,
    /// `/ws/notifications/`, `/ws/NAME/KEY/` for a configured stream, and the
    /// same under `/sse/`; the trailing slash is optional. A key is one
    /// percent-decoded path segment of 1 to [`MAX_KEY_BYTES`] bytes of UTF-8.
    pub fn from_path(path: &str, streams: &[Stream]) -> Option<(Transport, Endpoint)> {
        let (transport, rest) = if let Some(rest) = path.strip_prefix("/ws/") {
            (Transport::WebSocket, rest)
        } else if let Some(rest) = path.strip_prefix("/sse/") {
            (Transport::ServerSentEvents, rest)
        } else {
            return None;
        };
        Some((transport, Endpoint::from_name(rest, streams)?))
    }

    /// The endpoint a path names after its prefix (`/ws/`, `/sse/`,
    /// `/history/`, `/read/`): `dashboard`, `notifications` or `NAME/KEY`,
    /// the trailing slash optional.
    pub fn from_name(rest: &str, streams: &[Stream]) -> Option<Endpoint> {
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let endpoint = match rest.split_once('/') {
            None if rest == "dashboard" => Endpoint::Dashboard,
            None if rest == "notifications" => Endpoint::Notifications,
            None => return None,
            Some((name, key)) => {
                let index = streams.iter().position(|s| s.name == name)?;
                if key.is_empty() || key.contains('/') {
                    return None;
                }
                let key = percent_encoding::percent_decode_str(key)
                    .decode_utf8()
                    .ok()
                    .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_BYTES)?;
                Endpoint::Stream {
                    index,
                    name: name.to_owned(),
                    key: key.into_owned(),
                }
            }
        };
        Some(endpoint)
    }

    /// What read state is kept under: `notifications`, `dashboard`, or
    /// `NAME/KEY`.
    pub fn state_name(&self) -> String {
        match self {
            Endpoint::Stream { name, key, .. } => format!("{name}/{key}"),
            other => other.name().to_owned(),
        }
    }
}

/// `?last_id=N&epoch=E` from the request.
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    pub last_id: i64,
    pub epoch: Option<String>,
}

impl Resume {
    /// `last_id` (a non-negative integer) and optional `epoch` from a parsed
    /// query string; `Err` is the 400's one-line body. Public for the fuzz target.
    pub fn from_query(query: &HashMap<String, String>) -> Result<Option<Resume>, &'static str> {
        let Some(last_id) = query.get("last_id") else {
            return if query.contains_key("epoch") {
                Err("epoch given without last_id")
            } else {
                Ok(None)
            };
        };
        let last_id: i64 = last_id
            .parse()
            .ok()
            .filter(|id| *id >= 0)
            .ok_or("last_id must be a non-negative integer")?;
        Ok(Some(Resume {
            last_id,
            epoch: query.get("epoch").filter(|e| !e.is_empty()).cloned(),
        }))
    }
}

/// The close codes pgrelay sends. Each variant's [`Close::reason`] is its
/// reason text where the code has one; codes with several causes take one of
/// the [`reason`] texts instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Close {
    /// The server is shutting down.
    Shutdown = 1001,
    /// The client sent a binary frame.
    Binary = 1003,
    /// A message that is not a `refresh`, or too many messages.
    Unexpected = 1008,
    /// A client frame over `--max-client-message`.
    TooBig = 1009,
    /// The replay's reads failed: retry.
    ReplayFailed = 1011,
    /// The event log was reset under the socket: reconnect with `last_id`.
    LogWentBack = 1012,
    /// Too many replays at once: retry later.
    ReplayBusy = 1013,
    /// The token expired, or a refresh was refused.
    TokenExpired = 4001,
    /// The socket fell too far behind: resume with `last_id`.
    TooSlow = 4008,
}

impl Close {
    const ALL: [Close; 9] = [
        Close::Shutdown,
        Close::Binary,
        Close::Unexpected,
        Close::TooBig,
        Close::ReplayFailed,
        Close::LogWentBack,
        Close::ReplayBusy,
        Close::TokenExpired,
        Close::TooSlow,
    ];

    /// The number on the wire.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The pgrelay close this number names, if any.
    pub fn from_code(code: u16) -> Option<Close> {
        Close::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The reason sent with this code by default (the only one, for the
    /// codes with one cause).
    pub const fn reason(self) -> &'static str {
        match self {
            Close::Shutdown => "server shutting down",
            Close::Binary => "binary frames are not accepted",
            Close::Unexpected => reason::UNEXPECTED_MESSAGE,
            Close::TooBig => "message too big",
            Close::ReplayFailed => "replay unavailable: retry later",
            Close::LogWentBack => "event log reset: reconnect with last_id",
            Close::ReplayBusy => reason::REPLAYS_BUSY,
            Close::TokenExpired => "token expired",
            Close::TooSlow => "too slow: reconnect with last_id",
        }
    }
}

/// Reason texts for the codes with more than one cause.
pub mod reason {
    /// 1008: anything but a `refresh`, `read` or `clear`.
    pub const UNEXPECTED_MESSAGE: &str =
        "unexpected message: only refresh, read and clear are accepted";
    /// 1008: a `read` with neither `up_to` nor `ids`, both, or too many ids.
    pub const BAD_READ: &str = "read takes up_to or ids (at most 100)";
    /// 1008: a `read` naming an id beyond the newest event.
    pub const READ_BEYOND_HEAD: &str = "read beyond the newest event";
    /// 400 (`POST /read`), 1008 (a socket): a mark that would keep read
    /// state for one stream key more than the 10,000 a user may have.
    pub const TOO_MANY_READ_STATES: &str = "read state kept for too many streams (10,000 a user)";
    /// 1008: over `--client-messages-per-second`.
    pub const TOO_MANY_MESSAGES: &str = "too many messages";
    /// 1013: the server-wide cap on replays.
    pub const REPLAYS_BUSY: &str = "server busy replaying: retry later";
    /// 1013: the per-user cap on replays.
    pub const USER_REPLAYS_BUSY: &str = "too many replays at once for this user: retry later";
    /// 4001: the refresh token does not verify.
    pub const REFRESH_INVALID: &str = "refresh refused: invalid token";
    /// 4001: the refresh token is for someone else.
    pub const REFRESH_OTHER_USER: &str = "refresh refused: token is for another user";
    /// 4001: on the dashboard, the renewed token's user is no longer an admin.
    pub const REFRESH_NOT_ADMIN: &str = "refresh refused: not a super admin";
    /// 4001: on a stream, the stream query no longer answers yes.
    pub const REFRESH_NOT_ALLOWED: &str = "refresh refused: no longer allowed on this stream";
    /// 4001: on the dashboard, the admin query failed.
    pub const REFRESH_ADMIN_UNKNOWN: &str = "refresh refused: cannot check admin rights";
}

/// What a client may send: `{"type":"refresh","token":"JWT"}`, and the
/// bell's read state: `{"type":"read","up_to":N}` (everything up to N),
/// `{"type":"read","ids":[N,...]}` (those items), `{"type":"clear"}` (read up
/// to the newest event, and hide it all from history).
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientMessage {
    Refresh {
        token: String,
    },
    Read {
        #[serde(default)]
        up_to: Option<i64>,
        #[serde(default)]
        ids: Vec<i64>,
    },
    Clear {},
}

/// Items one `read` message may name at most.
pub const MAX_READ_IDS: usize = 100;

/// The most unread events `hello` counts: a badge shows "100+" beyond.
pub const UNREAD_CAP: i64 = 100;

/// A user's read state on one stream, as `hello` and `read` frames carry it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadState {
    pub up_to: i64,
    #[serde(default)]
    pub ids: Vec<i64>,
    #[serde(default)]
    pub cleared_through: i64,
}

/// Field order is the wire order: sorted.
#[derive(Serialize, Deserialize)]
struct ReadFrame<'a> {
    cleared_through: i64,
    ids: Vec<i64>,
    /// Borrowed unless the JSON escapes a character (a key with `"` or `\`).
    #[serde(borrow)]
    stream: Cow<'a, str>,
    #[serde(rename = "type", default)]
    kind: Cow<'a, str>,
    up_to: i64,
}

/// The `read` frame for a read-state event's payload
/// (`{"user_id","stream","up_to","ids","cleared_through"}`), or `None` when
/// the payload is not one.
fn read_frame(payload: &RawValue) -> Option<String> {
    let mut frame: ReadFrame = serde_json::from_str(payload.get()).ok()?;
    frame.kind = Cow::Borrowed("read");
    Some(to_text(&frame))
}

/// Field order is the wire order: sorted, as `json!` wrote it.
#[derive(Serialize)]
struct HelloFrame<'a> {
    epoch: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    last_id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_up_to: Option<i64>,
    stream: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    unread: Option<i64>,
    user: &'a str,
}

/// The `hello` frame: the endpoint (and a stream's key), the user, the
/// newest event id at connect time and the log's epoch; with `read`, the
/// user's read cursor and unread count (at most [`UNREAD_CAP`]) on this
/// stream, for the bell.
pub fn hello(
    endpoint: &Endpoint,
    user: &str,
    last_id: i64,
    epoch: &str,
    read: Option<(i64, i64)>,
) -> String {
    let key = match endpoint {
        Endpoint::Stream { key, .. } => Some(key.as_str()),
        _ => None,
    };
    to_text(&HelloFrame {
        epoch,
        key,
        last_id,
        read_up_to: read.map(|(up_to, _)| up_to),
        stream: endpoint.name(),
        kind: "hello",
        unread: read.map(|(_, unread)| unread),
        user,
    })
}

/// Why a resume could not be honoured; the client starts over from `hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// The log's epoch differs (restored database, reinstalled log).
    EpochMismatch,
    /// `last_id` is older than the retained window.
    CursorExpired,
    /// `last_id` is newer than anything in the log.
    CursorUnknown,
}

impl Reset {
    pub fn name(self) -> &'static str {
        match self {
            Reset::EpochMismatch => "epoch_mismatch",
            Reset::CursorExpired => "cursor_expired",
            Reset::CursorUnknown => "cursor_unknown",
        }
    }
}

/// Field order is the wire order: sorted, as `json!` wrote it.
#[derive(Serialize)]
struct ResetFrame {
    reason: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The `reset` frame.
pub fn reset(why: Reset) -> String {
    to_text(&ResetFrame {
        reason: why.name(),
        kind: "reset",
    })
}

#[derive(Serialize)]
struct EventJson<'a> {
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
    /// The frame sent to clients, serialised once and shared by every socket
    /// that receives it: `event`, or `read` for a read-state change.
    pub fn frame(&self) -> String {
        if self.is_read_state() {
            if let Some(frame) = read_frame(&self.data) {
                return frame;
            }
        }
        to_text(&EventJson {
            kind: "event",
            id: self.id,
            channel: &self.channel,
            table: &self.table,
            op: &self.op,
            at: &self.at,
            data: &self.data,
        })
    }
}

/// `?unread=1`: the client wants `read_up_to` and `unread` in `hello`.
pub fn wants_unread(query: &HashMap<String, String>) -> bool {
    query.get("unread").is_some_and(|v| v == "1")
}

/// The SSE event id of a position in the log: `EPOCH:ID`, so that a
/// browser's `Last-Event-ID` carries the epoch and a cursor from another log
/// gets a `reset`, never a silent gap.
pub fn sse_id(epoch: &str, id: i64) -> String {
    format!("{epoch}:{id}")
}

impl Resume {
    /// A `Last-Event-ID` header: `EPOCH:ID` (as [`sse_id`] writes it) or a
    /// bare id. `Err` is the 400's one-line body.
    pub fn from_last_event_id(text: &str) -> Result<Resume, &'static str> {
        let (epoch, id) = match text.trim().rsplit_once(':') {
            Some((epoch, id)) => (Some(epoch), id),
            None => (None, text.trim()),
        };
        let last_id = id
            .parse::<i64>()
            .ok()
            .filter(|id| *id >= 0)
            .ok_or("Last-Event-ID must be EPOCH:ID with a non-negative integer ID")?;
        Ok(Resume {
            last_id,
            epoch: epoch.filter(|e| !e.is_empty()).map(str::to_owned),
        })
    }
}

/// An `event` or `read` frame as it goes out, built once per event and
/// shared by every socket and stream it reaches: the whole WebSocket text
/// frame, header included (server frames are unmasked, so the bytes are the
/// same for every socket), with the JSON a slice of it. A socket's batch is
/// these shared buffers written with one vectored write: no per-socket
/// encoding, no copy into a write buffer. One pointer wide, so that a
/// queue slot (every user's ring has 64) stays small.
#[derive(Clone, Debug)]
pub struct EventFrame(Arc<FrameBytes>);

#[derive(Debug)]
struct FrameBytes {
    id: i64,
    /// A `read` frame (a read-state change), not an `event`.
    read: bool,
    websocket: Box<[u8]>,
    /// Where the JSON starts in `websocket` (after the 2-10 byte header).
    json_at: usize,
}

impl EventFrame {
    /// The frame of one event (`Event::frame`).
    pub fn of(event: &Event) -> EventFrame {
        EventFrame::new(event.id, event.is_read_state(), event.frame())
    }

    /// The frame of event `id`'s JSON text.
    pub fn new(id: i64, read: bool, json: String) -> EventFrame {
        let header = FrameHeader {
            is_final: true,
            opcode: OpCode::Data(Data::Text),
            ..FrameHeader::default()
        };
        let mut websocket = Vec::with_capacity(header.len(json.len() as u64) + json.len());
        // Writing into a Vec cannot fail.
        let _ = header.format(json.len() as u64, &mut websocket);
        let json_at = websocket.len();
        websocket.extend_from_slice(json.as_bytes());
        EventFrame(Arc::new(FrameBytes {
            id,
            read,
            websocket: websocket.into_boxed_slice(),
            json_at,
        }))
    }

    /// The event's id.
    pub fn id(&self) -> i64 {
        self.0.id
    }

    /// A `read` frame (a read-state change), not an `event`.
    pub fn is_read(&self) -> bool {
        self.0.read
    }

    /// The complete WebSocket frame (FIN, text, unmasked).
    pub fn websocket(&self) -> &[u8] {
        &self.0.websocket
    }

    /// The frame's JSON text.
    pub fn json(&self) -> &[u8] {
        &self.0.websocket[self.0.json_at..]
    }

    /// Bytes held (the WebSocket frame, the JSON within it).
    pub fn size(&self) -> usize {
        self.0.websocket.len()
    }
}

/// One Server-Sent Event, appended to `out`: `event: KIND`, an optional
/// `id:`, and the frame's JSON as its one `data:` line (frames are
/// single-line JSON), then the blank line that ends it.
pub fn write_sse_event(out: &mut Vec<u8>, kind: &str, id: Option<&str>, json: &[u8]) {
    out.reserve(json.len() + 64);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.push(b'\n');
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

/// Field order is the wire order: sorted.
#[derive(Serialize)]
struct CloseEvent<'a> {
    code: u16,
    reason: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// What an SSE stream sends where a socket would send a close frame
/// (`event: close`), before it ends: the same code and reason.
pub fn close_frame(close: Close, reason: &str) -> String {
    to_text(&CloseEvent {
        code: close.code(),
        reason,
        kind: "close",
    })
}

/// Field order is the wire order: sorted.
#[derive(Serialize)]
struct ReadStateFrame<'a> {
    cleared_through: i64,
    ids: &'a [i64],
    stream: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    up_to: i64,
}

/// The `read` frame for `endpoint`'s read state (the answer to `POST
/// /read/...`; sockets get the same frame from the log).
pub fn read_state_frame(endpoint: &Endpoint, state: &ReadState) -> String {
    to_text(&ReadStateFrame {
        cleared_through: state.cleared_through,
        ids: &state.ids,
        stream: &endpoint.state_name(),
        kind: "read",
        up_to: state.up_to,
    })
}

/// A page of history: the events' frames newest first, where the next page
/// starts, and the user's read state on the stream.
pub fn history(events: &[Event], next_before: Option<i64>, read: &ReadState) -> String {
    let mut out = String::from("{\"events\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&event.frame());
    }
    out.push_str("],\"next_before\":");
    out.push_str(&to_text(&next_before));
    out.push_str(",\"read\":");
    out.push_str(&to_text(read));
    out.push('}');
    out
}

impl Event {
    /// Whether this is a read-state change (framed `read`).
    pub fn is_read_state(&self) -> bool {
        self.channel == READ_CHANNEL
    }
}

/// Serialising borrowed strings, numbers and already-valid raw JSON cannot fail.
fn to_text(frame: &impl Serialize) -> String {
    serde_json::to_string(frame).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream key whose JSON needs escapes still makes a `read` frame (a
    /// borrowed `&str` cannot hold an unescaped copy).
    #[test]
    fn read_frames_survive_escaped_stream_keys() {
        let payload = RawValue::from_string(
            r#"{"user_id":"2","stream":"businesses/a\"b\\c","up_to":7,"ids":[],"cleared_through":0}"#
                .into(),
        )
        .expect("json");
        let frame = read_frame(&payload).expect("a read frame");
        let value: serde_json::Value = serde_json::from_str(&frame).expect("json");
        assert_eq!(value["type"], "read");
        assert_eq!(value["stream"], "businesses/a\"b\\c");
        assert_eq!(value["up_to"], 7);
    }

    #[test]
    fn paths_name_endpoints_and_stream_keys() {
        let streams: Vec<Stream> = vec!["businesses=business_events:id".parse().expect("stream")];
        let at = |path: &str| Endpoint::from_path(path, &streams);
        assert_eq!(
            at("/ws/dashboard/"),
            Some((Transport::WebSocket, Endpoint::Dashboard))
        );
        assert_eq!(
            at("/ws/dashboard"),
            Some((Transport::WebSocket, Endpoint::Dashboard))
        );
        assert_eq!(
            at("/sse/notifications/"),
            Some((Transport::ServerSentEvents, Endpoint::Notifications))
        );
        let business = |key: &str| Endpoint::Stream {
            index: 0,
            name: "businesses".into(),
            key: key.into(),
        };
        assert_eq!(
            at("/ws/businesses/42/"),
            Some((Transport::WebSocket, business("42")))
        );
        assert_eq!(
            at("/sse/businesses/a%20b"),
            Some((Transport::ServerSentEvents, business("a b")))
        );
        for path in [
            "/ws/businesses/",
            "/ws/businesses//",
            "/ws/businesses/1/2/",
            "/ws/shops/1/",
            "/ws/",
            "/sse",
            "/businesses/1/",
            "/ws/businesses/%FF/",
        ] {
            assert_eq!(at(path), None, "{path}");
        }
        let long = format!("/ws/businesses/{}/", "k".repeat(MAX_KEY_BYTES + 1));
        assert_eq!(at(&long), None);
    }

    #[test]
    fn last_event_ids_carry_the_epoch() {
        assert_eq!(
            Resume::from_last_event_id(&sse_id("abc", 42)),
            Ok(Resume {
                last_id: 42,
                epoch: Some("abc".into())
            })
        );
        assert_eq!(
            Resume::from_last_event_id("7"),
            Ok(Resume {
                last_id: 7,
                epoch: None
            })
        );
        for bad in ["", "abc:", "abc:-1", "abc:x", ":1.5"] {
            assert!(Resume::from_last_event_id(bad).is_err(), "{bad}");
        }
        let mut out = Vec::new();
        write_sse_event(&mut out, "event", Some("e:1"), br#"{"a":1}"#);
        write_sse_event(&mut out, "hello", None, b"{}");
        assert_eq!(
            out,
            b"event: event\nid: e:1\ndata: {\"a\":1}\n\nevent: hello\ndata: {}\n\n"
        );
    }

    #[test]
    fn resume_parameters() {
        let q = |s: &str| crate::server::query_params(Some(s));
        assert_eq!(Resume::from_query(&q("")), Ok(None));
        assert_eq!(Resume::from_query(&q("token=x")), Ok(None));
        assert_eq!(
            Resume::from_query(&q("last_id=5&epoch=ab")),
            Ok(Some(Resume {
                last_id: 5,
                epoch: Some("ab".into())
            }))
        );
        assert_eq!(
            Resume::from_query(&q("last_id=0")),
            Ok(Some(Resume {
                last_id: 0,
                epoch: None
            }))
        );
        assert!(Resume::from_query(&q("last_id=-1")).is_err());
        assert!(Resume::from_query(&q("last_id=x")).is_err());
        assert!(Resume::from_query(&q("epoch=x")).is_err());
    }

    #[test]
    fn close_codes_round_trip() {
        for close in Close::ALL {
            assert_eq!(Close::from_code(close.code()), Some(close));
        }
        assert_eq!(Close::TokenExpired.code(), 4001);
        assert_eq!(Close::TooSlow.code(), 4008);
        assert_eq!(Close::from_code(1000), None);
    }

    /// The bytes `json!` wrote before these frames had types.
    #[test]
    fn hello_and_reset_bytes_are_unchanged() {
        assert_eq!(
            hello(&Endpoint::Dashboard, "42", 1234, "9f2c", None),
            serde_json::json!({
                "type": "hello",
                "stream": "dashboard",
                "user": "42",
                "last_id": 1234,
                "epoch": "9f2c",
            })
            .to_string()
        );
        assert_eq!(
            hello(&Endpoint::Notifications, "7", 0, "", None),
            r#"{"epoch":"","last_id":0,"stream":"notifications","type":"hello","user":"7"}"#
        );
        for why in [
            Reset::EpochMismatch,
            Reset::CursorExpired,
            Reset::CursorUnknown,
        ] {
            assert_eq!(
                reset(why),
                serde_json::json!({"type": "reset", "reason": why.name()}).to_string()
            );
        }
        assert_eq!(
            reset(Reset::CursorExpired),
            r#"{"reason":"cursor_expired","type":"reset"}"#
        );
    }

    #[test]
    fn event_frames() {
        let event = Event {
            id: 7,
            channel: "business_events".into(),
            table: "businesses".into(),
            op: "INSERT".into(),
            at: "2026-11-25T18:40:00.123456Z".into(),
            data: RawValue::from_string(r#"{"id": 3, "owner_id": 42}"#.into()).expect("json"),
        };
        assert_eq!(
            event.frame(),
            r#"{"type":"event","id":7,"channel":"business_events","table":"businesses","op":"INSERT","at":"2026-11-25T18:40:00.123456Z","data":{"id": 3, "owner_id": 42}}"#
        );
    }

    #[test]
    fn client_messages() {
        let parse = |text: &str| serde_json::from_str::<ClientMessage>(text).ok();
        assert_eq!(
            parse(r#"{"type":"refresh","token":"t"}"#),
            Some(ClientMessage::Refresh { token: "t".into() })
        );
        assert_eq!(
            parse(r#"{"type":"read","up_to":7}"#),
            Some(ClientMessage::Read {
                up_to: Some(7),
                ids: vec![]
            })
        );
        assert_eq!(
            parse(r#"{"type":"read","ids":[1,2]}"#),
            Some(ClientMessage::Read {
                up_to: None,
                ids: vec![1, 2]
            })
        );
        assert_eq!(parse(r#"{"type":"clear"}"#), Some(ClientMessage::Clear {}));
        for bad in [
            r#"{"type":"ping"}"#,
            r#"{"type":"read","up_to":"7"}"#,
            r#"{"type":"read","ids":[1.5]}"#,
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn read_state_changes_are_read_frames() {
        let event = Event {
            id: 9,
            channel: READ_CHANNEL.into(),
            table: "read_state".into(),
            op: "UPDATE".into(),
            at: "2026-11-25T18:40:00.123456Z".into(),
            data: RawValue::from_string(
                r#"{"user_id":"2","stream":"notifications","up_to":5,"ids":[8],"cleared_through":0}"#
                    .into(),
            )
            .expect("json"),
        };
        assert_eq!(
            event.frame(),
            r#"{"cleared_through":0,"ids":[8],"stream":"notifications","type":"read","up_to":5}"#
        );
    }
}
