//! Taking deliveries in: the claim, the reads of a stored delivery, and `ack = "processed"`'s
//! delivery lease ([`crate::store::Claims`]).

use async_trait::async_trait;
use bytes::Bytes;

use std::sync::Arc;

use super::bodies::BODY_LOG_MIN;
use super::encoding::{
    BodyEntry, backend, body_index_key, decode_stored_first, encode_delivery,
    encode_logged_delivery, job_queue_key, queue_key, split_delivery,
};
use super::first_runs::Claimed;
use super::order::{line_entry, line_locks};
use super::{Op, SledInner, SledStore, order};
use crate::config::Durability;
use crate::store::Claims;
use crate::store::{
    Claim, DeliveryKey, DeliveryRecord, Lease, NewDelivery, StoreError, StoredFirst,
    StoredResponse, TakeOver,
};

#[async_trait]
impl Claims for SledStore {
    async fn claim(&self, new: NewDelivery) -> Result<Claim, StoreError> {
        let enqueue = new.enqueue();
        // The delivery as a first run kept in memory holds it: moved there once, and
        // shared by every handler's entry (no copy of the record per claim).
        let claimed = Arc::new(Claimed {
            record: Arc::new(new.record),
            body: new.body,
        });
        let record = &claimed.record;
        let key = record.key().encode();
        // No lock-free read first: ingest asked `stored_first` just before, so a second
        // read would only cost every new delivery a miss.
        let fp_key = body_index_key(&record.source, &record.fingerprint);
        let lines = line_locks(record);
        let mut lock_keys: Vec<&[u8]> = vec![&key];
        if record.body_dedup {
            lock_keys.push(&fp_key);
        }
        lock_keys.extend(lines.iter().map(Vec::as_slice));
        let received_at = record.received_at_ms;
        let received_key = queue_key(received_at, &key);
        let claim = self
            .locked_write(Op::Claim, &lock_keys, Some(&key), || {
                if let Some(existing) = self.read_resolved(&key)? {
                    // Lost the race to a concurrent copy; its writes are complete (we
                    // hold the lock) but maybe not durable: wait for them (`true`).
                    return Ok((Claim::Existing(existing), true));
                }
                // Without body dedup the body index is not asked at all (its answer would
                // not be used).
                let indexed = if record.body_dedup {
                    self.body_index.get(&fp_key).map_err(backend)?
                } else {
                    None
                };
                let first = match indexed {
                    Some(value) => match BodyEntry::decode(&value)? {
                        BodyEntry::Live(id) if id != record.id => {
                            self.read_record(&DeliveryKey::new(&record.source, &id).encode())?
                        }
                        BodyEntry::Live(_) => None,
                        // Expired, but its fingerprint is remembered: still a replay.
                        BodyEntry::Kept(kept) => {
                            let first = kept.as_record(&record.source, &record.fingerprint);
                            if kept.id == record.id {
                                return Ok((Claim::Existing(first.into()), false));
                            }
                            Some(first)
                        }
                    },
                    _ => None,
                };
                if let Some(first) = first {
                    // The same body under a new id: recorded as an alias of the first
                    // (visible to operators, replayed to its own redeliveries), no jobs.
                    let alias = record.as_alias_of(&first);
                    self.received.add(received_key)?;
                    self.step(Op::Claim, "after-alias-index");
                    if self.received.journals() {
                        self.bodies.append(&key, &[], received_at)?;
                        self.step(Op::Claim, "after-journal");
                    }
                    self.deliveries
                        .insert(&key, encode_delivery(&alias, &[]))
                        .map_err(backend)?;
                    return Ok((Claim::BodyDuplicate(first), true));
                }
                // An ordered handler whose line has someone in it waits there, unqueued.
                // (queue key, whether it may be kept in memory: see `first_runs`)
                let mut queue_keys = Vec::new();
                if enqueue {
                    for handler in &record.handlers {
                        let parked = match record.order_keys.get(handler) {
                            Some(value) => self.line_occupied(
                                handler,
                                &order::line_prefix(handler, value),
                                None,
                            )?,
                            None => false,
                        };
                        if !parked {
                            let key =
                                job_queue_key(received_at, &record.key().job(handler).encode());
                            queue_keys.push((key, !record.order_keys.contains_key(handler)));
                        }
                    }
                }
                // Index entries first: should the process die before the record lands,
                // they point at nothing and are dropped when dispatch or retention meet them.
                // (The received_at item is held for its batch's entry: see `received`.)
                self.received.add(received_key)?;
                self.step(Op::Claim, "after-received-index");
                // Until the record is written: should the claim fail (or panic) before it,
                // an entry left in memory would hand a start a delivery never stored.
                let mut unrecorded = Unrecorded {
                    runs: &self.first_runs,
                    keys: Vec::new(),
                };
                for (q, in_memory) in queue_keys {
                    // In memory while there is room; the tree otherwise (and a line's).
                    let durable = if in_memory {
                        // Kept in memory only: a crash from now on must be counted.
                        self.starts.mark_open(&self.meta)?;
                        match self.first_runs.insert(q.clone(), &claimed) {
                            Ok(()) => {
                                unrecorded.keys.push(q);
                                None
                            }
                            Err(q) => Some(q),
                        }
                    } else {
                        Some(q)
                    };
                    if let Some(q) = durable {
                        self.queue.insert(q, &[]).map_err(backend)?;
                    }
                    self.step(Op::Claim, "after-queue-entry");
                }
                if record.body_dedup {
                    self.body_index
                        .insert(&fp_key, record.id.as_bytes())
                        .map_err(backend)?;
                    self.step(Op::Claim, "after-body-index");
                }
                let journaled = self.received.journals().then_some(key.as_slice());
                let value = self.new_delivery_value(record, &claimed.body, journaled)?;
                self.deliveries.insert(&key, value).map_err(backend)?;
                unrecorded.keys.clear();
                // Line entries after the record: one a crash left without its record would
                // hold up its line (the start-up repair puts a missing one back).
                for handler in record.order_keys.keys() {
                    if let Some(entry) = line_entry(record, handler) {
                        self.step(Op::Claim, "after-record");
                        self.order.insert(entry, &[]).map_err(backend)?;
                    }
                }
                Ok((Claim::New, true))
            })
            .await?;
        Ok(claim)
    }

