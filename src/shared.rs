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
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{AdminLookup, Limits, Slots};
use crate::auth::{AuthConfig, Identity, KeyError, Verifier};
use crate::db::{Db, DbError};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::replays::ReplayLimits;
use crate::route::Routes;

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
    fn answer(
        &self,
        method: &Method,
        path: &str,
    ) -> Option<BoxFuture<'static, Response<Full<Bytes>>>>;
}

/// What every connection and socket shares.
pub struct Shared {
    /// Swapped whole on SIGHUP (key rotation); sockets keep running.
    pub verifier: RwLock<Arc<Verifier>>,
    pub auth: AuthConfig,
    pub slots: Slots,
    pub limits: Limits,
    pub allowed_origins: Vec<String>,
    pub admin_lookup: Option<AdminLookup>,
    pub hub: Arc<Hub>,
    pub db: Db,
    /// Caps on replays running at once (they share the read pool).
    pub replays: ReplayLimits,
    pub routes: Routes,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub shutdown: CancellationToken,
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
            Some(lookup) => lookup.is_admin(&identity.user).await,
            None => Ok(false),
        }
    }
}
