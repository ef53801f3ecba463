//! What a resuming client can cost PostgreSQL: one rule for user ids in live
//! routing and replay, replay pages that read only the user's rows (through
//! the payload index) in bounded id windows, a server-side statement
//! timeout, and caps on replays running at once.

use crate::harness::*;
use pgrelay::wire::Close;

/// Appends events to the log by hand (as capture would, minus the trigger)
/// and wakes the listener: `payloads` as JSON text, on business_events.
async fn log_events(db: &TestDb, payloads: &[&str]) -> Vec<i64> {
    let client = db.client().await;
    let mut ids = Vec::new();
    for payload in payloads {
        let id: i64 = client
            .query_one(
                "INSERT INTO pgrelay.events (id, channel, table_name, op, payload) \
                 VALUES (nextval('pgrelay.events_id_seq'), 'business_events', 'businesses', \
                         'INSERT', $1::text::jsonb) RETURNING id",
                &[payload],
            )
            .await
            .unwrap_or_else(|e| panic!("log {payload}: {e}"))
            .get(0);
        client
            .execute(
                "SELECT pg_notify('business_events', $1)",
                &[&id.to_string()],
            )
            .await
            .expect("notify");
        ids.push(id);
    }
    ids
}

/// Replay from the log (a relay without `--replay-memory`: the keyed SQL)
/// and from memory follow the same rule.
#[tokio::test]
async fn one_user_id_rule_for_live_and_replay_with_edge_values() {
    let db = TestDb::demo("bounds_id_rule").await;
    let relay = TestRelay::start(&db).await;
    let from_log = TestRelay::start_with(&db, |config| config.replay_memory = 0).await;
    let (start, epoch) = (max_id(&db).await, epoch(&db).await);
    let users = ["1", "01", "+1", "2.5", "2.50", "18446744073709551616", "-3"];
    let mut live = Vec::new();
    for user in users {
        live.push(relay.notifications(user).await);
    }
    let ids = log_events(
        &db,
        &[
            r#"{"id": 1, "owner_id": 2.50}"#,
            r#"{"id": 2, "owner_id": 18446744073709551616}"#,
            r#"{"id": 3, "owner_id": "01"}"#,
            r#"{"id": 4, "owner_id": 1}"#,
            r#"{"id": 5, "owner_id": "2.50"}"#,
            r#"{"id": 6, "owner_id": -3}"#,
            r#"{"id": 7, "owner_id": "1"}"#,
            r#"{"id": 8, "owner_id": 1.0}"#,
        ],
    )
    .await;
    // Who is named by what: strings as written, integers as written,
    // fractions by nobody.
    let expected: [&[usize]; 7] = [&[3, 6], &[2], &[], &[], &[4], &[1], &[5]];
    // A marker to every user, so "nothing more" is observable.
    let marker_payloads: Vec<String> = users
        .iter()
        .map(|u| serde_json::json!({"id": 99, "owner_id": u}).to_string())
        .collect();
    let markers = log_events(
        &db,
        &marker_payloads
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    for (n, user) in users.iter().enumerate() {
        let want: Vec<i64> = expected[n]
            .iter()
            .map(|&i| ids[i])
            .chain([markers[n]])
            .collect();
        let got_live = read_ids(&mut live[n], want.len()).await;
        assert_eq!(got_live, want, "live, user {user:?}");
        for (relay, how) in [(&relay, "from memory"), (&from_log, "from the log")] {
            let mut replay = resume(
                relay,
                "/ws/notifications/",
                &token(user, false),
                start,
                &epoch,
            )
            .await;
            let got_replay = read_ids(&mut replay, want.len()).await;
            assert_eq!(got_replay, want, "replay {how}, user {user:?}");
        }
    }
    // Each path was the one named: memory answered every resume on one
    // relay, and the other read the log.
    let users = users.len() as f64;
    assert_eq!(replay_counts(relay.relay.addr()).await, (0.0, users));
    let (rows, from_memory) = replay_counts(from_log.relay.addr()).await;
    assert!(rows > 0.0, "the log was read");
    assert_eq!(from_memory, 0.0);
}

/// 300,000 events of other users with five of one user spread among them:
/// the user's replay from 0 ships their five rows and no other, and
/// PostgreSQL finds them through the payload index, not by a scan.
#[tokio::test]
async fn sparse_users_replay_reads_only_their_rows_through_the_index() {
    let db = TestDb::demo("bounds_sparse").await;
    db.exec(
        "INSERT INTO pgrelay.events (id, channel, table_name, op, payload) \
         SELECT nextval('pgrelay.events_id_seq'), 'business_events', 'businesses', 'INSERT', \
                jsonb_build_object('id', g, 'owner_id', \
                    CASE WHEN g % 60000 = 7 THEN 424242 ELSE 1000 + g % 5000 END, \
                    'name', 'business ' || g) \
         FROM generate_series(1, 300000) g; \
         ANALYZE pgrelay.events; \
         INSERT INTO users (id, email) VALUES (424242, 'sparse@example.com');",
    )
    .await;
    let relay = TestRelay::start(&db).await;
    let epoch = epoch(&db).await;
    let before = metric(relay.relay.addr(), "pgrelay_replay_rows_total")
        .await
        .unwrap_or(0.0);
    let mut ws = resume(
        &relay,
        "/ws/notifications/",
        &token("424242", false),
        0,
        &epoch,
    )
    .await;
    let got = read_ids(&mut ws, 5).await;
    let theirs = db
        .client()
        .await
        .query(
            "SELECT id FROM pgrelay.events WHERE payload ->> 'owner_id' = '424242' ORDER BY id",
            &[],
        )
        .await
        .expect("the user's ids")
        .iter()
        .map(|row| row.get::<_, i64>(0))
        .collect::<Vec<_>>();
    assert_eq!(got, theirs, "the replay is not exactly the user's events");
    let marker = db.business(424242, "live after the replay").await;
    assert_eq!(ws.event().await["data"]["id"], marker);
    let read = metric(relay.relay.addr(), "pgrelay_replay_rows_total")
        .await
        .unwrap_or(0.0)
        - before;
    assert_eq!(read, 5.0, "the replay read rows of other users");

    // And PostgreSQL answers that page from the index, not by a scan.
    let plan: Vec<String> = db
        .client()
        .await
        .query(
            &format!(
                "EXPLAIN {}",
                pgrelay::db::KEYED_EVENTS_BETWEEN
                    .replace("$1", "0")
                    .replace("$2", "100000")
                    .replace(
                        "$3",
                        r#"ARRAY['{"owner_id":"424242"}','{"owner_id":424242}']"#
                    )
                    .replace("$4", "ARRAY['business_events']")
                    .replace("$5", "ARRAY['owner_id']")
                    .replace("$6", "'424242'")
                    .replace("$7", "true")
                    .replace("$8", "500")
            ),
            &[],
        )
        .await
        .expect("explain")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("events_payload_idx"), "{plan}");
}

