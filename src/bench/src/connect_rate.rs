//! The connect-rate scenario: how fast pgrelay lets sockets in, with
//! `--sockets` already open and idle (`--stream`, dashboard by default), so
//! that the door is measured on a server that is already holding a crowd.
//! `--connect-total` new sockets go through the whole door (TCP connect, an
//! HS256 token of a distinct user each, the upgrade, `hello`),
//! `--connect-concurrency` in flight; each is closed cleanly (close
//! handshake) right after its `hello`, so at most `--connect-concurrency`
//! of them are open at once and the open-file limit is not hit. It reports
//! sockets/s (hellos received), p50/p99/max time to hello (from the TCP
//! connect), failures by kind, pgrelay's CPU (per socket, beside the
//! bench's; a socket's cost includes its close) and RSS, and whether the
//! idle sockets were left alone. It
//! passes when every new socket got its hello and no idle socket was closed
//! or failed.
//!
//! The handshake is the load run's ([`crate::client::connect`]); the idle
//! sockets are its clients ([`crate::client::spawn_all`]). A new socket's
//! user is 4,000,001 + i (notifications) or super admin 1,000,001 +
//! 3,000,000 + i (dashboard), above every user the other sockets use.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::args::{Args, StreamKind};
use crate::client::{connect, finish, spawn_all, ClientSpec, Ctx, Plain};
use crate::error::Result;
use crate::expected::Audience;
use crate::procfs::{mib, proc_sample, Load, OpenFiles, PeakRss};
use crate::quiet::{self, Quiet, Window};
use crate::server::Server;
use crate::stats::{new_histogram, quantile_of, quantiles_line, row, CpuPer};
use crate::workload::{workload, Workload};

/// New notification sockets are users from here on.
const NEW_USERS: usize = 4_000_001;
/// New dashboard sockets are super admins this far above the idle ones'.
const NEW_ADMINS: usize = 3_000_000;

/// The new sockets' specs: a distinct user each, on `stream`'s endpoint
/// (mixed: dashboard and notifications in turn).
fn door_specs(secret: &str, stream: StreamKind, n: usize) -> Result<Vec<ClientSpec>> {
    (0..n)
        .map(|i| {
            let dashboard = match stream {
                StreamKind::Dashboard => true,
                StreamKind::Mixed => i % 2 == 0,
                StreamKind::Notifications | StreamKind::Business => false,
            };
            if dashboard {
                ClientSpec::super_admin(secret, NEW_ADMINS + i, Audience::Dashboard)
            } else {
                ClientSpec::user(secret, &(NEW_USERS + i).to_string())
            }
        })
        .collect()
}

/// The new sockets, taken in turn by the workers.
struct Door {
    specs: Vec<ClientSpec>,
    next: AtomicUsize,
    hellos: AtomicU64,
    failures: AtomicU64,
}

/// One worker's account.
struct Walked {
    /// Time to hello, µs.
    to_hello: Histogram<u64>,
    /// Failures by kind ([`crate::error::BenchError::kind`]) and the first
    /// message of each kind.
    failures: BTreeMap<String, (u64, String)>,
    last_hello: Option<Instant>,
}

/// Takes new sockets from `door` until there are none left: each through
/// the door, then closed.
async fn walk(ctx: Arc<Ctx>, door: Arc<Door>) -> Walked {
    let mut walked = Walked {
        to_hello: new_histogram(),
        failures: BTreeMap::new(),
        last_hello: None,
    };
    while let Some(spec) = door.specs.get(door.next.fetch_add(1, Relaxed)) {
        let began = Instant::now();
        // Boxed: the handshake's state is large.
        match Box::pin(connect(&ctx, spec, None)).await {
            Ok((mut ws, _hello)) => {
                let now = Instant::now();
                let us = now.duration_since(began).as_micros().max(1);
                walked
                    .to_hello
                    .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
                walked.last_hello = Some(now);
                door.hellos.fetch_add(1, Relaxed);
                ws.close_normally().await;
            }
            Err(e) => {
                door.failures.fetch_add(1, Relaxed);
                let entry = walked
                    .failures
                    .entry(e.kind())
                    .or_insert_with(|| (0, e.to_string()));
                entry.0 += 1;
            }
        }
    }
    walked
}

