//! The Redis protocol of the admission state, owned here and nowhere else in
//! Rust: every key's name, each script's positional `KEYS` list, and the
//! encodings of the values Rust reads or writes. The Lua side of the same
//! protocol is the scripts in `src/lua/`; a test below checks that each
//! script's `-- KEYS:` header lists the keys this file passes, in order.
//! `services/DESIGN.md` ("Redis keys") describes every key and value.

use redis::{Script, ScriptInvocation};

/// One of an item's keys. All are hash-tagged `{ITEM}`, so one script only
/// touches one Redis Cluster slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// Hash: `version`, `admissions` (see [`STAMP_FIELDS`]); present when the state is loaded.
    Ready,
    /// String: units Redis still offers.
    Tokens,
    /// Hash: user → units held or in flight.
    Held,
    /// Hash: user → the order id in flight.
    Inflight,
    /// Hash: [`idem_field`] → [`PriorOrder`].
    Idem,
    /// Hash: order id → [`AdmittedEntry`], until the order is final.
    Admitted,
    /// Set: `order id:STATUS` of every event applied (each at most once).
    Applied,
    /// Hash: `order id:STATUS` → an event that came while `ready` was missing,
    /// applied by `rebuild.lua`.
    Parked,
    /// Hash: order id → "attempts:next allowed at ms" (`claim_republish.lua`).
    Republished,
}

impl Part {
    pub(super) const ALL: [Self; 9] = [
        Self::Ready,
        Self::Tokens,
        Self::Held,
        Self::Inflight,
        Self::Idem,
        Self::Admitted,
        Self::Applied,
        Self::Parked,
        Self::Republished,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Tokens => "tokens",
            Self::Held => "held",
            Self::Inflight => "inflight",
            Self::Idem => "idem",
            Self::Admitted => "admitted",
            Self::Applied => "applied",
            Self::Parked => "parked",
            Self::Republished => "republished",
        }
    }
}

/// `<prefix>:{<item>}:<part>`.
pub(super) fn item_key(prefix: &str, item_id: &str, part: Part) -> String {
    format!("{prefix}:{{{item_id}}}:{}", part.name())
}

/// The gateway's own admission record of an order (JSON, with a TTL).
pub(super) fn order_key(prefix: &str, order_id: &str) -> String {
    format!("{prefix}:order:{order_id}")
}

/// A Lua script over one item's keys, which it takes in this order.
pub(super) struct ItemScript {
    script: Script,
    keys: &'static [Part],
}

impl ItemScript {
    fn new(source: &str, keys: &'static [Part]) -> Self {
        Self { script: Script::new(source), keys }
    }

    /// An invocation with the item's keys in place; the caller adds the `ARGV`.
    pub(super) fn on(&self, prefix: &str, item_id: &str) -> ScriptInvocation<'_> {
        let mut invocation = self.script.prepare_invoke();
        for part in self.keys {
            invocation.key(item_key(prefix, item_id, *part));
        }
        invocation
    }
}

/// Each script with its `KEYS`.
const ADMIT: (&str, &[Part]) = (
    include_str!("../lua/admit.lua"),
    &[Part::Ready, Part::Tokens, Part::Held, Part::Inflight, Part::Idem, Part::Admitted],
);
const UNADMIT: (&str, &[Part]) =
    (include_str!("../lua/unadmit.lua"), &[Part::Tokens, Part::Held, Part::Inflight, Part::Idem, Part::Admitted]);
const APPLY_EVENT: (&str, &[Part]) = (
    include_str!("../lua/apply_event.lua"),
    &[Part::Ready, Part::Tokens, Part::Held, Part::Inflight, Part::Admitted, Part::Applied, Part::Parked],
);
const REBUILD: (&str, &[Part]) = (
    include_str!("../lua/rebuild.lua"),
    &[Part::Ready, Part::Tokens, Part::Held, Part::Inflight, Part::Admitted, Part::Applied, Part::Parked, Part::Idem],
);
const RESYNC: (&str, &[Part]) = (include_str!("../lua/resync.lua"), &[Part::Ready, Part::Tokens, Part::Admitted]);
const CLAIM_REPUBLISH: (&str, &[Part]) =
    (include_str!("../lua/claim_republish.lua"), &[Part::Republished, Part::Admitted]);

pub(super) struct Scripts {
    pub(super) admit: ItemScript,
    pub(super) unadmit: ItemScript,
    pub(super) apply_event: ItemScript,
    pub(super) rebuild: ItemScript,
    pub(super) resync: ItemScript,
    pub(super) claim_republish: ItemScript,
}

