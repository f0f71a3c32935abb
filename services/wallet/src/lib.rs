//! The wallet service: balances per (user, currency) and an append-only ledger
//! in PostgreSQL, behind the internal gRPC API `flashsale.wallet.v1.WalletService`.
//! Every money movement is idempotent by key and can never overdraw an account.

pub mod config;
mod convert;
pub mod db;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod startup;

pub use config::Config;
pub use startup::Application;
