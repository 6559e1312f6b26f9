// The relay's portal in a real browser: Debian's chromium driven by
// playwright-core (which never downloads a browser). Run by
// tests/tests/portal.rs, which starts the relay and passes, in env:
//
//   HYBRIDLINK_API                 http://127.0.0.1:PORT, the relay's --api address
//   HYBRIDLINK_MANAGE_KEY          its manage key
//   HYBRIDLINK_TARGETS             two host:port targets (echo servers), comma-separated
//   HYBRIDLINK_PORTAL_SCREENSHOTS  where to write the screenshots
//   CHROMIUM                       the browser (default /usr/bin/chromium)
//
// What only the harness can do (start an agent, push traffic, run
// `hybridlink connect --check`) the script asks for with a line
// `@hybridlink {json}` on stdout and waits for one JSON line on stdin.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const api = process.env.HYBRIDLINK_API;
const key = process.env.HYBRIDLINK_MANAGE_KEY;
const [target, target2] = (process.env.HYBRIDLINK_TARGETS ?? '').split(',');
const shots = process.env.HYBRIDLINK_PORTAL_SCREENSHOTS ?? 'portal-screenshots';
assert(api && key && target && target2, 'HYBRIDLINK_API, HYBRIDLINK_MANAGE_KEY and HYBRIDLINK_TARGETS are needed');
const [host, port] = target.split(':');
const port2 = target2.split(':')[1];

const input = createInterface({ input: process.stdin });
const replies = input[Symbol.asyncIterator]();

/** Asks the harness for something; returns its answer. */
async function ask(request) {
  console.log(`@hybridlink ${JSON.stringify(request)}`);
  const { value, done } = await replies.next();
  assert(!done, 'the harness closed stdin');
  const answer = JSON.parse(value);
  assert(answer.error === undefined, `harness: ${answer.error}`);
  return answer;
}

const step = (text) => console.log(`-- ${text}`);

