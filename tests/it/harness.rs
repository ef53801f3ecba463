//! Test harness: a fresh database per test on a real PostgreSQL, a relay on
//! port 0, WebSocket clients, and bounded waits (never a bare sleep).
//!
//! PostgreSQL: `PGRELAY_TEST_DATABASE_URL` (a superuser URL; each test creates
//! its own database there) if set, else one throwaway cluster per test binary,
//! started from the local binaries and stopped by a watchdog when the binary
//! exits. A missing PostgreSQL fails the tests, saying what to install. Each
//! `TestDb` drops its database when it goes out of scope (bounded, best
//! effort), so a shared server does not fill up.
//!
//! Helpers used by more than one test file live here and only here: plain
//! HTTP requests, `/metrics` samples, runs of the binary (`command`,
//! `pgrelay`, `ServeProcess`), event-log reads and resumes.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay::config::ServeConfig;
use pgrelay::install::InstallConfig;
use pgrelay::{Relay, StartOptions};
use pgrelay_cluster::Cluster;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "pgrelay-test-secret";
/// The bound on every wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(15);

/// Where test databases are created: a server URL without the database name.
struct Server {
    /// Connection string for the maintenance database.
    admin_url: String,
    /// `url_for(db)` replaces the database in this URL.
    base: url::Url,
    _cluster: Option<Cluster>,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("PGRELAY_TEST_DATABASE_URL") {
                let base = url::Url::parse(&url)
                    .expect("PGRELAY_TEST_DATABASE_URL must be a postgres:// URL");
                return Server {
                    admin_url: url,
                    base,
                    _cluster: None,
                };
            }
            let cluster = Cluster::start().await.unwrap_or_else(|e| {
                panic!(
                    "the tests need PostgreSQL: set PGRELAY_TEST_DATABASE_URL or install the \
                     server binaries (apt-get install postgresql): {e}"
                )
            });
            cluster
                .stop_when_process_exits(std::process::id())
                .expect("start the cluster watchdog");
            let admin_url = cluster.url("postgres");
            Server {
                base: url::Url::parse(&admin_url).expect("cluster url"),
                admin_url,
                _cluster: Some(cluster),
            }
        })
        .await
}

/// Connects and drives the connection in the background.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to test database: {e}"));
    tokio::spawn(connection);
    client
}

