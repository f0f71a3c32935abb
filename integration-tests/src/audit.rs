//! After a storm: wait until every accepted order is final, then check every
//! invariant straight from the databases (not through the APIs under test).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::wallet::audit_ledger;

/// Where the audit reads: the inventory's and the wallet's databases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Databases {
    pub inventory_url: String,
    pub wallet_url: String,
}

#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct OrderRow {
    #[diesel(sql_type = Text)]
    pub id: String,
    #[diesel(sql_type = Text)]
    pub user_id: String,
    #[diesel(sql_type = Text)]
    pub item_id: String,
    #[diesel(sql_type = Integer)]
    pub quantity: i32,
    #[diesel(sql_type = Text)]
    pub amount_currency: String,
    #[diesel(sql_type = BigInt)]
    pub amount_minor: i64,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Text)]
    pub reject_reason: String,
    #[diesel(sql_type = Text)]
    pub idempotency_key: String,
}

#[derive(Debug, Clone, diesel::QueryableByName)]
struct ItemRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Integer)]
    stock_total: i32,
    #[diesel(sql_type = Integer)]
    stock_remaining: i32,
    #[diesel(sql_type = Integer)]
    per_user_limit: i32,
    #[diesel(sql_type = Integer)]
    admission_buckets: i32,
}

#[derive(Debug, Clone, diesel::QueryableByName)]
struct HoldingRow {
    #[diesel(sql_type = Text)]
    item_id: String,
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Integer)]
    quantity: i32,
}

#[derive(Debug, Clone, diesel::QueryableByName)]
struct LedgerRow {
    #[diesel(sql_type = Text)]
    idempotency_key: String,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = BigInt)]
    amount_minor: i64,
}

#[derive(Debug, Clone, diesel::QueryableByName)]
struct HoldRow {
    #[diesel(sql_type = Text)]
    order_id: String,
    #[diesel(sql_type = Text)]
    state: String,
}

/// Waits until no funds are held in the wallet: every hold captured, voided or
/// expired (a purchase that was not placed releases its hold in a task of its
/// own, a moment after the buyer's answer). Call after [`wait_until_settled`];
/// [`audit`] checks that whatever was charged was a paid order's.
pub async fn wait_until_holds_closed(databases: &Databases, timeout: Duration) -> anyhow::Result<HoldCounts> {
    let deadline = Instant::now() + timeout;
    let mut wallet = AsyncPgConnection::establish(&databases.wallet_url).await?;
    loop {
        let holds: Vec<HoldRow> = diesel::sql_query("SELECT order_id, state FROM holds").load(&mut wallet).await?;
        let open: Vec<&HoldRow> = holds.iter().filter(|h| h.state == "open").collect();
        if open.is_empty() {
            // A released hold's order may still have been paid by a debit (its
            // reservation kept, or a retry's copy recorded): the audit's one
            // charge per paid order covers it.
            let captured = holds.iter().filter(|h| h.state == "captured").count();
            return Ok(HoldCounts { captured, released: holds.len() - captured });
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} holds still open after {timeout:?}, e.g. order {}",
            open.len(),
            open[0].order_id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many orders wait for their payment after at least one failed attempt.
pub async fn orders_failed_to_pay(databases: &Databases) -> anyhow::Result<usize> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = AsyncPgConnection::establish(&databases.inventory_url).await?;
    let count: Count =
        diesel::sql_query("SELECT count(*) AS n FROM orders WHERE status = 'PAYMENT_PENDING' AND payment_attempts > 0")
            .get_result(&mut conn)
            .await?;
    Ok(usize::try_from(count.n)?)
}

/// How the wallet's holds ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct HoldCounts {
    pub captured: usize,
    /// Voided or expired.
    pub released: usize,
}

