//! Durable memory of deliveries: the store's roles and their two backends.
//!
//! The roles: [`Claims`] (ingest), [`JobQueue`] (dispatch), [`CallJournal`] (downstream
//! calls), [`Operations`] (admin API, console, CLI), [`Maintenance`] (retention, health,
//! `store copy`); a [`DeliveryStore`] is a store that plays all five. [`open()`] is the one
//! place a store is opened from the config. sled (embedded, the default) and PostgreSQL
//! (several replicas) each keep a file per role.
//!
//! What is kept per delivery (keyed by `(source, delivery id)`): the [`DeliveryRecord`]
//! (body fingerprint, received_at, event type, headers, the first response once final), the
//! raw body, and one [`JobState`] per matching handler once it has first run (absent means
//! pending). Ordered indexes keep every
//! background task proportional to its own work, never to the size of the store:
//! - the queue, per handler, ordered by due time: dispatch and crash recovery read only
//!   what is due, of the handlers that may run;
//! - the received_at index: retention reads only what has expired;
//! - the `order_by` lines, per (handler, value): only a line's first pair is queued, the
//!   others wait unqueued until the end of the run ahead of them hands the line on.
//!
//! The claim of a new delivery and every later step of its life (start and end of a run,
//! operator retry, processed-mode lease, retention) are decided under that delivery's lock,
//! so concurrent operations never see each other half done, and written in an order that a
//! crash cannot turn into a broken promise (see [`SledStore`] for both arguments and
//! design.md's "Invariants" for the promises). With `durability = "fsync"` every write
//! returns only once it is on disk (see [`group_commit`]), so an acknowledgement implies a
//! record that survives a power loss.

pub mod copy;
pub use copy::ExportPosition;
pub mod group_commit;
pub mod journal;
pub mod lease;
mod open;
pub mod postgres;
mod sled;
pub mod transitions;

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use journal::{CallRecord, JournalEntry};
pub use lease::{Lease, TAKE_OVER_GRACE_MS, lease_margin};
pub use open::{OpenError, OpenedStore, Opening, open};
pub use postgres::PgStore;
pub use sled::{
    BodyLogSettings, FlushHook, Op, RETRY_BATCH, SledInner, SledOptions, SledStore, StoreProbe,
    WriteCounts,
};

use crate::verify::{AuthenticatedDelivery, Headers};

/// Why the store could not do its part; every variant answers 503 `storage_unavailable`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error.
    #[error("store error: {0}")]
    Backend(String),
    /// Flushing to disk failed; the store refuses writes until restarted.
    #[error("flush to disk failed: {0}")]
    Flush(String),
    /// A stored value could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// A lease could not be proven held (renewals failing, or taken over): the work under
    /// it was stopped and nothing was recorded (invariant 6).
    #[error("lease lost: {0}")]
    LeaseLost(String),
}

/// `(source, delivery id)`, the key every delivery is deduplicated under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    /// Source name.
    pub source: String,
    /// Delivery id.
    pub id: String,
}

impl DeliveryKey {
    /// Makes a key.
    pub fn new(source: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            id: id.into(),
        }
    }

    /// `source \0 id`: sources are plain names and ids hold no control characters, so the
    /// separator is unambiguous and keys of one source sort together.
    pub fn encode(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.source.len() + 1 + self.id.len());
        k.extend_from_slice(self.source.as_bytes());
        k.push(0);
        k.extend_from_slice(self.id.as_bytes());
        k
    }

    /// Inverse of [`DeliveryKey::encode`].
    pub fn decode(bytes: &[u8]) -> Option<DeliveryKey> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (source, id) = text.split_once('\0')?;
        Some(DeliveryKey::new(source, id))
    }

    /// The job of `handler` for this delivery.
    pub fn job(&self, handler: &str) -> JobKey {
        JobKey {
            delivery: self.clone(),
            handler: handler.to_owned(),
        }
    }
}

impl fmt::Display for DeliveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.source, self.id)
    }
}

/// `(source, delivery id, handler)`: one unit of dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKey {
    /// The delivery.
    pub delivery: DeliveryKey,
    /// The handler name.
    pub handler: String,
}

/// A pair by its three parts, borrowed: what lets a [`SkipSet`] be asked about a pair a
/// store holds only as text, without building a [`JobKey`] for each entry it walks past.
trait PairParts {
    fn parts(&self) -> (&str, &str, &str);
}

impl PairParts for JobKey {
    fn parts(&self) -> (&str, &str, &str) {
        (&self.delivery.source, &self.delivery.id, &self.handler)
    }
}

impl PairParts for (&str, &str, &str) {
    fn parts(&self) -> (&str, &str, &str) {
        *self
    }
}

impl Hash for dyn PairParts + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn PairParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn PairParts + '_ {}

/// Hashed as its parts, so that a pair given by its borrowed parts finds it in a set.
impl Hash for JobKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl<'a> Borrow<dyn PairParts + 'a> for JobKey {
    fn borrow(&self) -> &(dyn PairParts + 'a) {
        self
    }
}

impl JobKey {
    /// `source \0 id \0 handler`.
    pub fn encode(&self) -> Vec<u8> {
        let mut k = self.delivery.encode();
        k.push(0);
        k.extend_from_slice(self.handler.as_bytes());
        k
    }

