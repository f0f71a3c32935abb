//! The wallet against real PostgreSQL: concurrency, idempotency, conservation, bad input.

use std::collections::BTreeMap;

use flashsale_integration_tests::{TestWallet, error_reason, wallet::audit_ledger};
use flashsale_proto::common::v1::Money;
use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use flashsale_proto::wallet::v1::{
    CreditRequest, DebitRequest, GetBalanceRequest, ListTransactionsRequest, TransactionKind,
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
