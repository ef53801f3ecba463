//! The rows that make the events: real transactions on several
//! connections ([`Rows`] says which rows). A transaction carries
//! `--rows-per-insert` consecutive rows in one multi-row `INSERT` (one row
//! per transaction by default): at 2,000 rows/s one-row commits saturate
//! PostgreSQL on a 2-core machine, and batching is what a real producer at
//! that rate would do. Each row is still one event (the capture triggers
//! are per row). The paced writers follow an absolute schedule (row k at
//! start + k/R; a transaction goes when its last row is due), so a stall is
//! caught up afterwards rather than lowering the rate; [`insert_rows`]
//! goes as fast as it can.

use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgrelay::db::db_message;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;

use crate::error::{BenchError, Result};
use crate::server::connect_db;
use crate::stats::lock;

/// A reservation by user 1 (seeded) for business $1: `reservation_events`.
const RESERVE: &str = "INSERT INTO reservations (business_id, customer_id, starts_at, party_size) \
                       VALUES ($1, 1, now() + interval '1 day', 2)";
/// An update of business $1: `business_events` with `id` = $1.
const TOUCH: &str = "UPDATE businesses SET updated_at = clock_timestamp() WHERE id = $1";

/// `n` new businesses in one statement, owned by $1..$n.
fn insert_sql(n: usize) -> String {
    let mut sql = "INSERT INTO businesses (owner_id, name) VALUES ".to_owned();
    for i in 1..=n {
        let comma = if i > 1 { ", " } else { "" };
        let _ = write!(sql, "{comma}(${i}, 'bench business')");
    }
    sql
}

/// What the writers write.
#[derive(Clone)]
pub(crate) enum Rows {
    /// New businesses (`business_events`: the dashboard and `user:owner_id`),
    /// owned by users 1..=`owners` in turn, `per_insert` to a transaction.
    Businesses { owners: u64, per_insert: u64 },
    /// Rows for these businesses in turn, one per transaction, each
    /// business's stream key getting a share: reservations
    /// (`reservation_events`, `business_id` = key), and every fourth round
    /// over the keys an update of the business itself (`business_events`,
    /// `id` = key).
    Reservations(Arc<[i64]>),
}

impl Rows {
    /// Rows a transaction carries (the last one may carry fewer).
    fn per_insert(&self) -> u64 {
        match self {
            Rows::Businesses { per_insert, .. } => (*per_insert).max(1),
            Rows::Reservations(_) => 1,
        }
    }

    /// Every statement a full transaction may use.
    fn statements(&self) -> Vec<String> {
        match self {
            Rows::Businesses { .. } => vec![insert_sql(self.per_insert() as usize)],
            Rows::Reservations(_) => vec![RESERVE.into(), TOUCH.into()],
        }
    }

    /// Row k: its statement (an index into [`Self::statements`]) and its
    /// one parameter.
    fn row(&self, k: u64) -> (usize, i64) {
        match self {
            Rows::Businesses { owners, .. } => (0, (k % (*owners).max(1) + 1) as i64),
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
            prepared.push(client.prepare(&sql).await?);
        }
        Ok(prepared)
    }

    /// Writes `rows` (at most [`Self::per_insert`]), one transaction: one
    /// statement. Returns the rows written.
    async fn write(
        &self,
        client: &tokio_postgres::Client,
        prepared: &[Statement],
        rows: Range<u64>,
    ) -> Result<u64, tokio_postgres::Error> {
        let (statement, _) = self.row(rows.start);
        let params: Vec<i64> = rows.map(|k| self.row(k).1).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        if params.len() as u64 == self.per_insert() {
            client.execute(&prepared[statement], &refs).await
        } else {
            // The run's short last transaction (only new businesses have
            // transactions of more than one row).
            client.execute(&insert_sql(params.len()), &refs).await
        }
    }
}

/// Rows 0..`rows` in transactions of `per_insert` consecutive rows:
/// transaction j carries rows j×per_insert up to the next (the last
/// may carry fewer).
#[derive(Debug, Clone, Copy)]
struct Batches {
    rows: u64,
    per_insert: u64,
}

