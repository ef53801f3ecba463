//! Command line (clap), `PGRELAY_*` environment variables and an optional TOML
//! file -> validated, typed configuration.
//!
//! Precedence, highest first: flag, environment variable, `--config` file,
//! built-in default (`DATABASE_URL` is honoured after the file). Each `serve`
//! option is one field of [`ServeOptions`]: clap reads it from the flag or its
//! variable, serde from the file, one merge layers the two, and the same
//! struct prints `--print-config`. Defaults and checks live in one place,
//! [`ServeArgs::resolve`]. Everything is parsed and checked here, before any
//! port is bound or any connection made, and a problem is one [`ConfigError`]
//! line that names the flag (or, for the file, its path and line). Nothing
//! here touches the network.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::admission::Limits;
use crate::auth::{AdminClaim, AuthConfig, KeySource};
use crate::hub::QueueSizes;
use crate::install::{InstallConfig, WatchSpecError, DEFAULT_MAX_EVENT_BYTES, DEFAULT_OWNER};
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
    #[command(flatten)]
    pub options: ServeOptions,
    /// Print the resolved configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Declares the options struct once and derives from that one declaration
/// what a derive cannot: [`ServeOptions::or`], the field-by-field merge that
/// puts a higher source over a lower one, and [`ServeOptions::KEYS`].
macro_rules! options {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident: $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $name {
            /// Every TOML key, in declaration order.
            #[cfg(test)]
            const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// `self`'s value for each option that `self` sets, else `lower`'s.
            fn or(mut self, lower: $name) -> $name {
                $( Unset::or(&mut self.$field, lower.$field); )*
                self
            }
        }
    };
}

