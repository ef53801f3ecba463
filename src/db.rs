//! The deadpool pool and every query pgrelay makes through it: replay pages,
//! the newest events at start ([`Db::newest`], which `recent` is primed
//! with), the log's epoch and retention cursor, pruning, the admin and stream
//! queries ([`Db::ask`]), the bell's history pages, read state, unread
//! count and `mark_read`, the listener's probe NOTIFY.
//!
//! [`LogReader`] is the one reader of the log: pages of events above a
//! [`Cursor`], up to a bound, with one stop rule. Where its reads go is the
//! caller's choice of [`Source`]: the listener's catch-up and wake-up reads
//! on its own LISTEN connection (pages of 1,000, unbounded, a 10 s deadline
//! kept by pgrelay: a session setting there could leak through a transaction
//! pooler to other clients), replays through
//! the pool under the statement timeout (pages of 500 over windows of
//! [`REPLAY_WINDOW`] ids, a user's stream filtered in SQL). Every page of
//! events, history and priming included, is bounded in bytes too
//! ([`PAGE_BYTES`]): rows are counted by the thousand, but an event may be
//! a mebibyte.
//!
//! The LISTEN connection is not here (see `listen`): a pooled connection
//! cannot carry LISTEN. Every query takes typed parameters; nothing is built by
//! formatting strings.
//!
//! No named prepared statement outlives a transaction: every query is sent
//! as one unnamed parse-bind-execute (`query_typed`), so the pool (and the
//! listener's reads) work through PgBouncer in transaction mode of any
//! version, where a statement prepared in one transaction may be missing in
//! the next (the server connection changes). Only `--admin-query`, whose
//! parameter type is the server's to say, prepares, inside a transaction.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::value::RawValue;
use tokio_postgres::types::Type;
use tokio_postgres::Row;

use crate::parse::{check_object, truncated, Event};
use crate::route::{is_integer_id, KeyFilter};
use crate::wire::ReadState;

/// The largest payload delivered whole, as JSON text. Capture already logs a
/// stub for rows above its own cap (`install --max-event-size`); this is the
/// net under anything else in the log (rows written by hand, or by an older
/// capture): one event too large for a client's frame limit would break
/// every socket it is routed to, on every resume. Well under a WebSocket
/// client's usual 16 MiB frame limit.
pub const MAX_DELIVERED_EVENT: usize = 8 << 20;
use crate::pgconn::Target;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("could not create database pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    #[error("pgrelay is not installed in this database (run `pgrelay install`)")]
    NotInstalled,
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("event {id} has a malformed payload: {reason}")]
    BadRow { id: i64, reason: String },
    #[error("read beyond the newest event")]
    ReadBeyondHead,
    #[error("read state kept for too many streams")]
    TooManyReadStates,
}

/// One line for a database error: the server's own message when there is one,
/// else the error with its causes ("error connecting to server: Connection
/// refused (os error 111)"), never the connection string.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_owned();
    }
    let mut line = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// The log's identity and retention cursor (`pgrelay.meta`).
#[derive(Debug, Clone, PartialEq)]
pub struct LogInfo {
    pub epoch: String,
    /// Retention may have deleted every id up to this one.
    pub pruned_through: i64,
    /// The newest id in the log, or the last pruned one if retention emptied
    /// it (0 for a log that never had an event).
    pub max_id: i64,
}

/// A small pool for reads: replay pages, the epoch, pruning, the admin query,
/// the probe NOTIFY (new events are read on the listener's own connection).
#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

