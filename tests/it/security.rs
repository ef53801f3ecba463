//! Security and limits: who may open a socket (origin, caps, admin query, JWT
//! hardening, key rotation), what a client may send (frame size, binary,
//! rate), what a stranger may NOTIFY, and that tokens never reach a log. Each
//! limit refuses or closes one request or socket and nothing else.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgrelay::auth::KeySource;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;
use pgrelay::wire::Close;

// ---- helpers ---------------------------------------------------------------

/// Connects to `path` with `Authorization: Bearer token` and extra headers.
async fn connect_with(
    relay: &TestRelay,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, Refused> {
    let mut request = relay
        .ws_url(path)
        .into_client_request()
        .expect("valid ws url");
    request.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&bearer(token)).expect("header"),
    );
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header"),
        );
    }
    Ws::connect_request(request).await
}

/// Expects the handshake to be refused; returns how.
async fn refusal(relay: &TestRelay, path: &str, token: &str) -> Refused {
    match Ws::connect(&relay.ws_url(path), Some(token)).await {
        Ok(_) => panic!("{path}: the upgrade succeeded, expected a refusal"),
        Err(refused) => refused,
    }
}

/// Expects the handshake to succeed and the socket to say `hello`.
async fn admitted(relay: &TestRelay, path: &str, token: &str) -> Ws {
    let mut ws = Ws::connect(&relay.ws_url(path), Some(token))
        .await
        .unwrap_or_else(|r| panic!("{path}: expected to be admitted, got {r:?}"));
    ws.hello().await;
    ws
}

fn assert_status(refused: &Refused, status: u16) {
    assert_eq!(refused.status, status, "{refused:?}");
}

/// Proves the socket is open and the server has read everything sent before:
/// frames are handled in order, so the pong to this ping comes after them.
async fn assert_still_open(ws: &mut Ws) {
    ws.stream
        .send(Message::Ping(b"probe".to_vec().into()))
        .await
        .expect("send ping");
    loop {
        let next = tokio::time::timeout(WAIT, ws.stream.next())
            .await
            .expect("timed out waiting for the pong");
        match next {
            Some(Ok(Message::Pong(p))) if p.as_ref() == b"probe" => return,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("socket should still be open, got {other:?}"),
        }
    }
}

/// base64url without padding, as JWT segments are.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// A token whose header and claims are given verbatim, with `signature`.
fn raw_token(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

fn sign_with(header: Header, key: &EncodingKey, claims: &Value) -> String {
    encode(&header, claims, key).expect("sign token")
}

/// Runs a command to success.
async fn run(program: &str, args: &[&str]) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {program} (install it: apt-get install {program}): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh RSA key pair in `dir` via the openssl CLI: (private PEM, public PEM path).
async fn rsa_key_pair(dir: &Path) -> (Vec<u8>, std::path::PathBuf) {
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let private_s = private.to_str().expect("utf-8 path");
    let public_s = public.to_str().expect("utf-8 path");
    run(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            private_s,
        ],
    )
    .await;
    run(
        "openssl",
        &["pkey", "-in", private_s, "-pubout", "-out", public_s],
    )
    .await;
    (std::fs::read(&private).expect("read private key"), public)
}

// ---- origin ----------------------------------------------------------------

#[tokio::test]
async fn allowed_origin_admits_only_the_listed_origin_and_services_without_one() {
    let db = TestDb::demo("sec_origin").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let path = "/ws/notifications/";
    let user = token("2", false);

    for evil in [
        "https://evil.example",
        "http://app.example.com",
        "https://app.example.com.evil.example",
    ] {
        let refused = connect_with(&relay, path, &user, &[("Origin", evil)])
            .await
            .err()
            .unwrap_or_else(|| panic!("origin {evil} was admitted"));
        assert_status(&refused, 403);
        assert!(refused.body.contains("origin"), "{refused:?}");
    }
    let refusals = sample(
        &metrics(relay.relay.addr()).await,
        "pgrelay_refusals_total{reason=\"origin\"}",
    );
    assert_eq!(refusals, Some(3.0));

    let mut browser = connect_with(
        &relay,
        path,
        &user,
        &[("Origin", "https://app.example.com")],
    )
    .await
    .unwrap_or_else(|r| panic!("the allowed origin was refused: {r:?}"));
    browser.hello().await;
    let mut service = admitted(&relay, path, &user).await;

    // Both are live sockets, not just accepted handshakes.
    let id = db.business(2, "Origin Cafe").await;
    assert_eq!(browser.event().await["data"]["id"], id);
    assert_eq!(service.event().await["data"]["id"], id);
}

// ---- socket caps -----------------------------------------------------------

