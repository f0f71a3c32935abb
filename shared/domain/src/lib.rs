//! The values the three services agree on, each with one rule, written once.
//!
//! Gateway, inventory and wallet all parse what reaches them through these
//! types, so a value one service accepts is never refused further down (an
//! order the gateway admitted must not be dead-lettered by inventory for an
//! idempotency key it reads differently). Each rule comes with its ECMA-262
//! `PATTERN`, which the gateway's OpenAPI document carries, and a test here
//! checks the pattern and the Rust check agree on every sample.
//!
//! A refused value is an [`Invalid`]: the field it came in and the rule it
//! broke, in words fit for a client. Each service turns it into its own
//! `INVALID_ARGUMENT`.

mod ids;
mod limits;
mod money;
pub mod room;
pub mod time;

pub use ids::{IdempotencyKey, ItemId, OrderId, TopUpKey, UserId, is_token};
pub use limits::{
    MAX_ADMISSION_BUCKETS, MAX_ITEM_NAME_CHARS, MAX_PAGE_SIZE, MAX_PER_USER_LIMIT, MAX_PRICE_MINOR, MAX_STOCK,
    PAGE_SIZE_REFUSAL, Page, page_size,
};
pub use money::{Amount, Currency, MAX_AMOUNT_MINOR};

/// A value that broke its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid {
    /// The field, as the client named it (`item_id`, `price.currency`, …).
    pub field: &'static str,
    /// What the value must be, e.g. "must be a UUID".
    pub rule: &'static str,
}

impl Invalid {
    /// The same refusal, reported under another field name.
    #[must_use]
    pub fn at(self, field: &'static str) -> Self {
        Self { field, ..self }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.rule)
    }
}

impl std::error::Error for Invalid {}
