//! `pgrelay-bench`: the load generator of DESIGN.md's "Performance" section.
//!
//! It opens N WebSocket clients with minted tokens (dashboard, per-user
//! notifications, or half of each), inserts rows into `businesses` at rate R
//! for D seconds through real transactions (one row per transaction, spread
//! over several connections), and reports deliveries/s, commit-to-receipt
//! latency (p50/p99/p99.9/max, an HDR histogram), lost, duplicated and
//! misrouted deliveries, and the pgrelay process's peak RSS and CPU seconds.
//!
//! "Commit" is the event's `at` field: `clock_timestamp()` taken by the
//! deferred capture trigger while the transaction commits (inside the
//! ordering lock, just before the event row and the NOTIFY are written), so
//! the latency includes the rest of the commit, the NOTIFY, pgrelay's read of
//! the log, routing, fan-out and the socket write. Both clocks are this
//! machine's wall clock.
//!
//! Correctness checks, independent of pgrelay's own code: each client checks
//! that ids strictly increase (anything else is a duplicate) and keeps the ids
//! it got as ranges; at the end the bench reads `pgrelay.events` for the run's
//! id range, routes each row with the default routes
//! (`business_events=dashboard,user:owner_id`,
//! `reservation_events=dashboard,user:business_owner_id,user:customer_id`)
//! and compares, per client, what it got with what it should have got.
//!
//! By default it starts its own throwaway PostgreSQL (`pgrelay_cluster`),
//! installs the demo schema, seeds users, and runs the `pgrelay` binary found
//! next to this executable as a child process (`serve`); with `--url` it
//! targets a running pgrelay instead.
//!
//! `--scenario handshake-storm` measures memory instead: the idle RSS of a
//! fresh pgrelay, then `--storm-handshakes` WebSocket handshakes with a token
//! signed by the wrong key, in waves of `--storm-concurrency` at once (each
//! wave's connections all open before any is answered, as a flood's would),
//! the peak RSS, and the RSS 1, 5 and 10 s after the last answer. It passes
//! when the RSS 10 s after is within 20% of the idle RSS.
//!
//! It is built to cost little per delivery, or it would measure itself: frames
//! are not deserialised (the id is read from the fixed frame prefix and `at`
//! by hand), the client read buffer is 4 KiB, counters and the histogram are
//! per worker thread, and the runtime has at most two worker threads.
//!
//! That is the default `--scenario load`; the resume scenarios of issue 10
//! (`sparse-resume`, `resume-storm`) live in `pgrelay-bench/resume.rs`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hyper_tungstenite::tungstenite::handshake::client::generate_key;
use hyper_tungstenite::tungstenite::handshake::derive_accept_key;
use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use hyper_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use hyper_tungstenite::tungstenite::Message;
use hyper_tungstenite::WebSocketStream;
use pgrelay::install::InstallConfig;
use pgrelay_cluster::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

mod resume;

// ---------------------------------------------------------------------------
// Command line

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// N sockets, R inserts/s: deliveries, latency, loss, memory (the default).
    Load,
    /// One user's resume over a 1,000,000-event log, then 1,000 at once (issue 10).
    SparseResume,
    /// N sockets resume at once after a pgrelay restart (issue 10).
    ResumeStorm,
    /// Waves of refused handshakes (bad tokens): does the RSS come back? (issue 10)
    HandshakeStorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StreamKind {
    /// Every socket on /ws/dashboard/ (each gets every event).
    Dashboard,
    /// Every socket on /ws/notifications/, one user each (each event goes to one user).
    Notifications,
    /// Half dashboard, half notifications.
    Mixed,
}

