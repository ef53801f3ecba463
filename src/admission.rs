//! Who gets a socket, beyond a valid token: the origin allowlist, the caps on
//! total sockets and sockets per user, and the optional database answer to
//! "is this user a super admin?".
//!
//! Each check refuses one request and nothing else: a cap reached or a failed
//! admin lookup never affects sockets already open. A failed lookup refuses
//! (503), it never admits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::db::{Db, DbError};

/// Caps on what clients may take, each a flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Open sockets in total.
    pub max_connections: usize,
    /// Open sockets per user id.
    pub max_per_user: usize,
    /// Time a client has to send its request headers.
    pub handshake_timeout: Duration,
    /// Largest client frame or message, in bytes (1009 beyond it).
    pub max_client_message: usize,
    /// Client messages per second allowed on one socket (1008 beyond it),
    /// with bursts of up to ten times that.
    pub client_messages_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 50_000,
            max_per_user: 32,
            handshake_timeout: Duration::from_secs(10),
            max_client_message: 16 * 1024,
            client_messages_per_second: 2,
        }
    }
}

/// Why a socket could not be given a slot.
#[derive(Debug, PartialEq)]
pub enum NoSlot {
    Total,
    User,
}

/// Counts open sockets, in total and per user.
pub struct Slots {
    total: Arc<Semaphore>,
    per_user: Arc<Mutex<HashMap<String, usize>>>,
    max_per_user: usize,
}

/// One socket's place; freed on drop.
pub struct Slot {
    _total: OwnedSemaphorePermit,
    user: String,
    per_user: Arc<Mutex<HashMap<String, usize>>>,
}

impl Slots {
    pub fn new(limits: &Limits) -> Slots {
        Slots {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_user: Arc::new(Mutex::new(HashMap::new())),
            max_per_user: limits.max_per_user,
        }
    }

    pub fn take(&self, user: &str) -> Result<Slot, NoSlot> {
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| NoSlot::Total)?;
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_user.entry(user.to_owned()).or_insert(0);
        if *count >= self.max_per_user {
            return Err(NoSlot::User);
        }
        *count += 1;
        Ok(Slot {
            _total: total,
            user: user.to_owned(),
            per_user: Arc::clone(&self.per_user),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_user.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

/// `--allowed-origin`: an empty list admits any origin. Requests without an
/// `Origin` header (services, not browsers) are admitted: the check exists to
/// stop other web sites' pages from opening sockets with a user's cookies or
/// stored token.
pub fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        None => true,
        Some(origin) => allowed.is_empty() || allowed.iter().any(|a| a == origin),
    }
}

/// `--admin-query`, with answers cached for `ttl`.
pub struct AdminLookup {
    db: Db,
    query: String,
    ttl: Duration,
    cache: Mutex<HashMap<String, (bool, Instant)>>,
}

impl AdminLookup {
    pub fn new(db: Db, query: String, ttl: Duration) -> AdminLookup {
        AdminLookup {
            db,
            query,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the database says `user` is a super admin.
    pub async fn is_admin(&self, user: &str) -> Result<bool, DbError> {
        if let Some((admin, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
        {
            if at.elapsed() < self.ttl {
                return Ok(*admin);
            }
        }
        let admin = tokio::time::timeout(
            Duration::from_secs(5),
            self.db.admin_query(&self.query, user),
        )
        .await
        .map_err(|_| DbError::Timeout("admin query"))??;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: forget everything rather than grow without limit.
        if cache.len() >= 100_000 {
            cache.clear();
        }
        cache.insert(user.to_owned(), (admin, Instant::now()));
        Ok(admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_total_and_per_user() {
        let slots = Slots::new(&Limits {
            max_connections: 3,
            max_per_user: 2,
            ..Limits::default()
        });
        let a1 = slots.take("a").expect("first");
        let _a2 = slots.take("a").expect("second");
        assert_eq!(slots.take("a").err(), Some(NoSlot::User));
        let _b1 = slots.take("b").expect("b");
        assert_eq!(slots.take("c").err(), Some(NoSlot::Total));
        drop(a1);
        assert!(slots.take("a").is_ok());
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://app.example.com".to_owned()];
        assert!(origin_allowed(&[], Some("https://evil.example")));
        assert!(origin_allowed(&allowed, None));
        assert!(origin_allowed(&allowed, Some("https://app.example.com")));
        assert!(!origin_allowed(&allowed, Some("https://evil.example")));
        assert!(!origin_allowed(
            &allowed,
            Some("https://app.example.com.evil.example")
        ));
    }
}
