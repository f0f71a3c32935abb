//! The `flashsale.inventory.v1.InventoryService` handlers: decode, call the
//! database layer, encode.

use chrono::Utc;
use flashsale_db::PgPool;
use flashsale_proto::inventory::v1::inventory_service_server::InventoryService;
use flashsale_proto::inventory::v1::{
    AdmittedKey, BatchGetOrdersRequest, BatchGetOrdersResponse, BuyerHolding, CreateItemRequest, CreateItemResponse,
    GetItemRequest, GetItemResponse, GetItemStatsRequest, GetItemStatsResponse, GetOrderRequest, GetOrderResponse,
    ListItemsRequest, ListItemsResponse, ListOrdersRequest, ListOrdersResponse, RecordOrderRequest,
    RecordOrderResponse, RefundOrderRequest, RefundOrderResponse, StreamAdmissionSnapshotRequest,
    StreamAdmissionSnapshotResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::convert::{item_to_proto, order_to_proto, parse_timestamp, timestamp};
use crate::db::models::Order;
use crate::db::snapshot::{self, Piece};
use crate::db::{items, orders};
use crate::domain::{ItemSpec, OrderStatus, parse_item_id, parse_order_id, parse_user_id};
use crate::error::InventoryError;
use crate::settlement::Settlement;

/// Most order ids one `BatchGetOrders` call may ask for.
const MAX_BATCH_GET: usize = 500;

/// Who may call each inventory method when mutual TLS is on (a certificate's
/// service name): only the gateway, which checks the buyer's or operator's
/// token first (the wallet never calls inventory).
pub const CALLERS: flashsale_server::Callers = flashsale_server::Callers {
    service: "flashsale.inventory.v1.InventoryService",
    methods: &[
        ("CreateItem", &["gateway"]),
        ("GetItem", &["gateway"]),
        ("ListItems", &["gateway"]),
        ("GetOrder", &["gateway"]),
        ("BatchGetOrders", &["gateway"]),
        ("ListOrders", &["gateway"]),
        ("RefundOrder", &["gateway"]),
        ("GetItemStats", &["gateway"]),
        ("RecordOrder", &["gateway"]),
        ("StreamAdmissionSnapshot", &["gateway"]),
    ],
};

#[derive(Clone)]
pub struct InventoryGrpc {
    pool: PgPool,
    /// The share of `pool` that buyers' reads take (orders, items, their
    /// stats), so that recording and settling orders always find a connection.
    crowd: flashsale_db::Lane,
    settlement: Settlement,
}

impl InventoryGrpc {
    pub fn new(pool: PgPool, crowd: flashsale_db::Lane, settlement: Settlement) -> Self {
        Self { pool, crowd, settlement }
    }

    async fn refund(&self, order_id: uuid::Uuid, user_id: Option<String>) -> Result<Order, InventoryError> {
        let order = {
            let mut conn = self.pool.get().await?;
            orders::find(&mut conn, order_id).await?.ok_or(InventoryError::OrderNotFound)?
        };
        // Someone else's order does not exist, as far as this buyer can tell.
        if user_id.is_some_and(|user| user != order.user_id) {
            return Err(InventoryError::OrderNotFound);
        }
        // Recorded first: if the credit or the update below is interrupted, the
        // sweeper finishes the refund (the credit is idempotent by its key).
        let order = {
            let mut conn = self.pool.get().await?;
            orders::request_refund(&mut conn, order_id).await?
        };
        if order.status == OrderStatus::Refunded.as_db() {
            return Ok(order);
        }
        self.settlement.complete_refund(&order).await
    }
}

#[tonic::async_trait]
impl InventoryService for InventoryGrpc {
    async fn create_item(&self, request: Request<CreateItemRequest>) -> Result<Response<CreateItemResponse>, Status> {
        let spec = ItemSpec::try_from(request.into_inner())?;
        let mut conn = self.pool.get().await.map_err(InventoryError::from)?;
        let item = items::create(&mut conn, &spec).await?;
        tracing::info!(item.id = %item.id, stock = item.stock_total, "item created");
        Ok(Response::new(CreateItemResponse { item: Some(item_to_proto(item, Utc::now())) }))
    }

    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<GetItemResponse>, Status> {
        let GetItemRequest { item_id } = request.into_inner();
        let id = parse_item_id(&item_id)?;
        let mut conn = self.crowd.get().await.map_err(InventoryError::from)?;
        let item = items::get(&mut conn, id).await?;
        Ok(Response::new(GetItemResponse { item: Some(item_to_proto(item, Utc::now())) }))
    }

    async fn list_items(&self, request: Request<ListItemsRequest>) -> Result<Response<ListItemsResponse>, Status> {
        let ListItemsRequest { page_size, page_token, ending_after } = request.into_inner();
        let page = crate::domain::page(page_size, &page_token, 100)?;
        let ending_after = ending_after.map(|t| parse_timestamp("ending_after", Some(t))).transpose()?;
        let mut conn = self.crowd.get().await.map_err(InventoryError::from)?;
        let (rows, next) = items::list(&mut conn, &page, ending_after).await?;
        let now = Utc::now();
        Ok(Response::new(ListItemsResponse {
            items: rows.into_iter().map(|item| item_to_proto(item, now)).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<GetOrderResponse>, Status> {
        let GetOrderRequest { order_id } = request.into_inner();
        let id = parse_order_id(&order_id)?;
        let mut conn = self.crowd.get().await.map_err(InventoryError::from)?;
        let order = orders::find(&mut conn, id).await?.ok_or(InventoryError::OrderNotFound)?;
        Ok(Response::new(GetOrderResponse { order: Some(order_to_proto(order)) }))
    }

    async fn batch_get_orders(
        &self,
        request: Request<BatchGetOrdersRequest>,
    ) -> Result<Response<BatchGetOrdersResponse>, Status> {
        let BatchGetOrdersRequest { order_ids } = request.into_inner();
        if order_ids.is_empty() || order_ids.len() > MAX_BATCH_GET {
            return Err(InventoryError::invalid("order_ids", "must hold 1..=500 order ids").into());
        }
        let ids = order_ids.iter().map(|id| parse_order_id(id)).collect::<Result<Vec<_>, _>>()?;
        let mut conn = self.pool.get().await.map_err(InventoryError::from)?;
        let orders = orders::find_many(&mut conn, &ids).await?;
        Ok(Response::new(BatchGetOrdersResponse { orders: orders.into_iter().map(order_to_proto).collect() }))
    }

    async fn list_orders(&self, request: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        let ListOrdersRequest { user_id, item_id, page_size, page_token } = request.into_inner();
        let user = if user_id.is_empty() { None } else { Some(parse_user_id(&user_id)?) };
        let item = if item_id.is_empty() { None } else { Some(parse_item_id(&item_id)?) };
        let page = crate::domain::page(page_size, &page_token, 50)?;
        let mut conn = self.crowd.get().await.map_err(InventoryError::from)?;
        let (rows, next) = orders::list(&mut conn, user, item, &page).await?;
        Ok(Response::new(ListOrdersResponse {
            orders: rows.into_iter().map(order_to_proto).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn refund_order(
        &self,
        request: Request<RefundOrderRequest>,
    ) -> Result<Response<RefundOrderResponse>, Status> {
        let RefundOrderRequest { order_id, user_id } = request.into_inner();
        let id = parse_order_id(&order_id)?;
        let user = if user_id.is_empty() { None } else { Some(parse_user_id(&user_id)?.to_owned()) };
        // In a task of its own: a caller that gives up must not cut the refund in half.
        let this = self.clone();
        let order = tokio::spawn(async move { this.refund(id, user).await }.in_current_span())
            .await
            .map_err(|e| InventoryError::Internal(Box::new(e)))??;
        Ok(Response::new(RefundOrderResponse { order: Some(order_to_proto(order)) }))
    }

    async fn get_item_stats(
        &self,
        request: Request<GetItemStatsRequest>,
    ) -> Result<Response<GetItemStatsResponse>, Status> {
        let GetItemStatsRequest { item_id } = request.into_inner();
        let id = parse_item_id(&item_id)?;
        let mut conn = self.crowd.get().await.map_err(InventoryError::from)?;
        let (item, stats) = items::stats(&mut conn, id).await?;
        Ok(Response::new(GetItemStatsResponse {
            item: Some(item_to_proto(item, Utc::now())),
            orders_pending: stats.pending,
            orders_confirmed: stats.confirmed,
            orders_rejected: stats.rejected,
            orders_refunded: stats.refunded,
            buyers: stats.buyers,
            units_sold: stats.units_sold,
        }))
    }

    /// The queue consumer's recording, for one order that came over gRPC: the
    /// same rules, the same transaction, the same first payment attempt.
    async fn record_order(
        &self,
        request: Request<RecordOrderRequest>,
    ) -> Result<Response<RecordOrderResponse>, Status> {
        let RecordOrderRequest { order } = request.into_inner();
        let placed =
            crate::order_consumer::placed(order.ok_or_else(|| InventoryError::invalid("order", "is required"))?)?;
        // In a task of its own: a caller's deadline dropping this future must
        // not leave the transaction open on a pooled connection.
        let pool = self.pool.clone();
        let recording = async move {
            let mut conn = pool.get().await.map_err(InventoryError::from)?;
            orders::record_placed(&mut conn, &placed).await
        };
        let recorded =
            tokio::spawn(recording.in_current_span()).await.map_err(|e| InventoryError::Internal(Box::new(e)))??;
        let order = match recorded {
            orders::Recorded::UnknownItem => return Err(InventoryError::ItemNotFound.into()),
            orders::Recorded::Held(order) => {
                tracing::info!(order.id = %order.id, "order recorded over gRPC (its publish was not confirmed)");
                let settlement = self.settlement.clone();
                let paid = order.clone();
                tokio::spawn(
                    async move { settlement.pay_batch(vec![(paid, tracing::Span::current())]).await }.in_current_span(),
                );
                order
            }
            orders::Recorded::Rejected(order) => {
                crate::metrics::final_state(&order);
                self.settlement.outbox_changed();
                self.settlement.release_hold(order.clone());
                order
            }
            orders::Recorded::Existing(order) => order,
        };
        Ok(Response::new(RecordOrderResponse { order: Some(order_to_proto(order)) }))
    }

    type StreamAdmissionSnapshotStream = ReceiverStream<Result<StreamAdmissionSnapshotResponse, Status>>;

    /// Reads the snapshot in a task of its own, one page ahead of the caller at
    /// most (the channel's bound): memory stays a page or two, whatever the
    /// item's size, and a caller that goes away ends the read.
    async fn stream_admission_snapshot(
        &self,
        request: Request<StreamAdmissionSnapshotRequest>,
    ) -> Result<Response<Self::StreamAdmissionSnapshotStream>, Status> {
        let StreamAdmissionSnapshotRequest { item_id } = request.into_inner();
        let id = parse_item_id(&item_id)?.to_owned();
        let mut conn = self.pool.get_owned().await.map_err(InventoryError::from)?;
        let (pieces, received) = tokio::sync::mpsc::channel(1);
        let read = async move {
            let sender = pieces.clone();
            let deliver = move |piece| {
                let sender = sender.clone();
                async move { sender.send(Ok(snapshot_piece(piece))).await.map_err(|_| snapshot::Closed) }
            };
            let last = match snapshot::read(&mut conn, &id, deliver).await {
                Ok(()) => Ok(StreamAdmissionSnapshotResponse { complete: true, ..Default::default() }),
                Err(InventoryError::ReceiverGone) => return,
                Err(e) => Err(Status::from(e)),
            };
            let _ = pieces.send(last).await;
        };
        tokio::spawn(read.in_current_span());
        Ok(Response::new(ReceiverStream::new(received)))
    }
}

/// One piece of the snapshot as the gateway receives it.
fn snapshot_piece(piece: Piece) -> StreamAdmissionSnapshotResponse {
    let quantity = |units: i32| u32::try_from(units).unwrap_or(0);
    match piece {
        Piece::Item(item) => StreamAdmissionSnapshotResponse {
            item_id: item.id,
            stock_remaining: quantity(item.stock_remaining),
            per_user_limit: quantity(item.per_user_limit),
            item_version: u64::try_from(item.version).unwrap_or(0),
            taken_at: Some(timestamp(Utc::now())),
            ..Default::default()
        },
        Piece::Holdings(rows) => StreamAdmissionSnapshotResponse {
            holdings: rows
                .into_iter()
                .map(|(user_id, units)| BuyerHolding {
                    user_id,
                    quantity: quantity(units),
                    in_flight_order_id: String::new(),
                })
                .collect(),
            ..Default::default()
        },
        Piece::InFlight(rows) => StreamAdmissionSnapshotResponse {
            holdings: rows
                .into_iter()
                .map(|(user_id, order_id)| BuyerHolding {
                    user_id,
                    quantity: 0,
                    in_flight_order_id: order_id.to_string(),
                })
                .collect(),
            ..Default::default()
        },
        Piece::Keys(keys) => StreamAdmissionSnapshotResponse {
            admitted_keys: keys
                .into_iter()
                .map(|key| AdmittedKey {
                    user_id: key.user_id,
                    idempotency_key: key.idempotency_key,
                    order_id: key.order_id.to_string(),
                    quantity: quantity(key.quantity),
                })
                .collect(),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_names_its_callers() {
        assert_eq!(CALLERS.unlisted("flashsale/inventory/v1/inventory.proto").unwrap(), Vec::<String>::new());
    }
}
