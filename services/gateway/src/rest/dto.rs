//! The JSON shapes of the REST API. Field names are the proto's (snake_case);
//! enums are their value names without the type prefix (`"PENDING"`, not
//! `"ORDER_STATUS_PENDING"`); timestamps are RFC 3339; money is integer minor
//! units with an ISO 4217 code. Conversions destructure the proto messages fully,
//! so a new proto field fails to compile here until the JSON side decides on it.
//! The patterns and numeric bounds the document publishes for these fields are
//! set by `rules.rs`, from the constants the services check with.

use chrono::{DateTime, Utc};
use flashsale_proto::common::v1 as pb;
use flashsale_proto::gateway::v1 as gw;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// An amount of money in integer minor units (cents for USD).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Money {
    /// ISO 4217 code, e.g. `USD`.
    #[schema(example = "USD")]
    pub currency: String,
    /// Minor units (1999 = 19.99 USD).
    #[schema(example = 2500)]
    pub amount_minor: i64,
}

impl From<pb::Money> for Money {
    fn from(money: pb::Money) -> Self {
        let pb::Money { currency, amount_minor } = money;
        Self { currency, amount_minor }
    }
}

/// A sale's price: 1..=10^12 minor units.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// ISO 4217 code, e.g. `USD`.
    #[schema(example = "USD")]
    pub currency: String,
    #[schema(example = 2500)]
    pub amount_minor: i64,
}

/// A credit: 1..=10^15 minor units.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Amount {
    /// ISO 4217 code, e.g. `USD`.
    #[schema(example = "USD")]
    pub currency: String,
    #[schema(example = 10_000)]
    pub amount_minor: i64,
}

impl From<Price> for pb::Money {
    fn from(price: Price) -> Self {
        let Price { currency, amount_minor } = price;
        Self { currency, amount_minor }
    }
}

impl From<Amount> for pb::Money {
    fn from(amount: Amount) -> Self {
        let Amount { currency, amount_minor } = amount;
        Self { currency, amount_minor }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ItemStatus {
    Unspecified,
    Scheduled,
    OnSale,
    SoldOut,
    Ended,
}

impl From<i32> for ItemStatus {
    fn from(status: i32) -> Self {
        match pb::ItemStatus::try_from(status) {
            Ok(pb::ItemStatus::Scheduled) => Self::Scheduled,
            Ok(pb::ItemStatus::OnSale) => Self::OnSale,
            Ok(pb::ItemStatus::SoldOut) => Self::SoldOut,
            Ok(pb::ItemStatus::Ended) => Self::Ended,
            Ok(pb::ItemStatus::Unspecified) | Err(_) => Self::Unspecified,
        }
    }
}

/// An order's state as buyers see it (payment in progress reads as PENDING).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    Unspecified,
    Pending,
    Confirmed,
    Rejected,
    Refunded,
}

impl From<i32> for OrderStatus {
    fn from(status: i32) -> Self {
        match pb::OrderStatus::try_from(status) {
            Ok(pb::OrderStatus::Pending | pb::OrderStatus::PaymentPending) => Self::Pending,
            Ok(pb::OrderStatus::Confirmed) => Self::Confirmed,
            Ok(pb::OrderStatus::Rejected) => Self::Rejected,
            Ok(pb::OrderStatus::Refunded) => Self::Refunded,
            Ok(pb::OrderStatus::Unspecified) | Err(_) => Self::Unspecified,
        }
    }
}

fn time(timestamp: Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    flashsale_domain::time::to_datetime(&timestamp?).ok()
}

pub use flashsale_domain::time::from_datetime as timestamp;

/// An item on sale.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Item {
    #[schema(example = "demo-drop")]
    pub id: String,
    pub name: String,
    pub price: Option<Money>,
    pub stock_total: u32,
    pub stock_remaining: u32,
    pub per_user_limit: u32,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub status: ItemStatus,
    /// Redis slots the item's admission is spread over (1 for all but the hottest items).
    pub admission_buckets: u32,
}

impl From<pb::Item> for Item {
    fn from(item: pb::Item) -> Self {
        let pb::Item {
            id,
            name,
            price,
            stock_total,
            stock_remaining,
            per_user_limit,
            starts_at,
            ends_at,
            status,
            admission_buckets,
        } = item;
        Self {
            id,
            name,
            price: price.map(Money::from),
            stock_total,
            stock_remaining,
            per_user_limit,
            starts_at: time(starts_at),
            ends_at: time(ends_at),
            status: status.into(),
            admission_buckets,
        }
    }
}

/// A buyer's order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Order {
    pub id: String,
    pub user_id: String,
    pub item_id: String,
    pub quantity: u32,
    pub amount: Option<Money>,
    pub status: OrderStatus,
    /// Why a REJECTED order was rejected (e.g. `INSUFFICIENT_FUNDS`); empty otherwise.
    pub reject_reason: String,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub idempotency_key: String,
}

impl From<pb::Order> for Order {
    fn from(order: pb::Order) -> Self {
        let pb::Order {
            id,
            user_id,
            item_id,
            quantity,
            amount,
            status,
            reject_reason,
            created_at,
            updated_at,
            idempotency_key,
        } = order;
        Self {
            id,
            user_id,
            item_id,
            quantity,
            amount: amount.map(Money::from),
            status: status.into(),
            reject_reason,
            created_at: time(created_at),
            updated_at: time(updated_at),
            idempotency_key,
        }
    }
}

