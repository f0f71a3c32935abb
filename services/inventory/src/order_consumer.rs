//! Consumes `OrderPlaced` from the orders quorum queue: records a batch of
//! orders in PostgreSQL (one transaction per batch, idempotent by order id),
//! acks only after the commit, then makes the first payment attempt.
//!
//! No message is ever dropped:
//! - a transient database failure (restart, failover, deadlock) is retried in
//!   place with back-off while the deliveries stay unacked with us, so an outage
//!   does not count against the messages' delivery limit;
//! - a batch that fails for good is recorded order by order, and an order that
//!   cannot be recorded, cannot be decoded or names an unknown item is copied to
//!   the dead-letter queue with its reason before its delivery is acked
//!   (`flashsale-inventory dead-letters` lists and replays them).
//!
//! The stream ending (the broker cancelled us, the connection dropped) is a
//! fault: the supervisor loop reconnects with back-off. Redelivered messages are
//! harmless because recording is keyed by the order id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flashsale_db::PgPool;
use flashsale_messaging::lapin::message::Delivery;
use flashsale_messaging::lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use flashsale_messaging::lapin::types::FieldTable;
use flashsale_messaging::{ConfirmedPublisher, ConsumeError, Topology};
use flashsale_proto::common::v1::Money;
use flashsale_proto::inventory::v1::OrderPlaced;
use futures::StreamExt;
use prost::Message;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use crate::db::orders::{self, Placed, Recorded};
use crate::domain::{OrderStatus, parse_item_id, parse_order_id, parse_user_id};
use crate::error::InventoryError;
use crate::settlement::Settlement;

/// How long a batch waits for more deliveries once it has one.
const BATCH_LINGER: Duration = Duration::from_millis(2);

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub amqp_addr: String,
    pub topology: Topology,
    /// Unacknowledged messages the broker may push ahead (never 1: one message
    /// per round trip costs an order of magnitude of throughput).
    pub prefetch: u16,
    /// First payment attempts running at once.
    pub concurrency: usize,
}

#[derive(Clone)]
pub struct OrderConsumer {
    pool: PgPool,
    settlement: Settlement,
    outbox_ready: Arc<Notify>,
    options: ConsumerOptions,
}

impl OrderConsumer {
    pub fn new(pool: PgPool, settlement: Settlement, outbox_ready: Arc<Notify>, options: ConsumerOptions) -> Self {
        Self { pool, settlement, outbox_ready, options }
    }

    /// Consumes until `shutdown`, reconnecting after every fault.
    pub async fn run(self, shutdown: CancellationToken) {
        flashsale_messaging::supervise("inventory order consumer", &shutdown, || self.consume(&shutdown)).await;
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), ConsumeError> {
        let connection = flashsale_messaging::connect(&self.options.amqp_addr, "inventory-order-consumer").await?;
        // The session's set-up, bounded as one exchange with the broker.
        let (_channel, dead_letters, mut deliveries) = flashsale_messaging::bounded(async {
            let channel = connection.create_channel().await?;
            self.options.topology.declare(&channel).await?;
            channel.basic_qos(self.options.prefetch, BasicQosOptions::default()).await?;
            // Its own channel: dead-letter copies wait for their confirms.
            let dead_letters = ConfirmedPublisher::new(&connection, Duration::from_secs(5)).await?;
            let deliveries = channel
                .basic_consume(
                    self.options.topology.orders_queue.as_str().into(),
                    "inventory".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok((channel, dead_letters, deliveries))
        })
        .await?;
        flashsale_messaging::export_dead_letter_counter(&self.options.topology, &self.options.topology.orders_queue);
        tracing::info!(queue = %self.options.topology.orders_queue, "consuming orders");
        // `flashsale_consumer_up`: 1 while this session holds the subscription.
        let _up = flashsale_messaging::SubscribedGauge::mark("flashsale_consumer_up");
        // Payments run beside the consumer, at most `concurrency` at once.
        let payments = Arc::new(Semaphore::new(self.options.concurrency));
        // Most orders recorded in one transaction: half the prefetch, so the broker
        // pushes the next batch while this one commits.
        let batch_size = usize::from(self.options.prefetch / 2).max(1);
        loop {
            let first = tokio::select! {
                delivery = deliveries.next() => delivery,
                () = flashsale_messaging::connection_lost(&connection) => return Err(ConsumeError::ConnectionLost),
                () = shutdown.cancelled() => {
                    // Let payments in hand finish; unacked messages return to the queue.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        payments.acquire_many(self.options.concurrency as u32),
                    ).await;
                    let _ = connection.close(200, "shutdown".into()).await;
                    return Ok(());
                }
            };
            let mut batch = vec![first.ok_or(ConsumeError::StreamEnded)??];
            // Then whatever else has already arrived, up to a batch, waiting at most
            // BATCH_LINGER: one transaction and one ack for all of them.
            let linger = tokio::time::sleep(BATCH_LINGER);
            tokio::pin!(linger);
            while batch.len() < batch_size {
                tokio::select! {
                    biased;
                    delivery = deliveries.next() => batch.push(delivery.ok_or(ConsumeError::StreamEnded)??),
                    () = &mut linger => break,
                }
            }
            self.handle_batch(batch, &payments, &dead_letters, shutdown).await;
        }
    }

