//! Building and running the gateway: check the configuration, connect to Redis
//! and RabbitMQ, bind (port 0 works), then serve while the order-event consumer
//! and the catalog refresher run beside it.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flashsale_messaging::Topology;
use flashsale_proto::gateway::v1::admin_service_server::AdminServiceServer;
use flashsale_proto::gateway::v1::flash_sale_gateway_server::FlashSaleGatewayServer;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tracing::Instrument;

use crate::admission::Admission;
use crate::api::Operations;
use crate::auth::Authenticator;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::grpc::GatewayGrpc;
use crate::order_events::OrderEvents;
use crate::order_publisher::OrderPublisher;
use crate::purchase::Purchases;
use crate::rest::{RestState, SignIn};
use crate::upstream::Upstreams;

/// How often, at most, admissions inventory never recorded are looked for
/// (a quarter of `UNRECORDED_GRACE_MS` when that is shorter).
const STRANDED_CHECK: Duration = Duration::from_secs(15);

/// Shortest accepted HS256 secret (RFC 7518 §3.2: at least the hash size).
const MIN_SECRET_BYTES: usize = 32;

pub struct Application {
    listener: TcpListener,
    port: u16,
    http_listener: TcpListener,
    http_port: u16,
    metrics: flashsale_server::MetricsEndpoint,
    api: Arc<Operations>,
    config: Config,
    tls: Option<flashsale_server::MutualTls>,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let auth = authenticator(config)?;
        let tls = flashsale_server::MutualTls::load(&config.tls)?;
        if let Some(tls) = &tls {
            // Renewed certificates and CA take effect without a restart.
            tls.watch();
        }
        let upstreams = Upstreams::new(&config.inventory_url, &config.wallet_url, tls.as_ref())
            .context("INVENTORY_URL or WALLET_URL")?;
        let admission = Arc::new(
            Admission::connect(&config.redis_urls(), config.redis_cluster, &config.redis_key_prefix)
                .await
                .context("connecting to Redis")?,
        );
        let topology = Topology::with_prefix(&config.amqp_prefix);
        let publisher = Arc::new(OrderPublisher::new(
            config.amqp_addr.clone(),
            topology,
            Duration::from_millis(config.publish_timeout_ms),
        ));
        publisher.warm_up().await.context("connecting to RabbitMQ")?;
        let catalog = Arc::new(Catalog::new(upstreams.clone()));
        let (watchers, _) = broadcast::channel(4096);
        let limits = Arc::new(crate::abuse::AbuseLimits::new(
            config.purchase_quota(),
            config.client_quota(),
            config.client_keys(),
            config.trusted_proxy_networks()?,
            config.watch_streams_per_buyer,
        ));
        let api = Arc::new(Operations {
            auth,
            purchases: Arc::new(Purchases::new(
                catalog.clone(),
                admission,
                publisher,
                upstreams.clone(),
                limits.clone(),
                config.purchase_hold_ttl_seconds,
            )),
            catalog,
            upstreams,
            watchers,
            audit: Arc::new(
                crate::audit::AuditLog::open(&config.audit_log)
                    .with_context(|| format!("opening the audit log {}", config.audit_log))?,
            ),
            limits,
        });
        let listener =
            TcpListener::bind(config.listen_addr).await.with_context(|| format!("binding {}", config.listen_addr))?;
        let port = listener.local_addr()?.port();
        let http_listener =
            TcpListener::bind(config.http_addr).await.with_context(|| format!("binding {}", config.http_addr))?;
        let http_port = http_listener.local_addr()?.port();
        let mut metrics = flashsale_server::MetricsEndpoint::bind(config.metrics_addr).await?;
        // Exported from the start (the recorder exists now), so a dashboard or
        // alert naming them finds them before the first unit comes back or the
        // first hold is left to expire.
        metrics::counter!("flashsale_units_returned_total", "after_sold_out" => "true").increment(0);
        metrics::counter!("flashsale_purchase_holds_released_total", "outcome" => "left_to_expire").increment(0);
        let scraped = api.purchases.admission.clone();
        metrics.collect(move || scraped.record_pool_state());
        Ok(Self { listener, port, http_listener, http_port, metrics, api, config: config.clone(), tls })
    }

    /// The certificates this service uses for mutual TLS, kept current with
    /// their files (`None` without mutual TLS).
    pub fn mutual_tls(&self) -> Option<flashsale_server::MutualTls> {
        self.tls.clone()
    }

    /// The gRPC port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the Prometheus `/metrics` endpoint.
    pub fn metrics_port(&self) -> u16 {
        self.metrics.port()
    }

    /// The HTTP port (REST, storefront, OpenAPI, health).
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let config = self.config;
        let api = self.api;
        let grpc = GatewayGrpc { api: api.clone() };
        let background = CancellationToken::new();
        let retention = Duration::from_millis(config.sale_state_retention_ms);
        if let Err(e) = api
            .catalog
            .refresh(retention)
            .instrument(flashsale_telemetry::unrecorded_span("initial catalog load"))
            .await
        {
            tracing::warn!(error = %e, "initial catalog load failed; items load on first use");
        }
        let events = OrderEvents {
            amqp_addr: config.amqp_addr.clone(),
            topology: Topology::with_prefix(&config.amqp_prefix),
            admission: api.purchases.admission.clone(),
            catalog: api.catalog.clone(),
            watchers: api.watchers.clone(),
        };
        if let Some(keys) = api.auth.key_set() {
            // Keys fetched now and every few minutes (and on an unknown kid, within the bound).
            tokio::spawn(keys.run_refresher(background.clone()));
        }
        let admission = api.purchases.admission.clone();
        let reconciler = {
            let limits = api.limits.clone();
            let reconciler = crate::reconciler::Reconciler::new(
                api.catalog.clone(),
                api.purchases.admission.clone(),
                api.purchases.publisher.clone(),
                api.purchases.upstreams.clone(),
            );
            let shutdown = background.clone();
            let grace = Duration::from_millis(config.unrecorded_grace_ms);
            async move {
                let mut ticker = tokio::time::interval((grace / 4).min(STRANDED_CHECK));
                loop {
                    tokio::select! {
                        _ = ticker.tick() => {}
                        () = shutdown.cancelled() => return,
                    }
                    limits.forget_idle();
                    let span = flashsale_telemetry::unrecorded_span("unrecorded-admission check");
                    match reconciler.reconcile(grace).instrument(span).await {
                        Ok(done) if done.failed > 0 => {
                            tracing::debug!(failed = done.failed, "some admissions could not be reconciled this pass")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "reconciler pass failed"),
                    }
                }
            }
        };
        let metrics_port = self.metrics.port();
        let tasks = [
            self.metrics.spawn(background.clone()),
            tokio::spawn(api.purchases.publisher.clone().run_reconnector(background.clone())),
            tokio::spawn(api.purchases.publisher.clone().run_republisher(background.clone())),
            tokio::spawn(reconciler),
            tokio::spawn(events.run(background.clone())),
            tokio::spawn(api.catalog.clone().run_refresher(
                Duration::from_millis(config.catalog_refresh_ms),
                retention,
                background.clone(),
                move |catalog| {
                    let admission = admission.clone();
                    async move {
                        // `flashsale_redis_up`: 1 when Redis answered this second's ping.
                        let up = admission.ping().await.is_ok();
                        metrics::gauge!("flashsale_redis_up").set(if up { 1.0 } else { 0.0 });
                        clear_stale_sold_out_flags(&catalog, &admission).await;
                        expire_ended_sales(&catalog, &admission, retention).await;
                    }
                },
            )),
        ];

        let (mut health, router) = flashsale_server::standard_router(
            flashsale_server::Exposure::Public,
            flashsale_server::MAX_CONNECTION_AGE,
            crate::PUBLIC_PROTO_FILES,
            // Buyers' port: plaintext here (TLS ends at the ingress or the mesh).
            None,
        )?;
        health.track(<FlashSaleGatewayServer<GatewayGrpc> as NamedService>::NAME);
        health.track(<AdminServiceServer<GatewayGrpc> as NamedService>::NAME);
        let buyers = FlashSaleGatewayServer::new(grpc.clone())
            .max_decoding_message_size(flashsale_server::MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(flashsale_server::MAX_ENCODING_MESSAGE_SIZE);
        let admins = AdminServiceServer::new(grpc.clone())
            .max_decoding_message_size(flashsale_server::MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(flashsale_server::MAX_ENCODING_MESSAGE_SIZE);
        let router = router.add_service(buyers).add_service(admins);
        let grace = config.shutdown_grace();

        // REST and the storefront: stop accepting when shutdown begins, then give
        // open requests (server-sent event streams included) the grace period.
        let stopping = CancellationToken::new();
        let sign_in =
            match (config.dev_tokens, api.auth.key_set(), crate::config::given(config.oidc.client_id.as_ref())) {
                (true, _, _) => SignIn::Development,
                (false, Some(keys), Some(client_id)) => SignIn::Provider { client_id: Arc::from(client_id), keys },
                _ => SignIn::PastedToken,
            };
        let rest = crate::rest::router(RestState {
            api: api.clone(),
            dev_token_secret: config.dev_tokens.then(|| Arc::from(secret_of(&config))),
            sign_in,
            stopping: stopping.clone(),
        });
        let http = {
            let stopping = stopping.clone();
            let listener = self.http_listener;
            tokio::spawn(async move {
                // The peer's address reaches the handlers (the per-client limit).
                let rest = rest.into_make_service_with_connect_info::<std::net::SocketAddr>();
                let served = axum::serve(listener, rest).with_graceful_shutdown(stopping.clone().cancelled_owned());
                let mut served = std::pin::pin!(served.into_future());
                let outcome = tokio::select! {
                    outcome = &mut served => Some(outcome),
                    // The grace period starts when shutdown does.
                    () = stopping.cancelled() => tokio::time::timeout(grace, &mut served).await.ok(),
                };
                match outcome {
                    Some(Ok(())) => {}
                    Some(Err(e)) => tracing::error!(error = %e, "HTTP server failed"),
                    None => {
                        tracing::warn!("HTTP connections still open after the grace period; no longer waiting for them")
                    }
                }
            })
        };
        if config.dev_tokens {
            tracing::warn!("DEV_TOKENS is on: POST /v1/dev/token signs a token for any user name");
        }

        tracing::info!(port = self.port, http_port = self.http_port, metrics_port, "gateway serving gRPC and HTTP");
        let listener = self.listener;
        let shutdown = {
            let stopping = stopping.clone();
            async move {
                shutdown.await;
                stopping.cancel();
            }
        };
        let served = flashsale_server::serve_until_stopped(health, shutdown, grace, |stop| {
            router.serve_with_incoming_shutdown(flashsale_server::incoming(listener), stop)
        })
        .await;
        stopping.cancel();
        if let Err(e) = http.await {
            tracing::error!(error = %e, "HTTP server task failed");
        }
        background.cancel();
        if tokio::time::timeout(grace, futures::future::join_all(tasks)).await.is_err() {
            tracing::warn!("background tasks did not stop within the grace period");
        }
        api.purchases.publisher.close().await;
        served?;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// How tokens are checked: an OpenID Connect provider's keys, or (development)
/// the HS256 secret. The configuration is refused where it would mix the two,
/// or let development tokens out.
fn authenticator(config: &Config) -> anyhow::Result<Authenticator> {
    if config.oidc.enabled() {
        anyhow::ensure!(
            crate::config::given(config.jwt_secret.as_ref()).is_none(),
            "JWT_SECRET and OIDC_ISSUER exclude each other: with OIDC only the provider's tokens are accepted"
        );
        anyhow::ensure!(!config.dev_tokens, "DEV_TOKENS needs JWT_SECRET, which OIDC_ISSUER excludes");
        anyhow::ensure!(
            config.jwt_issuer.is_none() && config.jwt_audience.is_none(),
            "with OIDC_ISSUER, set the audience as OIDC_AUDIENCE (JWT_ISSUER and JWT_AUDIENCE are for HS256 tokens)"
        );
        return Ok(Authenticator::oidc(crate::auth::oidc::KeySet::new(&config.oidc)?));
    }
    let secret = config.jwt_secret.as_deref().context("JWT_SECRET (development) or OIDC_ISSUER is required")?;
    if config.dev_tokens {
        // Development sign-in mints tokens, admin ones included, for anyone who
        // can reach the port: only ever on this machine's loopback.
        anyhow::ensure!(
            config.listens_on_loopback_only(),
            "DEV_TOKENS needs GATEWAY_LISTEN_ADDR and GATEWAY_HTTP_ADDR on a loopback address (it signs \
             tokens for anyone)"
        );
        anyhow::ensure!(
            config.jwt_issuer.is_none() && config.jwt_audience.is_none(),
            "DEV_TOKENS cannot be combined with JWT_ISSUER or JWT_AUDIENCE (development tokens carry neither)"
        );
    }
    anyhow::ensure!(secret.len() >= MIN_SECRET_BYTES, "JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes");
    Ok(Authenticator::new(secret, config.jwt_issuer.as_deref(), config.jwt_audience.as_deref()))
}

fn secret_of(config: &Config) -> &str {
    config.jwt_secret.as_deref().unwrap_or_default()
}

/// A sold-out flag is a cache of Redis's answer. Clear it when Redis offers
/// units again, or when the item's state is gone (the next attempt rebuilds it);
/// while it stays, forget key holders Redis has admitted past.
/// When PostgreSQL still has units that Redis no longer offers and nothing is in
/// flight, bring Redis back up to PostgreSQL first.
async fn clear_stale_sold_out_flags(catalog: &Catalog, admission: &Admission) {
    for item in catalog.sold_out_items() {
        let remaining = item.pg_remaining.load(std::sync::atomic::Ordering::Relaxed);
        if remaining > 0 {
            match admission.resync(item.spread(), remaining).await {
                Ok(0) => {}
                Ok(added) => tracing::warn!(
                    item.id = %item.id,
                    tokens.added = added,
                    "Redis offered fewer units than PostgreSQL has; resynced"
                ),
                Err(e) => tracing::debug!(error = %e, item.id = %item.id, "resync failed"),
            }
        }
        match admission.sold_out_check(item.spread()).await {
            Ok(Some((tokens, stamp))) if tokens <= 0 => item.sold_out.check_stamp(stamp),
            Ok(_) => item.clear_sold_out(),
            Err(e) => tracing::debug!(error = %e, item.id = %item.id, "sold-out check failed"),
        }
    }
}

/// The longest wait between two passes that set the expiry of an ended sale's
/// keys (shorter when the retention is: at least two passes per retention).
const EXPIRY_PASS_EVERY_MS: i64 = 60_000;

/// Sets the expiry of the Redis keys of every sale that has ended: they live
/// `retention` past the end, then Redis drops them, so per-item state stays
/// bounded by the live sales. The pass is repeated while the catalog keeps the
/// sale, so a key first written after the previous pass (a late refund's
/// event, a republish claim) expires with the others.
async fn expire_ended_sales(catalog: &Catalog, admission: &Admission, retention: Duration) {
    use std::sync::atomic::Ordering;
    let now = flashsale_domain::time::now_ms();
    let keep = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let every = EXPIRY_PASS_EVERY_MS.min(keep / 2);
    for item in catalog.all() {
        let set_at = item.keys_expiry_set_at_ms.load(Ordering::Acquire);
        if item.ends_at_ms > now || (set_at > 0 && now - set_at < every) {
            continue;
        }
        match admission.expire_item(item.spread(), item.ends_at_ms.saturating_add(keep)).await {
            Ok(()) => item.keys_expiry_set_at_ms.store(now, Ordering::Release),
            Err(e) => {
                tracing::debug!(error = %e, item.id = %item.id, "could not set the expiry of an ended sale's keys")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_oidc() -> Config {
        let mut config = Config::for_tests("http://127.0.0.1:1", "http://127.0.0.1:2", "fs", "fs", "x".repeat(32));
        config.oidc.issuer = Some("https://idp.example/".into());
        config.oidc.audience = Some("api".into());
        config
    }

    #[tokio::test]
    async fn oidc_refuses_the_development_secret_and_tokens_and_needs_an_audience() {
        let refused = |config: &Config| authenticator(config).err().map(|e| e.to_string()).unwrap_or_default();
        let mut config = with_oidc();
        config.dev_tokens = false;
        assert!(refused(&config).contains("JWT_SECRET and OIDC_ISSUER exclude each other"), "{}", refused(&config));
        config.jwt_secret = None;
        config.dev_tokens = true;
        assert!(refused(&config).contains("DEV_TOKENS"), "{}", refused(&config));
        config.dev_tokens = false;
        config.oidc.audience = Some(" ".into());
        assert!(refused(&config).contains("OIDC_AUDIENCE is required"), "{}", refused(&config));
        config.oidc.audience = Some("api".into());
        let auth = authenticator(&config).map_err(|e| e.to_string());
        assert!(auth.as_ref().is_ok_and(|auth| auth.key_set().is_some()), "{:?}", auth.err());
        // An empty issuer (a blank ConfigMap entry) is no OIDC: the secret is needed then.
        config.oidc.issuer = Some(String::new());
        assert!(
            refused(&config).contains("JWT_SECRET (development) or OIDC_ISSUER is required"),
            "{}",
            refused(&config)
        );
    }
}
