//! `pgrelay install`: idempotent, watches any table, and fails with one clear
//! line on a missing table or a missing privilege. Capture works for
//! application roles that have no grant on the pgrelay schema.

use pgrelay::db::db_message;
use pgrelay::install::InstallConfig;
use pgrelay::install::{install, InstallError};
use pgrelay::route::Routes;

use crate::harness::*;

/// `install` with `--demo` when `demo`, and each of `watch` as a `--watch` value.
fn install_config(db: &TestDb, demo: bool, watch: &[&str]) -> InstallConfig {
    InstallConfig {
        demo,
        watch: watch
            .iter()
            .map(|spec| spec.parse().expect("watch spec"))
            .collect(),
        ..InstallConfig::new(db.config())
    }
}

/// Capture triggers on `table`.
async fn capture_triggers(db: &TestDb, table: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_trigger \
             WHERE tgrelid = $1::text::regclass AND tgname LIKE 'pgrelay%'",
            &[&table],
        )
        .await
        .expect("count triggers")
        .get(0)
}

/// The same URL with another user (and password).
fn url_as(db: &TestDb, user: &str, password: &str) -> String {
    let mut url = url::Url::parse(&db.url).expect("test url");
    url.set_username(user).expect("set user");
    url.set_password(Some(password)).expect("set password");
    url.to_string()
}

#[tokio::test]
async fn install_twice_keeps_one_trigger_and_events_flow_exactly_once() {
    let db = TestDb::demo("install_twice").await;
    db.exec("CREATE TABLE public.orders (id serial PRIMARY KEY, buyer_id bigint NOT NULL)")
        .await;
    let watch = ["public.orders=order_events"];
    install(&install_config(&db, true, &watch))
        .await
        .expect("first install with --watch");
    let epoch_before = epoch(&db).await;
    install(&install_config(&db, true, &watch))
        .await
        .expect("second install is a no-op, not an error");

    assert_eq!(capture_triggers(&db, "public.businesses").await, 1);
    assert_eq!(capture_triggers(&db, "public.reservations").await, 1);
    assert_eq!(capture_triggers(&db, "public.orders").await, 1);
    assert_eq!(
        epoch(&db).await,
        epoch_before,
        "a reinstall must not reset clients' cursors"
    );

    let relay = TestRelay::start_with(&db, |config| {
        config.routes = Routes::parse(&[
            "business_events=dashboard,user:owner_id",
            "reservation_events=dashboard,user:business_owner_id,user:customer_id",
            "order_events=dashboard",
        ])
        .expect("routes");
    })
    .await;
    let mut dashboard = relay.dashboard().await;
    let business = db.business(2, "Twice").await;
    let reservation = db.reservation(business, 3).await;
    db.exec("INSERT INTO orders (buyer_id) VALUES (3)").await;
    let marker = db.business(4, "Marker").await;

    // One event per insert, in order, and nothing in between.
    let frames = [
        dashboard.event().await,
        dashboard.event().await,
        dashboard.event().await,
        dashboard.event().await,
    ];
    let seen: Vec<(&str, &serde_json::Value)> = frames
        .iter()
        .map(|f| (f["table"].as_str().expect("table"), &f["data"]["id"]))
        .collect();
    assert_eq!(
        seen,
        [
            ("businesses", &business.into()),
            ("reservations", &reservation.into()),
            ("orders", &1.into()),
            ("businesses", &marker.into()),
        ]
    );
    let logged: i64 = db.value("SELECT count(*) FROM pgrelay.events").await;
    assert_eq!(logged, 4, "one pgrelay.events row per insert");
}

