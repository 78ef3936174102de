//! Standard Webhooks (<https://www.standardwebhooks.com/>), as sent by Svix and many others.
//!
//! `webhook-signature: v1,<base64 HMAC-SHA256("{id}.{timestamp}.{body}")>` — a space-separated
//! list, so a sender rotating its key can send both signatures. The `svix-*` header names are
//! accepted too. Secrets are `whsec_<base64>`; like the reference libraries, the prefix is
//! optional.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Mac, digest::KeyInit};

use super::{Field, Headers, Secret, SignatureScheme, VerifyError};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Header names: the standard ones first, Svix's as a fallback.
const ID: [&str; 2] = ["webhook-id", "svix-id"];
const TIMESTAMP: [&str; 2] = ["webhook-timestamp", "svix-timestamp"];
const SIGNATURE: [&str; 2] = ["webhook-signature", "svix-signature"];

/// The `standard-webhooks` scheme with its decoded secrets.
#[derive(Debug)]
pub struct StandardWebhooks {
    secrets: Vec<Secret>,
}

impl StandardWebhooks {
    /// Decodes `whsec_<base64>` (or bare base64) secrets. The error never shows a secret.
    pub fn new(raw: &[String]) -> Result<Self, String> {
        let secrets = raw
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let b64 = s.strip_prefix("whsec_").unwrap_or(s);
                match BASE64.decode(b64) {
                    Ok(bytes) if !bytes.is_empty() => Ok(Secret::from_bytes(bytes)),
                    _ => Err(format!(
                        "secret #{} is not `whsec_` followed by base64",
                        i + 1
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if secrets.is_empty() {
            return Err("no secrets".into());
        }
        Ok(Self { secrets })
    }

    fn mac(secret: &Secret, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret.expose())
            .expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

fn first_header<'h>(headers: &'h Headers, names: &[&str]) -> Option<&'h str> {
    names.iter().find_map(|n| headers.get(n))
}

/// Seconds between `ts` and `now`, in whichever direction.
pub(crate) fn skew(ts: i64, now: SystemTime) -> Duration {
    let now_s = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    Duration::from_secs(now_s.abs_diff(ts))
}

impl SignatureScheme for StandardWebhooks {
    fn verify(
        &self,
        headers: &Headers,
        body: &[u8],
        now: SystemTime,
        tolerance: Duration,
    ) -> Result<(), VerifyError> {
        let (Some(signatures), Some(timestamp)) = (
            first_header(headers, &SIGNATURE),
            first_header(headers, &TIMESTAMP),
        ) else {
            return Err(VerifyError::Missing);
        };
        // The id is part of the signed content; an absent id is signed as "" and, if that
        // signature holds, rejected afterwards as `invalid_delivery_id`.
        let id = first_header(headers, &ID).unwrap_or("");
        let ts: i64 = timestamp.trim().parse().map_err(|_| VerifyError::Invalid)?;

        let candidates: Vec<Vec<u8>> = signatures
            .split_whitespace()
            .filter_map(|part| part.strip_prefix("v1,"))
            .filter_map(|b64| BASE64.decode(b64).ok())
            .collect();
        if candidates.is_empty() {
            return Err(VerifyError::Invalid);
        }
        let matched = self.secrets.iter().any(|secret| {
            let mac = Self::mac(secret, id, timestamp, body);
            // `verify_slice` compares in constant time; every candidate is tried so the
            // time taken does not reveal which one matched.
            candidates
                .iter()
                .fold(false, |ok, c| mac.clone().verify_slice(c).is_ok() | ok)
        });
        if !matched {
            return Err(VerifyError::Invalid);
        }
        if skew(ts, now) > tolerance {
            return Err(VerifyError::OutOfTolerance);
        }
        Ok(())
    }

    fn sign(&self, id: &str, body: &[u8], now: SystemTime) -> Vec<(String, String)> {
        let ts = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string();
        let tag = Self::mac(&self.secrets[0], id, &ts, body)
            .finalize()
            .into_bytes();
        vec![
            ("webhook-id".into(), id.to_owned()),
            ("webhook-timestamp".into(), ts),
            (
                "webhook-signature".into(),
                format!("v1,{}", BASE64.encode(tag)),
            ),
        ]
    }

    fn default_id_field(&self) -> Field {
        Field::Header("webhook-id".into())
    }

    fn default_event_type_field(&self) -> Field {
        Field::Pointer("/type".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The published test vector of the Standard Webhooks / Svix libraries
    // (svix-webhooks, php/tests/WebhookTest.php `testSignFunctionWorks`).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID_: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: u64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    const TOL: Duration = Duration::from_secs(300);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn headers(sig: &str, ts: &str) -> Headers {
        Headers::from_pairs([
            ("webhook-id", ID_),
            ("webhook-timestamp", ts),
            ("webhook-signature", sig),
        ])
    }

    fn scheme(secrets: &[&str]) -> StandardWebhooks {
        StandardWebhooks::new(&secrets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("valid secrets")
    }

    #[test]
    fn reproduces_the_published_vector() {
        let s = scheme(&[SECRET]);
        let signed = s.sign(ID_, BODY, at(TS));
        assert_eq!(signed[2].1, SIG);
        assert_eq!(
            s.verify(&headers(SIG, "1614265330"), BODY, at(TS), TOL),
            Ok(())
        );
    }

    #[test]
    fn tampered_body_id_or_timestamp_fail() {
        let s = scheme(&[SECRET]);
        let tampered = br#"{"test": 2432232315}"#;
        assert_eq!(
            s.verify(&headers(SIG, "1614265330"), tampered, at(TS), TOL),
            Err(VerifyError::Invalid)
        );
        assert_eq!(
            s.verify(&headers(SIG, "1614265331"), BODY, at(TS), TOL),
            Err(VerifyError::Invalid)
        );
        let mut h = headers(SIG, "1614265330");
        h.0[0].1 = "msg_other".into();
        assert_eq!(s.verify(&h, BODY, at(TS), TOL), Err(VerifyError::Invalid));
    }

    #[test]
    fn svix_header_names_and_several_signatures() {
        let s = scheme(&[SECRET]);
        let h = Headers::from_pairs([
            ("svix-id", ID_),
            ("svix-timestamp", "1614265330"),
            ("svix-signature", &format!("v1,bm9wZQ== v2,abc {SIG}")),
        ]);
        assert_eq!(s.verify(&h, BODY, at(TS), TOL), Ok(()));
    }

    #[test]
    fn any_rotated_secret_may_match_and_prefix_is_optional() {
        let s = scheme(&["whsec_c2Vjb25k", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        assert_eq!(
            s.verify(&headers(SIG, "1614265330"), BODY, at(TS), TOL),
            Ok(())
        );
        let wrong = scheme(&["whsec_c2Vjb25k"]);
        assert_eq!(
            wrong.verify(&headers(SIG, "1614265330"), BODY, at(TS), TOL),
            Err(VerifyError::Invalid)
        );
    }

    #[test]
    fn tolerance_edges_in_both_directions() {
        let s = scheme(&[SECRET]);
        let h = headers(SIG, "1614265330");
        assert_eq!(s.verify(&h, BODY, at(TS + 300), TOL), Ok(()));
        assert_eq!(s.verify(&h, BODY, at(TS - 300), TOL), Ok(()));
        assert_eq!(
            s.verify(&h, BODY, at(TS + 301), TOL),
            Err(VerifyError::OutOfTolerance)
        );
        assert_eq!(
            s.verify(&h, BODY, at(TS - 301), TOL),
            Err(VerifyError::OutOfTolerance)
        );
    }

    #[test]
    fn missing_and_malformed_headers() {
        let s = scheme(&[SECRET]);
        let none = Headers::default();
        assert_eq!(
            s.verify(&none, BODY, at(TS), TOL),
            Err(VerifyError::Missing)
        );
        for bad in ["", "v1", "v1,", "v1,!!!", "v2,g0hM9SsE", "garbage"] {
            assert_eq!(
                s.verify(&headers(bad, "1614265330"), BODY, at(TS), TOL),
                Err(VerifyError::Invalid),
                "{bad:?}"
            );
        }
        assert_eq!(
            s.verify(&headers(SIG, "soon"), BODY, at(TS), TOL),
            Err(VerifyError::Invalid)
        );
    }

    #[test]
    fn bad_secrets_are_rejected_without_echoing_them() {
        let err = StandardWebhooks::new(&["whsec_not base64!".into()]).unwrap_err();
        assert!(!err.contains("not base64!"));
        assert!(StandardWebhooks::new(&[]).is_err());
    }
}