options! {
    /// Every `serve` option, declared once: the field is the flag (`--long-name`),
    /// `env` its variable, the field name its `--config` key, and the same
    /// struct, filled from the resolved [`ServeConfig`], prints `--print-config`.
    /// Every field is unset-able (`Option` or an empty list) so that sources can
    /// be layered with [`ServeOptions::or`]; defaults and checks are applied once,
    /// in [`ServeArgs::resolve`].
    #[derive(Debug, Default, Args, Deserialize, Serialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct ServeOptions {
        /// From the file only: the flag is [`DatabaseArgs`]'s, shared with `install`.
        /// Printed resolved, as the connection the relay makes.
        #[arg(skip)]
        #[serde(rename(serialize = "database"))]
        pub database_url: Option<String>,
        /// Connection string for the LISTEN connection alone, when reads go through
        /// a transaction-mode pooler: point this at the database directly or at a
        /// session-mode pool [default: --database-url].
        #[arg(long, env = "PGRELAY_LISTEN_DATABASE_URL", hide_env_values = true)]
        #[serde(rename(serialize = "listen_database"))]
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
        #[arg(long, env = "PGRELAY_JWT_LEEWAY", value_parser = humantime::parse_duration)]
        #[serde(with = "duration")]
        pub jwt_leeway: Option<Duration>,
        /// Claim that makes a super admin, NAME=VALUE; repeatable [default: role=super_admin].
        #[arg(long, env = "PGRELAY_ADMIN_CLAIMS", value_delimiter = ';')]
        pub admin_claim: Vec<String>,
        /// CHANNEL=AUDIENCE[,AUDIENCE...], AUDIENCE being dashboard or user:FIELD; repeatable
        /// [default: the demo routes].
        #[arg(long, env = "PGRELAY_ROUTES", value_delimiter = ';')]
        pub route: Vec<String>,
        /// NAME=CHANNEL:FIELD[,CHANNEL:FIELD...]: a stream served at /ws/NAME/KEY/ and
        /// /sse/NAME/KEY/, carrying the events whose FIELD equals KEY; repeatable
        /// [default, with the default routes: businesses=business_events:id,reservation_events:business_id].
        #[arg(long, env = "PGRELAY_STREAMS", value_delimiter = ';')]
        pub stream: Vec<String>,
        /// NAME=SQL: who besides super admins may open a key of stream NAME, e.g.
        /// "businesses=SELECT EXISTS (SELECT 1 FROM businesses WHERE id = $2 AND owner_id = $1)"
        /// ($1: the user id, $2: the key); repeatable. Without one, a stream is for super
        /// admins only [default, for the default stream: that query].
        #[arg(long)]
        pub stream_query: Vec<String>,
        /// Frames a stream key's socket may fall behind before it is closed with 4008 [default: 256].
        #[arg(long, env = "PGRELAY_STREAM_QUEUE")]
        pub stream_queue: Option<usize>,
        /// Cookie an /sse/ request may carry its token in (for EventSource, which
        /// cannot set headers) [default: none: header or ?token= only].
        #[arg(long, env = "PGRELAY_TOKEN_COOKIE")]
        pub token_cookie: Option<String>,
        /// Events older than this are pruned from pgrelay.events [default: 24h].
        #[arg(long, env = "PGRELAY_RETENTION", value_parser = humantime::parse_duration)]
        #[serde(with = "duration")]
        pub retention: Option<Duration>,
        /// Frames a dashboard socket may fall behind before it is closed with 4008 [default: 4096].
        #[arg(long, env = "PGRELAY_DASHBOARD_QUEUE")]
        pub dashboard_queue: Option<usize>,
        /// Frames a notifications socket may fall behind before it is closed with 4008 [default: 64].
        #[arg(long, env = "PGRELAY_USER_QUEUE")]
        pub user_queue: Option<usize>,
        /// Connections in the read pool (replay, large events) [default: 8].
        #[arg(long, env = "PGRELAY_POOL_SIZE")]
        pub pool_size: Option<usize>,
        /// Memory for the newest events, in MiB: a resume whose cursor is among them is
        /// replayed from memory, without a query or a replay turn; 0 turns it off
        /// [default: 32].
        #[arg(long, env = "PGRELAY_REPLAY_MEMORY")]
        pub replay_memory: Option<usize>,
        /// Browser origin allowed to open sockets, exactly as sent in `Origin`; repeatable
        /// [default: any].
        #[arg(long, env = "PGRELAY_ALLOWED_ORIGINS", value_delimiter = ';')]
        pub allowed_origin: Vec<String>,
        /// SQL deciding super admin for tokens without an admin claim, e.g.
        /// "SELECT role = 'super_admin' FROM users WHERE id = $1" ($1: the user id).
        #[arg(long, env = "PGRELAY_ADMIN_QUERY")]
        pub admin_query: Option<String>,
        /// How long an --admin-query answer is cached [default: 30s].
        #[arg(long, env = "PGRELAY_ADMIN_CACHE", value_parser = humantime::parse_duration)]
        #[serde(with = "duration")]
        pub admin_cache: Option<Duration>,
        /// Open sockets in total; more are refused with 503 [default: 50000].
        #[arg(long, env = "PGRELAY_MAX_CONNECTIONS")]
        pub max_connections: Option<usize>,
        /// Open sockets per user; more are refused with 429 [default: 32].
        #[arg(long, env = "PGRELAY_MAX_SOCKETS_PER_USER")]
        pub max_sockets_per_user: Option<usize>,
        /// Time a client has to send its request headers [default: 10s].
        #[arg(long, env = "PGRELAY_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
        #[serde(with = "duration")]
        pub handshake_timeout: Option<Duration>,
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
    }
}

/// An option a source leaves unset: `None`, or no values at all for a
/// repeatable one (a list is taken whole from one source, never appended).
trait Unset {
    fn or(&mut self, lower: Self);
}

impl<T> Unset for Option<T> {
    fn or(&mut self, lower: Self) {
        if self.is_none() {
            *self = lower;
        }
    }
}

impl<T> Unset for Vec<T> {
    fn or(&mut self, lower: Self) {
        if self.is_empty() {
            *self = lower;
        }
    }
}

