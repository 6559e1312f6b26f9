// The real Azure Relay HTTP client, hyco-https, as a listener behind a
// hybridlink relay, for tests/tests/azure_protocol.rs. Run with
//   RELAY=host:port HC=name LISTEN_KEY=...
// and NODE_EXTRA_CA_CERTS pointing at the relay's cert.pem. Prints
// "listening" once its control channel is up. What it answers:
//   /HC/never         nothing, ever (the sender should get 504)
//   /HC/big?n=N       N bytes of a repeating pattern
//   anything else     200 with a JSON description of the request, or, when
//                     the request has a body, that body back
// Every answer carries x-listener: hyco-https and hop-by-hop headers the
// relay must drop (Keep-Alive, and X-Hop-Resp named in Connection).
//
// The URI is written out instead of made by createRelayListenUri, which
// hard-codes port 443.
'use strict';

const crypto = require('crypto');
const https = require('hyco-https');

const { RELAY, HC, LISTEN_KEY } = process.env;
const uri = `wss://${RELAY}/$hc/${HC}?sb-hc-action=listen`;

const server = https.createRelayedServer(
  { server: uri, token: () => https.createRelayToken(uri, 'listen', LISTEN_KEY) },
  (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const url = new URL(req.url, 'https://relay');
      if (url.pathname === `/${HC}/never`) {
        return;
      }
      res.setHeader('x-listener', 'hyco-https');
      res.setHeader('Connection', 'X-Hop-Resp');
      res.setHeader('X-Hop-Resp', 'must not pass');
      res.setHeader('Keep-Alive', 'timeout=5');
      if (url.pathname === `/${HC}/big`) {
        const n = Number(url.searchParams.get('n'));
        const big = Buffer.alloc(n);
        for (let i = 0; i < n; i++) big[i] = i % 251;
        res.setHeader('content-type', 'application/octet-stream');
        res.end(big);
      } else if (body.length > 0) {
        res.setHeader('content-type', 'application/octet-stream');
        res.setHeader('x-body-sha256', crypto.createHash('sha256').update(body).digest('hex'));
        res.end(body);
      } else {
        res.setHeader('content-type', 'application/json');
        res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers }));
      }
    });
  }
);
server.on('listening', () => console.log('listening'));
server.listen();
server.on('error', (e) => console.error(`listener error: ${e.message || e}`));
