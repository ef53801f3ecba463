// Unit tests for src/web/pgrelay-client.js (the page's JS client) in Node,
// with a fake WebSocket, a fake EventSource and mocked timers: the paths the
// browser test cannot provoke (close codes 4001/4008/1001, token refresh
// before exp, reset, backoff), over both transports.
// Run: cd tests/browser && node --test

import { test, mock, beforeEach, afterEach } from "node:test";
import assert from "node:assert/strict";
import { PgRelayClient, backoffDelay, bellUrl, decodeJwt, streamUrl } from "../../src/web/pgrelay-client.js";

const URL_ = "ws://relay.test/ws/dashboard/";
const NOW = Date.UTC(2026, 10, 25, 12, 0, 0);

class FakeWebSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    FakeWebSocket.all.push(this);
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code, reason) { this.readyState = 3; this.closedWith = { code, reason }; }
  // What the server does:
  hello(last_id, epoch = "e1") {
    this.readyState = 1;
    this.onopen?.({});
    this.receive({ type: "hello", stream: "dashboard", user: "1", last_id, epoch });
  }
  receive(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  event(id) { this.receive({ type: "event", id, channel: "c", table: "t", op: "INSERT", at: "x", data: {} }); }
  drop(code, reason = "") { this.readyState = 3; this.onclose?.({ code, reason }); }
}
const last = () => FakeWebSocket.all.at(-1);

/** An EventSource as the spec has it: named events, readyState 0/1/2, retries by itself. */
class FakeEventSource {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.listeners = new Map();
    FakeEventSource.all.push(this);
  }
  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(fn);
  }
  close() { this.readyState = 2; this.closed = true; }
  dispatch(type, frame, lastEventId = "") {
    for (const fn of this.listeners.get(type) ?? []) fn({ type, data: JSON.stringify(frame), lastEventId });
  }
  // What the server (and the browser) do:
  hello(last_id, epoch = "e1") {
    this.readyState = 1;
    this.onopen?.({});
    this.dispatch("hello", { type: "hello", stream: "businesses", key: "42", user: "2", last_id, epoch });
  }
  event(id) { this.dispatch("event", { type: "event", id, channel: "c", table: "t", op: "INSERT", at: "x", data: {} }); }
  serverClose(code, reason = "") { this.dispatch("close", { type: "close", code, reason }); }
  /** The connection dropped: the browser will retry by itself. */
  lost() { this.readyState = 0; this.onerror?.({}); }
  /** An HTTP refusal (401/403/...): the browser gives up. */
  refused() { this.readyState = 2; this.onerror?.({}); }
}
const lastEs = () => FakeEventSource.all.at(-1);
const SSE_URL = "http://relay.test/sse/businesses/42/";

