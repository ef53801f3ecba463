//! The resume scenarios of issue 10 (item 2): what a resuming client costs
//! pgrelay and PostgreSQL, and that resuming loses and repeats nothing.
//!
//! - `sparse-resume`: a log of `--log-events` events written straight into
//!   `pgrelay.events` (generate_series, a few big statements: this measures
//!   replay, not capture), in which `--sparse-users` users own exactly
//!   `--sparse-events` events each, spread evenly over the id range, and
//!   `--busy-users` other users own the rest. It times one sparse user's
//!   resume on `/ws/notifications/` from `last_id=0` and from the oldest
//!   retained id (connect to last wanted event), then starts every sparse
//!   user's resume at once and checks each got exactly its events (against
//!   the log, routed by the bench's own router), counts closes by code (a
//!   1013 is retried with backoff), and afterwards counts pgrelay's pool
//!   backends still `active` in pg_stat_activity.
//! - `resume-storm`: `--sockets` clients (`--stream`) connect; rows go in
//!   live; pgrelay is stopped (SIGTERM), rows for those users go in through
//!   real transactions while it is down, it is started again on the same
//!   port, and every client reconnects at once with `?last_id=&epoch=`. At
//!   the end every client's ids are checked against the log as in the load
//!   run: 0 lost, 0 duplicated.
//!
//! Everything else (the throwaway cluster and child pgrelay, tokens, the
//! hand-made handshake, the per-client id ranges, the routing check, /proc
//! readings) is the load run's, used as it is.

use std::time::Duration;

use crate::args::{Args, Scenario};
use crate::error::{BenchError, Result};
use crate::server::Server;

mod sparse;
mod storm;

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Resume scenarios (--scenario sparse-resume | resume-storm)")]
pub(crate) struct ResumeArgs {
    /// sparse-resume: events in the log, written straight into pgrelay.events.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) log_events: i64,
    /// sparse-resume: users with few events each, spread evenly over the log.
    #[arg(long, default_value_t = 1000)]
    pub(crate) sparse_users: i64,
    /// sparse-resume: events of each sparse user.
    #[arg(long, default_value_t = 10)]
    pub(crate) sparse_events: i64,
    /// sparse-resume: users who own every other event.
    #[arg(long, default_value_t = 5000)]
    pub(crate) busy_users: i64,
    /// sparse-resume: runs of each single-user resume (median and max reported).
    #[arg(long, default_value_t = 5)]
    pub(crate) repeats: usize,
    /// resume-storm: rows inserted (one per transaction) while pgrelay is down.
    #[arg(long, default_value_t = 1000)]
    pub(crate) down_rows: u64,
    /// Longest a resume may take, retries included, before it counts as failed.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub(crate) resume_timeout: Duration,
}

impl ResumeArgs {
    pub(crate) fn check(&self) -> Result<()> {
        if self.sparse_users < 1 || self.sparse_events < 1 || self.busy_users < 1 {
            return Err(BenchError::Usage(
                "--sparse-users, --sparse-events and --busy-users must be at least 1",
            ));
        }
        if self.log_events < 2 * self.sparse_users * self.sparse_events {
            return Err(BenchError::Usage(
                "--log-events must be at least twice --sparse-users x --sparse-events",
            ));
        }
        if self.repeats == 0 || (2 * self.repeats) as i64 > self.sparse_users {
            return Err(BenchError::Usage(
                "--repeats must be between 1 and half of --sparse-users",
            ));
        }
        if self.resume_timeout.is_zero() {
            return Err(BenchError::Usage("--resume-timeout must be positive"));
        }
        Ok(())
    }
}

/// Runs the chosen resume scenario and prints its report; Ok(false) when a
/// check failed (lost, duplicated or wrong events, a 1011, a busy backend).
pub(crate) async fn run(args: &Args, server: &mut Server) -> Result<bool> {
    match args.scenario {
        Scenario::SparseResume => sparse::run(args, server).await,
        Scenario::ResumeStorm => storm::run(args, server).await,
        _ => Err(BenchError::run("not a resume scenario")),
    }
}

/// Backoff before retry `n` (0-based): 100 ms doubling up to 3.2 s, times
/// a random factor in [0.5, 1.5) so that refused clients do not return in step.
fn backoff(n: u32) -> Duration {
    let base = 100u64 << n.min(5);
    let jitter = rand::random_range(0..1000u64);
    Duration::from_millis(base * (500 + jitter) / 1000)
}

/// pgrelay's `replay_rows` counter (rows read to replay or catch up) so far.
async fn replay_rows(server: &Server) -> Option<f64> {
    server.metric("replay_rows").await
}

/// Rows read to replay or catch up since `before` ([`replay_rows`]); NaN
/// when /metrics did not answer.
async fn replay_rows_since(server: &Server, before: Option<f64>) -> f64 {
    match (before, replay_rows(server).await) {
        (Some(x), Some(y)) => y - x,
        _ => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        for n in 0..10 {
            let d = backoff(n).as_millis() as u64;
            let base = 100u64 << n.min(5);
            assert!(d >= base / 2 && d < base * 3 / 2, "retry {n}: {d} ms");
        }
    }
}
