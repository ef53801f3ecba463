//! The bench's WebSocket client, by hand: the upgrade, then frames parsed
//! straight out of one read buffer per socket.
//!
//! Why not tokio-tungstenite: the bench must cost well under what pgrelay
//! costs per delivery, or it measures itself (the "cheap epoll client" of the
//! ideal broadcaster the issue compares pgrelay with). Through
//! tokio-tungstenite it cost more than pgrelay: its read buffer zero-filled
//! on every read, wakers re-registered on every poll, each text frame checked
//! as UTF-8 and copied into its own `Bytes`. Here a read lands in the spare
//! end of a buffer that is zeroed once (16 KiB, grown only for a larger
//! frame), every complete frame of it is handed over as a slice of that
//! buffer (no UTF-8 check, no copy: the bench reads a fixed prefix and an
//! ASCII timestamp), and the frames of one read are counted as one
//! [`Receipt`] (one clock reading, one touch of the thread's counters).
//!
//! Headers are read by hand too: tungstenite's `FrameHeader::parse` (a
//! `Cursor` and `Read` calls for two to ten bytes) was a tenth of the bench's
//! CPU time; its `FrameHeader::format` writes the client's own frames.
//!
//! What a client must still do, it does: server frames must be unmasked, its
//! own (pongs, closes) are masked with a random key; a ping is answered, a
//! close is answered with the same code, a fragmented message is put back
//! together (pgrelay does not fragment, but a client must not care).

use std::ops::ControlFlow;
use std::time::Duration;

use hyper_tungstenite::tungstenite::handshake::client::generate_key;
use hyper_tungstenite::tungstenite::handshake::derive_accept_key;
use hyper_tungstenite::tungstenite::protocol::frame::coding::{Control, OpCode};
use hyper_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::{header, request, Ctx, Outcome};
use crate::error::{BenchError, Result};
use crate::stats::Receipt;

/// A socket's read buffer: a batch of events in one read at 2M deliveries/s
/// (19,000 sockets take 300 MiB for them, which this machine has).
const READ_BUFFER: usize = 16 * 1024;

/// The largest frame, and message, taken (pgrelay's are a few hundred bytes).
const MAX_MESSAGE: usize = 1 << 20;

/// A control frame's payload limit (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;

/// A WebSocket client connection past its upgrade.
pub(crate) struct Ws {
    tcp: TcpStream,
    frames: Frames,
}

/// The upgrade of a new connection to `target` (path and query) with
/// `token` as a bearer. A status other than 101 is a
/// [`BenchError::Refused`] with the body's start, as for any request.
pub(crate) async fn upgrade(ctx: &Ctx, target: &str, token: &str) -> Result<Ws> {
    let key = generate_key();
    let upgrade = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        host = ctx.host,
    );
    let (tcp, head, rest) = request(ctx, &upgrade, "101").await?;
    let accept = derive_accept_key(key.as_bytes());
    if header(&head, "sec-websocket-accept") != Some(accept.as_str()) {
        return Err(BenchError::run(
            "upgrade response lacks the right Sec-WebSocket-Accept",
        ));
    }
    Ok(Ws {
        tcp,
        frames: Frames::new(&rest),
    })
}

impl Ws {
    /// Reads frames until the connection ends or `on_text` breaks, handing
    /// `on_text` each text message with the [`Receipt`] of the read it came
    /// in, answering pings and the server's close. Frames after the one
    /// `on_text` broke at stay buffered for the next call.
    pub(crate) async fn read_loop(
        &mut self,
        mut on_text: impl FnMut(&[u8], &mut Receipt) -> ControlFlow<()>,
    ) -> Outcome {
        loop {
            let outcome = {
                // Not held across an await: counted before the next read.
                let mut receipt = Receipt::new();
                self.frames
                    .parse(&mut |text: &[u8]| on_text(text, &mut receipt))
            };
            if !self.frames.out.is_empty() {
                if let Err(e) = self.tcp.write_all(&self.frames.out).await {
                    return Outcome::Failed(e.to_string());
                }
                self.frames.out.clear();
            }
            if let Some(outcome) = outcome {
                return outcome;
            }
            match self.tcp.read(self.frames.spare()).await {
                Ok(0) => return Outcome::Failed("connection closed without a close frame".into()),
                Ok(n) => self.frames.end += n,
                Err(e) => return Outcome::Failed(e.to_string()),
            }
        }
    }

