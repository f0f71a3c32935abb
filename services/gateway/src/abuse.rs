//! Every abuse limit, each answered `RATE_LIMITED` with when to retry:
//! purchase attempts per buyer (a script hammering the button), calls per
//! client address (a scalper's many accounts share one), and concurrent
//! `WatchOrder` streams per buyer (each holds a task and a connection).
//!
//! The client address is the connection's peer, or, when the peer is one of
//! `TRUSTED_PROXIES` (a load balancer, an ingress, a mesh sidecar), the
//! nearest address in `X-Forwarded-For` that is not itself a trusted proxy: a
//! client can prepend anything to that header, but not what the proxies it
//! passed appended. From an untrusted peer the header is ignored.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use parking_lot::Mutex;

use crate::error::GatewayError;

/// The wait a refusal names when the limiter cannot say.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);

pub struct AbuseLimits {
    /// Purchase attempts per buyer that may reach Redis (GCRA in memory).
    per_buyer: Option<DefaultKeyedRateLimiter<String>>,
    per_client: Option<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
    trusted_proxies: Vec<IpNet>,
    max_watches: u32,
    watches: Arc<Mutex<HashMap<String, u32>>>,
}

/// One open `WatchOrder` stream; dropping it frees the buyer's slot.
pub struct WatchSlot {
    user_id: String,
    watches: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut watches = self.watches.lock();
        if let Some(open) = watches.get_mut(&self.user_id) {
            *open -= 1;
            if *open == 0 {
                watches.remove(&self.user_id);
            }
        }
    }
}

impl AbuseLimits {
    /// `per_buyer`: purchase attempts per buyer, `per_client`: calls per
    /// client address (`None`: no limit); at most `max_watches` streams per
    /// buyer (0: no limit).
    pub fn new(
        per_buyer: Option<Quota>,
        per_client: Option<Quota>,
        trusted_proxies: Vec<IpNet>,
        max_watches: u32,
    ) -> Self {
        Self {
            per_buyer: per_buyer.map(RateLimiter::keyed),
            per_client: per_client.map(RateLimiter::keyed),
            clock: DefaultClock::default(),
            trusted_proxies,
            max_watches,
            watches: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// No limits (tests of other things).
    pub fn off() -> Self {
        Self::new(None, None, Vec::new(), 0)
    }

    /// The client's address: the peer, or from a trusted proxy the nearest
    /// untrusted hop of `forwarded_for` (all `X-Forwarded-For` values, in order).
    pub fn client_address<'a>(
        &self,
        peer: Option<IpAddr>,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> Option<IpAddr> {
        let peer = peer.map(canonical)?;
        if !self.trusted(peer) {
            return Some(peer);
        }
        let mut nearest = peer;
        for hop in forwarded_for.rev().flat_map(|value| value.rsplit(',')) {
            let Ok(address) = hop.trim().parse::<IpAddr>().map(canonical) else {
                // A hop we cannot read: stop at the last one we could.
                break;
            };
            nearest = address;
            if !self.trusted(address) {
                break;
            }
        }
        Some(nearest)
    }

    fn trusted(&self, address: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&address))
    }

    /// One call from `client`, within its address's rate or `RATE_LIMITED`.
    /// A call whose address is unknown (not over TCP) is not limited here.
    pub fn check_client(&self, client: Option<IpAddr>) -> Result<(), GatewayError> {
        let (Some(limiter), Some(client)) = (&self.per_client, client) else { return Ok(()) };
        limiter.check_key(&client).map_err(|not_until| self.refusal("client_address", &not_until))
    }

    /// One purchase attempt of `buyer` that would reach Redis, within the
    /// buyer's rate or `RATE_LIMITED` (checked after the refusals that cost nothing).
    pub fn check_buyer(&self, buyer: &crate::auth::Principal) -> Result<(), GatewayError> {
        let Some(limiter) = &self.per_buyer else { return Ok(()) };
        limiter.check_key(&buyer.user_id).map_err(|not_until| self.refusal("buyer_purchases", &not_until))
    }

