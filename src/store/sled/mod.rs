//! The sled implementation of [`DeliveryStore`](crate::store::DeliveryStore).
//!
//! Files: this one (opening, locks, the reads and writes every operation shares), one per
//! role of the store — `claim`, `queue` (dispatch), `journal` (call journal), `operator`,
//! `retention` — and `encoding` (key and value layouts), `disk` (what a flush to disk is),
//! `bodies` (the body log: bodies of 256 bytes or more, in segment files beside sled's),
//! `first_runs` (first runs' queue entries, kept in memory), `received` (the received-time
//! index, written once per batch),
//! `check` (invariant check and start-up repair), `export` (`store copy`), `listing` (admin
//! listings), `backfill`, `order` (the `order_by` lines), `starts` (run starts kept in
//! memory, and the count of unclean starts that keeps `attempt + 1` across a crash).
//!
//! | tree         | key                              | value                                   |
//! |--------------|----------------------------------|-----------------------------------------|
//! | `deliveries` | `source \0 id`                   | u32 BE length, [`DeliveryRecord`] (binary, see `binary`; JSON in stores written before), then the raw body, or (length's top bit set) where it lies in the body log |
//! | `jobs`       | `source \0 id \0 handler`        | [`JobState`], binary (see `job_value`; JSON in stores written before) (absent: pending) |
//! | `handler_queue` | handler `\0` due ms (u64 BE) ++ job key | empty (the queue, per handler, less the first runs kept in memory: see `first_runs`; a store of the older layout, one tree `queue` keyed by due ms first, is moved here when opened) |
//! | `received`   | received ms (u64 BE) ++ `source \0 id`; or, one per group commit's batch and bucket of received time, bucket start (u64 BE) `0xFF` sequence (u64 BE) | empty; for a batch entry, its items (see `received`) |
//! | `body_index` | `source \0 fingerprint`          | delivery id (body dedup); once that delivery expired: 0x01 ++ JSON of its id, received_at and answer |
//! | `fp_expiry`  | received ms (u64 BE) ++ body index key | empty: fingerprints kept past their delivery |
//! | `dead`       | job key                          | empty (dead letters)                    |
//! | `order`      | handler `\0` value hash (16 bytes) received ms (u64 BE) `source \0 id` | empty: the `order_by` lines (see `order`) |
//! | `meta`       | name                             | the start-up repair's watermark; `paused\0` ++ handler: a paused handler; `body-segment\0` ++ segment (u64 BE): its bound (see `bodies`); `open` while run starts may be in memory only, `unclean-starts` (see `starts`); `received-pending`: the body-log position (u64 BE segment, offset) from which keys of claims whose index items may be held are journaled (see `received`) |
//!
//! Big-endian times make sled's key order the time order, so "what is due" and "what has
//! expired" are range scans from the front. The two values written once per delivery (its
//! record, its outcome) are binary (`binary`, `job_value`), and a store written as JSON
//! before stays readable; the rest are JSON, readable and letting
//! later fields arrive with `#[serde(default)]` instead of a migration.
//!
//! # Why the writes of one operation cannot be seen half done
//!
//! Every operation that writes what belongs to one delivery (the claim, the start and end
//! of a run, an operator retry, take-over, retention) does its reads and writes under that
//! delivery's lock, one of [`STRIPES`] mutexes picked by a hash of the key; a claim with
//! body dedup also holds the lock of its `(source, fingerprint)`, so two ids with one body
//! are decided one after the other (invariant 4). Locks are taken in stripe order and held
//! only for the in-memory writes, never across the wait for the disk. So a concurrent
//! reader that takes the lock sees all of another operation's writes or none of them —
//! this is what the first version got wrong: its dispatcher read a queue entry between the
//! claim's index writes and its record, dropped the entry as stale, and the delivery was
//! acknowledged with nothing left to run it. The lock-free reads that remain are the
//! redelivery fast path (a record is written last, so once it is visible its queue entries
//! are too) and the queue scan (whose entries [`JobQueue::begin_attempt`](crate::store::JobQueue::begin_attempt) re-checks
//! under the lock).
//!
//! # Why the order of those writes still matters: crashes
//!
//! sled recovers a prefix of its log, so within an operation the order of writes is the
//! order a crash can cut. Each operation writes the ways in before what they lead to and
//! removes old ways in last:
//! - claim: received_at index item (held in memory until its batch's entry is written
//!   before the flush, see `received`: a crash before that entry leaves a record no entry
//!   lists, which the start-up repair finds by its key journaled in the body log after the
//!   mark's position), queue entries (a first run's in memory, see `first_runs`: a crash
//!   loses it and the start-up repair puts it back), body index, the claim's frame appended
//!   to the body log (its body and, when the item is held, its key; its segment's bound
//!   raised, when needed), then the record (a crash before the record leaves entries that
//!   point at nothing: dispatch and retention drop them), then its `order_by` line entries
//!   (a crash before them leaves a pair outside its line: the start-up repair puts it back);
//! - the final outcome of a run in an `order_by` line: the state, the hand-on to the next
//!   pair of the line, then removal of its line entry and its queue entry (a crash before
//!   the hand-on leaves a line nobody runs: the start-up repair hands it on);
//! - end of a run, operator retry: the new queue entry, then the job state, then removal of
//!   the old entry (a crash in between leaves an extra entry: at most one more run, with the
//!   same idempotency key);
//! - retention: queue entries, jobs, body index, record, and the received_at items last,
//!   those of a whole pass together (a sweep cut short finds the rest next time).
//!
//! With `durability = "fsync"` nothing is acknowledged before the group commit
//! ([`super::group_commit`]), so what an ack promises is on disk whole. On start the store
//! re-checks the deliveries received since its last watermark and puts back any queue
//! entry an acknowledged, unfinished handler lacks ([`SledStore::open_with`]): the cost
//! follows what arrived since the watermark, not what is stored.
//!
//! # Testing the gaps
//!
//! A [`StoreProbe`] given at open is told of every step between two writes ([`Op`] and a
//! step name) and of every wait for a delivery's lock. The interleaving tests stop an
//! operation at each step, run every other operation there, and check the invariants.