/// Durations in the file as on the command line ("90s", "1h 30m"), with
/// humantime, the flags' parser too. Twelve lines here rather than the
/// humantime-serde crate: a dependency for this is not worth its audit.
mod duration {
    use std::time::Duration;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| D::Error::custom(format!("{text:?}: {e}")))
    }

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
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
    /// Stream URL, e.g. ws://127.0.0.1:8080/ws/notifications/, or
    /// http://127.0.0.1:8080/sse/businesses/42/ with --transport sse (the
    /// scheme and a leading /ws/ or /sse/ follow --transport).
    #[arg(long)]
    pub url: String,
    /// How to read the stream: websocket, or sse (Server-Sent Events, for
    /// networks whose proxies break WebSockets). The same output and the same
    /// lossless resume either way.
    #[arg(
        long,
        default_value = "websocket",
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::PossibleValuesParser::new(["websocket", "sse"]),
            |s: String| if s == "sse" {
                crate::wire::Transport::ServerSentEvents
            } else {
                crate::wire::Transport::WebSocket
            },
        )
    )]
    pub transport: crate::wire::Transport,
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
    #[error("--jwt-secret: \"(redacted)\" is what --print-config prints in place of the secret: give the secret itself")]
    RedactedSecret,
    #[error("--{} {value:?}: {reason}", flag.replace('_', "-"))]
    Value {
        /// The flag, or its option's field name (underscores for dashes).
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("--route: {0}")]
    Route(#[source] crate::route::RouteError),
    #[error("--stream: {0}")]
    Stream(#[source] crate::route::RouteError),
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
    /// (stream name, `--stream-query`) pairs; a stream without one is for
    /// super admins only.
    pub stream_queries: Vec<(String, String)>,
    /// `--token-cookie`: the cookie an `/sse/` request may carry its token in.
    pub token_cookie: Option<String>,
    pub retention: Duration,
    pub queues: QueueSizes,
    pub pool_size: usize,
    /// `--replay-memory`, in bytes (0: off).
    pub replay_memory: usize,
    pub allowed_origins: Vec<String>,
    pub admin_query: Option<String>,
    pub admin_cache: Duration,
    pub limits: Limits,
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
            stream_queries: vec![default_stream_query()],
            token_cookie: None,
            retention: DEFAULT_RETENTION,
            queues: DEFAULT_QUEUES,
            pool_size: DEFAULT_POOL_SIZE,
            replay_memory: DEFAULT_REPLAY_MEMORY_MIB << 20,
            allowed_origins: Vec::new(),
            admin_query: None,
            admin_cache: DEFAULT_ADMIN_CACHE,
            limits: Limits::default(),
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_QUEUES: QueueSizes = QueueSizes {
    dashboard: 4096,
    user: 64,
    stream: 256,
};
pub const DEFAULT_POOL_SIZE: usize = 8;
/// `--replay-memory`'s default, in MiB.
pub const DEFAULT_REPLAY_MEMORY_MIB: usize = 32;
/// The largest `--replay-memory`, in MiB (64 GiB).
const MAX_REPLAY_MEMORY_MIB: usize = 64 << 10;
pub const DEFAULT_ADMIN_CACHE: Duration = Duration::from_secs(30);

fn default_admin_claim() -> AdminClaim {
    AdminClaim {
        name: "role".into(),
        value: "super_admin".into(),
    }
}

/// The `--config` file, as options: its keys are the long options with
/// underscores, and any other key is an error naming its line.
fn load_file(path: Option<&Path>) -> Result<ServeOptions, ConfigError> {
    let Some(path) = path else {
        return Ok(ServeOptions::default());
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

/// Resolves the connection string: the one flag, env or file gave, else
/// DATABASE_URL; its sslmode/sslrootcert (or PGSSLMODE/PGSSLROOTCERT) as
/// libpq reads them.
fn database(url: Option<String>) -> Result<Target, ConfigError> {
    let url = url
        .filter(|u| is_set(u))
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| is_set(u)))
        .ok_or(ConfigError::NoDatabase)?;
    connection("database-url", &url)
}

/// Parses the connection string given to `--flag`.
fn connection(flag: &'static str, url: &str) -> Result<Target, ConfigError> {
    Target::from_str(url).map_err(|source| ConfigError::Database { flag, source })
}

/// What `--print-config` prints in place of an HS256 secret.
const REDACTED: &str = "(redacted)";

/// A duration within `range`, else a one-line error naming the option.
fn within(
    option: &'static str,
    value: Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> Result<Duration, ConfigError> {
    if range.contains(&value) {
        return Ok(value);
    }
    let show = |d: &Duration| humantime::format_duration(*d).to_string();
    Err(ConfigError::Value {
        flag: option,
        value: show(&value),
        reason: format!(
            "must be from {} to {}",
            show(range.start()),
            show(range.end())
        ),
    })
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

/// The largest `--max-event-size`: what pgrelay delivers whole.
const MAX_EVENT_BYTES: u32 = crate::db::MAX_DELIVERED_EVENT as u32;

impl ServeArgs {
    /// Flag or variable (clap), over the `--config` file, over the defaults;
    /// then every check, in one pass.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let mut flags = self.options;
        // One flag for both commands, so it is not in ServeOptions' clap half;
        // empty (`PGRELAY_DATABASE_URL=` from a compose file) counts as unset.
        flags.database_url = self.db.database_url.filter(|u| is_set(u));
        flags.listen_database_url = flags.listen_database_url.filter(|u| is_set(u));
        let o = flags.or(load_file(self.db.config.as_deref())?);

        let database = database(o.database_url)?;
        // Never DATABASE_URL: unset means "the same as the main connection".
        let listen_database = o
            .listen_database_url
            .filter(|u| is_set(u))
            .map(|url| connection("listen-database-url", &url))
            .transpose()?;
        let listen_text = o.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen =
            listen_text
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Listen {
                    value: listen_text.clone(),
                    reason: e.to_string(),
                })?;
        let key = match (o.jwt_secret, o.jwt_secret_file, o.jwt_public_key) {
            (Some(secret), None, None) if secret.is_empty() => {
                return Err(ConfigError::EmptySecret)
            }
            // What --print-config shows in its place: a printed config saved
            // as a file must not start a relay whose every token fails.
            (Some(secret), None, None) if secret == REDACTED => {
                return Err(ConfigError::RedactedSecret)
            }
            (Some(secret), None, None) => KeySource::Secret(secret),
            (None, Some(path), None) => KeySource::SecretFile(path),
            (None, None, Some(path)) => KeySource::PublicKeyFile(path),
            (None, None, None) => return Err(ConfigError::NoKey),
            _ => return Err(ConfigError::TwoKeys),
        };
        let admin_claims = o
            .admin_claim
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
            issuer: o.jwt_issuer,
            audience: o.jwt_audience,
            leeway: within(
                "jwt_leeway",
                o.jwt_leeway.unwrap_or(Duration::ZERO),
                Duration::ZERO..=Duration::from_secs(3600),
            )?,
            admin_claims,
        };
        let defaults_in_use = o.route.is_empty() && o.stream.is_empty();
        let routes = Routes::parse(&o.route)
            .map_err(ConfigError::Route)?
            .with_streams(&o.stream)
            .map_err(ConfigError::Stream)?;
        let stream_queries = stream_queries(&routes, &o.stream_query, defaults_in_use)?;
        let token_cookie = o.token_cookie.filter(|c| !c.trim().is_empty());
        if let Some(cookie) = &token_cookie {
            if !cookie
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError::Value {
                    flag: "token-cookie",
                    value: cookie.clone(),
                    reason: "must be a cookie name (letters, digits, - _ .)".into(),
                });
            }
        }
        let retention = within(
            "retention",
            o.retention.unwrap_or(DEFAULT_RETENTION),
            Duration::from_secs(60)..=Duration::from_secs(366 * 24 * 3600),
        )?;
        // A count, checked and reported under its option's own name.
        macro_rules! count {
            ($option:ident, $default:expr) => {
                positive(stringify!($option), o.$option, $default)?
            };
        }
        let queues = QueueSizes {
            dashboard: count!(dashboard_queue, DEFAULT_QUEUES.dashboard),
            user: count!(user_queue, DEFAULT_QUEUES.user),
            stream: count!(stream_queue, DEFAULT_QUEUES.stream),
        };
        let pool_size = count!(pool_size, DEFAULT_POOL_SIZE);
        let replay_memory = match o.replay_memory {
            Some(mib) if mib > MAX_REPLAY_MEMORY_MIB => {
                return Err(ConfigError::Value {
                    flag: "replay-memory",
                    value: mib.to_string(),
                    reason: format!("must be from 0 to {MAX_REPLAY_MEMORY_MIB} (MiB)"),
                })
            }
            mib => mib.unwrap_or(DEFAULT_REPLAY_MEMORY_MIB) << 20,
        };
        let defaults = Limits::default();
        let limits = Limits {
            max_connections: count!(max_connections, defaults.max_connections),
            max_per_user: count!(max_sockets_per_user, defaults.max_per_user),
            handshake_timeout: within(
                "handshake_timeout",
                o.handshake_timeout.unwrap_or(defaults.handshake_timeout),
                Duration::from_millis(100)..=Duration::from_secs(300),
            )?,
            max_client_message: count!(max_client_message, defaults.max_client_message),
            client_messages_per_second: positive(
                "client_rate",
                o.client_rate.map(|r| r as usize),
                defaults.client_messages_per_second as usize,
            )? as u32,
            max_pending_handshakes: count!(max_pending_handshakes, defaults.max_pending_handshakes),
            max_pending_per_ip: count!(max_pending_per_ip, defaults.max_pending_per_ip),
            max_header_bytes: header_bytes(o.max_header_bytes)?,
        };
        let admin_query = o.admin_query.filter(|q| !q.trim().is_empty());
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
            allowed_origins: o.allowed_origin,
            admin_query,
            admin_cache: within(
                "admin_cache",
                o.admin_cache.unwrap_or(DEFAULT_ADMIN_CACHE),
                Duration::ZERO..=Duration::from_secs(3600),
            )?,
            limits,
            database,
            listen_database,
            listen,
            auth,
            routes,
            stream_queries,
            token_cookie,
            retention,
            queues,
            pool_size,
            replay_memory,
        })
    }
}

