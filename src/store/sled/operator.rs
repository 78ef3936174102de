//! What an operator does and reads: listings, retries, pauses, counts, backfill
//! ([`crate::store::Operations`]).

use std::collections::HashSet;

use async_trait::async_trait;

use super::encoding::{
    backend, decode_delivery_key, handler_queue_prefix, split_job_queue_key, split_time_key,
};
use super::listing::{LIST_SCAN_LIMIT, cursor_before};
use super::order::line_locks;
use super::{Op, PAUSED, RETRY_BATCH, SledInner, SledStore};
use crate::config::Durability;
use crate::store::transitions::{self, Retry, RetryContext};
use crate::store::{
    Binding, Cursor, DeliveryKey, DeliveryRecord, DeliveryStatus, JobKey, JobState, JobStatus,
    Operations, Page, Received, RetryFilter, StoreError,
};

#[async_trait]
impl Operations for SledStore {
    async fn list(
        &self,
        source: Option<&str>,
        status: Option<DeliveryStatus>,
        limit: usize,
        cursor: Option<&Cursor>,
    ) -> Result<Page, StoreError> {
        let end = match cursor {
            Some(c) => c.position().to_vec(),
            None => vec![0xFF; 9],
        };
        if status == Some(DeliveryStatus::Dead) {
            return self.list_dead(source, limit, &end);
        }
        let mut deliveries = Vec::new();
        let mut next = None;
        let mut examined = 0;
        for index_key in self.received.range_rev(..end) {
            let index_key = index_key?;
            // A page may stop short of `limit` (with a cursor to go on) rather than read
            // the whole store for a filter that matches little.
            examined += 1;
            if examined > LIST_SCAN_LIMIT || deliveries.len() == limit {
                next = Some(cursor_before(&index_key));
                break;
            }
            let Some(key) = split_time_key(&index_key).and_then(|(_, k)| decode_delivery_key(k))
            else {
                continue;
            };
            if source.is_some_and(|s| s != key.source) {
                continue;
            }
            let Some(summary) = self.summary(&key)? else {
                continue;
            };
            if status.is_some_and(|s| s != summary.status) {
                continue;
            }
            deliveries.push(summary);
        }
        Ok(Page { deliveries, next })
    }

    async fn retry(&self, key: &DeliveryKey, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let dk = key.encode();
        let locks = self.delivery_and_line_locks(&dk)?;
        let lock_keys: Vec<&[u8]> = locks.iter().map(Vec::as_slice).collect();
        self.locked_write(Op::Retry, &lock_keys, None, || {
            let Some(record) = self.read_record(&dk)? else {
                return Ok((Vec::new(), false));
            };
            let mut requeued = Vec::new();
            for handler in &record.handlers {
                if self.requeue_pair(&record, handler, None, now_ms)? {
                    requeued.push(handler.clone());
                }
            }
            let wrote = !requeued.is_empty();
            Ok((requeued, wrote))
        })
        .await
    }

