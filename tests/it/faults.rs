//! Fault injection: the LISTEN connection killed or locked out, PostgreSQL
//! restarted, the network black-holed, sockets too slow, tokens expiring,
//! junk from clients, silent peers, SIGTERM. In every case an open socket
//! either keeps receiving every event exactly once in order, or is closed
//! with the documented code and can resume without loss.
//!
//! Durations (alone, after the shared cluster is up): most tests take 0.3 to
//! 3.5 s; the restart test starts its own cluster, about 1 to 5 s. The two
//! network-cut tests wait for the listener's heartbeat (5 s interval + 5 s
//! timeout, src/listen.rs), so they take about 11 s; the one that loses the
//! open connections takes about 20 s once the relay recovers (it currently
//! does not, and fails after 25 s: see its comment).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pgrelay::install::InstallConfig;
use pgrelay_cluster::Cluster;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::harness::*;
use pgrelay::wire::Close;

// --- helpers ---------------------------------------------------------------

async fn readyz(relay: &TestRelay) -> Option<u16> {
    try_http_get(relay.relay.addr(), "/readyz")
        .await
        .map(|(status, _)| status)
}

async fn wait_readyz(relay: &TestRelay, status: u16, what: &str) {
    wait_for(what, || async { readyz(relay).await == Some(status) }).await;
}

async fn reconnects(relay: &TestRelay) -> f64 {
    metric(relay.relay.addr(), "pgrelay_listener_reconnects_total")
        .await
        .expect("pgrelay_listener_reconnects_total in /metrics")
}

const LISTEN_BACKEND: &str = "SELECT pid FROM pg_stat_activity \
     WHERE datname = current_database() AND application_name = 'pgrelay:listen'";

