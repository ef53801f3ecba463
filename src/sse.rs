//! The Server-Sent Events [`Peer`]: `/sse/...`, for clients behind proxies
//! that break WebSockets and for a browser's `EventSource`, which resumes by
//! itself. The response is `text/event-stream`; each frame is one event
//! named by its type (`event: hello`, `event: event`, `event: reset`,
//! `event: read`) with
//! the frame's JSON as its data, and `id: EPOCH:ID` where a log position is
//! known, so a reconnecting `EventSource` sends `Last-Event-ID` and loses
//! nothing (a cursor from another epoch gets `reset`). Heartbeats are
//! comments. Where a socket would get a close frame the stream sends
//! `event: close` with the same code and reason, then ends; at the token's
//! `exp` it ends too, and the client reconnects with a fresh token.
//!
//! Frames go to hyper through a small bounded channel that the response
//! body drains: a client that stops reading fills it, and the session's
//! write then stalls and drops it after `WRITE_TIMEOUT`, as for a socket.
//! A client that leaves drops the body, which closes the channel.

use std::convert::Infallible;
use std::pin::pin;

use futures_util::stream::poll_fn;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame as BodyFrame};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use crate::session::{within_write_timeout, End, Frame, Input, Peer, CLOSE_TIMEOUT};
use crate::wire::{self, Close, EventFrame};

/// Chunks (batches of events) buffered between the session and hyper.
const CHANNEL_CHUNKS: usize = 8;

/// The response body of an event stream.
pub type EventStreamBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An SSE response as the session's peer.
pub struct SsePeer {
    tx: mpsc::Sender<Bytes>,
    epoch: String,
    /// The events queued since the last flush, as SSE text.
    pending: Vec<u8>,
}

/// The response to send now and the peer the session writes into.
pub fn open(epoch: String) -> (Response<EventStreamBody>, SsePeer) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let chunks = poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok::<_, Infallible>(BodyFrame::data(b))))
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    // Proxies must neither cache nor buffer nor transform the stream
    // (`X-Accel-Buffering` is nginx's switch, honoured by others too).
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // One stream per connection: when it ends, so does the connection, so
    // an ended stream cannot leave an idle keep-alive connection behind.
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    (
        response,
        SsePeer {
            tx,
            epoch,
            pending: Vec::new(),
        },
    )
}

impl SsePeer {
    async fn write(&mut self, chunk: impl Into<Bytes>) -> Result<(), End> {
        let tx = &self.tx;
        within_write_timeout(pin!(tx.send(chunk.into()))).await
    }

    fn id(&self, position: i64) -> String {
        wire::sse_id(&self.epoch, position)
    }

    /// Appends `frame` as one SSE event to the chunk the next flush sends.
    fn push(&mut self, frame: &Frame) {
        let (kind, position) = match frame {
            Frame::Hello { position, .. } => ("hello", *position),
            Frame::Event(frame) => (
                if frame.is_read() { "read" } else { "event" },
                Some(frame.id()),
            ),
            Frame::Reset { position, .. } => ("reset", Some(*position)),
        };
        let id = position.map(|p| self.id(p));
        wire::write_sse_event(&mut self.pending, kind, id.as_deref(), frame.json());
    }
}

impl Peer for SsePeer {
    async fn send(&mut self, frames: Vec<Frame>) -> Result<(), End> {
        for frame in &frames {
            self.push(frame);
        }
        self.flush().await
    }

    fn queue(&mut self, frame: EventFrame) {
        self.push(&Frame::Event(frame));
    }

    async fn flush(&mut self) -> Result<(), End> {
        let chunk = std::mem::take(&mut self.pending);
        self.write(chunk).await
    }

    async fn input(&mut self) -> Input {
        // Nothing comes from an SSE client but its leaving.
        self.tx.closed().await;
        Input::End(End::Gone)
    }

    async fn heartbeat(&mut self) -> Result<(), End> {
        self.write(Bytes::from_static(b":\n\n")).await
    }

    async fn close(&mut self, kind: Close, reason: &'static str) {
        // Events queued but not flushed (a socket that lagged in the middle
        // of a batch) go out before the close, as a WebSocket's close frame
        // follows its queued frames.
        let mut event = std::mem::take(&mut self.pending);
        wire::write_sse_event(
            &mut event,
            "close",
            None,
            wire::close_frame(kind, reason).as_bytes(),
        );
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.tx.send(Bytes::from(event))).await;
    }
}
