//! Deployments behind a connection pooler: a real PgBouncer in front of the
//! test cluster. Through a transaction-mode pool LISTEN hears nothing, which
//! used to be silent; now the probe turns `/readyz` to 503 with a log line
//! naming the cause, and the heartbeat's read of the log still delivers.
//! Reads (the pool) work through transaction mode of any PgBouncer version,
//! because pgrelay sends no named prepared statement outside a transaction.
//!
//! Durations: the transaction-mode test waits for the probe's 5 s bound and a
//! heartbeat (about 6 to 11 s); the others take about a second.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::harness::*;

/// The log line's words that name the cause (src/listen.rs).
const POOLER_CAUSE: &str = "LISTEN is probably going through a transaction-mode pooler";

/// A PgBouncer on a free port of 127.0.0.1 in front of the test cluster,
/// with its own ini in a temporary directory; killed on drop.
struct PgBouncer {
    child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// The pgbouncer binary (Debian installs it in /usr/sbin, off a user's PATH).
fn pgbouncer_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|binary| binary.is_file())
        .unwrap_or_else(|| {
            panic!("the pooler tests need PgBouncer: apt-get install pgbouncer (Debian/Ubuntu)")
        })
}

impl PgBouncer {
    /// Starts PgBouncer with `pool_mode = mode` and waits until it answers.
    async fn start(db: &TestDb, mode: &str) -> PgBouncer {
        let binary = pgbouncer_binary();
        let server = url::Url::parse(&db.url).expect("test url");
        let host = server.host_str().expect("the test database has a host");
        let port = server.port().unwrap_or(5432);
        let user = server.username();
        let password = server.password().unwrap_or("");
        let listen_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port")
            .port();

        // Readable by the postgres user (PgBouncer refuses to run as root).
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        // trust: no client authentication, but the user must be listed; the
        // password (if the server wants one) is what PgBouncer logs in with.
        std::fs::write(
            dir.path().join("userlist.txt"),
            format!("\"{user}\" \"{password}\"\n"),
        )
        .expect("write userlist");
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 * = host={host} port={port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {listen_port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {userlist}\n\
                 pool_mode = {mode}\n\
                 max_client_conn = 200\n\
                 default_pool_size = 20\n",
                userlist = dir.path().join("userlist.txt").display(),
            ),
        )
        .expect("write pgbouncer.ini");
        let log = std::fs::File::create(dir.path().join("pgbouncer.log")).expect("log file");

        let as_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let mut command = if as_root {
            // setpriv execs PgBouncer itself (runuser would fork and wait,
            // and a kill would then orphan it); --pdeathsig takes it down
            // with this test even if the test binary is killed.
            let mut command = tokio::process::Command::new("setpriv");
            command
                .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
                .args(["--pdeathsig=KILL", "--"])
                .arg(&binary);
            command
        } else {
            tokio::process::Command::new(&binary)
        };
        command
            .arg(&ini)
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let mut bouncer = PgBouncer {
            child,
            port: listen_port,
            dir,
        };
        let url = bouncer.url(db);
        let log = bouncer.log_path();
        let child = &mut bouncer.child;
        wait_for("pgbouncer to accept connections", || {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("pgbouncer exited ({status}): {log}");
            }
            let url = url.clone();
            async move {
                let Ok((client, connection)) = tokio_postgres::connect(&url, NoTls).await else {
                    return false;
                };
                tokio::spawn(connection);
                client.simple_query("SELECT 1").await.is_ok()
            }
        })
        .await;
        bouncer
    }

    /// `db`'s URL, through this PgBouncer.
    fn url(&self, db: &TestDb) -> String {
        let mut url = url::Url::parse(&db.url).expect("test url");
        url.set_host(Some("127.0.0.1")).expect("set host");
        url.set_port(Some(self.port)).expect("set port");
        url.to_string()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.log")
    }
}

/// The failure that used to be silent: `--database-url` through PgBouncer in
/// transaction mode, LISTEN included. The real binary: within the probe's
/// bound `/readyz` is 503, the log says why in one line (once, not once per
/// heartbeat), the gauge says 0, and events still reach a socket, complete
/// and in order, through the heartbeat's read of the log.
#[tokio::test]
async fn listen_through_a_transaction_pooler_is_not_ready_says_why_and_still_delivers() {
    let db = TestDb::demo("pooler_tx_listen").await;
    let bouncer = PgBouncer::start(&db, "transaction").await;
    let mut serve = ServeProcess::spawn(&["--database-url", &bouncer.url(&db)]);
    let addr = serve.addr;
    serve.wait_for_log(POOLER_CAUSE).await;
    assert_eq!(
        http_get(addr, "/readyz").await.0,
        503,
        "ready although LISTEN hears nothing"
    );
    assert_eq!(metric(addr, "pgrelay_listen_probe_ok").await, Some(0.0));

    // Sockets are served meanwhile, and the safety net delivers.
    let mut dashboard = serve.socket("/ws/dashboard/", &token("1", true)).await;
    // One row at a time, each committed after the previous one arrived: each
    // arrives by its own heartbeat's read, and every heartbeat also sends a
    // probe, so three heartbeats (and probes) pass.
    for n in 0..3 {
        let id = db.business(2, &format!("via the safety net {n}")).await;
        let event = dashboard.event().await;
        assert_eq!(event["data"]["id"], id, "{event}");
    }

    // Those heartbeats' probes did not come back either.
    let log = serve.log();
    assert_eq!(
        log.matches(POOLER_CAUSE).count(),
        1,
        "the cause is logged once per change, not per heartbeat:\n{log}"
    );
    assert_eq!(http_get(addr, "/readyz").await.0, 503, "{log}");
}