#[tokio::test]
async fn connection_cap_refuses_503_until_a_socket_closes() {
    let db = TestDb::demo("sec_max_conn").await;
    let relay = TestRelay::start_with(&db, |c| c.limits.max_connections = 2).await;
    let path = "/ws/notifications/";
    let mut first = admitted(&relay, path, &token("2", false)).await;
    let mut second = admitted(&relay, path, &token("3", false)).await;

    let refused = refusal(&relay, path, &token("4", false)).await;
    assert_status(&refused, 503);
    let text = metrics(relay.relay.addr()).await;
    assert_eq!(
        sample(&text, "pgrelay_refusals_total{reason=\"max_connections\"}"),
        Some(1.0),
        "{text}"
    );

    first.stream.close(None).await.expect("close");
    while first.next_message().await.is_some() {}

    let url = relay.ws_url(path);
    let late = token("4", false);
    wait_for("a freed slot to admit a new socket", || async {
        match Ws::connect(&url, Some(&late)).await {
            Ok(mut ws) => {
                ws.hello().await;
                true
            }
            Err(refused) => {
                assert_status(&refused, 503);
                false
            }
        }
    })
    .await;

    // The socket that stayed open was never affected.
    let id = db.business(3, "Still Here").await;
    assert_eq!(second.event().await["data"]["id"], id);
}

#[tokio::test]
async fn per_user_cap_refuses_429_for_that_user_only_and_counts_it() {
    let db = TestDb::demo("sec_per_user").await;
    let relay = TestRelay::start_with(&db, |c| c.limits.max_per_user = 1).await;
    let path = "/ws/notifications/";
    let mut first = admitted(&relay, path, &token("2", false)).await;

    let refused = refusal(&relay, path, &token("2", false)).await;
    assert_status(&refused, 429);
    // The same user on the other stream counts too: the cap is per user.
    let admin = token("1", true);
    let _admin_socket = admitted(&relay, "/ws/dashboard/", &admin).await;
    assert_status(&refusal(&relay, "/ws/dashboard/", &admin).await, 429);

    let mut other = admitted(&relay, path, &token("3", false)).await;

    let text = metrics(relay.relay.addr()).await;
    assert_eq!(
        sample(&text, "pgrelay_refusals_total{reason=\"max_per_user\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "pgrelay_refusals_total{reason=\"max_connections\"}"),
        None,
        "{text}"
    );

    let theirs = db.business(2, "Mine").await;
    assert_eq!(first.event().await["data"]["id"], theirs);
    let reservation = db.reservation(theirs, 3).await;
    assert_eq!(other.event().await["data"]["id"], reservation);
}

// ---- handshake timeout -----------------------------------------------------

/// Connects, optionally sends `prefix` and then trickles header lines, and
/// returns how long the server took to hang up. Panics if it never does
/// within 5 s, or if it answers with an upgrade.
async fn time_until_hung_up(addr: SocketAddr, prefix: Option<&str>) -> Duration {
    let started = tokio::time::Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.split();
    let trickle = async {
        if let Some(prefix) = prefix {
            if write.write_all(prefix.as_bytes()).await.is_err() {
                return;
            }
            // A slow-loris client: a header line every 100 ms, forever.
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if write.write_all(b"X-Slow: yes\r\n").await.is_err() {
                    return;
                }
            }
        }
        std::future::pending::<()>().await
    };
    let hung_up = async {
        let mut received = Vec::new();
        let _ = read.read_to_end(&mut received).await;
        received
    };
    tokio::pin!(hung_up);
    let received = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            received = &mut hung_up => received,
            // The server stopped reading: wait for it to hang up.
            _ = trickle => hung_up.await,
        }
    })
    .await
    .unwrap_or_else(|_| panic!("server kept a client with prefix {prefix:?} for over 5 s"));
    let received = String::from_utf8_lossy(&received);
    assert!(!received.contains(" 101 "), "upgraded: {received}");
    started.elapsed()
}

