//! Consumes the order events inventory publishes (services/DESIGN.md, "The purchase path"):
//! - from the shared, durable admission-events queue, the Redis side effects of
//!   each final state (release units, clear in-flight marks), at least once and
//!   idempotent per (order, status), by whichever gateway takes the message.
//!   An event is acked only once applied: while Redis fails it is retried in
//!   place (the delivery stays with us), and one that can never be applied is
//!   copied to the dead-letter queue with its reason first;
//! - from a queue of this gateway's own, every event, to wake `WatchOrder`
//!   streams and clear the local sold-out flag when units may have come back.

use std::sync::Arc;
use std::time::Duration;

use flashsale_messaging::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use flashsale_messaging::lapin::types::FieldTable;
use flashsale_messaging::{ConfirmedPublisher, ConsumeError, Topology};
use flashsale_proto::common::v1::OrderStatus;
use flashsale_proto::inventory::v1::OrderEvent;
use futures::StreamExt;
use prost::Message;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::Admission;
use crate::catalog::Catalog;
use crate::error::GatewayError;

pub struct OrderEvents {
    pub amqp_addr: String,
    pub topology: Topology,
    pub admission: Arc<Admission>,
    pub catalog: Arc<Catalog>,
    pub watchers: broadcast::Sender<Arc<OrderEvent>>,
}

