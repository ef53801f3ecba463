//! `pgrelay demo`: a throwaway PostgreSQL from the local binaries, the demo
//! schema, a few users, the server, and ready-to-paste commands with tokens.
//! Everything is stopped and removed when the given signal fires.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use rand::Rng;

use pgrelay::auth::mint;
use pgrelay::config::ServeConfig;
use pgrelay::db::db_message;
use pgrelay::install::InstallConfig;
use pgrelay::install::{install, InstallError};
use pgrelay::pgconn::Target;
use pgrelay::server::{text, Body};
use pgrelay::{ExtraRoutes, Relay, StartError, StartOptions};
use pgrelay_cluster::{Cluster, ClusterError};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--listen {0:?} is not an address like 127.0.0.1:8080")]
    Listen(String),
    #[error("throwaway PostgreSQL: {0}")]
    Cluster(#[from] ClusterError),
    #[error("{0}")]
    Install(#[from] InstallError),
    #[error("seeding demo data: {0}")]
    Url(#[source] pgrelay::pgconn::TargetError),
    #[error("seeding demo data: {}", db_message(.0))]
    Seed(#[source] tokio_postgres::Error),
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("{0}")]
    Token(#[from] pgrelay::auth::AuthError),
}

/// The demo's people: an admin, a business owner, a customer.
const SEED: &str = "\
INSERT INTO users (id, email, role) VALUES
    (1, 'admin@example.com', 'super_admin'),
    (2, 'owner@example.com', 'owner'),
    (3, 'customer@example.com', 'customer')
ON CONFLICT (id) DO NOTHING;
SELECT setval(pg_get_serial_sequence('users', 'id'), 3);";

pub async fn run(listen: &str, signal: impl Future<Output = ()>) -> Result<(), DemoError> {
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| DemoError::Listen(listen.to_owned()))?;
    eprintln!("starting a throwaway PostgreSQL...");
    let cluster = Cluster::start().await?;
    let url = cluster.url("postgres");
    let database: Target = url.parse().map_err(DemoError::Url)?;
    install(&InstallConfig {
        demo: true,
        ..InstallConfig::new(database.clone())
    })
    .await?;
    seed(&database).await?;

    let secret: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let buttons = Buttons::connect(&database).await?;
    let config = ServeConfig::new(database, listen, &secret);
    let relay = Relay::start_with(
        config,
        StartOptions {
            extra_routes: Some(Arc::new(buttons)),
            ..StartOptions::default()
        },
    )
    .await?;
    let day = Duration::from_secs(24 * 3600);
    let admin = mint(&secret, "1", Some("super_admin"), day)?;
    let owner = mint(&secret, "2", None, day)?;
    let customer = mint(&secret, "3", None, day)?;
    let ws = format!("ws://{}", relay.addr());
    println!(
        "\npgrelay demo is running on http://{addr} (PostgreSQL on port {port}).\n\
         \n\
         Open the page, signed in as (one tab each):\n\
         \x20 admin (dashboard):      http://{addr}/#token={admin}\n\
         \x20 owner (user 2):         http://{addr}/#token={owner}\n\
         \x20 customer (user 3):      http://{addr}/#token={customer}\n\
         \n\
         Watch the sockets (one terminal each):\n\
         \x20 admin dashboard:        websocat -H 'Authorization: Bearer {admin}' {ws}/ws/dashboard/\n\
         \x20 owner (user 2):         websocat -H 'Authorization: Bearer {owner}' {ws}/ws/notifications/\n\
         \x20 customer (user 3):      websocat -H 'Authorization: Bearer {customer}' {ws}/ws/notifications/\n\
         \n\
         Then change rows:\n\
         \x20 psql '{url}' -c \"INSERT INTO businesses (owner_id, name) VALUES (2, 'Blue Door Cafe')\"\n\
         \x20 psql '{url}' -c \"INSERT INTO reservations (business_id, customer_id, starts_at, party_size) \
         VALUES ((SELECT max(id) FROM businesses), 3, now() + interval '1 day', 2)\"\n\
         \x20 psql '{url}' -c \"UPDATE businesses SET name = name || ' (renamed)'\"\n\
         \n\
         JWT secret: {secret}   (pgrelay token --jwt-secret {secret} --sub 2)\n\
         Ctrl-C stops the server and removes the database.",
        addr = relay.addr(),
        port = cluster.port(),
    );
    signal.await;
    eprintln!("stopping...");
    relay.shutdown().await;
    cluster.stop().await?;
    Ok(())
}

/// The page's buttons: `POST /demo/create-business`, `/demo/make-reservation`
/// and `/demo/update-business`, each one real transaction on the demo's
/// tables, so its event reaches the page through the same capture, NOTIFY
/// and socket as any other write. `GET /demo/` lists them; the page shows
/// its buttons only when that answers, so under `serve` it shows none.
struct Buttons {
    client: Arc<tokio_postgres::Client>,
}

/// How long one button's transaction may take.
const BUTTON_TIMEOUT: Duration = Duration::from_secs(5);

impl Buttons {
    async fn connect(database: &Target) -> Result<Buttons, DemoError> {
        let (client, connection) = database.connect().await.map_err(DemoError::Seed)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %db_message(&e), "the demo buttons' connection ended");
            }
        });
        Ok(Buttons {
            client: Arc::new(client),
        })
    }

    /// The statement behind a button; each returns the row's id.
    fn statement(path: &str) -> Option<&'static str> {
        Some(match path {
            // A new business owned by user 2.
            "/demo/create-business" => {
                "INSERT INTO businesses (owner_id, name) \
                 SELECT 2, 'Business #' || (count(*) + 1) FROM businesses RETURNING id"
            }
            // User 3 books the newest business.
            "/demo/make-reservation" => {
                "INSERT INTO reservations (business_id, customer_id, starts_at, party_size) \
                 SELECT id, 3, now() + interval '1 day', 2 FROM businesses \
                 ORDER BY id DESC LIMIT 1 RETURNING id"
            }
            // The newest business is renamed.
            "/demo/update-business" => {
                "UPDATE businesses SET name = name || ' *', updated_at = now() \
                 WHERE id = (SELECT max(id) FROM businesses) RETURNING id"
            }
            _ => return None,
        })
    }
}

