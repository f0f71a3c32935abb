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
    pub fn new(inventory_url: &str, wallet_url: &str) -> Result<Self, tonic::transport::Error> {
        Ok(Self {
            inventory: InventoryServiceClient::new(channel(inventory_url)?),
            wallet: WalletServiceClient::new(channel(wallet_url)?),
        })
    }
}

fn channel(url: &str) -> Result<TracedChannel, tonic::transport::Error> {
    Ok(flashsale_server::traced(flashsale_server::internal_endpoint(url)?.connect_lazy()))
}

/// A request carrying `grpc-timeout`, so the callee stops when we stop waiting.
pub fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}