/// No database call waits longer than this: a cut network must not hang a
/// replay or the listener.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection settings every pgrelay connection gets unless the URL says
/// otherwise: a name in pg_stat_activity, a bounded connect, and keepalives
/// and a TCP user timeout so a dead server or cut network is noticed on idle
/// connections (the LISTEN connection is idle most of the time).
pub fn harden(config: &mut Target) {
    if config.get_application_name().is_none() {
        config.application_name("pgrelay");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    config.keepalives_interval(Duration::from_secs(5));
    config.keepalives_retries(3);
    config.tcp_user_timeout(Duration::from_secs(30));
}

impl Db {
    async fn timed<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        tokio::time::timeout(QUERY_TIMEOUT, call)
            .await
            .map_err(|_| DbError::Timeout(what))?
    }

    pub fn new(target: Target, size: usize) -> Result<Db, DbError> {
        let (config, tls) = target.into_parts();
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                // Verified: a connection a network cut left half-open fails
                // the check (within recycle_timeout) instead of hanging the
                // next query.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()?;
        Ok(Db { pool })
    }

    /// The epoch, retention cursor and newest id; `NotInstalled` when the
    /// pgrelay schema is missing.
    pub async fn log_info(&self) -> Result<LogInfo, DbError> {
        self.timed("log info", async {
            let mut client = self.pool.get().await?;
            let tx = bounded(&mut client).await?;
            let row = tx
                .query_typed_opt(
                    // Retention may have emptied the log: the newest id ever
                    // handed out is then the pruned one.
                    "SELECT m.epoch, m.pruned_through, \
                            greatest(coalesce((SELECT max(id) FROM pgrelay.events), 0), \
                                     m.pruned_through) \
                     FROM pgrelay.meta m",
                    &[],
                )
                .await
                .map_err(|e| match e.code() {
                    Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                        DbError::NotInstalled
                    }
                    _ => DbError::Query(e),
                })?
                .ok_or(DbError::NotInstalled)?;
            tx.commit().await?;
            Ok(LogInfo {
                epoch: row.try_get(0)?,
                pruned_through: row.try_get(1)?,
                max_id: row.try_get(2)?,
            })
        })
        .await
    }

    /// One page through the pool: up to `limit` events on `channels` with
    /// `after < id <= upto`, in id order. [`LogReader`] bounds `upto - after`
    /// (see [`REPLAY_WINDOW`]); the server bounds the time.
    async fn events_between(
        &self,
        after: i64,
        upto: i64,
        channels: &[String],
        limit: i64,
    ) -> Result<Page, DbError> {
        self.timed("events between", async {
            let mut client = self.pool.get().await?;
            let tx = bounded(&mut client).await?;
            let page = read_events(&*tx, after, upto, channels, limit).await?;
            tx.commit().await?;
            Ok(page)
        })
        .await
    }

    /// One page of a keyed replay (see [`KEYED_EVENTS_BETWEEN`]): up to
    /// `limit` events with `after < id <= upto` whose routed field names
    /// `filter`'s key, in id order.
    async fn keyed_events_between(
        &self,
        after: i64,
        upto: i64,
        filter: &KeyFilter,
        limit: i64,
    ) -> Result<Page, DbError> {
        self.timed("keyed events between", async {
            let mut client = self.pool.get().await?;
            let tx = bounded(&mut client).await?;
            let range = [after, upto];
            let rows = tx
                .query_typed(KEYED_EVENTS_BETWEEN, &keyed_params(&range, filter, &limit))
                .await?;
            tx.commit().await?;
            page_from_rows(&rows, limit)
        })
        .await
    }
}

/// Ids one replay page may cover at most: with the primary key, a page
/// scans at most this many rows whatever the log holds, and a replay moves
/// on by whole windows where nothing matches.
pub const REPLAY_WINDOW: i64 = 100_000;

/// The server-side limit on every query through the pool that reads the log
/// (replay pages, log info, pruning) and on the admin query: a query
/// pgrelay has given up on (the socket left, the deadline passed) does not
/// keep running inside PostgreSQL. `SET LOCAL`, so a transaction-mode
/// pooler hands no setting on to its other clients.
const STATEMENT_TIMEOUT: &str = "SET LOCAL statement_timeout = '5s'";