#[derive(Debug, Parser)]
#[command(
    name = "pgrelay-bench",
    about = "Load generator for pgrelay: N sockets, R inserts/s, latency, loss, memory"
)]
struct Args {
    /// What to measure (see BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = Scenario::Load)]
    scenario: Scenario,
    #[command(flatten)]
    resume: resume::ResumeArgs,
    /// handshake-storm: handshakes in all.
    #[arg(long, default_value_t = 20_000)]
    storm_handshakes: usize,
    /// handshake-storm: handshakes open at once (one wave).
    #[arg(long, default_value_t = 3_000)]
    storm_concurrency: usize,
    /// WebSocket clients to open.
    #[arg(long, default_value_t = 1000)]
    sockets: usize,
    /// Rows inserted per second (one row per transaction).
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// How long the measured phase inserts (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Inserting at the same rate before measuring (not in the figures).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Which endpoint the sockets use.
    #[arg(long, value_enum, default_value_t = StreamKind::Dashboard)]
    stream: StreamKind,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Target a running pgrelay (ws://HOST:PORT) instead of starting one; needs
    /// --database-url (demo schema installed) and --jwt-secret.
    #[arg(long)]
    url: Option<String>,
    /// The target's database (with --url).
    #[arg(long, hide_env_values = true)]
    database_url: Option<String>,
    /// The target's HS256 secret (with --url).
    #[arg(long, hide_env_values = true)]
    jwt_secret: Option<String>,
    /// The target's process id, for its RSS and CPU (with --url).
    #[arg(long)]
    pid: Option<u32>,
    /// Database connections inserting rows.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Socket handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// How long to wait, at most, for in-flight deliveries after the last
    /// insert (the wait also ends after 5 s without any delivery).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// The pgrelay binary to start [default: `pgrelay` next to this executable].
    #[arg(long)]
    pgrelay_bin: Option<PathBuf>,
    /// Extra argument for `pgrelay serve` (repeatable), e.g. --server-arg=--dashboard-queue=8192.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Tokio worker threads of the bench (1 or 2).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

impl Args {
    fn check(&self) -> Result<(), String> {
        if self.sockets == 0 {
            return Err("--sockets must be at least 1".into());
        }
        if self.rate == 0 {
            return Err("--rate must be at least 1".into());
        }
        if self.duration.is_zero() {
            return Err("--duration must be positive".into());
        }
        if !(1..=2).contains(&self.threads) {
            return Err("--threads must be 1 or 2".into());
        }
        if !(1..=64).contains(&self.writers) {
            return Err("--writers must be between 1 and 64".into());
        }
        if self.storm_handshakes == 0 || self.storm_concurrency == 0 {
            return Err("--storm-handshakes and --storm-concurrency must be at least 1".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if self.url.is_some() && (self.database_url.is_none() || self.jwt_secret.is_none()) {
            return Err("--url needs --database-url and --jwt-secret".into());
        }
        if self.url.is_none() && (self.database_url.is_some() || self.jwt_secret.is_some()) {
            return Err("--database-url and --jwt-secret are for --url (a running pgrelay)".into());
        }
        if matches!(
            self.scenario,
            Scenario::SparseResume | Scenario::ResumeStorm
        ) {
            if self.url.is_some() {
                return Err("--scenario sparse-resume and resume-storm start their own pgrelay and PostgreSQL: drop --url".into());
            }
            self.resume.check()?;
        }
        Ok(())
    }

    /// (dashboard sockets, notification sockets).
    fn split(&self) -> (usize, usize) {
        match self.stream {
            StreamKind::Dashboard => (self.sockets, 0),
            StreamKind::Notifications => (0, self.sockets),
            StreamKind::Mixed => (self.sockets - self.sockets / 2, self.sockets / 2),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.check() {
        eprintln!("pgrelay-bench: error: {e}");
        return ExitCode::from(2);
    }
    // 10,000 sockets need more than the usual 1024 descriptors. A child
    // pgrelay inherits the raised limit.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if (nofile as usize) < args.sockets + 256 {
        eprintln!(
            "pgrelay-bench: warning: open-file limit is {nofile}, below {} sockets; raise the hard limit (ulimit -Hn)",
            args.sockets
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pgrelay-bench: error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        let mut server = match Server::start(&args).await {
            Ok(server) => server,
            Err(e) => {
                eprintln!("pgrelay-bench: error: {e}");
                return ExitCode::from(2);
            }
        };
        if matches!(
            args.scenario,
            Scenario::SparseResume | Scenario::ResumeStorm
        ) {
            let outcome = tokio::select! {
                outcome = resume::run(&args, &mut server) => outcome,
                _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
            };
            server.stop().await;
            return match outcome {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("pgrelay-bench: error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        let scenario = async {
            match args.scenario {
                Scenario::Load => bench(&args, &server)
                    .await
                    .map(|r| Done::Deliveries(Box::new(r))),
                Scenario::HandshakeStorm => storm(&args, &server).await.map(Done::Storm),
                Scenario::SparseResume | Scenario::ResumeStorm => {
                    Err("dispatched above".to_owned())
                }
            }
        };
        let outcome = tokio::select! {
            outcome = scenario => outcome,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
        };
        let shutdown = server.stop().await;
        match outcome {
            Ok(Done::Storm(report)) => conclude(
                &args,
                report.json(&args),
                report.table(&args),
                report.passed(),
            ),
            Ok(Done::Deliveries(mut report)) => {
                report.pgrelay_shutdown = shutdown;
                conclude(
                    &args,
                    report.json(&args),
                    report.table(&args),
                    report.passed(),
                )
            }
            Err(e) => {
                eprintln!("pgrelay-bench: error: {e}");
                ExitCode::from(2)
            }
        }
    })
}

/// Prints a scenario's report (JSON with --json, else the table); exit 0 when
/// it passed, 1 when it did not.
fn conclude(args: &Args, json: String, table: String, passed: bool) -> ExitCode {
    if args.json {
        println!("{json}");
    } else {
        print!("{table}");
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// What a scenario measured.
enum Done {
    Deliveries(Box<Report>),
    Storm(StormReport),
}

// ---------------------------------------------------------------------------
// The pgrelay under test: our own (throwaway cluster + child process) or a
// running one.

struct Server {
    addr: SocketAddr,
    /// `Host` header value.
    host: String,
    database: tokio_postgres::Config,
    secret: String,
    pid: Option<u32>,
    child: Option<tokio::process::Child>,
    cluster: Option<Cluster>,
    description: String,
    /// How our child was started, to start it again (none for a target).
    serve: Option<Serve>,
}

/// `pgrelay serve` as the bench runs it.
struct Serve {
    bin: PathBuf,
    url: String,
    secret: String,
    extra: Vec<String>,
    /// `PGRELAY_MAX_PENDING_PER_IP` unless the caller set it.
    pending_per_ip: usize,
}

impl Serve {
    /// Starts `pgrelay serve` on `addr` and waits until it is ready (/readyz).
    async fn spawn(&self, addr: SocketAddr) -> Result<tokio::process::Child, String> {
        let mut command = tokio::process::Command::new(&self.bin);
        command
            .arg("serve")
            .arg("--database-url")
            .arg(&self.url)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--jwt-secret")
            .arg(&self.secret)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "pgrelay=warn");
        }
        // Every client here comes from 127.0.0.1 but stands for a host of its
        // own: lift the per-address cap on pending handshakes (default 64) to
        // the total cap's default, unless the caller set it. The variable,
        // not the flag, so that a pgrelay from before the cap still starts.
        if std::env::var_os("PGRELAY_MAX_PENDING_PER_IP").is_none() {
            command.env(
                "PGRELAY_MAX_PENDING_PER_IP",
                self.pending_per_ip.to_string(),
            );
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("pgrelay serve exited at start ({status})"));
            }
            if let Ok((200, _)) = http_get(addr, "/readyz").await {
                return Ok(child);
            }
            if Instant::now() > deadline {
                return Err("pgrelay serve was not ready (/readyz) within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How the child pgrelay ended: (exit code, seconds from SIGTERM to exit).
type Shutdown = Option<(Option<i32>, f64)>;

impl Server {
    async fn start(args: &Args) -> Result<Server, String> {
        let (_, notification_sockets) = args.split();
        let users = notification_sockets.max(1);
        match &args.url {
            Some(url) => {
                let parsed = url::Url::parse(url).map_err(|e| format!("--url {url:?}: {e}"))?;
                let host = parsed.host_str().ok_or("--url has no host")?.to_owned();
                let port = parsed.port_or_known_default().unwrap_or(80);
                let addr = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| format!("--url {url:?}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("--url {url:?}: no address"))?;
                let database: tokio_postgres::Config = args
                    .database_url
                    .as_deref()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| format!("--database-url: {e}"))?;
                seed_users(&database, users).await?;
                Ok(Server {
                    addr,
                    host: format!("{host}:{port}"),
                    database,
                    secret: args.jwt_secret.clone().unwrap_or_default(),
                    pid: args.pid,
                    child: None,
                    cluster: None,
                    description: format!("running pgrelay at {url}"),
                    serve: None,
                })
            }
            None => Server::own(args, users).await,
        }
    }

    async fn own(args: &Args, users: usize) -> Result<Server, String> {
        let bin = match &args.pgrelay_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .map_err(|e| format!("cannot find this executable: {e}"))?
                .with_file_name("pgrelay"),
        };
        if !bin.is_file() {
            return Err(format!(
                "{} not found: build it (cargo build --release --bins) or pass --pgrelay-bin",
                bin.display()
            ));
        }
        eprintln!("starting a throwaway PostgreSQL...");
        let cluster = Cluster::start()
            .await
            .map_err(|e| format!("throwaway PostgreSQL: {e}"))?;
        let url = cluster.url("postgres");
        let database: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        pgrelay::install::install(&InstallConfig {
            demo: true,
            ..InstallConfig::new(url.parse().map_err(|e| format!("{e}"))?)
        })
        .await
        .map_err(|e| e.to_string())?;
        seed_users(&database, users).await?;

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot pick a port: {e}"))?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let secret = format!("bench-{:x}", random_u64());
        let serve = Serve {
            bin,
            url,
            secret,
            extra: args.server_args.clone(),
            pending_per_ip: args.connect_concurrency.max(1024),
        };
        let child = serve.spawn(addr).await?;
        let pid = child.id();
        Ok(Server {
            addr,
            host: addr.to_string(),
            database,
            secret: serve.secret.clone(),
            pid,
            child: Some(child),
            description: format!(
                "own pgrelay (pid {}, {}) on {addr}, throwaway PostgreSQL on port {}",
                pid.unwrap_or(0),
                serve.bin.display(),
                cluster.port()
            ),
            cluster: Some(cluster),
            serve: Some(serve),
        })
    }

    /// SIGTERM to our child pgrelay (bounded wait, then SIGKILL), then the
    /// throwaway cluster. Nothing for a running target.
    async fn stop(&mut self) -> Shutdown {
        let shutdown = self.stop_child().await;
        if let Some(cluster) = self.cluster.take() {
            if let Err(e) = cluster.stop().await {
                eprintln!("stopping the throwaway PostgreSQL: {e}");
            }
        }
        shutdown
    }

    /// SIGTERM to our child pgrelay (bounded wait, then SIGKILL).
    async fn stop_child(&mut self) -> Shutdown {
        let mut shutdown = None;
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let began = Instant::now();
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
                match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                    Ok(Ok(status)) => {
                        shutdown = Some((status.code(), began.elapsed().as_secs_f64()));
                    }
                    _ => {
                        eprintln!("pgrelay did not exit within 10 s of SIGTERM: killing it");
                        let _ = child.kill().await;
                    }
                }
            }
        }
        shutdown
    }

    /// Starts our child pgrelay again, on the same port, after [`Self::stop_child`].
    async fn start_child(&mut self) -> Result<(), String> {
        let serve = self
            .serve
            .as_ref()
            .ok_or("not our pgrelay: cannot restart it")?;
        let child = serve.spawn(self.addr).await?;
        self.pid = child.id();
        self.child = Some(child);
        Ok(())
    }
}

impl Server {
    /// CPU seconds of our throwaway PostgreSQL so far (none for a target).
    fn postgres_cpu_s(&self) -> Option<f64> {
        self.cluster
            .as_ref()
            .and_then(|c| postgres_cpu_s(c.data_dir()))
    }
}

/// Users 1..=n exist (businesses.owner_id references them).
async fn seed_users(database: &tokio_postgres::Config, n: usize) -> Result<(), String> {
    let client = connect_db(database).await?;
    client
        .execute(
            "INSERT INTO users (id, email, role) \
             SELECT g, 'bench-' || g || '@pgrelay.invalid', 'customer' \
             FROM generate_series(1, $1::bigint) g ON CONFLICT DO NOTHING",
            &[&(n as i64)],
        )
        .await
        .map_err(|e| format!("seeding users (is the demo schema installed?): {e}"))?;
    client
        .batch_execute(
            "SELECT setval(pg_get_serial_sequence('users', 'id'), \
             greatest((SELECT max(id) FROM users), 1))",
        )
        .await
        .map_err(|e| format!("seeding users: {e}"))?;
    Ok(())
}

async fn connect_db(database: &tokio_postgres::Config) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = database.connect(NoTls).await.map_err(|e| {
        format!(
            "cannot connect to the database: {}",
            pgrelay::db::db_message(&e)
        )
    })?;
    tokio::spawn(connection);
    Ok(client)
}

/// A minimal HTTP/1.1 GET: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut response))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read timed out"))??;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn random_u64() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    splitmix(t ^ u64::from(std::process::id()).rotate_left(32))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

// ---------------------------------------------------------------------------
// Per-thread counters: each worker thread counts deliveries and records
// latencies in its own histogram (an uncontended lock), merged on demand.

/// Latencies are recorded in microseconds, up to a minute, 3 significant digits.
const LATENCY_MAX_US: u64 = 60_000_000;

struct ThreadStats {
    delivered: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

static REGISTRY: Mutex<Vec<Arc<ThreadStats>>> = Mutex::new(Vec::new());

thread_local! {
    static LOCAL: Arc<ThreadStats> = {
        let stats = Arc::new(ThreadStats {
            delivered: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
        });
        lock(&REGISTRY).push(Arc::clone(&stats));
        stats
    };
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).unwrap_or_else(|_| unreachable!())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn delivered_total() -> u64 {
    lock(&REGISTRY)
        .iter()
        .map(|s| s.delivered.load(Relaxed))
        .sum()
}

fn latency_merged() -> Histogram<u64> {
    let mut merged = new_histogram();
    for stats in lock(&REGISTRY).iter() {
        let _ = merged.add(&*lock(&stats.latency));
    }
    merged
}

// ---------------------------------------------------------------------------
// Clients

/// Every event frame starts with this (parse.rs serialises `type` then `id`).
const EVENT_PREFIX: &[u8] = br#"{"type":"event","id":"#;
const AT_KEY: &[u8] = br#""at":""#;

/// What every client shares.
struct Ctx {
    addr: SocketAddr,
    host: String,
    ws_config: WebSocketConfig,
    connect_gate: Semaphore,
    stop: CancellationToken,
    connected: AtomicUsize,
    failed: AtomicUsize,
    first_errors: Mutex<Vec<String>>,
    /// (dashboard, user, hello.last_id) of every connected client, for the
    /// drain target.
    hellos: Mutex<Vec<(bool, String, i64)>>,
    /// Events whose `at` is in [from, to) (µs since the Unix epoch) go into
    /// the latency histogram.
    window_from_us: AtomicI64,
    window_to_us: AtomicI64,
}

struct ClientSpec {
    dashboard: bool,
    user: String,
    token: String,
}

impl ClientSpec {
    fn path(&self) -> &'static str {
        if self.dashboard {
            "/ws/dashboard/"
        } else {
            "/ws/notifications/"
        }
    }
}

type Ws = WebSocketStream<TcpStream>;

/// One client's account of the run.
#[derive(Default)]
struct ClientReport {
    dashboard: bool,
    user: String,
    connected: bool,
    error: Option<String>,
    /// `hello.last_id` of the first connection: everything routed to this
    /// client above it must arrive.
    hello_last_id: i64,
    /// Ids received, strictly increasing, as inclusive ranges.
    ranges: Vec<(i64, i64)>,
    received: u64,
    /// Frames whose id was not above the previous one.
    duplicates: u64,
    resets: u64,
    reconnects: u64,
    /// Close codes the server sent before the end of the run.
    closes: Vec<u16>,
}

impl ClientReport {
    fn on_text(&mut self, frame: &[u8], ctx: &Ctx) {
        let Some(rest) = frame.strip_prefix(EVENT_PREFIX) else {
            if frame.starts_with(br#"{"type":"reset""#) {
                self.resets += 1;
            }
            return;
        };
        let Some((id, rest)) = parse_int(rest) else {
            return;
        };
        if id <= self.ranges.last().map_or(self.hello_last_id, |r| r.1) {
            self.duplicates += 1;
            return;
        }
        match self.ranges.last_mut() {
            Some(last) if last.1 + 1 == id => last.1 = id,
            _ => self.ranges.push((id, id)),
        }
        self.received += 1;
        let at = find(rest, AT_KEY).and_then(|i| parse_at_us(&rest[i + AT_KEY.len()..]));
        LOCAL.with(|stats| {
            stats.delivered.fetch_add(1, Relaxed);
            if let Some(at) = at {
                if at >= ctx.window_from_us.load(Relaxed) && at < ctx.window_to_us.load(Relaxed) {
                    let latency = (now_us() - at).max(1) as u64;
                    lock(&stats.latency).saturating_record(latency.min(LATENCY_MAX_US));
                }
            }
        });
    }

    fn last_id(&self) -> i64 {
        self.ranges.last().map_or(self.hello_last_id, |r| r.1)
    }
}

enum Outcome {
    Stop,
    Closed(Option<u16>),
    Failed(String),
}

/// Waits until every client has connected or failed (the clients' own
/// handshakes are bounded); any failure stops the run, naming the first
/// errors. Returns the seconds it took, and the clients' tasks.
async fn all_connected<T>(
    ctx: &Ctx,
    handles: Vec<tokio::task::JoinHandle<T>>,
    sockets: usize,
    began: Instant,
) -> Result<(f64, Vec<tokio::task::JoinHandle<T>>), String> {
    while ctx.connected.load(Relaxed) + ctx.failed.load(Relaxed) < sockets {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = began.elapsed().as_secs_f64();
    if ctx.failed.load(Relaxed) > 0 {
        ctx.stop.cancel();
        for handle in handles {
            let _ = handle.await;
        }
        return Err(format!(
            "{} of {} sockets failed to connect; first errors: {}",
            ctx.failed.load(Relaxed),
            sockets,
            lock(&ctx.first_errors).join("; ")
        ));
    }
    Ok((took, handles))
}

/// A client's first handshake, through the connect gate, retried a few
/// times when the connection itself fails (a full backlog), never when it is
/// refused; a failure is counted and its text kept (the first five).
async fn first_connect(ctx: &Ctx, spec: &ClientSpec) -> Result<(Ws, Hello), String> {
    let _permit = ctx.connect_gate.acquire().await;
    let mut attempt = 0;
    let first = loop {
        attempt += 1;
        // Boxed: the handshake's state would otherwise sit in every
        // client's task for the whole run.
        match Box::pin(connect(ctx, spec, None)).await {
            Ok(ok) => break Ok(ok),
            // Refusals are final; a connect error may be a full backlog.
            Err(e) if attempt < 5 && !e.starts_with("HTTP") => {
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = &first {
        let mut errors = lock(&ctx.first_errors);
        if errors.len() < 5 {
            errors.push(e.clone());
        }
        drop(errors);
        ctx.failed.fetch_add(1, Relaxed);
    }
    first
}

async fn client(spec: ClientSpec, ctx: Arc<Ctx>) -> ClientReport {
    let mut report = ClientReport {
        dashboard: spec.dashboard,
        user: spec.user.clone(),
        ..ClientReport::default()
    };
    let (mut ws, hello) = match first_connect(&ctx, &spec).await {
        Ok(ok) => ok,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    report.connected = true;
    report.hello_last_id = hello.last_id;
    let epoch = hello.epoch;
    lock(&ctx.hellos).push((spec.dashboard, spec.user.clone(), hello.last_id));
    ctx.connected.fetch_add(1, Relaxed);

    loop {
        let outcome = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => Outcome::Stop,
            outcome = read_loop(&mut ws, |text| report.on_text(text, &ctx)) => outcome,
        };
        match outcome {
            Outcome::Stop => {
                let close = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "bench done".into(),
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = ws.close(Some(close)).await;
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                return report;
            }
            Outcome::Closed(_) | Outcome::Failed(_) if ctx.stop.is_cancelled() => return report,
            Outcome::Closed(code) => report.closes.push(code.unwrap_or(1005)),
            Outcome::Failed(e) => {
                report.closes.push(1006);
                report.error.get_or_insert(e);
            }
        }
        // The server closed us (4008 too slow, say): resume losslessly from
        // the last id, as a real client would.
        let mut attempt = 0u64;
        ws = loop {
            attempt += 1;
            let resumed = {
                let _permit = ctx.connect_gate.acquire().await;
                Box::pin(connect(&ctx, &spec, Some((report.last_id(), &epoch)))).await
            };
            match resumed {
                Ok((ws, _hello)) => break ws,
                Err(e) if attempt < 20 && !ctx.stop.is_cancelled() => {
                    report.error.get_or_insert(e);
                    tokio::time::sleep(Duration::from_millis(100 * attempt.min(10))).await;
                }
                Err(e) => {
                    report.error = Some(format!("could not resume: {e}"));
                    return report;
                }
            }
        };
        report.reconnects += 1;
    }
}

/// Reads frames until the socket ends, handing each text frame to `on_text`
/// and answering pings.
async fn read_loop(ws: &mut Ws, mut on_text: impl FnMut(&[u8])) -> Outcome {
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => on_text(text.as_bytes()),
            // tungstenite queued the pong: send it.
            Ok(Message::Ping(_)) => {
                if let Err(e) = ws.flush().await {
                    return Outcome::Failed(e.to_string());
                }
            }
            Ok(Message::Close(frame)) => return Outcome::Closed(frame.map(|f| u16::from(f.code))),
            Ok(_) => {}
            Err(e) => return Outcome::Failed(e.to_string()),
        }
    }
    Outcome::Failed("connection closed without a close frame".into())
}

#[derive(serde::Deserialize)]
struct Hello {
    #[serde(rename = "type")]
    kind: String,
    last_id: i64,
    epoch: String,
}

/// TCP connect, the HTTP upgrade by hand (the token in `Authorization`), and
/// the `hello` frame.
async fn connect(
    ctx: &Ctx,
    spec: &ClientSpec,
    resume: Option<(i64, &str)>,
) -> Result<(Ws, Hello), String> {
    let handshake = async {
        let mut stream = TcpStream::connect(ctx.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", ctx.addr))?;
        let _ = stream.set_nodelay(true);
        let key = generate_key();
        let path = match resume {
            None => spec.path().to_owned(),
            Some((last_id, epoch)) => format!("{}?last_id={last_id}&epoch={epoch}", spec.path()),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n",
            host = ctx.host,
            token = spec.token,
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("sending the upgrade request: {e}"))?;
        let mut buf = Vec::with_capacity(512);
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return Err("upgrade response headers over 16 KiB".to_owned());
            }
            let mut chunk = [0u8; 1024];
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the upgrade response: {e}"))?;
            if n == 0 {
                return Err("connection closed during the upgrade".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head.split(' ').nth(1).unwrap_or("?");
        if status != "101" {
            let body = String::from_utf8_lossy(&buf[end..]);
            return Err(format!("HTTP {status}: {}", body.trim()));
        }
        let accept = derive_accept_key(key.as_bytes());
        let accepted = head.lines().any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == accept
            })
        });
        if !accepted {
            return Err("upgrade response lacks the right Sec-WebSocket-Accept".to_owned());
        }
        let rest = buf[end..].to_vec();
        let mut ws =
            WebSocketStream::from_partially_read(stream, rest, Role::Client, Some(ctx.ws_config))
                .await;
        let hello = loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let hello: Hello = serde_json::from_str(&text)
                        .map_err(|e| format!("first frame is not hello: {e}: {text}"))?;
                    if hello.kind != "hello" {
                        return Err(format!("first frame is not hello: {text}"));
                    }
                    break hello;
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("closed before hello: {frame:?}"));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("reading hello: {e}")),
                None => return Err("closed before hello".to_owned()),
            }
        };
        Ok((ws, hello))
    };
    tokio::time::timeout(Duration::from_secs(15), handshake)
        .await
        .map_err(|_| "handshake timed out after 15 s".to_owned())?
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A decimal integer at the start of `b`, and what follows it.
fn parse_int(b: &[u8]) -> Option<(i64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 18 {
        return None;
    }
    let mut n = 0i64;
    for &c in &b[..digits] {
        n = n * 10 + i64::from(c - b'0');
    }
    Some((n, &b[digits..]))
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (pgrelay.format_at) -> µs since the Unix epoch.
fn parse_at_us(b: &[u8]) -> Option<i64> {
    if b.len() < 27
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[26] != b'Z'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = &b[range];
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |n, &c| n * 10 + i64::from(c - b'0')))
    };
    let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let seconds = days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?;
    Some(seconds * 1_000_000 + num(20..26)?)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64
}

