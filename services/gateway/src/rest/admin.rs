//! Operators' routes (tokens with the `admin` role).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use flashsale_proto::gateway::v1 as gw;

use super::dto::*;
use super::error::{ApiError, Json, Path};
use super::{Operator, RestState};
use crate::error::GatewayError;

#[utoipa::path(
    post, path = "/v1/admin/items", tag = "admin",
    request_body = CreateItemBody,
    responses(
        (status = 201, description = "The sale is created", body = Item),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE: the body is over 16 KiB", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: needs the admin role", body = ErrorBody),
        (status = 409, description = "ITEM_ALREADY_EXISTS", body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn create_item(
    State(state): State<RestState>,
    Operator(caller): Operator,
    Json(body): Json<CreateItemBody>,
) -> Result<impl IntoResponse, ApiError> {
    let reply = state.api.create_item(&caller, body.into()).await?;
    // Inventory always returns the item it created; its absence is a fault, not a 404.
    let item =
        reply.item.ok_or_else(|| ApiError::from(GatewayError::Internal("CreateItem reply without an item".into())))?;
    Ok((StatusCode::CREATED, Json(Item::from(item))))
}

#[utoipa::path(
    post, path = "/v1/admin/users/{user_id}/top-up", tag = "admin",
    params(("user_id" = String, Path, description = "The buyer (the `sub` of their tokens)")),
    request_body = TopUpBody,
    responses(
        (status = 200, description = "Credited (a replayed key credits once)", body = TopUpResult),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE: the body is over 16 KiB", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: needs the admin role", body = ErrorBody),
        (status = 422, description = "IDEMPOTENCY_KEY_REUSED for a different top-up", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn top_up(
    State(state): State<RestState>,
    Operator(caller): Operator,
    Path(user_id): Path<String>,
    Json(body): Json<TopUpBody>,
) -> Result<Json<TopUpResult>, ApiError> {
    let TopUpBody { amount, idempotency_key } = body;
    if idempotency_key.as_deref() == Some("") {
        let rule = flashsale_domain::IdempotencyKey::RULE;
        return Err(ApiError::invalid(format!("invalid idempotency_key: {rule}, or absent")));
    }
    let request =
        gw::TopUpRequest { user_id, amount: Some(amount.into()), idempotency_key: idempotency_key.unwrap_or_default() };
    let reply = state.api.top_up(&caller, request).await?;
    Ok(Json(TopUpResult { balance: reply.balance.map(Money::from) }))
}

#[utoipa::path(
    get, path = "/v1/admin/items/{item_id}/stats", tag = "admin",
    params(("item_id" = String, Path, description = "The item's id")),
    responses(
        (status = 200, body = ItemStats),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "FORBIDDEN: needs the admin role", body = ErrorBody),
        (status = 404, description = "ITEM_NOT_FOUND", body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn item_stats(
    State(state): State<RestState>,
    Operator(caller): Operator,
    Path(item_id): Path<String>,
) -> Result<Json<ItemStats>, ApiError> {
    let reply = state.api.get_item_stats(&caller, gw::GetItemStatsRequest { item_id }).await?;
    Ok(Json(reply.into()))
}
