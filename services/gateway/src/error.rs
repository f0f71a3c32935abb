//! The gateway's one error type and its mapping onto gRPC statuses (the
//! error table in proto/README.md, "Errors"). Clients get a reason and a fixed message;
//! the cause of an internal or unavailable error is logged once, here.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("missing, malformed or expired credentials")]
    Unauthenticated,
    #[error("not allowed")]
    Forbidden,
    #[error("invalid {field}: {description}")]
    InvalidArgument { field: &'static str, description: String },
    #[error("item not found")]
    ItemNotFound,
    #[error("order not found")]
    OrderNotFound,
    #[error("sale not started")]
    SaleNotStarted,
    #[error("sale ended")]
    SaleEnded,
    #[error("sold out")]
    SoldOut,
    #[error("limit reached")]
    LimitReached,
    /// Fewer units left than asked for; the item is not sold out.
    #[error("not enough stock")]
    NotEnoughStock { units_left: u32 },
    /// The buyer's available balance does not cover the order; nothing was bought.
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("purchase in progress")]
    PurchaseInProgress { order_id: String },
    /// Over a rate or a count; retry after the given wait.
    #[error("rate limited")]
    RateLimited(std::time::Duration),
    #[error("idempotency key reused for another request")]
    IdempotencyKeyReused,
    /// A business rejection from inventory or wallet, passed on as it came:
    /// those services put only reason codes and fixed messages in statuses.
    #[error("upstream rejection: {0}")]
    Upstream(Status),
    #[error("dependency unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl GatewayError {
    /// The reason code clients see (`UPSTREAM` for a rejection passed on from
    /// inventory or wallet), for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Self::ItemNotFound => "ITEM_NOT_FOUND",
            Self::OrderNotFound => "ORDER_NOT_FOUND",
            Self::SaleNotStarted => "SALE_NOT_STARTED",
            Self::SaleEnded => "SALE_ENDED",
            Self::SoldOut => "SOLD_OUT",
            Self::LimitReached => "LIMIT_REACHED",
            Self::NotEnoughStock { .. } => "NOT_ENOUGH_STOCK",
            Self::InsufficientFunds => "INSUFFICIENT_FUNDS",
            Self::PurchaseInProgress { .. } => "PURCHASE_IN_PROGRESS",
            Self::RateLimited(_) => "RATE_LIMITED",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::Upstream(_) => "UPSTREAM",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
        }
    }

    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidArgument { field, description: description.into() }
    }

    /// Classifies a status returned by inventory or wallet. Business
    /// rejections pass through; everything else is the neighbour (or the link
    /// to it) failing, which the caller may retry: a killed or restarting
    /// process ("transport error", "broken pipe"), a graceful GOAWAY racing the
    /// call, a reset connection, a timeout, or the neighbour's own internal
    /// error. Those are `UNAVAILABLE`, never `INTERNAL` (every call the gateway
    /// forwards is a read or idempotent by key).
    pub fn from_upstream(status: Status) -> Self {
        match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::OutOfRange => Self::Upstream(status),
            Code::Ok
            | Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal
            | Code::Aborted
            | Code::Unimplemented
            | Code::DataLoss => Self::Unavailable(Box::new(status)),
        }
    }
}

impl From<flashsale_domain::Invalid> for GatewayError {
    fn from(invalid: flashsale_domain::Invalid) -> Self {
        Self::invalid(invalid.field, invalid.rule)
    }
}

impl From<redis::RedisError> for GatewayError {
    fn from(error: redis::RedisError) -> Self {
        Self::Unavailable(Box::new(error))
    }
}

impl From<bb8::RunError<redis::RedisError>> for GatewayError {
    fn from(error: bb8::RunError<redis::RedisError>) -> Self {
        Self::Unavailable(Box::new(error))
    }
}

/// The `ErrorInfo.metadata` key of `NOT_ENOUGH_STOCK`: the units left when
/// the attempt was judged (REST: `error.units_left`).
pub const UNITS_LEFT: &str = "units_left";

fn failed_precondition(reason: &'static str, message: &str) -> Status {
    flashsale_server::rejection(Code::FailedPrecondition, reason, message)
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        use flashsale_server::rejection;
        match error {
            GatewayError::Unauthenticated => {
                rejection(Code::Unauthenticated, "UNAUTHENTICATED", "a valid bearer token is required")
            }
            GatewayError::Forbidden => rejection(Code::PermissionDenied, "FORBIDDEN", "this call needs the admin role"),
            GatewayError::InvalidArgument { field, description } => {
                flashsale_server::invalid_argument(field, &description)
            }
            GatewayError::ItemNotFound => rejection(Code::NotFound, "ITEM_NOT_FOUND", "no such item"),
            GatewayError::OrderNotFound => rejection(Code::NotFound, "ORDER_NOT_FOUND", "no such order"),
            GatewayError::SaleNotStarted => failed_precondition("SALE_NOT_STARTED", "the sale has not started"),
            GatewayError::SaleEnded => failed_precondition("SALE_ENDED", "the sale has ended"),
            GatewayError::SoldOut => failed_precondition("SOLD_OUT", "sold out"),
            GatewayError::LimitReached => {
                failed_precondition("LIMIT_REACHED", "this buyer holds as many units as the sale allows")
            }
            GatewayError::NotEnoughStock { units_left } => {
                let metadata = std::collections::HashMap::from([(UNITS_LEFT.to_owned(), units_left.to_string())]);
                <Status as tonic_types::StatusExt>::with_error_details(
                    Code::FailedPrecondition,
                    format!("only {units_left} left; ask for fewer"),
                    tonic_types::ErrorDetails::with_error_info(
                        "NOT_ENOUGH_STOCK",
                        flashsale_server::ERROR_DOMAIN,
                        metadata,
                    ),
                )
            }
            GatewayError::InsufficientFunds => failed_precondition(
                "INSUFFICIENT_FUNDS",
                "the available balance does not cover this purchase; nothing was bought",
            ),
            GatewayError::PurchaseInProgress { order_id } => failed_precondition(
                "PURCHASE_IN_PROGRESS",
                &format!("order {order_id} for this item is still being settled"),
            ),
            GatewayError::IdempotencyKeyReused => rejection(
                Code::AlreadyExists,
                "IDEMPOTENCY_KEY_REUSED",
                "this idempotency key was used for a different request",
            ),
            GatewayError::RateLimited(wait) => {
                let mut details = tonic_types::ErrorDetails::with_error_info(
                    "RATE_LIMITED",
                    flashsale_server::ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                );
                details.set_retry_info(Some(wait));
                <Status as tonic_types::StatusExt>::with_error_details(
                    Code::ResourceExhausted,
                    "too many requests; retry after the delay in RetryInfo (Retry-After on REST)",
                    details,
                )
            }
            GatewayError::Upstream(status) => status,
            GatewayError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "request failed: dependency unavailable");
                flashsale_server::unavailable()
            }
            GatewayError::Internal(cause) => {
                tracing::error!(error = %cause, "request failed: internal error");
                flashsale_server::internal()
            }
        }
    }
}
