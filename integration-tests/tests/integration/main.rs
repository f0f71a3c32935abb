//! Integration tests: one binary, real PostgreSQL, services started on port 0.
//! Each test owns its database, so the harness runs them in parallel.

mod lifecycle;
mod wallet;
