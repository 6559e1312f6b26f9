// The relay's portal: one page over the management API (/api/v1/...).
//
// The manage key (either of the relay's two) lives in sessionStorage only
// (this tab, until it closes) and goes with every call as a Bearer token; a
// 401 clears it and brings the sign-in form back with the relay's reason. Views are chosen by the
// URL fragment: `#` is the list, `#hc/NAME` one hybrid connection. Status
// is polled every POLL_MS; the charts are drawn from those samples, kept
// in memory for HISTORY_MS.
'use strict';

const KEY = 'hybridlink.manageKey';
const POLL_MS = 2000;
const HISTORY_MS = 5 * 60 * 1000;
// Agents report their counters every 2 s; a rate over a longer window
// does not alternate between 0 and double when polls and reports drift.
const RATE_WINDOW_MS = 6000;

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

/** Samples per hybrid connection, oldest first: `{t, bytes, open}`. */
const samples = new Map();
/** The hybrid connection shown in detail, or null when the list is. */
let current = null;
let pollTimer = 0;
let pollRound = 0;
let noticeTimer = 0;

/** Thrown after a 401 has brought the sign-in form back. */
class SignedOut extends Error {}

/** Calls the API with the manage key; resolves to the JSON answer. */
async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY) ?? ''}` };
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error(`the relay did not answer (${e.message})`);
  }
  const answer = await response.json().catch(() => ({}));
  if (response.status === 401) {
    signOut(answer.error ?? 'the relay refused the manage key');
    throw new SignedOut();
  }
  if (!response.ok) {
    const error = new Error(answer.error ?? `${method} ${path} answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return answer;
}

/** Runs a user's action; its error, if any, goes into `out`. */
async function attempt(out, action) {
  out.textContent = '';
  try {
    await action();
  } catch (e) {
    if (!(e instanceof SignedOut)) out.textContent = e.message;
  }
}

