//! Standard Webhooks (<https://www.standardwebhooks.com/>), as sent by Svix and many others.
//!
//! `webhook-signature: v1,<base64 HMAC-SHA256("{id}.{timestamp}.{body}")>` — a space-separated
//! list, so a sender rotating its key can send both signatures. The `svix-*` header names are
//! accepted too. Secrets are `whsec_<base64>`; like the reference libraries, the prefix is
//! optional.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};

use super::mac::{HmacSha256, any_secret_matches, hmac_sha256, tag};
use super::{
    Field, Headers, SchemeError, Secret, SignatureScheme, Verified, VerifyError, skew, unix_seconds,
};

/// Header names: the standard ones first, Svix's as a fallback.
const ID: [&str; 2] = ["webhook-id", "svix-id"];
const TIMESTAMP: [&str; 2] = ["webhook-timestamp", "svix-timestamp"];
const SIGNATURE: [&str; 2] = ["webhook-signature", "svix-signature"];

/// The `standard-webhooks` scheme with its decoded secrets (`v1`, HMAC) and public keys
/// (`v1a`, ed25519).
#[derive(Debug)]
pub struct StandardWebhooks {
    secrets: Vec<Secret>,
    public_keys: Vec<VerifyingKey>,
}

impl StandardWebhooks {
    /// Decodes `whsec_<base64>` (or bare base64) secrets. The error never shows a secret.
    pub fn new(raw: &[String]) -> Result<Self, SchemeError> {
        Self::with_public_keys(raw, &[])
    }

    /// Secrets and `whpk_<base64>` ed25519 public keys; at least one of either.
    pub fn with_public_keys(raw: &[String], public_keys: &[String]) -> Result<Self, SchemeError> {
        let secrets = raw
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let b64 = s.strip_prefix("whsec_").unwrap_or(s);
                match BASE64.decode(b64) {
                    Ok(bytes) if !bytes.is_empty() => Ok(Secret::from_bytes(bytes)),
                    _ => Err(SchemeError::BadSecret(i + 1)),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let public_keys = public_keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let b64 = k.strip_prefix("whpk_").unwrap_or(k);
                BASE64
                    .decode(b64)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .and_then(|b| VerifyingKey::from_bytes(&b).ok())
                    .ok_or(SchemeError::BadPublicKey(i + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if secrets.is_empty() && public_keys.is_empty() {
            return Err(SchemeError::NoKeys);
        }
        Ok(Self {
            secrets,
            public_keys,
        })
    }

    fn mac(secret: &Secret, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        hmac_sha256(
            secret.expose(),
            &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
        )
    }
}

fn first_header<'h>(headers: &'h Headers, names: &[&str]) -> Option<&'h str> {
    names.iter().find_map(|n| headers.get(n))
}

/// Decoded signatures of one version.
type Signatures = Vec<Vec<u8>>;

/// The decoded `v1` (HMAC) and `v1a` (ed25519) signatures of a `webhook-signature` value:
/// a space-separated list of `version,base64` entries (ASCII whitespace, as the
/// specification's libraries split it), read in one pass. Entries of another version, or
/// whose base64 does not decode, are passed over; more than
/// [`MAX_SIGNATURE_ENTRIES`](super::MAX_SIGNATURE_ENTRIES) entries of any kind is refused
/// before any signature is checked (at most that many are decoded first).
fn signature_entries(signatures: &str) -> Result<(Signatures, Signatures), VerifyError> {
    let (mut v1, mut v1a) = (Vec::new(), Vec::new());
    for (n, entry) in signatures.split_ascii_whitespace().enumerate() {
        if n >= super::MAX_SIGNATURE_ENTRIES {
            return Err(VerifyError::Invalid);
        }
        let (list, b64) = match entry.split_once(',') {
            Some(("v1", b64)) => (&mut v1, b64),
            Some(("v1a", b64)) => (&mut v1a, b64),
            _ => continue,
        };
        if let Ok(signature) = BASE64.decode(b64) {
            list.push(signature);
        }
    }
    Ok((v1, v1a))
}

impl SignatureScheme for StandardWebhooks {
    fn verify(
        &self,
        headers: &Headers,
        body: &[u8],
        now: SystemTime,
        tolerance: Duration,
    ) -> Result<Verified, VerifyError> {
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

        let (v1, v1a) = signature_entries(signatures)?;
        if v1.is_empty() && v1a.is_empty() {
            return Err(VerifyError::Invalid);
        }
        let in_time = skew(ts, now) <= tolerance;
        let hmac_ok = !v1.is_empty()
            && any_secret_matches(&self.secrets, &v1, |s| Self::mac(s, id, timestamp, body));
        if hmac_ok {
            return if in_time {
                Ok(Verified {
                    signed_id: (!id.is_empty()).then(|| id.to_owned()),
                })
            } else {
                Err(VerifyError::OutOfTolerance)
            };
        }
        if v1a.is_empty() {
            return Err(VerifyError::Invalid);
        }
        // ed25519 costs ~100x an HMAC: a stale request never gets that far. (Its signature
        // is then unchecked, and the answer is the one thing certainly wrong with it.)
        if !in_time {
            return Err(VerifyError::OutOfTolerance);
        }
        let mut content = Vec::with_capacity(id.len() + timestamp.len() + body.len() + 2);
        content.extend_from_slice(id.as_bytes());
        content.push(b'.');
        content.extend_from_slice(timestamp.as_bytes());
        content.push(b'.');
        content.extend_from_slice(body);
        let ed25519_ok = v1a
            .iter()
            .filter_map(|sig| Signature::from_slice(sig).ok())
            .any(|sig| {
                self.public_keys
                    .iter()
                    .any(|k| k.verify(&content, &sig).is_ok())
            });
        if !ed25519_ok {
            return Err(VerifyError::Invalid);
        }
        Ok(Verified {
            signed_id: (!id.is_empty()).then(|| id.to_owned()),
        })
    }

