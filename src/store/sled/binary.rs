//! The binary form of a delivery record in sled: what a delivery value holds in front of its
//! body (see `encoding`), instead of the record's JSON.
//!
//! Why: the record is most of what sled stores per delivery, and sled writes every byte of
//! it about 1.8 times (its log-structured tree rewrites nodes); as JSON (field names, a hex
//! fingerprint, the first answer's escaped JSON) the store came to 2.2x the body bytes of
//! 1 KiB deliveries (BENCHMARKS.md, session 13). This form is postcard (serde, varints, no
//! field names) with the fingerprint as its 32 bytes: about 40 % smaller.
//!
//! The fields come in a fixed order: first what a redelivery is answered from
//! ([`StoredFirst`]), the headers last, so that the replay path and the end of a run decode
//! a prefix and stop. A version byte leads, so that a later form can be told apart; values
//! written as JSON before stay readable (`encoding` reads the value's flag), and a record
//! this form cannot hold exactly (a fingerprint that is not 64 lower-case hex digits) is
//! written as JSON. A field added to [`DeliveryRecord`] must be added here too, last: the
//! destructuring in [`encode`] does not compile until it is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::Headers;
use crate::store::{DeliveryRecord, StoreError, StoredFirst, StoredResponse};

/// The form written by [`encode`].
const VERSION: u8 = 1;

#[derive(Serialize)]
struct RecordOut<'a> {
    version: u8,
    source: &'a str,
    id: &'a str,
    fingerprint: [u8; 32],
    response: &'a Option<StoredResponse>,
    alias_of: &'a Option<String>,
    received_at_ms: u64,
    event_type: &'a Option<String>,
    lease_until_ms: Option<u64>,
    lease_owner: Option<u64>,
    handlers: &'a [String],
    body_dedup: bool,
    order_keys: &'a BTreeMap<String, String>,
    trace_parent: &'a Option<String>,
    headers: &'a Headers,
}

#[derive(Deserialize)]
struct RecordIn {
    version: u8,
    source: String,
    id: String,
    fingerprint: [u8; 32],
    response: Option<StoredResponse>,
    alias_of: Option<String>,
    received_at_ms: u64,
    event_type: Option<String>,
    lease_until_ms: Option<u64>,
    lease_owner: Option<u64>,
    handlers: Vec<String>,
    body_dedup: bool,
    order_keys: BTreeMap<String, String>,
    trace_parent: Option<String>,
    headers: Headers,
}

/// The prefix of [`RecordIn`] a redelivery needs.
#[derive(Deserialize)]
struct FirstIn {
    version: u8,
    source: String,
    id: String,
    fingerprint: [u8; 32],
    response: Option<StoredResponse>,
    alias_of: Option<String>,
}

/// The prefix of [`RecordIn`] up to its lines, the fields before them borrowed and dropped.
#[derive(Deserialize)]
struct OrderKeysIn<'a> {
    version: u8,
    _source: &'a str,
    _id: &'a str,
    _fingerprint: [u8; 32],
    #[serde(borrow)]
    _response: Option<ResponseRef<'a>>,
    #[serde(borrow)]
    _alias_of: Option<&'a str>,
    _received_at_ms: u64,
    #[serde(borrow)]
    _event_type: Option<&'a str>,
    _lease_until_ms: Option<u64>,
    _lease_owner: Option<u64>,
    #[serde(borrow)]
    _handlers: Vec<&'a str>,
    _body_dedup: bool,
    order_keys: BTreeMap<String, String>,
}

/// The prefix of [`RecordIn`] up to its received time, the fields before it borrowed and
/// dropped.
#[derive(Deserialize)]
struct ReceivedAtIn<'a> {
    version: u8,
    _source: &'a str,
    _id: &'a str,
    _fingerprint: [u8; 32],
    #[serde(borrow)]
    _response: Option<ResponseRef<'a>>,
    #[serde(borrow)]
    _alias_of: Option<&'a str>,
    received_at_ms: u64,
}

/// [`StoredResponse`] as it lies in the bytes (same fields, same order).
#[derive(Deserialize)]
struct ResponseRef<'a> {
    _status: u16,
    _body: &'a str,
}

