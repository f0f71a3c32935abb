//! RabbitMQ plumbing shared by gateway and inventory (no business rules): the
//! topology both sides must agree on, connecting, and publishing that waits for
//! the broker's confirm. Payloads are proto messages encoded by the callers.
//!
//! By concern: `topology.rs` (names and declarations), `publisher.rs` (publishing
//! with confirms), `consume.rs` (supervised consumers, trace context in
//! headers), `dead_letters.rs` (setting messages aside, listing, replaying).

mod consume;
mod dead_letters;
mod publisher;
mod topology;

pub use lapin;
use lapin::{Connection, ConnectionProperties};

pub use self::consume::{Backoff, ConsumeError, HeaderExtractor, HeaderInjector, SubscribedGauge, supervise};
pub use self::dead_letters::{
    DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER, DeadLetter, dead_letter, export_dead_letter_counter,
    list_dead_letters, replay_dead_letters,
};
pub use self::publisher::{ConfirmedPublisher, PublishError};
pub use self::topology::{DELIVERY_LIMIT, ORDER_EVENT_ROUTING_PREFIX, Topology};

/// How long opening a connection (TCP and the AMQP handshake) may take.
/// lapin's connect has no deadline of its own, and one attempt was seen never
/// to return while a restarted node came up (the soak, seed 1581): without
/// this bound a consumer's reconnect loop would wait on it for ever.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens a connection, naming it after the service in the broker's UI; a
/// timeout after [`CONNECT_TIMEOUT`] is an I/O error like a refused connection.
pub async fn connect(addr: &str, service: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(service.into());
    tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(addr, properties))
        .await
        .map_err(|_| timed_out("connecting to the broker timed out"))?
}

/// How long one exchange with the broker (a session's declarations and
/// subscriptions, an ack) may take. lapin's calls have no deadline of their
/// own; a consumer session waiting on one for ever after the broker died
/// would never return to its supervisor and never reconnect.
pub const BROKER_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `call` for at most [`BROKER_CALL_TIMEOUT`]; running out of time is an
/// I/O error, like a dropped connection.
pub async fn bounded<T>(call: impl std::future::Future<Output = Result<T, lapin::Error>>) -> Result<T, lapin::Error> {
    tokio::time::timeout(BROKER_CALL_TIMEOUT, call).await.map_err(|_| timed_out("a broker call timed out"))?
}

/// Resolves once `connection` is no longer open (closed, errored, or being
/// torn down). Consumers race their delivery streams against it: the streams
/// should end when the connection does, and this makes sure they do not wait
/// beyond that. lapin exposes the state but no notification, hence the poll
/// (every 250 ms: cheap, and well inside any reconnect's back-off).
pub async fn connection_lost(connection: &Connection) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(250));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while connection.status().connected() {
        every.tick().await;
    }
}

fn timed_out(what: &'static str) -> lapin::Error {
    lapin::Error::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}
