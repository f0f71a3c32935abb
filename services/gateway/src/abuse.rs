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
//!
//! An IPv6 client usually holds a whole /64 (2^64 addresses), so IPv6
//! addresses are counted by their network of [`ClientKeys::ipv6_prefix`] bits
//! (IPv4 addresses one by one). The limiter remembers at most
//! [`ClientKeys::max_addresses`] networks: past that, after forgetting the idle
//! ones, new calls share one rate until the flood of addresses ebbs, so a
//! client cycling through addresses cannot grow the gateway's memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use parking_lot::Mutex;

use crate::error::GatewayError;

/// The wait a refusal names when the limiter cannot say.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);

/// How client addresses are counted by the per-address limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientKeys {
    /// IPv6 addresses count by their network of this many leading bits (1..=128).
    pub ipv6_prefix: u8,
    /// The most networks the limiter remembers at once.
    pub max_addresses: usize,
}

impl ClientKeys {
    pub const DEFAULT: Self = Self { ipv6_prefix: 64, max_addresses: 100_000 };

    /// The key a client address is counted under: an IPv4 address itself, an
    /// IPv6 address's network of `ipv6_prefix` bits.
    fn key(self, client: IpAddr) -> IpAddr {
        match client {
            IpAddr::V4(_) => client,
            IpAddr::V6(v6) => {
                let bits = u32::from(self.ipv6_prefix.clamp(1, 128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }
}

/// The key every new client shares while the limiter is full.
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

pub struct AbuseLimits {
    /// Purchase attempts per buyer that may reach Redis (GCRA in memory).
    per_buyer: Option<DefaultKeyedRateLimiter<String>>,
    per_client: Option<DefaultKeyedRateLimiter<IpAddr>>,
    client_keys: ClientKeys,
    /// When the full per-client map was last swept (ms after `started`), so a
    /// flood does not sweep it on every call.
    swept_at_ms: AtomicU64,
    started: std::time::Instant,
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
        client_keys: ClientKeys,
        trusted_proxies: Vec<IpNet>,
        max_watches: u32,
    ) -> Self {
        Self {
            per_buyer: per_buyer.map(RateLimiter::keyed),
            per_client: per_client.map(RateLimiter::keyed),
            client_keys,
            swept_at_ms: AtomicU64::new(0),
            started: std::time::Instant::now(),
            clock: DefaultClock::default(),
            trusted_proxies,
            max_watches,
            watches: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// No limits (tests of other things).
    pub fn off() -> Self {
        Self::new(None, None, ClientKeys::DEFAULT, Vec::new(), 0)
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
        let mut key = self.client_keys.key(client);
        if limiter.len() >= self.client_keys.max_addresses {
            // Full: forget the networks whose rate has recovered (at most once a
            // second), and while it is still full, count new calls together.
            let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let swept = self.swept_at_ms.load(Ordering::Relaxed);
            if now_ms.saturating_sub(swept) >= 1_000
                && self.swept_at_ms.compare_exchange(swept, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            {
                limiter.retain_recent();
            }
            if limiter.len() >= self.client_keys.max_addresses {
                metrics::counter!("flashsale_client_addresses_overflow_total").increment(1);
                key = OVERFLOW;
            }
        }
        limiter.check_key(&key).map_err(|not_until| self.refusal("client_address", &not_until))
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
        let trusted = trusted.iter().filter_map(|t| t.parse().ok()).collect();
        AbuseLimits::new(Some(quota), Some(quota), ClientKeys::DEFAULT, trusted, 2)
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

    /// A client with an IPv6 /64 (2^64 addresses) is one client: a call from
    /// every address of its network shares one rate (review defect: keyed by
    /// the full /128, one /64 had 2^64 separate rates), while another /64
    /// keeps its own.
    #[test]
    fn an_ipv6_network_shares_one_rate() {
        let limits = limits(&[]);
        assert!(limits.check_client(ip("2001:db8:1:2::1")).is_ok());
        assert!(limits.check_client(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")).is_err(), "the same /64");
        assert!(limits.check_client(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        let keys = ClientKeys { ipv6_prefix: 48, ..ClientKeys::DEFAULT };
        assert_eq!(keys.key("2001:db8:1:2::1".parse().unwrap()), "2001:db8:1::".parse::<IpAddr>().unwrap());
        assert_eq!(keys.key("203.0.113.9".parse().unwrap()), "203.0.113.9".parse::<IpAddr>().unwrap());
        let whole = ClientKeys { ipv6_prefix: 128, ..ClientKeys::DEFAULT };
        assert_eq!(whole.key("2001:db8::7".parse().unwrap()), "2001:db8::7".parse::<IpAddr>().unwrap());
    }

    /// A client cycling through addresses cannot grow the limiter past its
    /// bound: once full, new addresses share one rate.
    #[test]
    fn the_limiter_remembers_a_bounded_number_of_networks() {
        // One call a minute: no address recovers while the test runs, however slow.
        let quota = Quota::per_minute(std::num::NonZeroU32::MIN);
        let keys = ClientKeys { ipv6_prefix: 64, max_addresses: 3 };
        let limits = AbuseLimits::new(None, Some(quota), keys, Vec::new(), 0);
        for n in 0..3u8 {
            assert!(limits.check_client(Some(IpAddr::from([198, 51, 100, n]))).is_ok());
        }
        assert!(limits.check_client(ip("203.0.113.1")).is_ok(), "the first past the bound, on the shared rate");
        assert!(limits.check_client(ip("203.0.113.2")).is_err(), "the shared rate is spent");
        let tracked = limits.per_client.as_ref().map(|limiter| limiter.len()).unwrap_or_default();
        assert!(tracked <= 4, "{tracked} keys kept: the bound and the shared one");
    }
}
