//! The real `pgrelay` binary: configuration precedence (flag > env > file >
//! DATABASE_URL), exit code 2 with one `pgrelay: error:` line for every bad
//! start, `token`, and `install --demo` run twice.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use pgrelay::auth::{AuthConfig, KeySource, Verifier};

use crate::harness::*;

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Exit code 2 and exactly one stderr line `pgrelay: error: ...` mentioning
/// `mentions`, without panic text. Returns the line.
pub fn assert_usage_error(output: &Output, mentions: &str) -> String {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic text in stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "want one stderr line, got: {err}");
    assert!(lines[0].starts_with("pgrelay: error: "), "{err}");
    assert!(
        lines[0].contains(mentions),
        "the error should mention {mentions:?}: {err}"
    );
    lines[0].to_owned()
}

/// `key = value` lines of `--print-config`.
pub fn setting(printed: &str, key: &str) -> String {
    printed
        .lines()
        .find_map(|line| {
            let (k, v) = line.split_once(" = ")?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {key} in printed config:\n{printed}"))
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config file");
    path.to_str().expect("utf-8 path").to_owned()
}

#[tokio::test]
async fn print_config_takes_flag_over_env_over_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_file(
        dir.path(),
        "pgrelay.toml",
        r#"
database_url = "postgres://fileuser@filehost:5432/filedb"
listen = "127.0.0.1:7001"
jwt_secret = "file-secret-value"
retention = "2h"
route = ["order_events=dashboard,user:buyer_id"]
"#,
    );

    let from_file = pgrelay(&["serve", "--config", &file, "--print-config"], &[]).await;
    assert_eq!(from_file.status.code(), Some(0), "{}", stderr(&from_file));
    let printed = stdout(&from_file);
    assert_eq!(setting(&printed, "listen"), "\"127.0.0.1:7001\"");
    assert_eq!(setting(&printed, "retention"), "\"2h\"");
    assert_eq!(
        setting(&printed, "route"),
        "[\"order_events=dashboard,user:buyer_id\"]"
    );
    let database = setting(&printed, "database");
    assert!(
        database.contains("filehost") && database.contains("dbname=filedb"),
        "{database}"
    );
    assert!(
        !printed.contains("file-secret-value"),
        "the secret is printed:\n{printed}"
    );

    let env = [("PGRELAY_LISTEN", "127.0.0.1:7002")];
    let from_env = pgrelay(&["serve", "--config", &file, "--print-config"], &env).await;
    assert_eq!(from_env.status.code(), Some(0), "{}", stderr(&from_env));
    let printed = stdout(&from_env);
    assert_eq!(setting(&printed, "listen"), "\"127.0.0.1:7002\"");
    assert_eq!(
        setting(&printed, "retention"),
        "\"2h\"",
        "the file still applies"
    );

    let from_flag = pgrelay(
        &[
            "serve",
            "--config",
            &file,
            "--listen",
            "127.0.0.1:7003",
            "--print-config",
        ],
        &env,
    )
    .await;
    assert_eq!(from_flag.status.code(), Some(0), "{}", stderr(&from_flag));
    let printed = stdout(&from_flag);
    assert_eq!(setting(&printed, "listen"), "\"127.0.0.1:7003\"");
    assert_eq!(setting(&printed, "retention"), "\"2h\"");
}

#[tokio::test]
async fn database_url_is_used_only_when_nothing_else_sets_the_database() {
    let env_url = ("DATABASE_URL", "postgres://envuser@envhost:5433/envdb");
    let only = pgrelay(
        &["serve", "--jwt-secret", "s", "--print-config"],
        &[env_url],
    )
    .await;
    assert_eq!(only.status.code(), Some(0), "{}", stderr(&only));
    let database = setting(&stdout(&only), "database");
    assert!(
        database.contains("envhost") && database.contains("dbname=envdb"),
        "{database}"
    );

    let with_env = pgrelay(
        &["serve", "--jwt-secret", "s", "--print-config"],
        &[
            env_url,
            ("PGRELAY_DATABASE_URL", "postgres://u@pgrelayhost/pgrelaydb"),
        ],
    )
    .await;
    assert_eq!(with_env.status.code(), Some(0), "{}", stderr(&with_env));
    assert!(setting(&stdout(&with_env), "database").contains("dbname=pgrelaydb"));

    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_file(
        dir.path(),
        "pgrelay.toml",
        "database_url = \"postgres://u@filehost/filedb\"\n",
    );
    let with_file = pgrelay(
        &[
            "serve",
            "--config",
            &file,
            "--jwt-secret",
            "s",
            "--print-config",
        ],
        &[env_url],
    )
    .await;
    assert_eq!(with_file.status.code(), Some(0), "{}", stderr(&with_file));
    assert!(setting(&stdout(&with_file), "database").contains("dbname=filedb"));

    let with_flag = pgrelay(
        &[
            "serve",
            "--database-url",
            "postgres://u@flaghost/flagdb",
            "--jwt-secret",
            "s",
            "--print-config",
        ],
        &[env_url],
    )
    .await;
    assert_eq!(with_flag.status.code(), Some(0), "{}", stderr(&with_flag));
    assert!(setting(&stdout(&with_flag), "database").contains("dbname=flagdb"));
}

#[tokio::test]
async fn empty_pgrelay_database_url_counts_as_unset_and_database_url_is_used() {
    // What `PGRELAY_DATABASE_URL: ${PGRELAY_DATABASE_URL}` gives in a compose
    // file when the host variable is unset.
    let output = pgrelay(
        &["serve", "--jwt-secret", "s", "--print-config"],
        &[
            ("PGRELAY_DATABASE_URL", ""),
            ("DATABASE_URL", "postgres://envuser@envhost/envdb"),
        ],
    )
    .await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "DATABASE_URL is set, yet: {}",
        stderr(&output)
    );
    assert!(setting(&stdout(&output), "database").contains("dbname=envdb"));
}