/// A database of one's own, dropped (bounded, best effort) when the test is
/// done, pass or fail.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// An empty database named after the test.
    pub async fn empty(test: &str) -> TestDb {
        let server = server().await;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("t_{}_{}_{}", test, std::process::id(), n).to_lowercase();
        let admin = connect(&server.admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        let mut url = server.base.clone();
        url.set_path(&format!("/{name}"));
        TestDb {
            name,
            url: url.to_string(),
        }
    }

    /// A database with `pgrelay install --demo` applied.
    pub async fn demo(test: &str) -> TestDb {
        let db = TestDb::empty(test).await;
        pgrelay::install::install(&InstallConfig {
            demo: true,
            ..InstallConfig::new(db.config())
        })
        .await
        .expect("install --demo");
        db.exec(
            "INSERT INTO users (id, email, role) VALUES \
             (1, 'admin@example.com', 'super_admin'), (2, 'owner@example.com', 'owner'), \
             (3, 'customer@example.com', 'customer'), (4, 'other@example.com', 'owner'); \
             SELECT setval(pg_get_serial_sequence('users', 'id'), 4);",
        )
        .await;
        db
    }

    pub fn config(&self) -> pgrelay::pgconn::Target {
        self.url.parse().expect("test url parses")
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Runs SQL in its own connection (and so its own transaction per statement).
    pub async fn exec(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The one value `sql` selects, on its own connection.
    pub async fn value<T>(&self, sql: &str) -> T
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Inserts a business and returns its id.
    pub async fn business(&self, owner: i64, name: &str) -> i64 {
        insert_business(&self.client().await, owner, name).await
    }

    /// Inserts a business with a description (large rows) and returns its id.
    pub async fn business_described(&self, owner: i64, name: &str, description: &str) -> i64 {
        self.client()
            .await
            .query_one(
                "INSERT INTO businesses (owner_id, name, description) VALUES ($1, $2, $3) \
                 RETURNING id",
                &[&owner, &name, &description],
            )
            .await
            .unwrap_or_else(|e| panic!("insert a {}-byte description: {e:?}", description.len()))
            .get(0)
    }

    /// Inserts `n` businesses of `owner` with `description`, in one
    /// statement (one transaction).
    pub async fn businesses_described(&self, owner: i64, n: i32, description: &str) {
        self.client()
            .await
            .execute(
                "INSERT INTO businesses (owner_id, name, description) \
                 SELECT $1, 'described ' || i, $3 FROM generate_series(1, $2) AS i",
                &[&owner, &n, &description],
            )
            .await
            .unwrap_or_else(|e| panic!("insert {n} described businesses: {e}"));
    }

    /// Inserts a reservation and returns its id.
    pub async fn reservation(&self, business: i64, customer: i64) -> i64 {
        insert_reservation(&self.client().await, business, customer).await
    }

    /// Drops the pgrelay schema and installs it again with the demo: a new
    /// log, a new epoch (what a restore or failover looks like to pgrelay).
    pub async fn reinstall_demo(&self) {
        self.exec("DROP SCHEMA pgrelay CASCADE").await;
        pgrelay::install::install(&pgrelay::install::InstallConfig {
            demo: true,
            ..pgrelay::install::InstallConfig::new(self.config())
        })
        .await
        .expect("reinstall");
    }
}

/// How long dropping a test database may take before the test moves on.
const DROP_LIMIT: Duration = Duration::from_secs(10);

impl Drop for TestDb {
    /// `DROP DATABASE ... WITH (FORCE)` (PostgreSQL 13+: ends what is still
    /// connected) on a fresh connection, in a thread with its own runtime
    /// since drop cannot await; waits at most [`DROP_LIMIT`]. A failure is
    /// reported on stderr and never fails the test.
    fn drop(&mut self) {
        let Some(server) = SERVER.get() else { return };
        let admin_url = server.admin_url.clone();
        let name = self.name.clone();
        let (done, finished) = std::sync::mpsc::channel();
        let dropping = std::thread::Builder::new()
            .name(format!("drop {name}"))
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|runtime| {
                        runtime.block_on(async {
                            let drop = async {
                                let (client, connection) =
                                    tokio_postgres::connect(&admin_url, NoTls).await?;
                                tokio::spawn(connection);
                                client
                                    .batch_execute(&format!(
                                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                                    ))
                                    .await
                            };
                            match tokio::time::timeout(DROP_LIMIT, drop).await {
                                Ok(result) => result.map_err(|e| e.to_string()),
                                Err(_) => Err(format!("timed out after {DROP_LIMIT:?}")),
                            }
                        })
                    });
                if let Err(e) = result {
                    eprintln!("warning: test database {name} not dropped: {e}");
                }
                let _ = done.send(());
            });
        if dropping.is_ok() {
            let _ = finished.recv_timeout(DROP_LIMIT + Duration::from_secs(1));
        }
    }
}

/// A relay on 127.0.0.1:0 against a test database.
pub struct TestRelay {
    pub relay: Relay,
}

impl TestRelay {
    pub async fn start(db: &TestDb) -> TestRelay {
        TestRelay::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: &TestDb, tweak: impl FnOnce(&mut ServeConfig)) -> TestRelay {
        TestRelay::start_on(db.config(), Duration::from_secs(30), tweak).await
    }

    /// A relay against any `database` (a proxy, a pooler, TLS) with this
    /// ping interval, ready.
    pub async fn start_on(
        database: pgrelay::pgconn::Target,
        ping: Duration,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> TestRelay {
        let mut config = ServeConfig::new(database, "127.0.0.1:0".parse().expect("addr"), SECRET);
        tweak(&mut config);
        let options = StartOptions {
            ping_interval: ping,
            ..StartOptions::default()
        };
        let relay = Relay::start_with(config, options)
            .await
            .unwrap_or_else(|e| panic!("relay start: {e}"));
        let relay = TestRelay { relay };
        relay.wait_ready().await;
        relay
    }

    pub async fn wait_ready(&self) {
        wait_for("relay ready", || async { self.relay.is_ready() }).await;
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.relay.addr(), path_and_query)
    }

