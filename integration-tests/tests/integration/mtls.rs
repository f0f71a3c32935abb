//! Mutual TLS between the services: inventory and wallet answer only callers
//! with a certificate from the suite's CA, and each internal method only the
//! services that need it; the suite's own calls go through. (The storm under
//! mutual TLS is `storm::a_storm_with_mutual_tls_between_the_services_sells_exactly_the_stock`.)

use std::sync::Arc;
use std::time::Duration;

use flashsale_integration_tests::TestSuite;
use flashsale_integration_tests::pki::TestPki;
use flashsale_integration_tests::suite::SuiteOptions;
use flashsale_proto::common::v1::OrderStatus;
use flashsale_proto::gateway::v1::{GetBalanceRequest as GatewayBalance, GetItemRequest, PurchaseRequest};
use flashsale_proto::inventory::v1::RefundOrderRequest;
use flashsale_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use flashsale_proto::wallet::v1::{CaptureRequest, CreditRequest, DebitRequest, GetBalanceRequest, HoldRequest};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::common::{create_item, final_order, top_up, usd};

/// How a test client reaches an internal service.
enum Caller<'a> {
    /// No TLS at all.
    Plaintext,
    /// TLS trusting the suite's CA, but no certificate of its own.
    NoCertificate,
    /// A certificate the CA issued to this service name.
    Named(&'a TlsFiles),
}

struct TlsFiles {
    identity: Identity,
}

impl TlsFiles {
    fn read(args: &flashsale_server::TlsArgs) -> anyhow::Result<Self> {
        let read = |path: &Option<std::path::PathBuf>| {
            let path = path.as_ref().ok_or_else(|| anyhow::anyhow!("a file the CA issued"))?;
            Ok::<_, anyhow::Error>(std::fs::read(path)?)
        };
        Ok(Self { identity: Identity::from_pem(read(&args.tls_cert_file)?, read(&args.tls_key_file)?) })
    }
}

async fn channel(suite: &TestSuite, service: &str, pki: &TestPki, caller: Caller<'_>) -> anyhow::Result<Channel> {
    let url = suite.url(service).ok_or_else(|| anyhow::anyhow!("{service} is not running"))?;
    let endpoint = match caller {
        Caller::Plaintext => Endpoint::from_shared(url.replacen("https://", "http://", 1))?,
        Caller::NoCertificate | Caller::Named(_) => {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(pki.ca_file())?));
            if let Caller::Named(files) = caller {
                tls = tls.identity(files.identity.clone());
            }
            Endpoint::from_shared(url)?.tls_config(tls)?
        }
    };
    Ok(endpoint.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(5)).connect_lazy())
}

/// The call failed on the wire (the handshake was refused, the connection
/// closed: which code tonic then reports depends on the moment); the service
/// never answered it.
fn no_answer(status: &tonic::Status) -> bool {
    status.code() != Code::Ok && std::error::Error::source(status).is_some()
}

