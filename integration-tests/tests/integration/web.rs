//! The HTTP side seen from outside tools: the storefront driven in headless
//! Chromium (playwright-core), and a schema-driven fuzz run of `/openapi.json`
//! (schemathesis). Both tools are installed by `deploy/local/test.sh`; the paths
//! can be overridden with `NODE`, `CHROMIUM_PATH` and `SCHEMATHESIS`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use flashsale_integration_tests::TestSuite;
use flashsale_integration_tests::suite::SuiteOptions;

use crate::common::{create_item, top_up};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where tests leave files for people to look at (screenshots, reports).
fn test_output(name: &str) -> anyhow::Result<PathBuf> {
    let dir = repo_root().join("target").join("test-output").join(name);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs a tool to completion (bounded), passing its output through, and fails
/// unless it exits 0.
async fn run_tool(mut command: tokio::process::Command, what: &str, limit: Duration) -> anyhow::Result<()> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = command.spawn().map_err(|e| anyhow::anyhow!("cannot start {what} ({e}); run deploy/local/test.sh"))?;
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("{what} still running after {limit:?}"))??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}");
    eprintln!("{stderr}");
    anyhow::ensure!(output.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", output.status);
    Ok(())
}

/// `storefront.test.mjs` against `suite` (item `poster` on sale, `browser-buyer` funded).
async fn run_storefront_test(suite: &TestSuite, screenshots: &str, provider: Option<&str>) -> anyhow::Result<()> {
    let dir = repo_root().join("integration-tests").join("browser");
    anyhow::ensure!(
        dir.join("node_modules").join("playwright-core").is_dir(),
        "playwright-core is not installed: npm ci --prefix integration-tests/browser (deploy/local/test.sh does it)"
    );
    let screenshots = test_output(screenshots)?;
    let mut node = tokio::process::Command::new(std::env::var("NODE").unwrap_or_else(|_| "node".into()));
    node.arg(dir.join("storefront.test.mjs"))
        .env("STOREFRONT_URL", suite.http_url())
        .env("ITEM_ID", "poster")
        .env("BUYER", "browser-buyer")
        .env("SCREENSHOT_DIR", &screenshots);
    if let Some(issuer) = provider {
        node.env("SIGNIN", "provider").env("IDP_URL", issuer);
    }
    run_tool(node, "the storefront browser test", Duration::from_secs(180)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_buys_and_refunds_in_the_storefront_without_reloading() -> anyhow::Result<()> {
    let _machine = flashsale_integration_tests::suite::whole_machine().await;
    let suite = TestSuite::spawn_with(SuiteOptions { holds_machine: true, ..SuiteOptions::default() }).await?;
    create_item(&suite, "poster", 1_500, 10, 1).await?;
    top_up(&suite, "browser-buyer", 5_000).await?;
    run_storefront_test(&suite, "storefront", None).await?;
    // The page's actions reached the databases: the refund restored the stock.
    let report = flashsale_integration_tests::audit::audit(&suite.databases()).await?;
    assert_eq!(report.remaining.get("poster"), Some(&10), "the refunded unit is on sale again");
    assert!(report.orders.iter().any(|o| o.user_id == "browser-buyer" && o.status == "REFUNDED"));
    suite.shutdown().await
}

/// The same journey with sign-in at an identity provider (the test one, over
/// real HTTP on another origin): the storefront sends each buyer to its page
/// with a PKCE challenge and trades the code for an access token, which the
/// gateway verifies against the provider's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_signs_in_at_the_identity_provider_with_pkce_and_buys_in_the_storefront() -> anyhow::Result<()> {
    use flashsale_integration_tests::idp::{CLIENT_ID, TestIdentityProvider};
    use flashsale_integration_tests::suite::with_token;
    use flashsale_proto::gateway::v1::{CreateItemRequest, TopUpRequest};

    let _machine = flashsale_integration_tests::suite::whole_machine().await;
    let idp = TestIdentityProvider::start().await?;
    let audience = "https://flashsale.test/api";
    let oidc = flashsale_gateway::config::OidcConfig {
        issuer: Some(idp.issuer.clone()),
        audience: Some(audience.into()),
        client_id: Some(CLIENT_ID.into()),
        ..flashsale_gateway::config::OidcConfig::off()
    };
    let suite = TestSuite::spawn_with(SuiteOptions {
        holds_machine: true,
        gateway_oidc: Some(oidc),
        ..SuiteOptions::default()
    })
    .await?;
    // The sale and the buyer's money, set up by an operator signed in at the provider.
    let mut operator = idp.claims("setup-operator", audience);
    operator.insert("roles".into(), serde_json::json!(["admin"]));
    let operator = idp.key("rsa-0")?.sign(&serde_json::Value::Object(operator))?;
    let sale = CreateItemRequest {
        id: "poster".into(),
        name: "item poster".into(),
        price: crate::common::usd(1_500),
        stock_total: 10,
        per_user_limit: 1,
        starts_at: crate::common::at(Duration::from_secs(1), false),
        ends_at: crate::common::at(Duration::from_secs(3600), true),
        admission_buckets: 0,
    };
    suite.admin().create_item(with_token(sale, &operator)).await?;
    let money = TopUpRequest {
        user_id: "browser-buyer".into(),
        amount: crate::common::usd(5_000),
        idempotency_key: String::new(),
    };
    suite.admin().top_up(with_token(money, &operator)).await?;

    run_storefront_test(&suite, "storefront-pkce", Some(&idp.issuer)).await?;
    // Two sign-ins (the buyer, then the admin), each one code traded with its verifier.
    assert_eq!(idp.token_exchanges(), (2, 0), "(codes traded, token requests refused)");
    let report = flashsale_integration_tests::audit::audit(&suite.databases()).await?;
    assert_eq!(report.remaining.get("poster"), Some(&10), "the refunded unit is on sale again");
    assert!(report.orders.iter().any(|o| o.user_id == "browser-buyer" && o.status == "REFUNDED"));
    suite.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_response_off_the_spec() -> anyhow::Result<()> {
    let _machine = flashsale_integration_tests::suite::whole_machine().await;
    let suite = TestSuite::spawn_with(SuiteOptions { holds_machine: true, ..SuiteOptions::default() }).await?;
    // Something to buy, look at and refund, so requests reach past "not found".
    // The spec's examples name `demo-drop`: with it on sale, generated requests
    // reach past "not found" into purchases, orders and refunds.
    create_item(&suite, "demo-drop", 100, 1_000, 5).await?;
    create_item(&suite, "fuzz-item", 100, 1_000, 5).await?;
    top_up(&suite, "fuzzer", 1_000_000).await?;
    let token = suite.token("fuzzer", true);
    let venv = repo_root().join("integration-tests").join("python").join(".venv").join("bin").join("schemathesis");
    let program = std::env::var("SCHEMATHESIS").map(PathBuf::from).unwrap_or(venv);
    let report = test_output("schemathesis")?;
    let mut schemathesis = tokio::process::Command::new(program);
    schemathesis
        .arg("run")
        .arg(format!("{}/openapi.json", suite.http_url()))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        // Every check but positive_data_acceptance: some rules cannot be written in
        // a JSON schema (ends_at after starts_at, quantity within the item's own
        // limit, page tokens only this API issued, ISO 4217 codes that exist), so a
        // schema-valid request may rightly get a documented 400.
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "50", "--seed", "20261126", "--no-color"])
        .arg(format!("--report-dir={}", report.display()))
        .args(["--report", "junit"])
        .current_dir(&report);
    run_tool(schemathesis, "schemathesis", Duration::from_secs(300)).await?;
    suite.shutdown().await
}
