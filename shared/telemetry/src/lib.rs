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
//! - Propagation: W3C trace context. [`inject`], [`set_parent`], [`traceparent`]
//!   carry it over any header map (gRPC metadata, AMQP headers, a database column).

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether an OpenTelemetry layer is installed. When not, propagation helpers
/// return at once: no header parsing, no context work per message.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported at all (an endpoint or a test exporter is set).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The edge's sampling rule, read once from `OTEL_TRACES_SAMPLER`/`_ARG`.
///
/// Sampling happens here, where a request or message enters, not in the SDK:
/// `tracing-opentelemetry` builds every span (attributes, ids, registry slot)
/// before the SDK's sampler can say no, so at 1% the 99% would still pay for
/// every span. Requests not sampled here get no spans at all; the SDK then runs
/// `parentbased_always_on` for what is left.
#[derive(Debug, Clone, Copy)]
struct EdgeSampler {
    /// Probability that a new trace is recorded.
    ratio: f64,
    /// Follow the caller's sampled flag when it sent a `traceparent`.
    parent_based: bool,
}

static SAMPLER: std::sync::OnceLock<EdgeSampler> = std::sync::OnceLock::new();

impl EdgeSampler {
    fn from_env() -> Self {
        let name = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_else(|_| "parentbased_always_on".into());
        let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().and_then(|v| v.trim().parse::<f64>().ok());
        let (ratio, parent_based) = match name.trim() {
            "always_on" => (1.0, false),
            "always_off" => (0.0, false),
            "traceidratio" => (arg.unwrap_or(1.0), false),
            "parentbased_always_off" => (0.0, true),
            "parentbased_traceidratio" => (arg.unwrap_or(1.0), true),
            // parentbased_always_on, and anything this SDK does not know.
            _ => (1.0, true),
        };
        Self { ratio: ratio.clamp(0.0, 1.0), parent_based }
    }

    fn sample_new_trace(&self) -> bool {
        self.ratio >= 1.0 || (self.ratio > 0.0 && rand::random::<f64>() < self.ratio)
    }

    /// The trace-id ratio rule of OpenTelemetry's `TraceIdRatioBased`: every hop
    /// decides the same for one trace id.
    fn sample_trace_id(&self, trace_id: opentelemetry::trace::TraceId) -> bool {
        let bytes = trace_id.to_bytes();
        let mut low = [0u8; 8];
        low.copy_from_slice(&bytes[8..16]);
        let bound = (self.ratio * (1u64 << 63) as f64) as u64;
        (u64::from_be_bytes(low) >> 1) < bound
    }
}

/// Decides whether a request or message arriving with `carrier` is traced.
/// `Some(parent)` (the caller's context, or an empty one for a new trace):
/// create its span and [`set_parent_context`] it. `None`: create no span.
/// Always `None` when not exporting.
pub fn sample_incoming(carrier: &dyn Extractor) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::TraceContextExt;
    if !exporting() {
        return None;
    }
    let sampler = SAMPLER.get_or_init(EdgeSampler::from_env);
    let parent = if carrier.get("traceparent").is_some() {
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(carrier))
    } else {
        opentelemetry::Context::new()
    };
    let remote = parent.span().span_context().clone();
    let traced = if !remote.is_valid() {
        sampler.sample_new_trace()
    } else if sampler.parent_based {
        remote.is_sampled()
    } else {
        sampler.sample_trace_id(remote.trace_id())
    };
    traced.then_some(parent)
}

/// Whether a span created now belongs anywhere: always when not exporting (it
/// serves the logs), otherwise only inside a sampled request's span.
pub fn in_sampled_trace_or_untraced() -> bool {
    !exporting() || !tracing::Span::current().is_none()
}

/// `tracing::info_span!`, but no span at all inside a request that was not
/// sampled (see [`sample_incoming`]).
#[macro_export]
macro_rules! info_span {
    ($($arguments:tt)*) => {
        if $crate::in_sampled_trace_or_untraced() {
            ::tracing::info_span!($($arguments)*)
        } else {
            ::tracing::Span::none()
        }
    };
}

/// The span of a request or message arriving with `carrier`: `make()`'s span,
/// child of the caller's context, when sampled; no span when not; and
/// `make()`'s span for the logs when nothing is exported.
pub fn incoming_span(carrier: &dyn Extractor, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if !exporting() {
        return make();
    }
    match sample_incoming(carrier) {
        Some(parent) => {
            let span = make();
            set_parent_context(&span, parent);
            span
        }
        None => tracing::Span::none(),
    }
}

/// Makes `parent` (from [`sample_incoming`]) the parent of the not yet entered `span`.
pub fn set_parent_context(span: &tracing::Span, parent: opentelemetry::Context) {
    if span.is_disabled() {
        return;
    }
    if let Err(e) = span.set_parent(parent) {
        tracing::debug!(error = ?e, "could not set a remote parent");
    }
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

/// What becomes a span: our own code at INFO and the gRPC middleware's spans
/// (emitted at TRACE under `otel::tracing`); libraries only when they warn.
fn traced_targets() -> Targets {
    Targets::new()
        .with_target("otel::tracing", Level::TRACE)
        .with_target("flashsale", Level::INFO)
        .with_default(Level::WARN)
}

fn json_logs<S, W>(writer: W) -> tracing_subscriber::layer::Layered<CatchDispatch, json_subscriber::JsonLayer<S, W>, S>
where
    S: tracing::Subscriber + for<'lookup> tracing_subscriber::registry::LookupSpan<'lookup>,
    W: for<'writer> tracing_subscriber::fmt::MakeWriter<'writer> + 'static,
{
    let mut layer = json_subscriber::JsonLayer::new(writer);
    layer
        .with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime)
        .with_level("level")
        .with_target("target")
        .with_flattened_event()
        .with_current_span("span");
    let dispatch = DispatchCell::default();
    let (for_trace, for_span) = (dispatch.clone(), dispatch.clone());
    layer.add_from_span("trace_id", move |span| for_trace.ids_of(&span.id()).map(|(trace, _)| trace));
    layer.add_from_span("span_id", move |span| for_span.ids_of(&span.id()).map(|(_, span)| span));
    layer.and_then(CatchDispatch(dispatch))
}

