//! The queue entries of first runs, kept in memory while dispatch keeps up.
//!
//! Why: a delivery used to cost five sled writes, two of them its handler's queue entry —
//! written by the claim, removed by the run that succeeded a few milliseconds later
//! (BENCHMARKS.md, session 12). sled is opened by one process at a time, so an entry only
//! this process reads need not be on disk while the process lives; what must survive is
//! the pair's way to run after a crash, and the store already has one for that: the
//! start-up repair (`check.rs`) re-reads every delivery received since its watermark and
//! puts back the entry of an acknowledged pair that has none.
//!
//! How:
//! - A claim puts the first-run entry of each handler bound without `order_by` here, not
//!   in the `handler_queue` tree (same key layout). Every read of the queue (dispatch's
//!   scan, the stale check of a start, `store check`'s and retention's "has a way to run",
//!   the queue depths) sees both; every removal removes from here first and touches the
//!   tree only when the entry was not here. A run that succeeds thus writes only its
//!   outcome; one that fails moves its entry to the tree as before (a retry is durable).
//! - The watermark never passes the oldest entry held here (`SledInner::advance_watermark`),
//!   so every entry a crash loses lies after it, and the next opening puts it back in the
//!   tree. An entry held longer than the watermark's lag (a paused handler's, a backlog's)
//!   is written to the tree when the watermark advances, so that it does not hold the
//!   watermark back: the start-up repair's scan stays as short as it was. A clean close
//!   writes what is here to the tree first (`SledInner::persist_first_runs`), so a restart
//!   repairs nothing.
//! - At most [`FIRST_RUNS_KEPT`] entries: past that, a claim writes its entry to the tree
//!   as before, so a backlog costs disk, not memory. Each entry carries its delivery as
//!   claimed ([`Claimed`]) while [`CLAIMED_BYTES_KEPT`] allows, so that the start of its run
//!   reads nothing back; a claim cut before its record takes its entries out again
//!   (`claim.rs`), so no start is handed a delivery that was never stored.
//!
//! A pair whose entry is here has no job state written: every operation that writes one
//! (a run's outcome, an operator retry, retention) moves or removes the entry in the same
//! locked step, so a start of such a pair skips the read of `jobs` (checked in debug builds).
//!
//! Entries of pairs in an `order_by` line stay in the tree: their starts wait for the disk
//! anyway, and the line's repair has its own rules (`order.rs`).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::encoding::split_job_queue_key;
use crate::store::DeliveryRecord;

/// How many first-run entries are kept in memory at most (~100 bytes each). The saving is
/// for a dispatcher that keeps up, whose entries live milliseconds: a backlog past this
/// goes to disk as before, so memory stays bounded however far behind dispatch falls.
pub(super) const FIRST_RUNS_KEPT: usize = 16_384;

/// How many bytes of claimed deliveries (record and body) are kept beside their entries
/// at most; entries past it keep only their key, and their start reads the delivery. A
/// dispatcher that keeps up at 20 000 deliveries/s has a few hundred waiting at any time.
pub(super) const CLAIMED_BYTES_KEPT: usize = 4 << 20;

/// Keys read from memory per lock taken by a scan.
const CHUNK: usize = 128;

/// A delivery as its claim wrote it, kept beside its first runs' entries so that their
/// starts need not read it back and decode it: the body never changes, nor the record's
/// fields a run reads (handlers are only added, by a backfill, for other pairs).
pub(super) struct Claimed {
    pub(super) record: Arc<DeliveryRecord>,
    pub(super) body: Bytes,
}

impl Claimed {
    /// What it costs to keep, roughly.
    fn size(&self) -> usize {
        let headers: usize = self
            .record
            .headers
            .0
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        self.body.len() + headers + 256
    }
}

