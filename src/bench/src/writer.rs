//! The rows that make the events: real transactions, one row each, on
//! several connections ([`Rows`] says which rows). The paced writers follow
//! an absolute schedule (row k at start + k/R), so a stall is caught up
//! afterwards rather than lowering the rate; [`insert_rows`] goes as fast as
//! it can.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::Statement;

use crate::error::{BenchError, Result};
use crate::server::connect_db;
use crate::stats::lock;

const INSERT: &str = "INSERT INTO businesses (owner_id, name) VALUES ($1, 'bench business')";
/// A reservation by user 1 (seeded) for business $1: `reservation_events`.
const RESERVE: &str = "INSERT INTO reservations (business_id, customer_id, starts_at, party_size) \
                       VALUES ($1, 1, now() + interval '1 day', 2)";
/// An update of business $1: `business_events` with `id` = $1.
const TOUCH: &str = "UPDATE businesses SET updated_at = clock_timestamp() WHERE id = $1";

/// What the writers write.
#[derive(Clone)]
pub(crate) enum Rows {
    /// New businesses (`business_events`: the dashboard and `user:owner_id`),
    /// owned by users 1..=`owners` in turn.
    Businesses { owners: u64 },
    /// Rows for these businesses in turn, each business's stream key getting
    /// a share: reservations (`reservation_events`, `business_id` = key),
    /// and every fourth round over the keys an update of the business
    /// itself (`business_events`, `id` = key).
    Reservations(Arc<[i64]>),
}

impl Rows {
    /// Every statement a row may use.
    fn statements(&self) -> &'static [&'static str] {
        match self {
            Rows::Businesses { .. } => &[INSERT],
            Rows::Reservations(_) => &[RESERVE, TOUCH],
        }
    }

    /// Row k: its statement (an index into [`Self::statements`]) and its
    /// one parameter.
    fn row(&self, k: u64) -> (usize, i64) {
        match self {
            Rows::Businesses { owners } => (0, (k % (*owners).max(1) + 1) as i64),
            Rows::Reservations(keys) => {
                let n = keys.len().max(1) as u64;
                let key = keys.get((k % n) as usize).copied().unwrap_or(0);
                (usize::from((k / n) % 4 == 3), key)
            }
        }
    }

    /// Prepares the statements on `client`.
    async fn prepare(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<Vec<Statement>, tokio_postgres::Error> {
        let mut prepared = Vec::new();
        for sql in self.statements() {
            prepared.push(client.prepare(sql).await?);
        }
        Ok(prepared)
    }

    /// Writes row k, one transaction.
    async fn write(
        &self,
        client: &tokio_postgres::Client,
        prepared: &[Statement],
        k: u64,
    ) -> Result<u64, tokio_postgres::Error> {
        let (statement, param) = self.row(k);
        client.execute(&prepared[statement], &[&param]).await
    }
}

