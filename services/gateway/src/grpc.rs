//! The public gRPC API: `flashsale.gateway.v1.FlashSaleGateway` for buyers and
//! `flashsale.gateway.v1.AdminService` for operators. Handlers authenticate,
//! decode, call the purchase path or an internal service, and encode.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flashsale_proto::common::v1::{self as pb, OrderStatus};
use flashsale_proto::gateway::v1::admin_service_server::AdminService;
use flashsale_proto::gateway::v1::flash_sale_gateway_server::FlashSaleGateway;
use flashsale_proto::gateway::v1::*;
use flashsale_proto::inventory::v1 as inventory;
use flashsale_proto::inventory::v1::OrderEvent;
use flashsale_proto::wallet::v1 as wallet;
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, Principal};
use crate::catalog::Catalog;
use crate::error::GatewayError;
use crate::purchase::{Purchases, public_status, validate_item_id};
use crate::upstream::{Upstreams, request};

/// How often a WatchOrder stream re-reads the order in case an event was missed
/// (consumer reconnecting, broadcast lag).
const WATCH_RECHECK: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct GatewayGrpc {
    pub auth: Authenticator,
    pub purchases: Arc<Purchases>,
    pub catalog: Arc<Catalog>,
    pub upstreams: Upstreams,
    pub watchers: broadcast::Sender<Arc<OrderEvent>>,
}

impl GatewayGrpc {
    fn buyer<T>(&self, request: &Request<T>) -> Result<Principal, GatewayError> {
        self.auth.authenticate(request.metadata())
    }

    fn admin<T>(&self, request: &Request<T>) -> Result<Principal, GatewayError> {
        let principal = self.buyer(request)?;
        if principal.admin { Ok(principal) } else { Err(GatewayError::Forbidden) }
    }

    /// The caller's order as buyers see it: from inventory once recorded, from
    /// the admission record before that (PENDING, never NOT_FOUND).
    async fn order_for(&self, buyer: &Principal, order_id: &str) -> Result<pb::Order, GatewayError> {
        if uuid::Uuid::parse_str(order_id).is_err() {
            return Err(GatewayError::invalid("order_id", "must be a UUID"));
        }
        // The admission record is read before asking inventory: it is deleted only
        // after inventory has committed the order, so one of the two always answers.
        // (Asking inventory first leaves a gap: not there yet, then record deleted.)
        let record = self.purchases.admission.load_record(order_id).await?;
        let found = self
            .upstreams
            .inventory
            .clone()
            .get_order(request(inventory::GetOrderRequest { order_id: order_id.to_owned() }))
            .await;
        match found {
            Ok(reply) => {
                let order = reply.into_inner().order.ok_or(GatewayError::OrderNotFound)?;
                // Someone else's order does not exist, as far as this caller can tell.
                if order.user_id != buyer.user_id && !buyer.admin {
                    return Err(GatewayError::OrderNotFound);
                }
                Ok(public_order(order))
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                let record = record.ok_or(GatewayError::OrderNotFound)?;
                if record.user_id != buyer.user_id && !buyer.admin {
                    return Err(GatewayError::OrderNotFound);
                }
                let created = timestamp_ms(record.created_at_ms);
                Ok(pb::Order {
                    id: record.order_id,
                    user_id: record.user_id,
                    item_id: record.item_id,
                    quantity: record.quantity,
                    amount: Some(pb::Money { currency: record.currency, amount_minor: record.amount_minor }),
                    status: OrderStatus::Pending.into(),
                    reject_reason: String::new(),
                    created_at: Some(created),
                    updated_at: Some(created),
                    idempotency_key: record.idempotency_key,
                })
            }
            Err(status) => Err(GatewayError::from_upstream(status)),
        }
    }
}

fn timestamp_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn public_order(mut order: pb::Order) -> pb::Order {
    order.status = public_status(order.status).into();
    order
}

