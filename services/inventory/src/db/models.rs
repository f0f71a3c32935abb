//! Rows of the inventory's tables, as read and as written.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::schema::{holdings, items, orders, outbox};

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = items, check_for_backend(diesel::pg::Pg))]
pub struct Item {
    pub id: String,
    pub name: String,
    pub price_currency: String,
    pub price_minor: i64,
    pub stock_total: i32,
    pub stock_remaining: i32,
    pub per_user_limit: i32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub admission_buckets: i32,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = items, check_for_backend(diesel::pg::Pg))]
pub struct NewItem<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub price_currency: &'a str,
    pub price_minor: i64,
    pub stock_total: i32,
    pub stock_remaining: i32,
    pub per_user_limit: i32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub admission_buckets: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = orders, check_for_backend(diesel::pg::Pg))]
pub struct Order {
    pub id: Uuid,
    pub user_id: String,
    pub item_id: String,
    pub quantity: i32,
    pub amount_currency: String,
    pub amount_minor: i64,
    pub status: String,
    pub reject_reason: String,
    pub idempotency_key: String,
    pub payment_attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub refund_requested_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = orders, check_for_backend(diesel::pg::Pg))]
pub struct NewOrder<'a> {
    pub id: Uuid,
    pub user_id: &'a str,
    pub item_id: &'a str,
    pub quantity: i32,
    pub amount_currency: &'a str,
    pub amount_minor: i64,
    pub status: &'a str,
    pub reject_reason: &'a str,
    pub idempotency_key: &'a str,
    pub next_attempt_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = holdings, check_for_backend(diesel::pg::Pg))]
pub struct Holding {
    pub item_id: String,
    pub user_id: String,
    pub quantity: i32,
    pub max_quantity: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = outbox, check_for_backend(diesel::pg::Pg))]
pub struct OutboxRow {
    pub id: i64,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub traceparent: Option<String>,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = outbox, check_for_backend(diesel::pg::Pg))]
pub struct NewOutboxRow<'a> {
    pub routing_key: &'a str,
    pub payload: &'a [u8],
    pub traceparent: Option<&'a str>,
}
