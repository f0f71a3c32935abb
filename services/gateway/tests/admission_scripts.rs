//! The contract of each Lua script (`src/lua/`), pinned against a real Redis
//! (`REDIS_URL`, default 127.0.0.1:6379) through `Admission`, the only code
//! that runs them. Every test has a key prefix of its own and removes its keys.
//! The key schema these scripts share is in `services/DESIGN.md`, "Redis keys".

use std::time::{Duration, Instant};

use flashsale_gateway::admission::{Admission, Admit, Spread};
use flashsale_proto::common::v1::{Order, OrderStatus};
use flashsale_proto::inventory::v1::{AdmittedKey, BuyerHolding, OrderEvent, StreamAdmissionSnapshotResponse};

const ITEM: &str = "drop";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// An `Admission` on a prefix of its own; its keys go when the test ends.
struct Scripts {
    admission: Admission,
    prefix: String,
    /// The item's stock buckets.
    buckets: u32,
}

impl Scripts {
    async fn connect() -> anyhow::Result<Self> {
        let prefix = format!("fs-lua-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Ok(Self { admission: Admission::connect(&[&redis_url()], false, &prefix).await?, prefix, buckets: 1 })
    }

    /// The same, for an item spread over `buckets` stock buckets.
    async fn bucketed(buckets: u32) -> anyhow::Result<Self> {
        Ok(Self { buckets, ..Self::connect().await? })
    }

    fn spread(&self) -> Spread<'static> {
        Spread::new(ITEM, self.buckets)
    }

    /// The item's state, as inventory's snapshot would give it.
    async fn rebuild(&self, version: u64, stock: u32, holdings: &[(&str, u32, &str)]) -> anyhow::Result<bool> {
        self.rebuild_with_keys(version, stock, holdings, &[]).await
    }

    async fn rebuild_with_keys(
        &self,
        version: u64,
        stock: u32,
        holdings: &[(&str, u32, &str)],
        keys: &[(&str, &str, &str, u32)],
    ) -> anyhow::Result<bool> {
        // In three pieces, as inventory streams it: the item, the holdings, the keys.
        let header = StreamAdmissionSnapshotResponse {
            item_id: ITEM.into(),
            stock_remaining: stock,
            per_user_limit: 2,
            item_version: version,
            ..Default::default()
        };
        let holdings = StreamAdmissionSnapshotResponse {
            holdings: holdings
                .iter()
                .map(|(user, quantity, in_flight)| BuyerHolding {
                    user_id: (*user).into(),
                    quantity: *quantity,
                    in_flight_order_id: (*in_flight).into(),
                })
                .collect(),
            ..Default::default()
        };
        let keys = StreamAdmissionSnapshotResponse {
            admitted_keys: keys
                .iter()
                .map(|(user, key, order, quantity)| AdmittedKey {
                    user_id: (*user).into(),
                    idempotency_key: (*key).into(),
                    order_id: (*order).into(),
                    quantity: *quantity,
                })
                .collect(),
            complete: true,
            ..Default::default()
        };
        let Some(lease) = self.admission.begin_rebuild(self.spread()).await? else { return Ok(false) };
        let pieces = futures::stream::iter([Ok(header), Ok(holdings), Ok(keys)]);
        Ok(self.admission.rebuild(self.spread(), &lease, pieces).await? > 0)
    }

    async fn admit(&self, user: &str, quantity: u32, key: &str, order: &str) -> anyhow::Result<Admit> {
        Ok(self.admission.admit(self.spread(), user, quantity, 2, key, order).await?)
    }

    /// The event of `(order, user, quantity)` reaching `status`.
    async fn final_state(
        &self,
        (order, user, quantity): (&str, &str, u32),
        status: OrderStatus,
        reason: &str,
        units_released: u32,
        item_version: u64,
    ) -> anyhow::Result<String> {
        let event = OrderEvent {
            order: Some(Order {
                id: order.into(),
                user_id: user.into(),
                item_id: ITEM.into(),
                quantity,
                status: status.into(),
                reject_reason: reason.into(),
                ..Order::default()
            }),
            units_released,
            occurred_at: None,
            item_version,
        };
        Ok(self.admission.apply_event(self.spread(), &event).await?)
    }

    async fn tokens(&self) -> anyhow::Result<Option<i64>> {
        Ok(self.admission.tokens(self.spread()).await?)
    }

