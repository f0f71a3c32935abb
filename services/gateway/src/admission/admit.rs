//! One purchase attempt in Redis, and the loans a bucketed item's dry bucket
//! takes from the others (journaled in the lender, so the reconciler's
//! [`Admission::settle_loans`] closes any an attempt left open).

use redis::AsyncCommands;

use super::protocol::{LoanEntry, Part, PriorOrder, Slot};
use super::{Admission, Admit, Spread};
use crate::error::GatewayError;

/// One attempt's arguments to `admit.lua`.
struct AdmitArgs<'a> {
    user_id: &'a str,
    quantity: u32,
    limit: u32,
    idempotency_key: &'a str,
    order_id: &'a str,
}

/// A bucket's answer as the item's: one bucket's tokens left say nothing of
/// the others', so a bucketed item never reports none left (no sold-out mark
/// from one bucket; that comes from an attempt every bucket turned down).
fn bucketed(item: Spread<'_>, decided: Admit) -> Admit {
    match decided {
        Admit::Reserved { tokens_left } if item.buckets > 1 => Admit::Reserved { tokens_left: tokens_left.max(1) },
        other => other,
    }
}

/// What `lend.lua` said.
enum Lend {
    /// This many units (0: the lender is dry).
    Lent(u32),
    NotReady,
}

/// A loan taken for one attempt: the lending bucket, the loan id, the units.
struct Loan<'a> {
    lender: Slot<'a>,
    id: String,
    units: u32,
}

/// What one pass of [`Admission::settle_loans`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoansSettled {
    /// Loans whose units were credited to the borrower by the sweep.
    pub received: usize,
    /// Loans whose borrower had lost its state: the units went back to the lender.
    pub repaid: usize,
}

impl Admission {
    /// One purchase attempt: one round trip in the buyer's bucket. A bucketed
    /// item whose bucket has too few units for this buyer then borrows what is
    /// missing from the others, as many lenders as it takes (two more round
    /// trips per lender asked), and admits with the loans. `SoldOut` only when
    /// every bucket is dry; `NotEnoughStock` when all of them together hold
    /// fewer units than asked for; `NotReady` when a bucket asked has lost its
    /// state (rebuild, then ask again).
    pub async fn admit(
        &self,
        item: Spread<'_>,
        user_id: &str,
        quantity: u32,
        limit: u32,
        idempotency_key: &str,
        order_id: &str,
    ) -> Result<Admit, GatewayError> {
        let home = item.home(user_id);
        let attempt = AdmitArgs { user_id, quantity, limit, idempotency_key, order_id };
        let first = self.admit_in(home, &attempt, &[]).await?;
        let at_home = match first {
            _ if item.buckets == 1 => return Ok(first),
            Admit::SoldOut => 0,
            Admit::NotEnoughStock { units_left } => units_left,
            other => return Ok(bucketed(item, other)),
        };
        let mut loans = Vec::new();
        let mut missing = quantity.saturating_sub(at_home);
        for lender in item.lenders(home) {
            if missing == 0 {
                break;
            }
            let id = uuid::Uuid::now_v7().simple().to_string();
            // An error leaves the loans taken so far open: the reconciler's sweep settles them.
            match self.lend(lender, &id, missing, home.bucket).await? {
                Lend::Lent(0) => continue,
                Lend::Lent(units) => {
                    // Fault tests: units taken from the lender, not yet in the borrower.
                    flashsale_server::crash_point("gateway-after-loan");
                    missing = missing.saturating_sub(units);
                    loans.push(Loan { lender, id, units });
                }
                // Its units are unknown until it is rebuilt: it may have some.
                Lend::NotReady => {
                    self.close_loans(item, &loans, true).await;
                    return Ok(Admit::NotReady);
                }
            }
        }
        let borrowed: u32 = loans.iter().map(|loan| loan.units).sum();
        if missing > 0 {
            // Every bucket together holds fewer units than asked: nothing is
            // admitted, and the lenders take their units back.
            self.close_loans(item, &loans, true).await;
            let units_left = at_home + borrowed;
            return Ok(if units_left == 0 { Admit::SoldOut } else { Admit::NotEnoughStock { units_left } });
        }
        let credits: Vec<(&str, u32)> = loans.iter().map(|loan| (loan.id.as_str(), loan.units)).collect();
        let outcome = self.admit_in(home, &attempt, &credits).await;
        // An error leaves the loans open: whether they were credited is unknown,
        // and the reconciler's sweep settles them either way.
        if let Ok(decided) = &outcome {
            self.close_loans(item, &loans, *decided == Admit::NotReady).await;
        }
        outcome.map(|decided| bucketed(item, decided))
    }

