//! TLS to PostgreSQL: `sslmode`/`sslrootcert` against a throwaway cluster
//! with `ssl = on` and a certificate chain made at test time (a CA, a server
//! certificate for localhost and 127.0.0.1 signed by it, and an unrelated
//! CA), through the library and the real binary.
//!
//! The cluster is this module's own (the shared one has no TLS, and a
//! `PGRELAY_TEST_DATABASE_URL` server has no certificate we know), shared by
//! its tests and stopped by a watchdog when the test binary exits.

use std::path::PathBuf;
use std::time::Duration;

use pgrelay::install::InstallConfig;
use pgrelay::pgconn::Target;
use pgrelay_cluster::{Cluster, Extras};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::sync::OnceCell;

use crate::harness::*;

struct TlsServer {
    cluster: Cluster,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    /// A CA that has nothing to do with the server.
    other_ca: PathBuf,
}

static TLS_SERVER: OnceCell<TlsServer> = OnceCell::const_new();

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert")
}

async fn tls_server() -> &'static TlsServer {
    TLS_SERVER
        .get_or_init(|| async {
            let ca_cert = ca("pgrelay test CA");
            let other = ca("unrelated test CA");
            let server_key = KeyPair::generate().expect("server key");
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .expect("server params");
            params
                .distinguished_name
                .push(DnType::CommonName, "localhost");
            let server_cert = params
                .signed_by(&server_key, &ca_cert)
                .expect("server cert");
            let extras = Extras {
                files: vec![
                    ("server.crt".into(), server_cert.pem().into_bytes()),
                    ("server.key".into(), server_key.serialize_pem().into_bytes()),
                    ("ca.pem".into(), ca_cert.pem().into_bytes()),
                    ("other-ca.pem".into(), other.pem().into_bytes()),
                ],
                settings: "ssl = on\n\
                           ssl_cert_file = 'server.crt'\n\
                           ssl_key_file = 'server.key'\n"
                    .into(),
            };
            let cluster = Cluster::start_with(extras).await.unwrap_or_else(|e| {
                panic!("the TLS tests need PostgreSQL binaries (apt-get install postgresql): {e}")
            });
            cluster
                .stop_when_process_exits(std::process::id())
                .expect("start the cluster watchdog");
            TlsServer {
                ca: cluster.data_dir().join("ca.pem"),
                other_ca: cluster.data_dir().join("other-ca.pem"),
                cluster,
            }
        })
        .await
}

/// A fresh database on the TLS cluster: its name and its URL (no sslmode).
async fn tls_db(test: &str) -> (String, String) {
    let server = tls_server().await;
    let name = format!("t_{test}_{}", std::process::id());
    connect(&server.cluster.url("postgres"))
        .await
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
    let url = server.cluster.url(&name);
    (name, url)
}

/// Whether the connection made from `target` is encrypted, as the server sees it.
async fn uses_tls(target: &Target) -> bool {
    let (client, connection) = target
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect with {target}: {e}"));
    let driver = tokio::spawn(connection);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl")
        .get(0);
    drop(client);
    let _ = driver.await;
    ssl
}

fn target(conn: &str) -> Target {
    conn.parse()
        .unwrap_or_else(|e| panic!("{conn} should parse: {e}"))
}

async fn start_relay(database: Target) -> TestRelay {
    TestRelay::start_on(database, Duration::from_secs(30), |_| {}).await
}

#[tokio::test]
async fn sslmode_require_installs_serves_and_delivers_an_event_over_tls() {
    let (name, url) = tls_db("tls_require").await;
    let url = format!("{url}?sslmode=require");
    let installed = pgrelay(&["install", "--demo", "--database-url", &url], &[]).await;
    assert_eq!(
        installed.status.code(),
        Some(0),
        "install: {}",
        stderr(&installed)
    );

    let relay = start_relay(target(&url)).await;
    let mut dashboard = relay.dashboard().await;
    let plain = connect(&tls_server().await.cluster.url(&name)).await;
    plain
        .batch_execute("INSERT INTO users (id, email, role) VALUES (2, 'o@example.com', 'owner')")
        .await
        .expect("insert user");
    let id = insert_business(&plain, 2, "Over TLS").await;
    let event = dashboard.event().await;
    assert_eq!(event["data"]["id"], id, "{event}");
    assert_eq!(event["data"]["name"], "Over TLS", "{event}");

    // Every connection the relay holds (pool and LISTEN) is encrypted.
    let backends = plain
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = $1 AND a.application_name LIKE 'pgrelay%'",
            &[&name],
        )
        .await
        .expect("read pg_stat_ssl");
    let names: Vec<String> = backends.iter().map(|r| r.get(0)).collect();
    assert!(
        names.iter().any(|n| n == "pgrelay:listen") && names.iter().any(|n| n == "pgrelay"),
        "want the pool and the LISTEN connection: {names:?}"
    );
    for row in &backends {
        let (app, ssl): (String, bool) = (row.get(0), row.get(1));
        assert!(ssl, "{app} is not encrypted");
    }
    assert!(relay.relay.shutdown().await);
}

