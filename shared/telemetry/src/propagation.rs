//! W3C trace context into and out of carriers (gRPC metadata, AMQP headers,
//! a database column).

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::exporting;

/// Writes `span`'s trace context (W3C `traceparent`, `tracestate`) into `carrier`.
/// When `span` is no span (its request was not sampled), writes a fresh
/// `traceparent` marked not sampled instead, so that the next hop does not
/// sample the same request again as if it started there. Writes nothing when
/// not exporting.
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

/// `span`'s W3C `traceparent` as [`inject`] writes it (marked not sampled when
/// `span` is no span), to keep where headers cannot go (a database row that
/// becomes a message later). `None` when not exporting.
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
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;

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