#[tokio::test]
async fn config_file_with_unknown_key_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_file(
        dir.path(),
        "typo.toml",
        "listen = \"127.0.0.1:7001\"\nlisten_adress = \"0.0.0.0:80\"\n",
    );
    let output = pgrelay(
        &[
            "serve",
            "--config",
            &file,
            "--database-url",
            "postgres://u@h/d",
            "--jwt-secret",
            "s",
            "--print-config",
        ],
        &[],
    )
    .await;
    let line = assert_usage_error(&output, &file);
    assert!(line.contains("listen_adress"), "names the key: {line}");
}

#[tokio::test]
async fn route_without_equals_exits_2() {
    let output = pgrelay(
        &[
            "serve",
            "--database-url",
            "postgres://u@h/d",
            "--jwt-secret",
            "s",
            "--route",
            "business_events",
            "--print-config",
        ],
        &[],
    )
    .await;
    assert_usage_error(&output, "--route");
}

#[tokio::test]
async fn route_with_unknown_audience_exits_2_naming_it() {
    let output = pgrelay(
        &[
            "serve",
            "--database-url",
            "postgres://u@h/d",
            "--jwt-secret",
            "s",
            "--route",
            "business_events=dashboard,everyone",
            "--print-config",
        ],
        &[],
    )
    .await;
    let line = assert_usage_error(&output, "--route");
    assert!(line.contains("everyone"), "{line}");
}

#[tokio::test]
async fn missing_jwt_secret_exits_2() {
    let output = pgrelay(
        &[
            "serve",
            "--database-url",
            "postgres://u@h/d",
            "--print-config",
        ],
        &[],
    )
    .await;
    assert_usage_error(&output, "--jwt-secret");
}

#[tokio::test]
async fn missing_jwt_public_key_file_exits_2_at_start() {
    let db = TestDb::demo("cli_missing_key").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-key.pem");
    let missing = missing.to_str().expect("utf-8 path");
    let output = pgrelay(
        &[
            "serve",
            "--database-url",
            &db.url,
            "--listen",
            "127.0.0.1:0",
            "--jwt-public-key",
            missing,
        ],
        &[],
    )
    .await;
    let line = assert_usage_error(&output, missing);
    assert!(line.contains("--jwt-public-key"), "{line}");
}

