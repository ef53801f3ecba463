//! Close handshakes pgrelay starts, against a careless client: one that keeps
//! sending after its violation (or through an expiry or a shutdown) while it
//! reads. The client must still receive the close frame with the code and
//! reason; a relay that drops TCP with the client's frames unread makes the
//! kernel answer with a reset, the frame is lost, and a browser reports 1006
//! with no reason. And a peer that never finishes the handshake is dropped
//! within the bound, whatever it sends.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitStream, StreamExt};
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{client_async, WebSocketStream};

use crate::harness::*;
use pgrelay::wire::Close;

/// A TCP stream that remembers the first reset or broken pipe it meets. A
/// relay that closes with the client's frames unread, or before the client
/// stopped sending, resets the connection; a browser whose send then fails
/// reports 1006, whether or not the close frame sits unread in its socket.
/// (tungstenite hides a reset that comes after a close frame, so the stream
/// is watched below it.)
struct Watched {
    io: TcpStream,
    reset: Arc<OnceLock<io::Error>>,
}

impl Watched {
    fn note<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &result {
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) {
                let _ = self.reset.set(io::Error::new(e.kind(), e.to_string()));
            }
        }
        result
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        this.note(result)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, data);
        this.note(result)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.note(result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_shutdown(cx);
        this.note(result)
    }
}

/// A client that, after `hello`, sends its violation, then `junk` again and
/// again (sixteen frames per write) while it reads, as a careless page might.
struct Careless {
    reader: SplitStream<WebSocketStream<Watched>>,
    sender: JoinHandle<()>,
    reset: Arc<OnceLock<io::Error>>,
    /// Frames sent so far.
    sent: Arc<AtomicUsize>,
}

impl Careless {
    async fn start(
        relay: &TestRelay,
        path: &str,
        token: &str,
        violation: Vec<Message>,
        junk: Message,
    ) -> Careless {
        let io = TcpStream::connect(relay.relay.addr())
            .await
            .expect("connect");
        let reset = Arc::new(OnceLock::new());
        let watched = Watched {
            io,
            reset: Arc::clone(&reset),
        };
        let mut request = relay.ws_url(path).into_client_request().expect("request");
        request.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&bearer(token)).expect("header"),
        );
        let (ws, _) = tokio::time::timeout(WAIT, client_async(request, watched))
            .await
            .expect("handshake timed out")
            .expect("handshake");
        let (mut sink, mut reader) = ws.split();
        let hello = tokio::time::timeout(WAIT, reader.next())
            .await
            .expect("timed out waiting for hello");
        assert!(
            matches!(&hello, Some(Ok(Message::Text(t))) if t.contains(r#""type":"hello""#)),
            "{hello:?}"
        );
        let sent = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&sent);
        let sender = tokio::spawn(async move {
            // Ends when a send fails: once the client has the relay's close
            // frame tungstenite refuses to send, or on a reset.
            let frames = violation.into_iter().chain(std::iter::repeat(junk));
            let mut batch = 0;
            for frame in frames {
                if sink.feed(frame).await.is_err() {
                    return;
                }
                batch += 1;
                if batch == 16 {
                    if sink.flush().await.is_err() {
                        return;
                    }
                    counted.fetch_add(batch, Ordering::SeqCst);
                    batch = 0;
                    tokio::task::yield_now().await;
                }
            }
        });
        Careless {
            reader,
            sender,
            reset,
            sent,
        }
    }

    /// Reads until the close frame and on to the end of the connection: the
    /// frame's code and reason. Panics if the socket ends without one, or if
    /// the relay reset the connection.
    async fn close_frame(mut self) -> (u16, String) {
        let read = async {
            let mut close = None;
            loop {
                match self.reader.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        close = Some(frame.map_or((1005, String::new()), |f| {
                            (u16::from(f.code), f.reason.to_string())
                        }));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return close.ok_or(e.to_string()),
                    None => return close.ok_or("end of stream".to_owned()),
                }
            }
        };
        let closed = tokio::time::timeout(WAIT, read)
            .await
            .expect("timed out waiting for the close frame and the end");
        let sent = self.sent.load(Ordering::SeqCst);
        self.sender.abort();
        let closed = closed.unwrap_or_else(|e| {
            panic!(
                "the socket ended without a close frame (a browser reports 1006) after \
                 {sent} junk frames: {e}"
            )
        });
        if let Some(e) = self.reset.get() {
            panic!(
                "the relay reset the connection (a browser whose send fails reports 1006) \
                 after {sent} junk frames, close frame {closed:?}: {e}"
            );
        }
        closed
    }
}

fn text(s: &str) -> Message {
    Message::text(s.to_owned())
}

fn pong() -> Message {
    Message::Pong(Default::default())
}

/// Junk of a realistic size: more than the relay reads from a socket at once.
fn junk(i: usize) -> Message {
    text(&format!(
        r#"{{"type":"subscribe","n":{i},"pad":"{}"}}"#,
        "x".repeat(400)
    ))
}

const NOTIFICATIONS: &str = "/ws/notifications/";

#[tokio::test]
async fn junk_text_frames_then_more_get_1008_with_its_reason() {
    let db = TestDb::demo("close_junk").await;
    let relay = TestRelay::start(&db).await;
    let five = (0..5).map(junk).collect();
    let careless = Careless::start(&relay, NOTIFICATIONS, &token("2", false), five, junk(5)).await;
    let (code, reason) = careless.close_frame().await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("unexpected message"), "{reason:?}");
}