    /// Inverse of [`JobKey::encode`].
    pub fn decode(bytes: &[u8]) -> Option<JobKey> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(3, '\0');
        let (source, id, handler) = (parts.next()?, parts.next()?, parts.next()?);
        Some(DeliveryKey::new(source, id).job(handler))
    }

    /// The deterministic idempotency key of this (source, delivery, handler): see
    /// [`crate::domain::idempotency_key`] (not this store key's layout).
    pub fn idempotency_key(&self) -> String {
        crate::domain::idempotency_key(&self.delivery.source, &self.delivery.id, &self.handler)
    }

    /// The `Idempotency-Key` of step `step` of this pair's downstream calls: hex SHA-256 of
    /// `source \0 id \0 handler \0 step` — the pair's key material with the step appended,
    /// so the same for every attempt, restart and replica, different for any other step,
    /// handler or delivery (a step name holds no `\0`); 64 hex characters.
    pub fn step_key(&self, step: &str) -> String {
        crate::domain::step_key(
            &self.delivery.source,
            &self.delivery.id,
            &self.handler,
            step,
        )
    }
}

impl fmt::Display for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.delivery, self.handler)
    }
}

/// The answer given to the first copy, replayed byte for byte to every later one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// JSON body, exactly as sent.
    pub body: String,
}

/// Everything kept about one delivery except its body (stored beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// Source name.
    pub source: String,
    /// Delivery id.
    pub id: String,
    /// Lower-case hex SHA-256 of the raw body.
    pub fingerprint: String,
    /// When the first copy arrived, ms since the epoch.
    pub received_at_ms: u64,
    /// Event type, when the delivery names one.
    pub event_type: Option<String>,
    /// Request headers of the first copy.
    pub headers: Headers,
    /// The first response, once final. `None` while an `ack = "processed"` delivery has not
    /// yet succeeded.
    pub response: Option<StoredResponse>,
    /// `ack = "processed"`: until when the current claimant holds the delivery.
    #[serde(default)]
    pub lease_until_ms: Option<u64>,
    /// `ack = "processed"`: the token of the request that holds the delivery; only it may
    /// renew or release the lease (see [`lease`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_owner: Option<u64>,
    /// Handlers bound to this delivery when it arrived; each has a [`JobState`].
    pub handlers: Vec<String>,
    /// Whether the source deduplicates bodies across ids (invariant 4 is checked for
    /// these records).
    #[serde(default)]
    pub body_dedup: bool,
    /// Set on a delivery that arrived under this id with a body already recorded under
    /// `alias_of` (body dedup): it ran nothing, and its redeliveries are answered as the
    /// first delivery's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias_of: Option<String>,
    /// Handler -> the value its runs of this delivery are ordered by (`order_by`): the
    /// delivery waits in that (handler, value) line until every delivery received before
    /// it in the line is final for the handler.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub order_keys: BTreeMap<String, String>,
    /// The W3C `traceparent` of the request's `receive` span, when traces are exported:
    /// every run of the delivery links to it (on any replica, after any restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
}

impl DeliveryRecord {
    /// The key of this record.
    pub fn key(&self) -> DeliveryKey {
        DeliveryKey::new(&self.source, &self.id)
    }

    /// This delivery as an alias of `first`, the delivery its body first came with (body
    /// dedup, invariant 4): no handlers and no line of its own, `first`'s answer replayed to
    /// it, no lease.
    pub fn as_alias_of(&self, first: &DeliveryRecord) -> DeliveryRecord {
        let mut alias = self.clone();
        alias.alias_of = Some(first.id.clone());
        alias.handlers = Vec::new();
        alias.response = first.response.clone();
        alias.lease_until_ms = None;
        alias.lease_owner = None;
        alias.order_keys.clear();
        alias
    }

    /// Backfill: lists `handler` among this delivery's handlers, in the `order_by` line of
    /// `order_key` if it has one.
    pub fn bind(&mut self, handler: &str, order_key: Option<&str>) {
        self.handlers.push(handler.to_owned());
        if let Some(value) = order_key {
            self.order_keys.insert(handler.to_owned(), value.to_owned());
        }
    }
}

/// What a later copy of a delivery is checked against and answered from: the stored
/// record's key, body fingerprint and first answer. A redelivery needs nothing else, so the
/// sled store reads only these fields of the record (its headers, handlers and lines are
/// skipped, not built: the replay path's largest cost was decoding them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StoredFirst {
    /// Source name.
    pub source: String,
    /// Delivery id.
    pub id: String,
    /// Lower-case hex SHA-256 of the raw body.
    pub fingerprint: String,
    /// The first response, once final (see [`DeliveryRecord::response`]).
    pub response: Option<StoredResponse>,
    /// The delivery this one is an alias of (body dedup), if any.
    #[serde(default)]
    pub alias_of: Option<String>,
}

impl StoredFirst {
    /// The key of the stored record.
    pub fn key(&self) -> DeliveryKey {
        DeliveryKey::new(&self.source, &self.id)
    }
}

impl From<DeliveryRecord> for StoredFirst {
    fn from(record: DeliveryRecord) -> Self {
        StoredFirst {
            source: record.source,
            id: record.id,
            fingerprint: record.fingerprint,
            response: record.response,
            alias_of: record.alias_of,
        }
    }
}

pub use crate::domain::fingerprint;

