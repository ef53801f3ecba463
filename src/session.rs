//! One WebSocket, after a successful upgrade: `hello`, optional replay, then
//! live events until the peer leaves, the token expires, the socket falls too
//! far behind, or the server shuts down.
//!
//! Invariants: frames reach the socket in id order and at most once, because
//! the session keeps a cursor and skips anything at or below it (replay and
//! live meet at the hub's `last_id` taken when subscribing, and a cursor from
//! a replica further ahead is honoured too). Queued frames are written in one
//! batch and flushed once. A write that stalls longer than [`WRITE_TIMEOUT`]
//! drops the socket. Database access goes through the pool only: the replay
//! (`db::LogReader`, under the statement timeout, a user's stream filtered in
//! SQL) and, on a dashboard socket's refresh, the admin query.
//!
//! Close codes, frames and client messages are `wire`'s ([`Close`] says what
//! each code means); the session decides when each is sent. Every close the session starts is a close handshake bounded by
//! [`CLOSE_TIMEOUT`] (see `close`): the peer's frames are read until its
//! close frame before TCP is closed, or the kernel would reset the connection
//! and the peer would never see the code.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::stream::FusedStream;
use futures_util::{SinkExt, StreamExt};
use hyper_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::CloseFrame;
use hyper_tungstenite::tungstenite::{Message, Utf8Bytes};
/// An upgraded socket; writes are coalesced until flush (see `coalesce`).
pub type HyperWebsocketStream = hyper_tungstenite::WebSocketStream<
    crate::coalesce::Coalesce<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
>;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::{timeout, Instant};

use crate::auth::Identity;
use crate::db::{Cursor, LogReader, Source, REPLAY_WINDOW};
use crate::hub::Subscription;
use crate::metrics::CloseLabels;
use crate::parse::Event;
use crate::replays::Busy;
use crate::shared::Shared;
use crate::wire::{self, reason, ClientMessage, Close, Endpoint, Reset, Resume};

/// A stalled peer is dropped after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a close pgrelay starts may take, close frame and the peer's
/// answer included. Shutdown closes every socket at once and must finish
/// within [`SHUTDOWN_GRACE`].
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const _: () = assert!(CLOSE_TIMEOUT.as_millis() < SHUTDOWN_GRACE.as_millis());

/// How long shutdown waits for sockets to close before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);
/// Frames written per flush at most, so one busy socket yields to others.
const MAX_BATCH: usize = 256;
/// Events per replay page: bounds the memory a large backlog can take.
const REPLAY_PAGE: i64 = 500;

