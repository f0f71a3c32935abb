// Drives the gateway's storefront in headless Chromium against a running stack:
// buy an item, watch the order confirm live (no reload), refund it from History,
// see the stock and balance come back, then create and watch a sale as an admin.
//
//   STOREFRONT_URL=http://127.0.0.1:8080 ITEM_ID=... BUYER=... SCREENSHOT_DIR=/tmp/shots node storefront.test.mjs
//
// ITEM_ID must be on sale with stock >= 2 and a per-user limit >= 1; BUYER's
// balance must cover its price. Exits 0 on success, 1 (with failure.png) otherwise.
// With SIGNIN=provider (and IDP_URL, the identity provider's issuer), every
// sign-in goes through the provider's page: the authorization-code flow with PKCE.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const TIMEOUT = 20_000;
const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (!value) { console.error(`missing environment variable ${name}`); process.exit(2); }
  return value;
};
const BASE = env('STOREFRONT_URL').replace(/\/+$/, '');
const ITEM_ID = env('ITEM_ID');
const BUYER = env('BUYER');
const SHOTS = env('SCREENSHOT_DIR', 'screenshots');
const PROVIDER = process.env.SIGNIN === 'provider';
const IDP = PROVIDER ? env('IDP_URL').replace(/\/+$/, '') : '';
// What the signed-out page offers: a user name (development) or the provider's button.
const SIGNED_OUT = PROVIDER ? 'signin-provider' : 'signin-user';
mkdirSync(SHOTS, { recursive: true });

class StepError extends Error {}
let step = 'starting';
const log = (message) => console.log(`[storefront] ${message}`);
function assert(condition, message) { if (!condition) throw new StepError(message); }

const byTestId = (scope, id) => scope.locator(`[data-testid="${id}"]`);

/** Waits until `read()` satisfies `ok`, re-reading for up to TIMEOUT; fails with `what` and the last value. */
async function until(what, read, ok, timeout = TIMEOUT) {
  const deadline = Date.now() + timeout;
  let last;
  for (let delay = 50; ; delay = Math.min(delay * 2, 250)) {
    try { last = await read(); } catch (e) { last = `<${e.message.split('\n')[0]}>`; }
    if (ok(last)) return last;
    if (Date.now() > deadline) throw new StepError(`timed out after ${timeout} ms waiting for ${what}; last value: ${JSON.stringify(last)}`);
    await new Promise((resolve) => setTimeout(resolve, delay)); // polling interval, not a fixed wait for an outcome
  }
}
const text = (locator) => locator.innerText({ timeout: 2_000 }).then((t) => t.trim());
const numberIn = (s) => { const m = /(\d+)\s+left\b/.exec(s); return m ? Number(m[1]) : NaN; };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium', headless: true, args: ['--no-sandbox'],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
const page = await context.newPage();
page.setDefaultTimeout(TIMEOUT);

const browserErrors = [];
page.on('pageerror', (e) => browserErrors.push(`page error: ${e.message}`));
page.on('console', (msg) => {
  if (msg.type() !== 'error') return;
  const where = msg.location()?.url || '';
  if (/favicon\.ico/.test(where) || /favicon\.ico/.test(msg.text())) return;
  browserErrors.push(`console error: ${msg.text()}${where ? ` (${where})` : ''}`);
});
const noBrowserErrors = () => assert(browserErrors.length === 0, `the page reported errors:\n  ${browserErrors.join('\n  ')}`);
const shot = (name) => page.screenshot({ path: join(SHOTS, name), fullPage: true });