/// The subscriber the log layer belongs to, caught when it is registered.
///
/// Reading a span's OpenTelemetry ids takes the subscriber (`Dispatch`), and
/// while an event is being formatted `tracing::dispatcher::get_default` gives
/// none (it refuses re-entry). json-subscriber's own `with_opentelemetry_ids`
/// has it but nests camel-cased keys; we want flat `trace_id`/`span_id`.
#[derive(Clone, Default)]
struct DispatchCell(std::sync::Arc<std::sync::OnceLock<tracing::dispatcher::WeakDispatch>>);

impl DispatchCell {
    /// The OpenTelemetry trace and span ids of a live span, when it is traced.
    fn ids_of(&self, id: &tracing::span::Id) -> Option<(String, String)> {
        use opentelemetry::trace::TraceContextExt;
        let dispatch = self.0.get()?.upgrade()?;
        let context = tracing_opentelemetry::get_otel_context(id, &dispatch)?;
        let span = context.span();
        let ids = span.span_context();
        ids.is_valid().then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
    }
}

/// A layer that does nothing but fill its [`DispatchCell`] on registration.
struct CatchDispatch(DispatchCell);

impl<S: tracing::Subscriber> Layer<S> for CatchDispatch {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.0.0.set(subscriber.downgrade());
    }
}

/// A span for periodic background work (a poll every 200 ms would otherwise
/// start a trace each time): its trace is marked not sampled, so with the
/// default parent-based samplers neither it nor anything it calls, in this
/// service or another, is recorded. Logs inside it still carry `task`.
pub fn unrecorded_span(task: &'static str) -> tracing::Span {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    let span = tracing::info_span!("background", task);
    if exporting() && !span.is_disabled() {
        // Any valid ids will do: a trace that is not sampled is never exported.
        let unsampled = SpanContext::new(
            TraceId::from_bytes(*b"flashsale-backgr"),
            SpanId::from_bytes(*b"unsample"),
            TraceFlags::default(),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(unsampled));
    }
    span
}

/// Writes `span`'s trace context (W3C `traceparent`, `tracestate`) into `carrier`.
/// Writes nothing when the span is not traced.
/// When `span` is no span (its request was not sampled), writes a
/// `traceparent` marked not sampled, so that the next hop does not sample the
/// same request again as if it started there. Writes nothing when not exporting.
pub fn inject(span: &tracing::Span, carrier: &mut dyn Injector) {
    if !exporting() {
        return;
    }
    if span.is_disabled() {
        carrier.set("traceparent", unsampled_traceparent());
        return;
    }
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.inject_context(&context, carrier));
}

/// A fresh `traceparent` whose sampled flag is off.
fn unsampled_traceparent() -> String {
    let (trace, span): (u128, u64) = (rand::random(), rand::random());
    // All-zero ids are invalid; the chance is nil, but keep the value valid.
    format!("00-{:032x}-{:016x}-00", trace.max(1), span.max(1))
}

/// `span`'s W3C `traceparent`, to keep where headers cannot go (a database row
/// that becomes a message later). `None` when the span is not traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = TraceParent(None);
    inject(span, &mut carrier);
    carrier.0
}

/// A carrier holding just the `traceparent` header.
struct TraceParent(Option<String>);

impl Injector for TraceParent {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

impl Extractor for TraceParent {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0.as_deref()).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::propagation::TextMapPropagator;

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

    #[test]
    fn the_ratio_rule_on_trace_ids_matches_the_ratio() {
        let sampler = EdgeSampler { ratio: 0.25, parent_based: false };
        let sampled = (1..=10_000u128)
            .map(|n| n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
            .filter(|id| sampler.sample_trace_id(opentelemetry::trace::TraceId::from(*id)))
            .count();
        assert!((2_000..3_000).contains(&sampled), "{sampled} of 10,000 sampled at 0.25");
        let never = EdgeSampler { ratio: 0.0, parent_based: false };
        assert!(!never.sample_trace_id(opentelemetry::trace::TraceId::from(7u128)));
    }

    #[test]
    fn an_unsampled_traceparent_parses_as_valid_and_not_sampled() {
        use opentelemetry::trace::TraceContextExt;
        let carrier = TraceParent(Some(unsampled_traceparent()));
        let context = TraceContextPropagator::new().extract(&carrier);
        let remote = context.span().span_context().clone();
        assert!(remote.is_valid());
        assert!(!remote.is_sampled());
    }

    #[test]
    fn a_traceparent_round_trips_through_the_carrier() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let carrier = TraceParent(Some(value.into()));
        let context = TraceContextPropagator::new().extract(&carrier);
        let mut out = TraceParent(None);
        TraceContextPropagator::new().inject_context(&context, &mut out);
        assert_eq!(out.0.as_deref(), Some(value));
        assert_eq!(TraceParent(None).get("traceparent"), None);
    }
}
