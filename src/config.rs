//! Command line (clap), `PGRELAY_*` environment variables and an optional TOML
//! file -> validated, typed configuration.
//!
//! Precedence, highest first: flag, environment variable, `--config` file,
//! built-in default (`DATABASE_URL` is honoured after the file). Everything is
//! parsed and checked here, before any port is bound or any connection made,
//! and a problem is one [`ConfigError`] line that names the flag. Nothing here
//! touches the network.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::admission::Limits;
use crate::auth::{AdminClaim, AuthConfig, KeySource};
use crate::hub::QueueSizes;
use crate::install::{WatchSpec, WatchSpecError, DEFAULT_MAX_EVENT_BYTES, DEFAULT_OWNER};
use crate::pgconn::{Target, TargetError};
use crate::route::Routes;

#[derive(Debug, Parser)]
#[command(
    name = "pgrelay",
    version,
    about = "PostgreSQL row changes -> live WebSocket messages"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay events from PostgreSQL to WebSocket clients.
    Serve(Box<ServeArgs>),
    /// Install the pgrelay schema and capture triggers (idempotent).
    Install(InstallArgs),
    /// Print a signed HS256 token, for trying pgrelay out.
    Token(TokenArgs),
    /// Throwaway PostgreSQL + demo schema + server, with tokens printed.
    Demo(DemoArgs),
    /// Print a stream's events as JSON lines; reconnects and resumes on its own.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection string (URL or key=value); DATABASE_URL is used
    /// when neither this flag, its variable nor the config file sets it.
    #[arg(long, env = "PGRELAY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// TOML file with any of the long options (underscores for dashes).
    #[arg(long, env = "PGRELAY_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Connection string for the LISTEN connection alone, when reads go through
    /// a transaction-mode pooler: point this at the database directly or at a
    /// session-mode pool [default: --database-url].
    #[arg(long, env = "PGRELAY_LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<String>,
    /// Address to serve HTTP and WebSockets on [default: 127.0.0.1:8080].
    #[arg(long, env = "PGRELAY_LISTEN")]
    pub listen: Option<String>,
    /// HS256 secret that tokens are signed with.
    #[arg(long, env = "PGRELAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the HS256 secret (re-read on SIGHUP, for rotation).
    #[arg(long, env = "PGRELAY_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM file with the RS256 or ES256 public key tokens are signed for (re-read on SIGHUP).
    #[arg(long, env = "PGRELAY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "PGRELAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "PGRELAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on exp and nbf [default: 0s].
    #[arg(long, env = "PGRELAY_JWT_LEEWAY")]
    pub jwt_leeway: Option<String>,
    /// Claim that makes a super admin, NAME=VALUE; repeatable [default: role=super_admin].
    #[arg(
        long = "admin-claim",
        env = "PGRELAY_ADMIN_CLAIMS",
        value_delimiter = ';'
    )]
    pub admin_claims: Vec<String>,
    /// CHANNEL=AUDIENCE[,AUDIENCE...], AUDIENCE being dashboard or user:FIELD; repeatable
    /// [default: the demo routes].
    #[arg(long = "route", env = "PGRELAY_ROUTES", value_delimiter = ';')]
    pub routes: Vec<String>,
    /// Events older than this are pruned from pgrelay.events [default: 24h].
    #[arg(long, env = "PGRELAY_RETENTION")]
    pub retention: Option<String>,
    /// Frames a dashboard socket may fall behind before it is closed with 4008 [default: 4096].
    #[arg(long, env = "PGRELAY_DASHBOARD_QUEUE")]
    pub dashboard_queue: Option<usize>,
    /// Frames a notifications socket may fall behind before it is closed with 4008 [default: 64].
    #[arg(long, env = "PGRELAY_USER_QUEUE")]
    pub user_queue: Option<usize>,
    /// Connections in the read pool (replay, large events) [default: 8].
    #[arg(long, env = "PGRELAY_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// Browser origin allowed to open sockets, exactly as sent in `Origin`; repeatable
    /// [default: any].
    #[arg(
        long = "allowed-origin",
        env = "PGRELAY_ALLOWED_ORIGINS",
        value_delimiter = ';'
    )]
    pub allowed_origins: Vec<String>,
    /// SQL deciding super admin for tokens without an admin claim, e.g.
    /// "SELECT role = 'super_admin' FROM users WHERE id = $1" ($1: the user id).
    #[arg(long, env = "PGRELAY_ADMIN_QUERY")]
    pub admin_query: Option<String>,
    /// How long an --admin-query answer is cached [default: 30s].
    #[arg(long, env = "PGRELAY_ADMIN_CACHE")]
    pub admin_cache: Option<String>,
    /// Open sockets in total; more are refused with 503 [default: 50000].
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open sockets per user; more are refused with 429 [default: 32].
    #[arg(long, env = "PGRELAY_MAX_SOCKETS_PER_USER")]
    pub max_sockets_per_user: Option<usize>,
    /// Time a client has to send its request headers [default: 10s].
    #[arg(long, env = "PGRELAY_HANDSHAKE_TIMEOUT")]
    pub handshake_timeout: Option<String>,
    /// Largest client message in bytes; larger closes the socket with 1009 [default: 16384].
    #[arg(long, env = "PGRELAY_MAX_CLIENT_MESSAGE")]
    pub max_client_message: Option<usize>,
    /// Client messages per second per socket (bursts of 10x); more closes it with 1008
    /// [default: 2].
    #[arg(long, env = "PGRELAY_CLIENT_RATE")]
    pub client_rate: Option<u32>,
    /// Connections not yet upgraded to a WebSocket (before and during
    /// authentication), in total; more are answered 503 at once [default: 1024].
    #[arg(long, env = "PGRELAY_MAX_PENDING_HANDSHAKES")]
    pub max_pending_handshakes: Option<usize>,
    /// The same per client address (IPv6 by /64); more are answered 429 at once
    /// [default: 64].
    #[arg(long, env = "PGRELAY_MAX_PENDING_PER_IP")]
    pub max_pending_per_ip: Option<usize>,
    /// Largest HTTP request head (request line and headers) in bytes; larger is
    /// answered 431 [default: 16384].
    #[arg(long, env = "PGRELAY_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Print the resolved configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Also create the demo tables (users, businesses, reservations) and their triggers.
    #[arg(long)]
    pub demo: bool,
    /// Capture TABLE's changes on CHANNEL; repeatable. Options after the pair, space-separated:
    /// ops=insert,update,delete (default: all three); columns=a,b (allow-list) or
    /// exclude=a,b (deny-list); enrich=FIELD:FK_COLUMN.COLUMN,... (adds COLUMN of the row the
    /// foreign key FK_COLUMN points to, as FIELD).
    #[arg(
        long = "watch",
        value_name = "TABLE=CHANNEL [ops=..] [columns=..|exclude=..] [enrich=..]"
    )]
    pub watch: Vec<String>,
    /// NOLOGIN role that owns the pgrelay schema and the capture functions (created if
    /// missing; never a superuser) [default: pgrelay_owner].
    #[arg(long, env = "PGRELAY_OWNER")]
    pub owner: Option<String>,
    /// Largest event payload logged whole, in bytes (as jsonb); a larger row is logged as a
    /// stub with its primary key and "truncated": true [default: 1048576].
    #[arg(long, env = "PGRELAY_MAX_EVENT_SIZE")]
    pub max_event_size: Option<u32>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// HS256 secret to sign with.
    #[arg(long, env = "PGRELAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// TOML file to read jwt_secret from.
    #[arg(long, env = "PGRELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The user id (claim sub).
    #[arg(long)]
    pub sub: String,
    /// Claim role, e.g. super_admin.
    #[arg(long)]
    pub role: Option<String>,
    /// Lifetime, e.g. 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// WebSocket URL, e.g. ws://127.0.0.1:8080/ws/notifications/
    #[arg(long)]
    pub url: String,
    /// Bearer token.
    #[arg(
        long,
        env = "PGRELAY_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token (re-read at each reconnect).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Resume after this event id.
    #[arg(long)]
    pub last_id: Option<i64>,
    /// Pretty-print each event instead of one JSON line.
    #[arg(long)]
    pub pretty: bool,
}

