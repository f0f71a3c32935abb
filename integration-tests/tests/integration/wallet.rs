//! The wallet against real PostgreSQL: concurrency, idempotency, conservation, bad input.
//!
//! Longer than the ~400 lines other files keep to, on purpose: it is a
//! catalogue of independent tests, one scenario each with its own set-up and
//! audit, read one test at a time; the docs cite them by name (`wallet::name`),
//! and splitting it would scatter those names for no gain in reading.

use std::collections::BTreeMap;

use flashsale_integration_tests::{TestWallet, error_reason, wallet::audit_ledger};
use flashsale_proto::common::v1::Money;
use flashsale_proto::wallet::v1::debit_result::Outcome;
use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use flashsale_proto::wallet::v1::{
    BatchDebitRequest, CreditRequest, DebitRequest, GetBalanceRequest, ListTransactionsRequest, TransactionKind,
};
use rand::{Rng, SeedableRng};
use tonic::Code;
use tonic::transport::Channel;

fn money(currency: &str, amount_minor: i64) -> Option<Money> {
    Some(Money { currency: currency.into(), amount_minor })
}

async fn credit(
    client: &mut WalletServiceClient<Channel>,
    key: &str,
    user: &str,
    amount: Option<Money>,
) -> Result<i64, tonic::Status> {
    let response = client
        .credit(CreditRequest { idempotency_key: key.into(), user_id: user.into(), amount, reference: String::new() })
        .await?;
    Ok(response.into_inner().transaction.and_then(|t| t.balance_after).map(|m| m.amount_minor).unwrap_or(-1))
}

fn debit_request(key: &str, user: &str, amount: Option<Money>) -> DebitRequest {
    DebitRequest { idempotency_key: key.into(), user_id: user.into(), amount, reference: String::new() }
}

