//! The bell's server side: read state kept in PostgreSQL and carried to
//! every socket of the user on any replica through the log; `hello`'s
//! unread count; history pages that are exact and never show another
//! user's events; the limits on read messages.

use serde_json::{json, Value};

use crate::harness::*;

/// The next frame of `kind` on a socket, skipping others; panics after
/// [`WAIT`] in all.
async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    let found = async {
        loop {
            let frame = ws.next_json().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    };
    tokio::time::timeout(WAIT, found)
        .await
        .unwrap_or_else(|_| panic!("no {kind} frame within {WAIT:?}"))
}

async fn post_read(relay: &TestRelay, user: &str, body: Value) -> HttpAnswer {
    http_body(
        relay.relay.addr(),
        "POST",
        "/read/notifications/",
        &[("authorization", &bearer(&token(user, false)))],
        &body.to_string(),
    )
    .await
}

#[tokio::test]
async fn read_state_reaches_every_socket_of_the_user_on_every_replica() {
    let db = TestDb::demo("bell_replicas").await;
    let a = TestRelay::start(&db).await;
    let b = TestRelay::start(&db).await;
    let mut on_a = a.notifications("2").await;
    let mut on_b = b.notifications("2").await;
    let mut ids = Vec::new();
    for name in ["One", "Two", "Three"] {
        db.business(2, name).await;
        let id = on_a.event().await["id"].as_i64().expect("id");
        assert_eq!(on_b.event().await["id"], id);
        ids.push(id);
    }

    // Read up to the second on replica A: B hears it at once.
    on_a.send_text(&json!({"type": "read", "up_to": ids[1]}).to_string())
        .await;
    let read = next_of(&mut on_b, "read").await;
    assert_eq!(read["up_to"], ids[1], "{read}");
    assert_eq!(read["stream"], "notifications");
    assert_eq!(next_of(&mut on_a, "read").await["up_to"], ids[1]);

    // A new device's hello has the cursor and the right count.
    let mut fresh = b
        .ws("/ws/notifications/?unread=1", &token("2", false))
        .await;
    let hello = fresh.hello().await;
    assert_eq!(hello["read_up_to"], ids[1], "{hello}");
    assert_eq!(hello["unread"], 1, "{hello}");
    // Another user's state is their own.
    let mut other = a
        .ws("/ws/notifications/?unread=1", &token("4", false))
        .await;
    let hello = other.hello().await;
    assert_eq!(
        (hello["read_up_to"].clone(), hello["unread"].clone()),
        (json!(0), json!(0))
    );

    // One item by id, over HTTP on replica B: the sockets hear it.
    let answer = post_read(&b, "2", json!({"type": "read", "ids": [ids[2]]})).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let state: Value = serde_json::from_str(&answer.body).expect("json");
    assert_eq!(state["ids"], json!([ids[2]]));
    assert_eq!(next_of(&mut on_a, "read").await["ids"], json!([ids[2]]));
    let mut third = a
        .ws("/ws/notifications/?unread=1", &token("2", false))
        .await;
    assert_eq!(third.hello().await["unread"], 0);

    // The cursor only moves forward, and a mark that moves nothing writes
    // nothing: no log event.
    let events = max_id(&db).await;
    let backward = post_read(&b, "2", json!({"type": "read", "up_to": ids[0]})).await;
    assert_eq!(backward.status, 200, "{}", backward.body);
    let state: Value = serde_json::from_str(&backward.body).expect("json");
    assert_eq!(state["up_to"], ids[1], "{state}");
    assert_eq!(
        max_id(&db).await,
        events,
        "an unchanged state is not logged"
    );

    // Clear all: read up to the newest, and history hides it all.
    db.business(2, "Four").await;
    on_a.event().await;
    let newest = max_id(&db).await;
    on_b.send_text(r#"{"type":"clear"}"#).await;
    let cleared = next_of(&mut on_a, "read").await;
    assert_eq!(cleared["cleared_through"], newest, "{cleared}");
    assert_eq!(cleared["up_to"], newest, "{cleared}");
    let (status, body) = history(&b, "/history/notifications/", "2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]), "{body}");
    assert_eq!(body["next_before"], Value::Null);
}

async fn history(relay: &TestRelay, path: &str, user: &str) -> (u16, Value) {
    let answer = http(
        relay.relay.addr(),
        "GET",
        path,
        &[("authorization", &bearer(&token(user, false)))],
    )
    .await;
    let body = serde_json::from_str(&answer.body).unwrap_or(Value::String(answer.body));
    (answer.status, body)
}

fn event_ids(page: &Value) -> Vec<i64> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_i64().expect("id"))
        .collect()
}

