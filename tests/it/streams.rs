//! Configured streams (`/ws/businesses/{id}/`) and Server-Sent Events
//! (`/sse/...`): a stream carries only the rows whose field equals its key,
//! over either transport; who may open a key is the stream query's answer
//! (a failing query refuses); SSE resumes through `Last-Event-ID` across a
//! restart, answers another epoch with `reset`, ends at the token's `exp`,
//! takes its token from a cookie when told to, and is not a pending
//! handshake once it streams.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::*;

/// How `/ws/PATH` and `/sse/PATH` refuse `token`: the socket's status, and
/// the event stream's status and one-line body.
async fn refused_on_both(relay: &TestRelay, path: &str, token: &str) -> (u16, (u16, String)) {
    let ws = Ws::connect(&relay.ws_url(&format!("/ws/{path}")), Some(token))
        .await
        .err()
        .expect("the socket is refused");
    let sse = Sse::connect(
        relay.relay.addr(),
        &format!("/sse/{path}"),
        &[("authorization", &bearer(token))],
    )
    .await
    .err()
    .expect("the event stream is refused");
    (ws.status, sse)
}

/// The next `event` events' ids on an SSE stream, checking that each
/// `id:` is `EPOCH:ID` for the frame's id.
async fn sse_ids(sse: &mut Sse, epoch: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let event = sse.expect("event").await;
        let id = event.data["id"].as_i64().expect("event id");
        assert_eq!(event.id.as_deref(), Some(format!("{epoch}:{id}").as_str()));
        assert_eq!(event.data["type"], "event");
        ids.push(id);
    }
    ids
}

/// The log ids of the events a row change produced, newest first: the
/// business row `id` or reservation `id`, looked up in the log.
async fn log_id(db: &TestDb, channel: &str, row: i64) -> i64 {
    db.value(&format!(
        "SELECT max(id) FROM pgrelay.events WHERE channel = '{channel}' \
         AND payload->>'id' = '{row}'"
    ))
    .await
}

#[tokio::test]
async fn a_business_stream_carries_only_its_own_rows_over_websocket_and_sse() {
    let db = TestDb::demo("streams_own_rows").await;
    let relay = TestRelay::start(&db).await;
    let addr = relay.relay.addr();
    let mine = db.business(2, "Mine").await;
    let other = db.business(4, "Other").await;
    let owner = token("2", false);

    let mut ws = relay.ws(&format!("/ws/businesses/{mine}/"), &owner).await;
    let hello = ws.hello().await;
    assert_eq!(hello["stream"], "businesses");
    assert_eq!(hello["key"], mine.to_string());
    let mut sse = Sse::connect(
        addr,
        &format!("/sse/businesses/{mine}/"),
        &[("authorization", &bearer(&owner))],
    )
    .await
    .expect("the owner opens the SSE stream");
    assert_eq!(sse.head.headers["content-type"], "text/event-stream");
    assert_eq!(sse.head.headers["x-accel-buffering"], "no");
    let hello = sse.expect("hello").await;
    assert_eq!(hello.data["type"], "hello");
    assert_eq!(hello.data["key"], mine.to_string());
    let epoch = hello.data["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(
        hello.id.as_deref(),
        Some(format!("{epoch}:{}", hello.data["last_id"]).as_str()),
        "a fresh stream's hello carries its position"
    );

    // Other's rows come first in id order: had one leaked, it would be read
    // before the expected ones.
    db.reservation(other, 3).await;
    let booked = db.reservation(mine, 3).await;
    db.exec(&format!(
        "UPDATE businesses SET name = 'Other 2' WHERE id = {other}"
    ))
    .await;
    db.exec(&format!(
        "UPDATE businesses SET name = 'Mine 2' WHERE id = {mine}"
    ))
    .await;
    let expected = vec![
        log_id(&db, "reservation_events", booked).await,
        log_id(&db, "business_events", mine).await,
    ];
    assert_eq!(read_ids(&mut ws, 2).await, expected);
    assert_eq!(sse_ids(&mut sse, &epoch, 2).await, expected);

    // A super admin may open any key; a customer, none.
    let mut admin = relay
        .ws(&format!("/ws/businesses/{other}/"), &token("1", true))
        .await;
    admin.hello().await;
    let theirs = db.reservation(other, 3).await;
    assert_eq!(
        read_ids(&mut admin, 1).await,
        [log_id(&db, "reservation_events", theirs).await]
    );
}