/// The `--config` file. Keys are the long options with underscores.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    listen_database_url: Option<String>,
    listen: Option<String>,
    jwt_secret: Option<String>,
    jwt_secret_file: Option<PathBuf>,
    jwt_public_key: Option<PathBuf>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    jwt_leeway: Option<String>,
    admin_claim: Option<Vec<String>>,
    route: Option<Vec<String>>,
    retention: Option<String>,
    dashboard_queue: Option<usize>,
    user_queue: Option<usize>,
    pool_size: Option<usize>,
    allowed_origin: Option<Vec<String>>,
    admin_query: Option<String>,
    admin_cache: Option<String>,
    max_connections: Option<usize>,
    max_sockets_per_user: Option<usize>,
    handshake_timeout: Option<String>,
    max_client_message: Option<usize>,
    client_rate: Option<u32>,
    max_pending_handshakes: Option<usize>,
    max_pending_per_ip: Option<usize>,
    max_header_bytes: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--config {path}: {reason}")]
    File { path: String, reason: String },
    #[error(
        "missing --database-url (or PGRELAY_DATABASE_URL, DATABASE_URL, database_url in --config)"
    )]
    NoDatabase,
    #[error("--{flag}: {source}")]
    Database {
        flag: &'static str,
        #[source]
        source: TargetError,
    },
    #[error("--listen {value:?}: {reason}")]
    Listen { value: String, reason: String },
    #[error(
        "missing --jwt-secret, --jwt-secret-file or --jwt-public-key (or PGRELAY_JWT_SECRET...)"
    )]
    NoKey,
    #[error("--jwt-secret, --jwt-secret-file and --jwt-public-key are exclusive: pick one")]
    TwoKeys,
    #[error("--jwt-secret: empty secret")]
    EmptySecret,
    #[error("--{flag} {value:?}: {reason}")]
    Value {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("--route: {0}")]
    Route(#[from] crate::route::RouteError),
    #[error("{0}")]
    Watch(#[from] WatchSpecError),
    #[error("{0}")]
    Key(#[from] crate::auth::KeyError),
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub database: Target,
    /// The LISTEN connection's own target; `None`: the same as `database`.
    pub listen_database: Option<Target>,
    pub listen: SocketAddr,
    pub auth: AuthConfig,
    pub routes: Routes,
    pub retention: Duration,
    pub queues: QueueSizes,
    pub pool_size: usize,
    pub allowed_origins: Vec<String>,
    pub admin_query: Option<String>,
    pub admin_cache: Duration,
    pub limits: Limits,
    /// Serve the demo page's write endpoints (`pgrelay demo` only; no flag).
    pub demo_api: bool,
}

impl ServeConfig {
    /// Sensible values for everything but the database, listen address and key;
    /// used by `demo`, tests and the benchmark.
    pub fn new(database: Target, listen: SocketAddr, secret: &str) -> ServeConfig {
        ServeConfig {
            database,
            listen_database: None,
            listen,
            auth: AuthConfig {
                key: KeySource::Secret(secret.to_owned()),
                issuer: None,
                audience: None,
                leeway: Duration::ZERO,
                admin_claims: vec![default_admin_claim()],
            },
            routes: Routes::parse::<&str>(&[])
                .unwrap_or_else(|_| unreachable!("default routes parse")),
            retention: DEFAULT_RETENTION,
            queues: DEFAULT_QUEUES,
            pool_size: DEFAULT_POOL_SIZE,
            allowed_origins: Vec::new(),
            admin_query: None,
            admin_cache: DEFAULT_ADMIN_CACHE,
            limits: Limits::default(),
            demo_api: false,
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_QUEUES: QueueSizes = QueueSizes {
    dashboard: 4096,
    user: 64,
};
pub const DEFAULT_POOL_SIZE: usize = 8;
pub const DEFAULT_ADMIN_CACHE: Duration = Duration::from_secs(30);

fn default_admin_claim() -> AdminClaim {
    AdminClaim {
        name: "role".into(),
        value: "super_admin".into(),
    }
}

fn load_file(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let err = |reason: String| ConfigError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        match line {
            Some(line) => err(format!("line {line}: {}", e.message())),
            None => err(e.message().to_owned()),
        }
    })
}

/// An empty value (`PGRELAY_DATABASE_URL=` from a compose file) is unset.
fn is_set(url: &str) -> bool {
    !url.trim().is_empty()
}

/// Resolves the connection string: flag/env, then file, then DATABASE_URL;
/// its sslmode/sslrootcert (or PGSSLMODE/PGSSLROOTCERT) as libpq reads them.
fn database(flag: Option<String>, file: Option<String>) -> Result<Target, ConfigError> {
    let url = flag
        .filter(|u| is_set(u))
        .or(file.filter(|u| is_set(u)))
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| is_set(u)))
        .ok_or(ConfigError::NoDatabase)?;
    connection("database-url", &url)
}

/// Parses the connection string given to `--flag`.
fn connection(flag: &'static str, url: &str) -> Result<Target, ConfigError> {
    Target::from_str(url).map_err(|source| ConfigError::Database { flag, source })
}

fn duration(
    flag: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(&v).map_err(|e| ConfigError::Value {
            flag,
            value: v,
            reason: e.to_string(),
        }),
    }
}