async function signIn(user, admin) {
  if (PROVIDER) {
    await byTestId(page, 'signin-provider').click();
    await page.locator('#username').waitFor({ state: 'visible' });
    const at = new URL(page.url());
    assert(`${at.protocol}//${at.host}` === IDP, `the sign-in page is not the provider's: ${page.url()}`);
    assert(at.searchParams.get('code_challenge_method') === 'S256' && at.searchParams.get('code_challenge'), `no PKCE challenge in ${page.url()}`);
    await page.locator('#username').fill(user);
    await page.locator('#admin').setChecked(admin);
    await page.locator('#login').click();
  } else {
    await byTestId(page, 'signin-user').fill(user);
    await byTestId(page, 'signin-admin').setChecked(admin);
    await byTestId(page, 'signin-submit').click();
  }
  const who = await until(`"signed-in-as" to name ${user}`, () => text(byTestId(page, 'signed-in-as')), (t) => t.includes(user));
  if (PROVIDER) assert(!new URL(page.url()).searchParams.has('code'), `the single-use code stayed in the address bar: ${page.url()}`);
  log(`signed in: ${who}`);
}
const balance = () => text(byTestId(page, 'wallet-balance'));
const balanceLoaded = (t) => typeof t === 'string' && t !== '' && t !== '…' && !t.startsWith('<') && t !== 'unavailable';