#[tokio::test]
async fn who_may_not_open_a_key_is_refused_before_the_stream_starts() {
    let db = TestDb::demo("streams_refused").await;
    let relay = TestRelay::start(&db).await;
    let addr = relay.relay.addr();
    let mine = db.business(2, "Mine").await;
    let customer = token("3", false);
    let owner = token("2", false);

    let (ws, (status, why)) =
        refused_on_both(&relay, &format!("businesses/{mine}/"), &customer).await;
    assert_eq!(ws, 403, "a customer is refused");
    assert_eq!((status, why.as_str()), (403, "not allowed on this stream"));
    // The owner of nothing here, a key that is not an id, a stream that
    // does not exist, no token.
    for (path, status) in [
        ("/sse/businesses/99999/".to_owned(), 403),
        ("/sse/businesses/not-a-number/".to_owned(), 403),
        (format!("/sse/shops/{mine}/"), 404),
        (format!("/sse/businesses/{mine}/extra/"), 404),
    ] {
        let got = Sse::connect(addr, &path, &[("authorization", &bearer(&owner))])
            .await
            .err()
            .map(|(s, _)| s);
        assert_eq!(got, Some(status), "{path}");
    }
    let got = Sse::connect(addr, &format!("/sse/businesses/{mine}/"), &[])
        .await
        .err();
    assert_eq!(got.map(|(s, _)| s), Some(401));
    let got = Sse::connect(
        addr,
        "/sse/dashboard/",
        &[("authorization", &bearer(&owner))],
    )
    .await
    .err();
    assert_eq!(
        got.map(|(s, _)| s),
        Some(403),
        "the dashboard is for admins"
    );
    let wrong_accept = http(
        addr,
        "GET",
        "/sse/notifications/",
        &[
            ("authorization", &bearer(&owner)),
            ("accept", "application/json"),
        ],
    )
    .await;
    assert_eq!(wrong_accept.status, 406, "{}", wrong_accept.body);
}

#[tokio::test]
async fn a_failing_stream_query_refuses_and_never_admits() {
    let db = TestDb::demo("streams_query_fails").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.stream_queries = vec![("businesses".into(), "SELECT 1 / 0 = 1 OR $1 = $2".into())];
    })
    .await;
    let mine = db.business(2, "Mine").await;
    let owner = token("2", false);
    let (ws, (status, why)) = refused_on_both(&relay, &format!("businesses/{mine}/"), &owner).await;
    assert_eq!((ws, status), (503, 503), "refused while the query fails");
    assert!(why.contains("retry later"), "{why}");
    // An admin claim needs no query.
    let mut admin = relay
        .ws(&format!("/ws/businesses/{mine}/"), &token("1", true))
        .await;
    admin.hello().await;
}

/// The door takes the user's place before it asks the database: a user at
/// `--max-sockets-per-user` is refused with 429 without a query, so fresh
/// stream keys cannot make PostgreSQL run one per refused request. The
/// query here always fails, so a request that reached it would get 503.
#[tokio::test]
async fn a_user_at_the_socket_cap_is_refused_before_any_query() {
    let db = TestDb::demo("streams_cap_before_query").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.max_per_user = 1;
        c.stream_queries = vec![("businesses".into(), "SELECT 1 / 0 = 1 OR $1 = $2".into())];
    })
    .await;
    let owner = token("2", false);
    // Below the cap the query is asked, and fails: 503.
    let below = Ws::connect(&relay.ws_url("/ws/businesses/1/"), Some(&owner))
        .await
        .err()
        .expect("refused while the query fails");
    assert_eq!(below.status, 503, "{below:?}");
    // At the cap (one notifications socket open), fresh keys: 429 over both
    // transports, not 503.
    let mut held = relay.ws("/ws/notifications/", &owner).await;
    held.hello().await;
    for key in 2..5 {
        let (ws, (status, why)) =
            refused_on_both(&relay, &format!("businesses/{key}/"), &owner).await;
        assert_eq!((ws, status), (429, 429), "key {key}: {why}");
    }
}

