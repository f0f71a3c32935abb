//! The wallet's configuration, from flags or environment variables.

use std::net::SocketAddr;
use std::time::Duration;

/// Wallet settings. Secrets (the database URL may hold a password) are never printed.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// PostgreSQL URL of the wallet's own database.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/wallet"
    )]
    pub database_url: String,
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "WALLET_LISTEN_ADDR", default_value = "127.0.0.1:50053")]
    pub listen_addr: SocketAddr,
    /// Address of the admin endpoint serving Prometheus `/metrics` (port 0 picks a free port).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9093")]
    pub metrics_addr: SocketAddr,
    /// Largest number of PostgreSQL connections.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,
    /// Seconds in-flight calls get to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
    /// How often expired holds are released (their funds available again).
    #[arg(long, env = "HOLD_SWEEP_INTERVAL_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub hold_sweep_interval_ms: u64,
    /// Mutual TLS with inventory and the gateway (off when unset).
    #[command(flatten)]
    pub tls: flashsale_server::TlsArgs,
}

impl Config {
    /// Settings for a wallet on `database_url`, listening on a free local port (tests).
    pub fn for_tests(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            db_pool_size: 16,
            shutdown_grace_seconds: 5,
            hold_sweep_interval_ms: 200,
            tls: flashsale_server::TlsArgs::default(),
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }
}
