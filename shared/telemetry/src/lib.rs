//! Telemetry shared by the services.
//!
//! - Logs: one JSON object per event on stdout, filtered by `RUST_LOG` (default
//!   `info`), carrying `trace_id` and `span_id` when the event happens inside a
//!   traced span.
//! - Traces: `tracing` spans exported through OpenTelemetry, over OTLP/gRPC, when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!   The standard variables apply: `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`
//!   (default `parentbased_always_on`), `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER=none`.
//!   Without an endpoint no OpenTelemetry layer is installed: spans cost what
//!   logging costs and nothing more.
//! - Propagation: W3C trace context. [`inject`], [`set_parent_context`],
//!   [`traceparent`] carry it over any header map (gRPC metadata, AMQP headers,
//!   a database column).
//!
//! By concern: `logs.rs` (the JSON log layer), `sampling.rs` (which requests get
//! spans, decided at the edge), `propagation.rs` (trace context in and out);
//! installing the subscriber is here.

mod logs;
mod propagation;
mod sampling;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use self::logs::{json_logs, traced_targets};
pub use self::propagation::{inject, traceparent};
pub use self::sampling::{
    in_sampled_trace_or_untraced, incoming_span, sample_incoming, set_parent_context, unrecorded_span,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether an OpenTelemetry layer is installed. When not, propagation helpers
/// return at once: no header parsing, no context work per message.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported at all (an endpoint or a test exporter is set).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keeps telemetry alive; dropping it flushes the spans still buffered.
#[must_use = "dropping the guard stops telemetry"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported (an OTLP endpoint or a test exporter is set).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now (tests read the exporter afterwards).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            // The subscriber may be gone already: stderr is all that is left.
            eprintln!("telemetry: shutting the span exporter down failed: {e}");
        }
    }
}

/// Installs the global subscriber. Call once, first thing in `main`, inside the
/// tokio runtime (the OTLP exporter's channel lives on it).
/// Fails when a subscriber is already installed, `RUST_LOG` does not parse, or
/// the OTLP exporter cannot be built from the `OTEL_*` variables.
pub fn init(service_name: &'static str) -> Result<TelemetryGuard, BoxError> {
    let provider = if otlp_configured() {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                // The edge has sampled already (see `sample_incoming`).
                .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
                    opentelemetry_sdk::trace::Sampler::AlwaysOn,
                )))
                .with_resource(resource(service_name))
                .build(),
        )
    } else {
        None
    };
    install(service_name, provider)
}

/// For tests: every span of every service in this process goes to `exporter`,
/// synchronously and unsampled-out, whatever the `OTEL_*` variables say.
#[cfg(feature = "testing")]
pub fn init_for_tests(
    service_name: &'static str,
    exporter: opentelemetry_sdk::trace::InMemorySpanExporter,
) -> Result<TelemetryGuard, BoxError> {
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_resource(resource(service_name))
        .build();
    install(service_name, Some(provider))
}

fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// `service.name` is ours unless `OTEL_SERVICE_NAME` says otherwise; the rest
/// comes from `OTEL_RESOURCE_ATTRIBUTES`.
fn resource(service_name: &'static str) -> opentelemetry_sdk::Resource {
    let builder = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name(format!("flashsale-{service_name}")).build()
    }
}

fn install(service_name: &'static str, provider: Option<SdkTracerProvider>) -> Result<TelemetryGuard, BoxError> {
    if provider.is_some() {
        // Without it the global propagator is a no-op and no context crosses a hop.
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }
    let log_filter = EnvFilter::try_from_default_env().or_else(|e| match std::env::var_os("RUST_LOG") {
        // Unset: a sensible default. Set but malformed: tell the operator.
        None => Ok(EnvFilter::new("info")),
        Some(_) => Err(e),
    })?;
    let logs = json_logs(std::io::stdout).with_filter(log_filter);
    let traces = provider.as_ref().map(|provider| {
        // Every span pays for this layer whether or not its trace is sampled, so
        // it does as little as it can: no source location, thread or target
        // attributes (allocated per span), no idle-time tracking, and no
        // OpenTelemetry context swap on every poll of an instrumented future
        // (propagation reads the context from the span itself).
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(traced_targets())
    });
    tracing_subscriber::registry().with(logs).with(traces).try_init()?;
    EXPORTING.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
    tracing::info!(service.name = service_name, traces.exported = provider.is_some(), "telemetry initialised");
    Ok(TelemetryGuard { provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer, for reading log lines back.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn log_lines_inside_a_traced_span_carry_its_trace_and_span_ids() -> Result<(), BoxError> {
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::registry()
            .with(json_logs(buffer.clone()))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")).with_filter(traced_targets()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let span = tracing::info_span!("work", order.id = "o-1");
            span.in_scope(|| tracing::info!(answer = 42, "inside"));
        });
        provider.force_flush()?;
        let spans = exporter.get_finished_spans()?;
        let [span] = spans.as_slice() else { return Err(format!("expected one span, got {}", spans.len()).into()) };

        let text = String::from_utf8(buffer.0.lock().map_err(|_| "poisoned")?.clone())?;
        let lines: Vec<serde_json::Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
        let [outside, inside] = lines.as_slice() else { return Err(format!("expected two lines: {text}").into()) };
        assert_eq!(outside["message"], "outside any span");
        assert!(outside.get("trace_id").is_none(), "{outside}");
        assert_eq!(inside["message"], "inside");
        assert_eq!(inside["answer"], 42);
        assert_eq!(inside["level"], "INFO");
        assert_eq!(inside["span"]["name"], "work");
        assert_eq!(inside["trace_id"], span.span_context.trace_id().to_string());
        assert_eq!(inside["span_id"], span.span_context.span_id().to_string());
        Ok(())
    }
}
