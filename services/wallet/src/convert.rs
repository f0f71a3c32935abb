//! Proto ⇄ domain conversions. Requests are destructured in full, so a field
//! added to the contract does not compile until it is handled here.

use flashsale_proto::common::v1::Money;
use flashsale_proto::wallet::v1::{
    CaptureRequest, CreditRequest, DebitRequest, FundsHold, HoldRequest, HoldState, Transaction, TransactionKind,
    VoidRequest,
};

use crate::db::models::{Balance, HoldRow, LedgerEntry};
use crate::domain::{
    Amount, Currency, HoldSpec, HoldTarget, IdempotencyKey, Kind, MAX_HOLD_TTL_SECONDS, Movement, Reference, UserId,
};
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

impl TryFrom<HoldRequest> for HoldSpec {
    type Error = WalletError;

    fn try_from(request: HoldRequest) -> Result<Self, Self::Error> {
        let HoldRequest { order_id, user_id, amount, ttl_seconds, reference } = request;
        if !(1..=MAX_HOLD_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(WalletError::invalid("ttl_seconds", "must be 1..=86400"));
        }
        Ok(Self {
            target: hold_target(&order_id, &user_id, amount)?,
            ttl_seconds,
            reference: Reference::parse(&reference)?,
        })
    }
}

impl TryFrom<CaptureRequest> for HoldTarget {
    type Error = WalletError;

    fn try_from(request: CaptureRequest) -> Result<Self, Self::Error> {
        let CaptureRequest { order_id, user_id, amount } = request;
        hold_target(&order_id, &user_id, amount)
    }
}

impl TryFrom<VoidRequest> for HoldTarget {
    type Error = WalletError;

    fn try_from(request: VoidRequest) -> Result<Self, Self::Error> {
        let VoidRequest { order_id, user_id, amount } = request;
        hold_target(&order_id, &user_id, amount)
    }
}

fn hold_target(order_id: &str, user_id: &str, amount: Option<Money>) -> Result<HoldTarget, WalletError> {
    let Money { currency, amount_minor } = amount.ok_or(WalletError::invalid("amount", "is required"))?;
    Ok(HoldTarget {
        order: IdempotencyKey::parse(order_id)
            .map_err(|_| WalletError::invalid("order_id", "must be 1..=128 visible ASCII characters"))?,
        user: UserId::parse(user_id)?,
        currency: Currency::parse(&currency)?,
        amount: Amount::parse(amount_minor)?,
    })
}

impl From<HoldRow> for FundsHold {
    fn from(row: HoldRow) -> Self {
        let HoldRow { order_id, user_id, currency, amount_minor, reference: _, state, expires_at } = row;
        let state = match state.as_str() {
            "open" => HoldState::Open,
            "captured" => HoldState::Captured,
            "voided" => HoldState::Voided,
            "expired" => HoldState::Expired,
            // The column's CHECK admits only the four above.
            _ => HoldState::Unspecified,
        };
        Self {
            order_id,
            user_id,
            amount: Some(Money { currency, amount_minor }),
            state: state.into(),
            expires_at: Some(prost_types::Timestamp {
                seconds: expires_at.timestamp(),
                nanos: i32::try_from(expires_at.timestamp_subsec_nanos()).unwrap_or(0),
            }),
        }
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
            held_after_minor,
        } = entry;
        let kind = match kind.as_str() {
            "credit" => TransactionKind::Credit,
            "debit" => TransactionKind::Debit,
            "hold" => TransactionKind::Hold,
            "capture" => TransactionKind::Capture,
            "release" => TransactionKind::Release,
            // The column's CHECK admits only the five above.
            _ => TransactionKind::Unspecified,
        };
        Self {
            id,
            idempotency_key,
            user_id,
            kind: kind.into(),
            amount: Some(Money { currency: currency.clone(), amount_minor }),
            balance_after: Some(Money { currency: currency.clone(), amount_minor: balance_after_minor }),
            held_after: held_after_minor.map(|amount_minor| Money { currency, amount_minor }),
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
        let Balance { currency, balance_minor, held_minor: _ } = balance;
        Self { currency, amount_minor: balance_minor }
    }
}