/// The fix the log line asks for: reads through the transaction-mode pool,
/// LISTEN direct (`--listen-database-url`). Ready, the probe comes back, and
/// a burst arrives complete and in order well within one heartbeat (so by
/// NOTIFY, not by the safety net); replays of both stream kinds, which read
/// through the pool, work through the pooler, several at once over several
/// pages (with deadpool's `prepare_cached` they failed with 1011 here, on
/// PgBouncer 1.18).
#[tokio::test]
async fn reads_through_a_transaction_pooler_with_listen_direct_are_ready_and_prompt() {
    let db = TestDb::demo("pooler_tx_reads").await;
    let bouncer = PgBouncer::start(&db, "transaction").await;
    let pooled = bouncer.url(&db).parse().expect("pooler url");
    let relay = TestRelay::start_with(&db, |config| {
        config.listen_database = Some(config.database.clone());
        config.database = pooled;
    })
    .await;
    let addr = relay.relay.addr();
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    assert_eq!(metric(addr, "pgrelay_listen_probe_ok").await, Some(1.0));

    let mut dashboard = relay.dashboard().await;
    let before = max_id(&db).await;
    let writer = db.client().await;
    let mut businesses = Vec::new();
    for n in 0..20 {
        businesses.push(insert_business(&writer, 2, &format!("burst {n}")).await);
    }
    let committed = Instant::now();
    let mut received = Vec::new();
    for _ in &businesses {
        let event = dashboard.event().await;
        received.push(event["data"]["id"].as_i64().expect("business id"));
    }
    let took = committed.elapsed();
    assert_eq!(received, businesses, "the burst, complete and in order");
    assert!(
        took < Duration::from_millis(2500),
        "the burst took {took:?} after its last commit: about a heartbeat (5 s), so \
         it came by the safety net, not by NOTIFY"
    );

    // Replays read through the pool: several at once, over several pages,
    // so the pool's connections interleave on PgBouncer's server connections
    // (a statement prepared on one would be missing on another).
    db.exec(
        "INSERT INTO businesses (owner_id, name) \
         SELECT 2, 'backlog ' || g FROM generate_series(1, 1200) g",
    )
    .await;
    let expected = ids_after(&db, before).await;
    let live = read_ids(&mut dashboard, expected.len() - businesses.len()).await;
    assert_same_ids(&live, &expected[businesses.len()..], "the backlog, live");
    let epoch = epoch(&db).await;
    // Two per user: the most one user may run at once (see `replays`).
    let replays = (0..2).flat_map(|_| {
        [
            ("/ws/dashboard/", token("1", true)),
            ("/ws/notifications/", token("2", false)),
        ]
    });
    let replays = replays.map(|(path, token)| {
        let (relay, epoch, expected) = (&relay, &epoch, &expected);
        async move {
            let mut ws = resume(relay, path, &token, before, epoch).await;
            let got = read_ids(&mut ws, expected.len()).await;
            assert_same_ids(
                got.as_slice(),
                expected,
                &format!("replay of {path} through the pooler"),
            );
        }
    });
    futures_util::future::join_all(replays).await;
}

/// Session mode keeps one server connection per client, so LISTEN works
/// through it: one URL for everything is ready and events flow.
#[tokio::test]
async fn a_session_pooler_as_the_only_url_is_ready_and_events_flow() {
    let db = TestDb::demo("pooler_session").await;
    let bouncer = PgBouncer::start(&db, "session").await;
    let pooled = bouncer.url(&db).parse().expect("pooler url");
    let relay = TestRelay::start_with(&db, |config| config.database = pooled).await;
    let addr = relay.relay.addr();
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    assert_eq!(metric(addr, "pgrelay_listen_probe_ok").await, Some(1.0));
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;
    let id = db.business(2, "through session mode").await;
    for ws in [&mut dashboard, &mut owner] {
        let event = ws.event().await;
        assert_eq!(event["data"]["id"], id, "{event}");
    }
}
