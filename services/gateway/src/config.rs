//! The gateway's configuration, from flags or environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Gateway settings. Secrets (the JWT secret, URLs with passwords) are never printed.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "GATEWAY_LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    pub listen_addr: SocketAddr,
    /// Address of the admin endpoint serving Prometheus `/metrics` (port 0 picks a free port).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,
    /// Address of the HTTP server: REST/JSON, the storefront, /openapi.json, /docs, /healthz, /readyz.
    #[arg(long, env = "GATEWAY_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Serve `POST /v1/dev/token`, which signs a token for any user name. Development only.
    #[arg(long, env = "DEV_TOKENS", default_value_t = false)]
    pub dev_tokens: bool,
    /// The inventory's gRPC URL.
    #[arg(long, env = "INVENTORY_URL", default_value = "http://127.0.0.1:50052")]
    pub inventory_url: String,
    /// The wallet's gRPC URL.
    #[arg(long, env = "WALLET_URL", default_value = "http://127.0.0.1:50053")]
    pub wallet_url: String,
    /// Redis URL; with `REDIS_CLUSTER`, comma-separated URLs of some of the
    /// cluster's nodes (the rest is discovered).
    #[arg(long, env = "REDIS_URL", hide_env_values = true, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// `REDIS_URL` names nodes of a Redis Cluster.
    #[arg(long, env = "REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,
    /// Prefix of every Redis key this suite uses.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "fs")]
    pub redis_key_prefix: String,
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_ADDR", hide_env_values = true, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_addr: String,
    /// Prefix of every queue and exchange name (one suite per prefix).
    #[arg(long, env = "AMQP_PREFIX", default_value = "flashsale")]
    pub amqp_prefix: String,
    /// HS256 secret that signs buyers' and operators' tokens (at least 32
    /// bytes); development sign-in. Refused together with `OIDC_ISSUER`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    #[command(flatten)]
    pub oidc: OidcConfig,
    /// Mutual TLS towards inventory and wallet (off when unset; their URLs are then https://).
    #[command(flatten)]
    pub tls: flashsale_server::TlsArgs,
    /// Required `iss` claim, if set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, if set.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// How long a purchase waits for the broker's confirm before answering UNAVAILABLE.
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(10..))]
    pub publish_timeout_ms: u64,
    /// Purchase attempts per second each buyer may make past the local checks
    /// (sustained; 0 turns the limit off). Excess attempts get RATE_LIMITED.
    #[arg(long, env = "PURCHASE_RATE_PER_SECOND", default_value_t = 5)]
    pub purchase_rate_per_second: u32,
    /// Attempts a buyer may make at once before the per-second rate applies.
    #[arg(long, env = "PURCHASE_BURST", default_value_t = 10)]
    pub purchase_burst: u32,
    /// API calls per second from one client address (sustained; 0 turns the
    /// limit off). Buyers behind one NAT share it: size it for the largest.
    #[arg(long, env = "CLIENT_RATE_PER_SECOND", default_value_t = 100)]
    pub client_rate_per_second: u32,
    /// Calls one client address may make at once before its rate applies.
    #[arg(long, env = "CLIENT_BURST", default_value_t = 200)]
    pub client_burst: u32,
    /// IPv6 clients count against the per-address limit by their network of
    /// this many leading bits (a client usually holds a whole /64).
    #[arg(long, env = "CLIENT_IPV6_PREFIX", default_value_t = 64, value_parser = clap::value_parser!(u8).range(1..=128))]
    pub client_ipv6_prefix: u8,
    /// The most client addresses (networks) the per-address limit remembers;
    /// past it, new addresses share one rate until the idle ones are forgotten.
    #[arg(long, env = "CLIENT_ADDRESSES_MAX", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_addresses_max: u64,
    /// Proxies (addresses or CIDRs, comma-separated) whose `X-Forwarded-For`
    /// names the client; from any other peer the header is ignored.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// Where the audit log of admin actions goes: `-` for stderr (application
    /// logs are on stdout), or a file to append to.
    #[arg(long, env = "AUDIT_LOG", default_value = "-")]
    pub audit_log: String,
    /// Concurrent WatchOrder streams (gRPC and REST) one buyer may hold (0: no limit).
    #[arg(long, env = "WATCH_STREAMS_PER_BUYER", default_value_t = 8)]
    pub watch_streams_per_buyer: u32,
    /// How often the local item cache is refreshed from inventory.
    #[arg(long, env = "CATALOG_REFRESH_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub catalog_refresh_ms: u64,
    /// Seconds in-flight calls get to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
    /// An admission inventory has not recorded after this long is published
    /// again (its first publish died with the gateway or had no confirm).
    #[arg(long, env = "UNRECORDED_GRACE_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub unrecorded_grace_ms: u64,
    /// How long after a sale ends its item stays in the catalog and its Redis
    /// admission keys live (retries of accepted orders are answered from them).
    #[arg(long, env = "SALE_STATE_RETENTION_MS", default_value_t = 86_400_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub sale_state_retention_ms: u64,
    /// How long the funds a purchase holds at admission stay held if its
    /// order is never settled (a crash, a queue far behind): well above the
    /// queue's wait and `UNRECORDED_GRACE_MS`, since an order settled after its
    /// hold expired is charged only if the buyer's money is still there.
    #[arg(long, env = "PURCHASE_HOLD_TTL_SECONDS", default_value_t = 900, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub purchase_hold_ttl_seconds: u32,
}

