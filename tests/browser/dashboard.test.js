// Browser test for pgrelay's page: the real binary (`pgrelay demo`), Debian's
// headless Chromium driven by playwright-core (no browser download), PostgreSQL
// changed through psql and through the page's demo buttons.
//
// Run (after `cargo build`):
//   cd tests/browser && npm ci && node --test
// Needs: /usr/bin/chromium (apt-get install chromium) and /usr/bin/psql.
// Environment: PGRELAY_BIN (default ../../target/debug/pgrelay from this file),
// CHROMIUM_BIN (/usr/bin/chromium), PSQL_BIN (/usr/bin/psql).
// Screenshots and the demo's log go to test-artifacts/ at the repository root;
// test-artifacts/dashboard.png is the admin dashboard with a few events.
//
// What it proves, as a person would see it, one independent case each (a
// failure hides nothing else): the token leaves the address bar and picks the
// view; a business inserted with psql shows in both admin tabs and the bell
// counts it; "Mark all read" clears the badge (in both tabs); "Create
// business" in one tab updates the other; with pgrelay's LISTEN backend
// terminated, a business committed during the outage still arrives; a tab
// whose network is cut (a TCP proxy in between drops and refuses connections)
// shows that it reconnects, then resumes with last_id and shows what was
// committed meanwhile, once; the read state survives a reload; the owner's
// bell is the same on two devices (browser contexts) at every step: the
// unread badge, "mark all read", an item marked read by hand and "clear all"
// in one show in the other without reload, and a reload or a third device
// restores the same list and badge from the server; more than 99 unread show
// as "99+" from hello's count on every device; under `pgrelay
// serve` the page works without demo buttons. A business's own page
// (/businesses/{id}) shows its owner that business's reservations and updates
// live, and no other business's, over WebSocket and over Server-Sent Events;
// the owner's notifications link to it; over SSE a page whose network is cut
// (the browser's EventSource retrying against a refusing proxy) resumes and
// shows every row inserted meanwhile exactly once.
// One `pgrelay demo` and one Chromium are shared (before/after); each case
// opens its tabs in a fresh browser context (or several: devices), reads the
// counts it starts from (the bell's read state is the server's, per user:
// cases that need a known one mark or clear first), and fails on uncaught
// page errors. Every wait is bounded (15 s), and the demo is stopped with SIGTERM
// at the end, pass or fail.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import { once } from "node:events";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const HERE = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(HERE, "../..");
const BIN = resolve(HERE, process.env.PGRELAY_BIN ?? "../../target/debug/pgrelay");
const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
const PSQL = process.env.PSQL_BIN ?? "/usr/bin/psql";
const ARTIFACTS = join(REPO, "test-artifacts");
const WAIT = 15_000; // every browser wait
const DEMO_START = 90_000; // initdb + install + serve, on a slow CI machine

mkdirSync(ARTIFACTS, { recursive: true });

// ------------------------------------------------------------------ helpers

function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

let demo = null;
let demoLog = "";

/** Starts `pgrelay demo` and returns the links and the psql URL it prints. */
async function startDemo() {
  const port = await freePort();
  demo = spawn(BIN, ["demo", "--listen", `127.0.0.1:${port}`], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, NO_COLOR: "1" },
  });
  let out = "";
  demo.stdout.on("data", (chunk) => { out += chunk; demoLog += chunk; });
  demo.stderr.on("data", (chunk) => { demoLog += chunk; });
  const started = new Promise((resolveStart, reject) => {
    const timer = setTimeout(() => reject(new Error(`pgrelay demo printed no links within ${DEMO_START} ms`)), DEMO_START);
    demo.stdout.on("data", () => {
      if (out.includes("Ctrl-C stops")) { clearTimeout(timer); resolveStart(); }
    });
    demo.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`pgrelay demo exited early (code ${code}, signal ${signal}):\n${demoLog}`));
    });
    demo.once("error", (e) => { clearTimeout(timer); reject(e); });
  });
  await started;
  const find = (re, what) => {
    const m = out.match(re);
    assert.ok(m, `no ${what} in pgrelay demo's output:\n${out}`);
    return m[1];
  };
  return {
    base: `http://127.0.0.1:${port}`,
    admin: find(/admin \(dashboard\):\s+(http\S+)/, "admin link"),
    owner: find(/owner \(user 2\):\s+(http\S+)/, "owner link"),
    customer: find(/customer \(user 3\):\s+(http\S+)/, "customer link"),
    database: find(/psql '([^']+)'/, "psql URL"),
    secret: find(/JWT secret: (\S+)/, "JWT secret"),
  };
}

