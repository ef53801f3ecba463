//! The pgrelay under test: our own (a throwaway PostgreSQL cluster with the
//! demo schema, and the `pgrelay` binary as a child process that can be
//! stopped and started again) or a running one (`--url`, `--database-url`);
//! for `--scenario ideal`, the ideal broadcaster in its stead (this
//! executable as a child process, no PostgreSQL).
//! Also what the scenarios ask of it besides WebSockets: the database, seeded
//! users, and its HTTP endpoints (/readyz, /metrics).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use pgrelay::install::InstallConfig;
use pgrelay_cluster::Cluster;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

use crate::args::{Args, Scenario};
use crate::error::{BenchError, Result};
use crate::ideal::Feed;
use crate::procfs::{postgres_cpu_s, Usage};

pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    /// `Host` header value.
    pub(crate) host: String,
    pub(crate) database: tokio_postgres::Config,
    pub(crate) secret: String,
    pub(crate) pid: Option<u32>,
    child: Option<tokio::process::Child>,
    cluster: Option<Cluster>,
    pub(crate) description: String,
    /// How our child was started, to start it again (none for a target).
    serve: Option<Serve>,
    /// The ideal broadcaster's stdin (none for pgrelay).
    feed: Option<Feed>,
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
    async fn spawn(&self, addr: SocketAddr) -> Result<tokio::process::Child> {
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
            .map_err(BenchError::io(format!("cannot run {}", self.bin.display())))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BenchError::run(format!(
                    "pgrelay serve exited at start ({status})"
                )));
            }
            if let Ok((200, _)) = http_get(addr, "/readyz").await {
                return Ok(child);
            }
            if Instant::now() > deadline {
                return Err(BenchError::run(
                    "pgrelay serve was not ready (/readyz) within 30 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How our child ended: (exit code, seconds from being told to stop to exit).
pub(crate) type Shutdown = Option<(Option<i32>, f64)>;

impl Server {
    pub(crate) async fn start(args: &Args) -> Result<Server> {
        if args.scenario == Scenario::Ideal {
            return Server::ideal(args).await;
        }
        let (_, notification_sockets) = args.split();
        let users = notification_sockets.max(1);
        match &args.url {
            Some(url) => {
                let parsed = url::Url::parse(url).map_err(|source| BenchError::Url {
                    url: url.clone(),
                    source,
                })?;
                let host = parsed
                    .host_str()
                    .ok_or(BenchError::Usage("--url has no host"))?
                    .to_owned();
                let port = parsed.port_or_known_default().unwrap_or(80);
                let addr = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(BenchError::io(format!("--url {url:?}")))?
                    .next()
                    .ok_or_else(|| BenchError::run(format!("--url {url:?}: no address")))?;
                let database: tokio_postgres::Config = args
                    .database_url
                    .as_deref()
                    .unwrap_or_default()
                    .parse()
                    .map_err(BenchError::sql("--database-url"))?;
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
                    feed: None,
                })
            }
            None => Server::own(args, users).await,
        }
    }

    async fn own(args: &Args, users: usize) -> Result<Server> {
        let bin = match &args.pgrelay_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .map_err(BenchError::io("cannot find this executable"))?
                .with_file_name("pgrelay"),
        };
        if !bin.is_file() {
            return Err(BenchError::run(format!(
                "{} not found: build it (cargo build --release --bins) or pass --pgrelay-bin",
                bin.display()
            )));
        }
        eprintln!("starting a throwaway PostgreSQL...");
        let cluster = Cluster::start().await.map_err(BenchError::Cluster)?;
        let url = cluster.url("postgres");
        let database: tokio_postgres::Config = url.parse().map_err(BenchError::Config)?;
        pgrelay::install::install(&InstallConfig {
            demo: true,
            ..InstallConfig::new(url.parse()?)
        })
        .await?;
        seed_users(&database, users).await?;

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BenchError::io("cannot pick a port"))?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let secret = format!("bench-{:x}", rand::random::<u64>());
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
            feed: None,
        })
    }

    /// The ideal broadcaster: this executable with `--ideal-serve`, its
    /// port the first line of its stdout (10 s at most), its stdin kept
    /// open as long as the server is ([`Self::feed`]).
    async fn ideal(args: &Args) -> Result<Server> {
        let bin = std::env::current_exe().map_err(BenchError::io("cannot find this executable"))?;
        let mut child = tokio::process::Command::new(&bin)
            .arg("--ideal-serve")
            .arg("--ideal-threads")
            .arg(args.ideal_threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(BenchError::io(format!(
                "cannot run {} --ideal-serve",
                bin.display()
            )))?;
        let (Some(stdout), Some(feed)) = (child.stdout.take(), child.stdin.take()) else {
            return Err(BenchError::run("the ideal broadcaster's pipes are missing"));
        };
        let mut line = String::new();
        let mut stdout = tokio::io::BufReader::new(stdout);
        match tokio::time::timeout(Duration::from_secs(10), stdout.read_line(&mut line)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(BenchError::io("reading the ideal broadcaster's port")(e)),
            Err(_) => {
                return Err(BenchError::run(
                    "the ideal broadcaster said no port within 10 s",
                ))
            }
        }
        let port: u16 = line.trim().parse().map_err(|_| {
            BenchError::run(format!("the ideal broadcaster said {line:?}, not its port"))
        })?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let pid = child.id();
        Ok(Server {
            addr,
            host: addr.to_string(),
            database: tokio_postgres::Config::new(),
            secret: format!("ideal-{:x}", rand::random::<u64>()),
            pid,
            child: Some(child),
            cluster: None,
            description: format!(
                "the ideal broadcaster (pid {}, {} --ideal-serve, {} writer threads) on {addr}, \
                 no PostgreSQL",
                pid.unwrap_or(0),
                bin.display(),
                args.ideal_threads
            ),
            serve: None,
            feed: Some(Feed::new(feed)),
        })
    }

    /// The ideal broadcaster's stdin (none for pgrelay).
    pub(crate) fn feed(&self) -> Option<Feed> {
        self.feed.clone()
    }

    /// Stops our child ([`Self::stop_child`]), then the
    /// throwaway cluster. Nothing for a running target.
    pub(crate) async fn stop(&mut self) -> Shutdown {
        let shutdown = self.stop_child().await;
        if let Some(cluster) = self.cluster.take() {
            if let Err(e) = cluster.stop().await {
                eprintln!("stopping the throwaway PostgreSQL: {e}");
            }
        }
        shutdown
    }

    /// Stops our child: SIGTERM to pgrelay, the end of its stdin to the
    /// ideal broadcaster (bounded wait, then SIGKILL).
    pub(crate) async fn stop_child(&mut self) -> Shutdown {
        let mut child = self.child.take()?;
        let began = Instant::now();
        match (self.feed.take(), child.id()) {
            // The feeding task has ended with the schedule: this is the last
            // handle on the broadcaster's stdin.
            (Some(feed), _) => drop(feed),
            (None, Some(pid)) => {
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            (None, None) => return None,
        }
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) => Some((status.code(), began.elapsed().as_secs_f64())),
            _ => {
                eprintln!(
                    "the server under test did not exit within 10 s of being stopped: killing it"
                );
                let _ = child.kill().await;
                None
            }
        }
    }

    /// Starts our child pgrelay again, on the same port, after [`Self::stop_child`].
    pub(crate) async fn start_child(&mut self) -> Result<()> {
        let serve = self
            .serve
            .as_ref()
            .ok_or_else(|| BenchError::run("not our pgrelay: cannot restart it"))?;
        let child = serve.spawn(self.addr).await?;
        self.pid = child.id();
        self.child = Some(child);
        Ok(())
    }

    /// Our throwaway PostgreSQL's data directory (none for a target).
    pub(crate) fn data_dir(&self) -> Option<&std::path::Path> {
        self.cluster.as_ref().map(|c| c.data_dir())
    }

    /// CPU seconds of our throwaway PostgreSQL so far (none for a target).
    pub(crate) fn postgres_cpu_s(&self) -> Option<f64> {
        self.data_dir().and_then(postgres_cpu_s)
    }

    /// CPU use so far: the machine's, ours, pgrelay's and PostgreSQL's.
    pub(crate) fn usage(&self) -> Usage {
        Usage::sample(self.pid, self.postgres_cpu_s())
    }

    /// The sum of pgrelay's /metrics samples whose line names `metric`
    /// (none when /metrics does not answer).
    pub(crate) async fn metric(&self, metric: &str) -> Option<f64> {
        let (status, body) = http_get(self.addr, "/metrics").await.ok()?;
        if status != 200 {
            return None;
        }
        body.lines()
            .filter(|l| !l.starts_with('#') && l.contains(metric))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .reduce(|a, b| a + b)
    }
}

/// Users 1..=n exist (businesses.owner_id references them).
async fn seed_users(database: &tokio_postgres::Config, n: usize) -> Result<()> {
    let client = connect_db(database).await?;
    client
        .execute(
            "INSERT INTO users (id, email, role) \
             SELECT g, 'bench-' || g || '@pgrelay.invalid', 'customer' \
             FROM generate_series(1, $1::bigint) g ON CONFLICT DO NOTHING",
            &[&(n as i64)],
        )
        .await
        .map_err(BenchError::sql(
            "seeding users (is the demo schema installed?)",
        ))?;
    client
        .batch_execute(
            "SELECT setval(pg_get_serial_sequence('users', 'id'), \
             greatest((SELECT max(id) FROM users), 1))",
        )
        .await
        .map_err(BenchError::sql("seeding users"))?;
    Ok(())
}

pub(crate) async fn connect_db(
    database: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client> {
    let (client, connection) = database
        .connect(NoTls)
        .await
        .map_err(BenchError::db("cannot connect to the database"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A minimal HTTP/1.1 GET: (status, body). For /readyz and /metrics of
/// the pgrelay under test, which answer small bodies and close.
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
