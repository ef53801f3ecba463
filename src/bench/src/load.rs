//! The load scenario (the default): N sockets, R inserts/s through real
//! transactions for D seconds after a warm-up; deliveries/s, commit-to-receipt
//! latency, lost, duplicated and misrouted deliveries, and what pgrelay,
//! PostgreSQL, the bench and the machine spent meanwhile.
//!
//! "Commit" is the event's `at` field: `clock_timestamp()` taken by the
//! deferred capture trigger while the transaction commits (inside the
//! ordering lock, just before the event row and the NOTIFY are written), so
//! the latency includes the rest of the commit, the NOTIFY, pgrelay's read of
//! the log, routing, fan-out and the socket write. Both clocks are this
//! machine's wall clock.
//!
//! The ideal scenario ([`crate::ideal`]) is this run ([`measure`]) with
//! another [`Source`] of events: its own broadcaster instead of pgrelay and
//! transactions, the report naming it instead of pgrelay.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::args::Args;
use crate::client::{self, spawn_all, ClientReport, ClientSpec, Ctx, Plain};
use crate::error::Result;
use crate::expected::{Expected, Tally};
use crate::ideal::{self, Feed};
use crate::procfs::{mib, proc_sample, Load, OpenFiles};
use crate::quiet::{self, Quiet, Window};
use crate::server::{connect_db, Server, Shutdown};
use crate::stats::{
    codes_json, codes_line, delivered_total, drain, latency_merged, lock, quantile_of,
    quantiles_line, row, CpuPer,
};
use crate::workload::{workload, Workload};
use crate::writer::{Rows, WriterCounts, Writers};

/// Aborts its tasks when dropped, so that a run that ends early stops them.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The drain ends after this long without any delivery.
const DRAIN_QUIET: Duration = Duration::from_secs(5);

pub(crate) async fn bench(args: &Args, server: &Server) -> Result<Report> {
    let Workload { specs, rows } = workload(args, server).await?;
    measure(args, server, specs, Source::Rows(rows)).await
}

/// Where a run's events come from.
pub(crate) enum Source {
    /// The `--stream`'s rows through real transactions, read by pgrelay;
    /// what each client should get is read from the log.
    Rows(Rows),
    /// The ideal broadcaster's batches (`--scenario ideal`).
    Ideal(Feed),
}

impl Source {
    fn subject(&self) -> Subject {
        match self {
            Source::Rows(_) => Subject::Pgrelay,
            Source::Ideal(_) => Subject::Ideal,
        }
    }

    /// Starts the schedule: its start, and the tasks that end with it.
    async fn start(
        self,
        args: &Args,
        server: &Server,
        counts: &Arc<WriterCounts>,
    ) -> Result<(tokio::time::Instant, Vec<tokio::task::JoinHandle<()>>)> {
        Ok(match self {
            // Connect first, then start the clock.
            Source::Rows(rows) => Writers::connect(&server.database, args.writers)
                .await?
                .start(args.rate, args.warmup + args.duration, &rows, counts),
            Source::Ideal(feed) => feed.start(args, counts),
        })
    }
}

/// What a report measured, and names.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Subject {
    /// pgrelay, fed by transactions.
    Pgrelay,
    /// The ideal broadcaster.
    Ideal,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Pgrelay => "pgrelay",
            Subject::Ideal => "ideal",
        }
    }

    /// What the latency starts from: as the table says it, as the JSON does.
    fn commit(self) -> (&'static str, &'static str) {
        match self {
            Subject::Pgrelay => (
                "the event's `at`: clock_timestamp() in the deferred capture trigger at commit",
                "event `at` = clock_timestamp() in the deferred capture trigger",
            ),
            Subject::Ideal => (
                "the event's `at`: the ideal broadcaster's clock as it built the batch",
                "event `at` = the ideal broadcaster's clock as it built the batch",
            ),
        }
    }

    /// The events' row and the unit they come in.
    fn events(self) -> (&'static str, &'static str) {
        match self {
            Subject::Pgrelay => ("rows inserted", "transactions"),
            Subject::Ideal => ("events broadcast", "batches"),
        }
    }

    /// How the server is told to stop.
    fn stop_signal(self) -> &'static str {
        match self {
            Subject::Pgrelay => "SIGTERM",
            Subject::Ideal => "the end of its stdin",
        }
    }

    /// What the rate counts, on the table's first line.
    fn rate_unit(self) -> &'static str {
        match self {
            Subject::Pgrelay => "rows/s",
            Subject::Ideal => "events/s",
        }
    }

    /// The end of the table's first line: how the events were made.
    fn source_line(self, args: &Args) -> String {
        match self {
            Subject::Pgrelay => format!(
                "{} writer connections, {} rows per INSERT",
                args.writers, args.rows_per_insert
            ),
            Subject::Ideal => format!(
                "the ideal broadcaster ({} writer threads), {} events per batch",
                args.ideal_threads, args.rows_per_insert
            ),
        }
    }
}

