//! Reading event frames without deserialising them: the bench reads up to
//! millions of frames a second on two threads, so it takes the id from the
//! fixed frame prefix and the `at` timestamp by hand, and leaves the rest.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// Every event frame starts with this (parse.rs serialises `type` then `id`).
const EVENT_PREFIX: &[u8] = br#"{"type":"event","id":"#;
const RESET_PREFIX: &[u8] = br#"{"type":"reset""#;
const AT_KEY: &[u8] = br#""at":""#;
/// An SSE `event: close`'s data starts with this (wire.rs sorts its keys).
const CLOSE_PREFIX: &[u8] = br#"{"code":"#;

/// What a text frame is, as far as the bench cares.
#[derive(Debug, PartialEq)]
pub(crate) enum Frame<'a> {
    /// An event: its id, and the frame after the id.
    Event {
        id: i64,
        rest: &'a [u8],
    },
    Reset,
    Other,
}

impl Frame<'_> {
    pub(crate) fn parse(frame: &[u8]) -> Frame<'_> {
        match frame.strip_prefix(EVENT_PREFIX) {
            Some(rest) => match parse_int(rest) {
                Some((id, rest)) => Frame::Event { id, rest },
                None => Frame::Other,
            },
            None if frame.starts_with(RESET_PREFIX) => Frame::Reset,
            None => Frame::Other,
        }
    }
}

/// Event `at`s remembered per thread, by id modulo this.
const AT_CACHE: usize = 4096;

thread_local! {
    /// (id, at µs) of events this thread has parsed: every socket gets the
    /// same events, so each thread parses an event's `at` once, not once
    /// per socket (the search and the parse were most of the bench's
    /// user-space cost per delivery).
    static AT: RefCell<Box<[(i64, i64)]>> = RefCell::new(vec![(-1, 0); AT_CACHE].into_boxed_slice());
}

/// Event `id`'s `at` (µs since the Unix epoch), from `rest` (the frame after
/// its id) unless this thread has seen the event already.
pub(crate) fn event_at_us(id: i64, rest: &[u8]) -> Option<i64> {
    AT.with(|cache| {
        let mut cache = cache.borrow_mut();
        let slot = &mut cache[id.rem_euclid(AT_CACHE as i64) as usize];
        if slot.0 == id {
            return Some(slot.1);
        }
        let at = at_us(rest)?;
        *slot = (id, at);
        Some(at)
    })
}

/// The event's `at` (µs since the Unix epoch) in `rest`, the frame after
/// its id.
pub(crate) fn at_us(rest: &[u8]) -> Option<i64> {
    find(rest, AT_KEY).and_then(|i| parse_at_us(&rest[i + AT_KEY.len()..]))
}

/// The code of an SSE `event: close`'s data (`{"code":4008,...}`).
pub(crate) fn close_code(data: &[u8]) -> Option<u16> {
    let (code, _) = parse_int(data.strip_prefix(CLOSE_PREFIX)?)?;
    u16::try_from(code).ok()
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A decimal integer at the start of `b`, and what follows it.
fn parse_int(b: &[u8]) -> Option<(i64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 18 {
        return None;
    }
    let mut n = 0i64;
    for &c in &b[..digits] {
        n = n * 10 + i64::from(c - b'0');
    }
    Some((n, &b[digits..]))
}

/// An RFC 3339 UTC timestamp up to the closing quote (pgrelay.format_at
/// writes `YYYY-MM-DDTHH:MM:SS.ffffffZ`; `+00:00` is read too) -> µs since
/// the Unix epoch. About 55 ns a frame (the hand-written parser it replaced
/// took about 18): 0.1 s of CPU a second at 2M frames/s.
fn parse_at_us(b: &[u8]) -> Option<i64> {
    let end = b.iter().position(|&c| c == b'"').unwrap_or(b.len());
    let text = std::str::from_utf8(&b[..end]).ok()?;
    let since_epoch = humantime::parse_rfc3339(text)
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()?;
    // Not as_micros(): a u128 division, the dearest part of the parse.
    Some(since_epoch.as_secs() as i64 * 1_000_000 + i64::from(since_epoch.subsec_micros()))
}

pub(crate) fn now_us() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Not as_micros(): a u128 division, per delivery.
    since_epoch.as_secs() as i64 * 1_000_000 + i64::from(since_epoch.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_at_us(b"1970-01-01T00:00:00.000000Z"), Some(0));
        assert_eq!(
            parse_at_us(b"2026-11-25T18:40:00.123456Z\",\"data\""),
            Some(1_795_632_000_123_456)
        );
        assert_eq!(
            parse_at_us(b"2000-02-29T23:59:59.999999Z"),
            Some(951_868_799_999_999)
        );
        assert_eq!(
            parse_at_us(b"2026-11-27T20:05:46.123456+00:00\""),
            Some(1_795_809_946_123_456)
        );
        assert_eq!(parse_at_us(b"2026-11-25 18:40:00"), None);
        assert_eq!(parse_at_us(b"2026-11-25T18:40:00.123456+01:00"), None);
        assert_eq!(parse_at_us(b"2026-13-25T18:40:00.123456Z"), None);
    }

    #[test]
    fn frame_prefix() {
        let frame = br#"{"type":"event","id":1235,"channel":"business_events","table":"businesses","op":"INSERT","at":"2026-11-25T18:40:00.123456Z","data":{"id":7}}"#;
        let Frame::Event { id, rest } = Frame::parse(frame) else {
            panic!("not an event");
        };
        assert_eq!(id, 1235);
        assert_eq!(at_us(rest), Some(1_795_632_000_123_456));
        // Remembered by id: the second socket's copy is not parsed again.
        assert_eq!(event_at_us(id, rest), Some(1_795_632_000_123_456));
        assert_eq!(event_at_us(id, b""), Some(1_795_632_000_123_456));
        assert_eq!(event_at_us(id + 4096, b""), None);
        assert_eq!(
            Frame::parse(br#"{"type":"reset","reason":"x"}"#),
            Frame::Reset
        );
        assert_eq!(Frame::parse(br#"{"type":"event","id":x}"#), Frame::Other);
        assert_eq!(Frame::parse(br#"{"type":"hello"}"#), Frame::Other);
    }

    #[test]
    fn close_codes() {
        let close = pgrelay::wire::close_frame(pgrelay::wire::Close::TooSlow, "too slow");
        assert_eq!(close_code(close.as_bytes()), Some(4008));
        assert_eq!(close_code(br#"{"code":99999,"reason":""}"#), None);
        assert_eq!(close_code(br#"{"type":"close"}"#), None);
    }
}
