//! The `received` index: every stored delivery by the time it was received — what retention
//! walks from its oldest end, the admin listing from its newest, backfill and the start-up
//! repair from a time on.
//!
//! # Why one entry per batch
//!
//! One index entry per delivery was one of the claim's three sled writes, and a third of the
//! nodes sled keeps in its page table for a store full of deliveries (BENCHMARKS.md,
//! sessions 21 and 22). With `durability = "fsync"` a claim now only adds its *item* (its
//! received time and key) to a list in memory, and the group commit writes the list as one
//! entry per [`BUCKET_MS`] of received time, just before the flush that every claim in the
//! batch waits for ([`ReceivedIndex::write_pending`], from `disk`). So an acknowledged
//! delivery is always indexed on disk; and since a batch spans a few milliseconds, one
//! write serves the whole batch. With `durability = "buffered"` (no group commit) and for
//! the entries `store check --repair` and `import` write, an item is written at once as an
//! entry of its own.
//!
//! # Layout
//!
//! Two kinds of entries in one tree, told apart by their key:
//! - *single*: `received ms (u64 BE) ++ source \0 id`, empty value — the item is the key (as
//!   every entry was in stores written before);
//! - *batch*: `bucket start ms (u64 BE) ++ 0xFF ++ sequence (u64 BE)`; the value is its
//!   items, each `received ms (u64 BE) ++ key length (u32 BE) ++ source \0 id`, all received
//!   in `[start, start + BUCKET_MS)`. No delivery key begins with 0xFF (a source name is
//!   UTF-8, where that byte never occurs).
//!
//! Readers see items, never entries: [`ReceivedIndex::range`] yields *item keys* (`received
//! ms (u64 BE) ++ source \0 id`, the single entry's layout) in their byte order, which is
//! time order, exactly as a scan of one entry per delivery did. It reads one bucket's
//! entries at a time, sorts their items, and merges the items still waiting in memory, so a
//! claim is visible to readers from the moment it added its item, as it was when the item
//! was a write of its own.
//!
//! # Crashes
//!
//! A claim adds its item before its record (the order of the writes it replaces), but the
//! item reaches the log only with the batch's entry, after the record. A process that dies
//! between the two leaves a record no entry indexes: a delivery that was never
//! acknowledged (the ack waits for the batch), but whose sender will retry and be answered
//! from that record, so the start-up repair must still find it to put its handlers' lost
//! first runs back — without reading every record, so that a start after a crash costs no
//! more as the store grows. Two things make that possible:
//! - each claim whose item is held journals its delivery key in the body log, in the frame
//!   it appends before its record (with its body, or alone for a body kept in the record;
//!   see `bodies`), so a record never reaches the disk ahead of its key;
//! - the `meta` mark [`PENDING_MARK`] holds a body-log position before which every journaled
//!   key is in a batch entry: set (in the log before the first record it covers) when the
//!   first item is held after an opening or a clean close, moved on by a batch write once
//!   the journal has grown [`MARK_STEP_BYTES`] past it (the position is read, under the
//!   list's lock, *before* the items it writes: a frame before it was appended after its
//!   item was added), removed by [`ReceivedIndex::close`] once every item is written.
//!
//! An opening that finds the mark reads the frames after its position — at most about a
//! megabyte more than the last group commit appended — and indexes the records they name that no entry lists
//! ([`ReceivedIndex::unindexed_since`]), before the repair walks the index. A mark without a
//! position (written by the version before the journal) makes it read every record once,
//! as that version did. A clean stop costs nothing at the next start.
//!
//! A kill -9 leaves the OS both files' writes, so the journal names every such record. A
//! power loss may not: the OS may have written sled's log (holding an unacknowledged
//! claim's record) back to the disk ahead of the body log's page holding its key. Such a
//! record is found when its sender retries, before it is answered (`check`'s
//! `repair_if_unindexed`, for records received between the watermark and the opening).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::CountedTree;
use super::bodies::LogPosition;
use super::encoding::{backend, split_time_key};
use crate::store::StoreError;

/// The span of received time one batch entry covers.
pub(super) const BUCKET_MS: u64 = 100;

/// The byte after the bucket's start that makes a key a batch entry's.
const BATCH: u8 = 0xFF;

