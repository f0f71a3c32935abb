//! PostgreSQL plumbing for the services (no business rules here): a pool of
//! diesel-async connections, embedded-migration running, and `CREATE DATABASE`
//! for first start and for tests that want a database of their own, and the one
//! classification of transient database errors ([`is_transient`]).

mod transient;

use std::time::Duration;

use diesel::ConnectionError;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolableConnection, RecyclingMethod,
};
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness};
use futures::FutureExt;
pub use transient::{is_transient, transient_sqlstate};

/// The pool every service uses.
pub type PgPool = Pool<AsyncPgConnection>;

/// Why a connection could not be checked out of [`PgPool`].
pub type PoolError = bb8::RunError<diesel_async::pooled_connection::PoolError>;

/// A connection checked out of [`PgPool`].
pub type PooledConn<'a> = bb8::PooledConnection<'a, AsyncDieselConnectionManager<AsyncPgConnection>>;

/// What can go wrong while setting the database up.
#[derive(Debug, thiserror::Error)]
pub enum DbSetupError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[from] ConnectionError),
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("invalid database URL: {0}")]
    Url(String),
}

/// Pool settings. The defaults suit one service process on a small machine.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub max_size: u32,
    /// How long a caller waits for a connection before the request fails as
    /// unavailable. bb8's default is 30 s, far longer than any client waits.
    pub connection_timeout: Duration,
    /// Server-side cap on a transaction left open by a dropped future
    /// (diesel-async does not roll back when a transaction future is dropped).
    pub idle_in_transaction_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_size: 16,
            connection_timeout: Duration::from_secs(2),
            idle_in_transaction_timeout: Duration::from_secs(10),
        }
    }
}

/// Logs pool errors once each instead of bb8's default of dropping them silently.
#[derive(Debug, Clone, Copy)]
struct LogErrors;

impl<E: std::fmt::Display> bb8::ErrorSink<E> for LogErrors {
    fn sink(&self, error: E) {
        tracing::warn!(error = %error, "postgres pool connection error");
        metrics::counter!("flashsale_db_connection_errors_total").increment(1);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<E>> {
        Box::new(*self)
    }
}

/// Sets the pool's gauges, `flashsale_db_pool_connections{state="idle"|"in_use"}`
/// and `flashsale_db_pool_max_connections` (call when metrics are scraped).
pub fn record_pool_state(pool: &PgPool, max_size: u32) {
    // Exported from the first scrape (at 0), so alerts on its rate have a series to read.
    metrics::counter!("flashsale_db_connection_errors_total").increment(0);
    let state = pool.state();
    let idle = f64::from(state.idle_connections);
    metrics::gauge!("flashsale_db_pool_connections", "state" => "idle").set(idle);
    metrics::gauge!("flashsale_db_pool_connections", "state" => "in_use").set(f64::from(state.connections) - idle);
    metrics::gauge!("flashsale_db_pool_max_connections").set(f64::from(max_size));
}

/// Builds a pool. Connections are opened lazily, so this succeeds while the
/// database is down; the first checkout then fails after `connection_timeout`.
pub fn build_pool(database_url: &str, options: &PoolOptions) -> PgPool {
    let idle_ms = options.idle_in_transaction_timeout.as_millis();
    let mut config = ManagerConfig::default();
    config.custom_setup = Box::new(move |url| {
        let url = url.to_owned();
        async move {
            let mut conn = AsyncPgConnection::establish(&url).await?;
            conn.batch_execute(&format!("SET idle_in_transaction_session_timeout = {idle_ms}"))
                .await
                .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
            Ok(conn)
        }
        .boxed()
    });
    // The check on checkout costs no round trip: it asks whether the driver's
    // connection task has ended (the server closed the socket: a restart, a
    // failover, an admin kill). Without it, after a restart every idle
    // connection is handed out once more and fails its caller's query, one by
    // one; with it, the pool opens a fresh connection instead. A ping per
    // checkout (`Verified`) would find half-open sockets too, for a round trip
    // on every request; those are left to the query that uses them.
    config.recycling_method = RecyclingMethod::CustomFunction(Box::new(|conn| {
        let closed = PoolableConnection::is_broken(conn);
        async move {
            if closed {
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::ClosedConnection,
                    Box::new("the server closed this pooled connection".to_owned()),
                ))
            } else {
                Ok(())
            }
        }
        .boxed()
    }));
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(database_url, config);
    Pool::builder()
        .max_size(options.max_size)
        .connection_timeout(options.connection_timeout)
        .test_on_check_out(true)
        .error_sink(Box::new(LogErrors))
        .build_unchecked(manager)
}

/// A share of a pool for the calls a crowd drives (buyers' reads, holds of
/// their funds): at most `share` of the pool's connections at once, so that
/// the work that ends orders (recording them, settling them) always finds a
/// connection however many buyers call. Past the share, callers wait for a
/// turn as they would for a connection, and fail the same way (`TimedOut`,
/// which the services answer as `UNAVAILABLE`) when none comes in time.
///
/// bb8 hands connections out first come, first served and has no priorities;
/// a semaphore in front of it is the smallest way to reserve a few.
#[derive(Clone)]
pub struct Lane {
    pool: PgPool,
    turns: std::sync::Arc<tokio::sync::Semaphore>,
    timeout: Duration,
}

