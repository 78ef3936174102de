//! The types every layer shares, importing nothing of the crate: the request headers as
//! kept, the delivery id, the body fingerprint, the event-type pattern. Each is parsed once
//! at the edge ("parse, don't validate") and trusted everywhere after.

use sha2::{Digest, Sha256};

/// Request headers as the service keeps them: lower-case names, values as text.
///
/// Values that are not valid UTF-8 are kept lossily; a signature header that is not text is
/// malformed anyway.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Builds headers from name/value pairs (names are lower-cased).
    pub fn from_pairs<K: AsRef<str>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Headers(
            pairs
                .into_iter()
                .map(|(k, v)| (k.as_ref().to_ascii_lowercase(), v.into()))
                .collect(),
        )
    }
}

/// `s` with every control character (C0, DEL, C1) escaped as Rust writes it (`\u{1b}`).
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A delivery id: 1 to 255 bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(String);

impl DeliveryId {
    /// Longest accepted id, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Parses an id, rejecting empty, over-long and control-character ids.
    pub fn parse(raw: &str) -> Option<DeliveryId> {
        let ok =
            !raw.is_empty() && raw.len() <= Self::MAX_LEN && !raw.chars().any(char::is_control);
        ok.then(|| DeliveryId(raw.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lower-case hex SHA-256 of a body: what "same body" means.
pub fn fingerprint(body: &[u8]) -> String {
    lower_hex(&Sha256::digest(body))
}

/// `bytes` as lower-case hex, as `hex::encode` writes it, by table: `hex::encode` builds
/// its string a `char` at a time through an iterator, and every delivery (redeliveries
/// included) hex-encodes a fingerprint or two and an idempotency key (~2 % of a
/// redelivery's CPU in session 18's profile).
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    text
}

/// Why an event-type pattern is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The empty pattern.
    #[error("an empty pattern matches nothing; use \"*\" for every event")]
    Empty,
    /// A `*` that is not alone and not the last segment.
    #[error("pattern `{0}`: `*` may only stand alone or end a pattern (`application.*`)")]
    MisplacedWildcard(String),
}

/// An event-type pattern: `*`, `prefix.*` or an exact type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventPattern {
    /// Every delivery, with or without an event type.
    Any,
    /// Types starting with `prefix.`.
    Prefix(String),
    /// Exactly this type.
    Exact(String),
}

impl EventPattern {
    /// Parses a pattern; `*` is allowed only alone or as the last segment.
    pub fn parse(raw: &str) -> Result<EventPattern, PatternError> {
        if raw == "*" {
            return Ok(EventPattern::Any);
        }
        if raw.is_empty() {
            return Err(PatternError::Empty);
        }
        if let Some(prefix) = raw.strip_suffix(".*")
            && !prefix.is_empty()
            && !prefix.contains('*')
        {
            return Ok(EventPattern::Prefix(format!("{prefix}.")));
        }
        if raw.contains('*') {
            return Err(PatternError::MisplacedWildcard(raw.to_owned()));
        }
        Ok(EventPattern::Exact(raw.to_owned()))
    }

    /// Whether `event_type` matches.
    pub fn matches(&self, event_type: Option<&str>) -> bool {
        match (self, event_type) {
            (EventPattern::Any, _) => true,
            (EventPattern::Prefix(p), Some(t)) => t.starts_with(p.as_str()),
            (EventPattern::Exact(e), Some(t)) => e == t,
            (_, None) => false,
        }
    }
}

impl<'de> serde::Deserialize<'de> for EventPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EventPattern, D::Error> {
        let text = String::deserialize(d)?;
        EventPattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A handler's `match`: for every JSON pointer, the values the body may hold there. Empty
/// matches every delivery.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BodyMatch(Vec<(String, Vec<serde_json::Value>)>);

impl BodyMatch {
    /// From pointer -> allowed values.
    pub fn new(
        conditions: impl IntoIterator<Item = (String, Vec<serde_json::Value>)>,
    ) -> BodyMatch {
        BodyMatch(conditions.into_iter().collect())
    }

    /// The conditions, pointer -> allowed values.
    pub fn into_conditions(self) -> Vec<(String, Vec<serde_json::Value>)> {
        self.0
    }

    /// Whether there is any condition (then the body must be read as JSON).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `body` holds an allowed value at every pointer (a body that is not JSON holds
    /// none).
    pub fn matches(&self, body: Option<&serde_json::Value>) -> bool {
        self.0.iter().all(|(pointer, allowed)| {
            body.and_then(|b| b.pointer(pointer))
                .is_some_and(|v| allowed.contains(v))
        })
    }
}

/// The value a handler's `order_by` pointer finds in a delivery's body, as the text its
/// runs are ordered by: a string as itself, any other value as its JSON (so the number
/// `42` and the string `"42"` are different keys). `None` (run unordered) when the body
/// does not hold the pointer or holds `null` there.
pub fn order_key_at(body: &serde_json::Value, pointer: &str) -> Option<String> {
    match body.pointer(pointer)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// A handler's `rate`: at most `count` run starts per `per` ("50/s", "300/m", "1000/h").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Starts allowed per period (at least 1).
    pub count: u32,
    /// The period: a second, a minute or an hour.
    pub per: std::time::Duration,
}

/// Why a `rate` is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "rate `{0}`: expected a positive whole number of starts per unit, like \"50/s\", \"300/m\" or \"1000/h\""
)]
pub struct RateError(String);

