//! Resume: `?last_id=N&epoch=E` replays, in id order, every event after N that
//! the socket may see, then goes live with no gap and no duplicate at the
//! seam; a cursor that cannot be honoured gets `reset`, never a silent gap.
//!
//! Expected ids always come from `pgrelay.events` itself, so each test checks
//! the socket against the log, not against what the relay thinks it sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::harness::*;

/// The seam: rows are committed from another task, one transaction each,
/// before, during and after the replay, so some reach the socket through the
/// replay and some through the live queue. The socket must see every id
/// after `last_id` exactly once, in order: a relay that subscribes after the
/// replay loses the rows committed in between, one that subscribes before
/// and does not dedupe sends them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_everything_after_last_id_then_goes_live_with_no_gap_or_duplicate() {
    let db = TestDb::demo("resume_seam").await;
    let relay = TestRelay::start(&db).await;
    let mut watcher = relay.dashboard().await;
    // Three replay pages (REPLAY_PAGE is 500), so the replay takes a while.
    db.exec(
        "INSERT INTO businesses (owner_id, name) \
         SELECT 2, 'backlog ' || g FROM generate_series(1, 1200) g",
    )
    .await;
    let backlog = ids_after(&db, 0).await;
    assert_eq!(backlog.len(), 1200);
    // Once the relay has handed the backlog on, a new socket's seam lies
    // after it: the backlog must come through the replay.
    assert_same_ids(
        &read_ids(&mut watcher, 1200).await,
        &backlog,
        "live backlog",
    );
    drop(watcher);
    let last_id = backlog[99];
    let epoch = epoch(&db).await;

    // Four writers, so commits land at any moment of the connect and replay.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let url = db.url.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let client = connect(&url).await;
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    insert_business(&client, 2, &format!("live {w}.{n}")).await;
                    n += 1;
                }
                n
            })
        })
        .collect();

    let mut ws = relay
        .ws(
            &format!("/ws/dashboard/?last_id={last_id}&epoch={epoch}"),
            &token("1", true),
        )
        .await;
    let hello = ws.hello().await;
    let seam = hello["last_id"].as_i64().expect("hello.last_id");

    // Read until well past the seam, then stop the writer and read the rest.
    let mut ids = Vec::new();
    while ids.iter().filter(|&&id| id > seam).count() < 20 {
        ids.push(id_of(&ws.event().await));
    }
    stop.store(true, Ordering::SeqCst);
    let mut written = 0;
    for writer in writers {
        written += writer.await.expect("writer task");
    }
    let newest = max_id(&db).await;
    while ids.last() != Some(&newest) {
        ids.push(id_of(&ws.event().await));
    }

    assert!(written > 0);
    assert!(
        ids.iter().filter(|&&id| id <= seam).count() >= 1100,
        "the backlog comes through the replay"
    );
    assert_strictly_increasing(&ids);
    assert_same_ids(
        &ids,
        &ids_after(&db, last_id).await,
        &format!("the socket must see every event after last_id={last_id} exactly once"),
    );
}