/// The pid of the relay's LISTEN backend once there is one that is not in
/// `gone` (killed before).
async fn listen_backend(client: &Client, gone: &[i32]) -> i32 {
    let deadline = Instant::now() + WAIT;
    loop {
        let pids: Vec<i32> = client
            .query(LISTEN_BACKEND, &[])
            .await
            .expect("read pg_stat_activity")
            .iter()
            .map(|row| row.get(0))
            .collect();
        if let Some(pid) = pids.into_iter().find(|pid| !gone.contains(pid)) {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a new LISTEN backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn terminate(client: &Client, pid: i32) {
    let done: bool = client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("pg_terminate_backend")
        .get(0);
    assert!(done, "terminate backend {pid}");
}

/// Inserts `n` businesses for owner 2, one transaction each.
async fn insert_many(client: &Client, n: usize, label: &str) {
    for i in 0..n {
        insert_business(client, 2, &format!("{label} {i}")).await;
    }
}

/// Reads every event above `after` that is in the log now, and checks they
/// are exactly the log's, in order; then proves nothing else is pending by
/// committing one more row and getting it next. Returns the ids read.
async fn assert_gets_exactly_the_log(ws: &mut Ws, db: &TestDb, client: &Client, after: i64) {
    let expected = ids_after(db, after).await;
    let ids = read_ids(ws, expected.len()).await;
    assert_strictly_increasing(&ids);
    assert_same_ids(
        &ids,
        &expected,
        &format!("every event after {after}, once, in order"),
    );
    let sentinel = insert_business(client, 2, "sentinel").await;
    let next = ws.event().await;
    assert_eq!(
        next["data"]["id"], sentinel,
        "nothing may follow but new rows: {next}"
    );
}

// --- the LISTEN connection ---------------------------------------------------

/// The LISTEN backend is terminated three times, and rows are committed right
/// after each kill, while the listener is down or reconnecting. A socket
/// opened before stays open and gets every event exactly once, in order: the
/// listener catches up from pgrelay.events and drops the overlap by id.
#[tokio::test]
async fn killed_listen_backend_loses_nothing_and_open_sockets_get_every_event_once_in_order() {
    let db = TestDb::demo("fault_kill_listen").await;
    let relay = TestRelay::start(&db).await;
    let mut ws = relay.ws("/ws/dashboard/", &token("1", true)).await;
    let start = ws.hello().await["last_id"].as_i64().expect("last_id");
    let client = db.client().await;
    insert_many(&client, 3, "before").await;

    let mut killed = Vec::new();
    for round in 0..3 {
        let pid = listen_backend(&client, &killed).await;
        terminate(&client, pid).await;
        killed.push(pid);
        insert_many(&client, 10, &format!("after kill {round}")).await;
    }
    listen_backend(&client, &killed).await;
    wait_readyz(&relay, 200, "/readyz 200 after the last reconnect").await;
    insert_many(&client, 5, "after recovery").await;

    assert_gets_exactly_the_log(&mut ws, &db, &client, start).await;
    wait_for("3 listener reconnects counted", || async {
        reconnects(&relay).await >= 3.0
    })
    .await;
}

/// Rows committed while the listener cannot connect at all (the database
/// refuses new connections; the rows come through a session opened before)
/// reach the open socket once it is back: the catch-up, not NOTIFY, brings
/// them, and `/readyz` says 503 until it is done.
#[tokio::test]
async fn rows_committed_while_the_listener_is_locked_out_are_caught_up_in_order() {
    let db = TestDb::demo("fault_locked_out").await;
    let relay = TestRelay::start(&db).await;
    let mut ws = relay.ws("/ws/dashboard/", &token("1", true)).await;
    let start = ws.hello().await["last_id"].as_i64().expect("last_id");
    let client = db.client().await;
    insert_many(&client, 2, "before").await;
    let seen = read_ids(&mut ws, 2).await;
    assert_eq!(seen, ids_after(&db, start).await);

    let refused_before = reconnects(&relay).await;
    // A database cannot lock itself: ALTER it from another one.
    // Kept to the end of the test: its database is dropped with it.
    let admin_db = TestDb::empty("fault_locked_out_admin").await;
    let other = admin_db.client().await;
    let allow = |yes: bool| format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {yes}", db.name);
    other
        .batch_execute(&allow(false))
        .await
        .expect("refuse new connections");
    let pid = listen_backend(&client, &[]).await;
    terminate(&client, pid).await;
    wait_readyz(&relay, 503, "/readyz 503 while LISTEN is down").await;
    // Two attempts counted: the first one has been refused.
    wait_for("the listener to be refused", || async {
        reconnects(&relay).await >= refused_before + 2.0
    })
    .await;

    insert_many(&client, 20, "while locked out").await;
    let listening = client
        .query(LISTEN_BACKEND, &[])
        .await
        .expect("read pg_stat_activity");
    assert!(listening.is_empty(), "no LISTEN backend while locked out");
    assert_eq!(readyz(&relay).await, Some(503));

    other
        .batch_execute(&allow(true))
        .await
        .expect("accept connections again");
    wait_readyz(&relay, 200, "/readyz 200 after the catch-up").await;
    assert_gets_exactly_the_log(&mut ws, &db, &client, seen[1]).await;
}

// --- PostgreSQL restart -----------------------------------------------------

/// PostgreSQL goes down and comes back (same data, same port). The relay
/// says 503 while it is down, sockets stay open through the outage, rows
/// committed after the restart reach them, and `/readyz` returns to 200.
#[tokio::test]
async fn postgres_restart_keeps_sockets_open_and_relays_rows_committed_after_it() {
    let cluster = Cluster::start()
        .await
        .unwrap_or_else(|e| panic!("this test needs PostgreSQL binaries: {e}"));
    connect(&cluster.url("postgres"))
        .await
        .batch_execute("CREATE DATABASE restart")
        .await
        .expect("create database");
    let url = cluster.url("restart");
    let database: pgrelay::pgconn::Target = url.parse().expect("cluster url");
    pgrelay::install::install(&InstallConfig {
        demo: true,
        ..InstallConfig::new(database.clone())
    })
    .await
    .expect("install --demo");
    connect(&url)
        .await
        .batch_execute(
            "INSERT INTO users (id, email, role) VALUES \
             (1, 'admin@example.com', 'super_admin'), (2, 'owner@example.com', 'owner'), \
             (3, 'customer@example.com', 'customer'), (4, 'other@example.com', 'owner')",
        )
        .await
        .expect("insert users");

    let relay = TestRelay::start_on(database, Duration::from_secs(30), |_| {}).await;
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;
    let before = insert_business(&connect(&url).await, 2, "before the restart").await;
    let event = dashboard.event().await;
    assert_eq!(event["data"]["id"], before);
    assert_eq!(owner.event().await, event);
    let seen = id_of(&event);

    cluster.stop().await.expect("stop postgres");
    wait_readyz(&relay, 503, "/readyz 503 while PostgreSQL is down").await;
    cluster.start_again().await.expect("start postgres again");

    let client = connect(&url).await;
    insert_many(&client, 5, "after the restart").await;
    let expected: Vec<i64> = client
        .query(
            "SELECT id FROM pgrelay.events WHERE id > $1 ORDER BY id",
            &[&seen],
        )
        .await
        .expect("read pgrelay.events")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(expected.len(), 5);
    assert_eq!(read_ids(&mut dashboard, 5).await, expected);
    assert_eq!(read_ids(&mut owner, 5).await, expected);
    wait_readyz(&relay, 200, "/readyz 200 after the restart").await;
}

// --- network cut --------------------------------------------------------------

/// Whether a proxied connection may move bytes.
#[derive(Debug, Clone, Copy)]
struct Link {
    cut: bool,
    /// Connections accepted before this one are dead for good.
    dead_below: usize,
}

impl Link {
    fn forwards(&self, serial: usize) -> bool {
        !self.cut && serial >= self.dead_below
    }
}

/// A TCP proxy in front of PostgreSQL that can black-hole the network: during
/// a cut no byte moves in either direction, but every socket stays open (no
/// FIN, no RST), as when a route or a middlebox silently drops packets.
struct Proxy {
    addr: SocketAddr,
    link: watch::Sender<Link>,
    accepted: Arc<AtomicUsize>,
    cut_at: AtomicUsize,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (link, watching) = watch::channel(Link {
            cut: false,
            dead_below: 0,
        });
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let serial = counter.fetch_add(1, Ordering::SeqCst);
                let mut link = watching.clone();
                tokio::spawn(async move {
                    // Accepted during a cut: reaches the server once the link
                    // is back, like a retransmitted SYN.
                    if link.wait_for(|l| l.forwards(serial)).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, serial, link.clone()));
                    tokio::spawn(pump(server_read, client_write, serial, link));
                });
            }
        });
        Proxy {
            addr,
            link,
            accepted,
            cut_at: AtomicUsize::new(0),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn cut(&self) {
        self.cut_at.store(self.accepted(), Ordering::SeqCst);
        self.link.send_modify(|l| l.cut = true);
    }

    /// The network is back and the connections that were open survive.
    fn heal(&self) {
        self.link.send_modify(|l| l.cut = false);
    }

    /// The network is back but the connections open before the cut are lost
    /// for good, silently (a NAT or firewall forgot them): only connections
    /// made since work.
    fn heal_losing_old_connections(&self) {
        let dead_below = self.cut_at.load(Ordering::SeqCst);
        self.link.send_modify(|l| {
            l.cut = false;
            l.dead_below = dead_below;
        });
    }
}

