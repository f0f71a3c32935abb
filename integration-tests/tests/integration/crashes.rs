//! Exact crash points and graceful stops: the three real binaries, built with
//! their crash points compiled in (`flashsale_server::crash_point`), in a sale
//! where every buyer can pay. Either one service is started with `FAILPOINTS` so
//! that it aborts at one named point, mid-sale, the same way every run; or it
//! gets SIGTERM mid-sale and must exit cleanly. The test sees it end, starts it
//! again on the same ports (without the crash point), and audits the databases
//! and Redis: every accepted order final, exactly the stock sold, nobody charged
//! twice, money conserved, Redis back in agreement, nothing dead-lettered.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flashsale_integration_tests::audit::{audit, redis_agrees, wait_until_admissions_final, wait_until_settled};
use flashsale_integration_tests::binaries::{BinarySuite, Service};
use flashsale_integration_tests::error_reason;
use flashsale_integration_tests::suite::with_token;
use flashsale_proto::common::v1::{Money, OrderStatus};
use flashsale_proto::gateway::v1::flash_sale_gateway_client::FlashSaleGatewayClient;
use flashsale_proto::gateway::v1::{
    CreateItemRequest, GetItemStatsRequest, GetOrderRequest, PurchaseRequest, TopUpRequest,
};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::common::{at, usd};

const ITEM: &str = "crash-drop";
const PRICE: i64 = 1_000;
const STOCK: u32 = 30;
const BUYERS: usize = 90;
/// Buyers arrive one every this long, so the sale spans many batches and the
/// crash lands mid-sale rather than on the first message.
const ARRIVAL_GAP: Duration = Duration::from_millis(25);
/// Buyers give up after this long (every unit must be sold well before).
const BUYING_WINDOW: Duration = Duration::from_secs(90);
/// SIGABRT: what `crash_point` ends the process with.
const SIGABRT: i32 = 6;

fn token(user: &str, admin: bool) -> String {
    let secret = flashsale_integration_tests::suite::JWT_SECRET;
    flashsale_gateway::auth::mint(secret, user, admin, Duration::from_secs(3600)).unwrap_or_default()
}

#[derive(Default)]
struct Seen {
    accepted: BTreeSet<String>,
    /// Answers other than ACCEPTED, by reason or code.
    refusals: std::collections::BTreeMap<String, u64>,
    /// When an order was first accepted after the crashed service came back.
    first_accept_after_restart: Option<Instant>,
}

/// How the service ends mid-sale.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Aborts at the crash point `point` once it has passed it `passes` times.
    CrashAt { point: &'static str, passes: u32 },
    /// Gets SIGTERM once buyers were told ACCEPTED this many times.
    TerminateAfter(usize),
}

