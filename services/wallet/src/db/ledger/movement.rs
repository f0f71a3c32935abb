//! One credit or debit, exactly once per idempotency key.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::{
    APPLIED, Abort, INSUFFICIENT_FUNDS, MovementOutcome, answer, count, credit_balance, debit_balance, find_claim,
    lock_accounts, record_outcome, replay,
};
use crate::db::models::{LedgerEntry, NewKeyClaim, NewLedgerEntry};
use crate::db::schema::{idempotency_keys, ledger_entries};
use crate::domain::{Kind, Movement};
use crate::error::WalletError;

/// Applies a credit or debit exactly once per idempotency key and returns its
/// ledger entry. Replaying the same request returns the first outcome (the
/// entry, or INSUFFICIENT_FUNDS); the same key with any field changed is refused.
pub async fn apply(conn: &mut AsyncPgConnection, movement: &Movement) -> Result<LedgerEntry, WalletError> {
    // Replays (client retries, sweeper retries) are answered without a transaction.
    if let Some(claim) = find_claim(conn, movement.key.as_str()).await? {
        count(movement, "replayed");
        return replay(conn, claim, movement).await;
    }
    let outcome = conn
        .transaction::<_, Abort, _>(async |conn| {
            lock_accounts(conn, [movement]).await?;
            apply_movement(conn, movement).await
        })
        .await;
    match outcome {
        Ok(outcome) => answer(conn, movement, outcome).await,
        Err(Abort::Overflow) => Err(WalletError::BalanceOverflow),
        Err(Abort::Db(error)) => Err(error.into()),
    }
}

/// The statements of one movement, inside the caller's transaction.
pub(super) async fn apply_movement(
    conn: &mut AsyncPgConnection,
    movement: &Movement,
) -> Result<MovementOutcome, Abort> {
    let claimed = diesel::insert_into(idempotency_keys::table)
        .values(NewKeyClaim {
            idempotency_key: movement.key.as_str(),
            user_id: movement.user.as_str(),
            currency: movement.currency.code(),
            kind: movement.kind.as_db(),
            amount_minor: movement.amount.minor(),
            reference: movement.reference.as_str(),
        })
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    if claimed == 0 {
        return Ok(MovementOutcome::KeyTaken);
    }
    if movement.kind == Kind::Debit
        && let Some(entry) = crate::db::holds::capture_for_debit(conn, movement).await?
    {
        record_outcome(conn, movement, APPLIED, Some(entry.id)).await?;
        return Ok(MovementOutcome::Applied(entry));
    }
    let balance_after = match movement.kind {
        Kind::Debit => debit_balance(conn, movement).await?,
        Kind::Credit => Some(credit_balance(conn, movement).await?),
    };
    let Some(balance_after) = balance_after else {
        record_outcome(conn, movement, INSUFFICIENT_FUNDS, None).await?;
        return Ok(MovementOutcome::Refused);
    };
    let entry = diesel::insert_into(ledger_entries::table)
        .values(NewLedgerEntry {
            idempotency_key: movement.key.as_str(),
            user_id: movement.user.as_str(),
            currency: movement.currency.code(),
            kind: movement.kind.as_db(),
            amount_minor: movement.amount.minor(),
            balance_after_minor: balance_after,
            reference: movement.reference.as_str(),
            held_after_minor: None,
        })
        .returning(LedgerEntry::as_returning())
        .get_result(conn)
        .await?;
    record_outcome(conn, movement, APPLIED, Some(entry.id)).await?;
    Ok(MovementOutcome::Applied(entry))
}
