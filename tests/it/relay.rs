//! The end-to-end path: a committed row reaches exactly the sockets it should,
//! in the documented frame shapes, whichever way the token is presented.

use std::collections::BTreeSet;
use std::time::UNIX_EPOCH;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::harness::*;

/// The keys of a JSON object frame.
fn keys(frame: &Value) -> BTreeSet<&str> {
    frame
        .as_object()
        .unwrap_or_else(|| panic!("frame is not an object: {frame}"))
        .keys()
        .map(String::as_str)
        .collect()
}

#[tokio::test]
async fn business_insert_reaches_dashboard_and_owner_only() {
    let db = TestDb::demo("routing_business").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;
    let mut other = relay.notifications("4").await;

    let id = db.business(2, "Blue Door Cafe").await;
    let to_dashboard = dashboard.event().await;
    assert_eq!(to_dashboard["channel"], "business_events");
    assert_eq!(to_dashboard["table"], "businesses");
    assert_eq!(to_dashboard["op"], "INSERT");
    assert_eq!(to_dashboard["data"]["id"], id);
    assert_eq!(to_dashboard["data"]["owner_id"], 2);
    let to_owner = owner.event().await;
    assert_eq!(to_owner, to_dashboard);

    // User 4 owns the next business: the first thing they see must be it,
    // which proves they never got the first one.
    let theirs = db.business(4, "Other Place").await;
    assert_eq!(other.event().await["data"]["id"], theirs);
}

#[tokio::test]
async fn reservation_reaches_dashboard_business_owner_and_customer_only() {
    let db = TestDb::demo("routing_reservation").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;
    let mut customer = relay.notifications("3").await;
    let mut unrelated = relay.notifications("4").await;

    let business = db.business(2, "Blue Door Cafe").await;
    assert_eq!(dashboard.event().await["data"]["id"], business);
    assert_eq!(owner.event().await["data"]["id"], business);

    let reservation = db.reservation(business, 3).await;
    let to_dashboard = dashboard.event().await;
    assert_eq!(to_dashboard["channel"], "reservation_events");
    assert_eq!(to_dashboard["table"], "reservations");
    assert_eq!(to_dashboard["op"], "INSERT");
    assert_eq!(to_dashboard["data"]["id"], reservation);
    assert_eq!(to_dashboard["data"]["customer_id"], 3);
    // The trigger enriches the row with the owner so the router can find them.
    assert_eq!(to_dashboard["data"]["business_owner_id"], 2);
    // The business owner (via business_owner_id) and the customer get the
    // very same frame; for the customer it is the first frame at all (they
    // did not get the business).
    assert_eq!(owner.event().await, to_dashboard);
    assert_eq!(customer.event().await, to_dashboard);

    // The unrelated user's first frame is a later event that is theirs:
    // they got neither the business nor the reservation.
    let marker = db.business(4, "Marker").await;
    let first = unrelated.event().await;
    assert_eq!(first["channel"], "business_events");
    assert_eq!(first["data"]["id"], marker);
    assert_eq!(dashboard.event().await["data"]["id"], marker);

    // Exactly once: the next frame of owner and customer is the next
    // reservation, not a second copy of the first.
    let second = db.reservation(business, 3).await;
    assert_eq!(owner.event().await["data"]["id"], second);
    assert_eq!(customer.event().await["data"]["id"], second);
    assert_eq!(dashboard.event().await["data"]["id"], second);
}

#[tokio::test]
async fn business_update_reaches_dashboard_and_owner_as_update() {
    let db = TestDb::demo("routing_update").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;
    let mut unrelated = relay.notifications("3").await;

    let business = db.business(2, "Old Name").await;
    assert_eq!(dashboard.event().await["op"], "INSERT");
    assert_eq!(owner.event().await["op"], "INSERT");

    db.exec(&format!(
        "UPDATE businesses SET name = 'New Name' WHERE id = {business}"
    ))
    .await;
    let to_dashboard = dashboard.event().await;
    assert_eq!(to_dashboard["op"], "UPDATE");
    assert_eq!(to_dashboard["channel"], "business_events");
    assert_eq!(to_dashboard["table"], "businesses");
    assert_eq!(to_dashboard["data"]["id"], business);
    assert_eq!(to_dashboard["data"]["name"], "New Name");
    assert_eq!(owner.event().await, to_dashboard);

    // User 3 got neither the insert nor the update.
    let marker = db.business(3, "Marker").await;
    assert_eq!(unrelated.event().await["data"]["id"], marker);
}