/// A transaction whose statements PostgreSQL itself stops after
/// [`STATEMENT_TIMEOUT`].
async fn bounded(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, DbError> {
    let tx = client.transaction().await?;
    tx.batch_execute(STATEMENT_TIMEOUT).await?;
    Ok(tx)
}

/// The payload bytes a page of events holds at most, besides its last
/// event: a page ends at its row limit or at the event that takes its
/// payloads to this, whichever comes first (see [`sized`]). Without it a
/// replay page of 500 rows could hold 500 MiB (`install --max-event-size`
/// allows 1 MiB an event by default), and a priming page twice that.
pub const PAGE_BYTES: i64 = 2 << 20;

/// Wraps a page query (its rows `id, channel, table_name, op, at, payload`
/// in id order `$order`, under a row limit) so that it returns its rows
/// only while the payloads before each come to less than [`PAGE_BYTES`]
/// (the first row always), with a seventh column, `more`: whether rows of
/// the page were left out after it (on the last row returned, whether the
/// byte bound ended the page). The window runs over the limited rows as
/// they stream from the index (no sort), but PostgreSQL still builds every
/// row under the limit before the bound cuts them: a read that goes on
/// after a page its bytes ended asks for fewer rows ([`Page::next_limit`]),
/// or a run of large events would be built again at every page.
macro_rules! sized {
    ($order:literal, $($inner:expr),+ $(,)?) => {
        concat!(
            "SELECT id, channel, table_name, op, at, payload, more FROM (\
             SELECT page.*, \
             sum(octet_length(payload)) OVER w - octet_length(payload) AS earlier, \
             lead(id) OVER w IS NOT NULL AS more FROM (",
            $($inner),+,
            ") AS page WINDOW w AS (ORDER BY id ", $order, " ROWS UNBOUNDED PRECEDING)\
             ) AS sized WHERE earlier < 2097152 ORDER BY id ", $order
        )
    };
}

/// A page's columns from `pgrelay.events`, as [`sized`] takes them.
macro_rules! event_columns {
    () => {
        "SELECT id, channel, table_name, op, pgrelay.format_at(created_at) AS at, \
         payload::text AS payload FROM pgrelay.events"
    };
}

/// Up to `$4` events on channels `$3` with `$1 < id <= $2`, in id order
/// (and up to [`PAGE_BYTES`]).
pub const EVENTS_BETWEEN: &str = sized!(
    "ASC",
    event_columns!(),
    " WHERE id > $1 AND id <= $2 AND channel = ANY($3) ORDER BY id LIMIT $4"
);

/// Like [`EVENTS_BETWEEN`], for one key (a user's notifications, or one key
/// of a stream): only rows whose routed field (`$4` channels paired with `$5`
/// fields) names the key `$6` by the rule of `route::user_id` (a JSON string
/// equal to it, or, when `$7` says the key is an integer, a JSON number
/// written the same), so a keyed replay ships only that key's events. `$3` holds the same as containment patterns
/// (`{"field": "42"}`, `{"field": 42}`), which the GIN index on the payload
/// answers without reading other users' rows.
pub const KEYED_EVENTS_BETWEEN: &str = sized!(
    "ASC",
    event_columns!(),
    " e WHERE id > $1 AND id <= $2 AND ",
    keyed!(),
    " ORDER BY id LIMIT $8"
);

/// The rows of one key ($3 to $7 as in [`KEYED_EVENTS_BETWEEN`]).
macro_rules! keyed {
    () => {
        "e.payload @> ANY ($3::text[]::jsonb[]) \
         AND EXISTS ( \
             SELECT 1 FROM unnest($4::text[], $5::text[]) AS r(ch, f) \
             WHERE r.ch = e.channel \
               AND CASE jsonb_typeof(e.payload -> r.f) \
                       WHEN 'string' THEN true WHEN 'number' THEN $7 ELSE false END \
               AND e.payload ->> r.f = $6)"
    };
}
use keyed;

/// History, newest first: up to `$8` events of one key with
/// `$2 <= id < $1`, read-state changes left out.
const KEYED_HISTORY: &str = sized!(
    "DESC",
    event_columns!(),
    " e WHERE id < $1 AND id >= $2 AND channel <> 'pgrelay_read' AND ",
    keyed!(),
    " ORDER BY id DESC LIMIT $8"
);

/// The SQLSTATE `pgrelay.mark_read` raises for a stream beyond a user's
/// 10,000.
const TOO_MANY_READ_STATES: &str = "PR001";

/// History on channels (the dashboard), newest first: up to `$4` events
/// with `$2 <= id < $1` on channels `$3`.
const CHANNEL_HISTORY: &str = sized!(
    "DESC",
    event_columns!(),
    " WHERE id < $1 AND id >= $2 AND channel = ANY($3) ORDER BY id DESC LIMIT $4"
);

/// Unread events of one key with `$1 < id <= $2`, not among `$9`, counted
/// up to `$8`.
const KEYED_UNREAD: &str = concat!(
    "SELECT count(*) FROM (SELECT 1 FROM pgrelay.events e \
     WHERE id > $1 AND id <= $2 AND channel <> 'pgrelay_read' AND NOT (id = ANY($9)) AND ",
    keyed!(),
    " LIMIT $8) AS unread"
);

/// Unread events on channels `$3` with `$1 < id <= $2`, not among `$5`,
/// counted up to `$4`.
const CHANNEL_UNREAD: &str = "SELECT count(*) FROM (SELECT 1 FROM pgrelay.events \
     WHERE id > $1 AND id <= $2 AND channel = ANY($3) AND NOT (id = ANY($5)) LIMIT $4) AS unread";

/// Which rows of the log a stream shows: the dashboard's channels, or the
/// rows one key's filter matches (a user's notifications, a stream key).
#[derive(Clone, Copy)]
pub enum Visible<'a> {
    Channels(&'a [String]),
    Keyed(&'a KeyFilter),
}

/// One page of the log: its readable events, and how far it went.
#[derive(Debug, Default)]
pub struct Page {
    pub events: Vec<Event>,
    /// The id of the page's last row, readable or not: the next page starts
    /// after it, so a malformed row cannot stop the reader.
    pub last_id: Option<i64>,
    /// Rows read, readable or not.
    pub rows: usize,
    /// Rows of the page's range were left unread after `last_id`: its row
    /// limit or [`PAGE_BYTES`] ended it, so the next page starts after it.
    pub more: bool,
}

impl Page {
    /// The row limit of the page after this one, read under `limit`, for a
    /// read whose own limit is `max`. After a page its bytes ended, twice
    /// its rows: the rows that follow are likely as large, and PostgreSQL
    /// builds every row under the limit before [`PAGE_BYTES`] cuts them, so
    /// it builds at most about twice what it returns (with `max` each page,
    /// a run of large events cost it the square of its length). After a
    /// page its rows ended, twice the limit again, up to `max`.
    pub fn next_limit(&self, limit: i64, max: i64) -> i64 {
        let rows = self.rows as i64;
        if self.more && rows < limit {
            (2 * rows).clamp(1, max)
        } else {
            limit.saturating_mul(2).min(max)
        }
    }
}

/// The rows on `channels` with `floor <= id < before`, newest first, at
/// most `limit` ([`CHANNEL_HISTORY`]).
async fn channel_history(
    tx: &deadpool_postgres::Transaction<'_>,
    channels: &[String],
    before: i64,
    floor: i64,
    limit: i64,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let range = [before, floor];
    tx.query_typed(CHANNEL_HISTORY, &channel_params(&range, &channels, &limit))
        .await
}

/// A `(read_up_to, read_ids, cleared_through)` row.
fn read_state_from_row(row: &Row) -> Result<ReadState, DbError> {
    Ok(ReadState {
        up_to: row.try_get(0)?,
        ids: row.try_get(1)?,
        cleared_through: row.try_get(2)?,
    })
}

/// Where a read of the log stands: the events above `after`, up to `upto`,
/// at most `page` rows a page, each page within `window` ids of its start
/// (`i64::MAX` for either: no bound).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cursor {
    pub after: i64,
    pub upto: i64,
    pub window: i64,
    pub page: i64,
}

impl Cursor {
    /// The next page's id range, `after < id <= end`, or `None` once the read
    /// has reached `upto`.
    fn next(&self) -> Option<(i64, i64)> {
        (self.after < self.upto).then(|| {
            let end = self.upto.min(self.after.saturating_add(self.window));
            (self.after, end)
        })
    }

    /// The one stop rule, after a page read over `(after, end]`: a page that
    /// left rows unread ([`Page::more`]) makes the next start after its last
    /// row (readable or not); one that did not covered its range, so the
    /// next starts at `end` (a window with no match costs one cheap page).
    fn advance(&mut self, end: i64, page: &Page) {
        self.after = match page.last_id {
            Some(last) if page.more => last,
            _ => end,
        };
    }
}

/// What a [`LogReader`] reads its pages from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// A connection of the caller's own (the listener's, so a storm of
    /// replays cannot starve it of pool connections): the events on
    /// `channels`, each page bounded in time here.
    Connection {
        client: &'a tokio_postgres::Client,
        channels: &'a [String],
    },
    /// The pool, each page in a transaction under the statement timeout: the
    /// events on `channels`.
    Pool { db: &'a Db, channels: &'a [String] },
    /// The pool, likewise: one key's events (a user's, a stream key's),
    /// filtered in SQL (see [`KEYED_EVENTS_BETWEEN`]), so only its rows
    /// leave the database.
    Keyed { db: &'a Db, filter: &'a KeyFilter },
}