/// Copies bytes one way while the link allows; holds them (and any EOF)
/// while it does not.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    serial: usize,
    mut link: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if link.wait_for(|l| l.forwards(serial)).await.is_err() {
            return;
        }
        if n == 0 {
            let _ = to.shutdown().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The test database's server address, and the database URL through `proxy`.
async fn through_proxy(db: &TestDb) -> (SocketAddr, impl FnOnce(SocketAddr) -> String) {
    let url = url::Url::parse(&db.url).expect("test url");
    let host = url.host_str().expect("test url host").to_owned();
    let port = url.port().unwrap_or(5432);
    let upstream = tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolve the test server")
        .next()
        .expect("an address for the test server");
    let rewrite = move |proxy: SocketAddr| {
        let mut url = url;
        url.set_host(Some(&proxy.ip().to_string()))
            .expect("proxy host");
        url.set_port(Some(proxy.port())).expect("proxy port");
        url.to_string()
    };
    (upstream, rewrite)
}

/// Shared by both network-cut tests: the relay reaches PostgreSQL through a
/// proxy; the proxy black-holes everything; rows are committed directly
/// during the cut; the heartbeat must notice (503) and the listener try a new
/// connection; then the link is healed by `heal`, and the socket that stayed
/// open must get every row exactly once, in order.
async fn network_cut(test: &str, heal: fn(&Proxy)) {
    let db = TestDb::demo(test).await;
    let (upstream, rewrite) = through_proxy(&db).await;
    let proxy = Proxy::start(upstream).await;
    let via_proxy: pgrelay::pgconn::Target = rewrite(proxy.addr).parse().expect("proxy url");
    let relay = TestRelay::start_on(via_proxy, Duration::from_secs(30), |_| {}).await;
    let mut ws = relay.ws("/ws/dashboard/", &token("1", true)).await;
    let start = ws.hello().await["last_id"].as_i64().expect("last_id");
    let client = db.client().await;
    insert_many(&client, 2, "before the cut").await;
    let seen = read_ids(&mut ws, 2).await;
    assert_eq!(seen, ids_after(&db, start).await);

    let cut = Instant::now();
    proxy.cut();
    let accepted_at_cut = proxy.accepted();
    insert_many(&client, 5, "during the cut").await;
    wait_readyz(&relay, 503, "the heartbeat to notice the cut (503)").await;
    let detected = cut.elapsed();
    wait_for("the listener to try a new connection", || async {
        proxy.accepted() > accepted_at_cut
    })
    .await;
    insert_many(&client, 5, "during the cut, after detection").await;

    heal(&proxy);
    wait_readyz(&relay, 200, "/readyz 200 after the network is back").await;
    assert_gets_exactly_the_log(&mut ws, &db, &client, seen[1]).await;
    eprintln!(
        "{test}: cut detected after {:.1} s, recovered after {:.1} s",
        detected.as_secs_f64(),
        cut.elapsed().as_secs_f64()
    );
}

/// A silent network cut (no FIN, no RST) is noticed by the listener's
/// heartbeat, and when the network is back the rows committed meanwhile
/// arrive. Takes 5 to 11 s: the heartbeat runs every 5 s with a 5 s timeout.
#[tokio::test]
async fn network_cut_is_detected_by_the_heartbeat_and_rows_committed_during_it_arrive() {
    network_cut("fault_cut", Proxy::heal).await;
}

/// As above, but the connections open before the cut are lost for good when
/// the network comes back (a NAT, firewall or load balancer forgot them; in
/// real life their bytes are never acknowledged, so they hang until TCP gives
/// up after about 15 minutes). The relay must recover on new connections.
///
/// Fails today: the listener reconnects, but its first read goes through the
/// pool, which hands out an idle connection from before the cut (recycling is
/// `RecyclingMethod::Fast`, which only checks `is_closed()`), and pool
/// queries have no time limit, so it hangs and `/readyz` stays 503. With
/// `RecyclingMethod::Verified` (the pool's 5 s recycle timeout then discards
/// dead connections) it passes in about 20 s.
#[tokio::test]
async fn network_cut_that_loses_the_open_connections_recovers_on_new_ones() {
    network_cut("fault_cut_lost", Proxy::heal_losing_old_connections).await;
}

// --- slow sockets -----------------------------------------------------------

/// A dashboard socket with a tiny receive buffer, past `hello`; returns it
/// and `hello.last_id`.
async fn small_buffer_dashboard(relay: &TestRelay) -> (Ws, i64) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(relay.relay.addr()).await.expect("connect");
    let mut request = relay
        .ws_url("/ws/dashboard/")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&bearer(&token("1", true))).expect("header"),
    );
    let (stream, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .expect("handshake");
    let mut ws = Ws {
        stream,
        subprotocol: None,
    };
    let last_id = ws.hello().await["last_id"].as_i64().expect("last_id");
    (ws, last_id)
}

