//! Many instances, one truth: 3 gateways, 2 inventory consumers and 2 wallets,
//! each a separate process of the real binaries, sharing the databases, Redis
//! and the queues as replicas do, with buyers spread over the gateways. One
//! process of each kind is killed (SIGKILL) mid-sale and started again; the
//! audit must stay exact, and whichever gateway a buyer reaches must tell the
//! same truth: the sold-out answer, and `WatchOrder` of an order placed
//! through another gateway.

use std::time::Duration;

use flashsale_integration_tests::binaries::{Backing, BinarySuite, Instances, Service, scrape, sum};
use flashsale_integration_tests::error_reason;
use flashsale_integration_tests::suite::with_token;
use flashsale_proto::common::v1::{Money, OrderStatus};
use flashsale_proto::gateway::v1::flash_sale_gateway_client::FlashSaleGatewayClient;
use flashsale_proto::gateway::v1::{CreateItemRequest, PurchaseRequest, TopUpRequest, WatchOrderRequest};
use tonic::transport::Channel;

use crate::common::{at, usd};
use crate::sale::{self, ITEM};

fn token(user: &str, admin: bool) -> String {
    let secret = flashsale_integration_tests::suite::JWT_SECRET;
    flashsale_gateway::auth::mint(secret, user, admin, Duration::from_secs(3600)).unwrap_or_default()
}

async fn gateway_client(port: u16) -> anyhow::Result<FlashSaleGatewayClient<Channel>> {
    Ok(FlashSaleGatewayClient::new(Channel::from_shared(format!("http://127.0.0.1:{port}"))?.connect().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_two_inventories_two_wallets_lose_nothing_when_one_of_each_is_killed() -> anyhow::Result<()> {
    let _machine = flashsale_integration_tests::suite::whole_machine().await;
    // Bounded as a whole, like the storms: a hang fails this test, not the run.
    flashsale_integration_tests::within(Duration::from_secs(360), "the cluster storm", async {
        // An admission the killed gateway never published is published again soon.
        let own = [(Service::Gateway, "UNRECORDED_GRACE_MS", "2000".to_owned())];
        let instances = Instances { wallets: 2, inventories: 2, gateways: 3 };
        let mut suite = BinarySuite::spawn_cluster_on(&Backing::default(), &[], &own, instances).await?;
        let ports = suite.gateway_ports();

        let sale = sale::open(&suite).await?;
        // The second process of each kind: gateway 1 serves a quarter of the
        // buyers, inventory 1 competes for the orders queue, wallet 1 takes
        // inventory 1's payments and gateway 1's reads.
        for (service, after) in [(Service::Gateway, 6), (Service::Inventory, 12), (Service::Wallet, 18)] {
            sale.accepted_at_least(after).await?;
            let mut processes = suite.instances(service);
            let victim = &mut processes[1];
            victim.kill().await?;
            victim.restart_without("FAILPOINTS").await?;
            sale.recovered();
            eprintln!("cluster: {service:?} 1 killed with {} orders accepted, started again", sale.accepted());
        }
        let outcome = sale.close().await?;
        let audited = sale::audit_sale(&suite, &outcome, "cluster").await?;
        eprintln!(
            "cluster: {} accepted, {} recorded, all final {:?} after the buying ended, refusals {:?}",
            outcome.accepted.len(),
            audited.recorded,
            audited.settled_in,
            outcome.refusals
        );

        // The work was spread: the gateways that were not killed both admitted
        // buyers, and both inventory consumers and both wallets did some of it.
        for port in [ports[0], ports[2]] {
            let gateway = suite.instances(Service::Gateway).into_iter().find(|g| g.grpc_port == port);
            let url = gateway.ok_or_else(|| anyhow::anyhow!("no gateway on {port}"))?.metrics_url();
            let attempts = sum(&scrape(&url).await?, "flashsale_purchase_attempts_total", &[]);
            assert!(attempts > 0.0, "the gateway on {port} served no purchase");
        }
        let inventory_url = suite.inventory.metrics_url();
        let delivered = sum(&scrape(&inventory_url).await?, "flashsale_orders_delivered_total", &[]);
        assert!(delivered > 0.0, "inventory 0 consumed no order");

        // Sold out, whichever gateway is asked.
        let admin = token("operator", true);
        let late = "late-buyer";
        suite
            .admin()
            .top_up(with_token(
                TopUpRequest {
                    user_id: late.into(),
                    amount: Some(Money { currency: "USD".into(), amount_minor: 10_000 }),
                    idempotency_key: String::new(),
                },
                &admin,
            ))
            .await?;
        for &port in &ports {
            let request = PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: String::new() };
            let refused = gateway_client(port)
                .await?
                .purchase(with_token(request, &token(late, false)))
                .await
                .expect_err("bought after the sale sold out");
            assert_eq!(error_reason(&refused).as_deref(), Some("SOLD_OUT"), "gateway on {port}: {refused:?}");
        }

        // An order placed through one gateway, watched through another, to its end.
        suite
            .admin()
            .create_item(with_token(
                CreateItemRequest {
                    id: "encore".into(),
                    name: "encore".into(),
                    price: usd(500),
                    stock_total: 5,
                    per_user_limit: 1,
                    starts_at: at(Duration::from_secs(1), false),
                    ends_at: at(Duration::from_secs(3600), true),
                    admission_buckets: 0,
                },
                &admin,
            ))
            .await?;
        let request = PurchaseRequest { item_id: "encore".into(), quantity: 1, idempotency_key: "encore-1".into() };
        let placed =
            gateway_client(ports[0]).await?.purchase(with_token(request, &token(late, false))).await?.into_inner();
        let mut stream = gateway_client(ports[2])
            .await?
            .watch_order(with_token(WatchOrderRequest { order_id: placed.order_id.clone() }, &token(late, false)))
            .await?
            .into_inner();
        let mut last = None;
        while let Some(update) = tokio::time::timeout(Duration::from_secs(30), stream.message()).await?? {
            last = update.order.map(|order| order.status());
        }
        assert_eq!(last, Some(OrderStatus::Confirmed), "the watch through another gateway did not end CONFIRMED");
        suite.shutdown().await
    })
    .await
}
