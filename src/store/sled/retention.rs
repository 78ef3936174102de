//! Retention, health and flushing ([`crate::store::Maintenance`]).

use async_trait::async_trait;

use super::encoding::{
    BodyEntry, KEPT, backend, body_index_key, decode_delivery_key, job_queue_key, queue_key,
    split_time_key, to_json,
};
use super::order::line_entry;
use super::{Op, SledInner, SledStore, journal_prefix};
use crate::config::Durability;
use crate::store::{
    DeliveryKey, DeliveryRecord, Expired, ExportPosition, KeptFingerprint, Maintenance, StoreError,
    StoredItem,
};

#[async_trait]
impl Maintenance for SledStore {
    async fn expire(
        &self,
        now_ms: u64,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Expired, StoreError> {
        let now_ms = now_ms.max(cutoff_ms);
        let from = self
            .sweep_from
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        let candidates: Vec<Vec<u8>> = self
            .received
            .range(from..cutoff_ms.to_be_bytes().to_vec())
            .take(limit)
            .collect::<Result<_, _>>()?;
        let mut done = Expired {
            examined: candidates.len(),
            ..Expired::default()
        };
        let fsync = self.durability == Durability::Fsync;
        let guard = if fsync {
            // Removals, and fingerprints kept with answers already on disk: nothing a
            // redelivery must wait for, so no key holds its readers.
            Some(self.commit.begin_long_write()?)
        } else {
            None
        };
        // The index items of the deliveries removed (or gone): taken out of the index
        // together at the end of the pass, after their records (a pass cut short leaves
        // items that point at nothing, which the next one drops).
        let mut unindexed = Vec::new();
        for index_key in &candidates {
            self.step(Op::Expire, "start");
            let Some((t, key)) =
                split_time_key(index_key).and_then(|(t, k)| Some((t, decode_delivery_key(k)?)))
            else {
                unindexed.push(index_key.clone());
                continue;
            };
            let dk = key.encode();
            // The body's lock too, so a claim of the same body under another id sees
            // either the whole delivery or none of it.
            let fp_key = self
                .read_record(&dk)?
                .map(|r| body_index_key(&r.source, &r.fingerprint));
            let mut lock_keys: Vec<&[u8]> = vec![&dk];
            if let Some(fp) = &fp_key {
                lock_keys.push(fp);
            }
            let _locks = self.lock(Op::Expire, &lock_keys);
            self.step(Op::Expire, "locked");
            match self.read_record(&dk)? {
                Some(record)
                    if record.received_at_ms == t
                        && fp_key.as_deref()
                            == Some(&body_index_key(&record.source, &record.fingerprint)[..]) =>
                {
                    if self.expire_one(&key, &record, now_ms)? {
                        done.removed += 1;
                    } else {
                        done.kept += 1;
                        // Kept: its index entry stays, and the next pass comes back to it.
                        continue;
                    }
                }
                // Changed under us (expired and claimed again): the next pass sees it.
                Some(record) if record.received_at_ms == t => {
                    done.kept += 1;
                    continue;
                }
                // Nothing there any more, or a newer delivery under the same key.
                _ => {}
            }
            unindexed.push(index_key.clone());
        }
        self.received.remove(&unindexed)?;
        self.step(Op::Expire, "after-index");
        {
            let mut from = self.sweep_from.lock().unwrap_or_else(|p| p.into_inner());
            *from = match candidates.last() {
                Some(last) if candidates.len() == limit => {
                    let mut next = last.clone();
                    next.push(0);
                    Some(next)
                }
                // The end of what has expired: the next pass starts from the front again.
                _ => None,
            };
        }
        if done.removed > 0 || done.examined < limit {
            self.advance_watermark(now_ms)?;
        }
        if fsync && done.examined > 0 {
            self.commit.wait().await?;
        }
        drop(guard);
        self.reclaim_bodies().await?;
        Ok(done)
    }

    async fn expire_fingerprints(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let expired: Vec<sled::IVec> = self
            .fp_expiry
            .range(..cutoff_ms.to_be_bytes().to_vec())
            .keys()
            .take(limit)
            .collect::<Result<_, _>>()
            .map_err(backend)?;
        for index_key in &expired {
            if let Some((t, fp_key)) = split_time_key(index_key) {
                let _locks = self.lock(Op::Expire, &[fp_key]);
                if let Some(value) = self.body_index.get(fp_key).map_err(backend)?
                    && let BodyEntry::Kept(kept) = BodyEntry::decode(&value)?
                    && kept.received_at_ms == t
                {
                    self.body_index.remove(fp_key).map_err(backend)?;
                }
            }
            self.fp_expiry.remove(index_key).map_err(backend)?;
        }
        Ok(expired.len())
    }

    async fn is_healthy(&self) -> bool {
        !self.commit.is_poisoned()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        if self.commit.is_poisoned() {
            return Err(StoreError::Flush("an earlier flush failed".into()));
        }
        self.persist_first_runs()?;
        self.advance_watermark(crate::clock::Clock::System.now_ms())?;
        self.close_starts()?;
        self.received.close()?;
        self.commit.wait().await
    }

    async fn export_page(
        &self,
        from: &ExportPosition,
        limit: usize,
    ) -> Result<(Vec<StoredItem>, Option<ExportPosition>), StoreError> {
        SledInner::export_page(self, from, limit)
    }

    async fn import(&self, items: &[StoredItem], _now_ms: u64) -> Result<usize, StoreError> {
        self.import_items(items)
    }

    async fn finish_import(&self, now_ms: u64) -> Result<(), StoreError> {
        self.repair_lines(true, now_ms, &mut Vec::new())
    }

    async fn close(&self) {
        // Starts and first-run queue entries still in memory are written as they stand and
        // made durable (the final flush did it; a close without one does it here), then the
        // group-commit thread ends. A store still used after this syncs in its callers.
        if let Err(e) = self.persist_first_runs() {
            tracing::warn!(error = %e, "writing the queue entries at close failed");
        }
        if let Err(e) = self.close_starts() {
            tracing::warn!(error = %e, "writing the run starts at close failed");
        }
        if let Err(e) = self.received.close() {
            tracing::warn!(error = %e, "writing the received index at close failed");
        }
        if let Err(e) = self.commit.wait().await {
            tracing::warn!(error = %e, "the sync at close failed");
        }
        self.commit.close();
    }
}

impl SledInner {
    /// Deletes the body log's segments that no stored delivery points into any more, once
    /// the removals that freed them are durable (see [`bodies`]).
    async fn reclaim_bodies(&self) -> Result<(), StoreError> {
        let segments = self.bodies.reclaimable(|| self.received.oldest_ms())?;
        if !segments.is_empty() {
            self.commit.wait().await?;
            self.step(Op::Expire, "before-body-reclaim");
            self.bodies.reclaim(&segments)?;
        }
        Ok(())
    }

