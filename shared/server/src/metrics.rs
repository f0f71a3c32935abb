//! Prometheus metrics: the process-wide recorder, the admin HTTP endpoint that
//! serves `/metrics`, and a tower layer that counts and times every gRPC call by
//! service, method and status code (the names and labels of go-grpc-prometheus,
//! which dashboards and alert rules for gRPC servers commonly expect).
//!
//! The `metrics` facade keeps one recorder per process. The services record
//! through the macros and never pass a registry around; tests that need one
//! service's counts alone run that service as its own process.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Latency buckets for every `*_seconds` histogram: 100 µs to 30 s.
const SECONDS_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static INSTALL: Mutex<()> = Mutex::new(());

/// The process's Prometheus recorder, installed on first use. Later calls (more
/// services in one test process) share it.
pub fn prometheus() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let _installing = INSTALL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}

/// The admin endpoint: a bound listener (port 0 works) and the recorder it renders.
pub struct MetricsEndpoint {
    listener: TcpListener,
    port: u16,
    handle: PrometheusHandle,
    collectors: Vec<Collector>,
}

/// Sets gauges from current state (pool sizes) just before a scrape renders.
type Collector = Box<dyn Fn() + Send + Sync>;

impl MetricsEndpoint {
    pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let handle = prometheus()?;
        let listener = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding metrics on {addr}: {e}"))?;
        let port = listener.local_addr()?.port();
        Ok(Self { listener, port, handle, collectors: Vec::new() })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `collect` before every scrape.
    pub fn collect(&mut self, collect: impl Fn() + Send + Sync + 'static) {
        self.collectors.push(Box::new(collect));
    }

    /// Serves `/metrics` in a task until `stop` is cancelled.
    pub fn spawn(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(serve_metrics(self.listener, self.handle, self.collectors, stop))
    }
}

/// Serves `GET /metrics` (Prometheus text format) on `listener` until `stop` is cancelled.
async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    collectors: Vec<Collector>,
    stop: CancellationToken,
) {
    let collectors = std::sync::Arc::new(collectors);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            let collectors = collectors.clone();
            async move {
                for collect in collectors.iter() {
                    collect();
                }
                // Upkeep drains histogram buffers; rendering alone would let them grow.
                handle.run_upkeep();
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

/// Counts and times each gRPC call: `grpc_server_handled_total{grpc_service,
/// grpc_method, grpc_code}` and `grpc_server_handling_seconds{grpc_service, grpc_method}`.
/// The code is read from the response headers (where tonic puts the status of
/// every failed unary call); a stream that fails after its first message is
/// counted with the code it started with, OK.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = split_path(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(response) => code_name(response.headers().get("grpc-status").and_then(|v| v.to_str().ok())),
                Err(_) => "UNKNOWN",
            };
            record(&service, &method, code, started.elapsed());
            response
        })
    }
}

fn record(service: &str, method: &str, code: &'static str, elapsed: Duration) {
    let labels = [("grpc_service", service.to_owned()), ("grpc_method", method.to_owned())];
    metrics::histogram!("grpc_server_handling_seconds", &labels).record(elapsed.as_secs_f64());
    metrics::counter!("grpc_server_handled_total", "grpc_service" => service.to_owned(),
        "grpc_method" => method.to_owned(), "grpc_code" => code)
    .increment(1);
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`); anything else is one bucket,
/// so a scanner cannot create unbounded label values.
fn split_path(path: &str) -> (String, String) {
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, method)) if service.len() <= 128 && method.len() <= 64 && !method.contains('/') => {
            (service.to_owned(), method.to_owned())
        }
        _ => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

fn code_name(status: Option<&str>) -> &'static str {
    match status.and_then(|s| s.parse::<i32>().ok()).map(tonic::Code::from_i32) {
        None | Some(tonic::Code::Ok) => "OK",
        Some(tonic::Code::Cancelled) => "CANCELLED",
        Some(tonic::Code::Unknown) => "UNKNOWN",
        Some(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Some(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Some(tonic::Code::NotFound) => "NOT_FOUND",
        Some(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Some(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Some(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Some(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Some(tonic::Code::Aborted) => "ABORTED",
        Some(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Some(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Some(tonic::Code::Internal) => "INTERNAL",
        Some(tonic::Code::Unavailable) => "UNAVAILABLE",
        Some(tonic::Code::DataLoss) => "DATA_LOSS",
        Some(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_bounded_labels() {
        assert_eq!(
            split_path("/flashsale.gateway.v1.FlashSaleGateway/Purchase"),
            ("flashsale.gateway.v1.FlashSaleGateway".into(), "Purchase".into())
        );
        assert_eq!(split_path("/not-grpc"), ("unknown".into(), "unknown".into()));
        assert_eq!(split_path(&format!("/a/{}", "m".repeat(100))), ("unknown".into(), "unknown".into()));
        assert_eq!(code_name(Some("9")), "FAILED_PRECONDITION");
        assert_eq!(code_name(None), "OK");
    }
}