/// The one reader of the log, shared by the listener (catch-up and wake-up
/// reads) and replays: pages of events above a [`Cursor`], in id order,
/// until the cursor reaches its bound.
pub struct LogReader<'a> {
    source: Source<'a>,
    cursor: Cursor,
    /// The next page's row limit, at most the cursor's ([`Page::next_limit`]).
    limit: i64,
    /// The id of the last row read, readable or not (the start before any).
    last: i64,
}

impl<'a> LogReader<'a> {
    pub fn new(source: Source<'a>, cursor: Cursor) -> LogReader<'a> {
        LogReader {
            source,
            last: cursor.after,
            limit: cursor.page,
            cursor,
        }
    }

    /// The next page, or `None` when the read is done. A page may hold no
    /// readable event and still not be the last.
    pub async fn next_page(&mut self) -> Result<Option<Page>, DbError> {
        let Some((after, end)) = self.cursor.next() else {
            return Ok(None);
        };
        let limit = self.limit;
        let page = match self.source {
            Source::Connection { client, channels } => {
                let read = read_events(client, after, end, channels, limit);
                tokio::time::timeout(QUERY_TIMEOUT, read)
                    .await
                    .map_err(|_| DbError::Timeout("reading new events"))??
            }
            Source::Pool { db, channels } => db.events_between(after, end, channels, limit).await?,
            Source::Keyed { db, filter } => {
                db.keyed_events_between(after, end, filter, limit).await?
            }
        };
        self.cursor.advance(end, &page);
        self.limit = page.next_limit(limit, self.cursor.page);
        self.last = page.last_id.unwrap_or(self.last);
        Ok(Some(page))
    }

    /// The id of the last row read so far, readable or not (the cursor's
    /// start before any): where the next read of new events starts.
    pub fn last_id(&self) -> i64 {
        self.last
    }
}

/// Runs [`EVENTS_BETWEEN`] on `client` (a pooled transaction or the
/// listener's connection). A row that is not a valid event (written by hand
/// into the log) is logged and skipped.
async fn read_events(
    client: &impl tokio_postgres::GenericClient,
    after: i64,
    upto: i64,
    channels: &[String],
    limit: i64,
) -> Result<Page, DbError> {
    let range = [after, upto];
    let rows = client
        .query_typed(EVENTS_BETWEEN, &channel_params(&range, &channels, &limit))
        .await?;
    page_from_rows(&rows, limit)
}

/// The page of `rows` read under a row `limit` by a [`sized`] query.
fn page_from_rows(rows: &[Row], limit: i64) -> Result<Page, DbError> {
    let cut = match rows.last() {
        Some(last) => last.try_get(6)?,
        None => false,
    };
    let mut page = Page {
        rows: rows.len(),
        more: cut || rows.len() as i64 >= limit,
        ..Page::default()
    };
    for row in rows {
        page.last_id = Some(row.try_get(0)?);
        match event_from_row(row) {
            Ok(event) => page.events.push(event),
            Err(e @ DbError::BadRow { .. }) => tracing::warn!(error = %e, "skipping event"),
            Err(e) => return Err(e),
        }
    }
    Ok(page)
}

fn event_from_row(row: &Row) -> Result<Event, DbError> {
    let id: i64 = row.try_get(0)?;
    let data: String = row.try_get(5)?;
    let data = if data.len() > MAX_DELIVERED_EVENT {
        tracing::warn!(
            id,
            bytes = data.len(),
            "event payload over {MAX_DELIVERED_EVENT} bytes: delivering a truncated stub"
        );
        truncated(&data)
    } else {
        RawValue::from_string(data).map_err(|e| DbError::BadRow {
            id,
            reason: e.to_string(),
        })?
    };
    check_object(&data).map_err(|e| DbError::BadRow {
        id,
        reason: e.to_string(),
    })?;
    Ok(Event {
        id,
        channel: row.try_get(1)?,
        table: row.try_get(2)?,
        op: row.try_get(3)?,
        at: row.try_get(4)?,
        data,
    })
}

impl Db {
    /// One window of history, newest first: up to `limit` events that
    /// `visible` shows with `floor <= id < before`. The caller bounds
    /// `before - floor` (one [`REPLAY_WINDOW`] a call), as a replay does.
    pub async fn history(
        &self,
        visible: Visible<'_>,
        before: i64,
        floor: i64,
        limit: i64,
    ) -> Result<Page, DbError> {
        self.timed("history", async {
            let mut client = self.pool.get().await?;
            let tx = bounded(&mut client).await?;
            let rows = match visible {
                Visible::Channels(channels) => {
                    channel_history(&tx, channels, before, floor, limit).await?
                }
                Visible::Keyed(filter) => {
                    let range = [before, floor];
                    tx.query_typed(KEYED_HISTORY, &keyed_params(&range, filter, &limit))
                        .await?
                }
            };
            tx.commit().await?;
            page_from_rows(&rows, limit)
        })
        .await
    }

