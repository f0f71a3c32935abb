//! `flashsale-demo seed`: puts a demo sale into a running suite through the
//! gateway's admin API (never the tables), idempotently, so the run script can
//! call it on every start.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};
use flashsale_integration_tests::suite::with_token;
use flashsale_proto::common::v1::Money;
use flashsale_proto::gateway::v1::admin_service_client::AdminServiceClient;
use flashsale_proto::gateway::v1::{CreateItemRequest, TopUpRequest};
use tonic::Code;

/// Demo buyers and what each starts with, in USD cents.
const DEMO_BALANCES: [(&str, i64); 3] = [("alice", 10_000), ("bob", 2_500), ("carol", 500)];
const DEMO_ITEM: &str = "demo-drop";

#[derive(Debug, Parser)]
#[command(about = "Seeds demo data into a running flash-sale suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates the demo sale and tops up the demo buyers (once: reruns change nothing).
    Seed {
        #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:50051")]
        gateway_url: String,
        /// The gateway's signing secret, to mint an operator token.
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Seed { gateway_url, jwt_secret } => seed(gateway_url, &jwt_secret).await,
    }
}

async fn seed(gateway_url: String, secret: &str) -> anyhow::Result<()> {
    let token = flashsale_gateway::auth::mint(secret, "demo-operator", true, Duration::from_secs(300))?;
    let mut admin = AdminServiceClient::connect(gateway_url.clone())
        .await
        .with_context(|| format!("connecting to the gateway at {gateway_url}"))?;

    let now = SystemTime::now();
    let created = admin
        .create_item(with_token(
            CreateItemRequest {
                id: DEMO_ITEM.into(),
                name: "Limited sneakers (demo drop)".into(),
                price: Some(Money { currency: "USD".into(), amount_minor: 2_500 }),
                stock_total: 100,
                per_user_limit: 1,
                starts_at: Some(now.into()),
                ends_at: Some((now + Duration::from_secs(7 * 24 * 3600)).into()),
                admission_buckets: 0,
            },
            &token,
        ))
        .await;
    match created {
        Ok(_) => eprintln!("created sale {DEMO_ITEM}: 100 units at 25.00 USD, limit 1, open for a week"),
        Err(status) if status.code() == Code::AlreadyExists => eprintln!("sale {DEMO_ITEM} exists already"),
        Err(status) => return Err(status).context("creating the demo sale"),
    }
    for (user, cents) in DEMO_BALANCES {
        // A fixed key per user: the first run credits, later runs replay.
        let reply = admin
            .top_up(with_token(
                TopUpRequest {
                    user_id: user.into(),
                    amount: Some(Money { currency: "USD".into(), amount_minor: cents }),
                    idempotency_key: format!("demo-seed:{user}"),
                },
                &token,
            ))
            .await
            .with_context(|| format!("topping up {user}"))?
            .into_inner();
        let balance = reply.balance.map(|m| m.amount_minor).unwrap_or_default();
        eprintln!("topped up {user}: balance after the demo credit {balance} USD cents");
    }
    Ok(())
}
