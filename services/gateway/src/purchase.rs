//! The purchase hot path (README, "The purchase path", steps 1–3): local checks with no
//! I/O, one Redis script, then — for the few winners only — the admission
//! record and the confirmed publish of `OrderPlaced`.

use std::collections::HashMap;
use std::sync::Arc;

use flashsale_proto::common::v1::OrderStatus;
use flashsale_proto::gateway::v1::{PurchaseRequest, PurchaseResponse};
use flashsale_proto::inventory::v1::{
    GetOrderRequest, OrderPlaced, RecordOrderRequest, StreamAdmissionSnapshotRequest,
};
use flashsale_proto::wallet::v1::{HoldRequest, VoidRequest};
use parking_lot::Mutex;

use crate::admission::{Admission, AdmissionRecord, Admit};
use crate::auth::Principal;
use flashsale_domain::time::now_ms;
use flashsale_domain::{IdempotencyKey, ItemId};

use crate::catalog::{Catalog, CatalogItem};
use crate::error::GatewayError;
use crate::order_publisher::{OrderPublisher, PublishFailure};
use crate::upstream::{Upstreams, request};
use tracing::Instrument;

pub struct Purchases {
    pub catalog: Arc<Catalog>,
    pub admission: Arc<Admission>,
    pub publisher: Arc<OrderPublisher>,
    pub upstreams: Upstreams,
    /// One rebuild at a time per item in this process: a crowd arriving at an
    /// item with no admission state asks inventory for one snapshot, not thousands.
    rebuilds: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The per-buyer attempt rate among them: a script hammering the purchase
    /// button is turned away before it costs a Redis round trip (the crowd
    /// after sell-out never gets this far).
    limits: Arc<crate::abuse::AbuseLimits>,
    /// `PURCHASE_HOLD_TTL_SECONDS`.
    hold_ttl_seconds: u32,
}

/// Tries to give a refused order's units back before the buyer is told PENDING instead.
const UNDO_TRIES: usize = 3;

/// How long a SOLD_OUT answer waits for this gateway's holds in progress, and
/// how many times an attempt Redis found short asks again after them.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const SETTLE_ROUNDS: usize = 3;

/// Tries to release the funds held for an order that was not placed (about a
/// minute with the backoff's growth) before the hold is left to expire.
const RELEASE_TRIES: usize = 20;

/// How the hold of a fresh reservation went.
enum Held {
    Yes,
    /// The wallet refused: nothing is held (INSUFFICIENT_FUNDS, or the wallet's own reason).
    Refused(GatewayError),
    /// Not known: the hold may or may not have been made.
    Unknown(GatewayError),
}

/// One try to void an order's hold: true once the wallet has answered (voided,
/// or refused for good, which retrying would not change).
async fn release_once(
    wallet: &flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient<flashsale_server::TracedChannel>,
    void: &VoidRequest,
) -> bool {
    let voided = crate::upstream::retry_if_lost(|| {
        let mut client = wallet.clone();
        let void = void.clone();
        async move { client.void(request(void)).await }
    })
    .await;
    match voided.map_err(GatewayError::from_upstream) {
        Ok(_) => {
            metrics::counter!("flashsale_purchase_holds_released_total", "outcome" => "voided").increment(1);
            true
        }
        Err(GatewayError::Upstream(status)) => {
            // HOLD_CAPTURED cannot happen to an order never published.
            tracing::warn!(error = %status, order.id = %void.order_id, "the wallet refused to release a hold");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, order.id = %void.order_id, "could not release a hold");
            false
        }
    }
}

/// The `ErrorInfo` reason of a neighbour's status.
fn reason_of(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_error_details().error_info().map(|info| info.reason.clone())
}

/// A validated purchase.
struct Attempt {
    item: Arc<CatalogItem>,
    quantity: u32,
    idempotency_key: String,
    order_id: String,
}

impl Purchases {
    pub fn new(
        catalog: Arc<Catalog>,
        admission: Arc<Admission>,
        publisher: Arc<OrderPublisher>,
        upstreams: Upstreams,
        limits: Arc<crate::abuse::AbuseLimits>,
        hold_ttl_seconds: u32,
    ) -> Self {
        Self {
            catalog,
            admission,
            publisher,
            upstreams,
            rebuilds: Mutex::new(HashMap::new()),
            limits,
            hold_ttl_seconds,
        }
    }

