//! Throwaway PostgreSQL clusters for `pgrelay demo` and the integration tests.
//!
//! A [`Cluster`] owns one temporary directory holding a freshly initdb'd data
//! directory (`data/`), the server's Unix socket and its log file
//! (`data/server.log`). The server listens on 127.0.0.1 on a port picked at
//! start and is tuned for speed, not durability (`fsync=off` and friends):
//! everything in it is meant to be thrown away.
//!
//! The cluster is driven with the local PostgreSQL binaries (`initdb` and
//! `pg_ctl`), found through `PGRELAY_PG_BINDIR`, the newest
//! `/usr/lib/postgresql/*/bin`, `pg_config --bindir` or `PATH`, in that order.
//! Both tools refuse to run as root, so when this process is root they run as
//! the `postgres` OS user (`runuser -u postgres --`) and the temporary
//! directory is handed to that user.
//!
//! TLS tests start a cluster with [`Cluster::start_with`], which puts
//! [`Extras`] (certificate files, `ssl = on`) in place before the server
//! first starts.
//!
//! Fault-injection tests use [`Cluster::stop`] and [`Cluster::start_again`] to
//! take the server away and bring it back on the same port with the same data.
//! Dropping a `Cluster` stops the server (immediate mode) and deletes its
//! directory; a cluster kept in a `static`, which is never dropped, can be
//! cleaned up by a watchdog instead ([`Cluster::stop_when_process_exits`]).
//!
//! Not here: schema installation, connection pools and anything else
//! pgrelay-specific; this module only knows how to run a server.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Environment variable that names the directory holding `initdb` and `pg_ctl`.
const BINDIR_ENV: &str = "PGRELAY_PG_BINDIR";
/// Debian/Ubuntu install PostgreSQL major versions side by side under here.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// The OS user that runs the server when this process is root.
const PG_OS_USER: &str = "postgres";
/// How long a server may take to start (or stop) before we give up.
const SERVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long initdb may take.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// Extra time a `pg_ctl` process gets beyond its own `-t` timeout.
const PG_CTL_GRACE: Duration = Duration::from_secs(15);
/// Settings file written into the data directory and included from
/// `postgresql.conf`.
const SETTINGS_FILE: &str = "pgrelay.conf";
/// How many freshly picked ports `start()` tries when the port it picked was
/// taken by someone else before the server could bind it.
const PORT_ATTEMPTS: u32 = 5;
/// How much of the server log goes into an error message.
const LOG_TAIL_BYTES: u64 = 4000;

/// A running (or stopped) throwaway PostgreSQL server and the temporary
/// directory it lives in. See the module documentation.
#[derive(Debug)]
pub struct Cluster {
    /// The temporary directory; removed when the cluster is dropped. Also the
    /// server's Unix socket directory.
    dir: TempDir,
    /// `<dir>/data`, the data directory.
    data_dir: PathBuf,
    /// `<data_dir>/server.log`, the server's log (`pg_ctl -l`).
    log_file: PathBuf,
    /// Directory holding `initdb` and `pg_ctl`.
    bindir: PathBuf,
    /// TCP port on 127.0.0.1.
    port: u16,
    /// Run `initdb`/`pg_ctl` as the `postgres` OS user (we are root).
    as_postgres: bool,
    /// Serialises stop/start so concurrent callers do not race `pg_ctl`.
    control: tokio::sync::Mutex<()>,
    /// Lines appended to the settings file ([`Extras::settings`]).
    extra_settings: String,
}

/// What a cluster gets before its server first starts, beyond the defaults.
#[derive(Debug, Default)]
pub struct Extras {
    /// Files written into the data directory: (name, contents), mode 0600
    /// and owned by the server's user, as PostgreSQL wants of a key file.
    pub files: Vec<(String, Vec<u8>)>,
    /// postgresql.conf lines, e.g. `ssl = on`.
    pub settings: String,
}

