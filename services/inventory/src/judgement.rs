//! The judgement of a batch of admitted orders, as a pure function: given what
//! the recording transaction read and locked (the items' terms, the buyers'
//! holdings, the live idempotency keys, the orders recorded already), which
//! orders are held for payment and which are refused, and why. It judges them
//! one after another in (item, order id) order, exactly as one conditional
//! update after another would. `db::orders` then writes the result, and
//! PostgreSQL's guards and constraints still have the last word.

use std::collections::{BTreeMap, HashMap, HashSet};

use uuid::Uuid;

use crate::domain::RejectReason;

/// A validated `OrderPlaced`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub id: Uuid,
    pub user_id: String,
    pub item_id: String,
    pub quantity: i32,
    pub currency: String,
    pub amount_minor: i64,
    pub idempotency_key: String,
    /// The W3C traceparent of the consume span that carries this order.
    pub traceparent: Option<String>,
}

/// An item's terms as its locked row gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemTerms {
    pub currency: String,
    pub price_minor: i64,
    pub per_user_limit: i32,
    pub remaining: i32,
    pub version: i64,
}

/// What the judgement reads, kept current as it goes.
#[derive(Debug, Clone, Default)]
pub struct Terms {
    /// The batch's items that exist, by id.
    pub items: HashMap<String, ItemTerms>,
    /// (item, user) → (quantity held, that holding's limit).
    pub holdings: HashMap<(String, String), (i32, i32)>,
    /// (user, item, key) of every live (not rejected) order.
    pub live_keys: HashSet<(String, String, String)>,
}

/// The judgement of one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not judged: recorded before, its item does not exist, or a second copy
    /// of an order earlier in the batch (the first copy decides).
    NotJudged,
    /// Stock and the buyer's count are taken; it awaits payment.
    Held,
    Rejected(RejectReason),
}

/// A batch's judgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement<'a> {
    /// One per order, in the batch's order.
    pub verdicts: Vec<Verdict>,
    /// Units taken per item, by item id.
    pub taken: BTreeMap<&'a str, i32>,
    /// Units added per (item, user), with that holding's limit: lock order.
    pub held: BTreeMap<(&'a str, &'a str), (i32, i32)>,
}

