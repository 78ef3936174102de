//! Hostile senders and careless operators (issue 12): bodies that are slow, large or never
//! come; credentials in headers and URLs; ids and event types that are not plain text; log
//! injection; a captured request replayed after its delivery expired. Each test fails
//! without its fix.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use webhook_inbox::Registration;

use crate::helpers::{
    Options, Recorder, TestApp, assert_error, assert_replayed, event, eventually, eventually_async,
    spawn_with,
};

/// Sends the head of a request (and `body_prefix` of its body) on a raw connection and
/// returns the connection, so the test decides when (or whether) the rest comes.
fn send_head(
    app: &TestApp,
    headers: &[(String, String)],
    content_length: usize,
    body_prefix: &[u8],
) -> TcpStream {
    let address = app.address.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).expect("connect");
    let mut head = format!(
        "POST /webhooks/credicorp HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n"
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("head");
    stream.write_all(body_prefix).expect("body prefix");
    stream
}

/// Reads an HTTP response (status line and JSON body) within `within`, off the runtime.
async fn read_response(mut stream: TcpStream, within: Duration) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || {
        stream.set_read_timeout(Some(within)).expect("timeout");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf);
                    if let Some((head, body)) = text.split_once("\r\n\r\n")
                        && body.ends_with('}')
                    {
                        let status = head.split(' ').nth(1)?.parse().ok()?;
                        return Some((status, body.to_owned()));
                    }
                }
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("reader")
}

/// Item 1: a request without its signature headers is refused before its body is read,
/// however long it says the body is.
#[tokio::test]
async fn no_body_is_read_without_the_signature_headers() {
    let app = spawn_with(Options {
        server_toml: "body_timeout = \"120s\"".into(),
        ..Options::default()
    })
    .await;
    let stream = send_head(&app, &[], 50_000, b"");
    let (status, body) = read_response(stream, Duration::from_secs(30))
        .await
        .expect("answered without waiting for the body");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("missing_signature"), "{body}");
}

/// Item 1: a body that stalls gets 408 `body_timeout` after `server.body_timeout`.
#[tokio::test]
async fn a_stalled_body_gets_408() {
    let app = spawn_with(Options {
        server_toml: "body_timeout = \"300ms\"".into(),
        ..Options::default()
    })
    .await;
    let body = event("application.created", 1);
    let stream = send_head(
        &app,
        &app.sign("msg_stall", body.as_bytes()),
        body.len(),
        &body.as_bytes()[..10],
    );
    let (status, answer) = read_response(stream, Duration::from_secs(30))
        .await
        .expect("answered");
    assert_eq!(status, 408, "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    // Nothing was stored: the id is still new.
    assert_eq!(app.deliver("msg_stall", &body).await.status().as_u16(), 202);
}

/// Item 1: bodies being read at once count against `server.max_inflight_bytes`; past it a
/// new request gets 503 `server_busy` with `Retry-After`, and the budget comes back when
/// the slow senders are gone.
#[tokio::test]
async fn the_inflight_byte_budget_refuses_more_slow_bodies() {
    let app = spawn_with(Options {
        max_body_bytes: 64 * 1024,
        server_toml: "max_inflight_bytes = 131072\nbody_timeout = \"120s\"".into(),
        ..Options::default()
    })
    .await;
    let body = event("application.created", 2);
    let signed = app.sign("msg_slow", body.as_bytes());
    let slow: Vec<TcpStream> = (0..2)
        .map(|_| send_head(&app, &signed, 64 * 1024, b"{"))
        .collect();
    // Both slow bodies are being read once a new request finds the budget spent (until
    // then the probe is simply accepted).
    let refused = eventually_async(Duration::from_secs(20), || async {
        app.deliver("msg_now", &body).await.status().as_u16() == 503
    })
    .await;
    assert!(refused, "a request past the budget is refused");
    let answer = app.deliver("msg_now", &body).await;
    assert!(answer.headers().get("retry-after").is_some());
    assert_error(answer, 503, "server_busy").await;
    drop(slow);
    let accepted = eventually_async(Duration::from_secs(20), || async {
        app.deliver("msg_now", &body).await.status().as_u16() == 202
    })
    .await;
    assert!(accepted, "the budget came back when the slow senders left");
}

/// Item 1: shutdown does not wait for a client that stalls mid-body.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_stalled_body() {
    let app = spawn_with(Options {
        max_body_bytes: 64 * 1024,
        server_toml: "body_timeout = \"120s\"\nmax_inflight_bytes = 65536".into(),
        ..Options::default()
    })
    .await;
    let body = event("application.created", 3);
    // The stalled request is in the handler once it holds the whole budget. A probe the
    // server reads first holds a little of it, and the stalled request is then refused
    // (it needs all of it): it is sent again. Every stream is kept open to the end, so
    // that one which did get in is never let go.
    let mut stalled = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut holding = false;
    while !holding && std::time::Instant::now() < deadline {
        stalled.push(send_head(
            &app,
            &app.sign("msg_stuck", body.as_bytes()),
            64 * 1024,
            &body.as_bytes()[..5],
        ));
        holding = eventually_async(Duration::from_secs(2), || async {
            app.deliver("msg_probe", &body).await.status().as_u16() == 503
        })
        .await;
    }
    assert!(holding, "the stalled request reached the handler");
    let stopped = tokio::time::timeout(Duration::from_secs(20), app.stop()).await;
    drop(stalled);
    assert!(stopped.is_ok(), "shutdown waited for the stalled client");
}

