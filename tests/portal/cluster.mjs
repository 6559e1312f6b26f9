// The portal of one node of a relay cluster, in a real browser (Debian's
// chromium driven by playwright-core): the detail view of a hybrid
// connection shows every relay node with its state, and every node's agents
// labelled with their node. Run by tests/tests/relay_cluster.rs, which
// starts etcd, three nodes and an agent, and passes, in env:
//
//   HYBRIDLINK_API                 http://127.0.0.1:PORT, node 1's --api address
//   HYBRIDLINK_MANAGE_KEY          its manage key
//   HYBRIDLINK_NODES               the three nodes' addresses, comma-separated
//   HYBRIDLINK_PORTAL_SCREENSHOTS  where to write the screenshot
//   CHROMIUM                       the browser (default /usr/bin/chromium)

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const api = process.env.HYBRIDLINK_API;
const key = process.env.HYBRIDLINK_MANAGE_KEY;
const nodes = (process.env.HYBRIDLINK_NODES ?? '').split(',').filter(Boolean);
const shots = process.env.HYBRIDLINK_PORTAL_SCREENSHOTS ?? 'portal-screenshots';
assert(api && key && nodes.length === 3, 'HYBRIDLINK_API, HYBRIDLINK_MANAGE_KEY and three HYBRIDLINK_NODES are needed');

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
const page = context.pages()[0] ?? (await context.newPage());
const problems = [];
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
try {
  await page.goto(`${api}/`);
  await page.locator('#login-key').fill(key);
  await page.keyboard.press('Enter');
  await page.locator('#list').waitFor();
  await page.goto(`${api}/#hc/payroll`);

  console.log('-- the Relay nodes card lists the three nodes, each up');
  await until('three nodes, up', async () => {
    if (await page.locator('#nodes-card').isHidden()) return 'the card is hidden';
    const rows = await page.locator('#node-rows tr').allInnerTexts();
    const up = nodes.every((n) => rows.some((r) => r.includes(n) && /\bup\b/.test(r)));
    return (rows.length === 3 && up) || JSON.stringify(rows);
  });
  console.log("-- the agent is shown once per node, labelled with that node");
  await until('the agent on every node', async () => {
    const rows = await page.locator('#agent-rows tr').allInnerTexts();
    const labelled = nodes.every((n) => rows.some((r) => r.includes(` on ${n}`)));
    return (rows.length === 3 && labelled) || JSON.stringify(rows);
  });
  await page.screenshot({ path: join(shots, 'portal-cluster.png'), fullPage: true });
  assert.deepEqual(problems, []);
  console.log('-- ok');
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
