//! HTTP routes: the public webhook endpoint and the admin listener (health, metrics,
//! admin API, web console). Thin: extract, call [`crate::ingest`] or
//! [`crate::operations`], map errors in [`crate::error`].

pub mod admin;
pub mod calls;
pub mod console;
pub mod health;
pub mod webhook;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::ingest::Ingest;
use crate::store::DeliveryStore;

/// What request handlers share, built by [`crate::startup::ApplicationBuilder::build`].
pub struct AppState {
    /// Authenticate, claim, ack policy.
    pub ingest: Ingest,
    /// The store (the admin API reads it).
    pub store: Arc<dyn DeliveryStore>,
    /// Time.
    pub clock: Clock,
    /// `server.max_body_bytes`.
    pub max_body_bytes: usize,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The admin bearer token, when one is configured. Never logged.
    pub admin_token: Option<String>,
    /// True while the dispatcher runs.
    pub dispatcher_running: Arc<std::sync::atomic::AtomicBool>,
    /// The configuration (the admin API's export needs the sources).
    pub config: Config,
    /// `server.body_timeout`.
    pub body_timeout: std::time::Duration,
    /// The budget of body bytes being read at once (`server.max_inflight_bytes`).
    pub inflight: Arc<webhook::InflightBytes>,
    /// Cancelled when shutdown starts: a body still being read is abandoned (503), so a
    /// stalled client never holds the shutdown up.
    pub stopping: CancellationToken,
    /// The downstream client (the loopback endpoint serves its live runs).
    pub calls: Arc<crate::calls::CallService>,
    /// Operational webhooks (told of refused requests).
    pub alerts: Arc<crate::alerts::Alerts>,
    /// The web console's sessions and sign-in throttle.
    pub console: console::ConsoleState,
    /// The operator's actions, for the admin API and the console.
    pub operator: crate::operations::Operator,
}