/// Sign-in through an OpenID Connect provider (Auth0, Okta, Keycloak, …):
/// RS256 or ES256 tokens checked against the keys it publishes.
#[derive(Debug, Clone, clap::Args)]
pub struct OidcConfig {
    /// The provider's issuer, exactly as its tokens' `iss` claim says it
    /// (Auth0: `https://<tenant>.auth0.com/`). Turns OIDC on; keys are
    /// discovered from `<issuer>/.well-known/openid-configuration`.
    #[arg(long = "oidc-issuer", env = "OIDC_ISSUER")]
    pub issuer: Option<String>,
    /// The audience tokens must be issued for (Auth0: the API identifier). Required with OIDC.
    #[arg(long = "oidc-audience", env = "OIDC_AUDIENCE")]
    pub audience: Option<String>,
    /// The key set's URL, instead of the one discovery names.
    #[arg(long = "oidc-jwks-url", env = "OIDC_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// A file holding the key set, instead of fetching it.
    #[arg(long = "oidc-jwks-file", env = "OIDC_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// The claim listing the caller's roles; "admin" among them opens the admin
    /// API (Auth0 puts roles in a namespaced claim, set by an Action).
    #[arg(long = "oidc-roles-claim", env = "OIDC_ROLES_CLAIM", default_value = "roles")]
    pub roles_claim: String,
    /// A token with an unknown `kid` makes the key set be fetched again at most
    /// once per this long.
    #[arg(long = "oidc-jwks-min-refetch-ms", env = "OIDC_JWKS_MIN_REFETCH_MS", default_value_t = 10_000)]
    pub jwks_min_refetch_ms: u64,
    /// The storefront's client id at the provider (a public client: no
    /// secret). Set, the storefront signs buyers in with the authorization-code
    /// flow with PKCE; unset, it asks for a pasted token.
    #[arg(long = "oidc-client-id", env = "OIDC_CLIENT_ID")]
    pub client_id: Option<String>,
}

impl OidcConfig {
    /// OIDC off (development tokens).
    pub fn off() -> Self {
        Self {
            issuer: None,
            audience: None,
            jwks_url: None,
            jwks_file: None,
            roles_claim: "roles".into(),
            jwks_min_refetch_ms: 10_000,
            client_id: None,
        }
    }

    /// Whether OIDC is on: an issuer is set (an empty value, as a blank
    /// ConfigMap entry gives, is none).
    pub fn enabled(&self) -> bool {
        given(self.issuer.as_ref()).is_some()
    }
}

