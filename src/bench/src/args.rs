//! The command line: which scenario, how many sockets at what rate, and the
//! pgrelay to measure. Everything the flags cannot say by their types is
//! checked in [`Args::check`] before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use pgrelay::wire::Transport;

use crate::error::{BenchError, Result};
use crate::resume;

/// `--rows-per-insert` at most: the rows of one INSERT, or one batch of the
/// plain broadcaster's.
pub(crate) const MAX_ROWS_PER_INSERT: u16 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// N sockets, R inserts/s: deliveries, latency, loss, memory (the default).
    Load,
    /// One user's resume over a 1,000,000-event log, then 1,000 at once (issue 10).
    SparseResume,
    /// N sockets resume at once after a pgrelay restart (issue 10).
    ResumeStorm,
    /// Waves of refused handshakes (bad tokens): does the RSS come back? (issue 10)
    HandshakeStorm,
    /// With --sockets idle, --connect-total new sockets through the whole
    /// door (connect, token, upgrade, hello, close): sockets/s, time to hello.
    ConnectRate,
    /// The load run against an ideal broadcaster (a child process, no
    /// PostgreSQL) instead of pgrelay: the machine's limit, same clients.
    Ideal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StreamKind {
    /// Every socket on /ws/dashboard/ (each gets every event).
    Dashboard,
    /// Every socket on /ws/notifications/, one user each (each event goes to one user).
    Notifications,
    /// Half dashboard, half notifications.
    Mixed,
    /// Every socket on /ws/businesses/KEY/ (a super admin), spread over
    /// --businesses keys; the writers' rows are those businesses'
    /// reservations and updates, each key getting a share.
    Business,
}

/// How the clients read: `/ws/...` or `/sse/...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TransportKind {
    Websocket,
    /// Server-Sent Events (GET /sse/..., Accept: text/event-stream).
    Sse,
}

impl TransportKind {
    pub(crate) fn wire(self) -> Transport {
        match self {
            TransportKind::Websocket => Transport::WebSocket,
            TransportKind::Sse => Transport::ServerSentEvents,
        }
    }

