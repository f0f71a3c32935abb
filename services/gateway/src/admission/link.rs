//! The connections admission state is reached through: one Redis server
//! (a multiplexed `ConnectionManager` for the hot path, a bb8 pool for
//! background work), or a Redis Cluster (two multiplexed cluster connections,
//! one per role, each routing a command or an item's pipeline to the master of
//! its slot and following `MOVED`/`ASK` through failovers). Every script and
//! pipeline touches the keys of one item only, which share the hash tag
//! `{ITEM}` and so one slot; `EVALSHA` is routed by its first key.
//!
//! No crate offers one connection type over both (bb8-redis has no cluster
//! manager), hence these small enums that forward `ConnectionLike`.

use bb8_redis::RedisConnectionManager;
use redis::aio::{ConnectionLike, ConnectionManager};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// How long connecting and each reply may take (a reply past it is an I/O
/// error: the buyer gets `UNAVAILABLE`).
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The hot-path connection, cloned per request (both kinds multiplex).
#[derive(Clone)]
pub enum Hot {
    Server(ConnectionManager),
    Cluster(Cluster),
}

/// Where background work gets a connection.
pub enum Background {
    Pool(bb8::Pool<RedisConnectionManager>),
    Cluster(Cluster),
}

/// One background connection: a pooled one, or the cluster's.
pub enum Lease<'a> {
    Pooled(bb8::PooledConnection<'a, RedisConnectionManager>),
    Cluster(Cluster),
}

/// Opens both roles' connections. `cluster`: `urls` are seed nodes of a Redis
/// Cluster (any of its masters or replicas; the rest is discovered); otherwise
/// `urls` holds exactly one server.
pub async fn connect(urls: &[&str], cluster: bool) -> Result<(Hot, Background), redis::RedisError> {
    if cluster {
        let client = cluster_client(urls)?;
        let hot = Cluster::open(client.clone()).await?;
        let background = Cluster::open(client).await?;
        return Ok((Hot::Cluster(hot), Background::Cluster(background)));
    }
    let url = one_server(urls)?;
    let hot = server_connection(url).await?;
    let pool =
        bb8::Pool::builder().max_size(8).connection_timeout(TIMEOUT).build(RedisConnectionManager::new(url)?).await?;
    Ok((Hot::Server(hot), Background::Pool(pool)))
}

/// Only a hot-path connection, as [`connect`] opens it (for tools that read
/// the admission state, such as the tests' audit).
pub async fn connect_hot(urls: &[&str], cluster: bool) -> Result<Hot, redis::RedisError> {
    Ok(if cluster {
        Hot::Cluster(Cluster::open(cluster_client(urls)?).await?)
    } else {
        Hot::Server(server_connection(one_server(urls)?).await?)
    })
}

fn cluster_client(urls: &[&str]) -> RedisResult<redis::cluster::ClusterClient> {
    redis::cluster::ClusterClient::builder(urls.iter().copied())
        .connection_timeout(TIMEOUT)
        .response_timeout(TIMEOUT)
        .build()
}

fn one_server<'a>(urls: &[&'a str]) -> RedisResult<&'a str> {
    match urls {
        [url] => Ok(url),
        _ => Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "several Redis URLs given without REDIS_CLUSTER",
        ))),
    }
}

async fn server_connection(url: &str) -> RedisResult<ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    ConnectionManager::new_with_config(redis::Client::open(url)?, config).await
}

impl Background {
    pub async fn get(&self) -> Result<Lease<'_>, bb8::RunError<redis::RedisError>> {
        Ok(match self {
            Self::Pool(pool) => Lease::Pooled(pool.get().await?),
            Self::Cluster(cluster) => Lease::Cluster(cluster.clone()),
        })
    }

    /// Idle and in-use connections of the pool (a cluster connection: none).
    pub fn pool_state(&self) -> Option<(u32, u32)> {
        match self {
            Self::Pool(pool) => {
                let state = pool.state();
                Some((state.idle_connections, state.connections - state.idle_connections))
            }
            Self::Cluster(_) => None,
        }
    }
}

