//! How sled holds a delivery: key layouts (big-endian times first, so key order is time
//! order), the delivery value (the record, binary or JSON, then the raw body or where it
//! lies in the body log), and the body index entry.

use std::collections::BTreeMap;

use super::super::{DeliveryKey, DeliveryRecord, KeptFingerprint, StoreError, StoredFirst};
use super::binary;
use super::bodies::BodyRef;

pub(super) fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

pub(super) fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

pub(super) fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, numbers, options) cannot fail.
    serde_json::to_vec(value).expect("records serialize to JSON")
}

pub(super) fn queue_key(due_ms: u64, job: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + job.len());
    k.extend_from_slice(&due_ms.to_be_bytes());
    k.extend_from_slice(job);
    k
}

/// A queue entry's key: `handler \0`, the due time (u64 BE), then the job key. Each
/// handler's entries are one range in due order, so the dispatcher reads the front of the
/// handlers it may run now (not paused, under their limits) and never walks past the
/// backlog of one it may not.
pub(super) fn job_queue_key(due_ms: u64, job_key: &[u8]) -> Vec<u8> {
    // A job key is `source \0 id \0 handler`, and none of the three holds a NUL.
    let handler = job_key.rsplit(|b| *b == 0).next().unwrap_or_default();
    let mut k = handler_queue_prefix(handler);
    k.reserve(8 + job_key.len());
    k.extend_from_slice(&due_ms.to_be_bytes());
    k.extend_from_slice(job_key);
    k
}

/// Where `handler`'s queue entries start.
pub(super) fn handler_queue_prefix(handler: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(handler.len() + 1);
    k.extend_from_slice(handler);
    k.push(0);
    k
}

/// Inverse of [`job_queue_key`]: the due time and the job key.
pub(super) fn split_job_queue_key(k: &[u8]) -> Option<(u64, &[u8])> {
    let at = k.iter().position(|b| *b == 0)?;
    split_time_key(&k[at + 1..])
}

/// A job key's three parts (`source \0 id \0 handler`), borrowed from the key.
pub(super) fn job_parts(job: &[u8]) -> Option<(&str, &str, &str)> {
    let text = std::str::from_utf8(job).ok()?;
    let mut parts = text.splitn(3, '\0');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

pub(super) fn split_time_key(k: &[u8]) -> Option<(u64, &[u8])> {
    let (t, rest) = k.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*t), rest))
}

/// Set in a delivery value's length word when the body is in the body log: the tail is then
/// a [`BodyRef`], not the body. A record's JSON is far below 1 GiB, so stores written
/// before the body log never have it set.
const LOGGED: u32 = 1 << 31;

/// Set in a delivery value's length word when the record is in the binary form
/// ([`super::binary`]) rather than JSON; values written before it never have it set.
const BINARY: u32 = 1 << 30;

/// A delivery's value: the length of its record (u32 BE, with the flags above), the record,
/// then the raw body, so a replay parses the small record and never copies the body around.
pub(super) fn encode_delivery(record: &DeliveryRecord, body: &[u8]) -> Vec<u8> {
    let (meta, form) = encode_meta(record);
    encode_value(&meta, form, body)
}

/// A delivery's value whose body is in the body log at `at`.
pub(super) fn encode_logged_delivery(record: &DeliveryRecord, at: &BodyRef) -> Vec<u8> {
    let (meta, form) = encode_meta(record);
    encode_value(&meta, form | LOGGED, &at.encode())
}

/// `value` with its record replaced by `record`, its body (or body reference) kept.
pub(super) fn reencode_delivery(
    record: &DeliveryRecord,
    value: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let (flags, _, tail) = split_value(value)?;
    let (meta, form) = encode_meta(record);
    Ok(encode_value(&meta, form | (flags & LOGGED), tail))
}

/// The record in the binary form where it can be held exactly, else as JSON; with its flag.
fn encode_meta(record: &DeliveryRecord) -> (Vec<u8>, u32) {
    match binary::encode(record) {
        Some(bytes) => (bytes, BINARY),
        None => (to_json(record), 0),
    }
}

