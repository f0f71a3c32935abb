//! Buyers' routes: decode JSON, call the shared operation in `api/`, encode.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use flashsale_domain::IdempotencyKey;
use flashsale_proto::gateway::v1 as gw;
use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::dto::*;
use super::error::{ApiError, Json, Path, Query};
use super::{Caller, RestState};

#[utoipa::path(
    get, path = "/v1/items", tag = "buyers",
    params(ItemListing),
    responses(
        (status = 200, description = "Items, newest sales first", body = ItemList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list_items(
    State(state): State<RestState>,
    Caller(caller): Caller,
    Query(listing): Query<ItemListing>,
) -> Result<Json<ItemList>, ApiError> {
    let ItemListing { page_size, page_token, include_ended } = listing;
    let request = gw::ListItemsRequest {
        page_size: page_size.unwrap_or_default(),
        page_token: page_token.unwrap_or_default(),
        include_ended: include_ended.unwrap_or_default(),
    };
    Ok(Json(state.api.list_items(&caller, request).await?.into()))
}

#[utoipa::path(
    get, path = "/v1/items/{item_id}", tag = "buyers",
    params(("item_id" = String, Path, description = "The item's id")),
    responses(
        (status = 200, body = Item),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "ITEM_NOT_FOUND", body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get_item(
    State(state): State<RestState>,
    Caller(caller): Caller,
    Path(item_id): Path<String>,
) -> Result<Json<Item>, ApiError> {
    let reply = state.api.get_item(&caller, gw::GetItemRequest { item_id }).await?;
    let item = reply.item.ok_or_else(|| ApiError::from(crate::error::GatewayError::ItemNotFound))?;
    Ok(Json(item.into()))
}

#[utoipa::path(
    post, path = "/v1/purchases", tag = "buyers",
    request_body = PurchaseBody,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Retrying with the same key returns the same order instead of buying again (1..=128 visible ASCII)")),
    responses(
        (status = 202, description = "Admitted; follow the order to its final state", body = PurchaseAccepted),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE: the body is over 16 KiB", body = ErrorBody),
        (status = 402, description = "INSUFFICIENT_FUNDS: the available balance does not cover the price; nothing was bought", body = ErrorBody),
        (status = 404, description = "ITEM_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "SALE_NOT_STARTED, SALE_ENDED, SOLD_OUT, NOT_ENOUGH_STOCK (with units_left), LIMIT_REACHED, PURCHASE_IN_PROGRESS", body = ErrorBody),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED: this key named a different purchase", body = ErrorBody),
        (status = 429, description = "RATE_LIMITED", body = ErrorBody),
        (status = 503, description = "UNAVAILABLE: nothing was bought; retry with the same key", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn purchase(
    State(state): State<RestState>,
    Caller(caller): Caller,
    headers: HeaderMap,
    Json(body): Json<PurchaseBody>,
) -> Result<impl IntoResponse, ApiError> {
    let idempotency_key = match headers.get("idempotency-key") {
        None => String::new(),
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() => key.to_owned(),
            // Not text at all; text is checked by the same rule as gRPC's field.
            _ => return Err(ApiError::invalid(format!("invalid Idempotency-Key: {}", IdempotencyKey::RULE))),
        },
    };
    let PurchaseBody { item_id, quantity } = body;
    let request = gw::PurchaseRequest { item_id, quantity, idempotency_key };
    let reply = state.api.purchase(&caller, request).await?;
    Ok((StatusCode::ACCEPTED, Json(PurchaseAccepted::from(reply))))
}

#[utoipa::path(
    get, path = "/v1/orders", tag = "buyers",
    params(Page),
    responses(
        (status = 200, description = "The caller's orders that inventory has recorded", body = OrderList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list_orders(
    State(state): State<RestState>,
    Caller(caller): Caller,
    Query(page): Query<Page>,
) -> Result<Json<OrderList>, ApiError> {
    let Page { page_size, page_token } = page;
    let request =
        gw::ListOrdersRequest { page_size: page_size.unwrap_or_default(), page_token: page_token.unwrap_or_default() };
    Ok(Json(state.api.list_orders(&caller, request).await?.into()))
}

#[utoipa::path(
    get, path = "/v1/orders/{order_id}", tag = "buyers",
    params(("order_id" = String, Path, description = "The order's id (a UUID)")),
    responses(
        (status = 200, body = Order),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "ORDER_NOT_FOUND (also for other buyers' orders)", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get_order(
    State(state): State<RestState>,
    Caller(caller): Caller,
    Path(order_id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    Ok(Json(state.api.get_order(&caller, &order_id).await?.into()))
}

#[utoipa::path(
    get, path = "/v1/orders/{order_id}/events", tag = "buyers",
    params(("order_id" = String, Path, description = "The order's id (a UUID)")),
    responses(
        (status = 200, content_type = "text/event-stream",
            description = "Server-sent events named `order`, each data line an Order as JSON: the current state, \
                then every change; the stream ends after CONFIRMED, REJECTED or REFUNDED",
            body = OrderEventFrame),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "ORDER_NOT_FOUND", body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn order_events(
    State(state): State<RestState>,
    Caller(caller): Caller,
    Path(order_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let updates = state.api.watch_order(&caller, &order_id).await?;
    // A stream ends when the gateway starts to stop, so shutdown never waits on
    // it; the client reconnects elsewhere (the storefront falls back to polling).
    let events = ReceiverStream::new(updates).take_until(state.stopping.clone().cancelled_owned()).map(|order| {
        let event = Event::default().event("order");
        Ok::<_, Infallible>(match event.json_data(Order::from(order)) {
            Ok(event) => event,
            Err(e) => {
                tracing::error!(error = %e, "order event could not be encoded");
                Event::default().event("error").data("internal error")
            }
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[utoipa::path(
    post, path = "/v1/orders/{order_id}/refund", tag = "buyers",
    params(("order_id" = String, Path, description = "The order's id (a UUID)")),
    responses(
        (status = 200, description = "Refunded (or already refunded: refunds are idempotent)", body = Order),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "ORDER_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "ORDER_NOT_REFUNDABLE: the order is neither confirmed nor refunded", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn refund_order(
    State(state): State<RestState>,
    Caller(caller): Caller,
    Path(order_id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    Ok(Json(state.api.refund_order(&caller, &order_id).await?.into()))
}

#[utoipa::path(
    get, path = "/v1/wallet", tag = "buyers",
    params(WalletQuery),
    responses(
        (status = 200, description = "The caller's balances", body = Wallet),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn wallet(
    State(state): State<RestState>,
    Caller(caller): Caller,
    Query(query): Query<WalletQuery>,
) -> Result<Json<Wallet>, ApiError> {
    let WalletQuery { currency } = query;
    if currency.as_deref() == Some("") {
        let rule = flashsale_domain::Currency::RULE;
        return Err(ApiError::invalid(format!("invalid currency: {rule}, or absent")));
    }
    let reply =
        state.api.get_balance(&caller, gw::GetBalanceRequest { currency: currency.unwrap_or_default() }).await?;
    Ok(Json(Wallet {
        balances: reply.balances.into_iter().map(Money::from).collect(),
        held: reply.held.into_iter().map(Money::from).collect(),
    }))
}