/** Says something in the status line for a while. */
function say(text) {
  clearTimeout(noticeTimer);
  $('notice').textContent = text;
  noticeTimer = setTimeout(() => ($('notice').textContent = ''), 10000);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

/** Sets a node's text only when it changed (no needless redraws). */
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function bytes(n) {
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

function ago(unix) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

const plural = (n, one) => `${n} ${one}${n === 1 ? '' : 's'}`;

/** Azure-protocol listeners (hyco-ws, .NET, Java clients) of a status. */
const azureListeners = (s) => s.azure_listeners ?? [];

function statusText(s) {
  const parts = [];
  if (s.listener_count) parts.push(plural(s.listener_count, 'agent'));
  const azure = azureListeners(s).length;
  if (azure) parts.push(plural(azure, 'Azure-protocol listener'));
  return parts.length ? `Connected (${parts.join(', ')})` : 'Not connected';
}

function setBadge(node, s) {
  setText(node, statusText(s));
  node.classList.toggle('on', s.listener_count + azureListeners(s).length > 0);
}

// --- views -----------------------------------------------------------------

function show(view) {
  for (const id of ['login', 'list', 'detail']) $(id).hidden = id !== view;
  $('sign-out').hidden = view === 'login';
  document.title = view === 'detail' ? `${current} · hybridlink relay` : 'hybridlink relay';
}

function signOut(reason) {
  sessionStorage.removeItem(KEY);
  clearTimeout(pollTimer);
  pollRound += 1;
  if ($('confirm').open) $('confirm').close();
  show('login');
  $('login-error').textContent = reason;
  if (reason) $('login-key').focus();
}

/** Shows the view the URL names, and starts polling for it. */
function route() {
  if (!sessionStorage.getItem(KEY)) {
    show('login');
    return;
  }
  const match = /^#hc\/(.+)$/.exec(location.hash);
  current = match ? decodeURIComponent(match[1]) : null;
  show(current ? 'detail' : 'list');
  if (current) openDetail(current);
  else loadManageKeys();
  poll();
}

async function poll() {
  clearTimeout(pollTimer);
  const round = ++pollRound;
  const name = current;
  try {
    const list = name
      ? [await api('GET', `/api/v1/hcs/${enc(name)}/status`)]
      : await api('GET', '/api/v1/status');
    const registry = await api('GET', '/api/v1/registry');
    if (round !== pollRound) return;
    record(list);
    if (name) renderDetail(list[0]);
    else renderList(list);
    $('offline').hidden = true;
    showRegistry(registry);
  } catch (e) {
    if (e instanceof SignedOut || round !== pollRound) return;
    if (name && e.status === 404) {
      say(`${name} no longer exists.`);
      location.hash = '';
      return;
    }
    $('offline').textContent = `Could not refresh: ${e.message}. Trying again.`;
    $('offline').hidden = false;
  }
  pollTimer = setTimeout(poll, POLL_MS);
}

// A relay on etcd that cannot reach it serves what it knows and refuses
// changes: say so, with since when and why.
function showRegistry(health) {
  const banner = $('registry-down');
  if (health.writable) {
    banner.hidden = true;
    return;
  }
  const since = new Date(health.since_unix * 1000).toLocaleTimeString();
  banner.textContent = `The registry's store (${health.store}) does not answer since ${since}: ` +
    `this relay keeps serving the hybrid connections it knows, but refuses changes until it answers (${health.error}).`;
  banner.hidden = false;
}

function record(list) {
  const t = Date.now();
  for (const s of list) {
    const kept = (samples.get(s.name) ?? []).filter((p) => p.t > t - HISTORY_MS);
    kept.push({ t, bytes: s.streams.bytes_to_target + s.streams.bytes_from_target, open: s.streams.open });
    samples.set(s.name, kept);
  }
}

// Rows are updated in place, so a focused link keeps its focus across polls.
function renderList(list) {
  const body = $('hc-rows');
  const rows = new Map([...body.rows].map((row) => [row.dataset.name, row]));
  list.forEach((s, i) => {
    let row = rows.get(s.name);
    rows.delete(s.name);
    if (!row) {
      row = el('tr', { 'data-name': s.name },
        el('th', { scope: 'row' }, el('a', { href: `#hc/${enc(s.name)}` }, s.name)),
        el('td', { 'data-label': 'Endpoint' }),
        el('td', { 'data-label': 'Status' }, el('span', { class: 'badge' })),
        el('td', { 'data-label': 'Open streams', class: 'num' }),
        el('td', { 'data-label': 'Bytes to / from target', class: 'num' }));
    }
    if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] ?? null);
    setText(row.cells[1], s.endpoint);
    setBadge(row.cells[2].firstChild, s);
    setText(row.cells[3], String(s.streams.open));
    setText(row.cells[4], `${bytes(s.streams.bytes_to_target)} / ${bytes(s.streams.bytes_from_target)}`);
  });
  for (const gone of rows.values()) gone.remove();
  $('hc-table').hidden = list.length === 0;
  $('list-empty').hidden = list.length > 0;
}

/** Fills the parts of the detail view that do not change with polls. */
async function openDetail(name) {
  $('d-name').textContent = name;
  for (const id of ['d-error', 'endpoint-error', 'keys-error', 'd-endpoint', 'd-status']) $(id).textContent = '';
  $('d-host').value = '';
  $('d-port').value = '';
  showStrings(null);
  $('agent-rows').replaceChildren();
  drawCharts(name);
  await attempt($('d-error'), async () => {
    const [hc, keys] = await Promise.all([
      api('GET', `/api/v1/hcs/${enc(name)}`),
      api('GET', `/api/v1/hcs/${enc(name)}/keys`),
    ]);
    if (name !== current) return;
    $('d-endpoint').textContent = hc.endpoint;
    $('d-host').value = hc.host;
    $('d-port').value = hc.port;
    showStrings(keys.connection_strings);
  });
}

function showStrings(strings) {
  for (const rule of ['send', 'listen']) {
    for (const key of ['primary', 'secondary']) {
      $(`cs-${rule}-${key}`).textContent = strings ? strings[rule][key] : '';
    }
  }
  // The string goes on standard input: on a command line every user of
  // the machine could read it.
  $('setup-command').textContent = strings
    ? `hybridlink agent install --connection-string-file - <<'EOF'\n${strings.listen.primary}\nEOF`
    : '';
}