    /// Connects to `path_and_query` with `Authorization: Bearer token`.
    pub async fn ws(&self, path_and_query: &str, token: &str) -> Ws {
        Ws::connect(&self.ws_url(path_and_query), Some(token))
            .await
            .unwrap_or_else(|e| panic!("connect {path_and_query}: {e:?}"))
    }

    /// The dashboard as the admin, past `hello`.
    pub async fn dashboard(&self) -> Ws {
        let mut ws = self.ws("/ws/dashboard/", &token("1", true)).await;
        ws.hello().await;
        ws
    }

    /// A user's notifications, past `hello`.
    pub async fn notifications(&self, user: &str) -> Ws {
        let mut ws = self.ws("/ws/notifications/", &token(user, false)).await;
        ws.hello().await;
        ws
    }
}

/// pgrelay's queries waiting on a lock now, seen from `watcher` (-1 if
/// it cannot tell).
pub async fn lock_waits(watcher: &tokio_postgres::Client) -> i64 {
    watcher
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'pgrelay' AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .map(|row| row.get::<_, i64>(0))
        .unwrap_or(-1)
}

/// Two replays of `token`'s user on `path` (a resume that reads the log),
/// held: the log is locked (`ACCESS EXCLUSIVE`, in the returned client's
/// open transaction) and both replays wait on the lock, so the user's two
/// replay turns are taken. Returns once both wait; `ROLLBACK` on the client
/// lets them go.
pub async fn hold_two_replays(
    db: &TestDb,
    relay: &TestRelay,
    path: &str,
    token: &str,
) -> (tokio_postgres::Client, [Ws; 2]) {
    let locker = db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE pgrelay.events IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock the log");
    let mut first = relay.ws(path, token).await;
    first.hello().await;
    let mut second = relay.ws(path, token).await;
    second.hello().await;
    let watcher = db.client().await;
    wait_for("both replays to wait on the lock", || async {
        lock_waits(&watcher).await == 2
    })
    .await;
    (locker, [first, second])
}

/// `(replay_rows, replays_from_memory)` on the relay at `addr`: rows read
/// from the log to replay, and resumes memory answered whole.
pub async fn replay_counts(addr: std::net::SocketAddr) -> (f64, f64) {
    let text = metrics(addr).await;
    (
        sample(&text, "pgrelay_replay_rows_total").unwrap_or(0.0),
        sample(&text, "pgrelay_replays_from_memory_total").unwrap_or(0.0),
    )
}

/// `token` as an `Authorization` header's value.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A one-hour HS256 token for `sub`, a super admin when `admin`.
pub fn token(sub: &str, admin: bool) -> String {
    pgrelay::auth::mint(
        SECRET,
        sub,
        admin.then_some("super_admin"),
        Duration::from_secs(3600),
    )
    .expect("mint token")
}

/// Signs arbitrary claims with the test secret.
pub fn sign(claims: &Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign claims")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Polls `check` every 20 ms until it is true; panics after [`WAIT`].
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket client that reads JSON frames with bounded waits.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub subprotocol: Option<String>,
}

/// How a handshake was refused: status and body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

impl Ws {
    pub async fn connect(url: &str, bearer: Option<&str>) -> Result<Ws, Refused> {
        let mut request = url.into_client_request().expect("valid ws url");
        if let Some(token) = bearer {
            request.headers_mut().insert(
                "Authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
            );
        }
        Ws::connect_request(request).await
    }