/// `--stream-query NAME=SQL` values, one per stream at most, each naming a
/// configured stream; the demo stream's query when the defaults are in use
/// and no value names it.
fn stream_queries(
    routes: &Routes,
    specs: &[String],
    defaults_in_use: bool,
) -> Result<Vec<(String, String)>, ConfigError> {
    let bad = |spec: &String, reason: &str| ConfigError::Value {
        flag: "stream-query",
        value: spec.clone(),
        reason: reason.into(),
    };
    let mut queries: Vec<(String, String)> = Vec::new();
    for spec in specs {
        let (name, sql) = spec
            .split_once('=')
            .ok_or_else(|| bad(spec, "must be NAME=SQL"))?;
        let (name, sql) = (name.trim(), sql.trim());
        if !routes.streams().iter().any(|s| s.name == name) {
            return Err(bad(spec, "names no configured --stream"));
        }
        if sql.is_empty() {
            return Err(bad(spec, "must be NAME=SQL"));
        }
        if queries.iter().any(|(n, _)| n == name) {
            return Err(bad(spec, "a second query for the same stream"));
        }
        queries.push((name.to_owned(), sql.to_owned()));
    }
    if defaults_in_use && queries.is_empty() {
        queries.push(default_stream_query());
    }
    Ok(queries)
}

