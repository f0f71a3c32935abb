//! Rebuilding an item's lost admission state from inventory's snapshot
//! (under a lease, so one gateway does it), and raising Redis's tokens to
//! PostgreSQL's when nothing is in flight.

use flashsale_proto::inventory::v1::StreamAdmissionSnapshotResponse;

use super::protocol::{PriorOrder, Slot, idem_field};
use super::{Admission, Spread};
use crate::error::GatewayError;

/// How long a rebuild may go without writing a piece before another gateway may
/// take its buckets over (`rebuild_begin.lua`).
const REBUILD_LEASE_MS: u64 = 15_000;

/// Holdings and keys written per `rebuild_part.lua` call.
const REBUILD_BATCH: usize = 1_000;

/// The buckets of an item one rebuild holds the lease of ([`Admission::begin_rebuild`]).
#[derive(Debug)]
pub struct RebuildLease {
    token: String,
    /// The buckets leased (missing when the lease was taken).
    buckets: Vec<u32>,
    /// Each bucket's tokens when the lease was taken, `None` where it was missing.
    present: Vec<Option<i64>>,
}

/// The tokens each missing bucket gets in a rebuild, from the units PostgreSQL
/// has left and the tokens of each bucket still present (`None`: missing).
/// The missing buckets share what the present ones do not offer, evenly (the
/// first ones take the remainder), so that together the buckets offer at least
/// `remaining`. An earlier rule gave each missing bucket `remaining` less all
/// the others with the missing ones at their even share, which offered fewer
/// units than PostgreSQL held whenever the present buckets were uneven (19, 19
/// present and two missing of 40 left: 0 each, 38 in all).
fn missing_shares(remaining: i64, present: &[Option<i64>]) -> Vec<Option<i64>> {
    let offered: i64 = present.iter().flatten().sum();
    let missing = present.iter().filter(|tokens| tokens.is_none()).count() as i64;
    let to_share = (remaining - offered).max(0);
    let mut nth = 0;
    present
        .iter()
        .map(|tokens| match tokens {
            Some(_) => None,
            None => {
                let share = to_share / missing + i64::from(nth < to_share % missing);
                nth += 1;
                Some(share)
            }
        })
        .collect()
}

impl Admission {
    /// Takes the rebuild lease of every bucket of the item whose state is
    /// missing: `None` when none is missing (any longer), or when another
    /// rebuild holds every missing one (after waiting for it, up to a lease).
    /// The caller then reads inventory's snapshot and hands it to
    /// [`Admission::rebuild`], or gives up with [`Admission::abandon_rebuild`].
    pub async fn begin_rebuild(&self, item: Spread<'_>) -> Result<Option<RebuildLease>, GatewayError> {
        let states = self.bucket_states(item).await?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (mut buckets, mut busy) = (Vec::new(), false);
        for slot in item.slots().filter(|slot| !states[slot.bucket as usize].ready) {
            let mut conn = self.background.get().await?;
            let said: String = self
                .scripts
                .rebuild_begin
                .on(&self.prefix, slot)
                .arg(&token)
                .arg(REBUILD_LEASE_MS)
                .invoke_async(&mut conn)
                .await?;
            match said.as_str() {
                "BEGUN" => buckets.push(slot.bucket),
                "BUSY" => busy = true,
                _ => {}
            }
        }
        if buckets.is_empty() {
            if busy {
                self.wait_until_ready(item).await?;
            }
            return Ok(None);
        }
        let present = states.iter().map(|state| state.ready.then_some(state.tokens)).collect();
        Ok(Some(RebuildLease { token, buckets, present }))
    }