/// `record` in the binary form, or `None` when this form cannot hold it exactly (it is then
/// written as JSON).
pub(super) fn encode(record: &DeliveryRecord) -> Option<Vec<u8>> {
    let DeliveryRecord {
        source,
        id,
        fingerprint,
        received_at_ms,
        event_type,
        headers,
        response,
        lease_until_ms,
        lease_owner,
        handlers,
        body_dedup,
        alias_of,
        order_keys,
        trace_parent,
    } = record;
    let out = RecordOut {
        version: VERSION,
        source,
        id,
        fingerprint: fingerprint_bytes(fingerprint)?,
        response,
        alias_of,
        received_at_ms: *received_at_ms,
        event_type,
        lease_until_ms: *lease_until_ms,
        lease_owner: *lease_owner,
        handlers,
        body_dedup: *body_dedup,
        order_keys,
        trace_parent,
        headers,
    };
    postcard::to_allocvec(&out).ok()
}

/// The record held in `bytes`.
pub(super) fn decode_record(bytes: &[u8]) -> Result<DeliveryRecord, StoreError> {
    let r: RecordIn = decode(bytes)?;
    check_version(r.version)?;
    Ok(DeliveryRecord {
        source: r.source,
        id: r.id,
        fingerprint: crate::domain::lower_hex(&r.fingerprint),
        received_at_ms: r.received_at_ms,
        event_type: r.event_type,
        headers: r.headers,
        response: r.response,
        lease_until_ms: r.lease_until_ms,
        lease_owner: r.lease_owner,
        handlers: r.handlers,
        body_dedup: r.body_dedup,
        alias_of: r.alias_of,
        order_keys: r.order_keys,
        trace_parent: r.trace_parent,
    })
}

/// What a later copy is answered from, the rest of `bytes` left unread.
pub(super) fn decode_stored_first(bytes: &[u8]) -> Result<StoredFirst, StoreError> {
    let r: FirstIn = decode(bytes)?;
    check_version(r.version)?;
    Ok(StoredFirst {
        source: r.source,
        id: r.id,
        fingerprint: crate::domain::lower_hex(&r.fingerprint),
        response: r.response,
        alias_of: r.alias_of,
    })
}

/// The record's `order_keys`, the headers after them left unread.
pub(super) fn decode_order_keys(bytes: &[u8]) -> Result<BTreeMap<String, String>, StoreError> {
    let r: OrderKeysIn<'_> = decode(bytes)?;
    check_version(r.version)?;
    Ok(r.order_keys)
}

/// The record's received time, the rest of `bytes` left unread.
pub(super) fn decode_received_at(bytes: &[u8]) -> Result<u64, StoreError> {
    let r: ReceivedAtIn<'_> = decode(bytes)?;
    check_version(r.version)?;
    Ok(r.received_at_ms)
}

/// A prefix of `bytes` as `T` (a whole record, or the first fields of one).
fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    postcard::take_from_bytes(bytes)
        .map(|(value, _rest)| value)
        .map_err(|e| StoreError::Corrupt(format!("binary delivery record: {e}")))
}

fn check_version(version: u8) -> Result<(), StoreError> {
    if version == VERSION {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "a delivery record of binary form {version}, which this build does not know \
             (written by a later version?)"
        )))
    }
}

