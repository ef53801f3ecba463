//! What the clients count, and the small sums the reports make of it.
//!
//! Each worker thread counts deliveries and records latencies in its own
//! histogram (an uncontended lock), registered once and merged on demand, so
//! that counting costs the read loop next to nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::frame::now_us;

/// Latencies are recorded in microseconds, up to a minute, 3 significant digits.
const LATENCY_MAX_US: u64 = 60_000_000;

struct ThreadStats {
    delivered: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

static REGISTRY: Mutex<Vec<Arc<ThreadStats>>> = Mutex::new(Vec::new());

thread_local! {
    static LOCAL: Arc<ThreadStats> = {
        let stats = Arc::new(ThreadStats {
            delivered: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
        });
        lock(&REGISTRY).push(Arc::clone(&stats));
        stats
    };
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).unwrap_or_else(|_| unreachable!())
}

/// A lock that a panicking holder does not poison for the others.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The measured window: events whose `at` is in [from, to) (µs since the
/// Unix epoch) go into the latency histogram.
pub(crate) struct Window {
    from_us: AtomicI64,
    to_us: AtomicI64,
}

impl Window {
    /// Not open yet.
    pub(crate) fn new() -> Window {
        Window {
            from_us: AtomicI64::new(i64::MAX),
            to_us: AtomicI64::new(i64::MAX),
        }
    }

    pub(crate) fn open(&self) {
        self.from_us.store(now_us(), Relaxed);
    }

    pub(crate) fn close(&self) {
        self.to_us.store(now_us(), Relaxed);
    }

    fn contains(&self, at: i64) -> bool {
        at >= self.from_us.load(Relaxed) && at < self.to_us.load(Relaxed)
    }
}

/// Latencies a [`Receipt`] holds before it records them.
const RECEIPT_LATENCIES: usize = 64;

/// The deliveries of one read: they all arrived together, so the clock is
/// read once for them (at the first one in the window) and the thread's
/// counters are touched once, when the receipt is dropped (before the next
/// read), not once a frame.
pub(crate) struct Receipt {
    /// µs since the Unix epoch; 0 until a latency needs it.
    now_us: i64,
    delivered: u64,
    latencies: [u64; RECEIPT_LATENCIES],
    len: usize,
}

impl Receipt {
    pub(crate) fn new() -> Receipt {
        Receipt {
            now_us: 0,
            delivered: 0,
            latencies: [0; RECEIPT_LATENCIES],
            len: 0,
        }
    }

    /// Counts one delivery, and its latency if its `at` is in the window.
    pub(crate) fn count(&mut self, at: Option<i64>, window: &Window) {
        self.delivered += 1;
        let Some(at) = at.filter(|&at| window.contains(at)) else {
            return;
        };
        if self.now_us == 0 {
            self.now_us = now_us();
        }
        if self.len == RECEIPT_LATENCIES {
            self.record();
        }
        self.latencies[self.len] = ((self.now_us - at).max(1) as u64).min(LATENCY_MAX_US);
        self.len += 1;
    }

    /// Adds what it holds to this thread's counters.
    fn record(&mut self) {
        if self.delivered == 0 && self.len == 0 {
            return;
        }
        LOCAL.with(|stats| {
            stats.delivered.fetch_add(self.delivered, Relaxed);
            if self.len > 0 {
                let mut latency = lock(&stats.latency);
                for &us in &self.latencies[..self.len] {
                    latency.saturating_record(us);
                }
            }
        });
        self.delivered = 0;
        self.len = 0;
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        self.record();
    }
}

pub(crate) fn delivered_total() -> u64 {
    lock(&REGISTRY)
        .iter()
        .map(|s| s.delivered.load(Relaxed))
        .sum()
}

pub(crate) fn latency_merged() -> Histogram<u64> {
    let mut merged = new_histogram();
    for stats in lock(&REGISTRY).iter() {
        let _ = merged.add(&*lock(&stats.latency));
    }
    merged
}

