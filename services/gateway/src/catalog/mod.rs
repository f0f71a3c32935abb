//! The gateway's in-memory view of the items on sale: the fast path that turns
//! away unknown items, closed sales and sold-out items with no network I/O
//! (services/DESIGN.md, "The purchase path", step 1). Kept fresh from inventory every refresh interval;
//! the sold-out flags are cleared by order events and checked against Redis.
//!
//! Each item's sold-out state machine (what the gateway may answer from
//! memory once an item sold out, and when it must ask Redis) is `sold_out.rs`.

mod sold_out;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use flashsale_proto::common::v1 as pb;
use flashsale_proto::inventory::v1::{GetItemRequest, ListItemsRequest};
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::GatewayError;
use crate::upstream::{Upstreams, request};

pub use self::sold_out::{SoldOut, Unsettled};

/// How long an id inventory does not know is answered ITEM_NOT_FOUND locally,
/// so a crowd asking for a bogus id does not reach inventory.
const MISSING_TTL: Duration = Duration::from_secs(1);
/// Bound on remembered missing ids (each is client-chosen text).
const MISSING_CAP: usize = 10_000;
/// Ids not in the cache that may be asked of inventory per second (and at
/// once), whatever the number of callers: a flood of made-up item ids costs
/// inventory at most this, and the rest are answered ITEM_NOT_FOUND at once.
/// Real items reach the cache through the refresher within
/// `CATALOG_REFRESH_MS` anyway, and through CreateItem on this gateway at once.
const MISSES_PER_SECOND: u32 = 50;

/// What the hot path needs to know about an item.
#[derive(Debug)]
pub struct CatalogItem {
    pub id: String,
    pub currency: String,
    pub price_minor: i64,
    pub per_user_limit: u32,
    /// Stock buckets the item's admission state is spread over (1 for most items).
    pub admission_buckets: u32,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    /// Whether Redis said SOLD_OUT, kept across refreshes of the item.
    pub sold_out: Arc<SoldOut>,
    /// PostgreSQL's units left as of the last refresh.
    pub pg_remaining: AtomicU32,
    /// When (unix ms) this gateway last set the expiry of the item's Redis keys
    /// once the sale had ended (0: not yet), kept across refreshes of the item.
    pub keys_expiry_set_at_ms: Arc<std::sync::atomic::AtomicI64>,
}

impl CatalogItem {
    fn from_proto(item: &pb::Item) -> Option<Self> {
        let price = item.price.as_ref()?;
        Some(Self {
            id: item.id.clone(),
            currency: price.currency.clone(),
            price_minor: price.amount_minor,
            per_user_limit: item.per_user_limit,
            admission_buckets: item.admission_buckets.max(1),
            starts_at_ms: flashsale_domain::time::to_ms(item.starts_at.as_ref()?),
            ends_at_ms: flashsale_domain::time::to_ms(item.ends_at.as_ref()?),
            sold_out: Arc::default(),
            pg_remaining: AtomicU32::new(item.stock_remaining),
            keys_expiry_set_at_ms: Arc::default(),
        })
    }

    /// How the item's admission state is laid out in Redis.
    pub fn spread(&self) -> crate::admission::Spread<'_> {
        crate::admission::Spread::new(&self.id, self.admission_buckets)
    }

    pub fn is_sold_out(&self) -> bool {
        self.sold_out.is_set()
    }

    /// Units may have come back.
    pub fn clear_sold_out(&self) {
        self.sold_out.clear();
    }
}

pub struct Catalog {
    items: RwLock<HashMap<String, Arc<CatalogItem>>>,
    missing: Mutex<HashMap<String, Instant>>,
    misses: governor::DefaultDirectRateLimiter,
    upstreams: Upstreams,
}

impl Catalog {
    pub fn new(upstreams: Upstreams) -> Self {
        let per_second = std::num::NonZeroU32::new(MISSES_PER_SECOND).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            items: RwLock::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
            misses: governor::RateLimiter::direct(governor::Quota::per_second(per_second)),
            upstreams,
        }
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
        if self.misses.check().is_err() {
            metrics::counter!("flashsale_catalog_misses_refused_total").increment(1);
            return Err(GatewayError::ItemNotFound);
        }
        let lookup = || {
            let mut client = self.upstreams.inventory.clone();
            let lookup = GetItemRequest { item_id: id.to_owned() };
            async move { client.get_item(request(lookup)).await }
        };
        match crate::upstream::retry_if_lost(lookup).await {
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
            fresh.keys_expiry_set_at_ms = existing.keys_expiry_set_at_ms.clone();
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

    /// Reloads from inventory the items whose sale is on, to come, or ended
    /// less than `retention` ago, and forgets the older ones: the catalog and
    /// each refresh stay the size of the live sales, not of the whole history.
    /// (An older item asked for by id is still looked up once, and answered
    /// SALE_ENDED.)
    pub async fn refresh(&self, retention: Duration) -> Result<(), GatewayError> {
        let horizon = std::time::SystemTime::now().checked_sub(retention).unwrap_or(std::time::UNIX_EPOCH);
        let horizon_ms = i64::try_from(horizon.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis())
            .unwrap_or(i64::MAX);
        self.items.write().retain(|_, item| item.ends_at_ms > horizon_ms);
        let mut token = String::new();
        loop {
            let page = crate::upstream::retry_if_lost(|| {
                let mut client = self.upstreams.inventory.clone();
                let listing = ListItemsRequest {
                    page_size: flashsale_domain::MAX_PAGE_SIZE,
                    page_token: token.clone(),
                    ending_after: Some(prost_types::Timestamp::from(horizon)),
                };
                async move { client.list_items(request(listing)).await }
            })
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
    pub async fn run_refresher<F, Fut>(
        self: Arc<Self>,
        interval: Duration,
        retention: Duration,
        shutdown: CancellationToken,
        on_tick: F,
    ) where
        F: Fn(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let on_tick = &on_tick;
        flashsale_server::every(interval, &shutdown, || {
            let this = self.clone();
            // Five times a second: never a trace of its own.
            let span = flashsale_telemetry::unrecorded_span("catalog refresh");
            async move {
                if let Err(e) = this.refresh(retention).await {
                    tracing::debug!(error = %e, "catalog refresh failed");
                }
                on_tick(this).await;
            }
            .instrument(span)
        })
        .await;
    }
}
