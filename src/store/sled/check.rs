//! The invariant check of a store (`webhook-inbox store check [--repair]`) and the repair a
//! starting server runs over the deliveries received since its watermark.

use std::collections::{HashMap, HashSet};

use super::super::{
    CheckReport, DeliveryRecord, JobKey, JobState, JobStatus, StoreError, transitions,
};
use super::encoding::{
    StoredBody, backend, decode_delivery_key, decode_record, job_queue_key, queue_key,
    split_delivery, split_job_queue_key, split_time_key,
};
use super::received::UncleanStop;
use super::{Op, SledInner};

/// The start-up repair's watermark: every delivery received before it has been checked.
pub(super) const WATERMARK: &[u8] = b"checked_through_ms";
/// How far behind "now" the watermark is kept: longer than any claim takes.
pub(super) const WATERMARK_LAG_MS: u64 = 60_000;

impl SledInner {
    /// Whether a pair has a way to run: a queue entry that leads to it (the initial one
    /// while it has no state), or a live lease of this process.
    pub(super) fn has_way_to_run(
        &self,
        record: &DeliveryRecord,
        job_key: &[u8],
        state: Option<&JobState>,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let queued = self.has_queue_entry(record, job_key, state)?;
        Ok(transitions::keeps_its_delivery(
            state,
            queued,
            false,
            self.lease_is_live(state, now_ms),
        ))
    }

    /// Whether the queue entry `state` names (for a pair that never ran, the one its claim
    /// wrote, at its arrival) is there.
    fn has_queue_entry(
        &self,
        record: &DeliveryRecord,
        job_key: &[u8],
        state: Option<&JobState>,
    ) -> Result<bool, StoreError> {
        let due = match state {
            None => Some(record.received_at_ms),
            Some(s) => s.queued_at_ms,
        };
        match due {
            Some(due) => self.has_queue_entry_key(&job_queue_key(due, job_key)),
            None => Ok(false),
        }
    }

    /// Whether the run lease in `state` still fences other runners: only a lease of this
    /// process can be live (sled is one process's store).
    fn lease_is_live(&self, state: Option<&JobState>, now_ms: u64) -> bool {
        state
            .and_then(|s| s.lease)
            .is_some_and(|l| l.owner == self.instance && l.blocks_at(now_ms))
    }

    /// Whether a pair that is not final will still run: it has a way to run, or it waits
    /// in its `order_by` line (the pair ahead of it hands it one when it is final) —
    /// [`transitions::keeps_its_delivery`].
    pub(super) fn still_due(
        &self,
        record: &DeliveryRecord,
        handler: &str,
        state: Option<&JobState>,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        if state.is_some_and(JobState::is_final) {
            return Ok(false);
        }
        let jk = record.key().job(handler).encode();
        Ok(transitions::keeps_its_delivery(
            state,
            self.has_queue_entry(record, &jk, state)?,
            self.in_line(record, handler)?,
            self.lease_is_live(state, now_ms),
        ))
    }

