//! `webhook-inbox store copy`: moves what a sled store holds into PostgreSQL — every
//! delivery with its body and answer, every handler's state and queue entry, and the
//! fingerprints kept for body dedup — so that moving to several replicas does not make
//! old redeliveries run again.
//!
//! The copy reads the stopped server's sled directory page by page and writes each page in
//! one transaction. A key already in the target is left as it is, so a copy that was cut
//! short can simply be run again.

use super::sled::ExportPosition;
use super::{PgStore, SledStore, StoreError};

/// Items per read page and per transaction.
const PAGE: usize = 500;

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

/// Copies everything in `from` into `to`.
pub async fn sled_to_postgres(from: &SledStore, to: &PgStore) -> Result<CopyReport, StoreError> {
    let mut report = CopyReport::default();
    let mut position = Some(ExportPosition::default());
    while let Some(at) = position {
        let (items, next) = from.export_page(&at, PAGE)?;
        for item in &items {
            match item {
                super::StoredItem::Delivery { .. } => report.deliveries += 1,
                super::StoredItem::Fingerprint { .. } => report.fingerprints += 1,
            }
        }
        report.written += to.import(&items).await?;
        position = next;
    }
    Ok(report)
}
