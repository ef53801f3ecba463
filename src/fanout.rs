//! The hub's queues: one publisher, many sockets, each socket reading at
//! its own pace from a bounded ring whose oldest frame the publisher
//! overwrites. A socket that falls a whole ring behind gets
//! [`RecvError::Lagged`] (the session then closes it with 4008); the
//! publisher never waits for anyone.
//!
//! `tokio::sync::broadcast` has these semantics, and pgrelay used it. There,
//! each receive takes the slot's lock and counts itself off the slot, and a
//! receive that finds the queue empty takes the channel's one mutex, twice in
//! a socket's turn: to see that nothing is left, and to register as a waiter.
//! A socket's task receives at every event and finds its queue empty at the
//! end of every batch, so each delivery took that process-wide mutex about
//! twice, contended by both workers and the publisher (perf at 1,000 sockets
//! × 100 events/s: the broadcast's functions ~9% of pgrelay's samples, the
//! most of any part of pgrelay). Here taking a frame is the slot's read lock
//! and a clone of the frame's pointer; finding the queue empty is one atomic
//! load; a socket with nothing to read registers its waker in its own
//! `AtomicWaker`, which the publisher wakes after moving `tail`.
//!
//! A frame is let go once every receiver has taken it, as with tokio's
//! broadcast, but without a count per slot (one more contended write per
//! delivery): each receiver publishes its position beside its waker, and
//! the publisher, which visits every receiver at each send to wake it, takes
//! the lowest and empties the slots below. So between sends a ring holds
//! what its slowest socket had yet to take at the last send (at most the
//! ring's length); a ring whose sockets keep up holds about one send's
//! frame.
//!
//! One publisher by construction: [`Sender::send`] takes `&mut self` (the
//! hub sends under its lock).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// A ring of `capacity` frames (at least 1), and its publishing end.
pub fn channel<T: Clone>(capacity: usize) -> Sender<T> {
    let slots = (0..capacity.max(1)).map(|_| RwLock::new(None)).collect();
    Sender {
        shared: Arc::new(Shared {
            slots,
            tail: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            readers: Mutex::new(Vec::new()),
        }),
        released: 0,
    }
}

/// The publishing end. Dropping it closes the ring: each receiver gets what
/// is left, then [`RecvError::Closed`].
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
    /// Positions below this are let go: their slots are empty, or hold
    /// later frames.
    released: u64,
}

/// A socket's end: its position in the ring.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// The position of the next frame this receiver takes.
    next: u64,
    reader: Arc<Reader>,
    /// Whether it left `readers` already.
    left: bool,
}

/// What the publisher sees of a receiver: where to wake it, and how far it
/// has read (`next`, published after each take).
struct Reader {
    waker: AtomicWaker,
    next: AtomicU64,
    /// Its place in `readers`: read and written under that lock only.
    index: AtomicUsize,
}

struct Shared<T> {
    slots: Box<[RwLock<Option<Slot<T>>>]>,
    /// The position of the next send: every position below it is written.
    tail: AtomicU64,
    /// Set by the sender's drop, after its last send.
    closed: AtomicBool,
    /// Every receiver, woken at each send: kept dense (a leaving receiver's
    /// place takes the last one), so a send visits the receivers there are,
    /// not as many as there ever were.
    readers: Mutex<Vec<Arc<Reader>>>,
}

struct Slot<T> {
    pos: u64,
    value: T,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// Frames were overwritten before this receiver took them: this many.
    /// The next receive takes the oldest frame the ring still holds.
    Lagged(u64),
    /// The sender is gone and every frame it sent was taken.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing new yet.
    Empty,
    Lagged(u64),
    Closed,
}

impl<T> Shared<T> {
    fn readers(&self) -> MutexGuard<'_, Vec<Arc<Reader>>> {
        // Plain data: a panic elsewhere while holding it leaves it whole.
        self.readers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every receiver; returns the lowest position any has yet to
    /// take (`tail` when there are none).
    fn wake_all(&self, tail: u64) -> u64 {
        let mut lowest = tail;
        for reader in self.readers().iter() {
            reader.waker.wake();
            lowest = lowest.min(reader.next.load(Ordering::Acquire));
        }
        lowest
    }

    fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    fn slot(&self, pos: u64) -> &RwLock<Option<Slot<T>>> {
        // The remainder is below `slots.len()`, a usize.
        &self.slots[(pos % self.capacity()) as usize]
    }
}

