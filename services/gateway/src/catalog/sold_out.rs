//! The sold-out flag of an item and the key holders read while it is set.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::admission::AdmissionStamp;

/// The sold-out flag of an item, and what the gateway learned from Redis while
/// it was set.
///
/// A buyer retrying an idempotency key after the sell-out must get the order
/// that key made, not SOLD_OUT, so keyed attempts would each cost a Redis read.
/// Only buyers who hold a key can have such an order, and while the item stays
/// sold out nobody new gets one: so the gateway reads the set of key holders
/// once, and turns every other buyer away in memory.
///
/// Each clear starts a new generation. A SOLD_OUT answer sets the flag only in
/// the generation its attempt started in (a clear that came meanwhile wins), and
/// a set of key holders serves one generation; the next one reuses it after one
/// cheap read shows Redis admitted nobody since (its [`AdmissionStamp`]).
/// Units that come back through another gateway, and sell again there, are seen
/// here through order events or, at the latest, the refresher's next check of
/// the stamp: until then (at most a refresh interval) a buyer whose reply was
/// lost for such a unit may be told SOLD_OUT on a retry at this gateway.
///
/// A unit reserved in Redis is not yet sold: its buyer's money is held next,
/// and a refused hold gives it back a few milliseconds later. So while this
/// gateway's attempts at the item are between Redis and the end of their hold,
/// a buyer who would be told SOLD_OUT waits for them first (see
/// [`SoldOut::settled`]): SOLD_OUT is said once every unit is held with money.
#[derive(Debug, Default)]
pub struct SoldOut {
    /// `generation << 1 | flag`, so flag and generation change together.
    state: AtomicU64,
    /// Whether buyers were told SOLD_OUT here since units last came back
    /// through an event this gateway applied ([`SoldOut::take_told`]). Unlike
    /// the flag, a notification's clear leaves it: the notification of an
    /// event may arrive before the event is applied to Redis.
    told: std::sync::atomic::AtomicBool,
    /// This gateway's attempts between Redis and the outcome of their hold.
    unsettled: AtomicUsize,
    /// Woken whenever one of them settles.
    settling: tokio::sync::Notify,
    key_holders: Mutex<KeyHolderCache>,
    /// One load of the key holders at a time.
    loading: tokio::sync::Mutex<()>,
}

/// An attempt between Redis and its hold's outcome (see [`SoldOut::attempt`]).
#[derive(Debug)]
pub struct Unsettled(Arc<SoldOut>);

