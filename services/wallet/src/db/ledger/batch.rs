//! Many movements in one transaction.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use super::movement::{apply, apply_movement};
use super::{APPLIED, Abort, INSUFFICIENT_FUNDS, MovementOutcome, answer, count, lock_accounts, replay};
use crate::db::models::{KeyClaim, LedgerEntry};
use crate::db::schema::idempotency_keys;
use crate::domain::{Kind, Movement};
use crate::error::WalletError;

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
            // Each account's first debit goes in the set-based statements (which
            // capture the order's hold where it has one); whatever else touches an
            // account already in them follows one by one.
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

/// [`apply_movement`] for debits of distinct accounts, as four set-based
/// statements (claim the keys; capture the held orders' holds and append their
/// entries; move the others' money and append their entries; record the
/// outcomes) instead of four or five per debit. Inside the caller's
/// transaction, with the accounts locked already.
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
    let claimed_here: Vec<usize> = (0..batch.len()).filter(|&j| claimed.contains(keys[j])).collect();
    let pick_of = |of: &[usize], column: &[&'a str]| of.iter().map(|&j| column[j]).collect::<Vec<&'a str>>();
    // An order whose funds are held is charged what is held: its open hold of
    // the same user and amount is captured (as `capture_for_debit` does for one
    // debit, holds a sweeper has locked left to it), the balance and the held
    // amount both go down, and the capture's entry is the debit's answer.
    let captured: Vec<LedgerEntry> = if claimed_here.is_empty() {
        Vec::new()
    } else {
        diesel::sql_query(
            "WITH d(k, u, c, a, r) AS (
                  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])),
                  due AS (
                  SELECT h.order_id FROM holds h
                    JOIN d ON h.order_id = d.k AND h.user_id = d.u AND h.currency = d.c AND h.amount_minor = d.a
                   WHERE h.state = 'open'
                     FOR UPDATE OF h SKIP LOCKED),
                  closed AS (
                  UPDATE holds SET state = 'captured', closed_at = now()
                    FROM due
                   WHERE holds.order_id = due.order_id
               RETURNING holds.order_id),
                  charged AS (
                  UPDATE accounts
                     SET balance_minor = balance_minor - d.a, held_minor = held_minor - d.a, updated_at = now()
                    FROM closed JOIN d ON d.k = closed.order_id
                   WHERE accounts.user_id = d.u AND accounts.currency = d.c
               RETURNING d.k, d.u, d.c, d.a, d.r, accounts.balance_minor, accounts.held_minor)
             INSERT INTO ledger_entries
                    (idempotency_key, user_id, currency, kind, amount_minor, balance_after_minor, reference,
                     held_after_minor)
             SELECT k, u, c, 'capture', a, balance_minor, r, held_minor FROM charged
             RETURNING id, idempotency_key, user_id, currency, kind, amount_minor, balance_after_minor, reference,
                       created_at, held_after_minor",
        )
        .bind::<Array<Text>, _>(pick_of(&claimed_here, &keys))
        .bind::<Array<Text>, _>(pick_of(&claimed_here, &users))
        .bind::<Array<Text>, _>(pick_of(&claimed_here, &currencies))
        .bind::<Array<BigInt>, _>(claimed_here.iter().map(|&j| amounts[j]).collect::<Vec<i64>>())
        .bind::<Array<Text>, _>(pick_of(&claimed_here, &references))
        .load(conn)
        .await?
    };
    for _ in &captured {
        metrics::counter!("flashsale_wallet_holds_total", "step" => "capture", "result" => "debited").increment(1);
    }
    let captured_keys: std::collections::HashSet<String> =
        captured.iter().map(|entry| entry.idempotency_key.clone()).collect();
    let mine: Vec<usize> = claimed_here.iter().copied().filter(|&j| !captured_keys.contains(keys[j])).collect();
    let pick = |column: &[&'a str]| pick_of(&mine, column);
    let entries: Vec<LedgerEntry> = if mine.is_empty() {
        Vec::new()
    } else {
        diesel::sql_query(
            "WITH d(k, u, c, a, r) AS (
                  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[])),
                  moved AS (
                  UPDATE accounts SET balance_minor = balance_minor - d.a, updated_at = now()
                    FROM d
                   WHERE accounts.user_id = d.u AND accounts.currency = d.c
                     AND accounts.balance_minor - accounts.held_minor >= d.a
               RETURNING d.k, d.u, d.c, d.a, d.r, accounts.balance_minor)
             INSERT INTO ledger_entries (idempotency_key, user_id, currency, kind, amount_minor, balance_after_minor, reference)
             SELECT k, u, c, 'debit', a, balance_minor, r FROM moved
             RETURNING id, idempotency_key, user_id, currency, kind, amount_minor, balance_after_minor, reference, created_at,
                       held_after_minor",
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
        entries.into_iter().chain(captured).map(|e| (e.idempotency_key.clone(), e)).collect();

    let mine = claimed_here;
    let pick = |column: &[&'a str]| pick_of(&mine, column);
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