function renderDetail(s) {
  setBadge($('d-status'), s);
  setText($('d-endpoint'), s.endpoint);
  const st = s.streams;
  const figures = [
    ['Open streams', String(st.open)],
    ['Streams opened', String(st.opened)],
    ['Refused', String(st.refused)],
    ['Bytes to target', bytes(st.bytes_to_target)],
    ['Bytes from target', bytes(st.bytes_from_target)],
  ];
  $('d-streams').replaceChildren(
    ...figures.map(([term, value]) => el('div', {}, el('dt', {}, term), el('dd', {}, value))));
  const since = (unix) => el('time', { datetime: new Date(unix * 1000).toISOString() },
    `${new Date(unix * 1000).toLocaleString()} (${ago(unix)})`);
  // An Azure-protocol listener is not an agent: the relay ends its TLS and
  // relays its WebSocket messages, so it sees what passes.
  const azureRows = azureListeners(s).map((l) => el('tr', {},
    el('td', { 'data-label': 'Address' }, l.address),
    el('td', { 'data-label': 'Agent' }, 'Azure-protocol listener'),
    el('td', { 'data-label': 'Connected since' }, since(l.connected_since)),
    el('td', { 'data-label': 'End-to-end' },
      el('span', { class: 'badge',
        title: 'an Azure Relay client: the relay terminates its TLS and sees the payload, as Azure\'s service does' },
        'relay sees payload')),
    el('td', { 'data-label': 'On-prem policy', class: 'policy' }, 'its own (not a hybridlink agent)'),
    el('td', { 'data-label': 'Open streams', class: 'num' }, '–'),
    el('td', { 'data-label': 'Bytes to / from target', class: 'num' }, '–')));
  // On a relay cluster every node's agents, each labelled with its node.
  const cluster = s.cluster ?? [];
  const agents = cluster.length
    ? cluster.flatMap((n) => n.listeners.map((l) => ({ ...l, node: n.node })))
    : s.listeners;
  $('agent-rows').replaceChildren(...agents.map((l) => el('tr', {},
    el('td', { 'data-label': 'Address' }, l.node ? `${l.address} on ${l.node}` : l.address),
    el('td', { 'data-label': 'Agent' }, l.label),
    el('td', { 'data-label': 'Connected since' }, since(l.connected_since)),
    el('td', { 'data-label': 'End-to-end' },
      el('span', { class: l.end_to_end === 'verified' ? 'badge on' : 'badge',
        title: l.end_to_end === 'verified'
          ? 'sender and agent prove an end-to-end key the relay never sees'
          : 'no end-to-end key: a relay that lies about the ends could read this traffic' },
        l.end_to_end === 'verified' ? 'end-to-end: verified' : 'relay-trusted')),
    el('td', { 'data-label': 'On-prem policy', class: 'policy' },
      l.policy_refusal ? l.policy_refusal : 'allows the endpoint'),
    el('td', { 'data-label': 'Open streams', class: 'num' }, String(l.streams.open)),
    el('td', { 'data-label': 'Bytes to / from target', class: 'num' },
      `${bytes(l.streams.bytes_to_target)} / ${bytes(l.streams.bytes_from_target)}`))), ...azureRows);
  const rows = agents.length + azureRows.length;
  $('agents-empty').hidden = rows > 0;
  $('agent-rows').closest('table').hidden = rows === 0;
  $('nodes-card').hidden = cluster.length === 0;
  $('node-rows').replaceChildren(...cluster.map((n) => el('tr', {},
    el('td', { 'data-label': 'Node' }, n.node),
    el('td', { 'data-label': 'State' },
      el('span', { class: n.node_state === 'up' ? 'badge on' : 'badge' }, n.node_state.replaceAll('_', ' '))),
    el('td', { 'data-label': 'Agents', class: 'num' }, String(n.listener_count)),
    el('td', { 'data-label': 'Senders', class: 'num' }, String(n.senders)),
    el('td', { 'data-label': 'Pipes', class: 'num' }, String(n.pipes)),
    el('td', { 'data-label': 'Open streams', class: 'num' }, String(n.streams.open)))));
  drawCharts(s.name);
}

// --- charts ----------------------------------------------------------------