// ---------------------------------------------------------------------------
// Writers: real transactions, one row each, on several connections, paced to
// an absolute schedule (row k at start + k/R), so a stall is caught up
// afterwards rather than lowering the rate.

struct WriterCounts {
    inserted: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// When the rows go in: row k at `start + k/rate`, on writer `k % writers`,
/// owned by user `k % owners + 1`, until `end`.
#[derive(Clone, Copy)]
struct Schedule {
    writers: usize,
    rate: u32,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
    owners: u64,
}

async fn writer(
    client: tokio_postgres::Client,
    index: usize,
    schedule: Schedule,
    counts: Arc<WriterCounts>,
) {
    let Schedule {
        writers,
        rate,
        start,
        end,
        owners,
    } = schedule;
    let statement = match client
        .prepare("INSERT INTO businesses (owner_id, name) VALUES ($1, 'bench business')")
        .await
    {
        Ok(statement) => statement,
        Err(e) => {
            counts.errors.fetch_add(1, Relaxed);
            lock(&counts.first_error).get_or_insert(pgrelay::db::db_message(&e));
            return;
        }
    };
    let mut k = index as u64;
    loop {
        let due = start + Duration::from_secs_f64(k as f64 / f64::from(rate));
        if due >= end {
            return;
        }
        tokio::time::sleep_until(due).await;
        let owner = (k % owners + 1) as i64;
        match client.execute(&statement, &[&owner]).await {
            Ok(_) => {
                counts.inserted.fetch_add(1, Relaxed);
            }
            Err(e) => {
                counts.errors.fetch_add(1, Relaxed);
                lock(&counts.first_error).get_or_insert(pgrelay::db::db_message(&e));
            }
        }
        k += writers as u64;
    }
}

// ---------------------------------------------------------------------------
// /proc readings

#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    /// utime + stime, seconds.
    cpu_s: f64,
    rss_kib: u64,
    hwm_kib: u64,
}