#[tokio::test]
async fn unreachable_database_exits_2_with_one_line_and_no_panic() {
    let url = "postgres://nobody@127.0.0.1:1/nowhere?connect_timeout=5";
    let serve = pgrelay(
        &[
            "serve",
            "--database-url",
            url,
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            "s",
        ],
        &[],
    )
    .await;
    assert_usage_error(&serve, "database");

    let install = pgrelay(&["install", "--database-url", url], &[]).await;
    assert_usage_error(&install, "database");
}

#[tokio::test]
async fn serving_a_database_without_pgrelay_exits_2_naming_pgrelay_install() {
    let db = TestDb::empty("cli_not_installed").await;
    let output = pgrelay(
        &[
            "serve",
            "--database-url",
            &db.url,
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            "s",
        ],
        &[],
    )
    .await;
    assert_usage_error(&output, "pgrelay install");
}

#[tokio::test]
async fn install_watching_a_missing_table_exits_2_naming_it() {
    let db = TestDb::empty("cli_watch_missing").await;
    let output = pgrelay(
        &[
            "install",
            "--database-url",
            &db.url,
            "--watch",
            "public.nope=nope_events",
        ],
        &[],
    )
    .await;
    let line = assert_usage_error(&output, "--watch public.nope: table does not exist");
    assert!(
        !line.contains(&db.url),
        "no connection string in errors: {line}"
    );
}

#[tokio::test]
async fn flag_with_a_value_of_the_wrong_type_is_one_pgrelay_error_line() {
    let queue = pgrelay(
        &[
            "serve",
            "--database-url",
            "postgres://u@h/d",
            "--jwt-secret",
            "s",
            "--dashboard-queue",
            "abc",
            "--print-config",
        ],
        &[],
    )
    .await;
    assert_usage_error(&queue, "--dashboard-queue");
    let ttl = pgrelay(
        &[
            "token",
            "--jwt-secret",
            "s",
            "--sub",
            "1",
            "--ttl",
            "forever",
        ],
        &[],
    )
    .await;
    assert_usage_error(&ttl, "--ttl");
}

#[tokio::test]
async fn unknown_flag_exits_2_naming_it() {
    let output = pgrelay(&["serve", "--jwt-secrett", "s"], &[]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(first.contains("--jwt-secrett"), "{err}");
}

#[tokio::test]
async fn token_command_prints_a_jwt_the_verifier_accepts_as_admin() {
    let output = pgrelay(
        &[
            "token",
            "--jwt-secret",
            "s",
            "--sub",
            "42",
            "--role",
            "super_admin",
            "--ttl",
            "1h",
        ],
        &[],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed = stdout(&output);
    let token = printed.trim();
    assert_eq!(printed.lines().count(), 1, "one line: {printed:?}");
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    let verifier = Verifier::new(&AuthConfig {
        key: KeySource::Secret("s".into()),
        issuer: None,
        audience: None,
        leeway: Duration::ZERO,
        admin_claims: vec!["role=super_admin".parse().expect("claim")],
    })
    .expect("verifier");
    let identity = verifier.verify(token).expect("the printed token verifies");
    assert_eq!(identity.user, "42");
    assert!(identity.admin, "super_admin role makes an admin");
    let ttl = identity.exp as i64 - now() as i64;
    assert!((3500..=3600).contains(&ttl), "exp is an hour away: {ttl}s");
}

#[tokio::test]
async fn install_demo_exits_0_twice() {
    let db = TestDb::empty("cli_install_demo").await;
    for run in 1..=2 {
        let output = pgrelay(&["install", "--database-url", &db.url, "--demo"], &[]).await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "run {run}: {}",
            stderr(&output)
        );
        assert!(stdout(&output).contains("demo tables"), "run {run}");
    }
    let tables: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' \
             AND tablename IN ('users', 'businesses', 'reservations')",
            &[],
        )
        .await
        .expect("count tables")
        .get(0);
    assert_eq!(tables, 3);
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

#[tokio::test]
async fn tokens_never_reach_the_log_even_at_trace_level() {
    use tokio::io::AsyncReadExt;

    let db = TestDb::demo("cli_token_log").await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("PGRELAY_") || name == "DATABASE_URL" {
            command.env_remove(name.as_ref());
        }
    }
    let listen = addr.to_string();
    let mut child = command
        .args(["serve", "--database-url", &db.url, "--listen", &listen])
        .args(["--jwt-secret", SECRET])
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgrelay serve");
    let mut log = child.stderr.take().expect("stderr");
    // Drain stderr as it comes so a chatty log cannot fill the pipe.
    let reading = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = log.read_to_end(&mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    });
    wait_for("pgrelay serve ready", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && http_get(addr, "/readyz").await.0 == 200
    })
    .await;

    let good = token("2", false);
    let expired = sign(&serde_json::json!({"sub": "2", "exp": now() - 600}));
    let url = |t: &str| format!("ws://{addr}/ws/notifications/?token={t}");
    let mut ws = Ws::connect(&url(&good), None)
        .await
        .unwrap_or_else(|e| panic!("query token refused: {e:?}"));
    ws.hello().await;
    let id = db.business(2, "Logged").await;
    assert_eq!(ws.event().await["data"]["id"], id);
    let refused = Ws::connect(&url(&expired), None)
        .await
        .err()
        .expect("expired token refused");
    assert_eq!(refused.status, 401);
    let refused = Ws::connect(&format!("ws://{addr}/ws/dashboard/?token={good}"), None)
        .await
        .err()
        .expect("non-admin refused");
    assert_eq!(refused.status, 403);
    drop(ws);

    child.start_kill().expect("stop pgrelay");
    let _ = tokio::time::timeout(WAIT, child.wait()).await;
    let log = tokio::time::timeout(WAIT, reading)
        .await
        .expect("stderr closed")
        .expect("read stderr");
    assert!(
        log.lines().count() > 10,
        "trace logging was on, yet the log is nearly empty:\n{log}"
    );
    for secret in [&good, &expired] {
        let signature = secret.rsplit('.').next().expect("signature");
        for (n, line) in log.lines().enumerate() {
            assert!(
                !line.contains(signature),
                "log line {n} carries a token: {line}"
            );
        }
    }
    assert!(!log.contains(SECRET), "the log carries the JWT secret");
}

