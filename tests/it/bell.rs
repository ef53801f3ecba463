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
    let before = first["next_before"].as_i64().expect("more to come");
    let (_, second) = history(
        &relay,
        &format!("/history/notifications/?limit=100&before={before}"),
        "2",
    )
    .await;
    assert_eq!(event_ids(&second), mine[4..]);
    assert_eq!(second["next_before"], Value::Null, "{second}");
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