/// The in-memory part of the queue: `handler_queue` keys (handler `\0` due ms job key),
/// each with its claimed delivery while [`CLAIMED_BYTES_KEPT`] allows.
pub(super) struct FirstRuns {
    entries: Mutex<Entries>,
    capacity: usize,
    claimed_budget: usize,
}

#[derive(Default)]
struct Entries {
    keys: BTreeMap<Vec<u8>, Option<Arc<Claimed>>>,
    claimed_bytes: usize,
}

impl FirstRuns {
    pub(super) fn new(capacity: usize, claimed_budget: usize) -> Self {
        FirstRuns {
            entries: Mutex::new(Entries::default()),
            capacity,
            claimed_budget,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // A panic while holding this lock leaves a map that is still consistent.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `key` here, with `claimed` while the budget allows; gives the key back when
    /// the set is full (the caller writes it to the tree instead).
    pub(super) fn insert(&self, key: Vec<u8>, claimed: &Arc<Claimed>) -> Result<(), Vec<u8>> {
        let mut entries = self.lock();
        if entries.keys.len() >= self.capacity {
            return Err(key);
        }
        let size = claimed.size();
        let kept = (entries.claimed_bytes + size <= self.claimed_budget).then(|| {
            entries.claimed_bytes += size;
            claimed.clone()
        });
        if let Some(Some(old)) = entries.keys.insert(key, kept) {
            entries.claimed_bytes -= old.size();
        }
        Ok(())
    }

    pub(super) fn contains(&self, key: &[u8]) -> bool {
        self.lock().keys.contains_key(key)
    }

    /// `None` when `key` is not here; else its claimed delivery, if kept.
    pub(super) fn get(&self, key: &[u8]) -> Option<Option<Arc<Claimed>>> {
        self.lock().keys.get(key).cloned()
    }

    /// Removes `key`; whether it was here.
    pub(super) fn remove(&self, key: &[u8]) -> bool {
        let mut entries = self.lock();
        match entries.keys.remove(key) {
            Some(kept) => {
                if let Some(claimed) = kept {
                    entries.claimed_bytes -= claimed.size();
                }
                true
            }
            None => false,
        }
    }

    /// The keys in `[start, end)`, in order, read a chunk at a time (no lock is held
    /// between two calls of `next`' refills).
    pub(super) fn range(&self, start: Vec<u8>, end: Vec<u8>) -> MemoryRange<'_> {
        MemoryRange {
            runs: self,
            from: Bound::Included(start),
            end,
            buffered: VecDeque::new(),
            exhausted: false,
        }
    }

    /// The keys here due before `cutoff` (ms), in order.
    pub(super) fn due_before(&self, cutoff: u64) -> Vec<Vec<u8>> {
        self.lock()
            .keys
            .keys()
            .filter(|k| split_job_queue_key(k).is_some_and(|(due, _)| due < cutoff))
            .cloned()
            .collect()
    }

    /// Every key here, in order (the admin's handler statistics, a clean close).
    pub(super) fn snapshot(&self) -> Vec<Vec<u8>> {
        self.lock().keys.keys().cloned().collect()
    }

    /// The handlers with an entry here.
    pub(super) fn handlers(&self) -> Vec<Vec<u8>> {
        self.handler_fronts()
            .into_iter()
            .filter_map(|k| {
                let end = k.iter().position(|b| *b == 0)?;
                Some(k[..end].to_vec())
            })
            .collect()
    }

    /// The earliest due time of an entry here: each handler's first key holds its least.
    pub(super) fn oldest_due(&self) -> Option<u64> {
        self.handler_fronts()
            .iter()
            .filter_map(|k| split_job_queue_key(k).map(|(due, _)| due))
            .min()
    }

    /// The first key of each handler: one seek per handler, not a walk of every entry.
    fn handler_fronts(&self) -> Vec<Vec<u8>> {
        let entries = self.lock();
        let mut fronts: Vec<Vec<u8>> = Vec::new();
        let mut from: Bound<Vec<u8>> = Bound::Unbounded;
        while let Some((k, _)) = entries
            .keys
            .range::<Vec<u8>, _>((from.clone(), Bound::Unbounded))
            .next()
        {
            let Some(end) = k.iter().position(|b| *b == 0) else {
                break;
            };
            // Past every key of this handler: `handler \x01` sorts after `handler \0 …`.
            let mut next = k[..end].to_vec();
            next.push(1);
            from = Bound::Included(next);
            fronts.push(k.clone());
        }
        fronts
    }

    /// How many entries `prefix` (a handler's) has here.
    pub(super) fn count_with_prefix(&self, prefix: &[u8]) -> usize {
        self.lock()
            .keys
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .count()
    }
}

/// A scan of [`FirstRuns`] that takes the lock once per [`CHUNK`] keys.
pub(super) struct MemoryRange<'a> {
    runs: &'a FirstRuns,
    from: Bound<Vec<u8>>,
    end: Vec<u8>,
    buffered: VecDeque<Vec<u8>>,
    exhausted: bool,
}

