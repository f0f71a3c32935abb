//! The seeded soak: many short sales ([`crate::sale`]) against the real
//! binaries on a private PostgreSQL cluster, redis-server and RabbitMQ node,
//! each run with faults drawn from its seed: a crash point armed in one service,
//! and one or two of SIGKILL or SIGTERM of a service, a PostgreSQL stop (fast or
//! immediate, down 0.5–3 s), a Redis restart (everything lost) or a RabbitMQ
//! restart, each at a drawn moment of the sale. The item's stock is spread over
//! 1, 2 or 4 buckets, and one run in five keeps its admission state on a Redis
//! Cluster of its own (3 masters, 3 replicas) instead, where the Redis fault is
//! the SIGKILL of the master serving one of the item's buckets (the replica
//! takes over, without what it had not copied yet). Every run ends with the
//! full audit.
//!
//! `SOAK_RUNS` runs (default 3, what CI runs) from seed `SOAK_SEED` (default 1)
//! up. A failing run prints the command that replays its seed and ends the
//! test, unless `SOAK_KEEP_GOING=1`: then the soak carries on with fresh servers
//! and fails at the end, listing every failed seed. The long soak:
//! `SOAK_KEEP_GOING=1 SOAK_RUNS=1000 SOAK_SEED=1000 cargo test -p flashsale-integration-tests --test integration soak:: -- --nocapture`.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use flashsale_integration_tests::backing::{
    PrivatePostgres, PrivateRabbit, PrivateRedis, PrivateRedisCluster, StopMode,
};
use flashsale_integration_tests::binaries::{Backing, BinarySuite, Service, ServiceProcess};
use rand::{Rng, SeedableRng};

use crate::crashes::SIGABRT;
use crate::sale::{self, BUYING_WINDOW, STOCK, Shape};

/// Every crash point, by service.
const POINTS: [(Service, &str); 7] = [
    (Service::Gateway, "gateway-before-hold"),
    (Service::Gateway, "gateway-before-publish"),
    (Service::Gateway, "gateway-before-reply"),
    (Service::Inventory, "inventory-before-ack"),
    (Service::Inventory, "inventory-before-settle"),
    (Service::Inventory, "outbox-before-delete"),
    (Service::Wallet, "wallet-before-reply"),
];
const SERVICES: [Service; 3] = [Service::Gateway, Service::Inventory, Service::Wallet];
/// Far beyond any run's own bounds (buying window, settlement, restarts).
const RUN_LIMIT: Duration = Duration::from_secs(600);
/// Far beyond the slowest fault (a RabbitMQ restart takes up to 10 s here).
const FAULT_LIMIT: Duration = Duration::from_secs(180);

/// A fault injected at a moment of the sale.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill(Service),
    Terminate(Service),
    Postgres(StopMode, Duration),
    Redis,
    /// SIGKILL of the cluster master serving this bucket's slot.
    RedisFailover(u32),
    Rabbit,
}

impl Fault {
    fn name(self) -> String {
        match self {
            Self::Kill(service) => format!("SIGKILL {service:?}"),
            Self::Terminate(service) => format!("SIGTERM {service:?}"),
            Self::Postgres(mode, _) => format!("PostgreSQL {mode:?} stop"),
            Self::Redis => "Redis restart".into(),
            Self::RedisFailover(_) => "Redis Cluster master killed".into(),
            Self::Rabbit => "RabbitMQ restart".into(),
        }
    }
}

