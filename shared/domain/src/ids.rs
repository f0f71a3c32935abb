//! Identifiers: items, buyers, orders, and the idempotency keys clients choose.

use crate::Invalid;

/// `parse` (the type's `check`, then an owned copy), `as_str` and `into_string`
/// for a checked string newtype.
macro_rules! checked_string {
    ($name:ident) => {
        impl $name {
            pub fn parse(raw: &str) -> Result<Self, Invalid> {
                Self::check(raw).map(|()| Self(raw.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }
    };
}

checked_string!(ItemId);
checked_string!(UserId);
checked_string!(IdempotencyKey);

/// Whether `raw` is 1..=`max` characters of `[A-Za-z0-9_-]`: safe in a URL
/// path, a Redis key and a log line without escaping. Item ids and page
/// tokens follow it.
pub fn is_token(raw: &str, max: usize) -> bool {
    !raw.is_empty() && raw.len() <= max && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An item's id: 1..=64 of `[A-Za-z0-9_-]` (it is part of Redis keys and URL paths).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(String);

impl ItemId {
    pub const MAX_LEN: usize = 64;
    pub const PATTERN: &'static str = "^[A-Za-z0-9_-]{1,64}$";
    pub const RULE: &'static str = "must be 1..=64 characters of [A-Za-z0-9_-]";
    const INVALID: Invalid = Invalid { field: "item_id", rule: Self::RULE };

    /// Checks without copying (the purchase path).
    pub fn check(raw: &str) -> Result<(), Invalid> {
        if is_token(raw, Self::MAX_LEN) { Ok(()) } else { Err(Self::INVALID) }
    }
}

/// A buyer's id: the `sub` of their token. 1..=128 characters, not blank,
/// without control characters (identity providers choose the format, so
/// anything printable is allowed).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    pub const MAX_CHARS: usize = 128;
    /// C0 and C1 control characters are what `char::is_control` refuses.
    pub const PATTERN: &'static str = "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,128}$";
    pub const RULE: &'static str = "must be 1..=128 characters, not all blank, without control characters";
    const INVALID: Invalid = Invalid { field: "user_id", rule: Self::RULE };

    pub fn check(raw: &str) -> Result<(), Invalid> {
        let ok = !raw.trim().is_empty() && raw.chars().count() <= Self::MAX_CHARS && !raw.chars().any(char::is_control);
        if ok { Ok(()) } else { Err(Self::INVALID) }
    }
}

/// The caller's name for one purchase or money movement: 1..=128 visible
/// ASCII characters. Where a key is optional, empty means "none".
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 128;
    pub const PATTERN: &'static str = "^[!-~]{1,128}$";
    pub const RULE: &'static str = "must be 1..=128 visible ASCII characters";
    const INVALID: Invalid = Invalid { field: "idempotency_key", rule: Self::RULE };

    pub fn check(raw: &str) -> Result<(), Invalid> {
        let ok = !raw.is_empty() && raw.len() <= Self::MAX_LEN && raw.bytes().all(|b| b.is_ascii_graphic());
        if ok { Ok(()) } else { Err(Self::INVALID) }
    }

    /// An optional key: empty is `None`, anything else must follow the rule.
    pub fn parse_optional(raw: &str) -> Result<Option<Self>, Invalid> {
        if raw.is_empty() { Ok(None) } else { Self::parse(raw).map(Some) }
    }
}

/// An operator's key for a top-up. The wallet has one key space for every
/// movement, so the gateway files top-ups under [`TopUpKey::SCOPE`]: an
/// operator's key can then never equal a purchase's debit key (the order id) or
/// a refund's (`refund:<order id>`) and block it. The scoped whole must still be
/// an [`IdempotencyKey`], which leaves the operator [`TopUpKey::MAX_LEN`] characters.
pub struct TopUpKey;

impl TopUpKey {
    pub const SCOPE: &'static str = "top-up:";
    pub const MAX_LEN: usize = IdempotencyKey::MAX_LEN - Self::SCOPE.len();
    pub const PATTERN: &'static str = "^[!-~]{1,121}$";
    pub const RULE: &'static str = "must be 1..=121 visible ASCII characters";

    /// The wallet's key for a top-up under the operator's `raw` key; without
    /// one (empty), a fresh key, so each such call is its own top-up.
    pub fn scoped(raw: &str) -> Result<IdempotencyKey, Invalid> {
        let scoped = if raw.is_empty() {
            format!("{}auto:{}", Self::SCOPE, uuid::Uuid::now_v7())
        } else {
            let ok = raw.len() <= Self::MAX_LEN && raw.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(Invalid { field: "idempotency_key", rule: Self::RULE });
            }
            format!("{}{raw}", Self::SCOPE)
        };
        IdempotencyKey::parse(&scoped)
    }
}

/// Order ids are UUIDs (v7, chosen by the gateway when it admits the order).
pub struct OrderId;

impl OrderId {
    pub const PATTERN: &'static str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
    pub const RULE: &'static str = "must be a UUID";

    pub fn parse(raw: &str) -> Result<uuid::Uuid, Invalid> {
        // `Uuid::parse_str` also takes the braced, URN and simple forms; the
        // hyphenated form is what this suite issues and what the pattern says.
        if raw.len() != 36 {
            return Err(Invalid { field: "order_id", rule: Self::RULE });
        }
        uuid::Uuid::parse_str(raw).map_err(|_| Invalid { field: "order_id", rule: Self::RULE })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples every rule is tried on; each rule's Rust check must agree with
    /// its pattern (the OpenAPI document's) on all of them.
    const SAMPLES: &[&str] = &[
        "",
        " ",
        "a",
        "demo-drop",
        "Drop_2026",
        "has space",
        "tab\there",
        "new\nline",
        "c1\u{85}control",
        "del\u{7f}",
        "ünïcödé",
        "emoji🎉",
        "semi;colon",
        "slash/",
        "!~",
        "0190a0a8-8a3c-7cc1-9a0e-5c2b7e0f1a2b",
        "0190A0A8-8A3C-7CC1-9A0E-5C2B7E0F1A2B",
        "0190a0a88a3c7cc19a0e5c2b7e0f1a2b",
        "{0190a0a8-8a3c-7cc1-9a0e-5c2b7e0f1a2b}",
        "0190a0a8-8a3c-7cc1-9a0e-5c2b7e0f1a2",
    ];

    fn long(n: usize, c: char) -> String {
        std::iter::repeat_n(c, n).collect()
    }

    fn agree(pattern: &str, check: impl Fn(&str) -> bool, extra: &[String]) {
        let regex = regex::Regex::new(pattern).unwrap();
        for sample in SAMPLES.iter().map(|s| (*s).to_owned()).chain(extra.iter().cloned()) {
            assert_eq!(check(&sample), regex.is_match(&sample), "{pattern} and the check disagree on {sample:?}");
        }
    }

    #[test]
    fn item_ids_follow_their_pattern() {
        agree(ItemId::PATTERN, |s| ItemId::check(s).is_ok(), &[long(64, 'a'), long(65, 'a')]);
        assert_eq!(ItemId::parse("x y").unwrap_err().field, "item_id");
    }

    #[test]
    fn user_ids_follow_their_pattern_except_blank_ones() {
        // JSON Schema cannot say "not all blank" simply; the check is stricter there only.
        let blank = |s: &str| !s.is_empty() && s.trim().is_empty();
        agree(
            UserId::PATTERN,
            |s| UserId::check(s).is_ok() || blank(s),
            &[long(128, 'é'), long(129, 'é'), long(128, 'a'), long(129, 'a')],
        );
        assert!(UserId::check("   ").is_err());
        assert!(UserId::check("auth0|5f7c8ec7c33c6c004bbafe82").is_ok());
    }

    #[test]
    fn idempotency_keys_follow_their_pattern() {
        agree(IdempotencyKey::PATTERN, |s| IdempotencyKey::check(s).is_ok(), &[long(128, 'k'), long(129, 'k')]);
        assert_eq!(IdempotencyKey::parse_optional(""), Ok(None));
        assert!(IdempotencyKey::parse_optional(" ").is_err());
    }

    #[test]
    fn order_ids_follow_their_pattern() {
        agree(OrderId::PATTERN, |s| OrderId::parse(s).is_ok(), &[]);
        agree(TopUpKey::PATTERN, |s| !s.is_empty() && TopUpKey::scoped(s).is_ok(), &[long(121, 'k'), long(122, 'k')]);
        // The longest operator key still makes a valid wallet key, and the
        // pattern's bound is the one computed from the scope.
        assert_eq!(TopUpKey::MAX_LEN, 121);
        assert_eq!(TopUpKey::scoped(&long(121, 'k')).map(|k| k.as_str().len()), Ok(IdempotencyKey::MAX_LEN));
        assert!(TopUpKey::scoped("").is_ok_and(|k| k.as_str().starts_with("top-up:auto:")));
    }

    #[test]
    fn tokens_are_key_safe() {
        assert!(is_token("next-page_2", 64));
        assert!(!is_token("next page", 64));
        assert!(!is_token(&long(65, 'a'), 64));
        assert!(!is_token("", 64));
    }
}
