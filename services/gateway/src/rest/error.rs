//! REST errors: the same reason codes as gRPC, with the HTTP statuses of
//! the error table in proto/README.md ("Errors"), as `{"error": {"code", "message"}}`. Every way a
//! request can be malformed (JSON syntax, types, unknown fields, path or
//! query) is a 400 `INVALID_ARGUMENT`, never axum's default 415/422 text; a
//! body over the size limit is a 413 `PAYLOAD_TOO_LARGE` (REST only: gRPC
//! caps its messages in the codec).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tonic_types::StatusExt;

use super::dto::{ErrorBody, ErrorDetail};
use crate::error::GatewayError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    /// Seconds for `Retry-After` (a status's `RetryInfo`, rounded up).
    pub retry_after: Option<u64>,
    /// `NOT_ENOUGH_STOCK`'s units left (its `ErrorInfo` metadata).
    pub units_left: Option<u32>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "INVALID_ARGUMENT".into(),
            message: message.into(),
            retry_after: None,
            units_left: None,
        }
    }

    pub fn too_large() -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "PAYLOAD_TOO_LARGE".into(),
            message: format!("the body is over the {} KiB this API takes", super::MAX_BODY_BYTES / 1024),
            retry_after: None,
            units_left: None,
        }
    }

    pub fn not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "NOT_FOUND".into(),
            message: "no such route".into(),
            retry_after: None,
            units_left: None,
        }
    }

    pub fn unavailable() -> Self {
        Self::from_status(&flashsale_server::unavailable())
    }

    /// Maps a gRPC status (ours or one passed on from inventory or wallet) by its
    /// `ErrorInfo` reason, falling back on its code.
    pub fn from_status(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        let reason = details.error_info().map(|info| info.reason.clone());
        let units_left = details
            .error_info()
            .and_then(|info| info.metadata.get(crate::error::UNITS_LEFT))
            .and_then(|units| units.parse().ok());
        let retry_after = details
            .retry_info()
            .and_then(|info| info.retry_delay)
            .map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0));
        let code = reason.unwrap_or_else(|| fallback_reason(status.code()).to_owned());
        let http = http_status(&code, status.code());
        // Our statuses carry fixed messages; anything else that ends in a 500 is
        // not repeated to the client, whatever it says.
        let message = if http == StatusCode::INTERNAL_SERVER_ERROR {
            "internal error".to_owned()
        } else {
            status.message().to_owned()
        };
        Self { status: http, code, message, retry_after, units_left }
    }
}

/// The HTTP status for a reason code (proto/README.md's error table, "Errors").
pub fn http_status(reason: &str, code: tonic::Code) -> StatusCode {
    match reason {
        "UNAUTHENTICATED" => StatusCode::UNAUTHORIZED,
        "FORBIDDEN" => StatusCode::FORBIDDEN,
        "INVALID_ARGUMENT" => StatusCode::BAD_REQUEST,
        "PAYLOAD_TOO_LARGE" => StatusCode::PAYLOAD_TOO_LARGE,
        "ITEM_NOT_FOUND" | "ORDER_NOT_FOUND" => StatusCode::NOT_FOUND,
        "SALE_NOT_STARTED"
        | "SALE_ENDED"
        | "SOLD_OUT"
        | "NOT_ENOUGH_STOCK"
        | "LIMIT_REACHED"
        | "PURCHASE_IN_PROGRESS" => StatusCode::CONFLICT,
        "ITEM_ALREADY_EXISTS" | "ORDER_NOT_REFUNDABLE" => StatusCode::CONFLICT,
        "INSUFFICIENT_FUNDS" => StatusCode::PAYMENT_REQUIRED,
        "IDEMPOTENCY_KEY_REUSED" => StatusCode::UNPROCESSABLE_ENTITY,
        "RATE_LIMITED" => StatusCode::TOO_MANY_REQUESTS,
        "UNAVAILABLE" => StatusCode::SERVICE_UNAVAILABLE,
        _ => match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::AlreadyExists | tonic::Code::FailedPrecondition | tonic::Code::Aborted => StatusCode::CONFLICT,
            tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
    }
}