#[tokio::test]
async fn verify_full_with_the_right_ca_works_and_verify_ca_skips_only_the_host_name() {
    let server = tls_server().await;
    let (name, url) = tls_db("tls_verify_full").await;
    let ca = server.ca.display();
    let verified = target(&format!("{url}?sslmode=verify-full&sslrootcert={ca}"));
    pgrelay::install::install(&InstallConfig {
        demo: true,
        ..InstallConfig::new(verified.clone())
    })
    .await
    .expect("install with verify-full");
    let relay = start_relay(verified).await;
    assert!(relay.relay.shutdown().await);

    // The certificate names localhost and 127.0.0.1, not db.invalid; the
    // socket still goes to 127.0.0.1 (hostaddr).
    let elsewhere = |mode: &str| {
        target(&format!(
            "host=db.invalid hostaddr=127.0.0.1 port={} user=postgres dbname={name} \
             sslmode={mode} sslrootcert='{ca}'",
            server.cluster.port()
        ))
    };
    assert!(
        uses_tls(&elsewhere("verify-ca")).await,
        "verify-ca checks the chain only"
    );
    let err = elsewhere("verify-full")
        .connect()
        .await
        .err()
        .expect("verify-full must refuse a certificate for another name");
    let line = pgrelay::db::db_message(&err);
    assert!(line.contains("not valid for name \"db.invalid\""), "{line}");
}

#[tokio::test]
async fn serve_with_the_wrong_ca_exits_2_with_one_line_naming_the_certificate() {
    let server = tls_server().await;
    let (_, url) = tls_db("tls_wrong_ca").await;
    let other = server.other_ca.display();
    let output = pgrelay(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            "s",
            "--database-url",
            &format!("{url}?sslmode=verify-full&sslrootcert={other}"),
        ],
        &[],
    )
    .await;
    let line = assert_usage_error(&output, "certificate");
    assert!(line.contains("UnknownIssuer"), "{line}");

    // require with a root certificate checks the chain, as in libpq.
    let err = target(&format!("{url}?sslmode=require&sslrootcert={other}"))
        .connect()
        .await
        .err()
        .expect("require with the wrong root certificate must fail");
    assert!(
        pgrelay::db::db_message(&err).contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn sslmode_disable_talks_plain_text_to_a_tls_server_and_the_default_prefers_tls() {
    let (_, url) = tls_db("tls_disable").await;
    assert!(!uses_tls(&target(&format!("{url}?sslmode=disable"))).await);
    assert!(
        uses_tls(&target(&url)).await,
        "the default (prefer) uses TLS"
    );
}

/// A server that answers every SSLRequest with `N`, as PostgreSQL does with
/// `ssl = off`.
async fn server_without_tls() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if socket.read_exact(&mut request).await.is_ok() {
                    let _ = socket.write_all(b"N").await;
                    let _ = socket.read(&mut request).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn require_against_a_server_without_tls_exits_2_with_one_line() {
    let port = server_without_tls().await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/db?sslmode=require");
    let output = pgrelay(&["install", "--database-url", &url], &[]).await;
    assert_usage_error(&output, "server does not support TLS");
}

#[tokio::test]
async fn bad_sslrootcert_or_sslmode_exits_2_naming_it_before_connecting() {
    let serve = |url: String| async move {
        pgrelay(
            &[
                "serve",
                "--jwt-secret",
                "s",
                "--print-config",
                "--database-url",
                &url,
            ],
            &[],
        )
        .await
    };
    let missing =
        serve("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem".into()).await;
    assert_usage_error(&missing, "sslrootcert /nonexistent/ca.pem");

    let dir = tempfile::tempdir().expect("temp dir");
    let junk = dir.path().join("ca.pem");
    std::fs::write(&junk, "not a certificate").expect("write");
    let invalid = serve(format!(
        "postgres://h/db?sslmode=verify-ca&sslrootcert={}",
        junk.display()
    ))
    .await;
    assert_usage_error(&invalid, "no PEM certificate");

    let bogus = serve("host=h sslmode=bogus".into()).await;
    assert_usage_error(&bogus, "sslmode \"bogus\"");

    // PGSSLMODE applies when the string has no sslmode.
    let args = [
        "serve",
        "--jwt-secret",
        "s",
        "--print-config",
        "--database-url",
        "postgres://h/db",
    ];
    let from_env = pgrelay(&args, &[("PGSSLMODE", "verify-full")]).await;
    assert_usage_error(&from_env, "sslmode=verify-full needs a root certificate");
    let require = pgrelay(&args, &[("PGSSLMODE", "require")]).await;
    assert_eq!(require.status.code(), Some(0), "{}", stderr(&require));
    let database = setting(&stdout(&require), "database");
    assert!(database.contains("sslmode=require"), "{database}");
}
