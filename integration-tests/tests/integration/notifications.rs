//! Telling buyers the outcome without polling, and refunds.

use std::time::Duration;

use flashsale_integration_tests::TestSuite;
use flashsale_proto::common::v1::OrderStatus;
use flashsale_proto::gateway::v1::{
    GetBalanceRequest, GetItemRequest, ListOrdersRequest, PurchaseRequest, RefundOrderRequest, WatchOrderRequest,
};
use tokio_stream::StreamExt;

use crate::common::{create_item, final_order, top_up};

fn buy(item: &str) -> PurchaseRequest {
    PurchaseRequest { item_id: item.into(), quantity: 1, idempotency_key: String::new() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_order_streams_pending_then_the_final_state_and_ends() -> anyhow::Result<()> {
    let suite = TestSuite::spawn().await?;
    create_item(&suite, "vase", 800, 3, 1).await?;
    top_up(&suite, "alice", 1_000).await?;
    // Hold the order in PENDING until the watcher is attached.
    suite.pause_payments();
    let order = suite.buyers().purchase(suite.as_user("alice", buy("vase"))).await?.into_inner();
    let mut stream = suite
        .buyers()
        .watch_order(suite.as_user("alice", WatchOrderRequest { order_id: order.order_id.clone() }))
        .await?
        .into_inner();
    let first = stream.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
    assert_eq!(first.order.as_ref().map(|o| o.status()), Some(OrderStatus::Pending));

    suite.resume_payments();
    let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("stream ended before the final state"))??;
    assert_eq!(next.order.as_ref().map(|o| o.status()), Some(OrderStatus::Confirmed));
    assert!(stream.next().await.is_none(), "the stream ends after the final state");
    suite.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_credits_the_buyer_and_puts_the_unit_back_on_sale() -> anyhow::Result<()> {
    let suite = TestSuite::spawn().await?;
    create_item(&suite, "kite", 600, 1, 1).await?;
    top_up(&suite, "bob", 1_000).await?;
    top_up(&suite, "carl", 1_000).await?;
    let order = suite.buyers().purchase(suite.as_user("bob", buy("kite"))).await?.into_inner();
    assert_eq!(
        final_order(&suite, "bob", &order.order_id, Duration::from_secs(20)).await?.status(),
        OrderStatus::Confirmed
    );

    // Only the buyer may refund it.
    let status = suite
        .buyers()
        .refund_order(suite.as_user("carl", RefundOrderRequest { order_id: order.order_id.clone() }))
        .await
        .expect_err("not carl's order");
    assert_eq!(status.code(), tonic::Code::NotFound);

    let refunded = suite
        .buyers()
        .refund_order(suite.as_user("bob", RefundOrderRequest { order_id: order.order_id.clone() }))
        .await?
        .into_inner();
    assert_eq!(refunded.order.map(|o| o.status()), Some(OrderStatus::Refunded));
    // A second refund changes nothing.
    suite.buyers().refund_order(suite.as_user("bob", RefundOrderRequest { order_id: order.order_id.clone() })).await?;
    let balance =
        suite.buyers().get_balance(suite.as_user("bob", GetBalanceRequest { currency: "USD".into() })).await?;
    assert_eq!(balance.into_inner().balances[0].amount_minor, 1_000);
    let item = suite.buyers().get_item(suite.as_user("bob", GetItemRequest { item_id: "kite".into() })).await?;
    assert_eq!(item.into_inner().item.map(|i| i.stock_remaining), Some(1));
    let history = suite.buyers().list_orders(suite.as_user("bob", ListOrdersRequest::default())).await?.into_inner();
    assert_eq!(history.orders.len(), 1);
    assert_eq!(history.orders[0].status(), OrderStatus::Refunded);

    // The unit sells again (to carl; SOLD_OUT until the release reaches Redis).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let again = loop {
        match suite.buyers().purchase(suite.as_user("carl", buy("kite"))).await {
            Ok(reply) => break reply.into_inner(),
            Err(status)
                if tokio::time::Instant::now() < deadline && status.code() == tonic::Code::FailedPrecondition =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => anyhow::bail!("carl could not buy the returned unit: {status:?}"),
        }
    };
    assert_eq!(
        final_order(&suite, "carl", &again.order_id, Duration::from_secs(20)).await?.status(),
        OrderStatus::Confirmed
    );
    // And bob, whose count went back to zero, may buy within the limit again (none left now).
    let status = suite.buyers().purchase(suite.as_user("bob", buy("kite"))).await.expect_err("sold out");
    assert_eq!(flashsale_integration_tests::error_reason(&status).as_deref(), Some("SOLD_OUT"));
    suite.shutdown().await
}
