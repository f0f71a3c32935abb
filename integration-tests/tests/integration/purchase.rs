//! The purchase path through the real services: each case of the seed, with its reason code.

use std::time::Duration;

use flashsale_integration_tests::{TestSuite, error_reason};
use flashsale_proto::common::v1::OrderStatus;
use flashsale_proto::gateway::v1::{GetBalanceRequest, PurchaseRequest};
use tonic::Code;

use crate::common::{create_item, final_order, top_up};

fn buy(item: &str, quantity: u32) -> PurchaseRequest {
    PurchaseRequest { item_id: item.into(), quantity, idempotency_key: String::new() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_is_pending_then_confirmed_and_debits_exactly() -> anyhow::Result<()> {
    let suite = TestSuite::spawn().await?;
    create_item(&suite, "lamp", 1_250, 5, 2).await?;
    top_up(&suite, "alice", 10_000).await?;

    let reply = suite.buyers().purchase(suite.as_user("alice", buy("lamp", 2))).await?.into_inner();
    assert_eq!(reply.status(), OrderStatus::Pending);
    let order = final_order(&suite, "alice", &reply.order_id, Duration::from_secs(20)).await?;
    assert_eq!(order.status(), OrderStatus::Confirmed);
    assert_eq!(order.amount.as_ref().map(|m| m.amount_minor), Some(2_500));
    let balance =
        suite.buyers().get_balance(suite.as_user("alice", GetBalanceRequest { currency: "USD".into() })).await?;
    assert_eq!(balance.into_inner().balances[0].amount_minor, 10_000 - 2_500);
    suite.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_item_is_item_not_found() -> anyhow::Result<()> {
    let suite = TestSuite::spawn().await?;
    let status = suite.buyers().purchase(suite.as_user("alice", buy("no-such-item", 1))).await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(error_reason(&status).as_deref(), Some("ITEM_NOT_FOUND"));
    suite.shutdown().await
}
