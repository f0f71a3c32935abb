//! The inventory's configuration, from flags or environment variables.

use std::net::SocketAddr;
use std::time::Duration;

/// Inventory settings. Secrets (URLs may hold passwords) are never printed.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// PostgreSQL URL of the inventory's own database.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/inventory"
    )]
    pub database_url: String,
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "INVENTORY_LISTEN_ADDR", default_value = "127.0.0.1:50052")]
    pub listen_addr: SocketAddr,
    /// Address of the admin endpoint serving Prometheus `/metrics` (port 0 picks a free port).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9092")]
    pub metrics_addr: SocketAddr,
    /// The wallet's gRPC URL.
    #[arg(long, env = "WALLET_URL", default_value = "http://127.0.0.1:50053")]
    pub wallet_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_ADDR", hide_env_values = true, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_addr: String,
    /// Prefix of every queue and exchange name (one suite per prefix).
    #[arg(long, env = "AMQP_PREFIX", default_value = "flashsale")]
    pub amqp_prefix: String,
    /// Largest number of PostgreSQL connections.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,
    /// Unacknowledged orders RabbitMQ may push ahead; half of it is the most
    /// orders recorded in one transaction.
    #[arg(long, env = "CONSUMER_PREFETCH", default_value_t = 200, value_parser = clap::value_parser!(u16).range(2..))]
    pub consumer_prefetch: u16,
    /// Batches whose first payment attempt runs at once (a batch's orders are
    /// recorded in one transaction, debited with one wallet call and settled in
    /// one transaction). Keep it under the pool size: reads need connections too.
    #[arg(long, env = "CONSUMER_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub consumer_concurrency: u32,
    /// Milliseconds between sweeps for payments to retry.
    #[arg(long, env = "SWEEP_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub sweep_interval_ms: u64,
    /// Deadline of one wallet call, in milliseconds.
    #[arg(long, env = "WALLET_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
    pub wallet_timeout_ms: u64,
    /// Seconds in-flight work gets to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
    /// Milliseconds before the gRPC server rotates a client's connection
    /// (graceful GOAWAY; clients then reconnect, and spread over replicas).
    #[arg(long, env = "MAX_CONNECTION_AGE_MS", default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub max_connection_age_ms: u64,
    /// Mutual TLS with the wallet and the gateway (off when unset; `WALLET_URL` is then https://).
    #[command(flatten)]
    pub tls: flashsale_server::TlsArgs,
}

impl Config {
    /// Settings for tests: a free local port, the given database, wallet and broker names.
    pub fn for_tests(
        database_url: impl Into<String>,
        wallet_url: impl Into<String>,
        amqp_prefix: impl Into<String>,
    ) -> Self {
        Self {
            database_url: database_url.into(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            wallet_url: wallet_url.into(),
            amqp_addr: std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            amqp_prefix: amqp_prefix.into(),
            db_pool_size: 16,
            consumer_prefetch: 200,
            consumer_concurrency: 8,
            sweep_interval_ms: 200,
            wallet_timeout_ms: 1000,
            shutdown_grace_seconds: 5,
            max_connection_age_ms: 300_000,
            tls: flashsale_server::TlsArgs::default(),
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }
}
