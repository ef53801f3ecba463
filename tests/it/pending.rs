//! Limits before authentication: connections that have not upgraded yet are
//! capped in total and per client address, and refused at once with one line
//! (never left hanging); request heads over `--max-header-bytes` get 431;
//! while a flood of idle connections is held, other clients still connect.
//! Also `/metrics` content negotiation (text 0.0.4 unless OpenMetrics is asked).
//!
//! The floods come from other loopback addresses (127.0.0.2, ...) than the
//! well-behaved client (127.0.0.1), as they would from other hosts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::*;

/// A refusal must come this fast: no handshake timeout, no hang.
const QUICK: Duration = Duration::from_secs(5);

/// How long an idle connection may keep its place: longer than any test, so
/// that only the test's own closes free one.
const HOLD: Duration = Duration::from_secs(120);

/// A TCP connection to `relay` from `127.0.0.<host>`.
async fn connect_from(relay: SocketAddr, host: u8) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
            0,
        ))
        .expect("bind a loopback source address");
    socket.connect(relay).await.expect("connect")
}

/// Reads the whole answer (the server closes after a refusal), bounded by
/// [`QUICK`]: (status, body).
async fn answer(stream: &mut TcpStream) -> (u16, String) {
    let mut response = Vec::new();
    tokio::time::timeout(QUICK, stream.read_to_end(&mut response))
        .await
        .expect("an answer within 5 s, not a hang")
        .expect("read the answer");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

fn assert_one_line(body: &str) {
    let line = body.strip_suffix('\n').unwrap_or(body);
    assert!(
        !line.trim().is_empty() && !line.contains('\n'),
        "body is not one line: {body:?}"
    );
}

/// Whether the relay has let go of an idle connection's place: a GET from
/// the same address is served again.
async fn served_from(relay: SocketAddr, host: u8) -> bool {
    let mut stream = connect_from(relay, host).await;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {relay}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    answer(&mut stream).await.0 == 200
}

#[tokio::test]
async fn pending_connections_per_address_are_capped_until_one_closes() {
    let db = TestDb::demo("pending_per_ip").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.max_pending_per_ip = 4;
        c.limits.handshake_timeout = HOLD;
    })
    .await;
    let addr = relay.relay.addr();
    // Four connections that send nothing hold the address's four places
    // (the kernel hands connections to accept() in the order they opened).
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect_from(addr, 2).await);
    }
    let mut fifth = connect_from(addr, 2).await;
    let (status, body) = answer(&mut fifth).await;
    assert_eq!(status, 429, "{body}");
    assert_one_line(&body);
    assert!(body.contains("from this address"), "{body}");
    // Another address is not affected.
    assert!(served_from(addr, 3).await);
    // One closes: the address is served again.
    drop(idle.pop());
    wait_for("a place freed by the closed connection", || {
        served_from(addr, 2)
    })
    .await;
    assert!(metric(
        addr,
        "pgrelay_refusals_total{reason=\"max_pending_per_ip\"}"
    )
    .await
    .is_some_and(|n| n >= 1.0));
}

#[tokio::test]
async fn pending_connections_in_total_are_capped() {
    let db = TestDb::demo("pending_total").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.max_pending_handshakes = 6;
        c.limits.handshake_timeout = HOLD;
    })
    .await;
    let addr = relay.relay.addr();
    let mut idle = Vec::new();
    for host in 2..8 {
        idle.push(connect_from(addr, host).await);
    }
    let mut seventh = connect_from(addr, 9).await;
    let (status, body) = answer(&mut seventh).await;
    assert_eq!(status, 503, "{body}");
    assert_one_line(&body);
    assert!(body.contains("retry later"), "{body}");
    idle.clear();
    wait_for("places freed", || served_from(addr, 9)).await;
    assert!(metric(
        addr,
        "pgrelay_refusals_total{reason=\"max_pending_handshakes\"}"
    )
    .await
    .is_some_and(|n| n >= 1.0));
}

#[tokio::test]
async fn a_flood_of_idle_connections_does_not_keep_others_out() {
    let db = TestDb::demo("pending_flood").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.max_pending_handshakes = 64;
        c.limits.max_pending_per_ip = 16;
        c.limits.handshake_timeout = HOLD;
    })
    .await;
    let addr = relay.relay.addr();
    // 300 silent connections from two other addresses: 32 are held, every
    // other one is refused at once. Each is read in its own task, which holds
    // the connection while it waits.
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..300 {
        let mut stream = connect_from(addr, 2 + (i % 2) as u8).await;
        flood.spawn(async move {
            let mut response = Vec::new();
            let _ = stream.read_to_end(&mut response).await;
            String::from_utf8_lossy(&response).into_owned()
        });
    }
    for _ in 0..268 {
        let response = tokio::time::timeout(QUICK, flood.join_next())
            .await
            .expect("the connections over the cap are answered at once")
            .expect("a flood task")
            .expect("flood task");
        assert!(response.starts_with("HTTP/1.1 429 "), "{response}");
    }
    // A well-behaved client, meanwhile, gets its socket and its events.
    let mut ws = relay.notifications("2").await;
    let id = db.business(2, "Still served").await;
    assert_eq!(ws.event().await["data"]["id"], id);
    // The other 32 were held all along, unanswered.
    assert_eq!(flood.len(), 32);
    assert!(flood.try_join_next().is_none(), "a held connection ended");
    flood.abort_all();
}

