//! A network partition of one replica: three gateways share a sale, and the
//! third runs on a host of its own (a network namespace) that reaches Redis,
//! RabbitMQ and the upstream services over separate links. Mid-sale its Redis
//! link is taken down at the kernel (packets dropped both ways, nothing reset),
//! brought back, then its RabbitMQ link likewise. While cut off, the gateway
//! must answer its buyers `UNAVAILABLE` (retry-safe) and never a wrong answer;
//! buyers whose calls go unanswered fail over to another gateway under the
//! same key; once the link is back the gateway sells again; and the audit
//! stays exact: exactly the stock sold, nothing accepted lost, every order
//! final, no double charge.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use flashsale_integration_tests::audit::{wait_until_admissions_final_at, wait_until_settled};
use flashsale_integration_tests::binaries::{Backing, BinarySuite, Instances, Place, Service};
use flashsale_integration_tests::error_reason;
use flashsale_integration_tests::netns::NetworkHost;
use flashsale_integration_tests::suite::with_token;
use flashsale_proto::common::v1::Money;
use flashsale_proto::gateway::v1::flash_sale_gateway_client::FlashSaleGatewayClient;
use flashsale_proto::gateway::v1::{CreateItemRequest, PurchaseRequest, PurchaseResponse, TopUpRequest};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::common::{at, usd};
use crate::sale::{self, ITEM, Shape};

/// A second item, bought only through the cut-off gateway, so its answers can
/// be read whatever the sale's state (the sold-out answer needs no Redis).
const PROBE: &str = "partition-probe";
const PROBE_PRICE: i64 = 100;
const PROBE_STOCK: u32 = 200;
const PROBER: &str = "prober";
/// Buyers arrive over 54 s, and every unit sells as a buyer arrives, so the
/// stock lasts about 45 s: past both cuts. They fail over, so the sale goes on.
const SHAPE: Shape = Shape {
    stock: 300,
    buyers: 360,
    arrival_gap: Duration::from_millis(150),
    fail_over: true,
    buckets: 1,
    buyer_buckets: None,
};

fn token(user: &str, admin: bool) -> String {
    let secret = flashsale_integration_tests::suite::JWT_SECRET;
    flashsale_gateway::auth::mint(secret, user, admin, Duration::from_secs(3600)).unwrap_or_default()
}

/// The host and port of a `redis://` or `amqp://` URL.
fn address_of(url: &str) -> anyhow::Result<SocketAddr> {
    let url = reqwest::Url::parse(url)?;
    let host = url.host_str().context("no host")?;
    let port = url.port().context("no port")?;
    Ok(SocketAddr::new(host.parse()?, port))
}

/// `url` with its host and port replaced by `address`.
fn via(url: &str, address: SocketAddr) -> anyhow::Result<String> {
    let mut url = reqwest::Url::parse(url)?;
    url.set_ip_host(address.ip()).map_err(|()| anyhow::anyhow!("cannot set the host"))?;
    url.set_port(Some(address.port())).map_err(|()| anyhow::anyhow!("cannot set the port"))?;
    Ok(url.into())
}

/// The prober's purchases through one gateway.
struct Prober {
    client: FlashSaleGatewayClient<Channel>,
    token: String,
    round: u32,
    /// The last attempt got no verdict (UNAVAILABLE, or no answer): the next
    /// goes under the same key, as the API asks, so it cannot buy twice.
    same_key: bool,
    /// Orders the gateway accepted: they must all end final.
    accepted: BTreeSet<String>,
}

enum Answer {
    Accepted,
    Unavailable,
    /// The prober's last order is still settling (one at a time per buyer).
    InProgress,
    /// No answer within the client's timeout, or the connection failed.
    Silent,
}