/// Item 7: credentials, proxy and hop-by-hop headers, and the signature itself, are not
/// stored with the delivery nor written into its fixture.
#[tokio::test]
async fn credential_and_signature_headers_are_not_stored() {
    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    let body = event("application.created", 4);
    let mut headers = app.sign("msg_creds", body.as_bytes());
    for (k, v) in [
        ("authorization", "Bearer partner-secret-token"),
        ("cookie", "session=partner-cookie"),
        ("x-forwarded-for", "10.1.2.3"),
        ("x-partner-trace", "kept"),
    ] {
        headers.push((k.into(), v.into()));
    }
    assert_eq!(
        app.post("credicorp", &headers, body.into_bytes())
            .await
            .status()
            .as_u16(),
        202
    );
    for path in [
        "/admin/deliveries/credicorp/msg_creds",
        "/admin/deliveries/credicorp/msg_creds/fixture",
    ] {
        let text = app.admin_get(path).await.text().await.expect("text");
        for secret in [
            "partner-secret-token",
            "partner-cookie",
            "10.1.2.3",
            "webhook-signature",
        ] {
            assert!(!text.contains(secret), "{path} shows {secret}: {text}");
        }
        assert!(text.contains("x-partner-trace"), "{path}: {text}");
    }
}

const GITHUB: &str = r#"
[sources.github]
scheme = "github"
secrets = ["github-secret"]
"#;

async fn post_github(
    app: &TestApp,
    id: &[u8],
    event_name: &[u8],
    body: &[u8],
) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}/webhooks/github", app.address))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in app.sign_for("github", "placeholder", body) {
        if !k.eq_ignore_ascii_case("x-github-delivery") {
            request = request.header(k, v);
        }
    }
    request
        .header(
            "x-github-delivery",
            reqwest::header::HeaderValue::from_bytes(id).expect("obs-text is allowed"),
        )
        .header(
            "x-github-event",
            reqwest::header::HeaderValue::from_bytes(event_name).expect("value"),
        )
        .send()
        .await
        .expect("sent")
}

