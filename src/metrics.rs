//! Process metrics, rendered for `GET /metrics` by `prometheus-client` (the
//! Prometheus project's own Rust client).
//!
//! Two formats, chosen by the request's `Accept` ([`Format::accepted`]): the
//! Prometheus text format 0.0.4, which every scraper parses and which is the
//! Prometheus convention when nothing else is asked for, and OpenMetrics 1.0
//! for a client that asks for it. `prometheus-client` writes OpenMetrics only;
//! [`to_text_004`] rewrites its output line by line, because the two differ
//! only in a few lines' spelling (see there).
//!
//! Every stage counts its own work here; nothing here touches the network or
//! the database (`pg_notification_queue_usage` is read by the listener's
//! heartbeat on its own connection, replay rows by `db::LogReader`'s callers).
//! Closes are counted by code (label `code`, the number): `wire::Close`'s codes.
//! Counters on the per-socket path are added per written batch, not per
//! frame, to keep atomics off the hot loop.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// The endpoint label: `wire::Endpoint::name`, as clients see it in
/// `hello` (a stream's name, never its key).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// What asked for a replay's turn that was refused (`replays::Asker`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TurnLabels {
    pub kind: &'static str,
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
    pub replays_from_memory: Counter,
    pub replays_refused: Family<TurnLabels, Counter>,
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
        registry.register(
            "refusals",
            "Requests and connections refused before the upgrade, by reason",
            refusals.clone(),
        );
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
        let replays_from_memory = Counter::default();
        registry.register(
            "replays_from_memory",
            "Resumes replayed from the newest events held in memory (--replay-memory), \
             without a query or a replay turn",
            replays_from_memory.clone(),
        );
        let replays_refused = Family::<TurnLabels, Counter>::default();
        registry.register(
            "replays_refused",
            "Replay turns refused because too many ran at once, by what asked: a replay \
             (closed with 1013), a history page or a POST /read (429 or 503), a socket's \
             read message (dropped), hello's unread count (hello goes without it)",
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
            replays_from_memory,
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

    pub fn connections(&self, stream: &str) -> Gauge {
        self.connections
            .get_or_create(&StreamLabels {
                stream: stream.to_owned(),
            })
            .clone()
    }

    /// Every metric, in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Text004 => to_text_004(&out),
        }
    }
}

/// An exposition format of `GET /metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: the default.
    Text004,
    /// `application/openmetrics-text; version=1.0.0`: when `Accept` prefers it.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when a media range
    /// `application/openmetrics-text` has the highest `q` of the ranges naming
    /// a format (ties to the first), the text format otherwise, and for no
    /// header, `*/*`, or anything unparsable.
    pub fn accepted(accept: Option<&str>) -> Format {
        let mut best = (Format::Text004, 0.0_f32);
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let format = match parts.next().map(str::to_ascii_lowercase).as_deref() {
                Some("application/openmetrics-text") => Format::OpenMetrics,
                Some("text/plain") => Format::Text004,
                _ => continue,
            };
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(0.0);
            if q > best.1 {
                best = (format, q);
            }
        }
        best.0
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// OpenMetrics text as `prometheus-client` writes it -> the text format 0.0.4.
/// The differences that matter to a 0.0.4 parser:
/// - no `# EOF` line and no `# UNIT` lines (0.0.4 has neither);
/// - a counter's `# HELP`/`# TYPE` name the sample, `x_total`, where
///   OpenMetrics names the family `x` (a 0.0.4 parser ties samples to
///   families by exact name); an info metric likewise `x_info`, typed
///   `gauge`; `unknown` is spelt `untyped`, `stateset` becomes `gauge`,
///   `gaugehistogram` `untyped`;
/// - no exemplars (` # {...}` after a sample's value).
///
/// Samples, labels, escaping and `+Inf` are spelt alike in both. (The
/// `_created` samples of OpenMetrics are not written by `prometheus-client`
/// 0.26, so there are none to drop.)
pub fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes `# HELP` before `# TYPE`: the HELP line is
    // held until the type says how to spell the name.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "stateset" => ("", "gauge"),
                "unknown" | "gaugehistogram" => ("", "untyped"),
                other => ("", other),
            };
            if let Some((help_name, text)) = help.take() {
                if help_name == name {
                    out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
                }
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        let sample = line.split_once(" # {").map_or(line, |(sample, _)| sample);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_chooses_the_format() {
        let check = |accept: Option<&str>, want: Format| {
            assert_eq!(Format::accepted(accept), want, "{accept:?}");
        };
        check(None, Format::Text004);
        check(Some("*/*"), Format::Text004);
        check(Some("text/plain"), Format::Text004);
        check(Some("garbage;;,=,"), Format::Text004);
        check(Some("application/openmetrics-text"), Format::OpenMetrics);
        check(
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            Format::OpenMetrics,
        );
        // Prometheus 2.x's scrape header.
        check(
            Some(
                "application/openmetrics-text;version=1.0.0;q=0.5,\
                 application/openmetrics-text;version=0.0.1;q=0.4,\
                 text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
            ),
            Format::OpenMetrics,
        );
        // A scraper configured for the classic format.
        check(
            Some("text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"),
            Format::Text004,
        );
        check(Some("application/openmetrics-text;q=0"), Format::Text004);
        check(
            Some("Application/OpenMetrics-Text;Q=0.9"),
            Format::OpenMetrics,
        );
    }

    #[test]
    fn text_004_spells_families_as_prometheus_parses_them() {
        let metrics = Metrics::default();
        metrics.refused("invalid_token");
        metrics.deliveries.inc_by(3);
        metrics.event_lag.observe(0.002);
        metrics.connections("dashboard").inc();
        let openmetrics = metrics.render(Format::OpenMetrics);
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
        assert!(openmetrics.contains("# TYPE pgrelay_deliveries counter\n"));
        let text = metrics.render(Format::Text004);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(text.contains(
            "# HELP pgrelay_deliveries_total Event frames written to sockets (live and replay).\n\
             # TYPE pgrelay_deliveries_total counter\n\
             pgrelay_deliveries_total 3\n"
        ));
        assert!(text.contains(
            "# TYPE pgrelay_refusals_total counter\n\
             pgrelay_refusals_total{reason=\"invalid_token\"} 1\n"
        ));
        assert!(text.contains("# TYPE pgrelay_event_lag_seconds histogram\n"));
        assert!(text.contains("pgrelay_event_lag_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("pgrelay_connections{stream=\"dashboard\"} 1\n"));
        // Every sample belongs to the family its TYPE line names.
        let mut family = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap_or_default();
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let histogram_part = ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(family));
                assert!(name == family || histogram_part, "{line} under {family}");
            }
        }
    }

    #[test]
    fn text_004_drops_openmetrics_only_lines() {
        let openmetrics = "# HELP a_seconds A.\n# TYPE a_seconds gauge\n# UNIT a_seconds seconds\n\
                           a_seconds 1.5\n# HELP b Built.\n# TYPE b info\nb_info{v=\"1\"} 1\n\
                           # TYPE c counter\nc_total 2 # {trace=\"x\"} 1.0\n# EOF\n";
        assert_eq!(
            to_text_004(openmetrics),
            "# HELP a_seconds A.\n# TYPE a_seconds gauge\na_seconds 1.5\n\
             # HELP b_info Built.\n# TYPE b_info gauge\nb_info{v=\"1\"} 1\n\
             # TYPE c_total counter\nc_total 2\n"
        );
    }
}