/// What the audit found (every invariant already held, or it returned an error).
#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub orders: Vec<OrderRow>,
    /// Units in CONFIRMED orders, per item.
    pub confirmed_units: BTreeMap<String, i64>,
    /// Units left, per item.
    pub remaining: BTreeMap<String, i64>,
    /// Stock buckets of each item's admission state in Redis.
    pub buckets: BTreeMap<String, u32>,
}

impl AuditReport {
    pub fn confirmed_orders(&self) -> impl Iterator<Item = &OrderRow> {
        self.orders.iter().filter(|o| o.status == "CONFIRMED")
    }
}

/// Waits until inventory has recorded every order in `accepted` and nothing is
/// PAYMENT_PENDING or waiting in the outbox.
pub async fn wait_until_settled(
    databases: &Databases,
    accepted: &BTreeSet<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut conn = AsyncPgConnection::establish(&databases.inventory_url).await?;
    loop {
        let orders: Vec<OrderRow> = load_orders(&mut conn).await?;
        let recorded: BTreeSet<&str> = orders.iter().map(|o| o.id.as_str()).collect();
        let missing = accepted.iter().filter(|id| !recorded.contains(id.as_str())).count();
        let pending = orders.iter().filter(|o| o.status == "PAYMENT_PENDING").count();
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let outbox: Count = diesel::sql_query("SELECT count(*) AS n FROM outbox").get_result(&mut conn).await?;
        if missing == 0 && pending == 0 && outbox.n == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not settled after {timeout:?}: {missing} accepted orders unrecorded, {pending} pending, {} events unpublished",
            outbox.n
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until at least `n` orders of inventory's database are final
/// (CONFIRMED or REJECTED), at most `timeout`: a point in a sale's settlement
/// at which a test injects a fault.
pub async fn wait_until_final_at_least(inventory_url: &str, n: usize, timeout: Duration) -> anyhow::Result<usize> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let deadline = Instant::now() + timeout;
    let mut conn = AsyncPgConnection::establish(inventory_url).await?;
    loop {
        let done: Count =
            diesel::sql_query("SELECT count(*) AS n FROM orders WHERE status IN ('CONFIRMED', 'REJECTED')")
                .get_result(&mut conn)
                .await?;
        let done = usize::try_from(done.n).unwrap_or(0);
        if done >= n {
            return Ok(done);
        }
        anyhow::ensure!(Instant::now() < deadline, "{done} orders final after {timeout:?}, not {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn load_orders(conn: &mut AsyncPgConnection) -> anyhow::Result<Vec<OrderRow>> {
    Ok(diesel::sql_query(
        "SELECT id::text AS id, user_id, item_id, quantity, amount_currency, amount_minor, status, reject_reason,
                idempotency_key FROM orders",
    )
    .load(conn)
    .await?)
}

/// Checks every invariant of integration-tests/RELIABILITY.md (no oversell,
/// limits held, no negative balance, money conserved, one debit per order) against the tables of inventory
/// and wallet. Call after [`wait_until_settled`].
pub async fn audit(databases: &Databases) -> anyhow::Result<AuditReport> {
    let mut conn = AsyncPgConnection::establish(&databases.inventory_url).await?;
    let orders = load_orders(&mut conn).await?;
    let items: Vec<ItemRow> =
        diesel::sql_query("SELECT id, stock_total, stock_remaining, per_user_limit, admission_buckets FROM items")
            .load(&mut conn)
            .await?;
    let holdings: Vec<HoldingRow> =
        diesel::sql_query("SELECT item_id, user_id, quantity FROM holdings").load(&mut conn).await?;

    // Every accepted order is final.
    let unsettled: Vec<&OrderRow> = orders.iter().filter(|o| o.status == "PAYMENT_PENDING").collect();
    anyhow::ensure!(unsettled.is_empty(), "{} orders not final", unsettled.len());

    // Stock: what left the shelf is exactly what confirmed orders hold (no oversell, no loss).
    let mut report = AuditReport::default();
    let mut held: BTreeMap<(String, String), i64> = BTreeMap::new();
    for order in orders.iter().filter(|o| o.status == "CONFIRMED") {
        *report.confirmed_units.entry(order.item_id.clone()).or_default() += i64::from(order.quantity);
        *held.entry((order.item_id.clone(), order.user_id.clone())).or_default() += i64::from(order.quantity);
    }
    for item in &items {
        let sold = report.confirmed_units.get(&item.id).copied().unwrap_or(0);
        anyhow::ensure!(item.stock_remaining >= 0, "{}: negative stock", item.id);
        anyhow::ensure!(
            i64::from(item.stock_total - item.stock_remaining) == sold,
            "{}: {} units left the shelf but confirmed orders hold {sold}",
            item.id,
            item.stock_total - item.stock_remaining
        );
        report.remaining.insert(item.id.clone(), i64::from(item.stock_remaining));
        report.buckets.insert(item.id.clone(), u32::try_from(item.admission_buckets).unwrap_or(1));
    }

    // No buyer above the limit, and the per-buyer counts match the orders.
    let limits: BTreeMap<&str, i64> = items.iter().map(|i| (i.id.as_str(), i64::from(i.per_user_limit))).collect();
    for ((item, user), units) in &held {
        let limit = limits.get(item.as_str()).copied().unwrap_or(0);
        anyhow::ensure!(*units <= limit, "{user} holds {units} of {item}, limit {limit}");
    }
    for holding in &holdings {
        let expected = held.get(&(holding.item_id.clone(), holding.user_id.clone())).copied().unwrap_or(0);
        anyhow::ensure!(
            i64::from(holding.quantity) == expected,
            "holdings of {} in {} say {} but confirmed orders hold {expected}",
            holding.user_id,
            holding.item_id,
            holding.quantity
        );
    }

    // One live order per (buyer, item, idempotency key).
    let mut keys = BTreeSet::new();
    for order in orders.iter().filter(|o| o.status != "REJECTED") {
        anyhow::ensure!(
            keys.insert((order.user_id.clone(), order.item_id.clone(), order.idempotency_key.clone())),
            "two live orders for key {} of {}",
            order.idempotency_key,
            order.user_id
        );
    }

    // Money: conserved per currency, never negative (audit_ledger replays every account),
    // each paid order debited exactly once, each refund credited exactly once, nothing else charged.
    audit_ledger(&databases.wallet_url).await?;
    let mut wallet = AsyncPgConnection::establish(&databases.wallet_url).await?;
    let ledger: Vec<LedgerRow> =
        diesel::sql_query("SELECT idempotency_key, kind, amount_minor FROM ledger_entries").load(&mut wallet).await?;
    // A charge is a debit, or the capture of the order's held funds (under the
    // same key, the order id: one or the other, never both).
    let debits: BTreeMap<&str, i64> = ledger
        .iter()
        .filter(|e| e.kind == "debit" || e.kind == "capture")
        .map(|e| (e.idempotency_key.as_str(), e.amount_minor))
        .collect();
    let refunds: BTreeMap<&str, i64> = ledger
        .iter()
        .filter(|e| e.kind == "credit")
        .filter_map(|e| e.idempotency_key.strip_prefix("refund:").map(|id| (id, e.amount_minor)))
        .collect();
    let mut paid = 0usize;
    for order in &orders {
        let debit = debits.get(order.id.as_str());
        let refund = refunds.get(order.id.as_str());
        match order.status.as_str() {
            "CONFIRMED" | "REFUNDED" => {
                anyhow::ensure!(debit == Some(&order.amount_minor), "order {} paid {debit:?}", order.id);
                paid += 1;
            }
            _ => anyhow::ensure!(debit.is_none(), "rejected order {} was charged", order.id),
        }
        if order.status == "REFUNDED" {
            anyhow::ensure!(refund == Some(&order.amount_minor), "order {} refunded {refund:?}", order.id);
        } else {
            anyhow::ensure!(refund.is_none(), "order {} credited without a refund", order.id);
        }
    }
    anyhow::ensure!(debits.len() == paid, "{} debits for {paid} paid orders", debits.len());

    // Holds: a captured hold is a paid order's (no capture without a unit), and
    // an order that was not paid keeps no captured hold.
    let holds: Vec<HoldRow> = diesel::sql_query("SELECT order_id, state FROM holds").load(&mut wallet).await?;
    let statuses: BTreeMap<&str, &str> = orders.iter().map(|o| (o.id.as_str(), o.status.as_str())).collect();
    for hold in holds.iter().filter(|h| h.state == "captured") {
        let status = statuses.get(hold.order_id.as_str()).copied();
        anyhow::ensure!(
            matches!(status, Some("CONFIRMED" | "REFUNDED")),
            "the hold of order {} was captured but the order is {status:?}",
            hold.order_id
        );
    }
    report.orders = orders;
    Ok(report)
}

/// Waits until the gateway has seen every order it admitted for `items` reach a
/// final state (each item's `admitted` and `inflight` hashes are empty). This
/// covers orders the test never saw accepted: under load a buyer can be told
/// UNAVAILABLE (no confirm in time) while the order is in the queue after all.
/// Call before [`wait_until_settled`] and the audit, or they judge a sale still
/// in progress.
pub async fn wait_until_admissions_final(redis_prefix: &str, items: &[&str], timeout: Duration) -> anyhow::Result<()> {
    wait_until_admissions_final_at(&default_redis_url(), redis_prefix, items, timeout).await
}

fn default_redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection to `redis_url`: one server, or, when it lists several
/// comma-separated nodes, the Redis Cluster they belong to (as the gateway's
/// `REDIS_URL` with `REDIS_CLUSTER`). The audit's reads each touch one item's
/// keys, which share a slot.
pub async fn redis_connection(redis_url: &str) -> anyhow::Result<flashsale_gateway::admission::link::Hot> {
    let urls: Vec<&str> = redis_url.split(',').collect();
    Ok(flashsale_gateway::admission::link::connect_hot(&urls, urls.len() > 1).await?)
}

/// As [`wait_until_admissions_final`], on the Redis server at `redis_url`.
pub async fn wait_until_admissions_final_at(
    redis_url: &str,
    redis_prefix: &str,
    items: &[&str],
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut conn = redis_connection(redis_url).await?;
    let deadline = Instant::now() + timeout;
    for item in items {
        let buckets = bucket_count(&mut conn, redis_prefix, item).await?;
        loop {
            let (mut admitted, mut inflight) = (0, 0);
            for prefix in bucket_prefixes(redis_prefix, item, buckets) {
                let (a, i): (i64, i64) = redis::pipe()
                    .hlen(format!("{prefix}:admitted"))
                    .hlen(format!("{prefix}:inflight"))
                    .query_async(&mut conn)
                    .await?;
                (admitted, inflight) = (admitted + a, inflight + i);
            }
            if admitted == 0 && inflight == 0 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{item}: {admitted} admitted orders ({inflight} in flight) not final after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The key prefix of each of an item's stock buckets (the gateway's
/// `admission/protocol.rs` names them so: bucket 0 keeps the item's own tag).
pub fn bucket_prefixes(redis_prefix: &str, item: &str, buckets: u32) -> Vec<String> {
    (0..buckets.max(1))
        .map(|bucket| match bucket {
            0 => format!("{redis_prefix}:{{{item}}}"),
            _ => format!("{redis_prefix}:{{{item}/{bucket}}}"),
        })
        .collect()
}

/// How many stock buckets an item's state in Redis has: bucket 0, and each
/// next one whose `tokens` exist (every bucket of a loaded item has them).
async fn bucket_count(
    conn: &mut flashsale_gateway::admission::link::Hot,
    redis_prefix: &str,
    item: &str,
) -> anyhow::Result<u32> {
    let mut buckets = 1;
    while buckets < flashsale_domain::MAX_ADMISSION_BUCKETS {
        let next = format!("{redis_prefix}:{{{item}/{buckets}}}:tokens");
        let exists: bool = redis::cmd("EXISTS").arg(&next).query_async(conn).await?;
        if !exists {
            break;
        }
        buckets += 1;
    }
    Ok(buckets)
}

/// After settling, Redis must agree with PostgreSQL: no in-flight marks left and
/// exactly the units PostgreSQL still has on offer. (Holds when Redis kept its
/// state through the sale; after a flush, PostgreSQL alone is the reference.)
pub async fn redis_agrees(redis_prefix: &str, report: &AuditReport, timeout: Duration) -> anyhow::Result<()> {
    redis_agrees_at(&default_redis_url(), redis_prefix, report, timeout).await
}

/// As [`redis_agrees`], on the Redis server at `redis_url`.
pub async fn redis_agrees_at(
    redis_url: &str,
    redis_prefix: &str,
    report: &AuditReport,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut conn = redis_connection(redis_url).await?;
    let deadline = Instant::now() + timeout;
    for (item, remaining) in &report.remaining {
        let buckets = report.buckets.get(item).copied().unwrap_or(1);
        loop {
            // Summed over the item's stock buckets; a loan between buckets still
            // open holds units in no bucket's tokens, so none may be left.
            let (mut tokens, mut inflight, mut lent) = (None::<i64>, 0, 0);
            for prefix in bucket_prefixes(redis_prefix, item, buckets) {
                let (t, i, l): (Option<i64>, i64, i64) = redis::pipe()
                    .get(format!("{prefix}:tokens"))
                    .hlen(format!("{prefix}:inflight"))
                    .hlen(format!("{prefix}:lent"))
                    .query_async(&mut conn)
                    .await?;
                if let Some(t) = t {
                    tokens = Some(tokens.unwrap_or(0) + t);
                }
                (inflight, lent) = (inflight + i, lent + l);
            }
            if tokens.is_none_or(|t| t == *remaining) && inflight == 0 && lent == 0 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{item}: Redis offers {tokens:?} units with {inflight} in flight and {lent} loans open; PostgreSQL \
                 has {remaining} left"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Per item: orders, and milliseconds from the first order's acceptance (the
/// timestamp inside its UUIDv7, minted by the gateway) to the last final state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SettlementSpan {
    pub item_id: String,
    pub orders: u64,
    pub first_accepted_to_last_final_ms: i64,
}

pub async fn settlement_spans(databases: &Databases) -> anyhow::Result<Vec<SettlementSpan>> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        item_id: String,
        #[diesel(sql_type = Text)]
        first_id: String,
        #[diesel(sql_type = BigInt)]
        orders: i64,
        #[diesel(sql_type = BigInt)]
        last_final_ms: i64,
    }
    let mut conn = AsyncPgConnection::establish(&databases.inventory_url).await?;
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT item_id, min(id::text) AS first_id, count(*) AS orders,
                (extract(epoch FROM max(updated_at)) * 1000)::bigint AS last_final_ms
           FROM orders GROUP BY item_id ORDER BY item_id",
    )
    .load(&mut conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            let first = uuid::Uuid::parse_str(&row.first_id)?;
            let (seconds, nanos) =
                first.get_timestamp().ok_or_else(|| anyhow::anyhow!("order {first} is not a UUIDv7"))?.to_unix();
            let accepted_ms = i64::try_from(seconds)? * 1000 + i64::from(nanos / 1_000_000);
            Ok(SettlementSpan {
                item_id: row.item_id,
                orders: u64::try_from(row.orders)?,
                first_accepted_to_last_final_ms: row.last_final_ms - accepted_ms,
            })
        })
        .collect()
}
