//! Resume from memory (`src/recent.rs`): a cursor among the newest events
//! is replayed from memory, exactly as the log would replay it, with no
//! query; anything older reads the log; a log that went back is never
//! replayed from memory.
//!
//! Expected ids come from `pgrelay.events` itself. Whether a replay read
//! the database is told by `/metrics`: `replay_rows` counts rows read from
//! the log, `replays_from_memory` the resumes answered from memory.

use crate::harness::*;

/// Mixed traffic, one transaction a row: businesses of owners 2 and 4 and
/// reservations on `mine` (owner 2, customer 3) and `theirs` (owner 4,
/// customer 2), interleaved; `rounds` of four events.
async fn traffic(db: &TestDb, mine: i64, theirs: i64, rounds: usize, tag: &str) {
    let client = db.client().await;
    for i in 0..rounds {
        insert_business(&client, 2, &format!("{tag} mine {i}")).await;
        insert_business(&client, 4, &format!("{tag} theirs {i}")).await;
        for (business, customer) in [(mine, 3_i64), (theirs, 2)] {
            insert_reservation(&client, business, customer).await;
        }
    }
}

/// Two businesses (`mine` of owner 2, `theirs` of owner 4), then `rounds`
/// of [`traffic`] after a cursor, each event seen live by a dashboard (so
/// handed to the hub, and in memory if it fits). Returns (mine, the
/// cursor, the ids after it).
async fn missed_traffic(db: &TestDb, relay: &TestRelay, rounds: usize) -> (i64, i64, Vec<i64>) {
    let mut watcher = relay.dashboard().await;
    let mine = db.business(2, "mine").await;
    let theirs = db.business(4, "theirs").await;
    read_ids(&mut watcher, 2).await;
    let cursor = max_id(db).await;
    traffic(db, mine, theirs, rounds, "missed").await;
    let missed = ids_after(db, cursor).await;
    assert_eq!(missed.len(), 4 * rounds);
    assert_same_ids(&read_ids(&mut watcher, missed.len()).await, &missed, "live");
    (mine, cursor, missed)
}

/// A business of owner 2, inserted now, is the next event on every one of
/// `sockets` (which all see it): each went on live, with nothing replayed
/// twice in between.
async fn goes_live_once<const N: usize>(db: &TestDb, sockets: [&mut Ws; N]) {
    let marker = db.business(2, "live").await;
    for ws in sockets {
        assert_eq!(ws.event().await["data"]["id"], marker);
    }
}

/// Reads `expected.len()` events from `ws`: exactly `expected`, in order.
async fn assert_resumed(ws: &mut Ws, expected: &[i64], what: &str) {
    let ids = read_ids(ws, expected.len()).await;
    assert_strictly_increasing(&ids);
    assert_same_ids(&ids, expected, what);
}

#[tokio::test]
async fn recent_resume_is_served_from_memory_exactly_on_every_endpoint() {
    let db = TestDb::demo("recent_exact").await;
    let relay = TestRelay::start(&db).await;
    let addr = relay.relay.addr();
    // Handed to the hub (so in memory, below every new hello.last_id).
    let (mine, cursor, missed) = missed_traffic(&db, &relay, 30).await;
    let epoch = epoch(&db).await;
    let before = replay_counts(addr).await;

    let owner = token("2", false);
    let stream = format!("/ws/businesses/{mine}/");
    let mut sockets = vec![
        (
            resume(&relay, "/ws/dashboard/", &token("1", true), cursor, &epoch).await,
            missed.clone(),
            "dashboard",
        ),
        (
            resume(&relay, "/ws/notifications/", &owner, cursor, &epoch).await,
            ids_for_user_after(&db, "2", cursor).await,
            "owner 2's notifications",
        ),
        (
            resume(&relay, &stream, &owner, cursor, &epoch).await,
            ids_for_business_after(&db, mine, cursor).await,
            "business mine's stream",
        ),
    ];
    for (ws, expected, what) in &mut sockets {
        assert!(expected.len() >= 30, "test setup: {what}");
        assert_resumed(ws, expected, what).await;
    }
    // Then live, with nothing left over from the replay.
    let marker = db.reservation(mine, 2).await;
    for (ws, _, what) in &mut sockets {
        let next = ws.event().await;
        assert_eq!(next["data"]["id"], marker, "{what}: {next}");
    }

    let after = replay_counts(addr).await;
    assert_eq!(after.0, before.0, "no row was read from the database");
    assert_eq!(after.1 - before.1, 3.0, "three resumes from memory");
}

