//! The resume-storm scenario: `--sockets` clients (`--stream`) connect; rows
//! go in live; pgrelay is stopped (SIGTERM), rows for those users go in
//! through real transactions while it is down, it is started again on the
//! same port, and every client reconnects at once with `?last_id=&epoch=`.
//! At the end every client's ids are checked against the log as in the load
//! run: 0 lost, 0 duplicated, and every socket caught up. The quiet-machine
//! check ([`crate::quiet`]) runs once the sockets are connected, before any
//! row; the window it judges is the storm (restart to caught up).

use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pgrelay::wire::Close;
use tokio::sync::watch;

use super::{backoff, replay_rows, replay_rows_since};
use crate::args::Args;
use crate::client::{finish, spawn_all, ClientReport, Ctx, Watch};
use crate::error::{BenchError, Result};
use crate::expected::{Expected, Tally};
use crate::procfs::{mib, proc_sample};
use crate::quiet::{self, Window};
use crate::server::{connect_db, Server};
use crate::stats::{codes_json, codes_line, delivered_total, drain, lock};
use crate::workload::{workload, Workload};
use crate::writer::{insert_rows, paced_rows};

/// The last line of the table.
const PASS: &str = "PASS: 0 lost, 0 duplicated, every socket caught up";
const FAIL: &str =
    "FAIL: lost, duplicated or misrouted deliveries, or sockets that never caught up";

/// A drain ends after this long without any delivery.
const DRAIN_QUIET: Duration = Duration::from_secs(10);

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

/// A storm client's part in the restart ([`Watch`]): it waits for pgrelay
/// to come back instead of hammering a closed port, retries with backoff
/// until `--resume-timeout`, and tells the driver when it has caught up.
struct StormWatch {
    storm: Arc<Storm>,
    up: watch::Receiver<u64>,
    timeout: Duration,
    catch: Catch,
    /// Reconnections after the restart beyond the first (1013s, failures).
    retries: u32,
    failed_handshakes: u32,
    /// When it had every event routed to it up to the restart's head and a
    /// connection that stayed open (for a client with nothing to catch up:
    /// its last handshake).
    caught_at: Option<Instant>,
}

impl StormWatch {
    fn new(storm: &Arc<Storm>, timeout: Duration) -> StormWatch {
        StormWatch {
            storm: Arc::clone(storm),
            up: storm.up.subscribe(),
            timeout,
            catch: Catch::default(),
            retries: 0,
            failed_handshakes: 0,
            caught_at: None,
        }
    }
}

impl Watch for StormWatch {
    fn on_frame(&mut self, report: &ClientReport) {
        self.catch.note(report, &self.storm);
    }

    async fn closed(&mut self, report: &ClientReport) -> Option<u32> {
        let storm = &self.storm;
        if report.closes.last() == Some(&Close::ReplayBusy.code()) {
            storm.refused_1013.fetch_add(1, Relaxed);
        }
        // A client with nothing to catch up counted as caught on its
        // handshake; a close after it puts it back.
        if self.catch.counted && self.catch.reached_at == self.catch.hello_at {
            self.catch.counted = false;
            self.catch.reached_at = None;
            storm.behind.fetch_add(1, Relaxed);
        }
        if storm.stopping.load(Relaxed) && storm.restarted_at.get().is_none() {
            // pgrelay is going away: reconnect the moment it is back.
            storm.down.fetch_add(1, Relaxed);
            // One restart per run: generation 1 is "back".
            if self.up.wait_for(|g| *g > 0).await.is_err() {
                return None;
            }
            Some(0)
        } else {
            tokio::time::sleep(backoff(0)).await;
            Some(1)
        }
    }

    fn attempting(&mut self, attempt: u32) {
        if attempt > 0 && self.storm.restarted_at.get().is_some() {
            self.retries += 1;
        }
    }

    fn retry_after(&mut self, attempt: u32, began: Instant) -> Option<Duration> {
        if began.elapsed() >= self.timeout {
            return None;
        }
        self.failed_handshakes += 1;
        Some(backoff(attempt.saturating_sub(1)))
    }

    fn resumed(&mut self, report: &ClientReport) {
        let (storm, catch) = (&self.storm, &mut self.catch);
        if storm.restarted_at.get().is_none() {
            return;
        }
        storm.reconnected.fetch_add(1, Relaxed);
        if catch.target.is_none() {
            // First handshake since the restart: this client's goal.
            let expected = storm.expected.get();
            let slice =
                expected.map_or(&[][..], |e| e.slice(&report.audience, report.hello_last_id));
            catch.target = Some(slice.last().copied().unwrap_or(0));
        }
        catch.hello_at = Some(Instant::now());
        if !catch.counted && report.last_id() >= catch.target.unwrap_or(0) {
            // Nothing (left) to catch up: caught as of this handshake.
            catch.counted = true;
            catch.reached_at = catch.hello_at;
            storm.behind.fetch_sub(1, Relaxed);
        }
    }

    fn stopped(&mut self) {
        self.caught_at = match (self.catch.reached_at, self.catch.hello_at) {
            (Some(r), Some(h)) => Some(r.max(h)),
            _ => None,
        };
    }
}

