//! The real `pgrelay` binary: configuration precedence (flag > env > file >
//! DATABASE_URL), exit code 2 with one `pgrelay: error:` line for every bad
//! start, `token`, and `install --demo` run twice.

use std::path::Path;
use std::time::Duration;

use pgrelay::auth::{AuthConfig, KeySource, Verifier};

use crate::harness::*;

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