#[tokio::test]
async fn handshake_timeout_disconnects_silent_and_trickling_clients() {
    let db = TestDb::demo("sec_handshake").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.limits.handshake_timeout = Duration::from_millis(500)
    })
    .await;
    // Opened before: an upgraded socket is not subject to the header timeout.
    let mut open = relay.notifications("2").await;

    let addr = relay.relay.addr();
    let (silent, half_line, trickling) = tokio::join!(
        time_until_hung_up(addr, None),
        time_until_hung_up(addr, Some("GET /ws/notifi")),
        time_until_hung_up(
            addr,
            Some("GET /ws/notifications/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        ),
    );
    for (what, took) in [
        ("silent", silent),
        ("half request line", half_line),
        ("trickling headers", trickling),
    ] {
        assert!(
            took >= Duration::from_millis(400),
            "{what}: hung up after {took:?}, before the 500 ms timeout"
        );
    }

    // A normal client still gets in, and the socket opened before the slow
    // clients (now well past 500 ms old) still receives events.
    let mut late = relay.notifications("2").await;
    let id = db.business(2, "After Timeout").await;
    assert_eq!(open.event().await["data"]["id"], id);
    assert_eq!(late.event().await["data"]["id"], id);
}

// ---- client frames ---------------------------------------------------------

#[tokio::test]
async fn oversized_text_frame_closes_only_that_socket_with_1009() {
    let db = TestDb::demo("sec_1009").await;
    let relay = TestRelay::start_with(&db, |c| c.limits.max_client_message = 1024).await;
    let mut bystander = relay.notifications("2").await;
    let mut offender = relay.notifications("2").await;

    // Just under the limit: a valid refresh padded to ~900 bytes is accepted
    // (unknown fields are ignored), so the limit is the configured one.
    let mut padded = json!({"type": "refresh", "token": token("2", false)});
    let pad = 900 - padded.to_string().len();
    padded["pad"] = json!("x".repeat(pad));
    let padded = padded.to_string();
    assert!(padded.len() < 1024);
    offender.send_text(&padded).await;
    assert_still_open(&mut offender).await;

    offender.send_text(&"x".repeat(2048)).await;
    assert_eq!(offender.close_code().await.0, 1009);

    let id = db.business(2, "After 1009").await;
    assert_eq!(bystander.event().await["data"]["id"], id);
}

#[tokio::test]
async fn binary_frame_closes_only_that_socket_with_1003() {
    let db = TestDb::demo("sec_1003").await;
    let relay = TestRelay::start(&db).await;
    let mut bystander = relay.dashboard().await;
    let mut offender = relay.notifications("2").await;

    offender
        .stream
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .expect("send binary");
    assert_eq!(offender.close_code().await.0, 1003);

    let id = db.business(2, "After 1003").await;
    assert_eq!(bystander.event().await["data"]["id"], id);
}

#[tokio::test]
async fn message_flood_closes_only_that_socket_with_1008() {
    let db = TestDb::demo("sec_flood").await;
    let relay = TestRelay::start_with(&db, |c| c.limits.client_messages_per_second = 1).await;
    let refresh = refresh_message(&token("2", false));
    let mut bystander = relay.notifications("2").await;
    let mut offender = relay.notifications("2").await;

    // Within the burst of ten: valid refreshes are fine.
    for _ in 0..5 {
        bystander.send_text(&refresh).await;
    }
    assert_still_open(&mut bystander).await;

    // Thirty valid refreshes at once: the only thing wrong is the rate.
    for _ in 0..30 {
        if offender
            .stream
            .feed(Message::text(refresh.clone()))
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = offender.stream.flush().await;
    let (code, reason) = offender.close_code().await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too many"), "close reason: {reason:?}");

    let id = db.business(2, "After Flood").await;
    assert_eq!(bystander.event().await["data"]["id"], id);
}

// ---- admin query -----------------------------------------------------------

const ADMIN_QUERY: &str = "SELECT role = 'super_admin' FROM users WHERE id = $1";

#[tokio::test]
async fn admin_query_admits_database_super_admins_to_the_dashboard() {
    let db = TestDb::demo("sec_admin_query").await;
    let relay = TestRelay::start_with(&db, |c| c.admin_query = Some(ADMIN_QUERY.into())).await;

    // No role claim: only the database says user 1 is a super admin.
    let mut dashboard = admitted(&relay, "/ws/dashboard/", &token("1", false)).await;
    assert_status(
        &refusal(&relay, "/ws/dashboard/", &token("2", false)).await,
        403,
    );
    // A user with no row at all is not an admin either.
    assert_status(
        &refusal(&relay, "/ws/dashboard/", &token("99", false)).await,
        403,
    );
    // Nor is another spelling of user 1: routing and the caps see "01" as
    // another user, so the admin query must too.
    for sub in ["01", "+1", " 1", "1.0", "1e0"] {
        assert_status(
            &refusal(&relay, "/ws/dashboard/", &token(sub, false)).await,
            403,
        );
    }

    let id = db.business(4, "Seen By Admin").await;
    assert_eq!(dashboard.event().await["data"]["id"], id);
}

#[tokio::test]
async fn admin_query_answer_is_cached_for_admin_cache_only() {
    let db = TestDb::demo("sec_admin_cache").await;
    let cached = TestRelay::start_with(&db, |c| {
        c.admin_query = Some(ADMIN_QUERY.into());
        c.admin_cache = Duration::from_secs(300);
    })
    .await;
    let uncached = TestRelay::start_with(&db, |c| {
        c.admin_query = Some(ADMIN_QUERY.into());
        c.admin_cache = Duration::ZERO;
    })
    .await;
    let user1 = token("1", false);
    admitted(&cached, "/ws/dashboard/", &user1).await;
    admitted(&uncached, "/ws/dashboard/", &user1).await;

    db.exec("UPDATE users SET role = 'owner' WHERE id = 1")
        .await;

    admitted(&cached, "/ws/dashboard/", &user1).await;
    assert_status(&refusal(&uncached, "/ws/dashboard/", &user1).await, 403);
}

#[tokio::test]
async fn failing_admin_query_refuses_503_and_never_admits() {
    let db = TestDb::demo("sec_admin_fail").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.admin_query = Some("SELECT 1/0 = 1 FROM users WHERE id = $1".into())
    })
    .await;
    // Twice: a failure is not cached as an answer either way.
    for _ in 0..2 {
        let refused = refusal(&relay, "/ws/dashboard/", &token("1", false)).await;
        assert_status(&refused, 503);
        assert!(refused.body.contains("retry"), "{refused:?}");
    }
    let text = metrics(relay.relay.addr()).await;
    assert_eq!(
        sample(&text, "pgrelay_refusals_total{reason=\"admin_query\"}"),
        Some(2.0),
        "{text}"
    );
    // The failing lookup affects only the dashboard's fallback: a token with
    // the admin claim and notifications sockets do not need it.
    admitted(&relay, "/ws/dashboard/", &token("1", true)).await;
    admitted(&relay, "/ws/notifications/", &token("2", false)).await;
}