pub(crate) async fn run(args: &Args, server: &Server) -> Result<Report> {
    let Workload { specs, .. } = workload(args, server).await?;
    let ctx = Arc::new(Ctx::new(server, args.connect_concurrency, args.sockets));
    eprintln!("connecting {} idle sockets...", args.sockets);
    let (idle_connect_s, idle) = spawn_all(&ctx, specs, || Plain).await?;
    eprintln!(
        "{} idle sockets connected in {idle_connect_s:.1} s; minting {} tokens...",
        args.sockets, args.connect_total
    );
    let door = Arc::new(Door {
        specs: door_specs(&server.secret, args.stream, args.connect_total)?,
        next: AtomicUsize::new(0),
        hellos: AtomicU64::new(0),
        failures: AtomicU64::new(0),
    });
    let mut quiet = quiet::check(args, server).await?;
    let rss_idle_kib = proc_sample(server.pid).map_or(0, |s| s.rss_kib);

    let peak = PeakRss::start(server.pid);
    let window = Window::open(server);
    let before = window.start;
    let began = Instant::now();
    let workers: Vec<_> = (0..args.connect_concurrency.min(args.connect_total))
        .map(|_| tokio::spawn(walk(Arc::clone(&ctx), Arc::clone(&door))))
        .collect();
    let progress = tokio::spawn(progress(Arc::clone(&door), server.pid, args.connect_total));
    let mut walks = Vec::with_capacity(workers.len());
    let mut lost_workers = 0;
    for worker in workers {
        match worker.await {
            Ok(walked) => walks.push(walked),
            Err(_) => lost_workers += 1,
        }
    }
    progress.abort();
    let (after, load) = quiet.close(window, server);
    let peak_kib = peak.kib();
    drop(peak);
    let rss_end_kib = proc_sample(server.pid).map_or(0, |s| s.rss_kib);

    let mut to_hello = new_histogram();
    let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
    if lost_workers > 0 {
        let why = "a connecting task panicked; its sockets are not counted".to_owned();
        failures.insert("worker".into(), (lost_workers, why));
    }
    let mut last_hello = None;
    for walked in walks {
        let _ = to_hello.add(&walked.to_hello);
        for (kind, (n, first)) in walked.failures {
            failures.entry(kind).or_insert((0, first)).0 += n;
        }
        last_hello = last_hello.max(walked.last_hello);
    }
    // The idle sockets: still open, never closed by pgrelay?
    let idle_reports = finish(&ctx, idle).await?;
    let idle_closes = idle_reports.iter().map(|r| r.0.closes.len() as u64).sum();
    let idle_errors = idle_reports.iter().filter(|r| r.0.error.is_some()).count() as u64;
    Ok(Report {
        description: server.description.clone(),
        idle_connect_s,
        hellos: door.hellos.load(Relaxed),
        total: args.connect_total as u64,
        failures,
        walk_s: last_hello.map_or(0.0, |at| at.duration_since(began).as_secs_f64()),
        to_hello,
        cpu: CpuPer::new(
            before.pgrelay_s.zip(after.pgrelay_s).map(|(a, b)| b - a),
            after.bench_s - before.bench_s,
            door.hellos.load(Relaxed),
        ),
        load,
        quiet,
        rss_idle_kib,
        peak_kib,
        rss_end_kib,
        hwm_kib: proc_sample(server.pid).map_or(0, |s| s.hwm_kib),
        idle_closes,
        idle_errors,
        open_files: OpenFiles::read(server.pid),
    })
}

/// A line a second on stderr: hellos so far and in the last second.
async fn progress(door: Arc<Door>, pid: Option<u32>, total: usize) {
    let began = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let hellos = door.hellos.load(Relaxed);
        eprintln!(
            "[{:>6.1}s] door     hellos {hellos}/{total} ({}/s), failed {}  pgrelay rss {}",
            began.elapsed().as_secs_f64(),
            hellos - last,
            door.failures.load(Relaxed),
            proc_sample(pid).map_or("-".into(), |s| format!("{:.1} MiB", mib(s.rss_kib))),
        );
        last = hellos;
    }
}

pub(crate) struct Report {
    description: String,
    idle_connect_s: f64,
    hellos: u64,
    /// Sockets the run was to open (`--connect-total`).
    total: u64,
    failures: BTreeMap<String, (u64, String)>,
    /// From the first connect to the last hello.
    walk_s: f64,
    to_hello: Histogram<u64>,
    /// pgrelay's and the bench's CPU per new socket.
    cpu: CpuPer,
    load: Load,
    quiet: Quiet,
    /// pgrelay's RSS with the idle sockets, before the new ones.
    rss_idle_kib: u64,
    /// pgrelay's highest RSS while the new sockets came and went.
    peak_kib: u64,
    rss_end_kib: u64,
    /// VmHWM: the peak of pgrelay's life (the idle sockets' connects too).
    hwm_kib: u64,
    /// Idle sockets closed by pgrelay during the run, and with an error.
    idle_closes: u64,
    idle_errors: u64,
    open_files: OpenFiles,
}

impl Report {
    fn failed(&self) -> u64 {
        self.failures.values().map(|f| f.0).sum()
    }

