//! The ideal broadcaster, the child process of `--scenario ideal` (this
//! executable run with `--ideal-serve`): what fan-out costs when it does
//! nothing but fan out. Plain threads, no async runtime, no PostgreSQL, no
//! token check.
//!
//! - It binds 127.0.0.1:0 and prints the port on stdout (the one line it
//!   ever prints there).
//! - An accept thread answers each upgrade (tungstenite's server
//!   handshake, 5 s at most a read) and hands
//!   the socket, non-blocking with TCP_NODELAY, to writer thread i mod N.
//! - The main thread reads stdin: each line is a batch size B (1 to 1,000),
//!   sent by the parent when the batch is due on its schedule. It builds the
//!   batch once: B events with the next consecutive ids, each pgrelay's own
//!   frame (`EventFrame::of`, header included) for an INSERT into the
//!   demo's `businesses`, `at` the wall clock now, all in one buffer
//!   shared by every writer. End of stdin ends the process.
//! - A writer thread owns its sockets: on a new one it sends `hello`
//!   (`last_id`: the last id it has sent, so the socket gets every later
//!   one), on a batch one write a socket; batches that queued while it was
//!   writing go out together, one write a socket for all of them (a
//!   pgrelay socket's queue coalesces the same way). A partial or refused
//!   write keeps the rest in the socket's own pending bytes, written before
//!   the next batch or when epoll says the socket is writable: nothing is
//!   dropped, and nothing bounds the pending bytes (the bench's clients
//!   read everything). Client frames are read only for a close, answered with
//!   the same code before the socket is dropped.

use std::io::{self, BufRead, Cursor, Read, Write};
use std::net::{self, TcpListener};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_tungstenite::tungstenite;
use hyper_tungstenite::tungstenite::protocol::frame::coding::{Control, OpCode};
use hyper_tungstenite::tungstenite::protocol::frame::FrameHeader;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use pgrelay::parse::Event;
use pgrelay::wire::{self, Endpoint, EventFrame};
use serde_json::value::RawValue;

use crate::args::MAX_ROWS_PER_INSERT;
use crate::rawws::push_control;

/// The most a socket buffers of what its client sends before it is
/// dropped (the bench's client sends a close, a few bytes).
const MAX_INBOX: usize = 64 * 1024;

/// The writer's own token for its waker; sockets are numbered from 0.
const WAKE: Token = Token(usize::MAX);

/// Serves until stdin ends, with `threads` writer threads.
pub(crate) fn serve(threads: usize) -> io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut stdout = io::stdout();
    writeln!(stdout, "{}", listener.local_addr()?.port())?;
    stdout.flush()?;
    let writers: Arc<[Writer]> = (0..threads.max(1))
        .map(|_| Writer::spawn())
        .collect::<io::Result<Vec<_>>>()?
        .into();
    let for_accept = Arc::clone(&writers);
    std::thread::Builder::new()
        .name("ideal-accept".into())
        .spawn(move || accept(&listener, &for_accept))?;
    let mut next_id = 1;
    for line in io::stdin().lock().lines() {
        let size = line?
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|size| (1..=MAX_ROWS_PER_INSERT).contains(size))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "a batch size from 1 to 1000")
            })?;
        let size = i64::from(size);
        let batch = Arc::new(build_batch(next_id, size, SystemTime::now())?);
        next_id += size;
        for writer in writers.iter() {
            writer.send(Command::Batch(Arc::clone(&batch)))?;
        }
    }
    Ok(())
}

/// One batch, built once and written as it is to every socket.
struct Batch {
    last_id: i64,
    frames: Vec<u8>,
}

/// Events `first`, `first + 1`, ... (`size` of them), `at` `now`: their
/// WebSocket frames end to end.
fn build_batch(first: i64, size: i64, now: SystemTime) -> io::Result<Batch> {
    let at = humantime::format_rfc3339_micros(now).to_string();
    // The row's timestamps as PostgreSQL writes a timestamptz in jsonb.
    let stamp = at.replace('Z', "+00:00");
    let mut frames = Vec::with_capacity(400 * size as usize);
    for id in first..first + size {
        // The demo `businesses` row as `to_jsonb` lays it out (shorter keys
        // first), owner 1 as in the load scenario's dashboard runs.
        let row = format!(
            r#"{{"id": {id}, "name": "bench business", "owner_id": 1, "created_at": "{stamp}", "updated_at": "{stamp}", "description": ""}}"#
        );
        let event = Event {
            id,
            channel: "business_events".into(),
            table: "businesses".into(),
            op: "INSERT".into(),
            at: at.clone(),
            data: RawValue::from_string(row)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
        };
        frames.extend_from_slice(EventFrame::of(&event).websocket());
    }
    Ok(Batch {
        last_id: first + size - 1,
        frames,
    })
}