    /// The invariant check of one delivery (1 and 2: every handler of an answered
    /// delivery is final or has a way to run); with `repair`, puts back the missing entry.
    pub(super) fn check_delivery(
        &self,
        record: &DeliveryRecord,
        repair: bool,
        now_ms: u64,
        report: &mut CheckReport,
    ) -> Result<(), StoreError> {
        if record.alias_of.is_some() || record.response.is_none() {
            // Aliases run nothing; an unanswered processed-mode delivery promised nothing.
            return Ok(());
        }
        let key = record.key();
        for handler in &record.handlers {
            let job = key.job(handler);
            let jk = job.encode();
            let state = self.read_job(&jk)?;
            if let Some(s) = &state
                && s.status == JobStatus::Dead
                && !self.dead.contains_key(&jk).map_err(backend)?
            {
                report
                    .leftovers
                    .push(format!("{job}: dead but missing from the dead letters"));
                if repair {
                    self.dead.insert(jk.as_slice(), &[]).map_err(backend)?;
                }
            }
            if record.order_keys.contains_key(handler)
                && !state.as_ref().is_some_and(JobState::is_final)
                && !self.in_line(record, handler)?
            {
                // A crash between the claim's record and its line entry.
                report.violations.push(format!(
                    "{job}: not in its order_by line (a later delivery of its value could overtake it)"
                ));
                if repair {
                    match state {
                        Some(mut s) if !self.has_way_to_run(record, &jk, Some(&s), now_ms)? => {
                            s.updated_ms = now_ms;
                            self.enter_line(Op::Retry, record, handler, &mut s, now_ms)?;
                        }
                        None if !self.has_way_to_run(record, &jk, None, now_ms)? => {
                            let mut s = JobState::pending();
                            s.updated_ms = now_ms;
                            self.enter_line(Op::Retry, record, handler, &mut s, now_ms)?;
                        }
                        // It has its way to run: it is the line's active pair.
                        _ => self.add_to_line(record, handler)?,
                    }
                }
                continue;
            }
            if self.still_due(record, handler, state.as_ref(), now_ms)? {
                continue;
            }
            if state.as_ref().is_some_and(JobState::is_final) {
                continue;
            }
            if state.is_none()
                && !record.order_keys.contains_key(handler)
                && self.starts.unclean_after(record.received_at_ms) > 0
            {
                // Its first run's entry was kept in memory (see `first_runs`) by a process
                // that died after the delivery arrived: put back where the claim had it.
                report.leftovers.push(format!(
                    "{job}: first run queued in memory when the process stopped: queued again"
                ));
                if repair {
                    self.queue
                        .insert(job_queue_key(record.received_at_ms, &jk), &[])
                        .map_err(backend)?;
                }
                continue;
            }
            let what = state
                .as_ref()
                .map_or("pending (no state)", |s| match s.status {
                    JobStatus::Running => "running",
                    JobStatus::Failed => "failed",
                    _ => "pending",
                });
            report.violations.push(format!(
                "{job}: {what} with nothing queued to run it (invariants 1, 2)"
            ));
            if repair {
                let mut s = state.unwrap_or_else(JobState::pending);
                if s.status == JobStatus::Running {
                    // Interrupted by a crash: it runs again with attempt + 1.
                    s.status = JobStatus::Failed;
                    s.lease = None;
                }
                s.updated_ms = now_ms;
                if record.order_keys.contains_key(handler) {
                    // Outside its line (a crash cut its claim short): back in, in turn.
                    self.enter_line(Op::Retry, record, handler, &mut s, now_ms)?;
                } else {
                    self.requeue(Op::Retry, &jk, &mut s, now_ms)?;
                }
            }
        }
        Ok(())
    }

    /// Re-checks the deliveries received since the watermark (all of them on a store that
    /// has none: a store written before the watermark existed), repairs what a crash left,
    /// and moves the watermark to now less [`WATERMARK_LAG_MS`].
    pub(super) fn repair_recent(&self) -> Result<(), StoreError> {
        let now = crate::clock::Clock::System.now_ms();
        let since = self.watermark()?;
        let mut report = CheckReport::default();
        if let Some(stop) = self.received.unclean_stop() {
            self.index_unindexed(stop, since, &mut report)?;
            // What the journal cannot vouch for after a power loss: see
            // `repair_if_unindexed`.
            let _ = self.unindexed_window.set(since..now);
        }
        for index_key in self.received.range(since.to_be_bytes().to_vec()..) {
            let index_key = index_key?;
            let Some(key) = split_time_key(&index_key).and_then(|(_, k)| decode_delivery_key(k))
            else {
                continue;
            };
            let _locks = self.lock(Op::Retry, &[&key.encode()]);
            if let Some(record) = self.read_record(&key.encode())? {
                report.deliveries += 1;
                self.check_delivery(&record, true, now, &mut report)?;
            }
        }
        self.repair_lines(true, now, &mut report.violations)?;
        for line in &report.violations {
            tracing::warn!(repair = %line, "repaired on start");
        }
        if !report.leftovers.is_empty() {
            tracing::info!(
                put_back = report.leftovers.len(),
                "queue entries and index entries a stop without a close left, put right"
            );
        }
        self.advance_watermark(now)
    }

