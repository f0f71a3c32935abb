//! Proto ⇄ domain conversions. Requests are destructured in full, so a field
//! added to the contract does not compile until it is handled here.

use flashsale_proto::common::v1::Money;
use flashsale_proto::wallet::v1::{CreditRequest, DebitRequest, Transaction, TransactionKind};

use crate::db::models::{Balance, LedgerEntry};
use crate::domain::{Amount, Currency, IdempotencyKey, Kind, Movement, Reference, UserId};
use crate::error::WalletError;

impl TryFrom<CreditRequest> for Movement {
    type Error = WalletError;

    fn try_from(request: CreditRequest) -> Result<Self, Self::Error> {
        let CreditRequest { idempotency_key, user_id, amount, reference } = request;
        movement(Kind::Credit, &idempotency_key, &user_id, amount, &reference)
    }
}

impl TryFrom<DebitRequest> for Movement {
    type Error = WalletError;

    fn try_from(request: DebitRequest) -> Result<Self, Self::Error> {
        let DebitRequest { idempotency_key, user_id, amount, reference } = request;
        movement(Kind::Debit, &idempotency_key, &user_id, amount, &reference)
    }
}

fn movement(
    kind: Kind,
    key: &str,
    user_id: &str,
    amount: Option<Money>,
    reference: &str,
) -> Result<Movement, WalletError> {
    let Money { currency, amount_minor } = amount.ok_or(WalletError::invalid("amount", "is required"))?;
    Ok(Movement {
        key: IdempotencyKey::parse(key)?,
        user: UserId::parse(user_id)?,
        currency: Currency::parse(&currency)?,
        amount: Amount::parse(amount_minor)?,
        kind,
        reference: Reference::parse(reference)?,
    })
}

impl From<LedgerEntry> for Transaction {
    fn from(entry: LedgerEntry) -> Self {
        let LedgerEntry {
            id,
            idempotency_key,
            user_id,
            currency,
            kind,
            amount_minor,
            balance_after_minor,
            reference,
            created_at,
        } = entry;
        let kind = match kind.as_str() {
            "credit" => TransactionKind::Credit,
            "debit" => TransactionKind::Debit,
            // The column's CHECK admits only the two above.
            _ => TransactionKind::Unspecified,
        };
        Self {
            id,
            idempotency_key,
            user_id,
            kind: kind.into(),
            amount: Some(Money { currency: currency.clone(), amount_minor }),
            balance_after: Some(Money { currency, amount_minor: balance_after_minor }),
            reference,
            created_at: Some(prost_types::Timestamp {
                seconds: created_at.timestamp(),
                nanos: i32::try_from(created_at.timestamp_subsec_nanos()).unwrap_or(0),
            }),
        }
    }
}

impl From<Balance> for Money {
    fn from(balance: Balance) -> Self {
        let Balance { currency, balance_minor } = balance;
        Self { currency, amount_minor: balance_minor }
    }
}