    /// The newest events on `channels` with `floor < id <= head`, newest
    /// first, at most `limit`, and then, in the same transaction, the log's
    /// `pruned_through`: retention deletes rows and moves it in one
    /// transaction, so a row missing from the page because it was pruned is
    /// at or below the value returned. The caller bounds `head - floor`
    /// (one [`REPLAY_WINDOW`]). What `recent` primes itself with.
    pub async fn newest(
        &self,
        channels: &[String],
        head: i64,
        floor: i64,
        limit: i64,
    ) -> Result<(Page, i64), DbError> {
        self.timed("newest events", async {
            let mut client = self.pool.get().await?;
            let tx = bounded(&mut client).await?;
            let (before, lowest) = (head.saturating_add(1), floor.saturating_add(1));
            let rows = channel_history(&tx, channels, before, lowest, limit).await?;
            let pruned = tx
                .query_typed_one("SELECT pruned_through FROM pgrelay.meta", &[])
                .await?;
            tx.commit().await?;
            Ok((page_from_rows(&rows, limit)?, pruned.try_get(0)?))
        })
        .await
    }

    /// A user's read state on `stream` (all zero when they have none).
    pub async fn read_state(&self, user: &str, stream: &str) -> Result<ReadState, DbError> {
        self.timed("read state", async {
            let mut client = self.pool.get().await?;
            let tx = bounded(&mut client).await?;
            let row = tx
                .query_typed_opt(
                    "SELECT read_up_to, read_ids, cleared_through FROM pgrelay.read_state \
                     WHERE user_id = $1 AND stream = $2",
                    &[(&user, Type::TEXT), (&stream, Type::TEXT)],
                )
                .await?;
            tx.commit().await?;
            Ok(match row {
                None => ReadState::default(),
                Some(row) => read_state_from_row(&row)?,
            })
        })
        .await
    }