#[tokio::test]
async fn cursor_older_than_memory_reads_the_database_and_is_exact() {
    let db = TestDb::demo("recent_older").await;
    // Room for about a hundred events of this size.
    let relay = TestRelay::start_with(&db, |config| config.replay_memory = 64 << 10).await;
    let addr = relay.relay.addr();
    let (_, cursor, all) = missed_traffic(&db, &relay, 150).await;
    let epoch = epoch(&db).await;

    // The oldest cursor: the database, every page of it.
    let before = replay_counts(addr).await;
    let mut dashboard = resume(&relay, "/ws/dashboard/", &token("1", true), cursor, &epoch).await;
    assert_resumed(&mut dashboard, &all, "dashboard from the oldest cursor").await;
    let owner = token("2", false);
    let mut notifications = resume(&relay, "/ws/notifications/", &owner, cursor, &epoch).await;
    let expected = ids_for_user_after(&db, "2", cursor).await;
    assert_eq!(expected.len(), 450);
    assert_resumed(
        &mut notifications,
        &expected,
        "owner 2 from the oldest cursor",
    )
    .await;
    let after = replay_counts(addr).await;
    assert!(after.0 >= before.0 + 600.0, "read from the database");
    assert_eq!(after.1, before.1, "not from memory");

    // The newest ten: from memory.
    let recent = all[all.len() - 11];
    let mut newest = resume(&relay, "/ws/dashboard/", &token("1", true), recent, &epoch).await;
    assert_resumed(&mut newest, &all[all.len() - 10..], "the newest ten").await;
    let last = replay_counts(addr).await;
    assert_eq!(last.0, after.0, "no row was read from the database");
    assert_eq!(last.1, after.1 + 1.0, "one resume from memory");

    goes_live_once(&db, [&mut dashboard, &mut notifications, &mut newest]).await;
}

/// A storm right after a restart: rows written while pgrelay was down are in
/// memory as soon as it is back (it reads the newest events at start), and
/// the listener goes on from there with no gap and no duplicate.
#[tokio::test]
async fn rows_written_while_pgrelay_was_down_are_resumed_from_memory() {
    let db = TestDb::demo("recent_restart").await;
    let mine = db.business(2, "mine").await;
    let theirs = db.business(4, "theirs").await;
    let first = TestRelay::start(&db).await;
    let mut watcher = first.dashboard().await;
    let start = max_id(&db).await;
    traffic(&db, mine, theirs, 5, "seen").await;
    let seen = ids_after(&db, start).await;
    let cursor = *read_ids(&mut watcher, seen.len())
        .await
        .last()
        .expect("events");
    drop(watcher);
    assert!(first.relay.shutdown().await, "the first relay stopped");

    traffic(&db, mine, theirs, 25, "while down").await;
    let relay = TestRelay::start(&db).await;
    let addr = relay.relay.addr();
    let epoch = epoch(&db).await;
    let owner = token("2", false);
    let mut dashboard = resume(&relay, "/ws/dashboard/", &token("1", true), cursor, &epoch).await;
    let mut notifications = resume(&relay, "/ws/notifications/", &owner, cursor, &epoch).await;
    let expected = ids_after(&db, cursor).await;
    assert_eq!(expected.len(), 100);
    assert_resumed(&mut dashboard, &expected, "dashboard").await;
    let expected = ids_for_user_after(&db, "2", cursor).await;
    assert_resumed(&mut notifications, &expected, "owner 2").await;

    // Live from the head it started at, once.
    goes_live_once(&db, [&mut dashboard, &mut notifications]).await;
    let (rows, from_memory) = replay_counts(addr).await;
    assert_eq!(rows, 0.0, "no row was read from the database to replay");
    assert_eq!(from_memory, 2.0);
}