    /// Records a batch in one transaction, acks it with one multiple-ack, then
    /// starts the first payment attempt of every order it now holds.
    async fn handle_batch(
        &self,
        batch: Vec<Delivery>,
        payments: &Arc<Semaphore>,
        dead_letters: &ConfirmedPublisher,
        shutdown: &CancellationToken,
    ) {
        let mut accepted = Vec::with_capacity(batch.len());
        let mut spans = HashMap::with_capacity(batch.len());
        for delivery in batch {
            match decode(&delivery.data) {
                Ok(mut placed) => {
                    crate::metrics::delivered(placed.id, delivery.redelivered);
                    // One consume span per order, child of the gateway's publish span
                    // (its context came in the message headers).
                    let headers = flashsale_messaging::HeaderExtractor(delivery.properties.headers().as_ref());
                    let span = flashsale_telemetry::incoming_span(&headers, || {
                        tracing::info_span!(
                            "order.consume",
                            otel.kind = "consumer",
                            messaging.system = "rabbitmq",
                            messaging.operation.type = "process",
                            messaging.destination.name = %self.options.topology.orders_queue,
                            order.id = %placed.id,
                            item.id = %placed.item_id,
                            user.id = %placed.user_id,
                            redelivered = delivery.redelivered,
                        )
                    });
                    placed.traceparent = flashsale_telemetry::traceparent(&span);
                    spans.insert(placed.id, span);
                    accepted.push((delivery, placed));
                }
                Err(e) => self.set_aside(dead_letters, &delivery, &format!("undecodable: {e}")).await,
            }
        }
        let Some((last, _)) = accepted.last() else { return };
        let last_tag = last.delivery_tag;
        let acker = last.acker.clone();
        let placed: Vec<Placed> = accepted.iter().map(|(_, placed)| placed.clone()).collect();
        // The batch's one transaction: a child of its first order's consume span,
        // linked to the others' (OpenTelemetry's shape for batch processing).
        let record_span = crate::settlement::batch_span(
            "orders.record",
            placed.iter().filter_map(|p| spans.get(&p.id)),
            placed.len(),
        );
        let recorded = self
            .retrying_while_transient(shutdown, || async {
                let mut conn = self.pool.get().await?;
                orders::record_batch(&mut conn, &placed).await
            })
            .instrument(record_span)
            .await;
        let recorded = match recorded {
            Some(Ok(recorded)) => recorded,
            // Shutting down: the unacked deliveries go back to the queue.
            None => return,
            Some(Err(e)) => {
                // One bad order must not sink the others: record them one by one.
                tracing::error!(error = ?e, orders = placed.len(), "recording a batch failed; recording its orders one by one");
                for (delivery, placed) in accepted {
                    let span = spans.remove(&placed.id).unwrap_or_else(Span::none);
                    self.handle_one(delivery, placed, payments, dead_letters, shutdown).instrument(span).await;
                }
                return;
            }
        };
        // Fault tests: the batch is committed, its deliveries not acked.
        flashsale_server::crash_point("inventory-before-ack");
        // Orders for items inventory does not know are set aside before the ack.
        for ((delivery, placed), outcome) in accepted.iter().zip(&recorded) {
            if matches!(outcome, Recorded::UnknownItem) {
                let reason = format!("unknown-item: {}", placed.item_id);
                self.dead_letter_or_requeue(dead_letters, delivery, &reason).await;
            }
        }
        // Every earlier delivery on this channel is settled already (batches are
        // handled one at a time), so one multiple-ack covers exactly this batch.
        if let Err(e) = flashsale_messaging::bounded(acker.ack(BasicAckOptions { multiple: true })).await {
            // Recorded already: redeliveries will find the orders and do nothing.
            tracing::warn!(error = %e, delivery.tag = last_tag, "ack failed after commit");
        }
        let mut to_pay = Vec::new();
        for outcome in recorded {
            let span = outcome.order().and_then(|order| spans.get(&order.id)).map_or_else(Span::none, Clone::clone);
            if let Some(order) = span.in_scope(|| self.after_recording(outcome)) {
                to_pay.push((order, span));
            }
        }
        self.pay_later(to_pay, payments).await;
    }

