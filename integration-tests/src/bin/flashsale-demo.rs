//! `flashsale-demo seed`: puts demo data into a running suite through its public
//! gRPC APIs (never its tables), idempotently, so the run script can call it on
//! every start.

use anyhow::Context;
use clap::{Parser, Subcommand};
use flashsale_proto::common::v1::Money;
use flashsale_proto::wallet::v1::CreditRequest;
use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;

/// Demo buyers and what each starts with, in USD cents.
const DEMO_BALANCES: [(&str, i64); 3] = [("alice", 10_000), ("bob", 2_500), ("carol", 500)];

#[derive(Debug, Parser)]
#[command(about = "Seeds demo data into a running flash-sale suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tops up the demo buyers' wallets (once: reruns are no-ops).
    Seed {
        #[arg(long, env = "WALLET_URL", default_value = "http://127.0.0.1:50053")]
        wallet_url: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Seed { wallet_url } => seed(wallet_url).await,
    }
}

async fn seed(wallet_url: String) -> anyhow::Result<()> {
    let mut wallet = WalletServiceClient::connect(wallet_url.clone())
        .await
        .with_context(|| format!("connecting to the wallet at {wallet_url}"))?;
    for (user, cents) in DEMO_BALANCES {
        // A fixed key per user: the first run credits, later runs replay.
        let reply = wallet
            .credit(CreditRequest {
                idempotency_key: format!("demo-top-up:{user}"),
                user_id: user.into(),
                amount: Some(Money { currency: "USD".into(), amount_minor: cents }),
                reference: "demo seed".into(),
            })
            .await
            .with_context(|| format!("topping up {user}"))?
            .into_inner();
        let entry = reply.transaction.context("wallet answered without a transaction")?;
        let balance = entry.balance_after.map(|m| m.amount_minor).unwrap_or_default();
        eprintln!("seeded {user}: ledger entry {} (balance after it: {balance} USD cents)", entry.id);
    }
    Ok(())
}