#[tokio::test]
async fn admin_query_admin_can_refresh_a_dashboard_socket() {
    let db = TestDb::demo("sec_admin_refresh").await;
    let relay = TestRelay::start_with(&db, |c| c.admin_query = Some(ADMIN_QUERY.into())).await;
    // Admitted by the database, not by a claim: its tokens never carry one.
    let mut dashboard = admitted(&relay, "/ws/dashboard/", &token("1", false)).await;
    dashboard
        .send_text(&refresh_message(&token("1", false)))
        .await;
    assert_still_open(&mut dashboard).await;
    let id = db.business(2, "After Admin Refresh").await;
    assert_eq!(dashboard.event().await["data"]["id"], id);
}

#[tokio::test]
async fn admin_query_refuses_a_user_id_its_parameter_cannot_hold_403() {
    let db = TestDb::demo("sec_admin_bad_id").await;
    let relay = TestRelay::start_with(&db, |c| c.admin_query = Some(ADMIN_QUERY.into())).await;
    // users.id is bigint: "alice" cannot be a super admin there. That is a
    // plain "no" (403), not "retry later" (503), which clients would retry.
    let refused = refusal(&relay, "/ws/dashboard/", &token("alice", false)).await;
    assert_status(&refused, 403);
}

// ---- JWT hardening ---------------------------------------------------------

#[tokio::test]
async fn alg_none_token_is_refused_401() {
    let db = TestDb::demo("sec_alg_none").await;
    let relay = TestRelay::start(&db).await;
    let claims = json!({"sub": "1", "role": "super_admin", "exp": now() + 3600});
    let signed = sign(&claims);
    let real_signature = signed.rsplit('.').next().expect("signature");
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": alg, "typ": "JWT"});
        for signature in ["", real_signature] {
            let forged = raw_token(&header, &claims, signature);
            let refused = refusal(&relay, "/ws/dashboard/", &forged).await;
            assert_status(&refused, 401);
        }
    }
    // The same claims, properly signed, are admitted: the header is the reason.
    admitted(&relay, "/ws/dashboard/", &signed).await;
}

#[tokio::test]
async fn hs256_token_keyed_with_the_rsa_public_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (private_pem, public_path) = rsa_key_pair(dir.path()).await;
    let public_pem = std::fs::read(&public_path).expect("read public key");
    let db = TestDb::demo("sec_key_confusion").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.auth.key = KeySource::PublicKeyFile(public_path.clone())
    })
    .await;
    let claims = json!({"sub": "1", "role": "super_admin", "exp": now() + 3600});

    let rs256 = sign_with(
        Header::new(Algorithm::RS256),
        &EncodingKey::from_rsa_pem(&private_pem).expect("private key"),
        &claims,
    );
    admitted(&relay, "/ws/dashboard/", &rs256).await;

    // Key confusion: HMAC with the public key's PEM bytes as the secret.
    let confused = sign_with(
        Header::new(Algorithm::HS256),
        &EncodingKey::from_secret(&public_pem),
        &claims,
    );
    assert_status(&refusal(&relay, "/ws/dashboard/", &confused).await, 401);
    // With the PEM's trimmed text too (some libraries strip the newline).
    let trimmed = String::from_utf8(public_pem.clone()).expect("pem is text");
    let confused = sign_with(
        Header::new(Algorithm::HS256),
        &EncodingKey::from_secret(trimmed.trim().as_bytes()),
        &claims,
    );
    assert_status(&refusal(&relay, "/ws/dashboard/", &confused).await, 401);
    // And the harness secret means nothing to an RS256 relay.
    assert_status(
        &refusal(&relay, "/ws/dashboard/", &token("1", true)).await,
        401,
    );
}

#[tokio::test]
async fn token_before_its_nbf_is_refused_401() {
    let db = TestDb::demo("sec_nbf").await;
    let relay = TestRelay::start(&db).await;
    let early = sign(&json!({"sub": "2", "exp": now() + 3600, "nbf": now() + 600}));
    assert_status(&refusal(&relay, "/ws/notifications/", &early).await, 401);
    let due = sign(&json!({"sub": "2", "exp": now() + 3600, "nbf": now() - 5}));
    admitted(&relay, "/ws/notifications/", &due).await;
}