/// `ConnectionLike` for an enum of one single-server connection (variant
/// `$server`) and a [`Cluster`] (variant `Cluster`): each call goes to the one it holds.
macro_rules! forward_connection_like {
    ($type:ty, $server:ident) => {
        impl ConnectionLike for $type {
            fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
                match self {
                    Self::$server(c) => c.req_packed_command(cmd),
                    Self::Cluster(c) => c.command(cmd),
                }
            }

            fn req_packed_commands<'a>(
                &'a mut self,
                pipeline: &'a Pipeline,
                offset: usize,
                count: usize,
            ) -> RedisFuture<'a, Vec<Value>> {
                match self {
                    Self::$server(c) => c.req_packed_commands(pipeline, offset, count),
                    Self::Cluster(c) => c.commands(pipeline, offset, count),
                }
            }

            fn get_db(&self) -> i64 {
                match self {
                    Self::$server(c) => c.get_db(),
                    Self::Cluster(_) => 0,
                }
            }
        }
    };
}

forward_connection_like!(Hot, Server);
forward_connection_like!(Lease<'_>, Pooled);

/// A Redis Cluster connection that is opened afresh, its slot map read again
/// from the seed nodes, when commands fail on I/O or the cluster is down.
///
/// Why our own: after a master was killed and its replica promoted, redis-rs's
/// cluster connection (1.8) kept routing that slot's commands to the dead node
/// and every one timed out, minutes after the cluster had healed (seen in
/// `storm::a_redis_cluster_failover_mid_sale_loses_no_order`); it has no
/// periodic topology refresh, and `max_connection_attempts` did not help. A
/// new connection asks the cluster for its current topology. At most one is
/// opened at a time, at most one per [`RENEW_EVERY`]; meanwhile commands go
/// to the current one (and fail `UNAVAILABLE` until the slot is served again).
#[derive(Clone)]
pub struct Cluster(Arc<ClusterState>);

struct ClusterState {
    client: redis::cluster::ClusterClient,
    current: parking_lot::RwLock<ClusterConnection>,
    renewing: AtomicBool,
    last_renewal: parking_lot::Mutex<std::time::Instant>,
}

/// The least time between two renewals of a cluster connection.
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

impl Cluster {
    async fn open(client: redis::cluster::ClusterClient) -> RedisResult<Self> {
        let connection = client.get_async_connection().await?;
        Ok(Self(Arc::new(ClusterState {
            client,
            current: parking_lot::RwLock::new(connection),
            renewing: AtomicBool::new(false),
            last_renewal: parking_lot::Mutex::new(std::time::Instant::now()),
        })))
    }

    fn connection(&self) -> ClusterConnection {
        self.0.current.read().clone()
    }

    /// After a failed command: renew the connection if the failure says the
    /// topology may have changed (a node gone or unreachable, the cluster down).
    fn observe<T>(&self, outcome: &RedisResult<T>) {
        let Err(error) = outcome else { return };
        if !topology_may_have_changed(error) {
            return;
        }
        let mut last = self.0.last_renewal.lock();
        if last.elapsed() < RENEW_EVERY || self.0.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        *last = std::time::Instant::now();
        drop(last);
        let state = self.0.clone();
        tokio::spawn(async move {
            match state.client.get_async_connection().await {
                Ok(connection) => {
                    *state.current.write() = connection;
                    tracing::info!("Redis Cluster connection renewed");
                }
                Err(e) => tracing::warn!(error = %e, "renewing the Redis Cluster connection failed"),
            }
            state.renewing.store(false, Ordering::Release);
        });
    }

    fn command<'a>(&'a self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let outcome = self.connection().req_packed_command(cmd).await;
            self.observe(&outcome);
            outcome
        })
    }

    fn commands<'a>(&'a self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let outcome = self.connection().req_packed_commands(pipeline, offset, count).await;
            self.observe(&outcome);
            outcome
        })
    }
}

fn topology_may_have_changed(error: &RedisError) -> bool {
    error.is_timeout()
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(error.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown))
}
