//! The bell's server side: history and read state, per user and stream.
//!
//! History is the event log itself, read newest first (`GET /history/...`),
//! only what the user may see on that stream, within retention, and never
//! what they cleared. Each request reads at most [`HISTORY_WINDOWS`] windows
//! of `REPLAY_WINDOW` ids, like a replay, so its cost in PostgreSQL is
//! bounded whatever the log holds, and stops at the window that takes its
//! events' payloads to `PAGE_BYTES` (each window's page is bounded so too),
//! so an answer holds twice that and one event at most; `next_before` says
//! where to go on.
//!
//! Read state is one row per user and stream (`pgrelay.read_state`), moved
//! only forward by `pgrelay.mark_read`, which also writes the change into the
//! log as an event on `wire::READ_CHANNEL`, routed to the user: every socket
//! of theirs, on any replica, gets a `read` frame through the ordinary
//! delivery path, and a device that was away replays it. `hello` carries
//! the read cursor and the unread count when the client asks (`?unread=1`).

use crate::auth::Identity;
use crate::db::{DbError, Visible, PAGE_BYTES, REPLAY_WINDOW};
use crate::parse::Event;
use crate::route::KeyFilter;
use crate::shared::Shared;
use crate::wire::{ClientMessage, Endpoint, ReadState, MAX_READ_IDS, UNREAD_CAP};

/// Events one history request returns at most, and by default.
pub const HISTORY_LIMIT_MAX: i64 = 100;
pub const HISTORY_LIMIT_DEFAULT: i64 = 50;
/// Windows of `REPLAY_WINDOW` ids one history request reads at most.
pub const HISTORY_WINDOWS: usize = 10;

/// What a stream shows of the log, owned: the dashboard's channels, or a
/// key's filter (a user's notifications, a stream key).
pub enum Filter {
    Channels(Vec<String>),
    Keyed(KeyFilter),
}

impl Filter {
    pub fn for_endpoint(shared: &Shared, endpoint: &Endpoint, user: &str) -> Filter {
        match endpoint {
            Endpoint::Dashboard => Filter::Channels(shared.routes.dashboard_channels()),
            Endpoint::Notifications => Filter::Keyed(shared.routes.user_filter(user)),
            Endpoint::Stream { index, key, .. } => {
                Filter::Keyed(shared.routes.stream_filter(*index, key))
            }
        }
    }

    pub fn visible(&self) -> Visible<'_> {
        match self {
            Filter::Channels(channels) => Visible::Channels(channels),
            Filter::Keyed(filter) => Visible::Keyed(filter),
        }
    }
}

/// Whether `endpoint`'s client, `user`, sees `event`, read from the log on
/// `endpoint`'s channels or filter: the router's rule, the one live
/// delivery follows.
pub fn sees(shared: &Shared, endpoint: &Endpoint, user: &str, event: &Event) -> bool {
    let targets = || shared.routes.route(event);
    match endpoint {
        // Read on the dashboard's channels: all the router checks there is
        // that it is not a read-state change (never the dashboard's).
        Endpoint::Dashboard => !event.is_read_state(),
        Endpoint::Notifications => targets().users.iter().any(|u| u == user),
        Endpoint::Stream { index, key, .. } => {
            (targets().streams.iter()).any(|(i, k)| i == index && k == key)
        }
    }
}

/// `hello`'s `read_up_to` and `unread` (asked with `?unread=1`): the
/// events after the read cursor among the newest `REPLAY_WINDOW` ids, not
/// read one by one, counted up to [`UNREAD_CAP`].
pub async fn unread(
    shared: &Shared,
    endpoint: &Endpoint,
    user: &str,
    head: i64,
) -> Result<(i64, i64), DbError> {
    let state = shared.db.read_state(user, &endpoint.state_name()).await?;
    let after = state.up_to.max(head - REPLAY_WINDOW).max(0);
    if after >= head {
        return Ok((state.up_to, 0));
    }
    let filter = Filter::for_endpoint(shared, endpoint, user);
    let count = shared
        .db
        .unread(filter.visible(), after, head, &state.ids, UNREAD_CAP)
        .await?;
    Ok((state.up_to, count))
}

/// What a client asked to mark as read.
pub enum Mark {
    UpTo(i64),
    Ids(Vec<i64>),
    Clear,
}

impl Mark {
    /// The mark a `read` or `clear` message asks for: `up_to` or 1 to
    /// `MAX_READ_IDS` ids, not both; `None` for anything else.
    pub fn from_message(message: ClientMessage) -> Option<Mark> {
        match message {
            ClientMessage::Read {
                up_to: Some(n),
                ids,
            } if ids.is_empty() => Some(Mark::UpTo(n)),
            ClientMessage::Read { up_to: None, ids }
                if !ids.is_empty() && ids.len() <= MAX_READ_IDS =>
            {
                Some(Mark::Ids(ids))
            }
            ClientMessage::Clear {} => Some(Mark::Clear),
            _ => None,
        }
    }
}

/// Moves `identity`'s read state on `endpoint` forward.
pub async fn mark(
    shared: &Shared,
    endpoint: &Endpoint,
    identity: &Identity,
    mark: Mark,
) -> Result<ReadState, DbError> {
    let (up_to, ids, clear) = match mark {
        Mark::UpTo(n) => (Some(n), Vec::new(), false),
        Mark::Ids(ids) => (None, ids, false),
        Mark::Clear => (None, Vec::new(), true),
    };
    shared
        .db
        .mark_read(&identity.user, &endpoint.state_name(), up_to, &ids, clear)
        .await
}

/// One page of history, newest first.
pub struct History {
    pub events: Vec<Event>,
    /// Where the next page starts (`?before=`), or `None` at the end.
    pub next_before: Option<i64>,
    pub read: ReadState,
}

/// Up to `limit` events `user` sees on `endpoint` with ids below `before`
/// (the newest when `None`), newest first, within retention and above what
/// they cleared.
pub async fn history(
    shared: &Shared,
    endpoint: &Endpoint,
    user: &str,
    before: Option<i64>,
    limit: i64,
) -> Result<History, DbError> {
    let limit = limit.clamp(1, HISTORY_LIMIT_MAX);
    let info = shared.db.log_info().await?;
    let read = shared.db.read_state(user, &endpoint.state_name()).await?;
    let lowest = read.cleared_through.max(info.pruned_through) + 1;
    let mut before = before.unwrap_or(i64::MAX).min(info.max_id + 1);
    let filter = Filter::for_endpoint(shared, endpoint, user);
    let mut events: Vec<Event> = Vec::new();
    // The payloads read so far, seen or not.
    let mut bytes = 0;
    for _ in 0..HISTORY_WINDOWS {
        if before <= lowest {
            return Ok(History {
                events,
                next_before: None,
                read,
            });
        }
        let floor = (before - REPLAY_WINDOW).max(lowest);
        let wanted = limit - events.len() as i64;
        let page = shared
            .db
            .history(filter.visible(), before, floor, wanted)
            .await?;
        bytes += page
            .events
            .iter()
            .map(|e| e.data.get().len())
            .sum::<usize>();
        events.extend(
            page.events
                .into_iter()
                .filter(|e| sees(shared, endpoint, user, e)),
        );
        before = match page.last_id {
            Some(last) if page.more => last,
            _ => floor,
        };
        if events.len() as i64 >= limit || bytes as i64 >= PAGE_BYTES {
            break;
        }
    }
    let next_before = (before > lowest).then_some(before);
    Ok(History {
        events,
        next_before,
        read,
    })
}
