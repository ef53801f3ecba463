//! The sparse-resume scenario: a log of `--log-events` events written
//! straight into `pgrelay.events`, in which `--sparse-users` users own
//! exactly `--sparse-events` events each, spread evenly over the id range.
//! It times one sparse user's resume from `last_id=0` and from the oldest
//! retained id, then every sparse user's resume at once, and checks each got
//! exactly its events, no 1011, and no pool backend left busy. The
//! quiet-machine check ([`crate::quiet`]) runs once pgrelay has read the
//! filled log, before the first resume; both measured phases are judged.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrelay::wire::Close;

use super::{backoff, replay_rows, replay_rows_since, ResumeArgs};
use crate::args::Args;
use crate::client::{connect, connect_gated, ClientSpec, Ctx, Outcome};
use crate::error::{BenchError, Result};
use crate::expected::Expected;
use crate::frame::Frame;
use crate::quiet::{self, Window};
use crate::server::{connect_db, Server};
use crate::stats::{code_counts, codes_json, codes_line, median_max, millis, quantile};

/// The last line of the table.
const PASS: &str = "PASS: every resume got exactly its events, no 1011, no busy backend";
const FAIL: &str =
    "FAIL: a resume got wrong or duplicated events, a 1011, or a backend stayed busy";

/// Sparse users are numbered from here (busy users are 1..=--busy-users,
/// the load run's dashboard users 1,000,001 and up).
const SPARSE_BASE: i64 = 2_000_001;
/// Rows per statement when filling the log.
const FILL_CHUNK: i64 = 250_000;
/// The longest wait for pgrelay to read a freshly filled log.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);

/// Who owns which event of the generated log. Position p = id - 1: the
/// events at p = j * stride + stride / 2 (j < sparse users x sparse events)
/// belong to sparse user j mod sparse users, so each sparse user's events
/// are spread evenly over the whole range; every other event belongs to busy
/// user p mod busy users + 1. [`FILL`] is the same rule in SQL.
#[derive(Debug, Clone, Copy)]
struct Layout {
    events: i64,
    sparse_users: i64,
    sparse_events: i64,
    busy_users: i64,
}

impl Layout {
    fn new(a: &ResumeArgs) -> Layout {
        Layout {
            events: a.log_events,
            sparse_users: a.sparse_users,
            sparse_events: a.sparse_events,
            busy_users: a.busy_users,
        }
    }

    fn stride(&self) -> i64 {
        self.events / (self.sparse_users * self.sparse_events)
    }

    /// The rule itself, which [`FILL`] states in SQL (checked by the tests;
    /// the run checks the filled log against [`Self::sparse_ids`]).
    #[cfg(test)]
    fn owner(&self, id: i64) -> i64 {
        let (p, stride) = (id - 1, self.stride());
        if p % stride == stride / 2 && p / stride < self.sparse_users * self.sparse_events {
            SPARSE_BASE + (p / stride) % self.sparse_users
        } else {
            1 + p % self.busy_users
        }
    }

    /// The ids of sparse user `i` (0-based), ascending.
    fn sparse_ids(&self, i: i64) -> Vec<i64> {
        let stride = self.stride();
        (0..self.sparse_events)
            .map(|k| (k * self.sparse_users + i) * stride + stride / 2 + 1)
            .collect()
    }
}

/// Events $1..=$2 of the layout ($3 events, $4 stride, $5 sparse users, $6
/// sparse events, $7 busy users, $8 the first sparse user), shaped like the
/// demo's business capture; created_at one millisecond apart, ending now.
const FILL: &str = "INSERT INTO pgrelay.events (id, channel, table_name, op, payload, created_at) \
     SELECT g, 'business_events', 'businesses', 'INSERT', \
            jsonb_build_object('id', g, 'owner_id', \
                CASE WHEN (g - 1) % $4::bigint = $4::bigint / 2 \
                          AND (g - 1) / $4::bigint < $5::bigint * $6::bigint \
                     THEN $8::bigint + ((g - 1) / $4::bigint) % $5::bigint \
                     ELSE 1 + (g - 1) % $7::bigint END, \
                'name', 'business ' || g, 'description', '', \
                'created_at', ts.t, 'updated_at', ts.t), ts.t \
     FROM generate_series($1::bigint, $2::bigint) g, \
          LATERAL (SELECT now() - ($3::bigint - g) * interval '1 millisecond' AS t) ts";

