//! The inventory's one error type and its mapping onto gRPC statuses.
//!
//! Policy: domain and database code return [`InventoryError`]; `anyhow` appears
//! only in startup. Clients get a reason code and a fixed message; the cause of
//! an internal or unavailable error is logged once, here.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("invalid {field}: {description}")]
    InvalidArgument { field: &'static str, description: String },
    #[error("item not found")]
    ItemNotFound,
    #[error("order not found")]
    OrderNotFound,
    #[error("an item with this id exists already")]
    ItemAlreadyExists,
    #[error("only confirmed orders can be refunded")]
    NotRefundable,
    /// The caller of a streamed answer went away; nothing left to tell it.
    #[error("the receiver went away")]
    ReceiverGone,
    #[error("dependency unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl InventoryError {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Self::InvalidArgument { field, description: description.into() }
    }

    /// Worth retrying later (the order stays pending, the message is requeued).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<flashsale_domain::Invalid> for InventoryError {
    fn from(invalid: flashsale_domain::Invalid) -> Self {
        Self::invalid(invalid.field, invalid.rule)
    }
}

impl From<diesel::result::Error> for InventoryError {
    /// Transient by the one classification both services share (a restarted,
    /// failed-over or overloaded server, a deadlock victim), internal otherwise.
    fn from(error: diesel::result::Error) -> Self {
        if flashsale_db::is_transient(&error) {
            Self::Unavailable(Box::new(error))
        } else {
            Self::Internal(Box::new(error))
        }
    }
}

impl From<flashsale_db::PoolError> for InventoryError {
    fn from(error: flashsale_db::PoolError) -> Self {
        Self::Unavailable(Box::new(error))
    }
}

impl From<InventoryError> for Status {
    fn from(error: InventoryError) -> Self {
        match error {
            InventoryError::InvalidArgument { field, description } => {
                flashsale_server::invalid_argument(field, &description)
            }
            InventoryError::ItemNotFound => {
                flashsale_server::rejection(Code::NotFound, "ITEM_NOT_FOUND", "no such item")
            }
            InventoryError::OrderNotFound => {
                flashsale_server::rejection(Code::NotFound, "ORDER_NOT_FOUND", "no such order")
            }
            InventoryError::ItemAlreadyExists => {
                flashsale_server::rejection(Code::AlreadyExists, "ITEM_ALREADY_EXISTS", "an item with this id exists")
            }
            InventoryError::NotRefundable => flashsale_server::rejection(
                Code::FailedPrecondition,
                "ORDER_NOT_REFUNDABLE",
                "only confirmed orders can be refunded",
            ),
            InventoryError::ReceiverGone => Status::cancelled("the caller went away"),
            InventoryError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "inventory call failed: dependency unavailable");
                flashsale_server::unavailable()
            }
            InventoryError::Internal(cause) => {
                tracing::error!(error = %cause, "inventory call failed: internal error");
                flashsale_server::internal()
            }
        }
    }
}