    async fn open_orders(&self) -> anyhow::Result<Vec<String>> {
        let mut open: Vec<String> = self
            .admission
            .unsettled_before(self.spread(), i64::MAX)
            .await?
            .into_iter()
            .map(|(order, ..)| order)
            .collect();
        open.sort();
        Ok(open)
    }

    async fn remove_keys(self) -> anyhow::Result<()> {
        let mut conn = redis::Client::open(redis_url())?.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", self.prefix)).query_async(&mut conn).await?;
        if !keys.is_empty() {
            let () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
        }
        Ok(())
    }
}

/// `admit.lua`: every outcome, in the order a sale meets them.
#[tokio::test]
async fn admit_gives_each_outcome_once_its_condition_holds() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    assert_eq!(s.admit("ann", 1, "k1", "o1").await?, Admit::NotReady, "no state yet: rebuild first");
    assert!(s.rebuild(1, 3, &[]).await?);
    assert!(!s.rebuild(1, 99, &[]).await?, "a second rebuild leaves the state alone");
    assert_eq!(s.tokens().await?, Some(3));

    assert_eq!(s.admit("ann", 1, "k1", "o1").await?, Admit::Reserved { tokens_left: 2 });
    assert_eq!(
        s.admit("ann", 1, "k1", "o-retry").await?,
        Admit::Duplicate { order_id: "o1".into(), quantity: 1 },
        "the same key names the first order"
    );
    assert_eq!(s.admit("ann", 1, "k2", "o2").await?, Admit::InProgress { order_id: "o1".into() });
    assert_eq!(s.open_orders().await?, ["o1"]);

    assert_eq!(s.final_state(("o1", "ann", 1), OrderStatus::Confirmed, "", 0, 2).await?, "APPLIED");
    assert!(s.open_orders().await?.is_empty(), "a final order is no longer open");
    assert_eq!(s.admit("ann", 2, "k2", "o2").await?, Admit::LimitReached, "1 held + 2 > limit 2");
    assert_eq!(s.admit("bob", 2, "k1", "o3").await?, Admit::Reserved { tokens_left: 0 });
    assert_eq!(s.admit("cat", 1, "k1", "o4").await?, Admit::SoldOut);
    assert_eq!(s.tokens().await?, Some(0), "a refusal takes nothing");
    s.remove_keys().await
}

/// `apply_event.lua`: at most once per (order, status); a rejection after
/// admission gives the units back unless PostgreSQL said SOLD_OUT; a refund
/// gives them back; a confirmation keeps them taken.
#[tokio::test]
async fn apply_event_is_idempotent_and_returns_exactly_the_released_units() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    assert!(s.rebuild(1, 4, &[]).await?);
    s.admit("ann", 2, "k", "o1").await?;
    s.admit("bob", 1, "k", "o2").await?;
    s.admit("cat", 1, "k", "o3").await?;
    assert_eq!(s.tokens().await?, Some(0));

    // Refused for funds: both units back, once.
    assert_eq!(s.final_state(("o1", "ann", 2), OrderStatus::Rejected, "INSUFFICIENT_FUNDS", 2, 2).await?, "APPLIED");
    assert_eq!(s.final_state(("o1", "ann", 2), OrderStatus::Rejected, "INSUFFICIENT_FUNDS", 2, 2).await?, "DUPLICATE");
    assert_eq!(s.tokens().await?, Some(2));
    assert_eq!(s.admit("ann", 2, "k-again", "o4").await?, Admit::Reserved { tokens_left: 0 }, "her count went too");

    // PostgreSQL had no unit for it: the token stays consumed (Redis was over).
    assert_eq!(s.final_state(("o2", "bob", 1), OrderStatus::Rejected, "SOLD_OUT", 0, 3).await?, "APPLIED");
    assert_eq!(s.tokens().await?, Some(0));

    // Confirmed, then refunded: the unit comes back with the refund only.
    assert_eq!(s.final_state(("o3", "cat", 1), OrderStatus::Confirmed, "", 0, 4).await?, "APPLIED");
    assert_eq!(s.tokens().await?, Some(0));
    assert_eq!(s.final_state(("o3", "cat", 1), OrderStatus::Refunded, "", 1, 5).await?, "APPLIED");
    assert_eq!(s.final_state(("o3", "cat", 1), OrderStatus::Refunded, "", 1, 5).await?, "DUPLICATE");
    assert_eq!(s.tokens().await?, Some(1));
    assert_eq!(
        s.admit("cat", 2, "k2", "o5").await?,
        Admit::NotEnoughStock { units_left: 1 },
        "one token left, not two: not sold out"
    );
    assert_eq!(s.admit("cat", 1, "k2", "o5").await?, Admit::Reserved { tokens_left: 0 });

    // Not a final state: nothing to undo.
    assert_eq!(s.final_state(("o5", "cat", 1), OrderStatus::Pending, "", 0, 6).await?, "IGNORED");
    assert_eq!(s.open_orders().await?, ["o4", "o5"]);
    s.remove_keys().await
}