/// Waits until the clients' deliveries reach `total`, `limit` at most, and
/// no longer than `quiet` without any delivery. Returns when the last
/// delivery was seen to arrive.
pub(crate) async fn drain(total: u64, limit: Duration, quiet: Duration) -> Instant {
    let began = Instant::now();
    let mut last = (delivered_total(), Instant::now());
    loop {
        let delivered = delivered_total();
        if delivered >= total {
            break;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        }
        if began.elapsed() > limit || last.1.elapsed() > quiet {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last.1
}

/// The value at quantile `q` of `h`, 0 for an empty histogram.
pub(crate) fn quantile_of(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

/// `p50 2.89ms  p99 8.77ms  max 21.60ms`: quantiles `qs` and the max of a
/// histogram of µs.
pub(crate) fn quantiles_line(h: &Histogram<u64>, qs: &[f64]) -> String {
    let mut parts: Vec<String> = qs
        .iter()
        .map(|&q| {
            let name = format!("{:.1}", q * 100.0);
            let name = name.strip_suffix(".0").unwrap_or(&name);
            format!("p{name} {}", ms(quantile_of(h, q)))
        })
        .collect();
    parts.push(format!("max {}", ms(h.max())));
    parts.join("  ")
}

/// A latency in µs as milliseconds, for the tables.
pub(crate) fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

/// A duration in milliseconds.
pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, max) of `v`, which it sorts; (0, 0) when it is empty.
pub(crate) fn median_max(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[n - 1])
}

pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// How many times each close code (or HTTP status) occurs.
pub(crate) fn code_counts(codes: impl IntoIterator<Item = u16>) -> BTreeMap<u16, u64> {
    let mut counts = BTreeMap::new();
    for code in codes {
        *counts.entry(code).or_default() += 1;
    }
    counts
}

/// `1008x3 4008x1`, or `none`.
pub(crate) fn codes_line(counts: &BTreeMap<u16, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(c, n)| format!("{c}x{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `{"1008": 3, "4008": 1}`.
pub(crate) fn codes_json<N: Copy + serde::Serialize>(
    counts: &BTreeMap<u16, N>,
) -> serde_json::Value {
    serde_json::json!(counts
        .iter()
        .map(|(c, n)| (c.to_string(), *n))
        .collect::<HashMap<_, _>>())
}

/// CPU per unit of work (a delivery, a socket) of pgrelay and of the bench,
/// side by side: the bench must cost less than what it measures, or it
/// measures itself. The bench's figure is the whole process (clients,
/// writers, sampling). The JSON calls the server under test `pgrelay`
/// whatever it is, so that every report has the same shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuPer {
    pgrelay_us: Option<f64>,
    bench_us: f64,
    /// The server under test, as the table names it.
    server: &'static str,
}

impl CpuPer {
    /// `n` units for `pgrelay_s` and `bench_s` CPU seconds.
    pub(crate) fn new(pgrelay_s: Option<f64>, bench_s: f64, n: u64) -> CpuPer {
        let per = |s: f64| s * 1e6 / n.max(1) as f64;
        CpuPer {
            pgrelay_us: pgrelay_s.map(per),
            bench_us: per(bench_s),
            server: "pgrelay",
        }
    }

    /// The table names the server under test `server` (the ideal's, say).
    pub(crate) fn of(self, server: &'static str) -> CpuPer {
        CpuPer { server, ..self }
    }

    /// The bench's cost over pgrelay's (none without pgrelay's, or at 0).
    fn ratio(&self) -> Option<f64> {
        self.pgrelay_us
            .filter(|&p| p > 0.0)
            .map(|p| self.bench_us / p)
    }

    /// `pgrelay 0.81 µs/delivery, bench 0.45 µs/delivery (bench/pgrelay 0.56)`.
    pub(crate) fn line(&self, unit: &str) -> String {
        let server = self.server;
        format!(
            "{server} {} µs/{unit}, bench {:.2} µs/{unit} (bench/{server} {})",
            self.pgrelay_us.map_or("?".into(), |p| format!("{p:.2}")),
            self.bench_us,
            self.ratio().map_or("?".into(), |r| format!("{r:.2}"))
        )
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "pgrelay": self.pgrelay_us,
            "bench": self.bench_us,
            "bench_over_pgrelay": self.ratio(),
        })
    }
}

/// A row of a report's table: `  key                    value`.
pub(crate) fn row(t: &mut String, key: &str, value: String) {
    use std::fmt::Write as _;
    let _ = writeln!(t, "  {key:<22} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_counts_its_read_once() {
        let window = Window::new();
        window.open();
        let mine = || LOCAL.with(|s| (s.delivered.load(Relaxed), lock(&s.latency).len()));
        let (delivered, latencies) = mine();
        let mut receipt = Receipt::new();
        let at = now_us();
        for _ in 0..RECEIPT_LATENCIES + 6 {
            receipt.count(Some(at), &window);
        }
        // Before the window and without an `at`: counted, no latency.
        receipt.count(Some(0), &window);
        receipt.count(None, &window);
        // The first 64 latencies are recorded when the 65th comes (with the
        // 65 deliveries so far).
        assert_eq!(mine(), (delivered + 65, latencies + 64));
        drop(receipt);
        let n = RECEIPT_LATENCIES as u64 + 6;
        assert_eq!(mine(), (delivered + n + 2, latencies + n));
    }

    #[test]
    fn medians() {
        assert_eq!(median_max(&mut [3.0, 1.0, 2.0]), (2.0, 3.0));
        assert_eq!(median_max(&mut [4.0, 1.0, 2.0, 3.0]), (2.5, 4.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
    }

    #[test]
    fn cpu_per_unit_side_by_side() {
        let per = CpuPer::new(Some(2.0), 1.0, 1_000_000);
        assert_eq!(
            per.line("delivery"),
            "pgrelay 2.00 µs/delivery, bench 1.00 µs/delivery (bench/pgrelay 0.50)"
        );
        assert_eq!(per.json()["bench_over_pgrelay"], 0.5);
        let no_pid = CpuPer::new(None, 1.0, 0);
        assert_eq!(
            no_pid.line("socket"),
            "pgrelay ? µs/socket, bench 1000000.00 µs/socket (bench/pgrelay ?)"
        );
        assert!(no_pid.json()["pgrelay"].is_null());
        assert_eq!(
            per.of("ideal").line("delivery"),
            "ideal 2.00 µs/delivery, bench 1.00 µs/delivery (bench/ideal 0.50)"
        );
    }

    #[test]
    fn quantiles() {
        let mut h = new_histogram();
        assert_eq!(
            quantiles_line(&h, &[0.5, 0.999]),
            "p50 0.00ms  p99.9 0.00ms  max 0.00ms"
        );
        for us in 1..=1000 {
            h.saturating_record(us * 1000);
        }
        assert_eq!(
            quantiles_line(&h, &[0.5, 0.99]),
            "p50 500.22ms  p99 990.21ms  max 1000.45ms"
        );
    }

    #[test]
    fn codes() {
        let counts = code_counts([4008, 1008, 4008]);
        assert_eq!(codes_line(&counts), "1008x1 4008x2");
        assert_eq!(codes_line(&BTreeMap::new()), "none");
        assert_eq!(codes_json(&counts).to_string(), r#"{"1008":1,"4008":2}"#);
    }
}
