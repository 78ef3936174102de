//! Every signature scheme through the HTTP endpoint: accepted, replayed, conflict, bad
//! signature; body dedup where the id is not signed; Slack's handshake.

use std::time::Duration;

use crate::helpers::{
    Options, TestApp, assert_error, assert_replayed, eventually, is_replayed, spawn_with,
};

const SOURCES: &str = r#"
[sources.stripe]
scheme = "stripe"
secrets = ["whsec_stripe_test"]

[sources.github]
scheme = "github"
secrets = ["github-secret"]

[sources.slack]
scheme = "slack"
secrets = ["slack-signing-secret"]

[sources.shopify]
scheme = "shopify"
secrets = ["shopify-secret"]

[sources.partner]
scheme = "hmac-sha256"
secrets = ["partner-secret"]
signature_header = "X-Partner-Signature"
prefix = "sha256="
encoding = "base64"
timestamp_header = "X-Partner-Timestamp"
signed_content = "{id}.{timestamp}.{body}"
id_header = "X-Partner-Delivery"
event_type_pointer = "/event"

[sources.pointer]
scheme = "hmac-sha256"
secrets = ["pointer-secret"]
signature_header = "X-Signature"
id_pointer = "/delivery/id"

[[handlers]]
name = "count"
kind = "log"
"#;

async fn app() -> TestApp {
    spawn_with(Options {
        extra_toml: SOURCES.into(),
        ..Options::default()
    })
    .await
}

/// A body for `source` carrying `id` where the scheme reads it from the body.
fn body_for(source: &str, id: &str, n: u32) -> String {
    match source {
        "stripe" => {
            format!(r#"{{"id":"{id}","object":"event","type":"invoice.paid","data":{{"n":{n}}}}}"#)
        }
        "slack" => format!(
            r#"{{"type":"event_callback","event_id":"{id}","event":{{"type":"app_mention","n":{n}}}}}"#
        ),
        "partner" => format!(r#"{{"event":"loan.disbursed","n":{n}}}"#),
        "pointer" => format!(r#"{{"delivery":{{"id":"{id}"}},"type":"x","n":{n}}}"#),
        _ => format!(r#"{{"n":{n}}}"#),
    }
}

async fn post(app: &TestApp, source: &str, id: &str, body: &str) -> reqwest::Response {
    let headers = app.sign_for(source, id, body.as_bytes());
    app.post(source, &headers, body.as_bytes().to_vec()).await
}

#[tokio::test]
async fn every_scheme_accepts_replays_conflicts_and_rejects_bad_signatures() {
    let app = app().await;
    for source in ["stripe", "github", "slack", "shopify", "partner", "pointer"] {
        let id = format!("evt_{source}_1");
        let body = body_for(source, &id, 1);
        let first = post(&app, source, &id, &body).await;
        assert_eq!(first.status().as_u16(), 202, "{source}");
        let first = first.bytes().await.expect("body");
        let json: serde_json::Value = serde_json::from_slice(&first).expect("json");
        assert_eq!(json["delivery_id"], id.as_str(), "{source}");

        let again = post(&app, source, &id, &body).await;
        assert!(is_replayed(&again), "{source}");
        assert_eq!(again.bytes().await.expect("body"), first, "{source}");

        let other = body_for(source, &id, 2);
        assert_error(
            post(&app, source, &id, &other).await,
            422,
            "delivery_id_conflict",
        )
        .await;

        let mut headers = app.sign_for(source, &id, body.as_bytes());
        let tampered = body_for(source, &id, 99);
        assert_error(
            app.post(source, &headers, tampered.into_bytes()).await,
            401,
            "invalid_signature",
        )
        .await;
        headers.clear();
        assert_error(
            app.post(source, &headers, body.clone().into_bytes()).await,
            401,
            "missing_signature",
        )
        .await;
    }
}

#[tokio::test]
async fn a_github_body_resent_under_a_new_delivery_id_runs_nothing() {
    let recorder = crate::helpers::Recorder::default();
    let app = spawn_with(Options {
        extra_toml: SOURCES.into(),
        handlers: vec![webhook_inbox::Registration::new("gh", recorder.clone()).source("github")],
        ..Options::default()
    })
    .await;
    let body = r#"{"action":"opened","pull_request":{"number":7}}"#;
    let first = post(&app, "github", "72d3162e-cc78-11e3-81ab-4c9367dc0958", body).await;
    assert_eq!(first.status().as_u16(), 202);
    let first = first.bytes().await.expect("body");
    // A captured request replayed with a fresh X-GitHub-Delivery: the signature still holds.
    let replayed = post(&app, "github", "a-fresh-delivery-id", body).await;
    assert_eq!(replayed.status().as_u16(), 202);
    assert_replayed(&replayed);
    assert_eq!(
        replayed.bytes().await.expect("body"),
        first,
        "answered as the first delivery"
    );
    assert!(eventually(Duration::from_secs(10), || recorder.runs().len() == 1).await);
    app.stop().await;
    assert_eq!(recorder.runs().len(), 1, "no handler runs for the replay");

    // Stripe signs the id (it is in the body): the same body is the same id anyway, and a
    // new id means a new body. Standard Webhooks signs the id header: no body dedup there.
}

#[tokio::test]
async fn standard_webhooks_does_not_dedupe_bodies_because_its_id_is_signed() {
    let app = app().await;
    let body = crate::helpers::event("application.created", 1);
    assert_eq!(app.deliver("msg_a", &body).await.status().as_u16(), 202);
    let second = app.deliver("msg_b", &body).await;
    assert_eq!(second.status().as_u16(), 202);
    assert!(
        second.headers().get("idempotent-replayed").is_none(),
        "a new signed id is a new delivery"
    );
}

#[tokio::test]
async fn slack_url_verification_is_answered_and_not_recorded_and_forms_dedupe_on_the_body() {
    let app = app().await;
    let challenge = r#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    let r = post(&app, "slack", "", challenge).await;
    assert_eq!(r.status().as_u16(), 200);
    let json: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        json["challenge"],
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );

    let form = "token=x&team_id=T1&command=%2Fopen-case&text=42&trigger_id=1.2.3";
    let mut headers = app.sign_for("slack", "", form.as_bytes());
    headers.push((
        "content-type".into(),
        "application/x-www-form-urlencoded".into(),
    ));
    let first = app.post("slack", &headers, form.as_bytes().to_vec()).await;
    assert_eq!(first.status().as_u16(), 202);
    let again = app
        .post(
            "slack",
            &app.sign_for("slack", "", form.as_bytes()),
            form.as_bytes().to_vec(),
        )
        .await;
    assert_replayed(&again);
}

#[tokio::test]
async fn a_stripe_body_that_is_not_json_is_400_after_the_signature_holds() {
    let app = app().await;
    let body = "not json";
    assert_error(post(&app, "stripe", "", body).await, 400, "invalid_json").await;
    let no_id = r#"{"type":"invoice.paid"}"#;
    assert_error(
        post(&app, "stripe", "", no_id).await,
        400,
        "invalid_delivery_id",
    )
    .await;
}