/// Reads event frames until the close frame; returns their ids and the code.
async fn events_then_close(ws: &mut Ws) -> (Vec<i64>, u16) {
    let mut ids = Vec::new();
    loop {
        match ws.next_message().await {
            Some(Message::Text(text)) => {
                let event: Value = serde_json::from_str(&text).expect("JSON frame");
                assert_eq!(event["type"], "event", "{event}");
                ids.push(id_of(&event));
            }
            Some(Message::Close(Some(frame))) => return (ids, u16::from(frame.code)),
            other => panic!("expected events then a close frame, got {other:?}"),
        }
    }
}

/// A dashboard socket whose queue (8 frames here) overflows while its client
/// does not read is closed with 4008 after a gap-free prefix of the events;
/// another socket connected at the same time gets every event; the slow
/// client resumes from the last id it got and loses nothing.
///
/// The fast socket is a notifications socket with a large queue: the 200
/// events are one transaction, so they reach the hub in one burst, and a
/// dashboard ring of 8 frames overflows during such a burst whatever its
/// reader does.
#[tokio::test]
async fn slow_socket_is_closed_4008_and_resumes_without_loss_while_others_get_everything() {
    let db = TestDb::demo("fault_slow").await;
    let relay = TestRelay::start_with(&db, |config| {
        config.queues.dashboard = 8;
        config.queues.user = 4096;
    })
    .await;
    let (mut slow, start) = small_buffer_dashboard(&relay).await;
    let mut fast = relay.notifications("2").await;
    let fast_reader = tokio::spawn(async move {
        let ids = read_ids(&mut fast, 200).await;
        (fast, ids)
    });

    // About 4 KiB per frame: 800 KiB in all, more than socket buffers hold.
    db.exec(
        "INSERT INTO businesses (owner_id, name, description) \
         SELECT 2, 'bulk ' || g, repeat('x', 4000) FROM generate_series(1, 200) g",
    )
    .await;
    let expected = ids_after(&db, start).await;
    assert_eq!(expected.len(), 200);
    let (mut fast, fast_ids) = fast_reader.await.expect("fast reader");
    assert_same_ids(
        &fast_ids,
        &expected,
        "the fast socket gets all 200, in order",
    );

    let (got, code) = events_then_close(&mut slow).await;
    assert_eq!(
        code,
        Close::TooSlow.code(),
        "the slow socket is closed as too slow"
    );
    assert!(got.len() < expected.len(), "it was closed before the end");
    assert_same_ids(
        &got,
        &expected[..got.len()],
        "what it got before the close is the events in order, without a gap",
    );
    assert!(metric(relay.relay.addr(), "pgrelay_slow_closes_total").await >= Some(1.0));

    let cursor = got.last().copied().unwrap_or(start);
    let mut resumed = resume(
        &relay,
        "/ws/dashboard/",
        &token("1", true),
        cursor,
        &epoch(&db).await,
    )
    .await;
    let rest = read_ids(&mut resumed, expected.len() - got.len()).await;
    assert_same_ids(&rest, &expected[got.len()..], "the resume brings the rest");

    let id = db.business(2, "live").await;
    assert_eq!(resumed.event().await["data"]["id"], id);
    assert_eq!(fast.event().await["data"]["id"], id);
}