/// A replay query that cannot finish (the log is locked) is stopped by
/// PostgreSQL itself: the socket gets 1011, and no pgrelay query is left
/// running in the server while the lock is still held. Meanwhile a user's
/// third replay at once is refused with 1013, and the two that waited
/// complete once the lock goes. (Replays from the log: no `--replay-memory`.)
#[tokio::test]
async fn stuck_replays_are_stopped_by_the_server_and_capped_per_user() {
    let db = TestDb::demo("bounds_stuck").await;
    let relay = TestRelay::start_with(&db, |config| config.replay_memory = 0).await;
    for i in 0..3 {
        db.business(2, &format!("old {i}")).await;
    }
    let epoch = epoch(&db).await;
    let owner = token("2", false);
    let path = format!("/ws/notifications/?last_id=0&epoch={epoch}");

    // Hold the log: every replay read now waits.
    let (locker, [mut first, mut second]) = hold_two_replays(&db, &relay, &path, &owner).await;
    let watcher = db.client().await;
    let mut third = relay.ws(&path, &owner).await;
    third.hello().await;
    let (code, reason) = third.close_code().await;
    assert_eq!(code, Close::ReplayBusy.code(), "{reason}");
    assert!(reason.contains("retry"), "{reason}");
    let refused = r#"pgrelay_replays_refused_total{kind="replay"}"#;
    assert_eq!(metric(relay.relay.addr(), refused).await, Some(1.0));

    // The server's statement timeout ends the waits; the sockets hear 1011.
    for ws in [&mut first, &mut second] {
        let (code, reason) = ws.close_code().await;
        assert_eq!(code, 1011, "{reason}");
    }
    assert_eq!(
        lock_waits(&watcher).await,
        0,
        "a replay query outlived its socket"
    );
    locker.batch_execute("ROLLBACK").await.expect("unlock");

    // Retried, both complete, with every event.
    for _ in 0..2 {
        let mut again = relay.ws(&path, &owner).await;
        again.hello().await;
        let mut names = Vec::new();
        for _ in 0..3 {
            names.push(again.event().await["data"]["name"].clone());
        }
        assert_eq!(names, ["old 0", "old 1", "old 2"]);
    }
}

/// A page of the log is bounded in bytes as well as in rows. 80 events of
/// 900 KiB (72 MiB) are in the log when pgrelay starts; priming reads the
/// newest into memory and a resume from before them all reads the log, a
/// few events a page. Every event arrives once, in order, and pgrelay's
/// peak RSS stays under 120 MiB (its replay memory is 32 MiB; measured
/// here: 74 to 78 MiB). Before, one priming page (1,000 rows) or one replay
/// page (500 rows) held all 80, as text and then as frames: 357 MiB.
#[tokio::test]
async fn pages_of_large_events_are_bounded_in_bytes_not_only_in_rows() {
    let db = TestDb::demo("bounds_bytes").await;
    let cursor = max_id(&db).await;
    let description = "d".repeat(900 << 10);
    db.businesses_described(2, 80, &description).await;
    let all = ids_after(&db, cursor).await;
    assert_eq!(all.len(), 80);
    let serve =
        ServeProcess::ready(&["--database-url", &db.url, "--jwt-secret", SECRET], &[]).await;
    let epoch = epoch(&db).await;
    let mut ws = serve
        .socket(
            &format!("/ws/dashboard/?last_id={cursor}&epoch={epoch}"),
            &token("1", true),
        )
        .await;
    assert_same_ids(&read_ids(&mut ws, 80).await, &all, "the replay");
    let pid = serve.child.id().expect("pgrelay is running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    assert!(
        peak_kib < 120 << 10,
        "pgrelay's peak RSS was {} MiB replaying 72 MiB of events",
        peak_kib >> 10
    );
}
