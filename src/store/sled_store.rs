//! The sled implementation of [`DeliveryStore`].
//!
//! | tree         | key                              | value                                   |
//! |--------------|----------------------------------|-----------------------------------------|
//! | `deliveries` | `source \0 id`                   | u32 BE length, [`DeliveryRecord`] JSON, raw body |
//! | `jobs`       | `source \0 id \0 handler`        | [`JobState`], JSON (absent: pending)    |
//! | `queue`      | due ms (u64 BE) ++ job key       | empty                                   |
//! | `received`   | received ms (u64 BE) ++ `source \0 id` | empty                            |
//! | `body_index` | `source \0 fingerprint`          | delivery id (body dedup)                |
//! | `dead`       | job key                          | empty (dead letters)                    |
//!
//! Big-endian times make sled's key order the time order, so "what is due" and "what has
//! expired" are range scans from the front. JSON keeps records readable and lets later
//! fields arrive with `#[serde(default)]` instead of a migration.
//!
//! **Why no multi-tree transaction on the claim.** On sled 0.34 a transaction across the
//! trees a claim touches costs ~180 µs against ~26 µs for one `compare_and_swap` (measured,
//! see BENCHMARKS.md), and the claim is the hot path. So the claim is one CAS of the whole
//! delivery (record and body in one value, jobs implicit until they first run), preceded by
//! plain inserts of its index entries (queue, received_at, body fingerprint). A crash
//! between the two leaves index entries that point at nothing; dispatch and retention
//! check the record and drop such entries when they meet them. With
//! `durability = "fsync"` nothing is acknowledged before the group commit, so what an ack
//! promises is on disk whole.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{CompareAndSwapError, Transactional};

use super::group_commit::{GroupCommit, SyncFn};
use super::{
    AttemptContext, AttemptOutcome, Claim, DeliveryKey, DeliveryRecord, DeliveryStatus,
    DeliveryStore, DeliverySummary, JobKey, JobState, JobStatus, NewDelivery, Page, QueuedJob,
    StoreError, StoredResponse, TakeOver,
};
use crate::config::Durability;

/// A hook run before each fsync, to inject disk failures in tests.
pub type FlushHook = Box<dyn Fn() -> std::io::Result<()> + Send>;

/// Deliveries in an embedded sled database.
pub struct SledStore {
    db: sled::Db,
    deliveries: sled::Tree,
    jobs: sled::Tree,
    queue: sled::Tree,
    received: sled::Tree,
    body_index: sled::Tree,
    dead: sled::Tree,
    durability: Durability,
    commit: GroupCommit,
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, numbers, options) cannot fail.
    serde_json::to_vec(value).expect("records serialize to JSON")
}

fn queue_key(due_ms: u64, job: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + job.len());
    k.extend_from_slice(&due_ms.to_be_bytes());
    k.extend_from_slice(job);
    k
}

fn split_time_key(k: &[u8]) -> Option<(u64, &[u8])> {
    let (t, rest) = k.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*t), rest))
}

/// A delivery's value: the record's JSON length (u32 BE), the JSON, then the raw body, so
/// a replay parses the small record and never copies the body around.
fn encode_delivery(record: &DeliveryRecord, body: &[u8]) -> Vec<u8> {
    let meta = to_json(record);
    let mut v = Vec::with_capacity(4 + meta.len() + body.len());
    v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    v.extend_from_slice(&meta);
    v.extend_from_slice(body);
    v
}

fn split_delivery(value: &[u8]) -> Result<(&[u8], &[u8]), StoreError> {
    let (len, rest) = value
        .split_first_chunk::<4>()
        .ok_or_else(|| StoreError::Corrupt("short delivery value".into()))?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err(StoreError::Corrupt("truncated delivery value".into()));
    }
    Ok(rest.split_at(len))
}

fn decode_record(value: &[u8]) -> Result<DeliveryRecord, StoreError> {
    let (meta, _) = split_delivery(value)?;
    serde_json::from_slice(meta).map_err(corrupt)
}