/// `unadmit.lua`: undoes exactly one admission whose message never reached
/// the broker, so the same key starts afresh; a second call changes nothing.
#[tokio::test]
async fn unadmit_undoes_one_admission_once() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    assert!(s.rebuild(1, 2, &[]).await?);
    s.admit("ann", 2, "k", "o1").await?;
    s.admission.unadmit(s.spread(), "o1", "ann", "k").await?;
    assert_eq!(s.tokens().await?, Some(2));
    s.admission.unadmit(s.spread(), "o1", "ann", "k").await?;
    assert_eq!(s.tokens().await?, Some(2), "idempotent");
    assert!(s.open_orders().await?.is_empty());
    assert_eq!(
        s.admit("ann", 2, "k", "o2").await?,
        Admit::Reserved { tokens_left: 0 },
        "the key, the in-flight mark and the count are gone"
    );
    s.remove_keys().await
}

/// `rebuild.lua`: the state comes from the snapshot (tokens, counts, in-flight
/// marks, every recorded key), and events that arrived while the state was
/// missing are parked, then applied by the rebuild when the snapshot predates
/// them and ignored when it already contains them.
#[tokio::test]
async fn rebuild_restores_the_snapshot_and_applies_parked_events() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    // Redis lost everything; two events arrive before any gateway rebuilds.
    assert_eq!(s.final_state(("o1", "ann", 1), OrderStatus::Rejected, "INSUFFICIENT_FUNDS", 1, 8).await?, "PARKED");
    assert_eq!(s.final_state(("o2", "bob", 1), OrderStatus::Confirmed, "", 0, 6).await?, "PARKED");
    // The snapshot (version 7) predates o1's rejection (version 8): ann still
    // holds o1 in flight there, bob's o2 is in flight too.
    assert!(
        s.rebuild_with_keys(
            7,
            0,
            &[("ann", 1, "o1"), ("bob", 1, "o2"), ("cat", 1, "")],
            &[("ann", "ka", "o1", 1), ("cat", "kc", "o0", 1)],
        )
        .await?
    );
    assert_eq!(s.tokens().await?, Some(1), "o1's unit, released after the snapshot, is back");
    assert_eq!(s.admit("ann", 1, "kb", "o3").await?, Admit::Reserved { tokens_left: 0 }, "ann is free again");
    // bob's o2 was confirmed at version 6, which the snapshot contains: his
    // in-flight mark goes, his unit stays held, and no unit is left for him.
    assert_eq!(s.admit("bob", 1, "kb", "o4").await?, Admit::SoldOut);
    assert_eq!(
        s.admit("cat", 1, "kc", "o5").await?,
        Admit::Duplicate { order_id: "o0".into(), quantity: 1 },
        "a recorded key names its order after the rebuild"
    );
    // The parked events count as applied.
    assert_eq!(s.final_state(("o1", "ann", 1), OrderStatus::Rejected, "INSUFFICIENT_FUNDS", 1, 8).await?, "DUPLICATE");
    s.remove_keys().await
}

/// `resync.lua`: raises tokens to PostgreSQL's count only when nothing is in
/// flight, and never lowers them.
#[tokio::test]
async fn resync_raises_tokens_only_when_nothing_is_in_flight() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    assert_eq!(s.admission.resync(s.spread(), 5).await?, 0, "no state: nothing to raise");
    assert!(s.rebuild(1, 1, &[]).await?);
    s.admit("ann", 1, "k", "o1").await?;
    assert_eq!(s.admission.resync(s.spread(), 3).await?, 0, "o1 is in flight");
    s.final_state(("o1", "ann", 1), OrderStatus::Confirmed, "", 0, 2).await?;
    assert_eq!(s.admission.resync(s.spread(), 2).await?, 2);
    assert_eq!(s.tokens().await?, Some(2));
    assert_eq!(s.admission.resync(s.spread(), 1).await?, 0, "never lowers");
    assert_eq!(s.tokens().await?, Some(2));
    s.remove_keys().await
}

