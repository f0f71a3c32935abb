//! The buyer's money held for a reservation: the hold before the publish, and
//! its release when the order will not be placed.

use flashsale_proto::wallet::v1::{HoldRequest, VoidRequest};
use tracing::Instrument;

use super::Purchases;
use crate::admission::AdmissionRecord;
use crate::error::GatewayError;
use crate::upstream::request;

/// Tries to release the funds held for an order that was not placed (about a
/// minute with the backoff's growth) before the hold is left to expire.
const RELEASE_TRIES: usize = 20;

/// Most holds this gateway has in flight to the wallet, and how long an
/// attempt waits for a turn before it is answered `UNAVAILABLE` (its units
/// given back, nothing asked of the wallet). Past a few dozen in flight, holds
/// only queue inside the wallet for its connections; there they time out with
/// an unknown outcome, and each then costs a void as well: an overloaded
/// wallet would get ever more work. Shedding here keeps its load at what it
/// can answer, and buyers retry (as `UNAVAILABLE` invites) once it can.
pub(super) const HOLDS_IN_FLIGHT: usize = 48;
const HOLD_TURN_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// How the hold of a fresh reservation went.
pub(super) enum Held {
    Yes,
    /// The wallet refused: nothing is held (INSUFFICIENT_FUNDS, or the wallet's own reason).
    Refused(GatewayError),
    /// Not known: the hold may or may not have been made.
    Unknown(GatewayError),
}

/// One try to void an order's hold: true once the wallet has answered (voided,
/// or refused for good, which retrying would not change).
async fn release_once(
    wallet: &flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient<flashsale_server::TracedChannel>,
    void: &VoidRequest,
) -> bool {
    let voided = crate::upstream::retry_if_lost(|| {
        let mut client = wallet.clone();
        let void = void.clone();
        async move { client.void(request(void)).await }
    })
    .await;
    match voided.map_err(GatewayError::from_upstream) {
        Ok(_) => {
            metrics::counter!("flashsale_purchase_holds_released_total", "outcome" => "voided").increment(1);
            true
        }
        Err(GatewayError::Upstream(status)) => {
            // HOLD_CAPTURED cannot happen to an order never published.
            tracing::warn!(error = %status, order.id = %void.order_id, "the wallet refused to release a hold");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, order.id = %void.order_id, "could not release a hold");
            false
        }
    }
}

/// The `ErrorInfo` reason of a neighbour's status.
fn reason_of(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_error_details().error_info().map(|info| info.reason.clone())
}

impl Purchases {
    /// Holds the order's price in the buyer's wallet under the order id (one
    /// hold per order id, so a call lost in transit is sent again safely).
    pub(super) async fn hold(&self, record: &AdmissionRecord) -> Held {
        let Ok(Ok(_turn)) = tokio::time::timeout(HOLD_TURN_WAIT, self.hold_turns.acquire()).await else {
            metrics::counter!("flashsale_purchase_holds_total", "outcome" => "shed").increment(1);
            let busy = GatewayError::Unavailable("the wallet has as many holds in flight as it can take".into());
            return Held::Refused(busy);
        };
        let held = crate::upstream::retry_if_lost(|| {
            let mut client = self.upstreams.wallet.clone();
            let hold = HoldRequest {
                order_id: record.order_id.clone(),
                user_id: record.user_id.clone(),
                amount: Some(record.amount()),
                ttl_seconds: self.hold_ttl_seconds,
                reference: format!("order {}", record.order_id),
            };
            async move { client.hold(request(hold)).await }
        })
        .instrument(flashsale_telemetry::info_span!("hold", order.id = %record.order_id))
        .await;
        let (outcome, held) = match held {
            Ok(_) => ("held", Held::Yes),
            Err(status) => match GatewayError::from_upstream(status) {
                GatewayError::Upstream(status) if reason_of(&status).as_deref() == Some("INSUFFICIENT_FUNDS") => {
                    ("insufficient_funds", Held::Refused(GatewayError::InsufficientFunds))
                }
                // The order was voided before this hold arrived: another copy of
                // it (republished by a retry under its key while this request
                // was slow) reached inventory, which rejected it. Its fate is
                // decided; publishing again changes nothing (one order per id)
                // and the buyer follows the order to that end.
                GatewayError::Upstream(status) if reason_of(&status).as_deref() == Some("HOLD_VOIDED") => {
                    ("voided_first", Held::Yes)
                }
                // Likewise, a copy of the order was paid (or refused) by a debit
                // before this hold arrived: the wallet holds nothing for it.
                GatewayError::Upstream(status) if reason_of(&status).as_deref() == Some("HOLD_CAPTURED") => {
                    ("paid_first", Held::Yes)
                }
                refused @ GatewayError::Upstream(_) => ("refused", Held::Refused(refused)),
                error => ("unknown", Held::Unknown(error)),
            },
        };
        metrics::counter!("flashsale_purchase_holds_total", "outcome" => outcome).increment(1);
        held
    }

    /// Releases the funds held for an order that will not be placed: once
    /// before the buyer is answered (so a retry straight after UNAVAILABLE finds
    /// the money available), then, if the wallet did not answer, in a task of
    /// its own that tries a while; a hold nobody releases expires after
    /// `PURCHASE_HOLD_TTL_SECONDS`.
    pub(super) async fn release(&self, record: &AdmissionRecord) {
        let wallet = self.upstreams.wallet.clone();
        let void = VoidRequest {
            order_id: record.order_id.clone(),
            user_id: record.user_id.clone(),
            amount: Some(record.amount()),
        };
        if release_once(&wallet, &void).await {
            return;
        }
        tokio::spawn(
            async move {
                let mut backoff = flashsale_messaging::Backoff::new();
                for _ in 1..RELEASE_TRIES {
                    tokio::time::sleep(backoff.delay()).await;
                    backoff.grow();
                    if release_once(&wallet, &void).await {
                        return;
                    }
                }
                metrics::counter!("flashsale_purchase_holds_released_total", "outcome" => "left_to_expire")
                    .increment(1);
            }
            .in_current_span(),
        );
    }
}
