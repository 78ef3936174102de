//! The sled implementation of [`DeliveryStore`].
//!
//! Five trees, all written together by the claim's transaction:
//!
//! | tree         | key                              | value                    |
//! |--------------|----------------------------------|--------------------------|
//! | `deliveries` | `source \0 id`                   | [`DeliveryRecord`], JSON |
//! | `bodies`     | `source \0 id`                   | raw body bytes           |
//! | `jobs`       | `source \0 id \0 handler`        | [`JobState`], JSON       |
//! | `queue`      | due ms (u64 BE) ++ job key       | empty                    |
//! | `received`   | received ms (u64 BE) ++ `source \0 id` | empty              |
//! | `body_index` | `source \0 fingerprint`         | delivery id (body dedup) |
//! | `dead`       | job key                          | empty (dead letters)     |
//!
//! Big-endian times make sled's key order the time order, so "what is due" and "what has
//! expired" are range scans from the front. JSON keeps records readable and lets later
//! fields arrive with `#[serde(default)]` instead of a migration; the body is kept raw,
//! beside the record, so it costs its own size on disk.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

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
    bodies: sled::Tree,
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

fn tx_error<E>(e: TransactionError<E>) -> StoreError {
    match e {
        TransactionError::Storage(e) => backend(e),
        TransactionError::Abort(_) => StoreError::Backend("transaction aborted".into()),
    }
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
        let (deliveries, bodies, jobs, queue, received, body_index) = (
            tree("deliveries")?,
            tree("bodies")?,
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
            bodies,
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
            .map(|v| serde_json::from_slice(&v).map_err(corrupt))
            .transpose()
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
        let fp_key = body_index_key(&new.record.source, &new.record.fingerprint);
        // Fast path for redeliveries: no transaction, no write.
        if let Some(existing) = self.read_record(&key)? {
            self.settle_read().await?;
            return Ok(Claim::Existing(existing));
        }
        if new.body_dedup
            && let Some(first_id) = self.body_index.get(&fp_key).map_err(backend)?
            && let Some(first) = self.read_record(
                &DeliveryKey::new(&new.record.source, String::from_utf8_lossy(&first_id)).encode(),
            )?
        {
            self.settle_read().await?;
            return Ok(Claim::Existing(first));
        }
        let record_json = to_json(&new.record);
        let received_key = queue_key(new.record.received_at_ms, &key);
        let due = new.record.received_at_ms;
        let jobs: Vec<(Vec<u8>, Vec<u8>)> = new
            .record
            .handlers
            .iter()
            .map(|h| {
                let state = JobState {
                    status: JobStatus::Pending,
                    attempts: 0,
                    last_error: None,
                    queued_at_ms: new.enqueue.then_some(due),
                    updated_ms: due,
                    retry_base: 0,
                };
                (new.record.key().job(h).encode(), to_json(&state))
            })
            .collect();
        let outcome = self
            .durable(|| {
                let source = new.record.source.as_str();
                let result = (
                    &self.deliveries,
                    &self.bodies,
                    &self.jobs,
                    &self.queue,
                    &self.received,
                    &self.body_index,
                )
                    .transaction(|(d, b, j, q, r, bi)| {
                        if let Some(existing) = d.get(&key)? {
                            return Err(ConflictableTransactionError::Abort(existing));
                        }
                        if new.body_dedup {
                            if let Some(first_id) = bi.get(&fp_key)?
                                && let Some(first) = d.get(
                                    DeliveryKey::new(source, String::from_utf8_lossy(&first_id))
                                        .encode(),
                                )?
                            {
                                return Err(ConflictableTransactionError::Abort(first));
                            }
                            bi.insert(fp_key.as_slice(), new.record.id.as_bytes())?;
                        }
                        d.insert(key.as_slice(), record_json.as_slice())?;
                        b.insert(key.as_slice(), new.body.as_ref())?;
                        for (job_key, state) in &jobs {
                            j.insert(job_key.as_slice(), state.as_slice())?;
                            if new.enqueue {
                                q.insert(queue_key(due, job_key), &[])?;
                            }
                        }
                        r.insert(received_key.as_slice(), &[])?;
                        Ok(())
                    });
                match result {
                    Ok(()) => Ok(None),
                    Err(TransactionError::Abort(existing)) => Ok(Some(existing)),
                    Err(e) => Err(tx_error(e)),
                }
            })
            .await?;
        match outcome {
            None => Ok(Claim::New),
            Some(existing) => {
                self.settle_read().await?;
                Ok(Claim::Existing(
                    serde_json::from_slice(&existing).map_err(corrupt)?,
                ))
            }
        }
    }

    async fn record(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        self.read_record(&key.encode())
    }

    async fn body(&self, key: &DeliveryKey) -> Result<Option<Bytes>, StoreError> {
        Ok(self
            .bodies
            .get(key.encode())
            .map_err(backend)?
            .map(|b| Bytes::copy_from_slice(&b)))
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
        now_ms: u64,
    ) -> Result<Option<AttemptContext>, StoreError> {
        let job_key = job.encode();
        let delivery_key = job.delivery.encode();
        let (Some(record), Some(body)) = (
            self.read_record(&delivery_key)?,
            self.bodies.get(&delivery_key).map_err(backend)?,
        ) else {
            return Ok(None);
        };
        let attempt = self
            .durable(|| {
                let result = self.jobs.transaction(|j| {
                    let Some(bytes) = j.get(&job_key)? else {
                        return Ok(None);
                    };
                    let mut state: JobState = serde_json::from_slice(&bytes)
                        .map_err(|e| ConflictableTransactionError::Abort(corrupt(e)))?;
                    if matches!(state.status, JobStatus::Succeeded | JobStatus::Dead) {
                        return Ok(None);
                    }
                    state.status = JobStatus::Running;
                    state.attempts += 1;
                    state.updated_ms = now_ms;
                    j.insert(job_key.as_slice(), to_json(&state))?;
                    Ok(Some((
                        state.attempts,
                        state.attempts.saturating_sub(state.retry_base),
                    )))
                });
                result.map_err(|e| match e {
                    TransactionError::Abort(e) => e,
                    TransactionError::Storage(e) => backend(e),
                })
            })
            .await?;
        Ok(attempt.map(|(attempt, attempts_in_round)| AttemptContext {
            record,
            body: Bytes::copy_from_slice(&body),
            attempt,
            attempts_in_round,
        }))
    }

    async fn finish_attempt(
        &self,
        job: &JobKey,
        outcome: AttemptOutcome,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let job_key = job.encode();
        self.durable(|| {
            let result = (&self.jobs, &self.queue, &self.dead).transaction(|(j, q, dl)| {
                let Some(bytes) = j.get(&job_key)? else {
                    return Ok(());
                };
                let mut state: JobState = serde_json::from_slice(&bytes)
                    .map_err(|e| ConflictableTransactionError::Abort(corrupt(e)))?;
                if let Some(due) = state.queued_at_ms.take() {
                    q.remove(queue_key(due, &job_key))?;
                }
                state.updated_ms = now_ms;
                match &outcome {
                    AttemptOutcome::Succeeded => {
                        state.status = JobStatus::Succeeded;
                    }
                    AttemptOutcome::RetryAt { due_ms, error } => {
                        state.status = JobStatus::Failed;
                        state.last_error = Some(error.clone());
                        state.queued_at_ms = Some(*due_ms);
                        q.insert(queue_key(*due_ms, &job_key), &[])?;
                    }
                    AttemptOutcome::Dead { error } => {
                        state.status = JobStatus::Dead;
                        state.last_error = Some(error.clone());
                        dl.insert(job_key.as_slice(), &[])?;
                    }
                    AttemptOutcome::Failed { error } => {
                        state.status = JobStatus::Failed;
                        state.last_error = Some(error.clone());
                    }
                }
                j.insert(job_key.as_slice(), to_json(&state))?;
                Ok(())
            });
            result.map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => backend(e),
            })
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
                let mut record: DeliveryRecord = serde_json::from_slice(&bytes)
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
                d.insert(k.as_slice(), to_json(&record))?;
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
                let mut record: DeliveryRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| ConflictableTransactionError::Abort(corrupt(e)))?;
                record.lease_until_ms = None;
                if response.is_some() {
                    record.response = response.clone();
                }
                d.insert(k.as_slice(), to_json(&record))?;
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
                let Some(key) = split_time_key(index_key).and_then(|(_, k)| decode_delivery_key(k))
                else {
                    self.received.remove(index_key).map_err(backend)?;
                    continue;
                };
                let dk = key.encode();
                let record = self.read_record(&dk)?;
                let job_keys: Vec<Vec<u8>> = record
                    .iter()
                    .flat_map(|r| r.handlers.iter().map(|h| key.job(h).encode()))
                    .collect();
                let fp_key = record
                    .as_ref()
                    .map(|r| body_index_key(&r.source, &r.fingerprint));
                let result = (
                    &self.deliveries,
                    &self.bodies,
                    &self.jobs,
                    &self.queue,
                    &self.received,
                    &self.body_index,
                    &self.dead,
                )
                    .transaction(|(d, b, j, q, r, bi, dl)| {
                        // The body index entry goes only if it still names this delivery.
                        if let Some(fp_key) = &fp_key
                            && bi.get(fp_key)?.is_some_and(|id| id == key.id.as_bytes())
                        {
                            bi.remove(fp_key.as_slice())?;
                        }
                        for jk in &job_keys {
                            dl.remove(jk.as_slice())?;
                            if let Some(bytes) = j.remove(jk.as_slice())?
                                && let Ok(state) = serde_json::from_slice::<JobState>(&bytes)
                                && let Some(due) = state.queued_at_ms
                            {
                                q.remove(queue_key(due, jk))?;
                            }
                        }
                        d.remove(dk.as_slice())?;
                        b.remove(dk.as_slice())?;
                        r.remove(index_key)?;
                        Ok::<_, ConflictableTransactionError<()>>(())
                    });
                result.map_err(tx_error)?;
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
                next_cursor = Some(hex::encode(&index_key));
                break;
            }
            deliveries.push(DeliverySummary {
                record,
                status: delivery_status,
            });
        }
        // The cursor names the first item *not* returned: the next page starts there.
        if let Some(c) = &mut next_cursor {
            let mut bytes = hex::decode(&*c).unwrap_or_default();
            bytes.push(0);
            *c = hex::encode(bytes);
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