async fn balance(client: &mut WalletServiceClient<Channel>, user: &str, currency: &str) -> anyhow::Result<i64> {
    let balances = client
        .get_balance(GetBalanceRequest { user_id: user.into(), currency: currency.into() })
        .await?
        .into_inner()
        .balances;
    anyhow::ensure!(balances.len() == 1, "one currency asked, {} answered", balances.len());
    Ok(balances[0].amount_minor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_debits_succeed_exactly_as_far_as_the_balance_covers() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    const PRICE: i64 = 1_999;
    const COVERED: i64 = 37;
    const LEFTOVER: i64 = PRICE - 1; // not enough for one more
    credit(&mut client, "top-up", "alice", money("USD", PRICE * COVERED + LEFTOVER)).await?;

    let attempts = (0..100).map(|i| {
        let mut client = wallet.client();
        tokio::spawn(
            async move { client.debit(debit_request(&format!("order-{i}"), "alice", money("USD", PRICE))).await },
        )
    });
    let mut succeeded = 0;
    let mut refused = 0;
    for attempt in futures::future::join_all(attempts).await {
        match attempt? {
            Ok(_) => succeeded += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(error_reason(&status).as_deref(), Some("INSUFFICIENT_FUNDS"));
                refused += 1;
            }
        }
    }
    assert_eq!(succeeded, COVERED);
    assert_eq!(refused, 100 - COVERED);
    assert_eq!(balance(&mut client, "alice", "USD").await?, LEFTOVER);

    // Every intermediate balance the ledger recorded was >= 0 and consistent.
    let totals = audit_ledger(wallet.db.url()).await?;
    let usd = &totals["USD"];
    assert_eq!(usd.debits, i128::from(PRICE * COVERED));
    assert_eq!(usd.credits - usd.debits, usd.balances);
    wallet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_sent_twenty_times_concurrently_moves_money_once() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    credit(&mut client, "top-up", "bob", money("EUR", 10_000)).await?;

    let attempts = (0..20).map(|_| {
        let mut client = wallet.client();
        tokio::spawn(async move { client.debit(debit_request("order-42", "bob", money("EUR", 2_500))).await })
    });
    let mut replies = Vec::new();
    for attempt in futures::future::join_all(attempts).await {
        replies.push(attempt??.into_inner());
    }
    assert_eq!(replies.len(), 20);
    assert!(replies.iter().all(|reply| *reply == replies[0]), "replies differ: {replies:?}");
    let transaction = replies[0].transaction.clone().ok_or_else(|| anyhow::anyhow!("no transaction"))?;
    assert_eq!(transaction.kind(), TransactionKind::Debit);
    assert_eq!(transaction.balance_after, money("EUR", 7_500));

    let ledger = client
        .list_transactions(ListTransactionsRequest {
            user_id: "bob".into(),
            currency: "EUR".into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    let debits = ledger.transactions.iter().filter(|t| t.idempotency_key == "order-42").count();
    assert_eq!(debits, 1, "one ledger entry for the key");
    assert_eq!(balance(&mut client, "bob", "EUR").await?, 7_500);

    // The same key with another amount, or for another user, is refused and moves nothing.
    for request in
        [debit_request("order-42", "bob", money("EUR", 2_600)), debit_request("order-42", "carol", money("EUR", 2_500))]
    {
        let status = client.debit(request).await.expect_err("key reuse must be refused");
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(error_reason(&status).as_deref(), Some("IDEMPOTENCY_KEY_REUSED"));
    }
    // A credit under a debit's key is another request too.
    let status = credit(&mut client, "order-42", "bob", money("EUR", 2_500)).await.expect_err("kind differs");
    assert_eq!(error_reason(&status).as_deref(), Some("IDEMPOTENCY_KEY_REUSED"));
    assert_eq!(balance(&mut client, "bob", "EUR").await?, 7_500);
    wallet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_movements_conserve_money_per_currency() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    const USERS: usize = 100;
    const MOVEMENTS: usize = 10_000;
    const WORKERS: usize = 32;
    const CURRENCIES: [&str; 3] = ["USD", "EUR", "JPY"];

    // Each worker runs its share of the movements; results are tallied by what the
    // wallet answered, then compared with balances and with the raw tables.
    let workers = (0..WORKERS).map(|worker| {
        let mut client = wallet.client();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(worker as u64);
            let mut net: BTreeMap<&'static str, i128> = BTreeMap::new();
            let mut refused = 0u64;
            for n in (worker..MOVEMENTS).step_by(WORKERS) {
                let user = format!("user-{}", rng.random_range(0..USERS));
                let currency = CURRENCIES[rng.random_range(0..CURRENCIES.len())];
                let amount = rng.random_range(1..=5_000);
                let key = format!("movement-{n}");
                if rng.random_bool(0.5) {
                    credit(&mut client, &key, &user, money(currency, amount)).await?;
                    *net.entry(currency).or_default() += i128::from(amount);
                } else {
                    match client.debit(debit_request(&key, &user, money(currency, amount))).await {
                        Ok(_) => *net.entry(currency).or_default() -= i128::from(amount),
                        Err(status) if error_reason(&status).as_deref() == Some("INSUFFICIENT_FUNDS") => refused += 1,
                        Err(status) => return Err(anyhow::Error::from(status)),
                    }
                }
            }
            anyhow::Ok((net, refused))
        })
    });
    let mut expected: BTreeMap<&str, i128> = BTreeMap::new();
    let mut refused = 0;
    for worker in futures::future::join_all(workers).await {
        let (net, worker_refused) = worker??;
        refused += worker_refused;
        for (currency, amount) in net {
            *expected.entry(currency).or_default() += amount;
        }
    }
    assert!(refused > 0, "the mix should include overdraft attempts");

    // Σ balances over the API == what the replies add up to, per currency.
    let mut client = wallet.client();
    let mut balances: BTreeMap<String, i128> = BTreeMap::new();
    for user in 0..USERS {
        let reply = client
            .get_balance(GetBalanceRequest { user_id: format!("user-{user}"), currency: String::new() })
            .await?
            .into_inner();
        for Money { currency, amount_minor } in reply.balances {
            assert!(amount_minor >= 0);
            *balances.entry(currency).or_default() += i128::from(amount_minor);
        }
    }
    for currency in CURRENCIES {
        assert_eq!(balances.get(currency), expected.get(currency), "{currency}");
    }

    // And in the tables: credits − debits == Σ balances, each account's ledger replays.
    let totals = audit_ledger(wallet.db.url()).await?;
    for currency in CURRENCIES {
        let t = &totals[currency];
        assert_eq!(t.credits - t.debits, t.balances, "{currency}");
        assert_eq!(Some(&t.balances), expected.get(currency), "{currency}");
    }
    wallet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_and_writes_nothing() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    let ok = || debit_request("key-1", "dave", money("USD", 100));
    let cases: Vec<(&str, DebitRequest)> = vec![
        ("zero amount", DebitRequest { amount: money("USD", 0), ..ok() }),
        ("negative amount", DebitRequest { amount: money("USD", -5), ..ok() }),
        ("overflowing amount", DebitRequest { amount: money("USD", i64::MAX), ..ok() }),
        ("most negative amount", DebitRequest { amount: money("USD", i64::MIN), ..ok() }),
        ("missing amount", DebitRequest { amount: None, ..ok() }),
        ("lower-case currency", DebitRequest { amount: money("usd", 100), ..ok() }),
        ("unknown currency", DebitRequest { amount: money("ZZZ", 100), ..ok() }),
        ("two-letter currency", DebitRequest { amount: money("US", 100), ..ok() }),
        ("empty currency", DebitRequest { amount: money("", 100), ..ok() }),
        ("empty user", DebitRequest { user_id: String::new(), ..ok() }),
        ("blank user", DebitRequest { user_id: "   ".into(), ..ok() }),
        ("oversized user", DebitRequest { user_id: "u".repeat(129), ..ok() }),
        ("empty key", DebitRequest { idempotency_key: String::new(), ..ok() }),
        ("oversized key", DebitRequest { idempotency_key: "k".repeat(129), ..ok() }),
        ("key with spaces", DebitRequest { idempotency_key: "two words".into(), ..ok() }),
        ("oversized reference", DebitRequest { reference: "r".repeat(257), ..ok() }),
        ("control characters in reference", DebitRequest { reference: "a\u{0}b".into(), ..ok() }),
    ];
    for (name, request) in cases {
        let status = client.debit(request.clone()).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert_eq!(error_reason(&status).as_deref(), Some("INVALID_ARGUMENT"), "{name}");
        assert!(!status.message().to_lowercase().contains("sql"), "{name}: internal text leaked");
        let credit = CreditRequest {
            idempotency_key: request.idempotency_key,
            user_id: request.user_id,
            amount: request.amount,
            reference: request.reference,
        };
        let status = client.credit(credit).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "credit {name}: {status:?}");
    }

    // A balance that a further credit would push past i64::MAX: refused, unchanged.
    const BIG: i64 = 1_000_000_000_000_000;
    let mut expected = 0i64;
    let mut n = 0;
    loop {
        match credit(&mut client, &format!("big-{n}"), "erin", money("USD", BIG)).await {
            Ok(balance) => expected = balance,
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                break;
            }
        }
        n += 1;
        assert!(n < 10_000, "balance never overflowed");
    }
    assert!(expected > i64::MAX - BIG, "refused before the balance was near the limit");
    assert_eq!(balance(&mut client, "erin", "USD").await?, expected);

    // A whole request above the transport cap is refused by tonic before any handler
    // (OUT_OF_RANGE, tonic's code for it) and writes nothing either.
    let huge = DebitRequest { reference: "r".repeat(300 * 1024), ..ok() };
    let status = client.debit(huge).await.expect_err("oversized message");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // Nothing from the bad requests reached the tables.
    let totals = audit_ledger(wallet.db.url()).await?;
    assert_eq!(totals.keys().collect::<Vec<_>>(), vec!["USD"]);
    let dave =
        client.get_balance(GetBalanceRequest { user_id: "dave".into(), currency: String::new() }).await?.into_inner();
    assert!(dave.balances.is_empty(), "dave got an account: {dave:?}");
    let keys = client
        .list_transactions(ListTransactionsRequest { user_id: "dave".into(), ..Default::default() })
        .await?
        .into_inner();
    assert!(keys.transactions.is_empty());
    wallet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_listed_newest_first_one_page_at_a_time() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    for n in 0..7 {
        credit(&mut client, &format!("c-{n}"), "fay", money("GBP", 100 + n)).await?;
    }
    credit(&mut client, "other-currency", "fay", money("CHF", 1)).await?;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_transactions(ListTransactionsRequest {
                user_id: "fay".into(),
                currency: "GBP".into(),
                page_size: 3,
                page_token: token,
            })
            .await?
            .into_inner();
        assert!(page.transactions.len() <= 3);
        seen.extend(page.transactions.into_iter().map(|t| t.idempotency_key));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = (0..7).rev().map(|n| format!("c-{n}")).collect();
    assert_eq!(seen, expected);

    let status = client
        .list_transactions(ListTransactionsRequest {
            user_id: "fay".into(),
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .expect_err("garbage token");
    assert_eq!(status.code(), Code::InvalidArgument);
    wallet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_debit_stays_refused_for_its_key_even_after_a_top_up() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    credit(&mut client, "top-up-1", "gil", money("USD", 100)).await?;
    let status = client.debit(debit_request("order-7", "gil", money("USD", 500))).await.expect_err("too little");
    assert_eq!(error_reason(&status).as_deref(), Some("INSUFFICIENT_FUNDS"));

    // The buyer tops up; a late retry of the refused payment (its order was
    // rejected meanwhile) must not charge them now.
    credit(&mut client, "top-up-2", "gil", money("USD", 1_000)).await?;
    let status = client.debit(debit_request("order-7", "gil", money("USD", 500))).await.expect_err("replayed");
    assert_eq!(error_reason(&status).as_deref(), Some("INSUFFICIENT_FUNDS"));
    assert_eq!(balance(&mut client, "gil", "USD").await?, 1_100);
    // A changed request under that key is still a reuse.
    let status = client.debit(debit_request("order-7", "gil", money("USD", 50))).await.expect_err("reuse");
    assert_eq!(error_reason(&status).as_deref(), Some("IDEMPOTENCY_KEY_REUSED"));
    // A new key pays.
    client.debit(debit_request("order-8", "gil", money("USD", 500))).await?;
    assert_eq!(balance(&mut client, "gil", "USD").await?, 600);
    audit_ledger(wallet.db.url()).await?;
    wallet.shutdown().await
}

/// A batch result as `Ok(balance after)` or `Err(reason)`.
fn outcome(result: &flashsale_proto::wallet::v1::DebitResult) -> Result<i64, String> {
    match &result.outcome {
        Some(Outcome::Transaction(t)) => Ok(t.balance_after.as_ref().map_or(-1, |m| m.amount_minor)),
        Some(Outcome::Refused(reason)) => Err(reason.clone()),
        None => Err("no outcome".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_debits_gives_each_the_outcome_it_would_get_alone() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    credit(&mut client, "top-up-a", "ann", money("EUR", 1_000)).await?;
    credit(&mut client, "top-up-b", "ben", money("EUR", 100)).await?;
    // An earlier single debit, replayed and misused inside the batch.
    client.debit(debit_request("earlier", "ann", money("EUR", 50))).await?;

    let debits = vec![
        debit_request("b-1", "ann", money("EUR", 300)),    // applied: 650 left
        debit_request("b-2", "ben", money("EUR", 150)),    // ben has 100
        debit_request("earlier", "ann", money("EUR", 50)), // a replay of the earlier debit
        debit_request("earlier", "ann", money("EUR", 51)), // the same key, another amount
        debit_request("b-3", "ann", money("EUR", 0)),      // malformed
        debit_request("b-4", "ann", money("EUR", 600)),    // applied after b-1: 50 left
        debit_request("b-5", "ann", money("EUR", 60)),     // no longer covered
        debit_request("b-1", "ann", money("EUR", 300)),    // b-1 again within the batch
    ];
    let results = client.batch_debit(BatchDebitRequest { debits: debits.clone() }).await?.into_inner().results;
    let outcomes: Vec<Result<i64, String>> = results.iter().map(outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            Ok(650),
            Err("INSUFFICIENT_FUNDS".into()),
            Ok(950),
            Err("IDEMPOTENCY_KEY_REUSED".into()),
            Err("INVALID_ARGUMENT".into()),
            Ok(50),
            Err("INSUFFICIENT_FUNDS".into()),
            Ok(650),
        ]
    );
    // The whole batch again: the same answers, and no money moves.
    let again = client.batch_debit(BatchDebitRequest { debits }).await?.into_inner().results;
    assert_eq!(again.iter().map(outcome).collect::<Vec<_>>(), outcomes);
    assert_eq!(balance(&mut client, "ann", "EUR").await?, 50);
    assert_eq!(balance(&mut client, "ben", "EUR").await?, 100);
    // A key refused in a batch stays refused alone, even after a top-up.
    credit(&mut client, "top-up-b2", "ben", money("EUR", 1_000)).await?;
    let alone = client.debit(debit_request("b-2", "ben", money("EUR", 150))).await.unwrap_err();
    assert_eq!(error_reason(&alone).as_deref(), Some("INSUFFICIENT_FUNDS"));

    // An empty batch, and one over the limit, are refused whole.
    for size in [0, 501] {
        let debits = (0..size).map(|i| debit_request(&format!("x-{i}"), "ann", money("EUR", 1))).collect();
        let status = client.batch_debit(BatchDebitRequest { debits }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let totals = audit_ledger(wallet.db.url()).await?;
    let eur = &totals["EUR"];
    assert_eq!(eur.debits, 50 + 300 + 600);
    assert_eq!(eur.credits - eur.debits, eur.balances);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_batches_and_single_debits_move_each_key_once() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    const USERS: usize = 20;
    const KEYS: usize = 400;
    const PRICE: i64 = 7;
    for u in 0..USERS {
        // Enough for 15 of the 20 debits each user is asked for.
        credit(&mut client, &format!("top-up-{u}"), &format!("u{u}"), money("USD", PRICE * 15)).await?;
    }
    let request = |k: usize| debit_request(&format!("k-{k}"), &format!("u{}", k % USERS), money("USD", PRICE));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Eight batches over random, overlapping key ranges, beside single debits of the same keys.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let start = rng.random_range(0..KEYS - 100);
        let mut keys: Vec<usize> = (start..start + 100).collect();
        if rng.random_bool(0.5) {
            keys.reverse();
        }
        let mut client = wallet.client();
        let debits: Vec<DebitRequest> = keys.iter().map(|&k| request(k)).collect();
        calls.push(tokio::spawn(async move {
            let results = client.batch_debit(BatchDebitRequest { debits }).await?.into_inner().results;
            anyhow::Ok(keys.into_iter().zip(results.iter().map(outcome).map(|o| o.is_ok())).collect::<Vec<_>>())
        }));
    }
    for k in (0..KEYS).step_by(3) {
        let mut client = wallet.client();
        let debit = request(k);
        calls.push(tokio::spawn(async move {
            let applied = match client.debit(debit).await {
                Ok(_) => true,
                Err(status) if error_reason(&status).as_deref() == Some("INSUFFICIENT_FUNDS") => false,
                Err(status) => anyhow::bail!("debit k-{k}: {status:?}"),
            };
            Ok(vec![(k, applied)])
        }));
    }
    // Every answer for a key agrees with every other answer for it.
    let mut answers: BTreeMap<usize, bool> = BTreeMap::new();
    for call in futures::future::join_all(calls).await {
        for (k, applied) in call?? {
            if let Some(earlier) = answers.insert(k, applied) {
                assert_eq!(earlier, applied, "key k-{k} answered both ways");
            }
        }
    }
    // Each user paid exactly for the keys that were applied, never below zero.
    let totals = audit_ledger(wallet.db.url()).await?;
    let usd = &totals["USD"];
    let applied = answers.values().filter(|applied| **applied).count() as i128;
    assert_eq!(usd.debits, applied * i128::from(PRICE));
    assert_eq!(usd.credits - usd.debits, usd.balances);
    for u in 0..USERS {
        let paid = answers.iter().filter(|(k, applied)| **applied && *k % USERS == u).count() as i64;
        assert!(paid <= 15, "u{u} paid {paid} debits with money for 15");
        assert_eq!(balance(&mut client, &format!("u{u}"), "USD").await?, PRICE * (15 - paid));
    }
    Ok(())
}
