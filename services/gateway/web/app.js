// Flash-sale storefront: vanilla JS, no build step. Talks to the gateway's REST
// API on the same origin with a bearer token kept in sessionStorage.
// One file on purpose, though longer than ~400 lines: with no build step or
// module loader it is served as compiled into the gateway; the `// ---- …`
// sections below (session, tabs, shop, order updates, history, admin) are its parts.
'use strict';

const FINAL = new Set(['CONFIRMED', 'REJECTED', 'REFUNDED']);
const USER_RE = /^[A-Za-z0-9_-]{1,64}$/;
const FRIENDLY = {
  SALE_NOT_STARTED: 'The sale has not started yet', SALE_ENDED: 'The sale has ended', SOLD_OUT: 'Sold out',
  NOT_ENOUGH_STOCK: 'Not that many left', LIMIT_REACHED: 'You reached the per-person limit', PURCHASE_IN_PROGRESS: 'A purchase is already in progress',
  INSUFFICIENT_FUNDS: 'Not enough money in your wallet', RATE_LIMITED: 'Too many requests, try again shortly',
  UNAVAILABLE: 'The service is busy, try again', UNAUTHENTICATED: 'Please sign in again', FORBIDDEN: 'Not allowed',
  ORDER_NOT_REFUNDABLE: 'This order cannot be refunded', NETWORK: 'Could not reach the server',
};

const $ = (id) => document.getElementById(id);
const state = { token: null, user: null, admin: false, tab: 'shop', items: new Map(), itemsSeq: 0, itemsTimer: 0, statsTimer: 0, historyToken: '', signin: null, aborter: new AbortController() };

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}
const describe = (e) => e instanceof ApiError
  ? `${e.code}: ${FRIENDLY[e.code] && FRIENDLY[e.code] !== e.message ? `${FRIENDLY[e.code]} (${e.message})` : e.message}`
  : `ERROR: ${e.message || e}`;
const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const isAbort = (e) => e && e.name === 'AbortError';

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID(); // only in secure contexts
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

async function errorFrom(res) {
  let err = null;
  try { err = (await res.json()).error; } catch { /* not JSON */ }
  return new ApiError(res.status, err?.code || `HTTP_${res.status}`, err?.message || res.statusText || 'request failed');
}

async function api(path, { method = 'GET', body, headers = {}, signal = state.aborter.signal } = {}) {
  const h = { Accept: 'application/json', ...headers };
  if (state.token) h.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) h['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (e) {
    if (isAbort(e)) throw e;
    throw new ApiError(0, 'NETWORK', 'could not reach the server');
  }
  if (!res.ok) {
    const err = await errorFrom(res);
    if (res.status === 401 && state.token) signOut('Your session expired: please sign in again.');
    throw err;
  }
  return res.status === 204 ? null : res.json();
}
const enc = encodeURIComponent;

// ---- formatting ----
function money(m) {
  if (!m) return '—';
  const major = Number(m.amount_minor) / 100;
  try { return new Intl.NumberFormat(undefined, { style: 'currency', currency: m.currency }).format(major); }
  catch { return `${major.toFixed(2)} ${m.currency}`; }
}
const shortId = (id) => String(id).slice(0, 8);
const when = (ts) => (ts ? new Date(ts).toLocaleString() : '—');
function duration(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60, sec = s % 60;
  const p2 = (n) => String(n).padStart(2, '0');
  if (d) return `${d}d ${h}h ${p2(m)}m`;
  if (h) return `${h}h ${p2(m)}m ${p2(sec)}s`;
  return m ? `${m}m ${p2(sec)}s` : `${sec}s`;
}
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'testid') node.dataset.testid = v;
    else if (k === 'class') node.className = v;
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}
function say(id, text, kind = '') { const n = $(id); n.textContent = text; n.dataset.kind = kind; }

