//! HTTP: the accept loop, hyper connections with upgrades, the stream
//! endpoints `/ws/*` and `/sse/*` and the bell's `/history/*` and `/read/*`
//! (all through one door: [`authenticate`], the user's place, then [`admit`]), the page (also at `/NAME/KEY`),
//! `/healthz`, `/readyz`, `/metrics`, and a program's extra routes. The
//! endpoints and resume parameters are `wire`'s, the state every connection
//! reads is `shared::Shared`; an admitted stream is handed to `session::run`
//! with its peer (`websocket` after the 101, `sse` as the response).
//!
//! Every refusal happens before the stream starts, as a plain HTTP response
//! whose body says why in one line: 404 unknown path, 405 wrong method, 400
//! not a WebSocket request or bad resume parameters, 406 an `/sse/` request
//! that does not accept `text/event-stream` (the bell's routes: 400 a bad
//! `read` body or history parameters, a read beyond the newest event or
//! past the user's 10,000 streams; 408 a `read` body not in within 10 s;
//! 503 read state that cannot be saved now), 401 no/invalid/expired token,
//! 429 the user's socket cap or replay turns, 503 the total cap, every
//! replay turn busy, or an admin or stream query that cannot answer, 403
//! valid token without the right. The caps come before the question (see
//! [`authenticate`]).
//!
//! Before any of that, the accept loop bounds what unauthenticated clients
//! can hold: each accepted connection takes a [`Pending`] place (released
//! when it upgrades or closes), and one over `--max-pending-handshakes` (503)
//! or `--max-pending-per-ip` (429) is answered at once by [`refuse_raw`]
//! without reading its request, then closed. Accepting and answering, rather
//! than leaving the listener unpolled until a place frees, tells a client
//! what happened and keeps the kernel's accept queue moving, so a good client
//! does not wait behind a flood it cannot see. hyper buffers at most
//! `--max-header-bytes` of request head (431 beyond, hyper's own answer,
//! without a body) and gives the head `--handshake-timeout` to arrive, so a
//! pending connection's cost is bounded in bytes and in time.
//!
//! Logs carry the path, never the query string (it may hold `?token=`), and
//! never a token. Each connection has an info-level `conn` span with the
//! client address, and the user once the token is checked; the socket's task
//! runs in the same span, so every warning names whose socket it was. Accept errors are logged and retried after a pause; they
//! never stop the server. Upgraded sockets
//! escape hyper's graceful shutdown, so their tasks are tracked here and close
//! themselves on the shared stop signal (`shutdown`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderValue, CONTENT_TYPE, ORIGIN, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_PROTOCOL,
};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_tungstenite::tungstenite::handshake::derive_accept_key;
use hyper_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use hyper_tungstenite::WebSocketStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::admission::{client_key, origin_allowed, Limits, NoSlot, Pending, ADMIN_QUERY_TIMEOUT};
use crate::auth::{presented_token, Identity, Presented};
use crate::bell;
use crate::coalesce::Coalesce;
use crate::db::DbError;
use crate::metrics::Format;
use crate::replays::{Asker, Busy};
use crate::session;
use crate::shared::Shared;
use crate::sse;
use crate::websocket::WebSocketPeer;
use crate::wire::{self, ClientMessage, Endpoint, Resume, Transport};

/// The dashboard page and the JS client, embedded: no build step, no
/// external URL.
const INDEX_HTML: &str = include_str!("web/index.html");
const CLIENT_JS: &str = include_str!("web/pgrelay-client.js");

/// The socket's buffers and read limits.
fn websocket_config(limits: &Limits) -> WebSocketConfig {
    // tungstenite's defaults (a 128 KiB read buffer allocated up front, a
    // 128 KiB write buffer that never shrinks) would cost 10,000 sockets
    // over a GiB. Clients only send pongs and small `refresh` and `read`
    // frames: a 128-byte read buffer (a larger frame grows it; 1 KiB cost
    // 10,000 idle sockets 9 MiB more). Writes go straight through to
    // `Coalesce`, which queues a batch until the flush, sends it with one
    // vectored write and frees its queue, so an idle socket holds none
    // (tungstenite's write limit has nothing to limit: what bounds a
    // stalled peer is the batch size and the write timeout).
    WebSocketConfig::default()
        .read_buffer_size(128)
        .write_buffer_size(0)
        .max_message_size(Some(limits.max_client_message))
        .max_frame_size(Some(limits.max_client_message))
}

pub use crate::shared::Body;

