//! `pgrelay tail`: a command-line client for one stream, over WebSocket or
//! (`--transport sse`) Server-Sent Events. Prints each event as one JSON line
//! on stdout (or pretty-printed with `--pretty`); `hello`, `reset` and
//! connection news go to stderr, so stdout stays machine-readable. Both
//! transports carry the same frames, so everything past the connection (the
//! cursor, printing, close codes) is shared; an SSE `event: close` is read as
//! the close frame it stands for.
//!
//! It reconnects on its own with capped exponential backoff and full jitter,
//! resuming with `?last_id=&epoch=` from the last event printed, and drops any
//! id at or below that cursor, so each event is printed once and in order
//! across reconnects. A refusal that retrying cannot fix (HTTP 400, 401, 403,
//! 404) ends it with an error; so do a bad `--url` and a missing token.
//! `--token-file` is re-read at every reconnect, which is how a long-running
//! tail picks up a renewed token after a `Close::TokenExpired` (4001) close.
//!
//! Over SSE the tail reconnects itself, like over WebSocket, with
//! `?last_id=&epoch=` from its own cursor (it ignores the stream's `id:`
//! lines, which say the same); the SSE reading is hyper's HTTP/1 client and a
//! small line parser ([`SseParser`]).
//!
//! Not here: TLS (`wss://` works only if tokio-tungstenite is built with a TLS
//! feature; `https://` not at all), and sending `refresh` frames.

use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{Error as WsError, UrlError};
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use url::Url;

use pgrelay::config::TailArgs;
use pgrelay::wire::{Close, Transport};

/// First reconnect delay cap; doubles per failed attempt up to [`MAX_DELAY`].
const MIN_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(30);
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// pgrelay pings every 30 s: silence this long means the link is dead.
const IDLE: Duration = Duration::from_secs(75);
/// Bound on the TCP connect plus the WebSocket handshake (or the SSE response head).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest SSE line kept while waiting for its end (pgrelay caps its
/// events far below this): a longer one is a broken stream, not memory to spend.
const MAX_SSE_LINE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("--url {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("no token: pass --token, --token-file, set PGRELAY_TOKEN, or put ?token= in --url")]
    NoToken,
    #[error("--token-file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--token-file {}: the file is empty", .0.display())]
    EmptyTokenFile(PathBuf),
    #[error("the token cannot be sent in an HTTP header (it holds a control character)")]
    BadToken,
    #[error("refused: HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error(
        "wss:// and https:// need TLS support, which this build of pgrelay lacks: \
         connect to the ws:// or http:// address behind the TLS proxy"
    )]
    NoTls,
    #[error("{url}: not an event stream (Content-Type {content_type:?}): use a /sse/... path")]
    NotEventStream { url: String, content_type: String },
    #[error("writing to stdout: {0}")]
    Output(#[source] io::Error),
}

/// Runs until `until` resolves (Ctrl-C), or a refusal that retrying cannot fix.
pub async fn run(args: TailArgs, until: impl Future<Output = ()>) -> Result<(), TailError> {
    let base = stream_url(&args.url, args.transport)?;
    let in_url = base.query_pairs().any(|(k, _)| k == "token");
    // Checked before the first connect, so a typo fails at once.
    let token = match token(&args)? {
        Some(token) => Some(token),
        None if in_url => None,
        None => return Err(TailError::NoToken),
    };
    let mut tail = Tail {
        cursor: Cursor::new(args.last_id),
        args,
        base,
        token,
        out: io::stdout(),
    };
    tokio::pin!(until);
    tail.run_until(until).await
}

struct Tail {
    args: TailArgs,
    base: Url,
    token: Option<String>,
    cursor: Cursor,
    out: io::Stdout,
}

/// Why one connection ended.
enum Ended {
    /// Reconnect after a backoff delay.
    Backoff(String),
    /// Reconnect at once (`Close::TokenExpired` with a fresh token, `Close::TooSlow`).
    Now(String),
    /// Ctrl-C, or stdout is gone (`| head`): stop quietly.
    Stop,
}

