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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_buys_and_refunds_in_the_storefront_without_reloading() -> anyhow::Result<()> {
    let _machine = flashsale_integration_tests::suite::whole_machine().await;
    let suite = TestSuite::spawn_with(SuiteOptions { holds_machine: true, ..SuiteOptions::default() }).await?;
    create_item(&suite, "poster", 1_500, 10, 1).await?;
    top_up(&suite, "browser-buyer", 5_000).await?;
    let dir = repo_root().join("integration-tests").join("browser");
    anyhow::ensure!(
        dir.join("node_modules").join("playwright-core").is_dir(),
        "playwright-core is not installed: npm ci --prefix integration-tests/browser (deploy/local/test.sh does it)"
    );
    let screenshots = test_output("storefront")?;
    let mut node = tokio::process::Command::new(std::env::var("NODE").unwrap_or_else(|_| "node".into()));
    node.arg(dir.join("storefront.test.mjs"))
        .env("STOREFRONT_URL", suite.http_url())
        .env("ITEM_ID", "poster")
        .env("BUYER", "browser-buyer")
        .env("SCREENSHOT_DIR", &screenshots);
    run_tool(node, "the storefront browser test", Duration::from_secs(180)).await?;
    // The page's actions reached the databases: the refund restored the stock.
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