/// Replay runs every event through the same routing as live delivery: a user
/// resuming gets only the events that name them, never another user's, even
/// when they sit on the same channels, interleaved.
#[tokio::test]
async fn resume_on_notifications_never_leaks_another_users_events() {
    let db = TestDb::demo("resume_no_leak").await;
    let relay = TestRelay::start(&db).await;
    let client = db.client().await;
    let mine = insert_business(&client, 2, "mine").await;
    let theirs = insert_business(&client, 4, "theirs").await;
    let last_id = max_id(&db).await;
    for i in 0..10 {
        insert_business(&client, 2, &format!("mine {i}")).await;
        insert_business(&client, 4, &format!("theirs {i}")).await;
        // For 4 only (owner), for 2 (owner), for 2 (customer) and 4 (owner).
        insert_reservation(&client, theirs, 3).await;
        insert_reservation(&client, mine, 3).await;
        insert_reservation(&client, theirs, 2).await;
    }
    let epoch = epoch(&db).await;

    let users = ["2", "4"];
    let mut sockets = Vec::new();
    for user in users {
        let expected = ids_for_user_after(&db, user, last_id).await;
        assert_eq!(expected.len(), 30, "test setup: events for user {user}");
        let ws = resume(
            &relay,
            "/ws/notifications/",
            &token(user, false),
            last_id,
            &epoch,
        )
        .await;
        sockets.push((user, ws, expected));
    }
    for (user, ws, expected) in &mut sockets {
        let mut ids = Vec::new();
        for _ in 0..expected.len() {
            let event = ws.event().await;
            let data = &event["data"];
            let names_user = |field: &str| data[field].as_i64() == user.parse().ok();
            let concerns_user = match event["channel"].as_str() {
                Some("business_events") => names_user("owner_id"),
                Some("reservation_events") => {
                    names_user("business_owner_id") || names_user("customer_id")
                }
                _ => false,
            };
            assert!(
                concerns_user,
                "user {user} got someone else's event: {event}"
            );
            ids.push(id_of(&event));
        }
        assert_same_ids(&ids, expected, &format!("user {user}'s replay"));
    }

    // Live after the replay: each user's next frame is their own business,
    // though the other's was committed just before it.
    let for_4 = insert_business(&client, 4, "for 4").await;
    let for_2 = insert_business(&client, 2, "for 2").await;
    for (user, ws, _) in &mut sockets {
        let own = if *user == "2" { for_2 } else { for_4 };
        let next = ws.event().await;
        assert_eq!(next["data"]["id"], own, "user {user} live: {next}");
    }
    // And 2's socket never gets 4's live event later either.
    let last = insert_business(&client, 2, "last for 2").await;
    assert_eq!(sockets[0].1.event().await["data"]["id"], last);
}

/// A backlog larger than several replay pages, committed in one transaction
/// (so the ids are contiguous and share one commit), replays completely and
/// in order; the filtered stream's pages contain rows it may not see, which
/// must not end the replay early.
#[tokio::test]
async fn large_backlog_replays_completely_in_order_across_pages() {
    let db = TestDb::demo("resume_backlog").await;
    let relay = TestRelay::start(&db).await;
    db.exec(
        "INSERT INTO businesses (owner_id, name) \
         SELECT CASE WHEN g % 3 = 0 THEN 4 ELSE 2 END, 'bulk ' || g \
         FROM generate_series(1, 3000) g",
    )
    .await;
    let all = ids_after(&db, 0).await;
    assert_eq!(all.len(), 3000);
    // Not on a page boundary.
    let last_id = all[6];
    let epoch = epoch(&db).await;

    let mut dashboard = resume(&relay, "/ws/dashboard/", &token("1", true), last_id, &epoch).await;
    let expected = ids_after(&db, last_id).await;
    assert_eq!(expected.len(), 2993);
    let ids = read_ids(&mut dashboard, expected.len()).await;
    assert_strictly_increasing(&ids);
    assert_same_ids(&ids, &expected, "dashboard replay of 2,993 events");

    let mut owner = resume(
        &relay,
        "/ws/notifications/",
        &token("2", false),
        last_id,
        &epoch,
    )
    .await;
    let expected_owner = ids_for_user_after(&db, "2", last_id).await;
    assert_eq!(expected_owner.len(), 1995);
    let ids = read_ids(&mut owner, expected_owner.len()).await;
    assert_same_ids(&ids, &expected_owner, "owner 2's filtered replay");

    // Then live, with nothing left over from the replay.
    let id = db.business(2, "after the backlog").await;
    assert_eq!(dashboard.event().await["data"]["id"], id);
    assert_eq!(owner.event().await["data"]["id"], id);
}

/// A cursor from another event log (restored or reinstalled database) gets
/// `reset` with reason `epoch_mismatch` instead of a replay, then live events.
#[tokio::test]
async fn epoch_mismatch_answers_reset_then_continues_live() {
    let db = TestDb::demo("resume_epoch").await;
    let relay = TestRelay::start(&db).await;
    // Seen by the relay before the resume connects, so they are below its
    // `hello.last_id` and only a replay could send them.
    let mut seen = relay.dashboard().await;
    for i in 0..3 {
        db.business(2, &format!("before {i}")).await;
        seen.event().await;
    }
    let first = ids_after(&db, 0).await[0];
    let mut ws = relay
        .ws(
            &format!("/ws/dashboard/?last_id={first}&epoch=not-this-log"),
            &token("1", true),
        )
        .await;
    let hello = ws.hello().await;
    assert_eq!(hello["epoch"], epoch(&db).await.as_str());
    let reset = ws.next_json().await;
    assert_eq!(
        reset,
        serde_json::json!({"type": "reset", "reason": "epoch_mismatch"})
    );
    // No replay of the two events after `first`: the next frame is live.
    let id = db.business(2, "live").await;
    let event = ws.event().await;
    assert_eq!(event["data"]["id"], id, "{event}");
}

