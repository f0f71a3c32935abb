//! The whole suite as three real processes (the release artefacts operators
//! run), each on its own databases, Redis prefix and RabbitMQ names. Tests that
//! read one service's process-wide state, such as its `/metrics`, use this
//! instead of the in-process [`crate::TestSuite`], where every service shares
//! one metrics recorder.

use flashsale_proto::gateway::v1::admin_service_client::AdminServiceClient;
use flashsale_proto::gateway::v1::flash_sale_gateway_client::FlashSaleGatewayClient;
use tonic::transport::Channel;

pub use self::process::{Place, Service, ServiceProcess, scrape, sum};
use self::process::{start, start_at};
use crate::TestDatabase;
use crate::suite::{JWT_SECRET, amqp_addr, delete_amqp_names_at, flush_redis_prefix_at};

mod process;

/// Where a [`BinarySuite`]'s services find their backing servers: the
/// machine's shared ones by default, or a test's private ones (which it may
/// restart).
#[derive(Debug, Clone, Default)]
pub struct Backing {
    /// PostgreSQL server URL (no database) instead of `TEST_DATABASE_URL`'s.
    pub database_server: Option<String>,
    /// Instead of `REDIS_URL`.
    pub redis_url: Option<String>,
    /// Instead of `AMQP_ADDR`.
    pub amqp_addr: Option<String>,
}

pub struct BinarySuite {
    pub wallet_db: TestDatabase,
    pub inventory_db: TestDatabase,
    pub redis_prefix: String,
    pub amqp_prefix: String,
    /// The Redis server and RabbitMQ broker the services use.
    pub redis_url: String,
    pub amqp_addr: String,
    pub wallet: ServiceProcess,
    pub inventory: ServiceProcess,
    pub gateway: ServiceProcess,
    /// Instances beyond the first of each kind ([`BinarySuite::spawn_cluster_on`]).
    pub more_wallets: Vec<ServiceProcess>,
    pub more_inventories: Vec<ServiceProcess>,
    pub more_gateways: Vec<ServiceProcess>,
    gateway_channel: Channel,
    /// Round robin of [`BinarySuite::new_gateway_channel`] over the gateways.
    next_gateway: std::sync::atomic::AtomicUsize,
}

/// How many processes of each service a [`BinarySuite`] runs.
#[derive(Debug, Clone, Copy)]
pub struct Instances {
    pub wallets: usize,
    pub inventories: usize,
    pub gateways: usize,
}

impl Instances {
    pub const ONE_EACH: Self = Self { wallets: 1, inventories: 1, gateways: 1 };
}

impl BinarySuite {
    pub async fn spawn() -> anyhow::Result<Self> {
        Self::spawn_with_env(&[]).await
    }

    /// As [`BinarySuite::spawn`], with `common` set in every service's environment.
    pub async fn spawn_with_env(common: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::spawn_with_envs(common, &[]).await
    }

    /// As [`BinarySuite::spawn_with_env`], with `gateway_only` set last in the gateway's.
    pub async fn spawn_with_envs(common: &[(&str, String)], gateway_only: &[(&str, String)]) -> anyhow::Result<Self> {
        let own: Vec<(Service, &str, String)> =
            gateway_only.iter().map(|(k, v)| (Service::Gateway, *k, v.clone())).collect();
        Self::spawn_with_service_envs(common, &own).await
    }

    /// As [`BinarySuite::spawn_with_env`], with each `(service, key, value)` set
    /// last in that service's environment.
    pub async fn spawn_with_service_envs(
        common: &[(&str, String)],
        own: &[(Service, &str, String)],
    ) -> anyhow::Result<Self> {
        Self::spawn_on(&Backing::default(), common, own).await
    }

    /// As [`BinarySuite::spawn_with_service_envs`], on the servers of `backing`.
    pub async fn spawn_on(
        backing: &Backing,
        common: &[(&str, String)],
        own: &[(Service, &str, String)],
    ) -> anyhow::Result<Self> {
        Self::spawn_cluster_on(backing, common, own, Instances::ONE_EACH).await
    }

