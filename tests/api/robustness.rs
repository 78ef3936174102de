//! No input makes the service panic or answer 5xx: arbitrary header values and bodies get a
//! 4xx with the contract's JSON error (or a 202 when they happen to be valid).

use std::time::SystemTime;

use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestCaseError, TestRunner};

use crate::helpers::{TestApp, spawn_app};

fn header_value() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        "[ -~]{0,120}".prop_map(Some),
        "v1,[A-Za-z0-9+/=]{0,60}( v1,[A-Za-z0-9+/=]{0,60})?".prop_map(Some),
        "-?[0-9]{1,20}".prop_map(Some),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        "\\{\"type\":\"[ -~]{0,20}\"\\}".prop_map(String::into_bytes),
    ]
}

async fn check(
    app: &TestApp,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Result<(), TestCaseError> {
    check_answer(app.post("credicorp", &headers, body).await).await
}

/// No 5xx; anything but a 202 is a 4xx with the contract's JSON error.
async fn check_answer(response: reqwest::Response) -> Result<(), TestCaseError> {
    let status = response.status().as_u16();
    prop_assert!(status < 500, "answered {status}");
    if status != 202 {
        prop_assert!((400..500).contains(&status));
        let json: serde_json::Value = response
            .json()
            .await
            .map_err(|e| TestCaseError::fail(format!("error body is not JSON: {e}")))?;
        prop_assert!(json["error"].is_string() && json["message"].is_string());
    }
    Ok(())
}

#[test]
fn arbitrary_headers_and_bodies_never_get_a_5xx() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let app = runtime.block_on(spawn_app());
    let mut runner = TestRunner::new(PropConfig {
        cases: 300,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let strategy = (header_value(), header_value(), header_value(), body());
    runner
        .run(&strategy, |(id, ts, sig, body)| {
            let headers: Vec<(String, String)> = [
                ("webhook-id", id),
                ("webhook-timestamp", ts),
                ("webhook-signature", sig),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect();
            runtime.block_on(check(&app, headers, body))
        })
        .expect("no 5xx, always a JSON error");
}

/// Correctly signed, arbitrary ids and bodies: they reach the id and JSON checks and the
/// claim, and still never get a 5xx. Those accepted (the 202 branch, which must be taken:
/// counted) are stored whole: the same request again gets the first answer byte for byte,
/// marked `Idempotent-Replayed`.
#[test]
fn signed_arbitrary_ids_and_bodies_never_get_a_5xx() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let app = runtime.block_on(spawn_app());
    let mut runner = TestRunner::new(PropConfig {
        cases: 200,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    let bodies = prop_oneof![
        body(),
        ("[a-z.]{1,20}", "[ -~]{0,200}").prop_map(|(kind, text)| {
            serde_json::json!({"type": kind, "data": {"text": text}})
                .to_string()
                .into_bytes()
        }),
    ];
    runner
        .run(&("[ -~]{0,300}", bodies), |(id, body)| {
            let headers = app.sign_with(crate::helpers::SECRET, &id, &body, SystemTime::now());
            runtime.block_on(async {
                let first = app.post("credicorp", &headers, body.clone()).await;
                let status = first.status().as_u16();
                if status != 202 {
                    return check_answer(first).await;
                }
                if first.headers().contains_key("idempotent-replayed") {
                    // An id the generator produced twice: already checked the first time.
                    return Ok(());
                }
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let first = first.bytes().await.expect("first answer");
                let again = app.post("credicorp", &headers, body).await;
                prop_assert_eq!(again.status().as_u16(), 202);
                prop_assert!(again.headers().contains_key("idempotent-replayed"));
                let again = again.bytes().await.expect("replayed answer");
                prop_assert_eq!(first, again, "the replay is the first answer byte for byte");
                Ok(())
            })
        })
        .expect("no 5xx, always a JSON error; a replay is the first answer");
    let accepted = accepted.into_inner();
    assert!(
        accepted >= 20,
        "only {accepted} of 200 signed cases were accepted: the 202 branch barely ran"
    );
}
