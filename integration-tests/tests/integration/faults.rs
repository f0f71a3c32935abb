//! Faults the purchase path must absorb: duplicate deliveries, a wallet outage,
//! and (in storm.rs) a Redis flush mid-sale.

use std::collections::BTreeSet;
use std::time::Duration;

use flashsale_integration_tests::TestSuite;
use flashsale_integration_tests::audit::{audit, wait_until_settled};
use flashsale_proto::common::v1::{Money, OrderStatus};
use flashsale_proto::gateway::v1::PurchaseRequest;
use flashsale_proto::inventory::v1::OrderPlaced;
use prost::Message;

use crate::common::{create_item, final_order, top_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_placed_twice_makes_one_order_and_one_debit() -> anyhow::Result<()> {
    let suite = TestSuite::spawn().await?;
    create_item(&suite, "dup", 700, 5, 1).await?;
    top_up(&suite, "alice", 5_000).await?;
    let reply = suite
        .buyers()
        .purchase(
            suite.as_user("alice", PurchaseRequest { item_id: "dup".into(), quantity: 1, idempotency_key: "k".into() }),
        )
        .await?
        .into_inner();
    let order = final_order(&suite, "alice", &reply.order_id, Duration::from_secs(20)).await?;
    assert_eq!(order.status(), OrderStatus::Confirmed);

    // The broker delivers the same message again (a redelivery after a lost ack).
    let duplicate = OrderPlaced {
        order_id: reply.order_id.clone(),
        user_id: "alice".into(),
        item_id: "dup".into(),
        quantity: 1,
        amount: Some(Money { currency: "USD".into(), amount_minor: 700 }),
        idempotency_key: "k".into(),
        placed_at: None,
    };
    for _ in 0..2 {
        suite.publish_order_placed(&duplicate.encode_to_vec()).await?;
    }
    // Another buyer's order behind the duplicates; once it settles, they were consumed.
    top_up(&suite, "bob", 5_000).await?;
    let bobs = suite
        .buyers()
        .purchase(
            suite
                .as_user("bob", PurchaseRequest { item_id: "dup".into(), quantity: 1, idempotency_key: String::new() }),
        )
        .await?
        .into_inner();
    final_order(&suite, "bob", &bobs.order_id, Duration::from_secs(20)).await?;
    wait_for_empty_orders_queue(&suite).await?;

    let accepted = BTreeSet::from([reply.order_id.clone(), bobs.order_id]);
    wait_until_settled(&suite.databases(), &accepted, Duration::from_secs(20)).await?;
    let report = audit(&suite.databases()).await?; // one debit per paid order, no extra charge
    let alices: Vec<_> = report.orders.iter().filter(|o| o.user_id == "alice").collect();
    assert_eq!(alices.len(), 1, "one order for alice: {alices:?}");
    assert_eq!(report.confirmed_units.get("dup"), Some(&2));
    suite.shutdown().await
}

async fn wait_for_empty_orders_queue(suite: &TestSuite) -> anyhow::Result<()> {
    use flashsale_messaging::lapin::options::QueueDeclareOptions;
    use flashsale_messaging::lapin::types::FieldTable;
    let addr = std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let connection = flashsale_messaging::connect(&addr, "integration-test-probe").await?;
    let channel = connection.create_channel().await?;
    let queue = flashsale_messaging::Topology::with_prefix(&suite.amqp_prefix).orders_queue;
    for _ in 0..200 {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        if declared.message_count() == 0 {
            let _ = connection.close(200, "done".into()).await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("orders queue never drained")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_taken_while_the_wallet_is_down_are_confirmed_once_it_returns() -> anyhow::Result<()> {
    let mut suite = TestSuite::spawn().await?;
    create_item(&suite, "outage", 250, 20, 1).await?;
    let buyers: Vec<String> = (0..10).map(|n| format!("buyer-{n}")).collect();
    for buyer in &buyers {
        top_up(&suite, buyer, 1_000).await?;
    }
    suite.stop_wallet().await?;
    let mut accepted = BTreeSet::new();
    for buyer in &buyers {
        let reply = suite
            .buyers()
            .purchase(suite.as_user(
                buyer,
                PurchaseRequest { item_id: "outage".into(), quantity: 1, idempotency_key: String::new() },
            ))
            .await?
            .into_inner();
        accepted.insert(reply.order_id);
    }
    // Long enough for the first attempts and a few sweeps to fail.
    tokio::time::sleep(Duration::from_secs(2)).await;
    suite.start_wallet().await?;
    wait_until_settled(&suite.databases(), &accepted, Duration::from_secs(60)).await?;
    let report = audit(&suite.databases()).await?; // each paid exactly once despite the retries
    assert_eq!(report.confirmed_units.get("outage"), Some(&10));
    assert!(report.orders.iter().all(|o| o.status == "CONFIRMED"));
    suite.shutdown().await
}

/// The broker is unreachable for the gateway: the purchase answers UNAVAILABLE,
/// the reservation is given back, and a retry with the same key, once the broker
/// is back, buys the unit exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_publish_confirm_the_reservation_is_released_and_a_retry_is_safe() -> anyhow::Result<()> {
    use flashsale_integration_tests::proxy::FaultProxy;
    use flashsale_integration_tests::suite::{SuiteOptions, amqp_addr};

    let broker: std::net::SocketAddr = "127.0.0.1:5672".parse()?;
    let proxy = FaultProxy::start(broker).await?;
    let proxied = amqp_addr().replace(":5672", &format!(":{}", proxy.port));
    let suite = TestSuite::spawn_with(SuiteOptions {
        gateway_amqp_addr: Some(proxied),
        publish_timeout_ms: Some(1_000),
        ..SuiteOptions::default()
    })
    .await?;
    create_item(&suite, "solo", 900, 1, 1).await?;
    top_up(&suite, "alice", 1_000).await?;
    let request = || PurchaseRequest { item_id: "solo".into(), quantity: 1, idempotency_key: "alice-1".into() };

    proxy.cut();
    // Let the gateway's client notice the closed connection, so the purchase
    // finds no broker (certainly not queued) rather than a dead socket (unknown).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = suite.buyers().purchase(suite.as_user("alice", request())).await.expect_err("broker unreachable");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(flashsale_integration_tests::error_reason(&status).as_deref(), Some("UNAVAILABLE"));

    // The unit is on offer again and alice is not marked in flight.
    let client = redis::Client::open(std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()))?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let prefix = format!("{}:{{solo}}", suite.redis_prefix);
    let (tokens, inflight): (Option<i64>, i64) = redis::pipe()
        .get(format!("{prefix}:tokens"))
        .hlen(format!("{prefix}:inflight"))
        .query_async(&mut redis)
        .await?;
    assert_eq!((tokens, inflight), (Some(1), 0));

    proxy.restore();
    let reply = suite.buyers().purchase(suite.as_user("alice", request())).await?.into_inner();
    let order = final_order(&suite, "alice", &reply.order_id, Duration::from_secs(20)).await?;
    assert_eq!(order.status(), OrderStatus::Confirmed);
    let again = suite.buyers().purchase(suite.as_user("alice", request())).await?.into_inner();
    assert_eq!(again.order_id, reply.order_id, "the same key names the same order");

    wait_until_settled(&suite.databases(), &BTreeSet::from([reply.order_id]), Duration::from_secs(20)).await?;
    let report = audit(&suite.databases()).await?;
    assert_eq!(report.orders.len(), 1);
    assert_eq!(report.confirmed_units.get("solo"), Some(&1));
    suite.shutdown().await
}

/// Redis counts one unit more than PostgreSQL has; a two-unit order is then
/// refused by PostgreSQL (SOLD_OUT) and consumes two tokens, leaving Redis at 0
/// while one unit remains. The gateway resyncs, and the unit still sells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_redis_lost_track_of_is_offered_again() -> anyhow::Result<()> {
    let suite = TestSuite::spawn().await?;
    create_item(&suite, "pair", 100, 3, 3).await?;
    for buyer in ["ann", "ben", "cat"] {
        top_up(&suite, buyer, 1_000).await?;
    }
    let buy = |quantity| PurchaseRequest { item_id: "pair".into(), quantity, idempotency_key: String::new() };
    let first = suite.buyers().purchase(suite.as_user("ann", buy(2))).await?.into_inner();
    assert_eq!(
        final_order(&suite, "ann", &first.order_id, Duration::from_secs(20)).await?.status(),
        OrderStatus::Confirmed
    );

    // Drift: Redis believes two units remain; PostgreSQL has one.
    let client = redis::Client::open(std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()))?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let tokens = format!("{}:{{pair}}:tokens", suite.redis_prefix);
    let _: () = redis::cmd("SET").arg(&tokens).arg(2).query_async(&mut redis).await?;

    let second = suite.buyers().purchase(suite.as_user("ben", buy(2))).await?.into_inner();
    let order = final_order(&suite, "ben", &second.order_id, Duration::from_secs(20)).await?;
    assert_eq!((order.status(), order.reject_reason.as_str()), (OrderStatus::Rejected, "SOLD_OUT"));

    // The last unit sells (SOLD_OUT until the gateway notices and resyncs).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let third = loop {
        match suite.buyers().purchase(suite.as_user("cat", buy(1))).await {
            Ok(reply) => break reply.into_inner(),
            Err(status)
                if flashsale_integration_tests::error_reason(&status).as_deref() == Some("SOLD_OUT")
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => anyhow::bail!("the last unit was not offered: {status:?}"),
        }
    };
    assert_eq!(
        final_order(&suite, "cat", &third.order_id, Duration::from_secs(20)).await?.status(),
        OrderStatus::Confirmed
    );
    let accepted = BTreeSet::from([first.order_id, second.order_id, third.order_id]);
    wait_until_settled(&suite.databases(), &accepted, Duration::from_secs(20)).await?;
    let report = audit(&suite.databases()).await?;
    assert_eq!(report.confirmed_units.get("pair"), Some(&3));
    suite.shutdown().await
}