    /// As [`BinarySuite::spawn_on`], with `instances` processes of each service,
    /// all sharing the suite's databases, Redis prefix and queues, as replicas
    /// do. Without a load balancer in front, each caller is wired to one callee:
    /// inventory `j` pays through wallet `j mod wallets`, gateway `i` calls
    /// inventory `i mod inventories` and wallet `i mod wallets`.
    pub async fn spawn_cluster_on(
        backing: &Backing,
        common: &[(&str, String)],
        own: &[(Service, &str, String)],
        instances: Instances,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            instances.wallets > 0 && instances.inventories > 0 && instances.gateways > 0,
            "at least one process of each service"
        );
        let redis_url = backing
            .redis_url
            .clone()
            .unwrap_or_else(|| std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()));
        let amqp_addr = backing.amqp_addr.clone().unwrap_or_else(amqp_addr);
        let servers = [("REDIS_URL", redis_url.clone()), ("AMQP_ADDR", amqp_addr.clone())];
        let with = |service: Service, base: Vec<(&'static str, String)>| -> Vec<(&str, String)> {
            base.into_iter()
                .chain(servers.iter().cloned())
                .chain(common.iter().map(|(k, v)| (*k, v.clone())))
                .chain(own.iter().filter(|(s, _, _)| *s == service).map(|(_, k, v)| (*k, v.clone())))
                .collect()
        };
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let (wallet_db, inventory_db) = match &backing.database_server {
            Some(server) => {
                (TestDatabase::create_on(server, "wallet").await?, TestDatabase::create_on(server, "inventory").await?)
            }
            None => (TestDatabase::create("wallet").await?, TestDatabase::create("inventory").await?),
        };
        let redis_prefix = format!("fs-bin-{tag}");
        let amqp_prefix = format!("fs-bin-{tag}");
        let mut wallets = Vec::new();
        for _ in 0..instances.wallets {
            wallets.push(
                start(Service::Wallet, &with(Service::Wallet, vec![("DATABASE_URL", wallet_db.url().to_owned())]))
                    .await?,
            );
        }
        let wallet_url = |n: usize| wallets[n % wallets.len()].grpc_url();
        let mut inventories = Vec::new();
        for n in 0..instances.inventories {
            inventories.push(
                start(
                    Service::Inventory,
                    &with(
                        Service::Inventory,
                        vec![
                            ("DATABASE_URL", inventory_db.url().to_owned()),
                            ("WALLET_URL", wallet_url(n)),
                            ("AMQP_PREFIX", amqp_prefix.clone()),
                            ("SWEEP_INTERVAL_MS", "200".into()),
                        ],
                    ),
                )
                .await?,
            );
        }
        let mut gateways = Vec::new();
        for n in 0..instances.gateways {
            let inventory_url = inventories[n % inventories.len()].grpc_url();
            let settings = gateway_settings(inventory_url, wallet_url(n), &amqp_prefix, &redis_prefix);
            gateways.push(consuming(start(Service::Gateway, &with(Service::Gateway, settings)).await?).await?);
        }
        let (wallet, more_wallets) = first_and_rest(wallets);
        let (inventory, more_inventories) = first_and_rest(inventories);
        let (gateway, more_gateways) = first_and_rest(gateways);
        let gateway_channel = Channel::from_shared(gateway.grpc_url())?.connect().await?;
        Ok(Self {
            wallet_db,
            inventory_db,
            redis_prefix,
            amqp_prefix,
            redis_url,
            amqp_addr,
            wallet,
            inventory,
            gateway,
            more_wallets,
            more_inventories,
            more_gateways,
            gateway_channel,
            next_gateway: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Starts one more gateway at `place`, wired to the first inventory and
    /// wallet and to the suite's Redis and broker, with `env` set last (the
    /// `common` and `own` settings the suite was spawned with do not apply).
    /// It serves buyers from [`BinarySuite::new_gateway_channel`] on.
    pub async fn add_gateway(&mut self, place: Place, env: &[(&str, String)]) -> anyhow::Result<&ServiceProcess> {
        let settings =
            gateway_settings(self.inventory.grpc_url(), self.wallet.grpc_url(), &self.amqp_prefix, &self.redis_prefix);
        let servers = [("REDIS_URL", self.redis_url.clone()), ("AMQP_ADDR", self.amqp_addr.clone())];
        let env: Vec<(&str, String)> =
            settings.into_iter().chain(servers).chain(env.iter().map(|(k, v)| (*k, v.clone()))).collect();
        self.more_gateways.push(consuming(start_at(Service::Gateway, &env, place).await?).await?);
        self.more_gateways.last().ok_or_else(|| anyhow::anyhow!("no gateway added"))
    }

    /// Every process of `service`, the first one first.
    pub fn instances(&mut self, service: Service) -> Vec<&mut ServiceProcess> {
        let (first, rest) = match service {
            Service::Wallet => (&mut self.wallet, &mut self.more_wallets),
            Service::Inventory => (&mut self.inventory, &mut self.more_inventories),
            Service::Gateway => (&mut self.gateway, &mut self.more_gateways),
        };
        std::iter::once(first).chain(rest.iter_mut()).collect()
    }

    /// The gRPC ports of every gateway.
    pub fn gateway_ports(&self) -> Vec<u16> {
        std::iter::once(&self.gateway).chain(&self.more_gateways).map(|g| g.grpc_port).collect()
    }

    /// The process of `service`.
    pub fn process(&mut self, service: Service) -> &mut ServiceProcess {
        match service {
            Service::Wallet => &mut self.wallet,
            Service::Inventory => &mut self.inventory,
            Service::Gateway => &mut self.gateway,
        }
    }

    /// Where every gateway's gRPC server answers, the first one first.
    pub fn gateway_urls(&self) -> Vec<String> {
        std::iter::once(&self.gateway).chain(&self.more_gateways).map(ServiceProcess::grpc_url).collect()
    }

    /// A new connection to a gateway (buyers spread over several, as real ones
    /// do): with several gateways, each call picks the next one in turn.
    pub async fn new_gateway_channel(&self) -> anyhow::Result<Channel> {
        let urls = self.gateway_urls();
        let url = &urls[self.next_gateway.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % urls.len()];
        Ok(Channel::from_shared(url.clone())?.connect().await?)
    }

    pub fn buyers(&self) -> FlashSaleGatewayClient<Channel> {
        FlashSaleGatewayClient::new(self.gateway_channel.clone())
    }

    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.gateway_channel.clone())
    }

    pub fn databases(&self) -> crate::audit::Databases {
        crate::audit::Databases {
            inventory_url: self.inventory_db.url().to_owned(),
            wallet_url: self.wallet_db.url().to_owned(),
        }
    }

    /// Stops the processes, then removes the suite's queues, keys and databases.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for process in std::iter::once(&mut self.gateway)
            .chain(self.more_gateways.iter_mut())
            .chain([&mut self.inventory])
            .chain(self.more_inventories.iter_mut())
            .chain([&mut self.wallet])
            .chain(self.more_wallets.iter_mut())
        {
            process.kill().await?;
        }
        flush_redis_prefix_at(&self.redis_url, &self.redis_prefix).await?;
        delete_amqp_names_at(&self.amqp_addr, &self.amqp_prefix).await?;
        self.wallet_db.drop_now().await?;
        self.inventory_db.drop_now().await?;
        Ok(())
    }
}

