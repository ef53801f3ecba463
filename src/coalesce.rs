//! A socket's write side: a queue of byte chunks that a flush sends with
//! vectored writes and then gives back, so that a batch of frames costs one
//! `writev` (up to [`MAX_SLICES`] frames: a live batch; a replay page of 500
//! takes two) and an idle socket holds no write buffer, only room for a
//! few chunks' pointers (tungstenite's own buffer never shrinks, so it is
//! switched off: see `server`).
//!
//! Event frames are queued as the very buffers the hub shares between every
//! socket ([`Coalesce::queue`], `wire::EventFrame`): nothing is encoded or
//! copied per socket. What tungstenite writes through `AsyncWrite` (`hello`,
//! `reset`, pings, pongs, close frames) is copied into a chunk of its own.
//! With its write buffer off, tungstenite hands over each frame whole in one
//! write, which is always accepted here, so the queue holds whole frames in
//! the order they were written and the two kinds never interleave inside a
//! frame.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::wire::EventFrame;

/// Chunks per `writev` (the kernel takes up to 1,024): a live batch's
/// `MAX_BATCH` frames (`session`), and a chunk of tungstenite's.
const MAX_SLICES: usize = 257;
/// Chunks per `writev` of a small batch.
const FEW_SLICES: usize = 8;
/// Chunks a sent queue keeps room for: its first allocation's (96 bytes).
const KEEP_SLICES: usize = 4;

pub struct Coalesce<T> {
    io: T,
    chunks: VecDeque<Chunk>,
    /// Bytes of the first chunk the kernel took already.
    sent: usize,
}

/// Bytes waiting to go out: an event's shared frame, or a copy of what
/// tungstenite wrote.
enum Chunk {
    Shared(EventFrame),
    Copied(Box<[u8]>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(frame) => frame.websocket(),
            Chunk::Copied(bytes) => bytes,
        }
    }
}

impl<T> Coalesce<T> {
    pub fn new(io: T) -> Coalesce<T> {
        Coalesce {
            io,
            chunks: VecDeque::new(),
            sent: 0,
        }
    }

    /// Queues an event's frame, whole, to go out at the next flush.
    pub fn queue(&mut self, frame: EventFrame) {
        self.push(Chunk::Shared(frame));
    }

    fn push(&mut self, chunk: Chunk) {
        let len = chunk.bytes().len();
        if len > 0 {
            self.chunks.push_back(chunk);
        }
    }

    /// Drops the first `n` queued bytes, which the kernel took.
    fn consume(&mut self, n: usize) {
        self.sent += n;
        while let Some(front) = self.chunks.front() {
            let len = front.bytes().len();
            if self.sent < len {
                return;
            }
            self.sent -= len;
            self.chunks.pop_front();
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.chunks.is_empty() {
            // Most batches are a few frames: their slices are not worth
            // setting out a whole `MAX_SLICES` array for, on every flush.
            let n = if self.chunks.len() <= FEW_SLICES {
                ready!(self.poll_write_up_to::<FEW_SLICES>(cx))?
            } else {
                ready!(self.poll_write_up_to::<MAX_SLICES>(cx))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(n);
        }
        // Everything is out. A queue of a live batch's few slots is kept for
        // the next (no allocation per batch, which without thread caches
        // takes an arena lock); a larger one, a replay page's, is freed.
        if self.chunks.capacity() > KEEP_SLICES {
            self.chunks = VecDeque::new();
        }
        Poll::Ready(Ok(()))
    }

    /// One vectored write of the first `N` chunks at most.
    fn poll_write_up_to<const N: usize>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); N];
        let mut count = 0;
        for (i, (slice, chunk)) in slices.iter_mut().zip(&self.chunks).enumerate() {
            let skip = if i == 0 { self.sent } else { 0 };
            *slice = IoSlice::new(&chunk.bytes()[skip..]);
            count += 1;
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count])
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Always accepted whole, never `Pending`: tungstenite then never
        // keeps part of a frame back, which is what keeps its frames and the
        // queued events in order (see the module docs). The queue is bounded
        // by the caller, who flushes every batch (`session`: at most
        // `MAX_BATCH` live frames, or a replay page).
        let this = self.get_mut();
        this.push(Chunk::Copied(data.into()));
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A vectored writer that takes at most 7 bytes a call, across slices,
    /// so that one write ends chunks and stops inside a later one.
    #[derive(Default)]
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(data)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let mut room = 7;
            for slice in slices {
                let n = slice.len().min(room);
                this.0.extend_from_slice(&slice[..n]);
                room -= n;
            }
            Poll::Ready(Ok(7 - room))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Shared frames and copied writes come out whole and in order through
    /// partial vectored writes that end inside chunks and span several.
    #[tokio::test]
    async fn queued_and_written_bytes_come_out_in_order_through_partial_writes() {
        let mut out = Coalesce::new(Trickle::default());
        let mut expected = Vec::new();
        for i in 0..200u32 {
            let json = format!("\"frame {i}\"");
            if i % 3 == 0 {
                expected.extend_from_slice(json.as_bytes());
                out.write_all(json.as_bytes()).await.expect("write");
            } else {
                let frame = EventFrame::new(i64::from(i), false, json);
                expected.extend_from_slice(frame.websocket());
                out.queue(frame);
            }
        }
        tokio::time::timeout(Duration::from_secs(5), out.flush())
            .await
            .expect("flushed in time")
            .expect("flush");
        assert_eq!(out.sent, 0);
        assert!(out.chunks.is_empty());
        assert_eq!(out.io.0, expected);
        // A replay page's room is given back.
        assert_eq!(out.chunks.capacity(), 0);
    }

    /// A live batch of a few frames leaves its queue's room for the next:
    /// batch after batch allocates nothing.
    #[tokio::test]
    async fn a_small_batch_keeps_its_room() {
        let mut out = Coalesce::new(Trickle::default());
        for batch in 0..3 {
            for i in 0..KEEP_SLICES {
                out.queue(EventFrame::new(i as i64, false, format!("{batch}")));
            }
            tokio::time::timeout(Duration::from_secs(5), out.flush())
                .await
                .expect("flushed in time")
                .expect("flush");
            assert!(out.chunks.is_empty());
            assert_eq!(out.chunks.capacity(), KEEP_SLICES);
        }
    }
}