/// Runs the sale with `service` ended by `fault`.
async fn fault_mid_sale(service: Service, fault: Fault) -> anyhow::Result<()> {
    let _machine = flashsale_integration_tests::suite::whole_machine().await;
    let (point, failpoints) = match fault {
        Fault::CrashAt { point, passes } => (point.to_owned(), format!("{point}={passes}*off->return")),
        Fault::TerminateAfter(_) => (format!("SIGTERM of {service:?}"), String::new()),
    };
    let point = point.as_str();
    // An admission the dead gateway never published is published again soon.
    let mut own = vec![(Service::Gateway, "UNRECORDED_GRACE_MS", "2000".to_owned())];
    if !failpoints.is_empty() {
        own.push((service, "FAILPOINTS", failpoints));
    }
    let mut suite = BinarySuite::spawn_with_service_envs(&[], &own).await?;
    let admin = token("operator", true);
    suite
        .admin()
        .create_item(with_token(
            CreateItemRequest {
                id: ITEM.into(),
                name: "crash drop".into(),
                price: usd(PRICE),
                stock_total: STOCK,
                per_user_limit: 1,
                starts_at: at(Duration::from_secs(1), false),
                ends_at: at(Duration::from_secs(3600), true),
            },
            &admin,
        ))
        .await?;
    futures::stream::iter(0..BUYERS)
        .map(|n| {
            let mut client = suite.admin();
            let request = TopUpRequest {
                user_id: format!("c{n}"),
                amount: Some(Money { currency: "USD".into(), amount_minor: 2 * PRICE }),
                idempotency_key: format!("seed-c{n}"),
            };
            let admin = admin.clone();
            async move { client.top_up(with_token(request, &admin)).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let done = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(Mutex::new(None::<Instant>));
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(suite.new_gateway_channel().await?);
    }
    let started = Instant::now();
    let buyers: Vec<_> = (0..BUYERS)
        .map(|n| {
            let client = FlashSaleGatewayClient::new(channels[n % channels.len()].clone());
            let (seen, done, restarted) = (seen.clone(), done.clone(), restarted.clone());
            tokio::spawn(async move {
                // The arrival schedule of the crowd, not a wait for a condition.
                tokio::time::sleep(ARRIVAL_GAP * n as u32).await;
                buyer(client, format!("c{n}"), seen, done, restarted).await
            })
        })
        .collect();
    let watcher = {
        let mut admin_client = suite.admin();
        let (done, admin) = (done.clone(), admin.clone());
        tokio::spawn(async move {
            loop {
                let request = with_token(GetItemStatsRequest { item_id: ITEM.into() }, &admin);
                if let Ok(stats) = admin_client.get_item_stats(request).await
                    && stats.into_inner().units_sold >= u64::from(STOCK)
                {
                    done.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // The fault itself: the process must die at the point, by SIGABRT, or exit
    // cleanly on SIGTERM once its in-flight work is done.
    if let Fault::TerminateAfter(after) = fault {
        while seen.lock().accepted.len() < after {
            anyhow::ensure!(started.elapsed() < BUYING_WINDOW, "the sale never reached {after} accepted orders");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        suite.process(service).terminate().await?;
    }
    let status = suite.process(service).exited(BUYING_WINDOW).await?;
    let crashed_after = started.elapsed();
    match fault {
        Fault::CrashAt { .. } => {
            assert_eq!(status.signal(), Some(SIGABRT), "{point}: the process ended otherwise: {status:?}")
        }
        Fault::TerminateAfter(_) => assert!(status.success(), "{point}: not a clean exit: {status:?}"),
    }
    let accepted_before = seen.lock().accepted.len();
    suite.process(service).restart_without("FAILPOINTS").await?;
    let back = Instant::now();
    *restarted.lock() = Some(back);
    eprintln!(
        "crash {point}: ended {crashed_after:?} into the sale with {accepted_before} orders accepted; started again"
    );

    for task in futures::future::join_all(buyers).await {
        task??;
    }
    watcher.abort();
    let accepted = seen.lock().accepted.clone();
    wait_until_admissions_final(&suite.redis_prefix, &[ITEM], Duration::from_secs(60)).await?;
    wait_until_settled(&suite.databases(), &accepted, Duration::from_secs(60)).await?;
    let settled_after = back.elapsed();
    // Every invariant of the ledger and the orders (money conserved, one debit
    // per order, no user above the limit, nothing sold beyond the stock).
    let report = audit(&suite.databases()).await?;
    redis_agrees(&suite.redis_prefix, &report, Duration::from_secs(5)).await?;
    let sold = report.confirmed_units.get(ITEM).copied().unwrap_or(0);
    assert_eq!(sold, i64::from(STOCK), "{point}: {sold}/{STOCK} sold though every buyer could pay");
    let recorded: BTreeSet<&str> = report.orders.iter().map(|o| o.id.as_str()).collect();
    for id in &accepted {
        assert!(recorded.contains(id.as_str()), "{point}: accepted order {id} was lost");
    }
    assert!(
        report.orders.iter().all(|o| o.status == "CONFIRMED" || o.status == "REJECTED"),
        "{point}: an order is not final"
    );
    let topology = flashsale_messaging::Topology::with_prefix(&suite.amqp_prefix);
    for queue in topology.work_queues() {
        let (dead, _) = flashsale_integration_tests::suite::queue_depth(&format!("{queue}.dead")).await?;
        assert_eq!(dead, 0, "{point}: messages dead-lettered from {queue}");
    }
    let (to_accept, refusals) = {
        let seen = seen.lock();
        (seen.first_accept_after_restart.map(|at| at.saturating_duration_since(back)), seen.refusals.clone())
    };
    eprintln!(
        "crash {point}: {} accepted, {} recorded, {sold}/{STOCK} sold, lost 0, duplicated 0; first accept after \
         the restart {to_accept:?}, all final {settled_after:?} after it; refusals {refusals:?}",
        accepted.len(),
        report.orders.len(),
    );
    suite.shutdown().await
}

/// One buyer: buys until served, or the item is sold out for good. After an
/// answer that says nothing (the gateway died, the call failed in transit) the
/// buyer retries under the same key, as the API asks.
async fn buyer(
    mut client: FlashSaleGatewayClient<Channel>,
    name: String,
    seen: Arc<Mutex<Seen>>,
    done: Arc<AtomicBool>,
    restarted: Arc<Mutex<Option<Instant>>>,
) -> anyhow::Result<()> {
    let token = token(&name, false);
    let deadline = Instant::now() + BUYING_WINDOW;
    let mut round = 0;
    let mut same_key = false;
    loop {
        if !same_key {
            round += 1;
        }
        same_key = false;
        let request =
            PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: format!("{name}-r{round}") };
        match client.purchase(with_token(request, &token)).await {
            Ok(reply) => {
                let order_id = reply.into_inner().order_id;
                {
                    let mut seen = seen.lock();
                    seen.accepted.insert(order_id.clone());
                    if seen.first_accept_after_restart.is_none() && restarted.lock().is_some() {
                        seen.first_accept_after_restart = Some(Instant::now());
                    }
                }
                match follow(&mut client, &token, &order_id, deadline).await? {
                    OrderStatus::Confirmed => return Ok(()),
                    other => anyhow::bail!("{name}: order {order_id} ended {other:?} though the buyer could pay"),
                }
            }
            Err(status) => {
                let reason = error_reason(&status).unwrap_or_else(|| format!("{:?}", status.code()));
                *seen.lock().refusals.entry(reason.clone()).or_default() += 1;
                match reason.as_str() {
                    "SOLD_OUT" | "PURCHASE_IN_PROGRESS" => {}
                    // One unit per buyer: an earlier attempt whose answer was lost got it.
                    "LIMIT_REACHED" => return Ok(()),
                    // No answer: the order may exist, so the same key again.
                    _ if is_no_answer(&status) => same_key = true,
                    _ => anyhow::bail!("{name}: unexpected answer {status:?}"),
                }
            }
        }
        if done.load(Ordering::Relaxed) || Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A call that ended without the service's answer: the gateway was down or died
/// mid-call (the client's own transport error), or it said UNAVAILABLE.
fn is_no_answer(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded)
        || (status.code() == Code::Unknown && status.metadata().is_empty())
}

/// Follows an order until it is final, as a buyer's app does, through restarts.
async fn follow(
    client: &mut FlashSaleGatewayClient<Channel>,
    token: &str,
    order_id: &str,
    deadline: Instant,
) -> anyhow::Result<OrderStatus> {
    loop {
        match client.get_order(with_token(GetOrderRequest { order_id: order_id.into() }, token)).await {
            Ok(reply) => {
                let order = reply.into_inner().order.ok_or_else(|| anyhow::anyhow!("no order in the reply"))?;
                if order.status() != OrderStatus::Pending {
                    return Ok(order.status());
                }
            }
            Err(status) if is_no_answer(&status) => {}
            Err(status) => anyhow::bail!("GetOrder {order_id}: {status:?}"),
        }
        anyhow::ensure!(Instant::now() < deadline, "order {order_id} not final in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_between_reservation_and_publish() -> anyhow::Result<()> {
    fault_mid_sale(Service::Gateway, Fault::CrashAt { point: "gateway-before-publish", passes: 8 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_between_publish_confirm_and_reply() -> anyhow::Result<()> {
    fault_mid_sale(Service::Gateway, Fault::CrashAt { point: "gateway-before-reply", passes: 8 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_killed_between_commit_and_ack() -> anyhow::Result<()> {
    fault_mid_sale(Service::Inventory, Fault::CrashAt { point: "inventory-before-ack", passes: 2 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_killed_between_debit_and_final_state() -> anyhow::Result<()> {
    fault_mid_sale(Service::Inventory, Fault::CrashAt { point: "inventory-before-settle", passes: 2 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_killed_between_commit_and_reply() -> anyhow::Result<()> {
    fault_mid_sale(Service::Wallet, Fault::CrashAt { point: "wallet-before-reply", passes: 2 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_killed_between_publish_and_delete() -> anyhow::Result<()> {
    fault_mid_sale(Service::Inventory, Fault::CrashAt { point: "outbox-before-delete", passes: 2 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_terminated_mid_sale() -> anyhow::Result<()> {
    fault_mid_sale(Service::Gateway, Fault::TerminateAfter(8)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_terminated_mid_sale() -> anyhow::Result<()> {
    fault_mid_sale(Service::Inventory, Fault::TerminateAfter(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_terminated_mid_sale() -> anyhow::Result<()> {
    fault_mid_sale(Service::Wallet, Fault::TerminateAfter(5)).await
}