    /// Removes one expired delivery unless a handler of it is still due; returns whether it
    /// was removed. The caller holds the delivery's (and its body's) lock.
    fn expire_one(
        &self,
        key: &DeliveryKey,
        record: &DeliveryRecord,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let dk = key.encode();
        let mut states = Vec::with_capacity(record.handlers.len());
        for handler in &record.handlers {
            let jk = key.job(handler).encode();
            let state = self.read_job(&jk)?;
            if self.still_due(record, handler, state.as_ref(), now_ms)? {
                return Ok(false);
            }
            states.push((jk, state));
        }
        for handler in record.order_keys.keys() {
            // Only what a crash left: a pair leaves its line when it becomes final.
            if let Some(entry) = line_entry(record, handler) {
                self.order.remove(entry).map_err(backend)?;
            }
        }
        for (jk, state) in &states {
            // Its first queue entry (due on arrival) and its current one.
            self.remove_queue_entry(&job_queue_key(record.received_at_ms, jk))?;
            if let Some(due) = state.as_ref().and_then(|s| s.queued_at_ms) {
                self.remove_queue_entry(&job_queue_key(due, jk))?;
            }
            self.jobs.remove(jk.as_slice()).map_err(backend)?;
            self.starts.forget(jk);
            self.dead.remove(jk.as_slice()).map_err(backend)?;
            for step in self.calls.scan_prefix(journal_prefix(jk)).keys() {
                self.calls.remove(step.map_err(backend)?).map_err(backend)?;
            }
        }
        self.step(Op::Expire, "after-jobs");
        let fp_key = body_index_key(&record.source, &record.fingerprint);
        let points_here = match self.body_index.get(&fp_key).map_err(backend)? {
            Some(value) => {
                matches!(BodyEntry::decode(&value)?, BodyEntry::Live(id) if id == record.id)
            }
            None => false,
        };
        if points_here {
            match &record.response {
                // The fingerprint outlives the delivery (`fingerprint_retention`): a captured
                // request is still answered as the replay it is.
                Some(response) if record.alias_of.is_none() => {
                    let kept = KeptFingerprint {
                        id: record.id.clone(),
                        received_at_ms: record.received_at_ms,
                        response: response.clone(),
                    };
                    self.fp_expiry
                        .insert(queue_key(record.received_at_ms, &fp_key), &[])
                        .map_err(backend)?;
                    let mut value = vec![KEPT];
                    value.extend_from_slice(&to_json(&kept));
                    self.body_index.insert(&fp_key, value).map_err(backend)?;
                }
                _ => {
                    self.body_index.remove(&fp_key).map_err(backend)?;
                }
            }
        }
        self.step(Op::Expire, "after-body-index");
        self.deliveries.remove(&dk).map_err(backend)?;
        self.step(Op::Expire, "after-record");
        Ok(true)
    }
}
