//! Rows of the wallet's tables, as read (`LedgerEntry`, `Balance`) and as written (`NewLedgerEntry`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use super::schema::{accounts, idempotency_keys, ledger_entries};

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
}

/// An account's balance in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg))]
pub struct Balance {
    pub currency: String,
    pub balance_minor: i64,
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
