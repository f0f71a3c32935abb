//! The gateway's in-memory view of the items on sale: the fast path that turns
//! away unknown items, closed sales and sold-out items with no network I/O
//! (ARCHITECTURE.md, step 1). Kept fresh from inventory every refresh interval;
//! the sold-out flags are cleared by order events and checked against Redis.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashsale_proto::common::v1 as pb;
use flashsale_proto::inventory::v1::{GetItemRequest, ListItemsRequest};
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::GatewayError;
use crate::upstream::{Upstreams, request};

/// How long an id inventory does not know is answered ITEM_NOT_FOUND locally,
/// so a crowd asking for a bogus id does not reach inventory.
const MISSING_TTL: Duration = Duration::from_secs(1);
/// Bound on remembered missing ids (each is client-chosen text).
const MISSING_CAP: usize = 10_000;

/// What the hot path needs to know about an item.
#[derive(Debug)]
pub struct CatalogItem {
    pub id: String,
    pub currency: String,
    pub price_minor: i64,
    pub per_user_limit: u32,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    /// Whether Redis said SOLD_OUT, kept across refreshes of the item.
    pub sold_out: Arc<SoldOut>,
    /// PostgreSQL's units left as of the last refresh.
    pub pg_remaining: AtomicU32,
}

/// The sold-out flag of an item, and what the gateway learned from Redis while
/// it was set.
///
/// A buyer retrying an idempotency key after the sell-out must get the order
/// that key made, not SOLD_OUT, so keyed attempts would each cost a Redis read.
/// Only buyers who hold a key can have such an order, and while the item stays
/// sold out nobody new can get one: so once per sold-out period the gateway
/// loads the set of key holders, and turns every other buyer away in memory.
///
/// Each clear starts a new generation. A SOLD_OUT answer sets the flag only in
/// the generation its attempt started in (a clear that came meanwhile wins),
/// and a set of key holders serves only the generation it was loaded in.
/// Units that come back are seen through order events and the refresher's
/// Redis check, so for that long (milliseconds; at most a refresh interval when
/// events are lost) a buyer whose reply was lost for a unit that came back and
/// sold again may be told SOLD_OUT on a retry at another gateway.
#[derive(Debug, Default)]
pub struct SoldOut {
    /// `generation << 1 | flag`, so flag and generation change together.
    state: AtomicU64,
    holders: Mutex<Option<(u64, Arc<HashSet<String>>)>>,
    /// One load of the key holders at a time.
    loading: tokio::sync::Mutex<()>,
}

impl SoldOut {
    pub fn is_set(&self) -> bool {
        self.state.load(Ordering::Acquire) & 1 == 1
    }

    /// The generation to pass to [`SoldOut::set_since`].
    pub fn generation(&self) -> u64 {
        self.state.load(Ordering::Acquire) >> 1
    }

    /// Redis said SOLD_OUT to an attempt that started in `generation`.
    pub fn set_since(&self, generation: u64) {
        let _ =
            self.state.compare_exchange(generation << 1, (generation << 1) | 1, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Units may have come back: a new generation, not sold out.
    pub fn clear(&self) {
        let _ = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| Some(((state >> 1) + 1) << 1));
    }

    /// The buyers holding an idempotency key, as Redis had them after the
    /// sell-out, loading them with `load` once per generation (concurrent
    /// callers wait for that load). `None` when the flag is not set, or was
    /// cleared during the load.
    pub async fn key_holders<F, Fut, E>(&self, load: F) -> Result<Option<Arc<HashSet<String>>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HashSet<String>, E>>,
    {
        let current = |this: &Self| {
            let state = this.state.load(Ordering::Acquire);
            let holders = this.holders.lock();
            match &*holders {
                Some((generation, buyers)) if state == ((generation << 1) | 1) => Some(buyers.clone()),
                _ => None,
            }
        };
        if let Some(buyers) = current(self) {
            return Ok(Some(buyers));
        }
        let _one = self.loading.lock().await;
        if let Some(buyers) = current(self) {
            return Ok(Some(buyers));
        }
        let state = self.state.load(Ordering::Acquire);
        if state & 1 == 0 {
            return Ok(None);
        }
        let buyers = Arc::new(load().await?);
        *self.holders.lock() = Some((state >> 1, buyers.clone()));
        Ok((self.state.load(Ordering::Acquire) == state).then_some(buyers))
    }
}

impl CatalogItem {
    fn from_proto(item: &pb::Item) -> Option<Self> {
        let price = item.price.as_ref()?;
        Some(Self {
            id: item.id.clone(),
            currency: price.currency.clone(),
            price_minor: price.amount_minor,
            per_user_limit: item.per_user_limit,
            starts_at_ms: millis(item.starts_at.as_ref()?),
            ends_at_ms: millis(item.ends_at.as_ref()?),
            sold_out: Arc::default(),
            pg_remaining: AtomicU32::new(item.stock_remaining),
        })
    }