fn credit(user: &str, key: &str) -> CreditRequest {
    CreditRequest {
        idempotency_key: key.into(),
        user_id: user.into(),
        amount: usd(1_000_000),
        reference: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_only_the_named_services_reach_inventory_and_wallet() -> anyhow::Result<()> {
    let pki = Arc::new(TestPki::new()?);
    let suite = TestSuite::spawn_with(SuiteOptions { mtls: Some(pki.clone()), ..Default::default() }).await?;

    // The suite's own calls: gateway → inventory (create), gateway → wallet
    // (top-up), inventory → wallet (the debit that settles the order).
    create_item(&suite, "mtls-lamp", 1_000, 5, 1).await?;
    top_up(&suite, "alice", 5_000).await?;
    let order_id = suite
        .buyers()
        .purchase(suite.as_user(
            "alice",
            PurchaseRequest { item_id: "mtls-lamp".into(), quantity: 1, idempotency_key: String::new() },
        ))
        .await?
        .into_inner()
        .order_id;
    let order = final_order(&suite, "alice", &order_id, Duration::from_secs(30)).await?;
    assert_eq!(order.status(), OrderStatus::Confirmed);

    let other_ca = TestPki::new()?;
    let forged = TlsFiles::read(&other_ca.issue("gateway")?)?;
    let gateway = TlsFiles::read(&pki.issue("gateway")?)?;
    let stranger = TlsFiles::read(&pki.issue("mallory")?)?;

    // Without a certificate the CA signed, nothing reaches the wallet: the
    // connection fails before any call (plaintext, no certificate, another CA's).
    for (name, caller) in [
        ("plaintext", Caller::Plaintext),
        ("no certificate", Caller::NoCertificate),
        ("another CA", Caller::Named(&forged)),
    ] {
        let mut wallet = WalletServiceClient::new(channel(&suite, "wallet", &pki, caller).await?);
        let status = wallet.credit(credit("mallory", &format!("forged {name}"))).await.expect_err(name);
        assert!(no_answer(&status), "{name}: {status:?}");
        let mut inventory = InventoryServiceClient::new(channel(&suite, "inventory", &pki, Caller::Plaintext).await?);
        let refund = RefundOrderRequest { order_id: order.id.clone(), user_id: String::new() };
        let status = inventory.refund_order(refund).await.expect_err("plaintext refund");
        assert!(no_answer(&status), "{status:?}");
    }

    // A certificate of the suite's CA, but for a service no method lists: refused.
    let mut wallet = WalletServiceClient::new(channel(&suite, "wallet", &pki, Caller::Named(&stranger)).await?);
    let status = wallet.credit(credit("mallory", "named mallory")).await.expect_err("mallory");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let mut inventory =
        InventoryServiceClient::new(channel(&suite, "inventory", &pki, Caller::Named(&stranger)).await?);
    let refund = RefundOrderRequest { order_id: order.id.clone(), user_id: String::new() };
    let status = inventory.refund_order(refund).await.expect_err("mallory refund");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // The gateway's certificate reads balances, but may not charge a buyer
    // (only inventory debits).
    let mut wallet = WalletServiceClient::new(channel(&suite, "wallet", &pki, Caller::Named(&gateway)).await?);
    let balance = wallet.get_balance(GetBalanceRequest { user_id: "alice".into(), currency: "USD".into() }).await?;
    assert_eq!(balance.into_inner().balances.first().map(|m| m.amount_minor), Some(4_000));
    let debit = DebitRequest {
        idempotency_key: "gateway debit".into(),
        user_id: "alice".into(),
        amount: usd(4_000),
        reference: String::new(),
    };
    let status = wallet.debit(debit).await.expect_err("gateway debit");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Nor capture a hold; and inventory may not place one (only the gateway
    // holds funds, when it admits an order).
    let capture = CaptureRequest { order_id: order.id.clone(), user_id: "alice".into(), amount: usd(1_000) };
    let status = wallet.capture(capture).await.expect_err("gateway capture");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let (cert, key) = pki.mint("inventory")?;
    let inventory = TlsFiles { identity: Identity::from_pem(cert, key) };
    let mut wallet = WalletServiceClient::new(channel(&suite, "wallet", &pki, Caller::Named(&inventory)).await?);
    let hold = HoldRequest {
        order_id: "inventory-hold".into(),
        user_id: "alice".into(),
        amount: usd(1_000),
        ttl_seconds: 60,
        reference: String::new(),
    };
    let status = wallet.hold(hold).await.expect_err("inventory hold");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Nothing changed: mallory has no money, alice still has hers, the order stands.
    let balance_of = |user: &str| {
        let request = suite.as_user(user, GatewayBalance { currency: "USD".into() });
        let mut buyers = suite.buyers();
        async move { buyers.get_balance(request).await }
    };
    let mallory = balance_of("mallory").await?.into_inner();
    assert!(mallory.balances.iter().all(|money| money.amount_minor == 0), "{mallory:?}");
    let alice = balance_of("alice").await?.into_inner();
    assert_eq!(alice.balances.first().map(|m| m.amount_minor), Some(4_000), "{alice:?}");
    assert_eq!(final_order(&suite, "alice", &order.id, Duration::from_secs(5)).await?.status(), OrderStatus::Confirmed);
    Ok(())
}

/// Whether the wallet answers a `GetBalance` on a new connection from a
/// client that trusts the CA(s) in `trust` and presents `identity`.
async fn wallet_answers(suite: &TestSuite, trust: &str, identity: &(String, String)) -> anyhow::Result<bool> {
    let url = suite.url("wallet").ok_or_else(|| anyhow::anyhow!("wallet is not running"))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust))
        .identity(Identity::from_pem(&identity.0, &identity.1));
    let channel = Endpoint::from_shared(url)?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let request = GetBalanceRequest { user_id: "alice".into(), currency: "USD".into() };
    match WalletServiceClient::new(channel).get_balance(request).await {
        Ok(_) => Ok(true),
        Err(status) if no_answer(&status) => Ok(false),
        Err(status) => anyhow::bail!("the wallet answered {status:?}"),
    }
}

/// Polls `condition` until it holds, for at most `limit`.
async fn until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits until every service has taken `sets` whole sets of files into use.
async fn sets_applied(suite: &TestSuite, sets: u64) -> anyhow::Result<()> {
    until(Duration::from_secs(20), "every service reads its TLS files again", || {
        let applied = suite.tls_sets_applied();
        applied.len() == 3 && applied.iter().all(|(_, n)| *n >= sets)
    })
    .await
}

/// What the gateway's calls saw: when each successful GetItem started, and
/// every failure.
#[derive(Default)]
struct Calls {
    items_ok: Vec<tokio::time::Instant>,
    failures: Vec<String>,
}

/// A change of CA under running services, as cert-manager or SPIRE make it:
/// the new CA joins the trust bundle, every service's certificate is renewed
/// from it (key first, so for a moment the files do not match), then the old
/// CA leaves. No service restarts, and the calls the gateway makes to
/// inventory and wallet all the while, back to back, all succeed; inventory
/// closes every connection after 1 s, so the gateway's new connections are
/// made with whatever its files say at the time. At the end the old CA's
/// certificates are refused and only the new ones accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renewed_and_a_new_ca_take_effect_without_a_restart_or_a_dropped_call() -> anyhow::Result<()> {
    let (old, new) = (Arc::new(TestPki::new()?), TestPki::new()?);
    let suite = Arc::new(
        TestSuite::spawn_with(SuiteOptions {
            mtls: Some(old.clone()),
            inventory_max_connection_age_ms: Some(1_000),
            ..Default::default()
        })
        .await?,
    );
    create_item(&suite, "renewed-lamp", 1_000, 100, 5).await?;
    top_up(&suite, "alice", 5_000).await?;
    let (old_ca, new_ca) = (std::fs::read_to_string(old.ca_file())?, std::fs::read_to_string(new.ca_file())?);
    let (old_gateway, new_gateway) = (old.mint("gateway")?, new.mint("gateway")?);
    assert!(wallet_answers(&suite, &old_ca, &old_gateway).await?, "the starting certificates");
    assert!(!wallet_answers(&suite, &old_ca, &new_gateway).await?, "a certificate of a CA not trusted yet");

    // The gateway's calls to inventory (GetItem) and wallet (GetBalance), back
    // to back until told to stop.
    let calls = Arc::new(parking_lot::Mutex::new(Calls::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = tokio::spawn({
        let (suite, calls, stop) = (suite.clone(), calls.clone(), stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = tokio::time::Instant::now();
                let item = suite.as_user("alice", GetItemRequest { item_id: "renewed-lamp".into() });
                match suite.buyers().get_item(item).await {
                    Ok(_) => calls.lock().items_ok.push(started),
                    Err(status) => calls.lock().failures.push(format!("GetItem: {status:?}")),
                }
                let balance = suite.as_user("alice", GatewayBalance { currency: "USD".into() });
                if let Err(status) = suite.buyers().get_balance(balance).await {
                    calls.lock().failures.push(format!("GetBalance: {status:?}"));
                }
            }
        }
    });

    // 1. Both CAs trusted.
    old.trust(&[&old, &new])?;
    sets_applied(&suite, 2).await?;
    assert!(wallet_answers(&suite, &old_ca, &new_gateway).await?, "the new CA's certificate, once both are trusted");
    // 2. Every certificate renewed from the new CA.
    for service in ["wallet", "inventory", "gateway"] {
        old.renew(service, &new)?;
    }
    sets_applied(&suite, 3).await?;
    assert!(wallet_answers(&suite, &new_ca, &new_gateway).await?, "the wallet presents its renewed certificate");
    // 3. The old CA no longer trusted.
    old.trust(&[&new])?;
    sets_applied(&suite, 4).await?;
    let old_ca_left = tokio::time::Instant::now();
    assert!(!wallet_answers(&suite, &new_ca, &old_gateway).await?, "a certificate of the CA that left");
    assert!(wallet_answers(&suite, &new_ca, &new_gateway).await?, "a certificate of the new CA");

    // Inventory closes each connection 1 s after it opened, so a GetItem
    // started 2 s after the old CA left went over a connection both sides made
    // with the new files only.
    let late = old_ca_left + Duration::from_secs(2);
    until(Duration::from_secs(30), "a GetItem over a connection made with the new files", || {
        let calls = calls.lock();
        !calls.failures.is_empty() || calls.items_ok.iter().any(|started| *started > late)
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    caller.await?;
    let calls = std::mem::take(&mut *calls.lock());
    assert!(calls.failures.is_empty(), "calls failed during the change of CA: {:?}", calls.failures);
    eprintln!("mtls: {} GetItem calls through the change of CA, none failed", calls.items_ok.len());

    // A purchase still settles: inventory pays through the wallet.
    let order_id = suite
        .buyers()
        .purchase(suite.as_user(
            "alice",
            PurchaseRequest { item_id: "renewed-lamp".into(), quantity: 1, idempotency_key: String::new() },
        ))
        .await?
        .into_inner()
        .order_id;
    assert_eq!(
        final_order(&suite, "alice", &order_id, Duration::from_secs(30)).await?.status(),
        OrderStatus::Confirmed
    );
    Ok(())
}

/// The `health` command of a service whose server requires mutual TLS (the
/// container health check) presents the files it is given: those of the
/// suite's CA pass, another CA's fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_command_checks_a_server_that_requires_mutual_tls() -> anyhow::Result<()> {
    let pki = Arc::new(TestPki::new()?);
    let suite = TestSuite::spawn_with(SuiteOptions { mtls: Some(pki.clone()), ..Default::default() }).await?;
    let url = suite.url("wallet").ok_or_else(|| anyhow::anyhow!("wallet is not running"))?;
    let port = url.rsplit(':').next().unwrap_or_default().to_owned();
    let health = |files: &flashsale_server::TlsArgs| -> anyhow::Result<bool> {
        let path = |file: &Option<std::path::PathBuf>| file.clone().unwrap_or_default();
        let binary = flashsale_integration_tests::service_binary("flashsale-wallet")?;
        let status = tokio::task::block_in_place(|| {
            std::process::Command::new(binary)
                .arg("health")
                .env("WALLET_LISTEN_ADDR", format!("0.0.0.0:{port}"))
                .env("TLS_CERT_FILE", path(&files.tls_cert_file))
                .env("TLS_KEY_FILE", path(&files.tls_key_file))
                .env("TLS_CA_FILE", path(&files.tls_ca_file))
                .stderr(std::process::Stdio::null())
                .status()
        })?;
        Ok(status.success())
    };
    assert!(health(&pki.issue("probe")?)?, "the health command with the suite CA's certificate");
    let other = TestPki::new()?;
    assert!(!health(&other.issue("probe")?)?, "the health command with another CA's certificate");
    Ok(())
}
