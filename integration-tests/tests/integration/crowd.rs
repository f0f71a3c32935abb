//! A crowd that behaves like people, not like a storm that retries until the
//! item settles: every buyer arrives within the sale's first 100 ms, tries
//! once and leaves on the answer (SOLD_OUT or INSUFFICIENT_FUNDS), and half of
//! them cannot pay. The funds held at admission make every unit go to a buyer
//! who can pay while that crowd is still there; debiting after admission
//! (the way the suite used to) sold the units of unaffordable buyers to
//! nobody once their orders were rejected after the crowd had left.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flashsale_integration_tests::audit::{
    audit, wait_until_admissions_final, wait_until_holds_closed, wait_until_settled,
};
use flashsale_integration_tests::{TestSuite, error_reason};
use flashsale_proto::gateway::v1::flash_sale_gateway_client::FlashSaleGatewayClient;
use flashsale_proto::gateway::v1::{GetBalanceRequest, PurchaseRequest};
use parking_lot::Mutex;
use tonic::transport::Channel;

use crate::common::{create_item_between, top_up};

const ITEM: &str = "crowd-drop";
const STOCK: u32 = 100;
const BUYERS: usize = 400;
const PRICE: i64 = 1_000;
/// Every buyer arrives within this long of the opening.
const ARRIVAL_SPREAD: Duration = Duration::from_millis(100);

/// Half the crowd can pay exactly the price; of the other half, one in two
/// has a little less and one in two has no wallet at all.
fn can_pay(buyer: usize) -> bool {
    buyer.is_multiple_of(2)
}

fn name(buyer: usize) -> String {
    format!("p{buyer}")
}

