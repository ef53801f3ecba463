//! Who gets a socket, beyond a valid token: the origin allowlist, the caps on
//! total sockets and sockets per user, the caps on connections still before
//! authentication (in total and per client address), and the database's
//! answers to "is this user a super admin?" and "may this user open this
//! key of this stream?" ([`Lookup`]).
//!
//! Each check refuses one request and nothing else: a cap reached or a failed
//! admin lookup never affects sockets already open. A failed lookup refuses
//! (503), it never admits. Both pairs of caps are one [`Caps`]: a semaphore
//! for the total and a count per key, the place freed when its guard drops.
//! The pre-authentication caps exist because a connection that has not
//! authenticated yet costs memory (hyper's buffers, a task) that nobody has
//! vouched for: without them a flood of idle or bad handshakes is limited
//! only by the open-file limit.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
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
    /// Connections accepted but not yet upgraded (or closed), in total; more
    /// are answered 503 at once.
    pub max_pending_handshakes: usize,
    /// The same per client address (an IPv6 client by its /64); more are
    /// answered 429 at once.
    pub max_pending_per_ip: usize,
    /// Largest request head (request line and headers), in bytes; larger is
    /// answered 431. Also bounds hyper's read buffer for a pending connection.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 50_000,
            max_per_user: 32,
            handshake_timeout: Duration::from_secs(10),
            max_client_message: 16 * 1024,
            client_messages_per_second: 2,
            max_pending_handshakes: 1024,
            max_pending_per_ip: 64,
            // Browsers send a few KiB of headers at most, cookies included
            // (they cap one cookie at 4 KiB); nginx's default buffers stop at
            // 8 KiB per header line. 16 KiB passes a browser with big cookies
            // and a subprotocol token, and costs 1024 pending connections at
            // most 24 MiB (each may buffer the cap plus hyper's 8 KiB step).
            max_header_bytes: 16 * 1024,
        }
    }
}

/// Longest the door waits for `--admin-query`: a failure never admits.
pub const ADMIN_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Which cap refused a place.
#[derive(Debug, PartialEq)]
pub enum NoSlot {
    Total,
    PerKey,
}

/// A total cap and a cap per key (a user, a client address).
pub struct Caps<K> {
    total: Arc<Semaphore>,
    per_key: Arc<Mutex<HashMap<K, usize>>>,
    max_per_key: usize,
}

/// One place under [`Caps`]; freed on drop.
pub struct Slot<K: Eq + Hash> {
    _total: OwnedSemaphorePermit,
    key: K,
    per_key: Arc<Mutex<HashMap<K, usize>>>,
}

/// Open sockets, in total and per user id.
pub type Slots = Caps<String>;

/// Connections not yet upgraded, in total and per [`client_key`].
pub type Pending = Caps<IpAddr>;

impl Slots {
    pub fn new(limits: &Limits) -> Slots {
        Caps::with(limits.max_connections, limits.max_per_user)
    }
}

impl Pending {
    pub fn new(limits: &Limits) -> Pending {
        Caps::with(limits.max_pending_handshakes, limits.max_pending_per_ip)
    }
}

impl<K: Eq + Hash + Clone> Caps<K> {
    pub fn with(total: usize, max_per_key: usize) -> Caps<K> {
        Caps {
            total: Arc::new(Semaphore::new(total)),
            per_key: Arc::new(Mutex::new(HashMap::new())),
            max_per_key,
        }
    }

    pub fn take(&self, key: &K) -> Result<Slot<K>, NoSlot> {
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| NoSlot::Total)?;
        let mut per_key = self.per_key.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_key.entry(key.clone()).or_insert(0);
        if *count >= self.max_per_key {
            return Err(NoSlot::PerKey);
        }
        *count += 1;
        Ok(Slot {
            _total: total,
            key: key.clone(),
            per_key: Arc::clone(&self.per_key),
        })
    }
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut per_key = self.per_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_key.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                per_key.remove(&self.key);
            }
        }
    }
}

/// The key a client address is counted under: an IPv4 address as it is (also
/// when it arrives IPv4-mapped on a dual-stack socket), an IPv6 address by
/// its /64, the block one host or subscriber usually holds whole.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
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

/// A yes/no question to the database, with answers cached for `ttl`:
/// `--admin-query` (`$1` the user) and each stream's `--stream-query` (`$1`
/// the user, `$2` the key). An error or a timeout is "cannot tell", which
/// the caller turns into a refusal, never an admission; it is not cached.
pub struct Lookup {
    db: Db,
    what: &'static str,
    query: String,
    ttl: Duration,
    cache: Mutex<HashMap<Vec<String>, (bool, Instant)>>,
}

impl Lookup {
    pub fn new(db: Db, what: &'static str, query: String, ttl: Duration) -> Lookup {
        Lookup {
            db,
            what,
            query,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The database's answer for these arguments.
    pub async fn ask(&self, args: &[&str]) -> Result<bool, DbError> {
        let key: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        if let Some((yes, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if at.elapsed() < self.ttl {
                return Ok(*yes);
            }
        }
        let yes = tokio::time::timeout(
            ADMIN_QUERY_TIMEOUT,
            self.db.ask(self.what, &self.query, args),
        )
        .await
        .map_err(|_| DbError::Timeout(self.what))??;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: forget everything rather than grow without limit.
        if cache.len() >= 100_000 {
            cache.clear();
        }
        cache.insert(key, (yes, Instant::now()));
        Ok(yes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_total_and_per_user() {
        let slots = Slots::with(3, 2);
        let key = |k: &str| k.to_owned();
        let a1 = slots.take(&key("a")).expect("first");
        let _a2 = slots.take(&key("a")).expect("second");
        assert_eq!(slots.take(&key("a")).err(), Some(NoSlot::PerKey));
        let _b1 = slots.take(&key("b")).expect("b");
        assert_eq!(slots.take(&key("c")).err(), Some(NoSlot::Total));
        drop(a1);
        assert!(slots.take(&key("a")).is_ok());
    }

    #[test]
    fn client_keys() {
        let check = |ip: &str, key: &str| {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(client_key(ip), key.parse::<IpAddr>().expect("key"), "{ip}");
        };
        check("127.0.0.1", "127.0.0.1");
        check("::ffff:10.1.2.3", "10.1.2.3");
        check("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::");
        check("2001:db8:1:2:ffff::1", "2001:db8:1:2::");
        check("::1", "::");
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
