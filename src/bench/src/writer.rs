//! The rows that make the events: real transactions, one `businesses` row
//! each, on several connections. The paced writers follow an absolute
//! schedule (row k at start + k/R), so a stall is caught up afterwards rather
//! than lowering the rate; [`insert_rows`] goes as fast as it can.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::error::{BenchError, Result};
use crate::server::connect_db;
use crate::stats::lock;

const INSERT: &str = "INSERT INTO businesses (owner_id, name) VALUES ($1, 'bench business')";

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
/// owned by user `k % owners + 1`, until `end`.
#[derive(Clone, Copy)]
struct Schedule {
    writers: usize,
    rate: u32,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
    owners: u64,
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

    /// Inserts at `rate` rows/s for `length` from 50 ms from now, rows owned
    /// by users 1..=`owners` in turn. Returns the start and the writers'
    /// tasks, which end with the schedule.
    pub(crate) fn start(
        self,
        rate: u32,
        length: Duration,
        owners: u64,
        counts: &Arc<WriterCounts>,
    ) -> (tokio::time::Instant, Vec<JoinHandle<()>>) {
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        let schedule = Schedule {
            writers: self.0.len(),
            rate,
            start,
            end: start + length,
            owners,
        };
        let tasks = self
            .0
            .into_iter()
            .enumerate()
            .map(|(i, client)| tokio::spawn(writer(client, i, schedule, Arc::clone(counts))))
            .collect();
        (start, tasks)
    }
}

async fn writer(
    client: tokio_postgres::Client,
    index: usize,
    schedule: Schedule,
    counts: Arc<WriterCounts>,
) {
    let Schedule {
        writers,
        rate,
        start,
        end,
        owners,
    } = schedule;
    let statement = match client.prepare(INSERT).await {
        Ok(statement) => statement,
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
        let owner = (k % owners + 1) as i64;
        match client.execute(&statement, &[&owner]).await {
            Ok(_) => {
                counts.inserted.fetch_add(1, Relaxed);
            }
            Err(e) => counts.error(&e),
        }
        k += writers as u64;
    }
}

/// Inserts at `rate` rows/s for `duration` with the load run's writers;
/// returns the rows inserted, or the first error if any insert failed.
pub(crate) async fn paced_rows(
    database: &tokio_postgres::Config,
    writers: usize,
    rate: u32,
    duration: Duration,
    owners: u64,
) -> Result<u64> {
    let counts = Arc::new(WriterCounts::default());
    let (_, tasks) = Writers::connect(database, writers)
        .await?
        .start(rate, duration, owners, &counts);
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

/// Inserts `rows` businesses through real transactions (one row each) on
/// `writers` connections, unpaced; row k is owned by user k mod owners + 1.
pub(crate) async fn insert_rows(
    database: &tokio_postgres::Config,
    writers: usize,
    rows: u64,
    owners: u64,
) -> Result<()> {
    let mut tasks = Vec::new();
    for w in 0..writers as u64 {
        let client = connect_db(database).await?;
        tasks.push(tokio::spawn(async move {
            let mut k = w;
            while k < rows {
                let owner = (k % owners + 1) as i64;
                client
                    .execute(INSERT, &[&owner])
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
