//! Currencies and amounts. Money is whole minor units (cents) in an `i64`,
//! never a float.

use crate::Invalid;

/// Largest amount one credit, debit, price or order may carry, in minor units
/// (10^15: ten trillion dollars). Far above any real payment, far below
/// `i64::MAX`, so sums of a few amounts cannot overflow before the database
/// sees them.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

/// An ISO 4217 alphabetic currency code that exists in the ISO list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency(iso_currency::Currency);

impl Currency {
    /// The shape only (the list itself is checked by [`Currency::parse`]).
    pub const PATTERN: &'static str = "^[A-Z]{3}$";
    pub const RULE: &'static str = "must be an ISO 4217 code such as \"USD\"";

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        // from_code is case-sensitive on purpose: "usd" is a client bug worth reporting.
        iso_currency::Currency::from_code(raw).map(Self).ok_or(Invalid { field: "currency", rule: Self::RULE })
    }

    /// An optional currency (a filter): empty means none.
    pub fn parse_optional(raw: &str) -> Result<Option<Self>, Invalid> {
        if raw.is_empty() { Ok(None) } else { Self::parse(raw).map(Some) }
    }

    pub fn code(&self) -> &'static str {
        self.0.code()
    }
}

impl std::fmt::Display for Currency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// A strictly positive amount of minor units, at most [`MAX_AMOUNT_MINOR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Amount(i64);

impl Amount {
    pub const RULE: &'static str = "must be 1..=10^15 minor units";

    pub fn parse(minor: i64) -> Result<Self, Invalid> {
        if (1..=MAX_AMOUNT_MINOR).contains(&minor) {
            Ok(Self(minor))
        } else {
            Err(Invalid { field: "amount.amount_minor", rule: Self::RULE })
        }
    }

    pub fn minor(self) -> i64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies_are_iso_codes_in_upper_case() {
        assert_eq!(Currency::parse("USD").unwrap().code(), "USD");
        for bad in ["usd", "US", "USDD", "", "XYZ", "ZZZ", "€"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Currency::parse_optional(""), Ok(None));
        let shape = regex::Regex::new(Currency::PATTERN).unwrap();
        for good in ["USD", "EUR", "JPY"] {
            assert!(shape.is_match(good) && Currency::parse(good).is_ok());
        }
    }

    #[test]
    fn amounts_are_positive_and_bounded() {
        assert_eq!(Amount::parse(1).unwrap().minor(), 1);
        assert!(Amount::parse(MAX_AMOUNT_MINOR).is_ok());
        for bad in [0, -1, i64::MIN, MAX_AMOUNT_MINOR + 1, i64::MAX] {
            assert!(Amount::parse(bad).is_err(), "{bad}");
        }
    }
}