/// `at` must look exactly like `2026-11-25T18:40:00.123456Z`.
fn assert_at_shape(at: &str) {
    let pattern = "dddd-dd-ddTdd:dd:dd.ddddddZ";
    let shaped = at.len() == pattern.len()
        && at.chars().zip(pattern.chars()).all(|(c, p)| match p {
            'd' => c.is_ascii_digit(),
            _ => c == p,
        });
    assert!(shaped, "at {at:?} is not RFC 3339 UTC with microseconds");
}

#[tokio::test]
async fn event_frame_has_exactly_the_documented_fields_in_utc_and_increasing_ids() {
    let db = TestDb::demo("envelope_fields").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;

    // Write from a session in a far-from-UTC zone: `at` must still be UTC.
    let writer = db.client().await;
    writer
        .batch_execute("SET TimeZone = 'Asia/Kathmandu'")
        .await
        .expect("set time zone");
    let mut ids = Vec::new();
    for name in ["One", "Two", "Three"] {
        let id: i64 = writer
            .query_one(
                "INSERT INTO businesses (owner_id, name) VALUES (2, $1) RETURNING id",
                &[&name],
            )
            .await
            .expect("insert business")
            .get(0);
        ids.push(id);
    }

    let reader = db.client().await;
    let mut last_event_id = 0;
    for id in ids {
        let event = dashboard.event().await;
        assert_eq!(
            keys(&event),
            BTreeSet::from(["type", "id", "channel", "table", "op", "at", "data"]),
            "{event}"
        );
        assert_eq!(event["type"], "event");
        assert_eq!(event["channel"], "business_events");
        assert_eq!(event["table"], "businesses");
        assert_eq!(event["op"], "INSERT");
        assert_eq!(event["data"]["id"], id);
        let event_id = event["id"].as_i64().expect("id is an integer");
        assert!(event_id > last_event_id, "ids increase: {event}");
        last_event_id = event_id;

        // `id`, `data` and `at` are those of the event log row; `at` is the
        // commit-time instant in UTC, to the microsecond.
        let row = reader
            .query_one(
                "SELECT payload, (extract(epoch FROM created_at) * 1000000)::bigint \
                 FROM pgrelay.events WHERE id = $1",
                &[&event_id],
            )
            .await
            .expect("event row");
        let payload: Value = row.get(0);
        let micros: i64 = row.get(1);
        assert_eq!(event["data"], payload);
        let at = event["at"].as_str().expect("at is a string");
        assert_at_shape(at);
        let parsed = humantime::parse_rfc3339(at).expect("at parses as RFC 3339");
        let parsed = parsed
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_micros() as i64;
        assert_eq!(parsed, micros, "at {at} is not created_at in UTC");
    }
}

#[tokio::test]
async fn hello_names_stream_user_newest_id_and_epoch() {
    let db = TestDb::demo("hello_fields").await;
    let relay = TestRelay::start(&db).await;
    let epoch = epoch(&db).await;

    // Make the newest id something other than zero, and wait until the relay
    // has handed it on.
    let mut first = relay.dashboard().await;
    db.business(2, "Existing").await;
    let newest = first.event().await["id"].as_i64().expect("id");

    let mut dashboard = relay.ws("/ws/dashboard/", &token("1", true)).await;
    let hello = dashboard.hello().await;
    assert_eq!(
        keys(&hello),
        BTreeSet::from(["type", "stream", "user", "last_id", "epoch"]),
        "{hello}"
    );
    assert_eq!(hello["stream"], "dashboard");
    assert_eq!(hello["user"], json!("1"), "user is a string: {hello}");
    assert_eq!(hello["last_id"], json!(newest), "{hello}");
    assert_eq!(hello["epoch"], json!(epoch), "{hello}");

    let mut notifications = relay.ws("/ws/notifications/", &token("2", false)).await;
    let hello = notifications.hello().await;
    assert_eq!(
        keys(&hello),
        BTreeSet::from(["type", "stream", "user", "last_id", "epoch"]),
        "{hello}"
    );
    assert_eq!(hello["stream"], "notifications");
    assert_eq!(hello["user"], json!("2"), "user is a string: {hello}");
    assert_eq!(hello["last_id"], json!(newest), "{hello}");
    assert_eq!(hello["epoch"], json!(epoch), "{hello}");
}

#[tokio::test]
async fn hello_last_id_counts_events_committed_before_the_relay_started() {
    let db = TestDb::demo("hello_before_start").await;
    let business = db.business(2, "Before").await;
    db.reservation(business, 3).await;
    let newest: i64 = db.value("SELECT max(id) FROM pgrelay.events").await;
    assert!(newest >= 2, "the log has the two events");

    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.ws("/ws/dashboard/", &token("1", true)).await;
    assert_eq!(dashboard.hello().await["last_id"], json!(newest));
    let mut customer = relay.ws("/ws/notifications/", &token("3", false)).await;
    assert_eq!(customer.hello().await["last_id"], json!(newest));

    // Old events are not replayed to a client that did not ask: the first
    // frame after hello is the next commit.
    let next = db.reservation(business, 3).await;
    assert_eq!(dashboard.event().await["data"]["id"], next);
    assert_eq!(customer.event().await["data"]["id"], next);
}