    /// As the report names it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            TransportKind::Websocket => "websocket",
            TransportKind::Sse => "sse",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "pgrelay-bench",
    about = "Load generator for pgrelay: N sockets, R inserts/s, latency, loss, memory"
)]
pub(crate) struct Args {
    /// What to measure (see BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = Scenario::Load)]
    pub(crate) scenario: Scenario,
    #[command(flatten)]
    pub(crate) resume: resume::ResumeArgs,
    /// handshake-storm: handshakes in all.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) storm_handshakes: usize,
    /// handshake-storm: handshakes open at once (one wave).
    #[arg(long, default_value_t = 3_000)]
    pub(crate) storm_concurrency: usize,
    /// WebSocket clients to open.
    #[arg(long, default_value_t = 1000)]
    pub(crate) sockets: usize,
    /// Rows inserted per second (--rows-per-insert rows per transaction).
    #[arg(long, default_value_t = 100)]
    pub(crate) rate: u32,
    /// Rows per transaction: one `INSERT ... VALUES (...), (...)` of N rows
    /// (N consecutive rows of the schedule, sent when the last is due).
    #[arg(long, default_value_t = 1)]
    pub(crate) rows_per_insert: u32,
    /// How long the measured phase inserts (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Inserting at the same rate before measuring (not in the figures).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) warmup: Duration,
    /// Which endpoint the sockets use.
    #[arg(long, value_enum, default_value_t = StreamKind::Dashboard)]
    pub(crate) stream: StreamKind,
    /// --stream business: the stream keys (businesses created for the run),
    /// at most --sockets; socket i opens key i mod N.
    #[arg(long, default_value_t = 100)]
    pub(crate) businesses: usize,
    /// How the clients read (load and resume-storm): WebSocket frames, or
    /// Server-Sent Events from the same endpoint under /sse/.
    #[arg(long, value_enum, default_value_t = TransportKind::Websocket)]
    pub(crate) transport: TransportKind,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Target a running pgrelay (ws://HOST:PORT) instead of starting one; needs
    /// --database-url (demo schema installed) and --jwt-secret.
    #[arg(long)]
    pub(crate) url: Option<String>,
    /// The target's database (with --url).
    #[arg(long, hide_env_values = true)]
    pub(crate) database_url: Option<String>,
    /// The target's HS256 secret (with --url).
    #[arg(long, hide_env_values = true)]
    pub(crate) jwt_secret: Option<String>,
    /// The target's process id, for its RSS and CPU (with --url).
    #[arg(long)]
    pub(crate) pid: Option<u32>,
    /// Database connections inserting rows.
    #[arg(long, default_value_t = 4)]
    pub(crate) writers: usize,
    /// Socket handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    pub(crate) connect_concurrency: usize,
    /// connect-rate: new sockets in all (each closed after its hello).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) connect_total: usize,
    /// Refuse to measure when processes other than the bench, its pgrelay
    /// and its PostgreSQL use more than this (% of one core) before the
    /// measured phase; over it in the window marks the run NOISY.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) quiet_max_busy: f64,
    /// Measure even when the machine is not quiet (the report says NOISY).
    #[arg(long)]
    pub(crate) allow_noisy: bool,
    /// How long to wait, at most, for in-flight deliveries after the last
    /// insert (the wait also ends after 5 s without any delivery).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub(crate) drain_timeout: Duration,
    /// The pgrelay binary to start [default: `pgrelay` next to this executable].
    #[arg(long)]
    pub(crate) pgrelay_bin: Option<PathBuf>,
    /// Extra argument for `pgrelay serve` (repeatable), e.g. --server-arg=--dashboard-queue=8192.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub(crate) server_args: Vec<String>,
    /// Tokio worker threads of the bench (1 or 2).
    #[arg(long, default_value_t = 2)]
    pub(crate) threads: usize,
    /// ideal: the broadcaster's writer threads, each owning a share of the
    /// sockets.
    #[arg(long, default_value_t = 2)]
    pub(crate) ideal_threads: usize,
    /// Be the ideal broadcaster (how --scenario ideal runs this executable):
    /// the port on stdout, batch sizes on stdin.
    #[arg(long, hide = true)]
    pub(crate) ideal_serve: bool,
}

impl Args {
    pub(crate) fn check(&self) -> Result<()> {
        if self.sockets == 0 {
            return Err(BenchError::Usage("--sockets must be at least 1"));
        }
        if self.rate == 0 {
            return Err(BenchError::Usage("--rate must be at least 1"));
        }
        if self.duration.is_zero() {
            return Err(BenchError::Usage("--duration must be positive"));
        }
        if !(1..=2).contains(&self.threads) {
            return Err(BenchError::Usage("--threads must be 1 or 2"));
        }
        if !(1..=64).contains(&self.writers) {
            return Err(BenchError::Usage("--writers must be between 1 and 64"));
        }
        if self.storm_handshakes == 0 || self.storm_concurrency == 0 {
            return Err(BenchError::Usage(
                "--storm-handshakes and --storm-concurrency must be at least 1",
            ));
        }
        if self.businesses == 0 {
            return Err(BenchError::Usage("--businesses must be at least 1"));
        }
        if self.transport == TransportKind::Sse
            && !matches!(self.scenario, Scenario::Load | Scenario::ResumeStorm)
        {
            return Err(BenchError::Usage(
                "--transport sse is for --scenario load and resume-storm",
            ));
        }
        if !(1..=u32::from(MAX_ROWS_PER_INSERT)).contains(&self.rows_per_insert) {
            return Err(BenchError::Usage(
                "--rows-per-insert must be between 1 and 1000",
            ));
        }
        if self.rows_per_insert > 1 && self.stream == StreamKind::Business {
            return Err(BenchError::Usage(
                "--rows-per-insert is for new businesses: --stream business writes \
                 reservations and updates, one per transaction",
            ));
        }
        if self.quiet_max_busy.is_nan() || self.quiet_max_busy < 0.0 {
            return Err(BenchError::Usage("--quiet-max-busy must be 0 or more"));
        }
        if self.scenario == Scenario::ConnectRate {
            if self.connect_total == 0 {
                return Err(BenchError::Usage("--connect-total must be at least 1"));
            }
            if self.stream == StreamKind::Business {
                return Err(BenchError::Usage(
                    "--scenario connect-rate: --stream dashboard, notifications or mixed",
                ));
            }
        }
        if self.connect_concurrency == 0 {
            return Err(BenchError::Usage(
                "--connect-concurrency must be at least 1",
            ));
        }
        if self.url.is_some() && (self.database_url.is_none() || self.jwt_secret.is_none()) {
            return Err(BenchError::Usage(
                "--url needs --database-url and --jwt-secret",
            ));
        }
        if self.url.is_none() && (self.database_url.is_some() || self.jwt_secret.is_some()) {
            return Err(BenchError::Usage(
                "--database-url and --jwt-secret are for --url (a running pgrelay)",
            ));
        }
        if self.scenario == Scenario::Ideal {
            if self.url.is_some() {
                return Err(BenchError::Usage(
                    "--scenario ideal starts its own broadcaster: drop --url",
                ));
            }
            // (Over WebSocket: --transport sse is refused above.)
            if self.stream != StreamKind::Dashboard {
                return Err(BenchError::Usage(
                    "--scenario ideal: every socket on the dashboard (--stream dashboard)",
                ));
            }
        }
        if !(1..=64).contains(&self.ideal_threads) {
            return Err(BenchError::Usage(
                "--ideal-threads must be between 1 and 64",
            ));
        }
        if matches!(
            self.scenario,
            Scenario::SparseResume | Scenario::ResumeStorm
        ) {
            if self.url.is_some() {
                return Err(BenchError::Usage("--scenario sparse-resume and resume-storm start their own pgrelay and PostgreSQL: drop --url"));
            }
            self.resume.check()?;
        }
        Ok(())
    }

