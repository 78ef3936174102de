//! Installing it as a service: the systemd unit verifies, gives a graceful stop enough time,
//! and the binary reports its version.

use std::process::Command;

const UNIT: &str = include_str!("../../deploy/webhook-inbox.service");

#[test]
fn the_systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::TempDir::new().expect("dir");
    // The unit as installed, pointing at this build (verify checks that ExecStart exists).
    let unit = UNIT.replace(
        "/usr/local/bin/webhook-inbox",
        env!("CARGO_BIN_EXE_webhook-inbox"),
    );
    let path = dir.path().join("webhook-inbox.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys and bad values are only warnings: none may be printed.
    assert!(
        !stderr.contains("webhook-inbox.service"),
        "warnings: {stderr}"
    );
}

#[test]
fn the_unit_gives_a_graceful_stop_more_than_the_shutdown_grace() {
    let timeout = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec is set");
    let timeout = humantime::parse_duration(timeout.trim()).expect("a duration");
    let grace = webhook_inbox::config::DispatchConfig::default().shutdown_grace;
    assert!(timeout > grace, "{timeout:?} <= {grace:?}");
    for hardening in [
        "DynamicUser=yes",
        "StateDirectory=webhook-inbox",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
    ] {
        assert!(UNIT.lines().any(|l| l == hardening), "{hardening}");
    }
}

#[test]
fn the_binary_reports_its_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .arg("--version")
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("webhook-inbox {}", env!("CARGO_PKG_VERSION"))
    );
}

const DASHBOARD: &str = include_str!("../../deploy/grafana-dashboard.json");

/// The metric names a PromQL text uses (`webhook_inbox_…`), as the exposition types them:
/// a histogram's `_bucket`/`_sum`/`_count` and a counter's `_total` name their family.
fn metric_families(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("webhook_inbox_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name)
            .to_owned();
        out.push(family);
    }
    out
}

/// The Grafana dashboard in `deploy/` names only metrics the binary exports: every family
/// its queries use is in a scrape of `/metrics` of the real app (with a handler and the
/// sled store, as deployed), and it charts what an operator needs first.
#[tokio::test]
async fn the_grafana_dashboard_names_only_metrics_the_binary_exports() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("JSON");
    let mut used = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            used.extend(metric_families(target["expr"].as_str().expect("expr")));
        }
    }
    for wanted in [
        "webhook_inbox_deliveries",
        "webhook_inbox_answer_duration_seconds",
        "webhook_inbox_handler_queue_depth",
        "webhook_inbox_handler_runs",
        "webhook_inbox_dead_letters",
        "webhook_inbox_store_flush_seconds",
        "webhook_inbox_calls",
    ] {
        assert!(used.contains(wanted), "the dashboard charts {wanted}");
    }
    // A configured handler (the recorder is a plugin): its call counts exist at zero.
    let app = crate::helpers::spawn_with(crate::helpers::Options {
        extra_toml: "[[handlers]]\nname = \"audit\"\nkind = \"log\"\n".into(),
        ..crate::helpers::Options::default()
    })
    .await;
    assert_eq!(
        app.deliver(
            "msg_metrics",
            &crate::helpers::event("application.created", 1)
        )
        .await
        .status(),
        202
    );
    // Scraped once its run is counted (the per-handler families appear with their first
    // sample, which lands just after the handler returns).
    let scrape = || async { app.metrics().await };
    let counted = crate::helpers::eventually_async(std::time::Duration::from_secs(30), || async {
        scrape().await.contains(
            r#"webhook_inbox_handler_runs_total{handler="recorder",result="succeeded"} 1"#,
        )
    })
    .await;
    assert!(counted, "the run is counted");
    let text = scrape().await;
    let exported: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for family in &used {
        // The store's flush histogram exists only where the service opened sled itself.
        if family == "webhook_inbox_store_flush_seconds"
            && crate::helpers::backend_under_test().is_some()
        {
            continue;
        }
        assert!(
            exported.contains(family.as_str()),
            "the dashboard uses {family}, which /metrics does not export:\n{text}"
        );
    }
    app.stop().await;
}
