//! When a step after the reservation fails: undoing it, letting an order that
//! cannot be undone go through, answering a retried key (republishing an
//! order inventory never saw), and rebuilding an item's lost Redis state.

use flashsale_proto::common::v1::OrderStatus;
use flashsale_proto::gateway::v1::PurchaseResponse;
use flashsale_proto::inventory::v1::{GetOrderRequest, RecordOrderRequest, StreamAdmissionSnapshotRequest};

use super::funds::Held;
use super::{Attempt, Purchases, UNDO_TRIES, placed_message, public_status};
use crate::admission::AdmissionRecord;
use crate::auth::Principal;
use crate::catalog::CatalogItem;
use crate::error::GatewayError;
use crate::upstream::request;

impl Purchases {
    /// An order whose reservation stands though a step after it failed: kept in
    /// this process and published until confirmed, recorded straight in
    /// inventory, and answered PENDING.
    pub(super) async fn go_through(&self, record: &AdmissionRecord) -> PurchaseResponse {
        if !self.publisher.publish_until_confirmed(placed_message(record)) {
            tracing::warn!(order.id = %record.order_id, "too many unconfirmed orders kept; this one is left to the reconciler");
        }
        self.record_directly(record).await;
        PurchaseResponse { order_id: record.order_id.clone(), status: OrderStatus::Pending.into() }
    }

    /// Records an order the broker did not confirm straight in inventory
    /// (`RecordOrder`), before the buyer is told PENDING: the copies kept in this
    /// process's memory and in Redis would both be gone after a crash of this
    /// gateway together with a Redis loss, and the order with them. The kept
    /// copy is still published until confirmed; inventory keeps one order per id.
    /// If inventory cannot be reached either, the order keeps those two copies.
    pub(super) async fn record_directly(&self, record: &AdmissionRecord) {
        let order = placed_message(record);
        let recorded = crate::upstream::retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let recording = RecordOrderRequest { order: Some(order.clone()) };
            async move { client.record_order(request(recording)).await }
        })
        .await;
        match recorded {
            Ok(_) => metrics::counter!("flashsale_orders_recorded_directly_total").increment(1),
            Err(status) => tracing::warn!(
                error = %status,
                order.id = %record.order_id,
                "could not record an unconfirmed order in inventory; it stays in memory and in Redis"
            ),
        }
    }

    /// Gives back the units of an admission whose order certainly never reached
    /// the broker: true once they are certainly back (a few tries, since a
    /// dependency that just failed the publish may be failing Redis too).
    pub(super) async fn undo(&self, buyer: &Principal, attempt: &Attempt) -> bool {
        // Fault tests: the publish was refused, the reservation not yet undone.
        flashsale_server::crash_point("gateway-before-unadmit");
        let mut backoff = flashsale_messaging::Backoff::new();
        for tried in 1..=UNDO_TRIES {
            let undone = self
                .admission
                .unadmit(attempt.item.spread(), &attempt.order_id, &buyer.user_id, &attempt.idempotency_key)
                .await;
            match undone {
                Ok(()) => {
                    metrics::counter!("flashsale_refused_orders_total", "reservation" => "released").increment(1);
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, order.id = %attempt.order_id, tried, "could not release a reservation")
                }
            }
            if tried < UNDO_TRIES {
                tokio::time::sleep(backoff.delay()).await;
                backoff.grow();
            }
        }
        metrics::counter!("flashsale_refused_orders_total", "reservation" => "kept").increment(1);
        false
    }

    /// The buyer retried a key: answer with the earlier order. If inventory has
    /// never seen it, the earlier attempt may have died between Redis and the
    /// broker, so publish it again (inventory ignores a second copy).
    pub(super) async fn replay(
        &self,
        buyer: &Principal,
        attempt: &Attempt,
        order_id: String,
    ) -> Result<PurchaseResponse, GatewayError> {
        let known = crate::upstream::retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let lookup = GetOrderRequest { order_id: order_id.clone() };
            async move { client.get_order(request(lookup)).await }
        })
        .await;
        let status = match known {
            Ok(reply) => reply.into_inner().order.map_or(OrderStatus::Pending, |order| public_status(order.status)),
            Err(status) if status.code() == tonic::Code::NotFound => {
                let record = match self.admission.load_record(&order_id).await? {
                    Some(record) => {
                        // The first attempt saved it, so it may still be on its way
                        // to the hold: hold first (the same hold, one per order id),
                        // so the order is not paid by a debit and then held.
                        match self.hold(&record).await {
                            Held::Yes => {}
                            Held::Refused(refusal) => return Err(refusal),
                            Held::Unknown(error) => return Err(error),
                        }
                        record
                    }
                    None => {
                        // The first attempt never got as far as saving it (it died,
                        // or its Redis call timed out and the script ran late): it
                        // will not hold, and the reconciler may be publishing the
                        // admission already. Published without a hold, the order
                        // is paid by a debit, as the reconciler's copy would be.
                        // This reply names the order, so GetOrder must find it from now on.
                        let record = self.record(buyer, attempt, &order_id)?;
                        self.admission.save_record(&record).await?;
                        record
                    }
                };
                self.publisher
                    .publish(&placed_message(&record))
                    .await
                    .map_err(|e| GatewayError::Unavailable(Box::new(e)))?;
                OrderStatus::Pending
            }
            Err(status) => return Err(GatewayError::from_upstream(status)),
        };
        Ok(PurchaseResponse { order_id, status: status.into() })
    }

    /// Rebuilds an item's Redis state (every bucket that lost it) from
    /// inventory's snapshot, streamed in pieces. Any failure of the snapshot is
    /// `UNAVAILABLE` (the buyer retries under the same key), never the
    /// neighbour's own status: a broken snapshot says nothing of the purchase.
    pub async fn rebuild(&self, item: &CatalogItem) -> Result<(), GatewayError> {
        let item_id = item.id.as_str();
        let lock = self.rebuilds.lock().entry(item_id.to_owned()).or_default().clone();
        let _guard = lock.lock().await;
        // Another request (or gateway) may have rebuilt it while we waited.
        let Some(lease) = self.admission.begin_rebuild(item.spread()).await? else { return Ok(()) };
        let started = std::time::Instant::now();
        let opened = crate::upstream::retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let lookup = StreamAdmissionSnapshotRequest { item_id: item_id.to_owned() };
            async move { client.stream_admission_snapshot(crate::upstream::long_request(lookup)).await }
        })
        .await;
        let pieces = match opened {
            Ok(pieces) => pieces.into_inner(),
            Err(status) => {
                self.admission.abandon_rebuild(item.spread(), &lease).await;
                return Err(GatewayError::Unavailable(Box::new(status)));
            }
        };
        let pieces = futures::StreamExt::map(pieces, |piece| piece.map_err(|e| GatewayError::Unavailable(Box::new(e))));
        let rebuilt = self.admission.rebuild(item.spread(), &lease, pieces).await?;
        tracing::info!(
            item.id = %item_id,
            buckets = rebuilt,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "rebuilt admission state from inventory"
        );
        Ok(())
    }
}