/// A count from 1 to [`MAX_COUNT`] (queues are allocated up front, and a
/// huge one would abort the process, not fail with a message).
fn positive(
    flag: &'static str,
    value: Option<usize>,
    default: usize,
) -> Result<usize, ConfigError> {
    match value {
        Some(v) if v == 0 || v > MAX_COUNT => Err(ConfigError::Value {
            flag,
            value: v.to_string(),
            reason: format!("must be from 1 to {MAX_COUNT}"),
        }),
        v => Ok(v.unwrap_or(default)),
    }
}

const MAX_COUNT: usize = 1 << 20;

/// `--max-header-bytes`: hyper will not buffer less than 8 KiB (it panics
/// below), and a request head over 1 MiB is no browser's.
fn header_bytes(value: Option<usize>) -> Result<usize, ConfigError> {
    const RANGE: std::ops::RangeInclusive<usize> = 8192..=(1 << 20);
    match value {
        Some(v) if !RANGE.contains(&v) => Err(ConfigError::Value {
            flag: "max-header-bytes",
            value: v.to_string(),
            reason: format!("must be from {} to {}", RANGE.start(), RANGE.end()),
        }),
        v => Ok(v.unwrap_or(Limits::default().max_header_bytes)),
    }
}
/// The largest event cap: well under a WebSocket client's usual 16 MiB frame
/// limit, which a larger event would break.
pub const MAX_EVENT_BYTES: u32 = 8 << 20;