/// The line of an `order_by` value: the first 16 bytes of its SHA-256, so a line's key is
/// short whatever the value (a collision, out of reach, would only make two values share a
/// line: serialised, never reordered or lost).
pub fn line_id(value: &str) -> [u8; 16] {
    let digest = Sha256::digest(value.as_bytes());
    let mut id = [0; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// Where a (delivery, handler) pair stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for its first run.
    Pending,
    /// A run has started (and, after a crash, was interrupted).
    Running,
    /// Ran successfully; never runs again.
    Succeeded,
    /// Failed; waits in the queue for `next_attempt_ms`.
    Failed,
    /// Gave up (max attempts or a permanent error); kept for inspection and manual retry.
    Dead,
}

/// Per-(delivery, handler) state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    /// Where it stands.
    pub status: JobStatus,
    /// Runs started so far (the attempt number of the latest run).
    pub attempts: u32,
    /// The error of the latest failed run.
    pub last_error: Option<String>,
    /// Due time of its queue entry, if queued (ms since the epoch).
    pub queued_at_ms: Option<u64>,
    /// When it last changed (ms since the epoch).
    pub updated_ms: u64,
    /// `attempts` when an operator last retried it: it gets `max_attempts` more from there.
    #[serde(default)]
    pub retry_base: u32,
    /// While `Running`: who runs it and until when (renewed while the handler runs). A
    /// pair is started only when it has no live lease, so it has one runner at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

impl JobState {
    /// A pair that has not run: pending, no attempt, not queued.
    pub fn pending() -> JobState {
        JobState {
            status: JobStatus::Pending,
            attempts: 0,
            last_error: None,
            queued_at_ms: None,
            updated_ms: 0,
            retry_base: 0,
            lease: None,
        }
    }

    /// Succeeded or dead: never runs again unless an operator retries it.
    pub fn is_final(&self) -> bool {
        matches!(self.status, JobStatus::Succeeded | JobStatus::Dead)
    }
}

/// How a run ended, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Never run again.
    Succeeded,
    /// Run again at this time (ms since the epoch).
    RetryAt {
        /// When.
        due_ms: u64,
        /// Why the run failed.
        error: String,
    },
    /// Give up; keep for inspection.
    Dead {
        /// Why.
        error: String,
    },
    /// Not run (processed mode, a failed sibling): nothing recorded but the error.
    Failed {
        /// Why the run failed.
        error: String,
    },
}

/// A new delivery, ready to be claimed: made only from an [`AuthenticatedDelivery`], so
/// the id claimed is the id the signature covered (invariant 3).
#[derive(Debug, Clone)]
pub struct NewDelivery {
    record: DeliveryRecord,
    body: Bytes,
    enqueue: bool,
}

impl NewDelivery {
    /// A delivery received at `received_at_ms`, bound to `handlers`, not yet answered (see
    /// [`NewDelivery::acknowledged`] and [`NewDelivery::leased`]). With `body_dedup`,
    /// the claim also takes the body's fingerprint within the source: a body already
    /// recorded under another id makes the claim [`Claim::BodyDuplicate`].
    pub fn new(
        delivery: AuthenticatedDelivery,
        received_at_ms: u64,
        handlers: Vec<String>,
        body_dedup: bool,
    ) -> NewDelivery {
        let (source, id, event_type, headers, body) = delivery.into_parts();
        NewDelivery {
            record: DeliveryRecord {
                source,
                id: id.as_str().to_owned(),
                fingerprint: fingerprint(&body),
                received_at_ms,
                event_type,
                headers,
                response: None,
                lease_until_ms: None,
                lease_owner: None,
                handlers,
                body_dedup,
                alias_of: None,
                order_keys: BTreeMap::new(),
                trace_parent: None,
            },
            body,
            enqueue: false,
        }
    }

    /// `ack = "durable"`: the first response is stored with the claim, and every handler is
    /// queued for background dispatch.
    pub fn acknowledged(mut self, response: StoredResponse) -> NewDelivery {
        self.record.response = Some(response);
        self.enqueue = true;
        self
    }

    /// `ack = "processed"`: the claimant holds the delivery under `lease`.
    pub fn leased(mut self, lease: Lease) -> NewDelivery {
        self.record.lease_until_ms = Some(lease.until_ms);
        self.record.lease_owner = Some(lease.owner);
        self.enqueue = false;
        self.record.order_keys.clear();
        self
    }

    /// The `traceparent` of the request's `receive` span, kept for the runs to link to.
    pub fn traced(mut self, trace_parent: Option<String>) -> NewDelivery {
        self.record.trace_parent = trace_parent;
        self
    }

    /// Queued handlers with an `order_by` wait in line behind the earlier deliveries of
    /// the same value: handler -> value. Only for an acknowledged delivery (the runs of a
    /// processed-mode delivery happen while its sender waits, in the order it sends).
    pub fn ordered(mut self, order_keys: BTreeMap<String, String>) -> NewDelivery {
        if self.enqueue {
            self.record.order_keys = order_keys;
        }
        self
    }

    /// The record the claim writes.
    pub fn record(&self) -> &DeliveryRecord {
        &self.record
    }

    /// The raw body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Whether the claim queues every handler (`ack = "durable"`).
    pub fn enqueue(&self) -> bool {
        self.enqueue
    }
}

/// The result of a claim.
#[derive(Debug, Clone)]
pub enum Claim {
    /// The key was free: this request owns the delivery, and it is recorded.
    New,
    /// The key was taken: what the stored record (the first delivery's, where the key is
    /// an alias made by body dedup) answers a later copy with.
    Existing(StoredFirst),
    /// The key was free but the body was already recorded under another id (body dedup):
    /// the new id is recorded as an alias of that delivery, which is returned; nothing runs.
    BodyDuplicate(DeliveryRecord),
}

/// How long a dispatcher leaves a paused handler's pair alone after [`Begin::Busy`] told it
/// the handler is paused (its next passes skip the handler's queue anyway, once they see the
/// pause).
pub const PAUSED_RETRY_MS: u64 = 1000;