struct Fill {
    insert_s: f64,
    index_s: f64,
    analyze_s: f64,
    index: String,
    table_mib: f64,
    index_mib: f64,
}

/// Fills the (empty) log. The payload index is dropped first and built again
/// from its own definition afterwards: one build instead of a million
/// inserts into a GIN index, the same index either way.
async fn fill_log(db: &tokio_postgres::Client, layout: &Layout) -> Result<Fill> {
    let existing: i64 = db
        .query_one("SELECT count(*) FROM pgrelay.events", &[])
        .await
        .map_err(BenchError::db("reading pgrelay.events"))?
        .get(0);
    if existing > 0 {
        return Err(BenchError::run(format!(
            "pgrelay.events already holds {existing} events: sparse-resume needs an empty log"
        )));
    }
    let index: Option<String> = db
        .query_one(
            "SELECT pg_get_indexdef(to_regclass('pgrelay.events_payload_idx'))",
            &[],
        )
        .await
        .map_err(BenchError::db("reading the payload index"))?
        .get(0);
    let index = index.ok_or_else(|| {
        BenchError::run("pgrelay.events_payload_idx is missing: is pgrelay installed?")
    })?;
    db.batch_execute("DROP INDEX pgrelay.events_payload_idx")
        .await
        .map_err(BenchError::db("dropping the payload index"))?;
    let began = Instant::now();
    let mut from = 1;
    while from <= layout.events {
        let to = (from + FILL_CHUNK - 1).min(layout.events);
        db.execute(
            FILL,
            &[
                &from,
                &to,
                &layout.events,
                &layout.stride(),
                &layout.sparse_users,
                &layout.sparse_events,
                &layout.busy_users,
                &SPARSE_BASE,
            ],
        )
        .await
        .map_err(BenchError::db("filling pgrelay.events"))?;
        eprintln!("  {to} events written");
        from = to + 1;
    }
    db.execute(
        "SELECT setval('pgrelay.events_id_seq', $1)",
        &[&layout.events],
    )
    .await
    .map_err(BenchError::db("moving pgrelay.events_id_seq"))?;
    let insert_s = began.elapsed().as_secs_f64();
    let began = Instant::now();
    db.batch_execute(&format!("SET maintenance_work_mem = '256MB'; {index}"))
        .await
        .map_err(BenchError::db("building the payload index again"))?;
    let index_s = began.elapsed().as_secs_f64();
    let began = Instant::now();
    db.batch_execute("ANALYZE pgrelay.events")
        .await
        .map_err(BenchError::db("ANALYZE pgrelay.events"))?;
    let analyze_s = began.elapsed().as_secs_f64();
    let sizes = db
        .query_one(
            "SELECT pg_table_size('pgrelay.events'), \
                    pg_relation_size('pgrelay.events_payload_idx')",
            &[],
        )
        .await
        .map_err(BenchError::db("reading sizes"))?;
    Ok(Fill {
        insert_s,
        index_s,
        analyze_s,
        index,
        table_mib: sizes.get::<_, i64>(0) as f64 / 1048576.0,
        index_mib: sizes.get::<_, i64>(1) as f64 / 1048576.0,
    })
}

#[derive(Debug, Default)]
struct Resumed {
    /// Event ids received, in order.
    ids: Vec<i64>,
    /// Frames whose id was not above the previous one.
    duplicates: u32,
    resets: u32,
    /// Close codes pgrelay sent before the resume completed (1006: the
    /// connection ended without one).
    closes: Vec<u16>,
    /// Handshakes that failed (connect error, refusal, timeout).
    connect_errors: u32,
    /// Connections opened, retries included.
    attempts: u32,
    /// When the last wanted event arrived.
    done_at: Option<Instant>,
    error: Option<String>,
}

