//! The Redis protocol of the admission state, owned here and nowhere else in
//! Rust: every key's name, each script's positional `KEYS` list, and the
//! encodings of the values Rust reads or writes. The Lua side of the same
//! protocol is the scripts in `src/lua/`; a test below checks that each
//! script's `-- KEYS:` header lists the keys this file passes, in order.
//! `services/DESIGN.md` ("Redis keys") describes every key and value.

use redis::{Script, ScriptInvocation};

/// One of a stock bucket's keys. All of a bucket's keys share one hash tag
/// (`{ITEM}` for bucket 0, `{ITEM/B}` for bucket B), so one script only touches
/// one Redis Cluster slot.
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
    /// Hash: loan id → `borrower bucket\nunits\nlent at ms`: units this bucket
    /// lent to a dry one and not yet known to have arrived (`lend.lua`).
    Lent,
    /// Set: loan ids this bucket has received (each credited at most once).
    Received,
    /// String (with a TTL): the token of the rebuild that holds this bucket's
    /// rebuild lease (`rebuild_begin.lua`), while its snapshot is written.
    Rebuilding,
}

impl Part {
    pub(super) const ALL: [Self; 12] = [
        Self::Ready,
        Self::Tokens,
        Self::Held,
        Self::Inflight,
        Self::Idem,
        Self::Admitted,
        Self::Applied,
        Self::Parked,
        Self::Republished,
        Self::Lent,
        Self::Received,
        Self::Rebuilding,
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
            Self::Lent => "lent",
            Self::Received => "received",
            Self::Rebuilding => "rebuilding",
        }
    }
}

/// One stock bucket of an item: the Redis slot its keys hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot<'a> {
    pub(super) item_id: &'a str,
    pub(super) bucket: u32,
}

/// `<prefix>:{<item>}:<part>` for bucket 0 (so an item of one bucket keeps the
/// keys it always had), `<prefix>:{<item>/<bucket>}:<part>` for the others.
/// Item ids are `[A-Za-z0-9_-]`, so the `/` cannot make two buckets' tags equal.
pub(super) fn item_key(prefix: &str, slot: Slot<'_>, part: Part) -> String {
    let Slot { item_id, bucket } = slot;
    match bucket {
        0 => format!("{prefix}:{{{item_id}}}:{}", part.name()),
        _ => format!("{prefix}:{{{item_id}/{bucket}}}:{}", part.name()),
    }
}