/// Linux reports /proc times in USER_HZ, which is 100 on every architecture.
const USER_HZ: f64 = 100.0;

fn proc_sample(pid: Option<u32>) -> Option<ProcSample> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".to_owned(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_s: (utime + stime) / USER_HZ,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// CPU seconds of a PostgreSQL server: the postmaster (first line of
/// `postmaster.pid`) and its children (backends, walwriter, ...).
fn postgres_cpu_s(data_dir: &std::path::Path) -> Option<f64> {
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid: u32 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if pid == postmaster || ppid == postmaster {
            let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            total += (utime + stime) / USER_HZ;
        }
    }
    Some(total)
}

/// Busy CPU seconds of the whole machine, all cores (from /proc/stat).
fn machine_busy_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let busy: f64 =
        v.iter().take(8).sum::<f64>() - v.get(3).unwrap_or(&0.0) - v.get(4).unwrap_or(&0.0);
    busy / USER_HZ
}

// ---------------------------------------------------------------------------
// The run

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
    pid: Option<u32>,
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
                    format!(
                        "p50 {} p99 {} max {}",
                        ms(h.value_at_quantile(0.5)),
                        ms(h.value_at_quantile(0.99)),
                        ms(h.max())
                    )
                };
                format!(
                    "inserts {:>5}/s  deliveries {:>8}/s  latency {lat}",
                    inserted - last_inserted,
                    delivered - last_delivered,
                )
            }
        };
        eprintln!(
            "[{:>6.1}s] {:<8} {line}  pgrelay rss {} cpu {cpu}",
            progress.started.elapsed().as_secs_f64(),
            format!("{phase:?}").to_lowercase(),
            sample.map_or("-".into(), |s| format!(
                "{:.1} MiB",
                s.rss_kib as f64 / 1024.0
            )),
        );
        last_delivered = delivered;
        last_inserted = inserted;
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