/// The notifications page after `page` (from its `next_before`): its ids
/// and its own `next_before`.
async fn page_after(relay: &TestRelay, page: &Value, user: &str) -> (Vec<i64>, Value) {
    let before = page["next_before"].as_i64().expect("more to come");
    let (status, next) = history(
        relay,
        &format!("/history/notifications/?limit=100&before={before}"),
        user,
    )
    .await;
    assert_eq!(status, 200);
    (event_ids(&next), next["next_before"].clone())
}

#[tokio::test]
async fn history_pages_are_exact_newest_first_and_only_the_users_own() {
    let db = TestDb::demo("bell_history").await;
    let relay = TestRelay::start(&db).await;
    let mut mine = Vec::new();
    for i in 0..5 {
        db.business(4, &format!("Theirs {i}")).await;
        let business = db.business(2, &format!("Mine {i}")).await;
        mine.push(max_id(&db).await);
        // A reservation at the owner's business: the owner's too.
        db.reservation(business, 3).await;
        mine.push(max_id(&db).await);
    }
    mine.reverse();

    let (status, first) = history(&relay, "/history/notifications/?limit=4", "2").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(event_ids(&first), mine[..4]);
    assert_eq!(first["events"][0]["type"], "event");
    assert_eq!(
        page_after(&relay, &first, "2").await,
        (mine[4..].to_vec(), Value::Null)
    );
    // Never another user's: user 4 sees only their own five.
    let (_, theirs) = history(&relay, "/history/notifications/", "4").await;
    assert_eq!(event_ids(&theirs).len(), 5);
    assert!(event_ids(&theirs).iter().all(|id| !mine.contains(id)));

    // The stream's own door: a business's history for its owner, not for a
    // customer; the dashboard's for admins only; bad parameters.
    let business: i64 = db
        .value("SELECT max(id) FROM businesses WHERE owner_id = 2")
        .await;
    let (status, page) = history(&relay, &format!("/history/businesses/{business}/"), "2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        event_ids(&page).len(),
        2,
        "the business and its reservation"
    );
    let (status, _) = history(&relay, &format!("/history/businesses/{business}/"), "3").await;
    assert_eq!(status, 403);
    let (status, _) = history(&relay, "/history/dashboard/", "2").await;
    assert_eq!(status, 403);
    let (status, body) = history(&relay, "/history/notifications/?limit=0", "2").await;
    assert_eq!(status, 400, "{body}");
    let answer = http(relay.relay.addr(), "GET", "/history/notifications/", &[]).await;
    assert_eq!(answer.status, 401);
    let answer = http(
        relay.relay.addr(),
        "POST",
        "/history/notifications/",
        &[("authorization", &bearer(&token("2", false)))],
    )
    .await;
    assert_eq!(answer.status, 405);
}

/// A history answer is bounded in bytes too (`db::PAGE_BYTES`, 2 MiB): of
/// six businesses of 900 KiB, an answer asking for 100 holds the newest
/// three (the third takes it past 2 MiB) and says where the next starts;
/// the answers together are the six, newest first. The same when each of
/// the six is in a window of ids of its own (no window's page is cut, the
/// answer's total is; before, the first answer held all six).
#[tokio::test]
async fn a_history_page_of_large_events_ends_at_its_bytes_and_goes_on() {
    let db = TestDb::demo("bell_history_bytes").await;
    let relay = TestRelay::start(&db).await;
    let description = "d".repeat(900 << 10);
    for (owner, gap) in [(2, 0), (4, 100_000)] {
        let mut mine = Vec::new();
        for i in 0..6 {
            db.exec(&format!(
                "SELECT setval('pgrelay.events_id_seq', \
                 (SELECT last_value FROM pgrelay.events_id_seq) + {gap})"
            ))
            .await;
            db.business_described(owner, &format!("Large {i}"), &description)
                .await;
            mine.push(max_id(&db).await);
        }
        mine.reverse();
        let user = owner.to_string();
        let (status, first) = history(&relay, "/history/notifications/?limit=100", &user).await;
        assert_eq!(status, 200);
        assert_eq!(event_ids(&first), mine[..3], "owner {owner}");
        // The second answer ends at its bytes too: more may lie below (with
        // gaps, the windows under it are not read yet).
        let (ids, _) = page_after(&relay, &first, &user).await;
        assert_eq!(ids, mine[3..], "owner {owner}");
    }
}

