//! Caps on concurrent replays from the log, and on the other reads and
//! writes a client asks for through the pool (history pages, read marks,
//! `hello`'s unread count), which take the same turns: in total, because
//! they share the read pool with admin checks and the listener's probe, and
//! per user, so one user's many tabs and devices cannot take them all. A
//! replay from memory (`recent`) reads no pool connection and takes no
//! turn. Each replay page is bounded in PostgreSQL (see `db`); these bound
//! how many run at once.
//!
//! Over the per-user cap a socket is refused at once; over the total cap it
//! waits up to [`QUEUE_WAIT`] for a turn (a reconnect storm queues rather
//! than fails), then is refused. A refused socket is closed with 1013 (try
//! again later) and resumes later, with backoff, losing nothing. What must
//! not hold up a live socket (a read mark, the unread count) takes a turn
//! only if one is free now ([`ReplayLimits::try_turn`]). Every refusal is
//! counted here, by what asked ([`Asker`],
//! `pgrelay_replays_refused_total{kind}`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::metrics::TurnLabels;

/// Longest a replay waits for a turn before its socket is told to retry.
pub const QUEUE_WAIT: Duration = Duration::from_secs(10);
/// Concurrent replays of one user.
pub const PER_USER: usize = 2;

/// Why a replay may not start now.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Busy {
    #[error("too many replays at once for this user")]
    User,
    #[error("too many replays at once")]
    Total,
}

/// What asks for a turn: the `kind` its refusals are counted under.
#[derive(Clone, Copy, Debug)]
pub enum Asker {
    /// A resume from the log (refused: 1013).
    Replay,
    /// A history page (429 or 503).
    History,
    /// `POST /read` (429 or 503).
    ReadRequest,
    /// A socket's `read` message (dropped).
    ReadMessage,
    /// `hello`'s unread count (`hello` goes without it).
    UnreadCount,
}

impl Asker {
    const ALL: [Asker; 5] = [
        Asker::Replay,
        Asker::History,
        Asker::ReadRequest,
        Asker::ReadMessage,
        Asker::UnreadCount,
    ];

    fn labels(self) -> TurnLabels {
        let kind = match self {
            Asker::Replay => "replay",
            Asker::History => "history",
            Asker::ReadRequest => "read_request",
            Asker::ReadMessage => "read_message",
            Asker::UnreadCount => "unread_count",
        };
        TurnLabels { kind }
    }
}

pub struct ReplayLimits {
    total: Semaphore,
    per_user: Mutex<HashMap<String, usize>>,
    refused: Family<TurnLabels, Counter>,
}

/// A replay's turn; gives it back when dropped.
pub struct Turn<'a> {
    _total: SemaphorePermit<'a>,
    _user: UserSlot<'a>,
}

impl ReplayLimits {
    /// At most `total` replays at once (at least one); refusals counted in
    /// `refused` (every kind from the start, at 0, so that a rate over it
    /// is defined).
    pub fn new(total: usize, refused: Family<TurnLabels, Counter>) -> ReplayLimits {
        for asker in Asker::ALL {
            drop(refused.get_or_create(&asker.labels()));
        }
        ReplayLimits {
            total: Semaphore::new(total.max(1)),
            per_user: Mutex::new(HashMap::new()),
            refused,
        }
    }

    /// Waits for a turn for `user`, within the caps.
    pub async fn turn(&self, user: &str, asker: Asker) -> Result<Turn<'_>, Busy> {
        let turn = async {
            let user = self.user_slot(user)?;
            let total = tokio::time::timeout(QUEUE_WAIT, self.total.acquire())
                .await
                .map_err(|_| Busy::Total)?
                .map_err(|_| Busy::Total)?;
            Ok(Turn {
                _total: total,
                _user: user,
            })
        };
        self.counted(turn.await, asker)
    }

    /// A turn for `user` if one is free now, without waiting: for what must
    /// not hold up a socket (a read mark, `hello`'s unread count).
    pub fn try_turn(&self, user: &str, asker: Asker) -> Result<Turn<'_>, Busy> {
        let turn = self.user_slot(user).and_then(|user| {
            let total = self.total.try_acquire().map_err(|_| Busy::Total)?;
            Ok(Turn {
                _total: total,
                _user: user,
            })
        });
        self.counted(turn, asker)
    }

    fn counted<'a>(&self, turn: Result<Turn<'a>, Busy>, asker: Asker) -> Result<Turn<'a>, Busy> {
        if turn.is_err() {
            self.refused.get_or_create(&asker.labels()).inc();
        }
        turn
    }

    /// Takes one of `user`'s places; the slot gives it back on every path,
    /// the wait for a total permit included.
    fn user_slot(&self, user: &str) -> Result<UserSlot<'_>, Busy> {
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let running = per_user.entry(user.to_owned()).or_default();
        if *running >= PER_USER {
            return Err(Busy::User);
        }
        *running += 1;
        Ok(UserSlot {
            limits: self,
            user: user.to_owned(),
        })
    }

    fn release(&self, user: &str) {
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = per_user.get_mut(user) {
            *running -= 1;
            if *running == 0 {
                per_user.remove(user);
            }
        }
    }
}

