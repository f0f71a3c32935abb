//! The caller's deadline, answered as gRPC says: `DEADLINE_EXCEEDED`.
//!
//! tonic enforces `grpc-timeout` (and the server's own limit) in a layer
//! outside ours, and answers an expired call with `CANCELLED`, which tells a
//! client the call was cancelled by someone rather than that its deadline
//! passed, and which our metrics layer never sees. This layer sits inside
//! tonic's and fires a moment earlier ([`MARGIN`]), so the caller and our
//! metrics get `DEADLINE_EXCEEDED`. It times the response head, as tonic's
//! does: a stream that has started is not cut.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How much sooner than tonic's own timer this layer answers.
const MARGIN: Duration = Duration::from_millis(5);

/// Applies the caller's `grpc-timeout`, capped at `max` (also the limit for
/// calls that send none).
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    pub max: Duration,
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner, max: self.max }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    max: Duration,
}

impl<S, B, R> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limit = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(self.max, |asked| asked.min(self.max));
        let call = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(limit.saturating_sub(MARGIN), call).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded("deadline exceeded").into_http()),
            }
        })
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "12x", "-5S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    async fn answer(header: Option<&'static str>, takes: Duration) -> http::Response<tonic::body::Body> {
        let slow = tower::service_fn(move |_: http::Request<()>| async move {
            tokio::time::sleep(takes).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::default()))
        });
        let mut service = DeadlineLayer { max: Duration::from_secs(1) }.layer(slow);
        let mut request = http::Request::new(());
        if let Some(value) = header {
            request.headers_mut().insert("grpc-timeout", http::HeaderValue::from_static(value));
        }
        match service.ready().await {
            Ok(ready) => ready.call(request).await.unwrap_or_else(|never| match never {}),
            Err(never) => match never {},
        }
    }

    fn code(response: &http::Response<tonic::body::Body>) -> Option<&str> {
        response.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_deadline_answers_deadline_exceeded() {
        let response = answer(Some("50m"), Duration::from_millis(200)).await;
        assert_eq!(code(&response), Some("4"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_within_its_deadline_is_untouched() {
        let response = answer(Some("500m"), Duration::from_millis(10)).await;
        assert_eq!(code(&response), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_server_limit_caps_a_long_or_missing_deadline() {
        assert_eq!(code(&answer(None, Duration::from_secs(5)).await), Some("4"));
        assert_eq!(code(&answer(Some("10S"), Duration::from_secs(5)).await), Some("4"));
    }
}
