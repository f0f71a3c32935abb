//! Funds held for an order: hold, capture, void, and the expiry sweep. Every
//! rule is PostgreSQL's (see the `holds` migration):
//! - a hold takes only what is available: `held_minor` grows only
//!   `WHERE balance_minor - held_minor >= amount`, and `held_minor <= balance_minor`
//!   is a CHECK;
//! - one hold per order, ever: `holds.order_id` is the primary key, and a void
//!   that comes first leaves a `voided` row that a late hold runs into;
//! - a hold ends once: every ending is `UPDATE holds … WHERE state = 'open'`,
//!   so of a capture, a void and the sweeper only the first changes anything;
//! - an order is charged once: a capture claims the order id in
//!   `idempotency_keys`, the key a debit of the order uses;
//! - every change of the balance or the held amount appends a ledger entry
//!   recording both after it.
//!
//! Each call is one transaction that takes the hold's row first and its
//! account second, as debits take accounts, so none waits on another in a
//! cycle; the sweeper takes accounts in (user, currency) order.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::ledger::{APPLIED, record_claim_outcome};
use super::models::{HoldRow, LedgerEntry, NewKeyClaim, NewLedgerEntry};
use super::schema::{accounts, holds, idempotency_keys, ledger_entries};
use crate::domain::{HoldSpec, HoldTarget};
use crate::error::WalletError;

pub const OPEN: &str = "open";
pub const CAPTURED: &str = "captured";
pub const VOIDED: &str = "voided";
pub const EXPIRED: &str = "expired";

/// Why a hold's transaction was rolled back.
#[derive(Debug)]
enum Abort {
    /// Answer this, with nothing changed.
    Refuse(WalletError),
    Db(diesel::result::Error),
}

impl From<diesel::result::Error> for Abort {
    fn from(error: diesel::result::Error) -> Self {
        Self::Db(error)
    }
}

impl From<Abort> for WalletError {
    fn from(abort: Abort) -> Self {
        match abort {
            Abort::Refuse(error) => error,
            Abort::Db(error) => error.into(),
        }
    }
}

/// `flashsale_wallet_holds_total{step, result}`: holds, captures, voids and
/// expiries by how they ended.
fn count(step: &'static str, result: &'static str) {
    metrics::counter!("flashsale_wallet_holds_total", "step" => step, "result" => result).increment(1);
}

fn same(row: &HoldRow, target: &HoldTarget) -> bool {
    row.user_id == target.user.as_str()
        && row.currency == target.currency.code()
        && row.amount_minor == target.amount.minor()
}

diesel::define_sql_function! {
    /// The hold in one statement (migrations `hold_in_one_statement` and
    /// `hold_refusals_as_outcomes`): the outcome (`held`, `existing`,
    /// `insufficient_funds`, `paid_first:<recorded outcome>`) and, when held,
    /// the hold's expiry.
    fn hold_funds(
        order: Text,
        user: Text,
        currency: Text,
        amount: BigInt,
        reference: Text,
        ttl_seconds: Integer,
    ) -> diesel::sql_types::Record<(Text, diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)>;
}