fn encode_value(meta: &[u8], flags: u32, tail: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + meta.len() + tail.len());
    v.extend_from_slice(&(meta.len() as u32 | flags).to_be_bytes());
    v.extend_from_slice(meta);
    v.extend_from_slice(tail);
    v
}

fn split_value(value: &[u8]) -> Result<(u32, &[u8], &[u8]), StoreError> {
    let (word, rest) = value
        .split_first_chunk::<4>()
        .ok_or_else(|| StoreError::Corrupt("short delivery value".into()))?;
    let word = u32::from_be_bytes(*word);
    let len = (word & !(LOGGED | BINARY)) as usize;
    if rest.len() < len {
        return Err(StoreError::Corrupt("truncated delivery value".into()));
    }
    let (meta, tail) = rest.split_at(len);
    Ok((word & (LOGGED | BINARY), meta, tail))
}

/// Where a delivery value's body is.
pub(super) enum StoredBody<'a> {
    /// In the value itself.
    Inline(&'a [u8]),
    /// In the body log.
    Logged(BodyRef),
}

/// A delivery value's record, in whichever form it was written.
pub(super) struct StoredMeta<'a> {
    binary: bool,
    bytes: &'a [u8],
}

impl StoredMeta<'_> {
    /// The whole record.
    pub(super) fn record(&self) -> Result<DeliveryRecord, StoreError> {
        if self.binary {
            binary::decode_record(self.bytes)
        } else {
            serde_json::from_slice(self.bytes).map_err(corrupt)
        }
    }

    /// What a later copy is answered from ([`StoredFirst`]), without building the rest of
    /// the record: the replay path's read.
    pub(super) fn stored_first(&self) -> Result<StoredFirst, StoreError> {
        if self.binary {
            binary::decode_stored_first(self.bytes)
        } else {
            serde_json::from_slice(self.bytes).map_err(corrupt)
        }
    }

    /// The record's `order_keys` alone (the rest is skipped, not built): what the end of
    /// every run reads to know whether it hands a line on.
    pub(super) fn order_keys(&self) -> Result<BTreeMap<String, String>, StoreError> {
        #[derive(serde::Deserialize)]
        struct OrderKeys {
            #[serde(default)]
            order_keys: BTreeMap<String, String>,
        }
        if self.binary {
            binary::decode_order_keys(self.bytes)
        } else {
            Ok(serde_json::from_slice::<OrderKeys>(self.bytes)
                .map_err(corrupt)?
                .order_keys)
        }
    }

    /// The record's received time alone (the rest is skipped, not built): what the repair
    /// after an unclean stop reads of every record (`check`).
    pub(super) fn received_at_ms(&self) -> Result<u64, StoreError> {
        #[derive(serde::Deserialize)]
        struct ReceivedAt {
            received_at_ms: u64,
        }
        if self.binary {
            binary::decode_received_at(self.bytes)
        } else {
            Ok(serde_json::from_slice::<ReceivedAt>(self.bytes)
                .map_err(corrupt)?
                .received_at_ms)
        }
    }
}

/// A delivery value's record and where its body is.
pub(super) fn split_delivery(value: &[u8]) -> Result<(StoredMeta<'_>, StoredBody<'_>), StoreError> {
    let (flags, bytes, tail) = split_value(value)?;
    let body = if flags & LOGGED != 0 {
        StoredBody::Logged(
            BodyRef::decode(tail).ok_or_else(|| StoreError::Corrupt("body reference".into()))?,
        )
    } else {
        StoredBody::Inline(tail)
    };
    let meta = StoredMeta {
        binary: flags & BINARY != 0,
        bytes,
    };
    Ok((meta, body))
}

pub(super) fn decode_record(value: &[u8]) -> Result<DeliveryRecord, StoreError> {
    split_delivery(value)?.0.record()
}