/** Polls `check` until it returns true; anything else is shown on timeout. */
async function until(what, check, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    let last;
    try {
      last = await check();
      if (last === true) return;
    } catch (e) {
      last = e.message;
    }
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms (last: ${last})`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** The API called directly, as the harness (not through the page). */
let harnessKey = key;
async function direct(method, path, body, as = harnessKey) {
  const response = await fetch(api + path, {
    method,
    headers: { Authorization: `Bearer ${as}`, 'Content-Type': 'application/json' },
    body: body && JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

mkdirSync(shots, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), 'hybridlink-portal-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  viewport: { width: 1280, height: 860 },
});
await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: api });
const page = context.pages()[0] ?? (await context.newPage());
const problems = [];
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (message) => {
  // Refused API calls are expected here (wrong key, bad input); a blocked
  // script, style or image (CSP) or a script error is not.
  if (message.type() === 'error' && !/status of (400|401|404)/.test(message.text())) {
    problems.push(`console: ${message.text()}`);
  }
});

const text = (selector) => page.locator(selector).innerText();
const shown = (selector, pattern, ms) =>
  until(`${selector} shows ${pattern}`, async () => {
    const now = await text(selector);
    return pattern.test(now) || JSON.stringify(now);
  }, ms);
const focused = () => page.evaluate(() => document.activeElement?.id || document.activeElement?.outerHTML);
const row = (name) => `#hc-rows tr[data-name="${name}"]`;
const shot = async (name, fullPage = false) => {
  await page.evaluate(() => document.fonts.ready);
  await page.screenshot({ path: join(shots, `portal-${name}.png`), fullPage });
};
/** Whether the page is wider than the window (a horizontal scroll bar). */
const scrolls = () =>
  page.evaluate(() => document.documentElement.scrollWidth > document.documentElement.clientWidth);

try {
  step('sign in with the keyboard; a wrong key first');
  await page.goto(`${api}/`);
  await page.locator('#login').waitFor();
  await shot('login');
  await page.keyboard.press('Tab'); // the header's home link
  await page.keyboard.press('Tab');
  assert.equal(await focused(), 'login-key');
  await page.keyboard.type('not-the-key');
  await page.keyboard.press('Enter');
  await shown('#login-error', /^wrong manage key/);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  await page.keyboard.press('Control+A');
  await page.keyboard.type(key);
  await page.keyboard.press('Enter');
  await page.locator('#list').waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem('hybridlink.manageKey')), key);
  assert.equal(await page.evaluate(() => localStorage.length), 0);
  await shown('#list-empty', /No hybrid connections yet/);

  step("create: a bad name gets the API's own message");
  const bad = { name: 'pay roll', host, port: Number(port) };
  const refused = await direct('POST', '/api/v1/hcs', bad);
  assert.equal(refused.status, 400);
  await page.fill('#new-name', bad.name);
  await page.fill('#new-host', host);
  await page.fill('#new-port', port);
  await page.click('#create-form button[type=submit]');
  await until('the create error', async () => (await text('#create-error')) === refused.body.error);

  step('create payroll and billing; both Not connected');
  await page.fill('#new-name', 'payroll');
  await page.click('#create-form button[type=submit]');
  await shown(row('payroll'), /Not connected/);
  assert.match(await text(row('payroll')), new RegExp(`${host}:${port}`));
  assert.equal(await page.inputValue('#new-name'), '', 'the form is cleared after a create');
  await page.fill('#new-name', 'billing');
  await page.fill('#new-host', 'billing.corp');
  await page.fill('#new-port', '5432');
  await page.click('#create-form button[type=submit]');
  await shown(row('billing'), /billing\.corp:5432\s+Not connected/);

  step("open payroll: its strings and the setup command");
  await page.click(`${row('payroll')} a`);
  await shown('#cs-listen-primary', /SharedAccessKeyName=listen;.*EntityPath=payroll/);
  const listen = await text('#cs-listen-primary');
  const send = await text('#cs-send-primary');
  const keys = await direct('GET', '/api/v1/hcs/payroll/keys');
  assert.deepEqual(
    {
      listen: [listen, await text('#cs-listen-secondary')],
      send: [send, await text('#cs-send-secondary')],
    },
    {
      listen: [keys.body.connection_strings.listen.primary, keys.body.connection_strings.listen.secondary],
      send: [keys.body.connection_strings.send.primary, keys.body.connection_strings.send.secondary],
    },
  );
  assert.equal(await text('#setup-command'), `hybridlink agent install --connection-string-file - <<'EOF'\n${listen}\nEOF`);
  await shown('#d-status', /^Not connected$/);
  await shown('#agents-empty', /No agent is connected/);

  step('an agent with the listen string: Connected, and listed');
  await ask({ do: 'agent', connection_string: listen });
  await shown('#d-status', /^Connected \(1 agent\)$/);
  await shown('#agent-rows', /127\.0\.0\.1:\d+/);
  assert.equal(await page.locator('#agent-rows tr').count(), 1);
  // This agent has no end-to-end key, and its policy allows the endpoint.
  await shown('#agent-rows', /relay-trusted/);
  await shown('#agent-rows', /allows the endpoint/);

  step("the agent's on-prem policy refuses the endpoint: the page says so");
  await ask({ do: 'policy', text: '' });
  await shown('#agent-rows', /on-prem policy refuses 127\.0\.0\.1:\d+: no rule allows it for payroll/, 15000);
  await shot('policy');
  await ask({ do: 'policy', text: 'allow' });
  await shown('#agent-rows', /allows the endpoint/, 15000);
  await page.click('text=All hybrid connections');
  await shown(row('payroll'), /Connected \(1 agent\)/);
  await shown(row('billing'), /Not connected/);

  step('traffic through it: open streams, bytes and the chart');
  await ask({ do: 'traffic', connection_string: send });
  await shown(row('payroll'), /Connected \(1 agent\)\s+2\s/);
  await shown(row('payroll'), /[1-9][\d.]* [kMG]B \/ [1-9]/);
  await shot('list');
  await page.click(`${row('payroll')} a`);
  await page.locator('#d-streams').waitFor();
  // Enough samples for a line: the page polls every 2 s.
  await page.waitForTimeout(16000);
  await shown('#cap-bytes', /now [1-9][\d.]* [kMG]?B\/s/);
  await shown('#cap-open', /now 2, peak 2/);
  assert(Number(await page.locator('#chart-bytes polyline').count()) === 1, 'no line in the bytes chart');
  await shot('details', true);

  step('copy a string and the setup command (clipboard read back)');
  await page.click('[data-copy="cs-send-primary"]');
  await until('the send string in the clipboard',
    async () => (await page.evaluate(() => navigator.clipboard.readText())) === send);
  await page.click('[data-copy="setup-command"]');
  await until('the setup command in the clipboard',
    async () => (await page.evaluate(() => navigator.clipboard.readText())) === await text('#setup-command'));

  step('regenerate send primary: Escape cancels, then Tab + Enter confirms');
  const regenerate = '[data-rule="send"][data-key="primary"]';
  await page.click(regenerate);
  await page.locator('#confirm').waitFor();
  assert.match(await text('#confirm-title'), /Regenerate the send primary key of payroll\?/);
  assert.match(await text('#confirm-text'), /using the send primary string are disconnected now and refused/);
  assert.equal(await focused(), 'confirm-cancel');
  await shot('regenerate');
  await page.keyboard.press('Escape');
  await page.locator('#confirm').waitFor({ state: 'hidden' });
  assert.equal(await text('#cs-send-primary'), send, 'Escape regenerated the key');
  assert.equal(await page.evaluate(() => document.activeElement.dataset.rule), 'send', 'focus is back on the button');
  await page.keyboard.press('Enter');
  await page.locator('#confirm').waitFor();
  await page.keyboard.press('Tab');
  assert.equal(await focused(), 'confirm-ok');
  await page.keyboard.press('Enter');
  await until('a new send primary string', async () => (await text('#cs-send-primary')) !== send);
  const fresh = await text('#cs-send-primary');
  assert.equal(await text('#cs-listen-primary'), listen, 'only the send primary key changed');
  const old = await ask({ do: 'check', connection_string: send });
  assert(!old.ok, `the old send string still works: ${old.output}`);
  assert.match(old.output, /regenerated/);
  const now = await ask({ do: 'check', connection_string: fresh });
  assert(now.ok, `the new send string does not work: ${now.output}`);

  step("edit the endpoint: the API's message for a bad port, then a good one");
  await page.fill('#d-port', '70000');
  await page.click('#endpoint-form button[type=submit]');
  await shown('#endpoint-error', /^port 70000 is not a number from 1 to 65535$/);
  await page.fill('#d-port', port2);
  await page.click('#endpoint-form button[type=submit]');
  await shown('#d-endpoint', new RegExp(`^${host}:${port2}$`));
  assert.equal((await direct('GET', '/api/v1/hcs/payroll')).body.endpoint, `${host}:${port2}`);
  await shown('#endpoint-error', /^$/);

  step('a 400 px window: no horizontal scroll');
  await page.setViewportSize({ width: 400, height: 860 });
  await page.waitForTimeout(300);
  assert(!(await scrolls()), 'the detail view scrolls sideways at 400 px');
  await page.click('text=All hybrid connections');
  await shown(row('payroll'), /Connected/);
  assert(!(await scrolls()), 'the list scrolls sideways at 400 px');
  await shot('narrow', true);
  await page.setViewportSize({ width: 1280, height: 860 });

  step('delete payroll, confirmed');
  await ask({ do: 'stop-traffic' });
  await page.click(`${row('payroll')} a`);
  await page.click('#delete');
  await page.locator('#confirm').waitFor();
  assert.match(await text('#confirm-title'), /^Delete payroll\?$/);
  await page.click('#confirm-ok');
  await page.locator('#list').waitFor();
  await until('payroll gone from the list', async () => (await page.locator(row('payroll')).count()) === 0);
  await shown(row('billing'), /Not connected/);
  assert.deepEqual((await direct('GET', '/api/v1/hcs')).body.map((hc) => hc.name), ['billing']);

  step('manage keys: regenerate the secondary, then the primary this tab signed in with');
  const before = (await direct('GET', '/api/v1/manage-keys')).body;
  await until('the manage keys shown', async () =>
    (await text('#mk-primary')) === before.primary && (await text('#mk-secondary')) === before.secondary);
  await page.click('[data-manage-key="secondary"]');
  await page.locator('#confirm').waitFor();
  assert.match(await text('#confirm-title'), /^Regenerate the secondary manage key\?$/);
  assert.doesNotMatch(await text('#confirm-text'), /This tab/);
  await page.click('#confirm-ok');
  await until('a new secondary manage key', async () => (await text('#mk-secondary')) !== before.secondary);
  const secondary = await text('#mk-secondary');
  assert.equal((await direct('GET', '/api/v1/status', undefined, before.secondary)).status, 401);
  assert.equal((await direct('GET', '/api/v1/status', undefined, secondary)).status, 200);
  assert.equal(await text('#mk-primary'), before.primary, 'only the secondary changed');
  await page.click('[data-manage-key="primary"]');
  await page.locator('#confirm').waitFor();
  assert.match(await text('#confirm-text'), /This tab signed in with it and switches to the new key/);
  await page.click('#confirm-ok');
  await until('a new primary manage key', async () => (await text('#mk-primary')) !== before.primary);
  const primary = await text('#mk-primary');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('hybridlink.manageKey')), primary);
  assert.equal((await direct('GET', '/api/v1/status', undefined, before.primary)).status, 401);
  harnessKey = primary;
  assert.deepEqual((await direct('GET', '/api/v1/manage-keys')).body, { primary, secondary });
  // The tab goes on with the new key: the list still refreshes.
  await page.waitForTimeout(2500);
  assert(await page.locator('#list').isVisible(), 'the tab was signed out');
  await shown(row('billing'), /Not connected/);
  await shot('manage-keys', true);

  step('an Azure-protocol listener (hyco-ws) on billing: Connected, listed as its own kind');
  const billing = (await direct('GET', '/api/v1/hcs/billing/keys')).body.connection_strings.listen.primary;
  await ask({ do: 'azure-listener', connection_string: billing });
  await shown(row('billing'), /Connected \(1 Azure-protocol listener\)/);
  await page.click(`${row('billing')} a`);
  await shown('#d-status', /^Connected \(1 Azure-protocol listener\)$/);
  await shown('#agent-rows', /Azure-protocol listener/);
  await shown('#agent-rows', /relay sees payload/);
  assert.equal(await page.locator('#agent-rows tr').count(), 1);
  assert(await page.locator('#agents-empty').isHidden(), 'the page says no agent is connected');
  await shot('azure-listener', true);
  await ask({ do: 'stop-azure-listeners' });
  await shown('#d-status', /^Not connected$/);
  await page.click('text=All hybrid connections');

  step('a key the relay refuses brings the sign-in form back, with the reason');
  await page.evaluate(() => sessionStorage.setItem('hybridlink.manageKey', 'stale'));
  await page.locator('#login').waitFor({ timeout: 10000 });
  await shown('#login-error', /^wrong manage key/);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);

  assert.deepEqual(problems, [], 'the page logged errors');
  step('all good');
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
  input.close();
  process.stdin.destroy();
}
