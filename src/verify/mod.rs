//! Authentication of deliveries: one [`SignatureScheme`] per provider, behind one trait.
//!
//! Verification is pure: it sees the raw body bytes exactly as received (never re-serialized
//! JSON), the headers, and a `now` passed in, so tolerance edges are testable without a
//! clock. Only [`Source::authenticate`] turns a request into an [`AuthenticatedDelivery`],
//! and only an authenticated delivery can be claimed; an unverified payload reaching a
//! handler does not compile.
//!
//! Secrets live in [`Secret`], whose `Debug` is redacted; no error carries the expected
//! signature, only which check failed.

pub mod hmac_generic;
mod mac;
pub mod presets;
mod source;
mod standard_webhooks;
pub mod stripe;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

pub use source::Source;
pub use standard_webhooks::StandardWebhooks;

/// The most signature entries a header may carry (every scheme's list): enough for any
/// rotation, and a bound on the work an unauthenticated request can ask for. A header with
/// more is `invalid_signature` without any of them being checked.
pub const MAX_SIGNATURE_ENTRIES: usize = 16;

/// Longest accepted event type, in bytes (like a delivery id).
pub const MAX_EVENT_TYPE_LEN: usize = 255;

/// `now` as Unix seconds, the way every scheme writes its signed timestamp.
pub(crate) fn unix_seconds(now: SystemTime) -> String {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string()
}

/// Seconds between `ts` and `now`, in whichever direction.
pub(crate) fn skew(ts: i64, now: SystemTime) -> Duration {
    let now_s = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    Duration::from_secs(now_s.abs_diff(ts))
}

pub use crate::domain::{DeliveryId, Headers};

/// A signing secret; never printed.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    /// The key bytes, for the MAC.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a signature check failed; each maps to one row of design.md's "Checks" table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A header the scheme needs is absent.
    #[error("signature headers missing")]
    Missing,
    /// A header is malformed, or no configured secret produces any given signature.
    #[error("no configured secret matches, or a signature header is malformed")]
    Invalid,
    /// The signature is valid but its timestamp is too far from now.
    #[error("signed timestamp outside tolerance")]
    OutOfTolerance,
}

/// What a successful signature check covered, beyond the body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// The delivery id the signature was computed over, for schemes that sign it
    /// (`webhook-id` or `svix-id`, whichever the check read; a generic scheme's `{id}`).
    /// When present, this and nothing else is the id that gets claimed (invariant 3).
    pub signed_id: Option<String>,
}

/// Why a scheme could not be built from its keys and settings. Never shows a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemeError {
    /// No secret configured.
    #[error("no secrets")]
    NoSecrets,
    /// One secret is the empty string.
    #[error("a secret is empty")]
    EmptySecret,
    /// `standard-webhooks`: neither secrets nor public keys.
    #[error("no secrets and no public keys")]
    NoKeys,
    /// `standard-webhooks`: secret number `.0` (from 1) does not decode.
    #[error("secret #{0} is not `whsec_` followed by base64")]
    BadSecret(usize),
    /// `standard-webhooks`: public key number `.0` (from 1) is not an ed25519 key.
    #[error("public key #{0} is not `whpk_` followed by a base64 ed25519 key")]
    BadPublicKey(usize),
    /// `hmac-sha256`: the `signed_content` template is malformed.
    #[error("signed_content `{template}`: {problem}")]
    Template {
        /// The template as configured.
        template: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// `hmac-sha256`: the template signs a value whose header is not configured.
    #[error("signed_content uses {{{placeholder}}} but {key} is not set")]
    Unconfigured {
        /// The placeholder, `id` or `timestamp`.
        placeholder: &'static str,
        /// The missing key.
        key: &'static str,
    },
}

/// Why a request is not an authenticated delivery: the signature rows of design.md's
/// "Checks" table, then the id and event-type rows. HTTP-free; `error.rs` maps each to its
/// status and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The signature check failed.
    #[error(transparent)]
    Signature(#[from] VerifyError),
    /// No usable delivery id (absent, empty, over 255 bytes, control characters, not text).
    #[error("the delivery id is missing, longer than 255 bytes, or holds control characters")]
    InvalidDeliveryId,
    /// The body must be JSON to read the id or event type from it, and is not.
    #[error("the body is not valid JSON")]
    InvalidJson,
    /// The event type is over 255 bytes, holds control characters, or is not text.
    #[error("the event type is longer than 255 bytes or holds control characters")]
    InvalidEventType,
}