/// Why a [`Cluster`] could not be started, stopped or restarted.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No directory with both `initdb` and `pg_ctl` was found.
    #[error(
        "initdb not found: install postgresql (apt-get install postgresql); looked in {searched}"
    )]
    BinariesNotFound {
        /// The places that were searched, for the message.
        searched: String,
    },
    /// A filesystem operation on the cluster directory failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done, e.g. "creating the temporary cluster directory under /tmp".
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A helper program could not be started at all.
    #[error("could not run {program}: {source}")]
    Spawn {
        /// The program, e.g. "/usr/lib/postgresql/15/bin/initdb".
        program: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A helper program ran and failed.
    #[error("{what} failed ({status}): {detail}")]
    CommandFailed {
        /// What was run, e.g. `initdb` or `pg_ctl start`.
        what: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr and stdout, and for server starts the tail of the server log.
        detail: String,
    },
    /// A helper program did not finish in time (it was killed).
    #[error("{what} did not finish within {} s", .timeout.as_secs())]
    Timeout {
        /// What was run.
        what: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// Binding 127.0.0.1:0 to pick a port failed.
    #[error("could not pick a free tcp port on 127.0.0.1: {0}")]
    NoFreePort(#[source] io::Error),
    /// `pg_ctl` said the server started but its TCP port never answered.
    #[error("server on 127.0.0.1:{port} did not accept connections within {} s; server log: {log}", .timeout.as_secs())]
    NotReady {
        /// The port that was probed.
        port: u16,
        /// How long it was probed.
        timeout: Duration,
        /// The tail of the server log.
        log: String,
    },
}

impl Cluster {
    /// Creates and starts a new cluster.
    ///
    /// Runs initdb (trust auth, superuser `postgres`, `--no-sync`, UTF8
    /// encoding, C locale) into `data/` of a fresh temporary directory under
    /// [`std::env::temp_dir`], picks a free TCP port on 127.0.0.1 (bind
    /// 127.0.0.1:0, then drop the socket) and starts the server with
    /// `pg_ctl start -w`: `listen_addresses=127.0.0.1`, the Unix socket in the
    /// temporary directory, `fsync`, `synchronous_commit` and
    /// `full_page_writes` off, `max_connections=300`, `shared_buffers=128MB`.
    /// Returns once the server accepts TCP connections (bounded by 30 s). If
    /// another process grabs the picked port first, a new port is tried.
    ///
    /// # Errors
    ///
    /// [`ClusterError::BinariesNotFound`] without PostgreSQL binaries; other
    /// variants (with the failing tool's output and the server log) when the
    /// directory cannot be set up or initdb or the server fails.
    pub async fn start() -> Result<Cluster, ClusterError> {
        Self::start_with(Extras::default()).await
    }

    /// [`Cluster::start`], with `extras` in place before the server starts.
    ///
    /// # Errors
    ///
    /// As [`Cluster::start`]; also when a file cannot be written.
    pub async fn start_with(extras: Extras) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir().await?;
        let as_postgres = running_as_root().await;

        let parent = std::env::temp_dir();
        let dir = tempfile::Builder::new()
            .prefix("pgrelay-pg-")
            .tempdir_in(&parent)
            .map_err(|source| ClusterError::Io {
                what: format!(
                    "creating the temporary cluster directory under {}",
                    parent.display()
                ),
                source,
            })?;
        let data_dir = dir.path().join("data");
        let log_file = data_dir.join("server.log");
        let mut cluster = Cluster {
            dir,
            data_dir,
            log_file,
            bindir,
            port: 0,
            as_postgres,
            control: tokio::sync::Mutex::new(()),
            extra_settings: extras.settings,
        };
        // From here on, an early return drops `cluster`, which stops any
        // server that got started and removes the directory.

        let mut builder = tokio::fs::DirBuilder::new();
        builder.mode(0o700);
        builder
            .create(&cluster.data_dir)
            .await
            .map_err(|source| ClusterError::Io {
                what: format!("creating data directory {}", cluster.data_dir.display()),
                source,
            })?;
        if as_postgres {
            chown_to_postgres(cluster.dir.path()).await?;
        }

        cluster.initdb().await?;
        cluster.include_settings().await?;
        for (name, contents) in &extras.files {
            cluster.write_private_file(name, contents).await?;
        }

        let mut attempt = 1;
        loop {
            cluster.port = free_port()?;
            cluster.write_settings().await?;
            let log_offset = file_len(&cluster.log_file).await;
            match cluster.start_server().await {
                Ok(()) => break,
                Err(err)
                    if attempt < PORT_ATTEMPTS && cluster.port_taken_since(log_offset).await =>
                {
                    tracing::debug!(port = cluster.port, %err, "port taken before the server bound it; picking another");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
        tracing::info!(
            port = cluster.port,
            dir = %cluster.dir.path().display(),
            bindir = %cluster.bindir.display(),
            "started throwaway postgresql cluster"
        );
        Ok(cluster)
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL for database `dbname` as the superuser `postgres` (no
    /// password: trust auth), e.g. `postgres://postgres@127.0.0.1:PORT/DBNAME`.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, dbname)
    }

    /// The data directory (`<temporary dir>/data`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the server's Unix socket (the temporary dir).
    #[cfg(test)]
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log file, useful when a test fails.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Stops the server with `pg_ctl stop -m fast` and waits until it is down
    /// (open sessions are terminated). Idempotent: stopping a stopped server
    /// succeeds.
    ///
    /// # Errors
    ///
    /// When `pg_ctl` cannot be run, fails or times out while the server is
    /// still up.
    pub async fn stop(&self) -> Result<(), ClusterError> {
        let _guard = self.control.lock().await;
        if !self.is_running().await? {
            return Ok(());
        }
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t"])
            .arg(SERVER_TIMEOUT.as_secs().to_string());
        match run(cmd, "pg_ctl stop", SERVER_TIMEOUT + PG_CTL_GRACE).await {
            Ok(_) => Ok(()),
            // It may have gone away by itself in the meantime.
            Err(err) if !self.is_running().await.unwrap_or(true) => {
                tracing::debug!(%err, "pg_ctl stop failed but the server is down");
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Starts the server again with `pg_ctl start -w`, on the same port and
    /// data directory, after [`stop`](Self::stop) (or after the server died).
    /// Returns once it accepts TCP connections (bounded by 30 s). Succeeds
    /// without doing anything if the server is already running.
    ///
    /// # Errors
    ///
    /// When `pg_ctl` cannot be run or the server does not come up (e.g. its
    /// port was taken meanwhile); the message includes the server log.
    pub async fn start_again(&self) -> Result<(), ClusterError> {
        let _guard = self.control.lock().await;
        if self.is_running().await? {
            return Ok(());
        }
        self.start_server().await
    }

    /// Stops the server when process `pid` exits.
    ///
    /// Spawns a detached watchdog (`sh -c`, in its own process group, so a
    /// Ctrl-C on the terminal does not reach it) that polls `kill -0 PID` once
    /// a second; when the process is gone it runs `pg_ctl stop -m immediate`
    /// and removes the temporary directory. For the test harness, whose
    /// cluster lives in a `static` and is never dropped: pass
    /// [`std::process::id()`]. Harmless if the cluster is dropped first.
    ///
    /// # Errors
    ///
    /// When `sh` cannot be started or fails to launch the watchdog.
    pub fn stop_when_process_exits(&self, pid: u32) -> Result<(), ClusterError> {
        // The paths travel as positional parameters, so nothing needs quoting.
        // The outer shell backgrounds the loop and exits at once; the loop is
        // then adopted by init, so it leaves no zombie behind.
        const SCRIPT: &str = r#"
(
  trap '' HUP INT
  while kill -0 "$1" 2>/dev/null; do sleep 1; done
  if [ "$5" = 1 ]; then
    runuser -u postgres -- "$2" stop -D "$3" -m immediate
  else
    "$2" stop -D "$3" -m immediate
  fi
  rm -rf -- "$4"
) </dev/null >/dev/null 2>&1 &
"#;
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("pgrelay-cluster-watchdog")
            .arg(pid.to_string())
            .arg(self.bindir.join("pg_ctl"))
            .arg(&self.data_dir)
            .arg(self.dir.path())
            .arg(if self.as_postgres { "1" } else { "0" })
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let output = cmd.output().map_err(|source| ClusterError::Spawn {
            program: "sh (cluster watchdog)".to_owned(),
            source,
        })?;
        if !output.status.success() {
            return Err(ClusterError::CommandFailed {
                what: "starting the cluster watchdog".to_owned(),
                status: output.status,
                detail: output_text(&output),
            });
        }
        tracing::debug!(pid, port = self.port, "cluster watchdog started");
        Ok(())
    }

    /// `initdb` into the (empty) data directory.
    async fn initdb(&self) -> Result<(), ClusterError> {
        let mut cmd = self.pg_command("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(cmd, "initdb", INITDB_TIMEOUT).await.map(drop)
    }

    /// Makes `postgresql.conf` include our settings file, which
    /// [`write_settings`](Self::write_settings) (re)writes.
    async fn include_settings(&self) -> Result<(), ClusterError> {
        let conf = self.data_dir.join("postgresql.conf");
        let mut file = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .await
            .map_err(|source| ClusterError::Io {
                what: format!("opening {}", conf.display()),
                source,
            })?;
        let line = format!("\n# added by pgrelay\ninclude '{SETTINGS_FILE}'\n");
        tokio::io::AsyncWriteExt::write_all(&mut file, line.as_bytes())
            .await
            .map_err(|source| ClusterError::Io {
                what: format!("appending to {}", conf.display()),
                source,
            })
    }

    /// Writes `contents` to `name` in the data directory, readable by the
    /// server's user only.
    async fn write_private_file(&self, name: &str, contents: &[u8]) -> Result<(), ClusterError> {
        let path = self.data_dir.join(name);
        let io_error = |source| ClusterError::Io {
            what: format!("writing {}", path.display()),
            source,
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(io_error)?;
        tokio::io::AsyncWriteExt::write_all(&mut file, contents)
            .await
            .map_err(io_error)?;
        if self.as_postgres {
            chown_to_postgres(&path).await?;
        }
        Ok(())
    }

    /// Writes the server settings, including the current port.
    async fn write_settings(&self) -> Result<(), ClusterError> {
        let mut text =
            String::from("# written by pgrelay's throwaway cluster; rewritten on start\n");
        let _ = writeln!(text, "listen_addresses = '127.0.0.1'");
        let _ = writeln!(text, "port = {}", self.port);
        let _ = writeln!(
            text,
            "unix_socket_directories = '{}'",
            conf_quote(&self.dir.path().to_string_lossy())
        );
        text.push_str(
            "fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 300\n\
             shared_buffers = 128MB\n",
        );
        text.push_str(&self.extra_settings);
        text.push('\n');
        let path = self.data_dir.join(SETTINGS_FILE);
        tokio::fs::write(&path, text)
            .await
            .map_err(|source| ClusterError::Io {
                what: format!("writing {}", path.display()),
                source,
            })?;
        if self.as_postgres {
            chown_to_postgres(&path).await?;
        }
        Ok(())
    }

    /// `pg_ctl start -w`, then waits until the TCP port answers.
    async fn start_server(&self) -> Result<(), ClusterError> {
        let began = Instant::now();
        let log_offset = file_len(&self.log_file).await;
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .arg("-w")
            .arg("-t")
            .arg(SERVER_TIMEOUT.as_secs().to_string());
        match run(cmd, "pg_ctl start", SERVER_TIMEOUT + PG_CTL_GRACE).await {
            Ok(_) => {}
            Err(ClusterError::CommandFailed {
                what,
                status,
                mut detail,
            }) => {
                let log = self.log_since(log_offset).await;
                if !log.is_empty() {
                    detail.push_str("; server log: ");
                    detail.push_str(&log);
                }
                return Err(ClusterError::CommandFailed {
                    what,
                    status,
                    detail,
                });
            }
            Err(err) => return Err(err),
        }
        // `pg_ctl -w` already waits for "ready"; this also proves the TCP
        // listener is up.
        let deadline = began + SERVER_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NotReady {
                    port: self.port,
                    timeout: SERVER_TIMEOUT,
                    log: self.log_since(log_offset).await,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether a server is running on the data directory (`pg_ctl status`).
    async fn is_running(&self) -> Result<bool, ClusterError> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("status").arg("-D").arg(&self.data_dir);
        let program = self.bindir.join("pg_ctl").display().to_string();
        let output = output_within(cmd, &program, "pg_ctl status", SERVER_TIMEOUT).await?;
        // 0: running, 3: not running; anything else (4: no data dir) is trouble.
        match output.status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            _ => Err(ClusterError::CommandFailed {
                what: "pg_ctl status".to_owned(),
                status: output.status,
                detail: output_text(&output),
            }),
        }
    }

    /// Whether the server log written since `offset` says the port was taken.
    async fn port_taken_since(&self, offset: u64) -> bool {
        let log = self.log_since(offset).await;
        log.contains("Address already in use")
            || log.contains("could not create any TCP/IP sockets")
    }

    /// The tail of what the server logged after byte `offset`, or "" if
    /// nothing (or the log is unreadable).
    async fn log_since(&self, offset: u64) -> String {
        let Ok(mut file) = tokio::fs::File::open(&self.log_file).await else {
            return String::new();
        };
        let len = file.metadata().await.map_or(0, |m| m.len());
        let start = offset.max(len.saturating_sub(LOG_TAIL_BYTES));
        if file.seek(io::SeekFrom::Start(start)).await.is_err() {
            return String::new();
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).await.is_err() {
            return String::new();
        }
        String::from_utf8_lossy(&bytes).trim().to_owned()
    }

    /// A command running PostgreSQL tool `tool`, as the `postgres` OS user if
    /// we are root.
    fn pg_command(&self, tool: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(pg_std_command(
            &self.bindir,
            tool,
            self.as_postgres,
            self.dir.path(),
        ));
        cmd.kill_on_drop(true);
        cmd
    }
}

impl Drop for Cluster {
    /// Best effort: `pg_ctl stop -m immediate` (synchronously), then the
    /// temporary directory is removed by its own destructor.
    fn drop(&mut self) {
        let mut cmd = pg_std_command(&self.bindir, "pg_ctl", self.as_postgres, self.dir.path());
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match cmd.status() {
            Ok(status) if status.success() => {
                tracing::debug!(port = self.port, "stopped throwaway postgresql cluster");
            }
            // Not running (already stopped, or never started): nothing to do.
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%err, port = self.port, "could not run pg_ctl to stop the throwaway cluster");
            }
        }
    }
}

/// `bindir/tool` as a std command, wrapped in `runuser -u postgres --` when
/// `as_postgres`, with the PG* variables that could redirect it removed, stdin
/// closed and `cwd` as working directory (our own cwd may not be readable by
/// the postgres user).
fn pg_std_command(
    bindir: &Path,
    tool: &str,
    as_postgres: bool,
    cwd: &Path,
) -> std::process::Command {
    let program = bindir.join(tool);
    let mut cmd = if as_postgres {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", PG_OS_USER, "--"]).arg(program);
        cmd
    } else {
        std::process::Command::new(program)
    };
    for var in [
        "PGDATA",
        "PGPORT",
        "PGHOST",
        "PGHOSTADDR",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
        "PGCTLTIMEOUT",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

/// Runs `cmd` with output captured; fails unless it exits successfully.
async fn run(
    cmd: tokio::process::Command,
    what: &str,
    timeout: Duration,
) -> Result<Output, ClusterError> {
    let program = program_name(&cmd);
    let output = output_within(cmd, &program, what, timeout).await?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(ClusterError::CommandFailed {
            what: what.to_owned(),
            status: output.status,
            detail: output_text(&output),
        })
    }
}

/// Runs `cmd` with output captured, killing it after `timeout`.
async fn output_within(
    mut cmd: tokio::process::Command,
    program: &str,
    what: &str,
    timeout: Duration,
) -> Result<Output, ClusterError> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(source)) => Err(ClusterError::Spawn {
            program: program.to_owned(),
            source,
        }),
        Err(_) => Err(ClusterError::Timeout {
            what: what.to_owned(),
            timeout,
        }),
    }
}

/// The command line's program and, for `runuser`, the tool it runs.
fn program_name(cmd: &tokio::process::Command) -> String {
    let std = cmd.as_std();
    let mut name = std.get_program().to_string_lossy().into_owned();
    if std.get_program() == OsStr::new("runuser") {
        if let Some(tool) = std.get_args().nth(3) {
            let _ = write!(name, " (for {})", tool.to_string_lossy());
        }
    }
    name
}

/// stderr then stdout of a finished command, trimmed, for error messages.
fn output_text(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    match (stderr.trim(), stdout.trim()) {
        ("", "") => "no output".to_owned(),
        (err, "") => err.to_owned(),
        ("", out) => out.to_owned(),
        (err, out) => format!("{err}\n{out}"),
    }
}

/// Finds the directory holding `initdb` and `pg_ctl`: `$PGRELAY_PG_BINDIR`
/// if set (and then only there), else the newest `/usr/lib/postgresql/*/bin`,
/// else `pg_config --bindir`, else `PATH`.
async fn find_bindir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|dir| !dir.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::BinariesNotFound {
                searched: format!("{} (from {BINDIR_ENV})", dir.display()),
            })
        };
    }
    let mut searched = vec![format!("{DEBIAN_PG_ROOT}/*/bin")];
    if let Some(dir) = newest_debian_bindir() {
        return Ok(dir);
    }

    searched.push("pg_config --bindir".to_owned());
    let mut cmd = tokio::process::Command::new("pg_config");
    cmd.arg("--bindir").stdin(Stdio::null());
    if let Ok(output) = output_within(
        cmd,
        "pg_config",
        "pg_config --bindir",
        Duration::from_secs(10),
    )
    .await
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && !dir.as_os_str().is_empty() {
            if has_tools(&dir) {
                return Ok(dir);
            }
            searched.push(dir.display().to_string());
        }
    }

    searched.push("PATH".to_owned());
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) =
            std::env::split_paths(&path).find(|dir| dir.is_absolute() && has_tools(dir))
        {
            return Ok(dir);
        }
    }
    Err(ClusterError::BinariesNotFound {
        searched: searched.join(", "),
    })
}