/// Accepts connections until shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let pending = Pending::new(&shared.limits);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let place = match pending.take(&client_key(addr.ip())) {
            Ok(place) => place,
            Err(cap) => {
                let (status, reason, why) = match cap {
                    NoSlot::Total => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "max_pending_handshakes",
                        "too many connections waiting to authenticate: retry later",
                    ),
                    NoSlot::PerKey => (
                        StatusCode::TOO_MANY_REQUESTS,
                        "max_pending_per_ip",
                        "too many connections waiting to authenticate from this address",
                    ),
                };
                shared.metrics.refused(reason);
                tracing::debug!(client.addr = %addr, status = status.as_u16(), why, "refused");
                // The answer lingers for a bounded few at a time; past that a
                // refused connection is just closed, so a flood of refusals
                // cannot take the file descriptors the caps protect.
                if let Ok(linger) = Arc::clone(&shared.lingering).try_acquire_owned() {
                    shared.tracker.spawn(async move {
                        refuse_raw(stream, status, why).await;
                        drop(linger);
                    });
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // At info, so every warning inside names the client, and (recorded
        // once the token is checked) the user; routine ends stay at debug.
        let span = tracing::info_span!("conn", client.addr = %addr, user = tracing::field::Empty);
        let shutdown = shared.shutdown.clone();
        let limits = shared.limits.clone();
        let for_service = Arc::clone(&shared);
        let metrics = Arc::clone(&shared.metrics);
        shared.tracker.spawn(
            async move {
                // Held until the connection upgrades (hyper's future ends
                // once the 101 is written and the IO handed over) or closes.
                let place = place;
                // Told when the connection turns into an event stream.
                let streaming = Arc::new(Notify::new());
                let became_stream = Arc::clone(&streaming);
                let service = service_fn(move |req| {
                    let shared = Arc::clone(&for_service);
                    let streaming = Arc::clone(&streaming);
                    async move { Ok::<_, Infallible>(handle(req, &shared, &streaming).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.handshake_timeout)
                    .max_header_size(limits.max_header_bytes)
                    // hyper's default lets one connection buffer ~400 KiB of
                    // head; it reads in steps, so allow one step past the cap
                    // for the cap to be what refuses.
                    .max_buf_size(limits.max_header_bytes + 8192)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                tokio::pin!(conn);
                // A connection keeps its pending place until it upgrades, and
                // hyper restarts the header timer on every keep-alive request:
                // a client pinging /healthz would hold its place for ever.
                // Past the time an honest handshake needs (headers, then the
                // admin query), it is closed.
                let pending = tokio::time::sleep(
                    limits.handshake_timeout + ADMIN_QUERY_TIMEOUT + Duration::from_secs(1),
                );
                tokio::select! {
                    _ = pending => {
                        tracing::debug!("not upgraded in time: closing");
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                    }
                    _ = became_stream.notified() => {
                        // An event stream: authenticated, so no longer
                        // pending, and served until it ends.
                        drop(place);
                        tokio::select! {
                            result = conn.as_mut() => {
                                if let Err(e) = result {
                                    tracing::debug!(error = %e, "event stream connection ended");
                                }
                            }
                            _ = shutdown.cancelled() => {
                                conn.as_mut().graceful_shutdown();
                                let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                            }
                        }
                    }
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            if e.is_parse_too_large() {
                                // hyper has answered 431 itself.
                                metrics.refused("header_too_large");
                            }
                            tracing::debug!(error = %e, "http connection ended");
                        }
                    }
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// Refused connections drained at once at most (each holds a descriptor for
/// up to [`REFUSAL_LINGER`]).
pub const MAX_LINGERING: usize = 256;

/// How long a refused connection is drained after its answer, so that the
/// request it may still be sending does not reset the connection (a reset can
/// destroy the answer before the client reads it).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Answers `status` with `why` on one line and closes, without reading the
/// request first: the client of a refused connection gets no buffer and no
/// parser, only a bounded drain.
async fn refuse_raw(mut stream: tokio::net::TcpStream, status: StatusCode, why: &'static str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{why}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        why.len() + 1,
    );
    let answered = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 512];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answered).await;
}

/// A plain-text answer: `body` and a newline.
pub fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn handle(
    mut req: Request<Incoming>,
    shared: &Arc<Shared>,
    streaming: &Notify,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let (transport, endpoint) = match path.as_str() {
        "/healthz" if req.method() == Method::GET => return text(StatusCode::OK, "ok"),
        "/" if req.method() == Method::GET => return asset(INDEX_HTML, "text/html; charset=utf-8"),
        "/pgrelay-client.js" if req.method() == Method::GET => {
            return asset(CLIENT_JS, "text/javascript; charset=utf-8")
        }
        "/readyz" if req.method() == Method::GET => {
            return if shared.status.is_ready() {
                text(StatusCode::OK, "ready")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: LISTEN connection down or catching up",
                )
            };
        }
        "/metrics" if req.method() == Method::GET => {
            let format = Format::accepted(
                req.headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            let rendered = Bytes::from(shared.metrics.render(format));
            let mut response = Response::new(Full::new(rendered).boxed());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            return response;
        }
        "/healthz" | "/readyz" | "/metrics" => {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        bell if bell.starts_with("/history/") || bell.starts_with("/read/") => {
            return bell_route(req, shared, bell).await
        }
        other => match Endpoint::from_path(other, shared.routes.streams()) {
            Some(found) => found,
            // A stream key's own page (`/businesses/42`): the same page,
            // which reads the stream and key from its address.
            None if req.method() == Method::GET && is_stream_page(other, shared) => {
                return asset(INDEX_HTML, "text/html; charset=utf-8")
            }
            None => return extra_or_not_found(&req, shared, other).await,
        },
    };
    if req.method() != Method::GET {
        return refuse(
            shared,
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            "use GET",
            &path,
        );
    }
    match transport {
        Transport::WebSocket if !hyper_tungstenite::is_upgrade_request(&req) => {
            return refuse(
                shared,
                StatusCode::BAD_REQUEST,
                "not_websocket",
                "not a WebSocket request (expected Upgrade: websocket)",
                &path,
            );
        }
        Transport::ServerSentEvents if !accepts_event_stream(&req) => {
            return refuse(
                shared,
                StatusCode::NOT_ACCEPTABLE,
                "not_event_stream",
                "this endpoint sends text/event-stream",
                &path,
            );
        }
        _ => {}
    }
    let query = query_params(req.uri().query());
    let cookie_allowed = transport == Transport::ServerSentEvents;
    let (presented, mut identity) = match authenticate(&req, shared, &query, cookie_allowed, &path)
    {
        Ok(authenticated) => authenticated,
        Err(refused) => return refused,
    };
    // A reconnecting EventSource repeats its first URL, whose `last_id` is
    // older than the `Last-Event-ID` it sends: the header wins.
    let last_event_id = (transport == Transport::ServerSentEvents)
        .then(|| req.headers().get("last-event-id"))
        .flatten()
        .map(|v| v.to_str().map_err(|_| "Last-Event-ID must be ASCII"));
    let resume = match last_event_id {
        Some(header) => header.and_then(Resume::from_last_event_id).map(Some),
        None => Resume::from_query(&query),
    };
    let resume = match resume {
        Ok(resume) => resume,
        Err(why) => return refuse(shared, StatusCode::BAD_REQUEST, "bad_resume", why, &path),
    };
    let unread = wire::wants_unread(&query);
    // The user's place first, then the question (a query on a cache miss):
    // a user at the cap is refused without one.
    let slot = match shared.slots.take(&identity.user) {
        Ok(slot) => slot,
        Err(NoSlot::Total) => {
            return refuse(
                shared,
                StatusCode::SERVICE_UNAVAILABLE,
                "max_connections",
                "too many connections: retry later",
                &path,
            )
        }
        Err(NoSlot::PerKey) => {
            return refuse(
                shared,
                StatusCode::TOO_MANY_REQUESTS,
                "max_per_user",
                "too many sockets for this user",
                &path,
            )
        }
    };
    if let Err(refused) = admit(shared, &mut identity, &endpoint, &path).await {
        return refused;
    }
    tracing::debug!(path, admin = identity.admin, resume = ?resume.as_ref().map(|r| r.last_id), "admitted");
    let shared = Arc::clone(shared);
    // The connection's span (client address and user) goes on with the
    // stream's task.
    let span = tracing::Span::current();
    if transport == Transport::ServerSentEvents {
        // No upgrade: the connection stays hyper's, serving this one
        // response for the stream's life. It is no longer pending.
        streaming.notify_one();
        let (response, peer) = sse::open(shared.status.epoch());
        shared.tracker.clone().spawn(
            async move {
                let _slot = slot;
                let opening = session::Opening {
                    endpoint: &endpoint,
                    resume: resume.as_ref(),
                    unread,
                };
                session::run(peer, &shared, opening, &mut identity).await;
            }
            .instrument(span),
        );
        return response;
    }
    let Some(key) = req
        .headers()
        .get("Sec-WebSocket-Key")
        .filter(|_| {
            req.headers()
                .get("Sec-WebSocket-Version")
                .map(|v| v.as_bytes())
                == Some(b"13")
        })
        .cloned()
    else {
        return refuse(
            &shared,
            StatusCode::BAD_REQUEST,
            "bad_handshake",
            "bad WebSocket handshake: missing Sec-WebSocket-Key or version 13",
            &path,
        );
    };
    // The upgrade by hand (as hyper_tungstenite::upgrade does it) so that the
    // socket's IO can be wrapped in `Coalesce`.
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static("websocket"),
    );
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    if presented.via_subprotocol {
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("bearer"));
    }
    // The upgrade is awaited inside the socket's task, and the socket's
    // config built there, rather than captured: whatever a task captures
    // stays in its state for the socket's whole life, beside the session's
    // own copy (measured with size_of_val: 3,416 bytes a task that way,
    // 2,512 this way). It is 1,896 bytes now (measured the same way), which
    // with tokio's task header fits jemalloc's 2,048-byte class: rare paths
    // (the heartbeat, a write that has to wait, the client's ping or
    // close) keep their futures boxed so that they do not widen every
    // socket's task.
    let tracker = shared.tracker.clone();
    let task = async move {
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
        };
        let io = Coalesce::new(TokioIo::new(upgraded));
        let config = websocket_config(&shared.limits);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let peer = WebSocketPeer::new(ws, shared.limits.client_messages_per_second);
        let opening = session::Opening {
            endpoint: &endpoint,
            resume: resume.as_ref(),
            unread,
        };
        session::run(peer, &shared, opening, &mut identity).await
    }
    .instrument(span);
    tracker.spawn(task);
    response
}