#[tokio::test]
async fn reads_beyond_the_newest_event_or_malformed_are_refused() {
    let db = TestDb::demo("bell_limits").await;
    let relay = TestRelay::start_with(&db, |c| c.limits.client_messages_per_second = 1).await;
    db.business(2, "One").await;
    let newest = max_id(&db).await;
    let post = |body: Value| post_read(&relay, "2", body);
    let beyond = post(json!({"type": "read", "up_to": newest + 1})).await;
    assert_eq!(
        (beyond.status, beyond.body.trim()),
        (400, "read beyond the newest event")
    );
    let too_many: Vec<i64> = (1..=101).collect();
    assert_eq!(
        post(json!({"type": "read", "ids": too_many})).await.status,
        400
    );
    assert_eq!(
        post(json!({"type": "refresh", "token": "x"})).await.status,
        400
    );
    assert_eq!(post(json!({"type": "read"})).await.status, 400);
    let state: i64 = db.value("SELECT count(*) FROM pgrelay.read_state").await;
    assert_eq!(state, 0, "nothing refused was written");

    let mut ws = relay.notifications("2").await;
    ws.send_text(&json!({"type": "read", "up_to": newest + 1}).to_string())
        .await;
    let (code, reason) = ws.close_code().await;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "read beyond the newest event")
    );

    // Read messages count against the client message rate (1/s, bursts of
    // 10): 40 at once is over it even if handling them took seconds.
    let mut ws = relay.notifications("2").await;
    for _ in 0..40 {
        ws.send_text(&json!({"type": "read", "up_to": newest}).to_string())
            .await;
    }
    let (code, reason) = ws.close_code().await;
    assert_eq!((code, reason.as_str()), (1008, "too many messages"));
}

/// A `POST /read` whose body is sent only in part holds nothing but its own
/// connection: the body is read (bounded in size and time) before the
/// request takes one of the user's replay turns. Two such requests used to
/// hold both of the user's turns for as long as their clients liked, and
/// the user's every history page, read mark and replay got 429. A body
/// that does not arrive in 10 s is answered 408.
#[tokio::test]
async fn a_read_request_with_a_stalled_body_holds_no_turn() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let db = TestDb::demo("bell_stalled_body").await;
    let relay = TestRelay::start(&db).await;
    let id = db.business(2, "One").await;
    let addr = relay.relay.addr();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /read/notifications/ HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: {}\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\nExpect: 100-continue\r\n\r\n",
            bearer(&token("2", false))
        );
        stream.write_all(head.as_bytes()).await.expect("send head");
        // hyper says 100 Continue when the handler first reads the body:
        // from then on the request is as far in as it will get.
        let answer = response_head(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 100"), "{answer}");
        stream
            .write_all(b"{\"type\":")
            .await
            .expect("send part of the body");
        stalled.push(stream);
    }
    let answer = post_read(&relay, "2", json!({"type": "read", "up_to": id})).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let (status, body) = history(&relay, "/history/notifications/", "2").await;
    assert_eq!(status, 200, "{body}");
    // The stalled bodies are given up on after 10 s: 408.
    for mut stream in stalled {
        let mut answer = vec![0; 12];
        tokio::time::timeout(WAIT, stream.read_exact(&mut answer))
            .await
            .expect("no answer to the stalled request in time")
            .expect("read the answer");
        assert_eq!(answer, b"HTTP/1.1 408");
    }
}