/// The result of trying to start a run.
#[derive(Debug, Clone)]
pub enum Begin {
    /// The attempt is counted and leased to the caller: run the handler.
    Started(Box<AttemptContext>),
    /// Another runner holds a live lease on the pair until this time: do not run it now.
    Busy {
        /// Lease end, ms since the epoch.
        until_ms: u64,
    },
    /// Nothing to run: the pair is final, its delivery expired or never landed, or the
    /// queue entry it was taken from has been moved (an operator retry) or removed.
    Skipped,
    /// The attempt is counted and leased to the caller, but the delivery cannot be read
    /// back intact (its body fails its checksum, or its record does not decode): the caller
    /// dead-letters it with this reason through [`JobQueue::finish_attempt`]
    /// (invariant 8), which also hands an `order_by` line on.
    Unreadable {
        /// The attempt number counted.
        attempt: u32,
        /// What could not be read.
        error: String,
    },
    /// The handler runs as many pairs as its `concurrency` allows, across every process
    /// sharing the store: nothing started; try again at this time.
    AtLimit {
        /// When to look again, ms since the epoch.
        retry_at_ms: u64,
    },
}

/// Which pairs a bulk retry requeues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryFilter {
    /// Only this source's deliveries.
    pub source: Option<String>,
    /// Only this handler's pairs.
    pub handler: Option<String>,
    /// `Failed` or `Dead`.
    pub status: JobStatus,
    /// Only deliveries received at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only deliveries received before this time (ms since the epoch).
    pub until_ms: Option<u64>,
}

/// What a backfill did with one stored delivery ([`Operations::bind_handler`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// It had no pair with the handler: it has one now, pending.
    Bound,
    /// It had one already (bound when it arrived, or by an earlier backfill): untouched.
    Already,
    /// Not bound: gone (expired in between), an alias (which runs nothing), or a
    /// processed-mode delivery whose sender has not had its final answer yet.
    Skipped,
}

/// A stored delivery by when it arrived: a backfill's cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// When the first copy arrived, ms since the epoch.
    pub received_at_ms: u64,
    /// Which delivery.
    pub key: DeliveryKey,
}

/// What one retention call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Deliveries removed.
    pub removed: usize,
    /// Expired deliveries kept because a handler of theirs is still due or running.
    pub kept: usize,
    /// Index entries looked at; fewer than the limit means the sweep reached its end.
    pub examined: usize,
}

/// What [`SledInner::check`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Breaches of design.md's invariants 1, 2 and 4, one line each.
    pub violations: Vec<String>,
    /// Harmless leftovers of a crash (index entries that point at nothing…), one line each.
    pub leftovers: Vec<String>,
    /// Deliveries looked at.
    pub deliveries: usize,
    /// Whether the violations and leftovers were repaired (`--repair`).
    pub repaired: bool,
}

/// A body fingerprint kept past its delivery (body dedup, `storage.fingerprint_retention`):
/// enough to answer a captured request as the replay it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptFingerprint {
    /// The id the body first arrived under.
    pub id: String,
    /// When it arrived, ms since the epoch.
    pub received_at_ms: u64,
    /// The first answer.
    pub response: StoredResponse,
}

impl KeptFingerprint {
    /// The expired delivery as far as a replay needs it: its id and its first answer.
    pub fn as_record(&self, source: &str, fingerprint: &str) -> DeliveryRecord {
        DeliveryRecord {
            source: source.to_owned(),
            id: self.id.clone(),
            fingerprint: fingerprint.to_owned(),
            received_at_ms: self.received_at_ms,
            event_type: None,
            headers: Default::default(),
            response: Some(self.response.clone()),
            lease_until_ms: None,
            lease_owner: None,
            handlers: Vec::new(),
            body_dedup: true,
            alias_of: None,
            order_keys: BTreeMap::new(),
            trace_parent: None,
        }
    }
}

/// One thing a store holds, as `store copy` moves it between backends.
#[derive(Debug, Clone)]
pub enum StoredItem {
    /// A delivery (or an alias made by body dedup), its body and every handler's state
    /// (`None`: pending, never run).
    Delivery {
        /// The record (boxed: it is most of the item).
        record: Box<DeliveryRecord>,
        /// The raw body (empty for an alias).
        body: Bytes,
        /// `(handler, state)` for each of `record.handlers`.
        jobs: Vec<(String, Option<JobState>)>,
        /// The call journal's steps of its handlers.
        calls: Vec<JournalEntry>,
    },
    /// A body fingerprint kept past its delivery.
    Fingerprint {
        /// The source.
        source: String,
        /// Hex SHA-256 of the body.
        fingerprint: String,
        /// What is remembered.
        kept: KeptFingerprint,
    },
}

/// The result of trying to take over an unfinished `ack = "processed"` delivery.
#[derive(Debug, Clone)]
pub enum TakeOver {
    /// The caller now holds the lease; the record as it stands.
    Acquired(DeliveryRecord),
    /// Someone else holds it until this time (ms since the epoch).
    Held {
        /// Lease end.
        until_ms: u64,
    },
    /// The delivery became final meanwhile.
    Final(DeliveryRecord),
}

/// Where one handler's pairs stand (`GET /admin/handlers`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HandlerStats {
    /// Pairs in the queue (due now or later, running included).
    pub queued: usize,
    /// Pairs waiting in an `order_by` line for an earlier delivery of their key (not queued
    /// until their turn).
    pub waiting: usize,
    /// Pairs running (or interrupted, until taken over).
    pub running: usize,
    /// Pairs that failed and wait for a retry.
    pub failed: usize,
    /// Dead-lettered pairs.
    pub dead: usize,
    /// The error of the latest failed or dead run.
    pub last_error: Option<String>,
}

/// A queue entry: a job due at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    /// When it is due (ms since the epoch).
    pub due_ms: u64,
    /// Which job.
    pub job: JobKey,
}