impl Prober {
    /// One attempt, under a fresh key unless the last one got no verdict.
    async fn buy(&mut self) -> anyhow::Result<Answer> {
        if !self.same_key {
            self.round += 1;
        }
        let request =
            PurchaseRequest { item_id: PROBE.into(), quantity: 1, idempotency_key: format!("probe-{}", self.round) };
        let call = self.client.purchase(with_token(request, &self.token));
        let outcome = tokio::time::timeout(Duration::from_secs(15), call).await;
        let answer = self.answer(outcome)?;
        self.same_key = matches!(answer, Answer::Unavailable | Answer::Silent);
        Ok(answer)
    }

    fn answer(
        &mut self,
        outcome: Result<Result<tonic::Response<PurchaseResponse>, tonic::Status>, tokio::time::error::Elapsed>,
    ) -> anyhow::Result<Answer> {
        match outcome {
            Err(_) => Ok(Answer::Silent),
            Ok(Ok(reply)) => {
                self.accepted.insert(reply.into_inner().order_id);
                Ok(Answer::Accepted)
            }
            Ok(Err(status))
                if status.code() == tonic::Code::Unavailable && std::error::Error::source(&status).is_none() =>
            {
                // The gateway's own answer (a transport failure carries a source).
                Ok(Answer::Unavailable)
            }
            Ok(Err(status)) if std::error::Error::source(&status).is_some() => Ok(Answer::Silent),
            Ok(Err(status)) if error_reason(&status).as_deref() == Some("PURCHASE_IN_PROGRESS") => {
                Ok(Answer::InProgress)
            }
            Ok(Err(status)) => anyhow::bail!("the cut-off gateway answered {status:?} ({:?})", error_reason(&status)),
        }
    }