/// Who may open `/ws/businesses/{id}/` in the demo domain: its owner.
pub fn default_stream_query() -> (String, String) {
    (
        "businesses".to_owned(),
        "SELECT EXISTS (SELECT 1 FROM businesses WHERE id = $2 AND owner_id = $1)".to_owned(),
    )
}

impl ServeConfig {
    /// The effective settings as options, every one set: what `--print-config`
    /// shows. Connection strings are the resolved targets (no password) and
    /// an HS256 secret is redacted. No `..Default::default()`: a new option
    /// does not compile until it is printed.
    fn options(&self) -> ServeOptions {
        let (mut jwt_secret, mut jwt_secret_file, mut jwt_public_key) = (None, None, None);
        match &self.auth.key {
            KeySource::Secret(_) => jwt_secret = Some(REDACTED.to_owned()),
            KeySource::SecretFile(path) => jwt_secret_file = Some(path.clone()),
            KeySource::PublicKeyFile(path) => jwt_public_key = Some(path.clone()),
        }
        let listen_database = self.listen_database.as_ref().unwrap_or(&self.database);
        let l = &self.limits;
        ServeOptions {
            database_url: Some(self.database.to_string()),
            listen_database_url: Some(listen_database.to_string()),
            listen: Some(self.listen.to_string()),
            jwt_secret,
            jwt_secret_file,
            jwt_public_key,
            jwt_issuer: self.auth.issuer.clone(),
            jwt_audience: self.auth.audience.clone(),
            jwt_leeway: Some(self.auth.leeway),
            admin_claim: (self.auth.admin_claims.iter())
                .map(|c| format!("{}={}", c.name, c.value))
                .collect(),
            route: self
                .routes
                .to_string()
                .split(' ')
                .map(str::to_owned)
                .collect(),
            stream: self
                .routes
                .streams()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            stream_query: (self.stream_queries.iter())
                .map(|(name, sql)| format!("{name}={sql}"))
                .collect(),
            stream_queue: Some(self.queues.stream),
            token_cookie: self.token_cookie.clone(),
            retention: Some(self.retention),
            dashboard_queue: Some(self.queues.dashboard),
            user_queue: Some(self.queues.user),
            pool_size: Some(self.pool_size),
            replay_memory: Some(self.replay_memory >> 20),
            allowed_origin: self.allowed_origins.clone(),
            admin_query: self.admin_query.clone(),
            admin_cache: Some(self.admin_cache),
            max_connections: Some(l.max_connections),
            max_sockets_per_user: Some(l.max_per_user),
            handshake_timeout: Some(l.handshake_timeout),
            max_client_message: Some(l.max_client_message),
            client_rate: Some(l.client_messages_per_second),
            max_pending_handshakes: Some(l.max_pending_handshakes),
            max_pending_per_ip: Some(l.max_pending_per_ip),
            max_header_bytes: Some(l.max_header_bytes),
        }
    }
}

