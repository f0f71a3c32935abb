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

use flashsale_proto::inventory::v1::{OrderEvent, StreamAdmissionSnapshotResponse};
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
    /// This many units (0: the lender is dry).
    Lent(u32),
    NotReady,
}

/// A loan taken for one attempt: the lending bucket, the loan id, the units.
struct Loan<'a> {
    lender: Slot<'a>,
    id: String,
    units: u32,
}

/// What one pass of [`Admission::settle_loans`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoansSettled {
    /// Loans whose units were credited to the borrower by the sweep.
    pub received: usize,
    /// Loans whose borrower had lost its state: the units went back to the lender.
    pub repaid: usize,
}

/// How long a rebuild may go without writing a piece before another gateway may
/// take its buckets over (`rebuild_begin.lua`).
const REBUILD_LEASE_MS: u64 = 15_000;
/// Holdings and keys written per `rebuild_part.lua` call.
const REBUILD_BATCH: usize = 1_000;

/// The buckets of an item one rebuild holds the lease of ([`Admission::begin_rebuild`]).
#[derive(Debug)]
pub struct RebuildLease {
    token: String,
    /// The buckets leased (missing when the lease was taken).
    buckets: Vec<u32>,
    /// Each bucket's tokens when the lease was taken, `None` where it was missing.
    present: Vec<Option<i64>>,
}

/// How long an admission record (what GetOrder shows before inventory has the order) lives.
const ORDER_RECORD_TTL_SECONDS: u64 = 24 * 3600;
/// The longest wait between two publishes of one unrecorded admission, in
/// multiples of the reconciler's grace.
pub const MAX_REPUBLISH_FACTOR: i64 = 8;

/// What the admission script decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    Reserved {
        tokens_left: i64,
    },
    Duplicate {
        order_id: String,
        quantity: u32,
    },
    InProgress {
        order_id: String,
    },
    LimitReached,
    /// Not one unit left.
    SoldOut,
    /// Fewer units left than the attempt asked for, but some: the item is not
    /// sold out, and a smaller request may still buy.
    NotEnoughStock {
        units_left: u32,
    },
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

impl AdmissionRecord {
    /// The order's price: what is held, then charged.
    pub fn amount(&self) -> flashsale_proto::common::v1::Money {
        flashsale_proto::common::v1::Money { currency: self.currency.clone(), amount_minor: self.amount_minor }
    }
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

/// The tokens each missing bucket gets in a rebuild, from the units PostgreSQL
/// has left and the tokens of each bucket still present (`None`: missing).
/// The missing buckets share what the present ones do not offer, evenly (the
/// first ones take the remainder), so that together the buckets offer at least
/// `remaining`. An earlier rule gave each missing bucket `remaining` less all
/// the others with the missing ones at their even share, which offered fewer
/// units than PostgreSQL held whenever the present buckets were uneven (19, 19
/// present and two missing of 40 left: 0 each, 38 in all).
fn missing_shares(remaining: i64, present: &[Option<i64>]) -> Vec<Option<i64>> {
    let offered: i64 = present.iter().flatten().sum();
    let missing = present.iter().filter(|tokens| tokens.is_none()).count() as i64;
    let to_share = (remaining - offered).max(0);
    let mut nth = 0;
    present
        .iter()
        .map(|tokens| match tokens {
            Some(_) => None,
            None => {
                let share = to_share / missing + i64::from(nth < to_share % missing);
                nth += 1;
                Some(share)
            }
        })
        .collect()
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
    /// item whose bucket has too few units for this buyer then borrows what is
    /// missing from the others, as many lenders as it takes (two more round
    /// trips per lender asked), and admits with the loans. `SoldOut` only when
    /// every bucket is dry; `NotEnoughStock` when all of them together hold
    /// fewer units than asked for; `NotReady` when a bucket asked has lost its
    /// state (rebuild, then ask again).
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
        let first = self.admit_in(home, &attempt, &[]).await?;
        let at_home = match first {
            _ if item.buckets == 1 => return Ok(first),
            Admit::SoldOut => 0,
            Admit::NotEnoughStock { units_left } => units_left,
            other => return Ok(bucketed(item, other)),
        };
        let mut loans = Vec::new();
        let mut missing = quantity.saturating_sub(at_home);
        for lender in item.lenders(home) {
            if missing == 0 {
                break;
            }
            let id = uuid::Uuid::now_v7().simple().to_string();
            // An error leaves the loans taken so far open: the reconciler's sweep settles them.
            match self.lend(lender, &id, missing, home.bucket).await? {
                Lend::Lent(0) => continue,
                Lend::Lent(units) => {
                    // Fault tests: units taken from the lender, not yet in the borrower.
                    flashsale_server::crash_point("gateway-after-loan");
                    missing = missing.saturating_sub(units);
                    loans.push(Loan { lender, id, units });
                }
                // Its units are unknown until it is rebuilt: it may have some.
                Lend::NotReady => {
                    self.close_loans(item, &loans, true).await;
                    return Ok(Admit::NotReady);
                }
            }
        }
        let borrowed: u32 = loans.iter().map(|loan| loan.units).sum();
        if missing > 0 {
            // Every bucket together holds fewer units than asked: nothing is
            // admitted, and the lenders take their units back.
            self.close_loans(item, &loans, true).await;
            let units_left = at_home + borrowed;
            return Ok(if units_left == 0 { Admit::SoldOut } else { Admit::NotEnoughStock { units_left } });
        }
        let credits: Vec<(&str, u32)> = loans.iter().map(|loan| (loan.id.as_str(), loan.units)).collect();
        let outcome = self.admit_in(home, &attempt, &credits).await;
        // An error leaves the loans open: whether they were credited is unknown,
        // and the reconciler's sweep settles them either way.
        if let Ok(decided) = &outcome {
            self.close_loans(item, &loans, *decided == Admit::NotReady).await;
        }
        outcome.map(|decided| bucketed(item, decided))
    }