use std::collections::HashSet;
use std::fs::File;
use std::hash::BuildHasher as _;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

mod backfill;
mod binary;
mod bodies;
mod claim;
mod journal;
mod operator;
mod queue;
mod retention;
pub use bodies::BodyLogSettings;
mod check;
mod counted;
mod disk;
mod encoding;
mod export;
mod first_runs;
mod import;
mod job_value;
mod listing;
mod order;
mod received;
mod starts;

use bodies::BodyLog;
use counted::CountedTree;
pub use counted::WriteCounts;
use disk::DiskSync;
use encoding::{
    StoredBody, backend, corrupt, decode_record, handler_queue_prefix, job_parts, job_queue_key,
    reencode_delivery, split_delivery, split_job_queue_key, split_time_key,
};
use received::ReceivedIndex;

use bytes::Bytes;

use super::group_commit::{GroupCommit, SyncFn};
use super::{
    DeliveryKey, DeliveryRecord, JobKey, JobState, JournalEntry, QueuedJob, SkipSet, StoreError,
};
use crate::config::Durability;

/// A hook run before each fsync, to inject disk failures in tests.
pub type FlushHook = Box<dyn Fn() -> std::io::Result<()> + Send>;

/// `meta` keys of paused handlers: this prefix, then the handler's name.
const PAUSED: &[u8] = b"paused\0";

/// Mutexes the delivery locks are spread over: enough that unrelated deliveries rarely
/// share one, few enough to allocate once.
pub const STRIPES: usize = 256;

/// The store operations whose steps a [`StoreProbe`] sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Claims::claim`](crate::store::Claims::claim).
    Claim,
    /// [`JobQueue::begin_attempt`](crate::store::JobQueue::begin_attempt).
    BeginAttempt,
    /// [`JobQueue::finish_attempt`](crate::store::JobQueue::finish_attempt).
    FinishAttempt,
    /// [`Operations::retry`](crate::store::Operations::retry).
    Retry,
    /// [`Maintenance::expire`](crate::store::Maintenance::expire).
    Expire,
    /// [`Claims::take_over`](crate::store::Claims::take_over).
    TakeOver,
    /// [`Claims::release`](crate::store::Claims::release).
    Release,
    /// [`Operations::bind_handler`](crate::store::Operations::bind_handler) (backfill), per delivery.
    Bind,
}