/// A read message takes one of the user's replay turns, like `POST /read`:
/// with both held (two replays stuck on a locked log), a socket's read
/// message starts no query. It is dropped, logged and counted, and the
/// socket goes on; with a turn free again the next one goes through.
/// Before, every read message started a query of its own, so a user's
/// sockets could keep any number of pool connections busy.
#[tokio::test]
async fn a_read_message_takes_a_turn_and_without_one_starts_no_query() {
    let db = TestDb::demo("bell_read_turn").await;
    let relay = TestRelay::start_with(&db, |config| config.replay_memory = 0).await;
    let addr = relay.relay.addr();
    let mut reader = relay.notifications("2").await;
    let business = db.business(2, "One").await;
    let event = reader.event().await;
    assert_eq!(event["data"]["id"], business);
    let id = event["id"].as_i64().expect("an event id");
    let epoch = epoch(&db).await;
    let path = format!("/ws/notifications/?last_id=0&epoch={epoch}");
    let (locker, mut stuck) = hold_two_replays(&db, &relay, &path, &token("2", false)).await;
    let watcher = db.client().await;
    let refused = || async {
        sample(
            &metrics(addr).await,
            r#"pgrelay_replays_refused_total{kind="read_message"}"#,
        )
    };
    assert_eq!(refused().await, Some(0.0));
    reader
        .send_text(&json!({"type": "read", "up_to": id}).to_string())
        .await;
    wait_for("the read message to be refused", || async {
        refused().await == Some(1.0)
    })
    .await;
    assert_eq!(
        lock_waits(&watcher).await,
        2,
        "the read message started a query"
    );
    // A history page and a `POST /read` get 429, a `hello` asked for its
    // unread count goes without it, each refusal counted by what asked.
    let (status, body) = history(&relay, "/history/notifications/", "2").await;
    assert_eq!(status, 429, "{body}");
    let answer = post_read(&relay, "2", json!({"type": "read", "up_to": id})).await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    let mut badge = relay
        .ws("/ws/notifications/?unread=1", &token("2", false))
        .await;
    let hello = badge.hello().await;
    assert_eq!(hello["unread"], Value::Null, "{hello}");
    let text = metrics(addr).await;
    for (kind, n) in [
        ("replay", 0.0),
        ("history", 1.0),
        ("read_request", 1.0),
        ("read_message", 1.0),
        ("unread_count", 1.0),
    ] {
        let series = format!(r#"pgrelay_replays_refused_total{{kind="{kind}"}}"#);
        assert_eq!(sample(&text, &series), Some(n), "{series}");
    }

    locker.batch_execute("ROLLBACK").await.expect("unlock");
    for ws in &mut stuck {
        assert_eq!(ws.event().await["id"], id, "the stuck replay completes");
    }
    drop(stuck);
    // The replays' turns come back as they end: a read message goes
    // through once one is free (retried, bounded, meanwhile).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        reader
            .send_text(&json!({"type": "read", "up_to": id}).to_string())
            .await;
        let read = next_of(&mut reader, "read");
        let read = tokio::time::timeout(std::time::Duration::from_millis(500), read).await;
        if read.is_ok_and(|read| read["up_to"] == id) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no read frame");
    }
}

/// A user keeps read state for at most 10,000 streams: a super admin may
/// open any key of a stream, and each key's state is a row. At the cap a
/// mark on a new key is refused (400) and writes nothing, not even a log
/// event; a key the user already has still moves.
#[tokio::test]
async fn read_state_is_kept_for_at_most_ten_thousand_streams_a_user() {
    let db = TestDb::demo("bell_read_cap").await;
    let relay = TestRelay::start(&db).await;
    let business = db.business(2, "One").await;
    let up_to = max_id(&db).await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO pgrelay.read_state (user_id, stream) \
             SELECT '1', 'businesses/' || i FROM generate_series(1, 10000) AS i",
            &[],
        )
        .await
        .expect("10,000 read states of user 1");
    let mark = |user: &str, admin: bool, key: String| {
        let path = format!("/read/businesses/{key}/");
        let (addr, token) = (relay.relay.addr(), token(user, admin));
        async move {
            let body = json!({"type": "read", "up_to": up_to}).to_string();
            http_body(
                addr,
                "POST",
                &path,
                &[("authorization", &bearer(&token))],
                &body,
            )
            .await
        }
    };
    let refused = mark("1", true, "10001".into()).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains("too many streams"),
        "{}",
        refused.body
    );
    assert_eq!(max_id(&db).await, up_to, "a refused mark wrote an event");
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM pgrelay.read_state WHERE user_id = '1'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 10000);
    // A stream the admin has state for still moves; another user's new
    // one is not counted against user 1.
    let moved = mark("1", true, "42".into()).await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    let owner = mark("2", false, business.to_string()).await;
    assert_eq!(owner.status, 200, "{}", owner.body);
    // On a socket, the same refusal closes it with 1008 and says why.
    let mut socket = relay.ws("/ws/businesses/10002/", &token("1", true)).await;
    socket.hello().await;
    socket
        .send_text(&json!({"type": "read", "up_to": up_to}).to_string())
        .await;
    let (code, reason) = socket.close_code().await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too many streams"), "{reason}");
}