    /// Closes the loans of one attempt; `repay` gives the units back to their lenders.
    async fn close_loans(&self, item: Spread<'_>, loans: &[Loan<'_>], repay: bool) {
        for loan in loans {
            if let Err(e) = self.close_loan(loan.lender, &loan.id, repay).await {
                tracing::warn!(error = %e, item.id = %item.item_id, "could not close a stock loan; the reconciler will");
            }
        }
    }

    async fn admit_in(
        &self,
        slot: Slot<'_>,
        attempt: &AdmitArgs<'_>,
        loans: &[(&str, u32)],
    ) -> Result<Admit, GatewayError> {
        let mut invocation = self.scripts.admit.on(&self.prefix, slot);
        invocation
            .arg(attempt.user_id)
            .arg(attempt.quantity)
            .arg(attempt.limit)
            .arg(attempt.idempotency_key)
            .arg(attempt.order_id)
            .arg(flashsale_domain::time::now_ms())
            .arg(loans.len());
        for (loan_id, units) in loans {
            invocation.arg(*loan_id).arg(*units);
        }
        let (outcome, detail): (String, String) = invocation.invoke_async(&mut self.hot.clone()).await?;
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
            "NOT_ENOUGH_STOCK" => Admit::NotEnoughStock { units_left: detail.parse().unwrap_or(0) },
            "NOT_READY" => Admit::NotReady,
            other => return Err(GatewayError::Internal(format!("admission script said {other:?}").into())),
        })
    }

    async fn lend(&self, lender: Slot<'_>, loan: &str, units: u32, borrower: u32) -> Result<Lend, GatewayError> {
        let (said, lent): (String, u32) = self
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
            "LENT" => Ok(Lend::Lent(lent)),
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

    /// The open admission of `order_id` among `items`, as (item id, buyer,
    /// quantity, admitted at ms, idempotency key). The admission script writes
    /// it with the reservation itself, so it exists even when the separate
    /// admission record could not be saved; it goes once the order is final.
    /// With `buyer`, only that buyer's: one HGET per item, in the buyer's own
    /// bucket (where all of a buyer's admissions live); without (an operator's
    /// look-up), one per bucket. All are sent at once on the hot-path
    /// connection: multiplexed, so one round trip, and no connection of the
    /// background pool, which events, rebuilds and the reconciler need, is held.
    pub async fn admitted_entry(
        &self,
        items: &[Spread<'_>],
        buyer: Option<&str>,
        order_id: &str,
    ) -> Result<Option<(String, String, u32, i64, String)>, GatewayError> {
        let slots: Vec<Slot<'_>> = match buyer {
            Some(user_id) => items.iter().map(|item| item.home(user_id)).collect(),
            None => items.iter().flat_map(|item| item.slots()).collect(),
        };
        let lookups = slots.into_iter().map(|slot| {
            let key = self.key(slot, Part::Admitted);
            let mut conn = self.hot.clone();
            async move {
                let value: Option<String> = conn.hget(key, order_id).await?;
                Ok::<_, GatewayError>((slot.item_id, value))
            }
        });
        for (item_id, value) in futures::future::try_join_all(lookups).await? {
            let Some(entry) = value.as_deref().and_then(AdmittedEntry::decode) else { continue };
            let AdmittedEntry { user_id, quantity, at_ms, idempotency_key } = entry;
            if buyer.is_none_or(|buyer| buyer == user_id) {
                return Ok(Some((item_id.to_owned(), user_id, quantity, at_ms, idempotency_key)));
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

    /// Takes the rebuild lease of every bucket of the item whose state is
    /// missing: `None` when none is missing (any longer), or when another
    /// rebuild holds every missing one (after waiting for it, up to a lease).
    /// The caller then reads inventory's snapshot and hands it to
    /// [`Admission::rebuild`], or gives up with [`Admission::abandon_rebuild`].
    pub async fn begin_rebuild(&self, item: Spread<'_>) -> Result<Option<RebuildLease>, GatewayError> {
        let states = self.bucket_states(item).await?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (mut buckets, mut busy) = (Vec::new(), false);
        for slot in item.slots().filter(|slot| !states[slot.bucket as usize].ready) {
            let mut conn = self.background.get().await?;
            let said: String = self
                .scripts
                .rebuild_begin
                .on(&self.prefix, slot)
                .arg(&token)
                .arg(REBUILD_LEASE_MS)
                .invoke_async(&mut conn)
                .await?;
            match said.as_str() {
                "BEGUN" => buckets.push(slot.bucket),
                "BUSY" => busy = true,
                _ => {}
            }
        }
        if buckets.is_empty() {
            if busy {
                self.wait_until_ready(item).await?;
            }
            return Ok(None);
        }
        let present = states.iter().map(|state| state.ready.then_some(state.tokens)).collect();
        Ok(Some(RebuildLease { token, buckets, present }))
    }

    /// Waits (up to a lease) while another gateway rebuilds the item.
    async fn wait_until_ready(&self, item: Spread<'_>) -> Result<(), GatewayError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(REBUILD_LEASE_MS);
        while self.tokens(item).await?.is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Rebuilds the leased buckets from inventory's snapshot, read piece by
    /// piece (one piece in memory at a time, whatever the item's size); returns
    /// how many it rebuilt. Gives the lease up if the snapshot breaks off.
    ///
    /// A rebuilt bucket gets its buyers' holdings, in-flight marks and keys.
    /// The missing buckets share, evenly, the units PostgreSQL has left less
    /// what the buckets still present offer ([`missing_shares`]). With one
    /// bucket that is all PostgreSQL has left. Units the present buckets hold
    /// for orders still in flight are counted in both, so Redis may offer a
    /// few units too many: PostgreSQL judges every order and rejects those
    /// SOLD_OUT. It never offers too few, which would strand them.
    pub async fn rebuild<S>(&self, item: Spread<'_>, lease: &RebuildLease, pieces: S) -> Result<u32, GatewayError>
    where
        S: futures::Stream<Item = Result<StreamAdmissionSnapshotResponse, GatewayError>>,
    {
        let outcome = self.write_snapshot(item, lease, pieces).await;
        if outcome.is_err() {
            self.abandon_rebuild(item, lease).await;
        }
        outcome
    }

    async fn write_snapshot<S>(&self, item: Spread<'_>, lease: &RebuildLease, pieces: S) -> Result<u32, GatewayError>
    where
        S: futures::Stream<Item = Result<StreamAdmissionSnapshotResponse, GatewayError>>,
    {
        use futures::StreamExt;
        let mut pieces = std::pin::pin!(pieces);
        let Some(first) = pieces.next().await.transpose()? else {
            return Err(GatewayError::Unavailable("the admission snapshot was empty".into()));
        };
        if first.item_id != item.item_id {
            return Err(GatewayError::Internal(
                format!("a snapshot of {:?} for {:?}", first.item_id, item.item_id).into(),
            ));
        }
        let (version, remaining) = (first.item_version, i64::from(first.stock_remaining));
        let mut piece = first;
        loop {
            for &bucket in &lease.buckets {
                self.write_piece(item.slot(bucket), item, &lease.token, &piece).await?;
            }
            if piece.complete {
                break;
            }
            piece = pieces
                .next()
                .await
                .transpose()?
                .ok_or_else(|| GatewayError::Unavailable("the admission snapshot broke off".into()))?;
        }
        let shares = missing_shares(remaining, &lease.present);
        let mut rebuilt = 0;
        for &bucket in &lease.buckets {
            let tokens = shares[bucket as usize].unwrap_or(0);
            let mut conn = self.background.get().await?;
            let done: i64 = self
                .scripts
                .rebuild
                .on(&self.prefix, item.slot(bucket))
                .arg(&lease.token)
                .arg(version)
                .arg(tokens)
                .invoke_async(&mut conn)
                .await?;
            rebuilt += u32::from(done == 1);
        }
        Ok(rebuilt)
    }

    /// Writes one bucket's share of a snapshot piece: its buyers' holdings and
    /// keys, at most [`REBUILD_BATCH`] entries per script (a script blocks Redis
    /// while it runs).
    async fn write_piece(
        &self,
        slot: Slot<'_>,
        item: Spread<'_>,
        token: &str,
        piece: &StreamAdmissionSnapshotResponse,
    ) -> Result<(), GatewayError> {
        let holdings: Vec<_> = piece.holdings.iter().filter(|holding| item.home(&holding.user_id) == slot).collect();
        let keys: Vec<_> = piece.admitted_keys.iter().filter(|key| item.home(&key.user_id) == slot).collect();
        let (mut holdings, mut keys) = (holdings.as_slice(), keys.as_slice());
        while !holdings.is_empty() || !keys.is_empty() {
            let (these_holdings, rest) = holdings.split_at(holdings.len().min(REBUILD_BATCH));
            holdings = rest;
            let (these_keys, rest) = keys.split_at(keys.len().min(REBUILD_BATCH - these_holdings.len()));
            keys = rest;
            let mut invocation = self.scripts.rebuild_part.on(&self.prefix, slot);
            invocation.arg(token).arg(REBUILD_LEASE_MS).arg(these_holdings.len());
            for holding in these_holdings {
                invocation.arg(&holding.user_id).arg(holding.quantity).arg(&holding.in_flight_order_id);
            }
            invocation.arg(these_keys.len());
            for key in these_keys {
                // The same field and value admit.lua writes.
                invocation
                    .arg(idem_field(&key.user_id, &key.idempotency_key))
                    .arg(PriorOrder::encode(&key.order_id, key.quantity));
            }
            let mut conn = self.background.get().await?;
            let held: i64 = invocation.invoke_async(&mut conn).await?;
            if held == 0 {
                return Err(GatewayError::Unavailable("the rebuild lease was lost".into()));
            }
        }
        Ok(())
    }

    /// Gives the lease of an unfinished rebuild up, so the next attempt need not
    /// wait for it to expire (a failure is only logged: it expires anyway).
    pub async fn abandon_rebuild(&self, item: Spread<'_>, lease: &RebuildLease) {
        for &bucket in &lease.buckets {
            let abandoned = async {
                let mut conn = self.background.get().await?;
                let _: i64 = self
                    .scripts
                    .rebuild_abandon
                    .on(&self.prefix, item.slot(bucket))
                    .arg(&lease.token)
                    .invoke_async(&mut conn)
                    .await?;
                Ok::<_, GatewayError>(())
            };
            if let Err(e) = abandoned.await {
                tracing::warn!(error = %e, item.id = %item.item_id, "could not give up a rebuild lease; it expires");
            }
        }
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

#[cfg(test)]
mod tests {
    use super::missing_shares;

    #[test]
    fn missing_buckets_share_what_the_present_ones_do_not_offer() {
        // (remaining in PostgreSQL, each bucket's tokens or missing, expected shares)
        type Buckets = Vec<Option<i64>>;
        let cases: [(i64, Buckets, Buckets); 5] = [
            (40, vec![Some(19), Some(19), None, None], vec![None, None, Some(1), Some(1)]),
            (40, vec![None, None, None, None], vec![Some(10), Some(10), Some(10), Some(10)]),
            (7, vec![None, Some(0), None], vec![Some(4), None, Some(3)]),
            // The present buckets offer more than is left (admissions in flight): none.
            (5, vec![Some(9), None], vec![None, Some(0)]),
            (3, vec![None], vec![Some(3)]),
        ];
        for (remaining, present, expected) in cases {
            let shares = missing_shares(remaining, &present);
            assert_eq!(shares, expected, "{remaining} left, {present:?}");
            let offered: i64 = present.iter().flatten().chain(shares.iter().flatten()).sum();
            assert!(offered >= remaining, "never fewer than PostgreSQL holds: {present:?}");
        }
    }
}
