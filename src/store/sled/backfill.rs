//! Backfill in sled: binding a handler to deliveries stored before it existed.
//!
//! Each delivery is bound under its lock (and its `order_by` line's), with the ways in
//! written before the record that names the new pair: the queue entry (or, behind a live
//! pair of its line, the line entry alone), then the record with the handler added. A crash
//! before the record leaves an entry that leads to a pair its record does not list: the
//! dispatcher drops such a queue entry and a line does not count such an entry as live, so
//! nothing runs, `store check` finds nothing owed, and the next backfill binds the delivery
//! (its record still lacks the handler).

use super::super::{Binding, DeliveryKey, Received, StoreError};
use super::encoding::{backend, decode_delivery_key, job_queue_key, queue_key, split_time_key};
use super::order::{line_entry, line_prefix};
use super::{Op, SledInner};

impl SledInner {
    /// See [`super::super::Operations::received_between`].
    pub(super) fn received_between_sync(
        &self,
        since_ms: u64,
        until_ms: u64,
        after: Option<&Received>,
        limit: usize,
    ) -> Result<Vec<Received>, StoreError> {
        let from = match after {
            Some(a) => std::ops::Bound::Excluded(queue_key(a.received_at_ms, &a.key.encode())),
            None => std::ops::Bound::Included(since_ms.to_be_bytes().to_vec()),
        };
        let to = std::ops::Bound::Excluded(until_ms.to_be_bytes().to_vec());
        let mut out = Vec::new();
        for k in self.received.range((from, to)) {
            let k = k?;
            if let Some((received_at_ms, dk)) = split_time_key(&k)
                && let Some(key) = decode_delivery_key(dk)
            {
                out.push(Received {
                    received_at_ms,
                    key,
                });
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Binds `handler` to one delivery (see [`super::super::Operations::bind_handler`]);
    /// the writes are not waited for.
    pub(super) fn bind_one(
        &self,
        handler: &str,
        key: &DeliveryKey,
        order_key: Option<&str>,
    ) -> Result<Binding, StoreError> {
        let dk = key.encode();
        let line = order_key.map(|value| line_prefix(handler, value));
        let mut lock_keys: Vec<&[u8]> = vec![&dk];
        lock_keys.extend(line.as_deref());
        self.step(Op::Bind, "start");
        let _locks = self.lock(Op::Bind, &lock_keys);
        self.step(Op::Bind, "locked");
        let Some(mut record) = self.read_record(&dk)? else {
            return Ok(Binding::Skipped);
        };
        if record.alias_of.is_some() || record.response.is_none() {
            return Ok(Binding::Skipped);
        }
        let jk = key.job(handler).encode();
        if record.handlers.iter().any(|h| h == handler) || self.read_job(&jk)?.is_some() {
            return Ok(Binding::Already);
        }
        record.bind(handler, order_key);
        let parked = match &line {
            Some(prefix) => self.line_occupied(handler, prefix, None)?,
            None => false,
        };
        if !parked {
            self.queue
                .insert(job_queue_key(record.received_at_ms, &jk), &[])
                .map_err(backend)?;
            self.step(Op::Bind, "after-queue-entry");
        }
        if let Some(entry) = line_entry(&record, handler) {
            self.order.insert(entry, &[]).map_err(backend)?;
            self.step(Op::Bind, "after-line-entry");
        }
        self.write_record(&dk, &record)?;
        Ok(Binding::Bound)
    }
}