/// Both on the dashboard's one ring (32 frames here), rows committed one at
/// a time: a socket whose client stops reading falls behind once the socket
/// buffers are full (32 KiB frames, 12.5 MiB in all, more than the kernel
/// holds) and is closed with 4008 when it reads again, after a gap-free
/// prefix; the socket that kept reading got every event meanwhile; the slow
/// client resumes and loses nothing.
#[tokio::test]
async fn dashboard_socket_that_stops_reading_is_closed_4008_and_the_reading_one_gets_everything() {
    let db = TestDb::demo("fault_slow_same_ring").await;
    let relay = TestRelay::start_with(&db, |config| config.queues.dashboard = 32).await;
    let (mut slow, start) = small_buffer_dashboard(&relay).await;
    let mut fast = relay.dashboard().await;
    let (ids, mut fast_ids) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = fast.stream.next().await {
            match message {
                Ok(Message::Text(text)) => {
                    let event: Value = serde_json::from_str(&text).expect("JSON frame");
                    let _ = ids.send(event["id"].as_i64());
                }
                Ok(Message::Close(frame)) => panic!("the fast socket was closed: {frame:?}"),
                Ok(_) => {}
                Err(e) => panic!("the fast socket failed: {e}"),
            }
        }
    });

    let client = db.client().await;
    for i in 0..400 {
        client
            .execute(
                "INSERT INTO businesses (owner_id, name, description) \
                 VALUES (2, $1, repeat('x', 32768))",
                &[&format!("row {i}")],
            )
            .await
            .expect("insert business");
    }
    let expected = ids_after(&db, start).await;
    assert_eq!(expected.len(), 400);
    let mut got_fast = Vec::new();
    while got_fast.len() < expected.len() {
        let id = tokio::time::timeout(WAIT, fast_ids.recv())
            .await
            .expect("timed out waiting for the fast socket")
            .expect("the fast socket's reader ended");
        got_fast.push(id.expect("event id"));
    }
    assert_same_ids(&got_fast, &expected, "the reading socket gets every event");

    let (got, code) = events_then_close(&mut slow).await;
    eprintln!(
        "slow socket: {} of {} events before 4008",
        got.len(),
        expected.len()
    );
    assert_eq!(
        code,
        Close::TooSlow.code(),
        "the socket that stopped reading is closed as too slow"
    );
    assert!(got.len() < expected.len(), "it was closed before the end");
    assert_same_ids(
        &got,
        &expected[..got.len()],
        "what it got before the close is the events in order, without a gap",
    );
    let cursor = got.last().copied().unwrap_or(start);
    let mut resumed = resume(
        &relay,
        "/ws/dashboard/",
        &token("1", true),
        cursor,
        &epoch(&db).await,
    )
    .await;
    let rest = read_ids(&mut resumed, expected.len() - got.len()).await;
    assert_same_ids(&rest, &expected[got.len()..], "the resume brings the rest");
}