/// A cursor beyond the newest event in the log was not given by this log:
/// `reset` with reason `cursor_unknown`, then live events.
#[tokio::test]
async fn cursor_beyond_the_log_answers_reset_cursor_unknown_then_continues_live() {
    let db = TestDb::demo("resume_unknown").await;
    let relay = TestRelay::start(&db).await;
    // Seen by the relay before the resume connects (below its `hello.last_id`).
    let mut seen = relay.dashboard().await;
    db.business(2, "before").await;
    seen.event().await;
    let beyond = max_id(&db).await + 1000;
    let mut ws = relay
        .ws(
            &format!("/ws/dashboard/?last_id={beyond}&epoch={}", epoch(&db).await),
            &token("1", true),
        )
        .await;
    ws.hello().await;
    assert_eq!(
        ws.next_json().await,
        serde_json::json!({"type": "reset", "reason": "cursor_unknown"})
    );
    let id = db.business(2, "live").await;
    assert_eq!(ws.event().await["data"]["id"], id);
}

/// Retention deleted events after the cursor: the replay would have a hole,
/// so the client gets `reset` with reason `cursor_expired`. A cursor exactly
/// at the pruned edge lost nothing and replays normally. (The relay starts
/// after the pruning: one that handed the events out still holds them in
/// memory and replays them, see `recent.rs`.)
#[tokio::test]
async fn cursor_older_than_the_retained_window_answers_reset_cursor_expired() {
    let db = TestDb::demo("resume_expired").await;
    for i in 0..5 {
        db.business(2, &format!("old {i}")).await;
    }
    let old = ids_after(&db, 0).await;
    let client = db.client().await;
    // The function retention calls, with a zero age: prunes all five.
    let deleted: i32 = client
        .query_one("SELECT pgrelay.prune('0 seconds'::interval, 1000)", &[])
        .await
        .expect("prune")
        .get(0);
    assert_eq!(deleted, 5);
    let pruned_through: i64 = client
        .query_one("SELECT pruned_through FROM pgrelay.meta", &[])
        .await
        .expect("read pgrelay.meta")
        .get(0);
    assert_eq!(pruned_through, old[4]);
    for i in 0..3 {
        db.business(2, &format!("kept {i}")).await;
    }
    let kept = ids_after(&db, pruned_through).await;
    assert_eq!(kept.len(), 3);
    let epoch = epoch(&db).await;
    let relay = TestRelay::start(&db).await;

    let mut expired = relay
        .ws(
            &format!("/ws/dashboard/?last_id={}&epoch={epoch}", old[1]),
            &token("1", true),
        )
        .await;
    expired.hello().await;
    assert_eq!(
        expired.next_json().await,
        serde_json::json!({"type": "reset", "reason": "cursor_expired"})
    );

    let mut at_edge = resume(
        &relay,
        "/ws/dashboard/",
        &token("1", true),
        pruned_through,
        &epoch,
    )
    .await;
    assert_eq!(read_ids(&mut at_edge, 3).await, kept);

    let id = db.business(2, "live").await;
    assert_eq!(expired.event().await["data"]["id"], id);
    assert_eq!(at_edge.event().await["data"]["id"], id);
}

/// Empties the log the way retention does on a quiet system (nothing newer
/// than `--retention`) and returns the newest id that was deleted.
async fn prune_everything(db: &TestDb) -> i64 {
    let client = db.client().await;
    client
        .query_one("SELECT pgrelay.prune('0 seconds'::interval, 1000)", &[])
        .await
        .expect("prune");
    assert_eq!(max_id(db).await, 0, "the log is empty");
    client
        .query_one("SELECT pruned_through FROM pgrelay.meta", &[])
        .await
        .expect("read pgrelay.meta")
        .get(0)
}