impl Iterator for MemoryRange<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.buffered.is_empty() && !self.exhausted {
            let entries = self.runs.lock();
            let bounds = (self.from.clone(), Bound::Excluded(self.end.clone()));
            self.buffered.extend(
                entries
                    .keys
                    .range::<Vec<u8>, _>(bounds)
                    .take(CHUNK)
                    .map(|(k, _)| k.clone()),
            );
            self.exhausted = self.buffered.len() < CHUNK;
            if let Some(last) = self.buffered.back() {
                self.from = Bound::Excluded(last.clone());
            }
        }
        self.buffered.pop_front()
    }
}

/// A key of the merged queue: from the tree or from memory.
pub(super) enum QueueKey {
    Durable(sled::IVec),
    Memory(Vec<u8>),
}

impl std::ops::Deref for QueueKey {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            QueueKey::Durable(k) => k,
            QueueKey::Memory(k) => k,
        }
    }
}

/// The tree's keys and memory's, merged in key order (a key in both, as while a close
/// writes memory to the tree, comes once).
pub(super) fn merge<'a>(
    durable: impl Iterator<Item = sled::Result<sled::IVec>> + 'a,
    memory: MemoryRange<'a>,
) -> impl Iterator<Item = sled::Result<QueueKey>> + 'a {
    let mut durable = durable.peekable();
    let mut memory = memory.peekable();
    std::iter::from_fn(move || {
        let take_memory = match (durable.peek(), memory.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) | (Some(Ok(_)), None) => false,
            (None, Some(_)) => true,
            (Some(Ok(d)), Some(m)) => {
                if d.as_ref() == m.as_slice() {
                    memory.next();
                    false
                } else {
                    m.as_slice() < d.as_ref()
                }
            }
        };
        if take_memory {
            memory.next().map(|k| Ok(QueueKey::Memory(k)))
        } else {
            durable.next().map(|k| k.map(QueueKey::Durable))
        }
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::store::sled::encoding::job_queue_key;

    fn key(handler: &str, due: u64, id: &str) -> Vec<u8> {
        job_queue_key(due, format!("src\0{id}\0{handler}").as_bytes())
    }

    /// A claimed delivery of `body_len` bytes.
    pub(super) fn claimed(body_len: usize) -> Arc<Claimed> {
        let record: DeliveryRecord = serde_json::from_value(serde_json::json!({
            "source": "src", "id": "x", "fingerprint": "f", "received_at_ms": 1,
            "event_type": null, "headers": [], "response": null, "handlers": ["a"]
        }))
        .expect("record");
        Arc::new(Claimed {
            record: Arc::new(record),
            body: Bytes::from(vec![b'x'; body_len]),
        })
    }

    #[test]
    fn a_full_set_gives_the_key_back() {
        let runs = FirstRuns::new(2, 1 << 20);
        let c = claimed(10);
        assert!(runs.insert(key("a", 1, "x"), &c).is_ok());
        assert!(runs.insert(key("a", 2, "y"), &c).is_ok());
        assert_eq!(runs.insert(key("a", 3, "z"), &c), Err(key("a", 3, "z")));
        assert!(runs.remove(&key("a", 1, "x")));
        assert!(!runs.remove(&key("a", 1, "x")));
        assert!(runs.insert(key("a", 3, "z"), &c).is_ok());
    }

    #[test]
    fn claimed_deliveries_are_kept_within_their_budget_only() {
        let big = claimed(1000);
        let runs = FirstRuns::new(100, 2 * big.size());
        for n in 0..3 {
            runs.insert(key("a", n, "x"), &big).expect("room");
        }
        // The third is queued all the same, without its delivery.
        assert!(runs.get(&key("a", 0, "x")).expect("here").is_some());
        assert!(runs.get(&key("a", 1, "x")).expect("here").is_some());
        assert!(runs.get(&key("a", 2, "x")).expect("here").is_none());
        assert!(runs.get(&key("a", 9, "x")).is_none());
        // Removing one gives its bytes back.
        assert!(runs.remove(&key("a", 0, "x")));
        runs.insert(key("a", 3, "x"), &big).expect("room");
        assert!(runs.get(&key("a", 3, "x")).expect("here").is_some());
    }

    #[test]
    fn a_range_reads_past_one_chunk_in_order() {
        let runs = FirstRuns::new(10_000, 0);
        let c = claimed(0);
        for n in 0..(CHUNK as u64 * 3 + 5) {
            runs.insert(key("a", 1000 + n, "x"), &c).expect("room");
            runs.insert(key("b", n, "y"), &c).expect("room");
        }
        let start = b"a\0".to_vec();
        let end = b"a\x01".to_vec();
        let got: Vec<Vec<u8>> = runs.range(start, end).collect();
        assert_eq!(got.len(), CHUNK * 3 + 5);
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        assert!(got.iter().all(|k| k.starts_with(b"a\0")));
        assert_eq!(runs.handlers(), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(runs.oldest_due(), Some(0));
        assert_eq!(runs.count_with_prefix(b"b\0"), CHUNK * 3 + 5);
    }

    #[test]
    fn the_merge_is_ordered_and_yields_a_shared_key_once() {
        let runs = FirstRuns::new(100, 0);
        let c = claimed(0);
        for k in [
            b"a\0\x01".to_vec(),
            b"a\0\x03".to_vec(),
            b"a\0\x05".to_vec(),
        ] {
            runs.insert(k, &c).expect("room");
        }
        let durable: Vec<sled::Result<sled::IVec>> = [&b"a\0\x02"[..], b"a\0\x03", b"a\0\x06"]
            .iter()
            .map(|k| Ok(sled::IVec::from(*k)))
            .collect();
        let merged: Vec<Vec<u8>> = merge(
            durable.into_iter(),
            runs.range(b"a\0".to_vec(), b"a\x01".to_vec()),
        )
        .map(|k| k.expect("ok").to_vec())
        .collect();
        let expected: Vec<Vec<u8>> = [1u8, 2, 3, 5, 6]
            .iter()
            .map(|n| vec![b'a', 0, *n])
            .collect();
        assert_eq!(merged, expected);
    }
}

#[cfg(test)]
mod store_tests {
    use std::panic::AssertUnwindSafe;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::SystemTime;

    use futures_util::FutureExt as _;

    use crate::config::{Config, Durability};
    use crate::store::sled::check::WATERMARK_LAG_MS;
    use crate::store::sled::encoding::job_queue_key;
    use crate::store::sled::first_runs::tests::claimed;
    use crate::store::sled::{Op, SledOptions, SledStore, StoreProbe};
    use crate::store::{
        Claim, Claims as _, DeliveryKey, JobQueue as _, NewDelivery, SkipSet, StoredResponse,
    };
    use crate::verify::Source;

    /// Panics once, when a claim reaches `step`.
    struct PanicAt(&'static str, AtomicBool);

    impl StoreProbe for PanicAt {
        fn at(&self, op: Op, step: &'static str) {
            if op == Op::Claim && step == self.0 && !self.1.swap(true, Ordering::SeqCst) {
                panic!("injected: the claim is cut at {step}");
            }
        }
    }

    #[tokio::test]
    async fn a_claim_cut_before_its_record_leaves_no_first_run_in_memory() {
        let dir = tempfile::TempDir::new().expect("dir");
        let options = SledOptions {
            probe: Some(Arc::new(PanicAt(
                "after-queue-entry",
                AtomicBool::new(false),
            ))),
            ..SledOptions::default()
        };
        let store = SledStore::open_with(
            &dir.path().join("data"),
            Durability::Buffered,
            1 << 20,
            options,
        )
        .expect("open");
        let config = Config::parse(
            "[sources.s]\nsecrets = [\"whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"]\n",
            "t.toml",
        )
        .expect("config");
        let source = Source::named(&config, "s").expect("source");
        let new = || {
            let delivery =
                crate::testing::authenticated(&source, "msg_1", b"{}", SystemTime::now())
                    .expect("signed");
            NewDelivery::new(delivery, 1_000, vec!["h".into()], false).acknowledged(
                StoredResponse {
                    status: 202,
                    body: "{}".into(),
                },
            )
        };
        let cut = AssertUnwindSafe(store.claim(new())).catch_unwind().await;
        assert!(cut.is_err(), "the probe cut the claim");
        let key = DeliveryKey::new("s", "msg_1");
        assert!(store.record(&key).await.expect("read").is_none());
        let due = store
            .due_jobs(u64::MAX, 10, &SkipSet::default())
            .await
            .expect("due");
        assert!(due.is_empty(), "a run of a delivery never stored: {due:?}");
        // The sender's retry claims it, and its one entry leads to it.
        assert!(matches!(
            store.claim(new()).await.expect("claim"),
            Claim::New
        ));
        let due = store
            .due_jobs(u64::MAX, 10, &SkipSet::default())
            .await
            .expect("due");
        assert_eq!(due.len(), 1);
    }

    #[test]
    fn a_recent_first_run_stays_in_memory_behind_the_watermark() {
        let dir = tempfile::TempDir::new().expect("dir");
        let store =
            SledStore::open(&dir.path().join("data"), Durability::Buffered, 1 << 20).expect("open");
        let now = 10_000_000;
        let recent = now - 1_000;
        let entry = job_queue_key(recent, b"src\0id\0h");
        store
            .first_runs
            .insert(entry.clone(), &claimed(0))
            .expect("room");
        store.advance_watermark(now).expect("advance");
        assert_eq!(store.watermark().expect("read"), now - WATERMARK_LAG_MS);
        // A recent entry stays in memory, and the watermark is not past it.
        assert!(store.first_runs.contains(&entry));
        assert!(store.watermark().expect("read") <= recent);
    }

    #[test]
    fn an_entry_held_past_the_lag_goes_to_disk_and_frees_the_watermark() {
        let dir = tempfile::TempDir::new().expect("dir");
        let store =
            SledStore::open(&dir.path().join("data"), Durability::Buffered, 1 << 20).expect("open");
        let now = 10_000_000;
        let old = job_queue_key(1_000, b"src\0old\0h");
        store
            .first_runs
            .insert(old.clone(), &claimed(0))
            .expect("room");
        store.advance_watermark(now).expect("advance");
        assert_eq!(store.watermark().expect("read"), now - WATERMARK_LAG_MS);
        assert!(!store.first_runs.contains(&old));
        assert!(store.queue.contains_key(&old).expect("read"), "on disk now");
    }
}
