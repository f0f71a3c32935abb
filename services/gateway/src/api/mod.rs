//! The gateway's operations, one implementation each, shared by both encodings:
//! `grpc.rs` (protobuf over HTTP/2) and `rest/` (JSON over HTTP/1.1 and 2). Every
//! operation takes the authenticated caller and a request in the proto's types
//! and answers in them, so a rule (who may see an order, what a buyer sees of
//! PAYMENT_PENDING, when an item is refreshed in the local catalog) lives here once.
//! The operator's calls are in `admin.rs`.

use std::sync::Arc;
use std::time::Duration;

use flashsale_domain::{ItemId, OrderId};
use flashsale_proto::common::v1::{self as pb, OrderStatus};
use flashsale_proto::gateway::v1::*;
use flashsale_proto::inventory::v1 as inventory;
use flashsale_proto::inventory::v1::OrderEvent;
use flashsale_proto::wallet::v1 as wallet;
use tokio::sync::{broadcast, mpsc};
use tracing::Instrument;

use crate::auth::{Authenticator, Principal};
use crate::catalog::Catalog;
use crate::error::GatewayError;
use crate::purchase::{Purchases, public_status};
use crate::upstream::{Upstreams, request, retry_if_lost};

mod admin;

/// How often an order watch re-reads the order in case an event was missed
/// (consumer reconnecting, broadcast lag).
const WATCH_RECHECK: Duration = Duration::from_secs(2);
/// The most sales one `GetOrder` of an order unknown to inventory looks through
/// in Redis (one HGET each, in one round trip).
const MAX_LOOKUP_ITEMS: usize = 256;

/// The operations layer: one implementation of every gateway operation.
pub struct Operations {
    pub auth: Authenticator,
    pub purchases: Arc<Purchases>,
    pub catalog: Arc<Catalog>,
    pub upstreams: Upstreams,
    pub watchers: broadcast::Sender<Arc<OrderEvent>>,
    pub limits: Arc<crate::abuse::AbuseLimits>,
    pub audit: Arc<crate::audit::AuditLog>,
}