/// The load run: `specs` connect, then `source` makes events for the
/// warm-up and the measured window, then the drain and the check.
pub(crate) async fn measure(
    args: &Args,
    server: &Server,
    specs: Vec<ClientSpec>,
    source: Source,
) -> Result<Report> {
    let (dashboards, notifications) = args.split();
    let subject = source.subject();
    let ctx = Arc::new(
        Ctx::new(server, args.connect_concurrency, args.sockets).over(args.transport.wire()),
    );
    let counts = Arc::new(WriterCounts::default());
    let progress = Arc::new(Progress {
        phase: Mutex::new(Phase::Connect),
        started: Instant::now(),
    });
    let progress_task = tokio::spawn(progress_loop(
        Arc::clone(&progress),
        Arc::clone(&ctx),
        Arc::clone(&counts),
        (server.pid, subject),
        args.sockets,
    ));
    // Stop the progress line whatever happens below.
    let _progress_guard = AbortOnDrop(vec![progress_task]);

    let rss_before_connect = proc_sample(server.pid);
    let (connect_s, handles) = spawn_all(&ctx, specs, || Plain).await?;
    // Let the handshakes' allocations settle before reading RSS: pgrelay's
    // allocator gives freed pages back within a second (its jemalloc
    // `dirty_decay_ms:1000`), so what is left after 1.5 s is what the idle
    // sockets hold, not what their handshakes held a moment ago.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_connected = proc_sample(server.pid);
    // Sockets idle, no rows yet: is anyone else using the machine?
    let mut quiet = quiet::check(args, server).await?;

    // Stopped if the run ends early (an error, Ctrl-C): the broadcaster's
    // feeder holds its stdin open, and pgrelay's writers would go on
    // inserting.
    let (start, writer_tasks) = source.start(args, server, &counts).await?;
    let mut writer_tasks = AbortOnDrop(writer_tasks);
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    *lock(&progress.phase) = Phase::Warmup;

    tokio::time::sleep_until(measure_from).await;
    ctx.window.open();
    *lock(&progress.phase) = Phase::Measure;
    let window_began = Instant::now();
    let delivered_at_start = delivered_total();
    let inserted_at_start = counts.inserted.load(Relaxed);
    let transactions_at_start = counts.transactions.load(Relaxed);
    let window = Window::open(server);
    let at_start = window.start;

    tokio::time::sleep_until(end).await;
    ctx.window.close();
    let window_s = window_began.elapsed().as_secs_f64();
    let delivered_in_window = delivered_total() - delivered_at_start;
    let (at_end, load) = quiet.close(window, server);
    let transactions_in_window = counts.transactions.load(Relaxed) - transactions_at_start;
    *lock(&progress.phase) = Phase::Drain;
    for task in std::mem::take(&mut writer_tasks.0) {
        let _ = task.await;
    }
    let inserted_in_window = counts.inserted.load(Relaxed) - inserted_at_start;

    let hellos = lock(&ctx.hellos).clone();
    let (end_id, expected) = match subject {
        // What each client should have got: the log, routed with the default routes.
        Subject::Pgrelay => {
            let db = connect_db(&server.database).await?;
            let end_id = Expected::head(&db).await?;
            (
                end_id,
                Expected::load(&db, ctx.min_hello(end_id), end_id).await?,
            )
        }
        Subject::Ideal => ideal::expected(counts.inserted.load(Relaxed)),
    };

    // Drain: wait (bounded) until every expected delivery has arrived.
    let drain_began = Instant::now();
    let expected_total = expected.total(&hellos);
    let last_delivery = drain(expected_total, args.drain_timeout, DRAIN_QUIET).await;
    let drain_s = drain_began.elapsed().as_secs_f64();
    let drain_cut = delivered_total() < expected_total && last_delivery.elapsed() < DRAIN_QUIET;
    let pgrelay_final = proc_sample(server.pid);

    let reports: Vec<(ClientReport, Plain)> = client::finish(&ctx, handles).await?;
    let tally = Tally::new(&expected, reports.iter().map(|r| &r.0), end_id);
    let pgrelay = match (at_start.pgrelay_s, at_end.pgrelay_s, pgrelay_final) {
        (Some(a), Some(b), Some(f)) => Some(ProcReport {
            cpu_s: b - a,
            cpu_total_s: f.cpu_s,
            hwm_kib: f.hwm_kib,
            rss_end_kib: f.rss_kib,
            rss_before_connect_kib: rss_before_connect.map_or(0, |s| s.rss_kib),
            rss_connected_kib: rss_connected.map_or(0, |s| s.rss_kib),
        }),
        _ => None,
    };
    let insert_first_error = lock(&counts.first_error).clone();
    Ok(Report {
        subject,
        description: server.description.clone(),
        dashboards,
        notifications,
        connect_s,
        window_s,
        inserted_in_window,
        transactions_in_window,
        insert_errors: counts.errors.load(Relaxed),
        insert_first_error,
        deliveries_in_window: delivered_in_window,
        latency: latency_merged(),
        expected_total,
        drain_s,
        drain_cut,
        end_id,
        tally,
        pgrelay,
        pgrelay_shutdown: None,
        bench_cpu_s: at_end.bench_s - at_start.bench_s,
        bench_hwm_kib: proc_sample(None).map_or(0, |s| s.hwm_kib),
        machine_busy_s: at_end.machine.busy_s - at_start.machine.busy_s,
        load,
        quiet,
        open_files: OpenFiles::read(server.pid),
        postgres_cpu_s: at_start
            .postgres_s
            .zip(at_end.postgres_s)
            .map(|(a, b)| b - a),
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Connect,
    Warmup,
    Measure,
    Drain,
}

struct Progress {
    phase: Mutex<Phase>,
    started: Instant,
}

async fn progress_loop(
    progress: Arc<Progress>,
    ctx: Arc<Ctx>,
    counts: Arc<WriterCounts>,
    (pid, subject): (Option<u32>, Subject),
    sockets: usize,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last_delivered = delivered_total();
    let mut last_inserted = counts.inserted.load(Relaxed);
    let mut last_cpu = pid.and_then(|p| proc_sample(Some(p))).map(|s| s.cpu_s);
    loop {
        tick.tick().await;
        let phase = *lock(&progress.phase);
        let delivered = delivered_total();
        let inserted = counts.inserted.load(Relaxed);
        let sample = pid.and_then(|p| proc_sample(Some(p)));
        let cpu = match (sample, last_cpu) {
            (Some(s), Some(l)) => format!("{:.0}%", (s.cpu_s - l) * 100.0),
            _ => "-".into(),
        };
        last_cpu = sample.map(|s| s.cpu_s);
        let line = match phase {
            Phase::Connect => format!(
                "connected {}/{sockets} (failed {})",
                ctx.connected.load(Relaxed),
                ctx.failed.load(Relaxed)
            ),
            _ => {
                let h = latency_merged();
                let lat = if h.is_empty() {
                    "-".to_owned()
                } else {
                    quantiles_line(&h, &[0.5, 0.99])
                };
                format!(
                    "inserts {:>5}/s  deliveries {:>8}/s  latency {lat}",
                    inserted - last_inserted,
                    delivered - last_delivered,
                )
            }
        };
        eprintln!(
            "[{:>6.1}s] {:<8} {line}  {} rss {} cpu {cpu}",
            progress.started.elapsed().as_secs_f64(),
            format!("{phase:?}").to_lowercase(),
            subject.name(),
            sample.map_or("-".into(), |s| format!("{:.1} MiB", mib(s.rss_kib))),
        );
        last_delivered = delivered;
        last_inserted = inserted;
    }
}

#[derive(Debug, Clone, Copy)]
struct ProcReport {
    /// CPU seconds in the measured window.
    cpu_s: f64,
    /// CPU seconds since the process started, at the end.
    cpu_total_s: f64,
    hwm_kib: u64,
    rss_end_kib: u64,
    rss_before_connect_kib: u64,
    rss_connected_kib: u64,
}

pub(crate) struct Report {
    subject: Subject,
    description: String,
    dashboards: usize,
    notifications: usize,
    connect_s: f64,
    window_s: f64,
    inserted_in_window: u64,
    transactions_in_window: u64,
    /// Transactions that failed.
    insert_errors: u64,
    insert_first_error: Option<String>,
    deliveries_in_window: u64,
    latency: Histogram<u64>,
    expected_total: u64,
    drain_s: f64,
    /// The drain hit --drain-timeout while deliveries were still arriving.
    drain_cut: bool,
    end_id: i64,
    /// The clients' reports, checked against the log.
    tally: Tally,
    pgrelay: Option<ProcReport>,
    pub(crate) pgrelay_shutdown: Shutdown,
    bench_cpu_s: f64,
    bench_hwm_kib: u64,
    machine_busy_s: f64,
    /// Who used the CPU in the window.
    load: Load,
    quiet: Quiet,
    open_files: OpenFiles,
    /// Our throwaway PostgreSQL's CPU seconds in the window.
    postgres_cpu_s: Option<f64>,
}

impl Report {
    pub(crate) fn passed(&self) -> bool {
        let t = &self.tally;
        t.lost == 0 && t.duplicates == 0 && t.unexpected == 0 && self.insert_errors == 0
    }

    fn cpu_per_delivery(&self) -> CpuPer {
        CpuPer::new(
            self.pgrelay.map(|p| p.cpu_s),
            self.bench_cpu_s,
            self.deliveries_in_window,
        )
        .of(self.subject.name())
    }

    fn quantile_us(&self, q: f64) -> u64 {
        quantile_of(&self.latency, q)
    }

    pub(crate) fn table(&self, args: &Args) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let w = self.window_s.max(f64::EPSILON);
        let _ = writeln!(
            t,
            "pgrelay-bench{}: {}, {} {} for {} (warm-up {}), {}",
            self.quiet.mark(),
            args.sockets_line(),
            args.rate,
            self.subject.rate_unit(),
            humantime::format_duration(args.duration),
            humantime::format_duration(args.warmup),
            self.subject.source_line(args),
        );
        let _ = writeln!(t, "target: {}", self.description);
        let _ = writeln!(t);
        row(
            &mut t,
            "sockets connected",
            format!("{} in {:.2} s", args.sockets, self.connect_s),
        );
        let (events, unit) = self.subject.events();
        row(
            &mut t,
            events,
            format!(
                "{} in {:.2} s = {:.1}/s, {} {unit} ({} failed{})",
                self.inserted_in_window,
                w,
                self.inserted_in_window as f64 / w,
                self.transactions_in_window,
                self.insert_errors,
                self.insert_first_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        );
        row(
            &mut t,
            "deliveries",
            format!(
                "{} in the window = {:.0}/s",
                self.deliveries_in_window,
                self.deliveries_in_window as f64 / w
            ),
        );
        row(
            &mut t,
            "commit-to-receipt",
            format!(
                "{}  ({} samples)",
                quantiles_line(&self.latency, &[0.5, 0.99, 0.999]),
                self.latency.len()
            ),
        );
        row(
            &mut t,
            "",
            format!("(commit = {})", self.subject.commit().0),
        );
        row(
            &mut t,
            "lost",
            if self.drain_cut {
                format!(
                    "{} (not arrived when --drain-timeout ended the wait, deliveries still arriving: late, maybe not lost)",
                    self.tally.lost
                )
            } else {
                self.tally.lost.to_string()
            },
        );
        row(&mut t, "duplicated", self.tally.duplicates.to_string());
        row(
            &mut t,
            "misrouted/unexpected",
            self.tally.unexpected.to_string(),
        );
        row(
            &mut t,
            "whole-run check",
            format!(
                "{} of {} expected deliveries (events up to id {}), drained in {:.2} s",
                self.tally.received, self.expected_total, self.end_id, self.drain_s
            ),
        );
        row(
            &mut t,
            "server closes",
            format!(
                "{} (resumed {} times), resets {}, client errors {}{}",
                codes_line(&self.tally.closes),
                self.tally.reconnects,
                self.tally.resets,
                self.tally.errors,
                self.tally
                    .first_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            ),
        );
        let name = self.subject.name();
        match &self.pgrelay {
            Some(p) => {
                row(
                    &mut t,
                    &format!("{name} peak RSS"),
                    format!(
                        "{:.1} MiB (VmHWM); {:.1} MiB before the sockets, {:.1} MiB with them idle ({:.1} KiB/socket)",
                        mib(p.hwm_kib),
                        mib(p.rss_before_connect_kib),
                        mib(p.rss_connected_kib),
                        p.rss_connected_kib.saturating_sub(p.rss_before_connect_kib) as f64
                            / args.sockets as f64
                    ),
                );
                row(
                    &mut t,
                    &format!("{name} CPU"),
                    format!(
                        "{:.2} s in the window ({:.0}% of one core); {:.2} s since start",
                        p.cpu_s,
                        p.cpu_s / w * 100.0,
                        p.cpu_total_s
                    ),
                );
            }
            None => row(&mut t, name, "no pid (pass --pid) for RSS and CPU".into()),
        }
        row(
            &mut t,
            "bench itself",
            format!(
                "{:.2} s CPU in the window ({:.0}% of one core), peak RSS {:.1} MiB",
                self.bench_cpu_s,
                self.bench_cpu_s / w * 100.0,
                mib(self.bench_hwm_kib)
            ),
        );
        if let Some(pg) = self.postgres_cpu_s {
            row(
                &mut t,
                "PostgreSQL",
                format!(
                    "{:.2} s CPU in the window ({:.0}% of one core)",
                    pg,
                    pg / w * 100.0
                ),
            );
        }
        row(
            &mut t,
            "CPU per delivery",
            self.cpu_per_delivery().line("delivery"),
        );
        self.quiet.rows(&mut t, "machine", &self.load);
        row(&mut t, "open-file limits", self.open_files.line());
        if let Some((code, secs)) = self.pgrelay_shutdown {
            row(
                &mut t,
                &format!("{name} shutdown"),
                format!(
                    "exit {} {:.2} s after {}",
                    code.map_or("signal".into(), |c| c.to_string()),
                    secs,
                    self.subject.stop_signal()
                ),
            );
        }
        self.quiet.verdict(
            &mut t,
            self.passed(),
            "PASS: 0 lost, 0 duplicated",
            "FAIL: lost, duplicated or misrouted deliveries, or insert errors",
        );
        t
    }

    pub(crate) fn json(&self, args: &Args) -> String {
        let w = self.window_s.max(f64::EPSILON);
        let pgrelay = self.pgrelay.map(|p| {
            serde_json::json!({
                "peak_rss_kib": p.hwm_kib,
                "rss_before_connect_kib": p.rss_before_connect_kib,
                "rss_connected_kib": p.rss_connected_kib,
                "rss_end_kib": p.rss_end_kib,
                "cpu_s": p.cpu_s,
                "cpu_total_s": p.cpu_total_s,
            })
        });
        self.quiet
            .stamp(serde_json::json!({
                "sockets": args.sockets,
                "dashboard_sockets": self.dashboards,
                "notification_sockets": self.notifications,
                "stream": format!("{:?}", args.stream).to_lowercase(),
                "stream_keys": args.stream_keys(),
                "transport": args.transport.name(),
                "rate": args.rate,
                "duration_s": args.duration.as_secs_f64(),
                "warmup_s": args.warmup.as_secs_f64(),
                "writers": args.writers,
                "rows_per_insert": args.rows_per_insert,
                "target": self.description,
                "connect_s": self.connect_s,
                "window_s": self.window_s,
                "inserted": self.inserted_in_window,
                "inserts_per_s": self.inserted_in_window as f64 / w,
                "transactions": self.transactions_in_window,
                "insert_errors": self.insert_errors,
                "deliveries": self.deliveries_in_window,
                "deliveries_per_s": self.deliveries_in_window as f64 / w,
                "latency_us": {
                    "commit": self.subject.commit().1,
                    "count": self.latency.len(),
                    "p50": self.quantile_us(0.5),
                    "p99": self.quantile_us(0.99),
                    "p999": self.quantile_us(0.999),
                    "max": self.latency.max(),
                },
                "lost": self.tally.lost,
                "duplicated": self.tally.duplicates,
                "unexpected": self.tally.unexpected,
                "expected_total": self.expected_total,
                "received_total": self.tally.received,
                "drain_s": self.drain_s,
                "drain_cut": self.drain_cut,
                "reconnects": self.tally.reconnects,
                "resets": self.tally.resets,
                "server_closes": codes_json(&self.tally.closes),
                "client_errors": self.tally.errors,
                "pgrelay": pgrelay,
                "pgrelay_shutdown_s": self.pgrelay_shutdown.map(|(_, s)| s),
                "bench_cpu_s": self.bench_cpu_s,
                "cpu_per_delivery_us": self.cpu_per_delivery().json(),
                "bench_peak_rss_kib": self.bench_hwm_kib,
                "machine_busy_s": self.machine_busy_s,
                "postgres_cpu_s": self.postgres_cpu_s,
                "load": self.load,
                "open_files": self.open_files,
                "passed": self.passed(),
            }))
            .to_string()
    }
}