/// `/NAME/KEY` (or with a trailing slash) for a configured stream NAME.
fn is_stream_page(path: &str, shared: &Shared) -> bool {
    let ws_path = format!("/ws{path}");
    matches!(
        Endpoint::from_path(&ws_path, shared.routes.streams()),
        Some((_, Endpoint::Stream { .. }))
    )
}

/// The first half of the door every stream and the bell's routes share: an
/// allowed origin and a token (header, `?token=`, or the `--token-cookie`
/// cookie where `cookie_allowed`), valid. No query: the caller takes the
/// user's place (a socket slot, a replay turn) next, and only then
/// [`admit`] may ask the database, so a user at a cap cannot make
/// PostgreSQL run a query per refused request. `Err` is the refusal to send.
// The error is the response, sent at once by the caller: boxing it would
// only add an allocation to every refusal.
#[allow(clippy::result_large_err)]
fn authenticate(
    req: &Request<Incoming>,
    shared: &Shared,
    query: &HashMap<String, String>,
    cookie_allowed: bool,
    path: &str,
) -> Result<(Presented, Identity), Response<Body>> {
    let origin = req
        .headers()
        .get(ORIGIN)
        .map(|o| o.to_str().unwrap_or("(not ASCII)"));
    if !origin_allowed(&shared.allowed_origins, origin) {
        let why = "origin not allowed";
        return Err(refuse(shared, StatusCode::FORBIDDEN, "origin", why, path));
    }
    let presented = presented_token(req.headers(), query).or_else(|| {
        let cookie = shared.token_cookie.as_deref()?;
        cookie_allowed
            .then(|| cookie_token(req.headers(), cookie))
            .flatten()
    });
    let Some(presented) = presented else {
        return Err(refuse(
            shared,
            StatusCode::UNAUTHORIZED,
            "no_token",
            "missing token",
            path,
        ));
    };
    let identity = match shared.verifier().verify(&presented.token) {
        Ok(identity) => {
            // On the connection's span: the socket's task runs in it too.
            tracing::Span::current().record("user", tracing::field::display(&identity.user));
            identity
        }
        Err(e) => {
            let reason = match e {
                crate::auth::AuthError::Expired => "expired_token",
                _ => "invalid_token",
            };
            return Err(refuse(
                shared,
                StatusCode::UNAUTHORIZED,
                reason,
                &e.to_string(),
                path,
            ));
        }
    };
    Ok((presented, identity))
}