/// One provider's way of signing a delivery.
pub trait SignatureScheme: Send + Sync + std::fmt::Debug {
    /// Checks the signature of `body` under `headers` at time `now`, and says what it
    /// covered.
    fn verify(
        &self,
        headers: &Headers,
        body: &[u8],
        now: SystemTime,
        tolerance: Duration,
    ) -> Result<Verified, VerifyError>;

    /// Whether the headers this scheme needs to check a signature are all there: checked
    /// before the body is read, so a request without them costs no body.
    fn has_signature_headers(&self, headers: &Headers) -> bool;

    /// The headers carrying signatures (every alternative name): used for the check, never
    /// stored with the delivery.
    fn signature_headers(&self) -> Vec<&str>;

    /// Every header [`verify`](Self::verify) reads (signatures, timestamp, a signed id,
    /// every alternative name): each must be text on the wire, since a value read lossily
    /// would be checked as bytes the sender never sent.
    fn read_headers(&self) -> Vec<&str> {
        self.signature_headers()
    }

    /// Header names and values a sender would attach to `body` with delivery id `id`,
    /// signed with the first secret at time `now`. Used by `sign`, `replay` and tests.
    fn sign(&self, id: &str, body: &[u8], now: SystemTime) -> Vec<(String, String)>;

    /// Where this scheme takes the delivery id from by default.
    fn default_id_field(&self) -> Field;

    /// Where this scheme takes the event type from by default.
    fn default_event_type_field(&self) -> Field;

    /// Whether the header `name` is covered by the signature (then an id read from it
    /// cannot be swapped by a replayer, and body dedup is not needed).
    fn signs_header(&self, _name: &str) -> bool {
        false
    }

    /// A provider handshake to answer directly instead of recording a delivery (Slack's
    /// `url_verification`): the JSON body to answer 200 with.
    fn handshake(&self, _body: &[u8]) -> Option<String> {
        None
    }
}

/// Computes a field from the body.
pub type DeriveFn = fn(&[u8]) -> Result<Option<String>, FieldError>;

/// Why a derived field could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldError {
    /// The body had to be JSON and is not.
    NotJson,
}

/// Where a value is read from in a request.
#[derive(Debug, Clone)]
pub enum Field {
    /// A header, by name.
    Header(String),
    /// A JSON pointer into the body (RFC 6901).
    Pointer(String),
    /// Computed from the body by the scheme (Slack's JSON-or-form bodies), with the JSON
    /// pointer it reads when the body is JSON (where a fixture's id is written).
    Derived(DeriveFn, Option<&'static str>),
}

/// A delivery whose signature, id and (where read from the body) JSON have been checked.
///
/// Only [`Source::authenticate`] (or [`Source::read_event_type`], its last step) makes one
/// (its fields are private to this module), and only one of these can become a claim
/// ([`crate::store::NewDelivery::new`]): a route, a test or a plugin cannot assemble a
/// claimable delivery from headers it read itself.
/// Where the scheme signs the delivery id, [`AuthenticatedDelivery::id`] is that signed id.
#[derive(Debug, Clone)]
pub struct AuthenticatedDelivery {
    source: String,
    id: DeliveryId,
    event_type: Option<String>,
    headers: Headers,
    body: Bytes,
}

impl AuthenticatedDelivery {
    /// The source name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The delivery id: the signed one where the scheme signs it.
    pub fn id(&self) -> &DeliveryId {
        &self.id
    }

    /// The event type, when the delivery names one.
    pub fn event_type(&self) -> Option<&str> {
        self.event_type.as_deref()
    }

    /// The request headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The raw body, byte for byte.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The same delivery without the headers `drop` names (credentials, hop-by-hop and
    /// signature headers are not stored). Removing headers cannot change what was verified.
    pub fn without_headers(mut self, drop: impl Fn(&str) -> bool) -> AuthenticatedDelivery {
        self.headers.0.retain(|(name, _)| !drop(name));
        self
    }

