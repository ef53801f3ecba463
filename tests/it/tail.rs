//! `pgrelay tail`: prints events as JSON lines, resumes across a server
//! restart with nothing lost or doubled, exits 0 on Ctrl-C, and refuses in
//! one line with exit 2; over WebSocket and over Server-Sent Events alike.

use std::net::SocketAddr;
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

/// Tail over `transport` with `--url url`, resuming after `last_id`.
fn spawn_tail(url: &str, token: &str, transport: &str) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = tail_command(&[
        "--url",
        url,
        "--token",
        token,
        "--last-id",
        "0",
        "--transport",
        transport,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn pgrelay tail");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

/// A, then a restart with B committed while no relay runs, then C: tail
/// prints A, B, C, each once, in order, and exits 0 on Ctrl-C.
async fn resumes_across_a_restart(test: &str, transport: &str, url: fn(SocketAddr) -> String) {
    let db = TestDb::demo(test).await;
    let first = TestRelay::start(&db).await;
    let addr = first.relay.addr();
    let (child, mut lines) = spawn_tail(&url(addr), &token("1", true), transport);

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
    assert_eq!(
        got_c["table"], "businesses",
        "the same frame as over a socket"
    );

    let status = interrupt_and_wait(child).await;
    assert_eq!(status.code(), Some(0), "Ctrl-C exits 0");
    drop(second);
}

#[tokio::test]
async fn tail_prints_events_and_resumes_across_a_server_restart_without_loss_or_duplicate() {
    resumes_across_a_restart("tail_resume", "websocket", |addr| {
        format!("ws://{addr}/ws/dashboard/")
    })
    .await;
}

#[tokio::test]
async fn tail_over_sse_resumes_across_a_server_restart_without_loss_or_duplicate() {
    resumes_across_a_restart("tail_sse_resume", "sse", |addr| {
        format!("http://{addr}/sse/dashboard/")
    })
    .await;
}

/// A business's stream over SSE, named by its WebSocket URL: its owner sees
/// its reservations and not another business's.
#[tokio::test]
async fn tail_over_sse_follows_one_business() {
    let db = TestDb::demo("tail_sse_business").await;
    let relay = TestRelay::start(&db).await;
    let mine = db.business(2, "Mine").await;
    let other = db.business(2, "Other").await;
    let url = format!("ws://{}/ws/businesses/{mine}/", relay.relay.addr());
    let (child, mut lines) = spawn_tail(&url, &token("2", false), "sse");
    let created = next_event(&mut lines).await;
    assert_eq!(
        (&created["table"], &created["data"]["id"]),
        (&Value::from("businesses"), &Value::from(mine)),
        "the replay starts with the business itself"
    );
    let elsewhere = db.reservation(other, 3).await;
    let here = db.reservation(mine, 3).await;
    let got = next_event(&mut lines).await;
    assert_eq!(
        got["data"]["id"], here,
        "the reservation at {mine}, not #{elsewhere} at {other}"
    );
    assert_eq!(got["data"]["business_id"], mine);
    let status = interrupt_and_wait(child).await;
    assert_eq!(status.code(), Some(0), "Ctrl-C exits 0");
}

#[tokio::test]
async fn tail_refusals_are_one_line_and_exit_2() {
    let db = TestDb::demo("tail_refusals").await;
    let relay = TestRelay::start(&db).await;
    let dashboard = format!("ws://{}/ws/dashboard/", relay.relay.addr());
    let owner = token("2", false);
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--url", &dashboard, "--token", &owner], "403"),
        (
            vec!["--url", &dashboard, "--token", &owner, "--transport", "sse"],
            "403",
        ),
        (
            vec!["--url", &dashboard, "--transport", "carrier-pigeon"],
            "transport",
        ),
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