    pub async fn purchase(
        self: &Arc<Self>,
        buyer: &Principal,
        request: PurchaseRequest,
    ) -> Result<PurchaseResponse, GatewayError> {
        let PurchaseRequest { item_id, quantity, idempotency_key } = request;
        ItemId::check(&item_id)?;
        if quantity == 0 {
            return Err(GatewayError::invalid("quantity", "must be at least 1"));
        }
        if !idempotency_key.is_empty() {
            IdempotencyKey::check(&idempotency_key)?;
        }

        // Step 1: in memory.
        let item = self.catalog.lookup(&item_id).await?;
        let now = now_ms();
        if now < item.starts_at_ms {
            return Err(GatewayError::SaleNotStarted);
        }
        if now >= item.ends_at_ms {
            return Err(GatewayError::SaleEnded);
        }
        if quantity > item.per_user_limit {
            return Err(GatewayError::invalid(
                "quantity",
                format!("must be at most the per-user limit of {}", item.per_user_limit),
            ));
        }
        // A sold-out item turns the crowd away here, except a buyer retrying a
        // key who may have an order from it (a purchase that succeeded, its reply
        // lost): the answer must be that order, not SOLD_OUT. One lookup, no script.
        let explicit_key = !idempotency_key.is_empty();
        // Units this gateway reserved a moment ago may come back when their
        // buyer's hold is refused: SOLD_OUT waits for those holds (milliseconds,
        // no I/O here), so a buyer who can pay is offered such a unit instead.
        if item.is_sold_out() && item.sold_out.unsettled() {
            item.sold_out.settled(SETTLE_WAIT).await;
        }
        if item.is_sold_out() && !self.may_have_an_order(&item, buyer, explicit_key).await? {
            return Err(GatewayError::SoldOut);
        }

        self.limits.check_buyer(buyer)?;

        if item.is_sold_out() {
            // A read: nothing to finish if the request is dropped, so no task of its own.
            let prior = self.admission.prior_order(item.spread(), &buyer.user_id, &idempotency_key).await?;
            return match prior {
                None => Err(GatewayError::SoldOut),
                Some((_, earlier)) if earlier != quantity => Err(GatewayError::IdempotencyKeyReused),
                Some((order_id, _)) => {
                    // Replaying may publish again, which must not be cut short.
                    let attempt = Attempt { item, quantity, idempotency_key, order_id: order_id.clone() };
                    let this = self.clone();
                    let buyer = buyer.clone();
                    tokio::spawn(async move { this.replay(&buyer, &attempt, order_id).await }.in_current_span())
                        .await
                        .map_err(|e| GatewayError::Internal(Box::new(e)))?
                }
            };
        }

        // Minted only now: the crowd turned away above costs no random numbers.
        let order_id = uuid::Uuid::now_v7().to_string();
        let idempotency_key = if explicit_key { idempotency_key } else { order_id.clone() };
        let attempt = Attempt { item, quantity, idempotency_key, order_id };

        // From here on Redis may change, so the rest runs in a task of its own:
        // a client that disconnects (or a server timeout) must not drop the
        // request between taking the tokens and publishing or giving them back.
        let this = self.clone();
        let buyer = buyer.clone();
        tokio::spawn(async move { this.admit_and_place(&buyer, attempt).await }.in_current_span())
            .await
            .map_err(|e| GatewayError::Internal(Box::new(e)))?
    }

    /// Whether a buyer may have an order from a sold-out item under some key:
    /// only buyers holding a key can (see [`crate::catalog::SoldOut`]).
    async fn may_have_an_order(
        &self,
        item: &CatalogItem,
        buyer: &Principal,
        explicit_key: bool,
    ) -> Result<bool, GatewayError> {
        if !explicit_key {
            return Ok(false);
        }
        let load = || async {
            if let Some(read) = self.admission.key_holders(item.spread()).await? {
                return Ok(read);
            }
            // Redis lost the item's state, and with it the keys: rebuild it from
            // inventory (which restores every recorded key) before judging.
            self.rebuild(item).await?;
            self.admission
                .key_holders(item.spread())
                .await?
                .ok_or_else(|| GatewayError::Unavailable("admission state missing after a rebuild".into()))
        };
        let holders = item.sold_out.key_holders(|| self.admission.admission_stamp(item.spread()), load).await?;
        Ok(holders.is_none_or(|holders| holders.contains(&buyer.user_id)))
    }