    fn sign(&self, id: &str, body: &[u8], now: SystemTime) -> Vec<(String, String)> {
        let ts = unix_seconds(now);
        // With only public keys configured there is nothing to sign with.
        let signature = self
            .secrets
            .first()
            .map(|s| format!("v1,{}", BASE64.encode(tag(Self::mac(s, id, &ts, body)))))
            .unwrap_or_default();
        vec![
            ("webhook-id".into(), id.to_owned()),
            ("webhook-timestamp".into(), ts),
            ("webhook-signature".into(), signature),
        ]
    }

    fn has_signature_headers(&self, headers: &Headers) -> bool {
        first_header(headers, &SIGNATURE).is_some() && first_header(headers, &TIMESTAMP).is_some()
    }

    fn signature_headers(&self) -> Vec<&str> {
        SIGNATURE.to_vec()
    }

    fn read_headers(&self) -> Vec<&str> {
        [SIGNATURE, TIMESTAMP, ID].concat()
    }

    fn default_id_field(&self) -> Field {
        Field::Header("webhook-id".into())
    }

    fn default_event_type_field(&self) -> Field {
        Field::Pointer("/type".into())
    }

    fn signs_header(&self, name: &str) -> bool {
        ID.iter().any(|h| h.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

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
            s.verify(&headers(SIG, "1614265330"), BODY, at(TS), TOL)
                .map(|_| ()),
            Ok(())
        );
    }