    /// Every socket got its `hello`, nothing failed, and the idle ones were
    /// left alone.
    pub(crate) fn passed(&self) -> bool {
        self.hellos == self.total
            && self.failed() == 0
            && self.idle_closes == 0
            && self.idle_errors == 0
    }

    fn rate(&self) -> f64 {
        self.hellos as f64 / self.walk_s.max(f64::EPSILON)
    }

    fn quantile_us(&self, q: f64) -> u64 {
        quantile_of(&self.to_hello, q)
    }

    pub(crate) fn table(&self, args: &Args) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "pgrelay-bench connect-rate{}: {} new sockets ({} in flight, each closed after \
             its hello) beside {}",
            self.quiet.mark(),
            args.connect_total,
            args.connect_concurrency,
            args.sockets_line(),
        );
        let _ = writeln!(t, "target: {}", self.description);
        let _ = writeln!(t);
        row(
            &mut t,
            "idle sockets",
            format!(
                "{} connected in {:.2} s; closed by pgrelay during the run {}, with errors {}",
                args.sockets, self.idle_connect_s, self.idle_closes, self.idle_errors
            ),
        );
        row(
            &mut t,
            "new sockets",
            format!(
                "{} hellos in {:.2} s = {:.0} sockets/s",
                self.hellos,
                self.walk_s,
                self.rate()
            ),
        );
        row(
            &mut t,
            "time to hello",
            format!(
                "{}  (from the TCP connect)",
                quantiles_line(&self.to_hello, &[0.5, 0.99])
            ),
        );
        let failures = if self.failures.is_empty() {
            "none".to_owned()
        } else {
            self.failures
                .iter()
                .map(|(kind, (n, first))| format!("{n} x {kind} (first: {first})"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        row(&mut t, "failures", failures);
        row(
            &mut t,
            "pgrelay RSS",
            format!(
                "{:.1} MiB idle with the sockets, {:.1} MiB peak in the run, {:.1} MiB after; \
                 VmHWM {:.1} MiB",
                mib(self.rss_idle_kib),
                mib(self.peak_kib),
                mib(self.rss_end_kib),
                mib(self.hwm_kib)
            ),
        );
        row(&mut t, "CPU per socket", self.cpu.line("socket"));
        self.quiet.rows(&mut t, "machine", &self.load);
        row(&mut t, "open-file limits", self.open_files.line());
        self.quiet.verdict(
            &mut t,
            self.passed(),
            "PASS: every new socket got its hello, no idle socket disturbed",
            "FAIL: new sockets failed, or idle sockets were closed",
        );
        t
    }

    pub(crate) fn json(&self, args: &Args) -> String {
        let failures: BTreeMap<&str, serde_json::Value> = self
            .failures
            .iter()
            .map(|(kind, (n, first))| {
                (
                    kind.as_str(),
                    serde_json::json!({"count": n, "first": first}),
                )
            })
            .collect();
        self.quiet
            .stamp(serde_json::json!({
                "scenario": "connect-rate",
                "target": self.description,
                "sockets": args.sockets,
                "stream": format!("{:?}", args.stream).to_lowercase(),
                "idle_connect_s": self.idle_connect_s,
                "connect_total": args.connect_total,
                "connect_concurrency": args.connect_concurrency,
                "hellos": self.hellos,
                "failed": self.failed(),
                "failures": failures,
                "walk_s": self.walk_s,
                "sockets_per_s": self.rate(),
                "time_to_hello_us": {
                    "count": self.to_hello.len(),
                    "p50": self.quantile_us(0.5),
                    "p99": self.quantile_us(0.99),
                    "max": self.to_hello.max(),
                },
                "cpu_per_socket_us": self.cpu.json(),
                "pgrelay": {
                    "rss_idle_kib": self.rss_idle_kib,
                    "peak_rss_kib": self.peak_kib,
                    "rss_end_kib": self.rss_end_kib,
                    "hwm_kib": self.hwm_kib,
                },
                "idle_closes": self.idle_closes,
                "idle_errors": self.idle_errors,
                "load": self.load,
                "open_files": self.open_files,
                "passed": self.passed(),
            }))
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_sockets_are_distinct_users_on_the_stream() {
        let specs = door_specs("secret", StreamKind::Mixed, 4).expect("specs");
        let audiences: Vec<_> = specs.iter().map(|s| s.audience.clone()).collect();
        assert_eq!(
            audiences,
            [
                Audience::Dashboard,
                Audience::User("4000002".into()),
                Audience::Dashboard,
                Audience::User("4000004".into())
            ]
        );
        let dashboards = door_specs("secret", StreamKind::Dashboard, 3).expect("specs");
        assert!(dashboards.iter().all(|s| s.audience == Audience::Dashboard));
        let users = door_specs("secret", StreamKind::Notifications, 2).expect("specs");
        assert_eq!(users[1].audience, Audience::User("4000002".into()));
    }
}