    /// A close handshake from our side (1000), waiting for the server's
    /// close or the end of the connection, 2 s at most.
    pub(crate) async fn close_normally(&mut self) {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bench done");
        push_frame(&mut self.frames.out, Control::Close, &payload);
        self.frames.closing = true;
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.read_loop(|_, _| ControlFlow::Continue(())),
        )
        .await;
    }
}

/// The frame side of a connection, without I/O: the read buffer, and what
/// to send back.
struct Frames {
    /// Bytes read; `buf[start..end]` not parsed yet.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The whole size of the frame at `start` when its header is in and its
    /// payload is not (0 otherwise): the buffer grows to it if it must.
    want: usize,
    /// A fragmented message being put back together: whether it is text,
    /// and its payload so far.
    partial: Option<(bool, Vec<u8>)>,
    /// Frames to send (pongs, the close), masked.
    out: Vec<u8>,
    /// We sent a close: the server's close answers it, and is not answered.
    closing: bool,
}

impl Frames {
    /// A buffer holding `read`, the bytes read after the upgrade response.
    fn new(read: &[u8]) -> Frames {
        // Zeroed once, here (calloc: untouched pages cost nothing).
        let mut buf = vec![0u8; READ_BUFFER.max(read.len())].into_boxed_slice();
        buf[..read.len()].copy_from_slice(read);
        Frames {
            buf,
            start: 0,
            end: read.len(),
            want: 0,
            partial: None,
            out: Vec::new(),
            closing: false,
        }
    }

    /// Room for the next read, a quarter of the buffer at least: the
    /// unparsed bytes (a part of one frame at most) moved to the front if
    /// less is left, the buffer grown if that frame is larger.
    fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.buf.len() - self.end < self.buf.len() / 4
            || self.start + self.want > self.buf.len()
        {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.want > self.buf.len() {
            let mut grown = vec![0u8; self.want].into_boxed_slice();
            grown[..self.end].copy_from_slice(&self.buf[..self.end]);
            self.buf = grown;
        }
        &mut self.buf[self.end..]
    }

    /// Hands every complete message buffered to `on_text`, and queues the
    /// answers to pings and to a close. `None`: more bytes are needed.
    fn parse(&mut self, on_text: &mut impl FnMut(&[u8]) -> ControlFlow<()>) -> Option<Outcome> {
        loop {
            let (header, from, to) = match self.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return None,
                Err(e) => return Some(Outcome::Failed(e)),
            };
            self.start = to;
            let payload = &self.buf[from..to];
            match header.opcode {
                TEXT | BINARY => {
                    if self.partial.is_some() {
                        return Some(Outcome::Failed(
                            "a new message inside a fragmented one".into(),
                        ));
                    }
                    let text = header.opcode == TEXT;
                    if !header.fin {
                        self.partial = Some((text, payload.to_vec()));
                    } else if text && on_text(payload).is_break() {
                        return Some(Outcome::Done);
                    }
                }
                CONTINUATION => {
                    let Some((text, message)) = &mut self.partial else {
                        return Some(Outcome::Failed(
                            "a continuation frame outside a message".into(),
                        ));
                    };
                    if message.len() + payload.len() > MAX_MESSAGE {
                        return Some(Outcome::Failed("a message over 1 MiB".into()));
                    }
                    message.extend_from_slice(payload);
                    if header.fin {
                        let text = *text;
                        let message = self.partial.take().map(|p| p.1).unwrap_or_default();
                        if text && on_text(&message).is_break() {
                            return Some(Outcome::Done);
                        }
                    }
                }
                PING => push_frame(&mut self.out, Control::Pong, payload),
                CLOSE => {
                    let code = match payload {
                        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
                        _ => None,
                    };
                    if !self.closing {
                        self.closing = true;
                        let echo = code.map(u16::to_be_bytes);
                        push_frame(
                            &mut self.out,
                            Control::Close,
                            echo.as_ref().map_or(&[], |c| c),
                        );
                    }
                    return Some(Outcome::Closed(code));
                }
                // PONG; other opcodes are refused by `Header::parse`.
                _ => {}
            }
        }
    }

    /// The header and payload range of the complete frame at `start`;
    /// `None` if it is not all in yet (its size then in `want`).
    fn next_frame(&mut self) -> Result<Option<(Header, usize, usize)>, String> {
        let Some(header) = Header::parse(&self.buf[self.start..self.end])? else {
            return Ok(None);
        };
        let from = self.start + header.size;
        let to = from + header.len;
        if to > self.end {
            self.want = to - self.start;
            return Ok(None);
        }
        self.want = 0;
        Ok(Some((header, from, to)))
    }
}

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xa;