impl OrderEvents {
    pub async fn run(self, shutdown: CancellationToken) {
        flashsale_messaging::supervise("gateway order-event consumer", &shutdown, || self.consume(&shutdown)).await;
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), ConsumeError> {
        let connection = flashsale_messaging::connect(&self.amqp_addr, "gateway-order-events").await?;
        // The session's set-up, bounded as one exchange with the broker.
        let (_channel, dead_letters, mut shared, mut notifications) = flashsale_messaging::bounded(async {
            let channel = connection.create_channel().await?;
            self.topology.declare(&channel).await?;
            channel.basic_qos(100, BasicQosOptions::default()).await?;
            // Its own channel: dead-letter copies wait for their confirms.
            let dead_letters = ConfirmedPublisher::new(&connection, Duration::from_secs(5)).await?;
            let shared = channel
                .basic_consume(
                    self.topology.admission_events_queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            // This gateway's own queue: server-named, gone when the gateway is.
            let own = channel
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() },
                    FieldTable::default(),
                )
                .await?;
            channel
                .queue_bind(
                    own.name().clone(),
                    self.topology.events_exchange.as_str().into(),
                    format!("{}#", flashsale_messaging::ORDER_EVENT_ROUTING_PREFIX).as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let notifications = channel
                .basic_consume(
                    own.name().clone(),
                    "".into(),
                    BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                    FieldTable::default(),
                )
                .await?;
            Ok((channel, dead_letters, shared, notifications))
        })
        .await?;
        flashsale_messaging::export_dead_letter_counter(&self.topology, &self.topology.admission_events_queue);
        // `flashsale_order_events_consumer_up`: 1 while both subscriptions are held.
        // Until then this gateway's own queue is not bound, and the events
        // published meanwhile never reach it (`WatchOrder` streams fall back to
        // re-reading the order).
        let _up = flashsale_messaging::SubscribedGauge::mark("flashsale_order_events_consumer_up");
        loop {
            tokio::select! {
                delivery = shared.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let span = event_span("order.event.apply", &delivery);
                        self.apply(delivery, &dead_letters, shutdown).instrument(span).await;
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(ConsumeError::StreamEnded),
                },
                delivery = notifications.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let span = event_span("order.event.notify", &delivery);
                        span.in_scope(|| self.notify(&delivery.data));
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(ConsumeError::StreamEnded),
                },
                () = flashsale_messaging::connection_lost(&connection) => return Err(ConsumeError::ConnectionLost),
                () = shutdown.cancelled() => {
                    let _ = connection.close(200, "shutdown".into()).await;
                    return Ok(());
                }
            }
        }
    }

    async fn apply(
        &self,
        delivery: flashsale_messaging::lapin::message::Delivery,
        dead_letters: &ConfirmedPublisher,
        shutdown: &CancellationToken,
    ) {
        let Ok(event) = OrderEvent::decode(delivery.data.as_slice()) else {
            self.set_aside(&delivery, dead_letters, "undecodable: not an OrderEvent").await;
            return;
        };
        if let Some(order) = &event.order {
            tracing::Span::current().record("order.id", order.id.as_str());
        }
        let mut backoff = flashsale_messaging::Backoff::new();
        loop {
            match self.apply_to_redis(&event).await {
                Ok(outcome) => {
                    // The units are back in Redis now. This gateway's own notification of
                    // the same event may have cleared the flag before that, and a
                    // SOLD_OUT answered in between set it again: clear it after the fact.
                    if outcome == "APPLIED"
                        && let Some(order) = &event.order
                        && may_free_units(order.status)
                        && let Some(item) = self.catalog.get(&order.item_id)
                    {
                        // Units back on offer, and whether buyers had been told
                        // SOLD_OUT here (a refund, an expired hold, a rejection).
                        // Not the flag: this gateway's notification of the event
                        // may have cleared it already.
                        let after = if item.sold_out.take_told() { "true" } else { "false" };
                        metrics::counter!("flashsale_units_returned_total", "after_sold_out" => after)
                            .increment(u64::from(order.quantity));
                        item.clear_sold_out();
                    }
                    let _ = flashsale_messaging::bounded(delivery.ack(BasicAckOptions::default())).await;
                    return;
                }
                Err(e @ GatewayError::Unavailable(_)) => {
                    // Redis is down or restarting: the event waits here, unacked, so
                    // the outage does not count against its delivery limit.
                    tracing::warn!(error = %e, retry_in_ms = backoff.delay().as_millis() as u64, "applying an order event to Redis failed; retrying");
                }
                Err(e) => {
                    tracing::error!(error = ?e, "order event cannot be applied");
                    self.set_aside(&delivery, dead_letters, &format!("unappliable: {}", e.reason())).await;
                    return;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.delay()) => {}
                // Unacked, the event goes back to the queue when the channel closes.
                () = shutdown.cancelled() => return,
            }
            backoff.grow();
        }
    }

    /// Applies the event in the Redis bucket of its buyer, which takes the item's
    /// bucket count from the catalog (asking inventory once for an item it has
    /// not seen).
    async fn apply_to_redis(&self, event: &OrderEvent) -> Result<String, GatewayError> {
        use crate::admission::Spread;
        // Without an order apply_event refuses it, whatever the spread.
        let Some(order) = &event.order else { return self.admission.apply_event(Spread::new("", 1), event).await };
        let item = match self.catalog.lookup(&order.item_id).await {
            Ok(item) => item,
            // Events name only items inventory has (its orders reference them):
            // this is the catalog's bound on lookups of unknown ids, so try
            // again, the event unacked.
            Err(GatewayError::ItemNotFound) => {
                return Err(GatewayError::Unavailable("the event's item is not in the catalog yet".into()));
            }
            Err(e) => return Err(e),
        };
        self.admission.apply_event(item.spread(), event).await
    }

    /// Copies an event that can never be applied to the dead-letter queue, then
    /// acks it; requeues it if the copy failed (past the delivery limit the
    /// broker dead-letters it itself).
    async fn set_aside(
        &self,
        delivery: &flashsale_messaging::lapin::message::Delivery,
        dead_letters: &ConfirmedPublisher,
        reason: &str,
    ) {
        let queue = &self.topology.admission_events_queue;
        match flashsale_messaging::dead_letter(dead_letters, &self.topology, queue, delivery, reason).await {
            Ok(()) => {
                tracing::error!(reason, "order event dead-lettered");
                let _ = flashsale_messaging::bounded(delivery.ack(BasicAckOptions::default())).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, reason, "dead-lettering an order event failed; requeueing it");
                let _ = flashsale_messaging::bounded(
                    delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }),
                )
                .await;
            }
        }
    }

    fn notify(&self, data: &[u8]) {
        let Ok(event) = OrderEvent::decode(data) else { return };
        if let Some(order) = &event.order {
            tracing::Span::current().record("order.id", order.id.as_str());
            if may_free_units(order.status)
                && let Some(item) = self.catalog.get(&order.item_id)
            {
                item.clear_sold_out();
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.watchers.send(Arc::new(event));
    }
}

/// Whether an order in this final state gave units back.
fn may_free_units(status: i32) -> bool {
    matches!(OrderStatus::try_from(status), Ok(OrderStatus::Rejected | OrderStatus::Refunded))
}

/// A consume span for an `OrderEvent`, child of the inventory span that wrote
/// the event (its context came in the message headers).
fn event_span(name: &'static str, delivery: &flashsale_messaging::lapin::message::Delivery) -> tracing::Span {
    let headers = flashsale_messaging::HeaderExtractor(delivery.properties.headers().as_ref());
    flashsale_telemetry::incoming_span(&headers, || {
        tracing::info_span!(
            "order.event",
            otel.name = name,
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.rabbitmq.destination.routing_key = delivery.routing_key.as_str(),
            order.id = tracing::field::Empty,
        )
    })
}