    /// Runs `attempt` until it succeeds or fails for good, backing off (100 ms
    /// doubling to 5 s) while it fails transiently: the database restarting or
    /// failing over is a matter of seconds, and the deliveries wait with us.
    /// `None` when shutdown came first.
    async fn retrying_while_transient<T, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        mut attempt: F,
    ) -> Option<Result<T, InventoryError>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, InventoryError>>,
    {
        let mut backoff = flashsale_messaging::Backoff::new();
        loop {
            match attempt().await {
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.delay().as_millis() as u64, "recording failed; retrying");
                    crate::metrics::recording_retried();
                }
                outcome => return Some(outcome),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.delay()) => {}
                () = shutdown.cancelled() => return None,
            }
            backoff.grow();
        }
    }

    /// What follows a recorded order: the order back if it is to be paid, a
    /// wake-up for the outbox relay if it was rejected.
    fn after_recording(&self, outcome: Recorded) -> Option<crate::db::models::Order> {
        match outcome {
            Recorded::Held(order) => Some(order),
            Recorded::Existing(order) if order.status == OrderStatus::PaymentPending.as_db() => Some(order),
            Recorded::Rejected(order) => {
                crate::metrics::final_state(&order);
                tracing::info!(order.id = %order.id, reason = %order.reject_reason, "order rejected by inventory");
                self.outbox_ready.notify_one();
                self.settlement.release_hold(order);
                None
            }
            // Set aside in the dead-letter queue by the caller.
            Recorded::Existing(_) | Recorded::UnknownItem => None,
        }
    }

    /// Records one order on its own transaction and acks its delivery alone.
    async fn handle_one(
        &self,
        delivery: Delivery,
        placed: Placed,
        payments: &Arc<Semaphore>,
        dead_letters: &ConfirmedPublisher,
        shutdown: &CancellationToken,
    ) {
        let recorded = self
            .retrying_while_transient(shutdown, || async {
                let mut conn = self.pool.get().await?;
                orders::record_placed(&mut conn, &placed).await
            })
            .await;
        match recorded {
            None => {}
            Some(Ok(Recorded::UnknownItem)) => {
                self.set_aside(dead_letters, &delivery, &format!("unknown-item: {}", placed.item_id)).await;
            }
            Some(Ok(recorded)) => {
                let _ = flashsale_messaging::bounded(delivery.ack(BasicAckOptions::default())).await;
                if let Some(order) = self.after_recording(recorded) {
                    self.pay_later(vec![(order, Span::current())], payments).await;
                }
            }
            Some(Err(e)) => {
                // Not going to succeed on redelivery: keep it where an operator sees it.
                tracing::error!(error = ?e, order.id = %placed.id, "recording failed for good; dead-lettering the message");
                self.set_aside(dead_letters, &delivery, "record-failed: the database refused the order").await;
            }
        }
    }

    /// Copies `delivery` to the dead-letter queue, then acks it.
    async fn set_aside(&self, dead_letters: &ConfirmedPublisher, delivery: &Delivery, reason: &str) {
        if self.dead_letter_or_requeue(dead_letters, delivery, reason).await {
            let _ = flashsale_messaging::bounded(delivery.ack(BasicAckOptions::default())).await;
        }
    }

    /// Copies `delivery` to the dead-letter queue; on failure requeues it (it
    /// comes back, and past the delivery limit the broker dead-letters it
    /// itself). Whether the copy is safe in the dead-letter queue.
    async fn dead_letter_or_requeue(
        &self,
        dead_letters: &ConfirmedPublisher,
        delivery: &Delivery,
        reason: &str,
    ) -> bool {
        let queue = &self.options.topology.orders_queue;
        match flashsale_messaging::dead_letter(dead_letters, &self.options.topology, queue, delivery, reason).await {
            Ok(()) => {
                tracing::error!(reason, delivery.tag = delivery.delivery_tag, "order message dead-lettered");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, reason, "dead-lettering failed; requeueing the message");
                let _ = flashsale_messaging::bounded(
                    delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }),
                )
                .await;
                false
            }
        }
    }

    /// The first payment attempt of a batch's orders, beside the consumer
    /// (at most `concurrency` batches at once).
    async fn pay_later(&self, orders: Vec<(crate::db::models::Order, Span)>, payments: &Arc<Semaphore>) {
        if orders.is_empty() {
            return;
        }
        let Ok(slot) = payments.clone().acquire_owned().await else { return };
        let settlement = self.settlement.clone();
        tokio::spawn(async move {
            settlement.pay_batch(orders).await;
            drop(slot);
        });
    }
}

