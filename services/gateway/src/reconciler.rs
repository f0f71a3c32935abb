//! The reconciler: finishes admissions that Redis still holds long after they
//! were made, so nothing accepted is lost and no unit stays stranded when a
//! message went missing.
//!
//! - Inventory never recorded the order (the gateway died, or lost its Redis
//!   reply or its confirm, between the script and the broker): it is published
//!   again; inventory keeps one copy per order id and judges it like any other.
//! - Inventory has it in a final state, but its event never reached Redis
//!   (lost, or dead-lettered): the final state is applied now, exactly as the
//!   event would have been (idempotent per order and status), so no in-flight
//!   mark or released unit stays stranded.
//!
//! A pass is bounded ([`MAX_PER_PASS`] admissions) and asks inventory about them
//! [`LOOKUP_BATCH`] at a time in one call. When more are open than one pass
//! takes, each pass starts where the last one stopped ([`window`]), oldest
//! first, so admissions that stay open a long time (orders waiting on a slow
//! payment) cannot take every pass and starve the rest. An unrecorded order may simply still
//! be queued (the queue lags by more than the grace), so one is published again
//! only under a claim taken in Redis for all gateways at once
//! ([`Admission::claim_republish`]): after the grace, then after twice the
//! grace, and so on up to [`MAX_REPUBLISH_FACTOR`] times, never on every pass of
//! every gateway. One entry's or one item's failure does not end the pass; it is
//! counted and tried again next pass.
//!
//! A pass also settles the stock loans between the buckets of a bucketed item
//! that no attempt closed within the grace ([`Admission::settle_loans`]), so
//! no unit stays in a lender's journal.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[cfg(doc)]
use crate::admission::MAX_REPUBLISH_FACTOR;
use crate::admission::{Admission, AdmissionRecord};
use flashsale_domain::time::now_ms;

use crate::catalog::{Catalog, CatalogItem};
use crate::error::GatewayError;
use crate::order_publisher::OrderPublisher;
use crate::purchase::placed_message;
use crate::upstream::{Upstreams, request, retry_if_lost};
use flashsale_proto::common::v1::{Order, OrderStatus};
use flashsale_proto::inventory::v1::{BatchGetOrdersRequest, OrderEvent};

/// Most admissions one pass looks at; the rest wait for the next pass.
const MAX_PER_PASS: usize = 2_000;
/// Order ids per `BatchGetOrders` call.
const LOOKUP_BATCH: usize = 200;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    /// Admissions inventory never recorded, published again.
    pub republished: usize,
    /// Admissions inventory has final, whose event this gateway's Redis never
    /// applied (lost, or dead-lettered): applied now.
    pub applied: usize,
    /// Entries whose look-up or repair failed (tried again next pass).
    pub failed: usize,
    /// Stock loans between buckets that no attempt closed, settled now.
    pub loans_settled: usize,
}

/// What was done about one admission.
enum Repair {
    Republished,
    Applied,
}

/// One admission still open in Redis.
struct Open {
    item: Arc<CatalogItem>,
    order_id: String,
    user_id: String,
    quantity: u32,
    idempotency_key: String,
}

pub struct Reconciler {
    catalog: Arc<Catalog>,
    admission: Arc<Admission>,
    publisher: Arc<OrderPublisher>,
    upstreams: Upstreams,
    /// Where the next pass starts among the open admissions, oldest first.
    cursor: AtomicUsize,
}

/// What one pass takes of the open admissions (in a fixed order): at most
/// `max`, from position `cursor` on, wrapping round.
fn window<T>(mut open: Vec<T>, cursor: usize, max: usize) -> Vec<T> {
    if !open.is_empty() {
        let start = cursor % open.len();
        open.rotate_left(start);
    }
    open.truncate(max);
    open
}

impl Reconciler {
    pub fn new(
        catalog: Arc<Catalog>,
        admission: Arc<Admission>,
        publisher: Arc<OrderPublisher>,
        upstreams: Upstreams,
    ) -> Self {
        Self { catalog, admission, publisher, upstreams, cursor: AtomicUsize::new(0) }
    }