/// A connection taken through a [`Lane`]: the turn is given back with it.
pub struct LaneConn<'a> {
    conn: PooledConn<'a>,
    _turn: tokio::sync::SemaphorePermit<'a>,
}

impl std::ops::Deref for LaneConn<'_> {
    type Target = AsyncPgConnection;

    fn deref(&self) -> &AsyncPgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for LaneConn<'_> {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
        &mut self.conn
    }
}

impl Lane {
    /// The crowd's share of a pool of `options.max_size`: all but a quarter
    /// of it (at least one connection kept back, at least one in the share).
    pub fn for_crowd(pool: &PgPool, options: &PoolOptions) -> Self {
        let kept_back = (options.max_size / 4).max(1);
        let share = options.max_size.saturating_sub(kept_back).max(1);
        Self {
            pool: pool.clone(),
            turns: std::sync::Arc::new(tokio::sync::Semaphore::new(share as usize)),
            timeout: options.connection_timeout,
        }
    }

    /// A connection, once the share has room and the pool one to give.
    pub async fn get(&self) -> Result<LaneConn<'_>, PoolError> {
        let turn = tokio::time::timeout(self.timeout, self.turns.acquire())
            .await
            .map_err(|_| bb8::RunError::TimedOut)?
            .map_err(|_| bb8::RunError::TimedOut)?;
        Ok(LaneConn { conn: self.pool.get().await?, _turn: turn })
    }
}

/// Applies every pending embedded migration. Needs a multi-threaded runtime:
/// diesel's migration machinery is synchronous and runs under `block_in_place`.
pub async fn run_migrations(database_url: &str, migrations: EmbeddedMigrations) -> Result<(), DbSetupError> {
    let conn = AsyncPgConnection::establish(database_url).await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = harness.run_pending_migrations(migrations).map_err(|e| DbSetupError::Migration(e.to_string()))?;
    for version in applied {
        tracing::info!(migration.version = %version, "applied migration");
    }
    Ok(())
}

/// Creates the database named in `database_url` if it does not exist, by
/// connecting to the server's `postgres` maintenance database.
pub async fn create_database_if_missing(database_url: &str) -> Result<(), DbSetupError> {
    let (server_url, name) = split_database_url(database_url)?;
    let mut conn = AsyncPgConnection::establish(&format!("{server_url}/postgres")).await?;
    let exists = database_exists(&mut conn, &name).await?;
    if !exists {
        // Identifiers cannot be bound as parameters; `name` was checked to be
        // plain [A-Za-z0-9_] by split_database_url.
        match conn.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await {
            Ok(()) => tracing::info!(db.name = %name, "created database"),
            // Another process created it between our check and our CREATE.
            Err(_) if database_exists(&mut conn, &name).await? => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `migrate` subcommands: creates the database if needed, then applies migrations.
pub async fn create_and_migrate(database_url: &str, migrations: EmbeddedMigrations) -> Result<(), DbSetupError> {
    create_database_if_missing(database_url).await?;
    run_migrations(database_url, migrations).await
}

/// Drops the database named in `database_url` (tests clean up with this).
pub async fn drop_database(database_url: &str) -> Result<(), DbSetupError> {
    let (server_url, name) = split_database_url(database_url)?;
    let mut conn = AsyncPgConnection::establish(&format!("{server_url}/postgres")).await?;
    conn.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await?;
    Ok(())
}

async fn database_exists(conn: &mut AsyncPgConnection, name: &str) -> Result<bool, DbSetupError> {
    use diesel::sql_types::{Bool, Text};
    use diesel_async::RunQueryDsl;

    #[derive(diesel::QueryableByName)]
    struct Exists {
        #[diesel(sql_type = Bool)]
        exists: bool,
    }
    let row: Exists = diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS exists")
        .bind::<Text, _>(name)
        .get_result(conn)
        .await?;
    Ok(row.exists)
}

/// Splits `postgres://host:port/name?params` into (`postgres://host:port`, `name`).
fn split_database_url(database_url: &str) -> Result<(String, String), DbSetupError> {
    let without_params = database_url.split('?').next().unwrap_or(database_url);
    let (server, name) = without_params
        .rsplit_once('/')
        .filter(|(server, _)| server.contains("://") && !server.ends_with('/'))
        .ok_or_else(|| DbSetupError::Url("expected postgres://host[:port]/database".into()))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DbSetupError::Url("database name must be [A-Za-z0-9_]+".into()));
    }
    Ok((server.to_owned(), name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_server_and_database_name() {
        let (server, name) = split_database_url("postgres://u@127.0.0.1:5432/wallet?sslmode=disable").unwrap();
        assert_eq!(server, "postgres://u@127.0.0.1:5432");
        assert_eq!(name, "wallet");
    }

    #[test]
    fn refuses_urls_without_a_plain_database_name() {
        assert!(split_database_url("postgres://127.0.0.1:5432").is_err());
        assert!(split_database_url("postgres://127.0.0.1/bad\"name").is_err());
        assert!(split_database_url("postgres://127.0.0.1/").is_err());
    }
}
