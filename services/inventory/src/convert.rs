//! Proto ⇄ domain conversions. Requests are destructured in full, so a new
//! field in the contract does not compile until it is handled here.

use chrono::{DateTime, Utc};
use flashsale_proto::common::v1 as pb;
use flashsale_proto::inventory::v1::CreateItemRequest;

use crate::db::models::{Item, Order};
use crate::domain::{
    ItemSpec, MAX_ITEM_NAME_CHARS, MAX_PER_USER_LIMIT, MAX_PRICE_MINOR, MAX_STOCK, OrderStatus, parse_currency,
    parse_item_id,
};
use crate::error::InventoryError;

pub(crate) use flashsale_domain::time::from_datetime as timestamp;

/// A required timestamp field.
pub(crate) fn parse_timestamp(
    field: &'static str,
    at: Option<prost_types::Timestamp>,
) -> Result<DateTime<Utc>, InventoryError> {
    let at = at.ok_or_else(|| InventoryError::invalid(field, "is required"))?;
    Ok(flashsale_domain::time::to_datetime(&at).map_err(|e| e.at(field))?)
}

impl TryFrom<CreateItemRequest> for ItemSpec {
    type Error = InventoryError;

    fn try_from(request: CreateItemRequest) -> Result<Self, Self::Error> {
        let CreateItemRequest { id, name, price, stock_total, per_user_limit, starts_at, ends_at, admission_buckets } =
            request;
        let id = if id.is_empty() { uuid::Uuid::now_v7().simple().to_string() } else { parse_item_id(&id)?.to_owned() };
        let name = name.trim().to_owned();
        if name.is_empty() || name.chars().count() > MAX_ITEM_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(InventoryError::invalid("name", "must be 1..=200 characters without control characters"));
        }
        let pb::Money { currency, amount_minor } =
            price.ok_or_else(|| InventoryError::invalid("price", "is required"))?;
        let currency = parse_currency(&currency)?;
        if !(1..=MAX_PRICE_MINOR).contains(&amount_minor) {
            return Err(InventoryError::invalid("price.amount_minor", "must be between 1 and 10^12"));
        }
        if stock_total > MAX_STOCK {
            return Err(InventoryError::invalid("stock_total", "must be at most 10^9"));
        }
        if per_user_limit == 0 || per_user_limit > MAX_PER_USER_LIMIT {
            return Err(InventoryError::invalid("per_user_limit", "must be between 1 and 1000"));
        }
        let admission_buckets = match admission_buckets {
            0 => 1,
            n if n <= flashsale_domain::MAX_ADMISSION_BUCKETS => i32::try_from(n).unwrap_or(1),
            _ => return Err(InventoryError::invalid("admission_buckets", "must be between 1 and 64")),
        };
        let starts_at = parse_timestamp("starts_at", starts_at)?;
        let ends_at = parse_timestamp("ends_at", ends_at)?;
        if starts_at >= ends_at {
            return Err(InventoryError::invalid("ends_at", "must be after starts_at"));
        }
        // Bounded above, so the conversions cannot fail.
        let stock = i32::try_from(stock_total).map_err(|_| InventoryError::invalid("stock_total", "too large"))?;
        let per_user_limit =
            i32::try_from(per_user_limit).map_err(|_| InventoryError::invalid("per_user_limit", "too large"))?;
        Ok(Self {
            id,
            name,
            currency,
            price_minor: amount_minor,
            stock,
            per_user_limit,
            starts_at,
            ends_at,
            admission_buckets,
        })
    }
}

/// The item as clients see it at `now`.
pub(crate) fn item_to_proto(item: Item, now: DateTime<Utc>) -> pb::Item {
    let Item {
        id,
        name,
        price_currency,
        price_minor,
        stock_total,
        stock_remaining,
        per_user_limit,
        starts_at,
        ends_at,
        version: _,
        created_at: _,
        admission_buckets,
    } = item;
    let status = if now < starts_at {
        pb::ItemStatus::Scheduled
    } else if now >= ends_at {
        pb::ItemStatus::Ended
    } else if stock_remaining == 0 {
        pb::ItemStatus::SoldOut
    } else {
        pb::ItemStatus::OnSale
    };
    pb::Item {
        id,
        name,
        price: Some(pb::Money { currency: price_currency, amount_minor: price_minor }),
        stock_total: u32::try_from(stock_total).unwrap_or(0),
        stock_remaining: u32::try_from(stock_remaining).unwrap_or(0),
        per_user_limit: u32::try_from(per_user_limit).unwrap_or(0),
        starts_at: Some(timestamp(starts_at)),
        ends_at: Some(timestamp(ends_at)),
        status: status.into(),
        admission_buckets: u32::try_from(admission_buckets).unwrap_or(1),
    }
}

pub(crate) fn order_to_proto(order: Order) -> pb::Order {
    let Order {
        id,
        user_id,
        item_id,
        quantity,
        amount_currency,
        amount_minor,
        status,
        reject_reason,
        idempotency_key,
        payment_attempts: _,
        next_attempt_at: _,
        created_at,
        updated_at,
        refund_requested_at: _,
    } = order;
    let status = match OrderStatus::from_db(&status) {
        Some(OrderStatus::PaymentPending) => pb::OrderStatus::PaymentPending,
        Some(OrderStatus::Confirmed) => pb::OrderStatus::Confirmed,
        Some(OrderStatus::Rejected) => pb::OrderStatus::Rejected,
        Some(OrderStatus::Refunded) => pb::OrderStatus::Refunded,
        // The column's CHECK admits only the four above.
        None => pb::OrderStatus::Unspecified,
    };
    pb::Order {
        id: id.to_string(),
        user_id,
        item_id,
        quantity: u32::try_from(quantity).unwrap_or(0),
        amount: Some(pb::Money { currency: amount_currency, amount_minor }),
        status: status.into(),
        reject_reason,
        created_at: Some(timestamp(created_at)),
        updated_at: Some(timestamp(updated_at)),
        idempotency_key,
    }
}
