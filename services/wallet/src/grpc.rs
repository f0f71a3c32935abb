//! The `flashsale.wallet.v1.WalletService` handlers: decode, call the ledger, encode.

use flashsale_db::PgPool;
use flashsale_proto::common::v1::Money;
use flashsale_proto::wallet::v1::debit_result::Outcome;
use flashsale_proto::wallet::v1::wallet_service_server::WalletService;
use flashsale_proto::wallet::v1::{
    BatchDebitRequest, BatchDebitResponse, CaptureRequest, CaptureResponse, CreditRequest, CreditResponse,
    DebitRequest, DebitResponse, DebitResult, GetBalanceRequest, GetBalanceResponse, HoldRequest, HoldResponse,
    ListTransactionsRequest, ListTransactionsResponse, VoidRequest, VoidResponse,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::db::models::LedgerEntry;
use crate::db::{holds, ledger};
use crate::domain::{Currency, HoldSpec, HoldTarget, Movement, UserId};
use crate::error::WalletError;

/// Most debits in one `BatchDebit` call.
const MAX_BATCH: usize = 500;

/// Who may call each wallet method when mutual TLS is on (a certificate's
/// service name): the gateway reads balances and tops wallets up, holds a
/// buyer's funds when it admits an order and voids the hold when it undoes
/// the admission; only inventory charges buyers (debits, captures), credits
/// them back on refunds, and voids a hold whose order the database rejected.
pub const CALLERS: flashsale_server::Callers = flashsale_server::Callers {
    service: "flashsale.wallet.v1.WalletService",
    methods: &[
        ("GetBalance", &["gateway"]),
        ("ListTransactions", &["gateway"]),
        ("Credit", &["gateway", "inventory"]),
        ("Debit", &["inventory"]),
        ("BatchDebit", &["inventory"]),
        ("Hold", &["gateway"]),
        ("Capture", &["inventory"]),
        ("Void", &["gateway", "inventory"]),
    ],
};

/// The wallet's gRPC face.
#[derive(Clone)]
pub struct WalletGrpc {
    pool: PgPool,
    /// The share of `pool` that holds, voids and reads take (the calls buyers
    /// drive), so that settlement's debits and captures always find a connection.
    crowd: flashsale_db::Lane,
}

impl WalletGrpc {
    pub fn new(pool: PgPool, crowd: flashsale_db::Lane) -> Self {
        Self { pool, crowd }
    }

    /// Runs one money movement in a task of its own: if the client goes away
    /// mid-call, the transaction still commits or rolls back instead of being
    /// dropped half-way with its connection left inside an open transaction.
    async fn apply(&self, movement: Movement) -> Result<LedgerEntry, WalletError> {
        let pool = self.pool.clone();
        // A child of the call's server span; `result` as counted in the metrics.
        let span = flashsale_telemetry::info_span!(
            "wallet.apply",
            db.system.name = "postgresql",
            wallet.movement = movement.kind.as_db(),
            user.id = movement.user.as_str(),
            result = tracing::field::Empty,
        );
        tokio::spawn(
            async move {
                let mut conn = pool.get().await?;
                ledger::apply(&mut conn, &movement).await
            }
            .instrument(span),
        )
        .await
        .map_err(|join| WalletError::Internal(Box::new(join)))?
    }

    /// Runs one hold step (`work`, with a connection of the pool) in a task
    /// of its own, for the same reason as [`Self::apply`].
    async fn in_task<T: Send + 'static>(
        &self,
        step: &'static str,
        work: impl Future<Output = Result<T, WalletError>> + Send + 'static,
    ) -> Result<T, WalletError> {
        let span = flashsale_telemetry::info_span!("wallet.hold", db.system.name = "postgresql", wallet.step = step);
        tokio::spawn(work.instrument(span)).await.map_err(|join| WalletError::Internal(Box::new(join)))?
    }

    /// [`Self::apply`] for many debits: one transaction, one answer per debit.
    async fn apply_batch(
        &self,
        movements: Vec<Movement>,
    ) -> Result<Vec<Result<LedgerEntry, WalletError>>, WalletError> {
        let pool = self.pool.clone();
        let span = flashsale_telemetry::info_span!(
            "wallet.apply",
            db.system.name = "postgresql",
            wallet.movement = "debit",
            db.operation.batch.size = movements.len(),
        );
        tokio::spawn(
            async move {
                let mut conn = pool.get().await?;
                ledger::apply_batch(&mut conn, &movements).await
            }
            .instrument(span),
        )
        .await
        .map_err(|join| WalletError::Internal(Box::new(join)))?
    }
}

#[tonic::async_trait]
impl WalletService for WalletGrpc {
    async fn get_balance(&self, request: Request<GetBalanceRequest>) -> Result<Response<GetBalanceResponse>, Status> {
        let GetBalanceRequest { user_id, currency } = request.into_inner();
        let user = UserId::parse(&user_id).map_err(WalletError::from)?;
        let currency = Currency::parse_optional(&currency).map_err(WalletError::from)?;
        let mut conn = self.crowd.get().await.map_err(WalletError::from)?;
        let balances = ledger::balances(&mut conn, &user, currency).await?;
        let held =
            balances.iter().map(|b| Money { currency: b.currency.clone(), amount_minor: b.held_minor }).collect();
        Ok(Response::new(GetBalanceResponse { balances: balances.into_iter().map(Into::into).collect(), held }))
    }

