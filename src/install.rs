//! `pgrelay install`: the embedded sql/ and triggers/ files, applied in one
//! transaction under an advisory lock, so it is idempotent and safe to run
//! from several replicas at once. Works without the source tree.
//!
//! Errors are one line naming what failed: an unreachable database, a table
//! that does not exist, a privilege that is missing.

use tokio_postgres::error::SqlState;

use crate::config::InstallConfig;
use crate::db::db_message;

const SCHEMA: &str = include_str!("../sql/schema.sql");
const CAPTURE: &str = include_str!("../triggers/capture.sql");
const DEMO_SCHEMA: &str = include_str!("../sql/demo.sql");
const DEMO_TRIGGERS: &str = include_str!("../triggers/demo.sql");

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("--watch {table}: table does not exist")]
    NoTable { table: String },
    #[error("--watch {table}={channel}: channel name must be 1 to 63 bytes")]
    Channel { table: String, channel: String },
    #[error("permission denied while installing {what}: {message}")]
    Privilege { what: &'static str, message: String },
    #[error("installing {what} failed: {message}")]
    Sql { what: &'static str, message: String },
}

/// What was installed, for the command's output.
#[derive(Debug, Default, PartialEq)]
pub struct Installed {
    pub demo: bool,
    pub watched: Vec<(String, String)>,
}

fn sql_error(what: &'static str) -> impl Fn(tokio_postgres::Error) -> InstallError {
    move |e| match e.code() {
        Some(&SqlState::INSUFFICIENT_PRIVILEGE) => InstallError::Privilege {
            what,
            message: db_message(&e),
        },
        _ => InstallError::Sql {
            what,
            message: db_message(&e),
        },
    }
}

pub async fn install(config: &InstallConfig) -> Result<Installed, InstallError> {
    let mut database = config.database.clone();
    crate::db::harden(&mut database);
    let (mut client, connection) = database
        .connect()
        .await
        .map_err(|e| InstallError::Connect(db_message(&e)))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let tx = client
            .transaction()
            .await
            .map_err(sql_error("the schema"))?;
        tx.batch_execute(
            "SET LOCAL client_min_messages = warning; \
             SELECT pg_advisory_xact_lock(1885827685, 3);",
        )
        .await
        .map_err(sql_error("the schema"))?;
        tx.batch_execute(SCHEMA)
            .await
            .map_err(sql_error("the schema"))?;
        tx.batch_execute(CAPTURE)
            .await
            .map_err(sql_error("the capture triggers"))?;
        if config.demo {
            tx.batch_execute(DEMO_SCHEMA)
                .await
                .map_err(sql_error("the demo tables"))?;
            tx.batch_execute(DEMO_TRIGGERS)
                .await
                .map_err(sql_error("the demo triggers"))?;
        }
        for (table, channel) in &config.watch {
            if channel.is_empty() || channel.len() > 63 {
                return Err(InstallError::Channel {
                    table: table.clone(),
                    channel: channel.clone(),
                });
            }
            let exists = tx
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[table])
                .await
                .map_err(sql_error("a watch trigger"))?;
            if !exists.get::<_, bool>(0) {
                return Err(InstallError::NoTable {
                    table: table.clone(),
                });
            }
            tx.execute(
                "SELECT pgrelay.watch($1::text::regclass, $2)",
                &[table, channel],
            )
            .await
            .map_err(sql_error("a watch trigger"))?;
        }
        tx.commit().await.map_err(sql_error("the schema"))?;
        Ok(Installed {
            demo: config.demo,
            watched: config.watch.clone(),
        })
    }
    .await;
    drop(client);
    let _ = driver.await;
    result
}