    /// Waits (up to a lease) while another gateway rebuilds the item.
    async fn wait_until_ready(&self, item: Spread<'_>) -> Result<(), GatewayError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(REBUILD_LEASE_MS);
        while self.tokens(item).await?.is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Rebuilds the leased buckets from inventory's snapshot, read piece by
    /// piece (one piece in memory at a time, whatever the item's size); returns
    /// how many it rebuilt. Gives the lease up if the snapshot breaks off.
    ///
    /// A rebuilt bucket gets its buyers' holdings, in-flight marks and keys.
    /// The missing buckets share, evenly, the units PostgreSQL has left less
    /// what the buckets still present offer ([`missing_shares`]). With one
    /// bucket that is all PostgreSQL has left. Units the present buckets hold
    /// for orders still in flight are counted in both, so Redis may offer a
    /// few units too many: PostgreSQL judges every order and rejects those
    /// SOLD_OUT. It never offers too few, which would strand them.
    pub async fn rebuild<S>(&self, item: Spread<'_>, lease: &RebuildLease, pieces: S) -> Result<u32, GatewayError>
    where
        S: futures::Stream<Item = Result<StreamAdmissionSnapshotResponse, GatewayError>>,
    {
        let outcome = self.write_snapshot(item, lease, pieces).await;
        if outcome.is_err() {
            self.abandon_rebuild(item, lease).await;
        }
        outcome
    }

    async fn write_snapshot<S>(&self, item: Spread<'_>, lease: &RebuildLease, pieces: S) -> Result<u32, GatewayError>
    where
        S: futures::Stream<Item = Result<StreamAdmissionSnapshotResponse, GatewayError>>,
    {
        use futures::StreamExt;
        let mut pieces = std::pin::pin!(pieces);
        let Some(first) = pieces.next().await.transpose()? else {
            return Err(GatewayError::Unavailable("the admission snapshot was empty".into()));
        };
        if first.item_id != item.item_id {
            return Err(GatewayError::Internal(
                format!("a snapshot of {:?} for {:?}", first.item_id, item.item_id).into(),
            ));
        }
        let (version, remaining) = (first.item_version, i64::from(first.stock_remaining));
        let mut piece = first;
        loop {
            for &bucket in &lease.buckets {
                self.write_piece(item.slot(bucket), item, &lease.token, &piece).await?;
            }
            if piece.complete {
                break;
            }
            piece = pieces
                .next()
                .await
                .transpose()?
                .ok_or_else(|| GatewayError::Unavailable("the admission snapshot broke off".into()))?;
        }
        let shares = missing_shares(remaining, &lease.present);
        let mut rebuilt = 0;
        for &bucket in &lease.buckets {
            let tokens = shares[bucket as usize].unwrap_or(0);
            let mut conn = self.background.get().await?;
            let done: i64 = self
                .scripts
                .rebuild
                .on(&self.prefix, item.slot(bucket))
                .arg(&lease.token)
                .arg(version)
                .arg(tokens)
                .invoke_async(&mut conn)
                .await?;
            rebuilt += u32::from(done == 1);
        }
        Ok(rebuilt)
    }

    /// Writes one bucket's share of a snapshot piece: its buyers' holdings and
    /// keys, at most [`REBUILD_BATCH`] entries per script (a script blocks Redis
    /// while it runs).
    async fn write_piece(
        &self,
        slot: Slot<'_>,
        item: Spread<'_>,
        token: &str,
        piece: &StreamAdmissionSnapshotResponse,
    ) -> Result<(), GatewayError> {
        let holdings: Vec<_> = piece.holdings.iter().filter(|holding| item.home(&holding.user_id) == slot).collect();
        let keys: Vec<_> = piece.admitted_keys.iter().filter(|key| item.home(&key.user_id) == slot).collect();
        let (mut holdings, mut keys) = (holdings.as_slice(), keys.as_slice());
        while !holdings.is_empty() || !keys.is_empty() {
            let (these_holdings, rest) = holdings.split_at(holdings.len().min(REBUILD_BATCH));
            holdings = rest;
            let (these_keys, rest) = keys.split_at(keys.len().min(REBUILD_BATCH - these_holdings.len()));
            keys = rest;
            let mut invocation = self.scripts.rebuild_part.on(&self.prefix, slot);
            invocation.arg(token).arg(REBUILD_LEASE_MS).arg(these_holdings.len());
            for holding in these_holdings {
                invocation.arg(&holding.user_id).arg(holding.quantity).arg(&holding.in_flight_order_id);
            }
            invocation.arg(these_keys.len());
            for key in these_keys {
                // The same field and value admit.lua writes.
                invocation
                    .arg(idem_field(&key.user_id, &key.idempotency_key))
                    .arg(PriorOrder::encode(&key.order_id, key.quantity));
            }
            let mut conn = self.background.get().await?;
            let held: i64 = invocation.invoke_async(&mut conn).await?;
            if held == 0 {
                return Err(GatewayError::Unavailable("the rebuild lease was lost".into()));
            }
        }
        Ok(())
    }

    /// Gives the lease of an unfinished rebuild up, so the next attempt need not
    /// wait for it to expire (a failure is only logged: it expires anyway).
    pub async fn abandon_rebuild(&self, item: Spread<'_>, lease: &RebuildLease) {
        for &bucket in &lease.buckets {
            let abandoned = async {
                let mut conn = self.background.get().await?;
                let _: i64 = self
                    .scripts
                    .rebuild_abandon
                    .on(&self.prefix, item.slot(bucket))
                    .arg(&lease.token)
                    .invoke_async(&mut conn)
                    .await?;
                Ok::<_, GatewayError>(())
            };
            if let Err(e) = abandoned.await {
                tracing::warn!(error = %e, item.id = %item.item_id, "could not give up a rebuild lease; it expires");
            }
        }
    }

    /// Raises the item's tokens to PostgreSQL's `remaining` if nothing is in
    /// flight (no open admission, no open loan, in any bucket) and Redis offers
    /// fewer; returns the tokens added (to bucket 0, from where dry buckets
    /// borrow them). The buckets are read one after another, so an admission
    /// meanwhile can make Redis offer a unit too many, never too few.
    pub async fn resync(&self, item: Spread<'_>, remaining: u32) -> Result<i64, GatewayError> {
        let states = self.bucket_states(item).await?;
        if states.iter().any(|state| !state.ready || state.admitted > 0 || state.lent > 0) {
            return Ok(0);
        }
        let others: i64 = states.iter().skip(1).map(|state| state.tokens).sum();
        let target = i64::from(remaining) - others;
        if target <= states[0].tokens {
            return Ok(0);
        }
        let mut conn = self.background.get().await?;
        Ok(self.scripts.resync.on(&self.prefix, item.slot(0)).arg(target).invoke_async(&mut conn).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::missing_shares;

    #[test]
    fn missing_buckets_share_what_the_present_ones_do_not_offer() {
        // (remaining in PostgreSQL, each bucket's tokens or missing, expected shares)
        type Buckets = Vec<Option<i64>>;
        let cases: [(i64, Buckets, Buckets); 5] = [
            (40, vec![Some(19), Some(19), None, None], vec![None, None, Some(1), Some(1)]),
            (40, vec![None, None, None, None], vec![Some(10), Some(10), Some(10), Some(10)]),
            (7, vec![None, Some(0), None], vec![Some(4), None, Some(3)]),
            // The present buckets offer more than is left (admissions in flight): none.
            (5, vec![Some(9), None], vec![None, Some(0)]),
            (3, vec![None], vec![Some(3)]),
        ];
        for (remaining, present, expected) in cases {
            let shares = missing_shares(remaining, &present);
            assert_eq!(shares, expected, "{remaining} left, {present:?}");
            let offered: i64 = present.iter().flatten().chain(shares.iter().flatten()).sum();
            assert!(offered >= remaining, "never fewer than PostgreSQL holds: {present:?}");
        }
    }
}