    async fn list_transactions(
        &self,
        request: Request<ListTransactionsRequest>,
    ) -> Result<Response<ListTransactionsResponse>, Status> {
        let ListTransactionsRequest { user_id, currency, page_size, page_token } = request.into_inner();
        let user = UserId::parse(&user_id).map_err(WalletError::from)?;
        let currency = Currency::parse_optional(&currency).map_err(WalletError::from)?;
        let page = crate::domain::page(page_size, &page_token)?;
        let mut conn = self.crowd.get().await.map_err(WalletError::from)?;
        let (entries, next) = ledger::transactions(&mut conn, &user, currency, page).await?;
        Ok(Response::new(ListTransactionsResponse {
            transactions: entries.into_iter().map(Into::into).collect(),
            next_page_token: next.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn credit(&self, request: Request<CreditRequest>) -> Result<Response<CreditResponse>, Status> {
        let movement = Movement::try_from(request.into_inner())?;
        let entry = self.apply(movement).await?;
        Ok(Response::new(CreditResponse { transaction: Some(entry.into()) }))
    }

    async fn debit(&self, request: Request<DebitRequest>) -> Result<Response<DebitResponse>, Status> {
        let movement = Movement::try_from(request.into_inner())?;
        let entry = self.apply(movement).await?;
        // Fault tests: the debit is committed, the caller not answered.
        flashsale_server::crash_point("wallet-before-reply");
        Ok(Response::new(DebitResponse { transaction: Some(entry.into()) }))
    }

    async fn batch_debit(&self, request: Request<BatchDebitRequest>) -> Result<Response<BatchDebitResponse>, Status> {
        let BatchDebitRequest { debits } = request.into_inner();
        if debits.is_empty() || debits.len() > MAX_BATCH {
            return Err(WalletError::invalid("debits", "must hold 1..=500 debits").into());
        }
        // Malformed debits are answered alone; the others go to the ledger together.
        let mut results: Vec<Option<Outcome>> = Vec::with_capacity(debits.len());
        let mut movements = Vec::with_capacity(debits.len());
        for debit in debits {
            match Movement::try_from(debit) {
                Ok(movement) => {
                    results.push(None);
                    movements.push(movement);
                }
                Err(_) => results.push(Some(Outcome::Refused("INVALID_ARGUMENT".into()))),
            }
        }
        let mut applied =
            if movements.is_empty() { Vec::new() } else { self.apply_batch(movements).await? }.into_iter();
        // Fault tests: the debits are committed, the caller not answered.
        flashsale_server::crash_point("wallet-before-reply");
        let mut out = Vec::with_capacity(results.len());
        for result in results {
            let outcome = match result {
                Some(refused) => refused,
                None => match applied.next() {
                    Some(Ok(entry)) => Outcome::Transaction(entry.into()),
                    Some(Err(WalletError::InsufficientFunds)) => Outcome::Refused("INSUFFICIENT_FUNDS".into()),
                    Some(Err(WalletError::IdempotencyKeyReused)) => Outcome::Refused("IDEMPOTENCY_KEY_REUSED".into()),
                    Some(Err(WalletError::InvalidArgument { .. } | WalletError::BalanceOverflow)) => {
                        Outcome::Refused("INVALID_ARGUMENT".into())
                    }
                    // The database failed under one of them: the caller retries them all.
                    Some(Err(error)) => return Err(error.into()),
                    None => return Err(WalletError::Internal("a batch result went missing".into()).into()),
                },
            };
            out.push(DebitResult { outcome: Some(outcome) });
        }
        Ok(Response::new(BatchDebitResponse { results: out }))
    }

    async fn hold(&self, request: Request<HoldRequest>) -> Result<Response<HoldResponse>, Status> {
        let spec = HoldSpec::try_from(request.into_inner())?;
        let row = {
            let crowd = self.crowd.clone();
            self.in_task("hold", async move {
                let mut conn = crowd.get().await?;
                holds::hold(&mut conn, &spec).await
            })
            .await?
        };
        // Fault tests: the hold is committed, the caller not answered.
        flashsale_server::crash_point("wallet-before-reply");
        Ok(Response::new(HoldResponse { hold: Some(row.into()) }))
    }

    async fn capture(&self, request: Request<CaptureRequest>) -> Result<Response<CaptureResponse>, Status> {
        let target = HoldTarget::try_from(request.into_inner())?;
        let entry = {
            let pool = self.pool.clone();
            self.in_task("capture", async move {
                let mut conn = pool.get().await?;
                holds::capture(&mut conn, &target).await
            })
            .await?
        };
        flashsale_server::crash_point("wallet-before-reply");
        Ok(Response::new(CaptureResponse { transaction: Some(entry.into()) }))
    }

    async fn void(&self, request: Request<VoidRequest>) -> Result<Response<VoidResponse>, Status> {
        let target = HoldTarget::try_from(request.into_inner())?;
        let row = {
            // Voids follow holds (an admission undone, an order rejected): in
            // the crowd's share as well, behind settlement.
            let crowd = self.crowd.clone();
            self.in_task("void", async move {
                let mut conn = crowd.get().await?;
                holds::void(&mut conn, &target).await
            })
            .await?
        };
        Ok(Response::new(VoidResponse { hold: Some(row.into()) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_names_its_callers() {
        assert_eq!(CALLERS.unlisted("flashsale/wallet/v1/wallet.proto").unwrap(), Vec::<String>::new());
    }
}
