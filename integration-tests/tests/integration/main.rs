//! Integration tests: one binary, real PostgreSQL, Redis and RabbitMQ, services
//! started on port 0. Each test owns its databases, key prefix and queue names,
//! so the harness runs them in parallel.

mod abuse;
mod audit_log;
mod bola;
mod cluster;
mod common;
mod crashes;
mod crowd;
mod faults;
mod holds;
mod lifecycle;
mod mtls;
mod notifications;
mod observability;
mod partition;
mod purchase;
mod rebuild;
mod rest;
mod sale;
mod signin;
mod soak;
mod storm;
mod wallet;
mod web;
