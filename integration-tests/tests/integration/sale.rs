//! A small sale against the real binaries, for the crash and soak tests: one
//! item, more buyers than units, every buyer able to pay, so the only right end
//! is exactly the stock sold. Buyers arrive over a second and keep trying until
//! served or the item is sold out; after a call that got no answer they retry
//! under the same key, as the API asks. [`audit_sale`] then checks everything
//! from the databases and Redis, not through the services.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use flashsale_integration_tests::audit::{
    audit, redis_agrees_at, wait_until_admissions_final_at, wait_until_holds_closed, wait_until_settled,
};
use flashsale_integration_tests::binaries::BinarySuite;
use flashsale_integration_tests::error_reason;
use flashsale_integration_tests::suite::with_token;
use flashsale_proto::common::v1::{Money, OrderStatus};
use flashsale_proto::gateway::v1::flash_sale_gateway_client::FlashSaleGatewayClient;
use flashsale_proto::gateway::v1::{
    CreateItemRequest, GetItemStatsRequest, GetOrderRequest, PurchaseRequest, TopUpRequest,
};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::common::{at, token, usd};

pub(crate) const ITEM: &str = "crash-drop";
const PRICE: i64 = 1_000;
pub(crate) const STOCK: u32 = 30;
const BUYERS: usize = 90;
/// Buyers arrive one every this long, so the sale spans many batches and a
/// fault lands mid-sale rather than on the first message.
const ARRIVAL_GAP: Duration = Duration::from_millis(25);

/// How big a sale is and how fast its crowd arrives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) stock: u32,
    pub(crate) buyers: usize,
    pub(crate) arrival_gap: Duration,
    /// A buyer whose call got no answer tries the next gateway (under the same
    /// key), as a client behind a load balancer ends up doing.
    pub(crate) fail_over: bool,
    /// Stock buckets of the item's admission state.
    pub(crate) buckets: u32,
    /// Only buyers bound to these buckets come (by the gateway's hash of the
    /// user id), so the other buckets' units sell only by being lent.
    pub(crate) buyer_buckets: Option<&'static [u32]>,
}

impl Shape {
    /// The crash and soak tests' sale: [`STOCK`] units, three buyers per unit.
    pub(crate) const DEFAULT: Self = Self {
        stock: STOCK,
        buyers: BUYERS,
        arrival_gap: ARRIVAL_GAP,
        fail_over: false,
        buckets: 1,
        buyer_buckets: None,
    };
}
/// Buyers give up after this long (every unit must be sold well before).
pub(crate) const BUYING_WINDOW: Duration = Duration::from_secs(90);
/// A buyer's app waits this long for an answer, then treats the call as
/// unanswered (and retries under the same key), so no call can hold the sale.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `call`, or DEADLINE_EXCEEDED once [`CALL_TIMEOUT`] has passed.
async fn bounded<T>(call: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, tonic::Status> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer within the buyer's timeout")))
}

#[derive(Default)]
struct Seen {
    accepted: BTreeSet<String>,
    /// Answers other than ACCEPTED, by reason or code.
    refusals: BTreeMap<String, u64>,
    /// When the last fault was recovered from, and the first accept after it.
    recovered_at: Option<Instant>,
    first_accept_after_recovery: Option<Duration>,
}

/// A sale in progress.
pub(crate) struct Sale {
    seen: Arc<Mutex<Seen>>,
    buyers: Vec<JoinHandle<anyhow::Result<()>>>,
    watcher: JoinHandle<()>,
    pub(crate) started: Instant,
    stock: u32,
}

/// What buyers saw, once they all left.
pub(crate) struct Outcome {
    pub(crate) accepted: BTreeSet<String>,
    pub(crate) refusals: BTreeMap<String, u64>,
    pub(crate) first_accept_after_recovery: Option<Duration>,
    stock: u32,
}

/// Creates the item, funds the buyers, and lets them in.
pub(crate) async fn open(suite: &BinarySuite) -> anyhow::Result<Sale> {
    open_shaped(suite, Shape::DEFAULT).await
}

