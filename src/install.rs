//! `pgrelay install`: the embedded sql/ and triggers/ files, applied in one
//! transaction under an advisory lock (waited for at most `lock_timeout`), so
//! it is idempotent and safe to run from several replicas at once. Works
//! without the source tree.
//!
//! Privileges: the `pgrelay` schema and everything in it, the SECURITY
//! DEFINER capture functions included, belong to a dedicated owner role
//! (`--owner`, created NOLOGIN if missing), never to the installer: install
//! refuses an owner that is a superuser, can log in, create roles or
//! databases, bypasses row-level security, or is a member of another role.
//! The schema files run as that role; only what needs the installer's rights
//! (creating the schema for it, triggers on the watched tables, a column grant
//! for each enrichment) runs as the installer.
//!
//! Watched tables are described by [`WatchSpec`] (`--watch`), parsed here and
//! turned into `pgrelay.watch(...)` calls, which validate them against the
//! catalog. Errors are one line naming what failed: an unreachable database,
//! a table or column that does not exist, a privilege that is missing.

use std::fmt;
use std::str::FromStr;

use postgres_protocol::escape::escape_identifier;
use tokio_postgres::error::SqlState;

use crate::db::db_message;
use crate::pgconn::Target;

const OWNER: &str = include_str!("../sql/owner.sql");
const SCHEMA: &str = include_str!("../sql/schema.sql");
const CAPTURE: &str = include_str!("../triggers/capture.sql");
const DEMO_SCHEMA: &str = include_str!("../sql/demo.sql");
const DEMO_TRIGGERS: &str = include_str!("../triggers/demo.sql");

/// The owner role when `--owner` is not given.
pub const DEFAULT_OWNER: &str = "pgrelay_owner";
/// Payloads larger than this (as jsonb) are logged as a stub.
pub const DEFAULT_MAX_EVENT_BYTES: u32 = 1 << 20;

/// What `install` needs, validated.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    pub database: Target,
    pub demo: bool,
    pub watch: Vec<WatchSpec>,
    /// The role that owns the schema and the capture functions.
    pub owner: String,
    /// Payloads larger than this are logged as a stub.
    pub max_event_bytes: u32,
}

impl InstallConfig {
    /// The schema alone, with the default owner and event cap.
    pub fn new(database: Target) -> InstallConfig {
        InstallConfig {
            database,
            demo: false,
            watch: Vec::new(),
            owner: DEFAULT_OWNER.to_owned(),
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot connect to the database: {}", db_message(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("--watch {table}: table does not exist")]
    NoTable { table: String },
    #[error("--watch {table}: {}", db_message(.source))]
    Watch {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("--owner {role}: {reason}")]
    Owner { role: String, reason: &'static str },
    #[error("permission denied while installing {what}: {}", db_message(.source))]
    Privilege {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("installing {what} failed: {}", db_message(.source))]
    Sql {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// What was installed, for the command's output.
#[derive(Debug, Default, PartialEq)]
pub struct Installed {
    pub demo: bool,
    pub owner: String,
    pub watched: Vec<WatchSpec>,
}

/// Operations a watched table's capture trigger fires on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    fn sql(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
        }
    }
}

/// Which columns of a watched row go into its events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Columns {
    #[default]
    All,
    Only(Vec<String>),
    Except(Vec<String>),
}

/// A field added to a watched table's events: `column` of the row that the
/// single-column foreign key `via` points to, named `field`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrich {
    pub field: String,
    pub via: String,
    pub column: String,
}

/// `--watch 'TABLE=CHANNEL [ops=insert,update] [columns=a,b | exclude=a,b]
/// [enrich=FIELD:FK_COLUMN.COLUMN,...]'`: what to capture from one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    pub table: String,
    pub channel: String,
    pub ops: Vec<Op>,
    pub columns: Columns,
    pub enrich: Vec<Enrich>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("--watch {spec:?}: {reason}")]
pub struct WatchSpecError {
    spec: String,
    reason: String,
}