fn is_final(order: &pb::Order) -> bool {
    matches!(
        OrderStatus::try_from(order.status),
        Ok(OrderStatus::Confirmed | OrderStatus::Rejected | OrderStatus::Refunded)
    )
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchOrderResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl FlashSaleGateway for GatewayGrpc {
    async fn list_items(&self, request_: Request<ListItemsRequest>) -> Result<Response<ListItemsResponse>, Status> {
        self.buyer(&request_)?;
        let ListItemsRequest { page_size, page_token } = request_.into_inner();
        let reply = self
            .upstreams
            .inventory
            .clone()
            .list_items(request(inventory::ListItemsRequest { page_size, page_token }))
            .await
            .map_err(GatewayError::from_upstream)?
            .into_inner();
        for item in &reply.items {
            self.catalog.upsert(item);
        }
        Ok(Response::new(ListItemsResponse { items: reply.items, next_page_token: reply.next_page_token }))
    }

    async fn get_item(&self, request_: Request<GetItemRequest>) -> Result<Response<GetItemResponse>, Status> {
        self.buyer(&request_)?;
        let GetItemRequest { item_id } = request_.into_inner();
        validate_item_id(&item_id)?;
        let reply = self
            .upstreams
            .inventory
            .clone()
            .get_item(request(inventory::GetItemRequest { item_id }))
            .await
            .map_err(GatewayError::from_upstream)?
            .into_inner();
        Ok(Response::new(GetItemResponse { item: reply.item }))
    }

    async fn purchase(&self, request_: Request<PurchaseRequest>) -> Result<Response<PurchaseResponse>, Status> {
        let buyer = self.buyer(&request_)?;
        let reply = self.purchases.purchase(&buyer, request_.into_inner()).await?;
        Ok(Response::new(reply))
    }

    async fn get_order(&self, request_: Request<GetOrderRequest>) -> Result<Response<GetOrderResponse>, Status> {
        let buyer = self.buyer(&request_)?;
        let GetOrderRequest { order_id } = request_.into_inner();
        let order = self.order_for(&buyer, &order_id).await?;
        Ok(Response::new(GetOrderResponse { order: Some(order) }))
    }

    async fn list_orders(&self, request_: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        let buyer = self.buyer(&request_)?;
        let ListOrdersRequest { page_size, page_token } = request_.into_inner();
        let reply = self
            .upstreams
            .inventory
            .clone()
            .list_orders(request(inventory::ListOrdersRequest {
                user_id: buyer.user_id,
                item_id: String::new(),
                page_size,
                page_token,
            }))
            .await
            .map_err(GatewayError::from_upstream)?
            .into_inner();
        Ok(Response::new(ListOrdersResponse {
            orders: reply.orders.into_iter().map(public_order).collect(),
            next_page_token: reply.next_page_token,
        }))
    }

    type WatchOrderStream = WatchStream;

    async fn watch_order(
        &self,
        request_: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let buyer = self.buyer(&request_)?;
        let WatchOrderRequest { order_id } = request_.into_inner();
        // Subscribe first, then read: a final state cannot slip between the two.
        let mut events = self.watchers.subscribe();
        let current = self.order_for(&buyer, &order_id).await?;
        let (tx, rx) = mpsc::channel(8);
        let this = self.clone();
        tokio::spawn(async move {
            let mut last = current;
            if tx.send(Ok(WatchOrderResponse { order: Some(last.clone()) })).await.is_err() || is_final(&last) {
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
                        Err(broadcast::error::RecvError::Lagged(_)) => this.order_for(&buyer, &order_id).await.ok(),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = recheck.tick() => this.order_for(&buyer, &order_id).await.ok(),
                    () = tx.closed() => return,
                };
                let Some(order) = next else { continue };
                if order.status == last.status {
                    continue;
                }
                last = order;
                if tx.send(Ok(WatchOrderResponse { order: Some(last.clone()) })).await.is_err() || is_final(&last) {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn refund_order(
        &self,
        request_: Request<RefundOrderRequest>,
    ) -> Result<Response<RefundOrderResponse>, Status> {
        let buyer = self.buyer(&request_)?;
        let RefundOrderRequest { order_id } = request_.into_inner();
        if uuid::Uuid::parse_str(&order_id).is_err() {
            return Err(GatewayError::invalid("order_id", "must be a UUID").into());
        }
        let reply = self
            .upstreams
            .inventory
            .clone()
            .refund_order(request(inventory::RefundOrderRequest { order_id, user_id: buyer.user_id }))
            .await
            .map_err(GatewayError::from_upstream)?
            .into_inner();
        Ok(Response::new(RefundOrderResponse { order: reply.order.map(public_order) }))
    }

    async fn get_balance(&self, request_: Request<GetBalanceRequest>) -> Result<Response<GetBalanceResponse>, Status> {
        let buyer = self.buyer(&request_)?;
        let GetBalanceRequest { currency } = request_.into_inner();
        let reply = self
            .upstreams
            .wallet
            .clone()
            .get_balance(request(wallet::GetBalanceRequest { user_id: buyer.user_id, currency }))
            .await
            .map_err(GatewayError::from_upstream)?
            .into_inner();
        Ok(Response::new(GetBalanceResponse { balances: reply.balances }))
    }
}

#[tonic::async_trait]
impl AdminService for GatewayGrpc {
    async fn create_item(&self, request_: Request<CreateItemRequest>) -> Result<Response<CreateItemResponse>, Status> {
        self.admin(&request_)?;
        let CreateItemRequest { id, name, price, stock_total, per_user_limit, starts_at, ends_at } =
            request_.into_inner();
        let reply = self
            .upstreams
            .inventory
            .clone()
            .create_item(request(inventory::CreateItemRequest {
                id,
                name,
                price,
                stock_total,
                per_user_limit,
                starts_at,
                ends_at,
            }))
            .await
            .map_err(GatewayError::from_upstream)?
            .into_inner();
        if let Some(item) = &reply.item {
            self.catalog.upsert(item);
        }
        Ok(Response::new(CreateItemResponse { item: reply.item }))
    }

    async fn top_up(&self, request_: Request<TopUpRequest>) -> Result<Response<TopUpResponse>, Status> {
        self.admin(&request_)?;
        let TopUpRequest { user_id, amount, idempotency_key } = request_.into_inner();
        let idempotency_key =
            if idempotency_key.is_empty() { format!("top-up:{}", uuid::Uuid::now_v7()) } else { idempotency_key };
        let reply = self
            .upstreams
            .wallet
            .clone()
            .credit(request(wallet::CreditRequest { idempotency_key, user_id, amount, reference: "top-up".into() }))
            .await
            .map_err(GatewayError::from_upstream)?
            .into_inner();
        Ok(Response::new(TopUpResponse { balance: reply.transaction.and_then(|t| t.balance_after) }))
    }

    async fn get_item_stats(
        &self,
        request_: Request<GetItemStatsRequest>,
    ) -> Result<Response<GetItemStatsResponse>, Status> {
        self.admin(&request_)?;
        let GetItemStatsRequest { item_id } = request_.into_inner();
        validate_item_id(&item_id)?;
        let inventory::GetItemStatsResponse {
            item,
            orders_pending,
            orders_confirmed,
            orders_rejected,
            orders_refunded,
            buyers,
            units_sold,
        } = self
            .upstreams
            .inventory
            .clone()
            .get_item_stats(request(inventory::GetItemStatsRequest { item_id }))
            .await
            .map_err(GatewayError::from_upstream)?
            .into_inner();
        Ok(Response::new(GetItemStatsResponse {
            item,
            orders_pending,
            orders_confirmed,
            orders_rejected,
            orders_refunded,
            buyers,
            units_sold,
        }))
    }
}
