//! One purchase is one trace. The three services run in this process with the
//! SDK's in-memory span exporter installed as the global subscriber's backend
//! (its own test binary, so no other test's spans land in it), a purchase goes
//! through the real gateway → RabbitMQ → inventory → wallet → RabbitMQ →
//! gateway path, and the exported spans are checked for one trace id and the
//! parent links that crossed gRPC metadata and AMQP headers.

#[path = "integration/common.rs"]
#[allow(dead_code, reason = "shared with the main integration binary, which uses all of it")]
mod common;

use std::time::Duration;

use flashsale_integration_tests::TestSuite;
use flashsale_proto::common::v1::OrderStatus;
use flashsale_proto::gateway::v1::PurchaseRequest;
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};

use crate::common::{create_item, final_order, top_up};

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
}

/// The one span of `trace` named `name` (and of `kind`, when given).
fn one<'a>(spans: &'a [SpanData], trace: TraceId, name: &str, kind: Option<SpanKind>) -> anyhow::Result<&'a SpanData> {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace && s.name == name)
        .filter(|s| kind.as_ref().is_none_or(|k| &s.span_kind == k))
        .collect();
    match found.as_slice() {
        [span] => Ok(span),
        _ => anyhow::bail!(
            "expected one {name} span ({kind:?}) in trace {trace}, found {}; the trace has {:?}",
            found.len(),
            spans.iter().filter(|s| s.span_context.trace_id() == trace).map(|s| s.name.as_ref()).collect::<Vec<_>>()
        ),
    }
}