/// Paging of list routes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// At most this many entries (0 or absent: the default).
    pub page_size: Option<u32>,
    /// `next_page_token` of the previous page (opaque; only tokens this API issued are accepted).
    #[param(max_length = 512)]
    pub page_token: Option<String>,
}

/// `GET /v1/items`: paging, and whether ended sales are listed too.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ItemListing {
    /// At most this many entries (0 or absent: the default).
    pub page_size: Option<u32>,
    /// `next_page_token` of the previous page (opaque; only tokens this API issued are accepted).
    #[param(max_length = 512)]
    pub page_token: Option<String>,
    /// Sales that have ended too (the history); by default only live and upcoming sales.
    pub include_ended: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemList {
    pub items: Vec<Item>,
    /// Empty on the last page.
    pub next_page_token: String,
}

impl From<gw::ListItemsResponse> for ItemList {
    fn from(reply: gw::ListItemsResponse) -> Self {
        let gw::ListItemsResponse { items, next_page_token } = reply;
        Self { items: items.into_iter().map(Item::from).collect(), next_page_token }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderList {
    pub orders: Vec<Order>,
    /// Empty on the last page.
    pub next_page_token: String,
}

impl From<gw::ListOrdersResponse> for OrderList {
    fn from(reply: gw::ListOrdersResponse) -> Self {
        let gw::ListOrdersResponse { orders, next_page_token } = reply;
        Self { orders: orders.into_iter().map(Order::from).collect(), next_page_token }
    }
}

/// `POST /v1/purchases`. The buyer is the token's subject, never a body field.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseBody {
    #[schema(example = "demo-drop")]
    pub item_id: String,
    /// 1 up to the item's per-user limit.
    #[schema(example = 1)]
    pub quantity: u32,
}

/// The purchase was admitted: follow `order_id` to its final state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurchaseAccepted {
    pub order_id: String,
    pub status: OrderStatus,
}

impl From<gw::PurchaseResponse> for PurchaseAccepted {
    fn from(reply: gw::PurchaseResponse) -> Self {
        let gw::PurchaseResponse { order_id, status } = reply;
        Self { order_id, status: status.into() }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Wallet {
    /// One entry per currency.
    pub balances: Vec<Money>,
    /// What purchases not yet settled hold of each balance, in the same order:
    /// the buyer can spend the balance less this.
    #[serde(default)]
    pub held: Vec<Money>,
}

/// `GET /v1/wallet` filter.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WalletQuery {
    /// Only this ISO 4217 currency.
    pub currency: Option<String>,
}

/// `POST /v1/admin/items`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateItemBody {
    /// 1..=64 characters of `[A-Za-z0-9_-]`.
    #[schema(example = "drop-42")]
    pub id: String,
    /// 1..=200 characters, no control characters.
    #[schema(example = "Limited sneakers", pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,200}$")]
    pub name: String,
    pub price: Price,
    pub stock_total: u32,
    pub per_user_limit: u32,
    pub starts_at: DateTime<Utc>,
    /// After `starts_at`.
    pub ends_at: DateTime<Utc>,
    /// Redis slots to spread the item's admission over, 1..=64 (absent or 0: 1).
    /// More than 1 only for an item too hot for one Redis Cluster shard.
    #[serde(default)]
    pub admission_buckets: u32,
}

impl From<CreateItemBody> for gw::CreateItemRequest {
    fn from(body: CreateItemBody) -> Self {
        let CreateItemBody { id, name, price, stock_total, per_user_limit, starts_at, ends_at, admission_buckets } =
            body;
        Self {
            id,
            name,
            price: Some(price.into()),
            stock_total,
            per_user_limit,
            starts_at: Some(timestamp(starts_at)),
            ends_at: Some(timestamp(ends_at)),
            admission_buckets,
        }
    }
}

/// `POST /v1/admin/users/{user_id}/top-up`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUpBody {
    pub amount: Amount,
    /// Makes a retried top-up credit once (1..=121 visible ASCII); a fresh key is made when absent.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TopUpResult {
    /// The account's balance after the credit.
    pub balance: Option<Money>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemStats {
    pub item: Option<Item>,
    pub orders_pending: u64,
    pub orders_confirmed: u64,
    pub orders_rejected: u64,
    pub orders_refunded: u64,
    pub buyers: u64,
    pub units_sold: u64,
}

impl From<gw::GetItemStatsResponse> for ItemStats {
    fn from(reply: gw::GetItemStatsResponse) -> Self {
        let gw::GetItemStatsResponse {
            item,
            orders_pending,
            orders_confirmed,
            orders_rejected,
            orders_refunded,
            buyers,
            units_sold,
        } = reply;
        Self {
            item: item.map(Item::from),
            orders_pending,
            orders_confirmed,
            orders_rejected,
            orders_refunded,
            buyers,
            units_sold,
        }
    }
}

/// One server-sent event of `GET /v1/orders/{order_id}/events`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderEventFrame {
    /// Always `order`.
    #[schema(example = "order")]
    pub event: String,
    /// The order (an `Order` object) as JSON.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// Every error: `{"error": {"code": "SOLD_OUT", "message": "sold out"}}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// The reason code of the error table in proto/README.md, "Errors" (the gRPC `ErrorInfo.reason`).
    #[schema(example = "SOLD_OUT")]
    pub code: String,
    pub message: String,
    /// With `NOT_ENOUGH_STOCK` only: how many units were left (a smaller
    /// request may still buy them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub units_left: Option<u32>,
}

/// `/healthz` and `/readyz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthStatus {
    #[schema(example = "ok")]
    pub status: String,
}
