//! The one dedicated LISTEN connection: LISTEN on every routed channel; on
//! each wake-up, read the new events from `pgrelay.events`, route them, hand
//! them to the hub, in id (= commit) order.
//!
//! Why read the log: the capture trigger's NOTIFY payload is the event id
//! alone (LISTEN needs no privilege, so a payload is readable by every role),
//! and any role that can connect can NOTIFY any text on any channel, so a
//! payload could name a huge id that would make every later real event look
//! like a duplicate. A notification is therefore only a wake-up (its payload
//! is checked; a malformed one is counted, and logged at most once a second
//! per channel, see [`BadNotices`]); what is delivered is what the log holds
//! above the cursor. Notifications queued together cost one read, so under
//! load the reads batch themselves. NOTIFY is sent only after
//! the commit is visible, and ids are in commit order, so a read after a
//! wake-up sees the event and cannot skip a smaller id that commits later.
//!
//! Faults: when the connection dies (terminated backend, restart, network cut,
//! failed heartbeat) it reconnects with capped exponential backoff and jitter,
//! LISTENs again, then catches up from the cursor before going live. LISTEN
//! comes before the catch-up read, so nothing falls between the two.
//! `/readyz` is 503 from the loss until the catch-up is done and a probe has
//! come back.
//!
//! A LISTEN that hears nothing is the fault no error reports: through a
//! transaction-mode pooler (PgBouncer) the LISTEN lands on a server
//! connection that is handed to someone else after the statement, and no
//! notification ever comes back. So the listener proves it hears: after
//! LISTEN and on every heartbeat it NOTIFYs a private channel through the
//! pool (another connection; through its own connection the probe would come
//! back even via a pooler) and expects it back here within [`PROBE_TIMEOUT`].
//! A probe that does not come back turns `/readyz` to 503 and logs one line
//! naming the likely cause (once per change, not per heartbeat); the next
//! probe that comes back restores readiness. And whatever notifications do,
//! every heartbeat also reads the log above the cursor (the safety net), so
//! delivery is at worst one heartbeat late, never silently stopped.
//!
//! The connection is driven by its own task that only forwards notifications
//! into a bounded queue (overflow policy: when it is full a notification is
//! dropped, which loses nothing: a queued one already causes the read, and
//! notifications back up in PostgreSQL's own 8 GB queue, visible as
//! `pg_notification_queue_usage`).
//!
//! Where reads go: the catch-up and wake-up reads of new events, and the
//! heartbeat, go on this connection (through `db::LogReader`, the reader
//! replays share), so a storm of replays cannot starve the listener of pool
//! connections; the driver task never waits on them. The log's epoch at
//! connect and the probe NOTIFY go through the pool. When the log went back
//! or changed epoch, the hub drops every queue and the events it kept for
//! replays (`recent`), and each socket closes with 1012 (its resume gets
//! `reset`). Nothing here waits on a socket.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::poll_fn;
use postgres_protocol::escape::escape_identifier;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Notification};
use tokio_util::task::TaskTracker;

use crate::db::{Cursor, Db, DbError, LogReader, Source};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::parse::{parse_wakeup, Event};
use crate::pgconn::Target;
use crate::route::Routes;
use crate::shared::Status;
use crate::shutdown::Shutdown;

/// Notifications read from the socket but not yet handled.
const NOTIFY_QUEUE: usize = 16_384;
/// Events handed to the hub between two yields to the sessions.
const YIELD_EVERY: usize = 16;
/// Events per read from the log.
const FETCH_PAGE: i64 = 1_000;
/// How often the connection proves it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a probe NOTIFY has to come back on the LISTEN connection
/// (sending it included).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the last probe showed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    /// No verdict yet (start).
    Unknown,
    /// The probe came back: LISTEN hears other connections' NOTIFYs.
    Yes,
    /// Sent through the pool, never came back.
    No,
    /// Could not be sent through the pool (why).
    Unsent(String),
}