/// See [`StoredMeta::stored_first`].
pub(super) fn decode_stored_first(value: &[u8]) -> Result<StoredFirst, StoreError> {
    split_delivery(value)?.0.stored_first()
}

/// See [`StoredMeta::order_keys`].
pub(super) fn decode_order_keys(value: &[u8]) -> Result<BTreeMap<String, String>, StoreError> {
    split_delivery(value)?.0.order_keys()
}

pub(super) fn body_index_key(source: &str, fingerprint: &str) -> Vec<u8> {
    DeliveryKey::new(source, fingerprint).encode()
}

/// What the body index holds for a fingerprint.
pub(super) enum BodyEntry {
    /// The id of the stored delivery with this body.
    Live(String),
    /// That delivery expired; its fingerprint is kept (`fingerprint_retention`) with what is
    /// needed to answer a replay of it as it was answered.
    Kept(KeptFingerprint),
}

/// Marks a [`BodyEntry::Kept`] value; an id never starts with a control character.
pub(super) const KEPT: u8 = 0x01;

impl BodyEntry {
    pub(super) fn decode(value: &[u8]) -> Result<BodyEntry, StoreError> {
        match value.split_first() {
            Some((&KEPT, json)) => Ok(BodyEntry::Kept(
                serde_json::from_slice(json).map_err(corrupt)?,
            )),
            _ => Ok(BodyEntry::Live(String::from_utf8_lossy(value).into_owned())),
        }
    }
}

pub(super) fn decode_delivery_key(bytes: &[u8]) -> Option<DeliveryKey> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (source, id) = text.split_once('\0')?;
    Some(DeliveryKey::new(source, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value as versions before the binary record wrote it: the JSON's length word (with
    /// `LOGGED` when the body is in the body log), the JSON, the tail.
    fn json_value(record: &DeliveryRecord, logged: bool, tail: &[u8]) -> Vec<u8> {
        encode_value(&to_json(record), if logged { LOGGED } else { 0 }, tail)
    }

    #[test]
    fn a_json_value_of_an_earlier_version_is_read_by_every_reader() {
        let record = binary::tests::record();
        let value = json_value(&record, false, b"{}");
        assert_eq!(decode_record(&value).expect("record"), record);
        assert_eq!(
            decode_stored_first(&value).expect("first"),
            StoredFirst::from(record.clone())
        );
        assert_eq!(decode_order_keys(&value).expect("lines"), record.order_keys);
        assert!(matches!(
            split_delivery(&value).expect("split").1,
            StoredBody::Inline(b"{}")
        ));
    }

    #[test]
    fn rewriting_a_json_value_makes_it_binary_and_keeps_its_body_where_it_was() {
        let mut record = binary::tests::record();
        let at = BodyRef {
            segment: 3,
            offset: 4096,
            len: 1024,
            crc: 7,
        };
        let old = json_value(&record, true, &at.encode());
        record.lease_until_ms = None;
        let new = reencode_delivery(&record, &old).expect("rewrite");
        let (meta, body) = split_delivery(&new).expect("split");
        assert!(meta.binary, "a rewritten record is binary");
        assert_eq!(meta.record().expect("record"), record);
        assert!(matches!(body, StoredBody::Logged(b) if b == at));
        // And a binary value with its body inline stays inline when rewritten.
        let inline = encode_delivery(&record, b"body");
        let again = reencode_delivery(&record, &inline).expect("rewrite");
        assert!(matches!(
            split_delivery(&again).expect("split").1,
            StoredBody::Inline(b"body")
        ));
    }

    #[test]
    fn a_record_binary_cannot_hold_is_written_and_read_as_json() {
        let mut record = binary::tests::record();
        record.fingerprint = "not a sha-256".into();
        let value = encode_delivery(&record, b"");
        assert!(!split_delivery(&value).expect("split").0.binary);
        assert_eq!(decode_record(&value).expect("record"), record);
    }
}
