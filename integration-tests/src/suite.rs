//! The whole suite in-process: wallet, inventory and gateway on port 0, each on
//! its own databases, Redis key prefix and RabbitMQ names, so suites (tests) run
//! in parallel against the same servers without seeing each other.

use std::time::Duration;

use flashsale_proto::gateway::v1::admin_service_client::AdminServiceClient;
use flashsale_proto::gateway::v1::flash_sale_gateway_client::FlashSaleGatewayClient;
use tonic::Request;
use tonic::transport::Channel;

use crate::TestDatabase;
use crate::running::Running;

pub const JWT_SECRET: &str = "integration-tests-secret-0123456789abcdef";

/// The machine, shared by ordinary suites and taken whole by heavy tests
/// (storms, the browser, the fuzzer): on two cores a storm beside other suites
/// starves everyone, and buyers then see timeouts instead of the sale.
static MACHINE: std::sync::LazyLock<std::sync::Arc<tokio::sync::RwLock<()>>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(tokio::sync::RwLock::new(())));

/// Waits until no other suite runs, and keeps them out while the guard lives.
/// Spawn the suite with [`SuiteOptions::holds_machine`] set.
pub async fn whole_machine() -> tokio::sync::OwnedRwLockWriteGuard<()> {
    MACHINE.clone().write_owned().await
}

/// A share of the machine (ordinary suites take one on spawn).
pub async fn machine_share() -> tokio::sync::OwnedRwLockReadGuard<()> {
    MACHINE.clone().read_owned().await
}

pub struct TestSuite {
    pub wallet_db: TestDatabase,
    pub inventory_db: TestDatabase,
    pub redis_prefix: String,
    pub amqp_prefix: String,
    amqp_addr: String,
    wallet: Option<Running>,
    wallet_port: u16,
    inventory: Option<Running>,
    gateway: Option<Running>,
    gateway_http_port: u16,
    gateway_channel: Channel,
    /// `https` with mutual TLS between the services, else `http`.
    internal_scheme: &'static str,
    wallet_tls: flashsale_server::TlsArgs,
    /// Inventory reaches the wallet through this proxy, so a test can keep
    /// orders waiting for their payment while buyers still reach the wallet.
    payments_link: crate::proxy::FaultProxy,
    _share: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
    /// Each service's mutual-TLS certificates in use, by service name.
    tls_in_use: std::collections::BTreeMap<&'static str, flashsale_server::MutualTls>,
}

/// Variations of a suite.
#[derive(Debug, Clone, Default)]
pub struct SuiteOptions {
    /// The gateway reaches RabbitMQ here instead of `AMQP_ADDR` (a fault proxy).
    pub gateway_amqp_addr: Option<String>,
    /// The gateway reaches Redis here instead of `REDIS_URL` (a fault proxy),
    /// or, when it lists several comma-separated nodes, a Redis Cluster.
    pub gateway_redis_url: Option<String>,
    /// How long the gateway waits for a publisher confirm.
    pub publish_timeout_ms: Option<u64>,
    /// Per-buyer purchase rate limit (attempts/s, burst); off by default.
    pub purchase_rate: Option<(u32, u32)>,
    /// The caller holds [`whole_machine`]; do not wait for a share.
    pub holds_machine: bool,
    /// How long before the gateway publishes an admission inventory never recorded.
    pub unrecorded_grace_ms: Option<u64>,
    /// How long an ended sale stays in the gateway's catalog and Redis.
    pub sale_state_retention_ms: Option<u64>,
    /// The suite's databases live on this server (a private one a test may
    /// restart) instead of `TEST_DATABASE_URL`'s.
    pub database_server: Option<String>,
    /// Every service (and the suite's own probes) reaches RabbitMQ here instead
    /// of `AMQP_ADDR` (a private node a test may restart).
    pub amqp_server: Option<String>,
    /// How often inventory's gRPC server rotates client connections.
    pub inventory_max_connection_age_ms: Option<u64>,
    /// The gateway signs buyers in through this OpenID Connect provider
    /// instead of the development secret (and serves no development tokens).
    pub gateway_oidc: Option<flashsale_gateway::config::OidcConfig>,
    /// Per-client-address call limit (calls/s, burst); off by default, since
    /// every test client is 127.0.0.1.
    pub client_rate: Option<(u32, u32)>,
    /// Concurrent WatchOrder streams per buyer.
    pub watch_streams_per_buyer: Option<u32>,
    /// The gateway's audit log goes to this file (otherwise nowhere).
    pub audit_log: Option<String>,
    /// Mutual TLS between the services, each with a certificate from this CA.
    pub mtls: Option<std::sync::Arc<crate::pki::TestPki>>,
    /// How long the funds a purchase holds stay held if its order is never settled.
    pub purchase_hold_ttl_seconds: Option<u32>,
}