/// Observes the store between its writes, for the interleaving tests.
pub trait StoreProbe: Send + Sync {
    /// `op` has reached `step` (a point between two of its reads or writes; "start" is
    /// before it takes any lock).
    fn at(&self, op: Op, step: &'static str);

    /// `op` is about to wait for a delivery lock that another operation holds.
    fn contended(&self, _op: Op) {}
}

/// How to open a [`SledStore`] beyond the config.
pub struct SledOptions {
    /// Run before every fsync; an error fails the flush as a failing disk would.
    pub flush_hook: Option<FlushHook>,
    /// Told of every step of every operation.
    pub probe: Option<Arc<dyn StoreProbe>>,
    /// Repair what a crash left among recent deliveries when opening (the server does;
    /// `store check` does not, so that it reports what it finds).
    pub repair_on_open: bool,
    /// How the body log cuts segments (tests make them small, to see them come and go).
    pub body_log: BodyLogSettings,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            flush_hook: None,
            probe: None,
            repair_on_open: true,
            body_log: BodyLogSettings::default(),
        }
    }
}

/// The journal keys of pair `job_key` (an encoded [`JobKey`]) start with this.
fn journal_prefix(job_key: &[u8]) -> Vec<u8> {
    let mut prefix = job_key.to_vec();
    prefix.push(0);
    prefix
}

/// Index entries one batch of a bulk retry looks at (its memory bound, and how long it
/// holds a blocking thread between two looks at the rest of the world).
pub const RETRY_BATCH: usize = 512;

/// Deliveries in an embedded sled database: a cheap handle on [`SledInner`], so a long
/// operation (a bulk retry) can move to a blocking thread with its own handle.
pub struct SledStore(Arc<SledInner>);

impl std::ops::Deref for SledStore {
    type Target = SledInner;
    fn deref(&self) -> &SledInner {
        &self.0
    }
}

/// The state of a [`SledStore`]: its trees, body log, group commit and lock stripes.
pub struct SledInner {
    db: sled::Db,
    /// Writes per tree (`store_writes_total`).
    writes: WriteCounts,
    deliveries: CountedTree,
    jobs: CountedTree,
    queue: CountedTree,
    /// The `received` tree, with the items of claims its next batch entry will hold.
    received: Arc<ReceivedIndex>,
    body_index: CountedTree,
    dead: CountedTree,
    meta: CountedTree,
    fp_expiry: CountedTree,
    order: CountedTree,
    /// The call journal: `source \0 id \0 handler \0 step` -> [`CallRecord`] as JSON.
    calls: CountedTree,
    /// Bodies of [`BODY_LOG_MIN`] bytes or more.
    bodies: Arc<BodyLog>,
    durability: Durability,
    commit: GroupCommit,
    stripes: Box<[Mutex<()>]>,
    probe: Option<Arc<dyn StoreProbe>>,
    /// This process's lease owner id.
    instance: u64,
    /// Where the retention sweep goes on from (past deliveries it had to keep).
    sweep_from: Mutex<Option<Vec<u8>>>,
    /// After an opening that found the process before had died holding `received` items:
    /// the received times (watermark to opening) within which a record may still lack its
    /// index item, which a redelivery of it then checks (see `check`).
    unindexed_window: std::sync::OnceLock<std::ops::Range<u64>>,
    /// Set when a read put a pair back in the queue (`check::repair_if_unindexed`), until
    /// [`crate::store::Claims::take_requeued_by_reads`] tells the caller.
    requeued_by_read: std::sync::atomic::AtomicBool,
    /// The paused handlers, as `meta` holds them: read at open, changed with `meta` by
    /// [`Operations::set_paused`](crate::store::Operations::set_paused) (sled is opened by
    /// one process), so that the dispatcher's every pass and every run's start do not
    /// scan `meta` for them.
    paused: std::sync::RwLock<HashSet<String>>,
    /// The starts of this process's runs, kept in memory (see `starts`).
    starts: starts::RunStarts,
    /// First runs' queue entries kept in memory (see `first_runs`).
    first_runs: first_runs::FirstRuns,
}

/// The hasher that picks a key's stripe: one for the process (a key must always map to the
/// same lock), seeded at random (so keys a sender chooses cannot all land on one).
static STRIPE_HASHER: std::sync::LazyLock<foldhash::fast::RandomState> =
    std::sync::LazyLock::new(foldhash::fast::RandomState::default);

fn stripe_of(key: &[u8]) -> usize {
    (STRIPE_HASHER.hash_one(key) % STRIPES as u64) as usize
}