impl Batches {
    /// Transaction j's rows; none past the last.
    fn get(&self, j: u64) -> Option<Range<u64>> {
        let first = j.checked_mul(self.per_insert)?;
        (first < self.rows).then(|| first..(first + self.per_insert).min(self.rows))
    }
}

/// The rows the schedule has in `length` at `rate`: row k is due at k/rate,
/// and those due before the end go in.
fn rows_within(length: Duration, rate: u32) -> u64 {
    let rows = (length.as_nanos() * u128::from(rate)).div_ceil(1_000_000_000);
    u64::try_from(rows).unwrap_or(u64::MAX)
}

/// When a transaction of `rows` is due, after the schedule's start: when
/// its last row is (row k at k/rate).
fn due(rows: &Range<u64>, rate: u32) -> Duration {
    let last = u128::from(rows.end.saturating_sub(1));
    let nanos = last * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
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
    /// Rows written (events made).
    pub(crate) inserted: AtomicU64,
    /// Transactions committed.
    pub(crate) transactions: AtomicU64,
    /// Transactions that failed.
    pub(crate) errors: AtomicU64,
    pub(crate) first_error: Mutex<Option<String>>,
}

impl WriterCounts {
    fn error(&self, message: String) {
        self.errors.fetch_add(1, Relaxed);
        lock(&self.first_error).get_or_insert(message);
    }

    /// A transaction's outcome: the rows it wrote, or why it failed.
    pub(crate) fn count(&self, written: Result<u64, String>) {
        match written {
            Ok(rows) => {
                self.inserted.fetch_add(rows, Relaxed);
                self.transactions.fetch_add(1, Relaxed);
            }
            Err(e) => self.error(e),
        }
    }
}

/// When the transactions go in: transaction j on writer `j % writers`,
/// when its last row is due.
#[derive(Clone, Copy)]
pub(crate) struct Schedule {
    writers: u64,
    rate: u32,
    batches: Batches,
    pub(crate) start: tokio::time::Instant,
}

impl Schedule {
    /// `rate` rows/s for `length`, `per_insert` rows a transaction, over
    /// `writers`, from 50 ms from now.
    pub(crate) fn new(writers: usize, rate: u32, length: Duration, per_insert: u64) -> Schedule {
        Schedule {
            writers: writers.max(1) as u64,
            rate,
            batches: Batches {
                rows: rows_within(length, rate),
                per_insert,
            },
            start: tokio::time::Instant::now() + Duration::from_millis(50),
        }
    }

    /// Writer `index`'s transactions in order, each with when it is due.
    pub(crate) fn of_writer(
        self,
        index: u64,
    ) -> impl Iterator<Item = (tokio::time::Instant, Range<u64>)> {
        (index..)
            .step_by(self.writers as usize)
            .map_while(move |j| self.batches.get(j))
            .map(move |rows| (self.start + due(&rows, self.rate), rows))
    }
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
        let schedule = Schedule::new(self.0.len(), rate, length, rows.per_insert());
        let tasks = self
            .0
            .into_iter()
            .enumerate()
            .map(|(i, client)| {
                let (rows, counts) = (rows.clone(), Arc::clone(counts));
                tokio::spawn(writer(client, i as u64, schedule, rows, counts))
            })
            .collect();
        (schedule.start, tasks)
    }
}

async fn writer(
    client: tokio_postgres::Client,
    index: u64,
    schedule: Schedule,
    rows: Rows,
    counts: Arc<WriterCounts>,
) {
    let prepared = match rows.prepare(&client).await {
        Ok(prepared) => prepared,
        Err(e) => {
            counts.error(db_message(&e));
            return;
        }
    };
    for (due, batch) in schedule.of_writer(index) {
        tokio::time::sleep_until(due).await;
        let written = rows.write(&client, &prepared, batch).await;
        counts.count(written.map_err(|e| db_message(&e)));
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
            "{} transactions failed; first: {}",
            counts.errors.load(Relaxed),
            lock(&counts.first_error).clone().unwrap_or_default()
        )));
    }
    Ok(counts.inserted.load(Relaxed))
}