impl TestSuite {
    pub async fn spawn() -> anyhow::Result<Self> {
        Self::spawn_with(SuiteOptions::default()).await
    }

    pub async fn spawn_with(options: SuiteOptions) -> anyhow::Result<Self> {
        init_test_logging();
        let share = if options.holds_machine { None } else { Some(machine_share().await) };
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let (wallet_db, inventory_db) = match &options.database_server {
            Some(server) => {
                (TestDatabase::create_on(server, "wallet").await?, TestDatabase::create_on(server, "inventory").await?)
            }
            None => (TestDatabase::create("wallet").await?, TestDatabase::create("inventory").await?),
        };
        let redis_prefix = format!("fs-test-{tag}");
        let amqp_prefix = format!("fs-test-{tag}");

        let tls_for = |service: &str| match &options.mtls {
            Some(pki) => pki.issue(service),
            None => Ok(flashsale_server::TlsArgs::default()),
        };
        let internal_scheme = if options.mtls.is_some() { "https" } else { "http" };
        let internal_url = |running: &Running| format!("{internal_scheme}://127.0.0.1:{}", running.port);
        let wallet_tls = tls_for("wallet")?;
        let mut tls_in_use = std::collections::BTreeMap::new();
        let (wallet, tls) = start_wallet(wallet_db.url(), 0, &wallet_tls).await?;
        tls_in_use.extend(tls.map(|tls| ("wallet", tls)));
        let wallet_port = wallet.port;
        let payments_link = crate::proxy::FaultProxy::start(([127, 0, 0, 1], wallet_port).into()).await?;

        let amqp_addr = options.amqp_server.clone().unwrap_or_else(amqp_addr);
        let mut config = flashsale_inventory::Config::for_tests(
            inventory_db.url(),
            format!("{internal_scheme}://127.0.0.1:{}", payments_link.port),
            &amqp_prefix,
        );
        config.tls = tls_for("inventory")?;
        config.amqp_addr = amqp_addr.clone();
        if let Some(ms) = options.inventory_max_connection_age_ms {
            config.max_connection_age_ms = ms;
        }
        let app = flashsale_inventory::Application::build(&config).await?;
        tls_in_use.extend(app.mutual_tls().map(|tls| ("inventory", tls)));
        let inventory = Running::start(app.port(), |stop| app.run_until_stopped(stop));

        let mut config = flashsale_gateway::Config::for_tests(
            internal_url(&inventory),
            internal_url(&wallet),
            &redis_prefix,
            &amqp_prefix,
            JWT_SECRET,
        );
        config.tls = tls_for("gateway")?;
        config.amqp_addr = amqp_addr.clone();
        if let Some(addr) = options.gateway_amqp_addr {
            config.amqp_addr = addr;
        }
        if let Some(url) = options.gateway_redis_url {
            config.redis_cluster = url.contains(',');
            config.redis_url = url;
        }
        if let Some(ms) = options.publish_timeout_ms {
            config.publish_timeout_ms = ms;
        }
        if let Some(ms) = options.unrecorded_grace_ms {
            config.unrecorded_grace_ms = ms;
        }
        if let Some(ms) = options.sale_state_retention_ms {
            config.sale_state_retention_ms = ms;
        }
        if let Some(oidc) = options.gateway_oidc {
            config.oidc = oidc;
            config.jwt_secret = None;
            config.dev_tokens = false;
        }
        if let Some((rate, burst)) = options.client_rate {
            config.client_rate_per_second = rate;
            config.client_burst = burst;
        }
        if let Some(path) = options.audit_log {
            config.audit_log = path;
        }
        if let Some(streams) = options.watch_streams_per_buyer {
            config.watch_streams_per_buyer = streams;
        }
        if let Some(seconds) = options.purchase_hold_ttl_seconds {
            config.purchase_hold_ttl_seconds = seconds;
        }
        if let Some((rate, burst)) = options.purchase_rate {
            config.purchase_rate_per_second = rate;
            config.purchase_burst = burst;
        }
        let app = flashsale_gateway::Application::build(&config).await?;
        tls_in_use.extend(app.mutual_tls().map(|tls| ("gateway", tls)));
        let gateway_http_port = app.http_port();
        let gateway = Running::start(app.port(), |stop| app.run_until_stopped(stop));
        let gateway_channel = Channel::from_shared(gateway.url())?.connect().await?;

        Ok(Self {
            wallet_db,
            inventory_db,
            redis_prefix,
            amqp_prefix,
            amqp_addr,
            wallet: Some(wallet),
            wallet_port,
            inventory: Some(inventory),
            gateway: Some(gateway),
            gateway_http_port,
            gateway_channel,
            internal_scheme,
            wallet_tls,
            payments_link,
            _share: share,
            tls_in_use,
        })
    }