/// The locks of one operation, released together when dropped.
struct Locked<'a>(#[allow(dead_code)] Vec<MutexGuard<'a, ()>>);

impl SledStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(
        path: &Path,
        durability: Durability,
        cache_capacity: u64,
    ) -> Result<SledStore, StoreError> {
        Self::open_with(path, durability, cache_capacity, SledOptions::default())
    }

    /// Like [`SledStore::open`], with a hook run before every fsync; a hook that fails
    /// makes the flush fail, as a failing disk would.
    pub fn open_with_hook(
        path: &Path,
        durability: Durability,
        cache_capacity: u64,
        hook: Option<FlushHook>,
    ) -> Result<SledStore, StoreError> {
        let options = SledOptions {
            flush_hook: hook,
            ..SledOptions::default()
        };
        Self::open_with(path, durability, cache_capacity, options)
    }

    /// Opens the store with test hooks, then repairs what a crash can have left among the
    /// deliveries received since the last watermark (see the module docs).
    ///
    /// A directory that another process holds open is refused with an error that says so.
    pub fn open_with(
        path: &Path,
        durability: Durability,
        cache_capacity: u64,
        options: SledOptions,
    ) -> Result<SledStore, StoreError> {
        let repair = options.repair_on_open;
        let store = Self::open_raw(path, durability, cache_capacity, options)?;
        if repair {
            store.repair_recent()?;
        }
        Ok(store)
    }

    fn open_raw(
        path: &Path,
        durability: Durability,
        cache_capacity: u64,
        options: SledOptions,
    ) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            .open()
            .map_err(|e| match e {
                // sled 0.34 wraps the failed `flock` in an error of its own words.
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Backend(format!(
                        "{} is in use by another process (a running server?): stop it first",
                        path.display()
                    ))
                }
                other => backend(other),
            })?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        let (deliveries, jobs, queue, received, body_index) = (
            tree("deliveries")?,
            tree("jobs")?,
            tree("handler_queue")?,
            tree("received")?,
            tree("body_index")?,
        );
        let (dead, meta, fp_expiry, order, calls) = (
            tree("dead")?,
            tree("meta")?,
            tree("fp_expiry")?,
            tree("order")?,
            tree("calls")?,
        );
        SledInner::migrate_queue_layout(&db, &queue)?;
        let writes = WriteCounts::default();
        let body_log_meta = meta.clone();
        let [
            deliveries,
            jobs,
            queue,
            received,
            body_index,
            dead,
            meta,
            fp_expiry,
            order,
            calls,
        ] = [
            (deliveries, "deliveries"),
            (jobs, "jobs"),
            (queue, "handler_queue"),
            (received, "received"),
            (body_index, "body_index"),
            (dead, "dead"),
            (meta, "meta"),
            (fp_expiry, "fp_expiry"),
            (order, "order"),
            (calls, "calls"),
        ]
        .map(|(tree, name)| CountedTree::new(tree, name, &writes));
        let data_file = File::open(path.join("db"))
            .map_err(|e| StoreError::Backend(format!("opening sled's data file: {e}")))?;
        // Make the directory entries of a new store durable too.
        File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Backend(format!("syncing the data directory: {e}")))?;
        let bodies = Arc::new(BodyLog::open(
            &path.join("bodies"),
            body_log_meta,
            options.body_log,
            options.repair_on_open,
        )?);
        let received = Arc::new(ReceivedIndex::open(
            received,
            meta.clone(),
            durability == Durability::Fsync,
            {
                let bodies = bodies.clone();
                Box::new(move || bodies.position())
            },
        )?);
        let mut disk = DiskSync {
            body_sync: disk::BodySyncThread::start(bodies.clone())
                .map_err(|e| StoreError::Backend(format!("starting the body log's sync: {e}")))?,
            bodies: bodies.clone(),
            db: db.clone(),
            received: received.clone(),
            data_file,
            blobs_dir: path.join("blobs"),
            synced_blobs: HashSet::new(),
            hook: options.flush_hook,
        };
        let sync: SyncFn = Box::new(move || disk.sync());
        let starts = starts::RunStarts::open(&db, &meta, crate::clock::Clock::System.now_ms())?;
        let paused = meta
            .scan_prefix(PAUSED)
            .keys()
            .map(|k| {
                let k = k.map_err(backend)?;
                Ok(String::from_utf8_lossy(&k[PAUSED.len()..]).into_owned())
            })
            .collect::<Result<HashSet<_>, StoreError>>()?;
        Ok(SledStore(Arc::new(SledInner {
            writes,
            db,
            deliveries,
            jobs,
            queue,
            received,
            body_index,
            dead,
            meta,
            fp_expiry,
            order,
            calls,
            bodies,
            durability,
            commit: GroupCommit::start(sync),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            probe: options.probe,
            instance: rand::random(),
            sweep_from: Mutex::new(None),
            unindexed_window: std::sync::OnceLock::new(),
            requeued_by_read: std::sync::atomic::AtomicBool::new(false),
            paused: std::sync::RwLock::new(paused),
            starts,
            first_runs: first_runs::FirstRuns::new(
                first_runs::FIRST_RUNS_KEPT,
                first_runs::CLAIMED_BYTES_KEPT,
            ),
        })))
    }
}

