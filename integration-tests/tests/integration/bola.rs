//! Object-level authorization, door by door (OWASP API1 and API5): every
//! gateway RPC and REST route × (the owner of an order, another buyer, an
//! admin, no token) gets the answer proto/README.md's table ("Who may call what") documents, and where
//! the call is refused nothing changes: the order stays as it was, no balance
//! moves, no item appears. A buyer's reads, watches and refunds are scoped to
//! the token's subject; admin operations are the admin's alone.

use std::time::Duration;

use flashsale_integration_tests::TestSuite;
use flashsale_integration_tests::suite::with_token;
use flashsale_proto::common::v1::{Money, OrderStatus};
use flashsale_proto::gateway::v1::{
    CreateItemRequest, GetBalanceRequest, GetItemRequest, GetItemStatsRequest, GetOrderRequest, ListItemsRequest,
    ListOrdersRequest, PurchaseRequest, RefundOrderRequest, TopUpRequest, WatchOrderRequest,
};
use serde_json::json;
use tonic::Code;

use crate::common::{at, create_item, final_order, top_up, usd};

const ITEM: &str = "bola-item";
const OWNER: &str = "owner";
const OTHER: &str = "other";
const OWNER_FUNDS: i64 = 1_000;
const OTHER_FUNDS: i64 = 700;
const PRICE: i64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Owner,
    Other,
    Admin,
    Nobody,
}

const EVERYONE: [Who; 4] = [Who::Owner, Who::Other, Who::Admin, Who::Nobody];

impl Who {
    fn token(self, suite: &TestSuite) -> Option<String> {
        match self {
            Self::Owner => Some(suite.token(OWNER, false)),
            Self::Other => Some(suite.token(OTHER, false)),
            Self::Admin => Some(suite.token("operator", true)),
            Self::Nobody => None,
        }
    }
}

/// A gRPC request with the caller's token, if any.
fn as_caller<T>(suite: &TestSuite, who: Who, message: T) -> tonic::Request<T> {
    match who.token(suite) {
        Some(token) => with_token(message, &token),
        None => tonic::Request::new(message),
    }
}

fn code<T>(result: Result<T, tonic::Status>) -> Result<T, Code> {
    result.map_err(|status| status.code())
}

/// A REST call as `who`: the HTTP status and the JSON body.
async fn rest(
    suite: &TestSuite,
    who: Who,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", suite.http_url()));
    if let Some(token) = who.token(suite) {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))))
}

async fn balance(suite: &TestSuite, user: &str) -> anyhow::Result<i64> {
    let reply = suite.buyers().get_balance(suite.as_user(user, GetBalanceRequest { currency: "USD".into() })).await?;
    Ok(reply.into_inner().balances.iter().map(|b| b.amount_minor).sum())
}

