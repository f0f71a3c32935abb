//! Admission state in Redis: the per-item stock tokens, per-buyer counts,
//! in-flight marks and idempotency keys, changed only by the Lua scripts in
//! `src/lua/`, each one atomic and touching only keys of one stock bucket (one
//! hash tag), so it runs unchanged on Redis Cluster. Key names, each script's
//! `KEYS` and the value encodings are `protocol.rs`'s; every key, its type, its
//! encoding and who writes and reads it: `services/DESIGN.md`, "Redis keys".
//!
//! An item's state lives in one bucket, or for an item too hot for one Redis
//! shard in several ([`Spread`]): each buyer is bound to one bucket by a hash
//! of the user id, so the buyer's limit, in-flight mark and keys stay in one
//! slot, and a bucket that runs dry borrows units from the others through a
//! journaled loan (`lend.lua`, [`Admission::settle_loans`]). The rules and why
//! they strand nothing: `services/DESIGN.md`, "Hot items: stock buckets".
//!
//! The hot path (`admit`) uses one multiplexed connection: concurrent
//! requests pipeline on it, where a pool would give each request a connection
//! of its own and wait a round trip per request (about half the rate when it
//! was measured against a bb8 pool on a two-core machine). Background work
//! (events, rebuilds, checks) uses connections of its own so its bulk commands
//! never queue in front of buyers' scripts. One server or a Redis Cluster:
//! `link.rs`.

use std::collections::HashSet;

use flashsale_proto::inventory::v1::{GetAdmissionSnapshotResponse, OrderEvent};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use self::protocol::{
    AdmittedEntry, LoanEntry, Part, PriorOrder, STAMP_FIELDS, Scripts, Slot, bucket_of, idem_field, idem_field_user,
    item_key, order_key,
};
use crate::catalog::AdmissionStamp;
use crate::error::GatewayError;

pub mod link;
mod protocol;

/// One bucket's part of an [`AdmissionStamp`], from the `STAMP_FIELDS` of its
/// `ready` hash (absent: 0).
fn stamp_of(version: Option<i64>, admissions: Option<i64>) -> (i64, i64) {
    (version.unwrap_or(0), admissions.unwrap_or(0))
}

/// An item as its admission state is laid out in Redis: its id and the number
/// of stock buckets (`Item.admission_buckets`, fixed when the item is created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread<'a> {
    pub item_id: &'a str,
    pub buckets: u32,
}

impl<'a> Spread<'a> {
    pub fn new(item_id: &'a str, buckets: u32) -> Self {
        Self { item_id, buckets: buckets.max(1) }
    }

    fn slot(self, bucket: u32) -> Slot<'a> {
        Slot { item_id: self.item_id, bucket }
    }

    /// The bucket (0..buckets) a buyer is bound to.
    pub fn bucket_of(self, user_id: &str) -> u32 {
        bucket_of(user_id, self.buckets)
    }

    /// The bucket a buyer's state lives in.
    fn home(self, user_id: &str) -> Slot<'a> {
        self.slot(self.bucket_of(user_id))
    }

    fn slots(self) -> impl Iterator<Item = Slot<'a>> {
        (0..self.buckets).map(move |bucket| self.slot(bucket))
    }

    /// The buckets a dry `home` asks for a loan, in order: the next ones round.
    fn lenders(self, home: Slot<'a>) -> impl Iterator<Item = Slot<'a>> {
        (1..self.buckets).map(move |step| self.slot((home.bucket + step) % self.buckets))
    }

    /// Bucket `bucket`'s share of `units` spread evenly (the first ones take the remainder).
    fn share(self, units: i64, bucket: u32) -> i64 {
        let buckets = i64::from(self.buckets);
        units / buckets + i64::from(i64::from(bucket) < units % buckets)
    }
}

/// One bucket's counts, as [`Admission::bucket_states`] reads them.
#[derive(Debug, Clone, Copy, Default)]
struct BucketState {
    /// Its `ready` hash exists.
    ready: bool,
    tokens: i64,
    /// Admissions not yet final.
    admitted: i64,
    /// Loans not yet closed.
    lent: i64,
}

