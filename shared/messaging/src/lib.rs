//! RabbitMQ plumbing shared by gateway and inventory (no business rules): the
//! topology both sides must agree on, connecting, and publishing that waits for
//! the broker's confirm. Payloads are proto messages encoded by the callers.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

pub use lapin;
use tokio_util::sync::CancellationToken;

/// Routing key prefix of order events: `order.<status>` (e.g. `order.confirmed`).
pub const ORDER_EVENT_ROUTING_PREFIX: &str = "order.";

/// Names of the queues and exchange, all derived from one prefix so a test (or a
/// second suite on the same broker) can have its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Durable quorum queue of `OrderPlaced`, gateway → inventory.
    pub orders_queue: String,
    /// Durable topic exchange of `OrderEvent`, inventory → gateways.
    pub events_exchange: String,
    /// Durable quorum queue of every `OrderEvent`, shared by all gateways: the
    /// Redis side effects of final states (at least once, idempotent per order).
    pub admission_events_queue: String,
}

impl Topology {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            orders_queue: format!("{prefix}.orders"),
            events_exchange: format!("{prefix}.order-events"),
            admission_events_queue: format!("{prefix}.order-events.admission"),
        }
    }

    /// Declares everything (idempotent: every party declares on connect).
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        channel.queue_declare(self.orders_queue.as_str().into(), durable, quorum()).await?;
        channel
            .exchange_declare(
                self.events_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        channel.queue_declare(self.admission_events_queue.as_str().into(), durable, quorum()).await?;
        channel
            .queue_bind(
                self.admission_events_queue.as_str().into(),
                self.events_exchange.as_str().into(),
                format!("{ORDER_EVENT_ROUTING_PREFIX}#").as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}

/// Quorum queues: replicated, and faster than classic queues for persistent
/// messages with confirms on this kind of machine (see PITFALLS.md).
fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments
}

/// Opens a connection, naming it after the service in the broker's UI.
pub async fn connect(addr: &str, service: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(service.into());
    Connection::connect(addr, properties).await
}

/// Why a publish did not end in a positive confirm.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound to receive the message")]
    Unroutable,
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    #[error("publisher confirms are not enabled on this channel")]
    NotConfirmed,
}

/// A channel in confirm mode: every publish is persistent and mandatory, and
/// `publish` returns only once the broker has taken responsibility for it.
#[derive(Clone)]
pub struct ConfirmedPublisher {
    channel: Channel,
    timeout: Duration,
}

impl ConfirmedPublisher {
    pub async fn new(connection: &Connection, timeout: Duration) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { channel, timeout })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits for the confirm. Concurrent calls share the channel,
    /// so their confirms are pipelined rather than serialised.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2) // persistent
            .with_content_type("application/x-protobuf".into())
            .with_headers(headers);
        let confirm = async {
            let pending = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    payload,
                    properties,
                )
                .await?;
            Ok::<_, PublishError>(pending.await?)
        };
        match tokio::time::timeout(self.timeout, confirm).await {
            Err(_) => Err(PublishError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            // Acked but returned: mandatory and nothing bound to take it.
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Unroutable),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::NotConfirmed),
        }
    }

    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }
}

/// Why a consumer stopped short of a shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker cancelled the consumer (queue deleted, node failover): a fault.
    #[error("the consumer stream ended")]
    StreamEnded,
}

/// Runs `attempt` until `shutdown`, starting it again after every failure with
/// exponential back-off (100 ms, doubling, at most 5 s). Consumers and relays
/// treat a broken connection or an ended stream as a fault and reconnect;
/// lapin's own recovery is not relied on (PITFALLS.md).
pub async fn supervise<F, Fut, E>(task: &'static str, shutdown: &CancellationToken, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(task, error = %e, retry_in_ms = backoff.as_millis() as u64, "stopped; reconnecting")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Writes OpenTelemetry context (W3C `traceparent`, `tracestate`) into AMQP
/// message headers. No crate does this for lapin's `FieldTable`.
pub struct HeaderInjector<'a>(pub &'a mut FieldTable);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.into(), AMQPValue::LongString(value.into()));
    }
}

/// Reads OpenTelemetry context from AMQP message headers.
pub struct HeaderExtractor<'a>(pub Option<&'a FieldTable>);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0?.inner().get(key)? {
            AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
            AMQPValue::ShortString(value) => Some(value.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.map(|headers| headers.inner().keys().map(|k| k.as_str()).collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod header_tests {
    use opentelemetry::propagation::{Extractor, Injector};

    use super::*;

    #[test]
    fn trace_headers_round_trip_through_a_field_table() {
        let mut headers = FieldTable::default();
        HeaderInjector(&mut headers)
            .set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let extractor = HeaderExtractor(Some(&headers));
        assert_eq!(extractor.get("traceparent"), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(extractor.get("tracestate"), None);
        assert_eq!(extractor.keys(), vec!["traceparent"]);
        assert_eq!(HeaderExtractor(None).get("traceparent"), None);
    }
}
