//! Integration tests: one binary, each test with its own database on a real
//! PostgreSQL (see harness.rs). Test names say which promise they prove.

mod bell;
mod capture;
mod cli;
mod closes;
mod faults;
mod harness;
mod install;
mod pending;
mod pooler;
mod recent;
mod refusals;
mod relay;
mod replay_bounds;
mod resume;
mod security;
mod streams;
mod tail;
mod tls;
