//! Publishes the outbox to the order-events exchange, at least once: a batch is
//! deleted from the outbox only in the transaction that saw every one of its
//! messages confirmed by RabbitMQ. Consumers are idempotent per order id.

use std::sync::Arc;
use std::time::Duration;

use diesel_async::AsyncConnection;
use flashsale_db::PgPool;
use flashsale_messaging::lapin::types::{AMQPValue, FieldTable};
use flashsale_messaging::{ConfirmedPublisher, Topology};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::outbox;
use crate::error::InventoryError;

const BATCH: i64 = 500;

pub struct OutboxRelay {
    pub pool: PgPool,
    pub amqp_addr: String,
    pub topology: Topology,
    /// Poked whenever a transaction wrote an event, so events go out at once
    /// instead of at the next poll.
    pub ready: Arc<Notify>,
}

impl OutboxRelay {
    /// Relays until `shutdown`, reconnecting after faults.
    pub async fn run(self, shutdown: CancellationToken) {
        flashsale_messaging::supervise("inventory outbox relay", &shutdown, || self.relay(&shutdown)).await;
    }

    async fn relay(&self, shutdown: &CancellationToken) -> Result<(), InventoryError> {
        let unavailable = |e: flashsale_messaging::lapin::Error| InventoryError::Unavailable(Box::new(e));
        let connection =
            flashsale_messaging::connect(&self.amqp_addr, "inventory-outbox-relay").await.map_err(unavailable)?;
        let publisher = flashsale_messaging::bounded(async {
            let publisher = ConfirmedPublisher::new(&connection, Duration::from_secs(5)).await?;
            self.topology.declare(publisher.channel()).await?;
            Ok(publisher)
        })
        .await
        .map_err(unavailable)?;
        loop {
            let published = self.publish_batch(&publisher).await?;
            if published as i64 == BATCH {
                continue;
            }
            tokio::select! {
                () = self.ready.notified() => {}
                // A safety net for events written by another replica or before a restart.
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = shutdown.cancelled() => {
                    // One last pass so events written during the drain go out.
                    let _ = self.publish_batch(&publisher).await;
                    let _ = connection.close(200, "shutdown".into()).await;
                    return Ok(());
                }
            }
        }
    }

    /// Publishes and deletes one batch; returns its size.
    pub async fn publish_batch(&self, publisher: &ConfirmedPublisher) -> Result<usize, InventoryError> {
        let mut conn = self.pool.get().await?;
        let exchange = self.topology.events_exchange.as_str();
        conn.transaction::<_, InventoryError, _>(async |conn| {
            let rows = outbox::claim(conn, BATCH).await?;
            if rows.is_empty() {
                return Ok(0);
            }
            // Issued in outbox order on one channel, confirmed as a pipeline.
            let publishes = rows.iter().map(|row| {
                // The event continues the trace of the change that wrote it.
                let mut headers = FieldTable::default();
                if let Some(traceparent) = &row.traceparent {
                    headers.insert("traceparent".into(), AMQPValue::LongString(traceparent.as_str().into()));
                }
                publisher.publish(exchange, &row.routing_key, &row.payload, headers)
            });
            for result in futures::future::join_all(publishes).await {
                result.map_err(|e| InventoryError::Unavailable(Box::new(e)))?;
            }
            // Fault tests: the events are confirmed by the broker, still in the outbox.
            flashsale_server::crash_point("outbox-before-delete");
            let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
            outbox::delete(conn, &ids).await?;
            Ok(rows.len())
        })
        .await
    }
}
