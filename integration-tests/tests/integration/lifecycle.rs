//! What every service owes its operators: health, reflection, graceful shutdown.

use std::process::Stdio;
use std::time::Duration;

use flashsale_integration_tests::{TestDatabase, TestSuite, TestWallet, service_binary};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_reports_health_and_turns_not_serving_on_shutdown() -> anyhow::Result<()> {
    let wallet = TestWallet::spawn().await?;
    let mut health = HealthClient::new(wallet.channel.clone());
    for service in ["", "flashsale.wallet.v1.WalletService"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await?.into_inner().status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let status = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await.expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);

    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await?.into_inner();
    let first = watch.next().await.ok_or_else(|| anyhow::anyhow!("watch ended"))??;
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(wallet.stop());
    let next = watch.next().await.ok_or_else(|| anyhow::anyhow!("watch ended before NOT_SERVING"))??;
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    stopping.await??.drop_now().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_serves_reflection_for_its_api_and_health() -> anyhow::Result<()> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let wallet = TestWallet::spawn().await?;
    let mut reflection = ServerReflectionClient::new(wallet.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::once(request)).await?.into_inner();
    let response = responses.next().await.ok_or_else(|| anyhow::anyhow!("no reflection reply"))??;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        anyhow::bail!("unexpected reflection reply {:?}", response.message_response);
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["flashsale.wallet.v1.WalletService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    wallet.shutdown().await
}

/// The real binary, started the way operators start it, stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_binary_exits_cleanly_on_sigterm() -> anyhow::Result<()> {
    let db = TestDatabase::create("wallet_bin").await?;
    let mut child = tokio::process::Command::new(service_binary("flashsale-wallet")?)
        .env("DATABASE_URL", db.url())
        .env("WALLET_LISTEN_ADDR", "127.0.0.1:0")
        // Port 0 for every listener: a running system (deploy/local/run.sh) holds the defaults.
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    // The JSON log line announcing the bound port.
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("wallet serving gRPC") {
                let port = line
                    .split("\"port\":")
                    .nth(1)
                    .and_then(|rest| rest.split([',', '}']).next())
                    .and_then(|p| p.parse::<u16>().ok())
                    .ok_or_else(|| anyhow::anyhow!("no port in {line}"))?;
                return anyhow::Ok(port);
            }
        }
        anyhow::bail!("wallet exited before serving")
    })
    .await??;

    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?.connect().await?;
    let status = HealthClient::new(channel).check(HealthCheckRequest::default()).await?.into_inner().status();
    assert_eq!(status, ServingStatus::Serving);

    let pid = child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let killed = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait()).await??;
    assert!(exit.success(), "wallet exited with {exit:?} after SIGTERM");
    let mut saw_stop = false;
    while let Some(line) = lines.next_line().await? {
        saw_stop |= line.contains("wallet stopped");
    }
    assert!(saw_stop, "no 'wallet stopped' log line");
    db.drop_now().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_reports_its_apis_serving() -> anyhow::Result<()> {
    let suite = TestSuite::spawn().await?;
    let expected = [
        ("wallet", vec!["", "flashsale.wallet.v1.WalletService"]),
        ("inventory", vec!["", "flashsale.inventory.v1.InventoryService"]),
        ("gateway", vec!["", "flashsale.gateway.v1.FlashSaleGateway", "flashsale.gateway.v1.AdminService"]),
    ];
    for (service, names) in expected {
        let url = suite.url(service).ok_or_else(|| anyhow::anyhow!("{service} not running"))?;
        let mut health = HealthClient::new(tonic::transport::Channel::from_shared(url)?.connect().await?);
        for name in names {
            let status = health.check(HealthCheckRequest { service: name.into() }).await?.into_inner().status();
            assert_eq!(status, ServingStatus::Serving, "{service}: {name:?}");
        }
    }
    suite.shutdown().await
}