/// The pairs a queue read passes over (those running here, or held by another runner). A
/// store asks about the entries it walks past by their parts
/// ([`SkipSet::contains_pair`]), without building a key for each: the entries being run stay
/// at the front of the queue until their outcome is written, and every read walks past them.
#[derive(Debug, Clone, Default)]
pub struct SkipSet {
    keys: crate::collections::FastHashSet<JobKey>,
}

impl SkipSet {
    /// Adds `job`; false if it was there.
    pub fn insert(&mut self, job: JobKey) -> bool {
        self.keys.insert(job)
    }

    /// Removes `job`; false if it was not there.
    pub fn remove(&mut self, job: &JobKey) -> bool {
        self.keys.remove(job)
    }

    /// Whether `job` is passed over.
    pub fn contains(&self, job: &JobKey) -> bool {
        self.keys.contains(job)
    }

    /// Whether the pair (`source`, `id`, `handler`) is passed over.
    pub fn contains_pair(&self, source: &str, id: &str, handler: &str) -> bool {
        !self.keys.is_empty() && self.keys.contains(&(source, id, handler) as &dyn PairParts)
    }

    /// The pairs passed over, in no order.
    pub fn iter(&self) -> impl Iterator<Item = &JobKey> {
        self.keys.iter()
    }

    /// How many pairs are passed over.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl FromIterator<JobKey> for SkipSet {
    fn from_iter<I: IntoIterator<Item = JobKey>>(iter: I) -> Self {
        let mut set = SkipSet::default();
        for job in iter {
            set.insert(job);
        }
        set
    }
}

/// Everything a handler run needs, read at the start of an attempt.
#[derive(Debug, Clone)]
pub struct AttemptContext {
    /// The delivery record (shared with the copy a first run keeps in memory).
    pub record: std::sync::Arc<DeliveryRecord>,
    /// The raw body.
    pub body: Bytes,
    /// The attempt number of this run (1 for the first).
    pub attempt: u32,
    /// Attempts since the pair was last retried by an operator (or since it arrived).
    pub attempts_in_round: u32,
}

/// Where a delivery stands, from its handlers' states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Some handler has not run yet.
    Pending,
    /// Some handler is running (or was, when the process stopped).
    Running,
    /// Some handler failed and waits for a retry.
    Failed,
    /// Some handler is dead-lettered.
    Dead,
    /// Every handler succeeded (or none matched).
    Succeeded,
    /// `ack = "processed"` and not final yet.
    InProgress,
}

impl DeliveryStatus {
    /// The status of a delivery from its record and its jobs' states (worst first).
    pub fn of(record: &DeliveryRecord, jobs: &[Option<JobState>]) -> DeliveryStatus {
        // A job without a state has not run yet: pending.
        let has = |s: JobStatus| {
            jobs.iter()
                .any(|j| j.as_ref().map_or(JobStatus::Pending, |j| j.status) == s)
        };
        if has(JobStatus::Dead) {
            DeliveryStatus::Dead
        } else if has(JobStatus::Failed) {
            if record.response.is_none() {
                DeliveryStatus::InProgress
            } else {
                DeliveryStatus::Failed
            }
        } else if has(JobStatus::Running) {
            DeliveryStatus::Running
        } else if has(JobStatus::Pending) {
            DeliveryStatus::Pending
        } else if record.response.is_none() {
            DeliveryStatus::InProgress
        } else {
            DeliveryStatus::Succeeded
        }
    }
}

/// One delivery of a listing.
#[derive(Debug, Clone)]
pub struct DeliverySummary {
    /// The record.
    pub record: DeliveryRecord,
    /// Its status.
    pub status: DeliveryStatus,
}

/// Where a listing goes on from: opaque to callers, who carry it as a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(Vec<u8>);

impl Cursor {
    /// A cursor over the backend's own position bytes.
    pub fn from_position(position: Vec<u8>) -> Cursor {
        Cursor(position)
    }

    /// The backend's position bytes.
    pub fn position(&self) -> &[u8] {
        &self.0
    }

    /// The cursor as text, to hand to a client.
    pub fn to_token(&self) -> String {
        hex::encode(&self.0)
    }

    /// A cursor a client handed back; `None` when the text is not one.
    pub fn from_token(token: &str) -> Option<Cursor> {
        hex::decode(token).ok().map(Cursor)
    }
}

/// A page of deliveries, newest first.
#[derive(Debug, Clone)]
pub struct Page {
    /// The deliveries.
    pub deliveries: Vec<DeliverySummary>,
    /// Where the next page starts; `None` on the last.
    pub next: Option<Cursor>,
}

/// The storage contract, in roles: sled is the embedded default; a shared backend
/// (PostgreSQL) can serve several replicas behind the same traits. A part of the service
/// asks for the role it uses (`Arc<dyn JobQueue>`); what holds the whole store uses
/// `Arc<dyn DeliveryStore>`, which every store that plays all the roles is.
///
/// Every write method returns once the write is as durable as `storage.durability` says.
pub trait DeliveryStore: Claims + JobQueue + CallJournal + Operations + Maintenance {}

impl<T: Claims + JobQueue + CallJournal + Operations + Maintenance> DeliveryStore for T {}

