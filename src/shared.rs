//! [`Shared`]: what every connection and socket shares (key, caps, hub,
//! pool, routes, metrics, the shutdown token and task tracker). Built once by
//! `Relay::start`; the server reads it at the door, each session for its
//! socket's life. Its own module so that `server` and `session` both use it
//! and neither imports the other for it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{AdminLookup, Limits, Slots};
use crate::auth::{AuthConfig, Identity, KeyError, Verifier};
use crate::db::{Db, DbError};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::replays::ReplayLimits;
use crate::route::Routes;
use crate::Status;

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
    /// `pgrelay demo` only: the buttons' endpoints under `/demo/`.
    pub demo_api: bool,
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