/// What each buyer was told, by buyer.
#[derive(Default)]
struct Answers {
    accepted: BTreeMap<usize, String>,
    refused: BTreeMap<usize, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_that_tries_once_buys_every_unit_and_buyers_who_cannot_pay_hear_so_at_once() -> anyhow::Result<()> {
    let _share = flashsale_integration_tests::suite::machine_share().await;
    let suite = TestSuite::spawn().await?;
    // Wallets first: on a loaded machine the top-ups can take seconds, and the
    // sale must open only once every buyer is ready.
    for buyer in 0..BUYERS {
        match buyer % 4 {
            0 | 2 => top_up(&suite, &name(buyer), PRICE).await?,
            1 => top_up(&suite, &name(buyer), PRICE - 1).await?,
            _ => {}
        }
    }
    let opens = SystemTime::now() + Duration::from_secs(4);
    create_item_between(
        &suite,
        ITEM,
        PRICE,
        STOCK,
        1,
        Some(prost_types::Timestamp::from(opens)),
        Some(prost_types::Timestamp::from(opens + Duration::from_secs(3600))),
    )
    .await?;
    // The gateway knows the item (and says the sale has not started) before the crowd comes.
    loop {
        let probe = PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: String::new() };
        let status = suite.buyers().purchase(suite.as_user("probe", probe)).await.expect_err("not open yet");
        if error_reason(&status).as_deref() == Some("SALE_NOT_STARTED") {
            break;
        }
        anyhow::ensure!(SystemTime::now() < opens, "the gateway did not know the item before it opened: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(suite.new_gateway_channel().await?);
    }
    let answers = Arc::new(Mutex::new(Answers::default()));
    let crowd: Vec<_> = (0..BUYERS)
        .map(|buyer| {
            let client = FlashSaleGatewayClient::new(channels[buyer % channels.len()].clone());
            let token = suite.token(&name(buyer), false);
            let answers = answers.clone();
            // A permutation of the arrival slots (37 is prime to 400), so who can
            // pay and who cannot arrive mixed.
            let slot = (buyer * 37) % BUYERS;
            let arrives = opens + ARRIVAL_SPREAD * u32::try_from(slot)? / u32::try_from(BUYERS)?;
            Ok(tokio::spawn(async move { one_try(client, buyer, &token, arrives, &answers).await }))
        })
        .collect::<anyhow::Result<_>>()?;
    for buyer in futures::future::join_all(crowd).await {
        buyer??;
    }

    // The crowd has left. Now the end state, straight from the databases.
    let Answers { accepted, refused } = std::mem::take(&mut *answers.lock());
    wait_until_admissions_final(&suite.redis_prefix, &[ITEM], Duration::from_secs(60)).await?;
    let accepted_ids: BTreeSet<String> = accepted.values().cloned().collect();
    wait_until_settled(&suite.databases(), &accepted_ids, Duration::from_secs(60)).await?;
    let report = audit(&suite.databases()).await?;
    let holds = wait_until_holds_closed(&suite.databases(), Duration::from_secs(30)).await?;
    let sold = report.confirmed_units.get(ITEM).copied().unwrap_or(0);
    let mut told: BTreeMap<(bool, &str), usize> = BTreeMap::new();
    for (buyer, reason) in &refused {
        *told.entry((can_pay(*buyer), reason.as_str())).or_default() += 1;
    }
    println!(
        "crowd: {BUYERS} buyers within {ARRIVAL_SPREAD:?}, {STOCK} units: {sold} sold, {} accepted, \
         refusals (can pay, reason) {told:?}, holds captured {} released {}",
        accepted.len(),
        holds.captured,
        holds.released
    );

    anyhow::ensure!(sold == i64::from(STOCK), "{sold} of {STOCK} units sold to a crowd that tried once");
    for (buyer, order_id) in &accepted {
        anyhow::ensure!(can_pay(*buyer), "{} cannot pay and was accepted (order {order_id})", name(*buyer));
        let order = report.orders.iter().find(|o| &o.id == order_id);
        anyhow::ensure!(
            order.is_some_and(|o| o.status == "CONFIRMED"),
            "{}'s accepted order {order_id} ended {:?}",
            name(*buyer),
            order.map(|o| &o.status)
        );
    }
    for (buyer, reason) in &refused {
        match (can_pay(*buyer), reason.as_str()) {
            // Told after the last unit was held: true, and nothing can change it
            // but a refund (no hold of a buyer who could pay is left to expire).
            (_, "SOLD_OUT") => {}
            (false, "INSUFFICIENT_FUNDS") => {}
            (pays, other) => anyhow::bail!("{} (can pay: {pays}) was told {other}", name(*buyer)),
        }
    }
    anyhow::ensure!(
        told.get(&(false, "INSUFFICIENT_FUNDS")).is_some_and(|&n| n > 0),
        "no buyer who could not pay reached the stock; the test proves nothing"
    );
    // Nobody who cannot pay was charged or left with money held.
    for buyer in (0..BUYERS).filter(|&b| !can_pay(b)) {
        let request = suite.as_user(&name(buyer), GetBalanceRequest { currency: "USD".into() });
        let balance = suite.buyers().get_balance(request).await?.into_inner();
        let first = |money: &[flashsale_proto::common::v1::Money]| money.first().map_or(0, |m| m.amount_minor);
        let expected = if buyer % 4 == 1 { PRICE - 1 } else { 0 };
        anyhow::ensure!(first(&balance.balances) == expected, "{} was charged", name(buyer));
        anyhow::ensure!(first(&balance.held) == 0, "{} still has money held", name(buyer));
    }
    suite.shutdown().await
}

/// One buyer: waits for its moment, asks once, and leaves on the answer. A
/// call left without an answer is asked again under the same key, as a
/// buyer's app does; an answer is final.
async fn one_try(
    mut client: FlashSaleGatewayClient<Channel>,
    buyer: usize,
    token: &str,
    arrives: SystemTime,
    answers: &Mutex<Answers>,
) -> anyhow::Result<()> {
    // The crowd's arrival schedule, not a wait for a condition.
    tokio::time::sleep(arrives.duration_since(SystemTime::now()).unwrap_or_default()).await;
    let request =
        PurchaseRequest { item_id: ITEM.into(), quantity: 1, idempotency_key: format!("{}-once", name(buyer)) };
    for _ in 0..5 {
        match client.purchase(flashsale_integration_tests::suite::with_token(request.clone(), token)).await {
            Ok(reply) => {
                answers.lock().accepted.insert(buyer, reply.into_inner().order_id);
                return Ok(());
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {}
            Err(status) => {
                let reason = error_reason(&status).unwrap_or_else(|| format!("{:?}", status.code()));
                answers.lock().refused.insert(buyer, reason);
                return Ok(());
            }
        }
    }
    anyhow::bail!("{} got no answer in five tries", name(buyer))
}
