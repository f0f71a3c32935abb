//! Building and running the wallet: migrate, bind (port 0 works), serve until told to stop.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use flashsale_db::{PgPool, PoolOptions};
use flashsale_proto::wallet::v1::wallet_service_server::WalletServiceServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;

use crate::config::Config;
use crate::db::MIGRATIONS;
use crate::grpc::WalletGrpc;

/// A wallet that has migrated its database and bound its port, ready to serve.
pub struct Application {
    listener: TcpListener,
    port: u16,
    metrics: flashsale_server::MetricsEndpoint,
    pool: PgPool,
    crowd: flashsale_db::Lane,
    grace: Duration,
    tls: Option<flashsale_server::MutualTls>,
    sweep_every: Duration,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let tls = flashsale_server::MutualTls::load(&config.tls)?;
        if let Some(tls) = &tls {
            // Renewed certificates and CA take effect without a restart.
            tls.watch();
        }
        flashsale_db::run_migrations(&config.database_url, MIGRATIONS)
            .await
            .context("migrating the wallet database")?;
        let options = PoolOptions { max_size: config.db_pool_size, ..PoolOptions::default() };
        let pool = flashsale_db::build_pool(&config.database_url, &options);
        // Holds and buyers' reads take at most this share, so settlement
        // (captures, debits) always finds a connection under a crowd.
        let crowd = flashsale_db::Lane::for_crowd(&pool, &options);
        let listener =
            TcpListener::bind(config.listen_addr).await.with_context(|| format!("binding {}", config.listen_addr))?;
        let port = listener.local_addr()?.port();
        let mut metrics = flashsale_server::MetricsEndpoint::bind(config.metrics_addr).await?;
        let (scraped_pool, max_size) = (pool.clone(), config.db_pool_size);
        metrics.collect(move || flashsale_db::record_pool_state(&scraped_pool, max_size));
        Ok(Self {
            listener,
            port,
            metrics,
            pool,
            crowd,
            grace: config.shutdown_grace(),
            tls,
            sweep_every: Duration::from_millis(config.hold_sweep_interval_ms),
        })
    }

    /// The certificates this service uses for mutual TLS, kept current with
    /// their files (`None` without mutual TLS).
    pub fn mutual_tls(&self) -> Option<flashsale_server::MutualTls> {
        self.tls.clone()
    }

    /// The port actually bound (useful when the configured port was 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the Prometheus `/metrics` endpoint.
    pub fn metrics_port(&self) -> u16 {
        self.metrics.port()
    }

    /// Serves until `shutdown` resolves, then drains within the grace period.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (mut health, router) = flashsale_server::standard_router(
            flashsale_server::Exposure::Internal,
            flashsale_server::MAX_CONNECTION_AGE,
            &["flashsale/wallet/v1/wallet.proto"],
            self.tls.as_ref().map(|tls| flashsale_server::InternalTls { tls, callers: &crate::grpc::CALLERS }),
        )?;
        health.track(<WalletServiceServer<WalletGrpc> as NamedService>::NAME);
        let metrics_stop = tokio_util::sync::CancellationToken::new();
        let sweeper = tokio::spawn(sweep_expired_holds(self.pool.clone(), self.sweep_every, metrics_stop.clone()));
        let wallet = WalletServiceServer::new(WalletGrpc::new(self.pool, self.crowd))
            .max_decoding_message_size(flashsale_server::MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(flashsale_server::MAX_ENCODING_MESSAGE_SIZE);
        let router = router.add_service(wallet);
        tracing::info!(port = self.port, metrics_port = self.metrics.port(), "wallet serving gRPC");
        let metrics = self.metrics.spawn(metrics_stop.clone());
        let listener = self.listener;
        let served = flashsale_server::serve_until_stopped(health, shutdown, self.grace, |stop| {
            flashsale_server::serve_internal(router, listener, self.tls.as_ref(), stop)
        })
        .await;
        metrics_stop.cancel();
        let _ = metrics.await;
        let _ = sweeper.await;
        served?;
        tracing::info!("wallet stopped");
        Ok(())
    }
}

/// Releases expired holds every `every` until `stop`: up to 500 per
/// transaction, as many transactions as it takes. Several wallets may sweep
/// at once; each takes holds the others have not locked.
async fn sweep_expired_holds(pool: flashsale_db::PgPool, every: Duration, stop: tokio_util::sync::CancellationToken) {
    const PER_TRANSACTION: i64 = 500;
    let pool = &pool;
    flashsale_server::every(every, &stop, || async move {
        loop {
            let swept = async {
                let mut conn = pool.get().await?;
                crate::db::holds::sweep_expired(&mut conn, PER_TRANSACTION).await
            }
            .await;
            match swept {
                Ok(n) if n as i64 == PER_TRANSACTION => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "releasing expired holds failed; trying again at the next tick");
                    break;
                }
            }
        }
    })
    .await;
}
