//! Which requests and messages get spans: decided once, where they enter.

use opentelemetry::propagation::Extractor;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::exporting;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