/// Judges `batch` against `terms` (updated as orders are held). `recorded`
/// holds the ids of the batch's orders that exist already.
pub fn judge<'a>(batch: &'a [Placed], recorded: &HashSet<Uuid>, terms: &mut Terms) -> Judgement<'a> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by(|a, b| (&batch[*a].item_id, batch[*a].id).cmp(&(&batch[*b].item_id, batch[*b].id)));
    let mut judgement =
        Judgement { verdicts: vec![Verdict::NotJudged; batch.len()], taken: BTreeMap::new(), held: BTreeMap::new() };
    let mut seen = HashSet::new();
    for i in order {
        let placed = &batch[i];
        if recorded.contains(&placed.id) {
            continue;
        }
        let Some(item) = terms.items.get_mut(&placed.item_id) else { continue };
        if !seen.insert(placed.id) {
            continue;
        }
        let quantity = placed.quantity;
        let key = (placed.user_id.clone(), placed.item_id.clone(), placed.idempotency_key.clone());
        let holding =
            terms.holdings.entry((placed.item_id.clone(), placed.user_id.clone())).or_insert((0, item.per_user_limit));
        let expected_amount = item.price_minor.checked_mul(i64::from(quantity));
        judgement.verdicts[i] = if placed.currency != item.currency || expected_amount != Some(placed.amount_minor) {
            Verdict::Rejected(RejectReason::InvalidOrder)
        } else if quantity > item.per_user_limit {
            Verdict::Rejected(RejectReason::LimitReached)
        } else if terms.live_keys.contains(&key) {
            Verdict::Rejected(RejectReason::DuplicateKey)
        } else if item.remaining < quantity {
            Verdict::Rejected(RejectReason::SoldOut)
        } else if holding.0 + quantity > holding.1 {
            Verdict::Rejected(RejectReason::LimitReached)
        } else {
            item.remaining -= quantity;
            holding.0 += quantity;
            *judgement.taken.entry(placed.item_id.as_str()).or_default() += quantity;
            let added =
                judgement.held.entry((placed.item_id.as_str(), placed.user_id.as_str())).or_insert((0, holding.1));
            added.0 += quantity;
            terms.live_keys.insert(key);
            Verdict::Held
        };
    }
    judgement
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRICE: i64 = 500;

    /// An order for `quantity` of `item` by `user` under `key`, priced right;
    /// `n` orders the ids (judged in id order within an item).
    fn placed(n: u128, user: &str, item: &str, quantity: i32, key: &str) -> Placed {
        Placed {
            id: Uuid::from_u128(n),
            user_id: user.into(),
            item_id: item.into(),
            quantity,
            currency: "USD".into(),
            amount_minor: PRICE * i64::from(quantity),
            idempotency_key: key.into(),
            traceparent: None,
        }
    }

    fn terms(items: &[(&str, i32, i32)]) -> Terms {
        Terms {
            items: items
                .iter()
                .map(|(id, remaining, limit)| {
                    let terms = ItemTerms {
                        currency: "USD".into(),
                        price_minor: PRICE,
                        per_user_limit: *limit,
                        remaining: *remaining,
                        version: 1,
                    };
                    ((*id).to_owned(), terms)
                })
                .collect(),
            ..Terms::default()
        }
    }

    use RejectReason::{DuplicateKey, InvalidOrder, LimitReached, SoldOut};
    use Verdict::{Held, NotJudged, Rejected};

    /// Each case: a name, the items (id, units left, per-user limit), the
    /// buyers' holdings before, the live keys before, the ids recorded
    /// before, the batch, and the verdicts expected in the batch's order.
    struct Case {
        name: &'static str,
        items: &'static [(&'static str, i32, i32)],
        holdings: &'static [(&'static str, &'static str, i32)],
        live_keys: &'static [(&'static str, &'static str, &'static str)],
        recorded: &'static [u128],
        batch: Vec<Placed>,
        expected: Vec<Verdict>,
    }

    fn cases() -> Vec<Case> {
        let mut wrong_price = placed(2, "bob", "a", 1, "k");
        wrong_price.amount_minor += 1;
        let mut wrong_currency = placed(3, "cat", "a", 1, "k");
        wrong_currency.currency = "EUR".into();
        vec![
            Case {
                name: "stock runs out in id order, whatever the batch's order",
                items: &[("a", 2, 5)],
                holdings: &[],
                live_keys: &[],
                recorded: &[],
                batch: vec![
                    placed(3, "cat", "a", 1, "k"),
                    placed(1, "ann", "a", 1, "k"),
                    placed(2, "bob", "a", 1, "k"),
                ],
                expected: vec![Rejected(SoldOut), Held, Held],
            },
            Case {
                name: "a multi-unit order that does not fit is refused; a smaller later one still fits",
                items: &[("a", 2, 5)],
                holdings: &[],
                live_keys: &[],
                recorded: &[],
                batch: vec![placed(1, "ann", "a", 3, "k"), placed(2, "bob", "a", 2, "k")],
                expected: vec![Rejected(SoldOut), Held],
            },
            Case {
                name: "the per-user limit counts what the buyer held before and earlier in the batch",
                items: &[("a", 10, 2)],
                holdings: &[("a", "ann", 1)],
                live_keys: &[],
                recorded: &[],
                batch: vec![
                    placed(1, "ann", "a", 1, "k1"),
                    placed(2, "ann", "a", 1, "k2"),
                    placed(3, "bob", "a", 3, "k"),
                ],
                expected: vec![Held, Rejected(LimitReached), Rejected(LimitReached)],
            },
            Case {
                name: "a key a live order holds, before or earlier in the batch, is refused",
                items: &[("a", 10, 5)],
                holdings: &[],
                live_keys: &[("ann", "a", "k")],
                recorded: &[],
                batch: vec![
                    placed(1, "ann", "a", 1, "k"),
                    placed(2, "bob", "a", 1, "j"),
                    placed(3, "bob", "a", 1, "j"),
                ],
                expected: vec![Rejected(DuplicateKey), Held, Rejected(DuplicateKey)],
            },
            Case {
                name: "a quote that does not match the item is refused before anything else",
                items: &[("a", 0, 1)],
                holdings: &[],
                live_keys: &[],
                recorded: &[],
                batch: vec![wrong_price, wrong_currency],
                expected: vec![Rejected(InvalidOrder), Rejected(InvalidOrder)],
            },
            Case {
                name: "recorded orders, unknown items and second copies are not judged",
                items: &[("a", 1, 1)],
                holdings: &[],
                live_keys: &[],
                recorded: &[1],
                batch: vec![
                    placed(1, "ann", "a", 1, "k"),
                    placed(2, "bob", "nope", 1, "k"),
                    placed(3, "cat", "a", 1, "k"),
                    placed(3, "cat", "a", 1, "k"),
                ],
                expected: vec![NotJudged, NotJudged, Held, NotJudged],
            },
            Case {
                name: "items are judged apart",
                items: &[("a", 1, 1), ("b", 1, 1)],
                holdings: &[],
                live_keys: &[],
                recorded: &[],
                batch: vec![
                    placed(1, "ann", "b", 1, "k"),
                    placed(2, "ann", "a", 1, "k"),
                    placed(3, "bob", "a", 1, "k"),
                ],
                expected: vec![Held, Held, Rejected(SoldOut)],
            },
        ]
    }

    #[test]
    fn each_case_gets_its_verdicts_and_takes_exactly_what_it_held() {
        for case in cases() {
            let mut terms = terms(case.items);
            for (item, user, quantity) in case.holdings {
                let limit = terms.items[*item].per_user_limit;
                terms.holdings.insert(((*item).into(), (*user).into()), (*quantity, limit));
            }
            for (user, item, key) in case.live_keys {
                terms.live_keys.insert(((*user).into(), (*item).into(), (*key).into()));
            }
            let before = terms.clone();
            let recorded: HashSet<Uuid> = case.recorded.iter().map(|n| Uuid::from_u128(*n)).collect();
            let judgement = judge(&case.batch, &recorded, &mut terms);
            assert_eq!(judgement.verdicts, case.expected, "{}", case.name);

            // What was taken and held is exactly the held orders' units.
            let mut taken: BTreeMap<&str, i32> = BTreeMap::new();
            let mut held: BTreeMap<(&str, &str), i32> = BTreeMap::new();
            for (placed, verdict) in case.batch.iter().zip(&judgement.verdicts) {
                if *verdict == Held {
                    *taken.entry(placed.item_id.as_str()).or_default() += placed.quantity;
                    *held.entry((placed.item_id.as_str(), placed.user_id.as_str())).or_default() += placed.quantity;
                }
            }
            assert_eq!(judgement.taken, taken, "{}", case.name);
            let added: BTreeMap<(&str, &str), i32> = judgement.held.iter().map(|(k, (q, _))| (*k, *q)).collect();
            assert_eq!(added, held, "{}", case.name);
            for (id, item) in &terms.items {
                let left = before.items[id].remaining - taken.get(id.as_str()).copied().unwrap_or(0);
                assert_eq!(item.remaining, left, "{}: {id}", case.name);
                assert!(item.remaining >= 0, "{}: {id} oversold", case.name);
            }
            for ((item, _), (quantity, limit)) in &terms.holdings {
                assert!(*quantity <= *limit, "{}: a buyer of {item} above the limit", case.name);
            }
        }
    }
}