#[tokio::test]
async fn watched_custom_table_with_custom_route_reaches_dashboard_and_buyer() {
    let db = TestDb::empty("install_watch_orders").await;
    db.exec(
        "CREATE TABLE public.orders (id bigserial PRIMARY KEY, buyer_id bigint NOT NULL, \
         total numeric(10,2) NOT NULL)",
    )
    .await;
    let installed = install(&install_config(&db, false, &["public.orders=order_events"]))
        .await
        .expect("install --watch public.orders=order_events");
    assert_eq!(
        installed.watched,
        ["public.orders=order_events".parse().expect("spec")]
    );

    let relay = TestRelay::start_with(&db, |config| {
        config.routes = Routes::parse(&["order_events=dashboard,user:buyer_id"]).expect("route");
    })
    .await;
    let mut dashboard = relay.dashboard().await;
    let mut buyer = relay.notifications("7").await;
    let mut unrelated = relay.notifications("8").await;

    let order: i64 = db
        .client()
        .await
        .query_one(
            "INSERT INTO orders (buyer_id, total) VALUES (7, 12.50) RETURNING id",
            &[],
        )
        .await
        .expect("insert order")
        .get(0);
    let to_dashboard = dashboard.event().await;
    assert_eq!(to_dashboard["channel"], "order_events");
    assert_eq!(to_dashboard["table"], "orders");
    assert_eq!(to_dashboard["op"], "INSERT");
    assert_eq!(to_dashboard["data"]["id"], order);
    assert_eq!(to_dashboard["data"]["buyer_id"], 7);
    assert_eq!(buyer.event().await, to_dashboard);

    // The generic trigger watches UPDATE too.
    db.exec(&format!(
        "UPDATE orders SET total = 13.00 WHERE id = {order}"
    ))
    .await;
    let update = buyer.event().await;
    assert_eq!(update["op"], "UPDATE");
    assert_eq!(update["data"]["id"], order);
    assert_eq!(dashboard.event().await, update);

    // And DELETE, with the old row as data.
    db.exec(&format!("DELETE FROM orders WHERE id = {order}"))
        .await;
    let delete = buyer.event().await;
    assert_eq!(delete["op"], "DELETE");
    assert_eq!(delete["data"]["id"], order);
    assert_eq!(delete["data"]["buyer_id"], 7);
    assert_eq!(dashboard.event().await, delete);

    // User 8 got none of the above: their first frame is their own order.
    db.exec("INSERT INTO orders (buyer_id, total) VALUES (8, 1.00)")
        .await;
    assert_eq!(unrelated.event().await["data"]["buyer_id"], 8);
}

#[tokio::test]
async fn watching_a_missing_table_names_it_in_one_line() {
    let db = TestDb::empty("install_missing_table").await;
    let err = install(&install_config(&db, false, &["public.nope=nope_events"]))
        .await
        .expect_err("watching a missing table must fail");
    assert!(matches!(err, InstallError::NoTable { .. }), "{err:?}");
    assert_eq!(err.to_string(), "--watch public.nope: table does not exist");

    // Nothing half-installed: the transaction rolled back.
    let schema: Option<String> = db.value("SELECT to_regnamespace('pgrelay')::text").await;
    assert_eq!(schema, None, "a failed install left the pgrelay schema");
}

#[tokio::test]
async fn install_without_privileges_is_a_one_line_permission_error() {
    let db = TestDb::empty("install_no_privs").await;
    let role = format!("{}_role", db.name);
    db.exec(&format!(
        "CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'; \
         REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
         REVOKE CREATE ON DATABASE \"{name}\" FROM PUBLIC;",
        name = db.name
    ))
    .await;
    let as_role: pgrelay::pgconn::Target = url_as(&db, &role, "pw").parse().expect("url");
    let result = install(&InstallConfig {
        demo: true,
        ..InstallConfig::new(as_role)
    })
    .await;
    // Clean up the cluster-wide role before asserting anything.
    db.exec(&format!("DROP ROLE \"{role}\"")).await;

    let err = result.expect_err("install without CREATE privileges must fail");
    let line = err.to_string();
    assert!(
        matches!(err, InstallError::Privilege { .. }),
        "want a privilege error, got {err:?}"
    );
    assert!(!line.contains('\n'), "one line: {line:?}");
    assert!(line.contains("permission denied"), "{line}");
}

#[tokio::test]
async fn application_role_without_pgrelay_grants_can_insert_into_watched_tables() {
    let db = TestDb::demo("install_app_role").await;
    let role = format!("{}_app", db.name);
    db.exec(&format!(
        "CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'; \
         GRANT USAGE ON SCHEMA public TO \"{role}\"; \
         GRANT SELECT, INSERT, UPDATE ON public.businesses, public.reservations TO \"{role}\"; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO \"{role}\";"
    ))
    .await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;

    let outcome = async {
        let app = connect(&url_as(&db, &role, "pw")).await;
        let no_usage: bool = app
            .query_one(
                "SELECT NOT has_schema_privilege(current_user, 'pgrelay', 'USAGE')",
                &[],
            )
            .await
            .map_err(|e| format!("check privileges: {}", db_message(&e)))?
            .get(0);
        if !no_usage {
            return Err("the application role can use the pgrelay schema".to_owned());
        }
        let business: i64 = app
            .query_one(
                "INSERT INTO businesses (owner_id, name) VALUES (2, 'App Role') RETURNING id",
                &[],
            )
            .await
            .map_err(|e| {
                format!(
                    "insert business as the application role: {}",
                    db_message(&e)
                )
            })?
            .get(0);
        let reservation: i64 = app
            .query_one(
                "INSERT INTO reservations (business_id, customer_id, starts_at, party_size) \
                 VALUES ($1, 3, now(), 2) RETURNING id",
                &[&business],
            )
            .await
            .map_err(|e| {
                format!(
                    "insert reservation as the application role: {}",
                    db_message(&e)
                )
            })?
            .get(0);
        Ok((business, reservation))
    }
    .await;
    db.exec(&format!(
        "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM \"{role}\"; \
         REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM \"{role}\"; \
         REVOKE ALL ON SCHEMA public FROM \"{role}\"; \
         DROP ROLE \"{role}\";"
    ))
    .await;
    let (business, reservation) = outcome.unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(dashboard.event().await["data"]["id"], business);
    let to_dashboard = dashboard.event().await;
    assert_eq!(to_dashboard["data"]["id"], reservation);
    assert_eq!(to_dashboard["data"]["business_owner_id"], 2);
    assert_eq!(owner.event().await["data"]["id"], business);
    assert_eq!(owner.event().await["data"]["id"], reservation);
}