impl<T: Clone> Sender<T> {
    /// Puts `value` in the ring, over its oldest frame once full, wakes
    /// every waiting receiver, and lets go of the frames every receiver has
    /// taken. Never waits for a receiver (only, at most, for one that is
    /// copying the pointer out of a slot being written).
    pub fn send(&mut self, value: T) {
        let shared = &*self.shared;
        // Only this sender moves `tail`.
        let pos = shared.tail.load(Ordering::Relaxed);
        *shared.slot(pos).write().unwrap_or_else(|e| e.into_inner()) = Some(Slot { pos, value });
        shared.tail.store(pos + 1, Ordering::Release);
        let lowest = shared.wake_all(pos + 1);
        // Below `lowest` every receiver has taken its frame (a receiver
        // publishes its position after its clone), and below
        // `pos + 1 - capacity` the slots hold later frames already.
        let start = self
            .released
            .max((pos + 1).saturating_sub(shared.capacity()));
        for old in start..lowest {
            let mut slot = shared.slot(old).write().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|s| s.pos == old) {
                *slot = None;
            }
        }
        self.released = self.released.max(lowest);
    }

    /// A receiver that takes every frame sent from now on.
    pub fn subscribe(&self) -> Receiver<T> {
        let next = self.shared.tail.load(Ordering::Acquire);
        let mut readers = self.shared.readers();
        let reader = Arc::new(Reader {
            waker: AtomicWaker::new(),
            next: AtomicU64::new(next),
            index: AtomicUsize::new(readers.len()),
        });
        readers.push(Arc::clone(&reader));
        drop(readers);
        Receiver {
            shared: Arc::clone(&self.shared),
            next,
            reader,
            left: false,
        }
    }

    pub fn receiver_count(&self) -> usize {
        self.shared.readers().len()
    }

    /// Whether `rx` reads this sender's ring.
    pub fn same_channel(&self, rx: &Receiver<T>) -> bool {
        Arc::ptr_eq(&self.shared, &rx.shared)
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        // After the last `tail` store: a receiver that sees `closed` then
        // reads the final `tail`.
        self.shared.closed.store(true, Ordering::Release);
        self.shared
            .wake_all(self.shared.tail.load(Ordering::Relaxed));
    }
}

impl<T: Clone> Receiver<T> {
    /// The next frame, if one is there.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let closed = self.shared.closed.load(Ordering::Acquire);
        let tail = self.shared.tail.load(Ordering::Acquire);
        if self.next >= tail {
            return Err(if closed {
                TryRecvError::Closed
            } else {
                TryRecvError::Empty
            });
        }
        if tail - self.next > self.shared.capacity() {
            return Err(self.lagged(tail));
        }
        let taken = match &*self
            .shared
            .slot(self.next)
            .read()
            .unwrap_or_else(|e| e.into_inner())
        {
            Some(slot) if slot.pos == self.next => Ok(slot.value.clone()),
            // Overwritten since `tail` was read (a slot only ever takes a
            // later position). The publisher may not have moved `tail` past
            // the overwriting frame yet: the frame itself says how far it is.
            Some(slot) => Err(slot.pos + 1),
            // Not reached: `tail` passes a position only once its slot
            // holds it, and a slot is emptied only once every receiver is
            // past it.
            None => Err(self.next + 1),
        };
        match taken {
            Ok(value) => {
                self.next += 1;
                self.reader.next.store(self.next, Ordering::Release);
                Ok(value)
            }
            Err(written) => {
                let tail = self.shared.tail.load(Ordering::Acquire).max(written);
                Err(self.lagged(tail))
            }
        }
    }

    /// Moves past what was overwritten, to the oldest frame still held.
    fn lagged(&mut self, tail: u64) -> TryRecvError {
        let oldest = tail.saturating_sub(self.shared.capacity());
        let missed = oldest.saturating_sub(self.next);
        self.next = self.next.max(oldest);
        self.reader.next.store(self.next, Ordering::Release);
        TryRecvError::Lagged(missed)
    }

    /// The next frame, waiting for one. Cancel-safe: a frame is taken only
    /// by the poll that returns it.
    pub fn recv(&mut self) -> Recv<'_, T> {
        Recv { rx: self }
    }
}