/// Unsolicited pongs are junk the relay tolerates; the binary frame after
/// them is not.
#[tokio::test]
async fn binary_frame_after_junk_then_more_gets_1003_with_its_reason() {
    let db = TestDb::demo("close_binary").await;
    let relay = TestRelay::start(&db).await;
    let mut violation = vec![pong(); 3];
    violation.push(Message::Binary(vec![7; 400].into()));
    let careless = Careless::start(
        &relay,
        NOTIFICATIONS,
        &token("2", false),
        violation,
        Message::Binary(vec![8; 400].into()),
    )
    .await;
    let (code, reason) = careless.close_frame().await;
    assert_eq!(code, 1003, "{reason}");
    assert!(reason.contains("binary"), "{reason:?}");
}

#[tokio::test]
async fn too_many_messages_gets_1008_with_its_reason() {
    let db = TestDb::demo("close_rate").await;
    let relay = TestRelay::start_with(&db, |c| c.limits.client_messages_per_second = 1).await;
    // Valid refreshes: the only thing wrong is the rate.
    let refresh = text(&json!({"type": "refresh", "token": token("2", false)}).to_string());
    let careless = Careless::start(
        &relay,
        NOTIFICATIONS,
        &token("2", false),
        Vec::new(),
        refresh,
    )
    .await;
    let (code, reason) = careless.close_frame().await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too many"), "{reason:?}");
}

#[tokio::test]
async fn oversized_frame_then_more_gets_1009_with_its_reason() {
    let db = TestDb::demo("close_big").await;
    let relay = TestRelay::start_with(&db, |c| c.limits.max_client_message = 1024).await;
    let big = text(&"x".repeat(64 * 1024));
    let careless = Careless::start(
        &relay,
        NOTIFICATIONS,
        &token("2", false),
        vec![big],
        junk(0),
    )
    .await;
    let (code, reason) = careless.close_frame().await;
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("too big"), "{reason:?}");
}

/// Pongs are all the client sends, within a generous rate: the expiry is
/// what closes.
#[tokio::test]
async fn token_expiry_while_the_client_keeps_sending_gets_4001_with_its_reason() {
    let db = TestDb::demo("close_expiry").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.client_messages_per_second = 1_000_000;
    })
    .await;
    let expiring = sign(&json!({"sub": "2", "exp": now() + 2}));
    let careless = Careless::start(&relay, NOTIFICATIONS, &expiring, Vec::new(), pong()).await;
    let (code, reason) = careless.close_frame().await;
    assert_eq!(code, Close::TokenExpired.code(), "{reason}");
    assert!(reason.contains("token expired"), "{reason:?}");
}

#[tokio::test]
async fn shutdown_while_the_client_keeps_sending_gets_1001_and_ends_in_time() {
    let db = TestDb::demo("close_shutdown").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.client_messages_per_second = 1_000_000;
    })
    .await;
    let careless = Careless::start(
        &relay,
        NOTIFICATIONS,
        &token("2", false),
        Vec::new(),
        pong(),
    )
    .await;
    let sent = Arc::clone(&careless.sent);
    wait_for("the client to be sending", || async {
        sent.load(Ordering::SeqCst) >= 1000
    })
    .await;
    let shutdown = tokio::spawn(relay.relay.shutdown());
    let (code, reason) = careless.close_frame().await;
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("shutting down"), "{reason:?}");
    assert!(
        shutdown.await.expect("shutdown task"),
        "every task ended within the shutdown grace"
    );
}

/// A masked client text frame (mask key zero, so the payload is as given).
fn client_text(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

/// Peers that break a rule and then never read nor close, one silent and one
/// writing junk without pause: the relay drops both once the close timeout
/// has passed, and their tasks end (the connections gauge goes back to 0).
#[tokio::test]
async fn peer_that_never_finishes_the_close_handshake_is_dropped_within_the_bound() {
    const SOCKETS: &str = r#"pgrelay_connections{stream="notifications"}"#;
    let db = TestDb::demo("close_timeout").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.client_messages_per_second = 1_000_000;
    })
    .await;
    let addr = relay.relay.addr();
    let mut silent = silent_websocket(addr, "/ws/notifications/", &token("2", false)).await;
    let mut flooder = silent_websocket(addr, "/ws/notifications/", &token("3", false)).await;
    wait_for("both sockets counted", || async {
        metric(addr, SOCKETS).await == Some(2.0)
    })
    .await;

    let junk = client_text(b"junk");
    let violated = Instant::now();
    silent.write_all(&junk).await.expect("send junk");
    let flood = tokio::spawn(async move {
        let burst = junk.repeat(64);
        // Until the relay drops the connection and the writes fail.
        while flooder.write_all(&burst).await.is_ok() {}
    });
    wait_for("both sockets dropped", || async {
        metric(addr, SOCKETS).await == Some(0.0)
    })
    .await;
    let took = violated.elapsed();
    let bound = pgrelay::session::CLOSE_TIMEOUT + Duration::from_secs(2);
    assert!(took < bound, "dropped after {took:?}, bound {bound:?}");
    tokio::time::timeout(WAIT, flood)
        .await
        .expect("the flooder's writes fail once it is dropped")
        .expect("flood task");
    drop(silent);
}
