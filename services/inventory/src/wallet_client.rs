//! Calls to the wallet: the debit that pays an order, the credit that refunds it.
//! Both are idempotent by key (the order id), so any retry is safe.

use std::time::Duration;

use flashsale_proto::common::v1::Money;
use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use flashsale_proto::wallet::v1::{CreditRequest, DebitRequest};
use flashsale_server::TracedChannel;
use tonic::transport::Endpoint;
use tonic::{Code, Request};
use tonic_types::StatusExt;

use crate::db::models::Order;
use crate::db::orders::Payment;

/// Why a wallet call did not give a final answer.
#[derive(Debug, thiserror::Error)]
pub enum WalletCallError {
    /// Worth retrying later with the same key (wallet down, timeout, overload).
    #[error("wallet unavailable: {0}")]
    Transient(tonic::Status),
    /// The wallet refused the request itself; retrying will not help.
    #[error("wallet refused the request: {0}")]
    Refused(tonic::Status),
}

#[derive(Clone)]
pub struct WalletClient {
    client: WalletServiceClient<TracedChannel>,
    timeout: Duration,
}

impl WalletClient {
    /// Connects lazily: inventory starts (and keeps its queue) while the wallet is down.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self { client: WalletServiceClient::new(flashsale_server::traced(channel)), timeout })
    }

    /// Debits the order's amount under the order id as idempotency key.
    pub async fn pay(&self, order: &Order) -> Result<Payment, WalletCallError> {
        let mut request = Request::new(DebitRequest {
            idempotency_key: order.id.to_string(),
            user_id: order.user_id.clone(),
            amount: Some(Money { currency: order.amount_currency.clone(), amount_minor: order.amount_minor }),
            reference: format!("order {}", order.id),
        });
        // Sends grpc-timeout so the wallet stops working on it too.
        request.set_timeout(self.timeout);
        match self.client.clone().debit(request).await {
            Ok(_) => Ok(Payment::Paid),
            Err(status) if reason(&status).as_deref() == Some("INSUFFICIENT_FUNDS") => Ok(Payment::InsufficientFunds),
            Err(status) => Err(classify(status)),
        }
    }

    /// Credits the order's amount back under `refund:<order id>`.
    pub async fn refund(&self, order: &Order) -> Result<(), WalletCallError> {
        let mut request = Request::new(CreditRequest {
            idempotency_key: format!("refund:{}", order.id),
            user_id: order.user_id.clone(),
            amount: Some(Money { currency: order.amount_currency.clone(), amount_minor: order.amount_minor }),
            reference: format!("refund of order {}", order.id),
        });
        request.set_timeout(self.timeout);
        self.client.clone().credit(request).await.map(|_| ()).map_err(classify)
    }
}

fn reason(status: &tonic::Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

fn classify(status: tonic::Status) -> WalletCallError {
    match status.code() {
        Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition | Code::PermissionDenied => {
            WalletCallError::Refused(status)
        }
        _ => WalletCallError::Transient(status),
    }
}