/// Taking deliveries in: the claim that decides a `(source, id)` once, the reads of a
/// stored delivery, and `ack = "processed"`'s delivery lease (take-over, renewal, release).
#[async_trait]
pub trait Claims: Send + Sync + 'static {
    /// Atomically claims `(source, id)`: writes the record, body, queue entries and indexes
    /// if the key is free, else returns the existing record. Any number of concurrent
    /// claims of one key yield exactly one [`Claim::New`]. A returned record is durable.
    async fn claim(&self, new: NewDelivery) -> Result<Claim, StoreError>;

    /// What a redelivery of `key` is answered from, when the store can tell without a
    /// write or a round trip: ingest asks before it builds the new delivery's record, so
    /// a redelivery costs one read. `None` means "not stored, or not known here" — the
    /// claim decides either way. A returned answer is durable, as the claim's is.
    ///
    /// The default knows nothing (PostgreSQL: a probe would be a second round trip for
    /// every new delivery); sled reads its tree.
    async fn stored_first(&self, key: &DeliveryKey) -> Result<Option<StoredFirst>, StoreError> {
        let _ = key;
        Ok(None)
    }

    /// Whether a [`Claims::stored_first`] since the last call put a pair back in the queue
    /// (sled, after an unclean stop: the record of a redelivery that the start-up repair
    /// could not find; see its `check`): the caller then wakes the dispatcher. The default
    /// never does.
    fn take_requeued_by_reads(&self) -> bool {
        false
    }

    /// Reads a record.
    async fn record(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError>;

    /// Reads a delivery's raw body.
    async fn body(&self, key: &DeliveryKey) -> Result<Option<Bytes>, StoreError>;

    /// `ack = "processed"`: takes over an unfinished delivery for `lease` once the current
    /// holder's lease is [`TAKE_OVER_GRACE_MS`] past its end ([`DeliveryRecord::take_over`]).
    async fn take_over(
        &self,
        key: &DeliveryKey,
        now_ms: u64,
        lease: Lease,
    ) -> Result<TakeOver, StoreError>;

    /// `ack = "processed"`: extends `lease.owner`'s lease while its handlers run; false
    /// (nothing changed) when the delivery is final or gone, or another owner holds it.
    async fn renew_lease(&self, key: &DeliveryKey, lease: Lease) -> Result<bool, StoreError>;

    /// `ack = "processed"`: ends `owner`'s lease, storing the final response if there is
    /// one; false (nothing changed) when `owner` no longer holds it.
    async fn release(
        &self,
        key: &DeliveryKey,
        owner: u64,
        response: Option<StoredResponse>,
    ) -> Result<bool, StoreError>;
}

/// The dispatcher's side: the queue of (delivery, handler) pairs, the start of a run under
/// its lease, and how it ended.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Reads a job's state.
    async fn job(&self, key: &JobKey) -> Result<Option<JobState>, StoreError>;

    /// Up to `limit` queue entries due at or before `now_ms`, earliest first, skipping the
    /// jobs in `skip` (those this process is running or has deferred).
    async fn due_jobs(
        &self,
        now_ms: u64,
        limit: usize,
        skip: &SkipSet,
    ) -> Result<Vec<QueuedJob>, StoreError>;

    /// Due time of the earliest queue entry not in `skip`.
    async fn next_due_ms(&self, skip: &SkipSet) -> Result<Option<u64>, StoreError>;

    /// [`JobQueue::due_jobs`] of one handler only: what the dispatcher reads, for the
    /// handlers it may run now, so that a paused or limited handler's backlog costs nothing.
    async fn due_jobs_of(
        &self,
        handler: &str,
        now_ms: u64,
        limit: usize,
        skip: &SkipSet,
    ) -> Result<Vec<QueuedJob>, StoreError>;

    /// [`JobQueue::next_due_ms`] of one handler only.
    async fn next_due_of(&self, handler: &str, skip: &SkipSet) -> Result<Option<u64>, StoreError>;

    /// [`JobQueue::due_jobs_of`], and the due time of the first entry after those
    /// returned (not in `skip`; due or not, `None`: there is none): what the dispatcher
    /// needs to know when to look again, in one read where the two calls make two.
    ///
    /// `after` is a hint: the read may start past that entry instead of at the front of the
    /// queue, so that it does not walk again past the entries being run (they stay at the
    /// front until their outcome is written). Entries queued before it are then not seen:
    /// the caller reads from the front now and then. The default ignores it and makes the
    /// two calls; a store whose read walks past the running entries does better.
    async fn due_jobs_and_next_of(
        &self,
        handler: &str,
        now_ms: u64,
        limit: usize,
        skip: &SkipSet,
        after: Option<&QueuedJob>,
    ) -> Result<(Vec<QueuedJob>, Option<u64>), StoreError> {
        let _ = after;
        let due = self.due_jobs_of(handler, now_ms, limit, skip).await?;
        let next = self.next_due_past(handler, skip, &due).await?;
        Ok((due, next))
    }

    /// [`JobQueue::next_due_of`] past `skip` and the entries `due` just read.
    async fn next_due_past(
        &self,
        handler: &str,
        skip: &SkipSet,
        due: &[QueuedJob],
    ) -> Result<Option<u64>, StoreError> {
        let mut past = skip.clone();
        for q in due {
            past.insert(q.job.clone());
        }
        self.next_due_of(handler, &past).await
    }

    /// Starts a run of `job`: marks it running under a lease until `lease_until_ms` and
    /// counts the attempt, durably, so a run interrupted by a crash is retried with a
    /// higher attempt number. `queued_due` is the queue entry it was taken from (`None`
    /// for an inline run in `ack = "processed"` mode).
    ///
    /// One check-and-set under the delivery's lock: a pair running under a live lease is
    /// [`Begin::Busy`], never started twice; so is a pair of a paused handler (for
    /// [`PAUSED_RETRY_MS`]): no run starts once a pause has been recorded; a pair that is final, whose delivery is gone,
    /// or whose queue entry was moved meanwhile is [`Begin::Skipped`] (a stale entry is
    /// removed).
    async fn begin_attempt(
        &self,
        job: &JobKey,
        queued_due: Option<u64>,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Result<Begin, StoreError>;

    /// [`JobQueue::begin_attempt`], counting the handler's `concurrency` across every
    /// process that shares the store: with `concurrency` and as many of the handler's pairs
    /// running under leases that block a take-over, nothing starts and the answer is
    /// [`Begin::AtLimit`]. A store of one process leaves the limit to the runner's gate
    /// (`crate::dispatch::turns`), as the default does.
    async fn begin_limited_attempt(
        &self,
        job: &JobKey,
        queued_due: Option<u64>,
        now_ms: u64,
        lease_until_ms: u64,
        concurrency: Option<usize>,
    ) -> Result<Begin, StoreError> {
        let _ = concurrency;
        self.begin_attempt(job, queued_due, now_ms, lease_until_ms)
            .await
    }

    /// `rate` across every process sharing the store: reserves the next start of `handler`,
    /// `interval_ms` after the one reserved before it (a burst of one), and returns when it
    /// may be (ms since the epoch). `None`: the store is this process's alone, and the
    /// runner keeps the spacing in memory (the default).
    async fn reserve_start(
        &self,
        handler: &str,
        interval_ms: u64,
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let _ = (handler, interval_ms, now_ms);
        Ok(None)
    }

    /// Extends this process's lease on running attempt `attempt`; false (nothing changed)
    /// when the attempt is no longer the current one or another runner holds the pair: the
    /// attempt number only grows, so it fences a runner that was taken over.
    async fn renew_job_lease(
        &self,
        job: &JobKey,
        attempt: u32,
        lease_until_ms: u64,
    ) -> Result<bool, StoreError>;

    /// Records how attempt `attempt` ended, moving or removing its queue entry. The outcome
    /// of an attempt that is no longer the current one is ignored, except a success; a pair
    /// that succeeded stays succeeded. A backend may return before the outcome is durable:
    /// lost in a crash, the pair runs again with `attempt + 1` (its start was durable) and
    /// the same idempotency key, which the contract allows.
    async fn finish_attempt(
        &self,
        job: &JobKey,
        attempt: u32,
        outcome: AttemptOutcome,
        now_ms: u64,
    ) -> Result<(), StoreError>;

    /// The handlers with queue entries (the dispatcher also serves those no longer
    /// configured: their pairs die with an error that says so).
    async fn queued_handlers(&self) -> Result<Vec<String>, StoreError>;

    /// The handlers an operator has paused: their pairs stay queued and none starts.
    async fn paused_handlers(&self) -> Result<HashSet<String>, StoreError>;

    /// Notified when new work may have been queued by another process sharing the store
    /// (PostgreSQL's LISTEN/NOTIFY); `None` for a store only this process writes. The
    /// dispatcher then also polls now and then, in case a notice is lost.
    fn work_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
}

