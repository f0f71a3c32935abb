//! Rows of the wallet's tables, as read (`LedgerEntry`, `Balance`) and as written (`NewLedgerEntry`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::schema::{accounts, holds, idempotency_keys, ledger_entries};

/// One immutable ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = ledger_entries, check_for_backend(diesel::pg::Pg))]
pub struct LedgerEntry {
    pub id: i64,
    pub idempotency_key: String,
    pub user_id: String,
    pub currency: String,
    pub kind: String,
    pub amount_minor: i64,
    pub balance_after_minor: i64,
    pub reference: String,
    pub created_at: DateTime<Utc>,
    /// The account's held amount after a hold, capture or release; `None` for
    /// credits and debits (which leave it as it was).
    pub held_after_minor: Option<i64>,
}

/// A ledger entry about to be appended.
#[derive(Debug, Insertable)]
#[diesel(table_name = ledger_entries, check_for_backend(diesel::pg::Pg))]
pub struct NewLedgerEntry<'a> {
    pub idempotency_key: &'a str,
    pub user_id: &'a str,
    pub currency: &'a str,
    pub kind: &'a str,
    pub amount_minor: i64,
    pub balance_after_minor: i64,
    pub reference: &'a str,
    pub held_after_minor: Option<i64>,
}

/// An account's balance in one currency, and what open holds keep of it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg))]
pub struct Balance {
    pub currency: String,
    pub balance_minor: i64,
    pub held_minor: i64,
}

/// Money held for one order (or the mark of a void that came first).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = holds, check_for_backend(diesel::pg::Pg))]
pub struct HoldRow {
    pub order_id: String,
    pub user_id: String,
    pub currency: String,
    pub amount_minor: i64,
    pub reference: String,
    pub state: String,
    pub expires_at: DateTime<Utc>,
}

/// A new, empty account.
#[derive(Debug, Insertable)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg))]
pub struct NewAccount<'a> {
    pub user_id: &'a str,
    pub currency: &'a str,
}

/// The claim a money movement made on its idempotency key, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = idempotency_keys, check_for_backend(diesel::pg::Pg))]
pub struct KeyClaim {
    pub idempotency_key: String,
    pub user_id: String,
    pub currency: String,
    pub kind: String,
    pub amount_minor: i64,
    pub reference: String,
    pub outcome: Option<String>,
    pub ledger_entry_id: Option<i64>,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = idempotency_keys, check_for_backend(diesel::pg::Pg))]
pub struct NewKeyClaim<'a> {
    pub idempotency_key: &'a str,
    pub user_id: &'a str,
    pub currency: &'a str,
    pub kind: &'a str,
    pub amount_minor: i64,
    pub reference: &'a str,
}
