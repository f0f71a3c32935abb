//! Balances and the transaction history.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::db::models::{Balance, LedgerEntry};
use crate::db::schema::{accounts, ledger_entries};
use crate::domain::{Currency, Page, UserId};
use crate::error::WalletError;

/// A user's balances: in one currency (zero when the account does not exist
/// yet), or in every currency they hold.
pub async fn balances(
    conn: &mut AsyncPgConnection,
    user: &UserId,
    currency: Option<Currency>,
) -> Result<Vec<Balance>, WalletError> {
    let mut query = accounts::table
        .filter(accounts::user_id.eq(user.as_str()))
        .select(Balance::as_select())
        .order(accounts::currency.asc())
        .into_boxed();
    if let Some(currency) = currency {
        query = query.filter(accounts::currency.eq(currency.code()));
    }
    let mut rows = query.load(conn).await?;
    if let (Some(currency), true) = (currency, rows.is_empty()) {
        rows.push(Balance { currency: currency.code().to_owned(), balance_minor: 0, held_minor: 0 });
    }
    Ok(rows)
}

/// One page of a user's ledger, newest first, and the token of the next page.
pub async fn transactions(
    conn: &mut AsyncPgConnection,
    user: &UserId,
    currency: Option<Currency>,
    page: Page,
) -> Result<(Vec<LedgerEntry>, Option<i64>), WalletError> {
    let mut query = ledger_entries::table
        .filter(ledger_entries::user_id.eq(user.as_str()))
        .select(LedgerEntry::as_select())
        .order(ledger_entries::id.desc())
        // One extra row tells whether another page exists.
        .limit(page.size + 1)
        .into_boxed();
    if let Some(currency) = currency {
        query = query.filter(ledger_entries::currency.eq(currency.code()));
    }
    if let Some(before) = page.token {
        query = query.filter(ledger_entries::id.lt(before));
    }
    let mut rows = query.load(conn).await?;
    let next = if rows.len() as i64 > page.size {
        rows.truncate(page.size as usize);
        rows.last().map(|entry| entry.id)
    } else {
        None
    };
    Ok((rows, next))
}