    pub async fn connect_request(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Ws, Refused> {
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request)).await {
            Err(_) => panic!("handshake timed out"),
            Ok(Ok((stream, response))) => Ok(Ws {
                stream,
                subprotocol: response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            }),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => Err(Refused {
                status: response.status().as_u16(),
                body: response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Ok(Err(e)) => panic!("handshake failed: {e}"),
        }
    }

    /// The next frame, or `None` when the socket closed; panics after [`WAIT`].
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            let next = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("timed out waiting for a frame");
            match next {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next text frame as JSON; panics on a close or timeout.
    pub async fn next_json(&mut self) -> Value {
        match self.next_message().await {
            Some(Message::Text(t)) => serde_json::from_str(&t).expect("frames are JSON"),
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// Reads the `hello` frame.
    pub async fn hello(&mut self) -> Value {
        let hello = self.next_json().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        hello
    }

    /// The next `event` frame.
    pub async fn event(&mut self) -> Value {
        let event = self.next_json().await;
        assert_eq!(event["type"], "event", "{event}");
        event
    }

    /// Reads until the close frame, answers it (as a browser does, so the
    /// relay's close handshake ends at once) and returns its code and reason.
    pub async fn close_code(&mut self) -> (u16, String) {
        let close = loop {
            match self.next_message().await {
                Some(Message::Close(Some(frame))) => {
                    break (u16::from(frame.code), frame.reason.to_string())
                }
                Some(Message::Close(None)) => break (1005, String::new()),
                None => panic!("socket ended without a close frame"),
                Some(_) => continue,
            }
        };
        // tungstenite queued the answer: send it.
        let _ = tokio::time::timeout(WAIT, self.stream.flush()).await;
        close
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream
            .send(Message::text(text.to_owned()))
            .await
            .expect("send text");
    }
}

/// An HTTP answer read to the end: status, head (status line and headers)
/// and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpAnswer {
    /// The value of header `name` (any case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A bodiless HTTP/1.1 `method path` to `addr` with `headers` and
/// `Connection: close` (no upgrade, no token unless given), or `None` when
/// nothing accepts the connection or the answer is not HTTP. Bounded by
/// [`WAIT`]. Every plain request of the tests goes through here.
pub async fn try_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<HttpAnswer> {
    try_http_body(addr, method, path, headers, "").await
}

/// [`http`] with a request body.
pub async fn http_body(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpAnswer {
    try_http_body(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP response from {addr}"))
}

async fn try_http_body(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<HttpAnswer> {
    use std::fmt::Write as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
        for (name, value) in headers {
            let _ = write!(request, "{name}: {value}\r\n");
        }
        if method != "GET" {
            let _ = write!(request, "Content-Length: {}\r\n", body.len());
        }
        request.push_str("Connection: close\r\n\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some(HttpAnswer {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
        })
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} timed out"))
}

/// [`try_http`] that must be answered.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpAnswer {
    try_http(addr, method, path, headers)
        .await
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP response from {addr}"))
}

/// A plain `GET path` to `addr`: status and body. For `/healthz`, `/readyz`
/// and refusals of non-WebSocket requests.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let answer = http(addr, "GET", path, &[]).await;
    (answer.status, answer.body)
}

/// `GET path`: status and body, or `None` when nothing accepts the
/// connection or the answer is not HTTP.
pub async fn try_http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    try_http(addr, "GET", path, &[])
        .await
        .map(|a| (a.status, a.body))
}

/// The `/metrics` text at `addr` (answered 200).
pub async fn metrics(addr: std::net::SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// The value of one series in a `/metrics` text, e.g.
/// `pgrelay_listener_reconnects_total` or `pgrelay_connections{stream="dashboard"}`;
/// `None` if absent. Compared without regard to case, so a label value
/// rendered `Dashboard` matches; a trailing timestamp is ignored.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    let series = series.to_lowercase();
    metrics.lines().find_map(|line| {
        line.to_lowercase()
            .strip_prefix(&series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Whether `name` has at least one sample line (not just `# HELP`/`# TYPE`).
pub fn has_samples(metrics: &str, name: &str) -> bool {
    metrics.lines().any(|line| {
        line.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
    })
}

/// [`sample`] of the `/metrics` at `addr`.
pub async fn metric(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    sample(&metrics(addr).await, series)
}

/// `{"type": "refresh", "token": token}`, the client's refresh message.
pub fn refresh_message(token: &str) -> String {
    serde_json::json!({ "type": "refresh", "token": token }).to_string()
}

/// The real `pgrelay serve` binary as a child process on a free port, with
/// the test secret, no `PGRELAY_*` or `DATABASE_URL` from the environment,
/// and its log (stderr) kept in a file. Killed on drop.
pub struct ServeProcess {
    pub child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    log: tempfile::NamedTempFile,
}

impl ServeProcess {
    /// Spawns `pgrelay serve ARGS --jwt-secret SECRET --listen ADDR`.
    pub fn spawn(args: &[&str]) -> ServeProcess {
        ServeProcess::spawn_with(&[args, &["--jwt-secret", SECRET]].concat(), &[])
    }

    /// Spawns `pgrelay serve ARGS --listen ADDR` with only the `envs` given
    /// among the variables [`command`] clears (so bring the key yourself).
    pub fn spawn_with(args: &[&str], envs: &[(&str, &str)]) -> ServeProcess {
        ServeProcess::spawn_command("serve", args, envs)
    }

    /// `pgrelay demo --listen ADDR`: its own throwaway PostgreSQL and the
    /// page's buttons; what it prints goes to the log too.
    pub fn demo() -> ServeProcess {
        ServeProcess::spawn_command("demo", &[], &[])
    }

    fn spawn_command(subcommand: &str, args: &[&str], envs: &[(&str, &str)]) -> ServeProcess {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port");
        let log = tempfile::NamedTempFile::new().expect("log file");
        let mut command = command(&[subcommand]);
        command
            .args(args)
            .args(["--listen", &addr.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(log.reopen().expect("log file"))
            .stderr(log.reopen().expect("log file"))
            // A file, not a terminal: plain text that tests can search.
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn pgrelay {subcommand}: {e}"));
        ServeProcess { child, addr, log }
    }

    /// A spawned process, ready (see [`ServeProcess::wait_ready`]).
    pub async fn ready(args: &[&str], envs: &[(&str, &str)]) -> ServeProcess {
        let mut serve = ServeProcess::spawn_with(args, envs);
        serve.wait_ready().await;
        serve
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.addr)
    }

    /// Sends `signal` (`-TERM`, `-HUP`, ...) with kill(1).
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("pid").to_string();
        let status = tokio::time::timeout(
            WAIT,
            tokio::process::Command::new("kill")
                .args([signal, &pid])
                .status(),
        )
        .await
        .expect("kill timed out")
        .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }

    /// SIGTERM, then the exit status (bounded) and the whole log.
    pub async fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.signal("-TERM").await;
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("pgrelay did not exit after SIGTERM: {}", self.log()))
            .expect("wait");
        (status, self.log())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let addr = self.addr;
        self.wait_for("pgrelay serve to be ready", || async move {
            try_http_get(addr, "/readyz").await.map(|(s, _)| s) == Some(200)
        })
        .await;
    }

    /// A socket on `path` with `Authorization: Bearer token`, past `hello`.
    pub async fn socket(&self, path: &str, token: &str) -> Ws {
        let mut ws = Ws::connect(&format!("ws://{}{path}", self.addr), Some(token))
            .await
            .unwrap_or_else(|e| panic!("connect {path}: {e:?}"));
        ws.hello().await;
        ws
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&mut self, needle: &str) {
        let path = self.log.path().to_owned();
        self.wait_for(&format!("{needle:?} in the log"), || {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            async move { log.contains(needle) }
        })
        .await;
    }

    /// Waits for `check`, failing early (with the log) if the process exits.
    pub async fn wait_for<F, Fut>(&mut self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let ServeProcess { child, log, .. } = self;
        wait_for(what, || {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(log.path()).unwrap_or_default();
                panic!("pgrelay serve exited early ({status}): {log}");
            }
            check()
        })
        .await;
    }
}

/// Completes a WebSocket handshake on a raw TCP socket and returns it; the
/// caller then neither reads nor answers anything.
pub async fn silent_websocket(addr: std::net::SocketAddr, path: &str, token: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send handshake");
    let head = response_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// The next response head on `stream`, read a byte at a time so that
/// nothing after it is consumed; panics after [`WAIT`].
pub async fn response_head(stream: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.expect("response head"));
        }
        head
    };
    let head = tokio::time::timeout(WAIT, read)
        .await
        .expect("response head timed out");
    String::from_utf8_lossy(&head).into_owned()
}

/// Inserts a reservation on `client` (one transaction) and returns its id.
pub async fn insert_reservation(client: &Client, business: i64, customer: i64) -> i64 {
    client
        .query_one(
            "INSERT INTO reservations (business_id, customer_id, starts_at, party_size) \
             VALUES ($1, $2, now() + interval '1 day', 2) RETURNING id",
            &[&business, &customer],
        )
        .await
        .expect("insert reservation")
        .get(0)
}

/// Inserts a business on an open connection (one transaction) and returns its id.
pub async fn insert_business(client: &Client, owner: i64, name: &str) -> i64 {
    client
        .query_one(
            "INSERT INTO businesses (owner_id, name) VALUES ($1, $2) RETURNING id",
            &[&owner, &name],
        )
        .await
        .expect("insert business")
        .get(0)
}

/// Longest any single run of the binary may take.
const RUN_LIMIT: Duration = Duration::from_secs(10);

/// `pgrelay args...` with none of PGRELAY_*, DATABASE_URL, PGSSL* and
/// RUST_LOG from the developer's environment; killed on drop.
pub fn command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
    command.args(args).kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("PGRELAY_")
            || name.starts_with("PGSSL")
            || name == "DATABASE_URL"
            || name == "RUST_LOG"
        {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// Runs `pgrelay args...` with only the `envs` given among the variables
/// [`command`] clears, so the developer's environment cannot leak in.
pub async fn pgrelay(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut command = command(args);
    command.envs(envs.iter().copied());
    tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("pgrelay {args:?} still running after {RUN_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("run pgrelay {args:?}: {e}"))
}

/// LISTENs on `channel` with its own connection (as whoever `url` names)
/// and forwards the payloads.
pub async fn listen(
    url: &str,
    channel: &str,
) -> (tokio_postgres::Client, tokio::sync::mpsc::Receiver<String>) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect for LISTEN");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                if tx.send(n.payload().to_owned()).await.is_err() {
                    return;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");
    (client, rx)
}

// ---- runs of the binary: output -----------------------------------------

/// A finished run's stdout, lossily.
pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A finished run's stderr, lossily.
pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Exit code 2 and exactly one stderr line `pgrelay: error: ...` mentioning
/// `mentions`, without panic text. Returns the line.
pub fn assert_usage_error(output: &std::process::Output, mentions: &str) -> String {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic text in stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "want one stderr line, got: {err}");
    assert!(lines[0].starts_with("pgrelay: error: "), "{err}");
    assert!(
        lines[0].contains(mentions),
        "the error should mention {mentions:?}: {err}"
    );
    lines[0].to_owned()
}

/// `key = value` lines of `--print-config`.
pub fn setting(printed: &str, key: &str) -> String {
    printed
        .lines()
        .find_map(|line| {
            let (k, v) = line.split_once(" = ")?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {key} in printed config:\n{printed}"))
}

// ---- the event log and resumes --------------------------------------------

/// The log's epoch, as a client would have stored it.
pub async fn epoch(db: &TestDb) -> String {
    db.value("SELECT epoch FROM pgrelay.meta").await
}

/// Every event id above `after`, in id order.
pub async fn ids_after(db: &TestDb, after: i64) -> Vec<i64> {
    db.client()
        .await
        .query(
            "SELECT id FROM pgrelay.events WHERE id > $1 ORDER BY id",
            &[&after],
        )
        .await
        .expect("read pgrelay.events")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The ids of the events user `user` may see, above `after`, in id order
/// (the default routes: owner of a business; business owner or customer of
/// a reservation).
pub async fn ids_for_user_after(db: &TestDb, user: &str, after: i64) -> Vec<i64> {
    db.client()
        .await
        .query(
            "SELECT id FROM pgrelay.events WHERE id > $1 AND ( \
                 (channel = 'business_events' AND payload->>'owner_id' = $2) OR \
                 (channel = 'reservation_events' AND \
                  $2 IN (payload->>'business_owner_id', payload->>'customer_id'))) \
             ORDER BY id",
            &[&after, &user],
        )
        .await
        .expect("read pgrelay.events")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The ids of the events on business `business`'s stream
/// (`/ws/businesses/ID/`: the business's own rows and its reservations),
/// above `after`, in id order.
pub async fn ids_for_business_after(db: &TestDb, business: i64, after: i64) -> Vec<i64> {
    db.client()
        .await
        .query(
            "SELECT id FROM pgrelay.events WHERE id > $1 AND ( \
                 (channel = 'business_events' AND payload->>'id' = $2) OR \
                 (channel = 'reservation_events' AND payload->>'business_id' = $2)) \
             ORDER BY id",
            &[&after, &business.to_string()],
        )
        .await
        .expect("read pgrelay.events")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The newest event id, 0 for an empty log.
pub async fn max_id(db: &TestDb) -> i64 {
    db.value("SELECT coalesce(max(id), 0) FROM pgrelay.events")
        .await
}

/// An event frame's id.
pub fn id_of(event: &Value) -> i64 {
    event["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("event without id: {event}"))
}

/// Reads exactly `n` event frames and returns their ids.
pub async fn read_ids(ws: &mut Ws, n: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(id_of(&ws.event().await));
    }
    ids
}

/// `got == expected`, reported by the first difference rather than by
/// printing thousands of ids.
#[track_caller]
pub fn assert_same_ids(got: &[i64], expected: &[i64], what: &str) {
    if got == expected {
        return;
    }
    let at = got
        .iter()
        .zip(expected)
        .position(|(g, e)| g != e)
        .unwrap_or(got.len().min(expected.len()));
    panic!(
        "{what}: got {} ids, expected {}; first difference at index {at}: got {:?}, expected {:?}",
        got.len(),
        expected.len(),
        got.get(at..(at + 5).min(got.len())),
        expected.get(at..(at + 5).min(expected.len())),
    );
}

/// Ids in order, none twice.
#[track_caller]
pub fn assert_strictly_increasing(ids: &[i64]) {
    for pair in ids.windows(2) {
        assert!(
            pair[0] < pair[1],
            "ids out of order or duplicated: {} then {}",
            pair[0],
            pair[1]
        );
    }
}

/// Resumes `path` (a stream path) from `last_id` with the right epoch.
pub async fn resume(relay: &TestRelay, path: &str, token: &str, last_id: i64, epoch: &str) -> Ws {
    let mut ws = relay
        .ws(&format!("{path}?last_id={last_id}&epoch={epoch}"), token)
        .await;
    ws.hello().await;
    ws
}

/// One Server-Sent Event as a client parses it.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// A Server-Sent Events client (hyper's, over one connection) that reads
/// events with bounded waits, as a browser's `EventSource` would parse them.
pub struct Sse {
    pub head: hyper::http::response::Parts,
    body: hyper::body::Incoming,
    buffer: String,
}

impl Sse {
    /// `GET path` with `Accept: text/event-stream` and `headers`; the stream
    /// on 200, else the status and the body's one line.
    pub async fn connect(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Sse, (u16, String)> {
        use http_body_util::BodyExt;
        let opened = async {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("http handshake");
            tokio::spawn(connection);
            let mut request = hyper::Request::get(path)
                .header("host", addr.to_string())
                .header("accept", "text/event-stream");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            let (head, body) = response.into_parts();
            if head.status != 200 {
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err((
                    head.status.as_u16(),
                    String::from_utf8_lossy(&bytes).trim().to_owned(),
                ));
            }
            Ok(Sse {
                head,
                body,
                buffer: String::new(),
            })
        };
        tokio::time::timeout(WAIT, opened)
            .await
            .unwrap_or_else(|_| panic!("GET {path} (SSE) timed out"))
    }

    /// The next event, or `None` when the stream ends; panics after [`WAIT`].
    pub async fn next(&mut self) -> Option<SseEvent> {
        use http_body_util::BodyExt;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = self.parse(&block) {
                    return Some(event);
                }
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("timed out waiting for an SSE event");
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                _ => return None,
            }
        }
    }

    /// One block: `event:`, `id:` and `data:` fields, or only comments.
    fn parse(&self, block: &str) -> Option<SseEvent> {
        let (mut event, mut id, mut data) = ("message".to_owned(), None, String::new());
        let mut fields = 0;
        for line in block.lines() {
            if line.starts_with(':') {
                continue;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            fields += 1;
            match name {
                "event" => event = value.to_owned(),
                "id" => id = Some(value.to_owned()),
                "data" => data.push_str(value),
                _ => {}
            }
        }
        (fields > 0).then(|| SseEvent {
            event,
            id,
            data: serde_json::from_str(&data).unwrap_or(Value::Null),
        })
    }

    /// The next event, which must be named `kind`.
    pub async fn expect(&mut self, kind: &str) -> SseEvent {
        let event = self
            .next()
            .await
            .unwrap_or_else(|| panic!("the stream ended before an {kind} event"));
        assert_eq!(event.event, kind, "expected {kind}, got {event:?}");
        event
    }
}
