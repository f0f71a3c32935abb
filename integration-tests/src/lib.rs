//! Test helpers that start the real services against the real backing servers:
//! PostgreSQL (`TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432`),
//! Redis (`REDIS_URL`) and RabbitMQ (`AMQP_ADDR`). Every helper isolates its data (a database of
//! its own per test), so tests run in parallel.

pub mod audit;
pub mod backing;
pub mod binaries;
pub mod db;
pub mod idp;
pub mod load;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod ports;
pub mod proxy;
pub mod running;
pub mod suite;
pub mod wallet;

pub use db::TestDatabase;
pub use suite::TestSuite;
pub use wallet::TestWallet;

/// Reason carried by a status's `google.rpc.ErrorInfo`, if any.
pub fn error_reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason)
}

/// The path of a workspace binary, built next to the test executable by
/// `cargo build --workspace` (which the test command runs first).
pub fn service_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    // target/debug/deps/integration-… → target/debug/<name>
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| anyhow::anyhow!("unexpected test executable path {}", exe.display()))?;
    let path = dir.join(name);
    anyhow::ensure!(path.exists(), "{} not found: run `cargo build --workspace` first", path.display());
    Ok(path)
}

/// Runs a test's body for at most `limit`. libtest has no per-test timeout,
/// and a test stuck on a wait that never ends (a consumer that never comes back
/// after a fault) would otherwise hold the whole run until CI kills it, with no
/// word of which test it was. Ending with an error drops the test's servers and
/// processes as a failure would.
pub async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    body: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, body).await {
        Ok(outcome) => outcome,
        Err(_) => anyhow::bail!("{what} did not end within {limit:?}"),
    }
}
