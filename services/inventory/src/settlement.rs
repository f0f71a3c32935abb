//! Paying for held orders: the first attempt right after the order is recorded,
//! then the sweeper, which retries every PAYMENT_PENDING order whose time has
//! come until the wallet gives a final answer.

use std::time::Duration;

use flashsale_db::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use crate::db::models::Order;
use crate::db::orders;
use crate::error::InventoryError;
use crate::wallet_client::{WalletCallError, WalletClient};

/// Tries to release a rejected order's hold before leaving it to expire.
const RELEASE_TRIES: usize = 20;

/// Most orders paid with one wallet call (the wallet takes up to 500).
const MAX_BATCH: usize = 200;

/// A span for work on a batch of orders: a child of the first traced order's
/// span, linked to the others' (OpenTelemetry's shape for batch processing);
/// outside any trace when none of them is traced.
pub fn batch_span<'a>(name: &'static str, spans: impl IntoIterator<Item = &'a Span>, size: usize) -> Span {
    let mut traced = spans.into_iter().filter(|span| !span.is_none());
    match traced.next() {
        Some(first) => {
            let span =
                tracing::info_span!(parent: first.id(), "batch", otel.name = name, db.operation.batch.size = size);
            for other in traced {
                span.follows_from(other);
            }
            span
        }
        None => flashsale_telemetry::info_span!("batch", otel.name = name, db.operation.batch.size = size),
    }
}

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

    /// Wakes the outbox relay: an event was written outside a settlement.
    pub fn outbox_changed(&self) {
        self.outbox_ready.notify_one();
    }

    /// Releases the funds held for an order rejected when recorded (sold out,
    /// over the limit, a reused key), in a task of its own that tries a while;
    /// a hold it cannot release expires in the wallet.
    pub fn release_hold(&self, order: Order) {
        let wallet = self.wallet.clone();
        tokio::spawn(
            async move {
                let mut backoff = flashsale_messaging::Backoff::new();
                for tried in 1..=RELEASE_TRIES {
                    match wallet.release(&order).await {
                        Ok(()) => return crate::metrics::hold_released("voided"),
                        Err(WalletCallError::Refused(status)) => {
                            tracing::warn!(error = %status, order.id = %order.id, "the wallet refused to release a rejected order's hold");
                            return crate::metrics::hold_released("refused");
                        }
                        Err(WalletCallError::Transient(status)) => {
                            tracing::warn!(error = %status, order.id = %order.id, tried, "could not release a rejected order's hold");
                        }
                    }
                    tokio::time::sleep(backoff.delay()).await;
                    backoff.grow();
                }
                crate::metrics::hold_released("left_to_expire");
            }
            .in_current_span(),
        );
    }

    /// Pays many orders with one wallet call and settles them in one
    /// transaction. Each order comes with the span of its own trace: the batch's
    /// spans are children of the first traced one, linked to the others, and each
    /// order's event joins its own trace. Orders without a final answer stay
    /// PAYMENT_PENDING for the sweeper.
    pub async fn pay_batch(&self, orders: Vec<(Order, Span)>) {
        for chunk in orders.chunks(MAX_BATCH) {
            let span = batch_span("orders.pay", chunk.iter().map(|(_, span)| span), chunk.len());
            self.pay_chunk(chunk).instrument(span).await;
        }
    }

    async fn pay_chunk(&self, chunk: &[(Order, Span)]) {
        let orders: Vec<Order> = chunk.iter().map(|(order, _)| order.clone()).collect();
        let answers = match self.wallet.pay_batch(&orders).await {
            Ok(answers) => answers,
            Err(e) => {
                tracing::warn!(error = %e, orders = chunk.len(), "batch debit not settled; the sweeper will retry");
                return;
            }
        };
        // Fault tests: debited in the wallet, the orders not yet final.
        flashsale_server::crash_point("inventory-before-settle");
        let settle_span = flashsale_telemetry::info_span!(
            "orders.settle",
            db.system.name = "postgresql",
            db.operation.batch.size = chunk.len(),
        );
        // The first traced order's event continues from the settle span; the
        // others' from their own spans (each order keeps its own trace).
        let lead = chunk.iter().position(|(_, span)| !span.is_none());
        let mut settling = Vec::with_capacity(chunk.len());
        for (i, ((order, span), answer)) in chunk.iter().zip(answers).enumerate() {
            match answer {
                Ok(payment) => {
                    let traceparent = if Some(i) == lead {
                        flashsale_telemetry::traceparent(&settle_span)
                    } else {
                        flashsale_telemetry::traceparent(span)
                    };
                    settling.push(orders::PaymentOutcome { id: order.id, payment, traceparent });
                }
                Err(e) => {
                    // Our own request was malformed: a bug, not a buyer's problem. The
                    // order stays pending (never silently dropped) and is retried.
                    tracing::error!(error = %e, order.id = %order.id, "wallet refused a debit request");
                }
            }
        }
        if settling.is_empty() {
            return;
        }
        let settled = async {
            let mut conn = self.pool.get().await?;
            orders::settle_batch(&mut conn, &settling).await
        }
        .instrument(settle_span)
        .await;
        match settled {
            Ok(settled) => {
                for order in &settled {
                    crate::metrics::final_state(order);
                }
                if !settled.is_empty() {
                    self.outbox_ready.notify_one();
                }
            }
            // The debits are recorded under the order ids: the sweeper's retry
            // gets the same answers and settles them then.
            Err(e) => {
                tracing::warn!(error = %e, orders = settling.len(), "settling a batch failed; the sweeper will retry")
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
        let this = &self;
        flashsale_server::every(interval, &shutdown, || async move {
            match this.sweep_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(orders = n, "sweeper retried pending payments"),
                Err(e) => tracing::warn!(error = %e, "sweeper pass failed"),
            }
        })
        .await;
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
        self.pay_batch(due.into_iter().map(|order| (order, Span::none())).collect()).await;
        Ok(tried)
    }
}