/// `claim_republish.lua`: one claim at a time for all callers, the next one
/// only after the grace, the one after that only after twice the grace.
#[tokio::test]
async fn claim_republish_waits_longer_after_each_publish() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    let other = Admission::connect(&[&redis_url()], false, &s.prefix).await?; // a second gateway
    let grace = Duration::from_millis(150);
    let grace_ms = 150;
    assert!(s.rebuild(1, 1, &[]).await?);
    s.admit("ann", 1, "k", "o1").await?;

    let before_first = Instant::now();
    assert!(s.admission.claim_republish(Spread::new(ITEM, 1), "ann", "o1", grace_ms).await?);
    assert!(!other.claim_republish(Spread::new(ITEM, 1), "ann", "o1", grace_ms).await?, "another gateway waits too");
    assert!(other.claim_republish(Spread::new(ITEM, 1), "ann", "o2", grace_ms).await?, "each order has its own claim");
    // The script reads the clock inside the call: the bounds below take the
    // instant before the earlier claim's call and after the later one's, less
    // the clock's whole milliseconds (it may round each reading down by 1 ms).
    let slack = Duration::from_millis(2);
    let (before_second, after_second) = next_claim(&other, "o1", grace_ms).await?;
    assert!(after_second - before_first + slack >= grace, "claimed again after {:?}", after_second - before_first);
    let (_, after_third) = next_claim(&s.admission, "o1", grace_ms).await?;
    assert!(
        after_third - before_second + slack >= 2 * grace,
        "claimed a third time after {:?}",
        after_third - before_second
    );
    s.remove_keys().await
}

/// Tries to claim until it succeeds: the instants just before and after the
/// call that did.
async fn next_claim(admission: &Admission, order: &str, grace_ms: i64) -> anyhow::Result<(Instant, Instant)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = Instant::now();
        if admission.claim_republish(Spread::new(ITEM, 1), "ann", order, grace_ms).await? {
            return Ok((before, Instant::now()));
        }
        anyhow::ensure!(Instant::now() < deadline, "{order} never claimed again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `count` buyers bound to `bucket` of the item of `s`.
fn buyers_in(s: &Scripts, bucket: u32, count: usize) -> Vec<String> {
    (0..).map(|n| format!("buyer-{n}")).filter(|user| s.spread().bucket_of(user) == bucket).take(count).collect()
}

/// A raw connection, for what only a crash leaves behind.
async fn raw() -> anyhow::Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(redis_url())?.get_multiplexed_async_connection().await?)
}

/// Buckets: a buyer whose bucket is dry borrows from the others (`lend.lua`,
/// then `admit.lua` with the loan), so buyers who all hash to one bucket still
/// buy the whole stock, and no loan stays open.
#[tokio::test]
async fn a_dry_bucket_borrows_until_the_whole_item_is_sold() -> anyhow::Result<()> {
    let s = Scripts::bucketed(4).await?;
    assert!(s.rebuild(1, 8, &[]).await?);
    assert_eq!(s.tokens().await?, Some(8));
    let buyers = buyers_in(&s, 0, 9);
    for (n, buyer) in buyers.iter().take(8).enumerate() {
        let decided = s.admit(buyer, 1, "k", &format!("o{n}")).await?;
        assert!(matches!(decided, Admit::Reserved { .. }), "{buyer}: {decided:?}");
    }
    assert_eq!(s.admit(&buyers[8], 1, "k", "o8").await?, Admit::SoldOut);
    assert_eq!(s.tokens().await?, Some(0));
    // Each reservation is in its buyer's bucket: the buyer's retry finds it.
    assert_eq!(s.admit(&buyers[0], 1, "k", "o-retry").await?, Admit::Duplicate { order_id: "o0".into(), quantity: 1 });
    assert_eq!(s.open_orders().await?.len(), 8);
    let settled = s.admission.settle_loans(s.spread(), i64::MAX).await?;
    assert_eq!((settled.received, settled.repaid), (0, 0), "every loan was closed by its attempt");
    // Units given back go to the buyer's own bucket, and are sold again.
    s.final_state(("o3", &buyers[3], 1), OrderStatus::Rejected, "INSUFFICIENT_FUNDS", 1, 2).await?;
    assert_eq!(s.tokens().await?, Some(1));
    let other = buyers_in(&s, 2, 1).remove(0);
    assert!(matches!(s.admit(&other, 1, "k", "o9").await?, Admit::Reserved { .. }));
    assert_eq!(s.tokens().await?, Some(0));
    s.remove_keys().await
}