/// A client that had seen the newest event lost nothing when retention
/// empties the log afterwards: its resume must not be answered with `reset`.
#[tokio::test]
async fn caught_up_cursor_is_not_reset_after_retention_empties_the_log() {
    let db = TestDb::demo("resume_empty_log").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    for i in 0..3 {
        db.business(2, &format!("old {i}")).await;
    }
    let newest = read_ids(&mut dashboard, 3).await[2];
    drop(dashboard);
    assert_eq!(prune_everything(&db).await, newest);

    let mut ws = resume(
        &relay,
        "/ws/dashboard/",
        &token("1", true),
        newest,
        &epoch(&db).await,
    )
    .await;
    let id = db.business(2, "live").await;
    let next = ws.next_json().await;
    assert_eq!(
        next["type"], "event",
        "a client that saw the newest event (id {newest}) lost nothing, yet got {next}"
    );
    assert_eq!(next["data"]["id"], id);
}

/// `hello.last_id` is a cursor for a client that has none yet: on a relay
/// started after retention emptied the log it must not be below the ids
/// already deleted, or the client's first resume is answered with `reset`.
#[tokio::test]
async fn hello_last_id_on_an_emptied_log_resumes_without_reset() {
    let db = TestDb::demo("resume_empty_hello").await;
    for i in 0..3 {
        db.business(2, &format!("old {i}")).await;
    }
    let newest = prune_everything(&db).await;
    let relay = TestRelay::start(&db).await;
    let mut fresh = relay.ws("/ws/dashboard/", &token("1", true)).await;
    let cursor = fresh.hello().await["last_id"]
        .as_i64()
        .expect("hello.last_id");
    drop(fresh);
    assert!(
        cursor >= newest,
        "hello.last_id {cursor} is below the newest event ever committed ({newest})"
    );

    let mut resumed = resume(
        &relay,
        "/ws/dashboard/",
        &token("1", true),
        cursor,
        &epoch(&db).await,
    )
    .await;
    let id = db.business(2, "live").await;
    let next = resumed.next_json().await;
    assert_eq!(next["type"], "event", "resume from hello.last_id: {next}");
    assert_eq!(next["data"]["id"], id);
}

/// Ids are taken at COMMIT, in commit order, not at INSERT: a transaction
/// that inserted first but commits last gets the higher id, so a client that
/// has seen the other transaction's id still receives it on resume. With a
/// plain bigserial (id taken at INSERT) A would get the lower id and be
/// skipped by every cursor past it.
#[tokio::test]
async fn event_ids_follow_commit_order_so_a_resume_never_skips_a_late_commit() {
    let db = TestDb::demo("resume_commit_order").await;
    let relay = TestRelay::start(&db).await;
    let mut live = relay.dashboard().await;
    let a = db.client().await;
    let b = db.client().await;

    let a_business: i64 = {
        a.batch_execute("BEGIN").await.expect("A: BEGIN");
        insert_business(&a, 2, "A").await
    };
    // B must be able to commit while A is open (an id taken at INSERT under
    // a lock held to commit would block it behind A).
    let b_business = tokio::time::timeout(WAIT, async {
        b.batch_execute("BEGIN").await.expect("B: BEGIN");
        let id = insert_business(&b, 2, "B").await;
        b.batch_execute("COMMIT").await.expect("B: COMMIT");
        id
    })
    .await
    .expect("B commits while A is still open");
    assert!(
        a_business < b_business,
        "test setup: A inserted first ({a_business} < {b_business})"
    );

    // A client sees B's event, then goes away before A commits.
    let b_event = live.event().await;
    assert_eq!(b_event["data"]["name"], "B");
    let b_id = id_of(&b_event);
    drop(live);
    a.batch_execute("COMMIT").await.expect("A: COMMIT");

    let rows = db
        .client()
        .await
        .query(
            "SELECT id, payload->>'name' FROM pgrelay.events ORDER BY id",
            &[],
        )
        .await
        .expect("read pgrelay.events");
    let log: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        log.iter()
            .map(|(_, name)| name.as_str())
            .collect::<Vec<_>>(),
        ["B", "A"],
        "the log in id order must be the commit order: {log:?}"
    );
    let a_id = log[1].0;
    assert!(
        a_id > b_id,
        "A committed last, so its id {a_id} > B's {b_id}"
    );

    // Resuming from the one it saw, it still gets A.
    let mut resumed = resume(
        &relay,
        "/ws/dashboard/",
        &token("1", true),
        b_id,
        &epoch(&db).await,
    )
    .await;
    let a_event = resumed.event().await;
    assert_eq!(id_of(&a_event), a_id);
    assert_eq!(a_event["data"]["name"], "A");
}

