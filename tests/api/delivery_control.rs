//! Delivery control (design.md, "Delivery control"): a handler's `match` decides at claim
//! time which deliveries it is bound to; `concurrency` and `rate` pace its runs; a pause
//! stops its runs (on every replica, across restarts) while its deliveries keep coming.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError, Registration};

use crate::helpers::{Options, Recorder, eventually, spawn_with};

/// A handler that takes `work` per run and records when each run started and how many ran
/// at once at most.
#[derive(Clone, Default)]
struct Paced {
    work: Duration,
    active: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
    starts: Arc<Mutex<Vec<Instant>>>,
}

impl Paced {
    fn runs(&self) -> usize {
        self.starts.lock().expect("lock").len()
    }
}

#[async_trait]
impl Handler for Paced {
    async fn handle(&self, _: &Delivery, _: &HandlerContext) -> Result<(), HandlerError> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        self.starts.lock().expect("lock").push(Instant::now());
        // The handler's own work (a downstream call), not a wait for the test.
        tokio::time::sleep(self.work).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// `concurrency = n`: never more than n runs of the handler at once, though the dispatcher
/// runs 4 at once and other handlers keep running beside it.
#[tokio::test]
async fn a_handler_never_runs_more_than_its_concurrency_at_once() {
    for limit in [1usize, 3] {
        let paced = Paced {
            work: Duration::from_millis(30),
            ..Paced::default()
        };
        let app = spawn_with(Options {
            handlers: vec![
                Registration::new("paced", paced.clone())
                    .source("credicorp")
                    .concurrency(limit),
            ],
            ..Options::default()
        })
        .await;
        for n in 0..24 {
            let id = format!("msg_conc_{limit}_{n}");
            assert_eq!(app.deliver(&id, "{}").await.status().as_u16(), 202);
        }
        assert!(eventually(Duration::from_secs(30), || paced.runs() == 24).await);
        assert!(eventually(Duration::from_secs(10), || app.recorder.runs().len() == 24).await);
        let most = paced.most_at_once.load(Ordering::SeqCst);
        assert!(
            most <= limit,
            "{most} runs at once with concurrency = {limit}"
        );
        app.stop().await;
    }
}

/// `rate = "20/s"`: over 5 s, no second holds more than 20 starts (plus a burst of one,
/// and the lag of a start behind its turn), while the backlog is large enough to go faster.
#[tokio::test]
async fn a_handler_starts_no_more_runs_than_its_rate() {
    let paced = Paced::default();
    let app = spawn_with(Options {
        handlers: vec![
            Registration::new("paced", paced.clone())
                .source("credicorp")
                .rate("20/s".parse().expect("rate")),
        ],
        ..Options::default()
    })
    .await;
    for n in 0..110 {
        assert_eq!(
            app.deliver(&format!("msg_rate_{n}"), "{}")
                .await
                .status()
                .as_u16(),
            202
        );
    }
    assert!(eventually(Duration::from_secs(30), || paced.runs() >= 100).await);
    let starts = paced.starts.lock().expect("lock").clone();
    // The limiter spaces the turns; a handler starts a store write after its turn, which on
    // a loaded machine can lag by tens of milliseconds, so two starts can come closer than
    // their turns did. Windows of 900 ms allow each start up to 100 ms behind its turn: at
    // most 20 turns a second (plus a burst of one) fit, where an unpaced handler would
    // start the whole backlog at once.
    for (i, first) in starts.iter().enumerate() {
        let within = starts[i..]
            .iter()
            .take_while(|t| t.duration_since(*first) < Duration::from_millis(900))
            .count();
        assert!(within <= 21, "{within} starts within 900 ms of start {i}");
    }
    let span = starts[99].duration_since(starts[0]);
    assert!(
        span >= Duration::from_millis(4900),
        "100 starts in {span:?}"
    );
}

/// A paused handler runs nothing (its deliveries are accepted and queued, another handler
/// runs them meanwhile), stays paused across a restart, and runs each of them once when
/// resumed; `GET /admin/handlers` and the metrics show it.
#[tokio::test]
async fn a_paused_handler_runs_nothing_until_resumed_even_across_a_restart() {
    let witness = Recorder::default();
    let options = |dir| Options {
        admin_token: Some("admin-token"),
        dir,
        handlers: vec![Registration::new("witness", witness.clone()).source("credicorp")],
        ..Options::default()
    };
    let app = spawn_with(options(None)).await;
    let pause = app
        .client
        .post(format!(
            "{}/admin/handlers/recorder/pause",
            app.admin_address
        ))
        .bearer_auth("admin-token")
        .send()
        .await
        .expect("pause");
    assert_eq!(pause.status().as_u16(), 200);
    let unknown = app
        .client
        .post(format!("{}/admin/handlers/nope/pause", app.admin_address))
        .bearer_auth("admin-token")
        .send()
        .await
        .expect("pause");
    assert_eq!(unknown.status().as_u16(), 404);
    for n in 0..100 {
        assert_eq!(
            app.deliver(&format!("msg_paused_{n:03}"), "{}")
                .await
                .status()
                .as_u16(),
            202
        );
    }
    // The other handler ran them all: the dispatcher went over them and left the paused
    // handler's alone.
    assert!(eventually(Duration::from_secs(30), || witness.runs().len() == 100).await);
    assert_eq!(app.recorder.runs().len(), 0);
    let recorder = app.recorder.clone();
    let dir = app.stop().await;

    let app = spawn_with(Options {
        recorder: recorder.clone(),
        ..options(Some(dir))
    })
    .await;
    let list: serde_json::Value = app
        .admin_get("/admin/handlers")
        .await
        .json()
        .await
        .expect("json");
    let entry = list["handlers"]
        .as_array()
        .expect("handlers")
        .iter()
        .find(|h| h["name"] == "recorder")
        .expect("listed")
        .clone();
    assert_eq!(entry["paused"], true, "{list}");
    assert_eq!(entry["due"], 100, "{list}");
    let metrics = app.admin_get("/metrics").await.text().await.expect("text");
    assert!(
        metrics.contains(r#"webhook_inbox_handler_paused{handler="recorder"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"webhook_inbox_handler_queue_depth{handler="recorder"} 100"#),
        "{metrics}"
    );
    // The whole queue is the paused handler's: the other one ran everything.
    assert!(
        metrics
            .lines()
            .any(|l| l == "webhook_inbox_queue_depth 100"),
        "{metrics}"
    );
    assert_eq!(recorder.runs().len(), 0, "still paused after the restart");

    let resume = app
        .client
        .post(format!(
            "{}/admin/handlers/recorder/resume",
            app.admin_address
        ))
        .bearer_auth("admin-token")
        .send()
        .await
        .expect("resume");
    assert_eq!(resume.status().as_u16(), 200);
    assert!(eventually(Duration::from_secs(30), || recorder.runs().len() == 100).await);
    let mut ids: Vec<String> = recorder.runs().into_iter().map(|r| r.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100, "each once");
    assert_eq!(
        witness.runs().len(),
        100,
        "the other handler ran nothing again"
    );
}

/// Bad limits are start-up errors naming the key.
#[test]
fn bad_limits_are_start_up_errors_naming_the_key() {
    for (line, key) in [
        ("concurrency = 0", "concurrency"),
        ("concurrency = -2", "concurrency"),
        ("rate = \"5/x\"", "rate"),
        ("rate = \"0/s\"", "rate"),
        ("rate = \"fast\"", "rate"),
        ("order_by = \"data/application_id\"", "order_by"),
        ("order_by = \"\"", "order_by"),
    ] {
        let text = format!(
            "[sources.credicorp]\nsecrets = [\"{}\"]\n\n[[handlers]]\nname = \"h\"\nkind = \"log\"\n{line}\n",
            crate::helpers::SECRET
        );
        let e = webhook_inbox::config::Config::parse(&text, "limits.toml")
            .expect_err(line)
            .to_string();
        assert!(e.contains(key) && e.contains("limits.toml"), "{line}: {e}");
    }
}

/// `order_by` on a handler of an `ack = "processed"` source is refused: those runs happen
/// while the sender waits, in the order it sends.
#[test]
fn order_by_on_a_processed_source_is_a_start_up_error() {
    let text = format!(
        "[sources.credicorp]\nsecrets = [\"{}\"]\nack = \"processed\"\n\n[[handlers]]\nname = \"h\"\nkind = \"log\"\nsource = \"credicorp\"\norder_by = \"/data/id\"\n",
        crate::helpers::SECRET
    );
    let e = webhook_inbox::config::Config::parse(&text, "order.toml")
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("order_by") && e.contains("processed") && e.contains("order.toml"),
        "{e}"
    );
}

fn application(id: &str, product: Option<&str>) -> String {
    let product = product.map_or(String::new(), |p| format!(r#","product":"{p}""#));
    format!(
        r#"{{"type":"application.created","data":{{"application":{{"application_id":"{id}"{product}}}}}}}"#
    )
}

/// Only deliveries whose body holds an allowed value at the pointer get a job for the
/// handler; the others are accepted and recorded without it (configured or plugin).
#[tokio::test]
async fn a_match_binds_only_the_deliveries_whose_body_holds_an_allowed_value() {
    let loans = Recorder::default();
    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        handlers: vec![
            Registration::new("loans", loans.clone())
                .source("credicorp")
                .matching_body(
                    "/data/application/product",
                    [
                        serde_json::json!("personal_loan"),
                        serde_json::json!("mortgage"),
                    ],
                ),
        ],
        extra_toml: r#"
[[handlers]]
name = "mortgages-only"
kind = "log"
source = "credicorp"
match = { "/data/application/product" = ["mortgage"] }
"#
        .into(),
        ..Options::default()
    })
    .await;
    let cases = [
        ("app_1", Some("personal_loan"), true, false),
        ("app_2", Some("mortgage"), true, true),
        ("app_3", Some("car_loan"), false, false),
        ("app_4", None, false, false),
    ];
    for (id, product, _, _) in cases {
        assert_eq!(
            app.deliver(id, &application(id, product))
                .await
                .status()
                .as_u16(),
            202
        );
    }
    // The recorder (bound to everything) saw all four; then the matched ones are known.
    assert!(eventually(Duration::from_secs(20), || app.recorder.runs().len() == 4).await);
    assert!(eventually(Duration::from_secs(20), || loans.runs().len() == 2).await);
    for (id, _, loan, mortgage) in cases {
        assert_eq!(loans.runs_of(id), usize::from(loan), "{id}");
        let shown = app.admin_show("credicorp", id).await;
        let handlers: Vec<&str> = shown["record"]["handlers"]
            .as_array()
            .expect("handlers")
            .iter()
            .filter_map(|h| h.as_str())
            .collect();
        assert_eq!(handlers.contains(&"loans"), loan, "{id}: {handlers:?}");
        assert_eq!(
            handlers.contains(&"mortgages-only"),
            mortgage,
            "{id}: {handlers:?}"
        );
    }
}

/// Bulk retry: 100 deliveries whose two handlers both died; `deliveries retry --all
/// --handler ha` (the real binary, through the admin API) requeues exactly ha's 100 pairs,
/// which run once more with the same idempotency keys and attempt numbers continuing; hb's
/// stay dead until their own bulk retry (`POST /admin/retry`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_retry_requeues_exactly_the_filtered_dead_pairs() {
    let ha = Recorder {
        fail_first: 3,
        ..Recorder::default()
    };
    let hb = Recorder {
        fail_first: 3,
        ..Recorder::default()
    };
    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        handlers: vec![
            Registration::new("ha", ha.clone()).source("credicorp"),
            Registration::new("hb", hb.clone()).source("credicorp"),
        ],
        ..Options::default()
    })
    .await;
    for n in 0..100 {
        let id = format!("bulk_{n}");
        assert_eq!(
            app.deliver(&id, &application(&id, None))
                .await
                .status()
                .as_u16(),
            202
        );
    }
    // max_attempts = 3 in the test config: three failures each, then dead.
    assert!(
        crate::helpers::eventually_async(Duration::from_secs(60), || async {
            crate::helpers::dead_letters(&app).await == 200.0
        })
        .await,
        "every pair dead"
    );

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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args([
            "deliveries",
            "retry",
            "--all",
            "--handler",
            "ha",
            "--status",
            "dead",
        ])
        .args(["--admin", &app.admin_address, "--config"])
        .arg(&config)
        .env("WEBHOOK_INBOX_ADMIN_TOKEN", "admin-token")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("requeued 100 pair(s)"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(eventually(Duration::from_secs(30), || ha.runs().len() == 400).await);
    assert!(
        crate::helpers::eventually_async(Duration::from_secs(30), || async {
            crate::helpers::dead_letters(&app).await == 100.0
        })
        .await
    );
    for n in 0..100 {
        let id = format!("bulk_{n}");
        let runs: Vec<_> = ha.runs().into_iter().filter(|r| r.id == id).collect();
        let attempts: Vec<u32> = runs.iter().map(|r| r.attempt).collect();
        assert_eq!(attempts, [1, 2, 3, 4], "{id}");
        assert!(
            runs.iter()
                .all(|r| r.idempotency_key == runs[0].idempotency_key)
        );
        assert_eq!(
            hb.runs_of(&id),
            3,
            "{id}: the unfiltered handler stays dead"
        );
    }

    let answer: serde_json::Value = app
        .client
        .post(format!("{}/admin/retry", app.admin_address))
        .bearer_auth("admin-token")
        .json(&serde_json::json!({ "handler": "hb", "status": "dead" }))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["retried"], 100);
    assert!(eventually(Duration::from_secs(30), || hb.runs().len() == 400).await);
    assert!(
        crate::helpers::eventually_async(Duration::from_secs(30), || async {
            crate::helpers::dead_letters(&app).await == 0.0
        })
        .await
    );
    assert_eq!(ha.runs().len(), 400, "nothing ran twice");
}

