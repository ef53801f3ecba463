//! The ideal scenario (`--scenario ideal`): the machine's limit, measured
//! by the same clients as pgrelay, so that a report can set pgrelay's
//! figures beside the ideal's on the same machine in the same hour.
//!
//! The ideal broadcaster ([`broadcaster`]) is this executable run again
//! with `--ideal-serve`, a process of its own, so that its CPU and RSS are
//! read from /proc exactly as pgrelay's are (started and stopped by
//! [`crate::server::Server`]). The run is the load scenario's
//! ([`crate::load::measure`]): the same sockets on the dashboard path, the
//! same warm-up, window, drain, quiet check and report, with the events
//! made by the broadcaster instead of transactions. The bench keeps the
//! schedule, as it does with its writers: when a batch is due it writes
//! the batch's size on the broadcaster's stdin ([`Feed`], held open until
//! the end of the run, when closing it stops the broadcaster, as it does
//! should the bench die first), and the
//! broadcaster stamps `at` when it builds the batch, so "commit" is the
//! ideal's clock and the schedule's own lateness is not in the latency,
//! as the writers' is not in pgrelay's. Event ids are 1, 2, ... in
//! schedule order, so what every socket should get is known without a
//! log: every id above its `hello`'s `last_id`, once. No PostgreSQL.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::task::JoinHandle;

use crate::args::Args;
use crate::client::client_specs;
use crate::error::{BenchError, Result};
use crate::expected::{Audience, Expected};
use crate::load::{self, Report, Source};
use crate::server::Server;
use crate::writer::{Schedule, WriterCounts};

mod broadcaster;

pub(crate) use broadcaster::serve;

/// Measures the ideal broadcaster `server` (started by `Server::start` for
/// this scenario).
pub(crate) async fn bench(args: &Args, server: &Server) -> Result<Report> {
    let feed = server
        .feed()
        .ok_or_else(|| BenchError::run("the ideal broadcaster has no stdin to feed"))?;
    // Minted like the load run's (the broadcaster checks none).
    let specs = client_specs(&server.secret, args.sockets, 0)?;
    load::measure(args, server, specs, Source::Ideal(feed)).await
}

/// The broadcaster's stdin: one line a batch, its size. The server holds
/// it too, so that it stays open when the schedule ends.
#[derive(Clone)]
pub(crate) struct Feed(Arc<tokio::sync::Mutex<ChildStdin>>);

impl Feed {
    pub(crate) fn new(stdin: ChildStdin) -> Feed {
        Feed(Arc::new(tokio::sync::Mutex::new(stdin)))
    }

    /// Sends the batches of `args`' schedule (`--rate` events/s,
    /// `--rows-per-insert` a batch, for the warm-up and the measured
    /// phase), each when due, counted in `counts` as the writers count
    /// transactions. Returns the schedule's start and the task sending.
    pub(crate) fn start(
        self,
        args: &Args,
        counts: &Arc<WriterCounts>,
    ) -> (tokio::time::Instant, Vec<JoinHandle<()>>) {
        let length = args.warmup + args.duration;
        let per_batch = u64::from(args.rows_per_insert);
        let schedule = Schedule::new(1, args.rate, length, per_batch);
        let Feed(stdin) = self;
        let counts = Arc::clone(counts);
        let task = tokio::spawn(async move {
            let mut stdin = stdin.lock().await;
            for (due, batch) in schedule.of_writer(0) {
                tokio::time::sleep_until(due).await;
                let size = batch.end - batch.start;
                let sent = stdin.write_all(format!("{size}\n").as_bytes()).await;
                counts.count(
                    sent.map(|()| size)
                        .map_err(|e| format!("feeding the ideal: {e}")),
                );
            }
        });
        (schedule.start, vec![task])
    }
}

/// What every socket should get after `sent` events: ids 1 to `sent` (the
/// last id), those above its `hello`.
pub(crate) fn expected(sent: u64) -> (i64, Expected) {
    let last = i64::try_from(sent).unwrap_or(i64::MAX);
    (
        last,
        Expected::of(Audience::Dashboard, (1..=last).collect()),
    )
}
