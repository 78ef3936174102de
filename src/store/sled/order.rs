//! `order_by` in sled: one line per (handler, key value), the tree `order`.
//!
//! A line's entries are the deliveries of that key whose pair with the handler is not final
//! yet, in received order (key: `handler \0`, 16 bytes of SHA-256 of the value, received_at
//! u64 BE, `source \0 id`). At most one of them has a way to run (a queue entry or a live
//! lease): the *active* one. The others are *parked*: they have no queue entry at all, so a
//! line of any length costs the dispatcher nothing, and they never start before their turn.
//!
//! - A claim enters each ordered handler's line: active (queued as usual) when the line has
//!   no live entry, else parked. The line's entry is written after the record (a crash in
//!   between leaves an acknowledged pair outside its line: the start-up repair puts it back
//!   in, as it puts back a missing queue entry).
//! - When the active pair becomes final (succeeded or dead), the first live entry of the
//!   line after it is made active, then its own entry is removed. A crash between the final
//!   state and that promotion leaves a line with nobody active: [`SledInner::repair_lines`]
//!   finds it at the next start, before the dispatcher runs.
//! - An operator retry of a dead pair puts it back in its line (at its received_at place):
//!   it runs at once if the line is empty, else after the active one.
//!
//! Every operation that reads or changes a line holds the line's lock (one of the store's
//! stripes, picked by the line's prefix) besides its delivery's: a claim, the final outcome
//! of a run, an operator retry. Promotion writes the next pair's queue entry (and, for a
//! retried pair, its state) without that pair's delivery lock: safe, because a parked pair
//! has no queue entry, so no run of it can begin before the promotion's last write, and every
//! other write to a parked pair happens under the line's lock.

use super::super::{DeliveryKey, DeliveryRecord, JobState, StoreError, line_id, transitions};
use super::encoding::{backend, decode_delivery_key, job_queue_key, split_time_key};
use super::{Op, SledInner};

/// Bytes of [`line_id`] in a line's key.
const VALUE_HASH_LEN: usize = 16;

/// The prefix of `handler`'s line for the key `value`; also the line's lock key.
pub(super) fn line_prefix(handler: &str, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(handler.len() + 1 + VALUE_HASH_LEN);
    k.extend_from_slice(handler.as_bytes());
    k.push(0);
    k.extend_from_slice(&line_id(value));
    k
}

/// The line entry of `record` for `handler`, if the handler's runs of it are ordered.
pub(super) fn line_entry(record: &DeliveryRecord, handler: &str) -> Option<Vec<u8>> {
    let value = record.order_keys.get(handler)?;
    let mut k = line_prefix(handler, value);
    k.extend_from_slice(&record.received_at_ms.to_be_bytes());
    k.extend_from_slice(&record.key().encode());
    Some(k)
}

/// The lock keys of every line `record` is in.
pub(super) fn line_locks(record: &DeliveryRecord) -> Vec<Vec<u8>> {
    record
        .order_keys
        .iter()
        .map(|(handler, value)| line_prefix(handler, value))
        .collect()
}

/// The length of a line's prefix, from the handler's name at the front of a key.
fn prefix_len(key: &[u8]) -> Option<usize> {
    let end = key.iter().position(|b| *b == 0)?;
    let len = end + 1 + VALUE_HASH_LEN;
    (key.len() >= len).then_some(len)
}

/// The first key after every key that starts with `prefix`.
fn after_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut next = prefix.to_vec();
    while let Some(last) = next.pop() {
        if last < u8::MAX {
            next.push(last + 1);
            return Some(next);
        }
    }
    None
}

/// An entry of a line: the delivery it stands for.
struct Entry {
    key: sled::IVec,
    delivery: DeliveryKey,
}

impl SledInner {
    /// The entries of the line with `prefix`, in received order.
    fn line(&self, prefix: &[u8]) -> impl Iterator<Item = Result<Entry, StoreError>> {
        let at = prefix.len();
        self.order.scan_prefix(prefix).keys().filter_map(move |k| {
            let key = match k {
                Ok(k) => k,
                Err(e) => return Some(Err(backend(e))),
            };
            let delivery = split_time_key(&key[at..]).and_then(|(_, dk)| decode_delivery_key(dk));
            delivery.map(|delivery| Ok(Entry { key, delivery }))
        })
    }

