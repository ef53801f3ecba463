//! The WebSocket [`Peer`]: `/ws/...` after a successful upgrade. Frames go
//! out as text messages, flushed once per batch (the socket's IO is
//! `coalesce`d, so a live batch is one vectored write); a live or
//! memory-replayed event's frame is the hub's shared bytes, header
//! included, never re-encoded per socket (a replay from the log builds its
//! own). The client may send only
//! `refresh`, `read` and `clear` messages (rate-limited), pongs and pings; pgrelay pings every
//! ping interval and drops a peer that has not answered the previous one.
//!
//! Every close the session starts is a close handshake bounded by
//! [`CLOSE_TIMEOUT`] (see [`close_handshake`]): the peer's frames are read
//! until its close frame before TCP is closed, or the kernel would reset the
//! connection and the peer would never see the code.

use std::pin::pin;
use std::time::Duration;

use futures_util::stream::FusedStream;
use futures_util::{SinkExt, StreamExt};
use hyper_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::CloseFrame;
use hyper_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout, Instant};

use crate::session::{within_write_timeout, End, Frame, Input, Peer, CLOSE_TIMEOUT, WRITE_TIMEOUT};
use crate::wire::{reason, Close, EventFrame};

/// An upgraded socket; writes are coalesced until flush (see `coalesce`).
pub type HyperWebsocketStream = hyper_tungstenite::WebSocketStream<
    crate::coalesce::Coalesce<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
>;

/// A WebSocket as the session's peer.
pub struct WebSocketPeer {
    ws: HyperWebsocketStream,
    rate: RateLimit,
    awaiting_pong: bool,
}

impl WebSocketPeer {
    pub fn new(ws: HyperWebsocketStream, client_messages_per_second: u32) -> WebSocketPeer {
        WebSocketPeer {
            ws,
            rate: RateLimit::new(client_messages_per_second),
            awaiting_pong: false,
        }
    }

    /// Writes `message` through tungstenite and flushes, within
    /// [`WRITE_TIMEOUT`].
    async fn write(&mut self, message: Message) -> Result<(), End> {
        within_write_timeout(pin!(self.ws.send(message))).await
    }
}

impl Peer for WebSocketPeer {
    /// An event's frame is queued as the bytes the hub shares (see
    /// `coalesce`); `hello` and `reset` go through tungstenite. One flush
    /// sends the batch: a batch of events only (nearly all) is flushed on
    /// the socket's IO directly, since tungstenite holds nothing unsent
    /// (its writes go straight through to the queue).
    async fn send(&mut self, frames: Vec<Frame>) -> Result<(), End> {
        let ws = &mut self.ws;
        within_write_timeout(pin!(async {
            let mut through_tungstenite = false;
            for frame in frames {
                match frame {
                    Frame::Event(frame) => ws.get_mut().queue(frame),
                    Frame::Hello { text, .. } | Frame::Reset { text, .. } => {
                        through_tungstenite = true;
                        ws.feed(Message::text(text)).await?
                    }
                }
            }
            if through_tungstenite {
                ws.flush().await
            } else {
                Ok(ws.get_mut().flush().await?)
            }
        }))
        .await
    }

    fn queue(&mut self, frame: EventFrame) {
        self.ws.get_mut().queue(frame);
    }

    /// Events only: flushed on the socket's IO, past tungstenite.
    async fn flush(&mut self) -> Result<(), End> {
        within_write_timeout(pin!(self.ws.get_mut().flush())).await
    }

    /// Its two timed flushes (a close reply, a pong) are boxed: the input
    /// future lives in every socket's task, and they are rare.
    async fn input(&mut self) -> Input {
        loop {
            match self.ws.next().await {
                Some(Ok(ref m)) if !m.is_close() && !self.rate.allow() => {
                    return Input::End(End::Close(Close::Unexpected, reason::TOO_MANY_MESSAGES));
                }
                None | Some(Ok(Message::Close(_))) => {
                    // tungstenite queued the close reply: send it.
                    let _ = Box::pin(timeout(Duration::from_secs(1), self.ws.flush())).await;
                    return Input::End(End::Gone);
                }
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                    return Input::End(Close::TooBig.into());
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "socket read failed");
                    return Input::End(End::Gone);
                }
                Some(Ok(Message::Text(text))) => return Input::Text(text.to_string()),
                Some(Ok(Message::Binary(_))) => return Input::End(Close::Binary.into()),
                Some(Ok(Message::Pong(_))) => self.awaiting_pong = false,
                Some(Ok(Message::Ping(_))) => {
                    // tungstenite queued the pong: send it.
                    let flushed = Box::pin(timeout(WRITE_TIMEOUT, self.ws.flush())).await;
                    if flushed.map_or(true, |r| r.is_err()) {
                        return Input::End(End::Gone);
                    }
                }
                Some(Ok(Message::Frame(_))) => {}
            }
        }
    }

    async fn heartbeat(&mut self) -> Result<(), End> {
        if self.awaiting_pong {
            tracing::debug!("no pong since the last ping: dropping socket");
            return Err(End::Gone);
        }
        self.awaiting_pong = true;
        self.write(Message::Ping(Default::default())).await
    }

    async fn close(&mut self, kind: Close, reason: &'static str) {
        close_handshake(&mut self.ws, kind, reason).await;
    }
}

/// The whole of a close pgrelay starts, within [`CLOSE_TIMEOUT`]: the close
/// frame, then whatever the peer still sends, read and discarded, until its
/// close frame or EOF; only then is TCP closed. Dropping TCP with the peer's
/// frames unread makes the kernel answer with a reset, and a peer that gets
/// it (a browser whose send fails, a proxy) loses the close frame and
/// reports 1006 with no reason. The one deadline covers a peer that does not
/// read (4008: the write of the close frame itself may stall) and one that
/// floods instead of answering.
async fn close_handshake(ws: &mut HyperWebsocketStream, kind: Close, reason: &'static str) {
    let frame = CloseFrame {
        code: CloseCode::from(kind.code()),
        reason: Utf8Bytes::from_static(reason),
    };
    let handshake = async {
        // After a read error (an oversized frame) tungstenite yields nothing
        // more, and where the peer's next frame starts is lost.
        let parseable = !ws.is_terminated();
        if let Err(e) = ws.close(Some(frame)).await {
            tracing::debug!(error = %e, "close frame not sent");
            return;
        }
        if parseable {
            // tungstenite now yields what the peer sent before it saw our
            // close frame, then the peer's close frame, then the end.
            loop {
                match ws.next().await {
                    None => return,
                    Some(Ok(_)) => {}
                    Some(Err(_)) => break,
                }
            }
        }
        // What cannot be parsed is drained as bytes until the peer closes
        // TCP. A peer that answered our close frame waits for us to close
        // first: then the deadline ends it.
        let _ = tokio::io::copy(ws.get_mut(), &mut tokio::io::sink()).await;
    };
    if timeout(CLOSE_TIMEOUT, handshake).await.is_err() {
        tracing::debug!("peer did not finish the close handshake in time");
    }
}

/// A token bucket for client frames: `rate` per second, bursts of ten times
/// that. Clients have nothing to send but the odd `refresh`, `read` or `clear`.
struct RateLimit {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> RateLimit {
        let rate = f64::from(per_second.max(1));
        RateLimit {
            tokens: rate * 10.0,
            rate,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate * 10.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
