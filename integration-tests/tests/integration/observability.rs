//! Metrics: the three real binaries (each its own recorder) after a small storm,
//! their `/metrics` counts checked against the audit of the databases; and the
//! dashboard and alert files checked against what the services really export.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use flashsale_integration_tests::audit::{audit, wait_until_settled};
use flashsale_integration_tests::binaries::{BinarySuite, scrape, sum};
use flashsale_integration_tests::suite::with_token;
use flashsale_proto::common::v1::Money;
use flashsale_proto::gateway::v1::{CreateItemRequest, PurchaseRequest, TopUpRequest};

use crate::common::{at, usd};

fn token(user: &str, admin: bool) -> String {
    let secret = flashsale_integration_tests::suite::JWT_SECRET;
    flashsale_gateway::auth::mint(secret, user, admin, Duration::from_secs(3600)).unwrap_or_default()
}

/// Runs a small sale against the binaries: `buyers` buyers, every tenth (the
/// tenth, the twentieth, …) unable to pay, each trying twice at once. Returns
/// how many attempts were made and the ids of the accepted ones.
async fn small_storm(suite: &BinarySuite, stock: u32, buyers: usize) -> anyhow::Result<(usize, BTreeSet<String>)> {
    let admin = token("operator", true);
    suite
        .admin()
        .create_item(with_token(
            CreateItemRequest {
                id: "gauge".into(),
                name: "metrics drop".into(),
                price: usd(700),
                stock_total: stock,
                per_user_limit: 1,
                starts_at: at(Duration::from_secs(1), false),
                ends_at: at(Duration::from_secs(3600), true),
                admission_buckets: 0,
            },
            &admin,
        ))
        .await?;
    for n in 0..buyers {
        let amount = if n % 10 == 9 { 100 } else { 10_000 };
        let request = TopUpRequest {
            user_id: format!("m{n}"),
            amount: Some(Money { currency: "USD".into(), amount_minor: amount }),
            idempotency_key: String::new(),
        };
        suite.admin().top_up(with_token(request, &admin)).await?;
    }
    let attempts = (0..buyers).flat_map(|n| [n, n]).map(|n| {
        let mut client = suite.buyers();
        async move {
            let request = PurchaseRequest { item_id: "gauge".into(), quantity: 1, idempotency_key: String::new() };
            client
                .purchase(with_token(request, &token(&format!("m{n}"), false)))
                .await
                .ok()
                .map(|r| r.into_inner().order_id)
        }
    });
    let outcomes = futures::future::join_all(attempts).await;
    let made = outcomes.len();
    Ok((made, outcomes.into_iter().flatten().collect()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_each_service_agree_with_the_audit_after_a_storm() -> anyhow::Result<()> {
    let _machine = flashsale_integration_tests::suite::whole_machine().await;
    let suite = BinarySuite::spawn().await?;
    let (attempts, accepted) = small_storm(&suite, 40, 120).await?;
    flashsale_integration_tests::audit::wait_until_admissions_final(
        &suite.redis_prefix,
        &["gauge"],
        Duration::from_secs(60),
    )
    .await?;
    wait_until_settled(&suite.databases(), &accepted, Duration::from_secs(60)).await?;
    let report = audit(&suite.databases()).await?;
    let count = |status: &str| report.orders.iter().filter(|o| o.status == status).count() as f64;
    let (confirmed, rejected) = (count("CONFIRMED"), count("REJECTED"));
    assert!(confirmed > 0.0, "the storm should sell");

    let gateway = scrape(&suite.gateway.metrics_url()).await?;
    assert_eq!(sum(&gateway, "flashsale_purchase_attempts_total", &[]), attempts as f64, "every attempt counted once");
    assert_eq!(sum(&gateway, "flashsale_purchase_attempts_total", &["outcome=\"ACCEPTED\""]), accepted.len() as f64);
    assert_eq!(accepted.len(), report.orders.len(), "each accepted order recorded once");
    let purchase = ["grpc_service=\"flashsale.gateway.v1.FlashSaleGateway\"", "grpc_method=\"Purchase\""];
    assert_eq!(sum(&gateway, "grpc_server_handled_total", &purchase), attempts as f64);
    assert_eq!(sum(&gateway, "grpc_server_handling_seconds_count", &purchase), attempts as f64);
    assert_eq!(
        sum(&gateway, "flashsale_publish_seconds_count", &["result=\"confirmed\""]),
        accepted.len() as f64,
        "one confirmed publish per accepted order"
    );
    // Buyers who cannot pay (m9 and m19 are among the first to ask) reach the
    // stock and are refused at the hold, never accepted.
    let holds = |outcome: &str| {
        let label = format!("outcome=\"{outcome}\"");
        sum(&gateway, "flashsale_purchase_holds_total", &[label.as_str()])
    };
    assert_eq!(holds("held"), accepted.len() as f64, "one hold per accepted order");
    let refused = sum(&gateway, "flashsale_purchase_attempts_total", &["outcome=\"INSUFFICIENT_FUNDS\""]);
    assert_eq!(holds("insufficient_funds"), refused, "each refused hold answered INSUFFICIENT_FUNDS");
    assert!(refused > 0.0, "no buyer who cannot pay reached the stock");
    assert_eq!(sum(&gateway, "flashsale_redis_up", &[]), 1.0);
    assert_eq!(sum(&gateway, "flashsale_order_events_consumer_up", &[]), 1.0);

    let inventory = scrape(&suite.inventory.metrics_url()).await?;
    assert_eq!(sum(&inventory, "flashsale_orders_final_total", &["status=\"CONFIRMED\""]), confirmed);
    assert_eq!(sum(&inventory, "flashsale_orders_final_total", &["status=\"REJECTED\""]), rejected);
    assert_eq!(sum(&inventory, "flashsale_settlement_seconds_count", &["status=\"CONFIRMED\""]), confirmed);
    assert_eq!(sum(&inventory, "flashsale_orders_delivered_total", &[]), report.orders.len() as f64);
    assert_eq!(sum(&inventory, "flashsale_consumer_up", &[]), 1.0);
    let wallet_calls = sum(&inventory, "grpc_server_handled_total", &[]);
    assert!(wallet_calls > 0.0, "inventory's own API served the gateway's reads");

    let wallet = scrape(&suite.wallet.metrics_url()).await?;
    let debits = |result: &str| {
        let label = format!("result=\"{result}\"");
        sum(&wallet, "flashsale_wallet_movements_total", &["kind=\"debit\"", label.as_str()])
    };
    assert_eq!(debits("applied"), confirmed, "one applied debit per confirmed order");
    let refused_for_funds = report.orders.iter().filter(|o| o.reject_reason == "INSUFFICIENT_FUNDS").count() as f64;
    assert_eq!(debits("insufficient_funds"), refused_for_funds);
    assert_eq!(sum(&wallet, "flashsale_wallet_movements_total", &["kind=\"credit\"", "result=\"applied\""]), 120.0);
    assert!(sum(&wallet, "flashsale_db_pool_max_connections", &[]) > 0.0);

    // The stock gauge follows PostgreSQL (the catalog refreshes every 200 ms here).
    let remaining = report.remaining.get("gauge").copied().unwrap_or(-1) as f64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let gateway = scrape(&suite.gateway.metrics_url()).await?;
        let gauge = sum(&gateway, "flashsale_stock_remaining", &["item=\"gauge\""]);
        if gauge == remaining {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "stock gauge {gauge}, PostgreSQL {remaining}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    suite.shutdown().await
}

/// A unit that comes back after the sale sold out (here by a refund) is
/// counted by `flashsale_units_returned_total{after_sold_out="true"}`, and is
/// on offer again: the buyer told SOLD_OUT before gets it on the next try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_refunded_after_sell_out_is_counted_and_sold_again() -> anyhow::Result<()> {
    use flashsale_proto::common::v1::OrderStatus;
    use flashsale_proto::gateway::v1::{GetOrderRequest, RefundOrderRequest};

    let _machine = flashsale_integration_tests::suite::machine_share().await;
    let suite = BinarySuite::spawn().await?;
    let admin = token("operator", true);
    let item = CreateItemRequest {
        id: "returned".into(),
        name: "one unit, refunded".into(),
        price: usd(700),
        stock_total: 1,
        per_user_limit: 1,
        starts_at: at(Duration::from_secs(1), false),
        ends_at: at(Duration::from_secs(3600), true),
        admission_buckets: 0,
    };
    suite.admin().create_item(with_token(item, &admin)).await?;
    for user in ["alice", "bob"] {
        let request = TopUpRequest {
            user_id: user.into(),
            amount: Some(Money { currency: "USD".into(), amount_minor: 10_000 }),
            idempotency_key: String::new(),
        };
        suite.admin().top_up(with_token(request, &admin)).await?;
    }
    let buy = |user: &'static str| {
        let mut client = suite.buyers();
        async move {
            let request = PurchaseRequest { item_id: "returned".into(), quantity: 1, idempotency_key: String::new() };
            client.purchase(with_token(request, &token(user, false))).await.map(|r| r.into_inner().order_id)
        }
    };
    let until_final = |user: &'static str, order_id: String| {
        let mut client = suite.buyers();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let request = GetOrderRequest { order_id: order_id.clone() };
                let order = client.get_order(with_token(request, &token(user, false))).await?.into_inner().order;
                let status = order.map(|o| o.status()).unwrap_or(OrderStatus::Unspecified);
                if status != OrderStatus::Pending {
                    return anyhow::Ok(status);
                }
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "order {order_id} still pending");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    let alices = buy("alice").await?;
    assert_eq!(until_final("alice", alices.clone()).await?, OrderStatus::Confirmed);
    let refused = buy("bob").await.expect_err("the only unit is sold");
    assert_eq!(flashsale_integration_tests::error_reason(&refused).as_deref(), Some("SOLD_OUT"));
    let returned =
        |samples: &[(String, f64)]| sum(samples, "flashsale_units_returned_total", &["after_sold_out=\"true\""]);
    assert_eq!(returned(&scrape(&suite.gateway.metrics_url()).await?), 0.0, "nothing returned yet");

    suite.buyers().refund_order(with_token(RefundOrderRequest { order_id: alices }, &token("alice", false))).await?;
    // The refund's event reaches the gateway, which puts the unit back on offer and counts it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let counted = returned(&scrape(&suite.gateway.metrics_url()).await?);
        if counted == 1.0 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "units returned after sell-out: {counted}, not 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bobs = buy("bob").await?;
    assert_eq!(until_final("bob", bobs).await?, OrderStatus::Confirmed);
    suite.shutdown().await
}

/// Metric names a PromQL expression refers to (ours and gRPC's), with the
/// `_bucket`/`_sum`/`_count` of histograms reduced to the histogram's name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("flashsale_") || token.starts_with("grpc_server_"))
        .map(|token| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| token.strip_suffix(suffix))
                .unwrap_or(token)
                .to_owned()
        })
        .collect()
}

