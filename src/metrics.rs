//! Process metrics, rendered for `GET /metrics` in Prometheus text format by
//! `prometheus-client` (the Prometheus project's own Rust client).
//!
//! Every stage counts its own work here; nothing here touches the network.
//! Counters on the per-socket path are added per written batch, not per
//! frame, to keep atomics off the hot loop.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// A WebSocket endpoint: what a socket receives.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Stream {
    Dashboard,
    Notifications,
}

impl Stream {
    /// The name clients see in `hello` and metrics carry as a label.
    pub fn name(&self) -> &'static str {
        match self {
            Stream::Dashboard => "dashboard",
            Stream::Notifications => "notifications",
        }
    }
}

impl EncodeLabelValue for Stream {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.name())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: Stream,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<StreamLabels, Gauge>,
    pub refusals: Family<ReasonLabels, Counter>,
    pub events_received: Counter,
    pub bad_notifications: Counter,
    pub deliveries: Counter,
    pub slow_closes: Counter,
    pub closes: Family<CloseLabels, Counter>,
    pub listener_reconnects: Counter,
    pub replay_rows: Counter,
    pub replays_refused: Counter,
    pub event_lag: Histogram,
    pub notification_queue_usage: Gauge<f64, AtomicU64>,
    pub listen_probe_ok: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pgrelay");
        let connections = Family::<StreamLabels, Gauge>::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register("refusals", "Refused WebSocket requests", refusals.clone());
        let events_received = Counter::default();
        registry.register(
            "events_received",
            "Events received from PostgreSQL (NOTIFY or catch-up)",
            events_received.clone(),
        );
        let bad_notifications = Counter::default();
        registry.register(
            "bad_notifications",
            "Notifications skipped: not an event id, or naming no event in the log",
            bad_notifications.clone(),
        );
        let deliveries = Counter::default();
        registry.register(
            "deliveries",
            "Event frames written to sockets (live and replay)",
            deliveries.clone(),
        );
        let slow_closes = Counter::default();
        registry.register(
            "slow_closes",
            "Sockets closed with 4008 because their queue overflowed",
            slow_closes.clone(),
        );
        let closes = Family::<CloseLabels, Counter>::default();
        registry.register(
            "closes",
            "Sockets closed by pgrelay, by close code (1001 shutdown, 1003 binary, \
             1008 bad or too many messages, 1009 too big, 1011 replay failed, \
             1012 event log went back, 1013 replay busy, 4001 token, 4008 too slow)",
            closes.clone(),
        );
        let listener_reconnects = Counter::default();
        registry.register(
            "listener_reconnects",
            "Times the LISTEN connection was re-established",
            listener_reconnects.clone(),
        );
        let replay_rows = Counter::default();
        registry.register(
            "replay_rows",
            "Rows read from pgrelay.events to replay or catch up",
            replay_rows.clone(),
        );
        let replays_refused = Counter::default();
        registry.register(
            "replays_refused",
            "Resumes closed with 1013 because too many replays ran at once",
            replays_refused.clone(),
        );
        let event_lag = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "event_lag_seconds",
            "Time from an event's commit to its hand-off to the sockets",
            event_lag.clone(),
        );
        let notification_queue_usage = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "notification_queue_usage",
            "pg_notification_queue_usage() as last sampled by the listener",
            notification_queue_usage.clone(),
        );
        let listen_probe_ok = Gauge::default();
        registry.register(
            "listen_probe_ok",
            "1 when the last probe NOTIFY, sent through the pool, came back on the \
             LISTEN connection; 0 before the first and after one that did not \
             (a transaction-mode pooler in front of LISTEN)",
            listen_probe_ok.clone(),
        );
        Metrics {
            registry,
            connections,
            refusals,
            events_received,
            bad_notifications,
            deliveries,
            slow_closes,
            closes,
            listener_reconnects,
            replay_rows,
            replays_refused,
            event_lag,
            notification_queue_usage,
            listen_probe_ok,
        }
    }
}

impl Metrics {
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn connections(&self, stream: Stream) -> Gauge {
        self.connections
            .get_or_create(&StreamLabels { stream })
            .clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