/// What `lend.lua` said.
enum Lend {
    Lent,
    Dry,
    NotReady,
}

/// What one pass of [`Admission::settle_loans`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoansSettled {
    /// Loans whose units were credited to the borrower by the sweep.
    pub received: usize,
    /// Loans whose borrower had lost its state: the units went back to the lender.
    pub repaid: usize,
}

/// How long an admission record (what GetOrder shows before inventory has the order) lives.
const ORDER_RECORD_TTL_SECONDS: u64 = 24 * 3600;
/// The longest wait between two publishes of one unrecorded admission, in
/// multiples of the reconciler's grace.
pub const MAX_REPUBLISH_FACTOR: i64 = 8;

/// What the admission script decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    Reserved { tokens_left: i64 },
    Duplicate { order_id: String, quantity: u32 },
    InProgress { order_id: String },
    LimitReached,
    SoldOut,
    NotReady,
}

/// An admitted order as the gateway remembers it until inventory records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionRecord {
    pub order_id: String,
    pub user_id: String,
    pub item_id: String,
    pub quantity: u32,
    pub currency: String,
    pub amount_minor: i64,
    pub idempotency_key: String,
    pub created_at_ms: i64,
}

/// One attempt's arguments to `admit.lua`.
struct AdmitArgs<'a> {
    user_id: &'a str,
    quantity: u32,
    limit: u32,
    idempotency_key: &'a str,
    order_id: &'a str,
}

/// A bucket's answer as the item's: one bucket's tokens left say nothing of
/// the others', so a bucketed item never reports none left (no sold-out mark
/// from one bucket; that comes from an attempt every bucket turned down).
fn bucketed(item: Spread<'_>, decided: Admit) -> Admit {
    match decided {
        Admit::Reserved { tokens_left } if item.buckets > 1 => Admit::Reserved { tokens_left: tokens_left.max(1) },
        other => other,
    }
}

pub struct Admission {
    hot: link::Hot,
    background: link::Background,
    prefix: String,
    scripts: Scripts,
}

impl Admission {
    /// `redis_urls`: one server, or with `cluster` seed nodes of a Redis Cluster.
    pub async fn connect(redis_urls: &[&str], cluster: bool, prefix: &str) -> Result<Self, redis::RedisError> {
        let (hot, background) = link::connect(redis_urls, cluster).await?;
        Ok(Self { hot, background, prefix: prefix.to_owned(), scripts: Scripts::load() })
    }

    fn key(&self, slot: Slot<'_>, part: Part) -> String {
        item_key(&self.prefix, slot, part)
    }

    fn order_key(&self, order_id: &str) -> String {
        order_key(&self.prefix, order_id)
    }

    /// `flashsale_redis_pool_connections{state}` of the background pool (call when scraped).
    pub fn record_pool_state(&self) {
        let Some((idle, in_use)) = self.background.pool_state() else { return };
        metrics::gauge!("flashsale_redis_pool_connections", "state" => "idle").set(f64::from(idle));
        metrics::gauge!("flashsale_redis_pool_connections", "state" => "in_use").set(f64::from(in_use));
    }

