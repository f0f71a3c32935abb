//! Admission state in Redis: the per-item stock tokens, per-buyer counts,
//! in-flight marks and idempotency keys, changed only by the Lua scripts beside
//! this file, each one atomic and touching only keys of one item (hash tag
//! `{ITEM}`), so it runs unchanged on Redis Cluster. Every key, its type, its
//! encoding and who writes and reads it: `services/DESIGN.md`, "Redis keys".
//!
//! The hot path (`admit`) uses one multiplexed `ConnectionManager`: concurrent
//! requests pipeline on it, where a pool would give each request a connection
//! of its own and wait a round trip per request (about half the rate when it
//! was measured against a bb8 pool on a two-core machine). Background work (events, rebuilds, checks) uses a bb8 pool so
//! its bulk commands never queue in front of buyers' scripts.

use std::collections::HashSet;

use bb8_redis::RedisConnectionManager;
use flashsale_proto::inventory::v1::{GetAdmissionSnapshotResponse, OrderEvent};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};

use crate::catalog::AdmissionStamp;
use crate::error::GatewayError;

/// The fields of an item's `ready` hash that make its [`AdmissionStamp`].
const STAMP_FIELDS: [&str; 2] = ["version", "admissions"];

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

struct ItemKeys {
    ready: String,
    tokens: String,
    held: String,
    inflight: String,
    idem: String,
    admitted: String,
    applied: String,
    parked: String,
    republished: String,
}

pub struct Admission {
    hot: ConnectionManager,
    pool: bb8::Pool<RedisConnectionManager>,
    prefix: String,
    admit: Script,
    unadmit: Script,
    apply_event: Script,
    rebuild: Script,
    resync: Script,
    claim_republish: Script,
}