fn deploy_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability").join(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_name_only_exported_metrics() -> anyhow::Result<()> {
    // Every query in the dashboard and every alert expression.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy_file("grafana/flashsale-live-sale.json"))?)?;
    let mut queries = BTreeMap::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().ok_or_else(|| anyhow::anyhow!("panel target without expr"))?;
            queries.insert(format!("panel {:?}", panel["title"]), expr.to_owned());
        }
    }
    let rules: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(deploy_file("prometheus/alerts.yml"))?)?;
    let mut alerts = 0;
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let name = rule["alert"].as_str().ok_or_else(|| anyhow::anyhow!("rule without a name"))?;
            let expr = rule["expr"].as_str().ok_or_else(|| anyhow::anyhow!("{name} has no expr"))?;
            queries.insert(format!("alert {name}"), expr.to_owned());
            alerts += 1;
        }
    }
    anyhow::ensure!(alerts >= 5 && queries.len() > alerts, "dashboard or rules empty");
    let prometheus: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(deploy_file("prometheus/prometheus.yml"))?)?;
    assert_eq!(prometheus["rule_files"][0], "alerts.yml");

    // What the services export once they have done some work.
    let _share = flashsale_integration_tests::suite::machine_share().await;
    let suite = BinarySuite::spawn().await?;
    let (_, accepted) = small_storm(&suite, 5, 20).await?;
    flashsale_integration_tests::audit::wait_until_admissions_final(
        &suite.redis_prefix,
        &["gauge"],
        Duration::from_secs(60),
    )
    .await?;
    wait_until_settled(&suite.databases(), &accepted, Duration::from_secs(60)).await?;
    let mut exported = BTreeSet::new();
    for process in [&suite.gateway, &suite.inventory, &suite.wallet] {
        let text = reqwest::get(process.metrics_url()).await?.text().await?;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                exported.extend(rest.split_whitespace().next().map(str::to_owned));
            }
        }
    }
    let mut missing = Vec::new();
    for (place, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place} names no flash-sale metric: {expr}");
        missing
            .extend(names.into_iter().filter(|name| !exported.contains(name)).map(|name| format!("{place}: {name}")));
    }
    assert!(missing.is_empty(), "metrics named in deploy/observability but not exported: {missing:#?}");
    suite.shutdown().await
}