impl SledInner {
    /// Every journal step of delivery `key`, by handler then step.
    pub fn journal_entries(&self, key: &DeliveryKey) -> Result<Vec<JournalEntry>, StoreError> {
        let mut prefix = key.encode();
        prefix.push(0);
        let mut entries = Vec::new();
        for entry in self.calls.scan_prefix(&prefix) {
            let (k, v) = entry.map_err(backend)?;
            let mut parts = k[prefix.len()..].splitn(2, |b| *b == 0);
            let (Some(handler), Some(step)) = (parts.next(), parts.next()) else {
                continue;
            };
            entries.push(JournalEntry {
                handler: String::from_utf8_lossy(handler).into_owned(),
                step: String::from_utf8_lossy(step).into_owned(),
                record: serde_json::from_slice(&v).map_err(corrupt)?,
            });
        }
        Ok(entries)
    }

    /// The body log's segment files present, oldest first (for tests).
    pub fn body_segments(&self) -> Result<Vec<u64>, StoreError> {
        self.bodies.segments()
    }

    /// The group committer, for its counters.
    pub fn group_commit(&self) -> &GroupCommit {
        &self.commit
    }

    /// The writes per tree, for a metrics registry (`store_writes_total{tree}`).
    pub fn write_counts(&self) -> WriteCounts {
        self.writes.clone()
    }

