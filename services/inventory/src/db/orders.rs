//! Orders: recording what the gateway admitted, settling payments, refunds.
//!
//! PostgreSQL judges every order, whatever Redis decided:
//! - stock: `UPDATE items … WHERE stock_remaining >= q` (and a CHECK >= 0);
//! - the per-user limit: a guarded upsert of `holdings` (and a CHECK <= limit);
//! - one order per id (primary key: redelivery is a no-op) and one live order per
//!   (buyer, item, idempotency key) (partial unique index).
//!
//! Lock order is always the `items` row, then `holdings` rows, in every
//! transaction that touches both (and items by id within a batch), so
//! concurrent transactions cannot deadlock.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{Duration, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::models::{NewOrder, Order};
use super::outbox;
use super::schema::{holdings, items, orders};
use crate::domain::{OrderStatus, Page, RejectReason};
use crate::error::InventoryError;
use crate::judgement::{ItemTerms, Judgement, Terms, Verdict, judge};

/// How long the consumer's own first debit attempt has before the sweeper may
/// retry the order (the wallet makes a concurrent retry harmless anyway).
const FIRST_ATTEMPT_GRACE: Duration = Duration::seconds(10);

pub use crate::judgement::Placed;

/// What recording an `OrderPlaced` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Stock and the buyer's count are now held; the order awaits payment.
    Held(Order),
    /// PostgreSQL refused it; the order is final and its event is in the outbox.
    Rejected(Order),
    /// The order was recorded before (a redelivery); nothing changed.
    Existing(Order),
    /// The item does not exist, so no order can reference it.
    UnknownItem,
}

impl Recorded {
    /// The order, when there is one.
    pub fn order(&self) -> Option<&Order> {
        match self {
            Recorded::Held(order) | Recorded::Rejected(order) | Recorded::Existing(order) => Some(order),
            Recorded::UnknownItem => None,
        }
    }
}

pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<Order>, InventoryError> {
    Ok(orders::table.find(id).select(Order::as_select()).first(conn).await.optional()?)
}

/// The orders among `ids` that exist (one query).
pub async fn find_many(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<Vec<Order>, InventoryError> {
    Ok(orders::table.filter(orders::id.eq_any(ids)).select(Order::as_select()).load(conn).await?)
}

/// Records an admitted order, exactly once per order id.
pub async fn record_placed(conn: &mut AsyncPgConnection, placed: &Placed) -> Result<Recorded, InventoryError> {
    // Two attempts: a unique violation means a concurrent delivery of the same
    // order (or of the same idempotency key) committed first; the second attempt
    // sees it and answers accordingly.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let batch = std::slice::from_ref(placed);
        match conn.transaction::<_, DieselError, _>(async |conn| record_all_in_tx(conn, batch).await).await {
            Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) if attempt < 2 => continue,
            Ok(mut outcomes) => return outcomes.pop().ok_or_else(|| InventoryError::Internal("no outcome".into())),
            Err(error) => return Err(error.into()),
        }
    }
}

/// Records a batch of admitted orders in one transaction (one commit for the
/// batch instead of one per order), in item-id order so that concurrent
/// batches lock item rows in the same order. Returns the outcomes in the
/// batch's order. If a concurrent delivery of one of them wins a unique key,
/// the whole batch rolls back and each order is recorded on its own.
pub async fn record_batch(conn: &mut AsyncPgConnection, batch: &[Placed]) -> Result<Vec<Recorded>, InventoryError> {
    let together = conn.transaction::<_, DieselError, _>(async |conn| record_all_in_tx(conn, batch).await).await;
    match together {
        Ok(outcomes) => Ok(outcomes),
        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
            let mut outcomes = Vec::with_capacity(batch.len());
            for placed in batch {
                outcomes.push(record_placed(conn, placed).await?);
            }
            Ok(outcomes)
        }
        Err(error) => Err(error.into()),
    }
}