/// A per-user count taken but not yet part of a [`Turn`].
struct UserSlot<'a> {
    limits: &'a ReplayLimits,
    user: String,
}

impl Drop for UserSlot<'_> {
    fn drop(&mut self) {
        self.limits.release(&self.user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn per_user_and_total_caps_hold_and_turns_come_back() {
        use futures_util::FutureExt;

        let limits = ReplayLimits::new(3, Family::default());
        let a1 = limits.turn("a", Asker::Replay).await.expect("a1");
        let a2 = limits.turn("a", Asker::Replay).await.expect("a2");
        assert_eq!(
            limits.turn("a", Asker::Replay).await.err(),
            Some(Busy::User)
        );
        let b1 = limits.turn("b", Asker::Replay).await.expect("b1");
        drop(a1);
        let a3 = limits
            .turn("a", Asker::Replay)
            .await
            .expect("a's turn came back");
        // Three running: a fourth waits, and gets the turn of one that ends.
        let mut b2 = Box::pin(limits.turn("b", Asker::Replay));
        assert!((&mut b2).now_or_never().is_none(), "over the total cap");
        drop(a2);
        let b2 = b2.now_or_never().expect("a turn freed").expect("b2");
        drop((a3, b1, b2));
        assert!(limits.per_user.lock().expect("lock").is_empty());
    }

    #[test]
    fn a_turn_tried_now_is_refused_over_either_cap_and_holds_nothing() {
        let limits = ReplayLimits::new(2, Family::default());
        let a1 = limits.try_turn("a", Asker::ReadMessage).expect("a1");
        let b1 = limits.try_turn("b", Asker::ReadMessage).expect("b1");
        assert_eq!(
            limits.try_turn("c", Asker::ReadMessage).err(),
            Some(Busy::Total)
        );
        let a2 = limits.try_turn("a", Asker::ReadMessage);
        assert_eq!(
            a2.err(),
            Some(Busy::Total),
            "a's second place, but no permit"
        );
        drop(b1);
        let a2 = limits.try_turn("a", Asker::ReadMessage).expect("a2");
        drop(a2);
        let a2 = limits.try_turn("a", Asker::ReadMessage).expect("a2 again");
        assert_eq!(
            limits.try_turn("a", Asker::ReadMessage).err(),
            Some(Busy::User)
        );
        drop((a1, a2));
        assert!(
            limits.per_user.lock().expect("lock").is_empty(),
            "no place left taken"
        );
    }

    #[test]
    fn every_refusal_is_counted_by_what_asked() {
        let refused = Family::<TurnLabels, Counter>::default();
        let limits = ReplayLimits::new(1, refused.clone());
        let count = |asker: Asker| refused.get_or_create(&asker.labels()).get();
        assert!(Asker::ALL.iter().all(|&asker| count(asker) == 0));
        let held = limits.try_turn("a", Asker::Replay).expect("a turn");
        for asker in [Asker::ReadMessage, Asker::UnreadCount, Asker::ReadMessage] {
            assert_eq!(limits.try_turn("b", asker).err(), Some(Busy::Total));
        }
        assert_eq!(count(Asker::ReadMessage), 2);
        assert_eq!(count(Asker::UnreadCount), 1);
        assert_eq!(count(Asker::Replay), 0, "a turn given is not counted");
        drop(held);
    }
}