    async fn stored_first(&self, key: &DeliveryKey) -> Result<Option<StoredFirst>, StoreError> {
        // Without the lock: a record is written last, so once it is visible, everything
        // its claim wrote is too.
        let encoded = key.encode();
        // The received time only after an unclean opening (see `repair_if_unindexed`).
        let unclean = self.unindexed_window.get().is_some();
        let Some((existing, received_at_ms)) = self.read_resolved_at(&encoded, unclean)? else {
            return Ok(None);
        };
        if let Some(received_at_ms) = received_at_ms {
            self.repair_if_unindexed(&encoded, received_at_ms).await?;
        }
        // An alias answers with its first delivery's record: that one must be durable too.
        let first = (existing.id != key.id).then(|| existing.key().encode());
        self.settle_read(&encoded, first.as_deref()).await?;
        Ok(Some(existing))
    }

    fn take_requeued_by_reads(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        // Read before the swap: a redelivery does not write a line every other one reads.
        self.requeued_by_read.load(Relaxed) && self.requeued_by_read.swap(false, Relaxed)
    }

    async fn record(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        self.read_record(&key.encode())
    }

    async fn body(&self, key: &DeliveryKey) -> Result<Option<Bytes>, StoreError> {
        let Some((record, body)) = self.read_delivery(&key.encode())? else {
            return Ok(None);
        };
        match &record.alias_of {
            // An alias keeps no copy of the body it shares with its first delivery.
            Some(first) => Ok(self
                .read_delivery(&DeliveryKey::new(&record.source, first).encode())?
                .map(|(_, b)| b)
                .or(Some(body))),
            None => Ok(Some(body)),
        }
    }

    async fn take_over(
        &self,
        key: &DeliveryKey,
        now_ms: u64,
        lease: Lease,
    ) -> Result<TakeOver, StoreError> {
        let k = key.encode();
        self.locked_write(Op::TakeOver, &[&k], Some(&k), || {
            let Some(mut record) = self.read_record(&k)? else {
                return Err(StoreError::Corrupt(
                    "record vanished during take-over".into(),
                ));
            };
            let (taken, changed) = record.take_over(now_ms, lease);
            if changed {
                self.write_record(&k, &record)?;
            }
            Ok((taken, changed))
        })
        .await
    }

    async fn renew_lease(&self, key: &DeliveryKey, lease: Lease) -> Result<bool, StoreError> {
        let k = key.encode();
        let _locks = self.lock(Op::TakeOver, &[&k]);
        let Some(mut record) = self.read_record(&k)? else {
            return Ok(false);
        };
        if !record.renew_processed_lease(lease) {
            return Ok(false);
        }
        // Not waited for: a renewal lost in a crash only shortens the lease.
        self.write_record(&k, &record)?;
        Ok(true)
    }