/// `meta` key: present while items may be held in memory only; its value is the body-log
/// position from which the keys of the claims they belong to are journaled (empty in
/// stores written before the journal). See the module docs.
const PENDING_MARK: &[u8] = b"received-pending";

/// How far the journal must have grown past the mark's position before a batch write moves
/// the mark: a mark behind costs the next unclean opening a longer read (at most about
/// this much more), never a record missed, and moving it on every batch would cost a sled
/// write per group commit.
pub(super) const MARK_STEP_BYTES: u64 = 1 << 20;

/// Where the body log will append its next frame ([`super::bodies::BodyLog::position`]).
pub(super) type JournalPosition = Box<dyn Fn() -> LogPosition + Send + Sync>;

/// What an opening found of a process that died holding items in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UncleanStop {
    /// The keys of every claim whose item may be lost are journaled from this position on.
    JournaledFrom(LogPosition),
    /// A mark without a position (the version before the journal): any record since the
    /// repair's watermark may be unindexed.
    Unjournaled,
}

/// The `received` tree, and the items claims added that the next batch entry will hold.
pub(super) struct ReceivedIndex {
    tree: CountedTree,
    /// Where the mark is kept.
    meta: CountedTree,
    /// The body log's next position, for the mark.
    journal: JournalPosition,
    /// Whether items wait for the group commit (`fsync`) or are written at once.
    batched: bool,
    pending: Mutex<Pending>,
    /// The next batch entry's sequence number (random start: a restart within a bucket
    /// must not reuse a key).
    next_sequence: AtomicU64,
    /// Batch entries are rewritten (items removed) by one caller at a time.
    rewrite: Mutex<()>,
    /// The mark found at opening: the process before died holding items.
    unclean: Option<UncleanStop>,
}

#[derive(Default)]
struct Pending {
    /// Item keys, in the order they were added.
    items: Vec<Vec<u8>>,
    /// Whether `meta` holds [`PENDING_MARK`] (set by this process).
    marked: bool,
    /// The position the mark holds, while `marked`.
    mark_at: LogPosition,
}

/// The start of the bucket `ms` falls in.
fn bucket_of(ms: u64) -> u64 {
    ms - ms % BUCKET_MS
}

