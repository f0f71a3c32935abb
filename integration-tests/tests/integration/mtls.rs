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
use flashsale_proto::gateway::v1::{GetBalanceRequest as GatewayBalance, PurchaseRequest};
use flashsale_proto::inventory::v1::RefundOrderRequest;
use flashsale_proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use flashsale_proto::wallet::v1::{CreditRequest, DebitRequest, GetBalanceRequest};
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