#[tokio::test]
async fn every_event_above_hello_last_id_arrives_while_writes_race_connects() {
    let db = TestDb::demo("no_gap_at_connect").await;
    // Sockets read only after the writes: room for all of them, so this
    // test is about gaps, not about slow consumers.
    let relay = TestRelay::start_with(&db, |config| {
        config.queues.user = 4096;
        config.queues.dashboard = 4096;
    })
    .await;
    const SOCKETS: usize = 8;

    // One writer commits businesses back to back for as long as sockets are
    // connecting, so every handshake races commits.
    let writer = db.client().await;
    let (started_tx, mut started) = mpsc::channel::<()>(1);
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let writes = tokio::spawn(async move {
        let mut n = 0;
        loop {
            writer
                .execute(
                    "INSERT INTO businesses (owner_id, name) VALUES (2, $1)",
                    &[&format!("Race {n}")],
                )
                .await
                .expect("insert business");
            n += 1;
            if n == 1 {
                let _ = started_tx.send(()).await;
            }
            // At least 30 writes, and on until every socket is connected.
            if n >= 30 && stopped.try_recv().is_ok() {
                return;
            }
        }
    });
    started.recv().await.expect("writer started");
    let mut sockets = Vec::new();
    for n in 0..SOCKETS {
        // Both streams: every write is for owner 2, so both see all of them.
        let mut ws = if n % 2 == 0 {
            relay.ws("/ws/dashboard/", &token("1", true)).await
        } else {
            relay.ws("/ws/notifications/", &token("2", false)).await
        };
        let last_id = ws.hello().await["last_id"].as_i64().expect("last_id");
        sockets.push((ws, last_id));
    }
    let _ = stop.send(());
    writes.await.expect("writer task");

    for (mut ws, last_id) in sockets {
        // Everything committed after hello, read from the log itself.
        let want = ids_after(&db, last_id).await;
        assert!(
            !want.is_empty(),
            "hello.last_id {last_id} is the last write"
        );
        let mut got = Vec::new();
        while got.len() < want.len() {
            got.push(ws.event().await["id"].as_i64().expect("id"));
        }
        assert_eq!(got, want, "socket with hello.last_id {last_id}");
    }
}

#[tokio::test]
async fn committed_right_after_hello_arrives() {
    let db = TestDb::demo("right_after_hello").await;
    let relay = TestRelay::start(&db).await;
    let mut owner = relay.ws("/ws/notifications/", &token("2", false)).await;
    let hello = owner.hello().await;
    let id = db.business(2, "Just After").await;
    let event = owner.event().await;
    assert_eq!(event["data"]["id"], id);
    assert!(event["id"].as_i64() > hello["last_id"].as_i64(), "{event}");
}

#[tokio::test]
async fn notify_payload_is_the_event_id_alone_and_a_large_row_arrives_whole() {
    let db = TestDb::demo("large_row").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;
    let (_listening, mut notifications) = listen(&db.url, "business_events").await;

    let description = "x".repeat(20_000);
    let id = db.business_described(2, "Big", &description).await;

    // What went over NOTIFY was the event id, nothing of the row.
    let payload = tokio::time::timeout(WAIT, notifications.recv())
        .await
        .expect("timed out waiting for the NOTIFY")
        .expect("LISTEN connection open");
    let event_id: i64 = payload
        .parse()
        .unwrap_or_else(|_| panic!("NOTIFY payload is not an id: {payload:?}"));

    for ws in [&mut dashboard, &mut owner] {
        let event = ws.event().await;
        assert_eq!(event["id"], event_id);
        assert_eq!(event["data"]["id"], id);
        assert_eq!(event["op"], "INSERT");
        assert_eq!(event["table"], "businesses");
        assert_at_shape(event["at"].as_str().expect("at"));
        let got = event["data"]["description"].as_str().expect("description");
        assert_eq!(got.len(), 20_000);
        assert!(got == description, "description arrived altered");
    }
}

#[tokio::test]
async fn text_with_quotes_newlines_and_emoji_arrives_unchanged() {
    let db = TestDb::demo("escaping").await;
    let relay = TestRelay::start(&db).await;
    let mut owner = relay.notifications("2").await;
    let name = "Caf\u{e9} \"Q\" \\ </script>\n\ttab \u{1f600} \u{2028}";
    let id = db.business(2, name).await;
    let event = owner.event().await;
    assert_eq!(event["data"]["id"], id);
    assert_eq!(event["data"]["name"], name);
}

