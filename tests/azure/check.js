// The real Azure Relay Node client, hyco-ws, against a hybridlink relay:
// one listener that echoes every message, and senders that check what comes
// back. Run by tests/tests/azure_protocol.rs with
//   RELAY=host:port HC=name SEND_KEY=... LISTEN_KEY=... WRONG_KEY=...
// and NODE_EXTRA_CA_CERTS pointing at the relay's cert.pem. Prints one line
// per check and exits 0 when all passed.
//
// The URIs are written out instead of made by createRelayListenUri /
// createRelaySendUri, which hard-code port 443.
'use strict';

const crypto = require('crypto');
const WebSocket = require('hyco-ws');

const { RELAY, HC, SEND_KEY, LISTEN_KEY, WRONG_KEY } = process.env;
const base = `wss://${RELAY}/$hc/${HC}`;
const listenUri = `${base}?sb-hc-action=listen`;
const sendUri = `${base}?sb-hc-action=connect`;

const fail = (what) => {
  console.error(`FAILED: ${what}`);
  process.exit(1);
};
setTimeout(() => fail('the checks took longer than 60 s'), 60000).unref();

const events = [];
const server = WebSocket.createRelayedServer(
  {
    server: listenUri,
    token: () => WebSocket.createRelayToken(listenUri, 'listen', LISTEN_KEY),
  },
  (ws) => {
    events.push('listener: connection');
    ws.on('message', (data, flags) => ws.send(data, { binary: !!(flags && flags.binary) }));
    ws.on('close', () => events.push('listener: closed'));
  }
);
server.on('error', (e) => console.error(`listener error: ${e.message || e}`));

// Opens a sender; resolves with it once open.
function open(uri, token) {
  return new Promise((resolve, reject) => {
    const ws = token ? WebSocket.relayedConnect(uri, token) : new WebSocket(uri);
    ws.on('open', () => resolve(ws));
    ws.on('error', reject);
  });
}

// Sends `data`, resolves with the next message that comes back.
function roundTrip(ws, data, binary) {
  return new Promise((resolve) => {
    ws.once('message', (reply, flags) => resolve({ reply, binary: !!(flags && flags.binary) }));
    ws.send(data, { binary });
  });
}

async function main() {
  await new Promise((resolve) => server.once('listening', resolve));
  console.log('ok: listener attached');

  const sender = await open(sendUri, WebSocket.createRelayToken(sendUri, 'send', SEND_KEY));
  let { reply, binary } = await roundTrip(sender, 'hello, relay', false);
  if (binary || reply !== 'hello, relay') fail(`text echo: ${binary} ${reply}`);
  console.log('ok: text');

  const big = crypto.randomBytes(1 << 20);
  ({ reply, binary } = await roundTrip(sender, big, true));
  if (!binary || !Buffer.isBuffer(reply) || !reply.equals(big)) {
    fail(`1 MiB binary echo (${reply && reply.length} bytes, binary ${binary})`);
  }
  console.log('ok: 1 MiB binary, byte-exact');

  const got = [];
  await new Promise((resolve) => {
    sender.on('message', (m) => {
      got.push(m);
      if (got.length === 100) resolve();
    });
    for (let i = 0; i < 100; i++) sender.send(`message ${i}`);
  });
  sender.removeAllListeners('message');
  got.forEach((m, i) => {
    if (m !== `message ${i}`) fail(`message ${i} came back as ${m}`);
  });
  console.log('ok: 100 messages in order');

  await new Promise((resolve) => {
    sender.on('close', resolve);
    sender.close(1000, 'done');
  });
  // The listener's side of that connection closes too.
  for (let i = 0; i < 50 && !events.includes('listener: closed'); i++) {
    await new Promise((r) => setTimeout(r, 100));
  }
  if (!events.includes('listener: closed')) fail(`the listener's end did not close: ${events}`);
  console.log('ok: close');

  const withQueryToken = await open(WebSocket.appendRelayToken(sendUri, 'send', SEND_KEY));
  ({ reply } = await roundTrip(withQueryToken, 'token in the query', false));
  if (reply !== 'token in the query') fail(`query-token echo: ${reply}`);
  withQueryToken.close();
  console.log('ok: query-string token');

  const refused = await open(sendUri, WebSocket.createRelayToken(sendUri, 'send', WRONG_KEY)).then(
    () => fail('a token signed with a wrong key was accepted'),
    (e) => String(e.message || e)
  );
  if (!refused.includes('401')) fail(`wrong key: expected 401, got ${refused}`);
  console.log('ok: wrong key refused with 401');

  server.close();
  console.log('all checks passed');
  process.exit(0);
}

main().catch((e) => fail(e.stack || e));
