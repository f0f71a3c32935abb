//! The public gRPC API: `flashsale.gateway.v1.FlashSaleGateway` for buyers and
//! `flashsale.gateway.v1.AdminService` for operators. Handlers are thin:
//! authenticate, call the shared operation in `api/`, wrap the answer.

use std::pin::Pin;
use std::sync::Arc;

use flashsale_proto::gateway::v1::admin_service_server::AdminService;
use flashsale_proto::gateway::v1::flash_sale_gateway_server::FlashSaleGateway;
use flashsale_proto::gateway::v1::*;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::Operations;
use crate::auth::Principal;
use crate::error::GatewayError;

#[derive(Clone)]
pub struct GatewayGrpc {
    pub api: Arc<Operations>,
}

impl GatewayGrpc {
    async fn caller<T>(&self, request: &Request<T>) -> Result<Principal, GatewayError> {
        let metadata = request.metadata();
        let header = metadata.get("authorization").and_then(|value| value.to_str().ok());
        let forwarded = metadata.get_all("x-forwarded-for").iter().filter_map(|value| value.to_str().ok());
        let client = self.api.limits.client_address(request.remote_addr().map(|peer| peer.ip()), forwarded);
        self.api.authenticate(header, client).await
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchOrderResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl FlashSaleGateway for GatewayGrpc {
    async fn list_items(&self, request: Request<ListItemsRequest>) -> Result<Response<ListItemsResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(self.api.list_items(&caller, request.into_inner()).await?))
    }

    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<GetItemResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(self.api.get_item(&caller, request.into_inner()).await?))
    }

    async fn purchase(&self, request: Request<PurchaseRequest>) -> Result<Response<PurchaseResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(self.api.purchase(&caller, request.into_inner()).await?))
    }

    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<GetOrderResponse>, Status> {
        let caller = self.caller(&request).await?;
        let GetOrderRequest { order_id } = request.into_inner();
        let order = self.api.get_order(&caller, &order_id).await?;
        Ok(Response::new(GetOrderResponse { order: Some(order) }))
    }

    async fn list_orders(&self, request: Request<ListOrdersRequest>) -> Result<Response<ListOrdersResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(self.api.list_orders(&caller, request.into_inner()).await?))
    }

    type WatchOrderStream = WatchStream;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let caller = self.caller(&request).await?;
        let WatchOrderRequest { order_id } = request.into_inner();
        let updates = self.api.watch_order(&caller, &order_id).await?;
        let stream = ReceiverStream::new(updates).map(|order| Ok(WatchOrderResponse { order: Some(order) }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn refund_order(
        &self,
        request: Request<RefundOrderRequest>,
    ) -> Result<Response<RefundOrderResponse>, Status> {
        let caller = self.caller(&request).await?;
        let RefundOrderRequest { order_id } = request.into_inner();
        let order = self.api.refund_order(&caller, &order_id).await?;
        Ok(Response::new(RefundOrderResponse { order: Some(order) }))
    }

    async fn get_balance(&self, request: Request<GetBalanceRequest>) -> Result<Response<GetBalanceResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(self.api.get_balance(&caller, request.into_inner()).await?))
    }
}

#[tonic::async_trait]
impl AdminService for GatewayGrpc {
    async fn create_item(&self, request: Request<CreateItemRequest>) -> Result<Response<CreateItemResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(self.api.create_item(&caller, request.into_inner()).await?))
    }

    async fn top_up(&self, request: Request<TopUpRequest>) -> Result<Response<TopUpResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(self.api.top_up(&caller, request.into_inner()).await?))
    }

    async fn get_item_stats(
        &self,
        request: Request<GetItemStatsRequest>,
    ) -> Result<Response<GetItemStatsResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(self.api.get_item_stats(&caller, request.into_inner()).await?))
    }
}