/// Column, field and channel names: what `pgrelay.watch` will look up (it
/// checks that they exist); anything with quotes, spaces or separators is
/// refused here with a clear line.
fn name(what: &str, value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!("{what} {value:?} is not a plain SQL name"))
    }
}

fn names(what: &str, list: &str) -> Result<Vec<String>, String> {
    list.split(',').map(|n| name(what, n.trim())).collect()
}

impl FromStr for WatchSpec {
    type Err = WatchSpecError;

    fn from_str(spec: &str) -> Result<WatchSpec, WatchSpecError> {
        let fail = |reason: String| WatchSpecError {
            spec: spec.to_owned(),
            reason,
        };
        let mut words = spec.split_whitespace();
        let head = words.next().unwrap_or_default();
        let (table, channel) = head
            .split_once('=')
            .filter(|(t, c)| !t.is_empty() && !c.is_empty())
            .ok_or_else(|| fail("expected TABLE=CHANNEL first".into()))?;
        // The same rule as --route's channels, so every watchable channel
        // can be routed.
        if channel.len() > 63 || !crate::route::is_name(channel) {
            return Err(fail(format!(
                "channel {channel:?} must be 1 to 63 letters, digits and _ . - :"
            )));
        }
        if channel == crate::route::READ_CHANNEL {
            return Err(fail(format!(
                "channel {channel:?} is pgrelay's own (read state)"
            )));
        }
        let mut watch = WatchSpec {
            table: table.to_owned(),
            channel: channel.to_owned(),
            ops: vec![Op::Insert, Op::Update, Op::Delete],
            columns: Columns::All,
            enrich: Vec::new(),
        };
        let mut seen = Vec::new();
        for word in words {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| fail(format!("expected KEY=VALUE, got {word:?}")))?;
            if seen.contains(&key) {
                return Err(fail(format!("{key} given twice")));
            }
            seen.push(key);
            match key {
                "ops" => {
                    let mut ops = Vec::new();
                    for op in value.split(',') {
                        let op = match op.trim().to_ascii_lowercase().as_str() {
                            "insert" => Op::Insert,
                            "update" => Op::Update,
                            "delete" => Op::Delete,
                            other => {
                                return Err(fail(format!(
                                    "unknown operation {other:?} (insert, update, delete)"
                                )))
                            }
                        };
                        if ops.contains(&op) {
                            return Err(fail(format!("operation {} given twice", op.sql())));
                        }
                        ops.push(op);
                    }
                    watch.ops = ops;
                }
                "columns" | "exclude" => {
                    if watch.columns != Columns::All {
                        return Err(fail("give columns= or exclude=, not both".into()));
                    }
                    let list = names("column", value).map_err(fail)?;
                    watch.columns = if key == "columns" {
                        Columns::Only(list)
                    } else {
                        Columns::Except(list)
                    };
                }
                "enrich" => {
                    for entry in value.split(',') {
                        let parsed = entry.split_once(':').and_then(|(field, path)| {
                            let (via, column) = path.split_once('.')?;
                            Some((field, via, column))
                        });
                        let Some((field, via, column)) = parsed else {
                            return Err(fail(format!(
                                "enrich entry {entry:?}: expected FIELD:FK_COLUMN.COLUMN"
                            )));
                        };
                        watch.enrich.push(Enrich {
                            field: name("field", field).map_err(fail)?,
                            via: name("column", via).map_err(fail)?,
                            column: name("column", column).map_err(fail)?,
                        });
                    }
                }
                other => {
                    return Err(fail(format!(
                        "unknown option {other:?} (ops, columns, exclude, enrich)"
                    )))
                }
            }
        }
        Ok(watch)
    }
}