    /// `http://127.0.0.1:<port>` of each running service, by name
    /// (`https://` for inventory and wallet with mutual TLS).
    pub fn url(&self, service: &str) -> Option<String> {
        let internal = |running: &Running| format!("{}://127.0.0.1:{}", self.internal_scheme, running.port);
        match service {
            "wallet" => self.wallet.as_ref().map(internal),
            "inventory" => self.inventory.as_ref().map(internal),
            "gateway" => self.gateway.as_ref().map(Running::url),
            _ => None,
        }
    }

    /// `http://127.0.0.1:<port>` of the gateway's HTTP server (REST, storefront, OpenAPI).
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_http_port)
    }

    /// The suite's databases, for the audit.
    pub fn databases(&self) -> crate::audit::Databases {
        crate::audit::Databases {
            inventory_url: self.inventory_db.url().to_owned(),
            wallet_url: self.wallet_db.url().to_owned(),
        }
    }

    pub fn buyers(&self) -> FlashSaleGatewayClient<Channel> {
        FlashSaleGatewayClient::new(self.gateway_channel.clone())
    }

    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.gateway_channel.clone())
    }

    pub fn gateway_channel(&self) -> Channel {
        self.gateway_channel.clone()
    }

    /// A fresh channel to the gateway (many connections spread load over the
    /// server's connection tasks, as many real clients would).
    pub async fn new_gateway_channel(&self) -> anyhow::Result<Channel> {
        let url = self.gateway.as_ref().map(Running::url).ok_or_else(|| anyhow::anyhow!("gateway stopped"))?;
        Ok(Channel::from_shared(url)?.connect().await?)
    }

    pub fn token(&self, user: &str, admin: bool) -> String {
        flashsale_gateway::auth::mint(JWT_SECRET, user, admin, Duration::from_secs(3600)).unwrap_or_default()
    }

    /// `message` sent as `user` (bearer token attached).
    pub fn as_user<T>(&self, user: &str, message: T) -> Request<T> {
        with_token(message, &self.token(user, false))
    }

    pub fn as_admin<T>(&self, message: T) -> Request<T> {
        with_token(message, &self.token("operator", true))
    }

    /// Stops the wallet (its port stays reserved for [`TestSuite::start_wallet`]).
    pub async fn stop_wallet(&mut self) -> anyhow::Result<()> {
        if let Some(wallet) = self.wallet.take() {
            wallet.stop().await?;
        }
        Ok(())
    }

    /// Cuts inventory off from the wallet: orders are recorded but wait for
    /// their payment (PAYMENT_PENDING), while purchases still hold funds.
    pub fn pause_payments(&self) {
        self.payments_link.cut();
    }

    /// Lets inventory reach the wallet again (its sweeper pays what waited).
    pub fn resume_payments(&self) {
        self.payments_link.restore();
    }

    /// Starts the wallet again on the port inventory and gateway know.
    pub async fn start_wallet(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.wallet.is_none(), "wallet already running");
        let (wallet, tls) = start_wallet(self.wallet_db.url(), self.wallet_port, &self.wallet_tls).await?;
        self.wallet = Some(wallet);
        self.tls_in_use.extend(tls.map(|tls| ("wallet", tls)));
        Ok(())
    }

    /// How many whole sets of certificate files each service has taken into
    /// use (1 at start; see `MutualTls::sets_applied`), by service name;
    /// empty without mutual TLS.
    pub fn tls_sets_applied(&self) -> Vec<(&'static str, u64)> {
        self.tls_in_use.iter().map(|(service, tls)| (*service, tls.sets_applied())).collect()
    }

    /// Deletes every Redis key of this suite, as a Redis restart would.
    pub async fn flush_redis(&self) -> anyhow::Result<usize> {
        flush_redis_prefix(&self.redis_prefix).await
    }

    /// Publishes raw bytes to this suite's orders queue (a duplicate delivery).
    pub async fn publish_order_placed(&self, payload: &[u8]) -> anyhow::Result<()> {
        let connection = flashsale_messaging::connect(&self.amqp_addr, "integration-test").await?;
        let publisher = flashsale_messaging::ConfirmedPublisher::new(&connection, Duration::from_secs(5)).await?;
        let topology = flashsale_messaging::Topology::with_prefix(&self.amqp_prefix);
        publisher
            .publish("", &topology.orders_queue, payload, flashsale_messaging::lapin::types::FieldTable::default())
            .await?;
        let _ = connection.close(200, "done".into()).await;
        Ok(())
    }

    /// How many messages wait in the dead-letter queue of `queue` (a work
    /// queue's name, e.g. `Topology::with_prefix(&suite.amqp_prefix).orders_queue`).
    pub async fn dead_letters(&self, queue: &str) -> anyhow::Result<u32> {
        Ok(queue_depth_at(&self.amqp_addr, &flashsale_messaging::Topology::dead_letter_queue(queue)).await?.0)
    }

    /// Stops every service, then removes the suite's queues, keys and databases.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for service in [self.gateway.take(), self.inventory.take(), self.wallet.take()].into_iter().flatten() {
            service.stop().await?;
        }
        self.flush_redis().await?;
        delete_amqp_names_at(&self.amqp_addr, &self.amqp_prefix).await?;
        self.wallet_db.drop_now().await?;
        self.inventory_db.drop_now().await?;
        Ok(())
    }
}