#[tokio::test]
async fn a_stream_key_replays_only_its_own_rows_after_a_cursor() {
    let db = TestDb::demo("streams_replay").await;
    let relay = TestRelay::start(&db).await;
    let mine = db.business(2, "Mine").await;
    let other = db.business(4, "Other").await;
    let cursor = max_id(&db).await;
    let mut expected = Vec::new();
    for _ in 0..3 {
        db.reservation(other, 3).await;
        let booked = db.reservation(mine, 3).await;
        expected.push(log_id(&db, "reservation_events", booked).await);
    }
    let epoch = epoch(&db).await;
    let owner = token("2", false);
    let path = format!("/ws/businesses/{mine}/");
    let mut ws = resume(&relay, &path, &owner, cursor, &epoch).await;
    assert_eq!(read_ids(&mut ws, 3).await, expected);
    // The same over SSE, resumed by Last-Event-ID.
    let mut sse = Sse::connect(
        relay.relay.addr(),
        &format!("/sse/businesses/{mine}/"),
        &[
            ("authorization", &bearer(&owner)),
            ("last-event-id", &format!("{epoch}:{cursor}")),
        ],
    )
    .await
    .expect("resume over SSE");
    let hello = sse.expect("hello").await;
    assert_eq!(
        hello.id, None,
        "a resuming stream keeps the client's position"
    );
    assert_eq!(sse_ids(&mut sse, &epoch, 3).await, expected);
}

#[tokio::test]
async fn sse_resumes_through_last_event_id_after_a_restart_and_resets_another_epoch() {
    let db = TestDb::demo("streams_sse_restart").await;
    let first = TestRelay::start(&db).await;
    let addr = first.relay.addr();
    let owner = token("2", false);
    let auth = bearer(&owner);
    let mut sse = Sse::connect(addr, "/sse/notifications/", &[("authorization", &auth)])
        .await
        .expect("open");
    let epoch = sse.expect("hello").await.data["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let seen = db.business(2, "Before").await;
    let event = sse.expect("event").await;
    assert_eq!(event.data["data"]["id"], seen);
    let last_event_id = event.id.expect("an event carries its id");
    drop(sse);
    first.relay.shutdown().await;

    // Written while no relay runs.
    let missed = [
        db.business(2, "While down 1").await,
        db.business(2, "While down 2").await,
    ];
    let second = TestRelay::start_with(&db, |c| c.listen = addr).await;
    let mut sse = Sse::connect(
        second.relay.addr(),
        "/sse/notifications/?last_id=0",
        &[("authorization", &auth), ("last-event-id", &last_event_id)],
    )
    .await
    .expect("reopen");
    sse.expect("hello").await;
    for business in missed {
        let event = sse.expect("event").await;
        assert_eq!(event.data["data"]["id"], business, "{event:?}");
    }
    let live = db.business(2, "After").await;
    assert_eq!(sse.expect("event").await.data["data"]["id"], live);

    // A position in another log: reset, with the position to go on from.
    let mut sse = Sse::connect(
        second.relay.addr(),
        "/sse/notifications/",
        &[
            ("authorization", &auth),
            ("last-event-id", "not-this-epoch:3"),
        ],
    )
    .await
    .expect("reopen with a foreign epoch");
    sse.expect("hello").await;
    let reset = sse.expect("reset").await;
    assert_eq!(
        reset.data,
        json!({"type": "reset", "reason": "epoch_mismatch"})
    );
    let head = max_id(&db).await;
    assert_eq!(reset.id, Some(format!("{epoch}:{head}")));
    let bad = Sse::connect(
        second.relay.addr(),
        "/sse/notifications/",
        &[("authorization", &auth), ("last-event-id", "x:-1")],
    )
    .await
    .err();
    assert_eq!(bad.map(|(s, _)| s), Some(400));
}

#[tokio::test]
async fn sse_ends_at_the_tokens_expiry_with_a_close_event() {
    let db = TestDb::demo("streams_sse_expiry").await;
    let relay = TestRelay::start(&db).await;
    let short = sign(&json!({"sub": "2", "exp": now() + 2}));
    let mut sse = Sse::connect(
        relay.relay.addr(),
        "/sse/notifications/",
        &[("authorization", &bearer(&short))],
    )
    .await
    .expect("open");
    sse.expect("hello").await;
    let close = sse.expect("close").await;
    assert_eq!(close.data["code"], 4001, "{close:?}");
    assert_eq!(close.data["type"], "close");
    assert!(sse.next().await.is_none(), "the stream ends after close");
}

#[tokio::test]
async fn sse_takes_its_token_from_the_configured_cookie_only() {
    let db = TestDb::demo("streams_sse_cookie").await;
    let relay = TestRelay::start_with(&db, |c| c.token_cookie = Some("pgrelay_token".into())).await;
    let addr = relay.relay.addr();
    let cookie = format!("theme=dark; pgrelay_token={}", token("2", false));
    let mut sse = Sse::connect(addr, "/sse/notifications/", &[("cookie", &cookie)])
        .await
        .expect("the cookie's token admits");
    assert_eq!(sse.expect("hello").await.data["user"], "2");
    // A WebSocket does not read cookies (a cross-site page's socket would
    // carry them).
    let mut request = relay
        .ws_url("/ws/notifications/")
        .into_client_request()
        .expect("ws url");
    request
        .headers_mut()
        .insert("cookie", cookie.parse().expect("cookie header"));
    let refused = Ws::connect_request(request)
        .await
        .err()
        .expect("no token for the socket");
    assert_eq!(refused.status, 401);
    let other = TestRelay::start(&db).await;
    let got = Sse::connect(
        other.relay.addr(),
        "/sse/notifications/",
        &[("cookie", &cookie)],
    )
    .await
    .err();
    assert_eq!(
        got.map(|(s, _)| s),
        Some(401),
        "no cookie unless configured"
    );
}

#[tokio::test]
async fn an_sse_stream_is_not_a_pending_handshake() {
    let db = TestDb::demo("streams_sse_not_pending").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.max_pending_per_ip = 2;
        c.limits.handshake_timeout = Duration::from_millis(200);
    })
    .await;
    let addr = relay.relay.addr();
    let auth = bearer(&token("2", false));
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut sse = Sse::connect(addr, "/sse/notifications/", &[("authorization", &auth)])
            .await
            .expect("more streams than pending places");
        sse.expect("hello").await;
        streams.push(sse);
    }
    // A keep-alive connection that only asks /healthz stays pending: the
    // pending timer closes it. Once it has, every stream (older than it)
    // is past that timer and must still deliver.
    pending_connection_closed(addr).await;
    let id = db.business(2, "Still here").await;
    for sse in &mut streams {
        let event: Value = sse.expect("event").await.data;
        assert_eq!(event["data"]["id"], id);
    }
}

