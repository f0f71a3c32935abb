//! The inventory's own metrics (Prometheus names; the recorder and `/metrics`
//! endpoint live in `flashsale-server`). Order ids are UUIDv7 minted by the
//! gateway at admission, so an order's age since the buyer was accepted is read
//! from its id, with no extra field on the queue.

use uuid::Uuid;

use crate::db::models::Order;

/// Seconds since the gateway accepted order `id`, if the id carries a time.
fn accepted_age(id: Uuid) -> Option<f64> {
    let (seconds, nanos) = id.get_timestamp()?.to_unix();
    let accepted = std::time::UNIX_EPOCH + std::time::Duration::new(seconds, nanos);
    Some(std::time::SystemTime::now().duration_since(accepted).unwrap_or_default().as_secs_f64())
}

/// A delivery of `OrderPlaced`: `flashsale_orders_delivered_total{redelivered}`
/// and the consumer's lag behind admission, `flashsale_order_queue_lag_seconds`.
pub fn delivered(order_id: Uuid, redelivered: bool) {
    metrics::counter!("flashsale_orders_delivered_total", "redelivered" => if redelivered { "true" } else { "false" })
        .increment(1);
    if let Some(age) = accepted_age(order_id) {
        metrics::histogram!("flashsale_order_queue_lag_seconds").record(age);
    }
}

/// An order reached a final state: `flashsale_orders_final_total{status}` and,
/// for CONFIRMED and REJECTED, the time from admission, `flashsale_settlement_seconds{status}`.
pub fn final_state(order: &Order) {
    let status = match order.status.as_str() {
        "CONFIRMED" => "CONFIRMED",
        "REJECTED" => "REJECTED",
        "REFUNDED" => "REFUNDED",
        _ => return,
    };
    metrics::counter!("flashsale_orders_final_total", "status" => status).increment(1);
    if status != "REFUNDED"
        && let Some(age) = accepted_age(order.id)
    {
        metrics::histogram!("flashsale_settlement_seconds", "status" => status).record(age);
    }
}

/// A recording attempt failed transiently and is retried in place:
/// `flashsale_order_recording_retries_total` (a database outage shows here).
pub fn recording_retried() {
    metrics::counter!("flashsale_order_recording_retries_total").increment(1);
}

/// A rejected order's hold released (`voided`), refused by the wallet, or left to expire.
pub fn hold_released(outcome: &'static str) {
    metrics::counter!("flashsale_rejected_order_holds_total", "outcome" => outcome).increment(1);
}