    async fn admit_and_place(&self, buyer: &Principal, attempt: Attempt) -> Result<PurchaseResponse, GatewayError> {
        // Step 2: one Redis round trip (two when the state must be rebuilt first).
        let item = &attempt.item;
        let mut waits = 0;
        let (decision, generation) = loop {
            // A SOLD_OUT answer counts only if no units came back since it was asked.
            let generation = item.sold_out.generation();
            let unsettled = item.sold_out.attempt();
            let mut decision = self.admit(buyer, &attempt).await?;
            if decision == Admit::NotReady {
                self.rebuild(item).await?;
                decision = self.admit(buyer, &attempt).await?;
            }
            if let Admit::Reserved { tokens_left } = decision {
                if tokens_left <= 0 {
                    item.sold_out.set_since(generation);
                }
                return self.place(buyer, &attempt, unsettled).await;
            }
            drop(unsettled);
            // Not enough left, but this gateway's reservations still waiting for
            // their holds may give units back: ask again once they have settled.
            let short = matches!(decision, Admit::SoldOut | Admit::NotEnoughStock { .. });
            if short && waits < SETTLE_ROUNDS && item.sold_out.unsettled() {
                waits += 1;
                item.sold_out.settled(SETTLE_WAIT).await;
                continue;
            }
            break (decision, generation);
        };
        match decision {
            // Placed inside the loop; never breaks out of it.
            Admit::Reserved { .. } => Err(GatewayError::Internal("a reservation left unplaced".into())),
            Admit::Duplicate { order_id, quantity: earlier } => {
                if earlier != attempt.quantity {
                    return Err(GatewayError::IdempotencyKeyReused);
                }
                self.replay(buyer, &attempt, order_id).await
            }
            Admit::InProgress { order_id } => Err(GatewayError::PurchaseInProgress { order_id }),
            Admit::LimitReached => Err(GatewayError::LimitReached),
            // Units are left: no sold-out mark, a smaller request may buy them.
            Admit::NotEnoughStock { units_left } => Err(GatewayError::NotEnoughStock { units_left }),
            Admit::SoldOut => {
                item.sold_out.set_since(generation);
                Err(GatewayError::SoldOut)
            }
            Admit::NotReady => Err(GatewayError::Unavailable("admission state missing after a rebuild".into())),
        }
    }

    async fn admit(&self, buyer: &Principal, attempt: &Attempt) -> Result<Admit, GatewayError> {
        self.admission
            .admit(
                attempt.item.spread(),
                &buyer.user_id,
                attempt.quantity,
                attempt.item.per_user_limit,
                &attempt.idempotency_key,
                &attempt.order_id,
            )
            // The one Redis round trip that decides the purchase.
            .instrument(
                flashsale_telemetry::info_span!("admission", db.system.name = "redis", item.id = %attempt.item.id),
            )
            .await
    }

