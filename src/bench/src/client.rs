//! The client the scenarios run by the thousand: the WebSocket handshake by
//! hand (the token in `Authorization`, the `hello` frame), the read loop,
//! and one client's whole life (first connect, reading, resuming losslessly
//! from its last id after a close) with what it received kept as id ranges.
//! With `--transport sse` the same client reads the endpoint's event stream
//! instead ([`crate::sse`]): the same frames, resumed with `Last-Event-ID`.
//!
//! A client costs little: the WebSocket is read by hand ([`crate::rawws`]:
//! one read buffer, frames handed over in place), frames are read by
//! [`crate::frame`] without deserialising them, and the deliveries of one
//! read are counted together ([`Receipt`]).

use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgrelay::wire::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{BenchError, Result};
use crate::expected::Audience;
use crate::frame::{self, find, Frame};
use crate::rawws::{self, Ws};
use crate::server::Server;
use crate::sse::{self, SseStream};
use crate::stats::{lock, Receipt, Window};

/// What every client shares.
pub(crate) struct Ctx {
    addr: SocketAddr,
    pub(crate) host: String,
    transport: Transport,
    connect_gate: Semaphore,
    pub(crate) stop: CancellationToken,
    pub(crate) connected: AtomicUsize,
    pub(crate) failed: AtomicUsize,
    first_errors: Mutex<Vec<String>>,
    /// (audience, hello.last_id) of every connected client, for the drain
    /// target.
    pub(crate) hellos: Mutex<Vec<(Audience, i64)>>,
    pub(crate) window: Window,
}

impl Ctx {
    pub(crate) fn new(server: &Server, connect_concurrency: usize, sockets: usize) -> Ctx {
        Ctx {
            addr: server.addr,
            host: server.host.clone(),
            transport: Transport::WebSocket,
            connect_gate: Semaphore::new(connect_concurrency),
            stop: CancellationToken::new(),
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            first_errors: Mutex::new(Vec::new()),
            hellos: Mutex::new(Vec::with_capacity(sockets)),
            window: Window::new(),
        }
    }

    /// The clients read over `transport` (WebSocket unless said).
    pub(crate) fn over(self, transport: Transport) -> Ctx {
        Ctx { transport, ..self }
    }

    /// The lowest `hello.last_id` of the connected clients (`none` if none).
    pub(crate) fn min_hello(&self, none: i64) -> i64 {
        lock(&self.hellos).iter().map(|h| h.1).min().unwrap_or(none)
    }
}

pub(crate) struct ClientSpec {
    pub(crate) audience: Audience,
    token: String,
}

impl ClientSpec {
    /// A notification client of `user`.
    pub(crate) fn user(secret: &str, user: &str) -> Result<ClientSpec> {
        let token = pgrelay::auth::mint(secret, user, None, TOKEN_TTL)?;
        Ok(ClientSpec {
            audience: Audience::User(user.to_owned()),
            token,
        })
    }

    /// Super admin number `i` (user 1,000,001 + i) on `audience`.
    pub(crate) fn super_admin(secret: &str, i: usize, audience: Audience) -> Result<ClientSpec> {
        let user = (1_000_001 + i).to_string();
        let token = pgrelay::auth::mint(secret, &user, Some("super_admin"), TOKEN_TTL)?;
        Ok(ClientSpec { audience, token })
    }

    /// The endpoint's path over `transport`.
    fn path(&self, transport: Transport) -> String {
        let prefix = match transport {
            Transport::WebSocket => "/ws",
            Transport::ServerSentEvents => "/sse",
        };
        match &self.audience {
            Audience::Dashboard => format!("{prefix}/dashboard/"),
            Audience::User(_) => format!("{prefix}/notifications/"),
            Audience::Business(key) => format!("{prefix}/businesses/{key}/"),
        }
    }
}

const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Dashboard clients (super admins 1,000,001, 1,000,002, ...), then
/// notification clients (users 1, 2, ...), each with its own token.
pub(crate) fn client_specs(
    secret: &str,
    dashboards: usize,
    notifications: usize,
) -> Result<Vec<ClientSpec>> {
    let mut specs = Vec::with_capacity(dashboards + notifications);
    for i in 0..dashboards {
        specs.push(ClientSpec::super_admin(secret, i, Audience::Dashboard)?);
    }
    for i in 0..notifications {
        specs.push(ClientSpec::user(secret, &(1 + i).to_string())?);
    }
    Ok(specs)
}

