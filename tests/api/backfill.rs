//! Backfill (design.md, "Backfill"): a handler added after deliveries were stored runs over
//! them once, through `POST /admin/handlers/{name}/backfill` and `webhook-inbox handlers
//! backfill`, on either backend (the suite runs again against PostgreSQL in CI).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError, Registration};

use crate::helpers::{Options, Recorder, TestApp, event, eventually, spawn_with};

const TOKEN: &str = "admin-token";

async fn backfill(app: &TestApp, handler: &str, body: serde_json::Value) -> serde_json::Value {
    let response = app
        .client
        .post(format!(
            "{}/admin/handlers/{handler}/backfill",
            app.admin_address
        ))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// The handlers delivery `id` of `source` is bound to, as the admin API shows them.
async fn bound_handlers(app: &TestApp, source: &str, id: &str) -> Vec<String> {
    let shown = app.admin_show(source, id).await;
    shown["handlers"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter_map(|h| h["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Waits until the wall clock has moved past `t` by a few milliseconds, so deliveries sent
/// after it are received after it (received_at has millisecond resolution).
async fn clock_past(t: SystemTime) {
    let later = t + Duration::from_millis(5);
    assert!(eventually(Duration::from_secs(5), || SystemTime::now() > later).await);
}

/// `webhook-inbox handlers backfill …` against `app`: (exit success, stdout, stderr).
async fn cli(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::TempDir::new().expect("dir");
    let config = dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "[sources.credicorp]\nsecrets = [\"{}\"]\n",
            crate::helpers::SECRET
        ),
    )
    .expect("config");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-inbox"));
    command
        .args(["handlers", "backfill"])
        .args(args)
        .args(["--admin", &app.admin_address, "--config"])
        .arg(&config)
        .env("WEBHOOK_INBOX_ADMIN_TOKEN", TOKEN);
    let out = tokio::task::spawn_blocking(move || command.output().expect("the binary runs"))
        .await
        .expect("join");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Ten deliveries accepted with only the recorder configured; restarted with handler `b`
/// added, `b` has not run them. A dry run counts without binding; the backfill (through
/// the CLI, with its progress line) runs `b` once for each and the recorder not again; a
/// second backfill binds nothing and reports them as already bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_added_later_runs_once_over_the_stored_deliveries() {
    let first = Recorder::default();
    let app = spawn_with(Options {
        recorder: first.clone(),
        admin_token: Some(TOKEN),
        ..Options::default()
    })
    .await;
    let before = SystemTime::now();
    clock_past(before).await;
    for i in 0..10 {
        let id = format!("msg_bf_{i}");
        let body = event("application.created", i);
        assert_eq!(app.deliver(&id, &body).await.status(), 202);
    }
    assert!(eventually(Duration::from_secs(30), || first.runs().len() == 10).await);
    let dir = app.stop().await;

    let again = Recorder::default();
    let b = Recorder::default();
    let app = spawn_with(Options {
        dir: Some(dir),
        recorder: again.clone(),
        handlers: vec![Registration::new("b", b.clone()).source("credicorp")],
        admin_token: Some(TOKEN),
        ..Options::default()
    })
    .await;
    assert_eq!(
        bound_handlers(&app, "credicorp", "msg_bf_0").await,
        ["recorder"]
    );

    let (ok, stdout, stderr) = cli(&app, &["b", "--since", &rfc3339(before), "--dry-run"]).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("b: would bind 10, already bound 0 (dry run: nothing bound)"),
        "{stdout}"
    );
    assert_eq!(
        bound_handlers(&app, "credicorp", "msg_bf_3").await,
        ["recorder"]
    );

    let (ok, stdout, stderr) = cli(&app, &["b", "--since", "1h"]).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("b: bound 10, already bound 0"), "{stdout}");
    assert!(
        stderr.contains("b: looked at 10, bound 10, already 0"),
        "progress: {stderr}"
    );
    assert!(eventually(Duration::from_secs(30), || b.runs().len() == 10).await);
    let mut ids: Vec<String> = b.runs().into_iter().map(|r| r.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10, "each delivery once");
    for run in b.runs() {
        let key = webhook_inbox::store::DeliveryKey::new("credicorp", &run.id)
            .job("b")
            .idempotency_key();
        assert_eq!(run.idempotency_key, key, "the pair's own key");
        assert_eq!(run.attempt, 1);
    }
    assert_eq!(
        bound_handlers(&app, "credicorp", "msg_bf_3").await,
        ["recorder", "b"]
    );

    let report = backfill(&app, "b", serde_json::json!({})).await;
    assert_eq!(report, serde_json::json!({"bound": 0, "already": 10}));
    assert!(again.runs().is_empty(), "the recorder did not run again");
    assert_eq!(b.runs().len(), 10, "b did not run again");

    // An unknown handler, a bad time, a bad pattern: the contract's errors.
    let post = |handler: &str, body: serde_json::Value| {
        app.client
            .post(format!(
                "{}/admin/handlers/{handler}/backfill",
                app.admin_address
            ))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    crate::helpers::assert_error(
        post("nope", serde_json::json!({})).await.expect("sent"),
        404,
        "not_found",
    )
    .await;
    crate::helpers::assert_error(
        post("b", serde_json::json!({"since": "yesterday"}))
            .await
            .expect("sent"),
        400,
        "invalid_query",
    )
    .await;
    crate::helpers::assert_error(
        post("b", serde_json::json!({"events": "a.*.b"}))
            .await
            .expect("sent"),
        400,
        "invalid_query",
    )
    .await;
    let unauthorized = app
        .client
        .post(format!("{}/admin/handlers/b/backfill", app.admin_address))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("sent");
    assert_eq!(unauthorized.status(), 401);
    app.stop().await;
}

/// The window, `source`, `events` and the handler's own `match` bind exactly what they
/// say; a dry run binds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filters_bind_exactly_what_they_say() {
    let other_source = format!(
        "[sources.other]\nsecrets = [\"{}\"]\n",
        crate::helpers::SECRET
    );
    let app = spawn_with(Options {
        extra_toml: other_source.clone(),
        admin_token: Some(TOKEN),
        ..Options::default()
    })
    .await;
    // Early: before the window.
    let body = |t: &str, product: &str, n: u32| {
        format!(r#"{{"type":"{t}","data":{{"product":"{product}","n":{n}}}}}"#)
    };
    assert_eq!(
        app.deliver("early", &body("payment_link.paid", "loan", 0))
            .await
            .status(),
        202
    );
    // Past the millisecond "early" was received in (received times are whole
    // milliseconds: taken in the same one, `since` would include it).
    clock_past(SystemTime::now()).await;
    let since = SystemTime::now();
    clock_past(since).await;
    let sent = [
        ("credicorp", "in_paid", body("payment_link.paid", "loan", 1)),
        (
            "credicorp",
            "in_paid_other_product",
            body("payment_link.paid", "card", 2),
        ),
        (
            "credicorp",
            "in_created",
            body("application.created", "loan", 3),
        ),
        (
            "other",
            "in_other_source",
            body("payment_link.paid", "loan", 4),
        ),
    ];
    for (source, id, body) in &sent {
        let headers = app.sign_for(source, id, body.as_bytes());
        let response = app.post(source, &headers, body.clone().into_bytes()).await;
        assert_eq!(response.status(), 202, "{id}");
    }
    let until = SystemTime::now();
    clock_past(until).await;
    assert_eq!(
        app.deliver("late", &body("payment_link.paid", "loan", 9))
            .await
            .status(),
        202
    );
    let dir = app.stop().await;

    let b = Recorder::default();
    let app = spawn_with(Options {
        dir: Some(dir),
        extra_toml: other_source,
        handlers: vec![
            Registration::new("b", b.clone())
                .matching_body("/data/product", vec![serde_json::json!("loan")]),
        ],
        admin_token: Some(TOKEN),
        ..Options::default()
    })
    .await;
    let window = serde_json::json!({
        "since": rfc3339(since), "until": rfc3339(until),
        "source": "credicorp", "events": "payment_link.*",
    });
    let mut dry = window.clone();
    dry["dry_run"] = serde_json::json!(true);
    assert_eq!(
        backfill(&app, "b", dry).await,
        serde_json::json!({"bound": 1, "already": 0})
    );
    assert!(
        !bound_handlers(&app, "credicorp", "in_paid")
            .await
            .contains(&"b".to_owned())
    );
    assert_eq!(
        backfill(&app, "b", window).await,
        serde_json::json!({"bound": 1, "already": 0})
    );
    let bound: HashMap<&str, bool> = futures_util::future::join_all(
        [
            ("credicorp", "early"),
            ("credicorp", "in_paid"),
            ("credicorp", "in_paid_other_product"),
            ("credicorp", "in_created"),
            ("other", "in_other_source"),
            ("credicorp", "late"),
        ]
        .map(|(source, id)| {
            let app = &app;
            async move {
                (
                    id,
                    bound_handlers(app, source, id)
                        .await
                        .contains(&"b".to_owned()),
                )
            }
        }),
    )
    .await
    .into_iter()
    .collect();
    assert_eq!(
        bound,
        HashMap::from([
            ("early", false),
            ("in_paid", true),
            ("in_paid_other_product", false),
            ("in_created", false),
            ("in_other_source", false),
            ("late", false),
        ])
    );
    assert!(eventually(Duration::from_secs(30), || b.runs().len() == 1).await);
    assert_eq!(b.runs()[0].id, "in_paid");
    // Without filters: every delivery `b` would bind today (its `match`: loan).
    assert_eq!(
        backfill(&app, "b", serde_json::json!({})).await,
        serde_json::json!({"bound": 4, "already": 1})
    );
    app.stop().await;
}

/// Records each run's start and end; the run of `hold` waits until released.
#[derive(Clone, Default)]
struct Gate {
    events: Arc<Mutex<Vec<String>>>,
    release: Arc<tokio::sync::Notify>,
    hold: Arc<Mutex<Option<String>>>,
}

#[async_trait]
impl Handler for Gate {
    async fn handle(&self, d: &Delivery, _: &HandlerContext) -> Result<(), HandlerError> {
        self.events
            .lock()
            .expect("lock")
            .push(format!("start {}", d.id));
        let held = self.hold.lock().expect("lock").as_deref() == Some(d.id.as_str());
        if held {
            self.release.notified().await;
        }
        self.events
            .lock()
            .expect("lock")
            .push(format!("end {}", d.id));
        Ok(())
    }
}

/// An `order_by` handler backfilled over one key's deliveries runs them one at a time, in
/// received order, behind the live pair of that key; a paused handler's backfilled pairs
/// wait until it is resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_backfill_waits_behind_the_live_pair_and_a_pause() {
    let app = spawn_with(Options {
        admin_token: Some(TOKEN),
        ..Options::default()
    })
    .await;
    let body = |n: u32| {
        format!(r#"{{"type":"application.updated","data":{{"application_id":"app_7","n":{n}}}}}"#)
    };
    for n in 1..=3 {
        assert_eq!(
            app.deliver(&format!("old_{n}"), &body(n)).await.status(),
            202
        );
    }
    let dir = app.stop().await;

    let gate = Gate::default();
    *gate.hold.lock().expect("lock") = Some("live".into());
    let app = spawn_with(Options {
        dir: Some(dir),
        handlers: vec![
            Registration::new("ordered", gate.clone())
                .source("credicorp")
                .ordered_by("/data/application_id"),
        ],
        admin_token: Some(TOKEN),
        ..Options::default()
    })
    .await;
    // A live delivery of the same key binds `ordered` itself and holds the line.
    assert_eq!(app.deliver("live", &body(4)).await.status(), 202);
    let events = gate.events.clone();
    assert!(
        eventually(Duration::from_secs(30), || events
            .lock()
            .expect("lock")
            .contains(&"start live".to_owned()))
        .await
    );
    // Paused while the live run holds: the backfilled pairs must wait for both.
    let pause = app
        .client
        .post(format!(
            "{}/admin/handlers/ordered/pause",
            app.admin_address
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(pause.status(), 200);
    assert_eq!(
        backfill(&app, "ordered", serde_json::json!({})).await,
        serde_json::json!({"bound": 3, "already": 1})
    );
    gate.release.notify_one();
    assert!(
        eventually(Duration::from_secs(30), || events
            .lock()
            .expect("lock")
            .contains(&"end live".to_owned()))
        .await
    );
    // The handler is paused: nothing else starts. Give the dispatcher a few passes.
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < deadline {
        assert_eq!(
            events.lock().expect("lock").len(),
            2,
            "paused: nothing starts"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handlers = app.admin_get("/admin/handlers").await;
    let handlers: serde_json::Value = handlers.json().await.expect("json");
    let ordered = handlers["handlers"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["name"] == "ordered"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        ordered["due"].as_u64().unwrap_or(0) + ordered["waiting"].as_u64().unwrap_or(0),
        3,
        "{ordered}"
    );
    let resume = app
        .client
        .post(format!(
            "{}/admin/handlers/ordered/resume",
            app.admin_address
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(resume.status(), 200);
    assert!(
        eventually(Duration::from_secs(30), || events
            .lock()
            .expect("lock")
            .len()
            == 8)
        .await,
        "{:?}",
        events.lock().expect("lock")
    );
    assert_eq!(
        *events.lock().expect("lock"),
        [
            "start live",
            "end live",
            "start old_1",
            "end old_1",
            "start old_2",
            "end old_2",
            "start old_3",
            "end old_3"
        ],
        "one at a time, in received order, behind the live pair"
    );
    app.stop().await;
}

/// A backfill racing new deliveries (which bind the handler themselves) binds every
/// delivery once: no pair is made twice, none is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_racing_new_deliveries_binds_each_once() {
    let app = spawn_with(Options {
        admin_token: Some(TOKEN),
        ..Options::default()
    })
    .await;
    for i in 0..300 {
        assert_eq!(
            app.deliver(&format!("old_{i}"), &event("application.created", i))
                .await
                .status(),
            202
        );
    }
    let dir = app.stop().await;
    let b = Recorder::default();
    let app = spawn_with(Options {
        dir: Some(dir),
        handlers: vec![Registration::new("b", b.clone()).source("credicorp")],
        admin_token: Some(TOKEN),
        ..Options::default()
    })
    .await;
    let senders = async {
        for i in 0..200 {
            let response = app
                .deliver(&format!("new_{i}"), &event("application.created", i))
                .await;
            assert_eq!(response.status(), 202);
        }
    };
    let (report, ()) = tokio::join!(backfill(&app, "b", serde_json::json!({})), senders);
    let bound = report["bound"].as_u64().expect("bound");
    let already = report["already"].as_u64().expect("already");
    assert_eq!(bound, 300, "{report}");
    assert!(already <= 200, "{report}");
    assert!(eventually(Duration::from_secs(60), || b.runs().len() == 500).await);
    let mut ids: Vec<String> = b.runs().into_iter().map(|r| r.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 500, "each delivery once");
    assert_eq!(
        backfill(&app, "b", serde_json::json!({})).await,
        serde_json::json!({"bound": 0, "already": 500})
    );
    app.stop().await;
}

/// The real binary killed with SIGKILL in the middle of a backfill of 10 000 stored
/// deliveries: `store check` finds nothing broken, and the rerun binds the rest — every
/// delivery bound once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_cut_by_kill_dash_nine_leaves_a_clean_store_and_the_rerun_binds_the_rest() {
    use std::io::BufRead as _;
    const STORED: usize = 10_000;
    let dir = tempfile::TempDir::new().expect("dir");
    let options = Options {
        extra_toml: "[admin]\ntoken_env = \"WEBHOOK_INBOX_TEST_ADMIN_TOKEN\"\n\n\
                     [[handlers]]\nname = \"a\"\nkind = \"log\"\nsource = \"credicorp\"\n"
            .into(),
        ..Options::default()
    };
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        crate::helpers::config_text(dir.path(), &options),
    )
    .expect("config");
    // Stored while only `a` was configured (the store itself, as a long-running server
    // would have filled it).
    {
        let config = webhook_inbox::config::Config::load(&config_path).expect("config");
        let source = webhook_inbox::verify::Source::named(&config, "credicorp").expect("source");
        let store = crate::helpers::open_store(
            dir.path(),
            webhook_inbox::config::Durability::Buffered,
            None,
        )
        .await;
        let received = webhook_inbox::clock::to_ms(SystemTime::now()) - 3_600_000;
        for i in 0..STORED {
            let id = format!("stored_{i:05}");
            let body = event("application.created", i as u32);
            let d = webhook_inbox::testing::authenticated(
                &source,
                &id,
                body.as_bytes(),
                SystemTime::now(),
            )
            .expect("signed");
            let new = webhook_inbox::store::NewDelivery::new(
                d,
                received + i as u64,
                vec!["a".into()],
                false,
            )
            .acknowledged(webhook_inbox::store::StoredResponse {
                status: 202,
                body: format!("{{\"delivery_id\":\"{id}\"}}"),
            });
            webhook_inbox::store::Claims::claim(&*store, new)
                .await
                .expect("claim");
        }
        webhook_inbox::store::Maintenance::flush(&*store)
            .await
            .expect("flush");
    }
    // `b` added.
    let with_b = format!(
        "{}\n[[handlers]]\nname = \"b\"\nkind = \"log\"\nsource = \"credicorp\"\n",
        crate::helpers::config_text(dir.path(), &options)
    );
    std::fs::write(&config_path, &with_b).expect("config");
    let backfill_cli = |admin_port: u16| {
        std::process::Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
            .args(["handlers", "backfill", "b", "--admin"])
            .arg(format!("http://127.0.0.1:{admin_port}"))
            .arg("--config")
            .arg(&config_path)
            .env("WEBHOOK_INBOX_TEST_ADMIN_TOKEN", TOKEN)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the CLI runs")
    };

    let mut serving =
        crate::helpers::try_spawn_serve(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let mut cli = backfill_cli(serving.admin_port);
    let stderr = cli.stderr.take().expect("stderr");
    // Killed as soon as the first batch is reported bound (a batch is durable before its
    // progress line is sent).
    let first = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("bound"))
    })
    .await
    .expect("join")
    .expect("a progress line");
    serving.child.kill().expect("SIGKILL");
    let _ = serving.child.wait();
    let _ = cli.wait();
    assert!(first.contains("b: looked at 256, bound 256"), "{first}");
    crate::crash::assert_store_check_clean(&config_path);

    let mut serving =
        crate::helpers::try_spawn_serve(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let cli = backfill_cli(serving.admin_port);
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output().expect("CLI"))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let numbers: Vec<usize> = stdout
        .trim()
        .trim_start_matches("b: bound ")
        .split(", already bound ")
        .map(|n| n.trim().parse().expect("a count"))
        .collect();
    let (bound, already) = (numbers[0], numbers[1]);
    assert_eq!(bound + already, STORED, "{stdout}");
    assert!(
        already >= 256 && bound > 0,
        "the kill cut the first backfill: {stdout}"
    );
    serving.child.kill().expect("stop");
    let _ = serving.child.wait();
    crate::crash::assert_store_check_clean(&config_path);
    let store = crate::helpers::open_store(
        dir.path(),
        webhook_inbox::config::Durability::Buffered,
        None,
    )
    .await;
    for i in (0..STORED).step_by(997) {
        let record = webhook_inbox::store::Claims::record(
            &*store,
            &webhook_inbox::store::DeliveryKey::new("credicorp", format!("stored_{i:05}")),
        )
        .await
        .expect("read")
        .expect("stored");
        assert_eq!(record.handlers, ["a", "b"], "bound once");
    }
}
