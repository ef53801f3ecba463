//! `pgrelay-bench`: the load generator of DESIGN.md's "Performance" section.
//!
//! It opens N WebSocket (or, with `--transport sse`, Server-Sent Events)
//! clients with minted tokens (dashboard, per-user notifications, half of
//! each, or business stream keys), inserts rows at rate R (new businesses,
//! or the stream keys' reservations and updates) for D seconds through real
//! transactions (`--rows-per-insert` rows each, one by default, spread
//! over several connections), and reports deliveries/s, commit-to-receipt
//! latency (p50/p99/p99.9/max, an HDR histogram), lost, duplicated and
//! misrouted deliveries, and the pgrelay process's peak RSS and CPU seconds.
//!
//! By default it starts its own throwaway PostgreSQL (`pgrelay_cluster`),
//! installs the demo schema, seeds users, and runs the `pgrelay` binary found
//! next to this executable as a child process (`serve`); with `--url` it
//! targets a running pgrelay instead.
//!
//! It is built to cost little per delivery, or it would measure itself: the
//! WebSocket clients are read by hand ([`rawws`]: one buffer a socket, frames
//! handed over in place), frames are not deserialised, counters and the
//! histogram are per worker thread and touched once a read, and the runtime has at most two worker
//! threads.
//!
//! The scenarios (`--scenario`): `load` (the default, [`load`]),
//! `handshake-storm` ([`handshake_storm`]), `connect-rate`
//! ([`connect_rate`]), the resume scenarios of issue 10,
//! `sparse-resume` and `resume-storm` ([`resume`]), and `ideal`
//! ([`ideal`]: the load run against an ideal broadcaster, which is this
//! executable again, with the hidden `--ideal-serve`). Each checks that the
//! machine is quiet before it measures ([`quiet`]). This file
//! only reads the command line, starts the runtime and the server under
//! test (pgrelay, or the broadcaster), runs the scenario and prints its
//! report.

// The load report's `json!` object has outgrown the macro's default depth.
#![recursion_limit = "256"]

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Args, Scenario};
use crate::error::{BenchError, Result};
use crate::procfs::OpenFiles;
use crate::server::Server;

mod args;
mod client;
mod connect_rate;
mod error;
mod eventstream;
mod expected;
mod frame;
mod handshake_storm;
mod ideal;
mod load;
mod procfs;
mod quiet;
mod rawws;
mod resume;
mod server;
mod sse;
mod stats;
mod workload;
mod writer;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.check() {
        return fail(&e);
    }
    // 10,000 sockets need more than the usual 1024 descriptors. A child
    // pgrelay inherits the raised limit (checked once it runs, below).
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    if args.ideal_serve {
        return match ideal::serve(args.ideal_threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&BenchError::io("the ideal broadcaster")(e)),
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&BenchError::io("cannot start the async runtime")(e)),
    };
    runtime.block_on(async {
        let mut server = match Server::start(&args).await {
            Ok(server) => server,
            Err(e) => return fail(&e),
        };
        OpenFiles::read(server.pid).warn_below(args.files_needed());
        let outcome = tokio::select! {
            outcome = run(&args, &mut server) => outcome,
            _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted),
        };
        let shutdown = server.stop().await;
        match outcome {
            Ok(Done::Printed(true)) => ExitCode::SUCCESS,
            Ok(Done::Printed(false)) => ExitCode::from(1),
            Ok(Done::Judged {
                json,
                table,
                passed,
            }) => conclude(&args, json, table, passed),
            Ok(Done::Deliveries(mut report)) => {
                report.pgrelay_shutdown = shutdown;
                conclude(
                    &args,
                    report.json(&args),
                    report.table(&args),
                    report.passed(),
                )
            }
            Err(e) => fail(&e),
        }
    })
}

/// What a scenario measured.
enum Done {
    Deliveries(Box<load::Report>),
    /// A report done before pgrelay stops: its JSON, its table, and
    /// whether it passed.
    Judged {
        json: String,
        table: String,
        passed: bool,
    },
    /// The resume scenarios print their own report: passed or not.
    Printed(bool),
}

impl Done {
    fn judged(json: String, table: String, passed: bool) -> Done {
        Done::Judged {
            json,
            table,
            passed,
        }
    }
}

async fn run(args: &Args, server: &mut Server) -> Result<Done> {
    match args.scenario {
        Scenario::Load => load::bench(args, server)
            .await
            .map(|r| Done::Deliveries(Box::new(r))),
        Scenario::HandshakeStorm => {
            let r = handshake_storm::storm(args, server).await?;
            Ok(Done::judged(r.json(args), r.table(args), r.passed()))
        }
        Scenario::ConnectRate => {
            let r = connect_rate::run(args, server).await?;
            Ok(Done::judged(r.json(args), r.table(args), r.passed()))
        }
        Scenario::SparseResume | Scenario::ResumeStorm => {
            resume::run(args, server).await.map(Done::Printed)
        }
        Scenario::Ideal => ideal::bench(args, server)
            .await
            .map(|r| Done::Deliveries(Box::new(r))),
    }
}

/// Prints a scenario's report (JSON with --json, else the table); exit 0 when
/// it passed, 1 when it did not.
fn conclude(args: &Args, json: String, table: String, passed: bool) -> ExitCode {
    if args.json {
        println!("{json}");
    } else {
        print!("{table}");
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The error line on stderr; exit 3 for a refused quiet check, 2 for any
/// other error.
fn fail(e: &BenchError) -> ExitCode {
    eprintln!("pgrelay-bench: error: {e}");
    match e {
        BenchError::Noisy(_) => ExitCode::from(3),
        _ => ExitCode::from(2),
    }
}
