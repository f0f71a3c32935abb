//! The queues and exchanges both sides must agree on, and declaring them.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// Routing key prefix of order events: `order.<status>` (e.g. `order.confirmed`).
pub const ORDER_EVENT_ROUTING_PREFIX: &str = "order.";

/// How many times a quorum queue delivers one message before it dead-letters
/// it. Set explicitly: RabbitMQ 4 defaults to 20 and, without a dead-letter
/// exchange, then drops the message. Our consumers retry a failing dependency
/// in place (the delivery stays with them), so only crashes and shutdowns
/// mid-message count here: 50 of those in a row mark a message as poison.
pub const DELIVERY_LIMIT: i64 = 50;

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