    /// Source, id, event type, headers and body, by value.
    pub fn into_parts(self) -> (String, DeliveryId, Option<String>, Headers, Bytes) {
        (
            self.source,
            self.id,
            self.event_type,
            self.headers,
            self.body,
        )
    }
}

/// A delivery whose signature and id have been checked, its event type not yet read:
/// made by [`Source::authenticate_signed`], and made an [`AuthenticatedDelivery`] only by
/// [`Source::read_event_type`]. Enough to recognise a redelivery, not to claim one.
#[derive(Debug, Clone)]
pub struct SignedDelivery {
    source: String,
    id: DeliveryId,
    event_type: PendingEventType,
    headers: Headers,
    body: Bytes,
}

/// A [`SignedDelivery`]'s event type: read (from a header) and checked, or still in the
/// body.
#[derive(Debug, Clone)]
pub(crate) enum PendingEventType {
    /// Read and checked.
    Read(Option<String>),
    /// To be read from the body by [`Source::read_event_type`].
    InBody,
}

impl SignedDelivery {
    /// The source name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The delivery id: the signed one where the scheme signs it.
    pub fn id(&self) -> &DeliveryId {
        &self.id
    }

    /// The raw body, byte for byte.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The event type, when it is read from a header (and so already checked); one in the
    /// body is read by [`Source::read_event_type`].
    pub fn header_event_type(&self) -> Option<&str> {
        match &self.event_type {
            PendingEventType::Read(event_type) => event_type.as_deref(),
            PendingEventType::InBody => None,
        }
    }
}

/// What an authenticated request is: a delivery (by default fully checked, an
/// [`AuthenticatedDelivery`]), or a handshake.
#[derive(Debug, Clone)]
pub enum Authenticated<D = AuthenticatedDelivery> {
    /// A delivery to claim.
    Delivery(D),
    /// A provider handshake, answered 200 with this JSON and not recorded.
    Handshake(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_id_bounds() {
        assert!(DeliveryId::parse("msg_1").is_some());
        assert!(DeliveryId::parse("").is_none());
        assert!(DeliveryId::parse(&"a".repeat(255)).is_some());
        assert!(DeliveryId::parse(&"a".repeat(256)).is_none());
        assert!(DeliveryId::parse("a\nb").is_none());
        assert!(DeliveryId::parse("a\u{7f}").is_none());
    }

    mod parsers_never_panic {
        use super::super::*;
        use proptest::prelude::*;

        fn at() -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        }

        proptest! {
            #[test]
            fn stripe_header(value in ".{0,200}") {
                let _ = stripe::parse_header(&value);
            }

            #[test]
            fn signature_lists(value in ".{0,200}", prefix in "[a-z0-9=]{0,8}") {
                let _ = hmac_generic::parse_signature_list(&value, &prefix, |t| hex::decode(t).ok());
            }

            #[test]
            fn every_scheme_on_arbitrary_headers(
                sig in ".{0,160}",
                ts in ".{0,24}",
                id in ".{0,40}",
                body in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                let secrets = vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()];
                let schemes: Vec<Box<dyn SignatureScheme>> = vec![
                    Box::new(StandardWebhooks::new(&secrets).expect("ok")),
                    Box::new(stripe::Stripe::new(&secrets).expect("ok")),
                    Box::new(presets::github(&secrets).expect("ok")),
                    Box::new(presets::slack(&secrets).expect("ok")),
                    Box::new(presets::shopify(&secrets).expect("ok")),
                ];
                let headers = Headers::from_pairs([
                    ("webhook-signature", sig.as_str()), ("webhook-timestamp", ts.as_str()),
                    ("webhook-id", id.as_str()), ("stripe-signature", sig.as_str()),
                    ("x-hub-signature-256", sig.as_str()), ("x-slack-signature", sig.as_str()),
                    ("x-slack-request-timestamp", ts.as_str()), ("x-shopify-hmac-sha256", sig.as_str()),
                ]);
                for scheme in &schemes {
                    // Random input is never a valid signature.
                    prop_assert!(scheme.verify(&headers, &body, at(), Duration::from_secs(300)).map(|_| ()).is_err());
                }
            }
        }
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::from_bytes(b"hunter2".to_vec());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
