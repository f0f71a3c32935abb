//! The wallet's validated vocabulary. Every request is parsed into these types
//! before anything touches the database, so bad input is refused with a precise
//! `INVALID_ARGUMENT` and changes nothing.

use crate::error::WalletError;

// The values every service shares (one rule each, in `flashsale-domain`).
pub use flashsale_domain::{Amount, Currency, IdempotencyKey, MAX_AMOUNT_MINOR, UserId};

const MAX_REFERENCE_CHARS: usize = 256;

/// Free text that travels with a ledger entry (an order id, "top-up").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference(String);

impl Reference {
    pub fn parse(raw: &str) -> Result<Self, WalletError> {
        if raw.chars().count() > MAX_REFERENCE_CHARS {
            return Err(WalletError::invalid("reference", "must be at most 256 characters"));
        }
        if raw.chars().any(char::is_control) {
            return Err(WalletError::invalid("reference", "must not contain control characters"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Direction of a money movement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Credit,
    Debit,
}

impl Kind {
    /// The value stored in `ledger_entries.kind`.
    pub fn as_db(self) -> &'static str {
        match self {
            Kind::Credit => "credit",
            Kind::Debit => "debit",
        }
    }
}

/// A validated Credit or Debit request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    pub key: IdempotencyKey,
    pub user: UserId,
    pub currency: Currency,
    pub amount: Amount,
    pub kind: Kind,
    pub reference: Reference,
}

/// The longest a hold may stay open before the sweeper releases it.
pub const MAX_HOLD_TTL_SECONDS: u32 = 86_400;

/// A validated Hold request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldSpec {
    pub target: HoldTarget,
    pub ttl_seconds: u32,
    pub reference: Reference,
}

/// An order's hold as Capture and Void name it: the order, and the user and
/// amount the hold must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldTarget {
    /// The order id, under the wallet's rule for keys.
    pub order: IdempotencyKey,
    pub user: UserId,
    pub currency: Currency,
    pub amount: Amount,
}

/// Which page of a ledger to read: entries with ids below the token's, newest
/// first (the token is the last id of the page before).
pub type Page = flashsale_domain::Page<i64>;

/// Entries in a page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// The page a `ListTransactions` asks for.
pub fn page(size: u32, token: &str) -> Result<Page, WalletError> {
    Ok(Page::parse(size, token, DEFAULT_PAGE_SIZE, |token| token.parse::<i64>().ok().filter(|id| *id > 0))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(page(0, "").unwrap(), Page { size: 50, token: None });
        assert_eq!(page(10, "42").unwrap(), Page { size: 10, token: Some(42) });
        assert!(page(501, "").is_err());
        assert!(page(10, "abc").is_err());
        assert!(page(10, "-5").is_err());
    }
}