    /// After a process died holding index items in memory (`received`): indexes the records
    /// no entry lists — claims whose record reached the disk and whose batch entry did not.
    /// Those are among the keys journaled in the body log after the mark's position (about
    /// a megabyte of frames at most, whatever the store holds); after a version that
    /// journaled nothing, among every record received since `since_ms` (the watermark),
    /// which reads every record once.
    fn index_unindexed(
        &self,
        stop: UncleanStop,
        since_ms: u64,
        report: &mut CheckReport,
    ) -> Result<(), StoreError> {
        let mut recent = Vec::new();
        let received_at = |value: &[u8]| split_delivery(value)?.0.received_at_ms();
        match stop {
            UncleanStop::JournaledFrom(from) => {
                for key in self.bodies.keys_from(from)? {
                    // A claim that died before its record, or lost its race, left only
                    // its frame.
                    if let Some(value) = self.deliveries.get(&key).map_err(backend)? {
                        recent.push(queue_key(received_at(&value)?, &key));
                    }
                }
            }
            UncleanStop::Unjournaled => {
                for entry in self.deliveries.iter() {
                    let (key, value) = entry.map_err(backend)?;
                    let received_at_ms = received_at(&value)?;
                    if received_at_ms >= since_ms {
                        recent.push(queue_key(received_at_ms, &key));
                    }
                }
            }
        }
        let oldest = recent
            .iter()
            .map(|item| split_time_key(item).map_or(0, |(t, _)| t))
            .min();
        if let Some(oldest) = oldest {
            for item in self.received.unindexed_since(oldest, recent)? {
                report.leftovers.push(format!(
                    "{}: missing from the received_at index",
                    String::from_utf8_lossy(&item[8..]).replace('\0', "/")
                ));
                self.received.insert(&item)?;
            }
        }
        self.received.clear_unclean()
    }

