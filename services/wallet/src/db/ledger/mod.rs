//! Money movements and reads. The rules that protect money are enforced by
//! PostgreSQL, and this code only chooses statements that let it:
//! - no overdraft, and held money is not spent: the debit is
//!   `UPDATE … WHERE balance_minor - held_minor >= amount`, and
//!   `0 <= held_minor <= balance_minor` is a CHECK besides;
//! - one outcome per idempotency key: the movement first inserts its key into
//!   `idempotency_keys` (primary key), in the transaction that moves the money,
//!   so a concurrent request with the same key waits for it and then replays
//!   what it recorded: the ledger entry, or the refusal for insufficient funds;
//! - no overflow: the credit adds only `WHERE balance_minor <= i64::MAX - amount`.
//!
//! By concern: `movement.rs` (one credit or debit), `batch.rs` (many in one
//! transaction), `reads.rs` (balances, history); the idempotency-key claim, the
//! guarded balance updates and the replay they share are here. Holds, their
//! captures and releases are in `super::holds`.

mod batch;
mod movement;
mod reads;

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::models::{KeyClaim, LedgerEntry, NewAccount};
use super::schema::{accounts, idempotency_keys, ledger_entries};
use crate::domain::Movement;
use crate::error::WalletError;

pub use self::batch::apply_batch;
pub use self::movement::apply;
pub use self::reads::{balances, transactions};

pub(crate) const APPLIED: &str = "applied";
const INSUFFICIENT_FUNDS: &str = "insufficient_funds";

/// How a movement's transaction ended.
#[derive(Debug)]
enum MovementOutcome {
    Applied(LedgerEntry),
    /// Committed as a refusal: the key now answers INSUFFICIENT_FUNDS for good.
    Refused,
    /// Another request holds the key (committed first); replay what it recorded.
    KeyTaken,
}

/// Why a movement's transaction was rolled back.
#[derive(Debug)]
enum Abort {
    Overflow,
    Db(diesel::result::Error),
}

impl From<diesel::result::Error> for Abort {
    fn from(error: diesel::result::Error) -> Self {
        Self::Db(error)
    }
}
/// The caller's answer once the movement's transaction committed.
async fn answer(
    conn: &mut AsyncPgConnection,
    movement: &Movement,
    outcome: MovementOutcome,
) -> Result<LedgerEntry, WalletError> {
    match outcome {
        MovementOutcome::Applied(entry) => {
            count(movement, "applied");
            Ok(entry)
        }
        MovementOutcome::Refused => {
            count(movement, "insufficient_funds");
            Err(WalletError::InsufficientFunds)
        }
        MovementOutcome::KeyTaken => {
            count(movement, "replayed");
            let claim = find_claim(conn, movement.key.as_str())
                .await?
                // Claims are never deleted, so a key that conflicted exists.
                .ok_or_else(|| WalletError::Internal("idempotency key missing after a conflict".into()))?;
            replay(conn, claim, movement).await
        }
    }
}

/// `flashsale_wallet_movements_total{kind, result}`: each Credit or Debit by how
/// it ended (applied, insufficient_funds, replayed: answered from its key).
fn count(movement: &Movement, result: &'static str) {
    tracing::Span::current().record("result", result);
    metrics::counter!("flashsale_wallet_movements_total", "kind" => movement.kind.as_db(), "result" => result)
        .increment(1);
}

async fn record_outcome(
    conn: &mut AsyncPgConnection,
    movement: &Movement,
    outcome: &str,
    entry_id: Option<i64>,
) -> QueryResult<()> {
    record_claim_outcome(conn, movement.key.as_str(), outcome, entry_id).await
}

/// Records how the movement that claimed `key` ended, inside its transaction.
pub(crate) async fn record_claim_outcome(
    conn: &mut AsyncPgConnection,
    key: &str,
    outcome: &str,
    entry_id: Option<i64>,
) -> QueryResult<()> {
    diesel::update(idempotency_keys::table.find(key))
        .set((idempotency_keys::outcome.eq(outcome), idempotency_keys::ledger_entry_id.eq(entry_id)))
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes `amount` from the account if what is available (the balance less
/// what open holds keep) covers it; returns the new balance, or `None` when it
/// (or the account) does not.
async fn debit_balance(conn: &mut AsyncPgConnection, movement: &Movement) -> Result<Option<i64>, Abort> {
    let amount = movement.amount.minor();
    Ok(diesel::update(accounts::table)
        .filter(accounts::user_id.eq(movement.user.as_str()))
        .filter(accounts::currency.eq(movement.currency.code()))
        .filter((accounts::balance_minor - accounts::held_minor).ge(amount))
        .set((accounts::balance_minor.eq(accounts::balance_minor - amount), accounts::updated_at.eq(diesel::dsl::now)))
        .returning(accounts::balance_minor)
        .get_result::<i64>(conn)
        .await
        .optional()?)
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
        .ok_or(Abort::Overflow)
}

async fn find_claim(conn: &mut AsyncPgConnection, key: &str) -> Result<Option<KeyClaim>, WalletError> {
    Ok(idempotency_keys::table.find(key).select(KeyClaim::as_select()).first(conn).await.optional()?)
}

/// The recorded outcome answers the request only if the request is the same one.
async fn replay(
    conn: &mut AsyncPgConnection,
    claim: KeyClaim,
    movement: &Movement,
) -> Result<LedgerEntry, WalletError> {
    let same = claim.user_id == movement.user.as_str()
        && claim.currency == movement.currency.code()
        && claim.kind == movement.kind.as_db()
        && claim.amount_minor == movement.amount.minor()
        && claim.reference == movement.reference.as_str();
    if !same {
        return Err(WalletError::IdempotencyKeyReused);
    }
    match (claim.outcome.as_deref(), claim.ledger_entry_id) {
        (Some(APPLIED), Some(id)) => {
            Ok(ledger_entries::table.find(id).select(LedgerEntry::as_select()).first(conn).await?)
        }
        (Some(INSUFFICIENT_FUNDS), _) => Err(WalletError::InsufficientFunds),
        // Committed claims always carry an outcome (NULL only inside its transaction).
        _ => Err(WalletError::Internal(format!("key claim without an outcome: {:?}", claim.outcome).into())),
    }
}

/// Locks the existing accounts the movements touch, in (user, currency) order.
/// Every transaction that moves money takes these locks before it claims any
/// idempotency key: the key of a movement on an existing account is then only
/// ever waited for by a transaction that holds that account already, which
/// rules out lock cycles between such movements.
async fn lock_accounts<'a>(
    conn: &mut AsyncPgConnection,
    movements: impl IntoIterator<Item = &'a Movement>,
) -> QueryResult<()> {
    use diesel::sql_types::{Array, Text};
    let (users, currencies): (Vec<&str>, Vec<&str>) =
        movements.into_iter().map(|m| (m.user.as_str(), m.currency.code())).unzip();
    diesel::sql_query(
        "SELECT 1 FROM accounts a
           JOIN unnest($1::text[], $2::text[]) AS t(user_id, currency)
             ON a.user_id = t.user_id AND a.currency = t.currency
          ORDER BY a.user_id, a.currency
            FOR UPDATE OF a",
    )
    .bind::<Array<Text>, _>(users)
    .bind::<Array<Text>, _>(currencies)
    .execute(conn)
    .await?;
    Ok(())
}