function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig`;
}

/** Lets the client's promise chains (getToken) run. */
const settle = () => new Promise((r) => setImmediate(r));

/** A client with a recorder of everything it emits. */
function client(options = {}) {
  const c = new PgRelayClient({ url: URL_, token: "t0", WebSocket: FakeWebSocket, ...options });
  const seen = { events: [], connected: [], disconnected: [], reset: [], error: [] };
  c.on("event", (e) => seen.events.push(e.id));
  c.on("connected", (d) => seen.connected.push(d));
  c.on("disconnected", (d) => seen.disconnected.push(d));
  c.on("reset", (d) => seen.reset.push(d));
  c.on("error", (d) => seen.error.push(d));
  return { c, seen };
}

beforeEach(() => {
  FakeWebSocket.all = [];
  FakeEventSource.all = [];
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: NOW });
  mock.method(Math, "random", () => 0.999);
});

afterEach(() => {
  mock.timers.reset();
  mock.restoreAll();
});

test("pure helpers", () => {
  assert.equal(streamUrl(URL_, null, "e"), URL_);
  assert.equal(streamUrl(URL_, 0, null), `${URL_}?last_id=0`);
  assert.equal(streamUrl(`${URL_}?last_id=3&epoch=x&a=b`, 42, "e f"), `${URL_}?a=b&last_id=42&epoch=e+f`);
  assert.equal(streamUrl("http://h/ws/x/", 1, "e"), "ws://h/ws/x/?last_id=1&epoch=e");
  assert.equal(streamUrl("https://h/ws/x/", null, null), "wss://h/ws/x/");
  assert.equal(backoffDelay(0, 500, 30_000, () => 0.5), 250);
  assert.equal(backoffDelay(3, 500, 30_000, () => 0.5), 2000);
  assert.equal(backoffDelay(50, 500, 30_000, () => 0.5), 15_000);
  assert.equal(decodeJwt(jwt({ sub: "1", role: "super_admin" })).role, "super_admin");
  // One url serves both transports: the transport picks scheme and prefix.
  const sse = { transport: "sse" };
  assert.equal(streamUrl("ws://h/ws/businesses/42/", 3, "e", sse), "http://h/sse/businesses/42/?last_id=3&epoch=e");
  assert.equal(streamUrl("wss://h/ws/x/", null, null, sse), "https://h/sse/x/");
  assert.equal(streamUrl("http://h/sse/businesses/42/", null, null, sse), "http://h/sse/businesses/42/");
  assert.equal(streamUrl("http://h/sse/businesses/42/", null, null), "ws://h/ws/businesses/42/");
  assert.equal(streamUrl("http://h/sse/x/?token=old", 1, "e", { transport: "sse", token: "t" }), "http://h/sse/x/?token=t&last_id=1&epoch=e");
  assert.throws(() => new PgRelayClient({ url: URL_, token: "t", transport: "carrier pigeon" }), TypeError);
  assert.equal(decodeJwt("not a token"), null);
});

test("bearer subprotocol, live from hello.last_id, duplicates dropped", async () => {
  const { c, seen } = client();
  c.start();
  await settle();
  assert.equal(last().url, URL_);
  assert.deepEqual(last().protocols, ["bearer", "t0"]);
  last().hello(10);
  assert.equal(seen.connected[0].resumed, false);
  assert.equal(c.state, "open");
  for (const id of [9, 10, 11, 11, 12]) last().event(id);
  assert.deepEqual(seen.events, [11, 12]);
  c.stop();
});

test("a dropped socket resumes with last_id and epoch after a jittered backoff", async () => {
  const { c, seen } = client();
  c.start();
  await settle();
  last().hello(10, "ep");
  last().event(11);
  last().drop(1006);
  assert.equal(seen.disconnected[0].retryInMs, 499); // full jitter under 500 ms at first
  assert.equal(c.state, "waiting");
  mock.timers.tick(499);
  await settle();
  assert.equal(FakeWebSocket.all.length, 2);
  assert.equal(last().url, `${URL_}?last_id=11&epoch=ep`);
  last().hello(20, "ep");
  assert.equal(seen.connected[1].resumed, true);
  for (const id of [11, 12, 13]) last().event(id);
  assert.deepEqual(seen.events, [11, 12, 13]);
  c.stop();
});

test("reset: emitted, and the cursor continues from hello.last_id (even downwards)", async () => {
  const { c, seen } = client({ lastId: 500, epoch: "old" });
  c.start();
  await settle();
  assert.equal(last().url, `${URL_}?last_id=500&epoch=old`);
  last().hello(7, "new");
  last().receive({ type: "reset", reason: "epoch_mismatch" });
  assert.equal(seen.reset[0].reason, "epoch_mismatch");
  last().event(8);
  assert.deepEqual(seen.events, [8]);
  assert.deepEqual([c.lastId, c.epoch], [8, "new"]);
  c.stop();
});

test("4001 asks for a new token and reconnects at once", async () => {
  let n = 0;
  const getToken = mock.fn(async () => `t${++n}`);
  const { c, seen } = client({ token: undefined, getToken });
  c.start();
  await settle();
  assert.deepEqual(last().protocols, ["bearer", "t1"]);
  last().hello(0);
  last().drop(4001, "token expired");
  assert.equal(seen.disconnected[0].retryInMs, 0);
  mock.timers.tick(0);
  await settle();
  assert.equal(getToken.mock.callCount(), 2);
  assert.deepEqual(last().protocols, ["bearer", "t2"]);
  c.stop();
});

test("4008 reconnects at once; a repeat backs off; 1001 backs off", async () => {
  const { c, seen } = client();
  c.start();
  await settle();
  last().hello(0);
  last().event(1);
  last().drop(4008);
  assert.equal(seen.disconnected.at(-1).retryInMs, 0);
  mock.timers.tick(0);
  await settle();
  assert.equal(last().url, `${URL_}?last_id=1&epoch=e1`);
  last().hello(5);
  last().drop(4008); // again within 10 s: no longer immediate
  assert.equal(seen.disconnected.at(-1).retryInMs, 999);
  mock.timers.tick(999);
  await settle();
  last().hello(5);
  mock.timers.tick(10_000); // stable: the backoff starts over
  last().drop(1001, "server shutting down");
  assert.equal(seen.disconnected.at(-1).retryInMs, 499);
  c.stop();
});

test("failed handshakes back off exponentially up to the cap and refetch the token", async () => {
  const getToken = mock.fn(async () => "fresh");
  const { c, seen } = client({ getToken, maxDelayMs: 4000 });
  c.start();
  await settle();
  for (let i = 0; i < 5; i++) {
    last().drop(1006);
    mock.timers.tick(seen.disconnected.at(-1).retryInMs);
    await settle();
  }
  assert.deepEqual(seen.disconnected.map((d) => d.retryInMs), [499, 999, 1998, 3996, 3996]);
  assert.ok(seen.disconnected.every((d) => d.opened === false));
  assert.ok(getToken.mock.callCount() >= 1, "a refused token may be the cause: ask for a new one");
  assert.deepEqual(last().protocols, ["bearer", "fresh"]);
  c.stop();
});

test("the token is refreshed in-band before exp", async () => {
  const exp = NOW / 1000 + 120;
  const fresh = jwt({ sub: "1", exp: exp + 3600 });
  const getToken = mock.fn(async () => fresh);
  const { c } = client({ token: jwt({ sub: "1", exp }), getToken });
  c.start();
  await settle();
  last().hello(0);
  mock.timers.tick(59_000);
  await settle();
  assert.deepEqual(last().sent, []);
  mock.timers.tick(1_000); // 60 s before exp
  await settle();
  assert.deepEqual(last().sent, [{ type: "refresh", token: fresh }]);
  c.stop();
});

test("storageKey keeps the cursor across clients; stop() does not reconnect", async () => {
  const store = new Map();
  globalThis.localStorage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v) };
  try {
    const { c, seen } = client({ storageKey: "cursor" });
    c.start();
    await settle();
    last().hello(3, "ep");
    last().event(4);
    mock.timers.tick(250);
    assert.deepEqual(JSON.parse(store.get("cursor")), { lastId: 4, epoch: "ep" });
    c.stop();
    assert.equal(last().closedWith.code, 1000);
    assert.equal(seen.disconnected.at(-1).retryInMs, null);
    mock.timers.tick(60_000);
    assert.equal(FakeWebSocket.all.length, 1);

    const { c: again } = client({ storageKey: "cursor" });
    again.start();
    await settle();
    assert.equal(last().url, `${URL_}?last_id=4&epoch=ep`);
    again.stop();
  } finally {
    delete globalThis.localStorage;
  }
});

// ------------------------------------------------------------------ SSE

function sseClient(options = {}) {
  return client({ url: SSE_URL, transport: "sse", EventSource: FakeEventSource, WebSocket: undefined, ...options });
}

test("sse: token and cursor in the URL, the same events, duplicates dropped", async () => {
  const { c, seen } = sseClient({ lastId: 0 });
  c.start();
  await settle();
  assert.equal(FakeWebSocket.all.length, 0);
  assert.equal(lastEs().url, `${SSE_URL}?last_id=0&token=t0`);
  lastEs().hello(10, "ep");
  assert.equal(c.state, "open");
  assert.equal(seen.connected[0].resumed, true);
  assert.equal(seen.connected[0].hello.key, "42");
  for (const id of [3, 4, 4, 2, 11]) lastEs().event(id);
  assert.deepEqual(seen.events, [3, 4, 11]);
  assert.deepEqual([c.lastId, c.epoch], [11, "ep"]);
  c.stop();
  assert.ok(lastEs().closed, "stop() closes the EventSource");
  assert.equal(seen.disconnected.at(-1).retryInMs, null);
});

test("sse: a lost connection is the browser's to resume; the client waits for its hello", async () => {
  const { c, seen } = sseClient();
  c.start();
  await settle();
  assert.equal(lastEs().url, `${SSE_URL}?token=t0`);
  lastEs().hello(10, "ep");
  lastEs().event(11);
  lastEs().lost();
  assert.equal(c.state, "waiting");
  assert.deepEqual(seen.disconnected.at(-1), { code: 1006, reason: "connection lost: the browser reconnects", retryInMs: 3000, opened: true });
  mock.timers.tick(60_000);
  assert.equal(FakeEventSource.all.length, 1, "no second EventSource: the browser retries with Last-Event-ID");
  lastEs().lost(); // a retry that failed too
  assert.equal(seen.disconnected.at(-1).opened, false);
  lastEs().hello(12, "ep"); // resumed from Last-Event-ID: ep:11
  assert.equal(c.state, "open");
  assert.equal(seen.connected.at(-1).resumed, true);
  for (const id of [11, 12]) lastEs().event(id);
  assert.deepEqual(seen.events, [11, 12]);
  c.stop();
});

test("sse: close 4001 reconnects at once with a fresh token and the last event's cursor", async () => {
  let n = 0;
  const getToken = mock.fn(async () => `t${++n}`);
  const { c, seen } = sseClient({ token: undefined, getToken });
  c.start();
  await settle();
  assert.equal(lastEs().url, `${SSE_URL}?token=t1`);
  const first = lastEs();
  first.hello(5, "ep");
  first.event(6);
  first.serverClose(4001, "token expired");
  assert.ok(first.closed, "the ended stream is closed, not left to the browser's retry");
  assert.deepEqual(seen.disconnected.at(-1), { code: 4001, reason: "token expired", opened: true, retryInMs: 0 });
  mock.timers.tick(0);
  await settle();
  assert.equal(getToken.mock.callCount(), 2);
  assert.equal(FakeEventSource.all.length, 2);
  assert.equal(lastEs().url, `${SSE_URL}?last_id=6&epoch=ep&token=t2`);
  lastEs().hello(9, "ep");
  for (const id of [6, 7]) lastEs().event(id);
  assert.deepEqual(seen.events, [6, 7]);
  c.stop();
});

test("sse: 4008 at once; 1001, 1011, 1012, 1013 back off; all resume from the cursor", async () => {
  const { c, seen } = sseClient();
  c.start();
  await settle();
  lastEs().hello(0, "ep");
  lastEs().event(1);
  lastEs().serverClose(4008, "too slow: reconnect with last_id");
  assert.equal(seen.disconnected.at(-1).retryInMs, 0);
  mock.timers.tick(0);
  await settle();
  assert.equal(lastEs().url, `${SSE_URL}?last_id=1&epoch=ep&token=t0`);
  for (const [i, code] of [1001, 1011, 1012, 1013].entries()) {
    lastEs().hello(1, "ep");
    lastEs().event(2 + i);
    lastEs().serverClose(code, "later");
    const wait = seen.disconnected.at(-1).retryInMs;
    assert.ok(wait > 0, `${code} backs off (${wait} ms)`);
    mock.timers.tick(wait);
    await settle();
    assert.equal(lastEs().url, `${SSE_URL}?last_id=${2 + i}&epoch=ep&token=t0`);
  }
  assert.deepEqual(seen.events, [1, 2, 3, 4, 5]);
  c.stop();
});

test("sse: a refused EventSource (the browser gave up) backs off and asks for a new token", async () => {
  const tokens = ["expired", "fresh"];
  const getToken = mock.fn(async () => tokens.shift());
  const { c, seen } = sseClient({ token: undefined, getToken, lastId: 7, epoch: "ep" });
  c.start();
  await settle();
  assert.equal(lastEs().url, `${SSE_URL}?last_id=7&epoch=ep&token=expired`);
  lastEs().refused();
  assert.ok(lastEs().closed);
  const { retryInMs, opened } = seen.disconnected.at(-1);
  assert.equal(opened, false);
  assert.equal(retryInMs, 499);
  mock.timers.tick(retryInMs);
  await settle();
  assert.equal(getToken.mock.callCount(), 2);
  assert.equal(lastEs().url, `${SSE_URL}?last_id=7&epoch=ep&token=fresh`);
  lastEs().hello(9, "ep");
  assert.equal(c.state, "open");
  c.stop();
});

test("sse: reconnectNow replaces a retrying EventSource with one that carries the cursor", async () => {
  const { c } = sseClient();
  c.start();
  await settle();
  lastEs().hello(3, "ep");
  lastEs().event(4);
  lastEs().lost();
  const retrying = lastEs();
  c.reconnectNow();
  await settle();
  assert.ok(retrying.closed);
  assert.equal(lastEs().url, `${SSE_URL}?last_id=4&epoch=ep&token=t0`);
  retrying.hello(3, "ep"); // a late callback of the old one is ignored
  assert.equal(c.state, "connecting");
  c.stop();
});

// ------------------------------------------------------------------ the bell

/** A fake fetch: records requests, answers from `answer(url, init)` ({status, body}). */
function fakeFetch(answer) {
  const calls = [];
  const fn = async (url, init) => {
    calls.push({ url, method: init.method, headers: init.headers, body: init.body === undefined ? undefined : JSON.parse(init.body) });
    const { status = 200, body } = answer(url, init);
    const text = typeof body === "string" ? body : JSON.stringify(body);
    return { ok: status >= 200 && status < 300, status, text: async () => text };
  };
  fn.calls = calls;
  return fn;
}

const readFrame = (up_to, ids = [], cleared_through = 0, stream = "notifications") =>
  ({ type: "read", stream, up_to, ids, cleared_through });

test("bellUrl: the stream's history and read URLs", () => {
  assert.equal(bellUrl("ws://h/ws/notifications/", "history"), "http://h/history/notifications/");
  assert.equal(bellUrl("wss://h/ws/businesses/42/?last_id=3", "read"), "https://h/read/businesses/42/");
  assert.equal(bellUrl("http://h/sse/dashboard/?token=x", "history"), "http://h/history/dashboard/");
  assert.equal(bellUrl("/ws/notifications/", "read"), "http://localhost/read/notifications/");
  // ?unread=1 asks hello for the count: kept on the stream, not on the bell's URLs.
  assert.equal(bellUrl("/ws/notifications/?unread=1", "history"), "http://localhost/history/notifications/");
  assert.equal(streamUrl("ws://h/ws/notifications/?unread=1", 4, "e"), "ws://h/ws/notifications/?unread=1&last_id=4&epoch=e");
  assert.equal(streamUrl("ws://h/ws/notifications/?unread=1", null, null, { transport: "sse", token: "t" }), "http://h/sse/notifications/?unread=1&token=t");
  assert.throws(() => bellUrl("ws://h/elsewhere/", "read"), TypeError);
});

test("hello's read cursor and unread count; read frames are emitted", async () => {
  const { c, seen } = client({ url: "ws://relay.test/ws/notifications/" });
  const reads = [];
  c.on("read", (r) => reads.push(r));
  c.start();
  await settle();
  last().readyState = 1;
  last().receive({ type: "hello", stream: "notifications", user: "2", last_id: 9, epoch: "e1", read_up_to: 4, unread: 3 });
  assert.deepEqual(seen.connected[0].read, { upTo: 4, unread: 3 });
  assert.deepEqual([c.readUpTo, c.unread], [4, 3]);
  last().receive(readFrame(9, [], 0));
  last().receive({ type: "read" }); // malformed: ignored
  assert.deepEqual(reads, [readFrame(9, [], 0)]);
  // Read frames are not events: the cursor and the events are untouched.
  last().event(10);
  assert.deepEqual(seen.events, [10]);
  c.stop();

  // A hello without read state (the dashboard, a stream key): read is null.
  const other = client();
  other.c.start();
  await settle();
  last().hello(5);
  assert.equal(other.seen.connected[0].read, null);
  assert.equal(other.c.unread, null);
  other.c.stop();
});

test("markRead, markItemsRead, clearAll go over the open WebSocket", async () => {
  const fetch = fakeFetch(() => assert.fail("no HTTP while the socket is open"));
  const { c } = client({ url: "ws://relay.test/ws/notifications/", fetch });
  c.start();
  await settle();
  last().hello(500);
  assert.equal(await c.markRead(7), null);
  assert.equal(await c.markItemsRead([9, 8, 9]), null);
  const many = Array.from({ length: 150 }, (_, i) => i + 1);
  await c.markItemsRead(many);
  await c.clearAll();
  assert.deepEqual(last().sent, [
    { type: "read", up_to: 7 },
    { type: "read", ids: [9, 8] },
    { type: "read", ids: many.slice(0, 100) },
    { type: "read", ids: many.slice(100) },
    { type: "clear" },
  ]);
  await assert.rejects(c.markRead(-1), TypeError);
  await assert.rejects(c.markRead(1.5), TypeError);
  await assert.rejects(c.markItemsRead([]), TypeError);
  await assert.rejects(c.markItemsRead(["3"]), TypeError);
  assert.equal(last().sent.length, 5, "nothing sent for a bad argument");
  c.stop();
});

test("without an open socket they POST /read/STREAM with the token, and emit the answer", async () => {
  const fetch = fakeFetch((url, init) => {
    const body = JSON.parse(init.body);
    if (body.up_to === 99) return { status: 400, body: "read beyond the newest event\n" };
    if (body.type === "clear") return { body: readFrame(12, [], 12) };
    return { body: readFrame(body.up_to ?? 3, body.ids ?? []) };
  });
  const { c } = client({ url: "ws://relay.test/ws/notifications/", token: "t0", fetch });
  const reads = [];
  c.on("read", (r) => reads.push(r));
  // Not started: no socket at all.
  assert.deepEqual(await c.markRead(5), readFrame(5));
  assert.deepEqual(await c.markItemsRead([11]), readFrame(3, [11]));
  assert.deepEqual(await c.clearAll(), readFrame(12, [], 12));
  assert.deepEqual(reads, [readFrame(5), readFrame(3, [11]), readFrame(12, [], 12)]);
  assert.deepEqual(fetch.calls.map((r) => [r.method, r.url, r.headers.authorization, r.body]), [
    ["POST", "http://relay.test/read/notifications/", "Bearer t0", { type: "read", up_to: 5 }],
    ["POST", "http://relay.test/read/notifications/", "Bearer t0", { type: "read", ids: [11] }],
    ["POST", "http://relay.test/read/notifications/", "Bearer t0", { type: "clear" }],
  ]);
  assert.equal(fetch.calls[0].headers["content-type"], "application/json");
  await assert.rejects(c.markRead(99), (e) => e.status === 400 && /beyond the newest/.test(e.message));
  assert.equal(reads.length, 3, "a refusal emits nothing");

  // Connected but the socket is gone (waiting to reconnect): POST too.
  c.start();
  await settle();
  last().hello(20);
  last().drop(1006);
  await c.markRead(6);
  assert.equal(fetch.calls.at(-1).url, "http://relay.test/read/notifications/");
  assert.deepEqual(FakeWebSocket.all[0].sent, []);
  c.stop();
});

test("history GETs /history/STREAM with before and limit", async () => {
  const page = { events: [{ type: "event", id: 8 }], next_before: 8, read: { up_to: 2, ids: [5], cleared_through: 1 } };
  const fetch = fakeFetch(() => ({ body: page }));
  const getToken = mock.fn(async () => "fresh");
  const { c } = client({ url: "/ws/businesses/42/", token: null, getToken, fetch });
  assert.deepEqual(await c.history(), page);
  assert.deepEqual(await c.history({ before: 8, limit: 20 }), page);
  assert.deepEqual(fetch.calls.map((r) => [r.method, r.url, r.headers.authorization]), [
    ["GET", "http://localhost/history/businesses/42/", "Bearer fresh"],
    ["GET", "http://localhost/history/businesses/42/?before=8&limit=20", "Bearer fresh"],
  ]);
  assert.equal(fetch.calls[0].body, undefined);
  const refused = fakeFetch(() => ({ status: 403, body: "not allowed\n" }));
  const other = client({ url: "/ws/businesses/43/", fetch: refused }).c;
  await assert.rejects(other.history(), (e) => e.status === 403);
});

test("over SSE: read events are emitted and move the cursor; marking POSTs", async () => {
  const fetch = fakeFetch(() => ({ body: readFrame(30) }));
  const { c, seen } = client({ url: "ws://relay.test/ws/notifications/", transport: "sse", EventSource: FakeEventSource, fetch });
  const reads = [];
  c.on("read", (r) => reads.push(r));
  c.start();
  await settle();
  lastEs().readyState = 1;
  lastEs().dispatch("hello", { type: "hello", stream: "notifications", user: "2", last_id: 20, epoch: "e1", read_up_to: 0, unread: 100 });
  assert.deepEqual(seen.connected[0].read, { upTo: 0, unread: 100 });
  lastEs().dispatch("read", readFrame(20), "e1:21");
  assert.deepEqual(reads, [readFrame(20)]);
  assert.equal(c.lastId, 21, "a read event is a position in the log");
  lastEs().event(21); // a duplicate of what the cursor passed: dropped
  lastEs().event(22);
  assert.deepEqual(seen.events, [22]);
  lastEs().dispatch("read", readFrame(20), "other-epoch:99");
  assert.equal(c.lastId, 22, "an id from another epoch does not move it");
  await c.markRead(22);
  assert.equal(fetch.calls[0].url, "http://relay.test/read/notifications/");
  assert.equal(fetch.calls[0].headers.authorization, "Bearer t0");
  assert.deepEqual(reads.at(-1), readFrame(30));
  c.stop();
});