/// Holds `spec.target.amount` of the user's available balance for the order:
/// one call of `hold_funds`, which takes the hold's row, then the account,
/// then reads the order's payment key (see its migration for why in that
/// order); a refusal keeps nothing.
pub async fn hold(conn: &mut AsyncPgConnection, spec: &HoldSpec) -> Result<HoldRow, WalletError> {
    let target = &spec.target;
    let (outcome, expires_at): (String, Option<chrono::DateTime<chrono::Utc>>) = diesel::select(hold_funds(
        target.order.as_str(),
        target.user.as_str(),
        target.currency.code(),
        target.amount.minor(),
        spec.reference.as_str(),
        i32::try_from(spec.ttl_seconds).unwrap_or(i32::MAX),
    ))
    .get_result(conn)
    .await?;
    match (outcome.as_str(), expires_at) {
        ("held", Some(expires_at)) => {
            count("hold", "held");
            Ok(HoldRow {
                order_id: target.order.as_str().to_owned(),
                user_id: target.user.as_str().to_owned(),
                currency: target.currency.code().to_owned(),
                amount_minor: target.amount.minor(),
                reference: spec.reference.as_str().to_owned(),
                state: OPEN.to_owned(),
                expires_at,
            })
        }
        ("insufficient_funds", _) => {
            count("hold", "insufficient_funds");
            Err(WalletError::InsufficientFunds)
        }
        ("existing", _) => {
            // The order has a hold (or a void) already: answer as it stands.
            let row = find(conn, target.order.as_str()).await?.ok_or(WalletError::HoldNotFound)?;
            if !same(&row, target) {
                count("hold", "key_reused");
                Err(WalletError::IdempotencyKeyReused)
            } else if row.state == VOIDED {
                count("hold", "voided_first");
                Err(WalletError::HoldClosed(VOIDED))
            } else {
                count("hold", "replayed");
                Ok(row)
            }
        }
        // The order's payment was decided by a debit without a hold.
        (paid, _) if paid.starts_with("paid_first:") => {
            count("hold", "paid_first");
            let applied = paid.strip_prefix("paid_first:") == Some(APPLIED);
            Err(WalletError::HoldClosed(if applied { CAPTURED } else { VOIDED }))
        }
        (other, _) => Err(WalletError::Internal(format!("hold_funds answered {other:?}").into())),
    }
}

/// Charges the order's held amount; a repeat answers the same ledger entry.
pub async fn capture(conn: &mut AsyncPgConnection, target: &HoldTarget) -> Result<LedgerEntry, WalletError> {
    let order = target.order.as_str();
    let result = conn
        .transaction::<_, Abort, _>(async |conn| {
            let Some(row) = close_matching(conn, target, CAPTURED).await? else {
                return Ok(None);
            };
            // The order id as the charge's key: a debit of this order, made
            // earlier by a caller that did not capture, has it already.
            let claimed = diesel::insert_into(idempotency_keys::table)
                .values(NewKeyClaim {
                    idempotency_key: order,
                    user_id: &row.user_id,
                    currency: &row.currency,
                    kind: "capture",
                    amount_minor: row.amount_minor,
                    reference: &row.reference,
                })
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
            if claimed == 0 {
                return Err(Abort::Refuse(WalletError::IdempotencyKeyReused));
            }
            let (balance, held) = charge_held(conn, &row).await?;
            let entry = append(conn, order, &row, "capture", balance, held).await?;
            record_claim_outcome(conn, order, APPLIED, Some(entry.id)).await?;
            Ok(Some(entry))
        })
        .await?;
    if let Some(entry) = result {
        count("capture", "captured");
        return Ok(entry);
    }
    // Nothing open to capture: answer what became of the hold.
    let row = find(conn, order).await?.ok_or(WalletError::HoldNotFound)?;
    if !same(&row, target) {
        return Err(WalletError::IdempotencyKeyReused);
    }
    if row.state != CAPTURED {
        count("capture", closed_state(&row.state));
        return Err(WalletError::HoldClosed(closed_state(&row.state)));
    }
    count("capture", "replayed");
    Ok(ledger_entries::table
        .filter(ledger_entries::idempotency_key.eq(order))
        .select(LedgerEntry::as_select())
        .first(conn)
        .await?)
}