/// Accepts until the writers are gone; a failed handshake costs only its
/// socket, an accept error (out of descriptors) a pause.
fn accept(listener: &TcpListener, writers: &[Writer]) {
    let mut next = 0;
    for tcp in listener.incoming() {
        let tcp = match tcp {
            Ok(tcp) => tcp,
            Err(e) => {
                eprintln!("ideal: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Ok(tcp) = upgrade(tcp) else {
            continue;
        };
        if writers[next % writers.len()]
            .send(Command::Socket(tcp))
            .is_err()
        {
            return;
        }
        next += 1;
    }
}

/// The server side of the upgrade, by tungstenite, blocking (5 s at most
/// a read). The socket comes back non-blocking with TCP_NODELAY.
fn upgrade(tcp: net::TcpStream) -> io::Result<net::TcpStream> {
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let tcp = tungstenite::accept(tcp)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        .into_inner();
    tcp.set_nodelay(true)?;
    tcp.set_nonblocking(true)?;
    Ok(tcp)
}

enum Command {
    Socket(net::TcpStream),
    Batch(Arc<Batch>),
}

/// A writer thread's door: its commands, and the waker that ends its
/// poll.
struct Writer {
    commands: Sender<Command>,
    waker: Arc<Waker>,
}

impl Writer {
    fn spawn() -> io::Result<Writer> {
        let (commands, receiver) = mpsc::channel();
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        std::thread::Builder::new()
            .name("ideal-writer".into())
            .spawn(move || {
                if let Err(e) = write_loop(poll, &receiver) {
                    eprintln!("ideal: a writer thread failed: {e}");
                }
            })?;
        Ok(Writer { commands, waker })
    }

    /// An error when the thread is gone.
    fn send(&self, command: Command) -> io::Result<()> {
        self.commands
            .send(command)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "a writer thread ended"))?;
        self.waker.wake()
    }
}

/// A writer thread: its sockets (indexed by their token, never reused, so
/// a stale readiness finds an empty slot) and the last id sent. mio's
/// registrations are edge-triggered: a socket with nothing pending costs no
/// wake-up however often it could be written.
fn write_loop(mut poll: Poll, commands: &Receiver<Command>) -> io::Result<()> {
    let mut peers: Vec<Option<Peer>> = Vec::new();
    let mut last_id = 0;
    let mut events = Events::with_capacity(1024);
    loop {
        match poll.poll(&mut events, None) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            polled => polled?,
        }
        for event in &events {
            if event.token() == WAKE {
                // The batches that came while this thread was writing go
                // out together, one write a socket (as a pgrelay socket's
                // queue does); a new socket waits for those before it.
                let mut due = Vec::new();
                loop {
                    match commands.try_recv() {
                        Ok(Command::Batch(batch)) => {
                            due.extend_from_slice(&batch.frames);
                            last_id = batch.last_id;
                        }
                        Ok(Command::Socket(tcp)) => {
                            broadcast(poll.registry(), &mut peers, &mut due);
                            let text =
                                wire::hello(&Endpoint::Dashboard, "ideal", last_id, "ideal", None);
                            let hello = EventFrame::new(0, false, text);
                            let mut peer = Peer::new(TcpStream::from_std(tcp));
                            // Registered once it took its hello (a socket
                            // that failed it is dropped unregistered);
                            // registering reports its readiness now.
                            if peer.send(hello.websocket()).is_ok() {
                                poll.registry().register(
                                    &mut peer.tcp,
                                    Token(peers.len()),
                                    Interest::READABLE | Interest::WRITABLE,
                                )?;
                                peers.push(Some(peer));
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return Ok(()),
                    }
                }
                broadcast(poll.registry(), &mut peers, &mut due);
                continue;
            }
            let Some(slot) = peers.get_mut(event.token().0) else {
                continue;
            };
            let keep = slot.as_mut().is_some_and(|peer| {
                let heard = event.is_readable() || event.is_read_closed() || event.is_error();
                let open = !heard || peer.read_client() == Inbound::Open;
                open && (!event.is_writable() || peer.flush().is_ok())
            });
            if !keep {
                forget(poll.registry(), slot);
            }
        }
    }
}

/// `bytes` to every socket, one write each; a socket that fails is
/// dropped. Leaves `bytes` empty.
fn broadcast(registry: &Registry, peers: &mut [Option<Peer>], bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        return;
    }
    for slot in peers.iter_mut() {
        if slot.as_mut().is_some_and(|p| p.send(bytes).is_err()) {
            forget(registry, slot);
        }
    }
    bytes.clear();
}

