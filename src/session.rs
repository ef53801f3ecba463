//! One client's stream, whatever carries it: `hello`, optional replay, then
//! live events until the client leaves, the token expires, the client falls
//! too far behind, or the server shuts down. The transport is a [`Peer`]:
//! a WebSocket (`websocket`) or a Server-Sent Events response (`sse`); the
//! rules here are the same for both and for every endpoint.
//!
//! Invariants: frames reach the client in id order and at most once, because
//! the session keeps a cursor and skips anything at or below it (replay and
//! live meet at the hub's `last_id` taken when subscribing, and a cursor from
//! a replica further ahead is honoured too). Queued frames are handed to the
//! peer in one batch. A peer that stalls longer than [`WRITE_TIMEOUT`] is
//! dropped. A replay whose events are all still in memory (`recent`) is
//! sent from there, with no query and no replay turn. Database access goes
//! through the pool only: any other replay
//! (`db::LogReader`, under the statement timeout, a keyed stream filtered in
//! SQL), the unread count when `hello` is asked for it (under a replay's
//! turn, only if one is free at once), `read`/`clear` messages (`bell::mark`), and, on a refresh, the
//! admin or stream query.
//!
//! Close codes, frames and client messages are `wire`'s ([`Close`] says what
//! each code means); the session decides when each is sent, the peer how.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{timeout, Instant};

use crate::auth::Identity;
use crate::bell;
use crate::db::DbError;
use crate::db::{Cursor, LogReader, Source, REPLAY_WINDOW};
use crate::fanout::{RecvError, TryRecvError};
use crate::hub::{Delivery, Ring, Subscription};
use crate::metrics::CloseLabels;
use crate::parse::Event;
use crate::recent::{Audience, Lost};
use crate::replays::{Asker, Busy};
use crate::shared::Shared;
use crate::wire::{self, reason, ClientMessage, Close, Endpoint, EventFrame, Reset, Resume};

/// A stalled peer is dropped after this long.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a close pgrelay starts may take, close frame and the peer's
/// answer included. Shutdown closes every socket at once and must finish
/// within [`SHUTDOWN_GRACE`].
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const _: () = assert!(CLOSE_TIMEOUT.as_millis() < SHUTDOWN_GRACE.as_millis());

/// How long shutdown waits for sockets to close before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);
/// Frames handed to the peer per batch at most, so one busy client yields
/// to others.
const MAX_BATCH: usize = 256;
/// Events per replay page: with `db::PAGE_BYTES`, bounds the memory a large
/// backlog can take.
const REPLAY_PAGE: i64 = 500;

