//! The admin listener: auth, every endpoint, the CLI over it, metrics, and logs that never
//! hold a secret.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use webhook_inbox::Registration;
use webhook_inbox::config::Durability;
use webhook_inbox::store::{DeliveryKey, JobStatus, Operations};

use crate::helpers::{
    Options, Recorder, SECRET, TestApp, assert_error, event, eventually, open_store, spawn_app,
    spawn_with, wait_for_job,
};

const TOKEN: &str = "admin-token-for-tests-3f9a";

async fn admin_app() -> TestApp {
    spawn_with(Options {
        admin_token: Some(TOKEN),
        ..Options::default()
    })
    .await
}

async fn get(app: &TestApp, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = app.client.get(format!("{}{path}", app.admin_address));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.expect("sent")
}

#[tokio::test]
async fn admin_endpoints_need_the_bearer_token_and_are_off_without_one() {
    let app = admin_app().await;
    app.deliver("msg_auth", &event("application.created", 1))
        .await;
    for path in [
        "/admin/deliveries",
        "/admin/deliveries/credicorp/msg_auth",
        "/admin/deliveries/credicorp/msg_auth/fixture",
    ] {
        assert_error(get(&app, path, None).await, 401, "unauthorized").await;
        assert_error(get(&app, path, Some("wrong")).await, 401, "unauthorized").await;
        assert_error(
            get(&app, path, Some(&format!("{TOKEN}x"))).await,
            401,
            "unauthorized",
        )
        .await;
        assert_eq!(
            get(&app, path, Some(TOKEN)).await.status().as_u16(),
            200,
            "{path}"
        );
    }
    let retry = app
        .client
        .post(format!(
            "{}/admin/deliveries/credicorp/msg_auth/retry",
            app.admin_address
        ))
        .send()
        .await
        .expect("sent");
    assert_error(retry, 401, "unauthorized").await;
    // Health, readiness and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(&app, path, None).await.status().as_u16(), 200, "{path}");
    }

    let no_token = spawn_app().await;
    assert_error(
        get(&no_token, "/admin/deliveries", Some(TOKEN)).await,
        403,
        "admin_disabled",
    )
    .await;
}