/// A server frame's header (RFC 6455 5.2).
#[derive(Debug, PartialEq)]
struct Header {
    fin: bool,
    opcode: u8,
    /// The payload's length.
    len: usize,
    /// The header's own: 2, 4 or 10 bytes.
    size: usize,
}

impl Header {
    /// The header at the start of `b`, `None` until all of it is in; an
    /// error for what a server must not send (a mask, reserved bits or
    /// opcodes, a fragmented or long control frame) and frames over 1 MiB.
    fn parse(b: &[u8]) -> Result<Option<Header>, String> {
        let [first, second, ..] = *b else {
            return Ok(None);
        };
        let (fin, opcode) = (first & 0x80 != 0, first & 0x0f);
        if first & 0x70 != 0 {
            return Err("a frame with reserved bits set (no extension was agreed)".into());
        }
        if second & 0x80 != 0 {
            return Err("the server sent a masked frame".into());
        }
        let (len, size) = match second & 0x7f {
            126 => match b.get(2..4) {
                Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 4),
                _ => return Ok(None),
            },
            127 => match b.get(2..10).and_then(|l| <[u8; 8]>::try_from(l).ok()) {
                Some(l) => (u64::from_be_bytes(l), 10),
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        match opcode {
            CONTINUATION | TEXT | BINARY => {}
            CLOSE | PING | PONG if fin && len <= MAX_CONTROL as u64 => {}
            CLOSE | PING | PONG => {
                return Err("a fragmented or over-long control frame".into());
            }
            _ => return Err(format!("reserved opcode {opcode}")),
        }
        if len > MAX_MESSAGE as u64 {
            return Err(format!("a frame of {len} bytes, over 1 MiB"));
        }
        Ok(Some(Header {
            fin,
            opcode,
            len: len as usize,
            size,
        }))
    }
}

/// Appends a final control frame to `out`: masked with a random key when
/// `masked` (a client's), plain otherwise (a server's: the plain
/// broadcaster's close).
pub(crate) fn push_control(out: &mut Vec<u8>, control: Control, payload: &[u8], masked: bool) {
    let mask: Option<[u8; 4]> = masked.then(rand::random);
    let header = FrameHeader {
        opcode: OpCode::Control(control),
        mask,
        ..FrameHeader::default()
    };
    // Writing into a Vec does not fail.
    let _ = header.format(payload.len() as u64, out);
    match mask {
        Some(mask) => out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m)),
        None => out.extend_from_slice(payload),
    }
}

