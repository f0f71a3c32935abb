//! Funds held for orders, against the real wallet and PostgreSQL: a hold takes
//! only what is available and held money cannot be spent twice; every hold
//! ends once (captured, voided or expired), whichever of those races; an order
//! is charged at most once; and the ledger replays balances and held amounts
//! exactly (`audit_ledger`).

use std::time::Duration;

use flashsale_integration_tests::{TestWallet, error_reason, wallet::audit_ledger};
use flashsale_proto::common::v1::Money;
use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use flashsale_proto::wallet::v1::{
    CaptureRequest, CreditRequest, DebitRequest, GetBalanceRequest, HoldRequest, HoldState, VoidRequest,
};
use tonic::Code;
use tonic::transport::Channel;

const USD: &str = "USD";

fn usd(amount_minor: i64) -> Option<Money> {
    Some(Money { currency: USD.into(), amount_minor })
}

async fn top_up(client: &mut WalletServiceClient<Channel>, user: &str, amount: i64) -> anyhow::Result<()> {
    let request = CreditRequest {
        idempotency_key: format!("top-up-{user}-{amount}"),
        user_id: user.into(),
        amount: usd(amount),
        reference: String::new(),
    };
    client.credit(request).await?;
    Ok(())
}

fn hold(order: &str, user: &str, amount: i64, ttl_seconds: u32) -> HoldRequest {
    HoldRequest {
        order_id: order.into(),
        user_id: user.into(),
        amount: usd(amount),
        ttl_seconds,
        reference: String::new(),
    }
}

fn capture(order: &str, user: &str, amount: i64) -> CaptureRequest {
    CaptureRequest { order_id: order.into(), user_id: user.into(), amount: usd(amount) }
}

fn void(order: &str, user: &str, amount: i64) -> VoidRequest {
    VoidRequest { order_id: order.into(), user_id: user.into(), amount: usd(amount) }
}

/// (balance, held) of `user` in USD.
async fn balance(client: &mut WalletServiceClient<Channel>, user: &str) -> anyhow::Result<(i64, i64)> {
    let reply =
        client.get_balance(GetBalanceRequest { user_id: user.into(), currency: USD.into() }).await?.into_inner();
    let first = |money: &[Money]| money.first().map(|m| m.amount_minor);
    Ok((first(&reply.balances).unwrap_or(-1), first(&reply.held).unwrap_or(-1)))
}

