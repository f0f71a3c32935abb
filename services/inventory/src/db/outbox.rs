//! The transactional outbox: order events are written in the transaction that
//! changes the order and published afterwards by the relay, so an event is
//! never lost when the process dies between the database and the broker.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use flashsale_proto::inventory::v1::OrderEvent;
use prost::Message;

use super::models::{NewOutboxRow, Order, OutboxRow};
use super::schema::outbox;
use crate::convert::{order_to_proto, timestamp};
use crate::domain::OrderStatus;

/// One event of [`enqueue`]: the order (in its new state), the units that went
/// back on sale with it, the item's version after the change, and the trace the
/// event joins.
pub struct Pending<'a> {
    pub order: &'a Order,
    pub units_released: i32,
    pub item_version: i64,
    pub traceparent: Option<&'a str>,
}

/// Records the events, in one statement, in the caller's transaction.
pub async fn enqueue(conn: &mut AsyncPgConnection, events: &[Pending<'_>]) -> QueryResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let encoded: Vec<(&'static str, Vec<u8>)> = events
        .iter()
        .map(|e| Ok((routing_key(e.order)?, event(e.order, e.units_released, e.item_version).encode_to_vec())))
        .collect::<QueryResult<_>>()?;
    let rows: Vec<NewOutboxRow<'_>> = encoded
        .iter()
        .zip(events)
        .map(|((routing_key, payload), e)| NewOutboxRow { routing_key, payload, traceparent: e.traceparent })
        .collect();
    diesel::insert_into(outbox::table).values(&rows).execute(conn).await?;
    Ok(())
}

/// An event of an order that is not final would be a bug in the caller: the
/// transaction fails rather than publish it.
fn routing_key(order: &Order) -> QueryResult<&'static str> {
    OrderStatus::from_db(&order.status).and_then(OrderStatus::event_routing_key).ok_or_else(|| {
        diesel::result::Error::QueryBuilderError(format!("no event for an order in status {}", order.status).into())
    })
}

fn event(order: &Order, units_released: i32, item_version: i64) -> OrderEvent {
    OrderEvent {
        order: Some(order_to_proto(order.clone())),
        units_released: u32::try_from(units_released).unwrap_or(0),
        occurred_at: Some(timestamp(chrono::Utc::now())),
        item_version: u64::try_from(item_version).unwrap_or(0),
    }
}

/// The oldest unpublished events, locked so that concurrent relays (several
/// inventory replicas) take disjoint batches. Call inside a transaction.
pub async fn claim(conn: &mut AsyncPgConnection, limit: i64) -> QueryResult<Vec<OutboxRow>> {
    outbox::table
        .select(OutboxRow::as_select())
        .order(outbox::id.asc())
        .limit(limit)
        .for_update()
        .skip_locked()
        .load(conn)
        .await
}

/// Forgets events the broker has confirmed.
pub async fn delete(conn: &mut AsyncPgConnection, ids: &[i64]) -> QueryResult<usize> {
    diesel::delete(outbox::table.filter(outbox::id.eq_any(ids))).execute(conn).await
}