/// A gateway's own settings in a suite (before the servers and test overrides).
fn gateway_settings(
    inventory_url: String,
    wallet_url: String,
    amqp_prefix: &str,
    redis_prefix: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("INVENTORY_URL", inventory_url),
        ("WALLET_URL", wallet_url),
        ("AMQP_PREFIX", amqp_prefix.to_owned()),
        ("REDIS_KEY_PREFIX", redis_prefix.to_owned()),
        ("JWT_SECRET", JWT_SECRET.into()),
        ("GATEWAY_HTTP_ADDR", "127.0.0.1:0".into()),
        ("CATALOG_REFRESH_MS", "200".into()),
        ("PURCHASE_RATE_PER_SECOND", "0".into()),
        // Every test client is 127.0.0.1.
        ("CLIENT_RATE_PER_SECOND", "0".into()),
        ("AUDIT_LOG", "/dev/null".into()),
    ]
}

/// Waits until `gateway` consumes its own event queue: health answers before
/// the gateway has bound it, and events published before that never reach it
/// (its WatchOrder streams then learn by polling), so tests start once it does.
async fn consuming(gateway: ServiceProcess) -> anyhow::Result<ServiceProcess> {
    gateway.wait_for_gauge("flashsale_order_events_consumer_up", 1.0).await?;
    Ok(gateway)
}

/// The first of a non-empty list of processes, and the rest.
fn first_and_rest(mut processes: Vec<ServiceProcess>) -> (ServiceProcess, Vec<ServiceProcess>) {
    let first = processes.remove(0);
    (first, processes)
}
