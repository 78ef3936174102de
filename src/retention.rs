//! Retention: forgets deliveries older than `storage.retention`, after which their ids
//! count as new again.
//!
//! The sweep walks the received_at index from its oldest end and stops at the first entry
//! that has not expired, so each pass costs what expires, not what is stored. Dead-lettered
//! deliveries follow the same rule. A delivery with a handler still due or running is kept
//! until that handler is final (design.md, invariant 2): the pass moves past it and a later
//! pass comes back to it. Config refuses a retention shorter than the longest retry
//! schedule, so in practice only a backlog or a stuck handler keeps one.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::store::DeliveryStore;

/// Deliveries removed per store call, so one pass never holds the store for long.
const BATCH: usize = 1000;

/// How often to sweep: a twentieth of the retention, between 100 ms and one minute.
pub fn sweep_interval(retention: Duration) -> Duration {
    (retention / 20).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Removes everything received before `now - retention`; returns how many.
pub async fn sweep_once(
    store: &dyn DeliveryStore,
    retention: Duration,
    clock: &Clock,
) -> Result<usize, crate::store::StoreError> {
    let now = clock.now_ms();
    let cutoff = now.saturating_sub(retention.as_millis() as u64);
    let mut removed = 0;
    loop {
        let pass = store.expire(now, cutoff, BATCH).await?;
        removed += pass.removed;
        if pass.examined < BATCH {
            return Ok(removed);
        }
    }
}

/// Forgets body fingerprints of deliveries received before `now - fingerprint_retention`.
pub async fn sweep_fingerprints(
    store: &dyn DeliveryStore,
    fingerprint_retention: Duration,
    clock: &Clock,
) -> Result<(), crate::store::StoreError> {
    let cutoff = clock
        .now_ms()
        .saturating_sub(fingerprint_retention.as_millis() as u64);
    while store.expire_fingerprints(cutoff, BATCH).await? == BATCH {}
    Ok(())
}

/// Sweeps every [`sweep_interval`] until `stop` fires.
pub async fn run(
    store: Arc<dyn DeliveryStore>,
    retention: Duration,
    fingerprint_retention: Duration,
    clock: Clock,
    stop: CancellationToken,
) {
    let interval = sweep_interval(retention);
    loop {
        if let Err(e) = sweep_fingerprints(&*store, fingerprint_retention, &clock).await {
            tracing::error!(error = %e, "fingerprint sweep failed");
        }
        match sweep_once(&*store, retention, &clock).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired deliveries removed"),
            Err(e) => tracing::error!(error = %e, "retention sweep failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
