// pgrelay-client.js: a dependency-free browser client for pgrelay's streams,
// over WebSocket or Server-Sent Events. Served by pgrelay at /pgrelay-client.js
// (embedded in the binary).
//
//   import { PgRelayClient } from "/pgrelay-client.js";
//
//   const client = new PgRelayClient({
//     url: "/ws/notifications/",          // or "/ws/dashboard/", "/ws/businesses/42/", a full URL
//     transport: "sse",                   // optional: "websocket" (default) or "sse"
//     getToken: async () => fetchAccessToken(),   // Promise<string>
//     storageKey: "pgrelay:cursor:42",    // optional: keep the cursor in localStorage
//   });
//   client.on("event", (e) => console.log(e.id, e.table, e.op, e.data));
//   client.on("reset", () => reloadStateFromYourApi());
//   client.start();
//
// Options (all but getToken/token optional):
//   url          stream URL; a path is resolved against the page. The transport
//                picks the scheme (ws(s) or http(s)) and a leading /ws/ or /sse/
//                in the path, so one url serves both: "/ws/businesses/42/" and
//                "/sse/businesses/42/" name the same stream
//   transport    "websocket" (default) or "sse" (EventSource: for networks whose
//                proxies break WebSockets; the same events, the same resume)
//   getToken()   returns a Promise<string> of a valid JWT. Called when there is no
//                token yet, before the current one expires (WebSocket: the fresh
//                token is sent in-band as {"type":"refresh","token":...}), after a
//                4001 close, and after failed handshakes (a refused token looks
//                like one: after two in a row over WebSocket, after one refused
//                EventSource)
//   token        an initial token (getToken is then only needed for refreshes)
//   lastId       start cursor: replay every retained event after this id (0 = the
//                whole retained log); default: none, i.e. start live at hello.last_id
//   epoch        the epoch that lastId belongs to (from an earlier hello)
//   storageKey   localStorage key under which {lastId, epoch} is kept, so a reload
//                resumes where the page left off (it wins over lastId/epoch)
//   minDelayMs   first reconnect delay cap, default 500
//   maxDelayMs   reconnect delay cap, default 30000 (full jitter: random in [0, cap])
//   refreshLeadMs  how long before `exp` to refresh, default 60000 (at most half
//                the token's remaining lifetime; WebSocket only)
//   WebSocket    a WebSocket constructor (default globalThis.WebSocket)
//   EventSource  an EventSource constructor (default globalThis.EventSource)
//
// Over SSE the token travels as ?token= (an EventSource cannot set headers;
// pgrelay redacts it from its logs) and the stream cannot be refreshed in-band:
// pgrelay ends it at `exp` with a 4001 close event and the client reconnects
// with a fresh token. While a stream is up, a lost connection is resumed by the
// browser itself (EventSource sends Last-Event-ID, EPOCH:ID of the last event);
// a close event or a refused EventSource (HTTP 401/403/..., which ends it) is
// handled like a WebSocket close: the client opens a new one with
// ?last_id=&epoch= from the last event it saw, so nothing is lost either way.
//
// Events (client.on(type, fn) returns an unsubscribe function; also off, once):
//   connected     {hello, resumed, read}   after the server's hello; resumed = a cursor
//                 was sent; read = {upTo, unread} from hello's read_up_to and unread
//                 (the bell's read cursor and unread count, when the url asks with
//                 ?unread=1, e.g. "/ws/notifications/?unread=1"; unread is capped at
//                 UNREAD_CAP = 100: show "99+"), else null
//   read          a read frame {type: "read", stream, up_to, ids, cleared_through}: the
//                 user's read state on `stream` changed (here, on another tab or
//                 device, or on another replica); also the answer of a POST made by
//                 markRead/markItemsRead/clearAll without a socket. An item is read
//                 when id <= up_to or ids includes it, hidden when id <= cleared_through
//   event         the event frame {type, id, channel, table, op, at, data}; each id
//                 once, in increasing order, across reconnects
//   reset         {reason, hello}    the cursor could not be honoured (epoch changed,
//                 older than retention, unknown): reload your state, then keep going;
//                 the cursor continues from hello.last_id
//   disconnected  {code, reason, retryInMs, opened}  the connection closed; retryInMs
//                 is null after stop(). opened = false when the handshake never
//                 succeeded (network down, or HTTP 401/403, which browsers do not
//                 reveal). Over SSE, a connection the browser is retrying by itself
//                 reports code 1006 and its usual retry delay (about 3 s)
//   error         {kind, error}      kind "token": getToken failed or returned nothing
//
// Close codes (a WebSocket close frame, or SSE's `event: close` with
// {"type":"close","code":...,"reason":...}): 4001 (token expired or refresh
// refused): a new token is fetched and the client reconnects at once. 4008 (too
// slow): reconnects at once with last_id. 1001 (server shutting down), 1011/1013
// (retry later), 1012 (log reset) and anything else: reconnects with capped
// exponential backoff and full jitter. A connection that stayed up for 10 s
// resets the backoff. The browser's "online" event cuts a pending wait short.
//
// Properties: state ("idle" | "connecting" | "open" | "waiting" | "stopped"),
// transport, lastId, epoch, hello (the latest hello frame). Methods: start(),
// stop(), reconnectNow().
//
// The bell (read state kept by the server, per user and stream; the stream is
// the one `url` names):
//   markRead(upTo)       everything up to event id upTo is read
//   markItemsRead(ids)   those items are read (sent 100 at a time)
//   clearAll()           everything up to the newest event is read and hidden
//                        from history
//   Each sends {"type":"read",...} or {"type":"clear"} on the open WebSocket
//   (resolving to null: the new state arrives as a `read` frame), else POSTs
//   it to /read/STREAM with the current token (over SSE, or while
//   disconnected), resolving to the answered read frame, also emitted as `read`.
//   An id beyond the newest event is refused: the socket is closed with 1008
//   (and the client reconnects), a POST rejects with err.status 400.
//   history({before, limit})  GET /history/STREAM: {events (newest first),
//                        next_before (the next page's `before`, or null), read
//                        ({up_to, ids, cleared_through})}; limit 1..100, default 50
// Option `fetch` (default globalThis.fetch) is what POSTs and GETs.