/// How a session ends.
enum End {
    /// Send a close frame with this code and reason.
    Close(Close, &'static str),
    /// The peer is gone or stalled: nothing to say.
    Gone,
}

impl From<Close> for End {
    /// The close with its default reason.
    fn from(close: Close) -> End {
        End::Close(close, close.reason())
    }
}

/// Runs one socket to its end.
pub async fn run(
    mut ws: HyperWebsocketStream,
    shared: Arc<Shared>,
    endpoint: Endpoint,
    identity: Identity,
    resume: Option<Resume>,
) {
    let gauge = shared.metrics.connections(endpoint.clone());
    gauge.inc();
    let end = session(&mut ws, &shared, &endpoint, identity, resume).await;
    if let End::Close(kind, reason) = end {
        let code = kind.code();
        tracing::debug!(code, reason, "closing socket");
        shared
            .metrics
            .closes
            .get_or_create(&CloseLabels { code })
            .inc();
        close(&mut ws, kind, reason).await;
    }
    // Counted until the connection is gone, close handshake included.
    gauge.dec();
}

/// The whole of a close pgrelay starts, within [`CLOSE_TIMEOUT`]: the close
/// frame, then whatever the peer still sends, read and discarded, until its
/// close frame or EOF; only then is TCP closed. Dropping TCP with the peer's
/// frames unread makes the kernel answer with a reset, and a peer that gets
/// it (a browser whose send fails, a proxy) loses the close frame and
/// reports 1006 with no reason. The one deadline covers a peer that does not
/// read (4008: the write of the close frame itself may stall) and one that
/// floods instead of answering.
async fn close(ws: &mut HyperWebsocketStream, kind: Close, reason: &'static str) {
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

async fn session(
    ws: &mut HyperWebsocketStream,
    shared: &Shared,
    endpoint: &Endpoint,
    mut identity: Identity,
    resume: Option<Resume>,
) -> End {
    let mut sub: Subscription = match endpoint {
        Endpoint::Dashboard => shared.hub.subscribe_dashboard(),
        Endpoint::Notifications => shared.hub.subscribe_user(&identity.user),
    };
    let hello = wire::hello(
        endpoint,
        &identity.user,
        sub.last_id,
        &shared.status.epoch(),
    );
    if let Err(end) = write(ws, [Message::text(hello)]).await {
        return end;
    }
    let mut cursor = sub.last_id;
    if let Some(resume) = resume {
        // Boxed, like `refresh` below: awaited inline, their futures would set
        // the size of every socket's task for its whole life.
        let replayed = Box::pin(replay(
            ws,
            shared,
            endpoint,
            &identity.user,
            &resume,
            sub.last_id,
        ));
        // A long replay must not hold up shutdown.
        let replayed = tokio::select! {
            _ = shared.shutdown.cancelled() => Err(Close::Shutdown.into()),
            replayed = replayed => replayed,
        };
        match replayed {
            Ok(c) => cursor = c,
            Err(end) => return end,
        }
    }

    let mut deadline = expiry(&identity, shared);
    let mut ping =
        tokio::time::interval_at(Instant::now() + shared.ping_interval, shared.ping_interval);
    let mut awaiting_pong = false;
    let mut rate = RateLimit::new(shared.limits.client_messages_per_second);
    loop {
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return Close::Shutdown.into(),
            _ = tokio::time::sleep_until(deadline) => return Close::TokenExpired.into(),
            // The peer's frames first: a busy stream must not starve pongs
            // and refreshes. A peer flooding frames only slows itself.
            message = ws.next() => match message {
                Some(Ok(ref m)) if !m.is_close() && !rate.allow() => {
                    return End::Close(Close::Unexpected, reason::TOO_MANY_MESSAGES);
                }
                None | Some(Ok(Message::Close(_))) => {
                    // tungstenite queued the close reply: send it.
                    let _ = timeout(Duration::from_secs(1), ws.flush()).await;
                    return End::Gone;
                }
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                    return Close::TooBig.into();
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "socket read failed");
                    return End::Gone;
                }
                Some(Ok(Message::Text(text))) => {
                    match Box::pin(refresh(shared, endpoint, &identity, &text)).await {
                        Ok(renewed) => {
                            identity = renewed;
                            deadline = expiry(&identity, shared);
                        }
                        Err(end) => return end,
                    }
                }
                Some(Ok(Message::Binary(_))) => return Close::Binary.into(),
                Some(Ok(Message::Pong(_))) => awaiting_pong = false,
                Some(Ok(Message::Ping(_))) => {
                    // tungstenite queued the pong: send it.
                    if timeout(WRITE_TIMEOUT, ws.flush()).await.map_or(true, |r| r.is_err()) {
                        return End::Gone;
                    }
                }
                Some(Ok(Message::Frame(_))) => {}
            },
            received = sub.rx.recv() => {
                let first = match received {
                    Ok(delivery) => delivery,
                    Err(RecvError::Lagged(_)) => return slow(shared),
                    // The hub dropped every queue: the event log was reset.
                    Err(RecvError::Closed) => return Close::LogWentBack.into(),
                };
                // Coalesce: everything already queued goes out in one flush.
                let mut batch = Vec::new();
                let mut next = Some(first);
                while let Some(delivery) = next.take() {
                    if delivery.id > cursor {
                        cursor = delivery.id;
                        batch.push(Message::Text(delivery.frame));
                    }
                    if batch.len() >= MAX_BATCH {
                        break;
                    }
                    match sub.rx.try_recv() {
                        Ok(d) => next = Some(d),
                        Err(TryRecvError::Lagged(_)) => return slow(shared),
                        Err(_) => {}
                    }
                }
                let n = batch.len() as u64;
                if let Err(end) = write(ws, batch).await {
                    return end;
                }
                shared.metrics.deliveries.inc_by(n);
            },
            _ = ping.tick() => {
                if awaiting_pong {
                    tracing::debug!("no pong since the last ping: dropping socket");
                    return End::Gone;
                }
                awaiting_pong = true;
                if let Err(end) = write(ws, [Message::Ping(Default::default())]).await {
                    return end;
                }
            }
        }
    }
}