/// The second half of the door: may this user open `endpoint` (the admin or
/// stream query, cached, for the dashboard and streams). `Err` is the
/// refusal to send.
async fn admit(
    shared: &Shared,
    identity: &mut Identity,
    endpoint: &Endpoint,
    path: &str,
) -> Result<(), Response<Body>> {
    let dashboard = *endpoint == Endpoint::Dashboard;
    let (status, reason, why) = match shared.may_open(identity, endpoint).await {
        Ok(true) => {
            identity.admin |= dashboard;
            return Ok(());
        }
        Ok(false) if dashboard => (
            StatusCode::FORBIDDEN,
            "not_admin",
            "the dashboard is for super admins only",
        ),
        Ok(false) => (
            StatusCode::FORBIDDEN,
            "not_allowed",
            "not allowed on this stream",
        ),
        Err(e) if dashboard => {
            tracing::warn!(error = %e, "admin query failed; refusing");
            let why = "cannot check admin rights right now: retry later";
            (StatusCode::SERVICE_UNAVAILABLE, "admin_query", why)
        }
        Err(e) => {
            tracing::warn!(error = %e, "stream query failed; refusing");
            let why = "cannot check access to this stream right now: retry later";
            (StatusCode::SERVICE_UNAVAILABLE, "stream_query", why)
        }
    };
    Err(refuse(shared, status, reason, why, path))
}