/// A fingerprint's 32 bytes, when it is exactly 64 lower-case hex digits (as
/// [`crate::domain::fingerprint`] writes it), so that [`hex::encode`] gives it back unchanged.
fn fingerprint_bytes(fingerprint: &str) -> Option<[u8; 32]> {
    if fingerprint.len() != 64
        || !fingerprint
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0; 32];
    hex::decode_to_slice(fingerprint, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::store::sled) fn record() -> DeliveryRecord {
        DeliveryRecord {
            source: "stripe".into(),
            id: "evt_1".into(),
            fingerprint: crate::domain::fingerprint(b"{\"a\":1}"),
            received_at_ms: 1_796_544_360_123,
            event_type: Some("invoice.paid".into()),
            headers: Headers(vec![
                ("content-type".into(), "application/json".into()),
                ("stripe-signature".into(), "t=1,v1=ab".into()),
            ]),
            response: Some(StoredResponse {
                status: 202,
                body: r#"{"status":"accepted","delivery_id":"evt_1"}"#.into(),
            }),
            lease_until_ms: Some(7),
            lease_owner: Some(u64::MAX),
            handlers: vec!["crm".into(), "ledger".into()],
            body_dedup: true,
            alias_of: Some("evt_0".into()),
            order_keys: BTreeMap::from([("ledger".into(), "cus_9".into())]),
            trace_parent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn a_record_comes_back_whole_and_smaller_than_its_json() {
        let record = record();
        let bytes = encode(&record).expect("binary");
        assert_eq!(decode_record(&bytes).expect("decode"), record);
        let json = serde_json::to_vec(&record).expect("json");
        assert!(
            bytes.len() * 10 < json.len() * 7,
            "{} bytes against {} of JSON",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn the_prefixes_read_what_the_whole_record_holds() {
        let mut record = record();
        for alias in [Some("evt_0".to_owned()), None] {
            record.alias_of = alias;
            let bytes = encode(&record).expect("binary");
            assert_eq!(
                decode_stored_first(&bytes).expect("first"),
                StoredFirst::from(record.clone())
            );
            assert_eq!(decode_order_keys(&bytes).expect("lines"), record.order_keys);
        }
    }

    #[test]
    fn a_fingerprint_it_cannot_hold_exactly_leaves_the_record_to_json() {
        let mut record = record();
        for odd in ["ABCDEF", &"A".repeat(64), "not hex", ""] {
            record.fingerprint = odd.to_owned();
            assert!(encode(&record).is_none(), "{odd:?}");
        }
    }

    use proptest::prelude::*;

    fn any_record() -> impl Strategy<Value = DeliveryRecord> {
        let text = || ".{0,12}";
        let optional = || proptest::option::of(".{0,12}");
        (
            (text(), text(), any::<[u8; 32]>(), any::<u64>(), optional()),
            (
                prop::collection::vec((text(), text()), 0..4),
                proptest::option::of((any::<u16>(), text())),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>()),
            ),
            (
                prop::collection::vec(text(), 0..3),
                any::<bool>(),
                optional(),
                prop::collection::btree_map(text(), text(), 0..3),
                optional(),
            ),
        )
            .prop_map(
                |(
                    (source, id, fingerprint, received_at_ms, event_type),
                    (headers, response, lease_until_ms, lease_owner),
                    (handlers, body_dedup, alias_of, order_keys, trace_parent),
                )| DeliveryRecord {
                    source,
                    id,
                    fingerprint: crate::domain::lower_hex(&fingerprint),
                    received_at_ms,
                    event_type,
                    headers: Headers(headers),
                    response: response.map(|(status, body)| StoredResponse { status, body }),
                    lease_until_ms,
                    lease_owner,
                    handlers,
                    body_dedup,
                    alias_of,
                    order_keys,
                    trace_parent,
                },
            )
    }

    proptest! {
        #[test]
        fn any_record_comes_back_whole_and_its_prefixes_agree(record in any_record()) {
            let bytes = encode(&record).expect("binary");
            prop_assert_eq!(decode_record(&bytes).expect("record"), record.clone());
            prop_assert_eq!(decode_order_keys(&bytes).expect("lines"), record.order_keys.clone());
            prop_assert_eq!(decode_received_at(&bytes).expect("received"), record.received_at_ms);
            prop_assert_eq!(decode_stored_first(&bytes).expect("first"), StoredFirst::from(record));
        }

        #[test]
        fn any_bytes_decode_to_a_record_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_record(&bytes);
            let _ = decode_stored_first(&bytes);
            let _ = decode_order_keys(&bytes);
            let _ = decode_received_at(&bytes);
        }
    }

    #[test]
    fn a_truncated_or_unknown_form_is_corrupt_not_a_panic() {
        let bytes = encode(&record()).expect("binary");
        for cut in 0..bytes.len() {
            assert!(decode_record(&bytes[..cut]).is_err());
        }
        let mut later = bytes.clone();
        later[0] = VERSION + 1;
        assert!(matches!(decode_record(&later), Err(StoreError::Corrupt(_))));
        assert!(matches!(
            decode_stored_first(&later),
            Err(StoreError::Corrupt(_))
        ));
    }
}
