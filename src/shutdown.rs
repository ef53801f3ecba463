//! The process's stop signal, cheap enough to wait on at every event.
//!
//! Every socket's task waits on shutdown in the same `select!` as its queue,
//! so the wait is polled again at each wake-up: at 1,000 sockets × 100
//! events/s, 100,000 polls a second from both workers. tokio_util's
//! `CancellationToken` takes its node's mutex at each poll, and a pending
//! `tokio::sync::Notify` wait takes the `Notify`'s; both are one lock for the
//! whole process, so each delivery paid two contended locks. Here a poll is one
//! atomic load: the `Notify` is polled only to register a task's waker (once,
//! or again if another task polls), and wakes every registered task at
//! [`Shutdown::cancel`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// A shared stop signal: cancelled once, seen by every clone.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<Inner>);

#[derive(Default)]
struct Inner {
    stopped: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Stops: every [`Shutdown::cancelled`], made before or after, completes.
    pub fn cancel(&self) {
        // The flag first: a wait made after `notify_waiters` sees it.
        if !self.0.stopped.swap(true, Ordering::SeqCst) {
            self.0.notify.notify_waiters();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }

    /// Completes once [`Shutdown::cancel`] has been called.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            // Made before the flag is first read (in `poll`): a
            // `notify_waiters` after this completes it, and one before it set
            // the flag first.
            notified: self.0.notify.notified(),
            stopped: &self.0.stopped,
            registered: None,
        }
    }
}

pin_project! {
    /// The future of [`Shutdown::cancelled`].
    pub struct Cancelled<'a> {
        #[pin]
        notified: Notified<'a>,
        stopped: &'a AtomicBool,
        // The waker the `Notify` holds: while the polling task's waker is
        // this one, there is nothing to register again.
        registered: Option<Waker>,
    }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.stopped.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if this
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        if this.notified.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BOUND: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_wait_made_before_the_cancel_completes() {
        let shutdown = Shutdown::new();
        let waiter = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.cancelled().await }
        });
        // Let the waiter register before the cancel.
        tokio::task::yield_now().await;
        assert!(!shutdown.is_cancelled());
        shutdown.cancel();
        tokio::time::timeout(BOUND, waiter)
            .await
            .expect("the wait completes")
            .expect("the waiter ran");
        assert!(shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn a_wait_made_after_the_cancel_completes_at_once() {
        let shutdown = Shutdown::new();
        shutdown.cancel();
        shutdown.cancel();
        tokio::time::timeout(BOUND, shutdown.cancelled())
            .await
            .expect("already cancelled");
    }

    #[tokio::test]
    async fn a_wait_polled_by_one_task_then_another_is_woken_in_the_second() {
        let shutdown: &'static Shutdown = Box::leak(Box::new(Shutdown::new()));
        let mut wait = Box::pin(shutdown.cancelled());
        async fn poll_once(wait: &mut Pin<Box<Cancelled<'static>>>) -> Poll<()> {
            std::future::poll_fn(|cx| Poll::Ready(wait.as_mut().poll(cx))).await
        }
        assert!(poll_once(&mut wait).await.is_pending());
        let (polled, was_polled) = tokio::sync::oneshot::channel();
        let other = tokio::spawn(async move {
            // Another task's waker: the wait must register it.
            assert!(poll_once(&mut wait).await.is_pending());
            let _ = polled.send(());
            wait.await
        });
        tokio::time::timeout(BOUND, was_polled)
            .await
            .expect("the other task polled in time")
            .expect("the other task ran");
        shutdown.cancel();
        tokio::time::timeout(BOUND, other)
            .await
            .expect("the cancel woke the other task")
            .expect("the other task ran");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_woken_by_other_things_still_sees_the_cancel() {
        // Like a socket's task: the wait is polled again at each of many
        // wake-ups that are not the cancel, then the cancel must end it.
        let shutdown = Shutdown::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let cancelled = shutdown.cancelled();
                tokio::pin!(cancelled);
                let mut seen = 0;
                loop {
                    tokio::select! {
                        biased;
                        () = &mut cancelled => return seen,
                        Some(_) = rx.recv() => seen += 1,
                    }
                }
            }
        });
        for n in 0..1000 {
            tx.send(n).await.expect("the task is waiting");
        }
        shutdown.cancel();
        let seen = tokio::time::timeout(BOUND, task)
            .await
            .expect("the cancel ends the task")
            .expect("the task ran");
        assert!(seen >= 999, "the task was woken by the queue ({seen})");
    }
}
