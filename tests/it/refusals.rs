//! Refusals happen before the upgrade, as plain HTTP with the right status and
//! a one-line body that says why (and never echoes the token); a storm of bad
//! handshakes does not hurt the next good client.

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::harness::*;

/// Asserts the body is one non-empty line.
fn assert_one_line(refused: &Refused) {
    let line = refused.body.strip_suffix('\n').unwrap_or(&refused.body);
    assert!(
        !line.trim().is_empty() && !line.contains('\n'),
        "body is not one line: {refused:?}"
    );
}

/// Connects with `Authorization: Bearer token` (if any) and expects a refusal.
async fn refused(relay: &TestRelay, path_and_query: &str, token: Option<&str>) -> Refused {
    match Ws::connect(&relay.ws_url(path_and_query), token).await {
        Ok(_) => panic!("{path_and_query}: the upgrade succeeded, expected a refusal"),
        Err(refused) => {
            assert_one_line(&refused);
            if let Some(token) = token {
                assert!(
                    !refused.body.contains(token),
                    "the body echoes the token: {refused:?}"
                );
            }
            refused
        }
    }
}

fn assert_refused(refused: &Refused, status: u16, mentions: &str) {
    assert_eq!(refused.status, status, "{refused:?}");
    assert!(
        refused.body.to_lowercase().contains(mentions),
        "body should mention {mentions:?}: {refused:?}"
    );
}

#[tokio::test]
async fn unknown_path_is_404() {
    let db = TestDb::demo("refuse_404").await;
    let relay = TestRelay::start(&db).await;
    let r = refused(&relay, "/ws/nope/", Some(&token("1", true))).await;
    assert_refused(&r, 404, "no such endpoint");
}

#[tokio::test]
async fn plain_get_without_upgrade_is_400() {
    let db = TestDb::demo("refuse_plain_get").await;
    let relay = TestRelay::start(&db).await;
    let (status, body) = http_get(relay.relay.addr(), "/ws/notifications/").await;
    let r = Refused { status, body };
    assert_one_line(&r);
    assert_refused(&r, 400, "websocket");
}

#[tokio::test]
async fn missing_token_is_401() {
    let db = TestDb::demo("refuse_no_token").await;
    let relay = TestRelay::start(&db).await;
    let r = refused(&relay, "/ws/notifications/", None).await;
    assert_refused(&r, 401, "token");
}

#[tokio::test]
async fn garbage_token_is_401() {
    let db = TestDb::demo("refuse_garbage").await;
    let relay = TestRelay::start(&db).await;
    let r = refused(&relay, "/ws/notifications/", Some("not-a-jwt")).await;
    assert_refused(&r, 401, "invalid token");
}

#[tokio::test]
async fn wrong_signature_is_401() {
    let db = TestDb::demo("refuse_signature").await;
    let relay = TestRelay::start(&db).await;
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "1", "role": "super_admin", "exp": now() + 300}),
        &jsonwebtoken::EncodingKey::from_secret(b"someone-else's-secret"),
    )
    .expect("sign");
    let r = refused(&relay, "/ws/dashboard/", Some(&forged)).await;
    assert_refused(&r, 401, "invalid token");
}

#[tokio::test]
async fn expired_token_is_401_and_says_expired() {
    let db = TestDb::demo("refuse_expired").await;
    let relay = TestRelay::start(&db).await;
    let expired = sign(&json!({"sub": "2", "exp": now() - 600, "iat": now() - 4200}));
    let r = refused(&relay, "/ws/notifications/", Some(&expired)).await;
    assert_refused(&r, 401, "expired");
}

#[tokio::test]
async fn token_without_exp_is_401() {
    let db = TestDb::demo("refuse_no_exp").await;
    let relay = TestRelay::start(&db).await;
    let forever = sign(&json!({"sub": "2", "iat": now()}));
    let r = refused(&relay, "/ws/notifications/", Some(&forever)).await;
    assert_refused(&r, 401, "exp");
}

#[tokio::test]
async fn simplejwt_refresh_token_is_401() {
    let db = TestDb::demo("refuse_refresh").await;
    let relay = TestRelay::start(&db).await;
    let refresh = sign(&json!({
        "token_type": "refresh",
        "exp": now() + 86_400,
        "iat": now(),
        "jti": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        "user_id": 2,
    }));
    let r = refused(&relay, "/ws/notifications/", Some(&refresh)).await;
    assert_refused(&r, 401, "access");
}