/// `webhook-inbox handlers list|pause|resume` through the admin API.
#[tokio::test]
async fn the_handlers_command_lists_pauses_and_resumes() {
    let app = spawn_with(Options {
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    let config_path = app.dir.path().join("cli.toml");
    std::fs::write(
        &config_path,
        crate::helpers::config_text(app.dir.path(), &Options::default()),
    )
    .expect("write");
    let cli = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (config_path, admin) = (config_path.clone(), app.admin_address.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
                    .arg("handlers")
                    .args(&args)
                    .arg("--config")
                    .arg(&config_path)
                    .args(["--admin", &admin])
                    .env("WEBHOOK_INBOX_ADMIN_TOKEN", "admin-token")
                    .output()
                    .expect("binary runs");
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                (out.status.success(), text)
            })
            .await
            .expect("join")
        }
    };
    let (ok, text) = cli(&["pause", "recorder"]).await;
    assert!(ok && text.contains("recorder paused"), "{text}");
    let (ok, text) = cli(&["list"]).await;
    assert!(ok, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("recorder"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("paused"), "{text}");
    let (ok, text) = cli(&["resume", "recorder", "--json"]).await;
    assert!(ok, "{text}");
    let view: serde_json::Value = serde_json::from_str(&text).expect("--json");
    assert_eq!(view["paused"], false);
    let (ok, text) = cli(&["pause", "no-such-handler"]).await;
    assert!(!ok && text.contains("no handler of that name"), "{text}");
}

