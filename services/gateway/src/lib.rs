//! The public gateway: authenticates buyers (bearer JWTs), turns away the crowd
//! from memory once an item is sold out, admits each remaining attempt with one
//! atomic Redis script, publishes winners to RabbitMQ with confirms, and tells
//! buyers the outcome (GetOrder, WatchOrder, server-sent events). gRPC API:
//! `flashsale.gateway.v1`; the same operations over REST/JSON, and a storefront page.

pub mod abuse;
pub mod admission;
pub mod api;
pub mod audit;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod error;
pub mod grpc;
pub mod order_events;
pub mod order_publisher;
pub mod purchase;
pub mod reconciler;
pub mod rest;
pub mod startup;
pub mod upstream;

pub use config::Config;
pub use startup::Application;

/// The proto files of the API this gateway serves (with what they import):
/// what its reflection describes and what its descriptor set for transcoders
/// holds. The internal services' files are not among them.
pub const PUBLIC_PROTO_FILES: &[&str] = &["flashsale/gateway/v1/gateway.proto"];