function drawCharts(name) {
  const points = samples.get(name) ?? [];
  const now = Date.now();
  // The x axis spans the samples we have (at least 10 s, at most HISTORY_MS).
  const span = Math.min(HISTORY_MS, Math.max(10000, now - (points[0]?.t ?? now)));
  const rates = [];
  let from = 0;
  points.forEach((p, i) => {
    while (p.t - points[from].t > RATE_WINDOW_MS) from += 1;
    const q = points[from];
    if (p.t - q.t >= 1000) rates.push({ t: p.t, v: Math.max(0, ((p.bytes - q.bytes) * 1000) / (p.t - q.t)) });
  });
  const opens = points.map((p) => ({ t: p.t, v: p.open }));
  const last = span >= 60000 ? `last ${Math.round(span / 60000)} min` : `last ${Math.round(span / 1000)} s`;
  const rate = rates.at(-1)?.v ?? 0;
  const peakRate = plot($('chart-bytes'), rates, now, span);
  $('cap-bytes').textContent =
    `Bytes/s to + from target, ${last}: now ${bytes(Math.round(rate))}/s, peak ${bytes(Math.round(peakRate))}/s`;
  const peakOpen = plot($('chart-open'), opens, now, span);
  $('cap-open').textContent =
    `Open streams, ${last}: now ${opens.at(-1)?.v ?? 0}, peak ${peakOpen}`;
}

/** Draws `series` (`{t, v}`) as a line over an area, scaled to its peak. */
function plot(svg, series, now, span) {
  const [width, height] = [300, 80];
  const peak = Math.max(0, ...series.map((p) => p.v));
  const x = (p) => (width - ((now - p.t) / span) * width).toFixed(1);
  const y = (p) => (height - 1 - (peak ? (p.v / peak) * (height - 8) : 0)).toFixed(1);
  const line = series.map((p) => `${x(p)},${y(p)}`).join(' ');
  const parts = [svgEl('line', { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, class: 'axis' })];
  if (series.length > 1) {
    const base = `${x(series.at(-1))},${height} ${x(series[0])},${height}`;
    parts.push(svgEl('polygon', { points: `${line} ${base}`, class: 'area' }));
    parts.push(svgEl('polyline', { points: line, class: 'line' }));
  }
  svg.replaceChildren(...parts);
  return peak;
}

// --- dialogs and actions ---------------------------------------------------

let confirmRound = 0;

/** Asks to confirm `action`; resolves true only for the confirm button. */
function confirmAction(title, text, action) {
  const dialog = $('confirm');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = action;
  const opener = document.activeElement;
  const round = ++confirmRound;
  dialog.returnValue = '';
  dialog.showModal();
  // The safe choice first: Enter right away cancels; Escape always does.
  $('confirm-cancel').focus();
  return new Promise((resolve) => {
    const closed = () => {
      // A 'close' event is dispatched a moment after the dialog closed: a
      // fast keyboard can open it again first, and the late event then
      // belongs to an earlier round. Only a close of the open round counts.
      if (dialog.open) return;
      dialog.removeEventListener('close', closed);
      if (round !== confirmRound) {
        resolve(false);
        return;
      }
      if (opener instanceof HTMLElement && opener.isConnected) opener.focus();
      resolve(dialog.returnValue === 'ok');
    };
    dialog.addEventListener('close', closed);
  });
}

const CONSEQUENCES = {
  listen: (key) =>
    `Agents using the listen ${key} string are disconnected now and refused at every ` +
    'reconnection, until they are given the new string (run the setup command again ' +
    'with it). Streams they carry now go on until they end.',
  send: (key) =>
    `Applications, appliances and forwarders using the send ${key} string are disconnected ` +
    'now and refused at their next connection, until they are given the new string. ' +
    'Connections already open go on until they end.',
};

async function regenerate(rule, key) {
  const name = current;
  const ok = await confirmAction(
    `Regenerate the ${rule} ${key} key of ${name}?`,
    CONSEQUENCES[rule](key),
    `Regenerate ${rule} ${key}`);
  if (!ok) return;
  await attempt($('keys-error'), async () => {
    const keys = await api('POST', `/api/v1/hcs/${enc(name)}/keys/regenerate`, { rule, key });
    if (name !== current) return;
    showStrings(keys.connection_strings);
    say(`The ${rule} ${key} key of ${name} is new: hand out its new string.`);
  });
}

/** Shows the relay's two manage keys; `null` clears them. */
function showManageKeys(keys) {
  for (const slot of ['primary', 'secondary']) $(`mk-${slot}`).textContent = keys ? keys[slot] : '';
}

async function loadManageKeys() {
  showManageKeys(null);
  await attempt($('manage-error'), async () => showManageKeys(await api('GET', '/api/v1/manage-keys')));
}

