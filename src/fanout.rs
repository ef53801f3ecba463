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
//! One publisher by construction: [`Sender::send`] takes `&mut self` (the
//! hub sends under its lock).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use slab::Slab;

/// A ring of `capacity` frames (at least 1), and its publishing end.
pub fn channel<T: Clone>(capacity: usize) -> Sender<T> {
    let slots = (0..capacity.max(1)).map(|_| RwLock::new(None)).collect();
    Sender {
        shared: Arc::new(Shared {
            slots,
            tail: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            waiters: Mutex::new(Slab::new()),
        }),
    }
}

/// The publishing end. Dropping it closes the ring: each receiver gets what
/// is left, then [`RecvError::Closed`].
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// A socket's end: its position in the ring.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// The position of the next frame this receiver takes.
    next: u64,
    waker: Arc<AtomicWaker>,
    /// Its entry in `waiters`.
    key: usize,
}

struct Shared<T> {
    slots: Box<[RwLock<Option<Slot<T>>>]>,
    /// The position of the next send: every position below it is written.
    tail: AtomicU64,
    /// Set by the sender's drop, after its last send.
    closed: AtomicBool,
    /// Every receiver's waker, woken at each send.
    waiters: Mutex<Slab<Arc<AtomicWaker>>>,
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
    fn waiters(&self) -> MutexGuard<'_, Slab<Arc<AtomicWaker>>> {
        // Plain data: a panic elsewhere while holding it leaves it whole.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_all(&self) {
        for (_, waker) in self.waiters().iter() {
            waker.wake();
        }
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
    /// Puts `value` in the ring, over its oldest frame once full, and wakes
    /// every waiting receiver. Never waits for a receiver (only, at most, for
    /// one that is copying the pointer out of the slot being overwritten).
    pub fn send(&mut self, value: T) {
        let shared = &*self.shared;
        // Only this sender moves `tail`.
        let pos = shared.tail.load(Ordering::Relaxed);
        *shared.slot(pos).write().unwrap_or_else(|e| e.into_inner()) = Some(Slot { pos, value });
        shared.tail.store(pos + 1, Ordering::Release);
        shared.wake_all();
    }

    /// A receiver that takes every frame sent from now on.
    pub fn subscribe(&self) -> Receiver<T> {
        let waker = Arc::new(AtomicWaker::new());
        let key = self.shared.waiters().insert(Arc::clone(&waker));
        Receiver {
            shared: Arc::clone(&self.shared),
            next: self.shared.tail.load(Ordering::Acquire),
            waker,
            key,
        }
    }

    pub fn receiver_count(&self) -> usize {
        self.shared.waiters().len()
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
        self.shared.wake_all();
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
            Some(slot) if slot.pos == self.next => Some(slot.value.clone()),
            _ => None,
        };
        match taken {
            Some(value) => {
                self.next += 1;
                Ok(value)
            }
            // Overwritten since `tail` was read: `tail` passes a position
            // only once its slot holds it, and a slot only ever takes a
            // later position.
            None => Err(self.lagged(self.shared.tail.load(Ordering::Acquire))),
        }
    }

    /// Moves past what was overwritten, to the oldest frame still held.
    fn lagged(&mut self, tail: u64) -> TryRecvError {
        let oldest = tail.saturating_sub(self.shared.capacity());
        let missed = oldest.saturating_sub(self.next);
        self.next = self.next.max(oldest);
        TryRecvError::Lagged(missed)
    }

    /// The next frame, waiting for one. Cancel-safe: a frame is taken only
    /// by the poll that returns it.
    pub fn recv(&mut self) -> Recv<'_, T> {
        Recv { rx: self }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.waiters().try_remove(self.key);
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
                rx.waker.register(cx.waker());
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
    fn dropping_the_sender_closes_after_what_is_left() {
        let mut tx = channel(4);
        let mut rx = tx.subscribe();
        tx.send(1);
        drop(tx);
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
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