    async fn retry_all(&self, filter: &RetryFilter, now_ms: u64) -> Result<usize, StoreError> {
        // Batch by batch on a blocking thread: a bulk retry over many thousand pairs holds
        // neither an async worker (the admin listener's `/readyz` answers meanwhile) nor
        // more than one batch of candidates in memory.
        let fsync = self.durability == Durability::Fsync;
        let guard = if fsync {
            // Job states, pauses and handler lists: nothing a redelivery is answered from,
            // so no key holds its readers.
            Some(self.commit.begin_long_write()?)
        } else {
            None
        };
        let mut retried = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let inner = self.0.clone();
            let batch_filter = filter.clone();
            let (n, next) = tokio::task::spawn_blocking(move || {
                inner.retry_batch(&batch_filter, after.as_deref(), now_ms)
            })
            .await
            .map_err(|e| StoreError::Backend(format!("bulk retry: {e}")))??;
            retried += n;
            match next {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        if fsync && retried > 0 {
            self.commit.wait().await?;
        }
        drop(guard);
        Ok(retried)
    }

    async fn queue_depths(&self) -> Result<Vec<(String, usize)>, StoreError> {
        SledInner::queued_handlers(self)?
            .into_iter()
            .map(|h| {
                let prefix = handler_queue_prefix(h.as_bytes());
                let n = self.queue.scan_prefix(&prefix).count()
                    + self.first_runs.count_with_prefix(&prefix);
                Ok((h, n))
            })
            .collect()
    }

    async fn handler_stats(
        &self,
        now_ms: u64,
    ) -> Result<std::collections::HashMap<String, crate::store::HandlerStats>, StoreError> {
        let mut stats: std::collections::HashMap<String, crate::store::HandlerStats> =
            Default::default();
        let mut latest: std::collections::HashMap<String, u64> = Default::default();
        let mut seen = HashSet::new();
        let mut note = |job: &JobKey, state: &JobState, stats: &mut crate::store::HandlerStats| {
            match state.status {
                JobStatus::Running => stats.running += 1,
                JobStatus::Failed => stats.failed += 1,
                JobStatus::Dead => stats.dead += 1,
                _ => {}
            }
            if matches!(state.status, JobStatus::Failed | JobStatus::Dead)
                && state.last_error.is_some()
                && latest
                    .get(&job.handler)
                    .is_none_or(|t| *t <= state.updated_ms)
            {
                latest.insert(job.handler.clone(), state.updated_ms);
                stats.last_error = state.last_error.clone();
            }
        };
        // Running and failed pairs are queued; dead ones are in their own tree: neither
        // read walks the job states of everything stored.
        let in_memory = self.first_runs.snapshot();
        let durable = self.queue.iter().keys();
        for entry in durable.chain(in_memory.into_iter().map(|k| Ok(k.into()))) {
            let k = entry.map_err(backend)?;
            let Some(job) = split_job_queue_key(&k).and_then(|(_, j)| JobKey::decode(j)) else {
                continue;
            };
            let handler_stats = stats.entry(job.handler.clone()).or_default();
            handler_stats.queued += 1;
            if seen.insert(job.clone())
                && let Some(state) = self.read_job(&job.encode())?
                && state.status != JobStatus::Dead
            {
                note(&job, &state, handler_stats);
            }
        }
        for entry in self.dead.iter().keys() {
            let k = entry.map_err(backend)?;
            if let Some(job) = JobKey::decode(&k)
                && let Some(state) = self.read_job(&k)?
            {
                note(&job, &state, stats.entry(job.handler.clone()).or_default());
            }
        }
        for (handler, waiting) in self.waiting_in_lines(now_ms)? {
            stats.entry(handler).or_default().waiting = waiting;
        }
        Ok(stats)
    }

    async fn set_paused(
        &self,
        handler: &str,
        paused: bool,
        _now_ms: u64,
    ) -> Result<(), StoreError> {
        let fsync = self.durability == Durability::Fsync;
        let guard = if fsync {
            // Job states, pauses and handler lists: nothing a redelivery is answered from,
            // so no key holds its readers.
            Some(self.commit.begin_long_write()?)
        } else {
            None
        };
        let key = [PAUSED, handler.as_bytes()].concat();
        {
            // Under the lock of the in-memory set, so that it and `meta` change together.
            let mut in_memory = self.paused.write().unwrap_or_else(|p| p.into_inner());
            if paused {
                self.meta.insert(key, &[]).map_err(backend)?;
                in_memory.insert(handler.to_owned());
            } else {
                self.meta.remove(key).map_err(backend)?;
                in_memory.remove(handler);
            }
        }
        if fsync {
            self.commit.wait().await?;
        }
        drop(guard);
        Ok(())
    }

    async fn dead_letters(&self) -> Result<usize, StoreError> {
        Ok(self.dead.len())
    }

    async fn received_between(
        &self,
        since_ms: u64,
        until_ms: u64,
        after: Option<&Received>,
        limit: usize,
    ) -> Result<Vec<Received>, StoreError> {
        self.received_between_sync(since_ms, until_ms, after, limit)
    }

    async fn bind_handler(
        &self,
        handler: &str,
        batch: &[(DeliveryKey, Option<String>)],
    ) -> Result<Vec<Binding>, StoreError> {
        // On a blocking thread, as a bulk retry: the batch's locks and writes hold no
        // async worker; then one wait for the disk covers the whole batch.
        let fsync = self.durability == Durability::Fsync;
        let guard = if fsync {
            // Job states, pauses and handler lists: nothing a redelivery is answered from,
            // so no key holds its readers.
            Some(self.commit.begin_long_write()?)
        } else {
            None
        };
        let inner = self.0.clone();
        let handler = handler.to_owned();
        let batch = batch.to_vec();
        let bindings = tokio::task::spawn_blocking(move || {
            batch
                .iter()
                .map(|(key, order_key)| inner.bind_one(&handler, key, order_key.as_deref()))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| StoreError::Backend(format!("backfill: {e}")))??;
        if fsync && bindings.contains(&Binding::Bound) {
            self.commit.wait().await?;
        }
        drop(guard);
        Ok(bindings)
    }
}

impl SledInner {
    /// One batch of a bulk retry: looks at up to [`RETRY_BATCH`] index entries after
    /// `after` (the dead letters, or every job state for failed pairs) and requeues the
    /// pairs `filter` selects, each checked again under its delivery's lock. Returns how
    /// many it requeued, and the last entry looked at when there may be more.
    fn retry_batch(
        &self,
        filter: &RetryFilter,
        after: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<(usize, Option<Vec<u8>>), StoreError> {
        self.step(Op::Retry, "batch");
        let wanted = |job: &JobKey| {
            filter
                .source
                .as_deref()
                .is_none_or(|s| s == job.delivery.source)
                && filter.handler.as_deref().is_none_or(|h| h == job.handler)
        };
        let tree = if filter.status == JobStatus::Dead {
            &self.dead
        } else {
            &self.jobs
        };
        let from = after.map_or(std::ops::Bound::Unbounded, |k| {
            std::ops::Bound::Excluded(k.to_vec())
        });
        let mut candidates: Vec<JobKey> = Vec::new();
        let mut last = None;
        let mut seen = 0;
        for entry in tree.range::<Vec<u8>, _>((from, std::ops::Bound::Unbounded)) {
            let (key, value) = entry.map_err(backend)?;
            seen += 1;
            if let Some(job) = JobKey::decode(&key)
                && wanted(&job)
                && (filter.status == JobStatus::Dead
                    || super::job_value::decode(&value).is_ok_and(|s| s.status == filter.status))
            {
                candidates.push(job);
            }
            if seen == RETRY_BATCH {
                last = Some(key.to_vec());
                break;
            }
        }
        let mut retried = 0;
        for job in candidates {
            let dk = job.delivery.encode();
            self.step(Op::Retry, "start");
            let locks = self.delivery_and_line_locks(&dk)?;
            let lock_keys: Vec<&[u8]> = locks.iter().map(Vec::as_slice).collect();
            let _locks = self.lock(Op::Retry, &lock_keys);
            self.step(Op::Retry, "locked");
            let Some(record) = self.read_record(&dk)? else {
                continue;
            };
            let received = record.received_at_ms;
            if filter.since_ms.is_some_and(|t| received < t)
                || filter.until_ms.is_some_and(|t| received >= t)
            {
                continue;
            }
            if self.requeue_pair(&record, &job.handler, Some(filter.status), now_ms)? {
                retried += 1;
            }
        }
        Ok((retried, last))
    }

    /// An operator retry of one pair (the caller holds the delivery's lock): due now, with a
    /// fresh `max_attempts` if it failed or died. Not a pair that succeeded or runs under a
    /// live lease, nor (with `only`) one in another state. Returns whether it was requeued.
    fn requeue_pair(
        &self,
        record: &DeliveryRecord,
        handler: &str,
        only: Option<JobStatus>,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        if !record.handlers.iter().any(|h| h == handler) {
            return Ok(false);
        }
        let jk = record.key().job(handler).encode();
        let stored = self.read_job(&jk)?;
        let lease_is_live = stored
            .as_ref()
            .and_then(|s| s.lease)
            .is_some_and(|l| l.owner == self.instance && l.blocks_at(now_ms));
        let ordered = record.order_keys.contains_key(handler);
        let queued_on_arrival = (record.response.is_some() && record.alias_of.is_none())
            .then_some(record.received_at_ms);
        // Parked: in its line with no way to run (a pair that never ran is looked at as its
        // claim queued it).
        let parked = ordered && self.in_line(record, handler)? && {
            let as_queued = stored.clone().unwrap_or(JobState {
                queued_at_ms: queued_on_arrival,
                ..JobState::pending()
            });
            !self.has_way_to_run(record, &jk, Some(&as_queued), now_ms)?
        };
        let context = RetryContext {
            lease_is_live,
            only,
            ordered,
            parked,
            queued_on_arrival,
        };
        match transitions::operator_retry(stored, context, now_ms) {
            Retry::Untouched => Ok(false),
            Retry::DueNow { mut state, revived } => {
                if revived {
                    self.dead.remove(jk.as_slice()).map_err(backend)?;
                }
                self.requeue(Op::Retry, &jk, &mut state, now_ms)?;
                Ok(true)
            }
            Retry::BackInLine { mut state } => {
                self.dead.remove(jk.as_slice()).map_err(backend)?;
                // Now if nobody is in its line, else in turn.
                self.enter_line(Op::Retry, record, handler, &mut state, now_ms)?;
                Ok(true)
            }
        }
    }

    /// The lock keys of an operation on a delivery that may change its `order_by` lines:
    /// the delivery's, then its lines' (read from the record, whose order keys never change).
    fn delivery_and_line_locks(&self, dk: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = vec![dk.to_vec()];
        if let Some(record) = self.read_record(dk)? {
            keys.extend(line_locks(&record));
        }
        Ok(keys)
    }
}