/// The `/usr/lib/postgresql/<version>/bin` with the highest version that has
/// both tools.
fn newest_debian_bindir() -> Option<PathBuf> {
    let entries = std::fs::read_dir(DEBIAN_PG_ROOT).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// Whether `dir` holds both `initdb` and `pg_ctl`.
fn has_tools(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()
}

/// Whether this process's effective uid is 0: the `Uid:` line of
/// `/proc/self/status` (real, effective, saved, fs), else `id -u`. Assumes not
/// root if neither works (initdb then says so itself).
async fn running_as_root() -> bool {
    if let Ok(status) = tokio::fs::read_to_string("/proc/self/status").await {
        let euid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1));
        if let Some(euid) = euid {
            return euid == "0";
        }
    }
    let mut cmd = tokio::process::Command::new("id");
    cmd.arg("-u").stdin(Stdio::null());
    match output_within(cmd, "id", "id -u", Duration::from_secs(10)).await {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim() == "0"
        }
        _ => false,
    }
}

/// `chown -R postgres:postgres path`.
async fn chown_to_postgres(path: &Path) -> Result<(), ClusterError> {
    let mut cmd = tokio::process::Command::new("chown");
    cmd.arg("-R")
        .arg(format!("{PG_OS_USER}:{PG_OS_USER}"))
        .arg(path)
        .stdin(Stdio::null());
    run(
        cmd,
        &format!("chown -R {PG_OS_USER}:{PG_OS_USER} {}", path.display()),
        Duration::from_secs(60),
    )
    .await
    .map(drop)
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16, ClusterError> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(ClusterError::NoFreePort)?;
    let port = listener
        .local_addr()
        .map_err(ClusterError::NoFreePort)?
        .port();
    Ok(port)
}