// --- tokens -------------------------------------------------------------------

/// A token for `sub` that expires at `exp` (seconds since the epoch).
fn token_until(sub: &str, admin: bool, exp: u64) -> String {
    let mut claims = json!({ "sub": sub, "exp": exp });
    if admin {
        claims["role"] = json!("super_admin");
    }
    sign(&claims)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// A socket is closed with 4001 when its token expires, not before: it
/// still gets events until then.
#[tokio::test]
async fn expired_token_closes_the_socket_with_4001_not_before_exp() {
    let db = TestDb::demo("fault_token_exp").await;
    let relay = TestRelay::start(&db).await;
    let exp = now() + 2;
    let mut ws = relay
        .ws("/ws/notifications/", &token_until("2", false, exp))
        .await;
    ws.hello().await;
    let id = db.business(2, "before exp").await;
    assert_eq!(ws.event().await["data"]["id"], id);

    let (code, reason) = ws.close_code().await;
    assert_eq!(code, Close::TokenExpired.code(), "{reason}");
    assert!(unix_now() >= exp as f64, "closed before exp");
}

/// `{"type":"refresh"}` with a later token for the same user, sent before
/// expiry, keeps the socket open past the old `exp`: it receives a row
/// committed after it. Both streams.
#[tokio::test]
async fn refresh_before_expiry_keeps_the_socket_open_past_the_old_exp() {
    let db = TestDb::demo("fault_refresh").await;
    let relay = TestRelay::start(&db).await;
    let exp = now() + 2;
    let mut owner = relay
        .ws("/ws/notifications/", &token_until("2", false, exp))
        .await;
    owner.hello().await;
    let mut dashboard = relay
        .ws("/ws/dashboard/", &token_until("1", true, exp))
        .await;
    dashboard.hello().await;
    owner
        .send_text(&refresh_message(&token_until("2", false, now() + 3600)))
        .await;
    dashboard
        .send_text(&refresh_message(&token_until("1", true, now() + 3600)))
        .await;

    wait_for("the old tokens to expire", || async {
        unix_now() >= (exp + 1) as f64
    })
    .await;
    let id = db.business(2, "after the old exp").await;
    for ws in [&mut owner, &mut dashboard] {
        let next = ws.next_json().await;
        assert_eq!(next["type"], "event", "{next}");
        assert_eq!(next["data"]["id"], id);
    }
}

/// A refresh with a valid token for another user closes the socket with 4001.
#[tokio::test]
async fn refresh_with_another_users_token_closes_4001() {
    let db = TestDb::demo("fault_refresh_other").await;
    let relay = TestRelay::start(&db).await;
    let mut ws = relay.notifications("2").await;
    ws.send_text(&refresh_message(&token("3", false))).await;
    let (code, reason) = ws.close_code().await;
    assert_eq!(code, Close::TokenExpired.code(), "{reason}");
}

/// Anything but a valid token for the same user (and, on the dashboard, still
/// a super admin) closes with 4001: a malformed token, an expired one, one
/// signed with another key, and a dashboard refresh without the admin role.
#[tokio::test]
async fn refresh_with_an_invalid_or_weaker_token_closes_4001() {
    let db = TestDb::demo("fault_refresh_bad").await;
    let relay = TestRelay::start(&db).await;
    let foreign =
        pgrelay::auth::mint("another-secret", "2", None, Duration::from_secs(3600)).expect("mint");
    let cases = [
        ("/ws/notifications/", "2", false, "not.a.jwt".to_owned()),
        (
            "/ws/notifications/",
            "2",
            false,
            token_until("2", false, now() - 10),
        ),
        ("/ws/notifications/", "2", false, foreign),
        ("/ws/dashboard/", "1", true, token("1", false)),
    ];
    for (path, user, admin, renewal) in cases {
        let mut ws = relay.ws(path, &token(user, admin)).await;
        ws.hello().await;
        ws.send_text(&refresh_message(&renewal)).await;
        let (code, reason) = ws.close_code().await;
        assert_eq!(
            code,
            Close::TokenExpired.code(),
            "{path} refresh with {renewal}: {reason}"
        );
    }
}

// --- junk from clients -----------------------------------------------------------

/// A text frame that is not a refresh closes with 1008, and the relay keeps
/// serving.
#[tokio::test]
async fn garbage_text_frame_closes_1008() {
    let db = TestDb::demo("fault_junk_text").await;
    let relay = TestRelay::start(&db).await;
    for junk in ["hello?", r#"{"type":"subscribe"}"#, r#"{"type":"refresh"}"#] {
        let mut ws = relay.dashboard().await;
        ws.send_text(junk).await;
        let (code, reason) = ws.close_code().await;
        assert_eq!(code, 1008, "{junk}: {reason}");
    }
    let mut ws = relay.dashboard().await;
    let id = db.business(2, "still serving").await;
    assert_eq!(ws.event().await["data"]["id"], id);
}

/// A text frame over 16 KiB closes with 1009; one of exactly 16 KiB is read
/// (and refused as junk, 1008), so the limit is the size, not the content.
#[tokio::test]
async fn text_frame_over_16_kib_closes_1009() {
    let db = TestDb::demo("fault_junk_big").await;
    let relay = TestRelay::start(&db).await;
    let mut at_limit = relay.dashboard().await;
    at_limit.send_text(&"x".repeat(16 * 1024)).await;
    let (code, reason) = at_limit.close_code().await;
    assert_eq!(code, 1008, "16 KiB exactly: {reason}");

    let mut over = relay.dashboard().await;
    over.send_text(&"x".repeat(17 * 1024)).await;
    let (code, reason) = over.close_code().await;
    assert_eq!(code, 1009, "17 KiB: {reason}");

    let mut ws = relay.dashboard().await;
    let id = db.business(2, "still serving").await;
    assert_eq!(ws.event().await["data"]["id"], id);
}

// --- heartbeat ------------------------------------------------------------------

/// A peer that completed the handshake but never answers pings is dropped
/// after a missed ping, while a peer that answers stays.
#[tokio::test]
async fn peer_that_never_answers_pings_is_dropped() {
    let db = TestDb::demo("fault_silent_peer").await;
    let relay = TestRelay::start_on(db.config(), Duration::from_millis(300), |_| {}).await;
    const DASHBOARD_SOCKETS: &str = r#"pgrelay_connections{stream="dashboard"}"#;

    // A live client: reading makes its library answer every ping.
    let mut good = relay.dashboard().await;
    let pings = Arc::new(AtomicUsize::new(0));
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let counted = Arc::clone(&pings);
    tokio::spawn(async move {
        while let Some(Ok(message)) = good.stream.next().await {
            match message {
                Message::Ping(_) => {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                Message::Text(text) => {
                    let _ = events.send(text.to_string());
                }
                _ => {}
            }
        }
    });

    let mut silent =
        silent_websocket(relay.relay.addr(), "/ws/dashboard/", &token("1", true)).await;
    // The relay pings it, gets no pong by the next ping and closes the TCP
    // connection: reading what it sent reaches the end.
    let mut sent = Vec::new();
    tokio::time::timeout(WAIT, silent.read_to_end(&mut sent))
        .await
        .expect("the silent socket is closed by the relay")
        .expect("read the silent socket");
    assert!(
        sent.windows(2).any(|w| w == [0x89, 0x00]),
        "the relay pinged the silent peer before dropping it"
    );
    wait_for("the gauge to count only the live socket", || async {
        metric(relay.relay.addr(), DASHBOARD_SOCKETS).await == Some(1.0)
    })
    .await;

    // The live client has answered several pings since, and is still served.
    wait_for("five pings answered", || async {
        pings.load(Ordering::SeqCst) >= 5
    })
    .await;
    assert_eq!(
        metric(relay.relay.addr(), DASHBOARD_SOCKETS).await,
        Some(1.0)
    );
    let id = db.business(2, "still here").await;
    let frame = tokio::time::timeout(WAIT, received.recv())
        .await
        .expect("event for the live client")
        .expect("live client reader");
    let event: Value = serde_json::from_str(&frame).expect("JSON");
    assert_eq!(event["data"]["id"], id);
}

// --- shutdown -------------------------------------------------------------------

/// The real binary, on SIGTERM: closes open sockets with 1001, stops
/// accepting and exits 0 within 5 s.
#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_exits_0_within_5_s() {
    let db = TestDb::demo("fault_sigterm").await;
    let mut serve = ServeProcess::spawn(&["--database-url", &db.url]);
    let addr = serve.addr;
    serve.wait_ready().await;
    let mut dashboard = serve.socket("/ws/dashboard/", &token("1", true)).await;
    let mut owner = serve.socket("/ws/notifications/", &token("2", false)).await;

    let pid = serve.child.id().expect("pid").to_string();
    let sent = Instant::now();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(kill.success());

    for ws in [&mut dashboard, &mut owner] {
        let (code, reason) = ws.close_code().await;
        assert_eq!(code, 1001, "{reason}");
    }
    let left = Duration::from_secs(5).saturating_sub(sent.elapsed());
    let status = tokio::time::timeout(left, serve.child.wait())
        .await
        .unwrap_or_else(|_| panic!("still running 5 s after SIGTERM: {}", serve.log()))
        .expect("wait for pgrelay");
    assert!(status.success(), "exit status {status}: {}", serve.log());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing accepts connections after exit"
    );
}

