//! Delivery control (issue 15, the part built so far): a handler's `match` decides at claim
//! time which deliveries it is bound to.

use std::time::Duration;

use webhook_inbox::Registration;

use crate::helpers::{Options, Recorder, eventually, spawn_with};

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

async fn dead_letters(app: &crate::helpers::TestApp) -> f64 {
    let text = app
        .client
        .get(format!("{}/metrics", app.admin_address))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("webhook_inbox_dead_letters "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
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
            dead_letters(&app).await == 200.0
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
            dead_letters(&app).await == 100.0
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
            dead_letters(&app).await == 0.0
        })
        .await
    );
    assert_eq!(ha.runs().len(), 400, "nothing ran twice");
}