    /// Buys until the gateway answers UNAVAILABLE (60 s at most); accepted
    /// purchases before that are kept. Returns how long it took.
    async fn until_unavailable(&mut self) -> anyhow::Result<Duration> {
        let from = Instant::now();
        loop {
            match self.buy().await? {
                Answer::Unavailable => return Ok(from.elapsed()),
                Answer::Accepted | Answer::Silent => {}
                Answer::InProgress => {
                    // A client told to come back, not a wait for a condition.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            anyhow::ensure!(from.elapsed() < Duration::from_secs(60), "the cut-off gateway never said UNAVAILABLE");
        }
    }

    /// Buys until the gateway accepts again (90 s at most): how long it took.
    async fn until_accepted(&mut self) -> anyhow::Result<Duration> {
        let from = Instant::now();
        loop {
            if let Answer::Accepted = self.buy().await? {
                return Ok(from.elapsed());
            }
            anyhow::ensure!(
                from.elapsed() < Duration::from_secs(90),
                "the gateway did not sell again after the link returned"
            );
            // Between attempts of a client told to come back, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_from_redis_then_from_rabbitmq_mid_sale_answers_unavailable_and_loses_nothing()
-> anyhow::Result<()> {
    let _machine = flashsale_integration_tests::suite::whole_machine().await;
    flashsale_integration_tests::within(Duration::from_secs(360), "the partition storm", async {
        // An admission whose publish went unanswered is published again soon.
        let grace = ("UNRECORDED_GRACE_MS", "2000".to_owned());
        let own = [(Service::Gateway, grace.0, grace.1.clone())];
        let instances = Instances { wallets: 1, inventories: 1, gateways: 2 };
        let mut suite = BinarySuite::spawn_cluster_on(&Backing::default(), &[], &own, instances).await?;

        // The third gateway's host: clients and upstream services on `front`,
        // Redis and RabbitMQ each on a link of its own.
        let mut host = NetworkHost::create(&["front", "redis", "amqp"]).await?;
        let redis = host.forward("redis", address_of(&suite.redis_url)?).await?;
        let amqp = host.forward("amqp", address_of(&suite.amqp_addr)?).await?;
        let inventory = host.forward("front", address_of(&suite.inventory.grpc_url())?).await?;
        let wallet = host.forward("front", address_of(&suite.wallet.grpc_url())?).await?;
        let env = [
            ("REDIS_URL", via(&suite.redis_url, redis)?),
            ("AMQP_ADDR", via(&suite.amqp_addr, amqp)?),
            ("INVENTORY_URL", format!("http://{inventory}")),
            ("WALLET_URL", format!("http://{wallet}")),
            grace,
        ];
        let cut_off = suite.add_gateway(Place::in_host(&host, "front")?, &env).await?.grpc_url();

        let admin = token("operator", true);
        suite
            .admin()
            .create_item(with_token(
                CreateItemRequest {
                    id: PROBE.into(),
                    name: "partition probe".into(),
                    price: usd(PROBE_PRICE),
                    stock_total: PROBE_STOCK,
                    per_user_limit: PROBE_STOCK,
                    starts_at: at(Duration::from_secs(1), false),
                    ends_at: at(Duration::from_secs(3600), true),
                    admission_buckets: 0,
                },
                &admin,
            ))
            .await?;
        let funds = Money { currency: "USD".into(), amount_minor: PROBE_PRICE * i64::from(PROBE_STOCK) };
        let top_up =
            TopUpRequest { user_id: PROBER.into(), amount: Some(funds), idempotency_key: "probe-funds".into() };
        suite.admin().top_up(with_token(top_up, &admin)).await?;
        let channel = Channel::from_shared(cut_off.clone())?.connect().await?;
        let mut prober = Prober {
            client: FlashSaleGatewayClient::new(channel),
            token: token(PROBER, false),
            round: 0,
            same_key: false,
            accepted: BTreeSet::new(),
        };
        // It sells before any cut.
        prober.until_accepted().await?;

        let sale = sale::open_shaped(&suite, SHAPE).await?;
        for link in ["redis", "amqp"] {
            sale.accepted_at_least(sale.accepted() + 10).await?;
            host.cut(link).await?;
            let accepted_before = sale.accepted();
            let refused_in = prober.until_unavailable().await?;
            // The rest of the crowd still buys through the other gateways.
            sale.accepted_at_least(accepted_before + 1).await?;
            host.restore(link).await?;
            sale.recovered();
            let back_in = prober.until_accepted().await?;
            eprintln!(
                "partition: {link} link cut with {accepted_before} accepted; UNAVAILABLE after {refused_in:?}; \
                 the sale went on ({} accepted); selling again {back_in:?} after the link returned",
                sale.accepted()
            );
        }
        let outcome = sale.close().await?;

        // Every probe purchase the cut-off gateway accepted ends final.
        wait_until_admissions_final_at(&suite.redis_url, &suite.redis_prefix, &[PROBE], Duration::from_secs(60))
            .await?;
        wait_until_settled(&suite.databases(), &prober.accepted, Duration::from_secs(60)).await?;
        let audited = sale::audit_sale(&suite, &outcome, "partition").await?;
        // Retried under the same key after each UNAVAILABLE, the prober holds
        // exactly the orders it was told of: none made behind a refusal.
        let report = flashsale_integration_tests::audit::audit(&suite.databases()).await?;
        let probes: BTreeSet<String> =
            report.orders.iter().filter(|o| o.item_id == PROBE).map(|o| o.id.clone()).collect();
        anyhow::ensure!(
            probes == prober.accepted,
            "probe orders {probes:?}, the prober was told of {:?}",
            prober.accepted
        );
        eprintln!(
            "partition: {} accepted, {} recorded ({} probes), all final {:?} after the buying ended, refusals {:?}",
            outcome.accepted.len(),
            audited.recorded,
            prober.accepted.len(),
            audited.settled_in,
            outcome.refusals
        );

        // Sold out, through the gateway that was cut off too.
        for url in suite.gateway_urls() {
            let request = PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: String::new() };
            let client = FlashSaleGatewayClient::new(Channel::from_shared(url.clone())?.connect().await?);
            let refused = client
                .clone()
                .purchase(with_token(request, &token("late-buyer", false)))
                .await
                .expect_err("bought more");
            assert_eq!(
                error_reason(&refused).as_deref(),
                Some("SOLD_OUT"),
                "gateway {url} after the sale: {refused:?}"
            );
        }
        drop(host);
        suite.shutdown().await
    })
    .await
}
