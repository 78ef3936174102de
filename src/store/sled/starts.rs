//! Run starts kept in memory, and how `attempt + 1` after a crash survives without them.
//!
//! Why: the start of a run used to be a job-state write that the run waited on a group
//! commit for, before the handler began: one of the six sled writes of a delivery, and the
//! wait that kept dispatch slots idle (BENCHMARKS.md, sessions 8c and 9). sled is opened by
//! one process at a time, so a start only needs to be known to this process while the run
//! lasts — its lease fences runs of this process against each other, and a process that
//! died holds no run. What a start must still leave behind is design.md's promise that a
//! handler interrupted by a crash runs again with `attempt + 1`.
//!
//! How:
//! - A start goes into [`RunStarts`] (job key → the state as it would have been written);
//!   every read of a job state (`SledInner::read_job`) sees it first, every durable write
//!   of that state (`SledInner::write_job`) replaces it. The outcome of the run is thus its
//!   only write.
//! - While any start may be unwritten, `meta` holds the mark `open`: set by the first start
//!   after the store was opened or closed cleanly (or by the first queue entry kept in
//!   memory, see `first_runs`: the unclean starts this mark leads to are how `store check`
//!   tells an entry a crash lost from a breach), and every start waits for the disk until
//!   one such wait has ended after it was set ([`RunStarts::start`]); removed by
//!   [`SledInner::close_starts`] (the final flush) once every start in memory is written as
//!   it stands.
//! - Opening a store that still carries the mark means the process before died with runs
//!   possibly started: the time of that opening is added to `unclean-starts` (durably,
//!   before anything runs). A pair's attempt count is then its written `attempts` plus one
//!   for every unclean start after that state was written (after the delivery was received,
//!   for a pair never written) — [`bumped_attempts`]. A run interrupted by a crash thus
//!   comes back with a higher attempt; a pair that had not started before the crash also
//!   counts one more than it ran (the store cannot tell the two apart), never fewer.
//!
//! - One kind of start still waits for the disk: that of a pair in an `order_by` line. The
//!   outcome of the pair before it is written without waiting (`finish_attempt`), and sled
//!   keeps a prefix of its log, so the wait makes that outcome and its hand-on durable before
//!   the next delivery of the line runs; without it a crash could bring the earlier
//!   delivery back to run after the later one had started (`order_holds_across_kill_dash_
//!   nine_and_restart` caught it).
//!
//! The times compared are the wall clock's: a clock set back across a crash by more than
//! the time the restart took could hide one bump (said in docs/leases.md).

use std::sync::Mutex;

use super::encoding::backend;
use super::{CountedTree, SledInner};
use crate::collections::FastHashMap;
use crate::store::{JobState, StoreError};

/// `meta` key: present while starts of runs may exist only in memory.
const OPEN_MARK: &[u8] = b"open";
/// `meta` key: the times (ms, u64 BE each, ascending) at which the store was opened after a
/// process died with the mark set.
const UNCLEAN_STARTS: &[u8] = b"unclean-starts";
/// Unclean starts remembered (the oldest are dropped past this: a pair written before
/// them has long been retried or expired).
const UNCLEAN_STARTS_KEPT: usize = 4096;

/// The starts of this process's runs that are not written, and whether the mark that says
/// so is on disk.
pub(super) struct RunStarts {
    /// Job key → its state as of the start (status `Running`, attempt counted, lease).
    started: Mutex<Started>,
    /// Opens after an unclean stop, ascending (ms since the epoch).
    unclean: Vec<u64>,
}

#[derive(Default)]
struct Started {
    states: FastHashMap<Vec<u8>, JobState>,
    /// Whether `meta` holds [`OPEN_MARK`] (set by this process, or its removal pending).
    marked: bool,
    /// Whether that mark is known to be on disk: until then every start waits for the
    /// disk, not only the one that set it (a run started beside it must not begin before
    /// the mark that counts it is durable).
    mark_synced: bool,
    /// Bumped at every setting of the mark, so that a wait that began before a later
    /// setting does not vouch for it.
    mark_generation: u64,
}

