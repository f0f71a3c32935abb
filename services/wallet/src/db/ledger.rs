//! Money movements and reads. The rules that protect money are enforced by
//! PostgreSQL, and this code only chooses statements that let it:
//! - no overdraft: the debit is `UPDATE … WHERE balance_minor >= amount`, and
//!   `balance_minor >= 0` is a CHECK besides;
//! - no double application: `ledger_entries.idempotency_key` is UNIQUE and the
//!   entry is inserted in the same transaction as the balance change, so a
//!   second request with the same key rolls back its balance change;
//! - no overflow: the credit adds only `WHERE balance_minor <= i64::MAX - amount`.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::models::{Balance, LedgerEntry, NewAccount, NewLedgerEntry};
use super::schema::{accounts, ledger_entries};
use crate::domain::{Currency, Kind, Movement, Page, UserId};
use crate::error::WalletError;

/// Why a movement's transaction was rolled back.
#[derive(Debug)]
enum Abort {
    Refused(Refusal),
    Db(diesel::result::Error),
}

/// A rollback decided by a guard in our statements rather than by an error.
#[derive(Debug)]
enum Refusal {
    /// Another request holds this idempotency key (committed before our insert).
    KeyTaken,
    InsufficientFunds,
    Overflow,
}

impl From<Refusal> for Abort {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

impl From<diesel::result::Error> for Abort {
    fn from(error: diesel::result::Error) -> Self {
        Self::Db(error)
    }
}

/// Applies a credit or debit exactly once per idempotency key and returns its
/// ledger entry. A replay of the same request returns the first entry; the same
/// key with any other field changed is refused.
pub async fn apply(conn: &mut AsyncPgConnection, movement: &Movement) -> Result<LedgerEntry, WalletError> {
    // Replays (client retries, sweeper retries) are answered without a transaction.
    if let Some(entry) = find_by_key(conn, movement.key.as_str()).await? {
        return replay(entry, movement);
    }
    let applied = conn
        .transaction::<_, Abort, _>(async |conn| {
            let balance_after = match movement.kind {
                Kind::Debit => debit_balance(conn, movement).await?,
                Kind::Credit => credit_balance(conn, movement).await?,
            };
            let entry = NewLedgerEntry {
                idempotency_key: movement.key.as_str(),
                user_id: movement.user.as_str(),
                currency: movement.currency.code(),
                kind: movement.kind.as_db(),
                amount_minor: movement.amount.minor(),
                balance_after_minor: balance_after,
                reference: movement.reference.as_str(),
            };
            diesel::insert_into(ledger_entries::table)
                .values(&entry)
                .on_conflict(ledger_entries::idempotency_key)
                .do_nothing()
                .returning(LedgerEntry::as_returning())
                .get_result(conn)
                .await
                .optional()?
                .ok_or(Refusal::KeyTaken.into())
        })
        .await;

    match applied {
        Ok(entry) => Ok(entry),
        Err(Abort::Db(error)) => Err(error.into()),
        // Every other abort may be the shadow of a concurrent request with the
        // same key that committed while we waited for the account row or the key:
        // if that request is ours, its result is the answer.
        Err(Abort::Refused(refusal)) => match find_by_key(conn, movement.key.as_str()).await? {
            Some(entry) => replay(entry, movement),
            None => Err(match refusal {
                Refusal::InsufficientFunds => WalletError::InsufficientFunds,
                Refusal::Overflow => WalletError::BalanceOverflow,
                // Ledger entries are never deleted, so a key that conflicted exists.
                Refusal::KeyTaken => WalletError::Internal("idempotency key missing after a conflict".into()),
            }),
        },
    }
}

/// Takes `amount` from the account if it covers it; returns the new balance.
async fn debit_balance(conn: &mut AsyncPgConnection, movement: &Movement) -> Result<i64, Abort> {
    let amount = movement.amount.minor();
    diesel::update(accounts::table)
        .filter(accounts::user_id.eq(movement.user.as_str()))
        .filter(accounts::currency.eq(movement.currency.code()))
        .filter(accounts::balance_minor.ge(amount))
        .set((accounts::balance_minor.eq(accounts::balance_minor - amount), accounts::updated_at.eq(diesel::dsl::now)))
        .returning(accounts::balance_minor)
        .get_result::<i64>(conn)
        .await
        .optional()?
        .ok_or(Refusal::InsufficientFunds.into())
}

/// Adds `amount` to the account, opening it first if needed; returns the new balance.
async fn credit_balance(conn: &mut AsyncPgConnection, movement: &Movement) -> Result<i64, Abort> {
    let amount = movement.amount.minor();
    diesel::insert_into(accounts::table)
        .values(NewAccount { user_id: movement.user.as_str(), currency: movement.currency.code() })
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    diesel::update(accounts::table)
        .filter(accounts::user_id.eq(movement.user.as_str()))
        .filter(accounts::currency.eq(movement.currency.code()))
        .filter(accounts::balance_minor.le(i64::MAX - amount))
        .set((accounts::balance_minor.eq(accounts::balance_minor + amount), accounts::updated_at.eq(diesel::dsl::now)))
        .returning(accounts::balance_minor)
        .get_result::<i64>(conn)
        .await
        .optional()?
        .ok_or(Refusal::Overflow.into())
}

async fn find_by_key(conn: &mut AsyncPgConnection, key: &str) -> Result<Option<LedgerEntry>, WalletError> {
    Ok(ledger_entries::table
        .filter(ledger_entries::idempotency_key.eq(key))
        .select(LedgerEntry::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// The stored entry answers the request only if the request is the same one.
fn replay(entry: LedgerEntry, movement: &Movement) -> Result<LedgerEntry, WalletError> {
    let same = entry.user_id == movement.user.as_str()
        && entry.currency == movement.currency.code()
        && entry.kind == movement.kind.as_db()
        && entry.amount_minor == movement.amount.minor()
        && entry.reference == movement.reference.as_str();
    if same { Ok(entry) } else { Err(WalletError::IdempotencyKeyReused) }
}

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
        rows.push(Balance { currency: currency.code().to_owned(), balance_minor: 0 });
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
    if let Some(before) = page.before {
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