#[tokio::test]
async fn non_admin_on_dashboard_is_403() {
    let db = TestDb::demo("refuse_not_admin").await;
    let relay = TestRelay::start(&db).await;
    let r = refused(&relay, "/ws/dashboard/", Some(&token("2", false))).await;
    assert_refused(&r, 403, "admin");
}

#[tokio::test]
async fn is_superuser_claim_is_not_admin_by_default() {
    let db = TestDb::demo("refuse_is_superuser").await;
    let relay = TestRelay::start(&db).await;
    let django_admin = sign(&json!({"user_id": 1, "is_superuser": true, "exp": now() + 300}));
    let r = refused(&relay, "/ws/dashboard/", Some(&django_admin)).await;
    assert_refused(&r, 403, "admin");
}

#[tokio::test]
async fn is_superuser_claim_is_admin_with_admin_claim_is_superuser_true() {
    let db = TestDb::demo("admin_is_superuser").await;
    let relay = TestRelay::start_with(&db, |config| {
        config.auth.admin_claims = vec!["is_superuser=true".parse().expect("admin claim")];
    })
    .await;
    let django_admin = sign(&json!({"user_id": 1, "is_superuser": true, "exp": now() + 300}));
    let mut dashboard = relay.ws("/ws/dashboard/", &django_admin).await;
    let hello = dashboard.hello().await;
    assert_eq!(hello["stream"], "dashboard");
    assert_eq!(hello["user"], "1");
    let id = db.business(2, "Seen By Superuser").await;
    assert_eq!(dashboard.event().await["data"]["id"], id);

    // The claim's value matters, not its presence.
    let not_admin = sign(&json!({"user_id": 5, "is_superuser": false, "exp": now() + 300}));
    let r = refused(&relay, "/ws/dashboard/", Some(&not_admin)).await;
    assert_refused(&r, 403, "admin");
}

#[tokio::test]
async fn bad_last_id_is_400() {
    let db = TestDb::demo("refuse_last_id").await;
    let relay = TestRelay::start(&db).await;
    let r = refused(
        &relay,
        "/ws/notifications/?last_id=abc",
        Some(&token("2", false)),
    )
    .await;
    assert_refused(&r, 400, "last_id");
}

#[tokio::test]
async fn valid_client_connects_and_receives_after_flood_of_bad_handshakes() {
    let db = TestDb::demo("refuse_flood").await;
    // The flood stands for many clients, each refused for what it sent, so
    // the per-address cap on pending handshakes (pending.rs) is lifted.
    let relay = TestRelay::start_with(&db, |c| c.limits.max_pending_per_ip = 1024).await;
    let addr = relay.relay.addr();
    let expired = sign(&json!({"sub": "2", "exp": now() - 600}));
    let mut flood = JoinSet::new();
    for n in 0..200 {
        let (path, token): (&str, Option<String>) = match n % 5 {
            0 => ("/ws/notifications/", None),
            1 => ("/ws/notifications/", Some("garbage".to_owned())),
            2 => ("/ws/notifications/", Some(expired.clone())),
            3 => ("/ws/dashboard/", Some(token("2", false))),
            _ => ("/nowhere", Some(token("1", true))),
        };
        let url = relay.ws_url(path);
        flood.spawn(async move {
            let refused = Ws::connect(&url, token.as_deref())
                .await
                .err()
                .unwrap_or_else(|| panic!("bad handshake #{n} to {path} was upgraded"));
            assert!(
                [401, 403, 404].contains(&refused.status),
                "#{n}: {refused:?}"
            );
        });
        // And connections that send junk instead of HTTP, then hang up.
        if n % 10 == 0 {
            flood.spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                let _ = stream.write_all(b"\x16\x03\x01junk\r\n\r\n").await;
            });
        }
    }
    while let Some(done) = flood.join_next().await {
        done.expect("bad handshake task");
    }

    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;
    let id = db.business(2, "After The Flood").await;
    assert_eq!(dashboard.event().await["data"]["id"], id);
    assert_eq!(owner.event().await["data"]["id"], id);
    let (status, _) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200);
}
