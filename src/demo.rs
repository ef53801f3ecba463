//! `pgrelay demo`: a throwaway PostgreSQL from the local binaries, the demo
//! schema, a few users, the server, and ready-to-paste commands with tokens.
//! Everything is stopped and removed when the given signal fires.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;

use crate::auth::mint;
use crate::cluster::{Cluster, ClusterError};
use crate::config::{InstallConfig, ServeConfig};
use crate::db::db_message;
use crate::install::{install, InstallError};
use crate::pgconn::Target;
use crate::{Relay, StartError};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--listen {0:?} is not an address like 127.0.0.1:8080")]
    Listen(String),
    #[error("throwaway PostgreSQL: {0}")]
    Cluster(#[from] ClusterError),
    #[error("{0}")]
    Install(#[from] InstallError),
    #[error("seeding demo data: {0}")]
    Url(#[source] crate::pgconn::TargetError),
    #[error("seeding demo data: {}", db_message(.0))]
    Seed(#[source] tokio_postgres::Error),
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("{0}")]
    Token(#[from] crate::auth::AuthError),
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
    let mut config = ServeConfig::new(database, listen, &secret);
    config.demo_api = true;
    let relay = Relay::start(config).await?;
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

async fn seed(database: &Target) -> Result<(), DemoError> {
    let (client, connection) = database.connect().await.map_err(DemoError::Seed)?;
    let driver = tokio::spawn(connection);
    let result = client.batch_execute(SEED).await.map_err(DemoError::Seed);
    drop(client);
    let _ = driver.await;
    result
}
