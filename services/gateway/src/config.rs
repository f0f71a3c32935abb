//! The gateway's configuration, from flags or environment variables.

use std::net::SocketAddr;
use std::time::Duration;

/// Gateway settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long, env = "GATEWAY_LISTEN_ADDR", default_value = "127.0.0.1:50051")]
    pub listen_addr: SocketAddr,
    /// Seconds in-flight calls get to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
}

impl Config {
    /// Settings for a gateway listening on a free local port (tests).
    pub fn for_tests() -> Self {
        Self { listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)), shutdown_grace_seconds: 5 }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }
}
