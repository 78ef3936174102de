//! `webhook-inbox store copy`: moves what one store holds into another — sled into
//! PostgreSQL when one server becomes several replicas, PostgreSQL into sled when they go
//! back to one — every delivery with its body and answer, every handler's state and queue
//! entry, the call journal, and the fingerprints kept for body dedup, so that the move
//! does not make old redeliveries run again.
//!
//! The copy reads the source page by page ([`Maintenance::export_page`]) and writes each
//! page at once ([`Maintenance::import`]). A key already in the target is left as it is,
//! so a copy that was cut short can simply be run again. The `order_by` lines are handed on
//! once everything is in ([`Maintenance::finish_import`]): a line's deliveries come in key
//! order, not in the order they were received, so no line may start before all of it is
//! there.
//!
//! The source should not be written meanwhile: sled is opened by one process (the server
//! must be stopped); PostgreSQL's servers should be stopped too, or what they write while the
//! copy reads may be missed.

use super::{Maintenance, StoreError, StoredItem};

/// Items per read page and per write, as `store copy` runs.
pub const PAGE: usize = 500;

/// Where an export goes on: deliveries first (phase 0), then fingerprints kept past their
/// delivery (phase 1), each after the key last returned (the backend's own encoding of it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportPosition {
    pub(super) phase: u8,
    pub(super) after: Option<Vec<u8>>,
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Deliveries (and aliases) read from the source.
    pub deliveries: usize,
    /// Fingerprints kept past their delivery, read from the source.
    pub fingerprints: usize,
    /// Items written (the rest were already in the target).
    pub written: usize,
}

/// Copies everything in `from` into `to`, `page` items at a time, durably, and hands on
/// the `order_by` lines.
pub async fn copy(
    from: &dyn Maintenance,
    to: &dyn Maintenance,
    now_ms: u64,
    page: usize,
) -> Result<CopyReport, StoreError> {
    let mut report = CopyReport::default();
    let mut position = Some(ExportPosition::default());
    while let Some(at) = position {
        let (items, next) = from.export_page(&at, page.max(1)).await?;
        for item in &items {
            match item {
                StoredItem::Delivery { .. } => report.deliveries += 1,
                StoredItem::Fingerprint { .. } => report.fingerprints += 1,
            }
        }
        report.written += to.import(&items, now_ms).await?;
        position = next;
    }
    to.finish_import(now_ms).await?;
    to.flush().await?;
    Ok(report)
}