    /// How many events `visible` shows with `after < id <= upto` that are
    /// not in `read_ids`, counted up to `cap`. The caller bounds
    /// `upto - after` (one [`REPLAY_WINDOW`]).
    pub async fn unread(
        &self,
        visible: Visible<'_>,
        after: i64,
        upto: i64,
        read_ids: &[i64],
        cap: i64,
    ) -> Result<i64, DbError> {
        self.timed("unread count", async {
            let mut client = self.pool.get().await?;
            let tx = bounded(&mut client).await?;
            let row = match visible {
                Visible::Channels(channels) => {
                    let range = [after, upto];
                    let mut params = channel_params(&range, &channels, &cap);
                    params.push((&read_ids, Type::INT8_ARRAY));
                    tx.query_typed_one(CHANNEL_UNREAD, &params).await?
                }
                Visible::Keyed(filter) => {
                    let range = [after, upto];
                    let mut params = keyed_params(&range, filter, &cap);
                    params.push((&read_ids, Type::INT8_ARRAY));
                    tx.query_typed_one(KEYED_UNREAD, &params).await?
                }
            };
            tx.commit().await?;
            Ok(row.try_get(0)?)
        })
        .await
    }

    /// `pgrelay.mark_read`: moves `user`'s read state on `stream` forward
    /// and puts the change in the log. An id beyond the newest event is
    /// [`DbError::ReadBeyondHead`]; a new stream for a user with state on
    /// 10,000 already, [`DbError::TooManyReadStates`].
    pub async fn mark_read(
        &self,
        user: &str,
        stream: &str,
        up_to: Option<i64>,
        ids: &[i64],
        clear: bool,
    ) -> Result<ReadState, DbError> {
        self.timed("mark read", async {
            let mut client = self.pool.get().await?;
            let tx = bounded(&mut client).await?;
            let row = tx
                .query_typed_one(
                    "SELECT read_up_to, read_ids, cleared_through \
                     FROM pgrelay.mark_read($1, $2, $3, $4, $5)",
                    &[
                        (&user, Type::TEXT),
                        (&stream, Type::TEXT),
                        (&up_to, Type::INT8),
                        (&ids, Type::INT8_ARRAY),
                        (&clear, Type::BOOL),
                    ],
                )
                .await
                .map_err(|e| match e.code() {
                    Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE) => {
                        DbError::ReadBeyondHead
                    }
                    Some(code) if code.code() == TOO_MANY_READ_STATES => DbError::TooManyReadStates,
                    _ => DbError::Query(e),
                })?;
            tx.commit().await?;
            read_state_from_row(&row)
        })
        .await
    }
}

