//! The inventory service: items, stock and orders in PostgreSQL, the judge of
//! every purchase. It consumes `OrderPlaced` from RabbitMQ, records each order
//! under database-enforced stock and per-user limits, debits the wallet, and
//! publishes every final state through a transactional outbox. Internal gRPC
//! API: `flashsale.inventory.v1.InventoryService`.

pub mod config;
mod convert;
pub mod db;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod judgement;
pub mod metrics;
pub mod order_consumer;
pub mod outbox_relay;
pub mod settlement;
pub mod startup;
pub mod wallet_client;

pub use config::Config;
pub use startup::Application;
