//! Messages set aside for good: with their reason, listed and replayed by the
//! `dead-letters` command.

use std::time::Duration;

use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

use crate::{ConfirmedPublisher, PublishError, Topology};

/// Header a dead-lettered message carries with the reason it was set aside
/// (besides the broker's own `x-death` when the broker dead-lettered it).
pub const DEAD_LETTER_REASON_HEADER: &str = "x-flashsale-dead-letter-reason";
/// Header a dead-lettered message carries with the queue it came from.
pub const DEAD_LETTER_QUEUE_HEADER: &str = "x-flashsale-dead-letter-queue";

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
