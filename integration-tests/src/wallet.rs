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
    /// Debits and captures: every charge.
    pub debits: i128,
    pub balances: i128,
    /// What open holds keep of the balances.
    pub held: i128,
}

/// Reads the wallet's tables directly and checks what no API call can show:
/// replaying each account's ledger in order reproduces every recorded
/// `balance_after` and `held_after`, never goes below zero nor holds more
/// than the balance, and ends at the account's balance and held amount; and
/// each account's held amount is the sum of its open holds. Returns the
/// per-currency totals so callers can check conservation.
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
        #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
        held_after_minor: Option<i64>,
    }
    #[derive(diesel::QueryableByName)]
    struct Account {
        #[diesel(sql_type = Text)]
        user_id: String,
        #[diesel(sql_type = Text)]
        currency: String,
        #[diesel(sql_type = BigInt)]
        balance_minor: i64,
        #[diesel(sql_type = BigInt)]
        held_minor: i64,
        #[diesel(sql_type = BigInt)]
        open_holds_minor: i64,
    }

    let mut conn = AsyncPgConnection::establish(database_url).await?;
    let entries: Vec<Entry> = diesel::sql_query(
        "SELECT user_id, currency, kind, amount_minor, balance_after_minor, held_after_minor FROM ledger_entries ORDER BY id",
    )
    .load(&mut conn)
    .await?;
    let accounts: Vec<Account> = diesel::sql_query(
        // Open holds summed once, then joined (a sum per account, correlated,
        // scanned the holds table once per account: seconds of PostgreSQL on a
        // benchmark's wallet, inside the figures it measures).
        "SELECT a.user_id, a.currency, a.balance_minor, a.held_minor,
                COALESCE(o.open_minor, 0)::bigint AS open_holds_minor
           FROM accounts a
           LEFT JOIN (SELECT user_id, currency, sum(amount_minor) AS open_minor
                        FROM holds WHERE state = 'open' GROUP BY user_id, currency) o
             ON o.user_id = a.user_id AND o.currency = a.currency",
    )
    .load(&mut conn)
    .await?;

    let mut totals: BTreeMap<String, CurrencyTotals> = BTreeMap::new();
    let mut running: BTreeMap<(String, String), i128> = BTreeMap::new();
    let mut holding: BTreeMap<(String, String), i128> = BTreeMap::new();
    for entry in entries {
        let amount = i128::from(entry.amount_minor);
        anyhow::ensure!(amount > 0, "ledger entry with non-positive amount {amount}");
        let total = totals.entry(entry.currency.clone()).or_default();
        let account = (entry.user_id.clone(), entry.currency.clone());
        let balance = running.entry(account.clone()).or_default();
        let held = holding.entry(account).or_default();
        match entry.kind.as_str() {
            "hold" => *held += amount,
            "capture" => {
                total.debits += amount;
                *balance -= amount;
                *held -= amount;
            }
            "release" => *held -= amount,
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
            (0..=*balance).contains(held),
            "{}/{} held {held} of a balance of {balance}",
            entry.user_id,
            entry.currency
        );
        if let Some(held_after) = entry.held_after_minor {
            anyhow::ensure!(
                *held == i128::from(held_after),
                "{}/{}: replayed held amount {held} != recorded held_after {held_after}",
                entry.user_id,
                entry.currency
            );
        }
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
        let held = holding.remove(&(account.user_id.clone(), account.currency.clone())).unwrap_or(0);
        anyhow::ensure!(
            held == i128::from(account.held_minor) && account.held_minor == account.open_holds_minor,
            "{}/{}: holds {} but its ledger sums to {held} and its open holds to {}",
            account.user_id,
            account.currency,
            account.held_minor,
            account.open_holds_minor
        );
        let total = totals.entry(account.currency).or_default();
        total.balances += i128::from(account.balance_minor);
        total.held += i128::from(account.held_minor);
    }
    anyhow::ensure!(running.is_empty(), "ledger entries without an account: {:?}", running.keys());
    Ok(totals)
}