/// Dashboard clients (super admins 1,000,001, 1,000,002, ...), then
/// notification clients (users 1, 2, ...), each with its own token.
fn client_specs(
    secret: &str,
    dashboards: usize,
    notifications: usize,
) -> Result<Vec<ClientSpec>, String> {
    let ttl = Duration::from_secs(24 * 3600);
    let mut specs = Vec::with_capacity(dashboards + notifications);
    for i in 0..dashboards {
        let user = (1_000_001 + i).to_string();
        let token = pgrelay::auth::mint(secret, &user, Some("super_admin"), ttl)
            .map_err(|e| e.to_string())?;
        specs.push(ClientSpec {
            dashboard: true,
            user,
            token,
        });
    }
    for i in 0..notifications {
        let user = (1 + i).to_string();
        let token = pgrelay::auth::mint(secret, &user, None, ttl).map_err(|e| e.to_string())?;
        specs.push(ClientSpec {
            dashboard: false,
            user,
            token,
        });
    }
    Ok(specs)
}

impl Ctx {
    fn new(server: &Server, connect_concurrency: usize, sockets: usize) -> Ctx {
        Ctx {
            addr: server.addr,
            host: server.host.clone(),
            // Small buffers: 10,000 sockets must fit in the bench comfortably.
            ws_config: WebSocketConfig::default()
                .read_buffer_size(4 * 1024)
                .write_buffer_size(0)
                .max_message_size(Some(1 << 20))
                .max_frame_size(Some(1 << 20)),
            connect_gate: Semaphore::new(connect_concurrency),
            stop: CancellationToken::new(),
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            first_errors: Mutex::new(Vec::new()),
            hellos: Mutex::new(Vec::with_capacity(sockets)),
            window_from_us: AtomicI64::new(i64::MAX),
            window_to_us: AtomicI64::new(i64::MAX),
        }
    }
}