#[tokio::test]
async fn list_pages_newest_first_and_filters_by_source_and_status() {
    let app = spawn_with(Options {
        admin_token: Some(TOKEN),
        extra_toml: format!("[sources.other]\nsecrets = [\"{SECRET}\"]\n"),
        ..Options::default()
    })
    .await;
    for i in 0..3 {
        assert_eq!(
            app.deliver(&format!("msg_list_{i}"), &event("application.created", i))
                .await
                .status()
                .as_u16(),
            202
        );
    }
    let body = event("x.y", 9);
    let headers = app.sign_for("other", "msg_other", body.as_bytes());
    assert_eq!(
        app.post("other", &headers, body.into_bytes())
            .await
            .status()
            .as_u16(),
        202
    );
    assert!(eventually(Duration::from_secs(10), || app.recorder.runs().len() == 3).await);

    let page: serde_json::Value = get(
        &app,
        "/admin/deliveries?source=credicorp&limit=2",
        Some(TOKEN),
    )
    .await
    .json()
    .await
    .expect("json");
    let ids: Vec<&str> = page["deliveries"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["record"]["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["msg_list_2", "msg_list_1"]);
    let cursor = page["next_cursor"].as_str().expect("more");
    let next: serde_json::Value = get(
        &app,
        &format!("/admin/deliveries?source=credicorp&limit=2&cursor={cursor}"),
        Some(TOKEN),
    )
    .await
    .json()
    .await
    .expect("json");
    let ids: Vec<&str> = next["deliveries"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["record"]["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["msg_list_0"]);
    assert!(next["next_cursor"].is_null());

    let all: serde_json::Value = get(&app, "/admin/deliveries", Some(TOKEN))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(all["deliveries"].as_array().expect("list").len(), 4);
    assert_eq!(all["deliveries"][0]["record"]["id"], "msg_other");
    let succeeded: serde_json::Value = get(
        &app,
        "/admin/deliveries?status=succeeded&source=credicorp",
        Some(TOKEN),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(succeeded["deliveries"].as_array().expect("list").len(), 3);
    let dead: serde_json::Value = get(&app, "/admin/deliveries?status=dead", Some(TOKEN))
        .await
        .json()
        .await
        .expect("json");
    assert!(dead["deliveries"].as_array().expect("list").is_empty());
    assert_error(
        get(&app, "/admin/deliveries?status=sleepy", Some(TOKEN)).await,
        400,
        "invalid_query",
    )
    .await;
    assert_error(
        get(&app, "/admin/deliveries?limit=0", Some(TOKEN)).await,
        400,
        "invalid_query",
    )
    .await;
    assert_error(
        get(&app, "/admin/deliveries?cursor=zz", Some(TOKEN)).await,
        400,
        "invalid_query",
    )
    .await;
}

#[tokio::test]
async fn show_and_fixture_describe_one_delivery() {
    let app = admin_app().await;
    let body = event("application.created", 5);
    app.deliver("msg_show", &body).await;
    assert!(eventually(Duration::from_secs(10), || app.recorder.runs().len() == 1).await);
    // The handler state is written just after the run; poll the API for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let shown = loop {
        let shown: serde_json::Value =
            get(&app, "/admin/deliveries/credicorp/msg_show", Some(TOKEN))
                .await
                .json()
                .await
                .expect("json");
        if shown["status"] == "succeeded" || std::time::Instant::now() > deadline {
            break shown;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(shown["status"], "succeeded");
    assert_eq!(shown["body"], body.as_str());
    assert_eq!(shown["record"]["event_type"], "application.created");
    let handler = &shown["handlers"][0];
    assert_eq!(handler["name"], "recorder");
    assert_eq!(handler["state"]["status"], "succeeded");
    assert_eq!(handler["state"]["attempts"], 1);
    assert_eq!(handler["idempotency_key"].as_str().map(str::len), Some(64));

    let fixture: serde_json::Value = get(
        &app,
        "/admin/deliveries/credicorp/msg_show/fixture",
        Some(TOKEN),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(fixture["source"], "credicorp");
    assert_eq!(fixture["id"], "msg_show");
    assert_eq!(fixture["body"]["data"]["n"], 5);
    assert!(fixture["headers"].get("webhook-signature").is_none());

    assert_error(
        get(&app, "/admin/deliveries/credicorp/nope", Some(TOKEN)).await,
        404,
        "not_found",
    )
    .await;
    let retry = app
        .client
        .post(format!(
            "{}/admin/deliveries/credicorp/nope/retry",
            app.admin_address
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("sent");
    assert_error(retry, 404, "not_found").await;
}

#[tokio::test]
async fn a_dead_lettered_delivery_retried_through_the_cli_runs_only_the_dead_handler() {
    let dir = Arc::new(tempfile::TempDir::new().expect("dir"));
    let store = open_store(dir.path(), Durability::Fsync, None).await;
    // Fails its first three attempts: dead after max_attempts = 3, fine on the fourth.
    let stubborn = Recorder {
        fail_first: 3,
        ..Recorder::default()
    };
    let app = spawn_with(Options {
        admin_token: Some(TOKEN),
        dir: Some(dir.clone()),
        store: Some(store.clone()),
        handlers: vec![Registration::new("stubborn", stubborn.clone()).source("credicorp")],
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_dead", &event("application.created", 1))
            .await
            .status()
            .as_u16(),
        202
    );
    let job = DeliveryKey::new("credicorp", "msg_dead").job("stubborn");
    wait_for_job(&*store, &job, JobStatus::Dead).await;
    assert_eq!(store.dead_letters().await.expect("count"), 1);

    let config_path = dir.path().join("cli.toml");
    std::fs::write(
        &config_path,
        crate::helpers::config_text(dir.path(), &Options::default()),
    )
    .expect("write");
    let cli = |args: Vec<String>| {
        let config_path = config_path.clone();
        let admin = app.admin_address.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
                    .arg("deliveries")
                    .args(&args)
                    .arg("--config")
                    .arg(&config_path)
                    .args(["--admin", &admin])
                    .env("WEBHOOK_INBOX_ADMIN_TOKEN", TOKEN)
                    .output()
                    .expect("binary runs")
            })
            .await
            .expect("join")
        }
    };
    let listed = cli(vec!["list".into(), "--status".into(), "dead".into()]).await;
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        text.contains("msg_dead") && text.contains("dead") && text.starts_with("RECEIVED_AT"),
        "{text}"
    );

    let shown = cli(vec!["show".into(), "credicorp".into(), "msg_dead".into()]).await;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("stubborn") && text.contains("failing attempt 3"),
        "{text}"
    );

    let retried = cli(vec![
        "retry".into(),
        "credicorp".into(),
        "msg_dead".into(),
        "--json".into(),
    ])
    .await;
    let json: serde_json::Value = serde_json::from_slice(&retried.stdout).expect("--json output");
    assert_eq!(
        json["requeued"],
        serde_json::json!(["stubborn"]),
        "only the dead handler"
    );

    wait_for_job(&*store, &job, JobStatus::Succeeded).await;
    app.stop().await;
    assert_eq!(
        app_runs(&stubborn),
        [1, 2, 3, 4],
        "the retry ran with the next attempt number"
    );
    assert_eq!(
        stubborn
            .runs()
            .iter()
            .map(|r| &r.idempotency_key)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        1
    );
    assert_eq!(store.dead_letters().await.expect("count"), 0);
}

fn app_runs(r: &Recorder) -> Vec<u32> {
    r.runs().iter().map(|r| r.attempt).collect()
}

#[tokio::test]
async fn the_cli_names_auth_failures() {
    let app = admin_app().await;
    let dir = tempfile::TempDir::new().expect("dir");
    let config_path = dir.path().join("cli.toml");
    std::fs::write(
        &config_path,
        crate::helpers::config_text(dir.path(), &Options::default()),
    )
    .expect("write");
    let admin = app.admin_address.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
            .args(["deliveries", "list", "--config"])
            .arg(&config_path)
            .args(["--admin", &admin])
            .env("WEBHOOK_INBOX_ADMIN_TOKEN", "not-the-token")
            .output()
            .expect("runs")
    })
    .await
    .expect("join");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "{err}");
    assert!(!err.contains("not-the-token"), "{err}");
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_counters_move() {
    let app = admin_app().await;
    let scrape = || async {
        let text = get(&app, "/metrics", None)
            .await
            .text()
            .await
            .expect("text");
        let lines: Vec<std::io::Result<String>> = text.lines().map(|l| Ok(l.to_owned())).collect();
        let parsed = prometheus_parse::Scrape::parse(lines.into_iter())
            .expect("Prometheus exposition format");
        (text, parsed)
    };
    let value = |scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let (_, before) = scrape().await;
    assert_eq!(
        value(
            &before,
            "webhook_inbox_deliveries_total",
            &[("outcome", "accepted")]
        ),
        0.0
    );

    app.deliver("msg_m1", &event("application.created", 1))
        .await;
    app.deliver("msg_m1", &event("application.created", 1))
        .await;
    app.deliver("msg_m1", &event("application.created", 2))
        .await;
    let body = event("application.created", 3);
    let bad = app.sign_with(
        crate::helpers::OTHER_SECRET,
        "msg_m2",
        body.as_bytes(),
        std::time::SystemTime::now(),
    );
    app.post("credicorp", &bad, body.into_bytes()).await;
    app.post("nobody", &[], b"{}".to_vec()).await;
    assert!(eventually(Duration::from_secs(10), || app.recorder.runs().len() == 1).await);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (text, after) = loop {
        let (text, after) = scrape().await;
        if value(
            &after,
            "webhook_inbox_handler_runs_total",
            &[("handler", "recorder")],
        ) >= 1.0
            || std::time::Instant::now() > deadline
        {
            break (text, after);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let d = "webhook_inbox_deliveries_total";
    assert_eq!(
        value(
            &after,
            d,
            &[("source", "credicorp"), ("outcome", "accepted")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(value(&after, d, &[("outcome", "replayed")]), 1.0);
    assert_eq!(value(&after, d, &[("outcome", "conflict")]), 1.0);
    assert_eq!(
        value(
            &after,
            d,
            &[("outcome", "rejected"), ("reason", "invalid_signature")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            d,
            &[("source", "_unknown"), ("reason", "unknown_source")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "webhook_inbox_handler_runs_total",
            &[("handler", "recorder"), ("result", "succeeded")]
        ),
        1.0
    );
    assert!(
        value(
            &after,
            "webhook_inbox_handler_duration_seconds_count",
            &[("handler", "recorder")]
        ) >= 1.0,
        "{text}"
    );
    if crate::helpers::backend_under_test().is_none() {
        // sled's group commits (PostgreSQL commits are the database's own).
        assert!(
            value(&after, "webhook_inbox_store_flush_seconds_count", &[]) >= 1.0,
            "{text}"
        );
    }
    assert!(
        text.contains("webhook_inbox_queue_depth") && text.contains("webhook_inbox_dead_letters")
    );
}

#[test]
fn logs_of_signed_and_forged_deliveries_hold_no_secret() {
    let dir = tempfile::TempDir::new().expect("dir");
    let text = crate::helpers::config_text(dir.path(), &Options::default());
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &text).expect("write");
    let log_path = dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "trace")
        .env("WEBHOOK_INBOX_ADMIN_TOKEN", TOKEN)
        .stderr(log)
        .spawn()
        .expect("starts");
    let read_port = || {
        std::fs::read_to_string(&log_path).ok().and_then(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["fields"]["message"] == "webhook-inbox serving")
                .map(|v| {
                    (
                        v["fields"]["listen"].as_str().unwrap_or("").to_owned(),
                        v["fields"]["admin"].as_str().unwrap_or("").to_owned(),
                    )
                })
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (listen, admin) = loop {
        if let Some(p) = read_port() {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "never served");
        std::thread::sleep(Duration::from_millis(20));
    };
    let config = webhook_inbox::config::Config::parse(&text, "t.toml").expect("config");
    let source = webhook_inbox::verify::Source::from_config(
        "credicorp",
        &config.sources["credicorp"],
        "t.toml",
        &|_| None,
    )
    .expect("source");
    let client = reqwest::blocking::Client::new();
    let body = event("application.created", 1);
    for (i, tamper) in [false, false, true, true].into_iter().enumerate() {
        let id = format!("msg_log_{i}");
        let mut request = client
            .post(format!("http://{listen}/webhooks/credicorp"))
            .body(if tamper {
                format!("{body} ")
            } else {
                body.clone()
            });
        for (k, v) in source.sign(&id, body.as_bytes(), std::time::SystemTime::now()) {
            request = request.header(k, v);
        }
        request.send().expect("sent");
    }
    client
        .post(format!("http://{listen}/webhooks/credicorp"))
        .header("webhook-signature", "v1,AAAA")
        .header("webhook-timestamp", "1")
        .body("{}")
        .send()
        .expect("sent");
    client
        .get(format!("http://{admin}/admin/deliveries"))
        .bearer_auth(TOKEN)
        .send()
        .expect("sent");
    client
        .get(format!("http://{admin}/admin/deliveries"))
        .bearer_auth("guess")
        .send()
        .expect("sent");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("exit");
    assert!(status.success());

    let logs = std::fs::read_to_string(&log_path).expect("logs");
    assert!(
        logs.contains("invalid_signature") && logs.contains("msg_log_0"),
        "the run was logged"
    );
    let secret_b64 = SECRET.trim_start_matches("whsec_");
    let raw_secret = String::from_utf8(base64_decode(secret_b64)).expect("ascii secret");
    for needle in [SECRET, secret_b64, raw_secret.as_str(), TOKEN] {
        assert!(
            !logs.contains(needle),
            "a secret reached the logs: {needle}"
        );
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

/// Issue 22, item 6: a program's stderr is shown by `deliveries show` and `handlers list`
/// with every control character escaped: an ANSI colour, an OSC title sequence and a C1 CSI
/// written by the handler reach the operator's terminal as text.
#[tokio::test]
async fn cli_renderings_escape_control_characters_from_a_programs_stderr() {
    let dir = Arc::new(tempfile::TempDir::new().expect("dir"));
    let script = r"printf '\033[31mred\033]0;pwned\007\302\233end' >&2; exit 65";
    let app = spawn_with(Options {
        admin_token: Some(TOKEN),
        dir: Some(dir.clone()),
        extra_toml: format!(
            r#"
[[handlers]]
name = "noisy"
kind = "command"
source = "credicorp"
command = ["sh", "-c", {script:?}]
"#
        ),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_ansi", &event("application.created", 1))
            .await
            .status(),
        202
    );
    let dead = crate::helpers::eventually_async(Duration::from_secs(20), || async {
        let d: serde_json::Value = get(&app, "/admin/deliveries/credicorp/msg_ansi", Some(TOKEN))
            .await
            .json()
            .await
            .expect("json");
        d["handlers"]
            .as_array()
            .is_some_and(|hs| hs.iter().any(|h| h["state"]["status"] == "dead"))
    })
    .await;
    assert!(
        dead,
        "the handler failed for good: {}",
        get(&app, "/admin/deliveries/credicorp/msg_ansi", Some(TOKEN))
            .await
            .text()
            .await
            .expect("text")
    );

    let config_path = dir.path().join("cli.toml");
    std::fs::write(
        &config_path,
        crate::helpers::config_text(dir.path(), &Options::default()),
    )
    .expect("write");
    for args in [
        vec!["deliveries", "show", "credicorp", "msg_ansi"],
        vec!["handlers", "list"],
    ] {
        let config_path = config_path.clone();
        let admin = app.admin_address.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
                .args(&args)
                .arg("--config")
                .arg(&config_path)
                .args(["--admin", &admin])
                .env("WEBHOOK_INBOX_ADMIN_TOKEN", TOKEN)
                .output()
                .expect("binary runs")
        })
        .await
        .expect("join");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains(r"\u{1b}[31mred\u{1b}]0;pwned\u{7}\u{9b}end"),
            "the stderr shown escaped: {text}"
        );
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "no control character reaches the terminal: {text:?}"
        );
    }
}
