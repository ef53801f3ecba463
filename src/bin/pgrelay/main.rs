//! The `pgrelay` binary: parses the command line, sets up logging, runs the
//! command, maps errors to exit codes (2 for anything wrong with the
//! configuration or the environment at start, 1 otherwise). It also chooses
//! the process's allocator, which is a property of the binary, not of the
//! library.
//!
//! `serve`, `install` and `token` are library calls. The two commands that
//! are not the server live here, beside this file, so the server library
//! carries neither: `demo` (a throwaway PostgreSQL, through the
//! `pgrelay-cluster` crate, plus the page's write buttons) and `tail` (a
//! WebSocket client).

mod demo;
mod tail;

use std::process::ExitCode;

use clap::Parser;
use pgrelay::config::{Cli, Command};
use pgrelay::{auth, install, Relay};

/// jemalloc, because glibc malloc keeps what a storm of handshakes allocated
/// on its worker threads' arenas (fragmented, so `trim_threshold` never
/// returns it): measured, 20,000 bad handshakes 3,000 at a time took the RSS
/// from 9.5 to 55 MiB for good. jemalloc returns freed pages on a timer, from
/// its own background thread, so an idle process still gives memory back.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (`_RJEM_MALLOC_CONF` in
/// the environment overrides them). A background thread purges freed pages:
/// without it purging happens only inside later allocations, which an idle
/// process never makes. Dirty pages go back within a second, and at once with
/// `MADV_DONTNEED` (muzzy decay 0), which lowers the RSS, where `MADV_FREE`
/// pages would still count until the kernel wants them. No thread caches:
/// an idle worker thread never flushes its cache, which kept ~3 MiB of the
/// storm's memory resident, against ~7% more CPU per delivery without them.
/// BENCHMARKS.md "Memory after a storm" has the options measured.
#[export_name = "_rjem_malloc_conf"]
pub static JEMALLOC_OPTIONS: &[u8; 73] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,tcache:false\0";

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's report spans several lines (usage, tips): keep the first,
            // which names the flag and the problem.
            let report = e.render().to_string();
            let first = report.lines().next().unwrap_or("invalid arguments");
            return fail(2, first.trim_start_matches("error: "));
        }
    };
    init_logging();
    // Every socket is a file descriptor: the usual soft limit of 1024 would
    // refuse the thousand-and-first client.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(1, &format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(run(cli))
}

/// Logs to stderr, filtered by RUST_LOG (default `pgrelay=info`).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pgrelay=info"));
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, not escape codes in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // At trace, tungstenite logs every frame it receives, a client's
        // refresh token with it: its trace lines never reach the log,
        // whatever RUST_LOG says.
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            *meta.level() != tracing::Level::TRACE || !meta.target().contains("tungstenite")
        }));
    tracing_subscriber::registry().with(filter).with(log).init();
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("pgrelay: error: {message}");
    ExitCode::from(code)
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => {
            let print_only = args.print_config;
            let config = match args.resolve() {
                Ok(config) => config,
                Err(e) => return fail(2, &e.to_string()),
            };
            if print_only {
                println!("{config}");
                return ExitCode::SUCCESS;
            }
            let relay = match Relay::start(config).await {
                Ok(relay) => relay,
                Err(e) => return fail(2, &e.to_string()),
            };
            reload_on_sighup(&relay, shutdown_signal()).await;
            tracing::info!("shutting down");
            if !relay.shutdown().await {
                tracing::warn!("some sockets did not close in time");
            }
            ExitCode::SUCCESS
        }
        Command::Install(args) => {
            let config = match args.resolve() {
                Ok(config) => config,
                Err(e) => return fail(2, &e.to_string()),
            };
            match install::install(&config).await {
                Ok(installed) => {
                    println!(
                        "pgrelay schema and capture functions installed, owned by role {}",
                        installed.owner
                    );
                    if installed.demo {
                        println!("demo tables users, businesses, reservations installed");
                    }
                    for spec in installed.watched {
                        println!("watching {spec}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(2, &e.to_string()),
            }
        }
        Command::Token(args) => {
            let secret = match args.secret() {
                Ok(secret) => secret,
                Err(e) => return fail(2, &e.to_string()),
            };
            match auth::mint(&secret, &args.sub, args.role.as_deref(), args.ttl) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e.to_string()),
            }
        }
        Command::Tail(args) => match tail::run(args, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(2, &e.to_string()),
        },
        Command::Demo(args) => match demo::run(&args.listen, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(2, &e.to_string()),
        },
    }
}

/// Re-reads the JWT key files on every SIGHUP until `until` resolves.
async fn reload_on_sighup(relay: &Relay, until: impl std::future::Future<Output = ()>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        until.await;
        return;
    };
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => return,
            _ = hup.recv() => match relay.reload_keys() {
                Ok(()) => tracing::info!("JWT keys reloaded"),
                Err(e) => tracing::error!(error = %e, "JWT key reload failed; keeping the old keys"),
            },
        }
    }
}

/// Resolves on SIGTERM or SIGINT, alike.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C through tokio's portable API.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
