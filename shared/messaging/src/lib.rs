//! RabbitMQ plumbing shared by gateway and inventory (no business rules): the
//! topology both sides must agree on, connecting, and publishing that waits for
//! the broker's confirm. Payloads are proto messages encoded by the callers.

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

/// How many times a quorum queue delivers one message before it dead-letters
/// it. Set explicitly: RabbitMQ 4 defaults to 20 and, without a dead-letter
/// exchange, then drops the message. Our consumers retry a failing dependency
/// in place (the delivery stays with them), so only crashes and shutdowns
/// mid-message count here: 50 of those in a row mark a message as poison.
pub const DELIVERY_LIMIT: i64 = 50;

/// Header a dead-lettered message carries with the reason it was set aside
/// (besides the broker's own `x-death` when the broker dead-lettered it).
pub const DEAD_LETTER_REASON_HEADER: &str = "x-flashsale-dead-letter-reason";
/// Header a dead-lettered message carries with the queue it came from.
pub const DEAD_LETTER_QUEUE_HEADER: &str = "x-flashsale-dead-letter-queue";

/// Names of the queues and exchanges, all derived from one prefix so a test (or
/// a second suite on the same broker) can have its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Durable quorum queue of `OrderPlaced`, gateway → inventory.
    pub orders_queue: String,
    /// Durable topic exchange of `OrderEvent`, inventory → gateways.
    pub events_exchange: String,
    /// Durable quorum queue of every `OrderEvent`, shared by all gateways: the
    /// Redis side effects of final states (at least once, idempotent per order).
    pub admission_events_queue: String,
    /// Durable direct exchange that every queue above dead-letters into, with
    /// the routing key [`Topology::dead_letter_queue`] of the queue.
    pub dead_letter_exchange: String,
}

impl Topology {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            orders_queue: format!("{prefix}.orders"),
            events_exchange: format!("{prefix}.order-events"),
            admission_events_queue: format!("{prefix}.order-events.admission"),
            dead_letter_exchange: format!("{prefix}.dead-letter"),
        }
    }

    /// The durable queues that hold work (each has a dead-letter queue).
    pub fn work_queues(&self) -> [&str; 2] {
        [self.orders_queue.as_str(), self.admission_events_queue.as_str()]
    }

    /// Where messages of `queue` go when they are set aside for good: `<queue>.dead`.
    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dead")
    }

    /// Declares everything (idempotent: every party declares on connect).
    ///
    /// Queue arguments are fixed at creation: a broker that still holds these
    /// queues from a version without dead-lettering refuses the declaration
    /// (`PRECONDITION_FAILED`); delete the old queues once they are drained.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        for queue in self.work_queues() {
            let dead = Self::dead_letter_queue(queue);
            channel.queue_declare(dead.as_str().into(), durable, quorum()).await?;
            channel
                .queue_bind(
                    dead.as_str().into(),
                    self.dead_letter_exchange.as_str().into(),
                    dead.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            channel.queue_declare(queue.into(), durable, self.work_queue_arguments(queue)).await?;
        }
        channel
            .exchange_declare(
                self.events_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
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

    /// A quorum queue that dead-letters into `<queue>.dead` past [`DELIVERY_LIMIT`].
    fn work_queue_arguments(&self, queue: &str) -> FieldTable {
        let mut arguments = quorum();
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DELIVERY_LIMIT));
        arguments
            .insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_letter_exchange.as_str().into()));
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(Self::dead_letter_queue(queue).as_str().into()),
        );
        arguments
    }
}

/// Quorum queues: replicated, and faster than classic queues for persistent
/// messages with publisher confirms (about twice the publish rate on a two-core machine).
fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments
}

/// Sets a message aside for good (counted in `flashsale_dead_lettered_total{queue}`):
/// publishes a copy (same payload and headers,
/// plus the reason and the queue it came from) to the dead-letter queue of
/// `queue`, and waits for the broker's confirm. The caller acks the original
/// only after this returns `Ok`, so a crash in between leaves it queued (it may
/// then be dead-lettered twice; replaying is idempotent by order id).
pub async fn dead_letter(
    publisher: &ConfirmedPublisher,
    topology: &Topology,
    queue: &str,
    delivery: &lapin::message::Delivery,
    reason: &str,
) -> Result<(), PublishError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(DEAD_LETTER_REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(DEAD_LETTER_QUEUE_HEADER.into(), AMQPValue::LongString(queue.into()));
    publisher
        .publish(&topology.dead_letter_exchange, &Topology::dead_letter_queue(queue), &delivery.data, headers)
        .await?;
    metrics::counter!("flashsale_dead_lettered_total", "queue" => queue_kind(topology, queue)).increment(1);
    Ok(())
}

