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
//!
//! The statements by concern: `record.rs` (admitted orders, judged and written
//! per batch), `settle.rs` (the wallet's answers, payment retries), `refund.rs`,
//! and `stock.rs`, the guarded updates of stock and holdings they share.

mod record;
mod refund;
mod settle;
mod stock;

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::models::Order;
use super::schema::orders;
use crate::domain::Page;
use crate::error::InventoryError;

pub use self::record::{Recorded, record_batch, record_placed};
pub use self::refund::{mark_refunded, refunds_due, request_refund};
pub use self::settle::{Payment, PaymentOutcome, claim_due_payments, settle_batch};
pub use crate::judgement::Placed;

pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<Order>, InventoryError> {
    Ok(orders::table.find(id).select(Order::as_select()).first(conn).await.optional()?)
}

/// The orders among `ids` that exist (one query).
pub async fn find_many(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<Vec<Order>, InventoryError> {
    Ok(orders::table.filter(orders::id.eq_any(ids)).select(Order::as_select()).load(conn).await?)
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
    if let Some(after) = &page.token {
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
