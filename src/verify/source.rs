//! A configured partner: [`Source::from_config`] builds its scheme from `[sources.<name>]`
//! (decoding every secret at start-up), and [`Source::authenticate`] runs design.md's checks
//! in order and is the only maker of an [`AuthenticatedDelivery`].

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{
    AuthError, Authenticated, AuthenticatedDelivery, DeliveryId, Field, FieldError, Headers,
    MAX_EVENT_TYPE_LEN, PendingEventType, SchemeError, SignatureScheme, SignedDelivery,
    StandardWebhooks, hmac_generic, presets, stripe,
};
use crate::config::{AckMode, ConfigError, SchemeConfig, SourceConfig};

/// A configured partner, ready to authenticate requests.
#[derive(Debug)]
pub struct Source {
    /// The name in `POST /webhooks/{source}`.
    pub name: String,
    /// When the sender gets its answer.
    pub ack: AckMode,
    /// `ack = "processed"`: how long a claimant holds a delivery (renewed while it runs).
    pub processed_lease: Duration,
    /// Index the body's fingerprint so a signed body resent under a fresh id is a replay.
    pub body_dedup: bool,
    scheme: Box<dyn SignatureScheme>,
    tolerance: Duration,
    id_field: Field,
    event_type_field: Field,
}

fn config_error(file: &str, name: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::new(file, format!("sources.{name}: {message}"))
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
                config_error(
                    file,
                    name,
                    format!("secrets_env: environment variable {var} is not set"),
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
        let no_public_keys = match &config.scheme {
            SchemeConfig::StandardWebhooks { public_keys } => public_keys.is_empty(),
            _ => true,
        };
        if raw_secrets.is_empty() && no_public_keys {
            return Err(ConfigError::new(
                file,
                format!("sources.{name}.secrets is empty: set `secrets` or `secrets_env`"),
            ));
        }
        if config.id_header.is_some() && config.id_pointer.is_some() {
            return Err(config_error(
                file,
                name,
                "set id_header or id_pointer, not both",
            ));
        }
        // A tolerance applied to a timestamp nobody signed protects nothing: a captured
        // request with a refreshed header would pass, and run again once its id is forgotten.
        if let SchemeConfig::HmacSha256(hmac) = &config.scheme
            && hmac.timestamp_header.is_some()
            && hmac
                .signed_content
                .as_deref()
                .is_some_and(|t| !t.contains("{timestamp}"))
        {
            return Err(ConfigError::new(
                file,
                format!(
                    "sources.{name}.timestamp_header is set but sources.{name}.signed_content does \
                     not sign {{timestamp}}: the tolerance would apply to a value nobody signed \
                     (add {{timestamp}} to signed_content, or remove timestamp_header)"
                ),
            ));
        }
        let secrets_error =
            |e: SchemeError| ConfigError::new(file, format!("sources.{name}.secrets: {e}"));
        let scheme: Box<dyn SignatureScheme> = match &config.scheme {
            SchemeConfig::StandardWebhooks { public_keys } => Box::new(
                StandardWebhooks::with_public_keys(&raw_secrets, public_keys)
                    .map_err(secrets_error)?,
            ),
            SchemeConfig::Stripe => {
                Box::new(stripe::Stripe::new(&raw_secrets).map_err(secrets_error)?)
            }
            SchemeConfig::Github => Box::new(presets::github(&raw_secrets).map_err(secrets_error)?),
            SchemeConfig::Shopify => {
                Box::new(presets::shopify(&raw_secrets).map_err(secrets_error)?)
            }
            SchemeConfig::Slack => Box::new(presets::slack(&raw_secrets).map_err(secrets_error)?),
            SchemeConfig::HmacSha256(hmac) => Box::new(
                hmac_generic::HmacScheme::new(
                    &raw_secrets,
                    hmac_generic::HmacSettings {
                        signature_header: hmac.signature_header.clone(),
                        prefix: hmac.prefix.clone().unwrap_or_default(),
                        encoding: hmac.encoding.unwrap_or_default(),
                        timestamp_header: hmac.timestamp_header.clone(),
                        signed_content: hmac.signed_content.clone(),
                        id_header: config.id_header.clone(),
                        id_field: match (&config.id_header, &config.id_pointer) {
                            (Some(h), _) => Field::Header(h.clone()),
                            (None, Some(p)) => Field::Pointer(p.clone()),
                            (None, None) => {
                                return Err(config_error(
                                    file,
                                    name,
                                    "scheme hmac-sha256 needs id_header or id_pointer",
                                ));
                            }
                        },
                        event_type_field: Field::Pointer("/type".into()),
                        handshake: None,
                    },
                )
                .map_err(|e| config_error(file, name, e))?,
            ),
        };
        let pointer = |key: &str, p: &str| {
            if p.is_empty() || p.starts_with('/') {
                Ok(Field::Pointer(p.to_owned()))
            } else {
                Err(config_error(
                    file,
                    name,
                    format!("{key} `{p}` must start with '/'"),
                ))
            }
        };
        let id_field = match (&config.id_header, &config.id_pointer) {
            (Some(h), _) => Field::Header(h.clone()),
            (None, Some(p)) => pointer("id_pointer", p)?,
            (None, None) => scheme.default_id_field(),
        };
        let event_type_field = match (&config.event_type_header, &config.event_type_pointer) {
            (Some(_), Some(_)) => {
                return Err(config_error(
                    file,
                    name,
                    "set event_type_header or event_type_pointer, not both",
                ));
            }
            (Some(h), None) => Field::Header(h.clone()),
            (None, Some(p)) => pointer("event_type_pointer", p)?,
            (None, None) => scheme.default_event_type_field(),
        };
        // An id read from the (signed) body, or from a signed header, cannot be swapped.
        let id_signed = match &id_field {
            Field::Header(h) => scheme.signs_header(h),
            Field::Pointer(_) | Field::Derived(..) => true,
        };
        Ok(Source {
            name: name.to_owned(),
            ack: config.ack,
            processed_lease: config.processed_lease,
            body_dedup: config.body_dedup.unwrap_or(!id_signed),
            scheme,
            tolerance: config.tolerance,
            id_field,
            event_type_field,
        })
    }

    /// The source `name` of `config`, secrets read from the process environment: how the
    /// client-side tools (`sign`, `replay`, `export`, the test kit) see a source.
    pub fn named(config: &crate::config::Config, name: &str) -> Result<Source, ConfigError> {
        let source_config = config.sources.get(name).ok_or_else(|| {
            ConfigError::new(&config.file, format!("source `{name}` is not configured"))
        })?;
        Source::from_config(name, source_config, &config.file, &|k| {
            std::env::var(k).ok()
        })
    }

    /// Runs the signature, id and JSON checks of design.md, in the contract's order.
    /// `not_text` names the request headers whose values were not UTF-8 (held lossily in
    /// `headers`): a header this source reads must be text, or the request is refused at
    /// the check that header belongs to, since its lossy form is not what was sent.
    pub fn authenticate(
        &self,
        headers: Headers,
        not_text: &[String],
        body: Bytes,
        now: SystemTime,
    ) -> Result<Authenticated, AuthError> {
        match self.authenticate_signed(headers, not_text, body, now)? {
            Authenticated::Delivery(signed) => {
                Ok(Authenticated::Delivery(self.read_event_type(signed)?))
            }
            Authenticated::Handshake(answer) => Ok(Authenticated::Handshake(answer)),
        }
    }

    /// The checks of [`Source::authenticate`] but the event type read from the body (and
    /// the JSON check that comes with it), which is left to [`Source::read_event_type`]:
    /// a redelivery whose body is the one already stored passed that check when it was
    /// first received, and is answered without its body being read again
    /// (`crate::ingest`). An event type read from a header is checked here, since another
    /// copy may carry another header.
    pub fn authenticate_signed(
        &self,
        headers: Headers,
        not_text: &[String],
        body: Bytes,
        now: SystemTime,
    ) -> Result<Authenticated<SignedDelivery>, AuthError> {
        let is_not_text = |name: &str| not_text.iter().any(|n| n.eq_ignore_ascii_case(name));
        let is_id_header = |name: &str| {
            self.scheme.signs_header(name)
                || self
                    .id_header()
                    .is_some_and(|h| h.eq_ignore_ascii_case(name))
        };
        if self
            .scheme
            .read_headers()
            .into_iter()
            .any(|h| is_not_text(h) && !is_id_header(h))
        {
            return Err(AuthError::Signature(super::VerifyError::Invalid));
        }
        let verified = self
            .scheme
            .verify(&headers, &body, now, self.tolerance)
            .map_err(AuthError::Signature)?;
        if let Some(answer) = self.scheme.handshake(&body) {
            return Ok(Authenticated::Handshake(answer));
        }

        // Invariant 3: where the signature covered the id, the claimed id is the one it
        // covered, never a second read of some header (a replayer could add another).
        let raw_id = match (&self.id_field, verified.signed_id) {
            (Field::Header(h), Some(signed)) if self.scheme.signs_header(h) => Some(signed),
            _ => read_field(&self.id_field, &headers, &body)?,
        };
        if not_text.iter().any(|n| is_id_header(n)) {
            return Err(AuthError::InvalidDeliveryId);
        }
        let id = raw_id
            .as_deref()
            .and_then(DeliveryId::parse)
            .ok_or(AuthError::InvalidDeliveryId)?;
        // An event type in a header is checked here, at once: it may differ from one copy
        // of a delivery to the next. One in the body is the same for the same body.
        let event_type = match &self.event_type_field {
            Field::Header(h) if is_not_text(h) => return Err(AuthError::InvalidEventType),
            field @ Field::Header(_) => {
                PendingEventType::Read(checked_event_type(read_field(field, &headers, &body)?)?)
            }
            Field::Pointer(_) | Field::Derived(..) => PendingEventType::InBody,
        };
        Ok(Authenticated::Delivery(SignedDelivery {
            source: self.name.clone(),
            id,
            event_type,
            headers,
            body,
        }))
    }

    /// The last check of [`Source::authenticate`]: the event type where it is read from the
    /// body (and so that the body is JSON). Signature headers, needed for the checks only,
    /// are not kept.
    pub fn read_event_type(
        &self,
        signed: SignedDelivery,
    ) -> Result<AuthenticatedDelivery, AuthError> {
        let SignedDelivery {
            source,
            id,
            event_type,
            mut headers,
            body,
        } = signed;
        let event_type = match event_type {
            PendingEventType::Read(event_type) => event_type,
            PendingEventType::InBody => {
                checked_event_type(read_field(&self.event_type_field, &headers, &body)?)?
            }
        };
        let signature_headers = self.scheme.signature_headers();
        headers.0.retain(|(name, _)| {
            !signature_headers
                .iter()
                .any(|s| s.eq_ignore_ascii_case(name))
        });
        Ok(AuthenticatedDelivery {
            source,
            id,
            event_type,
            headers,
            body,
        })
    }

    /// The headers carrying this source's signatures (every alternative name).
    pub fn signature_headers(&self) -> Vec<&str> {
        self.scheme.signature_headers()
    }

    /// Whether `headers` carry what this source's scheme needs to check a signature.
    pub fn has_signature_headers(&self, headers: &Headers) -> bool {
        self.scheme.has_signature_headers(headers)
    }

    /// The header the event type is read from, when it is read from a header.
    pub fn event_type_header(&self) -> Option<&str> {
        match &self.event_type_field {
            Field::Header(h) => Some(h),
            _ => None,
        }
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

    /// The header carrying the delivery id, when the id is read from a header.
    pub fn id_header(&self) -> Option<&str> {
        match &self.id_field {
            Field::Header(h) => Some(h),
            _ => None,
        }
    }

    /// The JSON pointer of the delivery id in the body, when the id is read from the body
    /// (where `replay` writes a fixture's id).
    pub fn id_pointer(&self) -> Option<&str> {
        match &self.id_field {
            Field::Pointer(p) => Some(p),
            Field::Derived(_, p) => *p,
            Field::Header(_) => None,
        }
    }
}

/// An event type as read, if it is one: at most [`MAX_EVENT_TYPE_LEN`] bytes, no control
/// characters.
fn checked_event_type(event_type: Option<String>) -> Result<Option<String>, AuthError> {
    if event_type
        .as_deref()
        .is_some_and(|t| t.len() > MAX_EVENT_TYPE_LEN || t.chars().any(char::is_control))
    {
        return Err(AuthError::InvalidEventType);
    }
    Ok(event_type)
}

/// A header's value, or a body's field (a JSON pointer read straight from the bytes,
/// without building the document: this runs on every request, redeliveries included).
fn read_field(field: &Field, headers: &Headers, body: &[u8]) -> Result<Option<String>, AuthError> {
    match field {
        Field::Header(h) => Ok(headers.get(h).map(str::to_owned)),
        Field::Derived(f, _) => f(body).map_err(|FieldError::NotJson| AuthError::InvalidJson),
        Field::Pointer(p) => {
            crate::domain::json_string_at(body, p).map_err(|_| AuthError::InvalidJson)
        }
    }
}