impl Rate {
    /// The time between two starts when they are spread evenly.
    pub fn interval(&self) -> std::time::Duration {
        self.per / self.count
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl std::str::FromStr for Rate {
    type Err = RateError;

    fn from_str(text: &str) -> Result<Rate, RateError> {
        let err = || RateError(text.to_owned());
        let (count, unit) = text.trim().split_once('/').ok_or_else(err)?;
        let count: u32 = count.trim().parse().map_err(|_| err())?;
        let per = match unit.trim() {
            "s" => std::time::Duration::from_secs(1),
            "m" => std::time::Duration::from_secs(60),
            "h" => std::time::Duration::from_secs(3600),
            _ => return Err(err()),
        };
        if count == 0 {
            return Err(err());
        }
        Ok(Rate { count, per })
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The `Idempotency-Key` of a (source, delivery, handler) pair: lower-case hex SHA-256 of
/// the UTF-8 bytes `source ␀ delivery id ␀ handler` — 64 characters, the same for every
/// attempt, restart, replica and upgrade, different for any other pair (none of the three
/// holds a NUL). Written here, apart from any store's key layout, so that a change of layout
/// can never change a key a partner already saw.
pub fn idempotency_key(source: &str, id: &str, handler: &str) -> String {
    lower_hex(&key_material(source, id, handler, None))
}

/// The `Idempotency-Key` of step `step` of a pair's downstream calls: hex SHA-256 of
/// `source ␀ delivery id ␀ handler ␀ step` (docs/calls.md).
pub fn step_key(source: &str, id: &str, handler: &str, step: &str) -> String {
    lower_hex(&key_material(source, id, handler, Some(step)))
}

fn key_material(source: &str, id: &str, handler: &str, step: Option<&str>) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(source.as_bytes());
    hash.update([0]);
    hash.update(id.as_bytes());
    hash.update([0]);
    hash.update(handler.as_bytes());
    if let Some(step) = step {
        hash.update([0]);
        hash.update(step.as_bytes());
    }
    hash.finalize().into()
}

#[cfg(test)]
mod key_tests {
    #[test]
    fn lower_hex_writes_what_the_hex_crate_writes() {
        let every_byte: Vec<u8> = (0..=255).collect();
        assert_eq!(super::lower_hex(&every_byte), hex::encode(&every_byte));
        assert_eq!(super::lower_hex(&[]), "");
    }

    #[test]
    fn keys_follow_the_documented_formula() {
        use sha2::Digest as _;
        let by_hand = hex::encode(sha2::Sha256::digest(b"credicorp\0msg_1\0open-case"));
        assert_eq!(
            super::idempotency_key("credicorp", "msg_1", "open-case"),
            by_hand
        );
        let by_hand = hex::encode(sha2::Sha256::digest(b"credicorp\0msg_1\0open-case\0s"));
        assert_eq!(
            super::step_key("credicorp", "msg_1", "open-case", "s"),
            by_hand
        );
        assert_ne!(
            super::idempotency_key("credicorp", "msg_1", "a"),
            super::idempotency_key("credicorp", "msg_1a", "")
        );
    }
}

#[cfg(test)]
mod order_key_tests {
    use super::order_key_at;

    #[test]
    fn an_order_key_is_the_value_at_the_pointer_and_null_or_absent_is_none() {
        let body = serde_json::json!({
            "data": {"id": "app_1", "n": 42, "s": "42", "none": null, "obj": {"a": 1}}
        });
        assert_eq!(order_key_at(&body, "/data/id").as_deref(), Some("app_1"));
        assert_eq!(
            order_key_at(&body, "/data/n"),
            order_key_at(&body, "/data/s")
        );
        assert_eq!(
            order_key_at(&body, "/data/obj").as_deref(),
            Some(r#"{"a":1}"#)
        );
        assert_eq!(order_key_at(&body, "/data/none"), None);
        assert_eq!(order_key_at(&body, "/data/missing"), None);
    }
}

#[cfg(test)]
mod rate_tests {
    use super::Rate;
    use std::time::Duration;

    #[test]
    fn rates_parse_with_their_unit_and_refuse_the_rest() {
        assert_eq!(
            "50/s".parse::<Rate>(),
            Ok(Rate {
                count: 50,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            "300/m".parse::<Rate>().map(|r| r.interval()),
            Ok(Duration::from_millis(200))
        );
        assert_eq!(
            "2/h".parse::<Rate>().map(|r| r.per),
            Ok(Duration::from_secs(3600))
        );
        for bad in ["0/s", "-1/s", "5/x", "5", "/s", "1.5/s", "five/s", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }
}

/// The string at a JSON pointer in a JSON document, read without building the document:
/// every other value is skipped, though still checked to be JSON, so an invalid body is an
/// error exactly as a full parse would make it. The same answer as
/// `serde_json::from_slice::<Value>(body)?.pointer(pointer)?.as_str()` (a repeated key: the
/// last one counts), at a fraction of the allocations: this runs on every request whose
/// scheme reads its event type or id from the body, redeliveries included.
pub fn json_string_at(body: &[u8], pointer: &str) -> Result<Option<String>, serde_json::Error> {
    let path: Option<Vec<String>> = if pointer.is_empty() {
        Some(Vec::new())
    } else {
        pointer.strip_prefix('/').map(|rest| {
            rest.split('/')
                .map(|s| s.replace("~1", "/").replace("~0", "~"))
                .collect()
        })
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = match &path {
        Some(path) => serde::de::DeserializeSeed::deserialize(StringAt(path), &mut de)?,
        None => {
            serde::de::Deserialize::deserialize(&mut de).map(|_: serde::de::IgnoredAny| None)?
        }
    };
    de.end()?;
    Ok(found)
}

/// Walks a JSON document towards the rest of a pointer (see [`json_string_at`]).
struct StringAt<'p>(&'p [String]);

impl<'de> serde::de::DeserializeSeed<'de> for StringAt<'_> {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StringAt<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<String>, E> {
        Ok(self.0.is_empty().then(|| v.to_owned()))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<Option<String>, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match self.0.split_first() {
                // The last of repeated keys counts, as in a parsed `Value`.
                Some((first, rest)) if *first == key => {
                    found = map.next_value_seed(StringAt(rest))?
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<Option<String>, A::Error> {
        // An index as `Value::pointer` reads one: digits, no leading zero.
        let index = self.0.split_first().and_then(|(first, rest)| {
            let canonical = first == "0"
                || (!first.starts_with('0') && first.bytes().all(|b| b.is_ascii_digit()));
            canonical
                .then(|| first.parse::<usize>().ok())
                .flatten()
                .map(|i| (i, rest))
        });
        let mut found = None;
        let mut at = 0usize;
        loop {
            let element = match index {
                Some((i, rest)) if i == at => seq.next_element_seed(StringAt(rest))?.map(|v| {
                    found = v;
                }),
                _ => seq.next_element::<serde::de::IgnoredAny>()?.map(|_| ()),
            };
            if element.is_none() {
                return Ok(found);
            }
            at += 1;
        }
    }
}

#[cfg(test)]
mod json_pointer_tests {
    use proptest::prelude::*;

    fn reference(body: &[u8], pointer: &str) -> Result<Option<String>, ()> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| ())?;
        Ok(value
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .map(str::to_owned))
    }

    #[test]
    fn reads_what_a_parsed_value_reads() {
        let body = br#"{"type":"a.b","data":{"x/y":{"~k":"esc"},"list":["zero",{"t":"one"}],"n":1},"dup":"first","dup":"last"}"#;
        for pointer in [
            "",
            "/type",
            "/data/x~1y/~0k",
            "/data/list/0",
            "/data/list/1/t",
            "/data/list/01",
            "/data/list/2",
            "/data/n",
            "/dup",
            "/missing",
            "type",
            "/data",
        ] {
            assert_eq!(
                super::json_string_at(body, pointer).map_err(|_| ()),
                reference(body, pointer),
                "{pointer}"
            );
        }
        assert!(super::json_string_at(b"{\"type\":\"a\"", "/type").is_err());
        assert!(super::json_string_at(b"{\"type\":\"a\"} x", "/type").is_err());
        assert!(super::json_string_at(b"not json", "/type").is_err());
    }

    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i32>().prop_map(serde_json::Value::from),
            "[a-c~/]{0,3}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::vec(("[a-c~/]{0,2}", inner), 0..4)
                    .prop_map(|kv| { serde_json::Value::Object(kv.into_iter().collect()) }),
            ]
        })
    }

    proptest! {
        #[test]
        fn agrees_with_value_pointer(doc in json(), segments in prop::collection::vec("[a-c0-2~/]{0,2}", 0..4)) {
            let body = serde_json::to_vec(&doc).expect("json");
            let pointer: String = segments
                .iter()
                .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
                .collect();
            prop_assert_eq!(super::json_string_at(&body, &pointer).map_err(|_| ()), reference(&body, &pointer));
        }
    }
}