#[tokio::test]
async fn issuer_and_audience_are_enforced_when_configured() {
    let db = TestDb::demo("sec_iss_aud").await;
    let relay = TestRelay::start_with(&db, |c| {
        c.auth.issuer = Some("https://issuer.example".into());
        c.auth.audience = Some("pgrelay".into());
    })
    .await;
    let exp = now() + 3600;
    let iss = "https://issuer.example";
    let path = "/ws/notifications/";
    for (what, claims) in [
        ("no iss", json!({"sub": "2", "exp": exp, "aud": "pgrelay"})),
        (
            "wrong iss",
            json!({"sub": "2", "exp": exp, "iss": "https://evil.example", "aud": "pgrelay"}),
        ),
        ("no aud", json!({"sub": "2", "exp": exp, "iss": iss})),
        (
            "wrong aud",
            json!({"sub": "2", "exp": exp, "iss": iss, "aud": "other"}),
        ),
    ] {
        let refused = refusal(&relay, path, &sign(&claims)).await;
        assert_eq!(refused.status, 401, "{what}: {refused:?}");
    }
    let right = sign(&json!({"sub": "2", "exp": exp, "iss": iss, "aud": "pgrelay"}));
    admitted(&relay, path, &right).await;
    let among = sign(&json!({"sub": "2", "exp": exp, "iss": iss, "aud": ["other", "pgrelay"]}));
    admitted(&relay, path, &among).await;
}

#[tokio::test]
async fn leeway_admits_a_just_expired_token_only_when_configured() {
    let db = TestDb::demo("sec_leeway").await;
    let lenient = TestRelay::start_with(&db, |c| c.auth.leeway = Duration::from_secs(30)).await;
    let strict = TestRelay::start(&db).await;
    let path = "/ws/notifications/";
    let just_expired = sign(&json!({"sub": "2", "exp": now() - 10}));
    admitted(&lenient, path, &just_expired).await;
    let refused = refusal(&strict, path, &just_expired).await;
    assert_status(&refused, 401);
    assert!(refused.body.contains("expired"), "{refused:?}");
    // Leeway is not a blank cheque.
    let long_expired = sign(&json!({"sub": "2", "exp": now() - 120}));
    assert_status(&refusal(&lenient, path, &long_expired).await, 401);
}

// ---- key rotation ----------------------------------------------------------

fn mint(secret: &str, sub: &str) -> String {
    pgrelay::auth::mint(secret, sub, None, Duration::from_secs(3600)).expect("mint")
}

#[tokio::test]
async fn reloaded_secret_file_rotates_keys_and_keeps_open_sockets() {
    const A: &str = "rotation-secret-a";
    const B: &str = "rotation-secret-b";
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwt-secret");
    std::fs::write(&file, format!("{A}\n")).expect("write secret");
    let db = TestDb::demo("sec_rotation").await;
    let relay =
        TestRelay::start_with(&db, |c| c.auth.key = KeySource::SecretFile(file.clone())).await;
    let path = "/ws/notifications/";
    let mut before = admitted(&relay, path, &mint(A, "2")).await;
    assert_status(&refusal(&relay, path, &mint(B, "2")).await, 401);

    std::fs::write(&file, format!("{B}\n")).expect("rewrite secret");
    relay.relay.reload_keys().expect("reload");

    assert_status(&refusal(&relay, path, &mint(A, "2")).await, 401);
    let mut after = admitted(&relay, path, &mint(B, "2")).await;

    let id = db.business(2, "After Rotation").await;
    assert_eq!(before.event().await["data"]["id"], id);
    assert_eq!(after.event().await["data"]["id"], id);

    // Refreshes use the new keys as well: an old-key token is refused.
    before.send_text(&refresh_message(&mint(A, "2"))).await;
    assert_eq!(before.close_code().await.0, Close::TokenExpired.code());
    after.send_text(&refresh_message(&mint(B, "2"))).await;
    assert_still_open(&mut after).await;
}

#[tokio::test]
async fn failed_key_reload_keeps_the_old_keys() {
    const A: &str = "rotation-secret-a";
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwt-secret");
    std::fs::write(&file, A).expect("write secret");
    let db = TestDb::demo("sec_bad_reload").await;
    let relay =
        TestRelay::start_with(&db, |c| c.auth.key = KeySource::SecretFile(file.clone())).await;
    let path = "/ws/notifications/";
    let mut open = admitted(&relay, path, &mint(A, "2")).await;

    std::fs::write(&file, "  \n").expect("empty the secret");
    let err = relay
        .relay
        .reload_keys()
        .expect_err("empty file must not load");
    assert!(err.to_string().contains("empty"), "{err}");
    admitted(&relay, path, &mint(A, "2")).await;
    // Had the blank secret been loaded, a token signed with it would pass.
    assert_status(&refusal(&relay, path, &mint("", "2")).await, 401);

    std::fs::remove_file(&file).expect("remove the secret");
    relay
        .relay
        .reload_keys()
        .expect_err("missing file must not load");
    admitted(&relay, path, &mint(A, "2")).await;

    let id = db.business(2, "After Failed Reload").await;
    assert_eq!(open.event().await["data"]["id"], id);
}

// ---- NOTIFY from strangers -------------------------------------------------

