//! Consumes the order events inventory publishes (ARCHITECTURE.md, step 7):
//! - from the shared, durable admission-events queue, the Redis side effects of
//!   each final state (release units, clear in-flight marks), at least once and
//!   idempotent per (order, status), by whichever gateway takes the message;
//! - from a queue of this gateway's own, every event, to wake `WatchOrder`
//!   streams and clear the local sold-out flag when units may have come back.

use std::sync::Arc;
use std::time::Duration;

use flashsale_messaging::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use flashsale_messaging::lapin::types::FieldTable;
use flashsale_messaging::{ConsumeError, Topology};
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
        let channel = connection.create_channel().await?;
        self.topology.declare(&channel).await?;
        channel.basic_qos(100, BasicQosOptions::default()).await?;
        let mut shared = channel
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
        let mut notifications = channel
            .basic_consume(
                own.name().clone(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await?;
        loop {
            tokio::select! {
                delivery = shared.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let span = event_span("order.event.apply", &delivery);
                        self.apply(delivery).instrument(span).await;
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
                () = shutdown.cancelled() => {
                    let _ = connection.close(200, "shutdown".into()).await;
                    return Ok(());
                }
            }
        }
    }

    async fn apply(&self, delivery: flashsale_messaging::lapin::message::Delivery) {
        let Ok(event) = OrderEvent::decode(delivery.data.as_slice()) else {
            tracing::error!("undecodable OrderEvent dropped");
            let _ = delivery.ack(BasicAckOptions::default()).await;
            return;
        };
        if let Some(order) = &event.order {
            tracing::Span::current().record("order.id", order.id.as_str());
        }
        match self.admission.apply_event(&event).await {
            Ok(outcome) => {
                // The units are back in Redis now. This gateway's own notification of
                // the same event may have cleared the flag before that, and a
                // SOLD_OUT answered in between set it again: clear it after the fact.
                if outcome == "APPLIED"
                    && let Some(order) = &event.order
                    && may_free_units(order.status)
                    && let Some(item) = self.catalog.get(&order.item_id)
                {
                    item.clear_sold_out();
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            Err(e @ GatewayError::Unavailable(_)) => {
                tracing::warn!(error = %e, "applying an order event to Redis failed; requeueing");
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
            }
            Err(e) => {
                // A malformed event will not improve on redelivery.
                tracing::error!(error = ?e, "order event cannot be applied; dropping it");
                let _ = delivery.ack(BasicAckOptions::default()).await;
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