impl Resumed {
    /// Keeps an event above the cursor (`from`, then the last id received);
    /// breaks when `want` have arrived.
    fn on_text(&mut self, frame: &[u8], from: i64, want: usize) -> ControlFlow<()> {
        match Frame::parse(frame) {
            Frame::Event { id, .. } if id <= self.ids.last().copied().unwrap_or(from) => {
                self.duplicates += 1;
            }
            Frame::Event { id, .. } => {
                self.ids.push(id);
                if self.ids.len() >= want {
                    self.done_at = Some(Instant::now());
                    return ControlFlow::Break(());
                }
            }
            Frame::Reset => self.resets += 1,
            Frame::Other => {}
        }
        ControlFlow::Continue(())
    }
}

/// Resumes `spec` from `from` until `want` events arrived (each retry from
/// the last id received), then closes. 1013, 1011 and failed handshakes are
/// retried with backoff until `deadline`.
async fn resume_until(
    ctx: &Ctx,
    spec: &ClientSpec,
    from: i64,
    epoch: &str,
    want: usize,
    deadline: Instant,
) -> Resumed {
    let mut r = Resumed::default();
    loop {
        r.attempts += 1;
        let cursor = r.ids.last().copied().unwrap_or(from);
        match connect_gated(ctx, spec, Some((cursor, epoch))).await {
            Ok((mut ws, _hello)) => {
                let read = tokio::time::timeout_at(
                    deadline.into(),
                    ws.read_loop(|frame, _| r.on_text(frame, from, want)),
                )
                .await;
                match read {
                    Ok(Outcome::Done) => {
                        ws.close_normally().await;
                        return r;
                    }
                    Ok(outcome) => r.closes.push(outcome.close_code()),
                    Err(_) => {
                        r.error = Some(format!(
                            "{} of {want} events after {} connections",
                            r.ids.len(),
                            r.attempts
                        ));
                        return r;
                    }
                }
            }
            Err(e) if e.is_final_refusal() => {
                r.error = Some(e.to_string());
                return r;
            }
            Err(e) => {
                r.connect_errors += 1;
                r.error = Some(e.to_string());
            }
        }
        let wait = backoff(r.attempts - 1);
        if Instant::now() + wait > deadline {
            let last = r.error.take().unwrap_or_default();
            r.error = Some(format!(
                "gave up after {} connections ({} of {want} events; last error: {last}; closes {:?})",
                r.attempts,
                r.ids.len(),
                r.closes
            ));
            return r;
        }
        tokio::time::sleep(wait).await;
    }
}