    async fn release(
        &self,
        key: &DeliveryKey,
        owner: u64,
        response: Option<StoredResponse>,
    ) -> Result<bool, StoreError> {
        let k = key.encode();
        self.locked_write(Op::Release, &[&k], Some(&k), || {
            let Some(mut record) = self.read_record(&k)? else {
                return Ok((false, false));
            };
            if !record.release_processed_lease(owner, response) {
                return Ok((false, false));
            }
            self.write_record(&k, &record)?;
            Ok((true, true))
        })
        .await
    }
}

/// The first-run entries a claim put in memory before its record: taken out again when the
/// claim ends without the record (an error, a panic). One on disk is dropped as stale by
/// the start that meets it; one in memory carries the delivery, so it must not stay.
struct Unrecorded<'a> {
    runs: &'a super::first_runs::FirstRuns,
    keys: Vec<Vec<u8>>,
}

impl Drop for Unrecorded<'_> {
    fn drop(&mut self) {
        for key in &self.keys {
            self.runs.remove(key);
        }
    }
}

impl SledInner {
    /// A record read while a write to it is in flight may not be on disk yet: join the next
    /// group commit before answering from it. `key` is the record read, `first` the first
    /// delivery's an alias resolved to. A record no write holds is on disk: answered at
    /// once, however many other writes are in flight (see `group_commit`).
    ///
    /// After a failed flush nothing read can be vouched for: what is in memory may never
    /// reach the disk, so replaying it could acknowledge a delivery that a crash then loses.
    async fn settle_read(&self, key: &[u8], first: Option<&[u8]>) -> Result<(), StoreError> {
        if self.durability != Durability::Fsync {
            return Ok(());
        }
        if self.commit.is_poisoned() {
            return Err(StoreError::Flush(
                "an earlier flush failed; restart to recover".into(),
            ));
        }
        let settled =
            self.commit.is_settled(key) && first.is_none_or(|first| self.commit.is_settled(first));
        if !settled {
            self.commit.wait().await?;
        }
        Ok(())
    }

    /// What the record under `key` answers a later copy with, or, for an alias made by
    /// body dedup, the first delivery's while it is still stored.
    fn read_resolved(&self, key: &[u8]) -> Result<Option<StoredFirst>, StoreError> {
        Ok(self.read_resolved_at(key, false)?.map(|(stored, _)| stored))
    }

    /// [`SledInner::read_resolved`], with (`received_at`) the received time of the record
    /// under `key` itself, from the same read.
    fn read_resolved_at(
        &self,
        key: &[u8],
        received_at: bool,
    ) -> Result<Option<(StoredFirst, Option<u64>)>, StoreError> {
        let Some(value) = self.deliveries.get(key).map_err(backend)? else {
            return Ok(None);
        };
        let (meta, _) = split_delivery(&value)?;
        let stored = meta.stored_first()?;
        let received_at_ms = received_at.then(|| meta.received_at_ms()).transpose()?;
        if let Some(first) = &stored.alias_of
            && let Some(value) = self
                .deliveries
                .get(DeliveryKey::new(&stored.source, first).encode())
                .map_err(backend)?
        {
            return Ok(Some((decode_stored_first(&value)?, received_at_ms)));
        }
        Ok(Some((stored, received_at_ms)))
    }

    /// A new delivery's value: a body of [`BODY_LOG_MIN`] bytes or more is appended to the
    /// body log first (see [`bodies`]), and the value points at it. `journaled`: the
    /// delivery's key, when its `received` item is held for the group commit; it goes into
    /// the body log before the record, in the body's frame or in one of its own.
    pub(super) fn new_delivery_value(
        &self,
        record: &DeliveryRecord,
        body: &[u8],
        journaled: Option<&[u8]>,
    ) -> Result<Vec<u8>, StoreError> {
        let key = journaled.unwrap_or_default();
        if body.len() >= BODY_LOG_MIN {
            let at = self.bodies.append(key, body, record.received_at_ms)?;
            self.step(Op::Claim, "after-body-log");
            Ok(encode_logged_delivery(record, &at))
        } else {
            if !key.is_empty() {
                self.bodies.append(key, &[], record.received_at_ms)?;
                self.step(Op::Claim, "after-journal");
            }
            Ok(encode_delivery(record, body))
        }
    }
}
