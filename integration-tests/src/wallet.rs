//! A wallet service running in-process on port 0, on a database of its own.

use std::collections::BTreeMap;
use std::time::Duration;

use flashsale_proto::wallet::v1::wallet_service_client::WalletServiceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::TestDatabase;

/// A running wallet, its client channel and its database.
pub struct TestWallet {
    pub addr: String,
    pub channel: Channel,
    pub db: TestDatabase,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestWallet {
    /// Creates a database, migrates it, starts the wallet on a free port and connects.
    pub async fn spawn() -> anyhow::Result<Self> {
        let db = TestDatabase::create("wallet").await?;
        let config = flashsale_wallet::Config::for_tests(db.url());
        let app = flashsale_wallet::Application::build(&config).await?;
        let addr = format!("http://127.0.0.1:{}", app.port());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        // The listener is bound already, so the first connect succeeds.
        let channel = Channel::from_shared(addr.clone())?.connect_timeout(Duration::from_secs(5)).connect().await?;
        Ok(Self { addr, channel, db, stop: Some(stop), task })
    }

    pub fn client(&self) -> WalletServiceClient<Channel> {
        WalletServiceClient::new(self.channel.clone())
    }

    /// Asks the wallet to shut down gracefully and waits until it has.
    pub async fn stop(mut self) -> anyhow::Result<TestDatabase> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await??;
        Ok(self.db)
    }

    /// Stops the wallet and drops its database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop().await?.drop_now().await
    }
}

/// Money totals of one currency, read straight from the wallet's tables.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CurrencyTotals {
    pub credits: i128,
    pub debits: i128,
    pub balances: i128,
}

/// Reads the wallet's tables directly and checks what no API call can show:
/// replaying each account's ledger in order reproduces every recorded
/// `balance_after`, never goes below zero, and ends at the account's balance.
/// Returns the per-currency totals so callers can check conservation.
pub async fn audit_ledger(database_url: &str) -> anyhow::Result<BTreeMap<String, CurrencyTotals>> {
    use diesel::sql_types::{BigInt, Text};
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

    #[derive(diesel::QueryableByName)]
    struct Entry {
        #[diesel(sql_type = Text)]
        user_id: String,
        #[diesel(sql_type = Text)]
        currency: String,
        #[diesel(sql_type = Text)]
        kind: String,
        #[diesel(sql_type = BigInt)]
        amount_minor: i64,
        #[diesel(sql_type = BigInt)]
        balance_after_minor: i64,
    }
    #[derive(diesel::QueryableByName)]
    struct Account {
        #[diesel(sql_type = Text)]
        user_id: String,
        #[diesel(sql_type = Text)]
        currency: String,
        #[diesel(sql_type = BigInt)]
        balance_minor: i64,
    }

    let mut conn = AsyncPgConnection::establish(database_url).await?;
    let entries: Vec<Entry> = diesel::sql_query(
        "SELECT user_id, currency, kind, amount_minor, balance_after_minor FROM ledger_entries ORDER BY id",
    )
    .load(&mut conn)
    .await?;
    let accounts: Vec<Account> =
        diesel::sql_query("SELECT user_id, currency, balance_minor FROM accounts").load(&mut conn).await?;

    let mut totals: BTreeMap<String, CurrencyTotals> = BTreeMap::new();
    let mut running: BTreeMap<(String, String), i128> = BTreeMap::new();
    for entry in entries {
        let amount = i128::from(entry.amount_minor);
        anyhow::ensure!(amount > 0, "ledger entry with non-positive amount {amount}");
        let total = totals.entry(entry.currency.clone()).or_default();
        let balance = running.entry((entry.user_id.clone(), entry.currency.clone())).or_default();
        match entry.kind.as_str() {
            "credit" => {
                total.credits += amount;
                *balance += amount;
            }
            "debit" => {
                total.debits += amount;
                *balance -= amount;
            }
            other => anyhow::bail!("unknown ledger kind {other:?}"),
        }
        anyhow::ensure!(*balance >= 0, "{}/{} went negative: {balance}", entry.user_id, entry.currency);
        anyhow::ensure!(
            *balance == i128::from(entry.balance_after_minor),
            "{}/{}: replayed balance {balance} != recorded balance_after {}",
            entry.user_id,
            entry.currency,
            entry.balance_after_minor
        );
    }
    for account in accounts {
        let replayed = running.remove(&(account.user_id.clone(), account.currency.clone())).unwrap_or(0);
        anyhow::ensure!(
            replayed == i128::from(account.balance_minor),
            "{}/{}: balance {} but its ledger sums to {replayed}",
            account.user_id,
            account.currency,
            account.balance_minor
        );
        totals.entry(account.currency).or_default().balances += i128::from(account.balance_minor);
    }
    anyhow::ensure!(running.is_empty(), "ledger entries without an account: {:?}", running.keys());
    Ok(totals)
}
