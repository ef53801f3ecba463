//! `--scenario ideal` end to end, as it is run: the bench binary starts its
//! ideal broadcaster (itself, with `--ideal-serve`), 20 sockets connect,
//! 200 events/s go out for 0.5 s of warm-up and 1 s measured, and every
//! event must reach every socket exactly once. No PostgreSQL.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The whole run takes about 5 s (the 1 s quiet check and 1.5 s for the
/// sockets' memory to settle included).
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Runs the bench with `args`, waiting for it `RUN_LIMIT` at most.
fn bench(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_pgrelay-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pgrelay-bench");
    let pid = child.id();
    let (done, output) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match output.recv_timeout(RUN_LIMIT) {
        Ok(output) => output.expect("pgrelay-bench's output"),
        Err(_) => {
            // SIGTERM ends the bench without its destructors; its
            // broadcaster then ends with the end of its stdin.
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("pgrelay-bench did not end within {RUN_LIMIT:?}");
        }
    }
}

#[test]
fn every_socket_gets_every_event_once() {
    let output = bench(&[
        "--scenario",
        "ideal",
        "--sockets",
        "20",
        "--rate",
        "200",
        "--warmup",
        "500ms",
        "--duration",
        "1s",
        "--json",
        // Another test or build may be busy: the figures are not the point.
        "--allow-noisy",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}\n{stderr}", output.status);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("the report is not JSON: {e}\n{stderr}"));
    // 1.5 s at 200/s is events 1..=300, each to all 20 sockets.
    assert_eq!(report["expected_total"], 20 * 300, "{report}");
    assert_eq!(report["received_total"], 20 * 300, "{report}");
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["unexpected"], 0);
    assert_eq!(report["insert_errors"], 0);
    assert_eq!(report["passed"], true);
    let target = report["target"].as_str().unwrap_or_default();
    assert!(target.contains("ideal broadcaster"), "{target}");
    // The broadcaster's process is measured as pgrelay's is.
    assert!(
        report["pgrelay"]["rss_connected_kib"].as_u64() > Some(0),
        "{report}"
    );
}