impl std::fmt::Display for ServeConfig {
    /// The effective settings as TOML, `key = value` lines (unset ones left
    /// out); no password, no secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = toml::to_string(&self.options()).map_err(|_| std::fmt::Error)?;
        f.write_str(text.trim_end())
    }
}

impl InstallArgs {
    pub fn resolve(self) -> Result<InstallConfig, ConfigError> {
        let file = load_file(self.db.config.as_deref())?;
        let database = database(
            (self.db.database_url)
                .filter(|u| is_set(u))
                .or(file.database_url),
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let argv = ["pgrelay", "serve", "--database-url", "postgres://u:pw@h/d"];
        match Cli::try_parse_from(argv.iter().chain(args)) {
            Ok(Cli {
                command: Command::Serve(args),
            }) => *args,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn a_source_sets_an_option_whole_or_leaves_it_to_the_next() {
        let flags = serve(&["--listen", "127.0.0.1:1", "--route", "a=dashboard"]).options;
        let file: ServeOptions = toml::from_str(
            "listen = \"127.0.0.1:2\"\nroute = [\"b=dashboard\", \"c=dashboard\"]\n\
             retention = \"2h\"\nallowed_origin = [\"https://x\"]\n",
        )
        .expect("file");
        let o = flags.or(file);
        assert_eq!(o.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(o.route, ["a=dashboard"], "lists are not appended");
        assert_eq!(o.retention, Some(Duration::from_secs(7200)));
        assert_eq!(o.allowed_origin, ["https://x"]);
        assert_eq!(o.pool_size, None);
    }

    /// What `--print-config` prints reads back as the same configuration:
    /// durations, lists and counts survive the trip. (`database` and
    /// `listen_database` are the resolved targets, shown, not re-read.)
    #[test]
    fn printed_config_reads_back_as_the_same_config() {
        let config = serve(&[
            "--jwt-secret",
            "s",
            "--jwt-leeway",
            "1m 30s",
            "--admin-claim",
            "is_staff=true",
            "--route",
            "orders=dashboard,user:buyer_id",
            "--retention",
            "2h",
            "--pool-size",
            "3",
            "--replay-memory",
            "5",
            "--allowed-origin",
            "https://app.example",
            "--admin-query",
            "SELECT $1 = 'x\"y'",
            "--handshake-timeout",
            "250ms",
            "--client-rate",
            "7",
            "--stream",
            "buyers=orders:buyer_id",
            "--stream-query",
            "buyers=SELECT $1 = $2",
            "--token-cookie",
            "t",
        ])
        .resolve()
        .expect("resolves");
        let printed = config.to_string();
        assert!(!printed.contains("pw"), "a password is printed:\n{printed}");
        let as_file: String = (printed.lines())
            .filter(|l| !l.starts_with("database = ") && !l.starts_with("listen_database = "))
            .map(|l| l.replace(REDACTED, "the-secret"))
            .map(|l| format!("{l}\n"))
            .collect();
        let options: ServeOptions = toml::from_str(&as_file).expect("printed config parses");
        let again = ServeArgs {
            db: DatabaseArgs {
                database_url: Some("postgres://u:pw@h/d".into()),
                config: None,
            },
            options,
            print_config: false,
        }
        .resolve()
        .expect("printed config resolves");
        assert_eq!(again.to_string(), printed);
        assert_eq!(again.auth.leeway, Duration::from_secs(90));
        assert_eq!(again.replay_memory, 5 << 20);
        assert_eq!(again.limits.handshake_timeout, Duration::from_millis(250));
        assert_eq!(again.admin_query.as_deref(), Some("SELECT $1 = 'x\"y'"));
        assert_eq!(
            again.routes.streams()[0].to_string(),
            "buyers=orders:buyer_id"
        );
        assert_eq!(
            again.stream_queries,
            [("buyers".into(), "SELECT $1 = $2".into())]
        );
        // The defaults print whole, and read back with their stream.
        let defaults = serve(&["--jwt-secret", "s"]).resolve().expect("defaults");
        assert_eq!(defaults.routes.streams().len(), 1);
        assert_eq!(defaults.stream_queries, [default_stream_query()]);
    }

    #[test]
    fn stream_queries_name_a_configured_stream_once() {
        let resolve = |args: &[&str]| {
            serve(&[&["--jwt-secret", "s"], args].concat())
                .resolve()
                .map(|c| c.stream_queries)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            resolve(&["--route", "a=dashboard"]),
            Ok(vec![]),
            "own routes: no default stream"
        );
        assert!(resolve(&["--stream-query", "shops=SELECT true"])
            .expect_err("no such stream")
            .contains("names no configured --stream"));
        assert!(resolve(&["--stream-query", "businesses"]).is_err());
        assert!(resolve(&[
            "--stream-query",
            "businesses=SELECT true",
            "--stream-query",
            "businesses=SELECT false"
        ])
        .is_err());
        assert!(resolve(&["--token-cookie", "a;b"]).is_err());
        assert!(resolve(&["--stream", "dashboard=a:b"]).is_err());
    }

    #[test]
    fn malformed_durations_and_unknown_keys_name_the_file_line() {
        for (text, line, mentions) in [
            (
                "listen = \"127.0.0.1:1\"\nretention = \"2 fortnights\"\n",
                2,
                "fortnights",
            ),
            ("listen_adress = \"0.0.0.0:80\"\n", 1, "listen_adress"),
        ] {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("pgrelay.toml");
            std::fs::write(&path, text).expect("write");
            let err = load_file(Some(&path)).expect_err(text).to_string();
            assert!(
                err.starts_with(&format!("--config {}: line {line}: ", path.display())),
                "{err}"
            );
            assert!(err.contains(mentions), "{err}");
        }
    }

    /// config/pgrelay.toml documents every key, and no key that is gone.
    #[test]
    fn example_file_documents_every_key() {
        let example = include_str!("../config/pgrelay.toml");
        for key in ServeOptions::KEYS {
            assert!(
                example.contains(&format!("\n# {key} = ")),
                "config/pgrelay.toml lacks `# {key} = ...`"
            );
        }
        for line in example.lines() {
            if let Some((key, _)) = line.strip_prefix("# ").and_then(|l| l.split_once(" = ")) {
                if !key.contains(' ') {
                    assert!(ServeOptions::KEYS.contains(&key), "unknown key {key}");
                }
            }
        }
    }
}
