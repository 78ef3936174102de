//! Writing items exported from another store (`store copy`, see [`crate::store::copy`]).
//!
//! Each delivery is written as its claim and its runs would have left it: the record and
//! body, the received-at index, every pair's state with its queue entry (or, in an
//! `order_by` line and not final, parked in its line with none), the dead-letter and body
//! indexes, and the call journal. The lines are handed on once everything is in
//! ([`SledInner::repair_lines`], from `finish_import`).

use super::encoding::{KEPT, backend, body_index_key, job_queue_key, queue_key, to_json};
use super::journal::journal_key;
use super::order::{line_entry, line_locks};
use super::{Op, SledInner};
use crate::store::{DeliveryRecord, JobState, JobStatus, StoreError, StoredItem};

impl SledInner {
    /// Writes `items`, skipping those whose key is already here; returns how many were
    /// written. Not waited for: `store copy` flushes once at the end.
    pub(super) fn import_items(&self, items: &[StoredItem]) -> Result<usize, StoreError> {
        let mut written = 0;
        for item in items {
            match item {
                StoredItem::Delivery {
                    record,
                    body,
                    jobs,
                    calls,
                } => {
                    let key = record.key().encode();
                    let fp_key = body_index_key(&record.source, &record.fingerprint);
                    let lines = line_locks(record);
                    let mut lock_keys: Vec<&[u8]> = vec![&key, &fp_key];
                    lock_keys.extend(lines.iter().map(Vec::as_slice));
                    let _locks = self.lock(Op::Claim, &lock_keys);
                    if self.deliveries.contains_key(&key).map_err(backend)? {
                        continue;
                    }
                    self.received
                        .insert(&queue_key(record.received_at_ms, &key))?;
                    for (handler, state) in jobs {
                        self.import_pair(record, handler, state.clone())?;
                    }
                    if record.body_dedup
                        && record.alias_of.is_none()
                        && !self.body_index.contains_key(&fp_key).map_err(backend)?
                    {
                        self.body_index
                            .insert(&fp_key, record.id.as_bytes())
                            .map_err(backend)?;
                    }
                    let value = self.new_delivery_value(record, body, None)?;
                    self.deliveries.insert(&key, value).map_err(backend)?;
                    for entry in calls {
                        let job = record.key().job(&entry.handler);
                        self.calls
                            .compare_and_swap(
                                journal_key(&job, &entry.step),
                                None::<&[u8]>,
                                Some(to_json(&entry.record)),
                            )
                            .map_err(backend)?
                            .ok();
                    }
                    written += 1;
                }
                StoredItem::Fingerprint {
                    source,
                    fingerprint,
                    kept,
                } => {
                    let fp_key = body_index_key(source, fingerprint);
                    let _locks = self.lock(Op::Claim, &[&fp_key]);
                    if self.body_index.contains_key(&fp_key).map_err(backend)? {
                        continue;
                    }
                    self.fp_expiry
                        .insert(queue_key(kept.received_at_ms, &fp_key), &[])
                        .map_err(backend)?;
                    let mut value = vec![KEPT];
                    value.extend_from_slice(&to_json(kept));
                    self.body_index.insert(&fp_key, value).map_err(backend)?;
                    written += 1;
                }
            }
        }
        Ok(written)
    }

    /// One pair of an imported delivery (the caller holds the delivery's and its lines'
    /// locks). `state` is `None` for a pair that never ran: queued at its arrival if the
    /// delivery was acknowledged, as its claim would have queued it.
    fn import_pair(
        &self,
        record: &DeliveryRecord,
        handler: &str,
        state: Option<JobState>,
    ) -> Result<(), StoreError> {
        let job_key = record.key().job(handler).encode();
        let final_ = state.as_ref().is_some_and(JobState::is_final);
        let queued_on_arrival = record.response.is_some() && record.alias_of.is_none();
        let state = state.map(|mut s| {
            // A lease of the old store belongs to a process that has stopped.
            s.lease = None;
            s
        });
        if !final_ && let Some(entry) = line_entry(record, handler) {
            // Parked in its line: `finish_import` gives the line's first pair its way to run.
            if let Some(mut s) = state {
                s.queued_at_ms = None;
                self.write_job(&job_key, &s)?;
            }
            self.order.insert(entry, &[]).map_err(backend)?;
            return Ok(());
        }
        match state {
            Some(s) => {
                if let Some(due) = s.queued_at_ms {
                    self.queue
                        .insert(job_queue_key(due, &job_key), &[])
                        .map_err(backend)?;
                }
                if s.status == JobStatus::Dead {
                    self.dead.insert(job_key.as_slice(), &[]).map_err(backend)?;
                }
                self.write_job(&job_key, &s)
            }
            None if queued_on_arrival => self
                .queue
                .insert(job_queue_key(record.received_at_ms, &job_key), &[])
                .map(|_| ())
                .map_err(backend),
            None => Ok(()),
        }
    }
}
