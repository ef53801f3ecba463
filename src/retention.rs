//! Retention: deletes events older than `--retention` from `pgrelay.events`,
//! in small batches (short transactions, no long locks on the log), one
//! replica at a time (`pgrelay.prune` locks `pgrelay.prune_lock`, which no
//! application role can, and reports when
//! another replica holds it). A cursor below what was pruned gets `reset`.

use std::time::Duration;

use crate::db::Db;
use crate::shutdown::Shutdown;

/// Rows per delete: small enough to keep each transaction short.
const BATCH: i32 = 1_000;

/// Prunes every `every` until shutdown.
pub async fn run(db: Db, retention: Duration, every: Duration, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut total = 0i64;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match db.prune(retention, BATCH).await {
                Ok(Some(deleted)) => {
                    total += i64::from(deleted);
                    if deleted < BATCH {
                        break;
                    }
                }
                Ok(None) => {
                    tracing::debug!("another replica is pruning");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning failed; will retry");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(deleted = total, "pruned old events");
        }
    }
}
