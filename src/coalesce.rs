//! A socket's write side: a queue of byte chunks that a flush sends with
//! vectored writes and then gives back, so that a batch of frames costs one
//! `writev` and an idle socket holds no write buffer (tungstenite's own
//! buffer never shrinks, so it is switched off: see `server`).
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

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes queued before a write through `AsyncWrite` forces a send even
/// without a flush (the session flushes every batch; this only bounds a
/// writer that does not).
const MAX_QUEUED: usize = 64 * 1024;
/// Chunks per `writev` (the kernel takes up to 1,024).
const MAX_SLICES: usize = 64;

pub struct Coalesce<T> {
    io: T,
    chunks: VecDeque<Bytes>,
    queued: usize,
}

impl<T> Coalesce<T> {
    pub fn new(io: T) -> Coalesce<T> {
        Coalesce {
            io,
            chunks: VecDeque::new(),
            queued: 0,
        }
    }

    /// Queues a shared buffer, whole, to go out at the next flush.
    pub fn queue(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.queued += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Drops the first `n` queued bytes, which the kernel took.
    fn consume(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (slice, chunk) in slices.iter_mut().zip(&self.chunks) {
                *slice = IoSlice::new(chunk);
                count += 1;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(n);
        }
        // Everything is out: free the queue (the next batch allocates anew).
        self.chunks = VecDeque::new();
        Poll::Ready(Ok(()))
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
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.queued + data.len() > MAX_QUEUED {
            ready!(this.poll_drain(cx))?;
        }
        this.queue(Bytes::copy_from_slice(data));
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Shared chunks and copied writes come out whole and in order, however
    /// little the reader takes at a time (partial vectored writes).
    #[tokio::test]
    async fn queued_and_written_bytes_come_out_in_order_through_partial_writes() {
        let (near, mut far) = tokio::io::duplex(7);
        let mut out = Coalesce::new(near);
        let mut expected = Vec::new();
        for i in 0..200u32 {
            let chunk = format!("<frame {i}>");
            expected.extend_from_slice(chunk.as_bytes());
            if i % 3 == 0 {
                out.write_all(chunk.as_bytes()).await.expect("write");
            } else {
                out.queue(Bytes::from(chunk));
            }
        }
        let reader = tokio::spawn(async move {
            let mut got = vec![0; expected.len()];
            far.read_exact(&mut got).await.map(|_| (got, expected))
        });
        out.flush().await.expect("flush");
        assert_eq!(out.queued, 0);
        assert!(out.chunks.is_empty());
        let (got, expected) = reader.await.expect("join").expect("read");
        assert_eq!(got, expected);
    }
}