/// Writes `count` of `rows` through real transactions (as many rows each
/// as the paced writers) on `writers` connections, unpaced.
pub(crate) async fn insert_rows(
    database: &tokio_postgres::Config,
    writers: usize,
    count: u64,
    rows: &Rows,
) -> Result<()> {
    let batches = Batches {
        rows: count,
        per_insert: rows.per_insert(),
    };
    let mut tasks = Vec::new();
    for w in 0..writers as u64 {
        let client = connect_db(database).await?;
        let rows = rows.clone();
        tasks.push(tokio::spawn(async move {
            let prepared = rows
                .prepare(&client)
                .await
                .map_err(BenchError::db("preparing the inserts"))?;
            let mut j = w;
            while let Some(batch) = batches.get(j) {
                rows.write(&client, &prepared, batch)
                    .await
                    .map_err(BenchError::db("inserting"))?;
                j += writers as u64;
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
        let owners = Rows::Businesses {
            owners: 3,
            per_insert: 1,
        };
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
        assert_eq!(keys.per_insert(), 1);
    }

    #[test]
    fn multi_row_inserts() {
        assert_eq!(
            insert_sql(1),
            "INSERT INTO businesses (owner_id, name) VALUES ($1, 'bench business')"
        );
        assert_eq!(
            insert_sql(3),
            "INSERT INTO businesses (owner_id, name) VALUES ($1, 'bench business'), \
             ($2, 'bench business'), ($3, 'bench business')"
        );
        let rows = Rows::Businesses {
            owners: 2,
            per_insert: 3,
        };
        assert_eq!(rows.statements(), [insert_sql(3)]);
    }

    #[test]
    fn schedule_rows_and_batches() {
        // Row k at k/R, those before the end: 2 s at 100/s is rows 0..200,
        // and a fraction of a row's interval still takes the next row.
        assert_eq!(rows_within(Duration::from_secs(2), 100), 200);
        assert_eq!(rows_within(Duration::from_millis(2005), 100), 201);
        assert_eq!(rows_within(Duration::from_millis(1), 1), 1);
        assert_eq!(rows_within(Duration::ZERO, 100), 0);
        // One row per transaction: every row its own, due at k/R.
        let one = Batches {
            rows: 5,
            per_insert: 1,
        };
        assert_eq!(one.get(4), Some(4..5));
        assert_eq!(one.get(5), None);
        assert_eq!(due(&(4..5), 2000), Duration::from_micros(2000));
        // 10 rows in threes: every row exactly once, in order, the last
        // transaction short; each due when its last row is.
        let threes = Batches {
            rows: 10,
            per_insert: 3,
        };
        let all: Vec<_> = (0..).map_while(|j| threes.get(j)).collect();
        assert_eq!(all, [0..3, 3..6, 6..9, 9..10]);
        let dues: Vec<_> = all.iter().map(|b| due(b, 1000).as_millis()).collect();
        assert_eq!(dues, [2, 5, 8, 9]);
        assert_eq!(due(&(0..1), 7), Duration::ZERO);
        // Writers take every writers-th transaction: together, all of them
        // once, each when due. 1 s at 10/s in threes is `threes` again.
        let schedule = Schedule::new(4, 10, Duration::from_secs(1), 3);
        let mut batches: Vec<(Range<u64>, u128)> = (0..4)
            .flat_map(|w| schedule.of_writer(w))
            .map(|(due, rows)| (rows, (due - schedule.start).as_millis()))
            .collect();
        batches.sort_unstable_by_key(|(rows, _)| rows.start);
        assert_eq!(
            batches,
            [(0..3, 200), (3..6, 500), (6..9, 800), (9..10, 900)]
        );
        let mut second = schedule.of_writer(1).map(|(_, rows)| rows);
        assert_eq!((second.next(), second.next()), (Some(3..6), None));
    }
}