/// What a batch's recording reads (and locks) once: the orders already
/// recorded, and the [`Terms`] it is judged against (the items, the buyers'
/// holdings, the live orders holding any of the batch's keys).
async fn read_and_lock(conn: &mut AsyncPgConnection, batch: &[Placed]) -> QueryResult<(HashMap<Uuid, Order>, Terms)> {
    use diesel::sql_types::{Array, Integer, Text};

    #[derive(QueryableByName)]
    struct LiveKey {
        #[diesel(sql_type = Text)]
        user_id: String,
        #[diesel(sql_type = Text)]
        item_id: String,
        #[diesel(sql_type = Text)]
        idempotency_key: String,
    }
    #[derive(QueryableByName)]
    struct Holding {
        #[diesel(sql_type = Text)]
        item_id: String,
        #[diesel(sql_type = Text)]
        user_id: String,
        #[diesel(sql_type = Integer)]
        quantity: i32,
        #[diesel(sql_type = Integer)]
        max_quantity: i32,
    }
    let ids: Vec<Uuid> = batch.iter().map(|p| p.id).collect();
    let existing = orders::table
        .filter(orders::id.eq_any(&ids))
        .select(Order::as_select())
        .load(conn)
        .await?
        .into_iter()
        .map(|order| (order.id, order))
        .collect();
    // Locks: the item rows (by id), then the holdings (by item, user), as in
    // every transaction that touches both. Item rows one at a time, in byte
    // order as everywhere else (an SQL ORDER BY would follow the database's
    // collation); a batch usually names one item.
    let mut item_ids: Vec<&str> = batch.iter().map(|p| p.item_id.as_str()).collect();
    item_ids.sort_unstable();
    item_ids.dedup();
    let mut items = HashMap::with_capacity(item_ids.len());
    for id in item_ids {
        let row = items::table
            .find(id)
            .select((
                items::price_currency,
                items::price_minor,
                items::per_user_limit,
                items::stock_remaining,
                items::version,
            ))
            .for_update()
            .first::<(String, i64, i32, i32, i64)>(conn)
            .await
            .optional()?;
        if let Some((currency, price_minor, per_user_limit, remaining, version)) = row {
            items.insert(id.to_owned(), ItemTerms { currency, price_minor, per_user_limit, remaining, version });
        }
    }
    let item_of = batch.iter().map(|p| p.item_id.as_str()).collect::<Vec<_>>();
    let user_of = batch.iter().map(|p| p.user_id.as_str()).collect::<Vec<_>>();
    let holdings = diesel::sql_query(
        "SELECT h.item_id, h.user_id, h.quantity, h.max_quantity
           FROM holdings h
           JOIN (SELECT DISTINCT * FROM unnest($1::text[], $2::text[])) AS b(item_id, user_id)
             ON h.item_id = b.item_id AND h.user_id = b.user_id
          ORDER BY h.item_id, h.user_id
            FOR UPDATE OF h",
    )
    .bind::<Array<Text>, _>(&item_of)
    .bind::<Array<Text>, _>(&user_of)
    .load::<Holding>(conn)
    .await?
    .into_iter()
    .map(|h| ((h.item_id, h.user_id), (h.quantity, h.max_quantity)))
    .collect();
    let live_keys = diesel::sql_query(
        "SELECT o.user_id, o.item_id, o.idempotency_key
           FROM orders o
           JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(user_id, item_id, idempotency_key)
             ON o.user_id = k.user_id AND o.item_id = k.item_id AND o.idempotency_key = k.idempotency_key
          WHERE o.status <> 'REJECTED'",
    )
    .bind::<Array<Text>, _>(&user_of)
    .bind::<Array<Text>, _>(&item_of)
    .bind::<Array<Text>, _>(batch.iter().map(|p| p.idempotency_key.as_str()).collect::<Vec<_>>())
    .load::<LiveKey>(conn)
    .await?
    .into_iter()
    .map(|k| (k.user_id, k.item_id, k.idempotency_key))
    .collect();
    Ok((existing, Terms { items, holdings, live_keys }))
}

