//! Money movements and reads. The rules that protect money are enforced by
//! PostgreSQL, and this code only chooses statements that let it:
//! - no overdraft: the debit is `UPDATE … WHERE balance_minor >= amount`, and
//!   `balance_minor >= 0` is a CHECK besides;
//! - one outcome per idempotency key: the movement first inserts its key into
//!   `idempotency_keys` (primary key), in the transaction that moves the money,
//!   so a concurrent request with the same key waits for it and then replays
//!   what it recorded: the ledger entry, or the refusal for insufficient funds;
//! - no overflow: the credit adds only `WHERE balance_minor <= i64::MAX - amount`.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::models::{Balance, KeyClaim, LedgerEntry, NewAccount, NewKeyClaim, NewLedgerEntry};
use super::schema::{accounts, idempotency_keys, ledger_entries};
use crate::domain::{Currency, Kind, Movement, Page, UserId};
use crate::error::WalletError;

const APPLIED: &str = "applied";
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

/// Applies many movements in one transaction (one commit instead of one per
/// movement, which is what bounds settlement), each under its own key with
/// exactly the outcome [`apply`] would give it alone; results in input order.
///
/// Like every movement, the batch locks its accounts first, in one global
/// order, and claims keys only under its account's lock, so batches and single
/// movements on existing accounts do not deadlock each other. If the
/// transaction fails anyway (PostgreSQL breaking a deadlock between keys of
/// accounts that do not exist yet, or between batches reusing one key for two
/// users; an overflowing credit), every movement is applied on its own instead.
pub async fn apply_batch(
    conn: &mut AsyncPgConnection,
    movements: &[Movement],
) -> Result<Vec<Result<LedgerEntry, WalletError>>, WalletError> {
    let keys: Vec<&str> = movements.iter().map(|m| m.key.as_str()).collect();
    let mut claims: std::collections::HashMap<String, KeyClaim> = idempotency_keys::table
        .filter(idempotency_keys::idempotency_key.eq_any(&keys))
        .select(KeyClaim::as_select())
        .load(conn)
        .await?
        .into_iter()
        .map(|claim| (claim.idempotency_key.clone(), claim))
        .collect();
    let mut fresh: Vec<usize> = (0..movements.len()).filter(|&i| !claims.contains_key(keys[i])).collect();
    fresh.sort_by(|&a, &b| {
        let (a, b) = (&movements[a], &movements[b]);
        (a.user.as_str(), a.currency.code(), a.key.as_str()).cmp(&(b.user.as_str(), b.currency.code(), b.key.as_str()))
    });
    let outcomes = conn
        .transaction::<_, Abort, _>(async |conn| {
            let mut outcomes = Vec::with_capacity(fresh.len());
            lock_accounts(conn, fresh.iter().map(|&i| &movements[i])).await?;
            // Each account's first debit goes in the set-based statements; whatever
            // else touches an account already in them follows one by one.
            let mut accounts = std::collections::HashSet::new();
            let mut seen_keys = std::collections::HashSet::new();
            let (first, rest): (Vec<usize>, Vec<usize>) = fresh.iter().partition(|&&i| {
                let m = &movements[i];
                m.kind == Kind::Debit
                    && !accounts.contains(&(m.user.as_str(), m.currency.code()))
                    && !seen_keys.contains(m.key.as_str())
                    && accounts.insert((m.user.as_str(), m.currency.code()))
                    && seen_keys.insert(m.key.as_str())
            });
            outcomes.extend(debit_set(conn, movements, &first).await?);
            for i in rest {
                outcomes.push((i, apply_movement(conn, &movements[i]).await?));
            }
            Ok(outcomes)
        })
        .await;
    let mut results: Vec<Option<Result<LedgerEntry, WalletError>>> = (0..movements.len()).map(|_| None).collect();
    match outcomes {
        Ok(outcomes) => {
            for (i, outcome) in outcomes {
                results[i] = Some(answer(conn, &movements[i], outcome).await);
            }
        }
        Err(error) => {
            if let Abort::Db(error) = &error {
                tracing::warn!(error = %error, movements = fresh.len(), "batch transaction failed; applying one by one");
            }
            for &i in &fresh {
                results[i] = Some(apply(conn, &movements[i]).await);
            }
        }
    }
    let mut answers = Vec::with_capacity(movements.len());
    for (movement, result) in movements.iter().zip(results) {
        answers.push(match result {
            Some(result) => result,
            None => {
                // Claimed before this batch: a replay.
                match claims.remove(movement.key.as_str()) {
                    Some(claim) => {
                        count(movement, "replayed");
                        replay(conn, claim, movement).await
                    }
                    // The same key twice in the batch: `apply` replays the first.
                    None => apply(conn, movement).await,
                }
            }
        });
    }
    Ok(answers)
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

/// [`apply_movement`] for debits of distinct accounts, as three set-based statements
/// (claim the keys, move the money and append the entries, record the
/// outcomes) instead of four per debit. Inside the caller's transaction, with
/// the accounts locked already.
async fn debit_set<'a>(
    conn: &mut AsyncPgConnection,
    movements: &'a [Movement],
    indices: &[usize],
) -> Result<Vec<(usize, MovementOutcome)>, Abort> {
    use diesel::sql_types::{Array, BigInt, Nullable, Text};
    if indices.is_empty() {
        return Ok(Vec::new());
    }
    let batch: Vec<&'a Movement> = indices.iter().map(|&i| &movements[i]).collect();
    let keys: Vec<&'a str> = batch.iter().map(|m| m.key.as_str()).collect();
    let users: Vec<&'a str> = batch.iter().map(|m| m.user.as_str()).collect();
    let currencies: Vec<&'a str> = batch.iter().map(|m| m.currency.code()).collect();
    let amounts: Vec<i64> = batch.iter().map(|m| m.amount.minor()).collect();
    let references: Vec<&'a str> = batch.iter().map(|m| m.reference.as_str()).collect();

    #[derive(QueryableByName)]
    struct Claimed {
        #[diesel(sql_type = Text)]
        idempotency_key: String,
    }
    let claimed: std::collections::HashSet<String> = diesel::sql_query(
        "INSERT INTO idempotency_keys (idempotency_key, user_id, currency, kind, amount_minor, reference)
         SELECT k, u, c, 'debit', a, r FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])
                AS d(k, u, c, a, r)
         ON CONFLICT DO NOTHING
         RETURNING idempotency_key",
    )
    .bind::<Array<Text>, _>(&keys)
    .bind::<Array<Text>, _>(&users)
    .bind::<Array<Text>, _>(&currencies)
    .bind::<Array<BigInt>, _>(&amounts)
    .bind::<Array<Text>, _>(&references)
    .load::<Claimed>(conn)
    .await?
    .into_iter()
    .map(|c| c.idempotency_key)
    .collect();

    // Only the claimed ones move money: the others belong to a concurrent request.
    let mine: Vec<usize> = (0..batch.len()).filter(|&j| claimed.contains(keys[j])).collect();
    let pick = |column: &[&'a str]| mine.iter().map(|&j| column[j]).collect::<Vec<&'a str>>();
    let entries: Vec<LedgerEntry> = if mine.is_empty() {
        Vec::new()
    } else {
        diesel::sql_query(
            "WITH d(k, u, c, a, r) AS (
                  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])),
                  moved AS (
                  UPDATE accounts SET balance_minor = balance_minor - d.a, updated_at = now()
                    FROM d
                   WHERE accounts.user_id = d.u AND accounts.currency = d.c AND accounts.balance_minor >= d.a
               RETURNING d.k, d.u, d.c, d.a, d.r, accounts.balance_minor)
             INSERT INTO ledger_entries (idempotency_key, user_id, currency, kind, amount_minor, balance_after_minor, reference)
             SELECT k, u, c, 'debit', a, balance_minor, r FROM moved
             RETURNING id, idempotency_key, user_id, currency, kind, amount_minor, balance_after_minor, reference, created_at",
        )
        .bind::<Array<Text>, _>(pick(&keys))
        .bind::<Array<Text>, _>(pick(&users))
        .bind::<Array<Text>, _>(pick(&currencies))
        .bind::<Array<BigInt>, _>(mine.iter().map(|&j| amounts[j]).collect::<Vec<i64>>())
        .bind::<Array<Text>, _>(pick(&references))
        .load(conn)
        .await?
    };
    let mut by_key: std::collections::HashMap<String, LedgerEntry> =
        entries.into_iter().map(|e| (e.idempotency_key.clone(), e)).collect();

    let outcomes: Vec<&str> =
        mine.iter().map(|&j| if by_key.contains_key(keys[j]) { APPLIED } else { INSUFFICIENT_FUNDS }).collect();
    let entry_ids: Vec<Option<i64>> = mine.iter().map(|&j| by_key.get(keys[j]).map(|e| e.id)).collect();
    if !mine.is_empty() {
        diesel::sql_query(
            "UPDATE idempotency_keys SET outcome = o.outcome, ledger_entry_id = o.entry
               FROM unnest($1::text[], $2::text[], $3::bigint[]) AS o(k, outcome, entry)
              WHERE idempotency_keys.idempotency_key = o.k",
        )
        .bind::<Array<Text>, _>(pick(&keys))
        .bind::<Array<Text>, _>(&outcomes)
        .bind::<Array<Nullable<BigInt>>, _>(&entry_ids)
        .execute(conn)
        .await?;
    }

    Ok((0..batch.len())
        .map(|j| {
            let outcome = if !claimed.contains(keys[j]) {
                MovementOutcome::KeyTaken
            } else {
                match by_key.remove(keys[j]) {
                    Some(entry) => MovementOutcome::Applied(entry),
                    None => MovementOutcome::Refused,
                }
            };
            (indices[j], outcome)
        })
        .collect())
}

/// The statements of one movement, inside the caller's transaction.
async fn apply_movement(conn: &mut AsyncPgConnection, movement: &Movement) -> Result<MovementOutcome, Abort> {
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
        })
        .returning(LedgerEntry::as_returning())
        .get_result(conn)
        .await?;
    record_outcome(conn, movement, APPLIED, Some(entry.id)).await?;
    Ok(MovementOutcome::Applied(entry))
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
    diesel::update(idempotency_keys::table.find(movement.key.as_str()))
        .set((idempotency_keys::outcome.eq(outcome), idempotency_keys::ledger_entry_id.eq(entry_id)))
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes `amount` from the account if it covers it; returns the new balance,
/// or `None` when the balance (or the account) does not cover it.
async fn debit_balance(conn: &mut AsyncPgConnection, movement: &Movement) -> Result<Option<i64>, Abort> {
    let amount = movement.amount.minor();
    Ok(diesel::update(accounts::table)
        .filter(accounts::user_id.eq(movement.user.as_str()))
        .filter(accounts::currency.eq(movement.currency.code()))
        .filter(accounts::balance_minor.ge(amount))
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
