//! Abuse limits against hostile clients, each from a loopback address of its
//! own (127.0.0.0/8 all reaches the gateway, and the gateway sees each as a
//! different client): a bot buyer firing about 1,000 purchase attempts a second,
//! a scalper spreading as many over 30 accounts from one address, and a buyer
//! opening more `WatchOrder` streams than allowed. The bots are limited with
//! `RATE_LIMITED` and a retry delay, the per-user limit holds, and ordinary
//! buyers (from another address) are served throughout; their latency with and
//! without the bots is printed (a figure, not an assertion).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flashsale_integration_tests::audit::{audit, wait_until_settled};
use flashsale_integration_tests::suite::{SuiteOptions, whole_machine, with_token};
use flashsale_integration_tests::{TestSuite, error_reason};
use flashsale_proto::gateway::v1::flash_sale_gateway_client::FlashSaleGatewayClient;
use flashsale_proto::gateway::v1::{PurchaseRequest, TopUpRequest, WatchOrderRequest};
use futures::StreamExt;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::common::{create_item, usd};

const ITEM: &str = "bot-target";
const PRICE: i64 = 100;
const LIMIT: u32 = 2;
const CLIENT_RATE: (u32, u32) = (50, 100);

/// A gateway client whose connections come from `source`.
async fn client_from(suite: &TestSuite, source: Ipv4Addr) -> anyhow::Result<FlashSaleGatewayClient<Channel>> {
    let url = suite.url("gateway").ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    let channel = Endpoint::from_shared(url)?.local_address(Some(IpAddr::V4(source))).connect().await?;
    Ok(FlashSaleGatewayClient::new(channel))
}

async fn fund(suite: &TestSuite, users: impl Iterator<Item = String>) -> anyhow::Result<()> {
    for user in users {
        let request =
            TopUpRequest { user_id: user.clone(), amount: usd(PRICE * 10), idempotency_key: format!("f-{user}") };
        suite.admin().top_up(suite.as_admin(request)).await?;
    }
    Ok(())
}

/// Answers by reason (or code), and how many were accepted orders.
#[derive(Default)]
struct Tally {
    answers: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
    orders: parking_lot::Mutex<std::collections::BTreeSet<String>>,
    /// Refusals as RATE_LIMITED that carried a positive RetryInfo delay.
    with_retry_delay: AtomicUsize,
}

impl Tally {
    fn record(&self, outcome: Result<tonic::Response<flashsale_proto::gateway::v1::PurchaseResponse>, tonic::Status>) {
        let reason = match outcome {
            Ok(reply) => {
                self.orders.lock().insert(reply.into_inner().order_id);
                "ACCEPTED".to_owned()
            }
            Err(status) => {
                let reason = error_reason(&status).unwrap_or_else(|| format!("{:?}", status.code()));
                if reason == "RATE_LIMITED" {
                    use tonic_types::StatusExt;
                    let delay = status.get_error_details().retry_info().and_then(|info| info.retry_delay);
                    if delay.is_some_and(|d| d > Duration::ZERO) {
                        self.with_retry_delay.fetch_add(1, Ordering::Relaxed);
                    }
                }
                reason
            }
        };
        *self.answers.lock().entry(reason).or_default() += 1;
    }

    fn count(&self, reason: &str) -> u64 {
        self.answers.lock().get(reason).copied().unwrap_or(0)
    }
}

/// Fires about `per_second` purchase attempts a second for `length`, as
/// `users` in turn (fresh keys), from `client`: how long until the last answer.
async fn flood(
    client: FlashSaleGatewayClient<Channel>,
    tokens: Vec<String>,
    per_second: u32,
    length: Duration,
    tally: Arc<Tally>,
) -> Duration {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / per_second);
    let until = Instant::now() + length;
    let mut calls = Vec::new();
    let mut n = 0usize;
    while Instant::now() < until {
        // The bot's firing rate, not a wait for a condition.
        ticker.tick().await;
        let request = PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: format!("bot-{n}") };
        let (mut client, token, tally) = (client.clone(), tokens[n % tokens.len()].clone(), tally.clone());
        calls.push(tokio::spawn(async move { tally.record(client.purchase(with_token(request, &token)).await) }));
        n += 1;
    }
    futures::future::join_all(calls).await;
    started.elapsed()
}

