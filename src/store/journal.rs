//! The call journal's stored shape (design.md, "Downstream calls"): the final answer of
//! each step of a (delivery, handler) pair, kept with the fingerprint of the request that
//! got it, so that a later run of the pair reaching the same step gets that answer without
//! a network call.
//!
//! Both backends keep a record per (source, delivery id, handler, step); it goes with its
//! delivery (retention removes it, `store copy` carries it). It is written first-writer-wins
//! and without waiting for the disk: a crash before it is written is closed by the
//! partner's own idempotency key.

use serde::{Deserialize, Serialize};

/// The final answer of one step, as the journal keeps it. Never holds a request header,
/// a URL's credentials or its query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// `METHOD url` with the URL's user, password and query removed: what may be shown.
    pub request: String,
    /// Hex SHA-256 over the method, the URL without credentials (query included) and the
    /// SHA-256 of the body: a later run's request for this step must have the same.
    pub fingerprint: String,
    /// The answer's status.
    pub status: u16,
    /// Its `Content-Type`, if any.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Its `Location`, if any.
    #[serde(default)]
    pub location: Option<String>,
    /// Its body, up to `calls.journal_max_bytes`.
    #[serde(default, with = "base64_bytes")]
    pub body: Vec<u8>,
    /// The body was longer than the journal keeps: `body` is its start.
    #[serde(default)]
    pub body_truncated: bool,
    /// HTTP exchanges it took within the run that made it.
    pub attempts: u32,
    /// When the answer came (ms since the epoch).
    pub at_ms: u64,
    /// How many later runs got this answer from the journal instead of the network.
    #[serde(default)]
    pub replayed: u32,
}

/// One step of a delivery's journal, for the admin API and the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The handler whose step it is.
    pub handler: String,
    /// The step's name.
    pub step: String,
    /// What was kept.
    pub record: CallRecord,
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_with_a_binary_body() {
        let record = CallRecord {
            request: "POST https://partner.test/links".into(),
            fingerprint: "ab".repeat(32),
            status: 201,
            content_type: Some("application/json".into()),
            location: Some("/links/1".into()),
            body: vec![0, 159, 146, 150, b'{'],
            body_truncated: false,
            attempts: 2,
            at_ms: 7,
            replayed: 0,
        };
        let json = serde_json::to_vec(&record).expect("json");
        assert_eq!(
            serde_json::from_slice::<CallRecord>(&json).expect("back"),
            record
        );
    }
}