/// With `TEST_LOG=warn` (any filter), the services' logs go to the test output.
fn init_test_logging() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

pub fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Deletes every Redis key under `prefix`; returns how many there were.
pub async fn flush_redis_prefix(prefix: &str) -> anyhow::Result<usize> {
    flush_redis_prefix_at(&redis_url(), prefix).await
}

/// [`flush_redis_prefix`] on the Redis server at `url`, or on the Redis
/// Cluster whose nodes it lists (comma-separated): each live node is asked
/// for its keys, and each key is deleted through the cluster (keys of
/// different slots cannot go in one `DEL`). A node that is down is skipped; its
/// slots are served by the replica that took over.
pub async fn flush_redis_prefix_at(url: &str, prefix: &str) -> anyhow::Result<usize> {
    if url.contains(',') {
        let mut cluster = crate::audit::redis_connection(url).await?;
        let mut keys = std::collections::BTreeSet::new();
        for node in url.split(',') {
            let Ok(mut conn) = async { redis::Client::open(node)?.get_multiplexed_async_connection().await }.await
            else {
                continue;
            };
            let found: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await?;
            keys.extend(found);
        }
        for key in &keys {
            let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut cluster).await?;
        }
        return Ok(keys.len());
    }
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
    }
    Ok(keys.len())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn start_wallet(
    database_url: &str,
    port: u16,
    tls: &flashsale_server::TlsArgs,
) -> anyhow::Result<(Running, Option<flashsale_server::MutualTls>)> {
    let mut config = flashsale_wallet::Config::for_tests(database_url);
    config.listen_addr.set_port(port);
    config.tls = tls.clone();
    let app = flashsale_wallet::Application::build(&config).await?;
    let in_use = app.mutual_tls();
    Ok((Running::start(app.port(), |stop| app.run_until_stopped(stop)), in_use))
}

pub async fn delete_amqp_names(prefix: &str) -> anyhow::Result<()> {
    delete_amqp_names_at(&amqp_addr(), prefix).await
}

/// [`delete_amqp_names`] on the broker at `addr`.
pub async fn delete_amqp_names_at(addr: &str, prefix: &str) -> anyhow::Result<()> {
    use flashsale_messaging::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let topology = flashsale_messaging::Topology::with_prefix(prefix);
    let connection = flashsale_messaging::connect(addr, "integration-test-cleanup").await?;
    let channel = connection.create_channel().await?;
    for queue in topology.work_queues() {
        channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await?;
        let dead = flashsale_messaging::Topology::dead_letter_queue(queue);
        channel.queue_delete(dead.as_str().into(), QueueDeleteOptions::default()).await?;
    }
    for exchange in [&topology.events_exchange, &topology.dead_letter_exchange] {
        channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// (messages ready, consumers) of the queue `name` on the shared broker.
pub async fn queue_depth(name: &str) -> anyhow::Result<(u32, u32)> {
    queue_depth_at(&amqp_addr(), name).await
}

/// [`queue_depth`] on the broker at `addr`.
pub async fn queue_depth_at(addr: &str, name: &str) -> anyhow::Result<(u32, u32)> {
    use flashsale_messaging::lapin::options::QueueDeclareOptions;
    use flashsale_messaging::lapin::types::FieldTable;
    let connection = flashsale_messaging::connect(addr, "integration-test-probe").await?;
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await?;
    let _ = connection.close(200, "done".into()).await;
    Ok((declared.message_count(), declared.consumer_count()))
}
