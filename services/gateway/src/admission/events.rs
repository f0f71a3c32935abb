//! What order events, the reconciler and the sold-out answer read and change:
//! final states applied to a buyer's bucket, undone admissions, admissions
//! still unrecorded and their republishing, the key holders and the stamp
//! that says whether they are complete, and the end of a sale's state.

use std::collections::HashSet;

use flashsale_proto::inventory::v1::OrderEvent;
use redis::AsyncCommands;

use super::protocol::{AdmittedEntry, Part, PriorOrder, STAMP_FIELDS, Slot, idem_field, idem_field_user};
use super::{Admission, AdmissionStamp, Spread, stamp_of};
use crate::error::GatewayError;

/// The longest wait between two publishes of one unrecorded admission, in
/// multiples of the reconciler's grace.
pub const MAX_REPUBLISH_FACTOR: i64 = 8;

impl Admission {
    /// The order an earlier purchase under this buyer's key created, with its quantity.
    pub async fn prior_order(
        &self,
        item: Spread<'_>,
        user_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<(String, u32)>, GatewayError> {
        let idem = self.key(item.home(user_id), Part::Idem);
        let value: Option<String> = self.hot.clone().hget(idem, idem_field(user_id, idempotency_key)).await?;
        Ok(value.and_then(|value| PriorOrder::decode(&value)).map(|prior| (prior.order_id, prior.quantity)))
    }

    /// The buyers holding an idempotency key for the item (each admission made
    /// one), with the stamp they were read at, atomically per bucket. One HKEYS
    /// per bucket, bounded by the admissions the stock allowed; read when an
    /// item sells out, so the crowd's keyed attempts need no Redis read.
    /// `None` when a bucket's state is missing (Redis lost it): rebuild first.
    pub async fn key_holders(
        &self,
        item: Spread<'_>,
    ) -> Result<Option<(AdmissionStamp, HashSet<String>)>, GatewayError> {
        let mut conn = self.background.get().await?;
        let mut stamp = AdmissionStamp::default();
        let mut buyers = HashSet::new();
        for slot in item.slots() {
            let ((version, admissions), fields): ((Option<i64>, Option<i64>), Vec<String>) = redis::pipe()
                .atomic()
                .hmget(self.key(slot, Part::Ready), &STAMP_FIELDS)
                .hkeys(self.key(slot, Part::Idem))
                .query_async(&mut conn)
                .await?;
            if version.is_none() {
                return Ok(None);
            }
            stamp.buckets.push(stamp_of(version, admissions));
            buyers.extend(fields.iter().filter_map(|field| idem_field_user(field).map(str::to_owned)));
        }
        Ok(Some((stamp, buyers)))
    }

    /// The item's [`AdmissionStamp`]: one HMGET per bucket.
    pub async fn admission_stamp(&self, item: Spread<'_>) -> Result<AdmissionStamp, GatewayError> {
        let mut conn = self.background.get().await?;
        let mut stamp = AdmissionStamp::default();
        for slot in item.slots() {
            let (version, admissions): (Option<i64>, Option<i64>) =
                conn.hmget(self.key(slot, Part::Ready), &STAMP_FIELDS).await?;
            stamp.buckets.push(stamp_of(version, admissions));
        }
        Ok(stamp)
    }

    /// Makes every admission key of the item expire at `at_ms` (unix ms): the
    /// sale is over, and its state is kept only for the retention period.
    pub async fn expire_item(&self, item: Spread<'_>, at_ms: i64) -> Result<(), GatewayError> {
        let mut conn = self.background.get().await?;
        for slot in item.slots() {
            let mut pipe = redis::pipe();
            for part in Part::ALL {
                pipe.cmd("PEXPIREAT").arg(self.key(slot, part)).arg(at_ms).ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Undoes an admission whose order never reached the broker.
    pub async fn unadmit(
        &self,
        item: Spread<'_>,
        order_id: &str,
        user_id: &str,
        key: &str,
    ) -> Result<(), GatewayError> {
        let mut conn = self.background.get().await?;
        let _: i64 = self
            .scripts
            .unadmit
            .on(&self.prefix, item.home(user_id))
            .arg(order_id)
            .arg(user_id)
            .arg(key)
            .invoke_async(&mut conn)
            .await?;
        // The admission record stays (it expires): a concurrent retry under the same
        // key may have published this order and named it to the buyer already.
        Ok(())
    }

    /// Admissions of the item older than `older_than_ms` (unix ms) that no final
    /// event has settled yet: (order id, user, quantity, idempotency key).
    pub async fn unsettled_before(
        &self,
        item: Spread<'_>,
        older_than_ms: i64,
    ) -> Result<Vec<(String, String, u32, String)>, GatewayError> {
        let mut conn = self.background.get().await?;
        let mut open = Vec::new();
        for slot in item.slots() {
            let entries: Vec<(String, String)> = conn.hgetall(self.key(slot, Part::Admitted)).await?;
            open.extend(entries.into_iter().filter_map(|(order_id, value)| {
                let entry = AdmittedEntry::decode(&value)?;
                (entry.at_ms < older_than_ms).then_some((
                    order_id,
                    entry.user_id,
                    entry.quantity,
                    entry.idempotency_key,
                ))
            }));
        }
        Ok(open)
    }

    /// Claims, for all gateways at once, the next publish of the unrecorded
    /// admission `order_id` of buyer `user_id`: true when this caller may
    /// publish it now. After a publish the next one waits `grace`, then twice
    /// that, and so on up to [`MAX_REPUBLISH_FACTOR`] times `grace`
    /// (`lua/claim_republish.lua`).
    pub async fn claim_republish(
        &self,
        item: Spread<'_>,
        user_id: &str,
        order_id: &str,
        grace_ms: i64,
    ) -> Result<bool, GatewayError> {
        let mut conn = self.background.get().await?;
        let claimed: i64 = self
            .scripts
            .claim_republish
            .on(&self.prefix, item.home(user_id))
            .arg(order_id)
            .arg(flashsale_domain::time::now_ms())
            .arg(grace_ms)
            .arg(MAX_REPUBLISH_FACTOR)
            .invoke_async(&mut conn)
            .await?;
        Ok(claimed == 1)
    }

    /// The open admission of `order_id` among `items`, as (item id, buyer,
    /// quantity, admitted at ms, idempotency key). The admission script writes
    /// it with the reservation itself, so it exists even when the separate
    /// admission record could not be saved; it goes once the order is final.
    /// With `buyer`, only that buyer's: one HGET per item, in the buyer's own
    /// bucket (where all of a buyer's admissions live); without (an operator's
    /// look-up), one per bucket. All are sent at once on the hot-path
    /// connection: multiplexed, so one round trip, and no connection of the
    /// background pool, which events, rebuilds and the reconciler need, is held.
    pub async fn admitted_entry(
        &self,
        items: &[Spread<'_>],
        buyer: Option<&str>,
        order_id: &str,
    ) -> Result<Option<(String, String, u32, i64, String)>, GatewayError> {
        let slots: Vec<Slot<'_>> = match buyer {
            Some(user_id) => items.iter().map(|item| item.home(user_id)).collect(),
            None => items.iter().flat_map(|item| item.slots()).collect(),
        };
        let lookups = slots.into_iter().map(|slot| {
            let key = self.key(slot, Part::Admitted);
            let mut conn = self.hot.clone();
            async move {
                let value: Option<String> = conn.hget(key, order_id).await?;
                Ok::<_, GatewayError>((slot.item_id, value))
            }
        });
        for (item_id, value) in futures::future::try_join_all(lookups).await? {
            let Some(entry) = value.as_deref().and_then(AdmittedEntry::decode) else { continue };
            let AdmittedEntry { user_id, quantity, at_ms, idempotency_key } = entry;
            if buyer.is_none_or(|buyer| buyer == user_id) {
                return Ok(Some((item_id.to_owned(), user_id, quantity, at_ms, idempotency_key)));
            }
        }
        Ok(None)
    }

    /// Applies a final order state to the admission state of the buyer's
    /// bucket (idempotent).
    pub async fn apply_event(&self, item: Spread<'_>, event: &OrderEvent) -> Result<String, GatewayError> {
        let order = event.order.as_ref().ok_or_else(|| GatewayError::invalid("order", "missing in event"))?;
        let status = flashsale_proto::common::v1::OrderStatus::try_from(order.status)
            .map_err(|_| GatewayError::invalid("order.status", "unknown"))?;
        let status = match status {
            flashsale_proto::common::v1::OrderStatus::Confirmed => "CONFIRMED",
            flashsale_proto::common::v1::OrderStatus::Rejected => "REJECTED",
            flashsale_proto::common::v1::OrderStatus::Refunded => "REFUNDED",
            // Only final states are published; anything else has nothing to undo.
            _ => return Ok("IGNORED".into()),
        };
        let mut conn = self.background.get().await?;
        let outcome: String = self
            .scripts
            .apply_event
            .on(&self.prefix, item.home(&order.user_id))
            .arg(&order.id)
            .arg(&order.user_id)
            .arg(order.quantity)
            .arg(status)
            .arg(&order.reject_reason)
            .arg(event.units_released)
            .arg(event.item_version)
            .invoke_async(&mut conn)
            .await?;
        // Inventory has the order now; the gateway's own record is no longer needed.
        let _: () = conn.del(self.order_key(&order.id)).await?;
        Ok(outcome)
    }

    /// Units Redis still offers (all buckets) and the [`AdmissionStamp`], or
    /// `None` when a bucket's state is missing (the refresher's check of a
    /// sold-out item).
    pub async fn sold_out_check(&self, item: Spread<'_>) -> Result<Option<(i64, AdmissionStamp)>, GatewayError> {
        let mut conn = self.background.get().await?;
        let mut stamp = AdmissionStamp::default();
        let mut total = 0;
        for slot in item.slots() {
            let ready_key = self.key(slot, Part::Ready);
            let (ready, tokens, (version, admissions)): (bool, Option<i64>, (Option<i64>, Option<i64>)) = redis::pipe()
                .exists(&ready_key)
                .get(self.key(slot, Part::Tokens))
                .hmget(&ready_key, &STAMP_FIELDS)
                .query_async(&mut conn)
                .await?;
            if !ready {
                return Ok(None);
            }
            total += tokens.unwrap_or(0);
            stamp.buckets.push(stamp_of(version, admissions));
        }
        Ok(Some((total, stamp)))
    }
}