impl Scripts {
    pub(super) fn load() -> Self {
        let script = |(source, keys): (&str, &'static [Part])| ItemScript::new(source, keys);
        Self {
            admit: script(ADMIT),
            unadmit: script(UNADMIT),
            apply_event: script(APPLY_EVENT),
            rebuild: script(REBUILD),
            resync: script(RESYNC),
            claim_republish: script(CLAIM_REPUBLISH),
        }
    }
}

/// The fields of the `ready` hash that make an item's admission stamp.
pub(super) const STAMP_FIELDS: [&str; 2] = ["version", "admissions"];

/// The `idem` field of a buyer's key: `user\nkey`. User ids never contain
/// control characters (`flashsale_domain::UserId`), so the newline separates safely.
pub(super) fn idem_field(user_id: &str, idempotency_key: &str) -> String {
    format!("{user_id}\n{idempotency_key}")
}

/// The buyer of an `idem` field.
pub(super) fn idem_field_user(field: &str) -> Option<&str> {
    field.split_once('\n').map(|(user, _)| user)
}

/// The `idem` value: the order a buyer's key created, `order|quantity`
/// (also the detail of `admit.lua`'s `DUPLICATE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PriorOrder {
    pub(super) order_id: String,
    pub(super) quantity: u32,
}

impl PriorOrder {
    pub(super) fn encode(order_id: &str, quantity: u32) -> String {
        format!("{order_id}|{quantity}")
    }

    pub(super) fn decode(value: &str) -> Option<Self> {
        let (order_id, quantity) = value.split_once('|')?;
        Some(Self { order_id: order_id.to_owned(), quantity: quantity.parse().ok()? })
    }
}

/// The `admitted` value `admit.lua` writes: `user\nquantity\nadmitted at ms\nkey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AdmittedEntry {
    pub(super) user_id: String,
    pub(super) quantity: u32,
    pub(super) at_ms: i64,
    pub(super) idempotency_key: String,
}

impl AdmittedEntry {
    pub(super) fn decode(value: &str) -> Option<Self> {
        let mut fields = value.splitn(4, '\n');
        let (user, quantity, at, key) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
        Some(Self {
            user_id: user.to_owned(),
            quantity: quantity.parse().ok()?,
            at_ms: at.parse().ok()?,
            idempotency_key: key.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key names of a script's `-- KEYS: 1 a (…), 2 b, …` header, in order.
    fn header_keys(source: &str) -> Vec<String> {
        let line = source.lines().find_map(|line| line.strip_prefix("-- KEYS: ")).expect("a KEYS header");
        let mut names = Vec::new();
        let mut depth = 0;
        let mut entry = String::new();
        for c in line.chars().chain(std::iter::once(',')) {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    let mut words = entry.split_whitespace();
                    let (_position, name) = (words.next().unwrap(), words.next().unwrap());
                    names.push(name.to_owned());
                    entry.clear();
                    continue;
                }
                _ => {}
            }
            if depth == 0 && c != ')' {
                entry.push(c);
            }
        }
        names
    }

    #[test]
    fn every_script_gets_the_keys_its_header_lists() {
        for (name, (source, keys)) in [
            ("admit", ADMIT),
            ("unadmit", UNADMIT),
            ("apply_event", APPLY_EVENT),
            ("rebuild", REBUILD),
            ("resync", RESYNC),
            ("claim_republish", CLAIM_REPUBLISH),
        ] {
            let passed: Vec<&str> = keys.iter().map(|part| part.name()).collect();
            assert_eq!(header_keys(source), passed, "{name}.lua");
        }
    }

    #[test]
    fn values_round_trip() {
        assert_eq!(
            PriorOrder::decode(&PriorOrder::encode("o-1", 2)),
            Some(PriorOrder { order_id: "o-1".into(), quantity: 2 })
        );
        assert_eq!(PriorOrder::decode("o-1"), None);
        assert_eq!(idem_field_user(&idem_field("auth0|alice", "k 1")), Some("auth0|alice"));
        let entry = AdmittedEntry::decode("alice\n2\n1767225600000\nkey-1").unwrap();
        assert_eq!((entry.user_id.as_str(), entry.quantity, entry.at_ms), ("alice", 2, 1_767_225_600_000));
        assert_eq!(entry.idempotency_key, "key-1");
        assert_eq!(AdmittedEntry::decode("alice\n2"), None);
        assert_eq!(item_key("p", "drop", Part::Tokens), "p:{drop}:tokens");
    }
}