impl Operations {
    /// The caller named by an `Authorization: Bearer …` value (gRPC metadata
    /// or HTTP header), once the call is within its client address's rate
    /// (checked first, so a flood of forged tokens is turned away as cheaply).
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        client: Option<std::net::IpAddr>,
    ) -> Result<Principal, GatewayError> {
        self.limits.check_client(client)?;
        self.auth.authenticate_header(authorization).await
    }

    pub async fn list_items(
        &self,
        _caller: &Principal,
        req: ListItemsRequest,
    ) -> Result<ListItemsResponse, GatewayError> {
        let ListItemsRequest { page_size, page_token, include_ended } = req;
        // Live and upcoming sales, unless the history is asked for: a buyer's
        // listing must not load every sale ever held.
        let now = std::time::SystemTime::now();
        let ending_after = (!include_ended).then(|| prost_types::Timestamp::from(now));
        let reply = retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let listing = inventory::ListItemsRequest { page_size, page_token: page_token.clone(), ending_after };
            async move { client.list_items(request(listing)).await }
        })
        .await
        .map_err(GatewayError::from_upstream)?
        .into_inner();
        // Only sales still running or to come join the catalog (which the
        // refresher and the reconciler walk); the history stays out of it.
        let now_ms = flashsale_domain::time::now_ms();
        for item in
            reply.items.iter().filter(|item| item.ends_at.as_ref().is_some_and(|end| end.seconds * 1_000 > now_ms))
        {
            self.catalog.upsert(item);
        }
        Ok(ListItemsResponse { items: reply.items, next_page_token: reply.next_page_token })
    }

    pub async fn get_item(&self, _caller: &Principal, req: GetItemRequest) -> Result<GetItemResponse, GatewayError> {
        let GetItemRequest { item_id } = req;
        ItemId::check(&item_id)?;
        let reply = retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let lookup = inventory::GetItemRequest { item_id: item_id.clone() };
            async move { client.get_item(request(lookup)).await }
        })
        .await
        .map_err(GatewayError::from_upstream)?
        .into_inner();
        Ok(GetItemResponse { item: reply.item })
    }

    pub async fn purchase(&self, buyer: &Principal, req: PurchaseRequest) -> Result<PurchaseResponse, GatewayError> {
        let span = flashsale_telemetry::info_span!(
            "purchase",
            user.id = %buyer.user_id,
            item.id = %req.item_id,
            purchase.quantity = req.quantity,
            order.id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let result = self.purchases.purchase(buyer, req).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(reply) => {
                span.record("order.id", reply.order_id.as_str());
                "ACCEPTED"
            }
            Err(error) => error.reason(),
        };
        span.record("outcome", outcome);
        metrics::counter!("flashsale_purchase_attempts_total", "outcome" => outcome).increment(1);
        result
    }

    /// The caller's order as buyers see it: from inventory once recorded, from
    /// the admission record before that (PENDING, never NOT_FOUND).
    pub async fn get_order(&self, buyer: &Principal, order_id: &str) -> Result<pb::Order, GatewayError> {
        OrderId::parse(order_id)?;
        // The admission record is read before asking inventory: it is deleted only
        // after inventory has committed the order, so one of the two always answers.
        // (Asking inventory first leaves a gap: not there yet, then record deleted.)
        let record = self.purchases.admission.load_record(order_id).await?;
        if let Some(order) = self.recorded_order(order_id).await? {
            visible_to(buyer, &order.user_id)?;
            return Ok(public_order(order));
        }
        let Some(record) = record else { return self.order_from_admission(buyer, order_id).await };
        visible_to(buyer, &record.user_id)?;
        let amount = pb::Money { currency: record.currency, amount_minor: record.amount_minor };
        Ok(pending_order(
            record.order_id,
            record.user_id,
            record.item_id,
            record.quantity,
            Some(amount),
            record.created_at_ms,
            record.idempotency_key,
        ))
    }

    /// Inventory's copy of the order, or `None` while it has not recorded it.
    async fn recorded_order(&self, order_id: &str) -> Result<Option<pb::Order>, GatewayError> {
        let found = retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let lookup = inventory::GetOrderRequest { order_id: order_id.to_owned() };
            async move { client.get_order(request(lookup)).await }
        })
        .await;
        match found {
            Ok(reply) => Ok(Some(reply.into_inner().order.ok_or(GatewayError::OrderNotFound)?)),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(GatewayError::from_upstream(status)),
        }
    }

    /// An order neither in inventory nor in an admission record: its record could
    /// not be saved when it was admitted. The reservation itself names it, until
    /// the order is final; if it became final meanwhile, inventory has it now.
    async fn order_from_admission(&self, buyer: &Principal, order_id: &str) -> Result<pb::Order, GatewayError> {
        // The sales that ended last are the likeliest to hold it; a lookup asks
        // at most MAX_LOOKUP_ITEMS of them, whatever the catalog holds.
        let mut items: Vec<Arc<crate::catalog::CatalogItem>> = self.catalog.all();
        items.sort_unstable_by_key(|item| std::cmp::Reverse(item.ends_at_ms));
        items.truncate(MAX_LOOKUP_ITEMS);
        let spreads: Vec<_> = items.iter().map(|item| item.spread()).collect();
        // A buyer's own orders only (an operator's look-up asks every bucket).
        let owner = (!buyer.admin).then_some(buyer.user_id.as_str());
        let Some((item_id, user_id, quantity, at_ms, key)) =
            self.purchases.admission.admitted_entry(&spreads, owner, order_id).await?
        else {
            let order = self.recorded_order(order_id).await?.ok_or(GatewayError::OrderNotFound)?;
            visible_to(buyer, &order.user_id)?;
            return Ok(public_order(order));
        };
        visible_to(buyer, &user_id)?;
        let amount = items.iter().find(|item| item.id == item_id).map(|item| pb::Money {
            currency: item.currency.clone(),
            amount_minor: item.price_minor.saturating_mul(i64::from(quantity)),
        });
        Ok(pending_order(order_id.to_owned(), user_id, item_id, quantity, amount, at_ms, key))
    }

    pub async fn list_orders(
        &self,
        buyer: &Principal,
        req: ListOrdersRequest,
    ) -> Result<ListOrdersResponse, GatewayError> {
        let ListOrdersRequest { page_size, page_token } = req;
        let reply = retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let listing = inventory::ListOrdersRequest {
                user_id: buyer.user_id.clone(),
                item_id: String::new(),
                page_size,
                page_token: page_token.clone(),
            };
            async move { client.list_orders(request(listing)).await }
        })
        .await
        .map_err(GatewayError::from_upstream)?
        .into_inner();
        Ok(ListOrdersResponse {
            orders: reply.orders.into_iter().map(public_order).collect(),
            next_page_token: reply.next_page_token,
        })
    }

    /// The order's current state, then each change, ending after a final state.
    /// Subscribes first, then reads: a final state cannot slip between the two.
    /// The receiver closes when the order is final or the watch fails.
    pub async fn watch_order(
        self: &Arc<Self>,
        buyer: &Principal,
        order_id: &str,
    ) -> Result<mpsc::Receiver<pb::Order>, GatewayError> {
        // Held by the watch task: the buyer's slot frees when the stream ends.
        let slot = self.limits.open_watch(&buyer.user_id)?;
        let mut events = self.watchers.subscribe();
        let current = self.get_order(buyer, order_id).await?;
        let (tx, rx) = mpsc::channel(8);
        let this = self.clone();
        let buyer = buyer.clone();
        let order_id = order_id.to_owned();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last = current;
            if tx.send(last.clone()).await.is_err() || is_final(&last) {
                return;
            }
            let mut recheck = tokio::time::interval(WATCH_RECHECK);
            recheck.tick().await;
            loop {
                let next = tokio::select! {
                    event = events.recv() => match event {
                        Ok(event) => match &event.order {
                            Some(order) if order.id == order_id => Some(public_order(order.clone())),
                            _ => None,
                        },
                        Err(broadcast::error::RecvError::Lagged(_)) => this.get_order(&buyer, &order_id).await.ok(),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = recheck.tick() => this.get_order(&buyer, &order_id).await.ok(),
                    () = tx.closed() => return,
                };
                let Some(order) = next else { continue };
                if order.status == last.status {
                    continue;
                }
                last = order;
                if tx.send(last.clone()).await.is_err() || is_final(&last) {
                    return;
                }
            }
        });
        Ok(rx)
    }

    pub async fn refund_order(&self, buyer: &Principal, order_id: &str) -> Result<pb::Order, GatewayError> {
        OrderId::parse(order_id)?;
        // Safe to send again: a refund is idempotent (a second one answers the
        // refunded order; the wallet credits once per order).
        let reply = retry_if_lost(|| {
            let mut client = self.upstreams.inventory.clone();
            let refund =
                inventory::RefundOrderRequest { order_id: order_id.to_owned(), user_id: buyer.user_id.clone() };
            async move { client.refund_order(request(refund)).await }
        })
        .await
        .map_err(GatewayError::from_upstream)?
        .into_inner();
        reply.order.map(public_order).ok_or(GatewayError::OrderNotFound)
    }

    pub async fn get_balance(
        &self,
        buyer: &Principal,
        req: GetBalanceRequest,
    ) -> Result<GetBalanceResponse, GatewayError> {
        let GetBalanceRequest { currency } = req;
        let reply = retry_if_lost(|| {
            let mut client = self.upstreams.wallet.clone();
            let lookup = wallet::GetBalanceRequest { user_id: buyer.user_id.clone(), currency: currency.clone() };
            async move { client.get_balance(request(lookup)).await }
        })
        .await
        .map_err(GatewayError::from_upstream)?
        .into_inner();
        Ok(GetBalanceResponse { balances: reply.balances, held: reply.held })
    }
}

fn public_order(mut order: pb::Order) -> pb::Order {
    order.status = public_status(order.status).into();
    order
}

pub fn is_final(order: &pb::Order) -> bool {
    matches!(
        OrderStatus::try_from(order.status),
        Ok(OrderStatus::Confirmed | OrderStatus::Rejected | OrderStatus::Refunded)
    )
}

/// Someone else's order does not exist, as far as this caller can tell.
fn visible_to(buyer: &Principal, owner: &str) -> Result<(), GatewayError> {
    if owner == buyer.user_id || buyer.admin { Ok(()) } else { Err(GatewayError::OrderNotFound) }
}

/// An order inventory has not recorded yet, as buyers see it: PENDING.
fn pending_order(
    id: String,
    user_id: String,
    item_id: String,
    quantity: u32,
    amount: Option<pb::Money>,
    created_at_ms: i64,
    idempotency_key: String,
) -> pb::Order {
    let created = flashsale_domain::time::from_ms(created_at_ms);
    pb::Order {
        id,
        user_id,
        item_id,
        quantity,
        amount,
        status: OrderStatus::Pending.into(),
        reject_reason: String::new(),
        created_at: Some(created),
        updated_at: Some(created),
        idempotency_key,
    }
}
