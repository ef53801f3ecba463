//! [`Shared`]: what every connection and socket shares (key, caps, hub,
//! pool, routes, metrics, liveness [`Status`], the shutdown token and task
//! tracker). Built once by `Relay::start`; the listener publishes `Status`,
//! the server reads the rest at the door, each session for its socket's
//! life. Its own module so that `server`, `session` and `listen` all use it
//! and none imports another (or the crate root) for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper::body::Bytes;
use hyper::{Method, Response};
use tokio_util::task::TaskTracker;

use crate::admission::{Limits, Lookup, Slots};
use crate::auth::{AuthConfig, Identity, KeyError, Verifier};
use crate::db::{Db, DbError};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::replays::ReplayLimits;
use crate::route::Routes;
use crate::shutdown::Shutdown;
use crate::wire::Endpoint;

/// Liveness facts the listener publishes and the server reads.
#[derive(Debug, Default)]
pub struct Status {
    /// LISTEN is active, caught up, and its last probe came back.
    pub ready: AtomicBool,
    epoch: RwLock<String>,
}

impl Status {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn epoch(&self) -> String {
        self.epoch.read().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn set_epoch(&self, epoch: &str) {
        if let Ok(mut e) = self.epoch.write() {
            epoch.clone_into(&mut e);
        }
    }
}

/// Plain-HTTP routes a program running the relay adds beside the relay's
/// own (`pgrelay demo`'s buttons). Asked only for a path the relay does not
/// serve, and for a POST only when it comes from the page's own origin.
pub trait ExtraRoutes: Send + Sync {
    /// The answer to `method path`, or `None` when the path is not this
    /// program's (404).
    fn answer(&self, method: &Method, path: &str) -> Option<BoxFuture<'static, Response<Body>>>;
}

/// Every HTTP response body pgrelay sends: a whole answer or an event stream.
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// What every connection and socket shares.
pub struct Shared {
    /// Swapped whole on SIGHUP (key rotation); sockets keep running.
    pub verifier: RwLock<Arc<Verifier>>,
    pub auth: AuthConfig,
    pub slots: Slots,
    pub limits: Limits,
    pub allowed_origins: Vec<String>,
    /// `--admin-query`.
    pub admin_lookup: Option<Lookup>,
    /// Each configured stream's `--stream-query`, by stream index (`None`:
    /// super admins only).
    pub stream_lookups: Vec<Option<Lookup>>,
    /// `--token-cookie`.
    pub token_cookie: Option<String>,
    pub hub: Arc<Hub>,
    pub db: Db,
    /// Caps on replays running at once (they share the read pool).
    pub replays: ReplayLimits,
    pub routes: Routes,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub shutdown: Shutdown,
    pub tracker: TaskTracker,
    pub ping_interval: Duration,
    pub leeway: Duration,
    /// Refused connections whose one-line answer is still draining (see
    /// `server`); more are closed without one.
    pub lingering: Arc<tokio::sync::Semaphore>,
    /// A program's own routes (`pgrelay demo` only); `None` for `serve`.
    pub extra_routes: Option<Arc<dyn ExtraRoutes>>,
}

impl Shared {
    /// The current token verifier.
    pub fn verifier(&self) -> Arc<Verifier> {
        Arc::clone(&self.verifier.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Re-reads the key files (rotation). On error the old keys stay.
    pub fn reload_keys(&self) -> Result<(), KeyError> {
        let fresh = Arc::new(Verifier::new(&self.auth)?);
        *self.verifier.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Whether this identity may open the dashboard: an admin claim, else
    /// `--admin-query` when configured. An error means "cannot tell", never yes.
    pub async fn is_admin(&self, identity: &Identity) -> Result<bool, DbError> {
        match &self.admin_lookup {
            _ if identity.admin => Ok(true),
            Some(lookup) => lookup.ask(&[&identity.user]).await,
            None => Ok(false),
        }
    }

    /// Whether this identity may open `endpoint`: anyone their own
    /// notifications, super admins the dashboard and every stream key, a user
    /// a stream key its `--stream-query` answers yes for. An error means
    /// "cannot tell", never yes.
    pub async fn may_open(
        &self,
        identity: &Identity,
        endpoint: &Endpoint,
    ) -> Result<bool, DbError> {
        match endpoint {
            Endpoint::Notifications => Ok(true),
            Endpoint::Dashboard => self.is_admin(identity).await,
            Endpoint::Stream { index, key, .. } => {
                if self.is_admin(identity).await? {
                    return Ok(true);
                }
                match self.stream_lookups.get(*index) {
                    Some(Some(lookup)) => lookup.ask(&[&identity.user, key]).await,
                    _ => Ok(false),
                }
            }
        }
    }
}
