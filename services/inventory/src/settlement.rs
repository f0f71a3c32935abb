//! Paying for held orders: the first attempt right after the order is recorded,
//! then the sweeper, which retries every PAYMENT_PENDING order whose time has
//! come until the wallet gives a final answer.

use std::time::Duration;

use flashsale_db::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::models::Order;
use crate::db::orders;
use crate::error::InventoryError;
use crate::wallet_client::{WalletCallError, WalletClient};

/// Settles orders against the wallet.
#[derive(Clone)]
pub struct Settlement {
    pool: PgPool,
    wallet: WalletClient,
    /// Wakes the outbox relay when a settlement wrote an event.
    outbox_ready: std::sync::Arc<Notify>,
}

impl Settlement {
    pub fn new(pool: PgPool, wallet: WalletClient, outbox_ready: std::sync::Arc<Notify>) -> Self {
        Self { pool, wallet, outbox_ready }
    }

    /// One attempt to pay `order`. A transient failure leaves it PAYMENT_PENDING
    /// for the sweeper; that is not an error of this call.
    pub async fn pay(&self, order: &Order) -> Result<(), InventoryError> {
        match self.wallet.pay(order).await {
            Ok(payment) => {
                let span = flashsale_telemetry::info_span!(
                    "orders.settle",
                    db.system.name = "postgresql",
                    order.id = %order.id,
                    order.status = tracing::field::Empty,
                );
                async {
                    let mut conn = self.pool.get().await?;
                    if let Some(settled) = orders::settle(&mut conn, order.id, payment).await? {
                        tracing::Span::current().record("order.status", settled.status.as_str());
                        crate::metrics::final_state(&settled);
                        self.outbox_ready.notify_one();
                    }
                    Ok(())
                }
                .instrument(span)
                .await
            }
            Err(WalletCallError::Transient(status)) => {
                tracing::warn!(order.id = %order.id, code = ?status.code(), "debit not settled; the sweeper will retry");
                Ok(())
            }
            Err(WalletCallError::Refused(status)) => {
                // Our own request was malformed: a bug, not a buyer's problem. The
                // order stays pending (never silently dropped) and is retried.
                tracing::error!(order.id = %order.id, code = ?status.code(), "wallet refused a debit request");
                Ok(())
            }
        }
    }

    /// Completes a requested refund: credits the wallet under `refund:<order id>`
    /// (once, whatever the retries), then marks the order and returns its units.
    pub async fn complete_refund(&self, order: &Order) -> Result<Order, InventoryError> {
        self.wallet.refund(order).await.map_err(|e| match e {
            WalletCallError::Transient(status) => InventoryError::Unavailable(Box::new(status)),
            WalletCallError::Refused(status) => InventoryError::Internal(Box::new(status)),
        })?;
        let mut conn = self.pool.get().await?;
        let refunded = orders::mark_refunded(&mut conn, order.id).await?;
        crate::metrics::final_state(&refunded);
        self.outbox_ready.notify_one();
        Ok(refunded)
    }

    /// Retries due payments every `interval` until `shutdown` fires.
    pub async fn run_sweeper(self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => return,
            }
            match self.sweep_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(orders = n, "sweeper retried pending payments"),
                Err(e) => tracing::warn!(error = %e, "sweeper pass failed"),
            }
        }
    }

    /// Claims due orders and tries to pay each, and finishes refunds that were
    /// interrupted; returns how many orders were tried.
    pub async fn sweep_once(&self) -> Result<usize, InventoryError> {
        let (due, refunds) = {
            let mut conn = self.pool.get().await?;
            let due = orders::claim_due_payments(&mut conn, 200).await?;
            let refunds = orders::refunds_due(&mut conn, chrono::Duration::seconds(5), 100).await?;
            (due, refunds)
        };
        for order in &refunds {
            match self.complete_refund(order).await {
                Ok(_) => tracing::info!(order.id = %order.id, "finished an interrupted refund"),
                Err(e) => tracing::warn!(error = %e, order.id = %order.id, "refund still not finished"),
            }
        }
        let tried = due.len() + refunds.len();
        let attempts = due.iter().map(|order| self.pay(order));
        for result in futures::future::join_all(attempts).await {
            if let Err(e) = result {
                tracing::warn!(error = %e, "retrying a payment failed");
            }
        }
        Ok(tried)
    }
}