    fn refusal(
        &self,
        limit: &'static str,
        not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>,
    ) -> GatewayError {
        metrics::counter!("flashsale_rate_limited_total", "limit" => limit).increment(1);
        GatewayError::RateLimited(not_until.wait_time_from(self.clock.now()).max(Duration::from_millis(1)))
    }

    /// A slot for one more `WatchOrder` stream of `user_id`, or `RATE_LIMITED`.
    pub fn open_watch(&self, user_id: &str) -> Result<WatchSlot, GatewayError> {
        let mut watches = self.watches.lock();
        let open = watches.entry(user_id.to_owned()).or_default();
        if self.max_watches > 0 && *open >= self.max_watches {
            metrics::counter!("flashsale_rate_limited_total", "limit" => "watch_streams").increment(1);
            return Err(GatewayError::RateLimited(DEFAULT_RETRY));
        }
        *open += 1;
        Ok(WatchSlot { user_id: user_id.to_owned(), watches: self.watches.clone() })
    }

    /// Forgets buyers and addresses whose rate state has fully recovered (bounds memory).
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.per_buyer {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.per_client {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`, as a dual-stack socket
/// reports it) is the IPv4 address.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(trusted: &[&str]) -> AbuseLimits {
        // One call at once, then two a second.
        let two = std::num::NonZeroU32::new(2).unwrap_or(std::num::NonZeroU32::MIN);
        let quota = Quota::per_second(two).allow_burst(std::num::NonZeroU32::MIN);
        AbuseLimits::new(Some(quota), Some(quota), trusted.iter().filter_map(|t| t.parse().ok()).collect(), 2)
    }

    fn ip(text: &str) -> Option<IpAddr> {
        text.parse().ok()
    }

    #[test]
    fn the_forwarded_address_counts_only_from_a_trusted_proxy() {
        let limits = limits(&["10.0.0.0/8", "127.0.0.1/32"]);
        // An untrusted peer: its header is ignored.
        assert_eq!(limits.client_address(ip("203.0.113.9"), ["1.2.3.4"].into_iter()), ip("203.0.113.9"));
        // Through the ingress (10.1.1.1) and the sidecar (127.0.0.1): the hop before them.
        let header = ["6.6.6.6, 198.51.100.7", "10.1.1.1"];
        assert_eq!(limits.client_address(ip("127.0.0.1"), header.into_iter()), ip("198.51.100.7"));
        // A trusted peer with no header is the client itself.
        assert_eq!(limits.client_address(ip("10.2.2.2"), std::iter::empty()), ip("10.2.2.2"));
        // Garbage ends the walk at the last readable hop.
        assert_eq!(limits.client_address(ip("10.2.2.2"), ["nonsense, 10.3.3.3"].into_iter()), ip("10.3.3.3"));
        assert_eq!(limits.client_address(ip("::ffff:203.0.113.9"), std::iter::empty()), ip("203.0.113.9"));
    }

    #[test]
    fn an_address_over_its_rate_and_a_buyer_over_its_streams_are_limited() {
        let limits = limits(&[]);
        let client = ip("203.0.113.9");
        assert!(limits.check_client(client).is_ok());
        assert!(matches!(limits.check_client(client), Err(GatewayError::RateLimited(wait)) if wait > Duration::ZERO));
        assert!(limits.check_client(ip("203.0.113.10")).is_ok(), "another address has its own rate");
        let first = limits.open_watch("alice");
        let second = limits.open_watch("alice");
        assert!(first.is_ok() && second.is_ok());
        assert!(limits.open_watch("alice").is_err());
        assert!(limits.open_watch("bob").is_ok());
        drop(first);
        assert!(limits.open_watch("alice").is_ok(), "a closed stream frees its slot");
    }
}