/// `sockets` business-stream clients, super admins each with its own
/// token; client i opens `keys[i % keys.len()]`.
pub(crate) fn business_specs(
    secret: &str,
    sockets: usize,
    keys: &[i64],
) -> Result<Vec<ClientSpec>> {
    (0..sockets)
        .map(|i| {
            let key = keys[i % keys.len().max(1)].to_string();
            ClientSpec::super_admin(secret, i, Audience::Business(key))
        })
        .collect()
}

/// One client's account of the run.
pub(crate) struct ClientReport {
    pub(crate) audience: Audience,
    pub(crate) connected: bool,
    pub(crate) error: Option<String>,
    /// `hello.last_id` of the first connection: everything routed to this
    /// client above it must arrive.
    pub(crate) hello_last_id: i64,
    /// Ids received, strictly increasing, as inclusive ranges.
    pub(crate) ranges: Vec<(i64, i64)>,
    pub(crate) received: u64,
    /// Frames whose id was not above the previous one.
    pub(crate) duplicates: u64,
    pub(crate) resets: u64,
    pub(crate) reconnects: u64,
    /// Close codes the server sent before the end of the run.
    pub(crate) closes: Vec<u16>,
}

impl ClientReport {
    fn new(audience: Audience) -> ClientReport {
        ClientReport {
            audience,
            connected: false,
            error: None,
            hello_last_id: 0,
            ranges: Vec::new(),
            received: 0,
            duplicates: 0,
            resets: 0,
            reconnects: 0,
            closes: Vec::new(),
        }
    }

    /// A text frame, counted in the `receipt` of the read it came in.
    fn on_text(&mut self, frame: &[u8], receipt: &mut Receipt, ctx: &Ctx) {
        let (id, rest) = match Frame::parse(frame) {
            Frame::Event { id, rest } => (id, rest),
            Frame::Reset => {
                self.resets += 1;
                return;
            }
            Frame::Other => return,
        };
        if id <= self.last_id() {
            self.duplicates += 1;
            return;
        }
        match self.ranges.last_mut() {
            Some(last) if last.1 + 1 == id => last.1 = id,
            _ => self.ranges.push((id, id)),
        }
        self.received += 1;
        receipt.count(frame::event_at_us(id, rest), &ctx.window);
    }

    pub(crate) fn last_id(&self) -> i64 {
        self.ranges.last().map_or(self.hello_last_id, |r| r.1)
    }
}

/// How a connection's reading ended.
pub(crate) enum Outcome {
    Stop,
    /// The frame handler had all it wanted.
    Done,
    Closed(Option<u16>),
    Failed(String),
}

impl Outcome {
    /// The close code this ending stands for (1005: a close frame without
    /// one, 1006: no close frame at all).
    pub(crate) fn close_code(&self) -> u16 {
        match self {
            Outcome::Closed(code) => code.unwrap_or(1005),
            _ => 1006,
        }
    }
}

/// What a client does besides reading and resuming: the load run's clients
/// nothing ([`Plain`]); the resume storm's keep count of the restart.
pub(crate) trait Watch: Send {
    /// After every text frame.
    fn on_frame(&mut self, _report: &ClientReport) {}

    /// The server closed the connection (its code is in `report.closes`):
    /// waits before reconnecting. Returns the attempts to count as made
    /// already, or `None` to end the client.
    fn closed(&mut self, report: &ClientReport) -> impl Future<Output = Option<u32>> + Send;

    /// Before reconnection attempt `attempt` (0 for the first after
    /// [`Self::closed`] said 0).
    fn attempting(&mut self, _attempt: u32) {}

    /// Reconnection attempt `attempt` (1-based), started at `began`,
    /// failed: how long to wait before the next, or `None` to give up.
    fn retry_after(&mut self, attempt: u32, began: Instant) -> Option<Duration>;

    /// A reconnection succeeded.
    fn resumed(&mut self, _report: &ClientReport) {}

    /// The run ended while the client was reading.
    fn stopped(&mut self) {}
}

/// The load run's client: reconnects at once, 20 attempts at most, 100 ms
/// more between each (up to 1 s).
pub(crate) struct Plain;