/// A token bucket for client frames: `rate` per second, bursts of ten times
/// that. Clients have nothing to send but the odd `refresh`.
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

fn slow(shared: &Shared) -> End {
    shared.metrics.slow_closes.inc();
    Close::TooSlow.into()
}

/// When the socket must close: the token's `exp`, plus the configured leeway.
fn expiry(identity: &Identity, shared: &Shared) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Capped: a token may claim any `exp`, and Instant arithmetic overflows.
    let left =
        Duration::from_secs(identity.exp.saturating_sub(now).min(MAX_TOKEN_LIFE)) + shared.leeway;
    Instant::now() + left
}

/// The longest a socket stays open on one token (ten years): beyond, `exp`
/// is treated as this.
const MAX_TOKEN_LIFE: u64 = 10 * 365 * 24 * 3600;

/// An in-band `{"type":"refresh","token":...}`: a valid token for the same
/// user (still an admin on the dashboard) extends the socket; anything else
/// closes it.
async fn refresh(
    shared: &Shared,
    endpoint: &Endpoint,
    current: &Identity,
    text: &str,
) -> Result<Identity, End> {
    let ClientMessage::Refresh { token } = serde_json::from_str(text)
        .map_err(|_| End::Close(Close::Unexpected, reason::UNEXPECTED_MESSAGE))?;
    let mut renewed = shared.verifier().verify(&token).map_err(|e| {
        tracing::debug!(error = %e, "refresh refused");
        End::Close(Close::TokenExpired, reason::REFRESH_INVALID)
    })?;
    if renewed.user != current.user {
        return Err(End::Close(Close::TokenExpired, reason::REFRESH_OTHER_USER));
    }
    if *endpoint == Endpoint::Dashboard {
        // The same door as at connect: a revoked admin is shut out here.
        match shared.is_admin(&renewed).await {
            Ok(true) => renewed.admin = true,
            Ok(false) => return Err(End::Close(Close::TokenExpired, reason::REFRESH_NOT_ADMIN)),
            Err(e) => {
                tracing::warn!(error = %e, "admin query failed during refresh");
                return Err(End::Close(
                    Close::TokenExpired,
                    reason::REFRESH_ADMIN_UNKNOWN,
                ));
            }
        }
    }
    tracing::debug!(exp = renewed.exp, "token refreshed");
    Ok(renewed)
}