#[tokio::test]
async fn bad_notifications_are_skipped_counted_and_never_delivered() {
    let db = TestDb::demo("sec_bad_notify").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;

    let bad = [
        "NOTIFY business_events, 'not json'",
        // id-only naming an event that is not in the log
        r#"SELECT pg_notify('business_events', '{"id":999999999,"channel":"business_events"}')"#,
        // wrong shape: no channel
        r#"SELECT pg_notify('business_events', '{"id":5}')"#,
        // names another channel than it arrived on
        r#"SELECT pg_notify('business_events', '{"id":7,"channel":"reservation_events"}')"#,
        // data that is not an object
        r#"SELECT pg_notify('business_events', '{"id":8,"channel":"business_events","table":"businesses","op":"INSERT","at":"2026-01-01T00:00:00.000000Z","data":[2]}')"#,
    ];
    for sql in bad {
        db.exec(sql).await;
    }
    let id = db.business(2, "Real One").await;
    // NOTIFYs arrive in commit order: the real event is the next frame.
    let event = dashboard.event().await;
    assert_eq!(event["data"]["id"], id, "{event}");
    assert_eq!(event["data"]["name"], "Real One", "{event}");
    assert_eq!(owner.event().await, event);

    let text = metrics(relay.relay.addr()).await;
    assert_eq!(
        sample(&text, "pgrelay_bad_notifications_total"),
        Some(bad.len() as f64),
        "{text}"
    );
}

/// The log lines about skipped notifications, each with its `suppressed`
/// count.
fn skip_lines(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter(|l| l.contains("skipping notification"))
        .map(|l| {
            let suppressed = l
                .split_once("suppressed=")
                .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no suppressed count in {l:?}"));
            (l.to_owned(), suppressed)
        })
        .collect()
}

/// 2,000 malformed NOTIFYs in one statement: every one is counted, a real
/// event still arrives, and the log gets one line, not 2,000; the next bad
/// one after the one-second window is logged with the count left out, so
/// lines plus suppressed counts account for every notification.
#[tokio::test]
async fn bad_notification_flood_is_counted_but_logged_once_per_second() {
    const BAD: &str = "pgrelay_bad_notifications_total";
    let db = TestDb::demo("sec_bad_flood").await;
    let mut serve = ServeProcess::spawn(&["--database-url", &db.url]);
    let addr = serve.addr;
    serve.wait_ready().await;
    let mut dashboard = serve.socket("/ws/dashboard/", &token("1", true)).await;

    // Distinct payloads: PostgreSQL folds identical ones in a transaction.
    db.exec("SELECT pg_notify('business_events', 'junk ' || g) FROM generate_series(1, 2000) g")
        .await;
    let id = db.business(2, "After The Flood").await;
    assert_eq!(dashboard.event().await["data"]["id"], id);
    serve
        .wait_for("2,000 bad notifications counted", || async move {
            metric(addr, BAD).await == Some(2000.0)
        })
        .await;
    let counted = std::time::Instant::now();
    let lines = skip_lines(&serve.log());
    assert!(
        (1..=3).contains(&lines.len()),
        "{} lines for 2,000 bad notifications: {lines:#?}",
        lines.len()
    );

    wait_for("the one-second window to pass", || async {
        counted.elapsed() > Duration::from_millis(1100)
    })
    .await;
    db.exec("NOTIFY business_events, 'junk again'").await;
    let logged = lines.len();
    wait_for("the next bad notification logged", || {
        let more = skip_lines(&serve.log()).len() > logged;
        async move { more }
    })
    .await;
    let lines = skip_lines(&serve.log());
    assert!(lines.len() <= 3, "{lines:#?}");
    assert!(
        lines.iter().any(|(_, suppressed)| *suppressed > 0),
        "no line carries a suppressed count: {lines:#?}"
    );
    let accounted: u64 = lines.iter().map(|(_, suppressed)| 1 + suppressed).sum();
    assert_eq!(accounted, 2001, "{lines:#?}");
    assert_eq!(metric(addr, BAD).await, Some(2001.0));
}

/// A full envelope anyone with a connection can NOTIFY: nothing proves it
/// came from the capture trigger.
fn forged_envelope(id: i64, name: &str) -> String {
    let envelope = json!({
        "id": id, "channel": "business_events", "table": "businesses", "op": "INSERT",
        "at": "2026-01-01T00:00:00.000000Z",
        "data": {"id": 424242, "owner_id": 2, "name": name},
    });
    format!("SELECT pg_notify('business_events', '{envelope}')")
}

#[tokio::test]
async fn forged_notify_with_a_huge_id_does_not_swallow_later_events() {
    let db = TestDb::demo("sec_forged_huge").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;

    db.exec(&forged_envelope(999_999_999, "forged")).await;
    let id = db.business(2, "Real After Forgery").await;
    // Whatever happens to the forgery, the real row must arrive.
    loop {
        let frame = dashboard.event().await;
        if frame["data"]["name"] == "Real After Forgery" {
            assert_eq!(frame["data"]["id"], id);
            break;
        }
        assert_eq!(frame["data"]["name"], "forged", "unexpected frame {frame}");
    }

    // A socket that connects afterwards is not poisoned either.
    let mut late = relay.ws("/ws/dashboard/", &token("1", true)).await;
    let hello = late.hello().await;
    assert!(
        hello["last_id"].as_i64().is_some_and(|l| l < 999_999_999),
        "hello reports the forged id as the log's newest: {hello}"
    );
    let next = db.business(2, "Second Real").await;
    assert_eq!(late.event().await["data"]["id"], next);
}

