//! Calls to the wallet: the batch of debits that pays orders, the credit that refunds one.
//! Both are idempotent by key (the order id), so any retry is safe.

use std::time::Duration;

use flashsale_proto::common::v1::Money;
use flashsale_proto::wallet::v1::debit_result::Outcome;
use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use flashsale_proto::wallet::v1::{BatchDebitRequest, CreditRequest, DebitRequest, VoidRequest};
use flashsale_server::TracedChannel;
use tonic::{Code, Request};

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
    pub fn new(url: &str, timeout: Duration, tls: Option<&flashsale_server::MutualTls>) -> anyhow::Result<Self> {
        let channel = flashsale_server::internal_channel(url, tls)?;
        Ok(Self { client: WalletServiceClient::new(flashsale_server::traced(channel)), timeout })
    }

    /// Debits many orders in one call (one wallet transaction). The outer error
    /// is the call's (nothing is known of any debit); the inner ones are each
    /// debit's own, in the order of `orders`.
    pub async fn pay_batch(&self, orders: &[Order]) -> Result<Vec<Result<Payment, WalletCallError>>, WalletCallError> {
        let mut request = Request::new(BatchDebitRequest { debits: orders.iter().map(debit).collect() });
        request.set_timeout(self.timeout);
        let results = self.client.clone().batch_debit(request).await.map_err(classify)?.into_inner().results;
        if results.len() != orders.len() {
            return Err(WalletCallError::Refused(tonic::Status::internal(
                "BatchDebit answered a different number of debits",
            )));
        }
        Ok(results
            .into_iter()
            .map(|result| match result.outcome {
                Some(Outcome::Transaction(_)) => Ok(Payment::Paid),
                Some(Outcome::Refused(reason)) if reason == "INSUFFICIENT_FUNDS" => Ok(Payment::InsufficientFunds),
                Some(Outcome::Refused(reason)) => {
                    Err(WalletCallError::Refused(tonic::Status::failed_precondition(reason)))
                }
                None => Err(WalletCallError::Refused(tonic::Status::internal("BatchDebit result without an outcome"))),
            })
            .collect())
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

impl WalletClient {
    /// Releases the funds the gateway held for an order inventory rejected
    /// (idempotent; an order with no hold is marked voided, so a hold that
    /// arrives late holds nothing).
    pub async fn release(&self, order: &Order) -> Result<(), WalletCallError> {
        let mut request = Request::new(VoidRequest {
            order_id: order.id.to_string(),
            user_id: order.user_id.clone(),
            amount: Some(Money { currency: order.amount_currency.clone(), amount_minor: order.amount_minor }),
        });
        request.set_timeout(self.timeout);
        self.client.clone().void(request).await.map(|_| ()).map_err(classify)
    }
}

/// The debit that pays `order`, keyed by its id.
fn debit(order: &Order) -> DebitRequest {
    DebitRequest {
        idempotency_key: order.id.to_string(),
        user_id: order.user_id.clone(),
        amount: Some(Money { currency: order.amount_currency.clone(), amount_minor: order.amount_minor }),
        reference: format!("order {}", order.id),
    }
}

fn classify(status: tonic::Status) -> WalletCallError {
    match status.code() {
        // Unimplemented: a wallet older than this inventory (wallets are
        // upgraded first; deploy/README.md, "Commands, dead letters and upgrades").
        Code::Unimplemented
        | Code::InvalidArgument
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::PermissionDenied => WalletCallError::Refused(status),
        _ => WalletCallError::Transient(status),
    }
}
