//! One JSON object per event on stdout, with the trace and span ids of the
//! span it happens in.

use tracing::Level;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;

/// What becomes a span: our own code at INFO and the gRPC middleware's spans
/// (emitted at TRACE under `otel::tracing`); libraries only when they warn.
pub(crate) fn traced_targets() -> Targets {
    Targets::new()
        .with_target("otel::tracing", Level::TRACE)
        .with_target("flashsale", Level::INFO)
        .with_default(Level::WARN)
}

pub(crate) fn json_logs<S, W>(
    writer: W,
) -> tracing_subscriber::layer::Layered<CatchDispatch, json_subscriber::JsonLayer<S, W>, S>
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
pub(crate) struct DispatchCell(std::sync::Arc<std::sync::OnceLock<tracing::dispatcher::WeakDispatch>>);

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
pub(crate) struct CatchDispatch(DispatchCell);

impl<S: tracing::Subscriber> Layer<S> for CatchDispatch {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.0.0.set(subscriber.downgrade());
    }
}
