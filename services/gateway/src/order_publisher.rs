//! Publishes `OrderPlaced` to the orders quorum queue and waits for the broker's
//! confirm (services/DESIGN.md, "The purchase path", step 3). One confirm-mode channel is
//! shared by all purchases, so their confirms pipeline.
//!
//! Reconnecting is one background task's job ([`OrderPublisher::run_reconnector`]):
//! while the broker is unreachable, purchases fail at once with
//! [`PublishError::Disconnected`] (certainly not sent, so their reservations are
//! given back) instead of queueing behind a reconnect that holds a lock for the
//! connect timeout, each holding a reservation meanwhile. A publish that fails
//! drops only the channel it used, so a purchase that saw an old channel fail
//! cannot throw away the fresh one another purchase is already using.
//!
//! A publish whose confirm never came ([`PublishFailure::Unknown`]) is kept
//! here and sent again until the broker confirms it
//! ([`OrderPublisher::publish_until_confirmed`]). The reservation in Redis lets
//! the reconciler publish it too, but Redis may restart before the reconciler
//! gets to it (it keeps no data across a restart), and then this copy is the
//! only one left. Inventory records one order per id, so a second copy is harmless.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flashsale_messaging::lapin::Connection;
use flashsale_messaging::lapin::types::FieldTable;
use flashsale_messaging::{ConfirmedPublisher, PublishError, Topology};
use flashsale_proto::inventory::v1::OrderPlaced;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
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

/// A connection and its confirm-mode channel, numbered so a failure drops only
/// the one that failed.
#[derive(Clone)]
struct Live {
    connection: Arc<Connection>,
    publisher: ConfirmedPublisher,
    generation: u64,
}

pub struct OrderPublisher {
    amqp_addr: String,
    topology: Topology,
    timeout: Duration,
    current: Mutex<Option<Live>>,
    /// Wakes the reconnector when a purchase finds no usable channel.
    wanted: Notify,
    generations: AtomicU64,
    /// Orders whose publish went unanswered, by id, until a confirm comes.
    unconfirmed: Mutex<HashMap<String, OrderPlaced>>,
    /// Wakes the republisher when an order joins `unconfirmed`.
    unconfirmed_added: Notify,
}

/// At most this many unconfirmed orders are kept in memory (a few hundred bytes
/// each); past it, the reservation in Redis and the reconciler are their only copy.
const MAX_UNCONFIRMED: usize = 100_000;

impl OrderPublisher {
    pub fn new(amqp_addr: String, topology: Topology, timeout: Duration) -> Self {
        Self {
            amqp_addr,
            topology,
            timeout,
            current: Mutex::new(None),
            wanted: Notify::new(),
            generations: AtomicU64::new(0),
            unconfirmed: Mutex::new(HashMap::new()),
            unconfirmed_added: Notify::new(),
        }
    }

    /// Connects and declares the topology now (startup), so a broken broker
    /// address is reported before the first buyer arrives.
    pub async fn warm_up(&self) -> Result<(), PublishError> {
        let live = self.connect().await?;
        *self.current.lock() = Some(live);
        metrics::gauge!("flashsale_broker_up").set(1.0);
        Ok(())
    }

    /// Keeps a usable channel while the gateway runs: reconnects (with back-off,
    /// 100 ms doubling to 5 s) whenever there is none, until `shutdown`.
    pub async fn run_reconnector(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = flashsale_messaging::Backoff::new();
        loop {
            let usable = self.current.lock().as_ref().is_some_and(|live| live.publisher.is_usable());
            if usable {
                // A purchase wakes us when it finds the channel broken; the tick
                // notices a broken one nobody has tried since.
                tokio::select! {
                    () = self.wanted.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => return,
                }
                continue;
            }
            // No usable channel: purchases now hear UNAVAILABLE at once.
            metrics::gauge!("flashsale_broker_up").set(0.0);
            match self.connect().await {
                Ok(live) => {
                    tracing::info!("connected to the broker for publishing");
                    *self.current.lock() = Some(live);
                    metrics::gauge!("flashsale_broker_up").set(1.0);
                    backoff.reset();
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.delay().as_millis() as u64, "cannot reach the broker; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.delay()) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff.grow();
                }
            }
        }
    }