    /// Steps 3–4 for a fresh reservation: the buyer's money is held, then the
    /// order is published. Whatever fails, the buyer is told the truth: either
    /// nothing was bought (the units are certainly back on offer and nothing
    /// stays held) or the order goes through (PENDING, with its id).
    async fn place(
        &self,
        buyer: &Principal,
        attempt: &Attempt,
        unsettled: crate::catalog::Unsettled,
    ) -> Result<PurchaseResponse, GatewayError> {
        let record = self.record(buyer, attempt, &attempt.order_id)?;
        // The record only lets GetOrder answer PENDING before inventory has the
        // order. The units are reserved already, so failing here would answer
        // "nothing bought" for an admission the reconciler later publishes:
        // carry on, and GetOrder learns the order from inventory once recorded.
        if let Err(e) = self.admission.save_record(&record).await {
            tracing::warn!(error = %e, order.id = %attempt.order_id, "could not save the admission record; publishing anyway");
        }
        // Fault tests: units reserved in Redis, no money held yet.
        flashsale_server::crash_point("gateway-before-hold");
        match self.hold(&record).await {
            Held::Yes => {}
            Held::Refused(refusal) => {
                // Nothing is held: the units go back and the buyer hears why at once.
                if self.undo(buyer, attempt).await {
                    attempt.item.clear_sold_out();
                    return Err(refusal);
                }
                // The reservation may stand and be published by the reconciler:
                // the order goes through, and inventory's debit decides it.
                tracing::warn!(order.id = %attempt.order_id, "hold refused and the reservation could not be undone; the order stays accepted");
                return Ok(self.go_through(&record).await);
            }
            Held::Unknown(error) => {
                if self.undo(buyer, attempt).await {
                    attempt.item.clear_sold_out();
                    // The hold may have been made: release it, so "nothing was
                    // bought" is true of the money as well as of the units.
                    self.release(&record).await;
                    return Err(error);
                }
                // Kept: inventory captures the hold if it was made, debits otherwise.
                tracing::warn!(error = %error, order.id = %attempt.order_id, "hold outcome unknown and the reservation could not be undone; the order stays accepted");
                return Ok(self.go_through(&record).await);
            }
        }
        // The units are sold unless the publish fails: buyers waiting on this
        // hold's outcome may be told SOLD_OUT now.
        drop(unsettled);
        // Fault tests: units reserved and money held, nothing published yet.
        flashsale_server::crash_point("gateway-before-publish");
        match self.publisher.publish(&placed_message(&record)).await {
            // Fault tests: the order is queued, the buyer not told.
            Ok(()) => flashsale_server::crash_point("gateway-before-reply"),
            Err(PublishFailure::NotSent(error)) => {
                // Certainly not queued: give the units and the money back, so the
                // buyer's retry under the same key starts afresh, and only then
                // say UNAVAILABLE ("nothing was bought").
                if self.undo(buyer, attempt).await {
                    // The units are on offer again: this gateway must not keep saying SOLD_OUT.
                    attempt.item.clear_sold_out();
                    self.release(&record).await;
                    return Err(GatewayError::Unavailable(Box::new(error)));
                }
                // The reservation may stand, and the reconciler publishes a kept
                // reservation after its grace: the buyer would be charged after
                // hearing "nothing was bought". So the order goes through: this
                // gateway keeps it and publishes it until confirmed, and the buyer
                // is told PENDING with its id.
                tracing::warn!(error = %error, order.id = %attempt.order_id, "not queued and the reservation could not be undone; the order stays accepted");
                return Ok(self.go_through(&record).await);
            }
            Err(PublishFailure::Unknown(error)) => {
                // Perhaps queued, and if not, the publisher sends it again until
                // confirmed, and the reconciler publishes the kept reservation
                // after its grace (inventory keeps one copy per order id). Either
                // way the order goes through, so the buyer is told so, with its id
                // to follow: answering UNAVAILABLE here would tell a buyer "nothing
                // was bought" who is charged a minute later.
                tracing::warn!(error = %error, order.id = %attempt.order_id, "publish outcome unknown; the order stays accepted");
                return Ok(self.go_through(&record).await);
            }
        }
        tracing::debug!(order.id = %attempt.order_id, item.id = %attempt.item.id, user.id = %buyer.user_id, "order accepted");
        Ok(PurchaseResponse { order_id: attempt.order_id.clone(), status: OrderStatus::Pending.into() })
    }

    /// An order whose reservation stands though a step after it failed: kept in
    /// this process and published until confirmed, recorded straight in
    /// inventory, and answered PENDING.
    async fn go_through(&self, record: &AdmissionRecord) -> PurchaseResponse {
        if !self.publisher.publish_until_confirmed(placed_message(record)) {
            tracing::warn!(order.id = %record.order_id, "too many unconfirmed orders kept; this one is left to the reconciler");
        }
        self.record_directly(record).await;
        PurchaseResponse { order_id: record.order_id.clone(), status: OrderStatus::Pending.into() }
    }