impl Watch for Plain {
    async fn closed(&mut self, _report: &ClientReport) -> Option<u32> {
        Some(0)
    }

    fn retry_after(&mut self, attempt: u32, _began: Instant) -> Option<Duration> {
        (attempt < 20).then(|| Duration::from_millis(100 * u64::from(attempt.min(10))))
    }
}

/// A client's life: its first handshake, then reading until the run stops;
/// when the server closes it (4008 too slow, say), it resumes losslessly from
/// the last id, as a real client would.
pub(crate) async fn client<W: Watch>(
    spec: ClientSpec,
    ctx: Arc<Ctx>,
    mut watch: W,
) -> (ClientReport, W) {
    let mut report = ClientReport::new(spec.audience.clone());
    let (mut link, hello) = match first_connect(&ctx, &spec).await {
        Ok(ok) => ok,
        Err(e) => {
            report.error = Some(e.to_string());
            return (report, watch);
        }
    };
    report.connected = true;
    report.hello_last_id = hello.last_id;
    let epoch = hello.epoch;
    lock(&ctx.hellos).push((spec.audience.clone(), hello.last_id));
    ctx.connected.fetch_add(1, Relaxed);

    loop {
        let outcome = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => Outcome::Stop,
            outcome = link.read(|text, receipt| {
                report.on_text(text, receipt, &ctx);
                watch.on_frame(&report);
                ControlFlow::Continue(())
            }) => outcome,
        };
        match outcome {
            Outcome::Stop => {
                link.close().await;
                watch.stopped();
                return (report, watch);
            }
            _ if ctx.stop.is_cancelled() => return (report, watch),
            Outcome::Failed(e) => {
                report.closes.push(1006);
                report.error.get_or_insert(e);
            }
            outcome => report.closes.push(outcome.close_code()),
        }
        let Some(mut attempt) = watch.closed(&report).await else {
            return (report, watch);
        };
        let began = Instant::now();
        link = loop {
            watch.attempting(attempt);
            attempt += 1;
            let resumed = {
                let _permit = ctx.connect_gate.acquire().await;
                Box::pin(open(&ctx, &spec, Some((report.last_id(), &epoch)))).await
            };
            let e = match resumed {
                Ok((link, _hello)) => break link,
                Err(e) => e.to_string(),
            };
            let wait = if ctx.stop.is_cancelled() {
                None
            } else {
                watch.retry_after(attempt, began)
            };
            match wait {
                Some(wait) => {
                    report.error.get_or_insert(e);
                    tokio::time::sleep(wait).await;
                }
                None => {
                    report.error = Some(format!("could not resume: {e}"));
                    return (report, watch);
                }
            }
        };
        report.reconnects += 1;
        watch.resumed(&report);
    }
}

/// Starts a client (with `watch()`) for each of `specs` and waits until all
/// have connected ([`all_connected`]): the seconds it took, and their tasks.
pub(crate) async fn spawn_all<W: Watch + 'static>(
    ctx: &Arc<Ctx>,
    specs: Vec<ClientSpec>,
    mut watch: impl FnMut() -> W,
) -> Result<(f64, Vec<JoinHandle<(ClientReport, W)>>)> {
    let began = Instant::now();
    let sockets = specs.len();
    let handles = specs
        .into_iter()
        .map(|spec| tokio::spawn(client(spec, Arc::clone(ctx), watch())))
        .collect();
    all_connected(ctx, handles, sockets, began).await
}

