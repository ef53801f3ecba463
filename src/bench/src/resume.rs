//! The resume scenarios of issue 10 (item 2): what a resuming client costs
//! pgrelay and PostgreSQL, and that resuming loses and repeats nothing.
//!
//! - `sparse-resume`: a log of `--log-events` events written straight into
//!   `pgrelay.events` (generate_series, a few big statements: this measures
//!   replay, not capture), in which `--sparse-users` users own exactly
//!   `--sparse-events` events each, spread evenly over the id range, and
//!   `--busy-users` other users own the rest. It times one sparse user's
//!   resume on `/ws/notifications/` from `last_id=0` and from the oldest
//!   retained id (connect to last wanted event), then starts every sparse
//!   user's resume at once and checks each got exactly its events (against
//!   the log, routed by the bench's own router), counts closes by code (a
//!   1013 is retried with backoff), and afterwards counts pgrelay's pool
//!   backends still `active` in pg_stat_activity.
//! - `resume-storm`: `--sockets` clients (`--stream`) connect; rows go in
//!   live; pgrelay is stopped (SIGTERM), rows for those users go in through
//!   real transactions while it is down, it is started again on the same
//!   port, and every client reconnects at once with `?last_id=&epoch=`. At
//!   the end every client's ids are checked against the log as in the load
//!   run: 0 lost, 0 duplicated.
//!
//! Everything else (the throwaway cluster and child pgrelay, tokens, the
//! hand-made handshake, the per-client id ranges, the routing check, /proc
//! readings) is the parent module's, used as it is.

use std::sync::atomic::{AtomicBool, AtomicIsize};
use std::sync::OnceLock;

use tokio::sync::watch;

use super::{
    all_connected, compare, connect, connect_db, delivered_total, first_connect, http_get, lock,
    machine_busy_s, parse_int, proc_sample, random_u64, read_loop, splitmix, writer, Args,
    ClientReport, ClientSpec, Ctx, Expected, Outcome, Scenario, Schedule, Server, WriterCounts, Ws,
    EVENT_PREFIX,
};
use super::{
    AtomicU64, AtomicUsize, CloseCode, CloseFrame, Duration, Instant, Message, Relaxed, SinkExt,
    StreamExt,
};
use pgrelay::wire::Close;
use std::sync::Arc;

/// Sparse users are numbered from here (busy users are 1..=--busy-users,
/// the load run's dashboard users 1,000,001 and up).
const SPARSE_BASE: i64 = 2_000_001;
/// Rows per statement when filling the log.
const FILL_CHUNK: i64 = 250_000;
/// The longest wait for pgrelay to read a freshly filled log.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Resume scenarios (--scenario sparse-resume | resume-storm)")]
pub(super) struct ResumeArgs {
    /// sparse-resume: events in the log, written straight into pgrelay.events.
    #[arg(long, default_value_t = 1_000_000)]
    log_events: i64,
    /// sparse-resume: users with few events each, spread evenly over the log.
    #[arg(long, default_value_t = 1000)]
    sparse_users: i64,
    /// sparse-resume: events of each sparse user.
    #[arg(long, default_value_t = 10)]
    sparse_events: i64,
    /// sparse-resume: users who own every other event.
    #[arg(long, default_value_t = 5000)]
    busy_users: i64,
    /// sparse-resume: runs of each single-user resume (median and max reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// resume-storm: rows inserted (one per transaction) while pgrelay is down.
    #[arg(long, default_value_t = 1000)]
    down_rows: u64,
    /// Longest a resume may take, retries included, before it counts as failed.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    resume_timeout: Duration,
}

impl ResumeArgs {
    pub(super) fn check(&self) -> Result<(), String> {
        if self.sparse_users < 1 || self.sparse_events < 1 || self.busy_users < 1 {
            return Err(
                "--sparse-users, --sparse-events and --busy-users must be at least 1".into(),
            );
        }
        if self.log_events < 2 * self.sparse_users * self.sparse_events {
            return Err(
                "--log-events must be at least twice --sparse-users x --sparse-events".into(),
            );
        }
        if self.repeats == 0 || (2 * self.repeats) as i64 > self.sparse_users {
            return Err("--repeats must be between 1 and half of --sparse-users".into());
        }
        if self.resume_timeout.is_zero() {
            return Err("--resume-timeout must be positive".into());
        }
        Ok(())
    }
}

/// Runs the chosen resume scenario and prints its report; Ok(false) when a
/// check failed (lost, duplicated or wrong events, a 1011, a busy backend).
pub(super) async fn run(args: &Args, server: &mut Server) -> Result<bool, String> {
    match args.scenario {
        Scenario::SparseResume => sparse(args, server).await,
        Scenario::ResumeStorm => storm(args, server).await,
        Scenario::Load | Scenario::HandshakeStorm => Err("not a resume scenario".into()),
    }
}