/// Buckets: a rebuild spreads PostgreSQL's remaining units evenly, puts each
/// buyer's holdings and keys in the buyer's bucket, and a bucket rebuilt alone
/// gets what the others do not offer.
#[tokio::test]
async fn a_rebuild_spreads_the_stock_and_each_buyer_keeps_their_bucket() -> anyhow::Result<()> {
    let s = Scripts::bucketed(4).await?;
    let ann = buyers_in(&s, 1, 1).remove(0);
    let bob = buyers_in(&s, 3, 1).remove(0);
    assert!(s.rebuild_with_keys(5, 10, &[(&ann, 2, ""), (&bob, 1, "o-bob")], &[(&ann, "k", "o-ann", 2)]).await?);
    assert_eq!(s.tokens().await?, Some(10));
    assert_eq!(s.admit(&ann, 1, "k2", "o1").await?, Admit::LimitReached);
    assert_eq!(s.admit(&ann, 2, "k", "o2").await?, Admit::Duplicate { order_id: "o-ann".into(), quantity: 2 });
    assert_eq!(s.admit(&bob, 1, "k", "o3").await?, Admit::InProgress { order_id: "o-bob".into() });
    // Redis loses bucket 1 alone (a shard's failover): only it is rebuilt, with
    // the units the other buckets do not offer.
    let mut conn = raw().await?;
    let () = redis::cmd("DEL").arg(format!("{}:{{{ITEM}/1}}:ready", s.prefix)).query_async(&mut conn).await?;
    assert_eq!(s.tokens().await?, None);
    let carol = buyers_in(&s, 2, 1).remove(0);
    assert_eq!(s.admit(&carol, 1, "k", "o4").await?, Admit::Reserved { tokens_left: 1 });
    assert!(s.rebuild(6, 9, &[]).await?);
    assert_eq!(s.tokens().await?, Some(9));
    s.remove_keys().await
}

/// Buckets: a loan whose attempt never closed it (its gateway died between
/// `lend.lua` and `admit.lua`) is settled by the reconciler's sweep: credited
/// to the borrower once, or repaid to the lender if the borrower lost its state.
#[tokio::test]
async fn a_loan_left_open_by_a_crash_is_settled_once() -> anyhow::Result<()> {
    let s = Scripts::bucketed(2).await?;
    assert!(s.rebuild(1, 4, &[]).await?);
    let mut conn = raw().await?;
    let key = |bucket: u32, part: &str| match bucket {
        0 => format!("{}:{{{ITEM}}}:{part}", s.prefix),
        _ => format!("{}:{{{ITEM}/{bucket}}}:{part}", s.prefix),
    };
    let lent_at = flashsale_domain::time::now_ms() - 10_000;
    // What lend.lua leaves: a unit out of bucket 1, journaled there for bucket 0.
    let crash = |loan: &'static str| {
        redis::pipe()
            .cmd("DECRBY")
            .arg(key(1, "tokens"))
            .arg(1)
            .ignore()
            .cmd("HSET")
            .arg(key(1, "lent"))
            .arg(loan)
            .arg(format!("0\n1\n{lent_at}"))
            .ignore()
            .clone()
    };
    let () = crash("loan-1").query_async(&mut conn).await?;
    assert_eq!(s.tokens().await?, Some(3), "the unit is in the journal only");
    let young = s.admission.settle_loans(s.spread(), lent_at).await?;
    assert_eq!((young.received, young.repaid), (0, 0), "a loan within the grace is left to its attempt");
    let settled = s.admission.settle_loans(s.spread(), i64::MAX).await?;
    assert_eq!((settled.received, settled.repaid), (1, 0));
    assert_eq!(s.tokens().await?, Some(4));
    let again = s.admission.settle_loans(s.spread(), i64::MAX).await?;
    assert_eq!((again.received, again.repaid), (0, 0), "settled once");
    assert_eq!(s.tokens().await?, Some(4));

    // The borrower lost its state: the unit goes back to the lender.
    let () = crash("loan-2").query_async(&mut conn).await?;
    let () = redis::cmd("DEL").arg(key(0, "ready")).query_async(&mut conn).await?;
    let settled = s.admission.settle_loans(s.spread(), i64::MAX).await?;
    assert_eq!((settled.received, settled.repaid), (0, 1));
    let lender: i64 = redis::cmd("GET").arg(key(1, "tokens")).query_async(&mut conn).await?;
    assert_eq!(lender, 1, "repaid");
    s.remove_keys().await
}