/// Records a batch inside the caller's transaction; outcomes in the batch's
/// order. The orders are judged in memory ([`judge`]) against the locked item
/// rows and holdings, exactly as one conditional update after another would
/// judge them; then a handful of set-based statements write the
/// result: per item one guarded stock update, one holdings upsert, one orders
/// insert, one outbox insert. PostgreSQL still has the last word: the guard
/// (`stock_remaining >= taken`), the CHECKs on stock and holdings and the
/// unique keys fail the transaction rather than let a wrong judgement through.
async fn record_all_in_tx(conn: &mut AsyncPgConnection, batch: &[Placed]) -> QueryResult<Vec<Recorded>> {
    let (existing, mut terms) = read_and_lock(conn, batch).await?;
    let recorded: HashSet<Uuid> = existing.keys().copied().collect();
    let Judgement { verdicts, taken, held } = judge(batch, &recorded, &mut terms);

    // Write: stock (guarded) and versions, holdings, orders, events.
    for (item_id, quantity) in taken {
        let version = take_stock(conn, item_id, quantity).await?.ok_or_else(|| {
            DieselError::QueryBuilderError(
                format!("item {item_id}: judged {quantity} units in stock, found fewer").into(),
            )
        })?;
        if let Some(item) = terms.items.get_mut(item_id) {
            item.version = version;
        }
    }
    hold_for_buyers(conn, &held).await?;
    let now = Utc::now();
    let rows: Vec<NewOrder<'_>> = (0..batch.len())
        .filter_map(|i| match verdicts[i] {
            Verdict::NotJudged => None,
            Verdict::Held => Some((&batch[i], OrderStatus::PaymentPending, "")),
            Verdict::Rejected(reason) => Some((&batch[i], OrderStatus::Rejected, reason.code())),
        })
        .map(|(placed, status, reject_reason)| NewOrder {
            id: placed.id,
            user_id: &placed.user_id,
            item_id: &placed.item_id,
            quantity: placed.quantity,
            amount_currency: &placed.currency,
            amount_minor: placed.amount_minor,
            status: status.as_db(),
            reject_reason,
            idempotency_key: &placed.idempotency_key,
            next_attempt_at: now + FIRST_ATTEMPT_GRACE,
        })
        .collect();
    let inserted: HashMap<Uuid, Order> = if rows.is_empty() {
        HashMap::new()
    } else {
        diesel::insert_into(orders::table)
            .values(&rows)
            .returning(Order::as_returning())
            .get_results(conn)
            .await?
            .into_iter()
            .map(|order| (order.id, order))
            .collect()
    };
    let traces: HashMap<Uuid, Option<&str>> = batch.iter().map(|p| (p.id, p.traceparent.as_deref())).collect();
    let events: Vec<outbox::Pending<'_>> = inserted
        .values()
        .filter(|order| order.status == OrderStatus::Rejected.as_db())
        .map(|order| outbox::Pending {
            order,
            units_released: 0,
            item_version: terms.items.get(&order.item_id).map_or(0, |item| item.version),
            traceparent: traces.get(&order.id).copied().flatten(),
        })
        .collect();
    outbox::enqueue(conn, &events).await?;

    Ok((0..batch.len())
        .map(|i| {
            let id = batch[i].id;
            let judged = verdicts[i] != Verdict::NotJudged;
            match (judged, inserted.get(&id), existing.get(&id)) {
                (true, Some(order), _) if order.status == OrderStatus::Rejected.as_db() => {
                    Recorded::Rejected(order.clone())
                }
                (true, Some(order), _) => Recorded::Held(order.clone()),
                // Recorded before, or earlier in this very batch (a redelivery).
                (_, _, Some(order)) | (false, Some(order), None) => Recorded::Existing(order.clone()),
                _ => Recorded::UnknownItem,
            }
        })
        .collect())
}