/// The code for a status that carries no `ErrorInfo` (none of ours; a neighbour's
/// or tonic's own), named after its gRPC code.
fn fallback_reason(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => "INVALID_ARGUMENT",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        tonic::Code::PermissionDenied => "FORBIDDEN",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::ResourceExhausted => "RATE_LIMITED",
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}

impl From<GatewayError> for ApiError {
    fn from(error: GatewayError) -> Self {
        // Through the gRPC mapping: one table, and the cause is logged there, once.
        Self::from_status(&tonic::Status::from(error))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = matches!(self.status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS);
        let body =
            ErrorBody { error: ErrorDetail { code: self.code, message: self.message, units_left: self.units_left } };
        let mut response = (self.status, axum::Json(body)).into_response();
        if retry {
            let seconds = self.retry_after.unwrap_or(1).max(1);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// `axum::Json` whose every rejection is a 400 `INVALID_ARGUMENT` naming the problem.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::too_large()),
            Err(rejection) => Err(ApiError::invalid(json_problem(&rejection))),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> String {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => "the body must be JSON (Content-Type: application/json)".into(),
        JsonRejection::BytesRejection(_) => "the body could not be read".into(),
        // serde's message names the field and the expected type; it holds no server state.
        JsonRejection::JsonDataError(e) => {
            let text = e.body_text();
            let detail =
                text.strip_prefix("Failed to deserialize the JSON body into the target type: ").unwrap_or(&text);
            format!("invalid body: {detail}")
        }
        JsonRejection::JsonSyntaxError(_) => "the body is not valid JSON".into(),
        _ => "invalid body".into(),
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` with 400 `INVALID_ARGUMENT` rejections.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection @ PathRejection::FailedToDeserializePathParams(_)) => {
                Err(ApiError::invalid(format!("invalid path: {}", rejection.body_text())))
            }
            Err(_) => Err(ApiError::invalid("invalid path")),
        }
    }
}

/// `axum::extract::Query` with 400 `INVALID_ARGUMENT` rejections.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection @ QueryRejection::FailedToDeserializeQueryString(_)) => {
                Err(ApiError::invalid(format!("invalid query: {}", rejection.body_text())))
            }
            Err(_) => Err(ApiError::invalid("invalid query")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// proto/README.md's error table ("Errors"), row by row, including reasons only inventory or
    /// wallet produce (INSUFFICIENT_FUNDS reaches buyers as an order's
    /// reject_reason, since payment happens after the 202).
    #[test]
    fn every_reason_maps_to_the_status_in_the_table() {
        use tonic::Code::*;
        let table = [
            ("UNAUTHENTICATED", Unauthenticated, 401),
            ("FORBIDDEN", PermissionDenied, 403),
            ("INVALID_ARGUMENT", InvalidArgument, 400),
            ("ITEM_NOT_FOUND", NotFound, 404),
            ("ORDER_NOT_FOUND", NotFound, 404),
            ("SALE_NOT_STARTED", FailedPrecondition, 409),
            ("SALE_ENDED", FailedPrecondition, 409),
            ("SOLD_OUT", FailedPrecondition, 409),
            ("NOT_ENOUGH_STOCK", FailedPrecondition, 409),
            ("LIMIT_REACHED", FailedPrecondition, 409),
            ("PURCHASE_IN_PROGRESS", FailedPrecondition, 409),
            ("INSUFFICIENT_FUNDS", FailedPrecondition, 402),
            ("IDEMPOTENCY_KEY_REUSED", AlreadyExists, 422),
            ("RATE_LIMITED", ResourceExhausted, 429),
            ("UNAVAILABLE", Unavailable, 503),
        ];
        for (reason, code, http) in table {
            let status = flashsale_server::rejection(code, reason, "m");
            let error = ApiError::from_status(&status);
            assert_eq!((error.code.as_str(), error.status.as_u16()), (reason, http), "{reason}");
        }
        let bare = ApiError::from_status(&tonic::Status::internal("secret detail"));
        assert_eq!(
            (bare.code.as_str(), bare.status.as_u16(), bare.message.as_str()),
            ("INTERNAL", 500, "internal error")
        );
    }
}