/// Flag (or env) values when given, else the file's, else empty.
fn list(flag: Vec<String>, file: Option<Vec<String>>) -> Vec<String> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag
    }
}

impl ServeArgs {
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let file = load_file(self.db.config.as_deref())?;
        let database = database(self.db.database_url, file.database_url)?;
        // Never DATABASE_URL: unset means "the same as the main connection".
        let listen_database = self
            .listen_database_url
            .filter(|u| is_set(u))
            .or(file.listen_database_url.filter(|u| is_set(u)))
            .map(|url| connection("listen-database-url", &url))
            .transpose()?;
        let listen_text = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen =
            listen_text
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Listen {
                    value: listen_text.clone(),
                    reason: e.to_string(),
                })?;
        let key = match (
            self.jwt_secret.or(file.jwt_secret),
            self.jwt_secret_file.or(file.jwt_secret_file),
            self.jwt_public_key.or(file.jwt_public_key),
        ) {
            (Some(secret), None, None) if secret.is_empty() => {
                return Err(ConfigError::EmptySecret)
            }
            (Some(secret), None, None) => KeySource::Secret(secret),
            (None, Some(path), None) => KeySource::SecretFile(path),
            (None, None, Some(path)) => KeySource::PublicKeyFile(path),
            (None, None, None) => return Err(ConfigError::NoKey),
            _ => return Err(ConfigError::TwoKeys),
        };
        let admin_claims = list(self.admin_claims, file.admin_claim)
            .iter()
            .map(|c| c.parse())
            .collect::<Result<Vec<AdminClaim>, _>>()?;
        let admin_claims = if admin_claims.is_empty() {
            vec![default_admin_claim()]
        } else {
            admin_claims
        };
        let auth = AuthConfig {
            key,
            issuer: self.jwt_issuer.or(file.jwt_issuer),
            audience: self.jwt_audience.or(file.jwt_audience),
            leeway: duration(
                "jwt-leeway",
                self.jwt_leeway.or(file.jwt_leeway),
                Duration::ZERO,
            )?,
            admin_claims,
        };
        let routes = Routes::parse(&list(self.routes, file.route))?;
        let retention = duration(
            "retention",
            self.retention.or(file.retention),
            DEFAULT_RETENTION,
        )?;
        if retention < Duration::from_secs(60) {
            return Err(ConfigError::Value {
                flag: "retention",
                value: humantime::format_duration(retention).to_string(),
                reason: "must be at least 1m".into(),
            });
        }
        let queues = QueueSizes {
            dashboard: positive(
                "dashboard-queue",
                self.dashboard_queue.or(file.dashboard_queue),
                DEFAULT_QUEUES.dashboard,
            )?,
            user: positive(
                "user-queue",
                self.user_queue.or(file.user_queue),
                DEFAULT_QUEUES.user,
            )?,
        };
        let pool_size = positive(
            "pool-size",
            self.pool_size.or(file.pool_size),
            DEFAULT_POOL_SIZE,
        )?;
        let defaults = Limits::default();
        let limits = Limits {
            max_connections: positive(
                "max-connections",
                self.max_connections.or(file.max_connections),
                defaults.max_connections,
            )?,
            max_per_user: positive(
                "max-sockets-per-user",
                self.max_sockets_per_user.or(file.max_sockets_per_user),
                defaults.max_per_user,
            )?,
            handshake_timeout: duration(
                "handshake-timeout",
                self.handshake_timeout.or(file.handshake_timeout),
                defaults.handshake_timeout,
            )?,
            max_client_message: positive(
                "max-client-message",
                self.max_client_message.or(file.max_client_message),
                defaults.max_client_message,
            )?,
            client_messages_per_second: positive(
                "client-rate",
                self.client_rate.or(file.client_rate).map(|r| r as usize),
                defaults.client_messages_per_second as usize,
            )? as u32,
            max_pending_handshakes: positive(
                "max-pending-handshakes",
                self.max_pending_handshakes.or(file.max_pending_handshakes),
                defaults.max_pending_handshakes,
            )?,
            max_pending_per_ip: positive(
                "max-pending-per-ip",
                self.max_pending_per_ip.or(file.max_pending_per_ip),
                defaults.max_pending_per_ip,
            )?,
            max_header_bytes: header_bytes(self.max_header_bytes.or(file.max_header_bytes))?,
        };
        let admin_query = self
            .admin_query
            .or(file.admin_query)
            .filter(|q| !q.trim().is_empty());
        if let Some(query) = &admin_query {
            if !query.contains("$1") {
                return Err(ConfigError::Value {
                    flag: "admin-query",
                    value: query.clone(),
                    reason: "must use $1 for the user id".into(),
                });
            }
        }
        Ok(ServeConfig {
            allowed_origins: list(self.allowed_origins, file.allowed_origin),
            admin_query,
            admin_cache: duration(
                "admin-cache",
                self.admin_cache.or(file.admin_cache),
                DEFAULT_ADMIN_CACHE,
            )?,
            limits,
            demo_api: false,
            database,
            listen_database,
            listen,
            auth,
            routes,
            retention,
            queues,
            pool_size,
        })
    }
}