#[tokio::test]
async fn forged_notify_for_an_event_not_in_the_log_is_not_delivered() {
    let db = TestDb::demo("sec_forged_plain").await;
    let relay = TestRelay::start(&db).await;
    let mut dashboard = relay.dashboard().await;
    let mut owner = relay.notifications("2").await;

    // A plausible id, a little ahead of the log, that no row has.
    db.exec(&forged_envelope(1000, "forged")).await;
    let id = db.business(2, "Real One").await;
    let event = dashboard.event().await;
    assert_eq!(event["data"]["id"], id, "delivered {event}");
    assert_eq!(owner.event().await["data"]["id"], id);
}

// ---- demo-only endpoints ----------------------------------------------------

async fn businesses(db: &TestDb) -> i64 {
    db.value("SELECT count(*) FROM businesses").await
}

#[tokio::test]
async fn demo_write_endpoints_exist_only_in_the_demo() {
    let db = TestDb::demo("sec_demo_api").await;
    let served = TestRelay::start(&db).await;

    // `serve`: no unauthenticated way to write to the database.
    for action in ["create-business", "make-reservation", "update-business"] {
        let status = http(served.relay.addr(), "POST", &format!("/demo/{action}"), &[])
            .await
            .status;
        assert!(
            (400..500).contains(&status),
            "POST /demo/{action} on serve answered {status}"
        );
    }
    assert_eq!(businesses(&db).await, 0);
    assert_eq!(http_get(served.relay.addr(), "/demo/").await.0, 404);

    // The same requests in `pgrelay demo` (its own PostgreSQL) do write, so
    // the paths above are right; another site's page cannot press them.
    let mut demo = ServeProcess::demo();
    demo.wait_ready().await;
    let (status, body) = http_get(demo.addr, "/demo/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("create-business"), "{body}");
    let cross_site = [("Origin", "http://evil.example")];
    let refused = http(demo.addr, "POST", "/demo/create-business", &cross_site).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    for expected in [1, 2] {
        let made = http(demo.addr, "POST", "/demo/create-business", &[]).await;
        assert_eq!(made.status, 200, "{}", made.body);
        let made: Value = serde_json::from_str(&made.body).expect("json answer");
        assert_eq!(made["id"], expected, "the cross-site POST wrote nothing");
    }
    let reservation = http(demo.addr, "POST", "/demo/make-reservation", &[]).await;
    assert_eq!(reservation.status, 200, "{}", reservation.body);
    let (status, _) = http_get(demo.addr, "/demo/create-business").await;
    assert_eq!(status, 405);
    let (status, log) = demo.stop().await;
    assert!(status.success(), "{status}: {log}");
}

// ---- metrics ---------------------------------------------------------------

#[tokio::test]
async fn metrics_endpoint_exposes_every_documented_series() {
    let db = TestDb::demo("sec_metrics").await;
    let relay = TestRelay::start(&db).await;
    let addr = relay.relay.addr();
    let mut dashboard = relay.dashboard().await;
    let id = db.business(2, "Counted").await;
    assert_eq!(dashboard.event().await["data"]["id"], id);

    let text = metrics(addr).await;
    for name in [
        "pgrelay_connections",
        "pgrelay_events_received_total",
        "pgrelay_deliveries_total",
        "pgrelay_listener_reconnects_total",
        "pgrelay_replay_rows_total",
        "pgrelay_replays_from_memory_total",
        "pgrelay_event_lag_seconds_bucket",
        "pgrelay_notification_queue_usage",
        "pgrelay_slow_closes_total",
    ] {
        assert!(has_samples(&text, name), "no samples of {name} in:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("pgrelay_connections{") && l.ends_with(" 1")),
        "one open dashboard socket:\n{text}"
    );
    assert!(
        sample(&text, "pgrelay_events_received_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // The counter is bumped after the write returns: the client may read
    // the frame a moment before.
    wait_for("deliveries_total >= 1", || async {
        sample(&metrics(addr).await, "pgrelay_deliveries_total").is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(
        sample(&text, "pgrelay_event_lag_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

// ---- logs ------------------------------------------------------------------

/// The real `pgrelay serve` on the test database with `key_args`, logging
/// everything (dependencies included) at `level`, ready.
async fn served(db: &TestDb, level: &str, key_args: &[&str]) -> ServeProcess {
    let args = [&["--database-url", db.url.as_str()], key_args].concat();
    ServeProcess::ready(&args, &[("RUST_LOG", level)]).await
}

#[tokio::test]
async fn sighup_reloads_the_secret_file_and_keeps_open_sockets() {
    const A: &str = "hup-secret-a";
    const B: &str = "hup-secret-b";
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwt-secret");
    std::fs::write(&file, A).expect("write secret");
    let db = TestDb::demo("sec_sighup").await;
    let served = served(
        &db,
        "debug",
        &["--jwt-secret-file", file.to_str().expect("utf-8")],
    )
    .await;
    let url = served.ws_url("/ws/notifications/");
    let mut before = Ws::connect(&url, Some(&mint(A, "2")))
        .await
        .expect("A admitted before the rotation");
    before.hello().await;

    std::fs::write(&file, B).expect("rewrite secret");
    served.signal("-HUP").await;
    let b_token = mint(B, "2");
    wait_for("SIGHUP to load the new secret", || async {
        Ws::connect(&url, Some(&b_token)).await.is_ok()
    })
    .await;
    let refused = Ws::connect(&url, Some(&mint(A, "2")))
        .await
        .err()
        .expect("A refused after the rotation");
    assert_eq!(refused.status, 401, "{refused:?}");

    let id = db.business(2, "After SIGHUP").await;
    assert_eq!(before.event().await["data"]["id"], id);

    let (status, log) = served.stop().await;
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("JWT keys reloaded"), "{log}");
    assert!(
        !log.contains(A) && !log.contains(B),
        "a secret reached the log:\n{log}"
    );
}

/// Tokens refused for each reason and admitted, in the query string, never
/// reach the log (debug, dependencies included): not whole, not their
/// signature, not the secret. So is a refused refresh's token.
#[tokio::test]
async fn tokens_never_reach_the_log() {
    tokens_stay_out_of_the_log("sec_log_tokens", "debug").await;
}

/// The same at trace level. tungstenite logs every frame it receives at
/// trace, a refresh's token with it: pgrelay caps its log at debug.
#[tokio::test]
async fn tokens_never_reach_the_log_even_at_trace_level() {
    tokens_stay_out_of_the_log("sec_log_tokens_trace", "trace").await;
}

/// Runs `pgrelay serve` at `level`, refuses a forged, an expired and a
/// non-admin token, admits a valid one (which gets an event), then
/// refreshes it with a forged token (closed 4001); checks the log
/// names what happened and carries none of them.
async fn tokens_stay_out_of_the_log(test: &str, level: &str) {
    let db = TestDb::demo(test).await;
    let served = served(&db, level, &["--jwt-secret", SECRET]).await;
    let ws = |query: &str| served.ws_url(query);

    // Refused: a well-formed token signed with another key, in the query.
    let forged = encode(
        &Header::default(),
        &json!({"sub": "2", "exp": now() + 3600}),
        &EncodingKey::from_secret(b"not-the-secret"),
    )
    .expect("sign");
    let refused = Ws::connect(&ws(&format!("/ws/notifications/?token={forged}")), None)
        .await
        .err()
        .expect("forged token refused");
    assert_eq!(refused.status, 401, "{refused:?}");
    // Refused: an expired token.
    let expired = sign(&json!({"sub": "2", "exp": now() - 600}));
    let refused = Ws::connect(&ws(&format!("/ws/notifications/?token={expired}")), None)
        .await
        .err()
        .expect("expired token refused");
    assert_eq!(refused.status, 401, "{refused:?}");
    // Refused: a valid token without the right.
    let not_admin = token("3", false);
    let refused = Ws::connect(&ws(&format!("/ws/dashboard/?token={not_admin}")), None)
        .await
        .err()
        .expect("non-admin refused");
    assert_eq!(refused.status, 403, "{refused:?}");
    // Admitted, an event delivered, then a refresh with a bad token (logged
    // as refused).
    let valid = token("2", false);
    let mut socket = Ws::connect(&ws(&format!("/ws/notifications/?token={valid}")), None)
        .await
        .expect("valid token admitted");
    socket.hello().await;
    let id = db.business(2, "Logged").await;
    assert_eq!(socket.event().await["data"]["id"], id);
    let bad_refresh = encode(
        &Header::default(),
        &json!({"sub": "2", "exp": now() + 7200}),
        &EncodingKey::from_secret(b"also-not-the-secret"),
    )
    .expect("sign");
    socket.send_text(&refresh_message(&bad_refresh)).await;
    assert_eq!(socket.close_code().await.0, Close::TokenExpired.code());

    let (status, log) = served.stop().await;
    assert!(status.success(), "exit {status}:\n{log}");
    // The log says what happened (so this test can fail)...
    assert!(
        log.lines().count() > 10,
        "{level} logging was on, yet the log is nearly empty:\n{log}"
    );
    for expected in ["refused", "admitted", "refresh refused"] {
        assert!(log.contains(expected), "no {expected:?} in the log:\n{log}");
    }
    // ...and never with whom: no token, not even its signature.
    for secret in [&forged, &expired, &not_admin, &valid, &bad_refresh] {
        let signature = secret.rsplit('.').next().expect("signature");
        for (n, line) in log.lines().enumerate() {
            assert!(
                !line.contains(secret.as_str()) && !line.contains(signature),
                "log line {n} carries a token: {line}"
            );
        }
    }
    assert!(!log.contains(SECRET), "the secret reached the log:\n{log}");
}
