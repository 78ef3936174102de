//! `hmac-sha256`: the generic scheme for any partner that signs with HMAC-SHA256, and the
//! engine of the fixed presets `github`, `shopify` and `slack`.
//!
//! Configurable: the signature header, a prefix (`sha256=`), the encoding (hex or base64),
//! an optional timestamp header, and the signed content as a template over `{id}`,
//! `{timestamp}` and `{body}` (default `{body}`, or `{timestamp}.{body}` with a timestamp).
//! Secrets are used as their UTF-8 bytes, as these providers do.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::mac::{any_secret_matches, hmac_sha256, tag};
use super::{
    Field, Headers, SchemeError, Secret, SignatureScheme, Verified, VerifyError, skew, unix_seconds,
};

pub use crate::config::Encoding;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Vec<u8>),
    Id,
    Timestamp,
    Body,
}

/// Parses a signed-content template; `{body}` is required.
fn parse_template(template: &str) -> Result<Vec<Part>, SchemeError> {
    let bad = |problem| SchemeError::Template {
        template: template.to_owned(),
        problem,
    };
    let mut parts = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        if let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest.as_bytes()[..open].to_vec()));
            }
            let close = rest[open..].find('}').ok_or_else(|| bad("unclosed `{`"))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "id" => Part::Id,
                "timestamp" => Part::Timestamp,
                "body" => Part::Body,
                _ => {
                    return Err(bad("unknown placeholder (use {id}, {timestamp}, {body})"));
                }
            });
            rest = &rest[open + close + 1..];
        } else {
            parts.push(Part::Literal(rest.as_bytes().to_vec()));
            rest = "";
        }
    }
    if !parts.contains(&Part::Body) {
        return Err(bad("must contain {body}"));
    }
    Ok(parts)
}

/// Answers a provider handshake body with the JSON to send back, if it is one.
pub type Handshake = fn(&[u8]) -> Option<String>;

/// Settings of an HMAC-over-the-body scheme.
#[derive(Debug, Clone)]
pub struct HmacSettings {
    /// Header carrying the signature.
    pub signature_header: String,
    /// Text before the encoded tag (`sha256=`, `v0=`); may be empty.
    pub prefix: String,
    /// Hex or base64.
    pub encoding: Encoding,
    /// Header carrying the signed timestamp (Unix seconds), if any.
    pub timestamp_header: Option<String>,
    /// Signed-content template; `None` for the default.
    pub signed_content: Option<String>,
    /// Header carrying the id, for `{id}` in the template.
    pub id_header: Option<String>,
    /// Where the id comes from by default.
    pub id_field: Field,
    /// Where the event type comes from by default.
    pub event_type_field: Field,
    /// A provider handshake answered without recording (see
    /// [`SignatureScheme::handshake`]).
    pub handshake: Option<Handshake>,
}

/// An HMAC-SHA256 scheme built from [`HmacSettings`].
#[derive(Debug)]
pub struct HmacScheme {
    secrets: Vec<Secret>,
    settings: HmacSettings,
    template: Vec<Part>,
}

impl HmacScheme {
    /// Builds the scheme; the error names what is wrong, never a secret.
    pub fn new(secrets: &[String], settings: HmacSettings) -> Result<HmacScheme, SchemeError> {
        if secrets.iter().any(String::is_empty) {
            return Err(SchemeError::EmptySecret);
        }
        if secrets.is_empty() {
            return Err(SchemeError::NoSecrets);
        }
        let default = if settings.timestamp_header.is_some() {
            "{timestamp}.{body}"
        } else {
            "{body}"
        };
        let template = parse_template(settings.signed_content.as_deref().unwrap_or(default))?;
        if template.contains(&Part::Timestamp) && settings.timestamp_header.is_none() {
            return Err(SchemeError::Unconfigured {
                placeholder: "timestamp",
                key: "timestamp_header",
            });
        }
        if template.contains(&Part::Id) && settings.id_header.is_none() {
            return Err(SchemeError::Unconfigured {
                placeholder: "id",
                key: "id_header",
            });
        }
        Ok(HmacScheme {
            secrets: secrets
                .iter()
                .map(|s| Secret::from_bytes(s.as_bytes().to_vec()))
                .collect(),
            settings,
            template,
        })
    }

    fn content<'a>(&'a self, id: &'a str, ts: &'a str, body: &'a [u8]) -> Vec<&'a [u8]> {
        self.template
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.as_slice(),
                Part::Id => id.as_bytes(),
                Part::Timestamp => ts.as_bytes(),
                Part::Body => body,
            })
            .collect()
    }

    fn decode(&self, text: &str) -> Option<Vec<u8>> {
        match self.settings.encoding {
            Encoding::Hex => hex::decode(text).ok(),
            Encoding::Base64 => BASE64.decode(text).ok(),
        }
    }

    fn encode(&self, tag: &[u8]) -> String {
        match self.settings.encoding {
            Encoding::Hex => hex::encode(tag),
            Encoding::Base64 => BASE64.encode(tag),
        }
    }
}

/// Splits a signature header into its candidate signatures (comma- or space-separated,
/// each carrying the prefix) and decodes them. Never panics, whatever the input.
pub fn parse_signature_list(
    value: &str,
    prefix: &str,
    decode: impl Fn(&str) -> Option<Vec<u8>>,
) -> Vec<Vec<u8>> {
    let parts = || {
        value
            .split([',', ' '])
            .map(str::trim)
            .filter(|p| !p.is_empty())
    };
    if parts().count() > super::MAX_SIGNATURE_ENTRIES {
        return Vec::new();
    }
    parts()
        .filter_map(|p| p.strip_prefix(prefix))
        .filter_map(decode)
        .collect()
}