/// Exports `flashsale_dead_lettered_total{queue}` for `queue` at 0, so the
/// alert on its increase has a series from the first scrape (consumers call
/// this when they subscribe).
pub fn export_dead_letter_counter(topology: &Topology, queue: &str) {
    metrics::counter!("flashsale_dead_lettered_total", "queue" => queue_kind(topology, queue)).increment(0);
}

/// A bounded label for a queue name (the prefix varies per deployment and test).
fn queue_kind(topology: &Topology, queue: &str) -> &'static str {
    if queue == topology.orders_queue {
        "orders"
    } else if queue == topology.admission_events_queue {
        "order-events"
    } else {
        "other"
    }
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
    /// No connection to the broker right now (a reconnect is under way).
    #[error("not connected to the broker")]
    Disconnected,
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
/// lapin's own recovery is not relied on: it does not re-declare our
/// topology or resubscribe with our settings, and every consumer is idempotent anyway.
pub async fn supervise<F, Fut, E>(task: &'static str, shutdown: &CancellationToken, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(()) => return,
            Err(e) => {
                // The whole chain: a wrapper such as "dependency unavailable" alone
                // does not say which call failed or why.
                let mut error = e.to_string();
                let mut source = e.source();
                while let Some(cause) = source {
                    error.push_str(": ");
                    error.push_str(&cause.to_string());
                    source = cause.source();
                }
                tracing::warn!(task, error, retry_in_ms = backoff.as_millis() as u64, "stopped; reconnecting")
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

/// One message held in a dead-letter queue, as `dead-letters list` prints it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Why it was set aside: our reason header, or the broker's `x-death`
    /// reason (`delivery_limit`, `rejected`, …) when the broker moved it.
    pub reason: String,
    pub payload: Vec<u8>,
}

/// Reads up to `max` messages of `queue`'s dead-letter queue without removing
/// them (they are returned to it when the channel closes).
pub async fn list_dead_letters(
    connection: &Connection,
    queue: &str,
    max: usize,
) -> Result<Vec<DeadLetter>, lapin::Error> {
    use lapin::options::BasicGetOptions;
    let channel = connection.create_channel().await?;
    let dead = Topology::dead_letter_queue(queue);
    let mut found = Vec::new();
    while found.len() < max {
        let Some(message) = channel.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false }).await? else {
            break;
        };
        let delivery = message.delivery;
        found.push(DeadLetter {
            reason: dead_letter_reason(delivery.properties.headers().as_ref()),
            payload: delivery.data,
        });
    }
    // Unacked: closing the channel puts every message back.
    channel.close(200, "listed".into()).await?;
    Ok(found)
}

/// Moves the messages waiting in `queue`'s dead-letter queue back to `queue` (each
/// published with a confirm before it is acked, so none is lost if this stops
/// half-way). Returns how many were moved. Consumers are idempotent per order,
/// so replaying a message that had been applied after all changes nothing.
pub async fn replay_dead_letters(connection: &Connection, queue: &str) -> Result<u32, PublishError> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let channel = connection.create_channel().await?;
    let publisher = ConfirmedPublisher::new(connection, Duration::from_secs(10)).await?;
    let dead = Topology::dead_letter_queue(queue);
    // Only what is there now: a message that fails again comes straight back to
    // the dead-letter queue and must not be replayed in a loop.
    let waiting = channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await?
        .message_count();
    let mut moved = 0;
    while moved < waiting
        && let Some(message) = channel.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false }).await?
    {
        let delivery = message.delivery;
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut kept = FieldTable::default();
        for (key, value) in headers.inner() {
            // A replayed message starts afresh: no stale reason, no death history.
            if !matches!(key.as_str(), DEAD_LETTER_REASON_HEADER | DEAD_LETTER_QUEUE_HEADER | "x-death") {
                kept.insert(key.clone(), value.clone());
            }
        }
        headers = kept;
        publisher.publish("", queue, &delivery.data, headers).await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    channel.close(200, "replayed".into()).await?;
    Ok(moved)
}

/// The reason a dead-lettered message carries (ours first, then the broker's).
fn dead_letter_reason(headers: Option<&FieldTable>) -> String {
    let Some(headers) = headers else { return "unknown".into() };
    let text = |value: &AMQPValue| match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    if let Some(reason) = headers.inner().get(DEAD_LETTER_REASON_HEADER).and_then(text) {
        return reason;
    }
    // x-death: an array of tables, newest first, each with a `reason`.
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death")
        && let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first()
        && let Some(reason) = death.inner().get("reason").and_then(text)
    {
        return format!("broker: {reason}");
    }
    "unknown".into()
}