fn pending_job() -> JobState {
    JobState {
        status: JobStatus::Pending,
        attempts: 0,
        last_error: None,
        queued_at_ms: None,
        updated_ms: 0,
        retry_base: 0,
    }
}

fn body_index_key(source: &str, fingerprint: &str) -> Vec<u8> {
    DeliveryKey::new(source, fingerprint).encode()
}

fn decode_delivery_key(bytes: &[u8]) -> Option<DeliveryKey> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (source, id) = text.split_once('\0')?;
    Some(DeliveryKey::new(source, id))
}

/// `db.flush()` then a real fsync of what sled wrote: its log file `db` and any blob files
/// (sled keeps pages over a quarter of a segment in `blobs/`, written without fsync).
struct DiskSync {
    db: sled::Db,
    data_file: File,
    blobs_dir: PathBuf,
    synced_blobs: HashSet<std::ffi::OsString>,
    hook: Option<FlushHook>,
}

impl DiskSync {
    fn sync(&mut self) -> std::io::Result<()> {
        if let Some(hook) = &self.hook {
            hook()?;
        }
        self.db.flush().map_err(std::io::Error::other)?;
        self.data_file.sync_data()?;
        self.sync_blobs()
    }

    fn sync_blobs(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Garbage-collected by sled between listing and opening.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

impl SledStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(
        path: &Path,
        durability: Durability,
        cache_capacity: u64,
    ) -> Result<SledStore, StoreError> {
        Self::open_with_hook(path, durability, cache_capacity, None)
    }

    /// Like [`SledStore::open`], with a hook run before every fsync; a hook that fails
    /// makes the flush fail, as a failing disk would.
    pub fn open_with_hook(
        path: &Path,
        durability: Durability,
        cache_capacity: u64,
        hook: Option<FlushHook>,
    ) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            .open()
            .map_err(backend)?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        let (deliveries, jobs, queue, received, body_index) = (
            tree("deliveries")?,
            tree("jobs")?,
            tree("queue")?,
            tree("received")?,
            tree("body_index")?,
        );
        let dead = tree("dead")?;
        let data_file = File::open(path.join("db"))
            .map_err(|e| StoreError::Backend(format!("opening sled's data file: {e}")))?;
        // Make the directory entries of a new store durable too.
        File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Backend(format!("syncing the data directory: {e}")))?;
        let mut disk = DiskSync {
            db: db.clone(),
            data_file,
            blobs_dir: path.join("blobs"),
            synced_blobs: HashSet::new(),
            hook,
        };
        let sync: SyncFn = Box::new(move || disk.sync());
        Ok(SledStore {
            db,
            deliveries,
            jobs,
            queue,
            received,
            body_index,
            dead,
            durability,
            commit: GroupCommit::start(sync),
        })
    }

    /// The group committer, for its counters.
    pub fn group_commit(&self) -> &GroupCommit {
        &self.commit
    }

    /// Runs a write and returns once it is as durable as configured.
    async fn durable<T>(
        &self,
        write: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.durability == Durability::Buffered {
            return write();
        }
        let guard = self.commit.begin_write()?;
        let out = write()?;
        self.commit.wait().await?;
        drop(guard);
        Ok(out)
    }

    /// A record read while writes are in flight may not be on disk yet: join the next
    /// group commit before answering from it.
    ///
    /// After a failed flush nothing read can be vouched for: what is in memory may never
    /// reach the disk, so replaying it could acknowledge a delivery that a crash then loses.
    async fn settle_read(&self) -> Result<(), StoreError> {
        if self.durability == Durability::Fsync && self.commit.is_poisoned() {
            return Err(StoreError::Flush(
                "an earlier flush failed; restart to recover".into(),
            ));
        }
        if self.durability == Durability::Fsync && self.commit.writes_in_flight() {
            self.commit.wait().await?;
        }
        Ok(())
    }

    fn read_record(&self, key: &[u8]) -> Result<Option<DeliveryRecord>, StoreError> {
        self.deliveries
            .get(key)
            .map_err(backend)?
            .map(|v| decode_record(&v))
            .transpose()
    }

    fn read_delivery(&self, key: &[u8]) -> Result<Option<(DeliveryRecord, Bytes)>, StoreError> {
        let Some(value) = self.deliveries.get(key).map_err(backend)? else {
            return Ok(None);
        };
        let (meta, body) = split_delivery(&value)?;
        Ok(Some((
            serde_json::from_slice(meta).map_err(corrupt)?,
            Bytes::copy_from_slice(body),
        )))
    }

    /// Removes a queue entry that no longer leads anywhere (its job finished, or its
    /// delivery expired or never landed).
    fn drop_stale(&self, queued_due: Option<u64>, job_key: &[u8]) -> Result<(), StoreError> {
        if let Some(due) = queued_due {
            self.queue
                .remove(queue_key(due, job_key))
                .map_err(backend)?;
        }
        Ok(())
    }

    fn read_job(&self, key: &[u8]) -> Result<Option<JobState>, StoreError> {
        self.jobs
            .get(key)
            .map_err(backend)?
            .map(|v| serde_json::from_slice(&v).map_err(corrupt))
            .transpose()
    }

    fn queue_scan(
        &self,
        skip: &dyn Fn(&JobKey) -> bool,
    ) -> impl Iterator<Item = Result<QueuedJob, StoreError>> {
        self.queue.iter().keys().filter_map(move |k| {
            let k = match k {
                Ok(k) => k,
                Err(e) => return Some(Err(backend(e))),
            };
            let Some((due_ms, job)) = split_time_key(&k) else {
                return Some(Err(StoreError::Corrupt("queue key".into())));
            };
            let job = JobKey::decode(job)?;
            (!skip(&job)).then_some(Ok(QueuedJob { due_ms, job }))
        })
    }
}

