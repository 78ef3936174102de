//! design.md "Checks", row by row: each rejection answers the contract's JSON error and
//! stores nothing, so a valid delivery with the same id is then accepted as new.

use std::time::{Duration, SystemTime};

use crate::helpers::{OTHER_SECRET, Options, SECRET, assert_error, event, spawn_app, spawn_with};

/// After a rejection, the same id must still be new: 202 without `Idempotent-Replayed`.
async fn assert_accepted_as_new(app: &crate::helpers::TestApp, id: &str) {
    let response = app.deliver(id, &event("application.created", 1)).await;
    assert_eq!(
        response.status().as_u16(),
        202,
        "a rejection must store nothing"
    );
    assert!(response.headers().get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn unknown_source_is_404() {
    let app = spawn_app().await;
    let body = event("application.created", 1);
    let headers = app.sign("msg_unknown_source", body.as_bytes());
    let response = app.post("nobody", &headers, body.into_bytes()).await;
    assert_error(response, 404, "unknown_source").await;
    assert_accepted_as_new(&app, "msg_unknown_source").await;
}

/// The public listener has one route, matched by hand (`routes::webhook::route`): a POST to
/// `/webhooks/` and one segment, percent-decoded as actix's router did; anything else is a
/// bare 404 that reaches no source and stores nothing.
#[tokio::test]
async fn only_a_post_to_one_source_segment_is_routed() {
    let app = spawn_app().await;
    let body = event("application.created", 1);
    let headers = app.sign("msg_routed", body.as_bytes());
    let send = |method: reqwest::Method, path: &str| {
        let mut request = app
            .client
            .request(method, format!("{}{path}", app.address))
            .body(body.clone());
        for (k, v) in &headers {
            request = request.header(k.as_str(), v.as_str());
        }
        request.send()
    };
    for (method, path) in [
        (reqwest::Method::GET, "/webhooks/credicorp"),
        (reqwest::Method::PUT, "/webhooks/credicorp"),
        (reqwest::Method::POST, "/webhooks/credicorp/extra"),
        (reqwest::Method::POST, "/webhooks/"),
        (reqwest::Method::POST, "/hooks/credicorp"),
    ] {
        let response = send(method.clone(), path).await.expect("answered");
        assert_eq!(response.status().as_u16(), 404, "{method} {path}");
        assert!(
            response.text().await.expect("body").is_empty(),
            "{method} {path}: the router's bare 404, not a source's error"
        );
    }
    assert_accepted_as_new(&app, "msg_routed").await;
    // The segment is percent-decoded: `cred%69corp` is `credicorp`.
    let response = send(reqwest::Method::POST, "/webhooks/cred%69corp")
        .await
        .expect("answered");
    assert_eq!(response.status().as_u16(), 202);
    assert!(response.headers().get("idempotent-replayed").is_some());
}

#[tokio::test]
async fn body_over_the_limit_is_413_declared_or_streamed() {
    let app = spawn_with(Options {
        max_body_bytes: 1024,
        ..Options::default()
    })
    .await;
    let big = format!(r#"{{"type":"a","pad":"{}"}}"#, "x".repeat(2000));
    let headers = app.sign("msg_big", big.as_bytes());
    assert_error(
        app.post("credicorp", &headers, big.clone().into_bytes())
            .await,
        413,
        "payload_too_large",
    )
    .await;

    // Chunked: no Content-Length, the limit applies while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.as_bytes().chunks(300).map(|c| Ok(c.to_vec())).collect();
    let mut request = app
        .client
        .post(format!("{}/webhooks/credicorp", app.address))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )));
    for (k, v) in &headers {
        request = request.header(k.as_str(), v.as_str());
    }
    assert_error(
        request.send().await.expect("sent"),
        413,
        "payload_too_large",
    )
    .await;
    assert_accepted_as_new(&app, "msg_big").await;
}

#[tokio::test]
async fn absent_signature_headers_are_401_missing_signature() {
    let app = spawn_app().await;
    let body = event("application.created", 1);
    let signed = app.sign("msg_missing", body.as_bytes());
    for dropped in ["webhook-signature", "webhook-timestamp"] {
        let headers: Vec<_> = signed
            .iter()
            .filter(|(k, _)| k != dropped)
            .cloned()
            .collect();
        assert_error(
            app.post("credicorp", &headers, body.clone().into_bytes())
                .await,
            401,
            "missing_signature",
        )
        .await;
    }
    assert_accepted_as_new(&app, "msg_missing").await;
}

#[tokio::test]
async fn wrong_secret_tampering_and_malformed_headers_are_401_invalid_signature() {
    let app = spawn_app().await;
    let body = event("application.created", 1);
    let foreign = app.sign_with(
        OTHER_SECRET,
        "msg_bad_sig",
        body.as_bytes(),
        SystemTime::now(),
    );
    assert_error(
        app.post("credicorp", &foreign, body.clone().into_bytes())
            .await,
        401,
        "invalid_signature",
    )
    .await;

    let signed = app.sign("msg_bad_sig", body.as_bytes());
    let tampered = event("application.created", 2);
    assert_error(
        app.post("credicorp", &signed, tampered.into_bytes()).await,
        401,
        "invalid_signature",
    )
    .await;

    for (header, value) in [
        ("webhook-signature", "v1,not-base64!"),
        ("webhook-signature", "garbage"),
        ("webhook-timestamp", "yesterday"),
    ] {
        let mut headers = signed.clone();
        headers.retain(|(k, _)| k != header);
        headers.push((header.into(), value.into()));
        assert_error(
            app.post("credicorp", &headers, body.clone().into_bytes())
                .await,
            401,
            "invalid_signature",
        )
        .await;
    }
    assert_accepted_as_new(&app, "msg_bad_sig").await;
}

