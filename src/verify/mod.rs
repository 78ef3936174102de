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

mod standard_webhooks;

use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use standard_webhooks::StandardWebhooks;

use crate::config::{AckMode, ConfigError, SchemeName, SourceConfig};
use crate::error::ApiError;

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

/// One provider's way of signing a delivery.
pub trait SignatureScheme: Send + Sync + std::fmt::Debug {
    /// Checks the signature of `body` under `headers` at time `now`.
    fn verify(
        &self,
        headers: &Headers,
        body: &[u8],
        now: SystemTime,
        tolerance: Duration,
    ) -> Result<(), VerifyError>;

    /// Header names and values a sender would attach to `body` with delivery id `id`,
    /// signed with the first secret at time `now`. Used by `sign`, `replay` and tests.
    fn sign(&self, id: &str, body: &[u8], now: SystemTime) -> Vec<(String, String)>;

    /// Where this scheme takes the delivery id from by default.
    fn default_id_field(&self) -> Field;

    /// Where this scheme takes the event type from by default.
    fn default_event_type_field(&self) -> Field;
}

/// Where a value is read from in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// A header, by name.
    Header(String),
    /// A JSON pointer into the body (RFC 6901).
    Pointer(String),
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

/// A configured partner, ready to authenticate requests.
#[derive(Debug)]
pub struct Source {
    /// The name in `POST /webhooks/{source}`.
    pub name: String,
    /// When the sender gets its answer.
    pub ack: AckMode,
    scheme: Box<dyn SignatureScheme>,
    tolerance: Duration,
    id_field: Field,
    event_type_field: Field,
}

/// A delivery whose signature, id and (where read from the body) JSON have been checked.
/// Only [`Source::authenticate`] makes one.
#[derive(Debug, Clone)]
pub struct AuthenticatedDelivery {
    /// The source name.
    pub source: String,
    /// The delivery id.
    pub id: DeliveryId,
    /// The event type, when the delivery names one.
    pub event_type: Option<String>,
    /// The request headers.
    pub headers: Headers,
    /// The raw body, byte for byte.
    pub body: Bytes,
}

impl Source {
    /// Builds a source from its config, decoding every secret; `env` looks up `secrets_env`.
    pub fn from_config(
        name: &str,
        config: &SourceConfig,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Source, ConfigError> {
        let mut raw_secrets = config.secrets.clone();
        if let Some(var) = &config.secrets_env {
            let value = env(var).ok_or_else(|| {
                ConfigError::new(
                    file,
                    format!("sources.{name}.secrets_env: environment variable {var} is not set"),
                )
            })?;
            raw_secrets.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
        }
        if raw_secrets.is_empty() {
            return Err(ConfigError::new(
                file,
                format!("sources.{name}.secrets is empty: set `secrets` or `secrets_env`"),
            ));
        }
        let scheme: Box<dyn SignatureScheme> = match config.scheme {
            SchemeName::StandardWebhooks => Box::new(
                StandardWebhooks::new(&raw_secrets)
                    .map_err(|e| ConfigError::new(file, format!("sources.{name}.secrets: {e}")))?,
            ),
        };
        let id_field = match &config.id_header {
            Some(h) => Field::Header(h.clone()),
            None => scheme.default_id_field(),
        };
        let event_type_field = match (&config.event_type_header, &config.event_type_pointer) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    file,
                    format!(
                        "sources.{name}: set event_type_header or event_type_pointer, not both"
                    ),
                ));
            }
            (Some(h), None) => Field::Header(h.clone()),
            (None, Some(p)) => {
                if !(p.is_empty() || p.starts_with('/')) {
                    return Err(ConfigError::new(
                        file,
                        format!("sources.{name}.event_type_pointer `{p}` must start with '/'"),
                    ));
                }
                Field::Pointer(p.clone())
            }
            (None, None) => scheme.default_event_type_field(),
        };
        Ok(Source {
            name: name.to_owned(),
            ack: config.ack,
            scheme,
            tolerance: config.tolerance,
            id_field,
            event_type_field,
        })
    }

    /// Runs the signature, id and JSON checks of design.md, in the contract's order.
    pub fn authenticate(
        &self,
        headers: Headers,
        body: Bytes,
        now: SystemTime,
    ) -> Result<AuthenticatedDelivery, ApiError> {
        self.scheme
            .verify(&headers, &body, now, self.tolerance)
            .map_err(|e| match e {
                VerifyError::Missing => ApiError::MissingSignature,
                VerifyError::Invalid => ApiError::InvalidSignature,
                VerifyError::OutOfTolerance => ApiError::TimestampOutOfTolerance,
            })?;

        let mut json: Option<serde_json::Value> = None;
        let mut parse_json = || -> Result<serde_json::Value, ApiError> {
            if let Some(v) = &json {
                return Ok(v.clone());
            }
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|_| ApiError::InvalidJson)?;
            json = Some(v.clone());
            Ok(v)
        };

        let raw_id = match &self.id_field {
            Field::Header(h) => headers.get(h).map(str::to_owned),
            Field::Pointer(p) => parse_json()?
                .pointer(p)
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        };
        let id = raw_id
            .as_deref()
            .and_then(DeliveryId::parse)
            .ok_or(ApiError::InvalidDeliveryId)?;

        let event_type = match &self.event_type_field {
            Field::Header(h) => headers.get(h).map(str::to_owned),
            Field::Pointer(p) => parse_json()?
                .pointer(p)
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        };

        Ok(AuthenticatedDelivery {
            source: self.name.clone(),
            id,
            event_type,
            headers,
            body,
        })
    }

    /// Headers a sender would attach; see [`SignatureScheme::sign`].
    pub fn sign(&self, id: &str, body: &[u8], now: SystemTime) -> Vec<(String, String)> {
        let mut headers = self.scheme.sign(id, body, now);
        if let Field::Header(h) = &self.id_field
            && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(h))
        {
            headers.push((h.clone(), id.to_owned()));
        }
        headers
    }
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

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::from_bytes(b"hunter2".to_vec());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