    #[test]
    fn tampered_body_id_or_timestamp_fail() {
        let s = scheme(&[SECRET]);
        let tampered = br#"{"test": 2432232315}"#;
        assert_eq!(
            s.verify(&headers(SIG, "1614265330"), tampered, at(TS), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
        assert_eq!(
            s.verify(&headers(SIG, "1614265331"), BODY, at(TS), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
        let mut h = headers(SIG, "1614265330");
        h.0[0].1 = "msg_other".into();
        assert_eq!(
            s.verify(&h, BODY, at(TS), TOL).map(|_| ()),
            Err(VerifyError::Invalid)
        );
    }

    #[test]
    fn svix_header_names_and_several_signatures() {
        let s = scheme(&[SECRET]);
        let h = Headers::from_pairs([
            ("svix-id", ID_),
            ("svix-timestamp", "1614265330"),
            ("svix-signature", &format!("v1,bm9wZQ== v2,abc {SIG}")),
        ]);
        assert_eq!(s.verify(&h, BODY, at(TS), TOL).map(|_| ()), Ok(()));
    }

    #[test]
    fn any_rotated_secret_may_match_and_prefix_is_optional() {
        let s = scheme(&["whsec_c2Vjb25k", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        assert_eq!(
            s.verify(&headers(SIG, "1614265330"), BODY, at(TS), TOL)
                .map(|_| ()),
            Ok(())
        );
        let wrong = scheme(&["whsec_c2Vjb25k"]);
        assert_eq!(
            wrong
                .verify(&headers(SIG, "1614265330"), BODY, at(TS), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
    }

    #[test]
    fn tolerance_edges_in_both_directions() {
        let s = scheme(&[SECRET]);
        let h = headers(SIG, "1614265330");
        assert_eq!(s.verify(&h, BODY, at(TS + 300), TOL).map(|_| ()), Ok(()));
        assert_eq!(s.verify(&h, BODY, at(TS - 300), TOL).map(|_| ()), Ok(()));
        assert_eq!(
            s.verify(&h, BODY, at(TS + 301), TOL).map(|_| ()),
            Err(VerifyError::OutOfTolerance)
        );
        assert_eq!(
            s.verify(&h, BODY, at(TS - 301), TOL).map(|_| ()),
            Err(VerifyError::OutOfTolerance)
        );
    }

    #[test]
    fn missing_and_malformed_headers() {
        let s = scheme(&[SECRET]);
        let none = Headers::default();
        assert_eq!(
            s.verify(&none, BODY, at(TS), TOL).map(|_| ()),
            Err(VerifyError::Missing)
        );
        for bad in ["", "v1", "v1,", "v1,!!!", "v2,g0hM9SsE", "garbage"] {
            assert_eq!(
                s.verify(&headers(bad, "1614265330"), BODY, at(TS), TOL)
                    .map(|_| ()),
                Err(VerifyError::Invalid),
                "{bad:?}"
            );
        }
        assert_eq!(
            s.verify(&headers(SIG, "soon"), BODY, at(TS), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
    }

    // No published v1a vector exists; this one was made independently with OpenSSL:
    // `openssl genpkey -algorithm ed25519`, then `openssl pkeyutl -sign -rawin` over
    // `msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{"test": 2432232314}`.
    const V1A_KEY: &str = "whpk_FHYdymzpKFNrmHnGjemY9+RBsjCgX1Gfms8jLQ8lBbM=";
    const V1A_SIG: &str = "v1a,I5YMiddSpJ4cX/1j4aPfW8DiHUQukd+YluL5Y7DtlY8aLnAhcRys/K9/yEhk2gzW4tf4s00VGQOowaeuS0EIAg==";

    /// Issue 12: a header may carry at most 16 signatures; more is invalid without any
    /// being checked, even when one of them is right.
    #[test]
    fn more_than_sixteen_signatures_are_refused_unchecked() {
        let s = scheme(&[SECRET]);
        let sixteen = format!("{}{SIG}", "v1,bm9wZQ== ".repeat(15));
        assert_eq!(
            s.verify(&headers(&sixteen, "1614265330"), BODY, at(TS), TOL)
                .map(|_| ()),
            Ok(())
        );
        let seventeen = format!("v1,bm9wZQ== {sixteen}");
        assert_eq!(
            s.verify(&headers(&seventeen, "1614265330"), BODY, at(TS), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
    }

    /// The header's list in one pass: runs of ASCII whitespace separate entries (as the
    /// specification's libraries split them); entries of other versions, without a comma,
    /// or with bad base64 are passed over; a non-ASCII space joins what it sits between
    /// into one entry (which then does not decode).
    #[test]
    fn signature_entries_are_read_by_version_in_one_pass() {
        let (v1, v1a) = signature_entries(
            "v1,AAEC \t v2,AAEC  v1a,AwQ= nocomma v1,@@@ v1,BQY=\u{a0}v1,BwA= v1,CAk=",
        )
        .expect("within the bound");
        assert_eq!(v1, vec![vec![0, 1, 2], vec![8, 9]]);
        assert_eq!(v1a, vec![vec![3, 4]]);
        assert_eq!(signature_entries(""), Ok((vec![], vec![])));
        let sixteen = vec!["x"; 16].join(" ");
        assert!(signature_entries(&sixteen).is_ok());
        assert_eq!(
            signature_entries(&format!("{sixteen} x")),
            Err(VerifyError::Invalid)
        );
    }

    /// Issue 12: ed25519 is checked only for a request in time, so a flood of stale `v1a`
    /// entries costs no signature verification: the fake signatures below would be
    /// `Invalid` if any had been checked; the answer is decided by the timestamp alone.
    #[test]
    fn stale_v1a_signatures_are_refused_before_any_ed25519_check() {
        let s = StandardWebhooks::with_public_keys(&[], &[V1A_KEY.into()]).expect("key");
        let fake = format!("v1a,{}", BASE64.encode([7u8; 64]));
        let flood = vec![fake; 16].join(" ");
        assert_eq!(
            s.verify(&headers(&flood, "1614265330"), BODY, at(TS + 301), TOL)
                .map(|_| ()),
            Err(VerifyError::OutOfTolerance)
        );
        assert_eq!(
            s.verify(&headers(&flood, "1614265330"), BODY, at(TS), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
    }

    #[test]
    fn v1a_ed25519_signatures_verify_against_public_keys() {
        let s = StandardWebhooks::with_public_keys(&[], &[V1A_KEY.into()]).expect("key");
        assert_eq!(
            s.verify(&headers(V1A_SIG, "1614265330"), BODY, at(TS), TOL)
                .map(|_| ()),
            Ok(())
        );
        // Next to a v1 it cannot check (no secret), and with the body tampered.
        let both = format!("{SIG} {V1A_SIG}");
        assert_eq!(
            s.verify(&headers(&both, "1614265330"), BODY, at(TS), TOL)
                .map(|_| ()),
            Ok(())
        );
        assert_eq!(
            s.verify(&headers(V1A_SIG, "1614265330"), b"{}", at(TS), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
        assert_eq!(
            s.verify(&headers(V1A_SIG, "1614265330"), BODY, at(TS + 301), TOL)
                .map(|_| ()),
            Err(VerifyError::OutOfTolerance)
        );
        // A v1a signature is not accepted by a source that only has HMAC secrets.
        assert_eq!(
            scheme(&[SECRET])
                .verify(&headers(V1A_SIG, "1614265330"), BODY, at(TS), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
        assert!(StandardWebhooks::with_public_keys(&[], &["whpk_AAAA".into()]).is_err());
    }

    #[test]
    fn bad_secrets_are_rejected_without_echoing_them() {
        let err = StandardWebhooks::new(&["whsec_not base64!".into()]).unwrap_err();
        assert_eq!(err, SchemeError::BadSecret(1));
        assert!(!err.to_string().contains("not base64!"));
        assert!(StandardWebhooks::new(&[]).is_err());
    }
}