fn reason(status: &tonic::Status) -> String {
    error_reason(status).unwrap_or_else(|| format!("{:?}", status.code()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_holds_take_only_what_is_available_and_held_money_is_not_spent_twice() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    top_up(&mut client, "alice", 10_000).await?;

    // 30 holds of 1,000 on a balance of 10,000, all at once: exactly 10 hold.
    let attempts = (0..30).map(|i| {
        let mut client = wallet.client();
        tokio::spawn(async move { client.hold(hold(&format!("order-{i}"), "alice", 1_000, 600)).await })
    });
    let (mut held, mut refused) = (Vec::new(), 0);
    for (i, attempt) in futures::future::join_all(attempts).await.into_iter().enumerate() {
        match attempt? {
            Ok(reply) => {
                assert_eq!(reply.into_inner().hold.map(|h| h.state()), Some(HoldState::Open));
                held.push(format!("order-{i}"));
            }
            Err(status) => {
                assert_eq!(reason(&status), "INSUFFICIENT_FUNDS", "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((held.len(), refused), (10, 20));
    assert_eq!(balance(&mut client, "alice").await?, (10_000, 10_000));

    // Held money cannot be debited; what is not held can.
    let debit = |key: &str, amount: i64| DebitRequest {
        idempotency_key: key.into(),
        user_id: "alice".into(),
        amount: usd(amount),
        reference: String::new(),
    };
    let status = client.debit(debit("spend-held", 1)).await.expect_err("all of it is held");
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");

    // Four captured, three voided: 6,000 left, 3,000 of it held.
    for order in &held[..4] {
        client.capture(capture(order, "alice", 1_000)).await?;
    }
    for order in &held[4..7] {
        let reply = client.void(void(order, "alice", 1_000)).await?.into_inner();
        assert_eq!(reply.hold.map(|h| h.state()), Some(HoldState::Voided));
    }
    assert_eq!(balance(&mut client, "alice").await?, (6_000, 3_000));
    client.debit(debit("spend-available", 3_000)).await?;
    let status = client.debit(debit("spend-more", 1)).await.expect_err("the rest is held");
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");
    assert_eq!(balance(&mut client, "alice").await?, (3_000, 3_000));

    let totals = audit_ledger(wallet.db.url()).await?;
    let usd = &totals[USD];
    assert_eq!((usd.credits, usd.debits, usd.balances, usd.held), (10_000, 7_000, 3_000, 3_000));
    wallet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hold_ends_once_and_an_order_is_charged_once() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    top_up(&mut client, "bob", 100_000).await?;

    // The same hold sent 20 times at once holds once.
    let attempts = (0..20).map(|_| {
        let mut client = wallet.client();
        tokio::spawn(async move { client.hold(hold("same", "bob", 2_500, 600)).await })
    });
    for attempt in futures::future::join_all(attempts).await {
        assert_eq!(attempt??.into_inner().hold.map(|h| h.state()), Some(HoldState::Open));
    }
    assert_eq!(balance(&mut client, "bob").await?, (100_000, 2_500));
    let status = client.hold(hold("same", "bob", 2_600, 600)).await.expect_err("another amount");
    assert_eq!(reason(&status), "IDEMPOTENCY_KEY_REUSED");
    let status = client.capture(capture("same", "bob", 2_600)).await.expect_err("another amount");
    assert_eq!(reason(&status), "IDEMPOTENCY_KEY_REUSED");

    // 20 holds, each captured and voided at once, twice over: one winner each,
    // and every repeat answers as the winner left it.
    for i in 0..20 {
        client.hold(hold(&format!("race-{i}"), "bob", 1_000, 600)).await?;
    }
    let races = (0..20).map(|i| {
        let (mut a, mut b, mut c, mut d) = (wallet.client(), wallet.client(), wallet.client(), wallet.client());
        tokio::spawn(async move {
            let order = format!("race-{i}");
            let (c1, v1, c2, v2) = tokio::join!(
                a.capture(capture(&order, "bob", 1_000)),
                b.void(void(&order, "bob", 1_000)),
                c.capture(capture(&order, "bob", 1_000)),
                d.void(void(&order, "bob", 1_000)),
            );
            (
                c1.map(|r| r.into_inner()),
                v1.map(|r| r.into_inner()),
                c2.map(|r| r.into_inner()),
                v2.map(|r| r.into_inner()),
            )
        })
    });
    let mut captured = 0;
    for race in futures::future::join_all(races).await {
        let (c1, v1, c2, v2) = race?;
        match (&c1, &c2) {
            (Ok(first), Ok(second)) => {
                // Captured: both captures answer the one entry, both voids HOLD_CAPTURED.
                assert_eq!(first.transaction, second.transaction);
                for void in [v1, v2] {
                    assert_eq!(reason(&void.expect_err("after a capture")), "HOLD_CAPTURED");
                }
                captured += 1;
            }
            (Err(first), Err(second)) => {
                assert_eq!((reason(first), reason(second)), ("HOLD_VOIDED".into(), "HOLD_VOIDED".into()));
                for void in [v1, v2] {
                    assert_eq!(void?.hold.map(|h| h.state()), Some(HoldState::Voided));
                }
            }
            _ => anyhow::bail!("one capture won and the other lost: {c1:?} {c2:?}"),
        }
    }
    assert_eq!(balance(&mut client, "bob").await?, (100_000 - captured * 1_000, 2_500));

    // A capture uses the order id as the charge's key: a debit of the same
    // order after it is refused, and the order is charged once.
    let captured_entry = client.capture(capture("same", "bob", 2_500)).await?.into_inner().transaction;
    let debit = DebitRequest {
        idempotency_key: "same".into(),
        user_id: "bob".into(),
        amount: usd(2_500),
        reference: String::new(),
    };
    let status = client.debit(debit).await.expect_err("the order was captured");
    assert_eq!(reason(&status), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(client.capture(capture("same", "bob", 2_500)).await?.into_inner().transaction, captured_entry);

    // A void that arrives before its hold (the caller gave up waiting for the
    // Hold's answer) leaves the late hold holding nothing.
    client.void(void("late", "bob", 1_000)).await?;
    let status = client.hold(hold("late", "bob", 1_000, 600)).await.expect_err("voided first");
    assert_eq!(reason(&status), "HOLD_VOIDED");
    let status = client.capture(capture("late", "bob", 1_000)).await.expect_err("voided first");
    assert_eq!(reason(&status), "HOLD_VOIDED");
    let status = client.capture(capture("never-held", "bob", 1_000)).await.expect_err("no hold");
    assert_eq!((status.code(), reason(&status)), (Code::NotFound, "HOLD_NOT_FOUND".into()));

    let totals = audit_ledger(wallet.db.url()).await?;
    let usd = &totals[USD];
    assert_eq!(usd.credits - usd.debits, usd.balances);
    assert_eq!(usd.held, 0);
    wallet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_holds_are_released_and_a_capture_racing_the_expiry_has_one_winner() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    top_up(&mut client, "carol", 100_000).await?;

    // 40 holds of one second; each is captured when about that second is up,
    // in a crowd, while the sweeper (every 200 ms here) releases expired ones.
    let mut made = Vec::new();
    for i in 0..40 {
        client.hold(hold(&format!("expiring-{i}"), "carol", 1_000, 1)).await?;
        made.push(tokio::time::Instant::now());
    }
    // Two more nobody captures: the sweeper must release them.
    for i in 0..2 {
        client.hold(hold(&format!("forgotten-{i}"), "carol", 500, 1)).await?;
    }
    // Not a wait for anything: each capture is aimed at its hold's expiry,
    // from 0.8 s to 1.25 s after it was made, so that some land before it and
    // some after (the assertions hold either way).
    let captures = made.into_iter().enumerate().map(|(i, made)| {
        let mut client = wallet.client();
        tokio::spawn(async move {
            tokio::time::sleep_until(made + Duration::from_millis(800 + 50 * (i as u64 % 10))).await;
            client.capture(capture(&format!("expiring-{i}"), "carol", 1_000)).await
        })
    });
    let (mut captured, mut expired) = (0, 0);
    for attempt in futures::future::join_all(captures).await {
        match attempt? {
            Ok(_) => captured += 1,
            Err(status) => {
                assert_eq!(reason(&status), "HOLD_EXPIRED", "{status:?}");
                expired += 1;
            }
        }
    }
    assert_eq!(captured + expired, 40);

    // The forgotten holds are released by the sweeper alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while balance(&mut client, "carol").await?.1 != 0 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "expired holds still held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each hold ended one way: what was captured was charged, nothing else.
    assert_eq!(balance(&mut client, "carol").await?, (100_000 - captured * 1_000, 0));
    for i in 0..40 {
        let order = format!("expiring-{i}");
        let second = client.capture(capture(&order, "carol", 1_000)).await;
        let third = client.void(void(&order, "carol", 1_000)).await;
        match second {
            Ok(_) => assert_eq!(reason(&third.expect_err("captured")), "HOLD_CAPTURED"),
            Err(status) => {
                assert_eq!(reason(&status), "HOLD_EXPIRED");
                assert_eq!(third?.into_inner().hold.map(|h| h.state()), Some(HoldState::Expired));
            }
        }
    }
    eprintln!("holds: of 40 captures racing their expiry, {captured} captured, {expired} found it expired");
    let totals = audit_ledger(wallet.db.url()).await?;
    let usd = &totals[USD];
    assert_eq!((usd.debits, usd.held), (i128::from(captured) * 1_000, 0));
    wallet.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_holds_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    top_up(&mut client, "dave", 5_000).await?;
    for (request, field) in [
        (hold("o", "dave", 1_000, 0), "ttl_seconds"),
        (hold("o", "dave", 1_000, 86_401), "ttl_seconds"),
        (hold("", "dave", 1_000, 60), "order_id"),
        (hold("o", "dave", 0, 60), "amount"),
        (HoldRequest { amount: None, ..hold("o", "dave", 1, 60) }, "amount"),
    ] {
        let status = client.hold(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
    }
    assert_eq!(balance(&mut client, "dave").await?, (5_000, 0));
    // Nobody without an account, or without enough, gets a hold.
    let status = client.hold(hold("o", "nobody", 1, 60)).await.expect_err("no account");
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");
    // A refusal records nothing: the same order may hold once the money is there.
    let status = client.hold(hold("later", "dave", 6_000, 60)).await.expect_err("not enough");
    assert_eq!(reason(&status), "INSUFFICIENT_FUNDS");
    top_up(&mut client, "dave", 1_000).await?;
    client.hold(hold("later", "dave", 6_000, 60)).await?;
    assert_eq!(balance(&mut client, "dave").await?, (6_000, 6_000));
    audit_ledger(wallet.db.url()).await?;
    wallet.shutdown().await
}

/// Settling an order by debit (inventory's `Debit` and `BatchDebit`, keyed by
/// the order id) charges its held funds: the debit captures the order's open
/// hold of the same user and amount, so the money the hold kept aside pays for
/// the order, and the hold ends with its charge. Without it, the batch below
/// would need 5,500 available of the 4,000 left beside the holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_of_a_held_order_captures_its_hold() -> anyhow::Result<()> {
    use flashsale_proto::wallet::v1::debit_result::Outcome;
    use flashsale_proto::wallet::v1::{BatchDebitRequest, TransactionKind};

    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    top_up(&mut client, "erin", 10_000).await?;
    for (order, amount) in [("order-a", 1_000), ("order-b", 2_000), ("order-c", 3_000)] {
        client.hold(hold(order, "erin", amount, 600)).await?;
    }
    assert_eq!(balance(&mut client, "erin").await?, (10_000, 6_000));
    let debit = |key: &str, amount: i64| DebitRequest {
        idempotency_key: key.into(),
        user_id: "erin".into(),
        amount: usd(amount),
        reference: format!("order {key}"),
    };

    let single = client.debit(debit("order-a", 1_000)).await?.into_inner().transaction;
    assert_eq!(single.as_ref().map(|t| t.kind()), Some(TransactionKind::Capture));
    assert_eq!(balance(&mut client, "erin").await?, (9_000, 5_000));
    let batch =
        BatchDebitRequest { debits: vec![debit("order-b", 2_000), debit("order-c", 3_000), debit("plain-d", 500)] };
    let results = client.batch_debit(batch).await?.into_inner().results;
    let kinds: Vec<_> = results
        .iter()
        .map(|r| match &r.outcome {
            Some(Outcome::Transaction(t)) => Ok(t.kind()),
            other => Err(format!("{other:?}")),
        })
        .collect();
    assert_eq!(kinds, [Ok(TransactionKind::Capture), Ok(TransactionKind::Capture), Ok(TransactionKind::Debit)]);
    assert_eq!(balance(&mut client, "erin").await?, (3_500, 0));

    // Charged once: the debit's repeat answers the same entry, the hold is captured.
    assert_eq!(client.debit(debit("order-a", 1_000)).await?.into_inner().transaction, single);
    let status = client.void(void("order-b", "erin", 2_000)).await.expect_err("captured by the batch");
    assert_eq!(reason(&status), "HOLD_CAPTURED");
    assert_eq!(balance(&mut client, "erin").await?, (3_500, 0));

    let totals = audit_ledger(wallet.db.url()).await?;
    let usd = &totals[USD];
    assert_eq!((usd.credits, usd.debits, usd.balances, usd.held), (10_000, 6_500, 3_500, 0));
    wallet.shutdown().await
}

/// An order paid (or refused) by a debit before its hold arrives holds
/// nothing: a copy of the order published before the hold (a retry's, the
/// reconciler's) was settled first, and the late hold must not keep money no
/// payment will take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_arrives_after_its_order_was_debited_holds_nothing() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut client = wallet.client();
    top_up(&mut client, "dana", 1_000).await?;
    let debit = |key: &str, amount: i64| DebitRequest {
        idempotency_key: key.into(),
        user_id: "dana".into(),
        amount: usd(amount),
        reference: String::new(),
    };
    client.debit(debit("order-paid", 300)).await?;
    let status = client.hold(hold("order-paid", "dana", 300, 600)).await.expect_err("paid already");
    assert_eq!((status.code(), reason(&status)), (Code::FailedPrecondition, "HOLD_CAPTURED".to_owned()));
    // A debit refused for funds decided the order too.
    client.debit(debit("order-refused", 5_000)).await.expect_err("too much");
    let status = client.hold(hold("order-refused", "dana", 300, 600)).await.expect_err("refused already");
    assert_eq!((status.code(), reason(&status)), (Code::FailedPrecondition, "HOLD_VOIDED".to_owned()));
    assert_eq!(balance(&mut client, "dana").await?, (700, 0), "nothing held");
    audit_ledger(wallet.db.url()).await?;
    wallet.shutdown().await
}