    /// Holds the order's price in the buyer's wallet under the order id (one
    /// hold per order id, so a call lost in transit is sent again safely).
    async fn hold(&self, record: &AdmissionRecord) -> Held {
        let held = crate::upstream::retry_if_lost(|| {
            let mut client = self.upstreams.wallet.clone();
            let hold = HoldRequest {
                order_id: record.order_id.clone(),
                user_id: record.user_id.clone(),
                amount: Some(record.amount()),
                ttl_seconds: self.hold_ttl_seconds,
                reference: format!("order {}", record.order_id),
            };
            async move { client.hold(request(hold)).await }
        })
        .instrument(flashsale_telemetry::info_span!("hold", order.id = %record.order_id))
        .await;
        let (outcome, held) = match held {
            Ok(_) => ("held", Held::Yes),
            Err(status) => match GatewayError::from_upstream(status) {
                GatewayError::Upstream(status) if reason_of(&status).as_deref() == Some("INSUFFICIENT_FUNDS") => {
                    ("insufficient_funds", Held::Refused(GatewayError::InsufficientFunds))
                }
                // The order was voided before this hold arrived: another copy of
                // it (republished by a retry under its key while this request
                // was slow) reached inventory, which rejected it. Its fate is
                // decided; publishing again changes nothing (one order per id)
                // and the buyer follows the order to that end.
                GatewayError::Upstream(status) if reason_of(&status).as_deref() == Some("HOLD_VOIDED") => {
                    ("voided_first", Held::Yes)
                }
                // Likewise, a copy of the order was paid (or refused) by a debit
                // before this hold arrived: the wallet holds nothing for it.
                GatewayError::Upstream(status) if reason_of(&status).as_deref() == Some("HOLD_CAPTURED") => {
                    ("paid_first", Held::Yes)
                }
                refused @ GatewayError::Upstream(_) => ("refused", Held::Refused(refused)),
                error => ("unknown", Held::Unknown(error)),
            },
        };
        metrics::counter!("flashsale_purchase_holds_total", "outcome" => outcome).increment(1);
        held
    }

    /// Releases the funds held for an order that will not be placed: once
    /// before the buyer is answered (so a retry straight after UNAVAILABLE finds
    /// the money available), then, if the wallet did not answer, in a task of
    /// its own that tries a while; a hold nobody releases expires after
    /// `PURCHASE_HOLD_TTL_SECONDS`.
    async fn release(&self, record: &AdmissionRecord) {
        let wallet = self.upstreams.wallet.clone();
        let void = VoidRequest {
            order_id: record.order_id.clone(),
            user_id: record.user_id.clone(),
            amount: Some(record.amount()),
        };
        if release_once(&wallet, &void).await {
            return;
        }
        tokio::spawn(
            async move {
                let mut backoff = flashsale_messaging::Backoff::new();
                for _ in 1..RELEASE_TRIES {
                    tokio::time::sleep(backoff.delay()).await;
                    backoff.grow();
                    if release_once(&wallet, &void).await {
                        return;
                    }
                }
                metrics::counter!("flashsale_purchase_holds_released_total", "outcome" => "left_to_expire")
                    .increment(1);
            }
            .in_current_span(),
        );
    }

    /// Records an order the broker did not confirm straight in inventory
    /// (`RecordOrder`), before the buyer is told PENDING: the copies kept in this
    /// process's memory and in Redis would both be gone after a crash of this
    /// gateway together with a Redis loss, and the order with them. The kept
    /// copy is still published until confirmed; inventory keeps one order per id.
    /// If inventory cannot be reached either, the order keeps those two copies.
    async fn record_directly(&self, record: &AdmissionRecord) {
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
    async fn undo(&self, buyer: &Principal, attempt: &Attempt) -> bool {
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
    async fn replay(
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

    fn record(&self, buyer: &Principal, attempt: &Attempt, order_id: &str) -> Result<AdmissionRecord, GatewayError> {
        let amount_minor = attempt
            .item
            .price_minor
            .checked_mul(i64::from(attempt.quantity))
            .ok_or_else(|| GatewayError::invalid("quantity", "price × quantity overflows"))?;
        Ok(AdmissionRecord {
            order_id: order_id.to_owned(),
            user_id: buyer.user_id.clone(),
            item_id: attempt.item.id.clone(),
            quantity: attempt.quantity,
            currency: attempt.item.currency.clone(),
            amount_minor,
            idempotency_key: attempt.idempotency_key.clone(),
            created_at_ms: now_ms(),
        })
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

/// The queue message for an admitted order.
pub(crate) fn placed_message(record: &AdmissionRecord) -> OrderPlaced {
    OrderPlaced {
        order_id: record.order_id.clone(),
        user_id: record.user_id.clone(),
        item_id: record.item_id.clone(),
        quantity: record.quantity,
        amount: Some(record.amount()),
        idempotency_key: record.idempotency_key.clone(),
        placed_at: Some(flashsale_domain::time::from_ms(record.created_at_ms)),
    }
}

/// Buyers see PENDING until an order is final; PAYMENT_PENDING is internal.
pub fn public_status(status: i32) -> OrderStatus {
    match OrderStatus::try_from(status) {
        Ok(OrderStatus::PaymentPending) => OrderStatus::Pending,
        Ok(other) => other,
        Err(_) => OrderStatus::Unspecified,
    }
}
