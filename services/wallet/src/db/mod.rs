//! The wallet's PostgreSQL schema, row types and queries.

pub mod holds;
pub mod ledger;
pub mod models;
pub mod schema;

/// The wallet's migrations (`migrations/wallet`), compiled into the binary.
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("../../migrations/wallet");