    /// A redelivery's check, after an unclean opening, that its record is indexed. A kill -9
    /// leaves the key of every claim whose record may lack its index item in the journal the
    /// opening read; a power loss may not: the OS may have written sled's log, holding an
    /// unacknowledged claim's record, back to the disk ahead of the body log's page holding
    /// its key. Such a record is found when its sender retries, before it is answered: a
    /// record received within the window the opening could not vouch for (from the
    /// watermark to the opening), and not in the index, is indexed here and its handlers'
    /// lost first runs put back (as the start-up repair does), durably, before the answer
    /// that promises them. One never retried stays until `store check --repair` finds it:
    /// nobody was told of it.
    pub(super) async fn repair_if_unindexed(
        &self,
        key: &[u8],
        received_at_ms: u64,
    ) -> Result<(), StoreError> {
        let Some(window) = self.unindexed_window.get() else {
            return Ok(());
        };
        if !window.contains(&received_at_ms) {
            return Ok(());
        }
        let item = queue_key(received_at_ms, key);
        if self.received.contains(&item)? {
            return Ok(());
        }
        // As every write: a concurrent redelivery that finds the item meanwhile waits for
        // the same disk before it answers (`settle_read`).
        self.locked_write(Op::Retry, &[key], Some(key), || {
            let Some(record) = self.read_record(key)? else {
                return Ok(((), false));
            };
            if record.received_at_ms != received_at_ms || self.received.contains(&item)? {
                return Ok(((), false));
            }
            // The runs back first, the item after: a crash between them leaves a record
            // that will run but that the index lacks (for `store check --repair`), never
            // an indexed one whose runs a later opening, past its window, would not look for.
            let mut report = CheckReport::default();
            self.check_delivery(
                &record,
                true,
                crate::clock::Clock::System.now_ms(),
                &mut report,
            )?;
            self.step(Op::Retry, "after-retry-repair-runs");
            self.received.insert(&item)?;
            if !(report.violations.is_empty() && report.leftovers.is_empty()) {
                self.requeued_by_read
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::warn!(
                delivery = %String::from_utf8_lossy(key).replace('\0', "/"),
                repaired = report.violations.len() + report.leftovers.len(),
                "a redelivery found its record unindexed after an unclean stop: indexed, its runs put back"
            );
            Ok(((), true))
        })
        .await
    }

    /// The start-up repair's watermark (0 on a store that has none).
    pub(super) fn watermark(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta
            .get(WATERMARK)
            .map_err(backend)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Records that every delivery received before `now - lag` has been checked. Called
    /// on start and by the retention sweep.
    ///
    /// Never past the oldest first-run entry kept in memory: a crash loses those, and the
    /// next opening finds their pairs again only among the deliveries after the watermark.
    ///
    /// Those held longer than the lag are written to the tree first (see `first_runs`), and
    /// before the watermark (sled keeps a prefix of its log): a paused handler's entries do
    /// not hold it back.
    pub(super) fn advance_watermark(&self, now_ms: u64) -> Result<(), StoreError> {
        let mut mark = now_ms.saturating_sub(WATERMARK_LAG_MS);
        self.persist_first_runs_due_before(mark)?;
        if let Some(oldest) = self.first_runs.oldest_due() {
            mark = mark.min(oldest);
        }
        self.meta
            .insert(WATERMARK, &mark.to_be_bytes())
            .map_err(backend)?;
        Ok(())
    }

    /// `store check`: reads the whole store (stopped server) and lists every breach of
    /// invariants 1, 2 and 4 and every leftover a crash can leave; with `repair`, puts
    /// back what can be put back (a missing queue entry; leftovers are removed). Two
    /// deliveries that ran for one body (invariant 4) cannot be undone: listed only.
    pub fn check(&self, repair: bool, now_ms: u64) -> Result<CheckReport, StoreError> {
        let mut report = CheckReport {
            repaired: repair,
            ..CheckReport::default()
        };
        let mut by_body: HashMap<(String, String), Vec<String>> = HashMap::new();
        let mut indexed: HashSet<Vec<u8>> = HashSet::new();
        let mut pointing_at_nothing = Vec::new();
        for entry in self.received.range(..) {
            let k = entry?;
            if let Some((t, dk)) = split_time_key(&k) {
                let dk = dk.to_vec();
                match self.read_record(&dk)? {
                    Some(r) if r.received_at_ms == t => {
                        indexed.insert(dk);
                    }
                    _ => {
                        report.leftovers.push(format!(
                            "received_at index entry for {} points at nothing",
                            String::from_utf8_lossy(&dk).replace('\0', "/")
                        ));
                        pointing_at_nothing.push(k.clone());
                    }
                }
            }
        }
        if repair {
            self.received.remove(&pointing_at_nothing)?;
        }
        for entry in self.deliveries.iter() {
            let (k, v) = entry.map_err(backend)?;
            let record = decode_record(&v)?;
            report.deliveries += 1;
            // A body in the body log must be there, whole (a record is never written
            // ahead of its body).
            if let (_, StoredBody::Logged(at)) = split_delivery(&v)?
                && let Err(e) = self.bodies.read(&at)
            {
                report
                    .violations
                    .push(format!("{}: its body cannot be read: {e}", record.key()));
            }
            if !indexed.contains(k.as_ref()) {
                report.leftovers.push(format!(
                    "{}: missing from the received_at index (would never expire)",
                    record.key()
                ));
                if repair {
                    self.received
                        .insert(&queue_key(record.received_at_ms, &k))?;
                }
            }
            self.check_delivery(&record, repair, now_ms, &mut report)?;
            if record.body_dedup && record.alias_of.is_none() {
                by_body
                    .entry((record.source.clone(), record.fingerprint.clone()))
                    .or_default()
                    .push(record.id.clone());
            }
        }
        for ((source, fp), mut ids) in by_body {
            if ids.len() > 1 {
                ids.sort();
                report.violations.push(format!(
                    "{source}: one body ({}…) recorded under {} ids that each ran their handlers: {} (invariant 4)",
                    &fp[..fp.len().min(12)],
                    ids.len(),
                    ids.join(", ")
                ));
            }
        }
        for entry in self.queue.iter().keys() {
            let k = entry.map_err(backend)?;
            let Some(job) = split_job_queue_key(&k).and_then(|(_, j)| JobKey::decode(j)) else {
                continue;
            };
            let gone = !self
                .deliveries
                .contains_key(job.delivery.encode())
                .map_err(backend)?;
            let done = self.read_job(&job.encode())?.is_some_and(|s| s.is_final());
            if gone || done {
                report.leftovers.push(format!(
                    "queue entry for {job} leads nowhere ({})",
                    if gone { "no delivery" } else { "already final" }
                ));
                if repair {
                    self.queue.remove(&k).map_err(backend)?;
                }
            }
        }
        self.repair_lines(repair, now_ms, &mut report.violations)?;
        for entry in self.jobs.iter().keys() {
            let k = entry.map_err(backend)?;
            let Some(job) = JobKey::decode(&k) else {
                continue;
            };
            if !self
                .deliveries
                .contains_key(job.delivery.encode())
                .map_err(backend)?
            {
                report
                    .leftovers
                    .push(format!("job state for {job} without its delivery"));
                if repair {
                    self.jobs.remove(&k).map_err(backend)?;
                    self.dead.remove(&k).map_err(backend)?;
                }
            }
        }
        // A dead-letter entry of a pair that is no longer dead (a crash between a superseded
        // run's success and the entry's removal) would be counted and listed: a leftover.
        for entry in self.dead.iter().keys() {
            let k = entry.map_err(backend)?;
            if !self
                .read_job(&k)?
                .is_some_and(|state| state.status == JobStatus::Dead)
            {
                let job = JobKey::decode(&k).map_or_else(|| "a job".to_owned(), |j| j.to_string());
                report
                    .leftovers
                    .push(format!("{job}: in the dead letters but not dead"));
                if repair {
                    self.dead.remove(&k).map_err(backend)?;
                }
            }
        }
        // The call journal: a step of a pair whose delivery is gone (a run that wrote it
        // after retention took the delivery) is a leftover.
        for entry in self.calls.iter().keys() {
            let k = entry.map_err(backend)?;
            let Some((source, id)) = journal_delivery(&k) else {
                continue;
            };
            let delivery = crate::store::DeliveryKey::new(&source, &id);
            if !self
                .deliveries
                .contains_key(delivery.encode())
                .map_err(backend)?
            {
                report.leftovers.push(format!(
                    "call journal step of {delivery} without its delivery"
                ));
                if repair {
                    self.calls.remove(&k).map_err(backend)?;
                }
            }
        }
        if repair {
            self.advance_watermark(now_ms)?;
            self.db.flush().map_err(backend)?;
        }
        Ok(report)
    }
}

/// The (source, id) of a journal key `source \0 id \0 handler \0 step`.
fn journal_delivery(key: &[u8]) -> Option<(String, String)> {
    let mut parts = key.splitn(3, |b| *b == 0);
    let source = std::str::from_utf8(parts.next()?).ok()?;
    let id = std::str::from_utf8(parts.next()?).ok()?;
    parts.next()?;
    Some((source.to_owned(), id.to_owned()))
}
