//! Building and running the inventory: bind (port 0 works), serve until told to stop.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;

/// A inventory that has bound its port, ready to serve.
pub struct Application {
    listener: TcpListener,
    port: u16,
    grace: Duration,
}

impl Application {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(config.listen_addr).await.with_context(|| format!("binding {}", config.listen_addr))?;
        let port = listener.local_addr()?.port();
        Ok(Self { listener, port, grace: config.shutdown_grace() })
    }

    /// The port actually bound (useful when the configured port was 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` resolves, then drains within the grace period.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (health, health_service) = flashsale_server::Health::new();
        let (reflection_v1, reflection_v1alpha) = flashsale_server::reflection()?;
        let router = flashsale_server::server_builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        tracing::info!(port = self.port, "inventory serving gRPC");
        let listener = self.listener;
        flashsale_server::serve_until_stopped(health, shutdown, self.grace, |stop| {
            router.serve_with_incoming_shutdown(flashsale_server::incoming(listener), stop)
        })
        .await?;
        tracing::info!("inventory stopped");
        Ok(())
    }
}
