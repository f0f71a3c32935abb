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
    let wallet = TestWallet::spawn().await?;
    let names = reflected_services(wallet.channel.clone()).await?;
    for expected in ["flashsale.wallet.v1.WalletService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    wallet.shutdown().await
}

/// The public port describes the public API only: the gateway's reflection
/// lists its own services and health, and refuses to describe the internal
/// inventory and wallet services (their full descriptors were served to anyone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_reflection_describes_only_the_public_api() -> anyhow::Result<()> {
    let suite = TestSuite::spawn().await?;
    let mut names = reflected_services(suite.gateway_channel()).await?;
    names.retain(|name| !name.starts_with("grpc.reflection."));
    names.sort();
    assert_eq!(
        names,
        ["flashsale.gateway.v1.AdminService", "flashsale.gateway.v1.FlashSaleGateway", "grpc.health.v1.Health"]
    );
    assert!(describes(suite.gateway_channel(), "flashsale.gateway.v1.FlashSaleGateway").await?);
    for internal in ["flashsale.inventory.v1.InventoryService", "flashsale.wallet.v1.WalletService"] {
        assert!(!describes(suite.gateway_channel(), internal).await?, "the gateway describes {internal}");
    }
    suite.shutdown().await
}

/// The reply to one reflection request, or the status the stream ended with.
async fn reflection_reply(
    channel: tonic::transport::Channel,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> anyhow::Result<Result<tonic_reflection::pb::v1::server_reflection_response::MessageResponse, tonic::Status>> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut responses = reflection.server_reflection_info(tokio_stream::once(request)).await?.into_inner();
    match responses.next().await.ok_or_else(|| anyhow::anyhow!("no reflection reply"))? {
        Ok(response) => {
            Ok(Ok(response.message_response.ok_or_else(|| anyhow::anyhow!("an empty reflection reply"))?))
        }
        Err(status) => Ok(Err(status)),
    }
}

/// The services a server's reflection lists.
async fn reflected_services(channel: tonic::transport::Channel) -> anyhow::Result<Vec<String>> {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    match reflection_reply(channel, MessageRequest::ListServices(String::new())).await?? {
        MessageResponse::ListServicesResponse(list) => Ok(list.service.into_iter().map(|s| s.name).collect()),
        other => anyhow::bail!("unexpected reflection reply {other:?}"),
    }
}

/// Whether a server's reflection hands out the descriptor of `symbol`.
async fn describes(channel: tonic::transport::Channel, symbol: &str) -> anyhow::Result<bool> {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    match reflection_reply(channel, MessageRequest::FileContainingSymbol(symbol.into())).await? {
        Ok(MessageResponse::FileDescriptorResponse(files)) => Ok(!files.file_descriptor_proto.is_empty()),
        Ok(MessageResponse::ErrorResponse(error)) if error.error_code == tonic::Code::NotFound as i32 => Ok(false),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(false),
        other => anyhow::bail!("unexpected reflection reply {other:?}"),
    }
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

/// `flashsale-<service> health`, the container health check: exit 0 while the
/// service on its listen address answers SERVING, non-zero once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_command_exits_zero_only_while_the_service_serves() -> anyhow::Result<()> {
    let mut suite = flashsale_integration_tests::binaries::BinarySuite::spawn().await?;
    let health = |binary: &str, listen_var: &str, port: u16| -> anyhow::Result<std::process::ExitStatus> {
        Ok(std::process::Command::new(service_binary(binary)?)
            .arg("health")
            // The probe asks this host when the service listens on every interface.
            .env(listen_var, format!("0.0.0.0:{port}"))
            .env("JWT_SECRET", "a-secret-of-at-least-thirty-two-bytes")
            .stderr(Stdio::null())
            .status()?)
    };
    let services = [
        ("flashsale-wallet", "WALLET_LISTEN_ADDR", suite.wallet.grpc_port),
        ("flashsale-inventory", "INVENTORY_LISTEN_ADDR", suite.inventory.grpc_port),
        ("flashsale-gateway", "GATEWAY_LISTEN_ADDR", suite.gateway.grpc_port),
    ];
    for (binary, listen_var, port) in services {
        assert!(health(binary, listen_var, port)?.success(), "{binary} health failed while serving");
    }
    let wallet_port = suite.wallet.grpc_port;
    suite.wallet.kill().await?;
    assert!(!health("flashsale-wallet", "WALLET_LISTEN_ADDR", wallet_port)?.success(), "healthy with no wallet");
    suite.wallet.restart_without("FAILPOINTS").await?;
    suite.shutdown().await
}