impl<T> Receiver<T> {
    /// Stops counting as a receiver of the ring (and being woken), as a
    /// drop does: the hub leaves under its own lock, so that of two sockets
    /// leaving one ring at once, the second sees the first gone.
    pub fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        let mut readers = self.shared.readers();
        let index = self.reader.index.load(Ordering::Relaxed);
        readers.swap_remove(index);
        if let Some(moved) = readers.get(index) {
            moved.index.store(index, Ordering::Relaxed);
        }
        // After a storm the list gives back most of its room.
        let left = readers.len();
        if left < readers.capacity() / 4 {
            readers.shrink_to(left * 2);
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// The future of [`Receiver::recv`].
pub struct Recv<'a, T> {
    rx: &'a mut Receiver<T>,
}

impl<T: Clone> Future for Recv<'_, T> {
    type Output = Result<T, RecvError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let rx = &mut *self.rx;
        let taken = match rx.try_recv() {
            Err(TryRecvError::Empty) => {
                // Registered before looking again: a send after the look
                // wakes this waker.
                rx.reader.waker.register(cx.waker());
                rx.try_recv()
            }
            taken => taken,
        };
        match taken {
            Ok(value) => Poll::Ready(Ok(value)),
            Err(TryRecvError::Empty) => Poll::Pending,
            Err(TryRecvError::Lagged(n)) => Poll::Ready(Err(RecvError::Lagged(n))),
            Err(TryRecvError::Closed) => Poll::Ready(Err(RecvError::Closed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BOUND: Duration = Duration::from_secs(10);

    #[test]
    fn frames_come_in_order_and_a_late_receiver_starts_at_the_tail() {
        let mut tx = channel(4);
        let mut early = tx.subscribe();
        tx.send(1);
        tx.send(2);
        let mut late = tx.subscribe();
        tx.send(3);
        assert_eq!(early.try_recv(), Ok(1));
        assert_eq!(early.try_recv(), Ok(2));
        assert_eq!(early.try_recv(), Ok(3));
        assert_eq!(early.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(late.try_recv(), Ok(3));
        assert_eq!(late.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn a_receiver_a_whole_ring_behind_lags_then_reads_the_oldest_held() {
        let mut tx = channel(2);
        let mut rx = tx.subscribe();
        for n in 1..=5 {
            tx.send(n);
        }
        // 1, 2 and 3 were overwritten; 4 and 5 are held.
        assert_eq!(rx.try_recv(), Err(TryRecvError::Lagged(3)));
        assert_eq!(rx.try_recv(), Ok(4));
        assert_eq!(rx.try_recv(), Ok(5));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        // Exactly a ring behind is not behind.
        tx.send(6);
        tx.send(7);
        assert_eq!(rx.try_recv(), Ok(6));
        assert_eq!(rx.try_recv(), Ok(7));
    }

    #[test]
    fn a_frame_is_let_go_once_every_receiver_took_it() {
        let frames: Vec<Arc<u64>> = (0..4).map(Arc::new).collect();
        let held = |n: usize| Arc::strong_count(&frames[n]) > 1;
        let mut tx = channel(8);
        let mut fast = tx.subscribe();
        let mut slow = tx.subscribe();
        tx.send(Arc::clone(&frames[0]));
        tx.send(Arc::clone(&frames[1]));
        assert_eq!(fast.try_recv().as_deref(), Ok(&0));
        assert_eq!(fast.try_recv().as_deref(), Ok(&1));
        assert_eq!(slow.try_recv().as_deref(), Ok(&0));
        tx.send(Arc::clone(&frames[2]));
        // 0 was taken by both; 1 not yet by the slow one; 2 is new.
        assert!(!held(0));
        assert!(held(1));
        assert!(held(2));
        assert_eq!(slow.try_recv().as_deref(), Ok(&1));
        drop(slow);
        assert_eq!(fast.try_recv().as_deref(), Ok(&2));
        tx.send(Arc::clone(&frames[3]));
        assert!(!held(1));
        assert!(!held(2));
        // Taken by every receiver, the last send's frame stays until the
        // next send (the publisher lets go when it sends).
        assert_eq!(fast.try_recv().as_deref(), Ok(&3));
        assert!(held(3));
        drop(tx);
        assert!(held(3), "the receiver still shares the ring");
        drop(fast);
        assert!(!held(3));
    }

    #[test]
    fn dropping_the_sender_closes_after_what_is_left() {
        let mut tx = channel(4);
        let mut rx = tx.subscribe();
        tx.send(1);
        drop(tx);
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
    }

    /// Receivers leave in any order: each takes its own place with it, the
    /// others are still woken, and the list's room follows their number.
    #[tokio::test]
    async fn receivers_leave_in_any_order_and_the_rest_are_still_woken() {
        let mut tx = channel::<u32>(4);
        let mut many: Vec<_> = (0..100).map(|_| tx.subscribe()).collect();
        let kept = many.swap_remove(50);
        // From the front, the back and the middle.
        drop(many.remove(0));
        drop(many.pop());
        drop(many.remove(40));
        assert_eq!(tx.receiver_count(), 97);
        drop(many);
        assert_eq!(tx.receiver_count(), 1);
        assert!(
            tx.shared.readers().capacity() < 8,
            "the room was given back"
        );
        let mut kept = kept;
        let reader = tokio::spawn(async move { kept.recv().await });
        tokio::task::yield_now().await;
        tx.send(9);
        let got = tokio::time::timeout(BOUND, reader)
            .await
            .expect("the last receiver was woken")
            .expect("the reader ran");
        assert_eq!(got, Ok(9));
    }

    #[test]
    fn receivers_are_counted_until_dropped() {
        let tx = channel::<u8>(1);
        let a = tx.subscribe();
        let b = tx.subscribe();
        assert_eq!(tx.receiver_count(), 2);
        assert!(tx.same_channel(&a));
        assert!(!channel::<u8>(1).same_channel(&a));
        drop(a);
        assert_eq!(tx.receiver_count(), 1);
        drop(b);
        assert_eq!(tx.receiver_count(), 0);
    }

    #[tokio::test]
    async fn recv_waits_for_a_send_and_for_the_close() {
        let mut tx = channel(4);
        let mut rx = tx.subscribe();
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::task::yield_now().await;
        tx.send(7u32);
        drop(tx);
        let (first, second) = tokio::time::timeout(BOUND, reader)
            .await
            .expect("woken in time")
            .expect("the reader ran");
        assert_eq!(first, Ok(7));
        assert_eq!(second, Err(RecvError::Closed));
    }

    /// A receiver racing a publisher that laps it, over and over: every
    /// frame is either taken, in order, or counted in a `Lagged`, and no
    /// `Lagged` counts nothing.
    #[test]
    fn a_lapped_receiver_accounts_for_every_frame() {
        const FRAMES: u64 = 2_000_000;
        let mut tx = channel(4);
        let mut rx = tx.subscribe();
        let sender = std::thread::spawn(move || {
            for n in 0..FRAMES {
                tx.send(n);
            }
        });
        let (mut taken, mut missed, mut last) = (0, 0, None);
        loop {
            match rx.try_recv() {
                Ok(n) => {
                    assert!(last.is_none_or(|last| n > last), "out of order");
                    last = Some(n);
                    taken += 1;
                }
                Err(TryRecvError::Lagged(n)) => {
                    assert!(n > 0, "a lag of nothing");
                    missed += n;
                }
                Err(TryRecvError::Empty) => std::hint::spin_loop(),
                Err(TryRecvError::Closed) => break,
            }
        }
        sender.join().expect("the sender ran");
        assert_eq!(taken + missed, FRAMES);
    }

    /// Send, then wait until every receiver has the frame, a few thousand
    /// times: a wake-up lost between a receiver's look and its registering
    /// leaves that receiver asleep, and the wait times out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receivers_in_lockstep_are_woken_for_every_frame() {
        const FRAMES: u32 = 3_000;
        const RECEIVERS: usize = 8;
        let mut tx = channel(4);
        let (ack, acks) = std::sync::mpsc::channel();
        for _ in 0..RECEIVERS {
            let mut rx = tx.subscribe();
            let ack = ack.clone();
            tokio::spawn(async move {
                while let Ok(n) = rx.recv().await {
                    if ack.send(n).is_err() {
                        return;
                    }
                }
            });
        }
        let sender = tokio::task::spawn_blocking(move || {
            for n in 0..FRAMES {
                tx.send(n);
                for _ in 0..RECEIVERS {
                    let got = acks.recv_timeout(BOUND).expect("every receiver woken");
                    assert_eq!(got, n);
                }
            }
        });
        tokio::time::timeout(BOUND * 2, sender)
            .await
            .expect("in time")
            .expect("the sender ran");
    }

    /// Many receivers on other threads, each polled like a socket's task
    /// (a receive, then try_recv until empty), get every frame once, in
    /// order, while the sender runs ahead of them: no wake-up is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_receiver_gets_every_frame_in_order_across_threads() {
        const FRAMES: u64 = 20_000;
        const RECEIVERS: usize = 50;
        let mut tx = channel(FRAMES as usize);
        let readers: Vec<_> = (0..RECEIVERS)
            .map(|_| {
                let mut rx = tx.subscribe();
                tokio::spawn(async move {
                    let mut expected = 0;
                    while expected < FRAMES {
                        let first = rx.recv().await.expect("no lag, no close");
                        assert_eq!(first, expected);
                        expected += 1;
                        while let Ok(n) = rx.try_recv() {
                            assert_eq!(n, expected);
                            expected += 1;
                        }
                    }
                    expected
                })
            })
            .collect();
        let sender = tokio::task::spawn_blocking(move || {
            for n in 0..FRAMES {
                tx.send(n);
                // Pauses, so that the readers catch up and wait, and
                // sends race with their registering.
                if n % 100 == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            tx
        });
        let _tx = tokio::time::timeout(BOUND, sender)
            .await
            .expect("sent in time")
            .expect("the sender ran");
        for reader in readers {
            let got = tokio::time::timeout(BOUND, reader)
                .await
                .expect("every frame arrived in time")
                .expect("the reader ran");
            assert_eq!(got, FRAMES);
        }
    }
}