/// The real binaries, configured only through the standard `OTEL_*` variables,
/// export over OTLP/gRPC to a receiver; one purchase arrives as one trace with
/// spans from all three services (each under its own `service.name`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_export_one_trace_per_purchase_over_otlp() -> anyhow::Result<()> {
    let _share = flashsale_integration_tests::suite::machine_share().await;
    let sink = flashsale_integration_tests::otlp::OtlpSink::start(0, true).await?;
    let suite = BinarySuite::spawn_with_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint()),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_on".into()),
        // Export every 100 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ])
    .await?;
    let (_, accepted) = small_storm(&suite, 1, 1).await?;
    let order_id = accepted.into_iter().next().ok_or_else(|| anyhow::anyhow!("the purchase was refused"))?;
    wait_until_settled(&suite.databases(), &BTreeSet::from([order_id.clone()]), Duration::from_secs(30)).await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (trace, spans) = loop {
        let spans = sink.spans();
        let trace = spans
            .iter()
            .find(|s| s.name == "purchase" && s.attribute("order.id") == Some(order_id.as_str()))
            .map(|s| s.trace_id.clone());
        if let Some(trace) = trace {
            // Each service exports in its own batches, on its own clock: wait for all of them.
            let names: BTreeSet<&str> = spans.iter().filter(|s| s.trace_id == trace).map(|s| s.name.as_str()).collect();
            let needed = ["purchase", "order.publish", "order.consume", "wallet.apply", "order.event.notify"];
            if needed.iter().all(|name| names.contains(name)) {
                break (trace, spans);
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no complete trace for {order_id}; received (service, span, trace, parent): {:#?}",
            spans
                .iter()
                .filter(|s| !s.name.ends_with("/ListItems"))
                .map(|s| format!("{} {} {} {}", s.service, s.name, s.trace_id, s.parent_span_id))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let in_trace: Vec<_> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let by_name =
        |name: &str| in_trace.iter().find(|s| s.name == name).map(|s| (s.service.as_str(), s.parent_span_id.as_str()));
    assert_eq!(by_name("purchase").map(|(service, _)| service), Some("flashsale-gateway"));
    assert_eq!(by_name("order.consume").map(|(service, _)| service), Some("flashsale-inventory"));
    assert_eq!(by_name("wallet.apply").map(|(service, _)| service), Some("flashsale-wallet"));
    let publish =
        in_trace.iter().find(|s| s.name == "order.publish").ok_or_else(|| anyhow::anyhow!("no publish span"))?;
    assert_eq!(by_name("order.consume").map(|(_, parent)| parent), Some(publish.span_id.as_str()));
    // One root: the gateway's gRPC server span.
    let roots: Vec<_> = in_trace.iter().filter(|s| s.parent_span_id.is_empty()).map(|s| s.name.as_str()).collect();
    assert_eq!(roots, ["flashsale.gateway.v1.FlashSaleGateway/Purchase"]);
    // The catalog refresh polls inventory five times a second, untraced on both sides.
    let polls: Vec<_> = spans.iter().filter(|s| s.name.ends_with("/ListItems") || s.name == "background").collect();
    assert!(polls.is_empty(), "background polling was traced: {polls:#?}");
    suite.shutdown().await
}

/// Sampling happens where a request enters: with the gateway at ratio 0 and the
/// services behind it recording every trace they start, a purchase still leaves
/// no span anywhere (the gateway tells them it was not sampled), while a
/// caller's sampled `traceparent` is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_purchases_leave_no_spans_and_sampled_callers_are_followed() -> anyhow::Result<()> {
    let _share = flashsale_integration_tests::suite::machine_share().await;
    let sink = flashsale_integration_tests::otlp::OtlpSink::start(0, true).await?;
    let suite = BinarySuite::spawn_with_envs(
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint()),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
        &[("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()), ("OTEL_TRACES_SAMPLER_ARG", "0".into())],
    )
    .await?;
    let (_, accepted) = small_storm(&suite, 3, 3).await?;
    anyhow::ensure!(!accepted.is_empty(), "no purchase was accepted");

    // A caller that sampled its own trace: the gateway and everything after follow it.
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = with_token(
        PurchaseRequest { item_id: "gauge".into(), quantity: 1, idempotency_key: "sampled-by-caller".into() },
        &token("m1", false),
    );
    request.metadata_mut().insert("traceparent", format!("00-{caller_trace}-b7ad6b7169203331-01").parse()?);
    let _ = suite.buyers().purchase(request).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let spans = sink.spans();
        if spans.iter().any(|s| s.trace_id == caller_trace && s.name == "purchase") {
            let others: Vec<_> = spans.iter().filter(|s| s.trace_id != caller_trace).collect();
            assert!(others.is_empty(), "spans of unsampled requests were exported: {others:#?}");
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the caller's sampled trace never arrived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    suite.shutdown().await
}
