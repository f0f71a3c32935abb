//! The wallet's validated vocabulary. Every request is parsed into these types
//! before anything touches the database, so bad input is refused with a precise
//! `INVALID_ARGUMENT` and changes nothing.

use std::fmt;

use crate::error::WalletError;

/// Largest amount one Credit or Debit may move, in minor units (10^15: ten
/// trillion dollars). Far above any real payment, far below `i64::MAX`, so
/// sums of a few amounts cannot overflow before the database sees them.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;
const MAX_USER_ID_CHARS: usize = 128;
const MAX_KEY_CHARS: usize = 128;
const MAX_REFERENCE_CHARS: usize = 256;

/// A buyer's id as other services know it (the `sub` of their token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, WalletError> {
        if raw.trim().is_empty() {
            return Err(WalletError::invalid("user_id", "must not be empty"));
        }
        if raw.chars().count() > MAX_USER_ID_CHARS {
            return Err(WalletError::invalid("user_id", "must be at most 128 characters"));
        }
        if raw.chars().any(char::is_control) {
            return Err(WalletError::invalid("user_id", "must not contain control characters"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An ISO 4217 alphabetic currency code that exists in the ISO list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency(iso_currency::Currency);

impl Currency {
    pub fn parse(raw: &str) -> Result<Self, WalletError> {
        // from_code is case-sensitive on purpose: "usd" is a client bug worth reporting.
        iso_currency::Currency::from_code(raw)
            .map(Self)
            .ok_or_else(|| WalletError::invalid("currency", "must be an ISO 4217 code such as \"USD\""))
    }

    /// Parses an optional currency filter: empty means "every currency".
    pub fn parse_optional(raw: &str) -> Result<Option<Self>, WalletError> {
        if raw.is_empty() { Ok(None) } else { Self::parse(raw).map(Some) }
    }

    pub fn code(&self) -> &'static str {
        self.0.code()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A strictly positive amount of minor units, at most [`MAX_AMOUNT_MINOR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(i64);

impl Amount {
    pub fn parse(minor: i64) -> Result<Self, WalletError> {
        if minor <= 0 {
            return Err(WalletError::invalid("amount.amount_minor", "must be positive"));
        }
        if minor > MAX_AMOUNT_MINOR {
            return Err(WalletError::invalid("amount.amount_minor", "must be at most 10^15 minor units"));
        }
        Ok(Self(minor))
    }

    pub fn minor(self) -> i64 {
        self.0
    }
}

/// The caller's name for one money movement: 1..=128 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, WalletError> {
        if raw.is_empty() {
            return Err(WalletError::invalid("idempotency_key", "must not be empty"));
        }
        if raw.len() > MAX_KEY_CHARS {
            return Err(WalletError::invalid("idempotency_key", "must be at most 128 characters"));
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(WalletError::invalid("idempotency_key", "must be visible ASCII characters"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

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

/// Which page of a listing to read: entries with ids below `before`, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub size: i64,
    pub before: Option<i64>,
}

impl Page {
    pub const DEFAULT_SIZE: u32 = 50;
    pub const MAX_SIZE: u32 = 500;

    /// `token` is the `next_page_token` a previous page returned (opaque to
    /// clients; today the last id seen).
    pub fn parse(size: u32, token: &str) -> Result<Self, WalletError> {
        let size = match size {
            0 => Self::DEFAULT_SIZE,
            1..=Self::MAX_SIZE => size,
            _ => return Err(WalletError::invalid("page_size", "must be at most 500")),
        };
        let before = if token.is_empty() {
            None
        } else {
            let id = token
                .parse::<i64>()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| WalletError::invalid("page_token", "is not a token this service issued"))?;
            Some(id)
        };
        Ok(Self { size: i64::from(size), before })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_must_be_positive_and_bounded() {
        assert!(Amount::parse(1).is_ok());
        assert!(Amount::parse(MAX_AMOUNT_MINOR).is_ok());
        for bad in [0, -1, i64::MIN, MAX_AMOUNT_MINOR + 1, i64::MAX] {
            assert!(Amount::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn currencies_must_be_real_iso_codes() {
        assert_eq!(Currency::parse("EUR").unwrap().code(), "EUR");
        for bad in ["", "usd", "US", "USDX", "ZZZ", "€"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn keys_are_visible_ascii_up_to_128() {
        assert!(IdempotencyKey::parse("refund:0192-abc").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(128)).is_ok());
        for bad in [String::new(), "k".repeat(129), "has space".into(), "tab\t".into(), "é".into()] {
            assert!(IdempotencyKey::parse(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn user_ids_are_non_blank_and_bounded() {
        assert!(UserId::parse("alice").is_ok());
        for bad in [String::new(), "   ".into(), "u".repeat(129), "a\nb".into()] {
            assert!(UserId::parse(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(Page::parse(0, "").unwrap(), Page { size: 50, before: None });
        assert_eq!(Page::parse(10, "42").unwrap(), Page { size: 10, before: Some(42) });
        assert!(Page::parse(501, "").is_err());
        assert!(Page::parse(10, "abc").is_err());
        assert!(Page::parse(10, "-5").is_err());
    }
}
