//! The wallet's one error type, and its mapping onto gRPC statuses.
//!
//! Policy: domain code returns [`WalletError`]; `anyhow` appears only in startup.
//! Clients see the reason code and a fixed message; the cause of an internal or
//! unavailable error is logged once, here, where it is turned into a status.

use tonic::{Code, Status};

/// Everything a wallet call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("invalid {field}: {description}")]
    InvalidArgument { field: &'static str, description: &'static str },
    #[error("insufficient funds")]
    InsufficientFunds,
    #[error("idempotency key already used for a different request")]
    IdempotencyKeyReused,
    #[error("the credit would overflow the account balance")]
    BalanceOverflow,
    #[error("no hold for this order")]
    HoldNotFound,
    /// The order's hold is no longer open: captured, voided or expired.
    #[error("the hold is {0}")]
    HoldClosed(&'static str),
    #[error("database unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl WalletError {
    pub fn invalid(field: &'static str, description: &'static str) -> Self {
        Self::InvalidArgument { field, description }
    }
}

impl From<flashsale_domain::Invalid> for WalletError {
    fn from(invalid: flashsale_domain::Invalid) -> Self {
        Self::invalid(invalid.field, invalid.rule)
    }
}

impl From<diesel::result::Error> for WalletError {
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

impl From<flashsale_db::PoolError> for WalletError {
    fn from(error: flashsale_db::PoolError) -> Self {
        Self::Unavailable(Box::new(error))
    }
}

impl From<WalletError> for Status {
    fn from(error: WalletError) -> Self {
        match error {
            WalletError::InvalidArgument { field, description } => {
                flashsale_server::invalid_argument(field, description)
            }
            WalletError::InsufficientFunds => flashsale_server::rejection(
                Code::FailedPrecondition,
                "INSUFFICIENT_FUNDS",
                "the balance does not cover this amount",
            ),
            WalletError::IdempotencyKeyReused => flashsale_server::rejection(
                Code::AlreadyExists,
                "IDEMPOTENCY_KEY_REUSED",
                "this idempotency key was already used for a different request",
            ),
            WalletError::HoldNotFound => {
                flashsale_server::rejection(Code::NotFound, "HOLD_NOT_FOUND", "no funds are held for this order")
            }
            WalletError::HoldClosed(state) => {
                let (reason, message) = match state {
                    "captured" => ("HOLD_CAPTURED", "the funds held for this order were charged"),
                    "voided" => ("HOLD_VOIDED", "the funds held for this order were released"),
                    _ => ("HOLD_EXPIRED", "the funds held for this order were released when the hold expired"),
                };
                flashsale_server::rejection(Code::FailedPrecondition, reason, message)
            }
            WalletError::BalanceOverflow => {
                flashsale_server::invalid_argument("amount.amount_minor", "would overflow the account balance")
            }
            WalletError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "wallet call failed: database unavailable");
                flashsale_server::unavailable()
            }
            WalletError::Internal(cause) => {
                tracing::error!(error = %cause, "wallet call failed: internal error");
                flashsale_server::internal()
            }
        }
    }
}