/// Decodes and validates an `OrderPlaced`.
pub fn decode(data: &[u8]) -> Result<Placed, InventoryError> {
    placed(OrderPlaced::decode(data).map_err(|_| InventoryError::invalid("message", "not an OrderPlaced"))?)
}

/// Validates an `OrderPlaced` (destructured in full), from the queue or from
/// `RecordOrder`: one set of rules for both ways in.
pub fn placed(message: OrderPlaced) -> Result<Placed, InventoryError> {
    let OrderPlaced { order_id, user_id, item_id, quantity, amount, idempotency_key, placed_at: _ } = message;
    let Money { currency, amount_minor } = amount.ok_or_else(|| InventoryError::invalid("amount", "is required"))?;
    let quantity = Some(quantity)
        .filter(|q| (1..=flashsale_domain::MAX_PER_USER_LIMIT).contains(q))
        .and_then(|q| i32::try_from(q).ok())
        .ok_or_else(|| InventoryError::invalid("quantity", "must be 1..=1000"))?;
    // The gateway's rules (one home: `flashsale-domain`), and what the orders
    // table's CHECKs demand, checked here so a malformed message is rejected
    // once instead of failing its insert for ever.
    flashsale_domain::IdempotencyKey::check(&idempotency_key)?;
    let currency = flashsale_domain::Currency::parse(&currency).map_err(|e| e.at("amount.currency"))?.code().to_owned();
    let amount_minor = flashsale_domain::Amount::parse(amount_minor)?.minor();
    Ok(Placed {
        id: parse_order_id(&order_id)?,
        user_id: parse_user_id(&user_id)?.to_owned(),
        item_id: parse_item_id(&item_id)?.to_owned(),
        quantity,
        currency,
        amount_minor,
        idempotency_key,
        traceparent: None,
    })
}
