//! The inventory service. Today it serves the operational surface every service
//! owes from day one (gRPC health, reflection, graceful shutdown); its API
//! (`flashsale.inventory.v1`, defined in `proto/`) arrives with the purchase-path issue.

pub mod config;
pub mod startup;

pub use config::Config;
pub use startup::Application;
