//! Consumers that reconnect on faults, and trace context in AMQP headers.

use std::future::Future;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};

use tokio_util::sync::CancellationToken;

/// Why a consumer stopped short of a shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker cancelled the consumer (queue deleted, node failover): a fault.
    #[error("the consumer stream ended")]
    StreamEnded,
    /// The connection closed or failed while the session was consuming.
    #[error("the connection to the broker was lost")]
    ConnectionLost,
}

/// The pause between attempts of every reconnect and retry loop of the suite:
/// 100 ms, doubling after each failure to at most 5 s, back to 100 ms after a
/// success.
#[derive(Debug, Clone, Copy)]
pub struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        Self(Self::FIRST)
    }

    /// How long to wait before the next attempt.
    pub fn delay(&self) -> Duration {
        self.0
    }

    /// After a failed attempt: the next wait is twice as long (at most 5 s).
    pub fn grow(&mut self) {
        self.0 = (self.0 * 2).min(Self::MAX);
    }

    /// After a success: start again from 100 ms.
    pub fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// A gauge that reads 1 while a consumer holds its subscription and 0 from the
/// moment it loses it: mark it once subscribed and keep the value for the
/// session, so every exit path of the session (error, ended stream, shutdown)
/// drops it.
pub struct SubscribedGauge(&'static str);

impl SubscribedGauge {
    pub fn mark(name: &'static str) -> Self {
        metrics::gauge!(name).set(1.0);
        Self(name)
    }
}

impl Drop for SubscribedGauge {
    fn drop(&mut self) {
        metrics::gauge!(self.0).set(0.0);
    }
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
    let mut backoff = Backoff::new();
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
                tracing::warn!(task, error, retry_in_ms = backoff.delay().as_millis() as u64, "stopped; reconnecting")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.delay()) => {}
            () = shutdown.cancelled() => return,
        }
        backoff.grow();
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