#[tokio::test]
async fn mixed_case_channel_is_listened_to_exactly_as_written() {
    let db = TestDb::empty("install_mixed_case").await;
    db.exec("CREATE TABLE public.\"Orders\" (id serial PRIMARY KEY, \"buyerId\" text NOT NULL)")
        .await;
    install(&install_config(
        &db,
        false,
        &["public.\"Orders\"=OrderEvents"],
    ))
    .await
    .expect("install --watch with quoted names");
    let relay = TestRelay::start_with(&db, |config| {
        config.routes = Routes::parse(&["OrderEvents=dashboard,user:buyerId"]).expect("route");
    })
    .await;
    let mut dashboard = relay.dashboard().await;
    let mut buyer = relay.notifications("9").await;
    db.exec("INSERT INTO \"Orders\" (\"buyerId\") VALUES ('9')")
        .await;
    let event = dashboard.event().await;
    assert_eq!(event["channel"], "OrderEvents");
    assert_eq!(event["table"], "Orders");
    // A user id as text in the row matches the token's.
    assert_eq!(event["data"]["buyerId"], "9");
    assert_eq!(buyer.event().await, event);
}

/// On a log too large to index inside the install transaction (an upgrade),
/// install builds the replay index CONCURRENTLY afterwards: it ends up valid,
/// and a second install leaves it alone.
#[tokio::test]
async fn a_large_log_gets_its_replay_index_built_concurrently() {
    let db = TestDb::demo("install_big_log").await;
    db.exec(
        "DROP INDEX pgrelay.events_payload_idx; \
         INSERT INTO pgrelay.events (id, channel, table_name, op, payload) \
         SELECT nextval('pgrelay.events_id_seq'), 'business_events', 'businesses', 'INSERT', \
                jsonb_build_object('id', g, 'owner_id', g % 100, 'pad', repeat('p', 300)) \
         FROM generate_series(1, 120000) g;",
    )
    .await;
    let size = db
        .value::<i64>("SELECT pg_relation_size('pgrelay.events')")
        .await;
    assert!(
        size > 32 << 20,
        "the log is only {size} bytes: not the large path"
    );
    for _ in 0..2 {
        install(&install_config(&db, true, &[]))
            .await
            .expect("install on a large log");
        let valid = db
            .value::<bool>(
                "SELECT coalesce((SELECT indisvalid FROM pg_index \
                 WHERE indexrelid = to_regclass('pgrelay.events_payload_idx')), false)",
            )
            .await;
        assert!(valid, "no valid replay index after install");
    }
}

/// An existing owner role with rights capture must not run with is refused
/// in one line, and nothing is installed.
#[tokio::test]
async fn an_owner_role_with_wide_rights_is_refused() {
    let db = TestDb::empty("install_wide_owner").await;
    let role = format!("{}_wide", db.name);
    for (setup, expected) in [
        ("NOLOGIN CREATEDB", "can create roles or databases"),
        (
            "NOLOGIN IN ROLE pg_read_all_data",
            "is a member of another role",
        ),
        ("LOGIN", "can log in"),
    ] {
        db.exec(&format!("CREATE ROLE \"{role}\" {setup}")).await;
        let result = install(&InstallConfig {
            owner: role.clone(),
            ..InstallConfig::new(db.config())
        })
        .await;
        db.exec(&format!("DROP ROLE \"{role}\"")).await;
        let err = result.expect_err(setup).to_string();
        assert!(err.contains(expected), "{setup}: {err}");
        assert!(!err.contains('\n'), "{err}");
    }
    let schema = db
        .value::<i64>("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgrelay'")
        .await;
    assert_eq!(schema, 0);
}
