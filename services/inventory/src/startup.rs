//! Building and running the inventory: migrate, bind (port 0 works), then serve
//! gRPC while the order consumer, the outbox relay and the payment sweeper run
//! beside it; on shutdown all of them stop within the grace period.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flashsale_db::{PgPool, PoolOptions};
use flashsale_messaging::Topology;
use flashsale_proto::inventory::v1::inventory_service_server::InventoryServiceServer;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;

use crate::config::Config;
use crate::db::MIGRATIONS;
use crate::grpc::InventoryGrpc;
use crate::order_consumer::{ConsumerOptions, OrderConsumer};
use crate::outbox_relay::OutboxRelay;
use crate::settlement::Settlement;
use crate::wallet_client::WalletClient;

pub struct Application {
    listener: TcpListener,
    port: u16,
    metrics: flashsale_server::MetricsEndpoint,
    pool: PgPool,
    crowd: flashsale_db::Lane,
    wallet: WalletClient,
    config: Config,
    tls: Option<flashsale_server::MutualTls>,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        flashsale_db::run_migrations(&config.database_url, MIGRATIONS)
            .await
            .context("migrating the inventory database")?;
        let options = PoolOptions { max_size: config.db_pool_size, ..PoolOptions::default() };
        let pool = flashsale_db::build_pool(&config.database_url, &options);
        // Buyers' reads take at most this share, so recording and settling
        // orders always find a connection however often buyers poll.
        let crowd = flashsale_db::Lane::for_crowd(&pool, &options);
        let tls = flashsale_server::MutualTls::load(&config.tls)?;
        if let Some(tls) = &tls {
            // Renewed certificates and CA take effect without a restart.
            tls.watch();
        }
        let wallet =
            WalletClient::new(&config.wallet_url, Duration::from_millis(config.wallet_timeout_ms), tls.as_ref())
                .context("WALLET_URL")?;
        let listener =
            TcpListener::bind(config.listen_addr).await.with_context(|| format!("binding {}", config.listen_addr))?;
        let port = listener.local_addr()?.port();
        let mut metrics = flashsale_server::MetricsEndpoint::bind(config.metrics_addr).await?;
        let (scraped_pool, max_size) = (pool.clone(), config.db_pool_size);
        metrics.collect(move || flashsale_db::record_pool_state(&scraped_pool, max_size));
        Ok(Self { listener, port, metrics, pool, crowd, wallet, config: config.clone(), tls })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The certificates this service uses for mutual TLS, kept current with
    /// their files (`None` without mutual TLS).
    pub fn mutual_tls(&self) -> Option<flashsale_server::MutualTls> {
        self.tls.clone()
    }

    /// The port of the Prometheus `/metrics` endpoint.
    pub fn metrics_port(&self) -> u16 {
        self.metrics.port()
    }

    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let config = self.config;
        let topology = Topology::with_prefix(&config.amqp_prefix);
        let outbox_ready = Arc::new(Notify::new());
        let background = CancellationToken::new();

        let settlement = Settlement::new(self.pool.clone(), self.wallet.clone(), outbox_ready.clone());
        let api_settlement = settlement.clone();
        let consumer = OrderConsumer::new(
            self.pool.clone(),
            settlement.clone(),
            outbox_ready.clone(),
            ConsumerOptions {
                amqp_addr: config.amqp_addr.clone(),
                topology: topology.clone(),
                prefetch: config.consumer_prefetch,
                concurrency: config.consumer_concurrency as usize,
            },
        );
        let relay = OutboxRelay {
            pool: self.pool.clone(),
            amqp_addr: config.amqp_addr.clone(),
            topology,
            ready: outbox_ready.clone(),
        };
        let metrics_port = self.metrics.port();
        let metrics = self.metrics.spawn(background.clone());
        let tasks = [
            metrics,
            tokio::spawn(consumer.run(background.clone())),
            tokio::spawn(relay.run(background.clone())),
            tokio::spawn(settlement.run_sweeper(Duration::from_millis(config.sweep_interval_ms), background.clone())),
        ];

        let (mut health, router) = flashsale_server::standard_router(
            flashsale_server::Exposure::Internal,
            Duration::from_millis(config.max_connection_age_ms),
            &["flashsale/inventory/v1/inventory.proto"],
            self.tls.as_ref().map(|tls| flashsale_server::InternalTls { tls, callers: &crate::grpc::CALLERS }),
        )?;
        health.track(<InventoryServiceServer<InventoryGrpc> as NamedService>::NAME);
        let inventory = InventoryServiceServer::new(InventoryGrpc::new(self.pool, self.crowd, api_settlement))
            .max_decoding_message_size(flashsale_server::MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(flashsale_server::MAX_ENCODING_MESSAGE_SIZE);
        let router = router.add_service(inventory);
        tracing::info!(port = self.port, metrics_port, "inventory serving gRPC");
        let listener = self.listener;
        let grace = config.shutdown_grace();
        let served = flashsale_server::serve_until_stopped(health, shutdown, grace, |stop| {
            flashsale_server::serve_internal(router, listener, self.tls.as_ref(), stop)
        })
        .await;

        background.cancel();
        if tokio::time::timeout(grace, futures::future::join_all(tasks)).await.is_err() {
            tracing::warn!("background tasks did not stop within the grace period");
        }
        served?;
        tracing::info!("inventory stopped");
        Ok(())
    }
}
