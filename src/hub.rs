//! Audience -> live subscribers. Each event is serialised once, before the
//! hub's lock is taken, into a shared [`Delivery`] and handed to every socket
//! that may see it without copying. The lock covers `last_id` and the pushes
//! into the rings, nothing else.
//!
//! Queues: one ring (`fanout`) for the dashboard, one per
//! connected user and one per open key of a configured stream (a
//! [`Ring`]), each keyed ring created with its first socket and removed with
//! its last. A ring is each socket's bounded queue; overflow policy: the publisher
//! never waits, it overwrites the oldest frame, and a socket that falls a whole
//! ring behind sees `Lagged` and is closed with 4008 (it resumes losslessly
//! from its last id). So a slow socket can never delay the listener or
//! another socket.
//!
//! `last_id` is the newest id the listener has handed to the hub. It is read
//! together with subscribing, under one lock, so a new socket gets every event
//! above the `last_id` it reports in `hello`: no gap at connect.
//!
//! Every event is also appended to `recent` (the newest events, for
//! replays), before its lock moves `last_id`, and `restart` empties it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fanout::{self, Receiver, Sender};
use crate::parse::Event;
use crate::recent::{Kept, Recent};
use crate::route::Targets;
use crate::wire::EventFrame;

/// What the hub hands each socket that may see an event: its frame, built
/// once and shared (one pointer, so a ring's slots stay small).
pub type Delivery = EventFrame;

/// Queue sizes, in frames.
#[derive(Debug, Clone, Copy)]
pub struct QueueSizes {
    pub dashboard: usize,
    pub user: usize,
    /// Each open key of a stream (`/ws/businesses/42/`).
    pub stream: usize,
}

pub struct Hub {
    state: Mutex<State>,
    /// The newest events, for replays (`recent`): appended before
    /// `last_id` moves, so it always reaches `last_id`.
    recent: Recent<Delivery>,
    dashboard_queue: usize,
    user_queue: usize,
    stream_queue: usize,
}

struct State {
    last_id: i64,
    dashboard: Sender<Delivery>,
    users: HashMap<String, Sender<Delivery>>,
    /// (stream index, key) -> ring.
    streams: HashMap<(usize, String), Sender<Delivery>>,
}

/// A keyed ring: one user's, or one key of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ring {
    User(String),
    Stream(usize, String),
}

impl State {
    fn ring(&self, ring: &Ring) -> Option<&Sender<Delivery>> {
        match ring {
            Ring::User(user) => self.users.get(user),
            Ring::Stream(index, key) => self.streams.get(&(*index, key.clone())),
        }
    }

    fn remove(&mut self, ring: &Ring) {
        match ring {
            Ring::User(user) => self.users.remove(user),
            Ring::Stream(index, key) => self.streams.remove(&(*index, key.clone())),
        };
    }
}

/// A socket's place in the hub: the `last_id` at the moment it subscribed and
/// its queue. Dropping it unsubscribes.
pub struct Subscription {
    pub last_id: i64,
    pub rx: Receiver<Delivery>,
    keyed: Option<(Arc<Hub>, Ring)>,
}