/// Size of `path` in bytes, 0 if it does not exist.
async fn file_len(path: &Path) -> u64 {
    tokio::fs::metadata(path).await.map_or(0, |m| m.len())
}

/// Escapes `value` for a single-quoted postgresql.conf string.
fn conf_quote(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn select_one(url: &str) -> i32 {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to the throwaway cluster");
        let conn = tokio::spawn(connection);
        let row = client.query_one("SELECT 1", &[]).await.expect("SELECT 1");
        drop(client);
        let _ = conn.await;
        row.get(0)
    }

    #[tokio::test]
    async fn starts_stops_and_restarts() {
        let cluster = Cluster::start().await.expect("start a throwaway cluster");
        let url = cluster.url("postgres");
        assert_eq!(
            url,
            format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port())
        );
        assert_eq!(select_one(&url).await, 1);

        cluster.stop().await.expect("stop");
        cluster.stop().await.expect("stop is idempotent");
        assert!(
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_err(),
            "a stopped server must refuse connections"
        );

        cluster.start_again().await.expect("start again");
        assert_eq!(select_one(&url).await, 1);

        let dir = cluster.socket_dir().to_owned();
        drop(cluster);
        assert!(!dir.exists(), "dropping the cluster removes its directory");
        assert!(
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_err(),
            "a dropped cluster's server must be gone"
        );
    }
}
