//! `seed`: a sale like the original fixtures (5,000 buyers with balances, one
//! item with 1–500 units, limit 1), created through the admin API.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use flashsale_proto::common::v1::Money;
use flashsale_proto::gateway::v1::admin_service_client::AdminServiceClient;
use flashsale_proto::gateway::v1::{CreateItemRequest, TopUpRequest};
use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::suite::with_token;

/// What `run` and `audit` need to know about a seeded sale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sale {
    pub item_id: String,
    pub user_prefix: String,
    pub users: u32,
    pub stock: u32,
    pub per_user_limit: u32,
    pub price_minor: i64,
}

impl Sale {
    pub fn user(&self, n: u32) -> String {
        format!("{}{n}", self.user_prefix)
    }
}

#[derive(Debug, Clone)]
pub struct SeedOptions {
    pub gateway_url: String,
    pub jwt_secret: String,
    pub users: u32,
    /// None: a random stock of 1..=500, as the original fixtures.
    pub stock: Option<u32>,
    pub per_user_limit: u32,
    pub price_minor: i64,
    /// Skip the top-ups (admission-only measurements need no money).
    pub unfunded: bool,
    /// One balance for every buyer (None: random, about four in five can pay).
    pub balance_minor: Option<i64>,
}

pub async fn seed(options: &SeedOptions) -> anyhow::Result<Sale> {
    let mut rng = rand::rng();
    let stock = options.stock.unwrap_or_else(|| rng.random_range(1..=500));
    let run = uuid::Uuid::now_v7().simple().to_string();
    let sale = Sale {
        item_id: format!("load-{}", &run[..12]),
        user_prefix: format!("load-{}-user-", &run[..12]),
        users: options.users,
        stock,
        per_user_limit: options.per_user_limit,
        price_minor: options.price_minor,
    };
    let token = flashsale_gateway::auth::mint(&options.jwt_secret, "load-operator", true, Duration::from_secs(3600))?;
    let channel = tonic::transport::Channel::from_shared(options.gateway_url.clone())?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", options.gateway_url))?;
    let admin = AdminServiceClient::new(channel);
    let now = SystemTime::now();
    admin
        .clone()
        .create_item(with_token(
            CreateItemRequest {
                id: sale.item_id.clone(),
                name: "load-test drop".into(),
                price: Some(Money { currency: "USD".into(), amount_minor: sale.price_minor }),
                stock_total: stock,
                per_user_limit: sale.per_user_limit,
                starts_at: Some(now.into()),
                ends_at: Some((now + Duration::from_secs(24 * 3600)).into()),
                admission_buckets: 0,
            },
            &token,
        ))
        .await
        .context("creating the sale")?;
    // Balances between half the price and three times it: about four in five can pay.
    let balances: Vec<i64> = (0..sale.users)
        .map(|_| options.balance_minor.unwrap_or_else(|| rng.random_range(sale.price_minor / 2..=sale.price_minor * 3)))
        .collect();
    let balances = if options.unfunded { Vec::new() } else { balances };
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(balances.into_iter().enumerate())
        .map(|(n, balance)| {
            let mut admin = admin.clone();
            let user = sale.user(u32::try_from(n).unwrap_or(u32::MAX));
            let token = token.clone();
            async move {
                let request = TopUpRequest {
                    user_id: user.clone(),
                    amount: Some(Money { currency: "USD".into(), amount_minor: balance }),
                    idempotency_key: format!("seed:{user}"),
                };
                // As the API asks: UNAVAILABLE is retried under the same key (seen when
                // a call raced the wallet closing an old connection, max_connection_age).
                let mut retries: u64 = 0;
                loop {
                    match admin.top_up(with_token(request.clone(), &token)).await {
                        Ok(_) => return Ok(()),
                        Err(status) if status.code() == tonic::Code::Unavailable && retries < 5 => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(100 * retries)).await;
                        }
                        Err(status) => return Err(status).with_context(|| format!("topping up {user}")),
                    }
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(sale)
}