/// Replicas share one database-wide log: both deliver every event, and a
/// cursor handed out by one resumes on the other with nothing lost.
#[tokio::test]
async fn resume_on_another_replica_with_the_first_ones_cursor_loses_nothing() {
    let db = TestDb::demo("resume_replica").await;
    let first = TestRelay::start(&db).await;
    let second = TestRelay::start(&db).await;
    let mut on_first = first.dashboard().await;
    let mut on_second = second.dashboard().await;
    let client = db.client().await;

    for i in 0..20 {
        insert_business(&client, 2, &format!("batch one {i}")).await;
    }
    let batch_one = ids_after(&db, 0).await;
    assert_eq!(read_ids(&mut on_second, 20).await, batch_one);
    drop(on_second);
    // The client reads 8 of them from the first replica, then loses it.
    let seen = read_ids(&mut on_first, 8).await;
    assert_eq!(seen, batch_one[..8]);
    drop(on_first);
    for i in 0..10 {
        insert_business(&client, 2, &format!("batch two {i}")).await;
    }

    let cursor = seen[7];
    let mut resumed = resume(
        &second,
        "/ws/dashboard/",
        &token("1", true),
        cursor,
        &epoch(&db).await,
    )
    .await;
    let expected = ids_after(&db, cursor).await;
    assert_eq!(expected.len(), 22);
    assert_eq!(read_ids(&mut resumed, 22).await, expected);
    let id = insert_business(&client, 2, "live").await;
    assert_eq!(resumed.event().await["data"]["id"], id);
}

/// A client may resume on a replica that is behind the cursor another one
/// gave it (here its listener is locked out of the database). The replica
/// must honour the cursor: once caught up it sends only what follows it,
/// never the events the client already has.
#[tokio::test]
async fn resume_on_a_replica_behind_the_cursor_sends_only_what_follows_it() {
    let db = TestDb::demo("resume_behind").await;
    let ahead = TestRelay::start(&db).await;
    let behind = TestRelay::start_with(&db, |config| {
        config.database.application_name("behind");
    })
    .await;
    let client = db.client().await;
    let mut on_ahead = ahead.dashboard().await;
    for i in 0..3 {
        insert_business(&client, 2, &format!("both see {i}")).await;
    }
    read_ids(&mut on_ahead, 3).await;

    // The database refuses new connections (set from another database) and
    // the second replica's LISTEN backend is terminated: it stays behind.
    // Kept to the end of the test: its database is dropped with it.
    let admin_db = TestDb::empty("resume_behind_admin").await;
    let admin = admin_db.client().await;
    let allow = |yes: bool| format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {yes}", db.name);
    admin
        .batch_execute(&allow(false))
        .await
        .expect("refuse new connections");
    let killed = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'behind:listen'",
            &[],
        )
        .await
        .expect("terminate the second replica's LISTEN backend");
    assert_eq!(killed.len(), 1);
    wait_for("the second replica to lose LISTEN", || async {
        !behind.relay.is_ready()
    })
    .await;

    for i in 0..10 {
        insert_business(&client, 2, &format!("only the first sees {i}")).await;
    }
    let cursor = *read_ids(&mut on_ahead, 10).await.last().expect("ids");
    let mut resumed = behind
        .ws(
            &format!("/ws/dashboard/?last_id={cursor}"),
            &token("1", true),
        )
        .await;
    let seam = resumed.hello().await["last_id"]
        .as_i64()
        .expect("hello.last_id");
    assert!(
        seam < cursor,
        "test setup: the replica is behind ({seam} < {cursor})"
    );
    for i in 0..5 {
        insert_business(&client, 2, &format!("after the resume {i}")).await;
    }

    admin
        .batch_execute(&allow(true))
        .await
        .expect("accept connections again");
    behind.wait_ready().await;
    let expected = ids_after(&db, cursor).await;
    assert_eq!(expected.len(), 5);
    assert_eq!(read_ids(&mut resumed, 5).await, expected);
    let id = insert_business(&client, 2, "live").await;
    assert_eq!(resumed.event().await["data"]["id"], id);
}