/// Item 8: a delivery id that is not UTF-8 is refused (read lossily, `nu_\xff\xfe` and
/// `nu_\xfe\xff` were one id), and so is an event type header that is not.
#[tokio::test]
async fn ids_and_event_types_that_are_not_text_are_refused() {
    let app = spawn_with(Options {
        extra_toml: GITHUB.into(),
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    let body = br#"{"action":"opened"}"#;
    assert_error(
        post_github(&app, b"nu_\xff\xfe", b"push", body).await,
        400,
        "invalid_delivery_id",
    )
    .await;
    assert_error(
        post_github(&app, b"nu_\xfe\xff", b"push", b"{\"other\":1}").await,
        400,
        "invalid_delivery_id",
    )
    .await;
    assert_error(
        post_github(&app, b"gh-1", b"pu\xffsh", body).await,
        400,
        "invalid_event_type",
    )
    .await;
    let listed: serde_json::Value = app
        .admin_get("/admin/deliveries")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        listed["deliveries"],
        serde_json::json!([]),
        "nothing stored"
    );
    assert_eq!(
        post_github(&app, b"gh-1", b"push", body).await.status(),
        202
    );
}

/// A redelivery meets the same checks as a first delivery on either backend: sled answers
/// a redelivery of the stored body without reading its body's fields again, but an event
/// type read from a header is checked on every copy, since a copy may carry another one.
#[tokio::test]
async fn a_redelivery_still_meets_the_event_type_header_check() {
    let app = spawn_with(Options {
        extra_toml: GITHUB.into(),
        ..Options::default()
    })
    .await;
    let body = br#"{"action":"opened"}"#;
    let first = post_github(&app, b"gh-9", b"push", body).await;
    assert_eq!(first.status(), 202);
    let first_answer = first.bytes().await.expect("body");

    assert_error(
        post_github(&app, b"gh-9", b"pu\xffsh", body).await,
        400,
        "invalid_event_type",
    )
    .await;
    let again = post_github(&app, b"gh-9", b"push", body).await;
    assert_eq!(again.status(), 202);
    assert_eq!(
        again
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(again.bytes().await.expect("body"), first_answer);
    assert_error(
        post_github(&app, b"gh-9", b"push", br#"{"action":"closed"}"#).await,
        422,
        "delivery_id_conflict",
    )
    .await;
}

/// Issue 22, item 6: every header a scheme reads must be text. A `svix-id` that is not
/// UTF-8 was read lossily and checked against a signature over its lossy form (202); now it
/// is 400 `invalid_delivery_id`, and a signature or timestamp header that is not text is 401.
#[tokio::test]
async fn standard_webhooks_headers_that_are_not_text_are_refused() {
    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    let body = event("application.created", 1);
    let raw_id: &[u8] = b"msg_\xff\xfe";
    // What a sender would sign if it signed the lossy reading of those bytes.
    let lossy = String::from_utf8_lossy(raw_id).into_owned();
    let send = |raw: Vec<(String, Vec<u8>)>| {
        let mut request = app
            .client
            .post(format!("{}/webhooks/credicorp", app.address))
            .header("content-type", "application/json")
            .body(body.clone());
        for (name, value) in raw {
            request = request.header(
                name,
                reqwest::header::HeaderValue::from_bytes(&value).expect("obs-text is allowed"),
            );
        }
        request.send()
    };
    let svix = |id: &[u8], bytes_of: &dyn Fn(&str, String) -> Vec<u8>| {
        app.sign(&lossy, body.as_bytes())
            .into_iter()
            .map(|(k, v)| {
                let name = k.replace("webhook-", "svix-");
                let value = if name == "svix-id" {
                    id.to_vec()
                } else {
                    bytes_of(&name, v)
                };
                (name, value)
            })
            .collect::<Vec<_>>()
    };
    let as_sent = |_: &str, v: String| v.into_bytes();
    assert_error(
        send(svix(raw_id, &as_sent)).await.expect("sent"),
        400,
        "invalid_delivery_id",
    )
    .await;
    // A signature list whose one bad entry is not text, beside a valid entry.
    let signature_not_text = |name: &str, v: String| {
        if name == "svix-signature" {
            [b"v1,\xff ".as_slice(), v.as_bytes()].concat()
        } else {
            v.into_bytes()
        }
    };
    let good_id = app.sign("msg_text", body.as_bytes());
    let with_good_id = |bytes_of: &dyn Fn(&str, String) -> Vec<u8>| {
        good_id
            .iter()
            .map(|(k, v)| {
                let name = k.replace("webhook-", "svix-");
                let value = bytes_of(&name, v.clone());
                (name, value)
            })
            .collect::<Vec<_>>()
    };
    assert_error(
        send(with_good_id(&signature_not_text)).await.expect("sent"),
        401,
        "invalid_signature",
    )
    .await;
    let listed: serde_json::Value = app
        .admin_get("/admin/deliveries")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        listed["deliveries"],
        serde_json::json!([]),
        "nothing stored"
    );
    // The same signed request, all text, is accepted.
    let response = send(with_good_id(&as_sent)).await.expect("sent");
    assert_eq!(response.status(), 202);
}

/// Item 8: an event type over 255 bytes or with a control character is 400
/// `invalid_event_type`, and nothing is stored.
#[tokio::test]
async fn event_types_with_control_characters_or_too_long_are_refused() {
    let app = spawn_with(Options::default()).await;
    for (n, bad) in [
        "a\u{0}b".to_owned(),
        "a\nb".to_owned(),
        "a\u{1b}[31m".to_owned(),
        "t".repeat(256),
    ]
    .into_iter()
    .enumerate()
    {
        let body = serde_json::json!({ "type": bad }).to_string();
        let id = format!("msg_type_{n}");
        assert_error(app.deliver(&id, &body).await, 400, "invalid_event_type").await;
        // Nothing stored: the same id with a good body is new.
        let good = event("application.created", n as u32);
        let again = app.deliver(&id, &good).await;
        assert_eq!(again.status().as_u16(), 202);
        assert!(again.headers().get("idempotent-replayed").is_none());
    }
    let longest = serde_json::json!({ "type": "t".repeat(255) }).to_string();
    assert_eq!(
        app.deliver("msg_type_ok", &longest).await.status().as_u16(),
        202
    );
}

/// Item 6: credentials in an `http` handler's URL never reach the admin API.
#[tokio::test]
async fn http_handler_url_credentials_are_redacted() {
    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        extra_toml: r#"
[[handlers]]
name = "downstream"
kind = "http"
source = "credicorp"
url = "http://partner-user:hunter2@127.0.0.1:9/hooks?token=s3cr3t"
timeout = "2s"
"#
        .into(),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_url", &event("application.created", 5))
            .await
            .status()
            .as_u16(),
        202
    );
    let show = || async {
        app.admin_get("/admin/deliveries/credicorp/msg_url")
            .await
            .text()
            .await
            .expect("text")
    };
    let dead = eventually_async(Duration::from_secs(20), || async {
        show().await.contains("\"dead\"")
    })
    .await;
    let text = show().await;
    assert!(dead, "{text}");
    assert!(
        text.contains("127.0.0.1:9/hooks"),
        "the error names the target: {text}"
    );
    for secret in ["hunter2", "partner-user", "s3cr3t"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

/// Item 11: with a scheme that signs no timestamp, a captured request sent again after its
/// delivery expired is still answered as the replay it is, by its fingerprint
/// (`storage.fingerprint_retention`), under its own id or a fresh one; nothing runs again.
#[tokio::test]
async fn a_captured_request_is_still_a_replay_after_its_delivery_expired() {
    let github = Recorder::default();
    let app = spawn_with(Options {
        retention: "1s",
        tolerance: "1s",
        extra_toml: format!("{GITHUB}tolerance = \"1s\"\n"),
        handlers: vec![Registration::new("gh", github.clone()).source("github")],
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    let app = Arc::new(app);
    let body = br#"{"action":"closed","number":9}"#;
    let first = post_github(&app, b"gh-captured", b"pull_request", body).await;
    assert_eq!(first.status().as_u16(), 202);
    let first = first.bytes().await.expect("body");
    assert!(eventually(Duration::from_secs(20), || github.runs().len() == 1).await);
    // Wait until the delivery itself is gone.
    let expired = eventually_async(Duration::from_secs(20), || async {
        app.admin_get("/admin/deliveries/github/gh-captured")
            .await
            .status()
            == 404
    })
    .await;
    assert!(expired, "the delivery expired");
    for id in [&b"gh-captured"[..], b"gh-fresh-id"] {
        let again = post_github(&app, id, b"pull_request", body).await;
        assert_eq!(again.status().as_u16(), 202);
        assert_replayed(&again);
        assert_eq!(again.bytes().await.expect("body"), first);
    }
    assert_eq!(github.runs().len(), 1, "nothing ran again");
}

/// Item 5: the unauthenticated path segment never reaches a log line as written (an
/// unknown source is `_unknown`), and colour escapes are written only to a terminal.
#[test]
fn an_unknown_source_cannot_forge_log_lines_or_write_escapes() {
    use std::io::BufRead as _;
    let dir = tempfile::TempDir::new().expect("dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        crate::helpers::config_text(dir.path(), &Options::default()),
    )
    .expect("config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["--log-format", "pretty", "serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("webhook-inbox serving")
                && let Some(port) = line
                    .split("listen")
                    .nth(1)
                    .and_then(|rest| rest.split("127.0.0.1:").nth(1))
                    .map(|p| {
                        p.chars()
                            .take_while(char::is_ascii_digit)
                            .collect::<String>()
                    })
            {
                let _ = tx.send(port);
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let port = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the serving line names the port");
    let status = reqwest::blocking::Client::new()
        .post(format!(
            "http://127.0.0.1:{port}/webhooks/evil%0AFORGED%20ERROR%20admin%20login%1B%5B31m"
        ))
        .body("{}")
        .send()
        .expect("sent")
        .status();
    assert_eq!(status.as_u16(), 404);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().expect("exit").success());
    let logs = reader.join().expect("logs");
    assert!(logs.contains("_unknown"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "no escape sequence in the logs: {logs:?}"
    );
    assert!(
        !logs.lines().any(|l| l.starts_with("FORGED")),
        "a forged line: {logs}"
    );
    assert!(!logs.contains("evil"), "the path as written: {logs}");
}