async fn order_status(suite: &TestSuite, order_id: &str) -> anyhow::Result<OrderStatus> {
    let request = suite.as_user(OWNER, GetOrderRequest { order_id: order_id.into() });
    let order = suite.buyers().get_order(request).await?.into_inner().order;
    Ok(order.map_or(OrderStatus::Unspecified, |o| o.status()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_owner_other_buyer_admin_and_no_token_as_documented() -> anyhow::Result<()> {
    let suite = TestSuite::spawn().await?;
    create_item(&suite, ITEM, PRICE, 10, 1).await?;
    top_up(&suite, OWNER, OWNER_FUNDS).await?;
    top_up(&suite, OTHER, OTHER_FUNDS).await?;
    let request = PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: "owner-1".into() };
    let order_id = suite.buyers().purchase(suite.as_user(OWNER, request)).await?.into_inner().order_id;
    final_order(&suite, OWNER, &order_id, Duration::from_secs(30)).await?;
    let owner_after_purchase = balance(&suite, OWNER).await?;
    let order_path = format!("/v1/orders/{order_id}");
    use reqwest::Method;

    // Public reads: any signed-in caller; no token, UNAUTHENTICATED / 401.
    for who in EVERYONE {
        let signed_in = who != Who::Nobody;
        let listed = code(suite.buyers().list_items(as_caller(&suite, who, ListItemsRequest::default())).await);
        assert_eq!(listed.is_ok(), signed_in, "ListItems as {who:?}: {listed:?}");
        let item = code(suite.buyers().get_item(as_caller(&suite, who, GetItemRequest { item_id: ITEM.into() })).await);
        assert_eq!(item.is_ok(), signed_in, "GetItem as {who:?}: {item:?}");
        for path in ["/v1/items".to_owned(), format!("/v1/items/{ITEM}")] {
            let (status, _) = rest(&suite, who, Method::GET, &path, None).await?;
            assert_eq!(status, if signed_in { 200 } else { 401 }, "GET {path} as {who:?}");
        }
    }
    let purchase = PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: "anon".into() };
    let anonymous = code(suite.buyers().purchase(as_caller(&suite, Who::Nobody, purchase)).await);
    assert_eq!(anonymous.err(), Some(Code::Unauthenticated));
    let (status, _) =
        rest(&suite, Who::Nobody, Method::POST, "/v1/purchases", Some(json!({"item_id": ITEM, "quantity": 1}))).await?;
    assert_eq!(status, 401, "POST /v1/purchases without a token");

    // The order: its owner and admins see and watch it; another buyer is told
    // it does not exist (ORDER_NOT_FOUND, not FORBIDDEN: no hint that it does).
    for who in EVERYONE {
        let expected: Result<(), Code> = match who {
            Who::Owner | Who::Admin => Ok(()),
            Who::Other => Err(Code::NotFound),
            Who::Nobody => Err(Code::Unauthenticated),
        };
        let got = code(
            suite.buyers().get_order(as_caller(&suite, who, GetOrderRequest { order_id: order_id.clone() })).await,
        );
        assert_eq!(got.map(|_| ()), expected, "GetOrder as {who:?}");
        let watched = match suite
            .buyers()
            .watch_order(as_caller(&suite, who, WatchOrderRequest { order_id: order_id.clone() }))
            .await
        {
            Ok(stream) => {
                code(stream.into_inner().message().await).map(|first| assert!(first.is_some(), "empty watch"))
            }
            Err(status) => Err(status.code()),
        };
        assert_eq!(watched, expected, "WatchOrder as {who:?}");
        let http = match expected {
            Ok(()) => 200,
            Err(Code::NotFound) => 404,
            Err(_) => 401,
        };
        let (status, body) = rest(&suite, who, Method::GET, &order_path, None).await?;
        assert_eq!(status, http, "GET {order_path} as {who:?}: {body}");
        if who == Who::Other {
            assert_eq!(body["error"]["code"], "ORDER_NOT_FOUND", "{body}");
        }
        let events = reqwest::Client::new().get(format!("{}{order_path}/events", suite.http_url()));
        let events = match who.token(&suite) {
            Some(token) => events.bearer_auth(token),
            None => events,
        };
        assert_eq!(events.send().await?.status().as_u16(), http, "GET {order_path}/events as {who:?}");
    }

    // Lists and balances are the caller's own, whoever asks.
    for who in EVERYONE {
        let listed = code(suite.buyers().list_orders(as_caller(&suite, who, ListOrdersRequest::default())).await);
        let (status, body) = rest(&suite, who, Method::GET, "/v1/orders", None).await?;
        let balances = code(
            suite.buyers().get_balance(as_caller(&suite, who, GetBalanceRequest { currency: "USD".into() })).await,
        );
        let (wallet_status, wallet) = rest(&suite, who, Method::GET, "/v1/wallet", None).await?;
        if who == Who::Nobody {
            assert_eq!(listed.err(), Some(Code::Unauthenticated));
            assert_eq!((status, wallet_status), (401, 401));
            assert_eq!(balances.err(), Some(Code::Unauthenticated));
            continue;
        }
        let holds = listed
            .map_err(|c| anyhow::anyhow!("ListOrders as {who:?}: {c:?}"))?
            .into_inner()
            .orders
            .iter()
            .any(|o| o.id == order_id);
        assert_eq!(holds, who == Who::Owner, "ListOrders as {who:?} lists the owner's order: {holds}");
        let rest_holds =
            body["orders"].as_array().is_some_and(|orders| orders.iter().any(|o| o["id"] == order_id.as_str()));
        assert_eq!((status, rest_holds), (200, who == Who::Owner), "GET /v1/orders as {who:?}: {body}");
        let amount: i64 = balances
            .map_err(|c| anyhow::anyhow!("GetBalance as {who:?}: {c:?}"))?
            .into_inner()
            .balances
            .iter()
            .map(|b| b.amount_minor)
            .sum();
        let own = match who {
            Who::Owner => owner_after_purchase,
            Who::Other => OTHER_FUNDS,
            _ => 0,
        };
        assert_eq!(amount, own, "GetBalance as {who:?} is not the caller's own");
        let rest_amount: i64 =
            wallet["balances"].as_array().map_or(0, |b| b.iter().filter_map(|m| m["amount_minor"].as_i64()).sum());
        assert_eq!((wallet_status, rest_amount), (200, own), "GET /v1/wallet as {who:?}: {wallet}");
    }

    // A refund: only the owner's goes through; the others change nothing.
    let refund_path = format!("{order_path}/refund");
    for who in [Who::Other, Who::Admin, Who::Nobody] {
        let refused = code(
            suite
                .buyers()
                .refund_order(as_caller(&suite, who, RefundOrderRequest { order_id: order_id.clone() }))
                .await,
        );
        let expected = if who == Who::Nobody { Code::Unauthenticated } else { Code::NotFound };
        assert_eq!(refused.err(), Some(expected), "RefundOrder as {who:?}");
        let (status, body) = rest(&suite, who, Method::POST, &refund_path, None).await?;
        assert_eq!(status, if who == Who::Nobody { 401 } else { 404 }, "POST {refund_path} as {who:?}: {body}");
    }
    assert_eq!(order_status(&suite, &order_id).await?, OrderStatus::Confirmed, "a refused refund changed the order");
    assert_eq!(balance(&suite, OWNER).await?, owner_after_purchase, "a refused refund moved money");
    let (status, body) = rest(&suite, Who::Owner, Method::POST, &refund_path, None).await?;
    assert_eq!((status, body["status"].as_str()), (200, Some("REFUNDED")), "the owner's refund: {body}");
    assert_eq!(balance(&suite, OWNER).await?, owner_after_purchase + PRICE);

    // Admin operations: FORBIDDEN to buyers (before the body is read), and nothing made.
    for who in EVERYONE {
        let expected = match who {
            Who::Admin => Ok(()),
            Who::Nobody => Err(Code::Unauthenticated),
            Who::Owner | Who::Other => Err(Code::PermissionDenied),
        };
        let http = |ok: u16| match expected {
            Ok(()) => ok,
            Err(Code::Unauthenticated) => 401,
            Err(_) => 403,
        };
        let item = format!("made-by-{who:?}").to_lowercase();
        let create = CreateItemRequest {
            id: item.clone(),
            name: "x".into(),
            price: usd(PRICE),
            stock_total: 1,
            per_user_limit: 1,
            starts_at: at(Duration::from_secs(1), false),
            ends_at: at(Duration::from_secs(3600), true),
            admission_buckets: 0,
        };
        assert_eq!(
            code(suite.admin().create_item(as_caller(&suite, who, create)).await).map(|_| ()),
            expected,
            "CreateItem as {who:?}"
        );
        let body = json!({
            "id": format!("{item}-rest"), "name": "x", "price": {"currency": "USD", "amount_minor": PRICE},
            "stock_total": 1, "per_user_limit": 1,
            "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z",
        });
        let (status, reply) = rest(&suite, who, Method::POST, "/v1/admin/items", Some(body)).await?;
        assert_eq!(status, http(201), "POST /v1/admin/items as {who:?}: {reply}");
        for id in [item.clone(), format!("{item}-rest")] {
            let exists =
                code(suite.buyers().get_item(suite.as_user(OTHER, GetItemRequest { item_id: id.clone() })).await)
                    .is_ok();
            assert_eq!(exists, expected.is_ok(), "item {id} exists: {exists}");
        }

        let before = balance(&suite, OTHER).await?;
        let credit = TopUpRequest {
            user_id: OTHER.into(),
            amount: Some(Money { currency: "USD".into(), amount_minor: 5 }),
            idempotency_key: format!("bola-{who:?}"),
        };
        assert_eq!(
            code(suite.admin().top_up(as_caller(&suite, who, credit)).await).map(|_| ()),
            expected,
            "TopUp as {who:?}"
        );
        let body =
            json!({"amount": {"currency": "USD", "amount_minor": 5}, "idempotency_key": format!("bola-rest-{who:?}")});
        let (status, reply) =
            rest(&suite, who, Method::POST, &format!("/v1/admin/users/{OTHER}/top-up"), Some(body)).await?;
        assert_eq!(status, http(200), "POST top-up as {who:?}: {reply}");
        let credited = if expected.is_ok() { 10 } else { 0 };
        assert_eq!(balance(&suite, OTHER).await?, before + credited, "top-ups as {who:?} moved the wrong amount");

        let stats = code(
            suite.admin().get_item_stats(as_caller(&suite, who, GetItemStatsRequest { item_id: ITEM.into() })).await,
        );
        assert_eq!(stats.map(|_| ()), expected, "GetItemStats as {who:?}");
        let (status, reply) = rest(&suite, who, Method::GET, &format!("/v1/admin/items/{ITEM}/stats"), None).await?;
        assert_eq!(status, http(200), "GET stats as {who:?}: {reply}");
    }
    suite.shutdown().await
}