    /// One pass over the admissions older than `grace`.
    pub async fn reconcile(&self, grace: Duration) -> Result<Reconciled, GatewayError> {
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms().saturating_sub(grace_ms);
        let mut done = Reconciled::default();
        for item in self.catalog.all().iter().filter(|item| item.admission_buckets > 1) {
            match self.admission.settle_loans(item.spread(), cutoff).await {
                Ok(settled) if settled.received + settled.repaid > 0 => {
                    done.loans_settled += settled.received + settled.repaid;
                    metrics::counter!("flashsale_reconciler_loans_settled_total")
                        .increment((settled.received + settled.repaid) as u64);
                    tracing::warn!(item.id = %item.id, received = settled.received, repaid = settled.repaid, "settled stock loans no attempt closed");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, item.id = %item.id, "settling stock loans failed");
                    done.failed += 1;
                }
            }
        }
        // Every open admission past the grace: bounded by the units in flight.
        let mut all = Vec::new();
        for item in self.catalog.all() {
            match self.admission.unsettled_before(item.spread(), cutoff).await {
                Ok(entries) => all.extend(entries.into_iter().map(|(order_id, user_id, quantity, idempotency_key)| {
                    Open { item: item.clone(), order_id, user_id, quantity, idempotency_key }
                })),
                Err(e) => {
                    // One item's failure (say, its Redis Cluster shard failing over)
                    // must not hold back the others.
                    tracing::debug!(error = %e, item.id = %item.id, "reading an item's open admissions failed");
                    done.failed += 1;
                }
            }
        }
        // Order ids are UUIDv7: sorted by id is oldest first, the same in every pass.
        all.sort_unstable_by(|a, b| a.order_id.cmp(&b.order_id));
        let open = window(all, self.cursor.fetch_add(MAX_PER_PASS, Ordering::Relaxed), MAX_PER_PASS);
        for chunk in open.chunks(LOOKUP_BATCH) {
            let mut known = match self.look_up(chunk).await {
                Ok(known) => known,
                Err(e) => {
                    tracing::debug!(error = %e, orders = chunk.len(), "looking admissions up failed");
                    done.failed += chunk.len();
                    continue;
                }
            };
            for entry in chunk {
                let repaired = match known.remove(&entry.order_id) {
                    Some(order) => {
                        self.apply_final(entry, order).await.map(|applied| applied.then_some(Repair::Applied))
                    }
                    None => self.republish(entry, grace_ms).await,
                };
                match repaired {
                    Ok(Some(Repair::Republished)) => done.republished += 1,
                    Ok(Some(Repair::Applied)) => done.applied += 1,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, order.id = %entry.order_id, "reconciling an admission failed");
                        done.failed += 1;
                    }
                }
            }
        }
        Ok(done)
    }

    /// Inventory's orders among `chunk`, by id (absent: never recorded).
    async fn look_up(&self, chunk: &[Open]) -> Result<HashMap<String, Order>, GatewayError> {
        let order_ids: Vec<String> = chunk.iter().map(|entry| entry.order_id.clone()).collect();
        let found = retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let lookup = BatchGetOrdersRequest { order_ids: order_ids.clone() };
            async move { client.batch_get_orders(request(lookup)).await }
        })
        .await
        .map_err(GatewayError::from_upstream)?;
        Ok(found.into_inner().orders.into_iter().map(|order| (order.id.clone(), order)).collect())
    }

    /// Applies the final state inventory reports; false while it is still settling.
    async fn apply_final(&self, entry: &Open, order: Order) -> Result<bool, GatewayError> {
        let status = OrderStatus::try_from(order.status).unwrap_or(OrderStatus::Unspecified);
        if !matches!(status, OrderStatus::Confirmed | OrderStatus::Rejected | OrderStatus::Refunded) {
            return Ok(false); // still settling; its event will come
        }
        // The event inventory would have sent: a refund gives the units back;
        // a rejection of this admission gives back what admit.lua took.
        let units_released = if status == OrderStatus::Refunded { order.quantity } else { 0 };
        let event = OrderEvent { order: Some(order), units_released, occurred_at: None, item_version: 0 };
        let outcome = self.admission.apply_event(entry.item.spread(), &event).await?;
        if outcome == "APPLIED" && status != OrderStatus::Confirmed {
            entry.item.clear_sold_out();
        }
        tracing::warn!(order.id = %entry.order_id, item.id = %entry.item.id, status = ?status, "applied a final state whose event never reached Redis");
        Ok(true)
    }

    /// Publishes an admission inventory never recorded, unless it was
    /// published again lately.
    async fn republish(&self, entry: &Open, grace_ms: i64) -> Result<Option<Repair>, GatewayError> {
        if !self.admission.claim_republish(entry.item.spread(), &entry.user_id, &entry.order_id, grace_ms).await? {
            return Ok(None); // published again lately (by any gateway): perhaps still queued
        }
        let record = match self.admission.load_record(&entry.order_id).await? {
            Some(record) => record,
            None => AdmissionRecord {
                amount_minor: entry.item.price_minor.saturating_mul(i64::from(entry.quantity)),
                order_id: entry.order_id.clone(),
                user_id: entry.user_id.clone(),
                item_id: entry.item.id.clone(),
                quantity: entry.quantity,
                currency: entry.item.currency.clone(),
                idempotency_key: entry.idempotency_key.clone(),
                created_at_ms: now_ms(),
            },
        };
        self.admission.save_record(&record).await?;
        self.publisher.publish(&placed_message(&record)).await.map_err(|e| GatewayError::Unavailable(Box::new(e)))?;
        metrics::counter!("flashsale_reconciler_republished_total").increment(1);
        tracing::warn!(order.id = %entry.order_id, item.id = %entry.item.id, "published an unrecorded admission again");
        Ok(Some(Repair::Republished))
    }
}

#[cfg(test)]
mod tests {
    use super::window;

    /// Seven admissions open, three per pass: every one is looked at within
    /// three passes, whatever stays open (an earlier rule took the same first
    /// ones every pass, and 2,000 orders waiting on payment starved the rest).
    #[test]
    fn passes_take_turns_over_the_open_admissions() {
        let open: Vec<u32> = (0..7).collect();
        let passes: Vec<Vec<u32>> = (0..3).map(|pass| window(open.clone(), pass * 3, 3)).collect();
        assert_eq!(passes, [vec![0, 1, 2], vec![3, 4, 5], vec![6, 0, 1]]);
        assert_eq!(window(vec![1, 2], 3, 3), [2, 1], "fewer than a pass: all of them");
        assert!(window(Vec::<u32>::new(), 5, 3).is_empty());
    }
}