impl fmt::Display for WatchSpec {
    /// The spec as `--watch` takes it, for the command's output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.table, self.channel)?;
        let ops: Vec<String> = self
            .ops
            .iter()
            .map(|op| op.sql().to_ascii_lowercase())
            .collect();
        write!(f, " ops={}", ops.join(","))?;
        match &self.columns {
            Columns::All => {}
            Columns::Only(list) => write!(f, " columns={}", list.join(","))?,
            Columns::Except(list) => write!(f, " exclude={}", list.join(","))?,
        }
        if !self.enrich.is_empty() {
            let entries: Vec<String> = self
                .enrich
                .iter()
                .map(|e| format!("{}:{}.{}", e.field, e.via, e.column))
                .collect();
            write!(f, " enrich={}", entries.join(","))?;
        }
        Ok(())
    }
}

fn sql_error(what: &'static str) -> impl Fn(tokio_postgres::Error) -> InstallError {
    move |e| match e.code() {
        Some(&SqlState::INSUFFICIENT_PRIVILEGE) => InstallError::Privilege { what, source: e },
        _ => InstallError::Sql { what, source: e },
    }
}

pub async fn install(config: &InstallConfig) -> Result<Installed, InstallError> {
    let mut database = config.database.clone();
    crate::db::harden(&mut database);
    let (mut client, connection) = database.connect().await.map_err(InstallError::Connect)?;
    let driver = tokio::spawn(connection);
    let result = async {
        let mut tx = client
            .transaction()
            .await
            .map_err(sql_error("the schema"))?;
        // Installs serialise on an advisory lock, which any role could hold:
        // like every lock install waits for (a busy table's trigger), it is
        // given up after lock_timeout, with an error, rather than hang.
        tx.batch_execute(
            "SET LOCAL client_min_messages = warning; \
             SET LOCAL lock_timeout = '30s'; \
             SELECT pg_advisory_xact_lock(1885827685, 3);",
        )
        .await
        .map_err(sql_error("the schema"))?;
        ensure_owner(&mut tx, &config.owner).await?;
        tx.execute(
            "SELECT set_config('pgrelay.owner', $1, true), \
                    set_config('pgrelay.max_event_bytes', $2, true)",
            &[&config.owner, &config.max_event_bytes.to_string()],
        )
        .await
        .map_err(sql_error("the schema"))?;
        tx.batch_execute(OWNER)
            .await
            .map_err(sql_error("the schema's owner"))?;
        // Everything in the schema is created by its owner, so it is the
        // owner's; then back to the installer for the tables' triggers.
        tx.batch_execute(&format!(
            "SET LOCAL ROLE {}",
            escape_identifier(&config.owner)
        ))
        .await
        .map_err(sql_error("the schema"))?;
        tx.batch_execute(SCHEMA)
            .await
            .map_err(sql_error("the schema"))?;
        tx.batch_execute(CAPTURE)
            .await
            .map_err(sql_error("the capture functions"))?;
        tx.batch_execute("RESET ROLE")
            .await
            .map_err(sql_error("the schema"))?;
        if config.demo {
            tx.batch_execute(DEMO_SCHEMA)
                .await
                .map_err(sql_error("the demo tables"))?;
            tx.batch_execute(DEMO_TRIGGERS)
                .await
                .map_err(sql_error("the demo triggers"))?;
        }
        for spec in &config.watch {
            watch(&tx, spec).await?;
        }
        tx.commit().await.map_err(sql_error("the schema"))?;
        payload_index(&client).await?;
        Ok(Installed {
            demo: config.demo,
            owner: config.owner.clone(),
            watched: config.watch.clone(),
        })
    }
    .await;
    drop(client);
    let _ = driver.await;
    result
}