/** SIGTERM, then SIGKILL if it has not exited within 10 s. */
async function stop(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, "exit");
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

let serve = null;

/** `pgrelay serve` on the demo's database and secret: the page without the demo endpoints. */
async function startServe(links) {
  const port = await freePort();
  serve = spawn(BIN, ["serve", "--database-url", links.database, "--listen", `127.0.0.1:${port}`], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, PGRELAY_JWT_SECRET: links.secret, NO_COLOR: "1" },
  });
  serve.stderr.on("data", (chunk) => { demoLog += `[serve] ${chunk}`; });
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + WAIT;
  for (;;) {
    const ready = await fetch(`${base}/readyz`).then((r) => r.ok, () => false);
    if (ready) return base;
    assert.ok(serve.exitCode === null, `pgrelay serve exited early:\n${demoLog}`);
    assert.ok(Date.now() < deadline, "pgrelay serve not ready within 15 s");
    await new Promise((r) => setTimeout(r, 100));
  }
}

let database = null;

/** Runs one statement with psql; returns its unaligned, tuples-only output. */
function sql(statement) {
  return new Promise((resolveSql, reject) => {
    execFile(PSQL, [database, "-v", "ON_ERROR_STOP=1", "-tAc", statement], { timeout: WAIT }, (error, stdout, stderr) => {
      if (error) reject(new Error(`psql failed: ${statement}\n${stderr || error.message}`));
      else resolveSql(stdout.trim());
    });
  });
}

/** Waits until `selector`'s text equals `want` (a string) or matches it (a RegExp). */
async function expectText(page, selector, want, what = selector) {
  try {
    await page.waitForFunction(
      ([sel, source, flags, exact]) => {
        const text = document.querySelector(sel)?.textContent ?? "";
        return exact !== null ? text === exact : new RegExp(source, flags).test(text);
      },
      want instanceof RegExp ? [selector, want.source, want.flags, null] : [selector, "", "", want],
      { timeout: WAIT },
    );
  } catch (e) {
    const actual = await page.locator(selector).textContent({ timeout: 1000 }).catch(() => "(missing)");
    throw new Error(`${page.label}: ${what}: wanted ${want}, have ${JSON.stringify(actual)} (${e.message.split("\n")[0]})`);
  }
}

/** The bell's unread count as shown: 0 when the badge is hidden. */
async function badge(page) {
  const hidden = await page.locator("#bell-count").isHidden();
  return hidden ? 0 : Number(await page.locator("#bell-count").textContent());
}

async function expectBadge(page, want) {
  try {
    await page.waitForFunction(
      (n) => {
        const b = document.querySelector("#bell-count");
        return b && (n === 0 ? b.hidden : !b.hidden && b.textContent === String(n));
      },
      want,
      { timeout: WAIT },
    );
  } catch {
    assert.fail(`${page.label}: bell badge: wanted ${want}, have ${await badge(page)}`);
  }
}

async function expectConnected(page) {
  await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT });
}

const count = async (page, id) => Number(await page.locator(id).textContent());

async function shot(page, name) {
  // Finite animations (highlights, the badge's ring) are shown at their end.
  await page.screenshot({ path: join(ARTIFACTS, name), fullPage: true, animations: "disabled" });
}