async fn bench(args: &Args, server: &Server) -> Result<Report, String> {
    let (dashboards, notifications) = args.split();
    let owners = notifications.max(1) as u64;
    let specs = client_specs(&server.secret, dashboards, notifications)?;
    let ctx = Arc::new(Ctx::new(server, args.connect_concurrency, args.sockets));
    let counts = Arc::new(WriterCounts {
        inserted: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let progress = Arc::new(Progress {
        phase: Mutex::new(Phase::Connect),
        started: Instant::now(),
    });
    let progress_task = tokio::spawn(progress_loop(
        Arc::clone(&progress),
        Arc::clone(&ctx),
        Arc::clone(&counts),
        server.pid,
        args.sockets,
    ));
    // Stop the progress line whatever happens below.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _progress_guard = AbortOnDrop(progress_task);

    let rss_before_connect = proc_sample(server.pid);
    let connect_began = Instant::now();
    let handles: Vec<_> = specs
        .into_iter()
        .map(|spec| tokio::spawn(client(spec, Arc::clone(&ctx))))
        .collect();
    let (connect_s, handles) = all_connected(&ctx, handles, args.sockets, connect_began).await?;
    // Let the last handshakes' allocations settle before reading RSS.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_connected = proc_sample(server.pid);

    // Writers: connect first, then start the clock.
    let mut clients = Vec::with_capacity(args.writers);
    for _ in 0..args.writers {
        clients.push(connect_db(&server.database).await?);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let schedule = Schedule {
        writers: args.writers,
        rate: args.rate,
        start,
        end,
        owners,
    };
    let writer_tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| tokio::spawn(writer(client, i, schedule, Arc::clone(&counts))))
        .collect();
    *lock(&progress.phase) = Phase::Warmup;

    tokio::time::sleep_until(measure_from).await;
    ctx.window_from_us.store(now_us(), Relaxed);
    *lock(&progress.phase) = Phase::Measure;
    let window_began = Instant::now();
    let delivered_at_start = delivered_total();
    let inserted_at_start = counts.inserted.load(Relaxed);
    let pgrelay_at_start = proc_sample(server.pid);
    let bench_at_start = proc_sample(None);
    let machine_at_start = machine_busy_s();
    let postgres_at_start = server.postgres_cpu_s();

    tokio::time::sleep_until(end).await;
    ctx.window_to_us.store(now_us(), Relaxed);
    let window_s = window_began.elapsed().as_secs_f64();
    let delivered_in_window = delivered_total() - delivered_at_start;
    let pgrelay_at_end = proc_sample(server.pid);
    let bench_at_end = proc_sample(None);
    let machine_at_end = machine_busy_s();
    let postgres_at_end = server.postgres_cpu_s();
    *lock(&progress.phase) = Phase::Drain;
    for task in writer_tasks {
        let _ = task.await;
    }
    let inserted_in_window = counts.inserted.load(Relaxed) - inserted_at_start;

    // What each client should have got: the log, routed with the default routes.
    let db = connect_db(&server.database).await?;
    let end_id: i64 = db
        .query_one("SELECT coalesce(max(id), 0) FROM pgrelay.events", &[])
        .await
        .map_err(|e| format!("reading pgrelay.events: {e}"))?
        .get(0);
    let hellos = lock(&ctx.hellos).clone();
    let min_hello = hellos.iter().map(|h| h.2).min().unwrap_or(end_id);
    let expected = Expected::load(&db, min_hello, end_id).await?;

    // Drain: wait (bounded) until every expected delivery has arrived.
    let drain_began = Instant::now();
    let expected_total = expected.total(&hellos);
    let mut last = (delivered_total(), Instant::now());
    loop {
        let delivered = delivered_total();
        if delivered >= expected_total {
            break;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        }
        if drain_began.elapsed() > args.drain_timeout || last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_s = drain_began.elapsed().as_secs_f64();
    let drain_cut = delivered_total() < expected_total && last.1.elapsed() < Duration::from_secs(5);
    let pgrelay_final = proc_sample(server.pid);

    ctx.stop.cancel();
    let mut reports = Vec::with_capacity(handles.len());
    for handle in handles {
        match tokio::time::timeout(Duration::from_secs(30), handle).await {
            Ok(Ok(report)) => reports.push(report),
            _ => return Err("a client did not finish within 30 s of the end".into()),
        }
    }

    let mut report = Report {
        description: server.description.clone(),
        dashboards,
        notifications,
        connect_s,
        window_s,
        inserted_in_window,
        insert_errors: counts.errors.load(Relaxed),
        insert_first_error: lock(&counts.first_error).clone(),
        deliveries_in_window: delivered_in_window,
        latency: latency_merged(),
        expected_total,
        drain_s,
        drain_cut,
        end_id,
        ..Report::default()
    };
    for r in &reports {
        let want = expected.for_client(r);
        let (matched, unexpected) = compare(want, &r.ranges, end_id);
        report.received_total += r.received;
        report.lost += want.len() as u64 - matched;
        report.unexpected += unexpected;
        report.duplicates += r.duplicates;
        report.resets += r.resets;
        report.reconnects += r.reconnects;
        for &code in &r.closes {
            *report.closes.entry(code).or_default() += 1;
        }
        if let Some(e) = &r.error {
            report.client_errors += 1;
            report.first_client_error.get_or_insert_with(|| e.clone());
        }
    }
    report.pgrelay = match (pgrelay_at_start, pgrelay_at_end, pgrelay_final) {
        (Some(a), Some(b), Some(f)) => Some(ProcReport {
            cpu_s: b.cpu_s - a.cpu_s,
            cpu_total_s: f.cpu_s,
            hwm_kib: f.hwm_kib,
            rss_end_kib: f.rss_kib,
            rss_before_connect_kib: rss_before_connect.map_or(0, |s| s.rss_kib),
            rss_connected_kib: rss_connected.map_or(0, |s| s.rss_kib),
        }),
        _ => None,
    };
    if let (Some(a), Some(b)) = (bench_at_start, bench_at_end) {
        report.bench_cpu_s = b.cpu_s - a.cpu_s;
        report.bench_hwm_kib = proc_sample(None).map_or(0, |s| s.hwm_kib);
    }
    report.machine_busy_s = machine_at_end - machine_at_start;
    if let (Some(a), Some(b)) = (postgres_at_start, postgres_at_end) {
        report.postgres_cpu_s = Some(b - a);
    }
    Ok(report)
}

/// The deliveries the log says should happen, routed with the default routes.
struct Expected {
    dashboard: Vec<i64>,
    users: HashMap<String, Vec<i64>>,
}

impl Expected {
    async fn load(db: &tokio_postgres::Client, after: i64, upto: i64) -> Result<Expected, String> {
        let rows = db
            .query(
                "SELECT id, channel, payload->>'owner_id', payload->>'business_owner_id', \
                        payload->>'customer_id' \
                 FROM pgrelay.events WHERE id > $1 AND id <= $2 ORDER BY id",
                &[&after.min(upto), &upto],
            )
            .await
            .map_err(|e| format!("reading pgrelay.events: {e}"))?;
        let mut expected = Expected {
            dashboard: Vec::with_capacity(rows.len()),
            users: HashMap::new(),
        };
        for row in rows {
            let id: i64 = row.get(0);
            let channel: &str = row.get(1);
            let fields: &[usize] = match channel {
                "business_events" => &[2],
                "reservation_events" => &[3, 4],
                _ => continue,
            };
            expected.dashboard.push(id);
            let mut seen: Vec<String> = Vec::new();
            for &field in fields {
                if let Some(user) = row.get::<_, Option<String>>(field) {
                    if !seen.contains(&user) {
                        expected.users.entry(user.clone()).or_default().push(id);
                        seen.push(user);
                    }
                }
            }
        }
        Ok(expected)
    }

    fn ids(&self, dashboard: bool, user: &str) -> &[i64] {
        if dashboard {
            &self.dashboard
        } else {
            self.users.get(user).map_or(&[], Vec::as_slice)
        }
    }

    /// The ids a client should get: routed to it and above its `hello`.
    fn slice(&self, dashboard: bool, user: &str, hello: i64) -> &[i64] {
        let ids = self.ids(dashboard, user);
        &ids[ids.partition_point(|&id| id <= hello)..]
    }

    fn for_client(&self, r: &ClientReport) -> &[i64] {
        if !r.connected {
            return &[];
        }
        self.slice(r.dashboard, &r.user, r.hello_last_id)
    }

    fn total(&self, clients: &[(bool, String, i64)]) -> u64 {
        clients
            .iter()
            .map(|(dashboard, user, hello)| self.slice(*dashboard, user, *hello).len() as u64)
            .sum()
    }
}

/// (expected ids found in `ranges`, ids in `ranges` up to `end` that were
/// not expected).
fn compare(expected: &[i64], ranges: &[(i64, i64)], end: i64) -> (u64, u64) {
    let mut matched = 0u64;
    let mut received = 0u64;
    let mut e = 0;
    for &(lo, hi) in ranges {
        let hi = hi.min(end);
        if lo > hi {
            continue;
        }
        received += (hi - lo + 1) as u64;
        while e < expected.len() && expected[e] < lo {
            e += 1;
        }
        while e < expected.len() && expected[e] <= hi {
            matched += 1;
            e += 1;
        }
    }
    (matched, received - matched)
}

// ---------------------------------------------------------------------------
// Report

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

struct Report {
    description: String,
    dashboards: usize,
    notifications: usize,
    connect_s: f64,
    window_s: f64,
    inserted_in_window: u64,
    insert_errors: u64,
    insert_first_error: Option<String>,
    deliveries_in_window: u64,
    latency: Histogram<u64>,
    expected_total: u64,
    received_total: u64,
    drain_s: f64,
    /// The drain hit --drain-timeout while deliveries were still arriving.
    drain_cut: bool,
    end_id: i64,
    lost: u64,
    duplicates: u64,
    unexpected: u64,
    resets: u64,
    reconnects: u64,
    closes: std::collections::BTreeMap<u16, u64>,
    client_errors: u64,
    first_client_error: Option<String>,
    pgrelay: Option<ProcReport>,
    pgrelay_shutdown: Shutdown,
    bench_cpu_s: f64,
    bench_hwm_kib: u64,
    machine_busy_s: f64,
    /// Our throwaway PostgreSQL's CPU seconds in the window.
    postgres_cpu_s: Option<f64>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            description: String::new(),
            dashboards: 0,
            notifications: 0,
            connect_s: 0.0,
            window_s: 0.0,
            inserted_in_window: 0,
            insert_errors: 0,
            insert_first_error: None,
            deliveries_in_window: 0,
            latency: new_histogram(),
            expected_total: 0,
            received_total: 0,
            drain_s: 0.0,
            drain_cut: false,
            end_id: 0,
            lost: 0,
            duplicates: 0,
            unexpected: 0,
            resets: 0,
            reconnects: 0,
            closes: Default::default(),
            client_errors: 0,
            first_client_error: None,
            pgrelay: None,
            pgrelay_shutdown: None,
            bench_cpu_s: 0.0,
            bench_hwm_kib: 0,
            machine_busy_s: 0.0,
            postgres_cpu_s: None,
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Report {
    fn passed(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.unexpected == 0 && self.insert_errors == 0
    }

    fn quantile_us(&self, q: f64) -> u64 {
        if self.latency.is_empty() {
            0
        } else {
            self.latency.value_at_quantile(q)
        }
    }

    fn table(&self, args: &Args) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let w = self.window_s.max(f64::EPSILON);
        let _ = writeln!(
            t,
            "pgrelay-bench: {} sockets ({} dashboard, {} notifications), {} rows/s for {} (warm-up {}), {} writer connections",
            args.sockets,
            self.dashboards,
            self.notifications,
            args.rate,
            humantime::format_duration(args.duration),
            humantime::format_duration(args.warmup),
            args.writers,
        );
        let _ = writeln!(t, "target: {}", self.description);
        let _ = writeln!(t);
        let row = |t: &mut String, k: &str, v: String| {
            let _ = writeln!(t, "  {k:<22} {v}");
        };
        row(
            &mut t,
            "sockets connected",
            format!("{} in {:.2} s", args.sockets, self.connect_s),
        );
        row(
            &mut t,
            "rows inserted",
            format!(
                "{} in {:.2} s = {:.1}/s ({} errors{})",
                self.inserted_in_window,
                w,
                self.inserted_in_window as f64 / w,
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
                "p50 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
                ms(self.quantile_us(0.5)),
                ms(self.quantile_us(0.99)),
                ms(self.quantile_us(0.999)),
                ms(self.latency.max()),
                self.latency.len()
            ),
        );
        row(
            &mut t,
            "",
            "(commit = the event's `at`: clock_timestamp() in the deferred capture trigger at commit)".into(),
        );
        row(
            &mut t,
            "lost",
            if self.drain_cut {
                format!(
                    "{} (not arrived when --drain-timeout ended the wait, deliveries still arriving: late, maybe not lost)",
                    self.lost
                )
            } else {
                self.lost.to_string()
            },
        );
        row(&mut t, "duplicated", self.duplicates.to_string());
        row(&mut t, "misrouted/unexpected", self.unexpected.to_string());
        row(
            &mut t,
            "whole-run check",
            format!(
                "{} of {} expected deliveries (events up to id {}), drained in {:.2} s",
                self.received_total, self.expected_total, self.end_id, self.drain_s
            ),
        );
        let closes: Vec<String> = self
            .closes
            .iter()
            .map(|(c, n)| format!("{c}x{n}"))
            .collect();
        row(
            &mut t,
            "server closes",
            format!(
                "{} (resumed {} times), resets {}, client errors {}{}",
                if closes.is_empty() {
                    "none".into()
                } else {
                    closes.join(" ")
                },
                self.reconnects,
                self.resets,
                self.client_errors,
                self.first_client_error
                    .as_deref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            ),
        );
        match &self.pgrelay {
            Some(p) => {
                row(
                    &mut t,
                    "pgrelay peak RSS",
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
                    "pgrelay CPU",
                    format!(
                        "{:.2} s in the window ({:.0}% of one core, {:.2} µs/delivery); {:.2} s since start",
                        p.cpu_s,
                        p.cpu_s / w * 100.0,
                        p.cpu_s * 1e6 / self.deliveries_in_window.max(1) as f64,
                        p.cpu_total_s
                    ),
                );
            }
            None => row(
                &mut t,
                "pgrelay",
                "no pid (pass --pid) for RSS and CPU".into(),
            ),
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
        let others = self.machine_busy_s
            - self.bench_cpu_s
            - self.pgrelay.map_or(0.0, |p| p.cpu_s)
            - self.postgres_cpu_s.unwrap_or(0.0);
        row(
            &mut t,
            "machine",
            format!(
                "{:.0}% busy of {}00% in the window; everything else (kernel threads, other processes) {:.0}%",
                self.machine_busy_s / w * 100.0,
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                others.max(0.0) / w * 100.0,
            ),
        );
        if let Some((code, secs)) = self.pgrelay_shutdown {
            row(
                &mut t,
                "pgrelay shutdown",
                format!(
                    "exit {} {:.2} s after SIGTERM",
                    code.map_or("signal".into(), |c| c.to_string()),
                    secs
                ),
            );
        }
        let _ = writeln!(
            t,
            "\n{}",
            if self.passed() {
                "PASS: 0 lost, 0 duplicated"
            } else {
                "FAIL: lost, duplicated or misrouted deliveries, or insert errors"
            }
        );
        t
    }

    fn json(&self, args: &Args) -> String {
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
        serde_json::json!({
            "sockets": args.sockets,
            "dashboard_sockets": self.dashboards,
            "notification_sockets": self.notifications,
            "stream": format!("{:?}", args.stream).to_lowercase(),
            "rate": args.rate,
            "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(),
            "writers": args.writers,
            "target": self.description,
            "connect_s": self.connect_s,
            "window_s": self.window_s,
            "inserted": self.inserted_in_window,
            "inserts_per_s": self.inserted_in_window as f64 / w,
            "insert_errors": self.insert_errors,
            "deliveries": self.deliveries_in_window,
            "deliveries_per_s": self.deliveries_in_window as f64 / w,
            "latency_us": {
                "commit": "event `at` = clock_timestamp() in the deferred capture trigger",
                "count": self.latency.len(),
                "p50": self.quantile_us(0.5),
                "p99": self.quantile_us(0.99),
                "p999": self.quantile_us(0.999),
                "max": self.latency.max(),
            },
            "lost": self.lost,
            "duplicated": self.duplicates,
            "unexpected": self.unexpected,
            "expected_total": self.expected_total,
            "received_total": self.received_total,
            "drain_s": self.drain_s,
            "drain_cut": self.drain_cut,
            "reconnects": self.reconnects,
            "resets": self.resets,
            "server_closes": self.closes.iter().map(|(c, n)| (c.to_string(), *n)).collect::<HashMap<_, _>>(),
            "client_errors": self.client_errors,
            "pgrelay": pgrelay,
            "pgrelay_shutdown_s": self.pgrelay_shutdown.map(|(_, s)| s),
            "bench_cpu_s": self.bench_cpu_s,
            "bench_peak_rss_kib": self.bench_hwm_kib,
            "machine_busy_s": self.machine_busy_s,
            "postgres_cpu_s": self.postgres_cpu_s,
            "passed": self.passed(),
        })
        .to_string()
    }
}

// ---------------------------------------------------------------------------
// handshake-storm

struct StormReport {
    description: String,
    /// Answers by HTTP status; 0: no answer (connect error, reset, timeout).
    statuses: std::collections::BTreeMap<u16, usize>,
    storm_s: f64,
    idle_kib: u64,
    peak_kib: u64,
    /// RSS 1, 5 and 10 s after the storm.
    after_kib: [u64; 3],
}

const STORM_AFTER_S: [u64; 3] = [1, 5, 10];

async fn storm(args: &Args, server: &Server) -> Result<StormReport, String> {
    let pid = server
        .pid
        .ok_or("handshake-storm reads pgrelay's RSS: pass --pid with --url")?;
    let rss = move || proc_sample(Some(pid)).map(|s| s.rss_kib).unwrap_or(0);
    // A well-formed token signed with another key: the full check runs.
    let token = pgrelay::auth::mint("not-the-relay's-key", "1", None, Duration::from_secs(3600))
        .map_err(|e| e.to_string())?;
    let request: Arc<str> = format!(
        "GET /ws/notifications/ HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        server.host,
        generate_key(),
    )
    .into();
    // Let start-up allocations settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kib = rss();
    let peak = Arc::new(AtomicU64::new(idle_kib));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                peak.fetch_max(rss(), Relaxed);
            }
        })
    };
    let began = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    let mut left = args.storm_handshakes;
    while left > 0 {
        let wave = left.min(args.storm_concurrency);
        left -= wave;
        // Every connection of a wave is open before any request is sent.
        let gate = Arc::new(tokio::sync::Barrier::new(wave));
        let tasks: Vec<_> = (0..wave)
            .map(|_| {
                let request = Arc::clone(&request);
                let gate = Arc::clone(&gate);
                let addr = server.addr;
                tokio::spawn(async move {
                    let attempt = async {
                        let stream = TcpStream::connect(addr).await;
                        gate.wait().await;
                        refused_status(stream?, &request).await
                    };
                    tokio::time::timeout(Duration::from_secs(30), attempt)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0)
                })
            })
            .collect();
        for task in tasks {
            *statuses.entry(task.await.unwrap_or(0)).or_insert(0) += 1;
        }
        eprintln!(
            "[{:>6.1}s] storm    {} of {} handshakes answered  pgrelay rss {:.1} MiB",
            began.elapsed().as_secs_f64(),
            args.storm_handshakes - left,
            args.storm_handshakes,
            mib(rss())
        );
    }
    let ended = Instant::now();
    sampler.abort();
    let mut after_kib = [0; 3];
    for (after, at) in after_kib.iter_mut().zip(STORM_AFTER_S) {
        tokio::time::sleep_until((ended + Duration::from_secs(at)).into()).await;
        *after = rss();
        eprintln!(
            "[{:>6.1}s] after    {at} s  pgrelay rss {:.1} MiB",
            began.elapsed().as_secs_f64(),
            mib(*after)
        );
    }
    Ok(StormReport {
        description: server.description.clone(),
        statuses,
        storm_s: ended.duration_since(began).as_secs_f64(),
        idle_kib,
        peak_kib: peak.load(Relaxed),
        after_kib,
    })
}

