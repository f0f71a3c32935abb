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
    pool: PgPool,
    grace: Duration,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        flashsale_db::run_migrations(&config.database_url, MIGRATIONS)
            .await
            .context("migrating the wallet database")?;
        let pool = flashsale_db::build_pool(
            &config.database_url,
            &PoolOptions { max_size: config.db_pool_size, ..PoolOptions::default() },
        );
        let listener =
            TcpListener::bind(config.listen_addr).await.with_context(|| format!("binding {}", config.listen_addr))?;
        let port = listener.local_addr()?.port();
        Ok(Self { listener, port, pool, grace: config.shutdown_grace() })
    }

    /// The port actually bound (useful when the configured port was 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then drains within the grace period.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (mut health, router) = flashsale_server::standard_router()?;
        health.track(<WalletServiceServer<WalletGrpc> as NamedService>::NAME);
        let wallet = WalletServiceServer::new(WalletGrpc::new(self.pool))
            .max_decoding_message_size(flashsale_server::MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(flashsale_server::MAX_ENCODING_MESSAGE_SIZE);
        let router = router.add_service(wallet);
        tracing::info!(port = self.port, "wallet serving gRPC");
        let listener = self.listener;
        flashsale_server::serve_until_stopped(health, shutdown, self.grace, |stop| {
            router.serve_with_incoming_shutdown(flashsale_server::incoming(listener), stop)
        })
        .await?;
        tracing::info!("wallet stopped");
        Ok(())
    }
}
