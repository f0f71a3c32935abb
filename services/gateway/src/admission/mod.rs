//! Admission state in Redis: the per-item stock tokens, per-buyer counts,
//! in-flight marks and idempotency keys, changed only by the Lua scripts in
//! `src/lua/`, each one atomic and touching only keys of one item (hash tag
//! `{ITEM}`), so it runs unchanged on Redis Cluster. Key names, each script's
//! `KEYS` and the value encodings are `protocol.rs`'s; every key, its type, its
//! encoding and who writes and reads it: `services/DESIGN.md`, "Redis keys".
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
    AdmittedEntry, Part, PriorOrder, STAMP_FIELDS, Scripts, idem_field, idem_field_user, item_key, order_key,
};
use crate::catalog::AdmissionStamp;
use crate::error::GatewayError;

pub mod link;
mod protocol;

/// An [`AdmissionStamp`] from the `STAMP_FIELDS` of the `ready` hash (absent: 0).
fn stamp_of(version: Option<i64>, admissions: Option<i64>) -> AdmissionStamp {
    AdmissionStamp { version: version.unwrap_or(0), admissions: admissions.unwrap_or(0) }
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

    fn key(&self, item_id: &str, part: Part) -> String {
        item_key(&self.prefix, item_id, part)
    }

    fn order_key(&self, order_id: &str) -> String {
        order_key(&self.prefix, order_id)
    }

    /// One purchase attempt: one round trip.
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

    pub async fn admit(
        &self,
        item_id: &str,
        user_id: &str,
        quantity: u32,
        limit: u32,
        idempotency_key: &str,
        order_id: &str,
    ) -> Result<Admit, GatewayError> {
        let (outcome, detail): (String, String) = self
            .scripts
            .admit
            .on(&self.prefix, item_id)
            .arg(user_id)
            .arg(quantity)
            .arg(limit)
            .arg(idempotency_key)
            .arg(order_id)
            .arg(flashsale_domain::time::now_ms())
            .invoke_async(&mut self.hot.clone())
            .await?;
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

    /// The order an earlier purchase under this buyer's key created, with its quantity.
    pub async fn prior_order(
        &self,
        item_id: &str,
        user_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<(String, u32)>, GatewayError> {
        let idem = self.key(item_id, Part::Idem);
        let value: Option<String> = self.hot.clone().hget(idem, idem_field(user_id, idempotency_key)).await?;
        Ok(value.and_then(|value| PriorOrder::decode(&value)).map(|prior| (prior.order_id, prior.quantity)))
    }

    /// The buyers holding an idempotency key for `item_id` (each admission made
    /// one), with the stamp they were read at, atomically. One HKEYS, bounded by
    /// the admissions the stock allowed; read when an item sells out, so the
    /// crowd's keyed attempts need no Redis read.
    /// `None` when the item's state is missing (Redis lost it): rebuild first.
    pub async fn key_holders(&self, item_id: &str) -> Result<Option<(AdmissionStamp, HashSet<String>)>, GatewayError> {
        let mut conn = self.background.get().await?;
        let ((version, admissions), fields): ((Option<i64>, Option<i64>), Vec<String>) = redis::pipe()
            .atomic()
            .hmget(self.key(item_id, Part::Ready), &STAMP_FIELDS)
            .hkeys(self.key(item_id, Part::Idem))
            .query_async(&mut conn)
            .await?;
        if version.is_none() {
            return Ok(None);
        }
        let stamp = stamp_of(version, admissions);
        let buyers = fields.iter().filter_map(|field| idem_field_user(field).map(str::to_owned)).collect();
        Ok(Some((stamp, buyers)))
    }

    /// The item's [`AdmissionStamp`]: one HMGET.
    pub async fn admission_stamp(&self, item_id: &str) -> Result<AdmissionStamp, GatewayError> {
        let mut conn = self.background.get().await?;
        let (version, admissions): (Option<i64>, Option<i64>) =
            conn.hmget(self.key(item_id, Part::Ready), &STAMP_FIELDS).await?;
        Ok(stamp_of(version, admissions))
    }

    /// Makes every admission key of `item_id` expire at `at_ms` (unix ms): the
    /// sale is over, and its state is kept only for the retention period.
    pub async fn expire_item(&self, item_id: &str, at_ms: i64) -> Result<(), GatewayError> {
        let mut conn = self.background.get().await?;
        let mut pipe = redis::pipe();
        for part in Part::ALL {
            pipe.cmd("PEXPIREAT").arg(self.key(item_id, part)).arg(at_ms).ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Undoes an admission whose order never reached the broker.
    pub async fn unadmit(&self, item_id: &str, order_id: &str, user_id: &str, key: &str) -> Result<(), GatewayError> {
        let mut conn = self.background.get().await?;
        let _: i64 = self
            .scripts
            .unadmit
            .on(&self.prefix, item_id)
            .arg(order_id)
            .arg(user_id)
            .arg(key)
            .invoke_async(&mut conn)
            .await?;
        // The admission record stays (it expires): a concurrent retry under the same
        // key may have published this order and named it to the buyer already.
        Ok(())
    }

    /// Admissions of `item_id` older than `older_than_ms` (unix ms) that no final
    /// event has settled yet: (order id, user, quantity, idempotency key).
    pub async fn unsettled_before(
        &self,
        item_id: &str,
        older_than_ms: i64,
    ) -> Result<Vec<(String, String, u32, String)>, GatewayError> {
        let mut conn = self.background.get().await?;
        let entries: Vec<(String, String)> = conn.hgetall(self.key(item_id, Part::Admitted)).await?;
        Ok(entries
            .into_iter()
            .filter_map(|(order_id, value)| {
                let entry = AdmittedEntry::decode(&value)?;
                (entry.at_ms < older_than_ms).then_some((
                    order_id,
                    entry.user_id,
                    entry.quantity,
                    entry.idempotency_key,
                ))
            })
            .collect())
    }

    /// Claims, for all gateways at once, the next publish of the unrecorded
    /// admission `order_id`: true when this caller may publish it now. After a
    /// publish the next one waits `grace`, then twice that, and so on up to
    /// [`MAX_REPUBLISH_FACTOR`] times `grace` (`lua/claim_republish.lua`).
    pub async fn claim_republish(&self, item_id: &str, order_id: &str, grace_ms: i64) -> Result<bool, GatewayError> {
        let mut conn = self.background.get().await?;
        let claimed: i64 = self
            .scripts
            .claim_republish
            .on(&self.prefix, item_id)
            .arg(order_id)
            .arg(flashsale_domain::time::now_ms())
            .arg(grace_ms)
            .arg(MAX_REPUBLISH_FACTOR)
            .invoke_async(&mut conn)
            .await?;
        Ok(claimed == 1)
    }

    /// The admission of `order_id` among the open ones of `item_ids`, as
    /// (item id, user, quantity, admitted at ms, idempotency key). The admission
    /// script writes it with the reservation itself, so it exists even when the
    /// separate admission record could not be saved; it goes once the order is final.
    pub async fn admitted_entry(
        &self,
        item_ids: &[String],
        order_id: &str,
    ) -> Result<Option<(String, String, u32, i64, String)>, GatewayError> {
        let mut conn = self.background.get().await?;
        for item_id in item_ids {
            let value: Option<String> = conn.hget(self.key(item_id, Part::Admitted), order_id).await?;
            if let Some(entry) = value.as_deref().and_then(AdmittedEntry::decode) {
                return Ok(Some((item_id.clone(), entry.user_id, entry.quantity, entry.at_ms, entry.idempotency_key)));
            }
        }
        Ok(None)
    }

    /// Applies a final order state to the admission state (idempotent).
    pub async fn apply_event(&self, event: &OrderEvent) -> Result<String, GatewayError> {
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
            .on(&self.prefix, &order.item_id)
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

    /// Rebuilds an item's state from an inventory snapshot (no-op if present).
    pub async fn rebuild(&self, snapshot: &GetAdmissionSnapshotResponse) -> Result<bool, GatewayError> {
        let mut invocation = self.scripts.rebuild.on(&self.prefix, &snapshot.item_id);
        invocation.arg(snapshot.item_version).arg(snapshot.stock_remaining).arg(snapshot.holdings.len());
        for holding in &snapshot.holdings {
            invocation.arg(&holding.user_id).arg(holding.quantity).arg(&holding.in_flight_order_id);
        }
        invocation.arg(snapshot.admitted_keys.len());
        for key in &snapshot.admitted_keys {
            // The same field and value admit.lua writes.
            invocation
                .arg(idem_field(&key.user_id, &key.idempotency_key))
                .arg(PriorOrder::encode(&key.order_id, key.quantity));
        }
        let mut conn = self.background.get().await?;
        let rebuilt: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(rebuilt == 1)
    }

    /// Raises the item's tokens to PostgreSQL's `remaining` if nothing is in
    /// flight and Redis offers fewer; returns the tokens added.
    pub async fn resync(&self, item_id: &str, remaining: u32) -> Result<i64, GatewayError> {
        let mut conn = self.background.get().await?;
        Ok(self.scripts.resync.on(&self.prefix, item_id).arg(remaining).invoke_async(&mut conn).await?)
    }

    /// Units Redis still offers and the [`AdmissionStamp`], or `None` when the
    /// item's state is missing (the refresher's check of a sold-out item).
    pub async fn sold_out_check(&self, item_id: &str) -> Result<Option<(i64, AdmissionStamp)>, GatewayError> {
        let (ready_key, tokens_key) = (self.key(item_id, Part::Ready), self.key(item_id, Part::Tokens));
        let mut conn = self.background.get().await?;
        let (ready, tokens, (version, admissions)): (bool, Option<i64>, (Option<i64>, Option<i64>)) = redis::pipe()
            .exists(&ready_key)
            .get(&tokens_key)
            .hmget(&ready_key, &STAMP_FIELDS)
            .query_async(&mut conn)
            .await?;
        let stamp = stamp_of(version, admissions);
        Ok(ready.then(|| (tokens.unwrap_or(0), stamp)))
    }

    /// Units Redis still offers, or `None` when the item's state is missing.
    pub async fn tokens(&self, item_id: &str) -> Result<Option<i64>, GatewayError> {
        let mut conn = self.background.get().await?;
        let (ready, tokens): (bool, Option<i64>) = redis::pipe()
            .exists(self.key(item_id, Part::Ready))
            .get(self.key(item_id, Part::Tokens))
            .query_async(&mut conn)
            .await?;
        Ok(if ready { Some(tokens.unwrap_or(0)) } else { None })
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