    /// The record and state of an entry's pair while it is still in line; with `tidy`, an
    /// entry whose delivery is gone or whose pair is final (what a crash can leave) is
    /// removed.
    fn live(
        &self,
        entry: &Entry,
        handler: &str,
        tidy: bool,
    ) -> Result<Option<(DeliveryRecord, Option<JobState>)>, StoreError> {
        let record = self.read_record(&entry.delivery.encode())?;
        let state = self.read_job(&entry.delivery.job(handler).encode())?;
        match record {
            // A record that does not list the handler: a backfill cut by a crash before it.
            Some(record)
                if !state.as_ref().is_some_and(JobState::is_final)
                    && record.handlers.iter().any(|h| h == handler) =>
            {
                Ok(Some((record, state)))
            }
            _ => {
                if tidy {
                    self.order.remove(&entry.key).map_err(backend)?;
                }
                Ok(None)
            }
        }
    }

    /// Whether `handler`'s line `prefix` has a live entry other than `except`'s (the
    /// caller holds the line's lock).
    pub(super) fn line_occupied(
        &self,
        handler: &str,
        prefix: &[u8],
        except: Option<&DeliveryKey>,
    ) -> Result<bool, StoreError> {
        for entry in self.line(prefix) {
            let entry = entry?;
            if Some(&entry.delivery) == except {
                continue;
            }
            if self.live(&entry, handler, true)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the pair is in its line (ordered and not yet run to the end).
    pub(super) fn in_line(
        &self,
        record: &DeliveryRecord,
        handler: &str,
    ) -> Result<bool, StoreError> {
        match line_entry(record, handler) {
            Some(k) => self.order.contains_key(k).map_err(backend),
            None => Ok(false),
        }
    }

    /// Gives the first live entry of `handler`'s line `prefix` other than `done`'s a way to
    /// run, unless some live entry already has one (the caller holds the line's lock).
    /// Returns whether it made one active.
    pub(super) fn promote_next(
        &self,
        op: Op,
        handler: &str,
        prefix: &[u8],
        done: Option<&DeliveryKey>,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut first: Option<(DeliveryRecord, Option<JobState>)> = None;
        for entry in self.line(prefix) {
            let entry = entry?;
            if Some(&entry.delivery) == done {
                continue;
            }
            let Some((record, state)) = self.live(&entry, handler, true)? else {
                continue;
            };
            let jk = record.key().job(handler).encode();
            if self.has_way_to_run(&record, &jk, state.as_ref(), now_ms)? {
                return Ok(false);
            }
            if first.is_none() {
                first = Some((record, state));
            }
        }
        let Some((record, state)) = first else {
            return Ok(false);
        };
        let jk = record.key().job(handler).encode();
        let due = transitions::next_in_line_due(state.as_ref(), record.received_at_ms, now_ms);
        match state {
            // Never run: its queue entry is the one a claim writes, at received_at.
            None => {
                self.queue
                    .insert(job_queue_key(due, &jk), &[])
                    .map_err(backend)?;
            }
            // With a state (put back in line by an operator retry, or bound by a
            // backfill): the state that names the entry first, so that no run can begin
            // before both are written.
            Some(mut state) => {
                state.queued_at_ms = Some(due);
                state.updated_ms = now_ms;
                self.write_job(&jk, &state)?;
                self.step(op, "after-promoted-state");
                self.queue
                    .insert(job_queue_key(due, &jk), &[])
                    .map_err(backend)?;
            }
        }
        self.step(op, "after-promotion");
        Ok(true)
    }

    /// Puts a pair that is outside its line (a dead pair an operator retries, or one a
    /// crash left out) back in: active and queued now when the line has nobody else, else
    /// parked. `state` is written either way. Returns whether it was queued now.
    pub(super) fn enter_line(
        &self,
        op: Op,
        record: &DeliveryRecord,
        handler: &str,
        state: &mut JobState,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let (Some(entry), Some(value)) =
            (line_entry(record, handler), record.order_keys.get(handler))
        else {
            return Ok(false);
        };
        let prefix = line_prefix(handler, value);
        let jk = record.key().job(handler).encode();
        let occupied = self.line_occupied(handler, &prefix, Some(&record.key()))?;
        if occupied {
            // Parked: no queue entry; promotion gives it one in its turn.
            if let Some(old) = state.queued_at_ms.take() {
                self.write_job(&jk, state)?;
                self.remove_queue_entry(&job_queue_key(old, &jk))?;
            } else {
                self.write_job(&jk, state)?;
            }
            self.step(op, "after-parked-state");
            self.order.insert(entry, &[]).map_err(backend)?;
            return Ok(false);
        }
        self.requeue(op, &jk, state, now_ms)?;
        self.order.insert(entry, &[]).map_err(backend)?;
        Ok(true)
    }

    /// At start (and in `store check`): every line whose live entries have no way to run —
    /// a crash between a final outcome and the promotion — gets its first one made active;
    /// entries a crash left behind (final pairs, deliveries gone) are removed. Each line is
    /// read up to its active entry, which is normally its first.
    pub(super) fn repair_lines(
        &self,
        repair: bool,
        now_ms: u64,
        violations: &mut Vec<String>,
    ) -> Result<(), StoreError> {
        let mut from: Vec<u8> = Vec::new();
        while let Some(k) = self.order.range(from.clone()..).keys().next() {
            let k = k.map_err(backend)?;
            let Some(len) = prefix_len(&k) else {
                self.order.remove(&k).map_err(backend)?;
                continue;
            };
            let prefix = k[..len].to_vec();
            let handler = String::from_utf8_lossy(&k[..len - VALUE_HASH_LEN - 1]).into_owned();
            let _locks = self.lock(Op::Retry, &[&prefix]);
            let stuck = {
                let mut waiting = None;
                let mut active = false;
                for entry in self.line(&prefix) {
                    let entry = entry?;
                    let Some((record, state)) = self.live(&entry, &handler, repair)? else {
                        continue;
                    };
                    let jk = record.key().job(&handler).encode();
                    if self.has_way_to_run(&record, &jk, state.as_ref(), now_ms)? {
                        active = true;
                        break;
                    }
                    waiting.get_or_insert(record.key().job(&handler));
                }
                waiting.filter(|_| !active)
            };
            if let Some(job) = stuck {
                violations.push(format!(
                    "{job}: waits in its order_by line behind nothing that runs (invariants 1, 2)"
                ));
                if repair {
                    self.promote_next(Op::Retry, &handler, &prefix, None, now_ms)?;
                }
            }
            match after_prefix(&prefix) {
                Some(next) => from = next,
                None => break,
            }
        }
        Ok(())
    }

    /// Per handler, the pairs that wait in a line (in it, not final, with no way to run).
    pub(super) fn waiting_in_lines(
        &self,
        now_ms: u64,
    ) -> Result<std::collections::HashMap<String, usize>, StoreError> {
        let mut waiting = std::collections::HashMap::new();
        for k in self.order.iter().keys() {
            let k = k.map_err(backend)?;
            let Some(len) = prefix_len(&k) else {
                continue;
            };
            let handler = String::from_utf8_lossy(&k[..len - VALUE_HASH_LEN - 1]).into_owned();
            let Some(delivery) =
                split_time_key(&k[len..]).and_then(|(_, dk)| decode_delivery_key(dk))
            else {
                continue;
            };
            let entry = Entry { key: k, delivery };
            if let Some((record, state)) = self.live(&entry, &handler, false)?
                && !self.has_way_to_run(
                    &record,
                    &record.key().job(&handler).encode(),
                    state.as_ref(),
                    now_ms,
                )?
            {
                *waiting.entry(handler).or_default() += 1;
            }
        }
        Ok(waiting)
    }

    /// Writes the pair's line entry as it stands (a repair: the pair keeps its way to run).
    pub(super) fn add_to_line(
        &self,
        record: &DeliveryRecord,
        handler: &str,
    ) -> Result<(), StoreError> {
        if let Some(entry) = line_entry(record, handler) {
            self.order.insert(entry, &[]).map_err(backend)?;
        }
        Ok(())
    }

    /// Removes the pair's line entry once it is final, after promoting the next one.
    pub(super) fn leave_line(
        &self,
        op: Op,
        record: &DeliveryRecord,
        handler: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let (Some(entry), Some(value)) =
            (line_entry(record, handler), record.order_keys.get(handler))
        else {
            return Ok(());
        };
        let prefix = line_prefix(handler, value);
        self.promote_next(op, handler, &prefix, Some(&record.key()), now_ms)?;
        self.order.remove(entry).map_err(backend)?;
        self.step(op, "after-line-entry");
        Ok(())
    }
}