    /// Closes the loans of one attempt; `repay` gives the units back to their lenders.
    async fn close_loans(&self, item: Spread<'_>, loans: &[Loan<'_>], repay: bool) {
        for loan in loans {
            if let Err(e) = self.close_loan(loan.lender, &loan.id, repay).await {
                tracing::warn!(error = %e, item.id = %item.item_id, "could not close a stock loan; the reconciler will");
            }
        }
    }

    async fn admit_in(
        &self,
        slot: Slot<'_>,
        attempt: &AdmitArgs<'_>,
        loans: &[(&str, u32)],
    ) -> Result<Admit, GatewayError> {
        let mut invocation = self.scripts.admit.on(&self.prefix, slot);
        invocation
            .arg(attempt.user_id)
            .arg(attempt.quantity)
            .arg(attempt.limit)
            .arg(attempt.idempotency_key)
            .arg(attempt.order_id)
            .arg(flashsale_domain::time::now_ms())
            .arg(loans.len());
        for (loan_id, units) in loans {
            invocation.arg(*loan_id).arg(*units);
        }
        let (outcome, detail): (String, String) = invocation.invoke_async(&mut self.hot.clone()).await?;
        let order_id = attempt.order_id;
        Ok(match outcome.as_str() {
            "RESERVED" => Admit::Reserved { tokens_left: detail.parse().unwrap_or(0) },
            "DUPLICATE" => {
                let prior = PriorOrder::decode(&detail).ok_or_else(|| {
                    GatewayError::Internal(format!("admission script's DUPLICATE detail {detail:?}").into())
                })?;
                if prior.order_id == order_id {
                    // This very attempt ran twice: a Redis Cluster client sends a
                    // command again after a dropped connection lost its reply. The
                    // first run reserved this order; how many units remain is not
                    // known (1: no sold-out mark from a guess).
                    Admit::Reserved { tokens_left: 1 }
                } else {
                    Admit::Duplicate { order_id: prior.order_id, quantity: prior.quantity }
                }
            }
            "IN_PROGRESS" => Admit::InProgress { order_id: detail },
            "LIMIT_REACHED" => Admit::LimitReached,
            "SOLD_OUT" => Admit::SoldOut,
            "NOT_ENOUGH_STOCK" => Admit::NotEnoughStock { units_left: detail.parse().unwrap_or(0) },
            "NOT_READY" => Admit::NotReady,
            other => return Err(GatewayError::Internal(format!("admission script said {other:?}").into())),
        })
    }

    async fn lend(&self, lender: Slot<'_>, loan: &str, units: u32, borrower: u32) -> Result<Lend, GatewayError> {
        let (said, lent): (String, u32) = self
            .scripts
            .lend
            .on(&self.prefix, lender)
            .arg(loan)
            .arg(units)
            .arg(borrower)
            .arg(flashsale_domain::time::now_ms())
            .invoke_async(&mut self.hot.clone())
            .await?;
        match said.as_str() {
            "LENT" => Ok(Lend::Lent(lent)),
            "NOT_READY" => Ok(Lend::NotReady),
            other => Err(GatewayError::Internal(format!("lend script said {other:?}").into())),
        }
    }

    /// Closes a loan in the lender's journal; `repay` gives the units back to it.
    async fn close_loan(&self, lender: Slot<'_>, loan: &str, repay: bool) -> Result<i64, GatewayError> {
        let mut conn = self.background.get().await?;
        let given_back: i64 = self
            .scripts
            .close_loan
            .on(&self.prefix, lender)
            .arg(loan)
            .arg(u8::from(repay))
            .invoke_async(&mut conn)
            .await?;
        Ok(given_back)
    }

    /// Settles the loans of `item` older than `older_than_ms` (unix ms) that no
    /// attempt closed (its gateway died, or lost Redis, between lending and
    /// admitting): each borrower that still has its state is credited the units
    /// unless it had them already; a borrower that lost its state was rebuilt
    /// without them, so the lender takes them back. Either way the loan closes,
    /// and no unit stays stranded in a journal.
    pub async fn settle_loans(&self, item: Spread<'_>, older_than_ms: i64) -> Result<LoansSettled, GatewayError> {
        let mut settled = LoansSettled::default();
        if item.buckets == 1 {
            return Ok(settled);
        }
        for lender in item.slots() {
            let loans: Vec<(String, String)> = {
                let mut conn = self.background.get().await?;
                conn.hgetall(self.key(lender, Part::Lent)).await?
            };
            for (loan, value) in loans {
                let Some(entry) = LoanEntry::decode(&value) else { continue };
                if entry.at_ms >= older_than_ms || entry.borrower >= item.buckets {
                    continue;
                }
                let mut conn = self.background.get().await?;
                let said: String = self
                    .scripts
                    .receive
                    .on(&self.prefix, item.slot(entry.borrower))
                    .arg(&loan)
                    .arg(entry.units)
                    .invoke_async(&mut conn)
                    .await?;
                drop(conn);
                let repay = said == "NOT_READY";
                self.close_loan(lender, &loan, repay).await?;
                match said.as_str() {
                    "NOT_READY" => settled.repaid += 1,
                    "RECEIVED" => settled.received += 1,
                    _ => {}
                }
            }
        }
        Ok(settled)
    }
}