/// Drops a socket, deregistered first (mio's contract for a source).
fn forget(registry: &Registry, slot: &mut Option<Peer>) {
    if let Some(mut peer) = slot.take() {
        let _ = registry.deregister(&mut peer.tcp);
    }
}

/// One client socket.
struct Peer {
    tcp: TcpStream,
    /// What the socket has not taken yet, oldest first: `pending[sent..]`.
    pending: Vec<u8>,
    /// Bytes at the front of `pending` already written: moved out only once
    /// they are half of it, so a socket far behind costs about one move a
    /// byte written, not a move of all it has pending at every write.
    sent: usize,
    /// Client bytes not parsed yet (part of a frame at most).
    inbox: Vec<u8>,
}

#[derive(Debug, PartialEq)]
enum Inbound {
    Open,
    /// Closed, or answered a close: drop the socket.
    Done,
}

impl Peer {
    fn new(tcp: TcpStream) -> Peer {
        Peer {
            tcp,
            pending: Vec::new(),
            sent: 0,
            inbox: Vec::new(),
        }
    }

    /// `bytes` after what is pending: one write straight from `bytes` when
    /// nothing is, else the pending bytes first. An error: drop the socket.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.pending.extend_from_slice(bytes);
            return self.flush();
        }
        let written = write_some(&self.tcp, bytes)?;
        if written == bytes.len() {
            return Ok(());
        }
        // Written until it would block, as an edge-triggered source must
        // be for its next writable event.
        self.pending.extend_from_slice(&bytes[written..]);
        self.flush()
    }

    /// Writes pending bytes until the socket takes no more.
    fn flush(&mut self) -> io::Result<()> {
        while self.sent < self.pending.len() {
            match write_some(&self.tcp, &self.pending[self.sent..])? {
                0 => break,
                n => self.sent += n,
            }
        }
        if self.sent == self.pending.len() {
            self.pending.clear();
            self.sent = 0;
        } else if self.sent > self.pending.len() / 2 {
            self.pending.drain(..self.sent);
            self.sent = 0;
        }
        Ok(())
    }

    /// Reads what the client sent, all of it (the socket is
    /// edge-triggered); a close is answered with its code.
    fn read_client(&mut self) -> Inbound {
        let mut chunk = [0u8; 1024];
        loop {
            match (&self.tcp).read(&mut chunk) {
                Ok(0) => return Inbound::Done,
                Ok(n) => self.inbox.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Inbound::Done,
            }
            if self.inbox.len() > MAX_INBOX {
                return Inbound::Done;
            }
        }
        while let Some(frame) = ClientFrame::parse(&self.inbox) {
            if let Some(code) = frame.close {
                // After what is pending (the rest of a frame may be on
                // the wire already), as far as the socket takes it now.
                let mut close = Vec::new();
                let code = code.map(u16::to_be_bytes);
                push_control(
                    &mut close,
                    Control::Close,
                    code.as_ref().map_or(&[][..], |c| &c[..]),
                    false,
                );
                let _ = self.send(&close);
                return Inbound::Done;
            }
            self.inbox.drain(..frame.len);
        }
        Inbound::Open
    }
}