/// The first four parameters of the channel queries (the dashboard's):
/// the id range, the channels, then `limit`.
fn channel_params<'a>(
    ids: &'a [i64; 2],
    channels: &'a &'a [String],
    limit: &'a i64,
) -> Vec<(&'a (dyn tokio_postgres::types::ToSql + Sync), Type)> {
    vec![
        (&ids[0], Type::INT8),
        (&ids[1], Type::INT8),
        (channels, Type::TEXT_ARRAY),
        (limit, Type::INT8),
    ]
}

/// The first eight parameters of the keyed queries: the id range, then
/// [`KEYED_EVENTS_BETWEEN`]'s `$3` to `$7`, then `limit`.
fn keyed_params<'a>(
    ids: &'a [i64; 2],
    filter: &'a KeyFilter,
    limit: &'a i64,
) -> Vec<(&'a (dyn tokio_postgres::types::ToSql + Sync), Type)> {
    vec![
        (&ids[0], Type::INT8),
        (&ids[1], Type::INT8),
        (&filter.patterns, Type::TEXT_ARRAY),
        (&filter.channels, Type::TEXT_ARRAY),
        (&filter.fields, Type::TEXT_ARRAY),
        (&filter.key, Type::TEXT),
        (&filter.integer, Type::BOOL),
        (limit, Type::INT8),
    ]
}

impl Db {
    /// Deletes one batch of events older than `older_than`; `None` when
    /// another replica holds the pruning lock.
    pub async fn prune(&self, older_than: Duration, batch: i32) -> Result<Option<i32>, DbError> {
        self.timed("prune", async {
            let mut client = self.pool.get().await?;
            let tx = bounded(&mut client).await?;
            let interval = format!("{} milliseconds", older_than.as_millis());
            let row = tx
                .query_typed_one(
                    "SELECT pgrelay.prune($1::text::interval, $2)",
                    &[(&interval, Type::TEXT), (&batch, Type::INT4)],
                )
                .await?;
            tx.commit().await?;
            let deleted: i32 = row.try_get(0)?;
            Ok((deleted >= 0).then_some(deleted))
        })
        .await
    }
}

impl Db {
    /// Runs a yes/no query (`--admin-query`, a stream's `--stream-query`):
    /// `$1`, `$2`... are `args` (ids as text), each converted to its
    /// parameter's type (integer or text); the first column of the first row
    /// is the answer (no row: no).
    pub async fn ask(
        &self,
        what: &'static str,
        query: &str,
        args: &[&str],
    ) -> Result<bool, DbError> {
        self.timed(what, async {
            use tokio_postgres::types::ToSql;
            let mut client = self.pool.get().await?;
            // Prepared and run in one transaction, so a transaction-mode
            // pooler keeps the same server connection between the two.
            let tx = bounded(&mut client).await?;
            let statement = tx.prepare(query).await?;
            let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::with_capacity(args.len());
            for (i, arg) in args.iter().enumerate() {
                let param_type = statement.params().get(i).cloned().unwrap_or(Type::TEXT);
                // An integer parameter takes only an id in canonical form:
                // "01" or "+1" would name id 1 to the query while routing
                // and the socket caps see another. An id the column cannot
                // hold names nothing either: the answer is no.
                let integer = is_integer_id(arg);
                let param: Box<dyn ToSql + Sync + Send> = match param_type {
                    Type::INT8 => match arg.parse::<i64>().ok().filter(|_| integer) {
                        Some(id) => Box::new(id),
                        None => return Ok(false),
                    },
                    Type::INT4 => match arg.parse::<i32>().ok().filter(|_| integer) {
                        Some(id) => Box::new(id),
                        None => return Ok(false),
                    },
                    _ => Box::new(arg.to_string()),
                };
                params.push(param);
            }
            // A query may use fewer parameters than it is given.
            let used = statement.params().len().min(params.len());
            let refs: Vec<&(dyn ToSql + Sync)> = params[..used]
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let row = tx.query_opt(&statement, &refs).await?;
            // Closed before the commit, on the server connection it lives on.
            drop(statement);
            tx.commit().await?;
            match row {
                None => Ok(false),
                Some(row) => Ok(row.try_get::<_, Option<bool>>(0)?.unwrap_or(false)),
            }
        })
        .await
    }
}