/// Buckets: `resync` raises the item to PostgreSQL's count across all its
/// buckets, only while no bucket has anything in flight.
#[tokio::test]
async fn resync_counts_every_bucket() -> anyhow::Result<()> {
    let s = Scripts::bucketed(3).await?;
    assert!(s.rebuild(1, 3, &[]).await?);
    let ann = buyers_in(&s, 2, 1).remove(0);
    s.admit(&ann, 1, "k", "o1").await?;
    assert_eq!(s.admission.resync(s.spread(), 5).await?, 0, "o1 is in flight in bucket 2");
    s.final_state(("o1", &ann, 1), OrderStatus::Confirmed, "", 0, 2).await?;
    assert_eq!(s.tokens().await?, Some(2));
    assert_eq!(s.admission.resync(s.spread(), 5).await?, 3);
    assert_eq!(s.tokens().await?, Some(5));
    assert_eq!(s.admission.resync(s.spread(), 4).await?, 0, "never lowers");
    s.remove_keys().await
}

/// `admit.lua`: a request for more units than are left is refused with the
/// units left, and is no sign that the item is sold out: a smaller request
/// buys them (review defect: stock 3, two sold, a request for 2 answered
/// SOLD_OUT and the gateway turned every later buyer away).
#[tokio::test]
async fn a_request_for_more_than_is_left_leaves_the_rest_on_sale() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    assert!(s.rebuild(1, 3, &[]).await?);
    assert_eq!(s.admit("ann", 1, "k", "o1").await?, Admit::Reserved { tokens_left: 2 });
    assert_eq!(s.admit("ben", 1, "k", "o2").await?, Admit::Reserved { tokens_left: 1 });
    assert_eq!(s.admit("cid", 2, "k", "o3").await?, Admit::NotEnoughStock { units_left: 1 });
    assert_eq!(s.tokens().await?, Some(1), "nothing taken");
    assert_eq!(s.admit("cid", 1, "k", "o4").await?, Admit::Reserved { tokens_left: 0 }, "the refusal kept no key");
    assert_eq!(s.admit("dot", 1, "k", "o5").await?, Admit::SoldOut);
    assert_eq!(s.open_orders().await?, ["o1", "o2", "o4"]);
    s.remove_keys().await
}

/// Buckets: an attempt gathers the units it lacks from as many lenders as it
/// takes (each lends what it has, up to what is missing); when all buckets
/// together hold too few, the lenders are repaid and the buyer learns how many
/// are left, and no loan stays open either way.
#[tokio::test]
async fn a_bucket_borrows_from_several_lenders_and_repays_them_when_short() -> anyhow::Result<()> {
    let s = Scripts::bucketed(4).await?;
    // 1 unit in each bucket.
    assert!(s.rebuild(1, 4, &[]).await?);
    let zero = buyers_in(&s, 0, 2);
    let three = buyers_in(&s, 3, 2);
    // Buckets 0 and 3 sell their own unit: 0, 1, 1, 0 left.
    assert!(matches!(s.admit(&zero[0], 1, "k", "o1").await?, Admit::Reserved { .. }));
    assert!(matches!(s.admit(&three[0], 1, "k", "o2").await?, Admit::Reserved { .. }));
    assert_eq!(s.tokens().await?, Some(2));
    // Bucket 0 is dry and no single lender has 2: buckets 1 and 2 lend one each.
    assert!(matches!(s.admit(&zero[1], 2, "k", "o3").await?, Admit::Reserved { .. }));
    assert_eq!(s.tokens().await?, Some(0));
    // A unit comes back in bucket 3; asking for 2 gathers only 1 in all.
    s.final_state(("o2", &three[0], 1), OrderStatus::Rejected, "INSUFFICIENT_FUNDS", 1, 2).await?;
    s.final_state(("o1", &zero[0], 1), OrderStatus::Confirmed, "", 0, 3).await?;
    assert_eq!(s.admit(&zero[0], 2, "k2", "o4").await?, Admit::LimitReached, "holds 1, limit 2");
    let short = buyers_in(&s, 1, 1).remove(0);
    assert_eq!(s.admit(&short, 2, "k", "o5").await?, Admit::NotEnoughStock { units_left: 1 });
    assert_eq!(s.tokens().await?, Some(1), "the lender was repaid");
    let settled = s.admission.settle_loans(s.spread(), i64::MAX).await?;
    assert_eq!((settled.received, settled.repaid), (0, 0), "no loan left open");
    assert!(matches!(s.admit(&short, 1, "k", "o6").await?, Admit::Reserved { .. }));
    assert_eq!(s.admit(&three[1], 1, "k", "o7").await?, Admit::SoldOut, "every bucket dry");
    assert_eq!(s.open_orders().await?, ["o3", "o6"]);
    s.remove_keys().await
}