/// The largest `POST /read/...` body.
const MAX_READ_BODY: usize = 4096;
/// The longest a `POST /read` body may take to arrive.
const READ_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /history/STREAM` (the bell's past events, newest first) and
/// `POST /read/STREAM` (read state, for clients without a socket): the
/// stream's own door (origin, token, who may open it), then `bell`.
async fn bell_route(req: Request<Incoming>, shared: &Shared, path: &str) -> Response<Body> {
    let (history, rest) = match path.strip_prefix("/history/") {
        Some(rest) => (true, rest),
        None => (false, path.strip_prefix("/read/").unwrap_or_default()),
    };
    let Some(endpoint) = Endpoint::from_name(rest, shared.routes.streams()) else {
        return not_found(shared, path);
    };
    let method = if history { Method::GET } else { Method::POST };
    if req.method() != method {
        let why = if history { "use GET" } else { "use POST" };
        return refuse(shared, StatusCode::METHOD_NOT_ALLOWED, "method", why, path);
    }
    let query = query_params(req.uri().query());
    // A cookie may read history, never write read state (another site's
    // form would carry it).
    let (_, mut identity) = match authenticate(&req, shared, &query, history, path) {
        Ok(authenticated) => authenticated,
        Err(refused) => return refused,
    };
    // A read's body is read and parsed before the turn is taken, bounded in
    // size and time: a client that sends it slowly holds its own
    // connection, and one that sends junk is answered, never with one of
    // the user's turns. `None`: a history page.
    let mark = if history {
        None
    } else {
        let body = http_body_util::Limited::new(req.into_body(), MAX_READ_BODY);
        let body = match tokio::time::timeout(READ_BODY_TIMEOUT, body.collect()).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(_)) => {
                let why = "body too large or cut short";
                return refuse(shared, StatusCode::BAD_REQUEST, "bad_read", why, path);
            }
            Err(_) => {
                let why = "body not received in time";
                return refuse(shared, StatusCode::REQUEST_TIMEOUT, "bad_read", why, path);
            }
        };
        let mark = serde_json::from_slice::<ClientMessage>(&body)
            .ok()
            .and_then(bell::Mark::from_message);
        let Some(mark) = mark else {
            let why = r#"expected {"type":"read","up_to":N}, {"type":"read","ids":[...]} or {"type":"clear"}"#;
            return refuse(shared, StatusCode::BAD_REQUEST, "bad_read", why, path);
        };
        Some(mark)
    };
    // Both read the log or write the user's state through the pool: they
    // take a replay's turn, under the same caps (two at once a user, the
    // pool's share in all), so a client looping on them cannot starve the
    // pool.
    let asker = if history {
        Asker::History
    } else {
        Asker::ReadRequest
    };
    let _turn = match shared.replays.turn(&identity.user, asker).await {
        Ok(turn) => turn,
        Err(busy) => {
            let (status, why) = match busy {
                Busy::User => (
                    StatusCode::TOO_MANY_REQUESTS,
                    wire::reason::USER_REPLAYS_BUSY,
                ),
                Busy::Total => (StatusCode::SERVICE_UNAVAILABLE, wire::reason::REPLAYS_BUSY),
            };
            return refuse(shared, status, "busy", why, path);
        }
    };
    // Asked only with the turn held (see `authenticate`).
    if let Err(refused) = admit(shared, &mut identity, &endpoint, path).await {
        return refused;
    }
    let Some(mark) = mark else {
        return history_answer(shared, &endpoint, &identity, &query, path).await;
    };
    let bad_read = |why| refuse(shared, StatusCode::BAD_REQUEST, "bad_read", why, path);
    match bell::mark(shared, &endpoint, &identity, mark).await {
        Ok(state) => json(StatusCode::OK, &wire::read_state_frame(&endpoint, &state)),
        Err(DbError::ReadBeyondHead) => bad_read(wire::reason::READ_BEYOND_HEAD),
        Err(DbError::TooManyReadStates) => bad_read(wire::reason::TOO_MANY_READ_STATES),
        Err(e) => {
            tracing::warn!(error = %e, "marking read failed");
            let why = "cannot save read state right now: retry later";
            refuse(
                shared,
                StatusCode::SERVICE_UNAVAILABLE,
                "read_state",
                why,
                path,
            )
        }
    }
}

/// `GET /history/...?before=ID&limit=N`: `{"events":[...],"next_before":ID|null,"read":{...}}`.
async fn history_answer(
    shared: &Shared,
    endpoint: &Endpoint,
    identity: &Identity,
    query: &HashMap<String, String>,
    path: &str,
) -> Response<Body> {
    let number = |name: &str| {
        query
            .get(name)
            .map(|v| v.parse::<i64>().ok().filter(|n| *n > 0))
    };
    let (before, limit) = match (number("before"), number("limit")) {
        (Some(None), _) | (_, Some(None)) => {
            let why = "before and limit must be positive integers";
            return refuse(shared, StatusCode::BAD_REQUEST, "bad_history", why, path);
        }
        (before, limit) => (
            before.flatten(),
            limit.flatten().unwrap_or(bell::HISTORY_LIMIT_DEFAULT),
        ),
    };
    match bell::history(shared, endpoint, &identity.user, before, limit).await {
        Ok(page) => json(
            StatusCode::OK,
            &wire::history(&page.events, page.next_before, &page.read),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "history failed");
            let why = "history unavailable right now: retry later";
            refuse(
                shared,
                StatusCode::SERVICE_UNAVAILABLE,
                "history",
                why,
                path,
            )
        }
    }
}

/// A JSON answer.
fn json(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A path none of the relay's own: a program's extra route, or 404.
async fn extra_or_not_found(
    req: &Request<Incoming>,
    shared: &Shared,
    path: &str,
) -> Response<Body> {
    match shared.extra_routes.as_ref() {
        // A cross-site form post carries another Origin: only the page's own
        // origin may reach a program's POST routes.
        Some(_) if req.method() == Method::POST && !same_origin(req) => {
            text(StatusCode::FORBIDDEN, "cross-origin request")
        }
        Some(extra) => match extra.answer(req.method(), path) {
            Some(answer) => answer.await,
            None => not_found(shared, path),
        },
        None => not_found(shared, path),
    }
}

/// No `Accept`, or one that takes `text/event-stream` (an `EventSource`
/// sends exactly that).
fn accepts_event_stream(req: &Request<Incoming>) -> bool {
    let Some(accept) = req.headers().get(hyper::header::ACCEPT) else {
        return true;
    };
    let accept = accept.to_str().unwrap_or_default();
    accept.split(',').any(|media| {
        let media = media.split(';').next().unwrap_or_default().trim();
        media.eq_ignore_ascii_case("text/event-stream") || matches!(media, "*/*" | "text/*")
    })
}

/// The token in cookie `name` (`--token-cookie`), for an `EventSource`,
/// which cannot set headers.
fn cookie_token(headers: &hyper::HeaderMap, name: &str) -> Option<Presented> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, v)| *n == name && !v.is_empty())
        .map(|(_, token)| Presented {
            token: token.to_owned(),
            via_subprotocol: false,
        })
}

/// No `Origin`, or one naming this server's own `Host`.
fn same_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(ORIGIN) else {
        return true;
    };
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok());
    match (origin.to_str().ok(), host) {
        (Some(origin), Some(host)) => {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                == Some(host)
        }
        _ => false,
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn not_found(shared: &Shared, path: &str) -> Response<Body> {
    refuse(
        shared,
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint",
        path,
    )
}

fn refuse(
    shared: &Shared,
    status: StatusCode,
    reason: &'static str,
    why: &str,
    path: &str,
) -> Response<Body> {
    shared.metrics.refused(reason);
    tracing::debug!(path, status = status.as_u16(), why, "refused");
    text(status, why)
}

pub fn query_params(query: Option<&str>) -> HashMap<String, String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}