fn json(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = text(status, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl ExtraRoutes for Buttons {
    fn answer(&self, method: &Method, path: &str) -> Option<BoxFuture<'static, Response<Body>>> {
        if path == "/demo/" && method == Method::GET {
            let actions = r#"{"actions":["create-business","make-reservation","update-business"]}"#;
            return Some(Box::pin(std::future::ready(json(StatusCode::OK, actions))));
        }
        let sql = Self::statement(path)?;
        if method != Method::POST {
            return Some(Box::pin(std::future::ready(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST",
            ))));
        }
        let client = Arc::clone(&self.client);
        let path = path.to_owned();
        Some(Box::pin(async move {
            let row = tokio::time::timeout(BUTTON_TIMEOUT, client.query_opt(sql, &[])).await;
            let failed = match row {
                Ok(Ok(Some(row))) => match row.try_get::<_, i64>(0) {
                    Ok(id) => return json(StatusCode::OK, &format!("{{\"id\":{id}}}")),
                    Err(e) => db_message(&e),
                },
                Ok(Ok(None)) => "create a business first".to_owned(),
                Ok(Err(e)) => db_message(&e),
                Err(_) => format!("timed out after {BUTTON_TIMEOUT:?}"),
            };
            tracing::warn!(error = %failed, path, "demo action failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("demo action failed: {failed}"),
            )
        }))
    }
}

async fn seed(database: &Target) -> Result<(), DemoError> {
    let (client, connection) = database.connect().await.map_err(DemoError::Seed)?;
    let driver = tokio::spawn(connection);
    let result = client.batch_execute(SEED).await.map_err(DemoError::Seed);
    drop(client);
    let _ = driver.await;
    result
}
