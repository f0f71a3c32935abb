//! Items: creation, reads and sale statistics (the admission snapshot: `snapshot.rs`).

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::models::{Item, NewItem};
use super::schema::{items, orders};
use crate::domain::{ItemSpec, OrderStatus, Page};
use crate::error::InventoryError;

pub async fn create(conn: &mut AsyncPgConnection, spec: &ItemSpec) -> Result<Item, InventoryError> {
    diesel::insert_into(items::table)
        .values(NewItem {
            id: &spec.id,
            name: &spec.name,
            price_currency: spec.currency,
            price_minor: spec.price_minor,
            stock_total: spec.stock,
            stock_remaining: spec.stock,
            per_user_limit: spec.per_user_limit,
            starts_at: spec.starts_at,
            ends_at: spec.ends_at,
            admission_buckets: spec.admission_buckets,
        })
        .on_conflict_do_nothing()
        .returning(Item::as_returning())
        .get_result(conn)
        .await
        .optional()?
        .ok_or(InventoryError::ItemAlreadyExists)
}

pub async fn get(conn: &mut AsyncPgConnection, id: &str) -> Result<Item, InventoryError> {
    items::table.find(id).select(Item::as_select()).first(conn).await.optional()?.ok_or(InventoryError::ItemNotFound)
}

/// One page of items in id order, and the token of the next page.
/// With `ending_after`, only items whose sale ends after that instant.
pub async fn list(
    conn: &mut AsyncPgConnection,
    page: &Page,
    ending_after: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(Vec<Item>, Option<String>), InventoryError> {
    let mut query = items::table.select(Item::as_select()).order(items::id.asc()).limit(page.size + 1).into_boxed();
    if let Some(at) = ending_after {
        query = query.filter(items::ends_at.gt(at));
    }
    if let Some(after) = &page.token {
        query = query.filter(items::id.gt(after.clone()));
    }
    let mut rows = query.load(conn).await?;
    let next = if rows.len() as i64 > page.size {
        rows.truncate(page.size as usize);
        rows.last().map(|item| item.id.clone())
    } else {
        None
    };
    Ok((rows, next))
}

/// Order counts of one item by status, distinct buyers and units sold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub pending: u64,
    pub confirmed: u64,
    pub rejected: u64,
    pub refunded: u64,
    pub buyers: u64,
    pub units_sold: u64,
}

pub async fn stats(conn: &mut AsyncPgConnection, id: &str) -> Result<(Item, Stats), InventoryError> {
    let item = get(conn, id).await?;
    let counts: Vec<(String, i64)> = orders::table
        .filter(orders::item_id.eq(id))
        .group_by(orders::status)
        .select((orders::status, diesel::dsl::count_star()))
        .load(conn)
        .await?;
    let mut stats = Stats::default();
    for (status, count) in counts {
        let count = u64::try_from(count).unwrap_or(0);
        match OrderStatus::from_db(&status) {
            Some(OrderStatus::PaymentPending) => stats.pending = count,
            Some(OrderStatus::Confirmed) => stats.confirmed = count,
            Some(OrderStatus::Rejected) => stats.rejected = count,
            Some(OrderStatus::Refunded) => stats.refunded = count,
            None => {}
        }
    }
    let confirmed =
        orders::table.filter(orders::item_id.eq(id)).filter(orders::status.eq(OrderStatus::Confirmed.as_db()));
    let buyers: i64 =
        confirmed.select(diesel::dsl::count(orders::user_id).aggregate_distinct()).get_result(conn).await?;
    let units: Option<i64> = confirmed.select(diesel::dsl::sum(orders::quantity)).get_result(conn).await?;
    stats.buyers = u64::try_from(buyers).unwrap_or(0);
    stats.units_sold = units.and_then(|u| u64::try_from(u).ok()).unwrap_or(0);
    Ok((item, stats))
}
