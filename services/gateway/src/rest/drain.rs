//! Keeps an HTTP/1.1 connection usable when a request is answered without its
//! body having been read: a refusal decided from the headers (the per-address
//! limit, a missing token, a caller without the admin role, an unknown route)
//! or a body over the size limit.
//!
//! hyper closes such a connection after the response, without saying
//! `Connection: close`, and Linux answers a close with unread bytes in the
//! receive buffer with a reset: a keep-alive client's next request then dies
//! with a broken pipe, and a client still writing a large body never reads the
//! answer (RFC 9112 §9.6). So the handler reads the body through a shared
//! handle, and once it has answered, what it left unread is read here (up to
//! [`DRAIN_MAX_BYTES`] within [`DRAIN_TIMEOUT`]) before the answer goes out;
//! the connection then carries on. A body too large or too slow to drain is
//! left, and the answer says `Connection: close`.
//!
//! Written here because no tower or axum layer does it: tower-http's body
//! limit answers 413 without reading, which is the behaviour this undoes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, Version, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::BodyExt;
use parking_lot::Mutex;

/// The most unread body drained to keep a connection open.
const DRAIN_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// The longest a client may take to send the rest of a body being drained.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A request body the handler and this layer share: the handler reads from
/// it, and afterwards this layer takes what is left.
struct SharedBody(Arc<Mutex<Option<Body>>>);

impl http_body::Body for SharedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.0.lock().as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.lock().as_ref().map_or_else(|| http_body::SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

/// The middleware: runs the request, then drains what its handler left unread.
pub(super) async fn drain_unread_body(request: Request, next: Next) -> Response {
    // HTTP/2 ends a stream on its own, without touching the connection.
    if request.version() > Version::HTTP_11 {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let shared = Arc::new(Mutex::new(Some(body)));
    let mut response = next.run(Request::from_parts(parts, Body::new(SharedBody(shared.clone())))).await;
    let unread = shared.lock().take();
    if let Some(unread) = unread
        && !drain(unread).await
    {
        metrics::counter!("flashsale_http_bodies_undrained_total").increment(1);
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads `body` to its end; false when it is larger than [`DRAIN_MAX_BYTES`],
/// slower than [`DRAIN_TIMEOUT`] or broken.
async fn drain(mut body: Body) -> bool {
    if http_body::Body::is_end_stream(&body) {
        return true;
    }
    if http_body::Body::size_hint(&body).lower() > DRAIN_MAX_BYTES {
        return false;
    }
    let read = async {
        let mut seen = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > DRAIN_MAX_BYTES {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIMEOUT, read).await.unwrap_or(false)
}