/// `lend.lua` run twice under one loan id (a Redis Cluster client resends a
/// command whose reply a dropped connection lost) takes the units once, and
/// the second run reports the same loan.
#[tokio::test]
async fn lend_is_idempotent_per_loan() -> anyhow::Result<()> {
    let s = Scripts::bucketed(2).await?;
    assert!(s.rebuild(1, 6, &[]).await?);
    let mut conn = raw().await?;
    let key = |part: &str| format!("{}:{{{ITEM}/1}}:{part}", s.prefix);
    let lend = redis::Script::new(include_str!("../src/lua/lend.lua"));
    let run = || {
        let mut invocation = lend.prepare_invoke();
        invocation.key(key("ready")).key(key("tokens")).key(key("lent")).arg("loan-1").arg(2).arg(0).arg(1);
        invocation
    };
    let first: (String, u32) = run().invoke_async(&mut conn).await?;
    let resent: (String, u32) = run().invoke_async(&mut conn).await?;
    assert_eq!(first, ("LENT".to_owned(), 2));
    assert_eq!(resent, first, "the resend reports the same loan");
    let tokens: i64 = redis::cmd("GET").arg(key("tokens")).query_async(&mut conn).await?;
    assert_eq!(tokens, 1, "3 - 2, taken once");
    // No attempt closed the loan: the sweep credits it to the borrower once,
    // and the item ends with all 6 units, not 4.
    let settled = s.admission.settle_loans(s.spread(), i64::MAX).await?;
    assert_eq!((settled.received, settled.repaid), (1, 0));
    assert_eq!(s.tokens().await?, Some(6));
    s.remove_keys().await
}

/// `apply_event.lua`: the reconciler's replay of a final state (version 0)
/// that changes nothing leaves no mark, so the genuine event still gives the
/// refund's units back; and a parked copy keeps the highest version.
#[tokio::test]
async fn a_replayed_event_does_not_swallow_the_genuine_one() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    assert!(s.rebuild(1, 2, &[]).await?);
    s.admit("ann", 1, "k", "o1").await?;
    assert_eq!(s.final_state(("o1", "ann", 1), OrderStatus::Confirmed, "", 0, 5).await?, "APPLIED");
    assert_eq!(s.tokens().await?, Some(1));
    assert_eq!(s.final_state(("o1", "ann", 1), OrderStatus::Refunded, "", 1, 0).await?, "UNCHANGED");
    assert_eq!(s.final_state(("o1", "ann", 1), OrderStatus::Refunded, "", 1, 6).await?, "APPLIED");
    assert_eq!(s.tokens().await?, Some(2), "the refund's unit is back");
    assert_eq!(s.final_state(("o1", "ann", 1), OrderStatus::Refunded, "", 1, 6).await?, "DUPLICATE");
    assert_eq!(s.tokens().await?, Some(2));

    // The same while the state is missing: both copies park, the genuine one wins.
    let mut conn = raw().await?;
    let () = redis::cmd("DEL").arg(format!("{}:{{{ITEM}}}:ready", s.prefix)).query_async(&mut conn).await?;
    assert_eq!(s.final_state(("o2", "bob", 1), OrderStatus::Refunded, "", 1, 8).await?, "PARKED");
    assert_eq!(s.final_state(("o2", "bob", 1), OrderStatus::Refunded, "", 1, 0).await?, "PARKED");
    assert!(s.rebuild(7, 3, &[("bob", 1, "")]).await?);
    assert_eq!(s.tokens().await?, Some(4), "the snapshot's 3 and the refund after it");
    s.remove_keys().await
}