impl Hub {
    pub fn new(sizes: QueueSizes, recent: Recent<Delivery>) -> Arc<Hub> {
        let dashboard_queue = sizes.dashboard.max(1);
        Arc::new(Hub {
            state: Mutex::new(State {
                last_id: 0,
                dashboard: fanout::channel(dashboard_queue),
                users: HashMap::new(),
                streams: HashMap::new(),
            }),
            recent,
            dashboard_queue,
            user_queue: sizes.user.max(1),
            stream_queue: sizes.stream.max(1),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest events handed to the hub.
    pub fn recent(&self) -> &Recent<Delivery> {
        &self.recent
    }

    /// The newest id handed to the hub.
    pub fn last_id(&self) -> i64 {
        self.state().last_id
    }

    /// Moves `last_id` forward without an event (the log's newest id at
    /// start). Never moves it back.
    pub fn advance(&self, id: i64) {
        let mut state = self.state();
        state.last_id = state.last_id.max(id);
    }

    /// The log went back (restore, failover, reinstall): drops every queue,
    /// so every socket sees its queue closed and is told to reconnect, and
    /// starts again from `last_id`.
    pub fn restart(&self, last_id: i64) {
        // Emptied first: no socket subscribes at the new `last_id` while
        // memory still holds the old log.
        self.recent.reset(last_id);
        let mut state = self.state();
        state.last_id = last_id;
        state.dashboard = fanout::channel(self.dashboard_queue);
        state.users.clear();
        state.streams.clear();
    }

    /// Hands one event to its audiences. Never waits. The frame is built
    /// before the lock is taken: under it, only `last_id` moves and the
    /// shared bytes are pushed into the rings, so a subscribe or unsubscribe
    /// never waits for a serialisation.
    pub fn publish(&self, event: &Event, targets: &Targets) {
        let delivery = targets.any().then(|| Delivery::of(event));
        self.recent.push(event.id, delivery.as_ref(), targets);
        let mut state = self.state();
        state.last_id = state.last_id.max(event.id);
        let Some(delivery) = delivery else {
            return;
        };
        if targets.dashboard {
            state.dashboard.send(delivery.clone());
        }
        for user in &targets.users {
            if let Some(tx) = state.users.get_mut(user) {
                tx.send(delivery.clone());
            }
        }
        for target in &targets.streams {
            if let Some(tx) = state.streams.get_mut(target) {
                tx.send(delivery.clone());
            }
        }
    }

    pub fn subscribe_dashboard(&self) -> Subscription {
        let state = self.state();
        Subscription {
            last_id: state.last_id,
            rx: state.dashboard.subscribe(),
            keyed: None,
        }
    }

    /// A socket on a keyed ring (a user's, a stream key's), created if it
    /// is the first.
    pub fn subscribe(self: &Arc<Self>, ring: Ring) -> Subscription {
        let mut state = self.state();
        let rx = match &ring {
            Ring::User(user) => state
                .users
                .entry(user.clone())
                .or_insert_with(|| fanout::channel(self.user_queue))
                .subscribe(),
            Ring::Stream(index, key) => state
                .streams
                .entry((*index, key.clone()))
                .or_insert_with(|| fanout::channel(self.stream_queue))
                .subscribe(),
        };
        Subscription {
            last_id: state.last_id,
            rx,
            keyed: Some((Arc::clone(self), ring)),
        }
    }

    /// Users with at least one socket.
    #[cfg(test)]
    pub fn connected_users(&self) -> usize {
        self.state().users.len()
    }
}

impl Subscription {
    /// Leaves the hub, as a drop does (once): a keyed ring goes with its
    /// last socket. The queue leaves under the hub's lock, so that of two
    /// sockets leaving at once, the second to take the lock sees the first
    /// gone and removes the ring. After a restart the entry may be a new
    /// channel: that one stays.
    fn leave(&mut self) {
        if let Some((hub, ring)) = self.keyed.take() {
            let mut state = hub.state();
            self.rx.leave();
            if state
                .ring(&ring)
                .is_some_and(|tx| tx.receiver_count() == 0 && tx.same_channel(&self.rx))
            {
                state.remove(&ring);
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.leave();
    }
}

/// What `recent` keeps of an event: its delivery, bytes shared with the
/// rings.
impl Kept for Delivery {
    fn of(event: &Event) -> Delivery {
        Delivery::of(event)
    }
    fn id(&self) -> i64 {
        EventFrame::id(self)
    }
    fn bytes(&self) -> usize {
        self.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn event(id: i64) -> Event {
        Event {
            id,
            channel: "c".into(),
            table: "t".into(),
            op: "INSERT".into(),
            at: "x".into(),
            data: RawValue::from_string("{}".into()).expect("json"),
        }
    }

    fn hub() -> Arc<Hub> {
        Hub::new(
            QueueSizes {
                dashboard: 4,
                user: 2,
                stream: 2,
            },
            Recent::new(0),
        )
    }

    #[test]
    fn subscribers_get_only_their_audience() {
        let hub = hub();
        let mut dash = hub.subscribe_dashboard();
        let mut alice = hub.subscribe(Ring::User("alice".into()));
        let mut bob = hub.subscribe(Ring::User("bob".into()));
        hub.publish(
            &event(1),
            &Targets {
                dashboard: false,
                users: vec!["alice".into()],
                streams: vec![],
            },
        );
        assert_eq!(alice.rx.try_recv().map(|d| d.id()).ok(), Some(1));
        assert!(bob.rx.try_recv().is_err());
        assert!(dash.rx.try_recv().is_err());
        assert_eq!(hub.last_id(), 1);
        assert_eq!(hub.subscribe_dashboard().last_id, 1);
        // An event for nobody is not serialised, and still moves `last_id`.
        hub.publish(&event(2), &Targets::default());
        assert_eq!(hub.last_id(), 2);
        assert!(alice.rx.try_recv().is_err());
        assert!(dash.rx.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_lags_instead_of_blocking() {
        let hub = hub();
        let mut alice = hub.subscribe(Ring::User("alice".into()));
        let to_alice = Targets {
            dashboard: false,
            users: vec!["alice".into()],
            streams: vec![],
        };
        for id in 1..=3 {
            hub.publish(&event(id), &to_alice);
        }
        assert!(matches!(
            alice.rx.try_recv(),
            Err(fanout::TryRecvError::Lagged(1))
        ));
    }

    #[test]
    fn restart_closes_every_queue_and_old_sockets_leave_new_ones_alone() {
        let hub = hub();
        let mut dash = hub.subscribe_dashboard();
        let mut old = hub.subscribe(Ring::User("alice".into()));
        hub.publish(
            &event(10),
            &Targets {
                dashboard: true,
                users: vec![],
                streams: vec![],
            },
        );
        hub.restart(3);
        assert_eq!(hub.last_id(), 3);
        let _ = dash.rx.try_recv();
        assert!(matches!(
            dash.rx.try_recv(),
            Err(fanout::TryRecvError::Closed)
        ));
        assert!(matches!(
            old.rx.try_recv(),
            Err(fanout::TryRecvError::Closed)
        ));
        let mut new = hub.subscribe(Ring::User("alice".into()));
        drop(old);
        assert_eq!(
            hub.connected_users(),
            1,
            "the old socket left the new queue in place"
        );
        hub.publish(
            &event(4),
            &Targets {
                dashboard: false,
                users: vec!["alice".into()],
                streams: vec![],
            },
        );
        assert_eq!(new.rx.try_recv().map(|d| d.id()).ok(), Some(4));
    }

    /// Two sockets of one user leaving at once, on two workers: the
    /// second takes the hub's lock after the first, before the first's
    /// queue is dropped. The ring goes all the same.
    #[test]
    fn sockets_leaving_at_once_remove_their_ring() {
        let hub = hub();
        let mut first = hub.subscribe(Ring::User("alice".into()));
        let mut second = hub.subscribe(Ring::User("alice".into()));
        first.leave();
        second.leave();
        assert_eq!(hub.connected_users(), 0, "a ring outlived its sockets");
        drop((first, second));
        assert_eq!(hub.connected_users(), 0);
    }

    #[test]
    fn last_socket_of_a_user_removes_the_queue() {
        let hub = hub();
        let first = hub.subscribe(Ring::User("alice".into()));
        let second = hub.subscribe(Ring::User("alice".into()));
        assert_eq!(hub.connected_users(), 1);
        drop(first);
        assert_eq!(hub.connected_users(), 1);
        drop(second);
        assert_eq!(hub.connected_users(), 0);
        hub.advance(9);
        hub.advance(3);
        assert_eq!(hub.last_id(), 9);
    }
}