/// The event log is reinstalled under a running relay (new epoch, ids from 1
/// again; a restore or a failover to a lagging replica looks the same): open
/// sockets are told to reconnect (1012) instead of silently dropping the new,
/// lower ids; resuming with the old cursor gets `reset`; new events flow.
#[tokio::test]
async fn reinstalled_log_restarts_sockets_and_a_resume_gets_reset_not_silence() {
    let db = TestDb::demo("fault_reinstall").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let mut last = 0;
    for i in 0..5 {
        db.business(2, &format!("before {i}")).await;
        last = id_of(&dashboard.event().await);
    }
    let old_epoch = epoch(&db).await;

    db.reinstall_demo().await;
    assert_ne!(epoch(&db).await, old_epoch, "a reinstall is a new epoch");

    let (code, _) = dashboard.close_code().await;
    assert_eq!(
        code,
        Close::LogWentBack.code(),
        "the open socket is told to reconnect"
    );
    relay.wait_ready().await;

    let mut resumed = relay
        .ws(
            &format!("/ws/dashboard/?last_id={last}&epoch={old_epoch}"),
            &token("1", true),
        )
        .await;
    let hello = resumed.hello().await;
    assert_ne!(hello["epoch"], old_epoch);
    let reset = resumed.next_json().await;
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["reason"], "epoch_mismatch");

    let id = db.business(2, "after the reinstall").await;
    let event = resumed.event().await;
    assert_eq!(event["data"]["id"], id);
    assert!(
        id_of(&event) <= last,
        "the new log's ids start again below the old cursor"
    );
}

/// A row written by hand into the log that is not a valid event (its
/// payload is not an object) is skipped, live and in replay: it neither
/// stops the listener nor the resume, and the next real event arrives.
#[tokio::test]
async fn malformed_log_row_is_skipped_live_and_in_replay() {
    let db = TestDb::demo("fault_bad_row").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let before = db.business(2, "before").await;
    let cursor = id_of(&dashboard.event().await);
    db.exec(
        "INSERT INTO pgrelay.events (id, channel, table_name, op, payload) \
         VALUES (nextval('pgrelay.events_id_seq'), 'business_events', 'businesses', 'INSERT', '[1]'); \
         NOTIFY business_events",
    )
    .await;
    let after = db.business(2, "after").await;
    assert_eq!(
        dashboard.event().await["data"]["id"],
        after,
        "live: the bad row is skipped"
    );

    let mut resumed = relay
        .ws(
            &format!("/ws/dashboard/?last_id={}", cursor - 1),
            &token("1", true),
        )
        .await;
    resumed.hello().await;
    assert_eq!(resumed.event().await["data"]["id"], before);
    assert_eq!(
        resumed.event().await["data"]["id"],
        after,
        "replay: the bad row is skipped"
    );
}