/// The log is reinstalled under a running relay (new epoch, ids from 1
/// again, so they overlap the ones in memory): memory is emptied. The old
/// cursor gets `reset`, and a new cursor replays only the new log's events.
#[tokio::test]
async fn a_log_that_went_back_is_never_replayed_from_memory() {
    let db = TestDb::demo("recent_went_back").await;
    let relay = TestRelay::start(&db).await;
    let addr = relay.relay.addr();
    let mut dashboard = relay.dashboard().await;
    for i in 0..5 {
        db.business(2, &format!("old {i}")).await;
    }
    let old = read_ids(&mut dashboard, 5).await;
    let old_epoch = epoch(&db).await;

    db.reinstall_demo().await;
    let new_epoch = epoch(&db).await;
    assert_ne!(new_epoch, old_epoch);
    let (code, _) = dashboard.close_code().await;
    assert_eq!(code, 1012, "the relay noticed");
    relay.wait_ready().await;
    let mut live = relay.dashboard().await;
    for i in 0..3 {
        db.business(2, &format!("new {i}")).await;
    }
    let new = read_ids(&mut live, 3).await;
    assert!(new[0] <= old[4], "test setup: the new ids overlap the old");
    let before = replay_counts(addr).await;

    // The old cursor: `reset`, no event of either log replayed.
    let mut stale = resume(
        &relay,
        "/ws/dashboard/",
        &token("1", true),
        old[1],
        &old_epoch,
    )
    .await;
    assert_eq!(
        stale.next_json().await,
        serde_json::json!({"type": "reset", "reason": "epoch_mismatch"})
    );
    // Without an epoch, the same cursor is a cursor of the new log.
    let mut bare = relay
        .ws(
            &format!("/ws/dashboard/?last_id={}", old[1]),
            &token("1", true),
        )
        .await;
    bare.hello().await;
    // A new cursor: the new log's events, never the old ones in their place.
    let mut fresh = resume(&relay, "/ws/dashboard/", &token("1", true), 0, &new_epoch).await;
    for (ws, expected) in [
        (&mut bare, ids_after(&db, old[1]).await),
        (&mut fresh, new.clone()),
    ] {
        for id in expected {
            let event = ws.event().await;
            assert_eq!(id_of(&event), id);
            let name = event["data"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(name.starts_with("new "), "an event of the old log: {event}");
        }
    }
    let after = replay_counts(addr).await;
    assert_eq!(
        after.1 - before.1,
        2.0,
        "the new log's resumes, from memory"
    );

    goes_live_once(&db, [&mut stale, &mut bare, &mut fresh]).await;
}

/// `--replay-memory` (here the flag of the real binary, 1 MiB) bounds what is
/// kept: of 2.5 MiB of events the newest stay, an old cursor reads the
/// database, and both are exact.
#[tokio::test]
async fn a_tiny_replay_memory_holds_only_the_newest_and_older_cursors_read_the_database() {
    let db = TestDb::demo("recent_bound").await;
    let serve = ServeProcess::ready(
        &[
            "--database-url",
            &db.url,
            "--jwt-secret",
            SECRET,
            "--replay-memory",
            "1",
        ],
        &[],
    )
    .await;
    let addr = serve.addr;
    let admin = token("1", true);
    let mut watcher = serve.socket("/ws/dashboard/", &admin).await;
    let cursor = max_id(&db).await;
    let description = "d".repeat(4096);
    let client = db.client().await;
    for i in 0..600 {
        client
            .execute(
                "INSERT INTO businesses (owner_id, name, description) VALUES (2, $1, $2)",
                &[&format!("big {i}"), &description],
            )
            .await
            .expect("insert a described business");
    }
    let all = ids_after(&db, cursor).await;
    assert_same_ids(&read_ids(&mut watcher, 600).await, &all, "live");
    let epoch = epoch(&db).await;
    let resume_at = |from: i64| {
        let path = format!("/ws/dashboard/?last_id={from}&epoch={epoch}");
        let (serve, admin) = (&serve, &admin);
        async move { serve.socket(&path, admin).await }
    };

    // 600 events of 4 KiB do not fit in 1 MiB: the oldest cursor reads the log.
    let before = replay_counts(addr).await;
    let mut oldest = resume_at(cursor).await;
    assert_resumed(&mut oldest, &all, "from the oldest cursor").await;
    let after = replay_counts(addr).await;
    assert!(after.0 >= before.0 + 600.0, "read from the database");
    assert_eq!(after.1, before.1);
    // The newest 100 (400 KiB) do.
    let mut newest = resume_at(all[all.len() - 101]).await;
    assert_resumed(&mut newest, &all[all.len() - 100..], "the newest 100").await;
    let last = replay_counts(addr).await;
    assert_eq!(last.0, after.0, "no row was read from the database");
    assert_eq!(last.1, after.1 + 1.0);
    let (status, log) = serve.stop().await;
    assert!(status.success(), "{status}: {log}");
}

/// Retention is the log's: events this relay handed out, pruned from the
/// table since, are still replayed from memory (nothing is missing from the
/// range), where a relay that reads the log answers `cursor_expired`.
#[tokio::test]
async fn events_pruned_after_they_were_handed_out_are_still_replayed_from_memory() {
    let db = TestDb::demo("recent_pruned").await;
    let relay = TestRelay::start(&db).await;
    let mut watcher = relay.dashboard().await;
    for i in 0..5 {
        db.business(2, &format!("old {i}")).await;
    }
    let old = read_ids(&mut watcher, 5).await;
    db.client()
        .await
        .query_one("SELECT pgrelay.prune('0 seconds'::interval, 1000)", &[])
        .await
        .expect("prune");
    for i in 0..3 {
        db.business(2, &format!("kept {i}")).await;
    }
    let kept = read_ids(&mut watcher, 3).await;
    let epoch = epoch(&db).await;

    let mut from_memory = resume(&relay, "/ws/dashboard/", &token("1", true), old[1], &epoch).await;
    let expected: Vec<i64> = old[2..].iter().chain(&kept).copied().collect();
    assert_resumed(&mut from_memory, &expected, "old and kept, from memory").await;
    // Without memory: `reset`.
    let reader = TestRelay::start_with(&db, |config| config.replay_memory = 0).await;
    let mut from_log = resume(&reader, "/ws/dashboard/", &token("1", true), old[1], &epoch).await;
    assert_eq!(
        from_log.next_json().await,
        serde_json::json!({"type": "reset", "reason": "cursor_expired"})
    );
}

/// Priming reads the newest events newest first, a page of 1,000 rows (or
/// 2 MiB of payloads, `db::PAGE_BYTES`) at a time, until the budget is full.
/// 2,500 rows written before the relay starts (more than two pages) are all
/// read and resumed from memory; with a 1 MiB budget, 1,500 rows of 4 KiB
/// stop it after its first page, which its bytes end at about 500 rows
/// (what that page holds beyond the budget is dropped), and the newest are
/// still resumed from memory while the oldest cursor reads the log.
#[tokio::test]
async fn priming_reads_newest_first_in_pages_until_the_budget_is_full() {
    let db = TestDb::demo("recent_prime_pages").await;
    let client = db.client().await;
    let start = max_id(&db).await;
    client
        .execute(
            "INSERT INTO businesses (owner_id, name) \
             SELECT 2, 'before start ' || i FROM generate_series(1, 2500) AS i",
            &[],
        )
        .await
        .expect("insert 2,500 businesses");
    let all = ids_after(&db, start).await;
    assert_eq!(all.len(), 2500);
    let args = ["--database-url", &db.url, "--jwt-secret", SECRET];
    let serve = ServeProcess::ready(&args, &[]).await;
    let admin = token("1", true);
    let epoch = epoch(&db).await;
    let resume_path = |from: i64| format!("/ws/dashboard/?last_id={from}&epoch={epoch}");
    let mut dashboard = serve.socket(&resume_path(start), &admin).await;
    assert_resumed(&mut dashboard, &all, "2,500 primed events").await;
    assert_eq!(
        replay_counts(serve.addr).await,
        (0.0, 1.0),
        "all from memory"
    );
    let (status, log) = serve.stop().await;
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("rows=2500 kept=2500"), "{log}");

    let start = max_id(&db).await;
    let description = "d".repeat(4096);
    db.businesses_described(2, 1500, &description).await;
    let all = ids_after(&db, start).await;
    let mut args = args.to_vec();
    args.extend(["--replay-memory", "1"]);
    let serve = ServeProcess::ready(&args, &[]).await;
    let mut newest = serve
        .socket(&resume_path(all[all.len() - 101]), &admin)
        .await;
    assert_resumed(&mut newest, &all[all.len() - 100..], "the newest 100").await;
    assert_eq!(replay_counts(serve.addr).await, (0.0, 1.0), "from memory");
    let mut oldest = serve.socket(&resume_path(start), &admin).await;
    assert_resumed(&mut oldest, &all, "from the oldest cursor").await;
    let (rows, from_memory) = replay_counts(serve.addr).await;
    assert!(rows >= 1500.0, "read from the database: {rows}");
    assert_eq!(from_memory, 1.0);
    let (status, log) = serve.stop().await;
    assert!(status.success(), "{status}: {log}");
    let rows: usize = log
        .split("rows=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rows= in the log: {log}"));
    assert!((400..600).contains(&rows), "one 2 MiB page read: {log}");
}