/// Buckets: two of four buckets lost (19, 19 present, 40 left in PostgreSQL):
/// the rebuilt ones share the 2 units the others do not offer, so Redis offers
/// all 40 (an earlier rule rebuilt each at 0 and stranded 2).
#[tokio::test]
async fn a_partial_rebuild_never_offers_fewer_units_than_postgresql_holds() -> anyhow::Result<()> {
    let s = Scripts::bucketed(4).await?;
    assert!(s.rebuild(1, 4, &[]).await?);
    let mut conn = raw().await?;
    let key = |bucket: u32, part: &str| match bucket {
        0 => format!("{}:{{{ITEM}}}:{part}", s.prefix),
        _ => format!("{}:{{{ITEM}/{bucket}}}:{part}", s.prefix),
    };
    let () = redis::pipe()
        .set(key(0, "tokens"), 19)
        .ignore()
        .set(key(1, "tokens"), 19)
        .ignore()
        .del(key(2, "ready"))
        .ignore()
        .del(key(3, "ready"))
        .ignore()
        .query_async(&mut conn)
        .await?;
    assert!(s.rebuild(2, 40, &[]).await?);
    assert_eq!(s.tokens().await?, Some(40));
    s.remove_keys().await
}

/// The streamed rebuild: a snapshot that breaks off leaves the bucket not
/// ready (buyers hear NOT_READY, not a half-built state) and gives its lease
/// up, so the next rebuild starts at once and restores everything.
#[tokio::test]
async fn a_snapshot_that_breaks_off_leaves_nothing_half_built() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    let header = StreamAdmissionSnapshotResponse {
        item_id: ITEM.into(),
        stock_remaining: 5,
        item_version: 3,
        ..Default::default()
    };
    let holding = StreamAdmissionSnapshotResponse {
        holdings: vec![BuyerHolding { user_id: "ann".into(), quantity: 2, in_flight_order_id: String::new() }],
        ..Default::default()
    };
    let lease = s.admission.begin_rebuild(s.spread()).await?.expect("the state is missing");
    let cut = futures::stream::iter([
        Ok(header),
        Ok(holding),
        Err(flashsale_gateway::error::GatewayError::Unavailable("link cut".into())),
    ]);
    assert!(s.admission.rebuild(s.spread(), &lease, cut).await.is_err());
    assert_eq!(s.tokens().await?, None, "not ready");
    assert_eq!(s.admit("bob", 1, "k", "o1").await?, Admit::NotReady);
    // The lease was given up: the next rebuild need not wait for it.
    let started = Instant::now();
    assert!(s.rebuild(4, 5, &[("ann", 2, "")]).await?);
    assert!(started.elapsed() < Duration::from_secs(5), "waited for a lease");
    assert_eq!(s.admit("ann", 1, "k", "o2").await?, Admit::LimitReached, "her holding was restored");
    assert_eq!(s.tokens().await?, Some(5));
    s.remove_keys().await
}

/// The streamed rebuild: two gateways rebuild at once; one holds the lease and
/// writes, the other waits for it and then finds the state ready.
#[tokio::test]
async fn a_second_rebuild_waits_for_the_one_holding_the_lease() -> anyhow::Result<()> {
    let s = Scripts::connect().await?;
    let lease = s.admission.begin_rebuild(s.spread()).await?.expect("the state is missing");
    let other = Admission::connect(&[&redis_url()], false, &s.prefix).await?;
    let waiting =
        tokio::spawn(async move { other.begin_rebuild(Spread::new(ITEM, 1)).await.map(|lease| lease.is_none()) });
    let whole = StreamAdmissionSnapshotResponse {
        item_id: ITEM.into(),
        stock_remaining: 7,
        item_version: 1,
        complete: true,
        ..Default::default()
    };
    assert_eq!(s.admission.rebuild(s.spread(), &lease, futures::stream::iter([Ok(whole)])).await?, 1);
    assert!(waiting.await??, "the second found the state rebuilt, and took no lease");
    assert_eq!(s.tokens().await?, Some(7));
    s.remove_keys().await
}