/// `n` businesses owned by user 1 (one statement), for the business
/// stream's keys: their ids.
pub(crate) async fn create_businesses(
    database: &tokio_postgres::Config,
    n: usize,
) -> Result<Vec<i64>> {
    let client = connect_db(database).await?;
    let rows = client
        .query(
            "INSERT INTO businesses (owner_id, name) \
             SELECT 1, 'bench stream ' || g FROM generate_series(1, $1::bigint) g RETURNING id",
            &[&(n as i64)],
        )
        .await
        .map_err(BenchError::db("creating the stream's businesses"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[derive(Default)]
pub(crate) struct WriterCounts {
    pub(crate) inserted: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) first_error: Mutex<Option<String>>,
}

impl WriterCounts {
    fn error(&self, e: &tokio_postgres::Error) {
        self.errors.fetch_add(1, Relaxed);
        lock(&self.first_error).get_or_insert(pgrelay::db::db_message(e));
    }
}

/// When the rows go in: row k at `start + k/rate`, on writer `k % writers`,
/// until `end`.
#[derive(Clone, Copy)]
struct Schedule {
    writers: usize,
    rate: u32,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
}

/// Writer connections, open before the clock starts.
pub(crate) struct Writers(Vec<tokio_postgres::Client>);

impl Writers {
    pub(crate) async fn connect(database: &tokio_postgres::Config, n: usize) -> Result<Writers> {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(connect_db(database).await?);
        }
        Ok(Writers(clients))
    }

    /// Writes `rows` at `rate` rows/s for `length` from 50 ms from now.
    /// Returns the start and the writers' tasks, which end with the schedule.
    pub(crate) fn start(
        self,
        rate: u32,
        length: Duration,
        rows: &Rows,
        counts: &Arc<WriterCounts>,
    ) -> (tokio::time::Instant, Vec<JoinHandle<()>>) {
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let schedule = Schedule {
            writers: self.0.len(),
            rate,
            start,
            end: start + length,
        };
        let tasks = self
            .0
            .into_iter()
            .enumerate()
            .map(|(i, client)| {
                let (rows, counts) = (rows.clone(), Arc::clone(counts));
                tokio::spawn(writer(client, i, schedule, rows, counts))
            })
            .collect();
        (start, tasks)
    }
}

async fn writer(
    client: tokio_postgres::Client,
    index: usize,
    schedule: Schedule,
    rows: Rows,
    counts: Arc<WriterCounts>,
) {
    let Schedule {
        writers,
        rate,
        start,
        end,
    } = schedule;
    let prepared = match rows.prepare(&client).await {
        Ok(prepared) => prepared,
        Err(e) => {
            counts.error(&e);
            return;
        }
    };
    let mut k = index as u64;
    loop {
        let due = start + Duration::from_secs_f64(k as f64 / f64::from(rate));
        if due >= end {
            return;
        }
        tokio::time::sleep_until(due).await;
        match rows.write(&client, &prepared, k).await {
            Ok(_) => {
                counts.inserted.fetch_add(1, Relaxed);
            }
            Err(e) => counts.error(&e),
        }
        k += writers as u64;
    }
}

/// Writes `rows` at `rate` rows/s for `duration` with the load run's
/// writers; returns the rows written, or the first error if any failed.
pub(crate) async fn paced_rows(
    database: &tokio_postgres::Config,
    writers: usize,
    rate: u32,
    duration: Duration,
    rows: &Rows,
) -> Result<u64> {
    let counts = Arc::new(WriterCounts::default());
    let (_, tasks) = Writers::connect(database, writers)
        .await?
        .start(rate, duration, rows, &counts);
    for task in tasks {
        let _ = task.await;
    }
    if counts.errors.load(Relaxed) > 0 {
        return Err(BenchError::run(format!(
            "{} inserts failed; first: {}",
            counts.errors.load(Relaxed),
            lock(&counts.first_error).clone().unwrap_or_default()
        )));
    }
    Ok(counts.inserted.load(Relaxed))
}

/// Writes `count` of `rows` through real transactions (one row each) on
/// `writers` connections, unpaced.
pub(crate) async fn insert_rows(
    database: &tokio_postgres::Config,
    writers: usize,
    count: u64,
    rows: &Rows,
) -> Result<()> {
    let mut tasks = Vec::new();
    for w in 0..writers as u64 {
        let client = connect_db(database).await?;
        let rows = rows.clone();
        tasks.push(tokio::spawn(async move {
            let prepared = rows
                .prepare(&client)
                .await
                .map_err(BenchError::db("preparing the inserts"))?;
            let mut k = w;
            while k < count {
                rows.write(&client, &prepared, k)
                    .await
                    .map_err(BenchError::db("inserting"))?;
                k += writers as u64;
            }
            Ok::<_, BenchError>(())
        }));
    }
    for task in tasks {
        task.await.map_err(BenchError::task("a writer failed"))??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_spread_over_owners_and_keys() {
        let owners = Rows::Businesses { owners: 3 };
        let params: Vec<_> = (0..4).map(|k| owners.row(k)).collect();
        assert_eq!(params, [(0, 1), (0, 2), (0, 3), (0, 1)]);
        let keys = Rows::Reservations(vec![10, 20].into());
        let rows: Vec<_> = (0..10).map(|k| keys.row(k)).collect();
        // Rounds 0..=2 reserve, round 3 updates, each key in turn.
        assert_eq!(
            rows,
            [
                (0, 10),
                (0, 20),
                (0, 10),
                (0, 20),
                (0, 10),
                (0, 20),
                (1, 10),
                (1, 20),
                (0, 10),
                (0, 20)
            ]
        );
        assert_eq!(keys.statements()[1], TOUCH);
    }
}