impl Drop for Unsettled {
    fn drop(&mut self) {
        self.0.unsettled.fetch_sub(1, Ordering::AcqRel);
        self.0.settling.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct KeyHolderCache {
    holders: Option<KeyHolders>,
    /// When a load last failed: keyed attempts fall back to one Redis read each
    /// for a while, instead of queueing behind one failing load after another.
    failed_at: Option<Instant>,
}

#[derive(Debug)]
struct KeyHolders {
    /// The sold-out generation they serve; another one revalidates them first.
    generation: u64,
    stamp: AdmissionStamp,
    buyers: Arc<HashSet<String>>,
}

/// How long keyed attempts do without the key holders after a failed load.
const LOAD_BACKOFF: Duration = Duration::from_secs(1);

impl SoldOut {
    pub fn is_set(&self) -> bool {
        self.state.load(Ordering::Acquire) & 1 == 1
    }

    /// The generation to pass to [`SoldOut::set_since`].
    pub fn generation(&self) -> u64 {
        self.state.load(Ordering::Acquire) >> 1
    }

    /// Redis said SOLD_OUT to an attempt that started in `generation`.
    pub fn set_since(&self, generation: u64) {
        self.told.store(true, Ordering::Release);
        let _ =
            self.state.compare_exchange(generation << 1, (generation << 1) | 1, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Marks an attempt that may reserve units, until the returned guard is
    /// dropped: after its hold's outcome (and, if refused, after the units
    /// were given back and [`SoldOut::clear`] called).
    pub fn attempt(self: &Arc<Self>) -> Unsettled {
        self.unsettled.fetch_add(1, Ordering::AcqRel);
        Unsettled(self.clone())
    }

    /// Waits (at most `limit`) until no attempt of this gateway is between
    /// Redis and the outcome of its hold: a SOLD_OUT answer waits for the
    /// units those attempts may yet give back. Returns at once when there are none.
    pub async fn settled(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let woken = self.settling.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.unsettled.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return;
            }
        }
    }

    /// Whether attempts of this gateway are between Redis and their hold's outcome.
    pub fn unsettled(&self) -> bool {
        self.unsettled.load(Ordering::Acquire) > 0
    }

    /// Whether buyers were told SOLD_OUT since the last call (units came back
    /// through an applied event: `flashsale_units_returned_total{after_sold_out}`).
    pub fn take_told(&self) -> bool {
        self.told.swap(false, Ordering::AcqRel)
    }

    /// Units may have come back: a new generation, not sold out.
    pub fn clear(&self) {
        let _ = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| Some(((state >> 1) + 1) << 1));
    }

    /// The refresher's check while sold out: forget key holders that Redis has
    /// admitted past (another gateway sold units that came back).
    pub fn check_stamp(&self, stamp: AdmissionStamp) {
        let mut known = self.key_holders.lock();
        if known.holders.as_ref().is_some_and(|holders| holders.stamp != stamp) {
            known.holders = None;
        }
    }

    fn current(&self) -> Option<Arc<HashSet<String>>> {
        let state = self.state.load(Ordering::Acquire);
        let known = self.key_holders.lock();
        known
            .holders
            .as_ref()
            .filter(|holders| state == ((holders.generation << 1) | 1))
            .map(|holders| holders.buyers.clone())
    }

    /// The buyers holding an idempotency key while sold out. The first caller of
    /// a generation reuses the last set if `stamp` shows Redis admitted nobody
    /// since, or reads it with `load`; concurrent callers wait for it. `None`:
    /// not sold out, cleared meanwhile, or a recent load failed (ask Redis).
    pub async fn key_holders<S, SF, L, LF, E>(&self, stamp: S, load: L) -> Result<Option<Arc<HashSet<String>>>, E>
    where
        S: FnOnce() -> SF,
        SF: Future<Output = Result<AdmissionStamp, E>>,
        L: FnOnce() -> LF,
        LF: Future<Output = Result<(AdmissionStamp, HashSet<String>), E>>,
    {
        if let Some(buyers) = self.current() {
            return Ok(Some(buyers));
        }
        let _one = self.loading.lock().await;
        if let Some(buyers) = self.current() {
            return Ok(Some(buyers));
        }
        let state = self.state.load(Ordering::Acquire);
        let (previous, failed_at) = {
            let known = self.key_holders.lock();
            (known.holders.as_ref().map(|holders| (holders.stamp.clone(), holders.buyers.clone())), known.failed_at)
        };
        if state & 1 == 0 || failed_at.is_some_and(|at| at.elapsed() < LOAD_BACKOFF) {
            return Ok(None);
        }
        let read = async {
            if let Some((stamp_then, buyers)) = previous
                && stamp().await? == stamp_then
            {
                return Ok((stamp_then, buyers));
            }
            let (stamp, buyers) = load().await?;
            Ok::<_, E>((stamp, Arc::new(buyers)))
        };
        let (stamp, buyers) = match read.await {
            Ok(read) => read,
            Err(e) => {
                self.key_holders.lock().failed_at = Some(Instant::now());
                return Err(e);
            }
        };
        let mut known = self.key_holders.lock();
        known.failed_at = None;
        known.holders = Some(KeyHolders { generation: state >> 1, stamp, buyers: buyers.clone() });
        Ok((self.state.load(Ordering::Acquire) == state).then_some(buyers))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{AdmissionStamp, SoldOut};

    type Reply = Result<(AdmissionStamp, HashSet<String>), &'static str>;

    fn stamp(admissions: i64) -> AdmissionStamp {
        AdmissionStamp { buckets: vec![(7, admissions)] }
    }

    fn buyers(names: &[&str]) -> HashSet<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    /// Asks for the key holders with a stamp reader and a loader that count their calls.
    async fn ask(
        sold_out: &SoldOut,
        now: AdmissionStamp,
        reply: Reply,
        stamps: &AtomicUsize,
        loads: &AtomicUsize,
    ) -> Result<Option<HashSet<String>>, &'static str> {
        let holders = sold_out
            .key_holders(
                || async {
                    stamps.fetch_add(1, Ordering::SeqCst);
                    Ok(now)
                },
                || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    reply
                },
            )
            .await?;
        Ok(holders.map(|holders| (*holders).clone()))
    }

    #[test]
    fn a_sold_out_answer_to_an_attempt_from_before_a_clear_is_ignored() {
        let sold_out = SoldOut::default();
        let asked_in = sold_out.generation();
        sold_out.clear();
        sold_out.set_since(asked_in);
        assert!(!sold_out.is_set());
        sold_out.set_since(sold_out.generation());
        assert!(sold_out.is_set());
        sold_out.clear();
        assert!(!sold_out.is_set());
    }

