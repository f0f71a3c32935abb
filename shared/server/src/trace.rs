//! gRPC tracing middleware: a server span per sampled call (child of the
//! caller's `traceparent`), a client span per outgoing call made inside a
//! sampled trace (its `traceparent` injected into the metadata).
//!
//! Ours rather than `tonic-tracing-opentelemetry`'s layers because those build
//! a span for every call before sampling can refuse it, which at 1% sampling
//! cost a fifth of the gateway's admission rate; here the decision comes first
//! (`flashsale_telemetry::sample_incoming`) and an unsampled call gets no span.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{HeaderMap, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;

/// Reads trace context from HTTP/2 headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes trace context into HTTP/2 headers (gRPC metadata).
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// `(service, method)` of a gRPC path `/pkg.Service/Method`.
fn service_method(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    path.split_once('/').unwrap_or((path, ""))
}

/// The gRPC status of a response whose headers carry it (errors are sent
/// trailers-only); `0` (OK) otherwise, its status being in the trailers.
fn status_of<B>(response: &Response<B>) -> i64 {
    response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn record_status(span: &tracing::Span, code: i64, server: bool) {
    span.record("rpc.grpc.status_code", code);
    // OpenTelemetry's rule: a server errs on codes that are its fault, a client on any.
    let error = if server { matches!(code, 2 | 4 | 12 | 13 | 14 | 15) } else { code != 0 };
    span.record("otel.status_code", if error { "ERROR" } else { "OK" });
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Server side: one span per sampled call; health checks and reflection never.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcServerTraceLayer;

impl<S> Layer<S> for GrpcServerTraceLayer {
    type Service = GrpcServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerTrace { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcServerTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for GrpcServerTrace<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<Result<Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
            return Either::Left(self.inner.call(request));
        }
        let Some(parent) = flashsale_telemetry::sample_incoming(&HeaderExtractor(request.headers())) else {
            return Either::Left(self.inner.call(request));
        };
        let (service, method) = service_method(path);
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
        );
        flashsale_telemetry::set_parent_context(&span, parent);
        let call = span.in_scope(|| self.inner.call(request));
        Either::Right(Box::pin(
            async move {
                let result = call.await;
                let code = result.as_ref().map_or(2, status_of);
                record_status(&tracing::Span::current(), code, true);
                result
            }
            .instrument(span),
        ))
    }
}

/// HTTP side (REST): one span per sampled `/v1/` request, named after its
/// route (`POST /v1/purchases`), child of an incoming `traceparent`. Apply with
/// `Router::route_layer` so the matched route is known.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpServerTraceLayer;

impl<S> Layer<S> for HttpServerTraceLayer {
    type Service = HttpServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpServerTrace { inner }
    }
}

#[derive(Debug, Clone)]
pub struct HttpServerTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for HttpServerTrace<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<Result<Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !request.uri().path().starts_with("/v1/") {
            return Either::Left(self.inner.call(request));
        }
        let Some(parent) = flashsale_telemetry::sample_incoming(&HeaderExtractor(request.headers())) else {
            return Either::Left(self.inner.call(request));
        };
        let route = request.extensions().get::<axum::extract::MatchedPath>().map_or("", |m| m.as_str());
        let span = tracing::info_span!(
            "http.server",
            otel.name = %format_args!("{} {route}", request.method()),
            otel.kind = "server",
            http.request.method = %request.method(),
            http.route = route,
            http.response.status_code = Empty,
            otel.status_code = Empty,
        );
        flashsale_telemetry::set_parent_context(&span, parent);
        let call = span.in_scope(|| self.inner.call(request));
        Either::Right(Box::pin(
            async move {
                let result = call.await;
                let span = tracing::Span::current();
                if let Ok(response) = &result {
                    let status = response.status().as_u16();
                    span.record("http.response.status_code", status);
                    span.record("otel.status_code", if status >= 500 { "ERROR" } else { "OK" });
                }
                result
            }
            .instrument(span),
        ))
    }
}

/// Client side: inside a sampled trace, a client span per call and its
/// `traceparent` in the metadata; outside one, nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcClientTraceLayer;

impl<S> Layer<S> for GrpcClientTraceLayer {
    type Service = GrpcClientTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcClientTrace { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcClientTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for GrpcClientTrace<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<Result<Response<RB>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if !flashsale_telemetry::exporting() {
            return Either::Left(self.inner.call(request));
        }
        if tracing::Span::current().is_none() {
            // Not sampled here: say so, so the callee does not sample it afresh.
            flashsale_telemetry::inject(&tracing::Span::none(), &mut HeaderInjector(request.headers_mut()));
            return Either::Left(self.inner.call(request));
        }
        let path = request.uri().path().to_owned();
        let (service, method) = service_method(&path);
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
        );
        flashsale_telemetry::inject(&span, &mut HeaderInjector(request.headers_mut()));
        let call = span.in_scope(|| self.inner.call(request));
        Either::Right(Box::pin(
            async move {
                let result = call.await;
                let code = result.as_ref().map_or(14, status_of);
                record_status(&tracing::Span::current(), code, false);
                result
            }
            .instrument(span),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths_split_into_service_and_method() {
        assert_eq!(
            service_method("/flashsale.gateway.v1.FlashSaleGateway/Purchase"),
            ("flashsale.gateway.v1.FlashSaleGateway", "Purchase")
        );
        assert_eq!(service_method("/odd"), ("odd", ""));
    }

    #[test]
    fn the_status_comes_from_the_headers_of_a_trailers_only_response() -> Result<(), http::Error> {
        let error = Response::builder().header("grpc-status", "14").body(())?;
        assert_eq!(status_of(&error), 14);
        assert_eq!(status_of(&Response::new(())), 0);
        Ok(())
    }
}
