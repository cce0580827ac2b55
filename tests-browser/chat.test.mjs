// Three people chat through the real web page, in headless Chromium driven by playwright-core:
// a room message reaches everyone in the room, a private message reaches only its target, the
// online list follows people leaving, and a screenshot is kept (artifacts/chat.png, and
// docs/screenshot.png for the README).
//
// Run by scripts/browser-test.sh, which builds the example server and installs what is missing.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer, connect as tcpConnect } from 'node:net';
import { copyFileSync, mkdirSync } from 'node:fs';
import { createHmac } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { resolve } from 'node:path';
import { chromium } from 'playwright-core';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
// Where `cargo build --example chat-server` put it (CARGO_TARGET_DIR moves the target directory).
const TARGET = process.env.CARGO_TARGET_DIR ? resolve(ROOT, process.env.CARGO_TARGET_DIR) : `${ROOT}target`;
const SERVER = `${TARGET}/debug/examples/chat-server`;
const ARTIFACTS = `${ROOT}artifacts`;
const TIMEOUT = 10_000;

let server;
let serverLog = '';
let browser;
let base;

function freePort() {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

async function waitForHttp(url) {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    try {
      const response = await fetch(url);
      if (response.ok) return;
    } catch {
      // not up yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`server did not come up at ${url}\n${serverLog}`);
}

before(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  server = spawn(SERVER, ['--addr', `127.0.0.1:${port}`, '--store', 'memory'], { stdio: ['ignore', 'pipe', 'pipe'] });
  server.stdout.on('data', (d) => { serverLog += d; });
  server.stderr.on('data', (d) => { serverLog += d; });
  await waitForHttp(`${base}/config.json`);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    headless: true,
    // As root on a machine with no network beyond localhost: no sandbox, no background traffic.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  server?.kill('SIGTERM');
});

// A TCP proxy in front of the server, so a test can cut a browser's connections for real (as a
// network drop would) and keep it cut for a while.
async function startProxy(targetPort) {
  const sockets = new Set();
  let cut = false;
  const proxy = createServer((client) => {
    if (cut) return client.destroy();
    const upstream = tcpConnect(targetPort, '127.0.0.1');
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  return {
    base: `http://127.0.0.1:${proxy.address().port}`,
    cut() { cut = true; for (const s of sockets) s.destroy(); },
    restore() { cut = false; },
    close() { this.cut(); proxy.close(); },
  };
}

async function signIn(name, viewport = { width: 1100, height: 720 }, via = base) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('pageerror', (error) => { throw new Error(`${name}'s page: ${error.message}`); });
  await page.goto(`${via}/`);
  await page.fill('#signin-name', name);
  await page.click('#signin-submit');
  await page.waitForSelector('#conn-state[data-state="online"]');
  return { name, context, page };
}

async function joinRoom(user, room) {
  await user.page.fill('#room-name', room);
  await user.page.click('#room-join');
  await user.page.click(`li[data-room="${room}"]`);
  await user.page.waitForSelector(`#view-title:has-text("${room}")`);
}

async function say(user, text) {
  await user.page.fill('#composer', text);
  await user.page.press('#composer', 'Enter');
}

function message(user, text) {
  return user.page.locator('#messages .message .body', { hasText: text });
}

test('a room message reaches everyone, a private one only its target, presence follows', async () => {
  const alice = await signIn('alice');
  const bob = await signIn('bob');
  const carol = await signIn('carol');
  for (const user of [alice, bob, carol]) await joinRoom(user, 'lobby');

  // Everyone in the room sees the room message, with its author.
  await say(alice, 'hello everyone');
  for (const user of [alice, bob, carol]) {
    await message(user, 'hello everyone').waitFor();
    const from = await user.page.locator('#messages .message', { hasText: 'hello everyone' }).getAttribute('data-from');
    assert.equal(from, 'alice', `${user.name} sees the right author`);
  }
  await say(bob, 'hi alice');
  await message(alice, 'hi alice').waitFor();

  // The online list shows everyone.
  for (const name of ['bob', 'carol']) {
    await alice.page.locator(`#online li[data-user="${name}"]`).waitFor();
  }

  // Alice opens a private conversation with bob.
  await alice.page.click('#online li[data-user="bob"]');
  await alice.page.waitForSelector('#view-title:has-text("bob")');
  await say(alice, 'psst, bob only');
  await message(alice, 'psst, bob only').waitFor();

  // Bob is told (an unread count on alice), opens it and reads it.
  const badge = bob.page.locator('#online li[data-user="alice"] .unread');
  await badge.waitFor({ state: 'visible' });
  assert.equal((await badge.textContent()).trim(), '1');
  await bob.page.click('#online li[data-user="alice"]');
  await message(bob, 'psst, bob only').waitFor();

  // Carol never sees it, anywhere on her page.
  await carol.page.waitForTimeout(500);
  assert.equal(await carol.page.getByText('psst, bob only').count(), 0, 'carol saw a private message');
  assert.equal(await carol.page.locator('#online li[data-user="alice"] .unread:visible').count(), 0);

  // When carol leaves, the others' online lists drop her.
  await carol.context.close();
  await alice.page.locator('#online li[data-user="carol"]').waitFor({ state: 'detached' });
  await bob.page.locator('#online li[data-user="carol"]').waitFor({ state: 'detached' });

  // The screenshot for the README: alice back in the room.
  await alice.page.click('li[data-room="lobby"]');
  await message(alice, 'hi alice').waitFor();
  await alice.page.screenshot({ path: `${ARTIFACTS}/chat.png` });
  if (process.env.UPDATE_SCREENSHOT) copyFileSync(`${ARTIFACTS}/chat.png`, `${ROOT}docs/screenshot.png`);

  await alice.context.close();
  await bob.context.close();
});

test('the page works at phone width and reconnects after the socket drops', async () => {
  const proxy = await startProxy(Number(new URL(base).port));
  const dana = await signIn('dana', { width: 360, height: 740 }, proxy.base);
  await joinRoom(dana, 'phones');
  await say(dana, 'from a small screen');
  await message(dana, 'from a small screen').waitFor();
  const overflow = await dana.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `horizontal scroll of ${overflow}px at phone width`);
  await dana.page.screenshot({ path: `${ARTIFACTS}/phone.png` });

  // Cut the network: the page notices, comes back on its own, and misses nothing sent meanwhile.
  const eve = await signIn('eve');
  await joinRoom(eve, 'phones');
  proxy.cut();
  await dana.page.waitForSelector('#conn-state[data-state="reconnecting"]');
  await say(eve, 'sent while dana was away');
  await message(eve, 'sent while dana was away').waitFor();
  assert.equal(await message(dana, 'sent while dana was away').count(), 0, 'the drop was not real');
  proxy.restore();
  await dana.page.waitForSelector('#conn-state[data-state="online"]', { timeout: 30_000 });
  await message(dana, 'sent while dana was away').waitFor({ timeout: 30_000 });
  assert.equal(await message(dana, 'from a small screen').count(), 1, 'a message was duplicated');
  await dana.context.close();
  await eve.context.close();
  proxy.close();
});

function hs256(claims, secret) {
  const part = (object) => Buffer.from(JSON.stringify(object)).toString('base64url');
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

test('jwt sign-in, refusal, and a graceful shutdown on SIGTERM', async () => {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const secret = 'browser test secret';
  let log = '';
  const jwtServer = spawn(SERVER, ['--addr', `127.0.0.1:${port}`, '--auth', 'jwt', '--store', 'memory'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, CHAT_JWT_SECRET: secret },
  });
  jwtServer.stdout.on('data', (d) => { log += d; });
  jwtServer.stderr.on('data', (d) => { log += d; });
  try {
    await waitForHttp(`${url}/config.json`);
    const context = await browser.newContext();
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);

    // A forged token is refused and the page goes back to sign-in.
    await page.goto(`${url}/`);
    const exp = Math.floor(Date.now() / 1000) + 600;
    await page.fill('#signin-token', hs256({ sub: 'mallory', exp }, 'wrong secret'));
    await page.click('#signin-submit');
    await page.waitForSelector('#conn-state[data-state="refused"]');
    await page.waitForSelector('#signin-token', { state: 'visible' });

    // A good one gets in.
    await page.fill('#signin-token', hs256({ sub: 'frank', exp }, secret));
    await page.click('#signin-submit');
    await page.waitForSelector('#conn-state[data-state="online"]');
    await page.waitForSelector('#whoami:has-text("frank")');

    // SIGTERM: the socket is closed by the server (the page starts reconnecting) and the process
    // exits cleanly within a few seconds.
    const exited = new Promise((resolve) => jwtServer.once('exit', (code, signal) => resolve({ code, signal })));
    const started = Date.now();
    jwtServer.kill('SIGTERM');
    await page.waitForSelector('#conn-state[data-state="reconnecting"]');
    const { code } = await exited;
    assert.equal(code, 0, `exit code after SIGTERM\n${log}`);
    assert.ok(Date.now() - started < 5_000, 'took too long to shut down');
    assert.match(log, /shutdown signal received/);
    assert.match(log, /user="?frank"?.*reason=Shutdown/, 'the socket was not closed by the engine (1001)');
    await context.close();
  } finally {
    jwtServer.kill('SIGKILL');
  }
});