/// Asks `/healthz` on one keep-alive connection every 100 ms until the
/// server closes it (the pending timer); panics after [`WAIT`].
async fn pending_connection_closed(addr: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let asking = async {
        let mut buffer = [0u8; 1024];
        loop {
            let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            if stream.write_all(request.as_bytes()).await.is_err() {
                return;
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    tokio::time::timeout(WAIT, asking)
        .await
        .expect("the pending timer closes a connection that never upgrades");
}

#[tokio::test]
async fn a_client_leaving_an_sse_stream_frees_its_place() {
    const STREAMS: &str = r#"pgrelay_connections{stream="notifications"}"#;
    let db = TestDb::demo("streams_sse_leaves").await;
    let relay = TestRelay::start_with(&db, |c| c.limits.max_per_user = 1).await;
    let addr = relay.relay.addr();
    let auth = bearer(&token("2", false));
    let mut first = Sse::connect(addr, "/sse/notifications/", &[("authorization", &auth)])
        .await
        .expect("open");
    first.expect("hello").await;
    let refused = Sse::connect(addr, "/sse/notifications/", &[("authorization", &auth)])
        .await
        .err();
    assert_eq!(
        refused.map(|(s, _)| s),
        Some(429),
        "one stream per user here"
    );
    assert_eq!(metric(addr, STREAMS).await, Some(1.0));
    drop(first);
    wait_for("the server to notice the client left", || async {
        metric(addr, STREAMS).await == Some(0.0)
    })
    .await;
    let mut again = Sse::connect(addr, "/sse/notifications/", &[("authorization", &auth)])
        .await
        .expect("the place is free again");
    again.expect("hello").await;
}