/// As [`open`], for a sale of `shape`.
pub(crate) async fn open_shaped(suite: &BinarySuite, shape: Shape) -> anyhow::Result<Sale> {
    let Shape { stock, buyers, arrival_gap, fail_over, buckets, buyer_buckets } = shape;
    let spread = flashsale_gateway::admission::Spread::new(ITEM, buckets);
    let names: Vec<String> = (0..)
        .map(|n| format!("c{n}"))
        .filter(|name| buyer_buckets.is_none_or(|chosen| chosen.contains(&spread.bucket_of(name))))
        .take(buyers)
        .collect();
    let admin = token("operator", true);
    suite
        .admin()
        .create_item(with_token(
            CreateItemRequest {
                id: ITEM.into(),
                name: "crash drop".into(),
                price: usd(PRICE),
                stock_total: stock,
                per_user_limit: 1,
                starts_at: at(Duration::from_secs(1), false),
                ends_at: at(Duration::from_secs(3600), true),
                admission_buckets: buckets,
            },
            &admin,
        ))
        .await
        .context("creating the sale's item")?;
    futures::stream::iter(&names)
        .map(|name| {
            let mut client = suite.admin();
            let request = TopUpRequest {
                user_id: name.clone(),
                amount: Some(Money { currency: "USD".into(), amount_minor: 2 * PRICE }),
                idempotency_key: format!("seed-{name}"),
            };
            let admin = admin.clone();
            async move { client.top_up(with_token(request, &admin)).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .context("funding the buyers")?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let done = Arc::new(AtomicBool::new(false));
    let mut channels = Vec::new();
    // At least four connections, the same number to each gateway.
    let gateways = suite.gateway_urls().len();
    for _ in 0..4usize.div_ceil(gateways) * gateways {
        channels.push(suite.new_gateway_channel().await?);
    }
    let buyers = names
        .into_iter()
        .enumerate()
        .map(|(n, name)| {
            // Each buyer starts on its own gateway; failing over, it moves on in turn.
            let gateways = if fail_over { channels.len() } else { 1 };
            let clients = (0..gateways)
                .map(|k| FlashSaleGatewayClient::new(channels[(n + k) % channels.len()].clone()))
                .collect();
            let (seen, done) = (seen.clone(), done.clone());
            tokio::spawn(async move {
                // The arrival schedule of the crowd, not a wait for a condition.
                tokio::time::sleep(arrival_gap * n as u32).await;
                buyer(clients, name, seen, done).await
            })
        })
        .collect();
    let watcher = {
        let mut admin_client = suite.admin();
        tokio::spawn(async move {
            loop {
                let request = with_token(GetItemStatsRequest { item_id: ITEM.into() }, &admin);
                if let Ok(stats) = admin_client.get_item_stats(request).await
                    && stats.into_inner().units_sold >= u64::from(stock)
                {
                    done.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    Ok(Sale { seen, buyers, watcher, started: Instant::now(), stock })
}

impl Sale {
    /// How many purchases buyers were told ACCEPTED so far.
    pub(crate) fn accepted(&self) -> usize {
        self.seen.lock().accepted.len()
    }

    /// Whether every buyer has left.
    pub(crate) fn over(&self) -> bool {
        self.buyers.iter().all(JoinHandle::is_finished)
    }

    /// Marks the end of a fault: the next accept after now is timed.
    pub(crate) fn recovered(&self) {
        let mut seen = self.seen.lock();
        seen.recovered_at = Some(Instant::now());
        seen.first_accept_after_recovery = None;
    }

    /// Waits until `n` purchases were accepted, or the buying window closed.
    pub(crate) async fn accepted_at_least(&self, n: usize) -> anyhow::Result<()> {
        while self.accepted() < n {
            anyhow::ensure!(self.started.elapsed() < BUYING_WINDOW, "the sale never reached {n} accepted orders");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Waits for every buyer to leave.
    pub(crate) async fn close(self) -> anyhow::Result<Outcome> {
        for task in futures::future::join_all(self.buyers).await {
            task??;
        }
        self.watcher.abort();
        let seen = self.seen.lock();
        Ok(Outcome {
            accepted: seen.accepted.clone(),
            refusals: seen.refusals.clone(),
            first_accept_after_recovery: seen.first_accept_after_recovery,
            stock: self.stock,
        })
    }
}

/// What the audit measured.
pub(crate) struct Audited {
    pub(crate) recorded: usize,
    /// From the end of the buying to the last order final.
    pub(crate) settled_in: Duration,
}

/// Waits until every accepted order is final, then checks every invariant: no
/// accepted order lost, all final, exactly the stock sold, one live order per
/// key, one debit per paid order, money conserved, no negative balance, Redis
/// in agreement with PostgreSQL within 5 s, nothing dead-lettered.
pub(crate) async fn audit_sale(suite: &BinarySuite, outcome: &Outcome, label: &str) -> anyhow::Result<Audited> {
    let from = Instant::now();
    wait_until_admissions_final_at(&suite.redis_url, &suite.redis_prefix, &[ITEM], Duration::from_secs(60)).await?;
    wait_until_settled(&suite.databases(), &outcome.accepted, Duration::from_secs(60)).await?;
    let settled_in = from.elapsed();
    let report = audit(&suite.databases()).await?;
    redis_agrees_at(&suite.redis_url, &suite.redis_prefix, &report, Duration::from_secs(5)).await?;
    // Every hold ended: captured by its order's payment, or released (a void
    // retried until the wallet answers, or the expiry).
    wait_until_holds_closed(&suite.databases(), Duration::from_secs(90)).await.context(label.to_owned())?;
    let sold = report.confirmed_units.get(ITEM).copied().unwrap_or(0);
    let stock = outcome.stock;
    anyhow::ensure!(sold == i64::from(stock), "{label}: {sold}/{stock} sold though every buyer could pay");
    let recorded: BTreeSet<&str> = report.orders.iter().map(|o| o.id.as_str()).collect();
    for id in &outcome.accepted {
        anyhow::ensure!(recorded.contains(id.as_str()), "{label}: accepted order {id} was lost");
    }
    anyhow::ensure!(
        report.orders.iter().all(|o| o.status == "CONFIRMED" || o.status == "REJECTED"),
        "{label}: an order is not final"
    );
    let topology = flashsale_messaging::Topology::with_prefix(&suite.amqp_prefix);
    for queue in topology.work_queues() {
        let dead = flashsale_messaging::Topology::dead_letter_queue(queue);
        let (messages, _) = flashsale_integration_tests::suite::queue_depth_at(&suite.amqp_addr, &dead).await?;
        anyhow::ensure!(messages == 0, "{label}: {messages} messages dead-lettered from {queue}");
    }
    Ok(Audited { recorded: report.orders.len(), settled_in })
}

/// One buyer: buys until served, or the item is sold out for good, through
/// the first of `clients` until a call goes unanswered, then the next.
async fn buyer(
    mut clients: Vec<FlashSaleGatewayClient<Channel>>,
    name: String,
    seen: Arc<Mutex<Seen>>,
    done: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let token = token(&name, false);
    let deadline = Instant::now() + BUYING_WINDOW;
    let mut round = 0;
    let mut same_key = false;
    let mut at = 0;
    loop {
        let count = clients.len();
        let client = &mut clients[at % count];
        if !same_key {
            round += 1;
        }
        same_key = false;
        let request =
            PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: format!("{name}-r{round}") };
        match bounded(client.purchase(with_token(request, &token))).await {
            Ok(reply) => {
                let order_id = reply.into_inner().order_id;
                {
                    let mut seen = seen.lock();
                    seen.accepted.insert(order_id.clone());
                    if let Some(at) = seen.recovered_at
                        && seen.first_accept_after_recovery.is_none()
                    {
                        seen.first_accept_after_recovery = Some(at.elapsed());
                    }
                }
                match follow(client, &token, &order_id, deadline).await? {
                    (OrderStatus::Confirmed, _) => return Ok(()),
                    (_, reason) if reason == "INSUFFICIENT_FUNDS" => {
                        anyhow::bail!("{name}: order {order_id} refused for funds though the buyer could pay")
                    }
                    // A second admission under a key Redis forgot when it lost its
                    // data (PostgreSQL refused the copy), or a unit that went back:
                    // try again under a new key. The audit judges the end state.
                    _ => {}
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
                    _ if is_no_answer(&status) => {
                        same_key = true;
                        at += 1;
                    }
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

/// A call that ended without the service's answer: it said UNAVAILABLE, or the
/// gateway was down, died mid-call or closed the connection under it. tonic
/// reports the last as the client's own transport error (kept as the status's
/// source), for a GOAWAY race even with the code INTERNAL; a status the gateway
/// sent has no source.
fn is_no_answer(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded)
        || (matches!(status.code(), Code::Unknown | Code::Internal) && std::error::Error::source(status).is_some())
}

/// Follows an order until it is final, as a buyer's app does, through restarts:
/// its status and reject reason.
async fn follow(
    client: &mut FlashSaleGatewayClient<Channel>,
    token: &str,
    order_id: &str,
    deadline: Instant,
) -> anyhow::Result<(OrderStatus, String)> {
    loop {
        match bounded(client.get_order(with_token(GetOrderRequest { order_id: order_id.into() }, token))).await {
            Ok(reply) => {
                let order = reply.into_inner().order.ok_or_else(|| anyhow::anyhow!("no order in the reply"))?;
                if order.status() != OrderStatus::Pending {
                    return Ok((order.status(), order.reject_reason));
                }
            }
            Err(status) if is_no_answer(&status) => {}
            // Redis lost the admission record of an order still in the queue:
            // unknown until inventory records it (proto/README.md, "Known limits").
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => anyhow::bail!("GetOrder {order_id}: {status:?}"),
        }
        anyhow::ensure!(Instant::now() < deadline, "order {order_id} not final in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