/// The debit of an order whose funds are held: inside the debit's
/// transaction (its account locked, its key claimed), captures the order's
/// open hold of the same user and amount, if there is one, and returns the
/// capture's ledger entry (under the debit's key, the order id); `None` and
/// nothing changed otherwise, and the debit goes on as any other. So settling
/// an order by debit, one by one or in a batch, charges the held money, and
/// the order's hold never outlives its charge.
///
/// The hold's row is taken only if no one else has it locked (`SKIP LOCKED`):
/// the sweeper locks holds before accounts and a debit accounts before holds,
/// so waiting here could deadlock; a hold the sweeper is expiring is left to
/// it, and the debit takes the money from what it releases.
pub(super) async fn capture_for_debit(
    conn: &mut AsyncPgConnection,
    movement: &crate::domain::Movement,
) -> QueryResult<Option<LedgerEntry>> {
    let captured: Option<HoldRow> = diesel::sql_query(
        "UPDATE holds SET state = 'captured', closed_at = now()
          WHERE order_id = (SELECT order_id FROM holds
                             WHERE order_id = $1 AND state = 'open' AND user_id = $2 AND currency = $3
                               AND amount_minor = $4
                               FOR UPDATE SKIP LOCKED)
      RETURNING order_id, user_id, currency, amount_minor, reference, state, expires_at",
    )
    .bind::<Text, _>(movement.key.as_str())
    .bind::<Text, _>(movement.user.as_str())
    .bind::<Text, _>(movement.currency.code())
    .bind::<BigInt, _>(movement.amount.minor())
    .get_result(conn)
    .await
    .optional()?;
    let Some(row) = captured else { return Ok(None) };
    let (balance, held) = charge_held(conn, &row).await?;
    count("capture", "debited");
    append_as(conn, movement.key.as_str(), &row, "capture", balance, held, movement.reference.as_str()).await.map(Some)
}

/// Releases the order's held amount, or marks the order voided when no hold
/// has arrived yet.
pub async fn void(conn: &mut AsyncPgConnection, target: &HoldTarget) -> Result<HoldRow, WalletError> {
    let order = target.order.as_str();
    // A hold inserted between the two statements (the mark's insert then
    // conflicts with an open hold) is voided on the next turn.
    for _ in 0..3 {
        let released = conn
            .transaction::<_, Abort, _>(async |conn| {
                let Some(row) = close_matching(conn, target, VOIDED).await? else {
                    return Ok(None);
                };
                release(conn, &row).await?;
                Ok(Some(row))
            })
            .await?;
        if let Some(mut row) = released {
            count("void", "released");
            row.state = VOIDED.into();
            return Ok(row);
        }
        let marked: Option<HoldRow> = diesel::sql_query(
            "INSERT INTO holds (order_id, user_id, currency, amount_minor, state, expires_at, closed_at)
             VALUES ($1, $2, $3, $4, 'voided', now(), now())
             ON CONFLICT DO NOTHING
             RETURNING order_id, user_id, currency, amount_minor, reference, state, expires_at",
        )
        .bind::<Text, _>(order)
        .bind::<Text, _>(target.user.as_str())
        .bind::<Text, _>(target.currency.code())
        .bind::<BigInt, _>(target.amount.minor())
        .get_result(conn)
        .await
        .optional()?;
        if let Some(row) = marked {
            count("void", "marked");
            return Ok(row);
        }
        let Some(row) = find(conn, order).await? else { continue };
        if !same(&row, target) {
            return Err(WalletError::IdempotencyKeyReused);
        }
        match row.state.as_str() {
            OPEN => continue,
            CAPTURED => {
                count("void", "captured");
                return Err(WalletError::HoldClosed(CAPTURED));
            }
            _ => {
                count("void", "replayed");
                return Ok(row);
            }
        }
    }
    Err(WalletError::Unavailable("the order's hold kept changing under the void".into()))
}

/// Releases up to `limit` holds past their expiry; returns how many. Holds a
/// capture or void has locked are left to it (`SKIP LOCKED`): whichever ends
/// a hold first wins, the other finds it closed.
pub async fn sweep_expired(conn: &mut AsyncPgConnection, limit: i64) -> Result<usize, WalletError> {
    let expired = conn
        .transaction::<_, Abort, _>(async |conn| {
            let mut rows: Vec<HoldRow> = diesel::sql_query(
                "WITH due AS (
                     SELECT order_id FROM holds
                      WHERE state = 'open' AND expires_at < now()
                      ORDER BY expires_at
                      LIMIT $1
                        FOR UPDATE SKIP LOCKED)
                 UPDATE holds SET state = 'expired', closed_at = now()
                   FROM due
                  WHERE holds.order_id = due.order_id
              RETURNING holds.order_id, holds.user_id, holds.currency, holds.amount_minor, holds.reference,
                        holds.state, holds.expires_at",
            )
            .bind::<BigInt, _>(limit)
            .load(conn)
            .await?;
            rows.sort_by(|a, b| (&a.user_id, &a.currency, &a.order_id).cmp(&(&b.user_id, &b.currency, &b.order_id)));
            for row in &rows {
                release(conn, row).await?;
            }
            Ok(rows.len())
        })
        .await?;
    for _ in 0..expired {
        count("expire", "released");
    }
    Ok(expired)
}