impl SignatureScheme for HmacScheme {
    fn verify(
        &self,
        headers: &Headers,
        body: &[u8],
        now: SystemTime,
        tolerance: Duration,
    ) -> Result<Verified, VerifyError> {
        let s = &self.settings;
        let signature = headers
            .get(&s.signature_header)
            .ok_or(VerifyError::Missing)?;
        let timestamp = match &s.timestamp_header {
            Some(h) => Some(headers.get(h).ok_or(VerifyError::Missing)?),
            None => None,
        };
        let ts: Option<i64> = timestamp
            .map(|t| t.trim().parse().map_err(|_| VerifyError::Invalid))
            .transpose()?;
        let id = s
            .id_header
            .as_deref()
            .and_then(|h| headers.get(h))
            .unwrap_or("");
        let candidates = parse_signature_list(signature, &s.prefix, |t| self.decode(t));
        if candidates.is_empty() {
            return Err(VerifyError::Invalid);
        }
        let content = self.content(id, timestamp.unwrap_or(""), body);
        let matched = any_secret_matches(&self.secrets, &candidates, |k| {
            hmac_sha256(k.expose(), &content)
        });
        if !matched {
            return Err(VerifyError::Invalid);
        }
        if let Some(ts) = ts
            && skew(ts, now) > tolerance
        {
            return Err(VerifyError::OutOfTolerance);
        }
        let id_signed = self.template.contains(&Part::Id) && !id.is_empty();
        Ok(Verified {
            signed_id: id_signed.then(|| id.to_owned()),
        })
    }

    fn sign(&self, id: &str, body: &[u8], now: SystemTime) -> Vec<(String, String)> {
        let s = &self.settings;
        let ts = unix_seconds(now);
        let mac = hmac_sha256(self.secrets[0].expose(), &self.content(id, &ts, body));
        let mut headers = vec![(
            s.signature_header.clone(),
            format!("{}{}", s.prefix, self.encode(&tag(mac))),
        )];
        if let Some(h) = &s.timestamp_header {
            headers.push((h.clone(), ts));
        }
        if let Some(h) = &s.id_header {
            headers.push((h.clone(), id.to_owned()));
        }
        headers
    }

    fn has_signature_headers(&self, headers: &Headers) -> bool {
        let s = &self.settings;
        headers.get(&s.signature_header).is_some()
            && s.timestamp_header
                .as_deref()
                .is_none_or(|h| headers.get(h).is_some())
    }

    fn signature_headers(&self) -> Vec<&str> {
        vec![&self.settings.signature_header]
    }

    fn read_headers(&self) -> Vec<&str> {
        let s = &self.settings;
        std::iter::once(s.signature_header.as_str())
            .chain(s.timestamp_header.as_deref())
            .chain(s.id_header.as_deref())
            .collect()
    }

    fn default_id_field(&self) -> Field {
        self.settings.id_field.clone()
    }

    fn default_event_type_field(&self) -> Field {
        self.settings.event_type_field.clone()
    }

    fn handshake(&self, body: &[u8]) -> Option<String> {
        self.settings.handshake.and_then(|h| h(body))
    }

    fn signs_header(&self, name: &str) -> bool {
        self.template.contains(&Part::Id)
            && self
                .settings
                .id_header
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn scheme(template: Option<&str>, ts: bool) -> HmacScheme {
        HmacScheme::new(
            &["partner-secret".into()],
            HmacSettings {
                signature_header: "X-Signature".into(),
                prefix: "sha256=".into(),
                encoding: Encoding::Hex,
                timestamp_header: ts.then(|| "X-Timestamp".into()),
                signed_content: template.map(String::from),
                id_header: Some("X-Id".into()),
                id_field: Field::Header("X-Id".into()),
                event_type_field: Field::Pointer("/type".into()),
                handshake: None,
            },
        )
        .expect("valid")
    }

    #[test]
    fn templates() {
        assert!(parse_template("{timestamp}.{body}").is_ok());
        assert!(parse_template("{id}").is_err());
        assert!(parse_template("{body").is_err());
        assert!(parse_template("{nope}{body}").is_err());
    }

    #[test]
    fn signs_and_verifies_with_id_and_timestamp_in_the_content() {
        let s = scheme(Some("{id}:{timestamp}:{body}"), true);
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = Headers::from_pairs(s.sign("evt_1", b"{}", now));
        assert_eq!(
            s.verify(&h, b"{}", now, Duration::from_secs(60))
                .map(|_| ()),
            Ok(())
        );
        // The id is covered: another id header breaks the signature.
        let mut other = h.clone();
        other.0.retain(|(k, _)| k != "x-id");
        other.0.push(("x-id".into(), "evt_2".into()));
        assert_eq!(
            s.verify(&other, b"{}", now, Duration::from_secs(60))
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
        assert!(s.signs_header("x-id"));
        assert!(!scheme(None, false).signs_header("x-id"));
        // Independently computed: printf 'evt_1:1700000000:{}' | openssl sha256 -hmac partner-secret
        assert_eq!(
            h.get("x-signature"),
            Some("sha256=88b97e963ff4f81327962ef5e4a8c93ce3d52e8aa0f2720f0f6d1677c5bd9a41")
        );
    }
}