/// A refund asked for while the wallet is down answers UNAVAILABLE but is not
/// forgotten: once the wallet is back, the sweeper finishes it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_interrupted_by_a_wallet_outage_is_finished_later() -> anyhow::Result<()> {
    use flashsale_proto::gateway::v1::{GetBalanceRequest, GetOrderRequest, RefundOrderRequest};
    let mut suite = TestSuite::spawn().await?;
    create_item(&suite, "lamp2", 400, 2, 1).await?;
    top_up(&suite, "dora", 1_000).await?;
    let reply =
        suite
            .buyers()
            .purchase(suite.as_user(
                "dora",
                PurchaseRequest { item_id: "lamp2".into(), quantity: 1, idempotency_key: String::new() },
            ))
            .await?
            .into_inner();
    assert_eq!(
        final_order(&suite, "dora", &reply.order_id, Duration::from_secs(20)).await?.status(),
        OrderStatus::Confirmed
    );

    suite.stop_wallet().await?;
    let status = suite
        .buyers()
        .refund_order(suite.as_user("dora", RefundOrderRequest { order_id: reply.order_id.clone() }))
        .await
        .expect_err("wallet down");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    suite.start_wallet().await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let order = suite
            .buyers()
            .get_order(suite.as_user("dora", GetOrderRequest { order_id: reply.order_id.clone() }))
            .await?
            .into_inner()
            .order
            .ok_or_else(|| anyhow::anyhow!("no order"))?;
        if order.status() == OrderStatus::Refunded {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "refund never finished: {:?}", order.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let balance =
        suite.buyers().get_balance(suite.as_user("dora", GetBalanceRequest { currency: "USD".into() })).await?;
    assert_eq!(balance.into_inner().balances[0].amount_minor, 1_000);
    wait_until_settled(&suite.databases(), &BTreeSet::from([reply.order_id]), Duration::from_secs(20)).await?;
    let report = audit(&suite.databases()).await?; // one debit, one refund credit
    assert_eq!(report.remaining.get("lamp2"), Some(&2));
    suite.shutdown().await
}