const STABLE_MS = 10_000;
/** What browsers wait before an EventSource reconnects by itself (Chromium: 3 s). */
const SSE_RETRY_MS = 3_000;
const TRANSPORTS = ["websocket", "sse"];

/** The JWT payload, decoded without verification (display and `exp` only). */
export function decodeJwt(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** Milliseconds until the token's `exp`, or null when it has none. */
function msUntilExpiry(token) {
  const exp = decodeJwt(token)?.exp;
  return typeof exp === "number" ? exp * 1000 - Date.now() : null;
}

/**
 * The stream URL for a transport, with the resume parameters (and without
 * stale ones): ws(s):// and /ws/... for "websocket", http(s):// and /sse/...
 * for "sse", whichever of the two `url` names; `token` is added as ?token=
 * (SSE only: a WebSocket sends it as a subprotocol).
 */
export function streamUrl(url, lastId, epoch, { transport = "websocket", token = null } = {}) {
  const base = globalThis.location?.href ?? "http://localhost/";
  const u = new URL(url, base);
  const sse = transport === "sse";
  const schemes = sse ? { "ws:": "http:", "wss:": "https:" } : { "http:": "ws:", "https:": "wss:" };
  if (schemes[u.protocol]) u.protocol = schemes[u.protocol];
  const [from, to] = sse ? ["/ws/", "/sse/"] : ["/sse/", "/ws/"];
  if (u.pathname.startsWith(from)) u.pathname = to + u.pathname.slice(from.length);
  u.searchParams.delete("last_id");
  u.searchParams.delete("epoch");
  if (lastId !== null && lastId !== undefined) {
    u.searchParams.set("last_id", String(lastId));
    if (epoch) u.searchParams.set("epoch", epoch);
  }
  if (token) u.searchParams.set("token", token);
  return u.toString();
}

/**
 * The bell's HTTP URL for a stream URL: `kind` "history" or "read" in place
 * of its /ws/ or /sse/ prefix, http(s) in place of ws(s), without query.
 */
export function bellUrl(url, kind) {
  const base = globalThis.location?.href ?? "http://localhost/";
  const u = new URL(url, base);
  const schemes = { "ws:": "http:", "wss:": "https:" };
  if (schemes[u.protocol]) u.protocol = schemes[u.protocol];
  const m = u.pathname.match(/^\/(?:ws|sse)\/(.*)$/);
  if (!m) throw new TypeError(`PgRelayClient: ${url} is not a /ws/ or /sse/ stream URL`);
  u.pathname = `/${kind}/${m[1]}`;
  u.search = "";
  u.hash = "";
  return u.toString();
}

/** The most a `read` message may name, and hello's unread cap. */
export const MAX_READ_IDS = 100;
export const UNREAD_CAP = 100;

/** Full jitter: a random delay in [0, min(max, min * 2^attempt)]. */
export function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

export class PgRelayClient {
  constructor(options = {}) {
    if (!options.url) throw new TypeError("PgRelayClient: url is required");
    if (!options.getToken && !options.token) {
      throw new TypeError("PgRelayClient: getToken or token is required");
    }
    this.options = {
      minDelayMs: 500,
      maxDelayMs: 30_000,
      refreshLeadMs: 60_000,
      ...options,
    };
    this.transport = options.transport ?? "websocket";
    if (!TRANSPORTS.includes(this.transport)) {
      throw new TypeError(`PgRelayClient: transport must be "websocket" or "sse", not ${JSON.stringify(this.transport)}`);
    }
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.EventSource = options.EventSource ?? globalThis.EventSource;
    this.token = options.token ?? null;
    this.lastId = options.lastId ?? null;
    this.epoch = options.epoch ?? null;
    this.hello = null;
    this.readUpTo = null; // hello's read_up_to (the bell's cursor), when it carries one
    this.unread = null; // hello's unread count (at most UNREAD_CAP)
    this.state = "idle";
    this._listeners = new Map();
    this._ws = null; // the WebSocket
    this._es = null; // or the EventSource
    this._attempt = 0; // consecutive reconnects without a stable connection
    this._failedHandshakes = 0;
    this._needToken = !this.token;
    this._timer = null; // the pending reconnect
    this._refreshTimer = null;
    this._saveTimer = null;
    this._generation = 0; // bumps on every connect/stop; stale callbacks check it
    this._onOnline = () => {
      if (this.state === "waiting") this.reconnectNow();
    };
    this._onPageHide = () => this._saveCursor(true);
    this._loadCursor();
  }

  // --- the tiny emitter ---------------------------------------------------

  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  once(type, fn) {
    const off = this.on(type, (detail) => {
      off();
      fn(detail);
    });
    return off;
  }

  _emit(type, detail) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(detail);
      } catch (e) {
        // A listener's bug must not break the connection loop.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  // --- lifecycle ----------------------------------------------------------

  start() {
    if (this.state !== "idle" && this.state !== "stopped") return;
    globalThis.addEventListener?.("online", this._onOnline);
    globalThis.addEventListener?.("pagehide", this._onPageHide);
    this._connect();
  }

  stop() {
    this._generation++;
    clearTimeout(this._timer);
    clearTimeout(this._refreshTimer);
    globalThis.removeEventListener?.("online", this._onOnline);
    globalThis.removeEventListener?.("pagehide", this._onPageHide);
    this._saveCursor(true);
    const hadConnection = this._dropConnection(1000, "client stopped");
    const wasOpen = this.state === "open";
    this.state = "stopped";
    if (hadConnection && wasOpen) {
      this._emit("disconnected", { code: 1000, reason: "client stopped", retryInMs: null, opened: true });
    }
  }

  /** Closes the current WebSocket or EventSource without hearing from it again. */
  _dropConnection(code, reason) {
    const ws = this._ws;
    const es = this._es;
    this._ws = null;
    this._es = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch {
        // already closing
      }
    }
    if (es) {
      es.onopen = es.onerror = null;
      es.close();
    }
    return Boolean(ws || es);
  }

  /** Skips a pending backoff wait (or drops the current socket) and connects now. */
  reconnectNow() {
    if (this.state === "stopped" || this.state === "idle") return;
    clearTimeout(this._timer);
    this._dropConnection(1000, "reconnecting");
    this._connect();
  }

  async _connect() {
    const generation = ++this._generation;
    this.state = "connecting";
    let token;
    try {
      token = await this._currentToken();
    } catch (error) {
      if (generation !== this._generation) return;
      this._emit("error", { kind: "token", error });
      this._scheduleReconnect({ code: 0, reason: "no token", opened: false }, "backoff");
      return;
    }
    if (generation !== this._generation) return;
    const url = streamUrl(this.options.url, this.lastId, this.epoch, {
      transport: this.transport,
      token: this.transport === "sse" ? token : null,
    });
    // What this one connection has seen.
    const conn = { token, openedAt: null, helloSeen: false, resumed: this.lastId !== null };
    try {
      if (this.transport === "sse") this._openEventSource(generation, url, conn);
      else this._openWebSocket(generation, url, conn);
    } catch (error) {
      // A malformed URL will not fix itself; report it and stop.
      this.state = "stopped";
      this._emit("error", { kind: "url", error });
    }
  }

  _openWebSocket(generation, url, conn) {
    const ws = new this.WebSocket(url, ["bearer", conn.token]);
    this._ws = ws;
    ws.onopen = () => {
      conn.openedAt = Date.now();
    };
    ws.onmessage = (message) => {
      if (generation === this._generation) this._frame(message.data, conn);
    };
    ws.onerror = () => {
      // Always followed by onclose, which decides what to do.
    };
    ws.onclose = (close) => {
      if (generation !== this._generation) return;
      this._ws = null;
      if (!conn.helloSeen) {
        // Network down, or a refusal (401/403) that browsers hide: after two
        // in a row, fetch a fresh token in case ours is the problem.
        this._failedHandshakes++;
        if (this._failedHandshakes >= 2 && this.options.getToken) this._needToken = true;
      }
      this._closed(close.code, close.reason, conn);
    };
  }

  _openEventSource(generation, url, conn) {
    const es = new this.EventSource(url);
    this._es = es;
    es.onopen = () => {
      conn.openedAt = Date.now();
    };
    const onFrame = (message) => {
      if (generation !== this._generation || this._es !== es) return;
      this._frame(message.data, conn);
      if (message.type === "read") this._sawReadId(message.lastEventId);
    };
    for (const type of ["hello", "event", "reset", "read"]) es.addEventListener(type, onFrame);
    // Where a socket gets a close frame: the same code and reason, then the
    // stream ends. Ours to act on, not the browser's silent retry.
    es.addEventListener("close", (message) => {
      if (generation !== this._generation || this._es !== es) return;
      let frame = null;
      try {
        frame = JSON.parse(message.data);
      } catch {
        frame = null;
      }
      this._es = null;
      es.onopen = es.onerror = null;
      es.close();
      this._closed(Number(frame?.code ?? 1005), String(frame?.reason ?? ""), conn);
    });
    es.onerror = () => {
      if (generation !== this._generation || this._es !== es) return;
      clearTimeout(this._refreshTimer);
      if (es.readyState === 2) {
        // CLOSED: the browser gave up, which it does on an HTTP refusal (401
        // expired token, 403, 404, 503 busy). Ours to retry, with a fresh token.
        this._es = null;
        es.onopen = es.onerror = null;
        es.close();
        this._failedHandshakes++;
        if (this.options.getToken) this._needToken = true;
        this._closed(1006, "event stream refused or failed", conn, { refused: true });
        return;
      }
      // CONNECTING: the browser reconnects by itself and sends Last-Event-ID,
      // so nothing is lost; the next hello is a resume.
      const opened = conn.helloSeen;
      if (opened && conn.openedAt !== null && Date.now() - conn.openedAt >= STABLE_MS) this._attempt = 0;
      conn.helloSeen = false;
      conn.openedAt = null;
      conn.resumed = true;
      if (!opened) this._failedHandshakes++;
      this.state = "waiting";
      this._emit("disconnected", { code: 1006, reason: "connection lost: the browser reconnects", retryInMs: SSE_RETRY_MS, opened });
    };
  }

  /** One frame's JSON from either transport. */
  _frame(data, conn) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return; // not ours to judge; pgrelay only sends JSON
    }
    switch (frame?.type) {
      case "hello":
        conn.helloSeen = true;
        if (conn.openedAt === null) conn.openedAt = Date.now();
        this.hello = frame;
        this.epoch = frame.epoch ?? this.epoch;
        // No cursor yet: every event above hello.last_id will reach us.
        if (this.lastId === null) this.lastId = frame.last_id;
        this._failedHandshakes = 0;
        this.state = "open";
        this._saveCursor();
        this._scheduleRefresh(conn.token);
        {
          const read = typeof frame.read_up_to === "number"
            ? { upTo: frame.read_up_to, unread: typeof frame.unread === "number" ? frame.unread : null }
            : null;
          this.readUpTo = read?.upTo ?? null;
          this.unread = read?.unread ?? null;
          this._emit("connected", { hello: frame, resumed: conn.resumed, read });
        }
        break;
      case "reset":
        // The server continues from hello.last_id; so do we (it may be lower
        // than the old cursor after a restore: ids restart with the epoch).
        if (this.hello) this.lastId = this.hello.last_id;
        this._saveCursor();
        this._emit("reset", { reason: frame.reason, hello: this.hello });
        break;
      case "event":
        if (typeof frame.id !== "number") return;
        if (this.lastId !== null && frame.id <= this.lastId) return; // duplicate
        this.lastId = frame.id;
        this._saveCursor();
        this._emit("event", frame);
        break;
      case "read":
        if (typeof frame.up_to !== "number") return;
        this._emit("read", frame);
        break;
      default:
        break;
    }
  }

  /** A connection ended with `code`: decide how soon, and with which token, to come back. */
  _closed(code, reason, conn, { refused = false } = {}) {
    clearTimeout(this._refreshTimer);
    const opened = conn.helloSeen;
    if (conn.openedAt !== null && Date.now() - conn.openedAt >= STABLE_MS) this._attempt = 0;
    let how = "backoff";
    if (opened && !refused && code === 4001) {
      this._needToken = true;
      how = "now";
    } else if (opened && !refused && code === 4008) {
      how = "now";
    }
    this._scheduleReconnect({ code, reason, opened }, how);
  }

  _scheduleReconnect(detail, how) {
    const delay =
      how === "now" && this._attempt === 0
        ? 0
        : backoffDelay(this._attempt, this.options.minDelayMs, this.options.maxDelayMs);
    this._attempt++;
    this.state = "waiting";
    const generation = this._generation;
    this._timer = setTimeout(() => {
      if (generation === this._generation) this._connect();
    }, delay);
    this._emit("disconnected", { ...detail, retryInMs: delay });
  }

  // --- tokens -------------------------------------------------------------

  async _currentToken() {
    const left = this.token ? msUntilExpiry(this.token) : null;
    const stale = left !== null && left < 5_000;
    if (this.options.getToken && (this._needToken || !this.token || stale)) {
      const fresh = await this.options.getToken();
      if (!fresh || typeof fresh !== "string") throw new Error("getToken returned no token");
      this.token = fresh;
      this._needToken = false;
    }
    if (!this.token) throw new Error("no token");
    return this.token;
  }

  _scheduleRefresh(token) {
    clearTimeout(this._refreshTimer);
    // An event stream cannot take a token in-band: it ends at `exp` with a
    // 4001 close event and reconnects with a fresh one.
    if (!this.options.getToken || this.transport !== "websocket") return;
    const left = msUntilExpiry(token);
    if (left === null) return;
    const lead = Math.min(this.options.refreshLeadMs, left / 2);
    const generation = this._generation;
    this._refreshTimer = setTimeout(async () => {
      let fresh;
      try {
        fresh = await this.options.getToken();
      } catch (error) {
        // The server closes with 4001 at `exp`; the reconnect asks again.
        if (generation === this._generation) this._emit("error", { kind: "token", error });
        return;
      }
      if (generation !== this._generation || !fresh || fresh === this.token) return;
      this.token = fresh;
      if (this._ws && this._ws.readyState === 1) {
        this._ws.send(JSON.stringify({ type: "refresh", token: fresh }));
      }
      this._scheduleRefresh(fresh);
    }, Math.min(Math.max(0, left - lead), 2 ** 31 - 1));
  }

  // --- the bell: read state and history --------------------------------------

  /** Everything up to event id `upTo` is read. */
  markRead(upTo) {
    if (!Number.isSafeInteger(upTo) || upTo < 0) {
      return Promise.reject(new TypeError("markRead: upTo must be a non-negative integer"));
    }
    return this._mark([{ type: "read", up_to: upTo }]);
  }

  /** Those items (event ids) are read. */
  markItemsRead(ids) {
    const list = [...new Set(Array.from(ids ?? []))];
    if (!list.length || !list.every((id) => Number.isSafeInteger(id) && id > 0)) {
      return Promise.reject(new TypeError("markItemsRead: ids must be positive integers, at least one"));
    }
    const messages = [];
    for (let i = 0; i < list.length; i += MAX_READ_IDS) {
      messages.push({ type: "read", ids: list.slice(i, i + MAX_READ_IDS) });
    }
    return this._mark(messages);
  }

  /** Everything up to the newest event is read and hidden from history. */
  clearAll() {
    return this._mark([{ type: "clear" }]);
  }

  /** Sends `messages` on the open WebSocket, or POSTs them one by one. */
  async _mark(messages) {
    const ws = this._ws;
    if (ws && ws.readyState === 1 && this.state === "open") {
      for (const message of messages) ws.send(JSON.stringify(message));
      return null;
    }
    let answer = null;
    for (const message of messages) {
      answer = await this._request("read", { method: "POST", body: JSON.stringify(message) });
      if (answer?.type === "read") this._emit("read", answer);
    }
    return answer;
  }

  /** A page of the stream's history, newest first: {events, next_before, read}. */
  history({ before = null, limit = null } = {}) {
    const query = new URLSearchParams();
    if (before !== null && before !== undefined) query.set("before", String(before));
    if (limit !== null && limit !== undefined) query.set("limit", String(limit));
    const q = query.toString();
    return this._request("history", { method: "GET" }, q ? `?${q}` : "");
  }

  /** GET or POST the bell's `kind` URL with the current token; the JSON answer. */
  async _request(kind, init, query = "") {
    const fetchFn = this.options.fetch ?? globalThis.fetch;
    const url = bellUrl(this.options.url, kind) + query;
    const token = await this._currentToken();
    const headers = { authorization: `Bearer ${token}`, accept: "application/json" };
    if (init.body !== undefined) headers["content-type"] = "application/json";
    const response = await fetchFn(url, { ...init, headers });
    const text = await response.text();
    if (!response.ok) {
      const error = new Error(`${init.method} ${new URL(url).pathname}: ${response.status} ${text.trim()}`);
      error.status = response.status;
      if (response.status === 401 && this.options.getToken) this._needToken = true;
      throw error;
    }
    return JSON.parse(text);
  }

  /** An SSE read event's id (EPOCH:ID) moves the cursor: it is a position in the log. */
  _sawReadId(lastEventId) {
    const text = String(lastEventId ?? "");
    const at = text.lastIndexOf(":");
    const id = Number(at >= 0 ? text.slice(at + 1) : text);
    const epoch = at >= 0 ? text.slice(0, at) : null;
    if (!text || !Number.isSafeInteger(id) || (epoch && this.epoch && epoch !== this.epoch)) return;
    if (this.lastId === null || id > this.lastId) {
      this.lastId = id;
      this._saveCursor();
    }
  }

  // --- the cursor in localStorage -------------------------------------------

  _loadCursor() {
    const key = this.options.storageKey;
    if (!key) return;
    try {
      const saved = JSON.parse(globalThis.localStorage?.getItem(key) ?? "null");
      if (saved && typeof saved.lastId === "number") {
        this.lastId = saved.lastId;
        this.epoch = typeof saved.epoch === "string" ? saved.epoch : null;
      }
    } catch {
      // unreadable: start without it
    }
  }

  _saveCursor(now = false) {
    const key = this.options.storageKey;
    if (!key || this.lastId === null) return;
    const write = () => {
      this._saveTimer = null;
      try {
        globalThis.localStorage?.setItem(key, JSON.stringify({ lastId: this.lastId, epoch: this.epoch }));
      } catch {
        // storage full or disabled: the in-memory cursor still works
      }
    };
    if (now) {
      clearTimeout(this._saveTimer);
      write();
    } else if (!this._saveTimer) {
      // Coalesced: a busy stream writes a few times a second, not per event.
      this._saveTimer = setTimeout(write, 250);
    }
  }
}