// ---------------------------------------------------------------------------
// The sparse log

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
async fn fill_log(db: &tokio_postgres::Client, layout: &Layout) -> Result<Fill, String> {
    let sql_err =
        |what: &str, e: tokio_postgres::Error| format!("{what}: {}", pgrelay::db::db_message(&e));
    let existing: i64 = db
        .query_one("SELECT count(*) FROM pgrelay.events", &[])
        .await
        .map_err(|e| sql_err("reading pgrelay.events", e))?
        .get(0);
    if existing > 0 {
        return Err(format!(
            "pgrelay.events already holds {existing} events: sparse-resume needs an empty log"
        ));
    }
    let index: Option<String> = db
        .query_one(
            "SELECT pg_get_indexdef(to_regclass('pgrelay.events_payload_idx'))",
            &[],
        )
        .await
        .map_err(|e| sql_err("reading the payload index", e))?
        .get(0);
    let index = index.ok_or("pgrelay.events_payload_idx is missing: is pgrelay installed?")?;
    db.batch_execute("DROP INDEX pgrelay.events_payload_idx")
        .await
        .map_err(|e| sql_err("dropping the payload index", e))?;
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
        .map_err(|e| sql_err("filling pgrelay.events", e))?;
        eprintln!("  {to} events written");
        from = to + 1;
    }
    db.execute(
        "SELECT setval('pgrelay.events_id_seq', $1)",
        &[&layout.events],
    )
    .await
    .map_err(|e| sql_err("moving pgrelay.events_id_seq", e))?;
    let insert_s = began.elapsed().as_secs_f64();
    let began = Instant::now();
    db.batch_execute(&format!("SET maintenance_work_mem = '256MB'; {index}"))
        .await
        .map_err(|e| sql_err("building the payload index again", e))?;
    let index_s = began.elapsed().as_secs_f64();
    let began = Instant::now();
    db.batch_execute("ANALYZE pgrelay.events")
        .await
        .map_err(|e| sql_err("ANALYZE pgrelay.events", e))?;
    let analyze_s = began.elapsed().as_secs_f64();
    let sizes = db
        .query_one(
            "SELECT pg_table_size('pgrelay.events'), \
                    pg_relation_size('pgrelay.events_payload_idx')",
            &[],
        )
        .await
        .map_err(|e| sql_err("reading sizes", e))?;
    Ok(Fill {
        insert_s,
        index_s,
        analyze_s,
        index,
        table_mib: sizes.get::<_, i64>(0) as f64 / 1048576.0,
        index_mib: sizes.get::<_, i64>(1) as f64 / 1048576.0,
    })
}

// ---------------------------------------------------------------------------
// One resume, to completion

fn user_spec(secret: &str, user: &str) -> Result<ClientSpec, String> {
    let token = pgrelay::auth::mint(secret, user, None, Duration::from_secs(24 * 3600))
        .map_err(|e| e.to_string())?;
    Ok(ClientSpec {
        dashboard: false,
        user: user.to_owned(),
        token,
    })
}