/// `ack = "processed"`: a paused handler's inline run does not start; the sender is told to
/// come back (409 with Retry-After), and once resumed its retry runs the handler and gets
/// the answer.
#[tokio::test]
async fn processed_mode_waits_for_a_paused_handler() {
    let app = spawn_with(Options {
        ack: "processed",
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    let toggle = |verb: &'static str| {
        app.client
            .post(format!(
                "{}/admin/handlers/recorder/{verb}",
                app.admin_address
            ))
            .bearer_auth("admin-token")
            .send()
    };
    assert_eq!(toggle("pause").await.expect("pause").status().as_u16(), 200);
    let held = app.deliver("msg_processed_paused", "{}").await;
    assert_eq!(held.status().as_u16(), 409);
    assert!(held.headers().contains_key("retry-after"));
    assert_eq!(app.recorder.runs().len(), 0);
    assert_eq!(
        toggle("resume").await.expect("resume").status().as_u16(),
        200
    );
    // The sender retries after Retry-After (and the claimant's hold lapses meanwhile).
    let mut answer = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        answer = app
            .deliver("msg_processed_paused", "{}")
            .await
            .status()
            .as_u16();
        if answer == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer, 200);
    assert_eq!(app.recorder.runs_of("msg_processed_paused"), 1);
}

