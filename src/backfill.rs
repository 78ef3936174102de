//! Backfill (design.md, "Backfill"): run a handler added today over the deliveries already
//! stored, exactly as if it had been configured when they arrived.
//!
//! HTTP-free, shared by `POST /admin/handlers/{name}/backfill`, the console's form and
//! (through the admin API) `webhook-inbox handlers backfill`. The stored deliveries of the
//! window are walked oldest first, [`BATCH`] at a time (memory stays flat whatever the
//! window holds). A delivery is a candidate when the handler would bind it today — its
//! source, event patterns and `match` ([`HandlerRegistry::matching`], the claim's own
//! routing) — and the request's own `source` and `events` narrow the walk further. The store
//! then binds each candidate that has no pair with the handler yet, atomically per delivery
//! ([`Operations::bind_handler`](crate::store::Operations::bind_handler)): a pair that exists is never reset, so a second backfill
//! binds nothing and counts them as `already`; a delivery retention removed in between is
//! simply not bound; a live delivery racing the backfill was bound by its claim or is bound
//! here, once. Each batch is durable before the next is read.

use std::sync::Arc;

use serde::Serialize;

use crate::domain::EventPattern;
use crate::handlers::HandlerRegistry;
use crate::store::{Binding, DeliveryStore, Received, StoreError};

/// Deliveries read and bound per batch.
pub const BATCH: usize = 256;

/// What to backfill.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    /// The handler (configured).
    pub handler: String,
    /// Deliveries received at or after this time (ms since the epoch); none: the oldest
    /// stored.
    pub since_ms: Option<u64>,
    /// Deliveries received before this time; none: now.
    pub until_ms: Option<u64>,
    /// Only this source's deliveries.
    pub source: Option<String>,
    /// Only event types this pattern matches.
    pub events: Option<EventPattern>,
    /// Count what would be bound, bind nothing.
    pub dry_run: bool,
}

/// What a backfill did (or, dry, would do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BackfillReport {
    /// Pairs made now (dry run: that would be made).
    pub bound: usize,
    /// Deliveries in the window the handler would bind that have a pair with it already.
    pub already: usize,
    /// Stored deliveries looked at (in the window).
    #[serde(skip)]
    pub scanned: usize,
}

/// Why a backfill could not run.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// No handler of that name is configured.
    #[error("no handler named `{0}` is configured")]
    UnknownHandler(String),
    /// The store failed; what was bound before stays bound (a rerun goes on from there).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs `request` over `store`, calling `progress` after each batch.
pub async fn backfill(
    store: &Arc<dyn DeliveryStore>,
    registry: &HandlerRegistry,
    request: &BackfillRequest,
    now_ms: u64,
    mut progress: impl FnMut(&BackfillReport),
) -> Result<BackfillReport, BackfillError> {
    let handler = request.handler.as_str();
    if !registry.contains(handler) {
        return Err(BackfillError::UnknownHandler(request.handler.clone()));
    }
    let since_ms = request.since_ms.unwrap_or(0);
    let until_ms = request.until_ms.unwrap_or(now_ms.saturating_add(1));
    let mut report = BackfillReport::default();
    let mut after: Option<Received> = None;
    loop {
        let batch = store
            .received_between(since_ms, until_ms, after.as_ref(), BATCH)
            .await?;
        let Some(last) = batch.last().cloned() else {
            break;
        };
        report.scanned += batch.len();
        let mut candidates = Vec::new();
        for received in &batch {
            let key = &received.key;
            if request.source.as_deref().is_some_and(|s| s != key.source) {
                continue;
            }
            let Some(record) = store.record(key).await? else {
                continue; // expired since the batch was read
            };
            // Aliases run nothing; a processed-mode delivery not yet answered is its
            // sender's to finish (the store would not bind it either).
            if record.alias_of.is_some()
                || record.response.is_none()
                || request
                    .events
                    .as_ref()
                    .is_some_and(|p| !p.matches(record.event_type.as_deref()))
            {
                continue;
            }
            let body = store.body(key).await?.unwrap_or_default();
            let routing = registry.matching(&record.source, record.event_type.as_deref(), &body);
            if !routing.handlers.iter().any(|h| h == handler) {
                continue;
            }
            if record.handlers.iter().any(|h| h == handler) {
                report.already += 1;
                continue;
            }
            candidates.push((key.clone(), routing.order_keys.get(handler).cloned()));
        }
        if request.dry_run {
            report.bound += candidates.len();
        } else if !candidates.is_empty() {
            for binding in store.bind_handler(handler, &candidates).await? {
                match binding {
                    Binding::Bound => report.bound += 1,
                    Binding::Already => report.already += 1,
                    Binding::Skipped => {}
                }
            }
        }
        progress(&report);
        if batch.len() < BATCH {
            break;
        }
        after = Some(last);
    }
    Ok(report)
}