/// A request for a socket with one `Cookie` header of `cookie_bytes`.
fn request_with_cookie(addr: SocketAddr, cookie_bytes: usize) -> String {
    format!(
        "GET /ws/notifications/ HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nCookie: c={}\r\n\r\n",
        "x".repeat(cookie_bytes)
    )
}

#[tokio::test]
async fn oversized_request_heads_get_431_at_once_and_big_cookies_pass() {
    let db = TestDb::demo("pending_headers").await;
    let relay = TestRelay::start(&db).await;
    let addr = relay.relay.addr();

    // 12 KiB of cookies, under the 16 KiB default: the request is read and
    // refused for what it lacks (a token), not for its size.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = request_with_cookie(addr, 12 * 1024);
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = vec![0u8; 4096];
    let n = tokio::time::timeout(QUICK, stream.read(&mut head))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 401 "), "{head}");

    // 20 KiB: 431, at once.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = request_with_cookie(addr, 20 * 1024);
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(QUICK, stream.read_to_end(&mut response))
        .await
        .expect("an answer within 5 s, not a hang")
        .expect("read");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{response}"
    );
    assert!(
        metric(addr, "pgrelay_refusals_total{reason=\"header_too_large\"}")
            .await
            .is_some_and(|n| n >= 1.0)
    );
}

/// `GET /metrics` with `accept`: (content type, body).
async fn get_metrics(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let accept: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    let answer = http(addr, "GET", "/metrics", &accept).await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    let content_type = answer.header("content-type").expect("a content type");
    (content_type.to_owned(), answer.body)
}

#[tokio::test]
async fn metrics_answer_text_004_unless_openmetrics_is_asked_for() {
    let db = TestDb::demo("metrics_negotiation").await;
    let relay = TestRelay::start(&db).await;
    let addr = relay.relay.addr();
    let _ = Ws::connect(&relay.ws_url("/ws/notifications/"), Some("bad")).await;

    for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
        let (content_type, body) = get_metrics(addr, accept).await;
        assert_eq!(
            content_type, "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        assert!(!body.contains("# EOF"), "{body}");
        assert!(
            body.contains("# TYPE pgrelay_refusals_total counter\n"),
            "{body}"
        );
        assert!(
            body.contains("pgrelay_refusals_total{reason=\"invalid_token\"} 1\n"),
            "{body}"
        );
    }

    // What Prometheus sends when it may scrape OpenMetrics.
    let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,\
                      application/openmetrics-text;version=0.0.1;q=0.4,\
                      text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let (content_type, body) = get_metrics(addr, Some(prometheus)).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(body.contains("# TYPE pgrelay_refusals counter\n"), "{body}");
    assert!(
        body.contains("pgrelay_refusals_total{reason=\"invalid_token\"} 1\n"),
        "{body}"
    );
}

/// hyper restarts its header timer on every keep-alive request, so a client
/// asking for /healthz every few hundred milliseconds would keep its pending
/// place for ever; past the handshake timeout plus the admin query's, it is
/// closed, and its place freed.
#[tokio::test]
async fn keep_alive_requests_do_not_hold_a_pending_place_for_ever() {
    let db = TestDb::demo("pending_keepalive").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.handshake_timeout = Duration::from_millis(500);
        c.limits.max_pending_per_ip = 1;
    })
    .await;
    let addr = relay.relay.addr();
    let mut holder = connect_from(addr, 11).await;
    let began = tokio::time::Instant::now();
    let mut served = 0;
    let closed = loop {
        let request = b"GET /healthz HTTP/1.1\r\nHost: pgrelay\r\n\r\n";
        if holder.write_all(request).await.is_err() {
            break true;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(2), holder.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => served += 1,
            Err(_) => panic!("no answer to a keep-alive /healthz"),
        }
        assert!(began.elapsed() < WAIT, "the connection was never closed");
        tokio::time::sleep(Duration::from_millis(200)).await; // the client's pace, not a wait
    };
    assert!(closed);
    assert!(served >= 2, "keep-alive was served {served} times");
    // 0.5 s + 5 s + 1 s, then at most 2 s of graceful close.
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    // Its place is free again: the same address is served.
    assert!(served_from(addr, 11).await);
}
