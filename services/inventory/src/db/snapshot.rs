//! The admission snapshot: what the gateway rebuilds an item's Redis admission
//! state from after Redis lost it. One REPEATABLE READ transaction, so the
//! item's version describes everything read, and read in pages of at most
//! [`PAGE`] rows handed to the caller one at a time: an item may have 10^6
//! recorded orders and more, and neither side holds all of them at once (an
//! earlier version answered in one message and broke past the 4 MiB cap at
//! about 40,000 orders, so a big sale could never be rebuilt).
//!
//! Pages are keyset pages (`WHERE key > last ORDER BY key LIMIT n`), each an
//! index range scan: holdings by the primary key, unsettled orders by
//! `orders_item_id_status`, recorded keys by `orders_item_user_key`.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::models::Item;
use super::schema::{holdings, orders};
use crate::domain::OrderStatus;
use crate::error::InventoryError;

/// Rows per page, and so at most per piece the caller gets: 5,000 keys are
/// about 0.5 MB as protobuf, far below the message cap.
pub const PAGE: i64 = 5_000;

/// The idempotency key a buyer used for the item, with the order it names.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct RecordedKey {
    #[diesel(sql_type = Text)]
    pub user_id: String,
    #[diesel(sql_type = Text)]
    pub idempotency_key: String,
    #[diesel(sql_type = SqlUuid)]
    pub order_id: uuid::Uuid,
    #[diesel(sql_type = Integer)]
    pub quantity: i32,
}

/// One piece of a snapshot, in the order they come: the item first, then
/// pages of holdings, of unsettled orders and of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Item(Item),
    /// (buyer, units held in unsettled or confirmed orders), buyers holding any.
    Holdings(Vec<(String, i32)>),
    /// (buyer, order id) of orders not yet settled.
    InFlight(Vec<(String, uuid::Uuid)>),
    /// One per (buyer, key): the live order where a key names several (a copy
    /// refused as a key reuse is rejected, the order it collided with is
    /// live), else the earliest.
    Keys(Vec<RecordedKey>),
}

/// The receiver went away: stop reading.
#[derive(Debug)]
pub struct Closed;

/// Reads the item's snapshot and hands it to `deliver` piece by piece; stops
/// (rolling back) when `deliver` says the receiver is gone.
pub async fn read<F, Fut>(conn: &mut AsyncPgConnection, id: &str, mut deliver: F) -> Result<(), InventoryError>
where
    F: FnMut(Piece) -> Fut + Send,
    Fut: Future<Output = Result<(), Closed>> + Send,
{
    let id = id.to_owned();
    conn.build_transaction()
        .repeatable_read()
        .read_only()
        .run::<_, InventoryError, _>(async |conn| {
            let item = super::items::get(conn, &id).await?;
            deliver(Piece::Item(item)).await.map_err(|Closed| InventoryError::ReceiverGone)?;

            let mut after = String::new();
            loop {
                let page: Vec<(String, i32)> = holdings::table
                    .filter(holdings::item_id.eq(&id))
                    .filter(holdings::quantity.gt(0))
                    .filter(holdings::user_id.gt(&after))
                    .order(holdings::user_id)
                    .limit(PAGE)
                    .select((holdings::user_id, holdings::quantity))
                    .load(conn)
                    .await?;
                let Some((last, _)) = page.last() else { break };
                after = last.clone();
                let full = page.len() as i64 == PAGE;
                deliver(Piece::Holdings(page)).await.map_err(|Closed| InventoryError::ReceiverGone)?;
                if !full {
                    break;
                }
            }

            let mut after = uuid::Uuid::nil();
            loop {
                let page: Vec<(String, uuid::Uuid)> = orders::table
                    .filter(orders::item_id.eq(&id))
                    .filter(orders::status.eq(OrderStatus::PaymentPending.as_db()))
                    .filter(orders::id.gt(after))
                    .order(orders::id)
                    .limit(PAGE)
                    .select((orders::user_id, orders::id))
                    .load(conn)
                    .await?;
                let Some((_, last)) = page.last() else { break };
                after = *last;
                let full = page.len() as i64 == PAGE;
                deliver(Piece::InFlight(page)).await.map_err(|Closed| InventoryError::ReceiverGone)?;
                if !full {
                    break;
                }
            }

            let (mut after_user, mut after_key) = (String::new(), String::new());
            loop {
                let page = keys_after(conn, &id, &after_user, &after_key).await?;
                let Some(last) = page.last() else { break };
                (after_user, after_key) = (last.user_id.clone(), last.idempotency_key.clone());
                let full = page.len() as i64 == PAGE;
                deliver(Piece::Keys(page)).await.map_err(|Closed| InventoryError::ReceiverGone)?;
                if !full {
                    break;
                }
            }
            Ok(())
        })
        .await
}

/// The next page of recorded keys after (`user`, `key`), in that order. Raw
/// SQL: diesel has no `DISTINCT ON` with a row comparison. Within a (buyer,
/// key) the live order sorts first (`status = 'REJECTED'` is false), then the
/// earliest.
async fn keys_after(
    conn: &mut AsyncPgConnection,
    item_id: &str,
    user: &str,
    key: &str,
) -> Result<Vec<RecordedKey>, InventoryError> {
    Ok(diesel::sql_query(
        "SELECT DISTINCT ON (user_id, idempotency_key) \
                user_id, idempotency_key, id AS order_id, quantity \
           FROM orders \
          WHERE item_id = $1 AND (user_id, idempotency_key) > ($2, $3) \
          ORDER BY user_id, idempotency_key, status = 'REJECTED', id \
          LIMIT $4",
    )
    .bind::<Text, _>(item_id)
    .bind::<Text, _>(user)
    .bind::<Text, _>(key)
    .bind::<BigInt, _>(PAGE)
    .load(conn)
    .await?)
}