/// Ends `target`'s hold if it is open ([`close`]); a hold of another user or
/// amount under the same order id is refused, and the caller's transaction
/// rolled back with nothing changed.
async fn close_matching(
    conn: &mut AsyncPgConnection,
    target: &HoldTarget,
    state: &str,
) -> Result<Option<HoldRow>, Abort> {
    match close(conn, target.order.as_str(), state).await? {
        Some(row) if !same(&row, target) => Err(Abort::Refuse(WalletError::IdempotencyKeyReused)),
        closed => Ok(closed),
    }
}

/// Ends the order's hold if it is open (row locked until the transaction ends).
async fn close(conn: &mut AsyncPgConnection, order: &str, state: &str) -> QueryResult<Option<HoldRow>> {
    diesel::update(holds::table.find(order))
        .filter(holds::state.eq(OPEN))
        .set((holds::state.eq(state), holds::closed_at.eq(diesel::dsl::now)))
        .returning(HoldRow::as_returning())
        .get_result(conn)
        .await
        .optional()
}

/// Charges a captured hold's amount: the balance and the held amount both go
/// down by it; returns them after.
async fn charge_held(conn: &mut AsyncPgConnection, row: &HoldRow) -> QueryResult<(i64, i64)> {
    diesel::update(accounts::table)
        .filter(accounts::user_id.eq(&row.user_id))
        .filter(accounts::currency.eq(&row.currency))
        .set((
            accounts::balance_minor.eq(accounts::balance_minor - row.amount_minor),
            accounts::held_minor.eq(accounts::held_minor - row.amount_minor),
            accounts::updated_at.eq(diesel::dsl::now),
        ))
        .returning((accounts::balance_minor, accounts::held_minor))
        .get_result(conn)
        .await
}

/// Gives a closed hold's amount back to what is available, with its entry.
async fn release(conn: &mut AsyncPgConnection, row: &HoldRow) -> Result<(), Abort> {
    let (balance, held): (i64, i64) = diesel::update(accounts::table)
        .filter(accounts::user_id.eq(&row.user_id))
        .filter(accounts::currency.eq(&row.currency))
        .set((
            accounts::held_minor.eq(accounts::held_minor - row.amount_minor),
            accounts::updated_at.eq(diesel::dsl::now),
        ))
        .returning((accounts::balance_minor, accounts::held_minor))
        .get_result(conn)
        .await?;
    append(conn, &format!("{}/release", row.order_id), row, "release", balance, held).await?;
    Ok(())
}

async fn append(
    conn: &mut AsyncPgConnection,
    key: &str,
    row: &HoldRow,
    kind: &str,
    balance_after: i64,
    held_after: i64,
) -> QueryResult<LedgerEntry> {
    append_as(conn, key, row, kind, balance_after, held_after, &row.reference).await
}

async fn append_as(
    conn: &mut AsyncPgConnection,
    key: &str,
    row: &HoldRow,
    kind: &str,
    balance_after: i64,
    held_after: i64,
    reference: &str,
) -> QueryResult<LedgerEntry> {
    diesel::insert_into(ledger_entries::table)
        .values(NewLedgerEntry {
            idempotency_key: key,
            user_id: &row.user_id,
            currency: &row.currency,
            kind,
            amount_minor: row.amount_minor,
            balance_after_minor: balance_after,
            reference,
            held_after_minor: Some(held_after),
        })
        .returning(LedgerEntry::as_returning())
        .get_result(conn)
        .await
}

async fn find(conn: &mut AsyncPgConnection, order: &str) -> QueryResult<Option<HoldRow>> {
    holds::table.find(order).select(HoldRow::as_select()).first(conn).await.optional()
}

fn closed_state(state: &str) -> &'static str {
    match state {
        CAPTURED => CAPTURED,
        VOIDED => VOIDED,
        _ => EXPIRED,
    }
}
