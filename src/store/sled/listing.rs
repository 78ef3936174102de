//! Admin listings: newest first over the received_at index (a bounded scan per page), and
//! dead letters from the dead-letter tree.

use std::collections::HashSet;

use super::super::{
    Cursor, DeliveryKey, DeliveryStatus, DeliverySummary, JobKey, Page, StoreError,
};
use super::SledInner;
use super::encoding::{backend, queue_key};

/// received_at index entries one admin listing reads at most (it then returns what it
/// found, with a cursor to go on from).
pub(super) const LIST_SCAN_LIMIT: usize = 10_000;

/// The cursor of a page that goes on at `index_key` (included): the key plus a zero byte,
/// since the next page reads the range `..cursor`.
pub(super) fn cursor_before(index_key: &[u8]) -> Cursor {
    let mut first_not_returned = index_key.to_vec();
    first_not_returned.push(0);
    Cursor::from_position(first_not_returned)
}

impl SledInner {
    /// A delivery and its status, for listings.
    pub(super) fn summary(&self, key: &DeliveryKey) -> Result<Option<DeliverySummary>, StoreError> {
        let Some(record) = self.read_record(&key.encode())? else {
            return Ok(None);
        };
        let jobs = record
            .handlers
            .iter()
            .map(|h| self.read_job(&key.job(h).encode()))
            .collect::<Result<Vec<_>, _>>()?;
        let status = DeliveryStatus::of(&record, &jobs);
        Ok(Some(DeliverySummary { record, status }))
    }

    /// `status=dead` from the dead-letter tree: reads the dead letters (few, by nature)
    /// and their deliveries, never the whole received_at index.
    pub(super) fn list_dead(
        &self,
        source: Option<&str>,
        limit: usize,
        end: &[u8],
    ) -> Result<Page, StoreError> {
        let mut keys = HashSet::new();
        for job in self.dead.iter().keys() {
            let job = job.map_err(backend)?;
            if let Some(job) = JobKey::decode(&job)
                && source.is_none_or(|s| s == job.delivery.source)
            {
                keys.insert(job.delivery);
            }
        }
        let mut found = Vec::new();
        for key in keys {
            if let Some(summary) = self.summary(&key)?
                && summary.status == DeliveryStatus::Dead
            {
                let index_key = queue_key(summary.record.received_at_ms, &key.encode());
                if index_key.as_slice() < end {
                    found.push((index_key, summary));
                }
            }
        }
        found.sort_by(|a, b| b.0.cmp(&a.0));
        let next = found.get(limit).map(|(k, _)| cursor_before(k));
        Ok(Page {
            deliveries: found.into_iter().take(limit).map(|(_, s)| s).collect(),
            next,
        })
    }
}
