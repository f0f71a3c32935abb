//! Clients of the internal services. Channels connect lazily, so the gateway
//! starts (and answers from its cache) while a neighbour is still coming up.

use std::time::Duration;

use flashsale_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use flashsale_server::TracedChannel;
use tonic::Request;

/// Deadline of one call to inventory or wallet.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct Upstreams {
    pub inventory: InventoryServiceClient<TracedChannel>,
    pub wallet: WalletServiceClient<TracedChannel>,
}

impl Upstreams {
    /// With `tls`, both URLs are https:// and every call presents the gateway's certificate.
    pub fn new(
        inventory_url: &str,
        wallet_url: &str,
        tls: Option<&flashsale_server::MutualTls>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            inventory: InventoryServiceClient::new(channel(inventory_url, tls)?),
            wallet: WalletServiceClient::new(channel(wallet_url, tls)?),
        })
    }
}

fn channel(url: &str, tls: Option<&flashsale_server::MutualTls>) -> anyhow::Result<TracedChannel> {
    Ok(flashsale_server::traced(flashsale_server::internal_channel(url, tls)?))
}

/// A request carrying `grpc-timeout`, so the callee stops when we stop waiting.
pub fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// Deadline of a call that streams a large answer (an item's admission snapshot).
const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// As [`request`], for a call that streams a large answer.
pub fn long_request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(LONG_CALL_TIMEOUT);
    request
}

/// Runs an idempotent call to a neighbour (a read, or a write under an
/// idempotency key) and, while it is lost in transit, again: at most
/// [`ATTEMPTS`] times, a few milliseconds apart. A neighbour closes connections
/// now and then on purpose (a graceful GOAWAY when it shuts down or rotates
/// connections after `max_connection_age`); a call that raced that close failed
/// on our side of the wire, and so can the next one until the channel has
/// noticed and connected again. An answer the neighbour sent (any status it
/// chose) is returned as it is.
pub async fn retry_if_lost<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut pause = Duration::from_millis(5);
    for _ in 1..ATTEMPTS {
        match call().await {
            Err(status) if lost_in_transit(&status) => {
                metrics::counter!("flashsale_upstream_retries_total").increment(1);
                tokio::time::sleep(pause).await;
                pause *= 4;
            }
            answer => return answer,
        }
    }
    call().await
}

/// How many times [`retry_if_lost`] sends a call at most.
const ATTEMPTS: u32 = 3;

/// tonic builds the status of a call that failed in the transport from that
/// error and keeps it as the source (a GOAWAY the call raced comes out as
/// INTERNAL "h2 protocol error", a closed connection as UNAVAILABLE or
/// CANCELLED); a status the neighbour answered with has none.
fn lost_in_transit(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal)
        && std::error::Error::source(status).is_some()
}