/// The downstream call journal (`crate::calls`): the kept answer of each step of a pair.
#[async_trait]
pub trait CallJournal: Send + Sync + 'static {
    /// The call journal's answer for `step` of pair `job`, if a run kept one.
    async fn journal_get(&self, job: &JobKey, step: &str)
    -> Result<Option<CallRecord>, StoreError>;

    /// Keeps `record` as the answer of `step` of pair `job` unless one is kept already
    /// (first writer wins); returns what is kept. Does not wait for the disk.
    async fn journal_put(
        &self,
        job: &JobKey,
        step: &str,
        record: &CallRecord,
    ) -> Result<CallRecord, StoreError>;

    /// Counts one replay of the kept answer of `step` of pair `job` (best effort, not
    /// waiting for the disk; nothing when no answer is kept).
    async fn journal_replayed(&self, job: &JobKey, step: &str) -> Result<(), StoreError>;

    /// Every step kept for delivery `key`, by handler then step name.
    async fn journal_of(&self, key: &DeliveryKey) -> Result<Vec<JournalEntry>, StoreError>;
}

/// What an operator does and reads, through the admin API, the console and the CLI:
/// listings, retries, pauses, counts, backfill.
#[async_trait]
pub trait Operations: Send + Sync + 'static {
    /// Deliveries newest first, optionally of one source and one status, `limit` at most,
    /// starting after `cursor` (from the previous page).
    async fn list(
        &self,
        source: Option<&str>,
        status: Option<DeliveryStatus>,
        limit: usize,
        cursor: Option<&Cursor>,
    ) -> Result<Page, StoreError>;

    /// Makes every handler of a delivery that is not succeeded due now: pending ones
    /// (with or without a state), failed ones and dead ones (with a fresh `max_attempts`).
    /// A pair running under a live lease and succeeded pairs are untouched. The queue
    /// entry a dispatcher may already have read is moved, so a scheduled retry racing
    /// this one runs the pair once (invariant 5). Returns the handlers now due.
    async fn retry(&self, key: &DeliveryKey, now_ms: u64) -> Result<Vec<String>, StoreError>;

    /// Bulk operator retry: every pair in `filter.status` (failed or dead) of the deliveries
    /// the filter selects, due now with a fresh `max_attempts`, as [`Operations::retry`]
    /// does for one delivery. Returns how many pairs were requeued.
    async fn retry_all(&self, filter: &RetryFilter, now_ms: u64) -> Result<usize, StoreError>;

    /// Jobs waiting in the queue (due or not), per handler (handlers with none are left
    /// out); their sum is the queue's depth.
    async fn queue_depths(&self) -> Result<Vec<(String, usize)>, StoreError>;

    /// Per handler with anything queued, running, failed or dead: those counts and the
    /// latest error.
    /// `now_ms`: the time the counts are taken at (a pair's lease is judged against it).
    async fn handler_stats(&self, now_ms: u64)
    -> Result<HashMap<String, HandlerStats>, StoreError>;

    /// Pauses or resumes a handler, durably (a pause survives restarts).
    async fn set_paused(&self, handler: &str, paused: bool, now_ms: u64) -> Result<(), StoreError>;

    /// Dead-lettered (delivery, handler) pairs.
    async fn dead_letters(&self) -> Result<usize, StoreError>;

    /// Up to `limit` stored deliveries received in `[since_ms, until_ms)`, oldest first
    /// (then by key), after `after` (the last of the previous batch).
    async fn received_between(
        &self,
        since_ms: u64,
        until_ms: u64,
        after: Option<&Received>,
        limit: usize,
    ) -> Result<Vec<Received>, StoreError>;

    /// Backfill: binds `handler` to each delivery of `batch` (with the value its runs are
    /// ordered by, if the handler has `order_by` and the body holds it) that has no pair
    /// with it yet, as a claim would have — a pending pair, due at its received_at, or
    /// waiting in its `order_by` line behind the pairs of that line still live. An existing
    /// pair is never touched. Durable (as configured) before it returns.
    async fn bind_handler(
        &self,
        handler: &str,
        batch: &[(DeliveryKey, Option<String>)],
    ) -> Result<Vec<Binding>, StoreError>;
}