/** A TCP proxy to `port` whose network can be cut: drops every connection and refuses new ones. */
async function cuttableProxy(port) {
  const sockets = new Set();
  let down = false;
  let refused = 0;
  const server = createServer((client) => {
    if (down) {
      refused++;
      return client.destroy();
    }
    const upstream = connect(port, "127.0.0.1");
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    client.pipe(upstream).pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise((ready) => server.listen(0, "127.0.0.1", ready));
  return {
    base: `http://127.0.0.1:${server.address().port}`,
    cut() {
      down = true;
      for (const s of sockets) s.destroy();
    },
    restore() { down = false; },
    /** Connections refused while cut (a browser retrying). */
    get refused() { return refused; },
    close() { down = true; for (const s of sockets) s.destroy(); server.close(); },
  };
}

/** Marks every note read in `page` (a known state for a case), then closes the menu. */
async function markAllRead(page) {
  await page.click("#bell");
  await page.locator("#bell-menu").waitFor();
  await page.click("#mark-all-read");
  await expectBadge(page, 0);
  await page.keyboard.press("Escape");
}

/** The id an INSERT ... RETURNING id printed (psql adds its command tag below). */
async function insertedId(statement) {
  const id = Number((await sql(statement)).split("\n")[0]);
  assert.ok(Number.isInteger(id), `no id from ${statement}`);
  return id;
}

/** Inserts a business owned by user 2 (the demo's owner) with psql; returns its id. */
async function newBusiness(name) {
  return insertedId(`INSERT INTO businesses (owner_id, name) VALUES (2, '${name}') RETURNING id`);
}

/** Inserts a reservation at `business` (customer user 3) with psql; returns its id. */
async function reserve(business) {
  return insertedId(
    `INSERT INTO reservations (business_id, customer_id, starts_at, party_size) VALUES (${business}, 3, now() + interval '1 day', 2) RETURNING id`);
}

/** The owner's (user 2) link to a business's own page, over `transport`. */
function businessPage(base, id, transport) {
  const token = new URLSearchParams(new URL(links.owner).hash.slice(1)).get("token");
  return `${base}/businesses/${id}#token=${token}&transport=${transport}`;
}

/** Waits until `page` lists reservation `id` on its business view; asserts it is listed once. */
async function expectReservationOnce(page, id) {
  const rows = page.locator(`#stream-reservations li[data-id="${id}"]`);
  try {
    await rows.first().waitFor({ timeout: WAIT });
  } catch {
    assert.fail(`${page.label}: reservation #${id} not shown: ${await page.locator("#stream-reservations").textContent()}`);
  }
  assert.equal(await rows.count(), 1, `${page.label}: reservation #${id} shown once`);
}

/** Inserts a business with psql and waits until `page` shows it. */
async function insertBusiness(page, name) {
  await sql(`INSERT INTO businesses (owner_id, name) VALUES (2, '${name}')`);
  await expectText(page, "#recent-businesses", new RegExp(name), `recent businesses (${name})`);
}

/** What the owner's notifications view shows: the badge's text and the listed notes (id, unread), newest first. */
function ownerBell(page) {
  return page.evaluate(() => {
    const b = document.querySelector("#bell-count");
    return {
      badge: b.hidden ? "0" : b.textContent,
      notes: [...document.querySelectorAll("#notification-list li")].map((li) => `${li.dataset.id}${li.classList.contains("unread") ? "*" : ""}`),
    };
  });
}

/**
 * Waits until every page shows `badge` (text: "3", "99+"; "0" when hidden)
 * and the same notes, unread the same; returns them. `names` must all be listed.
 */
async function expectSameBell(pages, badge, names = []) {
  const deadline = Date.now() + WAIT;
  let seen = [];
  for (;;) {
    seen = await Promise.all(pages.map(ownerBell));
    const texts = await Promise.all(pages.map((p) => p.locator("#notification-list").textContent()));
    const same = seen.every((s) => s.badge === badge && JSON.stringify(s.notes) === JSON.stringify(seen[0].notes));
    if (same && texts.every((text) => names.every((n) => text.includes(n)))) return seen[0];
    if (Date.now() > deadline) {
      const report = pages.map((p, i) => `${p.label}: badge ${seen[i].badge}, notes ${seen[i].notes.slice(0, 12).join(" ")}`).join("\n  ");
      assert.fail(`the bells differ from badge ${badge}${names.length ? ` with ${names.join(", ")}` : ""}:\n  ${report}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Clicks one of the bell menu's buttons (#mark-all-read, #clear-all) in `page`, then closes the menu. */
async function bellAction(page, button) {
  await page.click("#bell");
  await page.locator("#bell-menu").waitFor();
  await page.click(button);
  await page.keyboard.press("Escape");
}

// ------------------------------------------------------------------ the cases

let links = null;
let browser = null;
let proxy = null;

before(async () => {
  assert.ok(existsSync(BIN), `no pgrelay binary at ${BIN}: run cargo build first, or set PGRELAY_BIN`);
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium, or set CHROMIUM_BIN`);
  assert.ok(existsSync(PSQL), `no psql at ${PSQL}: apt-get install postgresql-client, or set PSQL_BIN`);
  links = await startDemo();
  database = links.database;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    timeout: WAIT,
  });
}, { timeout: DEMO_START + WAIT });

after(async () => {
  await browser?.close().catch(() => {});
  proxy?.close();
  await stop(serve);
  await stop(demo);
  writeFileSync(join(ARTIFACTS, "browser-demo.log"), demoLog);
});

/**
 * A case: `body({ open, device, t })` runs with tabs opened by `open(url,
 * label)` in a fresh context of the shared browser; `device()` makes another
 * fresh context (another browser: its own storage) and returns its `open`.
 * All are closed afterwards; uncaught errors in their pages fail the case.
 */
function scenario(name, body) {
  test(name, { timeout: 120_000 }, async (t) => {
    assert.ok(browser && links, "pgrelay demo and Chromium started (see the before hook)");
    const contexts = [];
    const pageErrors = [];
    const device = async () => {
      const context = await browser.newContext({ viewport: { width: 1280, height: 820 } });
      contexts.push(context);
      context.setDefaultTimeout(WAIT);
      context.setDefaultNavigationTimeout(WAIT);
      return async (url, label) => {
        const page = await context.newPage();
        page.label = label;
        page.on("pageerror", (e) => pageErrors.push(`${label}: ${e.message}`));
        page.on("console", (m) => { if (m.type() === "error") console.log(`[${label} console] ${m.text()}`); });
        await page.goto(url);
        await expectConnected(page);
        return page;
      };
    };
    try {
      const open = await device();
      await body({ open, device, t });
      assert.deepEqual(pageErrors, [], "no uncaught errors in the pages");
    } finally {
      for (const context of contexts) await context.close().catch(() => {});
    }
  });
}

scenario("the token leaves the address bar and picks the view", async ({ open }) => {
  const adminA = await open(links.admin, "admin tab A");
  const adminB = await open(links.admin, "admin tab B");
  const owner = await open(links.owner, "owner tab");
  for (const page of [adminA, adminB, owner]) {
    assert.ok(!page.url().includes("token="), `${page.label}: token still in the URL: ${page.url()}`);
  }
  assert.ok(await adminA.locator("#dashboard").isVisible(), "admin sees the dashboard");
  assert.ok(await owner.locator("#notifications").isVisible(), "owner sees notifications");
  assert.ok(await owner.locator("#dashboard").isHidden(), "owner does not see the dashboard");
  const probe = await fetch(`${links.base}/demo/`);
  assert.equal(probe.status, 200, "GET /demo/ answers in pgrelay demo (the page shows its buttons from it)");
  await adminA.locator("#demo-actions").waitFor({ timeout: WAIT });
});

scenario("a business inserted with psql shows in both admin tabs and rings the bell", async ({ open }) => {
  const adminA = await open(links.admin, "admin tab A");
  const adminB = await open(links.admin, "admin tab B");
  const owner = await open(links.owner, "owner tab");
  const businesses = await count(adminA, "#business-count");
  await expectText(adminB, "#business-count", String(businesses), "the tabs agree before");
  const bell = await badge(adminA);
  await expectBadge(adminB, bell);
  const ownerBell = await badge(owner);
  await sql("INSERT INTO businesses (owner_id, name) VALUES (2, 'Blue Door Cafe')");
  for (const page of [adminA, adminB]) {
    await expectText(page, "#business-count", String(businesses + 1), "business count");
    await expectText(page, "#recent-businesses", /Blue Door Cafe/, "recent businesses");
    await expectBadge(page, bell + 1);
  }
  await expectText(owner, "#notification-list", /Blue Door Cafe/, "owner's notifications");
  await expectBadge(owner, ownerBell + 1);
  await shot(adminA, "browser-1-psql-insert.png");
});

scenario("mark all read clears the badge, in every tab", async ({ open }) => {
  const adminA = await open(links.admin, "admin tab A");
  const adminB = await open(links.admin, "admin tab B");
  await insertBusiness(adminA, "Green Gate Deli");
  await adminA.click("#bell");
  await adminA.locator("#bell-menu").waitFor();
  await expectText(adminA, "#bell-list", /New business: Green Gate Deli/, "bell dropdown");
  await shot(adminA, "browser-2-bell-open.png");
  await adminA.click("#mark-all-read");
  await expectBadge(adminA, 0);
  assert.equal(await adminA.locator("#bell-list li.unread").count(), 0, "no unread item left");
  await expectBadge(adminB, 0); // the read state is the server's: its read frame reaches tab B
  await adminA.keyboard.press("Escape");
});

scenario("Create business in one tab updates the other", async ({ open, t }) => {
  const adminA = await open(links.admin, "admin tab A");
  const adminB = await open(links.admin, "admin tab B");
  const owner = await open(links.owner, "owner tab");
  await markAllRead(adminA);
  await expectBadge(adminB, 0);
  const businesses = await count(adminB, "#business-count");
  const reservations = await count(adminB, "#reservation-count");
  const started = Date.now();
  await adminA.click("#btn-create-business");
  await expectText(adminB, "#business-count", String(businesses + 1), "business count in the other tab");
  await expectBadge(adminB, 1);
  t.diagnostic(`button click to the other tab's count: ${Date.now() - started} ms`);
  await adminA.click("#btn-make-reservation");
  await expectText(adminB, "#reservation-count", String(reservations + 1), "reservation count");
  await expectText(owner, "#notification-list", /New reservation at/, "owner's reservation notification");
  await adminA.click("#btn-update-business");
  await expectText(adminB, "#recent-businesses", /\*/, "renamed business");
  await expectText(adminB, "#business-count", String(businesses + 1), "an UPDATE does not count as new");
  await expectBadge(adminB, 3);
  await shot(adminB, "browser-3-other-tab.png");
});

scenario("a business committed while the LISTEN backend is down still arrives", async ({ open }) => {
  const adminA = await open(links.admin, "admin tab A");
  const adminB = await open(links.admin, "admin tab B");
  const owner = await open(links.owner, "owner tab");
  await markAllRead(adminA);
  const businesses = await count(adminA, "#business-count");
  const killed = await sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'pgrelay:listen'");
  assert.equal(killed, "1", "one LISTEN backend terminated");
  await sql("INSERT INTO businesses (owner_id, name) VALUES (2, 'Outage Bistro')");
  for (const page of [adminA, adminB]) {
    await expectText(page, "#recent-businesses", /Outage Bistro/, "business from the outage");
    await expectText(page, "#business-count", String(businesses + 1), "business count");
  }
  await expectText(owner, "#notification-list", /Outage Bistro/, "owner's notification from the outage");
  // Sockets stay open through a listener outage.
  await expectConnected(adminA);
  await expectBadge(adminA, 1);
  await adminB.bringToFront();
  await shot(adminB, "dashboard.png");
  await adminB.click("#bell");
  await adminB.locator("#bell-menu").waitFor();
  await shot(adminB, "dashboard-bell.png");
  await adminB.keyboard.press("Escape");
});

scenario("a cut network: the tab says so, reconnects, resumes without loss or duplicates", async ({ open }) => {
  const adminA = await open(links.admin, "admin tab A");
  const businesses = await count(adminA, "#business-count");
  proxy = await cuttableProxy(Number(new URL(links.base).port));
  try {
    const tab = await open(proxy.base + new URL(links.admin).hash, "admin tab C (through a proxy)");
    await expectText(tab, "#event-count", await adminA.locator("#event-count").textContent(), "events replayed");
    proxy.cut();
    await tab.locator('#status:not([data-state="connected"])').waitFor();
    await sql("INSERT INTO businesses (owner_id, name) VALUES (2, 'Cut Cable Diner')");
    await expectText(adminA, "#recent-businesses", /Cut Cable Diner/, "the direct tab sees it");
    assert.doesNotMatch(await tab.locator("#recent-businesses").textContent(), /Cut Cable Diner/, "the cut tab cannot see it yet");
    await shot(tab, "browser-5-network-cut.png");
    proxy.restore();
    await expectConnected(tab);
    await expectText(tab, "#recent-businesses", /Cut Cable Diner/, "business committed during the cut");
    await expectText(tab, "#business-count", String(businesses + 1), "business count after the resume");
    // Every event once: the same total as the tab that never lost its socket.
    await expectText(tab, "#event-count", await adminA.locator("#event-count").textContent(), "events after the resume");
    await tab.close();
  } finally {
    proxy.close();
    proxy = null;
  }
});

scenario("read state survives a reload", async ({ open }) => {
  const adminA = await open(links.admin, "admin tab A");
  const businesses = await count(adminA, "#business-count");
  // Earlier items read with "mark all read", then one read by hand.
  await insertBusiness(adminA, "Read Early Bakery");
  await insertBusiness(adminA, "Read Early Noodles");
  await markAllRead(adminA);
  await insertBusiness(adminA, "Unread Tea Room");
  await insertBusiness(adminA, "Unread Taqueria");
  await expectBadge(adminA, 2);
  await adminA.click("#bell");
  const first = adminA.locator("#bell-list li.unread").first();
  const id = await first.getAttribute("data-id");
  await first.locator("button").click();
  await expectBadge(adminA, 1);
  await adminA.reload();
  await adminA.bringToFront();
  await expectConnected(adminA);
  await expectText(adminA, "#business-count", String(businesses + 4), "business count after reload (replayed)");
  await expectBadge(adminA, 1);
  await adminA.click("#bell");
  await adminA.locator("#bell-menu").waitFor();
  assert.equal(await adminA.locator(`#bell-list li[data-id="${id}"]`).getAttribute("class"), "", "the item read by hand stays read");
  assert.ok(await adminA.locator("#bell-list li:not(.unread)").count() >= 2, "earlier items stay read");
  await shot(adminA, "browser-6-after-reload.png");

  await adminA.click("#clear-all");
  await expectBadge(adminA, 0);
  await adminA.locator("#bell-empty").waitFor();
  await adminA.reload();
  await adminA.bringToFront();
  await expectConnected(adminA);
  await expectText(adminA, "#business-count", String(businesses + 4), "business count after the second reload");
  await expectBadge(adminA, 0);
  await adminA.click("#bell");
  await adminA.locator("#bell-empty").waitFor();
});

scenario("under pgrelay serve the page works and has no demo buttons", async ({ open }) => {
  const onDemo = await open(links.admin, "admin tab on demo");
  const base = await startServe(links);
  const page = await open(base + new URL(links.admin).hash, "admin tab on serve");
  await expectText(page, "#business-count", await onDemo.locator("#business-count").textContent(), "business count on serve");
  assert.equal((await fetch(`${base}/demo/`)).status, 404, "no demo endpoints on serve");
  // The page's probe has been answered (404), and the buttons stayed hidden.
  await page.waitForFunction(() => performance.getEntriesByName(`${location.origin}/demo/`).length > 0, null, { timeout: WAIT });
  assert.ok(await page.locator("#demo-actions").isHidden(), "no demo buttons on serve");
});

for (const transport of ["websocket", "sse"]) {
  scenario(`an owner's business page shows its own reservations live, no other's (${transport})`, async ({ open }) => {
    const tag = transport === "sse" ? "SSE" : "WS";
    const mine = await newBusiness(`Own Page ${tag}`);
    const other = await newBusiness(`Elsewhere ${tag}`);
    const page = await open(businessPage(links.base, mine, transport), `owner's page of #${mine} (${transport})`);
    assert.equal(new URL(page.url()).pathname, `/businesses/${mine}`, "the page keeps its address, not the token");
    assert.equal(await page.locator("#transport").getAttribute("data-transport"), transport, "the transport asked for");
    await expectText(page, "#footer", transport === "sse" ? /Server-Sent Events/ : /WebSocket/, "footer names the transport");
    assert.ok(await page.locator("#stream-view").isVisible(), "the business's own view");
    assert.ok(await page.locator("#dashboard").isHidden(), "not the dashboard");
    await expectText(page, "#stream-title", `Own Page ${tag}`, "the business's name, from its stream");
    await expectText(page, "#stream-reservation-count", "0", "no reservations yet");

    // Elsewhere first: once this business's own reservation shows, the other
    // one has had every chance to show too.
    const elsewhere = await reserve(other);
    const here = await reserve(mine);
    await expectReservationOnce(page, here);
    await expectText(page, "#stream-reservation-count", "1", "one reservation here");
    assert.equal(await page.locator(`#stream-reservations li[data-id="${elsewhere}"]`).count(), 0,
      `reservation #${elsewhere} at business #${other} is not on #${mine}'s page`);
    // Beside it, the owner's notifications (the bell) have both: both businesses are hers.
    await expectText(page, "#stream-notes", new RegExp(`New reservation at Own Page ${tag}`), "the owner's notification");
    await expectText(page, "#stream-notes", new RegExp(`New reservation at Elsewhere ${tag}`), "the other business's notification, in the bell only");

    await sql(`UPDATE businesses SET name = 'Own Page ${tag} renamed' WHERE id = ${mine}`);
    await sql(`UPDATE businesses SET name = 'Elsewhere ${tag} renamed' WHERE id = ${other}`);
    const later = await reserve(mine);
    await expectReservationOnce(page, later);
    await expectText(page, "#stream-title", `Own Page ${tag} renamed`, "an update shows live");
    await expectText(page, "#stream-event-count", "4", "created, reserved, renamed, reserved: this business's events only");
    await expectText(page, "#stream-activity", /Business updated: Own Page .* renamed/, "updates list");
    for (const part of ["#stream-title", "#stream-reservations", "#stream-activity"]) {
      assert.doesNotMatch(await page.locator(part).textContent(), /Elsewhere/, `${part}: nothing of the other business`);
    }
    await shot(page, `browser-business-page-${transport}.png`);
  });
}

scenario("the owner's notifications link to her business's page", async ({ open }) => {
  const id = await newBusiness("Linked Lunchroom");
  const home = await open(links.owner, "owner's notifications");
  const link = home.locator(`#my-businesses a[href="/businesses/${id}"]`);
  await link.waitFor({ timeout: WAIT });
  await link.click();
  await home.waitForURL(`**/businesses/${id}`, { timeout: WAIT });
  await expectConnected(home);
  await expectText(home, "#stream-title", "Linked Lunchroom", "the linked page (signed in from the tab's token)");
});

scenario("over SSE, a business page whose network is cut reconnects and misses nothing", async ({ open }) => {
  const mine = await newBusiness("Cut Stream Cafe");
  proxy = await cuttableProxy(Number(new URL(links.base).port));
  try {
    const page = await open(businessPage(proxy.base, mine, "sse"), "owner's page over SSE, through a proxy");
    const first = await reserve(mine);
    await expectReservationOnce(page, first);
    proxy.cut();
    await page.locator('#status:not([data-state="connected"])').waitFor({ timeout: WAIT });
    const during = [];
    for (let i = 0; i < 3; i++) during.push(await reserve(mine));
    // Down until the browser's EventSource has retried and been refused.
    const deadline = Date.now() + WAIT;
    while (proxy.refused === 0) {
      assert.ok(Date.now() < deadline, "the page retried within 15 s");
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(await page.locator("#stream-reservations li").count(), 1, "nothing arrives while cut");
    await shot(page, "browser-sse-network-cut.png");
    proxy.restore();
    await expectConnected(page);
    for (const id of [first, ...during]) await expectReservationOnce(page, id);
    await expectText(page, "#stream-reservation-count", String(1 + during.length), "every reservation counted once");
    await expectText(page, "#stream-event-count", String(2 + during.length), "created and each reservation, once");
    await page.close();
  } finally {
    proxy.close();
    proxy = null;
  }
});

scenario("the owner's bell is the server's: the same on two devices, live, and after a reload", async ({ open, device }) => {
  const phone = await open(links.owner, "owner's phone");
  // The laptop over Server-Sent Events: it marks with POST /read/..., and
  // hears read frames as `event: read`.
  const laptop = await (await device())(`${links.owner}&transport=sse`, "owner's laptop (SSE)");
  await expectText(laptop, "#footer", /Server-Sent Events/, "the laptop's transport");
  // A known start: nothing listed, nothing unread, on both.
  await bellAction(phone, "#clear-all");
  await expectSameBell([phone, laptop], "0");
  assert.equal((await ownerBell(laptop)).notes.length, 0, "cleared: nothing listed");

  const names = ["Two Devices Deli", "Two Devices Diner", "Two Devices Dumplings"];
  for (const name of names) await newBusiness(name);
  let bell = await expectSameBell([phone, laptop], "3", names);
  assert.equal(bell.notes.filter((n) => n.endsWith("*")).length, 3, "three unread, listed on both");

  // Mark all read on the laptop: the phone's badge clears without a reload.
  await bellAction(laptop, "#mark-all-read");
  bell = await expectSameBell([phone, laptop], "0", names);
  assert.equal(bell.notes.length, 3, "read, still listed");

  // Two more; one read by hand on the phone: the laptop follows.
  await newBusiness("Two Devices Tapas");
  await newBusiness("Two Devices Tavern");
  await expectSameBell([phone, laptop], "2", ["Two Devices Tapas", "Two Devices Tavern"]);
  await phone.click("#bell");
  await phone.locator("#bell-menu").waitFor();
  const item = phone.locator(`#bell-list li.unread`).first();
  const itemId = await item.getAttribute("data-id");
  await item.locator("button").click();
  bell = await expectSameBell([phone, laptop], "1");
  assert.ok(bell.notes.includes(itemId), `#${itemId} read on both: ${bell.notes}`);
  await phone.keyboard.press("Escape");

  // A reload, and a third device, restore the same list and badge from the server.
  await laptop.reload();
  await expectConnected(laptop);
  const tablet = await (await device())(links.owner, "owner's tablet");
  const restored = await expectSameBell([phone, laptop, tablet], "1", [...names, "Two Devices Tavern"]);
  assert.deepEqual(restored.notes, bell.notes, "the same list, read the same, after a reload and on a new device");
  await shot(tablet, "browser-bell-devices.png");

  // Clear all on the tablet: every device's list empties.
  await bellAction(tablet, "#clear-all");
  await expectSameBell([phone, laptop, tablet], "0");
  for (const page of [phone, laptop, tablet]) {
    assert.equal((await ownerBell(page)).notes.length, 0, `${page.label}: cleared`);
  }
  await phone.reload();
  await expectConnected(phone);
  const fresh = await (await device())(links.owner, "owner's new browser");
  await expectSameBell([phone, fresh], "0");
  assert.equal((await ownerBell(fresh)).notes.length, 0, "cleared for good: a new browser lists nothing");
  // And it goes on: a new notification shows on every device.
  await newBusiness("Two Devices After Clear");
  await expectSameBell([phone, laptop, tablet, fresh], "1", ["Two Devices After Clear"]);
});

scenario("more than 99 unread: 99+ from hello's count, on every device", async ({ open, device }) => {
  const phone = await open(links.owner, "owner's phone");
  await bellAction(phone, "#clear-all");
  await expectSameBell([phone], "0");
  await sql("INSERT INTO businesses (owner_id, name) SELECT 2, 'Bulk Bakery ' || i FROM generate_series(1, 120) AS i");
  await expectSameBell([phone], "99+", ["Bulk Bakery 120"]);
  // A new device loads only the newest page of history: the count is hello's.
  const laptop = await (await device())(links.owner, "owner's laptop");
  const bell = await expectSameBell([phone, laptop], "99+", ["Bulk Bakery 120"]);
  assert.ok(bell.notes.length < 120, `the laptop lists a page, not all: ${bell.notes.length}`);
  await bellAction(laptop, "#mark-all-read");
  await expectSameBell([phone, laptop], "0");
  await laptop.reload();
  await expectConnected(laptop);
  await expectSameBell([phone, laptop], "0", ["Bulk Bakery 120"]);
});