// ---- session ----
function decodeClaims(token) {
  try { return JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))); } catch { return {}; }
}
function startSession(token, user, admin) {
  Object.assign(state, { token, user, admin });
  sessionStorage.setItem('flashsale.session', JSON.stringify({ token, user, admin }));
  $('signin').hidden = true; $('app').hidden = false; $('session').hidden = false;
  $('signed-in-as').textContent = `Signed in as ${user}${admin ? ' (admin)' : ''}`;
  $('tab-admin').hidden = !admin;
  say('notice', '');
  selectTab('shop');
  refreshWallet();
}
function signOut(message = '') {
  state.aborter.abort();
  state.aborter = new AbortController();
  clearInterval(state.itemsTimer); stopStats();
  Object.assign(state, { token: null, user: null, admin: false });
  state.items.clear();
  sessionStorage.removeItem('flashsale.session');
  $('items').replaceChildren(); $('orders').replaceChildren(); $('admin-stats').replaceChildren();
  for (const id of ['shop-message', 'history-message', 'admin-message']) say(id, '');
  $('app').hidden = true; $('session').hidden = true; $('signin').hidden = false;
  say('notice', message);
  showSignIn();
}
async function signIn(event) {
  event.preventDefault();
  const user = $('signin-user').value.trim(), admin = $('signin-admin').checked;
  if (!USER_RE.test(user)) return say('signin-message', 'INVALID_ARGUMENT: the user name must be 1–64 letters, digits, “_” or “-”.', 'error');
  say('signin-message', 'Signing in…');
  try {
    const { token } = await api('/v1/dev/token', { method: 'POST', body: { user_id: user, admin } });
    say('signin-message', '');
    startSession(token, user, admin);
  } catch (e) {
    if (e.status === 404) {
      $('signin-form').hidden = true; $('token-form').hidden = false;
      say('signin-message', 'Development sign-in is disabled: paste a bearer token instead.', 'error');
      $('token-input').focus();
    } else say('signin-message', describe(e), 'error');
  }
}
// ---- sign-in at the identity provider: authorization code with PKCE (RFC 7636, S256) ----
const b64url = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
const randomKey = () => b64url(crypto.getRandomValues(new Uint8Array(32)));
const redirectUri = () => `${location.origin}/`;
function rolesSayAdmin(claims) {
  const roles = claims[state.signin?.roles_claim || 'roles'];
  return Array.isArray(roles) ? roles.includes('admin') : roles === 'admin';
}
async function providerSignIn() {
  const p = state.signin;
  const verifier = randomKey(), check = randomKey();
  const challenge = b64url(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier)));
  // Only this tab, only until the provider sends the buyer back.
  sessionStorage.setItem('flashsale.pkce', JSON.stringify({ verifier, state: check }));
  const url = new URL(p.authorization_endpoint);
  const query = { response_type: 'code', client_id: p.client_id, redirect_uri: redirectUri(), scope: p.scope, state: check,
    code_challenge: challenge, code_challenge_method: 'S256', audience: p.audience };
  for (const [k, v] of Object.entries(query)) if (v) url.searchParams.set(k, v);
  location.assign(url.toString());
}
async function finishProviderSignIn(query) {
  let pending = null;
  try { pending = JSON.parse(sessionStorage.getItem('flashsale.pkce')); } catch { /* none */ }
  sessionStorage.removeItem('flashsale.pkce');
  history.replaceState(null, '', '/'); // the code is single-use: keep it out of the history
  if (query.get('error')) return say('signin-message', `The sign-in was refused: ${query.get('error_description') || query.get('error')}`, 'error');
  if (!pending || pending.state !== query.get('state')) return say('signin-message', 'This sign-in did not start here (state mismatch): please sign in again.', 'error');
  say('signin-message', 'Signing in…');
  const p = state.signin;
  try {
    const res = await fetch(p.token_endpoint, {
      method: 'POST', cache: 'no-store',
      body: new URLSearchParams({ grant_type: 'authorization_code', code: query.get('code'), redirect_uri: redirectUri(),
        client_id: p.client_id, code_verifier: pending.verifier }),
    });
    const reply = await res.json().catch(() => ({}));
    if (!res.ok || !reply.access_token) throw new Error(reply.error_description || reply.error || `the token endpoint answered ${res.status}`);
    const claims = decodeClaims(reply.access_token);
    say('signin-message', '');
    startSession(reply.access_token, claims.sub || 'signed-in user', rolesSayAdmin(claims));
  } catch (e) { say('signin-message', `Sign-in failed: ${e.message}`, 'error'); }
}
/** Shows the sign-in this server offers (GET /v1/signin). */
async function showSignIn() {
  try { state.signin = await api('/v1/signin'); } catch (e) { state.signin = { method: 'development' }; }
  const method = state.signin.method;
  $('signin-form').hidden = method !== 'development';
  $('provider-signin').hidden = method !== 'provider';
  $('token-form').hidden = method !== 'pasted_token';
  if (method === 'provider') { $('provider-name').textContent = new URL(state.signin.issuer).host; $('signin-provider').focus(); }
  else if (method === 'pasted_token') $('token-input').focus();
  else $('signin-user').focus();
}

