//! The queue of (delivery, handler) pairs and the runs' start and outcome
//! ([`crate::store::JobQueue`]).

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;

use super::encoding::{backend, decode_order_keys, job_queue_key};
use super::{Op, SledInner, SledStore, order, starts};
use crate::config::Durability;
use crate::store::JobQueue;
use crate::store::transitions::{self, QueueChange, Start};
use crate::store::{
    AttemptContext, AttemptOutcome, Begin, JobKey, JobState, Lease, QueuedJob, SkipSet, StoreError,
};

#[async_trait]
impl JobQueue for SledStore {
    async fn job(&self, key: &JobKey) -> Result<Option<JobState>, StoreError> {
        self.read_job(&key.encode())
    }

    async fn due_jobs(
        &self,
        now_ms: u64,
        limit: usize,
        skip: &SkipSet,
    ) -> Result<Vec<QueuedJob>, StoreError> {
        let mut out = Vec::new();
        for handler in SledInner::queued_handlers(self)? {
            out.extend(self.due_jobs_of(&handler, now_ms, limit, skip).await?);
        }
        out.sort_by_key(|q| q.due_ms);
        out.truncate(limit);
        Ok(out)
    }

    async fn next_due_ms(&self, skip: &SkipSet) -> Result<Option<u64>, StoreError> {
        let mut next: Option<u64> = None;
        for handler in SledInner::queued_handlers(self)? {
            if let Some(due) = self.next_due_of(&handler, skip).await? {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        Ok(next)
    }

    async fn due_jobs_of(
        &self,
        handler: &str,
        now_ms: u64,
        limit: usize,
        skip: &SkipSet,
    ) -> Result<Vec<QueuedJob>, StoreError> {
        self.due_jobs_and_next_of(handler, now_ms, limit, skip, None)
            .await
            .map(|(due, _)| due)
    }

    async fn next_due_of(&self, handler: &str, skip: &SkipSet) -> Result<Option<u64>, StoreError> {
        self.handler_queue(handler, skip)
            .next()
            .transpose()
            .map(|e| e.map(|e| e.due_ms))
    }

    async fn due_jobs_and_next_of(
        &self,
        handler: &str,
        now_ms: u64,
        limit: usize,
        skip: &SkipSet,
        after: Option<&QueuedJob>,
    ) -> Result<(Vec<QueuedJob>, Option<u64>), StoreError> {
        let mut out = Vec::new();
        for entry in self.handler_queue_after(handler, after, skip) {
            let entry = entry?;
            if entry.due_ms > now_ms || out.len() >= limit {
                return Ok((out, Some(entry.due_ms)));
            }
            out.push(entry);
        }
        Ok((out, None))
    }

    async fn begin_attempt(
        &self,
        job: &JobKey,
        queued_due: Option<u64>,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Result<Begin, StoreError> {
        let job_key = job.encode();
        let dk = job.delivery.encode();
        let mut mark_to_sync = None;
        let begun = self
            .locked_write(Op::BeginAttempt, &[&dk], None, || {
                // The entry kept in memory of a first run, with the delivery as claimed.
                let in_memory =
                    queued_due.and_then(|due| self.first_runs.get(&job_queue_key(due, &job_key)));
                let entry_in_memory = in_memory.is_some();
                // A delivery that cannot be read back intact is started all the same (the attempt
                // counted, under a lease), so that the runner dead-letters it through the one
                // path that records a final outcome and hands its line on (invariant 8).
                let delivery = match in_memory.flatten() {
                    // Its record is stored (a claim cut before writing it takes its entries
                    // back out of memory), and neither its body nor a field a run reads has
                    // changed since.
                    Some(claimed) => Ok((claimed.record.clone(), claimed.body.clone())),
                    None => match self.read_delivery(&dk) {
                        Ok(None) => {
                            self.drop_stale(queued_due, &job_key)?;
                            return Ok((Begin::Skipped, false));
                        }
                        Ok(Some((record, body))) => Ok((Arc::new(record), body)),
                        Err(StoreError::Corrupt(e)) => Err(e),
                        Err(e) => return Err(e),
                    },
                };
                if let Some(due) = queued_due
                    && !entry_in_memory
                    && !self
                        .queue
                        .contains_key(job_queue_key(due, &job_key))
                        .map_err(backend)?
                {
                    // Read before an operator retry moved it, or a run finished: stale.
                    return Ok((Begin::Skipped, false));
                }
                let listed = match &delivery {
                    Ok((record, _)) => record.handlers.contains(&job.handler),
                    Err(_) => true,
                };
                if !listed {
                    // A backfill cut by a crash before the record that names its pair.
                    self.drop_stale(queued_due, &job_key)?;
                    return Ok((Begin::Skipped, false));
                }
                let (read, from_memory) = match self.starts.get(&job_key) {
                    Some(state) => (Some(state), true),
                    // A pair whose entry is kept in memory has no state written: whatever
                    // writes one moves or removes that entry under this same lock (see
                    // `first_runs`). One read of `jobs` fewer per first run.
                    None if entry_in_memory => {
                        debug_assert!(self.read_written_job(&job_key)?.is_none());
                        (None, false)
                    }
                    None => (self.read_written_job(&job_key)?, false),
                };
                // Runs a crash interrupted count too (see `starts`).
                let attempts_so_far = starts::bumped_attempts(
                    &self.starts,
                    read.as_ref(),
                    from_memory,
                    match &delivery {
                        Ok((record, _)) => record.received_at_ms,
                        Err(_) => 0,
                    },
                );
                // A lease of another instance belongs to a process that died (sled is opened
                // by one process at a time); one of this process is taken over only once past
                // its end and the grace (invariant 6).
                let lease_is_live = read
                    .as_ref()
                    .and_then(|s| s.lease)
                    .is_some_and(|lease| lease.owner == self.instance && lease.blocks_at(now_ms));
                // A pause recorded before this check holds, whatever the caller read earlier.
                let paused = self.is_paused(&job.handler);
                let lease = Lease {
                    owner: self.instance,
                    until_ms: lease_until_ms,
                };
                let state = match transitions::start(
                    read,
                    attempts_so_far,
                    lease_is_live,
                    paused,
                    lease,
                    queued_due,
                    now_ms,
                ) {
                    Start::Skip => {
                        self.drop_stale(queued_due, &job_key)?;
                        return Ok((Begin::Skipped, false));
                    }
                    Start::Busy { until_ms } => return Ok((Begin::Busy { until_ms }, false)),
                    Start::Run(state) => state,
                };
                // Kept in memory, not written: the run's outcome is its one write. Only the
                // starts before the mark `open` is known durable wait for the disk.
                let mark = self.starts.start(&self.meta, &job_key, state.clone())?;
                mark_to_sync = mark;
                let begin = match delivery {
                    Ok((record, body)) => Begin::Started(Box::new(AttemptContext {
                        record,
                        body,
                        attempt: state.attempts,
                        attempts_in_round: state.attempts.saturating_sub(state.retry_base),
                    })),
                    Err(error) => Begin::Unreadable {
                        attempt: state.attempts,
                        error,
                    },
                };
                // The start of a pair in an `order_by` line waits for the disk even so: that
                // wait makes its predecessor's outcome and hand-on durable first (sled keeps
                // a prefix of its log), so a crash can never rerun the earlier delivery after
                // this one has started.
                let ordered = matches!(&begin, Begin::Started(context)
                    if context.record.order_keys.contains_key(&job.handler));
                Ok((begin, mark.is_some() || ordered))
            })
            .await;
        if let (Ok(_), Some(generation)) = (&begun, mark_to_sync) {
            self.starts.mark_synced(generation);
        }
        begun
    }

    async fn renew_job_lease(
        &self,
        job: &JobKey,
        attempt: u32,
        lease_until_ms: u64,
    ) -> Result<bool, StoreError> {
        let job_key = job.encode();
        let _locks = self.lock(Op::BeginAttempt, &[&job.delivery.encode()]);
        let lease = Lease {
            owner: self.instance,
            until_ms: lease_until_ms,
        };
        let Some(state) = transitions::renew(self.read_job(&job_key)?.as_ref(), attempt, lease)
        else {
            return Ok(false);
        };
        // A start in memory is renewed there; one written (by a flush while it ran) is
        // rewritten, not waited for: a renewal lost in a crash only shortens a lease that
        // died with the process anyway.
        if !self.starts.update(&job_key, &state) {
            self.write_job(&job_key, &state)?;
        }
        Ok(true)
    }

    async fn finish_attempt(
        &self,
        job: &JobKey,
        attempt: u32,
        outcome: AttemptOutcome,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let job_key = job.encode();
        let dk = job.delivery.encode();
        // A final outcome hands an ordered handler's line on to the next delivery: the
        // line's lock too (its key is in the record, which does not change).
        let line = match outcome {
            // A first run queued in memory is of a handler without `order_by` (see
            // `first_runs`): no record to read for a line it has not.
            AttemptOutcome::Succeeded | AttemptOutcome::Dead { .. }
                if self.first_run_in_memory(&job_key) =>
            {
                None
            }
            AttemptOutcome::Succeeded | AttemptOutcome::Dead { .. } => {
                match self.deliveries.get(&dk).map_err(backend)? {
                    // A record that does not decode has no line this can find (its pair is
                    // dead-lettered all the same: invariant 8).
                    Some(value) => decode_order_keys(&value)
                        .ok()
                        .and_then(|keys| keys.get(&job.handler).cloned())
                        .map(|v| order::line_prefix(&job.handler, &v)),
                    None => None,
                }
            }
            _ => None,
        };
        let mut lock_keys: Vec<&[u8]> = vec![&dk];
        lock_keys.extend(line.as_deref());
        // The outcome is not waited for (see `locked_write_unsynced`): half the disk waits of
        // a run.
        self.locked_write_unsynced(Op::FinishAttempt, &lock_keys, || {
            let Some(finish) =
                transitions::finish(self.read_job(&job_key)?.as_ref(), attempt, &outcome, now_ms)
            else {
                return Ok(((), false));
            };
            if finish.dead_letter() {
                self.dead.insert(job_key.as_slice(), &[]).map_err(backend)?;
                self.step(Op::FinishAttempt, "after-dead-letter");
            }
            match finish.queue {
                QueueChange::Remove(old) => {
                    self.write_job(&job_key, &finish.state)?;
                    self.step(Op::FinishAttempt, "after-job-state");
                    // After the state: a crash between the two leaves an entry `store check`
                    // finds stale and removes, never a dead pair missing from the list.
                    if finish.leaves_dead_letters() {
                        self.dead.remove(job_key.as_slice()).map_err(backend)?;
                    }
                    if finish.hands_on()
                        && line.is_some()
                        && let Some(record) = self.read_record(&dk)?
                    {
                        self.leave_line(Op::FinishAttempt, &record, &job.handler, now_ms)?;
                    }
                    // The way in goes last, once the outcome that makes it unneeded is written.
                    self.drop_stale(old, &job_key)?;
                }
                QueueChange::Move { from, to } => {
                    self.move_entry(Op::FinishAttempt, &job_key, &finish.state, from, to)?;
                }
                // Processed mode: the sender's retry runs it again. A queue entry an operator
                // retry added stays, and runs it in the background.
                QueueChange::Keep => self.write_job(&job_key, &finish.state)?,
            }
            Ok(((), true))
        })
    }

    async fn queued_handlers(&self) -> Result<Vec<String>, StoreError> {
        SledInner::queued_handlers(self)
    }

    async fn paused_handlers(&self) -> Result<HashSet<String>, StoreError> {
        Ok(self
            .paused
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }
}

impl SledInner {
    /// Whether `handler` is paused (see `SledInner::paused`).
    fn is_paused(&self, handler: &str) -> bool {
        self.paused
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(handler)
    }

    /// Whether the run of `job_key` this process started came from a first-run entry kept
    /// in memory.
    fn first_run_in_memory(&self, job_key: &[u8]) -> bool {
        self.starts
            .get(job_key)
            .and_then(|state| state.queued_at_ms)
            .is_some_and(|due| self.first_runs.contains(&job_queue_key(due, job_key)))
    }

    /// Removes a queue entry that no longer leads anywhere (its job finished, or its
    /// delivery expired or never landed).
    fn drop_stale(&self, queued_due: Option<u64>, job_key: &[u8]) -> Result<(), StoreError> {
        if let Some(due) = queued_due {
            self.remove_queue_entry(&job_queue_key(due, job_key))?;
        }
        Ok(())
    }

    /// Like [`SledInner::locked_write`], but returns without waiting for the disk: for
    /// writes that acknowledge nothing to anyone, whose loss in a crash the design already
    /// allows for (the outcome of a run: lost, the pair runs again after the restart, with
    /// `attempt + 1` — the crash is counted at the next opening, see `starts` — and the
    /// same idempotency key).
    /// sled writes its log in order, so any later durable write (an ack, a processed-mode
    /// answer) makes these durable too.
    fn locked_write_unsynced<T>(
        &self,
        op: Op,
        keys: &[&[u8]],
        write: impl FnOnce() -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        self.step(op, "start");
        if self.durability == Durability::Fsync && self.commit.is_poisoned() {
            return Err(StoreError::Flush(
                "an earlier flush failed; restart to recover".into(),
            ));
        }
        let _locks = self.lock(op, keys);
        self.step(op, "locked");
        write().map(|(out, _)| out)
    }
}