impl Db {
    /// `pg_notify(channel, payload)` through the pool, committed on return:
    /// the listener's probe that its LISTEN connection really hears.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), DbError> {
        self.timed("probe notify", async {
            let client = self.pool.get().await?;
            client
                .query_typed(
                    "SELECT pg_notify($1, $2)",
                    &[(&channel, Type::TEXT), (&payload, Type::TEXT)],
                )
                .await?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read over `cursor` whose pages come back with these `(rows,
    /// last_id, more)`: the ranges asked for, in order, and where it ends.
    fn check(mut cursor: Cursor, pages: &[(usize, Option<i64>, bool)], expected: &[(i64, i64)]) {
        let mut asked = Vec::new();
        let mut pages = pages.iter();
        while let Some((after, end)) = cursor.next() {
            asked.push((after, end));
            let &(rows, last_id, more) = pages.next().expect("a page for every range asked");
            let page = Page {
                rows,
                last_id,
                more,
                ..Page::default()
            };
            cursor.advance(end, &page);
        }
        assert_eq!(asked, expected);
        assert!(pages.next().is_none(), "pages left unread");
    }

    #[test]
    fn one_stop_rule_for_every_read_of_the_log() {
        let replay = |after, upto| Cursor {
            after,
            upto,
            window: 100,
            page: 2,
        };
        // Nothing to read: no query.
        check(replay(10, 10), &[], &[]);
        // A short page ends its window; full pages go on after their last row.
        check(replay(0, 50), &[(1, Some(7), false)], &[(0, 50)]);
        check(
            replay(0, 50),
            &[(2, Some(7), true), (2, Some(9), true), (0, None, false)],
            &[(0, 50), (7, 50), (9, 50)],
        );
        // A page its bytes ended (one row of two) goes on after its last row.
        check(
            replay(0, 50),
            &[(1, Some(7), true), (1, Some(9), false)],
            &[(0, 50), (7, 50)],
        );
        // Windows: an empty one costs a page and the read moves past it.
        check(
            replay(0, 250),
            &[
                (0, None, false),
                (2, Some(130), true),
                (1, Some(140), false),
                (0, None, false),
            ],
            &[(0, 100), (100, 200), (130, 230), (230, 250)],
        );
        // The listener's read: no bound, no window; a short page ends it.
        let new = |after| Cursor {
            after,
            upto: i64::MAX,
            window: i64::MAX,
            page: 2,
        };
        check(new(5), &[(0, None, false)], &[(5, i64::MAX)]);
        check(
            new(5),
            &[(2, Some(8), true), (1, Some(9), false)],
            &[(5, i64::MAX), (8, i64::MAX)],
        );
    }

    #[test]
    fn a_page_its_bytes_ended_makes_the_next_ask_for_twice_its_rows() {
        let page = |rows, more| Page {
            rows,
            more,
            ..Page::default()
        };
        // Three rows of 500 came back before the bytes ran out: ask for 6.
        assert_eq!(page(3, true).next_limit(500, 500), 6);
        // One huge row: ask for 2, never for none.
        assert_eq!(page(1, true).next_limit(6, 500), 2);
        // Rows ended the page (small events again): double, up to the read's own.
        assert_eq!(page(6, true).next_limit(6, 500), 12);
        assert_eq!(page(400, true).next_limit(400, 500), 500);
        // A short page without more ended its range; the next range starts
        // at twice the limit, capped.
        assert_eq!(page(2, false).next_limit(6, 500), 12);
        assert_eq!(page(0, false).next_limit(500, 500), 500);
    }

    /// The bound written into the page queries is [`PAGE_BYTES`].
    #[test]
    fn every_page_query_is_bounded_by_page_bytes() {
        let bound = format!("WHERE earlier < {PAGE_BYTES} ORDER BY id");
        for query in [
            EVENTS_BETWEEN,
            KEYED_EVENTS_BETWEEN,
            KEYED_HISTORY,
            CHANNEL_HISTORY,
        ] {
            assert!(query.contains(&bound), "{query}");
        }
    }
}