/// Replays the events after `resume.last_id` up to `upto` (the hub's `last_id`
/// when this socket subscribed) that this socket may see, in pages. Returns
/// the cursor live delivery continues from.
async fn replay(
    ws: &mut HyperWebsocketStream,
    shared: &Shared,
    endpoint: &Endpoint,
    user: &str,
    resume: &Resume,
    upto: i64,
) -> Result<i64, End> {
    // A cursor at the head of this log (the usual case after a restart, a
    // deploy or a 1012) has nothing to replay and cannot need a reset: no
    // query, no turn. Reconnect storms of caught-up clients cost nothing.
    let epoch = shared.status.epoch();
    if resume.last_id == upto && resume.epoch.as_ref().is_none_or(|e| *e == epoch) {
        return Ok(upto);
    }
    let _turn = shared.replays.turn(user).await.map_err(|busy| {
        shared.metrics.replays_refused.inc();
        tracing::debug!(reason = %busy, "replay refused: retry later");
        match busy {
            Busy::User => End::Close(Close::ReplayBusy, reason::USER_REPLAYS_BUSY),
            Busy::Total => End::Close(Close::ReplayBusy, reason::REPLAYS_BUSY),
        }
    })?;
    let unavailable = |e: crate::db::DbError| {
        tracing::warn!(error = %e, "replay failed");
        End::from(Close::ReplayFailed)
    };
    let info = shared.db.log_info().await.map_err(unavailable)?;
    let reset = if resume.epoch.as_ref().is_some_and(|e| *e != info.epoch) {
        Some(Reset::EpochMismatch)
    } else if resume.last_id < info.pruned_through {
        Some(Reset::CursorExpired)
    } else if resume.last_id > info.max_id {
        Some(Reset::CursorUnknown)
    } else {
        None
    };
    if let Some(reason) = reset {
        send_reset(ws, reason).await?;
        return Ok(upto);
    }
    let dashboard = *endpoint == Endpoint::Dashboard;
    // The dashboard's pages hold only dashboard channels, which is all the
    // router would check; a user's are filtered in SQL (only their rows leave
    // the database) and again by the router, the rule live delivery follows.
    let visible =
        |event: &Event| dashboard || shared.routes.route(event).users.iter().any(|u| u == user);
    let (channels, user_filter);
    let source = if dashboard {
        channels = shared.routes.dashboard_channels();
        Source::Pool {
            db: &shared.db,
            channels: &channels,
        }
    } else {
        user_filter = shared.routes.user_filter(user);
        Source::User {
            db: &shared.db,
            filter: &user_filter,
        }
    };
    // One bounded window a page: a window with no match costs one cheap
    // page and the replay moves on past it.
    let mut log = LogReader::new(
        source,
        Cursor {
            after: resume.last_id,
            upto,
            window: REPLAY_WINDOW,
            page: REPLAY_PAGE,
        },
    );
    while let Some(page) = log.next_page().await.map_err(unavailable)? {
        shared.metrics.replay_rows.inc_by(page.rows as u64);
        let frames: Vec<Message> = page
            .events
            .iter()
            .filter(|e| visible(e))
            .map(|e| Message::text(e.frame()))
            .collect();
        let n = frames.len() as u64;
        if n > 0 {
            write(ws, frames).await?;
            shared.metrics.deliveries.inc_by(n);
        }
    }
    // Retention may have pruned into the range while it was being read: then
    // rows may be missing from it, and the client must hear so. (The cursor
    // was at or above what was pruned when the replay began.)
    if resume.last_id < upto {
        let pruned = shared
            .db
            .log_info()
            .await
            .map_err(unavailable)?
            .pruned_through;
        if pruned > resume.last_id {
            send_reset(ws, Reset::CursorExpired).await?;
        }
    }
    Ok(resume.last_id.max(upto))
}

async fn send_reset(ws: &mut HyperWebsocketStream, why: Reset) -> Result<(), End> {
    write(ws, [Message::text(wire::reset(why))]).await
}

/// Feeds the frames and flushes once, within [`WRITE_TIMEOUT`].
async fn write(
    ws: &mut HyperWebsocketStream,
    frames: impl IntoIterator<Item = Message>,
) -> Result<(), End> {
    let written = timeout(WRITE_TIMEOUT, async {
        for frame in frames {
            ws.feed(frame).await?;
        }
        ws.flush().await
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "socket write failed");
            Err(End::Gone)
        }
        Err(_) => {
            tracing::debug!("socket write stalled: dropping socket");
            Err(End::Gone)
        }
    }
}