#[async_trait]
impl DeliveryStore for SledStore {
    async fn claim(&self, new: NewDelivery) -> Result<Claim, StoreError> {
        let key = new.record.key().encode();
        // Fast path for redeliveries: one read, no write.
        if let Some(existing) = self.read_record(&key)? {
            self.settle_read().await?;
            return Ok(Claim::Existing(existing));
        }
        let fp_key = body_index_key(&new.record.source, &new.record.fingerprint);
        if new.body_dedup
            && let Some(first_id) = self.body_index.get(&fp_key).map_err(backend)?
            && first_id != new.record.id.as_bytes()
            && let Some(first) = self.read_record(
                &DeliveryKey::new(&new.record.source, String::from_utf8_lossy(&first_id)).encode(),
            )?
        {
            self.settle_read().await?;
            return Ok(Claim::Existing(first));
        }
        let received_at = new.record.received_at_ms;
        let received_key = queue_key(received_at, &key);
        let queue_keys: Vec<Vec<u8>> = if new.enqueue {
            new.record
                .handlers
                .iter()
                .map(|h| queue_key(received_at, &new.record.key().job(h).encode()))
                .collect()
        } else {
            Vec::new()
        };
        let value = encode_delivery(&new.record, &new.body);
        let lost_to = self
            .durable(|| {
                // Index entries first: should the process die before the record lands, they
                // point at nothing and are dropped when dispatch or retention meet them.
                self.received.insert(&received_key, &[]).map_err(backend)?;
                for q in &queue_keys {
                    self.queue.insert(q.as_slice(), &[]).map_err(backend)?;
                }
                if new.body_dedup {
                    self.body_index
                        .insert(&fp_key, new.record.id.as_bytes())
                        .map_err(backend)?;
                }
                // The claim itself: exactly one concurrent request for a key gets `Ok`.
                match self
                    .deliveries
                    .compare_and_swap(&key, None as Option<&[u8]>, Some(value))
                    .map_err(backend)?
                {
                    Ok(()) => Ok(None),
                    Err(CompareAndSwapError { current, .. }) => {
                        let existing = decode_record(current.as_deref().unwrap_or_default())?;
                        // Our index entries are not needed, unless they are the winner's own
                        // (same key, same millisecond).
                        if existing.received_at_ms != received_at {
                            self.received.remove(&received_key).map_err(backend)?;
                            for q in &queue_keys {
                                self.queue.remove(q.as_slice()).map_err(backend)?;
                            }
                        }
                        Ok(Some(existing))
                    }
                }
            })
            .await?;
        match lost_to {
            None => Ok(Claim::New),
            Some(existing) => {
                self.settle_read().await?;
                Ok(Claim::Existing(existing))
            }
        }
    }