/// Keeping the store: retention, health, flushing at shutdown.
#[async_trait]
pub trait Maintenance: Send + Sync + 'static {
    /// Removes up to `limit` deliveries received before `cutoff_ms` with their bodies, jobs
    /// and queue entries, oldest first. A delivery with a handler still due or running is
    /// kept until that handler is final (invariant 2); the sweep moves past it and comes
    /// back to it on a later pass.
    /// `now_ms` is the time of the sweep (a lease is judged live against it).
    async fn expire(
        &self,
        now_ms: u64,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Expired, StoreError>;

    /// Forgets up to `limit` body fingerprints kept past their delivery (body dedup) whose
    /// delivery was received before `cutoff_ms`. Returns how many were looked at.
    async fn expire_fingerprints(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError>;

    /// Whether the store accepts writes (false after a failed flush).
    async fn is_healthy(&self) -> bool;

    /// Flushes everything to disk (at shutdown).
    async fn flush(&self) -> Result<(), StoreError>;

    /// Ends the store's background tasks (PostgreSQL: the migrations retry and the LISTEN
    /// task): the last step of the shutdown sequence, after [`Maintenance::flush`], so that
    /// none outlives the service that started it. The store still answers calls after it,
    /// without them. The default has none to end.
    async fn close(&self) {}

    /// `store copy`: up to `limit` stored items from `from` on, and where the next page
    /// starts (`None` once everything was read). Each delivery comes with every handler's
    /// state and its call journal. The store should not be written meanwhile.
    async fn export_page(
        &self,
        from: &ExportPosition,
        limit: usize,
    ) -> Result<(Vec<StoredItem>, Option<ExportPosition>), StoreError>;

    /// `store copy`: writes `items` exported from another store; an item whose key is
    /// already here is left as it is. A pair in an `order_by` line comes in parked (see
    /// [`Maintenance::finish_import`]); a lease of the old store is dropped (its process has
    /// stopped). Returns how many items were written.
    async fn import(&self, items: &[StoredItem], now_ms: u64) -> Result<usize, StoreError>;

    /// `store copy`, once every item is in: gives each `order_by` line that nobody runs its
    /// first pair to run.
    async fn finish_import(&self, now_ms: u64) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_changes_no_idempotency_key() {
        // Computed by the binary of 2026-12-04 (before the formula moved to `domain`):
        // every stored pair keeps the key its handler already sent.
        let job = DeliveryKey::new("credicorp", "msg_1").job("open-case");
        assert_eq!(
            job.idempotency_key(),
            "643ed3651b6fe3a825a68843a33a1fabeed6c049d805e35ebf56153f2b3abce0"
        );
        assert_eq!(
            job.step_key("create-payment-link"),
            "dfe00ff56ebc8cb5bebabaef6bad7f721db6b0cf51e94c099ffdf90633b218ac"
        );
    }

    #[test]
    fn job_keys_round_trip_and_idempotency_keys_are_distinct_and_short() {
        let a = DeliveryKey::new("credicorp", "msg_1").job("log-all");
        assert_eq!(JobKey::decode(&a.encode()), Some(a.clone()));
        let b = DeliveryKey::new("credicorp", "msg_1").job("other");
        let c = DeliveryKey::new("credicorp", "msg_2").job("log-all");
        assert_eq!(a.idempotency_key(), a.clone().idempotency_key());
        assert_ne!(a.idempotency_key(), b.idempotency_key());
        assert_ne!(a.idempotency_key(), c.idempotency_key());
        assert!(a.idempotency_key().len() <= 64);
    }

    /// A skip set answers for a pair given by its borrowed parts exactly as for its key,
    /// and parts that only concatenate alike are different pairs.
    #[test]
    fn a_skip_set_knows_a_pair_by_its_parts() {
        let mut skip = SkipSet::default();
        assert!(!skip.contains_pair("s", "a", "h"));
        skip.insert(DeliveryKey::new("s", "a").job("h"));
        skip.insert(DeliveryKey::new("s", "b\u{1}").job("h"));
        assert!(skip.contains_pair("s", "a", "h"));
        assert!(skip.contains_pair("s", "b\u{1}", "h"));
        assert!(!skip.contains_pair("s", "a", "h2"));
        assert!(!skip.contains_pair("s", "ah", ""));
        assert!(!skip.contains_pair("sa", "", "h"));
        skip.remove(&DeliveryKey::new("s", "a").job("h"));
        assert!(!skip.contains_pair("s", "a", "h"));
        assert_eq!(skip.len(), 1);
    }
}