pub(crate) async fn run(args: &Args, server: &mut Server) -> Result<bool> {
    let (dashboards, notifications) = args.split();
    let Workload { specs, rows } = workload(args, server).await?;
    let ctx = Arc::new(
        Ctx::new(server, args.connect_concurrency, args.sockets).over(args.transport.wire()),
    );
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
    let (connect_s, handles) = spawn_all(&ctx, specs, || {
        StormWatch::new(&storm, args.resume.resume_timeout)
    })
    .await?;
    let hellos = lock(&ctx.hellos).clone();
    let min_hello = ctx.min_hello(0);
    eprintln!("{} sockets connected in {connect_s:.1} s", args.sockets);
    let mut quiet = quiet::check(args, server).await?;

    // Live rows, delivered, so that cursors differ from client to client.
    let live_rows = paced_rows(
        &server.database,
        args.writers,
        args.rate,
        args.duration,
        &rows,
    )
    .await?;
    let live_head = Expected::head(&db).await?;
    let live_expected = Expected::load(&db, min_hello, live_head).await?;
    drain(
        live_expected.total(&hellos),
        args.drain_timeout,
        DRAIN_QUIET,
    )
    .await;
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
    insert_rows(&server.database, args.writers, args.resume.down_rows, &rows).await?;
    let down_insert_s = down_began.elapsed().as_secs_f64();
    let head = Expected::head(&db).await?;
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
    let window = Window::open(server);
    let rows_before = replay_rows(server).await;
    let restarted = Instant::now();
    let _ = storm.restarted_at.set(restarted);
    storm.up.send_modify(|g| *g += 1);

    // Rows keep coming during the storm: replay and live must meet with no
    // gap and no duplicate.
    let writers = {
        let database = server.database.clone();
        let (writers, rate, duration) = (args.writers, args.rate, args.duration);
        tokio::spawn(async move { paced_rows(&database, writers, rate, duration, &rows).await })
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
                    proc_sample(server.pid).map_or("-".into(), |s| format!("{:.1} MiB", mib(s.rss_kib))),
                );
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    let (_, storm_load) = quiet.close(window, server);
    let storm_rows = replay_rows_since(server, rows_before).await;
    let peak_rss = proc_sample(server.pid).map_or(0, |s| s.hwm_kib);
    let rows_after = writers
        .await
        .map_err(BenchError::task("a writer failed"))??;

    // The whole run, checked against the log.
    let end_id = Expected::head(&db).await?;
    let expected = Expected::load(&db, min_hello, end_id).await?;
    let expected_total = expected.total(&hellos);
    drain(expected_total, args.drain_timeout, DRAIN_QUIET).await;
    let reports = finish(&ctx, handles).await?;
    let Tally {
        lost,
        unexpected,
        duplicates,
        resets,
        closes,
        errors,
        first_error,
        ..
    } = Tally::new(&expected, reports.iter().map(|r| &r.0), end_id);
    let mut retries = 0u64;
    let mut failed_handshakes = 0u64;
    let mut retried_clients = 0u64;
    let mut last_caught = None;
    let mut never_caught = 0u64;
    for (_, w) in &reports {
        retries += u64::from(w.retries);
        failed_handshakes += u64::from(w.failed_handshakes);
        if w.retries > 0 {
            retried_clients += 1;
        }
        match w.caught_at {
            Some(at) => last_caught = last_caught.max(Some(at)),
            None => never_caught += 1,
        }
    }
    let caught_s = last_caught.map(|at| at.saturating_duration_since(restarted).as_secs_f64());
    let passed = lost == 0 && duplicates == 0 && unexpected == 0 && never_caught == 0;

    let pgrelay_shutdown_s = shutdown.map(|(_, s)| s);
    if args.json {
        println!(
            "{}",
            quiet.stamp(serde_json::json!({
                "scenario": "resume-storm",
                "target": server.description,
                "sockets": args.sockets, "dashboard_sockets": dashboards,
                "notification_sockets": notifications,
                "stream": format!("{:?}", args.stream).to_lowercase(),
                "stream_keys": args.stream_keys(),
                "transport": args.transport.name(),
                "connect_s": connect_s, "connect_concurrency": args.connect_concurrency,
                "live_rows_before": live_rows, "down_rows": args.resume.down_rows,
                "live_rows_after": rows_after,
                "pgrelay_shutdown_s": pgrelay_shutdown_s, "clients_saw_close": down_seen,
                "down_insert_s": down_insert_s, "pgrelay_start_s": start_s,
                "backlog_deliveries": backlog,
                "caught_up_s": caught_s, "behind_at_end": never_caught,
                "all_behind_zero_s": caught_by.map(|d| d.as_secs_f64()),
                "replay_rows": storm_rows,
                "closes": codes_json(&closes),
                "retries": retries, "retried_clients": retried_clients,
                "failed_handshakes": failed_handshakes,
                "lost": lost, "duplicated": duplicates, "unexpected": unexpected,
                "resets": resets, "client_errors": errors,
                "expected_total": expected_total, "end_id": end_id,
                "pgrelay_peak_rss_kib": peak_rss,
                "load": storm_load,
                "passed": passed,
            }))
        );
    } else {
        println!(
            "pgrelay-bench --scenario resume-storm{}: {}, restart with {} rows inserted while down",
            quiet.mark(),
            args.sockets_line(),
            args.resume.down_rows
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
            mib(peak_rss)
        );
        let mut tail = String::new();
        quiet.rows(&mut tail, "load", &storm_load);
        quiet.verdict(&mut tail, passed, PASS, FAIL);
        print!("{tail}");
    }
    Ok(passed)
}