    async fn record(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        self.read_record(&key.encode())
    }

    async fn body(&self, key: &DeliveryKey) -> Result<Option<Bytes>, StoreError> {
        Ok(self.read_delivery(&key.encode())?.map(|(_, body)| body))
    }

    async fn job(&self, key: &JobKey) -> Result<Option<JobState>, StoreError> {
        self.read_job(&key.encode())
    }

    fn due_jobs(
        &self,
        now_ms: u64,
        limit: usize,
        skip: &dyn Fn(&JobKey) -> bool,
    ) -> Result<Vec<QueuedJob>, StoreError> {
        let mut out = Vec::new();
        for entry in self.queue_scan(skip) {
            let entry = entry?;
            if entry.due_ms > now_ms || out.len() >= limit {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }

    fn next_due_ms(&self, skip: &dyn Fn(&JobKey) -> bool) -> Result<Option<u64>, StoreError> {
        self.queue_scan(skip)
            .next()
            .transpose()
            .map(|e| e.map(|e| e.due_ms))
    }

    async fn begin_attempt(
        &self,
        job: &JobKey,
        queued_due: Option<u64>,
        now_ms: u64,
    ) -> Result<Option<AttemptContext>, StoreError> {
        let job_key = job.encode();
        let Some((record, body)) = self.read_delivery(&job.delivery.encode())? else {
            self.drop_stale(queued_due, &job_key)?;
            return Ok(None);
        };
        // One runner per job at a time (the dispatcher's in-flight set, the processed-mode
        // lease), so plain writes suffice here.
        let mut state = self.read_job(&job_key)?.unwrap_or_else(pending_job);
        if matches!(state.status, JobStatus::Succeeded | JobStatus::Dead) {
            self.drop_stale(queued_due, &job_key)?;
            return Ok(None);
        }
        state.status = JobStatus::Running;
        state.attempts += 1;
        state.updated_ms = now_ms;
        if queued_due.is_some() {
            state.queued_at_ms = queued_due;
        }
        let bytes = to_json(&state);
        self.durable(|| {
            self.jobs
                .insert(&job_key, bytes)
                .map(|_| ())
                .map_err(backend)
        })
        .await?;
        Ok(Some(AttemptContext {
            record,
            body,
            attempt: state.attempts,
            attempts_in_round: state.attempts.saturating_sub(state.retry_base),
        }))
    }

    async fn finish_attempt(
        &self,
        job: &JobKey,
        outcome: AttemptOutcome,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let job_key = job.encode();
        let Some(mut state) = self.read_job(&job_key)? else {
            return Ok(());
        };
        let old_entry = state.queued_at_ms.take();
        state.updated_ms = now_ms;
        self.durable(|| {
            // New entries before the state that names them, the old entry last: a crash in
            // between leaves at worst an extra entry, which runs at most one more attempt.
            match &outcome {
                AttemptOutcome::Succeeded => state.status = JobStatus::Succeeded,
                AttemptOutcome::RetryAt { due_ms, error } => {
                    self.queue
                        .insert(queue_key(*due_ms, &job_key), &[])
                        .map_err(backend)?;
                    state.status = JobStatus::Failed;
                    state.last_error = Some(error.clone());
                    state.queued_at_ms = Some(*due_ms);
                }
                AttemptOutcome::Dead { error } => {
                    self.dead.insert(&job_key, &[]).map_err(backend)?;
                    state.status = JobStatus::Dead;
                    state.last_error = Some(error.clone());
                }
                AttemptOutcome::Failed { error } => {
                    state.status = JobStatus::Failed;
                    state.last_error = Some(error.clone());
                }
            }
            self.jobs
                .insert(&job_key, to_json(&state))
                .map_err(backend)?;
            if let Some(old) = old_entry
                && state.queued_at_ms != Some(old)
            {
                self.queue
                    .remove(queue_key(old, &job_key))
                    .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn take_over(
        &self,
        key: &DeliveryKey,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Result<TakeOver, StoreError> {
        let k = key.encode();
        self.durable(|| {
            let result = self.deliveries.transaction(|d| {
                let Some(bytes) = d.get(&k)? else {
                    return Err(ConflictableTransactionError::Abort(StoreError::Corrupt(
                        "record vanished during take-over".into(),
                    )));
                };
                let (meta, body) =
                    split_delivery(&bytes).map_err(ConflictableTransactionError::Abort)?;
                let mut record: DeliveryRecord = serde_json::from_slice(meta)
                    .map_err(|e| ConflictableTransactionError::Abort(corrupt(e)))?;
                if record.response.is_some() {
                    return Ok(TakeOver::Final(record));
                }
                if let Some(until_ms) = record.lease_until_ms
                    && until_ms > now_ms
                {
                    return Ok(TakeOver::Held { until_ms });
                }
                record.lease_until_ms = Some(lease_until_ms);
                d.insert(k.as_slice(), encode_delivery(&record, body))?;
                Ok(TakeOver::Acquired(record))
            });
            result.map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => backend(e),
            })
        })
        .await
    }

    async fn release(
        &self,
        key: &DeliveryKey,
        response: Option<StoredResponse>,
    ) -> Result<(), StoreError> {
        let k = key.encode();
        self.durable(|| {
            let result = self.deliveries.transaction(|d| {
                let Some(bytes) = d.get(&k)? else {
                    return Ok(());
                };
                let (meta, body) =
                    split_delivery(&bytes).map_err(ConflictableTransactionError::Abort)?;
                let mut record: DeliveryRecord = serde_json::from_slice(meta)
                    .map_err(|e| ConflictableTransactionError::Abort(corrupt(e)))?;
                record.lease_until_ms = None;
                if response.is_some() {
                    record.response = response.clone();
                }
                d.insert(k.as_slice(), encode_delivery(&record, body))?;
                Ok(())
            });
            result.map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => backend(e),
            })
        })
        .await
    }

    async fn expire(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let expired: Vec<sled::IVec> = self
            .received
            .range(..cutoff_ms.to_be_bytes().to_vec())
            .keys()
            .take(limit)
            .collect::<Result<_, _>>()
            .map_err(backend)?;
        if expired.is_empty() {
            return Ok(0);
        }
        self.durable(|| {
            for index_key in &expired {
                // The index entry goes last: a sweep cut short finds the rest next time.
                if let Some((_, key)) =
                    split_time_key(index_key).and_then(|(t, k)| Some((t, decode_delivery_key(k)?)))
                {
                    let dk = key.encode();
                    if let Some(record) = self.read_record(&dk)? {
                        for handler in &record.handlers {
                            let jk = key.job(handler).encode();
                            // Its first queue entry (due on arrival) and its current one.
                            self.queue
                                .remove(queue_key(record.received_at_ms, &jk))
                                .map_err(backend)?;
                            if let Some(state) = self.read_job(&jk)?
                                && let Some(due) = state.queued_at_ms
                            {
                                self.queue.remove(queue_key(due, &jk)).map_err(backend)?;
                            }
                            self.jobs.remove(&jk).map_err(backend)?;
                            self.dead.remove(&jk).map_err(backend)?;
                        }
                        let fp_key = body_index_key(&record.source, &record.fingerprint);
                        if self
                            .body_index
                            .get(&fp_key)
                            .map_err(backend)?
                            .is_some_and(|id| id == record.id.as_bytes())
                        {
                            self.body_index.remove(&fp_key).map_err(backend)?;
                        }
                        self.deliveries.remove(&dk).map_err(backend)?;
                    }
                }
                self.received.remove(index_key).map_err(backend)?;
            }
            Ok(expired.len())
        })
        .await
    }

    async fn list(
        &self,
        source: Option<&str>,
        status: Option<DeliveryStatus>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page, StoreError> {
        let end = match cursor {
            Some(c) => hex::decode(c).map_err(|_| StoreError::Corrupt("bad cursor".into()))?,
            None => vec![0xFF; 9],
        };
        let mut deliveries = Vec::new();
        let mut next_cursor = None;
        for index_key in self.received.range(..end).keys().rev() {
            let index_key = index_key.map_err(backend)?;
            let Some(key) = split_time_key(&index_key).and_then(|(_, k)| decode_delivery_key(k))
            else {
                continue;
            };
            if source.is_some_and(|s| s != key.source) {
                continue;
            }
            let Some(record) = self.read_record(&key.encode())? else {
                continue;
            };
            let jobs = record
                .handlers
                .iter()
                .map(|h| self.read_job(&key.job(h).encode()))
                .collect::<Result<Vec<_>, _>>()?;
            let delivery_status = DeliveryStatus::of(&record, &jobs);
            if status.is_some_and(|s| s != delivery_status) {
                continue;
            }
            if deliveries.len() == limit {
                // The cursor is the first key *not* returned, plus a zero byte: the next
                // page's range `..cursor` then starts with it.
                let mut first_not_returned = index_key.to_vec();
                first_not_returned.push(0);
                next_cursor = Some(hex::encode(first_not_returned));
                break;
            }
            deliveries.push(DeliverySummary {
                record,
                status: delivery_status,
            });
        }
        Ok(Page {
            deliveries,
            next_cursor,
        })
    }

    async fn retry(&self, key: &DeliveryKey, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let Some(record) = self.read_record(&key.encode())? else {
            return Ok(Vec::new());
        };
        let job_keys: Vec<(String, Vec<u8>)> = record
            .handlers
            .iter()
            .map(|h| (h.clone(), key.job(h).encode()))
            .collect();
        self.durable(|| {
            let result = (&self.jobs, &self.queue, &self.dead).transaction(|(j, q, dl)| {
                let mut requeued = Vec::new();
                for (handler, job_key) in &job_keys {
                    let Some(bytes) = j.get(job_key)? else {
                        continue;
                    };
                    let mut state: JobState = serde_json::from_slice(&bytes)
                        .map_err(|e| ConflictableTransactionError::Abort(corrupt(e)))?;
                    if !matches!(state.status, JobStatus::Dead | JobStatus::Failed) {
                        continue;
                    }
                    if let Some(due) = state.queued_at_ms.take() {
                        q.remove(queue_key(due, job_key))?;
                    }
                    state.status = JobStatus::Failed;
                    state.retry_base = state.attempts;
                    state.queued_at_ms = Some(now_ms);
                    state.updated_ms = now_ms;
                    q.insert(queue_key(now_ms, job_key), &[])?;
                    dl.remove(job_key.as_slice())?;
                    j.insert(job_key.as_slice(), to_json(&state))?;
                    requeued.push(handler.clone());
                }
                Ok(requeued)
            });
            result.map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => backend(e),
            })
        })
        .await
    }

    fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    fn dead_letters(&self) -> usize {
        self.dead.len()
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "store_flush_seconds",
            "Duration of one group commit (db.flush and fsync)",
            self.commit.stats().sync_seconds.clone(),
        );
    }

    fn is_healthy(&self) -> bool {
        !self.commit.is_poisoned()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        if self.commit.is_poisoned() {
            return Err(StoreError::Flush("an earlier flush failed".into()));
        }
        self.commit.wait().await
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.commit.close();
        // Best effort: the group commit already made every acknowledged write durable.
        let _ = self.db.flush();
    }
}