impl RunStarts {
    /// Reads the unclean starts of the store in `meta`; when the mark of a process that did
    /// not close cleanly is there, adds one for now, removes the mark and flushes, so that
    /// the count is on disk before anything runs.
    pub(super) fn open(db: &sled::Db, meta: &CountedTree, now_ms: u64) -> Result<Self, StoreError> {
        let mut unclean: Vec<u64> = meta
            .get(UNCLEAN_STARTS)
            .map_err(backend)?
            .map(|v| {
                v.chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect()
            })
            .unwrap_or_default();
        if meta.contains_key(OPEN_MARK).map_err(backend)? {
            let at = unclean.last().map_or(now_ms, |last| now_ms.max(*last));
            unclean.push(at);
            if unclean.len() > UNCLEAN_STARTS_KEPT {
                unclean.drain(..unclean.len() - UNCLEAN_STARTS_KEPT);
            }
            let value: Vec<u8> = unclean.iter().flat_map(|t| t.to_be_bytes()).collect();
            meta.insert(UNCLEAN_STARTS, value).map_err(backend)?;
            meta.remove(OPEN_MARK).map_err(backend)?;
            db.flush().map_err(backend)?;
            tracing::warn!(
                "the store was not closed cleanly: runs interrupted then come back with attempt + 1"
            );
        }
        Ok(RunStarts {
            started: Mutex::new(Started::default()),
            unclean,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Started> {
        // A panic while holding this lock leaves a map that is still consistent.
        self.started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The in-memory state of a started run, if this process started it and has not
    /// written it since.
    pub(super) fn get(&self, job_key: &[u8]) -> Option<JobState> {
        self.lock().states.get(job_key).cloned()
    }

    /// Forgets a start (its state was written, or the pair is gone).
    pub(super) fn forget(&self, job_key: &[u8]) {
        self.lock().states.remove(job_key);
    }

    /// Updates the in-memory state of a started run; false when it is not in memory.
    pub(super) fn update(&self, job_key: &[u8], state: &JobState) -> bool {
        match self.lock().states.get_mut(job_key) {
            Some(s) => {
                *s = state.clone();
                true
            }
            None => false,
        }
    }

    /// Sets the mark `open` if it is not set: something of this process (a first run's
    /// queue entry, see `first_runs`) now lives in memory only. Not waited for here: the
    /// caller's own wait for the disk covers it (sled keeps a prefix of its log), and a
    /// start still waits until the mark is known durable.
    pub(super) fn mark_open(&self, meta: &CountedTree) -> Result<(), StoreError> {
        let mut started = self.lock();
        if !started.marked {
            meta.insert(OPEN_MARK, &[]).map_err(backend)?;
            started.marked = true;
            started.mark_synced = false;
            started.mark_generation += 1;
        }
        Ok(())
    }

    /// Records a start. Returns the mark's generation when the mark `open` is not known
    /// to be on disk yet: the caller then waits for the disk before the handler begins, and
    /// reports it with [`RunStarts::mark_synced`].
    pub(super) fn start(
        &self,
        meta: &CountedTree,
        job_key: &[u8],
        state: JobState,
    ) -> Result<Option<u64>, StoreError> {
        self.mark_open(meta)?;
        let mut started = self.lock();
        started.states.insert(job_key.to_vec(), state);
        Ok((!started.mark_synced).then_some(started.mark_generation))
    }

    /// A wait for the disk that began after the mark of `generation` was set has ended:
    /// that mark is durable.
    pub(super) fn mark_synced(&self, generation: u64) {
        let mut started = self.lock();
        if started.marked && started.mark_generation == generation {
            started.mark_synced = true;
        }
    }

    /// How many unclean starts came after `since_ms`.
    pub(super) fn unclean_after(&self, since_ms: u64) -> u32 {
        let first_after = self.unclean.partition_point(|t| *t <= since_ms);
        (self.unclean.len() - first_after) as u32
    }
}

/// A pair's attempts so far, as its next run must count them: `state`'s, plus one for every
/// unclean start after `state` was written — or after `received_at_ms`, for a pair with no
/// written state. `in_memory`: the state is this process's own start, already counted.
pub(super) fn bumped_attempts(
    starts: &RunStarts,
    state: Option<&JobState>,
    in_memory: bool,
    received_at_ms: u64,
) -> u32 {
    match state {
        Some(s) if in_memory => s.attempts,
        Some(s) => s.attempts + starts.unclean_after(s.updated_ms),
        None => starts.unclean_after(received_at_ms),
    }
}

impl SledInner {
    /// A pair's state as another store must take it over (`store copy`, which has no
    /// unclean starts of its own to count): its attempts with this store's crashes counted
    /// in, and a state for a pair never written once a crash counts for it.
    pub(super) fn crashes_counted(
        &self,
        state: Option<JobState>,
        record: &crate::store::DeliveryRecord,
    ) -> Option<JobState> {
        let attempts = bumped_attempts(&self.starts, state.as_ref(), false, record.received_at_ms);
        match state {
            Some(mut state) => {
                state.attempts = attempts;
                Some(state)
            }
            None if attempts > 0 => Some(JobState {
                status: crate::store::JobStatus::Pending,
                attempts,
                last_error: None,
                // Queued on arrival, as an acknowledged pair never run is.
                queued_at_ms: (record.response.is_some() && record.alias_of.is_none())
                    .then_some(record.received_at_ms),
                updated_ms: record.received_at_ms,
                retry_base: 0,
                lease: None,
            }),
            None => None,
        }
    }

    /// At the final flush: writes every start still in memory as it stands (a run cut by
    /// the shutdown then counts as started) and, with none left, removes the mark `open`,
    /// so that the next opening is a clean one. Returns whether it wrote anything.
    pub(super) fn close_starts(&self) -> Result<bool, StoreError> {
        let mut started = self.starts.lock();
        let pending: Vec<(Vec<u8>, JobState)> = started.states.drain().collect();
        for (key, state) in &pending {
            self.jobs
                .insert(key.as_slice(), super::job_value::encode(state))
                .map_err(backend)?;
        }
        let unmark = started.marked;
        if unmark {
            self.meta.remove(OPEN_MARK).map_err(backend)?;
            started.marked = false;
            started.mark_synced = false;
        }
        Ok(unmark || !pending.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::JobStatus;

    fn state(attempts: u32, updated_ms: u64) -> JobState {
        JobState {
            status: JobStatus::Failed,
            attempts,
            last_error: None,
            queued_at_ms: None,
            updated_ms,
            retry_base: 0,
            lease: None,
        }
    }

    fn starts(unclean: Vec<u64>) -> RunStarts {
        RunStarts {
            started: Mutex::new(Started::default()),
            unclean,
        }
    }

    #[test]
    fn no_unclean_start_counts_what_was_written() {
        let s = starts(vec![]);
        assert_eq!(bumped_attempts(&s, Some(&state(3, 100)), false, 50), 3);
        assert_eq!(bumped_attempts(&s, None, false, 50), 0);
    }

    #[test]
    fn each_unclean_start_after_the_write_adds_one() {
        let s = starts(vec![100, 200, 300]);
        assert_eq!(bumped_attempts(&s, Some(&state(3, 150)), false, 50), 5);
        assert_eq!(bumped_attempts(&s, Some(&state(3, 300)), false, 50), 3);
        assert_eq!(bumped_attempts(&s, Some(&state(3, 99)), false, 50), 6);
        // Never written: counted from its receipt.
        assert_eq!(bumped_attempts(&s, None, false, 250), 1);
        assert_eq!(bumped_attempts(&s, None, false, 300), 0);
    }

    #[test]
    fn a_start_of_this_process_is_already_counted() {
        let s = starts(vec![100, 200]);
        assert_eq!(bumped_attempts(&s, Some(&state(4, 10)), true, 5), 4);
    }
}
