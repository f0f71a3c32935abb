//! The inventory's PostgreSQL schema, row types and queries.

pub mod items;
pub mod models;
pub mod orders;
pub mod outbox;
pub mod schema;
pub mod snapshot;

/// The inventory's migrations (`migrations/inventory`), compiled into the binary.
pub const MIGRATIONS: diesel_migrations::EmbeddedMigrations =
    diesel_migrations::embed_migrations!("../../migrations/inventory");
