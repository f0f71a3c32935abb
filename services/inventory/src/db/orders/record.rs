//! Recording admitted orders: judged in memory against locked rows, written
//! with a few set-based statements per batch.

use std::collections::{HashMap, HashSet};

use chrono::{Duration, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::stock::{hold_for_buyers, take_stock};
use crate::db::models::{NewOrder, Order};
use crate::db::outbox;
use crate::db::schema::{items, orders};
use crate::domain::OrderStatus;
use crate::error::InventoryError;
use crate::judgement::Placed;
use crate::judgement::{ItemTerms, Judgement, Terms, Verdict, judge};

/// How long the consumer's own first debit attempt has before the sweeper may
/// retry the order (the wallet makes a concurrent retry harmless anyway).
const FIRST_ATTEMPT_GRACE: Duration = Duration::seconds(10);

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
