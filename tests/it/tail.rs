//! `pgrelay tail`: prints events as JSON lines, resumes across a server
//! restart with nothing lost or doubled, exits 0 on Ctrl-C, and refuses in
//! one line with exit 2.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::harness::*;

fn tail_command(args: &[&str]) -> Command {
    command(&[&["tail"], args].concat())
}

/// The next event line on tail's stdout, within the harness bound.
async fn next_event(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("tail printed an event in time")
        .expect("read tail stdout")
        .expect("tail is still running");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
}

async fn interrupt_and_wait(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().expect("tail pid").to_string();
    let killed = Command::new("kill").args(["-INT", &pid]).status().await;
    assert!(killed.is_ok_and(|s| s.success()), "send SIGINT");
    tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("tail exits within 5 s of Ctrl-C")
        .expect("wait for tail")
}

#[tokio::test]
async fn tail_prints_events_and_resumes_across_a_server_restart_without_loss_or_duplicate() {
    let db = TestDb::demo("tail_resume").await;
    let first = TestRelay::start(&db).await;
    let addr = first.relay.addr();
    let url = format!("ws://{addr}/ws/dashboard/");
    let admin = token("1", true);
    let mut child = tail_command(&["--url", &url, "--token", &admin, "--last-id", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgrelay tail");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let a = db.business(2, "A").await;
    assert_eq!(next_event(&mut lines).await["data"]["id"], a);

    // The server goes away; B is committed while nobody relays.
    assert!(first.relay.shutdown().await, "first relay stopped");
    let b = db.business(2, "B").await;
    let second = TestRelay::start_with(&db, |c| c.listen = addr).await;
    let c = db.business(2, "C").await;

    let got_b = next_event(&mut lines).await;
    let got_c = next_event(&mut lines).await;
    assert_eq!(
        got_b["data"]["id"], b,
        "B, committed during the outage, comes first"
    );
    assert_eq!(got_c["data"]["id"], c, "then C, once");
    assert_eq!(got_b["type"], "event");

    let status = interrupt_and_wait(child).await;
    assert_eq!(status.code(), Some(0), "Ctrl-C exits 0");
    drop(second);
}

#[tokio::test]
async fn tail_refusals_are_one_line_and_exit_2() {
    let db = TestDb::demo("tail_refusals").await;
    let relay = TestRelay::start(&db).await;
    let dashboard = format!("ws://{}/ws/dashboard/", relay.relay.addr());
    let owner = token("2", false);
    let cases: [(Vec<&str>, &str); 3] = [
        (vec!["--url", &dashboard, "--token", &owner], "403"),
        (vec!["--url", &dashboard], "token"),
        (
            vec!["--url", "http://example.invalid/ws/", "--token", &owner],
            "ws://",
        ),
    ];
    for (args, mentions) in cases {
        let output = tokio::time::timeout(WAIT, tail_command(&args).output())
            .await
            .expect("tail exits in time")
            .expect("run tail");
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {err}");
        assert!(lines[0].contains(mentions), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