/// The listener's self-test (see the module docs). Outlives connections, so
/// a verdict is logged only when it changes.
struct Probe {
    /// `pgrelay_probe_<random hex>`: this process's own channel.
    channel: String,
    /// Probes sent so far; the payload of the next one.
    sent: u64,
    /// The payload in flight and when it is due back.
    pending: Option<(String, Instant)>,
    heard: Heard,
}

impl Probe {
    fn new() -> Probe {
        Probe {
            channel: format!("pgrelay_probe_{:016x}", rand::rng().random::<u64>()),
            sent: 0,
            pending: None,
            heard: Heard::Unknown,
        }
    }

    /// When the probe in flight is due, if one is.
    fn due(&self) -> Option<Instant> {
        self.pending.as_ref().map(|(_, due)| *due)
    }
}

/// At most one warning per channel per this long about bad notifications.
const BAD_NOTICE_EVERY: Duration = Duration::from_secs(1);

/// Throttles the bad-notification warning, per channel: any role that can
/// connect can NOTIFY millions of junk payloads, and each must not cost a log
/// line. Each line says how many were left out since the previous one (the
/// counter counts them all). Notifications arrive only on the channels the
/// listener LISTENs to, so this holds no more entries than there are routes.
/// Outlives connections, like [`Probe`].
#[derive(Default)]
struct BadNotices {
    channels: HashMap<String, Throttle>,
}

struct Throttle {
    logged_at: Instant,
    suppressed: u64,
}

impl BadNotices {
    /// Notes one bad notification on `channel` at `now`: `Some(n)` when a line
    /// is due, `n` the ones left out since the last line on that channel.
    fn due(&mut self, channel: &str, now: Instant) -> Option<u64> {
        match self.channels.get_mut(channel) {
            Some(t) if now.duration_since(t.logged_at) < BAD_NOTICE_EVERY => {
                t.suppressed += 1;
                None
            }
            Some(t) => {
                t.logged_at = now;
                Some(std::mem::take(&mut t.suppressed))
            }
            None => {
                let first = Throttle {
                    logged_at: now,
                    suppressed: 0,
                };
                self.channels.insert(channel.to_owned(), first);
                Some(0)
            }
        }
    }
}