/// The received time an entry's or an item's key begins with (a key shorter than that is
/// padded with `pad`).
fn time_of(key: &[u8], pad: u8) -> u64 {
    let mut time = [pad; 8];
    let n = key.len().min(8);
    time[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(time)
}

fn is_batch_key(key: &[u8]) -> bool {
    key.len() == 17 && key[8] == BATCH
}

/// Appends `item` (an item key) to a batch entry's value.
fn encode_item(value: &mut Vec<u8>, item: &[u8]) {
    let (time, key) = item.split_at(8);
    value.extend_from_slice(time);
    value.extend_from_slice(&(key.len() as u32).to_be_bytes());
    value.extend_from_slice(key);
}

fn truncated() -> StoreError {
    StoreError::Corrupt("received index: a truncated batch entry".into())
}

/// The items of a batch entry's value, each as (received time, delivery key), borrowed.
fn batch_items(mut value: &[u8]) -> impl Iterator<Item = Result<(&[u8], &[u8]), StoreError>> {
    std::iter::from_fn(move || {
        if value.is_empty() {
            return None;
        }
        let item = (|| {
            let (time, rest) = value.split_first_chunk::<8>().ok_or_else(truncated)?;
            let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
            let (key, rest) = rest
                .split_at_checked(u32::from_be_bytes(*len) as usize)
                .ok_or_else(truncated)?;
            value = rest;
            Ok((&time[..], key))
        })();
        if item.is_err() {
            // Nothing after a truncated item can be read.
            value = &[];
        }
        Some(item)
    })
}

/// The item keys of a batch entry's value.
fn decode_items(value: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
    batch_items(value)
        .map(|item| item.map(|(time, key)| [time, key].concat()))
        .collect()
}

/// The items an entry holds: itself for a single one, its value's for a batch.
fn items_of(key: &[u8], value: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
    if is_batch_key(key) {
        decode_items(value)
    } else if key.len() > 8 {
        Ok(vec![key.to_vec()])
    } else {
        // Not an entry either layout writes: nothing to read from it.
        Ok(Vec::new())
    }
}

fn within(item: &[u8], lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>) -> bool {
    let above = match lower {
        Bound::Included(l) => item >= l.as_slice(),
        Bound::Excluded(l) => item > l.as_slice(),
        Bound::Unbounded => true,
    };
    let below = match upper {
        Bound::Included(u) => item <= u.as_slice(),
        Bound::Excluded(u) => item < u.as_slice(),
        Bound::Unbounded => true,
    };
    above && below
}

impl ReceivedIndex {
    /// The index over `tree`, its mark in `meta`; `batched` with `durability = "fsync"`,
    /// when claims journal their keys at `journal`. Reads whether the process before died
    /// holding items (see the module docs).
    pub(super) fn open(
        tree: CountedTree,
        meta: CountedTree,
        batched: bool,
        journal: JournalPosition,
    ) -> Result<ReceivedIndex, StoreError> {
        let unclean = meta.get(PENDING_MARK).map_err(backend)?.map(|mark| {
            LogPosition::decode(&mark).map_or(UncleanStop::Unjournaled, UncleanStop::JournaledFrom)
        });
        Ok(ReceivedIndex {
            tree,
            meta,
            journal,
            batched,
            pending: Mutex::new(Pending::default()),
            next_sequence: AtomicU64::new(rand::random::<u64>() >> 1),
            rewrite: Mutex::new(()),
            unclean,
        })
    }

    /// Whether a claim's item is held for the group commit: its key must then be journaled
    /// in the body log before its record is inserted (see the module docs).
    pub(super) fn journals(&self) -> bool {
        self.batched
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock leaves a list that is still whole.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Indexes a claim's delivery: `item` is `received ms (u64 BE) ++ source \0 id`. Held in
    /// memory for the next batch entry when batched (the first such item since the opening
    /// or the last close sets the mark first), written as an entry of its own otherwise.
    /// When held, the claim journals its key in the body log next, before its record.
    pub(super) fn add(&self, item: Vec<u8>) -> Result<(), StoreError> {
        if !self.batched {
            return self.insert(&item);
        }
        let mut pending = self.pending();
        if !pending.marked {
            // The claim's frame comes after this position: it is read if the process dies.
            let from = (self.journal)();
            self.meta
                .insert(PENDING_MARK, &from.encode())
                .map_err(backend)?;
            pending.marked = true;
            pending.mark_at = from;
        }
        pending.items.push(item);
        Ok(())
    }

    /// Writes `item` as an entry of its own, at once.
    pub(super) fn insert(&self, item: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(item, &[]).map_err(backend)?;
        Ok(())
    }

    /// Writes the items held in memory as one entry per bucket they fall in. Called by the
    /// group commit before its flush: every claim waiting in the batch added its item
    /// before it joined, so its item is on disk when its wait ends.
    pub(super) fn write_pending(&self) -> Result<(), StoreError> {
        let mut pending = self.pending();
        self.write_locked(&mut pending)
    }

    fn write_locked(&self, pending: &mut Pending) -> Result<(), StoreError> {
        if pending.items.is_empty() {
            return Ok(());
        }
        // Read before the items are written, under the list's lock: every frame before it
        // belongs to a claim that added its item before now, so to one of these items or
        // to one an earlier batch wrote.
        let journaled_from = (self.journal)();
        // Written before they leave the list (under its lock): a reader sees each item in
        // one place or the other, never in neither.
        let mut by_bucket: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for item in &pending.items {
            let value = by_bucket.entry(bucket_of(time_of(item, 0))).or_default();
            encode_item(value, item);
        }
        for (bucket, value) in by_bucket {
            let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
            let mut key = Vec::with_capacity(17);
            key.extend_from_slice(&bucket.to_be_bytes());
            key.push(BATCH);
            key.extend_from_slice(&sequence.to_be_bytes());
            self.tree.insert(key, value).map_err(backend)?;
        }
        pending.items.clear();
        // After the entries in sled's log (which keeps a prefix): a mark moved on means
        // the entries it vouches for are there. Moved once the journal has grown
        // [`MARK_STEP_BYTES`] past it (or into a new segment), not at every batch.
        let at = pending.mark_at;
        let grown = journaled_from.segment != at.segment
            || journaled_from.offset.saturating_sub(at.offset) >= MARK_STEP_BYTES;
        if pending.marked && grown {
            self.meta
                .insert(PENDING_MARK, &journaled_from.encode())
                .map_err(backend)?;
            pending.mark_at = journaled_from;
        }
        Ok(())
    }

    /// At a clean stop: writes what is held and removes the mark, so that the next opening
    /// does not look for records the index lacks. The caller makes it durable.
    pub(super) fn close(&self) -> Result<(), StoreError> {
        let mut pending = self.pending();
        self.write_locked(&mut pending)?;
        if pending.marked {
            self.meta.remove(PENDING_MARK).map_err(backend)?;
            pending.marked = false;
        }
        Ok(())
    }

    /// What the opening found of a process that died holding items in memory (the mark):
    /// the start-up repair then looks for the records no entry lists.
    pub(super) fn unclean_stop(&self) -> Option<UncleanStop> {
        self.unclean
    }

    /// Removes the mark an unclean stop left, once the repair has indexed what it lacked.
    pub(super) fn clear_unclean(&self) -> Result<(), StoreError> {
        let pending = self.pending();
        if !pending.marked {
            self.meta.remove(PENDING_MARK).map_err(backend)?;
        }
        Ok(())
    }

    /// The item keys within `bounds` (bounds on item keys), in key order: time, then
    /// delivery key.
    pub(super) fn range(&self, bounds: impl RangeBounds<Vec<u8>>) -> Items {
        self.walk(bounds, false)
    }

    /// [`ReceivedIndex::range`] newest first.
    pub(super) fn range_rev(&self, bounds: impl RangeBounds<Vec<u8>>) -> Items {
        self.walk(bounds, true)
    }

    fn walk(&self, bounds: impl RangeBounds<Vec<u8>>, reverse: bool) -> Items {
        let lower = bounds.start_bound().cloned();
        let upper = bounds.end_bound().cloned();
        // The entries of every bucket an item within the bounds can be in.
        let from = match &lower {
            Bound::Included(k) | Bound::Excluded(k) => {
                Bound::Included(bucket_of(time_of(k, 0)).to_be_bytes().to_vec())
            }
            Bound::Unbounded => Bound::Unbounded,
        };
        let to = match &upper {
            Bound::Included(k) | Bound::Excluded(k) => {
                match bucket_of(time_of(k, 0xFF)).checked_add(BUCKET_MS) {
                    Some(end) => Bound::Excluded(end.to_be_bytes().to_vec()),
                    None => Bound::Unbounded,
                }
            }
            Bound::Unbounded => Bound::Unbounded,
        };
        // The held items before the tree's iterator exists: one written to the tree after
        // this copy is then there to be read however sled's iterator reads its nodes (at
        // worst read twice, which `Items::fill` merges); never in neither.
        let mut held: Vec<Vec<u8>> = self
            .pending()
            .items
            .iter()
            .filter(|item| within(item, &lower, &upper))
            .cloned()
            .collect();
        held.sort();
        if reverse {
            held.reverse();
        }
        let entries = self.tree.range::<Vec<u8>, _>((from, to));
        let entries: Entries = if reverse {
            Box::new(entries.rev())
        } else {
            Box::new(entries)
        };
        Items {
            entries: entries.peekable(),
            held: held.into(),
            lower,
            upper,
            reverse,
            ready: VecDeque::new(),
        }
    }

    /// The received time of the oldest item (of its bucket, for a batch entry: never
    /// later than the item's), counting those held in memory.
    pub(super) fn oldest_ms(&self) -> Result<Option<u64>, StoreError> {
        // Held items first: one written meanwhile is then in the tree.
        let held = self.pending().items.iter().map(|i| time_of(i, 0)).min();
        let stored = self
            .tree
            .first()
            .map_err(backend)?
            .and_then(|(k, _)| split_time_key(&k).map(|(t, _)| t));
        Ok(match (held, stored) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// Whether `item` (an item key) is in the index: held, in an entry of its own, or in one
    /// of its bucket's batch entries (read without sorting or copying them).
    pub(super) fn contains(&self, item: &[u8]) -> Result<bool, StoreError> {
        if self.pending().items.iter().any(|held| held == item) {
            return Ok(true);
        }
        if self.tree.contains_key(item).map_err(backend)? {
            return Ok(true);
        }
        let mut prefix = bucket_of(time_of(item, 0)).to_be_bytes().to_vec();
        prefix.push(BATCH);
        for entry in self.tree.scan_prefix(&prefix) {
            let (key, value) = entry.map_err(backend)?;
            if !is_batch_key(&key) {
                continue;
            }
            for batched in batch_items(&value) {
                let (time, key) = batched?;
                if item.len() == time.len() + key.len()
                    && item.starts_with(time)
                    && item.ends_with(key)
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Removes `items` (item keys) from the index: a single entry is removed, a batch entry
    /// rewritten without them (removed once empty); one held in memory is dropped.
    pub(super) fn remove(&self, items: &[Vec<u8>]) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let _rewrite = self
            .rewrite
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gone: HashSet<&[u8]> = items.iter().map(Vec::as_slice).collect();
        self.pending()
            .items
            .retain(|item| !gone.contains(item.as_slice()));
        let buckets: std::collections::BTreeSet<u64> =
            items.iter().map(|i| bucket_of(time_of(i, 0))).collect();
        for bucket in buckets {
            let mut prefix = bucket.to_be_bytes().to_vec();
            prefix.push(BATCH);
            for entry in self.tree.scan_prefix(&prefix) {
                let (key, value) = entry.map_err(backend)?;
                if !is_batch_key(&key) {
                    continue;
                }
                let held = decode_items(&value)?;
                let kept: Vec<&Vec<u8>> = held
                    .iter()
                    .filter(|item| !gone.contains(item.as_slice()))
                    .collect();
                if kept.len() == held.len() {
                    continue;
                }
                if kept.is_empty() {
                    self.tree.remove(&key).map_err(backend)?;
                } else {
                    let mut rewritten = Vec::with_capacity(value.len());
                    for item in kept {
                        encode_item(&mut rewritten, item);
                    }
                    self.tree.insert(&key, rewritten).map_err(backend)?;
                }
            }
        }
        for item in items {
            // An item's own entry (a single one), when there is one.
            if self.tree.contains_key(item).map_err(backend)? {
                self.tree.remove(item).map_err(backend)?;
            }
        }
        Ok(())
    }

    /// The records in `records` (item keys of every stored delivery received at or after
    /// `since_ms`) that no entry lists, for the repair after an unclean stop.
    pub(super) fn unindexed_since(
        &self,
        since_ms: u64,
        mut records: Vec<Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut indexed = HashSet::new();
        for item in self.range(since_ms.to_be_bytes().to_vec()..) {
            indexed.insert(item?);
        }
        records.retain(|item| !indexed.contains(item));
        Ok(records)
    }
}

/// The tree's entries in the walk's order.
type Entries = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>>;

/// Item keys in order, one bucket's entries read at a time (see [`ReceivedIndex::range`]).
pub(super) struct Items {
    entries: std::iter::Peekable<Entries>,
    /// Items held in memory within the bounds, in the walk's order.
    held: VecDeque<Vec<u8>>,
    lower: Bound<Vec<u8>>,
    upper: Bound<Vec<u8>>,
    reverse: bool,
    /// The current bucket's items still to yield.
    ready: VecDeque<Vec<u8>>,
}

impl Items {
    /// Reads the next bucket in the walk's order into `ready`; false at the end.
    fn fill(&mut self) -> Result<bool, StoreError> {
        let stored = match self.entries.peek() {
            Some(Ok((key, _))) => Some(bucket_of(time_of(key, 0))),
            Some(Err(_)) => {
                return match self.entries.next() {
                    Some(Err(e)) => Err(backend(e)),
                    _ => Ok(true),
                };
            }
            None => None,
        };
        let held = self.held.front().map(|item| bucket_of(time_of(item, 0)));
        let bucket = match (stored, held) {
            (Some(a), Some(b)) if self.reverse => a.max(b),
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Ok(false),
        };
        let mut items = Vec::new();
        while let Some(Ok((key, _))) = self.entries.peek() {
            if bucket_of(time_of(key, 0)) != bucket {
                break;
            }
            if let Some(entry) = self.entries.next() {
                let (key, value) = entry.map_err(backend)?;
                items.extend(items_of(&key, &value)?);
            }
        }
        while self
            .held
            .front()
            .is_some_and(|item| bucket_of(time_of(item, 0)) == bucket)
        {
            items.extend(self.held.pop_front());
        }
        items.sort();
        // Held items written to the tree since the walk began are read twice.
        items.dedup();
        if self.reverse {
            items.reverse();
        }
        self.ready.extend(
            items
                .into_iter()
                .filter(|item| within(item, &self.lower, &self.upper)),
        );
        Ok(true)
    }
}

impl Iterator for Items {
    type Item = Result<Vec<u8>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(Ok(item));
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::counted::WriteCounts;
    use proptest::prelude::*;
    use std::sync::Arc;

    struct Index {
        _db: sled::Db,
        meta: CountedTree,
        index: ReceivedIndex,
        /// The journal's offset the index reads (segment 1).
        position: Arc<AtomicU64>,
    }

    fn index(batched: bool) -> Index {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let counts = WriteCounts::default();
        let tree =
            |name: &'static str| CountedTree::new(db.open_tree(name).expect("tree"), name, &counts);
        let meta = tree("meta");
        let position = Arc::new(AtomicU64::new(0));
        let journal = {
            let position = position.clone();
            Box::new(move || LogPosition {
                segment: 1,
                offset: position.load(Ordering::SeqCst),
            })
        };
        let index =
            ReceivedIndex::open(tree("received"), meta.clone(), batched, journal).expect("open");
        Index {
            _db: db,
            meta,
            index,
            position,
        }
    }

    fn item(ms: u64, id: &str) -> Vec<u8> {
        let mut item = ms.to_be_bytes().to_vec();
        item.extend_from_slice(b"src\0");
        item.extend_from_slice(id.as_bytes());
        item
    }

    fn all(items: Items) -> Vec<Vec<u8>> {
        items.collect::<Result<_, _>>().expect("read")
    }

    /// Items in single entries, in batch entries (one bucket, two buckets) and still held
    /// in memory read back as one sequence in item-key order, both ways, and within bounds
    /// that fall inside a bucket.
    #[test]
    fn singles_batches_and_held_items_read_as_one_ordered_sequence() {
        let Index { index, .. } = index(true);
        // A store written before: single entries.
        index.insert(&item(1_050, "old-b")).expect("insert");
        index.insert(&item(1_010, "old-a")).expect("insert");
        // A batch whose items span two buckets, added out of time order.
        for (ms, id) in [(1_099, "b2"), (1_020, "b1"), (1_100, "b3"), (1_020, "b0")] {
            index.add(item(ms, id)).expect("add");
        }
        index.write_pending().expect("write");
        // Held in memory: in the middle of what is written.
        index.add(item(1_030, "held")).expect("add");
        let expected = vec![
            item(1_010, "old-a"),
            item(1_020, "b0"),
            item(1_020, "b1"),
            item(1_030, "held"),
            item(1_050, "old-b"),
            item(1_099, "b2"),
            item(1_100, "b3"),
        ];
        assert_eq!(all(index.range(..)), expected);
        let mut reversed = expected.clone();
        reversed.reverse();
        assert_eq!(all(index.range_rev(..)), reversed);
        // Bounds inside a bucket, on item keys (a cursor: excluded).
        assert_eq!(
            all(index.range((
                Bound::Excluded(item(1_020, "b0")),
                Bound::Excluded(1_099u64.to_be_bytes().to_vec())
            ))),
            expected[2..5]
        );
        assert_eq!(all(index.range_rev(..item(1_030, "held"))), {
            let mut v = expected[..3].to_vec();
            v.reverse();
            v
        });
        assert_eq!(
            all(index.range(1_100u64.to_be_bytes().to_vec()..)),
            expected[6..]
        );
        // Written now, the held item is read once.
        index.write_pending().expect("write");
        assert_eq!(all(index.range(..)), expected);
        assert_eq!(index.oldest_ms().expect("oldest"), Some(1_000));
    }

    /// Removing items rewrites the batch entry that holds them, removes it once empty, and
    /// removes single entries and held items.
    #[test]
    fn removed_items_leave_their_batch_entry_and_an_empty_one_goes() {
        let Index { index, .. } = index(true);
        index.insert(&item(500, "single")).expect("insert");
        for id in ["a", "b", "c"] {
            index.add(item(2_000, id)).expect("add");
        }
        index.write_pending().expect("write");
        index.add(item(2_001, "held")).expect("add");
        index
            .remove(&[item(500, "single"), item(2_000, "b"), item(2_001, "held")])
            .expect("remove");
        assert_eq!(
            all(index.range(..)),
            vec![item(2_000, "a"), item(2_000, "c")]
        );
        assert_eq!(index.tree.len(), 1);
        index
            .remove(&[item(2_000, "a"), item(2_000, "c")])
            .expect("remove");
        assert!(all(index.range(..)).is_empty());
        assert!(index.tree.is_empty());
        assert_eq!(index.oldest_ms().expect("oldest"), None);
    }

    /// Not batched (`buffered`), an item is an entry of its own at once and no mark is set;
    /// batched, the first held item sets the mark at the journal's position then, a batch
    /// write moves it to the position read before the items it writes once the journal has
    /// grown [`MARK_STEP_BYTES`] past it, and a close
    /// writes the items and removes it. An opening reads what the mark says.
    #[test]
    fn the_mark_covers_exactly_the_time_items_are_held() {
        let Index { meta, index, .. } = index(false);
        index.add(item(7_000, "now")).expect("add");
        assert_eq!(index.tree.len(), 1);
        assert!(!meta.contains_key(PENDING_MARK).expect("meta"));

        let Index {
            meta,
            index,
            position,
            ..
        } = self::index(true);
        let mark = || {
            meta.get(PENDING_MARK)
                .expect("meta")
                .map(|m| LogPosition::decode(&m).expect("a position"))
        };
        let at = |offset| LogPosition { segment: 1, offset };
        position.store(40, Ordering::SeqCst);
        index.add(item(7_000, "held")).expect("add");
        assert!(index.tree.is_empty());
        assert_eq!(mark(), Some(at(40)));
        // The claim's frame, then a second claim's item.
        position.store(90, Ordering::SeqCst);
        index.add(item(7_001, "next")).expect("add");
        assert_eq!(mark(), Some(at(40)), "set once");
        index.write_pending().expect("write");
        assert_eq!(mark(), Some(at(40)), "not moved for a few bytes");
        let far = 40 + MARK_STEP_BYTES;
        position.store(far, Ordering::SeqCst);
        index.add(item(7_002, "later")).expect("add");
        index.write_pending().expect("write");
        assert_eq!(mark(), Some(at(far)), "moved once the journal has grown");
        // Nothing held: a batch write leaves it where it is.
        position.store(far + 2 * MARK_STEP_BYTES, Ordering::SeqCst);
        index.write_pending().expect("write");
        assert_eq!(mark(), Some(at(far)));
        let reopened = |index: &ReceivedIndex| {
            ReceivedIndex::open(
                index.tree.clone(),
                meta.clone(),
                true,
                Box::new(LogPosition::default),
            )
            .expect("open")
            .unclean_stop()
        };
        assert_eq!(reopened(&index), Some(UncleanStop::JournaledFrom(at(far))));
        index.close().expect("close");
        assert_eq!(
            all(index.range(..)),
            vec![
                item(7_000, "held"),
                item(7_001, "next"),
                item(7_002, "later")
            ]
        );
        assert_eq!(mark(), None);
        assert_eq!(reopened(&index), None);
        // The version before the journal set the mark without a position.
        meta.insert(PENDING_MARK, &[]).expect("mark");
        assert_eq!(reopened(&index), Some(UncleanStop::Unjournaled));
    }

    /// The records an unclean stop left unindexed are those since the watermark that no
    /// entry lists, wherever the others are (single entries, batches).
    #[test]
    fn unindexed_records_are_found_among_the_recent_ones() {
        let Index { index, .. } = index(true);
        index.insert(&item(9_000, "single")).expect("insert");
        index.add(item(9_050, "batched")).expect("add");
        index.write_pending().expect("write");
        let records = vec![
            item(9_000, "single"),
            item(9_050, "batched"),
            item(9_060, "lost"),
        ];
        assert_eq!(
            index.unindexed_since(9_000, records).expect("scan"),
            vec![item(9_060, "lost")]
        );
        index.add(item(9_070, "held")).expect("add");
        for (ms, id, expected) in [
            (9_000, "single", true),
            (9_050, "batched", true),
            (9_070, "held", true),
            (9_060, "lost", false),
            (9_050, "batche", false),
            (9_051, "batched", false),
        ] {
            assert_eq!(
                index.contains(&item(ms, id)).expect("read"),
                expected,
                "{id}"
            );
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// An entry of its own (an older store, a repair).
        Insert(u64, u8),
        /// A claim's item, held until the next `Write`.
        Add(u64, u8),
        /// The group commit's write of what is held.
        Write,
        /// Retention: removes the items at these positions of the model (modulo its size).
        Remove(Vec<usize>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..1_000, 0u8..5).prop_map(|(ms, id)| Step::Insert(ms, id)),
            (0u64..1_000, 0u8..5).prop_map(|(ms, id)| Step::Add(ms, id)),
            (0u64..1_000, 0u8..5).prop_map(|(ms, id)| Step::Add(ms, id)),
            Just(Step::Write),
            proptest::collection::vec(0usize..64, 0..4).prop_map(Step::Remove),
        ]
    }

    fn bound() -> impl Strategy<Value = Bound<Vec<u8>>> {
        let key = (0u64..1_100, proptest::option::of(0u8..5)).prop_map(|(ms, id)| match id {
            Some(id) => item(ms, &id.to_string()),
            None => ms.to_be_bytes().to_vec(),
        });
        prop_oneof![
            key.clone().prop_map(Bound::Included),
            key.prop_map(Bound::Excluded),
            Just(Bound::Unbounded),
        ]
    }

    proptest! {
        /// Whatever mix of single entries, batches, held items and removals, a range of the
        /// index reads, both ways, exactly the items a sorted set of them holds in that range.
        #[test]
        fn the_index_reads_as_a_sorted_set_of_its_items(
            steps in proptest::collection::vec(step(), 1..40),
            lower in bound(),
            upper in bound(),
        ) {
            let Index { index, .. } = index(true);
            let mut model = std::collections::BTreeSet::new();
            for step in steps {
                match step {
                    Step::Insert(ms, id) => {
                        index.insert(&item(ms, &id.to_string())).expect("insert");
                        model.insert(item(ms, &id.to_string()));
                    }
                    Step::Add(ms, id) => {
                        index.add(item(ms, &id.to_string())).expect("add");
                        model.insert(item(ms, &id.to_string()));
                    }
                    Step::Write => index.write_pending().expect("write"),
                    Step::Remove(at) => {
                        let items: Vec<Vec<u8>> = model.iter().cloned().collect();
                        let gone: Vec<Vec<u8>> = at
                            .iter()
                            .filter(|_| !items.is_empty())
                            .map(|i| items[i % items.len()].clone())
                            .collect();
                        index.remove(&gone).expect("remove");
                        for g in &gone {
                            model.remove(g);
                        }
                    }
                }
            }
            let bounds = (lower, upper);
            let expected: Vec<Vec<u8>> = if matches!(
                (&bounds.0, &bounds.1),
                (Bound::Excluded(a), Bound::Excluded(b)) if a == b
            ) {
                // An empty range that `BTreeSet::range` refuses (it panics on it).
                Vec::new()
            } else if match (&bounds.0, &bounds.1) {
                (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => a > b,
                _ => false,
            } {
                Vec::new()
            } else {
                model.range(bounds.clone()).cloned().collect()
            };
            prop_assert_eq!(all(index.range(bounds.clone())), expected.clone());
            let mut reversed = expected;
            reversed.reverse();
            prop_assert_eq!(all(index.range_rev(bounds)), reversed);
            let oldest = index.oldest_ms().expect("oldest");
            match model.first() {
                Some(first) => prop_assert!(oldest.is_some_and(|t| t <= time_of(first, 0))),
                None => prop_assert_eq!(oldest, None),
            }
        }
    }

    /// A batch entry's value cut short is an error, not a panic or a wrong item.
    #[test]
    fn a_truncated_batch_entry_is_corrupt() {
        let mut value = Vec::new();
        encode_item(&mut value, &item(1, "x"));
        assert_eq!(decode_items(&value).expect("whole"), vec![item(1, "x")]);
        for cut in 1..value.len() {
            assert!(decode_items(&value[..cut]).is_err(), "cut at {cut}");
        }
    }
}