    /// The duration of each group commit (db.flush and fsync), for a metrics registry.
    pub fn flush_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.commit.stats().sync_seconds.clone()
    }

    fn step(&self, op: Op, step: &'static str) {
        if let Some(p) = &self.probe {
            p.at(op, step);
        }
    }

    /// Takes the locks of `keys` (deduplicated, in stripe order, so two operations never
    /// wait on each other in a cycle).
    fn lock(&self, op: Op, keys: &[&[u8]]) -> Locked<'_> {
        let mut stripes: Vec<usize> = keys.iter().map(|k| stripe_of(k)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let guards = stripes
            .into_iter()
            .map(|i| {
                let m = &self.stripes[i];
                match m.try_lock() {
                    Ok(g) => g,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => {
                        if let Some(p) = &self.probe {
                            p.contended(op);
                        }
                        // The guarded data is `()`: a panic elsewhere cannot leave it torn.
                        m.lock().unwrap_or_else(|p| p.into_inner())
                    }
                }
            })
            .collect();
        Locked(guards)
    }

    /// Runs `write` under the locks of `keys`, then, if it wrote (`.1`), returns once the
    /// writes are as durable as configured. The locks are released before the wait.
    /// `record` names the delivery record the write may change: a redelivery that reads it
    /// meanwhile waits for the same disk (`settle_read`); `None` for writes that change
    /// nothing a redelivery is answered from.
    async fn locked_write<T>(
        &self,
        op: Op,
        keys: &[&[u8]],
        record: Option<&[u8]>,
        write: impl FnOnce() -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        self.step(op, "start");
        let fsync = self.durability == Durability::Fsync;
        let mut guard = if fsync {
            // Before the write can be seen.
            Some(self.commit.begin_write(record)?)
        } else {
            None
        };
        let (out, wrote) = {
            let _locks = self.lock(op, keys);
            self.step(op, "locked");
            write()?
        };
        if let Some(guard) = guard.as_mut().filter(|_| wrote) {
            self.commit.wait_for(guard).await?;
        }
        drop(guard);
        Ok(out)
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
        Ok(Some((meta.record()?, self.body_of(body)?)))
    }

    fn body_of(&self, body: StoredBody<'_>) -> Result<Bytes, StoreError> {
        match body {
            StoredBody::Inline(body) => Ok(Bytes::copy_from_slice(body)),
            StoredBody::Logged(at) => self.bodies.read(&at),
        }
    }

    fn write_record(&self, key: &[u8], record: &DeliveryRecord) -> Result<(), StoreError> {
        let Some(value) = self.deliveries.get(key).map_err(backend)? else {
            return Ok(());
        };
        self.deliveries
            .insert(key, reencode_delivery(record, &value)?)
            .map_err(backend)?;
        Ok(())
    }

    /// A job's state: a start of this process's still in memory, or what is written.
    fn read_job(&self, key: &[u8]) -> Result<Option<JobState>, StoreError> {
        if let Some(started) = self.starts.get(key) {
            return Ok(Some(started));
        }
        self.read_written_job(key)
    }

    /// A job's state as written, ignoring a start in memory.
    fn read_written_job(&self, key: &[u8]) -> Result<Option<JobState>, StoreError> {
        self.jobs
            .get(key)
            .map_err(backend)?
            .map(|v| job_value::decode(&v))
            .transpose()
    }

    /// Writes a job's state; it replaces a start of this process's kept in memory.
    fn write_job(&self, key: &[u8], state: &JobState) -> Result<(), StoreError> {
        self.jobs
            .insert(key, job_value::encode(state))
            .map_err(backend)?;
        self.starts.forget(key);
        Ok(())
    }

    /// `handler`'s queue entries in due order, skipping the jobs in `skip`.
    fn handler_queue(
        &self,
        handler: &str,
        skip: &SkipSet,
    ) -> impl Iterator<Item = Result<QueuedJob, StoreError>> {
        self.handler_queue_after(handler, None, skip)
    }

    /// [`SledInner::handler_queue`] from past the entry `after` (its front if `None`).
    fn handler_queue_after(
        &self,
        handler: &str,
        after: Option<&QueuedJob>,
        skip: &SkipSet,
    ) -> impl Iterator<Item = Result<QueuedJob, StoreError>> {
        let prefix = handler_queue_prefix(handler.as_bytes());
        let start = match after {
            // The least key past `after`'s.
            Some(q) => {
                let mut k = job_queue_key(q.due_ms, &q.job.encode());
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        // Past every key of this handler: `handler \x01` sorts after `handler \0 …`.
        let mut end = prefix;
        if let Some(last) = end.last_mut() {
            *last = 1;
        }
        let memory = self.first_runs.range(start.clone(), end.clone());
        first_runs::merge(self.queue.range(start..end).keys(), memory).filter_map(move |k| {
            let k = match k {
                Ok(k) => k,
                Err(e) => return Some(Err(backend(e))),
            };
            let Some((due_ms, job)) = split_job_queue_key(&k) else {
                return Some(Err(StoreError::Corrupt("queue key".into())));
            };
            // Tested on the borrowed parts: most of what is skipped is decoded for nothing
            // otherwise.
            if let Some((source, id, handler)) = job_parts(job)
                && skip.contains_pair(source, id, handler)
            {
                return None;
            }
            Some(Ok(QueuedJob {
                due_ms,
                job: JobKey::decode(job)?,
            }))
        })
    }

    /// The handlers with queue entries: one seek per handler, not a walk of the queue.
    fn queued_handlers(&self) -> Result<Vec<String>, StoreError> {
        let mut handlers = self.durably_queued_handlers()?;
        for handler in self.first_runs.handlers() {
            let handler = String::from_utf8_lossy(&handler).into_owned();
            if !handlers.contains(&handler) {
                handlers.push(handler);
            }
        }
        Ok(handlers)
    }

    /// The handlers with queue entries in the tree.
    fn durably_queued_handlers(&self) -> Result<Vec<String>, StoreError> {
        let mut handlers = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        while let Some(entry) = self.queue.range(from.clone()..).keys().next() {
            let k = entry.map_err(backend)?;
            let Some(end) = k.iter().position(|b| *b == 0) else {
                return Err(StoreError::Corrupt("queue key".into()));
            };
            handlers.push(String::from_utf8_lossy(&k[..end]).into_owned());
            // Past every key of this handler: `handler \x01` sorts after `handler \0 …`.
            from = k[..end].to_vec();
            from.push(1);
        }
        Ok(handlers)
    }

    /// Moves the entries of the queue layout before handler prefixes (due time first, one
    /// tree `queue`) into the per-handler layout, once, at open: the new entry first, then
    /// removal of the old (a crash in between leaves both; the next open finishes).
    fn migrate_queue_layout(db: &sled::Db, queue: &sled::Tree) -> Result<(), StoreError> {
        if !db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == b"queue".as_slice())
        {
            return Ok(());
        }
        let old = db.open_tree("queue").map_err(backend)?;
        for entry in old.iter().keys() {
            let k = entry.map_err(backend)?;
            if let Some((due, job)) = split_time_key(&k) {
                queue
                    .insert(job_queue_key(due, job), &[])
                    .map_err(backend)?;
            }
            old.remove(&k).map_err(backend)?;
        }
        db.flush().map_err(backend)?;
        db.drop_tree("queue").map_err(backend)?;
        Ok(())
    }

    /// Moves a job's queue entry to `due_ms`: the new entry, then the state that names it,
    /// then removal of the old one (a crash in between leaves an extra entry).
    fn requeue(
        &self,
        op: Op,
        job_key: &[u8],
        state: &mut JobState,
        due_ms: u64,
    ) -> Result<(), StoreError> {
        let old = state.queued_at_ms.replace(due_ms);
        self.move_entry(op, job_key, state, old, due_ms)
    }

    /// Writes `state` (whose entry is due at `to`) with its queue entry moved from `from`:
    /// the new entry, then the state that names it, then removal of the old one (a crash in
    /// between leaves an extra entry: at most one more run, with the same key).
    fn move_entry(
        &self,
        op: Op,
        job_key: &[u8],
        state: &JobState,
        from: Option<u64>,
        to: u64,
    ) -> Result<(), StoreError> {
        let entry = job_queue_key(to, job_key);
        self.queue.insert(entry.as_slice(), &[]).map_err(backend)?;
        // The same key kept in memory (a move to the very ms it was due at) is now on disk:
        // an entry in memory says its pair has no state written, and this one is about to.
        self.first_runs.remove(&entry);
        self.step(op, "after-new-queue-entry");
        self.write_job(job_key, state)?;
        self.step(op, "after-job-state");
        if let Some(old) = from
            && old != to
        {
            self.remove_queue_entry(&job_queue_key(old, job_key))?;
        }
        Ok(())
    }

    /// Whether the queue holds the entry `key` (`handler_queue` layout), in memory or in
    /// the tree.
    fn has_queue_entry_key(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.first_runs.contains(key) || self.queue.contains_key(key).map_err(backend)?)
    }

    /// Removes the queue entry `key` wherever it is: from memory, or else from the tree
    /// (an entry kept in memory costs no write to remove).
    fn remove_queue_entry(&self, key: &[u8]) -> Result<(), StoreError> {
        if !self.first_runs.remove(key) {
            self.queue.remove(key).map_err(backend)?;
        }
        Ok(())
    }

    /// Writes the first-run entries kept in memory to the tree (a clean close: the next
    /// opening then has nothing to put back). Returns whether it wrote any.
    fn persist_first_runs(&self) -> Result<bool, StoreError> {
        self.persist_entries(self.first_runs.snapshot())
    }

    /// Writes the first-run entries kept in memory that were due before `cutoff` to the
    /// tree (see `first_runs`: they would hold the watermark back).
    fn persist_first_runs_due_before(&self, cutoff: u64) -> Result<bool, StoreError> {
        self.persist_entries(self.first_runs.due_before(cutoff))
    }

    fn persist_entries(&self, entries: Vec<Vec<u8>>) -> Result<bool, StoreError> {
        // Written before they leave memory: a reader in between sees the entry somewhere.
        for key in &entries {
            self.queue.insert(key.as_slice(), &[]).map_err(backend)?;
            self.first_runs.remove(key);
        }
        Ok(!entries.is_empty())
    }
}

impl Drop for SledInner {
    fn drop(&mut self) {
        // No run of this process goes on past this: its starts are written as they stand,
        // and the queue entries kept in memory.
        let _ = self.persist_first_runs();
        let _ = self.close_starts();
        self.commit.close();
        // Best effort: the group commit already made every acknowledged write durable.
        let _ = self.db.flush();
    }
}