/// Builds the replay index on a log that was too large to index inside the
/// install transaction (see sql/schema.sql), CONCURRENTLY, so writes go on
/// meanwhile; a build an earlier install left invalid is dropped first.
async fn payload_index(client: &tokio_postgres::Client) -> Result<(), InstallError> {
    let valid: Option<bool> = client
        .query_one(
            "SELECT (SELECT indisvalid FROM pg_index \
                     WHERE indexrelid = to_regclass('pgrelay.events_payload_idx'))",
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(sql_error("the replay index"))?;
    // One statement per call: a multi-statement batch runs as one implicit
    // transaction, and CONCURRENTLY cannot run inside one.
    let mut statements = vec!["SET lock_timeout = '30s'"];
    match valid {
        Some(true) => return Ok(()),
        Some(false) => statements.push("DROP INDEX CONCURRENTLY pgrelay.events_payload_idx"),
        None => {}
    }
    statements.push(
        "CREATE INDEX CONCURRENTLY events_payload_idx ON pgrelay.events \
         USING gin (payload jsonb_path_ops) WITH (fastupdate = on, gin_pending_list_limit = 256)",
    );
    statements.push("RESET lock_timeout");
    for statement in statements {
        client
            .batch_execute(statement)
            .await
            .map_err(sql_error("the replay index"))?;
    }
    Ok(())
}

/// Creates the owner role if it does not exist (NOLOGIN, nothing granted),
/// refuses one with rights capture must not run with, and makes sure the
/// installer may act as it (a superuser may; anyone else becomes a member).
async fn ensure_owner(
    tx: &mut tokio_postgres::Transaction<'_>,
    role: &str,
) -> Result<(), InstallError> {
    let refuse = |reason| InstallError::Owner {
        role: role.to_owned(),
        reason,
    };
    let found = tx
        .query_opt(
            "SELECT rolsuper, rolcanlogin, rolbypassrls, rolcreaterole OR rolcreatedb, \
                    EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid) \
             FROM pg_roles r WHERE rolname = $1",
            &[&role],
        )
        .await
        .map_err(sql_error("the owner role"))?;
    match found {
        None => {
            // Roles are cluster-wide: an install into another database may
            // create it at the same moment. Theirs is as good as ours.
            let attempt = tx
                .savepoint("create_owner")
                .await
                .map_err(sql_error("the owner role"))?;
            match attempt
                .batch_execute(&format!(
                    "CREATE ROLE {} NOLOGIN NOINHERIT",
                    escape_identifier(role)
                ))
                .await
            {
                Ok(()) => attempt.commit().await,
                Err(e)
                    if matches!(
                        e.code(),
                        Some(&SqlState::DUPLICATE_OBJECT | &SqlState::UNIQUE_VIOLATION)
                    ) =>
                {
                    attempt.rollback().await
                }
                Err(e) => Err(e),
            }
            .map_err(sql_error("the owner role"))?;
        }
        Some(row) => {
            let flag = |i| {
                row.try_get::<_, bool>(i)
                    .map_err(sql_error("the owner role"))
            };
            if flag(0)? {
                return Err(refuse(
                    "is a superuser; capture code must run with narrow rights",
                ));
            }
            if flag(1)? {
                return Err(refuse("can log in; the owner role must be NOLOGIN"));
            }
            if flag(2)? {
                return Err(refuse("bypasses row-level security"));
            }
            if flag(3)? {
                return Err(refuse("can create roles or databases"));
            }
            // Whatever the owner role may do, capture code may do: it must
            // hold no other role's rights (pg_read_all_data, say).
            if flag(4)? {
                return Err(refuse("is a member of another role"));
            }
        }
    }
    let may_act = tx
        .query_one(
            "SELECT rolsuper OR pg_has_role(current_user, $1::text, 'MEMBER') \
             FROM pg_roles WHERE rolname = current_user",
            &[&role],
        )
        .await
        .map_err(sql_error("the owner role"))?;
    if !may_act
        .try_get::<_, bool>(0)
        .map_err(sql_error("the owner role"))?
    {
        tx.batch_execute(&format!(
            "GRANT {} TO CURRENT_USER",
            escape_identifier(role)
        ))
        .await
        .map_err(sql_error("the owner role"))?;
    }
    Ok(())
}

/// Attaches capture to one table through `pgrelay.watch`, which checks the
/// spec against the catalog; its refusal becomes a `--watch` error line.
async fn watch(tx: &tokio_postgres::Transaction<'_>, spec: &WatchSpec) -> Result<(), InstallError> {
    let exists = tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&spec.table])
        .await
        .map_err(sql_error("a watch trigger"))?;
    if !exists.get::<_, bool>(0) {
        return Err(InstallError::NoTable {
            table: spec.table.clone(),
        });
    }
    let ops: Vec<&str> = spec.ops.iter().map(|op| op.sql()).collect();
    let (only, except) = match &spec.columns {
        Columns::All => (None, None),
        Columns::Only(list) => (Some(list), None),
        Columns::Except(list) => (None, Some(list)),
    };
    let fields: Vec<&str> = spec.enrich.iter().map(|e| e.field.as_str()).collect();
    let via: Vec<&str> = spec.enrich.iter().map(|e| e.via.as_str()).collect();
    let columns: Vec<&str> = spec.enrich.iter().map(|e| e.column.as_str()).collect();
    tx.execute(
        "SELECT pgrelay.watch($1::text::regclass, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &spec.table,
            &spec.channel,
            &ops,
            &only,
            &except,
            &fields,
            &via,
            &columns,
        ],
    )
    .await
    .map_err(|e| match e.code() {
        Some(&SqlState::INSUFFICIENT_PRIVILEGE) => InstallError::Privilege {
            what: "a watch trigger",
            source: e,
        },
        _ => InstallError::Watch {
            table: spec.table.clone(),
            source: e,
        },
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `spec` and renders it back, or returns the error line.
    fn check(spec: &str, expect: Result<&str, &str>) {
        let got = spec
            .parse::<WatchSpec>()
            .map(|w| w.to_string())
            .map_err(|e| e.to_string());
        match (got, expect) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "spec {spec:?}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{got:?} lacks {want:?}"),
            (got, want) => panic!("spec {spec:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn watch_specs() {
        check(
            "public.orders=order_events",
            Ok("public.orders=order_events ops=insert,update,delete"),
        );
        check(
            "businesses=business_events ops=INSERT,update",
            Ok("businesses=business_events ops=insert,update"),
        );
        check(
            "public.reservations=reservation_events  ops=insert \
             enrich=business_owner_id:business_id.owner_id",
            Ok("public.reservations=reservation_events ops=insert \
                enrich=business_owner_id:business_id.owner_id"),
        );
        check(
            "users=user_events exclude=password,last_login",
            Ok("users=user_events ops=insert,update,delete exclude=password,last_login"),
        );
        check(
            "users=user_events columns=id,email",
            Ok("users=user_events ops=insert,update,delete columns=id,email"),
        );
    }

    #[test]
    fn bad_watch_specs() {
        check("orders", Err("expected TABLE=CHANNEL"));
        check("=c", Err("expected TABLE=CHANNEL"));
        check("t=", Err("expected TABLE=CHANNEL"));
        check("t=c ops=truncate", Err("unknown operation \"truncate\""));
        check("t=c ops=insert,insert", Err("INSERT given twice"));
        check("t=c ops=", Err("unknown operation \"\""));
        check("t=c columns=a exclude=b", Err("not both"));
        check("t=c columns=a columns=b", Err("columns given twice"));
        check("t=c colums=a", Err("unknown option \"colums\""));
        check("t=c columns", Err("expected KEY=VALUE"));
        check(
            "t=c columns=a,,b",
            Err("column \"\" is not a plain SQL name"),
        );
        check("t=c columns=a\"b", Err("is not a plain SQL name"));
        check("t=c enrich=owner", Err("expected FIELD:FK_COLUMN.COLUMN"));
        check(
            "t=c enrich=owner:business_id",
            Err("expected FIELD:FK_COLUMN.COLUMN"),
        );
        check("t=c/d", Err("channel \"c/d\" must be 1 to 63"));
        check(&format!("t={}", "c".repeat(64)), Err("must be 1 to 63"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever is passed to --watch, parsing returns, never panics, and
        /// what parses prints back to the same spec.
        #[test]
        fn watch_specs_round_trip(spec in "[a-z_.=:, ]{0,60}") {
            if let Ok(watch) = spec.parse::<WatchSpec>() {
                let again: WatchSpec = watch.to_string().parse().expect("printed spec parses");
                prop_assert_eq!(again, watch);
            }
        }
    }
}