/// The bucket of `buckets` a buyer is bound to: FNV-1a (64-bit) of the user id's
/// UTF-8 bytes, modulo `buckets`. Every gateway must compute the same bucket for
/// a buyer in every release, so this is a fixed, published function (the `fnv`
/// crate), not `std`'s hasher, whose output may change between Rust versions.
pub(super) fn bucket_of(user_id: &str, buckets: u32) -> u32 {
    use std::hash::Hasher;
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(user_id.as_bytes());
    // The remainder is below `buckets`, a u32.
    u32::try_from(hasher.finish() % u64::from(buckets.max(1))).unwrap_or(0)
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

    /// An invocation with the bucket's keys in place; the caller adds the `ARGV`.
    pub(super) fn on(&self, prefix: &str, slot: Slot<'_>) -> ScriptInvocation<'_> {
        let mut invocation = self.script.prepare_invoke();
        for part in self.keys {
            invocation.key(item_key(prefix, slot, *part));
        }
        invocation
    }
}

/// Each script with its `KEYS`.
const ADMIT: (&str, &[Part]) = (
    include_str!("../lua/admit.lua"),
    &[Part::Ready, Part::Tokens, Part::Held, Part::Inflight, Part::Idem, Part::Admitted, Part::Received],
);
const LEND: (&str, &[Part]) = (include_str!("../lua/lend.lua"), &[Part::Ready, Part::Tokens, Part::Lent]);
const RECEIVE: (&str, &[Part]) = (include_str!("../lua/receive.lua"), &[Part::Ready, Part::Tokens, Part::Received]);
const CLOSE_LOAN: (&str, &[Part]) = (include_str!("../lua/close_loan.lua"), &[Part::Ready, Part::Tokens, Part::Lent]);
const UNADMIT: (&str, &[Part]) =
    (include_str!("../lua/unadmit.lua"), &[Part::Tokens, Part::Held, Part::Inflight, Part::Idem, Part::Admitted]);
const APPLY_EVENT: (&str, &[Part]) = (
    include_str!("../lua/apply_event.lua"),
    &[Part::Ready, Part::Tokens, Part::Held, Part::Inflight, Part::Admitted, Part::Applied, Part::Parked],
);
const REBUILD_BEGIN: (&str, &[Part]) = (
    include_str!("../lua/rebuild_begin.lua"),
    &[Part::Ready, Part::Held, Part::Inflight, Part::Admitted, Part::Applied, Part::Rebuilding],
);
const REBUILD_PART: (&str, &[Part]) =
    (include_str!("../lua/rebuild_part.lua"), &[Part::Rebuilding, Part::Held, Part::Inflight, Part::Idem]);
const REBUILD_ABANDON: (&str, &[Part]) = (include_str!("../lua/rebuild_abandon.lua"), &[Part::Rebuilding]);
const REBUILD: (&str, &[Part]) = (
    include_str!("../lua/rebuild.lua"),
    &[Part::Ready, Part::Tokens, Part::Held, Part::Inflight, Part::Applied, Part::Parked, Part::Rebuilding],
);
const RESYNC: (&str, &[Part]) = (include_str!("../lua/resync.lua"), &[Part::Ready, Part::Tokens, Part::Admitted]);
const CLAIM_REPUBLISH: (&str, &[Part]) =
    (include_str!("../lua/claim_republish.lua"), &[Part::Republished, Part::Admitted]);

pub(super) struct Scripts {
    pub(super) admit: ItemScript,
    pub(super) unadmit: ItemScript,
    pub(super) apply_event: ItemScript,
    pub(super) rebuild_begin: ItemScript,
    pub(super) rebuild_part: ItemScript,
    pub(super) rebuild_abandon: ItemScript,
    pub(super) rebuild: ItemScript,
    pub(super) resync: ItemScript,
    pub(super) claim_republish: ItemScript,
    pub(super) lend: ItemScript,
    pub(super) receive: ItemScript,
    pub(super) close_loan: ItemScript,
}

impl Scripts {
    pub(super) fn load() -> Self {
        let script = |(source, keys): (&str, &'static [Part])| ItemScript::new(source, keys);
        Self {
            admit: script(ADMIT),
            unadmit: script(UNADMIT),
            apply_event: script(APPLY_EVENT),
            rebuild_begin: script(REBUILD_BEGIN),
            rebuild_part: script(REBUILD_PART),
            rebuild_abandon: script(REBUILD_ABANDON),
            rebuild: script(REBUILD),
            resync: script(RESYNC),
            claim_republish: script(CLAIM_REPUBLISH),
            lend: script(LEND),
            receive: script(RECEIVE),
            close_loan: script(CLOSE_LOAN),
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

/// A `lent` value: `borrower bucket\nunits\nlent at ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LoanEntry {
    pub(super) borrower: u32,
    pub(super) units: u32,
    pub(super) at_ms: i64,
}

impl LoanEntry {
    pub(super) fn decode(value: &str) -> Option<Self> {
        let mut fields = value.splitn(3, '\n');
        let (borrower, units, at) = (fields.next()?, fields.next()?, fields.next()?);
        Some(Self { borrower: borrower.parse().ok()?, units: units.parse().ok()?, at_ms: at.parse().ok()? })
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
            ("rebuild_begin", REBUILD_BEGIN),
            ("rebuild_part", REBUILD_PART),
            ("rebuild_abandon", REBUILD_ABANDON),
            ("rebuild", REBUILD),
            ("resync", RESYNC),
            ("claim_republish", CLAIM_REPUBLISH),
            ("lend", LEND),
            ("receive", RECEIVE),
            ("close_loan", CLOSE_LOAN),
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
        let slot = |bucket| Slot { item_id: "drop", bucket };
        assert_eq!(item_key("p", slot(0), Part::Tokens), "p:{drop}:tokens");
        assert_eq!(item_key("p", slot(3), Part::Tokens), "p:{drop/3}:tokens");
        let loan = LoanEntry::decode("2\n3\n1767225600000").unwrap();
        assert_eq!((loan.borrower, loan.units, loan.at_ms), (2, 3, 1_767_225_600_000));
        assert_eq!(LoanEntry::decode("2\n3"), None);
    }

    /// The binding of buyers to buckets is part of the stored state: a change
    /// would move every buyer of a bucketed sale away from their limit, in-flight
    /// mark and keys. These values are FNV-1a's, fixed for good.
    #[test]
    fn buyers_keep_their_bucket() {
        assert_eq!(bucket_of("alice", 1), 0);
        let spread: Vec<u32> =
            ["alice", "bob", "carol", "dave", "auth0|erin"].iter().map(|u| bucket_of(u, 4)).collect();
        // FNV-1a 64 of "alice" is 0x508b2abb65a03907 (computed apart from this code).
        assert_eq!(spread, [3, 0, 2, 3, 3]);
        // Roughly even over many buyers.
        let mut counts = [0u32; 4];
        for n in 0..4_000 {
            counts[bucket_of(&format!("buyer-{n}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&count| (800..=1_200).contains(&count)), "{counts:?}");
    }
}
