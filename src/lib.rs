//! webhook-inbox: an idempotent webhook receiver.
//!
//! A partner sends `POST /webhooks/{source}`; the delivery goes through one pipeline:
//!
//! ```text
//! bytes ─▶ verify (signature, tolerance, id, JSON) ─▶ claim (source, id) atomically in sled
//!       ─▶ new: record durably, answer 202, dispatch to handlers from the durable queue
//!       ─▶ seen, same body: replay the stored first answer byte for byte, run nothing
//!       ─▶ seen, other body: 422, change nothing
//! ```
//!
//! # Layout
//! - [`domain`]: the types every layer shares (headers, delivery id, fingerprint, event
//!   pattern); it imports nothing of the crate.
//! - [`config`]: the typed, strict `config.toml`.
//! - [`verify`]: one [`verify::SignatureScheme`] per provider; only
//!   [`verify::Source::authenticate`] makes a delivery that can be claimed.
//! - [`store`]: the store's roles ([`store::Claims`], [`store::JobQueue`],
//!   [`store::CallJournal`], [`store::Operations`], [`store::Maintenance`]; a
//!   [`store::DeliveryStore`] is all five), [`store::open()`], `store copy`, group commit;
//!   the sled and PostgreSQL backends, a file per role each.
//!   The rules of a pair's life (start, renewal, end of a run, retry, retention) are pure
//!   functions in `store::transitions`, which sled applies and PostgreSQL's statements
//!   are property-tested against.
//! - [`dispatch`]: the loop over the durable queue ([`dispatch::dispatcher`]), one run of a
//!   pair ([`dispatch::runner`]), each handler's `concurrency` and `rate` (one gate,
//!   [`dispatch::turns`]), the retry decision ([`dispatch::retry`]), fenced leases
//!   ([`dispatch::hold`]).
//! - [`retention`]: forgets deliveries older than `storage.retention`.
//! - [`handlers`]: the [`handlers::Handler`] trait, the registry, the built-ins.
//! - [`ingest`]: HTTP-free: authenticate → claim → ack policy → processed mode.
//! - [`operations`]: HTTP-free: the operator's actions, shared by the admin API and the
//!   console.
//! - [`routes`]: the HTTP endpoints, thin; [`error`]: the one error → HTTP table, and the
//!   outcome labels of a webhook request.
//! - [`startup`]: builds and runs the service (the same code for `serve` and tests).
//! - [`fixture`]: fixture files, signed like a sender would.
//! - [`metrics`]: Prometheus metrics; [`testing`]: the kit for handler authors.
//! - [`cli`], [`telemetry`], [`clock`]: the command line, logs, time; [`collections`]: the
//!   hash maps of the per-delivery paths.

pub mod admin_client;
pub mod alerts;
pub mod backfill;
pub mod calls;
pub mod cli;
pub mod clock;
pub mod collections;
pub mod config;
pub mod dispatch;
pub mod domain;
pub mod error;
pub mod export;
pub mod fixture;
pub mod handlers;
pub mod ingest;
pub mod metrics;
pub mod operations;
pub mod replay;
pub mod retention;
pub mod routes;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod verify;

/// Re-exported so a plugin can write `#[webhook_inbox::async_trait]` on its `impl Handler`.
pub use async_trait::async_trait;
pub use handlers::{Delivery, Handler, HandlerContext, HandlerError, Registration};
pub use startup::{Application, ApplicationBuilder, shutdown_signal};
