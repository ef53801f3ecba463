//! The handshake-storm scenario: memory, not deliveries. The idle RSS of a
//! fresh pgrelay, then `--storm-handshakes` WebSocket handshakes with a token
//! signed by the wrong key, in waves of `--storm-concurrency` at once (each
//! wave's connections all open before any is answered, as a flood's would),
//! the peak RSS, and the RSS 1, 5 and 10 s after the last answer. It passes
//! when the RSS 10 s after is within 20% of the idle RSS. The quiet-machine
//! check ([`crate::quiet`]) runs first, and is also the settling time
//! before the idle RSS is read.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_tungstenite::tungstenite::handshake::client::generate_key;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::args::Args;
use crate::error::{BenchError, Result};
use crate::frame::find;
use crate::procfs::{mib, proc_sample, Load, PeakRss};
use crate::quiet::{self, Quiet, Window};
use crate::server::Server;
use crate::stats::{codes_json, row};

pub(crate) struct Report {
    description: String,
    /// Answers by HTTP status; 0: no answer (connect error, reset, timeout).
    statuses: BTreeMap<u16, usize>,
    storm_s: f64,
    idle_kib: u64,
    peak_kib: u64,
    /// RSS 1, 5 and 10 s after the storm.
    after_kib: [u64; 3],
    /// Who used the CPU during the storm.
    load: Load,
    quiet: Quiet,
}

const STORM_AFTER_S: [u64; 3] = [1, 5, 10];

pub(crate) async fn storm(args: &Args, server: &Server) -> Result<Report> {
    let pid = server.pid.ok_or(BenchError::Usage(
        "handshake-storm reads pgrelay's RSS: pass --pid with --url",
    ))?;
    let rss = move || proc_sample(Some(pid)).map(|s| s.rss_kib).unwrap_or(0);
    // A well-formed token signed with another key: the full check runs.
    let token = pgrelay::auth::mint("not-the-relay's-key", "1", None, Duration::from_secs(3600))?;
    let request: Arc<str> = format!(
        "GET /ws/notifications/ HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        server.host,
        generate_key(),
    )
    .into();
    // The check's second also lets start-up allocations settle.
    let mut quiet = quiet::check(args, server).await?;
    let idle_kib = rss();
    let peak = PeakRss::start(Some(pid));
    let began = Instant::now();
    let window = Window::open(server);
    let mut statuses = BTreeMap::new();
    let mut left = args.storm_handshakes;
    while left > 0 {
        let wave = left.min(args.storm_concurrency);
        left -= wave;
        // Every connection of a wave is open before any request is sent.
        let gate = Arc::new(tokio::sync::Barrier::new(wave));
        let tasks: Vec<_> = (0..wave)
            .map(|_| {
                let request = Arc::clone(&request);
                let gate = Arc::clone(&gate);
                let addr = server.addr;
                tokio::spawn(async move {
                    let attempt = async {
                        let stream = TcpStream::connect(addr).await;
                        gate.wait().await;
                        refused_status(stream?, &request).await
                    };
                    tokio::time::timeout(Duration::from_secs(30), attempt)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0)
                })
            })
            .collect();
        for task in tasks {
            *statuses.entry(task.await.unwrap_or(0)).or_insert(0) += 1;
        }
        eprintln!(
            "[{:>6.1}s] storm    {} of {} handshakes answered  pgrelay rss {:.1} MiB",
            began.elapsed().as_secs_f64(),
            args.storm_handshakes - left,
            args.storm_handshakes,
            mib(rss())
        );
    }
    let ended = Instant::now();
    let (_, load) = quiet.close(window, server);
    let peak_kib = peak.kib().max(idle_kib);
    drop(peak);
    let mut after_kib = [0; 3];
    for (after, at) in after_kib.iter_mut().zip(STORM_AFTER_S) {
        tokio::time::sleep_until((ended + Duration::from_secs(at)).into()).await;
        *after = rss();
        eprintln!(
            "[{:>6.1}s] after    {at} s  pgrelay rss {:.1} MiB",
            began.elapsed().as_secs_f64(),
            mib(*after)
        );
    }
    Ok(Report {
        description: server.description.clone(),
        statuses,
        storm_s: ended.duration_since(began).as_secs_f64(),
        idle_kib,
        peak_kib,
        after_kib,
        load,
        quiet,
    })
}

/// Sends `request` and reads the answer's status line; the connection is
/// dropped after it (a refused handshake's client has nothing more to say).
async fn refused_status(mut stream: TcpStream, request: &str) -> io::Result<u16> {
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while find(&head, b"\r\n").is_none() {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

impl Report {
    pub(crate) fn passed(&self) -> bool {
        self.after_kib[2] as f64 <= self.idle_kib as f64 * 1.2
    }

    pub(crate) fn table(&self, args: &Args) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "pgrelay-bench handshake-storm{}: {} handshakes with a bad token, {} at once",
            self.quiet.mark(),
            args.storm_handshakes,
            args.storm_concurrency
        );
        let _ = writeln!(t, "target: {}", self.description);
        let _ = writeln!(t);
        let answers: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| match status {
                0 => format!("{n} unanswered"),
                s => format!("{n} x {s}"),
            })
            .collect();
        row(&mut t, "answers", answers.join(", "));
        row(&mut t, "storm took", format!("{:.1} s", self.storm_s));
        self.quiet.rows(&mut t, "load in the storm", &self.load);
        row(
            &mut t,
            "pgrelay RSS idle",
            format!("{:.1} MiB", mib(self.idle_kib)),
        );
        row(
            &mut t,
            "pgrelay RSS peak",
            format!("{:.1} MiB", mib(self.peak_kib)),
        );
        for (kib, at) in self.after_kib.iter().zip(STORM_AFTER_S) {
            row(
                &mut t,
                &format!("pgrelay RSS after {at} s"),
                format!("{:.1} MiB", mib(*kib)),
            );
        }
        self.quiet.verdict(
            &mut t,
            self.passed(),
            "PASS: RSS back within 20% of idle after 10 s",
            "FAIL: RSS NOT back within 20% of idle after 10 s",
        );
        t
    }

    pub(crate) fn json(&self, args: &Args) -> String {
        self.quiet
            .stamp(serde_json::json!({
                "scenario": "handshake-storm",
                "handshakes": args.storm_handshakes,
                "concurrency": args.storm_concurrency,
                "target": self.description,
                "statuses": codes_json(&self.statuses),
                "storm_s": self.storm_s,
                "rss_idle_kib": self.idle_kib,
                "rss_peak_kib": self.peak_kib,
                "rss_after_1s_kib": self.after_kib[0],
                "rss_after_5s_kib": self.after_kib[1],
                "rss_after_10s_kib": self.after_kib[2],
                "load": self.load,
                "passed": self.passed(),
            }))
            .to_string()
    }
}