/// Writes what the socket takes of `bytes` (0 when it takes nothing now).
fn write_some(mut tcp: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        return match tcp.write(bytes) {
            Ok(0) if !bytes.is_empty() => Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

/// A complete client frame at the start of a buffer, its header read by
/// tungstenite: its length, and a close's code unmasked.
#[derive(Debug, PartialEq)]
struct ClientFrame {
    /// Header and payload.
    len: usize,
    /// `Some` for a close: its code, if it gave one.
    close: Option<Option<u16>>,
}

impl ClientFrame {
    /// `None` until the whole frame is in (or if its header is not one).
    fn parse(b: &[u8]) -> Option<ClientFrame> {
        let mut cursor = Cursor::new(b);
        let (header, payload) = FrameHeader::parse(&mut cursor).ok()??;
        let at = usize::try_from(cursor.position()).ok()?;
        let len = at.checked_add(usize::try_from(payload).ok()?)?;
        let body = b.get(at..len)?;
        let close = (header.opcode == OpCode::Control(Control::Close)).then(|| {
            let mask = header.mask.unwrap_or_default();
            match body {
                [hi, lo, ..] => Some(u16::from_be_bytes([hi ^ mask[0], lo ^ mask[1]])),
                _ => None,
            }
        });
        Some(ClientFrame { len, close })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{event_at_us, Frame};

    /// The text frames end to end in `b` (server frames: unmasked).
    fn texts(mut b: &[u8]) -> Vec<Vec<u8>> {
        let mut texts = Vec::new();
        while !b.is_empty() {
            assert_eq!(b[0], 0x81, "a final text frame");
            let (len, at) = match b[1] {
                126 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
                n => (usize::from(n), 2),
            };
            texts.push(b[at..at + len].to_vec());
            b = &b[at + len..];
        }
        texts
    }

    /// A socket whose client does not read keeps what it did not take, in
    /// order, and gives it all once the client reads; the bytes already
    /// written are moved out of the buffer, not kept for ever.
    #[test]
    fn a_socket_far_behind_gets_every_byte_in_order() {
        let listener = net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("non-blocking");
        let mut peer = Peer::new(TcpStream::from_std(server));
        // Chunks of 256 KiB until the kernel's buffers, which nobody reads,
        // are full and the peer holds at least 16 MiB itself (64 MiB in all
        // at least; tcp_rmem's and tcp_wmem's maximums are 32 and 4 MiB
        // here), at most 1 GiB.
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        while chunks.len() < 4096
            && (chunks.len() < 256 || peer.pending.len() - peer.sent < 16 << 20)
        {
            let chunk = vec![chunks.len() as u8; 256 << 10];
            peer.send(&chunk).expect("send");
            chunks.push(chunk);
        }
        assert!(
            peer.sent < peer.pending.len(),
            "the client took it all unread"
        );
        let total = chunks.iter().map(Vec::len).sum::<usize>() as u64;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            (&client).take(total).read_to_end(&mut got).map(|_| got)
        });
        // Flushed as the writer thread does: when epoll says writable.
        let mut poll = Poll::new().expect("poll");
        (poll.registry())
            .register(&mut peer.tcp, Token(0), Interest::WRITABLE)
            .expect("register");
        let mut events = Events::with_capacity(4);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !peer.pending.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "not flushed in 20 s");
            poll.poll(&mut events, Some(left)).expect("poll");
            peer.flush().expect("flush");
            assert!(peer.sent <= peer.pending.len() / 2 || peer.pending.is_empty());
        }
        // Closed: a reader short of bytes ends, and the comparison fails.
        drop(peer);
        let got = reader.join().expect("reader").expect("read");
        assert_eq!(got, chunks.concat());
    }

    #[test]
    fn a_batch_is_frames_the_bench_reads_like_pgrelays() {
        // 2026-11-25T18:40:00.123456Z
        let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_632_000_123_456);
        let batch = build_batch(41, 3, now).expect("batch");
        assert_eq!(batch.last_id, 43);
        let texts = texts(&batch.frames);
        assert_eq!(texts.len(), 3);
        for (text, id) in texts.iter().zip(41..) {
            let Frame::Event { id: read, rest } = Frame::parse(text) else {
                panic!("not an event: {}", String::from_utf8_lossy(text));
            };
            assert_eq!(read, id);
            assert_eq!(event_at_us(id, rest), Some(1_795_632_000_123_456));
        }
        // pgrelay's frame of the same row, keys and all.
        let frame: serde_json::Value = serde_json::from_slice(&texts[0]).expect("json");
        assert_eq!(
            frame,
            serde_json::json!({
                "type": "event", "id": 41, "channel": "business_events",
                "table": "businesses", "op": "INSERT", "at": "2026-11-25T18:40:00.123456Z",
                "data": {
                    "id": 41, "name": "bench business", "owner_id": 1,
                    "created_at": "2026-11-25T18:40:00.123456+00:00",
                    "updated_at": "2026-11-25T18:40:00.123456+00:00", "description": "",
                },
            })
        );
        // About the size of one of pgrelay's (its ids and timestamps).
        assert!((250..350).contains(&texts[0].len()), "{}", texts[0].len());
    }

    #[test]
    fn client_frames_and_close_codes() {
        // A masked close 1000 "bye", as the bench's client sends it.
        let mask = [1u8, 2, 3, 4];
        let payload = [0x03, 0xe8, b'b', b'y', b'e'];
        let mut close = vec![0x88, 0x80 | payload.len() as u8];
        close.extend_from_slice(&mask);
        close.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        let frame = ClientFrame {
            len: close.len(),
            close: Some(Some(1000)),
        };
        assert_eq!(ClientFrame::parse(&close), Some(frame));
        for cut in 0..close.len() {
            assert_eq!(ClientFrame::parse(&close[..cut]), None, "cut at {cut}");
        }
        // A pong of 200 bytes (a 16-bit length), then more.
        let mut pong = vec![0x8a, 0x80 | 126, 0, 200, 9, 9, 9, 9];
        pong.resize(8 + 200, 0);
        pong.push(0x88);
        let frame = ClientFrame::parse(&pong).expect("pong");
        assert_eq!((frame.len, frame.close), (208, None));
    }
}
