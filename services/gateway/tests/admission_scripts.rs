//! The contract of each Lua script (`src/lua/`), pinned against a real Redis
//! (`REDIS_URL`, default 127.0.0.1:6379) through `Admission`, the only code
//! that runs them. Every test has a key prefix of its own and removes its keys.
//! The key schema these scripts share is in `services/DESIGN.md`, "Redis keys".

use std::time::{Duration, Instant};

use flashsale_gateway::admission::{Admission, Admit};
use flashsale_proto::common::v1::{Order, OrderStatus};
use flashsale_proto::inventory::v1::{AdmittedKey, BuyerHolding, GetAdmissionSnapshotResponse, OrderEvent};

const ITEM: &str = "drop";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// An `Admission` on a prefix of its own; its keys go when the test ends.
struct Scripts {
    admission: Admission,
    prefix: String,
}

impl Scripts {
    async fn connect() -> anyhow::Result<Self> {
        let prefix = format!("fs-lua-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Ok(Self { admission: Admission::connect(&[&redis_url()], false, &prefix).await?, prefix })
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
        let snapshot = GetAdmissionSnapshotResponse {
            item_id: ITEM.into(),
            stock_remaining: stock,
            per_user_limit: 2,
            holdings: holdings
                .iter()
                .map(|(user, quantity, in_flight)| BuyerHolding {
                    user_id: (*user).into(),
                    quantity: *quantity,
                    in_flight_order_id: (*in_flight).into(),
                })
                .collect(),
            item_version: version,
            taken_at: None,
            admitted_keys: keys
                .iter()
                .map(|(user, key, order, quantity)| AdmittedKey {
                    user_id: (*user).into(),
                    idempotency_key: (*key).into(),
                    order_id: (*order).into(),
                    quantity: *quantity,
                })
                .collect(),
        };
        Ok(self.admission.rebuild(&snapshot).await?)
    }

    async fn admit(&self, user: &str, quantity: u32, key: &str, order: &str) -> anyhow::Result<Admit> {
        Ok(self.admission.admit(ITEM, user, quantity, 2, key, order).await?)
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
        Ok(self.admission.apply_event(&event).await?)
    }

    async fn tokens(&self) -> anyhow::Result<Option<i64>> {
        Ok(self.admission.tokens(ITEM).await?)
    }

    async fn open_orders(&self) -> anyhow::Result<Vec<String>> {
        let mut open: Vec<String> =
            self.admission.unsettled_before(ITEM, i64::MAX).await?.into_iter().map(|(order, ..)| order).collect();
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
    assert_eq!(s.admit("cat", 2, "k2", "o5").await?, Admit::SoldOut, "one token left, not two");
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
    s.admission.unadmit(ITEM, "o1", "ann", "k").await?;
    assert_eq!(s.tokens().await?, Some(2));
    s.admission.unadmit(ITEM, "o1", "ann", "k").await?;
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
    assert_eq!(s.admission.resync(ITEM, 5).await?, 0, "no state: nothing to raise");
    assert!(s.rebuild(1, 1, &[]).await?);
    s.admit("ann", 1, "k", "o1").await?;
    assert_eq!(s.admission.resync(ITEM, 3).await?, 0, "o1 is in flight");
    s.final_state(("o1", "ann", 1), OrderStatus::Confirmed, "", 0, 2).await?;
    assert_eq!(s.admission.resync(ITEM, 2).await?, 2);
    assert_eq!(s.tokens().await?, Some(2));
    assert_eq!(s.admission.resync(ITEM, 1).await?, 0, "never lowers");
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
    assert!(s.admission.claim_republish(ITEM, "o1", grace_ms).await?);
    assert!(!other.claim_republish(ITEM, "o1", grace_ms).await?, "another gateway waits too");
    assert!(other.claim_republish(ITEM, "o2", grace_ms).await?, "each order has its own claim");
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
        if admission.claim_republish(ITEM, order, grace_ms).await? {
            return Ok((before, Instant::now()));
        }
        anyhow::ensure!(Instant::now() < deadline, "{order} never claimed again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
