//! Telemetry setup shared by the services: one JSON object per log event on
//! stdout, filtered by `RUST_LOG` (default `info`), with the service name on
//! every line. OpenTelemetry export plugs in here too (see the observability issue).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps telemetry alive; dropping it flushes what is buffered.
#[must_use = "dropping the guard stops telemetry"]
#[derive(Debug)]
pub struct TelemetryGuard {
    _private: (),
}

/// Installs the global subscriber. Call once, first thing in `main`.
/// Fails when a subscriber is already installed or `RUST_LOG` does not parse.
pub fn init(service_name: &'static str) -> Result<TelemetryGuard, Box<dyn std::error::Error + Send + Sync>> {
    let filter = EnvFilter::try_from_default_env().or_else(|e| match std::env::var_os("RUST_LOG") {
        // Unset: a sensible default. Set but malformed: tell the operator.
        None => Ok(EnvFilter::new("info")),
        Some(_) => Err(e),
    })?;
    let json = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .flatten_event(true)
        .with_target(true);
    tracing_subscriber::registry().with(filter).with(json).try_init()?;
    tracing::info!(service.name = service_name, "telemetry initialised");
    Ok(TelemetryGuard { _private: () })
}
