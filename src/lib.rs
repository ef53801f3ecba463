//! pgrelay: PostgreSQL row changes -> live WebSocket messages.
//!
//! # Layout
//!
//! ```text
//! INSERT/UPDATE on a watched table
//!   -> capture trigger (triggers/)  pgrelay.events row + pg_notify, ids in commit order
//!   -> listen    one dedicated LISTEN connection; reconnects, catches up from pgrelay.events,
//!                probes that it hears other connections' NOTIFYs, re-reads the log every heartbeat
//!   -> parse     NOTIFY payload -> the event id it wakes us for (pure)
//!   -> route     Event -> audiences: dashboard, user:<id> (pure)
//!   -> hub       audience -> subscribers; each event serialised once, bounded rings
//!   -> session   one task per WebSocket: hello, replay, live, refresh, close codes
//! ```
//!
//! Beside the flow: `wire` (the WebSocket contract: endpoints, resume
//! parameters, `hello`/`event`/`reset` frames, client messages, close codes;
//! pure), `shared` (what the server and every session share), `server` (HTTP,
//! upgrade, auth at the door), `auth` (JWT,
//! pure), `config` (flags, env, TOML -> typed config), `pgconn` (a database
//! target: settings + sslmode/sslrootcert, the one `connect`), `db` (the read
//! pool, its reads of the log under a server-side statement timeout, and
//! `LogReader`, the one paging read of the log for the listener (on its own
//! connection, bounded by a client-side timeout only) and replays), `replays` (caps
//! on replays running at once), `admission` (origin, socket and pre-auth
//! caps, admin query), `install` (embedded SQL, `--watch` specs), `retention`
//! (pruning), `metrics`, `coalesce` (one write per batch of frames), `tail`,
//! `cluster` (throwaway PostgreSQL for `demo` and tests), `demo`.
//!
//! Invariants: data flows one way; the listener never waits on a socket;
//! nothing downstream of the listener touches PostgreSQL except replay reads
//! and the admin query (at upgrade and on refresh) through the pool; every
//! spawned task is tracked and ends on the one cancellation token.

pub mod admission;
pub mod auth;
pub mod coalesce;
pub mod config;
pub mod db;
pub mod hub;
pub mod install;
pub mod listen;
pub mod metrics;
pub mod parse;
pub mod pgconn;
pub mod replays;
pub mod retention;
pub mod route;
pub mod server;
pub mod session;
pub mod shared;
pub mod wire;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

pub use crate::session::SHUTDOWN_GRACE;
pub use crate::shared::{ExtraRoutes, Status};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{AdminLookup, Slots};
use crate::auth::{KeyError, Verifier};
use crate::config::ServeConfig;
use crate::db::{Db, DbError};
use crate::hub::Hub;
use crate::listen::Listener;
use crate::metrics::Metrics;
use crate::replays::ReplayLimits;
use crate::shared::Shared;

