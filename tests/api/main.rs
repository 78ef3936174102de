//! Integration tests against the real application: port 0, a temporary data directory.
//! `TEST_LOG=1 cargo test` shows the service's logs.

mod helpers;

mod admin;
mod alerts;
mod architecture;
mod backfill;
mod calls;
mod checks;
mod claim;
mod command;
mod concurrency;
mod config;
mod console;
mod crash;
mod delivery_control;
mod deploy;
mod dispatch;
mod fixtures;
mod hardening;
mod http_handler;
mod interleavings;
mod invariants;
mod ordering;
mod processed;
mod replicas;
mod robustness;
mod schemes;
mod shutdown;
mod sinks;
mod soak;
mod store_check;
mod store_conformance;
mod traces;
