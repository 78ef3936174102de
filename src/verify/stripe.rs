//! `stripe`: `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…][,v0=…]`, HMAC-SHA256
//! of `"{t}.{body}"` keyed with the endpoint secret's bytes (`whsec_…` as written).
//!
//! Several `v1` entries are allowed (Stripe sends two while a secret rolls); `v0` and
//! unknown parts are ignored, never a reason to reject. The id and type come from the
//! signed body (`/id`, `/type`).

use std::time::{Duration, SystemTime};

use super::mac::{any_secret_matches, hmac_sha256, tag};
use super::{
    Field, Headers, SchemeError, Secret, SignatureScheme, Verified, VerifyError, skew, unix_seconds,
};

const HEADER: &str = "stripe-signature";

/// The parsed `Stripe-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeHeader<'a> {
    /// The `t=` value as sent (it is part of the signed content).
    pub timestamp: &'a str,
    /// Every decodable `v1=` signature.
    pub v1: Vec<Vec<u8>>,
}

/// Parses a `Stripe-Signature` value; `None` when it has no `t` or no decodable `v1`.
/// Never panics, whatever the input.
pub fn parse_header(value: &str) -> Option<StripeHeader<'_>> {
    // `t` plus at most MAX_SIGNATURE_ENTRIES signatures (of any version).
    if value.split(',').count() > super::MAX_SIGNATURE_ENTRIES + 1 {
        return None;
    }
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in value.split(',') {
        let Some((key, val)) = item.trim().split_once('=') else {
            continue;
        };
        match key {
            "t" if timestamp.is_none() => timestamp = Some(val),
            "v1" => {
                if let Ok(sig) = hex::decode(val) {
                    v1.push(sig);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.filter(|t| !t.is_empty())?;
    (!v1.is_empty()).then_some(StripeHeader { timestamp, v1 })
}

/// The `stripe` scheme.
#[derive(Debug)]
pub struct Stripe {
    secrets: Vec<Secret>,
}

impl Stripe {
    /// Endpoint secrets (`whsec_…`), used as written.
    pub fn new(secrets: &[String]) -> Result<Stripe, SchemeError> {
        if secrets.is_empty() {
            return Err(SchemeError::NoSecrets);
        }
        if secrets.iter().any(String::is_empty) {
            return Err(SchemeError::EmptySecret);
        }
        Ok(Stripe {
            secrets: secrets
                .iter()
                .map(|s| Secret::from_bytes(s.as_bytes().to_vec()))
                .collect(),
        })
    }
}

impl SignatureScheme for Stripe {
    fn verify(
        &self,
        headers: &Headers,
        body: &[u8],
        now: SystemTime,
        tolerance: Duration,
    ) -> Result<Verified, VerifyError> {
        let value = headers.get(HEADER).ok_or(VerifyError::Missing)?;
        let parsed = parse_header(value).ok_or(VerifyError::Invalid)?;
        let ts: i64 = parsed.timestamp.parse().map_err(|_| VerifyError::Invalid)?;
        let matched = any_secret_matches(&self.secrets, &parsed.v1, |s| {
            hmac_sha256(s.expose(), &[parsed.timestamp.as_bytes(), b".", body])
        });
        if !matched {
            return Err(VerifyError::Invalid);
        }
        if skew(ts, now) > tolerance {
            return Err(VerifyError::OutOfTolerance);
        }
        Ok(Verified::default())
    }

    fn sign(&self, _id: &str, body: &[u8], now: SystemTime) -> Vec<(String, String)> {
        let ts = unix_seconds(now);
        let mac = hmac_sha256(self.secrets[0].expose(), &[ts.as_bytes(), b".", body]);
        vec![(
            "Stripe-Signature".into(),
            format!("t={ts},v1={}", hex::encode(tag(mac))),
        )]
    }

    fn has_signature_headers(&self, headers: &Headers) -> bool {
        headers.get(HEADER).is_some()
    }

    fn signature_headers(&self) -> Vec<&str> {
        vec![HEADER]
    }

    fn default_id_field(&self) -> Field {
        Field::Pointer("/id".into())
    }

    fn default_event_type_field(&self) -> Field {
        Field::Pointer("/type".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    // stripe-dotnet's test fixture: src/StripeTests/Resources/event_test_signature.json,
    // secret "webhook_secret", t=1533204620, and the header of
    // src/StripeTests/Services/Events/EventUtilityTest.cs.
    const BODY: &[u8] = include_bytes!("testdata/stripe_event_test_signature.json");
    const SECRET: &str = "webhook_secret";
    const T: u64 = 1_533_204_620;
    const HEADER_VALUE: &str = "t=1533204620,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef";
    const TOL: Duration = Duration::from_secs(300);

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    fn headers(v: &str) -> Headers {
        Headers::from_pairs([("Stripe-Signature", v)])
    }

    fn stripe(secrets: &[&str]) -> Stripe {
        Stripe::new(&secrets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("ok")
    }

    #[test]
    fn reproduces_stripe_dotnets_published_vector() {
        let s = stripe(&[SECRET]);
        assert_eq!(
            s.verify(&headers(HEADER_VALUE), BODY, at(T + 100), TOL)
                .map(|_| ()),
            Ok(())
        );
        let signed = s.sign("", BODY, at(T));
        assert_eq!(
            signed[0].1,
            "t=1533204620,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7"
        );
    }

    #[test]
    fn a_tampered_body_fails() {
        let mut tampered = BODY.to_vec();
        tampered.extend_from_slice(b"this_changes_the_json");
        assert_eq!(
            stripe(&[SECRET])
                .verify(&headers(HEADER_VALUE), &tampered, at(T), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
    }

    #[test]
    fn tolerance_edges_past_and_future() {
        let s = stripe(&[SECRET]);
        let h = headers(HEADER_VALUE);
        assert_eq!(s.verify(&h, BODY, at(T + 300), TOL).map(|_| ()), Ok(()));
        assert_eq!(
            s.verify(&h, BODY, at(T + 301), TOL).map(|_| ()),
            Err(VerifyError::OutOfTolerance)
        );
        assert_eq!(s.verify(&h, BODY, at(T - 300), TOL).map(|_| ()), Ok(()));
        assert_eq!(
            s.verify(&h, BODY, at(T - 301), TOL).map(|_| ()),
            Err(VerifyError::OutOfTolerance)
        );
    }

    #[test]
    fn several_v1_and_rolled_secrets() {
        let rolled = "t=1533204620,v1=deadbeef,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v9=zz";
        assert_eq!(
            stripe(&["old", SECRET])
                .verify(&headers(rolled), BODY, at(T), TOL)
                .map(|_| ()),
            Ok(())
        );
        assert_eq!(
            stripe(&["old"])
                .verify(&headers(rolled), BODY, at(T), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
    }

    #[test]
    fn malformed_headers_from_stripe_dotnets_tests_are_invalid() {
        let s = stripe(&[SECRET]);
        for bad in [
            "t=,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7",
            "t,v1=,v0=",
            "t,v1=,v0",
            "t,v1=,",
            "t,,",
            ",,",
            "t",
            "t=1533204620,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef",
        ] {
            assert_eq!(
                s.verify(&headers(bad), BODY, at(T), TOL).map(|_| ()),
                Err(VerifyError::Invalid),
                "{bad}"
            );
        }
        assert_eq!(
            s.verify(&Headers::default(), BODY, at(T), TOL).map(|_| ()),
            Err(VerifyError::Missing)
        );
    }
}
