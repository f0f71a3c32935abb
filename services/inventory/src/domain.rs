//! The inventory's validated vocabulary: item specifications, order states and
//! the reasons an order can be rejected after admission.

use chrono::{DateTime, Utc};

use crate::error::InventoryError;

/// Where an order stands, as stored in `orders.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Stock and the buyer's count are held; the wallet debit is not settled.
    PaymentPending,
    Confirmed,
    Rejected,
    Refunded,
}

impl OrderStatus {
    pub fn as_db(self) -> &'static str {
        match self {
            Self::PaymentPending => "PAYMENT_PENDING",
            Self::Confirmed => "CONFIRMED",
            Self::Rejected => "REJECTED",
            Self::Refunded => "REFUNDED",
        }
    }

    pub fn from_db(value: &str) -> Option<Self> {
        Some(match value {
            "PAYMENT_PENDING" => Self::PaymentPending,
            "CONFIRMED" => Self::Confirmed,
            "REJECTED" => Self::Rejected,
            "REFUNDED" => Self::Refunded,
            _ => return None,
        })
    }

    /// The routing key an order's event is published with. Only final states
    /// have events: an order waiting for its payment publishes nothing.
    pub fn event_routing_key(self) -> Option<&'static str> {
        match self {
            Self::PaymentPending => None,
            Self::Confirmed => Some("order.confirmed"),
            Self::Rejected => Some("order.rejected"),
            Self::Refunded => Some("order.refunded"),
        }
    }
}

/// Why PostgreSQL or the wallet refused an order Redis had admitted.
/// The strings are reason codes of the public error table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    SoldOut,
    LimitReached,
    InsufficientFunds,
    /// Another live order already carries this buyer's idempotency key for the item
    /// (possible only after Redis lost its admission state).
    DuplicateKey,
    /// The gateway's quote does not match the item (price changed, bad message).
    InvalidOrder,
}

impl RejectReason {
    pub fn code(self) -> &'static str {
        match self {
            Self::SoldOut => "SOLD_OUT",
            Self::LimitReached => "LIMIT_REACHED",
            Self::InsufficientFunds => "INSUFFICIENT_FUNDS",
            Self::DuplicateKey => "IDEMPOTENCY_KEY_REUSED",
            Self::InvalidOrder => "INVALID_ARGUMENT",
        }
    }
}

pub use flashsale_domain::{MAX_ITEM_NAME_CHARS, MAX_PAGE_SIZE, MAX_PER_USER_LIMIT, MAX_PRICE_MINOR, MAX_STOCK};

/// A validated CreateItem request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemSpec {
    pub id: String,
    pub name: String,
    pub currency: &'static str,
    pub price_minor: i64,
    pub stock: i32,
    pub per_user_limit: i32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// 1..=64 (`flashsale_domain::MAX_ADMISSION_BUCKETS`).
    pub admission_buckets: i32,
}

// The shared value rules live in `flashsale-domain`; these keep inventory's
// call sites short (a checked `&str` back, the error already inventory's).

pub fn parse_item_id(raw: &str) -> Result<&str, InventoryError> {
    flashsale_domain::ItemId::check(raw)?;
    Ok(raw)
}

pub fn parse_order_id(raw: &str) -> Result<uuid::Uuid, InventoryError> {
    Ok(flashsale_domain::OrderId::parse(raw)?)
}

pub fn parse_currency(raw: &str) -> Result<&'static str, InventoryError> {
    Ok(flashsale_domain::Currency::parse(raw).map_err(|e| e.at("price.currency"))?.code())
}

pub fn parse_user_id(raw: &str) -> Result<&str, InventoryError> {
    flashsale_domain::UserId::check(raw)?;
    Ok(raw)
}

/// Which page of a listing to read: rows after the token's in the listing's
/// order (the token is the last key of the page before).
pub type Page = flashsale_domain::Page<String>;

/// The page a listing asks for (`default_size` entries when it does not say).
pub fn page(size: u32, token: &str, default_size: u32) -> Result<Page, InventoryError> {
    Ok(Page::parse(size, token, default_size, |token| flashsale_domain::is_token(token, 64).then(|| token.to_owned()))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_the_database_form() {
        for status in
            [OrderStatus::PaymentPending, OrderStatus::Confirmed, OrderStatus::Rejected, OrderStatus::Refunded]
        {
            assert_eq!(OrderStatus::from_db(status.as_db()), Some(status));
        }
        assert_eq!(OrderStatus::from_db("PENDING"), None);
    }

    #[test]
    fn item_ids_are_key_safe() {
        assert!(parse_item_id("drop-2026_01").is_ok());
        for bad in ["", "a b", "x:y", "{x}", &"i".repeat(65)] {
            assert!(parse_item_id(bad).is_err(), "{bad:?}");
        }
    }
}