/// Sends `id` as a processed-mode sender does until it gets 200: every answer before is 409
/// (in progress, or waiting for its turn) or 500 (a handler failed), and it comes back.
async fn send_until_processed(app: &crate::helpers::TestApp, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = app.deliver(id, "{}").await;
        let status = answer.status().as_u16();
        if status == 200 {
            return;
        }
        assert!(
            [409, 500].contains(&status),
            "{id}: {status} {:?}",
            answer.text().await
        );
        assert!(Instant::now() < deadline, "{id} never processed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 22.2, invariants 6 and 7: a run waits for its `rate` turn before it starts and
/// holds no lease meanwhile. Four processed-mode senders at once to a handler allowed one
/// start every 2 s, with a 1 s run lease, so the later ones wait longer than a lease; an
/// operator retry of each delivery and a bulk retry race them while they wait. Each
/// delivery runs the handler once, and each sender gets its 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_its_rate_turn_holds_no_lease_and_runs_once() {
    let limited = Recorder::default();
    let app = Arc::new(
        spawn_with(Options {
            ack: "processed",
            admin_token: Some("admin-token"),
            dispatch_toml: "run_lease = \"1s\"".into(),
            handlers: vec![
                Registration::new("limited", limited.clone())
                    .source("credicorp")
                    .rate("30/m".parse().expect("rate")),
            ],
            ..Options::default()
        })
        .await,
    );
    let ids: Vec<String> = (0..4).map(|i| format!("msg_rate_race_{i}")).collect();
    let senders: Vec<_> = ids
        .iter()
        .map(|id| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { send_until_processed(&app, &id).await })
        })
        .collect();
    // The last sender waits 6 s for its turn: past a lease and its grace (3 s) when the
    // third run starts, and then retries race it.
    assert!(eventually(Duration::from_secs(30), || limited.runs().len() >= 3).await);
    for id in &ids {
        let retried = app
            .client
            .post(format!(
                "{}/admin/deliveries/credicorp/{id}/retry",
                app.admin_address
            ))
            .bearer_auth("admin-token")
            .send()
            .await
            .expect("retry");
        assert!(retried.status().is_success(), "{id}: {}", retried.status());
    }
    for status in ["failed", "dead"] {
        let bulk = app
            .client
            .post(format!("{}/admin/retry", app.admin_address))
            .bearer_auth("admin-token")
            .json(&serde_json::json!({ "status": status }))
            .send()
            .await
            .expect("bulk retry");
        assert!(bulk.status().is_success());
    }
    for sender in senders {
        sender.await.expect("sender");
    }
    // Every pair succeeded: from then on none can run again, so the counts are final.
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(30);
        while app.admin_show("credicorp", id).await["status"] != "succeeded" {
            assert!(Instant::now() < deadline, "{id} never settled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for id in &ids {
        assert_eq!(limited.runs_of(id), 1, "{id}: {:?}", limited.runs());
    }
}

/// Issue 22.3: `concurrency` holds for processed-mode inline runs too (one gate with the
/// dispatcher's): four processed-mode senders at once to a handler of `concurrency = 1`
/// never run it twice at once; the senders over the limit wait for their turn (or are told
/// to come back with 409) and all get their 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_holds_for_processed_mode_inline_runs() {
    let paced = Paced {
        work: Duration::from_millis(300),
        ..Paced::default()
    };
    let app = Arc::new(
        spawn_with(Options {
            ack: "processed",
            handlers: vec![
                Registration::new("paced", paced.clone())
                    .source("credicorp")
                    .concurrency(1),
            ],
            ..Options::default()
        })
        .await,
    );
    let senders: Vec<_> = (0..4)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move { send_until_processed(&app, &format!("msg_one_{i}")).await })
        })
        .collect();
    for sender in senders {
        sender.await.expect("sender");
    }
    assert_eq!(paced.runs(), 4);
    assert_eq!(paced.most_at_once.load(Ordering::SeqCst), 1);
}
