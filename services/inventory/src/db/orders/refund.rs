//! Refunds: the request, the ones still due, and the final mark.

use chrono::{Duration, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::find;
use super::stock::{release_for_buyer, return_stock};
use crate::db::models::Order;
use crate::db::outbox;
use crate::db::schema::orders;
use crate::domain::OrderStatus;
use crate::error::InventoryError;

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
