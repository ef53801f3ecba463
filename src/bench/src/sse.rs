//! The Server-Sent Events side of the client (`--transport sse`): `GET
//! /sse/...` with `Accept: text/event-stream` and the token as a bearer, by
//! hand over a TcpStream as the WebSocket upgrade is, then the chunked body
//! read by [`crate::eventstream`] in one 4 KiB buffer. The first event must
//! be `hello`; `event` and `reset` events' data go to the client as text
//! frames; `event: close` ends the stream as a close frame would, with its
//! code. A resume sends `Last-Event-ID: EPOCH:ID` (pgrelay's own form,
//! [`pgrelay::wire::sse_id`]).

use std::ops::ControlFlow;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::client::{header, request, Ctx, Hello, Outcome};
use crate::error::{BenchError, Result};
use crate::eventstream::{EventStream, Kind};
use crate::frame::close_code;
use crate::stats::Receipt;

/// The read buffer's first size (it grows as an event needs).
const READ_BUFFER: usize = 4 * 1024;

/// An event stream being read.
pub(crate) struct SseStream {
    tcp: TcpStream,
    body: EventStream,
}

/// Opens `path` with `token`, resuming from `resume` (last id, epoch):
/// the stream and its `hello`.
pub(crate) async fn connect(
    ctx: &Ctx,
    path: &str,
    token: &str,
    resume: Option<(i64, &str)>,
) -> Result<(SseStream, Hello)> {
    let last_event_id = resume
        .map(|(last_id, epoch)| {
            format!(
                "Last-Event-ID: {}\r\n",
                pgrelay::wire::sse_id(epoch, last_id)
            )
        })
        .unwrap_or_default();
    let get = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
         Authorization: Bearer {token}\r\n{last_event_id}\r\n",
        host = ctx.host,
    );
    let (tcp, head, rest) = request(ctx, &get, "200").await?;
    let content_type = header(&head, "content-type").unwrap_or_default();
    if !content_type.starts_with("text/event-stream") {
        return Err(BenchError::run(format!(
            "{path}: not an event stream (Content-Type {content_type:?})"
        )));
    }
    let chunked = header(&head, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let body = EventStream::new(chunked, &rest, READ_BUFFER).map_err(BenchError::run)?;
    let mut stream = SseStream { tcp, body };
    let hello = match stream.next().await.map_err(BenchError::run)? {
        Some(Kind::Hello) => Hello::parse(stream.body.data())?,
        Some(_) => {
            return Err(BenchError::run(format!(
                "first event is not hello: {}",
                String::from_utf8_lossy(stream.body.data())
            )))
        }
        None => return Err(BenchError::run("event stream ended before hello")),
    };
    Ok((stream, hello))
}

impl SseStream {
    /// The next event's kind (its data in `self.body.data()`), reading as
    /// needed; `None` when the body or the connection ends.
    async fn next(&mut self) -> Result<Option<Kind>, String> {
        loop {
            if let Some(kind) = self.body.next_event() {
                return Ok(Some(kind));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Reads more of the body; `false` when the body or the connection
    /// ended.
    async fn fill(&mut self) -> Result<bool, String> {
        if self.body.ended() {
            return Ok(false);
        }
        let buf = self.body.read_buf()?;
        match self.tcp.read_buf(buf).await {
            Ok(0) => Ok(false),
            Ok(_) => {
                self.body.decode()?;
                Ok(true)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads events until the stream ends or `on_text` breaks, handing it
    /// each event's data (heartbeats are comments: never seen here) with
    /// the receipt of the read it came in.
    pub(crate) async fn read_loop(
        &mut self,
        mut on_text: impl FnMut(&[u8], &mut Receipt) -> ControlFlow<()>,
    ) -> Outcome {
        loop {
            {
                // Not held across an await: counted before the next read.
                let mut receipt = Receipt::new();
                while let Some(kind) = self.body.next_event() {
                    if kind == Kind::Close {
                        return Outcome::Closed(close_code(self.body.data()));
                    }
                    if on_text(self.body.data(), &mut receipt).is_break() {
                        return Outcome::Done;
                    }
                }
            }
            match self.fill().await {
                Ok(true) => {}
                Ok(false) => {
                    return Outcome::Failed("event stream ended without event: close".into())
                }
                Err(e) => return Outcome::Failed(e),
            }
        }
    }
}