/// Appends a client control frame (final, masked with a random key).
fn push_frame(out: &mut Vec<u8>, control: Control, payload: &[u8]) {
    push_control(out, control, payload, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Cursor;

    /// An unmasked (server) frame.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let opcode = OpCode::from(first & 0x0f);
        let header = FrameHeader {
            is_final: first & 0x80 != 0,
            opcode,
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header
            .format(payload.len() as u64, &mut out)
            .expect("format");
        out.extend_from_slice(payload);
        out
    }

    /// First bytes: final text, close and ping frames.
    const F_TEXT: u8 = 0x81;
    const F_CLOSE: u8 = 0x88;
    const F_PING: u8 = 0x89;

    /// What `Frames` made of some reads: the texts, the outcome, and the
    /// frames it queued, unmasked.
    #[derive(Debug, Default, PartialEq)]
    struct Seen {
        texts: Vec<Vec<u8>>,
        outcome: Option<String>,
        sent: Vec<(u8, Vec<u8>)>,
    }

    /// Feeds `reads` one after the other as reads would land, parsing after
    /// each, until an outcome.
    fn feed(reads: &[&[u8]]) -> Seen {
        let mut frames = Frames::new(&[]);
        let mut seen = Seen::default();
        for read in reads {
            let mut read: &[u8] = read;
            while !read.is_empty() {
                let spare = frames.spare();
                let n = spare.len().min(read.len());
                spare[..n].copy_from_slice(&read[..n]);
                frames.end += n;
                read = &read[n..];
                let outcome = frames.parse(&mut |t: &[u8]| {
                    seen.texts.push(t.to_vec());
                    ControlFlow::Continue(())
                });
                if let Some(outcome) = outcome {
                    seen.outcome = Some(match outcome {
                        Outcome::Closed(code) => format!("closed {code:?}"),
                        Outcome::Failed(e) => format!("failed {e}"),
                        Outcome::Done => "done".into(),
                        Outcome::Stop => "stop".into(),
                    });
                    seen.sent = unmask_all(&frames.out);
                    return seen;
                }
            }
        }
        seen.sent = unmask_all(&frames.out);
        seen
    }

    /// The client frames in `out`: (first byte, unmasked payload).
    fn unmask_all(mut out: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut sent = Vec::new();
        while !out.is_empty() {
            let mut cursor = Cursor::new(out);
            let (header, len) = FrameHeader::parse(&mut cursor)
                .expect("header")
                .expect("whole");
            let mask = header.mask.expect("client frames are masked");
            let at = cursor.position() as usize;
            let payload: Vec<u8> = out[at..at + len as usize]
                .iter()
                .zip(mask.iter().cycle())
                .map(|(b, m)| b ^ m)
                .collect();
            sent.push((out[0], payload));
            out = &out[at + len as usize..];
        }
        sent
    }

    #[test]
    fn frames_split_at_every_offset() {
        let events: Vec<Vec<u8>> = (0..3)
            .map(|i| format!(r#"{{"type":"event","id":{i}}}"#).into_bytes())
            .collect();
        let mut close = 4008u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"too slow");
        let mut stream = Vec::new();
        stream.extend(server_frame(F_TEXT, &events[0]));
        stream.extend(server_frame(F_PING, b"beat"));
        stream.extend(server_frame(F_TEXT, &events[1]));
        stream.extend(server_frame(F_TEXT, &events[2]));
        stream.extend(server_frame(F_CLOSE, &close));
        let want = Seen {
            texts: events.clone(),
            outcome: Some("closed Some(4008)".into()),
            sent: vec![
                (0x8a, b"beat".to_vec()),
                (0x88, 4008u16.to_be_bytes().to_vec()),
            ],
        };
        assert_eq!(feed(&[&stream]), want);
        for i in 0..=stream.len() {
            let (a, b) = stream.split_at(i);
            assert_eq!(feed(&[a, b]), want, "split at {i}");
        }
        // A byte a read.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(feed(&bytes), want);
    }

    #[test]
    fn close_without_code_and_after_ours() {
        let seen = feed(&[&server_frame(F_CLOSE, b"")]);
        assert_eq!(seen.outcome.as_deref(), Some("closed None"));
        assert_eq!(seen.sent, [(0x88, Vec::new())]);
        // The answer to our close is not answered.
        let mut frames = Frames::new(&server_frame(F_CLOSE, &1000u16.to_be_bytes()));
        frames.closing = true;
        let outcome = frames.parse(&mut |_: &[u8]| ControlFlow::Continue(()));
        assert!(matches!(outcome, Some(Outcome::Closed(Some(1000)))));
        assert!(frames.out.is_empty());
    }

    #[test]
    fn a_64_kib_frame_grows_the_buffer() {
        let big = vec![b'x'; 64 * 1024];
        let frame = server_frame(F_TEXT, &big);
        // 127: a 64-bit length follows.
        assert_eq!(frame[1], 127);
        let mut stream = server_frame(F_TEXT, b"before");
        stream.extend(&frame);
        stream.extend(server_frame(F_TEXT, b"after"));
        let seen = feed(&[&stream[..5000], &stream[5000..]]);
        assert_eq!(seen.outcome, None);
        assert_eq!(seen.texts, [b"before".to_vec(), big, b"after".to_vec()]);
    }

    #[test]
    fn fragments_are_joined_around_a_ping() {
        let mut stream = server_frame(0x01, b"{\"type\":");
        stream.extend(server_frame(F_PING, b""));
        stream.extend(server_frame(0x00, b"\"event\","));
        stream.extend(server_frame(0x80, b"\"id\":7}"));
        for i in 0..=stream.len() {
            let (a, b) = stream.split_at(i);
            let seen = feed(&[a, b]);
            assert_eq!(seen.texts, [br#"{"type":"event","id":7}"#.to_vec()]);
            assert_eq!(seen.sent, [(0x8a, Vec::new())]);
        }
        let seen = feed(&[&server_frame(0x80, b"stray")]);
        assert_eq!(
            seen.outcome.as_deref(),
            Some("failed a continuation frame outside a message")
        );
    }

    #[test]
    fn masked_and_malformed_server_frames_are_refused() {
        let mut masked = Vec::new();
        push_frame(&mut masked, Control::Ping, b"x");
        let seen = feed(&[&masked]);
        assert_eq!(
            seen.outcome.as_deref(),
            Some("failed the server sent a masked frame")
        );
        let seen = feed(&[&[0xc1, 0x00]]);
        assert!(seen.outcome.is_some_and(|o| o.contains("reserved bits")));
        let seen = feed(&[&[0x83, 0x00]]);
        assert_eq!(seen.outcome.as_deref(), Some("failed reserved opcode 3"));
        let seen = feed(&[&server_frame(0x09, b"")]);
        assert!(seen.outcome.is_some_and(|o| o.contains("control frame")));
        let seen = feed(&[&server_frame(F_PING, &[0; 126])]);
        assert!(seen.outcome.is_some_and(|o| o.contains("control frame")));
    }

    #[test]
    fn headers_agree_with_tungstenite() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 1 << 20] {
            for first in [0x01, 0x81, 0x80, 0x02] {
                let frame = server_frame(first, &vec![b'a'; len]);
                let mut cursor = Cursor::new(&frame);
                let (theirs, their_len) = FrameHeader::parse(&mut cursor)
                    .expect("parse")
                    .expect("whole");
                let ours = Header::parse(&frame).expect("parse").expect("whole");
                assert_eq!(ours.fin, theirs.is_final);
                assert_eq!(ours.opcode, u8::from(theirs.opcode));
                assert_eq!(ours.len as u64, their_len);
                assert_eq!(ours.size as u64, cursor.position());
                // Any shorter start is not a header yet.
                for cut in 0..ours.size {
                    assert_eq!(Header::parse(&frame[..cut]), Ok(None));
                }
            }
        }
        let over = server_frame(0x81, &vec![0; (1 << 20) + 1]);
        assert!(Header::parse(&over).is_err());
    }

    #[test]
    fn done_keeps_the_frames_after_it() {
        let mut stream = server_frame(F_TEXT, b"hello");
        stream.extend(server_frame(F_TEXT, b"first"));
        let mut frames = Frames::new(&stream);
        let mut texts = Vec::new();
        let outcome = frames.parse(&mut |t: &[u8]| {
            texts.push(t.to_vec());
            ControlFlow::Break(())
        });
        assert!(matches!(outcome, Some(Outcome::Done)));
        let outcome = frames.parse(&mut |t: &[u8]| {
            texts.push(t.to_vec());
            ControlFlow::Continue(())
        });
        assert!(outcome.is_none());
        assert_eq!(texts, [b"hello".to_vec(), b"first".to_vec()]);
    }
}