impl std::fmt::Display for ServeConfig {
    /// The effective settings as TOML-like lines; no password, no secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "database = {:?}", self.database.to_string())?;
        let listen_database = self.listen_database.as_ref().unwrap_or(&self.database);
        writeln!(f, "listen_database = {:?}", listen_database.to_string())?;
        writeln!(f, "listen = \"{}\"", self.listen)?;
        match &self.auth.key {
            KeySource::Secret(_) => writeln!(f, "jwt_key = \"HS256 secret (redacted)\"")?,
            KeySource::SecretFile(path) => {
                writeln!(f, "jwt_secret_file = {:?}", path.display().to_string())?
            }
            KeySource::PublicKeyFile(path) => {
                writeln!(f, "jwt_public_key = {:?}", path.display().to_string())?
            }
        }
        writeln!(
            f,
            "jwt_issuer = {:?}",
            self.auth.issuer.as_deref().unwrap_or("")
        )?;
        writeln!(
            f,
            "jwt_audience = {:?}",
            self.auth.audience.as_deref().unwrap_or("")
        )?;
        writeln!(
            f,
            "jwt_leeway = \"{}\"",
            humantime::format_duration(self.auth.leeway)
        )?;
        let claims: Vec<String> = self
            .auth
            .admin_claims
            .iter()
            .map(|c| format!("{:?}", format!("{}={}", c.name, c.value)))
            .collect();
        writeln!(f, "admin_claim = [{}]", claims.join(", "))?;
        let routes: Vec<String> = self
            .routes
            .to_string()
            .split(' ')
            .map(|r| format!("{r:?}"))
            .collect();
        writeln!(f, "route = [{}]", routes.join(", "))?;
        writeln!(
            f,
            "retention = \"{}\"",
            humantime::format_duration(self.retention)
        )?;
        writeln!(f, "dashboard_queue = {}", self.queues.dashboard)?;
        writeln!(f, "user_queue = {}", self.queues.user)?;
        writeln!(f, "pool_size = {}", self.pool_size)?;
        let origins: Vec<String> = self
            .allowed_origins
            .iter()
            .map(|o| format!("{o:?}"))
            .collect();
        writeln!(f, "allowed_origin = [{}]", origins.join(", "))?;
        writeln!(
            f,
            "admin_query = {:?}",
            self.admin_query.as_deref().unwrap_or("")
        )?;
        writeln!(
            f,
            "admin_cache = \"{}\"",
            humantime::format_duration(self.admin_cache)
        )?;
        let l = &self.limits;
        writeln!(f, "max_connections = {}", l.max_connections)?;
        writeln!(f, "max_sockets_per_user = {}", l.max_per_user)?;
        writeln!(
            f,
            "handshake_timeout = \"{}\"",
            humantime::format_duration(l.handshake_timeout)
        )?;
        writeln!(f, "max_client_message = {}", l.max_client_message)?;
        writeln!(f, "client_rate = {}", l.client_messages_per_second)?;
        writeln!(f, "max_pending_handshakes = {}", l.max_pending_handshakes)?;
        writeln!(f, "max_pending_per_ip = {}", l.max_pending_per_ip)?;
        write!(f, "max_header_bytes = {}", l.max_header_bytes)
    }
}