/// A close handshake from our side, bounded.
async fn close_normally(ws: &mut Ws) {
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "bench done".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = ws.close(Some(close)).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Backoff before retry `n` (0-based): 100 ms doubling up to 3.2 s, times
/// a random factor in [0.5, 1.5) so that refused clients do not return in step.
fn backoff(n: u32, salt: u64) -> Duration {
    let base = 100u64 << n.min(5);
    let jitter = splitmix(random_u64() ^ salt) % 1000;
    Duration::from_millis(base * (500 + jitter) / 1000)
}

/// A refusal that retrying cannot fix (401, 403, 404, 400).
fn final_refusal(e: &str) -> bool {
    e.starts_with("HTTP 4") && !e.starts_with("HTTP 429")
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
    let salt = spec
        .user
        .bytes()
        .fold(0u64, |h, b| h.rotate_left(7) ^ u64::from(b));
    loop {
        r.attempts += 1;
        let cursor = r.ids.last().copied().unwrap_or(from);
        let connected = {
            let _permit = ctx.connect_gate.acquire().await;
            Box::pin(connect(ctx, spec, Some((cursor, epoch)))).await
        };
        match connected {
            Ok((mut ws, _hello)) => {
                let read = tokio::time::timeout_at(deadline.into(), async {
                    while let Some(message) = ws.next().await {
                        match message {
                            Ok(Message::Text(text)) => {
                                let frame = text.as_bytes();
                                if let Some(rest) = frame.strip_prefix(EVENT_PREFIX) {
                                    let Some((id, _)) = parse_int(rest) else {
                                        continue;
                                    };
                                    if id <= r.ids.last().copied().unwrap_or(from) {
                                        r.duplicates += 1;
                                        continue;
                                    }
                                    r.ids.push(id);
                                    if r.ids.len() >= want {
                                        r.done_at = Some(Instant::now());
                                        return None;
                                    }
                                } else if frame.starts_with(br#"{"type":"reset""#) {
                                    r.resets += 1;
                                }
                            }
                            Ok(Message::Ping(_)) => {
                                if ws.flush().await.is_err() {
                                    return Some(1006);
                                }
                            }
                            Ok(Message::Close(frame)) => {
                                return Some(frame.map_or(1005, |f| u16::from(f.code)));
                            }
                            Ok(_) => {}
                            Err(_) => return Some(1006),
                        }
                    }
                    Some(1006)
                })
                .await;
                match read {
                    Ok(None) => {
                        close_normally(&mut ws).await;
                        return r;
                    }
                    Ok(Some(code)) => r.closes.push(code),
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
            Err(e) if final_refusal(&e) => {
                r.error = Some(e);
                return r;
            }
            Err(e) => {
                r.connect_errors += 1;
                r.error = Some(e);
            }
        }
        let wait = backoff(r.attempts - 1, salt);
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
async fn wait_for_head(ctx: &Ctx, spec: &ClientSpec, head: i64) -> Result<String, String> {
    let began = Instant::now();
    let mut said = Instant::now();
    loop {
        let (mut ws, hello) = Box::pin(connect(ctx, spec, None)).await?;
        close_normally(&mut ws).await;
        if hello.last_id >= head {
            return Ok(hello.epoch);
        }
        if began.elapsed() > CATCH_UP_TIMEOUT {
            return Err(format!(
                "pgrelay did not read the log up to {head} within {} s (hello.last_id {})",
                CATCH_UP_TIMEOUT.as_secs(),
                hello.last_id
            ));
        }
        if said.elapsed() > Duration::from_secs(5) {
            eprintln!("  pgrelay has read up to {} of {head}", hello.last_id);
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------
// Load: what else ran on the machine while we measured

#[derive(Debug, Clone, Copy)]
struct Usage {
    at: Instant,
    machine_s: f64,
    bench_s: f64,
    pgrelay_s: Option<f64>,
    postgres_s: Option<f64>,
    load1: f64,
}

impl Usage {
    fn sample(server: &Server) -> Usage {
        Usage {
            at: Instant::now(),
            machine_s: machine_busy_s(),
            bench_s: proc_sample(None).map_or(0.0, |s| s.cpu_s),
            pgrelay_s: proc_sample(server.pid).map(|s| s.cpu_s),
            postgres_s: server.postgres_cpu_s(),
            load1: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0),
        }
    }
}

/// CPU use between two samples, in % of one core.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Load {
    seconds: f64,
    load1_before: f64,
    machine_pct: f64,
    pgrelay_pct: f64,
    postgres_pct: f64,
    bench_pct: f64,
    /// Everything else: other sessions' builds and tests, kernel threads.
    others_pct: f64,
}

impl Load {
    fn between(a: &Usage, b: &Usage) -> Load {
        let seconds = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
        let pct = |x: f64| x / seconds * 100.0;
        let d = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => (y - x).max(0.0),
            _ => 0.0,
        };
        let machine = b.machine_s - a.machine_s;
        let bench = b.bench_s - a.bench_s;
        let pgrelay = d(a.pgrelay_s, b.pgrelay_s);
        let postgres = d(a.postgres_s, b.postgres_s);
        Load {
            seconds,
            load1_before: a.load1,
            machine_pct: pct(machine),
            pgrelay_pct: pct(pgrelay),
            postgres_pct: pct(postgres),
            bench_pct: pct(bench),
            others_pct: pct((machine - bench - pgrelay - postgres).max(0.0)),
        }
    }

    fn line(&self) -> String {
        format!(
            "load1 {:.2} before; over {:.1} s the machine was {:.0}% busy (of {}%): \
             pgrelay {:.0}%, PostgreSQL {:.0}%, bench {:.0}%, others {:.0}%",
            self.load1_before,
            self.seconds,
            self.machine_pct,
            100 * std::thread::available_parallelism().map_or(1, |n| n.get()),
            self.pgrelay_pct,
            self.postgres_pct,
            self.bench_pct,
            self.others_pct
        )
    }
}

/// pgrelay's `replay_rows` counter (rows read to replay or catch up).
async fn replay_rows(server: &Server) -> Option<f64> {
    let (status, body) = http_get(server.addr, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .filter(|l| !l.starts_with('#') && l.contains("replay_rows"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, max) of non-empty `v`, which it sorts.
fn median_max(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[n - 1])
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn code_counts(codes: impl IntoIterator<Item = u16>) -> std::collections::BTreeMap<u16, u64> {
    let mut counts = std::collections::BTreeMap::new();
    for code in codes {
        *counts.entry(code).or_default() += 1;
    }
    counts
}

fn codes_line(counts: &std::collections::BTreeMap<u16, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(c, n)| format!("{c}x{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// sparse-resume

async fn sparse(args: &Args, server: &mut Server) -> Result<bool, String> {
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
    .map_err(|e| format!("pg_notify: {}", pgrelay::db::db_message(&e)))?;
    let ctx = Arc::new(Ctx::new(
        server,
        a.sparse_users as usize,
        a.sparse_users as usize,
    ));
    let probe = user_spec(&server.secret, "1")?;
    let epoch = wait_for_head(&ctx, &probe, head).await?;
    let caught_up_s = woke.elapsed().as_secs_f64();
    eprintln!("pgrelay caught up with the log in {caught_up_s:.1} s");

    // What each sparse user must get: the log, routed by the bench.
    let expected = Expected::load(&db, 0, head).await?;
    for i in 0..layout.sparse_users {
        let user = (SPARSE_BASE + i).to_string();
        if expected.ids(false, &user) != layout.sparse_ids(i).as_slice() {
            return Err(format!(
                "the filled log does not match its layout for user {user}"
            ));
        }
    }
    let oldest: i64 = db
        .query_one(
            "SELECT coalesce((SELECT min(id) FROM pgrelay.events), 0), \
                    (SELECT pruned_through FROM pgrelay.meta)",
            &[],
        )
        .await
        .map_err(|e| format!("reading the log: {}", pgrelay::db::db_message(&e)))
        .map(|row| row.get::<_, i64>(0).max(row.get::<_, i64>(1)))?;
    let want = layout.sparse_events as usize;
    let mut passed = true;

    // (a) and (b): one user at a time, interleaved, a different user each run.
    let mut singles: Vec<(&str, i64, i64, f64, f64)> = Vec::new(); // (case, from, user, ms, replay rows)
    let before = Usage::sample(server);
    for rep in 0..a.repeats as i64 {
        for (case, from, i) in [("a", 0, rep), ("b", oldest, a.repeats as i64 + rep)] {
            let user = SPARSE_BASE + i;
            let spec = user_spec(&server.secret, &user.to_string())?;
            let rows_before = replay_rows(server).await;
            let began = Instant::now();
            let r = resume_until(&ctx, &spec, from, &epoch, want, began + a.resume_timeout).await;
            let rows = match (rows_before, replay_rows(server).await) {
                (Some(x), Some(y)) => y - x,
                _ => f64::NAN,
            };
            let want_ids: Vec<i64> = expected
                .ids(false, &user.to_string())
                .iter()
                .copied()
                .filter(|&id| id > from)
                .collect();
            let Some(done) = r.done_at else {
                return Err(format!(
                    "({case}) user {user}: {}",
                    r.error.unwrap_or_default()
                ));
            };
            let took = ms(done - began);
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
    let singles_load = Load::between(&before, &Usage::sample(server));

    // (c): every sparse user at once, from 0.
    eprintln!("{} resumes at once...", layout.sparse_users);
    let before = Usage::sample(server);
    let rows_before = replay_rows(server).await;
    let began = Instant::now();
    let deadline = began + a.resume_timeout;
    let tasks: Vec<_> = (0..layout.sparse_users)
        .map(|i| {
            let ctx = Arc::clone(&ctx);
            let spec = user_spec(&server.secret, &(SPARSE_BASE + i).to_string());
            let epoch = epoch.clone();
            tokio::spawn(async move {
                let spec = spec?;
                Ok::<_, String>(resume_until(&ctx, &spec, 0, &epoch, want, deadline).await)
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(
            task.await
                .map_err(|e| format!("a resume task failed: {e}"))??,
        );
    }
    let all_closed = began.elapsed();
    let burst_load = Load::between(&before, &Usage::sample(server));
    let burst_rows = match (rows_before, replay_rows(server).await) {
        (Some(x), Some(y)) => y - x,
        _ => f64::NAN,
    };
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
        .map_err(|e| format!("reading pg_stat_activity: {}", pgrelay::db::db_message(&e)))?;
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
            times.push(ms(done - began));
        }
        if r.ids != expected.ids(false, &user) {
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
            serde_json::json!({
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
                    "closes": closes.iter().map(|(c, n)| (c.to_string(), *n)).collect::<std::collections::HashMap<_, _>>(),
                    "all_complete_ms": all_done, "p50_ms": quantile(&times, 0.5),
                    "p99_ms": quantile(&times, 0.99), "all_closed_ms": ms(all_closed),
                    "replay_rows": burst_rows,
                    "active_pool_backends_after": active, "pool_backends": pool_backends,
                    "load": burst_load,
                },
                "passed": passed,
            })
        );
    } else {
        println!(
            "pgrelay-bench --scenario sparse-resume: {} events, {} sparse users x {} events \
             (stride {}), {} busy users",
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
            ms(all_closed),
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
        println!(
            "\n{}",
            if passed {
                "PASS: every resume got exactly its events, no 1011, no busy backend"
            } else {
                "FAIL: a resume got wrong or duplicated events, a 1011, or a backend stayed busy"
            }
        );
    }
    Ok(passed)
}

// ---------------------------------------------------------------------------
// resume-storm

/// What the storm's clients share with the driver.
struct Storm {
    /// Set before pgrelay is stopped: a close from now on is the restart.
    stopping: AtomicBool,
    /// Bumped when pgrelay is back; clients waiting to reconnect go at once.
    up: watch::Sender<u64>,
    /// The log up to the last row inserted while pgrelay was down, routed.
    expected: OnceLock<Expected>,
    restarted_at: OnceLock<Instant>,
    /// Clients that saw their connection end after `stopping`.
    down: AtomicUsize,
    /// Clients not (yet) caught up since the restart.
    behind: AtomicIsize,
    reconnected: AtomicUsize,
    refused_1013: AtomicU64,
}

#[derive(Default)]
struct StormReport {
    base: ClientReport,
    /// Reconnections after the restart beyond the first (1013s, failures).
    retries: u32,
    failed_handshakes: u32,
    /// When it had every event routed to it up to the restart's head and a
    /// connection that stayed open (for a client with nothing to catch up:
    /// its last handshake).
    caught_at: Option<Instant>,
}

/// Where a client stands in the catch-up after the restart.
#[derive(Default)]
struct Catch {
    /// The last id routed to this client up to the restart's head (0: none
    /// above its cursor).
    target: Option<i64>,
    counted: bool,
    reached_at: Option<Instant>,
    hello_at: Option<Instant>,
}

impl Catch {
    fn note(&mut self, report: &ClientReport, storm: &Storm) {
        let Some(target) = self.target else {
            return;
        };
        if !self.counted && report.last_id() >= target {
            self.counted = true;
            self.reached_at.get_or_insert_with(Instant::now);
            storm.behind.fetch_sub(1, Relaxed);
        }
    }
}

async fn storm_client(
    spec: ClientSpec,
    ctx: Arc<Ctx>,
    storm: Arc<Storm>,
    timeout: Duration,
) -> StormReport {
    let mut out = StormReport {
        base: ClientReport {
            dashboard: spec.dashboard,
            user: spec.user.clone(),
            ..ClientReport::default()
        },
        ..StormReport::default()
    };
    let salt = random_u64();
    let (mut ws, hello) = match first_connect(&ctx, &spec).await {
        Ok(ok) => ok,
        Err(e) => {
            out.base.error = Some(e);
            return out;
        }
    };
    out.base.connected = true;
    out.base.hello_last_id = hello.last_id;
    let epoch = hello.epoch;
    lock(&ctx.hellos).push((spec.dashboard, spec.user.clone(), hello.last_id));
    ctx.connected.fetch_add(1, Relaxed);
    let mut up = storm.up.subscribe();
    let mut catch = Catch::default();

    loop {
        let outcome = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => Outcome::Stop,
            outcome = read_loop(&mut ws, |text| {
                out.base.on_text(text, &ctx);
                catch.note(&out.base, &storm);
            }) => outcome,
        };
        match outcome {
            Outcome::Stop => {
                close_normally(&mut ws).await;
                out.caught_at = match (catch.reached_at, catch.hello_at) {
                    (Some(r), Some(h)) => Some(r.max(h)),
                    _ => None,
                };
                return out;
            }
            Outcome::Closed(_) | Outcome::Failed(_) if ctx.stop.is_cancelled() => return out,
            Outcome::Closed(code) => out.base.closes.push(code.unwrap_or(1005)),
            Outcome::Failed(e) => {
                out.base.closes.push(1006);
                out.base.error.get_or_insert(e);
            }
        }
        if out.base.closes.last() == Some(&Close::ReplayBusy.code()) {
            storm.refused_1013.fetch_add(1, Relaxed);
        }
        // A client with nothing to catch up counted as caught on its
        // handshake; a close after it puts it back.
        if catch.counted && catch.reached_at == catch.hello_at {
            catch.counted = false;
            catch.reached_at = None;
            storm.behind.fetch_add(1, Relaxed);
        }
        let mut attempt = 0u32;
        if storm.stopping.load(Relaxed) && storm.restarted_at.get().is_none() {
            // pgrelay is going away: reconnect the moment it is back.
            storm.down.fetch_add(1, Relaxed);
            // One restart per run: generation 1 is "back".
            if up.wait_for(|g| *g > 0).await.is_err() {
                return out;
            }
        } else {
            attempt = 1;
            tokio::time::sleep(backoff(0, salt)).await;
        }
        let began = Instant::now();
        ws = loop {
            if attempt > 0 && storm.restarted_at.get().is_some() {
                out.retries += 1;
            }
            attempt += 1;
            let resumed = {
                let _permit = ctx.connect_gate.acquire().await;
                Box::pin(connect(
                    &ctx,
                    &spec,
                    Some((out.base.last_id(), epoch.as_str())),
                ))
                .await
            };
            match resumed {
                Ok((ws, _hello)) => break ws,
                Err(e) if began.elapsed() < timeout && !ctx.stop.is_cancelled() => {
                    out.failed_handshakes += 1;
                    out.base.error.get_or_insert(e);
                    tokio::time::sleep(backoff(attempt.saturating_sub(1), salt)).await;
                }
                Err(e) => {
                    out.base.error = Some(format!("could not resume: {e}"));
                    return out;
                }
            }
        };
        out.base.reconnects += 1;
        if storm.restarted_at.get().is_some() {
            storm.reconnected.fetch_add(1, Relaxed);
            if catch.target.is_none() {
                // First handshake since the restart: this client's goal.
                let expected = storm.expected.get();
                let slice = expected.map_or(&[][..], |e| {
                    e.slice(spec.dashboard, &spec.user, out.base.hello_last_id)
                });
                catch.target = Some(slice.last().copied().unwrap_or(0));
            }
            catch.hello_at = Some(Instant::now());
            if !catch.counted && out.base.last_id() >= catch.target.unwrap_or(0) {
                // Nothing (left) to catch up: caught as of this handshake.
                catch.counted = true;
                catch.reached_at = catch.hello_at;
                storm.behind.fetch_sub(1, Relaxed);
            }
        }
    }
}

/// Inserts `rows` businesses through real transactions (one row each) on
/// `writers` connections; row k is owned by user k mod owners + 1.
async fn insert_rows(
    database: &tokio_postgres::Config,
    writers: usize,
    rows: u64,
    owners: u64,
) -> Result<(), String> {
    let mut tasks = Vec::new();
    for w in 0..writers as u64 {
        let client = connect_db(database).await?;
        tasks.push(tokio::spawn(async move {
            let mut k = w;
            while k < rows {
                let owner = (k % owners + 1) as i64;
                client
                    .execute(
                        "INSERT INTO businesses (owner_id, name) VALUES ($1, 'bench business')",
                        &[&owner],
                    )
                    .await
                    .map_err(|e| format!("inserting: {}", pgrelay::db::db_message(&e)))?;
                k += writers as u64;
            }
            Ok::<_, String>(())
        }));
    }
    for task in tasks {
        task.await.map_err(|e| format!("a writer failed: {e}"))??;
    }
    Ok(())
}

/// Inserts at `rate` rows/s for `duration` with the load run's writers;
/// returns the rows inserted.
async fn paced_rows(
    database: &tokio_postgres::Config,
    writers: usize,
    rate: u32,
    duration: Duration,
    owners: u64,
) -> Result<u64, String> {
    let counts = Arc::new(WriterCounts {
        inserted: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
    });
    let mut clients = Vec::with_capacity(writers);
    for _ in 0..writers {
        clients.push(connect_db(database).await?);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let schedule = Schedule {
        writers,
        rate,
        start,
        end: start + duration,
        owners,
    };
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| tokio::spawn(writer(client, i, schedule, Arc::clone(&counts))))
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    if counts.errors.load(Relaxed) > 0 {
        return Err(format!(
            "{} inserts failed; first: {}",
            counts.errors.load(Relaxed),
            lock(&counts.first_error).clone().unwrap_or_default()
        ));
    }
    Ok(counts.inserted.load(Relaxed))
}

async fn max_id(db: &tokio_postgres::Client) -> Result<i64, String> {
    Ok(db
        .query_one("SELECT coalesce(max(id), 0) FROM pgrelay.events", &[])
        .await
        .map_err(|e| format!("reading pgrelay.events: {}", pgrelay::db::db_message(&e)))?
        .get(0))
}

/// Waits (bounded by `limit`, and by 10 s without progress) until the
/// clients' deliveries reach `total`.
async fn drain(total: u64, limit: Duration) {
    let began = Instant::now();
    let mut last = (delivered_total(), Instant::now());
    while delivered_total() < total && began.elapsed() < limit {
        let now = delivered_total();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn storm(args: &Args, server: &mut Server) -> Result<bool, String> {
    let (dashboards, notifications) = args.split();
    let owners = notifications.max(1) as u64;
    let specs = super::client_specs(&server.secret, dashboards, notifications)?;
    let ctx = Arc::new(Ctx::new(server, args.connect_concurrency, args.sockets));
    let (up, _) = watch::channel(0u64);
    let storm = Arc::new(Storm {
        stopping: AtomicBool::new(false),
        up,
        expected: OnceLock::new(),
        restarted_at: OnceLock::new(),
        down: AtomicUsize::new(0),
        behind: AtomicIsize::new(args.sockets as isize),
        reconnected: AtomicUsize::new(0),
        refused_1013: AtomicU64::new(0),
    });
    let db = connect_db(&server.database).await?;

    eprintln!("connecting {} sockets...", args.sockets);
    let connect_began = Instant::now();
    let handles: Vec<_> = specs
        .into_iter()
        .map(|spec| {
            tokio::spawn(storm_client(
                spec,
                Arc::clone(&ctx),
                Arc::clone(&storm),
                args.resume.resume_timeout,
            ))
        })
        .collect();
    let (connect_s, handles) = all_connected(&ctx, handles, args.sockets, connect_began).await?;
    let hellos = lock(&ctx.hellos).clone();
    let min_hello = hellos.iter().map(|h| h.2).min().unwrap_or(0);
    eprintln!("{} sockets connected in {connect_s:.1} s", args.sockets);

    // Live rows, delivered, so that cursors differ from client to client.
    let live_rows = paced_rows(
        &server.database,
        args.writers,
        args.rate,
        args.duration,
        owners,
    )
    .await?;
    let live_head = max_id(&db).await?;
    let live_expected = Expected::load(&db, min_hello, live_head).await?;
    drain(live_expected.total(&hellos), args.drain_timeout).await;
    let live_delivered = delivered_total();

    // Stop pgrelay; rows go in while it is down.
    eprintln!("stopping pgrelay...");
    storm.stopping.store(true, Relaxed);
    let shutdown = server.stop_child().await;
    let waited = Instant::now();
    while storm.down.load(Relaxed) < args.sockets && waited.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let down_seen = storm.down.load(Relaxed);
    let down_began = Instant::now();
    insert_rows(
        &server.database,
        args.writers,
        args.resume.down_rows,
        owners,
    )
    .await?;
    let down_insert_s = down_began.elapsed().as_secs_f64();
    let head = max_id(&db).await?;
    let expected_at_head = Expected::load(&db, min_hello, head).await?;
    let backlog = expected_at_head.total(&hellos) as i64 - live_delivered as i64;
    let _ = storm.expected.set(expected_at_head);
    eprintln!(
        "{} rows inserted while down in {down_insert_s:.1} s (head {head}); starting pgrelay...",
        args.resume.down_rows
    );
    let start_began = Instant::now();
    server.start_child().await?;
    let start_s = start_began.elapsed().as_secs_f64();
    let before = Usage::sample(server);
    let rows_before = replay_rows(server).await;
    let restarted = Instant::now();
    let _ = storm.restarted_at.set(restarted);
    storm.up.send_modify(|g| *g += 1);

    // Rows keep coming during the storm: replay and live must meet with no
    // gap and no duplicate.
    let writers = {
        let database = server.database.clone();
        let (writers, rate, duration) = (args.writers, args.rate, args.duration);
        tokio::spawn(async move { paced_rows(&database, writers, rate, duration, owners).await })
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let caught_by = loop {
        let behind = storm.behind.load(Relaxed);
        if behind <= 0 {
            break Some(restarted.elapsed());
        }
        if restarted.elapsed() > args.resume.resume_timeout {
            break None;
        }
        tokio::select! {
            _ = tick.tick() => {
                eprintln!(
                    "[{:>5.1}s] reconnected {} behind {behind} 1013s {} deliveries {} pgrelay rss {}",
                    restarted.elapsed().as_secs_f64(),
                    storm.reconnected.load(Relaxed),
                    storm.refused_1013.load(Relaxed),
                    delivered_total(),
                    proc_sample(server.pid).map_or("-".into(), |s| format!("{:.1} MiB", s.rss_kib as f64 / 1024.0)),
                );
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    let storm_load = Load::between(&before, &Usage::sample(server));
    let storm_rows = match (rows_before, replay_rows(server).await) {
        (Some(x), Some(y)) => y - x,
        _ => f64::NAN,
    };
    let peak_rss = proc_sample(server.pid).map_or(0, |s| s.hwm_kib);
    let rows_after = writers
        .await
        .map_err(|e| format!("a writer failed: {e}"))??;

    // The whole run, checked against the log.
    let end_id = max_id(&db).await?;
    let expected = Expected::load(&db, min_hello, end_id).await?;
    let expected_total = expected.total(&hellos);
    drain(expected_total, args.drain_timeout).await;
    ctx.stop.cancel();
    let mut reports = Vec::with_capacity(handles.len());
    for handle in handles {
        match tokio::time::timeout(Duration::from_secs(30), handle).await {
            Ok(Ok(report)) => reports.push(report),
            _ => return Err("a client did not finish within 30 s of the end".into()),
        }
    }
    let mut lost = 0u64;
    let mut unexpected = 0u64;
    let mut duplicates = 0u64;
    let mut resets = 0u64;
    let mut retries = 0u64;
    let mut failed_handshakes = 0u64;
    let mut retried_clients = 0u64;
    let mut errors = 0u64;
    let mut first_error = None;
    let mut last_caught = None;
    let mut never_caught = 0u64;
    for r in &reports {
        let want = expected.for_client(&r.base);
        let (matched, extra) = compare(want, &r.base.ranges, end_id);
        lost += want.len() as u64 - matched;
        unexpected += extra;
        duplicates += r.base.duplicates;
        resets += r.base.resets;
        retries += u64::from(r.retries);
        failed_handshakes += u64::from(r.failed_handshakes);
        if r.retries > 0 {
            retried_clients += 1;
        }
        if let Some(e) = &r.base.error {
            errors += 1;
            first_error.get_or_insert_with(|| e.clone());
        }
        match r.caught_at {
            Some(at) => last_caught = last_caught.max(Some(at)),
            None => never_caught += 1,
        }
    }
    let closes = code_counts(reports.iter().flat_map(|r| r.base.closes.iter().copied()));
    let caught_s = last_caught.map(|at| at.saturating_duration_since(restarted).as_secs_f64());
    let passed = lost == 0 && duplicates == 0 && unexpected == 0 && never_caught == 0;

    let pgrelay_shutdown_s = shutdown.map(|(_, s)| s);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "scenario": "resume-storm",
                "target": server.description,
                "sockets": args.sockets, "dashboard_sockets": dashboards,
                "notification_sockets": notifications,
                "connect_s": connect_s, "connect_concurrency": args.connect_concurrency,
                "live_rows_before": live_rows, "down_rows": args.resume.down_rows,
                "live_rows_after": rows_after,
                "pgrelay_shutdown_s": pgrelay_shutdown_s, "clients_saw_close": down_seen,
                "down_insert_s": down_insert_s, "pgrelay_start_s": start_s,
                "backlog_deliveries": backlog,
                "caught_up_s": caught_s, "behind_at_end": never_caught,
                "all_behind_zero_s": caught_by.map(|d| d.as_secs_f64()),
                "replay_rows": storm_rows,
                "closes": closes.iter().map(|(c, n)| (c.to_string(), *n)).collect::<std::collections::HashMap<_, _>>(),
                "retries": retries, "retried_clients": retried_clients,
                "failed_handshakes": failed_handshakes,
                "lost": lost, "duplicated": duplicates, "unexpected": unexpected,
                "resets": resets, "client_errors": errors,
                "expected_total": expected_total, "end_id": end_id,
                "pgrelay_peak_rss_kib": peak_rss,
                "load": storm_load,
                "passed": passed,
            })
        );
    } else {
        println!(
            "pgrelay-bench --scenario resume-storm: {} sockets ({dashboards} dashboard, \
             {notifications} notifications), restart with {} rows inserted while down",
            args.sockets, args.resume.down_rows
        );
        println!("target: {}", server.description);
        println!();
        println!(
            "  connected              {} in {connect_s:.1} s ({} handshakes in flight at most)",
            args.sockets, args.connect_concurrency
        );
        println!(
            "  live before restart    {live_rows} rows ({} rows/s), delivered",
            args.rate
        );
        println!(
            "  restart                SIGTERM -> exit {} s; {down_seen} clients saw the close; \
             {} rows inserted in {down_insert_s:.1} s; started again and ready in {start_s:.2} s",
            pgrelay_shutdown_s.map_or("?".into(), |s| format!("{s:.2}")),
            args.resume.down_rows
        );
        println!(
            "  backlog                {backlog} deliveries owed at the restart; {rows_after} more \
             rows inserted live during the storm ({} rows/s)",
            args.rate
        );
        println!(
            "  caught up              every socket in {} (from ready); {} rows read by replays",
            caught_s.map_or("NOT ALL".into(), |s| format!("{s:.2} s")),
            storm_rows
        );
        println!(
            "  closes by pgrelay      {} ({retries} retries by {retried_clients} clients, \
             {failed_handshakes} failed handshakes), resets {resets}, client errors {errors}{}",
            codes_line(&closes),
            first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        println!(
            "  lost / duplicated      {lost} / {duplicates} (misrouted {unexpected}); \
             {expected_total} deliveries expected up to id {end_id}"
        );
        println!(
            "  pgrelay peak RSS       {:.1} MiB (the restarted process)",
            peak_rss as f64 / 1024.0
        );
        println!("  load                   {}", storm_load.line());
        println!(
            "\n{}",
            if passed {
                "PASS: 0 lost, 0 duplicated, every socket caught up"
            } else {
                "FAIL: lost, duplicated or misrouted deliveries, or sockets that never caught up"
            }
        );
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

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        for n in 0..10 {
            let d = backoff(n, 7).as_millis() as u64;
            let base = 100u64 << n.min(5);
            assert!(d >= base / 2 && d < base * 3 / 2, "retry {n}: {d} ms");
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median_max(&mut [3.0, 1.0, 2.0]), (2.0, 3.0));
        assert_eq!(median_max(&mut [4.0, 1.0, 2.0, 3.0]), (2.5, 4.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
        assert!(final_refusal("HTTP 401: invalid token"));
        assert!(!final_refusal("HTTP 429: too many sockets"));
        assert!(!final_refusal("connect 127.0.0.1:1: refused"));
    }
}