/// How a session ends.
pub enum End {
    /// Tell the client this code and reason, then end.
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

/// A frame of the wire contract, with what an SSE peer needs beside its
/// text: the log position its `id:` names (`None`: no `id:`, the client
/// keeps the one it has).
pub enum Frame {
    Hello {
        text: String,
        position: Option<i64>,
    },
    /// An `event` frame, or a `read` frame (`EventFrame::is_read`): the
    /// bytes the hub shares between every socket it goes to.
    Event(EventFrame),
    Reset {
        text: String,
        position: i64,
    },
}

impl From<Delivery> for Frame {
    /// An event's shared frame, as the hub built it.
    fn from(delivery: Delivery) -> Frame {
        Frame::Event(delivery)
    }
}

impl Frame {
    /// The frame's JSON text.
    pub fn json(&self) -> &[u8] {
        match self {
            Frame::Hello { text, .. } | Frame::Reset { text, .. } => text.as_bytes(),
            Frame::Event(frame) => frame.json(),
        }
    }
}

/// What a client did, as far as the session cares.
pub enum Input {
    /// A text message (`refresh`, `read`, `clear`).
    Text(String),
    /// The client left, broke a rule the transport enforces, or stalled.
    End(End),
}

/// A transport, as the session drives it. Implemented in this crate only
/// (`websocket`, `sse`): each spawn site checks that its future is `Send`,
/// so the trait need not promise it.
#[allow(async_fn_in_trait)]
pub trait Peer {
    /// Sends the frames in one batch, within [`WRITE_TIMEOUT`].
    async fn send(&mut self, frames: Vec<Frame>) -> Result<(), End>;
    /// Queues a live event's frame for the next [`Peer::flush`]. The live
    /// path queues each frame as it takes it off the hub's queue, building
    /// no batch of its own: a wake-up allocates nothing (pgrelay's allocator
    /// has no thread caches, so each allocation takes an arena's lock).
    fn queue(&mut self, frame: EventFrame);
    /// Sends what [`Peer::queue`] queued, in one batch, within
    /// [`WRITE_TIMEOUT`].
    async fn flush(&mut self) -> Result<(), End>;
    /// The client's next input. Must be cancel-safe: the session waits on it
    /// beside the live queue.
    async fn input(&mut self) -> Input;
    /// Called every ping interval: a WebSocket ping, an SSE comment.
    async fn heartbeat(&mut self) -> Result<(), End>;
    /// Tells the client `kind` and `reason` and ends, within [`CLOSE_TIMEOUT`].
    async fn close(&mut self, kind: Close, reason: &'static str);
}

/// What a stream opens with, borrowed from the stream's task: its task
/// owns these for the stream's whole life, and a copy at each level of the
/// session's futures would make every socket's task bigger.
#[derive(Clone, Copy)]
pub struct Opening<'a> {
    pub endpoint: &'a Endpoint,
    pub resume: Option<&'a Resume>,
    /// `?unread=1`: `hello` carries the bell's cursor and count.
    pub unread: bool,
}

/// Runs one client's stream to its end, counting it as a connection.
/// `identity` is the token's, renewed in place by an in-band refresh.
pub async fn run<P: Peer>(
    mut peer: P,
    shared: &Shared,
    opening: Opening<'_>,
    identity: &mut Identity,
) {
    let gauge = shared.metrics.connections(opening.endpoint.name());
    gauge.inc();
    let end = session(&mut peer, shared, opening, identity).await;
    if let End::Close(kind, reason) = end {
        let code = kind.code();
        tracing::debug!(code, reason, "closing");
        shared
            .metrics
            .closes
            .get_or_create(&CloseLabels { code })
            .inc();
        peer.close(kind, reason).await;
    }
    // Counted until the connection is gone, close handshake included.
    gauge.dec();
}

async fn session<P: Peer>(
    peer: &mut P,
    shared: &Shared,
    Opening {
        endpoint,
        resume,
        unread,
    }: Opening<'_>,
    identity: &mut Identity,
) -> End {
    let mut sub: Subscription = match endpoint {
        Endpoint::Dashboard => shared.hub.subscribe_dashboard(),
        Endpoint::Notifications => shared.hub.subscribe(Ring::User(identity.user.clone())),
        Endpoint::Stream { index, key, .. } => {
            shared.hub.subscribe(Ring::Stream(*index, key.clone()))
        }
    };
    // The bell's badge before anything else arrives, when the client asks
    // (`?unread=1`): a query, so it takes a replay's turn (the same caps on
    // the pool) if one is free at once; without one, or if the database
    // cannot say, the hello goes out plain.
    let read = if unread {
        Box::pin(hello_unread(shared, endpoint, &identity.user, sub.last_id)).await
    } else {
        None
    };
    let hello = Frame::Hello {
        text: wire::hello(
            endpoint,
            &identity.user,
            sub.last_id,
            &shared.status.epoch(),
            read,
        ),
        // A resuming client keeps its own position until replay moves it.
        position: resume.is_none().then_some(sub.last_id),
    };
    if let Err(end) = peer.send(vec![hello]).await {
        return end;
    }
    let mut cursor = sub.last_id;
    if let Some(resume) = resume {
        // Boxed, like `refresh` below: awaited inline, their futures would set
        // the size of every socket's task for its whole life.
        let replayed = Box::pin(replay(
            peer,
            shared,
            endpoint,
            &identity.user,
            resume,
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

    // Made once and polled on every wake-up: made anew in the loop, each
    // would register with the runtime's timer and with the stop signal's
    // waiter list (a lock every socket shares) at every event. The timer is
    // boxed: inline, its 100-odd bytes would put every socket's task in
    // jemalloc's next size class (512 bytes more).
    //
    // One timer serves both the token's expiry and the next ping: each
    // timer is polled at every wake-up (every event), and two cost twice.
    let mut expires = expiry(identity, shared);
    let mut next_ping = Instant::now() + shared.ping_interval;
    let mut timer = Box::pin(tokio::time::sleep_until(expires.min(next_ping)));
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => return Close::Shutdown.into(),
            () = &mut timer => {
                if Instant::now() >= expires {
                    return Close::TokenExpired.into();
                }
                // Boxed, like the refresh: it is the largest of these
                // futures, and comes once a ping interval.
                if let Err(end) = Box::pin(peer.heartbeat()).await {
                    return end;
                }
                next_ping = Instant::now() + shared.ping_interval;
                timer.as_mut().reset(expires.min(next_ping));
            }
            // The client's input first: a busy stream must not starve
            // refreshes. A client flooding frames only slows itself.
            input = peer.input() => match input {
                Input::End(end) => return end,
                Input::Text(text) => {
                    let message = match serde_json::from_str(&text) {
                        Ok(message) => message,
                        Err(_) => return End::Close(Close::Unexpected, reason::UNEXPECTED_MESSAGE),
                    };
                    match message {
                        ClientMessage::Refresh { token } => {
                            match Box::pin(refresh(shared, endpoint, identity, &token)).await {
                                Ok(renewed) => {
                                    *identity = renewed;
                                    expires = expiry(identity, shared);
                                    timer.as_mut().reset(expires.min(next_ping));
                                }
                                Err(end) => return end,
                            }
                        }
                        read_or_clear => {
                            let Some(mark) = bell::Mark::from_message(read_or_clear) else {
                                return End::Close(Close::Unexpected, reason::BAD_READ);
                            };
                            if let Err(end) = Box::pin(mark_read(shared, endpoint, identity, mark)).await {
                                return end;
                            }
                        }
                    }
                }
            },
            received = sub.rx.recv() => {
                let first = match received {
                    Ok(delivery) => delivery,
                    Err(RecvError::Lagged(_)) => return slow(shared),
                    // The hub dropped every queue: the event log was reset.
                    Err(RecvError::Closed) => return Close::LogWentBack.into(),
                };
                // Coalesce: everything already queued goes out in one batch.
                let mut queued = 0;
                let mut next = Some(first);
                while let Some(delivery) = next.take() {
                    if delivery.id() > cursor {
                        cursor = delivery.id();
                        peer.queue(delivery);
                        queued += 1;
                    }
                    if queued >= MAX_BATCH {
                        break;
                    }
                    match sub.rx.try_recv() {
                        Ok(d) => next = Some(d),
                        Err(TryRecvError::Lagged(_)) => return slow(shared),
                        Err(_) => {}
                    }
                }
                if queued > 0 {
                    if let Err(end) = peer.flush().await {
                        return end;
                    }
                    shared.metrics.deliveries.inc_by(queued as u64);
                }
            },
        }
    }
}

fn slow(shared: &Shared) -> End {
    shared.metrics.slow_closes.inc();
    Close::TooSlow.into()
}

/// When the stream must close: the token's `exp`, plus the configured leeway.
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
/// user (still allowed on the dashboard or the stream) extends the stream;
/// anything else closes it.
async fn refresh(
    shared: &Shared,
    endpoint: &Endpoint,
    current: &Identity,
    token: &str,
) -> Result<Identity, End> {
    let mut renewed = shared.verifier().verify(token).map_err(|e| {
        tracing::debug!(error = %e, "refresh refused");
        End::Close(Close::TokenExpired, reason::REFRESH_INVALID)
    })?;
    if renewed.user != current.user {
        return Err(End::Close(Close::TokenExpired, reason::REFRESH_OTHER_USER));
    }
    if *endpoint != Endpoint::Notifications {
        // The same door as at connect: a revoked admin or owner is shut out here.
        let refused = match endpoint {
            Endpoint::Dashboard => reason::REFRESH_NOT_ADMIN,
            _ => reason::REFRESH_NOT_ALLOWED,
        };
        match shared.may_open(&renewed, endpoint).await {
            Ok(true) => renewed.admin = *endpoint == Endpoint::Dashboard || renewed.admin,
            Ok(false) => return Err(End::Close(Close::TokenExpired, refused)),
            Err(e) => {
                tracing::warn!(error = %e, "admin or stream query failed during refresh");
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

/// `hello`'s `read_up_to` and `unread`, or `None` when they cannot be had
/// now.
async fn hello_unread(
    shared: &Shared,
    endpoint: &Endpoint,
    user: &str,
    head: i64,
) -> Option<(i64, i64)> {
    // Only a turn free now: in a reconnect storm `hello` must not wait
    // behind replays for a badge, which the client can ask for again
    // (history carries it too).
    let Ok(_turn) = shared.replays.try_turn(user, Asker::UnreadCount) else {
        tracing::debug!("no turn free for the unread count; hello without it");
        return None;
    };
    bell::unread(shared, endpoint, user, head)
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "unread count failed; hello without it"))
        .ok()
}

/// A `read` or `clear` message: the new state reaches this socket (and every
/// other of the user's) as a `read` frame through the log. A read beyond
/// the newest event closes with 1008; a database that cannot take it now is
/// logged, and the socket goes on (the client may send it again). It writes
/// through the pool, so it takes a replay's turn, under the same caps as
/// `POST /read`: the user's sockets together cannot keep more than two
/// pool connections busy. Only a turn free now: waiting for one would stop
/// this socket's events (and its shutdown) behind a reconnect storm's
/// replays. No turn: the same as a database that cannot take it.
async fn mark_read(
    shared: &Shared,
    endpoint: &Endpoint,
    identity: &Identity,
    mark: bell::Mark,
) -> Result<(), End> {
    let _turn = match shared.replays.try_turn(&identity.user, Asker::ReadMessage) {
        Ok(turn) => turn,
        Err(busy) => {
            tracing::debug!(reason = %busy, "read message dropped: retry later");
            return Ok(());
        }
    };
    match bell::mark(shared, endpoint, identity, mark).await {
        Ok(_) => Ok(()),
        Err(DbError::ReadBeyondHead) => {
            Err(End::Close(Close::Unexpected, reason::READ_BEYOND_HEAD))
        }
        Err(DbError::TooManyReadStates) => {
            Err(End::Close(Close::Unexpected, reason::TOO_MANY_READ_STATES))
        }
        Err(e) => {
            tracing::warn!(error = %e, "marking read failed");
            Ok(())
        }
    }
}

/// Replays the events after `resume.last_id` up to `upto` (the hub's `last_id`
/// when this client subscribed) that it may see, in pages: from memory when
/// it holds them all, else (or from where memory lost them) from the log.
/// Returns the cursor live delivery continues from.
async fn replay<P: Peer>(
    peer: &mut P,
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
    // Recent events (the usual case after a restart, a deploy or a 1012
    // with rows written meanwhile) cost no turn and no query either.
    let Some(after) = from_memory(peer, shared, endpoint, user, resume, upto).await? else {
        return Ok(upto);
    };
    let _turn = shared
        .replays
        .turn(user, Asker::Replay)
        .await
        .map_err(|busy| {
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
    } else if after < info.pruned_through {
        Some(Reset::CursorExpired)
    } else if after > info.max_id {
        Some(Reset::CursorUnknown)
    } else {
        None
    };
    if let Some(reason) = reset {
        send_reset(peer, reason, upto).await?;
        return Ok(upto);
    }
    // The dashboard's pages hold only dashboard channels, which is all the
    // router would check; a keyed stream's are filtered in SQL (only its
    // rows leave the database) and again by the router, the rule live
    // delivery follows.
    let visible = |event: &Event| bell::sees(shared, endpoint, user, event);
    let (channels, filter);
    let source = match endpoint {
        Endpoint::Dashboard => {
            channels = shared.routes.dashboard_channels();
            Source::Pool {
                db: &shared.db,
                channels: &channels,
            }
        }
        Endpoint::Notifications => {
            filter = shared.routes.user_filter(user);
            Source::Keyed {
                db: &shared.db,
                filter: &filter,
            }
        }
        Endpoint::Stream { index, key, .. } => {
            filter = shared.routes.stream_filter(*index, key);
            Source::Keyed {
                db: &shared.db,
                filter: &filter,
            }
        }
    };
    // One bounded window a page: a window with no match costs one cheap
    // page and the replay moves on past it.
    let mut log = LogReader::new(
        source,
        Cursor {
            after,
            upto,
            window: REPLAY_WINDOW,
            page: REPLAY_PAGE,
        },
    );
    while let Some(page) = log.next_page().await.map_err(unavailable)? {
        shared.metrics.replay_rows.inc_by(page.rows as u64);
        let frames: Vec<Frame> = page
            .events
            .iter()
            .filter(|e| visible(e))
            .map(|e| Delivery::of(e).into())
            .collect();
        let n = frames.len() as u64;
        if n > 0 {
            peer.send(frames).await?;
            shared.metrics.deliveries.inc_by(n);
        }
    }
    // Retention may have pruned into the range while it was being read: then
    // rows may be missing from it, and the client must hear so. (The cursor
    // was at or above what was pruned when the replay began.)
    if after < upto {
        let pruned = shared
            .db
            .log_info()
            .await
            .map_err(unavailable)?
            .pruned_through;
        if pruned > after {
            send_reset(peer, Reset::CursorExpired, upto).await?;
        }
    }
    Ok(after.max(upto))
}

/// Sends, from memory (`recent`), the events after `resume.last_id` up to
/// `upto` that the client may see, in pages, by live delivery's rule.
/// Returns `None` when that is all of them, or the id after which the log
/// must go on: the cursor itself when memory does not hold the whole range
/// (or the cursor is from another epoch), a later one when memory lost the
/// rest midway (evicted by newer events, or the log went back).
async fn from_memory<P: Peer>(
    peer: &mut P,
    shared: &Shared,
    endpoint: &Endpoint,
    user: &str,
    resume: &Resume,
    upto: i64,
) -> Result<Option<i64>, End> {
    let audience = Audience::of(endpoint, user);
    let Some(mut memory) = shared.hub.recent().read(audience, resume.last_id, upto) else {
        return Ok(Some(resume.last_id));
    };
    // The epoch is read after the range is taken: when the log goes back,
    // memory is emptied before the new epoch is published, so a range taken
    // before that ends in `Lost` (and the log checks the epoch), and one
    // taken after it holds nothing until the new epoch is the one read here.
    if (resume.epoch.as_ref()).is_some_and(|e| *e != shared.status.epoch()) {
        return Ok(Some(resume.last_id));
    }
    loop {
        let page = match memory.next_page(REPLAY_PAGE as usize) {
            Ok(Some(page)) => page,
            Ok(None) => {
                shared.metrics.replays_from_memory.inc();
                return Ok(None);
            }
            Err(Lost(after)) => return Ok(Some(after)),
        };
        // The page is the frames alone (memory's entries stay in memory): a
        // stalled peer pins only what it is sent.
        let frames: Vec<Frame> = page.into_iter().map(Frame::from).collect();
        // Only the client's own events are read (memory's lanes): an empty
        // page is the last, and costs no scan.
        let n = frames.len() as u64;
        if n > 0 {
            peer.send(frames).await?;
            shared.metrics.deliveries.inc_by(n);
        }
    }
}

/// A `reset`; live delivery goes on from `position`.
async fn send_reset<P: Peer>(peer: &mut P, why: Reset, position: i64) -> Result<(), End> {
    let text = wire::reset(why);
    peer.send(vec![Frame::Reset { text, position }]).await
}

/// Runs `write` within [`WRITE_TIMEOUT`]: a failure or a stall is the end
/// of the peer. The write is tried once first, and the timer armed only if
/// it must wait: a socket with room in its kernel buffer (nearly every
/// batch) costs no timer registration, and, boxed, no room in the socket's
/// task. The caller pins `write` where it is: passed by value, it was
/// stored twice in the task (as the argument and as the pinned local).
pub async fn within_write_timeout<E: std::fmt::Display>(
    mut write: Pin<&mut impl Future<Output = Result<(), E>>>,
) -> Result<(), End> {
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    let done = match first {
        Poll::Ready(done) => done,
        // Boxed: inline, the timer would sit in every socket's task for
        // its whole life, for a path few writes take.
        Poll::Pending => match Box::pin(timeout(WRITE_TIMEOUT, write)).await {
            Ok(done) => done,
            Err(_) => {
                tracing::debug!("write stalled: dropping the client");
                return Err(End::Gone);
            }
        },
    };
    done.map_err(|e| {
        tracing::debug!(error = %e, "write failed");
        End::Gone
    })
}