try {
  step = '1. open the storefront';
  const response = await page.goto(BASE + '/', { waitUntil: 'load' });
  assert(response && response.ok(), `GET ${BASE}/ answered ${response?.status()}`);
  assert(/default-src 'self'/.test(response.headers()['content-security-policy'] || ''), 'the page is served without its Content-Security-Policy');
  await byTestId(page, SIGNED_OUT).waitFor({ state: 'visible' });
  await shot('01-signed-out.png');

  step = `2. sign in as ${BUYER}`;
  await signIn(BUYER, false);
  assert(await byTestId(page, 'tab-admin').isHidden(), 'the Admin tab is visible to a buyer');
  const before = await until('the wallet balance to load', balance, balanceLoaded);
  log(`balance before: ${before}`);
  const card = byTestId(page, `item-${ITEM_ID}`);
  await card.waitFor({ state: 'visible' }).catch(() => { throw new StepError(`no card data-testid="item-${ITEM_ID}" in the shop`); });
  await shot('02-shop.png');

  step = `3. read the stock of ${ITEM_ID}`;
  const stockLeft = byTestId(card, 'stock-left');
  const stockN = await until('a stock number in "stock-left"', () => text(stockLeft).then(numberIn), (n) => Number.isInteger(n));
  assert(stockN >= 1, `item ${ITEM_ID} has no stock left (${stockN}); the test needs an item on sale with stock`);
  log(`stock left: ${stockN}`);

  step = '4. buy one and watch it confirm without a reload';
  await page.evaluate(() => { window.__marker = 1; });
  const navigations = await page.evaluate(() => performance.getEntriesByType('navigation').length);
  await byTestId(card, 'quantity').fill('1');
  const buy = byTestId(card, 'buy');
  await until('the Buy button to be enabled', () => buy.isEnabled(), Boolean);
  await buy.click();
  const outcome = byTestId(card, 'outcome');
  const first = await until('the outcome to show PENDING or CONFIRMED',
    () => text(outcome), (t) => /PENDING|CONFIRMED|REJECTED|[A-Z_]{4,}:/.test(t));
  assert(/PENDING|CONFIRMED/.test(first), `the purchase did not go through: "${first}"`);
  const final = await until('the order to reach a final state', () => text(outcome), (t) => /CONFIRMED|REJECTED/.test(t));
  assert(/CONFIRMED/.test(final), `the order was not confirmed: "${final}"`);
  const orderId = await outcome.getAttribute('data-order-id');
  assert(orderId, 'the outcome region has no data-order-id');
  const still = await page.evaluate(() => ({ marker: window.__marker, navigations: performance.getEntriesByType('navigation').length }));
  assert(still.marker === 1 && still.navigations === navigations, `the page reloaded while buying (${JSON.stringify(still)})`);
  log(`order ${orderId}: ${first} -> ${final}`);
  await shot('03-confirmed.png');

  step = '5. the balance drops and the stock goes down by one';
  const after = await until('the wallet balance to change after the purchase', balance, (t) => balanceLoaded(t) && t !== before);
  log(`balance after: ${after}`);
  // One currency here (the buyer was topped up in USD only): "$1,234.50" -> 1234.5.
  const amount = (t) => Number(t.replace(/[^\d.]/g, ''));
  assert(Number.isFinite(amount(before)) && Number.isFinite(amount(after)), `unreadable balances: ${before} -> ${after}`);
  assert(amount(after) < amount(before), `the balance did not drop: ${before} -> ${after}`);
  await until(`"stock-left" to read ${stockN - 1}`, () => text(stockLeft).then(numberIn), (n) => n === stockN - 1);

  step = '6. the order is in History as CONFIRMED';
  await byTestId(page, 'tab-history').click();
  const row = byTestId(page, `order-${orderId}`);
  await row.waitFor({ state: 'visible' }).catch(() => { throw new StepError(`no row data-testid="order-${orderId}" in History`); });
  const status = byTestId(row, 'order-status');
  await until('the History row to show CONFIRMED', () => text(status), (t) => t === 'CONFIRMED');
  await shot('04-history.png');

  step = '7. refund it';
  await byTestId(row, 'refund').click();
  await until('the History row to show REFUNDED', () => text(status), (t) => t === 'REFUNDED');
  assert(await byTestId(row, 'refund').count() === 0, 'the Refund button is still offered for a refunded order');
  await shot('05-refunded.png');

  step = '8. the stock and balance come back';
  await byTestId(page, 'tab-shop').click();
  await until(`"stock-left" to read ${stockN} again`, () => text(stockLeft).then(numberIn), (n) => n === stockN);
  await until(`the wallet balance to return to ${before}`, balance, (t) => t === before);
  await shot('06-stock-back.png');
  noBrowserErrors();

  step = '9. admin: create a sale and watch its stats';
  await byTestId(page, 'signout').click();
  await byTestId(page, SIGNED_OUT).waitFor({ state: 'visible' });
  await signIn('ops', true);
  await byTestId(page, 'tab-admin').click();
  const saleId = `browser-${Date.now().toString(36)}`;
  await byTestId(page, 'admin-create-id').fill(saleId);
  await byTestId(page, 'admin-create-name').fill(`Browser test ${saleId}`);
  await byTestId(page, 'admin-create-price').fill('1.00');
  await byTestId(page, 'admin-create-currency').fill('USD');
  await byTestId(page, 'admin-create-stock').fill('5');
  await byTestId(page, 'admin-create-limit').fill('1');
  await byTestId(page, 'admin-create-submit').click();
  const message = byTestId(page, 'admin-message');
  const created = await until('"admin-message" to report the sale', () => text(message), (t) => /success|fail|error|[A-Z_]{4,}:/i.test(t));
  assert(/success/i.test(created) && created.includes(saleId), `creating the sale failed: "${created}"`);
  await byTestId(page, 'admin-stats-item').fill(saleId);
  await byTestId(page, 'admin-stats-watch').click();
  const stats = byTestId(page, 'admin-stats');
  const stat = (key) => text(stats.locator(`[data-stat="${key}"]`));
  await until('"admin-stats" to show 5 remaining', () => stat('remaining'), (t) => /^5\b/.test(t));
  for (const key of ['units_sold', 'pending', 'confirmed', 'buyers']) {
    const value = await stat(key);
    assert(value === '0', `admin stats "${key}" should be 0 for a new sale, got "${value}"`);
  }
  log(`stats: ${(await text(stats)).replace(/\s+/g, ' ')}`);
  await shot('07-admin.png');
  noBrowserErrors();

  console.log('storefront test passed');
  await browser.close();
  process.exit(0);
} catch (e) {
  console.error(`[storefront] FAILED at step "${step}": ${e instanceof StepError ? e.message : e.stack || e}`);
  if (browserErrors.length) console.error(`[storefront] browser errors:\n  ${browserErrors.join('\n  ')}`);
  await shot('failure.png').then(() => console.error(`[storefront] screenshot: ${join(SHOTS, 'failure.png')}`), () => {});
  await browser.close().catch(() => {});
  process.exit(1);
}