/// Adds each buyer's units to their holding. The CHECK on `holdings` (at most
/// the limit) refuses the whole transaction if the judgement was wrong.
async fn hold_for_buyers(conn: &mut AsyncPgConnection, held: &BTreeMap<(&str, &str), (i32, i32)>) -> QueryResult<()> {
    use diesel::sql_types::{Array, Integer, Text};
    if held.is_empty() {
        return Ok(());
    }
    let rows = held;
    diesel::sql_query(
        "INSERT INTO holdings (item_id, user_id, quantity, max_quantity)
         SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[])
         ON CONFLICT (item_id, user_id) DO UPDATE SET quantity = holdings.quantity + EXCLUDED.quantity",
    )
    .bind::<Array<Text>, _>(rows.iter().map(|((item, _), _)| *item).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(rows.iter().map(|((_, user), _)| *user).collect::<Vec<_>>())
    .bind::<Array<Integer>, _>(rows.iter().map(|(_, (quantity, _))| *quantity).collect::<Vec<_>>())
    .bind::<Array<Integer>, _>(rows.iter().map(|(_, (_, limit))| *limit).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

async fn release_for_buyer(
    conn: &mut AsyncPgConnection,
    item_id: &str,
    user_id: &str,
    quantity: i32,
) -> QueryResult<()> {
    diesel::update(holdings::table.find((item_id, user_id)))
        .set(holdings::quantity.eq(holdings::quantity - quantity))
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes `quantity` units if that many remain; returns the item's new version.
async fn take_stock(conn: &mut AsyncPgConnection, item_id: &str, quantity: i32) -> QueryResult<Option<i64>> {
    diesel::update(items::table.find(item_id))
        .filter(items::stock_remaining.ge(quantity))
        .set((items::stock_remaining.eq(items::stock_remaining - quantity), items::version.eq(items::version + 1)))
        .returning(items::version)
        .get_result(conn)
        .await
        .optional()
}

/// Puts `quantity` units back on sale; returns the item's new version.
async fn return_stock(conn: &mut AsyncPgConnection, item_id: &str, quantity: i32) -> QueryResult<i64> {
    diesel::update(items::table.find(item_id))
        .set((items::stock_remaining.eq(items::stock_remaining + quantity), items::version.eq(items::version + 1)))
        .returning(items::version)
        .get_result(conn)
        .await
}

async fn current_version(conn: &mut AsyncPgConnection, item_id: &str) -> QueryResult<i64> {
    items::table.find(item_id).select(items::version).first(conn).await
}

/// The wallet's final answer to an order's debit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payment {
    Paid,
    InsufficientFunds,
}

/// One wallet answer to settle with [`settle_batch`], and the trace its event joins.
#[derive(Debug, Clone)]
pub struct Settling {
    pub id: Uuid,
    pub payment: Payment,
    pub traceparent: Option<String>,
}

/// [`settle`] for many orders in one transaction (one commit for a whole batch
/// of payments), with set-based statements: the orders are updated first (by
/// id), then the item rows and holdings of the rejected ones, then the events go
/// to the outbox in one insert. Returns the orders this call settled.
pub async fn settle_batch(conn: &mut AsyncPgConnection, batch: &[Settling]) -> Result<Vec<Order>, InventoryError> {
    let mut paid: Vec<Uuid> = batch.iter().filter(|s| s.payment == Payment::Paid).map(|s| s.id).collect();
    let mut refused: Vec<Uuid> = batch.iter().filter(|s| s.payment != Payment::Paid).map(|s| s.id).collect();
    paid.sort_unstable();
    refused.sort_unstable();
    let traces: std::collections::HashMap<Uuid, Option<&str>> =
        batch.iter().map(|s| (s.id, s.traceparent.as_deref())).collect();
    Ok(conn
        .transaction::<_, DieselError, _>(async |conn| {
            let confirmed = finish(conn, &paid, OrderStatus::Confirmed, "").await?;
            let mut rejected =
                finish(conn, &refused, OrderStatus::Rejected, RejectReason::InsufficientFunds.code()).await?;
            // Items before holdings, each in key order (see the module's note on locks).
            rejected.sort_by(|a, b| (&a.item_id, &a.user_id).cmp(&(&b.item_id, &b.user_id)));
            let mut versions = std::collections::HashMap::new();
            for order in &rejected {
                let version = return_stock(conn, &order.item_id, order.quantity).await?;
                versions.insert(order.item_id.clone(), version);
            }
            for order in &rejected {
                release_for_buyer(conn, &order.item_id, &order.user_id, order.quantity).await?;
            }
            for order in &confirmed {
                if !versions.contains_key(&order.item_id) {
                    let version = current_version(conn, &order.item_id).await?;
                    versions.insert(order.item_id.clone(), version);
                }
            }
            let trace = |order: &Order| traces.get(&order.id).copied().flatten();
            let events: Vec<outbox::Pending<'_>> = confirmed
                .iter()
                .map(|order| (order, 0))
                .chain(rejected.iter().map(|order| (order, order.quantity)))
                .map(|(order, units_released)| outbox::Pending {
                    order,
                    units_released,
                    item_version: versions.get(&order.item_id).copied().unwrap_or_default(),
                    traceparent: trace(order),
                })
                .collect();
            outbox::enqueue(conn, &events).await?;
            Ok(confirmed.into_iter().chain(rejected).collect())
        })
        .await?)
}

/// Moves the PAYMENT_PENDING orders among `ids` to `status`.
async fn finish(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    status: OrderStatus,
    reason: &str,
) -> QueryResult<Vec<Order>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    diesel::update(orders::table.filter(orders::id.eq_any(ids)))
        .filter(orders::status.eq(OrderStatus::PaymentPending.as_db()))
        .set((
            orders::status.eq(status.as_db()),
            orders::reject_reason.eq(reason),
            orders::updated_at.eq(diesel::dsl::now),
        ))
        .returning(Order::as_returning())
        .get_results(conn)
        .await
}

/// Records that the buyer asked for a refund of a CONFIRMED order (before any
/// money moves). Returns the order as it stands: still CONFIRMED (the refund is
/// to be completed), or already REFUNDED.
pub async fn request_refund(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Order, InventoryError> {
    let requested = diesel::update(orders::table.find(id))
        .filter(orders::status.eq(OrderStatus::Confirmed.as_db()))
        .set(orders::refund_requested_at.eq(Some(Utc::now())))
        .returning(Order::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    match requested {
        Some(order) => Ok(order),
        None => match find(conn, id).await? {
            Some(order) if order.status == OrderStatus::Refunded.as_db() => Ok(order),
            Some(_) => Err(InventoryError::NotRefundable),
            None => Err(InventoryError::OrderNotFound),
        },
    }
}

/// Refunds requested more than `after` ago that are not finished yet.
pub async fn refunds_due(
    conn: &mut AsyncPgConnection,
    after: Duration,
    limit: i64,
) -> Result<Vec<Order>, InventoryError> {
    Ok(orders::table
        .filter(orders::status.eq(OrderStatus::Confirmed.as_db()))
        .filter(orders::refund_requested_at.lt(Utc::now() - after))
        .select(Order::as_select())
        .limit(limit)
        .load(conn)
        .await?)
}

/// Marks a CONFIRMED order REFUNDED and returns its units to sale (call after
/// the wallet credit succeeded). A second call finds it REFUNDED and changes nothing.
pub async fn mark_refunded(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Order, InventoryError> {
    conn.transaction::<_, InventoryError, _>(async |conn| {
        let refunded = diesel::update(orders::table.find(id))
            .filter(orders::status.eq(OrderStatus::Confirmed.as_db()))
            .set((orders::status.eq(OrderStatus::Refunded.as_db()), orders::updated_at.eq(diesel::dsl::now)))
            .returning(Order::as_returning())
            .get_result(conn)
            .await
            .optional()?;
        match refunded {
            Some(order) => {
                let version = return_stock(conn, &order.item_id, order.quantity).await?;
                release_for_buyer(conn, &order.item_id, &order.user_id, order.quantity).await?;
                let traceparent = flashsale_telemetry::traceparent(&tracing::Span::current());
                let event = outbox::Pending {
                    order: &order,
                    units_released: order.quantity,
                    item_version: version,
                    traceparent: traceparent.as_deref(),
                };
                outbox::enqueue(conn, &[event]).await?;
                Ok(order)
            }
            None => match find(conn, id).await? {
                Some(order) if order.status == OrderStatus::Refunded.as_db() => Ok(order),
                Some(_) => Err(InventoryError::NotRefundable),
                None => Err(InventoryError::OrderNotFound),
            },
        }
    })
    .await
}

/// Claims up to `limit` PAYMENT_PENDING orders whose retry time has come and
/// pushes their next retry back (exponential, at most 30 s), so concurrent
/// sweepers take disjoint orders.
pub async fn claim_due_payments(conn: &mut AsyncPgConnection, limit: i64) -> Result<Vec<Order>, InventoryError> {
    Ok(diesel::sql_query(
        "UPDATE orders SET payment_attempts = payment_attempts + 1,
                next_attempt_at = now() + make_interval(secs => LEAST(30, power(2, LEAST(payment_attempts, 5))))
          WHERE id IN (SELECT id FROM orders
                        WHERE status = 'PAYMENT_PENDING' AND next_attempt_at <= now()
                        ORDER BY next_attempt_at LIMIT $1
                        FOR UPDATE SKIP LOCKED)
          RETURNING *",
    )
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .load(conn)
    .await?)
}

/// One page of orders, newest first (UUIDv7 ids sort by time), optionally one
/// buyer's and/or one item's.
pub async fn list(
    conn: &mut AsyncPgConnection,
    user_id: Option<&str>,
    item_id: Option<&str>,
    page: &Page,
) -> Result<(Vec<Order>, Option<String>), InventoryError> {
    let mut query = orders::table.select(Order::as_select()).order(orders::id.desc()).limit(page.size + 1).into_boxed();
    if let Some(user_id) = user_id {
        query = query.filter(orders::user_id.eq(user_id.to_owned()));
    }
    if let Some(item_id) = item_id {
        query = query.filter(orders::item_id.eq(item_id.to_owned()));
    }
    if let Some(after) = &page.after {
        let after = Uuid::parse_str(after)
            .map_err(|_| InventoryError::invalid("page_token", "is not a token this service issued"))?;
        query = query.filter(orders::id.lt(after));
    }
    let mut rows = query.load(conn).await?;
    let next = if rows.len() as i64 > page.size {
        rows.truncate(page.size as usize);
        rows.last().map(|order| order.id.to_string())
    } else {
        None
    };
    Ok((rows, next))
}