impl Tail {
    async fn run_until<F: Future<Output = ()>>(
        &mut self,
        mut until: Pin<&mut F>,
    ) -> Result<(), TailError> {
        let mut attempt: u32 = 0;
        let mut first = true;
        loop {
            if !first {
                // Re-read the token file: a renewed token is picked up here.
                match token(&self.args) {
                    Ok(Some(token)) => self.token = Some(token),
                    Ok(None) => {}
                    Err(e) => eprintln!("pgrelay tail: {e}; keeping the previous token"),
                }
            }
            first = false;
            let started = Instant::now();
            let ended = self.connection(until.as_mut()).await?;
            if started.elapsed() >= STABLE {
                attempt = 0;
            }
            let delay = match ended {
                Ended::Stop => return Ok(()),
                Ended::Now(why) if attempt == 0 => {
                    eprintln!("pgrelay tail: {why}; reconnecting");
                    Duration::ZERO
                }
                Ended::Now(why) | Ended::Backoff(why) => {
                    let delay = backoff(attempt, rand::rng().random::<f64>());
                    eprintln!(
                        "pgrelay tail: {why}; reconnecting in {:.1}s",
                        delay.as_secs_f64()
                    );
                    delay
                }
            };
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = until.as_mut() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection, from the handshake to its end.
    async fn connection<F: Future<Output = ()>>(
        &mut self,
        until: Pin<&mut F>,
    ) -> Result<Ended, TailError> {
        match self.args.transport {
            Transport::WebSocket => self.websocket(until).await,
            Transport::ServerSentEvents => self.event_stream(until).await,
        }
    }

    /// The stream's URL with the cursor to resume from.
    fn url(&self) -> Url {
        resume_url(
            &self.base,
            self.cursor.last_id,
            self.cursor.epoch.as_deref(),
        )
    }

    /// One WebSocket connection.
    async fn websocket<F: Future<Output = ()>>(
        &mut self,
        mut until: Pin<&mut F>,
    ) -> Result<Ended, TailError> {
        let url = self.url();
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| url_error(&self.args.url, &e.to_string()))?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| TailError::BadToken)?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        let connecting = timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(request, None, true),
        );
        let connected = tokio::select! {
            _ = until.as_mut() => return Ok(Ended::Stop),
            connected = connecting => connected,
        };
        let mut ws = match connected {
            Err(_) => return Ok(Ended::Backoff("connect timed out".into())),
            Ok(Ok((ws, _response))) => ws,
            Ok(Err(WsError::Http(response))) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| one_line(&String::from_utf8_lossy(b)))
                    .unwrap_or_default();
                // Retrying cannot fix a bad path, request, token or right;
                // 429/503 (caps, admin query down) and 5xx can pass.
                if matches!(status, 400 | 401 | 403 | 404 | 405) {
                    return Err(TailError::Refused { status, body });
                }
                return Ok(Ended::Backoff(format!("HTTP {status}: {body}")));
            }
            Ok(Err(WsError::Url(UrlError::TlsFeatureNotEnabled))) => return Err(TailError::NoTls),
            Ok(Err(WsError::Url(e))) => return Err(url_error(&self.args.url, &e.to_string())),
            Ok(Err(e)) => return Ok(Ended::Backoff(format!("cannot connect: {e}"))),
        };
        loop {
            let next = tokio::select! {
                _ = until.as_mut() => {
                    let bye = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
                    let _ = timeout(Duration::from_secs(1), ws.close(Some(bye))).await;
                    return Ok(Ended::Stop);
                }
                next = timeout(IDLE, ws.next()) => next,
            };
            let message = match next {
                Err(_) => return Ok(Ended::Backoff("no frame or ping for 75s".into())),
                Ok(None) => return Ok(Ended::Backoff("connection closed".into())),
                Ok(Some(Err(e))) => return Ok(Ended::Backoff(format!("connection lost: {e}"))),
                Ok(Some(Ok(message))) => message,
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Close(frame) => return Ok(closed(frame)),
                // Pongs are queued by tungstenite and sent on the next read.
                _ => continue,
            };
            if self.frame(&text)? == Printed::Stop {
                let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                return Ok(Ended::Stop);
            }
        }
    }

    /// One Server-Sent Events response, from the request to its end.
    async fn event_stream<F: Future<Output = ()>>(
        &mut self,
        mut until: Pin<&mut F>,
    ) -> Result<Ended, TailError> {
        let url = self.url();
        let connecting = timeout(
            CONNECT_TIMEOUT,
            request_event_stream(&url, self.token.as_deref()),
        );
        let opened = tokio::select! {
            _ = until.as_mut() => return Ok(Ended::Stop),
            opened = connecting => opened,
        };
        let (response, _connection) = match opened {
            Err(_) => return Ok(Ended::Backoff("connect timed out".into())),
            Ok(Err(Opening::Failed(why))) => return Ok(Ended::Backoff(why)),
            Ok(Err(Opening::Fatal(e))) => return Err(e),
            Ok(Ok(opened)) => opened,
        };
        let status = response.status().as_u16();
        if status != 200 {
            let body = Limited::new(response.into_body(), 4096).collect();
            let body = match timeout(Duration::from_secs(5), body).await {
                Ok(Ok(body)) => one_line(&String::from_utf8_lossy(&body.to_bytes())),
                _ => String::new(),
            };
            // As for a WebSocket: retrying cannot fix a bad path, request,
            // token or right; 429/503 (caps, a query down) and 5xx can pass.
            if matches!(status, 400 | 401 | 403 | 404 | 405 | 406) {
                return Err(TailError::Refused { status, body });
            }
            return Ok(Ended::Backoff(format!("HTTP {status}: {body}")));
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        if !content_type.starts_with("text/event-stream") {
            return Err(TailError::NotEventStream {
                url: redact(url.as_str()),
                content_type,
            });
        }
        let mut body = response.into_body();
        let mut parser = SseParser::default();
        loop {
            let next = tokio::select! {
                _ = until.as_mut() => return Ok(Ended::Stop),
                // Heartbeats are comment lines: any chunk shows the link lives.
                next = timeout(IDLE, body.frame()) => next,
            };
            let chunk = match next {
                Err(_) => return Ok(Ended::Backoff("no event or heartbeat for 75s".into())),
                Ok(None) => return Ok(Ended::Backoff("event stream ended".into())),
                Ok(Some(Err(e))) => return Ok(Ended::Backoff(format!("connection lost: {e}"))),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(chunk) => chunk,
                    Err(_) => continue, // trailers
                },
            };
            let events = match parser.push(&chunk) {
                Ok(events) => events,
                Err(why) => return Ok(Ended::Backoff(why.into())),
            };
            for event in events {
                match event.kind.as_str() {
                    "hello" | "event" | "reset" => {
                        if self.frame(&event.data)? == Printed::Stop {
                            return Ok(Ended::Stop);
                        }
                    }
                    // Where a socket gets a close frame: the same code and reason.
                    "close" => return Ok(close_event(&event.data)),
                    other => eprintln!("pgrelay tail: ignoring an unknown event {other:?}"),
                }
            }
        }
    }

    /// One frame's JSON, from either transport: printed, noted or skipped.
    fn frame(&mut self, text: &str) -> Result<Printed, TailError> {
        let written = match self.cursor.apply(text) {
            Step::Print(value) => print(&mut self.out, text, &value, self.args.pretty),
            Step::Info(line) => {
                eprintln!("pgrelay tail: {line}");
                Ok(())
            }
            Step::Skip => Ok(()),
        };
        match written {
            Ok(()) => Ok(Printed::Go),
            // stdout is gone (`| head`): stop quietly.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Printed::Stop),
            Err(e) => Err(TailError::Output(e)),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Printed {
    Go,
    Stop,
}

/// Why an event stream could not be opened.
enum Opening {
    /// Worth retrying (refused connection, reset, a broken response).
    Failed(String),
    /// Not worth it (a token that cannot be a header).
    Fatal(TailError),
}

/// Aborts the task driving an HTTP/1 connection when the stream is done with it.
struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `GET url` with `Accept: text/event-stream` over a fresh HTTP/1 connection
/// (one stream per connection, as pgrelay serves them): the response head,
/// and the connection's driver, which must live as long as the body is read.
async fn request_event_stream(
    url: &Url,
    token: Option<&str>,
) -> Result<(hyper::Response<Incoming>, Driver), Opening> {
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(host) => host.to_string(),
        None => return Err(Opening::Failed("no host".into())),
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| Opening::Failed(format!("cannot connect: {e}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| Opening::Failed(format!("cannot connect: {e}")))?;
    let driver = Driver(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let mut request =
        hyper::Request::get(&url[url::Position::BeforePath..url::Position::AfterQuery])
            .header(
                HOST,
                &url[url::Position::BeforeHost..url::Position::AfterPort],
            )
            .header(ACCEPT, "text/event-stream");
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Opening::Fatal(TailError::BadToken))?;
        request = request.header(AUTHORIZATION, value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| Opening::Fatal(url_error(url.as_str(), &e.to_string())))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Opening::Failed(format!("cannot connect: {e}")))?;
    Ok((response, driver))
}

/// One dispatched Server-Sent Event: its `event:` name and its `data:`.
#[derive(Debug, PartialEq)]
struct SseEvent {
    kind: String,
    data: String,
}

/// The event-stream format, fed chunks as they come: lines end with LF, CRLF
/// or CR; `:` starts a comment (pgrelay's heartbeat); `event:` names an
/// event, `data:` lines are joined by LF, a blank line dispatches. `id:` and
/// `retry:` are the browser's business; the tail keeps its own cursor.
#[derive(Default)]
struct SseParser {
    pending: Vec<u8>,
    kind: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, &'static str> {
        self.pending.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(at) = self.pending[start..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
        {
            let end = start + at;
            let width = match (self.pending[end], self.pending.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                // A CR that ends the chunk may be the first half of a CRLF.
                (b'\r', None) => break,
                _ => 1,
            };
            let line = String::from_utf8_lossy(&self.pending[start..end]).into_owned();
            start = end + width;
            if let Some(event) = self.line(&line) {
                events.push(event);
            }
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_SSE_LINE {
            return Err("an event stream line over 16 MiB");
        }
        Ok(events)
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let kind = std::mem::take(&mut self.kind);
            let data = std::mem::take(&mut self.data);
            if !std::mem::take(&mut self.has_data) {
                return None;
            }
            let kind = if kind.is_empty() {
                "message".into()
            } else {
                kind
            };
            return Some(SseEvent { kind, data });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.kind = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

/// What an SSE `event: close` asks of us: `{"type":"close","code":N,"reason":...}`.
fn close_event(data: &str) -> Ended {
    let value: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
    match value.get("code").and_then(|c| c.as_u64()) {
        Some(code) => closed_with(
            u16::try_from(code).unwrap_or(0),
            value.get("reason").and_then(|r| r.as_str()).unwrap_or(""),
        ),
        None => Ended::Backoff(format!("closed without a code: {}", one_line(data))),
    }
}

/// What a close frame asks of us.
fn closed(frame: Option<CloseFrame>) -> Ended {
    let Some(frame) = frame else {
        return Ended::Backoff("closed without a code".into());
    };
    closed_with(frame.code.into(), &frame.reason)
}

/// What a close code asks of us, whichever transport carried it.
fn closed_with(code: u16, reason: &str) -> Ended {
    let why = format!("closed {code}: {reason}");
    match Close::from_code(code) {
        // Token expired or refresh refused: the token file may hold a new one
        // (a static token that expired gets a 401 next, which ends the tail).
        // Too slow: resuming at once loses nothing.
        Some(Close::TokenExpired | Close::TooSlow) => Ended::Now(why),
        _ => Ended::Backoff(why),
    }
}

fn print(
    out: &mut io::Stdout,
    raw: &str,
    value: &serde_json::Value,
    pretty: bool,
) -> io::Result<()> {
    let mut out = out.lock();
    if pretty {
        match pretty_json(raw) {
            Some(pretty) => out.write_all(&pretty)?,
            None => serde_json::to_writer_pretty(&mut out, value)?,
        }
        out.write_all(b"\n")?;
    } else if raw.contains('\n') {
        // pgrelay's frames are single-line JSON; keep the one-line promise anyway.
        serde_json::to_writer(&mut out, value)?;
        out.write_all(b"\n")?;
    } else {
        out.write_all(raw.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// The token from `--token` (or PGRELAY_TOKEN) or `--token-file`, if any.
fn token(args: &TailArgs) -> Result<Option<String>, TailError> {
    if let Some(token) = &args.token {
        let token = token.trim();
        return Ok((!token.is_empty()).then(|| token.to_owned()));
    }
    match &args.token_file {
        Some(path) => read_token_file(path).map(Some),
        None => Ok(None),
    }
}

fn read_token_file(path: &Path) -> Result<String, TailError> {
    let text = std::fs::read_to_string(path).map_err(|source| TailError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TailError::EmptyTokenFile(path.to_owned()));
    }
    Ok(token.to_owned())
}

fn url_error(url: &str, why: &str) -> TailError {
    TailError::Url {
        url: redact(url),
        why: why.to_owned(),
    }
}

/// The URL as given, with any `token=` value hidden (error messages only).
fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) if parsed.query_pairs().any(|(k, _)| k == "token") => {
            let pairs: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "token" {
                        "REDACTED".into()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            parsed.query_pairs_mut().clear().extend_pairs(pairs);
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        // Unparsable: the query might still hold a token, so drop it whole.
        Err(_) => url.split(['?', '#']).next().unwrap_or_default().to_owned(),
    }
}

/// Validates `--url` for the transport: ws:// or wss:// with a host for a
/// WebSocket, http:// (or ws://, read as http://) for SSE. A leading `/ws/`
/// or `/sse/` in the path follows the transport, so one URL names a stream
/// for both.
fn stream_url(url: &str, transport: Transport) -> Result<Url, TailError> {
    let mut parsed = Url::parse(url).map_err(|e| url_error(url, &e.to_string()))?;
    let sse = transport == Transport::ServerSentEvents;
    match (sse, parsed.scheme()) {
        (false, "ws" | "wss") | (true, "http") => {}
        (false, "http" | "https") => {
            return Err(url_error(
                url,
                "use ws:// or wss://, e.g. ws://127.0.0.1:8080/ws/notifications/ \
                 (or --transport sse)",
            ))
        }
        (true, "ws") => {
            // Both special schemes: the url crate allows the swap.
            let _ = parsed.set_scheme("http");
        }
        (true, "https" | "wss") => return Err(TailError::NoTls),
        (_, other) => {
            let want = if sse { "http://" } else { "ws:// or wss://" };
            return Err(url_error(
                url,
                &format!("unsupported scheme {other:?}: use {want}"),
            ));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(url_error(url, "no host"));
    }
    let (from, to) = if sse {
        ("/ws/", "/sse/")
    } else {
        ("/sse/", "/ws/")
    };
    if let Some(rest) = parsed.path().strip_prefix(from) {
        let path = format!("{to}{rest}");
        parsed.set_path(&path);
    }
    Ok(parsed)
}

/// `base` with `last_id` and `epoch` set from the cursor (and any given in
/// `base` removed); other query parameters are kept.
fn resume_url(base: &Url, last_id: Option<i64>, epoch: Option<&str>) -> Url {
    let kept: Vec<(String, String)> = base
        .query_pairs()
        .filter(|(k, _)| k != "last_id" && k != "epoch")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut url = base.clone();
    url.set_query(None);
    let mut pairs = kept;
    if let Some(last_id) = last_id {
        pairs.push(("last_id".into(), last_id.to_string()));
        if let Some(epoch) = epoch.filter(|e| !e.is_empty()) {
            pairs.push(("epoch".into(), epoch.to_owned()));
        }
    }
    if !pairs.is_empty() {
        url.query_pairs_mut().extend_pairs(pairs);
    }
    url
}

/// Full jitter: `unit` (in [0, 1)) times min(MAX_DELAY, MIN_DELAY * 2^attempt).
fn backoff(attempt: u32, unit: f64) -> Duration {
    let cap = MIN_DELAY
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(MAX_DELAY);
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

/// Where the stream is: the resume cursor, kept across connections.
#[derive(Debug)]
struct Cursor {
    /// The id of the last event printed (or the one to resume after).
    last_id: Option<i64>,
    epoch: Option<String>,
    /// `last_id` of this connection's hello: where a `reset` continues from.
    hello_last_id: Option<i64>,
}

/// What to do with one frame.
#[derive(Debug, PartialEq)]
enum Step {
    Print(serde_json::Value),
    Info(String),
    Skip,
}

impl Cursor {
    fn new(last_id: Option<i64>) -> Cursor {
        Cursor {
            last_id,
            epoch: None,
            hello_last_id: None,
        }
    }

    fn apply(&mut self, text: &str) -> Step {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
            return Step::Info(format!(
                "ignoring a frame that is not JSON: {}",
                one_line(text)
            ));
        };
        match value.get("type").and_then(|t| t.as_str()) {
            Some("hello") => {
                let last_id = value.get("last_id").and_then(|v| v.as_i64());
                self.hello_last_id = last_id;
                if let Some(epoch) = value.get("epoch").and_then(|v| v.as_str()) {
                    self.epoch = Some(epoch.to_owned());
                }
                let resumed = self.last_id.is_some();
                if self.last_id.is_none() {
                    // Every event above hello.last_id reaches this socket.
                    self.last_id = last_id;
                }
                Step::Info(format!(
                    "hello: stream={} user={} last_id={} epoch={}{}",
                    field(&value, "stream"),
                    field(&value, "user"),
                    field(&value, "last_id"),
                    field(&value, "epoch"),
                    if resumed { " (resuming)" } else { "" },
                ))
            }
            Some("reset") => {
                // The server continues from hello.last_id; so does the cursor
                // (lower than before after a restore: ids restart with the epoch).
                if let Some(id) = self.hello_last_id {
                    self.last_id = Some(id);
                }
                Step::Info(format!(
                    "reset: {}: events before {} are not available; continuing live",
                    field(&value, "reason"),
                    self.hello_last_id
                        .map_or("now".into(), |id| format!("id {id}")),
                ))
            }
            Some("event") => match value.get("id").and_then(|v| v.as_i64()) {
                Some(id) if self.last_id.is_some_and(|last| id <= last) => Step::Skip,
                Some(id) => {
                    self.last_id = Some(id);
                    Step::Print(value)
                }
                None => Step::Info(format!(
                    "ignoring an event without an id: {}",
                    one_line(text)
                )),
            },
            _ => Step::Info(format!("ignoring an unknown frame: {}", one_line(text))),
        }
    }
}

/// `raw` re-indented, transcoded token by token, so the keys keep the
/// server's order (type, id, ...), which a `serde_json::Value` would sort.
fn pretty_json(raw: &str) -> Option<Vec<u8>> {
    let mut pretty = Vec::new();
    let mut from = serde_json::Deserializer::from_str(raw);
    let mut to = serde_json::Serializer::pretty(&mut pretty);
    serde_transcode::transcode(&mut from, &mut to).ok()?;
    from.end().ok()?;
    Some(pretty)
}

fn field(value: &serde_json::Value, key: &str) -> String {
    match value.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "?".into(),
    }
}

/// At most 300 characters on one line.
fn one_line(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 300 {
        format!("{}...", line.chars().take(300).collect::<String>())
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_url(base: &str, last_id: Option<i64>, epoch: Option<&str>, want: &str) {
        let base = stream_url(base, Transport::WebSocket).expect("valid url");
        assert_eq!(resume_url(&base, last_id, epoch).as_str(), want);
    }

    #[test]
    fn resume_urls() {
        let ws = "ws://127.0.0.1:8080/ws/notifications/";
        check_url(ws, None, None, ws);
        check_url(ws, None, Some("ab"), ws);
        check_url(ws, Some(0), None, &format!("{ws}?last_id=0"));
        check_url(
            ws,
            Some(42),
            Some("9f2c"),
            &format!("{ws}?last_id=42&epoch=9f2c"),
        );
        check_url(ws, Some(42), Some(""), &format!("{ws}?last_id=42"));
        // Stale resume parameters in --url are replaced; others are kept.
        check_url(
            &format!("{ws}?last_id=1&token=t&epoch=old"),
            Some(7),
            Some("new"),
            &format!("{ws}?token=t&last_id=7&epoch=new"),
        );
        check_url(&format!("{ws}?last_id=1&epoch=old"), None, None, ws);
        check_url(
            "wss://relay.example.com/ws/dashboard/",
            Some(3),
            Some("e f"),
            "wss://relay.example.com/ws/dashboard/?last_id=3&epoch=e+f",
        );
    }

    #[test]
    fn bad_urls() {
        for url in [
            "",
            "127.0.0.1:8080",
            "http://127.0.0.1:8080/ws/dashboard/",
            "ftp://x/",
            "ws://",
        ] {
            assert!(
                matches!(
                    stream_url(url, Transport::WebSocket),
                    Err(TailError::Url { .. })
                ),
                "{url:?}"
            );
        }
        let e = stream_url("http://h/?token=secret", Transport::WebSocket)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
        for url in ["", "ftp://x/", "http://", "127.0.0.1:8080"] {
            assert!(
                matches!(
                    stream_url(url, Transport::ServerSentEvents),
                    Err(TailError::Url { .. })
                ),
                "{url:?}"
            );
        }
        for url in ["https://h/sse/dashboard/", "wss://h/ws/dashboard/"] {
            assert!(matches!(
                stream_url(url, Transport::ServerSentEvents),
                Err(TailError::NoTls)
            ));
        }
    }

    /// One URL names a stream for both transports.
    #[test]
    fn transports_pick_scheme_and_prefix() {
        let check = |url: &str, transport: Transport, want: &str| {
            let got = stream_url(url, transport).expect("valid url");
            assert_eq!(got.as_str(), want, "{url} over {transport:?}");
        };
        let sse = Transport::ServerSentEvents;
        let ws = Transport::WebSocket;
        check(
            "ws://h:1/ws/businesses/42/",
            sse,
            "http://h:1/sse/businesses/42/",
        );
        check(
            "http://h/sse/dashboard/?token=t",
            sse,
            "http://h/sse/dashboard/?token=t",
        );
        check("ws://h/sse/notifications/", ws, "ws://h/ws/notifications/");
        check("ws://h/relay/ws/x/", sse, "http://h/relay/ws/x/");
        check(
            "ws://[::1]:8080/ws/dashboard/",
            ws,
            "ws://[::1]:8080/ws/dashboard/",
        );
    }

    fn parse(chunks: &[&str]) -> Vec<(String, String)> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for chunk in chunks {
            for e in parser.push(chunk.as_bytes()).expect("parse") {
                events.push((e.kind, e.data));
            }
        }
        events
    }

    #[test]
    fn sse_parsing() {
        let ev = |k: &str, d: &str| (k.to_owned(), d.to_owned());
        // pgrelay's own shape, with a heartbeat between events.
        assert_eq!(
            parse(&["event: hello\nid: e:5\ndata: {\"a\":1}\n\n:\n\nevent: event\ndata: x\n\n"]),
            [ev("hello", r#"{"a":1}"#), ev("event", "x")]
        );
        // Any split, CRLF and CR line ends, a CRLF split across chunks.
        assert_eq!(
            parse(&[
                "eve",
                "nt: reset\r",
                "\ndata: y\r\r",
                "\n",
                "data:z\rdata:  two\n\n"
            ]),
            [ev("reset", "y"), ev("message", "z\n two")]
        );
        // No data, no event; a name does not leak into the next event.
        assert_eq!(
            parse(&["event: close\n\ndata: d\n\n", "event: e\ndata\n\n"]),
            [ev("message", "d"), ev("e", "")]
        );
        assert_eq!(parse(&["data: never ended"]), []);
    }

    #[test]
    fn sse_close_events() {
        let data =
            |code: Close| format!(r#"{{"code":{},"reason":"r","type":"close"}}"#, code.code());
        assert!(matches!(
            close_event(&data(Close::TokenExpired)),
            Ended::Now(_)
        ));
        assert!(matches!(close_event(&data(Close::TooSlow)), Ended::Now(_)));
        for code in [
            Close::Shutdown,
            Close::ReplayFailed,
            Close::LogWentBack,
            Close::ReplayBusy,
        ] {
            assert!(matches!(close_event(&data(code)), Ended::Backoff(_)));
        }
        assert!(matches!(close_event("junk"), Ended::Backoff(_)));
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        assert_eq!(backoff(0, 0.0), Duration::ZERO);
        assert_eq!(backoff(0, 1.0), MIN_DELAY);
        assert_eq!(backoff(1, 1.0), MIN_DELAY * 2);
        assert_eq!(backoff(3, 0.5), MIN_DELAY * 4);
        for attempt in [6, 7, 20, u32::MAX] {
            assert_eq!(backoff(attempt, 1.0), MAX_DELAY);
            assert!(backoff(attempt, 0.999) < MAX_DELAY);
        }
    }

    fn event(id: i64) -> String {
        format!(
            r#"{{"type":"event","id":{id},"channel":"c","table":"t","op":"INSERT","at":"x","data":{{}}}}"#
        )
    }

    fn printed(step: Step) -> Option<i64> {
        match step {
            Step::Print(v) => v["id"].as_i64(),
            _ => None,
        }
    }

    #[test]
    fn cursor_starts_at_hello_and_drops_duplicates() {
        let mut c = Cursor::new(None);
        assert!(matches!(
            c.apply(
                r#"{"type":"hello","stream":"dashboard","user":"1","last_id":10,"epoch":"e1"}"#
            ),
            Step::Info(_)
        ));
        assert_eq!((c.last_id, c.epoch.as_deref()), (Some(10), Some("e1")));
        assert_eq!(c.apply(&event(9)), Step::Skip);
        assert_eq!(c.apply(&event(10)), Step::Skip);
        assert_eq!(printed(c.apply(&event(11))), Some(11));
        assert_eq!(c.apply(&event(11)), Step::Skip);
        assert_eq!(printed(c.apply(&event(13))), Some(13));
        // A reconnect resumes from 13: the replay's 12 is not re-sent, 13 is dropped.
        c.apply(r#"{"type":"hello","stream":"dashboard","user":"1","last_id":20,"epoch":"e1"}"#);
        assert_eq!(c.last_id, Some(13));
        assert_eq!(c.apply(&event(13)), Step::Skip);
        assert_eq!(printed(c.apply(&event(14))), Some(14));
    }

    #[test]
    fn cursor_follows_a_reset_even_downwards() {
        let mut c = Cursor::new(Some(500));
        c.apply(r#"{"type":"hello","stream":"notifications","user":"2","last_id":7,"epoch":"e2"}"#);
        assert_eq!(c.last_id, Some(500));
        assert!(matches!(
            c.apply(r#"{"type":"reset","reason":"epoch_mismatch"}"#),
            Step::Info(_)
        ));
        assert_eq!((c.last_id, c.epoch.as_deref()), (Some(7), Some("e2")));
        assert_eq!(printed(c.apply(&event(8))), Some(8));
    }

    #[test]
    fn cursor_ignores_junk() {
        let mut c = Cursor::new(Some(1));
        assert!(matches!(c.apply("not json"), Step::Info(_)));
        assert!(matches!(c.apply(r#"{"type":"event"}"#), Step::Info(_)));
        assert!(matches!(c.apply(r#"{"type":"other"}"#), Step::Info(_)));
        assert_eq!(c.last_id, Some(1));
    }

    #[test]
    fn pretty_keeps_key_order() {
        let raw = r#"{"type":"event","id":5,"data":{"z":[1,2.5,null,true],"a":"x"}}"#;
        let pretty = String::from_utf8(pretty_json(raw).expect("json")).expect("utf-8");
        let keys: Vec<usize> = ["\"type\"", "\"id\"", "\"data\"", "\"z\"", "\"a\""]
            .iter()
            .map(|k| pretty.find(k).expect("key kept"))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{pretty}");
        assert!(
            pretty.contains("2.5") && pretty.lines().count() > 5,
            "{pretty}"
        );
        assert_eq!(pretty_json(r#"{"a":1} trailing"#), None);
    }

    #[test]
    fn close_codes() {
        let close = |code: Close| {
            closed(Some(CloseFrame {
                code: CloseCode::from(code.code()),
                reason: "r".into(),
            }))
        };
        assert!(matches!(close(Close::TokenExpired), Ended::Now(_)));
        assert!(matches!(close(Close::TooSlow), Ended::Now(_)));
        assert!(matches!(close(Close::Shutdown), Ended::Backoff(_)));
        assert!(matches!(close(Close::ReplayFailed), Ended::Backoff(_)));
        assert!(matches!(closed(None), Ended::Backoff(_)));
    }

    #[test]
    fn tokens() {
        let args = |token: Option<&str>, file: Option<PathBuf>| TailArgs {
            url: "ws://h/".into(),
            token: token.map(str::to_owned),
            token_file: file,
            last_id: None,
            pretty: false,
            transport: Transport::WebSocket,
        };
        assert_eq!(
            token(&args(Some(" t \n"), None)).ok().flatten().as_deref(),
            Some("t")
        );
        assert_eq!(token(&args(None, None)).ok().flatten(), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "abc\n").expect("write");
        assert_eq!(
            token(&args(None, Some(file.clone())))
                .ok()
                .flatten()
                .as_deref(),
            Some("abc")
        );
        std::fs::write(&file, "\n").expect("write");
        assert!(matches!(
            token(&args(None, Some(file))),
            Err(TailError::EmptyTokenFile(_))
        ));
        assert!(matches!(
            token(&args(None, Some(dir.path().join("missing")))),
            Err(TailError::TokenFile { .. })
        ));
    }
}