    pub fn is_sold_out(&self) -> bool {
        self.sold_out.is_set()
    }

    /// Units may have come back.
    pub fn clear_sold_out(&self) {
        self.sold_out.clear();
    }
}

fn millis(at: &prost_types::Timestamp) -> i64 {
    at.seconds.saturating_mul(1000).saturating_add(i64::from(at.nanos / 1_000_000))
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub struct Catalog {
    items: RwLock<HashMap<String, Arc<CatalogItem>>>,
    missing: Mutex<HashMap<String, Instant>>,
    upstreams: Upstreams,
}

impl Catalog {
    pub fn new(upstreams: Upstreams) -> Self {
        Self { items: RwLock::new(HashMap::new()), missing: Mutex::new(HashMap::new()), upstreams }
    }

    /// The cached item, without I/O.
    pub fn get(&self, id: &str) -> Option<Arc<CatalogItem>> {
        self.items.read().get(id).cloned()
    }

    /// The item, asking inventory once when the cache has not seen it yet.
    pub async fn lookup(&self, id: &str) -> Result<Arc<CatalogItem>, GatewayError> {
        if let Some(item) = self.get(id) {
            return Ok(item);
        }
        if self.missing.lock().get(id).is_some_and(|at| at.elapsed() < MISSING_TTL) {
            return Err(GatewayError::ItemNotFound);
        }
        match self.upstreams.inventory.clone().get_item(request(GetItemRequest { item_id: id.to_owned() })).await {
            Ok(reply) => reply
                .into_inner()
                .item
                .and_then(|item| self.upsert(&item))
                .ok_or_else(|| GatewayError::Internal("inventory returned an item without price or times".into())),
            Err(status) if status.code() == tonic::Code::NotFound => {
                let mut missing = self.missing.lock();
                if missing.len() >= MISSING_CAP {
                    missing.clear();
                }
                missing.insert(id.to_owned(), Instant::now());
                Err(GatewayError::ItemNotFound)
            }
            Err(status) => Err(GatewayError::from_upstream(status)),
        }
    }

    /// Adds or refreshes an item, keeping its sold-out state.
    pub fn upsert(&self, item: &pb::Item) -> Option<Arc<CatalogItem>> {
        let mut fresh = CatalogItem::from_proto(item)?;
        // Units PostgreSQL still has, as of the last refresh (the catalog refreshes every second).
        metrics::gauge!("flashsale_stock_remaining", "item" => item.id.clone()).set(f64::from(item.stock_remaining));
        let mut items = self.items.write();
        if let Some(existing) = items.get(&item.id) {
            fresh.sold_out = existing.sold_out.clone();
        }
        let fresh = Arc::new(fresh);
        items.insert(item.id.clone(), fresh.clone());
        self.missing.lock().remove(&item.id);
        Some(fresh)
    }

    pub fn all(&self) -> Vec<Arc<CatalogItem>> {
        self.items.read().values().cloned().collect()
    }

    pub fn sold_out_items(&self) -> Vec<Arc<CatalogItem>> {
        self.items.read().values().filter(|item| item.is_sold_out()).cloned().collect()
    }

    /// Reloads every item from inventory.
    pub async fn refresh(&self) -> Result<(), GatewayError> {
        let mut token = String::new();
        loop {
            let page = self
                .upstreams
                .inventory
                .clone()
                .list_items(request(ListItemsRequest { page_size: 500, page_token: token }))
                .await
                .map_err(GatewayError::from_upstream)?
                .into_inner();
            for item in &page.items {
                self.upsert(item);
            }
            if page.next_page_token.is_empty() {
                return Ok(());
            }
            token = page.next_page_token;
        }
    }

    /// Refreshes every `interval` until `shutdown`; `on_tick` runs after each
    /// refresh (the sold-out check against Redis).
    pub async fn run_refresher<F, Fut>(self: Arc<Self>, interval: Duration, shutdown: CancellationToken, on_tick: F)
    where
        F: Fn(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => return,
            }
            // Five times a second: never a trace of its own.
            let span = flashsale_telemetry::unrecorded_span("catalog refresh");
            async {
                if let Err(e) = self.refresh().await {
                    tracing::debug!(error = %e, "catalog refresh failed");
                }
                on_tick(self.clone()).await;
            }
            .instrument(span)
            .await;
        }
    }
}
