//! `github`, `shopify` and `slack`: fixed settings of the generic HMAC engine
//! ([`super::hmac_generic`]), each checked against its provider's published example.
//!
//! | scheme  | signature header        | signed content        | id                    | event type       |
//! |---------|-------------------------|-----------------------|-----------------------|------------------|
//! | github  | `X-Hub-Signature-256: sha256=<hex>` | body      | `X-GitHub-Delivery`   | `X-GitHub-Event` |
//! | shopify | `X-Shopify-Hmac-Sha256: <base64>`   | body      | `X-Shopify-Webhook-Id`| `X-Shopify-Topic`|
//! | slack   | `X-Slack-Signature: v0=<hex>` | `v0:{timestamp}:{body}` | body `/event_id` (JSON) or the body's fingerprint (forms) | `/event/type` |

use super::hmac_generic::{Encoding, HmacScheme, HmacSettings};
use super::{Field, FieldError, SchemeError};

/// GitHub: no timestamp, so no tolerance; the delivery id header is not signed.
pub fn github(secrets: &[String]) -> Result<HmacScheme, SchemeError> {
    HmacScheme::new(
        secrets,
        HmacSettings {
            signature_header: "X-Hub-Signature-256".into(),
            prefix: "sha256=".into(),
            encoding: Encoding::Hex,
            timestamp_header: None,
            signed_content: None,
            id_header: Some("X-GitHub-Delivery".into()),
            id_field: Field::Header("X-GitHub-Delivery".into()),
            event_type_field: Field::Header("X-GitHub-Event".into()),
            handshake: None,
        },
    )
}

/// Shopify: base64 over the body; the webhook id header is not signed.
pub fn shopify(secrets: &[String]) -> Result<HmacScheme, SchemeError> {
    HmacScheme::new(
        secrets,
        HmacSettings {
            signature_header: "X-Shopify-Hmac-Sha256".into(),
            prefix: String::new(),
            encoding: Encoding::Base64,
            timestamp_header: None,
            signed_content: None,
            id_header: Some("X-Shopify-Webhook-Id".into()),
            id_field: Field::Header("X-Shopify-Webhook-Id".into()),
            event_type_field: Field::Header("X-Shopify-Topic".into()),
            handshake: None,
        },
    )
}

/// Slack: `v0:{ts}:{body}`. Events API callbacks are JSON with a signed `event_id`; slash
/// commands and interactivity are form-encoded with no id, so they dedupe on the body's
/// fingerprint (Slack's retries resend the same bytes).
pub fn slack(secrets: &[String]) -> Result<HmacScheme, SchemeError> {
    HmacScheme::new(
        secrets,
        HmacSettings {
            signature_header: "X-Slack-Signature".into(),
            prefix: "v0=".into(),
            encoding: Encoding::Hex,
            timestamp_header: Some("X-Slack-Request-Timestamp".into()),
            signed_content: Some("v0:{timestamp}:{body}".into()),
            id_header: None,
            id_field: Field::Derived(slack_id, Some("/event_id")),
            event_type_field: Field::Derived(slack_event_type, None),
            handshake: Some(slack_url_verification),
        },
    )
}

/// Slack's Events API checks a new request URL with a signed
/// `{"type":"url_verification","challenge":"…"}` and expects the challenge back.
fn slack_url_verification(body: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    if json.get("type")?.as_str()? != "url_verification" {
        return None;
    }
    let challenge = json.get("challenge")?.as_str()?;
    Some(serde_json::json!({ "challenge": challenge }).to_string())
}