/// Development tokens stay on this machine: the gateway refuses to start with
/// `DEV_TOKENS` on a non-loopback address, and `flashsale-gateway token`
/// refuses admin tokens for a gateway configured beyond loopback (buyer tokens
/// still come out; the operator's come from the identity provider).
#[tokio::test]
async fn development_tokens_are_refused_beyond_loopback() -> anyhow::Result<()> {
    let gateway = service_binary("flashsale-gateway")?;
    let secret = "a-secret-of-at-least-thirty-two-bytes";
    let token = |admin: bool, env: &[(&str, &str)]| -> anyhow::Result<std::process::Output> {
        let mut command = std::process::Command::new(&gateway);
        command.args(["token", "--sub", "someone"]).env("JWT_SECRET", secret).envs(env.iter().copied());
        if admin {
            command.arg("--admin");
        }
        Ok(command.output()?)
    };
    // What the gateway itself makes of a printed token.
    let verifier = flashsale_gateway::auth::Authenticator::new(secret, None, None);
    let is_admin = async |output: &std::process::Output| -> anyhow::Result<bool> {
        let token = String::from_utf8(output.stdout.clone())?;
        let principal = verifier.verify(token.trim()).await.map_err(|e| anyhow::anyhow!("{token}: {e:?}"))?;
        Ok(principal.admin)
    };

    let local = token(true, &[])?;
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    assert!(is_admin(&local).await?, "no admin role in the local admin token");
    for (var, addr) in [("GATEWAY_HTTP_ADDR", "0.0.0.0:8080"), ("GATEWAY_LISTEN_ADDR", "10.1.2.3:50051")] {
        let refused = token(true, &[(var, addr)])?;
        assert!(!refused.status.success(), "an admin token with {var}={addr}");
        assert!(refused.stdout.is_empty(), "a token was printed with {var}={addr}");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("no admin token"), "{refused:?}");
        let buyer = token(false, &[(var, addr)])?;
        assert!(buyer.status.success(), "{}", String::from_utf8_lossy(&buyer.stderr));
        assert!(!is_admin(&buyer).await?, "a buyer token with the admin role");
    }

    // The server itself: refused before it binds or connects to anything.
    let started = tokio::process::Command::new(&gateway)
        .env("JWT_SECRET", secret)
        .env("DEV_TOKENS", "true")
        .env("GATEWAY_LISTEN_ADDR", "127.0.0.1:0")
        .env("GATEWAY_HTTP_ADDR", "0.0.0.0:0")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), started).await??;
    assert!(!output.status.success(), "the gateway started with DEV_TOKENS on 0.0.0.0");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(said.contains("DEV_TOKENS needs GATEWAY_LISTEN_ADDR and GATEWAY_HTTP_ADDR on a loopback"), "{said}");

    // `descriptor-set` writes the set the Istio transcoder option ships.
    let set = std::process::Command::new(&gateway).arg("descriptor-set").output()?;
    assert!(set.status.success());
    let shipped = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/k8s/components/istio-grpc-json-transcoder/flashsale-gateway.binpb"),
    )?;
    assert!(set.stdout == shipped, "flashsale-gateway descriptor-set differs from the shipped descriptor set");
    Ok(())
}
