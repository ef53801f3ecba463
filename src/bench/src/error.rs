//! The bench's one error type. It is a program, not a library: every error
//! ends as one line on stderr (`pgrelay-bench: error: ...`, exit 2, or 3
//! for a refused quiet check) or as a
//! client's first error in the report, so one enum whose variants keep the
//! cause (`#[source]`) and say what was being done is all it needs.

use std::io;

use pgrelay::db::db_message;

#[derive(Debug, thiserror::Error)]
pub(crate) enum BenchError {
    /// The command line asks for something the bench cannot run.
    #[error("{0}")]
    Usage(&'static str),
    /// A statement or connection failed; the server's own message.
    #[error("{what}: {}", db_message(.source))]
    Db {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement failed; tokio-postgres's whole text (kind and cause).
    #[error("{what}: {source}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("--url {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("throwaway PostgreSQL: {0}")]
    Cluster(#[source] pgrelay_cluster::ClusterError),
    #[error(transparent)]
    Install(#[from] pgrelay::install::InstallError),
    #[error(transparent)]
    Target(#[from] pgrelay::pgconn::TargetError),
    #[error(transparent)]
    Config(tokio_postgres::Error),
    #[error(transparent)]
    Token(#[from] pgrelay::auth::AuthError),
    /// pgrelay answered a WebSocket upgrade with another status than 101.
    #[error("HTTP {status}: {body}")]
    Refused { status: String, body: String },
    /// Anything else the run found wrong: a handshake pgrelay got wrong, a
    /// client that failed, a log that is not what the scenario needs.
    #[error("{0}")]
    Run(String),
    /// The quiet-machine check found others busy (see `quiet.rs`).
    #[error("{0}")]
    Noisy(String),
    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    pub(crate) fn db(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Db { what, source }
    }

    pub(crate) fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Sql { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }

    pub(crate) fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> BenchError {
        move |source| BenchError::Task { what, source }
    }

    pub(crate) fn run(message: impl Into<String>) -> BenchError {
        BenchError::Run(message.into())
    }

    /// pgrelay refused the handshake (retrying the same request gets the
    /// same answer, unless it is a 429 or 5xx).
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, BenchError::Refused { .. })
    }

    /// What kind of failure this is, for counting failures by kind: the
    /// HTTP status of a refusal, the stage and `io::ErrorKind` of an I/O
    /// error (`connect: ConnectionRefused`), else the message up to its
    /// first `:` (`handshake timed out after 15 s`, `closed before hello`).
    pub(crate) fn kind(&self) -> String {
        match self {
            BenchError::Refused { status, .. } => format!("HTTP {status}"),
            BenchError::Io { what, source } => format!(
                "{}: {:?}",
                what.split_whitespace().next().unwrap_or("io"),
                source.kind()
            ),
            other => {
                let text = other.to_string();
                text.split(':').next().unwrap_or_default().to_owned()
            }
        }
    }

    /// A refusal that retrying cannot fix (401, 403, 404, 400).
    pub(crate) fn is_final_refusal(&self) -> bool {
        matches!(self, BenchError::Refused { status, .. } if status.starts_with('4') && status != "429")
    }
}

pub(crate) type Result<T, E = BenchError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals() {
        let refused = |status: &str| BenchError::Refused {
            status: status.into(),
            body: "no".into(),
        };
        assert_eq!(refused("401").to_string(), "HTTP 401: no");
        assert!(refused("401").is_final_refusal());
        assert!(!refused("429").is_final_refusal());
        assert!(!refused("503").is_final_refusal());
        assert!(refused("503").is_refusal());
        let io = BenchError::io("connect 127.0.0.1:1")(io::ErrorKind::ConnectionRefused.into());
        assert!(!io.is_final_refusal() && !io.is_refusal());
        assert_eq!(io.kind(), "connect: ConnectionRefused");
        assert_eq!(refused("503").kind(), "HTTP 503");
        assert_eq!(
            BenchError::run("closed before hello: Some(CloseFrame)").kind(),
            "closed before hello"
        );
        assert_eq!(
            BenchError::run("handshake timed out after 15 s").kind(),
            "handshake timed out after 15 s"
        );
    }
}