/// WebSocket ping interval; a peer that has not answered the previous ping
/// by the next one is dropped.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("cannot reach the database: {}", database_line(.0))]
    Database(#[source] DbError),
    #[error("pgrelay is not installed in this database: run `pgrelay install` first")]
    NotInstalled,
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// [`StartError::Database`]'s one line: the server's own message, or the
/// failure with its causes, for a connection the pool could not make.
fn database_line(e: &DbError) -> String {
    match e {
        DbError::Pool(deadpool_postgres::PoolError::Backend(e)) => db::db_message(e),
        other => other.to_string(),
    }
}

/// What a program running the relay adds beyond its [`ServeConfig`].
pub struct StartOptions {
    /// WebSocket ping interval (tests use a short one).
    pub ping_interval: Duration,
    /// The program's own plain-HTTP routes (`pgrelay demo`'s buttons).
    pub extra_routes: Option<Arc<dyn ExtraRoutes>>,
}

impl Default for StartOptions {
    fn default() -> StartOptions {
        StartOptions {
            ping_interval: PING_INTERVAL,
            extra_routes: None,
        }
    }
}

/// A running relay: the listener, the server and retention, sharing one
/// shutdown token and task tracker.
pub struct Relay {
    addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    status: Arc<Status>,
    shared: Arc<Shared>,
}

impl Relay {
    /// Checks the key and the database, binds, and starts every task. Any
    /// problem is reported before a port is bound or a socket accepted.
    pub async fn start(config: ServeConfig) -> Result<Relay, StartError> {
        Self::start_with(config, StartOptions::default()).await
    }

    /// [`Relay::start`] with what a program adds beyond the configuration.
    pub async fn start_with(
        mut config: ServeConfig,
        options: StartOptions,
    ) -> Result<Relay, StartError> {
        db::harden(&mut config.database);
        let mut listen_database = config
            .listen_database
            .clone()
            .unwrap_or_else(|| config.database.clone());
        db::harden(&mut listen_database);
        let verifier = Verifier::new(&config.auth)?;
        let db =
            Db::new(config.database.clone(), config.pool_size).map_err(StartError::Database)?;
        let info = db.log_info().await.map_err(|e| match e {
            DbError::NotInstalled => StartError::NotInstalled,
            other => StartError::Database(other),
        })?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());
        let status = Arc::new(Status::default());
        status.set_epoch(&info.epoch);
        let hub = Hub::new(config.queues);
        // Sockets may connect before the listener is up: their `hello` must
        // already name the log's newest id, which the listener starts from.
        hub.advance(info.max_id);
        tracker.spawn(
            Listener {
                config: listen_database,
                routes: config.routes.clone(),
                db: db.clone(),
                hub: Arc::clone(&hub),
                status: Arc::clone(&status),
                metrics: Arc::clone(&metrics),
                shutdown: shutdown.clone(),
                tracker: tracker.clone(),
            }
            .run(),
        );
        let prune_every =
            (config.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tracker.spawn(retention::run(
            db.clone(),
            config.retention,
            prune_every,
            shutdown.clone(),
        ));
        let admin_lookup = config
            .admin_query
            .clone()
            .map(|query| AdminLookup::new(db.clone(), query, config.admin_cache));
        let shared = Arc::new(Shared {
            verifier: RwLock::new(Arc::new(verifier)),
            auth: config.auth.clone(),
            slots: Slots::new(&config.limits),
            limits: config.limits.clone(),
            allowed_origins: config.allowed_origins.clone(),
            admin_lookup,
            hub,
            db,
            // Two pool connections stay free for admin checks and the probe.
            replays: ReplayLimits::new(config.pool_size.saturating_sub(2)),
            routes: config.routes,
            metrics,
            status: Arc::clone(&status),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            ping_interval: options.ping_interval,
            lingering: Arc::new(tokio::sync::Semaphore::new(server::MAX_LINGERING)),
            leeway: config.auth.leeway,
            extra_routes: options.extra_routes,
        });
        tracker.spawn(server::serve(listener, Arc::clone(&shared)));
        tracing::info!(%addr, "serving");
        Ok(Relay {
            addr,
            shutdown,
            tracker,
            status,
            shared,
        })
    }

    /// The address the server is bound to (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether LISTEN is active and caught up (what `/readyz` says).
    pub fn is_ready(&self) -> bool {
        self.status.is_ready()
    }

    /// Re-reads the JWT key files (SIGHUP): new sockets and refreshes use the
    /// new keys, open sockets stay open. On error the old keys stay in force.
    pub fn reload_keys(&self) -> Result<(), KeyError> {
        self.shared.reload_keys()
    }

    /// Stops accepting, closes every socket with 1001, and waits for the
    /// tasks, at most [`SHUTDOWN_GRACE`]. Returns whether all tasks ended.
    pub async fn shutdown(self) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_ok()
    }
}
