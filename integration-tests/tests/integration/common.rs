//! Helpers shared by the purchase-path tests.

use std::time::Duration;

use flashsale_integration_tests::TestSuite;
use flashsale_proto::common::v1::{Item, Money, Order, OrderStatus};
use flashsale_proto::gateway::v1::{CreateItemRequest, GetOrderRequest, TopUpRequest};

pub(crate) fn usd(amount_minor: i64) -> Option<Money> {
    Some(Money { currency: "USD".into(), amount_minor })
}

pub(crate) fn at(offset: Duration, future: bool) -> Option<prost_types::Timestamp> {
    let now = std::time::SystemTime::now();
    let t = if future { now + offset } else { now - offset };
    Some(prost_types::Timestamp::from(t))
}

/// Creates an item on sale now (for an hour) through the admin API.
pub(crate) async fn create_item(
    suite: &TestSuite,
    id: &str,
    price: i64,
    stock: u32,
    limit: u32,
) -> anyhow::Result<Item> {
    create_item_between(
        suite,
        id,
        price,
        stock,
        limit,
        at(Duration::from_secs(1), false),
        at(Duration::from_secs(3600), true),
    )
    .await
}

pub(crate) async fn create_item_between(
    suite: &TestSuite,
    id: &str,
    price: i64,
    stock: u32,
    limit: u32,
    starts_at: Option<prost_types::Timestamp>,
    ends_at: Option<prost_types::Timestamp>,
) -> anyhow::Result<Item> {
    create_bucketed_item_between(suite, id, price, stock, limit, 1, starts_at, ends_at).await
}

/// As [`create_item_between`], with the item's admission spread over `buckets` stock buckets.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn create_bucketed_item_between(
    suite: &TestSuite,
    id: &str,
    price: i64,
    stock: u32,
    limit: u32,
    buckets: u32,
    starts_at: Option<prost_types::Timestamp>,
    ends_at: Option<prost_types::Timestamp>,
) -> anyhow::Result<Item> {
    let reply = suite
        .admin()
        .create_item(suite.as_admin(CreateItemRequest {
            id: id.into(),
            name: format!("item {id}"),
            price: usd(price),
            stock_total: stock,
            per_user_limit: limit,
            starts_at,
            ends_at,
            admission_buckets: buckets,
        }))
        .await?
        .into_inner();
    reply.item.ok_or_else(|| anyhow::anyhow!("no item in reply"))
}

pub(crate) async fn top_up(suite: &TestSuite, user: &str, amount: i64) -> anyhow::Result<()> {
    suite
        .admin()
        .top_up(suite.as_admin(TopUpRequest {
            user_id: user.into(),
            amount: usd(amount),
            idempotency_key: String::new(),
        }))
        .await?;
    Ok(())
}

/// Polls GetOrder until the order is final.
pub(crate) async fn final_order(
    suite: &TestSuite,
    user: &str,
    order_id: &str,
    timeout: Duration,
) -> anyhow::Result<Order> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let order = suite
            .buyers()
            .get_order(suite.as_user(user, GetOrderRequest { order_id: order_id.into() }))
            .await?
            .into_inner()
            .order
            .ok_or_else(|| anyhow::anyhow!("no order"))?;
        if order.status() != OrderStatus::Pending {
            return Ok(order);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "order {order_id} still pending after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A token of the test suites' development secret, for calls to real binaries.
pub(crate) fn token(user: &str, admin: bool) -> String {
    let secret = flashsale_integration_tests::suite::JWT_SECRET;
    flashsale_gateway::auth::mint(secret, user, admin, Duration::from_secs(3600)).unwrap_or_default()
}

/// On the real binaries: an item `id` on sale now (for an hour), `stock` units
/// at 9.00 USD, limit 1, one bucket; and `buyer` funded with 10.00 USD.
pub(crate) async fn binary_sale(
    suite: &flashsale_integration_tests::binaries::BinarySuite,
    id: &str,
    stock: u32,
    buyer: &str,
) -> anyhow::Result<()> {
    use flashsale_integration_tests::suite::with_token;
    let admin = token("operator", true);
    let item = CreateItemRequest {
        id: id.into(),
        name: id.into(),
        price: usd(900),
        stock_total: stock,
        per_user_limit: 1,
        starts_at: at(Duration::from_secs(1), false),
        ends_at: at(Duration::from_secs(3600), true),
        admission_buckets: 1,
    };
    suite.admin().create_item(with_token(item, &admin)).await?;
    let funds = TopUpRequest { user_id: buyer.into(), amount: usd(1_000), idempotency_key: format!("seed-{buyer}") };
    suite.admin().top_up(with_token(funds, &admin)).await?;
    Ok(())
}