    /// Bounded like the publish itself: a broker that accepts TCP but never
    /// answers must not hold the reconnector for ever.
    async fn connect(&self) -> Result<Live, PublishError> {
        let connect = async {
            let connection = flashsale_messaging::connect(&self.amqp_addr, "gateway-order-publisher").await?;
            let publisher = ConfirmedPublisher::new(&connection, self.timeout).await?;
            self.topology.declare(publisher.channel()).await?;
            Ok::<_, PublishError>((connection, publisher))
        };
        let (connection, publisher) =
            tokio::time::timeout(self.timeout, connect).await.map_err(|_| PublishError::Timeout(self.timeout))??;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Live { connection: Arc::new(connection), publisher, generation })
    }

    /// The usable channel, or `Disconnected` at once (and the reconnector woken).
    fn live(&self) -> Result<Live, PublishError> {
        let live = self.current.lock().clone().filter(|live| live.publisher.is_usable());
        live.ok_or_else(|| {
            self.wanted.notify_one();
            PublishError::Disconnected
        })
    }

    /// Drops the channel of `generation` if it is still the current one.
    fn discard(&self, generation: u64) {
        let mut current = self.current.lock();
        if current.as_ref().is_some_and(|live| live.generation == generation) {
            *current = None;
        }
        drop(current);
        self.wanted.notify_one();
    }

    /// Publishes and waits for the confirm. On failure, says whether the broker
    /// certainly does not have the message ([`PublishFailure::NotSent`]) or might
    /// ([`PublishFailure::Unknown`]: sent, but no answer).
    pub async fn publish(&self, order: &OrderPlaced) -> Result<(), PublishFailure> {
        let live = self.live().map_err(PublishFailure::NotSent)?;
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
        let result = live.publisher.publish("", &self.topology.orders_queue, &payload, headers).instrument(span).await;
        let outcome = match &result {
            Ok(()) => "confirmed",
            Err(PublishError::Nacked | PublishError::Unroutable | PublishError::Disconnected) => "refused",
            Err(_) => "unknown",
        };
        // Publish plus broker confirm, the one wait on a winner's path after Redis.
        metrics::histogram!("flashsale_publish_seconds", "result" => outcome).record(started.elapsed().as_secs_f64());
        if result.is_err() {
            // Start over on a fresh channel; a half-broken one may never confirm.
            self.discard(live.generation);
        }
        result.map_err(|error| match error {
            // The broker answered: it did not take the message.
            PublishError::Nacked | PublishError::Unroutable | PublishError::Disconnected => {
                PublishFailure::NotSent(error)
            }
            PublishError::Timeout(_) | PublishError::Broker(_) | PublishError::NotConfirmed => {
                PublishFailure::Unknown(error)
            }
        })
    }

    /// Keeps `order` (whose publish went unanswered) and publishes it again until
    /// the broker confirms it. False when the in-memory set is full.
    pub fn publish_until_confirmed(&self, order: OrderPlaced) -> bool {
        let mut unconfirmed = self.unconfirmed.lock();
        if unconfirmed.len() >= MAX_UNCONFIRMED && !unconfirmed.contains_key(&order.order_id) {
            return false;
        }
        unconfirmed.insert(order.order_id.clone(), order);
        metrics::gauge!("flashsale_unconfirmed_orders").set(unconfirmed.len() as f64);
        drop(unconfirmed);
        self.unconfirmed_added.notify_one();
        true
    }

    /// Publishes the orders kept by [`OrderPublisher::publish_until_confirmed`]
    /// until each is confirmed, backing off (100 ms doubling to 5 s) while the
    /// broker fails, until `shutdown`; then makes one last attempt.
    pub async fn run_republisher(self: Arc<Self>, shutdown: CancellationToken) {
        metrics::gauge!("flashsale_unconfirmed_orders").set(0.0);
        let mut backoff = flashsale_messaging::Backoff::new();
        loop {
            let confirmed_all = self.republish_once().await;
            if shutdown.is_cancelled() {
                return;
            }
            if confirmed_all {
                backoff.reset();
                tokio::select! {
                    () = self.unconfirmed_added.notified() => {}
                    () = shutdown.cancelled() => {}
                }
            } else {
                tokio::select! {
                    () = tokio::time::sleep(backoff.delay()) => {}
                    () = shutdown.cancelled() => {}
                }
                backoff.grow();
            }
        }
    }

    /// One pass over the unconfirmed orders, stopping at the first failure:
    /// whether every one was confirmed.
    async fn republish_once(&self) -> bool {
        let orders: Vec<OrderPlaced> = self.unconfirmed.lock().values().cloned().collect();
        for order in orders {
            let span = flashsale_telemetry::unrecorded_span("unconfirmed-order republish");
            if let Err(e) = self.publish(&order).instrument(span).await {
                tracing::debug!(error = %e, order.id = %order.order_id, "republishing an unconfirmed order failed");
                return false;
            }
            let mut unconfirmed = self.unconfirmed.lock();
            unconfirmed.remove(&order.order_id);
            metrics::gauge!("flashsale_unconfirmed_orders").set(unconfirmed.len() as f64);
            drop(unconfirmed);
            tracing::info!(order.id = %order.order_id, "an order whose publish went unanswered is confirmed now");
        }
        true
    }

    pub async fn close(&self) {
        let left = self.unconfirmed.lock().len();
        if left > 0 {
            tracing::warn!(
                orders = left,
                "unconfirmed orders left to the reconciler (their reservations are in Redis)"
            );
        }
        let live = self.current.lock().take();
        if let Some(live) = live {
            let _ = live.connection.close(200, "shutdown".into()).await;
        }
    }
}