fn form_value(body: &[u8], key: &str) -> Option<String> {
    std::str::from_utf8(body).ok()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

/// `application/x-www-form-urlencoded` value decoding (`+` is a space).
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
                match (digit(bytes[i + 1]), digit(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push(high * 16 + low);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn slack_id(body: &[u8]) -> Result<Option<String>, FieldError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => Ok(json
            .pointer("/event_id")
            .and_then(|v| v.as_str())
            .map(String::from)),
        Err(_) => Ok(Some(format!(
            "body-sha256:{}",
            crate::domain::fingerprint(body)
        ))),
    }
}

fn slack_event_type(body: &[u8]) -> Result<Option<String>, FieldError> {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let t = json
            .pointer("/event/type")
            .or_else(|| json.pointer("/type"))
            .and_then(|v| v.as_str());
        return Ok(t.map(String::from));
    }
    if form_value(body, "command").is_some() {
        return Ok(Some("slash_command".into()));
    }
    Ok(form_value(body, "payload")
        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
        .and_then(|p| {
            p.pointer("/type")
                .and_then(|t| t.as_str())
                .map(String::from)
        }))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::verify::{Headers, SignatureScheme, VerifyError};

    const TOL: Duration = Duration::from_secs(300);

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    // GitHub Docs, "Validating webhook deliveries", "Testing the webhook payload validation".
    #[test]
    fn github_reproduces_the_documented_example() {
        let g = github(&["It's a Secret to Everybody".into()]).expect("ok");
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let h = Headers::from_pairs([("X-Hub-Signature-256", sig)]);
        assert_eq!(
            g.verify(&h, b"Hello, World!", at(0), TOL).map(|_| ()),
            Ok(())
        );
        assert_eq!(g.sign("d1", b"Hello, World!", at(0))[0].1, sig);
        assert_eq!(
            g.verify(&h, b"Hello, World?", at(0), TOL).map(|_| ()),
            Err(VerifyError::Invalid)
        );
        assert_eq!(
            g.verify(&Headers::default(), b"Hello, World!", at(0), TOL)
                .map(|_| ()),
            Err(VerifyError::Missing)
        );
        assert!(
            !g.signs_header("X-GitHub-Delivery"),
            "GitHub does not sign the delivery id"
        );
    }

    // Slack API docs, "Verifying requests from Slack": the slash-command example.
    const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const SLACK_TS: u64 = 1_531_420_618;
    const SLACK_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SLACK_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn slack_reproduces_the_documented_example_with_tolerance_edges() {
        let s = slack(&[SLACK_SECRET.into()]).expect("ok");
        let h = Headers::from_pairs([
            ("X-Slack-Signature", SLACK_SIG),
            ("X-Slack-Request-Timestamp", "1531420618"),
        ]);
        let body = SLACK_BODY.as_bytes();
        assert_eq!(s.verify(&h, body, at(SLACK_TS), TOL).map(|_| ()), Ok(()));
        assert_eq!(s.sign("", body, at(SLACK_TS))[0].1, SLACK_SIG);
        assert_eq!(
            s.verify(&h, b"token=tampered", at(SLACK_TS), TOL)
                .map(|_| ()),
            Err(VerifyError::Invalid)
        );
        assert_eq!(
            s.verify(&h, body, at(SLACK_TS + 300), TOL).map(|_| ()),
            Ok(())
        );
        assert_eq!(
            s.verify(&h, body, at(SLACK_TS + 301), TOL).map(|_| ()),
            Err(VerifyError::OutOfTolerance)
        );
        assert_eq!(
            s.verify(&h, body, at(SLACK_TS - 301), TOL).map(|_| ()),
            Err(VerifyError::OutOfTolerance)
        );
        // A form body dedupes on its fingerprint and is typed as a slash command.
        assert_eq!(slack_event_type(body), Ok(Some("slash_command".into())));
        assert!(
            slack_id(body)
                .expect("ok")
                .is_some_and(|id| id.starts_with("body-sha256:"))
        );
        let json = br#"{"type":"event_callback","event_id":"Ev01","event":{"type":"app_mention"}}"#;
        assert_eq!(slack_id(json), Ok(Some("Ev01".into())));
        assert_eq!(slack_event_type(json), Ok(Some("app_mention".into())));
    }

    // Shopify publishes no example vector; this one was computed independently with
    // `printf '{"id":820982911946154508,"email":"jon@example.com"}' | openssl dgst -sha256 -hmac shpss_test -binary | base64`.
    #[test]
    fn shopify_matches_an_independently_computed_signature() {
        let s = shopify(&["shpss_test".into()]).expect("ok");
        let body = br#"{"id":820982911946154508,"email":"jon@example.com"}"#;
        let sig = "ZPINS/5npCYM+nR4R+feUuIZGvjL1Ncj6BUOKdHVNKQ=";
        let h = Headers::from_pairs([("X-Shopify-Hmac-Sha256", sig)]);
        assert_eq!(s.verify(&h, body, at(0), TOL).map(|_| ()), Ok(()));
        assert_eq!(
            s.verify(&h, b"{}", at(0), TOL).map(|_| ()),
            Err(VerifyError::Invalid)
        );
        assert!(!s.signs_header("X-Shopify-Webhook-Id"));
    }

    #[test]
    fn form_decoding() {
        assert_eq!(percent_decode("a%2Fb+c%"), "a/b c%");
        assert_eq!(percent_decode("%é1"), "%é1");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(
            form_value(b"a=1&command=%2Fx", "command"),
            Some("/x".into())
        );
    }
}