#[tokio::test]
async fn signed_timestamps_outside_tolerance_either_way_are_401() {
    let app = spawn_app().await;
    let body = event("application.created", 1);
    for at in [
        SystemTime::now() - Duration::from_secs(301 + 5),
        SystemTime::now() + Duration::from_secs(301 + 5),
    ] {
        let headers = app.sign_with(SECRET, "msg_old", body.as_bytes(), at);
        assert_error(
            app.post("credicorp", &headers, body.clone().into_bytes())
                .await,
            401,
            "timestamp_out_of_tolerance",
        )
        .await;
    }
    // Just inside the 5 minute tolerance, in both directions.
    for (i, at) in [
        SystemTime::now() - Duration::from_secs(290),
        SystemTime::now() + Duration::from_secs(290),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("msg_inside_{i}");
        let headers = app.sign_with(SECRET, &id, body.as_bytes(), at);
        assert_eq!(
            app.post("credicorp", &headers, body.clone().into_bytes())
                .await
                .status(),
            202
        );
    }
    assert_accepted_as_new(&app, "msg_old").await;
}

#[tokio::test]
async fn missing_long_or_control_character_ids_are_400() {
    let app = spawn_app().await;
    let body = event("application.created", 1);
    // Signed over the empty id, with no id header: the signature holds, the id does not.
    let without_id: Vec<_> = app
        .sign("", body.as_bytes())
        .into_iter()
        .filter(|(k, _)| k != "webhook-id")
        .collect();
    assert_error(
        app.post("credicorp", &without_id, body.clone().into_bytes())
            .await,
        400,
        "invalid_delivery_id",
    )
    .await;

    for id in ["a".repeat(256), "msg\tid".to_owned()] {
        let headers = app.sign(&id, body.as_bytes());
        assert_error(
            app.post("credicorp", &headers, body.clone().into_bytes())
                .await,
            400,
            "invalid_delivery_id",
        )
        .await;
    }
    let longest = "a".repeat(255);
    assert_eq!(app.deliver(&longest, &body).await.status(), 202);
}

#[tokio::test]
async fn a_signed_body_that_is_not_json_is_400_invalid_json() {
    let app = spawn_app().await;
    let body = b"type=application.created".to_vec();
    let headers = app.sign("msg_not_json", &body);
    assert_error(
        app.post("credicorp", &headers, body).await,
        400,
        "invalid_json",
    )
    .await;
    assert_accepted_as_new(&app, "msg_not_json").await;
}

/// The checks come before the claim for a stored id too: another body under it that is
/// not JSON is `invalid_json`, not a conflict, and the stored record still answers its own
/// body.
#[tokio::test]
async fn a_stored_id_with_a_body_that_is_not_json_is_400_invalid_json() {
    let app = spawn_app().await;
    let body = event("application.created", 1);
    let first = app.deliver("msg_then_not_json", &body).await;
    assert_eq!(first.status(), 202);
    let not_json = b"type=application.created".to_vec();
    let headers = app.sign("msg_then_not_json", &not_json);
    assert_error(
        app.post("credicorp", &headers, not_json).await,
        400,
        "invalid_json",
    )
    .await;
    let again = app.deliver("msg_then_not_json", &body).await;
    assert_eq!(again.status(), 202);
    assert!(again.headers().get("idempotent-replayed").is_some());
}

#[tokio::test]
async fn checks_run_in_the_contract_order() {
    let app = spawn_with(Options {
        max_body_bytes: 64,
        ..Options::default()
    })
    .await;
    // Unknown source wins over a too-large unsigned body; too large wins over unsigned.
    let big = vec![b'x'; 100];
    assert_error(
        app.post("nobody", &[], big.clone()).await,
        404,
        "unknown_source",
    )
    .await;
    assert_error(
        app.post("credicorp", &[], big).await,
        413,
        "payload_too_large",
    )
    .await;
    // A bad signature wins over a bad id and a bad body.
    let headers = vec![
        ("webhook-timestamp".to_owned(), "1".to_owned()),
        ("webhook-signature".to_owned(), "v1,AAAA".to_owned()),
    ];
    assert_error(
        app.post("credicorp", &headers, b"nope".to_vec()).await,
        401,
        "invalid_signature",
    )
    .await;
    // A bad id wins over a bad body.
    let body = b"nope".to_vec();
    let no_id: Vec<_> = app
        .sign("", &body)
        .into_iter()
        .filter(|(k, _)| k != "webhook-id")
        .collect();
    assert_error(
        app.post("credicorp", &no_id, body).await,
        400,
        "invalid_delivery_id",
    )
    .await;
}

/// A body the HTTP layer cannot read (a broken chunked encoding) is 400 `invalid_body`.
#[tokio::test]
async fn an_unreadable_body_is_400_invalid_body() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = spawn_app().await;
    let body = event("application.created", 1);
    let mut request = String::from(
        "POST /webhooks/credicorp HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n",
    );
    for (k, v) in app.sign("msg_broken", body.as_bytes()) {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    // "zz" is not a hexadecimal chunk size.
    request.push_str("\r\nzz\r\n");
    let port = app.address.rsplit(':').next().expect("port").to_owned();
    let mut stream = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stream.read_to_string(&mut response),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains(r#""error":"invalid_body""#), "{response}");
    assert_accepted_as_new(&app, "msg_broken").await;
}
