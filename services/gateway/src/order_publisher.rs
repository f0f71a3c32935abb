//! Publishes `OrderPlaced` to the orders quorum queue and waits for the broker's
//! confirm (ARCHITECTURE.md, step 3). One confirm-mode channel is shared by all
//! purchases, so their confirms pipeline; when the connection breaks the next
//! purchase reconnects (and the one that saw it fail answers UNAVAILABLE).

use std::time::Duration;

use flashsale_messaging::lapin::types::FieldTable;
use flashsale_messaging::{ConfirmedPublisher, PublishError, Topology};
use flashsale_proto::inventory::v1::OrderPlaced;
use prost::Message;
use tokio::sync::Mutex;
use tracing::Instrument;

/// Why an `OrderPlaced` may not be in the queue.
#[derive(Debug, thiserror::Error)]
pub enum PublishFailure {
    /// Certainly not queued: no connection, or the broker refused or returned it.
    #[error("not published: {0}")]
    NotSent(PublishError),
    /// Sent, but no confirm came back: it may or may not be queued.
    #[error("publish outcome unknown: {0}")]
    Unknown(PublishError),
}

pub struct OrderPublisher {
    amqp_addr: String,
    topology: Topology,
    timeout: Duration,
    current: Mutex<Option<(flashsale_messaging::lapin::Connection, ConfirmedPublisher)>>,
}

impl OrderPublisher {
    pub fn new(amqp_addr: String, topology: Topology, timeout: Duration) -> Self {
        Self { amqp_addr, topology, timeout, current: Mutex::new(None) }
    }

    /// Connects and declares the topology now (startup), so a broken broker
    /// address is reported before the first buyer arrives.
    pub async fn warm_up(&self) -> Result<(), PublishError> {
        self.publisher().await.map(|_| ())
    }

    async fn publisher(&self) -> Result<ConfirmedPublisher, PublishError> {
        let mut current = self.current.lock().await;
        if let Some((_, publisher)) = current.as_ref().filter(|(_, p)| p.is_usable()) {
            return Ok(publisher.clone());
        }
        // Bounded like the publish itself: a broker that accepts TCP but never
        // answers must not hold buyers (and this lock) for ever.
        let connect = async {
            let connection = flashsale_messaging::connect(&self.amqp_addr, "gateway-order-publisher").await?;
            let publisher = ConfirmedPublisher::new(&connection, self.timeout).await?;
            self.topology.declare(publisher.channel()).await?;
            Ok::<_, PublishError>((connection, publisher))
        };
        let (connection, publisher) =
            tokio::time::timeout(self.timeout, connect).await.map_err(|_| PublishError::Timeout(self.timeout))??;
        *current = Some((connection, publisher.clone()));
        Ok(publisher)
    }

    /// Publishes and waits for the confirm. On failure, says whether the broker
    /// certainly does not have the message ([`PublishFailure::NotSent`]) or might
    /// ([`PublishFailure::Unknown`]: sent, but no answer).
    pub async fn publish(&self, order: &OrderPlaced) -> Result<(), PublishFailure> {
        let publisher = self.publisher().await.map_err(PublishFailure::NotSent)?;
        let payload = order.encode_to_vec();
        let started = std::time::Instant::now();
        // The message carries this span's context; inventory's consume span is its child.
        let span = flashsale_telemetry::info_span!(
            "order.publish",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.destination.name = %self.topology.orders_queue,
            order.id = %order.order_id,
        );
        let mut headers = FieldTable::default();
        flashsale_telemetry::inject(&span, &mut flashsale_messaging::HeaderInjector(&mut headers));
        let result = publisher.publish("", &self.topology.orders_queue, &payload, headers).instrument(span).await;
        let outcome = match &result {
            Ok(()) => "confirmed",
            Err(PublishError::Nacked | PublishError::Unroutable) => "refused",
            Err(_) => "unknown",
        };
        // Publish plus broker confirm, the one wait on a winner's path after Redis.
        metrics::histogram!("flashsale_publish_seconds", "result" => outcome).record(started.elapsed().as_secs_f64());
        if result.is_err() {
            // Start over on a fresh channel next time; a half-broken one may never confirm.
            self.current.lock().await.take();
        }
        result.map_err(|error| match error {
            // The broker answered: it did not take the message.
            PublishError::Nacked | PublishError::Unroutable => PublishFailure::NotSent(error),
            PublishError::Timeout(_) | PublishError::Broker(_) | PublishError::NotConfirmed => {
                PublishFailure::Unknown(error)
            }
        })
    }

    pub async fn close(&self) {
        if let Some((connection, _)) = self.current.lock().await.take() {
            let _ = connection.close(200, "shutdown".into()).await;
        }
    }
}