function useToken(event) {
  event.preventDefault();
  const token = $('token-input').value.trim().replace(/^Bearer\s+/i, '');
  if (!token) return say('signin-message', 'Paste a token first.', 'error');
  const claims = decodeClaims(token);
  say('signin-message', '');
  startSession(token, claims.sub || 'token user', rolesSayAdmin(claims));
}

async function refreshWallet() {
  try {
    // What the buyer can spend: each balance less what purchases not yet
    // settled hold of it (the wallet lists `held` in the same order).
    const { balances, held = [] } = await api('/v1/wallet');
    const heldOf = (i) => Number(held[i]?.amount_minor || 0);
    const available = balances.map((b, i) => ({ currency: b.currency, amount_minor: Number(b.amount_minor) - heldOf(i) }));
    $('wallet').textContent = available.length ? available.map(money).join(', ') : money({ currency: 'USD', amount_minor: 0 });
    const holding = held.filter((h) => Number(h.amount_minor) > 0);
    $('wallet-held').textContent = holding.map(money).join(', ');
    $('wallet-held-line').hidden = holding.length === 0;
  } catch (e) { if (!isAbort(e)) $('wallet').textContent = 'unavailable'; }
}

// ---- tabs ----
const TABS = ['shop', 'history', 'admin'];
function selectTab(name, focus = false) {
  state.tab = name;
  for (const t of TABS) {
    const tab = $(`tab-${t}`), on = t === name;
    tab.setAttribute('aria-selected', String(on)); tab.tabIndex = on ? 0 : -1;
    $(`panel-${t}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  clearInterval(state.itemsTimer);
  if (name === 'shop') {
    refreshItems();
    let ticks = 0; // stock every 2 s; the balance every 10 s in case it changed elsewhere
    state.itemsTimer = setInterval(() => { if (!document.hidden) { refreshItems(); if (++ticks % 5 === 0) refreshWallet(); } }, 2000);
  }
  if (name === 'history') loadHistory();
  if (name === 'admin') { if (!$('admin-create-starts').value) $('admin-create-starts').value = localNow(); } else stopStats();
}
function onTabKey(event) {
  const visible = TABS.filter((t) => !$(`tab-${t}`).hidden);
  const i = visible.indexOf(state.tab);
  const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: visible.length - 1 }[event.key];
  if (next === undefined) return;
  event.preventDefault();
  selectTab(visible[(next + visible.length) % visible.length], true);
}

// ---- shop ----
async function refreshItems() {
  const seq = ++state.itemsSeq; // a slow answer must not overwrite a newer one
  try {
    const all = [];
    let token = '';
    for (let page = 0; page < 20; page++) {
      const res = await api(`/v1/items?page_size=100${token ? `&page_token=${enc(token)}` : ''}`);
      all.push(...res.items);
      if (!(token = res.next_page_token)) break;
    }
    if (seq !== state.itemsSeq) return;
    renderItems(all);
    say('shop-message', all.length ? '' : 'No sales yet.');
  } catch (e) { if (!isAbort(e)) say('shop-message', `Could not load the sales: ${describe(e)}`, 'error'); }
}
function renderItems(items) {
  const list = $('items'), seen = new Set();
  let prev = null;
  for (const item of items) {
    seen.add(item.id);
    let entry = state.items.get(item.id);
    if (!entry) { entry = createCard(item); state.items.set(item.id, entry); }
    entry.item = item;
    const want = prev ? prev.nextSibling : list.firstChild;
    if (entry.card !== want) list.insertBefore(entry.card, want); // move only when the order changed: keeps focus
    prev = entry.card;
    updateCard(entry);
  }
  for (const [id, entry] of state.items) if (!seen.has(id)) { entry.card.remove(); state.items.delete(id); }
}
function createCard(item) {
  const id = `q-${item.id.replace(/[^A-Za-z0-9_-]/g, '_')}`;
  const e = {
    name: el('h3'), price: el('p', { class: 'price' }), stock: el('p', { testid: 'stock-left' }),
    status: el('span', { class: 'badge' }), window: el('p', { class: 'hint' }), countdown: el('p', { testid: 'countdown', class: 'countdown' }),
    qty: el('input', { id, type: 'number', min: 1, step: 1, value: 1, testid: 'quantity', inputMode: 'numeric' }),
    buy: el('button', { type: 'submit', testid: 'buy', textContent: 'Buy' }),
    outcome: el('p', { testid: 'outcome', class: 'outcome', role: 'status', 'aria-live': 'polite', 'aria-atomic': 'true' }),
  };
  const form = el('form', { class: 'buy', noValidate: true }, el('label', { htmlFor: id, textContent: 'Quantity' }), e.qty, e.buy);
  form.addEventListener('submit', (ev) => { ev.preventDefault(); buy(e); });
  e.card = el('li', { class: 'card item', testid: `item-${item.id}` },
    el('div', { class: 'row' }, e.name, e.status), e.price, e.stock, e.window, form, e.outcome);
  return e;
}
function startsIn(item) { return item.starts_at ? Date.parse(item.starts_at) - Date.now() : 0; }
function updateCard(e) {
  const { item } = e;
  e.name.textContent = item.name || item.id;
  e.price.textContent = money(item.price);
  e.stock.textContent = `${item.stock_remaining} left of ${item.stock_total}`;
  e.status.textContent = item.status.replace('_', ' ');
  e.status.dataset.status = item.status;
  e.window.textContent = item.ends_at ? `Ends ${when(item.ends_at)}` : '';
  e.qty.max = Math.max(1, item.per_user_limit || 1);
  e.buy.setAttribute('aria-label', `Buy ${item.name || item.id}`);
  tickCard(e);
}
function tickCard(e) {
  const ms = startsIn(e.item);
  if (ms > 0) {
    e.countdown.textContent = `Starts in ${duration(ms)}`;
    if (!e.countdown.isConnected) e.window.after(e.countdown);
  } else e.countdown.remove();
  const ended = e.item.ends_at && Date.parse(e.item.ends_at) <= Date.now();
  e.buy.disabled = e.busy || e.item.status !== 'ON_SALE' || e.item.stock_remaining < 1 || ms > 0 || Boolean(ended);
}
function showOrder(e, order) {
  const reason = order.status === 'REJECTED' && order.reject_reason ? ` (${order.reject_reason})` : '';
  e.outcome.textContent = `Order ${shortId(order.id)}: ${order.status}${reason}`;
  e.outcome.dataset.orderId = order.id;
  e.outcome.dataset.kind = order.status === 'REJECTED' ? 'error' : order.status === 'CONFIRMED' ? 'ok' : '';
}
async function buy(e) {
  const quantity = Number(e.qty.value), limit = Number(e.qty.max);
  if (!Number.isInteger(quantity) || quantity < 1 || quantity > limit) {
    e.outcome.textContent = `INVALID_ARGUMENT: choose a quantity from 1 to ${limit}.`; e.outcome.dataset.kind = 'error';
    return;
  }
  const key = uuid(); // one key per click; retries reuse it so the purchase happens at most once
  e.busy = true; tickCard(e);
  delete e.outcome.dataset.orderId;
  e.outcome.textContent = 'Placing order…'; e.outcome.dataset.kind = '';
  let accepted;
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        accepted = await api('/v1/purchases', { method: 'POST', headers: { 'Idempotency-Key': key }, body: { item_id: e.item.id, quantity } });
        break;
      } catch (err) {
        if (attempt >= 2 || !(err.code === 'UNAVAILABLE' || err.code === 'NETWORK')) throw err;
        await delay(400 * (attempt + 1));
      }
    }
  } catch (err) {
    if (isAbort(err)) return;
    e.outcome.textContent = describe(err); e.outcome.dataset.kind = 'error';
    return;
  } finally { e.busy = false; tickCard(e); }
  showOrder(e, { id: accepted.order_id, status: accepted.status });
  try {
    await followOrder(accepted.order_id, (order) => showOrder(e, order));
  } catch (err) {
    if (isAbort(err)) return;
    e.outcome.textContent = `Order ${shortId(accepted.order_id)}: status unknown (${describe(err)}); see History.`;
  }
  refreshWallet(); refreshItems();
}

// ---- order updates: server-sent events read with fetch (EventSource cannot send Authorization) ----
async function followOrder(id, onUpdate) {
  let last = null;
  try { last = await streamOrder(id, onUpdate); } catch (e) { if (isAbort(e)) throw e; }
  for (let polls = 0; !(last && FINAL.has(last.status)); polls++) { // fallback: poll every second
    if (polls) await delay(1000);
    try { last = await api(`/v1/orders/${enc(id)}`); onUpdate(last); } catch (e) {
      if (isAbort(e) || polls > 300 || !['UNAVAILABLE', 'NETWORK', 'RATE_LIMITED'].includes(e.code)) throw e;
    }
  }
  return last;
}
async function streamOrder(id, onUpdate) {
  const local = new AbortController(), outer = state.aborter.signal;
  const stop = () => local.abort();
  outer.addEventListener('abort', stop, { once: true });
  let watchdog = 0;
  const arm = () => { clearTimeout(watchdog); watchdog = setTimeout(stop, 45000); }; // keep-alives come every ~15 s
  try {
    arm();
    const res = await fetch(`/v1/orders/${enc(id)}/events`, {
      headers: { Accept: 'text/event-stream', Authorization: `Bearer ${state.token}` }, signal: local.signal, cache: 'no-store',
    });
    if (!res.ok || !res.body) throw await errorFrom(res);
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buf = '', event = '', data = [], last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return last;
      arm();
      buf += decoder.decode(value, { stream: true });
      const cut = buf.endsWith('\r') ? buf.length - 1 : buf.length; // a CR may be half of a CRLF
      const lines = buf.slice(0, cut).split(/\r\n|\r|\n/);
      buf = lines.pop() + buf.slice(cut);
      for (const line of lines) {
        if (line === '') { // blank line: dispatch
          if (data.length && (event || 'message') === 'order') {
            last = JSON.parse(data.join('\n'));
            onUpdate(last);
            if (FINAL.has(last.status)) { reader.cancel().catch(() => {}); return last; }
          }
          event = ''; data = [];
        } else if (!line.startsWith(':')) { // ':' lines are keep-alive comments
          const i = line.indexOf(':');
          const field = i < 0 ? line : line.slice(0, i);
          const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
          if (field === 'event') event = val; else if (field === 'data') data.push(val);
        }
      }
    }
  } catch (e) {
    if (outer.aborted) throw e;
    return null; // stream failed or stalled: the caller polls
  } finally { clearTimeout(watchdog); outer.removeEventListener('abort', stop); }
}

// ---- history ----
async function loadHistory(more = false) {
  if (!more) state.historyToken = '';
  say('history-message', 'Loading…');
  try {
    const q = `page_size=50${state.historyToken ? `&page_token=${enc(state.historyToken)}` : ''}`;
    const { orders, next_page_token: next } = await api(`/v1/orders?${q}`);
    const rows = orders.map(orderRow);
    if (more) $('orders').append(...rows); else $('orders').replaceChildren(...rows);
    state.historyToken = next || '';
    $('history-more').hidden = !next;
    say('history-message', $('orders').children.length ? '' : 'No orders yet.');
  } catch (e) { if (!isAbort(e)) say('history-message', `Could not load your orders: ${describe(e)}`, 'error'); }
}
function orderRow(order) {
  const row = el('tr', { testid: `order-${order.id}` });
  const item = state.items.get(order.item_id)?.item;
  row.append(
    el('td', {}, el('code', { title: order.id, textContent: shortId(order.id) })),
    el('td', { textContent: item?.name || order.item_id }),
    el('td', { class: 'num', textContent: order.quantity }),
    el('td', { class: 'num', textContent: money(order.amount) }),
    el('td', {}, el('span', { class: 'badge', testid: 'order-status', textContent: order.status, 'data-status': order.status })),
    el('td', { textContent: order.reject_reason || '' }),
    el('td', {}, el('time', { dateTime: order.created_at || '', textContent: when(order.created_at) })),
    el('td', {}, order.status === 'CONFIRMED' ? refundButton(order) : ''),
  );
  return row;
}
function refundButton(order) {
  const button = el('button', { type: 'button', testid: 'refund', class: 'secondary', textContent: 'Refund' });
  button.setAttribute('aria-label', `Refund order ${shortId(order.id)}`);
  button.addEventListener('click', async () => {
    button.disabled = true;
    say('history-message', `Refunding order ${shortId(order.id)}…`);
    try {
      const updated = await api(`/v1/orders/${enc(order.id)}/refund`, { method: 'POST' });
      const row = button.closest('tr');
      row.replaceWith(orderRow(updated));
      say('history-message', `Order ${shortId(order.id)} refunded.`, 'ok');
      for (const e of state.items.values()) if (e.outcome.dataset.orderId === order.id) showOrder(e, updated);
      refreshWallet(); refreshItems();
    } catch (e) {
      if (isAbort(e)) return;
      button.disabled = false;
      say('history-message', `Refund failed: ${describe(e)}`, 'error');
    }
  });
  return button;
}

// ---- admin ----
function localNow() {
  const d = new Date(); d.setSeconds(0, 0);
  return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
}
const minor = (major) => Math.round(Number(major) * 100);
const val = (id) => $(id).value.trim();
async function createSale(event) {
  event.preventDefault();
  const starts = new Date(val('admin-create-starts')), minutes = Number(val('admin-create-duration'));
  const body = {
    id: val('admin-create-id'), name: val('admin-create-name'),
    price: { currency: val('admin-create-currency').toUpperCase(), amount_minor: minor(val('admin-create-price')) },
    stock_total: Number(val('admin-create-stock')), per_user_limit: Number(val('admin-create-limit')),
    starts_at: Number.isNaN(starts.getTime()) ? '' : starts.toISOString(),
    ends_at: Number.isNaN(starts.getTime()) ? '' : new Date(starts.getTime() + minutes * 60000).toISOString(),
  };
  const problem = !body.id ? 'an item id' : !body.name ? 'a name' : !(body.price.amount_minor >= 0) || val('admin-create-price') === '' ? 'a price'
    : !/^[A-Z]{3}$/.test(body.price.currency) ? 'a 3-letter currency' : !(body.stock_total >= 1) ? 'the stock'
    : !(body.per_user_limit >= 1) ? 'the per-user limit' : !body.starts_at ? 'a start time' : !(minutes > 0) ? 'a duration' : '';
  if (problem) return say('admin-message', `INVALID_ARGUMENT: enter ${problem}.`, 'error');
  try {
    const item = await api('/v1/admin/items', { method: 'POST', body });
    say('admin-message', `Success: sale “${item.name}” (${item.id}) created, ${item.stock_total} at ${money(item.price)}, starts ${when(item.starts_at)}.`, 'ok');
    $('admin-stats-item').value = item.id;
    $('admin-create-id').value = ''; $('admin-create-starts').value = localNow();
  } catch (e) { if (!isAbort(e)) say('admin-message', `Create failed: ${describe(e)}`, 'error'); }
}
async function topUp(event) {
  event.preventDefault();
  const user = val('admin-topup-user'), amount = { currency: val('admin-topup-currency').toUpperCase(), amount_minor: minor(val('admin-topup-amount')) };
  if (!USER_RE.test(user)) return say('admin-message', 'INVALID_ARGUMENT: enter a valid user id.', 'error');
  if (!(amount.amount_minor > 0)) return say('admin-message', 'INVALID_ARGUMENT: enter an amount above zero.', 'error');
  try {
    const { balance } = await api(`/v1/admin/users/${enc(user)}/top-up`, { method: 'POST', body: { amount, idempotency_key: uuid() } });
    say('admin-message', `Success: topped up ${user} by ${money(amount)}; balance now ${money(balance)}.`, 'ok');
    if (user === state.user) refreshWallet();
  } catch (e) { if (!isAbort(e)) say('admin-message', `Top-up failed: ${describe(e)}`, 'error'); }
}
function stopStats() {
  clearTimeout(state.statsTimer); state.statsTimer = 0; state.statsItem = null;
  $('admin-stats-watch').textContent = 'Watch'; $('admin-stats-watch').setAttribute('aria-pressed', 'false');
}
function watchStats(event) {
  event.preventDefault();
  const id = val('admin-stats-item');
  if (state.statsItem && state.statsItem === id) return stopStats();
  stopStats();
  if (!id) return say('admin-message', 'INVALID_ARGUMENT: enter an item id to watch.', 'error');
  state.statsItem = id;
  $('admin-stats-watch').textContent = 'Stop'; $('admin-stats-watch').setAttribute('aria-pressed', 'true');
  $('admin-stats').replaceChildren();
  say('admin-message', `Watching ${id}: updates every second.`);
  pollStats(id);
}
async function pollStats(id) {
  try {
    const s = await api(`/v1/admin/items/${enc(id)}/stats`);
    if (state.statsItem !== id) return;
    const rows = [['Pending', s.orders_pending, 'pending'], ['Confirmed', s.orders_confirmed, 'confirmed'], ['Rejected', s.orders_rejected, 'rejected'],
      ['Refunded', s.orders_refunded, 'refunded'], ['Buyers', s.buyers, 'buyers'], ['Units sold', s.units_sold, 'units_sold'],
      ['Remaining', s.item ? `${s.item.stock_remaining} of ${s.item.stock_total}` : '—', 'remaining'], ['Status', s.item?.status ?? '—', 'status']];
    $('admin-stats').replaceChildren(...rows.flatMap(([label, value, key]) =>
      [el('dt', { textContent: label }), el('dd', { textContent: value, 'data-stat': key })]));
  } catch (e) {
    if (isAbort(e) || state.statsItem !== id) return;
    if (!['UNAVAILABLE', 'NETWORK', 'RATE_LIMITED'].includes(e.code)) { stopStats(); return say('admin-message', `Could not watch ${id}: ${describe(e)}`, 'error'); }
  }
  if (state.statsItem === id) state.statsTimer = setTimeout(() => pollStats(id), 1000);
}

// ---- start ----
function init() {
  $('signin-form').addEventListener('submit', signIn);
  $('token-form').addEventListener('submit', useToken);
  $('signin-provider').addEventListener('click', providerSignIn);
  $('signout').addEventListener('click', () => signOut('Signed out.'));
  for (const t of TABS) $(`tab-${t}`).addEventListener('click', () => selectTab(t));
  document.querySelector('[role=tablist]').addEventListener('keydown', onTabKey);
  $('history-refresh').addEventListener('click', () => loadHistory());
  $('history-more').addEventListener('click', () => loadHistory(true));
  $('create-form').addEventListener('submit', createSale);
  $('topup-form').addEventListener('submit', topUp);
  $('stats-form').addEventListener('submit', watchStats);
  setInterval(() => { for (const e of state.items.values()) tickCard(e); }, 1000);
  try {
    const saved = JSON.parse(sessionStorage.getItem('flashsale.session'));
    if (saved?.token) return startSession(saved.token, saved.user, saved.admin);
  } catch { /* ignore a damaged session */ }
  const query = new URLSearchParams(location.search);
  showSignIn().then(() => {
    if (state.signin.method === 'provider' && (query.has('code') || query.has('error'))) finishProviderSignIn(query);
  });
}
init();