/// Ordinary buyers, each from an address of its own (127.0.1.n) trying a few
/// times a quarter second apart (within every limit): the latency of each
/// attempt, sorted.
async fn ordinary_buyers(suite: &TestSuite, names: &[String], tally: &Arc<Tally>) -> anyhow::Result<Vec<Duration>> {
    let mut clients = Vec::new();
    for n in 0..names.len() {
        clients.push(client_from(suite, Ipv4Addr::new(127, 0, 1, u8::try_from(n + 1)?)).await?);
    }
    let attempts = futures::stream::iter(names.iter().cloned().zip(clients))
        .map(|(name, mut client)| {
            let (token, tally) = (suite.token(&name, false), tally.clone());
            async move {
                let mut latencies = Vec::new();
                for round in 0..4 {
                    let request = PurchaseRequest {
                        item_id: ITEM.into(),
                        quantity: 1,
                        idempotency_key: format!("{name}-{round}"),
                    };
                    let started = Instant::now();
                    let outcome = client.purchase(with_token(request, &token)).await;
                    latencies.push(started.elapsed());
                    tally.record(outcome);
                    // A person's pace, not a wait for a condition.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                latencies
            }
        })
        .buffer_unordered(names.len())
        .collect::<Vec<_>>()
        .await;
    let mut latencies: Vec<Duration> = attempts.into_iter().flatten().collect();
    latencies.sort();
    Ok(latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(at).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bots_from_one_address_are_rate_limited_while_other_buyers_are_served() -> anyhow::Result<()> {
    // Latency figures want the machine to themselves.
    let _machine = whole_machine().await;
    let suite = TestSuite::spawn_with(SuiteOptions {
        holds_machine: true,
        purchase_rate: Some((5, 10)),
        client_rate: Some(CLIENT_RATE),
        ..Default::default()
    })
    .await?;
    create_item(&suite, ITEM, PRICE, 10_000, LIMIT).await?;
    let quiet: Vec<String> = (0..20).map(|n| format!("quiet-{n}")).collect();
    let busy: Vec<String> = (0..20).map(|n| format!("busy-{n}")).collect();
    let scalpers: Vec<String> = (0..30).map(|n| format!("scalper-{n}")).collect();
    fund(&suite, quiet.iter().chain(&busy).chain(&scalpers).cloned().chain(["bot".to_owned()])).await?;

    let ordinary = Arc::new(Tally::default());
    let unloaded = ordinary_buyers(&suite, &quiet, &ordinary).await?;

    // One bot buyer from 127.0.0.2, and one scalper address (127.0.0.3) with
    // 30 accounts, each about 1,000 attempts a second for 3 s, while 20 other
    // buyers try as before.
    let (bot, scalper) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let length = Duration::from_secs(3);
    let bot_flood = flood(
        client_from(&suite, Ipv4Addr::new(127, 0, 0, 2)).await?,
        vec![suite.token("bot", false)],
        1000,
        length,
        bot.clone(),
    );
    let scalper_flood = flood(
        client_from(&suite, Ipv4Addr::new(127, 0, 0, 3)).await?,
        scalpers.iter().map(|name| suite.token(name, false)).collect(),
        1000,
        length,
        scalper.clone(),
    );
    let during = ordinary_buyers(&suite, &busy, &ordinary);
    let (_, scalper_took, loaded) = tokio::join!(bot_flood, scalper_flood, during);
    let loaded = loaded?;

    let fired = |tally: &Tally| tally.answers.lock().values().sum::<u64>();
    let (bot_fired, scalper_fired) = (fired(&bot), fired(&scalper));
    // The bot: its buyer's rate (burst 10, then 5/s) and its address's cap it.
    assert!(bot.count("RATE_LIMITED") * 10 >= bot_fired * 9, "the bot got through: {:?}", bot.answers.lock());
    assert!(bot.count("ACCEPTED") <= u64::from(LIMIT), "the bot bought {} units", bot.count("ACCEPTED"));
    // The scalper's accounts are each within their own rate; its address is not.
    let scalper_through = scalper_fired - scalper.count("RATE_LIMITED");
    // The address's burst, then its rate over as long as the flood lasted (on
    // a loaded machine the last calls are answered after the 3 s).
    let cap = u64::from(CLIENT_RATE.1) + u64::from(CLIENT_RATE.0) * (scalper_took.as_secs() + 1);
    assert!(scalper_through <= cap, "{scalper_through} scalper attempts got past the address limit (cap {cap})");
    assert!(scalper.count("ACCEPTED") <= u64::from(LIMIT) * 30);
    assert!(
        bot.with_retry_delay.load(Ordering::Relaxed) as u64 == bot.count("RATE_LIMITED"),
        "a refusal without a delay"
    );
    // Ordinary buyers were never limited, and each bought what it may.
    assert_eq!(ordinary.count("RATE_LIMITED"), 0, "ordinary buyers limited: {:?}", ordinary.answers.lock());
    let expected = ["ACCEPTED", "LIMIT_REACHED", "PURCHASE_IN_PROGRESS"];
    assert!(
        ordinary.answers.lock().keys().all(|reason| expected.contains(&reason.as_str())),
        "{:?}",
        ordinary.answers.lock()
    );
    assert!(ordinary.count("ACCEPTED") >= 40, "ordinary buyers were not served: {:?}", ordinary.answers.lock());

    // Over REST the refusal says when to come back.
    let limited = reqwest::Client::builder().local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))).build()?;
    let mut retry_after = None;
    for _ in 0..(CLIENT_RATE.1 * 2) {
        let response = limited
            .get(format!("{}/v1/orders", suite.http_url()))
            .bearer_auth(suite.token("scalper-0", false))
            .send()
            .await?;
        if response.status() == 429 {
            retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            break;
        }
    }
    assert!(retry_after.as_deref().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s >= 1), "{retry_after:?}");

    // Nothing above the per-user limit, every order final, money conserved.
    let orders = ordinary
        .orders
        .lock()
        .iter()
        .chain(bot.orders.lock().iter())
        .chain(scalper.orders.lock().iter())
        .cloned()
        .collect();
    wait_until_settled(&suite.databases(), &orders, Duration::from_secs(60)).await?;
    audit(&suite.databases()).await?;

    let ratio = |p: f64| percentile(&loaded, p).as_secs_f64() / percentile(&unloaded, p).as_secs_f64().max(1e-9);
    eprintln!(
        "abuse: bot fired {bot_fired} in {length:?}, {:?}; scalper (30 accounts, one address) fired {scalper_fired}, \
         {:?} ({scalper_through} past the address limit, cap {cap}, in {scalper_took:?}); ordinary buyers' purchase latency p50 {:?} → {:?} ({:.2}×), p99 {:?} → {:?} ({:.2}×) without → with the bots",
        bot.answers.lock(),
        scalper.answers.lock(),
        percentile(&unloaded, 0.5),
        percentile(&loaded, 0.5),
        ratio(0.5),
        percentile(&unloaded, 0.99),
        percentile(&loaded, 0.99),
        ratio(0.99),
    );
    suite.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_holds_at_most_the_allowed_watch_streams() -> anyhow::Result<()> {
    let suite = TestSuite::spawn_with(SuiteOptions { watch_streams_per_buyer: Some(3), ..Default::default() }).await?;
    create_item(&suite, ITEM, PRICE, 10, LIMIT).await?;
    fund(&suite, ["alice".to_owned(), "bob".to_owned()].into_iter()).await?;
    // With payments held back the orders stay PAYMENT_PENDING, so watches stay open.
    suite.pause_payments();
    let mut orders = Vec::new();
    for user in ["alice", "bob"] {
        let request = PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: format!("{user}-1") };
        orders.push(suite.buyers().purchase(suite.as_user(user, request)).await?.into_inner().order_id);
    }
    let watch = |user: &str, order: &str| {
        let mut client = suite.buyers();
        let request = suite.as_user(user, WatchOrderRequest { order_id: order.to_owned() });
        async move { client.watch_order(request).await.map(tonic::Response::into_inner) }
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = watch("alice", &orders[0]).await?;
        // The first message: the stream is live on the gateway.
        stream.message().await?;
        open.push(stream);
    }
    let refused = watch("alice", &orders[0]).await.err().map(|status| error_reason(&status));
    assert_eq!(refused, Some(Some("RATE_LIMITED".to_owned())), "a fourth stream");
    assert!(watch("bob", &orders[1]).await.is_ok(), "another buyer has slots of its own");
    // A closed stream gives its slot back (once the gateway notices the cancel).
    drop(open.pop());
    let from = Instant::now();
    while watch("alice", &orders[0]).await.is_err() {
        anyhow::ensure!(from.elapsed() < Duration::from_secs(10), "the closed stream's slot never came back");
        // Retrying as a client told RATE_LIMITED would, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(open);
    suite.resume_payments();
    suite.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_item_ids_cost_inventory_a_bounded_number_of_lookups() -> anyhow::Result<()> {
    use flashsale_integration_tests::binaries::{BinarySuite, scrape, sum};
    let suite = BinarySuite::spawn().await?;
    let inventory = suite.inventory.metrics_url();
    let lookups = async || -> anyhow::Result<f64> {
        Ok(sum(&scrape(&inventory).await?, "grpc_server_handled_total", &["grpc_method=\"GetItem\""]))
    };
    let secret = flashsale_integration_tests::suite::JWT_SECRET;
    let token = flashsale_gateway::auth::mint(secret, "prober", false, Duration::from_secs(600))?;
    let before = lookups().await?;
    let started = Instant::now();
    let not_found = futures::stream::iter(0..2000)
        .map(|n| {
            let mut client = suite.buyers();
            let request =
                PurchaseRequest { item_id: format!("made-up-{n}"), quantity: 1, idempotency_key: String::new() };
            let token = token.clone();
            async move { client.purchase(with_token(request, &token)).await.err().and_then(|s| error_reason(&s)) }
        })
        .buffer_unordered(64)
        .filter(|reason| futures::future::ready(reason.as_deref() == Some("ITEM_NOT_FOUND")))
        .count()
        .await;
    let elapsed = started.elapsed();
    let asked = lookups().await? - before;
    // The gateway's bound: 50 at once, then 50 a second.
    let bound = 50.0 + 50.0 * elapsed.as_secs_f64().ceil();
    assert_eq!(not_found, 2000, "a made-up item was not ITEM_NOT_FOUND");
    assert!(asked <= bound, "{asked} inventory lookups for 2000 made-up ids in {elapsed:?} (bound {bound})");
    eprintln!("abuse: 2000 made-up item ids in {elapsed:?} cost inventory {asked} lookups (bound {bound})");
    suite.shutdown().await
}
