//! The guarded stock and holdings updates that recording, settling and
//! refunding share (the `items` row first, then `holdings`, always).

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::db::schema::{holdings, items};

/// Adds each buyer's units to their holding. The CHECK on `holdings` (at most
/// the limit) refuses the whole transaction if the judgement was wrong.
pub(super) async fn hold_for_buyers(
    conn: &mut AsyncPgConnection,
    held: &BTreeMap<(&str, &str), (i32, i32)>,
) -> QueryResult<()> {
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

pub(super) async fn release_for_buyer(
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
pub(super) async fn take_stock(conn: &mut AsyncPgConnection, item_id: &str, quantity: i32) -> QueryResult<Option<i64>> {
    diesel::update(items::table.find(item_id))
        .filter(items::stock_remaining.ge(quantity))
        .set((items::stock_remaining.eq(items::stock_remaining - quantity), items::version.eq(items::version + 1)))
        .returning(items::version)
        .get_result(conn)
        .await
        .optional()
}

/// Puts `quantity` units back on sale; returns the item's new version.
pub(super) async fn return_stock(conn: &mut AsyncPgConnection, item_id: &str, quantity: i32) -> QueryResult<i64> {
    diesel::update(items::table.find(item_id))
        .set((items::stock_remaining.eq(items::stock_remaining + quantity), items::version.eq(items::version + 1)))
        .returning(items::version)
        .get_result(conn)
        .await
}

pub(super) async fn current_version(conn: &mut AsyncPgConnection, item_id: &str) -> QueryResult<i64> {
    items::table.find(item_id).select(items::version).first(conn).await
}