async function regenerateManageKey(slot) {
  // When this tab signed in with the key being replaced, it moves to the
  // new one rather than being signed out by its next call.
  const mine = sessionStorage.getItem(KEY) === $(`mk-${slot}`).textContent;
  const ok = await confirmAction(
    `Regenerate the ${slot} manage key?`,
    `Every tool, script and browser that uses the ${slot} manage key is refused from now on, ` +
      'until it is given the new one; the other key keeps working.' +
      (slot === 'primary' ? ' The relay writes the new primary to manage.key.' : '') +
      (mine ? ' This tab signed in with it and switches to the new key.' : ''),
    `Regenerate ${slot}`);
  if (!ok) return;
  // No refresh in flight with the old key while it is replaced.
  clearTimeout(pollTimer);
  pollRound += 1;
  await attempt($('manage-error'), async () => {
    const keys = await api('POST', '/api/v1/manage-keys/regenerate', { key: slot });
    if (mine) sessionStorage.setItem(KEY, keys[slot]);
    showManageKeys(keys);
    say(`The ${slot} manage key is new${mine ? ', and this tab uses it' : ''}: ` +
      'hand it to the tools that used the old one.');
  });
  if (sessionStorage.getItem(KEY)) poll();
}

async function copy(button) {
  const source = $(button.dataset.copy);
  if (!source.textContent) return;
  try {
    await navigator.clipboard.writeText(source.textContent);
    button.textContent = 'Copied';
    setTimeout(() => (button.textContent = 'Copy'), 2000);
    say('Copied to the clipboard.');
  } catch {
    // No clipboard API here (a plain-HTTP origin other than loopback, or
    // permission refused): select the text so that Ctrl+C copies it.
    getSelection().selectAllChildren(source);
    say('The browser does not let this page copy: the text is selected, press Ctrl+C.');
  }
}

/** A port as the API takes it: a number, or the text (the API says why not). */
function port(text) {
  const t = text.trim();
  return /^\d+$/.test(t) ? Number(t) : t;
}

$('login-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const key = $('login-key').value.trim();
  if (!key) {
    $('login-error').textContent = 'Enter the manage key.';
    return;
  }
  sessionStorage.setItem(KEY, key);
  await attempt($('login-error'), async () => {
    await api('GET', '/api/v1/status');
    $('login-key').value = '';
    route();
    document.querySelector('section:not([hidden]) h1').focus();
  });
});

$('sign-out').addEventListener('click', () => {
  signOut('');
  $('login-key').focus();
});

$('create-form').addEventListener('submit', (event) => {
  event.preventDefault();
  attempt($('create-error'), async () => {
    const hc = await api('POST', '/api/v1/hcs', {
      name: $('new-name').value.trim(),
      host: $('new-host').value.trim(),
      port: port($('new-port').value),
    });
    event.target.reset();
    say(`Created ${hc.name}; open it for its connection strings.`);
    poll();
  });
});

$('endpoint-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const name = current;
  attempt($('endpoint-error'), async () => {
    const hc = await api('PATCH', `/api/v1/hcs/${enc(name)}`, {
      host: $('d-host').value.trim(),
      port: port($('d-port').value),
    });
    $('d-endpoint').textContent = hc.endpoint;
    say(`The endpoint of ${name} is now ${hc.endpoint}.`);
  });
});

$('delete').addEventListener('click', async () => {
  const name = current;
  const ok = await confirmAction(
    `Delete ${name}?`,
    'Its four connection strings stop working at once: connected agents and applications ' +
      'are disconnected, and its keys are gone for good. This cannot be undone.',
    `Delete ${name}`);
  if (!ok) return;
  await attempt($('d-error'), async () => {
    await api('DELETE', `/api/v1/hcs/${enc(name)}`);
    samples.delete(name);
    say(`Deleted ${name}.`);
    location.hash = '';
  });
});

$('manage-keys').addEventListener('click', (event) => {
  const button = event.target.closest('button');
  if (button?.dataset.copy) copy(button);
  else if (button?.dataset.manageKey) regenerateManageKey(button.dataset.manageKey);
});

$('detail').addEventListener('click', (event) => {
  const button = event.target.closest('button');
  if (button?.dataset.copy) copy(button);
  else if (button?.dataset.rule) regenerate(button.dataset.rule, button.dataset.key);
});

window.addEventListener('hashchange', () => {
  route();
  // Keyboard and screen-reader users land on the new view's heading.
  document.querySelector('section:not([hidden]) h1')?.focus();
});

route();