#[tokio::test]
async fn user_ids_beyond_two_to_the_53_route_exactly() {
    let db = TestDb::demo("big_user_ids").await;
    db.exec(
        "INSERT INTO users (id, email) VALUES \
         (9007199254740993, 'big@example.com'), (9007199254740992, 'near@example.com')",
    )
    .await;
    let relay = TestRelay::start(&db).await;
    let mut big = relay.notifications("9007199254740993").await;
    // A float would round 2^53 + 1 to 2^53: this user must not get it.
    let mut near = relay.notifications("9007199254740992").await;

    let id = db.business(9_007_199_254_740_993, "Big Owner").await;
    let event = big.event().await;
    assert_eq!(event["data"]["id"], id);
    assert_eq!(event["data"]["owner_id"], json!(9_007_199_254_740_993_i64));
    let marker = db.business(9_007_199_254_740_992, "Near Owner").await;
    assert_eq!(near.event().await["data"]["id"], marker);
}

#[tokio::test]
async fn token_as_bearer_subprotocol_is_accepted_and_answered_with_bearer() {
    let db = TestDb::demo("token_subprotocol").await;
    let relay = TestRelay::start(&db).await;
    let mut request = relay
        .ws_url("/ws/notifications/")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("bearer, {}", token("2", false))).expect("header"),
    );
    let mut ws = Ws::connect_request(request)
        .await
        .unwrap_or_else(|e| panic!("subprotocol token refused: {e:?}"));
    assert_eq!(ws.subprotocol.as_deref(), Some("bearer"));
    assert_eq!(ws.hello().await["user"], "2");
    let id = db.business(2, "Via Subprotocol").await;
    assert_eq!(ws.event().await["data"]["id"], id);
}

#[tokio::test]
async fn token_in_query_string_is_accepted() {
    let db = TestDb::demo("token_query").await;
    let relay = TestRelay::start(&db).await;
    let url = relay.ws_url(&format!("/ws/dashboard/?token={}", token("1", true)));
    let mut ws = Ws::connect(&url, None)
        .await
        .unwrap_or_else(|e| panic!("query token refused: {e:?}"));
    let hello = ws.hello().await;
    assert_eq!(hello["stream"], "dashboard");
    assert_eq!(hello["user"], "1");
    let id = db.business(2, "Via Query").await;
    assert_eq!(ws.event().await["data"]["id"], id);
}

#[tokio::test]
async fn simplejwt_access_token_opens_notifications() {
    let db = TestDb::demo("simplejwt_access").await;
    let relay = TestRelay::start(&db).await;
    // What djangorestframework-simplejwt issues: user_id as a number, no sub.
    let simplejwt = sign(&json!({
        "token_type": "access",
        "exp": now() + 300,
        "iat": now(),
        "jti": "6f1c2d3e4b5a69788796a5b4c3d2e1f0",
        "user_id": 2,
    }));
    let mut ws = relay.ws("/ws/notifications/", &simplejwt).await;
    let hello = ws.hello().await;
    assert_eq!(hello["stream"], "notifications");
    assert_eq!(hello["user"], "2");
    let id = db.business(2, "Simple").await;
    assert_eq!(ws.event().await["data"]["id"], id);
}

#[tokio::test]
async fn user_id_as_string_in_token_matches_number_in_row() {
    let db = TestDb::demo("user_id_text").await;
    let relay = TestRelay::start(&db).await;
    let as_string = sign(&json!({"user_id": "3", "exp": now() + 300}));
    let mut customer = relay.ws("/ws/notifications/", &as_string).await;
    assert_eq!(customer.hello().await["user"], "3");

    let business = db.business(2, "Numbers").await;
    let reservation = db.reservation(business, 3).await;
    let event = customer.event().await;
    assert_eq!(event["data"]["customer_id"], 3, "a number in the row");
    assert_eq!(event["data"]["id"], reservation);
}

#[tokio::test]
async fn healthz_and_readyz_answer_200_once_ready() {
    let db = TestDb::demo("health").await;
    let relay = TestRelay::start(&db).await;
    let addr = relay.relay.addr();
    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    // TestRelay::start waited for readiness.
    assert!(relay.relay.is_ready());
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "ready");

    // And readiness is real: an event committed now is relayed.
    let mut dashboard = relay.dashboard().await;
    let id = db.business(2, "Ready").await;
    assert_eq!(dashboard.event().await["data"]["id"], id);
}
