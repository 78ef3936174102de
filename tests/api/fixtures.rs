//! Fixture replay: every file in fixtures/ against the real app (twice), record → export →
//! replay, the `replay` binary's exit codes, and the handler conformance of the built-ins.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use webhook_inbox::Registration;
use webhook_inbox::replay::{ReplayOptions, run};

use crate::helpers::{Recorder, eventually, shipped_config, spawn_config};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");

fn options(target: &str, times: usize, concurrency: usize) -> ReplayOptions {
    ReplayOptions {
        target: target.into(),
        times,
        concurrency,
        tamper: false,
        new_ids: false,
        verbose: false,
    }
}

async fn app_on_shipped_config(dir: Arc<TempDir>, recorder: &Recorder) -> crate::helpers::TestApp {
    let config = shipped_config(dir.path());
    spawn_config(
        config,
        dir,
        None,
        vec![Registration::new("recorder", recorder.clone())],
        recorder.clone(),
    )
    .await
}

#[tokio::test]
async fn every_fixture_replayed_twice_runs_its_handler_exactly_once() {
    let files = webhook_inbox::fixture::collect(&[FIXTURES.into()]).expect("fixtures");
    assert!(files.len() >= 13, "fixtures/ is populated: {}", files.len());
    let recorder = Recorder::default();
    let app = app_on_shipped_config(Arc::new(TempDir::new().expect("dir")), &recorder).await;

    let summary = run(
        &app.config,
        &[FIXTURES.into()],
        &options(&app.address, 2, 2),
    )
    .await
    .expect("replay runs");
    assert_eq!(summary.sent, 2 * files.len());
    assert_eq!(summary.accepted, files.len(), "{}", summary.report());
    assert_eq!(summary.replayed, files.len(), "{}", summary.report());
    assert!(summary.ok(), "{}", summary.report());

    assert!(
        eventually(Duration::from_secs(20), || recorder.runs().len()
            >= files.len())
        .await
    );
    app.stop().await;
    let mut per_delivery: HashMap<(String, String), usize> = HashMap::new();
    for r in recorder.runs() {
        *per_delivery.entry((r.source, r.id)).or_default() += 1;
    }
    assert_eq!(
        per_delivery.len(),
        files.len(),
        "one delivery per fixture: {per_delivery:?}"
    );
    assert!(per_delivery.values().all(|n| *n == 1), "{per_delivery:?}");
}

#[tokio::test]
async fn a_stored_delivery_exported_and_replayed_on_a_fresh_server_has_the_same_effect() {
    // Production: a real delivery arrives and is handled.
    let recorder = Recorder::default();
    let dir = Arc::new(TempDir::new().expect("dir"));
    let app = app_on_shipped_config(dir.clone(), &recorder).await;
    let fixture = format!("{FIXTURES}/github/pull_request.opened.json");
    let summary = run(&app.config, &[fixture.into()], &options(&app.address, 1, 1))
        .await
        .expect("sent");
    assert_eq!(summary.accepted, 1, "{}", summary.report());
    assert!(eventually(Duration::from_secs(20), || recorder.runs().len() == 1).await);
    let config = app.config.clone();
    app.stop().await;
    let original = recorder.runs()[0].clone();

    // Export it from the stopped server's data directory, as `deliveries export` does.
    let store = crate::helpers::reopen_store(&dir, &config).await;
    let exported =
        webhook_inbox::export::fixture_of(&*store, &config, &original.source, &original.id)
            .await
            .expect("export")
            .expect("stored");
    drop(store);
    assert!(
        exported.headers.contains_key("x-github-event"),
        "{exported:?}"
    );
    assert!(
        !exported.headers.contains_key("x-hub-signature-256"),
        "signatures are not part of a fixture"
    );
    let out = TempDir::new().expect("out");
    let path = out.path().join("exported.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&exported).expect("json")).expect("write");

    // A laptop: a fresh server, the exported fixture replayed.
    let laptop = Recorder::default();
    let fresh = app_on_shipped_config(Arc::new(TempDir::new().expect("dir")), &laptop).await;
    let summary = run(&fresh.config, &[path], &options(&fresh.address, 1, 1))
        .await
        .expect("sent");
    assert_eq!(summary.accepted, 1, "{}", summary.report());
    assert!(eventually(Duration::from_secs(20), || laptop.runs().len() == 1).await);
    fresh.stop().await;
    let replayed = laptop.runs()[0].clone();
    assert_eq!(
        (
            &replayed.source,
            &replayed.id,
            &replayed.event_type,
            &replayed.body
        ),
        (
            &original.source,
            &original.id,
            &original.event_type,
            &original.body
        )
    );
    assert_eq!(
        replayed.idempotency_key, original.idempotency_key,
        "same downstream key too"
    );
}

#[tokio::test]
async fn the_replay_binary_reports_and_sets_its_exit_code() {
    let recorder = Recorder::default();
    let app = app_on_shipped_config(Arc::new(TempDir::new().expect("dir")), &recorder).await;
    let config_path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let replay = |extra: &[&str], target: &str| {
        Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
            .args(["replay", "--config", config_path, "--target", target])
            .args(extra)
            .arg(format!("{FIXTURES}/credicorp"))
            .output()
            .expect("binary runs")
    };
    let target = app.address.clone();
    let (ok, tampered, new_ids) = tokio::task::spawn_blocking(move || {
        (
            replay(&["--times", "3", "--concurrency", "3"], &target),
            replay(&["--tamper"], &target),
            replay(&["--new-ids", "--times", "2"], &target),
        )
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}");
    assert!(
        text.contains("sent 21 · accepted 7 · replayed 14"),
        "{text}"
    );
    assert!(text.contains("p99"), "{text}");
    let text = String::from_utf8_lossy(&tampered.stdout);
    assert!(
        tampered.status.success(),
        "every tampered copy refused: {text}"
    );
    assert!(text.contains("rejected 7"), "{text}");
    let text = String::from_utf8_lossy(&new_ids.stdout);
    assert!(text.contains("accepted 14"), "{text}");
    app.stop().await;

    // Nothing listens any more: connection failures fail the run.
    let target = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port()
    );
    let down = tokio::task::spawn_blocking(move || replay(&[], &target))
        .await
        .expect("join");
    assert!(
        !down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stdout)
    );
}

#[tokio::test]
async fn every_built_in_handler_meets_the_handler_contract() {
    use webhook_inbox::handlers::{CommandHandler, HttpHandler, LogHandler};
    use webhook_inbox::testing::{check_conformance, delivery};

    let d = delivery(
        "credicorp",
        "msg_conformance",
        Some("application.created"),
        r#"{"type":"application.created"}"#,
    );
    check_conformance(&LogHandler, "log", &d)
        .await
        .expect("log");
    let command = CommandHandler::new(
        vec![
            "sh".into(),
            "-c".into(),
            "cat > /dev/null; sleep 0.01".into(),
        ],
        Duration::from_secs(10),
    );
    check_conformance(&command, "command", &d)
        .await
        .expect("command");

    let server = actix_web::HttpServer::new(|| {
        actix_web::App::new().default_service(actix_web::web::to(|| async {
            actix_web::HttpResponse::NoContent().finish()
        }))
    })
    .workers(1)
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .expect("bind");
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    let http = HttpHandler::new(
        &format!("http://127.0.0.1:{port}/cases"),
        Duration::from_secs(10),
    )
    .expect("url");
    check_conformance(&http, "http", &d).await.expect("http");
    handle.stop(true).await;
}
