//! The audit log of admin actions: who created which sale and who credited
//! whom, when and with what outcome, refused attempts included (over gRPC and
//! REST), written to its own file apart from the application logs, and never
//! holding a token or secret.

use std::time::Duration;

use flashsale_integration_tests::TestSuite;
use flashsale_integration_tests::suite::{JWT_SECRET, SuiteOptions, with_token};
use flashsale_proto::gateway::v1::{CreateItemRequest, TopUpRequest};
use serde_json::{Value, json};

use crate::common::{at, usd};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_and_refused_attempts_are_audited_without_credentials() -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("flashsale-audit-{}.log", uuid::Uuid::new_v4().simple()));
    let suite = TestSuite::spawn_with(SuiteOptions {
        audit_log: Some(path.to_string_lossy().into_owned()),
        ..Default::default()
    })
    .await?;
    let admin = suite.token("operator", true);
    let buyer = suite.token("mallory", false);
    let item = |id: &str| CreateItemRequest {
        id: id.into(),
        name: "audited sale".into(),
        price: usd(250),
        stock_total: 7,
        per_user_limit: 1,
        starts_at: at(Duration::from_secs(1), false),
        ends_at: at(Duration::from_secs(3600), true),
        admission_buckets: 0,
    };
    let credit = |key: &str| TopUpRequest { user_id: "carol".into(), amount: usd(500), idempotency_key: key.into() };
    suite.admin().create_item(with_token(item("audited"), &admin)).await?;
    suite.admin().top_up(with_token(credit("gift-1"), &admin)).await?;
    let refused = suite.admin().top_up(with_token(credit("steal-1"), &buyer)).await;
    assert_eq!(refused.err().map(|s| s.code()), Some(tonic::Code::PermissionDenied));
    // An admin action that fails after the role check: a duplicate item id.
    assert!(suite.admin().create_item(with_token(item("audited"), &admin)).await.is_err());
    let rest = reqwest::Client::new();
    let status = rest
        .post(format!("{}/v1/admin/items", suite.http_url()))
        .bearer_auth(&buyer)
        .json(&json!({"id": "x"}))
        .send()
        .await?
        .status();
    assert_eq!(status, 403);
    let status = rest
        .post(format!("{}/v1/admin/users/carol/top-up", suite.http_url()))
        .bearer_auth(&admin)
        .json(&json!({"amount": {"currency": "USD", "amount_minor": 100}, "idempotency_key": "gift-2"}))
        .send()
        .await?
        .status();
    assert_eq!(status, 200);

    let text = std::fs::read_to_string(&path)?;
    let records: Vec<Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let summary: Vec<(String, String, String, String)> = records
        .iter()
        .map(|r| {
            let field = |name: &str| r[name].as_str().unwrap_or_default().to_owned();
            (field("actor"), field("action"), field("target"), field("outcome"))
        })
        .collect();
    let expected = [
        ("operator", "create_item", "audited", "OK"),
        ("operator", "top_up", "carol", "OK"),
        ("mallory", "top_up", "carol", "FORBIDDEN"),
        ("operator", "create_item", "audited", "ITEM_ALREADY_EXISTS"),
        ("mallory", "POST /v1/admin/items", "", "FORBIDDEN"),
        ("operator", "top_up", "carol", "OK"),
    ];
    let expected: Vec<(String, String, String, String)> = expected
        .iter()
        .map(|(a, b, c, d)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned(), (*d).to_owned()))
        .collect();
    assert_eq!(summary, expected, "{text}");
    // What was done, and when.
    assert_eq!(records[0]["details"]["stock_total"], 7, "{}", records[0]);
    assert_eq!(records[1]["details"]["amount"]["amount_minor"], 500, "{}", records[1]);
    assert_eq!(records[5]["details"]["amount"]["amount_minor"], 100, "{}", records[5]);
    for record in &records {
        let at = record["at"].as_str().unwrap_or_default();
        assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "no time in {record}");
    }
    // No credential reaches the log.
    for secret in [admin.as_str(), buyer.as_str(), JWT_SECRET] {
        assert!(!text.contains(secret), "a token or the secret is in the audit log");
    }
    assert!(!text.to_lowercase().contains("bearer"), "{text}");
    suite.shutdown().await?;
    std::fs::remove_file(&path)?;
    Ok(())
}