    /// Readiness: Redis answers on the hot-path connection.
    pub async fn ping(&self) -> Result<(), GatewayError> {
        let mut conn = self.hot.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// One purchase attempt: one round trip in the buyer's bucket. A bucketed
    /// item whose bucket is dry for this buyer then borrows from the others,
    /// one at a time, and admits with the loan: two more round trips per
    /// lender asked. `SoldOut` only when every bucket is dry; `NotReady` when
    /// a bucket asked has lost its state (rebuild, then ask again).
    pub async fn admit(
        &self,
        item: Spread<'_>,
        user_id: &str,
        quantity: u32,
        limit: u32,
        idempotency_key: &str,
        order_id: &str,
    ) -> Result<Admit, GatewayError> {
        let home = item.home(user_id);
        let attempt = AdmitArgs { user_id, quantity, limit, idempotency_key, order_id };
        let first = self.admit_in(home, &attempt, None).await?;
        if item.buckets == 1 || first != Admit::SoldOut {
            return Ok(bucketed(item, first));
        }
        for lender in item.lenders(home) {
            let loan = uuid::Uuid::now_v7().simple().to_string();
            match self.lend(lender, &loan, quantity, home.bucket).await? {
                Lend::Dry => continue,
                // Its units are unknown until it is rebuilt: it may have some.
                Lend::NotReady => return Ok(Admit::NotReady),
                Lend::Lent => {}
            }
            // Fault tests: units taken from the lender, not yet in the borrower.
            flashsale_server::crash_point("gateway-after-loan");
            let outcome = self.admit_in(home, &attempt, Some((&loan, quantity))).await;
            // An error leaves the loan open: whether it was credited is unknown,
            // and the reconciler's sweep settles it either way.
            if let Ok(decided) = &outcome {
                let repay = *decided == Admit::NotReady;
                if let Err(e) = self.close_loan(lender, &loan, repay).await {
                    tracing::warn!(error = %e, item.id = %item.item_id, "could not close a stock loan; the reconciler will");
                }
            }
            return outcome.map(|decided| bucketed(item, decided));
        }
        Ok(Admit::SoldOut)
    }

    async fn admit_in(
        &self,
        slot: Slot<'_>,
        attempt: &AdmitArgs<'_>,
        loan: Option<(&str, u32)>,
    ) -> Result<Admit, GatewayError> {
        let (loan_id, loan_units) = loan.unwrap_or(("", 0));
        let (outcome, detail): (String, String) = self
            .scripts
            .admit
            .on(&self.prefix, slot)
            .arg(attempt.user_id)
            .arg(attempt.quantity)
            .arg(attempt.limit)
            .arg(attempt.idempotency_key)
            .arg(attempt.order_id)
            .arg(flashsale_domain::time::now_ms())
            .arg(loan_id)
            .arg(loan_units)
            .invoke_async(&mut self.hot.clone())
            .await?;
        let order_id = attempt.order_id;
        Ok(match outcome.as_str() {
            "RESERVED" => Admit::Reserved { tokens_left: detail.parse().unwrap_or(0) },
            "DUPLICATE" => {
                let prior = PriorOrder::decode(&detail).ok_or_else(|| {
                    GatewayError::Internal(format!("admission script's DUPLICATE detail {detail:?}").into())
                })?;
                if prior.order_id == order_id {
                    // This very attempt ran twice: a Redis Cluster client sends a
                    // command again after a dropped connection lost its reply. The
                    // first run reserved this order; how many units remain is not
                    // known (1: no sold-out mark from a guess).
                    Admit::Reserved { tokens_left: 1 }
                } else {
                    Admit::Duplicate { order_id: prior.order_id, quantity: prior.quantity }
                }
            }
            "IN_PROGRESS" => Admit::InProgress { order_id: detail },
            "LIMIT_REACHED" => Admit::LimitReached,
            "SOLD_OUT" => Admit::SoldOut,
            "NOT_READY" => Admit::NotReady,
            other => return Err(GatewayError::Internal(format!("admission script said {other:?}").into())),
        })
    }

    async fn lend(&self, lender: Slot<'_>, loan: &str, units: u32, borrower: u32) -> Result<Lend, GatewayError> {
        let said: String = self
            .scripts
            .lend
            .on(&self.prefix, lender)
            .arg(loan)
            .arg(units)
            .arg(borrower)
            .arg(flashsale_domain::time::now_ms())
            .invoke_async(&mut self.hot.clone())
            .await?;
        match said.as_str() {
            "LENT" => Ok(Lend::Lent),
            "DRY" => Ok(Lend::Dry),
            "NOT_READY" => Ok(Lend::NotReady),
            other => Err(GatewayError::Internal(format!("lend script said {other:?}").into())),
        }
    }

    /// Closes a loan in the lender's journal; `repay` gives the units back to it.
    async fn close_loan(&self, lender: Slot<'_>, loan: &str, repay: bool) -> Result<i64, GatewayError> {
        let mut conn = self.background.get().await?;
        let given_back: i64 = self
            .scripts
            .close_loan
            .on(&self.prefix, lender)
            .arg(loan)
            .arg(u8::from(repay))
            .invoke_async(&mut conn)
            .await?;
        Ok(given_back)
    }

    /// Settles the loans of `item` older than `older_than_ms` (unix ms) that no
    /// attempt closed (its gateway died, or lost Redis, between lending and
    /// admitting): each borrower that still has its state is credited the units
    /// unless it had them already; a borrower that lost its state was rebuilt
    /// without them, so the lender takes them back. Either way the loan closes,
    /// and no unit stays stranded in a journal.
    pub async fn settle_loans(&self, item: Spread<'_>, older_than_ms: i64) -> Result<LoansSettled, GatewayError> {
        let mut settled = LoansSettled::default();
        if item.buckets == 1 {
            return Ok(settled);
        }
        for lender in item.slots() {
            let loans: Vec<(String, String)> = {
                let mut conn = self.background.get().await?;
                conn.hgetall(self.key(lender, Part::Lent)).await?
            };
            for (loan, value) in loans {
                let Some(entry) = LoanEntry::decode(&value) else { continue };
                if entry.at_ms >= older_than_ms || entry.borrower >= item.buckets {
                    continue;
                }
                let mut conn = self.background.get().await?;
                let said: String = self
                    .scripts
                    .receive
                    .on(&self.prefix, item.slot(entry.borrower))
                    .arg(&loan)
                    .arg(entry.units)
                    .invoke_async(&mut conn)
                    .await?;
                drop(conn);
                let repay = said == "NOT_READY";
                self.close_loan(lender, &loan, repay).await?;
                match said.as_str() {
                    "NOT_READY" => settled.repaid += 1,
                    "RECEIVED" => settled.received += 1,
                    _ => {}
                }
            }
        }
        Ok(settled)
    }

    /// The order an earlier purchase under this buyer's key created, with its quantity.
    pub async fn prior_order(
        &self,
        item: Spread<'_>,
        user_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<(String, u32)>, GatewayError> {
        let idem = self.key(item.home(user_id), Part::Idem);
        let value: Option<String> = self.hot.clone().hget(idem, idem_field(user_id, idempotency_key)).await?;
        Ok(value.and_then(|value| PriorOrder::decode(&value)).map(|prior| (prior.order_id, prior.quantity)))
    }

    /// The buyers holding an idempotency key for the item (each admission made
    /// one), with the stamp they were read at, atomically per bucket. One HKEYS
    /// per bucket, bounded by the admissions the stock allowed; read when an
    /// item sells out, so the crowd's keyed attempts need no Redis read.
    /// `None` when a bucket's state is missing (Redis lost it): rebuild first.
    pub async fn key_holders(
        &self,
        item: Spread<'_>,
    ) -> Result<Option<(AdmissionStamp, HashSet<String>)>, GatewayError> {
        let mut conn = self.background.get().await?;
        let mut stamp = AdmissionStamp::default();
        let mut buyers = HashSet::new();
        for slot in item.slots() {
            let ((version, admissions), fields): ((Option<i64>, Option<i64>), Vec<String>) = redis::pipe()
                .atomic()
                .hmget(self.key(slot, Part::Ready), &STAMP_FIELDS)
                .hkeys(self.key(slot, Part::Idem))
                .query_async(&mut conn)
                .await?;
            if version.is_none() {
                return Ok(None);
            }
            stamp.buckets.push(stamp_of(version, admissions));
            buyers.extend(fields.iter().filter_map(|field| idem_field_user(field).map(str::to_owned)));
        }
        Ok(Some((stamp, buyers)))
    }

    /// The item's [`AdmissionStamp`]: one HMGET per bucket.
    pub async fn admission_stamp(&self, item: Spread<'_>) -> Result<AdmissionStamp, GatewayError> {
        let mut conn = self.background.get().await?;
        let mut stamp = AdmissionStamp::default();
        for slot in item.slots() {
            let (version, admissions): (Option<i64>, Option<i64>) =
                conn.hmget(self.key(slot, Part::Ready), &STAMP_FIELDS).await?;
            stamp.buckets.push(stamp_of(version, admissions));
        }
        Ok(stamp)
    }

    /// Makes every admission key of the item expire at `at_ms` (unix ms): the
    /// sale is over, and its state is kept only for the retention period.
    pub async fn expire_item(&self, item: Spread<'_>, at_ms: i64) -> Result<(), GatewayError> {
        let mut conn = self.background.get().await?;
        for slot in item.slots() {
            let mut pipe = redis::pipe();
            for part in Part::ALL {
                pipe.cmd("PEXPIREAT").arg(self.key(slot, part)).arg(at_ms).ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Undoes an admission whose order never reached the broker.
    pub async fn unadmit(
        &self,
        item: Spread<'_>,
        order_id: &str,
        user_id: &str,
        key: &str,
    ) -> Result<(), GatewayError> {
        let mut conn = self.background.get().await?;
        let _: i64 = self
            .scripts
            .unadmit
            .on(&self.prefix, item.home(user_id))
            .arg(order_id)
            .arg(user_id)
            .arg(key)
            .invoke_async(&mut conn)
            .await?;
        // The admission record stays (it expires): a concurrent retry under the same
        // key may have published this order and named it to the buyer already.
        Ok(())
    }

    /// Admissions of the item older than `older_than_ms` (unix ms) that no final
    /// event has settled yet: (order id, user, quantity, idempotency key).
    pub async fn unsettled_before(
        &self,
        item: Spread<'_>,
        older_than_ms: i64,
    ) -> Result<Vec<(String, String, u32, String)>, GatewayError> {
        let mut conn = self.background.get().await?;
        let mut open = Vec::new();
        for slot in item.slots() {
            let entries: Vec<(String, String)> = conn.hgetall(self.key(slot, Part::Admitted)).await?;
            open.extend(entries.into_iter().filter_map(|(order_id, value)| {
                let entry = AdmittedEntry::decode(&value)?;
                (entry.at_ms < older_than_ms).then_some((
                    order_id,
                    entry.user_id,
                    entry.quantity,
                    entry.idempotency_key,
                ))
            }));
        }
        Ok(open)
    }

    /// Claims, for all gateways at once, the next publish of the unrecorded
    /// admission `order_id` of buyer `user_id`: true when this caller may
    /// publish it now. After a publish the next one waits `grace`, then twice
    /// that, and so on up to [`MAX_REPUBLISH_FACTOR`] times `grace`
    /// (`lua/claim_republish.lua`).
    pub async fn claim_republish(
        &self,
        item: Spread<'_>,
        user_id: &str,
        order_id: &str,
        grace_ms: i64,
    ) -> Result<bool, GatewayError> {
        let mut conn = self.background.get().await?;
        let claimed: i64 = self
            .scripts
            .claim_republish
            .on(&self.prefix, item.home(user_id))
            .arg(order_id)
            .arg(flashsale_domain::time::now_ms())
            .arg(grace_ms)
            .arg(MAX_REPUBLISH_FACTOR)
            .invoke_async(&mut conn)
            .await?;
        Ok(claimed == 1)
    }

    /// The admission of `order_id` among the open ones of `items`, as
    /// (item id, user, quantity, admitted at ms, idempotency key). The admission
    /// script writes it with the reservation itself, so it exists even when the
    /// separate admission record could not be saved; it goes once the order is final.
    pub async fn admitted_entry(
        &self,
        items: &[Spread<'_>],
        order_id: &str,
    ) -> Result<Option<(String, String, u32, i64, String)>, GatewayError> {
        let mut conn = self.background.get().await?;
        for item in items {
            for slot in item.slots() {
                let value: Option<String> = conn.hget(self.key(slot, Part::Admitted), order_id).await?;
                if let Some(entry) = value.as_deref().and_then(AdmittedEntry::decode) {
                    let AdmittedEntry { user_id, quantity, at_ms, idempotency_key } = entry;
                    return Ok(Some((item.item_id.to_owned(), user_id, quantity, at_ms, idempotency_key)));
                }
            }
        }
        Ok(None)
    }

    /// Applies a final order state to the admission state of the buyer's
    /// bucket (idempotent).
    pub async fn apply_event(&self, item: Spread<'_>, event: &OrderEvent) -> Result<String, GatewayError> {
        let order = event.order.as_ref().ok_or_else(|| GatewayError::invalid("order", "missing in event"))?;
        let status = flashsale_proto::common::v1::OrderStatus::try_from(order.status)
            .map_err(|_| GatewayError::invalid("order.status", "unknown"))?;
        let status = match status {
            flashsale_proto::common::v1::OrderStatus::Confirmed => "CONFIRMED",
            flashsale_proto::common::v1::OrderStatus::Rejected => "REJECTED",
            flashsale_proto::common::v1::OrderStatus::Refunded => "REFUNDED",
            // Only final states are published; anything else has nothing to undo.
            _ => return Ok("IGNORED".into()),
        };
        let mut conn = self.background.get().await?;
        let outcome: String = self
            .scripts
            .apply_event
            .on(&self.prefix, item.home(&order.user_id))
            .arg(&order.id)
            .arg(&order.user_id)
            .arg(order.quantity)
            .arg(status)
            .arg(&order.reject_reason)
            .arg(event.units_released)
            .arg(event.item_version)
            .invoke_async(&mut conn)
            .await?;
        // Inventory has the order now; the gateway's own record is no longer needed.
        let _: () = conn.del(self.order_key(&order.id)).await?;
        Ok(outcome)
    }

    /// Each bucket's counts, one small pipeline per bucket.
    async fn bucket_states(&self, item: Spread<'_>) -> Result<Vec<BucketState>, GatewayError> {
        let mut conn = self.background.get().await?;
        let mut states = Vec::with_capacity(item.buckets as usize);
        for slot in item.slots() {
            let (ready, tokens, admitted, lent): (bool, Option<i64>, i64, i64) = redis::pipe()
                .exists(self.key(slot, Part::Ready))
                .get(self.key(slot, Part::Tokens))
                .hlen(self.key(slot, Part::Admitted))
                .hlen(self.key(slot, Part::Lent))
                .query_async(&mut conn)
                .await?;
            states.push(BucketState { ready, tokens: tokens.unwrap_or(0), admitted, lent });
        }
        Ok(states)
    }

    /// Rebuilds from an inventory snapshot every bucket of the item whose state
    /// is missing (the others are left alone); returns how many it rebuilt.
    ///
    /// A rebuilt bucket gets its buyers' holdings, in-flight marks and keys, and
    /// the units PostgreSQL has left less what the other buckets offer (a
    /// missing one counted at its even share, which its own rebuild takes).
    /// With one bucket that is all PostgreSQL has left. Units the others hold
    /// for orders still in flight are counted in both, so a bucket may offer a
    /// few units too many: PostgreSQL judges every order and rejects those
    /// SOLD_OUT. It never offers too few, which would strand them.
    pub async fn rebuild(
        &self,
        item: Spread<'_>,
        snapshot: &GetAdmissionSnapshotResponse,
    ) -> Result<u32, GatewayError> {
        let states = self.bucket_states(item).await?;
        let remaining = i64::from(snapshot.stock_remaining);
        let mut rebuilt = 0;
        for slot in item.slots() {
            if states[slot.bucket as usize].ready {
                continue;
            }
            let others: i64 = item
                .slots()
                .filter(|other| *other != slot)
                .map(|other| {
                    let state = states[other.bucket as usize];
                    if state.ready { state.tokens } else { item.share(remaining, other.bucket) }
                })
                .sum();
            let tokens = (remaining - others).max(0);
            let mut invocation = self.scripts.rebuild.on(&self.prefix, slot);
            let holdings: Vec<_> =
                snapshot.holdings.iter().filter(|holding| item.home(&holding.user_id) == slot).collect();
            invocation.arg(snapshot.item_version).arg(tokens).arg(holdings.len());
            for holding in holdings {
                invocation.arg(&holding.user_id).arg(holding.quantity).arg(&holding.in_flight_order_id);
            }
            let keys: Vec<_> = snapshot.admitted_keys.iter().filter(|key| item.home(&key.user_id) == slot).collect();
            invocation.arg(keys.len());
            for key in keys {
                // The same field and value admit.lua writes.
                invocation
                    .arg(idem_field(&key.user_id, &key.idempotency_key))
                    .arg(PriorOrder::encode(&key.order_id, key.quantity));
            }
            let mut conn = self.background.get().await?;
            let done: i64 = invocation.invoke_async(&mut conn).await?;
            rebuilt += u32::from(done == 1);
        }
        Ok(rebuilt)
    }

    /// Raises the item's tokens to PostgreSQL's `remaining` if nothing is in
    /// flight (no open admission, no open loan, in any bucket) and Redis offers
    /// fewer; returns the tokens added (to bucket 0, from where dry buckets
    /// borrow them). The buckets are read one after another, so an admission
    /// meanwhile can make Redis offer a unit too many, never too few.
    pub async fn resync(&self, item: Spread<'_>, remaining: u32) -> Result<i64, GatewayError> {
        let states = self.bucket_states(item).await?;
        if states.iter().any(|state| !state.ready || state.admitted > 0 || state.lent > 0) {
            return Ok(0);
        }
        let others: i64 = states.iter().skip(1).map(|state| state.tokens).sum();
        let target = i64::from(remaining) - others;
        if target <= states[0].tokens {
            return Ok(0);
        }
        let mut conn = self.background.get().await?;
        Ok(self.scripts.resync.on(&self.prefix, item.slot(0)).arg(target).invoke_async(&mut conn).await?)
    }

    /// Units Redis still offers (all buckets) and the [`AdmissionStamp`], or
    /// `None` when a bucket's state is missing (the refresher's check of a
    /// sold-out item).
    pub async fn sold_out_check(&self, item: Spread<'_>) -> Result<Option<(i64, AdmissionStamp)>, GatewayError> {
        let mut conn = self.background.get().await?;
        let mut stamp = AdmissionStamp::default();
        let mut total = 0;
        for slot in item.slots() {
            let ready_key = self.key(slot, Part::Ready);
            let (ready, tokens, (version, admissions)): (bool, Option<i64>, (Option<i64>, Option<i64>)) = redis::pipe()
                .exists(&ready_key)
                .get(self.key(slot, Part::Tokens))
                .hmget(&ready_key, &STAMP_FIELDS)
                .query_async(&mut conn)
                .await?;
            if !ready {
                return Ok(None);
            }
            total += tokens.unwrap_or(0);
            stamp.buckets.push(stamp_of(version, admissions));
        }
        Ok(Some((total, stamp)))
    }

    /// Units Redis still offers in all buckets, or `None` when a bucket's state is missing.
    pub async fn tokens(&self, item: Spread<'_>) -> Result<Option<i64>, GatewayError> {
        let states = self.bucket_states(item).await?;
        Ok(states.iter().all(|state| state.ready).then(|| states.iter().map(|state| state.tokens).sum()))
    }

    pub async fn save_record(&self, record: &AdmissionRecord) -> Result<(), GatewayError> {
        let json = serde_json::to_string(record).map_err(|e| GatewayError::Internal(Box::new(e)))?;
        let _: () = self.hot.clone().set_ex(self.order_key(&record.order_id), json, ORDER_RECORD_TTL_SECONDS).await?;
        Ok(())
    }

    pub async fn load_record(&self, order_id: &str) -> Result<Option<AdmissionRecord>, GatewayError> {
        let json: Option<String> = self.hot.clone().get(self.order_key(order_id)).await?;
        Ok(json.and_then(|json| serde_json::from_str(&json).ok()))
    }
}