/// What `install` needs, validated.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    pub database: Target,
    pub demo: bool,
    pub watch: Vec<WatchSpec>,
    /// The role that owns the schema and the capture functions.
    pub owner: String,
    /// Payloads larger than this are logged as a stub.
    pub max_event_bytes: u32,
}

impl InstallConfig {
    /// The schema alone, with the default owner and event cap.
    pub fn new(database: Target) -> InstallConfig {
        InstallConfig {
            database,
            demo: false,
            watch: Vec::new(),
            owner: DEFAULT_OWNER.to_owned(),
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

impl InstallArgs {
    pub fn resolve(self) -> Result<InstallConfig, ConfigError> {
        let file = load_file(self.db.config.as_deref())?;
        let database = database(self.db.database_url, file.database_url)?;
        let watch = self
            .watch
            .iter()
            .map(|spec| spec.parse())
            .collect::<Result<_, _>>()?;
        let owner = self.owner.unwrap_or_else(|| DEFAULT_OWNER.to_owned());
        if owner.trim().is_empty() || owner.len() > 63 {
            return Err(ConfigError::Value {
                flag: "owner",
                value: owner,
                reason: "must be a role name of 1 to 63 bytes".into(),
            });
        }
        let max_event_bytes = self.max_event_size.unwrap_or(DEFAULT_MAX_EVENT_BYTES);
        if !(64..=MAX_EVENT_BYTES).contains(&max_event_bytes) {
            return Err(ConfigError::Value {
                flag: "max-event-size",
                value: max_event_bytes.to_string(),
                reason: format!("must be from 64 to {MAX_EVENT_BYTES} bytes"),
            });
        }
        Ok(InstallConfig {
            database,
            demo: self.demo,
            watch,
            owner,
            max_event_bytes,
        })
    }
}

impl TokenArgs {
    /// The secret to sign with: flag or env, else the config file.
    pub fn secret(&self) -> Result<String, ConfigError> {
        let file = load_file(self.config.as_deref())?;
        match self.jwt_secret.clone().or(file.jwt_secret) {
            Some(s) if s.is_empty() => Err(ConfigError::EmptySecret),
            Some(s) => Ok(s),
            None => Err(ConfigError::Value {
                flag: "jwt-secret",
                value: String::new(),
                reason: "required to sign a token".into(),
            }),
        }
    }
}
