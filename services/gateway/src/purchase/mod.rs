//! The purchase hot path (services/DESIGN.md, "The purchase path", steps 1–3): local checks with no
//! I/O, one Redis script, then — for the few winners only — the admission
//! record, the hold of the buyer's money and the confirmed publish of
//! `OrderPlaced`. The hold and its release: `funds.rs`; undoing a
//! reservation, an order that must go through anyway, a retried key and a
//! lost Redis state: `recovery.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use flashsale_domain::time::now_ms;
use flashsale_domain::{IdempotencyKey, ItemId};
use flashsale_proto::common::v1::OrderStatus;
use flashsale_proto::gateway::v1::{PurchaseRequest, PurchaseResponse};
use flashsale_proto::inventory::v1::OrderPlaced;
use parking_lot::Mutex;
use tracing::Instrument;

use self::funds::Held;
use crate::admission::{Admission, AdmissionRecord, Admit};
use crate::auth::Principal;
use crate::catalog::{Catalog, CatalogItem};
use crate::error::GatewayError;
use crate::order_publisher::{OrderPublisher, PublishFailure};
use crate::upstream::Upstreams;

mod funds;
mod recovery;

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
    /// Turns for holds in flight to the wallet ([`funds::HOLDS_IN_FLIGHT`]).
    hold_turns: tokio::sync::Semaphore,
}

/// Tries to give a refused order's units back before the buyer is told PENDING instead.
const UNDO_TRIES: usize = 3;

/// How long a SOLD_OUT answer waits for this gateway's holds in progress, and
/// how many times an attempt Redis found short asks again after them.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const SETTLE_ROUNDS: usize = 3;

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
            hold_turns: tokio::sync::Semaphore::new(funds::HOLDS_IN_FLIGHT),
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