/// Waits until every client has connected or failed (the clients' own
/// handshakes are bounded); any failure stops the run, naming the first
/// errors. Returns the seconds it took, and the clients' tasks.
pub(crate) async fn all_connected<T>(
    ctx: &Ctx,
    handles: Vec<JoinHandle<T>>,
    sockets: usize,
    began: Instant,
) -> Result<(f64, Vec<JoinHandle<T>>)> {
    while ctx.connected.load(Relaxed) + ctx.failed.load(Relaxed) < sockets {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = began.elapsed().as_secs_f64();
    if ctx.failed.load(Relaxed) > 0 {
        ctx.stop.cancel();
        for handle in handles {
            let _ = handle.await;
        }
        return Err(BenchError::run(format!(
            "{} of {} sockets failed to connect; first errors: {}",
            ctx.failed.load(Relaxed),
            sockets,
            lock(&ctx.first_errors).join("; ")
        )));
    }
    Ok((took, handles))
}

/// Stops the clients and collects their reports.
pub(crate) async fn finish<T>(ctx: &Ctx, handles: Vec<JoinHandle<T>>) -> Result<Vec<T>> {
    ctx.stop.cancel();
    let mut reports = Vec::with_capacity(handles.len());
    for handle in handles {
        match tokio::time::timeout(Duration::from_secs(30), handle).await {
            Ok(Ok(report)) => reports.push(report),
            _ => {
                return Err(BenchError::run(
                    "a client did not finish within 30 s of the end",
                ))
            }
        }
    }
    Ok(reports)
}

/// A client's first handshake, through the connect gate, retried a few
/// times when the connection itself fails (a full backlog), never when it is
/// refused; a failure is counted and its text kept (the first five).
async fn first_connect(ctx: &Ctx, spec: &ClientSpec) -> Result<(Link, Hello)> {
    let _permit = ctx.connect_gate.acquire().await;
    let mut attempt = 0;
    let first = loop {
        attempt += 1;
        // Boxed: the handshake's state would otherwise sit in every
        // client's task for the whole run.
        match Box::pin(open(ctx, spec, None)).await {
            Ok(ok) => break Ok(ok),
            // Refusals are final; a connect error may be a full backlog.
            Err(e) if attempt < 5 && !e.is_refusal() => {
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = &first {
        let mut errors = lock(&ctx.first_errors);
        if errors.len() < 5 {
            errors.push(e.to_string());
        }
        drop(errors);
        ctx.failed.fetch_add(1, Relaxed);
    }
    first
}

/// A client's connection: a WebSocket, or an SSE response being read.
pub(crate) enum Link {
    Ws(Ws),
    Sse(SseStream),
}

impl Link {
    /// Reads until the connection ends or `on_text` breaks, handing it each
    /// frame (an SSE event's data) with the receipt of its read.
    async fn read(
        &mut self,
        on_text: impl FnMut(&[u8], &mut Receipt) -> ControlFlow<()>,
    ) -> Outcome {
        match self {
            Link::Ws(ws) => ws.read_loop(on_text).await,
            Link::Sse(stream) => stream.read_loop(on_text).await,
        }
    }

    /// Ends the connection from our side: a close handshake, or for an
    /// event stream the connection dropped.
    async fn close(&mut self) {
        if let Link::Ws(ws) = self {
            ws.close_normally().await;
        }
    }
}

/// Connects over the run's transport: the connection and its `hello`.
async fn open(ctx: &Ctx, spec: &ClientSpec, resume: Option<(i64, &str)>) -> Result<(Link, Hello)> {
    match ctx.transport {
        Transport::WebSocket => {
            let (ws, hello) = connect(ctx, spec, resume).await?;
            Ok((Link::Ws(ws), hello))
        }
        Transport::ServerSentEvents => {
            let path = spec.path(Transport::ServerSentEvents);
            let (stream, hello) =
                within_handshake_timeout(sse::connect(ctx, &path, &spec.token, resume)).await?;
            Ok((Link::Sse(stream), hello))
        }
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct Hello {
    #[serde(rename = "type")]
    kind: String,
    pub(crate) last_id: i64,
    pub(crate) epoch: String,
}

impl Hello {
    /// The first frame, which must be `hello`.
    pub(crate) fn parse(text: &[u8]) -> Result<Hello> {
        let text = String::from_utf8_lossy(text);
        let hello: Hello = serde_json::from_str(&text)
            .map_err(|e| BenchError::run(format!("first frame is not hello: {e}: {text}")))?;
        if hello.kind != "hello" {
            return Err(BenchError::run(format!("first frame is not hello: {text}")));
        }
        Ok(hello)
    }
}

/// A handshake, bounded: 15 s.
async fn within_handshake_timeout<T>(handshake: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(15), handshake)
        .await
        .map_err(|_| BenchError::run("handshake timed out after 15 s"))?
}

/// TCP connect, `request` sent: the stream, the response head (checked
/// to have status `want`, else a refusal with the body's start) and the
/// bytes read after it.
pub(crate) async fn request(
    ctx: &Ctx,
    request: &str,
    want: &str,
) -> Result<(TcpStream, String, Vec<u8>)> {
    let mut stream = TcpStream::connect(ctx.addr)
        .await
        .map_err(BenchError::io(format!("connect {}", ctx.addr)))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(BenchError::io("sending the request"))?;
    let mut buf = Vec::with_capacity(512);
    let end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            return Err(BenchError::run("response headers over 16 KiB"));
        }
        let mut chunk = [0u8; 1024];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(BenchError::io("reading the response"))?;
        if n == 0 {
            return Err(BenchError::run("connection closed before the response"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap_or("?");
    if status != want {
        let body = String::from_utf8_lossy(&buf[end..]);
        return Err(BenchError::Refused {
            status: status.to_owned(),
            body: body.trim().to_owned(),
        });
    }
    buf.drain(..end);
    Ok((stream, head, buf))
}

/// The value of header `name` in a response head.
pub(crate) fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, value) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Through the connect gate: TCP connect, the HTTP upgrade and `hello`.
pub(crate) async fn connect_gated(
    ctx: &Ctx,
    spec: &ClientSpec,
    resume: Option<(i64, &str)>,
) -> Result<(Ws, Hello)> {
    let _permit = ctx.connect_gate.acquire().await;
    Box::pin(connect(ctx, spec, resume)).await
}

/// TCP connect, the HTTP upgrade ([`rawws::upgrade`]: the token in
/// `Authorization`), and the `hello` frame.
pub(crate) async fn connect(
    ctx: &Ctx,
    spec: &ClientSpec,
    resume: Option<(i64, &str)>,
) -> Result<(Ws, Hello)> {
    let handshake = async {
        let target = match resume {
            None => spec.path(Transport::WebSocket),
            Some((last_id, epoch)) => format!(
                "{}?last_id={last_id}&epoch={epoch}",
                spec.path(Transport::WebSocket)
            ),
        };
        let mut ws = rawws::upgrade(ctx, &target, &spec.token).await?;
        let mut hello = None;
        let outcome = ws
            .read_loop(|text, _| {
                hello = Some(Hello::parse(text));
                ControlFlow::Break(())
            })
            .await;
        match (hello, outcome) {
            (Some(hello), _) => Ok((ws, hello?)),
            (None, Outcome::Closed(code)) => Err(BenchError::run(format!(
                "closed before hello: code {code:?}"
            ))),
            (None, Outcome::Failed(e)) => Err(BenchError::run(format!("reading hello: {e}"))),
            (None, Outcome::Stop | Outcome::Done) => Err(BenchError::run("closed before hello")),
        }
    };
    within_handshake_timeout(handshake).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_transport_and_keys_spread() {
        let specs = business_specs("secret", 5, &[42, 43]).expect("specs");
        let paths: Vec<_> = specs
            .iter()
            .map(|s| s.path(Transport::ServerSentEvents))
            .collect();
        assert_eq!(
            paths,
            [
                "/sse/businesses/42/",
                "/sse/businesses/43/",
                "/sse/businesses/42/",
                "/sse/businesses/43/",
                "/sse/businesses/42/"
            ]
        );
        let specs = client_specs("secret", 1, 1).expect("specs");
        assert_eq!(specs[0].path(Transport::WebSocket), "/ws/dashboard/");
        assert_eq!(specs[1].path(Transport::WebSocket), "/ws/notifications/");
        assert_eq!(specs[1].audience, Audience::User("1".into()));
        // Every path is one pgrelay's own router takes for that endpoint.
        let streams: Vec<pgrelay::route::Stream> = vec![
            "businesses=business_events:id,reservation_events:business_id"
                .parse()
                .expect("stream"),
        ];
        let endpoint = pgrelay::wire::Endpoint::from_path("/sse/businesses/42/", &streams);
        assert!(matches!(
            endpoint,
            Some((Transport::ServerSentEvents, pgrelay::wire::Endpoint::Stream { key, .. })) if key == "42"
        ));
    }

    #[test]
    fn response_headers() {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        assert_eq!(header(head, "content-type"), Some("text/event-stream"));
        assert_eq!(header(head, "Transfer-Encoding"), Some("chunked"));
        assert_eq!(header(head, "content-length"), None);
    }
}
