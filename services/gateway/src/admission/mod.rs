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

//!
//! By concern: [`Admission::admit`] and its loans between buckets in
//! `admit.rs`; what order events, the reconciler and the sold-out answer
//! read and change in `events.rs`; rebuilding a lost state and resyncing
//! it with PostgreSQL in `rebuild.rs`.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use self::protocol::{Part, Scripts, Slot, bucket_of, item_key, order_key};
use crate::error::GatewayError;

mod admit;
mod events;
pub mod link;
mod protocol;
mod rebuild;

pub use self::admit::LoansSettled;
pub use self::events::MAX_REPUBLISH_FACTOR;
pub use self::rebuild::RebuildLease;

/// Redis's admission state of an item as far as key holders go: for each
/// stock bucket its version (changes when the bucket is rebuilt) and its count
/// of admissions (each one adds a key). A set of key holders is complete while
/// the stamp is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdmissionStamp {
    /// (version, admissions) of each bucket, in bucket order.
    pub buckets: Vec<(i64, i64)>,
}

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

/// How long an admission record (what GetOrder shows before inventory has the order) lives.
const ORDER_RECORD_TTL_SECONDS: u64 = 24 * 3600;

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