/// A run's faults, all drawn from its seed.
#[derive(Debug)]
struct Plan {
    /// Armed from the start: (service, point, passes before it fires).
    crash: Option<(Service, &'static str, u32)>,
    /// (accepted orders before it, fault), in order.
    timed: Vec<(usize, Fault)>,
    /// The item's stock buckets.
    buckets: u32,
    /// On a Redis Cluster of the run's own.
    cluster: bool,
}

fn plan(seed: u64) -> Plan {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let crash = rng.random_bool(0.5).then(|| {
        let (service, point) = POINTS[rng.random_range(0..POINTS.len())];
        (service, point, rng.random_range(0..6))
    });
    let count = if crash.is_some() { rng.random_range(0..=1) } else { rng.random_range(1..=2) };
    let mut timed: Vec<(usize, Fault)> = (0..count)
        .map(|_| {
            let service = SERVICES[rng.random_range(0..SERVICES.len())];
            let fault = match rng.random_range(0..6) {
                0 => Fault::Kill(service),
                1 => Fault::Terminate(service),
                2 => Fault::Postgres(
                    if rng.random_bool(0.5) { StopMode::Fast } else { StopMode::Immediate },
                    Duration::from_millis(rng.random_range(500..3_000)),
                ),
                3 => Fault::Redis,
                4 => Fault::Rabbit,
                _ => Fault::Kill(service),
            };
            (rng.random_range(1..STOCK as usize), fault)
        })
        .collect();
    // Drawn after the rest, so a seed's other faults are what they were
    // before buckets and clusters joined the soak.
    let buckets = [1, 2, 4][rng.random_range(0..3)];
    let cluster = rng.random_bool(0.2);
    if cluster {
        // A cluster cannot be restarted whole: its Redis fault is one master's
        // failover (at most one per run, so every slot keeps a replica to fail
        // over to), and a run without a drawn Redis fault gets one anyway.
        let bucket = rng.random_range(0..buckets);
        let mut failed_over = false;
        for (_, fault) in &mut timed {
            if matches!(fault, Fault::Redis) {
                *fault = if failed_over { Fault::Kill(Service::Gateway) } else { Fault::RedisFailover(bucket) };
                failed_over = true;
            }
        }
        if !failed_over {
            timed.push((rng.random_range(1..STOCK as usize), Fault::RedisFailover(bucket)));
        }
    }
    timed.sort_by_key(|(after, _)| *after);
    Plan { crash, timed, buckets, cluster }
}

/// The private servers every run uses (each run has its own databases, key
/// prefix and queue names on them).
struct Servers {
    postgres: PrivatePostgres,
    redis: PrivateRedis,
    rabbit: PrivateRabbit,
}

impl Servers {
    async fn start() -> anyhow::Result<Self> {
        Ok(Self {
            postgres: PrivatePostgres::start().await?,
            redis: PrivateRedis::start().await?,
            rabbit: PrivateRabbit::start().await?,
        })
    }
}

/// What one run did and saw.
#[derive(Default)]
struct Figures {
    /// "1 bucket", "4 buckets on a Redis Cluster", …
    shape: String,
    faults: Vec<String>,
    accepted: usize,
    recorded: usize,
    /// From the end of the last fault to the next accepted purchase.
    first_accept_after_recovery: Option<Duration>,
    settled_in: Duration,
}

async fn one_run(servers: &Servers, seed: u64) -> anyhow::Result<Figures> {
    let plan = plan(seed);
    let mut own = vec![(Service::Gateway, "UNRECORDED_GRACE_MS", "2000".to_owned())];
    if let Some((service, point, passes)) = plan.crash {
        own.push((service, "FAILPOINTS", format!("{point}={passes}*off->return")));
    }
    let cluster = match plan.cluster {
        true => {
            own.push((Service::Gateway, "REDIS_CLUSTER", "true".to_owned()));
            Some(PrivateRedisCluster::start().await?)
        }
        false => None,
    };
    let backing = Backing {
        database_server: Some(servers.postgres.url()),
        redis_url: Some(cluster.as_ref().map_or_else(|| servers.redis.url(), PrivateRedisCluster::urls)),
        amqp_addr: Some(servers.rabbit.url()),
    };
    let mut suite = BinarySuite::spawn_on(&backing, &[], &own).await?;
    let sale = sale::open_shaped(&suite, Shape { buckets: plan.buckets, ..Shape::DEFAULT }).await?;
    let mut figures = Figures {
        shape: format!(
            "{} bucket{}{}",
            plan.buckets,
            if plan.buckets == 1 { "" } else { "s" },
            if plan.cluster { " on a Redis Cluster" } else { "" }
        ),
        ..Figures::default()
    };
    let mut armed = plan.crash;
    let mut timed = plan.timed.into_iter().peekable();
    loop {
        if let Some((service, point, _)) = armed
            && let Some(status) = suite.process(service).try_exited()?
        {
            anyhow::ensure!(
                status.signal() == Some(SIGABRT),
                "{service:?} ended otherwise than at {point}: {status:?}"
            );
            suite.process(service).restart_without("FAILPOINTS").await?;
            sale.recovered();
            figures.faults.push(format!("crash at {point}"));
            armed = None;
        }
        if let Some(&(after, fault)) = timed.peek()
            && sale.accepted() >= after
        {
            timed.next();
            tokio::time::timeout(FAULT_LIMIT, inject(&mut suite, servers, cluster.as_ref(), fault, &mut armed))
                .await
                .map_err(|_| anyhow::anyhow!("{} did not finish within {FAULT_LIMIT:?}", fault.name()))??;
            sale.recovered();
            figures.faults.push(fault.name());
        }
        if sale.over() {
            break;
        }
        anyhow::ensure!(sale.started.elapsed() < BUYING_WINDOW * 2, "the sale did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A crash point not reached yet would fire while the orders settle: restart
    // that service without it (a graceful restart, one more fault survived).
    if let Some((service, point, _)) = armed {
        let process = suite.process(service);
        terminate(process, service).await?;
        process.restart_without("FAILPOINTS").await?;
        figures.faults.push(format!("{point} not reached; SIGTERM {service:?}"));
    }
    let outcome = sale.close().await?;
    let audited = sale::audit_sale(&suite, &outcome, &format!("seed {seed}")).await?;
    figures.accepted = outcome.accepted.len();
    figures.recorded = audited.recorded;
    figures.first_accept_after_recovery = outcome.first_accept_after_recovery;
    figures.settled_in = audited.settled_in;
    suite.shutdown().await?;
    Ok(figures)
}

async fn inject(
    suite: &mut BinarySuite,
    servers: &Servers,
    cluster: Option<&PrivateRedisCluster>,
    fault: Fault,
    armed: &mut Option<(Service, &'static str, u32)>,
) -> anyhow::Result<()> {
    match fault {
        Fault::Kill(service) | Fault::Terminate(service) => {
            let process = suite.process(service);
            if matches!(fault, Fault::Kill(_)) {
                if process.try_exited()?.is_none() {
                    process.kill().await?;
                }
            } else {
                terminate(process, service).await?;
            }
            process.restart_without("FAILPOINTS").await?;
            if armed.is_some_and(|(armed_service, _, _)| armed_service == service) {
                *armed = None;
            }
        }
        Fault::Postgres(mode, down) => {
            servers.postgres.stop(mode).await?;
            // The outage itself: its length is the fault being injected, not a wait.
            tokio::time::sleep(down).await;
            servers.postgres.start_again().await?;
        }
        Fault::Redis => {
            servers.redis.kill().await?;
            servers.redis.start_again().await?;
        }
        Fault::RedisFailover(bucket) => {
            let cluster = cluster.ok_or_else(|| anyhow::anyhow!("a failover drawn for a run without a cluster"))?;
            let tag = match bucket {
                0 => format!("{{{}}}", sale::ITEM),
                _ => format!("{{{}/{bucket}}}", sale::ITEM),
            };
            cluster.fail_over_master_of(&tag).await?;
        }
        Fault::Rabbit => {
            // Clean, as in a rolling restart: a SIGKILLed single RabbitMQ 3.10
            // node can come back with a quorum queue that never elects a leader
            // (integration-tests/RELIABILITY.md, "Found in the broker").
            servers.rabbit.stop().await?;
            servers.rabbit.start_again().await?;
        }
    }
    Ok(())
}

/// SIGTERM (unless it has ended already), and the exit it must make: clean, or
/// by SIGABRT when its armed crash point fired while it drained.
async fn terminate(process: &mut ServiceProcess, service: Service) -> anyhow::Result<()> {
    if process.try_exited()?.is_none() {
        process.terminate().await?;
    }
    let status = process.exited(Duration::from_secs(30)).await?;
    anyhow::ensure!(
        status.success() || status.signal() == Some(SIGABRT),
        "{service:?} did not stop cleanly on SIGTERM: {status:?}"
    );
    Ok(())
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value.parse().map_err(|e| anyhow::anyhow!("{name}={value:?}: {e}")),
        Err(_) => Ok(default),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_soak_loses_nothing() -> anyhow::Result<()> {
    let runs = env_u64("SOAK_RUNS", 3)?;
    let first = env_u64("SOAK_SEED", 1)?;
    let _machine = flashsale_integration_tests::suite::whole_machine().await;
    let keep_going = env_u64("SOAK_KEEP_GOING", 0)? != 0;
    let mut servers = Servers::start().await?;
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let mut shapes: BTreeMap<String, u64> = BTreeMap::new();
    let (mut orders, mut worst_accept, mut worst_settle) = (0, Duration::ZERO, Duration::ZERO);
    let mut failed = Vec::new();
    for seed in first..first + runs {
        // Every wait inside a run is bounded; this bounds what might not be
        // (a client library's call), so a hang fails its seed instead of the soak.
        let run = flashsale_integration_tests::within(RUN_LIMIT, "the run", one_run(&servers, seed)).await;
        let figures = match run {
            Ok(figures) => figures,
            Err(e) => {
                let failure = format!(
                    "soak run with seed {seed} failed ({:?}): {e:#}\nreplay it: SOAK_SEED={seed} SOAK_RUNS=1 cargo \
                     test -p flashsale-integration-tests --test integration soak:: -- --nocapture",
                    plan(seed)
                );
                anyhow::ensure!(keep_going, "{failure}");
                eprintln!("{failure}");
                failed.push(seed);
                // The failed run may have left a server stopped mid-fault: the
                // next runs get fresh ones.
                drop(servers);
                servers = Servers::start().await?;
                continue;
            }
        };
        eprintln!(
            "soak seed {seed} ({}): faults {:?}; {} accepted, {} recorded, {STOCK}/{STOCK} sold, lost 0, double debits 0; \
             first accept after the last fault {:?}; final {:?} after the buyers left",
            figures.shape,
            figures.faults,
            figures.accepted,
            figures.recorded,
            figures.first_accept_after_recovery,
            figures.settled_in
        );
        *shapes.entry(figures.shape.clone()).or_default() += 1;
        for fault in &figures.faults {
            *faults.entry(fault.clone()).or_default() += 1;
        }
        orders += figures.recorded;
        worst_accept = worst_accept.max(figures.first_accept_after_recovery.unwrap_or_default());
        worst_settle = worst_settle.max(figures.settled_in);
    }
    eprintln!(
        "soak: {runs} runs from seed {first} ({shapes:?}), {} faults {faults:?}, {orders} orders; lost 0, stuck 0, duplicated 0, \
         double debits 0, oversold 0; worst first accept after a fault {worst_accept:?}, worst time to all final \
         {worst_settle:?}",
        faults.values().sum::<u64>()
    );
    anyhow::ensure!(failed.is_empty(), "{} of {runs} soak runs failed: seeds {failed:?}", failed.len());
    Ok(())
}