    #[tokio::test]
    async fn key_holders_are_read_once_and_reused_while_redis_admitted_nobody() {
        let (sold_out, stamps, loads) = (SoldOut::default(), AtomicUsize::new(0), AtomicUsize::new(0));
        // Not sold out: nothing to read.
        assert_eq!(ask(&sold_out, stamp(1), Ok((stamp(1), buyers(&["ann"]))), &stamps, &loads).await, Ok(None));
        assert_eq!(loads.load(Ordering::SeqCst), 0);

        sold_out.set_since(sold_out.generation());
        for _ in 0..3 {
            let holders = ask(&sold_out, stamp(1), Ok((stamp(1), buyers(&["ann"]))), &stamps, &loads).await;
            assert_eq!(holders, Ok(Some(buyers(&["ann"]))));
        }
        assert_eq!((stamps.load(Ordering::SeqCst), loads.load(Ordering::SeqCst)), (0, 1));

        // Units came back and the item sold out again, nobody admitted meanwhile
        // (e.g. a refusal for SOLD_OUT): one stamp read, no second HKEYS.
        sold_out.clear();
        sold_out.set_since(sold_out.generation());
        let holders = ask(&sold_out, stamp(1), Ok((stamp(2), buyers(&["ann", "bob"]))), &stamps, &loads).await;
        assert_eq!(holders, Ok(Some(buyers(&["ann"]))));
        assert_eq!((stamps.load(Ordering::SeqCst), loads.load(Ordering::SeqCst)), (1, 1));

        // Again, but bob was admitted meanwhile: read afresh.
        sold_out.clear();
        sold_out.set_since(sold_out.generation());
        let holders = ask(&sold_out, stamp(2), Ok((stamp(2), buyers(&["ann", "bob"]))), &stamps, &loads).await;
        assert_eq!(holders, Ok(Some(buyers(&["ann", "bob"]))));
        assert_eq!((stamps.load(Ordering::SeqCst), loads.load(Ordering::SeqCst)), (2, 2));
    }

    #[tokio::test]
    async fn the_refresher_drops_key_holders_redis_has_admitted_past() {
        let (sold_out, stamps, loads) = (SoldOut::default(), AtomicUsize::new(0), AtomicUsize::new(0));
        sold_out.set_since(sold_out.generation());
        ask(&sold_out, stamp(1), Ok((stamp(1), buyers(&["ann"]))), &stamps, &loads).await.ok();
        // Still sold out, and Redis's stamp is the one read: kept.
        sold_out.check_stamp(stamp(1));
        let holders = ask(&sold_out, stamp(1), Ok((stamp(1), buyers(&["ann"]))), &stamps, &loads).await;
        assert_eq!((holders, loads.load(Ordering::SeqCst)), (Ok(Some(buyers(&["ann"]))), 1));
        // Another gateway sold a unit that came back, to cid: this set would miss cid.
        sold_out.check_stamp(stamp(2));
        let holders = ask(&sold_out, stamp(2), Ok((stamp(2), buyers(&["ann", "cid"]))), &stamps, &loads).await;
        assert_eq!((holders, loads.load(Ordering::SeqCst)), (Ok(Some(buyers(&["ann", "cid"]))), 2));
    }

    #[tokio::test]
    async fn key_holders_read_across_a_clear_are_not_used() {
        let sold_out = SoldOut::default();
        sold_out.set_since(sold_out.generation());
        let holders = sold_out
            .key_holders(
                || async { Ok::<_, &'static str>(stamp(1)) },
                || async {
                    // Units come back while Redis is being read.
                    sold_out.clear();
                    Ok((stamp(1), buyers(&["ann"])))
                },
            )
            .await;
        assert_eq!(holders, Ok(None));
    }

    #[tokio::test]
    async fn after_a_failed_read_keyed_attempts_ask_redis_one_by_one_for_a_while() {
        let (sold_out, stamps, loads) = (SoldOut::default(), AtomicUsize::new(0), AtomicUsize::new(0));
        sold_out.set_since(sold_out.generation());
        assert_eq!(ask(&sold_out, stamp(1), Err("redis down"), &stamps, &loads).await, Err("redis down"));
        // Within the back-off: no second read queued behind the first.
        assert_eq!(ask(&sold_out, stamp(1), Ok((stamp(1), buyers(&["ann"]))), &stamps, &loads).await, Ok(None));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }
}