impl Admission {
    pub async fn connect(redis_url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(redis_url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)));
        let hot = ConnectionManager::new_with_config(client, config).await?;
        let pool = bb8::Pool::builder()
            .max_size(8)
            .connection_timeout(std::time::Duration::from_secs(2))
            .build(RedisConnectionManager::new(redis_url)?)
            .await?;
        Ok(Self {
            hot,
            pool,
            prefix: prefix.to_owned(),
            admit: Script::new(include_str!("lua/admit.lua")),
            unadmit: Script::new(include_str!("lua/unadmit.lua")),
            apply_event: Script::new(include_str!("lua/apply_event.lua")),
            rebuild: Script::new(include_str!("lua/rebuild.lua")),
            resync: Script::new(include_str!("lua/resync.lua")),
            claim_republish: Script::new(include_str!("lua/claim_republish.lua")),
        })
    }

    fn keys(&self, item_id: &str) -> ItemKeys {
        let p = &self.prefix;
        ItemKeys {
            ready: format!("{p}:{{{item_id}}}:ready"),
            tokens: format!("{p}:{{{item_id}}}:tokens"),
            held: format!("{p}:{{{item_id}}}:held"),
            inflight: format!("{p}:{{{item_id}}}:inflight"),
            idem: format!("{p}:{{{item_id}}}:idem"),
            admitted: format!("{p}:{{{item_id}}}:admitted"),
            applied: format!("{p}:{{{item_id}}}:applied"),
            parked: format!("{p}:{{{item_id}}}:parked"),
            republished: format!("{p}:{{{item_id}}}:republished"),
        }
    }

    fn order_key(&self, order_id: &str) -> String {
        format!("{}:order:{order_id}", self.prefix)
    }

    /// One purchase attempt: one round trip.
    /// `flashsale_redis_pool_connections{state}` of the background pool (call when scraped).
    pub fn record_pool_state(&self) {
        let state = self.pool.state();
        let idle = f64::from(state.idle_connections);
        metrics::gauge!("flashsale_redis_pool_connections", "state" => "idle").set(idle);
        metrics::gauge!("flashsale_redis_pool_connections", "state" => "in_use")
            .set(f64::from(state.connections) - idle);
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
        let k = self.keys(item_id);
        let (outcome, detail): (String, String) = self
            .admit
            .key(&k.ready)
            .key(&k.tokens)
            .key(&k.held)
            .key(&k.inflight)
            .key(&k.idem)
            .key(&k.admitted)
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
                let (order_id, quantity) = detail.split_once('|').unwrap_or((detail.as_str(), "0"));
                Admit::Duplicate { order_id: order_id.to_owned(), quantity: quantity.parse().unwrap_or(0) }
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
        let k = self.keys(item_id);
        let value: Option<String> = self.hot.clone().hget(&k.idem, format!("{user_id}\n{idempotency_key}")).await?;
        Ok(value.and_then(|value| {
            let (order_id, quantity) = value.split_once('|')?;
            Some((order_id.to_owned(), quantity.parse().ok()?))
        }))
    }

    /// The buyers holding an idempotency key for `item_id` (each admission made
    /// one), with the stamp they were read at, atomically. One HKEYS, bounded by
    /// the admissions the stock allowed; read when an item sells out, so the
    /// crowd's keyed attempts need no Redis read.
    /// `None` when the item's state is missing (Redis lost it): rebuild first.
    pub async fn key_holders(&self, item_id: &str) -> Result<Option<(AdmissionStamp, HashSet<String>)>, GatewayError> {
        let k = self.keys(item_id);
        let mut conn = self.pool.get().await?;
        let ((version, admissions), fields): ((Option<i64>, Option<i64>), Vec<String>) =
            redis::pipe().atomic().hmget(&k.ready, &STAMP_FIELDS).hkeys(&k.idem).query_async(&mut *conn).await?;
        if version.is_none() {
            return Ok(None);
        }
        let stamp = stamp_of(version, admissions);
        // Fields are "user\nkey" (admit.lua).
        let buyers =
            fields.into_iter().filter_map(|field| field.split_once('\n').map(|(user, _)| user.to_owned())).collect();
        Ok(Some((stamp, buyers)))
    }

    /// The item's [`AdmissionStamp`]: one HMGET.
    pub async fn admission_stamp(&self, item_id: &str) -> Result<AdmissionStamp, GatewayError> {
        let k = self.keys(item_id);
        let mut conn = self.pool.get().await?;
        let (version, admissions): (Option<i64>, Option<i64>) = conn.hmget(&k.ready, &STAMP_FIELDS).await?;
        Ok(stamp_of(version, admissions))
    }

    /// Makes every admission key of `item_id` expire at `at_ms` (unix ms): the
    /// sale is over, and its state is kept only for the retention period.
    pub async fn expire_item(&self, item_id: &str, at_ms: i64) -> Result<(), GatewayError> {
        let k = self.keys(item_id);
        let mut conn = self.pool.get().await?;
        let mut pipe = redis::pipe();
        for key in
            [&k.ready, &k.tokens, &k.held, &k.inflight, &k.idem, &k.admitted, &k.applied, &k.parked, &k.republished]
        {
            pipe.cmd("PEXPIREAT").arg(key).arg(at_ms).ignore();
        }
        let () = pipe.query_async(&mut *conn).await?;
        Ok(())
    }

    /// Undoes an admission whose order never reached the broker.
    pub async fn unadmit(&self, item_id: &str, order_id: &str, user_id: &str, key: &str) -> Result<(), GatewayError> {
        let k = self.keys(item_id);
        let mut conn = self.pool.get().await?;
        let _: i64 = self
            .unadmit
            .key(&k.tokens)
            .key(&k.held)
            .key(&k.inflight)
            .key(&k.idem)
            .key(&k.admitted)
            .arg(order_id)
            .arg(user_id)
            .arg(key)
            .invoke_async(&mut *conn)
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
        let k = self.keys(item_id);
        let mut conn = self.pool.get().await?;
        let entries: Vec<(String, String)> = conn.hgetall(&k.admitted).await?;
        Ok(entries
            .into_iter()
            .filter_map(|(order_id, value)| {
                let mut fields = value.split('\n');
                let (user, quantity, at, key) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
                let (quantity, at): (u32, i64) = (quantity.parse().ok()?, at.parse().ok()?);
                (at < older_than_ms).then(|| (order_id, user.to_owned(), quantity, key.to_owned()))
            })
            .collect())
    }

    /// Claims, for all gateways at once, the next publish of the unrecorded
    /// admission `order_id`: true when this caller may publish it now. After a
    /// publish the next one waits `grace`, then twice that, and so on up to
    /// [`MAX_REPUBLISH_FACTOR`] times `grace` (`lua/claim_republish.lua`).
    pub async fn claim_republish(&self, item_id: &str, order_id: &str, grace_ms: i64) -> Result<bool, GatewayError> {
        let k = self.keys(item_id);
        let mut conn = self.pool.get().await?;
        let claimed: i64 = self
            .claim_republish
            .key(&k.republished)
            .key(&k.admitted)
            .arg(order_id)
            .arg(flashsale_domain::time::now_ms())
            .arg(grace_ms)
            .arg(MAX_REPUBLISH_FACTOR)
            .invoke_async(&mut *conn)
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
        let mut conn = self.pool.get().await?;
        for item_id in item_ids {
            let value: Option<String> = conn.hget(&self.keys(item_id).admitted, order_id).await?;
            let Some(value) = value else { continue };
            let mut fields = value.split('\n');
            if let (Some(user), Some(quantity), Some(at), Some(key)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
                && let (Ok(quantity), Ok(at)) = (quantity.parse(), at.parse())
            {
                return Ok(Some((item_id.clone(), user.to_owned(), quantity, at, key.to_owned())));
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
        let k = self.keys(&order.item_id);
        let mut conn = self.pool.get().await?;
        let outcome: String = self
            .apply_event
            .key(&k.ready)
            .key(&k.tokens)
            .key(&k.held)
            .key(&k.inflight)
            .key(&k.admitted)
            .key(&k.applied)
            .key(&k.parked)
            .arg(&order.id)
            .arg(&order.user_id)
            .arg(order.quantity)
            .arg(status)
            .arg(&order.reject_reason)
            .arg(event.units_released)
            .arg(event.item_version)
            .invoke_async(&mut *conn)
            .await?;
        // Inventory has the order now; the gateway's own record is no longer needed.
        let _: () = conn.del(self.order_key(&order.id)).await?;
        Ok(outcome)
    }

    /// Rebuilds an item's state from an inventory snapshot (no-op if present).
    pub async fn rebuild(&self, snapshot: &GetAdmissionSnapshotResponse) -> Result<bool, GatewayError> {
        let k = self.keys(&snapshot.item_id);
        let mut invocation = self.rebuild.prepare_invoke();
        invocation
            .key(&k.ready)
            .key(&k.tokens)
            .key(&k.held)
            .key(&k.inflight)
            .key(&k.admitted)
            .key(&k.applied)
            .key(&k.parked)
            .key(&k.idem)
            .arg(snapshot.item_version)
            .arg(snapshot.stock_remaining)
            .arg(snapshot.holdings.len());
        for holding in &snapshot.holdings {
            invocation.arg(&holding.user_id).arg(holding.quantity).arg(&holding.in_flight_order_id);
        }
        invocation.arg(snapshot.admitted_keys.len());
        for key in &snapshot.admitted_keys {
            // The same field and value admit.lua writes: `user\nkey` → `order|quantity`.
            invocation
                .arg(format!("{}\n{}", key.user_id, key.idempotency_key))
                .arg(format!("{}|{}", key.order_id, key.quantity));
        }
        let mut conn = self.pool.get().await?;
        let rebuilt: i64 = invocation.invoke_async(&mut *conn).await?;
        Ok(rebuilt == 1)
    }

    /// Raises the item's tokens to PostgreSQL's `remaining` if nothing is in
    /// flight and Redis offers fewer; returns the tokens added.
    pub async fn resync(&self, item_id: &str, remaining: u32) -> Result<i64, GatewayError> {
        let k = self.keys(item_id);
        let mut conn = self.pool.get().await?;
        Ok(self.resync.key(&k.ready).key(&k.tokens).key(&k.admitted).arg(remaining).invoke_async(&mut *conn).await?)
    }

    /// Units Redis still offers and the [`AdmissionStamp`], or `None` when the
    /// item's state is missing (the refresher's check of a sold-out item).
    pub async fn sold_out_check(&self, item_id: &str) -> Result<Option<(i64, AdmissionStamp)>, GatewayError> {
        let k = self.keys(item_id);
        let mut conn = self.pool.get().await?;
        let (ready, tokens, (version, admissions)): (bool, Option<i64>, (Option<i64>, Option<i64>)) = redis::pipe()
            .exists(&k.ready)
            .get(&k.tokens)
            .hmget(&k.ready, &STAMP_FIELDS)
            .query_async(&mut *conn)
            .await?;
        let stamp = stamp_of(version, admissions);
        Ok(ready.then(|| (tokens.unwrap_or(0), stamp)))
    }

    /// Units Redis still offers, or `None` when the item's state is missing.
    pub async fn tokens(&self, item_id: &str) -> Result<Option<i64>, GatewayError> {
        let k = self.keys(item_id);
        let mut conn = self.pool.get().await?;
        let (ready, tokens): (bool, Option<i64>) =
            redis::pipe().exists(&k.ready).get(&k.tokens).query_async(&mut *conn).await?;
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