fn id(span: &SpanData) -> SpanId {
    span.span_context.span_id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_purchase_is_one_trace_across_gateway_queue_inventory_and_wallet() -> anyhow::Result<()> {
    let exporter = InMemorySpanExporter::default();
    let telemetry =
        flashsale_telemetry::init_for_tests("tests", exporter.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let suite = TestSuite::spawn().await?;
    create_item(&suite, "traced", 1_500, 5, 1).await?;
    top_up(&suite, "tracy", 10_000).await?;

    // A health check, which must not be traced.
    let mut health = tonic_health::pb::health_client::HealthClient::new(suite.new_gateway_channel().await?);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?;

    let reply = suite
        .buyers()
        .purchase(suite.as_user(
            "tracy",
            PurchaseRequest { item_id: "traced".into(), quantity: 1, idempotency_key: "trace-me".into() },
        ))
        .await?
        .into_inner();
    let order = final_order(&suite, "tracy", &reply.order_id, Duration::from_secs(30)).await?;
    assert_eq!(order.status(), OrderStatus::Confirmed);

    // The gateway's notification of the final state is the trace's last span; wait for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        telemetry.flush();
        let spans = exporter.get_finished_spans()?;
        let purchase = spans
            .iter()
            .find(|s| s.name == "purchase" && attribute(s, "order.id").as_deref() == Some(reply.order_id.as_str()));
        if let Some(purchase) = purchase {
            let trace = purchase.span_context.trace_id();
            let has = |name: &str| spans.iter().any(|s| s.span_context.trace_id() == trace && s.name == name);
            if has("order.event.notify") && has("order.event.apply") {
                break spans;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            for s in &spans {
                eprintln!(
                    "{} {} {} parent {} remote {}",
                    s.name,
                    s.span_context.trace_id(),
                    s.span_context.span_id(),
                    s.parent_span_id,
                    s.parent_span_is_remote
                );
            }
            anyhow::bail!("the purchase's trace never reached the gateway's notification");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let purchase = spans
        .iter()
        .find(|s| s.name == "purchase" && attribute(s, "order.id").as_deref() == Some(reply.order_id.as_str()))
        .ok_or_else(|| anyhow::anyhow!("no purchase span"))?;
    let trace = purchase.span_context.trace_id();
    assert_eq!(attribute(purchase, "outcome").as_deref(), Some("ACCEPTED"));
    assert_eq!(attribute(purchase, "user.id").as_deref(), Some("tracy"));
    assert_eq!(attribute(purchase, "item.id").as_deref(), Some("traced"));

    // Gateway: the gRPC server span, the purchase under it, the publish under that.
    let server = one(&spans, trace, "flashsale.gateway.v1.FlashSaleGateway/Purchase", Some(SpanKind::Server))?;
    assert_eq!(purchase.parent_span_id, id(server));
    // The first attempt on a fresh item rebuilds its Redis state from inventory
    // and runs the script again: one or two admission spans, all in this purchase.
    let admissions: Vec<&SpanData> =
        spans.iter().filter(|s| s.span_context.trace_id() == trace && s.name == "admission").collect();
    assert!(!admissions.is_empty(), "no admission span");
    assert!(admissions.iter().all(|s| s.parent_span_id == id(purchase)));
    let publish = one(&spans, trace, "order.publish", Some(SpanKind::Producer))?;
    assert_eq!(publish.parent_span_id, id(purchase));

    // Inventory: the consume span's parent came through the AMQP headers.
    let consume = one(&spans, trace, "order.consume", Some(SpanKind::Consumer))?;
    assert_eq!(consume.parent_span_id, id(publish), "the consume span's parent is the publish span");
    assert!(consume.parent_span_is_remote, "the consume span's parent came from another process's message");
    assert_eq!(attribute(consume, "order.id").as_deref(), Some(reply.order_id.as_str()));
    let record = one(&spans, trace, "orders.record", None)?;
    assert_eq!(record.parent_span_id, id(consume));
    // Payment runs per batch (one wallet call, one settling transaction).
    let pay = one(&spans, trace, "orders.pay", None)?;
    assert_eq!(pay.parent_span_id, id(consume));

    // Inventory → wallet over gRPC: client span, then the wallet's server span under it.
    let debit_client = one(&spans, trace, "flashsale.wallet.v1.WalletService/BatchDebit", Some(SpanKind::Client))?;
    assert_eq!(debit_client.parent_span_id, id(pay));
    let debit_server = one(&spans, trace, "flashsale.wallet.v1.WalletService/BatchDebit", Some(SpanKind::Server))?;
    assert_eq!(debit_server.parent_span_id, id(debit_client));
    assert!(debit_server.parent_span_is_remote, "the wallet's parent came through gRPC metadata");
    let apply = one(&spans, trace, "wallet.apply", None)?;
    assert_eq!(apply.parent_span_id, id(debit_server));
    assert_eq!(attribute(apply, "db.operation.batch.size").as_deref(), Some("1"));
    let settle = one(&spans, trace, "orders.settle", None)?;
    assert_eq!(settle.parent_span_id, id(pay));
    assert_eq!(attribute(settle, "db.operation.batch.size").as_deref(), Some("1"));

    // Back to the gateway through the order-events exchange (outbox → headers).
    for name in ["order.event.notify", "order.event.apply"] {
        let event = one(&spans, trace, name, Some(SpanKind::Consumer))?;
        assert_eq!(event.parent_span_id, id(settle), "{name}'s parent is the span that wrote the event");
        assert!(event.parent_span_is_remote);
        assert_eq!(attribute(event, "order.id").as_deref(), Some(reply.order_id.as_str()));
    }

    // REST: a purchase carrying the caller's `traceparent` continues that trace,
    // under a server span named after the route.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    create_item(&suite, "traced-rest", 1_500, 5, 1).await?;
    let reply: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/purchases", suite.http_url()))
        .bearer_auth(suite.token("tracy", false))
        .header("traceparent", format!("00-{caller_trace}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({"item_id": "traced-rest", "quantity": 1}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let rest_order = reply["order_id"].as_str().ok_or_else(|| anyhow::anyhow!("no order id in {reply}"))?.to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        telemetry.flush();
        let spans = exporter.get_finished_spans()?;
        if spans
            .iter()
            .any(|s| s.name == "order.consume" && attribute(s, "order.id").as_deref() == Some(rest_order.as_str()))
        {
            break spans;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the REST purchase was never consumed in a trace");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let trace = TraceId::from_hex(caller_trace)?;
    let http = one(&spans, trace, "POST /v1/purchases", Some(SpanKind::Server))?;
    assert_eq!(http.parent_span_id, SpanId::from_hex("00f067aa0ba902b7")?);
    assert_eq!(attribute(http, "http.response.status_code").as_deref(), Some("202"));
    let rest_purchase = one(&spans, trace, "purchase", None)?;
    assert_eq!(rest_purchase.parent_span_id, id(http));
    assert_eq!(attribute(rest_purchase, "order.id").as_deref(), Some(rest_order.as_str()));
    one(&spans, trace, "order.consume", Some(SpanKind::Consumer))?;

    // Health checks are not traced.
    let health_spans: Vec<&str> =
        spans.iter().filter(|s| s.name.contains("grpc.health")).map(|s| s.name.as_ref()).collect();
    assert!(health_spans.is_empty(), "health checks were traced: {health_spans:?}");

    suite.shutdown().await
}