/// Sends `request` and reads the answer's status line; the connection is
/// dropped after it (a refused handshake's client has nothing more to say).
async fn refused_status(mut stream: TcpStream, request: &str) -> io::Result<u16> {
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while find(&head, b"\r\n").is_none() {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

impl StormReport {
    fn passed(&self) -> bool {
        self.after_kib[2] as f64 <= self.idle_kib as f64 * 1.2
    }

    fn table(&self, args: &Args) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "pgrelay-bench handshake-storm: {} handshakes with a bad token, {} at once",
            args.storm_handshakes, args.storm_concurrency
        );
        let _ = writeln!(t, "target: {}", self.description);
        let _ = writeln!(t);
        let answers: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| match status {
                0 => format!("{n} unanswered"),
                s => format!("{n} x {s}"),
            })
            .collect();
        let row = |t: &mut String, k: &str, v: String| {
            let _ = writeln!(t, "  {k:<22} {v}");
        };
        row(&mut t, "answers", answers.join(", "));
        row(&mut t, "storm took", format!("{:.1} s", self.storm_s));
        row(
            &mut t,
            "pgrelay RSS idle",
            format!("{:.1} MiB", mib(self.idle_kib)),
        );
        row(
            &mut t,
            "pgrelay RSS peak",
            format!("{:.1} MiB", mib(self.peak_kib)),
        );
        for (kib, at) in self.after_kib.iter().zip(STORM_AFTER_S) {
            row(
                &mut t,
                &format!("pgrelay RSS after {at} s"),
                format!("{:.1} MiB", mib(*kib)),
            );
        }
        row(
            &mut t,
            "result",
            if self.passed() {
                "RSS back within 20% of idle after 10 s".into()
            } else {
                "RSS NOT back within 20% of idle after 10 s".into()
            },
        );
        t
    }

    fn json(&self, args: &Args) -> String {
        serde_json::json!({
            "scenario": "handshake-storm",
            "handshakes": args.storm_handshakes,
            "concurrency": args.storm_concurrency,
            "target": self.description,
            "statuses": self.statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect::<HashMap<_, _>>(),
            "storm_s": self.storm_s,
            "rss_idle_kib": self.idle_kib,
            "rss_peak_kib": self.peak_kib,
            "rss_after_1s_kib": self.after_kib[0],
            "rss_after_5s_kib": self.after_kib[1],
            "rss_after_10s_kib": self.after_kib[2],
            "passed": self.passed(),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_at_us(b"1970-01-01T00:00:00.000000Z"), Some(0));
        assert_eq!(
            parse_at_us(b"2026-11-25T18:40:00.123456Z\",\"data\""),
            Some(1_795_632_000_123_456)
        );
        assert_eq!(
            parse_at_us(b"2000-02-29T23:59:59.999999Z"),
            Some(951_868_799_999_999)
        );
        assert_eq!(parse_at_us(b"2026-11-25 18:40:00"), None);
    }

    #[test]
    fn frame_prefix() {
        let frame = br#"{"type":"event","id":1235,"channel":"business_events","table":"businesses","op":"INSERT","at":"2026-11-25T18:40:00.123456Z","data":{"id":7}}"#;
        let rest = frame.strip_prefix(EVENT_PREFIX).expect("prefix");
        let (id, rest) = parse_int(rest).expect("id");
        assert_eq!(id, 1235);
        let at = find(rest, AT_KEY).expect("at");
        assert_eq!(
            parse_at_us(&rest[at + AT_KEY.len()..]),
            Some(1_795_632_000_123_456)
        );
    }

    #[test]
    fn comparing_ranges() {
        assert_eq!(compare(&[2, 3, 4, 5], &[(2, 5)], 10), (4, 0));
        assert_eq!(compare(&[2, 3, 4, 5], &[(2, 3), (5, 5)], 10), (3, 0));
        assert_eq!(compare(&[2, 4], &[(2, 4)], 10), (2, 1));
        assert_eq!(compare(&[2, 4], &[(2, 2), (4, 12)], 10), (2, 6));
        assert_eq!(compare(&[], &[], 10), (0, 0));
    }
}