/// A setting's value, if it is set and not empty.
pub fn given(value: Option<&String>) -> Option<&str> {
    value.map(String::as_str).filter(|v| !v.trim().is_empty())
}

impl Config {
    /// The URLs of `REDIS_URL` (several only for a cluster).
    pub fn redis_urls(&self) -> Vec<&str> {
        self.redis_url.split(',').map(str::trim).filter(|url| !url.is_empty()).collect()
    }

    /// Whether this gateway listens on this machine's loopback only (gRPC and
    /// HTTP). Development tokens, which anyone who reaches the gateway could
    /// ask for, exist only then: the `/v1/dev/token` route (`DEV_TOKENS`) and
    /// admin tokens from `flashsale-gateway token`, whose settings are read
    /// from the same environment as the server's.
    pub fn listens_on_loopback_only(&self) -> bool {
        self.listen_addr.ip().is_loopback() && self.http_addr.ip().is_loopback()
    }

    /// Settings for tests: a free local port and the given neighbours and names.
    pub fn for_tests(
        inventory_url: impl Into<String>,
        wallet_url: impl Into<String>,
        redis_key_prefix: impl Into<String>,
        amqp_prefix: impl Into<String>,
        jwt_secret: impl Into<String>,
    ) -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dev_tokens: true,
            inventory_url: inventory_url.into(),
            wallet_url: wallet_url.into(),
            redis_url: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            redis_cluster: false,
            redis_key_prefix: redis_key_prefix.into(),
            amqp_addr: std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            amqp_prefix: amqp_prefix.into(),
            jwt_secret: Some(jwt_secret.into()),
            oidc: OidcConfig::off(),
            tls: flashsale_server::TlsArgs::default(),
            jwt_issuer: None,
            jwt_audience: None,
            publish_timeout_ms: 3000,
            catalog_refresh_ms: 200,
            // Off: storms replay many attempts per buyer on purpose; the rate-limit test turns it on.
            purchase_rate_per_second: 0,
            purchase_burst: 10,
            // Off: every test client shares 127.0.0.1; the abuse test turns it on.
            client_rate_per_second: 0,
            client_burst: 200,
            client_ipv6_prefix: 64,
            client_addresses_max: 100_000,
            trusted_proxies: String::new(),
            watch_streams_per_buyer: 8,
            // Tests would print every admin action; the audit-log test names a file.
            audit_log: "/dev/null".into(),
            shutdown_grace_seconds: 5,
            unrecorded_grace_ms: 60_000,
            sale_state_retention_ms: 86_400_000,
            purchase_hold_ttl_seconds: 900,
        }
    }

    /// `TRUSTED_PROXIES` as networks (an address is a network of one).
    pub fn trusted_proxy_networks(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        self.trusted_proxies
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| anyhow::anyhow!("TRUSTED_PROXIES: {entry:?} is neither an address nor a CIDR network"))
            })
            .collect()
    }

    /// The per-client-address quota, if any.
    pub fn client_quota(&self) -> Option<governor::Quota> {
        quota(self.client_rate_per_second, self.client_burst)
    }

    /// How the per-client-address limit counts addresses.
    pub fn client_keys(&self) -> crate::abuse::ClientKeys {
        crate::abuse::ClientKeys {
            ipv6_prefix: self.client_ipv6_prefix,
            max_addresses: usize::try_from(self.client_addresses_max).unwrap_or(usize::MAX),
        }
    }

    /// The per-buyer purchase quota, if any.
    pub fn purchase_quota(&self) -> Option<governor::Quota> {
        quota(self.purchase_rate_per_second, self.purchase_burst)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }
}

/// `rate` calls a second with bursts of `burst` (at least `rate`'s worth when
/// 0); `None` when `rate` is 0, which turns the limit off.
fn quota(rate: u32, burst: u32) -> Option<governor::Quota> {
    let rate = std::num::NonZeroU32::new(rate)?;
    let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
    Some(governor::Quota::per_second(rate).allow_burst(burst))
}