    /// (dashboard sockets, notification sockets); business sockets are
    /// the rest.
    pub(crate) fn split(&self) -> (usize, usize) {
        match self.stream {
            StreamKind::Dashboard => (self.sockets, 0),
            StreamKind::Business => (0, 0),
            StreamKind::Notifications => (0, self.sockets),
            StreamKind::Mixed => (self.sockets - self.sockets / 2, self.sockets / 2),
        }
    }

    /// `N sockets over T (what they open)`, the reports' first words.
    pub(crate) fn sockets_line(&self) -> String {
        let (dashboards, notifications) = self.split();
        let what = match self.stream_keys() {
            0 => format!("{dashboards} dashboard, {notifications} notifications"),
            keys => format!(
                "businesses stream over {keys} keys, {:.1} sockets a key",
                self.sockets as f64 / keys as f64
            ),
        };
        format!(
            "{} sockets over {} ({what})",
            self.sockets,
            self.transport.name()
        )
    }

    /// Open files the bench needs at most: its sockets, the connect-rate
    /// sockets in flight, and a margin for database connections and the rest.
    pub(crate) fn files_needed(&self) -> usize {
        let in_flight = match self.scenario {
            Scenario::ConnectRate => self.connect_concurrency,
            Scenario::HandshakeStorm => self.storm_concurrency,
            _ => 0,
        };
        self.sockets + in_flight + 256
    }

    /// --stream business: the keys the sockets spread over (0 otherwise).
    pub(crate) fn stream_keys(&self) -> usize {
        match self.stream {
            StreamKind::Business => self.businesses.min(self.sockets),
            _ => 0,
        }
    }
}