/// Connects `spec` (no resume) until `hello.last_id` reaches `head`;
/// returns the epoch.
async fn wait_for_head(ctx: &Ctx, spec: &ClientSpec, head: i64) -> Result<String> {
    let began = Instant::now();
    let mut said = Instant::now();
    loop {
        let (mut ws, hello) = Box::pin(connect(ctx, spec, None)).await?;
        ws.close_normally().await;
        if hello.last_id >= head {
            return Ok(hello.epoch);
        }
        if began.elapsed() > CATCH_UP_TIMEOUT {
            return Err(BenchError::run(format!(
                "pgrelay did not read the log up to {head} within {} s (hello.last_id {})",
                CATCH_UP_TIMEOUT.as_secs(),
                hello.last_id
            )));
        }
        if said.elapsed() > Duration::from_secs(5) {
            eprintln!("  pgrelay has read up to {} of {head}", hello.last_id);
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn run(args: &Args, server: &mut Server) -> Result<bool> {
    let a = &args.resume;
    let layout = Layout::new(a);
    let db = connect_db(&server.database).await?;
    eprintln!(
        "filling pgrelay.events with {} events ({} sparse users x {}, {} busy users)...",
        layout.events, layout.sparse_users, layout.sparse_events, layout.busy_users
    );
    let fill = fill_log(&db, &layout).await?;
    let head = layout.events;
    // One wake-up: the listener reads the log from its cursor up to the head.
    let woke = Instant::now();
    db.execute(
        "SELECT pg_notify('business_events', $1)",
        &[&head.to_string()],
    )
    .await
    .map_err(BenchError::db("pg_notify"))?;
    let ctx = Arc::new(Ctx::new(
        server,
        a.sparse_users as usize,
        a.sparse_users as usize,
    ));
    let probe = ClientSpec::user(&server.secret, "1")?;
    let epoch = wait_for_head(&ctx, &probe, head).await?;
    let caught_up_s = woke.elapsed().as_secs_f64();
    eprintln!("pgrelay caught up with the log in {caught_up_s:.1} s");

    // What each sparse user must get: the log, routed by the bench.
    let expected = Expected::load(&db, 0, head).await?;
    for i in 0..layout.sparse_users {
        let user = (SPARSE_BASE + i).to_string();
        if expected.user_ids(&user) != layout.sparse_ids(i).as_slice() {
            return Err(BenchError::run(format!(
                "the filled log does not match its layout for user {user}"
            )));
        }
    }
    let oldest: i64 = db
        .query_one(
            "SELECT coalesce((SELECT min(id) FROM pgrelay.events), 0), \
                    (SELECT pruned_through FROM pgrelay.meta)",
            &[],
        )
        .await
        .map_err(BenchError::db("reading the log"))
        .map(|row| row.get::<_, i64>(0).max(row.get::<_, i64>(1)))?;
    let want = layout.sparse_events as usize;
    let mut passed = true;
    let mut quiet = quiet::check(args, server).await?;

    // (a) and (b): one user at a time, interleaved, a different user each run.
    let mut singles: Vec<(&str, i64, i64, f64, f64)> = Vec::new(); // (case, from, user, ms, replay rows)
    let window = Window::open(server);
    for rep in 0..a.repeats as i64 {
        for (case, from, i) in [("a", 0, rep), ("b", oldest, a.repeats as i64 + rep)] {
            let user = SPARSE_BASE + i;
            let spec = ClientSpec::user(&server.secret, &user.to_string())?;
            let rows_before = replay_rows(server).await;
            let began = Instant::now();
            let r = resume_until(&ctx, &spec, from, &epoch, want, began + a.resume_timeout).await;
            let rows = replay_rows_since(server, rows_before).await;
            let want_ids: Vec<i64> = expected
                .user_ids(&user.to_string())
                .iter()
                .copied()
                .filter(|&id| id > from)
                .collect();
            let Some(done) = r.done_at else {
                return Err(BenchError::run(format!(
                    "({case}) user {user}: {}",
                    r.error.unwrap_or_default()
                )));
            };
            let took = millis(done - began);
            let ok = r.ids == want_ids && r.duplicates == 0 && r.closes.is_empty();
            passed &= ok;
            eprintln!(
                "  ({case}) user {user} from last_id={from}: {} events in {took:.1} ms, \
                 {rows} rows read{}",
                r.ids.len(),
                if ok {
                    String::new()
                } else {
                    format!(
                        " MISMATCH (closes {:?}, duplicates {})",
                        r.closes, r.duplicates
                    )
                }
            );
            singles.push((case, from, user, took, rows));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (_, singles_load) = quiet.close(window, server);

    // (c): every sparse user at once, from 0.
    eprintln!("{} resumes at once...", layout.sparse_users);
    let window = Window::open(server);
    let rows_before = replay_rows(server).await;
    let began = Instant::now();
    let deadline = began + a.resume_timeout;
    let tasks: Vec<_> = (0..layout.sparse_users)
        .map(|i| {
            let ctx = Arc::clone(&ctx);
            let spec = ClientSpec::user(&server.secret, &(SPARSE_BASE + i).to_string());
            let epoch = epoch.clone();
            tokio::spawn(async move {
                let spec = spec?;
                Ok::<_, BenchError>(resume_until(&ctx, &spec, 0, &epoch, want, deadline).await)
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(
            task.await
                .map_err(BenchError::task("a resume task failed"))??,
        );
    }
    let all_closed = began.elapsed();
    let (_, burst_load) = quiet.close(window, server);
    let burst_rows = replay_rows_since(server, rows_before).await;
    // Every socket has closed: no pool backend may still be running a query.
    let busy = db
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'active'), count(*), \
                    coalesce(string_agg(left(query, 120), ' | ') \
                             FILTER (WHERE state = 'active'), '') \
             FROM pg_stat_activity WHERE application_name = 'pgrelay'",
            &[],
        )
        .await
        .map_err(BenchError::db("reading pg_stat_activity"))?;
    let (active, pool_backends, active_queries): (i64, i64, String) =
        (busy.get(0), busy.get(1), busy.get(2));

    let mut completed = 0usize;
    let mut wrong = 0usize;
    let mut duplicates = 0u64;
    let mut resets = 0u64;
    let mut connect_errors = 0u64;
    let mut retried = 0usize;
    let mut first_error = None;
    let mut times = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let user = (SPARSE_BASE + i as i64).to_string();
        duplicates += u64::from(r.duplicates);
        resets += u64::from(r.resets);
        connect_errors += u64::from(r.connect_errors);
        if r.attempts > 1 {
            retried += 1;
        }
        if let Some(done) = r.done_at {
            completed += 1;
            times.push(millis(done - began));
        }
        if r.ids != expected.user_ids(&user) {
            wrong += 1;
        }
        if let Some(e) = &r.error {
            first_error.get_or_insert_with(|| format!("user {user}: {e}"));
        }
    }
    times.sort_by(f64::total_cmp);
    let closes = code_counts(results.iter().flat_map(|r| r.closes.iter().copied()));
    let all_done = times.last().copied().unwrap_or(f64::NAN);
    let burst_ok = completed == results.len()
        && wrong == 0
        && duplicates == 0
        && !closes.contains_key(&Close::ReplayFailed.code())
        && active == 0;
    passed &= burst_ok;

    // Report.
    let mut a_ms: Vec<f64> = singles.iter().filter(|s| s.0 == "a").map(|s| s.3).collect();
    let mut b_ms: Vec<f64> = singles.iter().filter(|s| s.0 == "b").map(|s| s.3).collect();
    let (a_med, a_max) = median_max(&mut a_ms);
    let (b_med, b_max) = median_max(&mut b_ms);
    if args.json {
        let runs: Vec<_> = singles
            .iter()
            .map(|(case, from, user, took, rows)| {
                serde_json::json!({"case": case, "from": from, "user": user, "ms": took, "replay_rows": rows})
            })
            .collect();
        println!(
            "{}",
            quiet.stamp(serde_json::json!({
                "scenario": "sparse-resume",
                "target": server.description,
                "log": {
                    "events": layout.events, "sparse_users": layout.sparse_users,
                    "sparse_events": layout.sparse_events, "busy_users": layout.busy_users,
                    "insert_s": fill.insert_s, "index_s": fill.index_s, "analyze_s": fill.analyze_s,
                    "table_mib": fill.table_mib, "index_mib": fill.index_mib,
                    "pgrelay_caught_up_s": caught_up_s, "oldest_retained": oldest,
                },
                "single": {
                    "runs": runs,
                    "from_0_ms": {"median": a_med, "max": a_max},
                    "from_oldest_ms": {"median": b_med, "max": b_max},
                    "load": singles_load,
                },
                "burst": {
                    "resumes": results.len(), "completed": completed, "wrong_ids": wrong,
                    "duplicates": duplicates, "resets": resets, "retried": retried,
                    "connect_errors": connect_errors,
                    "closes": codes_json(&closes),
                    "all_complete_ms": all_done, "p50_ms": quantile(&times, 0.5),
                    "p99_ms": quantile(&times, 0.99), "all_closed_ms": millis(all_closed),
                    "replay_rows": burst_rows,
                    "active_pool_backends_after": active, "pool_backends": pool_backends,
                    "load": burst_load,
                },
                "passed": passed,
            }))
        );
    } else {
        println!(
            "pgrelay-bench --scenario sparse-resume{}: {} events, {} sparse users x {} events \
             (stride {}), {} busy users",
            quiet.mark(),
            layout.events,
            layout.sparse_users,
            layout.sparse_events,
            layout.stride(),
            layout.busy_users
        );
        println!("target: {}", server.description);
        println!(
            "log: written in {:.1} s, payload index built in {:.1} s, ANALYZE {:.1} s; \
             table {:.0} MiB, GIN index {:.0} MiB; pgrelay read it in {caught_up_s:.1} s",
            fill.insert_s, fill.index_s, fill.analyze_s, fill.table_mib, fill.index_mib
        );
        println!("      index: {}", fill.index);
        println!();
        for (case, from, user, took, rows) in &singles {
            println!(
                "  ({case}) user {user} from last_id={from:<2}  {took:>7.1} ms  ({rows} rows read)"
            );
        }
        println!(
            "  (a) from last_id=0:            median {a_med:.1} ms, max {a_max:.1} ms \
             (target < 100 ms: {})",
            if a_max < 100.0 { "met" } else { "not met" }
        );
        println!(
            "  (b) from the oldest id ({oldest}): median {b_med:.1} ms, max {b_max:.1} ms \
             (target < 100 ms: {})",
            if b_max < 100.0 { "met" } else { "not met" }
        );
        println!("      {}", singles_load.line());
        println!();
        println!(
            "  (c) {} resumes at once from 0: {completed} complete, {wrong} with wrong ids, \
             {duplicates} duplicated, {resets} resets",
            results.len()
        );
        println!(
            "      all complete in {all_done:.0} ms (p50 {:.0} ms, p99 {:.0} ms), all closed \
             in {:.0} ms; {} rows read",
            quantile(&times, 0.5),
            quantile(&times, 0.99),
            millis(all_closed),
            burst_rows
        );
        println!(
            "      closes by pgrelay: {} ({retried} resumes retried, {connect_errors} failed \
             handshakes){}",
            codes_line(&closes),
            first_error
                .as_deref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        );
        println!(
            "      pgrelay pool backends active after all closed: {active} (of {pool_backends}){}",
            if active > 0 {
                format!(": {active_queries}")
            } else {
                String::new()
            }
        );
        println!("      {}", burst_load.line());
        let mut tail = String::new();
        quiet.row(&mut tail);
        quiet.verdict(&mut tail, passed, PASS, FAIL);
        print!("{tail}");
    }
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            events: 1_000_000,
            sparse_users: 1000,
            sparse_events: 10,
            busy_users: 5000,
        }
    }

    #[test]
    fn sparse_users_own_exactly_their_events_spread_evenly() {
        let l = layout();
        assert_eq!(l.stride(), 100);
        let ids = l.sparse_ids(0);
        assert_eq!(ids.len(), 10);
        assert_eq!(ids[0], 51);
        assert!(ids.windows(2).all(|w| w[1] - w[0] == 100_000));
        assert_eq!(l.sparse_ids(999).last(), Some(&999_951));
        let mut count = std::collections::HashMap::new();
        for id in 1..=l.events {
            let owner = l.owner(id);
            if owner >= SPARSE_BASE {
                *count.entry(owner).or_insert(0) += 1;
            } else {
                assert!((1..=l.busy_users).contains(&owner));
            }
        }
        assert_eq!(count.len(), 1000);
        assert!(count.values().all(|&n| n == 10));
        for i in [0, 1, 500, 999] {
            assert!(l
                .sparse_ids(i)
                .iter()
                .all(|&id| l.owner(id) == SPARSE_BASE + i));
        }
    }
}