/// Waits until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("connect: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("LISTEN: {0}")]
    Listen(#[source] tokio_postgres::Error),
    #[error("connection lost: {0}")]
    Lost(#[source] tokio_postgres::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("heartbeat: no answer within {}s", HEARTBEAT_TIMEOUT.as_secs())]
    HeartbeatTimeout,
    #[error("heartbeat: {0}")]
    Heartbeat(#[source] tokio_postgres::Error),
    #[error("heartbeat: the event log's epoch changed")]
    EpochChanged,
    #[error("{0}")]
    Db(#[from] DbError),
}

pub struct Listener {
    pub config: Target,
    pub routes: Routes,
    pub db: Db,
    pub hub: Arc<Hub>,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub tracker: TaskTracker,
}

impl Listener {
    /// Runs until shutdown, reconnecting as often as it takes.
    pub async fn run(self) {
        let mut cursor: Option<i64> = None;
        let mut backoff = BACKOFF_MIN;
        let mut probe = Probe::new();
        let mut notices = BadNotices::default();
        loop {
            let result = self
                .connected(&mut cursor, &mut backoff, &mut probe, &mut notices)
                .await;
            self.status.ready.store(false, Ordering::SeqCst);
            match result {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "listener connection down; reconnecting"),
            }
            // Full jitter in [backoff/2, backoff]: replicas that lost the
            // same server do not come back in step.
            let delay = rand::rng().random_range(backoff / 2..=backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            self.metrics.listener_reconnects.inc();
        }
    }

    /// One connection's life: connect, LISTEN, catch up, relay. Returns Ok only
    /// at shutdown.
    async fn connected(
        &self,
        cursor: &mut Option<i64>,
        backoff: &mut Duration,
        probe: &mut Probe,
        notices: &mut BadNotices,
    ) -> Result<(), ListenError> {
        // A distinct application_name lets operators (and tests) find the
        // LISTEN backend in pg_stat_activity.
        let mut config = self.config.clone();
        let name = format!(
            "{}:listen",
            config.get_application_name().unwrap_or("pgrelay")
        );
        config.application_name(name);
        let (client, mut connection) = config.connect().await.map_err(ListenError::Connect)?;
        let (tx, mut rx) =
            mpsc::channel::<Result<Notification, tokio_postgres::Error>>(NOTIFY_QUEUE);
        self.tracker.spawn(async move {
            loop {
                let message = poll_fn(|cx| connection.poll_message(cx)).await;
                let forward = match message {
                    Some(Ok(AsyncMessage::Notification(n))) => Ok(n),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Err(e),
                    None => return,
                };
                // Never wait: a notification is only a wake-up, and a full
                // queue already holds one. A driver that waited would stop
                // reading the connection, and our own queries on it with it.
                let failed = forward.is_err();
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(forward) {
                    return;
                }
                if failed {
                    return;
                }
            }
        });
        let channels = self.routes.channels();
        let listen: String = channels
            .iter()
            .chain([&probe.channel])
            .map(|c| format!("LISTEN {};", escape_identifier(c)))
            .collect();
        client
            .batch_execute(&listen)
            .await
            .map_err(ListenError::Listen)?;
        // A probe sent to the previous connection cannot come back here.
        probe.pending = None;

        // Reads go on this connection, not the pool: a storm of replays
        // cannot starve the listener of connections. The routed channels are
        // listed once per connection, not per wake-up.
        let source = Source::Connection {
            client: &client,
            channels: &channels,
        };

        let info = self.db.log_info().await?;
        if let Some(last) = *cursor {
            if info.epoch != self.status.epoch() || info.max_id < last {
                // Restored, failed over to a replica that lagged, or
                // reinstalled: ids went back. Every socket must resume
                // (and get `reset`), or it would drop the new ids as old.
                tracing::warn!(
                    last_id = last,
                    log_max_id = info.max_id,
                    "the event log went back or changed epoch: restarting every socket"
                );
                *cursor = Some(info.max_id);
                self.hub.restart(info.max_id);
            }
        }
        self.status.set_epoch(&info.epoch);
        // First start: from the hub's last id (the log's newest id when the
        // relay started, which every `hello` reports). Later: from the last
        // id handed on.
        let start = *cursor.get_or_insert(self.hub.last_id());
        let caught_up = self.fetch(source, start, true).await?;
        *cursor = Some(caught_up);
        *backoff = BACKOFF_MIN;
        tracing::info!(channels = %self.routes, last_id = caught_up, "listening");
        // Ready once the first probe is back (caught up, and LISTEN hears).
        self.send_probe(probe).await;

        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = until(probe.due()) => {
                    probe.pending = None;
                    self.verdict(probe, Heard::No);
                },
                message = rx.recv() => {
                    // Everything already queued is one wake-up: one read.
                    let mut notified = Vec::new();
                    let mut woken = false;
                    let mut next = message;
                    loop {
                        match next {
                            Some(Ok(n)) if n.channel() == probe.channel => {
                                self.probe_back(probe, n.payload());
                            }
                            Some(Ok(n)) => {
                                woken = true;
                                notified.extend(self.inspect(&n, notices));
                            }
                            Some(Err(e)) => return Err(ListenError::Lost(e)),
                            None => return Err(ListenError::Closed),
                        }
                        match rx.try_recv() {
                            Ok(m) => next = Some(m),
                            Err(_) => break,
                        }
                    }
                    if !woken {
                        continue;
                    }
                    let last = self.fetch(source, cursor.unwrap_or(0), false).await?;
                    *cursor = Some(last);
                    for (channel, id) in notified.into_iter().filter(|(_, id)| *id > last) {
                        let reason = format_args!("no event {id} in pgrelay.events");
                        self.skip(notices, &channel, &reason);
                    }
                },
                _ = heartbeat.tick() => {
                    let row = tokio::time::timeout(
                        HEARTBEAT_TIMEOUT,
                        client.query_typed_one(
                            "SELECT pg_notification_queue_usage(), (SELECT epoch FROM pgrelay.meta)",
                            &[],
                        ),
                    )
                    .await
                    .map_err(|_| ListenError::HeartbeatTimeout)?
                    .map_err(ListenError::Heartbeat)?;
                    let usage: f64 = row.try_get(0).map_err(ListenError::Heartbeat)?;
                    self.metrics.notification_queue_usage.set(usage);
                    // A reinstall in place keeps this connection up: notice the
                    // new epoch and go through the reconnect path, which resets.
                    let epoch: Option<String> = row.try_get(1).map_err(ListenError::Heartbeat)?;
                    if epoch.as_deref() != Some(self.status.epoch().as_str()) {
                        return Err(ListenError::EpochChanged);
                    }
                    // The safety net: read the log even without a wake-up, so
                    // delivery never stops silently when notifications do not
                    // arrive. Costs one indexed read per heartbeat.
                    *cursor = Some(self.fetch(source, cursor.unwrap_or(0), false).await?);
                    // One probe in flight at a time: its deadline decides.
                    if probe.pending.is_none() {
                        self.send_probe(probe).await;
                    }
                }
            }
        }
    }

    /// NOTIFYs the probe channel through the pool; the answer is awaited by
    /// the main loop (see [`Probe::due`]).
    async fn send_probe(&self, probe: &mut Probe) {
        probe.sent += 1;
        let payload = probe.sent.to_string();
        let due = Instant::now() + PROBE_TIMEOUT;
        let sent = tokio::time::timeout(PROBE_TIMEOUT, self.db.notify(&probe.channel, &payload))
            .await
            .unwrap_or(Err(DbError::Timeout("probe notify")));
        match sent {
            Ok(()) => probe.pending = Some((payload, due)),
            Err(e) => self.verdict(probe, Heard::Unsent(e.to_string())),
        }
    }

    /// A notification on the probe channel: the probe in flight is back.
    /// Others (late, from an earlier probe) prove nothing about the bound.
    fn probe_back(&self, probe: &mut Probe, payload: &str) {
        if probe.pending.as_ref().is_some_and(|(p, _)| p == payload) {
            probe.pending = None;
            self.verdict(probe, Heard::Yes);
        }
    }

    /// Records a probe's outcome: readiness and the gauge follow it, and a
    /// change (only a change) is logged.
    fn verdict(&self, probe: &mut Probe, heard: Heard) {
        let ok = heard == Heard::Yes;
        self.status.ready.store(ok, Ordering::SeqCst);
        self.metrics.listen_probe_ok.set(i64::from(ok));
        if std::mem::discriminant(&heard) != std::mem::discriminant(&probe.heard) {
            match &heard {
                Heard::Yes if probe.heard == Heard::Unknown => {
                    tracing::debug!(channel = %probe.channel, "probe NOTIFY came back");
                }
                Heard::Yes => tracing::info!(
                    channel = %probe.channel,
                    "probe NOTIFY came back on the LISTEN connection: ready again"
                ),
                Heard::No => tracing::error!(
                    channel = %probe.channel,
                    "probe NOTIFY did not come back on the LISTEN connection within {}s: \
                     LISTEN is probably going through a transaction-mode pooler (PgBouncer); \
                     point --listen-database-url at the database directly or at a \
                     session-mode pool (not ready; events are still read every {}s)",
                    PROBE_TIMEOUT.as_secs(),
                    HEARTBEAT.as_secs(),
                ),
                Heard::Unsent(error) => tracing::error!(
                    channel = %probe.channel,
                    error = %error,
                    "probe NOTIFY could not be sent through the pool (not ready until one \
                     comes back on the LISTEN connection)"
                ),
                Heard::Unknown => {}
            }
        }
        probe.heard = heard;
    }

    /// Reads from `pgrelay.events` and hands on, in order, every routed event
    /// above `after`; returns the last id read (past malformed rows too,
    /// which the read skips and logs). `catching_up` counts the rows as
    /// replayed (after a reconnect) rather than as live reads.
    async fn fetch(
        &self,
        source: Source<'_>,
        after: i64,
        catching_up: bool,
    ) -> Result<i64, ListenError> {
        let mut log = LogReader::new(
            source,
            Cursor {
                after,
                upto: i64::MAX,
                window: i64::MAX,
                page: FETCH_PAGE,
            },
        );
        while let Some(page) = log.next_page().await? {
            if catching_up {
                self.metrics.replay_rows.inc_by(page.rows as u64);
            }
            for (n, event) in page.events.iter().enumerate() {
                self.deliver(event);
                // A burst (one bulk transaction) would otherwise fill a
                // socket's ring before its task can run: let sessions drain.
                if n % YIELD_EVERY == YIELD_EVERY - 1 {
                    tokio::task::yield_now().await;
                }
            }
        }
        Ok(log.last_id())
    }

    /// Checks a notification's payload, logging one that is not an event id.
    /// Returns the id it names, if any. It only wakes the reader: any role
    /// that can connect can NOTIFY anything, so only rows in `pgrelay.events`
    /// are delivered, and a forged id cannot move the cursor.
    fn inspect(&self, n: &Notification, notices: &mut BadNotices) -> Option<(String, i64)> {
        match parse_wakeup(n.payload()) {
            Ok(id) => Some((n.channel().to_owned(), id)),
            Err(e) => {
                self.skip(notices, n.channel(), &e);
                None
            }
        }
    }

    /// Counts a bad notification, and logs it unless `notices` says this
    /// channel had its line in the last [`BAD_NOTICE_EVERY`].
    fn skip(&self, notices: &mut BadNotices, channel: &str, reason: &dyn std::fmt::Display) {
        self.metrics.bad_notifications.inc();
        if let Some(suppressed) = notices.due(channel, Instant::now()) {
            tracing::warn!(
                channel,
                reason = %reason,
                suppressed,
                "skipping notification (one line per channel per second at most)"
            );
        }
    }

    fn deliver(&self, event: &Event) {
        self.metrics.events_received.inc();
        let targets = self.routes.route(event);
        self.hub.publish(event, &targets);
        if let Ok(at) = humantime::parse_rfc3339(&event.at) {
            if let Ok(lag) = SystemTime::now().duration_since(at) {
                self.metrics.event_lag.observe(lag.as_secs_f64());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bad notifications at these offsets (ms) on these channels: the lines
    /// logged, as (offset, channel, suppressed).
    fn check(notices: &[(u64, &str)], expected: &[(u64, &str, u64)]) {
        let start = Instant::now();
        let mut throttle = BadNotices::default();
        let logged: Vec<(u64, &str, u64)> = notices
            .iter()
            .filter_map(|&(ms, channel)| {
                let now = start + Duration::from_millis(ms);
                throttle.due(channel, now).map(|n| (ms, channel, n))
            })
            .collect();
        assert_eq!(logged, expected);
    }

    #[test]
    fn bad_notices_log_once_per_second_per_channel_with_the_count_left_out() {
        check(&[(0, "a")], &[(0, "a", 0)]);
        check(
            &[(0, "a"), (1, "a"), (999, "a"), (1000, "a"), (1001, "a")],
            &[(0, "a", 0), (1000, "a", 2)],
        );
        // Channels are throttled apart.
        check(
            &[(0, "a"), (5, "b"), (10, "a"), (20, "b"), (1005, "b")],
            &[(0, "a", 0), (5, "b", 0), (1005, "b", 1)],
        );
        // A quiet channel logs its next one at once.
        check(&[(0, "a"), (60_000, "a")], &[(0, "a", 0), (60_000, "a", 0)]);
    }
}
