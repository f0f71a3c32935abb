//! Settling orders with the wallet's final answers, and claiming the payments
//! whose retry time has come.

use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::stock::{current_version, release_for_buyer, return_stock};
use crate::db::models::Order;
use crate::db::outbox;
use crate::db::schema::orders;
use crate::domain::{OrderStatus, RejectReason};
use crate::error::InventoryError;

/// The wallet's final answer to an order's debit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payment {
    Paid,
    InsufficientFunds,
}

/// One wallet answer to settle with [`settle_batch`], and the trace its event joins.
#[derive(Debug, Clone)]
pub struct PaymentOutcome {
    pub id: Uuid,
    pub payment: Payment,
    pub traceparent: Option<String>,
}

/// Settles many orders with the wallet's answers in one transaction (one commit
/// for a whole batch of payments), with set-based statements: the orders are updated first (by
/// id), then the item rows and holdings of the rejected ones, then the events go
/// to the outbox in one insert. Returns the orders this call settled.
pub async fn settle_batch(
    conn: &mut AsyncPgConnection,
    batch: &[PaymentOutcome],
) -> Result<Vec<Order>, InventoryError> {
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
            // Items before holdings, each in key order (see the lock note in orders/mod.rs).
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