/// `--listen-database-url` (flag, variable or file key) gives the LISTEN
/// connection its own target, printed without its password; unset, it is
/// the main target (never DATABASE_URL behind the main one's back); a bad
/// one is a usage error that names the flag.
#[tokio::test]
async fn listen_database_url_defaults_to_the_database_and_is_printed_redacted() {
    let pooled = "postgres://app:pooled-secret@pooler:6432/app";
    let direct = "postgres://app:direct-secret@db:5432/app";
    let serve = ["serve", "--database-url", pooled, "--jwt-secret", "s"];

    let env = [("DATABASE_URL", "postgres://other@elsewhere/other")];
    let default = pgrelay(&[&serve[..], &["--print-config"]].concat(), &env).await;
    assert_eq!(default.status.code(), Some(0), "{}", stderr(&default));
    let printed = stdout(&default);
    assert_eq!(
        setting(&printed, "listen_database"),
        setting(&printed, "database")
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let file = write_file(
        dir.path(),
        "pgrelay.toml",
        &format!("listen_database_url = \"{direct}\"\n"),
    );
    let flag = ["--listen-database-url", direct];
    let variable = [("PGRELAY_LISTEN_DATABASE_URL", direct)];
    let config = ["--config", &file];
    for (args, env) in [
        (&flag[..], &[][..]),
        (&[][..], &variable[..]),
        (&config[..], &[][..]),
    ] {
        let output = pgrelay(&[&serve[..], args, &["--print-config"]].concat(), env).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let printed = stdout(&output);
        let listen = setting(&printed, "listen_database");
        assert!(
            listen.contains("host=db ") && listen.contains("5432"),
            "{args:?} {env:?}: {listen}"
        );
        assert!(setting(&printed, "database").contains("host=pooler "));
        assert!(
            !printed.contains("pooled-secret") && !printed.contains("direct-secret"),
            "a password is printed:\n{printed}"
        );
    }

    let bad = pgrelay(
        &[
            &serve[..],
            &["--listen-database-url", "postgres://db:port/app"],
        ]
        .concat(),
        &[],
    )
    .await;
    assert_usage_error(&bad, "--listen-database-url");
}
